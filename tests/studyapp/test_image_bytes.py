"""Served stimulus bytes reveal nothing but their pixels (studyapp.image_tokens).

The probe plays a script that looks only at bytes (sizes, hashes, recurrence, chunk layout)
across several sessions and participants and checks that none of its rules has anything to
go on; the encoder tests check the canonical PNG decodes to exactly the stored pixels.
"""

from __future__ import annotations

import hashlib
import io
import struct
import zlib
from collections import Counter

import numpy as np
import pytest
from django.test import Client
from PIL import Image
from rest_framework.test import APIClient

from studyapp.image_tokens import (
    NONCE_CHUNK,
    NotAPNG,
    canonical_length,
    canonical_png,
    decode_image_key,
    decode_png,
    image_key,
)
from studyapp.models import Session


def _png(img: Image.Image, **save) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **save)
    return buf.getvalue()


def _chunk_layout(png: bytes) -> list[tuple[bytes, int]]:
    out, offset = [], 8
    while offset < len(png):
        (length,) = struct.unpack(">I", png[offset : offset + 4])
        kind = png[offset + 4 : offset + 8]
        body = png[offset + 8 : offset + 8 + length]
        (crc,) = struct.unpack(">I", png[offset + 8 + length : offset + 12 + length])
        assert crc == zlib.crc32(body, zlib.crc32(kind)), f"bad CRC in {kind!r}"
        out.append((kind, length))
        offset += 12 + length
    return out


def _rgba(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as img:
        return np.asarray(img.convert("RGBA"))


RNG = np.random.default_rng(7)
IMAGES = {
    "rgb": Image.fromarray(RNG.integers(0, 256, (37, 51, 3), dtype=np.uint8)),
    "rgb-multiblock": Image.fromarray(RNG.integers(0, 256, (160, 150, 3), dtype=np.uint8)),
    "grey": Image.fromarray(RNG.integers(0, 256, (20, 33), dtype=np.uint8)),
    "palette": Image.fromarray(RNG.integers(0, 256, (30, 30, 3), dtype=np.uint8)).quantize(16),
    "rgba": Image.fromarray(RNG.integers(0, 256, (17, 9, 4), dtype=np.uint8)),
    "one-pixel": Image.fromarray(np.array([[[1, 2, 3]]], dtype=np.uint8)),
}


@pytest.mark.parametrize("name", IMAGES)
def test_canonical_png_has_the_stored_pixels_a_fixed_length_and_fresh_bytes(name: str):
    stored = _png(IMAGES[name], optimize=True)
    pixels = decode_png(stored)
    first, second = canonical_png(pixels), canonical_png(pixels)
    assert first != second
    for served in (first, second):
        assert np.array_equal(_rgba(served), _rgba(stored))
        assert len(served) == canonical_length(pixels.width, pixels.height, pixels.channels)
        kinds = [kind for kind, _ in _chunk_layout(served)]
        assert kinds == [b"IHDR", NONCE_CHUNK, b"IDAT", b"IEND"]
    # Ancillary (lower-case first letter) and private: every decoder must skip it.
    assert NONCE_CHUNK[0:1].islower() and NONCE_CHUNK[1:2].islower()


def test_canonical_length_does_not_depend_on_content():
    flat = Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8))
    noisy = Image.fromarray(RNG.integers(0, 256, (40, 40, 3), dtype=np.uint8))
    a, b = (canonical_png(decode_png(_png(img))) for img in (flat, noisy))
    assert len(_png(flat)) < len(_png(noisy))  # the stored files do differ in size
    assert len(a) == len(b)
    assert _chunk_layout(a) == _chunk_layout(b)


def test_16_bit_and_malformed_files_are_refused():
    deep = Image.fromarray(np.full((4, 4), 1000, dtype=np.uint16))
    with pytest.raises(NotAPNG, match="16-bit"):
        decode_png(_png(deep))
    with pytest.raises(NotAPNG, match="signature"):
        decode_png(b"GIF89a")
    with pytest.raises(NotAPNG):
        decode_png(_png(IMAGES["rgb"])[:40])


def test_image_keys_round_trip_and_are_bound_to_the_session():
    for position in (0, 1, 7, 999, 2**20):
        for slot in (1, 2):
            key = image_key("token-a", position, slot)
            assert len(key) == 22
            assert decode_image_key("token-a", key) == (position, slot)
            assert decode_image_key("token-b", key) is None
    key = image_key("token-a", 3, 1)
    # (the last character carries 2 bits: every other spelling of it is refused too)
    spellings = [key[:-1] + c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c != key[-1]]
    for bad in (*spellings, "A" * 22, "short", key + "A",
                "!" * 22):
        assert decode_image_key("token-a", bad) is None, bad


# ------------------------------------------------------------------------------ the probe


def _serve_sessions(study, new_session, n_sessions: int) -> list[dict]:
    """Every image of ``n_sessions`` fresh sessions, fetched over HTTP, with the truth."""
    client, api = Client(), APIClient()
    trials = []
    for _ in range(n_sessions):
        session: Session = new_session(study)
        state = api.get(f"/api/sessions/{session.token}/").json()
        truth = {t.position: t for t in session.trials.select_related("pair")}
        for trial in state["trials"]:
            responses = [client.get(url) for url in trial["images"]]
            assert all(r.status_code == 200 for r in responses)
            t = truth[trial["position"]]
            trials.append(
                {
                    "bodies": [r.content for r in responses],
                    "headers": [sorted((k, v) for k, v in r.items()) for r in responses],
                    "sentinel": t.pair.is_sentinel,
                    "perturbed_slot": None if t.pair.is_sentinel else (2 if t.natural_first else 1),
                }
            )
    return trials


@pytest.mark.django_db
def test_a_bytes_only_probe_has_nothing_to_go_on(make_study, new_session):
    """Size, hash, recurrence and layout rules of a cheating script never fire.

    Rules (each right on every applicable trial against the old server, see issue 10):
    "the larger file is the perturbed one"; "equal bytes or Content-Length means a sentinel";
    "an image whose bytes recur elsewhere is the natural one".
    """
    study = make_study(trials_per_session=6, sentinel_fraction=0.34)
    trials = _serve_sessions(study, new_session, n_sessions=4)
    assert any(t["sentinel"] for t in trials) and any(not t["sentinel"] for t in trials)
    bodies = [body for t in trials for body in t["bodies"]]

    # One length, one set of headers, one chunk layout for every image of these dimensions.
    assert len({len(body) for body in bodies}) == 1
    assert len({tuple(h) for t in trials for h in t["headers"]}) == 1
    assert len({tuple(_chunk_layout(body)) for body in bodies}) == 1
    # No bytes recur: not within a trial (sentinels), not across trials, sessions, participants.
    hashes = Counter(hashlib.sha256(body).digest() for body in bodies)
    assert hashes.most_common(1)[0][1] == 1
    # Even the IDAT payloads alone never repeat (the filters are drawn per request).
    idats = Counter(body[8 + 25 + 12 + 16 :] for body in bodies)
    assert idats.most_common(1)[0][1] == 1

    # The size rule: "larger is perturbed" ties on every data trial, so it is a coin flip.
    data = [t for t in trials if not t["sentinel"]]
    assert all(len(t["bodies"][0]) == len(t["bodies"][1]) for t in data)
    # The equality rule flags no trial as a sentinel; the recurrence rule applies nowhere.
    assert not [t for t in trials if t["bodies"][0] == t["bodies"][1]]
    # Yet the pixels are all there: decoding them tells the sentinels apart, as it must.
    for t in trials:
        same = np.array_equal(_rgba(t["bodies"][0]), _rgba(t["bodies"][1]))
        assert same == t["sentinel"]


@pytest.mark.browser
@pytest.mark.django_db(transaction=True)
def test_chromium_decodes_the_served_pngs_to_the_stored_pixels(
    chromium_executable, live_server, make_study, new_session, media_root, monkeypatch
):
    """Every image of a session, drawn to a canvas in Chromium, has the stored RGBA pixels."""
    from playwright.sync_api import sync_playwright

    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")  # Playwright's loop on this thread
    study = make_study(trials_per_session=4)
    session = new_session(study)
    state = APIClient().get(f"/api/sessions/{session.token}/").json()
    truth = {t.position: t for t in session.trials.select_related("pair")}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium_executable, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--force-color-profile=srgb"],
        )
        page = browser.new_page()
        page.goto(f"{live_server.url}/api/sessions/{session.token}/")
        for trial in state["trials"]:
            for slot, url in enumerate(trial["images"], start=1):
                rgba = page.evaluate(
                    """async (url) => {
                      const img = new Image();
                      img.src = url;
                      await img.decode();
                      const c = document.createElement("canvas");
                      c.width = img.naturalWidth; c.height = img.naturalHeight;
                      const ctx = c.getContext("2d", {colorSpace: "srgb"});
                      ctx.drawImage(img, 0, 0);
                      return Array.from(ctx.getImageData(0, 0, c.width, c.height).data);
                    }""",
                    url,
                )
                stored = (media_root / truth[trial["position"]].image_path(slot)).read_bytes()
                expected = _rgba(stored)
                assert np.array_equal(np.array(rgba, dtype=np.uint8).reshape(expected.shape),
                                      expected), url
        browser.close()
