"""Short condition labels (``L2 · medium (ε = 4.71)``) and bound units, built from a
condition's structured fields by :mod:`engine.attacks.spec` (never from spec text)."""

from __future__ import annotations

import pytest

from engine.attacks import registry
from engine.attacks.spec import (
    BOUND_PRESETS,
    bound_units,
    condition_title,
    resolve_preset,
    threat_model_title,
)


def test_labels_of_the_papers_named_bounds():
    assert condition_title("l2", resolve_preset("l2", "medium"), "medium") == \
        "L2 · medium (ε = 4.71)"
    assert condition_title("linf", resolve_preset("linf", "large"), "large") == \
        "L∞ · large (ε = 0.0314)"
    assert condition_title("ppgd", 0.5, "p25") == "PPGD · p25 (ε = 0.5)"


@pytest.mark.parametrize(("bound", "label", "expected"), [
    (4 / 255, "", "L∞ (ε = 0.0157)"),
    (None, "small", "L∞ · small"),
    (None, "", "L∞"),
    (123456.0, "L3", "L∞ · L3 (ε = 1.23e+05)"),
])
def test_missing_parts_are_left_out(bound, label, expected):
    assert condition_title("linf", bound, label) == expected


def test_every_registered_attack_has_a_title_and_units():
    import engine.attacks  # noqa: F401  (registers the attacks)

    names = set(registry.available_attacks())
    assert set(BOUND_PRESETS) <= names
    for name in names:
        assert threat_model_title(name) != name, name
        assert bound_units(name) != "the threat model's own units", name


def test_unknown_threat_models_are_shown_as_registered():
    assert threat_model_title("my_attack") == "my_attack"
    assert bound_units("my_attack") == "the threat model's own units"
    assert condition_title("my_attack", 2.0, "x") == "my_attack · x (ε = 2)"
