"""Adaptive bound placement: ladders of bounds, calibrated presets, QUEST+ level choice.

The closed loop (issue 8):

1. ``generate_pairs --ladder N`` (or ``python -m engine generate --ladder N`` + ``import_pairs``)
   makes N log-spaced bounds per threat model (:func:`engine.attacks.spec.ladder_specs`:
   levels 0..N−1 travel through the manifest to ``Pair.level``, condition labels
   ``L0``..``L{N-1}``); the import records the ladder in ``study.adaptive_config["ladder"]``.
2. In an adaptive study (``Study.adaptive``) the scheduler, when it builds a session, asks
   :func:`order_candidates` to put first the pairs at the level that QUEST+ (Watson 2017)
   chooses for each threat model: the level whose answer minimises the expected entropy of a
   posterior over threshold × slope, pooled over every stored non-excluded main-trial judgment
   of that threat model. Only the *order* of the candidate pairs changes: which pairs may be
   taken (room under K, not seen by the participant, row locks) is decided by the scheduler
   exactly as in a fixed study, so every guarantee holds unchanged. When the chosen level has
   no pair with room left, its neighbours come next (nearest level first), so a session is
   never refused for the posterior's sake.
3. ``calibrate`` fits psychometric functions and stores presets; ``generate_pairs --bounds
   calibrated:SLUG`` reads them back as labelled bounds ``VALUE@LABEL``
   (:func:`calibrated_specs`), which the engine carries to ``Condition.label``.
4. ``refill`` tops up levels running short of open slots (:func:`short_levels`).

Units: bounds are in each threat model's own units (Lp on the [0,1] pixel scale).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
from django.db.models import Count, F, Q, Sum

from engine.adaptive import QuestPlus
from engine.attacks.spec import expand_specs, resolve_preset, threat_model_of
from engine.errors import EngineError

from .models import Calibration, Judgment, Pair, Study

DEFAULTS = {
    "lapse_rate": 0.02,
    # None: γ and λ are nuisance parameters over the grids below, γ learnt from the
    # sentinels (psi-marginal, issue 16); a number: plain QUEST+ with γ (and lapse_rate) fixed
    "guess_rate": None,
    "guess_rates": [0.01, 0.03, 0.06, 0.1, 0.15],
    "lapse_rates": [0.0, 0.02, 0.05, 0.1],
    "sigmoid": "logistic",
    "n_thresholds": 41,
    "slopes": [0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0],
    # the design that won bench/adaptive.py (BENCHMARKS.md "Adaptive bound placement"): the
    # estimator's threshold variance, every level kept at ≥ floor/levels of the judgments
    "objective": "fisher",
    "floor": 0.5,
}


class AdaptiveError(ValueError):
    """A ladder, preset or adaptive setting that cannot be used (the message says why)."""


# ------------------------------------------------------------------------------ presets


def calibrated_bounds(slug: str) -> tuple[Calibration, dict[str, dict[str, float]]]:
    """The latest calibration of study ``slug`` and its presets ``{threat model: {label: b}}``."""
    study = Study.objects.filter(slug=slug).first()
    if study is None:
        raise AdaptiveError(f"calibrated:{slug}: no study with slug {slug!r}")
    row = Calibration.objects.filter(study=study).order_by("-created_at", "-id").first()
    if row is None:
        raise AdaptiveError(
            f"calibrated:{slug}: study {slug!r} has no calibration; run "
            f"`manage.py calibrate --study {slug}` first"
        )
    return row, row.presets


def named_and_calibrated(presets: dict[str, dict[str, float | None]]) -> list[dict]:
    """One row per threat model: the named table-4 bounds beside the calibrated ones."""
    rows = []
    for tm in sorted(presets):
        row: dict = {"threat_model": tm}
        for name in ("small", "medium", "large"):
            try:
                row[name] = resolve_preset(tm, name)
            except EngineError:
                row[name] = None
        row.update(presets[tm])
        rows.append(row)
    return rows


def calibrated_specs(specs: Sequence[str], slug: str) -> tuple[str, ...]:
    """Each spec at each calibrated bound of its threat model, labelled: ``VALUE@LABEL``
    (:func:`engine.attacks.spec.expand_specs`), e.g. ``linf:bound=0.0123@p50,...``."""
    row, presets = calibrated_bounds(slug)
    out: list[str] = []
    for spec in specs:
        tm = threat_model_of(spec)
        if tm not in presets:
            raise AdaptiveError(
                f"calibration {row.pk} of study {slug!r} has no presets for threat model "
                f"{tm!r} (it has: {', '.join(sorted(presets)) or 'none'})"
            )
        for label, bound in presets[tm].items():
            if bound is None or not math.isfinite(bound) or bound <= 0:
                raise AdaptiveError(
                    f"calibration {row.pk}: {tm} {label} has no usable bound ({bound}); the "
                    "fit did not reach that perceptibility inside its range"
                )
        out += expand_specs([spec], [(label, float(b)) for label, b in presets[tm].items()])
    return tuple(out)


# ------------------------------------------------------------------------------ QUEST+


def _config(study: Study) -> dict:
    return {**DEFAULTS, **{k: v for k, v in study.adaptive_config.items() if k in DEFAULTS}}


def level_bounds(study: Study) -> dict[str, dict[int, float]]:
    """``{threat model: {level: bound}}`` of the study's data pairs that have a level."""
    out: dict[str, dict[int, float]] = defaultdict(dict)
    rows = (
        Pair.objects.filter(study=study, level__isnull=False, condition__isnull=False)
        .values_list("condition__threat_model", "level", "condition__bound")
        .distinct()
    )
    for tm, level, bound in rows:
        out[tm][level] = bound
    return dict(out)


def guess_rate(study: Study) -> float:
    cfg = _config(study)
    if cfg["guess_rate"] is not None:
        return float(cfg["guess_rate"])
    agg = Judgment.objects.filter(
        trial__session__participant__study=study, trial__is_practice=False,
        trial__pair__is_sentinel=True, trial__session__excluded=False,
    ).aggregate(n=Count("id"), k=Count("id", filter=Q(response="different")))
    # Add-one smoothing around 5 % so a handful of sentinels cannot set γ to 0 or 1.
    return float(min((agg["k"] + 0.05 * 20) / (agg["n"] + 20), 0.5))


def posteriors(study: Study) -> dict[str, tuple[QuestPlus, list[int]]]:
    """Per threat model: a QUEST+ updated with every stored judgment, and its level list."""
    cfg = _config(study)
    gamma = guess_rate(study)
    counts = (
        Judgment.objects.filter(
            trial__session__participant__study=study, trial__is_practice=False,
            trial__session__excluded=False, trial__pair__level__isnull=False,
        )
        .values_list("trial__pair__condition__threat_model", "trial__pair__level", "response")
        .annotate(n=Count("id"))
    )
    per_tm: dict[str, list[tuple[int, bool, int]]] = defaultdict(list)
    for tm, level, response, n in counts:
        per_tm[tm].append((level, response == "different", n))
    out = {}
    nuisance = cfg["guess_rate"] is None
    if nuisance:
        sentinels = Judgment.objects.filter(
            trial__session__participant__study=study, trial__is_practice=False,
            trial__pair__is_sentinel=True, trial__session__excluded=False,
        ).aggregate(n=Count("id"), k=Count("id", filter=Q(response="different")))
    for tm, bounds in level_bounds(study).items():
        levels = sorted(bounds)
        values = np.array([bounds[lv] for lv in levels])
        grid = np.geomspace(values.min() / 2, values.max() * 2, int(cfg["n_thresholds"]))
        lapse = float(cfg["lapse_rate"])
        if nuisance:
            q = QuestPlus(values, thresholds_grid=grid, slopes_grid=cfg["slopes"],
                          guess_rates=cfg["guess_rates"], lapse_rates=cfg["lapse_rates"],
                          sigmoid=cfg["sigmoid"], targets=(0.25, 0.5, 0.75))
            q.update_sentinels(sentinels["k"], sentinels["n"])
        else:
            # QUEST+'s reported thresholds: the usual targets above γ and below 1 − λ
            targets = tuple(t for t in (0.25, 0.5) if gamma < t < 1 - lapse) or (
                (gamma + 1 - lapse) / 2,)
            q = QuestPlus(values, thresholds_grid=grid, slopes_grid=cfg["slopes"],
                          guess_rate=gamma, lapse_rate=lapse, sigmoid=cfg["sigmoid"],
                          targets=targets)
        index = {lv: i for i, lv in enumerate(levels)}
        rows = [(index[lv], d, n) for lv, d, n in per_tm.get(tm, []) if lv in index]
        if rows:
            idx = np.repeat([r[0] for r in rows], [r[2] for r in rows])
            diff = np.repeat([r[1] for r in rows], [r[2] for r in rows])
            q.update_many(idx, diff)
        out[tm] = (q, levels)
    return out


def next_levels(study: Study) -> dict[str, int]:
    """``{threat model: level}`` the next session's trials should come from."""
    cfg = _config(study)
    return {tm: levels[q.next_level(cfg["objective"],
                                    min_share=float(cfg["floor"]) / len(levels))]
            for tm, (q, levels) in posteriors(study).items()}


def order_candidates(study: Study, candidates: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The scheduler's hook: ``candidates`` (pair id, n_assigned), chosen levels first.

    A no-op for a fixed (non-adaptive) study. Otherwise a stable sort by the distance of each
    pair's level from its threat model's chosen level, so within a level the scheduler's own
    order (least-assigned first, random ties) is kept. Pairs without a level go last.
    """
    if not study.adaptive or not candidates:
        return candidates
    chosen = next_levels(study)
    info = {
        pk: (tm, level)
        for pk, tm, level in Pair.objects.filter(pk__in=[pk for pk, _ in candidates])
        .values_list("pk", "condition__threat_model", "level")
    }
    def distance(c: tuple[int, int]) -> float:
        tm, level = info.get(c[0], (None, None))
        if level is None or tm not in chosen:
            return math.inf
        return abs(level - chosen[tm])

    return sorted(candidates, key=distance)


# ------------------------------------------------------------------------------ refill


def open_slots(study: Study) -> dict[tuple[str, int], int]:
    """``{(threat model, level): judgment slots still open}`` (K·pairs − n_assigned)."""
    k = study.judgments_per_pair
    rows = (
        Pair.objects.filter(study=study, level__isnull=False, condition__isnull=False)
        .values_list("condition__threat_model", "level")
        .annotate(n=Count("id"), assigned=Sum(F("n_assigned")))
    )
    return {(tm, level): k * n - (assigned or 0) for tm, level, n, assigned in rows}


def short_levels(study: Study, min_open: int) -> list[tuple[str, int]]:
    """Levels with fewer than ``min_open`` open slots, sorted."""
    return sorted(key for key, n in open_slots(study).items() if n < min_open)
