"""Opaque per-(trial, slot) image URLs, and stimulus PNGs served so that they name nothing.

A stimulus URL is ``/img/<session token>/<key>/``. ``key`` is an HMAC-SHA256 (keyed by a value
derived from ``SECRET_KEY``) of the session token, the trial's position and the slot, cut to
128 bits and base64url-encoded. Nothing in it says which position or slot it is, whether the
pair is a sentinel, or which condition it belongs to; the two slots of a sentinel pair get two
unrelated keys; a key is useless in another session. Serving a URL looks the key up among the
session's own trials (at most a few thousand HMACs per request, microseconds each), so no
mapping has to be stored.

The bytes served are the PNG's critical chunks only (``IHDR``, ``PLTE``, ``tRNS``, ``IDAT``,
``IEND``): text chunks (``tEXt``/``iTXt``/``zTXt``, which image tools use for metadata such
as a generating spec), time stamps (``tIME``), Exif and colour-management chunks are dropped,
so neither metadata nor a colour profile present in one image of a pair and not in the other
can tell them apart. The response has no ``Last-Modified``, ``ETag`` or
``Content-Disposition``.

Known, accepted leak: ``Content-Length``. A perturbed image compresses worse than its natural
original, so its PNG is usually larger; someone comparing the byte sizes of the two images of a
trial in the browser's developer tools could guess which one is perturbed (though not whether
the pair is a sentinel: a sentinel's two URLs serve identical bytes, like a sentinel should).
Re-encoding cannot close this without destroying the lossless pixels under study, and padding
every file to a common size would cost bandwidth; participants in a timed same/different task
have no time to do this per trial, and quality control catches implausible accuracy.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import struct
from functools import cache

from django.conf import settings
from django.urls import reverse

from .models import Session, Trial

SLOTS = (1, 2)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
KEPT_CHUNKS = frozenset({b"IHDR", b"PLTE", b"tRNS", b"IDAT", b"IEND"})


class NotAPNG(ValueError):
    """The file is not a well-formed PNG."""


@cache
def _hmac_key(secret_key: str) -> bytes:
    return hashlib.sha256(b"perceptlab.image-url\x00" + secret_key.encode()).digest()


def image_key(session_token: str, position: int, slot: int) -> str:
    """The opaque URL key of ``slot`` (1 = first, 2 = second) of the trial at ``position``."""
    message = f"{session_token}\x00{position}\x00{slot}".encode()
    digest = hmac.new(_hmac_key(settings.SECRET_KEY), message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest[:16]).rstrip(b"=").decode()


def image_url(session_token: str, position: int, slot: int) -> str:
    return reverse("trial-image", args=[session_token, image_key(session_token, position, slot)])


def resolve_image_key(session: Session, key: str) -> tuple[Trial, int] | None:
    """The trial and slot whose :func:`image_key` is ``key``, or ``None``."""
    if len(key) != 22:
        return None
    for position in session.trials.values_list("position", flat=True):
        for slot in SLOTS:
            if hmac.compare_digest(image_key(session.token, position, slot), key):
                trial = session.trials.select_related("pair").get(position=position)
                return trial, slot
    return None


def strip_png(data: bytes) -> bytes:
    """``data`` with every PNG chunk but ``IHDR``, ``PLTE``, ``tRNS``, ``IDAT``, ``IEND`` removed.

    Raises :class:`NotAPNG` for anything that is not a sequence of well-formed chunks ending
    with ``IEND``. Chunk CRCs are kept as they are (the chunks themselves are unchanged).
    """
    if not data.startswith(PNG_SIGNATURE):
        raise NotAPNG("missing PNG signature")
    out = [PNG_SIGNATURE]
    offset = len(PNG_SIGNATURE)
    while offset + 12 <= len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind = data[offset + 4 : offset + 8]
        end = offset + 12 + length
        if end > len(data):
            raise NotAPNG(f"chunk {kind!r} runs past the end of the file")
        if kind in KEPT_CHUNKS:
            out.append(data[offset:end])
        offset = end
        if kind == b"IEND":
            return b"".join(out)
    raise NotAPNG("no IEND chunk")
