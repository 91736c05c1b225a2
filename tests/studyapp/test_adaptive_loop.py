"""Adaptive studies: QUEST+ level choice in the scheduler, ladders and refill."""

from __future__ import annotations

import random
from collections import Counter
from io import StringIO

import numpy as np
import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db.models import Count, Q

from engine.adaptive import QuestPlus
from studyapp import adaptive
from studyapp.models import Condition, Judgment, Pair, Participant, Session, Trial
from studyapp.scheduler import assignment_errors, control_counts, start_session

pytestmark = pytest.mark.django_db

LADDER = [1 / 255, 2 / 255, 4 / 255, 8 / 255, 16 / 255, 32 / 255]
FAST = ["--size", "32", "--max-images", "2", "--classifier", "resnet18:untrained",
        "--lpips", "alexnet:untrained", "--no-progress"]


def run(*args) -> str:
    out = StringIO()
    call_command(*args, stdout=out, stderr=StringIO())
    return out.getvalue()


@pytest.fixture
def ladder_study(make_study):
    study = make_study(
        conditions=[("linf", b, f"L{i}") for i, b in enumerate(LADDER)],
        judgments_per_pair=4, trials_per_session=6, sentinel_fraction=0.2, adaptive=True,
        adaptive_config={"guess_rate": 0.05, "objective": "entropy", "floor": 0},
    )
    for condition in Condition.objects.filter(study=study):
        Pair.objects.filter(condition=condition).update(level=LADDER.index(condition.bound))
    return study


def test_order_candidates_is_a_no_op_for_fixed_studies(study):
    candidates = [(p.pk, 0) for p in study.pairs.filter(condition__isnull=False)]
    assert adaptive.order_candidates(study, list(candidates)) == candidates


def test_the_posterior_pools_exactly_the_stored_main_judgments(ladder_study):
    study = ladder_study
    run("simulate_observers", "--study", study.slug, "--n", "4", "--threshold",
        f"linf={4 / 255}", "--no-progress")
    session = Session.objects.first()
    Session.objects.filter(pk=session.pk).update(excluded=True)  # must not count
    (q, levels), = adaptive.posteriors(study).values()
    assert levels == list(range(len(LADDER)))
    rows = Judgment.objects.filter(
        trial__is_practice=False, trial__pair__level__isnull=False, trial__session__excluded=False
    ).values_list("trial__pair__level", "response")
    assert rows.count() > 0
    expected = QuestPlus(LADDER, thresholds_grid=np.geomspace(LADDER[0] / 2, LADDER[-1] * 2, 41),
                         slopes_grid=adaptive.DEFAULTS["slopes"], guess_rate=0.05,
                         lapse_rate=0.02, sigmoid="logistic")
    expected.update_many([lv for lv, _ in rows], [r == "different" for _, r in rows])
    assert np.allclose(q.posterior, expected.posterior)
    assert adaptive.next_levels(study) == {"linf": expected.next_level()}


def test_the_default_design_is_the_benchmark_winner(ladder_study):
    """Default adaptive_config: γ and λ nuisance parameters (γ learnt from the kept sessions'
    sentinels), next level by the estimator's threshold variance, every level kept at ≥
    floor/levels of the judgments — the engine's computation on the same answers."""
    study = ladder_study
    study.adaptive_config = {}
    study.save()
    run("simulate_observers", "--study", study.slug, "--n", "4", "--threshold",
        f"linf={4 / 255}", "--no-progress")
    (q, levels), = adaptive.posteriors(study).values()
    base = Judgment.objects.filter(trial__is_practice=False, trial__session__excluded=False)
    rows = base.filter(trial__pair__level__isnull=False).values_list("trial__pair__level",
                                                                     "response")
    sent = list(base.filter(trial__pair__is_sentinel=True).values_list("response", flat=True))
    assert sent
    cfg = adaptive.DEFAULTS
    expected = QuestPlus(LADDER, thresholds_grid=np.geomspace(LADDER[0] / 2, LADDER[-1] * 2, 41),
                         slopes_grid=cfg["slopes"], guess_rates=cfg["guess_rates"],
                         lapse_rates=cfg["lapse_rates"], targets=(0.25, 0.5, 0.75))
    expected.update_many([lv for lv, _ in rows], [r == "different" for _, r in rows])
    expected.update_sentinels(sent.count("different"), len(sent))
    assert np.allclose(q.joint_posterior, expected.joint_posterior)
    assert cfg["objective"] == "fisher" and cfg["floor"] == 0.5
    assert adaptive.next_levels(study) == {
        "linf": expected.next_level("fisher", min_share=0.5 / len(LADDER))}


def test_sessions_of_an_adaptive_study_come_from_the_chosen_level(ladder_study):
    study = ladder_study
    chosen = adaptive.next_levels(study)["linf"]
    session = start_session(Participant.objects.create(study=study, external_id="a"),
                            rng=random.Random(0))
    levels = list(
        Trial.objects.filter(session=session, pair__condition__isnull=False, is_practice=False)
        .values_list("pair__level", flat=True)
    )
    # 3 pairs per level; the rest from the nearest levels
    assert Counter(levels)[chosen] == 3
    assert all(abs(lv - chosen) <= 1 for lv in levels)


def test_adaptive_scheduling_keeps_k_sentinels_and_no_repeats(ladder_study):
    study = ladder_study
    text = run("simulate_observers", "--study", study.slug, "--n", "40", "--threshold",
               f"linf={3 / 255}", "--no-progress", "--seed", "2")
    assert "Stopped early" in text  # ran the study to the end: every slot fought for
    assert assignment_errors(study) == []
    judged = Pair.objects.filter(study=study, condition__isnull=False).annotate(
        n=Count("trials", filter=Q(trials__is_practice=False, trials__judgment__isnull=False)))
    assert max(judged.values_list("n", flat=True)) <= 4
    assert sum(judged.values_list("n", flat=True)) == 4 * judged.count()  # every slot used
    for session in Session.objects.filter(participant__study=study):
        main = session.trials.filter(is_practice=False)
        n_sent = main.filter(pair__is_sentinel=True).count()
        assert n_sent == control_counts(study, study.trials_per_session, 3, 0)[0]
        pairs = list(session.trials.values_list("pair", flat=True))
        assert len(pairs) == len(set(pairs))


def test_levels_that_people_clearly_see_are_left_behind(ladder_study):
    """Observers who see everything: QUEST+ moves to the bottom of the ladder."""
    study = ladder_study
    study.judgments_per_pair = 40
    study.save()
    run("simulate_observers", "--study", study.slug, "--n", "8", "--threshold",
        f"linf={0.2 / 255}", "--guess-rate", "0.05", "--no-progress")
    assert adaptive.next_levels(study)["linf"] == 0
    low = Judgment.objects.filter(trial__pair__level__lte=1, trial__is_practice=False).count()
    high = Judgment.objects.filter(trial__pair__level__gte=4, trial__is_practice=False).count()
    assert low > high


def test_short_levels_count_open_slots(ladder_study):
    study = ladder_study
    slots = adaptive.open_slots(study)
    assert slots == {("linf", i): 3 * 4 for i in range(len(LADDER))}
    Pair.objects.filter(level=2).update(n_assigned=4)
    assert adaptive.short_levels(study, 1) == [("linf", 2)]


def test_refill_needs_a_ladder(study):
    with pytest.raises(CommandError, match="has no ladder; make one with generate_pairs"):
        run("refill", "--study", study.slug)


@pytest.mark.slow  # generates real pairs twice (~15 s)
def test_generate_a_ladder_then_refill_a_short_level(media_root):
    run("generate_pairs", "--study", "lad", "--spec", "linf:num_iterations=2", "--ladder", "3",
        "--bounds", "0.01,0.04", *FAST)
    conditions = Condition.objects.filter(study__slug="lad").order_by("bound")
    assert [c.label for c in conditions] == ["L0", "L1", "L2"]
    assert np.allclose([c.bound for c in conditions], [0.01, 0.02, 0.04])
    pairs = Pair.objects.filter(study__slug="lad", condition__isnull=False)
    assert sorted(pairs.values_list("level", flat=True)) == [0, 0, 1, 1, 2, 2]
    study = conditions[0].study
    assert set(study.adaptive_config["ladder"]["linf"]) == {"0", "1", "2"}
    before = {p.key: (p.other_path, p.level) for p in pairs}
    Pair.objects.filter(study=study, level=1).update(n_assigned=study.judgments_per_pair)
    text = run("refill", "--study", "lad", "--min-open", "1", "--no-progress")
    assert "linf level 1: 0 open slot(s)" in text
    after = Pair.objects.filter(study=study, condition__isnull=False)
    assert Counter(after.values_list("level", flat=True)) == {0: 2, 1: 4, 2: 2}
    assert {p.key: (p.other_path, p.level) for p in after if p.key in before} == before
    assert "No level has fewer" in run("refill", "--study", "lad", "--min-open", "1")
