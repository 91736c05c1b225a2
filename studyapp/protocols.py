"""What a trial of each protocol shows, asks and accepts (issue 18).

One table per protocol, read by the scheduler, the participant API, the image server, the
trial runner (through ``session_state``), quality control and the analyses, so that a
protocol is defined in one place:

========  =====================================  ==========================  ===============
protocol  images (slot order)                    phases measured             answers
========  =====================================  ==========================  ===============
jnd       first, second (natural/other, order    first_ms, blank_ms,         same, different
          by ``Trial.natural_first``)             second_ms
2afc      reference, left, right (copy A on the  first_ms (all three at      left, right
          left when ``Trial.natural_first``)      once)
rating    pair: as jnd; single: the image        pair: as jnd;               "1" … "N"
                                                 single: first_ms
label     the image (``other_path``)             first_ms                    the label set
========  =====================================  ==========================  ===============

A *control* item (``Pair.is_sentinel``) has a known answer: JND and rating-pair identical
pairs ("same"; the lowest rating), a 2AFC triplet whose copy A is the reference itself (the
side showing A), a label gold item (its ``class_name``); single-image rating anchors have no
right answer (their rating is reported, never scored). The same answer gives practice
feedback. ``Study.max_sentinel_false_alarm`` bounds the control error rate of every protocol.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

PROTOCOL_NAMES = ("jnd", "2afc", "rating", "label")
JND_PHASES = ("first_ms", "blank_ms", "second_ms")
ONE_PHASE = ("first_ms",)


class BadResponse(ValueError):
    """An answer the trial's protocol does not accept (the message says which it accepts)."""


@dataclass(frozen=True)
class TrialSpec:
    """What one protocol's trial is, for one study (durations in ms, keys lower-case)."""

    protocol: str
    n_images: int
    phases: tuple[str, ...]
    question: str
    answers: tuple[str, ...]
    keys: Mapping[str, str]  # key → answer
    feedback: bool  # practice trials with a known answer get feedback

    def to_dict(self) -> dict:
        return {
            "protocol": self.protocol,
            "n_images": self.n_images,
            "phases": list(self.phases),
            "question": self.question,
            "answers": list(self.answers),
            "keys": dict(self.keys),
            "feedback": self.feedback,
        }


def _digit_keys(answers: tuple[str, ...]) -> dict[str, str]:
    """Keys 1…9 for the first nine answers (more than nine: buttons only beyond)."""
    return {str(i + 1): a for i, a in enumerate(answers[:9])}


def image_count(protocol: str, rating_shows: str = "pair") -> int:
    """How many images a trial of ``protocol`` shows (its URL slots)."""
    if protocol == "2afc":
        return 3
    if protocol == "label" or (protocol == "rating" and rating_shows == "single"):
        return 1
    return 2


def trial_spec(study) -> TrialSpec:
    """The :class:`TrialSpec` of ``study`` (a :class:`studyapp.models.Study`)."""
    protocol = study.protocol
    same, different = study.key_same.lower(), study.key_different.lower()
    if protocol == "jnd":
        return TrialSpec("jnd", 2, JND_PHASES, "Were the two images the same or different?",
                         ("same", "different"), {same: "same", different: "different"}, True)
    if protocol == "2afc":
        return TrialSpec("2afc", 3, ONE_PHASE,
                         "Which image is more like the one in the middle, left or right?",
                         ("left", "right"), {same: "left", different: "right"}, True)
    if protocol == "rating":
        answers = tuple(str(i) for i in range(1, study.rating_points + 1))
        if study.rating_shows == "single":
            question = (f"How good is the image's quality? 1 = bad … {study.rating_points} "
                        "= excellent")
            return TrialSpec("rating", 1, ONE_PHASE, question, answers, _digit_keys(answers),
                             False)
        question = (f"How different were the two images? 1 = no difference … "
                    f"{study.rating_points} = very different")
        return TrialSpec("rating", 2, JND_PHASES, question, answers, _digit_keys(answers), True)
    if protocol == "label":
        answers = tuple(str(label) for label in study.label_set or ())
        return TrialSpec("label", 1, ONE_PHASE, "What is in the image?", answers,
                         _digit_keys(answers), True)
    raise ValueError(f"unknown protocol {protocol!r}; use one of {PROTOCOL_NAMES}")


#: The longest answer a judgment can store (``Judgment.response``'s max_length).
MAX_ANSWER_LENGTH = 200


def label_set_problem(labels) -> str | None:
    """Why ``labels`` cannot be a label study's answers, or None: the engine's rule
    (:func:`engine.datasets.check_label_set`: a non-empty list of class names, each a
    non-empty string of at most :data:`MAX_ANSWER_LENGTH` characters without surrounding
    spaces or NUL characters, none twice), so that every label is a response the participant
    API accepts and no two buttons give one answer."""
    from engine.datasets import check_label_set  # (torch: not at import time of the web app)
    from engine.errors import EngineError

    if not isinstance(labels, list | tuple):
        return "a label set is a list of class names"
    try:
        check_label_set(labels)
    except EngineError as exc:
        return str(exc)
    return None


def validate_response(study, response: str) -> str:
    """``response`` if ``study``'s protocol accepts it, else :class:`BadResponse`."""
    return check_answer(trial_spec(study), response)


def check_answer(spec: TrialSpec, response: str) -> str:
    """``response`` if ``spec`` accepts it, else :class:`BadResponse` naming the answers."""
    if response not in spec.answers:
        shown = ", ".join(repr(a) for a in spec.answers[:12])
        more = f" (and {len(spec.answers) - 12} more)" if len(spec.answers) > 12 else ""
        raise BadResponse(
            f"{response!r} is not an answer of this {spec.protocol} study; "
            f"use one of {shown}{more}"
        )
    return response


def check_durations(
    spec: TrialSpec, durations: Mapping[str, float | None]
) -> tuple[dict[str, float | None], dict[str, str]]:
    """``durations`` (measured ms per phase) as stored for ``spec``'s protocol: every phase
    of the protocol present (``{phase: "This field is required."}`` errors otherwise), every
    other phase ``None`` (a number for a phase the protocol does not have is an error too,
    so that a runner of the wrong protocol is caught rather than stored). Returns
    ``(values, errors)`` as a pair of dicts."""
    values: dict[str, float | None] = {}
    errors: dict[str, str] = {}
    for phase in JND_PHASES:
        value = durations.get(phase)
        if phase in spec.phases:
            if value is None:
                errors[phase] = "This field is required."
            values[phase] = value
        else:
            if value is not None:
                errors[phase] = (
                    f"a {spec.protocol} trial has no {phase.removesuffix('_ms')} phase; "
                    f"send only {', '.join(spec.phases)} (or null)"
                )
            values[phase] = None
    return values, errors


def image_paths(protocol: str, n_images: int, natural_first: bool, natural_path: str,
                other_path: str, third_path: str = "") -> tuple[str, ...]:
    """The files a trial shows, in slot order (slot 1 first), relative to MEDIA_ROOT."""
    if protocol == "2afc":
        left, right = (other_path, third_path) if natural_first else (third_path, other_path)
        return (natural_path, left, right)
    if n_images == 1:
        return (other_path,)
    return (natural_path, other_path) if natural_first else (other_path, natural_path)


def correct_answer(study, *, is_sentinel: bool, natural_first: bool, natural_path: str,
                   other_path: str, third_path: str = "", class_name: str = "") -> str | None:
    """The known answer of an item, or ``None`` where it has none (a data item; a
    single-image rating anchor). Used for practice feedback and the control error rate."""
    protocol = study.protocol
    if protocol == "label":
        return class_name or None
    if protocol == "2afc":
        if other_path == natural_path and third_path != natural_path:
            return "left" if natural_first else "right"
        if third_path == natural_path and other_path != natural_path:
            return "right" if natural_first else "left"
        return None
    identical = is_sentinel or natural_path == other_path
    if protocol == "rating":
        return "1" if identical and study.rating_shows == "pair" else None
    return "same" if identical else "different"
