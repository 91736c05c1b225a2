"""simulate_observers: simulated participants through the scheduler; power."""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from studyapp.models import Judgment, Participant, Session
from studyapp.scheduler import assignment_errors

pytestmark = pytest.mark.django_db


def run(*args) -> str:
    out = StringIO()
    call_command(*args, stdout=out, stderr=StringIO())
    return out.getvalue()


def test_simulated_observers_answer_through_the_scheduler(make_study):
    study = make_study(judgments_per_pair=3, trials_per_session=5, practice_trials=2,
                       catch_pairs=2, catch_fraction=0.2)
    # No guesses, no lapses, a threshold far below every bound: every perturbed and catch
    # pair is "different", every sentinel "same".
    text = run("simulate_observers", "--study", study.slug, "--n", "3", "--guess-rate", "0",
               "--lapse-rate", "0", "--threshold", "linf=1e-9", "--no-progress")
    assert "3 simulated session(s) completed" in text
    people = Participant.objects.filter(study=study)
    assert people.count() == 3 and all(p.is_simulated for p in people)
    assert Session.objects.filter(completed_at__isnull=False).count() == 3
    assert assignment_errors(study) == []
    judged = Judgment.objects.filter(trial__session__participant__study=study)
    assert judged.filter(trial__is_practice=True).exists()  # practice answered, like people
    for j in judged.select_related("trial__pair"):
        pair = j.trial.pair
        assert j.response == ("same" if pair.is_sentinel else "different"), pair
    # ... and a threshold far above: only "same" on perturbed pairs
    run("simulate_observers", "--study", study.slug, "--n", "1", "--guess-rate", "0",
        "--lapse-rate", "0", "--threshold", "linf=1e9", "--no-progress", "--seed", "3")
    last = Session.objects.latest("pk")
    data = Judgment.objects.filter(trial__session=last, trial__pair__condition__isnull=False)
    assert data.exists() and not data.filter(response="different").exists()


def test_simulation_stops_when_the_study_is_full(make_study):
    study = make_study(judgments_per_pair=1, trials_per_session=5)
    text = run("simulate_observers", "--study", study.slug, "--n", "50", "--no-progress")
    assert "Stopped early" in text and "has its 1 judgments" in text
    assert assignment_errors(study) == []
    data = Judgment.objects.filter(trial__pair__condition__isnull=False, trial__is_practice=False)
    assert sorted(data.values_list("trial__pair", flat=True)) == sorted(
        study.pairs.filter(condition__isnull=False).values_list("pk", flat=True)
    )  # every one of the 6 pairs judged exactly once (K=1), then refused


@pytest.mark.parametrize(
    "args, message",
    [
        (["--study", "nope"], "no study with slug 'nope'"),
        (["--n", "0"], "--n must be at least 1"),
        (["--threshold", "linf"], "THREAT_MODEL=VALUE"),
        (["--threshold", "linf=-1"], "must be positive"),
        (["--threshold", "l2=0.5"], "threat model(s) ['l2']"),
        (["--guess-rate", "1.5"], "guess rate must be in"),
        (["--distance", "lpips_vgg"], "no data pairs with positive distance 'lpips_vgg'"),
    ],
)
def test_simulate_observers_refuses_bad_input(make_study, args, message):
    make_study()
    argv = ["simulate_observers", "--no-progress"]
    if "--study" not in args:
        argv += ["--study", "jnd-demo"]
    with pytest.raises(CommandError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        run(*argv, *args)
    assert not Participant.objects.exists()


def test_power_matches_the_wilson_interval_width():
    from engine.analysis import wilson_interval

    text = run("power", "--width", "0.1", "--p", "0.5")
    n = int(text.split(": ")[1].split()[0])
    low, high = wilson_interval(round(0.5 * n), n)
    assert high - low <= 0.1
    low, high = wilson_interval(round(0.5 * (n - 1)), n - 1)
    assert high - low > 0.1  # the smallest such n
    with pytest.raises(CommandError, match="--width must be between 0 and 1"):
        run("power", "--width", "2")


def test_power_per_condition_of_a_study(make_study):
    study = make_study(judgments_per_pair=2)
    with pytest.raises(CommandError, match="no judgments of perturbed pairs"):
        run("power", "--study", study.slug, "--width", "0.2")
    run("simulate_observers", "--study", study.slug, "--n", "2", "--no-progress")
    text = run("power", "--study", study.slug, "--width", "0.2", "--include-simulated")
    assert text.count("need") == 2


def test_power_of_a_threshold_interval_runs_engine_power():
    from engine.observers import ObserverPopulation, power

    args = ["--threshold-width", "0.6", "--bounds", "0.004,0.008,0.016,0.032",
            "--threshold", "0.01", "--slope", "3", "--n-grid", "300,1200",
            "--repetitions", "3", "--n-boot", "30", "--seed", "1"]
    text = run("power", *args)
    expected = power(ObserverPopulation(functions={"linf": (0.01, 3.0)}), "linf",
                     [0.004, 0.008, 0.016, 0.032], target_width=0.6, n_grid=(300, 1200),
                     repetitions=3, n_boot=30, seed=1)
    for _, row in expected.iterrows():
        assert f"{row['median_width']:.4f}" in text
    with pytest.raises(CommandError, match="one of --width or --threshold-width"):
        run("power", "--width", "0.1", "--threshold-width", "0.5")
    with pytest.raises(CommandError, match="at least 2 --bounds"):
        run("power", "--threshold-width", "0.5", "--threshold", "0.01")


def test_threshold_is_the_p50_that_calibrate_recovers(make_study):
    """--threshold T means P(different) = 0.5 for the simulated population (guesses, lapses,
    criterion spread and careless ones included), the point calibrate reports as p50. With
    γ = 0.2 the observers' own F = ½ point lies 0.25 ln-units higher: a test that can fail."""
    import math

    import numpy as np

    from studyapp.simulation import half_point

    # 600 observers: measured over 60 simulated studies of this design (engine observers and
    # engine.calibration, no database), the p50's error is +0.010 ± 0.028 ln-units (the
    # logistic fit is slightly misspecified for a population with criterion spread), and the
    # bootstrap SE 0.027; so |error| < 0.12 fails with probability ~1e-4 for any seed, while
    # the F = ½ point (0.25 away) fails it.
    bounds = [0.01, 0.02, 0.04, 0.08, 0.16]
    study = make_study(conditions=[("linf", b, f"L{i}") for i, b in enumerate(bounds)],
                       judgments_per_pair=10**6, trials_per_session=20,
                       sentinel_fraction=0.2)
    run("simulate_observers", "--study", study.slug, "--n", "600", "--threshold", "linf=0.04",
        "--slope", "2", "--guess-rate", "0.2", "--lapse-rate", "0.02", "--bias-sd", "0.5",
        "--careless", "0.05", "--seed", "2", "--no-progress")
    text = run("calibrate", "--study", study.slug, "--include-simulated", "--dry-run",
               "--targets", "0.5", "--n-boot", "200")
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("p50:"))
    bound = float(line.split("bound ")[1].split()[0])
    low, high = (float(v) for v in line.split("95% ")[1].split(";")[0].split(" .. "))
    se = math.log(high / low) / (2 * 1.96)  # the bootstrap's own standard error, ln-units
    assert low < bound < high and 0.01 < se < 0.06, text  # an interval of the right size
    assert abs(math.log(bound / 0.04)) < 0.12, text
    old = 1 / half_point(2.0, 0.2, 0.02, 0.5, 0.0, 0.05)  # F = ½ point relative to T
    assert np.isfinite(old) and abs(math.log(old)) > 0.2  # the former meaning: far outside
    with pytest.raises(CommandError, match="half the time"):
        run("simulate_observers", "--study", study.slug, "--n", "1", "--guess-rate", "0.6",
            "--no-progress")


def test_a_seeded_simulation_is_the_same_whatever_ids_other_studies_took(make_study):
    """The scheduler's random tie-break permutes ids counted from the study's first pair, so
    ``--seed`` reproduces a simulation in any database (it did not: a CI run whose pair ids
    started elsewhere drew other pairs and another p50)."""
    def answers(study):
        first = study.pairs.order_by("pk").first().pk
        run("simulate_observers", "--study", study.slug, "--n", "4", "--seed", "5",
            "--bias-sd", "0.5", "--careless", "0.2", "--no-progress")
        sessions = Session.objects.filter(participant__study=study).order_by("pk")
        return [[(t.position, t.pair_id - first, t.judgment.response)
                 for t in s.trials.select_related("judgment").order_by("position")]
                for s in sessions]

    bounds = [0.01, 0.02, 0.04, 0.08, 0.16]
    conditions = [("linf", b, f"L{i}") for i, b in enumerate(bounds)]
    fields = dict(conditions=conditions, judgments_per_pair=2, trials_per_session=8)
    a = answers(make_study(slug="first", **fields))
    make_study(slug="padding", with_pairs=True)  # takes ids between the two
    b = answers(make_study(slug="second", **fields))
    assert [len(s) for s in a] == [8] * 4 and a == b
