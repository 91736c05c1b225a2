"""engine.analysis against independent oracles (scipy's binomtest intervals, numpy corrcoef)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import binomtest

from engine.analysis import distance_correlations, perceptibility_table, wilson_interval


def make_study(rng):
    pairs, judgments = [], []
    pid = 0
    # four conditions with increasing size and increasing chance of "different"
    for c, (size, p_diff) in enumerate([(0.1, 0.1), (0.2, 0.3), (0.4, 0.5), (0.8, 0.9)]):
        for _ in range(5):
            pairs.append(
                {
                    "pair": pid,
                    "condition": f"linf:bound={c}",
                    "threat_model": "linf",
                    "bound": float(c),
                    "is_sentinel": False,
                    "l2": size * rng.uniform(0.9, 1.1),
                    "ssim": 1 - size / 2,
                }
            )
            judgments += [{"pair": pid, "different": rng.random() < p_diff} for _ in range(8)]
            pid += 1
    for _ in range(4):
        pairs.append(
            {
                "pair": pid,
                "condition": None,
                "threat_model": None,
                "bound": None,
                "is_sentinel": True,
                "l2": 0.0,
                "ssim": 1.0,
            }
        )
        judgments += [{"pair": pid, "different": d} for d in (False, False, False, True)]
        pid += 1
    return pd.DataFrame(pairs), pd.DataFrame(judgments)


@pytest.mark.parametrize("k, n", [(0, 10), (3, 10), (10, 10), (47, 120)])
def test_wilson_interval_matches_scipy(k, n):
    expected = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    low, high = wilson_interval(k, n)
    assert low == pytest.approx(expected.low, abs=1e-6)
    assert high == pytest.approx(expected.high, abs=1e-6)


def test_perceptibility_and_false_alarms_count_judgments():
    pairs, judgments = make_study(np.random.default_rng(0))
    table = perceptibility_table(pairs, judgments)
    assert list(table["condition"]) == [f"linf:bound={c}" for c in range(4)] + ["sentinel"]
    merged = judgments.merge(pairs, on="pair")
    for _, row in table.iterrows():
        if row["condition"] == "sentinel":
            sub = merged[merged["is_sentinel"]]
        else:
            sub = merged[merged["condition"] == row["condition"]]
        assert row["n_judgments"] == len(sub)
        assert row["perceptibility"] == pytest.approx(sub["different"].mean())
        assert row["ci_low"] <= row["perceptibility"] <= row["ci_high"]
    assert table.iloc[-1]["perceptibility"] == pytest.approx(0.25)
    assert table.iloc[0]["mean_l2"] == pytest.approx(
        pairs[pairs["condition"] == "linf:bound=0"]["l2"].mean()
    )


def test_correlations_match_numpy_and_skip_sentinels():
    pairs, judgments = make_study(np.random.default_rng(1))
    table = perceptibility_table(pairs, judgments)
    corr = distance_correlations(table).set_index("distance")
    conds = table[table["condition"] != "sentinel"]
    expected = np.corrcoef(conds["mean_l2"], conds["perceptibility"])[0, 1]
    assert corr.loc["l2", "r"] == pytest.approx(expected, abs=1e-12)
    assert corr.loc["l2", "n_conditions"] == 4
    assert corr.loc["l2", "r"] > 0.8 and corr.loc["ssim", "r"] < -0.8


def test_unjudged_conditions_have_nan_and_too_few_give_nan_r():
    pairs, judgments = make_study(np.random.default_rng(2))
    judgments = judgments[judgments["pair"] < 5]  # only the first condition judged
    table = perceptibility_table(pairs, judgments)
    assert table["perceptibility"].isna().sum() == 4  # three conditions and the sentinels
    assert distance_correlations(table)["r"].isna().all()


def test_catch_pairs_get_their_own_row_and_stay_out_of_correlations():
    pairs, judgments = make_study(np.random.default_rng(3))
    pairs["is_catch"] = False
    catch_id = pairs["pair"].max() + 1
    pairs.loc[len(pairs)] = {"pair": catch_id, "condition": None, "threat_model": None,
                             "bound": None, "is_sentinel": False, "is_catch": True,
                             "l2": 50.0, "ssim": 0.1}
    extra = pd.DataFrame({"pair": [catch_id] * 5, "different": [True, True, True, True, False]})
    table = perceptibility_table(pairs, pd.concat([judgments, extra], ignore_index=True))
    assert list(table["condition"])[-2:] == ["sentinel", "catch"]
    assert table.iloc[-1]["perceptibility"] == pytest.approx(0.8)
    corr = distance_correlations(table).set_index("distance")
    assert corr.loc["l2", "n_conditions"] == 4  # the far-away catch pair is not a condition
