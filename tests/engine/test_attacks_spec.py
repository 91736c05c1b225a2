"""engine.attacks.spec: grammar, named bounds (PAT table 4), labels and expansion."""

from __future__ import annotations

import math
import types

import numpy as np
import pytest
import torch

from engine.attacks import parse_attack
from engine.attacks.spec import (
    BOUND_PRESETS,
    bound_label,
    check_label,
    expand_specs,
    has_param,
    join_params,
    ladder_specs,
    split_bound,
    split_spec,
    threat_model_of,
    with_params,
)
from engine.errors import EngineError, WeightsUnavailableError
from engine.models import build_backbone, parse_network


def test_presets_are_declared_read_only():
    assert isinstance(BOUND_PRESETS, types.MappingProxyType)
    with pytest.raises(TypeError):
        BOUND_PRESETS["ppgd"]["medium"] = 1.0  # type: ignore[index]
    assert BOUND_PRESETS["lpips_oa"] == BOUND_PRESETS["linf"]
    assert BOUND_PRESETS["lagrangian"] == {"cifar10": 0.15}
    assert math.isclose(BOUND_PRESETS["l2"]["large"], 2400 / 255)


def test_named_perceptual_bounds_are_alexnet_bounded():
    for name in ("ppgd", "lpa", "fast_lpa"):
        attack = parse_attack(f"{name}:bound=medium")
        assert attack.lpips_model == "alexnet:pretrained" and attack.bound == 0.5
        untrained = parse_attack(f"{name}:bound=large,lpips_model=alexnet:untrained")
        assert untrained.lpips_model == "alexnet:untrained"
        assert "lpips_model=alexnet:untrained" in untrained.spec  # recorded
    # numbers are free to use any LPIPS network
    assert parse_attack("ppgd:bound=0.5,lpips_model=self").self_bounded
    assert parse_attack("lpa:bound=0.5").lpips_model == "self"


@pytest.mark.parametrize("spec,expected", [
    ("ppgd:bound=medium,lpips_model=self", ["self-bounded", "half", "alexnet", "numeric"]),
    ("lpa:bound=small,lpips_model=vgg16", ["vgg16", "alexnet", "table-4"]),
    ("fast_lpa:bound=cifar10", ["CIFAR-10", "alexnet_cifar:/path/to/weights.pt"]),
    ("ppgd:bound=cifar10,lpips_model=alexnet", ["alexnet_cifar", "table-2"]),
    ("ppgd:bound=0.3@", ["label after '@'"]),
    ("ppgd:bound=medium@x", ["named bound takes no label"]),
    ("ppgd:bound=abc@x", ["bound must be a number"]),
    ("ppgd:bound=0.5,,x=1", ["stray ','"]),
    (":bound=0.5", ["no attack name"]),
])
def test_spec_errors_explain(spec, expected):
    with pytest.raises(EngineError) as error:
        parse_attack(spec)
    for text in expected:
        assert text in str(error.value), (text, str(error.value))


def test_grammar_and_labels():
    name, pieces = split_spec("linf:bound=8/255,num_iterations=4")
    assert name == "linf" and pieces == [("bound", "8/255"), ("num_iterations", "4")]
    assert split_bound("0.31@human_medium") == ("0.31", "human_medium")
    assert split_bound("Medium") == ("Medium", "medium")
    assert bound_label("ppgd:bound=0.31@human_medium") == "human_medium"
    assert bound_label("linf:bound=small") == "small"
    assert bound_label("linf:bound=0.1") == ""
    labelled = parse_attack("ppgd:bound=0.31@human_medium,lpips_model=self")
    assert labelled.bound == 0.31 and "@" not in labelled.spec


def test_expand_specs_by_names_numbers_and_labels():
    out = expand_specs(["linf", "ppgd:num_iterations=3"],
                       ["small", "8/255", ("human_medium", 0.31), "0.2@h"])
    assert out == (
        "linf:bound=small", "linf:bound=8/255", "linf:bound=0.31@human_medium",
        "linf:bound=0.2@h",
        "ppgd:bound=small,num_iterations=3", "ppgd:bound=8/255,num_iterations=3",
        "ppgd:bound=0.31@human_medium,num_iterations=3", "ppgd:bound=0.2@h,num_iterations=3",
    )
    assert parse_attack(out[4]).lpips_model == "alexnet:pretrained"
    assert parse_attack(out[5]).lpips_model == "self"
    with pytest.raises(EngineError, match="sets bound itself"):
        expand_specs(["linf:bound=0.1"], ["small"])
    with pytest.raises(EngineError, match="half"):
        expand_specs(["ppgd:lpips_model=self"], ["medium"])
    assert expand_specs(["linf:bound=0.1"], None) == ("linf:bound=0.1",)


def test_alexnet_cifar_network_spec(tmp_path):
    spec = parse_network("alexnet_cifar:" + str(tmp_path / "Weights.pt"))
    assert spec.path.endswith("Weights.pt") and str(spec).startswith("alexnet_cifar:/")
    with pytest.raises(WeightsUnavailableError, match="not found"):
        build_backbone(spec)
    with pytest.raises(EngineError, match="weights file"):
        parse_network("alexnet_cifar")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        network = build_backbone("alexnet_cifar:untrained")
    path = tmp_path / "Weights.pt"
    torch.save({"model": {f"model.{k}": v for k, v in network.state_dict().items()}}, path)
    loaded = build_backbone(spec)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), network(x))
    attack = parse_attack(f"ppgd:bound=cifar10,lpips_model=alexnet_cifar:{path}")
    assert attack.lpips_model == f"alexnet_cifar:{path}"
    lpips = attack.lpips_network(x)
    assert lpips.description["lpips_weights"] == str(path)
    assert len(lpips.layers) == 5


def test_iteration_profiles():
    assert parse_attack("ppgd:bound=medium,iterations=pat").num_iterations == 40
    assert parse_attack("lpa:bound=medium,iterations=pat").num_iterations == 40
    assert parse_attack("linf:bound=small,iterations=pat").num_iterations == 200
    stadv = parse_attack("stadv:bound=medium,iterations=pat")
    assert stadv.num_iterations == 200 and "num_iterations=200" in stadv.spec
    assert parse_attack("jpeg:bound=small,iterations=pat_train").num_iterations == 10
    with pytest.raises(EngineError, match="both iterations=pat and num_iterations"):
        parse_attack("linf:bound=small,iterations=pat,num_iterations=3")
    with pytest.raises(EngineError, match="takes a profile: pat, pat_train"):
        parse_attack("linf:bound=small,iterations=paper")
    with pytest.raises(EngineError, match="no count for 'lagrangian'"):
        parse_attack("lagrangian:bound=cifar10,iterations=pat")


def test_adam_defaults_are_pats_learning_rates():
    assert parse_attack("stadv:bound=medium,optimizer=adam").step_size == 0.01
    assert parse_attack("recoloradv:bound=medium,optimizer=adam").step_size == 0.001
    assert parse_attack("stadv:bound=medium,num_iterations=10").step_size == pytest.approx(
        2.5 * 0.05 / 10)
    with pytest.raises(EngineError, match="sign, adam"):
        parse_attack("stadv:bound=medium,optimizer=sgd")


@pytest.mark.parametrize("name,extra", [("stadv", "flow_linf"), ("recoloradv", "lattice_linf")])
def test_adam_parametric_attacks_stay_in_bound_and_succeed(digits_model, digits_batch, name,
                                                           extra):
    images, labels = digits_batch
    images, labels = images[:16], labels[:16]
    resolution = ",resolution_x=4,resolution_y=4,resolution_z=4" if name == "recoloradv" else ""
    bound = 0.1 if name == "stadv" else 0.12
    results = {}
    for optimizer in ("sign", "adam"):
        lr = ",step_size=0.02" if optimizer == "adam" else ""
        attack = parse_attack(f"{name}:bound={bound},num_iterations=10,optimizer={optimizer}"
                              f"{lr}{resolution}")
        result = attack(digits_model, images, labels, generator=torch.Generator().manual_seed(0))
        assert bool((result.extras[extra] <= bound * (1 + 1e-6)).all())
        assert result.adversarial.min() >= 0 and result.adversarial.max() <= 1
        results[optimizer] = result
    # the two optimisers take different paths, and Adam attacks too
    assert not torch.equal(results["sign"].adversarial, results["adam"].adversarial)
    clean_margin = torch.nn.functional.cross_entropy(
        digits_model(images), labels, reduction="none")
    adam_margin = torch.nn.functional.cross_entropy(results["adam"].logits, labels,
                                                    reduction="none")
    assert float(adam_margin.mean()) > float(clean_margin.mean())


def test_parametric_adam_steps_match_torch_optim_adam():
    from engine.attacks.base import parametric_ascent

    attack = parse_attack("stadv:bound=1,num_iterations=4,optimizer=adam,loss=ce")
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 5).double()
    model = lambda x: linear(x.flatten(1))  # noqa: E731
    labels = torch.tensor([1, 3])
    start = torch.rand(2, 3, 4, 4, dtype=torch.float64)
    seen = []

    def project(params):
        seen.append(params.detach().clone())
        return params.detach(), params.detach()

    parametric_ascent(attack, model, labels, start, project=project,
                      render=lambda params, _: params, optimizer="adam")
    reference = start.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([reference], lr=attack.step_size, maximize=True)
    for step in range(attack.num_iterations):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(reference), labels, reduction="sum").backward()
        optimizer.step()
        assert torch.allclose(seen[step + 1], reference.detach(), atol=1e-12), step


def test_jpeg_chroma_subsampling_transform_and_attack(digits_model, digits_batch):
    from engine.attacks.jpeg import JPEGTransform

    torch.manual_seed(0)
    transform = JPEGTransform(16, 16, dtype=torch.float64, subsample=True)
    like = torch.zeros(2, 3, 16, 16, dtype=torch.float64)
    delta = (torch.rand(2, 3, 16, 16, dtype=torch.float64) * 2 - 1) * transform.mask(like)
    pixels = transform.pixels(delta)
    # chroma changes are constant over 2×2 pixels, and the transform round-trips
    ycbcr = torch.einsum("ij,njhw->nihw", transform.to_ycbcr, pixels)
    assert torch.allclose(ycbcr[:, 1:, ::2, ::2], ycbcr[:, 1:, 1::2, 1::2], atol=1e-12)
    assert torch.allclose(transform.coefficients(pixels), delta, atol=1e-10)
    assert torch.equal(transform.pixels(torch.zeros_like(delta)), torch.zeros_like(pixels))
    with pytest.raises(EngineError, match="multiples of 16"):
        JPEGTransform(24, 24, subsample=True)

    images, labels = digits_batch
    images, labels = images[:8], labels[:8]
    for projection in ("exact", "clip"):
        attack = parse_attack(f"jpeg:bound=0.5,num_iterations=5,chroma_subsampling=true,"
                              f"projection={projection}")
        result = attack(digits_model, images, labels, generator=torch.Generator().manual_seed(0))
        assert bool((result.extras["coefficient_linf"] <= 0.5 * (1 + 1e-5)).all())
        if projection == "exact":
            size = attack.perturbation_size(images, result.adversarial)
            assert bool((size <= 0.5 * (1 + 1e-4)).all()), size
    plain = parse_attack("jpeg:bound=0.5,num_iterations=5")
    assert plain.chroma_subsampling is False


def test_ladder_specs_are_log_spaced_labelled_and_levelled():
    specs, levels = ladder_specs(["linf:num_iterations=2", "l2"], ["0.01", "0.16"], 5)
    linf = [parse_attack(s).bound for s in specs if threat_model_of(s) == "linf"]
    assert np.allclose(linf, [0.01, 0.02, 0.04, 0.08, 0.16])
    assert [bound_label(s) for s in specs[:5]] == ["L0", "L1", "L2", "L3", "L4"]
    assert [levels[s] for s in specs] == [0, 1, 2, 3, 4] * 2
    named, _ = ladder_specs(["linf"], ["small", "large"], 3)
    assert parse_attack(named[0]).bound == pytest.approx(parse_attack("linf:bound=small").bound)
    default, _ = ladder_specs(["linf"], None, 2)  # half the small to twice the large bound
    assert parse_attack(default[-1]).bound == pytest.approx(16 / 255)
    for bad, message in ((["linf"], None, 1), "at least 2 levels"), (
            (["linf"], ["1", "2", "3"], 3), "LOW,HIGH"), (
            (["linf"], ["0.2", "0.1"], 3), "0 < low < high"), (
            (["linf:bound=0.1"], ["0.01", "0.1"], 3), "sets bound itself"):
        with pytest.raises(EngineError, match=message):
            ladder_specs(*bad)


def test_with_params_and_join_params_keep_the_grammar():
    assert with_params("linf:bound=0.1@x,num_iterations=5", bound=0.2) == (
        "linf:bound=0.2,num_iterations=5")
    assert with_params("ppgd:bound=0.5", lpips_layers="a+b") == "ppgd:bound=0.5,lpips_layers=a+b"
    assert join_params("linf", "num_iterations=40") == "linf:num_iterations=40"
    assert join_params("linf", "") == "linf"
    assert has_param("ppgd:bound=0.5,lpips_layers=a", "lpips_layers")
    assert not has_param("ppgd:bound=0.5", "lpips_layers")
    with pytest.raises(EngineError, match="no '='"):
        join_params("linf", "num_iterations")
    assert check_label("human_medium") == "human_medium"
    with pytest.raises(EngineError, match="one word"):
        check_label("two words")
