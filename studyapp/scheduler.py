"""Who sees which pair next, leases, judgments and completion: every transaction of a session.

Vocabulary
----------
- *data pair*: a perturbed pair (has a condition); needs ``study.judgments_per_pair`` = K
  judgments from main trials. *Control pairs* are sentinels (the same image twice) and catch
  pairs (two obviously different images); they are reused across participants freely.
- *practice trial*: the first ``study.practice_trials`` trials of a session, with feedback;
  judged and stored like any other (flagged by ``Trial.is_practice``), never counted towards
  K and never analysed.
- *main trial*: every other trial. A main trial of a data pair is *leased*: it holds one of
  the pair's K slots until it is answered (then the judgment holds the slot for good) or until
  its lease expires unanswered and :func:`release_expired` gives the slot back.

Invariant (checked by :func:`assignment_errors`): for every data pair,
``n_assigned == #main trials that are not released`` (= judged + leased-unanswered), and so
never more than K; for control pairs ``n_assigned == 0``.

Building a session (:func:`start_session`)
------------------------------------------
Main trials: sentinels and catch pairs as :func:`control_counts` says, the rest data pairs,
least-assigned first (``Pair.n_assigned``) with a random tie-break, only pairs with
``n_assigned < K``, never a pair the participant saw in any session (practice included). The
main trials are shuffled, so controls sit at random positions. Practice trials come first:
unused control pairs, half identical and half obviously different, topped up with data pairs
the participant has not seen (the most-assigned first: the ones the study needs least).
Which image comes first is drawn per trial (``study.randomize_first``).

Protocols (:mod:`studyapp.protocols`): every protocol's items are pairs, data and controls
alike (a 2AFC triplet, a rating item, a label item; K per item, leases, no repeats, the same
locking), and its controls (``is_sentinel``: 2AFC triplets with a side equal to the
reference, rating anchors, label gold items) take the sentinels' share
(``sentinel_fraction``). Differences: for 2AFC ``natural_first`` says which side copy A is
drawn on; one-image protocols (label, single-image rating) always have ``natural_first``.
Practice for 2AFC and label comes from control items (their answer is known: feedback), then
from data items the participant will not judge; rating practice is half anchors, half data
items (feedback only where an answer is known: pair-mode anchors). Retests
(``study.retest_fraction``, test–retest reliability): that share of the session's main data
items is shown a second time, as a trial with ``is_repeat`` placed at least
:data:`RETEST_GAP` trials after the first showing where the session is long enough; a retest
holds no lease and no slot (it is never counted toward K: its item's first showing is).

Concurrency (PostgreSQL, READ COMMITTED)
----------------------------------------
- Data pairs are taken with ``SELECT ... FOR NO KEY UPDATE SKIP LOCKED`` on ``n_assigned < K``:
  PostgreSQL re-checks the condition on the newest row version before locking, so two sessions
  can never both take a pair's last slot; a pair locked by another starting session is skipped
  (not waited for: the next candidate is taken instead, so least-assigned-first is exact
  without contention and approximate under it), and ``n_assigned`` is then raised with an
  ``F()`` update guarded by ``n_assigned < K``. Near saturation, a session that comes up
  short while pairs were locked by others, or while another transaction is releasing expired
  leases, looks again after short sleeps: with no pair taken (so holding no pair lock) for up
  to ~1.3 s before it is refused, so nobody is turned away while slots are only momentarily
  locked; with some taken, twice after 5 ms, then it settles for fewer (a pair's row lock
  blocks all its remaining slots, so at the very end of a study a session can come out
  shorter than ``trials_per_session``).
- ``NO KEY UPDATE`` (not ``UPDATE``) so the foreign-key checks of concurrent trial inserts,
  which take ``KEY SHARE`` locks on pairs, never wait on a starting session.
- :func:`release_expired` locks expired trials with ``SKIP LOCKED``, so a judgment being
  recorded for a trial (which holds that trial's row lock) wins over its release and vice
  versa; a judgment that loses finds ``released`` set and is refused (409).
- :func:`record_judgment` locks the trial row (reading its judgment, if any, in the same
  statement) and inserts; a retry of an answered trial re-reads the idempotency key under the
  lock and answers 200, not 409. When the insert hits a unique constraint (a retry racing its
  original, both past the read, or a key used for another trial) it runs once more with the
  key look-up under the lock, and answers 200 for the retry, 409 otherwise.
- Who waits for whom (so no deadlock cycle): session building never waits (SKIP LOCKED);
  a release waits for pair rows (in id order) held by builders or other releases, and for
  session rows held by a completion; a judgment waits for its own trial row and, renewing
  its session's leases, for trial rows held by a release; nothing waits for a judgment
  except requests for the same trial. Row locks are taken on one table only (``of=``, no
  joined rows): FOR UPDATE on a joined pair row would block the foreign-key checks of
  every session being built with that pair (the PostgreSQL test found exactly that).
On SQLite ``select_for_update`` is a no-op and writers are serialised by the database lock;
the guarded ``F()`` update still keeps K.

Leases
------
A leased trial's ``leased_until`` is ``now + study.lease_minutes`` when the session starts and
is pushed forward whenever the session records a judgment and half the lease is gone, so only
a session idle for ``lease_minutes`` loses its leases (a long session with breaks keeps
them). Expired leases are released lazily, by :func:`release_expired` at the start of every
new session (and by anyone who calls it, e.g. a periodic job): the trial is marked
``released``, the pair's slot returns to the pool, and the session is marked abandoned. Until
that happens an expired-but-unreleased trial still holds its slot and a late answer for it is
accepted. A released trial can never be answered (409 ``lease_expired``), so its session can
never be completed (409 ``session_expired``): its participant has to start over.
"""

from __future__ import annotations

import random
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any

from django.db import IntegrityError, transaction
from django.db.models import Count, F, Max, Min, Q
from django.utils import timezone

from . import adaptive, fastsql
from .models import Condition, Judgment, Pair, Participant, Session, Study, Trial
from .protocols import trial_spec

# Near saturation: how often, and after how long (seconds, doubling: 1.26 s in all), a session
# that could not lock a single pair with room re-reads the pool before it is refused.
LOCK_RETRIES = 6
LOCK_RETRY_SLEEP_S = 0.02
# ... and how often, after how long, one that locked some but not all re-reads it.
PARTIAL_RETRIES = 2
PARTIAL_RETRY_SLEEP_S = 0.005


# A retest comes at least this many trials after its item's first showing (where it can).
RETEST_GAP = 3

# ------------------------------------------------------------------------------ errors


class SchedulerError(Exception):
    """Base of the scheduler's refusals; ``code`` is a stable machine-readable name."""

    code = "error"


class StudyUnavailable(SchedulerError):
    """The study cannot start a session for this participant (the message says why)."""

    code = "unavailable"


class AlreadyParticipated(StudyUnavailable):
    """The participant completed a session and the study does not allow retakes.

    (Resuming an open session is the caller's business; a session abandoned by an expired
    lease does not count as taking part, so its participant may start afresh.)
    """

    code = "already_participated"


class UnknownSession(SchedulerError, LookupError):
    """No session has that token (→ 404)."""

    code = "not_found"


class UnknownTrial(SchedulerError, LookupError):
    """The session has no trial at that position (→ 404)."""

    code = "not_found"


class JudgmentConflict(SchedulerError):
    """The judgment contradicts what is stored (→ 409); nothing was written."""

    code = "conflict"


class IdempotencyKeyReused(JudgmentConflict):
    code = "idempotency_key_reused"


class AlreadyAnswered(JudgmentConflict):
    code = "already_answered"


class LeaseExpired(JudgmentConflict):
    """The trial's lease expired and its pair went back to the pool."""

    code = "lease_expired"


class SessionIncomplete(SchedulerError):
    """Some trial has no judgment yet (→ 409)."""

    code = "incomplete"


class SessionExpired(SessionIncomplete):
    """Some trial was released: the session can never be completed (→ 409)."""

    code = "session_expired"


# ------------------------------------------------------------------------------ plan


def _control_count(fraction: float, n_trials: int, n_available: int) -> int:
    if n_available == 0 or fraction <= 0 or n_trials <= 0:
        return 0
    return min(max(1, round(fraction * n_trials)), n_available)


def control_counts(
    study: Study, n_trials: int, n_sentinels: int, n_catch: int
) -> tuple[int, int]:
    """``(sentinels, catch trials)`` among ``n_trials`` main trials, given how many are available.

    ``round(fraction · n_trials)`` each, at least one when the fraction is positive and such
    pairs exist, capped by what is available; together they leave at least one trial for a
    data pair (sentinels keep priority over catch trials; a one-trial session has no controls).
    """
    room = max(n_trials - 1, 0)
    sentinels = min(_control_count(study.sentinel_fraction, n_trials, n_sentinels), room)
    catch = min(_control_count(study.catch_fraction, n_trials, n_catch), room - sentinels)
    return sentinels, catch


def sentinel_count(study: Study, n_trials: int, n_available: int) -> int:
    """How many of ``n_trials`` main trials are sentinels (see :func:`control_counts`)."""
    return control_counts(study, n_trials, n_available, 0)[0]


def _data_pairs(study: Study):
    return Pair.objects.filter(study=study, is_sentinel=False, is_catch=False)


def _expired_leases(study: Study, now: datetime):
    return Trial.objects.filter(
        session__participant__study=study,
        is_practice=False,
        released=False,
        leased_until__lt=now,  # answered trials have no lease (NULL)
    )


# A fixed study reads this many candidates per pair it wants (least-assigned first), not all
# its pairs: a study of 10,000 pairs would otherwise send every row with room to Python at every
# session start. The surplus covers pairs locked by sessions starting at the same time.
CANDIDATES_PER_PAIR = 4
MIN_CANDIDATES = 64
_PRIME = 2_147_483_647  # > any pair id: (a·id + b) mod P permutes the ids


def _candidates(
    study: Study, taken: set[int], n_wanted: int, rng: random.Random
) -> list[tuple[int, int]]:
    """``(pair id, n_assigned)`` of data pairs with room, not in ``taken``: least-assigned
    first, ties in a random order drawn from ``rng`` (a random affine permutation of the ids,
    computed by the database, so that it can stop after the first few for a fixed study; an
    adaptive study's hook needs them all). The permutation acts on ids counted from the study's
    first pair, so a seeded run (``simulate_observers --seed``) draws the same order in any
    database, whatever ids other studies took before."""
    a, b = rng.randrange(1, _PRIME), rng.randrange(_PRIME)
    first = Pair.objects.filter(study=study).aggregate(first=Min("pk"))["first"] or 0
    rows = (
        _data_pairs(study).filter(n_assigned__lt=study.judgments_per_pair)
        .exclude(pk__in=taken)
        .annotate(tie=((F("pk") - first) * a + b) % _PRIME)
        .order_by("n_assigned", "tie")
        .values_list("pk", "n_assigned")
    )
    if not study.adaptive:
        rows = rows[: max(MIN_CANDIDATES, CANDIDATES_PER_PAIR * n_wanted)]
    return list(rows)


def _lease_data_pairs(
    study: Study, exclude: set[int], n_wanted: int, rng: random.Random, now: datetime
) -> list[int]:
    """Take up to ``n_wanted`` data pairs with room (least-assigned first, random ties).

    Each returned pair is locked by this transaction and had ``n_assigned < K`` under the
    lock; the caller must increment their ``n_assigned`` in the same transaction.
    """
    k = study.judgments_per_pair
    chosen: list[int] = []
    empty_retries = partial_retries = 0
    while True:
        taken = exclude | set(chosen)
        candidates = _candidates(study, taken, n_wanted, rng)
        candidates = adaptive.order_candidates(study, candidates)  # issue 8: QUEST+ level first
        skipped = False
        start = 0
        while len(chosen) < n_wanted and start < len(candidates):
            batch = [pk for pk, _ in candidates[start : start + n_wanted - len(chosen)]]
            start += len(batch)
            locked = dict(
                Pair.objects.select_for_update(skip_locked=True, no_key=True)
                .filter(pk__in=batch, n_assigned__lt=k)
                .values_list("pk", "n_assigned")
            )
            # Re-check under the lock (PostgreSQL already re-evaluated the condition on the
            # newest row version; this guards against a backend that would not).
            chosen += [pk for pk in batch if pk in locked and locked[pk] < k]
            skipped |= len(locked) < len(batch)
        if len(chosen) >= n_wanted:
            break
        # Short. Room may appear in a moment if candidates were locked by concurrent sessions
        # (or filled up meanwhile), or if another transaction is releasing expired leases
        # (those we could not lock ourselves): look again shortly, after releasing what has
        # become free (a releaser that rolled back leaves its expired trials to us). With
        # nothing taken we hold no pair lock and may wait longer (up to ~1.3 s) rather than
        # refuse; with some pairs taken only briefly (our locks hold others up), then settle.
        if not skipped and not _expired_leases(study, now).exists():
            break
        if not chosen and empty_retries < LOCK_RETRIES:
            time.sleep(LOCK_RETRY_SLEEP_S * 2**empty_retries)
            empty_retries += 1
        elif chosen and partial_retries < PARTIAL_RETRIES:
            time.sleep(PARTIAL_RETRY_SLEEP_S)
            partial_retries += 1
        else:
            break
        release_expired(study, now=now)
    return chosen


def _perceptual_distance(distances: Mapping[str, Any]) -> tuple[int, float]:
    """Sort key of a pair's distances: LPIPS where measured (the largest of its models), else
    L-inf, else L2 (a pair with LPIPS ranks above one without)."""
    lpips = [float(v) for k, v in distances.items() if k.startswith("lpips") and v is not None]
    if lpips:
        return (2, max(lpips))
    for rank, name in ((1, "linf"), (0, "l2")):
        if distances.get(name) is not None:
            return (rank, float(distances[name]))
    return (-1, 0.0)


def example_pair_ids(study: Study, exclude: set[int] = frozenset(), limit: int = 1) -> list[int]:
    """The study's best "different" examples (issue 17): perturbed pairs at the largest bound
    of their threat model, the largest perceptual distance first (``_perceptual_distance``),
    ``exclude`` left out. Shown as a practice pair and as the instructions' example, so that
    it shows what the study is about (a visible perturbation made by the study's own attacks)
    rather than two unrelated photographs."""
    largest = dict(
        Condition.objects.filter(study=study)
        .values("threat_model").annotate(b=Max("bound")).values_list("threat_model", "b")
    )
    if not largest:
        return []
    at_largest = Q()
    for threat_model, bound in largest.items():
        at_largest |= Q(condition__threat_model=threat_model, condition__bound=bound)
    candidates = (
        _data_pairs(study).filter(at_largest).exclude(pk__in=exclude)
        .values_list("pk", "distances")
    )
    ranked = sorted(candidates, key=lambda c: (_perceptual_distance(c[1] or {}), -c[0]),
                    reverse=True)
    return [pk for pk, _ in ranked[:limit]]


def _practice_pairs(
    study: Study,
    sentinels: list[int],
    catch: list[int],
    exclude: set[int],
    n: int,
    rng: random.Random,
) -> list[int]:
    """``n`` practice pairs, half identical (sentinels) and half different: the study's best
    "different" example first (:func:`example_pair_ids`, also the instructions' example),
    then obviously different ones (catch).

    Where a kind runs short, "different" examples come from data pairs the participant will
    not judge (the most-assigned first: those the study needs least; they are perturbed, so
    "different" is the right feedback even where the difference is subtle), then identical
    ones from spare sentinels. Shuffled.
    """
    n_same = min((n + 1) // 2, len(sentinels))
    example = example_pair_ids(study, exclude) if n - n_same > 0 else []
    n_different = min(n - n_same - len(example), len(catch))
    picked = sentinels[:n_same] + example + catch[:n_different]
    if len(picked) < n:
        others = list(
            _data_pairs(study).exclude(pk__in=exclude | set(picked)).values_list("pk", "n_assigned")
        )
        rng.shuffle(others)
        others.sort(key=lambda c: -c[1])  # stable: the shuffle breaks ties
        picked += [pk for pk, _ in others[: n - len(picked)]]
    picked += sentinels[n_same : n_same + n - len(picked)]
    rng.shuffle(picked)
    return picked


def _protocol_practice_pairs(
    study: Study,
    protocol: str,
    controls: list[int],
    exclude: set[int],
    n: int,
    rng: random.Random,
) -> list[int]:
    """``n`` practice items of a protocol other than JND: control items first (2AFC, label:
    their answer is known, so each gets feedback) or half of them (rating: anchors and data
    items, so that the scale's range is seen), then data items the participant will not
    judge (the most-assigned first), then spare controls. Shuffled."""
    n_controls = min(n if protocol in ("2afc", "label") else (n + 1) // 2, len(controls))
    picked = controls[:n_controls]
    if len(picked) < n:
        others = list(
            _data_pairs(study).exclude(pk__in=exclude | set(picked))
            .values_list("pk", "n_assigned")
        )
        rng.shuffle(others)
        others.sort(key=lambda c: -c[1])  # stable: the shuffle breaks ties
        picked += [pk for pk, _ in others[: n - len(picked)]]
    picked += controls[n_controls : n_controls + n - len(picked)]
    rng.shuffle(picked)
    return picked


def retest_count(study: Study, n_data: int) -> int:
    """How many of a session's ``n_data`` main data items are shown again (retests):
    ``round(retest_fraction · n_data)``, at least one when the fraction is positive. Rating
    studies only: only their analysis reads retests (test–retest reliability), so no other
    protocol shows an item twice or counts a judgment twice (``Study.clean`` refuses it)."""
    if study.protocol != "rating" or study.retest_fraction <= 0 or n_data <= 0:
        return 0
    return min(n_data, max(1, round(study.retest_fraction * n_data)))


def _with_retests(
    main: list[tuple[int, bool]], data: list[int], n_retests: int, rng: random.Random
) -> list[tuple[int, bool, bool]]:
    """``main`` (``(pair id, leased)`` in order) as ``(pair id, leased, is_repeat)``, with a
    retest of ``n_retests`` of its data items inserted, each at least :data:`RETEST_GAP`
    trials after its first showing where the session is long enough (items shown early are
    retested first), else at the end."""
    order = [(pk, leased, False) for pk, leased in main]
    if n_retests <= 0:
        return order
    index = {pk: i for i, (pk, _) in enumerate(main)}
    room = [pk for pk in data if index[pk] + RETEST_GAP < len(main)]
    rng.shuffle(room)
    rest = [pk for pk in data if pk not in set(room)]
    rest.sort(key=lambda pk: index[pk])
    chosen = (room + rest)[:n_retests]
    inserts: dict[int, list[int]] = {}
    for pk in chosen:  # insert before main[t] (t = len(main): at the end)
        low = min(index[pk] + RETEST_GAP + 1, len(main))
        inserts.setdefault(rng.randint(low, len(main)), []).append(pk)
    out: list[tuple[int, bool, bool]] = []
    for t in range(len(main) + 1):
        out += [(pk, False, True) for pk in inserts.get(t, [])]
        if t < len(main):
            out.append(order[t])
    return out


def _why_no_data_pairs(study: Study, seen: set[int]) -> str:
    data = _data_pairs(study)
    k = study.judgments_per_pair
    if not data.exists():
        return f"study {study.slug!r} has no pairs to judge (only sentinel and catch pairs)"
    open_pairs = set(data.filter(n_assigned__lt=k).values_list("pk", flat=True))
    if not open_pairs:
        return (
            f"every pair of study {study.slug!r} has its {k} judgments "
            "(or is held by a session in progress; try again later)"
        )
    if open_pairs <= seen:
        return "this participant has already seen every pair that still needs judgments"
    return (
        f"every pair of study {study.slug!r} that still needs judgments is being assigned "
        "to other sessions right now; try again in a moment"
    )


def start_session(
    participant: Participant,
    *,
    user_agent: str = "",
    client_info: dict | None = None,
    rng: random.Random | None = None,
    now: datetime | None = None,
    **session_fields: Any,
) -> Session:
    """Create a session with its practice and main trials for ``participant``.

    ``session_fields`` are stored on the new :class:`Session` (``assignment_id``, ``ip_hash``
    ...). Releases expired leases of the study first. Raises :class:`StudyUnavailable`
    (inactive study, no data pair left for this participant) or :class:`AlreadyParticipated`;
    then nothing is written.
    """
    study = participant.study
    if not study.is_active:
        raise StudyUnavailable(f"study {study.slug!r} is not accepting participants")
    now = now or timezone.now()
    rng = rng or random.SystemRandom()
    # Its own transaction when the caller has none, so releases stick even if we refuse.
    release_expired(study, now=now)
    with transaction.atomic():
        # One start at a time per participant (double-clicks, two tabs).
        participant = Participant.objects.select_for_update().get(pk=participant.pk)
        if (
            not study.allow_retakes
            and participant.sessions.filter(completed_at__isnull=False).exists()
        ):
            raise AlreadyParticipated(
                f"this participant has already completed study {study.slug!r}, "
                "which does not allow retakes"
            )
        seen = set(
            Trial.objects.filter(session__participant=participant).values_list(
                "pair_id", flat=True
            )
        )
        controls = Pair.objects.filter(study=study).filter(
            Q(is_sentinel=True) | Q(is_catch=True)
        )
        sentinels, catch = [], []
        for pk, is_sentinel in controls.values_list("pk", "is_sentinel"):
            if pk not in seen:
                (sentinels if is_sentinel else catch).append(pk)
        rng.shuffle(sentinels)
        rng.shuffle(catch)

        n_main = study.trials_per_session
        n_sentinel, n_catch = control_counts(study, n_main, len(sentinels), len(catch))
        main_controls = [sentinels.pop() for _ in range(n_sentinel)]
        main_controls += [catch.pop() for _ in range(n_catch)]
        data = _lease_data_pairs(study, seen, n_main - len(main_controls), rng, now)
        if not data:
            raise StudyUnavailable(_why_no_data_pairs(study, seen))
        taken = Pair.objects.filter(
            pk__in=data, n_assigned__lt=study.judgments_per_pair
        ).update(n_assigned=F("n_assigned") + 1)
        if taken != len(data):  # cannot happen under the row locks; never exceed K regardless
            raise StudyUnavailable(
                "pairs filled up while this session was being built; try again in a moment"
            )
        spec = trial_spec(study)
        if spec.protocol == "jnd":
            practice = _practice_pairs(
                study, sentinels, catch, seen | set(main_controls) | set(data),
                study.practice_trials, rng,
            )
        else:
            practice = _protocol_practice_pairs(
                study, spec.protocol, sentinels + catch, seen | set(main_controls) | set(data),
                study.practice_trials, rng,
            )
        main = [(pk, False) for pk in main_controls] + [(pk, True) for pk in data]
        rng.shuffle(main)
        main = _with_retests(main, data, retest_count(study, len(data)), rng)

        session = Session.objects.create(
            participant=participant,
            user_agent=user_agent[:1000],
            client_info=client_info or {},
            **session_fields,
        )
        lease_end = now + timedelta(minutes=study.lease_minutes)

        def natural_first() -> bool:
            # One-image protocols show one image: "natural first" is always True.
            if spec.n_images == 1 or not study.randomize_first:
                return True
            return rng.random() < 0.5

        trials = [
            Trial(session=session, position=i, pair_id=pk, natural_first=natural_first(),
                  is_practice=True)
            for i, pk in enumerate(practice)
        ]
        trials += [
            Trial(session=session, position=len(practice) + i, pair_id=pk,
                  natural_first=natural_first(), leased_until=lease_end if leased else None,
                  is_repeat=is_repeat)
            for i, (pk, leased, is_repeat) in enumerate(main)
        ]
        Trial.objects.bulk_create(trials)
        return session


# ------------------------------------------------------------------------------ start / resume


def _is_open(session: Session) -> bool:
    return session.completed_at is None and session.abandoned_at is None


def standing(participant: Participant | None) -> tuple[Session | None, bool]:
    """(the participant's open session to resume, whether they completed a session)."""
    if participant is None:
        return None, False
    sessions = list(participant.sessions.order_by("-started_at"))
    resumable = next((s for s in sessions if _is_open(s)), None)
    return resumable, any(s.completed_at is not None for s in sessions)


def _point_at(session: Session, session_fields: Mapping[str, Any]) -> Session:
    """Point an open session at the current assignment (a worker may return a HIT and accept
    it again: the new ``assignmentId`` is the one to submit) or Prolific session."""
    changed = [
        name for name, value in session_fields.items()
        if value and getattr(session, name) != value
    ]
    for name in changed:
        setattr(session, name, session_fields[name])
    if changed:
        session.save(update_fields=changed)
    return session


def start_or_resume(
    study: Study,
    *,
    source: str,
    external_id: str = "",
    remembered_token: str | None = None,
    start_key: str | None = None,
    user_agent: str = "",
    session_fields: Mapping[str, Any] | None = None,
    on_create: Any = None,
) -> Session:
    """The session a consent POST sends its participant to: resumed if there is one, else new.

    Idempotent: a POST carrying the ``start_key`` of a session already started (a retry whose
    first answer was lost) returns that session, whatever the participant's cookies say; two
    such POSTs racing each other create one session (the unique ``start_key`` refuses the
    second, whose whole transaction, participant and leases included, rolls back, and which
    then finds the first's session). Otherwise, in one transaction under the participant's row
    lock: plain links (``source="link"``) find their participant through
    ``remembered_token`` (the browser's latest session) or get a new one; MTurk and Prolific
    by ``(source, external_id)``. An open session is resumed (and pointed at the current
    assignment); a participant who completed the study is refused with
    :class:`AlreadyParticipated` unless it allows retakes; else :func:`start_session`, then
    ``on_create(session)`` (request fingerprints) in the same transaction. Raises
    :class:`StudyUnavailable` too; a refusal writes nothing.
    """
    session_fields = dict(session_fields or {})
    for attempt in range(2):
        try:
            return _start_or_resume(
                study, source, external_id, remembered_token, start_key, user_agent,
                session_fields, on_create,
            )
        except IntegrityError:
            if attempt or not start_key:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def _start_or_resume(
    study, source, external_id, remembered_token, start_key, user_agent, session_fields,
    on_create,
) -> Session:
    with transaction.atomic():
        if start_key:
            started = (
                Session.objects.select_related("participant")
                .filter(start_key=start_key, participant__study=study)
                .first()
            )
            if started is not None:
                return started
        if source == "link":
            remembered = (
                Session.objects.select_related("participant")
                .filter(token=remembered_token, participant__study=study)
                .first()
                if remembered_token else None
            )
            participant = (
                remembered.participant if remembered is not None
                else Participant.objects.create(
                    study=study, source="link", external_id=str(uuid.uuid4())
                )
            )
        else:
            participant, _ = Participant.objects.get_or_create(
                study=study, source=source, external_id=external_id
            )
        # Two Start clicks of one worker at once must not make two sessions.
        participant = Participant.objects.select_for_update().get(pk=participant.pk)
        resumable, completed = standing(participant)
        if resumable is not None:
            return _point_at(resumable, session_fields)
        if completed and not study.allow_retakes:
            raise AlreadyParticipated(
                f"this participant has already completed study {study.slug!r}, "
                "which does not allow retakes"
            )
        with transaction.atomic():  # the unique start_key refuses a racing twin here
            session = start_session(
                participant, user_agent=user_agent, start_key=start_key or None,
                **session_fields,
            )
        if on_create is not None:
            on_create(session)
        return session


# ------------------------------------------------------------------------------ leases


def release_expired(study: Study, now: datetime | None = None) -> int:
    """Give back the slots of ``study``'s unanswered main trials whose lease has expired.

    Marks each such trial ``released``, lowers its pair's ``n_assigned``, and sets
    ``abandoned_at`` on its session unless that session is completed. Trials locked by a
    concurrent transaction (a judgment being recorded) are skipped. Returns how many trials
    were released.
    """
    now = now or timezone.now()
    with transaction.atomic():
        expired = list(
            _expired_leases(study, now)
            .select_for_update(skip_locked=True, of=("self",))
            .values_list("pk", "pair_id", "session_id")
        )
        if not expired:
            return 0
        Trial.objects.filter(pk__in=[pk for pk, _, _ in expired]).update(released=True)
        per_pair = Counter(pair_id for _, pair_id, _ in expired)
        for pair_id in sorted(per_pair):  # in id order: two releases cannot deadlock
            Pair.objects.filter(pk=pair_id).update(n_assigned=F("n_assigned") - per_pair[pair_id])
        Session.objects.filter(
            pk__in={session_id for _, _, session_id in expired},
            completed_at__isnull=True,
            abandoned_at__isnull=True,
        ).update(abandoned_at=now)
        return len(expired)


# ------------------------------------------------------------------------------ judgments


def _same_judgment(judgment: Judgment, session_id: int, data: Mapping[str, Any]) -> bool:
    durations = data["durations"]
    return (
        judgment.trial.session_id == session_id
        and judgment.trial.position == data["position"]
        and judgment.response == data["response"]
        and judgment.response_time_ms == data["response_time_ms"]
        and judgment.first_ms == durations["first_ms"]
        and judgment.blank_ms == durations["blank_ms"]
        and judgment.second_ms == durations["second_ms"]
    )


def _by_key(session_id: int, data: Mapping[str, Any], existing: Judgment | None):
    """``existing`` (the judgment stored under ``data``'s key) if it is this very judgment;
    :class:`IdempotencyKeyReused` if it is another; ``None`` if there is none."""
    if existing is None:
        return None
    if _same_judgment(existing, session_id, data):
        return existing
    raise IdempotencyKeyReused(
        f"idempotency_key {data['idempotency_key']!r} was already used for a different judgment"
    )


def _display_columns(display: Mapping[str, Any] | None) -> dict[str, Any]:
    """Judgment columns of the optional ``display`` object (issue 17)."""
    if not display:
        return {}
    return {
        "display_scale": display["scale"],
        "device_pixel_ratio": display["device_pixel_ratio"],
        "display_exact": display["exact"],
    }


def _stored_judgments(trial: Trial, key: str) -> list[Judgment]:
    """The judgment stored under ``key`` (any trial) and ``trial``'s judgment: one query."""
    return list(
        Judgment.objects.select_related("trial").filter(Q(idempotency_key=key) | Q(trial=trial))
    )


def _record(
    token: str, data: Mapping[str, Any], now: datetime, *, check_key: bool
) -> tuple[Judgment, bool]:
    """One transaction. The usual case (a fresh answer to a held trial) is 3 statements
    (:mod:`.fastsql`): the locked trial with what it needs, the insert, one lease update. With
    ``check_key`` (and whenever the trial is answered or released) the idempotency key is
    looked up first, so that the answer is 200 for a retry, else the right 409."""
    position = data["position"]
    key = data["idempotency_key"]
    trial = fastsql.locked_trial(token, position)
    if trial is None:
        if not Session.objects.filter(token=token).exists():
            raise UnknownSession("unknown session token")
        raise UnknownTrial(f"this session has no trial at position {position}")
    if check_key or trial.released or trial.judgment_pk is not None:
        # Holding the trial's lock: a concurrent request for it has committed or not started,
        # so a retry that raced its original now sees the original's row. One query finds
        # both the judgment stored under this key (anywhere) and this trial's judgment.
        stored = _stored_judgments(trial, key)
        by_key = next((j for j in stored if j.idempotency_key == key), None)
        existing = _by_key(trial.session_id, data, by_key)
        if existing is not None:
            return existing, False
        if any(j.trial_id == trial.pk for j in stored):
            raise AlreadyAnswered(f"the trial at position {position} already has a judgment")
        if trial.released:
            raise LeaseExpired(
                f"this trial's lease expired (no answer for {trial.lease_minutes} minutes) and "
                "its pair went to another participant; this session cannot be completed"
            )
    # Without the look-up, a key already used elsewhere (or a racing twin of this request)
    # makes the insert fail on a unique constraint: record_judgment then runs again with it.
    durations = data["durations"]
    judgment = Judgment(
        trial=trial,
        response=data["response"],
        response_time_ms=data["response_time_ms"],
        first_ms=durations["first_ms"],
        blank_ms=durations["blank_ms"],
        second_ms=durations["second_ms"],
        idempotency_key=key,
        **_display_columns(data.get("display")),
    )
    fastsql.insert(judgment)
    # The judgment now holds the pair's slot for good (n_assigned unchanged): the trial's lease
    # ends. The session's leases were all set (and are renewed) together: when this trial's
    # lease still had more than half to run, so do the others, and there is nothing to renew.
    lease = timedelta(minutes=trial.lease_minutes)
    held_until = trial.leased_until
    renew = held_until is None or held_until < now + lease / 2
    fastsql.settle_leases(
        trial.session_id, trial.pk, end=held_until is not None,
        renew_until=now + lease if renew else None, renew_before=now + lease / 2,
    )
    trial.leased_until = None
    return judgment, True


def record_judgment(
    session: Session | str, data: Mapping[str, Any], now: datetime | None = None
) -> tuple[Judgment, bool]:
    """Store the judgment ``data`` (validated ``JudgmentInputSerializer`` data) for ``session``
    (a :class:`Session`, or its token: then the session is read with the trial, no query of
    its own).

    Returns ``(judgment, created)``: ``created`` is False when the identical judgment was
    already stored under the same ``idempotency_key`` (a retry). Practice trials are recorded
    like any other (``judgment.trial.is_practice`` tells them apart). Raises
    :class:`UnknownSession`, :class:`UnknownTrial`, :class:`IdempotencyKeyReused`,
    :class:`AlreadyAnswered` or :class:`LeaseExpired`; then nothing is written.
    """
    now = now or timezone.now()
    token = session.token if isinstance(session, Session) else session
    try:
        with transaction.atomic():
            return _record(token, data, now, check_key=False)
    except IntegrityError:
        # The key was used before (for another trial), or a concurrent request with the same
        # key (or for the same trial) committed first; run again with the look-up, to answer
        # as if it had come second: 200 for a retry, 409 otherwise.
        with transaction.atomic():
            return _record(token, data, now, check_key=True)


# ------------------------------------------------------------------------------ client info


def update_client_info(session: Session, data: Mapping[str, Any]) -> dict:
    """Merge ``data`` (validated display measurements) into ``session.client_info``.

    Under the session's row lock, so two PATCHes at once both land; returns the merged dict.
    """
    with transaction.atomic():
        locked = Session.objects.select_for_update().only("pk", "client_info").get(pk=session.pk)
        locked.client_info = {**locked.client_info, **data}
        locked.save(update_fields=["client_info"])
    session.client_info = locked.client_info
    return locked.client_info


# ------------------------------------------------------------------------------ completion


def complete_session(session: Session, now: datetime | None = None) -> Session:
    """Mark ``session`` completed once every trial (practice and main) has a judgment.

    Idempotent: a completed session is returned unchanged. Raises :class:`SessionExpired` when
    some lease expired and was released (that trial can never be answered), else
    :class:`SessionIncomplete` naming how many trials are unanswered. Releases nothing.
    """
    with transaction.atomic():
        session = Session.objects.select_related("participant__study").select_for_update(
            of=("self",)
        ).get(pk=session.pk)
        if session.completed_at is not None:
            return session
        counts = session.trials.aggregate(
            n=Count("pk"),
            n_open=Count("pk", filter=Q(judgment__isnull=True)),
            n_released=Count("pk", filter=Q(released=True)),
        )
        if counts["n_released"]:
            raise SessionExpired(
                f"this session expired: {counts['n_released']} of its trials went unanswered "
                f"for {session.study.lease_minutes} minutes and were given to other "
                "participants, so it cannot be completed"
            )
        if counts["n_open"]:
            raise SessionIncomplete(
                f"{counts['n_open']} of {counts['n']} trials are still unanswered"
            )
        session.completed_at = now or timezone.now()
        session.save(update_fields=["completed_at"])
        return session


# ------------------------------------------------------------------------------ audit


def assignment_errors(study: Study, pairs: Iterable[Pair] | None = None) -> list[str]:
    """Every pair whose ``n_assigned`` disagrees with its trials, or whose data break K.

    Empty when the scheduler's bookkeeping is right: for data pairs ``n_assigned`` equals
    the main trials not released (judged + leased; retests not counted), at most K; control
    pairs stay at 0; no released trial has a judgment; no answered trial still holds a lease.
    """
    k = study.judgments_per_pair
    queryset = Pair.objects.filter(study=study) if pairs is None else pairs
    rows = queryset.annotate(
        held=Count("trials", filter=Q(
            trials__is_practice=False, trials__is_repeat=False, trials__released=False)),
        judged=Count(
            "trials",
            filter=Q(trials__is_practice=False, trials__is_repeat=False,
                     trials__judgment__isnull=False),
        ),
        released_judged=Count(
            "trials", filter=Q(trials__released=True, trials__judgment__isnull=False)
        ),
        answered_leased=Count(
            "trials",
            filter=Q(trials__judgment__isnull=False, trials__leased_until__isnull=False),
        ),
    ).values_list(
        "pk", "is_sentinel", "is_catch", "n_assigned", "held", "judged", "released_judged",
        "answered_leased",
    )
    errors = []
    for pk, is_sentinel, is_catch, n_assigned, held, judged, released_judged, leased in rows:
        control = is_sentinel or is_catch
        expected = 0 if control else held
        if n_assigned != expected:
            errors.append(f"pair {pk}: n_assigned={n_assigned}, expected {expected}")
        if not control and judged > k:
            errors.append(f"pair {pk}: {judged} judged main trials > K={k}")
        if released_judged:
            errors.append(f"pair {pk}: {released_judged} released trials have a judgment")
        if leased:
            errors.append(f"pair {pk}: {leased} answered trials still hold a lease")
    return errors
