"""Who is arriving, from where: the query string of a participant link.

Three kinds of link lead to ``/study/<slug>/``:

MTurk (ExternalQuestion)
    ``?assignmentId=...&hitId=...&turkSubmitTo=https://www.mturk.com&workerId=...``. While a
    worker only previews the HIT, MTurk sends ``assignmentId=ASSIGNMENT_ID_NOT_AVAILABLE`` and
    no ``workerId``: the page then shows the instructions and nothing else, and writes nothing.
    ``turkSubmitTo`` is where the end page POSTs the finished assignment; it must be
    ``https://www.mturk.com`` or ``https://workersandbox.mturk.com`` (anything else would turn
    the end page into a form that sends the worker's completion code to a stranger).
Prolific
    ``?PROLIFIC_PID=...&STUDY_ID=...&SESSION_ID=...`` (Prolific's URL-parameter option).
plain link
    no recognised parameter: an anonymous participant with a random id.

A participant is ``(study, source, external_id)``: the MTurk ``workerId``, the Prolific
``PROLIFIC_PID``, or a random id for plain links. Assignment, HIT and Prolific session ids
belong to the :class:`~studyapp.models.Session`, so an MTurk assignment returned by one worker
and re-issued to another (same ``assignmentId``, different ``workerId``) becomes a second
participant with a second session: nothing is merged.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlencode, urlsplit

MTURK_PREVIEW_ASSIGNMENT = "ASSIGNMENT_ID_NOT_AVAILABLE"
MTURK_SUBMIT_HOSTS = ("www.mturk.com", "workersandbox.mturk.com")
MTURK_PARAMS = ("assignmentId", "hitId", "turkSubmitTo", "workerId")
PROLIFIC_PARAMS = ("PROLIFIC_PID", "STUDY_ID", "SESSION_ID")
PROLIFIC_COMPLETE_URL = "https://app.prolific.com/submissions/complete"
# Ids as the platforms issue them (upper-case alphanumerics for MTurk, 24 hex digits for
# Prolific), with some slack; no spaces, slashes, quotes or control characters.
ID_PATTERN = re.compile(r"[A-Za-z0-9_.:@-]{1,200}")


class BadRecruitmentLink(ValueError):
    """The link's query string cannot be accepted; the message says why, for the participant."""


@dataclass(frozen=True)
class Recruitment:
    """Where a participant came from (``source``: ``link``, ``mturk`` or ``prolific``)."""

    source: str = "link"
    external_id: str = ""  # workerId / PROLIFIC_PID; "" for plain links (random id later)
    preview: bool = False  # MTurk HIT preview: show, never start
    session_fields: dict[str, str] = field(default_factory=dict)  # stored on the Session

    @property
    def is_mturk(self) -> bool:
        return self.source == "mturk"

    @property
    def is_prolific(self) -> bool:
        return self.source == "prolific"


def _id(query: Mapping[str, str], name: str, *, required: bool) -> str:
    value = query.get(name, "").strip()
    if not value:
        if required:
            raise BadRecruitmentLink(f"the link has no {name}")
        return ""
    if not ID_PATTERN.fullmatch(value):
        raise BadRecruitmentLink(f"the link's {name} is not a valid id")
    return value


def validate_turk_submit_to(value: str) -> str:
    """``value`` as ``https://<host>`` when it is MTurk's live or sandbox site, else raise.

    Only the bare origin is accepted (an optional trailing slash aside): no other scheme,
    host, port, user name, path, query or fragment.
    """
    parts = urlsplit(value.strip())
    host = parts.hostname or ""
    if (
        parts.scheme != "https"
        or host not in MTURK_SUBMIT_HOSTS
        or parts.netloc.lower() != host
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
    ):
        raise BadRecruitmentLink(
            "the link's turkSubmitTo is not https://www.mturk.com or "
            "https://workersandbox.mturk.com"
        )
    return f"https://{host}"


def parse_recruitment(query: Mapping[str, str]) -> Recruitment:
    """Read a participant link's query string. Raises :class:`BadRecruitmentLink`."""
    is_mturk = any(query.get(name) for name in MTURK_PARAMS)
    is_prolific = any(query.get(name) for name in PROLIFIC_PARAMS)
    if is_mturk and is_prolific:
        raise BadRecruitmentLink("the link mixes MTurk and Prolific parameters")
    if is_mturk:
        assignment_id = query.get("assignmentId", "").strip()
        submit_to = query.get("turkSubmitTo", "")
        if assignment_id == MTURK_PREVIEW_ASSIGNMENT:
            if submit_to:
                validate_turk_submit_to(submit_to)
            return Recruitment(source="mturk", preview=True)
        assignment_id = _id(query, "assignmentId", required=True)
        if not submit_to:
            raise BadRecruitmentLink("the link has no turkSubmitTo")
        return Recruitment(
            source="mturk",
            external_id=_id(query, "workerId", required=True),
            session_fields={
                "assignment_id": assignment_id,
                "hit_id": _id(query, "hitId", required=False),
                "turk_submit_to": validate_turk_submit_to(submit_to),
            },
        )
    if is_prolific:
        return Recruitment(
            source="prolific",
            external_id=_id(query, "PROLIFIC_PID", required=True),
            session_fields={
                "external_study_id": _id(query, "STUDY_ID", required=False),
                "external_session_id": _id(query, "SESSION_ID", required=False),
            },
        )
    return Recruitment()


def mturk_submit_url(turk_submit_to: str) -> str:
    """Where the end page POSTs a finished assignment (re-validated: the value is stored)."""
    return f"{validate_turk_submit_to(turk_submit_to)}/mturk/externalSubmit"


def prolific_complete_url(code: str) -> str:
    return f"{PROLIFIC_COMPLETE_URL}?{urlencode({'cc': code})}"
