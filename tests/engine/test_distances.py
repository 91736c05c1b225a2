"""Tests for engine.distances: oracles (scikit-image SSIM, the lpips package), invariants, errors.

Everything runs on CPU with untrained (seeded) networks and crops of scikit-image's photographs.
"""

from __future__ import annotations

import functools
import math
import urllib.error

import lpips
import numpy as np
import pytest
import skimage.data
import torch
import torchvision
from skimage.metrics import structural_similarity
from torch import nn

from engine.distances import (
    LPIPS,
    build_lpips,
    l2_distance,
    linf_distance,
    normalize_channels,
    pairwise_distances,
    ssim,
)
from engine.errors import EngineError, WeightsUnavailableError
from engine.models import IMAGENET_MEAN, IMAGENET_STD, ImageClassifier

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


# Small tensors: one CPU thread is faster, and much steadier on a busy machine (conftest).
pytestmark = pytest.mark.usefixtures("single_torch_thread")


def photo_crops(size: tuple[int, int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[4, 3, H, W]`` crops in [0, 1] of real photographs shipped with scikit-image."""
    h, w = size
    crops = [getattr(skimage.data, name)()[40 : 40 + h, 80 : 80 + w] for name in PHOTOS]
    batch = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).to(torch.float64) / 255
    return batch.to(dtype).contiguous()


def perturbed(x: torch.Tensor, eps: float, seed: int = 0) -> torch.Tensor:
    """``x`` plus Gaussian noise of standard deviation ``eps``, clipped to [0, 1]."""
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=x.dtype)
    return (x + eps * noise).clamp(0, 1)


def small_classifier() -> ImageClassifier:
    torch.manual_seed(0)
    network = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )
    return ImageClassifier(network).eval()


@functools.cache
def untrained(name: str) -> LPIPS:
    """A shared LPIPS (``alexnet``, ``vgg16+linear``, ``self-bounded``...). Do not modify it."""
    torch.manual_seed(0)
    if name == "self-bounded":
        return LPIPS.from_model(small_classifier(), layers=["network.1", "network.3"])
    arch, _, linear = name.partition("+")
    return build_lpips(f"{arch}:untrained", linear=bool(linear))


# --------------------------------------------------------------------------- L2, L∞


def test_l2_and_linf_by_hand():
    x = torch.zeros(2, 3, 4, 4)
    y = x.clone()
    y[0, 0, 0, 0], y[0, 2, 3, 1] = 0.5, 0.25
    assert torch.allclose(l2_distance(x, y), torch.tensor([math.sqrt(0.25 + 0.0625), 0.0]))
    assert torch.allclose(linf_distance(x, y), torch.tensor([0.5, 0.0]))


def test_lp_distances_follow_dtype_and_are_differentiable():
    x = photo_crops((16, 16), torch.float64)
    y = perturbed(x, 0.1).requires_grad_(True)
    for distance in (l2_distance, linf_distance):
        value = distance(x, y)
        assert value.shape == (4,) and value.dtype == torch.float64
        (grad,) = torch.autograd.grad(value.sum(), y)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0


# --------------------------------------------------------------------------- SSIM


def skimage_ssim(x: torch.Tensor, y: torch.Tensor) -> list[float]:
    """The oracle: scikit-image's SSIM in float64, image by image."""
    return [
        structural_similarity(
            a.permute(1, 2, 0).double().numpy(),
            b.permute(1, 2, 0).double().numpy(),
            channel_axis=-1,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=1,
        )
        for a, b in zip(x, y, strict=True)
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("change", ["noise", "strong noise", "shift", "darker"])
def test_ssim_matches_scikit_image_on_photographs(dtype, change):
    x = photo_crops((96, 128), torch.float64)
    y = {
        "noise": lambda: perturbed(x, 0.03),
        "strong noise": lambda: perturbed(x, 0.2),
        "shift": lambda: torch.roll(x, shifts=(1, 2), dims=(2, 3)),
        "darker": lambda: x * 0.8,
    }[change]()
    ours = ssim(x.to(dtype), y.to(dtype))
    assert ours.dtype == dtype and ours.shape == (4,)
    expected = torch.tensor(skimage_ssim(x, y), dtype=torch.float64)
    assert torch.allclose(ours.double(), expected, rtol=0, atol=1e-4)
    if dtype == torch.float64:
        assert torch.allclose(ours, expected, rtol=0, atol=1e-10)


def test_ssim_of_identical_images_is_one_and_gradient_flows():
    x = photo_crops((32, 32))
    assert torch.allclose(ssim(x, x), torch.ones(4), atol=1e-6)
    y = perturbed(x, 0.1).requires_grad_(True)
    (grad,) = torch.autograd.grad(ssim(x, y).sum(), y)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_ssim_rejects_images_smaller_than_its_window():
    x = torch.rand(1, 3, 10, 32)
    with pytest.raises(EngineError, match="at least 11x11"):
        ssim(x, x)


# --------------------------------------------------------------------------- LPIPS vs lpips


@pytest.mark.parametrize("arch, package_net", [("alexnet", "alex"), ("vgg16", "vgg")])
def test_linear_lpips_matches_the_lpips_package(arch, package_net):
    ours = untrained(f"{arch}+linear")
    reference = lpips.LPIPS(net=package_net, pnet_rand=True, verbose=False)
    # Give the package's random backbone our weights: its slices hold torchvision's modules
    # under their original indices in `features`.
    slices = [getattr(reference.net, f"slice{i}") for i in range(1, 6)]
    for index, module in ((int(k), m) for s in slices for k, m in s.named_children()):
        module.load_state_dict(ours.network.features[index].state_dict())

    x = photo_crops((48, 48))
    # slight noise, strong noise, and two pairs of different photographs
    y = torch.cat([perturbed(x[:1], 0.02), perturbed(x[1:2], 0.2), x[3:], x[2:3]])
    with torch.no_grad():
        expected = reference(x, y, normalize=True).flatten()
        assert torch.allclose(ours(x, y), expected, rtol=1e-5, atol=1e-7)
    assert ours.description == {
        "lpips_model": arch,
        "lpips_weights": "untrained",
        "lpips_linear": True,
        "lpips_layers": list(ours.layers),
    }


def test_standard_layers_are_the_documented_ones():
    assert untrained("alexnet").layers == tuple(f"features.{i}" for i in (1, 4, 7, 9, 11))
    assert untrained("vgg16").layers == tuple(f"features.{i}" for i in (3, 8, 15, 22, 29))
    assert untrained("resnet18").layers == ("layer1", "layer2", "layer3", "layer4")


# --------------------------------------------------------------------------- invariants

BACKBONES = ("alexnet", "alexnet+linear", "vgg16", "resnet18", "self-bounded")


@pytest.fixture(params=BACKBONES)
def any_lpips(request) -> LPIPS:
    return untrained(request.param)


@pytest.fixture(scope="module")
def images() -> tuple[torch.Tensor, torch.Tensor]:
    x = photo_crops((32, 32))
    return x, perturbed(x, 0.05)


def test_lpips_is_zero_for_identical_images(any_lpips, images):
    x, _ = images
    assert torch.equal(any_lpips(x, x), torch.zeros(4))


def test_lpips_is_symmetric_and_non_negative(any_lpips, images):
    x, y = images
    forward, backward = any_lpips(x, y), any_lpips(y, x)
    assert forward.shape == (4,)
    assert (forward > 0).all()
    assert torch.allclose(forward, backward, rtol=1e-6, atol=1e-7)


def test_lpips_of_a_pair_does_not_depend_on_its_batch(any_lpips, images):
    x, y = images
    batched = any_lpips(x, y)
    alone = torch.cat([any_lpips(x[i : i + 1], y[i : i + 1]) for i in range(4)])
    assert torch.allclose(batched, alone, rtol=0, atol=1e-5)


def test_lpips_is_differentiable(any_lpips, images):
    x, y = images
    y = y.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(any_lpips(x, y).sum(), y)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_lpips_grows_with_the_perturbation(any_lpips, images):
    x, _ = images
    with torch.no_grad():
        means = [float(any_lpips(x, perturbed(x, eps)).mean()) for eps in (0.01, 0.05, 0.25)]
    assert means[0] < means[1] < means[2]


def test_lpips_features_give_the_same_distance(any_lpips, images):
    x, y = images
    fx, fy = any_lpips.features(x), any_lpips.features(y)
    assert len(fx) == len(any_lpips.layers)
    assert torch.allclose(any_lpips.distance_from_features(fx, fy), any_lpips(x, y))


# --------------------------------------------------------------------------- PAT definition


def pat_distance_by_hand(raw_x: list[torch.Tensor], raw_y: list[torch.Tensor]) -> torch.Tensor:
    """Eq. (1) of the PAT paper from raw activations ``[N, C, H, W]``, written out plainly."""
    total = torch.zeros(raw_x[0].shape[0], dtype=torch.float64)
    for a, b in zip(raw_x, raw_y, strict=True):
        a, b = a.double(), b.double()
        a_hat = a / (a.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
        b_hat = b / (b.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
        h, w = a.shape[2:]
        total += ((a_hat - b_hat) ** 2).sum(dim=(1, 2, 3)) / (h * w)
    return total.sqrt()


def test_pat_lpips_on_alexnet_equals_a_hand_computation():
    torch.manual_seed(0)
    model = build_lpips("alexnet:untrained")
    x = photo_crops((40, 48))
    y = perturbed(x, 0.1)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    def relu_outputs(images: torch.Tensor) -> list[torch.Tensor]:
        h, outputs = (images - mean) / std, []
        for layer in model.network.features:
            h = layer(h)
            if isinstance(layer, nn.ReLU):
                outputs.append(h.clone())
        return outputs

    with torch.no_grad():
        expected = pat_distance_by_hand(relu_outputs(x), relu_outputs(y))
        assert torch.allclose(model(x, y).double(), expected, rtol=1e-5)


def test_self_bounded_lpips_equals_a_hand_computation():
    classifier = small_classifier()
    model = LPIPS.from_model(classifier, layers=["network.1", "network.3"])
    x = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    y = perturbed(x, 0.1)
    net = classifier.network

    def activations(images: torch.Tensor) -> list[torch.Tensor]:
        h1 = net[1](net[0](classifier.normalize(images)))
        return [h1, net[3](net[2](h1))]

    with torch.no_grad():
        expected = pat_distance_by_hand(activations(x), activations(y))
        assert torch.allclose(model(x, y).double(), expected, rtol=1e-5)


def test_channel_normalisation_gives_unit_vectors_and_finite_gradients_at_zero():
    activations = torch.zeros(1, 4, 2, 2)
    activations[0, :, 0, 0] = torch.tensor([3.0, 4.0, 0.0, 0.0])
    activations.requires_grad_(True)
    normalised = normalize_channels(activations)
    assert torch.allclose(normalised[0, :, 0, 0], torch.tensor([0.6, 0.8, 0.0, 0.0]))
    assert torch.equal(normalised[0, :, 1, 1], torch.zeros(4))
    (grad,) = torch.autograd.grad(normalised.sum(), activations)
    assert torch.isfinite(grad).all()  # the lpips package's sqrt(sum(a²)) gives NaN here


# --------------------------------------------------------------------------- self-bounded API


def test_logits_and_features_come_from_one_pass_of_the_classifier():
    classifier = small_classifier()
    model = LPIPS.from_model(classifier, layers=["network.3", "network.1"])
    x = photo_crops((16, 16))
    logits, features = model.logits_and_features(x)
    assert torch.equal(logits, classifier(x))
    assert [f.shape[1:] for f in features] == [(16, 8, 8), (8, 16, 16)]  # order of `layers`
    assert all(torch.equal(a, b) for a, b in zip(features, model.features(x), strict=True))
    assert all(not m._forward_hooks for m in classifier.modules())  # hooks only during a pass
    assert model.description == {
        "lpips_model": "Sequential",
        "lpips_weights": "custom",
        "lpips_linear": False,
        "lpips_layers": ["network.3", "network.1"],
    }


def test_self_bounded_lpips_leaves_the_classifier_trainable():
    classifier = small_classifier()
    LPIPS.from_model(classifier, layers=["network.1"])
    assert all(p.requires_grad for p in classifier.parameters())


def test_standard_backbone_is_frozen_and_stays_in_eval_mode():
    torch.manual_seed(0)
    model = build_lpips("resnet18:untrained").train()
    assert not model.network.training
    assert not any(p.requires_grad for p in model.parameters())
    with pytest.raises(EngineError, match="from_model"):
        model.logits_and_features(photo_crops((32, 32)))


def test_lpips_follows_double():
    torch.manual_seed(0)
    model = build_lpips("alexnet:untrained", linear=True)
    x = photo_crops((48, 48))
    y = perturbed(x, 0.1)
    single = model(x, y)
    double = model.double()(x.double(), y.double())
    assert double.dtype == torch.float64
    assert torch.allclose(double.float(), single, rtol=1e-4)
    with pytest.raises(EngineError, match="lpips.to"):
        model(x, y)


def test_a_layer_run_twice_per_pass_is_refused():
    torch.manual_seed(0)
    network = torchvision.models.resnet18()
    model = LPIPS.from_model(network, layers=["layer1.0.relu"])  # used twice in a BasicBlock
    with pytest.raises(EngineError, match="more than once"):
        model.features(photo_crops((32, 32)))


# --------------------------------------------------------------------------- pairwise


def test_pairwise_distances_collects_every_distance_without_gradients():
    alex = untrained("alexnet")
    x = photo_crops((32, 32))
    y = perturbed(x, 0.1).requires_grad_(True)
    distances = pairwise_distances(x, y, {"alexnet": alex})
    assert set(distances) == {"l2", "linf", "ssim", "lpips_alexnet"}
    assert all(d.shape == (4,) and not d.requires_grad for d in distances.values())
    assert torch.allclose(distances["ssim"], ssim(x, y))
    assert torch.allclose(distances["lpips_alexnet"], alex(x, y))


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("distance", ["l2", "linf", "ssim", "lpips"])
@pytest.mark.parametrize(
    "x, y, message",
    [
        (torch.rand(3, 16, 16), torch.rand(3, 16, 16), r"\[N, 3, H, W\]"),
        (torch.rand(2, 1, 16, 16), torch.rand(2, 1, 16, 16), r"\[N, 3, H, W\]"),
        (torch.rand(2, 3, 16, 16), torch.rand(3, 3, 16, 16), "same shape"),
        (torch.rand(2, 3, 16, 16) * 255, torch.rand(2, 3, 16, 16), r"values in \[0, 1\]"),
        (torch.rand(2, 3, 16, 16) - 0.5, torch.rand(2, 3, 16, 16), r"values in \[0, 1\]"),
        (torch.zeros(2, 3, 16, 16, dtype=torch.uint8), torch.rand(2, 3, 16, 16), "float"),
    ],
    ids=["no batch", "one channel", "batch mismatch", "0-255", "negative", "integer"],
)
def test_bad_images_are_refused(distance, x, y, message):
    lpips_distance = untrained("self-bounded")
    function = {"l2": l2_distance, "linf": linf_distance, "ssim": ssim, "lpips": lpips_distance}
    with pytest.raises(EngineError, match=message):
        function[distance](x, y)


def test_unknown_backbone_is_refused():
    with pytest.raises(EngineError, match="unknown network 'lenet'"):
        build_lpips("lenet")


def test_linear_calibration_only_for_alexnet_and_vgg16():
    with pytest.raises(EngineError, match="linear.*resnet18"):
        build_lpips("resnet18:untrained", linear=True)


def test_unknown_self_bounded_layer_lists_valid_names():
    with pytest.raises(EngineError, match="unknown LPIPS layer 'network.9'.*network.1") as error:
        LPIPS.from_model(small_classifier(), layers=["network.9"])
    assert "network.0" in str(error.value)


@pytest.mark.parametrize("layers", [[], "network.1", ["network.1", "network.1"]])
def test_layers_must_be_a_list_of_distinct_names(layers):
    with pytest.raises(EngineError, match="distinct layer names"):
        LPIPS.from_model(small_classifier(), layers=layers)


@pytest.mark.parametrize("linear", [False, True])
def test_missing_pretrained_weights_raise_a_clear_error(monkeypatch, tmp_path, linear):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    # torchvision imports the function by name, so patch its reference as well.
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsUnavailableError) as error:
        build_lpips("alexnet", linear=linear)
    message = str(error.value)
    assert "alexnet" in message and str(tmp_path) in message and "untrained" in message
