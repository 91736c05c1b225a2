"""The paper's figures for a study, rendered server-side, and the cache keyed by study state.

Used by the staff dashboard (:mod:`studyapp.dashboard`) and ``analyze --figures``. Each figure
comes from ``engine.figures`` as ``(matplotlib Figure, DataFrame behind it)``; here it becomes
PNG, SVG and CSV bytes. The analysis and every rendered file are cached under a key built from
the study's own state (:func:`study_state`): its judgment count and newest judgment id, its
sessions and exclusion decisions, which of its participants are simulated, its pairs and its
latest calibration. Any new judgment, session, exclusion, pair or calibration of the study
changes the key, so a cached figure is never stale; another study's never does.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # server-side: never a GUI backend

import pandas as pd  # noqa: E402
from django.core.cache import cache  # noqa: E402
from django.db.models import Count, Max, Q, Sum  # noqa: E402

from engine import figures as engine_figures  # noqa: E402
from engine.analysis import analyze  # noqa: E402
from engine.calibration import CalibrationResult, calibrate  # noqa: E402

from .frames import judgments_frame, pairs_frame  # noqa: E402
from .models import Calibration, Judgment, Pair, Participant, Session, Study  # noqa: E402
from .reports import study_progress  # noqa: E402

FORMATS = {"png": "image/png", "svg": "image/svg+xml", "csv": "text/csv; charset=utf-8"}
CACHE_SECONDS = 24 * 3600
N_BOOT = 1000


@dataclass
class FigureContext:
    """What every figure is drawn from: the study's frames, its report and calibration."""

    study: Study
    pairs: pd.DataFrame
    judgments: pd.DataFrame
    report: object  # engine AnalysisReport
    calibration: object | None = None  # engine CalibrationResult
    include_excluded: bool = False
    include_simulated: bool = False

    def used_judgments(self) -> pd.DataFrame:
        """Judgments the analysis used (excluded and simulated ones only when included)."""
        j = self.judgments
        keep = pd.Series(True, index=j.index)
        if not self.include_excluded:
            keep &= ~j["excluded"]
        if not self.include_simulated:
            keep &= ~j["simulated"]
        return j[keep]


def _placeholder(title: str, message: str, columns: list[str]) -> tuple:
    """An empty figure saying why there is nothing to draw, and an empty frame (a CSV with
    just the header of the figure's usual columns)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 4.2))
    ax = fig.add_subplot(111)
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, fontsize=9)
    ax.set_axis_off()
    ax.set_title(title)
    return fig, pd.DataFrame(columns=columns)


def figure_distance(report) -> str | None:
    """The distance the figures show: LPIPS (AlexNet) if stored, else another LPIPS, else the
    first stored distance; None without any."""
    names = [c.removeprefix("mean_") for c in report.perceptibility.columns
             if c.startswith("mean_")]
    names = [n for n in names if n in set(report.pair_distances["distance"])] or names
    for pick in (lambda n: n == "lpips_alexnet", lambda n: n.startswith("lpips"), lambda n: True):
        found = [n for n in names if pick(n)]
        if found:
            return found[0]
    return None


def _with_distance(draw, title: str, columns: list[str]):
    def figure(ctx: FigureContext):
        distance = figure_distance(ctx.report)
        if distance is None:
            return _placeholder(title, "no distances stored for this study's pairs", columns)
        return draw(ctx.report, distance=distance)
    return figure


def _psychometric(ctx: FigureContext):
    result = ctx.calibration
    if result is None:
        used = ctx.used_judgments()
        try:
            result = calibrate(ctx.pairs, used, n_boot=0)
        except ValueError:  # no sentinel judgments yet: γ = 0
            result = calibrate(ctx.pairs, used, n_boot=0, guess_rate=0.0)
    if not result.threat_models:
        return _placeholder("Psychometric functions",
                            "no threat model has judgments at 2 or more bounds yet",
                            ["kind", "threat_model", "bound", "n_judgments", "n_different",
                             "perceptibility", "ci_low", "ci_high", "fitted", "label",
                             "target", "low", "high"])
    return engine_figures.psychometric_curves(result)


FIGURES: dict[str, tuple[str, Callable[[FigureContext], tuple]]] = {
    "fig4a": ("Fig. 4a: perceptibility vs LPIPS",
              _with_distance(engine_figures.fig4a_perceptibility_vs_lpips, "Fig. 4a",
                             ["condition", "threat_model", "bound", "label", "mean_distance",
                              "perceptibility", "ci_low", "ci_high", "boot_low", "boot_high",
                              "n_judgments"])),
    "fig4b": ("Fig. 4b: attack strength vs perceptibility",
              lambda c: engine_figures.fig4b_strength_vs_perceptibility(c.report)),
    "fig4c": ("Fig. 4c: distance correlations with perceptibility",
              lambda c: engine_figures.fig4c_distance_correlations(c.report)),
    "fig5": ("Fig. 5: distance distributions per threat model",
             _with_distance(engine_figures.fig5_distance_violins, "Fig. 5",
                            ["pair", "condition", "threat_model", "bound", "label", "distance",
                             "value"])),
    "psychometric": ("Psychometric functions with the data", _psychometric),
}


def study_judgments(study: Study) -> dict:
    """``{"n", "last"}``: the count and newest id of ``study``'s judgments (practice too).

    Counting one study's judgments joins them to trials, sessions and participants (seconds at
    a million rows), so the answer is cached under the count and newest id of all judgments
    (no join, cheap): the join runs again only after a judgment was added or deleted anywhere.
    """
    everywhere = Judgment.objects.aggregate(n=Count("id"), last=Max("id"))
    key = f"dashboard:{study.pk}:judgments:{everywhere['n']}:{everywhere['last']}"
    own = cache.get(key)
    if own is None:
        own = Judgment.objects.of_study(study.pk).aggregate(n=Count("id"), last=Max("id"))
        cache.set(key, own, CACHE_SECONDS)
    return own


def study_state(study: Study) -> str:
    """A short hash that changes whenever anything a dashboard number of ``study`` depends
    on changes, and only then (another study's judgments leave it as it is)."""
    j = study_judgments(study)
    s = Session.objects.filter(participant__study=study).aggregate(
        n=Count("id"),
        n_excluded=Count("id", filter=Q(excluded=True)),
        excluded_id_sum=Sum("id", filter=Q(excluded=True)),
        n_completed=Count("completed_at"),
        n_abandoned=Count("abandoned_at"),
    )
    people = Participant.objects.filter(study=study).aggregate(
        n=Count("id"), simulated=Count("id", filter=Q(is_simulated=True)),
        simulated_id_sum=Sum("id", filter=Q(is_simulated=True)),
    )
    p = Pair.objects.filter(study=study).aggregate(n=Count("id"), last=Max("id"))
    cal = Calibration.objects.filter(study=study).aggregate(last=Max("id"))
    raw = repr((study.pk, sorted(j.items()), sorted(s.items()), sorted(people.items()),
                sorted(p.items()), cal["last"]))
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def latest_calibration(study: Study, *, include_simulated: bool = True):
    """The engine CalibrationResult of the study's latest ``calibrate`` run, or None; with
    ``include_simulated=False`` the latest fitted on people only (a people-only view never
    draws a fit of simulated observers)."""
    row = Calibration.objects.latest_for(study, include_simulated=include_simulated)
    if row is None:
        return None
    return CalibrationResult.from_dict(row.fit)


def build_context(
    study: Study, *, n_boot: int = N_BOOT, include_simulated: bool = False
) -> FigureContext:
    pairs = pairs_frame(study)
    judgments = judgments_frame(study)
    report = analyze(pairs, judgments, n_boot=n_boot, seed=0,
                                include_simulated=include_simulated)
    return FigureContext(study, pairs, judgments, report,
                         latest_calibration(study, include_simulated=include_simulated),
                         include_simulated=include_simulated)


def _state(study: Study, include_simulated: bool) -> str:
    return study_state(study) + ("-with-simulated" if include_simulated else "")


def cached_summary(study: Study, include_simulated: bool = False) -> tuple[dict, str]:
    """The study's analysis tables for the page, computed once per study state.

    ``{"report", "n_used", "n_simulated", "progress"}``; the frames themselves are not cached (at a
    million judgments they would be copied in and out of the cache on every request).
    """
    state = _state(study, include_simulated)
    summary = cache.get(f"dashboard:{study.pk}:{state}:summary")
    if summary is None:
        summary = _build_and_cache(study, state, include_simulated)[0]
    return summary, state


def cached_progress(study: Study, state: str | None = None) -> dict:
    """The staff API's progress counts (seconds at 100k judgments), cached by study state."""
    state = state or study_state(study)
    key = f"dashboard:{study.pk}:{state}:progress"
    progress = cache.get(key)
    if progress is None:
        progress = study_progress(study)
        cache.set(key, progress, CACHE_SECONDS)
    return progress


def _build_and_cache(
    study: Study, state: str, include_simulated: bool
) -> tuple[dict, dict[str, bytes]]:
    """Analyse once; cache the page's summary and every figure file of this state."""
    ctx = build_context(study, include_simulated=include_simulated)
    j = ctx.judgments
    summary = {"report": ctx.report, "n_used": len(ctx.used_judgments()),
               "n_simulated": int(j["simulated"].sum()),
               "progress": cached_progress(study, state)}
    files = {f"{name}.{fmt}": data for name in FIGURES
             for fmt, data in render_files(ctx, name).items()}
    cache.set_many(
        {f"dashboard:{study.pk}:{state}:{k}": v for k, v in {**files, "summary": summary}.items()},
        CACHE_SECONDS,
    )
    return summary, files


def render_files(ctx: FigureContext, name: str) -> dict[str, bytes]:
    """``name``'s figure as ``{"png": ..., "svg": ..., "csv": ...}`` (drawn once)."""
    if name not in FIGURES:
        raise KeyError(f"unknown figure {name!r}; known: {', '.join(FIGURES)}")
    fig, data = FIGURES[name][1](ctx)
    fig.tight_layout()
    out = {"csv": data.to_csv(index=False).encode()}
    for fmt in ("png", "svg"):
        buf = io.BytesIO()
        # metadata without dates, so the same state gives the same bytes
        meta = {"Software": None} if fmt == "png" else {"Date": None, "Creator": None}
        fig.savefig(buf, format=fmt, metadata=meta)
        out[fmt] = buf.getvalue()
    return out


def render(ctx: FigureContext, name: str, fmt: str) -> bytes:
    """``name``'s figure as PNG or SVG, or the CSV behind it."""
    if fmt not in FORMATS:
        raise KeyError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    return render_files(ctx, name)[fmt]


def cached_render(study: Study, name: str, fmt: str, include_simulated: bool = False) -> bytes:
    """One figure file; on a miss every figure of this state is rendered and cached at once."""
    if name not in FIGURES or fmt not in FORMATS:
        raise KeyError(f"unknown figure {name}.{fmt}")
    state = _state(study, include_simulated)
    data = cache.get(f"dashboard:{study.pk}:{state}:{name}.{fmt}")
    if data is None:
        data = _build_and_cache(study, state, include_simulated)[1][f"{name}.{fmt}"]
    return data


def write_all(ctx: FigureContext, folder: Path) -> list[Path]:
    """Every figure as ``folder/<name>.png``, ``.svg`` and ``.csv``; returns the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name in FIGURES:
        for fmt, data in render_files(ctx, name).items():
            path = folder / f"{name}.{fmt}"
            path.write_bytes(data)
            written.append(path)
    return written


# ----------------------------------------------------------------- 2afc, rating, label
#
# One figure per protocol (engine.figures), from the studyapp.protocol_rows report, cached
# by study state like the JND figures.


def _twoafc_figure(report):
    return engine_figures.twoafc_scores_figure(report)


def _rating_figure(report):
    distance = report.meta.get("distance")
    if distance is None:
        return _placeholder("Item MOS against distance", "no distances stored for the items",
                            ["item", "condition", "distance", "mos", "mos_low", "mos_high",
                             "z_mos"])
    return engine_figures.rating_mos_figure(report, distance=distance)


def _label_figure(report):
    return engine_figures.label_accuracy_figure(report)


PROTOCOL_FIGURES: dict[str, dict[str, tuple[str, Callable]]] = {
    "2afc": {"scores": ("2AFC score of each distance and the human ceiling (BAPPS-style)",
                        _twoafc_figure)},
    "rating": {"mos": ("Item MOS against distance", _rating_figure)},
    "label": {"accuracy": ("Human accuracy against bound and the label-flip bound",
                           _label_figure)},
}


def figures_of(study: Study) -> dict[str, tuple[str, Callable]]:
    """The figures of ``study``'s protocol: :data:`FIGURES` for JND, else
    :data:`PROTOCOL_FIGURES`."""
    return FIGURES if study.protocol == "jnd" else PROTOCOL_FIGURES[study.protocol]


def _files(fig, data: pd.DataFrame) -> dict[str, bytes]:
    fig.tight_layout()
    out = {"csv": data.to_csv(index=False).encode()}
    for fmt in ("png", "svg"):
        buf = io.BytesIO()
        meta = {"Software": None} if fmt == "png" else {"Date": None, "Creator": None}
        fig.savefig(buf, format=fmt, metadata=meta)
        out[fmt] = buf.getvalue()
    return out


def render_protocol_files(report, name: str) -> dict[str, bytes]:
    """The protocol figure ``name`` of ``report`` as PNG, SVG and the CSV behind it."""
    figures = PROTOCOL_FIGURES[report.protocol]
    if name not in figures:
        raise KeyError(f"unknown figure {name!r}; known: {', '.join(figures)}")
    return _files(*figures[name][1](report))


def write_protocol_figures(report, folder: Path) -> list[Path]:
    """Every figure of ``report``'s protocol as ``folder/<name>.png``, ``.svg``, ``.csv``."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name in PROTOCOL_FIGURES[report.protocol]:
        for fmt, data in render_protocol_files(report, name).items():
            path = folder / f"{name}.{fmt}"
            path.write_bytes(data)
            written.append(path)
    return written


def cached_protocol_summary(study: Study, include_simulated: bool = False
                            ) -> tuple[dict, str]:
    """``{"report", "error", "progress"}`` of a non-JND study (``report`` None and ``error``
    the reason when there is nothing to analyse yet), computed once per study state, with
    ``manage.py analyze``'s defaults; its figure files are cached with it."""
    from .protocol_rows import protocol_report

    state = _state(study, include_simulated)
    key = f"dashboard:{study.pk}:{state}:protocol-summary"
    summary = cache.get(key)
    if summary is None:
        summary, files = {"report": None, "error": "", "progress":
                          cached_progress(study, state), "quality": quality_frame(study)}, {}
        try:
            summary["report"] = protocol_report(study, n_boot=N_BOOT, seed=0,
                                                include_simulated=include_simulated)
        except ValueError as exc:
            summary["error"] = str(exc)
        else:
            files = {f"{name}.{fmt}": data for name in PROTOCOL_FIGURES[study.protocol]
                     for fmt, data in render_protocol_files(summary["report"], name).items()}
        cache.set_many({key: summary, **{f"dashboard:{study.pk}:{state}:{k}": v
                                         for k, v in files.items()}}, CACHE_SECONDS)
    return summary, state


def quality_frame(study: Study) -> pd.DataFrame:
    """Per completed session: the control error rate, the rating test–retest ρ, flags and
    the rules' verdict (:func:`studyapp.quality.compute_quality`, nothing stored), worst
    control error first."""
    from .quality import compute_quality

    rows = [{"session": q.session_id, "participant": q.participant,
             "control_error": q.control_error_rate,
             "controls": f"{q.n_control_wrong}/{q.n_control}",
             "retest_rho": q.retest_rho, "n_retest": q.n_retest,
             "flags": "; ".join(q.flags), "excluded": q.excluded,
             "reason": q.exclusion_reason} for q in compute_quality(study)]
    frame = pd.DataFrame(rows, columns=["session", "participant", "control_error", "controls",
                                        "retest_rho", "n_retest", "flags", "excluded",
                                        "reason"])
    return frame.sort_values("control_error", ascending=False, na_position="last",
                             kind="stable").reset_index(drop=True)


def cached_protocol_render(study: Study, name: str, fmt: str,
                           include_simulated: bool = False) -> bytes:
    """One protocol figure file (a placeholder saying why when nothing can be drawn yet)."""
    if name not in PROTOCOL_FIGURES[study.protocol] or fmt not in FORMATS:
        raise KeyError(f"unknown figure {name}.{fmt}")
    summary, state = cached_protocol_summary(study, include_simulated)
    data = cache.get(f"dashboard:{study.pk}:{state}:{name}.{fmt}")
    if data is None:
        if summary["report"] is None:
            title = PROTOCOL_FIGURES[study.protocol][name][0]
            return _files(*_placeholder(title, summary["error"], []))[fmt]
        data = render_protocol_files(summary["report"], name)[fmt]
    return data
