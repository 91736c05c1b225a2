"""Staff dashboard (``/dashboard/``): study list, and per study progress, statistics, QC,
calibrated fits and the paper's figures (server-rendered, PNG/SVG/CSV).

Staff only. Counts of progress come from :func:`studyapp.reports.study_progress` (the same
numbers as the staff API, cached by study state); statistics and figures from the engine through
:mod:`studyapp.dashboard_figures`, cached by study state, with the same defaults as
``manage.py analyze`` (1000 bootstrap resamples, seed 0; excluded sessions and simulated
observers left out), so the page and the command agree.
"""

from __future__ import annotations

import math
import statistics

import pandas as pd
from django.contrib.admin.views.decorators import staff_member_required
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, render
from django.views.decorators.http import require_GET

from . import adaptive, dashboard_figures
from .models import Calibration, Session, Study

PARTICIPANT_ROWS = 100


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def table(frame: pd.DataFrame, columns: list[str] | None = None, key: str | None = None):
    """``{"columns", "rows"}`` for templates/dashboard/_table.html; cells formatted to 4 places.

    Each row carries ``key`` (the value of column ``key``) so tests and scripts can find a
    cell by ``data-row``/``data-col``.
    """
    if frame is None or frame.empty:
        return {"columns": columns or [], "rows": []}
    columns = [c for c in (columns or list(frame.columns)) if c in frame.columns]
    rows = []
    for record in frame.to_dict("records"):
        rows.append({
            "key": _cell(record.get(key)) if key else "",
            "cells": [(c, _cell(record[c])) for c in columns],
        })
    return {"columns": columns, "rows": rows}


def session_stats(study: Study) -> dict:
    times = list(
        Session.objects.filter(participant__study=study, completed_at__isnull=False)
        .values_list("started_at", "completed_at")
    )
    minutes = [(done - start).total_seconds() / 60 for start, done in times]
    return {"median_minutes": statistics.median(minutes) if minutes else None}


@staff_member_required
@require_GET
def study_list(request: HttpRequest) -> HttpResponse:
    rows = []
    for study in Study.objects.all():
        progress = dashboard_figures.cached_progress(study)
        s = progress["sessions"]
        rows.append({
            "study": study,
            "needed": progress["n_judgments_needed"],
            "valid": progress["n_judgments_valid"],
            "sessions": s,
            "completion_rate": s["completed"] / s["started"] if s["started"] else None,
        })
    return render(request, "dashboard/study_list.html", {"rows": rows})


@staff_member_required
@require_GET
def study_detail(request: HttpRequest, slug: str) -> HttpResponse:
    study = get_object_or_404(Study, slug=slug)
    with_simulated = request.GET.get("simulated") == "1"
    summary, state = dashboard_figures.cached_summary(study, include_simulated=with_simulated)
    progress = summary["progress"]
    sessions = progress["sessions"]
    report = summary["report"]
    perc_cols = ["condition", "threat_model", "bound", "label", "n_pairs", "n_judgments",
                 "perceptibility", "ci_low", "ci_high", "boot_low", "boot_high"]
    # stored size ÷ bound beside perceptibility (stimulus mode aims at [0.95, 1])
    perc_cols += [c for c in ("size_ratio_min", "size_ratio_median", "n_not_at_bound")
                  if c in report.perceptibility.columns]
    perc_cols += [c for c in report.perceptibility.columns if c.startswith("mean_")]
    excluded = list(
        Session.objects.filter(participant__study=study, excluded=True)
        .order_by("pk").values("pk", "participant_id", "exclusion_reason")
    )
    calibration = Calibration.objects.filter(study=study).order_by("-created_at", "-id").first()
    fits = pd.DataFrame()
    if calibration is not None:
        fits = dashboard_figures.latest_calibration(study).table()
        if not fits.empty:
            fits = fits.sort_values(["threat_model", "target"], kind="stable")
            fits["key"] = fits["threat_model"] + ":" + fits["label"]
    table4 = report.table4.copy()
    if not table4.empty:
        table4["key"] = [f"{tm}:{b:g}" for tm, b in zip(table4["threat_model"],
                                                       table4["bound"], strict=True)]
    exclusions = pd.DataFrame(
        [{"what": k, "value": v} for k, v in report.exclusions.items()])
    context = {
        "study": study,
        "state": state,
        "with_simulated": with_simulated,
        "progress": progress,
        "sessions": sessions,
        "completion_rate": (sessions["completed"] / sessions["started"]
                            if sessions["started"] else None),
        "session_stats": session_stats(study),
        "n_used": summary["n_used"],
        "n_simulated": summary["n_simulated"],
        "perceptibility": table(report.perceptibility, perc_cols, key="condition"),
        "controls": table(report.controls, key="control"),
        "correlations": table(report.correlations, key="distance"),
        # worst false-alarm rates first; the page shows at most PARTICIPANT_ROWS of them
        "participants": table(
            report.participants.sort_values("fa_rate", ascending=False,
                                            kind="stable").head(PARTICIPANT_ROWS),
            key="participant"),
        "n_participants": len(report.participants),
        "participant_rows": PARTICIPANT_ROWS,
        "table4": table(table4, [c for c in table4.columns if c != "key"], key="key"),
        "exclusions": table(exclusions, key="what"),
        "excluded_sessions": excluded,
        "calibration": calibration,
        "fits": table(fits, ["threat_model", "label", "target", "bound", "low", "high",
                             "n_boot_valid", "guess_rate", "lapse_rate", "beta", "p_value",
                             "n_judgments", "n_participants"], key="key"),
        "side_by_side": table(pd.DataFrame(adaptive.named_and_calibrated(
            calibration.presets if calibration else {})), key="threat_model"),
        "figures": [(name, title) for name, (title, _) in dashboard_figures.FIGURES.items()],
    }
    return render(request, "dashboard/study.html", context)


@staff_member_required
@require_GET
def figure(request: HttpRequest, slug: str, name: str, fmt: str) -> HttpResponse:
    study = get_object_or_404(Study, slug=slug)
    if name not in dashboard_figures.FIGURES or fmt not in dashboard_figures.FORMATS:
        raise Http404(f"no figure {name}.{fmt}")
    data = dashboard_figures.cached_render(
        study, name, fmt, include_simulated=request.GET.get("simulated") == "1"
    )
    response = HttpResponse(data, content_type=dashboard_figures.FORMATS[fmt])
    if request.GET.get("download"):
        response["Content-Disposition"] = f'attachment; filename="{study.slug}-{name}.{fmt}"'
    response["Cache-Control"] = "private, max-age=60"
    return response
