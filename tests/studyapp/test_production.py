"""Production settings: ``check --deploy`` is clean, gunicorn refuses the fallback secret key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PRODUCTION = {
    "DJANGO_SECRET_KEY": "k3y-" + "x7Qp9rT2vW5yZ8bC1dF4gH6jK0mN3" * 2,
    "DJANGO_ALLOWED_HOSTS": "study.example.org",
    "DJANGO_SECURE": "1",
    "PERCEPTLAB_TRUSTED_PROXIES": "1",
    "PERCEPTLAB_IP_SALT": "a-long-random-salt",
}


def run(code_or_args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DJANGO_", "PERCEPTLAB_", "DATABASE_URL"))
    }
    clean.update(PERCEPTLAB_VAR=str(tmp_path / "var"), **env)
    return subprocess.run(
        [sys.executable, *code_or_args],
        cwd=ROOT,
        env=clean,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_check_deploy_is_clean_with_production_environment(tmp_path):
    result = run(
        ["manage.py", "check", "--deploy", "--fail-level", "WARNING"], tmp_path, **PRODUCTION
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


def test_check_deploy_flags_the_fallback_key_file(tmp_path):
    env = {k: v for k, v in PRODUCTION.items() if k != "DJANGO_SECRET_KEY"}
    result = run(["manage.py", "check", "--deploy"], tmp_path, **env)
    assert result.returncode != 0
    assert "perceptlab.E001" in result.stderr and "DJANGO_SECRET_KEY" in result.stderr


WSGI = ["-c", "import studyapp.wsgi; print('wsgi ok')"]


@pytest.mark.parametrize(
    "env,starts",
    [
        ({}, False),  # DEBUG off, key from the fallback file: refused
        ({"PERCEPTLAB_ALLOW_FILE_SECRET": "1"}, True),
        ({"DJANGO_DEBUG": "1"}, True),
        ({"DJANGO_SECRET_KEY": PRODUCTION["DJANGO_SECRET_KEY"]}, True),
    ],
)
def test_wsgi_refuses_the_fallback_key_file_unless_allowed(tmp_path, env, starts):
    result = run(WSGI, tmp_path, **env)
    if starts:
        assert result.returncode == 0 and "wsgi ok" in result.stdout, result.stderr
    else:
        assert result.returncode != 0
        assert "ImproperlyConfigured" in result.stderr and "DJANGO_SECRET_KEY" in result.stderr


def test_production_cookies_and_proxy_settings(tmp_path):
    code = (
        "import django, os; os.environ['DJANGO_SETTINGS_MODULE'] = 'studyapp.settings';"
        " django.setup(); from django.conf import settings as s;"
        " print(s.DEBUG, s.SESSION_COOKIE_SECURE, s.CSRF_COOKIE_SECURE, s.SECURE_SSL_REDIRECT,"
        " s.SECURE_HSTS_SECONDS, s.SECURE_PROXY_SSL_HEADER, s.SESSION_COOKIE_SAMESITE,"
        " s.CACHES['default']['BACKEND'].rsplit('.', 1)[-1])"
    )
    # A real deployment's database: gunicorn workers then share rate-limit counters in it.
    postgres = "postgres://study:secret@db.example.org:5432/study"
    out = run(["-c", code], tmp_path, **PRODUCTION, PERCEPTLAB_EMBED="1", DATABASE_URL=postgres)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [
        "False", "True", "True", "True", "31536000", "('HTTP_X_FORWARDED_PROTO',", "'https')",
        "None", "DatabaseCache",
    ]  # fmt: skip
    laptop = run(["-c", code], tmp_path)
    assert laptop.stdout.split()[:4] == ["False", "False", "False", "False"]
    assert laptop.stdout.split()[-1] == "LocMemCache"  # SQLite: one process, exact counters
