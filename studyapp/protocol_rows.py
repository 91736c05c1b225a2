"""A non-JND study's judgments as the engine's protocol rows (issue 18; the Django ↔ engine
boundary for ``engine.protocol_analysis``, as :mod:`studyapp.frames` is for JND).

One row per **main-trial** judgment (practice never), in judgment order, in the formats of
the issue-18 contract (``_brief/PROTOCOLS.md``, "Engine analysis row formats"):

- 2AFC (:func:`twoafc_rows`): ``participant`` (str), ``item`` (the pair's key), ``chose_b``
  (bool: the side pressed showed copy B; copy A is on the left when ``Trial.natural_first``),
  ``condition_a``, ``condition_b`` (condition specs; :data:`REFERENCE` for a copy that *is*
  the reference, as in a control triplet), ``is_control`` and per stored distance NAME
  ``a_NAME``, ``b_NAME`` (reference ↔ A, reference ↔ B, as stored: similarities such as
  ``ssim`` stay similarities, the engine turns them into 1 − ssim). A side identical to the
  reference has distance 0 (similarity 1) where nothing is stored.
- Rating (:func:`rating_rows`): ``participant``, ``item``, ``rating`` (int 1..N),
  ``condition`` (spec; :data:`ANCHOR` for an identical-pair anchor), ``is_control``,
  ``is_repeat``, per distance ``d_NAME`` (anchors: 0, or similarity 1, where not stored).
- Label (:func:`label_rows`): ``participant``, ``item``, ``response``, ``true_label``,
  ``threat_model`` (:data:`GOLD` for gold items), ``bound`` (0 for gold items), ``is_gold``,
  ``level`` (float: NaN outside ladders).

Every frame also carries ``session`` (id), ``excluded``, ``simulated`` and ``response_ms``;
``include_excluded`` / ``include_simulated`` drop rows here (both left out by default, as in
``manage.py analyze``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .models import Judgment, Study

REFERENCE = "reference"  # condition of a 2AFC copy identical to the reference
ANCHOR = "anchor"  # condition of a rating identical-pair anchor
GOLD = "gold"  # threat model of a label gold item
#: Stored similarities (1 = identical); every other stored distance is 0 for identical images.
SIMILARITIES = ("ssim",)
COMMON = ["session", "excluded", "simulated", "response_ms"]
TWOAFC_COLUMNS = ["participant", "item", "chose_b", "condition_a", "condition_b", "is_control"]
RATING_COLUMNS = ["participant", "item", "rating", "condition", "is_control", "is_repeat"]
LABEL_COLUMNS = ["participant", "item", "response", "true_label", "threat_model", "bound",
                 "is_gold", "level"]


class ProtocolMismatch(ValueError):
    """Rows of one protocol were asked of a study of another."""


def _judgments(study: Study, protocol: str, *, include_excluded: bool,
               include_simulated: bool, completed_only: bool):
    if study.protocol != protocol:
        raise ProtocolMismatch(
            f"study {study.slug!r} runs the {study.protocol} protocol, not {protocol}")
    queryset = Judgment.objects.filter(
        trial__session__participant__study=study, trial__is_practice=False)
    if completed_only:
        queryset = queryset.filter(trial__session__completed_at__isnull=False)
    if not include_excluded:
        queryset = queryset.filter(trial__session__excluded=False)
    if not include_simulated:
        queryset = queryset.filter(trial__session__participant__is_simulated=False)
    return queryset.order_by("id")


def _common(row: tuple) -> dict:
    participant, session, excluded, simulated, rt = row
    return {"participant": str(participant), "session": int(session),
            "excluded": bool(excluded), "simulated": bool(simulated),
            "response_ms": float(rt)}


COMMON_FIELDS = ("trial__session__participant_id", "trial__session_id",
                 "trial__session__excluded", "trial__session__participant__is_simulated",
                 "response_time_ms")


def _identical_value(name: str) -> float:
    """A distance between identical images: 1 for similarities, 0 otherwise."""
    return 1.0 if name in SIMILARITIES else 0.0


def _frame(records: list[dict], columns: list[str], names: list[str],
           prefixes: tuple[str, ...]) -> pd.DataFrame:
    distance_columns = [f"{p}{n}" for p in prefixes for n in names]
    frame = pd.DataFrame.from_records(records, columns=columns + distance_columns + COMMON)
    for c in distance_columns:
        frame[c] = pd.to_numeric(frame[c], errors="coerce").astype(float)
    return frame


def twoafc_rows(study: Study, *, include_excluded: bool = False,
                include_simulated: bool = False, completed_only: bool = False) -> pd.DataFrame:
    """2AFC rows of ``study`` (see the module docstring)."""
    rows = _judgments(study, "2afc", include_excluded=include_excluded,
                      include_simulated=include_simulated,
                      completed_only=completed_only).values_list(
        "response", "trial__natural_first", "trial__pair__key", "trial__pair__is_sentinel",
        "trial__pair__condition__spec", "trial__pair__condition_b__spec",
        "trial__pair__natural_path", "trial__pair__other_path", "trial__pair__third_path",
        "trial__pair__distances", "trial__pair__distances_b", *COMMON_FIELDS)
    records, names = [], set()
    for (response, natural_first, key, is_sentinel, spec_a, spec_b, natural, a, b, dist_a,
         dist_b, *common) in rows:
        dist_a, dist_b = dict(dist_a or {}), dict(dist_b or {})
        names |= set(dist_a) | set(dist_b)
        pressed_left = response == "left"
        record = {
            "item": key, "chose_b": pressed_left != bool(natural_first),
            "condition_a": spec_a or (REFERENCE if a == natural else ""),
            "condition_b": spec_b or (REFERENCE if b == natural else ""),
            "is_control": bool(is_sentinel), **_common(tuple(common)),
            "_a": (dist_a, a == natural), "_b": (dist_b, b == natural),
        }
        records.append(record)
    names = sorted(names)
    for record in records:
        for prefix, (dist, identical) in (("a_", record.pop("_a")), ("b_", record.pop("_b"))):
            for n in names:
                value = dist.get(n)
                record[prefix + n] = (_identical_value(n) if value is None and identical
                                      else value)
    return _frame(records, TWOAFC_COLUMNS, names, ("a_", "b_"))


def rating_rows(study: Study, *, include_excluded: bool = False,
                include_simulated: bool = False, completed_only: bool = False) -> pd.DataFrame:
    """Rating rows of ``study`` (see the module docstring)."""
    rows = _judgments(study, "rating", include_excluded=include_excluded,
                      include_simulated=include_simulated,
                      completed_only=completed_only).values_list(
        "response", "trial__is_repeat", "trial__pair__key", "trial__pair__is_sentinel",
        "trial__pair__condition__spec", "trial__pair__natural_path",
        "trial__pair__other_path", "trial__pair__distances", *COMMON_FIELDS)
    records, names = [], set()
    for response, is_repeat, key, is_sentinel, spec, natural, other, dist, *common in rows:
        dist = dict(dist or {})
        names |= set(dist)
        records.append({
            "item": key, "rating": int(response), "condition": spec or ANCHOR,
            "is_control": bool(is_sentinel), "is_repeat": bool(is_repeat),
            **_common(tuple(common)), "_d": (dist, natural == other),
        })
    names = sorted(names)
    for record in records:
        dist, identical = record.pop("_d")
        for n in names:
            value = dist.get(n)
            record["d_" + n] = _identical_value(n) if value is None and identical else value
    frame = _frame(records, RATING_COLUMNS, names, ("d_",))
    frame["rating"] = frame["rating"].astype(int)
    return frame


def label_rows(study: Study, *, include_excluded: bool = False,
               include_simulated: bool = False, completed_only: bool = False) -> pd.DataFrame:
    """Label rows of ``study`` (see the module docstring)."""
    rows = _judgments(study, "label", include_excluded=include_excluded,
                      include_simulated=include_simulated,
                      completed_only=completed_only).values_list(
        "response", "trial__pair__key", "trial__pair__class_name", "trial__pair__is_sentinel",
        "trial__pair__condition__threat_model", "trial__pair__condition__bound",
        "trial__pair__level", *COMMON_FIELDS)
    records = []
    for response, key, class_name, is_sentinel, tm, bound, level, *common in rows:
        records.append({
            "item": key, "response": response, "true_label": class_name,
            "threat_model": tm or GOLD, "bound": 0.0 if bound is None else float(bound),
            "is_gold": bool(is_sentinel), "level": np.nan if level is None else float(level),
            **_common(tuple(common)),
        })
    frame = pd.DataFrame.from_records(records, columns=LABEL_COLUMNS + COMMON)
    frame["bound"] = frame["bound"].astype(float)
    frame["level"] = frame["level"].astype(float)
    return frame


ROWS = {"2afc": twoafc_rows, "rating": rating_rows, "label": label_rows}


def protocol_rows(study: Study, **kwargs) -> pd.DataFrame:
    """The rows of ``study``'s own protocol (2afc, rating or label; not jnd: see
    :mod:`studyapp.frames`)."""
    if study.protocol not in ROWS:
        raise ProtocolMismatch(
            f"study {study.slug!r} runs the {study.protocol} protocol: its judgments are read "
            "by studyapp.frames (same/different), not as protocol rows")
    return ROWS[study.protocol](study, **kwargs)


# ----------------------------------------------------------------------------- analysis

#: The table ``manage.py analyze`` writes to its main CSV, per protocol (the others go beside
#: it as ``<name>_<table>.csv``).
MAIN_TABLE = {"2afc": "table", "rating": "mos", "label": "accuracy"}
#: Columns whose *values* name a distance.
DISTANCE_VALUE_COLUMNS = ("distance", "metric")


def distance_names(rows: pd.DataFrame) -> list[str]:
    """The distances stored with the rows' items (``a_NAME``/``b_NAME`` or ``d_NAME``)."""
    names = [c[2:] for c in rows.columns if c.startswith(("a_", "d_"))]
    return sorted(dict.fromkeys(names))


def default_distance(names) -> str | None:
    """The distance a protocol's figure and 2AFC slope use: ``lpips_alexnet`` if stored, else
    another LPIPS, else the first (alphabetically); None without any."""
    names = sorted(names)
    for pick in (lambda n: n == "lpips_alexnet", lambda n: n.startswith("lpips")):
        found = [n for n in names if pick(n)]
        if found:
            return found[0]
    return names[0] if names else None


def protocol_report(study: Study, *, n_boot: int = 1000, seed: int = 0,
                    include_excluded: bool = False, include_simulated: bool = False,
                    completed_only: bool = False):
    """``engine.protocol_analysis.analyze_protocol`` of ``study``'s judgments (2afc, rating or
    label): every row is read, with its ``excluded``/``simulated`` flags, and the engine
    drops and counts them (``report.exclusions``), as ``analyze`` does for JND. A 2AFC report
    also gets ``slope`` (:func:`engine.protocol_analysis.twoafc_choice_slope` on
    :func:`default_distance`) where the triplets' distance differences allow a fit.
    ``ValueError`` with the engine's reason when there is nothing to analyse."""
    from engine.protocol_analysis import analyze_protocol, twoafc_choice_slope

    rows = protocol_rows(study, include_excluded=True, include_simulated=True,
                         completed_only=completed_only)
    if rows.empty:
        raise ValueError(f"study {study.slug!r} has no main-trial judgments yet")
    kept = rows
    if not include_excluded:
        kept = kept[~kept["excluded"]]
    if not include_simulated:
        kept = kept[~kept["simulated"]]
    if kept.empty:
        raise ValueError(
            f"none of its {len(rows)} judgments is left once sessions excluded by quality"
            f" control ({int(rows['excluded'].sum())}) and simulated observers"
            f" ({int(rows['simulated'].sum())}) are left out")
    report = analyze_protocol(
        study.protocol, rows, n_boot=n_boot, seed=seed, include_excluded=include_excluded,
        include_simulated=include_simulated,
        label_set=list(study.label_set) if study.protocol == "label" and study.label_set
        else None)
    report.meta["distance"] = default_distance(distance_names(rows))
    if study.protocol == "2afc" and report.meta["distance"]:
        try:
            report.tables["slope"] = pd.DataFrame([twoafc_choice_slope(
                kept, report.meta["distance"], n_boot=n_boot, seed=seed)])
        except ValueError as exc:  # e.g. fewer than two distinct distance differences
            report.meta["slope_skipped"] = str(exc)
    return report


def labelled(frame: pd.DataFrame, distances) -> pd.DataFrame:
    """``frame`` for people: distance-named columns (``d_lpips_alexnet`` → ``LPIPS (AlexNet,
    pretrained)``, ``a_l2`` → ``A: L2``) and distance names in ``distance``/``metric`` cells
    through :func:`engine.provenance.distance_label`; ``distances`` the names to look for."""
    from engine.provenance import distance_label

    out = frame.copy()
    for c in DISTANCE_VALUE_COLUMNS:
        if c in out:
            out[c] = [distance_label(v) if v in distances else v for v in out[c]]
    names = {}
    for c in out.columns:
        for prefix, what in (("a_", "A: "), ("b_", "B: "), ("d_", ""), ("mean_d_", "mean "),
                             ("mean_", "mean ")):
            if c.startswith(prefix) and c.removeprefix(prefix) in distances:
                names[c] = what + distance_label(c.removeprefix(prefix))
                break
    return out.rename(columns=names)
