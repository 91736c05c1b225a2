"""Study counts, progress and export rows: one place for ``/staff/``, the staff API and tools.

Definitions (the same everywhere):

- *data pairs* (``n_pairs``) have a condition; *control pairs* are sentinels and catch pairs,
  counted apart (``n_sentinel_pairs``, ``n_catch_pairs``);
- ``n_judgments`` counts judgments of main trials only; practice judgments (never analysed)
  are ``n_practice_judgments``;
- sessions: ``n_sessions`` started, ``n_completed``, ``n_excluded``.
"""

from __future__ import annotations

from typing import Any

from django.db.models import Count, Q

from .models import Condition, Judgment, Pair, Session, Study, Trial


def _by(queryset, key: str, **aggregates) -> dict[Any, dict[str, int]]:
    return {row[key]: row for row in queryset.values(key).annotate(**aggregates)}


def study_counts(study: Study | None = None) -> dict[int, dict[str, int]]:
    """Per study id: conditions, pairs by kind, sessions and judgments (see module doc).

    Every study's, or only ``study``'s (the same numbers, without counting the others).
    """

    def of(queryset, path: str):
        return queryset if study is None else queryset.filter(**{path: study.pk})

    pairs = _by(
        of(Pair.objects, "study"),
        "study",
        n_sentinel=Count("id", filter=Q(is_sentinel=True)),
        n_catch=Count("id", filter=Q(is_catch=True)),
        n_all=Count("id"),
    )
    conditions = _by(of(Condition.objects, "study"), "study", n=Count("id"))
    sessions = _by(
        of(Session.objects, "participant__study"),
        "participant__study",
        n=Count("id"),
        n_completed=Count("id", filter=Q(completed_at__isnull=False)),
        n_excluded=Count("id", filter=Q(excluded=True)),
    )
    judgments = _by(
        of(Judgment.objects, "trial__session__participant__study"),
        "trial__session__participant__study",
        n_main=Count("id", filter=Q(trial__is_practice=False)),
        n_practice=Count("id", filter=Q(trial__is_practice=True)),
    )
    out = {}
    for pk in of(Study.objects, "pk").values_list("pk", flat=True):
        p, s, j = pairs.get(pk, {}), sessions.get(pk, {}), judgments.get(pk, {})
        out[pk] = {
            "n_conditions": conditions.get(pk, {}).get("n", 0),
            "n_pairs": p.get("n_all", 0) - p.get("n_sentinel", 0) - p.get("n_catch", 0),
            "n_sentinel_pairs": p.get("n_sentinel", 0),
            "n_catch_pairs": p.get("n_catch", 0),
            "n_sessions": s.get("n", 0),
            "n_completed": s.get("n_completed", 0),
            "n_excluded": s.get("n_excluded", 0),
            "n_judgments": j.get("n_main", 0),
            "n_practice_judgments": j.get("n_practice", 0),
        }
    return out


def _pair_judgment_counts(study: Study) -> dict[int, tuple[int, int, int]]:
    """One aggregate query: per pair id, ``(main judgments, of them in excluded sessions,
    practice judgments)``, grouped on the judgment side (inner joins, no per-pair subquery).

    On SQLite the join order is forced (``CROSS JOIN``: scan the judgments, look up trial and
    session by primary key), 6× faster at a million judgments than the planner's choice of
    walking trials through the pair index; elsewhere the ORM query.
    """
    from django.db import connection

    if connection.vendor == "sqlite":
        j, t, s, p = (m._meta.db_table for m in (Judgment, Trial, Session, Pair))
        sql = (
            f"SELECT t.pair_id,"
            f" SUM(CASE WHEN NOT t.is_practice THEN 1 ELSE 0 END),"
            f" SUM(CASE WHEN NOT t.is_practice AND s.excluded THEN 1 ELSE 0 END),"
            f" SUM(CASE WHEN t.is_practice THEN 1 ELSE 0 END)"
            f" FROM {j} j CROSS JOIN {t} t ON t.id = j.trial_id"
            f" CROSS JOIN {s} s ON s.id = t.session_id"
            f" WHERE t.pair_id IN (SELECT id FROM {p} WHERE study_id = %s)"
            f" GROUP BY t.pair_id"
        )
        with connection.cursor() as cursor:
            cursor.execute(sql, [study.pk])
            return {pk: (int(n), int(e), int(pr)) for pk, n, e, pr in cursor.fetchall()}
    return _pair_judgment_counts_orm(study)


def _pair_judgment_counts_orm(study: Study) -> dict[int, tuple[int, int, int]]:
    """:func:`_pair_judgment_counts` through the ORM (any database)."""
    main = Q(trial__is_practice=False)
    rows = (
        Judgment.objects.filter(trial__pair__study_id=study.pk)
        .values("trial__pair_id")
        .annotate(
            n=Count("id", filter=main),
            n_excl=Count("id", filter=main & Q(trial__session__excluded=True)),
            n_practice=Count("id", filter=Q(trial__is_practice=True)),
        )
        .values_list("trial__pair_id", "n", "n_excl", "n_practice")
    )
    return {pk: (n, e, p) for pk, n, e, p in rows}


def _session_counts(study: Study) -> dict[str, int]:
    """One aggregate query over the study's sessions."""
    return Session.objects.filter(participant__study=study).aggregate(
        started=Count("id"),
        completed=Count("id", filter=Q(completed_at__isnull=False)),
        abandoned=Count("id", filter=Q(completed_at__isnull=True, abandoned_at__isnull=False)),
        in_progress=Count("id", filter=Q(completed_at__isnull=True, abandoned_at__isnull=True)),
        excluded=Count("id", filter=Q(excluded=True)),
    )


def study_progress(study: Study, *, _judgments=None, _sessions=None) -> dict[str, Any]:
    """Per condition: pairs, judgments, pairs that reached K; session counts.

    Two aggregate queries over the big tables (judgments per pair, sessions) plus the study's
    pairs and conditions.
    """
    k = study.judgments_per_pair
    counts = _pair_judgment_counts(study) if _judgments is None else _judgments
    pairs = study.pairs.values_list(
        "id", "is_sentinel", "is_catch", "condition__spec", "condition__threat_model",
        "condition__bound", "condition__label",
    ).order_by("id")
    groups: dict[str, dict[str, Any]] = {}
    for pk, is_sentinel, is_catch, spec, tm, bound, label in pairs:
        has_condition = spec is not None
        name = "sentinel" if is_sentinel else "catch" if is_catch else spec
        row = groups.setdefault(
            name,
            {
                "condition": name,
                "threat_model": tm if has_condition else name,
                "bound": bound if has_condition else None,
                "label": label if has_condition else "",
                "n_pairs": 0,
                "n_judgments": 0,
                "n_judgments_excluded": 0,
                "n_pairs_at_k": 0 if has_condition else None,
                "_valid": 0,
            },
        )
        n_j, n_excl, _ = counts.get(pk, (0, 0, 0))
        row["n_pairs"] += 1
        row["n_judgments"] += n_j
        row["n_judgments_excluded"] += n_excl
        if has_condition:
            valid = n_j - n_excl
            row["n_pairs_at_k"] += valid >= k
            row["_valid"] += min(valid, k)
    controls = [groups.pop(n) for n in ("sentinel", "catch") if n in groups]
    conditions = sorted(groups.values(), key=lambda r: (r["threat_model"], r["bound"]))
    sessions = _session_counts(study) if _sessions is None else _sessions
    rows = conditions + controls
    needed = k * sum(r["n_pairs"] for r in conditions)
    valid = sum(r.pop("_valid") for r in rows)
    return {
        "study": study.slug,
        "judgments_per_pair": k,
        "conditions": rows,
        "sessions": sessions,
        "n_judgments_needed": needed,
        "n_judgments_valid": valid,
    }


def study_overview(study: Study) -> tuple[dict[str, int], dict[str, Any]]:
    """``(study_counts(study)[study.pk], study_progress(study))`` from two aggregate queries
    over the big tables (judgments per pair, sessions) instead of five: the same numbers
    (tests/studyapp/test_reports.py), for ``analyze`` at a million judgments."""
    judgments = _pair_judgment_counts(study)
    sessions = _session_counts(study)
    progress = study_progress(study, _judgments=judgments, _sessions=sessions)
    pair_kinds = study.pairs.aggregate(
        n_sentinel=Count("id", filter=Q(is_sentinel=True)),
        n_catch=Count("id", filter=Q(is_catch=True)),
        n_all=Count("id"),
    )
    counts = {
        "n_conditions": Condition.objects.filter(study=study).count(),
        "n_pairs": pair_kinds["n_all"] - pair_kinds["n_sentinel"] - pair_kinds["n_catch"],
        "n_sentinel_pairs": pair_kinds["n_sentinel"],
        "n_catch_pairs": pair_kinds["n_catch"],
        "n_sessions": sessions["started"],
        "n_completed": sessions["completed"],
        "n_excluded": sessions["excluded"],
        "n_judgments": sum(v[0] for v in judgments.values()),
        "n_practice_judgments": sum(v[2] for v in judgments.values()),
    }
    return counts, progress


# ----------------------------------------------------------------------------- export

EXPORT_COLUMNS = [
    "study",
    "session_id",
    "participant_source",
    "participant_id",
    "assignment_id",
    "hit_id",
    "external_study_id",
    "external_session_id",
    "session_completed",
    "session_excluded",
    "exclusion_reason",
    "trial_position",
    "pair_id",
    "pair_key",
    "source_image",
    "condition",
    "threat_model",
    "bound",
    "condition_label",
    "is_sentinel",
    "is_catch",
    "natural_first",
    "response",
    "response_time_ms",
    "first_ms",
    "blank_ms",
    "second_ms",
    "display_scale",
    "device_pixel_ratio",
    "display_exact",
    "judged_at",
]


def export_rows(study: Study) -> tuple[list[str], list[dict[str, Any]]]:
    """Columns and one row per main-trial judgment of ``study`` (session, then position)."""
    fields = {
        "session_id": "trial__session_id",
        "participant_source": "trial__session__participant__source",
        "participant_id": "trial__session__participant__external_id",
        "assignment_id": "trial__session__assignment_id",
        "hit_id": "trial__session__hit_id",
        "external_study_id": "trial__session__external_study_id",
        "external_session_id": "trial__session__external_session_id",
        "completed_at": "trial__session__completed_at",
        "session_excluded": "trial__session__excluded",
        "exclusion_reason": "trial__session__exclusion_reason",
        "trial_position": "trial__position",
        "pair_id": "trial__pair_id",
        "pair_key": "trial__pair__key",
        "source_image": "trial__pair__source_image",
        "condition": "trial__pair__condition__spec",
        "threat_model": "trial__pair__condition__threat_model",
        "bound": "trial__pair__condition__bound",
        "condition_label": "trial__pair__condition__label",
        "is_sentinel": "trial__pair__is_sentinel",
        "is_catch": "trial__pair__is_catch",
        "natural_first": "trial__natural_first",
        "distances": "trial__pair__distances",
        "response": "response",
        "response_time_ms": "response_time_ms",
        "first_ms": "first_ms",
        "blank_ms": "blank_ms",
        "second_ms": "second_ms",
        # Issue 17: how the browser drew the pair (studyapp.display); empty if not reported.
        "display_scale": "display_scale",
        "device_pixel_ratio": "device_pixel_ratio",
        "display_exact": "display_exact",
        "judged_at": "created_at",
    }
    judgments = (
        Judgment.objects.filter(trial__session__participant__study=study, trial__is_practice=False)
        .order_by("trial__session_id", "trial__position")
        .values_list(*fields.values())
    )
    rows = []
    distance_names: set[str] = set()
    for values in judgments:
        row = dict(zip(fields, values, strict=True))
        row["study"] = study.slug
        row["session_completed"] = row.pop("completed_at") is not None
        distances = row.pop("distances") or {}
        for name, value in distances.items():
            column = name if name not in fields and name not in EXPORT_COLUMNS else f"d_{name}"
            row[column] = value
            distance_names.add(column)
        rows.append(row)
    columns = EXPORT_COLUMNS + sorted(distance_names)
    return columns, [{c: row.get(c) for c in columns} for row in rows]


# ----------------------------------------------------------------------------- study list


def staff_study_list(progress=study_progress) -> list[dict[str, Any]]:
    """The staff's one study list (``/dashboard/``; ``/staff/`` shows the same page): per
    study, newest first, ``{"study", **study_counts(), "progress"}``.

    One judgment count: ``n_judgments`` (main-trial judgments of every session, as the staff
    API's ``n_judgments``). ``progress`` (:func:`study_progress`, or a cached twin) adds the
    share of the target reached: ``n_judgments_valid`` of ``n_judgments_needed`` (at most K
    per pair, sessions not excluded), and the session states.
    """
    counts = study_counts()
    return [{"study": study, **counts[study.pk], "progress": progress(study)}
            for study in Study.objects.order_by("-created_at", "slug")]
