"""JSON error shape shared by every API view.

Every error the API returns is ``{"error": "<one sentence naming the problem>", "code": ...}``;
validation errors add ``"fields"`` (DRF's per-field detail, unchanged) and name the first
offending field in ``error``, e.g. ``"durations.first_ms: Ensure this value is less than or
equal to 60000."``. The trial runner shows ``error`` to the participant as is.
"""

from __future__ import annotations

from typing import Any

from rest_framework import exceptions, status
from rest_framework.views import exception_handler as drf_exception_handler


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
    response = drf_exception_handler(exc, context)
    if response is None:  # not an API error: let Django log it and answer 500
        return None
    detail = response.data
    if isinstance(detail, dict) and set(detail) == {"detail"}:
        detail = detail["detail"]
    messages = _flatten(detail) or ["invalid request"]
    data: dict[str, Any] = {"error": "; ".join(messages), "code": _codes(detail)}
    if isinstance(exc, exceptions.ValidationError):
        data["fields"] = response.data
    response.data = data
    return response
