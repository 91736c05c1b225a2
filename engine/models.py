"""Network architectures and weight loading.

Networks are named by spec strings ``ARCH[:WEIGHTS]``:

- ``resnet50`` or ``resnet50:pretrained`` — torchvision's default ImageNet weights, loaded
  through the torchvision weights API (``torch.hub`` cache, see :func:`weights_cache_path`).
- ``resnet50:untrained`` — the same architecture at its (seeded) random initialisation. Only
  used when asked for explicitly; every result records which was used.

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
)
WEIGHT_CHOICES = ("pretrained", "untrained")


@dataclass(frozen=True)
class NetworkSpec:
    """A parsed network spec: architecture name and whether pretrained weights are used."""

    arch: str
    pretrained: bool = True

    @property
    def weights_label(self) -> str:
        """What to record about the weights: torchvision's enum name, or ``untrained``."""
        if not self.pretrained:
            return "untrained"
        return str(torchvision.models.get_model_weights(self.arch).DEFAULT).split(".")[-1]

    def __str__(self) -> str:
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
