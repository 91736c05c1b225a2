"""TEMPORARY stand-ins for the issue-8 engine API (deleted at merge; imports → ``engine.*``).

The engine half of issue 8 (``engine.analysis.analyze``, ``engine.calibration``,
``engine.adaptive``, ``engine.observers``, ``engine.figures``) is written in another worktree.
The Django half codes against the agreed contract; these minimal implementations of exactly
those names let it run and be tested meanwhile. Every other studyapp module imports them from
here only, so the merge re-points one import per module. Nothing here is the reference
statistics: simple, correct-enough versions (Wilson intervals, a maximum-likelihood logistic
or Weibull fit with participant bootstrap, a grid QUEST+) with the contract's shapes.

Stands in for:
    engine.analysis.analyze, AnalysisReport
    engine.calibration.calibrate, CalibrationResult, PsychometricFit
    engine.adaptive.QuestPlus, ladder
    engine.observers.SimulatedObserver, ObserverPopulation, power
    engine.figures.fig4a_perceptibility_vs_lpips, fig4b_strength_vs_perceptibility,
        fig4c_distance_correlations, fig5_distance_violins, psychometric_curves
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy import optimize, special

from engine.analysis import (
    CONTROLS,
    distance_columns,
    distance_correlations,
    perceptibility_table,
    wilson_interval,
)

EXTRA_COLUMNS = {"success", "level"}


def _distances(pairs: pd.DataFrame) -> list[str]:
    return [c for c in distance_columns(pairs) if c not in EXTRA_COLUMNS]


def _records(frame: pd.DataFrame) -> list[dict]:
    return json.loads(frame.to_json(orient="records"))


# ============================================================================ analysis


@dataclass
class AnalysisReport:
    perceptibility: pd.DataFrame
    controls: pd.DataFrame
    correlations: pd.DataFrame
    participants: pd.DataFrame
    table4: pd.DataFrame
    exclusions: pd.DataFrame

    def tables(self) -> dict[str, pd.DataFrame]:
        return {
            "perceptibility": self.perceptibility,
            "controls": self.controls,
            "correlations": self.correlations,
            "participants": self.participants,
            "table4": self.table4,
            "exclusions": self.exclusions,
        }

    def to_json(self) -> dict[str, Any]:
        return {name: _records(t) for name, t in self.tables().items()}


def _boot_intervals(
    pairs: pd.DataFrame, judgments: pd.DataFrame, n_boot: int, seed: int
) -> pd.DataFrame:
    """Participant-bootstrap 95% interval of each condition's perceptibility."""
    cond = pairs.set_index("pair")["condition"]
    j = judgments.assign(condition=judgments["pair"].map(cond)).dropna(subset=["condition"])
    if j.empty or n_boot <= 0:
        return pd.DataFrame(columns=["condition", "boot_low", "boot_high"])
    counts = j.groupby(["participant", "condition"])["different"].agg(["sum", "count"])
    k = counts["sum"].unstack(fill_value=0)
    n = counts["count"].unstack(fill_value=0)
    rng = np.random.default_rng(seed)
    kk, nn = k.to_numpy(float), n.to_numpy(float)
    p = np.empty((n_boot, kk.shape[1]))
    for b in range(n_boot):
        w = np.bincount(rng.integers(0, len(kk), len(kk)), minlength=len(kk)).astype(float)
        with np.errstate(invalid="ignore", divide="ignore"):
            p[b] = (w @ kk) / (w @ nn)
    low, high = np.nanpercentile(p, [2.5, 97.5], axis=0)
    return pd.DataFrame({"condition": k.columns, "boot_low": low, "boot_high": high})


def analyze(
    pairs: pd.DataFrame,
    judgments: pd.DataFrame,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    include_excluded: bool = False,
    include_simulated: bool = False,
) -> AnalysisReport:
    excluded = judgments["excluded"].to_numpy(bool)
    simulated = judgments["simulated"].to_numpy(bool)
    keep = np.ones(len(judgments), bool)
    if not include_excluded:
        keep &= ~excluded
    if not include_simulated:
        keep &= ~simulated
    used = judgments[keep]
    labelled = pairs.copy()
    labelled["condition"] = labelled["condition"].where(~labelled["is_sentinel"], "sentinel")
    labelled["condition"] = labelled["condition"].where(~labelled["is_catch"], "catch")
    table = perceptibility_table(pairs[["pair", "condition", "threat_model", "bound", "label",
                                        "is_sentinel", "is_catch", *_distances(pairs)]],
                                 used[["pair", "different"]])
    if not table.empty:
        table = table.merge(_boot_intervals(labelled, used, n_boot, seed), on="condition",
                            how="left")
    controls = table[table["condition"].isin(CONTROLS)][
        ["condition", "n_judgments", "n_different", "perceptibility", "ci_low", "ci_high"]
    ].rename(columns={"perceptibility": "rate"}) if not table.empty else pd.DataFrame()
    correlations = distance_correlations(table) if not table.empty else pd.DataFrame()

    kind = labelled.set_index("pair")["condition"]
    part = used.assign(kind=used["pair"].map(kind))
    part = part.assign(
        sent=part["kind"] == "sentinel", data=~part["kind"].isin(CONTROLS),
    )
    part = part.assign(sent_diff=part["sent"] & part["different"],
                       data_diff=part["data"] & part["different"])
    g = part.groupby("participant", sort=True)
    agg = g.agg(n_judgments=("pair", "size"), n_sent=("sent", "sum"),
                k_sent=("sent_diff", "sum"), n_data=("data", "sum"),
                k_data=("data_diff", "sum"), median_response_ms=("response_ms", "median"))
    with np.errstate(invalid="ignore", divide="ignore"):
        part_rows = pd.DataFrame({
            "participant": agg.index.to_numpy(np.int64),
            "n_judgments": agg["n_judgments"].to_numpy(),
            "false_alarm_rate": (agg["k_sent"] / agg["n_sent"].replace(0, np.nan)).to_numpy(),
            "hit_rate": (agg["k_data"] / agg["n_data"].replace(0, np.nan)).to_numpy(),
            "median_response_ms": agg["median_response_ms"].to_numpy(float),
        })
    participants = part_rows

    t4 = table[~table["condition"].isin(CONTROLS)] if not table.empty else table
    if not t4.empty:
        strength = pairs.dropna(subset=["condition"]).groupby("condition")["success"].mean()
        t4 = t4[["threat_model", "bound", "label", "condition", "n_judgments", "perceptibility",
                 "ci_low", "ci_high"]].assign(strength=lambda d: d["condition"].map(strength))
    exclusions = pd.DataFrame([
        {"what": "excluded by quality control", "n_judgments": int(excluded.sum()),
         "n_sessions": int(judgments.loc[excluded, "session"].nunique()),
         "applied": not include_excluded},
        {"what": "simulated observers", "n_judgments": int(simulated.sum()),
         "n_sessions": int(judgments.loc[simulated, "session"].nunique()),
         "applied": not include_simulated},
    ])
    return AnalysisReport(table, controls, correlations, participants, t4, exclusions)


# ============================================================================ calibration


def _cdf(x: np.ndarray, sigmoid: str) -> np.ndarray:
    if sigmoid == "logistic":
        return special.expit(x)
    return -np.expm1(-np.exp(x))  # Weibull in log units (Gumbel)


def _cdf_inv(q: float, sigmoid: str) -> float:
    if sigmoid == "logistic":
        return float(special.logit(q))
    return float(np.log(-np.log1p(-q)))


@dataclass
class PsychometricFit:
    """P(different | bound) = γ + (1 − γ − λ)·F(α + β·log bound)."""

    threat_model: str
    alpha: float
    beta: float
    gamma: float
    lapse: float
    sigmoid: str = "logistic"
    thresholds: dict[str, dict[str, float]] = field(default_factory=dict)
    n_judgments: int = 0
    deviance: float = float("nan")

    def predict(self, bound) -> np.ndarray:
        x = self.alpha + self.beta * np.log(np.asarray(bound, float))
        return self.gamma + (1 - self.gamma - self.lapse) * _cdf(x, self.sigmoid)

    def threshold(self, target: float) -> float:
        q = (target - self.gamma) / (1 - self.gamma - self.lapse)
        if not 0 < q < 1:
            return float("nan")
        return float(np.exp((_cdf_inv(q, self.sigmoid) - self.alpha) / self.beta))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PsychometricFit:
        return cls(**data)


def _fit(bounds, k, n, gamma, lapse, sigmoid) -> tuple[float, float, float, float]:
    logb = np.log(bounds)

    def nll(theta):
        a, b = theta[0], theta[1]
        lam = special.expit(theta[2]) * 0.2 if lapse == "fit" else float(lapse)
        p = gamma + (1 - gamma - lam) * _cdf(a + b * logb, sigmoid)
        p = np.clip(p, 1e-9, 1 - 1e-9)
        return -np.sum(k * np.log(p) + (n - k) * np.log1p(-p))

    mid = float(np.median(logb))
    x0 = [-2.0 * mid, 2.0, -3.0]
    res = optimize.minimize(nll, x0, method="Nelder-Mead",
                            options={"maxiter": 4000, "xatol": 1e-6, "fatol": 1e-8})
    lam = special.expit(res.x[2]) * 0.2 if lapse == "fit" else float(lapse)
    return float(res.x[0]), float(res.x[1]), float(lam), float(res.fun)


@dataclass
class CalibrationResult:
    targets: tuple[float, ...]
    fits: dict[str, PsychometricFit]
    sigmoid: str
    counts: dict[str, int]

    def presets(self) -> dict[str, dict[str, float]]:
        return {
            tm: {label: t["bound"] for label, t in fit.thresholds.items()}
            for tm, fit in self.fits.items()
        }

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps({
            "targets": list(self.targets),
            "sigmoid": self.sigmoid,
            "counts": self.counts,
            "fits": {tm: f.to_dict() for tm, f in self.fits.items()},
        }, default=float).replace("NaN", "null"))


def target_label(target: float) -> str:
    return f"p{round(target * 100):d}"


def calibrate(
    pairs: pd.DataFrame,
    judgments: pd.DataFrame,
    *,
    targets=(0.1, 0.25, 0.5),
    n_boot: int = 200,
    seed: int = 0,
    sigmoid: str = "logistic",
    lapse="fit",
) -> CalibrationResult:
    if sigmoid not in ("logistic", "weibull"):
        raise ValueError(f"sigmoid must be logistic or weibull, got {sigmoid!r}")
    j = judgments.merge(pairs[["pair", "threat_model", "bound", "is_sentinel"]], on="pair")
    sent = j[j["is_sentinel"]]
    gamma = float(np.clip(sent["different"].mean(), 0.0, 0.5)) if len(sent) else 0.0
    rng = np.random.default_rng(seed)
    fits = {}
    data = j[j["threat_model"].notna() & j["bound"].notna()]
    for tm, g in data.groupby("threat_model", sort=True):
        agg = g.groupby("bound")["different"].agg(["sum", "count"])
        b, k, n = agg.index.to_numpy(float), agg["sum"].to_numpy(float), agg["count"].to_numpy(
            float)
        a, beta, lam, dev = _fit(b, k, n, gamma, lapse, sigmoid)
        fit = PsychometricFit(str(tm), a, beta, gamma, lam, sigmoid, n_judgments=int(n.sum()),
                              deviance=2 * dev)
        per = g.groupby(["participant", "bound"])["different"].agg(["sum", "count"])
        ks, ns = per["sum"].unstack(fill_value=0), per["count"].unstack(fill_value=0)
        boots = []
        for _ in range(n_boot):
            pick = rng.integers(0, len(ks), len(ks))
            kb, nb = ks.to_numpy()[pick].sum(0), ns.to_numpy()[pick].sum(0)
            ok = nb > 0
            if ok.sum() < 2:
                continue
            ab, bb, lb, _ = _fit(ks.columns.to_numpy(float)[ok], kb[ok], nb[ok], gamma, lapse,
                                 sigmoid)
            boots.append(PsychometricFit(str(tm), ab, bb, gamma, lb, sigmoid))
        for t in targets:
            est = fit.threshold(t)
            bt = np.array([bf.threshold(t) for bf in boots])
            bt = bt[np.isfinite(bt)]
            low, high = (np.percentile(bt, [2.5, 97.5]) if len(bt) else (np.nan, np.nan))
            fit.thresholds[target_label(t)] = {"target": t, "bound": est, "low": float(low),
                                               "high": float(high)}
        fits[str(tm)] = fit
    counts = {"n_judgments": int(len(data)), "n_sentinel_judgments": int(len(sent)),
              "n_participants": int(j["participant"].nunique())}
    return CalibrationResult(tuple(targets), fits, sigmoid, counts)


# ============================================================================ adaptive


def ladder(low: float, high: float, n: int) -> np.ndarray:
    if not (0 < low < high) or n < 2:
        raise ValueError(f"a ladder needs 0 < low < high and n >= 2, got {low}, {high}, {n}")
    return np.geomspace(low, high, n)


class QuestPlus:
    """Grid QUEST+ (Watson 2017) over threshold (log bound) × slope; levels are bounds."""

    def __init__(self, levels, *, thresholds_grid, slopes_grid, guess_rate=0.0,
                 lapse_rate=0.02, sigmoid="logistic"):
        self.levels = np.asarray(levels, float)
        t = np.log(np.asarray(thresholds_grid, float))[:, None, None]
        s = np.asarray(slopes_grid, float)[None, :, None]
        x = np.log(self.levels)[None, None, :]
        self.p = guess_rate + (1 - guess_rate - lapse_rate) * _cdf(s * (x - t), sigmoid)
        self.p = np.clip(self.p, 1e-9, 1 - 1e-9)  # [T, S, L]
        self.log_post = np.zeros(self.p.shape[:2])

    def update_many(self, level_idx, different) -> None:
        level_idx = np.asarray(level_idx, int)
        different = np.asarray(different, bool)
        if level_idx.size == 0:
            return
        yes = np.bincount(level_idx[different], minlength=len(self.levels))
        no = np.bincount(level_idx[~different], minlength=len(self.levels))
        self.log_post += np.log(self.p) @ yes + np.log1p(-self.p) @ no

    @property
    def posterior(self) -> np.ndarray:
        w = np.exp(self.log_post - self.log_post.max())
        return w / w.sum()

    def next_level(self) -> int:
        post = self.posterior[:, :, None]
        p_yes = (post * self.p).sum((0, 1))  # [L]
        h = np.zeros(len(self.levels))
        for outcome, p_out in ((self.p, p_yes), (1 - self.p, 1 - p_yes)):
            new = post * outcome / p_out
            h += p_out * -(new * np.log(np.clip(new, 1e-300, None))).sum((0, 1))
        return int(np.argmin(h))


# ============================================================================ observers


@dataclass
class SimulatedObserver:
    threshold: float
    slope: float = 3.0
    guess_rate: float = 0.05
    lapse_rate: float = 0.02
    careless: bool = False
    bias: float = 0.0

    def respond(self, values, rng: np.random.Generator) -> np.ndarray:
        values = np.asarray(values, float)
        if self.careless:
            return rng.random(values.shape) < 0.5
        with np.errstate(divide="ignore"):
            x = self.slope * (np.log(np.where(values > 0, values, np.nan))
                              - np.log(self.threshold)) + self.bias
        f = np.where(np.isnan(x), 0.0, special.expit(np.nan_to_num(x, nan=-50.0)))
        p = self.guess_rate + (1 - self.guess_rate - self.lapse_rate) * f
        return rng.random(values.shape) < p


@dataclass
class ObserverPopulation:
    threshold: float
    slope: float = 3.0
    guess_rate: float = 0.05
    lapse_rate: float = 0.02
    careless_share: float = 0.0
    bias_sd: float = 0.0
    threshold_sd: float = 0.0

    def sample(self, n: int, rng: np.random.Generator) -> list[SimulatedObserver]:
        return [
            SimulatedObserver(
                threshold=self.threshold * float(np.exp(rng.normal(0, self.threshold_sd))),
                slope=self.slope, guess_rate=self.guess_rate, lapse_rate=self.lapse_rate,
                careless=bool(rng.random() < self.careless_share),
                bias=float(rng.normal(0, self.bias_sd)) if self.bias_sd else 0.0,
            )
            for _ in range(n)
        ]


def power(p: float, width: float, *, z: float = 1.959964) -> int:
    """Judgments for a 95% Wilson interval of full width ≤ ``width`` at proportion ``p``."""
    if not 0 < width < 1 or not 0 <= p <= 1:
        raise ValueError(f"need 0 < width < 1 and 0 <= p <= 1, got width={width}, p={p}")
    lo, hi = 1, 1
    while True:
        a, b = wilson_interval(round(p * hi), hi, z)
        if b - a <= width:
            break
        lo, hi = hi, hi * 2
    while lo < hi:
        mid = (lo + hi) // 2
        a, b = wilson_interval(round(p * mid), mid, z)
        if b - a <= width:
            hi = mid
        else:
            lo = mid + 1
    return int(hi)


# ============================================================================ figures


def _fig(w=5.0, h=3.6):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100)
    return fig, fig.add_subplot(111)


def _lpips_column(report: AnalysisReport) -> str | None:
    cols = [c for c in report.perceptibility.columns if c.startswith("mean_lpips")]
    return cols[0] if cols else None


def _data_rows(report: AnalysisReport) -> pd.DataFrame:
    t = report.perceptibility
    return t[~t["condition"].isin(CONTROLS)] if not t.empty else t


def fig4a_perceptibility_vs_lpips(report: AnalysisReport):
    fig, ax = _fig()
    rows = _data_rows(report)
    col = _lpips_column(report) or next(
        (c for c in rows.columns if c.startswith("mean_")), None)
    data = pd.DataFrame(columns=["condition", "threat_model", "distance", "perceptibility",
                                 "ci_low", "ci_high"])
    if col is not None and not rows.empty:
        data = rows[["condition", "threat_model", col, "perceptibility", "ci_low",
                     "ci_high"]].rename(columns={col: "distance"})
        for tm, g in data.groupby("threat_model"):
            ax.errorbar(g["distance"], g["perceptibility"],
                        yerr=[g["perceptibility"] - g["ci_low"],
                              g["ci_high"] - g["perceptibility"]],
                        fmt="o", label=str(tm), capsize=2)
        ax.legend(fontsize=7)
    ax.set_xlabel((col or "distance").removeprefix("mean_"))
    ax.set_ylabel("perceptibility")
    ax.set_title("Fig. 4a: perceptibility vs LPIPS")
    return fig, data.reset_index(drop=True)


def fig4b_strength_vs_perceptibility(report: AnalysisReport):
    fig, ax = _fig()
    data = report.table4[["condition", "threat_model", "perceptibility", "ci_low", "ci_high",
                          "strength"]] if not report.table4.empty else pd.DataFrame(
        columns=["condition", "threat_model", "perceptibility", "ci_low", "ci_high", "strength"])
    for tm, g in data.groupby("threat_model"):
        ax.errorbar(g["perceptibility"], g["strength"],
                    xerr=[g["perceptibility"] - g["ci_low"], g["ci_high"] - g["perceptibility"]],
                    fmt="o-", label=str(tm), capsize=2)
    if not data.empty:
        ax.legend(fontsize=7)
    ax.set_xlabel("perceptibility")
    ax.set_ylabel("attack strength (success rate)")
    ax.set_title("Fig. 4b: strength vs perceptibility")
    return fig, data.reset_index(drop=True)


def fig4c_distance_correlations(report: AnalysisReport):
    fig, ax = _fig()
    data = report.correlations.copy()
    if not data.empty:
        ax.barh(data["distance"], data["r"].abs())
    ax.set_xlabel("|Pearson r| with perceptibility")
    ax.set_title("Fig. 4c: distance correlations")
    return fig, data


def fig5_distance_violins(pairs: pd.DataFrame, distance: str | None = None):
    fig, ax = _fig()
    dists = [c for c in _distances(pairs) if c.startswith("lpips")] or _distances(pairs)
    col = distance or (dists[0] if dists else None)
    data = pd.DataFrame(columns=["threat_model", "distance"])
    if col is not None:
        d = pairs.dropna(subset=["condition"])
        data = d[["pair", "threat_model", "condition", col]].rename(columns={col: "distance"})
        data = data.dropna(subset=["distance"])
        groups = [(tm, g["distance"].to_numpy()) for tm, g in data.groupby("threat_model")]
        groups = [(tm, v) for tm, v in groups if len(v)]
        if groups:
            ax.violinplot([v for _, v in groups], showmedians=True)
            ax.set_xticks(range(1, len(groups) + 1), [tm for tm, _ in groups])
    ax.set_ylabel(col or "distance")
    ax.set_title("Fig. 5: distance per threat model")
    return fig, data.reset_index(drop=True)


def psychometric_curves(result: CalibrationResult, pairs: pd.DataFrame,
                        judgments: pd.DataFrame):
    fig, ax = _fig()
    j = judgments.merge(pairs[["pair", "threat_model", "bound"]], on="pair").dropna(
        subset=["bound"])
    rows = []
    for tm, g in j.groupby("threat_model"):
        agg = g.groupby("bound")["different"].agg(["mean", "count"]).reset_index()
        fit = result.fits.get(str(tm))
        line = ax.scatter(agg["bound"], agg["mean"], s=10 + agg["count"] / agg["count"].max() * 40,
                          label=str(tm))
        if fit is not None:
            xs = np.geomspace(agg["bound"].min() / 2, agg["bound"].max() * 2, 100)
            ax.plot(xs, fit.predict(xs), color=line.get_facecolor()[0])
        for _, r in agg.iterrows():
            rows.append({"threat_model": tm, "bound": r["bound"], "n": int(r["count"]),
                         "observed": r["mean"],
                         "fitted": float(fit.predict(r["bound"])) if fit else np.nan})
    ax.set_xscale("log")
    ax.set_xlabel("bound")
    ax.set_ylabel("P(different)")
    ax.set_title("Psychometric functions")
    if rows:
        ax.legend(fontsize=7)
    return fig, pd.DataFrame(rows, columns=["threat_model", "bound", "n", "observed", "fitted"])


__all__ = [
    "AnalysisReport", "CalibrationResult", "ObserverPopulation", "PsychometricFit", "QuestPlus",
    "SimulatedObserver", "analyze", "calibrate", "fig4a_perceptibility_vs_lpips",
    "fig4b_strength_vs_perceptibility", "fig4c_distance_correlations", "fig5_distance_violins",
    "ladder", "power", "psychometric_curves", "target_label",
]
