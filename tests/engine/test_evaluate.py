"""engine.evaluate: union accuracy, unseen mean, AutoAttack, sanity checks, calibrated bounds."""

from __future__ import annotations

import json
import re

import pytest
import torch
from torch import nn

from engine.attacks import parse_attack
from engine.datasets import load_dataset
from engine.errors import EngineError
from engine.evaluate import (
    SANITY_NOTE,
    autoattack_correct,
    check_calibrated_bounds,
    evaluate_model,
    load_calibrated_bounds,
    perceptibility_matched,
    sanity_checks,
    write_perceptibility,
    write_table,
)
from engine.train import TrainConfig, load_model, train


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", image_size=16)


@pytest.fixture(scope="module")
def model(tmp_path_factory, digits):
    out = tmp_path_factory.mktemp("run")
    return load_model(train(TrainConfig(out=str(out), epochs=3, progress=False), digits))


SPECS = ["linf:bound=0.05,num_iterations=5", "l2:bound=0.5,num_iterations=5",
         "stadv:bound=0.05,num_iterations=5"]


def test_union_is_at_most_every_per_threat_accuracy(model, digits):
    ev = evaluate_model(model, digits.test, SPECS, limit=60, seen=("linf",), progress=False)
    row = ev.row()
    per_threat = [row[k] for k in ev.correct]
    assert row["union"] <= min(per_threat) <= row["clean"]
    assert row["union"] < max(per_threat)  # different threat models break different images
    assert ev.seen == ("linf 0.05",)
    assert row["unseen_mean"] == pytest.approx((row["l2 0.5"] + row["stadv 0.05"]) / 2)


def test_self_bounded_perceptual_spec_uses_the_classifier_layers(model, digits):
    ev = evaluate_model(model, digits.test, ["fast_lpa:bound=0.5,num_iterations=3"], limit=20,
                        progress=False)
    assert "lpips_layers=network.relu1+network.relu2+network.relu3" in ev.specs["fast_lpa 0.5"]


def test_columns_are_described_structurally(model, digits):
    ev = evaluate_model(model, digits.test, ["linf:bound=small,num_iterations=2",
                                             "l2:bound=0.5@mine,num_iterations=2"], limit=10,
                        progress=False)
    info = ev.column_info()
    assert set(info) == set(ev.row()) - {"model", "dataset", "images"}
    linf, l2 = (info[c] for c in ev.correct)
    assert (linf["kind"], linf["threat_model"], linf["label"]) == ("attack", "linf", "small")
    assert linf["bound"] == pytest.approx(2 / 255)
    assert (l2["threat_model"], l2["bound"], l2["label"]) == ("l2", 0.5, "mine")
    assert parse_attack(l2["spec"]).spec == l2["spec"]
    assert info["union"]["kind"] == "union" and info["union"]["bound"] is None


def test_autoattack_is_no_weaker_than_clean(model, digits):
    images = torch.stack([digits.test[i][0] for i in range(20)])
    labels = torch.tensor([int(digits.test[i][1]) for i in range(20)])
    clean = model(images).argmax(1) == labels
    robust = autoattack_correct(model, images, labels, "linf", 0.1, version="fast")
    assert not (robust & ~clean).any()
    assert robust.sum() < clean.sum()


class _Masked(nn.Module):
    """Gradient masking: rounds the input, so every input gradient is zero."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(torch.round(x * 4) / 4)


def test_sanity_checks_pass_on_a_real_model_and_flag_masking(model, digits):
    checks = sanity_checks(model, digits.test, ["linf:bound=0.05,num_iterations=5"], limit=40,
                           square=("linf:0.05",), square_queries=50)
    assert {c["check"] for c in checks} == {"bound_monotone", "unbounded",
                                             "square_not_stronger"}
    assert all(c["passed"] for c in checks), checks
    masked = _Masked(model)
    masked.lpips_layers_spec = model.lpips_layers_spec
    flagged = sanity_checks(masked, digits.test, [], limit=40, square=(),
                            unbounded="linf:bound=1.0,num_iterations=5,random_start=false")
    assert not flagged[0]["passed"]  # zero gradients: the unbounded attack gets nowhere


def test_calibrated_bounds(tmp_path, model, digits):
    path = tmp_path / "b.json"
    path.write_text(json.dumps({"presets": {"linf": {"p10": 0.01, "p50": 0.1}}}))
    bounds = load_calibrated_bounds(path)
    assert bounds == {"linf": {"p10": 0.01, "p50": 0.1}}
    rows = perceptibility_matched(model, digits.test, bounds, limit=40,
                                  attack_params={"linf": "num_iterations=5"})
    accs = {r["level"]: r["accuracy"] for r in rows}
    assert accs["p50"] <= accs["p10"]
    for r in rows:  # structured: the label, the exact bound, the canonical spec it ran
        attack = parse_attack(r["spec"])
        assert (attack.name, attack.bound, attack.num_iterations) == ("linf", r["bound"], 5)
        assert r["label"] == r["level"]
    paths = write_perceptibility({"m": rows}, tmp_path / "out", title="digits")
    assert (tmp_path / "out" / "perceptibility.png") in paths
    with pytest.raises(EngineError, match="must be a number >= 0"):
        check_calibrated_bounds({"linf": {"p10": -1}})
    with pytest.raises(EngineError, match="must map labels"):
        check_calibrated_bounds({"linf": 0.1})
    with pytest.raises(EngineError, match="not found"):
        load_calibrated_bounds(tmp_path / "missing.json")


def test_tables_are_written_as_csv_and_markdown(tmp_path):
    rows = [{"model": "a", "dataset": "digits", "clean": 0.9, "linf 0.1": 0.5, "union": 0.4,
             "unseen_mean": None}]
    csv_path, md_path = write_table(rows, tmp_path, "results", title="digits table")
    assert csv_path.read_text().splitlines()[0] == "model,dataset,clean,linf 0.1,union,unseen_mean"
    text = md_path.read_text()
    assert "# digits table" in text and "| a | digits | 90.0 | 50.0 | 40.0 | — |" in text


def test_bad_autoattack_spec(model, digits):
    with pytest.raises(EngineError, match="NORM:EPS"):
        evaluate_model(model, digits.test, [], autoattack=["linf"], limit=4, progress=False)


class _Saturated(nn.Module):
    """Logits ×1e4: the softmax saturates in float32, so the cross-entropy gradient of every
    confidently classified image is exactly zero (APGD-CE stalls) while margin/DLR attacks,
    which are scale-invariant, are unaffected."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x) * 1e4


def _square_row(checks):
    (row,) = [c for c in checks if c["check"] == "square_not_stronger"]
    found = re.search(r"square ([\d.]+) vs white-box union ([\d.]+) \((.*)\)", row["value"])
    parts = dict(p.rsplit(" ", 1) for p in found.group(3).split(", "))
    return row, float(found.group(1)), float(found.group(2)), {k: float(v)
                                                               for k, v in parts.items()}


def test_masking_check_compares_square_with_the_union_of_white_box_attacks(model, digits):
    """APGD-CE alone under-attacks a model whose CE gradient vanishes; the per-image union
    with APGD-DLR and the in-ball PGD does not, so the check must not fire on it."""
    saturated = _Saturated(model)
    checks = sanity_checks(saturated, digits.test, ["linf:bound=0.1,num_iterations=10"],
                           limit=40, square=("linf:0.1",), square_queries=200)
    row, square, union, parts = _square_row(checks)
    assert "linf 0.05" in row["detail"] and "linf 0.1" in row["detail"]  # in-ball PGD runs
    assert "linf 0.2" not in row["detail"]  # the 2× bound is outside the ball: not counted
    assert union <= min(parts.values())
    assert parts["apgd_ce"] > square + 0.05  # APGD-CE alone would have flagged masking
    assert union < parts["apgd_ce"]
    assert row["passed"], row


def test_masking_check_fires_when_every_white_box_attack_is_blind(model, digits):
    masked = _Masked(model)
    checks = sanity_checks(masked, digits.test, ["linf:bound=0.1,num_iterations=5"],
                           limit=40, square=("linf:0.1",), square_queries=200)
    row, square, union, _ = _square_row(checks)
    assert square < union - 0.1
    assert not row["passed"]


def test_sanity_table_states_fractions_not_percent(tmp_path):
    rows = [{"model": "m", "check": "unbounded", "detail": "linf", "value": "0.000",
             "passed": True}]
    _, md_path = write_table(rows, tmp_path, "sanity", title="sanity", notes=[SANITY_NOTE],
                             percent=False)
    text = md_path.read_text()
    assert "fractions" in text and "percent (CSV" not in text
    _, md_path = write_table(rows, tmp_path, "plain", title="no floats")
    assert "Accuracies in percent" not in md_path.read_text()  # no float was shown in percent
