"""A whole session in Debian's headless Chromium, driven by Playwright against a live server."""

from __future__ import annotations

import pytest

from studyapp.models import Judgment, Session

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.django_db(transaction=True)]

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-quic",
]
FRAME_TOLERANCE_MS = 17  # one frame at 60 Hz

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
    const match = entry.name.match(/\\/image\\/(\\d+)\\/(\\d)\\/$/);
    if (match) window.recordImage(entry.responseEnd, Number(match[1]), Number(match[2]));
  }
}).observe({type: "resource", buffered: true});
"""


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
def browser(chromium_executable):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium_executable, headless=True, args=CHROMIUM_ARGS
        )
        yield browser
        browser.close()


@pytest.fixture
def allow_orm_next_to_playwright(monkeypatch):
    # Playwright's sync API keeps an asyncio loop on this thread, which Django's async-safety
    # check mistakes for async code; the ORM calls here are plain synchronous test code.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")


def test_a_participant_completes_a_session(
    live_server, browser, make_study, allow_orm_next_to_playwright
):
    study = make_study(trials_per_session=5, sentinel_fraction=0.2)
    page = browser.new_page(viewport={"width": 1024, "height": 768})
    console: list[str] = []
    page.on("console", lambda message: console.append(f"{message.type}: {message.text}"))
    page.on("pageerror", lambda error: console.append(f"pageerror: {error}"))
    events: list[tuple[float, str, bool]] = []
    page.expose_function("recordShown", lambda t, name, on: events.append((t, name, on)))
    loaded: dict[tuple[int, int], float] = {}  # (position, slot) → when its bytes arrived
    page.expose_function("recordImage", lambda t, pos, slot: loaded.setdefault((pos, slot), t))
    page.add_init_script(RECORD_VISIBILITY)

    # The first judgment reaches the server, but its answer is lost on the way back: the page
    # must retry with the same idempotency key, and the server must not store it twice.
    judgment_posts: list[str] = []

    def lose_first_answer(route):
        judgment_posts.append(route.request.post_data_json["idempotency_key"])
        if len(judgment_posts) == 1:
            route.fetch()
            route.abort("connectionreset")
        else:
            route.continue_()

    page.route("**/api/sessions/*/judgments/", lose_first_answer)

    page.goto(f"{live_server.url}/study/{study.slug}/")
    page.get_by_role("button", name="Start").click()
    page.wait_for_url("**/session/*/")
    token = page.url.rstrip("/").rsplit("/", 1)[-1]
    session = Session.objects.get(token=token)
    assert session.user_agent.startswith("Mozilla/5.0")

    page.wait_for_selector("#begin:enabled")
    page.keyboard.press("Space")
    pressed = {}
    for position in range(study.trials_per_session):
        page.wait_for_selector("#prompt.is-visible", timeout=15_000)
        if position == study.trials_per_session - 1:  # the buttons work too
            page.get_by_role("button", name="Same").click()
            pressed[position] = "same"
        else:
            key = "f" if position in (0, 3) else "j"
            page.keyboard.press(key)
            pressed[position] = {"f": "same", "j": "different"}[key]
        page.wait_for_selector("#prompt:not(.is-visible)", state="attached")
    page.wait_for_url("**/done/", timeout=15_000)
    shown = visible_sequence(events)
    shown_code = page.text_content("#completion-code").strip()

    session.refresh_from_db()
    assert session.completed_at is not None, console
    assert shown_code == session.completion_code
    judgments = list(
        Judgment.objects.filter(trial__session=session).select_related("trial__pair")
        .order_by("trial__position")
    )
    assert len(judgments) == study.trials_per_session
    assert len(judgment_posts) == study.trials_per_session + 1  # one retry
    assert judgment_posts[0] == judgment_posts[1]
    assert {j.trial.position: j.response for j in judgments} == pressed
    assert sum(j.trial.pair.is_sentinel for j in judgments) == 1
    assert all(isinstance(j.trial.natural_first, bool) for j in judgments)

    errors = []
    for j in judgments:
        for name, measured, intended in [
            ("first", j.first_ms, study.first_ms),
            ("blank", j.blank_ms, study.blank_ms),
            ("second", j.second_ms, study.second_ms),
        ]:
            errors.append(measured - intended)
            assert abs(measured - intended) <= FRAME_TOLERANCE_MS, (
                f"trial {j.trial.position} {name}: measured {measured:.1f} ms, "
                f"intended {intended} ms", console,
            )
        assert 0 <= j.response_time_ms < 15_000
    print("duration errors (ms):", [round(e, 1) for e in errors], session.client_info)

    # What was on screen: per trial fixation, image 1, blank, image 2, prompt, never two at once,
    # and the switches (seen by a MutationObserver) agree with the stored durations.
    phases = [{"fixation"}, {"img1"}, set(), {"img2"}, {"prompt"}, set()]
    assert [set(v) for _, v in shown] == phases * study.trials_per_session
    for i, j in enumerate(judgments):
        times = [t for t, _ in shown[i * len(phases) : (i + 1) * len(phases)]]
        observed = [times[2] - times[1], times[3] - times[2], times[4] - times[3]]
        stored = [j.first_ms, j.blank_ms, j.second_ms]
        fixation_at = shown[i * len(phases)][0]
        assert loaded[(i, 1)] < fixation_at and loaded[(i, 2)] < fixation_at
        assert all(abs(o - s) <= FRAME_TOLERANCE_MS for o, s in zip(observed, stored, strict=True))

    info = session.client_info
    assert info["window_width"] == 1024 and info["window_height"] == 768
    assert info["device_pixel_ratio"] == 1
    assert 20 <= info["refresh_hz"] <= 250, info
    expected = "error: Failed to load resource: net::ERR_CONNECTION_RESET"  # the lost answer
    unexpected = [
        line for line in console if line.startswith(("error", "pageerror")) and line != expected
    ]
    assert not unexpected, console


def test_a_reloaded_session_continues_with_the_unanswered_trials(
    live_server, browser, make_study, new_session, allow_orm_next_to_playwright
):
    study = make_study(trials_per_session=5, sentinel_fraction=0.2)
    session = new_session(study)
    for trial in session.trials.filter(position__lt=3):
        Judgment.objects.create(
            trial=trial, response="same", response_time_ms=500, first_ms=1000, blank_ms=250,
            second_ms=1000, idempotency_key=f"earlier-{trial.position}",
        )
    page = browser.new_page()
    page.goto(f"{live_server.url}/session/{session.token}/")
    page.wait_for_selector("#begin:enabled")
    page.get_by_role("button", name="Begin").click()
    for position in (3, 4):
        page.wait_for_selector("#prompt.is-visible", timeout=15_000)
        assert page.text_content("#progress") == f"Pair {position + 1} of 5"
        page.keyboard.press("j")
        page.wait_for_selector("#prompt:not(.is-visible)", state="attached")
    page.wait_for_url("**/done/", timeout=15_000)
    session.refresh_from_db()
    assert page.text_content("#completion-code").strip() == session.completion_code
    responses = Judgment.objects.filter(trial__session=session).order_by("trial__position")
    assert [j.response for j in responses] == ["same"] * 3 + ["different"] * 2
