"""The PAT paper's perceptual-study figures (Fig. 4a–c, Fig. 5) and psychometric curves.

Every function takes an :class:`engine.analysis.AnalysisReport` (or a ``(pairs, judgments)``
tuple, analysed on the spot) — or, for :func:`psychometric_curves`, a
:class:`engine.calibration.CalibrationResult` — and returns ``(Figure, DataFrame)``: the
matplotlib figure and exactly the numbers drawn, for the CSV download beside it. Figures are
built with ``matplotlib.figure.Figure`` (Agg canvas, no pyplot global state), so they are
safe in a web server thread. :func:`figure_bytes` renders PNG or SVG.
"""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from engine.analysis import CONTROLS, AnalysisReport, _wilson_arrays, analyze
from engine.provenance import distance_label

# Axis labels of distance columns name the network and its weights state:
# ``lpips_alexnet_untrained`` → "LPIPS (AlexNet, untrained)" (engine.provenance.distance_label).


def _report(report_or_frames, n_boot: int = 1000, seed: int = 0) -> AnalysisReport:
    if isinstance(report_or_frames, AnalysisReport):
        return report_or_frames
    if isinstance(report_or_frames, tuple) and len(report_or_frames) == 2:
        pairs, judgments = report_or_frames
        return analyze(pairs, judgments, n_boot=n_boot, seed=seed)
    raise ValueError("pass an AnalysisReport or a (pairs, judgments) tuple")


def _figure(width=6.0, height=4.2, ncols=1, nrows=1):
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _colors(names):
    return {n: f"C{i % 10}" for i, n in enumerate(sorted(map(str, names)))}


def _interval(table, prefer="boot"):
    low, high = f"{prefer}_low", f"{prefer}_high"
    if low in table and table[low].notna().any():
        return table[low], table[high]
    return table["ci_low"], table["ci_high"]


def figure_bytes(fig: Figure, fmt: str = "png", dpi: int = 110) -> bytes:
    """The figure rendered as ``png`` or ``svg`` bytes."""
    if fmt not in ("png", "svg"):
        raise ValueError(f"format must be png or svg, got {fmt!r}")
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def fig4a_perceptibility_vs_lpips(report_or_frames, *, distance: str = "lpips_alexnet",
                                  n_boot: int = 1000, seed: int = 0):
    """Fig. 4a: perceptibility (95 % participant-bootstrap interval) against the mean
    distance of each condition's pairs, one line per threat model through its bounds.

    Frame: ``condition, threat_model, bound, label, mean_<distance>, perceptibility, ci_low,
    ci_high, boot_low, boot_high, n_judgments`` (rows of ``report.perceptibility``).
    """
    report = _report(report_or_frames, n_boot, seed)
    col = f"mean_{distance}"
    table = report.perceptibility
    if col not in table:
        raise ValueError(f"no distance {distance!r} in the report (have "
                         f"{[c[5:] for c in table.columns if c.startswith('mean_')]})")
    data = table[~table["condition"].isin(CONTROLS) & table["perceptibility"].notna()][
        ["condition", "threat_model", "bound", "label", col, "perceptibility", "ci_low",
         "ci_high", "boot_low", "boot_high", "n_judgments"]].reset_index(drop=True)
    fig, axes = _figure()
    ax = axes[0, 0]
    colors = _colors(data["threat_model"].unique())
    for tm, g in data.groupby("threat_model"):
        g = g.sort_values("bound")
        low, high = _interval(g)
        ax.errorbar(g[col], g["perceptibility"], yerr=[g["perceptibility"] - low,
                    high - g["perceptibility"]], fmt="o-", color=colors[str(tm)], label=str(tm),
                    capsize=3)
    ax.set(xlabel=f"mean {distance_label(distance)} distance",
           ylabel="perceptibility (fraction 'different')", ylim=(0, 1),
           title="Perceptibility vs distance (PAT Fig. 4a)")
    if len(data):
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig, data


def fig4b_strength_vs_perceptibility(report_or_frames, *, n_boot: int = 1000, seed: int = 0):
    """Fig. 4b: attack strength (success rate) against perceptibility per threat model ×
    bound (table 4), horizontal bars the perceptibility interval.

    Frame: ``threat_model, bound, label, perceptibility, ci_low, ci_high, boot_low,
    boot_high, strength, strength_source`` (rows of ``report.table4`` with a strength).
    """
    report = _report(report_or_frames, n_boot, seed)
    t4 = report.table4
    data = t4[t4["strength"].notna() & t4["perceptibility"].notna()][
        ["threat_model", "bound", "label", "perceptibility", "ci_low", "ci_high", "boot_low",
         "boot_high", "strength", "strength_source"]].reset_index(drop=True)
    fig, axes = _figure()
    ax = axes[0, 0]
    colors = _colors(data["threat_model"].unique())
    for tm, g in data.groupby("threat_model"):
        g = g.sort_values("bound")
        low, high = _interval(g)
        ax.errorbar(g["perceptibility"], g["strength"], xerr=[g["perceptibility"] - low,
                    high - g["perceptibility"]], fmt="o-", color=colors[str(tm)],
                    label=str(tm), capsize=3)
    ax.set(xlabel="perceptibility", ylabel="strength (attack success rate)", xlim=(0, 1),
           ylim=(0, 1.02), title="Strength vs perceptibility (PAT Fig. 4b)")
    if len(data):
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no strength data (pairs' success or evaluation results)",
                ha="center", va="center", transform=ax.transAxes, fontsize=8)
    fig.tight_layout()
    return fig, data


def fig4c_distance_correlations(report_or_frames, *, n_boot: int = 1000, seed: int = 0):
    """Fig. 4c: Pearson r across conditions between each distance (1 − SSIM for SSIM) and
    perceptibility, with the participant × pair bootstrap 95 % interval.

    Frame: ``distance, transform, n_conditions, r, r_low, r_high, rho, rho_low, rho_high``
    (rows of ``report.correlations``, sorted by r).
    """
    report = _report(report_or_frames, n_boot, seed)
    data = report.correlations[["distance", "transform", "n_conditions", "r", "r_low",
                                "r_high", "rho", "rho_low", "rho_high"]]
    data = data.sort_values("r", na_position="first").reset_index(drop=True)
    fig, axes = _figure()
    ax = axes[0, 0]
    y = np.arange(len(data))
    r = data["r"].fillna(0).to_numpy()
    err = np.vstack([(data["r"] - data["r_low"]).fillna(0), (data["r_high"] - data["r"]).fillna(0)])
    ax.barh(y, r, xerr=err, color="C0", capsize=3)
    ax.set_yticks(y, [distance_label(d) for d in data["distance"]], fontsize=8)
    ax.set(xlabel="Pearson r with perceptibility (across conditions)", xlim=(-1, 1),
           title="How well each distance tracks people (PAT Fig. 4c)")
    ax.axvline(0, color="k", lw=0.6)
    fig.tight_layout()
    return fig, data


def fig5_distance_violins(report_or_frames, *, distance: str = "lpips_alexnet",
                          n_boot: int = 1000, seed: int = 0):
    """Fig. 5: distribution of one distance over each threat model's pairs, a violin per
    threat model × bound label.

    Frame: ``pair, condition, threat_model, bound, label, distance, value`` (rows of
    ``report.pair_distances`` for that distance).
    """
    report = _report(report_or_frames, n_boot, seed)
    pdist = report.pair_distances
    data = pdist[(pdist["distance"] == distance) & pdist["value"].notna()].reset_index(drop=True)
    if pdist.empty or not (pdist["distance"] == distance).any():
        raise ValueError(f"no distance {distance!r} in the report")
    groups = data.sort_values(["threat_model", "bound"]).groupby(
        ["threat_model", "bound"], sort=False)
    fig, axes = _figure(width=max(6.0, 0.45 * groups.ngroups + 2))
    ax = axes[0, 0]
    colors = _colors(data["threat_model"].unique())
    values, names, cols = [], [], []
    for (tm, bound), g in groups:
        values.append(g["value"].to_numpy())
        label = g["label"].iloc[0] or f"{bound:g}"
        names.append(f"{tm}\n{label}")
        cols.append(colors[str(tm)])
    if values:
        parts = ax.violinplot(values, showmedians=True)
        for body, c in zip(parts["bodies"], cols, strict=True):
            body.set_facecolor(c)
            body.set_alpha(0.6)
        ax.set_xticks(np.arange(1, len(values) + 1), names, fontsize=7)
    ax.set(ylabel=f"{distance_label(distance)} distance",
           title="Distances per threat model and bound (PAT Fig. 5)")
    fig.tight_layout()
    return fig, data


def psychometric_curves(calibration_or_frames, *, n_points: int = 200, **calibrate_kwargs):
    """Per threat model: perceptibility at each bound (Wilson 95 %), the fitted psychometric
    function, and the thresholds with their bootstrap intervals.

    Accepts a :class:`engine.calibration.CalibrationResult` or ``(pairs, judgments)``
    (calibrated with ``calibrate_kwargs``). Frame: ``kind`` (``"data"`` or ``"threshold"``),
    ``threat_model``, then for data ``bound, n_judgments, n_different, perceptibility, ci_low,
    ci_high, fitted`` and for thresholds ``label, target, bound, low, high``.
    """
    from engine.calibration import CalibrationResult, calibrate

    cal = calibration_or_frames
    if isinstance(cal, tuple) and len(cal) == 2:
        cal = calibrate(*cal, **calibrate_kwargs)
    if not isinstance(cal, CalibrationResult):
        raise ValueError("pass a CalibrationResult or a (pairs, judgments) tuple")
    tms = list(cal.threat_models)
    ncols = min(3, max(1, len(tms)))
    nrows = max(1, -(-len(tms) // ncols))
    fig, axes = _figure(width=4.2 * ncols, height=3.4 * nrows, ncols=ncols, nrows=nrows)
    rows = []
    for i, tm in enumerate(tms):
        ax = axes[i // ncols, i % ncols]
        c = cal.threat_models[tm]
        counts = c.counts[c.counts["n_judgments"] > 0]
        low, high = _wilson_arrays(counts["n_different"], counts["n_judgments"])
        fitted = c.fit.predict(counts["bound"])
        for j, (_, r) in enumerate(counts.iterrows()):
            rows.append({"kind": "data", "threat_model": tm, "bound": r["bound"],
                         "n_judgments": int(r["n_judgments"]),
                         "n_different": int(r["n_different"]),
                         "perceptibility": r["perceptibility"], "ci_low": low[j],
                         "ci_high": high[j], "fitted": fitted[j]})
        ax.errorbar(counts["bound"], counts["perceptibility"],
                    yerr=[counts["perceptibility"] - low, high - counts["perceptibility"]],
                    fmt="o", color="k", capsize=3, label="data (Wilson 95%)")
        lo = min(counts["bound"].min(), c.thresholds["low"].min(skipna=True)) / 1.5
        hi = max(counts["bound"].max(), c.thresholds["high"].max(skipna=True)) * 1.5
        grid = np.geomspace(lo, hi, n_points)
        ax.plot(grid, c.fit.predict(grid), color="C0", label=f"{c.fit.sigmoid} fit")
        for k, (_, t) in enumerate(c.thresholds.iterrows()):
            rows.append({"kind": "threshold", "threat_model": tm, "label": t["label"],
                         "target": t["target"], "bound": t["bound"], "low": t["low"],
                         "high": t["high"]})
            if np.isfinite(t["bound"]):
                # A percentile bootstrap interval (few resamples) may miss its point estimate:
                # the bar then ends at the point (matplotlib refuses negative lengths); the
                # frame keeps the interval as computed.
                ax.errorbar([t["bound"]], [t["target"]], xerr=[[max(t["bound"] - t["low"], 0)],
                            [max(t["high"] - t["bound"], 0)]], fmt="s", color=f"C{k + 1}",
                            capsize=3, label=f"{t['label']} = {t['bound']:.3g}")
        ax.axhline(c.fit.guess_rate, color="gray", lw=0.6, ls=":")
        ax.set(xscale="log", ylim=(0, 1), xlabel="bound", ylabel="P(different)", title=tm)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.legend(fontsize=6)
    for j in range(len(tms), nrows * ncols):
        axes[j // ncols, j % ncols].set_visible(False)
    fig.tight_layout()
    return fig, pd.DataFrame(rows)


# ================================================================ issue 18: other protocols
def _protocol_table(report_or_table, name: str, protocol: str) -> pd.DataFrame:
    from engine.protocol_analysis import ProtocolReport

    if isinstance(report_or_table, ProtocolReport):
        if report_or_table.protocol != protocol or name not in report_or_table.tables:
            raise ValueError(f"the report is for protocol {report_or_table.protocol!r}, "
                             f"not {protocol!r} (no table {name!r})")
        return report_or_table.tables[name]
    if isinstance(report_or_table, pd.DataFrame):
        return report_or_table
    raise ValueError(f"pass a ProtocolReport ({protocol}) or its {name!r} DataFrame")


def twoafc_scores_figure(report_or_table):
    """BAPPS/DreamSim-style bar chart: each distance's 2AFC score (agreement with people)
    with its participant-bootstrap 95 % interval, and the human–human ceiling as a line
    (its interval shaded).

    Accepts a 2AFC :class:`engine.protocol_analysis.ProtocolReport` or the
    :func:`engine.protocol_analysis.twoafc_table` frame. Frame returned: the metric rows
    drawn, ``metric, transform, n_triplets, score, score_low, score_high, human_ceiling``.
    """
    table = _protocol_table(report_or_table, "table", "2afc")
    need = {"kind", "metric", "score", "score_low", "score_high", "human_ceiling"}
    if not need <= set(table.columns):
        raise ValueError(f"a twoafc_table frame needs columns {sorted(need)}")
    data = table[table["kind"] == "metric"][["metric", "transform", "n_triplets", "score",
                                             "score_low", "score_high", "human_ceiling"]]
    data = data.reset_index(drop=True)
    human = table[table["kind"] == "human"]
    fig, axes = _figure(width=max(5.0, 0.7 * len(data) + 2.5))
    ax = axes[0, 0]
    x = np.arange(len(data))
    score = data["score"].astype(float).fillna(0).to_numpy()
    err = np.vstack([(data["score"] - data["score_low"]).astype(float).fillna(0).clip(lower=0),
                     (data["score_high"] - data["score"]).astype(float).fillna(0).clip(
                         lower=0)])
    ax.bar(x, score, yerr=err, color="C0", capsize=4, label="2AFC score (bootstrap 95%)")
    if len(human):
        h = human.iloc[0]
        ax.axhline(h["score"], color="k", ls="--", lw=1,
                   label=f"human ceiling {h['score']:.3f}")
        if np.isfinite(h["score_low"]) and np.isfinite(h["score_high"]):
            ax.axhspan(h["score_low"], h["score_high"], color="k", alpha=0.1, lw=0)
    ax.axhline(0.5, color="gray", lw=0.6, ls=":")
    ax.set_xticks(x, [distance_label(m) for m in data["metric"]], rotation=30, ha="right",
                  fontsize=8)
    ax.set(ylabel="2AFC score (agreement with people)", ylim=(0.4, 1.0),
           title="Distances against people's 2AFC choices (BAPPS-style)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig, data


def label_accuracy_figure(report_or_tables, *, n_points: int = 200):
    """Human accuracy against bound per threat model (Wilson 95 %), the fitted accuracy
    curve of :func:`engine.protocol_analysis.label_flip_bound`, the label-flip bound with its
    bootstrap interval, the gold accuracy and the chance floor.

    Accepts a label :class:`engine.protocol_analysis.ProtocolReport` or a tuple
    ``(accuracy, flip_bound)`` of its frames. Frame returned: ``kind`` (``"data"`` or
    ``"flip"``), ``threat_model``, then for data ``bound, n_judgments, accuracy, ci_low,
    ci_high, fitted`` and for flips ``target_accuracy, flip_bound, low, high``.
    """
    from engine.protocol_analysis import ProtocolReport, label_accuracy_curve

    if isinstance(report_or_tables, ProtocolReport):
        acc = _protocol_table(report_or_tables, "accuracy", "label")
        flips = _protocol_table(report_or_tables, "flip_bound", "label")
    elif isinstance(report_or_tables, tuple) and len(report_or_tables) == 2:
        acc, flips = report_or_tables
    else:
        raise ValueError("pass a label ProtocolReport or (accuracy, flip_bound) frames")
    main = acc[(acc["kind"] == "main") & (acc["bound"] > 0)]
    gold = acc[acc["kind"] == "gold"]
    tms = sorted(main["threat_model"].unique())
    ncols = min(3, max(1, len(tms)))
    nrows = max(1, -(-len(tms) // ncols))
    fig, axes = _figure(width=4.2 * ncols, height=3.4 * nrows, ncols=ncols, nrows=nrows)
    rows = []
    fits = flips.set_index("threat_model") if len(flips) else flips
    for i, tm in enumerate(tms):
        ax = axes[i // ncols, i % ncols]
        g = main[main["threat_model"] == tm].sort_values("bound")
        fit = fits.loc[tm] if tm in getattr(fits, "index", []) else None
        has_fit = fit is not None and np.isfinite(fit["alpha"])
        fitted = (label_accuracy_curve(fit, g["bound"].to_numpy(float)) if has_fit
                  else np.full(len(g), np.nan))
        for j, (_, r) in enumerate(g.iterrows()):
            rows.append({"kind": "data", "threat_model": tm, "bound": r["bound"],
                         "n_judgments": int(r["n_judgments"]), "accuracy": r["accuracy"],
                         "ci_low": r["ci_low"], "ci_high": r["ci_high"], "fitted": fitted[j]})
        ax.errorbar(g["bound"], g["accuracy"], yerr=[g["accuracy"] - g["ci_low"],
                    g["ci_high"] - g["accuracy"]], fmt="o", color="k", capsize=3,
                    label="people (Wilson 95%)")
        if has_fit:
            lo, hi = g["bound"].min() / 1.5, g["bound"].max() * 1.5
            grid = np.geomspace(lo, hi, n_points)
            ax.plot(grid, label_accuracy_curve(fit, grid), color="C0", label="fit")
            ax.axhline(fit["floor_accuracy"], color="gray", lw=0.6, ls=":",
                       label=f"floor {fit['floor_accuracy']:.2f}")
            rows.append({"kind": "flip", "threat_model": tm,
                         "target_accuracy": fit["target_accuracy"],
                         "flip_bound": fit["flip_bound"], "low": fit["low"],
                         "high": fit["high"]})
            if np.isfinite(fit["flip_bound"]):
                xerr = [[max(fit["flip_bound"] - fit["low"], 0) if np.isfinite(fit["low"])
                         else 0], [max(fit["high"] - fit["flip_bound"], 0)
                                   if np.isfinite(fit["high"]) else 0]]
                ax.errorbar([fit["flip_bound"]], [fit["target_accuracy"]], xerr=xerr,
                            fmt="s", color="C3", capsize=3,
                            label=f"label-flip bound {fit['flip_bound']:.3g}")
        if len(gold):
            ax.axhline(gold.iloc[0]["accuracy"], color="C2", lw=0.8, ls="--",
                       label=f"gold {gold.iloc[0]['accuracy']:.2f}")
        ax.set(xscale="log", ylim=(0, 1.02), xlabel="bound", ylabel="accuracy (true label)",
               title=str(tm))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.legend(fontsize=6)
    for j in range(len(tms), nrows * ncols):
        axes[j // ncols, j % ncols].set_visible(False)
    fig.tight_layout()
    return fig, pd.DataFrame(rows)


def rating_mos_figure(report_or_table, *, distance: str):
    """Item MOS (t 95 % interval) against one distance (``d_<distance>``; 1 − SSIM for
    SSIM), the scatter behind :func:`engine.protocol_analysis.rating_correlations`.

    Accepts a rating :class:`engine.protocol_analysis.ProtocolReport` or the
    :func:`engine.protocol_analysis.rating_mos` frame. Frame returned: ``item, condition,
    distance, mos, mos_low, mos_high, z_mos``.
    """
    from engine.protocol_analysis import _as_distance

    table = _protocol_table(report_or_table, "mos", "rating")
    col = f"d_{distance}"
    if col not in table:
        raise ValueError(f"no distance {distance!r} in the MOS table (have "
                         f"{[c[2:] for c in table.columns if c.startswith('d_')]})")
    data = pd.DataFrame({"item": table["item"], "condition": table["condition"],
                         "distance": _as_distance(distance, table[col]), "mos": table["mos"],
                         "mos_low": table["mos_low"], "mos_high": table["mos_high"],
                         "z_mos": table["z_mos"]})
    fig, axes = _figure()
    ax = axes[0, 0]
    colors = _colors(data["condition"].astype(str).unique())
    for cond, g in data.groupby(data["condition"].astype(str)):
        yerr = np.vstack([(g["mos"] - g["mos_low"]).fillna(0), (g["mos_high"] - g["mos"])
                          .fillna(0)])
        ax.errorbar(g["distance"], g["mos"], yerr=yerr, fmt="o", ms=3, capsize=2,
                    color=colors[cond], label=cond)
    ax.set(xlabel=f"{distance_label(distance)} distance", ylabel="MOS (mean rating)",
           title="Item scores against distance")
    if data["condition"].nunique() <= 12:
        ax.legend(fontsize=6)
    fig.tight_layout()
    return fig, data
