"""engine.analysis against independent oracles: scipy (binomtest, pearsonr, spearmanr, norm),
sklearn (roc_auc_score, average_precision_score), the krippendorff package on the raw
reliability matrix, the LPIPS repository's JND code (copied below), and bootstraps rebuilt by
concatenating resampled participants' rows with pandas."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from scipy.stats import binomtest
from sklearn.metrics import average_precision_score, roc_auc_score

from engine.analysis import (
    agreement,
    analyze,
    apply_exclusions,
    control_rates,
    distance_correlations,
    jnd_map,
    pair_prediction,
    pair_weights,
    participant_sensitivity,
    participant_weights,
    perceptibility_table,
    signal_detection,
    table4,
    weighted_average_precision,
    wilson_interval,
)


def make_study(seed=0, n_participants=12, per_pair=8):
    """Four L∞ conditions of increasing size, one L2 condition, sentinels and catch pairs;
    every judgment by one of ``n_participants`` people, some excluded, some simulated."""
    rng = np.random.default_rng(seed)
    pairs, judgments = [], []
    pid = 0
    spec = [("linf", 1.0, 0.1, 0.1), ("linf", 2.0, 0.2, 0.3), ("linf", 4.0, 0.4, 0.5),
            ("linf", 8.0, 0.8, 0.9), ("l2", 1.0, 0.3, 0.4)]
    for tm, bound, size, p_diff in spec:
        for _ in range(6):
            pairs.append({"pair": pid, "condition": f"{tm}:bound={bound}", "threat_model": tm,
                          "bound": bound, "label": "x", "is_sentinel": False, "is_catch": False,
                          "success": bool(rng.random() < 0.6),
                          "l2": size * rng.uniform(0.5, 1.5), "ssim": 1 - size / 2 * rng.random(),
                          "lpips_alexnet": size * rng.uniform(0.8, 1.2)})
            pp = np.clip(p_diff + (pairs[-1]["lpips_alexnet"] - size), 0, 1)
            for _ in range(per_pair):
                judgments.append({"pair": pid, "different": bool(rng.random() < pp)})
            pid += 1
    for kind, p in (("sentinel", 0.1), ("catch", 0.9)):
        for _ in range(5):
            pairs.append({"pair": pid, "condition": None, "threat_model": None, "bound": None,
                          "label": "", "is_sentinel": kind == "sentinel",
                          "is_catch": kind == "catch", "success": None,
                          "l2": 0.0 if kind == "sentinel" else 9.0,
                          "ssim": 1.0 if kind == "sentinel" else 0.1,
                          "lpips_alexnet": 0.0 if kind == "sentinel" else 0.9})
            for _ in range(per_pair):
                judgments.append({"pair": pid, "different": bool(rng.random() < p)})
            pid += 1
    j = pd.DataFrame(judgments)
    j["participant"] = [f"p{v:02d}" for v in rng.integers(0, n_participants, len(j))]
    j["session"] = j["participant"].str[1:].astype(int) + 100
    j["excluded"] = j["participant"].isin(["p00", "p01"])
    j["simulated"] = j["participant"].isin(["p01", "p02"])
    return pd.DataFrame(pairs), j


def naive_boot(judgments, stat, n_boot, seed):
    """Participant bootstrap the slow way: repeat each participant's rows W[b, i] times."""
    people = np.sort(judgments["participant"].unique())
    w = participant_weights(len(people), n_boot, seed).astype(int)
    by = {p: g for p, g in judgments.groupby("participant")}
    out = []
    for b in range(n_boot):
        frame = pd.concat([by[p] for p, c in zip(people, w[b], strict=True) for _ in range(c)])
        out.append(stat(frame))
    return np.percentile(out, [2.5, 97.5])


@pytest.mark.parametrize("k, n", [(0, 10), (3, 10), (10, 10), (47, 120)])
def test_wilson_interval_matches_scipy(k, n):
    expected = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    low, high = wilson_interval(k, n)
    assert low == pytest.approx(expected.low, abs=1e-6)
    assert high == pytest.approx(expected.high, abs=1e-6)


def test_exclusions_drop_and_count_exactly():
    _, j = make_study()
    kept, counts = apply_exclusions(j)
    assert not kept["participant"].isin(["p00", "p01", "p02"]).any()
    assert len(kept) == (~j["participant"].isin(["p00", "p01", "p02"])).sum()
    assert counts["judgments_dropped_simulated"] == j["simulated"].sum()
    assert counts["judgments_dropped_excluded"] == (j["excluded"] & ~j["simulated"]).sum()
    assert counts["judgments_kept"] + counts["judgments_dropped"] == len(j)
    assert counts["sessions_dropped_excluded"] == 1 and counts["sessions_dropped_simulated"] == 2
    kept2, counts2 = apply_exclusions(j, include_excluded=True)
    assert set(kept2["participant"]) == set(j["participant"]) - {"p01", "p02"}
    kept3, counts3 = apply_exclusions(j, include_excluded=True, include_simulated=True)
    assert len(kept3) == len(j) and counts3["judgments_dropped"] == 0


def test_perceptibility_counts_intervals_and_bootstrap():
    pairs, j = make_study()
    table = perceptibility_table(pairs, j, n_boot=60, seed=3)
    assert list(table["condition"]) == ["l2:bound=1.0"] + [
        f"linf:bound={b}" for b in (1.0, 2.0, 4.0, 8.0)] + ["sentinel", "catch"]
    merged = j.merge(pairs, on="pair")
    for _, row in table.iterrows():
        if row["condition"] in ("sentinel", "catch"):
            sub = merged[merged["is_sentinel"] if row["condition"] == "sentinel"
                         else merged["is_catch"]]
        else:
            sub = merged[merged["condition"] == row["condition"]]
        assert row["n_judgments"] == len(sub)
        assert row["perceptibility"] == pytest.approx(sub["different"].mean())
        ci = binomtest(int(sub["different"].sum()), len(sub)).proportion_ci(method="wilson")
        assert (row["ci_low"], row["ci_high"]) == pytest.approx((ci.low, ci.high), abs=1e-9)
    row = table[table["condition"] == "linf:bound=4.0"].iloc[0]
    sub_pairs = set(pairs.loc[pairs["condition"] == "linf:bound=4.0", "pair"])
    low, high = naive_boot(j, lambda f: f.loc[f["pair"].isin(sub_pairs), "different"].mean(),
                           60, 3)
    assert (row["boot_low"], row["boot_high"]) == pytest.approx((low, high), abs=1e-12)
    assert row["mean_l2"] == pytest.approx(
        pairs.loc[pairs["condition"] == "linf:bound=4.0", "l2"].mean())


def test_control_rates_match_counts():
    pairs, j = make_study()
    ctrl = control_rates(pairs, j, n_boot=20).set_index("control")
    merged = j.merge(pairs, on="pair")
    sentinel = merged[merged.is_sentinel].different
    assert ctrl.loc["sentinel", "rate"] == pytest.approx(sentinel.mean())
    assert ctrl.loc["catch", "rate"] == pytest.approx(merged[merged.is_catch].different.mean())
    assert ctrl.loc["sentinel", "statistic"] == "false_alarm_rate"


def test_signal_detection_matches_scipy_with_log_linear_correction():
    pairs, j = make_study()
    sdt = signal_detection(pairs, j, n_boot=40, seed=1).set_index("condition")
    merged = j.merge(pairs, on="pair")
    fa = merged[merged.is_sentinel].different
    f = (fa.sum() + 0.5) / (len(fa) + 1)
    for cond, row in sdt.iterrows():
        hits = merged[merged.condition == cond].different
        h = (hits.sum() + 0.5) / (len(hits) + 1)
        assert row["d_prime"] == pytest.approx(stats.norm.ppf(h) - stats.norm.ppf(f))
        assert row["criterion"] == pytest.approx(-(stats.norm.ppf(h) + stats.norm.ppf(f)) / 2)
    cond = "linf:bound=8.0"
    cpairs = set(pairs.loc[pairs.condition == cond, "pair"])
    spairs = set(pairs.loc[pairs.is_sentinel, "pair"])

    def dprime(frame):
        hh = frame[frame.pair.isin(cpairs)].different
        ff = frame[frame.pair.isin(spairs)].different
        return stats.norm.ppf((hh.sum() + 0.5) / (len(hh) + 1)) - stats.norm.ppf(
            (ff.sum() + 0.5) / (len(ff) + 1))

    low, high = naive_boot(j, dprime, 40, 1)
    assert (sdt.loc[cond, "d_prime_low"], sdt.loc[cond, "d_prime_high"]) == pytest.approx(
        (low, high), abs=1e-9)


def test_rates_of_zero_and_one_stay_finite():
    pairs, j = make_study()
    j = j.copy()
    sentinel = set(pairs.loc[pairs.is_sentinel, "pair"])
    j.loc[j.pair.isin(sentinel), "different"] = False
    j.loc[~j.pair.isin(sentinel), "different"] = True
    sdt = signal_detection(pairs, j, n_boot=10)
    assert np.isfinite(sdt["d_prime"]).all()


def test_distance_correlations_point_and_two_way_bootstrap():
    pairs, j = make_study(seed=4)
    corr = distance_correlations(pairs, j, n_boot=30, seed=2).set_index("distance")
    table = perceptibility_table(pairs, j, n_boot=0)
    conds = table[~table.condition.isin(["sentinel", "catch"])]
    for col in ("l2", "lpips_alexnet"):
        r, _ = stats.pearsonr(conds[f"mean_{col}"], conds["perceptibility"])
        rho, _ = stats.spearmanr(conds[f"mean_{col}"], conds["perceptibility"])
        assert corr.loc[col, "r"] == pytest.approx(r, abs=1e-12)
        assert corr.loc[col, "rho"] == pytest.approx(rho, abs=1e-12)
    # SSIM enters as 1 − SSIM, so its r is the negative of the raw similarity's
    r_raw, _ = stats.pearsonr(conds["mean_ssim"], conds["perceptibility"])
    assert corr.loc["ssim", "r"] == pytest.approx(-r_raw, abs=1e-12)
    assert corr.loc["l2", "n_conditions"] == 5

    # rebuild the bootstrap: resample participants (rows repeated) and pairs within condition
    people = np.sort(j.participant.unique())
    wp = participant_weights(len(people), 30, 2).astype(int)
    ctrl = pairs.is_sentinel | pairs.is_catch
    codes = pairs["condition"].where(~ctrl).map(
        {c: i for i, c in enumerate(conds["condition"])}).fillna(-1).astype(int).to_numpy()
    wq = pair_weights(codes, 30, 2).astype(int)
    rs = []
    for b in range(30):
        jj = pd.concat([j[j.participant == p] for p, c in zip(people, wp[b], strict=True)
                        for _ in range(c)])
        pp = pairs.loc[np.repeat(np.arange(len(pairs)), wq[b])]
        jj = jj.merge(pp[["pair"]], on="pair")  # each resampled copy of a pair repeats its rows
        x = pp.groupby("condition")["lpips_alexnet"].mean()
        y = jj.merge(pairs[["pair", "condition"]], on="pair").groupby("condition")[
            "different"].mean()
        rs.append(stats.pearsonr(x.loc[conds.condition], y.loc[conds.condition])[0])
    low, high = np.percentile(rs, [2.5, 97.5])
    assert (corr.loc["lpips_alexnet", "r_low"], corr.loc["lpips_alexnet", "r_high"]) == \
        pytest.approx((low, high), abs=1e-9)


def test_too_few_conditions_give_nan_correlations():
    pairs, j = make_study()
    first = set(pairs.loc[pairs.condition == "linf:bound=1.0", "pair"])
    corr = distance_correlations(pairs, j[j.pair.isin(first)], n_boot=10)
    assert corr["r"].isna().all() and corr["r_low"].isna().all()


def lpips_score_jnd(ds, sames):
    """lpips/trainer.py score_jnd_dataset + voc_ap, verbatim logic."""
    sorted_inds = np.argsort(ds)
    sames_sorted = sames[sorted_inds]
    tps = np.cumsum(sames_sorted)
    fps = np.cumsum(1 - sames_sorted)
    fns = np.sum(sames_sorted) - tps
    precs = tps / (tps + fps)
    recs = tps / (tps + fns)
    mrec = np.concatenate(([0.0], recs, [1.0]))
    mpre = np.concatenate(([0.0], precs, [0.0]))
    for i in range(mpre.size - 1, 0, -1):
        mpre[i - 1] = np.maximum(mpre[i - 1], mpre[i])
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1])


def test_pair_prediction_matches_sklearn_and_lpips():
    pairs, j = make_study(seed=5)
    pred = pair_prediction(pairs, j).set_index("distance")
    merged = j.merge(pairs, on="pair")
    main = merged[~(merged.is_sentinel | merged.is_catch)]
    for col in ("l2", "ssim", "lpips_alexnet"):
        score = main[col].to_numpy() if col != "ssim" else 1 - main[col].to_numpy()
        y = main["different"].to_numpy()
        assert pred.loc[col, "roc_auc"] == pytest.approx(roc_auc_score(y, score), abs=1e-12)
        assert pred.loc[col, "ap_different"] == pytest.approx(
            average_precision_score(y, score), abs=1e-12)
        per_pair = main.assign(s=score).groupby("pair").agg(d=("s", "first"),
                                                            diff=("different", "mean"))
        expected = lpips_score_jnd(per_pair["d"].to_numpy(), 1 - per_pair["diff"].to_numpy())
        assert pred.loc[col, "jnd_map"] == pytest.approx(expected, abs=1e-12)
    assert pred.loc["lpips_alexnet", "roc_auc"] > 0.6


def test_ap_and_jnd_map_with_tied_distances_do_not_depend_on_row_order():
    """Tied distances (L∞ takes few values): AP and JND mAP are the same for every row order;
    AP equals sklearn's tie-aware average_precision_score on the expanded judgments, JND mAP
    equals lpips.voc_ap on one precision/recall point per distinct distance, and without ties
    it is the authors' score_jnd_dataset number."""
    from lpips import voc_ap

    rng = np.random.default_rng(3)
    n = 300
    d = rng.integers(1, 9, n) / 255.0  # 8 distinct values: heavy ties
    n_j = rng.integers(3, 8, n).astype(float)
    k = rng.binomial(n_j.astype(int), np.clip(d * 255 / 10, 0.05, 0.95)).astype(float)
    same = (n_j - k) / n_j
    maps, aps, authors = set(), set(), set()
    for _ in range(20):
        o = rng.permutation(n)
        maps.add(round(jnd_map(d[o], same[o]), 12))
        aps.add(round(weighted_average_precision(d[o], k[o], n_j[o] - k[o]), 12))
        authors.add(round(float(lpips_score_jnd(d[o], same[o])), 12))
    assert len(maps) == 1 and len(aps) == 1
    assert len(authors) > 1  # the authors' value does move with the order: the test can fail
    y = np.r_[np.ones(int(k.sum())), np.zeros(int((n_j - k).sum()))]
    score = np.r_[np.repeat(d, k.astype(int)), np.repeat(d, (n_j - k).astype(int))]
    assert aps.pop() == pytest.approx(average_precision_score(y, score), abs=1e-12)
    uniq = np.unique(d)
    tp = np.array([same[d <= u].sum() for u in uniq])
    fp = np.array([(1 - same[d <= u]).sum() for u in uniq])
    expected = voc_ap(tp / same.sum(), tp / (tp + fp))
    assert maps.pop() == pytest.approx(expected, abs=1e-12)
    # the non-interpolated area of the same points is sklearn's AP of "same" by −distance
    w = np.r_[same, 1 - same]
    ap_same = average_precision_score(np.r_[np.ones(n), np.zeros(n)], np.r_[-d, -d],
                                      sample_weight=w)
    assert jnd_map(d, same) >= ap_same - 1e-12
    # no ties: exactly the authors' number
    d2 = d + rng.random(n) * 1e-6
    assert jnd_map(d2, same) == pytest.approx(lpips_score_jnd(d2, same), abs=1e-12)


def nominal_alpha(matrix):
    """Krippendorff's α for nominal data from a raters × units matrix (NaN = missing),
    via the coincidence matrix (Krippendorff 2011, section 3)."""
    values = np.unique(matrix[~np.isnan(matrix)])
    o = np.zeros((len(values), len(values)))
    for u in matrix.T:
        u = u[~np.isnan(u)]
        m = len(u)
        if m < 2:
            continue
        for a in range(m):
            for b in range(m):
                if a != b:
                    o[np.searchsorted(values, u[a]), np.searchsorted(values, u[b])] += 1 / (m - 1)
    n_c = o.sum(1)
    n = n_c.sum()
    d_o = (o.sum() - np.trace(o)) / n
    d_e = (n * n - (n_c ** 2).sum()) / (n * (n - 1))
    return 1 - d_o / d_e


def test_agreement_matches_coincidence_matrix_and_krippendorff_package():
    import krippendorff

    pairs, j = make_study(seed=6)
    j = j.drop_duplicates(["participant", "pair"])
    ag = agreement(pairs, j).set_index("condition")
    for cond in ("linf:bound=2.0", "l2:bound=1.0"):
        sub = j[j.pair.isin(pairs.loc[pairs.condition == cond, "pair"])]
        mat = sub.pivot(index="participant", columns="pair", values="different").astype(float)
        expected = nominal_alpha(mat.to_numpy())
        assert ag.loc[cond, "alpha"] == pytest.approx(expected, abs=1e-9)
        assert ag.loc[cond, "alpha"] == pytest.approx(krippendorff.alpha(
            reliability_data=mat.to_numpy(), level_of_measurement="nominal"), abs=1e-9)


def test_participant_sensitivity():
    pairs, j = make_study()
    ps = participant_sensitivity(pairs, j).set_index("participant")
    merged = j.merge(pairs, on="pair")
    sub = merged[merged.participant == "p05"]
    adv = sub[~(sub.is_sentinel | sub.is_catch)].different
    sen = sub[sub.is_sentinel].different
    assert ps.loc["p05", "n_judgments"] == len(sub)
    assert ps.loc["p05", "hit_rate"] == pytest.approx(adv.mean())
    h = (adv.sum() + 0.5) / (len(adv) + 1)
    f = (sen.sum() + 0.5) / (len(sen) + 1)
    assert ps.loc["p05", "d_prime"] == pytest.approx(stats.norm.ppf(h) - stats.norm.ppf(f))


def test_table4_pairs_strength_and_evaluation_strength():
    pairs, j = make_study()
    t4 = table4(pairs, j, n_boot=10).set_index(["threat_model", "bound"])
    sub = pairs[(pairs.threat_model == "linf") & (pairs.bound == 4.0)]
    assert t4.loc[("linf", 4.0), "strength"] == pytest.approx(sub.success.astype(float).mean())
    merged = j.merge(sub, on="pair")
    assert t4.loc[("linf", 4.0), "perceptibility"] == pytest.approx(merged.different.mean())
    ev = pd.DataFrame({"threat_model": ["linf", "l2"], "bound": [4.0, 1.0],
                       "accuracy": [0.3, np.nan], "success_rate": [np.nan, 0.8]})
    t4e = table4(pairs, j, strength=ev, n_boot=10).set_index(["threat_model", "bound"])
    assert t4e.loc[("linf", 4.0), "strength"] == pytest.approx(0.7)
    assert t4e.loc[("l2", 1.0), "strength"] == pytest.approx(0.8)
    assert t4e.loc[("l2", 1.0), "strength_source"] == "evaluation"
    assert t4e.loc[("linf", 2.0), "strength_source"] == "pairs"


def test_analyze_report_applies_exclusions_and_serialises():
    pairs, j = make_study()
    report = analyze(pairs, j, n_boot=20)
    kept, _ = apply_exclusions(j)
    direct = perceptibility_table(pairs, kept, n_boot=20)
    pd.testing.assert_frame_equal(report.perceptibility, direct)
    assert report.exclusions["judgments_dropped"] == len(j) - len(kept)
    payload = report.to_json()
    text = json.dumps(payload, allow_nan=False)
    assert "NaN" not in text
    assert set(payload) >= {"meta", "exclusions", "perceptibility", "controls",
                            "signal_detection", "correlations", "pair_prediction", "agreement",
                            "participants", "table4"}
    assert set(report.tables()) >= set(payload) - {"meta", "exclusions"}
    with_sim = analyze(pairs, j, n_boot=20, include_simulated=True, include_excluded=True)
    assert with_sim.meta["n_judgments"] == len(j)


def test_unjudged_conditions_are_nan():
    pairs, j = make_study()
    first = set(pairs.loc[pairs.condition == "linf:bound=1.0", "pair"])
    table = perceptibility_table(pairs, j[j.pair.isin(first)], n_boot=5)
    assert table["perceptibility"].isna().sum() == 6
    assert math.isnan(table.set_index("condition").loc["sentinel", "boot_low"])


@pytest.mark.parametrize("mutate, message", [
    (lambda p, j: (p.drop(columns=["bound"]), j), "bound"),
    (lambda p, j: (p.iloc[:0], j), "empty"),
    (lambda p, j: (p.assign(bound=p.bound.fillna(1) * -1), j), "negative"),
    (lambda p, j: (p, j.drop(columns=["different"])), "different"),
    (lambda p, j: (p, pd.concat([j, j.iloc[:1].assign(pair=10**6)])), "not in the pairs"),
])
def test_bad_input_is_a_clear_value_error(mutate, message):
    pairs, j = make_study()
    p2, j2 = mutate(pairs, j)
    with pytest.raises(ValueError, match=message):
        perceptibility_table(p2, j2, n_boot=0)


def test_legacy_table_form_of_distance_correlations_still_works():
    pairs, j = make_study(seed=1)
    table = perceptibility_table(pairs, j, n_boot=0)
    corr = distance_correlations(table).set_index("distance")
    conds = table[~table.condition.isin(["sentinel", "catch"])]
    expected = np.corrcoef(conds["mean_l2"], conds["perceptibility"])[0, 1]
    assert corr.loc["l2", "r"] == pytest.approx(expected, abs=1e-12)
    assert list(corr.columns) == ["r", "p_value", "n_conditions"]
    with pytest.raises(ValueError, match="judgments"):
        distance_correlations(pairs)


def test_wilson_sample_size_is_the_smallest_n_of_an_independent_width_formula():
    from engine.analysis import wilson_sample_size

    z = 1.959963984540054  # scipy.stats.norm.ppf(0.975)

    def width(k, n):  # Wilson (1927) full width, written out independently
        p = k / n
        return 2 * z * np.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / (1 + z**2 / n)

    for p, w in ((0.5, 0.1), (0.1, 0.05), (0.0, 0.2), (0.97, 0.08), (0.5, 0.3)):
        ns = np.arange(1, 5000)
        ref = int(ns[width(np.round(p * ns), ns) <= w][0])
        assert wilson_sample_size(p, w) == ref, (p, w)
    assert wilson_sample_size(0.5, 0.1) == 381  # ≈ (2·1.96)²·0.25/0.1² − z² = 384.2 − 3.8
    with pytest.raises(ValueError):
        wilson_sample_size(0.5, 1.5)


def test_wilson_bounds_contain_the_proportion_exactly_at_0_and_n():
    from engine.analysis import _wilson_arrays

    for n in range(1, 60):
        for k in (0, n):
            low, high = wilson_interval(k, n)
            assert 0.0 <= low <= k / n <= high <= 1.0, (k, n, low, high)
        lows, highs = _wilson_arrays(np.array([0.0, n]), np.array([n, n], float))
        assert lows[0] == 0.0 and highs[1] == 1.0
        assert np.all(lows <= np.array([0.0, 1.0])) and np.all(highs >= np.array([0.0, 1.0]))


def test_analyze_draws_bootstrap_weights_once_with_the_same_draws():
    """analyze shares one draw of participant weights between its tables: the tables equal
    the stand-alone functions, each of which draws its own with the same seed."""
    from engine.analysis import SharedWeights, bootstrap_products

    pairs, j = make_study(seed=7)
    kept, _ = apply_exclusions(j)
    report = analyze(pairs, j, n_boot=150, seed=3)
    pd.testing.assert_frame_equal(report.table4, table4(pairs, kept, n_boot=150, seed=3))
    pd.testing.assert_frame_equal(report.correlations,
                                  distance_correlations(pairs, kept, n_boot=150, seed=3))
    pd.testing.assert_frame_equal(report.perceptibility,
                                  perceptibility_table(pairs, kept, n_boot=150, seed=3))
    shared = SharedWeights(12, 300, 5)
    np.testing.assert_array_equal(np.concatenate(list(shared.chunks())),
                                  participant_weights(12, 300, 5))
    m = np.arange(24.0).reshape(12, 2)
    np.testing.assert_array_equal(bootstrap_products(12, 300, 5, m, weights=shared)[0],
                                  participant_weights(12, 300, 5) @ m)
    with pytest.raises(ValueError, match="shared weights drawn for"):
        bootstrap_products(12, 300, 6, m, weights=shared)
