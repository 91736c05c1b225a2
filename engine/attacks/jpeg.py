"""JPEG-L∞ attack (Kang et al. 2019, "Testing robustness against unforeseen adversaries").

The threat model perturbs an image in its JPEG representation: the colours are converted to
YCbCr, each channel is cut into 8×8 blocks, each block goes through the orthonormal 2-D DCT-II,
and every DCT coefficient may move by a bounded number of JPEG quantisation steps. The
adversarial image is the inverse DCT of the perturbed coefficients, converted back to RGB and
kept in ``[0, 1]``.

Units of ``bound`` (the same numbers as Kang et al.'s ``eps`` and PAT's table 4, where the
JPEG-L∞ bounds are 0.0625 / 0.125 / 0.25): coefficients are those of YCbCr images on the
``[0, 255]`` scale, divided by the standard JPEG quality-50 quantisation tables ``Q`` (luma
table for Y, chroma table for Cb and Cr). In the advex-uar code that PAT calls, the
perturbation is applied as ``noisy_round(c / Q) = c / Q + 0.5 · δ`` with ``‖δ‖∞ ≤ eps``; so
``bound`` is the *width* of the interval each quantised coefficient may move in, and each
coefficient moves by at most ``bound / 2`` quantisation steps, i.e. by
``bound · Q[u, v] / 2`` on the ``[0, 255]`` scale. Example: PAT's medium bound 0.125 lets the
luma DC coefficient (``Q = 16``, and an orthonormal DC coefficient is 8 × the block mean)
shift a block's mean brightness by ``0.125 · 16 / 2 / 8 = 0.125`` of a grey level, and the
highest-frequency luma coefficient (``Q = 99``) by ``0.125 · 99 / 2 ≈ 6.2``, a checkerboard of
up to ``6.2 / 4 ≈ 1.5`` grey levels; all 192 coefficients of a block move together, so pixel
changes add up (bound 0.25 reached ~0.3 in ``[0, 1]`` units on the test digits).
PAT's table caption says the JPEG row "assumes images in [0, 255]": that is true in the sense
that the quantised coefficients are those of a ``[0, 255]`` image; here images are in
``[0, 1]`` and the conversion is done for you, so ``jpeg:bound=0.125`` means what PAT's 0.125
means.

Deviations from advex-uar (all documented in :class:`JPEGLinf`): chroma is not subsampled 4:2:0
(advex-uar averages Cb/Cr over 2×2 pixels even when δ = 0, so its "unperturbed" image is already
blurred in colour; here δ = 0 is the identity and chroma coefficients are per 8×8 full-resolution
block); images must have a height and width that are multiples of 8 (advex-uar pads to
multiples of 16); there is no rounding in either (advex-uar's "quantisation" divides and
multiplies by ``Q`` without rounding, so the whole pipeline is linear); and by default the
result is kept inside the threat model *and* ``[0, 1]`` at every step (:func:`project_jpeg`),
where advex-uar clips to ``[0, 255]`` after decoding and so leaves the coefficient box
wherever pixels saturate (``projection=clip`` reproduces that).

8-bit storage: at PAT's bounds the allowed change of the low-frequency coefficients is far
below one grey level (see above), so rounding an adversarial image to 8 bits alone moves its
measured size past the bound (3.5-3.9× for ``bound=0.0625``, 1.7-3.1× for 0.25, on four skimage
photos with each pixel truncated toward the natural image, as engine.stimuli stores them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from kornia.color import rgb_to_ycbcr
from torch import Tensor

from ..errors import EngineError
from .base import Model, ParametricAttack, noise_uniform, param, parametric_ascent
from .registry import register_attack

#: JPEG block size.
BLOCK = 8

#: Standard JPEG luminance quantisation table at quality 50 (ITU-T T.81, Annex K, table K.1),
#: indexed ``[vertical frequency][horizontal frequency]``.
LUMA_QUANTIZATION = (
    (16, 11, 10, 16, 24, 40, 51, 61),
    (12, 12, 14, 19, 26, 58, 60, 55),
    (14, 13, 16, 24, 40, 57, 69, 56),
    (14, 17, 22, 29, 51, 87, 80, 62),
    (18, 22, 37, 56, 68, 109, 103, 77),
    (24, 35, 55, 64, 81, 104, 113, 92),
    (49, 64, 78, 87, 103, 121, 120, 101),
    (72, 92, 95, 98, 112, 100, 103, 99),
)

#: Standard JPEG chrominance quantisation table at quality 50 (T.81 table K.2).
CHROMA_QUANTIZATION = (
    (17, 18, 24, 47, 99, 99, 99, 99),
    (18, 21, 26, 66, 99, 99, 99, 99),
    (24, 26, 56, 99, 99, 99, 99, 99),
    (47, 66, 99, 99, 99, 99, 99, 99),
    *((99,) * 8 for _ in range(4)),
)

#: Alternating-projection rounds of :func:`project_jpeg` before the exact final shrink. On
#: 16×16 digits (a third of the pixels at exactly 0) 5 rounds lost about half the success
#: rate of 20 rounds; 50 rounds gained little more. A round costs two block DCTs.
PROJECTION_ROUNDS = 20


# --------------------------------------------------------------------------------------------
# The transform: block DCT of YCbCr, in Kang et al.'s coefficient units
# --------------------------------------------------------------------------------------------


def dct_matrix(size: int = BLOCK, *, dtype: torch.dtype = torch.float32,
               device: torch.device | str | None = None) -> Tensor:
    """The orthonormal DCT-II matrix ``D`` (``[size, size]``): ``D[k, n] = a_k cos(π(2n+1)k /
    2size)`` with ``a_0 = √(1/size)``, ``a_k = √(2/size)``. ``D @ x`` is the DCT of a column
    ``x`` and ``D.T`` inverts it exactly (``D @ D.T = I``). Built in float64, then cast."""
    n = torch.arange(size, dtype=torch.float64)
    matrix = torch.cos(math.pi * (2 * n[None, :] + 1) * n[:, None] / (2 * size))
    matrix = matrix * math.sqrt(2 / size)
    matrix[0] /= math.sqrt(2)
    return matrix.to(dtype=dtype, device=device)


def check_block_size(height: int, width: int, multiple: int = BLOCK) -> None:
    """:class:`EngineError` unless the height and width are multiples of ``multiple``
    (:data:`BLOCK`; 16 with chroma subsampling)."""
    if height % multiple or width % multiple:
        why = " (chroma subsampling: 8×8 blocks of half-resolution chroma)" if (
            multiple != BLOCK) else ""
        raise EngineError(
            f"the JPEG attack needs image height and width that are multiples of"
            f" {multiple}{why}, got {height}×{width}; crop or resize the images first (e.g. to"
            f" {height - height % multiple}×{width - width % multiple})"
        )


def _to_blocks(x: Tensor) -> Tensor:
    """``[..., H, W]`` → ``[..., H/8, W/8, 8, 8]``."""
    *lead, height, width = x.shape
    x = x.reshape(*lead, height // BLOCK, BLOCK, width // BLOCK, BLOCK)
    return x.transpose(-3, -2)


def _from_blocks(blocks: Tensor) -> Tensor:
    """Inverse of :func:`_to_blocks`."""
    *lead, rows, cols, _, _ = blocks.shape
    return blocks.transpose(-3, -2).reshape(*lead, rows * BLOCK, cols * BLOCK)


def block_dct(x: Tensor, matrix: Tensor | None = None) -> Tensor:
    """Orthonormal 8×8 block DCT-II of ``[..., H, W]`` (H, W multiples of 8), laid out like
    the input: block ``(i, j)`` of the result holds the coefficients of block ``(i, j)``,
    ``[u, v]`` = (vertical, horizontal) frequency. Linear, differentiable, orthonormal.
    ``matrix``: :func:`dct_matrix` in ``x``'s dtype/device, if already at hand."""
    if matrix is None:
        matrix = dct_matrix(dtype=x.dtype, device=x.device)
    return _from_blocks(matrix @ _to_blocks(x) @ matrix.T)


def block_idct(coefficients: Tensor, matrix: Tensor | None = None) -> Tensor:
    """Inverse of :func:`block_dct` (its transpose, since the transform is orthonormal)."""
    if matrix is None:
        matrix = dct_matrix(dtype=coefficients.dtype, device=coefficients.device)
    return _from_blocks(matrix.T @ _to_blocks(coefficients) @ matrix)


def ycbcr_matrix(*, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> Tensor:
    """The linear part ``M`` (``[3, 3]``) of kornia's RGB → YCbCr (JPEG/JFIF full range):
    ``ycbcr = M @ rgb + (0, 0.5, 0.5)``. Differences of images transform by ``M`` alone."""
    basis = torch.eye(3, dtype=torch.float64).view(3, 3, 1, 1)
    offset = rgb_to_ycbcr(torch.zeros(1, 3, 1, 1, dtype=torch.float64)).view(3)
    columns = rgb_to_ycbcr(basis).view(3, 3) - offset  # row i: image of basis colour i
    return columns.T.to(dtype=dtype, device=device)


def coefficient_scale(height: int, width: int, *, dtype: torch.dtype = torch.float32,
                      device: torch.device | str | None = None) -> Tensor:
    """``[3, H, W]``: the change of a ``[0, 1]``-image DCT coefficient per unit of ``bound``,
    ``Q[u, v] / (2 · 255)`` (luma table for Y, chroma table for Cb/Cr), tiled per block."""
    luma = torch.tensor(LUMA_QUANTIZATION, dtype=torch.float64)
    chroma = torch.tensor(CHROMA_QUANTIZATION, dtype=torch.float64)
    tables = torch.stack([luma, chroma, chroma]) / (2 * 255)
    tiled = tables.repeat(1, height // BLOCK, width // BLOCK)
    return tiled.to(dtype=dtype, device=device)


def _working_dtype(x: Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


class JPEGTransform:
    """The linear map between an RGB difference ``[N, 3, H, W]`` (``[0, 1]`` units) and its
    coefficient change in ``bound`` units (YCbCr → 8×8 block DCT → divided by
    :func:`coefficient_scale`), with its constants built once for one image size, dtype and
    device (float16/bfloat16 inputs are computed in float32). Runs with autocast disabled:
    under bf16 autocast the DCT matmuls would lose ~3 digits, enough to leave the bound."""

    def __init__(self, height: int, width: int, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, subsample: bool = False):
        check_block_size(height, width, 2 * BLOCK if subsample else BLOCK)
        self.subsample = subsample
        self.dtype = dtype
        self.dct = dct_matrix(dtype=dtype, device=device)
        self.to_ycbcr = ycbcr_matrix(dtype=dtype, device=device)
        # kornia's ycbcr_to_rgb uses rounded constants (1.403 instead of 1.402), so it is not
        # the exact inverse of rgb_to_ycbcr (~3e-4 round-trip error); the exact matrix inverse
        # keeps δ = 0 the identity and perturbation_size consistent with the projection.
        self.to_rgb = torch.linalg.inv(ycbcr_matrix(dtype=torch.float64)).to(
            dtype=dtype, device=device)
        self.scale = coefficient_scale(height, width, dtype=dtype, device=device)

    @classmethod
    def like(cls, x: Tensor, *, subsample: bool = False) -> JPEGTransform:
        """The transform for tensors shaped, typed and placed like ``x``."""
        return cls(*x.shape[-2:], dtype=_working_dtype(x), device=x.device, subsample=subsample)

    def coefficients(self, difference: Tensor) -> Tensor:
        """RGB difference → coefficient change in ``bound`` units (same dtype as given).

        With chroma subsampling (4:2:0) the Cb/Cr coefficients are those of the 2×2-averaged
        chroma planes; they fill the top-left ``H/2 × W/2`` quarter of channels 1 and 2, the
        rest of those channels is 0 (one ``[N, 3, H, W]`` layout for both modes)."""
        with torch.autocast(device_type=difference.device.type, enabled=False):
            ycbcr = torch.einsum("ij,njhw->nihw", self.to_ycbcr, difference.to(self.dtype))
            if not self.subsample:
                return (block_dct(ycbcr, self.dct) / self.scale).to(difference.dtype)
            height, width = ycbcr.shape[-2:]
            out = torch.zeros_like(ycbcr)
            out[:, :1] = block_dct(ycbcr[:, :1], self.dct) / self.scale[:1]
            chroma = torch.nn.functional.avg_pool2d(ycbcr[:, 1:], 2)
            out[:, 1:, : height // 2, : width // 2] = (
                block_dct(chroma, self.dct) / self.scale[1:, : height // 2, : width // 2])
            return out.to(difference.dtype)

    def pixels(self, coefficients: Tensor) -> Tensor:
        """Coefficient change in ``bound`` units → RGB difference (same dtype as given);
        with subsampling, each chroma value is repeated over its 2×2 pixels (only the
        top-left quarter of the chroma channels is read)."""
        dtype = coefficients.dtype
        with torch.autocast(device_type=coefficients.device.type, enabled=False):
            coefficients = coefficients.to(self.dtype)
            if not self.subsample:
                ycbcr = block_idct(coefficients * self.scale, self.dct)
            else:
                height, width = coefficients.shape[-2:]
                luma = block_idct(coefficients[:, :1] * self.scale[:1], self.dct)
                quarter = (coefficients[:, 1:, : height // 2, : width // 2]
                           * self.scale[1:, : height // 2, : width // 2])
                chroma = block_idct(quarter, self.dct).repeat_interleave(2, dim=-2)
                ycbcr = torch.cat([luma, chroma.repeat_interleave(2, dim=-1)], dim=1)
            rgb = torch.einsum("ij,njhw->nihw", self.to_rgb, ycbcr)
            return rgb.to(dtype)

    def mask(self, like: Tensor) -> Tensor:
        """``[1, 3, H, W]`` 1 where a coefficient exists in this layout, else 0."""
        mask = torch.ones_like(like[:1])
        if self.subsample:
            height, width = like.shape[-2:]
            mask[:, 1:] = 0
            mask[:, 1:, : height // 2, : width // 2] = 1
        return mask

    def region_largest(self, coefficients: Tensor) -> Tensor:
        """Per image and pixel region (8×8, or 16×16 with subsampling), the largest
        ``|coefficient|`` that depends on it, broadcast back to ``[N, 1, H, W]``."""
        if not self.subsample:
            largest = _to_blocks(coefficients.abs()).amax(dim=(1, -2, -1), keepdim=True)
            return _from_blocks(largest.expand(*largest.shape[:4], BLOCK, BLOCK))
        height, width = coefficients.shape[-2:]
        side = 2 * BLOCK
        luma = coefficients[:, :1].abs()
        luma = luma.reshape(-1, 1, height // side, side, width // side, side).amax(dim=(3, 5))
        quarter = coefficients[:, 1:, : height // 2, : width // 2].abs()
        chroma = _to_blocks(quarter).amax(dim=(1, -2, -1))[:, None]
        largest = torch.maximum(luma, chroma)  # [N, 1, H/16, W/16]
        return largest.repeat_interleave(side, dim=-2).repeat_interleave(side, dim=-1)


def jpeg_coefficients(difference: Tensor) -> Tensor:
    """Coefficient change, in ``bound`` units, of an RGB difference ``[N, 3, H, W]``
    (``adversarial − natural`` in ``[0, 1]`` units): YCbCr → 8×8 block DCT → divided by
    :func:`coefficient_scale`. ``max |·|`` of the result is the JPEG-L∞ size."""
    return JPEGTransform.like(difference).coefficients(difference)


def jpeg_pixels(coefficients: Tensor) -> Tensor:
    """Inverse of :func:`jpeg_coefficients`: the RGB difference ``[N, 3, H, W]`` made by a
    coefficient change in ``bound`` units."""
    return JPEGTransform.like(coefficients).pixels(coefficients)


def project_jpeg(images: Tensor, coefficients: Tensor, bound: float,
                 rounds: int | None = None, transform: JPEGTransform | None = None
                 ) -> tuple[Tensor, Tensor]:
    """Turn a coefficient change into an image inside the threat model *and* ``[0, 1]``.

    The two constraints are not aligned (a box in DCT space, a box in pixel space), so
    clipping one can break the other. This alternates ``rounds`` times between clipping the
    coefficients to ``[-bound, bound]`` and clipping the pixels to ``[0, 1]`` (projections
    onto convex sets), then, to be exact, shrinks every 8×8 block's pixel change towards the
    natural image by the factor that brings its largest coefficient back to ``bound``
    (a convex combination of two images in ``[0, 1]`` stays in ``[0, 1]``, and each block's
    coefficients depend only on that block's pixels). ``rounds`` defaults to
    :data:`PROJECTION_ROUNDS`; ``transform`` to ``JPEGTransform.like(images)``.

    Returns ``(adversarial [N, 3, H, W] in [0, 1], coefficients [N, 3, H, W])`` with
    ``coefficients == jpeg_coefficients(adversarial − images)`` and ``|coefficients| <=
    bound`` (up to float rounding).
    """
    rounds = PROJECTION_ROUNDS if rounds is None else rounds
    transform = JPEGTransform.like(images) if transform is None else transform
    with torch.no_grad():
        coefficients = coefficients.clamp(-bound, bound)
        adversarial = (images + transform.pixels(coefficients)).clamp(0, 1)
        for _ in range(rounds):
            coefficients = transform.coefficients(adversarial - images).clamp(-bound, bound)
            adversarial = (images + transform.pixels(coefficients)).clamp(0, 1)
        coefficients = transform.coefficients(adversarial - images)
        if bound > 0:
            largest = transform.region_largest(coefficients)  # [N, 1, H, W]
            shrink = (bound / largest.clamp_min(1e-30)).clamp(max=1.0)
        else:
            shrink = torch.zeros_like(images[:, :1])
        adversarial = images + (adversarial - images) * shrink
        return adversarial, coefficients * shrink


# --------------------------------------------------------------------------------------------
# The attack
# --------------------------------------------------------------------------------------------


@register_attack(
    "jpeg",
    "JPEG-L∞ (Kang et al. 2019): YCbCr 8×8-DCT coefficients move by <= bound/2 quantisation"
    " steps",
)
@dataclass(frozen=True, kw_only=True)
class JPEGLinf(ParametricAttack):
    """JPEG-L∞ PGD (Kang et al. 2019, as used by PAT): sign steps on the DCT coefficients.

    ``bound`` is Kang et al.'s ``eps`` (PAT table 4: small 0.0625, medium 0.125, large 0.25):
    every coefficient of the 8×8 block DCT of the YCbCr image (``[0, 255]`` scale) may move
    by at most ``bound / 2`` quantisation steps of the JPEG quality-50 tables; see the module
    docstring for what that means in pixels. The attack variable is the coefficient change
    ``δ`` in these units (``|δ| <= bound``): it starts uniform in the box (``random_start``,
    as Kang et al.) or at zero and takes ``num_iterations`` steps of ``step_size ·
    sign(∇δ)``, each followed by a projection. Default ``step_size`` is Kang et al.'s (and
    PAT's) ``bound / sqrt(num_iterations)``. Returns per image the iterate with the highest
    success margin (:class:`~engine.attacks.base.BestIterate`).

    ``projection`` decides what "inside the threat model" means where pixels saturate:

    - ``exact`` (default): every iterate is an image in ``[0, 1]`` whose coefficient change,
      measured from the images, is within ``bound`` (:func:`project_jpeg`).
    - ``clip``: Kang et al.'s and PAT's images: ``δ`` is clipped to the box, then the decoded
      image is clipped to ``[0, 1]``. Where pixels saturate, the clipped image's measured
      coefficient change exceeds ``bound`` (5-25× on the skimage photos for random corner
      ``δ``), so this threat model is larger, and stronger on images with many black or white
      pixels (16×16 digits, bound 1, 20 iterations: ~86% success vs ~64% for ``exact``).

    Height and width must be multiples of 8 (:class:`EngineError` otherwise).
    ``chroma_subsampling=true`` perturbs Cb/Cr as advex-uar does, 4:2:0: their coefficients
    are those of the 2×2-averaged chroma planes (8×8 blocks at half resolution, each chroma
    change repeated over 2×2 pixels; H, W multiples of 16). Unlike advex-uar, δ = 0 is still
    the identity (advex-uar's pipeline also blurs the natural image's colour). Default false:
    chroma per 8×8 full-resolution block.

    ``perturbation_size(natural, other)`` measures the coefficient change from the images
    alone (``<= bound`` for ``exact``; may exceed it for ``clip``). :meth:`perturb_with_extras`
    also returns ``δ`` itself (always ``<= bound``).
    """

    projection: str = param(
        "exact", kind="choice", choices=("exact", "clip"),
        doc="exact: images stay within bound and [0, 1]; clip: Kang et al./PAT (clip pixels"
            " after decoding)",
    )

    chroma_subsampling: bool = param(
        False, kind="bool",
        doc="4:2:0 chroma as advex-uar: Cb/Cr coefficients of 2×2-averaged chroma (H, W"
            " multiples of 16)",
    )

    def default_step_size(self) -> float:
        """Kang et al.'s ``bound / sqrt(num_iterations)``."""
        return self.bound / math.sqrt(self.num_iterations)

    def perturbation_size(self, natural: Tensor, other: Tensor, model: Model | None = None
                          ) -> Tensor:
        """Per-image ``max |δ|`` (``[N]``): the JPEG-L∞ size of ``other − natural`` in bound
        units (needs H, W multiples of 8)."""
        difference = other - natural
        transform = JPEGTransform.like(difference, subsample=self.chroma_subsampling)
        return transform.coefficients(difference).flatten(1).abs().amax(dim=1)

    def _project(self, images: Tensor, delta: Tensor,
                 transform: JPEGTransform) -> tuple[Tensor, Tensor]:
        if self.projection == "exact":
            return project_jpeg(images, delta, self.bound, transform=transform)
        delta = delta.clamp(-self.bound, self.bound)
        return (images + transform.pixels(delta)).clamp(0, 1), delta

    size_extra: ClassVar[str | None] = "coefficient_linf"

    def perturb_with_extras(self, model: Model, images: Tensor, labels: Tensor,
                            generator: torch.Generator | None
                            ) -> tuple[Tensor, dict[str, Tensor]]:
        """:meth:`perturb` (same contract), plus ``{"coefficients": δ [N, 3, H, W],
        "coefficient_linf": max |δ| [N]}`` of the returned images, in bound units (for
        ``projection=clip``: the δ before clipping the pixels)."""
        transform = JPEGTransform.like(images, subsample=self.chroma_subsampling)  # checks size
        if self.random_start:
            start = (2 * noise_uniform(images.shape, generator, images) - 1) * self.bound
            start = start * transform.mask(images)
        else:
            start = torch.zeros_like(images)

        def render(delta: Tensor, adversarial: Tensor) -> Tensor:
            # value: exactly ``adversarial``; gradient: through the (linear) JPEG transform,
            # not through the projection (as Lp PGD ignores its clamp)
            pixels = transform.pixels(delta)
            return adversarial + (pixels - pixels.detach())

        best_images, delta = parametric_ascent(
            self, model, labels, start,
            project=lambda delta: self._project(images, delta, transform), render=render)
        return best_images, {
            "coefficients": delta,
            "coefficient_linf": delta.flatten(1).abs().amax(dim=1),
        }
