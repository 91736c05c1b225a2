"""Stimulus images, served: the one lookup behind ``/img/<token>/<key>/``, and a WSGI fast path.

A session's runner fetches two images per trial, so images are most of a study's requests.
:func:`stimulus_response_body` is the whole work of one (key check, one indexed query or a
cache hit, :func:`~studyapp.image_tokens.canonical_png`); the Django view
(:func:`studyapp.views.trial_image`) and :class:`StimulusWSGI` both call it and send the same
headers (:data:`STIMULUS_HEADERS`), so a participant cannot tell which one answered.

:class:`StimulusWSGI` wraps the Django application in ``studyapp.wsgi`` and answers a ``GET``
for an image URL itself, without Django's URL resolver, middleware and response machinery
(which cost several times the image's own work, measured by ``bench/load.py``). Anything it is
not sure of goes to Django unchanged: other paths and methods, an HTTPS redirect that
``DJANGO_SECURE`` asks for, an unknown or tampered key, a missing file, a database error (so
404s, 503s and logging stay Django's).

Decoded pixels: :mod:`studyapp.stimulus_rows` prepares every stimulus's rows before it is
served (at import, at start) and serving reads them afresh per request, the same work for
every stimulus every time: the first serving of an image costs what later ones do, so the
response time says nothing about which image is perturbed or which pair is a sentinel.

The per-process cache of trials maps ``(token, position)`` to the trial's stimulus files in
slot order (storage names; :func:`studyapp.protocols.image_paths`: two for JND and rating
pairs, three for a 2AFC triplet, one for label and single-image rating trials): the images of
a trial are usually fetched by the same worker within a second, and the trial's item and image
order never change once the trial exists.
On a local filesystem every request reads its file's ``stat`` (microseconds, the same for
every file), so an edited or deleted file is noticed at once. On a remote storage (S3) a
file's metadata is a request to the storage, so every slot's
:class:`~studyapp.stimulus_rows.Fingerprint` is read on the trial's first fetch, whichever
slot it is for, even for a control's twice-shown file: that lookup costs the same for every
trial of a protocol. Entries live ``PERCEPTLAB_STIMULUS_TTL`` seconds (default 60): a
deleted session's images (and on S3, an edited file's old rows) stop being served at most
that long after.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections import OrderedDict

from django.conf import settings
from django.core import signals
from django.core.files.storage import FileSystemStorage
from django.db import DatabaseError

from . import stimulus_rows
from .image_tokens import canonical_png, decode_image_key
from .models import Trial
from .protocols import image_count, image_paths
from .stimulus_rows import Fingerprint, StimulusUnavailable, fingerprint

logger = logging.getLogger(__name__)

#: Every stimulus response carries exactly these headers (plus ``Content-Length``), from the
#: view and from the fast path alike; the view's middleware adds nothing to them.
STIMULUS_HEADERS = (
    ("Content-Type", "image/png"),
    ("Cache-Control", "private, max-age=3600"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "same-origin"),
    ("Cross-Origin-Opener-Policy", "same-origin"),
    ("X-Frame-Options", "DENY"),
)

_IMAGE_PATH = re.compile(r"^/img/(?P<token>[^/]+)/(?P<key>[^/]+)/$")


class _LRU:
    """A thread-safe map of at most ``size`` entries, least recently used out first, each
    valid ``ttl_s`` seconds (the per-process cache of trials)."""

    def __init__(self, size: int, ttl_s: float = float("inf")) -> None:
        self.size, self.ttl_s = size, ttl_s
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            hit = self._items.get(key)
            if hit is None or time.monotonic() - hit[0] >= self.ttl_s:
                return None
            self._items.move_to_end(key)
            return hit[1]

    def put(self, key, value) -> None:
        with self._lock:
            self._items[key] = (time.monotonic(), value)
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


#: ``(token, position) → (files, pair id, fingerprints)``: ``files`` the storage names in slot
#: order; ``fingerprints`` is ``None`` on a local filesystem (one ``stat`` per request), else
#: every slot's :class:`~studyapp.stimulus_rows.Fingerprint` (or the exception that makes one
#: unservable), read once per trial.
trial_paths = _LRU(
    size=int(os.environ.get("PERCEPTLAB_STIMULUS_CACHE", "8192")),
    ttl_s=float(os.environ.get("PERCEPTLAB_STIMULUS_TTL", "60")),
)


def _fingerprint_or_error(name: str) -> Fingerprint | Exception:
    try:
        return fingerprint(name)
    except (OSError, StimulusUnavailable) as exc:
        return exc


def _trial_files(token: str, position: int) -> tuple | None:
    """The trial's entry of :data:`trial_paths`, read from the database on a miss."""
    row = trial_paths.get((token, position))
    if row is not None:
        return row
    row = (
        Trial.objects.filter(session__token=token, position=position)
        .values_list(
            "natural_first", "pair__natural_path", "pair__other_path", "pair__third_path",
            "pair_id", "pair__study__protocol", "pair__study__rating_shows",
        )
        .first()
    )
    if row is None:
        return None
    natural_first, natural, other, third, pair_id, protocol, rating_shows = row
    files = image_paths(
        protocol, image_count(protocol, rating_shows), natural_first, natural, other, third
    )
    fingerprints = None
    if not isinstance(stimulus_rows.stimulus_storage(), FileSystemStorage):
        # Every slot, always (a control's one file twice): the same cost for every trial.
        fingerprints = tuple(_fingerprint_or_error(name) for name in files)
    row = (files, pair_id, fingerprints)
    trial_paths.put((token, position), row)
    return row


def stimulus_response_body(token: str, key: str) -> bytes | None:
    """A fresh canonical PNG of the image behind ``/img/<token>/<key>/``, or ``None`` (→ 404:
    unknown key, no such trial or slot, file missing or not servable; the last two are
    logged)."""
    found = decode_image_key(token, key)
    if found is None:
        return None
    position, slot = found
    row = _trial_files(token, position)
    if row is None:
        return None
    files, pair_id, fingerprints = row
    if slot > len(files):
        return None  # a slot this protocol does not show (a key forged from another's)
    if fingerprints is None:
        file = _fingerprint_or_error(files[slot - 1])
    else:
        file = fingerprints[slot - 1]
    problem = file if isinstance(file, Exception) else None
    if problem is None:
        try:
            return canonical_png(stimulus_rows.load(file))
        except (OSError, StimulusUnavailable) as exc:
            problem = exc
    what = "is missing" if isinstance(problem, FileNotFoundError) else "cannot be served"
    logger.error("image of pair %s slot %s %s: %s", pair_id, slot, what, problem)
    return None


class StimulusWSGI:
    """WSGI middleware: ``GET /img/<token>/<key>/`` answered here, everything else by ``app``."""

    def __init__(self, app) -> None:
        self.app = app

    def __call__(self, environ, start_response):
        match = _IMAGE_PATH.match(environ.get("PATH_INFO", ""))
        if (
            match is None
            or environ.get("REQUEST_METHOD") != "GET"
            or (settings.SECURE_SSL_REDIRECT and environ.get("wsgi.url_scheme") != "https")
        ):
            return self.app(environ, start_response)
        # As Django's handler does: the request signals reset queries and recycle connections
        # past CONN_MAX_AGE (or broken ones).
        signals.request_started.send(sender=self.__class__, environ=environ)
        try:
            body = stimulus_response_body(match["token"], match["key"])
        except DatabaseError:
            body = None  # Django answers (503 with Retry-After on an outage; see studyapp.api)
        finally:
            signals.request_finished.send(sender=self.__class__)
        if body is None:
            return self.app(environ, start_response)
        start_response("200 OK", [*STIMULUS_HEADERS, ("Content-Length", str(len(body)))])
        return [body]
