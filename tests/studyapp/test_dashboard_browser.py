"""The staff dashboard in Debian's headless Chromium: it renders, every figure loads, and the
key numbers on the page equal ``manage.py analyze --json``'s."""

from __future__ import annotations

import json
from io import StringIO

import pytest
from django.contrib.auth import get_user_model
from django.core.cache import cache
from django.core.management import call_command

from studyapp.simulation import simulate

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def browser(chromium_executable):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium_executable, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--no-first-run"],
        )
        yield browser
        browser.close()


def test_staff_sees_tables_and_figures_matching_analyze(
    live_server, browser, make_study, monkeypatch, settings, tmp_path
):
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")  # ORM next to Playwright's loop
    settings.VAR_DIR = tmp_path
    cache.clear()
    study = make_study(judgments_per_pair=3, trials_per_session=5, catch_pairs=1,
                       catch_fraction=0.2)
    simulate(study, 4, seed=5)
    call_command("calibrate", "--study", study.slug, "--include-simulated", "--n-boot", "10",
                 stdout=StringIO())
    get_user_model().objects.create_user("boss", password="s3cret-pw", is_staff=True)
    out = StringIO()
    call_command("analyze", "--study", study.slug, "--json", "--include-simulated",
                 stdout=out, stderr=StringIO())
    simulated = json.loads(out.getvalue())

    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"{live_server.url}/dashboard/")
    assert "/admin/login/" in page.url  # staff only
    page.fill("#id_username", "boss")
    page.fill("#id_password", "s3cret-pw")
    page.click("input[type=submit]")
    page.wait_for_url(f"{live_server.url}/dashboard/")
    page.click(f"text={study.title}")
    page.wait_for_url(f"{live_server.url}/dashboard/{study.slug}/")
    # Simulated observers are left out of the page's statistics, as out of analyze's:
    assert page.locator('#perceptibility tr[data-row="sentinel"] td[data-col="n_judgments"]'
                        ).inner_text() == "0"
    # ... and so is their calibration (calibrate --include-simulated): named, not shown
    assert page.locator("#hidden-calibration .mark-simulated").is_visible()
    assert page.locator("#fits tr").count() == 0
    for name in ("fig4a", "fig4b", "fig4c", "fig5", "psychometric"):
        img = page.locator(f"#figure-{name} img")
        img.scroll_into_view_if_needed()
        page.wait_for_function(
            "el => el.complete && el.naturalWidth > 0", arg=img.element_handle(), timeout=30_000
        )
        with page.expect_download() as download:
            page.click(f"#figure-{name} a:text('SVG')")
        assert download.value.suggested_filename == f"{study.slug}-{name}.svg"
    assert errors == []

    # With the simulated observers included, the page's numbers equal
    # `analyze --include-simulated`'s, and its figures load too.
    page.click("text=include the simulated observers")
    page.wait_for_url("**/?simulated=1")
    assert "Including simulated observers" in page.inner_text("#simulated-note")
    # the calibration is shown here, marked as fitted on simulated observers
    assert page.locator("#fits tr").count() == 1 + 3
    assert page.locator("#calibration-simulated").is_visible()
    for row in simulated["perceptibility"]:
        for col in ("n_judgments", "perceptibility", "ci_low", "ci_high", "boot_low",
                    "boot_high"):
            cell = page.locator(  # interval ends are spans inside their interval's cell
                f'#perceptibility tr[data-row="{row["condition"]}"] [data-col="{col}"]'
            ).inner_text()
            value = row[col]
            expect = "–" if value is None else (
                str(value) if col == "n_judgments" else f"{value:.4f}")
            assert cell == expect, (row["condition"], col, cell, expect)
    assert int(page.locator('#perceptibility tr[data-row="sentinel"] td[data-col='
                            '"n_judgments"]').inner_text()) > 0
    img = page.locator("#figure-fig4a img")
    img.scroll_into_view_if_needed()
    page.wait_for_function("el => el.complete && el.naturalWidth > 0",
                           arg=img.element_handle(), timeout=30_000)
    assert "simulated=1" in img.get_attribute("src")
    assert page.locator('#progress td[data-col="completed"]').inner_text() == "4"
    assert errors == []
