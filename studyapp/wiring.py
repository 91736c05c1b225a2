"""Start-up wiring that is not part of the data model (installed as its own small app config).

- After every ``migrate`` (the demo's, the test database's, a deployment's) the cache table
  that holds the rate-limit counters is created if missing (``createcachetable`` is idempotent),
  so no separate setup step can be forgotten.
- A deploy check (``manage.py check --deploy``) and :func:`require_production_secret`, which
  ``studyapp.wsgi`` calls: with DEBUG off, gunicorn refuses to start on the fallback key file
  unless ``PERCEPTLAB_ALLOW_FILE_SECRET=1``.
- The OpenAPI descriptions of the participant API (:mod:`studyapp.schema`) are registered.
"""

from __future__ import annotations

import os

from django.apps import AppConfig
from django.conf import settings
from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.db.models.signals import post_migrate

FILE_SECRET_MESSAGE = (
    "DEBUG is off but DJANGO_SECRET_KEY is not set: the secret key comes from the fallback"
    " file var/secret_key. Set DJANGO_SECRET_KEY (e.g. python -c 'import secrets;"
    " print(secrets.token_urlsafe(50))'), or PERCEPTLAB_ALLOW_FILE_SECRET=1 to accept the file."
)


def file_secret_refused() -> bool:
    """True when production settings would run on the generated key file without consent."""
    return (
        not settings.DEBUG
        and not getattr(settings, "SECRET_KEY_FROM_ENV", True)
        and os.environ.get("PERCEPTLAB_ALLOW_FILE_SECRET", "").strip().lower()
        not in {"1", "true", "yes", "on"}
    )


def require_production_secret() -> None:
    """Raise :class:`ImproperlyConfigured` when :func:`file_secret_refused` (wsgi start-up)."""
    if file_secret_refused():
        raise ImproperlyConfigured(FILE_SECRET_MESSAGE)


def check_secret_source(app_configs=None, **kwargs) -> list[checks.CheckMessage]:
    if file_secret_refused():
        return [checks.Error(FILE_SECRET_MESSAGE, id="perceptlab.E001")]
    return []


def create_cache_table(sender, using: str = "default", **kwargs) -> None:
    """``post_migrate`` receiver: the DatabaseCache table(s), on the database just migrated."""
    call_command("createcachetable", database=using, verbosity=0)


class WiringConfig(AppConfig):
    name = "studyapp.wiring"
    label = "perceptlab_wiring"
    verbose_name = "perceptlab start-up wiring"

    def ready(self) -> None:
        from django.apps import apps

        from . import schema  # noqa: F401  (registers the OpenAPI view extensions)

        # Once per migrate: post_migrate is sent per app, so listen to studyapp's only.
        post_migrate.connect(
            create_cache_table,
            sender=apps.get_app_config("studyapp"),
            dispatch_uid="perceptlab-create-cache-table",
        )
        checks.register(check_secret_source, checks.Tags.security, deploy=True)
