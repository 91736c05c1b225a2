"""Participant pages and a small staff overview.

Pages (server-rendered):
  ``/study/<slug>/``                      instructions + Start (POST creates participant+session)
  ``/session/<token>/``                   trial runner (``static/js/trials.js``)
  ``/session/<token>/image/<pos>/<slot>/`` one stimulus PNG, by opaque per-trial URL
  ``/session/<token>/done/``              completion code
  ``/staff/``                             studies with counts (staff only)

The participant JSON API lives in :mod:`studyapp.participant_api`.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

from django.conf import settings
from django.contrib.admin.views.decorators import staff_member_required
from django.db import transaction
from django.db.models import Count, Q
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_http_methods
from rest_framework import status

from .models import Judgment, Pair, Participant, Session, Study, Trial
from .scheduler import StudyUnavailable, start_session

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
        request,
        "study_unavailable.html",
        {"study": study, "reason": reason},
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
        request,
        "study_start.html",
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
        request,
        "session.html",
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
        Session.objects,
        "participant__study",
        n_completed=Count("id", filter=Q(completed_at__isnull=False)),
    )
    judgments = counts(Judgment.objects, "trial__session__participant__study")
    rows = []
    for study in Study.objects.all():
        p = pairs.get(study.pk, {})
        s = sessions.get(study.pk, {})
        rows.append(
            {
                "study": study,
                "n_pairs": p.get("n", 0),
                "n_sentinel": p.get("n_sentinel", 0),
                "n_sessions": s.get("n", 0),
                "n_completed": s.get("n_completed", 0),
                "n_judgments": judgments.get(study.pk, {}).get("n", 0),
                "link": request.build_absolute_uri(reverse("study-start", args=[study.slug])),
            }
        )
    return render(request, "staff.html", {"rows": rows})
