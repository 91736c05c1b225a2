"""Locust users of the load benchmark (``bench/load.py`` starts ``locust`` with this file).

Runs in the load tool's own environment (``bench/.venv-load``, made by
``bench/setup_load_env.sh``): locust and its gevent/urllib3 2 cannot live beside torchattacks'
``requests~=2.25`` in the project's ``.venv``. It imports neither Django nor the project.

Configuration comes from the environment, set by ``bench/load.py``:

``LOAD_MODE``
    ``session`` (default): every user is one participant after another, each doing a whole
    session the way ``static/js/trials.js`` does it; ``submit``: users post the judgments of
    sessions started beforehand (``LOAD_SESSIONS``, one JSON line per session) back to back;
    ``ping``: users call the trivial view ``/bench/ping/`` back to back.
``LOAD_THINK_MS``
    mean pause per trial in ``session`` mode (uniform ±30 %): the time a participant spends
    looking and answering. 0 = as fast as the server answers.
``LOAD_RESEND_EVERY``
    every n-th judgment is sent a second time with its idempotency key (must answer 200), as
    the runner's outbox does when an acknowledgement is lost.
``LOAD_OUT``
    folder for ``acks-<pid>.jsonl`` (every acknowledged judgment: key, token, position) and
    ``spawned`` (when every user was running; the steady state starts there).
``LOAD_SLUG``
    the study's slug.

Request names (the rows of locust's statistics): the pages and API calls by what they are,
plus ``next trial (both images)``, the time from asking for a trial's two images to having
both (what a participant would wait for if the runner had not fetched them during the
previous trial).
"""

from __future__ import annotations

import json
import os
import random
import re
import time
import uuid
from pathlib import Path

import gevent
from _bodies import judgment_body  # bench/_bodies.py: locust runs from bench/
from locust import FastHttpUser, constant, events, task
from locust.exception import StopUser

MODE = os.environ.get("LOAD_MODE", "session")
THINK_S = float(os.environ.get("LOAD_THINK_MS", "3500")) / 1000
RESEND_EVERY = int(os.environ.get("LOAD_RESEND_EVERY", "0"))
OUT = Path(os.environ.get("LOAD_OUT", "."))
SLUG = os.environ.get("LOAD_SLUG", "load")
USER_AGENT = "perceptlab-bench-load/2 (simulated participant; locust)"
CLIENT_INFO = {
    "window_width": 1280, "window_height": 800, "screen_width": 1920, "screen_height": 1080,
    "device_pixel_ratio": 1.0, "refresh_hz": 60.0, "frame_ms": 16.7, "frame_samples": 60,
    "webdriver": False, "pointer_events": 40, "key_events": 24, "hidden_stimuli": 0,
}
_acks = None
_sessions = None


def _ack_file():
    global _acks
    if _acks is None:
        _acks = (OUT / f"acks-{os.getpid()}.jsonl").open("a", buffering=1)
    return _acks


def _prepared_sessions():
    global _sessions
    if _sessions is None:
        lines = (OUT / "sessions.jsonl").read_text().splitlines()
        _sessions = iter([json.loads(line) for line in lines])
    return _sessions


@events.spawning_complete.add_listener
def _spawned(user_count: int, **kwargs) -> None:
    (OUT / "spawned").write_text(json.dumps({"time": time.time(), "users": user_count}))


@events.quitting.add_listener
def _close(**kwargs) -> None:
    if _acks is not None:
        _acks.close()


class Failed(Exception):
    """A request answered something unexpected (already counted as a failure)."""




class Participant(FastHttpUser):
    wait_time = constant(0)
    connection_timeout = 120.0
    network_timeout = 120.0
    # Every user is a separate browser: its own cookies and connections.
    default_headers = {"User-Agent": USER_AGENT}

    def on_start(self) -> None:
        self.rng = random.Random(uuid.uuid4().int)
        self.sent = 0
        if MODE == "session":
            # Participants arrive over time, not all in the same instant.
            gevent.sleep(self.rng.uniform(0, THINK_S))

    # -------------------------------------------------------------- requests

    def call(self, name: str, method: str, path: str, expect: int, **kw):
        with self.client.request(method, path, name=name, catch_response=True, **kw) as r:
            if r.status_code != expect:
                text = (r.text or "")[:200].replace("\n", " ")
                r.failure(f"HTTP {r.status_code} (expected {expect}): {text}")
                raise Failed(name)
            r.success()
            return r

    def send_json(self, name: str, method: str, path: str, body: dict, expect: int):
        headers = {"Content-Type": "application/json"}
        for cookie in self.client.cookiejar:
            if cookie.name == "csrftoken":
                headers["X-CSRFToken"] = cookie.value  # as the runner does (ignored by the API)
        r = self.call(name, method, path, expect, data=json.dumps(body), headers=headers)
        return r.json() if r.text else {}

    def submit(self, token: str, position: int) -> None:
        url = f"/api/sessions/{token}/judgments/"
        body = judgment_body(position, self.rng)
        self.send_json("judgment", "POST", url, body, 201)
        _ack_file().write(json.dumps([body["idempotency_key"], token, position]) + "\n")
        self.sent += 1
        if RESEND_EVERY and self.sent % RESEND_EVERY == 0:
            again = self.send_json("judgment retry (same key)", "POST", url, body, 200)
            if again.get("idempotency_key") != body["idempotency_key"]:
                events.request.fire(
                    request_type="CHECK", name="judgment retry (same key)", response_time=0,
                    response_length=0, exception=Failed(f"retry answered {again}"), context={},
                )

    # -------------------------------------------------------------- modes

    @task
    def one_round(self) -> None:
        try:
            {"session": self.session, "submit": self.submit_burst, "ping": self.ping}[MODE]()
        except Failed:
            gevent.sleep(1)  # counted already; a new participant starts

    def ping(self) -> None:
        self.call("ping (trivial view)", "GET", "/bench/ping/", 200)

    def submit_burst(self) -> None:
        try:
            prepared = next(_prepared_sessions())
        except StopIteration:
            raise StopUser() from None
        for position in prepared["positions"]:
            self.submit(prepared["token"], position)

    def session(self) -> None:
        """One participant, as the trial runner: consent, runner page, state, client info,
        every trial (both images, a pause, the answer), client info, completion, end page."""
        self.client.cookiejar.clear()
        page = self.call("start page", "GET", f"/study/{SLUG}/", 200).text
        start_key = re.search(r'name="start_key" value="([^"]+)"', page)
        csrf = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page)
        form = {"decision": "agree", "csrfmiddlewaretoken": csrf[1] if csrf else ""}
        if start_key:
            form["start_key"] = start_key[1]
        started = self.call(
            "consent (start)", "POST", f"/study/{SLUG}/", 302, data=form,
            headers={"Content-Type": "application/x-www-form-urlencoded"},
            allow_redirects=False,
        )
        token = started.headers["Location"].rstrip("/").rsplit("/", 1)[-1]
        self.call("runner page", "GET", f"/session/{token}/", 200)
        state_url = f"/api/sessions/{token}/"
        trials = self.call("session state", "GET", state_url, 200).json()["trials"]
        self.send_json("client info", "PATCH", state_url, CLIENT_INFO, 200)
        for trial in trials:
            began = time.perf_counter()
            for url in trial["images"]:
                self.call("image", "GET", url, 200)
            events.request.fire(
                request_type="TRIAL", name="next trial (both images)",
                response_time=(time.perf_counter() - began) * 1000, response_length=0,
                exception=None, context={},
            )
            if THINK_S:
                gevent.sleep(THINK_S * self.rng.uniform(0.7, 1.3))
            self.submit(token, trial["position"])
        self.send_json("client info", "PATCH", state_url, CLIENT_INFO, 200)
        done = self.send_json("complete", "POST", f"/api/sessions/{token}/complete/", {}, 200)
        if not done.get("completion_code"):
            raise Failed("complete")
        self.call("end page", "GET", f"/session/{token}/done/", 200)

