"""The hand-written LPIPS tangent pass (issue 14) against autograd and finite differences.

``LPIPS.feature_tangents`` reuses the recorded forward's ReLU masks and max-pool indices to
give ``J v`` at about one forward pass. Oracles: forward-mode AD (``torch.func.jvp``),
reverse-over-reverse AD (the double-backward product the attacks used before), and central
finite differences of a float64 copy of the network (loosely: kinks). Then the attacks: with
the tangent pass and with the AD paths (``EXACT_TANGENT_PASS = False``) they return the same
images; PPGD's conjugate-gradient skip for zero-gradient images changes nothing.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from engine.architectures import build_architecture
from engine.attacks import parse_attack
from engine.attacks import perceptual as perceptual_module
from engine.attacks.perceptual import LpipsBall, jtj_operator
from engine.data import load_sources
from engine.distances import LPIPS, EngineError, TangentUnsupported, build_lpips, flatten_features
from engine.models import load_classifier

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def photos() -> Tensor:
    sources = load_sources("skimage", size=64, crops_per_image=1, seed=0)
    return torch.stack([s.tensor() for s in sources[:3]])


def _flat(lpips: LPIPS):
    return lambda x: flatten_features(lpips.features(x, check=False))


def _relative(a: Tensor, b: Tensor) -> float:
    return float(((a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)).max())


def _direction(like: Tensor, seed: int = 1) -> Tensor:
    return torch.randn(like.shape, generator=torch.Generator().manual_seed(seed))


def _tangent(lpips: LPIPS, x: Tensor, v: Tensor) -> Tensor:
    _, _, record = lpips.features_recorded(x)
    assert record.unsupported is None, record.unsupported
    return flatten_features(lpips.feature_tangents(v, record))


def _self_bounded(arch: str) -> LPIPS:
    torch.manual_seed(0)
    model = load_classifier(f"{arch}:untrained")
    layers = parse_attack(  # the attacks' own layer choice
        "fast_lpa:bound=0.5,lpips_model=self")._self_layers(model)
    return LPIPS.from_model(model, layers)


BACKBONES = {
    # name: (builder, image size) — every LPIPS layout build_lpips supports, plus the
    # self-bounded classifier (logits from the same recorded pass).
    "alexnet": (lambda: build_lpips("alexnet:untrained"), 64),
    "alexnet-linear": (lambda: build_lpips("alexnet:untrained", linear=True), 64),
    "vgg16": (lambda: build_lpips("vgg16:untrained"), 32),
    "resnet18": (lambda: build_lpips("resnet18:untrained"), 64),
    "resnet50": (lambda: build_lpips("resnet50:untrained"), 32),
    "self-alexnet": (lambda: _self_bounded("alexnet"), 64),
}


@pytest.mark.parametrize("name", BACKBONES)
def test_tangent_pass_matches_forward_mode_and_double_backward_ad(name, photos):
    build, size = BACKBONES[name]
    lpips = build()
    x = torch.nn.functional.interpolate(photos, size=(size, size), mode="bilinear",
                                        align_corners=False).clamp(0, 1)
    v = _direction(x)
    tangent = _tangent(lpips, x, v)
    _, forward_mode = torch.func.jvp(_flat(lpips), (x,), (v,))
    assert _relative(tangent, forward_mode) < 1e-5, _relative(tangent, forward_mode)
    # Reverse-over-reverse (double backward) Jv: the oracle of PPGD's CG products.
    leaf = x.clone().requires_grad_(True)
    phi = _flat(lpips)(leaf)
    dummy = torch.zeros_like(phi, requires_grad=True)
    (transposed,) = torch.autograd.grad(phi, leaf, dummy, create_graph=True)
    (double_backward,) = torch.autograd.grad(transposed, dummy, v)
    assert _relative(tangent, double_backward) < 1e-5, _relative(tangent, double_backward)
    # ... and the Gauss-Newton product JᵀJv built on it agrees with the AD-only one.
    with_tangent = jtj_operator(phi, leaf, lambda u: _tangent(lpips, x, u))(v)
    with_ad = jtj_operator(phi, leaf)(v)
    assert _relative(with_tangent, with_ad) < 1e-5


def test_tangent_pass_matches_float64_finite_differences():
    """Random images (photographs have flat regions: exact max-pool ties, where FD and any
    derivative rule disagree). ReLU kinks within ±h·|v| of a pre-activation spoil a central
    difference (measured: 7e-3 at h = 1e-6); at h = 1e-7 in float64 none is crossed."""
    lpips = copy.deepcopy(build_lpips("alexnet:untrained")).double()
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 64, 64, generator=generator, dtype=torch.float64)
    v = torch.randn(x.shape, generator=generator, dtype=torch.float64)
    tangent = _tangent(lpips, x, v)
    h = 1e-7
    features = _flat(lpips)
    central = (features(x + h * v) - features(x - h * v)) / (2 * h)
    assert _relative(tangent, central) < 1e-6, _relative(tangent, central)
    # The masks matter: the same pass with every ReLU passing everything is far off.
    unmasked = _tangent_without_masks(lpips, x, v)
    assert _relative(unmasked, central) > 0.1


def _tangent_without_masks(lpips: LPIPS, x: Tensor, v: Tensor) -> Tensor:
    """The tangent pass with all-ones ReLU masks (a deliberately wrong linearisation)."""
    _, _, record = lpips.features_recorded(x)
    for module, tensors in record.patterns.items():
        if type(module) is nn.ReLU:
            record.patterns[module] = [torch.ones_like(t) for t in tensors]
    record._versions = []
    return flatten_features(lpips.feature_tangents(v, record))


def test_linearization_subset_equals_the_rows_of_the_whole(photos):
    lpips = build_lpips("alexnet:untrained")
    v = _direction(photos)
    _, _, record = lpips.features_recorded(photos)
    whole = flatten_features(lpips.feature_tangents(v, record))
    rows = torch.tensor([2, 0])
    part = flatten_features(lpips.feature_tangents(v[rows], record.subset(rows)))
    torch.testing.assert_close(part, whole[rows], rtol=0, atol=0)
    with pytest.raises(EngineError, match="recorded for 3"):
        lpips.feature_tangents(v[:2], record)


def test_in_place_change_after_the_recorded_pass_is_refused(photos):
    lpips = build_lpips("alexnet:untrained")
    _, _, record = lpips.features_recorded(photos)
    next(iter(record.layers.values())).mul_(2)  # someone edits a recorded activation
    with pytest.raises(EngineError, match="modified in place"):
        lpips.feature_tangents(_direction(photos), record)


class _Gelu(nn.Module):
    """A network with a nonlinearity the tangent pass has no rule for."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv2(self.act(self.conv(x)))


def test_unsupported_layers_fall_back_to_ad_and_say_so(photos):
    torch.manual_seed(0)
    network = _Gelu()
    lpips = LPIPS(network, ["act", "conv2"])
    _, _, record = lpips.features_recorded(photos)
    assert "_Gelu" in record.unsupported  # the container: its forward code is unknown
    with pytest.raises(TangentUnsupported):
        lpips.feature_tangents(_direction(photos), record)
    ball = LpipsBall(None, lpips, photos, self_bounded=False)
    perceptual_module._FALLBACK_WARNED.clear()
    v = _direction(photos)
    with pytest.warns(RuntimeWarning, match="fall back to autograd"):
        fallback = ball.tangent(v, record, photos)
    _, expected = torch.func.jvp(_flat(lpips), (photos,), (v,))
    torch.testing.assert_close(fallback, expected)


def test_engine_resnet_blocks_with_functional_relu_are_refused():
    """The engine's training ResNet calls torch.relu inside its blocks: no module to record,
    so its blocks must not be taken as linear containers."""
    model = build_architecture("resnet18", 10)
    lpips = LPIPS.from_model(model, list(model.lpips_layers))
    x = torch.rand(2, 3, 32, 32)
    model.eval()
    _, _, record = lpips.features_recorded(x, logits=True)
    assert record.unsupported is not None
    assert "ResNet" in record.unsupported or "BasicBlock" in record.unsupported


def test_batch_norm_in_training_mode_is_refused(photos):
    lpips = build_lpips("resnet18:untrained")
    lpips.network.train()  # bypass the frozen wrapper: batch statistics make J batch-wide
    _, _, record = lpips.features_recorded(photos)
    assert "training mode" in record.unsupported


def test_engine_training_networks_supported(photos):
    """Self-bounded PAT trains the engine's tiny CNN and CIFAR AlexNet: exact tangents."""
    for arch in ("tiny", "alexnet_cifar"):
        torch.manual_seed(0)
        model = build_architecture(arch, 10).eval()
        lpips = LPIPS.from_model(model, list(model.lpips_layers))
        x = torch.nn.functional.interpolate(photos, size=(32, 32), mode="bilinear",
                                            align_corners=False).clamp(0, 1)
        v = _direction(x)
        _, _, record = lpips.features_recorded(x, logits=True)
        assert record.unsupported is None, (arch, record.unsupported)
        tangent = flatten_features(lpips.feature_tangents(v, record))
        _, expected = torch.func.jvp(_flat(lpips), (x,), (v,))
        assert _relative(tangent, expected) < 1e-5


# ------------------------------------------------------------------------ the attacks


@pytest.fixture()
def ad_oracle(monkeypatch):
    """Run the attacks on the autograd paths (forward-mode slopes, double-backward CG)."""
    def use(flag: bool) -> None:
        monkeypatch.setattr(perceptual_module, "EXACT_TANGENT_PASS", flag)
    return use


@pytest.mark.parametrize("spec", [
    "fast_lpa:bound=0.5,num_iterations=4,lpips_model=alexnet:untrained",
    "fast_lpa:bound=0.5,num_iterations=4,lpips_model=self",
    "lpa:bound=0.5,num_iterations=3,num_lambdas=2,early_stop=false,"
    "lpips_model=alexnet:untrained",
    "ppgd:bound=0.5,num_iterations=3,early_stop=false,lpips_model=alexnet:untrained",
    "ppgd:bound=0.5,num_iterations=2,early_stop=false,lpips_model=self",
])
def test_attacks_with_the_tangent_pass_equal_the_ad_oracle(spec, photos, ad_oracle):
    """In float64, where the two paths' rounding cannot be amplified: in float32 the CG
    solve of PPGD with ``lpips_model=self`` and 300× logits turned a rounding difference
    between CPU kernels into 4.5e-3 on an AVX2 CPU (2e-4 on AVX-512), while in float64 the
    two paths agree to 4e-16 on both — the same mathematics."""
    torch.manual_seed(3)
    classifier = load_classifier("alexnet:untrained").double()
    photos = photos.double()
    with torch.no_grad():  # scale the logits up: trained-like margins, gradients that matter
        last = classifier.network.classifier[-1]
        last.weight.mul_(300)
        last.bias.mul_(300)
        labels = classifier(photos).argmax(1)
    results = {}
    for flag in (True, False):
        ad_oracle(flag)
        attack = parse_attack(spec)
        results[flag] = attack(classifier, photos, labels,
                               generator=torch.Generator().manual_seed(0))
    moved = (results[True].adversarial - photos).abs().amax()
    assert moved > 1e-3  # the attack did move: the comparison is not between two no-ops
    assert results[True].adversarial.dtype == torch.float64
    torch.testing.assert_close(results[True].adversarial, results[False].adversarial,
                               atol=1e-9, rtol=0)


def test_ppgd_skips_cg_for_zero_gradient_images_with_an_unchanged_result(photos, monkeypatch):
    """kappa=0 clamps the margin of already-misclassified images at 0: their gradient is
    exactly zero. Half the labels are wrong, so half the batch has nothing to solve."""
    torch.manual_seed(3)
    classifier = load_classifier("alexnet:untrained")
    with torch.no_grad():
        predicted = classifier(photos).argmax(1)
    labels = predicted.clone()
    labels[::2] = (labels[::2] + 1) % 1000  # misclassified from the start: zero gradient
    spec = ("ppgd:bound=0.5,num_iterations=3,kappa=0,early_stop=false,"
            "lpips_model=alexnet:untrained")
    batches: dict[bool, list[int]] = {}
    outputs = {}
    for skip in (True, False):
        monkeypatch.setattr(perceptual_module, "CG_SKIP_ZERO_GRADIENT", skip)
        attack = parse_attack(spec)
        lpips = attack.lpips_network(photos)
        seen: list[int] = []
        conv = lpips.network.features[0]
        handle = conv.register_forward_hook(lambda m, i, o, s=seen: s.append(o.shape[0]))
        try:
            outputs[skip] = attack(classifier, photos, labels,
                                   generator=torch.Generator().manual_seed(0)).adversarial
        finally:
            handle.remove()
        batches[skip] = seen
    # With the skip, one forward and CG's 5 tangent passes ran on the one correctly labelled
    # image instead of 5 tangent passes on the whole batch (at least in the first iteration;
    # once that image is misclassified too, no image needs CG at all).
    n = photos.shape[0]
    assert batches[True].count(1) - batches[False].count(1) >= 6, batches
    assert batches[False].count(n) - batches[True].count(n) >= 5, batches
    torch.testing.assert_close(outputs[True], outputs[False], atol=1e-5, rtol=0)
    moved = (outputs[True][1] - photos[1]).abs().amax()
    assert moved > 1e-3  # the correctly labelled image was attacked
    assert torch.equal(outputs[True][0], outputs[False][0])
