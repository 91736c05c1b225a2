"""The load benchmark's URLconf answers errors with the production handlers (JSON under /api/)."""

from __future__ import annotations

import json

import pytest
from django.db import OperationalError
from django.test import RequestFactory
from django.urls import get_resolver

from bench import loadsite
from studyapp import urls as production


@pytest.mark.parametrize("code", [400, 403, 404, 500])
def test_bench_urlconf_has_the_production_error_handlers(code: int):
    bench = get_resolver("bench.loadsite").resolve_error_handler(code)
    assert bench is get_resolver("studyapp.urls").resolve_error_handler(code)
    if hasattr(production, f"handler{code}"):
        assert getattr(loadsite, f"handler{code}") == getattr(production, f"handler{code}")


def test_a_database_outage_under_the_bench_urlconf_is_a_json_503():
    handler = get_resolver("bench.loadsite").resolve_error_handler(500)
    request = RequestFactory().post("/api/sessions/x/judgments/")
    try:
        raise OperationalError("could not connect to server")
    except OperationalError:
        response = handler(request)  # as Django calls it: inside the failed request
    assert response.status_code == 503 and response["Retry-After"]
    body = json.loads(response.content)
    assert body["code"] == "database_unavailable", body


@pytest.mark.django_db
def test_the_bench_urlconf_serves_ping_and_a_json_404_under_api(client, settings):
    settings.ROOT_URLCONF = "bench.loadsite"
    assert client.get("/bench/ping/").content == b"ok"
    response = client.get("/api/sessions/no-such-token/")
    assert response.status_code == 404 and response.json()["code"] == "not_found"
