"""The neural perceptual threat model: PPGD, LPA, Fast-LPA (PAT) and OA-AT's LPIPS attack.

Laidlaw, Singla & Feizi, "Perceptual Adversarial Robustness" (ICLR 2021), section 4 and
appendix A, bound an attack by the LPIPS distance ``d(x, x̃) = ‖φ(x) − φ(x̃)‖₂`` (PAT's
definition: channel-normalised activations of a few layers, each divided by ``sqrt(H_l·W_l)``;
no learned linear calibration, see :class:`engine.distances.LPIPS`). ``bound`` is in those
units — a unitless LPIPS distance, not pixels. The network ``φ`` is chosen by ``lpips_model``:

- ``self`` (self-bounded): the attacked classifier itself, at the layers ``lpips_layers``
  (``+``-separated dotted module names such as ``network.1+network.4``; ``standard`` picks the
  usual LPIPS layers of an :class:`~engine.models.ImageClassifier` wrapping a torchvision
  AlexNet, VGG or ResNet). One forward pass gives the logits and the features.
- a network spec (externally bounded): ``alexnet``, ``alexnet:untrained``, ``vgg16``,
  ``resnet50:untrained``, ... built by :func:`engine.distances.build_lpips` on first use,
  cached on the attack instance and moved to the images' device/dtype. Untrained networks are
  initialised from seed 0, so ``alexnet:untrained`` is the same network in every process.

Attacks (PAT names and defaults; the margin loss of Carlini & Wagner, clamped at ``kappa`` as
in the authors' code):

- ``ppgd`` (appendix A.1): first-order steps ``δ = η (JᵀJ)⁻¹∇f / ‖(J⁺)ᵀ∇f‖`` with ``J`` the
  Jacobian of ``φ``, solved by ``cg_iterations`` conjugate-gradient steps on ``JᵀJ δ = ∇f``,
  each projected back onto the LPIPS ball (``projection``: ``newton``, Algorithm 4, or
  ``bisection``, Algorithm 5).
- ``lpa`` (A.2): normalised gradient ascent on ``L − λ·max(0, d − ε)`` with a per-image search
  over ``λ ∈ {10⁻², …, 10^(num_lambdas−3)}``, steps measured in LPIPS by the exact slope
  ``‖J u‖``, and a final projection: every output is within the bound.
- ``fast_lpa`` (A.3): one pass with ``λ`` rising geometrically from ``lam/10`` to ``lam`` and
  no projection — outputs MAY lie outside the bound (made for training, not evaluation).
- ``lpips_oa`` (OA-AT, Addepalli et al., section 4): L∞ PGD on cross-entropy minus
  ``lam·LPIPS(x, x̃)`` — its ``bound`` is an L∞ radius in ``[0, 1]`` pixel units.

Cost per iteration, in passes of the classifier (self-bounded; externally bounded adds the
LPIPS network's passes): Fast-LPA and LPA 1F + 1B + one tangent pass (≈ 1F) for the exact
slope (the PGD loop is 1F + 1B; externally bounded, the LPIPS network's backward is skipped
while every image is inside the ball, its penalty being zero); PPGD 1F + 1B, then per CG step
one tangent pass and one backward (CG skipped for images whose gradient is zero), plus the
slope's tangent pass and the projection (bisection: 10 F; Newton: 1F + 1B per step, usually
1–3 steps, on the images outside the ball only); lpips_oa 1F + 1B. The tangent pass
(:meth:`engine.distances.LPIPS.feature_tangents`) re-runs the network's linear part on the
direction with the ReLU masks and max-pool indices recorded by the iteration's forward pass;
where a network has a layer without a tangent rule, autograd is used instead (forward-mode
JVP ≈ 2.5–4F for slopes, double backward for CG products) and a warning says so.

Precision: the LPIPS features, every Jacobian product and the projections run under
:func:`engine.distances.exact_precision` (autocast and TF32 off), so reduced precision only
affects the classifier's own gradient (self-bounded: the classifier is the LPIPS network and
runs in full precision). The natural images' features cost one extra forward pass per call.

Written here rather than taken from ``perceptual-advex``: we need the shared
:class:`~engine.attacks.base.Attack` protocol, lazy per-instance LPIPS networks (no global
cache, no download in a constructor), gradients w.r.t. the input only (the reference code
back-propagates into every weight), and a bisection that returns a point it verified.
"""

from __future__ import annotations

import copy
import math
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from ..distances import (
    LPIPS,
    Linearization,
    build_lpips,
    exact_precision,
    flatten_features,
    lpips_layers,
)
from ..errors import EngineError
from ..models import KNOWN_ARCHITECTURES, ImageClassifier, parse_network
from .base import (
    KNOWN_LOGITS,
    KNOWN_SIZE,
    LOSSES,
    Attack,
    BestIterate,
    Model,
    ParamInfo,
    eval_mode,
    noise_normal,
    noise_uniform,
    param,
    per_image_norm,
)
from .registry import register_attack

#: ``lpips_model`` value for a self-bounded attack (the classifier defines LPIPS).
SELF = "self"
#: ``lpips_layers`` value meaning "the standard LPIPS layers of a known architecture".
STANDARD_LAYERS = "standard"
#: ``projection`` choices (PAT appendix A.4).
PROJECTIONS = ("newton", "bisection")
#: Bisection steps (PAT uses n = 10) and the most Newton steps before falling back to it.
BISECTION_STEPS = 10
NEWTON_MAX_STEPS = 10
#: Newton's overshoot ``s`` as a fraction of the bound: PAT's s = 0.01 at its bound 0.5.
NEWTON_OVERSHOOT = 0.02
#: Standard deviation of PAT's random start ``x + 0.01·N(0, 1)``.
START_NOISE = 0.01
#: Relative slack when deciding that an iterate is inside the ball (float rounding only).
FEASIBLE_SLACK = 1e-6
_TINY = 1e-12
_SEED_FOR_UNTRAINED = 0
#: PPGD skips conjugate gradient for images whose gradient is exactly zero (their step is 0
#: anyway); with at least this share of such images the others are re-run alone (one forward
#: pass on them) so that CG's passes cover them only. ``CG_SKIP_ZERO_GRADIENT = False`` turns
#: the skipping off (tests compare both).
CG_SKIP_SHARE = 0.125
CG_SKIP_ZERO_GRADIENT = True
#: LPIPS slopes and PPGD's ``Jv`` products by the hand-written tangent pass
#: (:meth:`engine.distances.LPIPS.feature_tangents`); ``False`` uses autograd instead
#: (forward-mode slopes, double-backward products): the oracle the tests compare with.
EXACT_TANGENT_PASS = True


# --------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _LpipsModelInfo(ParamInfo):
    """``lpips_model``: ``self`` or a network spec, which may contain ``:`` (``alexnet:untrained``).

    Checked at construction so that an unknown network fails before any work; stored in the
    canonical form ``arch:pretrained`` / ``arch:untrained``.
    """

    def check(self, name: str, value: Any) -> Any:
        if not isinstance(value, str) or not value.strip():
            raise EngineError(
                f"{name} must be 'self' or a network spec like 'alexnet', got {value!r}"
            )
        text = value.strip()
        if text.lower() == SELF:
            return SELF
        try:
            return str(parse_network(text))
        except EngineError as exc:
            raise EngineError(
                f"unknown LPIPS model {value!r} ({exc}); use 'self' (self-bounded) or one of:"
                f" {', '.join(KNOWN_ARCHITECTURES)} (optionally ':untrained')"
            ) from None


def lpips_model_param(doc: str = "LPIPS network: self (the attacked classifier) or a network"
                      " spec like alexnet, alexnet:untrained") -> Any:
    return field(default=SELF, metadata={"param": _LpipsModelInfo(kind="str", doc=doc)})


# --------------------------------------------------------------------------------------------
# The LPIPS ball of one call
# --------------------------------------------------------------------------------------------


class LpipsBall:
    """The LPIPS threat model around one batch of natural images, for the duration of a call.

    Holds the classifier, the LPIPS network and the natural images' flattened features
    ``φ(x)`` ``[N, M]`` (computed once). Inputs are not range-checked (attack loops keep them
    valid; finite-difference points may sit a hair outside ``[0, 1]``).
    """

    def __init__(self, model: Model, lpips: LPIPS, natural: Tensor, *, self_bounded: bool,
                 natural_features: Tensor | None = None):
        self.model = model
        self.lpips = lpips
        self.self_bounded = self_bounded
        if natural_features is not None:  # already computed (e.g. with the clean logits)
            self.natural = natural_features.detach()
        else:
            with torch.no_grad():
                self.natural = self.features(natural)

    def features(self, x: Tensor) -> Tensor:
        """PAT's flattened ``φ(x)`` ``[N, M]`` (differentiable unless under ``no_grad``), in
        ``x``'s precision whatever autocast/TF32 say (:func:`exact_precision`)."""
        with exact_precision():
            return flatten_features(self.lpips.features(x, check=False))

    def logits_and_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Classifier logits and ``φ(x)``: one forward pass when self-bounded (then the
        classifier runs in full precision too, since it *is* the LPIPS network); externally
        bounded, the classifier runs under the caller's autocast and ``φ`` in full precision."""
        if self.self_bounded:
            with exact_precision():
                logits, features = self.lpips.logits_and_features(x, check=False)
                return logits, flatten_features(features)
        return self.model(x), self.features(x)

    def logits_features_linearization(self, x: Tensor
                                      ) -> tuple[Tensor, Tensor, Linearization]:
        """:meth:`logits_and_features` from a pass that also records its activation patterns
        (ReLU masks, max-pool inputs; references, no copies), so that :meth:`slope` and
        :meth:`tangent` at ``x`` cost one linear pass instead of forward-mode AD."""
        if self.self_bounded:
            with exact_precision():
                logits, features, record = self.lpips.features_recorded(x, logits=True)
                return logits, flatten_features(features), record
        logits = self.model(x)
        with exact_precision():
            _, features, record = self.lpips.features_recorded(x)
        return logits, flatten_features(features), record

    def tangent(self, v: Tensor, linearization: Linearization | None, x: Tensor | None = None
                ) -> Tensor:
        """Exact ``J v`` ``[N, M]`` (``J`` the Jacobian of :meth:`features`) at the point where
        ``linearization`` was recorded, by :meth:`LPIPS.feature_tangents` (about one forward
        pass). Without a usable linearization (None, or a network with a module the tangent
        pass has no rule for: a warning names it once) it falls back to forward-mode AD at
        ``x`` (:func:`feature_jvp`, about 2.5 passes, equally exact)."""
        if not EXACT_TANGENT_PASS:
            linearization = None
        if linearization is not None and linearization.unsupported is None:
            with exact_precision():
                return flatten_features(self.lpips.feature_tangents(v.detach(), linearization))
        if x is None:
            raise EngineError("the tangent pass is unsupported here and no point x was given")
        if linearization is not None:
            _warn_fallback(linearization.unsupported)
        return feature_jvp(self.features, x, v)

    def slope(self, x: Tensor, direction: Tensor, linearization: Linearization | None
              ) -> Tensor:
        """``‖J u‖`` ``[N]`` at ``x`` (where ``linearization`` was recorded) along
        ``direction`` (see :meth:`tangent` and :func:`lpips_slope`)."""
        if EXACT_TANGENT_PASS and linearization is not None and linearization.unsupported is None:
            with exact_precision():  # ‖φ'‖ layer by layer: no concatenated copy
                tangents = self.lpips.feature_tangents(direction.detach(), linearization)
                squared = sum((t * t).flatten(1).sum(dim=1) / t[0, 0].numel() for t in tangents)
                return squared.sqrt()
        return torch.linalg.vector_norm(self.tangent(direction, linearization, x), dim=1)

    def subset(self, rows: Tensor) -> LpipsBall:
        """The ball around the natural images ``rows`` only (no forward pass)."""
        ball = copy.copy(self)
        ball.natural = self.natural[rows]
        return ball

    def distance(self, features: Tensor, index: Tensor | None = None) -> Tensor:
        """LPIPS ``[n]`` from the natural images (rows ``index``) to images with ``features``."""
        natural = self.natural if index is None else self.natural[index]
        return torch.linalg.vector_norm(features - natural, dim=1)


# --------------------------------------------------------------------------------------------
# Functional core
# --------------------------------------------------------------------------------------------


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-image inner product ``[N]`` of two ``[N, ...]`` tensors."""
    return (a * b).flatten(1).sum(dim=1)


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


_FALLBACK_WARNED: set[str] = set()


def _warn_fallback(reason: str) -> None:
    """Say once per reason that the exact tangent pass is unavailable and AD is used."""
    if reason not in _FALLBACK_WARNED:
        _FALLBACK_WARNED.add(reason)
        warnings.warn(
            f"LPIPS tangent pass unsupported ({reason}); LPIPS slopes and CG products fall"
            " back to autograd (forward-mode / double-backward: equally exact, ~2x slower)",
            RuntimeWarning, stacklevel=3)


def feature_jvp(feature_fn: Callable[[Tensor], Tensor], x: Tensor, v: Tensor) -> Tensor:
    """Exact ``J v`` ``[N, M]``: the derivative of ``φ = feature_fn`` at ``x`` along ``v``.

    Forward-mode AD (``torch.func.jvp``), in the inputs' precision with autocast and TF32 off
    (:func:`engine.distances.exact_precision`). One forward-mode pass, measured at 2.5–4
    inference passes on CPU (AlexNet, 64–96 px). The attacks use the tangent pass instead
    (:meth:`LpipsBall.tangent`); this is its oracle and fallback.
    """
    with exact_precision():
        _, product = torch.func.jvp(feature_fn, (x.detach(),), (v.detach(),))
    return product


def jtj_operator(features: Tensor, leaf: Tensor,
                 jv: Callable[[Tensor], Tensor] | None = None) -> Callable[[Tensor], Tensor]:
    """The exact Gauss–Newton product ``v ↦ JᵀJ v`` (``[N, 3, H, W]`` → same), ``J`` the
    Jacobian of ``features`` (``[N, M]``, with their graph) w.r.t. ``leaf``.

    ``Jv`` by ``jv`` when given (the attacks pass the tangent pass, :meth:`LpipsBall.tangent`,
    about one forward), else by the double-backward trick (``g(u) = Jᵀu`` built once with
    ``create_graph``; ``Jv = ∂⟨g(u), v⟩/∂u``, about one backward each plus the build: the AD
    path, kept as the oracle and the fallback); then ``Jᵀ(Jv)`` by a backward pass through the
    retained graph; everything under :func:`~engine.distances.exact_precision`. Per image
    (rows independent).
    """
    if jv is None:
        with exact_precision():
            dummy = torch.zeros_like(features, requires_grad=True)
            (transposed,) = torch.autograd.grad(features, leaf, grad_outputs=dummy,
                                                create_graph=True, retain_graph=True)

        def jv(v: Tensor) -> Tensor:
            (product,) = torch.autograd.grad(transposed, dummy, grad_outputs=v.detach(),
                                             retain_graph=True)
            return product

    def jtj(v: Tensor) -> Tensor:
        with exact_precision():
            forward = jv(v)
            (product,) = torch.autograd.grad(features, leaf, grad_outputs=forward.detach(),
                                             retain_graph=True)
        return product

    return jtj


def solve_jtj(features: Tensor, leaf: Tensor, rhs: Tensor, *, iterations: int,
              jv: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Approximately solve ``(JᵀJ) δ = rhs`` per image by conjugate gradient (PAT eq. 12).

    ``J`` is the Jacobian of the features at ``leaf`` (``[N, 3, H, W]``, requires grad);
    ``features`` ``[N, M]`` are ``φ(leaf)`` *with their autograd graph* (built under
    :func:`~engine.distances.exact_precision`). Each product ``JᵀJ v`` is exact: ``Jv`` by the
    double-backward trick (``g(u) = Jᵀu`` is built once with ``create_graph``, linear in
    ``u``, and ``Jv = ∂⟨g(u), v⟩/∂u`` is one backward pass through it), then ``Jᵀ(Jv)`` by one
    backward pass through the retained graph. Starts at ``δ = 0``; the right-hand side is
    scaled to unit norm inside (CG is linear in it). Returns ``δ`` like ``rhs``. ``jv``: an
    exact ``v ↦ Jv`` to use instead of double backward (see :func:`jtj_operator`).

    Costs measured on CPU (``bench/fast_lpa_floor.py``: PGD-AT digits AlexNet setting, LPIPS
    AlexNet, 8 images of 64 px, one thread), per ``Jv`` in LPIPS forward passes: the tangent
    pass ≈ 1.0, double backward ≈ 2.2 (plus the build of ``g`` once per solve),
    ``torch.func.jvp`` ≈ 4. All agree with a float64 reference to 5e-7; the finite difference
    the authors use (h = 1e-3) was 165× off under bf16 autocast.
    """
    scale = per_image_norm(rhs)
    rhs = (rhs / scale.clamp_min(_TINY)).detach()
    jtj = jtj_operator(features, leaf, jv)
    with exact_precision():
        delta = torch.zeros_like(rhs)
        residual = rhs
        direction = rhs
        rr = _dot(residual, residual)
        for k in range(iterations):
            product = jtj(direction)
            curvature = _dot(direction, product)
            alpha = torch.where(curvature > 0, rr / curvature.clamp_min(_TINY),
                                torch.zeros_like(rr))
            delta = delta + _bcast(alpha, delta) * direction
            if k == iterations - 1:
                break
            residual = residual - _bcast(alpha, delta) * product
            rr_next = _dot(residual, residual)
            beta = torch.where(rr > 0, rr_next / rr.clamp_min(_TINY), torch.zeros_like(rr))
            direction = residual + _bcast(beta, delta) * direction
            rr = rr_next
    return delta * scale


def lpips_slope(feature_fn: Callable[[Tensor], Tensor], x: Tensor, direction: Tensor) -> Tensor:
    """``‖J u‖`` ``[N]`` for unit directions ``u``: LPIPS per unit of L2 movement along
    ``direction`` at ``x`` (PAT's ``m``, here the exact derivative instead of the authors'
    finite difference), by one forward-mode pass (:func:`feature_jvp`)."""
    return torch.linalg.vector_norm(feature_jvp(feature_fn, x, direction), dim=1)


def lpips_step(feature_fn: Callable[[Tensor], Tensor], x: Tensor, direction: Tensor,
               size: Tensor | float, *, slope: Callable[[Tensor], Tensor] | None = None
               ) -> Tensor:
    """The move ``(size / m)·u`` that is ``size`` long in LPIPS to first order, ``u`` the
    direction scaled to unit L2 norm per image (zero where the direction or slope is zero).
    ``slope``: ``u ↦ ‖J u‖`` ``[N]`` (the attacks pass the tangent pass,
    :meth:`LpipsBall.slope`); default :func:`lpips_slope` of ``feature_fn`` (forward-mode AD)."""
    norm = per_image_norm(direction)
    unit = direction / norm.clamp_min(_TINY)
    if slope is None:
        slope = lpips_slope(feature_fn, x, unit).to(x.dtype)
    else:
        slope = slope(unit).to(x.dtype)
    size = torch.as_tensor(size, dtype=x.dtype, device=x.device).expand_as(slope)
    length = torch.where((slope > 0) & (norm.flatten() > 0), size / slope.clamp_min(_TINY),
                         torch.zeros_like(slope))
    return _bcast(length, x) * unit


@torch.no_grad()
@exact_precision()
def project_bisection(ball: LpipsBall, natural: Tensor, adversarial: Tensor, bound: float,
                      *, steps: int = BISECTION_STEPS, distance: Tensor | None = None) -> Tensor:
    """PAT Algorithm 5: per image outside the ball, bisect ``α`` on ``x + α(x̃ − x)``.

    Returns the largest ``α`` *verified* inside (the paper returns the last midpoint, which
    can lie outside), so every output is within ``bound``; images already inside are kept.
    ``steps`` inference passes on the images outside only. ``distance`` (``[N]``, optional)
    is the adversarial images' known LPIPS.
    """
    if distance is None:
        distance = ball.distance(ball.features(adversarial))
    outside = (distance > bound).nonzero().flatten()
    if outside.numel() == 0:
        return adversarial
    start, delta = natural[outside], adversarial[outside] - natural[outside]
    low = torch.zeros(outside.numel(), device=natural.device, dtype=natural.dtype)
    high = torch.ones_like(low)
    for _ in range(steps):
        middle = (low + high) / 2
        candidate = start + _bcast(middle, start) * delta
        inside = ball.distance(ball.features(candidate), outside) <= bound
        low = torch.where(inside, middle, low)
        high = torch.where(inside, high, middle)
    projected = adversarial.clone()
    projected[outside] = start + _bcast(low, start) * delta
    return projected


@exact_precision()
def project_newton(ball: LpipsBall, natural: Tensor, adversarial: Tensor, bound: float, *,
                   overshoot: float | None = None, max_steps: int = NEWTON_MAX_STEPS,
                   distance: Tensor | None = None) -> Tensor:
    """PAT Algorithm 4: generalised Newton–Raphson on ``r(x̃') = d(x̃', x) − ε``.

    Each step ``x̃' ← x̃' − ∇r⁺ (r + s)`` (``∇r⁺ = ∇r / ‖∇r‖²`` for a scalar ``r``), clamped to
    ``[0, 1]``, on the images still outside only (1F + 1B each). ``s`` (``overshoot``)
    defaults to ``NEWTON_OVERSHOOT·bound``. Images not inside after ``max_steps`` steps are
    projected by bisection from their original position, so every output is within ``bound``.
    """
    if distance is None:
        with torch.no_grad():
            distance = ball.distance(ball.features(adversarial))
    outside = (distance > bound).nonzero().flatten()
    if outside.numel() == 0:
        return adversarial
    overshoot = NEWTON_OVERSHOOT * bound if overshoot is None else overshoot
    current = adversarial[outside].clone()
    todo = torch.arange(outside.numel(), device=adversarial.device)
    for _ in range(max_steps):
        leaf = current[todo].requires_grad_(True)
        with torch.enable_grad():
            gap = ball.distance(ball.features(leaf), outside[todo]) - bound
            (grad,) = torch.autograd.grad(gap.sum(), leaf)
        still = gap.detach() > 0
        if not bool(still.any()):
            todo = todo[:0]
            break
        length = (gap.detach() + overshoot) / _dot(grad, grad).clamp_min(_TINY)
        moved = (leaf.detach() - _bcast(length, grad) * grad).clamp(0, 1)
        todo = todo[still]
        current[todo] = moved[still]
    if todo.numel():  # stepped but not yet verified
        with torch.no_grad():
            gap = ball.distance(ball.features(current[todo]), outside[todo]) - bound
        todo = todo[gap > 0]
    projected = adversarial.clone()
    projected[outside] = current
    if todo.numel():
        failed = outside[todo]
        projected[failed] = project_bisection(
            ball.subset(failed), natural[failed], adversarial[failed], bound,
            distance=torch.full((failed.numel(),), math.inf, device=adversarial.device),
        )
    return projected


# --------------------------------------------------------------------------------------------
# Shared base: LPIPS networks, caching, perturbation size
# --------------------------------------------------------------------------------------------


def _architecture_of(model: Any) -> str | None:
    """``alexnet`` / ``vgg*`` / ``resnet*`` for an ImageClassifier wrapping a torchvision net."""
    if not isinstance(model, ImageClassifier):
        return None
    if model.spec is not None:
        return model.spec.arch
    network = model.network
    if isinstance(network, torchvision.models.AlexNet):
        return "alexnet"
    if isinstance(network, torchvision.models.VGG):
        return "vgg"
    if isinstance(network, torchvision.models.ResNet):
        return "resnet"
    return None


def _build_external_lpips(spec: str) -> LPIPS:
    """Build an LPIPS backbone; untrained weights from a fixed seed, global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED_FOR_UNTRAINED)
        return build_lpips(spec)


@dataclass(frozen=True, kw_only=True)
class LpipsAttack(Attack):
    """Base of attacks that use an LPIPS network (not registered itself).

    ``lpips_model``: ``self`` or a network spec; ``lpips_layers``: ``standard`` or
    ``+``-separated module names of the classifier (self-bounded only).

    The external LPIPS network is built on first use and cached on the instance per
    device/dtype (``_networks``; not a parameter, not compared, not in the spec). A
    self-bounded LPIPS is a thin view of the classifier (:meth:`LPIPS.from_model`), made per
    call. :meth:`perturbation_size` needs the classifier for a self-bounded attack: pass it as
    ``model=``, or it uses the classifier of this instance's most recent call (held by a weak
    reference, so the attack never keeps a model alive).
    """

    lpips_model: str = lpips_model_param()
    lpips_layers: str = param(
        STANDARD_LAYERS, kind="str",
        doc="self-bounded LPIPS layers: standard, or '+'-separated module names"
            " (e.g. network.1+network.4)",
    )
    _networks: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lpips_layers != STANDARD_LAYERS:
            if self.lpips_model != SELF:
                raise EngineError(
                    f"lpips_layers applies to self-bounded attacks (lpips_model=self) only;"
                    f" {self.lpips_model} uses its standard LPIPS layers"
                )
            names = self.lpips_layers.split("+")
            if any(not name for name in names):
                raise EngineError(
                    f"lpips_layers {self.lpips_layers!r} has an empty name; write module names"
                    " joined by '+', e.g. network.1+network.4"
                )

    @property
    def self_bounded(self) -> bool:
        """True when the attacked classifier defines the LPIPS distance."""
        return self.lpips_model == SELF

    # -- LPIPS networks ----------------------------------------------------------------------

    def _self_layers(self, model: nn.Module) -> list[str]:
        if self.lpips_layers != STANDARD_LAYERS:
            return self.lpips_layers.split("+")
        arch = _architecture_of(model)
        if arch is None:
            raise EngineError(
                f"self-bounded LPIPS on a {type(model).__name__} needs lpips_layers: the"
                " standard layers are known only for an ImageClassifier wrapping a"
                " torchvision AlexNet, VGG or ResNet. Give '+'-separated module names, e.g."
                " lpips_layers=network.1+network.4"
            )
        layers = lpips_layers(arch, model.network)
        return [f"network.{name}" for name in layers]

    def lpips_network(self, like: Tensor, model: Model | None = None) -> LPIPS:
        """The LPIPS network bounding this attack, on ``like``'s device and dtype.

        Self-bounded: a view of ``model`` (default: the classifier of the latest call).
        """
        if self.self_bounded:
            if model is None:
                ref = self._networks.get("last_model")
                model = ref() if ref is not None else None
            if model is None:
                raise EngineError(
                    f"{self.name} is self-bounded (lpips_model=self): its LPIPS distance is"
                    " defined by the classifier; pass model=classifier or run the attack first"
                )
            if not isinstance(model, nn.Module):
                raise EngineError(
                    "a self-bounded perceptual attack needs an nn.Module classifier to read"
                    f" LPIPS features from, got {type(model).__name__}"
                )
            return LPIPS.from_model(model, self._self_layers(model))
        key = (like.device, like.dtype)
        network = self._networks.get(key)
        if network is None:
            built = self._networks.get("built")
            if built is None:
                built = self._networks["built"] = _build_external_lpips(self.lpips_model)
            reference = next(iter(built.parameters()))
            if (reference.device, reference.dtype) == key:
                network = built
            else:
                network = copy.deepcopy(built).to(device=like.device, dtype=like.dtype)
            self._networks[key] = network
        return network

    def lpips_distance(self, natural: Tensor, other: Tensor, model: Model | None = None
                       ) -> Tensor:
        """LPIPS ``[N]`` between image batches in this attack's LPIPS network (no gradients;
        a self-bounded classifier runs in eval mode)."""
        lpips = self.lpips_network(natural, model)
        with torch.no_grad(), eval_mode(lpips.network if self.self_bounded else None):
            return lpips(natural, other)

    def perturbation_size(self, natural: Tensor, other: Tensor, model: Model | None = None
                          ) -> Tensor:
        """LPIPS distance ``[N]`` from ``natural`` to ``other`` — the units of ``bound``."""
        return self.lpips_distance(natural, other, model)

    def __getstate__(self) -> dict:
        """Pickle and deep-copy without the cached networks (rebuilt on first use)."""
        state = dict(self.__dict__)
        state["_networks"] = {}
        return state

    # -- the call ------------------------------------------------------------------------

    def __call__(self, model: Model, images: Tensor, labels: Tensor, *,
                 generator: torch.Generator | None = None):
        try:
            self._networks["last_model"] = weakref.ref(model)
        except TypeError:  # a callable without weak references
            self._networks.pop("last_model", None)
        try:
            return super().__call__(model, images, labels, generator=generator)
        finally:  # never keep this call's clean pass (and so the model) alive
            self._networks.pop("natural", None)

    def clean_logits(self, model: Model, images: Tensor) -> Tensor:
        """Self-bounded: the logits and φ(natural) from one full-precision pass (φ kept for
        this call's ball); externally bounded: the classifier's logits."""
        if not self.self_bounded:
            return model(images)
        lpips = self.lpips_network(images, model)
        with exact_precision():
            logits, features = lpips.logits_and_features(images, check=False)
        self._networks["natural"] = (images, flatten_features(features), lpips)
        return logits

    def _ball(self, model: Model, images: Tensor) -> LpipsBall:
        known = self._networks.pop("natural", None)
        if known is not None and known[0] is images:  # this call's clean pass
            return LpipsBall(model, known[2], images, self_bounded=self.self_bounded,
                             natural_features=known[1])
        return LpipsBall(model, self.lpips_network(images, model), images,
                         self_bounded=self.self_bounded)

    def _known(self, ball: LpipsBall, adversarial: Tensor) -> dict[str, Tensor]:
        """The logits and LPIPS size of the returned images from one pass (self-bounded; the
        natural images' features are not recomputed), as :data:`KNOWN_LOGITS` /
        :data:`KNOWN_SIZE` extras."""
        with torch.no_grad():
            logits, features = ball.logits_and_features(adversarial)
        return {KNOWN_LOGITS: logits, KNOWN_SIZE: ball.distance(features).to(adversarial.dtype)}

    def _clamped_objective(self, logits: Tensor, labels: Tensor, kappa: float | None) -> Tensor:
        """:meth:`objective`, with the margin clamped at ``kappa`` (PAT's MarginLoss)."""
        value = self.objective(logits, labels)
        if kappa is not None and self.loss == "margin":
            value = value.clamp(max=kappa)
        return value

    def _start(self, images: Tensor, generator: torch.Generator | None) -> Tensor:
        """PAT's start ``x + 0.01·N(0, 1)`` clamped to ``[0, 1]``; ``x`` without random_start."""
        if not self.random_start:
            return images.clone()
        return (images + START_NOISE * noise_normal(images.shape, generator, images)).clamp(0, 1)


def _margin_param(default: float = 1.0) -> Any:
    return param(default, kind="float", minimum=0.0,
                 doc="clamp of the margin loss (PAT's kappa; 1 as in the authors' code)")


def _check_positive(name: str, value: float) -> None:
    if value <= 0:
        raise EngineError(f"{name} must be > 0, got {value!r}")


def _early_stop_param() -> Any:
    return param(True, kind="bool",
                 doc="stop attacking an image once an iterate inside the bound is"
                     " misclassified (verified in full precision); false: run every iteration")


def _projection_param() -> Any:
    return param("newton", kind="choice", choices=PROJECTIONS,
                 doc="projection onto the LPIPS ball: newton (PAT Alg. 4) or bisection (Alg. 5)")


# --------------------------------------------------------------------------------------------
# PPGD
# --------------------------------------------------------------------------------------------


@register_attack("ppgd", "Perceptual PGD (PAT A.1): LPIPS(x, x') <= bound, CG first-order steps")
@dataclass(frozen=True, kw_only=True)
class PerceptualPGD(LpipsAttack):
    """Perceptual PGD (PAT appendix A.1, Algorithm 1).

    Each of ``num_iterations`` steps solves ``JᵀJ δ = ∇f`` with ``cg_iterations`` conjugate
    gradient iterations (``J``: Jacobian of the LPIPS features at the iterate; exact
    products, see :func:`solve_jtj`), scales ``δ`` to LPIPS length ``step_size`` (measured
    by the exact slope ``‖Jδ‖``), clamps to ``[0, 1]`` and projects onto the LPIPS ball of
    radius ``bound`` (``projection``). Returns, per image, the iterate inside the ball with the
    highest success margin; with ``early_stop`` (default) an image stops at its first iterate
    inside the ball that is misclassified (verified in full precision), and that iterate is
    returned (``extras["finished_iteration"]``). Defaults as in the authors' code:
    ``step_size = 2·bound / num_iterations``, ``cg_iterations=5``, Newton projection, margin
    loss clamped at ``kappa=1``; start ``x + 0.01·N(0, 1)``.
    """

    loss: str = param("margin", kind="choice", choices=LOSSES,
                      doc="loss: margin (PAT, default) or ce")
    cg_iterations: int = param(5, kind="int", minimum=1,
                               doc="conjugate-gradient iterations per step (PAT's K)")
    projection: str = _projection_param()
    kappa: float = _margin_param()
    early_stop: bool = _early_stop_param()

    def default_step_size(self) -> float:
        """``2·bound / num_iterations`` (the authors' PPGD default, no decay)."""
        return 2 * self.bound / self.num_iterations

    def perturb_with_extras(self, model: Model, images: Tensor, labels: Tensor,
                            generator: torch.Generator | None) -> tuple[Tensor, dict[str, Tensor]]:
        ball = self._ball(model, images)
        project = project_newton if self.projection == "newton" else project_bisection
        adversarial = self._start(images, generator)
        best = BestIterate(images)
        tracker = _EarlyStop(self, model, images.shape[0], images.device)
        for iteration in range(self.num_iterations):
            rows = tracker.active
            sub = ball.subset(rows) if tracker.partial else ball
            x, y = adversarial[rows], labels[rows]
            leaf = x.detach().requires_grad_(True)
            logits, features, record = sub.logits_features_linearization(leaf)
            tracker.observe(best, sub, x, logits, features, y, iteration)
            if tracker.empty:
                break
            objective = self._clamped_objective(logits, y, self.kappa)
            (gradient,) = torch.autograd.grad(objective.sum(), leaf, retain_graph=True)
            delta = self._cg_direction(sub, x, leaf, features, record, gradient)
            step = lpips_step(sub.features, x, delta, self.step_size,
                              slope=lambda u, b=sub, r=record, z=x: b.slope(z, u, r))
            del leaf, logits, features, record  # free the graph before the projection
            keep = tracker.kept(rows)  # rows still active after this iteration's check
            moved = project(sub.subset(keep), images[rows][keep],
                            (x[keep] + step[keep]).clamp(0, 1), self.bound)
            adversarial = adversarial.index_copy(0, rows[keep], moved)
        if not tracker.empty:
            rows = tracker.active
            sub = ball.subset(rows) if tracker.partial else ball
            with torch.no_grad():
                logits, features = sub.logits_and_features(adversarial[rows])
            tracker.observe(best, sub, adversarial[rows], logits, features, labels[rows],
                            self.num_iterations)
        return best.images, tracker.extras()

    def perturb(self, model: Model, images: Tensor, labels: Tensor,
                generator: torch.Generator | None) -> Tensor:
        return self.perturb_with_extras(model, images, labels, generator)[0]

    def _cg_direction(self, ball: LpipsBall, x: Tensor, leaf: Tensor, features: Tensor,
                      record: Linearization, gradient: Tensor) -> Tensor:
        """``δ ≈ (JᵀJ)⁻¹∇f`` per image (:func:`solve_jtj`, ``Jv`` by the tangent pass),
        skipping the images whose gradient is exactly zero: their ``δ`` is 0 whatever CG
        does (CG starts at 0 and is linear in ``∇f``), e.g. once the clamped margin passes
        ``kappa``. When at least :data:`CG_SKIP_SHARE` of the images have a zero gradient,
        the others' features are recomputed with their own graph (one forward pass on them)
        so that the ``2·cg_iterations`` passes of CG run on them only; below that share CG
        runs on the whole batch (the zero rows stay exactly 0)."""
        moving = per_image_norm(gradient).flatten() > 0
        count = int(moving.sum())
        if count == 0:
            return torch.zeros_like(gradient)
        if not CG_SKIP_ZERO_GRADIENT or count > (1 - CG_SKIP_SHARE) * moving.numel():
            return solve_jtj(features, leaf, gradient, iterations=self.cg_iterations,
                             jv=_tangent_or_ad(ball, record, x))
        rows = moving.nonzero().flatten()
        part = ball.subset(rows)
        part_leaf = x[rows].detach().requires_grad_(True)
        with exact_precision():
            _, part_features, part_record = part.lpips.features_recorded(part_leaf)
            part_features = flatten_features(part_features)
        delta = torch.zeros_like(gradient)
        delta[rows] = solve_jtj(part_features, part_leaf, gradient[rows],
                                iterations=self.cg_iterations,
                                jv=_tangent_or_ad(part, part_record, x[rows]))
        return delta


def _tangent_or_ad(ball: LpipsBall, record: Linearization, x: Tensor
                   ) -> Callable[[Tensor], Tensor] | None:
    """``v ↦ Jv`` by the tangent pass for :func:`solve_jtj`, or None (double backward) when
    the pass is off or unsupported for this network (a warning says so once)."""
    if not EXACT_TANGENT_PASS:
        return None
    if record.unsupported is not None:
        _warn_fallback(record.unsupported)
        return None
    return lambda v: ball.tangent(v, record, x)


class _EarlyStop:
    """Per-image early exit of PPGD and LPA (``early_stop``), verified in full precision.

    ``active`` are the rows still attacked. :meth:`observe` keeps each row's best iterate
    inside the ball and, with ``early_stop``, retires the rows whose iterate is inside the
    ball and misclassified — checked on that very iterate (the point returned for the row)
    with full-precision logits: under autocast the classifier is re-run on the candidates
    under :func:`exact_precision`. ``finished`` ``[N]`` (int64) records the iteration at which
    each image finished: the number of gradient steps taken before its returned point was
    verified, or ``num_iterations`` (all of them, LPA: ``num_iterations·num_lambdas``) when it
    never finished early.
    """

    def __init__(self, attack: LpipsAttack, model: Model, n: int, device: torch.device):
        self.attack = attack
        self.model = model
        self.n = n
        self.enabled = bool(getattr(attack, "early_stop", False))
        self.active = torch.arange(n, device=device)
        self.finished = torch.full((n,), -1, dtype=torch.long, device=device)
        self._retired = torch.zeros(0, dtype=torch.bool, device=device)
        # logits and LPIPS size of each row's kept iterate (known: a kept iterate exists)
        self.logits: Tensor | None = None
        self.size = torch.zeros(n, device=device)
        self.known = torch.zeros(n, dtype=torch.bool, device=device)

    def _record(self, rows: Tensor, logits: Tensor, size: Tensor) -> None:
        if self.logits is None:
            self.logits = torch.zeros(self.n, logits.shape[1], device=logits.device)
        self.logits[rows] = logits.detach().float()
        self.size[rows] = size.detach().float()
        self.known[rows] = True

    @property
    def partial(self) -> bool:
        return self.active.numel() < self.n

    @property
    def empty(self) -> bool:
        return self.active.numel() == 0

    def kept(self, rows: Tensor) -> Tensor:
        """Boolean mask over ``rows`` (the rows of the last :meth:`observe`) still active."""
        return ~self._retired

    def observe(self, best: BestIterate, ball: LpipsBall, x: Tensor, logits: Tensor,
                features: Tensor, labels: Tensor, iteration: int) -> None:
        rows = self.active
        bound = self.attack.bound
        distance = ball.distance(features.detach())
        inside = distance <= bound * (1 + FEASIBLE_SLACK)
        margin = self.attack.success_margin(logits.detach(), labels).to(x.dtype)
        kept = torch.where(inside, margin, torch.full_like(margin, -math.inf))
        better = kept > best.margin[rows]
        best.update_rows(rows, x, kept)
        self._record(rows[better], logits[better], distance[better])
        self._retired = torch.zeros_like(inside)
        if not self.enabled:
            return
        candidates = (inside & (margin > 0)).nonzero().flatten()
        if candidates.numel() == 0:
            return
        verified, verified_logits = margin[candidates], logits[candidates]
        if _reduced_precision():
            with torch.no_grad(), exact_precision():
                verified_logits = self.model(x[candidates].detach())
                verified = self.attack.success_margin(
                    verified_logits, labels[candidates]).to(x.dtype)
        good = candidates[verified > 0]
        if good.numel() == 0:
            return
        best.set_rows(rows[good], x[good], verified[verified > 0])
        self._record(rows[good], verified_logits[verified > 0], distance[good])
        self.finished[rows[good]] = iteration
        self._retired[good] = True
        self.active = rows[~self._retired]

    def extras(self) -> dict[str, Tensor]:
        """``finished_iteration``, and the returned images' logits and size when every row
        has a kept iterate (:data:`KNOWN_LOGITS`, :data:`KNOWN_SIZE`)."""
        total = self.attack.num_iterations * getattr(self.attack, "num_lambdas", 1)
        extras = {"finished_iteration": torch.where(self.finished < 0, total, self.finished)}
        if self.logits is not None and bool(self.known.all()):
            extras[KNOWN_LOGITS] = self.logits
            extras[KNOWN_SIZE] = self.size
        return extras


def _reduced_precision() -> bool:
    """Is autocast on (CPU or CUDA), so that logits in the loop are not full precision?"""
    if torch.is_autocast_enabled("cpu"):
        return True
    return torch.cuda.is_available() and torch.is_autocast_enabled("cuda")


# --------------------------------------------------------------------------------------------
# LPA and Fast-LPA
# --------------------------------------------------------------------------------------------


def _penalised(objective: Tensor, lam: Tensor | float, distance: Tensor, bound: float
               ) -> Tensor:
    """``objective − λ·max(0, d − bound)`` per image. When no image is outside the ball the
    penalty and its gradient are exactly zero, so it is left out: the backward pass then
    skips the LPIPS network (externally bounded) — the same gradient, less work."""
    if not bool((distance.detach() > bound).any()):
        return objective
    return objective - lam * F.relu(distance - bound)


def _decay(t: int, steps: int) -> float:
    """``t / (steps − 1)`` in ``[0, 1]``: the schedules run exactly from their start to end."""
    return t / (steps - 1) if steps > 1 else 0.0


@register_attack("lpa", "Lagrangian Perceptual Attack (PAT A.2): LPIPS(x, x') <= bound, λ search")
@dataclass(frozen=True, kw_only=True)
class LagrangianPerceptualAttack(LpipsAttack):
    """Lagrangian Perceptual Attack (PAT appendix A.2, Algorithm 2).

    Maximises ``L(f(x̃), y) − λ·max(0, d(x̃, x) − bound)`` by ``num_iterations`` normalised
    gradient steps whose LPIPS length decays from ``step_size`` (default ``bound``) to
    ``step_size/10``; the length is set by the exact slope ``m = ‖JΔ̂‖`` (the authors use
    the finite difference ``d(x̃, x̃ + hΔ̂)/h``, ``h = 0.1``, which breaks under reduced
    precision). ``λ`` starts at ``0.01`` for every image and is multiplied by 10 for the
    images outside the ball after each of ``num_lambdas`` rounds (PAT: S=5, ``λ`` up to 100);
    rounds continue from the previous iterate. Finally the last iterate is projected onto the
    ball; the result is, per image, the best (highest success margin) among every iterate seen
    inside the ball and the projected last one — always within ``bound``. With ``early_stop``
    (default) an image stops at its first iterate inside the ball that is misclassified
    (verified in full precision; the authors stop too, on the post-step point), and that
    iterate is returned; ``extras["finished_iteration"]`` counts the steps taken (all
    ``num_iterations·num_lambdas`` when it never stopped).
    """

    loss: str = param("margin", kind="choice", choices=LOSSES,
                      doc="loss: margin (PAT, default) or ce")
    num_lambdas: int = param(5, kind="int", minimum=1,
                             doc="rounds of the λ search (PAT's S): λ = 0.01·10^round")
    projection: str = _projection_param()
    kappa: float = _margin_param()
    early_stop: bool = _early_stop_param()

    #: Initial λ and its growth factor per round (PAT appendix A.2).
    LAMBDA_START = 0.01
    LAMBDA_FACTOR = 10.0

    def default_step_size(self) -> float:
        """``bound``: the first step is one bound long in LPIPS, decaying to ``bound/10``."""
        return self.bound

    def perturb_with_extras(self, model: Model, images: Tensor, labels: Tensor,
                            generator: torch.Generator | None) -> tuple[Tensor, dict[str, Tensor]]:
        ball = self._ball(model, images)
        adversarial = self._start(images, generator)
        best = BestIterate(images)
        tracker = _EarlyStop(self, model, images.shape[0], images.device)
        lam = torch.full((images.shape[0],), self.LAMBDA_START, device=images.device,
                         dtype=images.dtype)
        steps = self.num_iterations
        for round_index in range(self.num_lambdas):
            for t in range(steps):
                rows = tracker.active
                sub = ball.subset(rows) if tracker.partial else ball
                x, y = adversarial[rows], labels[rows]
                leaf = x.detach().requires_grad_(True)
                logits, features, record = sub.logits_features_linearization(leaf)
                distance = sub.distance(features)
                if t == 0 and round_index > 0:  # this evaluates the previous round's result
                    outside = distance.detach() > self.bound
                    lam[rows] = torch.where(outside, lam[rows] * self.LAMBDA_FACTOR, lam[rows])
                tracker.observe(best, sub, x, logits, features, y, round_index * steps + t)
                if tracker.empty:
                    break
                objective = _penalised(self._clamped_objective(logits, y, self.kappa),
                                       lam[rows], distance, self.bound)
                (gradient,) = torch.autograd.grad(objective.sum(), leaf)
                keep = tracker.kept(rows)
                size = self.step_size * 0.1 ** _decay(t, steps)
                if not bool(keep.all()):
                    record = record.subset(keep)
                kept_ball, kept_x = sub.subset(keep), x[keep]
                step = lpips_step(kept_ball.features, kept_x, gradient[keep], size,
                                  slope=lambda u, b=kept_ball, r=record, z=kept_x:
                                  b.slope(z, u, r))
                adversarial = adversarial.index_copy(0, rows[keep],
                                                     (x[keep] + step).clamp(0, 1))
            if tracker.empty:
                break
        if not tracker.empty:
            rows = tracker.active
            sub = ball.subset(rows) if tracker.partial else ball
            with torch.no_grad():
                distance = sub.distance(sub.features(adversarial[rows]))
            project = project_newton if self.projection == "newton" else project_bisection
            projected = project(sub, images[rows], adversarial[rows], self.bound,
                                distance=distance)
            with torch.no_grad():
                logits, features = sub.logits_and_features(projected)
            tracker.observe(best, sub, projected, logits, features, labels[rows],
                            steps * self.num_lambdas)
        return best.images, tracker.extras()

    def perturb(self, model: Model, images: Tensor, labels: Tensor,
                generator: torch.Generator | None) -> Tensor:
        return self.perturb_with_extras(model, images, labels, generator)[0]


@register_attack("fast_lpa",
                 "Fast-LPA (PAT A.3, for training): LPIPS soft bound, may exceed it")
@dataclass(frozen=True, kw_only=True)
class FastLagrangianPerceptualAttack(LpipsAttack):
    """Fast Lagrangian Perceptual Attack (PAT appendix A.3, Algorithm 3) — for training.

    ``num_iterations`` normalised gradient steps on ``L − λ·max(0, d − bound)`` with ``λ``
    rising geometrically from ``lam/10`` to ``lam`` (PAT: 1 → 10) and the LPIPS step length
    decaying from ``step_size`` (default ``bound``) to ``step_size/10``, measured by the
    exact slope ``‖JΔ̂‖`` (forward-mode AD). No λ search, no projection, returns the last iterate
    (PAT): outputs CAN lie outside the bound, so do not use it to evaluate robustness or
    to make stimuli at a bound. The margin loss is not clamped (the authors' default).
    Cost per iteration: 2 forward + 1 backward passes self-bounded; externally bounded adds
    2 forward + 1 backward passes of the LPIPS network.
    """

    loss: str = param("margin", kind="choice", choices=LOSSES,
                      doc="loss: margin (PAT, default) or ce")
    lam: float = param(10.0, kind="float", minimum=0.0,
                       doc="final Lagrange multiplier; λ rises from lam/10 to lam (PAT: 10)")

    def default_step_size(self) -> float:
        """``bound``: the first step is one bound long in LPIPS, decaying to ``bound/10``."""
        return self.bound

    def perturb_with_extras(self, model: Model, images: Tensor, labels: Tensor,
                            generator: torch.Generator | None) -> tuple[Tensor, dict[str, Tensor]]:
        ball = self._ball(model, images)
        adversarial = self._start(images, generator)
        steps = self.num_iterations
        for t in range(steps):
            progress = _decay(t, steps)
            lam = self.lam * 0.1 ** (1 - progress)
            leaf = adversarial.detach().requires_grad_(True)
            logits, features, record = ball.logits_features_linearization(leaf)
            objective = _penalised(self.objective(logits, labels), lam,
                                   ball.distance(features), self.bound)
            (gradient,) = torch.autograd.grad(objective.sum(), leaf)
            step = lpips_step(ball.features, adversarial, gradient,
                              self.step_size * 0.1 ** progress,
                              slope=lambda u, r=record, z=adversarial: ball.slope(z, u, r))
            adversarial = (adversarial + step).clamp(0, 1)
        return adversarial, self._known(ball, adversarial)

    def perturb(self, model: Model, images: Tensor, labels: Tensor,
                generator: torch.Generator | None) -> Tensor:
        return self.perturb_with_extras(model, images, labels, generator)[0]


# --------------------------------------------------------------------------------------------
# OA-AT's LPIPS (Oracle-Invariant) attack
# --------------------------------------------------------------------------------------------


@register_attack("lpips_oa",
                 "OA-AT LPIPS attack: L∞ PGD on CE − lam·LPIPS, bound in [0, 1] pixel units")
@dataclass(frozen=True, kw_only=True)
class LpipsOracleInvariantAttack(LpipsAttack):
    """OA-AT's Oracle-Invariant attack (Addepalli et al., section 4): L∞ PGD that ascends
    ``CE(f(x̃), y) − lam·LPIPS(x, x̃)``.

    ``bound`` is an L∞ radius in ``[0, 1]`` pixel units (OA-AT trains at 16/255 on CIFAR-10);
    ``lam`` weighs the LPIPS term (OA-AT ramps it to 1 at the end of training and computes
    LPIPS with a weight-averaged copy of the model being trained — here ``lpips_model=self``
    uses the attacked classifier, or give a network spec). OA-AT's schedule: a uniform random
    start in the ball, ``num_iterations=10`` sign-gradient steps of ``step_size = bound/4``,
    cross-entropy loss; it returns the last iterate (the LPIPS term, not the success margin,
    decides what a good example is). :meth:`perturbation_size` is the L∞ distance (the units
    of ``bound``); :meth:`lpips_distance` gives the LPIPS one.
    """

    lam: float = param(1.0, kind="float", minimum=0.0,
                       doc="weight of the LPIPS term (OA-AT's lpips_weight)")

    def default_step_size(self) -> float:
        """``bound / 4`` (OA-AT)."""
        return self.bound / 4

    def perturbation_size(self, natural: Tensor, other: Tensor, model: Model | None = None
                          ) -> Tensor:
        """Per-image L∞ distance ``max |other − natural|`` (``[N]``), the units of ``bound``."""
        return (other - natural).flatten(1).abs().amax(dim=1)

    def perturb(self, model: Model, images: Tensor, labels: Tensor,
                generator: torch.Generator | None) -> Tensor:
        ball = self._ball(model, images)
        if self.random_start:
            noise = (2 * noise_uniform(images.shape, generator, images) - 1) * self.bound
            adversarial = (images + noise).clamp(0, 1)
        else:
            adversarial = images.clone()
        for _ in range(self.num_iterations):
            leaf = adversarial.detach().requires_grad_(True)
            logits, features = ball.logits_and_features(leaf)
            objective = self.objective(logits, labels) - self.lam * ball.distance(features)
            (gradient,) = torch.autograd.grad(objective.sum(), leaf)
            moved = adversarial + self.step_size * gradient.sign()
            adversarial = (images + (moved - images).clamp(-self.bound, self.bound)).clamp(0, 1)
        return adversarial

