"""The worker score of engine.bots: its pieces against direct computations, and its rates.

Oracles: the person model's marginal likelihood against scipy's numerical integration
(``scipy.integrate.dblquad`` over the criterion and log slope factor), the response-time
likelihood ratio against the two Gaussian models' log densities (``scipy.stats.norm``) at
their maximum-likelihood estimates, and the rates against the issue's targets on simulated
workers (fixed seeds; margins so that a small numerical change cannot flip the verdict).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import integrate, special, stats

from engine import bots


def test_person_marginal_likelihood_matches_numerical_integration():
    rng = np.random.default_rng(3)
    p = np.clip(rng.uniform(0.02, 0.98, 30), *bots.P_CLIP)
    different = rng.random(30) < p
    differ = np.ones(30, bool)
    llr, *_ = bots.answers_llr(p, differ, different)
    e = float(np.clip(np.mean(~different), *bots.ERROR_RATE_RANGE))
    bot_ll = float(np.where(different, math.log(1 - e), math.log(e)).sum())
    person_ll = llr + bot_ll

    logit = special.logit(p)
    c_sd, k_sd = bots.CRITERION_SD, bots.SLOPE_FACTOR_SD
    lo_c, hi_c = bots.CRITERION_RANGE
    lo_k, hi_k = np.log(bots.SLOPE_FACTOR_RANGE)

    def likelihood(log_k, c):
        q = special.expit(math.exp(log_k) * logit + c)
        return float(np.prod(np.where(different, q, 1 - q)))

    def density(log_k, c):
        return stats.norm.pdf(c, 0, c_sd) * stats.norm.pdf(log_k, 0, k_sd)

    # The grid's prior is the normal density truncated to the box: normalise the same way.
    num, _ = integrate.dblquad(lambda lk, c: likelihood(lk, c) * density(lk, c),
                               lo_c, hi_c, lo_k, hi_k, epsabs=0, epsrel=1e-6)
    den, _ = integrate.dblquad(density, lo_c, hi_c, lo_k, hi_k)
    assert person_ll == pytest.approx(math.log(num / den), abs=0.05)


def test_rt_likelihood_ratio_is_the_gaussian_models_difference():
    rng = np.random.default_rng(4)
    p = rng.uniform(0.01, 0.99, 40)
    u = p * (1 - p)
    rt = np.exp(6.5 + 1.5 * u + rng.normal(0, 0.3, 40))
    b = 1.5
    y = np.log(rt)
    person = stats.norm.logpdf(y, (y - b * u).mean() + b * u, (y - b * u).std()).sum()
    bot = stats.norm.logpdf(y, y.mean(), y.std()).sum()
    assert bots.rt_llr(p, rt, b) == pytest.approx(person - bot, abs=1e-3)
    assert bots.rt_llr(p, rt, 0.0) == 0.0  # no population rise: no evidence
    assert bots.rt_llr(p[:5], rt[:5], b) == 0.0  # too few trials


def test_a_perfect_pixel_answer_pattern_is_strong_bot_evidence():
    # Sub-threshold pairs (people: 10 % "different") all answered "different", sentinels "same".
    p = np.r_[np.full(20, 0.1), np.full(4, 0.04)]
    differ = np.r_[np.ones(20, bool), np.zeros(4, bool)]
    llr, *_ = bots.answers_llr(p, differ, differ)
    assert llr < -10
    human_like = np.r_[np.arange(20) < 2, np.zeros(4, bool)]
    assert bots.answers_llr(p, differ, human_like)[0] > 5


@pytest.mark.slow
def test_rates_on_simulated_workers_meet_the_targets():
    """≥ 99 % of bots flagged and ≤ 1 % of honest people at 40 main trials (bench/bots.py
    measures 500 of each; here 150 honest, 150 pixel-diff bots with human timing, 50 pace
    bots, seed fixed)."""
    trials = bots.simulate_study(150, 150, 50, np.random.default_rng(20261202), n_trials=40)
    scores = bots.score_workers(trials)
    table = pd.DataFrame([s.as_dict() for s in scores.values()])
    table["truth"] = table["worker"].str.split(":").str[0]
    flagged = table.groupby("truth")["flagged"].mean()
    people = table[table.truth == "person"]
    bots_ = table[table.truth != "person"]
    assert people["flagged"].mean() <= 0.01, people.nsmallest(3, "score")
    assert bots_["flagged"].mean() >= 0.99, bots_.nlargest(3, "score")
    assert flagged["pace_bot"] == 1.0, flagged
    # ... with margins: 98 % of each side are well clear of the line.
    assert people["score"].quantile(0.02) > 2.0
    assert bots_["score"].quantile(0.98) < -2.0
    # The response-time evidence points the right way on its own, too.
    assert table[table.truth == "person"]["llr_rt"].median() > 0
    assert table[table.truth == "pixel_bot"]["llr_rt"].median() < 0
