"""The staff read side in Debian's headless Chromium at a 1,280 px window: one study list with
one judgment count, pages that fit the window, and a robustness page whose numbers equal
what ``evaluate_defense`` (the engine's results.json) and ``analyze`` produced.

The defense is real and tiny: ``train_defense`` for 1 epoch on the toy digits dataset at
16 px, then ``evaluate_defense`` at numeric and study-labelled ("calibrated") bounds, with the
masking sanity checks.
"""

from __future__ import annotations

import json
from io import StringIO

import pytest
from django.contrib.auth import get_user_model
from django.core.cache import cache
from django.core.management import call_command

from studyapp.models import Condition, Judgment, Participant
from studyapp.simulation import simulate

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.django_db(transaction=True)]

WIDTH = 1280


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


def _fits(page) -> None:
    """The document does not scroll sideways at the window's width."""
    width = page.evaluate("document.documentElement.scrollWidth")
    viewport = page.evaluate("window.innerWidth")
    assert viewport == WIDTH
    assert width <= viewport, (page.url, width, viewport)


def test_staff_pages_fit_1280px_with_one_count_and_robustness_equals_evaluate(
    live_server, browser, make_study, monkeypatch, settings, tmp_path
):
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")  # ORM next to Playwright's loop
    settings.VAR_DIR = tmp_path
    cache.clear()
    study = make_study(judgments_per_pair=3, trials_per_session=5, catch_pairs=1,
                       catch_fraction=0.2)
    simulate(study, 4, seed=7)
    Participant.objects.filter(study=study).update(is_simulated=False)  # count as people
    call_command("train_defense", "--name", "tiny", "--study", study.slug, "--out",
                 str(tmp_path / "run"), "--epochs", "1", "--image-size", "16", "--device",
                 "cpu", stdout=StringIO())
    bounds = tmp_path / "bounds.json"  # the study's condition labels at their bounds
    bounds.write_text(json.dumps({"linf": {c.label: c.bound for c in
                                           Condition.objects.filter(study=study)}}))
    out = tmp_path / "eval"
    call_command("evaluate_defense", "--run", "tiny", "--out", str(out), "--spec",
                 "linf:bound=small,num_iterations=3", "--spec", "l2:bound=1.5,num_iterations=3",
                 "--calibrated", str(bounds), "--sanity", "--limit", "8", "--image-size", "16",
                 "--device", "cpu", stdout=StringIO())
    result = json.loads((out / "results.json").read_text())
    (row,) = result["rows"]
    analyzed = StringIO()
    call_command("analyze", "--study", study.slug, "--json", stdout=analyzed, stderr=StringIO())
    human = {r["label"]: r for r in json.loads(analyzed.getvalue())["perceptibility"]
             if r["label"]}
    get_user_model().objects.create_user("boss", password="s3cret-pw", is_staff=True)

    page = browser.new_page(viewport={"width": WIDTH, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"{live_server.url}/staff/")
    page.fill("#id_username", "boss")
    page.fill("#id_password", "s3cret-pw")
    page.click("input[type=submit]")
    page.wait_for_url(f"{live_server.url}/staff/")

    # One list, one count: /staff/ and /dashboard/ show the same table and number
    main = Judgment.objects.of_study(study).main().count()
    cell = f'#studies tr[data-study="{study.slug}"] td[data-count="n_judgments"]'
    assert int(page.inner_text(cell)) == main
    staff_table = page.inner_text("#studies")
    _fits(page)
    page.goto(f"{live_server.url}/dashboard/")
    assert page.inner_text("#studies") == staff_table
    _fits(page)
    page.click(f"#studies tr[data-study='{study.slug}'] a:text('{study.title}')")
    page.wait_for_url(f"{live_server.url}/dashboard/{study.slug}/")
    assert int(page.inner_text('#progress [data-count="n_judgments"]')) == main

    # The perceptibility table fits at 1,280 px: short labels, the spec on hover
    _fits(page)
    table = page.locator("#perceptibility")
    box = table.bounding_box()
    assert box["x"] >= 0 and box["x"] + box["width"] <= WIDTH
    assert page.evaluate("""() => { const w = document.querySelector('#perceptibility')
        .parentElement; return w.scrollWidth <= w.clientWidth; }""")  # no inner scrolling
    for condition in Condition.objects.filter(study=study):
        td = page.locator(f'#perceptibility tr[data-row="{condition.spec}"] '
                          'td[data-col="condition"]')
        assert td.get_attribute("title") == condition.spec
        assert td.inner_text().startswith(f"L∞ · {condition.label} (ε = ")
    headers = page.locator("#perceptibility th").all_inner_texts()
    assert "95 % participant-bootstrap interval" in headers
    assert not [h for h in headers if "_" in h], headers

    # The robustness page: every number equals results.json / analyze
    page.click("#robustness-link")
    page.wait_for_url(f"{live_server.url}/dashboard/{study.slug}/robustness/")
    _fits(page)
    for column, value in row.items():
        if column in ("model", "dataset", "images"):
            continue
        if column in ("clean", "union", "unseen_mean"):
            got = page.inner_text(f'#summary tr[data-row="tiny"] td[data-col="{column}"]')
        else:
            got = page.inner_text(f'#accuracy tr[data-row="tiny|{column}"] '
                                  'td[data-col="accuracy"]')
        assert got == ("–" if value is None else f"{value:.4f}"), column
    for item in result["perceptibility"][row["model"]]:
        key = f"tiny|{item['threat_model']} {item['level']}"
        assert page.inner_text(f'#accuracy tr[data-row="{key}"] td[data-col="accuracy"]') \
            == f"{item['accuracy']:.4f}"
        equal = f'#equal-perceptibility tr[data-row="tiny|linf|{item["level"]}"]'
        assert page.inner_text(f'{equal} td[data-col="accuracy"]') == f"{item['accuracy']:.4f}"
        assert page.inner_text(f'{equal} td[data-col="perceptibility"]') == \
            f"{human[item['level']]['perceptibility']:.4f}"
        assert page.inner_text(f'{equal} td[data-col="n_judgments"]') == \
            str(human[item["level"]]["n_judgments"])
    checks = result["sanity"][row["model"]]
    assert page.locator("#sanity tbody tr").count() == len(checks) >= 3
    for i, check in enumerate(checks):
        tr = f'#sanity tr[data-row="tiny|{i}"]'
        assert page.inner_text(f'{tr} td[data-col="check"]') == check["check"]
        assert page.inner_text(f'{tr} td[data-col="value"]') == check["value"]
        assert page.inner_text(f'{tr} td[data-col="passed"]') == \
            ("yes" if check["passed"] else "no")
    for name in ("robust_accuracy", "union", "equal_perceptibility"):
        img = page.locator(f"#figure-{name} img")
        img.scroll_into_view_if_needed()
        page.wait_for_function("el => el.complete && el.naturalWidth > 0",
                               arg=img.element_handle(), timeout=60_000)
        for fmt in ("SVG", "CSV"):
            with page.expect_download() as download:
                page.click(f"#figure-{name} a:text('{fmt}')")
            assert download.value.suggested_filename == f"{study.slug}-{name}.{fmt.lower()}"
    assert errors == []
