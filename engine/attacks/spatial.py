"""StAdv: spatially transformed adversarial examples (Xiao et al. 2018), as bounded by PAT.

The adversarial image samples the natural image at displaced positions: pixel ``p`` takes the
bilinearly interpolated colour at ``p + f(p)`` for a per-pixel flow field ``f`` (``[N, 2, H,
W]``). Xiao et al. minimise ``L_adv + τ · L_flow`` with L-BFGS and no hard bound; PAT
(Laidlaw et al. 2021, through the ``recoloradv``/mister_ed ``FullSpatial`` transform) bounds
the flow in L∞ and keeps the smoothness loss as a penalty. This module follows PAT.

Units of ``bound`` (PAT table 4: 0.025 / 0.05 / 0.1; CIFAR-10 evaluation 0.05): the flow is in
the normalised coordinates of :func:`torch.nn.functional.grid_sample` with
``align_corners=True``, where the image spans ``[-1, 1]`` from the centre of its first pixel to
the centre of its last, as in mister_ed (which builds the identity grid with ``affine_grid``).
A flow of ``b`` moves a sample point by ``b · (W − 1) / 2`` pixels horizontally and
``b · (H − 1) / 2`` vertically: PAT's medium bound 0.05 is ≈ 5.6 pixels on a 224-pixel image,
≈ 0.8 pixels on CIFAR's 32, and 0.375 pixels on the 16-pixel test digits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
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

#: Added under the square root of the smoothness terms (as in mister_ed), so the gradient
#: at a locally constant flow is 0 rather than undefined.
SMOOTHNESS_EPS = 1e-10


def identity_grid(images: Tensor) -> Tensor:
    """``[N, H, W, 2]`` sampling grid (x, y) that maps ``images`` onto themselves under
    ``grid_sample(..., align_corners=True)``; ``x`` runs ``-1 → 1`` over the columns."""
    n, _, height, width = images.shape
    ys = torch.linspace(-1, 1, height, dtype=images.dtype, device=images.device)
    xs = torch.linspace(-1, 1, width, dtype=images.dtype, device=images.device)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x, grid_y], dim=-1).expand(n, height, width, 2)


def _sample(images: Tensor, flow: Tensor) -> Tensor:
    grid = identity_grid(images) + flow.permute(0, 2, 3, 1)
    # "border" = mister_ed's clipping of the grid to [-1, 1]: points pushed past the edge
    # take the edge pixel's colour.
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border",
                         align_corners=True)


def apply_flow(images: Tensor, flow: Tensor) -> Tensor:
    """Warp ``images`` (``[N, C, H, W]``) by ``flow`` (``[N, 2, H, W]``; channel 0 horizontal,
    channel 1 vertical; normalised units, see the module docstring) with bilinear sampling.

    Computed as ``images + (warp(flow) − warp(0))``: ``grid_sample``'s float32 coordinate
    round-off moves pixels by ~1e-6 even for a zero flow, and this way a zero flow returns
    the images exactly. Differentiable in both arguments; the result is clamped to ``[0, 1]``
    (it is a convex combination of pixels, so only round-off is clamped).
    """
    with torch.autocast(device_type=images.device.type, enabled=False):
        dtype = torch.float32 if images.dtype in (torch.float16, torch.bfloat16) else images.dtype
        source, flow = images.to(dtype), flow.to(dtype)
        # ``still`` ≈ ``source``: both keep their gradient so d(result)/d(images) is the warp's
        still = _sample(source, torch.zeros_like(flow))
        warped = source + (_sample(source, flow) - still)
        return warped.clamp(0, 1).to(images.dtype)


def flow_smoothness(flow: Tensor) -> Tensor:
    """Xiao et al.'s ``L_flow`` per image (``[N]``): for every pixel and each of its 4
    neighbours, ``sqrt(‖f(p) − f(q)‖² + ε)``, summed (each adjacent pair counts twice, as in
    mister_ed's ``stAdv_norm``; neighbours beyond the border are the pixel itself)."""
    total = flow.new_zeros(flow.shape[0])
    for dim in (2, 3):
        difference = flow.diff(dim=dim)
        terms = (difference.pow(2).sum(dim=1) + SMOOTHNESS_EPS).sqrt()
        total = total + 2 * terms.flatten(1).sum(dim=1)
    return total


@register_attack(
    "stadv",
    "StAdv (Xiao et al. 2018, bounded as in PAT): per-pixel flow, |flow|_∞ <= bound in"
    " grid units ([-1, 1] spans the image)",
)
@dataclass(frozen=True, kw_only=True)
class StAdv(ParametricAttack):
    """StAdv PGD: sign steps on a per-pixel flow field, clipped to ``[-bound, bound]``.

    ``bound`` is the L∞ bound on the flow in ``grid_sample`` units (``[-1, 1]`` spans the
    image, ``align_corners=True``; PAT table 4: 0.025 / 0.05 / 0.1). The ascent objective is
    the loss minus ``smoothness / bound · L_flow`` (:func:`flow_smoothness`; PAT's weight on
    the stAdv flow norm is ``0.0025 / bound``, so ``smoothness`` defaults to 0.0025 and the
    penalty does not change scale with the bound). ``loss`` defaults to ``margin`` (PAT's
    Carlini-Wagner loss). The flow starts at zero (default, as PAT) or uniform in
    ``[-bound, bound]`` (``random_start=true``: a per-pixel random flow is a visible jitter,
    e.g. SSIM 0.83 instead of 0.96 on 64-pixel photos at bound 0.05, so it is off by
    default for perceptual work); each of ``num_iterations`` steps adds ``step_size ·
    sign(∇)`` and clips. Default ``step_size`` is ``2.5 · bound / num_iterations``. Returns
    per image the iterate with the highest success margin.

    ``optimizer=adam`` takes PAT's Adam steps instead (default ``step_size`` = PAT's lr 0.01;
    ``iterations=pat`` for its iteration count). Differences from PAT: the default is sign
    steps, and mister_ed pads the grid with zeros (here: the border colour, which is what its
    clipping of the grid to ``[-1, 1]`` amounts to). With sign steps the penalty only decides
    a flow value's direction where its gradient outweighs the loss's, i.e. mostly in flat
    image regions (on digits it halved ``L_flow``; on textured photos with an untrained
    classifier ``smoothness`` 0.0025 and 0.05 gave the same flows).

    The bound is on the flow, which cannot be recovered from the images, so
    :meth:`perturbation_size` returns None; :meth:`perturb_with_extras` returns the flow
    and its L∞ size.
    """

    random_start: bool = param(
        False, kind="bool", doc="start from a random flow in the bound (PAT: false, zero)"
    )
    loss: str = param("margin", kind="choice", choices=LOSSES,
                      doc="loss: ce or margin (PAT: margin)")
    smoothness: float = param(
        0.0025, kind="float", minimum=0.0,
        doc="weight of the flow smoothness penalty, times 1/bound (PAT: 0.0025)",
    )

    optimizer: str = param("sign", kind="choice", choices=OPTIMIZERS,
                           doc="sign (sign-gradient PGD) or adam (PAT: Adam, lr 0.01)")

    #: PAT's Adam learning rate for StAdv (flow in grid units).
    ADAM_LR = 0.01

    size_extra: ClassVar[str | None] = "flow_linf"

    def default_step_size(self) -> float:
        """``2.5·bound / num_iterations`` for sign steps; PAT's lr 0.01 for Adam."""
        return self.ADAM_LR if self.optimizer == "adam" else super().default_step_size()

    def scale_perturbation(self, natural: Tensor, adversarial: Tensor,
                           extras: dict[str, Tensor], scale: Tensor
                           ) -> tuple[Tensor, Tensor | None]:
        """The flow (``extras["flow"]``) scaled by ``scale`` (``[N]``) and applied to
        ``natural``; its size ``scale·flow_linf`` in bound units (the L∞ norm is homogeneous)."""
        view = scale.to(extras["flow"].dtype).view(-1, *([1] * (extras["flow"].dim() - 1)))
        images = apply_flow(natural, extras["flow"] * view)
        return images, scale.to(extras["flow_linf"].dtype) * extras["flow_linf"]

    def perturb_with_extras(self, model: Model, images: Tensor, labels: Tensor,
                            generator: torch.Generator | None
                            ) -> tuple[Tensor, dict[str, Tensor]]:
        """:meth:`perturb` (same contract), plus ``{"flow": [N, 2, H, W], "flow_linf": [N],
        "flow_smoothness": [N]}`` of the returned images (flow in bound units)."""
        n, _, height, width = images.shape
        shape = (n, 2, height, width)
        if self.random_start:
            flow = (2 * noise_uniform(shape, generator, images) - 1) * self.bound
        else:
            flow = images.new_zeros(shape)
        weight = self.smoothness / self.bound

        def project(flow: Tensor) -> tuple[Tensor, Tensor]:
            flow = flow.clamp(-self.bound, self.bound)
            with torch.no_grad():
                return apply_flow(images, flow), flow

        best_images, flow = parametric_ascent(
            self, model, labels, flow, project=project,
            render=lambda flow, _: apply_flow(images, flow),
            penalty=lambda flow: weight * flow_smoothness(flow), optimizer=self.optimizer)
        return best_images, {
            "flow": flow,
            "flow_linf": flow.flatten(1).abs().amax(dim=1),
            "flow_smoothness": flow_smoothness(flow),
        }
