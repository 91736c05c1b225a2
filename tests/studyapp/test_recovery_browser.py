"""Recovery in Chromium: retries run at once when the network comes back, and the status line
says that the problem is the connection (issue 10)."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def context(chromium_executable, monkeypatch):
    from playwright.sync_api import sync_playwright

    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")  # Playwright's loop on this thread
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium_executable, headless=True,
            args=["--no-sandbox", "--disable-gpu"],
        )
        yield browser.new_context(viewport={"width": 1024, "height": 768})
        browser.close()


def test_a_retry_pause_ends_when_the_browser_comes_back_online(live_server, context, study):
    """A ten-minute backoff (longer than the test may run) ends at the `online` event."""
    page = context.new_page()
    page.goto(f"{live_server.url}/study/{study.slug}/")
    page.evaluate(
        """async () => {
          const { retryPause } = await import("/static/js/buffer.js");
          window.pauseDone = false;
          retryPause(600000).then(() => { window.pauseDone = true; });
        }"""
    )
    context.set_offline(True)
    page.wait_for_timeout(200)
    assert page.evaluate("window.pauseDone") is False
    context.set_offline(False)  # fires `online`
    page.wait_for_function("window.pauseDone === true", timeout=20_000)


def test_failing_images_are_called_a_connection_problem(live_server, context, study):
    page = context.new_page()
    page.goto(f"{live_server.url}/study/{study.slug}/")
    page.get_by_role("button", name="Start").click()
    page.wait_for_url("**/session/*/")
    # From now on every image fails to load: the runner must blame the connection.
    page.route("**/img/**", lambda route: route.abort())
    page.reload()
    page.wait_for_selector("#intro", state="visible")
    page.keyboard.press("Space")  # the first trial's images are fetched now
    page.wait_for_function(
        "document.getElementById('status').textContent.includes('Connection problem')",
        timeout=20_000,
    )
    assert "slow" not in page.text_content("#status")
    context.set_offline(True)
    page.wait_for_function(
        "document.getElementById('status').textContent.includes('no network')", timeout=20_000
    )
    page.unroute("**/img/**")
    context.set_offline(False)
    # Back online: the images load (at once, not after the backoff) and the notice goes.
    page.wait_for_function(
        "!document.getElementById('status').textContent.includes('Connection problem')",
        timeout=30_000,
    )
