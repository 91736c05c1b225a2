"""engine.calibration against psignifit 4 (flat priors, η fixed at 0, so its MAP is the ML
fit) and against scipy's optimiser; threshold recovery and interval coverage with simulated
observers."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import psignifit
import pytest
from scipy import optimize, special

from engine.calibration import (
    CalibrationResult,
    PsychometricFit,
    calibrate,
    fit_psychometric,
    psychometric,
)
from engine.observers import ObserverPopulation

BOUNDS = np.array([1.0, 2.0, 4.0, 8.0, 16.0])
N = np.full(5, 200)


def data(seed=0, sigmoid="logistic"):
    p = psychometric(BOUNDS, -3.0, 2.0, 0.05, 0.03, sigmoid)
    return np.random.default_rng(seed).binomial(N, p)


def psignifit_fit(k, sigmoid, gamma, lapse):
    """psignifit 4 on x = ln b, mapped to (α, β, λ) — see engine.calibration's docstring."""
    flat = np.ones_like
    fixed = {"gamma": gamma, "eta": 0.0}
    if lapse != "fit":
        fixed["lambda"] = lapse
    res = psignifit.psignifit(np.c_[np.log(BOUNDS), k, N], sigmoid=sigmoid,
                              experiment_type="yes/no", fixed_parameters=fixed,
                              priors={"threshold": flat, "width": flat, "lambda": flat},
                              verbose=False)
    e = res.parameter_estimate_MAP
    if sigmoid == "logistic":
        beta = 2 * np.log(19) / e["width"]
        alpha = -beta * e["threshold"]
    else:
        beta = (np.log(-np.log(0.05)) - np.log(-np.log(0.95))) / e["width"]
        alpha = -beta * e["threshold"] + np.log(np.log(2))
    return alpha, beta, e["lambda"]


@pytest.mark.parametrize("sigmoid", ["logistic", "weibull"])
@pytest.mark.parametrize("lapse", [0.03, "fit"])
def test_fit_agrees_with_psignifit(sigmoid, lapse):
    k = data(0, sigmoid)
    fit = fit_psychometric(BOUNDS, k, N, guess_rate=0.05, lapse=lapse, sigmoid=sigmoid)
    # psignifit's optimiser does not keep λ ≥ 0, so compare where the ML λ is interior
    assert lapse != "fit" or 0.005 < fit.lapse_rate < 0.5
    alpha, beta, lam = psignifit_fit(k, sigmoid, 0.05, lapse)
    # psignifit's optimiser stops at ~1e-4 relative; thresholds agree to 0.1 %
    assert fit.alpha == pytest.approx(alpha, rel=2e-3, abs=2e-3)
    assert fit.beta == pytest.approx(beta, rel=2e-3)
    assert fit.lapse_rate == pytest.approx(lam, abs=1e-3)
    assert fit.threshold(0.5) == pytest.approx(np.exp((
        (special.logit if sigmoid == "logistic" else lambda u: np.log(-np.log1p(-u)))(
            (0.5 - 0.05) / (1 - 0.05 - lam)) - alpha) / beta), rel=1e-3)


def test_fit_is_the_maximum_likelihood_and_deviance_matches_scipy():
    k = data(2)
    fit = fit_psychometric(BOUNDS, k, N, guess_rate=0.05, lapse=0.03)

    def nll(t):
        p = 0.05 + 0.92 * special.expit(t[0] + t[1] * np.log(BOUNDS))
        return -(k * np.log(p) + (N - k) * np.log(1 - p)).sum()

    res = optimize.minimize(nll, [0.0, 1.0], method="Nelder-Mead",
                            options={"xatol": 1e-10, "fatol": 1e-12, "maxiter": 10000})
    assert [fit.alpha, fit.beta] == pytest.approx(res.x, abs=1e-4)
    p = fit.predict(BOUNDS)
    dev = 2 * np.sum(k * np.log(k / (N * p)) + (N - k) * np.log((N - k) / (N * (1 - p))))
    assert fit.deviance == pytest.approx(dev, rel=1e-6)
    assert fit.df == 3
    from scipy.stats import chi2
    assert fit.p_value == pytest.approx(chi2.sf(dev, 3), rel=1e-6)
    # threshold inverts predict
    for t in (0.1, 0.25, 0.5):
        assert fit.predict(fit.threshold(t)) == pytest.approx(t, abs=1e-9)
    assert math.isnan(fit.threshold(0.01))  # below the guess rate
    assert PsychometricFit.from_dict(json.loads(json.dumps(fit.to_dict()))) == fit


@pytest.mark.parametrize("kwargs, message", [
    ({"bounds": [1, -2, 3]}, "> 0"),
    ({"bounds": [1, 1, 1]}, "2 distinct"),
    ({"n_different": [300, 0, 0, 0, 0]}, "n_different"),
    ({"sigmoid": "probit"}, "sigmoid"),
    ({"bounds": []}, "length|empty"),
])
def test_bad_fit_input(kwargs, message):
    args = {"bounds": BOUNDS, "n_different": data(), "n_total": N, "guess_rate": 0.05}
    args.update(kwargs)
    if len(args["bounds"]) != 5:
        args["n_different"], args["n_total"] = (args["n_different"][:len(args["bounds"])],
                                                args["n_total"][:len(args["bounds"])])
    with pytest.raises(ValueError, match=message):
        fit_psychometric(**args)


def study_pairs(bounds_by_tm):
    rows = []
    for tm, bounds in bounds_by_tm.items():
        for b in bounds:
            rows.append({"pair": len(rows), "condition": f"{tm}:bound={b}", "threat_model": tm,
                         "bound": b, "is_sentinel": False})
    rows.append({"pair": len(rows), "condition": None, "threat_model": None, "bound": None,
                 "is_sentinel": True})
    return pd.DataFrame(rows)


def test_calibrate_recovers_thresholds_and_serialises():
    pop = ObserverPopulation({"linf": (6.0, 2.5), "l2": (900.0, 1.5)}, guess_rate=0.04,
                             lapse_rate=0.02, careless_share=0.05)
    pairs = study_pairs({"linf": [2, 4, 8, 16], "l2": [300, 600, 1200, 2400, 4800]})
    j = pop.simulate(pairs, n_participants=300, trials_per_participant=40,
                     rng=np.random.default_rng(0))
    cal = calibrate(pairs, j, n_boot=100, seed=1)
    presets = cal.presets()
    assert set(presets) == {"linf", "l2"} and set(presets["linf"]) == {"p10", "p25", "p50"}
    # ln(estimate / truth) over 150 simulated studies (seeds 100-249): sd 0.094 (linf) and
    # 0.165 (l2) at p10, an extrapolation below most of the data (|.| < 0.2 failed 21 % of
    # l2's), ≤ 0.047 at p25 and p50 (max 0.143). Tolerances ≈ 4.5 sd.
    tolerance = {0.1: 0.75, 0.25: 0.2, 0.5: 0.2}
    for tm in ("linf", "l2"):
        for _, row in cal.threat_models[tm].thresholds.iterrows():
            truth = pop.true_threshold(row["target"], tm)
            assert row["low"] < row["bound"] < row["high"]
            assert abs(math.log(row["bound"] / truth)) < tolerance[row["target"]], (tm, row)
    merged = j.merge(pairs, on="pair")
    assert cal.guess_rate == pytest.approx(merged[merged.is_sentinel].different.mean())
    counts = cal.threat_models["linf"].counts
    assert counts["n_judgments"].sum() == (merged.threat_model == "linf").sum()
    back = CalibrationResult.from_dict(json.loads(json.dumps(cal.to_dict(), allow_nan=False)))
    assert back.presets() == presets
    assert set(cal.table().columns) >= {"threat_model", "label", "bound", "low", "high"}


def test_calibrate_point_fit_equals_fit_psychometric_on_the_counts():
    pop = ObserverPopulation({"linf": (6.0, 2.5)}, guess_rate=0.04, lapse_rate=0.02)
    pairs = study_pairs({"linf": [2, 4, 8, 16]})
    j = pop.simulate(pairs, n_participants=50, trials_per_participant=30,
                     rng=np.random.default_rng(3))
    cal = calibrate(pairs, j, n_boot=0, lapse=0.02, sigmoid="weibull")
    m = j.merge(pairs, on="pair")
    g = m[~m.is_sentinel].groupby("bound")["different"].agg(["sum", "size"])
    fit = fit_psychometric(g.index, g["sum"], g["size"], guess_rate=m[m.is_sentinel].different
                           .mean(), lapse=0.02, sigmoid="weibull")
    assert cal.threat_models["linf"].fit.alpha == pytest.approx(fit.alpha)


def test_calibrate_skips_single_bound_and_needs_sentinels():
    pairs = study_pairs({"linf": [2, 4], "l2": [600]})
    pop = ObserverPopulation({"*": (3.0, 2.0)})
    j = pop.simulate(pairs, n_participants=10, trials_per_participant=20,
                     rng=np.random.default_rng(0))
    cal = calibrate(pairs, j, n_boot=10)
    assert "l2" in cal.skipped and "linf" in cal.threat_models
    no_sentinel = pairs[~pairs.is_sentinel]
    with pytest.raises(ValueError, match="sentinel"):
        calibrate(no_sentinel, j[j.pair.isin(no_sentinel.pair)], n_boot=10)
    with pytest.raises(ValueError, match="targets"):
        calibrate(pairs, j, targets=(0.5, 1.5))


@pytest.mark.slow
def test_interval_covers_true_threshold_in_90_percent_of_100_repetitions():
    pop = ObserverPopulation({"linf": (6.0, 2.5)}, guess_rate=0.04, lapse_rate=0.02,
                             careless_share=0.05)
    pairs = study_pairs({"linf": [2, 4, 8, 16]})
    truth = {t: pop.true_threshold(t, "linf") for t in (0.25, 0.5)}
    rng = np.random.default_rng(1)
    hits = {0.25: 0, 0.5: 0}
    for r in range(100):
        j = pop.simulate(pairs, n_participants=80, trials_per_participant=30, rng=rng)
        th = calibrate(pairs, j, targets=(0.25, 0.5), n_boot=200, seed=r).threat_models[
            "linf"].thresholds.set_index("target")
        for t in hits:
            hits[t] += th.loc[t, "low"] <= truth[t] <= th.loc[t, "high"]
    assert hits[0.25] >= 90 and hits[0.5] >= 90, hits


def screened_study(seed, n_part=150, trials=30, n_sentinel=2, limit=0.25, gamma=0.05):
    """Sessions of 28 main trials on a 7-level ladder and 2 sentinels; a session is excluded
    by quality control when its sentinel false-alarm rate exceeds ``limit`` (so with 2
    sentinels any false alarm excludes it)."""
    rng = np.random.default_rng(seed)
    pop = ObserverPopulation({"linf": (4.0, 3.0)}, guess_rate=gamma, lapse_rate=0.02)
    levels = np.geomspace(1, 16, 7)
    pairs = study_pairs({"linf": list(levels)})
    frames = []
    for p in range(n_part):
        pair = np.r_[rng.integers(0, 7, trials - n_sentinel), np.full(n_sentinel, 7)]
        values = np.r_[levels, 0.0][pair]
        diff = pop.respond(values, rng, threat_model="linf", bias=np.zeros(len(pair)),
                           careless=np.zeros(len(pair), bool))
        frames.append(pd.DataFrame({"pair": pair, "different": diff, "participant": p,
                                    "session": p, "excluded": diff[pair == 7].mean() > limit}))
    return pairs, pd.concat(frames, ignore_index=True), pop


def test_guess_rate_is_not_biased_by_sentinel_exclusions():
    naive, joint = [], []
    for seed in range(12):
        pairs, j, _ = screened_study(seed)
        kept = j[~j.excluded]
        assert kept.merge(pairs, on="pair").query("is_sentinel").different.sum() == 0
        naive.append(calibrate(pairs, kept, n_boot=0).guess_rate)
        res = calibrate(pairs, kept, n_boot=0, sentinel_limit=0.25)
        assert res.guess_method == "joint" and res.sentinel_limit == 0.25
        joint.append(res.guess_rate)
    assert max(naive) == 0.0  # the bias the issue demonstrates: every kept sentinel is "same"
    se = np.std(joint, ddof=1) / math.sqrt(len(joint))
    assert abs(np.mean(joint) - 0.05) < max(3 * se, 0.005), (np.mean(joint), se)
    assert min(joint) > 0.01
    # the thresholds follow: the 50 % point is recovered. (Not "inside its 95 % bootstrap
    # interval": that missed in 19 of 300 screened studies, 6 %. ln(estimate / truth) over 300
    # (seeds 200-499) has sd 0.020 and |.| ≤ 0.074: 0.09 is 4.4 sd.)
    pairs, j, pop = screened_study(99)
    kept = j[~j.excluded]
    th = calibrate(pairs, kept, n_boot=60, seed=1, sentinel_limit=0.25).threat_models[
        "linf"].thresholds.set_index("target")
    truth = pop.true_threshold(0.5, "linf")
    assert th.loc[0.5, "low"] < th.loc[0.5, "bound"] < th.loc[0.5, "high"]
    assert abs(math.log(th.loc[0.5, "bound"] / truth)) < 0.09, (th, truth)
    with pytest.raises(ValueError, match="sentinel_limit"):
        calibrate(pairs, kept, n_boot=0, sentinel_limit=1.5)


def test_saturated_and_poor_fits_are_flagged_with_deviance_df_and_p():
    k = data(seed=4)
    sat = fit_psychometric(BOUNDS[:3], k[:3], N[:3], guess_rate=0.05)  # 3 levels, 3 params
    assert sat.df == 0 and not np.isfinite(sat.p_value)
    assert any(f.startswith("saturated") and "deviance" in f and "0 df" in f
               and "goodness-of-fit p n/a" in f for f in sat.flags)
    assert sat.to_dict()["flags"] == sat.flags
    ok = fit_psychometric(BOUNDS, k, N, guess_rate=0.05)
    assert ok.df == 2 and ok.flags == []
    # a non-monotone pattern no psychometric function fits
    bad = fit_psychometric(BOUNDS, [20, 180, 20, 180, 190], N, guess_rate=0.05)
    assert any(f.startswith("poor fit") and f"p {bad.p_value:.3g}" in f for f in bad.flags)
    pairs = study_pairs({"linf": [2, 4, 8], "l2": [300, 600, 1200, 2400, 4800]})
    pop = ObserverPopulation({"linf": (5.0, 2.5), "l2": (1000.0, 2.0)}, guess_rate=0.04,
                             lapse_rate=0.02)
    j = pop.simulate(pairs, n_participants=60, trials_per_participant=30,
                     rng=np.random.default_rng(5))
    cal = calibrate(pairs, j, n_boot=20)
    assert "linf" in cal.flags() and cal.flags()["linf"][0].startswith("saturated")
    table = cal.table()
    assert (table.loc[table.threat_model == "linf", "fit_flag"].str.startswith("saturated")).all()
    assert cal.to_dict()["flags"] == cal.flags()
    back = CalibrationResult.from_dict(json.loads(json.dumps(cal.to_dict(), allow_nan=False)))
    assert back.flags()["linf"] == cal.flags()["linf"]
