"""Network architectures and weight loading.

Networks are named by spec strings ``ARCH[:WEIGHTS]``:

- ``resnet50`` or ``resnet50:pretrained`` — torchvision's default ImageNet weights, loaded
  through the torchvision weights API (``torch.hub`` cache, see :func:`weights_cache_path`).
- ``resnet50:untrained`` — the same architecture at its (seeded) random initialisation. Only
  used when asked for explicitly; every result records which was used.
- ``alexnet_cifar:/path/to/weights.pt`` — PAT's CIFAR-10 AlexNet
  (:class:`engine.architectures.AlexNetCIFAR`, the LPIPS network of PAT's CIFAR-10 bounds)
  with weights read from that file (a state dict, or the authors' checkpoint
  ``{'model': state}`` of their ``AlexNetFeatureModel``); ``alexnet_cifar:untrained`` for
  its random initialisation. There is no download: a missing file is an error.

Every network returned here takes images in ``[0, 1]`` (``[N, 3, H, W]``): ImageNet
normalisation is part of the module, so attacks and distances never normalise themselves.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torchvision
from torch import nn

from .errors import EngineError, WeightsUnavailableError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Architectures with a known layer layout (LPIPS backbones) and/or used as classifiers.
KNOWN_ARCHITECTURES = (
    "alexnet",
    "vgg11",
    "vgg13",
    "vgg16",
    "vgg19",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "wide_resnet50_2",
    "alexnet_cifar",
)
#: Architectures whose trained weights come from a file path (``ARCH:/path/to/weights.pt``).
FILE_WEIGHT_ARCHITECTURES = ("alexnet_cifar",)
WEIGHT_CHOICES = ("pretrained", "untrained")


@dataclass(frozen=True)
class NetworkSpec:
    """A parsed network spec: architecture name and whether pretrained weights are used."""

    arch: str
    pretrained: bool = True
    #: Weights file of a :data:`FILE_WEIGHT_ARCHITECTURES` network (None otherwise).
    path: str | None = None

    @property
    def weights_label(self) -> str:
        """What to record about the weights: torchvision's enum name, the weights file's
        path, or ``untrained``."""
        if not self.pretrained:
            return "untrained"
        if self.path is not None:
            return self.path
        return str(torchvision.models.get_model_weights(self.arch).DEFAULT).split(".")[-1]

    def __str__(self) -> str:
        if self.path is not None:
            return f"{self.arch}:{self.path}"
        return f"{self.arch}:{'pretrained' if self.pretrained else 'untrained'}"


def parse_network(spec: str) -> NetworkSpec:
    """Parse ``ARCH[:pretrained|untrained]``; raise :class:`EngineError` for unknown names."""
    if not isinstance(spec, str) or not spec.strip():
        raise EngineError(f"network spec must be a non-empty string like 'alexnet', got {spec!r}")
    arch, _, weights = spec.strip().partition(":")
    arch = arch.strip().lower()
    weights = (weights.strip().lower() or "pretrained")
    if arch not in KNOWN_ARCHITECTURES:
        raise EngineError(
            f"unknown network {arch!r}; known networks: {', '.join(KNOWN_ARCHITECTURES)}"
        )
    if arch in FILE_WEIGHT_ARCHITECTURES:
        raw = spec.strip().partition(":")[2].strip()
        if weights == "untrained":
            return NetworkSpec(arch=arch, pretrained=False)
        if not raw or weights == "pretrained":
            raise EngineError(
                f"network {arch!r} needs its weights file: write '{arch}:/path/to/weights.pt'"
                f" (PAT's CIFAR-10 AlexNet, trained on CIFAR-10; there is no download) or"
                f" '{arch}:untrained'"
            )
        return NetworkSpec(arch=arch, pretrained=True, path=raw)
    if weights not in WEIGHT_CHOICES:
        raise EngineError(
            f"unknown weights {weights!r} in network spec {spec!r}; use one of {WEIGHT_CHOICES}"
        )
    return NetworkSpec(arch=arch, pretrained=weights == "pretrained")


def weights_cache_path(arch: str) -> str:
    """Where torchvision looks for (and would download) ``arch``'s default ImageNet weights."""
    weights = torchvision.models.get_model_weights(arch).DEFAULT
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))


def build_backbone(spec: NetworkSpec | str) -> nn.Module:
    """The bare torchvision architecture (expects ImageNet-normalised input), eval mode.

    Raises :class:`WeightsUnavailableError` naming the weights, the cache path and how to
    provide them when pretrained weights cannot be loaded.
    """
    if isinstance(spec, str):
        spec = parse_network(spec)
    if spec.arch in FILE_WEIGHT_ARCHITECTURES:
        return _build_from_file(spec)
    if not spec.pretrained:
        return torchvision.models.get_model(spec.arch, weights=None).eval()
    weights = torchvision.models.get_model_weights(spec.arch).DEFAULT
    try:
        model = torchvision.models.get_model(spec.arch, weights=weights)
    except Exception as exc:  # URLError, HTTPError, a corrupt file: all mean "not available"
        path = weights_cache_path(spec.arch)
        raise WeightsUnavailableError(
            f"pretrained weights {weights} for {spec.arch!r} could not be loaded"
            f" ({type(exc).__name__}: {exc}). torchvision looks for them at {path}"
            f" (set TORCH_HOME to move that folder) and downloads them from {weights.url}"
            " when online. To provide them offline, copy that file to that path; or ask"
            f" explicitly for an untrained network with '{spec.arch}:untrained'."
        ) from exc
    return model.eval()


def _build_from_file(spec: NetworkSpec) -> nn.Module:
    """PAT's CIFAR-10 AlexNet, untrained or with the weights of ``spec.path``."""
    from .architectures import AlexNetCIFAR  # owned by the defenses code; import lazily

    network = AlexNetCIFAR()
    if not spec.pretrained:
        return network.eval()
    path = os.path.expanduser(spec.path or "")
    if not os.path.isfile(path):
        raise WeightsUnavailableError(
            f"weights file {spec.path!r} for {spec.arch!r} not found. PAT's CIFAR-10 bounds"
            " (bound=cifar10) are measured with a CIFAR-10-trained AlexNet: give the path of"
            " its state dict (the authors publish alexnet_cifar.pt with perceptual-advex), or"
            f" ask explicitly for '{spec.arch}:untrained'"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsUnavailableError(
            f"could not read weights file {path!r} for {spec.arch!r}"
            f" ({type(exc).__name__}: {exc})"
        ) from exc
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # the authors' checkpoint of their AlexNetFeatureModel
    elif isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsUnavailableError(f"{path!r} holds no state dict for {spec.arch!r}")
    cleaned = {}
    for key, value in state.items():
        for prefix in ("module.", "model."):
            key = key.removeprefix(prefix)
        if key.startswith(("features.", "classifier.")):
            cleaned[key] = value
    try:
        network.load_state_dict(cleaned)
    except RuntimeError as exc:
        raise WeightsUnavailableError(
            f"{path!r} does not hold {spec.arch} weights (features.* / classifier.*): {exc}"
        ) from exc
    return network.eval()


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` for inputs in ``[0, 1]``."""

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class ImageClassifier(nn.Module):
    """A classifier taking ``[N, 3, H, W]`` images in ``[0, 1]`` and returning logits.

    ``network`` is the bare architecture; ``normalize`` maps ``[0, 1]`` images to its input.
    ``spec`` records what it is (architecture and weights) for manifests.
    """

    def __init__(self, network: nn.Module, spec: NetworkSpec | None = None, normalize=None):
        super().__init__()
        self.normalize = normalize if normalize is not None else Normalize()
        self.network = network
        self.spec = spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(self.normalize(x))

    @property
    def description(self) -> dict:
        """``{'classifier': arch, 'weights': label}`` for manifests and outputs."""
        if self.spec is None:
            return {"classifier": type(self.network).__name__, "weights": "custom"}
        return {"classifier": self.spec.arch, "weights": self.spec.weights_label}


def load_classifier(spec: str | NetworkSpec) -> ImageClassifier:
    """Load an ImageNet classifier by spec (e.g. ``resnet50``, ``alexnet:untrained``), eval mode.

    Untrained networks are initialised from torch's global RNG: seed it first for
    reproducible results.
    """
    if isinstance(spec, str):
        spec = parse_network(spec)
    return ImageClassifier(build_backbone(spec), spec).eval()
