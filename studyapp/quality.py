"""Quality control of JND sessions: metrics, cross-session flags, exclusion rules.

Per session, over its **main** trials (practice trials never count):

- *sentinel false-alarm rate*: answered sentinel trials (identical images) answered
  "different", divided by answered sentinel trials;
- *catch-trial hit rate*: answered catch trials (obviously different images) answered
  "different", divided by answered catch trials;
- *fast-response share*: answered trials with ``response_time_ms < study.fast_response_ms``,
  divided by answered trials;
- the number of main trials and of answered main trials.

A rate is ``None`` when its denominator is 0 (e.g. a study without catch pairs); a rule never
excludes on a ``None`` rate.

Cross-session flags (never exclusions, never blocks): the same salted IP hash, or the same
browser hash, under several participants of the same study. Two people behind one lab NAT share
an IP; one person with two worker ids in one browser shares a browser id. Staff decide.

Exclusion rules are the study's fields ``max_sentinel_false_alarm`` (exclude when the rate is
above it), ``min_catch_hit_rate`` (exclude when below) and ``max_fast_share`` (exclude when
above); ``None`` turns a rule off. :func:`apply_exclusions` stores the metrics in
``Session.quality`` and sets ``excluded`` / ``exclusion_reason``; excluded sessions stay stored.
It is idempotent, and a relaxed rule un-excludes on the next run. A staff decision
(:func:`set_staff_decision`, the admin's actions) overrides the rules in either direction until
it is cleared.

IP and browser hashes come from :mod:`studyapp.fingerprints` (re-exported here).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

from django.db import transaction
from django.db.models import Count, Q, QuerySet
from django.utils import timezone

from .fingerprints import (  # noqa: F401  (re-exported: the quality tools' vocabulary)
    BROWSER_ID_SESSION_KEY,
    assign_request_fingerprints,
    browser_hash,
    client_ip,
    hash_ip,
)
from .models import Session, Study, Trial

STAFF_EXCLUDE = "exclude"
STAFF_INCLUDE = "include"


# ----------------------------------------------------------------------------- metrics


@dataclass
class SessionQuality:
    """Quality metrics of one session, and what the study's rules make of them."""

    session_id: int
    participant: str
    completed: bool
    n_main_trials: int
    n_answered: int
    n_sentinel: int
    n_sentinel_different: int
    sentinel_false_alarm_rate: float | None
    n_catch: int
    n_catch_different: int
    catch_hit_rate: float | None
    n_fast: int
    fast_share: float | None
    ip_shared_with: list[int] = field(default_factory=list)
    browser_shared_with: list[int] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    staff_decision: str | None = None
    excluded: bool = False
    exclusion_reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _rate(k: int, n: int) -> float | None:
    return k / n if n else None


def rules_of(study: Study) -> dict[str, float | int | None]:
    """The study's exclusion rules (``None`` = off) and the fast-response threshold."""
    return {
        "fast_response_ms": study.fast_response_ms,
        "max_sentinel_false_alarm": study.max_sentinel_false_alarm,
        "min_catch_hit_rate": study.min_catch_hit_rate,
        "max_fast_share": study.max_fast_share,
    }


def rule_violations(q: SessionQuality, study: Study) -> list[str]:
    """Each violated rule as a sentence with its numbers, e.g.
    ``"sentinel false-alarm rate 0.40 > 0.25 (2/5 identical pairs answered 'different')"``."""
    out = []
    limit = study.max_sentinel_false_alarm
    rate = q.sentinel_false_alarm_rate
    if limit is not None and rate is not None and rate > limit:
        out.append(
            f"sentinel false-alarm rate {rate:.2f} > {limit:.2f}"
            f" ({q.n_sentinel_different}/{q.n_sentinel} identical pairs answered 'different')"
        )
    limit, rate = study.min_catch_hit_rate, q.catch_hit_rate
    if limit is not None and rate is not None and rate < limit:
        out.append(
            f"catch-trial hit rate {rate:.2f} < {limit:.2f}"
            f" ({q.n_catch_different}/{q.n_catch} obviously different pairs answered 'different')"
        )
    limit, rate = study.max_fast_share, q.fast_share
    if limit is not None and rate is not None and rate > limit:
        out.append(
            f"fast-response share {rate:.2f} > {limit:.2f}"
            f" ({q.n_fast}/{q.n_answered} responses faster than {study.fast_response_ms} ms)"
        )
    return out


def _shared(sessions: QuerySet[Session], field_name: str) -> dict[str, set[int]]:
    """hash → participant ids using it, for hashes used by more than one participant."""
    groups: dict[str, set[int]] = defaultdict(set)
    for value, participant_id in sessions.exclude(**{field_name: ""}).values_list(
        field_name, "participant_id"
    ):
        groups[value].add(participant_id)
    return {value: ids for value, ids in groups.items() if len(ids) > 1}


def compute_quality(study: Study, *, include_incomplete: bool = False) -> list[SessionQuality]:
    """Metrics, flags and rule verdicts for the study's completed sessions (nothing is saved).

    ``excluded`` / ``exclusion_reason`` on the rows say what :func:`apply_exclusions` would
    store. With ``include_incomplete`` unfinished sessions are evaluated too.
    """
    all_sessions = Session.objects.filter(participant__study=study)
    sessions = (
        all_sessions if include_incomplete else all_sessions.filter(completed_at__isnull=False)
    )
    sessions = sessions.select_related("participant").order_by("id")
    answered = Q(judgment__isnull=False)
    different = Q(judgment__response="different")
    counts = {
        row["session_id"]: row
        for row in Trial.objects.filter(session__in=sessions, is_practice=False)
        .values("session_id")
        .annotate(
            n_main=Count("id"),
            n_answered=Count("id", filter=answered),
            n_sentinel=Count("id", filter=answered & Q(pair__is_sentinel=True)),
            n_sentinel_diff=Count("id", filter=different & Q(pair__is_sentinel=True)),
            n_catch=Count("id", filter=answered & Q(pair__is_catch=True)),
            n_catch_diff=Count("id", filter=different & Q(pair__is_catch=True)),
            n_fast=Count(
                "id", filter=answered & Q(judgment__response_time_ms__lt=study.fast_response_ms)
            ),
        )
    }
    shared_ip = _shared(all_sessions, "ip_hash")
    shared_browser = _shared(all_sessions, "browser_hash")
    rows = []
    for session in sessions:
        c = counts.get(session.pk, {})
        n_answered = c.get("n_answered", 0)
        q = SessionQuality(
            session_id=session.pk,
            participant=str(session.participant),
            completed=session.completed_at is not None,
            n_main_trials=c.get("n_main", 0),
            n_answered=n_answered,
            n_sentinel=c.get("n_sentinel", 0),
            n_sentinel_different=c.get("n_sentinel_diff", 0),
            sentinel_false_alarm_rate=_rate(c.get("n_sentinel_diff", 0), c.get("n_sentinel", 0)),
            n_catch=c.get("n_catch", 0),
            n_catch_different=c.get("n_catch_diff", 0),
            catch_hit_rate=_rate(c.get("n_catch_diff", 0), c.get("n_catch", 0)),
            n_fast=c.get("n_fast", 0),
            fast_share=_rate(c.get("n_fast", 0), n_answered),
            ip_shared_with=sorted(shared_ip.get(session.ip_hash, set()) - {session.participant_id}),
            browser_shared_with=sorted(
                shared_browser.get(session.browser_hash, set()) - {session.participant_id}
            ),
            staff_decision=(session.quality or {}).get("staff_decision"),
        )
        if q.ip_shared_with:
            q.flags.append(f"same IP as {len(q.ip_shared_with)} other participant(s)")
        if q.browser_shared_with:
            q.flags.append(f"same browser as {len(q.browser_shared_with)} other participant(s)")
        q.violations = rule_violations(q, study)
        _decide(q, session)
        rows.append(q)
    return rows


def _decide(q: SessionQuality, session: Session) -> None:
    """Set ``q.excluded`` / ``q.exclusion_reason``: a staff decision wins over the rules."""
    if q.staff_decision == STAFF_EXCLUDE:
        q.excluded = True
        q.exclusion_reason = session.exclusion_reason or "excluded by staff"
    elif q.staff_decision == STAFF_INCLUDE:
        q.excluded, q.exclusion_reason = False, ""
    elif session.excluded and (session.quality or {}).get("excluded_by") != "rules":
        # Excluded by hand (e.g. the admin's checkbox) before any rule run: never undone here.
        q.staff_decision = STAFF_EXCLUDE
        q.excluded = True
        q.exclusion_reason = session.exclusion_reason or "excluded by staff"
    else:
        q.excluded = bool(q.violations)
        q.exclusion_reason = "; ".join(q.violations)


def _quality_json(q: SessionQuality, study: Study) -> dict[str, Any]:
    data = q.as_dict()
    for key in ("session_id", "participant", "excluded", "exclusion_reason"):
        data.pop(key)
    data["rules"] = rules_of(study)
    data["computed_at"] = timezone.now().isoformat()
    if q.staff_decision is None:
        data.pop("staff_decision")
    if q.excluded and q.staff_decision is None:
        data["excluded_by"] = "rules"
    elif q.excluded:
        data["excluded_by"] = "staff"
    return data


@transaction.atomic
def apply_exclusions(study: Study, *, include_incomplete: bool = False) -> list[SessionQuality]:
    """Compute QC for the study's completed sessions and store it; returns the table rows.

    Writes ``Session.quality`` (metrics, flags, violations, the rules used), ``excluded`` and
    ``exclusion_reason``. Re-running with the same data changes nothing but ``computed_at``; a
    relaxed rule un-excludes sessions it excluded before (never staff exclusions).
    """
    # Lock the rows so a concurrent staff decision is not overwritten with stale data.
    sessions = list(
        Session.objects.select_for_update()
        .filter(participant__study=study)
        .filter(Q() if include_incomplete else Q(completed_at__isnull=False))
    )
    rows = compute_quality(study, include_incomplete=include_incomplete)
    by_id = {s.pk: s for s in sessions}
    changed = []
    for q in rows:
        session = by_id.get(q.session_id)
        if session is None:  # completed between the two queries: next run picks it up
            continue
        session.quality = _quality_json(q, study)
        session.excluded = q.excluded
        session.exclusion_reason = q.exclusion_reason
        changed.append(session)
    Session.objects.bulk_update(changed, ["quality", "excluded", "exclusion_reason"])
    return rows


@transaction.atomic
def set_staff_decision(sessions: QuerySet[Session], decision: str | None, reason: str = "") -> int:
    """Record a staff decision that overrides the rules: ``"exclude"``, ``"include"`` or
    ``None`` (back to the rules on the next :func:`apply_exclusions`). Returns rows changed."""
    if decision not in (STAFF_EXCLUDE, STAFF_INCLUDE, None):
        raise ValueError(f"decision must be 'exclude', 'include' or None, not {decision!r}")
    changed = []
    for session in sessions.select_for_update():
        quality = dict(session.quality or {})
        if decision is None:
            quality.pop("staff_decision", None)
            quality["excluded_by"] = "rules"  # the rules decide again on the next run
        else:
            quality["staff_decision"] = decision
        if decision == STAFF_EXCLUDE:
            session.excluded = True
            session.exclusion_reason = reason or "excluded by staff"
            quality["excluded_by"] = "staff"
        elif decision == STAFF_INCLUDE:
            session.excluded = False
            session.exclusion_reason = ""
            quality.pop("excluded_by", None)
        session.quality = quality
        changed.append(session)
    Session.objects.bulk_update(changed, ["quality", "excluded", "exclusion_reason"])
    return len(changed)


def summary(rows: list[SessionQuality], study: Study) -> dict[str, Any]:
    """Counts for a QC table: sessions, excluded, per rule, flagged."""
    return {
        "study": study.slug,
        "rules": rules_of(study),
        "n_sessions": len(rows),
        "n_excluded": sum(q.excluded for q in rows),
        "n_excluded_by_staff": sum(q.excluded and q.staff_decision == STAFF_EXCLUDE for q in rows),
        "n_violating": {
            "sentinel_false_alarm": sum(
                any(v.startswith("sentinel") for v in q.violations) for q in rows
            ),
            "catch_hit_rate": sum(any(v.startswith("catch") for v in q.violations) for q in rows),
            "fast_share": sum(any(v.startswith("fast") for v in q.violations) for q in rows),
        },
        "n_flagged_ip": sum(bool(q.ip_shared_with) for q in rows),
        "n_flagged_browser": sum(bool(q.browser_shared_with) for q in rows),
    }
