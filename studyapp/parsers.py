"""The API's JSON parser: size-limited, strict UTF-8, no NaN/Infinity, shallow, no lone
surrogates; a body without a length (``Transfer-Encoding: chunked``) is 411.

Kept apart from :mod:`studyapp.api` because DRF reads ``DEFAULT_PARSER_CLASSES`` while
``rest_framework.views`` is being imported, so this module must not import it.
"""

from __future__ import annotations

import json
from typing import Any

from rest_framework import exceptions, status
from rest_framework.parsers import JSONParser

PARTICIPANT_MAX_BODY = 8 * 1024
STAFF_MAX_BODY = 256 * 1024
MAX_DEPTH = 16


class PayloadTooLarge(exceptions.APIException):
    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    default_detail = "The request body is too large."
    default_code = "too_large"


class LengthRequired(exceptions.APIException):
    status_code = status.HTTP_411_LENGTH_REQUIRED
    default_detail = (
        "The request body has no Content-Length (it was sent chunked); send it with its length."
    )
    default_code = "length_required"


def check_content_length(request, limit: int) -> None:
    """:class:`PayloadTooLarge` when the declared ``Content-Length`` is over ``limit``;
    :class:`LengthRequired` for a body sent without one (``Transfer-Encoding: chunked``: WSGI
    then reads it as empty, which would be answered 400 "required" for fields that were sent).
    """
    meta = request.META
    if not meta.get("CONTENT_LENGTH") and meta.get("HTTP_TRANSFER_ENCODING", "").strip():
        raise LengthRequired()
    declared = meta.get("CONTENT_LENGTH") or "0"
    try:
        length = int(declared)
    except ValueError:
        raise exceptions.ParseError("invalid Content-Length header") from None
    if length > limit:
        raise PayloadTooLarge(f"the request body is over {limit} bytes")


def _has_lone_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _check_value(value: Any, limit: int) -> None:
    """:class:`ParseError` when ``value`` nests more than ``limit`` containers deep, or holds a
    string (a key or a value) with a lone surrogate such as ``"\\udc00"``: JSON's ``\\u``
    escapes allow one, but it is no text: no database column stores it and no UTF-8 answer
    can echo it back (that was a 500). Iterative: no recursion."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if _has_lone_surrogate(item):
                raise exceptions.ParseError(
                    "JSON parse error - a string holds a lone UTF-16 surrogate (a \\uD800-\\uDFFF "
                    "escape without its pair), which is not text"
                )
        elif isinstance(item, dict | list):
            if depth > limit:
                raise exceptions.ParseError(
                    f"JSON parse error - nested more than {limit} levels deep"
                )
            if isinstance(item, dict):
                stack.extend((key, depth) for key in item)
                children = item.values()
            else:
                children = item
            stack.extend((child, depth + 1) for child in children)


def _refuse_constant(name: str):
    raise exceptions.ParseError(f"JSON parse error - {name} is not a number JSON allows")


class StrictJSONParser(JSONParser):
    """JSON bodies (see :mod:`studyapp.api` for the limits and the answers)."""

    def parse(self, stream, media_type=None, parser_context=None):
        parser_context = parser_context or {}
        view = parser_context.get("view")
        limit = getattr(view, "max_body_bytes", STAFF_MAX_BODY)
        request = parser_context.get("request")
        if request is not None:
            check_content_length(request, limit)
        raw = stream.read(limit + 1) if stream is not None else b""
        if len(raw) > limit:
            raise PayloadTooLarge(f"the request body is over {limit} bytes")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise exceptions.ParseError(
                f"JSON parse error - the body is not valid UTF-8 (byte {exc.start})"
            ) from None
        try:
            data = json.loads(text, parse_constant=_refuse_constant)
        except RecursionError:
            raise exceptions.ParseError(
                f"JSON parse error - nested more than {MAX_DEPTH} levels deep"
            ) from None
        except ValueError as exc:
            raise exceptions.ParseError(f"JSON parse error - {exc}") from None
        _check_value(data, MAX_DEPTH)
        return data


