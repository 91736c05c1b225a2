"""``/staff/`` and the staff API show the same counts (studyapp.reports), practice and control
pairs counted apart."""

from __future__ import annotations

import re

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from studyapp.models import Judgment
from studyapp.reports import study_counts

pytestmark = pytest.mark.django_db


def _page_counts(html: str, slug: str) -> dict[str, int]:
    row = re.search(rf'<tr data-study="{slug}">(.*?)</tr>', html, re.S).group(1)
    return {k: int(v) for k, v in re.findall(r'data-count="(\w+)">(\d+)<', row)}


def test_staff_page_and_staff_api_show_the_same_counts(
    make_study, new_session, judgment_body
):
    study = make_study(practice_trials=2, catch_pairs=2, catch_fraction=0.2)
    other = make_study(slug="other")
    client = Client()
    for n_answered in (3, 6):  # practice and main judgments, in two sessions
        session = new_session(study)
        for trial in session.trials.order_by("position")[:n_answered]:
            body = judgment_body(trial.position)
            assert client.post(f"/api/sessions/{session.token}/judgments/", body,
                               content_type="application/json").status_code == 201
    new_session(other)
    staff = get_user_model().objects.create_user("s", password="pw-123456", is_staff=True)
    client.force_login(staff)
    api = {row["slug"]: row for row in client.get("/api/staff/studies/").json()}
    html = client.get("/staff/").content.decode()

    for s in (study, other):
        page = _page_counts(html, s.slug)
        assert page == {key: api[s.slug][key] for key in page}, s.slug
        assert page == {key: study_counts()[s.pk][key] for key in page}
    page = _page_counts(html, study.slug)
    practice = Judgment.objects.filter(trial__is_practice=True).count()
    assert page["n_practice_judgments"] == practice == 4
    assert page["n_judgments"] == Judgment.objects.count() - practice == 5
    assert (page["n_pairs"], page["n_sentinel_pairs"], page["n_catch_pairs"]) == (6, 3, 2)
    assert set(page) >= {"n_sessions", "n_completed", "n_excluded"}
