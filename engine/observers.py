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


# ======================================================================= issue 18 protocols
# Observer models for the 2AFC, rating and label protocols. Each answers in the row formats
# of engine.protocol_analysis; randomness only through the caller's numpy Generator.
#
# Participants in a simulation each get ``trials_per_participant`` *distinct* items (as the
# scheduler never repeats an item in a session), drawn at random.

_QUAD_NODES, _QUAD_WEIGHTS = np.polynomial.hermite_e.hermegauss(41)
_QUAD_WEIGHTS = _QUAD_WEIGHTS / _QUAD_WEIGHTS.sum()


def _assign(n_items: int, n_participants: int, trials: int, rng: np.random.Generator):
    """``(participant, item index)`` per trial: each participant ``trials`` distinct items."""
    if n_participants <= 0 or trials <= 0:
        raise ValueError("n_participants and trials_per_participant must be > 0")
    if n_items == 0:
        raise ValueError("items is empty")
    if trials > n_items:
        raise ValueError(f"trials_per_participant ({trials}) exceeds the {n_items} items "
                         "(a participant sees an item once)")
    idx = np.argsort(rng.random((n_participants, n_items)), axis=1)[:, :trials]
    return np.repeat(np.arange(n_participants), trials), idx.ravel()


def _participant_ids(n: int) -> np.ndarray:
    return np.array([f"sim-{i:04d}" for i in range(n)], dtype=object)


def _distance_of(items: pd.DataFrame, column: str) -> np.ndarray:
    from engine.analysis import SIMILARITY_COLUMNS

    if column not in items:
        raise ValueError(f"items have no column {column!r} to respond to")
    v = pd.to_numeric(items[column], errors="coerce").to_numpy(float)
    name = column[2:] if column[:2] in ("a_", "b_", "d_") else column
    v = 1.0 - v if name in SIMILARITY_COLUMNS else v
    if np.isnan(v).any():
        raise ValueError(f"items have missing {column!r} values")
    return v


def _sim_columns(n: int, part: np.ndarray) -> dict:
    return {"session": part, "excluded": np.zeros(n, bool), "simulated": np.ones(n, bool)}


@dataclass
class TwoAFCObserver:
    """Thurstonian 2AFC observer (Thurstone 1927, case V): the perceived difference of each
    side from the reference is its distance plus Gaussian noise, and the observer picks the
    side that looks closer::

        P(choose B) = λ/2 + (1 − λ) · Φ((d_a − d_b) / σ + bias)

    ``σ`` (distance units, > 0) the noise of the difference — the probit slope on
    ``d_a − d_b`` is ``1/σ``; ``λ`` lapses answered at random; ``bias`` (z units) a
    preference for B. Careless: P = ½.
    """

    sigma: float
    lapse_rate: float = 0.0
    bias: float = 0.0
    careless: bool = False

    def __post_init__(self):
        if not self.sigma > 0 or not 0 <= self.lapse_rate <= 1:
            raise ValueError("need sigma > 0 and 0 ≤ lapse_rate ≤ 1")

    def p_choose_b(self, d_a, d_b) -> np.ndarray:
        from scipy.stats import norm

        x = np.asarray(d_a, float) - np.asarray(d_b, float)
        if self.careless:
            return np.full(x.shape, 0.5)
        return self.lapse_rate / 2 + (1 - self.lapse_rate) * norm.cdf(x / self.sigma
                                                                      + self.bias)

    def respond(self, d_a, d_b, rng: np.random.Generator) -> np.ndarray:
        """One bool per triplet: True = chose B."""
        p = self.p_choose_b(d_a, d_b)
        return rng.random(p.shape) < p


@dataclass
class TwoAFCPopulation:
    """Population of :class:`TwoAFCObserver`: each participant gets ``bias ~ N(0, bias_sd)``,
    ``σ`` times ``exp(N(0, sigma_sd))`` and is careless with probability ``careless_share``;
    they respond to the distance column ``distance`` of the items (``a_<distance>``,
    ``b_<distance>``; SSIM as 1 − SSIM).

    Population average (``sigma_sd = 0``): a probit mixed over normal biases is a probit, so
    ``P(B) = λ'/2 + (1 − λ') Φ(x · β*)`` exactly, with ``x = d_a − d_b``, slope
    ``β* = 1 / (σ √(1 + bias_sd²))`` and ``λ' = c + (1 − c) λ`` (``c`` the careless share) —
    :meth:`probit_parameters`, the truth :func:`engine.protocol_analysis.twoafc_choice_slope`
    recovers.
    """

    sigma: float
    lapse_rate: float = 0.0
    bias_sd: float = 0.0
    sigma_sd: float = 0.0
    careless_share: float = 0.0
    distance: str = "lpips_alexnet"

    def __post_init__(self):
        TwoAFCObserver(self.sigma, self.lapse_rate)  # validates
        if self.bias_sd < 0 or self.sigma_sd < 0 or not 0 <= self.careless_share <= 1:
            raise ValueError("need bias_sd ≥ 0, sigma_sd ≥ 0 and 0 ≤ careless_share ≤ 1")

    def probit_parameters(self) -> dict:
        """``{"beta", "sigma", "lapse_rate"}`` of the population-average probit (exact when
        ``sigma_sd = 0``; otherwise a ValueError: no closed form)."""
        if self.sigma_sd:
            raise ValueError("the population average is a probit only with sigma_sd = 0")
        beta = 1.0 / (self.sigma * math.sqrt(1 + self.bias_sd ** 2))
        lam = self.careless_share + (1 - self.careless_share) * self.lapse_rate
        return {"beta": beta, "sigma": 1.0 / beta, "lapse_rate": lam}

    def mean_p_choose_b(self, d_a, d_b) -> np.ndarray:
        """Population-average P(choose B) (Gauss–Hermite over bias and σ spread)."""
        from scipy.stats import norm

        x = np.asarray(d_a, float) - np.asarray(d_b, float)
        b = (self.bias_sd * _QUAD_NODES)[:, None] if self.bias_sd else np.zeros((1, 1))
        wb = _QUAD_WEIGHTS[:, None] if self.bias_sd else np.ones((1, 1))
        s = (self.sigma * np.exp(self.sigma_sd * _QUAD_NODES))[None] if self.sigma_sd else \
            np.full((1, 1), self.sigma)
        ws = _QUAD_WEIGHTS[None] if self.sigma_sd else np.ones((1, 1))
        phi = norm.cdf(x[..., None, None] / s + b)
        p = (phi * wb * ws).sum((-2, -1))
        p = self.lapse_rate / 2 + (1 - self.lapse_rate) * p
        return (1 - self.careless_share) * p + self.careless_share * 0.5

    def simulate(self, items: pd.DataFrame, *, n_participants: int,
                 trials_per_participant: int, rng: np.random.Generator) -> pd.DataFrame:
        """2AFC rows (engine.protocol_analysis format) of sampled observers.

        ``items``: one row per triplet with ``item, condition_a, condition_b, is_control`` and
        ``a_NAME``/``b_NAME`` distance columns (all copied to the rows; the observers respond
        to ``a_<distance>``/``b_<distance>``). Extra columns: ``session`` (= participant
        index), ``excluded`` False, ``simulated`` True.
        """
        da = _distance_of(items, f"a_{self.distance}")
        db = _distance_of(items, f"b_{self.distance}")
        part, idx = _assign(len(items), n_participants, trials_per_participant, rng)
        bias = rng.normal(0, self.bias_sd, n_participants) if self.bias_sd else np.zeros(
            n_participants)
        sig = self.sigma * (np.exp(rng.normal(0, self.sigma_sd, n_participants))
                            if self.sigma_sd else np.ones(n_participants))
        careless = rng.random(n_participants) < self.careless_share
        from scipy.stats import norm

        p = self.lapse_rate / 2 + (1 - self.lapse_rate) * norm.cdf(
            (da[idx] - db[idx]) / sig[part] + bias[part])
        p = np.where(careless[part], 0.5, p)
        chose_b = rng.random(len(p)) < p
        keep = ["item", "condition_a", "condition_b", "is_control"] + [
            c for c in items.columns if c[:2] in ("a_", "b_")]
        missing = [c for c in keep[:4] if c not in items]
        if missing:
            raise ValueError(f"items are missing column(s) {missing}")
        out = items[keep].iloc[idx].reset_index(drop=True)
        out.insert(0, "participant", _participant_ids(n_participants)[part])
        out.insert(2, "chose_b", chose_b)
        out["is_control"] = out["is_control"].fillna(False).astype(bool)
        for k, v in _sim_columns(len(out), part).items():
            out[k] = v
        return out


@dataclass
class RatingObserver:
    """One rater: ``rating = clip(round(a + b · d^γ + bias + ε), 1, N)``,
    ``ε ~ N(0, noise_sd²)`` (see :class:`RatingPopulation`); careless: uniform on 1..N."""

    intercept: float
    slope: float
    noise_sd: float = 0.5
    points: int = 5
    exponent: float = 1.0
    bias: float = 0.0
    careless: bool = False

    def __post_init__(self):
        if not 2 <= int(self.points) <= 11 or self.noise_sd <= 0 or self.exponent <= 0:
            raise ValueError("need 2 ≤ points ≤ 11, noise_sd > 0 and exponent > 0")

    def expected_rating(self, d) -> np.ndarray:
        """``E[rating]`` (exact; :meth:`RatingPopulation.expected_rating`)."""
        if self.careless:
            return np.full(np.shape(d), (int(self.points) + 1) / 2)
        pop = RatingPopulation(self.intercept, self.slope, self.noise_sd, self.points,
                               self.exponent)
        return pop.expected_rating(d, bias=self.bias)

    def respond(self, d, rng: np.random.Generator) -> np.ndarray:
        """One integer rating in 1..N per distance."""
        d = _check_values(d)
        if self.careless:
            return rng.integers(1, int(self.points) + 1, d.shape)
        mu = self.intercept + self.slope * d ** self.exponent + self.bias
        return np.clip(np.round(mu + rng.normal(0, self.noise_sd, d.shape)), 1,
                       int(self.points)).astype(int)


@dataclass
class RatingPopulation:
    """Rating observers: a noisy monotone of distance on a 1..N scale::

        rating = clip(round(a + b · s · d^γ + bias + ε), 1, N),   ε ~ N(0, noise_sd²)

    ``a`` intercept (the rating of identical images, d = 0), ``b`` slope (> 0 for pair-mode
    difference ratings, < 0 for single-mode quality), ``γ`` (``exponent``) the curvature,
    per participant a bias ``N(0, bias_sd)`` and a slope factor ``s = exp(N(0, slope_sd))``;
    careless participants rate uniformly at random. ``distance`` names the ``d_NAME`` column
    responded to (SSIM as 1 − SSIM). :meth:`expected_rating` is the exact expectation of
    the clipped, rounded normal; :meth:`mean_rating` the population average — its
    correlations with distance are the truth that
    :func:`engine.protocol_analysis.rating_correlations` recovers.
    """

    intercept: float
    slope: float
    noise_sd: float = 0.5
    points: int = 5
    exponent: float = 1.0
    bias_sd: float = 0.0
    slope_sd: float = 0.0
    careless_share: float = 0.0
    distance: str = "lpips_alexnet"

    def __post_init__(self):
        if not 2 <= int(self.points) <= 11 or self.noise_sd <= 0 or self.exponent <= 0:
            raise ValueError("need 2 ≤ points ≤ 11, noise_sd > 0 and exponent > 0")
        if self.bias_sd < 0 or self.slope_sd < 0 or not 0 <= self.careless_share <= 1:
            raise ValueError("need bias_sd ≥ 0, slope_sd ≥ 0 and 0 ≤ careless_share ≤ 1")

    def latent(self, d, bias=0.0, slope_factor=1.0) -> np.ndarray:
        d = _check_values(d)
        return self.intercept + self.slope * slope_factor * d ** self.exponent + bias

    def expected_rating(self, d, bias=0.0, slope_factor=1.0) -> np.ndarray:
        """``E[rating]`` of an observer with these traits:
        ``Σ_k k · P(round(μ + ε) clipped = k)`` with the normal's mass on
        ``[k − ½, k + ½)`` (the end points taking the tails)."""
        from scipy.stats import norm

        mu = np.asarray(self.latent(d, bias, slope_factor), float)
        ks = np.arange(1, int(self.points) + 1)
        upper = norm.cdf((ks[:-1] + 0.5 - mu[..., None]) / self.noise_sd)  # P(rating ≤ k)
        # E = N − Σ_{k<N} P(rating ≤ k)
        return int(self.points) - upper.sum(-1)

    def mean_rating(self, d) -> np.ndarray:
        """Population-average expected rating (Gauss–Hermite over bias and slope spread,
        careless raters at the scale midpoint)."""
        d = np.atleast_1d(_check_values(d))
        b = (self.bias_sd * _QUAD_NODES)[:, None] if self.bias_sd else np.zeros((1, 1))
        wb = _QUAD_WEIGHTS[:, None] if self.bias_sd else np.ones((1, 1))
        s = np.exp(self.slope_sd * _QUAD_NODES)[None] if self.slope_sd else np.ones((1, 1))
        ws = _QUAD_WEIGHTS[None] if self.slope_sd else np.ones((1, 1))
        e = (self.expected_rating(d[:, None, None], b[None], s[None]) * (wb * ws)[None]).sum(
            (1, 2))
        return (1 - self.careless_share) * e + self.careless_share * (int(self.points) + 1) / 2

    def simulate(self, items: pd.DataFrame, *, n_participants: int,
                 trials_per_participant: int, rng: np.random.Generator,
                 retest_fraction: float = 0.0) -> pd.DataFrame:
        """Rating rows (engine.protocol_analysis format) of sampled raters.

        ``items``: ``item, condition, is_control`` and ``d_NAME`` columns (copied; the raters
        respond to ``d_<distance>``; anchors have d = 0). Each participant rates
        ``trials_per_participant`` distinct items, then repeats ``round(retest_fraction ×
        their non-anchor items)`` of them (``is_repeat`` True, fresh noise).
        """
        if not 0 <= retest_fraction <= 1:
            raise ValueError("retest_fraction must be in [0, 1]")
        missing = [c for c in ("item", "condition", "is_control") if c not in items]
        if missing:
            raise ValueError(f"items are missing column(s) {missing}")
        d = _distance_of(items, f"d_{self.distance}")
        part, idx = _assign(len(items), n_participants, trials_per_participant, rng)
        ctrl = items["is_control"].fillna(False).astype(bool).to_numpy()
        repeat = np.zeros(len(idx), bool)
        extra_p, extra_i = [], []
        if retest_fraction:
            for p in range(n_participants):
                mine = np.flatnonzero((part == p) & ~ctrl[idx])
                m = int(round(retest_fraction * len(mine)))
                if m:
                    pick = rng.choice(mine, size=m, replace=False)
                    extra_p.append(part[pick])
                    extra_i.append(idx[pick])
        if extra_p:
            part = np.concatenate([part, *extra_p])
            idx = np.concatenate([idx, *extra_i])
            repeat = np.concatenate([repeat, np.ones(len(part) - len(repeat), bool)])
        bias = rng.normal(0, self.bias_sd, n_participants) if self.bias_sd else np.zeros(
            n_participants)
        slope = np.exp(rng.normal(0, self.slope_sd, n_participants)) if self.slope_sd else \
            np.ones(n_participants)
        careless = rng.random(n_participants) < self.careless_share
        mu = self.latent(d[idx], bias[part], slope[part])
        r = np.clip(np.round(mu + rng.normal(0, self.noise_sd, len(mu))), 1, int(self.points))
        r = np.where(careless[part], rng.integers(1, int(self.points) + 1, len(mu)), r)
        keep = ["item", "condition", "is_control"] + [c for c in items.columns
                                                      if c.startswith("d_")]
        out = items[keep].iloc[idx].reset_index(drop=True)
        out.insert(0, "participant", _participant_ids(n_participants)[part])
        out.insert(2, "rating", r.astype(int))
        out["is_control"] = out["is_control"].fillna(False).astype(bool)
        out.insert(5, "is_repeat", repeat)
        order = np.lexsort((repeat, part))  # each participant's repeats after their firsts
        out = out.iloc[order].reset_index(drop=True)
        for k, v in _sim_columns(len(out), out["participant"].map(
                {p: i for i, p in enumerate(_participant_ids(n_participants))}).to_numpy()
                ).items():
            out[k] = v
        return out


@dataclass
class LabelObserver:
    """Label observer: the class information in the image fades with the bound::

        P(correct | b) = 1/L + (1 − 1/L − ε) · (1 − F(β (ln b − ln t)))

    ``L`` labels; ``ε`` (``clean_error``) the error rate on unperturbed images (b = 0 gives
    ``1 − ε``); ``t`` the *label-flip bound*, where accuracy is midway between ``1 − ε`` and
    chance ``1/L``; ``β`` the slope on log bound; ``F`` logistic or Weibull (as
    :mod:`engine.calibration`). A wrong answer is the item's adversarial label with
    probability ``adversarial_share`` (when it has one, different from the true label),
    otherwise uniform over the other ``L − 1`` labels — so at a large bound the answer is
    uniform over all ``L`` (chance). Careless: uniform over all labels.
    """

    threshold: float
    slope: float
    n_labels: int
    clean_error: float = 0.0
    adversarial_share: float = 0.0
    careless: bool = False
    sigmoid: str = "logistic"

    def __post_init__(self):
        if not self.threshold > 0 or not self.slope > 0 or int(self.n_labels) < 2:
            raise ValueError("need threshold > 0, slope > 0 and n_labels ≥ 2")
        if not 0 <= self.clean_error < 1 - 1 / self.n_labels:
            raise ValueError("need 0 ≤ clean_error < 1 − 1/n_labels")
        if not 0 <= self.adversarial_share <= 1 or self.sigmoid not in SIGMOIDS:
            raise ValueError(f"need 0 ≤ adversarial_share ≤ 1 and sigmoid in {SIGMOIDS}")

    def p_correct(self, bounds) -> np.ndarray:
        b = _check_values(bounds)
        chance = 1.0 / self.n_labels
        if self.careless:
            return np.full(b.shape, chance)
        with np.errstate(divide="ignore"):
            z = self.slope * (np.log(b) - math.log(self.threshold))
        return chance + (1 - chance - self.clean_error) * (1 - sigmoid_cdf(z, self.sigmoid))

    def respond(self, true_index, bounds, rng: np.random.Generator, adversarial_index=None
                ) -> np.ndarray:
        """Answered label indices (0..L−1) for items with true label index ``true_index``
        at ``bounds`` (``adversarial_index``: the adversarial label per item, −1 for none)."""
        true_index = np.asarray(true_index, int)
        adv = (np.full(true_index.shape, -1) if adversarial_index is None
               else np.asarray(adversarial_index, int))
        p = np.broadcast_to(self.p_correct(bounds), true_index.shape)
        return _label_answers(p, true_index, adv, int(self.n_labels), self.adversarial_share,
                              np.full(true_index.shape, self.careless), rng)


def _label_answers(p_correct, true_idx, adv_idx, n_labels, adversarial_share, careless, rng):
    """Label indices: correct with ``p_correct``; else the adversarial label with
    ``adversarial_share`` (where ``adv_idx ≥ 0`` and differs), else uniform over the others;
    careless rows uniform over all."""
    n = len(p_correct)
    correct = rng.random(n) < p_correct
    other = rng.integers(0, n_labels - 1, n)
    other = other + (other >= true_idx)  # uniform over the labels ≠ true
    use_adv = (rng.random(n) < adversarial_share) & (adv_idx >= 0) & (adv_idx != true_idx)
    wrong = np.where(use_adv, adv_idx, other)
    ans = np.where(correct, true_idx, wrong)
    return np.where(careless, rng.integers(0, n_labels, n), ans)


@dataclass
class LabelPopulation:
    """Population of :class:`LabelObserver` per threat model.

    ``functions``: ``{threat_model: (t, β)}`` of the typical observer (``"*"`` for all).
    Each participant's ``t`` is multiplied by ``exp(N(0, threshold_sd))`` and ``β`` by
    ``exp(N(0, slope_sd))``; careless with probability ``careless_share``. Gold items
    (``is_gold``) and bound 0 are answered at ``1 − ε``. :meth:`true_flip_bound` is the bound
    where the population-average accuracy reaches a target — what
    :func:`engine.protocol_analysis.label_flip_bound` recovers.
    """

    functions: dict
    clean_error: float = 0.02
    adversarial_share: float = 0.0
    threshold_sd: float = 0.0
    slope_sd: float = 0.0
    careless_share: float = 0.0
    sigmoid: str = "logistic"

    def __post_init__(self):
        if not self.functions:
            raise ValueError("functions must map threat model → (t, β)")
        if self.threshold_sd < 0 or self.slope_sd < 0 or not 0 <= self.careless_share <= 1:
            raise ValueError("need threshold_sd ≥ 0, slope_sd ≥ 0, 0 ≤ careless_share ≤ 1")

    def function(self, threat_model) -> tuple[float, float]:
        if threat_model in self.functions:
            return self.functions[threat_model]
        if "*" in self.functions:
            return self.functions["*"]
        raise ValueError(f"no label function for threat model {threat_model!r}")

    def p_correct(self, bounds, threat_model, n_labels: int, threshold_factor=1.0,
                  slope_factor=1.0, careless=False) -> np.ndarray:
        """P(correct) of observers with these traits (broadcast)."""
        b = _check_values(bounds)
        t, beta = self.function(threat_model)
        chance = 1.0 / n_labels
        with np.errstate(divide="ignore"):
            z = beta * slope_factor * (np.log(b) - np.log(t * threshold_factor))
        p = chance + (1 - chance - self.clean_error) * (1 - sigmoid_cdf(z, self.sigmoid))
        return np.where(careless, chance, p)

    def mean_p_correct(self, bounds, threat_model, n_labels: int) -> np.ndarray:
        """Population-average P(correct) (Gauss–Hermite over the threshold and slope spread,
        careless share mixed in)."""
        b = np.atleast_1d(_check_values(bounds))
        tf = np.exp(self.threshold_sd * _QUAD_NODES)[:, None] if self.threshold_sd else \
            np.ones((1, 1))
        wt = _QUAD_WEIGHTS[:, None] if self.threshold_sd else np.ones((1, 1))
        sf = np.exp(self.slope_sd * _QUAD_NODES)[None] if self.slope_sd else np.ones((1, 1))
        ws = _QUAD_WEIGHTS[None] if self.slope_sd else np.ones((1, 1))
        p = (self.p_correct(b[:, None, None], threat_model, n_labels, tf[None], sf[None])
             * (wt * ws)[None]).sum((1, 2))
        return (1 - self.careless_share) * p + self.careless_share / n_labels

    def true_flip_bound(self, threat_model, n_labels: int, target: float | None = None
                        ) -> float:
        """Bound where the population-average accuracy equals ``target`` (default: the
        midpoint between its clean accuracy and its floor, as
        :func:`engine.protocol_analysis.label_flip_bound`'s default)."""
        from scipy.optimize import brentq

        t, _ = self.function(threat_model)
        if target is None:
            top = float(self.mean_p_correct(0.0, threat_model, n_labels)[0])
            target = (top + 1.0 / n_labels) / 2
        f = lambda x: float(self.mean_p_correct(math.exp(x), threat_model,  # noqa: E731
                                                n_labels)[0]) - target
        lo, hi = math.log(t) - 30, math.log(t) + 30
        if f(lo) < 0 or f(hi) > 0:
            return math.nan
        return math.exp(brentq(f, lo, hi, xtol=1e-12))

    def simulate(self, items: pd.DataFrame, label_set, *, n_participants: int,
                 trials_per_participant: int, rng: np.random.Generator) -> pd.DataFrame:
        """Label rows (engine.protocol_analysis format) of sampled observers.

        ``items``: ``item, true_label, threat_model, bound, is_gold`` (optional ``level``,
        ``adversarial_label``); ``label_set`` the answers offered (every true label in it).
        """
        labels = [str(x) for x in label_set]
        n_labels = len(labels)
        if n_labels < 2 or len(set(labels)) != n_labels:
            raise ValueError("label_set needs at least 2 distinct labels")
        missing = [c for c in ("item", "true_label", "threat_model", "bound", "is_gold")
                   if c not in items]
        if missing:
            raise ValueError(f"items are missing column(s) {missing}")
        index = {lab: i for i, lab in enumerate(labels)}
        true = items["true_label"].astype(str).map(index)
        if true.isna().any():
            bad = items.loc[true.isna(), "true_label"].head(5).tolist()
            raise ValueError(f"true labels {bad} are not in the label set")
        true = true.to_numpy(int)
        adv = (items["adversarial_label"].astype(object).map(
            lambda v: index.get(str(v), -1) if v is not None and v == v else -1).to_numpy(int)
            if "adversarial_label" in items else np.full(len(items), -1))
        gold = items["is_gold"].fillna(False).astype(bool).to_numpy()
        bound = pd.to_numeric(items["bound"], errors="coerce").fillna(0.0).to_numpy(float)
        bound = np.where(gold, 0.0, bound)
        part, idx = _assign(len(items), n_participants, trials_per_participant, rng)
        tf = np.exp(rng.normal(0, self.threshold_sd, n_participants)) if self.threshold_sd \
            else np.ones(n_participants)
        sf = np.exp(rng.normal(0, self.slope_sd, n_participants)) if self.slope_sd else \
            np.ones(n_participants)
        careless = rng.random(n_participants) < self.careless_share
        tms = items["threat_model"].to_numpy(object)[idx]
        p = np.empty(len(idx))
        clean = bound[idx] == 0
        p[clean] = 1 - self.clean_error
        for tm in pd.unique(tms[~clean]):
            sel = ~clean & (tms == tm)
            p[sel] = self.p_correct(bound[idx][sel], tm, n_labels, tf[part[sel]],
                                    sf[part[sel]])
        ans = _label_answers(p, true[idx], adv[idx], n_labels, self.adversarial_share,
                             careless[part], rng)
        out = pd.DataFrame({
            "participant": _participant_ids(n_participants)[part],
            "item": items["item"].to_numpy()[idx],
            "response": np.asarray(labels, object)[ans],
            "true_label": items["true_label"].astype(str).to_numpy()[idx],
            "threat_model": items["threat_model"].to_numpy()[idx],
            "bound": bound[idx], "is_gold": gold[idx],
            "level": (pd.to_numeric(items["level"], errors="coerce").to_numpy(float)[idx]
                      if "level" in items else np.nan),
        })
        for k, v in _sim_columns(len(out), part).items():
            out[k] = v
        return out
