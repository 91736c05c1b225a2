"""Simultaneous consent POSTs on the SQLite demo database: every one answered, none a 500.

How: like :mod:`tests.studyapp.test_concurrency_pg`, this file runs itself as a script in a
subprocess, here with ``DATABASE_URL`` naming a real SQLite *file* (the demo's set-up; the rest
of the test run uses an in-memory database, which locks differently). The script migrates it,
serves the WSGI app on Django's threaded server (the class behind ``runserver``) and sends
consent POSTs in simultaneous pairs, released by a barrier:

- two people on one plain link (two browsers, two forms): two sessions;
- a double click (one browser sends its form twice): one session, both answers redirect to it.

Before issue 17 a pair of POSTs often failed with 500 "database is locked": SQLite's default
``BEGIN`` is deferred, so two transactions that had both read could not both upgrade to write,
and SQLite answers that deadlock with SQLITE_BUSY at once, without waiting out the busy
timeout. The settings now begin every SQLite transaction ``IMMEDIATE`` (the writer lock is taken
at ``BEGIN``, so the second waits, up to the timeout, and then runs): correct serialisation,
not a refusal.

Asserted: every POST is a 302 to a session page (no 5xx, no 409/503), the database holds
exactly the sessions the answers name, one per person and one per double click, and the
scheduler's bookkeeping (``assignment_errors``) is consistent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ROUNDS = 12

pytestmark = [pytest.mark.slow]


def test_simultaneous_consent_posts_on_sqlite_serialise(tmp_path):
    report_path = tmp_path / "report.json"
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite:///{tmp_path / 'demo.sqlite3'}",
        "DJANGO_SETTINGS_MODULE": "studyapp.settings",
        "DJANGO_SECRET_KEY": "consent-race-test-only",
        "DJANGO_DEBUG": "0",
        "PERCEPTLAB_VAR": str(tmp_path / "var"),
        "PYTHONPATH": str(ROOT),
    }
    proc = subprocess.run(
        [sys.executable, __file__, str(report_path)], cwd=ROOT, env=env, capture_output=True,
        text=True, timeout=300,
    )
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    report = json.loads(report_path.read_text())
    print(json.dumps(report, indent=1))
    assert report["vendor"] == "sqlite"
    assert report["server_errors"] == [], report["server_errors"][:3]
    assert report["statuses"] == {"302": 4 * ROUNDS}, report["statuses"]
    assert report["two_people_distinct"] == ROUNDS
    assert report["double_click_same"] == ROUNDS
    assert report["sessions"] == 3 * ROUNDS == report["participants"]
    assert report["sessions_named"] == report["sessions"]
    assert report["assignment_errors"] == []


# --------------------------------------------------------------------------- the script part


def _script(report_path: str) -> None:
    import re
    import threading
    from collections import Counter

    import django

    django.setup()
    from django.core.handlers.wsgi import WSGIHandler
    from django.core.management import call_command
    from django.core.servers.basehttp import ThreadedWSGIServer, WSGIRequestHandler
    from django.db import connection

    from studyapp.models import Condition, Pair, Participant, Session, Study
    from studyapp.scheduler import assignment_errors
    from tests.support.http import BrowserClient

    assert connection.vendor == "sqlite", connection.vendor
    call_command("migrate", verbosity=0, interactive=False)
    study = Study.objects.create(
        slug="demo", title="demo", consent_text="I agree to take part.",
        trials_per_session=6, practice_trials=2, judgments_per_pair=3,
        sentinel_fraction=0.15, catch_fraction=0.15,
    )
    condition = Condition.objects.create(
        study=study, threat_model="linf", bound=8 / 255, spec="linf:bound=8/255"
    )

    def pair(key: str, **kw) -> Pair:
        return Pair(study=study, key=key, source_image=key, natural_path=f"{key}/n.png",
                    other_path=f"{key}/o.png", width=64, height=64, **kw)

    Pair.objects.bulk_create(
        [pair(f"d{i}", condition=condition) for i in range(200)]
        + [pair(f"s{i}", is_sentinel=True) for i in range(4)]
        + [pair(f"c{i}", is_catch=True) for i in range(4)]
    )
    connection.close()

    class QuietHandler(WSGIRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = ThreadedWSGIServer(("127.0.0.1", 0), QuietHandler, allow_reuse_address=False)
    server.set_app(WSGIHandler())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host, port = server.server_address[:2]

    lock = threading.Lock()
    statuses: Counter = Counter()
    server_errors: list[str] = []

    def observe(endpoint, method, path, status, seconds, data) -> None:
        if method != "POST":
            return
        with lock:
            statuses[str(status)] += 1
            if status >= 500:
                server_errors.append(f"{method} {path}: {status} {data[:300]!r}")

    def browser() -> BrowserClient:
        return BrowserClient(host, port, timeout=60, keep_alive=False, observe=observe)

    url = f"/study/{study.slug}/"

    def form(client: BrowserClient) -> dict:
        status, _, page = client.request("GET", url)
        assert status == 200, status
        key = re.search(rb'name="start_key" value="([^"]+)"', page).group(1).decode()
        token = re.search(rb'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1).decode()
        return {"decision": "agree", "start_key": key, "csrfmiddlewaretoken": token}

    def post(client: BrowserClient, fields: dict, gate: threading.Barrier, out: list) -> None:
        from urllib.parse import urlencode

        gate.wait()
        status, response, _ = client.request(
            "POST", url, body=urlencode(fields).encode(),
            content_type="application/x-www-form-urlencoded",
        )
        location = response.headers.get("Location", "")
        with lock:
            out.append(location.rstrip("/").rsplit("/", 1)[-1] if status == 302 else None)

    def pair_of_posts(jobs: list[tuple[BrowserClient, dict]]) -> list:
        gate, out = threading.Barrier(len(jobs)), []
        threads = [threading.Thread(target=post, args=(c, f, gate, out)) for c, f in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return out

    two_people = double_click = 0
    named: set[str] = set()
    for _ in range(ROUNDS):
        a, b = browser(), browser()
        tokens = pair_of_posts([(a, form(a)), (b, form(b))])
        named.update(t for t in tokens if t)
        two_people += len(tokens) == 2 and None not in tokens and tokens[0] != tokens[1]
        c = browser()
        fields = form(c)
        tokens = pair_of_posts([(c, fields), (c, dict(fields))])
        named.update(t for t in tokens if t)
        double_click += len(tokens) == 2 and tokens[0] is not None and tokens[0] == tokens[1]
    server.shutdown()
    server.server_close()
    report = {
        "vendor": connection.vendor,
        "statuses": dict(statuses),
        "server_errors": server_errors,
        "two_people_distinct": two_people,
        "double_click_same": double_click,
        "sessions": Session.objects.count(),
        "participants": Participant.objects.count(),
        "sessions_named": Session.objects.filter(token__in=named).count(),
        "assignment_errors": assignment_errors(study),
    }
    Path(report_path).write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    _script(sys.argv[1])
