"""Psychometric calibration of attack bounds from JND judgments.

Model (per threat model), with ``b`` the bound in the threat model's own units::

    P(different | b) = γ + (1 − γ − λ) · F(α + β · ln b)

- ``γ`` guess rate: the sentinel false-alarm rate (identical images answered "different");
- ``λ`` lapse rate: fitted (``lapse="fit"``, in [0, 0.5]) or fixed (``lapse=0.02``);
- ``F`` the logistic ``1 / (1 + e^{−z})`` or the Weibull ``1 − exp(−e^{z})`` (a Weibull in
  ``b``: ``1 − exp(−(b/t)^β)`` with ``t = e^{−α/β}``; the Gumbel CDF in ``ln b``).

Fitting is maximum likelihood on binomial counts per bound (Wichmann & Hill 2001). A
*threshold* ``b_p`` is the bound where ``P(different) = p`` on the full scale (so p = 0.5 means
half the answers are "different", guesses included): ``b_p = exp((F⁻¹((p − γ)/(1 − γ − λ)) −
α) / β)``; NaN when ``p`` is outside ``(γ, 1 − λ)``. Goodness of fit: the deviance
``D = 2 Σ [k ln(k / nP) + (n − k) ln((n − k) / n(1 − P))]`` against χ² with
``levels − fitted parameters`` degrees of freedom (Wichmann & Hill 2001; overdispersion between
people inflates it).

psignifit 4 (Schütt et al. 2016) is the test oracle: its stimulus is ``x = ln b``, its
``threshold`` ``m`` the ``x`` where ``F = 0.5`` and its ``width`` ``w`` the ``x`` span from
``F = 0.05`` to ``0.95``; for the logistic ``β = 2 ln 19 / w``, ``α = −β m``; for its
``weibull`` (= Gumbel on ``x``) ``β = (ln(−ln 0.05) − ln(−ln 0.95)) / w``,
``α = −β m + ln ln 2``. With flat priors and ``eta`` (overdispersion) fixed at 0 its MAP is
this ML fit.

Intervals: participant bootstrap (multinomial weights as in :mod:`engine.analysis`), every
replicate refitted (vectorised Fisher scoring) with its own sentinel false-alarm rate as ``γ``;
95 % percentile intervals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy import optimize, special, stats

from engine.analysis import CONTROLS, _json_safe, _prepare, bootstrap_products

SIGMOIDS = ("logistic", "weibull")
EPS = 1e-10


def sigmoid_cdf(z, sigmoid: str):
    """``F(z)``: logistic ``1/(1+e^{−z})`` or Weibull/Gumbel ``1 − exp(−e^{z})``."""
    z = np.asarray(z, float)
    if sigmoid == "logistic":
        return special.expit(z)
    if sigmoid == "weibull":
        return -np.expm1(-np.exp(np.minimum(z, 50.0)))
    raise ValueError(f"unknown sigmoid {sigmoid!r}; use one of {SIGMOIDS}")


def sigmoid_pdf(z, sigmoid: str):
    z = np.asarray(z, float)
    if sigmoid == "logistic":
        e = special.expit(z)
        return e * (1 - e)
    if sigmoid == "weibull":
        ez = np.exp(np.minimum(z, 50.0))
        return ez * np.exp(-ez)
    raise ValueError(f"unknown sigmoid {sigmoid!r}; use one of {SIGMOIDS}")


def sigmoid_ppf(u, sigmoid: str):
    u = np.asarray(u, float)
    with np.errstate(invalid="ignore", divide="ignore"):
        if sigmoid == "logistic":
            return special.logit(u)
        if sigmoid == "weibull":
            return np.log(-np.log1p(-u))
    raise ValueError(f"unknown sigmoid {sigmoid!r}; use one of {SIGMOIDS}")


def psychometric(bounds, alpha, beta, guess_rate, lapse_rate, sigmoid="logistic"):
    """``γ + (1 − γ − λ) F(α + β ln b)``; broadcasting over all arguments (b > 0)."""
    b = np.asarray(bounds, float)
    with np.errstate(divide="ignore"):
        z = alpha + beta * np.log(b)
    return guess_rate + (1 - guess_rate - lapse_rate) * sigmoid_cdf(z, sigmoid)


def threshold_of(p, alpha, beta, guess_rate, lapse_rate, sigmoid="logistic"):
    """Bound where ``P(different) = p`` (full scale); NaN outside ``(γ, 1 − λ)``."""
    u = (np.asarray(p, float) - guess_rate) / (1 - guess_rate - lapse_rate)
    ok = (u > 0) & (u < 1)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        z = sigmoid_ppf(np.where(ok, u, 0.5), sigmoid)
        out = np.exp((z - alpha) / beta)
    return np.where(ok & np.isfinite(out), out, np.nan)


def _loglik(x, k, n, alpha, beta, gamma, lam, sigmoid):
    """Binomial log-likelihood (without the constant) per row; x (L,), k/n (B, L)."""
    p = gamma[:, None] + (1 - gamma - lam)[:, None] * sigmoid_cdf(
        alpha[:, None] + beta[:, None] * x[None, :], sigmoid)
    p = np.clip(p, EPS, 1 - EPS)
    return (k * np.log(p) + (n - k) * np.log1p(-p)).sum(1)


def fisher_scoring(x, k, n, gamma, theta0, *, sigmoid="logistic", fit_lapse=True,
                   lapse_rate=None, iterations=60):
    """Vectorised ML fit of many data sets at once.

    ``x`` (L,) log bounds; ``k``, ``n`` (B, L) counts; ``gamma`` (B,); ``theta0`` (B, d) with
    columns ``α, β`` (and ``λ`` when ``fit_lapse``). Fisher scoring with step halving and
    projection onto ``β ≥ 1e-4``, ``0 ≤ λ ≤ 0.5``. Returns ``(theta, loglik)``.
    """
    x = np.asarray(x, float)
    k, n = np.atleast_2d(k).astype(float), np.atleast_2d(n).astype(float)
    gamma = np.broadcast_to(np.asarray(gamma, float), (k.shape[0],)).copy()
    theta = np.array(theta0, float, copy=True)
    b = k.shape[0]
    d = theta.shape[1]
    fixed_lam = np.broadcast_to(
        np.asarray(0.0 if lapse_rate is None else lapse_rate, float), (b,)).copy()

    def unpack(t):
        lam = t[:, 2] if fit_lapse else fixed_lam
        return t[:, 0], t[:, 1], lam

    def project(t):
        t[:, 1] = np.clip(t[:, 1], 1e-4, 1e3)
        if fit_lapse:
            t[:, 2] = np.clip(t[:, 2], 0.0, 0.5)
        return t

    theta = project(theta)
    ll = _loglik(x, k, n, *unpack(theta)[:2], gamma, unpack(theta)[2], sigmoid)
    for _ in range(iterations):
        a, bt, lam = unpack(theta)
        z = a[:, None] + bt[:, None] * x[None, :]
        cdf, pdf = sigmoid_cdf(z, sigmoid), sigmoid_pdf(z, sigmoid)
        scale = (1 - gamma - lam)[:, None]
        p = np.clip(gamma[:, None] + scale * cdf, EPS, 1 - EPS)
        g = [scale * pdf, scale * pdf * x[None, :]]
        if fit_lapse:
            g.append(-cdf)
        g = np.stack(g, axis=-1)  # (B, L, d)
        resid = (k - n * p) / (p * (1 - p))
        score = np.einsum("bl,bld->bd", resid, g)
        info = np.einsum("bl,bld,ble->bde", n / (p * (1 - p)), g, g)
        info += np.eye(d)[None] * 1e-9 * (1 + np.abs(info).max(axis=(1, 2)))[:, None, None]
        try:
            step = np.linalg.solve(info, score[..., None])[..., 0]
        except np.linalg.LinAlgError:
            step = score * 1e-3
        step = np.where(np.isfinite(step), step, 0.0)
        improved = np.zeros(b, bool)
        size = np.ones(b)
        new = theta.copy()
        for _h in range(12):
            cand = project(theta + size[:, None] * step)
            a2, b2, l2 = unpack(cand)
            ll2 = _loglik(x, k, n, a2, b2, gamma, l2, sigmoid)
            ok = (ll2 >= ll - 1e-12) & ~improved
            new[ok] = cand[ok]
            ll = np.where(ok, ll2, ll)
            improved |= ok
            if improved.all():
                break
            size = np.where(improved, size, size / 2)
        if np.max(np.abs(new - theta)) < 1e-9:
            theta = new
            break
        theta = new
    return theta, ll


def _saturated(k, n):
    with np.errstate(divide="ignore", invalid="ignore"):
        t1 = np.where(k > 0, k * np.log(np.where(k > 0, k / n, 1)), 0.0)
        t2 = np.where(n - k > 0, (n - k) * np.log(np.where(n - k > 0, (n - k) / n, 1)), 0.0)
    return (t1 + t2).sum(-1)


@dataclass
class PsychometricFit:
    """A fitted ``P(different | b) = γ + (1 − γ − λ) F(α + β ln b)`` (see module docstring)."""

    alpha: float
    beta: float
    guess_rate: float
    lapse_rate: float
    sigmoid: str = "logistic"
    lapse_fitted: bool = True
    log_likelihood: float = math.nan
    deviance: float = math.nan
    df: int = 0
    p_value: float = math.nan
    bounds: list = field(default_factory=list)
    n_different: list = field(default_factory=list)
    n_total: list = field(default_factory=list)

    def predict(self, bounds) -> np.ndarray:
        """``P(different)`` at the given bounds."""
        return psychometric(bounds, self.alpha, self.beta, self.guess_rate, self.lapse_rate,
                            self.sigmoid)

    def threshold(self, p) -> float | np.ndarray:
        """Bound where ``P(different) = p`` (full scale, guesses included); NaN outside
        ``(γ, 1 − λ)``."""
        out = threshold_of(p, self.alpha, self.beta, self.guess_rate, self.lapse_rate,
                           self.sigmoid)
        return float(out) if np.ndim(out) == 0 else out

    @property
    def goodness_of_fit(self) -> dict:
        return {"deviance": self.deviance, "df": self.df, "p_value": self.p_value}

    @property
    def flags(self) -> list[str]:
        """Warnings about this fit, each naming its deviance, df and goodness-of-fit p:

        - *saturated*: no more bounds than fitted parameters (df ≤ 0) — the curve passes
          through every point, the deviance is 0 by construction and there is no test of fit;
        - *poorly identified*: a parameter sits on its bound (λ = 0.5, β at 1e-4 or 1e3);
        - *poor fit*: goodness-of-fit p < 0.05 (overdispersion between people raises the
          deviance too; the participant bootstrap intervals account for it).
        """
        pv = f"{self.p_value:.3g}" if np.isfinite(self.p_value) else "n/a"
        gof = f"deviance {self.deviance:.3g} on {self.df} df, goodness-of-fit p {pv}"
        n_params = 3 if self.lapse_fitted else 2
        levels = sum(1 for n in self.n_total if n > 0) if self.n_total else n_params + self.df
        out = []
        if self.df <= 0:
            out.append(f"saturated: {levels} bounds for {n_params} fitted parameters ({gof}); "
                       "the fit cannot be checked — judge more bounds or fix the lapse rate "
                       "(--lapse 0.02)")
        if (self.lapse_fitted and self.lapse_rate >= 0.5 - 1e-6) or not (
                1e-4 * 1.0001 < self.beta < 1e3 * 0.9999):
            out.append(f"poorly identified: a parameter is on its bound (β = {self.beta:.3g}, "
                       f"λ = {self.lapse_rate:.3g}; {gof})")
        if self.df > 0 and np.isfinite(self.p_value) and self.p_value < 0.05:
            out.append(f"poor fit: {gof} (people differing from each other also raise it)")
        return out

    def to_dict(self) -> dict:
        return _json_safe({
            "alpha": self.alpha, "beta": self.beta, "guess_rate": self.guess_rate,
            "lapse_rate": self.lapse_rate, "sigmoid": self.sigmoid,
            "lapse_fitted": self.lapse_fitted, "log_likelihood": self.log_likelihood,
            "deviance": self.deviance, "df": self.df, "p_value": self.p_value,
            "bounds": list(map(float, self.bounds)),
            "n_different": list(map(int, self.n_different)),
            "n_total": list(map(int, self.n_total)), "flags": self.flags,
        })

    @classmethod
    def from_dict(cls, data: dict) -> PsychometricFit:
        nan = math.nan
        return cls(
            alpha=float(data["alpha"]), beta=float(data["beta"]),
            guess_rate=float(data["guess_rate"]), lapse_rate=float(data["lapse_rate"]),
            sigmoid=data.get("sigmoid", "logistic"),
            lapse_fitted=bool(data.get("lapse_fitted", True)),
            log_likelihood=_f(data.get("log_likelihood"), nan),
            deviance=_f(data.get("deviance"), nan), df=int(data.get("df", 0)),
            p_value=_f(data.get("p_value"), nan), bounds=list(data.get("bounds", [])),
            n_different=list(data.get("n_different", [])), n_total=list(data.get("n_total", [])),
        )


def _f(v, default):
    return default if v is None else float(v)


def _check_data(bounds, n_different, n_total):
    b = np.asarray(bounds, float).ravel()
    k = np.asarray(n_different, float).ravel()
    n = np.asarray(n_total, float).ravel()
    if not (len(b) == len(k) == len(n)):
        raise ValueError("bounds, n_different and n_total must have the same length")
    if len(b) == 0:
        raise ValueError("no data: bounds is empty")
    if np.any(~np.isfinite(b)) or np.any(b <= 0):
        raise ValueError("bounds must be finite and > 0 (the fit is on log bound)")
    if np.any(n < 0) or np.any(k < 0) or np.any(k > n):
        raise ValueError("counts must satisfy 0 ≤ n_different ≤ n_total")
    keep = n > 0
    if len(np.unique(b[keep])) < 2:
        raise ValueError("a psychometric fit needs judgments at ≥ 2 distinct bounds")
    return b, k, n


def _starts(x, k, n, gamma, lam, sigmoid):
    """Starting values: a grid of slopes with the threshold at the data's 50 % point."""
    mid = np.median(x)
    span = max(np.ptp(x), 1e-3)
    out = []
    for beta in (0.5, 2.0, 6.0, 15.0):
        for shift in (-0.5, 0.0, 0.5, 1.0):
            beta_s = beta * 2.0 / span
            out.append([-beta_s * (mid + shift * span), beta_s, lam])
    return np.array(out)


def fit_psychometric(
    bounds,
    n_different,
    n_total,
    *,
    guess_rate: float,
    lapse: str | float = "fit",
    sigmoid: str = "logistic",
) -> PsychometricFit:
    """Maximum-likelihood fit of ``γ + (1 − γ − λ) F(α + β ln b)`` to binomial counts.

    ``guess_rate`` γ is fixed (the sentinel false-alarm rate); ``lapse`` is ``"fit"`` (λ in
    [0, 0.5]) or a fixed float. ``bounds`` > 0 (the threat model's units); one entry per
    level (repeated bounds are pooled). Multi-start vectorised Fisher scoring, polished with
    scipy's L-BFGS-B.
    """
    if sigmoid not in SIGMOIDS:
        raise ValueError(f"unknown sigmoid {sigmoid!r}; use one of {SIGMOIDS}")
    if not (0 <= guess_rate < 1):
        raise ValueError(f"guess_rate must be in [0, 1), got {guess_rate}")
    fit_lapse = lapse == "fit"
    if not fit_lapse:
        try:
            lapse = float(lapse)
        except (TypeError, ValueError):
            raise ValueError(f"lapse must be 'fit' or a float, got {lapse!r}") from None
        if not (0 <= lapse < 1 - guess_rate):
            raise ValueError(f"lapse must be in [0, 1 − guess_rate), got {lapse}")
    b, k, n = _check_data(bounds, n_different, n_total)
    levels, inv = np.unique(b, return_inverse=True)
    k = np.bincount(inv, weights=k)
    n = np.bincount(inv, weights=n)
    x = np.log(levels)
    lam0 = 0.02 if fit_lapse else lapse
    starts = _starts(x, k, n, guess_rate, lam0, sigmoid)
    if not fit_lapse:
        starts = starts[:, :2]
    m = len(starts)
    theta, ll = fisher_scoring(x, np.tile(k, (m, 1)), np.tile(n, (m, 1)),
                               np.full(m, guess_rate), starts, sigmoid=sigmoid,
                               fit_lapse=fit_lapse, lapse_rate=None if fit_lapse else lapse)
    best = theta[np.nanargmax(ll)]

    def nll(t):
        lam_t = t[2] if fit_lapse else lapse
        return -_loglik(x, k[None], n[None], np.array([t[0]]), np.array([t[1]]),
                        np.array([guess_rate]), np.array([lam_t]), sigmoid)[0]

    box = [(None, None), (1e-4, 1e3)] + ([(0.0, 0.5)] if fit_lapse else [])
    res = optimize.minimize(nll, best, method="L-BFGS-B", bounds=box)
    if res.fun <= nll(best):
        best = res.x
    alpha, beta = float(best[0]), float(best[1])
    lam = float(best[2]) if fit_lapse else float(lapse)
    loglik = -nll(best)
    deviance = float(2 * (_saturated(k, n) - loglik))
    n_params = 3 if fit_lapse else 2
    levels_used = int((n > 0).sum())
    df = levels_used - n_params
    p_value = float(stats.chi2.sf(max(deviance, 0.0), df)) if df > 0 else math.nan
    return PsychometricFit(
        alpha=alpha, beta=beta, guess_rate=float(guess_rate), lapse_rate=lam, sigmoid=sigmoid,
        lapse_fitted=fit_lapse, log_likelihood=float(loglik), deviance=max(deviance, 0.0),
        df=df, p_value=p_value, bounds=levels.tolist(), n_different=k.astype(int).tolist(),
        n_total=n.astype(int).tolist(),
    )


# ------------------------------------------------------------------------------- calibrate
def target_label(target: float) -> str:
    """``0.1 → "p10"``, ``0.25 → "p25"``, ``0.5 → "p50"`` (``0.125 → "p12.5"``)."""
    pct = target * 100
    return f"p{round(pct):02d}" if abs(pct - round(pct)) < 1e-9 else f"p{pct:g}"


@dataclass
class ThreatModelCalibration:
    """One threat model's fit, its thresholds with intervals, and the counts behind them."""

    threat_model: str
    fit: PsychometricFit
    thresholds: pd.DataFrame  # target, label, bound, low, high, n_boot_valid
    counts: pd.DataFrame  # bound, n_judgments, n_different, perceptibility
    n_participants: int
    n_judgments: int

    def to_dict(self) -> dict:
        from engine.analysis import frame_records

        return {
            "threat_model": self.threat_model, "fit": self.fit.to_dict(),
            "thresholds": frame_records(self.thresholds), "counts": frame_records(self.counts),
            "n_participants": self.n_participants, "n_judgments": self.n_judgments,
        }


@dataclass
class CalibrationResult:
    """Per-threat-model calibrations plus the shared sentinel guess rate and settings.

    ``to_dict()`` keys: ``targets, sigmoid, lapse, n_boot, seed, guess_rate, n_sentinel,
    n_sentinel_different, guess_method, sentinel_limit, threat_models`` (threat model →
    ``{threat_model, fit, thresholds, counts, n_participants, n_judgments}``) and ``skipped``
    (threat model → reason).
    """

    threat_models: dict[str, ThreatModelCalibration]
    targets: tuple
    sigmoid: str
    lapse: Any
    n_boot: int
    seed: int
    guess_rate: float
    n_sentinel: int
    n_sentinel_different: int
    skipped: dict = field(default_factory=dict)
    guess_method: str = "sentinels"  # "sentinels" (pooled rate), "joint", "given"
    sentinel_limit: float | None = None

    def flags(self) -> dict[str, list[str]]:
        """``{threat_model: [warning, ...]}`` for fits that are saturated, poorly identified
        or fit badly (:attr:`PsychometricFit.flags`), and thresholds that fewer than 90 % of
        the bootstrap replicates define (their interval is too narrow). Only threat models with
        a warning appear."""
        out = {}
        for tm, cal in self.threat_models.items():
            f = list(cal.fit.flags)
            if self.n_boot:
                for _, r in cal.thresholds.iterrows():
                    if r["n_boot_valid"] < 0.9 * self.n_boot:
                        f.append(f"poorly identified: {r['label']} defined in only "
                                 f"{int(r['n_boot_valid'])}/{self.n_boot} bootstrap replicates "
                                 "(its interval is too narrow)")
            if f:
                out[tm] = f
        return out

    def presets(self) -> dict[str, dict[str, float]]:
        """``{threat_model: {"p10": bound, "p25": bound, "p50": bound}}`` (finite only)."""
        out = {}
        for tm, cal in self.threat_models.items():
            out[tm] = {r["label"]: float(r["bound"]) for _, r in cal.thresholds.iterrows()
                       if np.isfinite(r["bound"])}
        return out

    def table(self) -> pd.DataFrame:
        """Long table: ``threat_model, target, label, bound, low, high, n_boot_valid, alpha,
        beta, guess_rate, lapse_rate, deviance, df, p_value, n_judgments, n_participants,
        fit_flag`` (``fit_flag``: the threat model's :meth:`flags` joined by "; ", or "")."""
        rows = []
        flags = self.flags()
        for tm, cal in self.threat_models.items():
            for _, r in cal.thresholds.iterrows():
                rows.append({"threat_model": tm, **r.to_dict(), "alpha": cal.fit.alpha,
                             "beta": cal.fit.beta, "guess_rate": cal.fit.guess_rate,
                             "lapse_rate": cal.fit.lapse_rate, "deviance": cal.fit.deviance,
                             "df": cal.fit.df, "p_value": cal.fit.p_value,
                             "n_judgments": cal.n_judgments,
                             "n_participants": cal.n_participants,
                             "fit_flag": "; ".join(flags.get(tm, []))})
        return pd.DataFrame(rows)

    def to_dict(self) -> dict:
        return _json_safe({
            "targets": list(self.targets), "sigmoid": self.sigmoid, "lapse": self.lapse,
            "n_boot": self.n_boot, "seed": self.seed, "guess_rate": self.guess_rate,
            "n_sentinel": self.n_sentinel, "n_sentinel_different": self.n_sentinel_different,
            "guess_method": self.guess_method, "sentinel_limit": self.sentinel_limit,
            "flags": self.flags(),
            "threat_models": {tm: c.to_dict() for tm, c in self.threat_models.items()},
            "skipped": dict(self.skipped),
        })

    @classmethod
    def from_dict(cls, data: dict) -> CalibrationResult:
        tms = {}
        for tm, c in data["threat_models"].items():
            tms[tm] = ThreatModelCalibration(
                threat_model=tm, fit=PsychometricFit.from_dict(c["fit"]),
                thresholds=pd.DataFrame(c["thresholds"]).astype(
                    {"bound": float, "low": float, "high": float}),
                counts=pd.DataFrame(c["counts"]), n_participants=int(c["n_participants"]),
                n_judgments=int(c["n_judgments"]))
        return cls(threat_models=tms, targets=tuple(data["targets"]), sigmoid=data["sigmoid"],
                   lapse=data["lapse"], n_boot=int(data["n_boot"]), seed=int(data["seed"]),
                   guess_rate=_f(data.get("guess_rate"), math.nan),
                   n_sentinel=int(data["n_sentinel"]),
                   n_sentinel_different=int(data["n_sentinel_different"]),
                   skipped=dict(data.get("skipped", {})),
                   guess_method=data.get("guess_method", "sentinels"),
                   sentinel_limit=data.get("sentinel_limit"))


def calibrate(
    pairs: pd.DataFrame,
    judgments: pd.DataFrame,
    *,
    targets=(0.1, 0.25, 0.5),
    n_boot: int = 500,
    seed: int = 0,
    sigmoid: str = "logistic",
    lapse: str | float = "fit",
    guess_rate: float | None = None,
    sentinel_limit: float | None = None,
    guess_prior: tuple[float, float] = (1.0, 1.0),
) -> CalibrationResult:
    """Fit every threat model's psychometric function of the bound and invert it at the target
    perceptibilities; participant-bootstrap 95 % intervals for the thresholds.

    ``γ`` is the sentinel false-alarm rate (pooled over the study; pass ``guess_rate`` to
    override, e.g. when there are no sentinels). Judgments are used as given (apply
    :func:`engine.analysis.apply_exclusions` first).

    **Exclusions by sentinel false alarms bias that rate** (sessions are kept *because* their
    sentinels said "same": with 2 sentinels a session and a limit of 0.25, every kept sentinel
    is a "same" and γ̂ = 0). Pass the limit the sessions were screened with as
    ``sentinel_limit`` (a session was excluded when its false-alarm rate exceeded it) and γ is
    estimated jointly instead (:func:`joint_guess_rate`): each kept session's sentinels enter
    by their likelihood *given that the session passed* (binomial truncated at
    ``⌊limit·n⌋``), every threat model's main judgments by their profile likelihood (γ is their
    lower asymptote), times a ``Beta(guess_prior)`` prior; the maximum is γ̂, and each
    bootstrap replicate repeats the whole estimate. Threat models with judgments at fewer
    than 2 bounds are listed in ``skipped``; with only 2 bounds λ is fixed at 0 (not
    identifiable).

    Each threat model's ``thresholds`` frame has ``target, label, bound, low, high,
    n_boot_valid``: replicates whose threshold is undefined (the target outside
    ``(γ_b, 1 − λ_b)``) are left out of the percentiles and counted by ``n_boot_valid``, so a
    small ``n_boot_valid`` flags an interval that is narrower than the truth.
    """
    targets = tuple(float(t) for t in targets)
    if not targets or any(not (0 < t < 1) for t in targets):
        raise ValueError(f"targets must be perceptibilities in (0, 1), got {targets}")
    if sigmoid not in SIGMOIDS:
        raise ValueError(f"unknown sigmoid {sigmoid!r}; use one of {SIGMOIDS}")
    prep = _prepare(pairs, judgments)
    p_count = prep.n_participants
    pr = prep.pairs
    main = ~pr["group"].isin(CONTROLS).to_numpy()
    bad = main & ~(pr["bound"].to_numpy(float) > 0)
    if bad.any():
        raise ValueError(f"pairs {pr.loc[bad, 'pair'].head(5).tolist()} need a bound > 0")
    # cells: (threat_model, bound) per main pair; column −1 for controls
    cell_keys = pr.loc[main, ["threat_model", "bound"]].drop_duplicates().sort_values(
        ["threat_model", "bound"]).reset_index(drop=True)
    cell_index = {(t, b): i for i, (t, b) in enumerate(
        zip(cell_keys["threat_model"], cell_keys["bound"], strict=True))}
    pcell = np.full(len(pr), -1)
    pcell[main] = [cell_index[(t, b)] for t, b in zip(
        pr.loc[main, "threat_model"], pr.loc[main, "bound"], strict=True)]
    sentinel_col = len(cell_keys)
    pcell[prep.is_sentinel] = sentinel_col
    width = len(cell_keys) + 1
    jcell = pcell[prep.j_pair]
    ok = jcell >= 0
    flat = prep.j_part[ok] * width + jcell[ok]
    n_pc = np.bincount(flat, minlength=p_count * width).reshape(p_count, width).astype(float)
    k_pc = np.bincount(flat, weights=prep.j_diff[ok], minlength=p_count * width).reshape(
        p_count, width)
    k_tot, n_tot = k_pc.sum(0), n_pc.sum(0)
    n_s, k_s = n_tot[sentinel_col], k_tot[sentinel_col]
    # per threat model: its cell columns, bounds, and whether λ is fitted
    plan = {}
    skipped = {}
    fit_lapse = lapse == "fit"
    for tm in cell_keys["threat_model"].unique():
        cols = cell_keys.index[cell_keys["threat_model"] == tm].to_numpy()
        bounds = cell_keys.loc[cols, "bound"].to_numpy(float)
        if (n_tot[cols] > 0).sum() < 2:
            skipped[str(tm)] = "judgments at fewer than 2 bounds"
            continue
        use_lapse = lapse
        if fit_lapse and (n_tot[cols] > 0).sum() < 3:
            use_lapse = 0.0  # λ is not identifiable from two levels
        plan[str(tm)] = (cols, bounds, use_lapse)
    joint = None
    if guess_rate is None and sentinel_limit is not None:
        if n_s == 0:
            raise ValueError("no sentinel judgments: pass guess_rate to calibrate")
        sent_terms = _session_sentinel_terms(judgments, prep, sentinel_col, pcell,
                                             float(sentinel_limit), p_count)
        joint = (sent_terms, plan)
    mats = [k_pc, n_pc] + ([joint[0][1]] if joint else [])
    boot = bootstrap_products(p_count, n_boot, seed, *mats)
    kb, nb = boot[0], boot[1]
    if joint is not None:
        grid, terms_p = joint[0][0], joint[0][1]
        gamma, gamma_b = joint_guess_rate(
            grid, terms_p.sum(0), boot[2], k_tot, n_tot, kb, nb, plan, sigmoid, guess_prior)
    elif guess_rate is None:
        if n_s == 0:
            raise ValueError("no sentinel judgments: pass guess_rate to calibrate")
        gamma = k_s / n_s
        with np.errstate(invalid="ignore", divide="ignore"):
            gamma_b = np.where(nb[:, sentinel_col] > 0, kb[:, sentinel_col] / nb[:, sentinel_col],
                               gamma)
    else:
        gamma = float(guess_rate)
        gamma_b = np.full(n_boot, gamma)
    gamma_b = np.minimum(gamma_b, 0.99)
    result = {}
    for tm, (cols, bounds, use_lapse) in plan.items():
        fit = fit_psychometric(bounds, k_tot[cols], n_tot[cols], guess_rate=gamma,
                               lapse=use_lapse, sigmoid=sigmoid)
        keep = n_tot[cols] > 0
        x = np.log(bounds[keep])
        fl = use_lapse == "fit"
        theta0 = np.tile([fit.alpha, fit.beta] + ([fit.lapse_rate] if fl else []), (n_boot, 1))
        if n_boot:
            theta, _ = fisher_scoring(x, kb[:, cols][:, keep], nb[:, cols][:, keep], gamma_b,
                                      theta0, sigmoid=sigmoid, fit_lapse=fl,
                                      lapse_rate=None if fl else float(use_lapse))
            lam_b = theta[:, 2] if fl else np.full(n_boot, float(use_lapse))
        rows = []
        for t in targets:
            if n_boot:
                tb = threshold_of(t, theta[:, 0], theta[:, 1], gamma_b, lam_b, sigmoid)
                valid = np.isfinite(tb)
                low, high = (np.percentile(tb[valid], [2.5, 97.5]) if valid.sum() else
                             (math.nan, math.nan))
            else:
                valid, low, high = np.zeros(0, bool), math.nan, math.nan
            rows.append({"target": t, "label": target_label(t), "bound": fit.threshold(t),
                         "low": float(low), "high": float(high),
                         "n_boot_valid": int(valid.sum())})
        with np.errstate(invalid="ignore", divide="ignore"):
            counts = pd.DataFrame({"bound": bounds, "n_judgments": n_tot[cols].astype(int),
                                   "n_different": k_tot[cols].astype(int),
                                   "perceptibility": k_tot[cols] / n_tot[cols]})
        result[str(tm)] = ThreatModelCalibration(
            threat_model=str(tm), fit=fit, thresholds=pd.DataFrame(rows), counts=counts,
            n_participants=int((n_pc[:, cols].sum(1) > 0).sum()),
            n_judgments=int(n_tot[cols].sum()))
    return CalibrationResult(
        threat_models=result, targets=targets, sigmoid=sigmoid, lapse=lapse, n_boot=n_boot,
        seed=seed, guess_rate=float(gamma), n_sentinel=int(n_s),
        n_sentinel_different=int(k_s), skipped=skipped,
        guess_method=("joint" if joint is not None else "sentinels" if guess_rate is None
                      else "given"), sentinel_limit=sentinel_limit)


# ------------------------------------------------------------------- γ without QC selection
#: γ grid of the joint estimate (refined by a parabola through the best three points).
GUESS_GRID = np.r_[np.linspace(0.002, 0.1, 15), np.linspace(0.12, 0.44, 9)]


def _session_sentinel_terms(judgments, prep, sentinel_col, pcell, limit, p_count):
    """Per participant, ``Σ_sessions [k ln γ + (n − k) ln(1 − γ) − ln P(K ≤ c | n, γ)]`` on
    :data:`GUESS_GRID`: each kept session's sentinel answers given that it passed the
    screen ``k/n ≤ limit`` (``c = ⌊limit·n⌋``; a kept session above the limit was not
    screened by it and enters untruncated). Returns ``(grid, terms (P, G))``."""
    if not 0 <= limit <= 1:
        raise ValueError(f"sentinel_limit must be a false-alarm rate in [0, 1], got {limit}")
    is_s = pcell[prep.j_pair] == sentinel_col
    if "session" in judgments:
        sess = pd.factorize(pd.MultiIndex.from_arrays(
            [prep.j_part, judgments["session"].to_numpy()]))[0]
    else:
        sess = prep.j_part
    sess_s, part_s, diff_s = sess[is_s], prep.j_part[is_s], prep.j_diff[is_s]
    m = int(sess_s.max()) + 1 if len(sess_s) else 0
    n = np.bincount(sess_s, minlength=m).astype(float)
    k = np.bincount(sess_s, weights=diff_s, minlength=m)
    owner = np.zeros(m, int)
    owner[sess_s] = part_s
    c = np.floor(limit * n + 1e-9)
    c = np.where(k > c, n, c)
    g = GUESS_GRID[None]
    term = (k[:, None] * np.log(g) + (n - k)[:, None] * np.log1p(-g)
            - stats.binom.logcdf(c[:, None], n[:, None], g))
    term = np.where(n[:, None] > 0, term, 0.0)
    out = np.zeros((p_count, len(GUESS_GRID)))
    np.add.at(out, owner, term)
    return GUESS_GRID, out


def _peak(grid, total):
    """Argmax on the grid refined by the parabola through it and its neighbours; (R, G)."""
    i = np.clip(np.nanargmax(total, axis=1), 1, len(grid) - 2)
    r = np.arange(len(total))
    y0, y1, y2 = total[r, i - 1], total[r, i], total[r, i + 1]
    x0, x1, x2 = grid[i - 1], grid[i], grid[i + 1]
    den = (x0 - x1) * (x0 - x2) * (x1 - x2)
    a = (x2 * (y1 - y0) + x1 * (y0 - y2) + x0 * (y2 - y1))
    b = (x2 * x2 * (y0 - y1) + x1 * x1 * (y2 - y0) + x0 * x0 * (y1 - y2))
    with np.errstate(invalid="ignore", divide="ignore"):
        x = np.where(a / den < 0, -b / (2 * a), x1)  # vertex of a concave parabola
    x = np.where(np.isfinite(x), np.clip(x, x0, x2), x1)
    best = np.nanargmax(total, axis=1)
    edge = (best == 0) | (best == len(grid) - 1)
    return np.where(edge, grid[best], x)


def _profile(x, k, n, grid, theta0, sigmoid, use_lapse):
    """Max log-likelihood over (α, β[, λ]) at every γ of ``grid`` for every row of ``k, n``
    (R, L): returns (R, G). Vectorised Fisher scoring from ``theta0`` (R, d)."""
    r, g = k.shape[0], len(grid)
    fl = use_lapse == "fit"
    kk = np.repeat(k, g, axis=0)
    nn = np.repeat(n, g, axis=0)
    gam = np.tile(grid, r)
    t0 = np.repeat(theta0, g, axis=0)
    _, ll = fisher_scoring(x, kk, nn, gam, t0, sigmoid=sigmoid, fit_lapse=fl,
                           lapse_rate=None if fl else float(use_lapse), iterations=15)
    return ll.reshape(r, g)


def joint_guess_rate(grid, sent_point, sent_boot, k_tot, n_tot, kb, nb, plan, sigmoid,
                     prior=(1.0, 1.0)):
    """γ̂ maximising ``sentinel term(γ) + Σ_threat models profile loglik(γ) + ln Beta(γ;
    prior)`` on ``grid`` (parabolic refinement), for the data and for every bootstrap
    replicate (rows of ``kb, nb`` and ``sent_boot``). Returns ``(γ̂, γ̂_b)``."""
    a, b = prior
    if not (a > 0 and b > 0):
        raise ValueError(f"guess_prior must be two positive Beta parameters, got {prior}")
    log_prior = (a - 1) * np.log(grid) + (b - 1) * np.log1p(-grid)
    total = sent_point[None] + log_prior[None]
    total_b = sent_boot + log_prior[None]
    for cols, bounds, use_lapse in plan.values():
        keep = n_tot[cols] > 0
        x = np.log(bounds[keep])
        kp, np_ = k_tot[cols][keep], n_tot[cols][keep]
        # a start per γ: the multi-start fit at the pooled sentinel-free midpoint
        fit = fit_psychometric(bounds[keep], kp, np_, guess_rate=0.02, lapse=use_lapse,
                               sigmoid=sigmoid)
        t0 = np.array([[fit.alpha, fit.beta] + ([fit.lapse_rate] if use_lapse == "fit" else [])])
        total = total + _profile(x, kp[None], np_[None], grid, t0, sigmoid, use_lapse)
        if len(kb):
            tb = np.repeat(t0, len(kb), axis=0)
            total_b = total_b + _profile(x, kb[:, cols][:, keep], nb[:, cols][:, keep], grid,
                                         tb, sigmoid, use_lapse)
    gamma = float(_peak(grid, total)[0])
    gamma_b = _peak(grid, total_b) if len(kb) else np.zeros(0)
    return gamma, gamma_b
