"""Django settings.

Everything that differs between a laptop demo and a real study comes from the environment:

- ``DJANGO_DEBUG``: ``1`` turns DEBUG on (the demo does); off by default.
- ``DJANGO_SECRET_KEY``: required for real studies; without it a random key is generated once
  and kept in ``var/secret_key`` so sessions survive restarts of a local server.
- ``DATABASE_URL``: e.g. ``postgres://user:pass@host:5432/db``; default SQLite in ``var/``.
- ``DJANGO_ALLOWED_HOSTS``: comma-separated; default ``localhost,127.0.0.1``.
- ``PERCEPTLAB_VAR``: folder for the SQLite file, the media (pair PNGs) and the key file.

Production (see README, "Running a real study on MTurk / Prolific"):

- ``DJANGO_SECURE``: ``1`` = HTTPS only: secure cookies, HSTS, redirect http → https.
- ``PERCEPTLAB_TRUSTED_PROXIES``: how many reverse proxies (nginx, a load balancer) sit in
  front of the app and append to ``X-Forwarded-For``; 0 (default) = trust no proxy header.
- ``PERCEPTLAB_IP_SALT``: secret salt of the stored IP hashes (default: derived from the
  secret key, so rotating the key changes every hash; set this to keep them comparable).
- ``PERCEPTLAB_EMBED``: ``1`` = cookies usable inside the MTurk iframe (``SameSite=None``;
  needs ``DJANGO_SECURE=1``).
- ``DJANGO_CSRF_TRUSTED_ORIGINS``: comma-separated ``https://host`` origins, if a proxy
  rewrites the Host header.
- ``PERCEPTLAB_CACHE``: where the rate-limit counters live: ``redis://host:port/0``
  (production: Django's RedisCache, shared by every gunicorn worker, no SQL), ``db``
  (default with PostgreSQL: a table shared by every worker) or ``locmem`` (default with
  SQLite: per process, so limits apply per worker).
- ``PERCEPTLAB_ROWS_DIR``: where this host keeps decoded stimulus rows (default
  ``var/stimulus-rows``; see :mod:`studyapp.stimulus_rows`).
- ``PERCEPTLAB_PREPARE_ON_START``: ``0`` = a WSGI process does not prepare the active studies'
  stimulus rows as it loads (default ``1``; ``manage.py prepare_stimuli`` does it too).
- ``PERCEPTLAB_S3_BUCKET``: stimulus files (pair PNGs) in this S3-compatible bucket instead of
  ``MEDIA_ROOT`` (django-storages; ``pip install '.[s3]'``), with ``PERCEPTLAB_S3_ENDPOINT_URL``
  (MinIO, Ceph, R2, ...; empty for AWS), ``PERCEPTLAB_S3_REGION``, ``PERCEPTLAB_S3_PREFIX``
  (a folder in the bucket) and the usual ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``.
- ``PERCEPTLAB_RATE_PARTICIPANT_WRITE`` / ``PERCEPTLAB_RATE_STAFF``: rate limits, e.g.
  ``120/min`` (see :mod:`studyapp.throttling`).
- ``PERCEPTLAB_ALLOW_FILE_SECRET``: ``1`` lets gunicorn start without ``DJANGO_SECRET_KEY``
  (it refuses otherwise when DEBUG is off; see :mod:`studyapp.wiring`).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import dj_database_url

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("PERCEPTLAB_VAR", BASE_DIR / "var")).resolve()
VAR_DIR.mkdir(parents=True, exist_ok=True)



def _flag(name: str, default: str = "0") -> bool:
    return os.environ.get(name, default).strip().lower() in {"1", "true", "yes", "on"}


def _csv(name: str, default: str = "") -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


DEBUG = _flag("DJANGO_DEBUG")


def _secret_key() -> str:
    key = os.environ.get("DJANGO_SECRET_KEY")
    if key:
        return key
    path = VAR_DIR / "secret_key"
    if not path.exists():
        path.write_text(secrets.token_urlsafe(50))
        path.chmod(0o600)
    return path.read_text().strip()


SECRET_KEY = _secret_key()
# Where the key came from: gunicorn refuses the key file when DEBUG is off (studyapp.wiring).
SECRET_KEY_FROM_ENV = bool(os.environ.get("DJANGO_SECRET_KEY"))
ALLOWED_HOSTS = _csv("DJANGO_ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]")
CSRF_TRUSTED_ORIGINS = _csv("DJANGO_CSRF_TRUSTED_ORIGINS")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "studyapp",
    "studyapp.wiring.WiringConfig",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "studyapp.urls"
WSGI_APPLICATION = "studyapp.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {
    "default": dj_database_url.config(
        default=f"sqlite:///{VAR_DIR / 'db.sqlite3'}", conn_max_age=60
    )
}
if DATABASES["default"]["ENGINE"].endswith("sqlite3"):
    # Concurrent writers (several browser tabs, the runserver threads) wait instead of failing:
    # every transaction takes SQLite's writer lock at BEGIN ("IMMEDIATE"), so a second one waits
    # (up to ``timeout`` seconds) at its start. With the default deferred BEGIN two transactions
    # that had both read could not both upgrade to write, and SQLite answers that deadlock with
    # "database is locked" at once, without waiting (issue 17: two simultaneous consent POSTs).
    DATABASES["default"].setdefault("OPTIONS", {}).update(timeout=20, transaction_mode="IMMEDIATE")

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "/static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = VAR_DIR / "staticfiles"
STATIC_ROOT.mkdir(parents=True, exist_ok=True)  # WhiteNoise warns on every request otherwise
# Serve static/ straight from the source tree (no collectstatic step needed for a study).
WHITENOISE_USE_FINDERS = True
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
# Pair images live here and are never served directly: only through per-trial URLs.
MEDIA_ROOT = Path(os.environ.get("PERCEPTLAB_MEDIA", VAR_DIR / "media")).resolve()
# Stimulus files are read through the storage API (studyapp.stimulus_rows): MEDIA_ROOT by
# default; an S3-compatible bucket (django-storages) for several web hosts without a shared disk.
if os.environ.get("PERCEPTLAB_S3_BUCKET"):
    STORAGES["default"] = {
        "BACKEND": "storages.backends.s3.S3Storage",
        "OPTIONS": {
            "bucket_name": os.environ["PERCEPTLAB_S3_BUCKET"],
            "endpoint_url": os.environ.get("PERCEPTLAB_S3_ENDPOINT_URL") or None,
            "region_name": os.environ.get("PERCEPTLAB_S3_REGION") or None,
            "location": os.environ.get("PERCEPTLAB_S3_PREFIX", ""),
            "default_acl": None,  # private: stimuli only ever leave through per-trial URLs
            "querystring_auth": True,
            "file_overwrite": True,  # an import puts a pair's file in place under its name
        },
    }

# Decoded stimulus rows of this host (studyapp.stimulus_rows), read afresh per request.
PERCEPTLAB_ROWS_DIR = Path(
    os.environ.get("PERCEPTLAB_ROWS_DIR", VAR_DIR / "stimulus-rows")
).resolve()
PERCEPTLAB_PREPARE_ON_START = _flag("PERCEPTLAB_PREPARE_ON_START", "1")

LOGIN_URL = "/admin/login/"

# Rate-limit counters must be shared by every gunicorn worker. PERCEPTLAB_CACHE picks where:
# - ``redis://host:port/db`` (recommended in production): Django's built-in RedisCache, one
#   round trip per counter and nothing in PostgreSQL (the counters were 6 of a submit's SQL
#   statements in the database cache);
# - ``db`` (default with PostgreSQL): a database table (created by `migrate`, see
#   studyapp.wiring); MAX_ENTRIES bounds it, expired counters are culled first;
# - ``locmem`` (default with SQLite, the embedded setup: one process, so per-process counters
#   are exact, and a cache table in SQLite would add "table is locked" errors under threads).
_DEFAULT_CACHE = "locmem" if DATABASES["default"]["ENGINE"].endswith("sqlite3") else "db"
_CACHE = os.environ.get("PERCEPTLAB_CACHE", _DEFAULT_CACHE).strip()
if _CACHE.startswith(("redis://", "rediss://", "unix://")):
    _CACHE_CONFIG: dict = {
        "BACKEND": "studyapp.cache.RedisCache",  # Django's, its clients reused (see there)
        "LOCATION": _CACHE,
        "KEY_PREFIX": "perceptlab",
    }
elif _CACHE == "locmem":
    _CACHE_CONFIG = {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}
elif _CACHE == "db":
    _CACHE_CONFIG = {
        "BACKEND": "django.core.cache.backends.db.DatabaseCache",
        "LOCATION": "perceptlab_cache",
        "OPTIONS": {"MAX_ENTRIES": 5000, "CULL_FREQUENCY": 3},
    }
else:
    raise ValueError(
        f"PERCEPTLAB_CACHE={_CACHE!r}: expected locmem, db or a redis://host:port/db URL"
    )
CACHES = {"default": _CACHE_CONFIG}

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.AllowAny"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    # Size-limited, strict JSON (studyapp.api); the API takes no form bodies.
    "DEFAULT_PARSER_CLASSES": ["studyapp.parsers.StrictJSONParser"],
    "EXCEPTION_HANDLER": "studyapp.api.exception_handler",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    # One class handles every scope; it reads the rates below at request time.
    "DEFAULT_THROTTLE_CLASSES": ["studyapp.throttling.ScopedTokenRateThrottle"],
    "DEFAULT_THROTTLE_RATES": {
        # Per session token. A participant answers about one trial per 3 s (20/min); the
        # headroom covers the trial runner re-sending a buffer of judgments after a network
        # outage. Unsafe methods only: reading the session state is never limited.
        "participant-write": os.environ.get("PERCEPTLAB_RATE_PARTICIPANT_WRITE", "120/min"),
        # Per staff user, every method (exports are the expensive ones).
        "staff": os.environ.get("PERCEPTLAB_RATE_STAFF", "300/min"),
    },
}

SPECTACULAR_SETTINGS = {
    "TITLE": "perceptlab API",
    "DESCRIPTION": (
        "Participant API (`/api/sessions/<token>/...`: the session token is the credential) and"
        " staff API (`/api/staff/...`: Django staff login, CSRF token on unsafe methods). Every"
        ' error is `{"error": "<one sentence>", "code": "<machine code>"}`; 400s add `fields`.'
    ),
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "COMPONENT_SPLIT_REQUEST": True,
    # The one PATCH (client info) validates a whole body: keep its required fields.
    "COMPONENT_SPLIT_PATCH": False,
    "ENUM_NAME_OVERRIDES": {"SameDifferentEnum": ["same", "different"]},
    "SCHEMA_PATH_PREFIX": r"/api/",
}

# How many reverse proxies append to X-Forwarded-For in front of the app (0: ignore the header,
# the client address is REMOTE_ADDR). Used for IP hashes and IP-keyed rate limits.
PERCEPTLAB_TRUSTED_PROXIES = int(os.environ.get("PERCEPTLAB_TRUSTED_PROXIES", "0"))
# Salt of the stored IP / browser hashes; None = derived from SECRET_KEY (studyapp.quality).
PERCEPTLAB_IP_SALT = os.environ.get("PERCEPTLAB_IP_SALT") or None

SESSION_COOKIE_HTTPONLY = True
CSRF_COOKIE_SAMESITE = "Lax"
if _flag("DJANGO_SECURE"):
    # HTTPS only. Behind a TLS-terminating proxy, PERCEPTLAB_TRUSTED_PROXIES > 0 also trusts its
    # X-Forwarded-Proto header (the proxy must set it and strip any client-sent value).
    SECURE_SSL_REDIRECT = True
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_HSTS_SECONDS = int(os.environ.get("DJANGO_HSTS_SECONDS", str(365 * 24 * 3600)))
    SECURE_HSTS_INCLUDE_SUBDOMAINS = _flag("DJANGO_HSTS_INCLUDE_SUBDOMAINS", "1")
    SECURE_HSTS_PRELOAD = _flag("DJANGO_HSTS_PRELOAD", "1")
    if PERCEPTLAB_TRUSTED_PROXIES > 0:
        SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    if _flag("PERCEPTLAB_EMBED"):
        # MTurk shows the study inside an iframe on mturk.com: for the browser that is a
        # third-party context, where SameSite=Lax cookies (session, CSRF) are not sent.
        SESSION_COOKIE_SAMESITE = "None"
        CSRF_COOKIE_SAMESITE = "None"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": "WARNING"},
}
