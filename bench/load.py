"""Load benchmark of the study server: gunicorn + PostgreSQL, simulated participants over HTTP.

What one run does (everything on this machine; nothing asserts on time):

1. Starts a throwaway PostgreSQL cluster (:mod:`tests.support.pgserver`), migrates it and builds a
   study: ``--pairs`` data pairs (K = ``--k``), sentinel and catch pairs, lossless PNGs cut from
   scikit-image's bundled photographs (the perturbed image is the crop plus random-sign noise
   of 4/255: the server never looks at pixels, only sizes matter).
2. Starts gunicorn on the production settings (``bench.load_settings`` = ``studyapp.settings``
   plus the trivial view ``/bench/ping/``), DEBUG off, ``--workers`` workers (``--threads``
   > 1 selects gthread).
3. Phases, each with ``--participants`` client threads (one per simulated participant, each with
   its own cookies and its own HTTP connection, all released together):

   - *warm-up*: a few whole sessions (every worker loads its code paths); not reported.
   - *sessions*: every participant does a whole session as the trial runner does it: landing
     page (CSRF cookie) → "I agree" POST → redirect to the runner page → session state →
     client-info PATCH → per trial: session state ("next trial"), both images, judgment POST →
     complete POST → end page; every ``--resend-every``-th judgment is sent again with its
     idempotency key (must answer 200). ``--think-ms`` pauses before every answer (0: as fast
     as the server answers, the stress case).
   - *submit burst*: as many fresh participants start sessions (timed, not part of the burst),
     then, released together, post all their judgments back to back; then complete.
   - *ping*: as many threads call ``/bench/ping/`` back to back for ``--ping-seconds``; run
     right before and right after the burst (same server, same run, same concurrency).

4. Checks the database: every acknowledged judgment (201, or 200 for a retry) stored exactly
   once, at its session and position; nothing stored that was never acknowledged; the
   scheduler's bookkeeping (``scheduler.assignment_errors``) clean; no pair above K.

Reported: judgments/s, p50/p95/p99 latency of next-trial (state GET) and submit (judgment
POST), errors (any unexpected status or exception), lost judgments, and the ratio of submit
throughput (burst) to ping throughput; plus the CPU each party used (client, gunicorn,
PostgreSQL, everything else on the machine), because they all share this machine's cores.
Results: section "Study server load (gunicorn + PostgreSQL)" of ``BENCHMARKS.md`` (unless
``--no-write``), raw data and the gunicorn log under ``bench/out/load/``.

Rate limit: production's (``participant-write`` 120/min per session token, counters in the
database cache table) stays on. A whole session sends ``trials + practice`` judgments, their
re-sends (``--resend-every``), the client-info PATCH and the completion: 14 writes in all by
default, far below the limit whatever the pace; a throttled request (429) would count as an
error.
``--write-rate`` overrides the limit (``PERCEPTLAB_RATE_PARTICIPANT_WRITE``) for experiments.

    .venv/bin/python bench/load.py                       # 200 participants, 4 workers (2–4 min)
    .venv/bin/python bench/load.py --think-ms 2500       # paced participants (own section)
    .venv/bin/python bench/load.py --participants 20 --trials 4 --no-write   # smoke run
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from urllib.parse import urlencode

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# An unexpected status or a transport error (already recorded as an error of the phase).
from tests.support.http import RequestFailed  # noqa: E402

OUT_DIR = ROOT / "bench" / "out" / "load"
BENCHMARKS = ROOT / "BENCHMARKS.md"
SECTION_TITLE = "Study server load (gunicorn + PostgreSQL)"


def section_ids(think_ms: float, durable: bool = False) -> tuple[str, str, str]:
    """(title, start marker, end marker): the stress run (no think time), paced runs
    (``--think-ms``) and paced runs on durable PostgreSQL (``--durable``) keep a section each."""
    if think_ms > 0 and durable:
        return (f"{SECTION_TITLE}: paced participants, durable PostgreSQL (fsync on)",
                "<!-- bench/load.py paced durable: start -->",
                "<!-- bench/load.py paced durable: end -->")
    if think_ms > 0:
        return (f"{SECTION_TITLE}: paced participants", "<!-- bench/load.py paced: start -->",
                "<!-- bench/load.py paced: end -->")
    return SECTION_TITLE, "<!-- bench/load.py: start -->", "<!-- bench/load.py: end -->"


STUDY_SLUG = "load"
CONSENT = "I agree to take part in this benchmark study. (Simulated participant.)"
USER_AGENT = "perceptlab-bench-load/1 (simulated participant)"
PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "stereo_motorcycle"]
#: Expected statuses per endpoint; anything else is an error.
EXPECTED = {
    "start page": {200},
    "start": {302},
    "runner page": {200},
    "state": {200},
    "client info": {200},
    "image": {200},
    "judgment": {201},
    "judgment retry": {200},  # the same body and idempotency key again: stored once, 200
    "complete": {200},
    "done page": {200},
    "ping": {200},
}


# ------------------------------------------------------------------------------ recording


@dataclass
class Phase:
    """What the clients saw during one phase: latencies per endpoint, statuses, errors."""

    name: str
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    statuses: Counter = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    reconnects: Counter = field(default_factory=Counter)
    judgments: int = 0
    wall_s: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def error(self, message: str) -> None:
        with self.lock:
            self.errors.append(message)

    @property
    def requests(self) -> int:
        return sum(len(v) for v in self.latencies.values())

    def summary(self) -> dict:
        return {
            "wall_s": round(self.wall_s, 3),
            "requests": self.requests,
            "judgments": self.judgments,
            "statuses": {f"{k[0]} {k[1]}": v for k, v in sorted(self.statuses.items())},
            "errors": len(self.errors),
            "error_samples": self.errors[:20],
            "reconnects": dict(self.reconnects),
            "latency_ms": {name: percentiles(values) for name, values in self.latencies.items()},
            "cpu_s": {k: round(v, 2) for k, v in self.cpu.items()},
        }


def percentiles(seconds: list[float]) -> dict[str, float]:
    if not seconds:
        return {"n": 0}
    ms = np.asarray(seconds) * 1000
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return {
        "n": len(seconds), "p50": round(float(p50), 1), "p95": round(float(p95), 1),
        "p99": round(float(p99), 1), "max": round(float(ms.max()), 1),
        "mean": round(float(ms.mean()), 1),
    }


class Acknowledged:
    """Idempotency keys the server acknowledged (201/200) → (session token, position)."""

    def __init__(self) -> None:
        self.keys: dict[str, tuple[str, int]] = {}
        self.lock = threading.Lock()
        self.count = 0  # read by the progress bar

    def add(self, key: str, token: str, position: int) -> None:
        with self.lock:
            self.keys[key] = (token, position)
            self.count += 1


# ------------------------------------------------------------------------------ the client


class Browser:
    """One participant's browser (:class:`tests.support.http.BrowserClient`: cookies, CSRF
    header, one kept-alive connection), reporting to a phase; an unexpected status is an
    error of the phase."""

    def __init__(self, host: str, port: int, phase: Phase, timeout: float) -> None:
        from tests.support.http import BrowserClient

        self.phase = phase

        def observe(endpoint, method, path, status, seconds, data) -> None:
            phase.latencies[endpoint].append(seconds)  # list.append is atomic under the GIL
            with phase.lock:
                phase.statuses[(endpoint, status)] += 1

        def reconnect(endpoint: str) -> None:
            with phase.lock:
                phase.reconnects[endpoint] += 1

        self.client = BrowserClient(
            host, port, timeout=timeout, user_agent=USER_AGENT, observe=observe,
            on_reconnect=reconnect, on_error=phase.error,
        )

    @property
    def cookies(self) -> dict[str, str]:
        return self.client.cookies

    def close(self) -> None:
        self.client.close()

    def request(
        self, endpoint: str, method: str, path: str, *, body: bytes | None = None,
        content_type: str | None = None,
    ) -> tuple[int, http.client.HTTPResponse, bytes]:
        status, response, data = self.client.request(
            method, path, body=body, content_type=content_type, endpoint=endpoint
        )
        if status not in EXPECTED[endpoint]:
            text = re.sub(r"\s+", " ", data[:400].decode(errors="replace"))
            self.phase.error(f"{endpoint} {method} {path}: HTTP {status} {text}")
            raise RequestFailed(f"{endpoint}: HTTP {status}")
        return status, response, data

    def get_json(self, endpoint: str, path: str) -> dict:
        return json.loads(self.request(endpoint, "GET", path)[2])

    def send_json(self, endpoint: str, method: str, path: str, payload: dict) -> dict:
        data = self.request(
            endpoint, method, path, body=json.dumps(payload).encode(),
            content_type="application/json",
        )[2]
        return json.loads(data) if data else {}


def judgment_body(position: int, rng: random.Random) -> dict:
    return {
        "position": position,
        "response": rng.choice(["same", "different"]),
        "response_time_ms": round(rng.uniform(350, 1400), 1),
        "durations": {
            "first_ms": round(rng.gauss(1000, 2), 1),
            "blank_ms": round(rng.gauss(250, 2), 1),
            "second_ms": round(rng.gauss(1000, 2), 1),
        },
        "idempotency_key": uuid.uuid4().hex,
    }


class Participant:
    """A simulated participant on a plain (anonymous) study link."""

    def __init__(self, browser: Browser, acked: Acknowledged, seed: str) -> None:
        self.browser = browser
        self.acked = acked
        self.rng = random.Random(seed)
        self.token = ""
        self.trials: list[dict] = []

    def start(self) -> None:
        """Landing page → "I agree" → runner page → session state → client info."""
        b = self.browser
        b.request("start page", "GET", f"/study/{STUDY_SLUG}/")
        if "csrftoken" not in b.cookies:
            b.phase.error("start page: no csrftoken cookie")
            raise RequestFailed("no CSRF cookie")
        form = urlencode(
            {"csrfmiddlewaretoken": b.cookies["csrftoken"], "decision": "agree"}
        ).encode()
        _, response, _ = b.request(
            "start", "POST", f"/study/{STUDY_SLUG}/", body=form,
            content_type="application/x-www-form-urlencoded",
        )
        match = re.fullmatch(r"/session/([^/]+)/", response.headers.get("Location", ""))
        if not match:
            b.phase.error(f"start: redirected to {response.headers.get('Location')!r}")
            raise RequestFailed("bad redirect")
        self.token = match.group(1)
        b.request("runner page", "GET", f"/session/{self.token}/")
        self.trials = b.get_json("state", self.state_url)["trials"]
        b.send_json("client info", "PATCH", self.state_url, {
            "window_width": 1280, "window_height": 800, "screen_width": 1920,
            "screen_height": 1080, "device_pixel_ratio": 1.0, "refresh_hz": 60.0,
            "frame_ms": 16.7, "frame_samples": 60,
        })

    @property
    def state_url(self) -> str:
        return f"/api/sessions/{self.token}/"

    def submit(self, position: int, resend: bool = False) -> None:
        url = f"/api/sessions/{self.token}/judgments/"
        body = judgment_body(position, self.rng)
        self.browser.send_json("judgment", "POST", url, body)
        self.acked.add(body["idempotency_key"], self.token, position)
        with self.browser.phase.lock:
            self.browser.phase.judgments += 1
        if resend:  # as the trial runner's outbox does when an acknowledgement is lost
            data = self.browser.send_json("judgment retry", "POST", url, body)
            if data.get("idempotency_key") != body["idempotency_key"]:
                self.browser.phase.error(f"judgment retry answered {data}")
                raise RequestFailed("retry not idempotent")

    def run_trials(self, think_s: float, images: bool, resend_every: int = 0) -> None:
        """Per trial, as the runner: next trial from the session state, its two images, the
        answer. (The real runner reads the state once per page load and keeps it; reading it
        before every trial is heavier than real, and gives the next-trial latency.)"""
        b = self.browser
        answered_before: set[int] = set()
        while True:
            state = b.get_json("state", self.state_url)
            answered = {t["position"] for t in state["trials"] if t["answered"]}
            if not answered_before <= answered:
                b.phase.error(f"state of {self.token[:8]}…: an acknowledged answer is missing")
                raise RequestFailed("state lost an answer")
            pending = [t for t in state["trials"] if not t["answered"]]
            if not pending:
                return
            trial = pending[0]
            if images:
                for url in trial["images"]:
                    b.request("image", "GET", url)
            if think_s > 0:
                time.sleep(self.rng.uniform(0.5, 1.5) * think_s)
            n = len(answered_before)
            self.submit(trial["position"], resend=bool(resend_every) and n % resend_every == 0)
            answered_before = answered | {trial["position"]}

    def finish(self) -> None:
        data = self.browser.send_json(
            "complete", "POST", f"/api/sessions/{self.token}/complete/", {}
        )
        if not data.get("completion_code"):
            self.browser.phase.error(f"complete: no completion code in {data}")
            raise RequestFailed("no completion code")
        self.browser.request("done page", "GET", f"/session/{self.token}/done/")


def run_threads(n: int, target: Callable[[int, threading.Event], None]) -> float:
    """Run ``target(i, go)`` in ``n`` threads; they wait for ``go``. Returns the wall seconds
    from ``go`` to the last thread's end."""
    go = threading.Event()
    threads = [
        threading.Thread(target=target, args=(i, go), daemon=True, name=f"client-{i}")
        for i in range(n)
    ]
    for t in threads:
        t.start()
    time.sleep(0.2)  # let every thread reach go.wait()
    started = time.perf_counter()
    go.set()
    for t in threads:
        t.join()
    return time.perf_counter() - started


class Progress:
    """A tqdm bar fed by polling a counter (no tqdm call on the clients' hot path)."""

    def __init__(self, desc: str, total: int, read: Callable[[], int], enabled: bool) -> None:
        self.read, self.enabled = read, enabled
        self.stop = threading.Event()
        self.base = read()
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=" judgments", file=sys.stderr,
                            dynamic_ncols=True)
            self.thread = threading.Thread(target=self._poll, daemon=True)
            self.thread.start()

    def _poll(self) -> None:
        while not self.stop.wait(0.5):
            self.bar.n = self.read() - self.base
            self.bar.refresh()

    def close(self) -> None:
        if self.enabled:
            self.stop.set()
            self.thread.join()
            self.bar.n = self.read() - self.base
            self.bar.close()


# ------------------------------------------------------------------------------ CPU accounting


CLK_TCK = os.sysconf("SC_CLK_TCK")


def _proc_stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds of the process and of its waited-for children)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    # fields[0] = state (field 3); utime, stime, cutime, cstime are fields 14..17.
    return int(fields[1]), sum(int(x) for x in fields[11:15]) / CLK_TCK


def _tree_cpu(root: int, table: dict[int, tuple[int, float]], stop: set[int]) -> float:
    """CPU seconds of ``root`` and its live descendants (exited, reaped ones are in their
    parent's cutime/cstime), not descending into the trees rooted at ``stop`` (gunicorn is a
    child of the benchmark's process, and is counted on its own)."""
    children = defaultdict(list)
    for pid, (ppid, _) in table.items():
        children[ppid].append(pid)
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        if pid in table and (pid == root or pid not in stop):
            total += table[pid][1]
            todo.extend(children[pid])
    return total


def _machine_cpu() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine since boot, total CPU seconds)."""
    values = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (values + [0] * 8)[:8]
    busy = user + nice + system + irq + softirq + steal
    return busy / CLK_TCK, (busy + idle + iowait) / CLK_TCK


def cpu_snapshot(roots: dict[str, int]) -> dict[str, float]:
    table = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            stat = _proc_stat(int(entry.name))
            if stat:
                table[int(entry.name)] = stat
    stop = set(roots.values())
    snap = {name: _tree_cpu(pid, table, stop) for name, pid in roots.items()}
    snap["machine busy"], snap["machine total"] = _machine_cpu()
    return snap


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    delta = {k: after[k] - before[k] for k in before}
    ours = sum(v for k, v in delta.items() if not k.startswith("machine"))
    delta["other processes"] = max(0.0, delta["machine busy"] - ours)
    return delta


# ------------------------------------------------------------------------------ the study


def build_study(args: argparse.Namespace, media_root: Path) -> dict:
    """Study, condition and pairs as rows; PNG files under ``media_root/load/``."""
    import skimage.data
    from PIL import Image

    from studyapp.models import Condition, Pair, Study

    rng = np.random.default_rng(0)
    size = args.image_size
    photos = []
    for name in PHOTOS:
        pixels = getattr(skimage.data, name)()
        if isinstance(pixels, tuple):
            pixels = pixels[0]
        if pixels.ndim == 3 and pixels.shape[2] >= 3 and min(pixels.shape[:2]) >= size:
            photos.append((name, np.ascontiguousarray(pixels[..., :3])))
    folder = media_root / STUDY_SLUG
    folder.mkdir(parents=True, exist_ok=True)
    n_files = min(args.pairs, args.distinct_images)
    bound = 4  # of 255

    def crop(i: int) -> np.ndarray:
        _, pixels = photos[i % len(photos)]
        h, w = pixels.shape[:2]
        y, x = rng.integers(0, h - size + 1), rng.integers(0, w - size + 1)
        return pixels[y : y + size, x : x + size]

    naturals = []
    for i in range(n_files):
        natural = crop(i)
        noise = rng.choice(np.array([-bound, bound], dtype=np.int16), size=natural.shape)
        other = np.clip(natural.astype(np.int16) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(natural).save(folder / f"n{i}.png")
        Image.fromarray(other).save(folder / f"p{i}.png")
        naturals.append(f"{STUDY_SLUG}/n{i}.png")
    sizes = [p.stat().st_size for p in folder.glob("*.png")]

    study = Study.objects.create(
        slug=STUDY_SLUG, title="Load benchmark", consent_text=CONSENT,
        judgments_per_pair=args.k, trials_per_session=args.trials,
        practice_trials=args.practice, sentinel_fraction=0.1, catch_fraction=0.1,
        lease_minutes=30,
    )
    condition = Condition.objects.create(
        study=study, threat_model="linf", bound=bound / 255, spec="linf:bound=4/255",
        label="small",
    )

    def pair(key: str, natural: str, other: str, **kw) -> Pair:
        return Pair(study=study, key=key, source_image=key, natural_path=natural,
                    other_path=other, width=size, height=size, **kw)

    rows = [
        pair(f"d{i}", naturals[i % n_files], f"{STUDY_SLUG}/p{i % n_files}.png",
             condition=condition)
        for i in range(args.pairs)
    ]
    rows += [pair(f"s{i}", naturals[i % n_files], naturals[i % n_files], is_sentinel=True)
             for i in range(args.sentinels)]
    rows += [pair(f"c{i}", naturals[i % n_files], naturals[(i + 1) % n_files], is_catch=True)
             for i in range(args.catch)]
    Pair.objects.bulk_create(rows, batch_size=1000)
    return {
        "data_pairs": args.pairs, "sentinels": args.sentinels, "catch": args.catch,
        "k": args.k, "trials": args.trials, "practice": args.practice,
        "image_px": size, "png_files": len(sizes),
        "png_kb_mean": round(sum(sizes) / len(sizes) / 1024, 1),
    }


def check_database(acked: Acknowledged, finished: set[str]) -> dict:
    """Compare what the clients were told with what PostgreSQL holds."""
    from django.db.models import Count, Q

    from studyapp.models import Judgment, Pair, Session, Study
    from studyapp.scheduler import assignment_errors

    study = Study.objects.get(slug=STUDY_SLUG)
    stored = Counter(
        Judgment.objects.filter(trial__session__participant__study=study)
        .values_list("idempotency_key", flat=True)
    )
    where = {
        key: (token, position)
        for key, token, position in Judgment.objects.filter(
            trial__session__participant__study=study
        ).values_list("idempotency_key", "trial__session__token", "trial__position")
    }
    keys = acked.keys
    lost = sorted(k for k in keys if k not in stored)
    judged = list(
        Pair.objects.filter(study=study, condition__isnull=False)
        .annotate(n=Count("trials", filter=Q(trials__is_practice=False,
                                             trials__judgment__isnull=False)))
        .values_list("n", flat=True)
    )
    completed = set(
        Session.objects.filter(participant__study=study, completed_at__isnull=False)
        .values_list("token", flat=True)
    )
    return {
        "acknowledged": len(keys),
        "stored": sum(stored.values()),
        "lost": len(lost),
        "lost_samples": lost[:10],
        "stored_twice": sum(1 for n in stored.values() if n > 1),
        "stored_unacknowledged": sum(1 for k in stored if k not in keys),
        "stored_elsewhere": sum(1 for k, w in keys.items() if k in where and where[k] != w),
        "assignment_errors": assignment_errors(study)[:10],
        "max_judged_per_pair": max(judged) if judged else 0,
        "k": study.judgments_per_pair,
        "sessions": Session.objects.filter(participant__study=study).count(),
        "finished_not_completed": len(finished - completed),
    }


def request_costs(n_sessions: int = 3) -> dict[str, dict]:
    """SQL queries and in-process wall time per request, one request at a time (Django's test
    client on the same database, no HTTP, no concurrency): where a request's cost comes from.
    Run after the load phases and the database check (it stores judgments of its own)."""
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext

    rng = random.Random(1)
    costs: dict[str, dict] = {}

    def measure_one(name: str, call: Callable[[], object], expect: int):
        with CaptureQueriesContext(connection) as queries:
            started = time.perf_counter()
            response = call()
            elapsed = time.perf_counter() - started
        if response.status_code != expect:
            raise RuntimeError(f"{name}: HTTP {response.status_code} {response.content[:300]!r}")
        entry = costs.setdefault(name, {"ms": [], "counts": [], "sql": []})
        entry["ms"].append(elapsed * 1000)
        entry["counts"].append(len(queries.captured_queries))
        if len(queries.captured_queries) >= len(entry["sql"]):  # keep the longest list
            entry["sql"] = [sql_label(q["sql"]) for q in queries.captured_queries]
        return response

    # One client throughout (a new one would load the middleware again); cookies cleared
    # between participants.
    client = Client(HTTP_HOST="127.0.0.1", HTTP_USER_AGENT=USER_AGENT)
    for _ in range(200):
        measure_one("ping", lambda: client.get("/bench/ping/"), 200)
    for _ in range(n_sessions):
        client.cookies.clear()
        measure_one("start page", lambda c=client: c.get(f"/study/{STUDY_SLUG}/"), 200)
        response = measure_one("start", lambda c=client: c.post(f"/study/{STUDY_SLUG}/",
                                                                 {"decision": "agree"}), 302)
        token = response["Location"].strip("/").split("/")[-1]
        state = client.get(f"/api/sessions/{token}/").json()
        for trial in state["trials"]:
            measure_one("state", lambda c=client, t=token: c.get(f"/api/sessions/{t}/"), 200)
            measure_one("image", lambda c=client, u=trial["images"][0]: c.get(u), 200)
            body = judgment_body(trial["position"], rng)
            measure_one("judgment", lambda c=client, t=token, b=body: c.post(
                f"/api/sessions/{t}/judgments/", b, content_type="application/json"), 201)
        measure_one("complete", lambda c=client, t=token: c.post(
            f"/api/sessions/{t}/complete/", {}, content_type="application/json"), 200)
    return {
        name: {"n": len(v["ms"]), "queries": f"{min(v['counts'])}–{max(v['counts'])}"
               if min(v["counts"]) != max(v["counts"]) else str(v["counts"][0]),
               "median_ms": round(float(np.median(v["ms"])), 2),
               "min_ms": round(float(np.min(v["ms"])), 2), "sql": v["sql"]}
        for name, v in costs.items()
    }


# ------------------------------------------------------------------------------ the server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_gunicorn(args, env: dict, port: int, log: Path) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "gunicorn", "studyapp.wsgi", "--chdir", str(ROOT),
        "-w", str(args.workers), "-b", f"127.0.0.1:{port}",  # else gunicorn's defaults
        "--log-level", "warning", "--error-logfile", "-",
    ]
    if args.threads > 1:
        command += ["-k", "gthread", "--threads", str(args.threads)]
    # gunicorn's own log and the workers' stderr (Django logs 5xx tracebacks to the console
    # handler, i.e. stderr) both go to ``log``.
    with log.open("ab") as sink:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=sink, stderr=sink,
                                start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gunicorn exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/bench/ping/")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"gunicorn did not answer in 60 s:\n{log.read_text()[-3000:]}")


def stop_gunicorn(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # graceful: the master stops its workers
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def gunicorn_command_line(args) -> str:
    extra = f" -k gthread --threads {args.threads}" if args.threads > 1 else ""
    return f"gunicorn studyapp.wsgi -w {args.workers}{extra}"


# ------------------------------------------------------------------------------ phases


def measure(phase: Phase, roots: dict[str, int], body: Callable[[], float]) -> Phase:
    before = cpu_snapshot(roots)
    phase.wall_s = body()
    phase.cpu = cpu_delta(before, cpu_snapshot(roots))
    return phase


def sessions_phase(name: str, n: int, ctx: dict, think_s: float, images: bool,
                   progress: bool) -> Phase:
    phase = Phase(name)
    acked, host, port = ctx["acked"], "127.0.0.1", ctx["port"]
    per_session = ctx["trials_per_session"]

    def participant(i: int, go: threading.Event) -> None:
        browser = Browser(host, port, phase, ctx["timeout"])
        p = Participant(browser, acked, seed=f"{name}-{i}")
        go.wait()
        try:
            p.start()
            p.run_trials(think_s, images, ctx["resend_every"])
            p.finish()
            with phase.lock:
                ctx["finished"].add(p.token)
        except RequestFailed:
            pass
        finally:
            browser.close()

    bar = Progress(name, n * per_session, lambda: acked.count, progress)
    try:
        measure(phase, ctx["roots"], lambda: run_threads(n, participant))
    finally:
        bar.close()
    return phase


def burst_phases(n: int, ctx: dict, ping_s: float, progress: bool) -> dict[str, Phase]:
    """Start ``n`` sessions, ping, burst of submits, ping, completion."""
    acked, port = ctx["acked"], ctx["port"]
    start_phase, burst = Phase("burst: session starts"), Phase("submit burst")
    finish_phase = Phase("burst: completion")
    participants: list[Participant | None] = [None] * n

    def starter(i: int, go: threading.Event) -> None:
        browser = Browser("127.0.0.1", port, start_phase, ctx["timeout"])
        p = Participant(browser, acked, seed=f"burst-{i}")
        go.wait()
        try:
            p.start()
            participants[i] = p
        except RequestFailed:
            pass
        finally:
            browser.close()

    measure(start_phase, ctx["roots"], lambda: run_threads(n, starter))
    ready = [p for p in participants if p is not None]
    ping_before = ping_phase("ping (before burst)", n, ctx, ping_s)

    def submitter(i: int, go: threading.Event) -> None:
        p = ready[i]
        p.browser = Browser("127.0.0.1", port, burst, ctx["timeout"])
        go.wait()
        try:
            for trial in p.trials:
                p.submit(trial["position"])
        except RequestFailed:
            participants[participants.index(p)] = None
        finally:
            p.browser.close()

    total = sum(len(p.trials) for p in ready)
    bar = Progress("submit burst", total, lambda: acked.count, progress)
    try:
        measure(burst, ctx["roots"], lambda: run_threads(len(ready), submitter))
    finally:
        bar.close()
    ping_after = ping_phase("ping (after burst)", n, ctx, ping_s)

    done = [p for p in participants if p is not None]

    def finisher(i: int, go: threading.Event) -> None:
        p = done[i]
        p.browser = Browser("127.0.0.1", port, finish_phase, ctx["timeout"])
        go.wait()
        try:
            p.finish()
            with finish_phase.lock:
                ctx["finished"].add(p.token)
        except RequestFailed:
            pass
        finally:
            p.browser.close()

    measure(finish_phase, ctx["roots"], lambda: run_threads(len(done), finisher))
    return {
        "starts": start_phase, "ping_before": ping_before, "burst": burst,
        "ping_after": ping_after, "finish": finish_phase,
    }


def ping_phase(name: str, n: int, ctx: dict, seconds: float) -> Phase:
    phase = Phase(name)

    def pinger(i: int, go: threading.Event) -> None:
        browser = Browser("127.0.0.1", ctx["port"], phase, ctx["timeout"])
        go.wait()
        deadline = time.perf_counter() + seconds
        try:
            while time.perf_counter() < deadline:
                browser.request("ping", "GET", "/bench/ping/")
        except RequestFailed:
            pass
        finally:
            browser.close()

    return measure(phase, ctx["roots"], lambda: run_threads(n, pinger))


# ------------------------------------------------------------------------------ report


def machine_info() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"model name\s*:\s*(.+)", cpuinfo)
    mem_kb = int(re.search(r"MemTotal:\s*(\d+)", Path("/proc/meminfo").read_text()).group(1))
    versions = {}
    for package in ("django", "djangorestframework", "gunicorn", "psycopg"):
        try:
            from importlib.metadata import version

            versions[package] = version(package)
        except Exception:  # noqa: BLE001
            versions[package] = "?"
    return {
        "cpu": model.group(1).strip() if model else platform.processor(),
        "logical_cpus": os.cpu_count(),
        "memory_gib": round(mem_kb / 2**20, 1),
        "python": platform.python_version(),
        **versions,
    }


def rate(phase: Phase, what: str = "requests") -> float:
    count = phase.requests if what == "requests" else phase.judgments
    return count / phase.wall_s if phase.wall_s else 0.0


def cores(phase: Phase) -> dict[str, float]:
    return {k: v / phase.wall_s for k, v in phase.cpu.items() if not k.startswith("machine")}


def server_cpu_ms(phase: Phase, count: int) -> float:
    server = sum(phase.cpu.get(name, 0) for name in ("gunicorn", "postgres", "redis"))
    return 1000 * server / max(count, 1)


def gunicorn_problems(log: Path) -> list[str]:
    """Tracebacks and error lines from gunicorn's log (Django logs 5xx there)."""
    text = log.read_text(errors="replace") if log.exists() else ""
    blocks = re.split(r"\n(?=\S)", text)
    return [b.strip() for b in blocks if re.search(r"Traceback|ERROR|CRITICAL|Error", b)]


def sql_label(sql: str) -> str:
    """``SELECT studyapp_trial``-style label of one SQL statement (verb and first table)."""
    verb = sql.split(None, 1)[0].upper() if sql.strip() else "?"
    if verb in {"BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE"}:
        return verb
    if verb == "SELECT" and re.match(r"SELECT COUNT\(\*\)", sql, re.I):
        verb = "COUNT"
    elif verb == "SELECT" and re.match(r"SELECT 1 AS", sql, re.I):
        verb = "EXISTS"
    locks = " FOR UPDATE" if re.search(r"FOR (NO KEY )?UPDATE", sql) else ""
    while re.search(r"\([^()]*\)", sql):  # drop subqueries: the outer statement's table
        sql = re.sub(r"\([^()]*\)", "", sql)
    table = re.search(r'(?:FROM|INTO|UPDATE)\s+"?(\w+)"?', sql, re.I)
    return f"{verb} {table.group(1) if table else '?'}{locks}"


def fmt(x: float, digits: int = 1) -> str:
    return f"{x:,.{digits}f}"


def session_writes(r: dict) -> int:
    """Unsafe requests of one whole session: judgments, re-sends, client info, completion."""
    n = r["study"]["trials"] + r["study"]["practice"]
    resends = -(-n // r["resend_every"]) if r["resend_every"] else 0
    return n + resends + 2


def render_markdown(r: dict) -> str:
    p, m, db, t = r["phases"], r["machine"], r["db"], r["targets"]
    title, mark_start, mark_end = section_ids(r["think_ms"], r["durable"])
    lines = [
        mark_start,
        f"## {title}",
        "",
        f"Command: `{r['command']}` ({r['date']}, {r['total_s'] / 60:.1f} min in all, of"
        f" which {r['setup_s']['total_s']:.0f} s setting up: PostgreSQL, migrations, study,"
        " gunicorn)",
        "",
        f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, {m['memory_gib']} GiB; "
        f"Python {m['python']}, Django {m['django']}, DRF {m['djangorestframework']}, "
        f"gunicorn {m['gunicorn']}, psycopg {m['psycopg']}, {r['postgres_version']}; "
        f"load average (1/5/15 min) {r['load_before']} at the start, {r['load_after']} at "
        "the end. Server, database and clients all run on these cores.",
        "",
        f"Server: `{r['server']}` on the production settings (`bench/load_settings.py` ="
        " `studyapp.settings` + the trivial view `/bench/ping/` from `bench/loadsite.py`),"
        " DEBUG off, rate-limit counters "
        + ("in Redis (`PERCEPTLAB_CACHE=redis://...`, a redis-server started for the run)"
           if r.get("cache") == "redis" else "in the database cache table") + ";"
        + (f" participant write rate limit overridden to `{r['write_rate']}` per session"
           " (production: 120/min)." if r["write_rate"] else
           " production's participant write rate limit (120/min per session: a session"
           f" sends {session_writes(r)} writes in all, so it never refuses one here).")
        + " PostgreSQL: a throwaway cluster (`tests.support.pgserver`) with "
        + ("**fsync, synchronous_commit and full_page_writes on** (durable: every commit"
           " waits for its WAL flush)." if r.get("durable") else
           "**fsync, synchronous_commit and full_page_writes off** (commits cost less than on"
           " a durable server; `--durable` has its own section)."),
        "",
        f"Study: {r['study']['data_pairs']} data pairs (K = {r['study']['k']}), "
        f"{r['study']['sentinels']} sentinel and {r['study']['catch']} catch pairs, "
        f"{r['study']['image_px']}×{r['study']['image_px']} px PNGs "
        f"({r['study']['png_kb_mean']} KiB mean); sessions of {r['study']['trials']} main + "
        f"{r['study']['practice']} practice trials (every trial answered).",
        "",
        f"Clients: {r['participants']} simulated participants at once, one Python thread"
        " each (`http.client`, own cookies and connection), in the benchmark's process. "
        + ("Each whole session: landing page → consent POST (CSRF) → runner page → state →"
           " client-info PATCH → per trial: state (next trial), "
           + ("both images, " if r["images"] else "")
           + "judgment POST → complete POST → end page; "
           + (f"every {r['resend_every']}th judgment sent again with its idempotency key after"
              " its 201, as the runner's outbox does when an answer is lost (must answer 200;"
              " counted apart from the submits); " if r["resend_every"] else "")
           + (f"think time {r['think_ms']:.0f} ms (mean) per trial." if r["think_ms"]
              else "no think time (each participant answers as soon as the server has"
                   " replied: a stress test, far above a real study's pace).")),
        "",
        "| phase | participants | wall s | requests | req/s | judgments/s | errors "
        "| CPU cores used: client / gunicorn / PostgreSQL / Redis / other |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, label, who in [
        ("sessions", "whole sessions", r["participants"]),
        ("starts", "burst: session starts", r["participants"]),
        ("ping_before", "ping (before burst)", r["participants"]),
        ("burst", "**submit burst**", r["participants"]),
        ("ping_after", "ping (after burst)", r["participants"]),
        ("finish", "burst: completion", r["participants"]),
    ]:
        ph = p[key]
        c = ph["cores"]
        jps = fmt(ph["judgments"] / ph["wall_s"]) if ph["judgments"] else ""
        lines.append(
            f"| {label} | {who} | {fmt(ph['wall_s'])} | {ph['requests']:,} | "
            f"{fmt(ph['requests'] / ph['wall_s'])} | {jps} | {ph['errors']} | "
            f"{c['client']:.2f} / {c['gunicorn']:.2f} / {c['postgres']:.2f} / "
            f"{c.get('redis', 0):.2f} / {c['other processes']:.2f} |"
        )
    lines += [
        "",
        "Latency (ms, measured by the client: includes queueing in gunicorn's backlog and the"
        " client's own thread scheduling):",
        "",
        "| endpoint | phase | n | p50 | p95 | p99 | max |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = [
        ("next trial: `GET /api/sessions/<token>/`", "sessions", "state"),
        ("submit: `POST /api/sessions/<token>/judgments/`", "sessions", "judgment"),
        ("submit: `POST /api/sessions/<token>/judgments/`", "burst", "judgment"),
        ("trivial view: `GET /bench/ping/`", "ping_before", "ping"),
        ("trivial view: `GET /bench/ping/`", "ping_after", "ping"),
        ("re-sent judgment (same key → 200)", "sessions", "judgment retry"),
        ("image: `GET /img/<token>/<key>/`", "sessions", "image"),
        ("consent + start: `POST /study/<slug>/`", "sessions", "start"),
        ("runner page: `GET /session/<token>/`", "sessions", "runner page"),
        ("complete: `POST /api/sessions/<token>/complete/`", "sessions", "complete"),
    ]
    names = {"sessions": "whole sessions", "burst": "submit burst",
             "ping_before": "ping before", "ping_after": "ping after"}
    for label, key, endpoint in rows:
        q = p[key]["latency_ms"].get(endpoint)
        if q and q["n"]:
            lines.append(f"| {label} | {names[key]} | {q['n']:,} | {fmt(q['p50'])} | "
                         f"{fmt(q['p95'])} | {fmt(q['p99'])} | {fmt(q['max'])} |")
    lines += [
        "",
        "Targets:",
        "",
        f"- At least 200 concurrent participants doing whole sessions over HTTP: "
        f"{r['participants']} — **{'met' if r['participants'] >= 200 else 'NOT met'}**",
        f"- Errors: {t['errors']} (non-2xx/expected-3xx answers and transport failures, every"
        f" phase; {t['reconnects']} re-sends on a kept-alive connection the server had closed)"
        f" — **{'met' if t['errors'] == 0 else 'NOT met'}**",
        f"- Lost judgments: {db['lost']} of {db['acknowledged']:,} acknowledged (stored: "
        f"{db['stored']:,}; stored twice: {db['stored_twice']}; stored but never acknowledged:"
        f" {db['stored_unacknowledged']}; at another session/position: "
        f"{db['stored_elsewhere']}; scheduler bookkeeping errors: "
        f"{len(db['assignment_errors'])}; most judged main trials of a pair: "
        f"{db['max_judged_per_pair']} ≤ K = {db['k']}) — "
        f"**{'met' if db['lost'] == 0 else 'NOT met'}**",
        f"- Submit throughput / trivial view (same server, run, concurrency): "
        f"{fmt(t['submit_rps'])} / {fmt(t['ping_rps'])} req/s (mean of the pings before and "
        f"after: {fmt(t['ping_before_rps'])} and {fmt(t['ping_after_rps'])}) = "
        f"**{t['ratio']:.2f}** — **{'met' if t['ratio'] >= 0.5 else 'NOT met'}** (target ≥ 0.5)",
        "",
        f"Judgments/s: {fmt(t['session_jps'])} in whole sessions "
        f"({p['sessions']['judgments']:,} judgments, every request of the sessions included),"
        f" {fmt(t['submit_rps'])} in the submit burst.",
        "",
        f"Server CPU per request (gunicorn + PostgreSQL CPU seconds / requests of the phase; "
        f"less sensitive to the client's share of the cores): ping {fmt(t['ping_cpu_ms'], 2)}"
        f" ms, submit {fmt(t['submit_cpu_ms'], 2)} ms → CPU-cost ratio "
        f"{t['cpu_ratio']:.2f}; a whole session costs {fmt(t['session_cpu_ms'])} ms of server"
        " CPU per judgment.",
        "",
        "Where a request's cost comes from (after the load: one request at a time through"
        " Django's test client on the same database, no HTTP, no concurrency, CSRF checks off;"
        " wall ms on this machine, median and minimum — the minimum is the better guess at the"
        " service time when other jobs share the cores; SQL statements per request):",
        "",
        "| endpoint | SQL statements | in-process ms: median | min | requests |",
        "|---|---|---|---|---|",
    ]
    for name in ("ping", "state", "judgment", "image", "start", "complete"):
        c = r["request_costs"].get(name)
        if c:
            lines.append(f"| {name} | {c['queries']} | {fmt(c['median_ms'], 2)} | "
                         f"{fmt(c['min_ms'], 2)} | {c['n']} |")
    judgment = r["request_costs"].get("judgment")
    if judgment:
        lines += [
            "",
            f"The judgment POST's statements ({judgment['queries']}; a main trial's, in"
            " order): "
            + " · ".join(f"`{label}`" for label in judgment["sql"])
            + (" (`perceptlab_cache`: the rate limit's counters)." if r.get("cache") == "db"
               else " (the rate-limit counters are in Redis: no SQL)."),
        ]
    lines += [
        "",
        "Notes:",
        "",
    ]
    sessions = p["sessions"]
    if r["think_ms"]:
        offered = r["participants"] / (r["think_ms"] / 1000)
        served = sessions["judgments"] / sessions["wall_s"]
        lines.append(
            f"- Paced: {r['participants']} participants pausing {r['think_ms']:.0f} ms (mean)"
            f" per trial could answer at most {fmt(offered)} judgments/s; served:"
            f" {fmt(served)} judgments/s"
            + (" — the server, not the pace, set the rate here (each trial waited for it)."
               if served < 0.8 * offered else ".")
        )
    else:
        little = r["participants"] / (sessions["requests"] / sessions["wall_s"])
        lines.append(
            f"- Closed loop without think time: each of the {r['participants']} clients sends"
            " its next request as soon as the previous one returns, so by Little's law the"
            f" mean latency is about participants / throughput ({r['participants']} /"
            f" {fmt(sessions['requests'] / sessions['wall_s'])} req/s ≈ {little:.1f} s in"
            " whole sessions): the latencies above are mostly waiting in gunicorn's backlog,"
            " not service time (see the in-process table). `--think-ms` paces participants"
            " (section *paced participants*, when run)."
        )
    ping_client = (p["ping_before"]["cores"]["client"] + p["ping_after"]["cores"]["client"]) / 2
    lines.append(
        "- What the ratio compares: `/bench/ping/` runs the middleware stack and no SQL; the"
        " submit adds DRF parsing and validation and the statements listed above, so the"
        " throughput ratio follows the server-CPU ratio. During the pings the client itself"
        f" used {ping_client:.2f} cores (vs {p['burst']['cores']['client']:.2f} in the burst):"
        " ping throughput is partly limited by the client, which flatters the ratio."
    )
    lines.append(
        "- All participants of a phase start at the same instant (in whole sessions: "
        f"{r['participants']} consent POSTs at once); a real study's arrivals are spread out."
    )
    lines += [f"- {note}" for note in r["notes"]]
    problems = r["gunicorn_log_problems"]
    lines.append(
        f"- gunicorn's log (`bench/out/load/gunicorn.log`): {len(problems)} error entries"
        + (f"; first: `{problems[0].splitlines()[0][:200]}`" if problems else ".")
    )
    lines += ["", mark_end]
    return "\n".join(lines) + "\n"


NOTES = [
    "One machine for everything: the clients' Python threads, gunicorn and PostgreSQL compete"
    " for the same cores (the CPU columns say how much each got; *other* is the rest of the"
    " machine). Throughput is the whole system's, not the server's alone; latencies include"
    " the time a client thread waited for the GIL or a core.",
    "The ratio compares two saturated phases at the same concurrency; with sync workers each"
    " request also pays a TCP connect (gunicorn's sync worker closes the connection after"
    " every response), the same for ping and submit.",
    "The next-trial latency is the session-state GET, which the benchmark sends before every"
    " trial (the real trial runner reads it once per page load and keeps it): more state reads"
    " than a browser makes.",
    "Static files (JS, CSS) are not fetched; a browser loads them once per participant"
    " (WhiteNoise, cacheable).",
    "Unless the section says durable: PostgreSQL runs with durability off (fsync,"
    " synchronous_commit, full_page_writes); a production server with synchronous commits"
    " pays a WAL flush per transaction (the durable section measures it).",
    "Stimulus PNGs are crops of scikit-image's photographs with random-sign noise, not attack"
    " outputs (the server never looks at pixels); several pairs share one file (the OS page"
    " cache would hold a real study's images as well).",
]


def write_benchmarks(section: str, think_ms: float, durable: bool = False) -> None:
    """Replace (or append) this script's section (bench/_common.py's one section writer)."""
    from bench._common import write_markdown_section

    _, mark_start, mark_end = section_ids(think_ms, durable)
    write_markdown_section(BENCHMARKS, mark_start, mark_end, section)


# ------------------------------------------------------------------------------ main


def parse_args(argv: Iterable[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--participants", type=int, default=200,
                        help="simulated participants at once, in every phase (default 200)")
    parser.add_argument("--workers", type=int, default=4, help="gunicorn workers (default 4)")
    parser.add_argument("--threads", type=int, default=1,
                        help="threads per gunicorn worker; > 1 uses the gthread worker")
    parser.add_argument("--trials", type=int, default=8,
                        help="main trials per session (default 8, so the default run stays"
                        " near 2–3 min on 2 shared cores; a study's default is 20)")
    parser.add_argument("--practice", type=int, default=2, help="practice trials per session")
    parser.add_argument("--pairs", type=int, default=2800, help="data pairs (PAT study: 2800)")
    parser.add_argument("--k", type=int, default=5, help="judgments per pair (PAT study: 5)")
    parser.add_argument("--sentinels", type=int, default=40)
    parser.add_argument("--catch", type=int, default=20)
    parser.add_argument("--image-size", type=int, default=224, help="stimulus side, px")
    parser.add_argument("--distinct-images", type=int, default=200,
                        help="PNG files written per side (pairs share them round-robin)")
    parser.add_argument("--no-images", action="store_true",
                        help="do not fetch the two images of each trial")
    parser.add_argument("--think-ms", type=float, default=0,
                        help="mean pause before each answer in whole sessions (0: none)")
    parser.add_argument("--ping-seconds", type=float, default=6.0)
    parser.add_argument("--resend-every", type=int, default=5,
                        help="in whole sessions, re-send every Nth judgment (same key) after"
                        " its 201, expecting 200 (0: never)")
    parser.add_argument("--warmup", type=int, default=4, help="whole sessions before measuring")
    parser.add_argument("--write-rate",
                        help="override the participant write rate limit, e.g. 1000/min"
                        " (default: production's, 120/min per session)")
    parser.add_argument("--timeout", type=float, default=120.0, help="client timeout, s")
    parser.add_argument("--cache", choices=["redis", "db"], default="redis",
                        help="where the rate-limit counters live: a redis-server started for"
                        " the run (production's recommendation, default) or the database table")
    parser.add_argument("--durable", action="store_true",
                        help="PostgreSQL with fsync, synchronous_commit and full_page_writes on")
    parser.add_argument("--no-write", action="store_true", help="do not touch BENCHMARKS.md")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary folder (PNG files) after the run")
    args = parser.parse_args(argv)
    needed = 2 * args.participants + args.warmup + 3  # + 3: request_costs()
    data_per_session = args.trials - round(0.1 * args.trials) * 2
    if args.pairs * args.k < needed * data_per_session:
        parser.error(f"--pairs × --k = {args.pairs * args.k} slots < {needed} sessions × "
                     f"{data_per_session} data trials; raise --pairs or --k")
    return args


def main(argv: list[str] | None = None) -> int:  # noqa: C901 - one linear run reads best
    args = parse_args(argv)
    t_start, started_at = time.monotonic(), datetime.now()
    given = sys.argv[1:] if argv is None else argv
    command = " ".join([".venv/bin/python bench/load.py", *given])
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    load_before = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    tmp = Path(tempfile.mkdtemp(prefix="perceptlab-load-"))
    gunicorn_log = OUT_DIR / "gunicorn.log"
    gunicorn_log.write_text("")

    from contextlib import ExitStack, nullcontext

    from tests.support.pgserver import temporary_postgres
    from tests.support.redisserver import temporary_redis

    durable = {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on"}
    print("starting PostgreSQL …", file=sys.stderr)
    try:
        with ExitStack() as stack:
            pg = stack.enter_context(
                temporary_postgres(settings=durable if args.durable else None)
            )
            redis = stack.enter_context(
                temporary_redis() if args.cache == "redis" else nullcontext(None)
            )
            env = {
                **os.environ,
                "DATABASE_URL": pg.url,
                "DJANGO_SETTINGS_MODULE": "bench.load_settings",
                "DJANGO_SECRET_KEY": secrets.token_urlsafe(50),
                "DJANGO_DEBUG": "0",
                "PERCEPTLAB_VAR": str(tmp / "var"),
                "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            }
            for name in ("DJANGO_SECURE", "PERCEPTLAB_CACHE", "PERCEPTLAB_MEDIA",
                         "PERCEPTLAB_RATE_PARTICIPANT_WRITE", "DJANGO_ALLOWED_HOSTS"):
                env.pop(name, None)
            if args.write_rate:
                env["PERCEPTLAB_RATE_PARTICIPANT_WRITE"] = args.write_rate
            if redis:
                env["PERCEPTLAB_CACHE"] = redis.url
            os.environ.update({k: v for k, v in env.items() if k != "PYTHONPATH"})
            import django

            django.setup()
            from django.conf import settings
            from django.core.management import call_command
            from django.db import connection, connections

            setup = {"postgres_s": time.monotonic() - t_start}
            print("migrating, writing the study …", file=sys.stderr)
            call_command("migrate", verbosity=0, interactive=False)
            study_info = build_study(args, Path(settings.MEDIA_ROOT))
            with connection.cursor() as cursor:
                cursor.execute("SELECT version()")
                pg_version = cursor.fetchone()[0].split(" on ")[0]
            postmaster = int((pg.data_dir / "postmaster.pid").read_text().split()[0])
            setup["migrate_and_study_s"] = time.monotonic() - t_start - setup["postgres_s"]
            connections.close_all()

            port = free_port()
            print(f"starting {gunicorn_command_line(args)} …", file=sys.stderr)
            server = start_gunicorn(args, env, port, gunicorn_log)
            setup["total_s"] = time.monotonic() - t_start
            try:
                ctx = {
                    "port": port, "timeout": args.timeout, "acked": Acknowledged(),
                    "finished": set(), "trials_per_session": args.trials + args.practice,
                    "resend_every": args.resend_every,
                    "roots": {"client": os.getpid(), "gunicorn": server.pid,
                              "postgres": postmaster, "redis": redis.pid if redis else -1},
                }
                progress = not args.no_progress
                phases: dict[str, Phase] = {}
                if args.warmup:
                    phases["warmup"] = sessions_phase("warm-up", args.warmup, ctx, 0,
                                                      not args.no_images, False)
                phases["sessions"] = sessions_phase(
                    "whole sessions", args.participants, ctx, args.think_ms / 1000,
                    not args.no_images, progress,
                )
                phases.update(burst_phases(args.participants, ctx, args.ping_seconds,
                                           progress))
            finally:
                stop_gunicorn(server)
            db = check_database(ctx["acked"], ctx["finished"])
            print("measuring queries per request (in-process) …", file=sys.stderr)
            costs = request_costs()
            connections.close_all()
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    summaries = {}
    for key, phase in phases.items():
        s = phase.summary()
        s["cores"] = cores(phase)
        summaries[key] = s
    ping_before, ping_after = rate(phases["ping_before"]), rate(phases["ping_after"])
    ping_rps = (ping_before + ping_after) / 2
    burst = phases["burst"]
    submit_rps = rate(burst, "judgments")
    ping_cpu = (server_cpu_ms(phases["ping_before"], phases["ping_before"].requests)
                + server_cpu_ms(phases["ping_after"], phases["ping_after"].requests)) / 2
    submit_cpu = server_cpu_ms(burst, burst.judgments)
    errors = sum(len(ph.errors) for ph in phases.values())
    targets = {
        "errors": errors,
        "reconnects": sum(sum(ph.reconnects.values()) for ph in phases.values()),
        "ping_before_rps": ping_before, "ping_after_rps": ping_after, "ping_rps": ping_rps,
        "submit_rps": submit_rps, "ratio": submit_rps / ping_rps if ping_rps else 0.0,
        "session_jps": rate(phases["sessions"], "judgments"),
        "ping_cpu_ms": ping_cpu, "submit_cpu_ms": submit_cpu,
        "cpu_ratio": ping_cpu / submit_cpu if submit_cpu else 0.0,
        "session_cpu_ms": server_cpu_ms(phases["sessions"], phases["sessions"].judgments),
    }
    problems = gunicorn_problems(gunicorn_log)
    result = {
        "command": command,
        "date": started_at.strftime("%Y-%m-%d %H:%M"),
        "total_s": time.monotonic() - t_start,
        "setup_s": {k: round(v, 1) for k, v in setup.items()},
        "machine": machine_info(),
        "postgres_version": pg_version,
        "load_before": load_before,
        "load_after": " / ".join(f"{x:.1f}" for x in os.getloadavg()),
        "server": gunicorn_command_line(args),
        "cache": args.cache,
        "durable": args.durable,
        "write_rate": args.write_rate,
        "study": study_info,
        "participants": args.participants,
        "images": not args.no_images,
        "think_ms": args.think_ms,
        "resend_every": args.resend_every,
        "phases": summaries,
        "targets": targets,
        "db": db,
        "request_costs": costs,
        "gunicorn_log_problems": problems[:20],
        "notes": NOTES,
    }
    (OUT_DIR / "results.json").write_text(json.dumps(result, indent=1, default=str))
    section = render_markdown(result)
    (OUT_DIR / "section.md").write_text(section)
    print(section)
    if errors or db["lost"] or problems:
        print(f"\n{errors} errors; first ones:", file=sys.stderr)
        for phase in phases.values():
            for message in phase.errors[:5]:
                print(f"  [{phase.name}] {message}", file=sys.stderr)
        if problems:
            print(f"gunicorn log ({gunicorn_log}) has {len(problems)} error entries; first:\n"
                  + problems[0][:3000], file=sys.stderr)
    if not args.no_write:
        write_benchmarks(section, args.think_ms, args.durable)
        print(f"wrote the section '{section_ids(args.think_ms, args.durable)[0]}' of {BENCHMARKS}",
              file=sys.stderr)
    return 1 if errors or db["lost"] else 0


if __name__ == "__main__":
    sys.exit(main())
