"""Participant links (MTurk, Prolific, plain), consent, retakes and end pages (test client)."""

from __future__ import annotations

from urllib.parse import urlencode

import pytest
from django.contrib.sessions.models import Session as DjangoSession
from django.test import Client
from django.urls import reverse
from rest_framework.test import APIClient

from studyapp.models import Judgment, Participant, Session, Study, Trial
from studyapp.recruitment import (
    BadRecruitmentLink,
    mturk_submit_url,
    parse_recruitment,
    validate_turk_submit_to,
)

pytestmark = pytest.mark.django_db

SANDBOX = "https://workersandbox.mturk.com"


def mturk(worker: str = "WORKER1", assignment: str = "ASSIGN1", **extra) -> dict:
    return {"assignmentId": assignment, "hitId": "HIT1", "turkSubmitTo": SANDBOX,
            "workerId": worker, **extra}


def prolific(pid: str = "5f1a2b3c4d5e6f7a8b9c0d1e") -> dict:
    return {"PROLIFIC_PID": pid, "STUDY_ID": "STUDY9", "SESSION_ID": "SESSION9"}


def link(study: Study, params: dict | None = None) -> str:
    url = reverse("study-start", args=[study.slug])
    return f"{url}?{urlencode(params)}" if params else url


def db_counts() -> tuple[int, int, int, int, int]:
    return (
        Participant.objects.count(), Session.objects.count(), Trial.objects.count(),
        Judgment.objects.count(), DjangoSession.objects.count(),
    )


def start(client: Client, study: Study, params: dict | None = None, **headers) -> Session:
    response = client.post(link(study, params), {"decision": "agree"}, **headers)
    assert response.status_code == 302, response.content.decode()
    return Session.objects.get(token=response["Location"].strip("/").rsplit("/", 1)[1])


def finish(session: Session, judgment_body) -> None:
    api = APIClient()
    for trial in session.trials.all():
        url = reverse("api-judgments", args=[session.token])
        assert api.post(url, judgment_body(trial.position), format="json").status_code == 201
    assert api.post(reverse("api-complete", args=[session.token])).status_code == 200
    session.refresh_from_db()


# ------------------------------------------------------------------------------ parsing


@pytest.mark.parametrize(
    "value",
    [
        "http://www.mturk.com", "https://evil.example", "https://www.mturk.com.evil.example",
        "https://evil.example/?www.mturk.com", "https://www.mturk.com@evil.example",
        "https://user@www.mturk.com", "https://www.mturk.com:8443",
        "https://www.mturk.com/mturk/externalSubmit", "https://www.mturk.com/?next=x",
        "https://www.mturk.com#x", "javascript:alert(1)", "//www.mturk.com", "www.mturk.com",
        "https://mturk.com", "https://workersandbox.mturk.com.",
    ],
)
def test_turk_submit_to_must_be_an_mturk_https_origin(value: str):
    with pytest.raises(BadRecruitmentLink, match="turkSubmitTo"):
        validate_turk_submit_to(value)


@pytest.mark.parametrize(
    "value,expected",
    [("https://www.mturk.com", "https://www.mturk.com"),
     ("https://workersandbox.mturk.com/", SANDBOX), ("HTTPS://WWW.MTURK.COM", "https://www.mturk.com")],
)
def test_mturk_origins_are_accepted(value: str, expected: str):
    assert validate_turk_submit_to(value) == expected
    assert mturk_submit_url(value) == f"{expected}/mturk/externalSubmit"


@pytest.mark.parametrize(
    "params,error",
    [
        ({"assignmentId": "A1", "turkSubmitTo": SANDBOX}, "no workerId"),
        ({"workerId": "W1", "turkSubmitTo": SANDBOX}, "no assignmentId"),
        ({"workerId": "W1", "assignmentId": "A1"}, "no turkSubmitTo"),
        (mturk(worker="W 1"), "workerId is not a valid id"),
        (mturk(worker="W1/../x"), "workerId is not a valid id"),
        (mturk(worker="W" * 201), "workerId is not a valid id"),
        ({**mturk(), "PROLIFIC_PID": "P1"}, "mixes MTurk and Prolific"),
        ({"STUDY_ID": "S1"}, "no PROLIFIC_PID"),
        ({"PROLIFIC_PID": "<script>"}, "PROLIFIC_PID is not a valid id"),
    ],
)
def test_bad_links_are_refused(params: dict, error: str):
    with pytest.raises(BadRecruitmentLink, match=error):
        parse_recruitment(params)


def test_links_are_read():
    assert parse_recruitment({}).source == "link"
    assert parse_recruitment({"utm_source": "mail"}).source == "link"  # unknown: ignored
    preview = parse_recruitment({"assignmentId": "ASSIGNMENT_ID_NOT_AVAILABLE", "hitId": "H"})
    assert preview.preview and preview.is_mturk and not preview.session_fields
    worker = parse_recruitment(mturk())
    assert (worker.source, worker.external_id, worker.preview) == ("mturk", "WORKER1", False)
    assert worker.session_fields == {
        "assignment_id": "ASSIGN1", "hit_id": "HIT1", "turk_submit_to": SANDBOX}
    person = parse_recruitment(prolific())
    assert (person.source, person.external_id) == ("prolific", "5f1a2b3c4d5e6f7a8b9c0d1e")
    assert person.session_fields == {
        "external_study_id": "STUDY9", "external_session_id": "SESSION9"}


# ------------------------------------------------------------------------------ MTurk


def test_an_mturk_preview_shows_the_instructions_and_writes_nothing(client: Client, study: Study):
    params = {"assignmentId": "ASSIGNMENT_ID_NOT_AVAILABLE", "hitId": "HIT1",
              "turkSubmitTo": SANDBOX}
    before = db_counts()
    response = client.get(link(study, params))
    assert response.status_code == 200
    html = response.content.decode()
    assert "Accept the HIT" in html and "Look closely at the centre" in html
    assert "img/example-a.svg" in html and "img/example-b.svg" in html
    assert "<form" not in html and "<button" not in html
    refused = client.post(link(study, params), {"decision": "agree"})
    assert refused.status_code == 400 and "preview" in refused.content.decode()
    assert db_counts() == before


def test_an_mturk_worker_starts_with_the_assignment_stored(client: Client, study: Study):
    response = client.get(link(study, mturk()))
    assert response.status_code == 200
    assert f'action="{link(study, mturk()).replace("&", "&amp;")}"' in response.content.decode()
    session = start(client, study, mturk(), HTTP_USER_AGENT="Mozilla/5.0 (test)")
    assert (session.participant.source, session.participant.external_id) == ("mturk", "WORKER1")
    assert (session.assignment_id, session.hit_id, session.turk_submit_to) == (
        "ASSIGN1", "HIT1", SANDBOX)
    assert session.user_agent == "Mozilla/5.0 (test)"
    assert len(session.ip_hash) == 64 and "127.0.0.1" not in session.ip_hash


def test_an_unfinished_session_resumes_under_a_new_assignment(client: Client, study: Study):
    first = start(client, study, mturk())
    page = Client().get(link(study, mturk(assignment="ASSIGN2")))  # another browser
    assert "Continue" in page.content.decode() and "already started" in page.content.decode()
    again = start(Client(), study, mturk(assignment="ASSIGN2"))
    assert again.pk == first.pk and again.assignment_id == "ASSIGN2"
    assert (Participant.objects.count(), Session.objects.count()) == (1, 1)


def test_a_worker_who_finished_cannot_take_the_study_again(
    client: Client, study: Study, judgment_body
):
    finish(start(client, study, mturk()), judgment_body)
    before = db_counts()
    for method in ("get", "post"):
        response = getattr(Client(), method)(link(study, mturk(assignment="ASSIGN2")))
        assert response.status_code == 403
        html = response.content.decode()
        assert "already taken part" in html and "return this HIT" in html
        assert "<form" not in html
    assert db_counts() == before


def test_retakes_make_a_new_session_of_the_same_participant(
    client: Client, make_study, judgment_body
):
    study = make_study(allow_retakes=True, trials_per_session=3)
    first = start(client, study, mturk())
    finish(first, judgment_body)
    second = start(Client(), study, mturk(assignment="ASSIGN2"))
    assert second.pk != first.pk and second.participant_id == first.participant_id
    assert second.assignment_id == "ASSIGN2"
    seen = set(first.trials.values_list("pair_id", flat=True))
    assert not seen & set(second.trials.values_list("pair_id", flat=True))


def test_a_reissued_assignment_gets_its_own_participant_and_session(
    client: Client, study: Study, judgment_body
):
    returned = start(client, study, mturk(worker="WORKER1", assignment="SAME"))
    api = APIClient()
    api.post(reverse("api-judgments", args=[returned.token]), judgment_body(0), format="json")
    reissued = start(Client(), study, mturk(worker="WORKER2", assignment="SAME"))
    assert reissued.pk != returned.pk
    assert reissued.participant_id != returned.participant_id
    assert reissued.participant.external_id == "WORKER2"
    assert reissued.assignment_id == returned.assignment_id == "SAME"
    assert Judgment.objects.filter(trial__session=reissued).count() == 0
    assert Judgment.objects.filter(trial__session=returned).count() == 1


@pytest.mark.parametrize("method", ["get", "post"])
@pytest.mark.parametrize(
    "submit_to", ["https://evil.example", "http://www.mturk.com", "https://www.mturk.com.evil.io"]
)
def test_a_foreign_turk_submit_to_is_a_400_page_and_writes_nothing(
    client: Client, study: Study, method: str, submit_to: str
):
    before = db_counts()
    response = getattr(client, method)(link(study, mturk(turkSubmitTo=submit_to)))
    assert response.status_code == 400
    html = response.content.decode()
    assert "turkSubmitTo" in html and "Nothing was recorded" in html and "<form" not in html
    assert db_counts() == before


def test_the_mturk_end_page_posts_the_assignment_to_mturk(
    client: Client, study: Study, judgment_body
):
    session = start(client, study, mturk())
    finish(session, judgment_body)
    html = client.get(reverse("session-done", args=[session.token])).content.decode()
    assert f'<form id="mturk-submit" method="post" action="{SANDBOX}/mturk/externalSubmit">' in html
    assert '<input type="hidden" name="assignmentId" value="ASSIGN1">' in html
    assert (f'<input type="hidden" name="completion_code" value="{session.completion_code}">'
            in html)
    assert "csrfmiddlewaretoken" not in html  # our CSRF token never goes to MTurk
    assert "js/done.js" in html


def test_an_end_page_never_posts_to_a_foreign_stored_submit_url(
    client: Client, study: Study, judgment_body
):
    session = start(client, study, mturk())
    finish(session, judgment_body)
    Session.objects.filter(pk=session.pk).update(turk_submit_to="https://evil.example")
    html = client.get(reverse("session-done", args=[session.token])).content.decode()
    assert "evil.example" not in html and "<form" not in html
    assert session.completion_code in html


# ------------------------------------------------------------------------------ Prolific


def test_a_prolific_participant_is_sent_back_with_the_study_code(
    client: Client, make_study, judgment_body
):
    study = make_study(prolific_completion_code="C0DE 42")
    session = start(client, study, prolific())
    assert (session.participant.source, session.participant.external_id) == (
        "prolific", "5f1a2b3c4d5e6f7a8b9c0d1e")
    assert (session.external_study_id, session.external_session_id) == ("STUDY9", "SESSION9")
    finish(session, judgment_body)
    html = client.get(reverse("session-done", args=[session.token])).content.decode()
    url = "https://app.prolific.com/submissions/complete?cc=C0DE+42"
    assert f'data-prolific-url="{url}"' in html and f'href="{url}"' in html
    assert "C0DE 42" in html  # the code is shown too
    again = Client().get(link(study, prolific()))
    assert again.status_code == 403 and "return your submission on Prolific" in (
        again.content.decode())


def test_without_a_study_code_prolific_participants_get_the_session_code(
    client: Client, study: Study, judgment_body
):
    session = start(client, study, prolific())
    finish(session, judgment_body)
    html = client.get(reverse("session-done", args=[session.token])).content.decode()
    assert "prolific.com" not in html and session.completion_code in html


# ------------------------------------------------------------------------------ plain links


def test_a_plain_link_participant_who_finished_is_recognised_by_the_browser(
    client: Client, study: Study, judgment_body
):
    finish(start(client, study), judgment_body)
    response = client.get(link(study))
    assert response.status_code == 403 and "already taken part" in response.content.decode()
    assert client.post(link(study), {"decision": "agree"}).status_code == 403
    assert Session.objects.count() == 1


def test_a_plain_link_retake_keeps_the_participant(client: Client, make_study, judgment_body):
    study = make_study(allow_retakes=True, trials_per_session=3)
    first = start(client, study)
    finish(first, judgment_body)
    second = start(client, study)
    assert second.pk != first.pk and second.participant_id == first.participant_id


def test_the_plain_end_page_shows_the_code(client: Client, study: Study, judgment_body):
    session = start(client, study)
    finish(session, judgment_body)
    html = client.get(reverse("session-done", args=[session.token])).content.decode()
    assert f'<p class="code" id="completion-code">{session.completion_code}</p>' in html
    assert "<form" not in html and "prolific" not in html


# ------------------------------------------------------------------------------ consent


CONSENT = "Your answers are stored without your name.\nYou may stop at any time."


def test_consent_is_asked_before_anything_is_stored(client: Client, make_study):
    study = make_study(consent_text=CONSENT)
    html = client.get(link(study, mturk())).content.decode()
    assert "Your answers are stored without your name." in html
    assert 'name="decision" value="agree"' in html and 'name="decision" value="decline"' in html
    before = db_counts()
    refused = client.post(link(study, mturk()))  # neither button
    assert refused.status_code == 400 and "I agree" in refused.content.decode()
    assert db_counts() == before
    start(client, study, mturk())
    assert Session.objects.count() == 1


@pytest.mark.parametrize("params", [None, mturk(), prolific()])
def test_declining_ends_politely_and_stores_nothing(client: Client, make_study, params):
    study = make_study(consent_text=CONSENT)
    before = db_counts()
    response = client.post(link(study, params), {"decision": "decline"})
    assert response.status_code == 200
    html = response.content.decode()
    assert "chose not to take part" in html and "Nothing was recorded" in html
    if params is not None:
        assert ("return the HIT" if "workerId" in params else "Prolific") in html
    assert db_counts() == before


def test_without_consent_text_there_is_no_consent_step(client: Client, study: Study):
    html = client.get(link(study)).content.decode()
    assert "Consent" not in html and 'value="decline"' not in html and ">Start</button>" in html


# ------------------------------------------------------------------------------ pages


def test_participant_pages_may_be_framed_by_mturk_only(client: Client, study: Study):
    session = start(client, study, mturk())
    for url in (link(study, mturk()), reverse("session-page", args=[session.token])):
        response = client.get(url)
        assert "X-Frame-Options" not in response, url
        assert response["Content-Security-Policy"] == (
            "frame-ancestors 'self' https://www.mturk.com https://workersandbox.mturk.com")
    assert client.get("/admin/login/")["X-Frame-Options"] == "DENY"


def test_the_runner_page_names_the_study_keys(client: Client, make_study, new_session):
    study = make_study(key_same="d", key_different="k", consent_text=CONSENT)
    session = new_session(study)
    html = client.get(reverse("session-page", args=[session.token])).content.decode()
    assert "Same <kbd>D</kbd>" in html and "Different <kbd>K</kbd>" in html
    assert f'data-token="{session.token}"' in html
    assert 'id="too-small"' in html and 'id="intro"' in html
