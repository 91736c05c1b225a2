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

Other protocols (issue 18; :func:`simulate_protocol`, through the same scheduler calls) answer
every trial with a valid response of their protocol from a documented observer model
(:class:`TwoAFCModel`, :class:`RatingModel`, :class:`LabelModel`): 2AFC a Thurstonian choice
on the difference of the reference↔A and reference↔B distances, ratings a noisy monotone
function of the distance, labels a confusion that grows with the bound. A *careless* observer
answers uniformly at random among the protocol's answers, fast.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass

import numpy as np

from engine.observers import (
    LabelObserver,
    ObserverPopulation,
    RatingObserver,
    SimulatedObserver,
    TwoAFCObserver,
)

from . import protocol_rows
from .models import Pair, Participant, Study, Trial
from .protocols import trial_spec
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
    if study.protocol != "jnd":
        raise SimulationError(
            f"study {study.slug!r} runs the {study.protocol} protocol: use simulate_protocol")
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



# ------------------------------------------------------------------ protocols beyond JND
#
# The observer models are the engine's (engine.observers, issue 18), one observer per
# simulated participant:
#
# - 2AFC, :class:`~engine.observers.TwoAFCObserver` (Thurstonian, case V): each copy's
#   perceived difference from the reference is its distance plus Gaussian noise; P(choose B)
#   = λ/2 + (1 − λ)·Φ((d_A − d_B)/σ), σ in distance units (the probit slope that
#   engine.protocol_analysis.twoafc_choice_slope fits is 1/σ), λ the lapse rate;
# - rating, :class:`~engine.observers.RatingObserver` (noisy monotone of distance): rating =
#   clip(round(1 + (N − 1)·d/s + e), 1, N), e ~ N(0, σ_r) (σ_r in scale points, s the
#   distance rated N); single-image mode rates quality: N − (N − 1)·d/s + e. A repeat is a
#   fresh draw of the same observer (test–retest noise is σ_r);
# - label, :class:`~engine.observers.LabelObserver` (confusion growing with the bound):
#   P(true label | b) = 1/L + (1 − 1/L − ε)·(1 − logistic(β·(ln b − ln t))), L labels, ε the
#   error on clean images (gold items: b = 0), t the label-flip bound per threat model
#   (accuracy midway between clean and chance: what label_flip_bound estimates), β per log
#   unit of bound; a wrong answer is uniform over the other L − 1 labels.
#
# A careless observer answers at random (the engine observers' ``careless``).


def _identical(name: str) -> float:
    return 1.0 if name == "ssim" else 0.0


def _as_distance(name: str, value) -> float:
    """A stored value as a distance (larger = more different): 1 − ssim for SSIM."""
    v = float(value)
    return 1.0 - v if name == "ssim" else v


def _stored_distance(distances: dict | None, name: str, identical: bool) -> float:
    value = (distances or {}).get(name)
    if value is None:
        if identical:
            return 0.0
        raise SimulationError(f"an item lacks the distance {name!r} the observers respond to")
    return _as_distance(name, value)


def default_distance(study: Study) -> str:
    """The distance simulated 2AFC/rating observers respond to: lpips_alexnet if stored, else
    another LPIPS, else the first stored one (alphabetically)."""
    names: set[str] = set()
    for d, d_b in Pair.objects.filter(study=study, condition__isnull=False).values_list(
            "distances", "distances_b"):
        names |= set(d or {}) | set(d_b or {})
    if not names:
        raise SimulationError(
            f"study {study.slug!r} has no items with stored distances to respond to")
    return protocol_rows.default_distance(names)


def _median_positive(values) -> float | None:
    v = [float(x) for x in values if x is not None and np.isfinite(x) and x > 0]
    return float(np.median(v)) if v else None


def simulate_protocol(
    study: Study,
    n: int,
    *,
    distance: str | None = None,
    sigma: float | None = None,
    rating_scale: float | None = None,
    rating_noise: float = 0.5,
    thresholds: dict[str, float] | None = None,
    slope: float = 3.0,
    lapse_rate: float = 0.02,
    careless_share: float = 0.0,
    seed: int = 0,
    progress: bool = False,
) -> SimulationSummary:
    """Run ``n`` simulated participants through a 2AFC, rating or label ``study`` (one full
    session each, :func:`studyapp.scheduler.start_session` / ``record_judgment`` /
    ``complete_session``), answering from the models above.

    - 2AFC: ``distance`` (default :func:`default_distance`), ``sigma`` (distance units;
      default half the median |d_A − d_B| of the main triplets), ``lapse_rate``;
    - rating: ``distance``, ``rating_scale`` (the distance rated N; default the largest
      item distance), ``rating_noise`` (scale points, > 0);
    - label: ``thresholds`` = label-flip bound per threat model (default the median bound of
      its items), ``slope`` per log unit, ``lapse_rate`` = the clean error ε.
    """
    protocol = study.protocol
    if protocol == "jnd":
        raise SimulationError("JND studies are simulated by simulate()")
    if n < 1:
        raise SimulationError(f"--n must be at least 1, got {n}")
    for name, v in (("lapse rate", lapse_rate), ("careless share", careless_share)):
        if not 0 <= v <= 1:
            raise SimulationError(f"{name} must be in [0, 1], got {v}")
    if not slope > 0 or not rating_noise > 0:
        raise SimulationError("slope and the rating noise must be > 0")
    spec = trial_spec(study)
    if not spec.answers:
        raise SimulationError(f"study {study.slug!r} offers no answers (empty label set)")
    items = Pair.objects.filter(study=study, is_sentinel=False, is_catch=False)
    rng = np.random.default_rng(seed)
    careless = [bool(rng.random() < careless_share) for _ in range(n)]
    if protocol == "2afc":
        distance = distance or default_distance(study)
        diffs = []
        for key, d, d_b in items.values_list("key", "distances", "distances_b"):
            if distance not in (d or {}) or distance not in (d_b or {}):
                raise SimulationError(f"triplet {key!r} lacks the distance {distance!r} for A"
                                      " and B")
            diffs.append(abs(_as_distance(distance, d[distance])
                             - _as_distance(distance, d_b[distance])))
        sigma = sigma if sigma is not None else (_median_positive(diffs) or 1.0) / 2
        if not sigma > 0:
            raise SimulationError(f"--sigma must be > 0, got {sigma}")
        observers = [TwoAFCObserver(sigma=sigma, lapse_rate=lapse_rate, careless=c)
                     for c in careless]
    elif protocol == "rating":
        distance = distance or default_distance(study)
        values = []
        for key, d in items.values_list("key", "distances"):
            if distance not in (d or {}):
                raise SimulationError(f"item {key!r} lacks the distance {distance!r}")
            values.append(_as_distance(distance, d[distance]))
        rating_scale = rating_scale if rating_scale is not None else (
            max([v for v in values if v > 0], default=1.0))
        if not rating_scale > 0:
            raise SimulationError(f"--rating-scale must be > 0, got {rating_scale}")
        points = study.rating_points
        single = study.rating_shows == "single"
        observers = [RatingObserver(intercept=points if single else 1.0,
                                    slope=(-1 if single else 1) * (points - 1) / rating_scale,
                                    noise_sd=rating_noise, points=points, careless=c)
                     for c in careless]
    elif protocol == "label":
        bounds: dict[str, list[float]] = {}
        for tm, bound in items.values_list("condition__threat_model", "condition__bound"):
            bounds.setdefault(tm, []).append(bound)
        flip = {tm: _median_positive(v) for tm, v in bounds.items()}
        flip = {tm: v for tm, v in flip.items() if v is not None}
        unknown = set(thresholds or {}) - set(bounds)
        if unknown:
            raise SimulationError(
                f"thresholds given for threat model(s) {sorted(unknown)} that the study lacks "
                f"(it has {sorted(bounds)})")
        flip.update(thresholds or {})
        if len(spec.answers) < 2:
            raise SimulationError("a label study needs at least 2 labels in its label set")
        if lapse_rate >= 1 - 1 / len(spec.answers):
            raise SimulationError("the clean error (--lapse-rate) must be below 1 − 1/labels")
        # one LabelObserver per threat model and participant (its own flip bound); gold
        # items (bound 0) are answered at 1 − ε by any of them (key None)
        observers = [{tm: LabelObserver(threshold=t, slope=slope, n_labels=len(spec.answers),
                                        clean_error=lapse_rate, careless=c)
                      for tm, t in {None: 1.0, **flip}.items()} for c in careless]
    else:
        raise SimulationError(f"unknown protocol {protocol!r}")

    summary = SimulationSummary(0, 0, 0, sum(careless))
    durations = {"first_ms": 1000.0, "blank_ms": None, "second_ms": None}
    if spec.phases == ("first_ms", "blank_ms", "second_ms"):
        durations = {"first_ms": 1000.0, "blank_ms": 250.0, "second_ms": 1000.0}
    iterator = range(n)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc="simulated observers", unit="participant")
    for i in iterator:
        participant = Participant.objects.create(
            study=study, external_id=f"sim-{uuid.uuid4().hex[:16]}", is_simulated=True)
        summary.participants += 1
        try:
            session = start_session(participant, user_agent="perceptlab simulated observer",
                                    rng=random.Random(seed * 1_000_003 + i))
        except StudyUnavailable as exc:
            summary.refused = str(exc)
            break
        summary.sessions += 1
        trials = Trial.objects.filter(session=session).order_by("position").values_list(
            "position", "natural_first", "pair__natural_path", "pair__other_path",
            "pair__third_path", "pair__distances", "pair__distances_b", "pair__class_name",
            "pair__condition__threat_model", "pair__condition__bound")
        for (position, natural_first, natural, other, third, dist, dist_b, class_name, tm,
             bound) in trials:
            observer = observers[i]
            if protocol == "2afc":
                d_a = _stored_distance(dist, distance, other == natural)
                d_b = _stored_distance(dist_b, distance, third == natural)
                chose_b = bool(observer.respond(np.array([d_a]), np.array([d_b]), rng)[0])
                # copy A is on the left when natural_first: B is the other side
                response = ("right" if natural_first else "left") if chose_b else (
                    "left" if natural_first else "right")
            elif protocol == "rating":
                d = _stored_distance(dist, distance, other == natural)
                response = str(int(observer.respond(np.array([d]), rng)[0]))
            else:
                if class_name not in spec.answers:
                    raise SimulationError(
                        f"an item's true class {class_name!r} is not in the label set")
                who = observer[tm if bound else None]
                answer = who.respond(np.array([spec.answers.index(class_name)]),
                                     np.array([float(bound or 0.0)]), rng)[0]
                response = spec.answers[int(answer)]
            rt = float(rng.lognormal(np.log(250 if careless[i] else 900), 0.3))
            record_judgment(session, {
                "position": position, "response": response,
                "response_time_ms": round(rt, 1), "durations": durations,
                "idempotency_key": uuid.uuid4().hex,
            })
            summary.judgments += 1
        complete_session(session)
    return summary
