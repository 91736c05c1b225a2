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

Decoded pixels: the first request for a stimulus file decodes the PNG (a few ms) and writes
its rows, uncompressed, as a ``.npy`` file under ``PERCEPTLAB_ROWS_DIR`` (default
``var/stimulus-rows``; 3 bytes per pixel, keyed by the file's path, size and mtime, so an
edited file is decoded afresh). Every later request, in any worker, memory-maps that file: the
operating system keeps one copy of the rows in its page cache for all workers, however many
stimuli a study has (a study of 2,800 pairs has 5,600 files; a per-worker cache of decoded
images would hold a fraction of them). Each worker keeps the maps of the
``PERCEPTLAB_IMAGE_CACHE`` (default 4,096) files it served last.

The per-process cache of trials maps ``(token, position)`` to the trial's two stimulus paths:
the two images of a trial are usually fetched by the same worker within a second, and the
trial's pair and image order never change once the trial exists. Entries live
``PERCEPTLAB_STIMULUS_TTL`` seconds (default 60): a deleted session's images stop being
served at most that long after.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import threading
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
from django.conf import settings
from django.core import signals
from django.db import DatabaseError

from .image_tokens import NotAPNG, Pixels, canonical_png, decode_image_key, decode_png
from .models import Trial

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
    valid ``ttl_s`` seconds. Both per-process caches of this module are one."""

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


#: ``(token, position) → (natural_first, natural file, other file, pair id)``; the files are
#: absolute and resolved (``None`` for one outside ``MEDIA_ROOT``).
trial_paths = _LRU(
    size=int(os.environ.get("PERCEPTLAB_STIMULUS_CACHE", "8192")),
    ttl_s=float(os.environ.get("PERCEPTLAB_STIMULUS_TTL", "60")),
)


def _trial_files(token: str, position: int) -> tuple | None:
    """The trial's entry of :data:`trial_paths`, read from the database on a miss."""
    row = trial_paths.get((token, position))
    if row is not None:
        return row
    row = (
        Trial.objects.filter(session__token=token, position=position)
        .values_list("natural_first", "pair__natural_path", "pair__other_path", "pair_id")
        .first()
    )
    if row is None:
        return None
    natural_first, natural_path, other_path, pair_id = row
    row = (natural_first, _media_path(natural_path, pair_id), _media_path(other_path, pair_id),
           pair_id)
    trial_paths.put((token, position), row)
    return row


class PixelStore:
    """Decoded stimulus files: per-process LRU of memory maps over ``.npy`` rows on disk."""

    def __init__(self, size: int) -> None:
        self._maps = _LRU(size)

    def get(self, path: Path) -> Pixels:
        """The pixels of the PNG at ``path``; :class:`NotAPNG` if it cannot be served,
        ``FileNotFoundError`` if it is gone."""
        stat = path.stat()
        key = (str(path), stat.st_mtime_ns, stat.st_size)
        pixels = self._maps.get(key)
        if pixels is None:
            pixels = self._load(path, key)
            self._maps.put(key, pixels)
        return pixels

    @staticmethod
    def _load(path: Path, key: tuple) -> Pixels:
        folder = Path(settings.PERCEPTLAB_ROWS_DIR)
        name = hashlib.sha256(repr(key).encode()).hexdigest()[:32] + ".npy"
        try:
            array = np.load(folder / name, mmap_mode="r", allow_pickle=False)
        except (FileNotFoundError, ValueError, OSError):
            pixels = decode_png(path.read_bytes())
            array = pixels.rows.reshape(pixels.height, pixels.width, pixels.channels)
            folder.mkdir(parents=True, exist_ok=True)
            partial = folder / f".{name}.{secrets.token_hex(6)}.tmp"
            with open(partial, "wb") as f:
                np.save(f, array, allow_pickle=False)
            os.replace(partial, folder / name)  # atomic: another worker may write it too
            return pixels
        height, width, channels = array.shape
        return Pixels(width, height, channels, array.reshape(height, width * channels))

    def clear(self) -> None:
        self._maps.clear()


pixel_store = PixelStore(int(os.environ.get("PERCEPTLAB_IMAGE_CACHE", "4096")))


def _media_path(relative: str, pair_id: int) -> Path | None:
    """The file under ``MEDIA_ROOT`` (symlinks resolved), or ``None`` (logged) outside it."""
    media_root = Path(settings.MEDIA_ROOT).resolve()
    path = (media_root / relative).resolve()
    if not path.is_relative_to(media_root):
        logger.error("image of pair %s is outside MEDIA_ROOT: %s", pair_id, path)
        return None
    return path


def stimulus_response_body(token: str, key: str) -> bytes | None:
    """A fresh canonical PNG of the image behind ``/img/<token>/<key>/``, or ``None`` (→ 404:
    unknown key, no such trial, file missing or not servable; the last two are logged)."""
    found = decode_image_key(token, key)
    if found is None:
        return None
    position, slot = found
    row = _trial_files(token, position)
    if row is None:
        return None
    natural_first, natural_path, other_path, pair_id = row
    path = natural_path if (slot == 1) == natural_first else other_path
    if path is None:
        return None
    try:
        return canonical_png(pixel_store.get(path))
    except FileNotFoundError:
        logger.error("image of pair %s slot %s is missing: %s", pair_id, slot, path)
    except NotAPNG as exc:
        logger.error("image of pair %s slot %s cannot be served: %s", pair_id, slot, exc)
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
