"""A database outage: every API answers JSON 503 with Retry-After, pages a 503 page; no 500.

Against a real, temporary PostgreSQL server (:mod:`tests.support.pgserver`) in a subprocess
(Django picks its database once per process, see ``test_concurrency_pg.py``): the script
migrates, builds a study with a started session and a staff user, checks that the requests
work, then stops the server (SIGINT to the postmaster: PostgreSQL's fast shutdown, the way an
outage or a restart looks to a client) and sends the same requests again through Django's
test client with exceptions turned into responses, as in production (DEBUG off).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


def test_a_database_outage_gives_json_503s(postgres_bin_dir, tmp_path):
    from tests.support.pgserver import temporary_postgres

    report_path = tmp_path / "report.json"
    with temporary_postgres(postgres_bin_dir) as pg:
        env = {
            **os.environ,
            "DATABASE_URL": pg.url,
            "PG_DATA_DIR": str(pg.data_dir),
            "DJANGO_SETTINGS_MODULE": "studyapp.settings",
            "DJANGO_SECRET_KEY": "outage-test-only",
            "DJANGO_DEBUG": "0",
            "DJANGO_ALLOWED_HOSTS": "testserver",
            "PERCEPTLAB_VAR": str(tmp_path / "var"),
            "PYTHONPATH": str(ROOT),
        }
        proc = subprocess.run(
            [sys.executable, __file__, str(report_path)],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=180,
        )
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    report = json.loads(report_path.read_text())
    before, during = report["before"], report["during"]
    assert all(status < 400 or status in (404, 409) for status, *_ in before.values()), before
    for name, (status, content_type, retry_after, body) in during.items():
        assert status == 503, (name, status, body[:300])
        assert retry_after and int(retry_after) > 0, name
        if name.startswith("api"):
            assert content_type == "application/json", (name, content_type)
            payload = json.loads(body)
            assert payload["code"] == "database_unavailable" and "nothing was stored" in payload[
                "error"
            ], payload
        else:
            assert "text/html" in content_type and "try again" in body.lower(), (name, body)


def _script(report_path: str) -> None:
    import signal
    import socket
    import time
    import uuid
    from urllib.parse import urlsplit

    import django

    django.setup()
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from django.test import Client

    from studyapp.models import Condition, Pair, Participant, Study
    from studyapp.scheduler import start_session

    call_command("migrate", verbosity=0, interactive=False)
    study = Study.objects.create(slug="outage", title="outage", trials_per_session=2,
                                 practice_trials=0)
    condition = Condition.objects.create(study=study, threat_model="linf", bound=0.03,
                                         spec="linf:bound=0.03")
    Pair.objects.bulk_create(
        Pair(study=study, key=f"d{i}", source_image=f"d{i}", natural_path=f"d{i}/n.png",
             other_path=f"d{i}/o.png", width=8, height=8, condition=condition)
        for i in range(4)
    )
    session = start_session(Participant.objects.create(study=study, external_id="x"))
    staff = get_user_model().objects.create_user("staff", password="pw-123456", is_staff=True)
    client = Client(raise_request_exception=False)
    client.force_login(staff)
    anonymous = Client(raise_request_exception=False)
    token = session.token
    judgment = {
        "position": 0, "response": "same", "response_time_ms": 500.0,
        "durations": {"first_ms": 1000.0, "blank_ms": 250.0, "second_ms": 1000.0},
        "idempotency_key": str(uuid.uuid4()),
    }

    def requests() -> dict:
        calls = {
            "api state": lambda: anonymous.get(f"/api/sessions/{token}/"),
            "api judgment": lambda: anonymous.post(
                f"/api/sessions/{token}/judgments/", judgment, content_type="application/json"
            ),
            "api client_info": lambda: anonymous.patch(
                f"/api/sessions/{token}/",
                {"window_width": 800, "window_height": 600, "device_pixel_ratio": 1,
                 "refresh_hz": 60, "frame_ms": 16.7},
                content_type="application/json",
            ),
            "api complete": lambda: anonymous.post(f"/api/sessions/{token}/complete/"),
            "api staff studies": lambda: client.get("/api/staff/studies/"),
            "api staff progress": lambda: client.get(f"/api/staff/studies/{study.slug}/progress/"),
            "page start": lambda: anonymous.post(f"/study/{study.slug}/", {"decision": "agree"}),
            "page session": lambda: anonymous.get(f"/session/{token}/"),
            "page staff": lambda: client.get("/staff/"),
        }
        out = {}
        for name, call in calls.items():
            response = call()
            out[name] = [response.status_code, response.get("Content-Type", ""),
                         response.get("Retry-After"), response.content.decode(errors="replace")]
        return out

    before = requests()
    pid = int((Path(os.environ["PG_DATA_DIR"]) / "postmaster.pid").read_text().split()[0])
    os.kill(pid, signal.SIGINT)
    url = urlsplit(os.environ["DATABASE_URL"])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection((url.hostname, url.port), timeout=0.5).close()
            time.sleep(0.1)
        except OSError:
            break
    during = requests()
    Path(report_path).write_text(json.dumps({"before": before, "during": during}))


if __name__ == "__main__":
    _script(sys.argv[1])
