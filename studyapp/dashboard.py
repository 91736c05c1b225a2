"""Staff dashboard (``/dashboard/``; ``/staff/`` shows the same study list): study list, and
per study progress, statistics, QC, calibrated fits, the paper's figures (server-rendered,
PNG/SVG/CSV) and the defenses' robustness (``/dashboard/SLUG/robustness/``).

Staff only. The study list and the judgment counts come from one function,
:func:`studyapp.reports.staff_study_list` (the staff API's numbers); progress towards the target
from :func:`studyapp.reports.study_progress` (cached by study state); statistics and figures
from the engine through :mod:`studyapp.dashboard_figures`, cached by study state, with the same
defaults as ``manage.py analyze`` (1000 bootstrap resamples, seed 0; excluded sessions and
simulated observers left out), so the page and the command agree. The people-only view never
shows a calibration fitted with simulated observers: it shows the newest calibration fitted on
people, and says that a newer simulated one is hidden.
"""

from __future__ import annotations

import math
import statistics

import pandas as pd
from django.contrib.admin.views.decorators import staff_member_required
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, render
from django.urls import reverse
from django.views.decorators.http import require_GET

from engine.analysis import AT_BOUND
from engine.attacks.spec import bound_units, condition_title
from engine.provenance import distance_label

from . import adaptive, dashboard_figures, robustness
from .models import Calibration, Judgment, Session, Study
from .reports import staff_study_list, study_counts

PARTICIPANT_ROWS = 100


#: Human column headers of the dashboard's tables (raw names stay in ``data-col``).
HEADERS = {
    "condition": "Condition", "threat_model": "Threat model", "bound": "Bound ε",
    "label": "Label", "units": "Units of ε", "n_pairs": "Pairs", "n_judgments": "Judgments",
    "n_different": "Answered “different”",
    "perceptibility": "Perceptibility (share “different”)",
    "ci": "95 % Wilson interval", "boot": "95 % participant-bootstrap interval",
    "ci_low": "Wilson 95 % low", "ci_high": "Wilson 95 % high",
    "boot_low": "Bootstrap 95 % low", "boot_high": "Bootstrap 95 % high",
    "control": "Control pairs", "statistic": "Statistic", "rate": "Rate",
    "strength": "Attack success rate", "strength_source": "Success from",
    "n_success_known": "Pairs with known success", "distance": "Distance",
    "transform": "Transform", "n_conditions": "Conditions", "r": "Pearson r",
    "r_low": "r 95 % low", "r_high": "r 95 % high", "p_value": "p", "rho": "Spearman ρ",
    "rho_low": "ρ 95 % low", "rho_high": "ρ 95 % high", "participant": "Participant",
    "fa_rate": "Sentinel false-alarm rate", "what": "What", "value": "Value",
    "target": "Target perceptibility", "low": "95 % low", "high": "95 % high",
    "n_boot_valid": "Bootstrap fits", "guess_rate": "Guess rate γ",
    "lapse_rate": "Lapse rate λ", "beta": "Slope β", "n_participants": "Participants",
    "run": "Defense run", "column": "Column", "kind": "Bound kind", "spec": "Spec",
    "accuracy": "Robust accuracy", "n_images": "Test images", "dataset": "Dataset",
    "method": "Method", "arch": "Architecture", "clean": "Clean accuracy",
    "union": "Union accuracy (all threat models)", "unseen_mean": "Unseen mean accuracy",
    "check": "Check", "detail": "Detail", "passed": "Passed",
    "size_ratio": "Stored size ÷ bound (min – median)",
    "defense_bound": "Defense bound ε", "condition_spec": "Condition spec",
}


#: Headers of the other protocols' tables (engine.protocol_analysis; issue 18).
PROTOCOL_HEADERS = {
    "kind": "Kind", "condition_a": "Condition of A", "condition_b": "Condition of B",
    "n_items": "Items", "n_chose_b": "Chose B", "p_chose_b": "Share choosing B",
    "metric": "Distance", "score": "2AFC score", "score_low": "Bootstrap 95 % low",
    "score_high": "Bootstrap 95 % high", "human_ceiling": "Human ceiling",
    "relative": "Score ÷ ceiling", "n_triplets": "Triplets", "n_ties": "Ties",
    "ceiling": "Human–human ceiling", "ceiling_low": "Ceiling 95 % low",
    "ceiling_high": "Ceiling 95 % high", "ceiling_unbiased": "Ceiling (unbiased)",
    "alpha": "α", "beta": "Slope β (per distance unit)", "sigma": "σ = 1/β",
    "beta_low": "β 95 % low", "beta_high": "β 95 % high",
    "item": "Item", "n_ratings": "Ratings", "mos": "MOS", "mos_sd": "SD",
    "mos_low": "t 95 % low", "mos_high": "t 95 % high", "z_mos": "z-scored MOS",
    "srocc": "SROCC", "plcc": "PLCC", "krocc": "KROCC", "n_pairs": "Repeated items",
    "pearson": "Pearson r", "spearman": "Spearman ρ", "mean_abs_diff": "Mean |difference|",
    "exact_agreement": "Identical ratings", "mean_rating": "Mean rating",
    "share_lowest": "Rated lowest", "error_rate": "Control error rate",
    "n_correct": "Correct", "accuracy": "Accuracy (true label)", "level": "Ladder level",
    "target_accuracy": "Target accuracy", "flip_bound": "Label-flip bound",
    "clean_error": "Clean error ε", "floor_accuracy": "Floor (chance)",
    "fit_flag": "Fit warnings", "n_categories": "Labels", "fleiss_kappa": "Fleiss' κ",
    "posterior": "Posterior", "true_label": "True label", "correct": "Correct",
    "session": "Session", "control_error": "Control error rate",
    "controls": "Controls wrong / answered", "retest_rho": "Test–retest ρ",
    "n_retest": "Repeated items", "flags": "Flags", "excluded": "Excluded (rules)",
    "reason": "Reason",
}


def header(column: str, headers: dict[str, str] | None = None) -> str:
    """A human header: :data:`HEADERS`, ``mean_<distance>`` → ``Mean LPIPS (AlexNet)``;
    ``headers`` first (another protocol's, :data:`PROTOCOL_HEADERS`), and there
    ``d_<distance>``/``a_``/``b_`` name the distance too."""
    if headers is not None:
        if column in headers:
            return headers[column]
        for prefix, what in (("d_", ""), ("a_", "A: "), ("b_", "B: ")):
            name = column.removeprefix(prefix)
            if column.startswith(prefix) and distance_label(name) != name:
                return what + distance_label(name)
    if column in HEADERS:
        return HEADERS[column]
    if column.startswith("mean_"):
        name = column.removeprefix("mean_")
        return f"Mean {distance_label(name)}"
    return column.replace("_", " ").capitalize()


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def table(frame: pd.DataFrame, columns: list[str] | None = None, key: str | None = None,
          *, hover: dict[str, str] | None = None, show: dict[str, str] | None = None,
          headers: dict[str, str] | None = None):
    """``{"columns", "rows"}`` for templates/dashboard/_table.html; cells formatted to 4 places.

    Each row carries ``key`` (the value of column ``key``) so tests and scripts can find a
    cell by ``data-row``/``data-col``. Headers are human (:func:`header`); ``show`` maps a
    column to another whose text its cell shows, ``hover`` to another whose value is the
    cell's tooltip (``title``).
    """
    if frame is None or frame.empty:
        return {"columns": [], "rows": []}
    columns = [c for c in (columns or list(frame.columns)) if c in frame.columns]
    hover, show = hover or {}, show or {}
    rows = []
    for record in frame.to_dict("records"):
        rows.append({
            "key": _cell(record.get(key)) if key else "",
            "cells": [(c, _cell(record[show.get(c, c)]),
                       _cell(record[hover[c]]) if c in hover else "") for c in columns],
        })
    return {"columns": [(c, header(c, headers)) for c in columns], "rows": rows}


CONTROL_TITLES = {"sentinel": "Sentinel (the same image twice)",
                  "catch": "Catch (two different photographs)"}


def perceptibility_table(report) -> dict:
    """The perceptibility table a researcher reads at 1,280 px: a short condition label
    (``L2 · medium (ε = 4.71)``, from the condition's threat model, bound and label) with the
    full spec on hover, the bound's units, human headers and both intervals named."""
    frame = report.perceptibility.copy()
    if frame.empty:
        return table(frame)
    titles, units = [], []
    for spec, tm, bound, label in zip(frame["condition"], frame["threat_model"],
                                      frame["bound"], frame["label"], strict=True):
        if spec in CONTROL_TITLES:
            titles.append(CONTROL_TITLES[spec])
            units.append("–")
        else:
            b = None if bound is None or pd.isna(bound) else float(bound)
            titles.append(condition_title(str(tm), b, "" if pd.isna(label) else str(label)))
            units.append(bound_units(str(tm)))
    frame["condition_title"] = titles
    frame["units"] = units
    columns = ["condition", "units", "n_pairs", "n_judgments", "perceptibility", "ci", "boot"]
    if "size_ratio_min" in frame.columns:  # stimulus mode aims every pair at [0.95, 1]
        frame["size_ratio"] = [_size_ratio_cell(r) for r in frame.to_dict("records")]
        columns.append("size_ratio")
    columns += [c for c in frame.columns if c.startswith("mean_")]
    frame["ci"] = frame["boot"] = None  # drawn from the low/high columns by the template
    t = table(frame, columns, key="condition", hover={"condition": "condition"},
              show={"condition": "condition_title"})
    for row, record in zip(t["rows"], frame.to_dict("records"), strict=True):
        row["intervals"] = {name: (_cell(record[f"{name}_low"]), _cell(record[f"{name}_high"]))
                            for name in ("ci", "boot")}
    return t


def _size_ratio_cell(record: dict) -> str:
    """``min – median`` of stored size ÷ bound, and how many pairs are flagged below
    :data:`engine.analysis.AT_BOUND` (– for controls and unbounded threat models)."""
    low, mid = record.get("size_ratio_min"), record.get("size_ratio_median")
    if low is None or mid is None or pd.isna(low) or pd.isna(mid):
        return "–"
    text = f"{low:.2f} – {mid:.2f}"
    flagged = record.get("n_not_at_bound")
    if flagged is not None and not pd.isna(flagged) and int(flagged) > 0:
        text += f" ({int(flagged)} below {AT_BOUND:g})"
    return text


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
    """The staff's one study list (also at ``/staff/``): :func:`reports.staff_study_list`."""
    rows = []
    for row in staff_study_list(progress=dashboard_figures.cached_progress):
        s = row["progress"]["sessions"]
        rows.append({
            **row,
            "link": request.build_absolute_uri(reverse("study-start", args=[row["study"].slug])),
            "completion_rate": s["completed"] / s["started"] if s["started"] else None,
        })
    return render(request, "dashboard/study_list.html", {"rows": rows})


#: The tables the page shows per protocol: (table, title, key column).
PROTOCOL_SECTIONS = {
    "2afc": [
        ("table", "2AFC score of each distance (agreement with people's choices, BAPPS)"
         " and the human–human ceiling", "metric"),
        ("choice_rates", "Human choice rates of copy B per condition pair", "condition_a"),
        ("slope", "Distance–choice slope (probit of P(chose B) on d_A − d_B)", "distance"),
        ("controls", "Control triplets (choosing the side not identical to the reference)",
         "kind"),
    ],
    "rating": [
        ("correlations", "SROCC, PLCC and KROCC of each distance with the MOS", "distance"),
        ("mos", "MOS per item (pair mode: DMOS, 1 = no difference) and z-scored MOS", "item"),
        ("test_retest", "Test–retest reliability", "participant"),
        ("anchors", "Identical-pair anchors", "n_items"),
    ],
    "label": [
        ("flip_bound", "Label-flip bound per threat model", "threat_model"),
        ("accuracy", "Human accuracy against bound per threat model", "bound"),
        ("agreement", "Inter-rater agreement (Krippendorff's α, Fleiss' κ)", "bound"),
        ("aggregation", "Aggregated labels (Dawid–Skene)", "item"),
    ],
}


def protocol_table(frame: pd.DataFrame, key: str) -> dict:
    """A table of another protocol's report: :data:`PROTOCOL_HEADERS`, distance names in
    ``distance``/``metric`` cells through :func:`distance_label` (raw name in ``data-row``)."""
    if frame is None or frame.empty:
        return table(frame)
    frame = frame.copy()
    show = {}
    for column in ("distance", "metric"):
        if column in frame and not pd.api.types.is_numeric_dtype(frame[column]):
            frame[f"{column}_title"] = [distance_label(v) if isinstance(v, str) else v
                                        for v in frame[column]]
            show[column] = f"{column}_title"
    columns = [c for c in frame.columns if not c.endswith("_title")]
    return table(frame, columns, key=key if key in frame else None, show=show,
                 headers=PROTOCOL_HEADERS)


def protocol_detail(request: HttpRequest, study: Study, with_simulated: bool) -> HttpResponse:
    """The page of a 2AFC, rating or label study: progress, QC, the protocol's tables
    (:func:`studyapp.protocol_rows.protocol_report`, ``analyze``'s defaults) and figure."""
    summary, state = dashboard_figures.cached_protocol_summary(
        study, include_simulated=with_simulated)
    report = summary["report"]
    sessions = summary["progress"]["sessions"]
    sections = []
    if report is not None:
        for name, title, key in PROTOCOL_SECTIONS[study.protocol]:
            if name in report.tables:
                sections.append({"name": name, "title": title,
                                 "table": protocol_table(report.tables[name], key)})
    exclusions = report.exclusions if report is not None else {}
    calibration = (Calibration.objects.latest_for(study, include_simulated=with_simulated)
                   if study.protocol == "label" else None)
    context = {
        "study": study, "state": state, "with_simulated": with_simulated,
        "report": report, "error": summary["error"], "sections": sections,
        "progress": summary["progress"], "sessions": sessions,
        "completion_rate": (sessions["completed"] / sessions["started"]
                            if sessions["started"] else None),
        "n_judgments": study_counts(study)[study.pk]["n_judgments"],
        "n_used": exclusions.get("judgments_kept", 0),
        "n_simulated": Judgment.objects.filter(
            trial__session__participant__study=study, trial__is_practice=False,
            trial__session__participant__is_simulated=True).count(),
        "exclusions": table(pd.DataFrame([{"what": k, "value": v}
                                          for k, v in exclusions.items()]), key="what"),
        "quality": table(summary["quality"].head(PARTICIPANT_ROWS), key="session",
                         headers=PROTOCOL_HEADERS),
        "n_quality": len(summary["quality"]),
        "participant_rows": PARTICIPANT_ROWS,
        "excluded_sessions": list(
            Session.objects.filter(participant__study=study, excluded=True)
            .order_by("pk").values("pk", "participant_id", "exclusion_reason")),
        "calibration": calibration,
        "presets": table(pd.DataFrame([{"threat_model": tm, "label": label, "bound": bound}
                                       for tm, d in (calibration.presets if calibration
                                                     else {}).items()
                                       for label, bound in d.items()]),
                         key="threat_model", headers=PROTOCOL_HEADERS),
        "figures": [(name, title) for name, (title, _)
                    in dashboard_figures.PROTOCOL_FIGURES[study.protocol].items()],
    }
    return render(request, "dashboard/protocol.html", context)


@staff_member_required
@require_GET
def study_detail(request: HttpRequest, slug: str) -> HttpResponse:
    study = get_object_or_404(Study, slug=slug)
    with_simulated = request.GET.get("simulated") == "1"
    if study.protocol != "jnd":
        return protocol_detail(request, study, with_simulated)
    summary, state = dashboard_figures.cached_summary(study, include_simulated=with_simulated)
    progress = summary["progress"]
    sessions = progress["sessions"]
    report = summary["report"]
    excluded = list(
        Session.objects.filter(participant__study=study, excluded=True)
        .order_by("pk").values("pk", "participant_id", "exclusion_reason")
    )
    # a people-only view shows only fits on people; a newer simulated one is named, not shown
    latest = Calibration.objects.latest_for(study)
    calibration = Calibration.objects.latest_for(study, include_simulated=with_simulated)
    hidden_calibration = latest if latest is not None and latest != calibration else None
    fits = pd.DataFrame()
    if calibration is not None:
        fits = dashboard_figures.latest_calibration(
            study, include_simulated=with_simulated).table()
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
        "n_judgments": study_counts(study)[study.pk]["n_judgments"],
        "perceptibility": perceptibility_table(report),
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
        "hidden_calibration": hidden_calibration,
        "n_defense_results": study.defense_results.count(),
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
    if name not in dashboard_figures.figures_of(study) or fmt not in dashboard_figures.FORMATS:
        raise Http404(f"no figure {name}.{fmt}")
    render_file = (dashboard_figures.cached_render if study.protocol == "jnd"
                   else dashboard_figures.cached_protocol_render)
    data = render_file(study, name, fmt, include_simulated=request.GET.get("simulated") == "1")
    response = HttpResponse(data, content_type=dashboard_figures.FORMATS[fmt])
    if request.GET.get("download"):
        response["Content-Disposition"] = f'attachment; filename="{study.slug}-{name}.{fmt}"'
    response["Cache-Control"] = "private, max-age=60"
    return response


@staff_member_required
@require_GET
def study_robustness(request: HttpRequest, slug: str) -> HttpResponse:
    """The defenses evaluated against ``study`` (:mod:`studyapp.robustness`): accuracy per
    threat model at named and calibrated bounds, union and unseen mean, the masking checks
    and robust accuracy against the study's human perceptibility (people only)."""
    study = get_object_or_404(Study, slug=slug)
    report, n_used, state = robustness.people_report(study)
    tables = robustness.robustness_tables(study, report)
    acc_cols = ["run", "condition", "kind", "bound", "units", "accuracy", "n_images"]
    equal_cols = ["run", "condition", "units", "n_judgments", "perceptibility", "boot_low",
                  "boot_high", "defense_bound", "accuracy"]
    accuracy = tables["accuracy"].assign(key=tables["accuracy"]["run"] + "|"
                                         + tables["accuracy"]["column"])
    equal = tables["equal_perceptibility"].assign(
        key=tables["equal_perceptibility"]["run"] + "|"
        + tables["equal_perceptibility"]["threat_model"] + "|"
        + tables["equal_perceptibility"]["label"])
    sanity = tables["sanity"].assign(key=[f"{r}|{i}" for i, r in enumerate(
        tables["sanity"]["run"])])
    context = {
        "study": study,
        "state": state,
        "n_used": n_used,
        "accuracy": table(accuracy, acc_cols, key="key", hover={"condition": "spec"}),
        "summary": table(tables["summary"], key="run"),
        "sanity": table(sanity, ["run", "check", "detail", "value", "passed"], key="key"),
        "n_failed": int((~tables["sanity"]["passed"].astype(bool)).sum()),
        "equal": table(equal, equal_cols, key="key", hover={"condition": "condition_spec"}),
        "datasets": sorted(set(tables["accuracy"]["dataset"])),
        "figures": [(name, title) for name, (title, _) in robustness.FIGURES.items()],
        "version": f"{state}-{study.defense_results.count()}-{study.defense_checks.count()}",
    }
    return render(request, "dashboard/robustness.html", context)


@staff_member_required
@require_GET
def robustness_figure(request: HttpRequest, slug: str, name: str, fmt: str) -> HttpResponse:
    study = get_object_or_404(Study, slug=slug)
    if name not in robustness.FIGURES or fmt not in dashboard_figures.FORMATS:
        raise Http404(f"no robustness figure {name}.{fmt}")
    report = robustness.people_report(study)[0]
    data = robustness.render(robustness.robustness_tables(study, report), name, fmt)
    response = HttpResponse(data, content_type=dashboard_figures.FORMATS[fmt])
    if request.GET.get("download"):
        response["Content-Disposition"] = (
            f'attachment; filename="{study.slug}-{name}.{fmt}"')
    response["Cache-Control"] = "private, max-age=60"
    return response
