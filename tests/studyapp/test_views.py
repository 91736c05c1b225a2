"""Participant pages and API, through Django's test client and DRF's APIClient."""

from __future__ import annotations

import io
import json
import uuid

import numpy as np
import pytest
from django.contrib.auth import get_user_model
from django.test import Client
from django.urls import reverse
from PIL import Image, PngImagePlugin
from rest_framework.test import APIClient

from studyapp.image_tokens import image_url
from studyapp.models import Judgment, Pair, Participant, Session, Study, Trial

pytestmark = pytest.mark.django_db


@pytest.fixture
def api() -> APIClient:
    return APIClient()


def judgments_url(session: Session) -> str:
    return reverse("api-judgments", args=[session.token])


def pixels_of(png: bytes) -> bytes:
    """The RGBA pixels a decoder (Pillow) gets from ``png``."""
    with Image.open(io.BytesIO(png)) as img:
        return img.convert("RGBA").tobytes()


def answer_all(api: APIClient, session: Session, judgment_body) -> None:
    for trial in session.trials.all():
        response = api.post(judgments_url(session), judgment_body(trial.position), format="json")
        assert response.status_code == 201, response.json()


def db_counts() -> tuple[int, int, int, int]:
    return (
        Participant.objects.count(), Session.objects.count(), Trial.objects.count(),
        Judgment.objects.count(),
    )


# ------------------------------------------------------------------------------ start page


def test_start_page_gives_an_overview_and_a_start_form(client: Client, study: Study):
    response = client.get(reverse("study-start", args=[study.slug]))
    assert response.status_code == 200
    html = response.content.decode()
    assert study.title in html
    assert "5 pairs of images" in html and "same or different" in html
    # The instructions come once, in the trial runner (next test), not here as well.
    assert "Look closely at the centre of the screen." not in html and "<kbd>" not in html
    assert 'method="post"' in html and "csrfmiddlewaretoken" in html
    assert db_counts()[:2] == (0, 0)


def test_the_instructions_are_given_once_with_the_studys_own_keys(
    client: Client, make_study, new_session
):
    study = make_study(key_same="d", key_different="k", consent_text="You agree.",
                       first_ms=900, blank_ms=250, second_ms=700)
    start = client.get(reverse("study-start", args=[study.slug])).content.decode()
    session = new_session(study)
    runner = client.get(reverse("session-page", args=[session.token])).content.decode()
    pages = start + runner
    assert pages.count("Look closely at the centre of the screen.") == 1
    # The protocol (durations, keys) once, in the runner's instructions, with D and K.
    assert [pages.count(f"{ms} ms") for ms in (900, 250, 700)] == [1, 1, 1]
    assert "<kbd>D</kbd> for <strong>same</strong>" in runner
    assert "<kbd>K</kbd> for <strong>different</strong>" in runner
    assert "<kbd>F</kbd>" not in pages and "<kbd>J</kbd>" not in pages


def test_unknown_study_is_404(client: Client, study: Study):
    assert client.get("/study/no-such-study/").status_code == 404
    assert client.post("/study/no-such-study/").status_code == 404


@pytest.mark.parametrize("method", ["get", "post"])
def test_inactive_study_refuses_with_a_clear_page_and_writes_nothing(
    client: Client, make_study, method: str
):
    study = make_study(is_active=False)
    before = db_counts()
    response = getattr(client, method)(reverse("study-start", args=[study.slug]))
    assert response.status_code == 403
    assert "not accepting participants" in response.content.decode()
    assert "<form" not in response.content.decode()
    assert db_counts() == before


@pytest.mark.parametrize("method", ["get", "post"])
def test_study_without_pairs_refuses_and_writes_nothing(client: Client, make_study, method: str):
    study = make_study(with_pairs=False)
    response = getattr(client, method)(reverse("study-start", args=[study.slug]))
    assert response.status_code == 403
    assert "no images" in response.content.decode()
    assert db_counts() == (0, 0, 0, 0)


def test_start_creates_participant_session_and_trials(client: Client, study: Study):
    response = client.post(
        reverse("study-start", args=[study.slug]), HTTP_USER_AGENT="Mozilla/5.0 (pytest)"
    )
    session = Session.objects.get()
    assert response.status_code == 302
    assert response["Location"] == f"/session/{session.token}/"
    participant = session.participant
    assert participant.study == study and participant.source == "link"
    assert uuid.UUID(participant.external_id)
    assert session.user_agent == "Mozilla/5.0 (pytest)"
    trials = list(session.trials.select_related("pair"))
    assert [t.position for t in trials] == list(range(study.trials_per_session))
    assert sum(t.pair.is_sentinel for t in trials) == 1
    assert len({t.pair_id for t in trials}) == len(trials)


def test_a_second_start_from_the_same_browser_resumes(client: Client, study: Study):
    first = client.post(reverse("study-start", args=[study.slug]))
    assert "Continue" in client.get(reverse("study-start", args=[study.slug])).content.decode()
    second = client.post(reverse("study-start", args=[study.slug]))
    assert second["Location"] == first["Location"]
    assert db_counts()[:2] == (1, 1)
    assert Client().post(reverse("study-start", args=[study.slug])).status_code == 302
    assert db_counts()[:2] == (2, 2)


def test_start_needs_the_csrf_token(study: Study):
    response = Client(enforce_csrf_checks=True).post(reverse("study-start", args=[study.slug]))
    assert response.status_code == 403
    assert db_counts() == (0, 0, 0, 0)


# ------------------------------------------------------------------------------ pages


def test_session_page_loads_the_trial_runner(client: Client, session: Session):
    response = client.get(reverse("session-page", args=[session.token]))
    assert response.status_code == 200
    html = response.content.decode()
    assert '<script type="module" src="/static/js/trials.js">' in html
    assert f'data-state-url="/api/sessions/{session.token}/"' in html
    assert f'data-done-url="/session/{session.token}/done/"' in html
    assert "Same or different?" in html
    assert "csrftoken" in response.cookies


def test_unknown_session_is_404(client: Client, session: Session):
    for url in ["/session/nope/", "/session/nope/done/", "/img/nope/AAAAAAAAAAAAAAAAAAAAAA/"]:
        assert client.get(url).status_code == 404, url


def test_done_page_before_completion_goes_back_to_the_trials(client: Client, session: Session):
    response = client.get(reverse("session-done", args=[session.token]))
    assert response.status_code == 302
    assert response["Location"] == f"/session/{session.token}/"


def test_done_page_shows_the_code_and_the_trial_page_redirects_there(
    client: Client, api: APIClient, session: Session, judgment_body
):
    answer_all(api, session, judgment_body)
    assert api.post(reverse("api-complete", args=[session.token])).status_code == 200
    session.refresh_from_db()
    done = client.get(reverse("session-done", args=[session.token]))
    assert done.status_code == 200
    assert session.completion_code in done.content.decode()
    page = client.get(reverse("session-page", args=[session.token]))
    assert page.status_code == 302 and page["Location"] == f"/session/{session.token}/done/"


# ------------------------------------------------------------------------------ images


def _image_url(session: Session, position: int, slot: int) -> str:
    return image_url(session.token, position, slot)


def test_image_endpoint_serves_the_png_and_names_nothing(
    client: Client, session: Session, media_root
):
    for trial in session.trials.select_related("pair"):
        for slot in (1, 2):
            response = client.get(_image_url(session, trial.position, slot))
            assert response.status_code == 200
            assert response["Content-Type"] == "image/png"
            assert response["Cache-Control"] == "private, max-age=3600"
            # re-encoded canonically: the same pixels, not the same bytes
            assert pixels_of(response.content) == pixels_of(
                (media_root / trial.image_path(slot)).read_bytes()
            )
            assert response.content.startswith(b"\x89PNG\r\n\x1a\n")
            for header in ("Content-Disposition", "Last-Modified", "ETag"):
                assert header not in response, header
            header_text = " ".join(f"{k}: {v}" for k, v in response.items()).lower()
            for leak in ("png\"", trial.pair.source_image, "sentinel", "linf", "natural"):
                assert leak not in header_text


def test_image_urls_are_opaque_per_session_and_slot(
    client: Client, api: APIClient, study: Study, session: Session, new_session
):
    state = api.get(reverse("api-session", args=[session.token])).json()
    urls = [url for trial in state["trials"] for url in trial["images"]]
    assert len(set(urls)) == len(urls) == 2 * len(state["trials"])
    for trial in state["trials"]:
        for slot, url in enumerate(trial["images"], start=1):
            token, key = url.removeprefix("/img/").rstrip("/").split("/")
            assert token == session.token and len(key) == 22
            assert f"/{trial['position']}/" not in url and f"/{slot}/" not in url
            assert client.get(url).status_code == 200
    # Another session's token with this session's key, a tampered key, a made-up key: 404.
    other = new_session(study)
    first = state["trials"][0]["images"][0]
    key = first.rstrip("/").rsplit("/", 1)[1]
    tampered = key[:-1] + ("A" if key[-1] != "A" else "B")
    for url in (f"/img/{other.token}/{key}/", f"/img/{session.token}/{tampered}/",
                f"/img/{session.token}/short/", f"/img/nope/{key}/"):
        assert client.get(url).status_code == 404, url


def test_the_old_position_and_slot_urls_are_gone(client: Client, session: Session):
    for url in (f"/session/{session.token}/image/0/1/", f"/session/{session.token}/image/0/2/"):
        assert client.get(url).status_code == 404


def test_sentinel_slots_have_different_urls_and_bytes_and_the_same_pixels(
    client: Client, api: APIClient, session: Session
):
    sentinel = session.trials.get(pair__is_sentinel=True)
    state = api.get(reverse("api-session", args=[session.token])).json()
    first, second = state["trials"][sentinel.position]["images"]
    assert first != second
    a, b = client.get(first).content, client.get(second).content
    assert a != b and len(a) == len(b)
    assert pixels_of(a) == pixels_of(b)


def test_natural_first_decides_which_file_each_slot_serves(
    client: Client, session: Session, media_root
):
    from studyapp.stimulus_server import trial_paths

    trial = session.trials.filter(pair__is_sentinel=False).select_related("pair").first()
    for natural_first in (True, False):
        # (The scheduler never changes a trial's image order: the per-process cache of trial
        # paths assumes it. This test does, so it empties the cache.)
        Trial.objects.filter(pk=trial.pk).update(natural_first=natural_first)
        trial_paths.clear()
        first = client.get(_image_url(session, trial.position, 1)).content
        expected = trial.pair.natural_path if natural_first else trial.pair.other_path
        assert pixels_of(first) == pixels_of((media_root / expected).read_bytes())


def test_metadata_chunks_are_stripped_from_served_pngs(
    client: Client, session: Session, media_root
):
    trial = session.trials.filter(pair__is_sentinel=False).select_related("pair").first()
    path = media_root / trial.pair.other_path
    with Image.open(path) as img:
        pixels = np.asarray(img).copy()
        info = PngImagePlugin.PngInfo()
        info.add_text("attack", "linf:bound=0.031")
        img.save(path, format="PNG", pnginfo=info, dpi=(72, 72))
    assert b"linf" in path.read_bytes() and b"pHYs" in path.read_bytes()
    Trial.objects.filter(pk=trial.pk).update(natural_first=True)
    served = client.get(_image_url(session, trial.position, 2)).content
    assert b"linf" not in served and b"tEXt" not in served and b"pHYs" not in served
    with Image.open(io.BytesIO(served)) as img:
        assert np.array_equal(np.asarray(img), pixels)


def test_image_endpoint_404s_when_the_file_is_missing(client: Client, session: Session, media_root):
    trial = session.trials.select_related("pair").first()
    url = _image_url(session, trial.position, 1)
    assert client.get(url).status_code == 200
    (media_root / trial.image_path(1)).unlink()
    assert client.get(url).status_code == 404


# ------------------------------------------------------------------------------ session state


def test_state_lists_trials_with_opaque_image_urls(api: APIClient, session: Session):
    response = api.get(reverse("api-session", args=[session.token]))
    assert response.status_code == 200
    assert response["Cache-Control"] == "no-store"
    state = response.json()
    assert state["study"] == {
        "title": "Do these images differ?", "first_ms": 1000, "blank_ms": 250, "second_ms": 1000,
        "key_same": "f", "key_different": "j", "break_every": 0,
        "display_scale": 0, "display_rule": "nearest",
    }
    assert state["stimulus"] == {"width": 96, "height": 96}  # for the window-size check
    assert state["completed"] is False
    assert [t["position"] for t in state["trials"]] == list(range(5))
    for trial in state["trials"]:
        assert set(trial) == {"position", "images", "answered", "practice"}
        assert trial["answered"] is False and trial["practice"] is False
        assert trial["images"] == [
            _image_url(session, trial["position"], slot) for slot in (1, 2)
        ]
    text = json.dumps(state).lower()
    for leak in ("sentinel", "linf", "condition", "bound", ".png", "astronaut", "natural",
                 "catch", '"answer"'):
        assert leak not in text


def test_state_gives_the_answer_of_practice_trials_only(
    api: APIClient, make_study, new_session
):
    study = make_study(practice_trials=2, catch_pairs=2, key_same="d", key_different="k",
                       break_every=10)
    session = new_session(study)
    state = api.get(reverse("api-session", args=[session.token])).json()
    assert (state["study"]["key_same"], state["study"]["key_different"]) == ("d", "k")
    assert state["study"]["break_every"] == 10
    trials = {t.position: t for t in session.trials.select_related("pair")}
    practice = [t for t in state["trials"] if t["practice"]]
    assert [t["position"] for t in practice] == [0, 1]
    assert all(trials[t["position"]].is_practice for t in practice)
    for t in state["trials"]:
        pair = trials[t["position"]].pair
        if t["practice"]:
            assert t["answer"] == ("same" if pair.is_sentinel else "different")
            assert t["example"] == (pair.condition_id is not None)
        else:
            assert "answer" not in t and "example" not in t


def test_the_different_example_is_the_studys_most_visible_perturbed_pair(
    api: APIClient, make_study, new_session
):
    """Not two unrelated photographs (catch pairs): a perturbed pair of the study at its
    largest bound, the largest LPIPS first, among pairs this participant does not judge."""
    study = make_study(practice_trials=2, catch_pairs=2, trials_per_session=2)
    lpips = {pair.pk: 0.05 * (i + 1) for i, pair in enumerate(Pair.objects.filter(
        study=study, condition__isnull=False).order_by("-pk"))}
    for pk, value in lpips.items():
        Pair.objects.filter(pk=pk).update(distances={"linf": 0.1, "lpips_alex": value})
    for _ in range(3):
        session = new_session(study)
        trials = list(session.trials.select_related("pair__condition"))
        main = {t.pair_id for t in trials if not t.is_practice}
        largest = max(p.condition.bound for p in Pair.objects.filter(condition__isnull=False))
        candidates = [p for p in Pair.objects.filter(condition__bound=largest)
                      if p.pk not in main]
        expected = max(candidates, key=lambda p: lpips[p.pk])
        practice = [t for t in trials if t.is_practice]
        assert sorted(t.pair.is_sentinel for t in practice) == [False, True]
        (different,) = [t for t in practice if not t.pair.is_sentinel]
        assert different.pair_id == expected.pk and not different.pair.is_catch
        state = api.get(reverse("api-session", args=[session.token])).json()
        (marked,) = [t for t in state["trials"] if t.get("example")]
        assert marked["position"] == different.position and marked["answer"] == "different"


def test_state_marks_answered_trials(api: APIClient, session: Session, judgment_body):
    api.post(judgments_url(session), judgment_body(3), format="json")
    trials = api.get(reverse("api-session", args=[session.token])).json()["trials"]
    assert [t["answered"] for t in trials] == [False, False, False, True, False]


def test_unknown_token_is_a_json_404(api: APIClient, session: Session, judgment_body):
    for method, url, body in [
        ("get", "/api/sessions/nope/", None),
        ("post", "/api/sessions/nope/judgments/", judgment_body(0)),
        ("post", "/api/sessions/nope/complete/", {}),
    ]:
        response = getattr(api, method)(url, body, format="json")
        assert response.status_code == 404
        assert response.json()["error"] == "unknown session token"


def test_client_info_is_stored(api: APIClient, session: Session):
    info = {
        "window_width": 1280, "window_height": 720, "screen_width": 1920, "screen_height": 1080,
        "device_pixel_ratio": 2, "refresh_hz": 59.94, "frame_ms": 16.683, "frame_samples": 60,
    }
    response = api.patch(reverse("api-session", args=[session.token]), info, format="json")
    assert response.status_code == 200
    session.refresh_from_db()
    assert session.client_info == info


@pytest.mark.parametrize(
    "change,field",
    [({"refresh_hz": -1}, "refresh_hz"), ({"window_width": "wide"}, "window_width"),
     ({"device_pixel_ratio": None}, "device_pixel_ratio")],
)
def test_bad_client_info_is_400(api: APIClient, session: Session, change: dict, field: str):
    info = {"window_width": 1, "window_height": 1, "device_pixel_ratio": 1, "refresh_hz": 60,
            "frame_ms": 16.7, **change}
    response = api.patch(reverse("api-session", args=[session.token]), info, format="json")
    assert response.status_code == 400
    assert field in response.json()["error"]
    session.refresh_from_db()
    assert session.client_info == {}


# ------------------------------------------------------------------------------ judgments


def test_a_judgment_is_stored(api: APIClient, session: Session, judgment_body):
    body = judgment_body(2, response="same")
    response = api.post(judgments_url(session), body, format="json")
    assert response.status_code == 201
    assert response["Cache-Control"] == "no-store"
    data = response.json()
    assert {k: data[k] for k in body} == body
    judgment = Judgment.objects.get()
    assert judgment.trial == session.trials.get(position=2)
    assert (judgment.response, judgment.response_time_ms) == ("same", 812.4)
    assert (judgment.first_ms, judgment.blank_ms, judgment.second_ms) == (1000.1, 249.9, 1000.0)
    assert judgment.idempotency_key == body["idempotency_key"]


def test_resubmitting_with_the_same_key_returns_the_same_judgment(
    api: APIClient, session: Session, judgment_body
):
    body = judgment_body(1)
    created = api.post(judgments_url(session), body, format="json")
    again = api.post(judgments_url(session), body, format="json")
    assert (created.status_code, again.status_code) == (201, 200)
    assert again.json() == created.json()
    assert Judgment.objects.count() == 1


def test_another_judgment_for_an_answered_trial_is_409(
    api: APIClient, session: Session, judgment_body
):
    api.post(judgments_url(session), judgment_body(1), format="json")
    response = api.post(judgments_url(session), judgment_body(1, response="same"), format="json")
    assert response.status_code == 409
    assert "position 1 already has a judgment" in response.json()["error"]
    assert Judgment.objects.get().response == "different"


def test_reusing_a_key_for_a_different_judgment_is_409(
    api: APIClient, session: Session, judgment_body
):
    body = judgment_body(1)
    api.post(judgments_url(session), body, format="json")
    for changed in (judgment_body(2, idempotency_key=body["idempotency_key"]),
                    {**body, "response": "same"}):
        response = api.post(judgments_url(session), changed, format="json")
        assert response.status_code == 409
        assert "idempotency_key" in response.json()["error"]
    assert Judgment.objects.count() == 1


def test_a_key_from_another_session_is_409(
    api: APIClient, study: Study, session: Session, new_session, judgment_body
):
    body = judgment_body(0)
    api.post(judgments_url(session), body, format="json")
    other = new_session(study)
    response = api.post(judgments_url(other), body, format="json")
    assert response.status_code == 409
    assert Judgment.objects.count() == 1


def test_unknown_position_is_404(api: APIClient, session: Session, judgment_body):
    response = api.post(judgments_url(session), judgment_body(99), format="json")
    assert response.status_code == 404
    assert response.json()["error"] == "this session has no trial at position 99"
    assert Judgment.objects.count() == 0


def _without(body: dict, *path: str) -> dict:
    body = json.loads(json.dumps(body))
    target = body
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    return body


def _with(body: dict, value, *path: str) -> dict:
    body = json.loads(json.dumps(body))
    target = body
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return body


BAD_BODIES = [
    # (name, make the bad body from a good one, words the error must contain)
    ("missing position", lambda b: _without(b, "position"), ["position", "required"]),
    ("position as text", lambda b: _with(b, "0", "position"), ["position", "integer"]),
    ("negative position", lambda b: _with(b, -1, "position"), ["position", "greater than"]),
    ("missing response", lambda b: _without(b, "response"), ["response", "required"]),
    ("bad response", lambda b: _with(b, "maybe", "response"), ["response", "maybe"]),
    ("missing rt", lambda b: _without(b, "response_time_ms"), ["response_time_ms", "required"]),
    ("negative rt", lambda b: _with(b, -0.5, "response_time_ms"),
     ["response_time_ms", "greater than or equal to 0"]),
    ("rt over 10 min", lambda b: _with(b, 600_000.5, "response_time_ms"),
     ["response_time_ms", "less than or equal to 600000"]),
    ("rt as text", lambda b: _with(b, "fast", "response_time_ms"),
     ["response_time_ms", "number"]),
    ("rt boolean", lambda b: _with(b, True, "response_time_ms"), ["response_time_ms", "number"]),
    ("missing durations", lambda b: _without(b, "durations"), ["durations", "required"]),
    ("durations not an object", lambda b: _with(b, [1000, 250, 1000], "durations"),
     ["durations"]),
    ("missing blank", lambda b: _without(b, "durations", "blank_ms"),
     ["durations.blank_ms", "required"]),
    ("negative first", lambda b: _with(b, -1, "durations", "first_ms"),
     ["durations.first_ms", "greater than or equal to 0"]),
    ("second over 60 s", lambda b: _with(b, 60_001, "durations", "second_ms"),
     ["durations.second_ms", "less than or equal to 60000"]),
    ("missing key", lambda b: _without(b, "idempotency_key"), ["idempotency_key", "required"]),
    ("empty key", lambda b: _with(b, "", "idempotency_key"), ["idempotency_key", "blank"]),
    ("key too long", lambda b: _with(b, "k" * 65, "idempotency_key"),
     ["idempotency_key", "64"]),
]


@pytest.mark.parametrize("make_bad,words", [(m, w) for _, m, w in BAD_BODIES],
                         ids=[name for name, _, _ in BAD_BODIES])
def test_bad_judgment_bodies_are_400_and_write_nothing(
    api: APIClient, session: Session, judgment_body, make_bad, words
):
    before = db_counts()
    response = api.post(judgments_url(session), make_bad(judgment_body(0)), format="json")
    assert response.status_code == 400
    error = response.json()["error"]
    for word in words:
        assert word in error, (word, error)
    assert db_counts() == before


@pytest.mark.parametrize("raw", [b"{not json", b'{"position": NaN}', b"[]"])
def test_unparseable_or_non_object_bodies_are_400(api: APIClient, session: Session, raw: bytes):
    response = api.generic(
        "POST", judgments_url(session), raw, content_type="application/json"
    )
    assert response.status_code == 400
    assert response.json()["error"]
    assert Judgment.objects.count() == 0


def test_wrong_method_is_a_json_405(api: APIClient, session: Session):
    response = api.get(judgments_url(session))
    assert response.status_code == 405
    assert response.json()["error"] == 'Method "GET" not allowed.'


def test_no_cookie_gives_power_in_the_participant_api(session: Session, judgment_body):
    """The token is the only credential: a staff login is never read (no Django session, no
    user row), so no cross-site request can borrow it, and no CSRF token is needed."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    user = get_user_model().objects.create_user("staff", password="pw", is_staff=True)
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    body = json.dumps(judgment_body(0))
    with CaptureQueriesContext(connection) as queries:
        accepted = client.post(judgments_url(session), body, content_type="application/json")
        state = client.get(reverse("api-session", args=[session.token]))
    assert accepted.status_code == 201
    assert state.status_code == 200
    touched = " ".join(q["sql"] for q in queries.captured_queries)
    assert "django_session" not in touched and "auth_user" not in touched
    assert Judgment.objects.count() == 1


def test_anonymous_participants_need_no_csrf_token(session: Session, judgment_body):
    client = Client(enforce_csrf_checks=True)
    response = client.post(
        judgments_url(session), json.dumps(judgment_body(0)), content_type="application/json"
    )
    assert response.status_code == 201


# ------------------------------------------------------------------------------ completion


def test_complete_before_every_trial_is_answered_is_409(
    api: APIClient, session: Session, judgment_body
):
    api.post(judgments_url(session), judgment_body(0), format="json")
    response = api.post(reverse("api-complete", args=[session.token]))
    assert response.status_code == 409
    assert response.json()["error"] == "4 of 5 trials are still unanswered"
    assert "completion_code" not in response.json()
    session.refresh_from_db()
    assert session.completed_at is None


def test_complete_after_every_trial_returns_the_code(
    api: APIClient, session: Session, judgment_body
):
    answer_all(api, session, judgment_body)
    response = api.post(reverse("api-complete", args=[session.token]))
    assert response.status_code == 200
    session.refresh_from_db()
    assert response.json()["completion_code"] == session.completion_code
    assert session.completed_at is not None
    again = api.post(reverse("api-complete", args=[session.token]))
    assert again.json()["completion_code"] == session.completion_code
    completed_at = session.completed_at
    session.refresh_from_db()
    assert session.completed_at == completed_at
    assert api.get(reverse("api-session", args=[session.token])).json()["completed"] is True


# ------------------------------------------------------------------------------ staff


def test_staff_page_requires_staff(client: Client, study: Study):
    response = client.get("/staff/")
    assert response.status_code == 302
    assert response["Location"].startswith("/admin/login/?next=/staff/")
    user = get_user_model().objects.create_user("worker", password="pw")
    client.force_login(user)
    assert client.get("/staff/").status_code == 302


def test_staff_page_lists_studies_with_counts(
    client: Client, api: APIClient, study: Study, session: Session, judgment_body
):
    api.post(judgments_url(session), judgment_body(0), format="json")
    client.force_login(get_user_model().objects.create_user("boss", password="pw", is_staff=True))
    response = client.get("/staff/")
    assert response.status_code == 200
    html = response.content.decode()
    assert study.title in html
    assert "http://testserver/study/jnd-demo/" in html
    # data pairs, sentinel pairs, sessions, completed, main judgments (see test_reports.py)
    for name, value in [("n_pairs", 6), ("n_sentinel_pairs", 3), ("n_sessions", 1),
                        ("n_completed", 0), ("n_judgments", 1)]:
        assert f'data-count="{name}">{value}<' in html, name
    assert 'href="/admin/"' in html


# ------------------------------------------------------------------------------ display (issue 17)


def test_a_judgment_stores_how_its_images_were_drawn(
    api: APIClient, session: Session, judgment_body
):
    display = {"scale": 1, "device_pixel_ratio": 1.25, "exact": True}
    response = api.post(judgments_url(session), judgment_body(0, display=display), format="json")
    assert response.status_code == 201 and response.json()["display"] == display
    response = api.post(judgments_url(session), judgment_body(1), format="json")  # not reported
    assert response.status_code == 201 and response.json()["display"] is None
    stored = {j.trial.position: j for j in Judgment.objects.select_related("trial")}
    assert (stored[0].display_scale, stored[0].device_pixel_ratio, stored[0].display_exact) == (
        1, 1.25, True)
    assert (stored[1].display_scale, stored[1].device_pixel_ratio, stored[1].display_exact) == (
        None, None, None)


@pytest.mark.parametrize("display,field", [
    ({"scale": 0, "device_pixel_ratio": 1, "exact": True}, "display.scale"),
    ({"scale": 1.5, "device_pixel_ratio": 1, "exact": True}, "display.scale"),
    ({"scale": 1, "device_pixel_ratio": "1.25", "exact": True}, "display.device_pixel_ratio"),
    ({"scale": 1, "device_pixel_ratio": 1, "exact": "yes"}, "display.exact"),
    ({"scale": 1, "device_pixel_ratio": 1}, "display.exact"),
    ([1, 1, True], "display"),
])
def test_a_bad_display_object_is_400_and_writes_nothing(
    api: APIClient, session: Session, judgment_body, display, field
):
    response = api.post(judgments_url(session), judgment_body(0, display=display), format="json")
    assert response.status_code == 400 and field in response.json()["error"], response.json()
    assert Judgment.objects.count() == 0


def _answer_with_display(api, session, judgment_body, display) -> None:
    for trial in session.trials.all():
        body = judgment_body(trial.position, display=display)
        assert api.post(judgments_url(session), body, format="json").status_code == 201
    assert api.post(reverse("api-complete", args=[session.token])).status_code == 200


def test_rescaled_and_resampled_sessions_are_flagged_and_excluded_under_the_rule(
    api: APIClient, make_study, new_session, judgment_body
):
    from studyapp.quality import apply_exclusions, compute_quality

    study = make_study(trials_per_session=3)
    exact, nearest, resampled = (new_session(study) for _ in range(3))
    _answer_with_display(api, exact, judgment_body,
                         {"scale": 2, "device_pixel_ratio": 2, "exact": True})
    _answer_with_display(api, nearest, judgment_body,  # Windows at 125 %: drawn at n = 1
                         {"scale": 1, "device_pixel_ratio": 1.25, "exact": True})
    _answer_with_display(api, resampled, judgment_body,
                         {"scale": 1, "device_pixel_ratio": 1, "exact": False})
    rows = compute_quality(study)
    assert all(set(q.display_flags) <= set(q.flags) for q in rows)  # shown with the others
    flags = {q.session_id: q.display_flags for q in rows}
    assert flags[exact.pk] == []
    assert flags[nearest.pk] == [
        "display rescaled: 3/3 main trials drawn at the nearest whole factor, not the image's "
        "own size (1× at device pixel ratio 1.25)"]
    assert flags[resampled.pk] == [
        "display resampled: 3/3 main trials not drawn at a whole number of device pixels per "
        "image pixel"]
    assert not any(q.excluded for q in apply_exclusions(study))
    # The staff export carries each trial's display.
    from studyapp.reports import export_rows

    columns, rows = export_rows(study)
    assert {"display_scale", "device_pixel_ratio", "display_exact"} <= set(columns)
    assert {(r["session_id"], r["display_scale"], r["device_pixel_ratio"], r["display_exact"])
            for r in rows} == {(exact.pk, 2, 2.0, True), (nearest.pk, 1, 1.25, True),
                               (resampled.pk, 1, 1.0, False)}
    # A study that states its n (2 device pixels per image pixel) rescales nothing.
    Study.objects.filter(pk=study.pk).update(display_scale=1)
    study.refresh_from_db()
    assert {q.session_id: q.display_flags for q in compute_quality(study)}[nearest.pk] == []
    Study.objects.filter(pk=study.pk).update(display_scale=0, exclude_inexact_display=True)
    study.refresh_from_db()
    excluded = {q.session_id: q.excluded for q in apply_exclusions(study)}
    assert excluded == {exact.pk: False, nearest.pk: True, resampled.pk: True}
    assert Session.objects.get(pk=resampled.pk).exclusion_reason.startswith("display resampled")


# ------------------------------------------------------------------------------ error pages


def test_a_mistyped_link_gets_a_styled_404_page_and_json_under_the_api(client: Client, settings):
    assert settings.DEBUG is False  # (Django's handler404 only runs without DEBUG)
    response = client.get("/studdy/demo/")
    html = response.content.decode()
    assert response.status_code == 404 and response["Content-Type"].startswith("text/html")
    assert "<h1>Page not found</h1>" in html and "css/study.css" in html
    assert "Not Found</h1>" not in html  # Django's stock page
    response = client.get("/api/nope/")
    assert response.status_code == 404
    assert response.json() == {"error": "There is no page at this address.", "code": "not_found"}


def test_a_request_django_refuses_gets_a_styled_400_page(client: Client):
    response = client.get("/study/demo/", HTTP_HOST="evil.example")  # not in ALLOWED_HOSTS
    html = response.content.decode()
    assert response.status_code == 400 and response["Content-Type"].startswith("text/html")
    assert "could not be handled" in html and "css/study.css" in html
    assert "Bad Request (400)" not in html  # Django's stock page
