"""A study's pairs and judgments as the DataFrames the engine reads (the Django ↔ engine boundary).

``pairs``: one row per pair — ``pair`` (id), ``condition`` (spec; None for controls),
``threat_model``, ``bound`` (the threat model's own units), ``label``, ``is_sentinel``,
``is_catch``, ``success`` (attack success stored with the pair; NaN when unknown), ``level``
(ladder index, NaN outside adaptive ladders), ``size_ratio`` (stored size ÷ bound, NaN when
unknown: controls, unbounded threat models, pairs made before stimulus mode) and one float
column per stored distance (``l2``, ``linf``, ``ssim``, ``lpips_alexnet`` ...; NaN where a pair
lacks it).

``judgments``: one row per main-trial judgment (practice never) — ``pair``, ``different``
(bool), ``participant``, ``session`` (ids), ``excluded`` (the session was excluded by quality
control), ``simulated`` (a simulated observer), ``response_ms``.

Both are read with ``values_list``'s SQL in chunks (no model instances), so a million judgments cost
a few seconds and a few hundred MB at most; nothing is filtered here except where asked, so
the engine sees (and counts) exclusions itself.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from django.db import connections

from .models import Judgment, Pair, Study

PAIR_COLUMNS = [
    "pair", "condition", "threat_model", "bound", "label", "is_sentinel", "is_catch",
    "success", "level", "size_ratio",
]
JUDGMENT_COLUMNS = [
    "pair", "different", "participant", "session", "excluded", "simulated", "response_ms",
]
CHUNK = 20_000


def pairs_frame(study: Study) -> pd.DataFrame:
    """One row per pair of ``study`` (see the module docstring), ordered by pair id."""
    rows = list(
        Pair.objects.filter(study=study)
        .order_by("id")
        .values_list(
            "id", "condition__spec", "condition__threat_model", "condition__bound",
            "condition__label", "is_sentinel", "is_catch", "attack_success", "level",
            "distances", "metadata__size_ratio",
        )
    )
    if not rows:
        return pd.DataFrame(columns=PAIR_COLUMNS)
    columns = list(zip(*rows, strict=True))
    frame = pd.DataFrame(
        {
            "pair": np.asarray(columns[0], dtype=np.int64),
            "condition": pd.Series(columns[1], dtype=object),
            "threat_model": pd.Series(columns[2], dtype=object),
            "bound": pd.to_numeric(pd.Series(columns[3], dtype=object), errors="coerce"),
            "label": pd.Series([lab or "" for lab in columns[4]], dtype=object),
            "is_sentinel": np.asarray(columns[5], dtype=bool),
            "is_catch": np.asarray(columns[6], dtype=bool),
            "success": pd.Series(
                [np.nan if s is None else float(s) for s in columns[7]], dtype=float
            ),
            "level": pd.Series(
                [np.nan if v is None else float(v) for v in columns[8]], dtype=float
            ),
        }
    )
    frame["size_ratio"] = pd.Series(
        [np.nan if v is None else float(v) for v in columns[10]], dtype=float
    )
    distances = pd.DataFrame.from_records([d or {} for d in columns[9]])
    for name in sorted(distances.columns):
        if name not in frame:
            frame[name] = pd.to_numeric(distances[name], errors="coerce").astype(float)
    return frame


def judgments_frame(
    study: Study,
    *,
    completed_only: bool = False,
    include_excluded: bool = True,
    include_simulated: bool = True,
) -> pd.DataFrame:
    """One row per main-trial judgment of ``study`` (see the module docstring), by id.

    By default every judgment is returned with its ``excluded`` and ``simulated`` flags, so the
    engine can apply and count exclusions; the ``include_*`` flags drop rows here instead.
    """
    queryset = Judgment.objects.filter(
        trial__session__participant__study=study, trial__is_practice=False
    )
    if completed_only:
        queryset = queryset.filter(trial__session__completed_at__isnull=False)
    if not include_excluded:
        queryset = queryset.filter(trial__session__excluded=False)
    if not include_simulated:
        queryset = queryset.filter(trial__session__participant__is_simulated=False)
    rows = queryset.order_by("id").values_list(
        "trial__pair_id", "response", "trial__session__participant_id", "trial__session_id",
        "trial__session__excluded", "trial__session__participant__is_simulated",
        "response_time_ms",
    )
    # The queryset's own SQL through a plain cursor: Django's per-row field converters cost
    # more than the query at a million rows, and every column here is a plain scalar.
    sql, params = rows.query.sql_with_params()
    records: list[tuple] = []
    with connections[rows.db].cursor() as cursor:
        cursor.execute(sql, params)
        while batch := cursor.fetchmany(CHUNK):
            records.extend(batch)
    raw = pd.DataFrame.from_records(
        records,
        columns=["pair", "response", "participant", "session", "excluded", "simulated",
                 "response_ms"],
        nrows=None,
    )
    return pd.DataFrame(
        {
            "pair": raw["pair"].to_numpy(dtype=np.int64),
            "different": (raw["response"] == "different").to_numpy(dtype=bool),
            "participant": raw["participant"].to_numpy(dtype=np.int64),
            "session": raw["session"].to_numpy(dtype=np.int64),
            "excluded": raw["excluded"].to_numpy(dtype=bool),
            "simulated": raw["simulated"].to_numpy(dtype=bool),
            "response_ms": raw["response_ms"].to_numpy(dtype=float),
        },
        columns=JUDGMENT_COLUMNS,
    )


def study_frames(
    study: Study,
    *,
    completed_only: bool = False,
    include_excluded: bool = False,
    include_simulated: bool = False,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(pairs, judgments)`` of ``study``: excluded and simulated sessions left out by default."""
    return pairs_frame(study), judgments_frame(
        study,
        completed_only=completed_only,
        include_excluded=include_excluded,
        include_simulated=include_simulated,
    )
