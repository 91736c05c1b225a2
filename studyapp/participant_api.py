"""Participant JSON API: ``/api/sessions/<token>/...`` (state, judgments, completion).

The session token in the URL is the participant's only credential, so these views
authenticate nobody (``authentication_classes = ()``): no cookie (a Django session, a staff
login) gives any power here, and so no cross-site request can borrow one. That is why they need
no CSRF token: a forged request would have to know the session token, and whoever knows it can
send the request without a victim's browser. (It also spares every request the Django session
row: the participant API is the hot path of a study.) The trial runner sends ``X-CSRFToken``
anyway; it is ignored.
"""

from __future__ import annotations

import os

from rest_framework import status
from rest_framework.exceptions import NotFound
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from . import scheduler
from .api import Conflict
from .models import Session, Study
from .parsers import PARTICIPANT_MAX_BODY, check_content_length
from .protocols import TrialSpec, trial_spec
from .serializers import (
    ClientInfoSerializer,
    JudgmentInputSerializer,
    judgment_data,
    session_state,
)
from .stimulus_server import _LRU

#: ``token → TrialSpec`` of the session's study: what a judgment is checked against. A session
#: never changes study, so an entry is only stale when its study's protocol settings are
#: edited while sessions run (then for at most ``PERCEPTLAB_STIMULUS_TTL`` seconds, as the
#: stimulus cache); it spares the judgment POST (the hot path) a query.
_specs = _LRU(
    size=int(os.environ.get("PERCEPTLAB_STIMULUS_CACHE", "8192")),
    ttl_s=float(os.environ.get("PERCEPTLAB_STIMULUS_TTL", "60")),
)
_SPEC_FIELDS = ("protocol", "key_same", "key_different", "rating_points", "rating_shows",
                "label_set")


def session_spec(token: str) -> TrialSpec | None:
    """The :class:`~studyapp.protocols.TrialSpec` of the session ``token``'s study, or
    ``None`` for an unknown token (one query on a miss of :data:`_specs`)."""
    spec = _specs.get(token)
    if spec is None:
        study = Study.objects.filter(participants__sessions__token=token).only(
            *_SPEC_FIELDS).first()
        if study is None:
            return None
        spec = trial_spec(study)
        _specs.put(token, spec)
    return spec


class SessionAPIView(APIView):
    """Base: resolves the session token (404 if unknown); responses are never cached.

    Bodies are at most :data:`~studyapp.api.PARTICIPANT_MAX_BODY` bytes (413 beyond).
    """

    max_body_bytes = PARTICIPANT_MAX_BODY
    authentication_classes = ()  # the token in the URL is the credential (module docstring)

    def initial(self, request, *args, **kwargs):
        # Also for a view that never reads its body (completion): refuse it unread.
        check_content_length(request, self.max_body_bytes)
        super().initial(request, *args, **kwargs)

    def get_session(self, token: str) -> Session:
        session = Session.objects.select_related("participant__study").filter(token=token).first()
        if session is None:
            raise NotFound("unknown session token")
        return session

    def finalize_response(self, request, response, *args, **kwargs):
        response = super().finalize_response(request, response, *args, **kwargs)
        response["Cache-Control"] = "no-store"
        return response


class SessionStateView(SessionAPIView):
    """``GET``: protocol timings and trials; ``PATCH``: store the client's display info.

    GET → ``{"study": {"title", "first_ms", "blank_ms", "second_ms", ..., "protocol"
    (not for JND)}, "stimulus", "trials": [{"position", "images": [url, ...], "answered",
    "practice"}], "completed"}`` (see :func:`~studyapp.serializers.session_state`).

    PATCH body (see :class:`ClientInfoSerializer`: the display as measured, and the runner's
    automation signals ``webdriver``, ``pointer_events``, ``key_events``, ``hidden_stimuli``
    for :mod:`studyapp.quality`) is merged into ``session.client_info``; answers
    ``{"client_info": {...}}``.
    """

    def get(self, request: Request, token: str) -> Response:
        return Response(session_state(self.get_session(token)))

    def patch(self, request: Request, token: str) -> Response:
        session = self.get_session(token)
        serializer = ClientInfoSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        client_info = scheduler.update_client_info(session, serializer.validated_data)
        return Response({"client_info": client_info})


class JudgmentCreateView(SessionAPIView):
    """``POST``: store the judgment of one trial (practice trials included, flagged as such).

    Body ``{"position", "response", "response_time_ms", "durations": {"first_ms",
    "blank_ms", "second_ms"}, "idempotency_key"}``: ``response`` one of the study's protocol's
    answers (JND ``same``/``different``; 2AFC ``left``/``right``; rating ``"1"`` … ``"N"``;
    label one of the label set), ``durations`` the protocol's phases (one-image protocols:
    ``first_ms`` only; the others are stored as null); anything else is a 400 naming what
    the protocol accepts.
    201 with the stored judgment; 200 with the same judgment when the identical body is
    re-sent with the same key (a retry, also one racing the original); 409 when the key was
    used for a different judgment (code ``idempotency_key_reused``), the trial already has
    another judgment (``already_answered``), or the trial's lease expired and its pair went
    to another participant (``lease_expired``); 404 for an unknown position; 400 for a bad
    body (checked before the token: a bad body is 400 even for an unknown session).
    Every refusal writes nothing. The logic lives in :func:`scheduler.record_judgment`.
    """

    throttle_scope = "participant-write"

    def post(self, request: Request, token: str) -> Response:
        spec = session_spec(token)
        serializer = JudgmentInputSerializer(data=request.data, context={"spec": spec})
        serializer.is_valid(raise_exception=True)
        if spec is None:
            raise NotFound("unknown session token")
        try:
            # By token: the session is read with the locked trial, in the same statement.
            judgment, created = scheduler.record_judgment(token, serializer.validated_data)
        except (scheduler.UnknownSession, scheduler.UnknownTrial) as exc:
            raise NotFound(str(exc)) from exc
        except scheduler.JudgmentConflict as exc:
            raise Conflict(str(exc), code=exc.code) from exc
        return Response(
            judgment_data(judgment),
            status=status.HTTP_201_CREATED if created else status.HTTP_200_OK,
        )


class SessionCompleteView(SessionAPIView):
    """``POST``: finish the session → 200 ``{"completion_code"}`` once every trial is answered.

    Every trial, practice included, needs a judgment. Repeating it is harmless (same code,
    ``completed_at`` kept); 409 ``incomplete`` names how many trials are still unanswered;
    409 ``session_expired`` when some trial's lease expired and its pair was given to
    another participant (the session can then never be completed). Completing releases
    nothing.
    """

    throttle_scope = "participant-write"

    def post(self, request: Request, token: str) -> Response:
        try:
            session = scheduler.complete_session(self.get_session(token))
        except scheduler.SessionIncomplete as exc:
            raise Conflict(str(exc), code=exc.code) from exc
        return Response(
            {"completion_code": session.completion_code, "completed_at": session.completed_at}
        )
