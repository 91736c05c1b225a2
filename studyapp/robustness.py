"""A study's defense results for the staff: the robustness page, its figures and the staff API.

What ``manage.py evaluate_defense`` stored (:class:`DefenseResult` rows, one per run × table
column, and :class:`DefenseCheck` rows, the gradient-masking checks) becomes four tables, the
same on the dashboard page (``/dashboard/SLUG/robustness/``), in its CSV downloads and in the
staff API (``/api/staff/studies/SLUG/robustness/``):

- ``accuracy``: robust accuracy per run × threat model at each evaluated bound, named
  (``bound=medium``), calibrated (``--calibrated``: the study's perceptibility levels) or
  numeric;
- ``summary``: per run the clean accuracy, the union accuracy (correct under every threat
  model) and the unseen mean (mean over threat models the defense was not trained on);
- ``sanity``: the masking checks (perceptual-prior paper, section 4.4);
- ``equal_perceptibility``: each of the study's conditions with its human perceptibility (the
  fraction of people answering "different", with its 95 % participant-bootstrap interval;
  simulated observers and excluded sessions left out, as ``manage.py analyze``) beside the
  defense's robust accuracy at the same threat model and bound label. The join is on
  ``(threat model, label)``, never on float bounds; both bounds are shown. Where one run has
  the same label at two bounds (a named ``small`` and a study's calibrated ``small``), the
  result at the condition's own bound (the same stored number) is its partner.

Accuracies are fractions in ``[0, 1]`` on the run's first ``n_images`` test images.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # server-side: never a GUI backend

import pandas as pd  # noqa: E402
from django.db import transaction  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from engine.attacks.spec import (  # noqa: E402
    bound_label,
    bound_units,
    condition_title,
    is_preset,
)
from engine.errors import EngineError  # noqa: E402

from .models import DefenseCheck, DefenseResult, DefenseRun, Study  # noqa: E402

#: DefenseResult threat models that summarise a run rather than name an attack.
SUMMARY = ("clean", "union", "unseen_mean")

ACCURACY_COLUMNS = ["run", "column", "threat_model", "label", "kind", "bound", "units",
                    "condition", "spec", "accuracy", "n_images", "dataset"]
SUMMARY_COLUMNS = ["run", "method", "arch", "dataset", "n_images", "clean", "union",
                   "unseen_mean"]
SANITY_COLUMNS = ["run", "check", "detail", "value", "passed"]
EQUAL_COLUMNS = ["run", "threat_model", "label", "condition", "condition_spec", "bound",
                 "defense_bound", "units", "perceptibility", "boot_low", "boot_high",
                 "n_judgments", "accuracy", "n_images"]


def result_label(result: DefenseResult) -> str:
    """The bound label of a result: its structured ``label`` where the model has one, its
    calibrated level (``perceptibility``), else the label of its spec's bound (read by
    :func:`engine.attacks.spec.bound_label`), else ``""``."""
    label = getattr(result, "label", "") or result.perceptibility
    if label or not result.spec:
        return label
    try:
        return bound_label(result.spec)
    except EngineError:  # an AutoAttack column's description is not an attack spec
        return ""


def result_kind(result: DefenseResult, label: str) -> str:
    """``calibrated`` (a perceptibility level of the study), ``named`` (PAT's bounds),
    ``labelled`` (another ``VALUE@LABEL``) or ``numeric``."""
    if result.perceptibility:
        return "calibrated"
    if label and is_preset(label):
        return "named"
    return "labelled" if label else "numeric"


@transaction.atomic
def store_checks(result: dict, runs: list[DefenseRun], study: Study | None, out: Path) -> int:
    """Store the sanity checks of an engine ``results.json`` (``result["sanity"]``, keyed by
    the engine's model name, in the order of ``result["rows"]``) against ``runs``."""
    created = 0
    for run, row in zip(runs, result["rows"], strict=True):
        for check in (result.get("sanity") or {}).get(row["model"], []):
            DefenseCheck.objects.create(
                run=run, study=study, name=check["check"], detail=str(check.get("detail", "")),
                value=str(check.get("value", "")), passed=bool(check["passed"]),
                evaluation_dir=str(out))
            created += 1
    return created


def _human(report) -> pd.DataFrame:
    """The study's conditions with their perceptibility (report.perceptibility without the
    control rows)."""
    if report is None or report.perceptibility.empty:
        return pd.DataFrame(columns=["condition", "threat_model", "bound", "label"])
    table = report.perceptibility
    return table[table["bound"].notna() & (table["label"].fillna("") != "")]


def people_report(study: Study) -> tuple[Any, int, str]:
    """``(report, n_used, state)``: the study's analysis of people's judgments, as the
    dashboard's (cached by study state); ``report`` is None for a study without pairs."""
    from . import dashboard_figures

    try:
        summary, state = dashboard_figures.cached_summary(study)
    except ValueError:  # no pairs (or nothing analysable): no human side to show
        return None, 0, dashboard_figures.study_state(study)
    return summary["report"], summary["n_used"], state


def robustness_tables(study: Study, report=None) -> dict[str, pd.DataFrame]:
    """``{"accuracy", "summary", "sanity", "equal_perceptibility"}`` frames (see the module
    doc) of ``study``'s stored defense results; ``report`` is the study's
    :class:`engine.analysis.AnalysisReport` for the human side (None: no join)."""
    accuracy, summary = [], {}
    for r in DefenseResult.objects.for_study(study):
        run = r.run
        if r.threat_model in SUMMARY:
            row = summary.setdefault(run.name, {
                "run": run.name, "method": run.method, "arch": run.arch,
                "dataset": run.dataset_label or run.dataset, "n_images": r.n_images,
                "clean": None, "union": None, "unseen_mean": None})
            row[r.threat_model] = r.accuracy
            continue
        label = result_label(r)
        accuracy.append({
            "run": run.name, "column": r.column, "threat_model": r.threat_model,
            "label": label, "kind": result_kind(r, label), "bound": r.bound,
            "units": bound_units(r.threat_model),
            "condition": condition_title(r.threat_model, r.bound, label), "spec": r.spec,
            "accuracy": r.accuracy, "n_images": r.n_images,
            "dataset": run.dataset_label or run.dataset})
    sanity = [{"run": c.run.name, "check": c.name, "detail": c.detail, "value": c.value,
               "passed": c.passed}
              for c in DefenseCheck.objects.for_study(study)]
    human = _human(report)
    equal = []
    for a in accuracy:
        if not a["label"]:
            continue
        match = human[(human["threat_model"] == a["threat_model"])
                      & (human["label"] == a["label"])]
        for c in match.to_dict("records"):
            if a["bound"] != c["bound"] and any(
                    b["run"] == a["run"] and b["threat_model"] == a["threat_model"]
                    and b["label"] == a["label"] and b["bound"] == c["bound"]
                    for b in accuracy):
                # the same label at two bounds (PAT's named ``small`` and a study's own
                # ``small``): the result at the condition's very bound is its partner
                continue
            equal.append({
                "run": a["run"], "threat_model": a["threat_model"], "label": a["label"],
                "condition": condition_title(c["threat_model"], c["bound"], c["label"]),
                "condition_spec": c["condition"], "bound": c["bound"],
                "defense_bound": a["bound"], "units": a["units"],
                "perceptibility": c.get("perceptibility"), "boot_low": c.get("boot_low"),
                "boot_high": c.get("boot_high"), "n_judgments": c.get("n_judgments"),
                "accuracy": a["accuracy"], "n_images": a["n_images"]})
    return {
        "accuracy": pd.DataFrame(accuracy, columns=ACCURACY_COLUMNS),
        "summary": pd.DataFrame(list(summary.values()), columns=SUMMARY_COLUMNS),
        "sanity": pd.DataFrame(sanity, columns=SANITY_COLUMNS),
        "equal_perceptibility": pd.DataFrame(equal, columns=EQUAL_COLUMNS),
    }


# ----------------------------------------------------------------------------- figures


def _figure(width: float = 7.0, height: float = 4.2):
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(111)


def _empty(ax, title: str, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, fontsize=9)
    ax.set_axis_off()
    ax.set_title(title)


def _bars(ax, frame: pd.DataFrame, categories: list[str], value_of) -> None:
    runs = list(dict.fromkeys(frame["run"]))
    width = 0.8 / max(1, len(runs))
    for i, run in enumerate(runs):
        xs = [k + (i - (len(runs) - 1) / 2) * width for k in range(len(categories))]
        ax.bar(xs, [value_of(run, c) for c in categories], width=width, label=run)
    ax.set_xticks(range(len(categories)), categories, rotation=30, ha="right", fontsize=7)
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7, title="defense run", title_fontsize=7)


def figure_accuracy(tables: dict[str, pd.DataFrame]):
    """Robust accuracy (%) per threat model at each evaluated bound, one bar per run."""
    data = tables["accuracy"]
    fig, ax = _figure()
    title = "Robust accuracy per threat model and bound"
    if data.empty:
        _empty(ax, title, "no defense results for this study yet (manage.py evaluate_defense)")
        return fig, data
    keys = list(dict.fromkeys(data["condition"]))
    lookup = {(r, c): a for r, c, a in zip(data["run"], data["condition"], data["accuracy"],
                                           strict=True)}
    _bars(ax, data, keys, lambda run, c: 100 * lookup.get((run, c), float("nan")))
    ax.set_ylabel("robust accuracy (%)")
    ax.set_title(f"{title}\n{data['dataset'].iloc[0][:90]}", fontsize=8)
    return fig, data


def figure_summary(tables: dict[str, pd.DataFrame]):
    """Clean, union and unseen-mean accuracy (%) per run."""
    data = tables["summary"]
    fig, ax = _figure(6.0, 4.0)
    title = "Clean, union and unseen-mean accuracy"
    if data.empty:
        _empty(ax, title, "no defense results for this study yet (manage.py evaluate_defense)")
        return fig, data
    names = {"clean": "clean", "union": "union (all threat models)",
             "unseen_mean": "unseen mean"}
    by_run = data.set_index("run")

    def value(run, name):
        v = by_run.loc[run, {v: k for k, v in names.items()}[name]]
        return float("nan") if v is None or pd.isna(v) else 100 * float(v)

    _bars(ax, data, list(names.values()), value)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title, fontsize=9)
    return fig, data


def figure_equal_perceptibility(tables: dict[str, pd.DataFrame]):
    """Robust accuracy (%) against human perceptibility (%) per run and threat model: the
    defense compared across threat models at equal human perceptibility."""
    data = tables["equal_perceptibility"]
    fig, ax = _figure(6.5, 4.4)
    title = "Robust accuracy at equal human perceptibility"
    usable = data[data["perceptibility"].notna()] if not data.empty else data
    if usable.empty:
        _empty(ax, title, "no defense result shares a threat model and bound label with a"
               "\ncondition that has judgments (evaluate_defense --calibrated / named bounds)")
        return fig, data
    for (run, tm), group in usable.groupby(["run", "threat_model"], sort=True):
        group = group.sort_values("perceptibility", kind="stable")
        x = 100 * group["perceptibility"].astype(float)
        low = group["boot_low"].astype(float).fillna(group["perceptibility"].astype(float))
        high = group["boot_high"].astype(float).fillna(group["perceptibility"].astype(float))
        ax.errorbar(x, 100 * group["accuracy"].astype(float),
                    xerr=[x - 100 * low, 100 * high - x], marker="o", capsize=3,
                    label=f"{run}: {condition_title(tm, None)}")
        for xi, yi, label in zip(x, 100 * group["accuracy"], group["label"], strict=True):
            ax.annotate(label, (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=6)
    ax.set_xlabel("human perceptibility (% answering “different”; 95 % participant-bootstrap"
                  " interval)", fontsize=7)
    ax.set_ylabel("robust accuracy (%)")
    ax.set_xlim(-2, 102)  # a margin, so points at 0 % or 100 % stay visible
    ax.set_ylim(-2, 102)
    ax.legend(fontsize=6)
    ax.set_title(title, fontsize=9)
    return fig, data


FIGURES = {
    "robust_accuracy": ("Robust accuracy per threat model (named and calibrated bounds)",
                        figure_accuracy),
    "union": ("Clean, union and unseen-mean accuracy", figure_summary),
    "equal_perceptibility": ("Robust accuracy against human perceptibility",
                             figure_equal_perceptibility),
}


def render(tables: dict[str, pd.DataFrame], name: str, fmt: str) -> bytes:
    """``name``'s figure as PNG or SVG, or the CSV of exactly what it draws."""
    if name not in FIGURES:
        raise KeyError(f"unknown robustness figure {name!r}; known: {', '.join(FIGURES)}")
    fig, data = FIGURES[name][1](tables)
    if fmt == "csv":
        return data.to_csv(index=False).encode()
    if fmt not in ("png", "svg"):
        raise KeyError(f"unknown format {fmt!r}; known: png, svg, csv")
    fig.tight_layout()
    buf = io.BytesIO()
    meta = {"Software": None} if fmt == "png" else {"Date": None, "Creator": None}
    fig.savefig(buf, format=fmt, metadata=meta)
    return buf.getvalue()


def records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows as dicts with NaN as None (JSON-ready)."""
    return [{k: (None if isinstance(v, float) and v != v else v) for k, v in row.items()}
            for row in frame.astype(object).to_dict("records")]
