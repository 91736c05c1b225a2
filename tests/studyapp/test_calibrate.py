"""calibrate → Calibration rows → generate_pairs --bounds calibrated:SLUG; ladders."""

from __future__ import annotations

import math
import re
from io import StringIO

import numpy as np
import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from scipy.special import logit

from engine.attacks import parse_attack
from engine.attacks.spec import bound_label
from studyapp import adaptive
from studyapp.models import Calibration, Condition, Pair

pytestmark = pytest.mark.django_db

FAST = ["--size", "32", "--max-images", "2", "--classifier", "resnet18:untrained",
        "--lpips", "alexnet:untrained", "--no-progress"]
BOUNDS = [2 / 255, 4 / 255, 8 / 255, 16 / 255, 32 / 255]
TRUTH, SLOPE, GUESS, LAPSE = 8 / 255, 2.5, 0.05, 0.02


def run(*args) -> str:
    out = StringIO()
    call_command(*args, stdout=out, stderr=StringIO())
    return out.getvalue()


def true_bound(target: float) -> float:
    """Bound where γ + (1−γ−λ)·logistic(s·(log b − log t)) = target (the simulated truth;
    ``--threshold TRUTH`` is its 50 % point, so t = TRUTH / half_point)."""
    from studyapp.simulation import half_point

    q = (target - GUESS) / (1 - GUESS - LAPSE)
    typical = TRUTH / half_point(SLOPE, GUESS, LAPSE, 0.0, 0.0, 0.0)
    return typical * math.exp(logit(q) / SLOPE)


@pytest.fixture
def simulated_study(make_study):
    study = make_study(
        conditions=[("linf", b, f"b{i}") for i, b in enumerate(BOUNDS)],
        judgments_per_pair=60, trials_per_session=16, sentinel_fraction=0.12,
    )
    run("simulate_observers", "--study", study.slug, "--n", "50", "--threshold",
        f"linf={TRUTH}", "--slope", str(SLOPE), "--guess-rate", str(GUESS), "--lapse-rate",
        str(LAPSE), "--seed", "4", "--no-progress")
    return study


@pytest.mark.slow  # 800 judgments through the scheduler (~15 s)
def test_calibrate_recovers_the_simulated_thresholds_and_stores_presets(simulated_study):
    study = simulated_study
    with pytest.raises(CommandError, match="simulated ones need --include-simulated"):
        run("calibrate", "--study", study.slug)
    text = run("calibrate", "--study", study.slug, "--include-simulated", "--n-boot", "40",
               "--lapse", str(LAPSE))
    row = Calibration.objects.get()
    assert f"Stored calibration {row.pk}" in text
    assert row.targets == [0.1, 0.25, 0.5] and set(row.presets) == {"linf"}
    assert set(row.presets["linf"]) == {"p10", "p25", "p50"}
    assert row.counts["n_judgments"] > 600 and row.counts["n_sessions"] == 50
    assert row.settings["include_simulated"] and row.code_version.startswith("perceptlab")
    for label, target in (("p25", 0.25), ("p50", 0.5)):
        est = row.presets["linf"][label]
        assert abs(math.log(est / true_bound(target))) < 0.25, (label, est, true_bound(target))
        t, = [t for t in row.fit["threat_models"]["linf"]["thresholds"] if t["label"] == label]
        assert t["low"] < est < t["high"]
    assert row.presets["linf"]["p10"] < row.presets["linf"]["p25"] < row.presets["linf"]["p50"]

    # generate_pairs --bounds calibrated:SLUG expands to those bounds, labelled p10/p25/p50
    specs = adaptive.calibrated_specs(["linf:num_iterations=2"], study.slug)
    assert sorted(bound_label(s) for s in specs) == ["p10", "p25", "p50"]
    for spec in specs:  # VALUE@LABEL: the label travels in the spec, the bound is exact
        attack = parse_attack(spec)
        assert attack.bound == row.presets["linf"][bound_label(spec)]
        assert attack.num_iterations == 2
    with pytest.raises(adaptive.AdaptiveError, match="no presets for threat model 'l2'"):
        adaptive.calibrated_specs(["l2"], study.slug)

    rows = adaptive.named_and_calibrated(row.presets)
    assert rows[0]["small"] == pytest.approx(2 / 255) and rows[0]["large"] == pytest.approx(
        8 / 255)
    assert rows[0]["p50"] == row.presets["linf"]["p50"]

    # ... end to end: the new study's conditions sit at the calibrated bounds, labelled
    run("generate_pairs", "--study", "calibrated", "--spec", "linf:num_iterations=2",
        "--bounds", f"calibrated:{study.slug}", *FAST)
    made = {c.label: c.bound for c in Condition.objects.filter(study__slug="calibrated")}
    assert made == pytest.approx(row.presets["linf"])
    assert Pair.objects.filter(study__slug="calibrated", condition__isnull=False).count() == 6


@pytest.mark.parametrize(
    "args, message",
    [
        (["--targets", "0.1,x"], "--targets takes numbers"),
        (["--targets", "0,0.5"], "strictly between 0 and 1"),
        (["--lapse", "abc"], "--lapse must be 'fit' or a number"),
        (["--lapse", "0.7"], r"--lapse must be in \[0, 0.5\)"),
    ],
)
def test_calibrate_refuses_bad_input(make_study, args, message):
    study = make_study()
    with pytest.raises(CommandError, match=message):
        run("calibrate", "--study", study.slug, *args)
    assert not Calibration.objects.exists()


def test_calibrate_needs_two_bounds_per_threat_model(make_study):
    study = make_study(conditions=[("linf", 8 / 255, "small")], judgments_per_pair=2)
    run("simulate_observers", "--study", study.slug, "--n", "2", "--no-progress")
    with pytest.raises(CommandError, match=r"\['linf'\] have judgments at fewer than 2 bounds"):
        run("calibrate", "--study", study.slug, "--include-simulated")


def test_generate_pairs_calibrated_bounds_errors(make_study, settings, tmp_path):
    make_study(slug="uncal")
    base = ["generate_pairs", "--study", "new", "--spec", "linf:num_iterations=2"]
    with pytest.raises(CommandError, match="no study with slug 'nope'"):
        run(*base, "--bounds", "calibrated:nope")
    with pytest.raises(CommandError, match="has no calibration; run `manage.py calibrate"):
        run(*base, "--bounds", "calibrated:uncal")


def test_ladder_levels_travel_to_pairs_and_the_study(settings, tmp_path):
    settings.MEDIA_ROOT = tmp_path / "media"
    run("generate_pairs", "--study", "lad", "--spec", "linf:num_iterations=2", "--bounds",
        "0.01,0.04", "--ladder", "3", "--sentinels", "0", *FAST)
    conditions = Condition.objects.filter(study__slug="lad").order_by("bound")
    assert [c.label for c in conditions] == ["L0", "L1", "L2"]
    assert np.allclose([c.bound for c in conditions], [0.01, 0.02, 0.04])
    for level, condition in enumerate(conditions):
        assert set(Pair.objects.filter(condition=condition).values_list("level", flat=True)
                   ) == {level}
    study = conditions[0].study
    ladder = study.adaptive_config["ladder"]["linf"]
    assert {k: v["spec"] for k, v in ladder.items()} == {
        str(i): c.spec for i, c in enumerate(conditions)}
    assert study.adaptive_config["generation"]["classifier"] == "resnet18:untrained"


def test_saturated_fit_is_flagged_by_calibrate_analyze_and_the_dashboard(make_study, client,
                                                                         settings, tmp_path):
    """Three bounds with the lapse rate fitted: 3 parameters for 3 points, no goodness of
    fit. calibrate warns, analyze repeats it with deviance and df, the dashboard lists it."""
    from django.contrib.auth import get_user_model

    settings.VAR_DIR = tmp_path
    study = make_study(conditions=[("linf", b, f"b{i}") for i, b in enumerate(BOUNDS[1:4])],
                       judgments_per_pair=40, trials_per_session=10, sentinel_fraction=0.2,
                       max_sentinel_false_alarm=0.5)
    run("simulate_observers", "--study", study.slug, "--n", "20", "--threshold",
        f"linf={TRUTH}", "--seed", "1", "--no-progress")
    text = run("calibrate", "--study", study.slug, "--include-simulated", "--n-boot", "20")
    assert "WARNING linf: saturated: 3 bounds for 3 fitted parameters (deviance" in text
    assert "on 0 df, goodness-of-fit p n/a" in text
    assert "estimated jointly" in text  # the study screens sessions by sentinel false alarms
    row = Calibration.objects.get()
    assert row.fit["flags"]["linf"][0].startswith("saturated")
    assert row.settings["guess_method"] == "joint" and row.settings["sentinel_limit"] == 0.5
    out = run("analyze", "--study", study.slug, "--include-simulated", "--n-boot", "10")
    # (the deviance itself depends on which pairs the simulated sessions drew, i.e. on database
    # ids, so on the tests run before in the same process: 0, or e.g. 0.384 at a bound)
    assert re.search(r"linf: deviance [0-9.e+-]+ on 0 df, goodness-of-fit p n/a", out), out
    assert "WARNING linf: saturated" in out
    user = get_user_model().objects.create_user("staff", password="pw", is_staff=True)
    client.force_login(user)
    # fitted with simulated observers: the dashboard shows it (and its flags) with them only
    html = client.get(f"/dashboard/{study.slug}/?simulated=1").content.decode()
    assert 'id="fit-flags"' in html and "linf: saturated: 3 bounds" in html
    # with a fixed lapse rate the same data leave 1 df: no saturation warning
    text = run("calibrate", "--study", study.slug, "--include-simulated", "--n-boot", "0",
               "--lapse", "0.02", "--dry-run")
    assert "saturated" not in text and "on 1 df" in text
