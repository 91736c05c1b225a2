"""Participant pages and a small staff overview.

Pages (server-rendered):
  ``/study/<slug>/``             GET: landing page of a participant link (MTurk, Prolific or
                                 plain; see :mod:`studyapp.recruitment`): consent (if the study
                                 has a consent text) and Start, or the MTurk HIT preview, or a
                                 page saying why not. POST (same query string): "I agree" creates
                                 participant + session (or resumes the unfinished one), "I do not
                                 agree" ends politely with nothing stored.
  ``/session/<token>/``          the trial runner (``static/js/trials.js``): window check,
                                 instructions with examples, practice with feedback, main trials,
                                 breaks
  ``/session/<token>/done/``     end page: MTurk form POST to ``turkSubmitTo``, Prolific
                                 redirect, or the completion code
  ``/img/<token>/<key>/``        one stimulus PNG, by opaque per-(trial, slot) key
                                 (:mod:`studyapp.image_tokens`)
  ``/staff/``                    the staff study list (the same page as ``/dashboard/``)

The participant pages may be shown inside MTurk's iframe (``frame-ancestors``: this site and
MTurk's two sites); every other page keeps Django's ``X-Frame-Options: DENY``.

The participant JSON API lives in :mod:`studyapp.participant_api`.
"""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Callable
from functools import wraps

from django.conf import settings
from django.contrib.admin.views.decorators import staff_member_required
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.cache import never_cache
from django.views.decorators.clickjacking import xframe_options_exempt
from django.views.decorators.http import require_GET, require_http_methods
from rest_framework import status

from .fingerprints import assign_request_fingerprints
from .models import Participant, Session, Study
from .protocols import TrialSpec, trial_spec
from .recruitment import (
    MTURK_SUBMIT_HOSTS,
    BadRecruitmentLink,
    Recruitment,
    mturk_submit_url,
    parse_recruitment,
    prolific_complete_url,
)
from .scheduler import AlreadyParticipated, StudyUnavailable, standing, start_or_resume
from .stimulus_server import STIMULUS_HEADERS, stimulus_response_body

logger = logging.getLogger(__name__)

# Django-session key under which a browser remembers its latest session per study (plain links),
# so a double-clicked Start resumes instead of creating a second participant, and a finished
# participant is recognised when the study allows no retakes.
_RESUME_KEY = "perceptlab_sessions"
_START_KEY = re.compile(r"[A-Za-z0-9_-]{16,64}")
FRAME_ANCESTORS = " ".join(["'self'", *(f"https://{host}" for host in MTURK_SUBMIT_HOSTS)])


def participant_page(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """Never cached; may be framed by MTurk (ExternalQuestion pages live in an iframe)."""

    @wraps(view)
    def wrapped(request: HttpRequest, *args, **kwargs) -> HttpResponse:
        response = view(request, *args, **kwargs)
        response.setdefault("Content-Security-Policy", f"frame-ancestors {FRAME_ANCESTORS}")
        return response

    return never_cache(xframe_options_exempt(wrapped))


# --------------------------------------------------------------------------- landing page


def _unavailable_reason(study: Study) -> str | None:
    if not study.is_active:
        return "This study is not accepting participants at the moment."
    if not study.pairs.exists():
        return "This study has no images to show yet."
    return None


def _unavailable(
    request: HttpRequest, study: Study, reason: str, recruitment: Recruitment | None = None
) -> HttpResponse:
    return render(
        request,
        "study_unavailable.html",
        {"study": study, "reason": reason, "recruitment": recruitment},
        status=status.HTTP_403_FORBIDDEN,
    )


def _already_taken(request: HttpRequest, study: Study, recruitment: Recruitment) -> HttpResponse:
    return _unavailable(
        request,
        study,
        "You have already taken part in this study. Thank you! Each person can take it only "
        "once.",
        recruitment,
    )


def _bad_link(request: HttpRequest, study: Study, reason: str) -> HttpResponse:
    return render(
        request,
        "bad_link.html",
        {"study": study, "reason": reason},
        status=status.HTTP_400_BAD_REQUEST,
    )


def _remembered_token(request: HttpRequest, study: Study) -> str | None:
    return request.session.get(_RESUME_KEY, {}).get(str(study.pk))


def _known_participant(
    request: HttpRequest, study: Study, recruitment: Recruitment
) -> Participant | None:
    if recruitment.source == "link":
        token = _remembered_token(request, study)
        remembered = (
            Session.objects.select_related("participant")
            .filter(token=token, participant__study=study)
            .first()
            if token else None
        )
        return remembered.participant if remembered else None
    return Participant.objects.filter(
        study=study, source=recruitment.source, external_id=recruitment.external_id
    ).first()


def _start_key(request: HttpRequest) -> str | None:
    """The consent form's idempotency key (see :func:`scheduler.start_or_resume`), if valid."""
    key = request.POST.get("start_key", "")
    return key if _START_KEY.fullmatch(key) else None


@participant_page
@require_http_methods(["GET", "POST"])
def study_start(request: HttpRequest, slug: str) -> HttpResponse:
    """Landing page of a participant link; POST agrees (or declines) and starts the session."""
    study = get_object_or_404(Study, slug=slug)
    try:
        recruitment = parse_recruitment(request.GET)
    except BadRecruitmentLink as exc:
        return _bad_link(request, study, str(exc))
    reason = _unavailable_reason(study)
    if reason:
        return _unavailable(request, study, reason, recruitment)
    if recruitment.preview:
        if request.method == "POST":
            return _bad_link(request, study, "this is a preview of the HIT; accept it to start")
        return render(request, "study_preview.html", {"study": study})

    resumable, completed = standing(_known_participant(request, study, recruitment))
    if resumable is None and completed and not study.allow_retakes:
        return _already_taken(request, study, recruitment)
    context = {
        "study": study,
        "recruitment": recruitment,
        "resume": resumable,
        "action": request.get_full_path(),
        "n_trials": study.trials_per_session,
        # A retried POST of this form (its first answer lost) resumes what the first started.
        "start_key": secrets.token_urlsafe(24),
    }
    if request.method == "GET":
        return render(request, "study_start.html", context)

    decision = request.POST.get("decision", "")
    if resumable is None and decision == "decline":
        return render(request, "consent_declined.html", context)
    if resumable is None and study.consent_text and decision != "agree":
        context["error"] = "Please choose “I agree” to take part, or “I do not agree” to leave."
        return render(request, "study_start.html", context, status=status.HTTP_400_BAD_REQUEST)
    try:
        started = start_or_resume(
            study,
            source=recruitment.source,
            external_id=recruitment.external_id,
            remembered_token=_remembered_token(request, study),
            start_key=_start_key(request),
            user_agent=request.headers.get("User-Agent", ""),
            session_fields=recruitment.session_fields,
            on_create=lambda session: assign_request_fingerprints(session, request),
        )
    except AlreadyParticipated:
        return _already_taken(request, study, recruitment)
    except StudyUnavailable as exc:
        logger.info("refused a session: %s", exc)
        return _unavailable(request, study, _unavailable_reason(study) or str(exc), recruitment)
    if recruitment.source == "link":
        remembered = request.session.get(_RESUME_KEY, {})
        remembered[str(study.pk)] = started.token
        request.session[_RESUME_KEY] = remembered
    return redirect("session-page", token=started.token)


# --------------------------------------------------------------------------- session pages


def _session_or_404(token: str) -> Session:
    return get_object_or_404(Session.objects.select_related("participant__study"), token=token)


@participant_page
@require_GET
def session_page(request: HttpRequest, token: str) -> HttpResponse:
    """The trial runner; a completed session goes straight to its done page."""
    session = _session_or_404(token)
    if session.completed_at is not None:
        return redirect("session-done", token=token)
    study = session.study
    spec = trial_spec(study)
    return render(
        request,
        "session.html",
        {
            "session": session,
            "study": study,
            "spec": spec,
            "answer_buttons": _answer_buttons(spec),
            "key_same": study.key_same.upper(),
            "key_different": study.key_different.upper(),
            "n_trials": study.trials_per_session,
            "csrf_cookie_name": settings.CSRF_COOKIE_NAME,
        },
    )


def _answer_buttons(spec: TrialSpec) -> list[dict[str, str]]:
    """The prompt's buttons: ``{"response", "label", "key"}`` per answer of the protocol, in
    its order (``key`` upper-case, empty where the answer has none or is its own key)."""
    key_of = {answer: key.upper() for key, answer in spec.keys.items()}
    buttons = []
    for answer in spec.answers:
        label = answer.capitalize() if spec.protocol in ("jnd", "2afc") else answer
        key = key_of.get(answer, "")
        buttons.append({"response": answer, "label": label, "key": "" if key == label else key})
    return buttons


@participant_page
@require_GET
def session_done(request: HttpRequest, token: str) -> HttpResponse:
    """The end page, once the server holds every judgment and the session is complete.

    MTurk: a form that POSTs ``assignmentId`` and ``completion_code`` to
    ``{turkSubmitTo}/mturk/externalSubmit`` (submitted by ``static/js/done.js``, with a button
    as fallback). Prolific: a redirect to Prolific's completion URL with the study's code
    (shown too); without a study code, the session's code to paste. Plain link: the code.
    """
    session = _session_or_404(token)
    if session.completed_at is None:
        return redirect("session-page", token=token)
    study = session.study
    context = {"session": session, "study": study, "source": session.participant.source}
    if context["source"] == "mturk" and session.assignment_id:
        try:
            context["mturk_submit_url"] = mturk_submit_url(session.turk_submit_to)
        except BadRecruitmentLink:  # stored before validation existed, or edited by hand
            logger.error("session %s has an invalid turk_submit_to", session.pk)
    if context["source"] == "prolific" and study.prolific_completion_code:
        context["prolific_url"] = prolific_complete_url(study.prolific_completion_code)
    return render(request, "done.html", context)


@require_GET
def trial_image(request: HttpRequest, token: str, key: str) -> HttpResponse:
    """The PNG behind one opaque image URL, re-encoded canonically for this request.

    See :mod:`studyapp.image_tokens` for what it hides: every image of given dimensions has
    the same length, headers and chunk layout and fresh bytes; no filename, Last-Modified or
    ETag. In production :class:`studyapp.stimulus_server.StimulusWSGI` answers these URLs
    before Django does, with the same body function and headers.
    """
    body = stimulus_response_body(token, key)
    if body is None:
        raise Http404("unknown image")
    response = HttpResponse(body)
    for name, value in STIMULUS_HEADERS:
        response[name] = value
    return response


# --------------------------------------------------------------------------- error pages


def _error_page(request: HttpRequest, status_code: int, code: str, message: str, template: str):
    """A styled page (``templates/<status>.html``), or the JSON error shape under ``/api/``."""
    if request.path.startswith("/api/"):
        return JsonResponse({"error": message, "code": code}, status=status_code)
    return render(request, template, {"message": message}, status=status_code)


def page_not_found(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    """``handler404``: a mistyped or outdated link."""
    return _error_page(
        request, 404, "not_found", "There is no page at this address.", "404.html"
    )


def bad_request(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    """``handler400``: a request Django refused before any view (e.g. a bad Host header)."""
    return _error_page(
        request, 400, "bad_request", "This request could not be understood.", "400.html"
    )


# --------------------------------------------------------------------------- staff


@staff_member_required
@require_GET
def staff_home(request: HttpRequest) -> HttpResponse:
    """The staff's one study list, the same page as ``/dashboard/`` (one count definition:
    :func:`reports.staff_study_list`, as the staff API), with the participant links."""
    from .dashboard import study_list  # matplotlib and the engine only for staff pages

    return study_list(request)
