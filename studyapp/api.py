"""JSON error shape shared by every API view.

Every error the API returns is ``{"error": "<one sentence naming the problem>", "code": ...}``;
validation errors add ``"fields"`` (DRF's per-field detail, unchanged) and name the first
offending field in ``error``, e.g. ``"durations.first_ms: Ensure this value is less than or
equal to 60000."``. The trial runner shows ``error`` to the participant as is.

Bodies (:class:`studyapp.parsers.StrictJSONParser`, the API's only parser): a body larger
than the view's ``max_body_bytes`` (participant writes: :data:`PARTICIPANT_MAX_BODY` = 8 KiB,
checked from ``Content-Length`` even where the view reads no body; staff:
:data:`STAFF_MAX_BODY`) is refused with 413 ``too_large`` before it is read; invalid UTF-8,
invalid JSON, ``NaN``/``Infinity``, a string with a lone UTF-16 surrogate (``"\\udc00"``) and
nesting deeper than :data:`MAX_DEPTH` are 400 ``parse_error``; a body sent without a length
(``Transfer-Encoding: chunked``) is 411 ``length_required``. Every refusal happens before the
view runs: nothing is written.

Server failures: a database that cannot be reached (or a statement it aborts) is 503
``database_unavailable`` with ``Retry-After`` (:func:`database_unavailable`), for the API in the
JSON shape above; outside DRF's views (a middleware, a page) :func:`server_error`, the
project's ``handler500``, answers the same way (HTML for pages).
A failed request has written nothing: every write is one transaction.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from django.core.exceptions import RequestDataTooBig
from django.db import DatabaseError, IntegrityError
from django.http import HttpRequest, HttpResponse, JsonResponse
from rest_framework import exceptions, status
from rest_framework.views import exception_handler as drf_exception_handler

from .parsers import MAX_DEPTH, PARTICIPANT_MAX_BODY, STAFF_MAX_BODY, PayloadTooLarge

__all__ = ["MAX_DEPTH", "PARTICIPANT_MAX_BODY", "STAFF_MAX_BODY", "PayloadTooLarge"]

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 5


class DatabaseUnavailable(exceptions.APIException):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_detail = (
        "The study's database is not reachable at the moment; nothing was stored. "
        "Please try again in a few seconds."
    )
    default_code = "database_unavailable"


def database_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` means the database is down or aborted us (not a constraint we broke)."""
    return isinstance(exc, DatabaseError) and not isinstance(exc, IntegrityError)


class Conflict(exceptions.APIException):
    """409: the request is well formed but contradicts what is already stored."""

    status_code = status.HTTP_409_CONFLICT
    default_detail = "The request conflicts with the stored state."
    default_code = "conflict"


def _flatten(detail: Any, prefix: str = "") -> list[str]:
    """``{"a": {"b": ["msg"]}}`` → ``["a.b: msg"]``; non-field errors keep no prefix."""
    if isinstance(detail, dict):
        messages: list[str] = []
        for key, value in detail.items():
            name = "" if key == "non_field_errors" else str(key)
            messages += _flatten(value, f"{prefix}.{name}" if prefix and name else prefix or name)
        return messages
    if isinstance(detail, list):
        return [message for item in detail for message in _flatten(item, prefix)]
    return [f"{prefix}: {detail}" if prefix else str(detail)]


def _codes(detail: Any) -> str:
    if isinstance(detail, dict):
        return next((_codes(v) for v in detail.values()), "invalid")
    if isinstance(detail, list):
        return _codes(detail[0]) if detail else "invalid"
    return getattr(detail, "code", None) or "error"


def exception_handler(exc, context):
    """DRF's handler, reshaped to ``{"error": ..., "code": ...}`` (plus ``fields`` for 400s)."""
    if database_unavailable(exc):
        logger.error("database unavailable: %s", exc)
        exc = DatabaseUnavailable()
    elif isinstance(exc, RequestDataTooBig):
        exc = PayloadTooLarge(str(exc))
    response = drf_exception_handler(exc, context)
    if response is None:  # a bug: log it, and still answer in the API's shape
        logger.exception("unhandled error in %s", context.get("view"), exc_info=exc)
        return _json_error(500, "internal_error", "The server failed; nothing was stored.")
    if isinstance(exc, DatabaseUnavailable):
        response["Retry-After"] = str(RETRY_AFTER_S)
    detail = response.data
    if isinstance(detail, dict) and set(detail) == {"detail"}:
        detail = detail["detail"]
    messages = _flatten(detail) or ["invalid request"]
    data: dict[str, Any] = {"error": "; ".join(messages), "code": _codes(detail)}
    if isinstance(exc, exceptions.ValidationError):
        data["fields"] = response.data
    response.data = data
    return response


def _json_error(status_code: int, code: str, message: str):
    from rest_framework.response import Response

    return Response({"error": message, "code": code}, status=status_code)


def server_error(request: HttpRequest) -> HttpResponse:
    """Django's ``handler500``: any uncaught failure, in a view or in a middleware.

    A database outage is 503 with ``Retry-After``; anything else 500. Under ``/api/`` in the
    JSON error shape, elsewhere a short HTML page.
    """
    exc = sys.exc_info()[1]
    unavailable = exc is not None and database_unavailable(exc)
    if unavailable:
        status_code, code = 503, DatabaseUnavailable.default_code
        message = str(DatabaseUnavailable.default_detail)
    else:
        status_code, code = 500, "internal_error"
        message = "The server failed; nothing was stored. Please try again."
    if request.path.startswith("/api/"):
        response: HttpResponse = JsonResponse({"error": message, "code": code}, status=status_code)
    else:
        response = HttpResponse(
            f"<!doctype html><title>Please try again</title><p>{message}</p>",
            status=status_code,
        )
    if unavailable:
        response["Retry-After"] = str(RETRY_AFTER_S)
    response["Cache-Control"] = "no-store"
    return response
