"""Automated participants are flagged; simulated honest people are not (studyapp.quality).

A study with pairs people cannot see (sign noise of about 1/255) and pairs anyone sees
(24-32/255). A population of simulated honest people (a psychometric answer model, log-normal
response times, the browser signals of a person) gives the study its own data; then:

- scripted sessions over the API: a pixel bot (compares the images' pixels, answers at a
  constant pace, no runner) and one more honest person;
- (issue 17) a pixel-diff agent with log-normal, human-like timing, a human error rate and
  faked browser signals, in a study whose bounds lie around the threshold: only the bot
  score (:mod:`engine.bots`) catches it; simulated honest people are not flagged;
- whole sessions in Chromium through the trial runner: a Playwright bot that decodes both
  images of every trial on a canvas and answers at a fixed delay, and a simulated person
  (mouse moves, variable response times, answers from the psychometric model) in a Chromium
  that hides ``navigator.webdriver`` (as a stealthier bot would, too: the other two rules must
  then catch the bot).
"""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
from django.test import Client
from PIL import Image

from studyapp.models import Participant, Session, Study
from studyapp.quality import apply_exclusions, bot_flags, compute_quality
from studyapp.scheduler import record_judgment, start_session

pytestmark = pytest.mark.django_db

TINY = [(1.0 + 0.1 * i) / 255 for i in range(4)]  # ±1 grey level: invisible to people
CONDITIONS = [("linf", b, f"tiny{i}") for i, b in enumerate(TINY)] + [
    ("linf", 24 / 255, "big"), ("linf", 32 / 255, "large"),
]
HUMAN_SIGNALS = {"webdriver": False, "pointer_events": 60, "key_events": 22, "hidden_stimuli": 0}


def _study(make_study, **fields) -> Study:
    return make_study(
        conditions=CONDITIONS, trials_per_session=20, sentinel_fraction=0.1,
        judgments_per_pair=100, **fields,
    )


def _p_different(trial) -> float:
    """The simulated person: sees large perturbations, not tiny ones; a few lapses."""
    pair = trial.pair
    if pair.is_sentinel:
        return 0.04
    return 0.92 if pair.condition.bound > 10 / 255 else 0.08


def _body(position: int, response: str, rt: float, rng: random.Random) -> dict:
    return {
        "position": position, "response": response, "response_time_ms": rt,
        "durations": {"first_ms": 1000.0, "blank_ms": 250.0, "second_ms": 1000.0},
        "idempotency_key": f"k{rng.getrandbits(64):016x}",
    }


def _human_session(study: Study, rng: random.Random) -> Session:
    participant = Participant.objects.create(study=study, external_id=f"h{rng.getrandbits(32)}")
    # the scheduler draws from the test's rng too: which pairs, in which order (with the
    # system's randomness a run could not be repeated; 0 of 25 unseeded populations failed)
    session = start_session(participant, client_info=dict(HUMAN_SIGNALS),
                            rng=random.Random(rng.getrandbits(64)))
    for trial in session.trials.select_related("pair__condition").order_by("position"):
        response = "different" if rng.random() < _p_different(trial) else "same"
        rt = float(np.exp(rng.gauss(np.log(750), 0.35)))
        record_judgment(session, _body(trial.position, response, rt, rng))
    session.completed_at = session.started_at
    session.save(update_fields=["completed_at"])
    return session


def _pixels(path) -> np.ndarray:
    with Image.open(io.BytesIO(path.read_bytes())) as img:
        return np.asarray(img.convert("RGB"))


def _pixel_bot_session(study: Study, media_root, rng: random.Random) -> Session:
    """Answers from the pixels it is served, at a constant pace, without the runner."""
    client = Client()
    participant = Participant.objects.create(study=study, external_id="bot")
    session = start_session(participant)
    state = client.get(f"/api/sessions/{session.token}/").json()
    for trial in state["trials"]:
        first, second = (client.get(url).content for url in trial["images"])
        images = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in (first, second)]
        response = "same" if np.array_equal(*images) else "different"
        body = _body(trial["position"], response, 400.0 + rng.random(), rng)
        assert client.post(f"/api/sessions/{session.token}/judgments/", body,
                           content_type="application/json").status_code == 201
    assert client.post(f"/api/sessions/{session.token}/complete/").status_code == 200
    return session


@pytest.fixture
def population(make_study):
    study = _study(make_study)
    rng = random.Random(20261130)
    for _ in range(10):
        _human_session(study, rng)
    return study, rng


def _flags(study: Study, session: Session) -> list[str]:
    rows = {q.session_id: q for q in compute_quality(study, include_incomplete=True)}
    return bot_flags(rows[session.pk])


def test_honest_people_are_not_flagged(population):
    study, rng = population
    newcomer = _human_session(study, rng)
    rows = compute_quality(study)
    assert len(rows) == 11
    for q in rows:
        assert bot_flags(q) == [], (q.session_id, bot_flags(q))
        assert q.n_low_pairs >= 6  # the superhuman test did run
    assert _flags(study, newcomer) == []


def test_a_pixel_bot_on_the_api_is_flagged_by_every_rule(population, media_root):
    study, rng = population
    bot = _pixel_bot_session(study, media_root, rng)
    flags = _flags(study, bot)
    assert any(f.startswith("automation: no browser signals") for f in flags), flags
    assert any(f.startswith("response times too regular") for f in flags), flags
    superhuman = [f for f in flags if f.startswith("superhuman")]
    assert superhuman and "binomial p" in superhuman[0], flags
    assert any(f.startswith("superhuman: bot score") for f in flags), flags  # issue 17
    # Flags only: the exclusion switches are off by default...
    assert not Session.objects.get(pk=bot.pk).excluded
    rows = {q.session_id: q for q in apply_exclusions(study)}
    assert not rows[bot.pk].excluded
    # ...and each one, switched on, excludes the bot and nobody else.
    for switch in ("exclude_automation", "exclude_regular_rt", "exclude_superhuman"):
        switches = dict.fromkeys(
            ("exclude_automation", "exclude_regular_rt", "exclude_superhuman"), False
        )
        Study.objects.filter(pk=study.pk).update(**{**switches, switch: True})
        study.refresh_from_db()
        rows = {q.session_id: q for q in apply_exclusions(study)}
        assert [pk for pk, q in rows.items() if q.excluded] == [bot.pk], switch


# ------------------------------------------------------------------------------ in Chromium

KEYS = {"same": "f", "different": "j"}


def _browser_session(live_server, chromium_executable, study, answer, *, stealth: bool):
    """Run one whole session in Chromium; ``answer(page, trial_index, truth) -> str`` (the
    key is then pressed through Playwright) or ``None`` (``answer`` answered in the page)."""
    from playwright.sync_api import sync_playwright

    args = ["--no-sandbox", "--disable-gpu", "--force-color-profile=srgb"]
    if stealth:
        args.append("--disable-blink-features=AutomationControlled")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium_executable, headless=True, args=args
        )
        page = browser.new_page(viewport={"width": 1024, "height": 768})
        page.goto(f"{live_server.url}/study/{study.slug}/")
        page.get_by_role("button", name="Start").click()
        page.wait_for_url("**/session/*/")
        token = page.url.rstrip("/").rsplit("/", 1)[1]
        session = Session.objects.get(token=token)
        truth = {t.position: t for t in session.trials.select_related("pair__condition")}
        page.wait_for_selector("#intro", state="visible")
        page.keyboard.press("Space")
        for index in range(len(truth)):
            page.wait_for_selector("#prompt.is-visible", timeout=30_000)
            response = answer(page, index, truth[index])
            if response is not None:
                page.keyboard.press(KEYS[response])
            page.wait_for_selector("#prompt:not(.is-visible)", state="attached")
        page.wait_for_url("**/done/", timeout=30_000)
        browser.close()
    session.refresh_from_db()
    assert session.completed_at is not None
    return session


# The bot answers from inside the page, as a script would: a synthetic keydown 350 ms after
# the prompt shows. (Pressing through Playwright adds a round trip to the test process whose
# jitter, on a loaded CI machine, made the bot look irregular enough to pass as human.)
BOT_ANSWER = """(key) => new Promise((resolve) => {
  const press = () => {
    document.dispatchEvent(new KeyboardEvent("keydown", { key, bubbles: true }));
    resolve();
  };
  const check = () => document.querySelector("#prompt.is-visible")
    ? setTimeout(press, 350) : requestAnimationFrame(check);
  check();
})"""
PIXEL_ANSWERS = """async () => {
  const token = location.pathname.split("/")[2];
  const state = await (await fetch(`/api/sessions/${token}/`)).json();
  const decode = async (url) => {
    const img = new Image(); img.src = url; await img.decode();
    const c = document.createElement("canvas");
    c.width = img.naturalWidth; c.height = img.naturalHeight;
    const ctx = c.getContext("2d"); ctx.drawImage(img, 0, 0);
    return ctx.getImageData(0, 0, c.width, c.height).data;
  };
  const answers = {};
  for (const t of state.trials) {
    const [a, b] = await Promise.all(t.images.map(decode));
    answers[t.position] = a.every((v, i) => v === b[i]) ? "same" : "different";
  }
  return answers;
}"""


@pytest.mark.browser
@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_playwright_bot_and_a_simulated_person_in_chromium(
    live_server, chromium_executable, make_study, monkeypatch
):
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")  # Playwright's loop on this thread
    study = _study(make_study, first_ms=200, blank_ms=100, second_ms=200, practice_trials=0)
    rng = random.Random(7)
    for _ in range(10):
        _human_session(study, rng)

    bot_answers: dict = {}

    def bot(page, index, trial) -> str:
        if not bot_answers:
            bot_answers.update({int(k): v for k, v in page.evaluate(PIXEL_ANSWERS).items()})
        page.evaluate(BOT_ANSWER, KEYS[bot_answers[trial.position]])  # a steady pace
        return None

    def person(page, index, trial) -> str:
        for _ in range(3):
            page.mouse.move(rng.uniform(100, 900), rng.uniform(100, 700), steps=3)
        page.wait_for_timeout(float(np.exp(rng.gauss(np.log(650), 0.35))))
        return "different" if rng.random() < _p_different(trial) else "same"

    bot_session = _browser_session(live_server, chromium_executable, study, bot, stealth=False)
    person_session = _browser_session(
        live_server, chromium_executable, study, person, stealth=True
    )

    bot_flags_ = _flags(study, bot_session)
    assert any("navigator.webdriver" in f for f in bot_flags_), bot_flags_
    assert any(f.startswith("superhuman sensitivity") for f in bot_flags_), bot_flags_
    assert any(f.startswith("superhuman: bot score") for f in bot_flags_), bot_flags_
    # Not asserted: "response times too regular". The bot's 350 ms timer is regular on a quiet
    # machine, but under CPU load (two busy loops beside the suite) the page's timers jitter by
    # tens of ms and the rule may not fire: a timing property of the machine, not of the code.
    # The rule itself is tested on the API bot above, whose times are given.
    print("regularity rule fired:", any(f.startswith("response times") for f in bot_flags_))
    info = Session.objects.get(pk=person_session.pk).client_info
    assert info["webdriver"] is False and info["key_events"] >= 20 and info["pointer_events"] > 0
    assert _flags(study, person_session) == []


# ------------------------------------------------------------------------------ issue 17
#
# The bot of today: a pixel-diff agent that sleeps a log-normal, human-looking time, gets a
# human share of its answers wrong, and fakes the runner's browser signals. Neither the
# automation signals nor the regularity rule can see it; the bot score (engine.bots) does,
# from a study whose bounds lie around the threshold (as a JND study's do), with honest
# simulated people (engine.bots.simulate_person: criterion, slope and threshold spread, slower
# near their threshold) as its population.

THRESHOLD = 6 / 255
LEVELS = (0.25, 0.35, 0.5, 0.6, 0.7, 0.85, 1.0, 1.2, 1.5, 2.0, 3.0, 4.0)


def _jnd_study(make_study) -> Study:
    return make_study(
        # the lowest level is the sub-threshold probe (1.5 grey levels: people see nothing)
        slug="jnd-bots",
        conditions=[("linf", f * THRESHOLD, "probe" if f == LEVELS[0] else f"x{f}")
                    for f in LEVELS],
        trials_per_session=39, sentinel_fraction=3 / 39, judgments_per_pair=1000,
    )


def _simulated_person_session(study: Study, traits, rng: np.random.Generator) -> Session:
    import pandas as pd

    from engine import bots

    participant = Participant.objects.create(
        study=study, external_id=f"p{rng.integers(2**40)}")
    session = start_session(participant, client_info=dict(HUMAN_SIGNALS),
                            rng=random.Random(int(rng.integers(2**32))))  # reproducible
    trials = list(session.trials.select_related("pair__condition").order_by("position"))
    frame = pd.DataFrame({
        "kind": [bots.KIND_SENTINEL if t.pair.is_sentinel else bots.KIND_DATA for t in trials],
        "threat_model": [t.pair.condition.threat_model if t.pair.condition else None
                         for t in trials],
        "bound": [t.pair.condition.bound if t.pair.condition else 0.0 for t in trials],
        "condition": [t.pair.condition_id for t in trials],
    })
    answered = bots.simulate_person(frame, traits, rng)
    py_rng = random.Random(int(rng.integers(2**32)))
    for trial, different, rt in zip(trials, answered["different"], answered["rt_ms"],
                                    strict=True):
        record_judgment(session, _body(trial.position, "different" if different else "same",
                                       float(rt), py_rng))
    session.completed_at = session.started_at
    session.save(update_fields=["completed_at"])
    return session


def _human_timed_pixel_bot(study: Study, rng: np.random.Generator) -> Session:
    """Over the real API: decodes both images of each trial, answers "different" where the
    pixels differ, flips 10 % of its answers, waits a log-normal time (median 800 ms,
    σ 0.35), and fakes a person's browser signals."""
    client = Client()
    participant = Participant.objects.create(study=study, external_id="agent")
    session = start_session(participant, rng=random.Random(int(rng.integers(2**32))))
    Session.objects.filter(pk=session.pk).update(client_info=dict(HUMAN_SIGNALS))
    state = client.get(f"/api/sessions/{session.token}/").json()
    py_rng = random.Random(5)
    for trial in state["trials"]:
        first, second = (client.get(url).content for url in trial["images"])
        images = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in (first, second)]
        different = not np.array_equal(*images)
        if rng.random() < 0.10:
            different = not different
        rt = float(np.exp(np.log(800) + rng.normal(0, 0.35)))
        body = _body(trial["position"], "different" if different else "same", rt, py_rng)
        assert client.post(f"/api/sessions/{session.token}/judgments/", body,
                           content_type="application/json").status_code == 201
    assert client.post(f"/api/sessions/{session.token}/complete/").status_code == 200
    return session


@pytest.mark.slow
def test_a_pixel_bot_with_human_timing_is_caught_by_the_bot_score_alone(make_study, media_root):
    from engine import bots

    study = _jnd_study(make_study)
    rng = np.random.default_rng(17)
    traits = bots.HumanTraits(thresholds={"linf": THRESHOLD})
    people = [_simulated_person_session(study, traits, rng) for _ in range(24)]
    agent = _human_timed_pixel_bot(study, rng)

    rows = {q.session_id: q for q in compute_quality(study)}
    agent_q = rows[agent.pk]
    flags = bot_flags(agent_q)
    assert any(f.startswith("superhuman: bot score") for f in flags), (flags, agent_q)
    assert agent_q.bot_score < -2 and agent_q.bot_llr_answers < 0, agent_q
    assert agent_q.n_probes == 3 and agent_q.n_probes_different >= 2, agent_q
    assert "sub-threshold probes answered 'different'" in next(
        f for f in flags if f.startswith("superhuman: bot score"))
    assert sum(rows[s.pk].n_probes_different for s in people) <= 15  # of 72: people see little
    # Its timing and its browser signals pass the older rules: only the evidence of seeing
    # like a machine is left.
    assert not any(f.startswith(("automation", "response times")) for f in flags), flags
    for session in people:
        q = rows[session.pk]
        assert q.bot_score is not None and q.bot_score > 0, (q.bot_score, q.bot_llr_answers)
        assert bot_flags(q) == [], bot_flags(q)
    # The study's switch turns the flag into an exclusion, of the agent only.
    Study.objects.filter(pk=study.pk).update(exclude_superhuman=True)
    study.refresh_from_db()
    excluded = [q.session_id for q in apply_exclusions(study) if q.excluded]
    assert excluded == [agent.pk]
