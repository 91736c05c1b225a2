"""Rate-limit counters in a real redis-server through Django's RedisCache (PERCEPTLAB_CACHE)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.cache import cache
from django.test import Client

from studyapp.models import Judgment

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.redis, pytest.mark.django_db]


@pytest.fixture
def redis_url(redis_server_executable):
    from tests.support.redisserver import temporary_redis

    with temporary_redis(redis_server_executable) as server:
        yield server.url


def test_perceptlab_cache_redis_url_selects_the_redis_backend(redis_url, tmp_path):
    env = {**os.environ, "PERCEPTLAB_CACHE": redis_url, "PERCEPTLAB_VAR": str(tmp_path),
           "PYTHONPATH": str(ROOT), "DJANGO_SETTINGS_MODULE": "studyapp.settings"}
    code = (
        "import django, json; django.setup(); from django.conf import settings;"
        "from django.core.cache import cache; cache.set('k', 41); cache.incr('k');"
        "print(json.dumps([settings.CACHES['default']['BACKEND'], cache.get('k')]))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    assert json.loads(out) == ["studyapp.cache.RedisCache", 42]
    bad = subprocess.run([sys.executable, "-c", "import django; django.setup()"],
                         env={**env, "PERCEPTLAB_CACHE": "memcached"}, cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "PERCEPTLAB_CACHE='memcached'" in bad.stderr


def test_participant_write_limit_counts_in_redis(redis_url, settings, session, judgment_body):
    import redis

    settings.CACHES = {"default": {"BACKEND": "studyapp.cache.RedisCache",
                                   "LOCATION": redis_url, "KEY_PREFIX": "perceptlab"}}
    settings.REST_FRAMEWORK = {
        **settings.REST_FRAMEWORK,
        "DEFAULT_THROTTLE_RATES": {**settings.REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"],
                                   "participant-write": "3/min"},
    }
    client = Client()
    url = f"/api/sessions/{session.token}/judgments/"
    statuses = [
        client.post(url, judgment_body(position), content_type="application/json").status_code
        for position in range(4)
    ]
    assert statuses == [201, 201, 201, 429]
    refused = client.post(url, judgment_body(4), content_type="application/json")
    assert refused.status_code == 429 and int(refused["Retry-After"]) > 0
    assert refused.json()["code"] == "throttled"
    assert Judgment.objects.count() == 3  # the refused ones wrote nothing
    keys = redis.Redis.from_url(redis_url).keys("perceptlab:*throttle_participant-write*")
    assert len(keys) == 1 and session.token.encode() not in keys[0]  # hashed, never raw
    cache.clear()
