"""engine.attacks.spec: grammar, named bounds (PAT table 4), labels and expansion."""

from __future__ import annotations

import math
import types

import pytest
import torch

from engine.attacks import parse_attack
from engine.attacks.spec import (
    BOUND_PRESETS,
    bound_label,
    expand_specs,
    split_bound,
    split_spec,
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
