"""Analysis of JND judgments: perceptibility per condition, sentinel false alarms, and how well
each distance predicts people (the PAT paper's Fig. 4c in miniature).

Inputs are plain DataFrames so this runs without Django:

- ``pairs``: one row per pair with ``pair``, ``condition`` (None for sentinels),
  ``threat_model``, ``bound``, ``is_sentinel`` and one column per distance (``l2``, ``linf``,
  ``ssim``, ``lpips_alexnet`` …).
- ``judgments``: one row per judgment with ``pair`` and ``different`` (bool: the participant
  said "different").

*Perceptibility* of a condition is the fraction of its judgments answered "different"; the
*sentinel false-alarm rate* is the same fraction over sentinel (identical) pairs and the
*catch hit rate* over catch pairs (two different photographs; optional ``is_catch`` column).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats

SENTINEL = "sentinel"
CATCH = "catch"
CONTROLS = (SENTINEL, CATCH)
NON_DISTANCE_COLUMNS = {
    "pair",
    "condition",
    "threat_model",
    "bound",
    "label",
    "is_sentinel",
    "is_catch",
}


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95 % Wilson score interval for a proportion (NaNs when ``n`` is 0)."""
    if n == 0:
        return (math.nan, math.nan)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (centre - half, centre + half)


def distance_columns(pairs: pd.DataFrame) -> list[str]:
    """The columns of ``pairs`` that hold distances."""
    return [c for c in pairs.columns if c not in NON_DISTANCE_COLUMNS]


def perceptibility_table(pairs: pd.DataFrame, judgments: pd.DataFrame) -> pd.DataFrame:
    """One row per condition plus a ``sentinel`` row.

    Columns: ``condition, threat_model, bound, label, n_pairs, n_judgments, n_different,
    perceptibility, ci_low, ci_high`` and ``mean_<distance>`` (mean over the condition's pairs,
    judged or not). Conditions without judgments have NaN perceptibility.
    """
    pairs = pairs.copy()
    pairs["condition"] = pairs["condition"].where(~pairs["is_sentinel"], SENTINEL)
    if "is_catch" in pairs:
        pairs["condition"] = pairs["condition"].where(~pairs["is_catch"].astype(bool), CATCH)
    merged = judgments.merge(pairs[["pair", "condition"]], on="pair", how="inner")
    rows = []
    dist_cols = distance_columns(pairs)
    for condition, group in pairs.groupby("condition", sort=False):
        judged = merged[merged["condition"] == condition]
        n, k = len(judged), int(judged["different"].sum())
        low, high = wilson_interval(k, n)
        first = group.iloc[0]
        rows.append(
            {
                "condition": condition,
                "threat_model": condition if condition in CONTROLS else first["threat_model"],
                "bound": np.nan if condition in CONTROLS else first["bound"],
                "label": first.get("label", "") or "",
                "n_pairs": len(group),
                "n_judgments": n,
                "n_different": k,
                "perceptibility": k / n if n else np.nan,
                "ci_low": low,
                "ci_high": high,
                **{f"mean_{c}": group[c].astype(float).mean() for c in dist_cols},
            }
        )
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    is_control = table["condition"].isin(CONTROLS)
    controls = table[is_control].sort_values("condition", key=lambda c: c.map(CONTROLS.index))
    return pd.concat(
        [table[~is_control].sort_values(["threat_model", "bound"]), controls]
    ).reset_index(drop=True)


def distance_correlations(table: pd.DataFrame) -> pd.DataFrame:
    """Pearson r across conditions between each mean distance and perceptibility.

    Sentinels and unjudged conditions are left out. SSIM is a similarity, so a good SSIM
    has a negative r. Rows: ``distance, r, p_value, n_conditions`` (NaN when fewer than 3).
    """
    judged = table[~table["condition"].isin(CONTROLS) & table["perceptibility"].notna()]
    rows = []
    for col in [c for c in table.columns if c.startswith("mean_")]:
        x = judged[col].astype(float)
        y = judged["perceptibility"].astype(float)
        ok = x.notna() & y.notna()
        n = int(ok.sum())
        if n >= 3 and x[ok].std() > 0 and y[ok].std() > 0:
            r, p = stats.pearsonr(x[ok], y[ok])
        else:
            r, p = math.nan, math.nan
        rows.append(
            {
                "distance": col.removeprefix("mean_"),
                "r": float(r),
                "p_value": float(p),
                "n_conditions": n,
            }
        )
    return pd.DataFrame(rows, columns=["distance", "r", "p_value", "n_conditions"])
