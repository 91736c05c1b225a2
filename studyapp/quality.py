"""Quality control of sessions of every protocol: metrics, cross-session flags, exclusion rules.

Per session, over its **main** trials (practice trials never count):

- *sentinel false-alarm rate*: answered sentinel trials (identical images) answered
  "different", divided by answered sentinel trials;
- *catch-trial hit rate*: answered catch trials (obviously different images) answered
  "different", divided by answered catch trials;
- *fast-response share*: answered trials with ``response_time_ms < study.fast_response_ms``,
  divided by answered trials;
- the number of main trials and of answered main trials.

Every protocol (issue 18) has control items with a known answer
(:func:`studyapp.protocols.correct_answer`): JND sentinels ("same"), 2AFC control triplets (the
side showing the copy identical to the reference), rating identical-pair anchors (the lowest
point; pair mode only: single-image anchors have no right answer) and label gold items (their
true class). The *control error rate* is the share of answered main-trial controls not given
that answer; for JND it is the sentinel false-alarm rate itself. ``Study.max_sentinel_false_alarm``
is the one exclusion switch for it in every protocol. Rating sessions with repeated items
(``Trial.is_repeat``) get a test–retest Spearman ρ of first against repeat rating, flagged
(never excluded) below RETEST_MIN_RHO from RETEST_MIN_ITEMS repeated items. Catch trials,
the superhuman test and the bot score are JND's (they read "different" answers against the
study's psychometric function); response-time regularity and automation signals flag every
protocol.

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

import math
import statistics
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

from django.db import transaction
from django.db.models import Count, Q, QuerySet
from django.utils import timezone

from .display import display_flags
from .fingerprints import (  # noqa: F401  (re-exported: the quality tools' vocabulary)
    BROWSER_ID_SESSION_KEY,
    assign_request_fingerprints,
    browser_hash,
    client_ip,
    hash_ip,
)
from .models import Session, Study, Trial
from .protocols import correct_answer

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
    automation_signals: list[str] = field(default_factory=list)
    rt_sd_ms: float | None = None
    rt_cv: float | None = None
    n_low_pairs: int = 0
    n_low_pairs_different: int = 0
    low_pairs_population_rate: float | None = None
    superhuman_p: float | None = None
    n_probes: int = 0
    n_probes_different: int = 0
    bot_score: float | None = None
    bot_llr_answers: float | None = None
    bot_llr_rt: float | None = None
    ip_shared_with: list[int] = field(default_factory=list)
    browser_shared_with: list[int] = field(default_factory=list)
    display_flags: list[str] = field(default_factory=list)  # studyapp.display (issue 17)
    protocol: str = "jnd"
    n_control: int = 0  # answered main-trial controls with a known answer (issue 18)
    n_control_wrong: int = 0
    control_error_rate: float | None = None
    n_retest: int = 0  # rating: items rated twice in this session
    retest_rho: float | None = None  # Spearman ρ, first vs repeat rating
    flags: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    staff_decision: str | None = None
    excluded: bool = False
    exclusion_reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _rate(k: int, n: int) -> float | None:
    return k / n if n else None


def rules_of(study: Study) -> dict[str, float | int | bool | None]:
    """The study's exclusion rules (``None``/``False`` = off) and the fast-response threshold."""
    return {
        "fast_response_ms": study.fast_response_ms,
        "max_sentinel_false_alarm": study.max_sentinel_false_alarm,
        "min_catch_hit_rate": study.min_catch_hit_rate,
        "max_fast_share": study.max_fast_share,
        "exclude_automation": study.exclude_automation,
        "exclude_regular_rt": study.exclude_regular_rt,
        "exclude_superhuman": study.exclude_superhuman,
        "exclude_inexact_display": study.exclude_inexact_display,
    }


def rule_violations(q: SessionQuality, study: Study) -> list[str]:
    """Each violated rule as a sentence with its numbers, e.g.
    ``"sentinel false-alarm rate 0.40 > 0.25 (2/5 identical pairs answered 'different')"``."""
    out = []
    limit = study.max_sentinel_false_alarm
    rate = q.sentinel_false_alarm_rate
    if q.protocol == "jnd" and limit is not None and rate is not None and rate > limit:
        out.append(
            f"sentinel false-alarm rate {rate:.2f} > {limit:.2f}"
            f" ({q.n_sentinel_different}/{q.n_sentinel} identical pairs answered 'different')"
        )
    rate = q.control_error_rate
    if q.protocol != "jnd" and limit is not None and rate is not None and rate > limit:
        out.append(
            f"control error rate {rate:.2f} > {limit:.2f} ({q.n_control_wrong}/{q.n_control}"
            f" {CONTROL_ERRORS.get(q.protocol, 'controls answered wrongly')})"
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
    bot = bot_flags(q)
    for switch, prefix in (
        (study.exclude_automation, "automation"),
        (study.exclude_regular_rt, "response times"),
        (study.exclude_superhuman, "superhuman"),
    ):
        if switch:
            out += [flag for flag in bot if flag.startswith(prefix)]
    if study.exclude_inexact_display:
        out += q.display_flags
    return out


#: What a control error is, per protocol (the violation sentence's words).
CONTROL_ERRORS = {
    "2afc": "control triplets answered with the side not identical to the reference",
    "rating": "identical-pair anchors rated above the lowest point",
    "label": "gold items given a wrong label",
}
#: Rating test–retest: a session with at least RETEST_MIN_ITEMS repeated items whose first and
#: repeat ratings correlate (Spearman ρ) below RETEST_MIN_RHO is flagged (not excluded).
#: People rating the same item twice within minutes agree far better (KADID/TID-style
#: test–retest ρ ≈ 0.7-0.9); a careless or random rater's ρ is ≈ 0.
RETEST_MIN_ITEMS = 5
RETEST_MIN_RHO = 0.3


def _control_metrics(study: Study, session_ids: list[int]) -> dict[int, dict[str, Any]]:
    """Per session id: answered controls with a known answer, wrong ones, and the rating
    test–retest ρ (non-JND protocols; :func:`studyapp.protocols.correct_answer`)."""
    from scipy.stats import spearmanr

    rows = Trial.objects.filter(
        session_id__in=session_ids, is_practice=False, judgment__isnull=False
    ).values_list(
        "session_id", "pair_id", "is_repeat", "natural_first", "judgment__response",
        "pair__is_sentinel", "pair__natural_path", "pair__other_path", "pair__third_path",
        "pair__class_name",
    )
    control: dict[int, list[int]] = defaultdict(lambda: [0, 0])  # session → [wrong, n]
    ratings: dict[int, dict[int, dict[bool, int]]] = defaultdict(lambda: defaultdict(dict))
    for (session_id, pair_id, is_repeat, natural_first, response, is_sentinel, natural, other,
         third, class_name) in rows:
        if is_sentinel:
            known = correct_answer(study, is_sentinel=True, natural_first=natural_first,
                                   natural_path=natural, other_path=other, third_path=third,
                                   class_name=class_name)
            if known is not None:
                control[session_id][0] += response != known
                control[session_id][1] += 1
        if study.protocol == "rating":
            ratings[session_id][pair_id][bool(is_repeat)] = int(response)
    out: dict[int, dict[str, Any]] = {}
    for session_id in session_ids:
        wrong, n = control.get(session_id, (0, 0))
        metrics: dict[str, Any] = {"n_control": n, "n_control_wrong": wrong,
                                   "control_error_rate": _rate(wrong, n)}
        twice = [(r[False], r[True]) for r in ratings.get(session_id, {}).values()
                 if False in r and True in r]
        metrics["n_retest"] = len(twice)
        if len(twice) >= 2:
            first, repeat = zip(*twice, strict=True)
            rho = spearmanr(first, repeat).statistic
            metrics["retest_rho"] = None if math.isnan(rho) else round(float(rho), 4)
        out[session_id] = metrics
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
    bots = _bot_metrics(study, [s.pk for s in sessions])
    controls = (_control_metrics(study, [s.pk for s in sessions])
                if study.protocol != "jnd" else {})
    display = display_flags(study, [s.pk for s in sessions])
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
            automation_signals=automation_signals(session.client_info, n_answered),
            **bots.get(session.pk, {}),
        )
        q.display_flags = display.get(session.pk, [])
        q.protocol = study.protocol
        if study.protocol == "jnd":
            q.n_control, q.n_control_wrong = q.n_sentinel, q.n_sentinel_different
            q.control_error_rate = q.sentinel_false_alarm_rate
        else:
            for name, value in controls.get(session.pk, {}).items():
                setattr(q, name, value)
            # "different" counts mean nothing here: the control error rate replaces them
            q.n_sentinel = q.n_sentinel_different = q.n_catch = q.n_catch_different = 0
            q.sentinel_false_alarm_rate = q.catch_hit_rate = None
        q.flags += bot_flags(q) + retest_flags(q) + q.display_flags
        if q.ip_shared_with:
            q.flags.append(f"same IP as {len(q.ip_shared_with)} other participant(s)")
        if q.browser_shared_with:
            q.flags.append(f"same browser as {len(q.browser_shared_with)} other participant(s)")
        q.violations = rule_violations(q, study)
        _decide(q, session)
        rows.append(q)
    return rows


# ----------------------------------------------------------------------------- automated sessions
#
# Four rules, flags always (shown to staff), exclusions only where the study switches them on
# (``exclude_automation``, ``exclude_regular_rt``, ``exclude_superhuman`` — the last for both
# the superhuman test and the bot score; all off by default):
#
# - automation signals, from the trial runner (``client_info``, see static/js/trials.js):
#   ``navigator.webdriver`` true; answers given but no trusted keyboard event (the answers are
#   key presses: a script posting them, or dispatching untrusted events, has none); answered
#   trials but no browser signals at all (the API driven without the runner); stimuli
#   interrupted by the page being hidden (flag only from HIDDEN_STIMULI_MIN on);
# - response times too regular to be human: over at least RT_MIN_TRIALS main-trial answers, a
#   robust standard deviation (1.4826 × the median absolute deviation) under RT_MIN_SD_MS or
#   a robust coefficient of variation (that SD / the median) under RT_MIN_CV (human
#   same/different response times vary by hundreds of ms: CV ≈ 0.3, log-normal σ ≈ 0.3-0.5);
# - superhuman sensitivity: *low-perceptibility* pairs are data pairs that the study's other
#   sessions (at least LOW_MIN_OTHERS judgments, this session left out) answered "different"
#   at a rate ≤ LOW_RATE. Under the null hypothesis the session is like the others, so its
#   number of "different" answers on such pairs is Binomial(n, p0) with p0 the mean of those
#   pairs' rates (at least LOW_P_FLOOR, a lapse rate); flagged when n ≥ LOW_MIN_TRIALS and the
#   one-sided p-value P(X ≥ x) < SUPERHUMAN_ALPHA (0.001: about one honest participant in a
#   thousand is flagged by chance; flags are for staff to read, not verdicts);
# - the bot score (issue 17, :mod:`engine.bots`): a likelihood ratio, in nats, of "one of this
#   study's people" against "a pixel-comparing bot" from the session's answers (against the
#   study's own psychometric function, fitted from its judgments, with the person's criterion
#   and slope integrated over how people vary) and its response times (people are slower near
#   threshold; a bot's sleep is unrelated to the pair). Flagged below 0 (the bot model explains
#   the session better), from BOT_MIN_TRIALS answered main trials and BOT_MIN_SESSIONS scored
#   sessions in the study. This is the evidence a pixel-diff agent with human-like log-normal
#   timing and a human-like error rate cannot fake (bench/bots.py: the rates).

RT_MIN_TRIALS = 10
RT_MIN_SD_MS = 40.0
RT_MIN_CV = 0.10
HIDDEN_STIMULI_MIN = 3
LOW_RATE = 0.25
LOW_MIN_OTHERS = 3
LOW_MIN_TRIALS = 6
LOW_P_FLOOR = 0.02
SUPERHUMAN_ALPHA = 0.001
BOT_MIN_TRIALS = 10
# Sub-threshold probes: data pairs of a condition labelled "probe" (e.g. ``generate_pairs
# --bounds 1/255@probe,...``): people answer them "same", a pixel comparison "different".
# Counted for staff; the bot score weighs them through the population function like any pair.
PROBE_LABEL = "probe"
BOT_MIN_SESSIONS = 5


def automation_signals(client_info: dict | None, n_answered: int) -> list[str]:
    """The runner's automation signals of a session, as sentences (empty: none)."""
    info = client_info or {}
    out = []
    if n_answered and "key_events" not in info:
        out.append("no browser signals: the answers did not come from the trial runner")
        return out
    if info.get("webdriver") is True:
        out.append("navigator.webdriver: the browser was driven by automation")
    if n_answered and info.get("key_events", 0) == 0:
        out.append("no trusted keyboard input, yet answers were given")
    if n_answered and info.get("pointer_events", 0) == 0 and info.get("key_events", 0) == 0:
        out.append("no trusted pointer or keyboard events at all")
    if info.get("hidden_stimuli", 0) >= HIDDEN_STIMULI_MIN:
        out.append(f"page hidden during {info['hidden_stimuli']} stimuli")
    return out


def binomial_tail(x: int, n: int, p: float) -> float:
    """P(X ≥ x) for X ~ Binomial(n, p), exactly."""
    if x <= 0:
        return 1.0
    return min(1.0, sum(math.comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(x, n + 1)))


def _rt_metrics(rts: list[float]) -> dict[str, Any]:
    """Robust response-time spread (a few slow answers, e.g. while a bot decodes images, must
    not hide a machine's pace): 1.4826 × median absolute deviation, relative to the median."""
    if len(rts) < 2:
        return {}
    median = statistics.median(rts)
    sd = 1.4826 * statistics.median(abs(rt - median) for rt in rts)
    return {"rt_sd_ms": round(sd, 3), "rt_cv": round(sd / median, 4) if median > 0 else None}


def _bot_metrics(study: Study, session_ids: list[int]) -> dict[int, dict[str, Any]]:
    """Response-time spread and the superhuman-sensitivity test, per session id (other
    protocols than JND: the response-time spread only)."""
    if study.protocol != "jnd":
        per: dict[int, list[float]] = defaultdict(list)
        for session_id, rt in Trial.objects.filter(
            session_id__in=session_ids, is_practice=False, judgment__isnull=False
        ).values_list("session_id", "judgment__response_time_ms"):
            per[session_id].append(rt)
        return {sid: _rt_metrics(per.get(sid, [])) for sid in session_ids}
    rows = list(
        Trial.objects.filter(
            session__participant__study=study, is_practice=False, judgment__isnull=False
        ).values_list(
            "session_id", "pair_id", "pair__condition_id", "judgment__response",
            "judgment__response_time_ms", "pair__is_sentinel", "pair__is_catch",
            "pair__condition__threat_model", "pair__condition__bound",
            "pair__condition__label",
        )
    )
    scores = _bot_scores([row[:-1] for row in rows])
    per_pair: dict[int, list[int]] = defaultdict(lambda: [0, 0])  # pair → [different, n]
    per_session: dict[int, list[tuple]] = defaultdict(list)
    probes: dict[int, list[int]] = defaultdict(lambda: [0, 0])  # session → [different, n]
    for session_id, pair_id, condition_id, response, rt, *_, label in rows:
        different = response == "different"
        if label == PROBE_LABEL:
            probes[session_id][0] += different
            probes[session_id][1] += 1
        if condition_id is not None:
            per_pair[pair_id][0] += different
            per_pair[pair_id][1] += 1
        per_session[session_id].append((pair_id, condition_id, different, rt))
    out: dict[int, dict[str, Any]] = {}
    for session_id in session_ids:
        answers = per_session.get(session_id, [])
        metrics: dict[str, Any] = {}
        metrics.update(_rt_metrics([rt for *_, rt in answers]))
        low_rates, x = [], 0
        for pair_id, condition_id, different, _ in answers:
            if condition_id is None:
                continue
            d_all, n_all = per_pair[pair_id]
            d_others, n_others = d_all - different, n_all - 1
            if n_others >= LOW_MIN_OTHERS and d_others / n_others <= LOW_RATE:
                low_rates.append(d_others / n_others)
                x += different
        metrics["n_low_pairs"] = len(low_rates)
        metrics["n_low_pairs_different"] = x
        if low_rates:
            p0 = max(statistics.fmean(low_rates), LOW_P_FLOOR)
            metrics["low_pairs_population_rate"] = round(p0, 4)
            metrics["superhuman_p"] = binomial_tail(x, len(low_rates), p0)
        metrics["n_probes_different"], metrics["n_probes"] = probes.get(session_id, (0, 0))
        score = scores.get(session_id)
        if score is not None:
            metrics["bot_score"] = score.score
            metrics["bot_llr_answers"] = score.llr_answers
            metrics["bot_llr_rt"] = score.llr_rt
        out[session_id] = metrics
    return out


def _bot_scores(rows: list[tuple]) -> dict[int, Any]:
    """:func:`engine.bots.score_workers` over the study's answered main trials (``rows`` of
    :func:`_bot_metrics`), for sessions with at least BOT_MIN_TRIALS of them; empty when
    fewer than BOT_MIN_SESSIONS sessions qualify (no population to compare with)."""
    import numpy as np
    import pandas as pd

    from engine import bots  # lazily: the participant pages import this module

    frame = pd.DataFrame(rows, columns=[
        "worker", "pair", "condition", "response", "rt_ms", "is_sentinel", "is_catch",
        "threat_model", "bound",
    ])
    counts = frame["worker"].value_counts()
    frame = frame[frame["worker"].isin(counts.index[counts >= BOT_MIN_TRIALS])]
    if frame["worker"].nunique() < BOT_MIN_SESSIONS:
        return {}
    frame = frame.assign(
        kind=np.select([frame["is_sentinel"], frame["is_catch"]],
                       [bots.KIND_SENTINEL, bots.KIND_CATCH], bots.KIND_DATA),
        different=frame["response"] == "different",
        bound=pd.to_numeric(frame["bound"], errors="coerce").fillna(0.0),
    )
    return bots.score_workers(frame)


def bot_flags(q: SessionQuality) -> list[str]:
    """The automated-participant flags of ``q`` (see the rules above), as sentences."""
    out = [f"automation: {signal}" for signal in q.automation_signals]
    if q.n_answered >= RT_MIN_TRIALS and q.rt_sd_ms is not None and (
        q.rt_sd_ms < RT_MIN_SD_MS or (q.rt_cv is not None and q.rt_cv < RT_MIN_CV)
    ):
        out.append(
            f"response times too regular: robust SD {q.rt_sd_ms:.0f} ms, CV {q.rt_cv or 0:.3f}"
            f" over {q.n_answered} trials (human: SD ≥ {RT_MIN_SD_MS:.0f} ms, CV ≥ {RT_MIN_CV})"
        )
    if (
        q.superhuman_p is not None
        and q.n_low_pairs >= LOW_MIN_TRIALS
        and q.superhuman_p < SUPERHUMAN_ALPHA
    ):
        out.append(
            f"superhuman sensitivity: {q.n_low_pairs_different}/{q.n_low_pairs} 'different' on "
            f"pairs the others saw as different at rate {q.low_pairs_population_rate:.2f}; "
            f"binomial p = {q.superhuman_p:.1e} < {SUPERHUMAN_ALPHA}"
        )
    from engine.bots import FLAG_BELOW as BOT_FLAG_BELOW

    if q.bot_score is not None and q.bot_score < BOT_FLAG_BELOW:
        out.append(
            f"superhuman: bot score {q.bot_score:.1f} nats < {BOT_FLAG_BELOW:g} (answers "
            f"{q.bot_llr_answers:+.1f}, response times {q.bot_llr_rt:+.1f}): a pixel-comparing "
            "bot explains this session better than the study's people do"
            + (f"; sub-threshold probes answered 'different' {q.n_probes_different}/"
               f"{q.n_probes}" if q.n_probes else "")
        )
    return out


def retest_flags(q: SessionQuality) -> list[str]:
    """The rating test–retest flag of ``q`` (see RETEST_MIN_RHO), as a sentence."""
    if q.n_retest >= RETEST_MIN_ITEMS and q.retest_rho is not None and (
        q.retest_rho < RETEST_MIN_RHO
    ):
        return [f"test–retest: Spearman ρ {q.retest_rho:.2f} < {RETEST_MIN_RHO} between first"
                f" and repeat ratings of {q.n_retest} items"]
    return []


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
            "control_error": sum(any(v.startswith(("sentinel", "control")) for v in q.violations)
                                 for q in rows),
            "fast_share": sum(any(v.startswith("fast") for v in q.violations) for q in rows),
            "automation": sum(any(v.startswith("automation") for v in q.violations) for q in rows),
            "regular_rt": sum(
                any(v.startswith("response times") for v in q.violations) for q in rows
            ),
            "superhuman": sum(any(v.startswith("superhuman") for v in q.violations) for q in rows),
        },
        "n_flagged_automated": sum(bool(bot_flags(q)) for q in rows),
        "n_flagged_retest": sum(bool(retest_flags(q)) for q in rows),
        "n_flagged_ip": sum(bool(q.ip_shared_with) for q in rows),
        "n_flagged_browser": sum(bool(q.browser_shared_with) for q in rows),
    }
