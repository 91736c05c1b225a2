"""Schemathesis fuzzes every operation of the OpenAPI schema on a live server: no 5xx.

The server is pytest-django's ``live_server`` (a real HTTP server thread) with a small real
study: a started session (its token is the path parameter most of the time, so requests reach
the views' validation and storage code rather than stopping at 404), a completed and judged
session, and a staff user whose login cookie and CSRF token go with the staff operations.
Each operation gets schema-conforming (positive) and schema-violating (negative) examples;
every response must pass schemathesis' ``not_a_server_error`` check, responses to positive
examples must also match the schema (so the described shapes stay true), and no request but a
201 from the judgment POST may write a judgment (a 4xx, a 200 retry: nothing written).

Protocols: the judgment POST is fuzzed against a started session of each protocol (2afc,
rating pairs, single-image rating, label; :mod:`protocol_items`) as well as JND, and the
session state GET draws its token from all of them. The schema's ``response`` is any string
(a label set is any strings), so most positive bodies are given one of their session's
answers and exactly its protocol's phases (from the session state; still positive bodies):
otherwise nearly every body would be refused by the protocol check and no judgment stored.

Hypothesis is derandomized (the same inputs every run, up to the live data such as tokens) so
CI does not flake; ``PERCEPTLAB_FUZZ_EXAMPLES`` (examples per operation and mode, default 20)
and ``PERCEPTLAB_FUZZ_RANDOM=1`` explore more. About 520 requests, 25-60 s.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import pytest
import requests
import schemathesis
from django.contrib.auth import get_user_model
from django.core.cache import cache
from django.test import Client
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from protocol_items import make_protocol_study
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from studyapp.models import Judgment, Session
from studyapp.protocols import JND_PHASES, trial_spec

EXAMPLES = int(os.environ.get("PERCEPTLAB_FUZZ_EXAMPLES", "20"))
RANDOM = os.environ.get("PERCEPTLAB_FUZZ_RANDOM", "") == "1"
CSRF = "fuzzCsrfSecret0123456789abcdefGH"  # 32 characters of Django's CSRF alphabet

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


@dataclass
class Tally:
    requests: int = 0
    by_status: dict[int, int] = field(default_factory=dict)
    by_operation: dict[str, dict[int, int]] = field(default_factory=dict)
    server_errors: list[str] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)
    no_negative: list[str] = field(default_factory=list)
    writes: list[str] = field(default_factory=list)


# The judgment POST is also fuzzed against a session of each of these protocol_items variants.
PROTOCOL_VARIANTS = ("2afc", "rating", "rating-single", "label")


@pytest.fixture
def fuzz_target(live_server, make_study, new_session, media_root, settings):
    """A JND study with a started session, a finished one, a started session of each other
    protocol, and a logged-in staff user."""
    rates = settings.REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"]
    settings.REST_FRAMEWORK = {  # the fuzzer must reach the views, not the rate limit
        **settings.REST_FRAMEWORK,
        "DEFAULT_THROTTLE_RATES": {scope: "100000/min" for scope in rates},
    }
    cache.clear()
    study = make_study(max_sentinel_false_alarm=0.3, min_catch_hit_rate=0.5, max_fast_share=0.5)
    started = new_session(study)
    finished = new_session(study)
    api = requests.Session()
    for trial in finished.trials.all():
        api.post(
            f"{live_server.url}/api/sessions/{finished.token}/judgments/",
            json={
                "position": trial.position,
                "response": "different",
                "response_time_ms": 100.0,
                "durations": {"first_ms": 1000, "blank_ms": 250, "second_ms": 1000},
                "idempotency_key": f"fuzz-setup-{trial.position:04d}",
            },
        ).raise_for_status()
    api.post(f"{live_server.url}/api/sessions/{finished.token}/complete/").raise_for_status()
    by_protocol = {"jnd": [started.token, finished.token]}
    for variant in PROTOCOL_VARIANTS:
        by_protocol[variant] = [new_session(make_protocol_study(media_root, variant)).token]
    # What each session accepts, as its state tells the runner (JND: no protocol block).
    accepts = {}
    for tokens in by_protocol.values():
        for token in tokens:
            state = api.get(f"{live_server.url}/api/sessions/{token}/").json()
            protocol = state["study"].get("protocol")
            accepts[token] = (
                (protocol["answers"], protocol["phases"]) if protocol
                else (["same", "different"], list(JND_PHASES))
            )
    # (the oracle for the state: the protocol table itself)
    for session in Session.objects.select_related("participant__study"):
        spec = trial_spec(session.study)
        assert accepts[session.token] == (list(spec.answers), list(spec.phases))
    staff = get_user_model().objects.create_user("fuzz-staff", is_staff=True)
    browser = Client()
    browser.force_login(staff)
    yield {
        "url": live_server.url,
        "slug": study.slug,
        "tokens": [started.token, finished.token],
        "by_protocol": by_protocol,
        "accepts": accepts,
        "staff_cookies": {"sessionid": browser.cookies["sessionid"].value, "csrftoken": CSRF},
    }
    cache.clear()


def _with_position(case_and_position):
    case, position = case_and_position
    if isinstance(case.body, dict) and isinstance(case.body.get("position"), int):
        case.body["position"] = position
    return case


def _answering(accepts: dict):
    """Map ``(case, k, skip)``: unless ``skip`` is 3 (a quarter of the draws; the simplest
    draw, 0, answers), the body gets its session's answer number ``k``, exactly its
    protocol's phases (numbers kept where generated) and an idempotency key prefixed with the
    token (derandomized runs draw the same keys for every session, and a key is unique across
    sessions: 409 otherwise), so it can be stored; a body that is not a dict, or of an unknown
    token, is left alone."""

    def conform(case_k_skip):
        case, k, skip = case_k_skip
        body, token = case.body, (case.path_parameters or {}).get("token")
        if skip == 3 or not isinstance(body, dict) or token not in accepts:
            return case
        answers, phases = accepts[token]
        body["response"] = answers[k % len(answers)]
        durations = body.get("durations")
        if isinstance(durations, dict):
            for n, phase in enumerate(JND_PHASES):
                if phase not in phases and k % 2:  # left out or null: both allowed
                    durations.pop(phase, None)
                elif phase not in phases:
                    durations[phase] = None
                elif not isinstance(durations.get(phase), int | float):
                    durations[phase] = 100.0 * (n + 1)
        if isinstance(body.get("idempotency_key"), str):
            body["idempotency_key"] = f"{token[:8]}{body['idempotency_key']}"[:64]
        return case

    return conform


def _fuzz_operation(
    operation, target: dict, tally: Tally, tokens: list[str] | None = None, tag: str = "",
    real_only: bool = False,
) -> None:
    """Fuzz ``operation``; ``tokens``: the session tokens to draw (default: the JND ones),
    ``tag``: appended to the operation's label in the tally; ``real_only``: no generated
    path parameters (404 paths: the untagged run has them)."""
    staff_op = operation.path.startswith("/api/staff/")
    judgment_op = operation.label == JUDGMENT_POST
    fixed = {}
    if "{token}" in operation.path:
        fixed = {"token": st.sampled_from(tokens or target["tokens"])}
    elif "{slug}" in operation.path:
        fixed = {"slug": st.just(target["slug"])}
    cookies = target["staff_cookies"] if staff_op else {}
    headers = {"X-CSRFToken": CSRF} if staff_op else {}

    has_inputs = operation.body or operation.query  # beyond the path parameters

    def strategies(mode: GenerationMode):
        generated = operation.as_strategy(generation_mode=mode)
        if not fixed or (mode is GenerationMode.NEGATIVE and not has_inputs):
            # Nothing to break but the path parameter itself.
            return generated
        # Mostly real path parameters (deep paths), sometimes generated ones (404 paths).
        real = st.fixed_dictionaries(fixed).flatmap(
            lambda params: operation.as_strategy(generation_mode=mode, path_parameters=params)
        )
        if "position" in str(operation.definition.raw):
            # Mostly positions the session has, so judgments get stored (201) and repeated (409).
            real = st.tuples(real, st.integers(0, 4)).map(_with_position)
        if judgment_op and mode is GenerationMode.POSITIVE:
            # Mostly an answer and the phases of the session's protocol (see above).
            real = st.tuples(real, st.integers(0, 10), st.integers(0, 3)).map(
                _answering(target["accepts"])
            )
        return real if real_only else st.one_of(real, real, real, generated)

    def runner(mode: GenerationMode):
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=not RANDOM,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=strategies(mode))
        def run(case):
            before = Judgment.objects.count()
            response = case.call(
                base_url=target["url"], headers=headers, cookies=cookies, timeout=30
            )
            written = Judgment.objects.count() - before
            tally.requests += 1
            status = response.status_code
            tally.by_status[status] = tally.by_status.get(status, 0) + 1
            per_operation = tally.by_operation.setdefault(case.operation.label + tag, {})
            per_operation[status] = per_operation.get(status, 0) + 1
            label = f"{case.operation.label}{tag} -> {response.status_code}"
            # Only a stored judgment (201) writes one; a 4xx, a retry (200) or any other
            # operation writes nothing.
            if written != int(judgment_op and status == 201):
                tally.writes.append(
                    f"{label}: {written} judgments written\n"
                    f"  request: {case.as_curl_command()}\n  body: {response.text[:300]}"
                )
            try:
                case.validate_response(response, checks=[not_a_server_error])
            except Exception as exc:  # collected, so one run reports every operation
                tally.server_errors.append(
                    f"{label}\n  request: {case.as_curl_command()}\n  {exc}\n"
                    f"  body: {response.text[:500]}"
                )
            if mode is GenerationMode.POSITIVE and response.status_code < 500:
                try:
                    case.validate_response(response, checks=[response_schema_conformance])
                except Exception as exc:
                    tally.mismatches.append(f"{label}\n  {str(exc)[:800]}")

        return run

    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        try:
            runner(mode)()
        except Unsatisfiable:
            if mode is GenerationMode.POSITIVE:
                raise
            tally.no_negative.append(operation.label + tag)


JUDGMENT_POST = "POST /api/sessions/{token}/judgments/"
SESSION_GET = "GET /api/sessions/{token}/"


def test_fuzzing_every_operation_gives_no_server_error(fuzz_target, capsys):
    started = time.monotonic()
    schema = schemathesis.openapi.from_url(f"{fuzz_target['url']}/api/schema/?format=json")
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = {op.label for op in operations}
    assert {
        "GET /api/sessions/{token}/",
        "PATCH /api/sessions/{token}/",
        "POST /api/sessions/{token}/judgments/",
        "POST /api/sessions/{token}/complete/",
        "GET /api/staff/studies/",
        "GET /api/staff/studies/{slug}/progress/",
        "GET /api/staff/studies/{slug}/export/",
        "GET /api/staff/studies/{slug}/quality/",
        "POST /api/staff/studies/{slug}/quality/",
    } <= labels
    tally = Tally()
    every_token = [t for tokens in fuzz_target["by_protocol"].values() for t in tokens]
    for operation in operations:
        # The session state of every protocol must match the schema too.
        tokens = every_token if operation.label == SESSION_GET else None
        _fuzz_operation(operation, fuzz_target, tally, tokens=tokens)
        if operation.label == JUDGMENT_POST:  # the judgment POST against each protocol
            for variant in PROTOCOL_VARIANTS:
                _fuzz_operation(operation, fuzz_target, tally, real_only=True,
                                tokens=fuzz_target["by_protocol"][variant], tag=f" [{variant}]")
    elapsed = time.monotonic() - started
    with capsys.disabled():
        print(
            f"\nschemathesis: {tally.requests} requests to {len(operations)} operations in"
            f" {elapsed:.1f} s; status codes {dict(sorted(tally.by_status.items()))};"
            f" 5xx: {len(tally.server_errors)}; no negative examples possible for"
            f" {tally.no_negative or 'none'}"
        )
        for label, statuses in tally.by_operation.items():
            print(f"  {label}: {dict(sorted(statuses.items()))}")
    assert not tally.server_errors, "\n\n".join(tally.server_errors[:10])
    assert not tally.mismatches, "\n\n".join(tally.mismatches[:10])
    assert not tally.writes, "\n\n".join(tally.writes[:10])
    assert tally.requests >= 10 * len(operations)
    assert {f"{JUDGMENT_POST} [{v}]" for v in PROTOCOL_VARIANTS} <= set(tally.by_operation)
    for label, statuses in tally.by_operation.items():  # every operation reached its view
        assert any(200 <= status < 300 for status in statuses), (label, statuses)
    for variant, tokens in fuzz_target["by_protocol"].items():  # judgments of each protocol
        assert Judgment.objects.filter(trial__session__token__in=tokens).exists(), variant
