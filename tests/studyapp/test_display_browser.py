"""Pixel-exact display (issue 17) in Debian's headless Chromium, against a live server.

The oracle is the screen itself: a screenshot (device pixels) of the first image of a trial,
cropped to the non-background pixels around where the page put it, must equal the served
PNG's pixels replicated n×n (``numpy.kron``), where n is the study's device pixels per image
pixel. The stimulus is black-and-white noise with a red top row, so any resampling (columns
1 or 2 device pixels wide, blended edges, a shift) changes pixels.

Device pixel ratios. Windows at 125 % (or a browser zoom) gives Chromium a real device scale
factor, which ``--force-device-scale-factor`` reproduces: layout and pixel snapping then happen
at device resolution, as on a participant's screen. Playwright's ``device_scale_factor``
emulation is another rendering path: it scales the rendered page like a transform, so at 1.25
no CSS size gives whole device pixels (measured: 0 of 12 positions exact for plain CSS, snapped
positions or a canvas). The first tests use the real scale factor; one test uses the emulation
to show that resampling, when it happens, is detected (the browser reports the image's
device-pixel box) and the session flagged. The zoom watch is tested by changing the emulated
ratio while the page runs (CDP ``Emulation.setDeviceMetricsOverride``).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from studyapp.models import Condition, Judgment, Pair, Session, Study
from studyapp.quality import compute_quality
from tests.studyapp.conftest import write_png

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.django_db(transaction=True)]

SIDE = 64
GREY = 128  # the page's background (#808080)
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--no-first-run", "--disable-sync",
    "--disable-renderer-backgrounding", "--disable-background-timer-throttling",
    "--window-size=1200,900",
]


def noise(seed: int) -> np.ndarray:
    """SIDE×SIDE black-and-white noise, uint8 RGB, with a red first row (no grey pixel)."""
    rng = np.random.default_rng(seed)
    pixels = (rng.integers(0, 2, (SIDE, SIDE, 1)) * 255).repeat(3, axis=2).astype(np.uint8)
    pixels[0] = [255, 0, 0]
    return pixels


@pytest.fixture
def allow_orm_next_to_playwright(monkeypatch):
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")


@pytest.fixture
def display_study(media_root):
    """``display_study(**fields)``: one perturbed noise pair, one main trial, no practice; the
    first image stays 6 s on screen (time for the screenshot on a busy machine)."""

    def make(*, controls: bool = False, **fields) -> Study:
        fields = {"practice_trials": 0, **fields}
        study = Study.objects.create(
            slug="pixels", title="Pixels", trials_per_session=1, sentinel_fraction=0.0,
            first_ms=6000, blank_ms=0, second_ms=50, **fields,
        )
        condition = Condition.objects.create(
            study=study, threat_model="linf", bound=1.0, spec="linf:bound=1", label="flip")
        natural = noise(0)
        other = natural.copy()
        other[SIDE // 2 :, : SIDE // 2] = 255 - other[SIDE // 2 :, : SIDE // 2]
        Pair.objects.create(
            study=study, condition=condition, key="noise|flip", source_image="noise",
            natural_path=write_png(media_root, "pixels/natural.png", natural),
            other_path=write_png(media_root, "pixels/other.png", other),
            width=SIDE, height=SIDE,
        )
        if controls:  # a sentinel and a catch pair (two unrelated noise images)
            unrelated = write_png(media_root, "pixels/unrelated.png", noise(1))
            natural_path = "pixels/natural.png"
            Pair.objects.create(
                study=study, is_sentinel=True, key="noise|sentinel", source_image="noise",
                natural_path=natural_path, other_path=natural_path, width=SIDE, height=SIDE)
            Pair.objects.create(
                study=study, is_catch=True, key="noise|catch", source_image="noise",
                natural_path=natural_path, other_path=unrelated, width=SIDE, height=SIDE)
            # A second perturbed pair at a smaller bound: main trials take it or the other.
            small = Condition.objects.create(
                study=study, threat_model="linf", bound=0.1, spec="linf:bound=0.1", label="s")
            other = natural.copy()
            other[:4, :4] = 255 - other[:4, :4]
            Pair.objects.create(
                study=study, condition=small, key="noise|small", source_image="noise",
                natural_path=natural_path,
                other_path=write_png(media_root, "pixels/small.png", other),
                width=SIDE, height=SIDE)
        return study

    return make


def launch(playwright, chromium_executable, scale: float | None):
    args = list(CHROMIUM_ARGS)
    if scale is not None:
        args.append(f"--force-device-scale-factor={scale}")
    return playwright.chromium.launch(
        executable_path=chromium_executable, headless=True, args=args)


def start(page, live_server, study: Study) -> Session:
    page.goto(f"{live_server.url}/study/{study.slug}/")
    page.get_by_role("button", name="Start").click()
    page.wait_for_url("**/session/*/")
    return Session.objects.get()


def screenshot_first_image(page, *, from_intro: bool = True) -> tuple[np.ndarray, float]:
    """Start the trial (``from_intro``), and screenshot (device pixels) while image 1 is on
    screen; returns the crop of the non-background pixels around it and the device pixel
    ratio."""
    if from_intro:
        page.wait_for_selector("#intro", state="visible")
        page.keyboard.press("Space")
    page.wait_for_selector('img[data-slot="1"].is-visible', state="visible", timeout=30_000)
    shot = np.asarray(Image.open(io.BytesIO(page.screenshot())).convert("RGB"))
    still_shown = page.is_visible('img[data-slot="1"].is-visible')
    left, top, width, height, ratio = page.eval_on_selector(
        'img[data-slot="1"]',
        "img => { const r = img.getBoundingClientRect();"
        " return [r.left, r.top, r.width, r.height, devicePixelRatio]; }")
    assert still_shown, "image 1 was gone before the screenshot finished"
    # Where the page says the image is, widened by 8 device pixels; then the exact extent of
    # what is not background there (so a shifted or blurred image cannot hide).
    x0, y0 = max(int(left * ratio) - 8, 0), max(int(top * ratio) - 8, 0)
    x1, y1 = int((left + width) * ratio) + 9, int((top + height) * ratio) + 9
    region = shot[y0:y1, x0:x1]
    ys, xs = np.nonzero((region != GREY).any(axis=2))
    return region[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1], ratio


def finish(page) -> None:
    page.wait_for_selector("#prompt.is-visible", timeout=30_000)
    page.keyboard.press("f")
    page.wait_for_url("**/done/", timeout=30_000)


def shown_pixels(session: Session) -> np.ndarray:
    """The PNG behind slot 1 of the session's trial, as stored."""
    from django.conf import settings

    trial = session.trials.select_related("pair").get()
    return np.asarray(Image.open(settings.MEDIA_ROOT / trial.image_path(1)).convert("RGB"))


def replicated(pixels: np.ndarray, n: int) -> np.ndarray:
    return np.kron(pixels, np.ones((n, n, 1), dtype=np.uint8))


@pytest.mark.parametrize("ratio,display_scale,n,rescaled", [
    (1, 0, 1, False),      # the image's own CSS size: n = 1
    (1.25, 0, 1, True),    # Windows at 125 %: the nearest whole factor, flagged as rescaled
    (1.25, 1, 1, False),   # the study states n = 1: exact, nothing to flag
    (1.5, 0, 2, True),     # 150 %: nearest whole factor 2, flagged
    (2, 0, 2, False),      # a 200 % screen: n = 2
    (2, 3, 3, False),      # the study states n = 3
], ids=["dpr1", "dpr1.25-nearest", "dpr1.25-n1", "dpr1.5-nearest", "dpr2", "dpr2-n3"])
def test_each_image_pixel_covers_n_by_n_device_pixels(
    live_server, chromium_executable, display_study, allow_orm_next_to_playwright,
    ratio, display_scale, n, rescaled,
):
    from playwright.sync_api import sync_playwright

    study = display_study(display_scale=display_scale, display_rule="nearest")
    with sync_playwright() as playwright:
        browser = launch(playwright, chromium_executable, ratio)
        page = browser.new_context(no_viewport=True).new_page()
        session = start(page, live_server, study)
        crop, page_ratio = screenshot_first_image(page)
        finish(page)
        browser.close()
    assert page_ratio == ratio
    expected = replicated(shown_pixels(session), n)
    assert crop.shape == expected.shape, (crop.shape, expected.shape)
    assert np.array_equal(crop, expected), f"{(crop != expected).any(axis=2).sum()} pixels differ"
    judgment = Judgment.objects.get()
    assert (judgment.display_scale, judgment.device_pixel_ratio, judgment.display_exact) == (
        n, ratio, True)
    (q,) = compute_quality(study)
    assert [f.split(":")[0] for f in q.display_flags] == (["display rescaled"] if rescaled else [])


def test_a_resampled_display_is_detected_and_the_session_flagged(
    live_server, chromium_executable, display_study, allow_orm_next_to_playwright
):
    """Playwright's emulated 1.25 scale resamples every image (see the module docstring): the
    screenshot is not the PNG replicated, the browser's device-pixel box says so, and the
    session is flagged (and excluded, under the study's rule)."""
    from playwright.sync_api import sync_playwright

    study = display_study(display_scale=1, exclude_inexact_display=True)
    with sync_playwright() as playwright:
        browser = launch(playwright, chromium_executable, None)
        page = browser.new_context(
            viewport={"width": 1000, "height": 700}, device_scale_factor=1.25).new_page()
        session = start(page, live_server, study)
        crop, page_ratio = screenshot_first_image(page)
        finish(page)
        browser.close()
    assert page_ratio == 1.25
    expected = replicated(shown_pixels(session), 1)
    assert crop.shape != expected.shape or not np.array_equal(crop, expected)
    judgment = Judgment.objects.get()
    assert (judgment.display_scale, judgment.display_exact) == (1, False)
    (q,) = compute_quality(study)
    assert q.display_flags == [
        "display resampled: 1/1 main trials not drawn at a whole number of device pixels per "
        "image pixel"]
    assert q.excluded


def test_reset_zoom_waits_for_a_whole_ratio_and_a_zoom_change_reshows_the_pair(
    live_server, chromium_executable, display_study, allow_orm_next_to_playwright
):
    from playwright.sync_api import sync_playwright

    study = display_study(display_rule="reset_zoom")
    with sync_playwright() as playwright:
        browser = launch(playwright, chromium_executable, None)
        context = browser.new_context(
            viewport={"width": 1000, "height": 700}, device_scale_factor=1.25)
        page = context.new_page()
        session = start(page, live_server, study)
        page.wait_for_selector("#reset-zoom", state="visible")
        assert "1.25 screen pixels per page pixel" in page.text_content("#reset-zoom")
        assert not page.is_visible("#intro")
        # The participant changes the zoom: the ratio becomes 1 and the study goes on.
        cdp = context.new_cdp_session(page)
        cdp.send("Emulation.setDeviceMetricsOverride", {
            "width": 1000, "height": 700, "deviceScaleFactor": 1, "mobile": False})
        page.wait_for_selector("#intro", state="visible", timeout=20_000)
        assert not page.is_visible("#reset-zoom")
        page.keyboard.press("Space")
        # The zoom changes (to 200 %) while image 1 is on screen: the pair is shown again, at
        # the new ratio's scale (n = 2).
        page.wait_for_selector('img[data-slot="1"].is-visible', timeout=30_000)
        cdp.send("Emulation.setDeviceMetricsOverride", {
            "width": 1000, "height": 700, "deviceScaleFactor": 2, "mobile": False})
        page.wait_for_function(
            "document.getElementById('status').textContent.includes('zoom changed')",
            timeout=20_000)
        # (No screenshot here: Playwright re-applies its own emulated ratio to take one.)
        page.wait_for_selector('img[data-slot="1"].is-visible', timeout=30_000)
        assert page.eval_on_selector(
            'img[data-slot="1"]', "img => img.getBoundingClientRect().width") == SIDE * 2 / 2
        finish(page)
        browser.close()
    session.refresh_from_db()
    assert session.client_info["zoom_changes"] >= 2
    judgment = Judgment.objects.get()
    # (display_exact is not asserted: under emulation the browser reports CSS pixels as its
    # device-pixel box, see the module docstring.)
    assert (judgment.display_scale, judgment.device_pixel_ratio) == (2, 2)


def test_refuse_stops_before_any_session_and_the_runner_refuses_too(
    live_server, chromium_executable, display_study, allow_orm_next_to_playwright
):
    from playwright.sync_api import sync_playwright

    from studyapp.models import Participant
    from studyapp.scheduler import start_session

    study = display_study(display_rule="refuse")
    # A session started on another screen, then opened on this one (e.g. a link reopened).
    session = start_session(Participant.objects.create(study=study, external_id="moved"))
    with sync_playwright() as playwright:
        browser = launch(playwright, chromium_executable, 1.5)
        page = browser.new_context(no_viewport=True).new_page()
        page.goto(f"{live_server.url}/study/{study.slug}/")
        page.wait_for_selector("#display-refused", state="visible")
        assert "cannot be shown exactly" in page.text_content("#display-refused")
        assert page.locator("form, button").count() == 0  # nothing to start
        page.goto(f"{live_server.url}/session/{session.token}/")
        page.wait_for_selector("#runner[data-step='display-refused']", state="attached")
        page.wait_for_function("!!document.querySelector('#display-refused').offsetParent")
        page.wait_for_timeout(500)
        assert not page.is_visible("#intro") and not page.is_visible("#status.error")
        browser.close()
    assert Session.objects.count() == 1  # the landing page created none
    session.refresh_from_db()
    assert session.client_info["display_refused"] is True
    assert session.client_info["device_pixel_ratio"] == 1.5
    assert Judgment.objects.count() == 0
    # The same study on a 200 % screen starts as usual.
    with sync_playwright() as playwright:
        browser = launch(playwright, chromium_executable, 2)
        page = browser.new_context(no_viewport=True).new_page()
        page.goto(f"{live_server.url}/study/{study.slug}/")
        assert page.get_by_role("button", name="Start").is_visible()
        assert not page.is_visible("#display-refused")
        browser.close()


def test_touch_only_devices_are_refused_with_a_clear_page(
    live_server, chromium_executable, display_study, allow_orm_next_to_playwright
):
    from playwright.sync_api import sync_playwright

    study = display_study()
    with sync_playwright() as playwright:
        browser = launch(playwright, chromium_executable, None)
        phone = browser.new_context(
            viewport={"width": 390, "height": 844}, device_scale_factor=3, is_mobile=True,
            has_touch=True)
        page = phone.new_page()
        page.goto(f"{live_server.url}/study/{study.slug}/")
        page.wait_for_selector("#touch-only", state="visible")
        assert "needs a computer with a keyboard" in page.text_content("#touch-only")
        assert page.locator("form, button").count() == 0  # nothing to start
        assert Session.objects.count() == 0
        # A session link opened on the phone (started elsewhere) is refused by the runner too.
        desktop = browser.new_context(viewport={"width": 1000, "height": 700}).new_page()
        session = start(desktop, live_server, study)
        desktop.close()
        page.goto(f"{live_server.url}/session/{session.token}/")
        page.wait_for_selector("#runner[data-step='touch-only'] #touch-only", state="visible")
        assert not page.is_visible("#intro")
        browser.close()


def test_the_different_example_is_the_studys_own_pair_drawn_pixel_exact(
    live_server, chromium_executable, display_study, allow_orm_next_to_playwright
):
    """The instructions' "different" example is the study's perturbed pair at its largest
    bound (not the catch pair of two unrelated images), drawn like the trials: at device scale
    factor 2, each image pixel is a 2×2 block."""
    from playwright.sync_api import sync_playwright

    study = display_study(controls=True, practice_trials=3)  # 1 same, example, catch
    # The largest-bound pair has its K judgments, so the main trial takes the other one and
    # the largest-bound pair is free to be the example.
    Pair.objects.filter(key="noise|flip").update(n_assigned=study.judgments_per_pair)
    with sync_playwright() as playwright:
        browser = launch(playwright, chromium_executable, 2)
        page = browser.new_context(no_viewport=True).new_page()
        session = start(page, live_server, study)
        page.wait_for_selector("#intro", state="visible")
        selector = '.example[data-answer="different"] img'
        page.wait_for_function(
            f"[...document.querySelectorAll('{selector}')].every(i => i.complete &&"
            " i.naturalWidth && i.style.width)")
        state = page.context.request.get(
            f"{live_server.url}/api/sessions/{session.token}/").json()
        shown = page.eval_on_selector_all(
            selector, "imgs => imgs.map(i => new URL(i.src).pathname)")
        shot = np.asarray(Image.open(io.BytesIO(page.screenshot())).convert("RGB"))
        rects = page.eval_on_selector_all(selector, "imgs => imgs.map(i => {"
                                          " const r = i.getBoundingClientRect();"
                                          " return [r.left, r.top, r.width, r.height]; })")
        browser.close()
    (example,) = [t for t in state["trials"] if t.get("example")]
    assert shown == example["images"]
    trial = session.trials.select_related("pair__condition").get(position=example["position"])
    assert trial.is_practice and trial.pair.key == "noise|flip"  # the largest bound (1.0)
    from django.conf import settings

    for slot, (left, top, width, height) in enumerate(rects, start=1):
        assert (width * 2, height * 2) == (SIDE * 2, SIDE * 2)
        png = np.asarray(Image.open(settings.MEDIA_ROOT / trial.image_path(slot)).convert("RGB"))
        x, y = round(left * 2), round(top * 2)
        assert np.array_equal(shot[y : y + SIDE * 2, x : x + SIDE * 2], replicated(png, 2))
