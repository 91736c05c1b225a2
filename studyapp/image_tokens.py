"""Opaque per-(trial, slot) image URLs, and stimulus PNGs whose bytes reveal nothing but pixels.

URLs
----
A stimulus URL is ``/img/<session token>/<key>/``. ``key`` is 16 bytes, base64url (22
characters): a keyed pseudo-random permutation (a 4-round Feistel network over 32 bits whose
round function is HMAC-SHA256 under a key derived from ``SECRET_KEY`` and the session token)
of the trial's index, followed by a 96-bit HMAC tag of that index. The index is
``2·position + slot − 1`` for slots 1 and 2 (every protocol's first two images: JND's keys are
the same as before there were other protocols) and ``2³¹ + position`` for slot 3 (the right
copy of a 2AFC triplet): disjoint ranges, as slots 1 and 2 need ``position < 2³⁰``.
Resolving a key is one permutation inverse and one HMAC check, then one indexed query for the
session's trial at that position: no scan of the session's trials, however many it has. A
key is useless in another session (different permutation and tag key) and a tampered key is
refused (404). Nothing in a key says whether a pair is a sentinel or what condition it is; it
does not hide the trial's position or slot either, which the runner is told anyway.

Bytes
-----
Every stimulus is re-encoded, per request, into a *canonical* PNG whose length and layout
depend only on its width, height and sample format (8-bit RGB for every image without
transparency, which is what ``engine.stimuli`` writes; 8-bit RGBA with transparency)::

    signature · IHDR · plNc (16 random bytes) · IDAT (one chunk) · IEND

The IDAT holds the image's scanlines in *stored* (uncompressed) deflate blocks of 65,535
bytes, so its length is ``f(width, height, channels)`` whatever the pixels are; each scanline's
PNG filter (None, Sub or Up) is drawn at random per request, and ``plNc`` is a private
ancillary chunk (ignored by every decoder) of fresh random bytes. Hence, for two images of
the same dimensions and format:

- equal ``Content-Length`` and the same headers (``Content-Type``, ``Cache-Control``; never a
  ``Last-Modified``, ``ETag`` or ``Content-Disposition``) and the same chunk layout;
- never equal bytes, even for the two slots of a sentinel pair, the same natural image in
  several trials, sessions or participants, or the same URL fetched twice;
- no metadata: text, time, Exif, physical-size, gamma and colour-profile chunks of the stored
  file are not carried over.

The decoded pixels are bit-identical to the stored file's (palette and grey images are
expanded to RGB exactly as a decoder would); 16-bit files are refused (logged, 404).

What is *not* protected: the pixels themselves. Whoever holds the page can decode both images
and compare them, so the condition (how different the two images are, whether they are the
same) can always be computed from pixels by a script; that is what the quality-control rules
on automation signals, response-time regularity and superhuman sensitivity
(:mod:`studyapp.quality`) are for. The canonical encoding only removes every shortcut that
does not need the pixels: file size, byte equality, recurrence of bytes across trials, chunk
layout and metadata. It costs bandwidth (an uncompressed PNG: 3 bytes per pixel, 27 KB for
96×96, 147 KB for 224×224) and per request O(pixels) of vectorised work (about 0.25 ms for
224×224) on the decoded rows, which :mod:`studyapp.stimulus_rows` prepares before serving.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import io
import os
import secrets
import struct
import zlib
from dataclasses import dataclass, field
from functools import cache

import numpy as np
from django.conf import settings
from django.urls import reverse

SLOTS = (1, 2, 3)
_THIRD_SLOT_BASE = 2**31  # slot 3's indices: 2**31 + position (slots 1, 2 stay below 2**31)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
KEPT_CHUNKS = frozenset({b"IHDR", b"PLTE", b"tRNS", b"IDAT", b"IEND"})
NONCE_CHUNK = b"plNc"  # ancillary, private, reserved bit clear, safe to copy
NONCE_BYTES = 16
STORED_BLOCK = 65_535
KEY_CHARS = 22


class NotAPNG(ValueError):
    """The file is not a well-formed PNG (or one this server cannot serve losslessly)."""


# ------------------------------------------------------------------------------ keys


@cache
def _hmac_key(secret_key: str) -> bytes:
    return hashlib.sha256(b"perceptlab.image-url\x00" + secret_key.encode()).digest()


# hmac.digest: the one-shot HMAC (OpenSSL's, no Python object per call); same values as
# hmac.new(...).digest(), several times faster: a session's state lists 2 keys per trial.
def _session_key(session_token: str) -> bytes:
    return hmac.digest(_hmac_key(settings.SECRET_KEY), session_token.encode(), "sha256")


def _round(key: bytes, i: int, half: int) -> int:
    digest = hmac.digest(key, bytes([i]) + half.to_bytes(2, "big"), "sha256")
    return int.from_bytes(digest[:2], "big")


def _permute(key: bytes, value: int, inverse: bool = False) -> int:
    left, right = value >> 16, value & 0xFFFF
    rounds = range(3, -1, -1) if inverse else range(4)
    for i in rounds:
        if inverse:
            left, right = right ^ _round(key, i, left), left
        else:
            left, right = right, left ^ _round(key, i, right)
    return (left << 16) | right


def _tag(key: bytes, index: int) -> bytes:
    return hmac.digest(key, b"tag\x00" + index.to_bytes(4, "big"), "sha256")[:12]


def _index(position: int, slot: int) -> int:
    """The permuted index of ``(position, slot)``; ``ValueError`` if it has none."""
    if slot not in SLOTS or not 0 <= position < (2**30 if slot < 3 else _THIRD_SLOT_BASE):
        raise ValueError(f"no image key for position {position}, slot {slot}")
    return 2 * position + slot - 1 if slot < 3 else _THIRD_SLOT_BASE + position


def _image_key(session_key: bytes, position: int, slot: int) -> str:
    index = _index(position, slot)
    raw = _permute(session_key, index).to_bytes(4, "big") + _tag(session_key, index)
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def image_key(session_token: str, position: int, slot: int) -> str:
    """The opaque URL key of ``slot`` (1, 2 or 3; :func:`studyapp.protocols.image_paths` says
    what each shows) of the trial at ``position``."""
    return _image_key(_session_key(session_token), position, slot)


@cache
def _url_template() -> tuple[str, str]:
    placeholder = "T" * 8
    url = reverse("trial-image", args=[placeholder, "K" * KEY_CHARS])
    head, tail = url.split(placeholder, 1)
    return head, tail.replace("K" * KEY_CHARS, "{key}", 1)


def image_url(session_token: str, position: int, slot: int) -> str:
    """``/img/<token>/<key>/`` (the URL pattern reversed once, not per image)."""
    head, tail = _url_template()
    return head + session_token + tail.format(key=image_key(session_token, position, slot))


def image_urls(session_token: str, positions, n_images: int = 2) -> dict[int, list[str]]:
    """``{position: [slot 1 URL, ..., slot n_images URL]}`` for the session's trials at
    ``positions`` (the session's key derived once; ``n_images``: the protocol's, see
    :func:`studyapp.protocols.image_count`)."""
    head, tail = _url_template()
    prefix, key = head + session_token, _session_key(session_token)
    slots = SLOTS[:n_images]
    return {
        position: [prefix + tail.format(key=_image_key(key, position, slot)) for slot in slots]
        for position in positions
    }


def decode_image_key(session_token: str, key: str) -> tuple[int, int] | None:
    """``(position, slot)`` whose :func:`image_key` is ``key`` in this session, or ``None``."""
    if len(key) != KEY_CHARS:
        return None
    try:
        raw = base64.urlsafe_b64decode(key + "==")
    except (binascii.Error, ValueError):
        return None
    if len(raw) != 16 or base64.urlsafe_b64encode(raw).rstrip(b"=").decode() != key:
        return None  # (also refuses the non-canonical spellings of the last character)
    session_key = _session_key(session_token)
    index = _permute(session_key, int.from_bytes(raw[:4], "big"), inverse=True)
    if not hmac.compare_digest(_tag(session_key, index), raw[4:]):
        return None
    if index >= _THIRD_SLOT_BASE:
        return index - _THIRD_SLOT_BASE, 3
    return index // 2, index % 2 + 1


# ------------------------------------------------------------------------------ PNG files


def _chunks(data: bytes):
    """``(kind, body)`` of every chunk of ``data`` up to ``IEND``; :class:`NotAPNG` otherwise."""
    if not data.startswith(PNG_SIGNATURE):
        raise NotAPNG("missing PNG signature")
    offset = len(PNG_SIGNATURE)
    while offset + 12 <= len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind = data[offset + 4 : offset + 8]
        end = offset + 12 + length
        if end > len(data):
            raise NotAPNG(f"chunk {kind!r} runs past the end of the file")
        yield kind, data[offset + 8 : end - 4]
        offset = end
        if kind == b"IEND":
            return
    raise NotAPNG("no IEND chunk")


def strip_png(data: bytes) -> bytes:
    """``data`` with every PNG chunk but ``IHDR``, ``PLTE``, ``tRNS``, ``IDAT``, ``IEND`` removed.

    Raises :class:`NotAPNG` for anything that is not a sequence of well-formed chunks ending
    with ``IEND``. (The server serves :func:`canonical_png` instead; kept for tools.)
    """
    out = [PNG_SIGNATURE]
    for kind, body in _chunks(data):
        if kind in KEPT_CHUNKS:
            out.append(_chunk(kind, body))
    return b"".join(out)


def _chunk(kind: bytes, body: bytes) -> bytes:
    crc = zlib.crc32(body, zlib.crc32(kind))
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)


@dataclass(frozen=True)
class Pixels:
    """A decoded stimulus: ``rows`` is ``height × (width·channels)`` uint8 (an array, maybe a
    read-only view of a prepared rows file: see :mod:`studyapp.stimulus_rows`)."""

    width: int
    height: int
    channels: int  # 3 (RGB) or 4 (RGBA)
    rows: np.ndarray = field(repr=False, compare=False)


def _scanlines(rows: np.ndarray, bpp: int, choice: np.ndarray) -> np.ndarray:
    """``(height, 1 + stride)`` uint8: row ``y`` PNG-filtered with filter ``choice[y]`` (0 None,
    1 Sub, 2 Up), filter byte first. uint8 arithmetic wraps modulo 256, as PNG's does."""
    h, stride = rows.shape
    out = np.empty((h, stride + 1), dtype=np.uint8)
    out[:, 0] = choice
    out[:, 1:] = rows
    sub = np.flatnonzero(choice == 1)
    out[sub, 1 + bpp :] -= rows[sub, :-bpp]
    up = np.flatnonzero(choice == 2)
    up = up[up > 0]  # the first row's prior row is all zeros: Up leaves it as it is
    out[up, 1:] -= rows[up - 1]
    return out


def decode_png(data: bytes) -> Pixels:
    """The 8-bit RGB(A) pixels of a PNG file, exactly as a browser decodes them.

    :class:`NotAPNG` for a malformed file or 16-bit samples (which 8-bit RGB would round).
    """
    from PIL import Image  # imported lazily: only the image view needs Pillow

    header = next(iter(_chunks(data)), None)
    if header is None or header[0] != b"IHDR" or len(header[1]) != 13:
        raise NotAPNG("the first chunk is not a 13-byte IHDR")
    bit_depth = header[1][8]
    if bit_depth == 16:
        raise NotAPNG("16-bit samples are not supported (the stimuli must be 8-bit)")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            alpha = img.mode in {"RGBA", "LA", "PA"} or "transparency" in img.info
            converted = img.convert("RGBA" if alpha else "RGB")
    except (OSError, ValueError, SyntaxError) as exc:
        raise NotAPNG(f"cannot decode: {exc}") from exc
    array = np.asarray(converted, dtype=np.uint8)
    height, width, channels = array.shape
    return Pixels(width, height, channels, np.ascontiguousarray(array.reshape(height, -1)))


def canonical_length(width: int, height: int, channels: int = 3) -> int:
    """The byte length of every :func:`canonical_png` of these dimensions and channels."""
    raw = height * (1 + width * channels)
    blocks = max(1, -(-raw // STORED_BLOCK))
    idat = 2 + raw + 5 * blocks + 4
    return len(PNG_SIGNATURE) + (12 + 13) + (12 + NONCE_BYTES) + (12 + idat) + 12


def canonical_png(pixels: Pixels, rng: np.random.Generator | None = None) -> bytes:
    """A fresh PNG of ``pixels``: random per-row filters, stored deflate, a random nonce chunk.

    Its length is :func:`canonical_length` of the dimensions; its decoded pixels are exactly
    ``pixels``; two calls never return the same bytes (16 random bytes in ``plNc``).
    """
    rng = rng or np.random.default_rng(secrets.randbits(128))
    h = pixels.height
    bpp = pixels.channels
    choice = rng.integers(0, 3, size=h, dtype=np.uint8)
    raw = _scanlines(pixels.rows, bpp, choice).tobytes()

    parts = [b"\x78\x01"]  # zlib header: deflate, 32K window, no preset dictionary
    offsets = range(0, max(len(raw), 1), STORED_BLOCK)
    for start in offsets:
        block = raw[start : start + STORED_BLOCK]
        final = 1 if start + STORED_BLOCK >= len(raw) else 0
        parts.append(struct.pack("<BHH", final, len(block), len(block) ^ 0xFFFF))
        parts.append(block)
    parts.append(struct.pack(">I", zlib.adler32(raw)))
    colour_type = 6 if bpp == 4 else 2
    ihdr = struct.pack(">IIBBBBB", pixels.width, h, 8, colour_type, 0, 0, 0)
    return b"".join(
        [
            PNG_SIGNATURE,
            _chunk(b"IHDR", ihdr),
            _chunk(NONCE_CHUNK, os.urandom(NONCE_BYTES)),
            _chunk(b"IDAT", b"".join(parts)),
            _chunk(b"IEND", b""),
        ]
    )
