"""ReColorAdv: functional adversarial recolouring (Laidlaw & Feizi 2019), as used by PAT.

The adversarial image applies one smooth function of colour to every pixel: a colour ``c`` of
the natural image becomes ``c + g(c)``, where ``g`` is trilinearly interpolated from a lattice
of perturbation vectors (one per lattice point, per image). Neighbouring pixels of the same
colour change the same way, so the recolouring looks like a global colour grade, not noise.

Colour space and units (as PAT's ``ReColorAdvAttack`` and the ``recoloradv`` package): CIE
L*u*v* (sRGB, D65; conversions by kornia), normalised to ``(L / 100, (u + 100) / 200,
(v + 100) / 200)`` so the sRGB gamut lies roughly in ``[0, 1]³`` (saturated reds reach
u ≈ 1.4, blues v ≈ −0.2; colours outside the lattice use its nearest face). The lattice
has ``16 × 32 × 32`` points over L, u, v by default (PAT's resolution). ``bound`` is the L∞
bound on every lattice perturbation in these normalised units (PAT table 4: 0.03 / 0.06 /
0.12; CIFAR-10 evaluation 0.06): 0.06 lets lightness move by up to 6 L* units and u*, v* by
up to 12.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from kornia.color import luv_to_rgb, rgb_to_luv
from torch import Tensor

from .base import (
    LOSSES,
    OPTIMIZERS,
    Model,
    ParametricAttack,
    noise_uniform,
    param,
    parametric_ascent,
)
from .registry import register_attack

#: Added under the square root of the smoothness terms, as in ``recoloradv.norms``.
SMOOTHNESS_EPS = 1e-10

#: Slack around the sRGB primaries' chromaticity box in :func:`normalized_luv_to_rgb`.
CHROMATICITY_MARGIN = 0.01

# CIE 1976 (u', v') of the D65 white (kornia's reference white) and the bounding box of the
# sRGB primaries R (0.4507, 0.5229), G (0.1250, 0.5625), B (0.1754, 0.1579).
_WHITE_U_PRIME = 4 * 0.95047 / (0.95047 + 15 + 3 * 1.08883)
_WHITE_V_PRIME = 9 / (0.95047 + 15 + 3 * 1.08883)
_U_PRIME = (0.1250 - CHROMATICITY_MARGIN, 0.4507 + CHROMATICITY_MARGIN)
_V_PRIME = (0.1579 - CHROMATICITY_MARGIN, 0.5625 + CHROMATICITY_MARGIN)


def _working_dtype(x: Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def rgb_to_normalized_luv(images: Tensor) -> Tensor:
    """sRGB ``[N, 3, H, W]`` in ``[0, 1]`` → normalised CIELUV ``(L/100, (u+100)/200,
    (v+100)/200)``."""
    luv = rgb_to_luv(images)
    return torch.stack([luv[:, 0] / 100, (luv[:, 1] + 100) / 200, (luv[:, 2] + 100) / 200], 1)


def normalized_luv_to_rgb(colors: Tensor) -> Tensor:
    """Inverse of :func:`rgb_to_normalized_luv` for every colour an sRGB image can have.

    Other colours are first brought to ``0 <= L* <= 100`` and to a chromaticity ``(u', v')``
    inside the bounding box of the sRGB primaries (plus :data:`CHROMATICITY_MARGIN`), i.e.
    ``13 L* (u'_min − u'_n) <= u* <= 13 L* (u'_max − u'_n)`` and likewise for ``v*``. Without
    this, a fixed change of ``u*``/``v*`` near black (``L* → 0``) means an unbounded change
    of chromaticity (an attack at bound 0.06 turned black pixels magenta). The result is
    not clamped: out-of-gamut colours still give sRGB values outside ``[0, 1]``.
    """
    lightness = (colors[:, 0] * 100).clamp(0, 100)
    u_range = 13 * lightness * (_U_PRIME[0] - _WHITE_U_PRIME), 13 * lightness * (
        _U_PRIME[1] - _WHITE_U_PRIME)
    v_range = 13 * lightness * (_V_PRIME[0] - _WHITE_V_PRIME), 13 * lightness * (
        _V_PRIME[1] - _WHITE_V_PRIME)
    u = torch.minimum(torch.maximum(colors[:, 1] * 200 - 100, u_range[0]), u_range[1])
    v = torch.minimum(torch.maximum(colors[:, 2] * 200 - 100, v_range[0]), v_range[1])
    return luv_to_rgb(torch.stack([lightness, u, v], 1))


def lattice_offsets(colors: Tensor, lattice: Tensor) -> Tensor:
    """Trilinear interpolation of ``lattice`` (``[N, 3, X, Y, Z]``: a 3-vector per point of a
    regular grid over ``[0, 1]³`` in (L, u, v) order) at every pixel's normalised colour
    ``colors`` (``[N, 3, H, W]``) → ``[N, 3, H, W]``. Colours outside ``[0, 1]³`` take the
    value at the nearest face (as recoloradv clamps lattice indices)."""
    # grid_sample's 3-D grid is (x, y, z) = (last, middle, first) lattice axis = (v, u, L).
    grid = torch.stack([colors[:, 2], colors[:, 1], colors[:, 0]], dim=-1) * 2 - 1
    offsets = F.grid_sample(lattice, grid[:, None], mode="bilinear", padding_mode="border",
                            align_corners=True)
    return offsets[:, :, 0]


def apply_color_lattice(images: Tensor, lattice: Tensor) -> Tensor:
    """Recolour ``images`` (``[N, 3, H, W]`` sRGB in ``[0, 1]``): each pixel's normalised
    CIELUV colour ``c`` becomes ``c + g(c)`` with ``g`` interpolated from ``lattice``
    (``[N, 3, X, Y, Z]``, normalised units) by :func:`lattice_offsets`.

    Computed as ``images + (rgb(c + g(c)) − rgb(c))`` and clamped to ``[0, 1]``: kornia's
    float32 LUV round trip is off by up to ~1.5e-5, and this way a zero lattice returns the
    images exactly. Differentiable in both arguments.
    """
    with torch.autocast(device_type=images.device.type, enabled=False):
        dtype = _working_dtype(images)
        source, lattice = images.to(dtype), lattice.to(dtype)
        colors = rgb_to_normalized_luv(source)
        recolored = normalized_luv_to_rgb(colors + lattice_offsets(colors, lattice))
        result = source + (recolored - normalized_luv_to_rgb(colors))
        return result.clamp(0, 1).to(images.dtype)


class _LatticeSmoothness(torch.autograd.Function):
    """The smoothness norm with a hand-written backward: autograd's version of the same
    slices and differences allocated ~30 lattice-sized buffers per call and took 3/4 of
    ReColorAdv's time at PAT's 16×32×32 resolution (CPU)."""

    @staticmethod
    def forward(ctx, lattice: Tensor) -> Tensor:
        total = lattice.new_zeros(lattice.shape[0])
        for dim in (2, 3, 4):
            norms = (lattice.diff(dim=dim).pow(2).sum(dim=1) + SMOOTHNESS_EPS).sqrt()
            total += 2 * norms.flatten(1).sum(dim=1)
        ctx.save_for_backward(lattice)
        return total

    @staticmethod
    def backward(ctx, grad_total: Tensor) -> Tensor:
        (lattice,) = ctx.saved_tensors
        grad = torch.zeros_like(lattice)
        for dim in (2, 3, 4):
            difference = lattice.diff(dim=dim)
            difference /= (difference.pow(2).sum(dim=1, keepdim=True) + SMOOTHNESS_EPS).sqrt()
            length = lattice.shape[dim]
            grad.narrow(dim, 1, length - 1).add_(difference, alpha=2)
            grad.narrow(dim, 0, length - 1).sub_(difference, alpha=2)
        return grad * grad_total.view(-1, 1, 1, 1, 1)


def lattice_smoothness(lattice: Tensor) -> Tensor:
    """Smoothness norm per image (``[N]``) of a lattice ``[N, 3, X, Y, Z]``: for every lattice
    point and each neighbour along the three axes, ``sqrt(‖g(p) − g(q)‖² + ε)``, summed (each
    adjacent pair counts twice, as ``recoloradv.norms.smoothness``). Differentiable."""
    return _LatticeSmoothness.apply(lattice)


@register_attack(
    "recoloradv",
    "ReColorAdv (Laidlaw & Feizi 2019): smooth CIELUV colour-lattice function, |lattice|_∞"
    " <= bound in normalised LUV units",
)
@dataclass(frozen=True, kw_only=True)
class ReColorAdv(ParametricAttack):
    """ReColorAdv PGD: sign steps on a per-image CIELUV colour lattice, clipped to the bound.

    ``bound`` is the L∞ bound on each lattice perturbation in normalised CIELUV units
    (``L/100``, ``(u+100)/200``, ``(v+100)/200``; PAT table 4: 0.03 / 0.06 / 0.12). The
    lattice has ``resolution_x × resolution_y × resolution_z`` points over (L, u, v),
    ``16 × 32 × 32`` by default (PAT's). The ascent objective is the loss minus
    ``smoothness / bound · lattice_smoothness`` (PAT weighs the recoloradv smoothness norm by
    ``0.0036 / bound``, hence the default 0.0036). ``loss`` defaults to ``margin`` (PAT's
    Carlini-Wagner loss). The lattice starts at zero (default, as PAT) or uniform in
    ``[-bound, bound]`` (``random_start=true``); each of ``num_iterations`` steps adds
    ``step_size · sign(∇)`` and clips. Default ``step_size`` is ``2.5 · bound /
    num_iterations``. Returns per image the iterate with the highest success margin.

    ``optimizer=adam`` takes PAT's Adam steps instead (default ``step_size`` = PAT's lr
    0.001). Differences from PAT/recoloradv: the default is sign steps; recoloradv
    interpolates the *absolute* lattice colours and clips lattice points into ``[0, 1]``
    and the sRGB gamut, here the lattice holds offsets (so a zero lattice is exactly the
    identity even for colours outside ``[0, 1]³``) and the final sRGB image is clamped to
    ``[0, 1]`` instead.

    The bound is on the colour function, which cannot be recovered from the images, so
    :meth:`perturbation_size` returns None; :meth:`perturb_with_extras` returns the lattice
    and its L∞ size.
    """

    random_start: bool = param(
        False, kind="bool", doc="start from a random lattice in the bound (PAT: false, zero)"
    )
    loss: str = param("margin", kind="choice", choices=LOSSES,
                      doc="loss: ce or margin (PAT: margin)")
    smoothness: float = param(
        0.0036, kind="float", minimum=0.0,
        doc="weight of the lattice smoothness penalty, times 1/bound (PAT: 0.0036)",
    )
    resolution_x: int = param(16, kind="int", minimum=2, doc="lattice points along L* (>= 2)")
    resolution_y: int = param(32, kind="int", minimum=2, doc="lattice points along u* (>= 2)")
    resolution_z: int = param(32, kind="int", minimum=2, doc="lattice points along v* (>= 2)")

    optimizer: str = param("sign", kind="choice", choices=OPTIMIZERS,
                           doc="sign (sign-gradient PGD) or adam (PAT: Adam, lr 0.001)")

    #: PAT's Adam learning rate for ReColorAdv (lattice in normalised LUV units).
    ADAM_LR = 0.001

    size_extra: ClassVar[str | None] = "lattice_linf"

    def default_step_size(self) -> float:
        """``2.5·bound / num_iterations`` for sign steps; PAT's lr 0.001 for Adam."""
        return self.ADAM_LR if self.optimizer == "adam" else super().default_step_size()

    def scale_perturbation(self, natural: Tensor, adversarial: Tensor,
                           extras: dict[str, Tensor], scale: Tensor
                           ) -> tuple[Tensor, Tensor | None]:
        """The colour lattice (``extras["lattice"]``) scaled by ``scale`` (``[N]``) and applied to
        ``natural``; its size ``scale·lattice_linf`` in bound units (the L∞ norm is homogeneous)."""
        view = scale.to(extras["lattice"].dtype).view(-1, *([1] * (extras["lattice"].dim() - 1)))
        images = apply_color_lattice(natural, extras["lattice"] * view)
        return images, scale.to(extras["lattice_linf"].dtype) * extras["lattice_linf"]

    def perturb_with_extras(self, model: Model, images: Tensor, labels: Tensor,
                            generator: torch.Generator | None
                            ) -> tuple[Tensor, dict[str, Tensor]]:
        """:meth:`perturb` (same contract), plus ``{"lattice": [N, 3, X, Y, Z],
        "lattice_linf": [N], "lattice_smoothness": [N]}`` of the returned images (lattice in
        bound units)."""
        shape = (images.shape[0], 3, self.resolution_x, self.resolution_y, self.resolution_z)
        if self.random_start:
            lattice = (2 * noise_uniform(shape, generator, images) - 1) * self.bound
        else:
            lattice = images.new_zeros(shape)
        weight = self.smoothness / self.bound

        def project(lattice: Tensor) -> tuple[Tensor, Tensor]:
            lattice = lattice.clamp(-self.bound, self.bound)
            with torch.no_grad():
                return apply_color_lattice(images, lattice), lattice

        best_images, lattice = parametric_ascent(
            self, model, labels, lattice, project=project,
            render=lambda lattice, _: apply_color_lattice(images, lattice),
            penalty=lambda lattice: weight * lattice_smoothness(lattice),
            optimizer=self.optimizer)
        return best_images, {
            "lattice": lattice,
            "lattice_linf": lattice.flatten(1).abs().amax(dim=1),
            "lattice_smoothness": lattice_smoothness(lattice),
        }
