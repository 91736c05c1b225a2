"""engine.observers: answer frequencies against the stated formula (scipy binomtest), the
population average against Monte Carlo, reproducibility from the seed, and power."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import special
from scipy.stats import binomtest

from engine.observers import ObserverPopulation, SimulatedObserver, power


def test_observer_probability_is_the_stated_formula():
    obs = SimulatedObserver(threshold=4.0, slope=2.0, guess_rate=0.05, lapse_rate=0.1, bias=0.3)
    s = np.array([0.0, 1.0, 4.0, 16.0])
    with np.errstate(divide="ignore"):
        expected = 0.05 + 0.85 * special.expit(2.0 * (np.log(s) - np.log(4.0)) + 0.3)
    assert obs.p_different(s) == pytest.approx(expected)
    assert obs.p_different([0.0])[0] == pytest.approx(0.05)  # identical images: false alarms
    w = SimulatedObserver(threshold=4.0, slope=2.0, sigmoid="weibull")
    assert w.p_different([4.0])[0] == pytest.approx(1 - np.exp(-1))


def test_responses_follow_the_probability_and_the_seed():
    obs = SimulatedObserver(threshold=4.0, slope=2.0, guess_rate=0.05, lapse_rate=0.02)
    answers = obs.respond(np.full(4000, 6.0), np.random.default_rng(0))
    assert answers.dtype == bool
    ci = binomtest(int(answers.sum()), 4000).proportion_ci(0.999)
    assert ci.low < obs.p_different([6.0])[0] < ci.high
    again = obs.respond(np.full(4000, 6.0), np.random.default_rng(0))
    assert (answers == again).all()
    careless = SimulatedObserver(threshold=4.0, slope=2.0, careless=True)
    c = careless.respond(np.full(4000, 100.0), np.random.default_rng(1))
    assert binomtest(int(c.sum()), 4000, 0.5).pvalue > 1e-3


def test_population_average_matches_monte_carlo():
    pop = ObserverPopulation({"linf": (4.0, 2.0)}, guess_rate=0.04, lapse_rate=0.02,
                             bias_sd=0.8, careless_share=0.1)
    rng = np.random.default_rng(2)
    bias, careless = pop.sample_traits(200_000, rng)
    mc = pop.p_different(np.full(200_000, 5.0), "linf", bias=bias, careless=careless).mean()
    assert pop.mean_p_different(5.0, "linf")[0] == pytest.approx(mc, abs=3e-3)
    t = pop.true_threshold(0.5, "linf")
    assert pop.mean_p_different(t, "linf")[0] == pytest.approx(0.5, abs=1e-9)


def test_simulate_builds_a_judgments_frame():
    pairs = pd.DataFrame({"pair": [10, 11, 12], "condition": ["a", "b", None],
                          "threat_model": ["linf", "linf", None], "bound": [2.0, 8.0, None],
                          "is_sentinel": [False, False, True]})
    pop = ObserverPopulation({"linf": (4.0, 3.0)}, guess_rate=0.1, lapse_rate=0.0)
    j = pop.simulate(pairs, n_participants=50, trials_per_participant=60,
                     rng=np.random.default_rng(0))
    assert len(j) == 3000 and j["simulated"].all() and not j["excluded"].any()
    assert set(j["pair"]) == {10, 11, 12}
    rates = j.groupby("pair")["different"].mean()
    assert rates[12] == pytest.approx(0.1, abs=0.04)
    assert rates[11] == pytest.approx(pop.mean_p_different(8.0, "linf")[0], abs=0.05)
    with pytest.raises(ValueError, match="column"):
        ObserverPopulation({"*": (1, 1)}, stimulus="lpips").simulate(
            pairs, n_participants=1, trials_per_participant=1, rng=np.random.default_rng(0))


@pytest.mark.parametrize("kwargs", [{"threshold": -1, "slope": 1}, {"threshold": 1, "slope": 0},
                                    {"threshold": 1, "slope": 1, "sigmoid": "probit"},
                                    {"threshold": 1, "slope": 1, "guess_rate": 0.6,
                                     "lapse_rate": 0.5}])
def test_bad_observer(kwargs):
    with pytest.raises(ValueError):
        SimulatedObserver(**kwargs)


def test_negative_stimulus_is_rejected():
    with pytest.raises(ValueError, match="≥ 0"):
        SimulatedObserver(threshold=1, slope=1).p_different([-1.0])


def test_power_widths_shrink_with_more_judgments():
    pop = ObserverPopulation({"linf": (6.0, 2.5)}, guess_rate=0.04, lapse_rate=0.02)
    table = power(pop, "linf", [2, 4, 8, 16], target_width=0.2, n_grid=(200, 3200),
                  repetitions=4, n_boot=50, lapse=0.02)
    assert list(table["n_judgments"]) == [200, 3200]
    assert table["median_width"].iloc[1] < table["median_width"].iloc[0]
    # 1/sqrt(N): 16× the judgments is about a quarter of the width
    assert 0.12 < table["median_width"].iloc[1] / table["median_width"].iloc[0] < 0.5
