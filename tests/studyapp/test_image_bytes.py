"""Served stimulus bytes reveal nothing but their pixels (studyapp.image_tokens).

The probe plays a script that looks only at bytes (sizes, hashes, recurrence, chunk layout)
across several sessions and participants and checks that none of its rules has anything to
go on; the encoder tests check the canonical PNG decodes to exactly the stored pixels.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
import zlib
from collections import Counter
from pathlib import Path

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


class _Fetched:
    """A response as the probe sees it: status, headers, body."""

    def __init__(self, status_code: int, headers: dict, content: bytes) -> None:
        self.status_code, self._headers, self.content = status_code, headers, content

    def items(self):
        return self._headers.items()


def _wsgi_get(app, url: str, method: str = "GET", scheme: str = "http") -> _Fetched:
    """One request through the WSGI callable ``app`` (as gunicorn calls it)."""
    from django.test import RequestFactory

    environ = RequestFactory()._base_environ(
        PATH_INFO=url, REQUEST_METHOD=method, **{"wsgi.url_scheme": scheme}
    )
    started = {}

    def start_response(status, headers, exc_info=None):
        started["status"], started["headers"] = int(status.split()[0]), dict(headers)

    body = b"".join(app(environ, start_response))
    return _Fetched(started["status"], started["headers"], body)


class _FastPathClient:
    """Fetches through :class:`StimulusWSGI` in front of Django, and records who answered."""

    def __init__(self) -> None:
        from django.core.handlers.wsgi import WSGIHandler

        from studyapp.stimulus_server import StimulusWSGI

        self.django_calls = 0
        django = WSGIHandler()

        def counted(environ, start_response):
            self.django_calls += 1
            return django(environ, start_response)

        self.app = StimulusWSGI(counted)

    def get(self, url: str, **kw) -> _Fetched:
        return _wsgi_get(self.app, url, **kw)


def _serve_sessions(study, new_session, n_sessions: int, client=None) -> list[dict]:
    """Every image of ``n_sessions`` fresh sessions, fetched over HTTP, with the truth."""
    client, api = client or Client(), APIClient()
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
@pytest.mark.parametrize("server", ["django view", "wsgi fast path"])
def test_a_bytes_only_probe_has_nothing_to_go_on(make_study, new_session, server):
    """Size, hash, recurrence and layout rules of a cheating script never fire.

    Rules (each right on every applicable trial against the old server, see issue 10):
    "the larger file is the perturbed one"; "equal bytes or Content-Length means a sentinel";
    "an image whose bytes recur elsewhere is the natural one". Both ways of serving are
    probed: the Django view and the WSGI fast path production puts in front of it.
    """
    study = make_study(trials_per_session=6, sentinel_fraction=0.34)
    fast = _FastPathClient() if server == "wsgi fast path" else None
    trials = _serve_sessions(study, new_session, n_sessions=4, client=fast)
    if fast is not None:
        assert fast.django_calls == 0  # every image was answered by the fast path
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


@pytest.mark.django_db
def test_the_fast_path_and_the_view_send_the_same_headers_and_pixels(make_study, new_session):
    study = make_study(trials_per_session=4)
    session = new_session(study)
    url = APIClient().get(f"/api/sessions/{session.token}/").json()["trials"][0]["images"][0]
    fast = _FastPathClient()
    via_fast, via_view = fast.get(url), Client().get(url)
    assert via_fast.status_code == via_view.status_code == 200
    assert fast.django_calls == 0
    assert sorted(via_fast.items()) == sorted(via_view.items())
    assert np.array_equal(_rgba(via_fast.content), _rgba(via_view.content))
    assert via_fast.content != via_view.content  # fresh bytes each time, all the same


@pytest.mark.django_db
def test_the_fast_path_leaves_everything_else_to_django(make_study, new_session, settings):
    """Unknown or tampered keys, other methods and paths, missing files, an HTTPS redirect:
    Django answers them (its 404s, its redirects, its logging), unchanged."""
    study = make_study(trials_per_session=4)
    session = new_session(study)
    state = APIClient().get(f"/api/sessions/{session.token}/").json()
    url = state["trials"][0]["images"][0]
    fast = _FastPathClient()

    tampered = url.rstrip("/")[:-3] + "AAA/"
    other_session = url.replace(session.token, new_session(study).token)
    for bad in (tampered, other_session, "/img/nope/nope/"):
        assert fast.get(bad).status_code == 404
    assert fast.django_calls == 3
    assert fast.get(url, method="HEAD").status_code == 405 and fast.django_calls == 4
    assert fast.get("/api/sessions/unknown/").status_code == 404 and fast.django_calls == 5

    # A stimulus file gone from disk: Django's view logs it and answers 404.
    trial = session.trials.select_related("pair").get(position=0)
    slot_file = trial.pair.natural_path if trial.natural_first else trial.pair.other_path
    from studyapp.stimulus_server import trial_paths

    trial_paths.clear()
    (Path(settings.MEDIA_ROOT) / slot_file).rename(Path(settings.MEDIA_ROOT) / "moved.png")
    assert fast.get(url).status_code == 404 and fast.django_calls == 6

    settings.SECURE_SSL_REDIRECT = True  # DJANGO_SECURE: plain http goes to Django's redirect
    secure = _FastPathClient()  # (Django's middleware reads the setting when it is built)
    assert secure.get(url).status_code == 301 and secure.django_calls == 1


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


def _decode_spy(monkeypatch) -> list[int]:
    """Counts real decodes of stored PNGs (a spy: the real decoder still runs)."""
    from studyapp import stimulus_rows

    decoded: list[int] = []
    original = stimulus_rows.decode_png

    def counting(data):
        decoded.append(len(data))
        return original(data)

    monkeypatch.setattr(stimulus_rows, "decode_png", counting)
    return decoded


def _slot_file(trial, slot: int) -> str:
    return trial.pair.natural_path if (slot == 1) == trial.natural_first else trial.pair.other_path


@pytest.mark.django_db
def test_rows_prepared_before_serving_so_serving_never_decodes(
    make_study, new_session, settings, monkeypatch
):
    """prepare_study decodes every file once; serving then only reads rows (no decode, no
    first-time work), with the stored pixels; an edited file gets fresh rows."""
    from studyapp import stimulus_rows
    from studyapp.stimulus_server import trial_paths

    study = make_study(trials_per_session=6, sentinel_fraction=0.34)
    names = stimulus_rows.stimulus_names(study.pairs.all())
    summary = stimulus_rows.prepare_study(study)
    assert (summary.decoded, summary.ready, summary.failed) == (len(names), 0, [])
    rows_dir = Path(settings.PERCEPTLAB_ROWS_DIR)
    assert len(list(rows_dir.glob("*.rows"))) == len(names) == 9  # 3 natural + 6 perturbed
    again = stimulus_rows.prepare_study(study)  # idempotent: read, not decoded
    assert (again.decoded, again.ready) == (0, len(names))

    decoded = _decode_spy(monkeypatch)
    session = new_session(study)
    state = APIClient().get(f"/api/sessions/{session.token}/").json()
    truth = {t.position: t for t in session.trials.select_related("pair")}
    for trial in state["trials"]:
        for slot, url in enumerate(trial["images"], start=1):
            served = Client().get(url)
            stored = Path(settings.MEDIA_ROOT) / _slot_file(truth[trial["position"]], slot)
            assert np.array_equal(_rgba(served.content), _rgba(stored.read_bytes()))
    assert decoded == []

    # An edited file has a new fingerprint (mtime, size): prepared afresh, served afresh.
    trial = truth[state["trials"][0]["position"]]
    stored = Path(settings.MEDIA_ROOT) / _slot_file(trial, 1)
    edited = np.zeros((96, 96, 3), dtype=np.uint8)
    Image.fromarray(edited).save(stored, format="PNG")
    os.utime(stored, ns=(1, 1))  # a different mtime, whatever the clock's resolution
    assert stimulus_rows.prepare_study(study).decoded == 1 and len(decoded) == 1
    trial_paths.clear()  # (the per-process trial cache holds fingerprints for its TTL)
    served = Client().get(state["trials"][0]["images"][0])
    assert np.array_equal(_rgba(served.content)[..., :3], edited)
    assert len(decoded) == 1


@pytest.mark.django_db
def test_a_host_without_rows_rebuilds_them_on_demand_and_says_so(
    make_study, new_session, settings, tmp_path, caplog
):
    """Another web host starts with an empty rows folder: it decodes from storage while
    serving (correct pixels), writes its own rows, and logs that it should have prepared."""
    from studyapp.stimulus_server import trial_paths

    study = make_study(trials_per_session=4)
    session = new_session(study)
    url = APIClient().get(f"/api/sessions/{session.token}/").json()["trials"][0]["images"][0]
    trial = session.trials.select_related("pair").get(position=0)
    settings.PERCEPTLAB_ROWS_DIR = tmp_path / "other-host-rows"
    trial_paths.clear()
    with caplog.at_level("WARNING", logger="studyapp.stimulus_rows"):
        served = Client().get(url)
    stored = Path(settings.MEDIA_ROOT) / _slot_file(trial, 1)
    assert np.array_equal(_rgba(served.content), _rgba(stored.read_bytes()))
    assert len(list((tmp_path / "other-host-rows").glob("*.rows"))) == 1
    assert "no prepared rows on this host" in caplog.text and "prepare_stimuli" in caplog.text


@pytest.mark.django_db
def test_prepare_lists_files_that_cannot_be_served(make_study, settings, tmp_path):
    """A missing file, a file that is not a PNG, a symlink out of the storage: listed with
    the reason, nothing raised, the other files prepared; serving them answers 404."""
    from studyapp import stimulus_rows

    study = make_study()
    media = Path(settings.MEDIA_ROOT)
    (media / "jnd-demo/large/chelsea.png").unlink()
    (media / "jnd-demo/large/coffee.png").write_bytes(b"GIF89a not a png")
    secret = tmp_path / "secret.png"
    secret.write_bytes(_png(IMAGES["rgb"]))
    (media / "jnd-demo/small/coffee.png").unlink()
    (media / "jnd-demo/small/coffee.png").symlink_to(secret)
    summary = stimulus_rows.prepare_study(study)
    reasons = dict(summary.failed)
    assert summary.decoded == 6 and len(reasons) == 3, summary
    assert reasons["jnd-demo/large/chelsea.png"].startswith("FileNotFoundError")
    assert "signature" in reasons["jnd-demo/large/coffee.png"]
    assert "outside the stimulus storage" in reasons["jnd-demo/small/coffee.png"]
    assert "3 cannot be served" in str(summary)


@pytest.mark.django_db
def test_stimuli_are_read_through_the_storage_api(make_study, new_session, settings):
    """With a storage that has no local paths (Django's InMemoryStorage, standing in for S3),
    the files are prepared and served from the storage; MEDIA_ROOT is not read."""
    import shutil

    from django.core.files.base import ContentFile

    from studyapp import stimulus_rows
    from studyapp.stimulus_server import trial_paths

    study = make_study(trials_per_session=4)
    media = Path(settings.MEDIA_ROOT)
    settings.STORAGES = {
        **settings.STORAGES,
        "default": {"BACKEND": "django.core.files.storage.InMemoryStorage"},
    }
    storage = stimulus_rows.stimulus_storage()
    names = stimulus_rows.stimulus_names(study.pairs.all())
    for name in names:
        storage.save(name, ContentFile((media / name).read_bytes()))
    originals = {name: (media / name).read_bytes() for name in names}
    shutil.rmtree(media)
    media.mkdir()
    trial_paths.clear()
    assert stimulus_rows.prepare_study(study).decoded == len(names)
    session = new_session(study)
    state = APIClient().get(f"/api/sessions/{session.token}/").json()
    truth = {t.position: t for t in session.trials.select_related("pair")}
    for trial in state["trials"]:
        for slot, url in enumerate(trial["images"], start=1):
            served = Client().get(url)
            assert served.status_code == 200
            expected = originals[_slot_file(truth[trial["position"]], slot)]
            assert np.array_equal(_rgba(served.content), _rgba(expected))


@pytest.mark.django_db
def test_generated_pairs_are_prepared_by_the_import(media_root, settings, monkeypatch):
    """generate_pairs' import (services.import_manifest) leaves every stimulus of the study
    prepared: the first serving then decodes nothing."""
    from studyapp import stimulus_rows
    from studyapp.models import Study
    from studyapp.services import GenerateRequest, generate_into_study

    study = Study.objects.create(slug="generated", title="generated")
    request = GenerateRequest(
        specs=("linf:bound=8/255,num_iterations=2",), classifier="resnet18:untrained",
        lpips=("alexnet:untrained",), size=32, max_images=1, sentinels=1, seed=0,
    )
    generate_into_study(study, request, progress=False)
    names = stimulus_rows.stimulus_names(study.pairs.all())
    assert len(names) >= 2
    prepared = {p.name for p in Path(settings.PERCEPTLAB_ROWS_DIR).glob("*.rows")}
    assert prepared == {stimulus_rows.rows_path(stimulus_rows.fingerprint(n)).name
                        for n in names}
    decoded = _decode_spy(monkeypatch)
    assert stimulus_rows.prepare_study(study).ready == len(names) and decoded == []


@pytest.mark.django_db
def test_prepare_stimuli_command(make_study, settings, capsys):
    from django.core.management import CommandError, call_command

    make_study()
    make_study(slug="closed", is_active=False)
    call_command("prepare_stimuli", "--no-progress")
    assert "9 stimulus files ready (9 decoded now" in capsys.readouterr().out
    call_command("prepare_stimuli", "--all", "--no-progress")
    assert "18 stimulus files ready (9 decoded now, 9 already" in capsys.readouterr().out
    with pytest.raises(CommandError, match="no study with slug 'nope'.*closed"):
        call_command("prepare_stimuli", "--study", "nope")
    (Path(settings.MEDIA_ROOT) / "closed/small/chelsea.png").unlink()
    missing = r"(?s)1 stimulus file.*closed/small/chelsea.png: FileNotFoundError"
    with pytest.raises(CommandError, match=missing):
        call_command("prepare_stimuli", "--study", "closed", "--no-progress")


# ------------------------------------------------------------------------------ timing, cold

TIMING_SOURCES, TIMING_VARIANTS, TIMING_SENTINELS = 12, 13, 4  # per source image
TIMING_SESSIONS, TIMING_TRIALS, TIMING_SIZE = 12, 16, 224  # 12 × (12 data + 4 sentinel)


def _timing_study_script(report_path: str) -> None:
    """(Runs in a subprocess, Django set up on a fresh SQLite database.) A study whose natural
    images recur across pairs, as in a real study, with K=1 so every perturbed image is shown
    once; 12 sessions started; writes their image URLs and the truth as JSON. The PNGs are
    written straight to MEDIA_ROOT, without import: nothing is prepared yet."""
    import json

    import django

    django.setup()
    from django.conf import settings
    from django.core.management import call_command
    from skimage import data as skdata

    from studyapp.image_tokens import image_urls
    from studyapp.models import Condition, Pair, Participant, Study
    from studyapp.scheduler import start_session

    call_command("migrate", verbosity=0, interactive=False)
    study = Study.objects.create(
        slug="timing", title="timing", consent_text="", judgments_per_pair=1,
        trials_per_session=TIMING_TRIALS, sentinel_fraction=TIMING_SENTINELS / TIMING_TRIALS,
        catch_fraction=0.0, practice_trials=0,
    )
    condition = Condition.objects.create(
        study=study, threat_model="linf", bound=8 / 255, spec="linf:bound=8/255"
    )
    rng = np.random.default_rng(17)
    photo = skdata.astronaut()  # 512×512: 12 different 224×224 crops
    media = Path(settings.MEDIA_ROOT)
    for s in range(TIMING_SOURCES):
        top, left = 24 * (s // 4), 96 * (s % 4)
        natural = photo[top : top + TIMING_SIZE, left : left + TIMING_SIZE]
        name = f"timing/{s}/natural.png"
        (media / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(natural).save(media / name, format="PNG")
        for v in range(TIMING_VARIANTS):
            bound = rng.choice([2, 4, 8, 16])
            noise = rng.choice([-bound, bound], size=natural.shape)
            other = f"timing/{s}/v{v}.png"
            perturbed = np.clip(natural.astype(int) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(perturbed).save(media / other, format="PNG")
            Pair.objects.create(study=study, condition=condition, key=f"{s}|{v}",
                                source_image=str(s), natural_path=name, other_path=other,
                                width=TIMING_SIZE, height=TIMING_SIZE)
        for j in range(TIMING_SENTINELS):
            Pair.objects.create(study=study, is_sentinel=True, key=f"{s}|sentinel|{j}",
                                source_image=str(s), natural_path=name, other_path=name,
                                width=TIMING_SIZE, height=TIMING_SIZE)
    trials = []
    for i in range(TIMING_SESSIONS):
        session = start_session(Participant.objects.create(study=study, external_id=f"p{i}"))
        rows = list(session.trials.select_related("pair").order_by("position"))
        urls = image_urls(session.token, [t.position for t in rows])
        for t in rows:
            trials.append({
                "urls": urls[t.position],
                "sentinel": t.pair.is_sentinel,
                "perturbed_slot": None if t.pair.is_sentinel else (2 if t.natural_first else 1),
            })
    Path(report_path).write_text(json.dumps(trials))


@pytest.mark.slow
def test_cold_fetch_time_tells_nothing_about_the_perturbed_image_or_sentinels(tmp_path):
    """A freshly started production server (gunicorn + the WSGI fast path, real HTTP): every
    image of 192 trials fetched once, cold (natural images recur across pairs, each
    perturbed image is seen once), in a shuffled order with a random slot first per trial.

    Rules a timing attacker would use: "the slower image of a trial is the perturbed one"
    and "a trial whose images came faster is a sentinel". Each rule's accuracy (AUC) must
    be chance: an exact test (binomial, Mann-Whitney U) does not reject it at the 0.1% family
    level. Before the rows were
    prepared up front, the first serving of a file decoded it and the rules were right about
    80% of the time; run this test with ``PERCEPTLAB_PREPARE_ON_START=0`` in the environment
    to see the server without preparation fail it.
    """
    import http.client
    import json
    import re
    import signal
    import subprocess
    import sys
    import time

    from sklearn.metrics import roc_auc_score

    root = Path(__file__).resolve().parents[2]
    env = {
        k: v for k, v in os.environ.items()
        if not k.startswith(("DJANGO_", "PERCEPTLAB_", "DATABASE_URL"))
    }
    env.update(
        DJANGO_SETTINGS_MODULE="studyapp.settings", DJANGO_SECRET_KEY="timing-test-only",
        PERCEPTLAB_VAR=str(tmp_path / "var"), PYTHONPATH=str(root),
        PERCEPTLAB_PREPARE_ON_START=os.environ.get("PERCEPTLAB_PREPARE_ON_START", "1"),
    )
    truth_path = tmp_path / "trials.json"
    runner = ("import django, runpy, sys; django.setup(); "  # (this module imports models)
              f"runpy.run_path({__file__!r})['_timing_study_script'](sys.argv[1])")
    made = subprocess.run([sys.executable, "-c", runner, str(truth_path)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-3000:]
    trials = json.loads(truth_path.read_text())
    assert len(trials) == TIMING_SESSIONS * TIMING_TRIALS
    assert sum(t["sentinel"] for t in trials) == TIMING_SESSIONS * TIMING_SENTINELS

    log_path = tmp_path / "gunicorn.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "studyapp.wsgi", "-k", "gthread", "-w", "1",
             "--threads", "2", "-b", "127.0.0.1:0", "--timeout", "120"],
            cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        deadline, port = time.monotonic() + 120, None
        while port is None:
            found = re.search(r"Listening at: http://127\.0\.0\.1:(\d+)", log_path.read_text())
            port = int(found.group(1)) if found else None
            assert server.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        conn.request("GET", "/study/timing/")  # answered once the worker has loaded
        conn.getresponse().read()

        order = np.random.default_rng(2017)
        times = np.zeros((len(trials), 2))
        for i in order.permutation(len(trials)):  # interleaved: load hits every kind alike
            slots = (0, 1) if order.random() < 0.5 else (1, 0)
            for slot in slots:
                started = time.perf_counter()
                conn.request("GET", trials[i]["urls"][slot])
                response = conn.getresponse()
                body = response.read()
                times[i, slot] = time.perf_counter() - started
                assert response.status == 200 and body.startswith(b"\x89PNG")
        conn.close()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)

    data = np.array([not t["sentinel"] for t in trials])
    perturbed = np.array([t["perturbed_slot"] or 1 for t in trials])[data] - 1
    rows = np.arange(data.sum())
    slower_is_perturbed = np.sign(times[data][rows, perturbed] - times[data][rows, 1 - perturbed])
    per_trial = times.sum(axis=1)
    from scipy.stats import binomtest, mannwhitneyu

    # Exact tests at a family level of 0.1 % (each rule at 0.05 %): the shuffled fetch order
    # makes the times exchangeable between trial kinds and slots when nothing leaks, so load
    # on the machine cannot fail them. (99.9 % percentile-bootstrap intervals, used before,
    # under-cover at these sizes: a fresh-clone CI run beside the other xdist worker failed
    # with sentinel AUC 0.65 [0.51, 0.78] while the side rule sat at 0.48; Mann-Whitney p for
    # that AUC is about 0.002.)
    alpha = 0.001 / 2
    # "The slower image is the perturbed one": right in a fraction of trials (ties: half).
    accuracy = float(np.mean(slower_is_perturbed + 1) / 2)
    decided = slower_is_perturbed[slower_is_perturbed != 0]
    p_side = binomtest(int((decided > 0).sum()), len(decided), 0.5).pvalue
    # "Faster trials are sentinels": AUC of the trial's total time for telling data trials.
    auc = roc_auc_score(data, per_trial)
    p_sentinel = mannwhitneyu(per_trial[data], per_trial[~data],
                              alternative="two-sided").pvalue
    report = (f"slower-is-perturbed right in {accuracy:.2f} of {data.sum()} trials"
              f" (p {p_side:.2g}); sentinel AUC {auc:.2f} (p {p_sentinel:.2g});"
              f" median fetch {np.median(times) * 1e3:.1f} ms")
    print(report)
    assert p_side >= alpha and p_sentinel >= alpha, report
    # And the mechanism: no image was decoded while being served.
    assert "no prepared rows" not in log_path.read_text()
