"""Every bad body is a clean 4xx in the API's error shape, and writes nothing.

Hand-picked bodies from issues 10 and 17 (deep nesting, wrong JSON types, oversized bodies,
invalid UTF-8, NaN, lone surrogates, positions past any integer column, a chunked body without
a length over real HTTP), then Hypothesis property tests: any JSON value or any bytes sent to
the participant API's write endpoints, and bodies whose strings hold surrogates and whose
integers reach 2^70, give a status below 500, and only a 201 writes anything.
"""

from __future__ import annotations

import json
import socket
import uuid
from urllib.parse import urlsplit

import pytest
from django.contrib.auth import get_user_model
from django.core.cache import cache
from django.test import Client
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from studyapp.api import MAX_DEPTH, PARTICIPANT_MAX_BODY
from studyapp.models import Judgment, Session
from studyapp.serializers import MAX_POSITION

pytestmark = pytest.mark.django_db


def _stored(session: Session) -> tuple:
    session.refresh_from_db()
    return Judgment.objects.count(), session.client_info, session.completed_at


def _post(client: Client, url: str, body: bytes, method: str = "post"):
    cache.clear()  # the rate limit must not answer for the view
    return getattr(client, method)(url, data=body, content_type="application/json")


def _deep(depth: int) -> bytes:
    return ("[" * depth + "]" * depth).encode()


def _urls(session: Session) -> dict[str, tuple[str, str]]:
    return {
        "judgment": ("post", f"/api/sessions/{session.token}/judgments/"),
        "client_info": ("patch", f"/api/sessions/{session.token}/"),
        "complete": ("post", f"/api/sessions/{session.token}/complete/"),
    }


def _assert_error(response, status: int, code: str | None = None, mentions: str = "") -> None:
    assert response.status_code == status, response.content[:300]
    body = response.json()
    assert set(body) >= {"error", "code"}, body
    if code:
        assert body["code"] == code, body
    assert mentions in body["error"], body


@pytest.mark.parametrize("endpoint", ["judgment", "client_info"])
def test_deep_nesting_is_400_not_500(client: Client, session: Session, endpoint: str):
    method, url = _urls(session)[endpoint]
    before = _stored(session)
    for body in (_deep(1000), b'{"a":' * 1000 + b"1" + b"}" * 1000, _deep(MAX_DEPTH + 1)):
        _assert_error(_post(client, url, body, method), 400, "parse_error", "nested")
    assert _stored(session) == before


def test_deep_nesting_on_the_staff_quality_post_is_400(client: Client, study):
    staff = get_user_model().objects.create_user("staff", password="pw-staff-123", is_staff=True)
    client.force_login(staff)
    response = _post(client, f"/api/staff/studies/{study.slug}/quality/", _deep(1000))
    _assert_error(response, 400, "parse_error", "nested")


def test_idempotency_key_must_be_a_string(client: Client, session: Session, judgment_body):
    url = _urls(session)["judgment"][1]
    for key in (12345678901, 1.5e10, True, ["abcdefgh"], {"k": "abcdefgh"}, None):
        body = json.dumps(judgment_body(0, idempotency_key=key)).encode()
        _assert_error(_post(client, url, body), 400, mentions="idempotency_key")
    assert Judgment.objects.count() == 0
    ok = _post(client, url, json.dumps(judgment_body(0)).encode())
    assert ok.status_code == 201


@pytest.mark.parametrize("endpoint", ["judgment", "client_info", "complete"])
def test_oversized_bodies_are_413(client: Client, session: Session, endpoint: str, judgment_body):
    method, url = _urls(session)[endpoint]
    before = _stored(session)
    padded = judgment_body(0, padding="x" * PARTICIPANT_MAX_BODY)
    response = _post(client, url, json.dumps(padded).encode(), method)
    _assert_error(response, 413, "too_large", str(PARTICIPANT_MAX_BODY))
    # ~3 MB, the old limit: refused from its Content-Length, before it is read
    _assert_error(_post(client, url, b" " * 3_000_000, method), 413, "too_large")
    assert _stored(session) == before


@pytest.mark.parametrize(
    ("body", "mentions"),
    [
        (b'{"position": 0, "response": "\xff\xfe"}', "UTF-8"),
        (b'{"position": NaN}', "NaN"),
        (b'{"position": Infinity}', "Infinity"),
        (b'{"position": 0,', "JSON parse error"),
    ],
)
def test_invalid_utf8_json_and_constants_are_400(
    client: Client, session: Session, body: bytes, mentions: str
):
    before = _stored(session)
    for endpoint in ("judgment", "client_info"):  # completion reads no body
        method, url = _urls(session)[endpoint]
        _assert_error(_post(client, url, body, method), 400, "parse_error", mentions)
    assert _stored(session) == before


LONE_SURROGATE = "\udc00"


@pytest.mark.parametrize(
    "make_body",
    [
        lambda jb: jb(0, response=LONE_SURROGATE),
        lambda jb: jb(0, idempotency_key="abcdefgh" + LONE_SURROGATE),
        lambda jb: {**jb(0), "\ud800x": 1},  # in a key
        lambda jb: jb(0, durations={"first_ms": 1.0, "blank_ms": 1.0, "second_ms": [
            "\ud83d"]}),  # a high surrogate without its low half, nested
    ],
)
def test_a_lone_surrogate_is_400_not_500(client: Client, session: Session, judgment_body,
                                         make_body):
    before = _stored(session)
    body = json.dumps(make_body(judgment_body)).encode()  # ensure_ascii: "\\udc00" escapes
    assert b"\\ud" in body
    for endpoint in ("judgment", "client_info"):
        method, url = _urls(session)[endpoint]
        _assert_error(_post(client, url, body, method), 400, "parse_error", "surrogate")
    assert _stored(session) == before
    # A proper pair (an emoji, escaped as two surrogates) is text: accepted as a string.
    emoji = json.dumps(judgment_body(0, idempotency_key="abcdefgh\U0001f600")).encode()
    assert b"\\ud83d\\ude00" in emoji
    assert _post(client, _urls(session)["judgment"][1], emoji).status_code == 201


@pytest.mark.parametrize("position", [MAX_POSITION + 1, 2**63 - 1, 2**63, 2**64, 10**30])
def test_a_position_past_any_integer_column_is_400(client: Client, session: Session,
                                                   judgment_body, position: int):
    before = _stored(session)
    url = _urls(session)["judgment"][1]
    body = json.dumps(judgment_body(position)).encode()
    _assert_error(_post(client, url, body), 400, "max_value", "position")
    assert _stored(session) == before


def _raw_http(base_url: str, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``request`` as is over a socket; the status, headers and body of the answer."""
    parts = urlsplit(base_url)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("endpoint", ["judgment", "client_info", "complete"])
def test_a_chunked_body_without_length_is_411_over_http(live_server, new_session, study,
                                                        judgment_body, endpoint: str):
    session = new_session(study)
    before = _stored(session)
    method, url = _urls(session)[endpoint]
    payload = json.dumps(judgment_body(0)).encode()
    chunked = f"{len(payload):x}\r\n".encode() + payload + b"\r\n0\r\n\r\n"
    host = urlsplit(live_server.url).netloc
    request = (
        f"{method.upper()} {url} HTTP/1.1\r\nHost: {host}\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
        "Connection: close\r\n\r\n"
    ).encode() + chunked
    cache.clear()
    status, headers, body = _raw_http(live_server.url, request)
    assert status == 411, body[:300]
    answer = json.loads(body)
    assert answer["code"] == "length_required" and "Content-Length" in answer["error"], answer
    assert _stored(session) == before
    # The same body with its length is accepted (the judgment endpoint stores it).
    if endpoint == "judgment":
        request = (
            f"POST {url} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
        ).encode() + payload
        cache.clear()
        assert _raw_http(live_server.url, request)[0] == 201


# ------------------------------------------------------------------------------ property

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=25,
)
FIELDS = st.fixed_dictionaries(
    {},
    optional={
        "position": JSON_VALUES | st.integers(min_value=-2, max_value=8),
        "response": JSON_VALUES | st.sampled_from(["same", "different"]),
        "response_time_ms": JSON_VALUES | st.floats(min_value=-1, max_value=1e7),
        "durations": JSON_VALUES
        | st.fixed_dictionaries(
            {k: st.floats(min_value=-1, max_value=1e5) for k in ("first_ms", "blank_ms",
                                                                  "second_ms")}
        ),
        "idempotency_key": JSON_VALUES | st.uuids().map(str),
        "window_width": JSON_VALUES | st.integers(-1, 200_000),
        "window_height": JSON_VALUES | st.integers(-1, 200_000),
        "device_pixel_ratio": JSON_VALUES,
        "refresh_hz": JSON_VALUES,
        "frame_ms": JSON_VALUES,
    },
)
BODIES = (
    FIELDS.map(lambda d: json.dumps(d).encode())
    | JSON_VALUES.map(lambda v: json.dumps(v).encode())
    | st.binary(max_size=200)
)


@pytest.mark.slow
@settings(
    max_examples=150, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(body=BODIES, endpoint=st.sampled_from(["judgment", "client_info", "complete"]))
def test_no_participant_body_gives_a_5xx_and_only_a_201_writes(
    client: Client, session: Session, body: bytes, endpoint: str
):
    method, url = _urls(session)[endpoint]
    n_before = Judgment.objects.count()
    response = _post(client, url, body, method)
    assert response.status_code < 500, (body, response.content[:300])
    payload = response.json()
    if response.status_code >= 400:
        assert set(payload) >= {"error", "code"}
    written = Judgment.objects.count() - n_before
    assert written == (1 if endpoint == "judgment" and response.status_code == 201 else 0)
    if written:  # keep the next example's trial free
        Judgment.objects.all().delete()


def test_a_valid_body_still_works_after_the_parser_change(client, session, judgment_body):
    url = _urls(session)["judgment"][1]
    body = judgment_body(0, idempotency_key=str(uuid.uuid4()))
    assert _post(client, url, json.dumps(body).encode()).status_code == 201
    assert _post(client, url, json.dumps(body).encode()).status_code == 200


# Strings from every Unicode category, lone surrogates included (Hypothesis' default text
# leaves them out), and integers far past 2^63: across the participant API's bodies.
SURROGATE_TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=12)
HUGE_INTEGERS = st.integers(min_value=2**31 - 2, max_value=2**70) | st.integers(
    min_value=-(2**70), max_value=-(2**31))
WILD_VALUES = st.recursive(
    st.none() | st.booleans() | HUGE_INTEGERS | st.integers() | SURROGATE_TEXT,
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(SURROGATE_TEXT, children, max_size=4),
    max_leaves=12,
)
WILD_BODIES = st.fixed_dictionaries(
    {},
    optional={
        "position": HUGE_INTEGERS | st.integers(0, 8) | SURROGATE_TEXT,
        "response": SURROGATE_TEXT | st.sampled_from(["same", "different"]),
        "response_time_ms": HUGE_INTEGERS | st.floats(0, 1e4),
        "durations": WILD_VALUES | st.fixed_dictionaries(
            {k: HUGE_INTEGERS | st.floats(0, 1e4) for k in ("first_ms", "blank_ms",
                                                            "second_ms")}),
        "idempotency_key": SURROGATE_TEXT | st.uuids().map(str),
        "window_width": HUGE_INTEGERS | SURROGATE_TEXT,
        "device_pixel_ratio": HUGE_INTEGERS | SURROGATE_TEXT,
        "refresh_hz": HUGE_INTEGERS,
    },
).map(lambda d: json.dumps(d).encode()) | WILD_VALUES.map(lambda v: json.dumps(v).encode())


@pytest.mark.slow
@settings(
    max_examples=150, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(body=WILD_BODIES, endpoint=st.sampled_from(["judgment", "client_info", "complete"]))
def test_surrogates_and_huge_integers_never_give_a_5xx(
    client: Client, session: Session, body: bytes, endpoint: str
):
    method, url = _urls(session)[endpoint]
    before = _stored(session)
    response = _post(client, url, body, method)
    assert response.status_code < 500, (body, response.content[:300])
    if response.status_code >= 400:
        assert set(response.json()) >= {"error", "code"}
    if response.status_code in (200, 201):
        Judgment.objects.all().delete()  # keep the next example's trial free
        Session.objects.filter(pk=session.pk).update(
            client_info=before[1], completed_at=before[2])
    else:
        assert _stored(session) == before
