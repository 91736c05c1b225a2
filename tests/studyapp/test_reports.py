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


def test_study_overview_equals_counts_and_progress_and_a_python_count(
    make_study, new_session, judgment_body
):
    """analyze's two-query study_overview gives the numbers of study_counts and
    study_progress, and those equal a count over the stored judgments one by one."""
    from studyapp.models import Session
    from studyapp.reports import study_overview, study_progress

    study = make_study(practice_trials=1, catch_pairs=1, catch_fraction=0.2,
                       judgments_per_pair=2)
    client = Client()
    sessions = []
    for n_answered in (4, 6, 3):
        session = new_session(study)
        sessions.append(session)
        for trial in session.trials.order_by("position")[:n_answered]:
            assert client.post(f"/api/sessions/{session.token}/judgments/",
                               judgment_body(trial.position),
                               content_type="application/json").status_code == 201
    Session.objects.filter(pk=sessions[1].pk).update(excluded=True)
    from studyapp.reports import _pair_judgment_counts, _pair_judgment_counts_orm

    assert _pair_judgment_counts(study) == _pair_judgment_counts_orm(study)  # SQLite SQL = ORM
    counts, progress = study_overview(study)
    assert counts == study_counts(study)[study.pk]
    assert progress == study_progress(study)
    expected: dict[str, list[int]] = {}
    valid_per_pair: dict[int, int] = {}
    for j in Judgment.objects.select_related("trial__pair__condition", "trial__session"):
        if j.trial.is_practice:
            continue
        pair = j.trial.pair
        name = ("sentinel" if pair.is_sentinel else "catch" if pair.is_catch
                else pair.condition.spec)
        row = expected.setdefault(name, [0, 0])
        row[0] += 1
        row[1] += j.trial.session.excluded
        if pair.condition is not None and not j.trial.session.excluded:
            valid_per_pair[pair.pk] = valid_per_pair.get(pair.pk, 0) + 1
    got = {r["condition"]: [r["n_judgments"], r["n_judgments_excluded"]]
           for r in progress["conditions"] if r["n_judgments"]}
    assert got == expected and sum(v[1] for v in got.values()) > 0
    assert progress["n_judgments_valid"] == sum(min(v, 2) for v in valid_per_pair.values())
    assert counts["n_judgments"] == sum(v[0] for v in expected.values())
    assert progress["sessions"]["excluded"] == counts["n_excluded"] == 1
