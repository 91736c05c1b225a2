"""Simulated observers taking a study through the same scheduler code as people.

Each simulated participant is a ``Participant`` with ``is_simulated=True`` (external id
``sim-…``), starts a session with :func:`studyapp.scheduler.start_session`, answers every
trial with :func:`~studyapp.scheduler.record_judgment` and finishes with
:func:`~studyapp.scheduler.complete_session` — the functions the participant API calls — so
K per pair, sentinels, catch trials, leases and adaptive level choice apply to them exactly as
to people. Their answers come from an engine observer (``engine.observers``): P(different) is
a psychometric function of a stored distance of the pair (``distance="lpips_alexnet"``) or of
the condition's bound (``distance=None``), relative to a threshold per threat model. Sentinel
pairs are shown at value 0 (only guesses and bias answer "different"), catch pairs at +∞.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass

import numpy as np

from engine.observers import ObserverPopulation, SimulatedObserver

from .models import Pair, Participant, Study, Trial
from .scheduler import StudyUnavailable, complete_session, record_judgment, start_session


class SimulationError(ValueError):
    pass


@dataclass
class SimulationSummary:
    participants: int
    sessions: int
    judgments: int
    careless: int
    refused: str = ""


def reference_thresholds(study: Study, distance: str | None) -> dict[str, float]:
    """Per threat model, the median of the value observers respond to (bound or distance)."""
    values: dict[str, list[float]] = {}
    rows = Pair.objects.filter(study=study, condition__isnull=False).values_list(
        "condition__threat_model", "condition__bound", "distances"
    )
    for tm, bound, distances in rows:
        v = bound if distance is None else (distances or {}).get(distance)
        if v is not None and v > 0:
            values.setdefault(tm, []).append(float(v))
    if not values:
        what = "bounds" if distance is None else f"distance {distance!r}"
        raise SimulationError(f"study {study.slug!r} has no data pairs with positive {what}")
    return {tm: float(np.median(v)) for tm, v in values.items()}


def half_point(slope: float, guess_rate: float, lapse_rate: float, bias_sd: float,
               threshold_sd: float, careless_share: float) -> float:
    """Where the simulated *population* answers "different" half the time, relative to the
    observers' typical threshold (``F = ½``): their average ``P(different)`` over criterion
    and threshold spread (a spread of ln threshold ``σ`` acts as a criterion spread
    ``slope·σ``) and careless share equals 0.5 at ``half_point · typical threshold``.
    ``simulate`` divides the typical threshold by it so that ``thresholds`` are that 50 %
    point — the bound ``calibrate`` reports as ``p50``."""
    pop = ObserverPopulation({"*": (1.0, slope)}, guess_rate=guess_rate, lapse_rate=lapse_rate,
                             bias_sd=float(np.hypot(bias_sd, slope * threshold_sd)),
                             careless_share=careless_share)
    r = pop.true_threshold(0.5, "*")
    if not np.isfinite(r):
        raise SimulationError(
            f"these observers never answer 'different' half the time (guess rate {guess_rate},"
            f" lapse rate {lapse_rate}, careless share {careless_share}), so a threshold at"
            " P(different) = 0.5 cannot be set")
    return r


def simulate(
    study: Study,
    n: int,
    *,
    distance: str | None = None,
    thresholds: dict[str, float] | None = None,
    slope: float = 3.0,
    guess_rate: float = 0.05,
    lapse_rate: float = 0.02,
    careless_share: float = 0.0,
    bias_sd: float = 0.0,
    threshold_sd: float = 0.0,
    seed: int = 0,
    progress: bool = False,
) -> SimulationSummary:
    """Run ``n`` simulated participants through ``study`` (one full session each).

    ``thresholds``: per threat model, in the units of ``distance`` (or of the bound), the value
    where the simulated population answers "different" half the time (P(different) = 0.5,
    guesses, lapses, spreads and careless observers included: the ``p50`` that ``calibrate``
    reports; :func:`half_point`); missing ones default to the median over the threat model's
    pairs. Stops early, saying why, when
    the scheduler refuses a session (the study is full).
    """
    if n < 1:
        raise SimulationError(f"--n must be at least 1, got {n}")
    for name, v, lo, hi in (("guess rate", guess_rate, 0, 1), ("lapse rate", lapse_rate, 0, 1),
                            ("careless share", careless_share, 0, 1)):
        if not lo <= v <= hi:
            raise SimulationError(f"{name} must be in [{lo}, {hi}], got {v}")
    if not slope > 0 or threshold_sd < 0 or bias_sd < 0:
        raise SimulationError("slope must be > 0, threshold and bias spreads >= 0")
    if guess_rate + lapse_rate >= 1:
        raise SimulationError("guess rate + lapse rate must be below 1")
    reference = reference_thresholds(study, distance)
    unknown = set(thresholds or {}) - set(reference)
    if unknown:
        raise SimulationError(
            f"thresholds given for threat model(s) {sorted(unknown)} that the study lacks "
            f"(it has {sorted(reference)})"
        )
    reference.update(thresholds or {})
    rng = np.random.default_rng(seed)
    # Values are divided by the threat model's reference threshold, so each observer's own
    # threshold lives on that normalised scale: exp(N(0, threshold_sd)) around the typical
    # one, 1 / half_point, which puts the population's P(different) = 0.5 at 1.
    typical = 1.0 / half_point(slope, guess_rate, lapse_rate, bias_sd, threshold_sd,
                               careless_share)
    observers = [
        SimulatedObserver(
            threshold=typical * (float(np.exp(rng.normal(0.0, threshold_sd)))
                                 if threshold_sd else 1.0),
            slope=slope, guess_rate=guess_rate, lapse_rate=lapse_rate,
            bias=float(rng.normal(0.0, bias_sd)) if bias_sd else 0.0,
            careless=bool(rng.random() < careless_share),
        )
        for _ in range(n)
    ]
    summary = SimulationSummary(0, 0, 0, sum(o.careless for o in observers))
    iterator = observers
    if progress:
        from tqdm import tqdm

        iterator = tqdm(observers, desc="simulated observers", unit="participant")
    for i, observer in enumerate(iterator):
        participant = Participant.objects.create(
            study=study, external_id=f"sim-{uuid.uuid4().hex[:16]}", is_simulated=True
        )
        summary.participants += 1
        try:
            session = start_session(
                participant, user_agent="perceptlab simulated observer",
                rng=random.Random(seed * 1_000_003 + i),
            )
        except StudyUnavailable as exc:
            summary.refused = str(exc)
            break
        summary.sessions += 1
        trials = list(
            Trial.objects.filter(session=session).order_by("position").values_list(
                "position", "pair__is_sentinel", "pair__is_catch",
                "pair__condition__threat_model", "pair__condition__bound", "pair__distances",
            )
        )
        for position, is_sentinel, is_catch, tm, bound, distances in trials:
            if is_sentinel:
                value = 0.0
            elif is_catch:
                value = np.inf
            else:
                v = bound if distance is None else (distances or {}).get(distance, np.nan)
                value = float(v) / reference[tm] if v is not None else np.nan
                if not np.isfinite(value) or value < 0:
                    value = 0.0  # no stored value: answered like an identical pair
            different = bool(observer.respond(np.array([value]), rng)[0])
            rt = float(rng.lognormal(np.log(250 if observer.careless else 650), 0.3))
            record_judgment(session, {
                "position": position,
                "response": "different" if different else "same",
                "response_time_ms": round(rt, 1),
                "durations": {"first_ms": 1000.0, "blank_ms": 250.0, "second_ms": 1000.0},
                "idempotency_key": uuid.uuid4().hex,
            })
            summary.judgments += 1
        complete_session(session)
    return summary

