"""Analysis of the protocols beyond JND (issue 18): 2AFC triplets, ratings and label
annotation — pandas/numpy/scipy in, DataFrames out, no Django.

Row formats (one row per main-trial judgment; PROTOCOLS.md "Engine analysis row formats")
----------------------------------------------------------------------------------------
- **2AFC**: ``participant`` (str), ``item`` (str key of the triplet), ``chose_b`` (bool: the
  participant chose B as more like the reference), ``condition_a``, ``condition_b`` (spec
  strings; ``condition_a`` is None on controls), ``is_control`` (bool: A is identical to the
  reference) and per distance NAME the columns ``a_NAME`` (reference↔A) and ``b_NAME``
  (reference↔B). Larger = more different; similarities (``ssim``) are used as ``1 − x``
  (:data:`engine.analysis.SIMILARITY_COLUMNS`).
- **Rating**: ``participant``, ``item``, ``rating`` (int 1..N), ``condition``, ``is_control``
  (identical-pair anchor), ``is_repeat`` (bool: the retest of an item this participant rated
  earlier), per distance ``d_NAME``.
- **Label**: ``participant``, ``item``, ``response`` (str), ``true_label`` (str),
  ``threat_model``, ``bound`` (float, 0 for gold/clean), ``is_gold`` (bool), ``level``
  (int or NaN).

Optional in every format: ``excluded`` / ``simulated`` / ``session`` (dropped by
:func:`analyze_protocol` through :func:`engine.analysis.apply_exclusions`).

Intervals: Wilson 95 % for proportions, Student-t 95 % for means, and the participant
bootstrap of :mod:`engine.analysis` (replicate ``b`` weights participant ``i`` by
``W[b, i] ~ Multinomial(P, 1/P)``, drawn by :func:`engine.analysis.participant_weights`
from ``seed``; every per-participant count or sum is multiplied by it) with 95 % percentile
intervals (basic intervals where noted; the probit choice slope: the bootstrap SE with a
``t_{P−1}`` quantile, :func:`_bootstrap_se_interval`). Items are not resampled: the intervals
describe the sampling of people.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import sparse, stats

from engine.analysis import (
    SIMILARITY_COLUMNS,
    _json_safe,
    _percentile_interval,
    _quiet,
    _rowwise_pearson,
    _wilson_arrays,
    apply_exclusions,
    bootstrap_products,
    frame_records,
    nominal_alpha_from_counts,
    participant_weight_chunks,
)

PROTOCOLS = ("2afc", "rating", "label")
TWOAFC_COLUMNS = ("participant", "item", "chose_b", "condition_a", "condition_b", "is_control")
RATING_COLUMNS = ("participant", "item", "rating", "condition", "is_control", "is_repeat")
LABEL_COLUMNS = ("participant", "item", "response", "true_label", "threat_model", "bound",
                 "is_gold", "level")
#: the label given to the control/gold groups in tables
CONTROL = "control"
GOLD = "gold"
POOLED = "(pooled)"


# ----------------------------------------------------------------------------- helpers
def _require(rows: pd.DataFrame, columns, what: str, not_null=("participant", "item")) -> None:
    if not isinstance(rows, pd.DataFrame):
        raise ValueError(f"{what} rows must be a pandas DataFrame, got {type(rows).__name__}")
    missing = [c for c in columns if c not in rows.columns]
    if missing:
        raise ValueError(f"{what} rows are missing column(s) {missing}; expected "
                         f"{list(columns)} (engine.protocol_analysis docstring)")
    for c in not_null:
        if c in rows and rows[c].isna().any():
            raise ValueError(f"{what} rows: column {c!r} has missing values")


def _flag(rows: pd.DataFrame, column: str) -> np.ndarray:
    if column not in rows:
        return np.zeros(len(rows), bool)
    return rows[column].fillna(False).astype(bool).to_numpy()


def _codes(values) -> tuple[np.ndarray, np.ndarray]:
    """``(code per value, labels)``: labels as text, sorted; where every label is a whole
    number (database ids as text: studyapp.protocol_rows) sorted as numbers, so that the
    participant bootstrap, whose weights go to participants in this order, draws the same
    replicates whatever ids a database gave them (as text, ids 8..11 sort as "10", "11",
    "8", "9" and 98..101 otherwise: a seeded interval depended on the ids)."""
    text = pd.Series(values).astype(str)
    labels = pd.unique(text)
    if len(labels) and all(v.isascii() and v.isdigit() for v in labels):
        labels = np.asarray(sorted(labels, key=lambda v: (int(v), v)), object)
    else:
        labels = np.asarray(sorted(labels), object)
    codes = pd.Index(labels).get_indexer(text)
    return np.asarray(codes, np.int64), labels


def _matrix(row_codes, col_codes, n_rows, n_cols, weights=None) -> np.ndarray:
    """``(n_rows, n_cols)`` sums of ``weights`` (counts when None) per code pair."""
    flat = np.asarray(row_codes, np.int64) * n_cols + np.asarray(col_codes, np.int64)
    return np.bincount(flat, weights=weights, minlength=n_rows * n_cols).reshape(
        n_rows, n_cols).astype(float)


def _transform(name: str) -> str:
    return "1-x" if name in SIMILARITY_COLUMNS else "x"


def _as_distance(name: str, values) -> np.ndarray:
    x = pd.to_numeric(pd.Series(values), errors="coerce").to_numpy(float)
    return 1.0 - x if name in SIMILARITY_COLUMNS else x


def _item_values(rows: pd.DataFrame, item_codes: np.ndarray, n_items: int, column: str
                 ) -> np.ndarray:
    """Per-item value of a per-item column repeated on every row (NaN when absent); a clear
    error when an item's rows disagree."""
    v = pd.to_numeric(rows[column], errors="coerce").to_numpy(float)
    out = np.full(n_items, np.nan)
    ok = ~np.isnan(v)
    lo = np.full(n_items, np.inf)
    hi = np.full(n_items, -np.inf)
    np.minimum.at(lo, item_codes[ok], v[ok])
    np.maximum.at(hi, item_codes[ok], v[ok])
    seen = np.isfinite(lo)
    bad = seen & (hi - lo > 1e-9 * np.maximum(1.0, np.abs(hi)))
    if bad.any():
        raise ValueError(f"column {column!r} differs between rows of the same item "
                         f"({int(bad.sum())} items); a distance belongs to the item")
    out[seen] = lo[seen]
    return out


def _boot_sums(part, col, n_part: int, n_cols: int, n_boot: int, seed: int, *values):
    """Participant-bootstrap replicate sums per column, a chunk of replicates at a time.

    For each entry of ``values`` (per-row weights; None = counts) yields the
    ``(chunk, n_cols)`` array ``W_chunk @ M`` with ``M`` the sparse participant × column sum
    of that value — the draws of :func:`engine.analysis.participant_weights` (same seed, same
    order), without a dense participants × items matrix (a 150k-triplet study stays small).
    """
    mats = []
    for v in values:
        data = np.ones(len(part)) if v is None else np.asarray(v, float)
        mats.append(sparse.csr_matrix((data, (np.asarray(col), np.asarray(part))),
                                      shape=(n_cols, n_part)))
    if n_boot == 0:
        return
    from tqdm.auto import tqdm

    # a progress bar only for big studies (about a second or more of work)
    bar = tqdm(total=n_boot, desc="bootstrap", unit="replicate",
               disable=n_boot * max(len(part), n_cols) < 20_000_000)
    for w in participant_weight_chunks(n_part, n_boot, seed):
        yield [np.asarray(m @ w.T).T for m in mats]
        bar.update(len(w))
    bar.close()


def _stack(chunks: list, width: int) -> np.ndarray:
    return np.concatenate(chunks) if chunks else np.zeros((0, width))


def _t_interval(mean, sd, n):
    """Student-t 95 % interval ``mean ± t_{0.975, n−1} · sd / √n`` (NaN for n < 2)."""
    mean, sd, n = (np.asarray(a, float) for a in (mean, sd, n))
    with np.errstate(invalid="ignore", divide="ignore"):
        half = stats.t.ppf(0.975, n - 1) * sd / np.sqrt(n)
    half = np.where(n >= 2, half, np.nan)
    return mean - half, mean + half


def _basic_interval(estimate: float, replicates: np.ndarray, low: float = -math.inf,
                    high: float = math.inf) -> tuple[float, float]:
    """Basic (reverse-percentile) bootstrap 95 % interval ``[2θ̂ − q₉₇.₅, 2θ̂ − q₂.₅]``,
    clipped to ``[low, high]`` (Davison & Hinkley 1997, eq. 5.6).

    Used for statistics that are *nonlinear* in the per-item rates or means (correlations
    with MOS, the p² + (1 − p)² ceiling): a participant-bootstrap replicate's item means
    carry the sampling noise twice (the data's and the resampling's), so its correlations are
    attenuated (and its ceiling inflated) relative to the estimate by about as much as the
    estimate is relative to the noise-free value; the basic interval removes that bias (the
    percentile interval would double it). It therefore brackets the noise-free value and can
    exclude a point estimate that is itself biased."""
    q_lo, q_hi = _percentile_interval(np.asarray(replicates, float))
    if not (math.isfinite(estimate) and np.isfinite(q_lo) and np.isfinite(q_hi)):
        return math.nan, math.nan
    return (float(np.clip(2 * estimate - q_hi, low, high)),
            float(np.clip(2 * estimate - q_lo, low, high)))


def _rowwise_corr(x: np.ndarray, yb: np.ndarray, kind: str) -> np.ndarray:
    """Correlation of the fixed vector ``x`` (I,) with every row of ``yb`` (B, I), NaN cells
    of a row left out (NaN if fewer than 3 remain or a side is constant). ``kind``:
    ``pearson``, ``spearman`` (Pearson on ranks, average ties) or ``kendall`` (scipy's
    tau-b, one call per replicate)."""
    b = yb.shape[0]
    out = np.full(b, np.nan)
    if b == 0:
        return out
    full = ~np.isnan(yb).any(1)
    if kind in ("pearson", "spearman") and full.any():
        xx = np.broadcast_to(x, (int(full.sum()), len(x)))
        yy = yb[full]
        if kind == "spearman":
            xx, yy = stats.rankdata(xx, axis=1), stats.rankdata(yy, axis=1)
        out[full] = _rowwise_pearson(np.asarray(xx, float), np.asarray(yy, float))
    rest = np.flatnonzero(~full) if kind != "kendall" else np.arange(b)
    for r in rest:
        ok = ~np.isnan(yb[r])
        out[r] = _corr(x[ok], yb[r, ok], kind)[0]
    return out


def _corr(x: np.ndarray, y: np.ndarray, kind: str) -> tuple[float, float]:
    """scipy's correlation and p-value (NaN with < 3 points or a constant side)."""
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan, math.nan
    fn = {"pearson": stats.pearsonr, "spearman": stats.spearmanr,
          "kendall": stats.kendalltau}[kind]
    res = fn(x, y)
    return float(res[0]), float(res[1])


# ================================================================================== 2AFC
def twoafc_distance_names(rows: pd.DataFrame) -> list[str]:
    """Distance names with both an ``a_NAME`` and a ``b_NAME`` column in 2AFC rows."""
    return [c[2:] for c in rows.columns
            if c.startswith("a_") and len(c) > 2 and f"b_{c[2:]}" in rows.columns]


@dataclass
class _TwoAFC:
    """Integer-coded 2AFC judgments: participants × items counts of "chose B"."""

    items: pd.DataFrame  # item, condition_a, condition_b, is_control (one row per item)
    part: np.ndarray  # participant code per row
    item: np.ndarray  # item code per row
    chose_b: np.ndarray  # 0/1 per row
    participants: np.ndarray
    rows: pd.DataFrame

    @property
    def n_participants(self) -> int:
        return len(self.participants)

    def distances(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Per-item reference↔A and reference↔B distances (``1 − x`` for similarities)."""
        n = len(self.items)
        da = _item_values(self.rows, self.item, n, f"a_{name}")
        db = _item_values(self.rows, self.item, n, f"b_{name}")
        if name in SIMILARITY_COLUMNS:
            da, db = 1.0 - da, 1.0 - db
        return da, db


def _ctrl(include_controls: bool) -> str:
    return "include" if include_controls else "exclude"


def _twoafc(rows: pd.DataFrame, *, controls: str = "exclude") -> _TwoAFC:
    """``controls``: ``"exclude"`` (main triplets only), ``"include"`` or ``"only"``."""
    _require(rows, TWOAFC_COLUMNS, "2AFC")
    if rows["chose_b"].isna().any():
        raise ValueError("2AFC rows: chose_b has missing values")
    ctrl = _flag(rows, "is_control")
    keep = {"exclude": ~ctrl, "include": np.ones(len(rows), bool), "only": ctrl}[controls]
    rows = rows.loc[keep].reset_index(drop=True)
    part, participants = _codes(rows["participant"])
    item, items = _codes(rows["item"])
    first = rows.groupby(item, sort=True).first()
    info = pd.DataFrame({
        "item": items,
        "condition_a": first["condition_a"].to_numpy() if len(rows) else [],
        "condition_b": first["condition_b"].to_numpy() if len(rows) else [],
        "is_control": first["is_control"].fillna(False).astype(bool).to_numpy()
        if len(rows) else [],
    })
    return _TwoAFC(items=info, part=part, item=item,
                   chose_b=rows["chose_b"].astype(bool).to_numpy().astype(float),
                   participants=participants, rows=rows)


def twoafc_choice_rates(rows: pd.DataFrame, *, include_controls: bool = False,
                        n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Human choice rate of B per (condition_a, condition_b), each ordered pair its own row.

    ``p_chose_b = n_chose_b / n_judgments`` with the Wilson 95 % interval (``ci_*``) and the
    participant-bootstrap 95 % interval (``boot_*``). With ``include_controls`` a last row
    ``kind = "control"`` (condition_a ``"control"``) gives the control triplets' rate of
    choosing B — the side that is *not* identical to the reference, i.e. the control error
    rate.

    Columns: ``kind, condition_a, condition_b, n_items, n_participants, n_judgments,
    n_chose_b, p_chose_b, ci_low, ci_high, boot_low, boot_high``.
    """
    data = _twoafc(rows, controls="include" if include_controls else "exclude")
    items = data.items
    key_a = np.where(items["is_control"], CONTROL, items["condition_a"].astype(str))
    key_b = np.where(items["is_control"], CONTROL, items["condition_b"].astype(str))
    cells = pd.DataFrame({"kind": np.where(items["is_control"], "control", "main"),
                          "condition_a": key_a, "condition_b": key_b})
    cells.loc[cells["kind"] == "control", "condition_b"] = CONTROL
    cell_code, cell_keys = pd.factorize(pd.MultiIndex.from_frame(cells), sort=True)
    jcell = np.asarray(cell_code)[data.item]
    kc = _matrix(data.part, jcell, data.n_participants, len(cell_keys), data.chose_b)
    nc = _matrix(data.part, jcell, data.n_participants, len(cell_keys))
    kt, nt = kc.sum(0), nc.sum(0)
    kb, nb = bootstrap_products(data.n_participants, n_boot, seed, kc, nc)
    with np.errstate(invalid="ignore", divide="ignore"):
        blow, bhigh = _percentile_interval(kb / nb)
        rate = kt / nt
    low, high = _wilson_arrays(kt, nt)
    out = pd.DataFrame(list(cell_keys), columns=["kind", "condition_a", "condition_b"])
    out["n_items"] = np.bincount(cell_code, minlength=len(cell_keys))
    out["n_participants"] = (nc > 0).sum(0)
    out["n_judgments"] = nt.astype(int)
    out["n_chose_b"] = kt.astype(int)
    out["p_chose_b"] = rate
    out["ci_low"], out["ci_high"] = low, high
    out["boot_low"], out["boot_high"] = blow, bhigh
    out["_c"] = out["kind"] == "control"
    return out.sort_values(["_c", "condition_a", "condition_b"]).drop(columns="_c").reset_index(
        drop=True)


def bapps_item_scores(d_a, d_b, p_chose_b) -> np.ndarray:
    """BAPPS 2AFC score of one metric per triplet (Zhang et al. 2018; the authors'
    ``score_2afc_dataset``): the share of people agreeing with the metric, i.e.
    ``1 − p`` when the metric puts A closer (``d_a < d_b``), ``p`` when it puts B closer and
    ``0.5`` on a tie, with ``p`` the share choosing B."""
    d_a, d_b, p = (np.asarray(a, float) for a in (d_a, d_b, p_chose_b))
    return (d_a < d_b) * (1.0 - p) + (d_b < d_a) * p + (d_a == d_b) * 0.5


def _score_parts(d_a, d_b):
    """``score = c + s · p`` per item (see :func:`bapps_item_scores`)."""
    c = np.where(d_a < d_b, 1.0, np.where(d_b < d_a, 0.0, 0.5))
    s = np.where(d_a < d_b, -1.0, np.where(d_b < d_a, 1.0, 0.0))
    return c, s


@dataclass
class _TwoAFCBoot:
    """Point shares per triplet and the bootstrap replicates of every 2AFC statistic."""

    p: np.ndarray  # share choosing B per item
    kt: np.ndarray
    nt: np.ndarray
    parts: dict  # distance → (ok, c, s, d_a, d_b)
    scores: dict  # distance → (B,) replicate scores
    ceiling: np.ndarray  # (B,) replicate BAPPS ceilings


def _twoafc_names(data: _TwoAFC, distances) -> list[str]:
    names = twoafc_distance_names(data.rows) if distances is None else list(distances)
    for name in names:
        if f"a_{name}" not in data.rows or f"b_{name}" not in data.rows:
            raise ValueError(f"2AFC rows have no a_{name}/b_{name} columns (have "
                             f"{twoafc_distance_names(data.rows)})")
    return names


def _twoafc_boot(data: _TwoAFC, n_boot: int, seed: int, names=()) -> _TwoAFCBoot:
    """One pass over the bootstrap chunks computing every replicate statistic (each
    replicate's triplet shares are reduced at once; only ``(chunk × items)`` is held)."""
    i = len(data.items)
    kt = np.bincount(data.item, weights=data.chose_b, minlength=i)
    nt = np.bincount(data.item, minlength=i).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = kt / nt
    parts = {}
    for name in names:
        da, db = data.distances(name)
        c, s = _score_parts(da, db)
        parts[name] = (~np.isnan(da) & ~np.isnan(db), c, s, da, db)
    score_b = {name: [] for name in names}
    ceil_b = []
    for kb, nb in _boot_sums(data.part, data.item, data.n_participants, i, n_boot, seed,
                             data.chose_b, None):
        with np.errstate(invalid="ignore", divide="ignore"), _quiet():
            pb = kb / nb
            for name, (ok, c, s, _, _) in parts.items():
                score_b[name].append(np.nanmean(np.where(ok, c + s * pb, np.nan), axis=1))
            ceil_b.append(np.nanmean(pb * pb + (1 - pb) ** 2, axis=1))
    cat = (lambda x: np.concatenate(x) if x else np.zeros(0))  # noqa: E731
    return _TwoAFCBoot(p=p, kt=kt, nt=nt, parts=parts,
                       scores={k: cat(v) for k, v in score_b.items()}, ceiling=cat(ceil_b))


def _twoafc_scores(data: _TwoAFC, distances, n_boot: int, seed: int,
                   boot: _TwoAFCBoot | None = None) -> pd.DataFrame:
    names = _twoafc_names(data, distances)
    if boot is None or not set(names) <= set(boot.parts):
        boot = _twoafc_boot(data, n_boot, seed, names)
    p, nt = boot.p, boot.nt
    judged = nt > 0
    rows = []
    for name in names:
        ok, c, s, da, db = boot.parts[name]
        ok = ok & judged
        score = float(np.mean(c[ok] + s[ok] * p[ok])) if ok.any() else math.nan
        low, high = _percentile_interval(boot.scores[name])
        rows.append({"distance": name, "transform": _transform(name),
                     "n_triplets": int(ok.sum()), "n_judgments": int(nt[ok].sum()),
                     "score": score, "score_low": float(low), "score_high": float(high),
                     "n_ties": int((ok & (da == db)).sum())})
    cols = ["distance", "transform", "n_triplets", "n_judgments", "score", "score_low",
            "score_high", "n_ties"]
    return pd.DataFrame(rows, columns=cols)


def twoafc_scores(rows: pd.DataFrame, distances=None, *, n_boot: int = 1000,
                  seed: int = 0, include_controls: bool = False) -> pd.DataFrame:
    """Each distance's BAPPS 2AFC score: how often it agrees with people, in [0, 1].

    Per main triplet ``i`` (controls excluded), ``p_i`` is the share of its judgments choosing
    B and the metric's score :func:`bapps_item_scores` (``1 − p_i`` if ``d_a < d_b``, ``p_i``
    if ``d_b < d_a``, ½ on ties); the 2AFC score is the mean over triplets, each weighted
    equally (as the authors' ``score_2afc_dataset``, whose ``judge`` is ``p_i``). Triplets
    with a missing distance are left out of that distance's score. ``ssim`` is compared as
    ``1 − SSIM`` (the order is what matters, so this only makes the direction right).

    ``score_low/high``: participant-bootstrap 95 % percentile interval (each replicate
    recomputes ``p_i`` from the reweighted counts; triplets no resampled person judged drop
    out of that replicate). ``distances``: names (default every ``a_NAME``/``b_NAME``).
    ``include_controls``: score the control triplets too (off by default, as in every 2AFC
    statistic here).

    Columns: ``distance, transform, n_triplets, n_judgments, score, score_low, score_high,
    n_ties``.
    """
    return _twoafc_scores(_twoafc(rows, controls=_ctrl(include_controls)), distances, n_boot,
                          seed)


def _twoafc_ceiling(data: _TwoAFC, n_boot: int, seed: int,
                    boot: _TwoAFCBoot | None = None) -> dict:
    boot = boot if boot is not None else _twoafc_boot(data, n_boot, seed)
    p, nt, kt, cb = boot.p, boot.nt, boot.kt, boot.ceiling
    judged = nt > 0
    ceiling = (float(np.mean(p[judged] ** 2 + (1 - p[judged]) ** 2)) if judged.any()
               else math.nan)
    low, high = _basic_interval(ceiling, cb, 0.5, 1.0)
    two = nt >= 2
    with np.errstate(invalid="ignore", divide="ignore"):
        pair_agree = (kt * (kt - 1) + (nt - kt) * (nt - kt - 1)) / (nt * (nt - 1))
    return {
        "ceiling": ceiling, "ceiling_low": low, "ceiling_high": high,
        "ceiling_unbiased": float(np.mean(pair_agree[two])) if two.any() else math.nan,
        "n_triplets": int(judged.sum()), "n_triplets_unbiased": int(two.sum()),
        "n_judgments": int(nt.sum()),
    }


def twoafc_human_ceiling(rows: pd.DataFrame, *, n_boot: int = 1000, seed: int = 0,
                         include_controls: bool = False) -> dict:
    """The human–human ceiling of the 2AFC score (main triplets).

    ``ceiling = mean_i [p_i² + (1 − p_i)²]``: the expected agreement of one random judgment of
    triplet ``i`` with another drawn independently (with replacement) from the same
    triplet's judgments, averaged over triplets — the "human" 2AFC score of BAPPS (Zhang et
    al. 2018, the score a person drawn from the pool gets against the pool; DreamSim's 96 %
    on NIGHTS is a majority-agreement version of the same idea). With few judgments per
    triplet this includes a person agreeing with themself, so ``ceiling_unbiased`` also gives
    the without-replacement version ``[k(k−1) + (n−k)(n−k−1)] / [n(n−1)]`` over triplets with
    ``n ≥ 2`` (``k`` choices of B out of ``n``).

    Keys: ``ceiling, ceiling_low, ceiling_high`` (participant bootstrap, basic 95 %
    interval — :func:`_basic_interval`: ``p²`` is biased up by ``var(p̂)``, so the interval
    targets the population ceiling and, with few judgments per triplet, can sit below the
    BAPPS point estimate),
    ``ceiling_unbiased, n_triplets, n_triplets_unbiased, n_judgments``.
    """
    return _twoafc_ceiling(_twoafc(rows, controls=_ctrl(include_controls)), n_boot, seed)


def twoafc_table(rows: pd.DataFrame, distances=None, *, n_boot: int = 1000, seed: int = 0,
                 scores: pd.DataFrame | None = None, ceiling: dict | None = None,
                 include_controls: bool = False) -> pd.DataFrame:
    """BAPPS/DreamSim-style table: one row per distance, best 2AFC score first, then a row
    ``kind = "human"`` with the human–human ceiling; every row carries the ceiling and
    ``score / ceiling`` (``relative``).

    Columns: ``kind ("metric"|"human"), metric, transform, n_triplets, score, score_low,
    score_high, human_ceiling, human_ceiling_unbiased, relative`` (the human row's
    interval is :func:`twoafc_human_ceiling`'s, which targets the population ceiling: with
    few judgments per triplet the BAPPS number sits above it, e.g. 0.60 for coin-flip
    choices at 5 judgments a triplet, whose interval and unbiased value are 0.50).
    """
    data = (_twoafc(rows, controls=_ctrl(include_controls)) if scores is None or ceiling is None
            else None)
    if data is not None:
        boot = _twoafc_boot(data, n_boot, seed, _twoafc_names(data, distances))
        scores = _twoafc_scores(data, distances, n_boot, seed, boot)
        ceiling = _twoafc_ceiling(data, n_boot, seed, boot)
    table = scores.sort_values("score", ascending=False, na_position="last").rename(
        columns={"distance": "metric"})
    table = table[["metric", "transform", "n_triplets", "score", "score_low", "score_high"]]
    table.insert(0, "kind", "metric")
    human = pd.DataFrame([{"kind": "human", "metric": "human (ceiling)", "transform": "",
                           "n_triplets": ceiling["n_triplets"], "score": ceiling["ceiling"],
                           "score_low": ceiling["ceiling_low"],
                           "score_high": ceiling["ceiling_high"]}])
    table = pd.concat([table, human], ignore_index=True) if len(table) else human
    table["human_ceiling"] = ceiling["ceiling"]
    table["human_ceiling_unbiased"] = ceiling["ceiling_unbiased"]
    with np.errstate(invalid="ignore", divide="ignore"):
        table["relative"] = table["score"].astype(float) / ceiling["ceiling"]
    return table.reset_index(drop=True)


# --------------------------------------------------------------- probit choice slope
def _probit_loglik(x, k, n, theta, lapse, fit_lapse):
    a, b = theta[:, 0], theta[:, 1]
    lam = theta[:, 2] if fit_lapse else np.broadcast_to(lapse, a.shape)
    p = lam[:, None] / 2 + (1 - lam[:, None]) * stats.norm.cdf(a[:, None] + b[:, None] * x)
    p = np.clip(p, 1e-12, 1 - 1e-12)
    return (k * np.log(p) + (n - k) * np.log1p(-p)).sum(1)


def fit_probit(x, k, n, *, lapse: float | str = 0.0, theta0=None, iterations: int = 100
               ) -> tuple[np.ndarray, np.ndarray]:
    """Maximum-likelihood fit of ``P = λ/2 + (1 − λ) Φ(α + β x)`` to binomial counts, for
    many data sets at once.

    ``x`` (L,); ``k``, ``n`` (R, L) (or (L,)); ``lapse`` a fixed λ or ``"fit"`` (λ in
    [0, 0.5]). Fisher scoring with step halving, vectorised over the R rows (hand-written
    rather than statsmodels so that every bootstrap replicate is fitted in one pass and the
    lapse can be fitted; with λ = 0 it is the probit GLM, which the tests compare with
    statsmodels). Returns ``(theta (R, 2 or 3) = α, β[, λ], loglik (R,))``.
    """
    x = np.asarray(x, float)
    k, n = np.atleast_2d(np.asarray(k, float)), np.atleast_2d(np.asarray(n, float))
    fit_lapse = lapse == "fit"
    fixed = 0.0 if fit_lapse else float(lapse)
    if not fit_lapse and not 0 <= fixed < 1:
        raise ValueError(f"lapse must be 'fit' or in [0, 1), got {lapse!r}")
    r = k.shape[0]
    d = 3 if fit_lapse else 2
    theta = (np.zeros((r, d)) if theta0 is None else np.array(theta0, float, copy=True))
    if theta0 is None and fit_lapse:
        theta[:, 2] = 0.02

    def project(t):
        if fit_lapse:
            t[:, 2] = np.clip(t[:, 2], 0.0, 0.5)
        return t

    ll = _probit_loglik(x, k, n, theta, fixed, fit_lapse)
    for _ in range(iterations):
        z = theta[:, :1] + theta[:, 1:2] * x
        lam = theta[:, 2:3] if fit_lapse else fixed
        cdf, pdf = stats.norm.cdf(z), stats.norm.pdf(z)
        p = np.clip(lam / 2 + (1 - lam) * cdf, 1e-12, 1 - 1e-12)
        g = [(1 - lam) * pdf, (1 - lam) * pdf * x]
        if fit_lapse:
            g.append(0.5 - cdf)
        g = np.stack(np.broadcast_arrays(*g), axis=-1)  # (R, L, d)
        resid = (k - n * p) / (p * (1 - p))
        score = np.einsum("rl,rld->rd", resid, g)
        info = np.einsum("rl,rld,rle->rde", n / (p * (1 - p)), g, g)
        info += np.eye(d)[None] * 1e-10 * (1 + np.abs(info).max(axis=(1, 2)))[:, None, None]
        step = np.linalg.solve(info, score[..., None])[..., 0]
        step = np.where(np.isfinite(step), step, 0.0)
        new, done, size = theta.copy(), np.zeros(r, bool), np.ones(r)
        for _h in range(30):
            cand = project(theta + size[:, None] * step)
            ll2 = _probit_loglik(x, k, n, cand, fixed, fit_lapse)
            ok = (ll2 >= ll - 1e-12) & ~done
            new[ok], ll = cand[ok], np.where(ok, ll2, ll)
            done |= ok
            if done.all():
                break
            size = np.where(done, size, size / 2)
        moved = np.max(np.abs(new - theta)) if r else 0.0
        theta = new
        if moved < 1e-11:
            break
    return theta, ll


def _bootstrap_se_interval(estimate: float, replicates: np.ndarray, n_participants: int
                          ) -> tuple[float, float]:
    """Participant-bootstrap normal-approximation 95 % interval with the small-sample
    correction for ``P`` participants (Davison & Hinkley 1997, eq. 5.5, without the bias
    term; Student quantile on ``P − 1`` degrees of freedom as for cluster-robust inference,
    Cameron & Miller 2015, §VI)::

        θ̂ ± t_{0.975, P−1} · √(P / (P − 1)) · sd(θ*)

    ``sd(θ*)`` the standard deviation of the finite replicates. ``√(P/(P−1))`` undoes the
    multinomial bootstrap's ``(P − 1)/P`` shrinkage of a variance (the bootstrap variance of a
    mean of ``P`` participants is ``(P − 1)/P`` times the unbiased ``s²/P``); the SE is then
    statsmodels' cluster-robust (by participant, CR1) SE up to Monte Carlo noise. NaN with
    fewer than 2 participants or 2 finite replicates.

    Used for the probit choice slope (:func:`twoafc_choice_slope`), where the percentile
    interval under-covers (``bench/twoafc_coverage.py``, BENCHMARKS.md: 92.5 % of 1,000
    simulated studies at 80 participants and 200 replicates, β̂ itself unbiased): its 2.5 /
    97.5 % replicates sit inside the true quantiles (``numpy.percentile`` at 200 replicates
    has expected tails of 2.97 %, not 2.5 %), the replicates' spread is ``(P − 1)/P`` of the
    sampling variance, and their skew (more than β̂'s own) moves the interval up."""
    r = np.asarray(replicates, float)
    r = r[np.isfinite(r)]
    p = int(n_participants)
    if p < 2 or len(r) < 2 or not math.isfinite(estimate):
        return math.nan, math.nan
    half = float(stats.t.ppf(0.975, p - 1) * math.sqrt(p / (p - 1)) * r.std(ddof=1))
    return float(estimate - half), float(estimate + half)


def _twoafc_slope_fit(rows: pd.DataFrame, distance: str, lapse, n_boot: int, seed: int,
                      include_controls: bool) -> dict:
    """The probit fit of :func:`twoafc_choice_slope` and its participant-bootstrap replicates:
    ``theta`` (α, β[, λ]), ``loglik``, ``replicates`` (n_boot, 2 or 3), ``n_participants``,
    ``n_items``, ``n_judgments`` (also read by ``bench/twoafc_coverage.py``)."""
    data = _twoafc(rows, controls=_ctrl(include_controls))
    da, db = data.distances(distance)
    x = da - db
    i = len(data.items)
    kt = np.bincount(data.item, weights=data.chose_b, minlength=i)
    nt = np.bincount(data.item, minlength=i).astype(float)
    ok = ~np.isnan(x) & (nt > 0)
    if ok.sum() < 2 or np.ptp(x[ok]) == 0:
        raise ValueError("a choice slope needs judged triplets with at least two distinct "
                         f"{distance} differences")
    theta, ll = fit_probit(x[ok], kt[ok], nt[ok], lapse=lapse)
    reps = []
    for kb, nb in _boot_sums(data.part, data.item, data.n_participants, i, n_boot, seed,
                             data.chose_b, None):
        reps.append(fit_probit(x[ok], kb[:, ok], nb[:, ok], lapse=lapse,
                               theta0=np.repeat(theta, len(kb), axis=0))[0])
    return {"theta": theta[0], "loglik": float(ll[0]),
            "replicates": _stack(reps, theta.shape[1]),
            "n_participants": data.n_participants, "n_items": int(ok.sum()),
            "n_judgments": int(nt[ok].sum())}


def twoafc_choice_slope(rows: pd.DataFrame, distance: str, *, lapse: float | str = 0.0,
                        n_boot: int = 1000, seed: int = 0, include_controls: bool = False
                        ) -> dict:
    """Distance–choice slope of people's 2AFC choices (a Thurstonian probit).

    ``P(chose B) = λ/2 + (1 − λ) Φ(α + β (d_a − d_b))`` fitted by maximum likelihood on the
    main judgments (``d`` the distance ``distance``, 1 − SSIM for SSIM): ``β`` (per unit of
    distance) is the slope, ``σ = 1/β`` the Thurstonian noise in distance units, ``α`` a
    bias towards B, ``λ`` lapses (fixed, default 0 — then this is the probit GLM — or
    ``"fit"``). 95 % intervals for ``α`` and ``β``: ``estimate ± t_{0.975, P−1} · √(P/(P−1))
    · SE``, SE the participant-bootstrap standard deviation (each replicate refitted;
    :func:`_bootstrap_se_interval` says why not the percentile interval); NaN when
    ``n_boot = 0``.

    Keys: ``distance, alpha, beta, sigma, lapse_rate, beta_low, beta_high, alpha_low,
    alpha_high, n_items, n_judgments, log_likelihood``.
    """
    fit = _twoafc_slope_fit(rows, distance, lapse, n_boot, seed, include_controls)
    theta, tb, p = fit["theta"], fit["replicates"], fit["n_participants"]
    a, b = float(theta[0]), float(theta[1])
    blow, bhigh = _bootstrap_se_interval(b, tb[:, 1], p)
    alow, ahigh = _bootstrap_se_interval(a, tb[:, 0], p)
    return {"distance": distance, "alpha": a, "beta": b,
            "sigma": 1.0 / b if b > 0 else math.nan,
            "lapse_rate": float(theta[2]) if lapse == "fit" else float(lapse),
            "beta_low": blow, "beta_high": bhigh, "alpha_low": alow,
            "alpha_high": ahigh, "n_items": fit["n_items"],
            "n_judgments": fit["n_judgments"], "log_likelihood": fit["loglik"]}


# ================================================================================ rating
@dataclass
class _Rating:
    rows: pd.DataFrame  # all rows, with z
    main: np.ndarray  # bool per row: not control, not repeat
    part: np.ndarray
    participants: np.ndarray
    z: np.ndarray  # per row (NaN where the participant's sd is undefined)


def _rating(rows: pd.DataFrame) -> _Rating:
    _require(rows, RATING_COLUMNS, "rating")
    r = pd.to_numeric(rows["rating"], errors="coerce")
    if r.isna().any() or (r < 1).any() or (r != np.round(r)).any():
        bad = rows.loc[r.isna() | (r < 1) | (r != np.round(r)), "rating"].head(5).tolist()
        raise ValueError(f"rating rows: ratings must be integers ≥ 1, got e.g. {bad}")
    rows = rows.reset_index(drop=True).copy()
    rows["rating"] = r.to_numpy(float)
    main = ~_flag(rows, "is_control") & ~_flag(rows, "is_repeat")
    part, participants = _codes(rows["participant"])
    p = len(participants)
    v = rows["rating"].to_numpy(float)
    n = np.bincount(part[main], minlength=p).astype(float)
    s = np.bincount(part[main], weights=v[main], minlength=p)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = s / n
    dev = np.bincount(part[main], weights=(v[main] - mean[part[main]]) ** 2, minlength=p)
    with np.errstate(invalid="ignore", divide="ignore"):
        sd = np.where(n >= 2, np.sqrt(dev / (n - 1)), np.nan)
        sd = np.where(sd > 0, sd, np.nan)
        z = (v - mean[part]) / sd[part]
    return _Rating(rows=rows, main=main, part=part, participants=participants, z=z)


def rating_zscores(rows: pd.DataFrame) -> np.ndarray:
    """Per row, the rating z-scored within its participant: ``(r − m_p) / s_p`` with ``m_p``
    and ``s_p`` (sample sd, ddof 1) over that participant's main ratings (not anchors, not
    repeats; ITU-R BT.500 / Sheikh et al. 2006 style). NaN for a participant with fewer than
    2 main ratings or constant ratings."""
    return _rating(rows).z


def _rating_items(data: _Rating):
    sub = data.rows.loc[data.main]
    item, items = _codes(sub["item"])
    return sub, item, items


def _rating_mos(data: _Rating, n_boot: int, seed: int) -> tuple[pd.DataFrame, np.ndarray,
                                                                 np.ndarray]:
    sub, item, items = _rating_items(data)
    i = len(items)
    part = data.part[data.main]
    pcount = len(data.participants)
    v = sub["rating"].to_numpy(float)
    z = data.z[data.main]
    zok = ~np.isnan(z)
    n = np.bincount(item, minlength=i).astype(float)
    mos = np.bincount(item, weights=v, minlength=i) / np.maximum(n, 1)
    sd = np.sqrt(np.bincount(item, weights=(v - mos[item]) ** 2, minlength=i)
                 / np.maximum(n - 1, 1))
    sd = np.where(n >= 2, sd, np.nan)
    nz = np.bincount(item[zok], minlength=i).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        zm = np.bincount(item[zok], weights=z[zok], minlength=i) / nz
        zsd = np.sqrt(np.bincount(item[zok], weights=(z[zok] - zm[item[zok]]) ** 2,
                                  minlength=i) / (nz - 1))
    zsd = np.where(nz >= 2, zsd, np.nan)
    # the same draws for the ratings and their z-scores (same seed, same participants)
    ratio = []
    for sb, nb in _boot_sums(part, item, pcount, i, n_boot, seed, v, None):
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio.append(sb / nb)
    mos_b = _stack(ratio, i)
    ratio = []
    for zsb, znb in _boot_sums(part[zok], item[zok], pcount, i, n_boot, seed, z[zok], None):
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio.append(zsb / znb)
    z_b = _stack(ratio, i)
    out = pd.DataFrame({"item": items})
    first = sub.groupby(item, sort=True).first()
    out["condition"] = first["condition"].to_numpy() if len(sub) else []
    out["n_ratings"] = n.astype(int)
    out["mos"] = mos
    out["mos_sd"] = sd
    out["mos_low"], out["mos_high"] = _t_interval(mos, sd, n)
    out["boot_low"], out["boot_high"] = _percentile_interval(mos_b)
    out["n_z"] = nz.astype(int)
    out["z_mos"] = zm
    out["z_low"], out["z_high"] = _t_interval(zm, zsd, nz)
    out["z_boot_low"], out["z_boot_high"] = _percentile_interval(z_b)
    for c in rating_distance_names(data.rows):
        out[f"d_{c}"] = _item_values(sub, item, i, f"d_{c}")
    return out, mos_b, z_b


def rating_distance_names(rows: pd.DataFrame) -> list[str]:
    """Distance names with a ``d_NAME`` column in rating rows."""
    return [c[2:] for c in rows.columns if c.startswith("d_") and len(c) > 2]


def rating_mos(rows: pd.DataFrame, *, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Per item (main ratings: anchors and retest repeats left out) the mean opinion score.

    ``mos`` is the mean rating on the study's 1..N scale. In **pair** mode the question is the
    size of the difference (1 = no difference … N = very different), so it is a *difference*
    score (DMOS: larger = more different); in **single** mode it is quality (1 = bad … N =
    excellent: MOS). ``mos_low/high``: Student-t 95 % (``scipy.stats.t``; NaN with one
    rating); ``boot_low/high``: participant-bootstrap 95 %. ``z_mos``: the mean of the
    ratings z-scored per rater (:func:`rating_zscores`), removing each rater's offset and
    scale use, with its t and bootstrap intervals (the z-scores are computed once from all
    data; the bootstrap resamples raters with their z-scores). ``d_NAME``: the item's
    distances as given (SSIM raw here).

    Columns: ``item, condition, n_ratings, mos, mos_sd, mos_low, mos_high, boot_low,
    boot_high, n_z, z_mos, z_low, z_high, z_boot_low, z_boot_high, d_*``.
    """
    return _rating_mos(_rating(rows), n_boot, seed)[0]


def _rating_correlations(data: _Rating, distances, n_boot, seed, mos=None) -> pd.DataFrame:
    table, mos_b, z_b = mos if mos is not None else _rating_mos(data, n_boot, seed)
    names = rating_distance_names(data.rows) if distances is None else list(distances)
    out = []
    for name in names:
        if f"d_{name}" not in table:
            raise ValueError(f"rating rows have no d_{name} column (have "
                             f"{rating_distance_names(data.rows)})")
        x = _as_distance(name, table[f"d_{name}"])
        for score, y, yb in (("mos", table["mos"].to_numpy(float), mos_b),
                             ("z_mos", table["z_mos"].to_numpy(float), z_b)):
            ok = ~np.isnan(x) & ~np.isnan(y)
            row = {"distance": name, "transform": _transform(name), "score": score,
                   "n_items": int(ok.sum())}
            for key, kind in (("srocc", "spearman"), ("plcc", "pearson"),
                              ("krocc", "kendall")):
                r, pv = _corr(x[ok], y[ok], kind)
                low = high = math.nan
                if len(yb) and not math.isnan(r):
                    rb = _rowwise_corr(x[ok], yb[:, ok], kind)
                    low, high = _basic_interval(r, rb, -1.0, 1.0)
                row.update({key: r, f"{key}_low": float(low), f"{key}_high": float(high),
                            f"{key}_p": pv})
            out.append(row)
    cols = ["distance", "transform", "score", "n_items"] + [
        f"{k}{s}" for k in ("srocc", "plcc", "krocc") for s in ("", "_low", "_high", "_p")]
    return pd.DataFrame(out, columns=cols)


def rating_correlations(rows: pd.DataFrame, distances=None, *, n_boot: int = 1000,
                        seed: int = 0) -> pd.DataFrame:
    """How well each distance predicts the item scores of :func:`rating_mos`.

    For each distance (``d_NAME``; SSIM as ``1 − SSIM``) and each score (``mos`` and
    ``z_mos``) across items: SROCC (Spearman), PLCC (Pearson, on the raw scores — no
    logistic mapping first) and KROCC (Kendall tau-b), with scipy's p-values and
    participant-bootstrap 95 % intervals (replicate scores from reweighted raters, items
    fixed; *basic* intervals, :func:`_basic_interval`, because rater noise attenuates
    correlations with MOS and a replicate carries it twice — so the interval brackets the
    correlation of the noise-free MOS). Signs are raw: in pair mode (difference ratings) a
    good distance correlates *positively*, in single mode (quality) *negatively*.

    Columns: ``distance, transform, score, n_items`` then ``srocc, srocc_low, srocc_high,
    srocc_p`` and the same for ``plcc`` and ``krocc``.
    """
    return _rating_correlations(_rating(rows), distances, n_boot, seed)


def icc(ratings) -> dict:
    """Single-measure intraclass correlations of an ``n × k`` matrix (targets × occasions
    or judges, no missing cells) from the two-way ANOVA mean squares ``MSR`` (targets),
    ``MSC`` (occasions) and ``MSE`` (residual) (Shrout & Fleiss 1979; McGraw & Wong 1996):

    - ``consistency`` ICC(3,1) = ``(MSR − MSE) / (MSR + (k − 1) MSE)``;
    - ``agreement`` ICC(2,1) = ``(MSR − MSE) / (MSR + (k − 1) MSE + k (MSC − MSE) / n)``
      (absolute agreement: a shift between occasions lowers it).

    Hand-written (a dozen lines; neither scipy nor statsmodels has it); the tests check
    Shrout & Fleiss's published example. NaN with fewer than 2 targets or no variance."""
    x = np.asarray(ratings, float)
    if x.ndim != 2 or x.shape[0] < 2 or x.shape[1] < 2 or np.isnan(x).any():
        return {"consistency": math.nan, "agreement": math.nan}
    n, k = x.shape
    grand = x.mean()
    msr = k * ((x.mean(1) - grand) ** 2).sum() / (n - 1)
    msc = n * ((x.mean(0) - grand) ** 2).sum() / (k - 1)
    sse = ((x - x.mean(1, keepdims=True) - x.mean(0, keepdims=True) + grand) ** 2).sum()
    mse = sse / ((n - 1) * (k - 1))
    with np.errstate(invalid="ignore", divide="ignore"):
        c = (msr - mse) / (msr + (k - 1) * mse)
        a = (msr - mse) / (msr + (k - 1) * mse + k * (msc - mse) / n)
    return {"consistency": float(c) if np.isfinite(c) else math.nan,
            "agreement": float(a) if np.isfinite(a) else math.nan}


def _retest(data: _Rating) -> pd.DataFrame:
    rows = data.rows.assign(_part=data.part)
    base = rows[~_flag(rows, "is_control")]
    first = base[~_flag(base, "is_repeat")].groupby(["_part", "item"])["rating"].first()
    again = base[_flag(base, "is_repeat")].groupby(["_part", "item"])["rating"].first()
    both = pd.concat([first.rename("first"), again.rename("repeat")], axis=1,
                     join="inner").reset_index()
    out = []

    def summary(label, g):
        x, y = g["first"].to_numpy(float), g["repeat"].to_numpy(float)
        iccs = icc(np.stack([x, y], axis=1))
        return {"participant": label, "n_pairs": len(g),
                "pearson": _corr(x, y, "pearson")[0], "spearman": _corr(x, y, "spearman")[0],
                "icc_consistency": iccs["consistency"], "icc_agreement": iccs["agreement"],
                "mean_abs_diff": float(np.mean(np.abs(x - y))) if len(g) else math.nan,
                "exact_agreement": float(np.mean(x == y)) if len(g) else math.nan}

    for code, g in both.groupby("_part", sort=True):
        out.append(summary(str(data.participants[code]), g))
    out.append(summary(POOLED, both))
    return pd.DataFrame(out, columns=["participant", "n_pairs", "pearson", "spearman",
                                      "icc_consistency", "icc_agreement", "mean_abs_diff",
                                      "exact_agreement"])


def test_retest(rows: pd.DataFrame) -> pd.DataFrame:
    """Test–retest reliability: each participant's first rating of an item against their
    repeat of it (``is_repeat``; anchors left out; the first repeat if several).

    One row per participant with at least one repeat, then a ``"(pooled)"`` row over every
    (first, repeat) pair: Pearson and Spearman correlation (NaN with < 3 pairs or constant
    ratings), the intraclass correlations ICC(3,1) (consistency) and ICC(2,1) (absolute
    agreement) of the (first, repeat) matrix (:func:`icc`), mean absolute difference (scale
    points) and the share of identical ratings.

    Columns: ``participant, n_pairs, pearson, spearman, icc_consistency, icc_agreement,
    mean_abs_diff, exact_agreement``.
    """
    return _retest(_rating(rows))


test_retest.__test__ = False  # a statistic, not a pytest test


def _anchors(data: _Rating) -> pd.DataFrame:
    rows = data.rows[_flag(data.rows, "is_control")]
    v = rows["rating"].to_numpy(float)
    n = len(v)
    mean = float(v.mean()) if n else math.nan
    sd = float(v.std(ddof=1)) if n >= 2 else math.nan
    low, high = _t_interval(mean, sd, n)
    errors = int((v > 1).sum())
    elow, ehigh = _wilson_arrays(np.array([errors]), np.array([n]))
    return pd.DataFrame([{
        "n_items": int(rows["item"].nunique()), "n_ratings": n, "mean_rating": mean,
        "mean_low": float(low), "mean_high": float(high), "share_lowest": (
            float((v == 1).mean()) if n else math.nan),
        "error_rate": errors / n if n else math.nan, "error_low": float(elow[0]),
        "error_high": float(ehigh[0])}])


def rating_anchors(rows: pd.DataFrame) -> pd.DataFrame:
    """The identical-pair anchors (``is_control``), reported apart from the items.

    ``mean_rating`` with its t 95 % interval; ``share_lowest`` the share rated 1;
    ``error_rate`` the share rated above the lowest point — the control error of the pair
    mode (an identical pair has no difference), with its Wilson interval. In single mode
    the anchor is the clean image and only the mean is meaningful.

    Columns: ``n_items, n_ratings, mean_rating, mean_low, mean_high, share_lowest,
    error_rate, error_low, error_high``.
    """
    return _anchors(_rating(rows))


# ================================================================================= label
def _label(rows: pd.DataFrame) -> pd.DataFrame:
    _require(rows, LABEL_COLUMNS, "label", not_null=("participant", "item", "response",
                                                       "true_label"))
    rows = rows.reset_index(drop=True).copy()
    rows["is_gold"] = _flag(rows, "is_gold")
    bound = pd.to_numeric(rows["bound"], errors="coerce").fillna(0.0)
    if (bound < 0).any():
        raise ValueError("label rows: bounds must be ≥ 0 (0 for gold/clean items)")
    rows["bound"] = bound.to_numpy(float)
    rows["correct"] = (rows["response"].astype(str) == rows["true_label"].astype(str))
    rows["clean"] = rows["is_gold"] | (rows["bound"] == 0)
    return rows


def _label_cells(rows: pd.DataFrame) -> pd.DataFrame:
    tm = rows["threat_model"].astype(object).where(rows["threat_model"].notna(), "")
    return pd.DataFrame({"kind": np.where(rows["is_gold"], GOLD, "main"),
                         "threat_model": np.where(rows["is_gold"], GOLD, tm.astype(str)),
                         "bound": np.where(rows["is_gold"], 0.0, rows["bound"])})


def label_accuracy(rows: pd.DataFrame, *, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Human accuracy (``response == true_label``) per threat model × bound, gold items in a
    row of their own (``kind = "gold"``, threat_model ``"gold"``, bound 0).

    ``accuracy = n_correct / n_judgments``; ``ci_*`` Wilson 95 %, ``boot_*`` participant
    bootstrap 95 %. ``level`` is the ladder index (first non-missing value of the cell).

    Columns: ``kind, threat_model, bound, level, n_items, n_participants, n_judgments,
    n_correct, accuracy, ci_low, ci_high, boot_low, boot_high``.
    """
    rows = _label(rows)
    cells = _label_cells(rows)
    code, keys = pd.factorize(pd.MultiIndex.from_frame(cells), sort=True)
    part, participants = _codes(rows["participant"])
    c = len(keys)
    k = _matrix(part, code, len(participants), c, rows["correct"].to_numpy(float))
    n = _matrix(part, code, len(participants), c)
    kt, nt = k.sum(0), n.sum(0)
    kb, nb = bootstrap_products(len(participants), n_boot, seed, k, n)
    with np.errstate(invalid="ignore", divide="ignore"):
        blow, bhigh = _percentile_interval(kb / nb)
    low, high = _wilson_arrays(kt, nt)
    out = pd.DataFrame(list(keys), columns=["kind", "threat_model", "bound"])
    level = pd.to_numeric(rows["level"], errors="coerce")
    out["level"] = level.groupby(code).first().reindex(range(c)).to_numpy(float)
    out["n_items"] = rows.groupby(code)["item"].nunique().reindex(range(c)).to_numpy()
    out["n_participants"] = (n > 0).sum(0)
    out["n_judgments"] = nt.astype(int)
    out["n_correct"] = kt.astype(int)
    out["accuracy"] = kt / nt
    out["ci_low"], out["ci_high"] = low, high
    out["boot_low"], out["boot_high"] = blow, bhigh
    out["_g"] = out["kind"] == GOLD
    return out.sort_values(["_g", "threat_model", "bound"]).drop(columns="_g").reset_index(
        drop=True)


def _n_labels(rows: pd.DataFrame, label_set) -> int:
    if label_set is not None:
        if isinstance(label_set, int):
            n = label_set
        else:
            labels = [str(x) for x in label_set]
            missing = sorted(set(rows["true_label"].astype(str)) - set(labels))
            if missing:
                raise ValueError(f"true labels {missing[:5]} are not in the label set")
            n = len(set(labels))
    else:
        n = len(set(rows["true_label"].astype(str)) | set(rows["response"].astype(str)))
    if n < 2:
        raise ValueError(f"a label set needs at least 2 labels, got {n}")
    return n


def label_flip_bound(rows: pd.DataFrame, *, target: float | None = None, label_set=None,
                     floor: str | float = "chance", clean_error: float | None = None,
                     sigmoid: str = "logistic", n_boot: int = 500, seed: int = 0
                     ) -> pd.DataFrame:
    """The bound at which people stop giving the true label: a psychometric fit per threat
    model of the error rate against the bound (:mod:`engine.calibration`'s model, mirrored).

    Model, with ``b`` the bound (> 0, the threat model's units)::

        P(wrong | b) = ε + (1 − ε − 1/L) · F(α + β ln b)      i.e.
        accuracy(b) = 1/L + (1 − ε − 1/L) · (1 − F(α + β ln b))

    - ``ε`` the error on unperturbed images: the share of wrong labels on gold and bound-0
      items, pooled over threat models (``clean_error`` overrides; required without them) —
      :func:`engine.calibration.fit_psychometric`'s guess rate γ;
    - ``1/L`` the accuracy floor: when the image no longer shows its class the observer
      guesses among the ``L`` labels (``label_set``: the study's labels or their number;
      default the distinct labels seen) — calibration's lapse rate λ, fixed at ``1/L``
      (``floor="fit"`` fits it in [0, 0.5] instead, for attacks that pull people *below*
      chance towards the adversarial class; or a float);
    - ``F`` logistic (or Weibull), ``α, β`` fitted by maximum likelihood on the binomial
      counts per bound (:func:`engine.calibration.fit_psychometric`).

    The *label-flip bound* is where accuracy falls to ``target`` (an accuracy in
    ``(1/L, 1 − ε)``); by default (``target=None``) the midpoint between clean accuracy and
    the floor (``F = ½``, ``b = exp(−α/β)`` for the logistic) — the ``t`` of
    :class:`engine.observers.LabelObserver`. Interval: participant bootstrap, each replicate
    refitted with its own ``ε``; replicates with an undefined threshold are left out and
    counted (``n_boot_valid``). Threat models with judgments at fewer than two bounds > 0
    get NaN and a ``fit_flag``.

    Columns: ``threat_model, target_accuracy, flip_bound, low, high, n_boot_valid,
    clean_error, floor_accuracy, alpha, beta, sigmoid, deviance, df, p_value, n_bounds,
    n_judgments, n_participants, fit_flag``.
    """
    from engine.calibration import (
        SIGMOIDS,
        fisher_scoring,
        fit_psychometric,
        sigmoid_ppf,
        threshold_of,
    )

    if sigmoid not in SIGMOIDS:
        raise ValueError(f"unknown sigmoid {sigmoid!r}; use one of {SIGMOIDS}")
    rows = _label(rows)
    n_labels = _n_labels(rows, label_set)
    chance = 1.0 / n_labels
    fit_floor = floor == "fit"
    lam = chance if floor == "chance" else (None if fit_floor else float(floor))
    if lam is not None and not 0 <= lam < 1:
        raise ValueError(f"floor must be 'chance', 'fit' or an accuracy in [0, 1), got {floor}")
    part, participants = _codes(rows["participant"])
    pcount = len(participants)
    main = ~rows["clean"].to_numpy()
    cells = rows.loc[main, ["threat_model", "bound"]].astype({"threat_model": str})
    keys = cells.drop_duplicates().sort_values(["threat_model", "bound"]).reset_index(drop=True)
    index = {(t, b): i for i, (t, b) in enumerate(zip(keys["threat_model"], keys["bound"],
                                                      strict=True))}
    col = np.full(len(rows), len(keys))  # last column: clean items (ε)
    col[main] = [index[(t, b)] for t, b in zip(cells["threat_model"], cells["bound"],
                                               strict=True)]
    width = len(keys) + 1
    wrong = (~rows["correct"]).to_numpy(float)
    k = _matrix(part, col, pcount, width, wrong)
    n = _matrix(part, col, pcount, width)
    kt, nt = k.sum(0), n.sum(0)
    kb, nb = bootstrap_products(pcount, n_boot, seed, k, n)
    if clean_error is None:
        if nt[-1] == 0:
            raise ValueError("no gold or bound-0 items to estimate the clean error rate: "
                             "pass clean_error")
        eps = kt[-1] / nt[-1]
        with np.errstate(invalid="ignore", divide="ignore"):
            eps_b = np.where(nb[:, -1] > 0, kb[:, -1] / nb[:, -1], eps)
    else:
        eps = float(clean_error)
        eps_b = np.full(n_boot, eps)
    top = 1 - (lam if lam is not None else 0.0)
    if not 0 <= eps < top:
        raise ValueError(f"clean error rate {eps:.3g} must be below 1 − floor ({top:.3g}); "
                         "the labels carry no class information")
    eps_b = np.minimum(eps_b, top - 1e-6)
    out = []
    for tm in keys["threat_model"].unique():
        cols = keys.index[keys["threat_model"] == tm].to_numpy()
        bounds = keys.loc[cols, "bound"].to_numpy(float)
        used = nt[cols] > 0
        base = {"threat_model": tm, "clean_error": eps, "sigmoid": sigmoid,
                "n_bounds": int(used.sum()), "n_judgments": int(nt[cols].sum()),
                "n_participants": int((n[:, cols].sum(1) > 0).sum())}
        if used.sum() < 2:
            out.append({**base, "target_accuracy": math.nan, "flip_bound": math.nan,
                        "low": math.nan, "high": math.nan, "n_boot_valid": 0,
                        "floor_accuracy": lam if lam is not None else math.nan,
                        "alpha": math.nan, "beta": math.nan, "deviance": math.nan, "df": 0,
                        "p_value": math.nan,
                        "fit_flag": "judgments at fewer than 2 bounds > 0: no fit"})
            continue
        fit = fit_psychometric(bounds[used], kt[cols][used], nt[cols][used], guess_rate=eps,
                               lapse="fit" if fit_floor else lam, sigmoid=sigmoid)
        floor_acc = fit.lapse_rate
        if target is None:
            t_acc = 1 - eps - (1 - eps - floor_acc) / 2
            flip = float(np.exp((sigmoid_ppf(0.5, sigmoid) - fit.alpha) / fit.beta))
        else:
            t_acc = float(target)
            if not 0 < t_acc < 1:
                raise ValueError(f"target must be an accuracy in (0, 1), got {target}")
            flip = fit.threshold(1 - t_acc)
        low = high = math.nan
        valid = 0
        if n_boot:
            theta0 = np.tile([fit.alpha, fit.beta] + ([fit.lapse_rate] if fit_floor else []),
                             (n_boot, 1))
            theta, _ = fisher_scoring(np.log(bounds[used]), kb[:, cols][:, used],
                                      nb[:, cols][:, used], eps_b, theta0, sigmoid=sigmoid,
                                      fit_lapse=fit_floor,
                                      lapse_rate=None if fit_floor else lam)
            lam_b = theta[:, 2] if fit_floor else np.full(n_boot, lam)
            if target is None:
                with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                    tb = np.exp((sigmoid_ppf(0.5, sigmoid) - theta[:, 0]) / theta[:, 1])
                tb = np.where(np.isfinite(tb), tb, np.nan)
            else:
                tb = threshold_of(1 - t_acc, theta[:, 0], theta[:, 1], eps_b, lam_b, sigmoid)
            ok = np.isfinite(tb)
            valid = int(ok.sum())
            if valid:
                low, high = np.percentile(tb[ok], [2.5, 97.5])
        flags = list(fit.flags)
        if n_boot and valid < 0.9 * n_boot:
            flags.append(f"poorly identified: defined in only {valid}/{n_boot} bootstrap "
                         "replicates (its interval is too narrow)")
        if not np.isfinite(flip):
            flags.append(f"target accuracy {t_acc:.3g} outside (floor {floor_acc:.3g}, "
                         f"clean {1 - eps:.3g})")
        out.append({**base, "target_accuracy": t_acc, "flip_bound": flip, "low": float(low),
                    "high": float(high), "n_boot_valid": valid, "floor_accuracy": floor_acc,
                    "alpha": fit.alpha, "beta": fit.beta, "deviance": fit.deviance,
                    "df": fit.df, "p_value": fit.p_value, "fit_flag": "; ".join(flags)})
    cols = ["threat_model", "target_accuracy", "flip_bound", "low", "high", "n_boot_valid",
            "clean_error", "floor_accuracy", "alpha", "beta", "sigmoid", "deviance", "df",
            "p_value", "n_bounds", "n_judgments", "n_participants", "fit_flag"]
    return pd.DataFrame(out, columns=cols)


def label_accuracy_curve(flip_row, bounds) -> np.ndarray:
    """Fitted accuracy at ``bounds`` for one row of :func:`label_flip_bound`:
    ``1 − [ε + (1 − ε − floor) F(α + β ln b)]``."""
    from engine.calibration import psychometric

    return 1.0 - psychometric(bounds, flip_row["alpha"], flip_row["beta"],
                              flip_row["clean_error"], flip_row["floor_accuracy"],
                              flip_row["sigmoid"])


def fleiss_kappa_of(counts: np.ndarray) -> tuple[float, int, int]:
    """Fleiss' kappa (statsmodels) of an ``items × categories`` count matrix. Fleiss' kappa
    needs the same number of ratings per item, so it uses the items with the most common
    number ``m ≥ 2`` of ratings. Returns ``(kappa, n_items_used, m)`` (NaN when undefined)."""
    from statsmodels.stats.inter_rater import fleiss_kappa

    counts = np.asarray(counts, float)
    m_per = counts.sum(1)
    m_per = m_per[m_per >= 2]
    if len(m_per) == 0:
        return math.nan, 0, 0
    vals, freq = np.unique(m_per, return_counts=True)
    m = vals[freq == freq.max()].max()  # the most common count (the larger one on a tie)
    sel = counts[counts.sum(1) == m]
    sel = sel[:, sel.sum(0) > 0]
    if sel.shape[1] < 2:
        return math.nan, len(sel), int(m)
    with np.errstate(invalid="ignore", divide="ignore"):
        kappa = float(fleiss_kappa(sel, method="fleiss"))
    return (kappa if math.isfinite(kappa) else math.nan), len(sel), int(m)


def label_agreement(rows: pd.DataFrame) -> pd.DataFrame:
    """Inter-rater agreement on the labels: per threat model × bound, for gold items, and
    over all items (``kind = "all"``), with items as units and the given labels as
    categories.

    - ``alpha``: Krippendorff's α, nominal (``krippendorff`` package, via
      :func:`engine.analysis.nominal_alpha_from_counts`; items with ≥ 2 judgments);
    - ``fleiss_kappa``: Fleiss' kappa (``statsmodels.stats.inter_rater.fleiss_kappa``) over the
      items with the most common number of judgments (``fleiss_items`` items with
      ``fleiss_raters`` each; Fleiss' kappa needs a fixed count).

    Columns: ``kind, threat_model, bound, n_items, n_judgments, n_categories, alpha,
    fleiss_kappa, fleiss_items, fleiss_raters``.
    """
    rows = _label(rows)
    cells = _label_cells(rows)
    groups = [(k, sel.to_numpy()) for k, sel in
              cells.groupby(["kind", "threat_model", "bound"]).groups.items()]
    groups.sort(key=lambda g: (g[0][0] == GOLD, g[0][1], g[0][2]))
    groups.append((("all", "", math.nan), np.arange(len(rows))))
    out = []
    for (kind, tm, bound), idx in groups:
        sub = rows.iloc[idx]
        item, _ = _codes(sub["item"])
        cat, cats = _codes(sub["response"])
        counts = _matrix(item, cat, int(item.max()) + 1 if len(item) else 0, len(cats))
        kappa, f_items, f_m = fleiss_kappa_of(counts)
        out.append({"kind": kind, "threat_model": tm, "bound": bound,
                    "n_items": counts.shape[0], "n_judgments": len(sub),
                    "n_categories": len(cats), "alpha": nominal_alpha_from_counts(counts),
                    "fleiss_kappa": kappa, "fleiss_items": f_items, "fleiss_raters": f_m})
    return pd.DataFrame(out, columns=["kind", "threat_model", "bound", "n_items",
                                      "n_judgments", "n_categories", "alpha", "fleiss_kappa",
                                      "fleiss_items", "fleiss_raters"])


AGGREGATION_METHODS = ("dawid_skene", "majority")


def aggregate_labels(rows: pd.DataFrame, method: str = "dawid_skene", *, n_iter: int = 100,
                     tol: float = 1e-5) -> pd.DataFrame:
    """One label per item from the crowd, with crowd-kit (Ustalov et al.).

    - ``"dawid_skene"``: ``crowdkit.aggregation.DawidSkene(n_iter, tol)`` (Dawid & Skene
      1979: EM over each participant's confusion matrix and the class priors);
      ``posterior`` is the item's posterior probability of the chosen label;
    - ``"majority"``: ``crowdkit.aggregation.MajorityVote`` (ties as crowd-kit breaks them);
      ``posterior`` is the chosen label's vote share.

    Every item is aggregated (gold included). Columns: ``item, label, posterior,
    n_judgments, true_label, correct`` (``true_label`` from the rows; ``correct`` label ==
    true_label).
    """
    from crowdkit.aggregation import DawidSkene, MajorityVote

    if method not in AGGREGATION_METHODS:
        raise ValueError(f"unknown method {method!r}; use one of {AGGREGATION_METHODS}")
    rows = _label(rows)
    data = pd.DataFrame({"worker": rows["participant"].astype(str),
                         "task": rows["item"].astype(str),
                         "label": rows["response"].astype(str)})
    if data.empty:
        raise ValueError("label rows are empty: nothing to aggregate")
    model = DawidSkene(n_iter=n_iter, tol=tol) if method == "dawid_skene" else MajorityVote()
    with warnings.catch_warnings():
        # crowd-kit 1.4 uses pandas keywords that pandas 3 deprecates (inplace=, copy=)
        warnings.filterwarnings("ignore", module=r"crowdkit\.")
        labels = model.fit_predict(data)
    probas = model.probas_
    items = labels.index.astype(str)
    post = [float(probas.loc[t, lab]) for t, lab in zip(labels.index, labels, strict=True)]
    true = rows.assign(item=rows["item"].astype(str)).groupby("item")["true_label"].first()
    out = pd.DataFrame({"item": items, "label": labels.astype(str).to_numpy(),
                        "posterior": post})
    out["n_judgments"] = out["item"].map(data["task"].value_counts()).astype(int)
    out["true_label"] = out["item"].map(true.astype(str))
    out["correct"] = out["label"] == out["true_label"]
    return out.sort_values("item").reset_index(drop=True)


# ================================================================================ report
@dataclass
class ProtocolReport:
    """Every table of :func:`analyze_protocol` for one protocol.

    ``tables`` maps a name to a DataFrame (2AFC: ``scores, table, choice_rates, controls,
    ceiling``; rating: ``mos, correlations, test_retest, anchors``; label: ``accuracy,
    flip_bound, agreement, aggregation``); ``meta`` the settings and counts; ``exclusions``
    the :func:`engine.analysis.apply_exclusions` counts. ``to_dict()`` is JSON-safe
    (``{"protocol", "meta", "exclusions", "tables": {name: records}}``).
    """

    protocol: str
    tables: dict[str, pd.DataFrame]
    meta: dict = field(default_factory=dict)
    exclusions: dict = field(default_factory=dict)

    def __getitem__(self, name: str) -> pd.DataFrame:
        return self.tables[name]

    def to_dict(self) -> dict:
        return {"protocol": self.protocol, "meta": _json_safe(dict(self.meta)),
                "exclusions": _json_safe(dict(self.exclusions)),
                "tables": {k: frame_records(v) for k, v in self.tables.items()}}


def analyze_protocol(protocol: str, rows: pd.DataFrame, *, distances=None, n_boot: int = 1000,
                     seed: int = 0, include_excluded: bool = False,
                     include_simulated: bool = False, label_set=None,
                     target: float | None = None, floor: str | float = "chance",
                     aggregation: str = "dawid_skene", slope_distance: str | None = None
                     ) -> ProtocolReport:
    """Apply exclusions (``excluded``/``simulated`` columns, as :func:`engine.analysis.
    apply_exclusions`), then compute every table of ``protocol`` ("2afc", "rating",
    "label"; JND is :func:`engine.analysis.analyze`).

    - 2afc: ``scores`` (:func:`twoafc_scores`), ``table`` (:func:`twoafc_table`),
      ``choice_rates`` (:func:`twoafc_choice_rates`), ``controls`` (the control triplets'
      error rate: choice rates of the controls), ``ceiling`` (one row,
      :func:`twoafc_human_ceiling`) and, with ``slope_distance``, ``slope`` (one row,
      :func:`twoafc_choice_slope`);
    - rating: ``mos``, ``correlations``, ``test_retest``, ``anchors``;
    - label: ``accuracy``, ``flip_bound`` (``label_set``, ``target``, ``floor``),
      ``agreement``, ``aggregation`` (``aggregation`` method).
    """
    if protocol == "jnd":
        raise ValueError("JND is analysed by engine.analysis.analyze(pairs, judgments)")
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; use one of {PROTOCOLS}")
    if not isinstance(rows, pd.DataFrame):
        raise ValueError(f"{protocol} rows must be a pandas DataFrame")
    kept, counts = apply_exclusions(rows, include_excluded=include_excluded,
                                    include_simulated=include_simulated)
    if kept.empty:
        raise ValueError(f"no {protocol} judgments to analyse: {counts['judgments_total']} "
                         f"rows, {counts['judgments_dropped_excluded']} dropped as excluded, "
                         f"{counts['judgments_dropped_simulated']} as simulated "
                         "(include_simulated=True for simulated observers)")
    meta = {"n_boot": n_boot, "seed": seed, "include_excluded": include_excluded,
            "include_simulated": include_simulated, "n_rows": int(len(kept)),
            "n_participants": int(kept["participant"].nunique()) if "participant" in kept
            else 0}
    tables: dict[str, pd.DataFrame] = {}
    if protocol == "2afc":
        data = _twoafc(kept)
        boot = _twoafc_boot(data, n_boot, seed, _twoafc_names(data, distances))
        scores = _twoafc_scores(data, distances, n_boot, seed, boot)
        ceiling = _twoafc_ceiling(data, n_boot, seed, boot)
        tables["scores"] = scores
        tables["table"] = twoafc_table(kept, scores=scores, ceiling=ceiling)
        tables["choice_rates"] = twoafc_choice_rates(kept, n_boot=n_boot, seed=seed)
        ctrl = twoafc_choice_rates(kept, include_controls=True, n_boot=n_boot, seed=seed)
        tables["controls"] = ctrl[ctrl["kind"] == "control"].reset_index(drop=True)
        tables["ceiling"] = pd.DataFrame([ceiling])
        if slope_distance is not None:
            tables["slope"] = pd.DataFrame([twoafc_choice_slope(
                kept, slope_distance, n_boot=n_boot, seed=seed)])
        meta["n_triplets"] = int(len(data.items))
    elif protocol == "rating":
        data = _rating(kept)
        mos = _rating_mos(data, n_boot, seed)
        tables["mos"] = mos[0]
        tables["correlations"] = _rating_correlations(data, distances, n_boot, seed, mos)
        tables["test_retest"] = _retest(data)
        tables["anchors"] = _anchors(data)
        meta["n_items"] = int(len(mos[0]))
    else:
        tables["accuracy"] = label_accuracy(kept, n_boot=n_boot, seed=seed)
        tables["flip_bound"] = label_flip_bound(kept, target=target, label_set=label_set,
                                                floor=floor, n_boot=n_boot, seed=seed)
        tables["agreement"] = label_agreement(kept)
        tables["aggregation"] = aggregate_labels(kept, aggregation)
        meta["n_items"] = int(kept["item"].nunique())
        meta["aggregation"] = aggregation
    return ProtocolReport(protocol=protocol, tables=tables, meta=meta, exclusions=counts)
