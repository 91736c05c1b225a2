"""One staff read side: one study list with one judgment count, a readable perceptibility
table, calibrations of simulated observers marked or hidden, and an admin that leaves judged
studies' data as the participants produced it."""

from __future__ import annotations

import html as htmllib
import re
from io import StringIO

import pytest
from django.contrib.auth import get_user_model
from django.core.cache import cache
from django.core.management import call_command
from django.test import Client

from studyapp.models import (
    Calibration,
    Condition,
    Judgment,
    Pair,
    Participant,
    Session,
    Study,
    Trial,
)
from studyapp.simulation import simulate

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _clear_cache(settings, tmp_path):
    settings.VAR_DIR = tmp_path
    cache.clear()
    yield
    cache.clear()


@pytest.fixture
def staff_client(client):
    client.force_login(get_user_model().objects.create_user("boss", password="pw",
                                                            is_staff=True))
    return client


@pytest.fixture
def superuser_client():
    client = Client()
    client.force_login(get_user_model().objects.create_superuser("root", password="pw"))
    return client


def _count(html: str, slug: str, name: str) -> int:
    row = re.search(rf'<tr data-study="{slug}">(.*?)</tr>', html, re.S).group(1)
    return int(re.search(rf'data-count="{name}">(\d+)<', row).group(1))


# ------------------------------------------------------------------------------ one list


def test_staff_and_dashboard_are_one_list_with_one_judgment_count(make_study, staff_client):
    study = make_study(judgments_per_pair=3, catch_pairs=1, catch_fraction=0.2,
                       practice_trials=1)
    other = make_study(slug="other")
    simulate(study, 3, seed=4)
    Session.objects.filter(pk=Session.objects.order_by("pk").first().pk).update(excluded=True)
    staff, dashboard = (staff_client.get(u).content.decode() for u in ("/staff/", "/dashboard/"))
    assert staff == dashboard
    main = Judgment.objects.of_study(study).main().count()
    assert 0 < main < Judgment.objects.of_study(study).count()  # practice answers apart
    api = {r["slug"]: r for r in staff_client.get("/api/staff/studies/").json()}
    page = staff_client.get(f"/dashboard/{study.slug}/").content.decode()
    on_page = int(re.search(r'data-count="n_judgments">(\d+)<', page).group(1))
    assert _count(dashboard, study.slug, "n_judgments") == on_page == \
        api[study.slug]["n_judgments"] == main
    assert _count(dashboard, other.slug, "n_judgments") == 0
    # both pages link each other's places: the study, its robustness page, the admin
    assert f'href="/dashboard/{study.slug}/"' in dashboard
    assert f'href="/dashboard/{study.slug}/robustness/"' in dashboard
    assert 'href="/dashboard/"' in page and f'href="/dashboard/{study.slug}/robustness/"' in page


# ------------------------------------------------------------------------ perceptibility


def test_perceptibility_table_has_short_labels_units_and_human_headers(make_study,
                                                                       staff_client):
    study = make_study(judgments_per_pair=3, conditions=[("l2", 1200 / 255, "medium"),
                                                         ("linf", 8 / 255, "small")])
    simulate(study, 3, seed=1)
    Participant.objects.filter(study=study).update(is_simulated=False)
    html = staff_client.get(f"/dashboard/{study.slug}/").content.decode()
    table = html.split('id="perceptibility"', 1)[1].split("</table>", 1)[0]
    medium = Condition.objects.get(study=study, label="medium")
    assert (f'<td data-col="condition" title="{medium.spec}">L2 · medium (ε = 4.71)</td>'
            in table)
    assert ">L∞ · small (ε = 0.0314)<" in table
    assert "L2 norm, pixels in [0, 1]" in table and "L∞ norm, pixels in [0, 1]" in table
    headers = re.findall(r"<th[^>]*>([^<]*)</th>", table)
    assert "95 % participant-bootstrap interval" in headers
    assert "95 % Wilson interval" in headers
    raw = {h for h in headers if re.fullmatch(r"[a-z0-9_]+", h)}
    assert raw == set(), raw  # no DataFrame names such as boot_low, n_judgments
    page_headers = re.findall(r"<th[^>]*>([^<]*)</th>", html)
    assert "n_success_known" not in page_headers and "boot_low" not in page_headers
    assert "95 % participant-bootstrap interval" in html.split('id="perceptibility-note"')[1]


# --------------------------------------------------------------------- simulated fits


def test_people_only_view_never_shows_a_simulated_calibration_unmarked(make_study,
                                                                       staff_client):
    study = make_study(judgments_per_pair=3, catch_pairs=1, catch_fraction=0.2)
    simulate(study, 4, seed=5)  # simulated observers only
    call_command("calibrate", "--study", study.slug, "--include-simulated", "--n-boot", "5",
                 stdout=StringIO())
    simulated = Calibration.objects.latest_for(study)
    assert simulated.uses_simulated
    assert Calibration.objects.latest_for(study, include_simulated=False) is None
    people_view = staff_client.get(f"/dashboard/{study.slug}/").content.decode()
    assert 'id="hidden-calibration"' in people_view  # said, not shown
    assert '<table class="staff" id="fits"' not in people_view
    assert f"Calibration {simulated.pk} of" not in people_view.split(
        'id="hidden-calibration"')[0]
    with_simulated = staff_client.get(f"/dashboard/{study.slug}/?simulated=1").content.decode()
    assert '<table class="staff" id="fits"' in with_simulated
    assert 'id="calibration-simulated"' in with_simulated  # marked where it is shown
    # a fit on people is shown in the people-only view, unmarked; the newer simulated hidden
    Participant.objects.filter(study=study).update(is_simulated=False)
    call_command("calibrate", "--study", study.slug, "--n-boot", "5", stdout=StringIO())
    people = Calibration.objects.latest_for(study, include_simulated=False)
    assert people is not None and not people.uses_simulated and people != simulated
    view = staff_client.get(f"/dashboard/{study.slug}/").content.decode()
    assert '<table class="staff" id="fits"' in view and 'id="calibration-simulated"' not in view
    assert f"Calibration {people.pk} of" in view and 'id="hidden-calibration"' not in view


# ---------------------------------------------------------------------------- admin


def _form(client: Client, url: str) -> dict:
    """The admin change form's current values (inputs, selects, textareas), to POST back."""
    html = client.get(url).content.decode()
    data = {name: htmllib.unescape(value) for name, value in
            re.findall(r'<input[^>]*name="([^"]+)"[^>]*value="([^"]*)"', html)}
    for name, body in re.findall(r'<select[^>]*name="([^"]+)"[^>]*>(.*?)</select>', html, re.S):
        chosen = re.search(r'<option value="([^"]*)"[^>]*selected', body)
        data[name] = chosen.group(1) if chosen else ""
    for name, text in re.findall(r'<textarea[^>]*name="([^"]+)"[^>]*>(.*?)</textarea>', html,
                                 re.S):
        data[name] = htmllib.unescape(text.strip())
    for name in re.findall(r'<input type="checkbox" name="([^"]+)"[^>]*checked', html):
        data[name] = "on"
    return data


def test_admin_refuses_changes_to_a_judged_studys_conditions_pairs_and_judgments(
        make_study, superuser_client):
    judged = make_study(judgments_per_pair=3)
    simulate(judged, 2, seed=1)
    fresh = make_study(slug="fresh")
    client = superuser_client
    condition = Condition.objects.filter(study=judged).first()
    pair = Pair.objects.filter(study=judged, condition__isnull=False).first()
    judgment = Judgment.objects.of_study(judged).first()
    before = (condition.spec, condition.bound, pair.other_path, judgment.response,
              Judgment.objects.count(), Session.objects.count(), Trial.objects.count())

    for url, body in [
        (f"/admin/studyapp/condition/{condition.pk}/change/",
         {"study": judged.pk, "threat_model": "l2", "bound": "9", "spec": "l2:bound=9",
          "label": "x"}),
        (f"/admin/studyapp/pair/{pair.pk}/change/", {"other_path": "evil.png"}),
        (f"/admin/studyapp/judgment/{judgment.pk}/change/", {"response": "same"}),
        (f"/admin/studyapp/condition/{condition.pk}/delete/", {"post": "yes"}),
        (f"/admin/studyapp/pair/{pair.pk}/delete/", {"post": "yes"}),
        (f"/admin/studyapp/judgment/{judgment.pk}/delete/", {"post": "yes"}),
        (f"/admin/studyapp/study/{judged.pk}/delete/", {"post": "yes"}),
        ("/admin/studyapp/judgment/add/", {"trial": Trial.objects.first().pk,
                                           "response": "same", "response_time_ms": "500",
                                           "first_ms": "1000", "blank_ms": "250",
                                           "second_ms": "1000", "idempotency_key": "k"}),
        ("/admin/studyapp/session/add/", {"participant": Participant.objects.first().pk}),
    ]:
        response = client.post(url, body)
        assert response.status_code == 403, (url, response.status_code)
    # the judged study's change form shows its conditions read-only: a POST changes nothing
    url = f"/admin/studyapp/study/{judged.pk}/change/"
    data = _form(client, url)
    assert not any(k.startswith("conditions-0-bound") for k in data)  # no input for it
    data.update({"conditions-0-bound": "9", "conditions-0-spec": "l2:bound=9",
                 "conditions-0-id": str(condition.pk), "conditions-0-study": str(judged.pk),
                 "conditions-0-DELETE": "on"})
    client.post(url, data)
    condition.refresh_from_db()
    pair.refresh_from_db()
    judgment.refresh_from_db()
    assert (condition.spec, condition.bound, pair.other_path, judgment.response,
            Judgment.objects.count(), Session.objects.count(), Trial.objects.count()) == before
    assert Study.objects.filter(pk=judged.pk).exists()
    # the delete action is gone from the bulk actions
    assert b'value="delete_selected"' not in client.get("/admin/studyapp/pair/").content
    # a study nobody has judged stays editable (the lock is about judgments)
    free = Pair.objects.filter(study=fresh, condition__isnull=False).first()
    data = _form(client, f"/admin/studyapp/pair/{free.pk}/change/")
    data["source_image"] = "renamed"
    response = client.post(f"/admin/studyapp/pair/{free.pk}/change/", data)
    assert response.status_code == 302, re.findall(r"errorlist.{0,200}",
                                                   response.content.decode(), re.S)
    free.refresh_from_db()
    assert free.source_image == "renamed"
    assert client.get("/admin/studyapp/judgment/add/").status_code == 403
    assert client.get("/admin/studyapp/session/add/").status_code == 403
