"""Staff dashboard: access, numbers equal to analyze's, figures (PNG/SVG/CSV), the cache."""

from __future__ import annotations

import json
import re
from io import StringIO

import pandas as pd
import pytest
from django.contrib.auth import get_user_model
from django.core.cache import cache
from django.core.management import call_command

from studyapp import dashboard_figures
from studyapp.models import Judgment, Participant, Session
from studyapp.scheduler import record_judgment
from studyapp.simulation import simulate

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def clear_cache():
    cache.clear()


@pytest.fixture
def staff_client(client):
    user = get_user_model().objects.create_user("staff", password="pw", is_staff=True)
    client.force_login(user)
    return client


@pytest.fixture
def filled(make_study, settings, tmp_path):
    settings.VAR_DIR = tmp_path
    study = make_study(judgments_per_pair=4, trials_per_session=5, catch_pairs=1,
                       catch_fraction=0.2)
    simulate(study, 5, seed=3)
    # make them count as people, and exclude one session, for the dashboard's numbers
    Participant.objects.filter(study=study).update(is_simulated=False)
    Session.objects.filter(pk=Session.objects.order_by("pk").first().pk).update(
        excluded=True, exclusion_reason="sentinel false-alarm rate 0.50 > 0.25")
    return study


def analyze_json(study) -> dict:
    out = StringIO()
    call_command("analyze", "--study", study.slug, "--json", stdout=out, stderr=StringIO())
    return json.loads(out.getvalue())


def cells(html: str, table_id: str) -> dict[tuple[str, str], str]:
    """``{(data-row, data-col): text}`` of the dashboard table ``table_id`` (cells and the
    spans of interval cells, ``ci_low`` inside ``ci``)."""
    body = html.split(f'id="{table_id}"', 1)[1].split("</table>", 1)[0]
    out = {}
    for row, content in re.findall(r'<tr data-row="([^"]*)">(.*?)</tr>', body, re.S):
        for col, text in re.findall(r'<(?:td|span) data-col="([^"]*)"[^>]*>([^<]*)(?=<)',
                                    content, re.S):
            out[(row, col)] = text
    return out


@pytest.mark.parametrize("url", ["/dashboard/", "/dashboard/jnd-demo/",
                                 "/dashboard/jnd-demo/figures/fig4a.png"])
def test_dashboard_is_for_staff_only(client, filled, url):
    response = client.get(url)
    assert response.status_code == 302 and "/admin/login/" in response["Location"]
    user = get_user_model().objects.create_user("worker", password="pw")
    client.force_login(user)
    assert client.get(url).status_code == 302


def test_study_page_numbers_equal_analyze(staff_client, filled):
    study = filled
    listing = staff_client.get("/dashboard/").content.decode()
    assert "jnd-demo" in listing
    html = staff_client.get(f"/dashboard/{study.slug}/").content.decode()
    report = analyze_json(study)
    shown = cells(html, "perceptibility")
    table = pd.DataFrame(report["perceptibility"])
    assert len(table) == 4  # 2 conditions, sentinel, catch
    for row in table.to_dict("records"):
        for col in ("n_judgments", "perceptibility", "ci_low", "ci_high", "boot_low",
                    "boot_high"):
            value = row[col]
            expect = "–" if value is None else (
                str(value) if col == "n_judgments" else f"{value:.4f}")
            assert shown[(row["condition"], col)] == expect, (row["condition"], col)
    parts = cells(html, "participants")
    assert len({r for r, _ in parts}) == len(report["participants"]) == 4  # one excluded
    assert "sentinel false-alarm rate 0.50 &gt; 0.25" in html
    progress = re.search(r'data-col="completed">(\d+)<', html).group(1)
    assert int(progress) == Session.objects.filter(completed_at__isnull=False).count() == 5


def test_figures_download_as_png_svg_and_csv(staff_client, filled):
    base = f"/dashboard/{filled.slug}/figures"
    for name in dashboard_figures.FIGURES:
        png = staff_client.get(f"{base}/{name}.png")
        assert png["Content-Type"] == "image/png" and png.content[:4] == b"\x89PNG"
        svg = staff_client.get(f"{base}/{name}.svg?download=1")
        assert svg["Content-Type"] == "image/svg+xml" and b"<svg" in svg.content[:2000]
        assert "attachment" in svg["Content-Disposition"]
        csv = staff_client.get(f"{base}/{name}.csv")
        assert csv["Content-Type"].startswith("text/csv")
        pd.read_csv(StringIO(csv.content.decode()))
    fig4a = pd.read_csv(StringIO(staff_client.get(f"{base}/fig4a.csv").content.decode()))
    report = pd.DataFrame(analyze_json(filled)["perceptibility"]).set_index("condition")
    for row in fig4a.to_dict("records"):
        assert row["perceptibility"] == pytest.approx(report.loc[row["condition"],
                                                                 "perceptibility"])
    assert staff_client.get(f"{base}/nope.png").status_code == 404
    assert staff_client.get(f"{base}/fig4a.gif").status_code == 404
    assert staff_client.get("/dashboard/nope/").status_code == 404


def test_figures_are_cached_by_study_state(staff_client, filled, monkeypatch):
    builds = []
    real = dashboard_figures.build_context
    monkeypatch.setattr(dashboard_figures, "build_context",
                        lambda study, **kw: builds.append(study.pk) or real(study, n_boot=20))
    # what is drawn does not matter here, only when: a cheap stand-in for matplotlib
    monkeypatch.setattr(dashboard_figures, "render_files", lambda ctx, name: {
        fmt: f"{name}.{fmt}:{len(builds)}".encode() for fmt in dashboard_figures.FORMATS})
    url = f"/dashboard/{filled.slug}/figures/fig4a.png"
    assert staff_client.get(f"/dashboard/{filled.slug}/").status_code == 200
    assert len(builds) == 1
    first = staff_client.get(url).content  # rendered with the page: no new analysis
    for name in dashboard_figures.FIGURES:
        staff_client.get(f"/dashboard/{filled.slug}/figures/{name}.svg")
    assert staff_client.get(url).content == first and len(builds) == 1
    before = dashboard_figures.study_state(filled)
    Session.objects.filter(excluded=True).update(excluded=False)  # a QC decision changes
    assert dashboard_figures.study_state(filled) != before
    staff_client.get(url)
    assert len(builds) == 2
    simulate(filled, 1, seed=9)  # a new judgment changes it too
    staff_client.get(url)
    assert len(builds) == 3
    Participant.objects.filter(study=filled).update(is_simulated=True)  # so does who is simulated
    staff_client.get(url)
    staff_client.get(f"/dashboard/{filled.slug}/")
    assert len(builds) == 4


def test_study_state_follows_only_the_studys_own_judgments(make_study, new_session,
                                                          judgment_body):
    a, b = make_study(slug="a"), make_study(slug="b")
    in_a, in_b = new_session(a), new_session(b)
    record_judgment(in_a, judgment_body(0))
    state_a, state_b = dashboard_figures.study_state(a), dashboard_figures.study_state(b)
    for position in (0, 1):  # judgments in study b: a's key (and cached figures) stay
        record_judgment(in_b, judgment_body(position))
        assert dashboard_figures.study_state(a) == state_a
        assert dashboard_figures.study_state(b) != state_b
        state_b = dashboard_figures.study_state(b)
    cache.clear()  # computed afresh (the join, not the cached count), the same key
    assert dashboard_figures.study_state(a) == state_a
    assert dashboard_figures.study_judgments(a) == {
        "n": 1, "last": Judgment.objects.get(trial__session=in_a).pk}
    record_judgment(in_a, judgment_body(1))  # one in study a changes a's key, not b's
    assert dashboard_figures.study_state(a) != state_a
    assert dashboard_figures.study_state(b) == state_b
    Judgment.objects.filter(trial__session=in_a, trial__position=1).delete()  # so does a deletion
    assert dashboard_figures.study_state(a) == state_a
