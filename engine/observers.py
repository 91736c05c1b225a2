"""Simulated observers for demos, tests, the adaptive benchmark and power analysis.

An observer answers "different" with probability::

    P = γ + (1 − γ − λ) · F(β · (ln s − ln t) + bias)

(``β`` times the observer's own ``slope_factor``, log-normal around 1 with ``slope_sd``
in a population) where ``s`` is the stimulus value (a stored distance such as
``lpips_alexnet``, or the bound, per threat model), ``t`` the threshold (the ``s`` where
``F = 0.5`` for the logistic, ``F = 1 − 1/e`` for the Weibull), ``β`` the slope on log
stimulus, ``γ`` the false-alarm rate on identical images (``s = 0`` gives ``P = γ``),
``λ`` the lapse rate and ``bias`` a criterion shift in ``F``'s argument (positive = says
"different" more readily). A *careless* observer answers at random (P = ½) whatever the
stimulus. Same ``F`` as :mod:`engine.calibration`.

Randomness only through a caller-supplied seeded ``numpy.random.Generator``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from engine.calibration import SIGMOIDS, sigmoid_cdf


def _check_values(values) -> np.ndarray:
    s = np.asarray(values, float)
    if np.any(s < 0) or np.any(np.isnan(s)):
        raise ValueError("stimulus values must be ≥ 0 (a distance or a bound) and not NaN")
    return s


@dataclass
class SimulatedObserver:
    """One simulated participant (see module docstring for the formula)."""

    threshold: float
    slope: float
    guess_rate: float = 0.0
    lapse_rate: float = 0.0
    bias: float = 0.0
    careless: bool = False
    sigmoid: str = "logistic"

    def __post_init__(self):
        if not self.threshold > 0 or not self.slope > 0:
            raise ValueError("threshold and slope must be > 0")
        if self.sigmoid not in SIGMOIDS:
            raise ValueError(f"unknown sigmoid {self.sigmoid!r}; use one of {SIGMOIDS}")
        if not (0 <= self.guess_rate < 1 and 0 <= self.lapse_rate < 1 - self.guess_rate):
            raise ValueError("need 0 ≤ guess_rate < 1 and 0 ≤ lapse_rate < 1 − guess_rate")

    def p_different(self, stimulus_values) -> np.ndarray:
        s = _check_values(stimulus_values)
        if self.careless:
            return np.full(s.shape, 0.5)
        with np.errstate(divide="ignore"):
            z = self.slope * (np.log(s) - math.log(self.threshold)) + self.bias
        return self.guess_rate + (1 - self.guess_rate - self.lapse_rate) * sigmoid_cdf(
            z, self.sigmoid)

    def respond(self, stimulus_values, rng: np.random.Generator) -> np.ndarray:
        """One bool answer ("different") per stimulus value."""
        p = self.p_different(stimulus_values)
        return rng.random(p.shape) < p


@dataclass
class ObserverPopulation:
    """A population of observers per threat model.

    ``functions``: ``{threat_model: (threshold, slope)}`` of the typical observer (use the key
    ``"*"`` for a distance-based population that is the same for every threat model). Each
    sampled observer gets ``bias ~ N(0, bias_sd)``, a slope factor ``exp(N(0, slope_sd))``
    (:meth:`sample_slopes`) and is careless with probability ``careless_share``.
    ``stimulus`` names what the function is of: ``"bound"`` or a
    distance column of ``pairs``.
    """

    functions: dict
    guess_rate: float = 0.04
    lapse_rate: float = 0.02
    bias_sd: float = 0.0
    careless_share: float = 0.0
    sigmoid: str = "logistic"
    stimulus: str = "bound"
    slope_sd: float = 0.0
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        if not self.functions:
            raise ValueError("functions must map threat model → (threshold, slope)")
        if not (0 <= self.careless_share <= 1) or self.bias_sd < 0 or self.slope_sd < 0:
            raise ValueError("need 0 ≤ careless_share ≤ 1, bias_sd ≥ 0 and slope_sd ≥ 0")

    def function(self, threat_model) -> tuple[float, float]:
        if threat_model in self.functions:
            return self.functions[threat_model]
        if "*" in self.functions:
            return self.functions["*"]
        raise ValueError(f"no psychometric function for threat model {threat_model!r}")

    def observer(self, threat_model, rng: np.random.Generator) -> SimulatedObserver:
        t, b = self.function(threat_model)
        return SimulatedObserver(
            threshold=t, slope=b, guess_rate=self.guess_rate, lapse_rate=self.lapse_rate,
            bias=float(rng.normal(0, self.bias_sd)) if self.bias_sd else 0.0,
            careless=bool(rng.random() < self.careless_share), sigmoid=self.sigmoid)

    def sample_traits(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """``(bias, careless)`` arrays for ``n`` participants."""
        bias = rng.normal(0, self.bias_sd, n) if self.bias_sd else np.zeros(n)
        careless = rng.random(n) < self.careless_share
        return bias, careless

    def sample_slopes(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """Slope factors ``exp(N(0, slope_sd))`` for ``n`` participants (ones if no spread;
        draws nothing then, so older seeded runs are unchanged)."""
        return np.exp(rng.normal(0, self.slope_sd, n)) if self.slope_sd else np.ones(n)

    def p_different(self, stimulus_values, threat_model, bias=0.0, careless=False,
                    slope_factor=1.0):
        """P(different) of observers with the given traits (broadcast over arrays)."""
        s = _check_values(stimulus_values)
        t, b = self.function(threat_model)
        with np.errstate(divide="ignore"):
            z = b * slope_factor * (np.log(s) - math.log(t)) + bias
        p = self.guess_rate + (1 - self.guess_rate - self.lapse_rate) * sigmoid_cdf(
            z, self.sigmoid)
        return np.where(careless, 0.5, p)

    def mean_p_different(self, stimulus_values, threat_model) -> np.ndarray:
        """Population-average P(different): bias and slope spread integrated by
        Gauss–Hermite quadrature, careless share mixed in. This is the truth calibration
        should recover."""
        s = np.atleast_1d(_check_values(stimulus_values))
        nodes, weights = np.polynomial.hermite_e.hermegauss(41)
        weights = weights / weights.sum()
        if self.bias_sd or self.slope_sd:
            bias = (self.bias_sd * nodes)[:, None] if self.bias_sd else np.zeros((1, 1))
            wb = weights[:, None] if self.bias_sd else np.ones((1, 1))
            slope = np.exp(self.slope_sd * nodes)[None] if self.slope_sd else np.ones((1, 1))
            ws = weights[None] if self.slope_sd else np.ones((1, 1))
            p = (self.p_different(s[:, None, None], threat_model, bias=bias[None],
                                  slope_factor=slope[None]) * (wb * ws)[None]).sum((1, 2))
        else:
            p = self.p_different(s, threat_model)
        return (1 - self.careless_share) * p + self.careless_share * 0.5

    def true_threshold(self, p: float, threat_model) -> float:
        """Stimulus value where the population-average ``P(different) = p`` (bisection)."""
        from scipy.optimize import brentq

        t, _ = self.function(threat_model)
        lo, hi = math.log(t) - 30, math.log(t) + 30
        f = lambda x: float(self.mean_p_different(math.exp(x), threat_model)[0]) - p  # noqa: E731
        if f(lo) > 0 or f(hi) < 0:
            return math.nan
        return math.exp(brentq(f, lo, hi, xtol=1e-12))

    def respond(self, stimulus_values, rng: np.random.Generator, *, threat_model=None,
                bias=None, careless=None) -> np.ndarray:
        """Answers of fresh observers (one per value) or of the given traits."""
        s = _check_values(stimulus_values)
        if bias is None or careless is None:
            b, c = self.sample_traits(s.size, rng)
            bias = b.reshape(s.shape) if bias is None else bias
            careless = c.reshape(s.shape) if careless is None else careless
        tm = threat_model if threat_model is not None else next(iter(self.functions))
        p = self.p_different(s, tm, bias=bias, careless=careless)
        return rng.random(p.shape) < p

    def simulate(self, pairs: pd.DataFrame, *, n_participants: int, trials_per_participant: int,
                 rng: np.random.Generator, pair_probabilities=None) -> pd.DataFrame:
        """Judgments by ``n_participants`` sampled observers on randomly drawn ``pairs``.

        Returns the ``judgments`` frame of :mod:`engine.analysis` (``pair, different,
        participant, session, excluded=False, simulated=True``). Sentinels get stimulus 0
        (answers at the false-alarm rate); catch pairs are answered "different" at
        ``1 − λ``. ``pair_probabilities`` weights the draw of pairs (default uniform).
        """
        if n_participants <= 0 or trials_per_participant <= 0:
            raise ValueError("n_participants and trials_per_participant must be > 0")
        if pairs.empty:
            raise ValueError("pairs is empty")
        n = n_participants * trials_per_participant
        idx = rng.choice(len(pairs), size=n, p=pair_probabilities)
        part = np.repeat(np.arange(n_participants), trials_per_participant)
        bias, careless = self.sample_traits(n_participants, rng)
        sentinel = pairs["is_sentinel"].fillna(False).astype(bool).to_numpy()[idx]
        catch = (pairs["is_catch"].fillna(False).astype(bool).to_numpy()[idx]
                 if "is_catch" in pairs else np.zeros(n, bool))
        if self.stimulus not in pairs:
            raise ValueError(f"pairs has no column {self.stimulus!r} to respond to")
        values = pd.to_numeric(pairs[self.stimulus], errors="coerce").to_numpy(float)[idx]
        values = np.where(sentinel | catch | np.isnan(values), 0.0, values)
        tms = pairs["threat_model"].to_numpy()[idx]
        p = np.empty(n)
        main = ~(sentinel | catch)
        for tm in pd.unique(tms[main]):
            sel = main & (tms == tm)
            p[sel] = self.p_different(values[sel], tm, bias=bias[part[sel]],
                                      careless=careless[part[sel]])
        p[sentinel] = np.where(careless[part[sentinel]], 0.5, self.guess_rate)
        p[catch] = np.where(careless[part[catch]], 0.5, 1 - self.lapse_rate)
        return pd.DataFrame({
            "pair": pairs["pair"].to_numpy()[idx], "different": rng.random(n) < p,
            "participant": part, "session": part, "excluded": False, "simulated": True,
        })


def power(
    population: ObserverPopulation,
    threat_model,
    bounds,
    *,
    target_width: float,
    p: float = 0.5,
    n_grid=(300, 600, 1200, 2400, 4800, 9600),
    repetitions: int = 20,
    trials_per_participant: int = 30,
    sentinel_share: float = 0.1,
    n_boot: int = 200,
    seed: int = 0,
    sigmoid: str | None = None,
    lapse: str | float = "fit",
) -> pd.DataFrame:
    """How many judgments a fixed design on ``bounds`` needs for a ``p``-threshold interval of
    at most ``target_width`` (in natural-log bound units: ``ln(high) − ln(low)``).

    For each total ``N`` in ``n_grid`` (judgments on the adversarial pairs, spread evenly over
    ``bounds``, plus ``sentinel_share`` extra sentinel trials) the study is simulated
    ``repetitions`` times and calibrated; columns ``n_judgments, median_width, mean_width,
    share_reaching_target, reaches_target`` (median width ≤ target).
    """
    from engine.calibration import calibrate

    bounds = np.asarray(bounds, float)
    if target_width <= 0 or len(bounds) < 2 or np.any(bounds <= 0):
        raise ValueError("need target_width > 0 and ≥ 2 bounds > 0")
    rng = np.random.default_rng(seed)
    pairs = pd.DataFrame({
        "pair": np.arange(len(bounds) + 1), "condition": [f"{threat_model}:{b}" for b in bounds]
        + [None], "threat_model": [threat_model] * len(bounds) + [None],
        "bound": list(bounds) + [None], "is_sentinel": [False] * len(bounds) + [True]})
    rows = []
    for n_total in n_grid:
        widths = []
        n_main = int(n_total)
        n_all = int(round(n_main * (1 + sentinel_share)))
        probs = np.r_[np.full(len(bounds), 1.0 / len(bounds)) * n_main, n_all - n_main] / n_all
        n_part = max(2, n_all // trials_per_participant)
        for _ in range(repetitions):
            j = population.simulate(pairs, n_participants=n_part,
                                    trials_per_participant=trials_per_participant, rng=rng,
                                    pair_probabilities=probs)
            cal = calibrate(pairs, j, targets=(p,), n_boot=n_boot,
                            seed=int(rng.integers(2**31)), lapse=lapse,
                            sigmoid=sigmoid or population.sigmoid)
            th = cal.threat_models.get(str(threat_model))
            if th is None:
                widths.append(math.inf)
                continue
            r = th.thresholds.iloc[0]
            widths.append(math.log(r["high"] / r["low"]) if r["low"] > 0 else math.inf)
        widths = np.array(widths)
        widths = np.where(np.isfinite(widths), widths, np.inf)
        rows.append({"n_judgments": n_main, "median_width": float(np.median(widths)),
                     "mean_width": float(np.mean(widths)),
                     "share_reaching_target": float(np.mean(widths <= target_width))})
    out = pd.DataFrame(rows)
    out["reaches_target"] = out["median_width"] <= target_width
    return out
