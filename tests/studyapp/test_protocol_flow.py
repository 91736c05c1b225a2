"""Protocols beyond JND through the participant API (issue 18): session state, answers and
phases checked per protocol, image slots and bytes, the scheduler (K, practice, retests), and
a cold server's timing.

The oracle for what each slot shows is :func:`studyapp.protocols.image_paths` applied to the
stored truth (Pair, Trial.natural_first), compared pixel for pixel with the stored PNG files.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from django.test import Client
from PIL import Image
from protocol_items import LABEL_SET, VARIANTS, make_protocol_study
from rest_framework.test import APIClient

from studyapp.image_tokens import image_key
from studyapp.models import Judgment, Pair, Participant, Session, Trial
from studyapp.protocols import correct_answer, image_paths, trial_spec
from studyapp.scheduler import (
    RETEST_GAP,
    StudyUnavailable,
    assignment_errors,
    retest_count,
    start_session,
)

pytestmark = pytest.mark.django_db

GOOD_ANSWER = {"2afc": "left", "rating": "3", "rating-single": "5", "label": "cat"}
# An answer of another protocol: each must be refused.
WRONG_ANSWERS = {
    "2afc": ["same", "1", "cat", "Left", "left "],
    "rating": ["same", "left", "0", "6", "3.0", " 3"],
    "rating-single": ["different", "6", "1.5"],
    "label": ["left", "1", "dog", "Cat"],
}


def _session(study, **kwargs) -> Session:
    participant = Participant.objects.create(study=study, external_id=str(uuid.uuid4()))
    return start_session(participant, **kwargs)


def _state(session: Session) -> dict:
    response = APIClient().get(f"/api/sessions/{session.token}/")
    assert response.status_code == 200
    return response.json()


def _rgba(body: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(body)) as img:
        return np.asarray(img.convert("RGBA"))


def _body(position: int, response: str, phases=("first_ms",), **extra) -> dict:
    durations = {"first_ms": 300.1, "blank_ms": 100.0, "second_ms": 299.9}
    return {
        "position": position, "response": response, "response_time_ms": 612.5,
        "durations": {k: durations[k] for k in phases}, "idempotency_key": str(uuid.uuid4()),
        **extra,
    }


def _post(session: Session, body: dict):
    return APIClient().post(f"/api/sessions/{session.token}/judgments/", body, format="json")


def _expected_files(trial: Trial) -> tuple[str, ...]:
    spec = trial_spec(trial.pair.study)
    pair = trial.pair
    return image_paths(spec.protocol, spec.n_images, trial.natural_first, pair.natural_path,
                       pair.other_path, pair.third_path)


# ------------------------------------------------------------------------------ state


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_state_carries_the_protocol_and_n_images_opaque_urls(media_root, variant):
    study = make_protocol_study(media_root, variant, practice_trials=2)
    session = _session(study)
    state = _state(session)
    spec = trial_spec(study)
    assert state["study"]["protocol"] == spec.to_dict()
    assert state["study"]["protocol"]["n_images"] == {"2afc": 3, "rating": 2}.get(variant, 1)
    truth = {t.position: t for t in session.trials.select_related("pair")}
    for trial in state["trials"]:
        t = truth[trial["position"]]
        assert len(trial["images"]) == spec.n_images
        assert len(set(trial["images"])) == spec.n_images
        known = correct_answer(
            study, is_sentinel=t.pair.is_sentinel, natural_first=t.natural_first,
            natural_path=t.pair.natural_path, other_path=t.pair.other_path,
            third_path=t.pair.third_path, class_name=t.pair.class_name,
        )
        if t.is_practice and known is not None and spec.feedback:
            assert trial["answer"] == known
            assert set(trial) == {"position", "images", "answered", "practice", "answer"}
        else:  # main trials (and practice without a known answer): nothing about the item
            assert set(trial) == {"position", "images", "answered", "practice"}
    main = [t for t in state["trials"] if not t["practice"]]
    text = json.dumps({**state, "trials": main}).lower()
    for leak in ("sentinel", "linf", "condition", "bound", ".png", "astronaut", "natural",
                 "control", "reference", "small", "large", '"answer"', "true_class"):
        assert leak not in text, leak
    if variant != "label":  # (the label set is the answers, named in the protocol block)
        assert all(name not in text for name in ("person", "cup"))


@pytest.mark.parametrize("variant", ["2afc", "label"])
def test_practice_comes_from_control_items_with_their_answer(media_root, variant):
    study = make_protocol_study(media_root, variant, practice_trials=2, controls_per_photo=2,
                                sentinel_fraction=0.25)
    for _ in range(3):
        session = _session(study)
        practice = session.trials.filter(is_practice=True).select_related("pair")
        assert practice.count() == 2 and all(t.pair.is_sentinel for t in practice)
        answers = [t["answer"] for t in _state(session)["trials"] if t["practice"]]
        if variant == "2afc":
            # The control's A (= the reference) is drawn on the left when natural_first.
            assert answers == ["left" if t.natural_first else "right" for t in practice]
        else:
            assert answers == [t.pair.class_name for t in practice]
            assert set(answers) <= set(LABEL_SET)


def test_rating_practice_gives_feedback_only_where_there_is_an_answer(media_root):
    pair_study = make_protocol_study(media_root, "rating", practice_trials=2)
    session = _session(pair_study)
    practice = [t for t in _state(session)["trials"] if t["practice"]]
    truth = {t.position: t for t in session.trials.select_related("pair")}
    assert len(practice) == 2
    for trial in practice:  # an identical-pair anchor: "1"; a data pair: no answer
        assert trial.get("answer") == ("1" if truth[trial["position"]].pair.is_sentinel else None)
    assert any(truth[t["position"]].pair.is_sentinel for t in practice)
    single = make_protocol_study(media_root, "rating-single", slug="single", practice_trials=2)
    assert all("answer" not in t for t in _state(_session(single))["trials"])


# ------------------------------------------------------------------------------ answers


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_wrong_answer_type_is_a_clear_400_and_writes_nothing(media_root, variant):
    study = make_protocol_study(media_root, variant)
    session = _session(study)
    phases = trial_spec(study).phases
    for wrong in WRONG_ANSWERS[variant]:
        response = _post(session, _body(0, wrong, phases))
        assert response.status_code == 400, (wrong, response.content)
        error = response.json()["error"]
        assert error.startswith("response: ") and repr(wrong) in error, error
        accepted = trial_spec(study).answers
        assert all(repr(a) in error for a in accepted[:3]), error  # names what it accepts
    for not_a_string in (3, True, None, ["left"]):
        response = _post(session, _body(0, not_a_string, phases))
        assert response.status_code == 400 and "response" in response.json()["error"]
    assert Judgment.objects.count() == 0
    response = _post(session, _body(0, GOOD_ANSWER[variant], phases))
    assert response.status_code == 201, response.content
    assert Judgment.objects.get().response == GOOD_ANSWER[variant]


@pytest.mark.parametrize("variant", ["2afc", "rating-single", "label"])
def test_one_image_protocols_send_only_first_ms(media_root, variant):
    study = make_protocol_study(media_root, variant)
    session = _session(study)
    answer = GOOD_ANSWER[variant]
    # A blank or second phase is a runner of another protocol: refused, nothing written.
    for phases in (("first_ms", "blank_ms", "second_ms"), ("first_ms", "second_ms")):
        response = _post(session, _body(0, answer, phases))
        assert response.status_code == 400
        error = response.json()["error"]
        assert f"a {study.protocol} trial has no" in error and "send only first_ms" in error
    response = _post(session, _body(0, answer, ()))
    assert response.status_code == 400
    assert response.json()["error"] == "durations.first_ms: This field is required."
    assert Judgment.objects.count() == 0
    explicit_null = _body(0, answer)
    explicit_null["durations"].update(blank_ms=None, second_ms=None)
    for position, body in ((0, _body(0, answer)), (1, {**explicit_null, "position": 1})):
        response = _post(session, body)
        assert response.status_code == 201, response.content
        assert response.json()["durations"] == {
            "first_ms": 300.1, "blank_ms": None, "second_ms": None}
        stored = Judgment.objects.get(trial__position=position)
        assert (stored.first_ms, stored.blank_ms, stored.second_ms) == (300.1, None, None)
    # A retry of the same body (same key) is still the same judgment: 200, stored once.
    again = _post(session, explicit_null | {"position": 1})
    assert again.status_code == 200 and Judgment.objects.count() == 2


def test_two_image_protocols_need_every_phase(media_root):
    study = make_protocol_study(media_root, "rating")
    session = _session(study)
    for phases, missing in (
        (("first_ms", "blank_ms"), "second_ms"), (("first_ms", "second_ms"), "blank_ms"),
    ):
        response = _post(session, _body(0, "2", phases))
        assert response.status_code == 400
        assert response.json()["error"] == f"durations.{missing}: This field is required."
    assert Judgment.objects.count() == 0
    full = _post(session, _body(0, "2", ("first_ms", "blank_ms", "second_ms")))
    assert full.status_code == 201 and full.json()["durations"]["blank_ms"] == 100.0


def test_an_edited_label_set_is_seen_by_new_sessions(media_root):
    """The answers are the study's label set (cached per session token, not per study)."""
    study = make_protocol_study(media_root, "label")
    first = _session(study)
    assert _post(first, _body(0, "cat")).status_code == 201
    study.label_set = [*LABEL_SET, "dog"]
    study.save()
    second = _session(study)
    assert _post(second, _body(0, "dog")).status_code == 201


# ------------------------------------------------------------------------------ images


class _FastPath:
    """Fetches through the WSGI fast path in front of Django, counting Django's calls."""

    def __init__(self) -> None:
        from django.core.handlers.wsgi import WSGIHandler
        from django.test import RequestFactory

        from studyapp.stimulus_server import StimulusWSGI

        self.django_calls = 0
        django = WSGIHandler()

        def counted(environ, start_response):
            self.django_calls += 1
            return django(environ, start_response)

        self.app = StimulusWSGI(counted)
        self.factory = RequestFactory()

    def get(self, url: str):
        environ = self.factory._base_environ(PATH_INFO=url, REQUEST_METHOD="GET")
        started = {}

        def start_response(status, headers, exc_info=None):
            started["status"], started["headers"] = int(status.split()[0]), dict(headers)

        body = b"".join(self.app(environ, start_response))
        return started["status"], sorted(started["headers"].items()), body


def _fetch_all(study, n_sessions: int, client: str) -> list[dict]:
    """Every image of ``n_sessions`` sessions, with the truth per trial."""
    fast = _FastPath() if client == "fast" else None
    view = Client()
    out = []
    for _ in range(n_sessions):
        session = _session(study)
        truth = {t.position: t for t in session.trials.select_related("pair__study")}
        for trial in _state(session)["trials"]:
            fetched = []
            for url in trial["images"]:
                if fast is not None:
                    status, headers, body = fast.get(url)
                else:
                    r = view.get(url)
                    status, headers, body = r.status_code, sorted(r.items()), r.content
                assert status == 200, url
                fetched.append((headers, body))
            out.append({"trial": truth[trial["position"]], "images": fetched})
    if fast is not None:
        assert fast.django_calls == 0  # every image was answered by the fast path
    return out


@pytest.mark.parametrize("client", ["view", "fast"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_slot_serves_its_file_and_bytes_tell_nothing(media_root, variant, client):
    """Each slot's pixels are the file image_paths names (2AFC: reference, left, right with A
    on the left when natural_first); every image has the same length and headers and fresh
    bytes, so neither which side is which nor a control's identical images show in bytes."""
    study = make_protocol_study(media_root, variant, trials_per_session=4,
                                sentinel_fraction=0.25, practice_trials=1)
    fetched = _fetch_all(study, n_sessions=3, client=client)
    assert any(f["trial"].pair.is_sentinel for f in fetched)
    bodies = []
    for f in fetched:
        files = _expected_files(f["trial"])
        for (headers, body), name in zip(f["images"], files, strict=True):
            assert np.array_equal(_rgba(body), _rgba((media_root / name).read_bytes())), name
            bodies.append((headers, body))
    assert len({len(body) for _, body in bodies}) == 1
    assert len({tuple(headers) for headers, _ in bodies}) == 1
    assert Counter(hashlib.sha256(b).digest() for _, b in bodies).most_common(1)[0][1] == 1
    if variant == "2afc":  # a control's reference and A are the same file: not in bytes
        controls = [f for f in fetched if f["trial"].pair.is_sentinel]
        for f in controls:
            same = [i for i, n in enumerate(_expected_files(f["trial"])) if n ==
                    f["trial"].pair.natural_path]
            assert len(same) == 2
            assert f["images"][same[0]][1] != f["images"][same[1]][1]


def test_slot_3_keys_are_their_own_range_and_jnd_keys_are_unchanged():
    """Slot 3 (2AFC's right copy) has keys of its own: never equal to a slot 1/2 key, decoded
    back to (position, 3); slots 1 and 2 keep JND's index 2·position + slot − 1, so a key
    built from that index by the permutation and tag is the same as before."""
    import base64

    from studyapp.image_tokens import (
        _image_key,
        _permute,
        _session_key,
        _tag,
        decode_image_key,
    )

    token = "token-3"
    keys = {}
    for position in (*range(0, 300), 2**20, 2**30 - 1):
        for slot in (1, 2, 3):
            key = image_key(token, position, slot)
            assert decode_image_key(token, key) == (position, slot)
            assert key not in keys, (position, slot, keys.get(key))
            keys[key] = (position, slot)
    session_key = _session_key(token)
    for position, slot in ((0, 1), (7, 2), (2**20, 1)):  # the pre-protocol construction
        index = 2 * position + slot - 1
        raw = _permute(session_key, index).to_bytes(4, "big") + _tag(session_key, index)
        assert _image_key(session_key, position, slot) == (
            base64.urlsafe_b64encode(raw).rstrip(b"=").decode())
    for position, slot in ((2**30, 1), (2**31, 3), (-1, 3), (0, 4)):
        with pytest.raises(ValueError):
            image_key(token, position, slot)


def test_a_slot_the_protocol_does_not_show_is_404(media_root, make_study):
    """Keys of slot 3 are valid only for 2AFC; a one-image trial has no slot 2."""
    jnd = _session(make_study())
    label = _session(make_protocol_study(media_root, "label"))
    for session, slot in ((jnd, 3), (label, 2), (label, 3)):
        url = f"/img/{session.token}/{image_key(session.token, 0, slot)}/"
        assert Client().get(url).status_code == 404
        status, _, _ = _FastPath().get(url)
        assert status == 404


def test_third_paths_are_prepared(media_root, settings):
    from studyapp import stimulus_rows

    study = make_protocol_study(media_root, "2afc")
    names = stimulus_rows.stimulus_names(study.pairs.all())
    thirds = set(study.pairs.values_list("third_path", flat=True))
    assert thirds <= set(names) and len(thirds) == 6  # 3 triplets' B + 3 controls' B
    summary = stimulus_rows.prepare_study(study)
    assert summary.decoded == len(names) and not summary.failed
    assert len(list(Path(settings.PERCEPTLAB_ROWS_DIR).glob("*.rows"))) == len(names)


# ------------------------------------------------------------------------------ scheduler


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_items_of_every_protocol_get_k_judgments_and_never_repeat(media_root, variant):
    study = make_protocol_study(media_root, variant, judgments_per_pair=2,
                                trials_per_session=3, sentinel_fraction=0.34,
                                practice_trials=1, variants_per_photo=2)
    spec = trial_spec(study)
    n_data = study.pairs.filter(is_sentinel=False).count()
    sessions = []
    while True:
        try:
            sessions.append(_session(study))
        except StudyUnavailable as exc:  # once every item has K
            assert "judgments" in str(exc) or "seen" in str(exc), exc
            break
        assert len(sessions) < 100
    main = Trial.objects.filter(session__in=sessions, is_practice=False, pair__is_sentinel=False)
    per_item = Counter(main.values_list("pair_id", flat=True))
    assert set(per_item.values()) == {2} and len(per_item) == n_data
    for session in sessions:
        pairs = list(session.trials.values_list("pair_id", flat=True))
        assert len(pairs) == len(set(pairs))  # no item twice in a session
        if spec.n_images == 1:
            assert all(session.trials.values_list("natural_first", flat=True))
    assert assignment_errors(study) == []


def test_retests_come_later_hold_no_slot_and_are_answered_like_any_trial(media_root):
    study = make_protocol_study(media_root, "rating", retest_fraction=0.5,
                                trials_per_session=8, sentinel_fraction=0.125,
                                variants_per_photo=2, practice_trials=1)
    session = _session(study)
    trials = list(session.trials.order_by("position"))
    main = [t for t in trials if not t.is_practice]
    data = [t for t in main if not t.is_repeat and t.pair_id in set(
        Pair.objects.filter(is_sentinel=False).values_list("pk", flat=True))]
    repeats = [t for t in main if t.is_repeat]
    assert len(repeats) == retest_count(study, len(data)) == round(0.5 * len(data)) > 0
    first = {t.pair_id: t.position for t in main if not t.is_repeat}
    for t in repeats:
        assert t.pair_id in {d.pair_id for d in data}  # a data item of this session
        assert t.position - first[t.pair_id] > RETEST_GAP  # at least RETEST_GAP trials apart
        assert t.leased_until is None
    state = _state(session)
    assert [t["position"] for t in state["trials"]] == [t.position for t in trials]
    assert all(set(t) == {"position", "images", "answered", "practice"}
               for t in state["trials"] if not t["practice"])  # a retest looks like any trial
    assert assignment_errors(study) == []
    for t in state["trials"]:
        body = _body(t["position"], "2", ("first_ms", "blank_ms", "second_ms"))
        assert _post(session, body).status_code == 201
    assert APIClient().post(f"/api/sessions/{session.token}/complete/").status_code == 200
    assert assignment_errors(study) == []
    # K counts first showings only.
    for pair in Pair.objects.filter(pk__in=[t.pair_id for t in repeats]):
        assert pair.n_assigned == 1


def test_no_retests_by_default_and_jnd_sessions_are_unchanged(make_study, new_session):
    session = new_session(make_study())
    assert not session.trials.filter(is_repeat=True).exists()
    assert "protocol" not in _state(session)["study"]


def test_retests_are_for_rating_studies_only(media_root):
    from django.core.exceptions import ValidationError

    study = make_protocol_study(media_root, "2afc", retest_fraction=0.5, trials_per_session=8,
                                practice_trials=1)
    with pytest.raises(ValidationError, match="retests .* are for rating studies"):
        study.full_clean()
    session = _session(study)  # a stored setting is ignored: no judgment counted twice
    assert not session.trials.filter(is_repeat=True).exists()


# ------------------------------------------------------------------------------ cold timing

TIMING_SIZE = 224
TIMING_SESSIONS = 10  # per protocol, of 8 trials (3 controls)
# Data items per photograph (2AFC triplets; rating and label: per condition) so that the
# sessions find enough with K = 1.
TIMING_VARIANTS = {"2afc": 17, "rating": 9, "label": 9}


def _cold_timing_script(report_path: str) -> None:
    """(Runs in a subprocess, on a fresh SQLite database.) One study per protocol variant with
    224×224 items whose natural images recur (controls show them), K=1; sessions started;
    their image URLs and the truth written as JSON. Nothing is prepared before the server
    starts (the server prepares at start, as in production)."""
    import django

    django.setup()
    from django.conf import settings
    from django.core.management import call_command

    from studyapp.image_tokens import image_urls as urls_of

    call_command("migrate", verbosity=0, interactive=False)
    media = Path(settings.MEDIA_ROOT)
    media.mkdir(parents=True, exist_ok=True)
    report = []
    for variant in ("2afc", "rating", "label"):
        study = make_protocol_study(
            media, variant, size=TIMING_SIZE, judgments_per_pair=1, trials_per_session=8,
            sentinel_fraction=0.375, controls_per_photo=3,
            variants_per_photo=TIMING_VARIANTS[variant],
        )
        spec = trial_spec(study)
        for i in range(TIMING_SESSIONS):
            session = start_session(Participant.objects.create(study=study, external_id=f"{i}"))
            rows = list(session.trials.select_related("pair").order_by("position"))
            urls = urls_of(session.token, [t.position for t in rows], n_images=spec.n_images)
            for t in rows:
                files = image_paths(spec.protocol, spec.n_images, t.natural_first,
                                    t.pair.natural_path, t.pair.other_path, t.pair.third_path)
                report.append({
                    "variant": variant, "urls": urls[t.position], "control": t.pair.is_sentinel,
                    # per slot: is it the (recurring) natural image?
                    "natural": [name == t.pair.natural_path for name in files],
                })
    Path(report_path).write_text(json.dumps(report))


@pytest.mark.slow
def test_cold_server_timing_tells_nothing_about_sides_or_controls(tmp_path):
    """A freshly started gunicorn with the WSGI fast path, every image of every trial fetched
    once in a shuffled order. Timing rules an attacker would use, each at chance: per
    protocol "a trial whose images came faster is a control" (AUC; Mann-Whitney U); for 2AFC
    and rating pairs "the faster of two images is the natural one" (the identical side of a
    2AFC control, the unperturbed image of a pair; binomial test). Exact tests at a family
    level of 0.1 % (each of the 5 rules at 0.02 %): the shuffled order makes the times
    exchangeable when nothing leaks. (99.9 % percentile-bootstrap intervals, used before,
    undercover at these sizes: on 2,000 simulated null runs one of the 5 missed 0.5 in 1 %.)"""
    import http.client
    import re
    import signal
    import subprocess
    import sys
    import time

    from sklearn.metrics import roc_auc_score

    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DJANGO_", "PERCEPTLAB_", "DATABASE_URL"))}
    env.update(DJANGO_SETTINGS_MODULE="studyapp.settings", DJANGO_SECRET_KEY="timing-test-only",
               PERCEPTLAB_VAR=str(tmp_path / "var"),
               PYTHONPATH=os.pathsep.join([str(root), str(Path(__file__).parent)]),
               PERCEPTLAB_PREPARE_ON_START=os.environ.get("PERCEPTLAB_PREPARE_ON_START", "1"))
    truth_path = tmp_path / "trials.json"
    runner = ("import django, runpy, sys; django.setup(); "
              f"runpy.run_path({__file__!r})['_cold_timing_script'](sys.argv[1])")
    made = subprocess.run([sys.executable, "-c", runner, str(truth_path)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-3000:]
    trials = json.loads(truth_path.read_text())

    log_path = tmp_path / "gunicorn.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "studyapp.wsgi", "-k", "gthread", "-w", "1",
             "--threads", "2", "-b", "127.0.0.1:0", "--timeout", "120"],
            cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        deadline, port = time.monotonic() + 120, None
        while port is None:
            found = re.search(r"Listening at: http://127\.0\.0\.1:(\d+)", log_path.read_text())
            port = int(found.group(1)) if found else None
            assert server.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        conn.request("GET", "/study/p-2afc/")  # answered once the worker has loaded
        conn.getresponse().read()
        order = np.random.default_rng(2018)
        for i in order.permutation(len(trials)):
            trial = trials[i]
            slots = list(order.permutation(len(trial["urls"])))
            trial["times"] = [0.0] * len(trial["urls"])
            for slot in slots:
                started = time.perf_counter()
                conn.request("GET", trial["urls"][slot])
                response = conn.getresponse()
                body = response.read()
                trial["times"][slot] = time.perf_counter() - started
                assert response.status == 200 and body.startswith(b"\x89PNG")
        conn.close()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)

    from scipy.stats import binomtest, mannwhitneyu

    alpha = 0.001 / 5  # Bonferroni over the 5 rules
    reports, failures = [], []
    for variant in ("2afc", "rating", "label"):
        group = [t for t in trials if t["variant"] == variant]
        control = np.array([t["control"] for t in group])
        total = np.array([sum(t["times"]) for t in group])
        assert control.any() and not control.all()
        auc = roc_auc_score(~control, total)
        p = mannwhitneyu(total[~control], total[control], alternative="two-sided").pvalue
        reports.append(f"{variant}: control AUC {auc:.2f} (p {p:.2g})")
        if p < alpha:
            failures.append(reports[-1])
        # "The faster of the two compared images is the natural one": 2AFC controls (left vs
        # right), rating data pairs (first vs second).
        if variant == "label":
            continue
        picks = []
        for t in group:
            if variant == "2afc" and t["control"]:
                sides = [1, 2]
            elif variant == "rating" and not t["control"]:
                sides = [0, 1]
            else:
                continue
            faster = min(sides, key=lambda s: t["times"][s])
            picks.append(1.0 if t["natural"][faster] else 0.0)
        picks = np.array(picks)
        acc = float(picks.mean())
        p = binomtest(int(picks.sum()), len(picks), 0.5).pvalue
        reports.append(f"{variant}: faster-is-natural right in {acc:.2f} of {len(picks)} "
                       f"(p {p:.2g})")
        if p < alpha:
            failures.append(reports[-1])
    print("; ".join(reports))
    assert failures == [], reports
    assert "no prepared rows" not in log_path.read_text()
