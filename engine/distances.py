"""Image distances: L2, L∞, SSIM and LPIPS (any backbone, self-bounded or external).

Every function here takes two batches ``[N, 3, H, W]`` of floats in ``[0, 1]`` (validated with
:mod:`engine.checks`) and returns ``[N]``, one value per image pair. Results are differentiable
with respect to both inputs and keep the inputs' device and dtype.

LPIPS follows the PAT paper (Laidlaw et al., ICLR 2021, section 3): the activations of a few
layers of a network are unit-normalised across channels at every position, divided by
``sqrt(h·w)`` of their layer, flattened and concatenated into ``φ(x)``; the distance is
``‖φ(x) − φ(y)‖₂``. The learned linear calibration of Zhang et al. (2018) is available for
AlexNet and VGG-16 with ``linear=True`` and then reproduces the ``lpips`` package exactly.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import math
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checks import check_images, check_pair
from .errors import EngineError, WeightsUnavailableError
from .models import ImageClassifier, NetworkSpec, Normalize, build_backbone, parse_network

__all__ = [
    "LPIPS",
    "Linearization",
    "TangentUnsupported",
    "build_lpips",
    "exact_precision",
    "lpips_layers",
    "flatten_features",
    "l2_distance",
    "linf_distance",
    "normalize_channels",
    "pairwise_distances",
    "ssim",
]


# --------------------------------------------------------------------------- Lp distances


def l2_distance(x: Tensor, y: Tensor) -> Tensor:
    """Euclidean distance per image over all ``3·H·W`` values, in ``[0, 1]`` pixel units.

    ``x``, ``y``: ``[N, 3, H, W]`` in ``[0, 1]`` → ``[N]`` (0 for identical images).
    """
    check_pair(x, y)
    return torch.linalg.vector_norm((x - y).flatten(1), dim=1)


def linf_distance(x: Tensor, y: Tensor) -> Tensor:
    """Largest absolute difference per image over all ``3·H·W`` values, in ``[0, 1]`` units.

    ``x``, ``y``: ``[N, 3, H, W]`` in ``[0, 1]`` → ``[N]`` in ``[0, 1]``.
    """
    check_pair(x, y)
    return (x - y).flatten(1).abs().amax(dim=1)


# --------------------------------------------------------------------------- SSIM

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _gaussian_window(size: int, sigma: float, like: Tensor) -> Tensor:
    """Normalised 1-D Gaussian ``[size]`` (what scipy's filter uses for sigma 1.5, truncate 3.5)."""
    coords = torch.arange(size, dtype=like.dtype, device=like.device) - (size - 1) / 2
    window = torch.exp(-(coords**2) / (2 * sigma**2))
    return window / window.sum()


def ssim(x: Tensor, y: Tensor) -> Tensor:
    """Structural similarity (Wang et al., 2004) per image pair, in ``[-1, 1]`` (1: identical).

    ``x``, ``y``: ``[N, 3, H, W]`` in ``[0, 1]``, ``H, W ≥ 11`` → ``[N]``. Gaussian window
    11×11 with sigma 1.5, ``K1 = 0.01``, ``K2 = 0.03``, data range 1, population (not sample)
    covariances; each channel is filtered separately with no padding (a 'valid' convolution,
    which is the same as scikit-image's cropping of the filtered border), and the SSIM map is
    averaged over channels and positions. This equals
    ``skimage.metrics.structural_similarity(a, b, channel_axis=-1, gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False, data_range=1)``.
    Computed in float64 for float64 input and in float32 otherwise; returned in the input dtype.
    """
    check_pair(x, y)
    if min(x.shape[-2:]) < SSIM_WINDOW:
        raise EngineError(
            f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels,"
            f" got {x.shape[-2]}x{x.shape[-1]}"
        )
    dtype = x.dtype
    work_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    x, y = x.to(work_dtype), y.to(work_dtype)
    window = _gaussian_window(SSIM_WINDOW, SSIM_SIGMA, x)

    # One depthwise separable blur over the 5 stacked maps (3 channels each).
    maps = torch.cat([x, y, x * x, y * y, x * y], dim=1)
    channels = maps.shape[1]
    blurred = F.conv2d(maps, window.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), groups=channels)
    blurred = F.conv2d(blurred, window.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), groups=channels)
    mu_x, mu_y, xx, yy, xy = blurred.chunk(5, dim=1)

    var_x, var_y, cov_xy = xx - mu_x**2, yy - mu_y**2, xy - mu_x * mu_y
    c1, c2 = SSIM_K1**2, SSIM_K2**2  # (K · data_range)², data_range = 1
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    )
    return ssim_map.flatten(1).mean(dim=1).to(dtype)


# --------------------------------------------------------------------------- LPIPS

#: Input scaling of the ``lpips`` package, applied to ``2x − 1``: ``(2x − 1 − shift) / scale``.
LPIPS_PACKAGE_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_PACKAGE_SCALE = (0.458, 0.448, 0.450)
#: Which file of ``lpips/weights/v0.1/`` holds the linear calibration for an architecture.
LINEAR_WEIGHT_FILES = {"alexnet": "alex.pth", "vgg16": "vgg.pth"}
#: Seed of every untrained LPIPS backbone built by :func:`build_lpips`.
UNTRAINED_SEED = 0


def normalize_channels(activations: Tensor, eps: float = 1e-10) -> Tensor:
    """Unit L2 norm across channels (dim 1) at every position, as the ``lpips`` package does.

    The package's ``a / (sqrt(Σ_c a²) + eps)``, with ``Σ_c a²`` clamped below at ``eps²`` so
    the gradient at an all-zero position stays finite instead of NaN (the value changes only
    where ``‖a‖ < eps``). A sum of squares rather than ``torch.linalg.vector_norm(dim=1)``,
    which is 20-40x slower on CPU (this runs in every step of the perceptual attacks); half
    precision is squared and summed in float32 so it cannot overflow.
    """
    squared = activations if activations.dtype in (torch.float32, torch.float64) else (
        activations.float()
    )
    floor = max(eps * eps, torch.finfo(squared.dtype).tiny)
    squared = (squared * squared).sum(dim=1, keepdim=True).clamp_min(floor)
    return activations / (squared.sqrt().to(activations.dtype) + eps)


class LPIPS(nn.Module):
    """LPIPS distance from the activations of chosen layers of a network.

    ``network`` takes ``[N, 3, H, W]`` images in ``[0, 1]`` (any input normalisation is part
    of it); ``layers`` are dotted module names inside it (``dict(network.named_modules())``)
    whose outputs ``[N, C_l, H_l, W_l]`` are compared. Calling the module with ``(x, y)``
    returns ``[N]``:

    - PAT definition (no ``linear_weights``): ``‖φ(x) − φ(y)‖₂`` where ``φ`` concatenates the
      channel-normalised activations of every layer, each flattened and divided by
      ``sqrt(H_l·W_l)``. Unitless, ≥ 0; 0 for identical images.
    - Linear calibration (``linear_weights``, one ``[C_l]`` vector per layer): the ``lpips``
      package's value ``Σ_l mean_{h,w} Σ_c w_c·(x̂_lchw − ŷ_lchw)²`` of the normalised
      activations — a squared distance: NO square root and no ``1/sqrt(H_l·W_l)`` factor.

    Use :func:`build_lpips` for the standard backbones and :meth:`from_model` for a
    self-bounded distance defined by a classifier. ``frozen`` networks have
    ``requires_grad=False`` parameters and stay in eval mode whatever ``.train()`` asks.
    The module must be on the images' device and dtype (``lpips.to(images)``).
    """

    def __init__(
        self,
        network: nn.Module,
        layers: Sequence[str],
        *,
        linear_weights: Sequence[Tensor] | None = None,
        description: dict | None = None,
        frozen: bool = True,
        returns_logits: bool = False,
    ):
        super().__init__()
        if isinstance(layers, str) or not layers or len(set(layers)) != len(layers):
            raise EngineError(f"LPIPS needs a list of distinct layer names, got {layers!r}")
        _check_layer_names(network, layers)
        if linear_weights is not None and len(linear_weights) != len(layers):
            raise EngineError(
                f"{len(linear_weights)} linear weight vectors for {len(layers)} layers"
            )
        self.network = network
        self.layers = tuple(layers)
        self.linear = linear_weights is not None
        for i, weights in enumerate(linear_weights or ()):
            self.register_buffer(f"lin{i}", weights.detach().reshape(1, -1, 1, 1).clone())
        self.frozen = frozen
        self.returns_logits = returns_logits
        self._single_runs_checked = False  # set by the first complete forward pass
        self._description = dict(description or {})
        if frozen:
            self.network.requires_grad_(False)
            self.network.eval()

    @classmethod
    def from_model(cls, model: nn.Module, layers: Sequence[str]) -> LPIPS:
        """Self-bounded LPIPS: the classifier ``model`` (``[0, 1]`` images → logits) defines it.

        ``layers`` name modules of ``model``, e.g. ``["network.layer3", "network.layer4"]`` for
        an :class:`~engine.models.ImageClassifier` wrapping a ResNet. The classifier is used
        as it is — not frozen, not switched to eval mode — so the distance follows its current
        parameters (self-bounded PAT trains it); :meth:`logits_and_features` gives the logits
        and the LPIPS features from one forward pass.
        """
        if isinstance(model, ImageClassifier):
            info = model.description
            model_name, weights = info["classifier"], info["weights"]
        else:
            model_name, weights = type(model).__name__, "custom"
        description = {"lpips_model": model_name, "lpips_weights": weights}
        return cls(model, layers, description=description, frozen=False, returns_logits=True)

    @property
    def description(self) -> dict:
        """What defines this distance, for manifests: model, weights, linear, layers."""
        return {
            "lpips_model": self._description.get("lpips_model", type(self.network).__name__),
            "lpips_weights": self._description.get("lpips_weights", "custom"),
            "lpips_linear": self.linear,
            "lpips_layers": list(self.layers),
        }

    def train(self, mode: bool = True) -> LPIPS:
        super().train(mode)
        if self.frozen:
            self.network.eval()
        return self

    # -- features --------------------------------------------------------------------------

    def features(self, x: Tensor, *, check: bool = True) -> list[Tensor]:
        """Channel-normalised activations of each layer, ``[N, C_l, H_l, W_l]`` per layer.

        ``check=False`` skips validating ``x`` (the range check synchronises a GPU): for attack
        loops whose inputs are known to be valid, or finite-difference points that may lie a
        hair outside ``[0, 1]``.
        """
        if check:
            check_images(x)
        return self._run(x, features_only=True)[1]

    def logits_and_features(self, x: Tensor, *, check: bool = True
                            ) -> tuple[Tensor, list[Tensor]]:
        """Logits ``[N, classes]`` and :meth:`features` from a single forward pass.

        Only for a distance built with :meth:`from_model` (a standard backbone is truncated
        after its last LPIPS layer and has no classifier head). ``check`` as in
        :meth:`features`.
        """
        if not self.returns_logits:
            raise EngineError(
                "this LPIPS network is a truncated backbone without logits; build a"
                " self-bounded one with LPIPS.from_model(classifier, layers)"
            )
        if check:
            check_images(x)
        return self._run(x)

    def distance_from_features(self, fx: Sequence[Tensor], fy: Sequence[Tensor]) -> Tensor:
        """The distance ``[N]`` between two outputs of :meth:`features` (e.g. cached ones)."""
        if not self.linear:
            return torch.linalg.vector_norm(flatten_features(fx) - flatten_features(fy), dim=1)
        total = 0
        for i, (a, b) in enumerate(zip(fx, fy, strict=True)):
            weights = getattr(self, f"lin{i}")
            total = total + (weights * (a - b) ** 2).sum(dim=1).mean(dim=(1, 2))
        return total

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """LPIPS distance ``[N]`` between image batches ``x``, ``y`` ``[N, 3, H, W]`` in [0, 1]."""
        check_pair(x, y)
        return self.distance_from_features(self._run(x, features_only=True)[1],
                                           self._run(y, features_only=True)[1])

    def _run(self, x: Tensor, *, features_only: bool = False,
             record: Linearization | None = None) -> tuple[Tensor | None, list[Tensor]]:
        """One forward pass of the network; returns its output and the normalised features.

        ``features_only``: stop the pass once every LPIPS layer has run (the rest of a
        classifier, e.g. AlexNet's 58M-parameter head, is skipped; the output is then None)
        — from the second pass on, after a complete pass has checked that no LPIPS layer
        runs twice per pass. ``record``: also keep the pass's activation patterns in this
        :class:`Linearization` (for :meth:`feature_tangents`).
        """
        reference = next(iter(self.network.parameters()), None)
        if reference is not None and (reference.device, reference.dtype) != (x.device, x.dtype):
            raise EngineError(
                f"images are {x.dtype} on {x.device} but the LPIPS network is"
                f" {reference.dtype} on {reference.device}; move it with lpips.to(images)"
            )
        output = None
        # Stop early only once a full pass has shown that no LPIPS layer runs twice per pass.
        stop = features_only and self.returns_logits and self._single_runs_checked
        recording = _recording(self, record) if record is not None else contextlib.nullcontext()
        with recording, self._capture(stop_when_done=stop, raw=record) as captured:
            try:
                output = self.network(x)
            except _FeaturesDone:
                pass
        missing = [name for name in self.layers if name not in captured]
        if missing:
            raise EngineError(f"LPIPS layers {missing} did not run in the network's forward pass")
        if not stop:
            self._single_runs_checked = True
        return output, [captured[name] for name in self.layers]

    @contextmanager
    def _capture(self, stop_when_done: bool = False, raw: Linearization | None = None
                 ) -> Iterator[dict[str, Tensor]]:
        """Forward hooks, only for the duration of one pass, that collect normalised outputs.

        Normalising inside the hook reads each output before later in-place operations (e.g.
        ``ReLU(inplace=True)``) could change it; autograd then reports any such change loudly.
        ``raw``: also keep each layer's output before normalisation there (the tangent pass
        needs it).
        """
        captured: dict[str, Tensor] = {}

        def hook_for(name: str):
            def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
                if name in captured:
                    raise EngineError(
                        f"LPIPS layer {name!r} runs more than once per forward pass (a shared"
                        " module such as a ResNet block's relu); choose its parent instead"
                    )
                if not isinstance(output, Tensor) or output.dim() < 2:
                    raise EngineError(f"LPIPS layer {name!r} must output a [N, C, ...] tensor")
                captured[name] = normalize_channels(output)
                if raw is not None:
                    raw.keep_layer(name, output)
                if stop_when_done and len(captured) == len(self.layers):
                    raise _FeaturesDone

            return hook

        handles = [
            self.network.get_submodule(name).register_forward_hook(hook_for(name))
            for name in self.layers
        ]
        try:
            yield captured
        finally:
            for handle in handles:
                handle.remove()

    # -- exact tangent pass ------------------------------------------------------------------

    def features_recorded(self, x: Tensor, *, logits: bool = False
                          ) -> tuple[Tensor | None, list[Tensor], Linearization]:
        """:meth:`features` (with :meth:`logits_and_features`'s logits when ``logits``) from
        one forward pass that also records its activation patterns, for
        :meth:`feature_tangents` at ``x``. No range check (attack loops)."""
        if logits and not self.returns_logits:
            raise EngineError("logits=True needs a self-bounded LPIPS (LPIPS.from_model)")
        record = Linearization(self, x.shape[0])
        output, features = self._run(x, features_only=not logits, record=record)
        return output, features, record

    def feature_tangents(self, v: Tensor, linearization: Linearization) -> list[Tensor]:
        """The exact derivative of :meth:`features` along ``v`` ``[N, 3, H, W]`` at the point
        where ``linearization`` was recorded: one ``[N, C_l, H_l, W_l]`` tensor per layer.

        A hand-written tangent (forward-mode) pass that re-runs the network's own forward code
        on ``v`` with every module replaced by its linearisation at the recorded point:
        convolutions and linear layers without their bias, batch norm (eval) and the input
        normalisation as their per-channel scales, ReLU as the recorded mask ``output > 0``
        (one ``threshold_backward`` kernel), max-pooling as a gather at the recorded argmax
        indices; pooling, flattening, residual
        sums are linear already. Then the derivative of the channel normalisation
        ``a / (‖a‖ + eps)``. It costs about one forward pass (no bias, no recomputed
        nonlinearity, no autograd bookkeeping) where ``torch.func.jvp`` costs about 2.5, and
        agrees with it (and with double-backward AD) to float rounding.

        Why hand-written: PyTorch's forward-mode AD recomputes the primal pass with dual
        tensors; the attacks already ran that pass, so only the linear part is new work.
        Raises :class:`TangentUnsupported` when the recorded pass ran a module without a known
        linearisation (its reason says which); callers then fall back to AD.
        """
        if linearization.unsupported:
            raise TangentUnsupported(linearization.unsupported)
        if linearization.lpips is not self:
            raise EngineError("this linearization was recorded by another LPIPS network")
        linearization.check_unchanged()
        if v.shape[0] != linearization.rows:
            raise EngineError(
                f"tangent of {v.shape[0]} images at a point recorded for {linearization.rows}")
        tangents: dict[str, Tensor] = {}

        def hook_for(name: str):
            def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
                tangents[name] = _normalized_tangent(linearization.layers[name], output)
                if len(tangents) == len(self.layers):
                    raise _FeaturesDone

            return hook

        handles = [self.network.get_submodule(name).register_forward_hook(hook_for(name))
                   for name in self.layers]
        try:
            with _tangent_rules(linearization):
                try:
                    self.network(v)
                except _FeaturesDone:
                    pass
        finally:
            for handle in handles:
                handle.remove()
        return [tangents[name] for name in self.layers]


class _FeaturesDone(Exception):
    """Raised by a capture hook once every LPIPS layer has run (ends a features-only pass)."""


# --------------------------------------------------------------------------- the tangent pass


class TangentUnsupported(EngineError):
    """The recorded pass ran a module that :meth:`LPIPS.feature_tangents` cannot linearise."""


#: Containers whose own ``forward`` code is linear in the outputs of their children (only
#: sums, flattening, pooling): torch's Sequential, torchvision's AlexNet / VGG / ResNet and
#: its blocks, the engine's wrappers and training networks. Matched by exact type (a subclass
#: may override ``forward``). Filled lazily (imports).
_LINEAR_CONTAINERS: set[type] = set()
#: Leaf modules that are linear as they are (their own forward is the tangent rule).
_LINEAR_LEAVES = (nn.Identity, nn.Flatten, nn.AdaptiveAvgPool2d, nn.AvgPool2d)


def _linear_containers() -> set[type]:
    if not _LINEAR_CONTAINERS:
        import torchvision

        from . import architectures

        resnet = torchvision.models.resnet
        _LINEAR_CONTAINERS.update({
            nn.Sequential, torchvision.models.AlexNet, torchvision.models.VGG, resnet.ResNet,
            resnet.BasicBlock, resnet.Bottleneck, ImageClassifier, architectures.AlexNetCIFAR,
            architectures.TinyCNN, architectures.Classifier,
        })
    return _LINEAR_CONTAINERS


def _normalization_types() -> tuple[type, ...]:
    from . import architectures

    return (Normalize, architectures.Normalize)


class Linearization:
    """The activation patterns of one recorded forward pass of an :class:`LPIPS` network.

    Made by :meth:`LPIPS.features_recorded`, used by :meth:`LPIPS.feature_tangents`. Holds,
    per ReLU call its output (the mask is ``output > 0``), per max-pool call its argmax
    indices, and the raw (un-normalised) output of every LPIPS layer — tensors the forward
    pass made anyway (PyTorch's max-pooling computes the indices in any case; the recorded
    pass keeps them), no copies. ``unsupported`` names the first module
    without a known linearisation (then no tangent pass: callers fall back to AD). In-place
    changes to the recorded tensors after the pass are detected (their version counters).
    """

    def __init__(self, lpips: LPIPS, rows: int):
        self.lpips = lpips
        self.rows = rows
        self.patterns: dict[nn.Module, list[Tensor]] = {}
        self.layers: dict[str, Tensor] = {}
        self.unsupported: str | None = None
        self._versions: list[tuple[Tensor, int]] = []

    def _keep(self, tensor: Tensor) -> Tensor:
        self._versions.append((tensor, tensor._version))
        return tensor

    def keep_pattern(self, module: nn.Module, tensor: Tensor) -> None:
        self.patterns.setdefault(module, []).append(self._keep(tensor))

    def keep_layer(self, name: str, output: Tensor) -> None:
        self.layers[name] = self._keep(output)

    def refuse(self, reason: str) -> None:
        if self.unsupported is None:
            self.unsupported = reason

    def check_unchanged(self) -> None:
        """:class:`EngineError` if a recorded tensor was modified in place since the pass."""
        for tensor, version in self._versions:
            if tensor._version != version:
                raise EngineError(
                    "a tensor of the recorded LPIPS forward pass was modified in place after"
                    " the pass; record the linearization again"
                )

    def subset(self, rows: Tensor) -> Linearization:
        """The same linearization for the images ``rows`` (an index or boolean mask) only."""
        self.check_unchanged()
        out = Linearization(self.lpips, 0)
        out.unsupported = self.unsupported
        for module, tensors in self.patterns.items():
            out.patterns[module] = [out._keep(t[rows]) for t in tensors]
        out.layers = {name: out._keep(t[rows]) for name, t in self.layers.items()}
        sample = next(iter(out.layers.values()), None)
        out.rows = sample.shape[0] if sample is not None else 0
        return out


@contextmanager
def _recording(lpips: LPIPS, record: Linearization) -> Iterator[None]:
    """Hooks that check every module of the pass has a linearisation and keep the patterns.

    Pre-hooks (they fire before a container's forward even when the pass stops early inside
    it) check types; ReLU outputs are kept by forward hooks that run before the LPIPS capture
    hooks; max-pooling runs as ``F.max_pool2d(..., return_indices=True)`` for the pass (the
    same values) and its indices are kept.
    """
    containers = _linear_containers()
    normalizations = _normalization_types()

    def pre_hook(module: nn.Module, inputs: tuple) -> None:
        kind = type(module)
        if next(module.children(), None) is not None:
            if kind not in containers:
                record.refuse(f"container {kind.__name__} (its forward code is not known to"
                              " be linear between its modules)")
        elif kind is nn.MaxPool2d:
            pass  # its argmax indices are kept by the patched forward below
        elif kind is nn.Conv2d:
            if module.padding_mode != "zeros":
                record.refuse(f"Conv2d with padding_mode={module.padding_mode!r}")
        elif kind in (nn.BatchNorm2d, nn.BatchNorm1d):
            if module.training or module.running_var is None:
                record.refuse(f"{kind.__name__} in training mode (batch statistics)")
        elif kind in (nn.Dropout, nn.Dropout2d):
            if module.training and module.p > 0:
                record.refuse(f"{kind.__name__} in training mode")
        elif kind is nn.ReLU or kind is nn.Linear or kind in normalizations:
            pass
        elif kind not in _LINEAR_LEAVES:
            record.refuse(f"module {kind.__name__} (no tangent rule)")

    def relu_hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
        record.keep_pattern(module, output)

    def pool_with_indices(module: nn.MaxPool2d):
        # The same pooling, keeping the argmax indices that PyTorch computes anyway (CPU
        # inference and every pass with autograd): the tangent pass then only gathers.
        def forward(x: Tensor) -> Tensor:
            output, index = F.max_pool2d(x, module.kernel_size, module.stride, module.padding,
                                         module.dilation, ceil_mode=module.ceil_mode,
                                         return_indices=True)
            record.keep_pattern(module, index)
            return output
        return forward

    handles, patched = [], []
    try:
        for module in lpips.network.modules():
            handles.append(module.register_forward_pre_hook(pre_hook))
            if type(module) is nn.ReLU:
                handles.append(module.register_forward_hook(relu_hook, prepend=True))
            elif type(module) is nn.MaxPool2d and not module.return_indices:
                module.forward = pool_with_indices(module)
                patched.append(module)
        yield
    finally:
        for handle in handles:
            handle.remove()
        for module in patched:
            del module.forward


@contextmanager
def _tangent_rules(record: Linearization) -> Iterator[None]:
    """Replace, for one pass, every leaf module's ``forward`` by its linearisation at the
    recorded point (see :meth:`LPIPS.feature_tangents`); restored on exit."""
    normalizations = _normalization_types()
    used: dict[nn.Module, int] = {}

    def recorded(module: nn.Module) -> Tensor:
        index = used.get(module, 0)
        used[module] = index + 1
        tensors = record.patterns.get(module, ())
        if index >= len(tensors):
            raise EngineError(
                f"the tangent pass ran {type(module).__name__} more often than the recorded"
                " pass (data-dependent control flow?)")
        return tensors[index]

    def rule_for(module: nn.Module):
        kind = type(module)
        if kind is nn.ReLU:  # v where output > 0, else 0: ReLU's own backward kernel
            return lambda v: torch.ops.aten.threshold_backward(v, recorded(module), 0)
        if kind is nn.MaxPool2d:
            def max_pool(v: Tensor) -> Tensor:
                index = recorded(module)
                return v.flatten(2).gather(2, index.flatten(2)).view(index.shape)
            return max_pool
        if kind is nn.Conv2d:
            return lambda v: F.conv2d(v, module.weight, None, module.stride, module.padding,
                                      module.dilation, module.groups)
        if kind is nn.Linear:
            return lambda v: F.linear(v, module.weight)
        if kind in (nn.BatchNorm2d, nn.BatchNorm1d):
            def batch_norm(v: Tensor) -> Tensor:
                scale = torch.rsqrt(module.running_var + module.eps)
                if module.weight is not None:
                    scale = scale * module.weight
                return v * scale.view(1, -1, *([1] * (v.dim() - 2)))
            return batch_norm
        if kind in (nn.Dropout, nn.Dropout2d):
            return lambda v: v
        if kind in normalizations:
            return lambda v: v / module.std
        return None  # linear as it is

    patched = []
    try:
        for module in record.lpips.network.modules():
            if next(module.children(), None) is None:
                rule = rule_for(module)
                if rule is not None:
                    module.forward = rule
                    patched.append(module)
        yield
    finally:
        for module in patched:
            del module.forward


def _normalized_tangent(raw: Tensor, tangent: Tensor, eps: float = 1e-10) -> Tensor:
    """Derivative of :func:`normalize_channels` at ``raw`` along ``tangent`` (same shape).

    ``n = a / (s + eps)``, ``s = sqrt(max(Σ_c a², floor))``: ``dn = da/(s + eps) − a·ds/(s +
    eps)²`` with ``ds = Σ_c a·da / s`` where the clamp is inactive (0 where it clamps).
    """
    work = raw if raw.dtype in (torch.float32, torch.float64) else raw.float()
    dwork = tangent.to(work.dtype)
    floor = max(eps * eps, torch.finfo(work.dtype).tiny)
    squared = (work * work).sum(dim=1, keepdim=True)
    norm = squared.clamp_min(floor).sqrt()
    denominator = norm + eps
    dnorm = ((work * dwork).sum(dim=1, keepdim=True) / norm).masked_fill(squared <= floor, 0)
    return (dwork / denominator - work * (dnorm / (denominator * denominator))).to(raw.dtype)


def flatten_features(features: Sequence[Tensor]) -> Tensor:
    """PAT's ``φ`` ``[N, M]``: each layer flattened, divided by ``sqrt(H_l·W_l)``, concatenated."""
    return torch.cat([f.flatten(1) / math.sqrt(f[0, 0].numel()) for f in features], dim=1)


def _check_layer_names(network: nn.Module, layers: Sequence[str]) -> None:
    names = [name for name, _ in network.named_modules() if name]
    for layer in layers:
        if layer not in names:
            close = difflib.get_close_matches(layer, names, n=5)
            hint = f"; did you mean {close}?" if close else ""
            raise EngineError(
                f"unknown LPIPS layer {layer!r} in {type(network).__name__}{hint} Valid names"
                f" include: {', '.join(names[:20])}{' ...' if len(names) > 20 else ''}"
            )


# --------------------------------------------------------------------------- standard backbones


@contextmanager
def exact_precision() -> Iterator[None]:
    """Run LPIPS (and its derivatives) in the tensors' own precision, whatever the caller set.

    Inside: autocast is off (CPU and CUDA) and TF32 is off for CUDA matmuls and cuDNN
    convolutions; the previous settings are restored on exit. The perceptual attacks compute
    their LPIPS distances, Jacobian-vector products and projections in here, so that
    ``torch.autocast`` (bf16/fp16) or PyTorch's default TF32 convolutions on CUDA only affect
    the classifier, never the geometry of the LPIPS ball. Nestable; cheap (flag flips only).
    """
    matmul = torch.backends.cuda.matmul.allow_tf32
    cudnn = torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.autocast("cpu", enabled=False))
            if torch.cuda.is_available():
                stack.enter_context(torch.autocast("cuda", enabled=False))
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn


def lpips_layers(arch: str, backbone: nn.Module) -> list[str]:
    """Names of the standard LPIPS layers of a torchvision ``backbone`` of architecture ``arch``.

    Dotted module names inside the torchvision network (e.g. ``features.1`` … ``features.11``
    for AlexNet's 5 ReLUs, ``layer1`` … ``layer4`` for a ResNet), usable with
    :class:`LPIPS` / :meth:`LPIPS.from_model` once prefixed by the wrapper's attribute
    (``network.``). :class:`EngineError` for an architecture without a known layout.
    """
    return _trunk(arch, backbone)[1]


def _trunk(arch: str, backbone: nn.Module) -> tuple[dict[str, nn.Module], list[str]]:
    """The backbone cut after its last LPIPS layer (named as in torchvision) and those layers."""
    if arch == "alexnet":  # the 5 ReLU outputs of `features`
        taps = [i for i, m in enumerate(backbone.features) if isinstance(m, nn.ReLU)]
    elif arch.startswith("vgg"):  # the ReLU right before each max-pool (relu1_2 ... relu5_3)
        taps = [i - 1 for i, m in enumerate(backbone.features) if isinstance(m, nn.MaxPool2d)]
    elif arch == "alexnet_cifar":  # PAT's CifarAlexNet: the ReLUs of its 5 convolutions
        taps = [i for i, m in enumerate(backbone.features) if isinstance(m, nn.ReLU)]
    elif arch.startswith(("resnet", "wide_resnet")):  # conv2_x ... conv5_x
        stem = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
        return {name: getattr(backbone, name) for name in stem}, stem[4:]
    else:
        raise EngineError(
            f"no LPIPS layer layout for {arch!r} (alexnet, vgg*, resnet*, wide_resnet*);"
            " for another network use LPIPS.from_model(model, layers=[...])"
        )
    return {"features": backbone.features[: taps[-1] + 1]}, [f"features.{i}" for i in taps]


def _lpips_package_linear_weights(arch: str) -> list[Tensor]:
    """The v0.1 linear calibration shipped inside the installed ``lpips`` package (no download)."""
    found = importlib.util.find_spec("lpips")  # locate without importing the package
    folder = Path(next(iter(found.submodule_search_locations))) if found else None
    path = folder / "weights" / "v0.1" / LINEAR_WEIGHT_FILES[arch] if folder else None
    if path is None or not path.is_file():
        raise WeightsUnavailableError(
            f"linear LPIPS weights for {arch!r} not found (looked for {path}); they ship with"
            " the 'lpips' package (pip install lpips), or use linear=False"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    return [state[f"lin{i}.model.1.weight"].flatten() for i in range(5)]


def build_lpips(spec: str | NetworkSpec, *, linear: bool = False) -> LPIPS:
    """LPIPS on a standard torchvision backbone, e.g. ``alexnet``, ``vgg16:untrained``.

    ``spec`` is a network spec (:func:`engine.models.parse_network`). Layers: AlexNet's 5
    ReLUs, VGG's ReLUs before each max-pool, ResNet's ``layer1``…``layer4``. Inputs are
    ``[0, 1]`` images; the network normalises them (ImageNet mean/std).

    ``linear=True`` (AlexNet and VGG-16 only) adds the learned calibration of the ``lpips``
    package (its v0.1 weights, read from the installed package) and its input scaling
    ``(2x − 1 − shift) / scale``: the value then equals ``lpips.LPIPS(net=...)(x, y,
    normalize=True)`` for the same backbone weights (a squared distance, see :class:`LPIPS`).

    Raises :class:`EngineError` for an unknown backbone or an unsupported ``linear``, and
    :class:`WeightsUnavailableError` (from :func:`engine.models.build_backbone`) when
    pretrained weights cannot be loaded. Untrained backbones are initialised from seed
    :data:`UNTRAINED_SEED` (torch's global RNG untouched), so ``alexnet:untrained`` is the
    same network for an attack's bound and for the distances recorded with its stimuli.
    """
    if isinstance(spec, str):
        spec = parse_network(spec)
    if linear and spec.arch not in LINEAR_WEIGHT_FILES:
        raise EngineError(
            f"linear LPIPS calibration exists only for {sorted(LINEAR_WEIGHT_FILES)},"
            f" not {spec.arch!r}; use linear=False"
        )
    linear_weights = _lpips_package_linear_weights(spec.arch) if linear else None
    if not spec.pretrained:  # the same untrained network in every process and every caller
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(UNTRAINED_SEED)
            backbone = build_backbone(spec)
    else:
        backbone = build_backbone(spec)
    if linear:  # (2x − 1 − shift) / scale == (x − (1 + shift) / 2) / (scale / 2)
        normalize = Normalize(
            mean=[(1 + s) / 2 for s in LPIPS_PACKAGE_SHIFT],
            std=[s / 2 for s in LPIPS_PACKAGE_SCALE],
        )
    else:
        normalize = Normalize()
    parts, layers = _trunk(spec.arch, backbone)
    network = nn.Sequential(OrderedDict([("normalize", normalize), *parts.items()]))
    description = {"lpips_model": spec.arch, "lpips_weights": spec.weights_label}
    return LPIPS(network, layers, linear_weights=linear_weights, description=description)


# --------------------------------------------------------------------------- manifests


@torch.no_grad()
def pairwise_distances(
    x: Tensor, y: Tensor, lpips_models: dict[str, LPIPS] | None = None
) -> dict[str, Tensor]:
    """All distances for stimulus manifests: ``{"l2", "linf", "ssim", "lpips_<name>"}`` → ``[N]``.

    ``x``, ``y``: ``[N, 3, H, W]`` in ``[0, 1]`` (``H, W ≥ 11`` for SSIM). No gradients.
    ``ssim`` is the similarity (1: identical); the others are distances (0: identical).
    """
    distances = {"l2": l2_distance(x, y), "linf": linf_distance(x, y), "ssim": ssim(x, y)}
    for name, model in (lpips_models or {}).items():
        distances[f"lpips_{name}"] = model(x, y)
    return distances
