"""Analysis of JND judgments: perceptibility, controls, signal detection, distance models,
rater agreement and the PAT paper's table 4 — pandas/numpy/scipy in, DataFrames out.

Input frames (plain DataFrames so this runs without Django)
-----------------------------------------------------------
``pairs``: one row per pair.

- ``pair`` (int id), ``condition`` (spec str; None for controls), ``threat_model``,
  ``bound`` (float ≥ 0, in the threat model's own units), ``label`` (str, e.g. "medium"),
  ``is_sentinel`` (bool: the two images are identical), ``is_catch`` (bool, optional: two
  different photographs);
- optional ``success`` (bool: the attack fooled the classifier; *strength*), optional
  ``level`` (int index on an adaptive ladder);
- one float column per distance: ``l2``, ``linf``, ``ssim``, ``lpips_alexnet``,
  ``lpips_alexnet_untrained``, ``lpips_self`` … Every other numeric column is a distance.
  ``ssim`` is a *similarity*: wherever a distance is needed it is used as ``1 − SSIM``
  (see :func:`distance_values`).

``judgments``: one row per main-trial judgment.

- ``pair``, ``different`` (bool: the participant answered "different"), ``participant``
  (str/int), ``session`` (int), ``excluded`` (bool: session excluded by quality control),
  ``simulated`` (bool: a simulated observer), optional ``response_ms``.
- Only ``pair`` and ``different`` are required by the statistics; a missing ``participant``
  makes every judgment its own participant (bootstrap then resamples judgments).

The statistics functions use the judgments they are given; :func:`apply_exclusions` (called
by :func:`analyze`) drops excluded sessions and simulated observers first.

Definitions
-----------
*Perceptibility* of a condition is the fraction of its judgments answered "different" (PAT,
Laidlaw et al. 2021, section 6). The *sentinel false-alarm rate* is that fraction over sentinel
(identical) pairs and the *catch hit rate* over catch pairs.

Intervals: Wilson score 95 % (Wilson 1927) and a participant bootstrap 95 % percentile interval
(Efron & Tibshirani 1993): replicate ``b`` gives participant ``i`` the weight
``W[b, i] ~ Multinomial(P, 1/P)`` (how often ``i`` is drawn when resampling ``P`` participants
with replacement), and every per-participant count is multiplied by it; so a bootstrap costs
one ``(B × P) @ (P × C)`` product on count matrices, never a loop over judgments. Pairs, where
resampled too, are drawn the same way within each condition. :func:`participant_weights` and
:func:`pair_weights` give the exact draws (tests rebuild the resampled data from them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy import sparse, stats

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
    "success",
    "level",
    "size_ratio",
    "image",
    "seed",
}
SIMILARITY_COLUMNS = {"ssim"}
#: Stimuli are at their bound when stored size ÷ bound lies in ``[AT_BOUND, 1]``
#: (:mod:`engine.stimuli`'s stimulus mode; declared here, the module with no torch import).
AT_BOUND = 0.95
Z95 = 1.959963984540054


# ----------------------------------------------------------------------------------- basics
def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95 % Wilson score interval for a proportion (NaNs when ``n`` is 0).

    ``(p + z²/2n ± z·sqrt(p(1−p)/n + z²/4n²)) / (1 + z²/n)`` (Wilson 1927).
    """
    if n == 0:
        return (math.nan, math.nan)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # rounding can leave a bound a hair past p (k = 0 gives 5.6e-17 > 0, k = n gives 1 − ε)
    return (min(max(centre - half, 0.0), p), max(min(centre + half, 1.0), p))


def wilson_sample_size(p: float, width: float, z: float = Z95) -> int:
    """Smallest ``n`` whose 95 % Wilson interval at ``round(p·n)`` successes has full width
    ``≤ width`` (the judgments one condition needs at perceptibility ``p``)."""
    if not 0 < width < 1 or not 0 <= p <= 1:
        raise ValueError(f"need 0 < width < 1 and 0 <= p <= 1, got width={width}, p={p}")

    def ok(n: int) -> bool:
        low, high = wilson_interval(round(p * n), n, z)
        return high - low <= width

    # width is not monotone in n once p·n is rounded, so scan rather than bisect
    n = 1
    while not ok(n):
        n += 1
    return n


def _wilson_arrays(k: np.ndarray, n: np.ndarray, z: float = Z95) -> tuple[np.ndarray, np.ndarray]:
    k = np.asarray(k, float)
    n = np.asarray(n, float)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = k / n
        denom = 1 + z * z / n
        centre = (p + z * z / (2 * n)) / denom
        half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
        # rounding can leave the bound a hair on the wrong side of p at k = 0 or k = n
        low = np.where(n > 0, np.clip(centre - half, 0.0, p), np.nan)
        high = np.where(n > 0, np.clip(centre + half, p, 1.0), np.nan)
    return low, high


def distance_columns(pairs: pd.DataFrame) -> list[str]:
    """The columns of ``pairs`` that hold distances (numeric, not an id/metadata column)."""
    out = []
    for c in pairs.columns:
        if c in NON_DISTANCE_COLUMNS:
            continue
        if pd.api.types.is_bool_dtype(pairs[c]):
            continue
        if pd.api.types.is_numeric_dtype(pairs[c]) or pairs[c].isna().all():
            out.append(c)
    return out


def distance_values(pairs: pd.DataFrame, column: str) -> np.ndarray:
    """Per-pair values of a distance column as floats; similarities (SSIM) become ``1 − x``."""
    x = pd.to_numeric(pairs[column], errors="coerce").to_numpy(float)
    return 1.0 - x if column in SIMILARITY_COLUMNS else x


def log_linear_rate(k, n):
    """Log-linear corrected rate ``(k + 0.5) / (n + 1)`` (Hautus 1995), used for d′ and c."""
    return (np.asarray(k, float) + 0.5) / (np.asarray(n, float) + 1.0)


#: Bootstrap replicates drawn and multiplied at a time (bounds memory to chunk × participants).
BOOT_CHUNK = 128


def participant_weight_chunks(n_participants: int, n_boot: int, seed: int,
                              chunk: int = BOOT_CHUNK):
    """The rows of :func:`participant_weights`, ``chunk`` replicates at a time (same draws)."""
    rng = np.random.default_rng(seed)
    chunk = max(1, min(chunk, 20_000_000 // max(n_participants, 1)))  # ≤ 160 MB a chunk
    done = 0
    while done < n_boot:
        size = min(chunk, n_boot - done)
        if n_participants == 0:
            yield np.zeros((size, 0))
        else:
            # Multinomial(P, 1/P) counts drawn as P uniform picks per replicate and counted
            # (the same distribution; 2.5× faster than rng.multinomial at 50,000 participants)
            picks = rng.integers(0, n_participants, size=(size, n_participants))
            offset = (np.arange(size) * n_participants)[:, None]
            yield np.bincount((picks + offset).ravel(),
                              minlength=size * n_participants).reshape(
                size, n_participants).astype(float)
        done += size


def participant_weights(n_participants: int, n_boot: int, seed: int) -> np.ndarray:
    """``(n_boot, n_participants)`` multinomial bootstrap weights (how often each participant,
    in sorted order, is drawn): per replicate ``P`` draws of
    ``numpy.random.default_rng(seed).integers(0, P)``, counted."""
    if n_boot == 0:
        return np.zeros((0, n_participants))
    return np.concatenate(list(participant_weight_chunks(n_participants, n_boot, seed)))


class SharedWeights:
    """:func:`participant_weight_chunks` drawn once and replayed to every statistic that needs
    them (the same draws as drawing them again, without the cost: at 50,000 participants ×
    1,000 replicates the draws take seconds). Kept as float64 up to :attr:`FLOAT_BYTES`
    (1,000 × 50,000: 400 MB), beyond that as the counts they are (uint8, or uint16 if a count
    exceeds 255)."""

    #: Up to this many bytes the chunks are kept as float64 (no conversion when replayed).
    FLOAT_BYTES = 600_000_000

    def __init__(self, n_participants: int, n_boot: int, seed: int):
        self.key = (n_participants, n_boot, seed)
        self._chunks = []
        compact = n_participants * n_boot * 8 > self.FLOAT_BYTES
        for w in participant_weight_chunks(n_participants, n_boot, seed):
            if compact:
                w = w.astype(np.uint8 if w.size == 0 or w.max() < 256 else np.uint16)
            self._chunks.append(w)

    def chunks(self):
        for w in self._chunks:
            yield w if w.dtype == float else w.astype(float)


def _weight_chunks(n_participants: int, n_boot: int, seed: int, weights=None):
    if weights is not None:
        if weights.key != (n_participants, n_boot, seed):
            raise ValueError(f"shared weights drawn for {weights.key}, not "
                             f"{(n_participants, n_boot, seed)}")
        return weights.chunks()
    return participant_weight_chunks(n_participants, n_boot, seed)


def bootstrap_products(n_participants: int, n_boot: int, seed: int, *mats,
                       weights: SharedWeights | None = None) -> list[np.ndarray]:
    """``W @ M`` for each per-participant matrix ``M`` (P × C), computed chunk by chunk
    (``weights``: the same draws, already made)."""
    outs = [[] for _ in mats]
    for w in _weight_chunks(n_participants, n_boot, seed, weights):
        for out, m in zip(outs, mats, strict=True):
            out.append(w @ m)
    return [np.concatenate(o) if o else np.zeros((0, m.shape[1])) for o, m in zip(
        outs, mats, strict=True)]


def pair_weights(groups: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """``(n_boot, n_pairs)`` bootstrap weights resampling pairs within each group (condition).

    Groups are visited in sorted order of their codes; each draws
    ``Multinomial(m, 1/m)`` from ``default_rng([seed, 1])``. Pairs with group code −1 get 0.
    """
    groups = np.asarray(groups)
    w = np.zeros((n_boot, len(groups)))
    rng = np.random.default_rng([seed, 1])
    for g in np.unique(groups[groups >= 0]):
        idx = np.flatnonzero(groups == g)
        w[:, idx] = rng.multinomial(len(idx), np.full(len(idx), 1.0 / len(idx)), size=n_boot)
    return w


def _percentile_interval(samples: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """2.5 and 97.5 percentiles ignoring NaN replicates (NaN if none is finite)."""
    samples = np.asarray(samples, float)
    if samples.shape[axis] == 0:
        shape = list(samples.shape)
        del shape[axis]
        nan = np.full(shape, np.nan)
        return nan, nan.copy()
    with np.errstate(invalid="ignore"), _quiet():
        low = np.nanpercentile(samples, 2.5, axis=axis)
        high = np.nanpercentile(samples, 97.5, axis=axis)
    return low, high


class _quiet:
    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


# ----------------------------------------------------------------------------- validation
PAIR_COLUMNS = ("pair", "condition", "threat_model", "bound", "is_sentinel")
JUDGMENT_COLUMNS = ("pair", "different")


def _check_frames(pairs: pd.DataFrame, judgments: pd.DataFrame) -> None:
    if not isinstance(pairs, pd.DataFrame) or not isinstance(judgments, pd.DataFrame):
        raise ValueError("pairs and judgments must be pandas DataFrames")
    missing = [c for c in PAIR_COLUMNS if c not in pairs.columns]
    if missing:
        raise ValueError(f"pairs is missing column(s) {missing}")
    if pairs.empty:
        raise ValueError("pairs is empty: there is nothing to analyse")
    missing = [c for c in JUDGMENT_COLUMNS if c not in judgments.columns]
    if missing:
        raise ValueError(f"judgments is missing column(s) {missing}")
    if pairs["pair"].duplicated().any():
        dup = pairs.loc[pairs["pair"].duplicated(), "pair"].head(5).tolist()
        raise ValueError(f"pairs has duplicate pair ids, e.g. {dup}")
    bounds = pd.to_numeric(pairs["bound"], errors="coerce")
    if (bounds < 0).any():
        bad = pairs.loc[bounds < 0, "pair"].head(5).tolist()
        raise ValueError(f"pairs has negative bounds (pairs {bad}); a bound is a size ≥ 0")
    if len(judgments) and judgments["different"].isna().any():
        raise ValueError("judgments.different has missing values")


@dataclass
class _Prepared:
    """Integer-coded view of the two frames that every statistic works on."""

    pairs: pd.DataFrame  # with 'group' (condition key incl. controls) and 'gcode'
    groups: list[str]  # group key per gcode
    group_info: pd.DataFrame  # one row per group: condition, threat_model, bound, label, n_pairs
    j_pair: np.ndarray  # pair row index per judgment
    j_diff: np.ndarray  # 0/1 per judgment
    j_part: np.ndarray  # participant code per judgment (sorted order)
    participants: np.ndarray  # participant labels by code
    is_sentinel: np.ndarray  # per pair row
    is_catch: np.ndarray  # per pair row

    @property
    def n_participants(self) -> int:
        return len(self.participants)

    @property
    def n_groups(self) -> int:
        return len(self.groups)

    def counts(self, by: str = "group") -> tuple[np.ndarray, np.ndarray]:
        """Per-participant counts ``(k, n)`` with shape ``(P, G)`` (group) or ``(P, Q)`` (pair)."""
        cols = self.pairs["gcode"].to_numpy()[self.j_pair] if by == "group" else self.j_pair
        width = self.n_groups if by == "group" else len(self.pairs)
        flat = self.j_part * width + cols
        size = self.n_participants * width
        n = np.bincount(flat, minlength=size).reshape(self.n_participants, width)
        k = np.bincount(flat, weights=self.j_diff, minlength=size).reshape(
            self.n_participants, width
        )
        return k.astype(float), n.astype(float)


def _prepare(pairs: pd.DataFrame, judgments: pd.DataFrame) -> _Prepared:
    _check_frames(pairs, judgments)
    pairs = pairs.reset_index(drop=True).copy()
    is_sentinel = pairs["is_sentinel"].fillna(False).astype(bool).to_numpy()
    is_catch = (
        pairs["is_catch"].fillna(False).astype(bool).to_numpy()
        if "is_catch" in pairs
        else np.zeros(len(pairs), bool)
    )
    group = pairs["condition"].astype(object).where(pairs["condition"].notna(), None)
    group = group.where(~is_sentinel, SENTINEL).where(~is_catch, CATCH)
    if group.isna().any():
        bad = pairs.loc[group.isna(), "pair"].head(5).tolist()
        raise ValueError(f"pairs {bad} have no condition and are neither sentinel nor catch")
    pairs["group"] = group.astype(str)
    if "label" not in pairs:
        pairs["label"] = ""
    pairs["bound"] = pd.to_numeric(pairs["bound"], errors="coerce")
    main = pairs[~pairs["group"].isin(CONTROLS)]
    info = main.drop_duplicates("group")[["group", "threat_model", "bound", "label"]].copy()
    info["n_pairs"] = info["group"].map(main["group"].value_counts()).astype(int)
    info = info.sort_values(["threat_model", "bound", "group"], kind="stable")
    controls = [c for c in CONTROLS if (pairs["group"] == c).any()]
    ctrl = pd.DataFrame(
        {
            "group": controls,
            "threat_model": controls,
            "bound": np.nan,
            "label": "",
            "n_pairs": [int((pairs["group"] == c).sum()) for c in controls],
        }
    )
    info = pd.concat([info, ctrl], ignore_index=True) if len(ctrl) else info
    info = info.reset_index(drop=True)
    info["label"] = info["label"].fillna("").astype(str)
    groups = info["group"].tolist()
    pairs["gcode"] = pairs["group"].map({g: i for i, g in enumerate(groups)}).astype(int)

    j_pair = pd.Index(pairs["pair"]).get_indexer(judgments["pair"])
    if (j_pair < 0).any():
        bad = judgments.loc[j_pair < 0, "pair"].drop_duplicates().head(5).tolist()
        raise ValueError(f"judgments refer to pairs not in the pairs frame, e.g. {bad}")
    j_diff = judgments["different"].astype(bool).to_numpy().astype(float)
    if "participant" in judgments and len(judgments):
        if judgments["participant"].isna().any():
            raise ValueError("judgments.participant has missing values")
        codes, labels = pd.factorize(judgments["participant"], sort=True)
    else:
        codes, labels = np.arange(len(judgments)), np.arange(len(judgments))
    return _Prepared(
        pairs=pairs,
        groups=groups,
        group_info=info.rename(columns={"group": "condition"}),
        j_pair=j_pair,
        j_diff=j_diff,
        j_part=np.asarray(codes, dtype=np.int64),
        participants=np.asarray(labels),
        is_sentinel=is_sentinel,
        is_catch=is_catch,
    )


# ------------------------------------------------------------------------------ exclusions
def apply_exclusions(
    judgments: pd.DataFrame, *, include_excluded: bool = False, include_simulated: bool = False
) -> tuple[pd.DataFrame, dict]:
    """Drop judgments of excluded sessions and of simulated observers; count what was dropped.

    A judgment is dropped as *simulated* when ``simulated`` is true and simulated observers are
    not included, otherwise as *excluded* when ``excluded`` is true and exclusions are not
    included (so the two reasons partition the dropped rows). Missing ``excluded``/``simulated``
    columns mean False. Sessions are identified by ``(participant, session)`` when both columns
    exist, else by ``session``; a session counts as dropped for a reason when any of its
    judgments is.

    Counts dict keys: ``judgments_total, judgments_kept, judgments_dropped,
    judgments_dropped_excluded, judgments_dropped_simulated, sessions_total, sessions_kept,
    sessions_dropped_excluded, sessions_dropped_simulated, participants_kept,
    include_excluded, include_simulated`` (session counts are None without a ``session`` column).
    """
    if not isinstance(judgments, pd.DataFrame):
        raise ValueError("judgments must be a pandas DataFrame")
    n = len(judgments)
    excluded = (
        judgments["excluded"].fillna(False).astype(bool).to_numpy()
        if "excluded" in judgments
        else np.zeros(n, bool)
    )
    simulated = (
        judgments["simulated"].fillna(False).astype(bool).to_numpy()
        if "simulated" in judgments
        else np.zeros(n, bool)
    )
    drop_sim = simulated & (not include_simulated)
    drop_exc = excluded & (not include_excluded) & ~drop_sim
    keep = ~(drop_sim | drop_exc)
    counts: dict[str, Any] = {
        "judgments_total": int(n),
        "judgments_kept": int(keep.sum()),
        "judgments_dropped": int((~keep).sum()),
        "judgments_dropped_excluded": int(drop_exc.sum()),
        "judgments_dropped_simulated": int(drop_sim.sum()),
        "include_excluded": bool(include_excluded),
        "include_simulated": bool(include_simulated),
    }
    if "session" in judgments:
        # session codes from the two columns' integer codes (a MultiIndex factorize is slow at
        # a million rows)
        codes, _ = pd.factorize(judgments["session"])
        if "participant" in judgments:
            pc, _ = pd.factorize(judgments["participant"])
            codes, _ = pd.factorize(pc.astype(np.int64) * (int(codes.max()) + 2 if n else 1)
                                    + codes)
        n_s = int(codes.max()) + 1 if n else 0
        counts["sessions_total"] = n_s
        counts["sessions_kept"] = int(len(np.unique(codes[keep])))
        counts["sessions_dropped_excluded"] = int(len(np.unique(codes[drop_exc])))
        counts["sessions_dropped_simulated"] = int(len(np.unique(codes[drop_sim])))
    else:
        for k in ("sessions_total", "sessions_kept", "sessions_dropped_excluded",
                  "sessions_dropped_simulated"):
            counts[k] = None
    counts["participants_kept"] = (
        int(judgments.loc[keep, "participant"].nunique()) if "participant" in judgments else None
    )
    return judgments.loc[keep].reset_index(drop=True), counts


# --------------------------------------------------------------------------- perceptibility
def _group_rates(prep: _Prepared, n_boot: int, seed: int, weights=None):
    """Point counts per group and bootstrap replicate rates ``(B, G)``."""
    k, n = prep.counts("group")
    k_tot, n_tot = k.sum(0), n.sum(0)
    kb, nb = bootstrap_products(prep.n_participants, n_boot, seed, k, n, weights=weights)
    with np.errstate(invalid="ignore", divide="ignore"):
        rb = kb / nb
    return k_tot, n_tot, kb, nb, rb


def _perceptibility(prep: _Prepared, n_boot: int, seed: int, boot=None) -> pd.DataFrame:
    k_tot, n_tot, _, _, rb = boot if boot is not None else _group_rates(prep, n_boot, seed)
    low, high = _wilson_arrays(k_tot, n_tot)
    blow, bhigh = _percentile_interval(rb)
    table = prep.group_info.copy()
    table["n_judgments"] = n_tot.astype(int)
    table["n_different"] = k_tot.astype(int)
    with np.errstate(invalid="ignore", divide="ignore"):
        table["perceptibility"] = np.where(n_tot > 0, k_tot / n_tot, np.nan)
    table["ci_low"], table["ci_high"] = low, high
    table["boot_low"] = np.where(n_tot > 0, blow, np.nan)
    table["boot_high"] = np.where(n_tot > 0, bhigh, np.nan)
    gcode = prep.pairs["gcode"].to_numpy()
    for c in distance_columns(prep.pairs.drop(columns=["gcode"])):
        vals = pd.to_numeric(prep.pairs[c], errors="coerce").to_numpy(float)
        ok = ~np.isnan(vals)
        s = np.bincount(gcode[ok], weights=vals[ok], minlength=prep.n_groups)
        m = np.bincount(gcode[ok], minlength=prep.n_groups)
        with np.errstate(invalid="ignore", divide="ignore"):
            table[f"mean_{c}"] = np.where(m > 0, s / np.maximum(m, 1), np.nan)
    if "size_ratio" in prep.pairs:  # stored size ÷ bound (engine.stimuli stimulus mode)
        ratio = pd.to_numeric(prep.pairs["size_ratio"], errors="coerce")
        grouped = ratio.groupby(gcode)
        codes = np.arange(prep.n_groups)
        table["size_ratio_min"] = grouped.min().reindex(codes).to_numpy(float)
        table["size_ratio_median"] = grouped.median().reindex(codes).to_numpy(float)
        flagged = ((ratio < AT_BOUND) | (ratio > 1 + 1e-4)).groupby(gcode).sum()
        table["n_not_at_bound"] = np.where(grouped.count().reindex(codes).fillna(0) > 0,
                                           flagged.reindex(codes).to_numpy(float), np.nan)
    return table.reset_index(drop=True)


def perceptibility_table(
    pairs: pd.DataFrame, judgments: pd.DataFrame, *, n_boot: int = 1000, seed: int = 0
) -> pd.DataFrame:
    """One row per condition (sorted by threat model, bound), then ``sentinel`` and ``catch``.

    Columns: ``condition, threat_model, bound, label, n_pairs, n_judgments, n_different,
    perceptibility, ci_low, ci_high, boot_low, boot_high`` and ``mean_<distance>`` (raw column
    mean over the condition's pairs, judged or not; SSIM stays a similarity here).
    ``perceptibility = n_different / n_judgments``; ``ci_*`` Wilson 95 %; ``boot_*`` participant
    bootstrap 95 % percentile interval (module docstring). Unjudged rows have NaN.
    """
    return _perceptibility(_prepare(pairs, judgments), n_boot, seed)


def _controls(prep: _Prepared, n_boot: int, seed: int, boot=None) -> pd.DataFrame:
    table = _perceptibility(prep, n_boot, seed, boot)
    rows = []
    for control, statistic in ((SENTINEL, "false_alarm_rate"), (CATCH, "catch_hit_rate")):
        sub = table[table["condition"] == control]
        if sub.empty:
            rows.append({"control": control, "statistic": statistic, "n_pairs": 0,
                         "n_judgments": 0, "n_different": 0, "rate": np.nan,
                         "ci_low": np.nan, "ci_high": np.nan, "boot_low": np.nan,
                         "boot_high": np.nan})
            continue
        r = sub.iloc[0]
        rows.append({"control": control, "statistic": statistic, "n_pairs": int(r["n_pairs"]),
                     "n_judgments": int(r["n_judgments"]), "n_different": int(r["n_different"]),
                     "rate": r["perceptibility"], "ci_low": r["ci_low"], "ci_high": r["ci_high"],
                     "boot_low": r["boot_low"], "boot_high": r["boot_high"]})
    return pd.DataFrame(rows)


def control_rates(
    pairs: pd.DataFrame, judgments: pd.DataFrame, *, n_boot: int = 1000, seed: int = 0
) -> pd.DataFrame:
    """Sentinel false-alarm rate and catch-trial hit rate.

    Rows ``sentinel`` (statistic ``false_alarm_rate``: fraction "different" on identical
    pairs) and ``catch`` (``catch_hit_rate``: fraction "different" on two different photos).
    Columns: ``control, statistic, n_pairs, n_judgments, n_different, rate, ci_low, ci_high``
    (Wilson 95 %), ``boot_low, boot_high`` (participant bootstrap 95 %). NaN when absent.
    """
    return _controls(_prepare(pairs, judgments), n_boot, seed)


# -------------------------------------------------------------------------- signal detection
def _sdt(prep: _Prepared, n_boot: int, seed: int, boot=None) -> pd.DataFrame:
    k_tot, n_tot, kb, nb, _ = boot if boot is not None else _group_rates(prep, n_boot, seed)
    info = prep.group_info
    main = ~info["condition"].isin(CONTROLS).to_numpy()
    if SENTINEL in prep.groups:
        s = prep.groups.index(SENTINEL)
        fa_k, fa_n, fa_kb, fa_nb = k_tot[s], n_tot[s], kb[:, s], nb[:, s]
    else:
        fa_k = fa_n = 0.0
        fa_kb = fa_nb = np.zeros(kb.shape[0])
    z = stats.norm.ppf
    h = log_linear_rate(k_tot, n_tot)
    f = log_linear_rate(fa_k, fa_n)
    dprime = z(h) - z(f)
    crit = -(z(h) + z(f)) / 2
    hb = log_linear_rate(kb, nb)
    fb = log_linear_rate(fa_kb, fa_nb)[:, None]
    dlow, dhigh = _percentile_interval(z(hb) - z(fb))
    clow, chigh = _percentile_interval(-(z(hb) + z(fb)) / 2)
    valid = (n_tot > 0) & (fa_n > 0)
    out = info.loc[main, ["condition", "threat_model", "bound", "label"]].copy()
    cols = {
        "n_judgments": n_tot.astype(int),
        "hits": k_tot.astype(int),
        "hit_rate": np.where(n_tot > 0, k_tot / np.maximum(n_tot, 1), np.nan),
        "n_sentinel": np.full(len(k_tot), int(fa_n)),
        "false_alarms": np.full(len(k_tot), int(fa_k)),
        "fa_rate": np.full(len(k_tot), fa_k / fa_n if fa_n else np.nan),
        "d_prime": np.where(valid, dprime, np.nan),
        "d_prime_low": np.where(valid, dlow, np.nan),
        "d_prime_high": np.where(valid, dhigh, np.nan),
        "criterion": np.where(valid, crit, np.nan),
        "criterion_low": np.where(valid, clow, np.nan),
        "criterion_high": np.where(valid, chigh, np.nan),
    }
    for name, values in cols.items():
        out[name] = np.asarray(values)[main]
    return out.reset_index(drop=True)


def signal_detection(
    pairs: pd.DataFrame, judgments: pd.DataFrame, *, n_boot: int = 1000, seed: int = 0
) -> pd.DataFrame:
    """Equal-variance signal detection per condition against the sentinel false alarms.

    ``H = (hits + 0.5) / (n + 1)`` and ``F = (false alarms + 0.5) / (n_sentinel + 1)``: the
    log-linear correction (Hautus 1995), applied to every cell so rates of 0 or 1 stay finite
    and all cells are treated alike. ``d′ = Φ⁻¹(H) − Φ⁻¹(F)``, criterion
    ``c = −(Φ⁻¹(H) + Φ⁻¹(F)) / 2`` (Macmillan & Creelman 2005). Intervals: participant
    bootstrap 95 % percentile, hits and false alarms resampled together.

    Columns: ``condition, threat_model, bound, label, n_judgments, hits, hit_rate (raw),
    n_sentinel, false_alarms, fa_rate (raw), d_prime, d_prime_low, d_prime_high, criterion,
    criterion_low, criterion_high``. NaN without judgments or without sentinel judgments.
    """
    return _sdt(_prepare(pairs, judgments), n_boot, seed)


# ------------------------------------------------------------------------------ correlations
def _rowwise_pearson(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson r per row of two ``(B, C)`` arrays (NaN where a row is constant)."""
    xm = x - x.mean(1, keepdims=True)
    ym = y - y.mean(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (xm * ym).sum(1) / np.sqrt((xm * xm).sum(1) * (ym * ym).sum(1))


def _rowwise_spearman(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return _rowwise_pearson(stats.rankdata(x, axis=1), stats.rankdata(y, axis=1))


def _correlations(prep: _Prepared, n_boot: int, seed: int, weights=None) -> pd.DataFrame:
    info = prep.group_info
    gcode = prep.pairs["gcode"].to_numpy()
    k_tot, n_tot = np.zeros(prep.n_groups), np.zeros(prep.n_groups)
    np.add.at(k_tot, gcode[prep.j_pair], prep.j_diff)
    np.add.at(n_tot, gcode[prep.j_pair], 1.0)
    cond = (~info["condition"].isin(CONTROLS).to_numpy()) & (n_tot > 0)
    cidx = np.flatnonzero(cond)
    nc = len(cidx)
    # pairs of the judged conditions; code −1 for everything else
    remap = np.full(prep.n_groups, -1)
    remap[cidx] = np.arange(nc)
    pgroup = remap[gcode]
    dist_cols = distance_columns(prep.pairs.drop(columns=["gcode"]))

    # two-way bootstrap: participant weights × pair weights, via a sparse participant × pair
    # count matrix (Σ_j w_p[part_j] w_q[pair_j] d_j = rows of (W_p M) · W_q).
    if n_boot and nc >= 3:
        wq = pair_weights(pgroup, n_boot, seed)
        shape = (prep.n_participants, len(prep.pairs))
        m_n = sparse.csr_matrix(
            (np.ones(len(prep.j_pair)), (prep.j_part, prep.j_pair)), shape=shape
        )
        m_k = sparse.csr_matrix((prep.j_diff, (prep.j_part, prep.j_pair)), shape=shape)
        onehot = sparse.csr_matrix(
            (np.ones((pgroup >= 0).sum()), (np.flatnonzero(pgroup >= 0), pgroup[pgroup >= 0])),
            shape=(len(prep.pairs), nc),
        )
        # (B × Q) per-pair weighted counts, then × pair weights, summed per condition;
        # participant weights chunk by chunk to bound memory
        # float32 for the big sparse × dense products: every value is a small integer count
        # (exact below 2**24), and the products are memory-bound, so this halves their time
        m_kt = m_k.T.tocsr().astype(np.float32)
        m_nt = m_n.T.tocsr().astype(np.float32)
        oht = onehot.T.tocsr()
        parts, row = [], 0
        for wp in _weight_chunks(prep.n_participants, n_boot, seed, weights):
            sl = slice(row, row + len(wp))
            wpt = np.ascontiguousarray(wp.T, dtype=np.float32)
            kq = np.asarray(m_kt @ wpt, dtype=float).T * wq[sl]
            nq = np.asarray(m_nt @ wpt, dtype=float).T * wq[sl]
            with np.errstate(invalid="ignore", divide="ignore"):
                parts.append(np.asarray(oht @ kq.T).T / np.asarray(oht @ nq.T).T)
            row += len(wp)
        yb = np.concatenate(parts)
    else:
        wq = yb = None
    y = k_tot[cidx] / np.maximum(n_tot[cidx], 1)
    rows = []
    for c in dist_cols:
        d = distance_values(prep.pairs, c)
        ok = (~np.isnan(d)) & (pgroup >= 0)
        s = np.bincount(pgroup[ok], weights=d[ok], minlength=nc)
        m = np.bincount(pgroup[ok], minlength=nc)
        with np.errstate(invalid="ignore", divide="ignore"):
            x = s / m
        good = ~np.isnan(x)
        row = {"distance": c, "transform": "1-x" if c in SIMILARITY_COLUMNS else "x",
               "n_conditions": int(good.sum())}
        if good.sum() >= 3 and np.std(x[good]) > 0 and np.std(y[good]) > 0:
            r, p = stats.pearsonr(x[good], y[good])
            rho, prho = stats.spearmanr(x[good], y[good])
        else:
            r = p = rho = prho = math.nan
        row.update({"r": float(r), "p_value": float(p), "rho": float(rho),
                    "rho_p_value": float(prho)})
        if yb is not None and good.sum() >= 3 and not math.isnan(r):
            dz = np.where(ok, d, 0.0)
            with np.errstate(invalid="ignore", divide="ignore"):
                xb = np.asarray(onehot.T @ (wq * dz).T).T / np.asarray(
                    onehot.T @ (wq * ok).T
                ).T
            xb, ybg = xb[:, good], yb[:, good]
            rb = _rowwise_pearson(xb, ybg)
            rhob = _rowwise_spearman(xb, ybg)
            rhob[~np.isfinite(rb)] = np.nan
            (row["r_low"], row["r_high"]) = map(float, _percentile_interval(rb))
            (row["rho_low"], row["rho_high"]) = map(float, _percentile_interval(rhob))
        else:
            row.update(r_low=math.nan, r_high=math.nan, rho_low=math.nan, rho_high=math.nan)
        rows.append(row)
    cols = ["distance", "transform", "n_conditions", "r", "r_low", "r_high", "p_value", "rho",
            "rho_low", "rho_high", "rho_p_value"]
    return pd.DataFrame(rows, columns=cols)


def _legacy_correlations(table: pd.DataFrame) -> pd.DataFrame:
    """The pre-issue-8 form: Pearson r from a perceptibility table (raw SSIM, no intervals)."""
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
        rows.append({"distance": col.removeprefix("mean_"), "r": float(r), "p_value": float(p),
                     "n_conditions": n})
    return pd.DataFrame(rows, columns=["distance", "r", "p_value", "n_conditions"])


def distance_correlations(
    pairs: pd.DataFrame,
    judgments: pd.DataFrame | None = None,
    *,
    n_boot: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """How well each distance predicts perceptibility across conditions (PAT Fig. 4c).

    For each distance column, ``x_c`` is the mean distance of condition ``c``'s pairs (SSIM
    as ``1 − SSIM``, so every good distance has a positive r) and ``y_c`` its perceptibility;
    judged non-control conditions only. ``r`` Pearson, ``rho`` Spearman (with scipy's p-values).
    Intervals: 95 % percentile bootstrap resampling participants *and* pairs (pairs within
    their condition; a resampled pair brings its distance and all its judgments, weighted by
    its participants' weights). NaN with fewer than 3 conditions.

    Columns: ``distance, transform ("x" or "1-x"), n_conditions, r, r_low, r_high, p_value,
    rho, rho_low, rho_high, rho_p_value``.

    Deprecated form kept for old callers: ``distance_correlations(perceptibility_table)``
    (no judgments) returns the former ``distance, r, p_value, n_conditions`` from the
    table's ``mean_*`` columns, SSIM raw.
    """
    if judgments is None:
        if isinstance(pairs, pd.DataFrame) and "perceptibility" in pairs.columns:
            return _legacy_correlations(pairs)
        raise ValueError("distance_correlations needs pairs and judgments")
    return _correlations(_prepare(pairs, judgments), n_boot, seed)


# ----------------------------------------------------------------------------- per pair
def weighted_roc_auc(score: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> float:
    """ROC AUC of ``score`` for items with positive weight ``pos`` and negative weight ``neg``.

    Mann–Whitney form with ties counted one half:
    ``AUC = Σ_i pos_i (N_below(i) + ½ N_tied(i)) / (Σ pos · Σ neg)`` (Hanley & McNeil 1982);
    equal to sklearn's ``roc_auc_score`` on the expanded per-judgment labels.
    """
    score, pos, neg = (np.asarray(a, float) for a in (score, pos, neg))
    if pos.sum() == 0 or neg.sum() == 0:
        return math.nan
    uniq, inv = np.unique(score, return_inverse=True)
    p = np.bincount(inv, weights=pos, minlength=len(uniq))
    n = np.bincount(inv, weights=neg, minlength=len(uniq))
    below = np.concatenate([[0.0], np.cumsum(n)[:-1]])
    return float((p * (below + 0.5 * n)).sum() / (pos.sum() * neg.sum()))


def weighted_average_precision(score: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> float:
    """Average precision ``Σ_t (R_t − R_{t−1}) P_t`` over descending score thresholds ``t``,
    tied scores forming one threshold, no interpolation — sklearn's ``average_precision_score``
    on the expanded per-judgment labels."""
    score, pos, neg = (np.asarray(a, float) for a in (score, pos, neg))
    if pos.sum() == 0:
        return math.nan
    uniq, inv = np.unique(-score, return_inverse=True)
    p = np.cumsum(np.bincount(inv, weights=pos, minlength=len(uniq)))
    n = np.cumsum(np.bincount(inv, weights=neg, minlength=len(uniq)))
    precision = p / (p + n)
    recall = p / p[-1]
    return float(np.sum(np.diff(np.concatenate([[0.0], recall])) * precision))


def jnd_map(distance: np.ndarray, same_fraction: np.ndarray) -> float:
    """JND mAP in the LPIPS repository's convention (``lpips.score_jnd_dataset`` + ``voc_ap``),
    made tie-aware so that it does not depend on the order of the rows.

    The positives are the fraction of people answering *same*, ranked by ascending distance:
    at each distinct distance ``d`` (all pairs with distance ≤ ``d`` retrieved at once),
    ``TP = Σ s``, ``FP = Σ (1 − s)``, precision ``TP/(TP+FP)``, recall ``TP/Σs``; the area is
    the VOC 2010 interpolated AP (precision made monotone from the right; Zhang et al. 2018)
    of these points, i.e. ``lpips.voc_ap(recall, precision)`` on one point per distinct
    distance.

    Relation to the authors' code: without tied distances this *is* their number (same points,
    same ``voc_ap``). With ties their ``np.argsort`` walks the tied pairs one by one in row
    order, adding intermediate precision/recall points that depend on that order (on the demo,
    L∞ gave 0.694–0.737 over orders); here a tie is one threshold, as in sklearn's
    ``average_precision_score`` (which is the non-interpolated area of the same points).
    """
    d = np.asarray(distance, float)
    s = np.asarray(same_fraction, float)
    if len(d) == 0 or s.sum() == 0:
        return math.nan
    uniq, inv = np.unique(d, return_inverse=True)  # ascending distinct distances
    tp = np.cumsum(np.bincount(inv, weights=s, minlength=len(uniq)))
    fp = np.cumsum(np.bincount(inv, weights=1 - s, minlength=len(uniq)))
    precs = tp / (tp + fp)
    recs = tp / tp[-1]
    # voc_ap (lpips/trainer.py), vectorised: the running max from the right replaces its loop.
    mrec = np.concatenate(([0.0], recs, [1.0]))
    mpre = np.concatenate(([0.0], precs, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def _pair_prediction(prep: _Prepared) -> pd.DataFrame:
    q = len(prep.pairs)
    k = np.bincount(prep.j_pair, weights=prep.j_diff, minlength=q)
    n = np.bincount(prep.j_pair, minlength=q).astype(float)
    main = ~(prep.is_sentinel | prep.is_catch) & (n > 0)
    rows = []
    for c in distance_columns(prep.pairs.drop(columns=["gcode"])):
        d = distance_values(prep.pairs, c)
        ok = main & ~np.isnan(d)
        dk, dn = d[ok], n[ok]
        kk = k[ok]
        rows.append({
            "distance": c,
            "transform": "1-x" if c in SIMILARITY_COLUMNS else "x",
            "n_pairs": int(ok.sum()),
            "n_judgments": int(dn.sum()),
            "roc_auc": weighted_roc_auc(dk, kk, dn - kk),
            "ap_different": weighted_average_precision(dk, kk, dn - kk),
            "jnd_map": jnd_map(dk, (dn - kk) / dn) if ok.any() else math.nan,
        })
    cols = ["distance", "transform", "n_pairs", "n_judgments", "roc_auc", "ap_different",
            "jnd_map"]
    return pd.DataFrame(rows, columns=cols)


def pair_prediction(pairs: pd.DataFrame, judgments: pd.DataFrame) -> pd.DataFrame:
    """Per-pair prediction of "different" by each distance (judged non-control pairs).

    - ``roc_auc``: every judgment is an instance labelled "different"/"same" scored by its
      pair's distance (1 − SSIM for SSIM); :func:`weighted_roc_auc` (= sklearn
      ``roc_auc_score``).
    - ``ap_different``: average precision of the distance ranking "different" judgments
      first (= sklearn ``average_precision_score``; ties grouped, no interpolation).
    - ``jnd_map``: the LPIPS/BAPPS JND mAP (:func:`jnd_map`): positives are the fraction
      answering *same*, ranked by ascending distance, VOC-interpolated, tied distances one
      threshold (independent of row order) — the number comparable to published BAPPS JND
      scores (equal to the authors' code when no distances tie).

    Columns: ``distance, transform, n_pairs, n_judgments, roc_auc, ap_different, jnd_map``.
    """
    return _pair_prediction(_prepare(pairs, judgments))


# ------------------------------------------------------------------------------ agreement
def nominal_alpha_from_counts(counts: np.ndarray) -> float:
    """Krippendorff's α for nominal data from a ``(units × values)`` count matrix, via the
    ``krippendorff`` package (units with fewer than two judgments are not pairable)."""
    import krippendorff

    counts = np.asarray(counts, float)
    counts = counts[counts.sum(1) >= 2]
    if len(counts) == 0 or (counts.sum(0) > 0).sum() < 2:
        return math.nan
    return float(krippendorff.alpha(value_counts=counts, level_of_measurement="nominal"))


def _agreement(prep: _Prepared) -> pd.DataFrame:
    q = len(prep.pairs)
    k = np.bincount(prep.j_pair, weights=prep.j_diff, minlength=q)
    n = np.bincount(prep.j_pair, minlength=q).astype(float)
    gcode = prep.pairs["gcode"].to_numpy()
    rows = []
    for g, info in prep.group_info.iterrows():
        sel = (gcode == g) & (n >= 2)
        counts = np.stack([n[sel] - k[sel], k[sel]], axis=1)
        rows.append({
            "condition": info["condition"], "threat_model": info["threat_model"],
            "bound": info["bound"], "label": info["label"],
            "n_pairs": int(sel.sum()), "n_judgments": int(n[sel].sum()),
            "alpha": nominal_alpha_from_counts(counts),
        })
    cols = ["condition", "threat_model", "bound", "label", "n_pairs", "n_judgments", "alpha"]
    return pd.DataFrame(rows, columns=cols)


def agreement(pairs: pd.DataFrame, judgments: pd.DataFrame) -> pd.DataFrame:
    """Rater agreement per condition: Krippendorff's α (nominal, Krippendorff 2011) over its
    pairs as units and the "same"/"different" answers as values, computed with the
    ``krippendorff`` package from per-pair value counts (pairs with ≥ 2 judgments).
    ``α = 1 − D_o / D_e`` (observed over expected disagreement); 1 perfect, 0 chance; NaN
    when undefined (no pairable unit or a single value used).

    Columns: ``condition, threat_model, bound, label, n_pairs, n_judgments, alpha``.
    """
    return _agreement(_prepare(pairs, judgments))


def _participants(prep: _Prepared) -> pd.DataFrame:
    p = prep.n_participants
    kind = np.where(prep.is_sentinel, 1, np.where(prep.is_catch, 2, 0))[prep.j_pair]
    flat = prep.j_part * 3 + kind
    n = np.bincount(flat, minlength=3 * p).reshape(p, 3).astype(float)
    k = np.bincount(flat, weights=prep.j_diff, minlength=3 * p).reshape(p, 3)
    z = stats.norm.ppf
    h, f = log_linear_rate(k[:, 0], n[:, 0]), log_linear_rate(k[:, 1], n[:, 1])
    with np.errstate(invalid="ignore", divide="ignore"):
        out = pd.DataFrame({
            "participant": prep.participants,
            "n_judgments": n.sum(1).astype(int),
            "n_adversarial": n[:, 0].astype(int),
            "hit_rate": np.where(n[:, 0] > 0, k[:, 0] / n[:, 0], np.nan),
            "n_sentinel": n[:, 1].astype(int),
            "fa_rate": np.where(n[:, 1] > 0, k[:, 1] / n[:, 1], np.nan),
            "n_catch": n[:, 2].astype(int),
            "catch_hit_rate": np.where(n[:, 2] > 0, k[:, 2] / n[:, 2], np.nan),
            "d_prime": z(h) - z(f),
            "criterion": -(z(h) + z(f)) / 2,
        })
    return out


def participant_sensitivity(pairs: pd.DataFrame, judgments: pd.DataFrame) -> pd.DataFrame:
    """Per participant: hit rate on adversarial pairs, false-alarm rate on sentinels, catch hit
    rate, and d′/c with the log-linear correction (as :func:`signal_detection`).

    Columns: ``participant, n_judgments, n_adversarial, hit_rate, n_sentinel, fa_rate,
    n_catch, catch_hit_rate, d_prime, criterion`` (raw rates; NaN where no trials).
    """
    return _participants(_prepare(pairs, judgments))


# --------------------------------------------------------------------------------- table 4
def _table4(prep: _Prepared, strength: pd.DataFrame | None, n_boot: int, seed: int,
            boot=None) -> pd.DataFrame:
    k, n = prep.counts("group")
    info = prep.group_info
    main = np.flatnonzero(~info["condition"].isin(CONTROLS).to_numpy())
    keys = info.loc[main, ["threat_model", "bound"]].astype({"bound": float})
    cells = keys.drop_duplicates().sort_values(["threat_model", "bound"]).reset_index(drop=True)
    cell_of = keys.merge(cells.reset_index(), on=["threat_model", "bound"])["index"].to_numpy()
    onehot = np.zeros((prep.n_groups, len(cells)))
    onehot[main, cell_of] = 1.0
    kc, nc = k @ onehot, n @ onehot
    k_tot, n_tot = kc.sum(0), nc.sum(0)
    if boot is not None:  # the groups' replicate counts, summed into cells (same draws)
        kcb, ncb = boot[2] @ onehot, boot[3] @ onehot
    else:
        kcb, ncb = bootstrap_products(prep.n_participants, n_boot, seed, kc, nc)
    with np.errstate(invalid="ignore", divide="ignore"):
        rb = kcb / ncb
    blow, bhigh = _percentile_interval(rb)
    low, high = _wilson_arrays(k_tot, n_tot)
    table = cells.copy()
    labels = info.loc[main].groupby(["threat_model", "bound"])["label"].first()
    table["label"] = [labels.get((t, b), "") for t, b in zip(table["threat_model"],
                                                             table["bound"], strict=True)]
    table["n_pairs"] = (info["n_pairs"].to_numpy() @ onehot).astype(int)
    table["n_judgments"] = n_tot.astype(int)
    with np.errstate(invalid="ignore", divide="ignore"):
        table["perceptibility"] = np.where(n_tot > 0, k_tot / n_tot, np.nan)
    table["ci_low"], table["ci_high"] = low, high
    table["boot_low"] = np.where(n_tot > 0, blow, np.nan)
    table["boot_high"] = np.where(n_tot > 0, bhigh, np.nan)
    # strength from the pairs' success flags
    table["n_success_known"] = 0
    table["strength"] = np.nan
    table["strength_source"] = None
    if "success" in prep.pairs:
        sub = prep.pairs[prep.pairs["success"].notna() & ~prep.pairs["group"].isin(CONTROLS)]
        if len(sub):
            agg = sub.assign(success=sub["success"].astype(bool).astype(float)).groupby(
                ["threat_model", "bound"])["success"].agg(["mean", "size"])
            for i, (t, b) in enumerate(zip(table["threat_model"], table["bound"], strict=True)):
                if (t, b) in agg.index:
                    table.loc[i, "strength"] = agg.loc[(t, b), "mean"]
                    table.loc[i, "n_success_known"] = int(agg.loc[(t, b), "size"])
                    table.loc[i, "strength_source"] = "pairs"
    table["accuracy"] = np.nan
    if strength is not None:
        need = {"threat_model", "bound"}
        if not isinstance(strength, pd.DataFrame) or not need <= set(strength.columns) or not (
            {"accuracy", "success_rate"} & set(strength.columns)
        ):
            raise ValueError("strength must be a DataFrame with threat_model, bound and "
                             "accuracy or success_rate columns")
        ev = strength.copy()
        ev["bound"] = ev["bound"].astype(float)
        ev = ev.groupby(["threat_model", "bound"]).mean(numeric_only=True)
        for i, (t, b) in enumerate(zip(table["threat_model"], table["bound"], strict=True)):
            if (t, b) not in ev.index:
                continue
            e = ev.loc[(t, b)]
            if "accuracy" in ev.columns and not pd.isna(e.get("accuracy")):
                table.loc[i, "accuracy"] = e["accuracy"]
            s = e.get("success_rate") if "success_rate" in ev.columns else math.nan
            if pd.isna(s) and not pd.isna(table.loc[i, "accuracy"]):
                s = 1.0 - table.loc[i, "accuracy"]
            if not pd.isna(s):
                table.loc[i, "strength"] = s
                table.loc[i, "strength_source"] = "evaluation"
    return table


def table4(
    pairs: pd.DataFrame,
    judgments: pd.DataFrame,
    *,
    strength: pd.DataFrame | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """The PAT paper's table 4 (appendix D) in long form: one row per threat model × bound.

    Perceptibility pools every condition with that threat model and bound (Wilson and
    participant-bootstrap 95 % intervals). *Strength* is the attack success rate: by default
    the mean of the pairs' ``success`` flags (``strength_source = "pairs"``); a supplied
    ``strength`` frame with ``threat_model, bound`` and ``success_rate`` or ``accuracy``
    (defense evaluation; strength = ``success_rate``, else ``1 − accuracy``) takes precedence
    (``"evaluation"``).

    Columns: ``threat_model, bound, label, n_pairs, n_judgments, perceptibility, ci_low,
    ci_high, boot_low, boot_high, n_success_known, strength, strength_source, accuracy``.
    """
    return _table4(_prepare(pairs, judgments), strength, n_boot, seed)


def pair_distances(pairs: pd.DataFrame) -> pd.DataFrame:
    """Long frame of non-control pairs' distances (Fig. 5): ``pair, condition, threat_model,
    bound, label, distance, value`` (SSIM as 1 − SSIM)."""
    prep_pairs = pairs.copy()
    if "label" not in prep_pairs:
        prep_pairs["label"] = ""
    ctrl = prep_pairs["is_sentinel"].fillna(False).astype(bool)
    if "is_catch" in prep_pairs:
        ctrl |= prep_pairs["is_catch"].fillna(False).astype(bool)
    main = prep_pairs[~ctrl]
    parts = []
    for c in distance_columns(pairs):
        parts.append(main[["pair", "condition", "threat_model", "bound", "label"]].assign(
            distance=c, value=distance_values(main, c)))
    if not parts:
        return pd.DataFrame(columns=["pair", "condition", "threat_model", "bound", "label",
                                     "distance", "value"])
    return pd.concat(parts, ignore_index=True)


# ---------------------------------------------------------------------------------- report
def _json_safe(value):
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is pd.NA or value is pd.NaT:
        return None
    return value


def frame_records(frame: pd.DataFrame) -> list[dict]:
    """A DataFrame as JSON-safe records (NaN/inf → None, numpy scalars → Python)."""
    return [_json_safe(r) for r in frame.astype(object).to_dict(orient="records")]


@dataclass
class AnalysisReport:
    """Every table of :func:`analyze` plus the exclusion counts.

    ``to_json()`` keys: ``meta`` (n_boot, seed, include_excluded, include_simulated,
    n_pairs, n_judgments, n_participants), ``exclusions`` (the :func:`apply_exclusions`
    counts), and one list of records per table: ``perceptibility, controls,
    signal_detection, correlations, pair_prediction, agreement, participants, table4``.
    ``tables()`` returns the same tables (and ``pair_distances``) as DataFrames.
    """

    perceptibility: pd.DataFrame
    controls: pd.DataFrame
    signal_detection: pd.DataFrame
    correlations: pd.DataFrame
    pair_prediction: pd.DataFrame
    agreement: pd.DataFrame
    participants: pd.DataFrame
    table4: pd.DataFrame
    pair_distances: pd.DataFrame
    exclusions: dict
    meta: dict = field(default_factory=dict)

    TABLES = ("perceptibility", "controls", "signal_detection", "correlations",
              "pair_prediction", "agreement", "participants", "table4")

    def tables(self) -> dict[str, pd.DataFrame]:
        out = {name: getattr(self, name) for name in self.TABLES}
        out["pair_distances"] = self.pair_distances
        return out

    def to_json(self) -> dict:
        out = {"meta": _json_safe(dict(self.meta)), "exclusions": _json_safe(dict(self.exclusions))}
        for name in self.TABLES:
            out[name] = frame_records(getattr(self, name))
        return out


def analyze(
    pairs: pd.DataFrame,
    judgments: pd.DataFrame,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    include_excluded: bool = False,
    include_simulated: bool = False,
    strength: pd.DataFrame | None = None,
) -> AnalysisReport:
    """Apply exclusions, then compute every table (same bootstrap draws throughout)."""
    _check_frames(pairs, judgments)
    kept, counts = apply_exclusions(
        judgments, include_excluded=include_excluded, include_simulated=include_simulated
    )
    prep = _prepare(pairs, kept)
    # participant bootstrap weights drawn once, shared by every table
    weights = SharedWeights(prep.n_participants, n_boot, seed)
    boot = _group_rates(prep, n_boot, seed, weights)
    return AnalysisReport(
        perceptibility=_perceptibility(prep, n_boot, seed, boot),
        controls=_controls(prep, n_boot, seed, boot),
        signal_detection=_sdt(prep, n_boot, seed, boot),
        correlations=_correlations(prep, n_boot, seed, weights),
        pair_prediction=_pair_prediction(prep),
        agreement=_agreement(prep),
        participants=_participants(prep),
        table4=_table4(prep, strength, n_boot, seed, boot),
        pair_distances=pair_distances(pairs),
        exclusions=counts,
        meta={"n_boot": n_boot, "seed": seed, "include_excluded": include_excluded,
              "include_simulated": include_simulated, "n_pairs": int(len(pairs)),
              "n_judgments": int(len(kept)), "n_participants": prep.n_participants},
    )
