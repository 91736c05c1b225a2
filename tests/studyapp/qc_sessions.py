"""Sessions with hand-picked trials and answers, for quality-control tests (no scheduler)."""

from __future__ import annotations

import uuid

from django.utils import timezone

from studyapp.models import Judgment, Pair, Participant, Session, Study, Trial

HUMAN_BROWSER = {"webdriver": False, "pointer_events": 40, "key_events": 25, "hidden_stimuli": 0}


def _control_pair(study: Study, kind: str, n: int) -> Pair:
    sample = study.pairs.filter(is_sentinel=True).first()
    return Pair.objects.create(
        study=study,
        is_sentinel=kind == "sentinel",
        is_catch=kind == "catch",
        key=f"{kind}-{n}-{uuid.uuid4().hex[:6]}",
        source_image=sample.source_image,
        natural_path=sample.natural_path,
        other_path=sample.natural_path
        if kind == "sentinel"
        else study.pairs.exclude(other_path=sample.natural_path).first().other_path,
        width=sample.width,
        height=sample.height,
    )


def make_answered_session(
    study: Study,
    trials: list[tuple[str, str | None, float]],
    *,
    practice: list[tuple[str, str, float]] = (),
    completed: bool = True,
    participant: Participant | None = None,
    ip_hash: str = "",
    browser_hash: str = "",
    client_info: dict | None = None,
) -> Session:
    """A session whose main trials are ``(kind, response or None, response_time_ms)`` with kind
    ``sentinel`` / ``catch`` / ``perturbed``; ``practice`` trials come first. ``client_info``
    defaults to what the trial runner reports for a person (no automation signals)."""
    participant = participant or Participant.objects.create(
        study=study, external_id=str(uuid.uuid4())
    )
    session = Session.objects.create(
        participant=participant,
        completed_at=timezone.now() if completed else None,
        ip_hash=ip_hash,
        browser_hash=browser_hash,
        client_info=HUMAN_BROWSER if client_info is None else client_info,
    )
    perturbed = iter(study.pairs.filter(is_sentinel=False, is_catch=False).order_by("id"))
    for position, (kind, response, rt) in enumerate([*practice, *trials]):
        pair = next(perturbed) if kind == "perturbed" else _control_pair(study, kind, position)
        trial = Trial.objects.create(
            session=session,
            position=position,
            pair=pair,
            natural_first=True,
            is_practice=position < len(practice),
        )
        if response is not None:
            Judgment.objects.create(
                trial=trial,
                response=response,
                response_time_ms=rt,
                first_ms=1000,
                blank_ms=250,
                second_ms=1000,
                idempotency_key=uuid.uuid4().hex,
            )
    return session


S, C, P = "sentinel", "catch", "perturbed"
DIFF, SAME = "different", "same"
# 5 sentinels (2 false alarms), 2 catch (1 hit), 3 perturbed; 3 of 10 responses < 150 ms.
SLOPPY = [
    (S, DIFF, 100), (S, DIFF, 900), (S, SAME, 800), (S, SAME, 700), (S, SAME, 650),
    (C, DIFF, 120), (C, SAME, 600), (P, DIFF, 140), (P, SAME, 500), (P, DIFF, 900),
]  # fmt: skip
CAREFUL = [(S, SAME, 700), (S, SAME, 800), (C, DIFF, 600), (P, DIFF, 900), (P, SAME, 700)]
