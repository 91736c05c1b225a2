"""Architectures that torchvision does not ship: the small-image networks of the seed papers.

Every network here takes raw images in ``[0, 1]`` (``[N, 3, H, W]``) unless it is wrapped by
the caller with a normalisation; weight loading lives in :mod:`engine.models`.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import EngineError

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)


class AlexNetCIFAR(nn.Module):
    """The CIFAR-10 AlexNet of the PAT paper (perceptual-advex's ``CifarAlexNet``).

    PAT uses it as the LPIPS network for its CIFAR-10 bounds (table 2: 0.5 is measured with
    *this* network, trained on CIFAR-10). Layer layout is identical to the authors' so that a
    state dict trained with their code loads here (keys ``features.*`` and ``classifier.*``).
    Input: ``[N, 3, 32, 32]``; the five ReLU outputs of ``features`` are the LPIPS layers.
    """

    #: Indices in ``features`` of the five ReLUs whose outputs LPIPS compares.
    lpips_relu_indices = (1, 4, 7, 9, 11)

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=3, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2),
            nn.Conv2d(64, 192, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2),
        )
        self.classifier = nn.Sequential(
            nn.Dropout(),
            nn.Linear(256 * 2 * 2, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


# --------------------------------------------------------------------------------------------
# Classifiers for training: ResNets (CIFAR and ImageNet stems), WideResNets, a tiny CNN
# --------------------------------------------------------------------------------------------


class Normalize(nn.Module):
    """Per-channel ``(x − mean) / std`` for ``[0, 1]`` images (part of the model, so attacks
    and LPIPS see ``[0, 1]`` pixels)."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    """``[N, 3, H, W]`` images in ``[0, 1]`` → logits: ``network(normalize(x))``.

    ``lpips_layers`` names (dotted, relative to this module) the layers whose activations a
    self-bounded perceptual attack compares (PAT section 5), in the ``+``-joined form the
    attacks' ``lpips_layers`` parameter takes (:attr:`lpips_layers_spec`).
    """

    def __init__(self, network: nn.Module, lpips_layers: tuple[str, ...], *,
                 mean: tuple[float, ...] = (0.5, 0.5, 0.5),
                 std: tuple[float, ...] = (0.5, 0.5, 0.5), arch: str = "custom") -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.network = network
        self.lpips_layers = tuple(f"network.{name}" for name in lpips_layers)
        self.arch = arch

    @property
    def description(self) -> dict:
        """``{'classifier': arch, 'weights': ...}`` for manifests (as ImageClassifier)."""
        return {"classifier": self.arch,
                "weights": getattr(self, "weights_label", "initialised (untrained)")}

    @property
    def lpips_layers_spec(self) -> str:
        """``network.a+network.b+...``: the value for an attack's ``lpips_layers=``."""
        return "+".join(self.lpips_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(self.normalize(x))


class BasicBlock(nn.Module):
    """ResNet basic block (two 3×3 convolutions)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """ResNet bottleneck block (1×1, 3×3, 1×1; expansion 4)."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        width = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, width, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != width:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, width, 1, stride, bias=False), nn.BatchNorm2d(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet (He et al. 2016) with a CIFAR stem (3×3 conv, stride 1, no max-pool; for 32 px)
    or the ImageNet stem (7×7 conv stride 2 + 3×3 max-pool; for 224 px, ImageNet-100).

    The LPIPS layers (PAT's self-bounded ResNet-50) are ``layer1`` … ``layer4``.
    """

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], blocks: tuple[int, ...],
                 num_classes: int = 10, stem: str = "cifar") -> None:
        super().__init__()
        if stem not in ("cifar", "imagenet"):
            raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
        if stem == "cifar":
            self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64),
                                      nn.ReLU(inplace=True))
        else:
            self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64),
                                      nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        planes, layers, in_planes = 64, [], 64
        for i, count in enumerate(blocks):
            stride = 1 if i == 0 else 2
            stage = []
            for j in range(count):
                stage.append(block(in_planes, planes, stride if j == 0 else 1))
                in_planes = planes * block.expansion
            layers.append(nn.Sequential(*stage))
            planes *= 2
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.fc(torch.flatten(self.pool(x), 1))


class WideBlock(nn.Module):
    """Pre-activation wide residual block (Zagoruyko & Komodakis 2016)."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(torch.relu(self.bn2(out)))
        return out + shortcut


class WideResNet(nn.Module):
    """WideResNet-depth-widen for 32 px images (WRN-28-10, WRN-34-10 of the AT literature).

    LPIPS layers: ``block1`` … ``block3`` and ``relu`` (the final activation).
    """

    def __init__(self, depth: int = 28, widen: int = 10, num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n + 4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)

        def stage(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(*[WideBlock(cin if i == 0 else cout, cout,
                                             stride if i == 0 else 1) for i in range(n)])

        self.block1 = stage(widths[0], widths[1], 1)
        self.block2 = stage(widths[1], widths[2], 2)
        self.block3 = stage(widths[2], widths[3], 2)
        self.bn = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=False)
        self.fc = nn.Linear(widths[3], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = self.relu(self.bn(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class TinyCNN(nn.Module):
    """A small CNN for tests and the CPU demo (about 30k parameters; no batch norm, so DDP
    and single-process runs agree). LPIPS layers: ``relu1``, ``relu2``, ``relu3``."""

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, 2 * width, 3, 2, 1)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(2 * width, 4 * width, 3, 2, 1)
        self.relu3 = nn.ReLU()
        self.fc = nn.Linear(4 * width * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu3(self.conv3(self.relu2(self.conv2(self.relu1(self.conv1(x))))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 2), 1))


def _resnet(block, blocks, stem):
    def build(num_classes: int) -> tuple[nn.Module, tuple[str, ...]]:
        return (ResNet(block, blocks, num_classes, stem),
                ("layer1", "layer2", "layer3", "layer4"))
    return build


def _wrn(depth: int, widen: int):
    def build(num_classes: int) -> tuple[nn.Module, tuple[str, ...]]:
        return (WideResNet(depth, widen, num_classes), ("block1", "block2", "block3", "relu"))
    return build


def _alexnet_cifar(num_classes: int) -> tuple[nn.Module, tuple[str, ...]]:
    net = AlexNetCIFAR(num_classes)
    return net, tuple(f"features.{i}" for i in AlexNetCIFAR.lpips_relu_indices)


def _tiny(num_classes: int) -> tuple[nn.Module, tuple[str, ...]]:
    return TinyCNN(num_classes), ("relu1", "relu2", "relu3")


#: ``{name: builder(num_classes) -> (network, LPIPS layer names)}``.
ARCHITECTURES = {
    "resnet18": _resnet(BasicBlock, (2, 2, 2, 2), "cifar"),
    "resnet50": _resnet(Bottleneck, (3, 4, 6, 3), "cifar"),
    "resnet18_imagenet": _resnet(BasicBlock, (2, 2, 2, 2), "imagenet"),
    "resnet50_imagenet": _resnet(Bottleneck, (3, 4, 6, 3), "imagenet"),
    "wrn28_10": _wrn(28, 10),
    "wrn34_10": _wrn(34, 10),
    "alexnet_cifar": _alexnet_cifar,
    "tiny": _tiny,
}


def available_architectures() -> list[str]:
    """Names accepted by :func:`build_architecture`."""
    return sorted(ARCHITECTURES)


def build_architecture(name: str, num_classes: int = 10, *,
                       mean: tuple[float, ...] = CIFAR10_MEAN,
                       std: tuple[float, ...] = CIFAR10_STD) -> Classifier:
    """A freshly initialised :class:`Classifier` by registry name (``resnet50``, ``tiny`` …).

    ``resnet18``/``resnet50`` have the CIFAR stem (32 px); ``*_imagenet`` the ImageNet stem
    (224 px); ``mean``/``std`` are the dataset's channel statistics. Initialised from torch's
    global RNG (seed it first). Raises :class:`EngineError` for an unknown name, listing them.
    """
    builder = ARCHITECTURES.get(name)
    if builder is None:
        raise EngineError(
            f"unknown architecture {name!r}; choose one of: {', '.join(available_architectures())}"
        )
    if num_classes < 2:
        raise EngineError(f"num_classes must be >= 2, got {num_classes}")
    network, layers = builder(num_classes)
    return Classifier(network, layers, mean=mean, std=std, arch=name)
