"""Staff API (studies, progress, export, quality), staff-only access, CSRF, rate limits, schema."""

from __future__ import annotations

import csv
import io

import pytest
from django.contrib.auth import get_user_model
from django.core.cache import cache
from django.core.management import call_command
from django.test import Client
from django.urls import reverse
from qc_sessions import CAREFUL, SLOPPY, make_answered_session
from rest_framework.test import APIClient

from studyapp.models import Calibration, Judgment, Session

pytestmark = pytest.mark.django_db

S, P = "sentinel", "perturbed"


@pytest.fixture(autouse=True)
def _fresh_rate_limits():
    cache.clear()  # rate-limit counters live in the cache table, outside test transactions
    yield
    cache.clear()


@pytest.fixture
def staff_user():
    return get_user_model().objects.create_user("lab", is_staff=True)


@pytest.fixture
def staff(staff_user) -> APIClient:
    client = APIClient()
    client.force_login(staff_user)
    return client


@pytest.fixture
def worker() -> APIClient:
    """Logged in, but not staff."""
    user = get_user_model().objects.create_user("worker")
    client = APIClient()
    client.force_login(user)
    return client


def staff_urls(slug: str) -> list[tuple[str, str]]:
    return [
        ("get", reverse("staff-api-studies")),
        ("get", reverse("staff-api-progress", args=[slug])),
        ("get", reverse("staff-api-export", args=[slug])),
        ("get", reverse("staff-api-quality", args=[slug])),
        ("post", reverse("staff-api-quality", args=[slug])),
    ]


# ------------------------------------------------------------------------------ access


def test_anonymous_and_non_staff_get_403_json_and_nothing_changes(study, worker):
    study.max_sentinel_false_alarm = 0.1
    study.save()
    sloppy = make_answered_session(study, SLOPPY)
    for client, code in [(APIClient(), "not_authenticated"), (worker, "permission_denied")]:
        for method, url in staff_urls(study.slug):
            response = getattr(client, method)(url)
            assert response.status_code == 403, (method, url)
            assert response["Content-Type"] == "application/json"
            body = response.json()
            assert body["code"] == code and body["error"], body
    sloppy.refresh_from_db()
    assert not sloppy.excluded  # the refused POST applied nothing


def test_staff_pages_and_admin_stay_staff_only(study, staff_user):
    worker = Client()
    worker.force_login(get_user_model().objects.create_user("w2"))
    for client in (Client(), worker):
        for url in ("/staff/", "/admin/", "/admin/studyapp/session/"):
            response = client.get(url)
            assert response.status_code == 302 and "/admin/login/" in response["Location"], url
    staff_client = Client()
    staff_client.force_login(staff_user)
    assert staff_client.get("/staff/").status_code == 200


def test_calibrations_have_an_admin_changelist_for_staff(make_study, staff_user):
    from django.contrib.auth.models import Permission

    study, other = make_study(), make_study(slug="other")
    fitted = Calibration.objects.create(
        study=study, targets=[0.25, 0.5], fit={"threat_models": {}},
        presets={"linf": {"p25": 0.01, "p50": 0.02}, "l2": {"p25": 0.3, "p50": 0.6}},
        counts={"n_judgments": 812, "n_sessions": 50}, settings={"sigmoid": "logistic"},
        code_version="perceptlab-test")
    Calibration.objects.create(study=other, targets=[0.5], fit={}, presets={"ssim": {"p50": 0.9}})
    url = "/admin/studyapp/calibration/"
    client = Client()
    client.force_login(staff_user)
    assert client.get(url).status_code == 403  # staff, but no permission on calibrations yet
    staff_user.user_permissions.add(Permission.objects.get(codename="view_calibration"))
    page = client.get(url)
    assert page.status_code == 200
    html = page.content.decode()
    assert "2 calibrations" in html and "l2, linf" in html and "812" in html
    assert "perceptlab-test" in html and "logistic" in html
    assert "threat model" in html  # the filter, with the threat models stored
    only_l2 = client.get(url, {"threat_model": "l2"})
    assert only_l2.status_code == 200 and list(only_l2.context["cl"].result_list) == [fitted]
    by_study = client.get(url, {"study__id__exact": other.pk})
    assert [c.study for c in by_study.context["cl"].result_list] == [other]
    for codename in ("change_calibration", "add_calibration"):
        staff_user.user_permissions.add(Permission.objects.get(codename=codename))
    detail = client.get(f"{url}{fitted.pk}/change/")
    assert detail.status_code == 200 and "0.02" in detail.content.decode()
    assert not detail.context["adminform"].form.fields  # fitted values are read-only
    assert client.get(f"{url}add/").status_code == 403  # only manage.py calibrate fits one


def test_unsafe_staff_requests_need_the_csrf_token(study, staff_user):
    make_answered_session(study, SLOPPY)
    study.max_sentinel_false_alarm = 0.1
    study.save()
    client = APIClient(enforce_csrf_checks=True)
    client.force_login(staff_user)
    url = reverse("staff-api-quality", args=[study.slug])
    refused = client.post(url, {}, format="json")
    assert refused.status_code == 403
    assert "CSRF" in refused.json()["error"]
    assert not Session.objects.filter(excluded=True).exists()
    client.get("/admin/")  # sets the csrftoken cookie, as after logging in to the admin
    token = client.cookies["csrftoken"].value
    accepted = client.post(url, {}, format="json", HTTP_X_CSRFTOKEN=token)
    assert accepted.status_code == 200, accepted.json()
    assert Session.objects.filter(excluded=True).count() == 1


# ------------------------------------------------------------------------------ endpoints


def test_study_list_with_counts(staff, make_study):
    study = make_study()
    make_study("empty", with_pairs=False)
    make_answered_session(study, SLOPPY, practice=[(S, "same", 500)])
    make_answered_session(study, CAREFUL, completed=False)
    response = staff.get(reverse("staff-api-studies"))
    assert response.status_code == 200
    rows = {r["slug"]: r for r in response.json()}
    row = rows["jnd-demo"]
    # make_study: 6 perturbed + 3 sentinels; make_answered_session adds control pairs
    assert row["n_pairs"] == 6 and row["n_conditions"] == 2
    assert row["n_sentinel_pairs"] == 3 + 5 + 2 + 1 and row["n_catch_pairs"] == 2 + 1
    assert (row["n_sessions"], row["n_completed"], row["n_excluded"]) == (2, 1, 0)
    assert row["n_judgments"] == len(SLOPPY) + len(CAREFUL)  # practice not counted
    assert row["participant_url"] == "http://testserver/study/jnd-demo/"
    assert row["export_url"].endswith("/api/staff/studies/jnd-demo/export/")
    assert rows["empty"]["n_pairs"] == 0 and rows["empty"]["n_judgments"] == 0


def test_progress_per_condition_and_sessions(staff, study):
    study.judgments_per_pair = 1
    study.max_sentinel_false_alarm = 0.25
    study.save()
    make_answered_session(study, SLOPPY)  # perturbed pairs 1-3 judged, then excluded
    make_answered_session(study, [(P, "same", 800)] * 2)  # pairs 1-2 judged, kept
    abandoned = make_answered_session(study, [(P, None, 0)], completed=False)
    Session.objects.filter(pk=abandoned.pk).update(abandoned_at=abandoned.started_at)
    make_answered_session(study, [(P, None, 0)], completed=False)
    apply_exclusions_via_api = staff.post(reverse("staff-api-quality", args=[study.slug]))
    assert apply_exclusions_via_api.status_code == 200
    body = staff.get(reverse("staff-api-progress", args=[study.slug])).json()
    assert body["judgments_per_pair"] == 1
    assert body["sessions"] == {
        "started": 4, "completed": 2, "in_progress": 1, "abandoned": 1, "excluded": 1,
    }  # fmt: skip
    conditions = {row["condition"]: row for row in body["conditions"]}
    assert [row["condition"] for row in body["conditions"]][-2:] == ["sentinel", "catch"]
    assert sum(r["n_pairs"] for r in body["conditions"] if r["bound"] is not None) == 6
    judged = sum(r["n_judgments"] for r in body["conditions"] if r["bound"] is not None)
    assert judged == 3 + 2
    assert sum(r["n_judgments_excluded"] for r in body["conditions"]) == len(SLOPPY)
    assert sum(r["n_pairs_at_k"] or 0 for r in body["conditions"]) == 2  # valid only
    assert conditions["sentinel"]["n_pairs_at_k"] is None
    assert body["n_judgments_needed"] == 6 and body["n_judgments_valid"] == 2


def _export(staff: APIClient, slug: str, **query):
    return staff.get(reverse("staff-api-export", args=[slug]), query)


def test_export_json_one_row_per_main_judgment(staff, study):
    study.max_sentinel_false_alarm = 0.25
    study.save()
    sloppy = make_answered_session(study, SLOPPY, practice=[(S, "same", 400)])
    Session.objects.filter(pk=sloppy.pk).update(assignment_id="ASSIGN1", hit_id="HIT1")
    sloppy.participant.source, sloppy.participant.external_id = "mturk", "A1WORKER"
    sloppy.participant.save()
    make_answered_session(study, CAREFUL)
    staff.post(reverse("staff-api-quality", args=[study.slug]))
    response = _export(staff, study.slug)
    assert response.status_code == 200 and response["Content-Type"] == "application/json"
    rows = response.json()
    assert len(rows) == len(SLOPPY) + len(CAREFUL)
    first = rows[0]
    assert first["study"] == "jnd-demo" and first["session_id"] == sloppy.pk
    assert (first["participant_source"], first["participant_id"]) == ("mturk", "A1WORKER")
    assert (first["assignment_id"], first["hit_id"]) == ("ASSIGN1", "HIT1")
    assert first["trial_position"] == 1  # position 0 was practice
    assert first["is_sentinel"] and first["condition"] is None
    assert first["session_excluded"] and "sentinel false-alarm rate" in first["exclusion_reason"]
    perturbed = [r for r in rows if r["condition"]]
    assert perturbed and all(r["linf"] == pytest.approx(r["bound"]) for r in perturbed)
    assert {"response", "response_time_ms", "first_ms", "blank_ms", "second_ms"} <= set(first)
    assert {"natural_first", "pair_key", "threat_model", "judged_at"} <= set(first)


def test_export_csv(staff, study):
    make_answered_session(study, CAREFUL)
    response = _export(staff, study.slug, format="csv")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/csv")
    assert response["Content-Disposition"] == 'attachment; filename="jnd-demo-judgments.csv"'
    rows = list(csv.DictReader(io.StringIO(response.content.decode())))
    assert len(rows) == len(CAREFUL)
    assert rows[0]["response"] == "same" and rows[0]["session_excluded"] == "False"
    assert rows[0]["condition"] == "" and rows[-1]["linf"] != ""
    assert list(rows[0])[:3] == ["study", "session_id", "participant_source"]
    by_accept = staff.get(reverse("staff-api-export", args=[study.slug]), HTTP_ACCEPT="text/csv")
    assert by_accept.content == response.content


def test_export_errors(staff, study):
    assert _export(staff, "nope").status_code == 404
    assert _export(staff, "nope").json()["code"] == "not_found"
    assert _export(staff, study.slug, format="xml").status_code == 404
    empty_csv = _export(staff, study.slug, format="csv")
    assert empty_csv.status_code == 200 and empty_csv.content.startswith(b"study,session_id,")


def test_quality_get_is_a_dry_run_and_post_applies(staff, study):
    study.max_sentinel_false_alarm = 0.25
    study.save()
    sloppy = make_answered_session(study, SLOPPY)
    make_answered_session(study, CAREFUL)
    url = reverse("staff-api-quality", args=[study.slug])
    dry = staff.get(url).json()
    assert dry["applied"] is False and dry["n_excluded"] == 1 and dry["n_sessions"] == 2
    assert not Session.objects.filter(excluded=True).exists()
    applied = staff.post(url, {}, format="json").json()
    assert applied["applied"] is True and applied["n_violating"]["sentinel_false_alarm"] == 1
    row = next(r for r in applied["sessions"] if r["session_id"] == sloppy.pk)
    assert row["excluded"] and row["sentinel_false_alarm_rate"] == pytest.approx(0.4)
    assert Session.objects.get(excluded=True).pk == sloppy.pk
    bad = staff.post(url, {"include_incomplete": "perhaps"}, format="json")
    assert bad.status_code == 400 and bad.json()["error"].startswith("include_incomplete:")


# ------------------------------------------------------------------------------ rate limits


def _rates(settings, **rates):
    settings.REST_FRAMEWORK = {
        **settings.REST_FRAMEWORK,
        "DEFAULT_THROTTLE_RATES": {**settings.REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"], **rates},
    }


def test_participant_writes_are_limited_per_session_token(
    settings, study, new_session, judgment_body
):
    _rates(settings, **{"participant-write": "3/min"})
    api = APIClient()  # every request from the same address, as behind a lab NAT
    one, two = new_session(study), new_session(study)
    url = reverse("api-judgments", args=[one.token])
    for position in range(3):
        assert api.post(url, judgment_body(position), format="json").status_code == 201
    throttled = api.post(url, judgment_body(3), format="json")
    assert throttled.status_code == 429
    assert throttled.json()["code"] == "throttled"
    assert "throttled" in throttled.json()["error"].lower()
    assert int(throttled["Retry-After"]) > 0
    assert Judgment.objects.filter(trial__session=one).count() == 3  # nothing written
    complete = api.post(reverse("api-complete", args=[one.token]))
    assert complete.status_code == 429
    one.refresh_from_db()
    assert one.completed_at is None
    # reads are never limited; another participant behind the same address has a budget
    assert api.get(reverse("api-session", args=[one.token])).status_code == 200
    other = reverse("api-judgments", args=[two.token])
    assert api.post(other, judgment_body(0), format="json").status_code == 201


def test_staff_requests_are_limited_per_user(settings, study, staff):
    _rates(settings, staff="2/min")
    url = reverse("staff-api-studies")
    assert [staff.get(url).status_code for _ in range(3)] == [200, 200, 429]
    assert staff.get(url).json()["code"] == "throttled"


def test_default_rates_are_generous_for_a_real_participant(settings):
    rates = settings.REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"]
    assert rates["participant-write"] == "120/min" and rates["staff"] == "300/min"


# ------------------------------------------------------------------------------ schema


def test_openapi_schema_describes_both_apis(client: Client):
    response = client.get("/api/schema/", {"format": "json"})
    assert response.status_code == 200
    schema = response.json()
    paths = schema["paths"]
    assert set(paths) >= {
        "/api/sessions/{token}/",
        "/api/sessions/{token}/judgments/",
        "/api/sessions/{token}/complete/",
        "/api/staff/studies/",
        "/api/staff/studies/{slug}/progress/",
        "/api/staff/studies/{slug}/export/",
        "/api/staff/studies/{slug}/quality/",
    }
    post = paths["/api/sessions/{token}/judgments/"]["post"]
    body = post["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert body.endswith("/JudgmentInputRequest")
    assert {"200", "201", "400", "404", "409", "429"} <= set(post["responses"])
    components = schema["components"]["schemas"]
    assert set(components["JudgmentInputRequest"]["required"]) >= {
        "position", "response", "response_time_ms", "durations", "idempotency_key",
    }  # fmt: skip
    export = paths["/api/staff/studies/{slug}/export/"]["get"]["responses"]["200"]["content"]
    assert set(export) == {"application/json", "text/csv"}
    assert client.get("/api/schema/").status_code == 200  # YAML by default


def test_schema_is_valid_openapi_without_generator_warnings(tmp_path):
    out = tmp_path / "schema.yaml"
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(out))
    assert out.read_text().startswith("openapi: 3.")
