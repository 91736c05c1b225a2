"""A worker score that tells people from automated participants: a likelihood ratio.

Why not sentinels and response-time regularity alone: LLM agents now pass attention checks and
can sleep a log-normal, human-looking time (Westwood, PNAS 2025). What such an agent cannot do
cheaply is *see like a person*: a pixel comparison calls every perturbed pair "different",
also those far below the human threshold, and nothing about a pixel comparison is slower near
the threshold. Two pieces of evidence use that:

1. **Answers** against the study's own population psychometric function (fitted from its
   judgments, :func:`engine.calibration.fit_psychometric`): ``p`` = the population's
   P(different) for each trial's pair (sentinels: the pooled false-alarm rate γ; catch pairs:
   the pooled catch hit rate; data pairs: the fit at the pair's bound; *sub-threshold probes*
   — pairs perturbed a grey level or so — are data pairs at a tiny bound, where people answer
   near γ and a pixel comparison "different").

   - Person model: answers ~ Bernoulli(expit(k · logit(p) + c)), with the worker's own
     criterion shift ``c`` ∈ [−3, 3] and slope factor ``k`` ∈ [0.25, 4] *integrated* over
     how the study's people vary (``c ~ N(0, σ_c)``, ``ln k ~ N(0, σ_k)``; the spreads
     estimated from the study's workers by empirical Bayes, :func:`estimate_spread`). A
     maximised, free ``c`` and ``k`` would let "a person" with an extreme criterion and a
     flat slope answer like a bot.
   - Bot model: a pixel comparison with an error rate: P(different) = 1 − e where the two
     images differ in pixels, e where they are identical; ``e`` ∈ [0.001, 0.5] fitted.

2. **Response times** against the uncertainty ``u = p(1 − p)`` (largest at threshold). People
   answer more slowly near threshold (drift-diffusion: Palmer, Huk & Shadlen 2005): the
   population's slope ``b`` of ln RT on ``u`` is estimated by pooled within-worker regression
   (each worker centred on its own means).

   - Person model: ln RT = a + b · u + N(0, σ²) (``b`` the population's, ``a``, ``σ`` fitted);
   - bot model: ln RT = a' + N(0, σ'²) (times unrelated to difficulty; any distribution of
     pace, log-normal included).

   The log likelihood ratio is ``n/2 · ln(σ'² / σ²)``: positive when the worker's times rise
   where the population's do, negative when they do not. ``b ≤ 0`` (the population shows no
   rise) gives 0: no evidence either way.

**Score** ``S = LLR_answers + LLR_rt`` (natural log units, *nats*): a generalised likelihood
ratio of "one of this study's people" against "a pixel-comparing bot", each model with its
nuisance parameters at their maximum. ``S < 0``: the bot model explains the worker better;
that is the flag (:data:`FLAG_BELOW`). Prior odds are left out on purpose (flag, not verdict:
staff read the components). ``1 / (1 + e^S)`` is the posterior probability of "bot" at even
prior odds.

Why a hand-written likelihood and not ``crowd-kit``: crowd-kit's worker models (Dawid–Skene,
MACE, GLAD ...) score workers by agreement with a latent true label per task; a pixel-diff bot
is *more* "accurate" than people on near-threshold pairs (it always sees the perturbation), so
agreement-based skill would rank it as the best worker. The evidence here is the opposite: how
human the errors and the timing are.

Population fits are made from everyone's judgments; the caller refits without the workers the
first round flagged (:func:`score_workers` does), so that a crowd of bots cannot move the
population towards themselves. Randomness only through seeded ``numpy.random.Generator``\\ s.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy import special

from engine.calibration import fit_psychometric

FLAG_BELOW = 0.0  # nats: flag a worker whose score S is below this
P_CLIP = (0.005, 0.995)  # population probabilities are kept off 0 and 1 (a misfit is no proof)
CRITERION_RANGE = (-3.0, 3.0)
# How people vary around the population function (prior of the person model): wider than the
# spread of the simulated people (0.6 and 0.3), so that unusual honest people are not flagged.
CRITERION_SD = 1.0  # logit units
SLOPE_FACTOR_SD = 0.5  # ln of the slope factor
SLOPE_FACTOR_RANGE = (0.25, 4.0)
ERROR_RATE_RANGE = (0.001, 0.5)
RT_CLIP_MS = (100.0, 20_000.0)
MIN_RT_TRIALS = 8  # fewer answered trials: no response-time evidence (LLR_rt = 0)

KIND_SENTINEL, KIND_CATCH, KIND_DATA = "sentinel", "catch", "data"


@dataclass
class WorkerScore:
    """One worker's evidence (nats; positive = person-like)."""

    worker: object
    n_trials: int
    score: float
    llr_answers: float
    llr_rt: float
    criterion: float  # person model: posterior mode of the criterion shift c
    slope_factor: float  # person model: posterior mode of the slope factor k
    error_rate: float  # fitted bot-model error rate e
    rt_slope: float  # the population's slope b of ln RT on p(1 − p)
    flagged: bool

    def as_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- population


@dataclass
class Population:
    """The study's people: P(different) per trial kind / condition, and the RT slope."""

    guess_rate: float
    catch_rate: float
    fits: dict  # threat model → PsychometricFit, or None where no fit was possible
    condition_rates: dict  # condition → pooled P(different) (where a fit is missing)
    rt_slope: float

    def p_different(self, trials: pd.DataFrame) -> np.ndarray:
        """Population P(different) for each row of ``trials`` (columns ``kind``,
        ``threat_model``, ``bound``, ``condition``)."""
        p = np.empty(len(trials))
        kind = trials["kind"].to_numpy()
        p[kind == KIND_SENTINEL] = self.guess_rate
        p[kind == KIND_CATCH] = self.catch_rate
        data = kind == KIND_DATA
        tms = trials["threat_model"].to_numpy()
        bounds = trials["bound"].to_numpy(float)
        conditions = trials["condition"].to_numpy()
        for tm in pd.unique(tms[data]):
            sel = data & (tms == tm)
            fit = self.fits.get(tm)
            if fit is not None:
                p[sel] = fit.predict(np.maximum(bounds[sel], 1e-12))
            else:
                p[sel] = [self.condition_rates.get(c, 0.5) for c in conditions[sel]]
        return np.clip(p, *P_CLIP)


def _rate(k: float, n: float, prior: float) -> float:
    """A pooled rate with one pseudo-judgment at ``prior`` (never exactly 0 or 1)."""
    return (k + prior) / (n + 1.0)


def fit_population(trials: pd.DataFrame, *, sigmoid: str = "logistic") -> Population:
    """The population model from ``trials`` (one row per answered main trial: ``worker``,
    ``kind``, ``threat_model``, ``bound``, ``condition``, ``different``, ``rt_ms``)."""
    diff = trials["different"].to_numpy(bool)
    kind = trials["kind"].to_numpy()
    sent, catch = kind == KIND_SENTINEL, kind == KIND_CATCH
    guess = float(np.clip(_rate(diff[sent].sum(), sent.sum(), 0.05), 0.005, 0.5))
    catch_rate = float(np.clip(_rate(diff[catch].sum(), catch.sum(), 0.95), 0.5, 0.995))
    data = trials[kind == KIND_DATA]
    fits: dict = {}
    condition_rates: dict = {}
    for condition, group in data.groupby("condition", sort=False):
        condition_rates[condition] = _rate(group["different"].sum(), len(group), 0.5)
    for tm, group in data.groupby("threat_model", sort=False):
        counts = group.groupby("bound")["different"].agg(["sum", "count"])
        counts = counts[counts.index.to_numpy(float) > 0]
        try:
            fits[tm] = fit_psychometric(
                counts.index.to_numpy(float), counts["sum"].to_numpy(), counts["count"].to_numpy(),
                guess_rate=guess, lapse="fit", sigmoid=sigmoid,
            )
        except ValueError:  # fewer than two bounds: the pooled rates per condition serve
            fits[tm] = None
    population = Population(guess, catch_rate, fits, condition_rates, rt_slope=0.0)
    population.rt_slope = _pooled_rt_slope(trials, population.p_different(trials))
    return population


def _log_rt(rt_ms) -> np.ndarray:
    return np.log(np.clip(np.asarray(rt_ms, float), *RT_CLIP_MS))


def _pooled_rt_slope(trials: pd.DataFrame, p: np.ndarray) -> float:
    """Slope of ln RT on p(1 − p), each worker centred on its own means (fixed effects)."""
    frame = pd.DataFrame({"worker": trials["worker"].to_numpy(), "y": _log_rt(trials["rt_ms"]),
                          "u": p * (1 - p)})
    centred = frame[["y", "u"]] - frame.groupby("worker")[["y", "u"]].transform("mean")
    sxx = float((centred["u"] ** 2).sum())
    return float((centred["u"] * centred["y"]).sum() / sxx) if sxx > 0 else 0.0


# ----------------------------------------------------------------------------- one worker


def _bernoulli_ll(q: np.ndarray, different: np.ndarray) -> float:
    return float(np.where(different, np.log(q), np.log1p(-q)).sum())


_C_GRID = np.linspace(*CRITERION_RANGE, 61)  # step 0.1
_K_GRID = np.geomspace(*SLOPE_FACTOR_RANGE, 25)  # step ×1.12


def _log_prior(criterion_sd: float, slope_factor_sd: float) -> np.ndarray:
    """ln of the normalised grid weights of N(c; 0, criterion_sd) · N(ln k; 0, slope_factor_sd)."""
    w = (-0.5 * (_C_GRID[None, :] / criterion_sd) ** 2
         - 0.5 * (np.log(_K_GRID)[:, None] / slope_factor_sd) ** 2)
    return w - special.logsumexp(w)


def _person_grid(p: np.ndarray, different: np.ndarray) -> np.ndarray:
    """ln P(answers | c, k) of the person model on the (k, c) grid."""
    logit = special.logit(np.asarray(p, float))
    z = _K_GRID[:, None, None] * logit[None, None, :] + _C_GRID[None, :, None]
    # log expit(z) for "different", log expit(−z) for "same", without overflow
    sign = np.where(np.asarray(different, bool), 1.0, -1.0)
    return -np.logaddexp(0.0, -sign * z).sum(axis=2)


def estimate_spread(grids: list[np.ndarray]) -> tuple[float, float]:
    """``(criterion_sd, slope_factor_sd)`` of the people behind ``grids`` (their
    :func:`_person_grid` grids): the empirical-Bayes choice, maximising the summed marginal
    likelihood over a small grid of spreads (bounded, so a few odd workers cannot make the
    prior absurdly wide or narrow)."""
    stack = np.stack(grids)
    best, best_ll = (CRITERION_SD, SLOPE_FACTOR_SD), -math.inf
    for c_sd in (0.4, 0.55, 0.7, 0.85, 1.0, 1.2, 1.4):
        for k_sd in (0.2, 0.3, 0.4, 0.5, 0.65, 0.8):
            prior = _log_prior(c_sd, k_sd)
            total = float(special.logsumexp(stack + prior[None], axis=(1, 2)).sum())
            if total > best_ll:
                best, best_ll = (c_sd, k_sd), total
    return best


def answers_llr(p: np.ndarray, differ: np.ndarray, different: np.ndarray, *,
                criterion_sd: float = CRITERION_SD, slope_factor_sd: float = SLOPE_FACTOR_SD,
                grid: np.ndarray | None = None) -> tuple[float, float, float, float]:
    """``(LLR, c, k, e)``: a person of the study's population against the pixel-comparison bot.

    Person: the population's ``p`` with the worker's own criterion ``c`` and slope factor
    ``k`` (``expit(k · logit(p) + c)``), *integrated* over how people vary, ``c ~ N(0,
    criterion_sd)``, ``ln k ~ N(0, slope_factor_sd)`` (a random-effects marginal likelihood,
    summed on a grid: ``c`` in steps of 0.1 over [−3, 3], ``k`` in 25 log steps over
    [0.25, 4]). Integrating rather than maximising matters: a free criterion of +3 with a flat
    slope would let "a person" answer like a bot. ``c`` and ``k`` returned are the grid's
    posterior mode (for staff to read). Bot: error rate ``e`` at its maximum likelihood (the
    bot's best case). ``differ``: the two images differ in pixels.
    """
    different = np.asarray(different, bool)
    grid = _person_grid(p, different) if grid is None else grid
    ll = grid + _log_prior(criterion_sd, slope_factor_sd)
    person_ll = float(special.logsumexp(ll))
    ki, ci = np.unravel_index(np.argmax(ll), ll.shape)
    errors = float(np.sum(different != np.asarray(differ, bool)))
    e = float(np.clip(errors / max(len(different), 1), *ERROR_RATE_RANGE))
    bot_ll = _bernoulli_ll(np.where(differ, 1 - e, e), different)
    return person_ll - bot_ll, float(_C_GRID[ci]), float(_K_GRID[ki]), e


def rt_llr(p: np.ndarray, rt_ms: np.ndarray, rt_slope: float) -> float:
    """``n/2 · ln(σ'² / σ²)``: ln RT rising with p(1 − p) at the population's slope, against
    ln RT unrelated to it (see the module docstring); 0 without evidence."""
    y = _log_rt(rt_ms)
    n = len(y)
    if n < MIN_RT_TRIALS or rt_slope <= 0:
        return 0.0
    u = np.asarray(p, float) * (1 - np.asarray(p, float))
    var_bot = float(np.var(y))
    var_person = float(np.var(y - rt_slope * u))
    floor = 1e-6  # a constant pace (variance 0) must not divide by zero
    return n / 2 * math.log((var_bot + floor) / (var_person + floor))


def score_worker(population: Population, trials: pd.DataFrame, worker=None,
                 p: np.ndarray | None = None) -> WorkerScore:
    """The score of one worker's answered main ``trials`` (columns as in
    :func:`fit_population`; ``p``: their population P(different), if already computed)."""
    p = population.p_different(trials) if p is None else p
    different = trials["different"].to_numpy(bool)
    differ = trials["kind"].to_numpy() != KIND_SENTINEL
    return _score(worker, p, differ, different, trials["rt_ms"].to_numpy(float),
                  population.rt_slope)


def _score(worker, p, differ, different, rt_ms, rt_slope, spread=(CRITERION_SD, SLOPE_FACTOR_SD),
           grid=None) -> WorkerScore:
    llr_a, c, k, e = answers_llr(p, differ, different, criterion_sd=spread[0],
                                 slope_factor_sd=spread[1], grid=grid)
    llr_t = rt_llr(p, rt_ms, rt_slope)
    score = llr_a + llr_t
    return WorkerScore(
        worker=worker, n_trials=len(p), score=round(score, 4),
        llr_answers=round(llr_a, 4), llr_rt=round(llr_t, 4), criterion=round(c, 4),
        slope_factor=round(k, 4), error_rate=round(e, 4), rt_slope=round(rt_slope, 4),
        flagged=score < FLAG_BELOW,
    )


def score_workers(trials: pd.DataFrame, *, sigmoid: str = "logistic",
                  rounds: int = 2) -> dict:
    """``{worker: WorkerScore}`` for every worker in ``trials``.

    Round 1 fits the population to everyone, with the default spread of people
    (:data:`CRITERION_SD`, :data:`SLOPE_FACTOR_SD`); each later round refits the population
    function *and* the spread (:func:`estimate_spread`) without the workers the previous round
    flagged (when at least one worker is left), then scores everyone again.
    """
    if trials.empty:
        return {}
    trials = trials.reset_index(drop=True)
    workers = trials["worker"].to_numpy()
    index = {w: np.flatnonzero(workers == w) for w in pd.unique(workers)}
    differ = trials["kind"].to_numpy() != KIND_SENTINEL
    different = trials["different"].to_numpy(bool)
    rt_ms = trials["rt_ms"].to_numpy(float)
    flagged: set = set()
    scores: dict = {}
    for round_ in range(max(rounds, 1)):
        keep = trials[~trials["worker"].isin(flagged)]
        population = fit_population(keep if len(keep) else trials, sigmoid=sigmoid)
        p = population.p_different(trials)
        grids = {w: _person_grid(p[i], different[i]) for w, i in index.items()}
        spread = (CRITERION_SD, SLOPE_FACTOR_SD)
        people = [g for w, g in grids.items() if w not in flagged]
        if round_ and len(people) >= 2:
            spread = estimate_spread(people)
        scores = {
            w: _score(w, p[i], differ[i], different[i], rt_ms[i], population.rt_slope,
                      spread, grids[w])
            for w, i in index.items()
        }
        new = {w for w, s in scores.items() if s.flagged}
        if new == flagged:
            break
        flagged = new
    return scores


# ----------------------------------------------------------------------------- simulation


def design(thresholds: dict, *, levels=(0.25, 0.5, 0.8, 1.25, 2.0, 4.0),
           probe_bound: float = 1 / 255) -> pd.DataFrame:
    """A JND study's conditions: per threat model ``levels`` × its threshold, plus one
    sub-threshold *probe* condition at ``probe_bound`` (a grey level: a pixel comparison sees
    it, people do not). Columns ``condition, threat_model, bound``."""
    rows = []
    for tm, t in thresholds.items():
        for f in levels:
            rows.append({"condition": f"{tm}:{f * t:.6g}", "threat_model": tm, "bound": f * t})
        rows.append({"condition": f"{tm}:probe", "threat_model": tm, "bound": probe_bound})
    return pd.DataFrame(rows)


def simulate_trials(
    conditions: pd.DataFrame,
    rng: np.random.Generator,
    *,
    n_trials: int = 40,
    sentinel_share: float = 0.1,
    catch_share: float = 0.05,
) -> pd.DataFrame:
    """One session's main trials: sentinels, catch pairs and data pairs drawn uniformly over
    ``conditions`` (columns ``kind, condition, threat_model, bound``)."""
    n_sent = max(1, round(sentinel_share * n_trials))
    n_catch = round(catch_share * n_trials)
    n_data = n_trials - n_sent - n_catch
    idx = rng.integers(len(conditions), size=n_data)
    data = conditions.iloc[idx].assign(kind=KIND_DATA)
    controls = pd.DataFrame({
        "kind": [KIND_SENTINEL] * n_sent + [KIND_CATCH] * n_catch,
        "condition": [None] * (n_sent + n_catch), "threat_model": [None] * (n_sent + n_catch),
        "bound": [0.0] * (n_sent + n_catch),
    })
    out = pd.concat([data, controls], ignore_index=True)
    return out.iloc[rng.permutation(len(out))].reset_index(drop=True)


@dataclass
class HumanTraits:
    """How simulated people vary (see :func:`simulate_person`)."""

    thresholds: dict  # threat model → population threshold (bound where F = 0.5)
    slope: float = 3.0  # on ln bound
    bias_sd: float = 0.6  # criterion shift, logit units
    slope_sd: float = 0.3  # ln of a per-person slope factor
    threshold_sd: float = 0.2  # ln of a per-person threshold factor
    guess_rate: float = 0.04
    lapse_rate: float = 0.02
    rt_median_ms: tuple = (550.0, 1100.0)  # per-person median RT, uniform in this range
    rt_sigma: tuple = (0.25, 0.45)  # per-person log-normal σ
    rt_uncertainty_gain: float = 1.6  # ln RT rise per unit of p(1 − p) (0.4 at threshold)


def simulate_person(trials: pd.DataFrame, traits: HumanTraits, rng: np.random.Generator
                    ) -> pd.DataFrame:
    """An honest simulated person (:class:`engine.observers.SimulatedObserver` with a drawn
    criterion, slope and threshold) answers ``trials``; RT log-normal around the person's
    median, slower near the person's own threshold by ``rt_uncertainty_gain · p(1 − p)``."""
    from engine.observers import SimulatedObserver

    bias = float(rng.normal(0, traits.bias_sd))
    slope = traits.slope * float(np.exp(rng.normal(0, traits.slope_sd)))
    t_factor = float(np.exp(rng.normal(0, traits.threshold_sd)))
    p = np.empty(len(trials))
    kind = trials["kind"].to_numpy()
    p[kind == KIND_SENTINEL] = traits.guess_rate
    p[kind == KIND_CATCH] = 1 - traits.lapse_rate
    for tm in pd.unique(trials.loc[kind == KIND_DATA, "threat_model"]):
        sel = (kind == KIND_DATA) & (trials["threat_model"].to_numpy() == tm)
        observer = SimulatedObserver(
            threshold=traits.thresholds[tm] * t_factor, slope=slope,
            guess_rate=traits.guess_rate, lapse_rate=traits.lapse_rate, bias=bias)
        p[sel] = observer.p_different(trials["bound"].to_numpy(float)[sel])
    median = rng.uniform(*traits.rt_median_ms)
    sigma = rng.uniform(*traits.rt_sigma)
    log_rt = (math.log(median) + traits.rt_uncertainty_gain * p * (1 - p)
              + rng.normal(0, sigma, len(p)))
    return trials.assign(different=rng.random(len(p)) < p, rt_ms=np.exp(log_rt))


def simulate_pixel_bot(trials: pd.DataFrame, rng: np.random.Generator, *,
                       error_rate: tuple = (0.02, 0.15), rt_median_ms: tuple = (550.0, 1100.0),
                       rt_sigma: tuple = (0.25, 0.45), constant_pace: bool = False
                       ) -> pd.DataFrame:
    """A pixel-diff bot: "different" where the pixels differ, flipped at a human-like error
    rate drawn from ``error_rate``; response times log-normal with a human-like median and σ
    (unrelated to the pair), or, with ``constant_pace``, 400–401 ms (the older bots)."""
    e = rng.uniform(*error_rate)
    differ = trials["kind"].to_numpy() != KIND_SENTINEL
    flip = rng.random(len(trials)) < e
    if constant_pace:
        rt = 400.0 + rng.random(len(trials))
    else:
        rt = np.exp(math.log(rng.uniform(*rt_median_ms))
                    + rng.normal(0, rng.uniform(*rt_sigma), len(trials)))
    return trials.assign(different=differ ^ flip, rt_ms=rt)


def simulate_study(
    n_people: int,
    n_pixel_bots: int,
    n_pace_bots: int,
    rng: np.random.Generator,
    *,
    n_trials: int = 40,
    traits: HumanTraits | None = None,
    conditions: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """The answered main trials of a simulated study: ``n_people`` honest people
    (:func:`simulate_person`), ``n_pixel_bots`` pixel-diff bots with human-like log-normal
    timing and error rate, ``n_pace_bots`` of the older kind (perfect pixel answers at a
    constant pace); ``n_trials`` main trials each. Columns as in :func:`fit_population` plus
    ``truth`` (``"person"``, ``"pixel_bot"``, ``"pace_bot"``); workers are ``"<truth>:<i>"``."""
    traits = traits or HumanTraits(thresholds={"linf": 4 / 255, "l2": 0.5})
    conditions = design(traits.thresholds) if conditions is None else conditions
    frames = []
    for truth, n in (("person", n_people), ("pixel_bot", n_pixel_bots),
                     ("pace_bot", n_pace_bots)):
        for i in range(n):
            trials = simulate_trials(conditions, rng, n_trials=n_trials)
            if truth == "person":
                answered = simulate_person(trials, traits, rng)
            elif truth == "pixel_bot":
                answered = simulate_pixel_bot(trials, rng)
            else:
                answered = simulate_pixel_bot(trials, rng, error_rate=(0.0, 0.0),
                                              constant_pace=True)
            frames.append(answered.assign(worker=f"{truth}:{i}", truth=truth))
    return pd.concat(frames, ignore_index=True)
