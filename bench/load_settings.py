"""Settings of the load benchmark's server (``bench/load.py``): the production settings, plus
one URL.

``from studyapp.settings import *`` — every production choice stays as it is (DEBUG off,
PostgreSQL from ``DATABASE_URL``, the database-table cache that holds the rate-limit counters,
the same middleware); only ``ROOT_URLCONF`` points at :mod:`bench.loadsite`, which adds the
trivial baseline view ``/bench/ping/`` beside the real URLs. The benchmark starts gunicorn with
``DJANGO_SETTINGS_MODULE=bench.load_settings`` (``studyapp.wsgi`` only sets a default).
"""

from studyapp.settings import *  # noqa: F403

ROOT_URLCONF = "bench.loadsite"
