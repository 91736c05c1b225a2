"""Production settings: ``check --deploy`` is clean, gunicorn refuses the fallback secret key."""

from __future__ import annotations

import json
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


def test_s3_storage_is_a_setting_and_a_missing_backend_is_a_clear_error(tmp_path):
    """PERCEPTLAB_S3_BUCKET puts the stimulus files in an S3-compatible bucket
    (django-storages); without the optional extra installed, `check` names what to install."""
    code = (
        "import django, os, json; os.environ['DJANGO_SETTINGS_MODULE'] = 'studyapp.settings';"
        " django.setup(); from django.conf import settings as s;"
        " print(json.dumps(s.STORAGES['default']))"
    )
    s3 = {
        "PERCEPTLAB_S3_BUCKET": "stimuli", "PERCEPTLAB_S3_ENDPOINT_URL": "http://minio:9000",
        "PERCEPTLAB_S3_PREFIX": "perceptlab",
    }
    out = run(["-c", code], tmp_path, **s3)
    assert out.returncode == 0, out.stderr
    storage = json.loads(out.stdout)
    assert storage["BACKEND"] == "storages.backends.s3.S3Storage"
    assert storage["OPTIONS"] == {
        "bucket_name": "stimuli", "endpoint_url": "http://minio:9000", "region_name": None,
        "location": "perceptlab", "default_acl": None, "querystring_auth": True,
        "file_overwrite": True,
    }
    default = json.loads(run(["-c", code], tmp_path).stdout)
    assert default == {"BACKEND": "django.core.files.storage.FileSystemStorage"}
    try:
        import storages.backends.s3  # noqa: F401
    except ImportError:  # the s3 extra is not installed here: `check` must say so
        checked = run(["manage.py", "check"], tmp_path, **s3)
        assert checked.returncode != 0
        assert "perceptlab.E101" in checked.stderr and "s3 extra" in checked.stderr


def test_prepare_stimuli_runs_in_make_serve_before_gunicorn():
    serve = (ROOT / "Makefile").read_text().split("\nserve:", 1)[1].split("\n\n", 1)[0]
    lines = [line.strip() for line in serve.splitlines()]
    migrate = next(i for i, line in enumerate(lines) if "manage.py migrate" in line)
    prepare = next(i for i, line in enumerate(lines) if "manage.py prepare_stimuli" in line)
    gunicorn = next(i for i, line in enumerate(lines) if "gunicorn studyapp.wsgi" in line)
    assert migrate < prepare < gunicorn


def test_wsgi_refuses_to_start_without_a_writable_rows_folder(tmp_path):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    env = {"DJANGO_SECRET_KEY": PRODUCTION["DJANGO_SECRET_KEY"],
           "PERCEPTLAB_ROWS_DIR": str(blocked / "rows")}
    migrated = run(["manage.py", "migrate", "--no-input"], tmp_path, **env)
    assert migrated.returncode == 0, migrated.stderr
    result = run(WSGI, tmp_path, **env)
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr and "PERCEPTLAB_ROWS_DIR" in result.stderr
    started = run(WSGI, tmp_path, DJANGO_SECRET_KEY=PRODUCTION["DJANGO_SECRET_KEY"])
    assert started.returncode == 0 and "wsgi ok" in started.stdout, started.stderr
    assert list((tmp_path / "var" / "stimulus-rows").glob(".prepare.lock"))  # it warmed up
