"""Participant JSON API: ``/api/sessions/<token>/...`` (state, judgments, completion).

The session token in the URL is the participant's credential. The API keeps DRF's
SessionAuthentication, so an anonymous participant needs no CSRF token (nothing ambient
authenticates them: a forged request would have to know the token), while a logged-in staff
member trying a study gets the usual CSRF check; the trial runner always sends ``X-CSRFToken``
read from the cookie, so both work without ``csrf_exempt``.
"""

from __future__ import annotations

from django.db import IntegrityError, transaction
from django.utils import timezone
from rest_framework import status
from rest_framework.exceptions import NotFound
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from .api import Conflict
from .models import Judgment, Session, Trial
from .serializers import (
    ClientInfoSerializer,
    JudgmentInputSerializer,
    JudgmentSerializer,
    session_state,
)


class SessionAPIView(APIView):
    """Base: resolves the session token (404 if unknown); responses are never cached."""

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

    GET → ``{"study": {"title", "first_ms", "blank_ms", "second_ms"},
    "trials": [{"position", "images": [url1, url2], "answered"}], "completed"}``.

    PATCH body (see :class:`ClientInfoSerializer`) is merged into ``session.client_info``;
    answers ``{"client_info": {...}}``.
    """

    def get(self, request: Request, token: str) -> Response:
        return Response(session_state(self.get_session(token)))

    def patch(self, request: Request, token: str) -> Response:
        session = self.get_session(token)
        serializer = ClientInfoSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        with transaction.atomic():
            session = Session.objects.select_for_update().get(pk=session.pk)
            session.client_info = {**session.client_info, **serializer.validated_data}
            session.save(update_fields=["client_info"])
        return Response({"client_info": session.client_info})


def _same_judgment(judgment: Judgment, session: Session, data: dict) -> bool:
    durations = data["durations"]
    return (
        judgment.trial.session_id == session.pk
        and judgment.trial.position == data["position"]
        and judgment.response == data["response"]
        and judgment.response_time_ms == data["response_time_ms"]
        and judgment.first_ms == durations["first_ms"]
        and judgment.blank_ms == durations["blank_ms"]
        and judgment.second_ms == durations["second_ms"]
    )


class JudgmentCreateView(SessionAPIView):
    """``POST``: store the judgment of one trial.

    Body ``{"position", "response": "same"|"different", "response_time_ms",
    "durations": {"first_ms", "blank_ms", "second_ms"}, "idempotency_key"}``.
    201 with the stored judgment; 200 with the same judgment when the identical body is
    re-sent with the same key (a retry); 409 when the key was used for a different judgment
    or the trial already has another judgment; 404 for an unknown position; 400 for a bad body.
    """

    def post(self, request: Request, token: str) -> Response:
        session = self.get_session(token)
        serializer = JudgmentInputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        try:
            with transaction.atomic():
                return self._record(session, data)
        except IntegrityError:
            # A concurrent request with the same key (or for the same trial) committed first.
            with transaction.atomic():
                return self._record(session, data)

    def _record(self, session: Session, data: dict) -> Response:
        key, position = data["idempotency_key"], data["position"]
        existing = Judgment.objects.select_related("trial").filter(idempotency_key=key).first()
        if existing is not None:
            if _same_judgment(existing, session, data):
                return Response(JudgmentSerializer(existing).data, status=status.HTTP_200_OK)
            raise Conflict(f"idempotency_key {key!r} was already used for a different judgment")
        trial = Trial.objects.select_for_update().filter(session=session, position=position).first()
        if trial is None:
            raise NotFound(f"this session has no trial at position {position}")
        if Judgment.objects.filter(trial=trial).exists():
            raise Conflict(f"the trial at position {position} already has a judgment")
        durations = data["durations"]
        judgment = Judgment.objects.create(
            trial=trial,
            response=data["response"],
            response_time_ms=data["response_time_ms"],
            first_ms=durations["first_ms"],
            blank_ms=durations["blank_ms"],
            second_ms=durations["second_ms"],
            idempotency_key=key,
        )
        return Response(JudgmentSerializer(judgment).data, status=status.HTTP_201_CREATED)


class SessionCompleteView(SessionAPIView):
    """``POST``: finish the session → 200 ``{"completion_code"}`` once every trial is answered.

    Repeating it is harmless (same code, ``completed_at`` kept); 409 names how many trials
    are still unanswered.
    """

    def post(self, request: Request, token: str) -> Response:
        session = self.get_session(token)
        with transaction.atomic():
            session = Session.objects.select_for_update().get(pk=session.pk)
            n_trials = session.trials.count()
            n_open = session.trials.filter(judgment__isnull=True).count()
            if n_open:
                raise Conflict(f"{n_open} of {n_trials} trials are still unanswered")
            if session.completed_at is None:
                session.completed_at = timezone.now()
                session.save(update_fields=["completed_at"])
        return Response(
            {"completion_code": session.completion_code, "completed_at": session.completed_at}
        )
