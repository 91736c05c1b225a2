"""Whole sessions in Debian's headless Chromium, driven by Playwright against a live server.

Two scenarios, each one test so that the browser and the study are set up once:

- an MTurk worker: HIT preview (no start, nothing written), a forged turkSubmitTo (400), then
  the accepted HIT: consent, a window too small for the stimulus (message, then resized),
  instructions with example pairs, practice with feedback, main trials (durations checked
  against what a MutationObserver saw on screen, one answer lost on the way back and
  re-sent), and the end page's form POST to MTurk, intercepted;
- a Prolific participant over 40 main trials: the network cut for a few trials and restored,
  cut again and the page reloaded while answers are still unacknowledged (it resumes at the
  next unanswered trial and re-sends them), a break, every judgment stored exactly once, the
  redirect to Prolific with the study's code, and frame-accurate presentation: every phase
  ends at the first frame it was due (see *Frames shown against frames intended* below).

**Frames shown against frames intended** (issue 17). The old check, the 99th percentile of
|measured − intended| within one frame, failed on a loaded machine (p99 27 ms): Chromium
then produces fewer frames, and a phase lasts until the next frame there is, however well the
runner does. What the runner controls, and what this test asserts, holds under any load:

- every rAF frame timestamp of the page is recorded (a rAF loop of the test's own: all
  callbacks of a frame get the same timestamp), so the stored ``first_ms``, ``blank_ms`` and
  ``second_ms`` of each trial must be differences of actual frame timestamps ``a < b``: the
  runner's record is the screen's frames, not a timer's wish;
- the phase ended at the *first frame it was due*: ``b − a ≥ intended − frame/2`` and the
  frame before ``b`` came earlier than that; so a phase is never cut short, and it overruns
  only by the frames the browser did not produce (counted and printed: frames shown against
  frames intended, with the overrun percentiles for information).

A late switch by the runner (a timer, a skipped frame it could have used) or a short phase
fails these on a quiet machine and on a busy one alike; a machine too busy to draw frames does
not.
"""

from __future__ import annotations

import json
from urllib.parse import parse_qs, urlencode, urlsplit

import numpy as np
import pytest

from studyapp.models import Judgment, Participant, Session, Trial

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.django_db(transaction=True)]

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-quic",
    "--disable-renderer-backgrounding",
    "--disable-background-timer-throttling",
    "--disable-backgrounding-occluded-windows",
]
# A MutationObserver sees a switch when the frame's callbacks run, which on a loaded machine
# can lag the frame's timestamp by tens of ms; it witnesses the order and rough timing of what
# was on screen, and the exact check is against the frame timestamps (FrameRecord).
OBSERVER_SLACK_MS = 100
MTURK_SANDBOX = "https://workersandbox.mturk.com"

# Reports every change of what is visible in the stimulus area and the prompt to the test as
# recordShown(time (performance.now()), element ("fixation", "img1", "img2", "prompt"), visible).
RECORD_VISIBILITY = """
new MutationObserver((mutations) => {
  const t = performance.now();
  for (const m of mutations) {
    const el = m.target;
    const name = el.dataset && el.dataset.slot ? "img" + el.dataset.slot : el.id;
    if (["fixation", "img1", "img2", "prompt"].includes(name)) {
      window.recordShown(t, name, el.classList.contains("is-visible"));
    }
  }
}).observe(document, {subtree: true, attributes: true, attributeFilter: ["class"]});
new PerformanceObserver((list) => {
  for (const entry of list.getEntries()) {
    if (entry.name.includes("/img/")) window.recordImage(entry.responseEnd, entry.name);
  }
}).observe({type: "resource", buffered: true});
"""


# Every frame's rAF timestamp, and when image 1 appeared, on one clock across reloads
# (performance.timeOrigin + the page's own time), sent to the test in batches with the
# runner's frame interval (the one its switching rule uses).
RECORD_FRAMES = """
(() => {
  const origin = performance.timeOrigin;
  let frames = [];
  const tick = (t) => { frames.push(origin + t); requestAnimationFrame(tick); };
  requestAnimationFrame(tick);
  const flush = () => {
    const runner = document.getElementById("runner");  // the runner's frame interval
    const frameMs = Number((runner && runner.dataset.frameMs) || 0);
    if (frames.length) { window.recordFrames(origin, frameMs, frames); frames = []; }
  };
  setInterval(flush, 200);
  new MutationObserver((mutations) => {
    const t = performance.now();
    for (const m of mutations) {
      const el = m.target;
      if (el.dataset && el.dataset.slot === "1" && el.classList.contains("is-visible")) {
        window.recordImage1(origin + t);
        flush();
      }
    }
  }).observe(document, {subtree: true, attributes: true, attributeFilter: ["class"]});
})();
"""


class FrameRecord:
    """What RECORD_FRAMES sent: frame timestamps per document, and image-1 onsets."""

    def __init__(self, page):
        self.frames: dict[float, list[float]] = {}
        self.frame_ms: dict[float, float] = {}
        self.onsets: list[float] = []
        page.expose_function("recordFrames", self._frames)
        page.expose_function("recordImage1", lambda t: self.onsets.append(t))
        page.add_init_script(RECORD_FRAMES)

    def _frames(self, origin: float, frame_ms: float, frames: list[float]) -> None:
        self.frames.setdefault(origin, []).extend(frames)
        if frame_ms:
            self.frame_ms[origin] = frame_ms

    def presentation(self, onset: float, durations: list[float], tol: float = 0.01):
        """``(document origin, frame ticks, [i0, i1, i2, i3])``: the frames (as indices into
        the document's ticks) at which image 1, the blank, image 2 and the prompt started, such
        that their differences are ``durations`` (each within ``tol`` ms), the image-1 frame
        the latest such one at or before ``onset`` (when a MutationObserver saw image 1), or
        ``None`` when no frames fit (the stored durations are no frame differences)."""
        import bisect

        for origin, ticks in self.frames.items():
            ticks = sorted(ticks)
            if not ticks or not ticks[0] <= onset <= ticks[-1] + 1:
                continue
            best = None
            for i0 in range(bisect.bisect_right(ticks, onset + 0.5) - 1, -1, -1):
                if ticks[i0] < onset - 2000:
                    break
                found = [i0]
                for d in durations:
                    t = ticks[found[-1]] + d
                    j = bisect.bisect_left(ticks, t - tol)
                    if j < len(ticks) and abs(ticks[j] - t) <= tol:
                        found.append(j)
                    else:
                        break
                if len(found) == 4:
                    best = found
                    break
            if best is not None:
                return origin, ticks, best
        return None


def visible_sequence(events: list) -> list[tuple[float, frozenset]]:
    """Collapse the recorded events into (time, what is visible) after each change."""
    visible: set[str] = set()
    states: list[tuple[float, frozenset]] = []
    for t, name, on in events:
        (visible.add if on else visible.discard)(name)
        if states and abs(states[-1][0] - t) < 1:  # same frame: one change
            states[-1] = (states[-1][0], frozenset(visible))
        else:
            states.append((t, frozenset(visible)))
    return [s for i, s in enumerate(states) if i == 0 or s[1] != states[i - 1][1]]


@pytest.fixture
def browser(chromium_executable, tmp_path):
    """Chromium at a raised CPU priority (nice -10) where the OS allows it.

    A participant's browser is the foreground application of an otherwise quiet computer; a
    shared test machine may run a dozen other busy processes, and Chromium then misses frames
    that no page could keep. The raised priority keeps the timing measurement about the trial
    runner, not about the neighbours. Without the privilege, ``nice`` says so on stderr and
    starts Chromium at normal priority.
    """
    from playwright.sync_api import sync_playwright

    launcher = tmp_path / "chromium-nice"
    launcher.write_text(f'#!/bin/sh\nexec nice -n -10 "{chromium_executable}" "$@"\n')
    launcher.chmod(0o755)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(launcher), headless=True, args=CHROMIUM_ARGS
        )
        yield browser
        browser.close()


@pytest.fixture
def allow_orm_next_to_playwright(monkeypatch):
    # Playwright's sync API keeps an asyncio loop on this thread, which Django's async-safety
    # check mistakes for async code; the ORM calls here are plain synchronous test code.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")


class Watcher:
    """Console messages and judgment POSTs (position, idempotency key) of one page."""

    def __init__(self, page):
        self.console: list[str] = []
        self.posted: list[tuple[int, str]] = []
        page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        page.on("pageerror", lambda e: self.console.append(f"pageerror: {e}"))
        page.on("request", self._request)

    def _request(self, request):
        if request.method == "POST" and request.url.endswith("/judgments/"):
            body = request.post_data_json
            self.posted.append((body["position"], body["idempotency_key"]))

    def errors(self, *expected: str) -> list[str]:
        """Console errors other than lines containing one of ``expected``."""
        return [
            line for line in self.console
            if line.startswith(("error", "pageerror")) and not any(e in line for e in expected)
        ]


def next_screen(page) -> str:
    """Wait for the answer prompt or a pause panel; return ``"prompt"`` or ``"panel"``."""
    page.wait_for_selector("#prompt.is-visible, #panel.is-visible", timeout=20_000)
    return "prompt" if page.is_visible("#prompt.is-visible") else "panel"


def answer(page, key: str) -> None:
    assert next_screen(page) == "prompt", page.text_content("#panel-text")
    page.keyboard.press(key)
    page.wait_for_selector("#prompt:not(.is-visible)", state="attached")


def continue_after(page, *words: str) -> str:
    """Expect a pause panel containing every word; press space; return its text."""
    assert next_screen(page) == "panel"
    text = page.text_content("#panel-text")
    assert all(w in text for w in words), text
    page.keyboard.press("Space")
    page.wait_for_selector("#panel:not(.is-visible)", state="attached")
    return text


def db_counts() -> tuple[int, int, int]:
    return Participant.objects.count(), Session.objects.count(), Judgment.objects.count()


def test_an_mturk_worker_previews_accepts_and_submits_the_hit(
    live_server, browser, make_study, allow_orm_next_to_playwright
):
    study = make_study(
        trials_per_session=3, sentinel_fraction=0.34, practice_trials=2, catch_pairs=2,
        consent_text="You agree that your answers are stored anonymously.",
        first_ms=300, second_ms=300,  # (CI time; switches are checked against these)
    )
    base = f"{live_server.url}/study/{study.slug}/"
    page = browser.new_page(viewport={"width": 200, "height": 200})
    watch = Watcher(page)
    events: list[tuple[float, str, bool]] = []
    page.expose_function("recordShown", lambda t, name, on: events.append((t, name, on)))
    loaded: dict[str, float] = {}  # image URL → when its bytes arrived
    page.expose_function("recordImage", lambda t, url: loaded.setdefault(urlsplit(url).path, t))
    page.add_init_script(RECORD_VISIBILITY)
    record = FrameRecord(page)

    # Preview: instructions and examples, no way to start, nothing written.
    preview = {"assignmentId": "ASSIGNMENT_ID_NOT_AVAILABLE", "hitId": "HIT1",
               "turkSubmitTo": MTURK_SANDBOX}
    assert page.goto(f"{base}?{urlencode(preview)}").status == 200
    assert "Accept the HIT" in page.text_content("#preview-notice")
    assert page.locator("form, button").count() == 0
    assert page.locator(".example img").count() == 4
    # A link whose turkSubmitTo is not MTurk is refused, before anything is written.
    forged = {"assignmentId": "A1", "hitId": "HIT1", "workerId": "W1",
              "turkSubmitTo": "https://evil.example"}
    refused = page.goto(f"{base}?{urlencode(forged)}")
    assert refused.status == 400 and "turkSubmitTo" in page.text_content("main")
    assert db_counts() == (0, 0, 0)

    # The first judgment reaches the server but its answer is lost on the way back: the page
    # must retry with the same idempotency key, and the server must not store it twice.
    losses: list[int] = []

    def lose_first_answer(route):
        if not losses:
            losses.append(route.request.post_data_json["position"])
            route.fetch()
            route.abort("connectionreset")
        else:
            route.continue_()

    page.route("**/api/sessions/*/judgments/", lose_first_answer)
    submitted: list[dict] = []

    def mturk(route):
        # What MTurk would receive, and whether the server held everything at that moment.
        session = Session.objects.get()
        submitted.append({
            "url": route.request.url, "method": route.request.method,
            "form": parse_qs(route.request.post_data or ""),
            "completed": session.completed_at is not None,
            "judgments": Judgment.objects.filter(trial__session=session).count(),
        })
        route.fulfill(status=200, content_type="text/html", body="<p>HIT submitted</p>")

    page.route(f"{MTURK_SANDBOX}/**", mturk)

    accepted = {"assignmentId": "ASSIGN1", "hitId": "HIT1", "workerId": "WORKER1",
                "turkSubmitTo": MTURK_SANDBOX}
    page.goto(f"{base}?{urlencode(accepted)}")
    assert "stored anonymously" in page.text_content(".consent")
    assert db_counts() == (0, 0, 0)
    page.get_by_role("button", name="I agree").click()
    page.wait_for_url("**/session/*/")
    session = Session.objects.select_related("participant").get()
    assert (session.participant.source, session.participant.external_id) == ("mturk", "WORKER1")
    assert (session.assignment_id, session.hit_id, session.turk_submit_to) == (
        "ASSIGN1", "HIT1", MTURK_SANDBOX)
    assert session.user_agent.startswith("Mozilla/5.0") and session.ip_hash

    # 200×200 cannot hold a 96×96 stimulus with the prompt: a message, until it is resized.
    page.wait_for_selector("#too-small", state="visible")
    assert "96 × 96" in page.text_content("#too-small") and "200 × 200" in page.text_content(
        "#too-small")
    assert not page.is_visible("#intro")
    page.set_viewport_size({"width": 1024, "height": 768})
    page.wait_for_selector("#intro", state="visible")
    assert not page.is_visible("#too-small")
    # The examples are a practice pair of each kind, through opaque per-session image URLs.
    page.wait_for_function(
        "[...document.querySelectorAll('.example img')].every(i => i.complete && i.naturalWidth)")
    examples = page.eval_on_selector_all(
        ".example img", "imgs => imgs.map(i => [new URL(i.src).pathname, i.naturalWidth])")
    assert all(path.startswith(f"/img/{session.token}/") and w == 96 for path, w in examples)
    assert "2 practice pairs" in page.text_content("#intro-practice")
    page.keyboard.press("Space")

    trials = {t.position: t for t in Trial.objects.filter(session=session).select_related("pair")}
    assert [p for p, t in trials.items() if t.is_practice] == [0, 1]
    pressed: dict[int, str] = {}
    for position in (0, 1):  # practice: feedback says what the pair was
        truth = "same" if trials[position].pair.is_sentinel else "different"
        key = "f" if position == 0 else "j"
        assert next_screen(page) == "prompt"
        assert page.text_content("#progress") == f"Practice pair {position + 1} of 2"
        answer(page, key)
        pressed[position] = {"f": "same", "j": "different"}[key]
        page.wait_for_selector("#feedback.is-visible")
        feedback = page.text_content("#feedback")
        verdict = "Correct" if pressed[position] == truth else "Not quite"
        assert feedback == f"{verdict}: they were {'the same' if truth == 'same' else 'different'}."
    continue_after(page, "practice is over")
    for i, position in enumerate((2, 3, 4)):
        assert next_screen(page) == "prompt"
        assert page.text_content("#progress") == f"Pair {i + 1} of 3"
        if i == 2:  # the buttons work too
            page.get_by_role("button", name="Same").click()
            pressed[position] = "same"
        else:
            answer(page, "j")
            pressed[position] = "different"
    page.wait_for_url(f"{MTURK_SANDBOX}/mturk/externalSubmit", timeout=20_000)

    session.refresh_from_db()
    assert session.completed_at is not None, watch.console
    assert len(submitted) == 1, submitted
    post = submitted[0]
    assert post["method"] == "POST" and post["completed"] and post["judgments"] == 5
    assert post["form"] == {"assignmentId": ["ASSIGN1"], "completion_code": [
        session.completion_code]}
    judgments = {
        j.trial.position: j
        for j in Judgment.objects.filter(trial__session=session).select_related("trial")
    }
    assert {p: j.response for p, j in judgments.items()} == pressed
    # The lost answer was re-sent once with the same key and stored once.
    keys = [k for p, k in watch.posted if p == losses[0]]
    assert len(keys) == 2 and keys[0] == keys[1] == judgments[losses[0]].idempotency_key

    # What was on screen in each main trial: fixation, image 1, blank, image 2, prompt, never two
    # at once, both images loaded before the fixation, and the switches (seen by a
    # MutationObserver) agree with the stored durations, which are differences of the page's
    # frame timestamps (exactly: the frames the images were up, whatever the machine's load).
    shown = visible_sequence(events)
    phases = [{"fixation"}, {"img1"}, set(), {"img2"}, {"prompt"}, set()]
    assert [set(v) for _, v in shown] == phases * 5
    state = page.context.request.get(f"{live_server.url}/api/sessions/{session.token}/").json()
    for position in (2, 3, 4):
        j = judgments[position]
        times = [t for t, _ in shown[position * len(phases) : (position + 1) * len(phases)]]
        observed = [times[2] - times[1], times[3] - times[2], times[4] - times[3]]
        stored = [j.first_ms, j.blank_ms, j.second_ms]
        assert all(abs(o - s) <= OBSERVER_SLACK_MS for o, s in zip(observed, stored, strict=True))
        assert any(record.presentation(t, stored) for t in record.onsets), (position, stored)
        urls = state["trials"][position]["images"]
        assert all(loaded[url] < times[0] for url in urls)

    info = session.client_info
    assert (info["window_width"], info["window_height"]) == (1024, 768)
    assert info["device_pixel_ratio"] == 1 and 20 <= info["refresh_hz"] <= 250, info
    assert not watch.errors("net::ERR_CONNECTION_RESET", "status of 400"), watch.console


def test_a_prolific_session_survives_network_loss_and_a_reload_with_frame_accurate_timing(
    live_server, browser, make_study, allow_orm_next_to_playwright
):
    n_main, n_practice = 40, 2
    study = make_study(
        # 14 conditions × 3 photos = 42 data pairs, 3 sentinels (some used for practice)
        conditions=[("linf", k / 255, f"b{k}") for k in range(4, 32, 2)],
        trials_per_session=n_main, sentinel_fraction=0.05, practice_trials=n_practice,
        break_every=25, prolific_completion_code="C0DE-42",
        # shorter images than the default 1000 ms keep 42 presentations within CI's time;
        # frames are checked against the study's own durations, whatever they are (300 ms is
        # 18 frames at 60 Hz; every check is per frame)
        first_ms=300, second_ms=300,
    )
    page = browser.new_page(viewport={"width": 1024, "height": 768})
    watch = Watcher(page)
    record = FrameRecord(page)
    redirected: list[str] = []

    def prolific(route):
        redirected.append(route.request.url)
        route.fulfill(status=200, content_type="text/html", body="<p>Prolific</p>")

    page.route("https://app.prolific.com/**", prolific)
    params = {"PROLIFIC_PID": "5f1a2b3c4d5e6f7a8b9c0d1e", "STUDY_ID": "S1", "SESSION_ID": "X1"}
    page.goto(f"{live_server.url}/study/{study.slug}/?{urlencode(params)}")
    page.get_by_role("button", name="Start").click()
    page.wait_for_url("**/session/*/")
    session = Session.objects.select_related("participant").get()
    assert (session.participant.source, session.participant.external_id) == (
        "prolific", params["PROLIFIC_PID"])
    assert (session.external_study_id, session.external_session_id) == ("S1", "X1")
    page.wait_for_selector("#intro", state="visible")
    page.keyboard.press("Space")

    def buffered() -> list[int]:
        raw = page.evaluate(f"localStorage.getItem('perceptlab:v1:judgments:{session.token}')")
        return sorted(j["position"] for j in json.loads(raw)["judgments"]) if raw else []

    pressed: dict[int, str] = {}

    def answer_main(index: int) -> None:
        assert next_screen(page) == "prompt"
        assert page.text_content("#progress") == f"Pair {index + 1} of {n_main}"
        key = "f" if index % 3 == 0 else "j"
        answer(page, key)
        pressed[n_practice + index] = {"f": "same", "j": "different"}[key]

    for position in range(n_practice):
        answer(page, "f")
        pressed[position] = "same"
    continue_after(page, "practice is over")
    for index in range(0, 5):
        answer_main(index)

    # Network cut for three trials, then back: the answers wait in the buffer and go out later.
    page.route("**/api/**", lambda route: route.abort())
    for index in range(5, 8):
        answer_main(index)
    assert buffered() == [n_practice + i for i in range(5, 8)]
    page.unroute("**/api/**")
    for index in range(8, 12):
        answer_main(index)
    page.wait_for_function(
        f"!localStorage.getItem('perceptlab:v1:judgments:{session.token}')", timeout=30_000)
    assert Judgment.objects.filter(trial__session=session).count() == n_practice + 12

    # Cut again, answer three, and reload while they are still unacknowledged: the page comes
    # back (waiting for the network), counts them as answered, re-sends them and goes on with
    # the next unanswered trial.
    page.route("**/api/**", lambda route: route.abort())
    for index in range(12, 15):
        answer_main(index)
    unacknowledged = [n_practice + i for i in range(12, 15)]
    assert buffered() == unacknowledged
    page.reload()
    page.wait_for_timeout(1500)
    assert buffered() == unacknowledged
    page.unroute("**/api/**")
    continue_after(page, "Welcome back")
    for index in range(15, n_main):
        if index == 25:
            continue_after(page, "short break", f"25 of {n_main}")
        answer_main(index)
    page.wait_for_url("https://app.prolific.com/**", timeout=30_000)

    assert redirected == ["https://app.prolific.com/submissions/complete?cc=C0DE-42"]
    session.refresh_from_db()
    assert session.completed_at is not None
    judgments = list(
        Judgment.objects.filter(trial__session=session).select_related("trial")
        .order_by("trial__position")
    )
    # Every trial answered exactly once, with the key the page first sent for it.
    assert [j.trial.position for j in judgments] == list(range(n_practice + n_main))
    assert {j.trial.position: j.response for j in judgments} == pressed
    first_key: dict[int, str] = {}
    for position, key in watch.posted:
        first_key.setdefault(position, key)
        assert key == first_key[position], f"trial {position} was sent under two keys"
    assert {j.trial.position: j.idempotency_key for j in judgments} == first_key
    assert all(watch.posted.count((p, first_key[p])) >= 2 for p in unacknowledged)

    # Frames shown against frames intended (module docstring). Image-1 onsets in order: the
    # practice and main trials, plus the one cut short by the reload (no full presentation).
    main = [j for j in judgments if not j.trial.is_practice]
    assert len(main) >= 40
    intended = [study.first_ms, study.blank_ms, study.second_ms]
    onsets = sorted(record.onsets)
    overrun, shown_vs_intended, late = [], [], []
    k = 0  # trials are presented in position order: match each to the next onset that fits
    for j in judgments:
        stored = [j.first_ms, j.blank_ms, j.second_ms]
        found = None
        while found is None and k < len(onsets):
            found = record.presentation(onsets[k], stored)
            k += 1
        assert found is not None, (
            f"trial {j.trial.position}: stored durations {stored} are no differences of the "
            "page's frame timestamps")
        if j.trial.is_practice:
            continue
        origin, ticks, (i0, i1, i2, i3) = found
        frame_ms = record.frame_ms[origin]
        for (a, b), want, got in zip([(i0, i1), (i1, i2), (i2, i3)], intended, stored,
                                     strict=True):
            elapsed = ticks[b] - ticks[a]
            assert elapsed >= want - frame_ms / 2 - 0.01, (j.trial.position, want, got)
            if ticks[b - 1] - ticks[a] >= want - frame_ms / 2 + 0.01:  # due a frame earlier
                late.append((j.trial.position, want, got, ticks[b - 1] - ticks[a]))
            overrun.append(got - want)
            shown_vs_intended.append((b - a, round(want / frame_ms)))
    dropped = sum(1 for shown, want in shown_vs_intended if shown < want)
    errors = np.abs(overrun)
    print(
        f"\n{len(main)} main trials, {len(shown_vs_intended)} phases: frames shown = intended "
        f"in {len(shown_vs_intended) - dropped}, fewer (frames the browser did not draw) in "
        f"{dropped}; |measured - intended| p50 {np.percentile(errors, 50):.2f} ms, p99 "
        f"{np.percentile(errors, 99):.2f} ms (information only: load-dependent)"
    )
    assert late == [], f"phases that ended a frame late: {late[:5]}"
    assert not watch.errors("net::ERR_FAILED"), watch.console
