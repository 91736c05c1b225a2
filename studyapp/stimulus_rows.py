"""Decoded stimulus rows, prepared before anything is served, so no serving is a first one.

Why: the served bytes of every stimulus are re-encoded per request from its decoded pixels
(:func:`studyapp.image_tokens.canonical_png`). Decoding a stored PNG costs milliseconds (about
1 ms at 96×96, 4–10 ms at 224×224). Had the first serving of a file decoded it, a natural
image (which recurs across the pairs of its source image) would be warm when the perturbed
image of a pair (seen once) is cold: "the slower image is the perturbed one" was right 52–59
of 72 times on a fresh server, and timing found sentinels with AUC 0.81 (issue 17). So the
rows are made *before* serving:

- when pairs are imported or generated (:func:`prepare_study`, called at the end of
  :func:`studyapp.services.import_manifest`);
- before a server serves: ``manage.py prepare_stimuli`` (``make serve`` runs it after
  ``migrate``), and again by every WSGI process when it loads (:func:`warm_up`, in
  ``studyapp.wsgi``: only what is missing is decoded, so after the command it only reads
  the rows once, which also puts them in the page cache);
- on another web host, whose local rows folder starts empty: the same two steps there.

Serving (:func:`load`) then does the same work for every stimulus, every time, with no
per-process cache to be cold or warm: one ``read()`` of the stimulus's rows file (a 16-byte
header and the raw rows: 3 bytes per pixel) from the local rows folder. A file that is
still missing there (pairs imported on another host after this one started) is decoded on
demand, so every host rebuilds its rows from storage by itself; that serving is logged as a
warning, because it is the slow first serving this module exists to avoid.

Storage: stimulus files are read through Django's storage API (``STORAGES["default"]``):
the local filesystem at ``MEDIA_ROOT`` by default, an S3-compatible bucket with
django-storages as a setting (``PERCEPTLAB_S3_BUCKET``, see ``studyapp.settings``). A file's
identity is its :class:`Fingerprint` (storage name, modification time, size): an edited file
gets fresh rows. The rows live on each host's local disk (``PERCEPTLAB_ROWS_DIR``, default
``var/stimulus-rows``), named by a hash of the fingerprint.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import secrets
import struct
import time
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np
from django.conf import settings
from django.core import checks
from django.core.exceptions import ImproperlyConfigured, SuspiciousFileOperation
from django.core.files.storage import FileSystemStorage, storages

from .image_tokens import NotAPNG, Pixels, decode_png

logger = logging.getLogger(__name__)

STORAGE_ALIAS = "default"
#: A rows file: ``MAGIC``, then width, height and channels (little-endian uint32), then the
#: rows, ``height × width × channels`` bytes. (Not ``.npy``: parsing its text header took
#: longer than reading the whole rows of a 96×96 image.)
MAGIC = b"PLR1"
HEADER = struct.Struct("<4sIII")


class StimulusUnavailable(ValueError):
    """The stimulus file cannot be served: outside the storage's folder, or not a PNG we serve."""


class Fingerprint(NamedTuple):
    """What identifies one version of a stored stimulus file (times in ns, size in bytes)."""

    name: str
    mtime_ns: int
    size: int


def stimulus_storage():
    """The storage holding the stimulus files (``STORAGES["default"]``)."""
    return storages[STORAGE_ALIAS]


def _local_path(storage, name: str) -> Path | None:
    """The file's local path for a filesystem storage (symlinks resolved, checked to stay
    inside the storage's folder), or ``None`` for any other (S3, in memory)."""
    if not isinstance(storage, FileSystemStorage):
        return None
    try:
        local = storage.path(name)
    except SuspiciousFileOperation as exc:
        raise StimulusUnavailable(f"{name!r} is outside the stimulus storage") from exc
    root = _resolved(storage.location)
    path = Path(local).resolve()
    if not path.is_relative_to(root):
        raise StimulusUnavailable(f"{name!r} resolves outside the stimulus storage: {path}")
    return path


@lru_cache(maxsize=8)
def _resolved(location: str) -> Path:
    return Path(location).resolve()


def fingerprint(name: str) -> Fingerprint:
    """The stored file's :class:`Fingerprint`: one ``stat`` on a local filesystem, one
    metadata request (``HEAD``) on S3. ``FileNotFoundError`` if it is gone;
    :class:`StimulusUnavailable` if it is outside the storage."""
    storage = stimulus_storage()
    path = _local_path(storage, name)
    if path is not None:
        stat = path.stat()
        return Fingerprint(name, stat.st_mtime_ns, stat.st_size)
    if not storage.exists(name):
        raise FileNotFoundError(name)
    modified = storage.get_modified_time(name)
    return Fingerprint(name, int(modified.timestamp() * 1e9), int(storage.size(name)))


def rows_folder() -> Path:
    """This host's rows folder (``PERCEPTLAB_ROWS_DIR``)."""
    return Path(settings.PERCEPTLAB_ROWS_DIR)


def rows_path(fp: Fingerprint) -> Path:
    digest = hashlib.sha256(repr(tuple(fp)).encode()).hexdigest()[:32]
    return rows_folder() / f"{digest}.rows"


def _parse(data: bytes) -> Pixels | None:
    if len(data) < HEADER.size:
        return None
    magic, width, height, channels = HEADER.unpack_from(data)
    if magic != MAGIC or channels not in (3, 4) or len(data) != (
        HEADER.size + width * height * channels
    ):
        return None  # a partial or foreign file: rebuilt
    rows = np.frombuffer(data, dtype=np.uint8, offset=HEADER.size).reshape(height, -1)
    return Pixels(width, height, channels, rows)


def read_rows(fp: Fingerprint) -> Pixels | None:
    """The prepared rows of ``fp``, or ``None`` if this host has not prepared them."""
    try:
        with open(rows_path(fp), "rb") as f:
            return _parse(f.read())
    except FileNotFoundError:
        return None


def build_rows(fp: Fingerprint) -> Pixels:
    """Decode the stored file and write its rows (atomically: another process may too).

    :class:`StimulusUnavailable` (a :class:`~studyapp.image_tokens.NotAPNG`'s reason) if it
    cannot be served; ``FileNotFoundError`` if it is gone.
    """
    with stimulus_storage().open(fp.name, "rb") as f:
        data = f.read()
    try:
        pixels = decode_png(data)
    except NotAPNG as exc:
        raise StimulusUnavailable(f"{fp.name!r}: {exc}") from exc
    target = rows_path(fp)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    with open(partial, "wb") as f:
        f.write(HEADER.pack(MAGIC, pixels.width, pixels.height, pixels.channels))
        f.write(np.ascontiguousarray(pixels.rows).tobytes())
    os.replace(partial, target)
    return pixels


def load(fp: Fingerprint) -> Pixels:
    """The pixels of ``fp`` for serving: its prepared rows (the same work for every stimulus,
    every time), else decoded now (logged: it should have been prepared)."""
    pixels = read_rows(fp)
    if pixels is None:
        logger.warning(
            "stimulus %s had no prepared rows on this host: decoded while serving (a slower"
            " first serving; run `manage.py prepare_stimuli` after importing pairs)", fp.name
        )
        pixels = build_rows(fp)
    return pixels


@dataclass
class PrepareSummary:
    """What :func:`prepare` did: files decoded now, files whose rows were already there, and
    ``(name, reason)`` of those that cannot be served (missing, not a PNG, outside storage)."""

    decoded: int = 0
    ready: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def __str__(self) -> str:
        text = (
            f"{self.decoded + self.ready} stimulus files ready ({self.decoded} decoded now,"
            f" {self.ready} already prepared) in {self.seconds:.1f} s"
        )
        if self.failed:
            text += f"; {len(self.failed)} cannot be served, first: {self.failed[0]}"
        return text


@contextmanager
def _lock():
    """One preparer per host at a time (every gunicorn worker warms up as it starts)."""
    folder = rows_folder()
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".prepare.lock", "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepare(names: Iterable[str], *, progress: bool = False) -> PrepareSummary:
    """Make sure this host has the rows of every stimulus file in ``names`` (storage names).

    Files already prepared are read once (which also loads them into the page cache, so
    that no later serving waits for the disk); missing ones are decoded from storage.
    Never raises for a bad file: it is listed in :attr:`PrepareSummary.failed`.
    """
    started = time.perf_counter()
    unique = sorted(set(names))
    summary = PrepareSummary()
    with _lock():
        iterator = unique
        if progress:
            from tqdm import tqdm

            iterator = tqdm(unique, desc="stimulus rows", unit="file")
        for name in iterator:
            try:
                fp = fingerprint(name)
                if read_rows(fp) is not None:
                    summary.ready += 1
                else:
                    build_rows(fp)
                    summary.decoded += 1
            except (OSError, StimulusUnavailable) as exc:
                summary.failed.append((name, f"{type(exc).__name__}: {exc}"))
    summary.seconds = time.perf_counter() - started
    for name, reason in summary.failed[:20]:
        logger.error("stimulus %s cannot be served: %s", name, reason)
    return summary


def stimulus_names(pairs) -> list[str]:
    """Every stimulus file of ``pairs`` (a Pair queryset), each once."""
    names = set()
    for paths in pairs.values_list("natural_path", "other_path", "third_path"):
        names.update(path for path in paths if path)  # third_path: 2AFC copies B only
    return sorted(names)


def prepare_study(study, *, progress: bool = False) -> PrepareSummary:
    """:func:`prepare` every stimulus of ``study`` (after its pairs were imported)."""
    return prepare(stimulus_names(study.pairs.all()), progress=progress)


def prepare_active(*, progress: bool = False) -> PrepareSummary:
    """:func:`prepare` every stimulus of every active study."""
    from .models import Pair

    return prepare(stimulus_names(Pair.objects.filter(study__is_active=True)), progress=progress)


def warm_up() -> PrepareSummary | None:
    """Called by every WSGI process as it loads (``studyapp.wsgi``): prepare the active
    studies' rows before the first request. Off with ``PERCEPTLAB_PREPARE_ON_START=0``.
    Returns ``None`` when off or when the database has no tables yet (logged)."""
    from django.db import DatabaseError, connections

    if not settings.PERCEPTLAB_PREPARE_ON_START:
        return None
    try:
        summary = prepare_active()
    except DatabaseError as exc:
        logger.warning("stimulus rows not prepared at start (database not ready: %s)", exc)
        return None
    except OSError as exc:  # the rows folder itself: nothing could be served either
        raise ImproperlyConfigured(
            f"cannot prepare stimulus rows in PERCEPTLAB_ROWS_DIR={rows_folder()}: {exc}"
        ) from exc
    finally:
        connections.close_all()  # no connection opened here crosses a fork
    (logger.warning if summary.failed else logger.info)("at start: %s", summary)
    return summary


@checks.register(checks.Tags.compatibility)
def check_storage_backend(app_configs=None, **kwargs) -> list[checks.CheckMessage]:
    """``STORAGES["default"]`` must be importable (django-storages is an optional extra)."""
    from django.utils.module_loading import import_string

    backend = settings.STORAGES.get(STORAGE_ALIAS, {}).get("BACKEND", "")
    try:
        import_string(backend)
    except ImportError as exc:
        return [
            checks.Error(
                f"stimulus storage backend {backend!r} cannot be imported ({exc})",
                hint="for PERCEPTLAB_S3_BUCKET install the s3 extra: pip install -c"
                " constraints.txt '.[s3]' (django-storages and boto3)",
                id="perceptlab.E101",
            )
        ]
    return []
