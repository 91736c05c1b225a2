"""Who sees which pair next. The one module where session-building transactions live.

A new session gets ``study.trials_per_session`` trials: ``round(sentinel_fraction · n)``
sentinel pairs (at least one whenever the study has sentinels and the fraction is positive)
and the rest non-sentinel pairs, least-judged first with a random tie-break, never a pair the
participant already saw. The order is shuffled, so sentinels sit at random positions, and which
image comes first is drawn per trial.
"""

from __future__ import annotations

import random

from django.db import transaction
from django.db.models import Count, Q

from .models import Pair, Participant, Session, Study, Trial


class StudyUnavailable(Exception):
    """The study cannot start a session (inactive, or it has no pairs)."""


def sentinel_count(study: Study, n_trials: int, n_available: int) -> int:
    """How many of ``n_trials`` are sentinels under the study's ``sentinel_fraction``."""
    if n_available == 0 or study.sentinel_fraction <= 0:
        return 0
    wanted = max(1, round(study.sentinel_fraction * n_trials))
    return min(wanted, n_available, n_trials)


def _least_judged(pairs, n: int, rng: random.Random) -> list[Pair]:
    """The ``n`` pairs with the fewest judgments so far, ties broken at random."""
    counted = list(pairs.annotate(n_seen=Count("trials", filter=Q(trials__judgment__isnull=False))))
    rng.shuffle(counted)
    counted.sort(key=lambda p: p.n_seen)  # stable: the shuffle decides ties
    return counted[:n]


@transaction.atomic
def start_session(
    participant: Participant,
    *,
    user_agent: str = "",
    client_info: dict | None = None,
    rng: random.Random | None = None,
) -> Session:
    """Create a session with its trials for ``participant``. Raises :class:`StudyUnavailable`."""
    study = participant.study
    if not study.is_active:
        raise StudyUnavailable(f"study {study.slug!r} is not accepting participants")
    rng = rng or random.SystemRandom()
    seen = Trial.objects.filter(session__participant=participant).values("pair_id")
    fresh = study.pairs.exclude(id__in=seen)
    sentinels = fresh.filter(is_sentinel=True)
    perturbed = fresh.filter(is_sentinel=False, is_catch=False)
    n_trials = study.trials_per_session
    n_sentinel = sentinel_count(study, n_trials, sentinels.count())
    chosen = _least_judged(sentinels, n_sentinel, rng)
    chosen += _least_judged(perturbed, n_trials - len(chosen), rng)
    if not chosen:
        raise StudyUnavailable(f"study {study.slug!r} has no pairs left for this participant")
    rng.shuffle(chosen)
    session = Session.objects.create(
        participant=participant, user_agent=user_agent[:1000], client_info=client_info or {}
    )
    Trial.objects.bulk_create(
        Trial(session=session, position=i, pair=pair, natural_first=rng.random() < 0.5)
        for i, pair in enumerate(chosen)
    )
    return session
