"""Participant pages, the participant JSON API and a small staff overview.

Pages (server-rendered):
  ``/study/<slug>/``                      instructions + Start (POST creates participant+session)
  ``/session/<token>/``                   trial runner (``static/js/trials.js``)
  ``/session/<token>/image/<pos>/<slot>/`` one stimulus PNG, by opaque per-trial URL
  ``/session/<token>/done/``              completion code
  ``/staff/``                             studies with counts (staff only)

API (JSON, ``/api/sessions/<token>/...``): see the view classes below.

The session token in the URL is the participant's credential. The API keeps DRF's
SessionAuthentication, so an anonymous participant needs no CSRF token (nothing ambient
authenticates them: a forged request would have to know the token), while a logged-in staff
member trying a study gets the usual CSRF check; the trial runner always sends ``X-CSRFToken``
read from the cookie, so both work without ``csrf_exempt``.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

from django.conf import settings
from django.contrib.admin.views.decorators import staff_member_required
from django.db import IntegrityError, transaction
from django.db.models import Count, Q
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_http_methods
from rest_framework import status
from rest_framework.exceptions import NotFound
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from .api import Conflict
from .models import Judgment, Pair, Participant, Session, Study, Trial
from .scheduler import StudyUnavailable, start_session
from .serializers import (
    ClientInfoSerializer,
    JudgmentInputSerializer,
    JudgmentSerializer,
    session_state,
)

logger = logging.getLogger(__name__)

# Django-session key under which a browser remembers its unfinished session per study, so a
# double-clicked or re-submitted Start form resumes instead of creating a second participant.
_RESUME_KEY = "perceptlab_sessions"


# --------------------------------------------------------------------------- pages


def _unavailable_reason(study: Study) -> str | None:
    if not study.is_active:
        return "This study is not accepting participants at the moment."
    if not study.pairs.exists():
        return "This study has no images to show yet."
    return None


def _unfinished_session(request: HttpRequest, study: Study) -> Session | None:
    token = request.session.get(_RESUME_KEY, {}).get(str(study.pk))
    if not token:
        return None
    return Session.objects.filter(
        token=token, participant__study=study, completed_at__isnull=True
    ).first()


def _unavailable(request: HttpRequest, study: Study, reason: str) -> HttpResponse:
    return render(
        request, "study_unavailable.html", {"study": study, "reason": reason},
        status=status.HTTP_403_FORBIDDEN,
    )


@never_cache
@require_http_methods(["GET", "POST"])
def study_start(request: HttpRequest, slug: str) -> HttpResponse:
    """Instructions and a Start button; POST creates an anonymous participant and a session."""
    study = get_object_or_404(Study, slug=slug)
    resume = _unfinished_session(request, study)
    if request.method == "POST":
        if resume is not None:
            return redirect("session-page", token=resume.token)
        try:
            with transaction.atomic():  # a refused start leaves no participant behind
                participant = Participant.objects.create(
                    study=study, source="link", external_id=str(uuid.uuid4())
                )
                session = start_session(
                    participant, user_agent=request.headers.get("User-Agent", "")
                )
        except StudyUnavailable as exc:
            logger.info("refused a session: %s", exc)
            return _unavailable(request, study, _unavailable_reason(study) or str(exc))
        remembered = request.session.get(_RESUME_KEY, {})
        remembered[str(study.pk)] = session.token
        request.session[_RESUME_KEY] = remembered
        return redirect("session-page", token=session.token)
    reason = _unavailable_reason(study)
    if reason:
        return _unavailable(request, study, reason)
    return render(
        request, "study_start.html",
        {"study": study, "resume": resume, "n_trials": study.trials_per_session},
    )


@never_cache
@require_GET
def session_page(request: HttpRequest, token: str) -> HttpResponse:
    """The trial runner; a completed session goes straight to its done page."""
    session = get_object_or_404(Session.objects.select_related("participant__study"), token=token)
    if session.completed_at is not None:
        return redirect("session-done", token=token)
    return render(
        request, "session.html",
        {"session": session, "study": session.study, "csrf_cookie_name": settings.CSRF_COOKIE_NAME},
    )


@never_cache
@require_GET
def session_done(request: HttpRequest, token: str) -> HttpResponse:
    """The completion code, once the session is complete; before that, back to the trials."""
    session = get_object_or_404(Session.objects.select_related("participant__study"), token=token)
    if session.completed_at is None:
        return redirect("session-page", token=token)
    return render(request, "done.html", {"session": session, "study": session.study})


@require_GET
def trial_image(request: HttpRequest, token: str, position: int, slot: int) -> HttpResponse:
    """The PNG shown in ``slot`` (1 = first, 2 = second) of one trial.

    The response names nothing: no filename, no Last-Modified (file times could tell the
    natural image from the later-generated perturbed one), no ETag.
    """
    if slot not in (1, 2):
        raise Http404("slot must be 1 or 2")
    trial = get_object_or_404(
        Trial.objects.select_related("pair"), session__token=token, position=position
    )
    media_root = Path(settings.MEDIA_ROOT).resolve()
    path = (media_root / trial.image_path(slot)).resolve()
    if not path.is_relative_to(media_root) or not path.is_file():
        logger.error("image of pair %s slot %s is missing: %s", trial.pair_id, slot, path)
        raise Http404("image missing")
    response = HttpResponse(path.read_bytes(), content_type="image/png")
    response["Cache-Control"] = "private, max-age=3600"
    return response


@staff_member_required
@require_GET
def staff_home(request: HttpRequest) -> HttpResponse:
    """Studies with pair/session/judgment counts and their participant links."""

    def counts(queryset, field: str, **extra) -> dict[int, dict]:
        rows = queryset.values(field).annotate(n=Count("id"), **extra)
        return {row[field]: row for row in rows}

    pairs = counts(Pair.objects, "study", n_sentinel=Count("id", filter=Q(is_sentinel=True)))
    sessions = counts(
        Session.objects, "participant__study",
        n_completed=Count("id", filter=Q(completed_at__isnull=False)),
    )
    judgments = counts(Judgment.objects, "trial__session__participant__study")
    rows = []
    for study in Study.objects.all():
        p = pairs.get(study.pk, {})
        s = sessions.get(study.pk, {})
        rows.append({
            "study": study,
            "n_pairs": p.get("n", 0),
            "n_sentinel": p.get("n_sentinel", 0),
            "n_sessions": s.get("n", 0),
            "n_completed": s.get("n_completed", 0),
            "n_judgments": judgments.get(study.pk, {}).get("n", 0),
            "link": request.build_absolute_uri(reverse("study-start", args=[study.slug])),
        })
    return render(request, "staff.html", {"rows": rows})


# --------------------------------------------------------------------------- API


class SessionAPIView(APIView):
    """Base: resolves the session token (404 if unknown); responses are never cached."""

    def get_session(self, token: str) -> Session:
        session = (
            Session.objects.select_related("participant__study").filter(token=token).first()
        )
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
        existing = (
            Judgment.objects.select_related("trial").filter(idempotency_key=key).first()
        )
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
