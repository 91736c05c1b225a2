"""engine.architectures: the registry, stems, LPIPS layers, AlexNetCIFAR's layout."""

from __future__ import annotations

import pytest
import torch

from engine.architectures import AlexNetCIFAR, available_architectures, build_architecture
from engine.distances import LPIPS
from engine.errors import EngineError


@pytest.mark.parametrize("name,size", [("tiny", 16), ("resnet18", 32), ("alexnet_cifar", 32),
                                       ("resnet18_imagenet", 64), ("wrn28_10", 32)])
def test_forward_shape_and_self_bounded_lpips_layers(name, size):
    torch.manual_seed(0)
    net = build_architecture(name, num_classes=7).eval()
    x = torch.rand(2, 3, size, size)
    assert net(x).shape == (2, 7)
    lpips = LPIPS.from_model(net, list(net.lpips_layers))
    logits, features = lpips.logits_and_features(x)
    assert logits.shape == (2, 7) and len(features) == len(net.lpips_layers)
    assert float(lpips(x, x.flip(0))[0].detach()) > 0


def test_registry_has_the_issue_architectures():
    assert {"resnet18", "resnet50", "resnet18_imagenet", "resnet50_imagenet", "wrn28_10",
            "wrn34_10", "alexnet_cifar", "tiny"} <= set(available_architectures())
    n = sum(p.numel() for p in build_architecture("resnet50").parameters())
    assert 23_400_000 < n < 23_600_000  # PAT table 12: 23,520,842 for CIFAR-10 ResNet-50
    wrn = build_architecture("wrn34_10")
    assert sum(p.numel() for p in wrn.parameters()) > 46_000_000
    stem = build_architecture("resnet50_imagenet").network.stem[0]
    assert stem.kernel_size == (7, 7) and stem.stride == (2, 2)
    with pytest.raises(EngineError, match="unknown architecture 'vit'"):
        build_architecture("vit")


def test_alexnet_cifar_keeps_the_authors_layout():
    net = AlexNetCIFAR()
    keys = set(net.state_dict())
    assert {"features.0.weight", "classifier.6.bias"} <= keys
    wrapped = build_architecture("alexnet_cifar")
    assert wrapped.network.state_dict().keys() == net.state_dict().keys()
