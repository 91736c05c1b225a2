"""A consent POST retried after its answer was lost resumes the session the first one started."""

from __future__ import annotations

import re

import pytest
from django.test import Client

from studyapp.models import Pair, Participant, Session
from studyapp.scheduler import assignment_errors

pytestmark = pytest.mark.django_db


def _start_key(client: Client, url: str) -> str:
    html = client.get(url).content.decode()
    found = re.search(r'name="start_key" value="([^"]+)"', html)
    assert found, "the consent form carries a start_key"
    return found.group(1)


@pytest.mark.parametrize(
    "query", ["", "?PROLIFIC_PID=p1&STUDY_ID=s1&SESSION_ID=x1"], ids=["plain", "prolific"]
)
def test_a_retried_consent_post_resumes_the_first_session(make_study, query: str):
    study = make_study(consent_text="I agree to take part.")
    url = f"/study/{study.slug}/{query}"
    key = _start_key(Client(), url)
    body = {"decision": "agree", "start_key": key}
    first = Client().post(url, body)
    assert first.status_code == 302
    # The answer (and its cookie) never arrived: the browser sends the same form again.
    retry = Client().post(url, body)
    assert retry.status_code == 302
    assert retry["Location"] == first["Location"]
    assert Participant.objects.count() == 1 and Session.objects.count() == 1
    assert assignment_errors(study) == []
    leased = sum(Pair.objects.filter(study=study).values_list("n_assigned", flat=True))
    assert leased == Session.objects.get().trials.filter(is_practice=False, pair__is_sentinel=False,
                                                         pair__is_catch=False).count()


def test_two_people_on_one_plain_link_get_two_sessions(make_study):
    study = make_study()
    url = f"/study/{study.slug}/"
    a, b = Client(), Client()
    ra = a.post(url, {"decision": "agree", "start_key": _start_key(a, url)})
    rb = b.post(url, {"decision": "agree", "start_key": _start_key(b, url)})
    assert ra["Location"] != rb["Location"]
    assert Participant.objects.count() == 2 and Session.objects.count() == 2


def test_a_malformed_start_key_is_ignored_not_an_error(make_study):
    study = make_study()
    response = Client().post(f"/study/{study.slug}/", {"decision": "agree", "start_key": "x" * 500})
    assert response.status_code == 302
    assert Session.objects.get().start_key is None
