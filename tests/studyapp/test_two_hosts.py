"""Two web hosts, one study: two gunicorn servers share one PostgreSQL, one Redis, one media root.

Set-up (README, "More than one web host"): both servers get the same ``DATABASE_URL``,
``PERCEPTLAB_CACHE`` (Redis), ``DJANGO_SECRET_KEY`` and stimulus storage (here one
``PERCEPTLAB_MEDIA`` folder; S3 in a real deployment), and each its own local rows folder
(``PERCEPTLAB_ROWS_DIR``). Host A prepares its rows as it starts (the default); host B is
started with ``PERCEPTLAB_PREPARE_ON_START=0`` and an empty rows folder, so it rebuilds every
file's rows on demand, from storage.

Participants (threads, each one browser: one cookie jar) alternate every request between the
two servers: the start page and consent, the runner page, the session state, every image,
every judgment (a quarter of them sent again to the other server with the same idempotency
key, as a retry after a network error would be) and the completion. Asserted:

- no 5xx, every session started, completed;
- 0 lost and 0 duplicated judgments (the database holds exactly the acknowledged idempotency
  keys, each once, at the trial it was sent for); every retry answered 200;
- no data pair judged more than K times, and the scheduler's bookkeeping true
  (``assignment_errors``);
- the bytes-only leak properties on both servers: one length, one header set, one chunk
  layout for every image, no body twice; decoding the pixels (and only that) tells
  sentinels apart; both hosts' pixels equal the stored files;
- host A decoded nothing while serving (prepared at start), host B rebuilt its rows (logged).
"""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from urllib.parse import urlencode

import numpy as np
import pytest
from PIL import Image

from tests.support.http import BrowserClient

ROOT = Path(__file__).resolve().parents[2]
K = 2
N_SOURCES, N_VARIANTS = 6, 4  # 24 data pairs × K = 48 slots
N_PARTICIPANTS, TRIALS, SENTINELS = 8, 6, 1  # 8 × 5 data trials = 40 slots
SIZE = 48

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow]


def _script(mode: str, path: str) -> None:
    """(Subprocess, Django set up on the shared PostgreSQL.) ``setup``: migrate, write the
    study's PNGs to the shared media root, create its rows. ``check``: what the database
    holds, as JSON."""
    from django.conf import settings
    from django.core.management import call_command
    from django.db.models import Count, Q

    from studyapp.models import Condition, Judgment, Pair, Session, Study
    from studyapp.scheduler import assignment_errors

    if mode == "setup":
        call_command("migrate", verbosity=0, interactive=False)
        study = Study.objects.create(
            slug="two-hosts", title="two hosts", consent_text="", judgments_per_pair=K,
            trials_per_session=TRIALS, sentinel_fraction=SENTINELS / TRIALS,
            catch_fraction=0.0, practice_trials=0,
        )
        condition = Condition.objects.create(
            study=study, threat_model="linf", bound=16 / 255, spec="linf:bound=16/255"
        )
        rng = np.random.default_rng(15)
        media = Path(settings.MEDIA_ROOT)
        for s in range(N_SOURCES):
            natural = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
            name = f"studies/two-hosts/{s}/natural.png"
            (media / name).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(natural).save(media / name, format="PNG")
            Pair.objects.create(study=study, is_sentinel=True, key=f"{s}|sentinel",
                                source_image=str(s), natural_path=name, other_path=name,
                                width=SIZE, height=SIZE)
            for v in range(N_VARIANTS):
                other = f"studies/two-hosts/{s}/v{v}.png"
                noise = rng.choice([-16, 16], size=natural.shape)
                perturbed = np.clip(natural.astype(int) + noise, 0, 255).astype(np.uint8)
                Image.fromarray(perturbed).save(media / other, format="PNG")
                Pair.objects.create(study=study, condition=condition, key=f"{s}|{v}",
                                    source_image=str(s), natural_path=name, other_path=other,
                                    width=SIZE, height=SIZE)
        return
    study = Study.objects.get(slug="two-hosts")
    judged = study.pairs.filter(condition__isnull=False).annotate(
        n=Count("trials", filter=Q(trials__is_practice=False, trials__judgment__isnull=False))
    )
    report = {
        "judgments": [
            [key, token, position]
            for key, token, position in Judgment.objects.values_list(
                "idempotency_key", "trial__session__token", "trial__position")
        ],
        "max_judged_per_pair": max(judged.values_list("n", flat=True)),
        "assignment_errors": assignment_errors(study),
        "completed": Session.objects.filter(completed_at__isnull=False).count(),
        "truth": {
            f"{token}/{position}": [is_sentinel, natural_first, natural, other]
            for token, position, is_sentinel, natural_first, natural, other in
            Session.objects.values_list(
                "token", "trials__position", "trials__pair__is_sentinel",
                "trials__natural_first", "trials__pair__natural_path",
                "trials__pair__other_path")
        },
    }
    Path(path).write_text(json.dumps(report))


def _django(env: dict, mode: str, path: Path) -> None:
    runner = ("import django, runpy, sys; django.setup(); "  # (this module imports nothing
              f"runpy.run_path({__file__!r})['_script'](sys.argv[1], sys.argv[2])")  # of Django)
    done = subprocess.run([sys.executable, "-c", runner, mode, str(path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def _start_gunicorn(env: dict, log_path: Path) -> tuple[subprocess.Popen, Path]:
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "studyapp.wsgi", "-k", "gthread", "-w", "1",
             "--threads", "8", "-b", "127.0.0.1:0", "--timeout", "120"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    return proc, log_path


def _port(proc: subprocess.Popen, log_path: Path) -> int:
    deadline = time.monotonic() + 120
    while True:
        found = re.search(r"Listening at: http://127\.0\.0\.1:(\d+)", log_path.read_text())
        if found:
            return int(found.group(1))
        assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
        time.sleep(0.1)


def _chunk_layout(png: bytes) -> tuple:
    out, offset = [], 8
    while offset < len(png):
        length = int.from_bytes(png[offset : offset + 4], "big")
        out.append((png[offset + 4 : offset + 8], length))
        offset += 12 + length
    return tuple(out)


def _pixels(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as img:
        return np.asarray(img.convert("RGB"))


class AlternatingBrowser:
    """One participant's browser whose requests alternate between the two hosts (one cookie
    jar: Django's session and CSRF cookies work on either host, as behind a load balancer)."""

    def __init__(self, ports: list[int], observe) -> None:
        self.hosts = [
            BrowserClient("127.0.0.1", port, timeout=120, connect_retries=3, observe=observe)
            for port in ports
        ]
        for host in self.hosts[1:]:
            host.cookies = self.hosts[0].cookies
        self.turn = 0

    def next_host(self) -> tuple[int, BrowserClient]:
        index = self.turn % len(self.hosts)
        self.turn += 1
        return index, self.hosts[index]

    def close(self) -> None:
        for host in self.hosts:
            host.close()


def test_two_hosts_share_one_study(postgres_bin_dir, redis_server_executable, tmp_path):
    from tests.support.pgserver import temporary_postgres
    from tests.support.redisserver import temporary_redis

    started = time.monotonic()
    media = tmp_path / "media"
    media.mkdir()
    with temporary_postgres(postgres_bin_dir) as pg, temporary_redis(
        redis_server_executable
    ) as redis:
        base = {
            k: v for k, v in os.environ.items()
            if not k.startswith(("DJANGO_", "PERCEPTLAB_", "DATABASE_URL"))
        }
        base.update(
            DJANGO_SETTINGS_MODULE="studyapp.settings", DJANGO_SECRET_KEY="two-hosts-test",
            DATABASE_URL=pg.url, PERCEPTLAB_CACHE=redis.url, PERCEPTLAB_MEDIA=str(media),
            PYTHONPATH=str(ROOT),
        )
        hosts = {
            "A": {**base, "PERCEPTLAB_VAR": str(tmp_path / "var-a"),
                  "PERCEPTLAB_ROWS_DIR": str(tmp_path / "rows-a")},
            "B": {**base, "PERCEPTLAB_VAR": str(tmp_path / "var-b"),
                  "PERCEPTLAB_ROWS_DIR": str(tmp_path / "rows-b"),
                  "PERCEPTLAB_PREPARE_ON_START": "0"},
        }
        _django(hosts["A"], "setup", tmp_path / "unused")
        servers = {name: _start_gunicorn(env, tmp_path / f"gunicorn-{name}.log")
                   for name, env in hosts.items()}
        try:
            ports = [_port(*servers[name]) for name in ("A", "B")]
            for port in ports:  # answered once each worker has loaded (and A prepared)
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                conn.request("GET", "/study/two-hosts/")
                assert conn.getresponse().status == 200
                conn.close()
            rows_before = {name: len(list((tmp_path / f"rows-{name.lower()}").glob("*.rows")))
                           for name in ("A", "B")}
            stats = _run_participants(ports)
        finally:
            for proc, _ in servers.values():
                os.killpg(proc.pid, signal.SIGTERM)
            for proc, _ in servers.values():
                proc.wait(timeout=30)
        _django(hosts["A"], "check", tmp_path / "db.json")
    db = json.loads((tmp_path / "db.json").read_text())
    logs = {name: log.read_text() for name, (_, log) in servers.items()}
    n_files = N_SOURCES * (1 + N_VARIANTS)
    print(f"{stats['requests']} requests, {len(stats['acknowledged'])} judgments,"
          f" {time.monotonic() - started:.1f} s with servers")

    # Every request answered, every session completed.
    assert stats["server_errors"] == [] and stats["unexpected"] == [], stats["unexpected"][:5]
    assert stats["started"] == stats["completed"] == db["completed"] == N_PARTICIPANTS
    assert set(stats["hosts_used"].values()) == {2}  # every participant used both hosts
    # 0 lost, 0 duplicated: exactly the acknowledged keys, each once, where they were sent.
    stored = Counter(key for key, _, _ in db["judgments"])
    assert max(stored.values()) == 1
    assert {key: (token, position) for key, token, position in db["judgments"]} == {
        key: tuple(where) for key, where in stats["acknowledged"].items()
    }
    assert len(stored) == N_PARTICIPANTS * TRIALS
    assert stats["retries"] > 0 and stats["retries_answered_200"] == stats["retries"]
    # No pair over K; the scheduler's counts true.
    assert db["max_judged_per_pair"] <= K and db["assignment_errors"] == []

    # Bytes-only leak properties, on both hosts alike.
    images = stats["images"]  # (host index, token/position, slot, headers, body)
    assert {host for host, *_ in images} == {0, 1}
    assert len({len(body) for *_, body in images}) == 1
    assert len({headers for *_, headers, _ in images}) == 1
    assert len({_chunk_layout(body) for *_, body in images}) == 1
    assert Counter(hashlib.sha256(body).digest() for *_, body in images).most_common(1)[0][1] == 1
    by_trial: dict[str, dict[int, bytes]] = {}
    for _, trial, slot, _, body in images:
        by_trial.setdefault(trial, {})[slot] = body
    for trial, bodies in by_trial.items():
        is_sentinel, natural_first, natural, other = db["truth"][trial]
        assert np.array_equal(_pixels(bodies[1]), _pixels(bodies[2])) == is_sentinel
        for slot, body in bodies.items():
            stored_file = natural if (slot == 1) == natural_first else other
            assert np.array_equal(_pixels(body), _pixels((media / stored_file).read_bytes()))

    # Each host's own rows: A prepared every file as it started, B rebuilt on demand.
    assert rows_before == {"A": n_files, "B": 0}
    assert "no prepared rows" not in logs["A"]
    assert "no prepared rows on this host" in logs["B"]
    assert 0 < len(list((tmp_path / "rows-b").glob("*.rows"))) <= n_files


def _run_participants(ports: list[int]) -> dict:
    lock = threading.Lock()
    stats: dict = {
        "requests": 0, "server_errors": [], "unexpected": [], "acknowledged": {},
        "retries": 0, "retries_answered_200": 0, "started": 0, "completed": 0,
        "images": [], "hosts_used": {},
    }

    def observe(endpoint, method, path, status, seconds, data) -> None:
        with lock:
            stats["requests"] += 1
            if status >= 500:
                stats["server_errors"].append(f"{method} {path}: {status} {data[:300]!r}")

    def unexpected(what: str, status: int, data) -> None:
        with lock:
            stats["unexpected"].append(f"{what}: {status} {str(data)[:300]}")

    def participant(n: int) -> None:
        browser = AlternatingBrowser(ports, observe)
        used = set()

        def request(method, path, **kw):
            index, host = browser.next_host()
            used.add(index)
            return index, host.request(method, path, **kw)

        try:
            _, (status, _, _) = request("GET", "/study/two-hosts/")
            form = urlencode({"csrfmiddlewaretoken": browser.hosts[0].cookies.get("csrftoken", ""),
                              "decision": "agree"}).encode()
            _, (status, response, page) = request(
                "POST", "/study/two-hosts/", body=form,
                content_type="application/x-www-form-urlencoded")
            found = re.fullmatch(r"/session/([^/]+)/", response.headers.get("Location", ""))
            if status != 302 or not found:
                return unexpected("start", status, page[:300])
            token = found.group(1)
            with lock:
                stats["started"] += 1
            request("GET", f"/session/{token}/")
            _, (status, _, data) = request("GET", f"/api/sessions/{token}/")
            trials = json.loads(data)["trials"]
            for i, trial in enumerate(trials):
                for slot, url in enumerate(trial["images"], start=1):
                    index, (status, response, body) = request("GET", url)
                    if status != 200:
                        unexpected(f"image {url}", status, body[:100])
                        continue
                    headers = tuple(sorted((k.lower(), v) for k, v in response.getheaders()
                                           if k.lower() not in {"date", "connection"}))
                    with lock:
                        stats["images"].append(
                            (index, f"{token}/{trial['position']}", slot, headers, body))
                judgment = json.dumps({
                    "position": trial["position"], "response": "same" if i % 2 else "different",
                    "response_time_ms": 612.5 + i,
                    "durations": {"first_ms": 1000.2, "blank_ms": 249.8, "second_ms": 1000.1},
                    "idempotency_key": uuid.uuid4().hex,
                }).encode()
                url = f"/api/sessions/{token}/judgments/"
                _, (status, _, data) = request("POST", url, body=judgment,
                                               content_type="application/json")
                if status != 201:
                    unexpected(f"judgment {trial['position']}", status, data)
                    continue
                key = json.loads(judgment)["idempotency_key"]
                with lock:
                    stats["acknowledged"][key] = (token, trial["position"])
                if (n + i) % 4 == 0:  # a retry of the same judgment, to the other host
                    _, (status, _, _) = request("POST", url, body=judgment,
                                                content_type="application/json")
                    with lock:
                        stats["retries"] += 1
                        stats["retries_answered_200"] += status == 200
            _, (status, _, data) = request("POST", f"/api/sessions/{token}/complete/",
                                           body=b"{}", content_type="application/json")
            if status != 200:
                return unexpected("complete", status, data)
            with lock:
                stats["completed"] += 1
                stats["hosts_used"][n] = len(used)
        except Exception as exc:  # noqa: BLE001 - reported; the test fails on it
            unexpected(f"participant {n}", 0, repr(exc))
        finally:
            browser.close()

    threads = [threading.Thread(target=participant, args=(n,)) for n in range(N_PARTICIPANTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return stats
