"""Schemathesis fuzzes every operation of the OpenAPI schema on a live server: no 5xx.

The server is pytest-django's ``live_server`` (a real HTTP server thread) with a small real
study: a started session (its token is the path parameter most of the time, so requests reach
the views' validation and storage code rather than stopping at 404), a completed and judged
session, and a staff user whose login cookie and CSRF token go with the staff operations.
Each operation gets schema-conforming (positive) and schema-violating (negative) examples;
every response must pass schemathesis' ``not_a_server_error`` check, and responses to
positive examples must also match the schema (so the described shapes stay true).

Hypothesis is derandomized (the same inputs every run, up to the live data such as tokens) so
CI does not flake; ``PERCEPTLAB_FUZZ_EXAMPLES`` (examples per operation and mode, default 20)
and ``PERCEPTLAB_FUZZ_RANDOM=1`` explore more. About 350 requests, 15-40 s.
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
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from studyapp.models import Judgment

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


@pytest.fixture
def fuzz_target(live_server, make_study, new_session, settings):
    """A study with a started session, a finished one, and a logged-in staff user."""
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
    staff = get_user_model().objects.create_user("fuzz-staff", is_staff=True)
    browser = Client()
    browser.force_login(staff)
    yield {
        "url": live_server.url,
        "slug": study.slug,
        "tokens": [started.token, finished.token],
        "staff_cookies": {"sessionid": browser.cookies["sessionid"].value, "csrftoken": CSRF},
    }
    cache.clear()


def _with_position(case_and_position):
    case, position = case_and_position
    if isinstance(case.body, dict) and isinstance(case.body.get("position"), int):
        case.body["position"] = position
    return case


def _fuzz_operation(operation, target: dict, tally: Tally) -> None:
    staff_op = operation.path.startswith("/api/staff/")
    fixed = {}
    if "{token}" in operation.path:
        fixed = {"token": st.sampled_from(target["tokens"])}
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
        return st.one_of(real, real, real, generated)

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
            response = case.call(
                base_url=target["url"], headers=headers, cookies=cookies, timeout=30
            )
            tally.requests += 1
            status = response.status_code
            tally.by_status[status] = tally.by_status.get(status, 0) + 1
            per_operation = tally.by_operation.setdefault(case.operation.label, {})
            per_operation[status] = per_operation.get(status, 0) + 1
            label = f"{case.operation.label} -> {response.status_code}"
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
            tally.no_negative.append(operation.label)


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
    for operation in operations:
        _fuzz_operation(operation, fuzz_target, tally)
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
    assert tally.requests >= 10 * len(operations)
    for label, statuses in tally.by_operation.items():  # every operation reached its view
        assert any(200 <= status < 300 for status in statuses), (label, statuses)
    assert Judgment.objects.exists()
