"""WSGI entry point (``gunicorn studyapp.wsgi -w 4 -b 0.0.0.0:8000``).

Stimulus images (``/img/...``) are answered by :class:`studyapp.stimulus_server.StimulusWSGI`
in front of Django (same bytes and headers, a fraction of the work); everything else by Django.
With DEBUG off it refuses to start without ``DJANGO_SECRET_KEY`` (see
:func:`studyapp.wiring.require_production_secret`). Then, before serving, it prepares the
stimulus rows of every active study that this host lacks
(:func:`studyapp.stimulus_rows.warm_up`; ``manage.py prepare_stimuli`` does it up front, so
a worker only reads them), so that no stimulus is served for the first time while a
participant waits.
"""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "studyapp.settings")
django_application = get_wsgi_application()


def _with_stimulus_server(app):
    from studyapp.stimulus_server import StimulusWSGI  # needs the apps loaded

    return StimulusWSGI(app)


application = _with_stimulus_server(django_application)


def _refuse_file_secret() -> None:
    from studyapp.wiring import require_production_secret

    require_production_secret()


_refuse_file_secret()


def _prepare_stimuli() -> None:
    from studyapp.stimulus_rows import warm_up

    warm_up()


_prepare_stimuli()
