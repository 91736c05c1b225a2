"""The scheduler on SQLite: choice of pairs, K, controls, practice, leases, judgments.

PostgreSQL concurrency is in ``test_concurrency_pg.py``. Pairs here need no image files: the
scheduler only reads rows.
"""

from __future__ import annotations

import random
import uuid
from collections import Counter
from datetime import timedelta

import pytest
from django.db import transaction
from django.urls import reverse
from django.utils import timezone
from rest_framework.test import APIClient

from studyapp import scheduler
from studyapp.models import Condition, Judgment, Pair, Participant, Session, Study, Trial
from studyapp.participant_api import JudgmentCreateView, SessionCompleteView
from studyapp.scheduler import (
    AlreadyAnswered,
    AlreadyParticipated,
    IdempotencyKeyReused,
    LeaseExpired,
    SessionExpired,
    SessionIncomplete,
    StudyUnavailable,
    UnknownTrial,
    assignment_errors,
    complete_session,
    record_judgment,
    release_expired,
    start_session,
)

pytestmark = pytest.mark.django_db

T0 = timezone.now().replace(microsecond=0)


def make_study(
    *, data: int = 12, sentinels: int = 0, catch: int = 0, slug: str = "s", **fields
) -> Study:
    """A study with ``data`` perturbed pairs and the given numbers of control pairs."""
    fields = {
        "trials_per_session": 4,
        "sentinel_fraction": 0.0,
        "catch_fraction": 0.0,
        "practice_trials": 0,
        "judgments_per_pair": 3,
        "lease_minutes": 30,
        **fields,
    }
    study = Study.objects.create(slug=slug, title=slug, **fields)
    condition = Condition.objects.create(
        study=study, threat_model="linf", bound=8 / 255, spec="linf:bound=8/255"
    )

    def pair(key: str, **kw) -> Pair:
        return Pair(
            study=study, key=key, source_image=key, natural_path=f"{key}/a.png",
            other_path=f"{key}/b.png", width=8, height=8, **kw,
        )

    rows = [pair(f"d{i}", condition=condition) for i in range(data)]
    rows += [pair(f"s{i}", is_sentinel=True) for i in range(sentinels)]
    rows += [pair(f"c{i}", is_catch=True) for i in range(catch)]
    Pair.objects.bulk_create(rows)
    return study


def new_participant(study: Study) -> Participant:
    return Participant.objects.create(study=study, external_id=str(uuid.uuid4()))


def start(study: Study, rng: random.Random | None = None, now=T0, **kw) -> Session:
    return start_session(new_participant(study), rng=rng or random.Random(0), now=now, **kw)


def body(position: int, **overrides) -> dict:
    data = {
        "position": position,
        "response": "different",
        "response_time_ms": 700.0,
        "durations": {"first_ms": 1000.0, "blank_ms": 250.0, "second_ms": 1000.0},
        "idempotency_key": uuid.uuid4().hex,
    }
    return {**data, **overrides}


def answer(session: Session, trial: Trial, now=T0, **overrides) -> Judgment:
    judgment, created = record_judgment(session, body(trial.position, **overrides), now=now)
    assert created
    return judgment


def data_trials(session: Session):
    return session.trials.filter(
        is_practice=False, pair__is_sentinel=False, pair__is_catch=False
    )


def n_assigned(study: Study) -> dict[int, int]:
    return dict(study.pairs.values_list("pk", "n_assigned"))


def assert_consistent(study: Study) -> None:
    assert assignment_errors(study) == []


# ------------------------------------------------------------------------------ choosing pairs


def test_least_assigned_pairs_come_first():
    study = make_study(data=12, trials_per_session=4, judgments_per_pair=5)
    rng = random.Random(1)
    for _ in range(9):
        before = n_assigned(study)
        session = start(study, rng)
        chosen = [t.pair_id for t in session.trials.all()]
        lowest = min(before.values())
        least = sorted(pk for pk, n in before.items() if n == lowest)
        if len(least) >= 4:  # enough pairs at the lowest count: only those are taken
            assert {before[pk] for pk in chosen} == {lowest}
        else:  # all of the lowest, then the next level
            assert set(least) <= set(chosen)
            assert {before[pk] for pk in chosen} <= {lowest, lowest + 1}
        assert_consistent(study)
    assert set(n_assigned(study).values()) == {3}  # 9 sessions × 4 = 36 = 12 pairs × 3


def test_ties_are_broken_at_random():
    """Over many first sessions (rolled back), every pair is chosen about equally often."""
    study = make_study(data=12, trials_per_session=4)
    picks: Counter[int] = Counter()
    first_choices = set()
    rng = random.Random(7)
    for _ in range(120):
        with transaction.atomic():
            session = start(study, rng)
            chosen = frozenset(session.trials.values_list("pair_id", flat=True))
            transaction.set_rollback(True)
        picks.update(chosen)
        first_choices.add(chosen)
    assert len(picks) == 12
    # 480 picks over 12 pairs: 40 each expected; binomial sd ≈ 5.8 → ±4.5 sd.
    assert all(14 <= n <= 66 for n in picks.values()), picks
    assert len(first_choices) > 50
    assert Session.objects.count() == 0 and set(n_assigned(study).values()) == {0}


def test_a_participant_never_sees_a_pair_twice_across_retakes():
    study = make_study(
        data=10, sentinels=3, catch=3, allow_retakes=True, trials_per_session=4,
        sentinel_fraction=0.25, catch_fraction=0.25, practice_trials=2, judgments_per_pair=9,
    )
    participant = new_participant(study)
    seen: list[int] = []
    rng = random.Random(3)
    while True:
        try:
            session = start_session(participant, rng=rng, now=T0)
        except StudyUnavailable as exc:
            assert "already seen every pair" in str(exc)
            break
        seen += list(session.trials.values_list("pair_id", flat=True))
        assert_consistent(study)
    assert len(seen) == len(set(seen))
    data_pairs = set(study.pairs.filter(condition__isnull=False).values_list("pk", flat=True))
    assert len(set(seen) & data_pairs) == 10  # each data pair shown to them once
    assert participant.sessions.count() >= 3


def test_without_retakes_a_completed_participant_is_refused():
    study = make_study(data=12, allow_retakes=False)
    participant = new_participant(study)
    session = start_session(participant, now=T0)
    for trial in session.trials.all():
        answer(session, trial)
    complete_session(session)
    with pytest.raises(AlreadyParticipated, match="already completed"):
        start_session(participant, now=T0)
    assert participant.sessions.count() == 1


def test_no_pair_gets_more_than_k_and_a_full_study_refuses_clearly():
    study = make_study(data=6, trials_per_session=4, judgments_per_pair=2)
    sessions = []
    while True:
        try:
            sessions.append(start(study, random.Random(len(sessions))))
        except StudyUnavailable as exc:
            message = str(exc)
            break
    assert "every pair of study 's' has its 2 judgments" in message
    assert set(n_assigned(study).values()) == {2}
    assert [s.trials.count() for s in sessions] == [4, 4, 4]  # 12 slots = 6 pairs × K
    assert Session.objects.count() == 3
    assert_consistent(study)


def test_a_short_pool_gives_a_shorter_session():
    study = make_study(data=5, trials_per_session=4, judgments_per_pair=1)
    assert start(study).trials.count() == 4
    assert start(study).trials.count() == 1
    with pytest.raises(StudyUnavailable):
        start(study)


def test_controls_only_study_is_unavailable():
    study = make_study(data=0, sentinels=3, sentinel_fraction=0.5)
    with pytest.raises(StudyUnavailable, match="no pairs to judge"):
        start(study)
    assert Session.objects.count() == 0


def test_inactive_study_is_unavailable():
    study = make_study(is_active=False)
    with pytest.raises(StudyUnavailable, match="not accepting"):
        start(study)


# ------------------------------------------------------------------------------ controls, practice


@pytest.mark.parametrize(
    "n,sentinel_fraction,catch_fraction,expected",
    [
        (20, 0.1, 0.05, (2, 1)),  # round(2.0), round(1.0)
        (20, 0.01, 0.0, (1, 0)),  # at least one when the fraction is positive
        (5, 0.2, 0.2, (1, 1)),
        (4, 0.5, 0.5, (2, 1)),  # at least one trial stays for a data pair
        (1, 0.5, 0.5, (0, 0)),
    ],
)
def test_control_counts(n, sentinel_fraction, catch_fraction, expected):
    study = Study(sentinel_fraction=sentinel_fraction, catch_fraction=catch_fraction)
    assert scheduler.control_counts(study, n, 10, 10) == expected
    assert scheduler.control_counts(study, n, 0, 0) == (0, 0)


def test_sentinels_and_catch_trials_sit_at_random_main_positions():
    study = make_study(
        data=60, sentinels=6, catch=4, trials_per_session=20, sentinel_fraction=0.1,
        catch_fraction=0.05, practice_trials=4, judgments_per_pair=50,
    )
    rng = random.Random(11)
    control_positions: Counter[int] = Counter()
    control_use: Counter[int] = Counter()
    for _ in range(30):
        session = start(study, rng)
        trials = list(session.trials.select_related("pair").order_by("position"))
        assert [t.position for t in trials] == list(range(24))
        practice, main = trials[:4], trials[4:]
        assert all(t.is_practice for t in practice) and not any(t.is_practice for t in main)
        kinds = Counter(
            "sentinel" if t.pair.is_sentinel else "catch" if t.pair.is_catch else "data"
            for t in main
        )
        assert kinds == {"sentinel": 2, "catch": 1, "data": 17}
        # Practice: unused sentinels (identical), the study's "different" example (a perturbed
        # pair this participant does not judge: scheduler.example_pair_ids) and catch pairs.
        kinds = Counter(
            "sentinel" if t.pair.is_sentinel else "catch" if t.pair.is_catch else "data"
            for t in practice
        )
        assert kinds == {"sentinel": 2, "data": 1, "catch": 1}
        (example,) = [t.pair_id for t in practice if t.pair.condition_id is not None]
        assert example not in {t.pair_id for t in main}
        for t in main:
            if t.pair.is_sentinel or t.pair.is_catch:
                control_positions[t.position] += 1
                control_use[t.pair_id] += 1
        # Leases: data trials only; practice and controls hold nothing.
        for t in trials:
            leased = not t.is_practice and not (t.pair.is_sentinel or t.pair.is_catch)
            assert t.leased_until == (T0 + timedelta(minutes=30) if leased else None)
    assert len(control_positions) >= 15  # 90 controls spread over the 20 main positions
    assert set(control_use) == set(
        study.pairs.filter(condition__isnull=True).values_list("pk", flat=True)
    )
    controls = study.pairs.filter(condition__isnull=True)
    assert set(controls.values_list("n_assigned", flat=True)) == {0}  # never counted
    assert sum(n_assigned(study).values()) == 30 * 17
    assert_consistent(study)


def test_practice_falls_back_on_pairs_the_study_needs_least():
    study = make_study(data=8, trials_per_session=2, practice_trials=3, judgments_per_pair=1)
    start(study)  # takes 2 pairs to K
    full = set(study.pairs.filter(n_assigned=1).values_list("pk", flat=True))
    session = start(study)
    practice = list(session.trials.filter(is_practice=True))
    assert len(practice) == 3 and [t.position for t in practice] == [0, 1, 2]
    assert full <= {t.pair_id for t in practice}  # full pairs first: they cost nothing
    assert all(t.leased_until is None for t in practice)
    assert sum(n_assigned(study).values()) == 4  # practice never counted
    assert_consistent(study)


def test_practice_without_catch_pairs_shows_perturbed_pairs_as_different_examples():
    study = make_study(data=8, sentinels=4, trials_per_session=2, practice_trials=4)
    practice = list(start(study).trials.filter(is_practice=True).select_related("pair"))
    assert sorted(t.pair.is_sentinel for t in practice) == [False, False, True, True]
    assert sum(n_assigned(study).values()) == 2  # the 2 main trials; practice holds nothing
    assert_consistent(study)


def test_first_image_is_random_per_trial_or_natural_first():
    study = make_study(data=40, trials_per_session=40, judgments_per_pair=5)
    firsts = list(start(study).trials.values_list("natural_first", flat=True))
    assert 8 <= sum(firsts) <= 32
    study.randomize_first = False
    study.save()
    assert set(start(study).trials.values_list("natural_first", flat=True)) == {True}


def test_session_fields_are_stored():
    study = make_study()
    session = start(study, user_agent="UA", client_info={"w": 1}, assignment_id="A1")
    session.refresh_from_db()
    stored = (session.user_agent, session.client_info, session.assignment_id)
    assert stored == ("UA", {"w": 1}, "A1")
    assert session.started_at is not None


# ------------------------------------------------------------------------------ leases


def test_expired_leases_are_released_and_the_session_abandoned():
    study = make_study(data=8, trials_per_session=4, lease_minutes=30)
    session = start(study)
    trials = list(data_trials(session))
    answer(session, trials[0], now=T0 + timedelta(minutes=1))
    assert release_expired(study, now=T0 + timedelta(minutes=30)) == 0  # not yet expired
    assert release_expired(study, now=T0 + timedelta(minutes=31)) == 3
    assert release_expired(study, now=T0 + timedelta(minutes=32)) == 0  # only once
    session.refresh_from_db()
    assert session.abandoned_at == T0 + timedelta(minutes=31)
    released = {t.pk: t.released for t in data_trials(session)}
    assert released == {t.pk: t.pk != trials[0].pk for t in trials}
    counts = n_assigned(study)
    assert counts[trials[0].pair_id] == 1  # the answered trial keeps its slot
    assert sum(counts.values()) == 1
    assert_consistent(study)


def test_a_late_judgment_for_a_released_trial_is_refused_and_writes_nothing():
    study = make_study(data=8, trials_per_session=4, lease_minutes=10)
    session = start(study)
    trial = data_trials(session).first()
    release_expired(study, now=T0 + timedelta(minutes=11))
    before = (Judgment.objects.count(), n_assigned(study))
    with pytest.raises(LeaseExpired, match="this trial's lease expired"):
        record_judgment(session, body(trial.position), now=T0 + timedelta(minutes=12))
    assert (Judgment.objects.count(), n_assigned(study)) == before
    with pytest.raises(SessionExpired, match="cannot be completed"):
        complete_session(session)
    assert_consistent(study)


def test_an_expired_but_unreleased_lease_still_holds_its_slot_and_may_be_answered():
    study = make_study(data=8, trials_per_session=4, lease_minutes=10)
    session = start(study)
    trial = data_trials(session).first()
    answer(session, trial, now=T0 + timedelta(minutes=40))  # nobody released it meanwhile
    trial.refresh_from_db()
    assert trial.leased_until is None and not trial.released
    assert n_assigned(study)[trial.pair_id] == 1
    assert_consistent(study)


def test_answering_renews_the_session_leases():
    study = make_study(data=8, trials_per_session=4, lease_minutes=30)
    session = start(study)
    first, *rest = data_trials(session)
    answer(session, first, now=T0 + timedelta(minutes=10))  # 20 min left: no renewal yet
    assert {t.leased_until for t in data_trials(session).exclude(pk=first.pk)} == {
        T0 + timedelta(minutes=30)
    }
    answer(session, rest[0], now=T0 + timedelta(minutes=20))  # 10 min left: renewed
    assert {t.leased_until for t in data_trials(session).filter(judgment__isnull=True)} == {
        T0 + timedelta(minutes=50)
    }
    assert release_expired(study, now=T0 + timedelta(minutes=45)) == 0
    assert release_expired(study, now=T0 + timedelta(minutes=51)) == 2
    assert_consistent(study)


def test_a_new_session_reuses_released_pairs():
    study = make_study(data=4, trials_per_session=4, judgments_per_pair=1, lease_minutes=5)
    abandoned = start(study)
    with pytest.raises(StudyUnavailable, match="has its 1 judgments"):
        start(study, now=T0 + timedelta(minutes=1))
    fresh = start(study, now=T0 + timedelta(minutes=6))  # start_session releases first
    assert fresh.trials.count() == 4
    abandoned.refresh_from_db()
    assert abandoned.abandoned_at == T0 + timedelta(minutes=6)
    assert set(n_assigned(study).values()) == {1}
    assert_consistent(study)


def test_completion_releases_nothing_and_needs_practice_answers_too():
    study = make_study(data=8, sentinels=2, trials_per_session=3, practice_trials=2,
                       sentinel_fraction=0.3)
    session = start(study)
    for trial in session.trials.filter(is_practice=False):
        answer(session, trial)
    with pytest.raises(SessionIncomplete, match="2 of 5 trials are still unanswered"):
        complete_session(session)
    for trial in session.trials.filter(is_practice=True):
        judgment = answer(session, trial)
        assert judgment.trial.is_practice  # stored, flagged
    before = n_assigned(study)
    completed = complete_session(session, now=T0 + timedelta(minutes=2))
    assert completed.completed_at == T0 + timedelta(minutes=2)
    assert complete_session(session).completed_at == completed.completed_at  # idempotent
    assert n_assigned(study) == before
    assert release_expired(study, now=T0 + timedelta(days=1)) == 0
    assert Session.objects.get().abandoned_at is None
    assert_consistent(study)


# ------------------------------------------------------------------------------ judgments


def test_record_judgment_is_idempotent_and_refuses_conflicts():
    study = make_study()
    session = start(study)
    data = body(1)
    judgment, created = record_judgment(session, data)
    again, created_again = record_judgment(session, data)
    assert (created, created_again, again.pk) == (True, False, judgment.pk)
    with pytest.raises(IdempotencyKeyReused):
        record_judgment(session, {**data, "response": "same"})
    with pytest.raises(AlreadyAnswered, match="position 1 already has a judgment"):
        record_judgment(session, body(1))
    with pytest.raises(UnknownTrial, match="no trial at position 9"):
        record_judgment(session, body(9))
    assert Judgment.objects.count() == 1


def test_a_retry_that_lost_the_insert_race_answers_like_a_retry(monkeypatch):
    """The original committed between the retry's key lookup and its insert."""
    study = make_study()
    session = start(study)
    data = body(0)
    original, _ = record_judgment(session, data)
    real_lookup = scheduler._stored_judgments
    calls = []

    def blind_first_lookup(trial, key):
        calls.append(1)
        return [] if len(calls) == 1 else real_lookup(trial, key)

    monkeypatch.setattr(scheduler, "_stored_judgments", blind_first_lookup)
    judgment, created = record_judgment(session, data)
    assert (judgment.pk, created) == (original.pk, False)
    assert Judgment.objects.count() == 1


def test_api_maps_lease_expiry_to_a_409_with_its_code():
    study = make_study(data=8, trials_per_session=4, lease_minutes=1)
    session = start(study, now=timezone.now() - timedelta(minutes=5))
    trial = data_trials(session).first()
    release_expired(study)
    api = APIClient()
    response = api.post(
        reverse("api-judgments", args=[session.token]), body(trial.position), format="json"
    )
    assert response.status_code == 409
    assert response.json()["code"] == "lease_expired"
    assert response.json()["error"].startswith("this trial's lease expired")
    assert Judgment.objects.count() == 0
    complete = api.post(reverse("api-complete", args=[session.token]))
    assert complete.status_code == 409 and complete.json()["code"] == "session_expired"


def test_api_stores_practice_judgments_flagged():
    study = make_study(data=8, sentinels=2, catch=2, practice_trials=2)
    session = start(study)
    api = APIClient()
    response = api.post(reverse("api-judgments", args=[session.token]), body(0), format="json")
    assert response.status_code == 201
    assert Judgment.objects.get().trial.is_practice


def test_write_views_are_rate_limited_as_participant_writes():
    assert JudgmentCreateView.throttle_scope == "participant-write"
    assert SessionCompleteView.throttle_scope == "participant-write"


# ------------------------------------------------------------------------------ invariant


def test_bookkeeping_stays_exact_under_a_random_sequence_of_operations():
    """A seeded random walk of starts, answers, retries, conflicts, clock jumps, releases and
    completions; after every step ``n_assigned`` equals judged + leased main trials."""
    rng = random.Random(2024)
    study = make_study(
        data=24, sentinels=3, catch=2, trials_per_session=4, sentinel_fraction=0.25,
        catch_fraction=0.0, practice_trials=1, judgments_per_pair=3, lease_minutes=10,
        allow_retakes=True,
    )
    now = T0
    participants: list[Participant] = []
    sent: dict[str, dict] = {}  # idempotency key → body, of every accepted judgment
    outcomes: Counter[str] = Counter()
    for _step in range(500):
        op = rng.choices(
            ["start", "answer", "retry", "conflict", "tick", "release", "complete"],
            weights=[3, 12, 1, 1, 2, 1, 2],
        )[0]
        open_sessions = list(Session.objects.filter(completed_at__isnull=True))
        live = [s for s in open_sessions if s.abandoned_at is None] or open_sessions
        try:
            if op == "start":
                if participants and rng.random() < 0.3:
                    participant = rng.choice(participants)
                else:
                    participant = new_participant(study)
                    participants.append(participant)
                start_session(participant, rng=rng, now=now)
            elif op == "answer" and open_sessions:
                session = rng.choice(live if rng.random() < 0.9 else open_sessions)
                unanswered = list(session.trials.filter(judgment__isnull=True))
                if unanswered:
                    data = body(rng.choice(unanswered).position)
                    record_judgment(session, data, now=now)
                    sent[data["idempotency_key"]] = data
            elif op == "retry" and sent:
                data = sent[rng.choice(sorted(sent))]
                judgment = Judgment.objects.select_related("trial__session").get(
                    idempotency_key=data["idempotency_key"]
                )
                _, created = record_judgment(judgment.trial.session, data, now=now)
                assert not created
            elif op == "conflict" and sent:
                data = sent[rng.choice(sorted(sent))]
                judgment = Judgment.objects.select_related("trial__session").get(
                    idempotency_key=data["idempotency_key"]
                )
                other_key = {**data, "idempotency_key": uuid.uuid4().hex}
                record_judgment(judgment.trial.session, other_key, now=now)
            elif op == "tick":
                now += timedelta(minutes=rng.choice([1, 1, 2, 4, 11]))
            elif op == "release":
                release_expired(study, now=now)
            elif op == "complete" and open_sessions:
                complete_session(rng.choice(live), now=now)
            outcomes[op] += 1
        except (StudyUnavailable, SessionIncomplete, AlreadyAnswered, LeaseExpired) as exc:
            outcomes[type(exc).__name__] += 1
        errors = assignment_errors(study)
        assert errors == [], (op, errors)
    # Every accepted judgment is stored exactly once.
    assert Judgment.objects.count() == len(sent)
    assert set(Judgment.objects.values_list("idempotency_key", flat=True)) == set(sent)
    for pair in study.pairs.filter(condition__isnull=False):
        judged = Trial.objects.filter(pair=pair, is_practice=False, judgment__isnull=False)
        assert judged.count() <= 3
    # The walk really went through the interesting states.
    for seen in ["start", "answer", "complete", "LeaseExpired", "AlreadyAnswered",
                 "SessionIncomplete", "StudyUnavailable"]:
        assert outcomes[seen] > 0, outcomes
    assert Trial.objects.filter(released=True).exists()
    assert Session.objects.filter(abandoned_at__isnull=False).exists()
