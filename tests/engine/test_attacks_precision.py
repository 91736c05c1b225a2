"""The LPIPS geometry of the perceptual attacks is exact under reduced precision (issue 7).

Oracles: a float64 copy of the same LPIPS network (Jacobian-vector products by forward- and
reverse-mode AD in float64), and the attacks' own float32 runs on the same inputs and seed.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import Tensor

from engine.attacks import parse_attack
from engine.attacks.perceptual import _build_external_lpips, jtj_operator, lpips_slope
from engine.data import load_sources
from engine.distances import LPIPS, exact_precision, flatten_features
from engine.models import load_classifier

pytestmark = pytest.mark.usefixtures("single_torch_thread")

LOGIT_SCALE = 300.0  # as bench/attacks.py --logit-scale 300: trained-like logit magnitudes


def _features(lpips: LPIPS):
    def features(x: Tensor) -> Tensor:
        return flatten_features(lpips.features(x, check=False))
    return features


@pytest.fixture(scope="module")
def alexnet_lpips() -> LPIPS:
    return _build_external_lpips("alexnet:untrained")


@pytest.fixture(scope="module")
def photos() -> Tensor:
    sources = load_sources("skimage", size=64, crops_per_image=1, seed=0)
    return torch.stack([s.tensor() for s in sources[:4]])


def _reference_products(lpips: LPIPS, x: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """float64 ``Jv`` and ``JᵀJv`` of the same network (forward mode, then reverse mode)."""
    lpips64 = copy.deepcopy(lpips).double()
    features = _features(lpips64)
    x64, v64 = x.double(), v.double()
    _, jv = torch.func.jvp(features, (x64,), (v64,))
    _, vjp = torch.func.vjp(features, x64)
    (jtj,) = vjp(jv)
    return jv, jtj


def _relative(a: Tensor, b: Tensor) -> float:
    return float(((a.double() - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)).max())


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_slope_and_gauss_newton_product_match_float64(alexnet_lpips, photos, autocast):
    x = photos
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    v = v / v.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    jv_ref, jtj_ref = _reference_products(alexnet_lpips, x, v)
    features = _features(alexnet_lpips)
    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else exact_precision()
    with context:
        slope = lpips_slope(features, x, v)
        leaf = x.clone().requires_grad_(True)
        phi = flatten_features(alexnet_lpips.features(leaf, check=False)) if not autocast \
            else None
        if phi is None:  # under autocast the attack's ball computes φ in full precision
            with exact_precision():
                phi = features(leaf)
        product = jtj_operator(phi, leaf)(v)
    assert slope.dtype == torch.float32 and product.dtype == torch.float32
    slope_error = float(((slope.double() - jv_ref.norm(dim=1)).abs()
                         / jv_ref.norm(dim=1)).max())
    assert slope_error < 1e-3, slope_error
    assert _relative(product, jtj_ref) < 1e-3, _relative(product, jtj_ref)


def test_reduced_precision_features_would_be_far_off(alexnet_lpips, photos):
    """The oracle can tell: bf16 features (what autocast gives without exact_precision)
    put a finite-difference slope way off — the failure this issue fixes."""
    x = photos
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    v = v / v.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    jv_ref, _ = _reference_products(alexnet_lpips, x, v)
    features = _features(alexnet_lpips)
    h = 1e-3
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fd = (features(x + h * v) - features(x)).float().norm(dim=1) / h
    assert float(((fd.double() - jv_ref.norm(dim=1)).abs() / jv_ref.norm(dim=1)).max()) > 0.1


@pytest.fixture(scope="module")
def scaled_alexnet(photos):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        classifier = load_classifier("alexnet:untrained")
    with torch.no_grad():
        last = [m for m in classifier.modules() if isinstance(m, torch.nn.Linear)][-1]
        last.weight.mul_(LOGIT_SCALE)
        last.bias.mul_(LOGIT_SCALE)
        labels = classifier(photos).argmax(dim=1)
    return classifier, labels


@pytest.mark.parametrize("spec", [
    "ppgd:bound=0.5,num_iterations=5,lpips_model=alexnet:untrained",
    "lpa:bound=0.5,num_iterations=5,num_lambdas=2,lpips_model=alexnet:untrained",
])
def test_bf16_autocast_attacks_as_strong_as_fp32(scaled_alexnet, photos, spec):
    classifier, labels = scaled_alexnet
    attack = parse_attack(spec)
    runs = {}
    for name, context in (("fp32", exact_precision()),
                          ("bf16", torch.autocast("cpu", dtype=torch.bfloat16))):
        with context:
            result = attack(classifier, photos, labels,
                            generator=torch.Generator().manual_seed(0))
        size = attack.perturbation_size(photos, result.adversarial)
        runs[name] = (result, size)
    (fp32, size32), (bf16, size16) = runs["fp32"], runs["bf16"]
    assert bool((size16 <= 0.5 * (1 + 1e-5)).all()), size16
    assert float(size16.mean()) >= 0.9 * float(size32.mean()), (size16, size32)
    assert float(bf16.success.float().mean()) >= float(fp32.success.float().mean())


@pytest.mark.parametrize("name", ["ppgd", "lpa"])
def test_early_exit_is_verified_in_fp32_on_the_returned_point(scaled_alexnet, photos, name):
    classifier, labels = scaled_alexnet
    rounds = ",num_lambdas=2" if name == "lpa" else ""
    spec = f"{name}:bound=0.5,num_iterations=4{rounds},lpips_model=alexnet:untrained"
    total = 4 * (2 if name == "lpa" else 1)
    eager = parse_attack(spec)
    full = parse_attack(spec + ",early_stop=false")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = eager(classifier, photos, labels, generator=torch.Generator().manual_seed(0))
    finished = result.extras["finished_iteration"]
    assert finished.shape == (4,) and finished.dtype == torch.long
    assert bool((finished >= 0).all()) and bool((finished <= total).all())
    early = finished < total
    assert bool(early.any()), finished  # the ×300 logits make these easy: most finish early
    with torch.no_grad():  # full precision, the returned points
        logits = classifier(result.adversarial)
        size = eager.perturbation_size(photos, result.adversarial)
    assert bool((logits.argmax(1)[early] != labels[early]).all())
    assert bool((size <= 0.5 * (1 + 1e-5)).all())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        slow = full(classifier, photos, labels, generator=torch.Generator().manual_seed(0))
    assert bool((slow.extras["finished_iteration"] == total).all())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("autocast", [None, torch.bfloat16, torch.float16],
                         ids=["default-flags", "bf16-autocast", "fp16-autocast"])
def test_cuda_slope_and_gauss_newton_product_match_float64(alexnet_lpips, photos, autocast):
    """On CUDA with PyTorch's default flags (TF32 convolutions) and under autocast."""
    cuda = copy.deepcopy(alexnet_lpips).cuda()
    x = photos.cuda()
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).cuda()
    v = v / v.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    jv_ref, jtj_ref = _reference_products(alexnet_lpips, photos, v.cpu())
    features = _features(cuda)
    assert torch.backends.cudnn.allow_tf32  # PyTorch's default, which exact_precision overrides
    context = (torch.autocast("cuda", dtype=autocast) if autocast is not None
               else contextlib.nullcontext())
    with context:
        slope = lpips_slope(features, x, v)
        leaf = x.clone().requires_grad_(True)
        with exact_precision():
            phi = features(leaf)
        product = jtj_operator(phi, leaf)(v)
    slope_error = float(((slope.double().cpu() - jv_ref.norm(dim=1)).abs()
                         / jv_ref.norm(dim=1)).max())
    assert slope_error < 1e-3, slope_error
    assert _relative(product.cpu(), jtj_ref) < 1e-3
    assert torch.backends.cudnn.allow_tf32  # restored
