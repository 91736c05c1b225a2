"""OpenAPI descriptions (drf-spectacular) shared by the API, and those of the participant API.

The participant views (:mod:`studyapp.participant_api`) are plain ``APIView``s whose bodies
are validated inside the handlers, so drf-spectacular cannot see their request and response
shapes. The view extensions below describe them without touching that module: each replaces
the view, for schema generation only, by a subclass whose handlers carry ``@extend_schema``.
Keep them in step with the views (``tests/studyapp/test_schema_fuzz.py`` checks real responses
against the schema).
"""

from __future__ import annotations

from drf_spectacular.extensions import OpenApiViewExtension
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import serializers

from .serializers import (
    ClientInfoSerializer,
    JudgmentInputSerializer,
    JudgmentSerializer,
    SessionStateSerializer,
)


class ErrorSerializer(serializers.Serializer):
    """The API's error shape (:mod:`studyapp.api`)."""

    error = serializers.CharField(help_text="One sentence naming the problem.")
    code = serializers.CharField(help_text="Machine-readable code, e.g. not_found, throttled.")
    fields = serializers.DictField(
        required=False, help_text="400 only: DRF's per-field messages, unchanged."
    )


def errors(
    *statuses: int, described: dict[int, str] | None = None
) -> dict[int, OpenApiResponse]:
    """``{status: OpenApiResponse(ErrorSerializer)}`` for each status; ``described``
    (``{status: text}``) replaces the general descriptions for one endpoint."""
    text = {
        400: "Malformed body; `error` names the first bad field.",
        403: "Not allowed (not staff, or a missing CSRF token for a logged-in user).",
        404: "Unknown session token, study, or trial position.",
        406: "Unsupported Accept header or format.",
        409: "Contradicts stored state (e.g. a second judgment for one trial).",
        413: "Body over the endpoint's size limit. Nothing was written.",
        429: "Rate limit exceeded; see the Retry-After header. Nothing was written.",
        500: "Server failure. Nothing was written.",
        503: "The database cannot be reached; retry after the Retry-After header's seconds. "
        "Nothing was written.",
    }
    # Every endpoint can meet a server failure or a database outage.
    statuses = (*statuses, *(s for s in (500, 503) if s not in statuses))
    text.update(described or {})
    return {s: OpenApiResponse(ErrorSerializer, description=text.get(s, "")) for s in statuses}


# ----------------------------------------------------------------------------- participant API


class ClientInfoResponseSerializer(serializers.Serializer):
    client_info = serializers.DictField(help_text="Everything stored about the display so far.")


class CompletionSerializer(serializers.Serializer):
    completion_code = serializers.CharField()
    completed_at = serializers.DateTimeField()


TAG = ["participant"]


class SessionStateViewSchema(OpenApiViewExtension):
    target_class = "studyapp.participant_api.SessionStateView"

    def view_replacement(self):
        class Described(self.target_class):
            @extend_schema(
                tags=TAG,
                summary="Protocol timings and the session's trials",
                responses={200: SessionStateSerializer, **errors(404)},
            )
            def get(self, request, token):
                return super().get(request, token)  # pragma: no cover (schema only)

            @extend_schema(
                tags=TAG,
                summary="Store the participant's measured display (window, refresh rate)",
                request=ClientInfoSerializer,
                responses={200: ClientInfoResponseSerializer, **errors(400, 404, 413, 429)},
            )
            def patch(self, request, token):
                return super().patch(request, token)  # pragma: no cover

        return Described


# What the judgment POST's 400 and 404 mean there (studyapp.participant_api.JudgmentCreateView).
JUDGMENT_ERRORS = {
    400: "Malformed body (checked before the token: also for an unknown session), or a "
    "`response` or `durations` the session's protocol does not accept: `error` names the "
    "field and what is accepted, e.g. \"response: 'same' is not an answer of this 2afc "
    "study; use one of 'left', 'right'\" or \"durations.blank_ms: a label trial has no blank "
    "phase; send only first_ms (or null)\". Nothing was written.",
    404: "Unknown session token, or no trial at this position. Nothing was written.",
}


class JudgmentCreateViewSchema(OpenApiViewExtension):
    target_class = "studyapp.participant_api.JudgmentCreateView"

    def view_replacement(self):
        class Described(self.target_class):
            @extend_schema(
                tags=TAG,
                summary="Store the judgment of one trial (idempotent per idempotency_key)",
                request=JudgmentInputSerializer,
                responses={
                    201: OpenApiResponse(JudgmentSerializer, description="Stored."),
                    200: OpenApiResponse(
                        JudgmentSerializer, description="Identical retry: already stored."
                    ),
                    **errors(400, 404, 409, 413, 429, described=JUDGMENT_ERRORS),
                },
            )
            def post(self, request, token):
                return super().post(request, token)  # pragma: no cover

        return Described


class SessionCompleteViewSchema(OpenApiViewExtension):
    target_class = "studyapp.participant_api.SessionCompleteView"

    def view_replacement(self):
        class Described(self.target_class):
            @extend_schema(
                tags=TAG,
                summary="Finish the session and get the completion code",
                request=None,
                responses={200: CompletionSerializer, **errors(404, 409, 429)},
            )
            def post(self, request, token):
                return super().post(request, token)  # pragma: no cover

        return Described
