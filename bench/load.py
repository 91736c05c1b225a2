"""Load benchmark of the study server: gunicorn + PostgreSQL (+ Redis), participants from locust.

What one run does (everything on this machine; nothing asserts on time):

1. Starts a throwaway PostgreSQL cluster (:mod:`tests.support.pgserver`; ``--durable`` keeps
   fsync, synchronous_commit and full_page_writes on) and a redis-server for the rate-limit
   counters, migrates, and builds a study: ``--pairs`` data pairs (K = ``--k``), sentinel and
   catch pairs, lossless PNGs cut from scikit-image's bundled photographs.
2. Starts gunicorn on the production settings (``bench.load_settings`` = ``studyapp.settings``
   plus the trivial view ``/bench/ping/``), DEBUG off, ``--workers`` gthread workers of
   ``--threads`` threads, keep-alive ``--keep-alive`` s.
3. Runs locust (``bench/locustfile.py``, in its own environment ``bench/.venv-load``:
   ``bash bench/setup_load_env.sh``) three times against it:

   - *sessions*: ``--participants`` users, each one participant after another doing a whole
     session as ``static/js/trials.js`` does (consent, runner page, state, client info, per
     trial both images then a pause of ``--think-ms`` (±30 %) then the judgment, client info,
     completion, end page; every ``--resend-every``-th judgment re-sent with its key, which
     must answer 200). Users arrive at ``--spawn-rate`` per second; statistics and CPU are
     taken over the ``--duration`` seconds after the last one arrived (the steady state).
   - *submit*: ``--burst-users`` users post the judgments of sessions started beforehand (in
     process, not timed) back to back, for ``--burst-seconds``;
   - *ping*: as many users call ``/bench/ping/`` back to back, as long.

4. Checks the database: every acknowledged judgment (201, or 200 for a re-send) stored exactly
   once, at its session and position; nothing stored that was never acknowledged; the
   scheduler's bookkeeping (``scheduler.assignment_errors``) clean; no pair above K.

Reported: p50/p95/p99 per request kind (locust's), errors, lost judgments, judgments/s, the
CPU each party used (locust, gunicorn, PostgreSQL, Redis, the rest of the machine: they share
its cores), server CPU (gunicorn + PostgreSQL + Redis) per judgment over whole sessions, and
the submit / trivial-view throughput ratio. Results: a section of ``BENCHMARKS.md`` (unless
``--no-write``; one section per participant count, pace and durability), raw data, locust's
CSV and the gunicorn log under ``bench/out/load/``.

    bash bench/setup_load_env.sh                      # once: locust in bench/.venv-load
    .venv/bin/python bench/load.py                    # 1,000 participants, 3.5 s per trial
    .venv/bin/python bench/load.py --durable          # the same on durable PostgreSQL
    .venv/bin/python bench/load.py --participants 20 --duration 20 --no-write   # smoke run
"""

from __future__ import annotations

import argparse
import csv
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
from collections import Counter, defaultdict
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._bodies import judgment_body  # noqa: E402  (one body for load.py and locust)

OUT_DIR = ROOT / "bench" / "out" / "load"
BENCHMARKS = ROOT / "BENCHMARKS.md"
LOCUST = ROOT / "bench" / ".venv-load" / "bin" / "locust"
LOCUSTFILE = ROOT / "bench" / "locustfile.py"
SECTION_TITLE = "Study server load (gunicorn + PostgreSQL)"
STUDY_SLUG = "load"
CONSENT = "I agree to take part in this benchmark study. (Simulated participant.)"
USER_AGENT = "perceptlab-bench-load/2 (simulated participant)"
PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "stereo_motorcycle"]


def section_ids(participants: int, think_ms: float, durable: bool = False) -> tuple[str, str, str]:
    """(title, start marker, end marker) of a run's section: one per participant count, pace
    and durability, so that a capacity sweep keeps a section per point."""
    pace = f"{participants:,} participants at {think_ms:.0f} ms per trial"
    key = f"{participants} {think_ms:.0f}ms" + (" durable" if durable else "")
    title = f"{SECTION_TITLE}: {pace}" + (", durable PostgreSQL (fsync on)" if durable else "")
    return title, f"<!-- bench/load.py {key}: start -->", f"<!-- bench/load.py {key}: end -->"


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(args, port: int) -> list[str]:
    """gunicorn's command line (sync workers, or gthread with ``--threads`` > 1)."""
    command = [
        sys.executable, "-m", "gunicorn", "studyapp.wsgi", "--chdir", str(ROOT),
        "-w", str(args.workers), "-b", f"127.0.0.1:{port}",  # else gunicorn's defaults
        "--keep-alive", str(args.keep_alive), "--backlog", "4096",
        "--log-level", "warning", "--error-logfile", "-",
    ]
    if args.threads > 1:
        command += ["-k", "gthread", "--threads", str(args.threads)]
    return command


def start_gunicorn(args, env: dict, port: int, log: Path) -> subprocess.Popen:
    command = server_command(args, port)
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


def gunicorn_command_line(args) -> str:
    kind = f"-k gthread --threads {args.threads} " if args.threads > 1 else "(sync) "
    return f"gunicorn studyapp.wsgi {kind}-w {args.workers} --keep-alive {args.keep_alive}"


# ------------------------------------------------------------------------------ locust runs


class CPUSampler:
    """CPU seconds of each party, sampled every ``interval`` s in a thread, so that a window of
    the run (the steady state) can be cut out afterwards."""

    def __init__(self, roots: dict[str, int], interval: float = 1.0) -> None:
        self.roots, self.interval = roots, interval
        self.samples: list[tuple[float, dict[str, float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            self.samples.append((time.time(), cpu_snapshot(self.roots)))
            if self._stop.wait(self.interval):
                self.samples.append((time.time(), cpu_snapshot(self.roots)))
                return

    def __enter__(self) -> CPUSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def window(self, start: float, end: float) -> tuple[float, dict[str, float]]:
        """(seconds, CPU seconds per party) between the samples nearest ``start`` and ``end``."""
        first = min(self.samples, key=lambda s: abs(s[0] - start))
        last = min(self.samples, key=lambda s: abs(s[0] - end))
        return last[0] - first[0], cpu_delta(first[1], last[1])


def read_stats(prefix: Path) -> dict[str, dict]:
    """Locust's ``<prefix>_stats.csv``: per request name, count, failures, rate, percentiles."""
    rows = {}
    with open(f"{prefix}_stats.csv", newline="") as f:
        for row in csv.DictReader(f):
            def num(key, row=row):
                value = row.get(key, "")
                return float(value) if value not in ("", "N/A") else float("nan")

            rows[row["Name"]] = {
                "n": int(row["Request Count"]), "failures": int(row["Failure Count"]),
                "rps": num("Requests/s"), "mean": num("Average Response Time"),
                "p50": num("50%"), "p95": num("95%"), "p99": num("99%"), "max": num("100%"),
            }
    return rows


def read_failures(prefix: Path) -> list[dict]:
    path = Path(f"{prefix}_failures.csv")
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [
            {"name": row["Name"], "error": row["Error"][:300], "n": int(row["Occurrences"])}
            for row in csv.DictReader(f)
        ]


def run_locust(name: str, mode: str, users: int, spawn_rate: float, run_s: float, port: int,
               args, roots: dict[str, int], work: Path, think_ms: float | None = None) -> dict:
    """One locust run; returns its statistics over the steady state (after every user
    arrived: ``--reset-stats``) and the CPU of that window."""
    out = work / name
    out.mkdir(parents=True, exist_ok=True)
    prefix = OUT_DIR / f"locust_{name}"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("DJANGO", "DATABASE"))},
        "LOAD_MODE": mode,
        "LOAD_THINK_MS": str(args.think_ms if think_ms is None else think_ms), "LOAD_OUT": str(out),
        "LOAD_RESEND_EVERY": str(args.resend_every), "LOAD_SLUG": STUDY_SLUG,
    }
    command = [
        str(LOCUST), "-f", str(LOCUSTFILE), "--headless", "--host", f"http://127.0.0.1:{port}",
        "-u", str(users), "-r", str(spawn_rate), "--run-time", f"{int(run_s)}s",
        "--reset-stats", "--csv", str(prefix), "--only-summary", "--stop-timeout", "0",
        "--loglevel", "WARNING",
    ]
    if mode == "submit":
        shutil.copy(work / "sessions.jsonl", out / "sessions.jsonl")
    log = OUT_DIR / f"locust_{name}.log"
    # "client": this process and its locust child (whose CPU moves to this process's children
    # total once it has exited and been waited for).
    with log.open("wb") as sink, CPUSampler({**roots, "client": os.getpid()}) as sampler:
        proc = subprocess.Popen(command, cwd=ROOT / "bench", env=env, stdout=sink, stderr=sink)
        started = time.time()
        with tqdm(total=int(run_s), desc=f"locust {name} ({users} users)", unit="s",
                  disable=args.no_progress) as bar:
            while proc.poll() is None:
                time.sleep(1)
                bar.n = min(int(time.time() - started), int(run_s))
                bar.refresh()
        ended = time.time()
    if proc.returncode not in (0, 1):  # 1: some request failed (reported, not fatal)
        raise RuntimeError(f"locust {name} exited {proc.returncode}:\n{log.read_text()[-3000:]}")
    spawned_file = out / "spawned"
    spawned = json.loads(spawned_file.read_text())["time"] if spawned_file.exists() else started
    seconds, cpu = sampler.window(spawned, ended)
    stats = read_stats(prefix)
    acks = [json.loads(line) for path in out.glob("acks-*.jsonl")
            for line in path.read_text().splitlines()]
    return {
        "users": users, "run_s": round(ended - started, 1), "steady_s": round(seconds, 1),
        "stats": stats, "failures": read_failures(prefix), "cpu_s": cpu,
        "cores": {k: v / seconds for k, v in cpu.items() if not k.startswith("machine")},
        "acks": acks,
    }


def server_cpu_ms(run: dict, count: float) -> float:
    server = sum(run["cpu_s"].get(name, 0) for name in ("gunicorn", "postgres", "redis"))
    return 1000 * server / max(count, 1)


def prepare_submit_sessions(n: int, work: Path) -> int:
    """``n`` sessions started in process (not timed), for the submit burst."""
    from studyapp.models import Participant, Study
    from studyapp.scheduler import start_session

    study = Study.objects.get(slug=STUDY_SLUG)
    lines = []
    for i in tqdm(range(n), desc="sessions for the submit burst", leave=False):
        participant = Participant.objects.create(study=study, source="link",
                                                 external_id=f"burst-{i}")
        session = start_session(participant, user_agent=USER_AGENT)
        positions = list(session.trials.order_by("position").values_list("position", flat=True))
        lines.append(json.dumps({"token": session.token, "positions": positions}))
    (work / "sessions.jsonl").write_text("\n".join(lines) + "\n")
    return len(lines)


def check_database(acks: list[list]) -> dict:
    """Compare what the clients were told with what PostgreSQL holds."""
    from django.db.models import Count, Q

    from studyapp.models import Judgment, Pair, Session, Study
    from studyapp.scheduler import assignment_errors

    study = Study.objects.get(slug=STUDY_SLUG)
    rows = list(
        Judgment.objects.filter(trial__session__participant__study=study)
        .values_list("idempotency_key", "trial__session__token", "trial__position")
    )
    where = {key: (token, position) for key, token, position in rows}
    stored = Counter(key for key, _, _ in rows)
    keys = {key: (token, position) for key, token, position in acks}
    lost = sorted(k for k in keys if k not in stored)
    judged = list(
        Pair.objects.filter(study=study, condition__isnull=False)
        .annotate(n=Count("trials", filter=Q(trials__is_practice=False,
                                             trials__judgment__isnull=False)))
        .values_list("n", flat=True)
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
        "completed": Session.objects.filter(participant__study=study,
                                            completed_at__isnull=False).count(),
    }


def gunicorn_problems(log: Path) -> list[str]:
    """Tracebacks and error lines from gunicorn's log (Django logs 5xx there)."""
    text = log.read_text(errors="replace") if log.exists() else ""
    blocks = re.split(r"\n(?=\S)", text)
    return [b.strip() for b in blocks if re.search(r"Traceback|ERROR|CRITICAL|Error", b)]


# ------------------------------------------------------------------------------ report


def fmt(x: float, digits: int = 1) -> str:
    return f"{x:,.{digits}f}"


def verdict(ok: bool) -> str:
    return "**met**" if ok else "**NOT met**"


LATENCY_ROWS = [
    ("next trial (both images)", "next trial: both images of a trial"),
    ("image", "image: `GET /img/<token>/<key>/`"),
    ("judgment", "submit: `POST /api/sessions/<token>/judgments/`"),
    ("judgment retry (same key)", "re-sent judgment (same key → 200)"),
    ("session state", "session state: `GET /api/sessions/<token>/`"),
    ("client info", "client info: `PATCH /api/sessions/<token>/`"),
    ("start page", "landing page: `GET /study/<slug>/`"),
    ("consent (start)", "consent + start: `POST /study/<slug>/`"),
    ("runner page", "runner page: `GET /session/<token>/`"),
    ("complete", "complete: `POST /api/sessions/<token>/complete/`"),
    ("end page", "end page: `GET /session/<token>/done/`"),
]


def render_markdown(r: dict) -> str:  # noqa: C901 - one linear report reads best
    m, db, t, s = r["machine"], r["db"], r["targets"], r["runs"]["sessions"]
    title, mark_start, mark_end = section_ids(
        r["runs"]["sessions"]["users"], r["think_ms"], r["durable"]
    )
    st = s["stats"]
    lines = [
        mark_start,
        f"## {title}",
        "",
        f"Command: `{r['command']}` ({r['date']}, {r['total_s'] / 60:.1f} min in all)",
        "",
        f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, {m['memory_gib']} GiB; "
        f"Python {m['python']}, Django {m['django']}, DRF {m['djangorestframework']}, "
        f"gunicorn {m['gunicorn']}, psycopg {m['psycopg']}, {r['postgres_version']}, locust "
        f"{r['locust_version']}; load average (1/5/15 min) {r['load_before']} at the start, "
        f"{r['load_after']} at the end. **Clients (locust), server, database and Redis all run"
        " on these cores.**",
        "",
        f"Server: `{r['server']}` on the production settings (`bench/load_settings.py` ="
        " `studyapp.settings` + the trivial view `/bench/ping/`), DEBUG off, stimulus images"
        " answered by `studyapp.stimulus_server.StimulusWSGI` in front of Django, rate-limit"
        " counters in Redis (`PERCEPTLAB_CACHE=redis://...`), production's participant write"
        " limit (120/min per session). PostgreSQL: a throwaway cluster with "
        + ("**fsync, synchronous_commit and full_page_writes on** (durable: every commit"
           " waits for its WAL flush)." if r["durable"] else
           "**fsync, synchronous_commit and full_page_writes off** (`--durable` has its own"
           " section)."),
        "",
        f"Study: {r['study']['data_pairs']:,} data pairs (K = {r['study']['k']}), "
        f"{r['study']['sentinels']} sentinel and {r['study']['catch']} catch pairs, "
        f"{r['study']['image_px']}×{r['study']['image_px']} px PNGs in "
        f"{r['study']['png_files']:,} files; sessions of {r['study']['trials']} main + "
        f"{r['study']['practice']} practice trials (the product's defaults).",
        "",
        f"Participants: **{s['users']:,} at once** (locust users; each one participant after"
        " another, a whole session each, as the trial runner: landing page → consent POST →"
        " runner page → state → client info → per trial: both images, a pause of "
        f"**{r['think_ms']:.0f} ms** (±30 %), the judgment → client info → complete → end page;"
        f" every {r['resend_every']}th judgment re-sent with its key). They arrived at "
        f"{r['spawn_rate']}/s (spread over about one session's length, so that session starts"
        " are spread as in a study people join over time); everything below is over the"
        f" **{fmt(s['steady_s'], 0)} s after the last arrived** (steady state).",
        "",
        "| request | n | p50 ms | p95 ms | p99 ms | max ms | failures |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, label in LATENCY_ROWS:
        q = st.get(name)
        if q and q["n"]:
            lines.append(f"| {label} | {q['n']:,} | {fmt(q['p50'], 0)} | {fmt(q['p95'], 0)} | "
                         f"{fmt(q['p99'], 0)} | {fmt(q['max'], 0)} | {q['failures']} |")
    c = s["cores"]
    lines += [
        "",
        f"CPU cores used in the steady state: locust {c['client']:.2f}, gunicorn "
        f"{c['gunicorn']:.2f}, PostgreSQL {c['postgres']:.2f}, Redis {c.get('redis', 0):.2f},"
        f" other processes {c['other processes']:.2f} (of {m['logical_cpus']}).",
        "",
        "Targets:",
        "",
        f"- {s['users']:,} participants at once at {r['think_ms']:.0f} ms per trial, served at"
        f" their pace: {fmt(t['session_jps'])} of the {fmt(t['offered_jps'])} judgments/s the"
        " pace asks for (target: 1,000 at 3,500 ms, at least 95 % served) — "
        + verdict(s["users"] >= 1000 and r["think_ms"] >= 3500
                  and t["session_jps"] >= 0.95 * t["offered_jps"]),
        f"- p99 under 300 ms for next trial, image and submit: {fmt(t['p99_next'], 0)} / "
        f"{fmt(t['p99_image'], 0)} / {fmt(t['p99_submit'], 0)} ms — "
        f"{verdict(max(t['p99_next'], t['p99_image'], t['p99_submit']) < 300)}",
        f"- Errors: {t['errors']} (unexpected statuses and transport failures, every run) — "
        f"{verdict(t['errors'] == 0)}",
        f"- Lost judgments: {db['lost']} of {db['acknowledged']:,} acknowledged (stored "
        f"{db['stored']:,}; twice {db['stored_twice']}; never acknowledged "
        f"{db['stored_unacknowledged']} (in flight when a run stopped); elsewhere "
        f"{db['stored_elsewhere']}; scheduler bookkeeping errors "
        f"{len(db['assignment_errors'])}; most judged main trials of a pair "
        f"{db['max_judged_per_pair']} ≤ K = {db['k']}) — {verdict(db['lost'] == 0)}",
        f"- Server CPU (gunicorn + PostgreSQL + Redis) per judgment over whole sessions: "
        f"**{fmt(t['session_cpu_ms'], 2)} ms** (target ≤ 5 ms) — "
        f"{verdict(t['session_cpu_ms'] <= 5)}",
        "",
        f"Submit / trivial view ({r['burst_users']} locust users each, back to back, "
        f"{r['burst_seconds']} s each, same server and run): submit "
        f"{fmt(t['submit_rps'])} judgments/s, `/bench/ping/` {fmt(t['ping_rps'])} req/s → "
        f"**ratio {t['ratio']:.2f}**; server CPU per request: submit "
        f"{fmt(t['submit_cpu_ms'], 2)} ms, ping {fmt(t['ping_cpu_ms'], 2)} ms (CPU ratio "
        f"{t['cpu_ratio']:.2f}); locust used {r['runs']['submit']['cores']['client']:.2f} and "
        f"{r['runs']['ping']['cores']['client']:.2f} cores.",
        "",
        "Where a request's cost comes from (after the load: one request at a time through"
        " Django's test client on the same database, no HTTP; wall ms on this machine, median"
        " and minimum; SQL statements per request):",
        "",
        "| endpoint | SQL statements | in-process ms: median | min | requests |",
        "|---|---|---|---|---|",
    ]
    for name in ("ping", "state", "judgment", "image", "start", "complete"):
        cost = r["request_costs"].get(name)
        if cost:
            lines.append(f"| {name} | {cost['queries']} | {fmt(cost['median_ms'], 2)} | "
                         f"{fmt(cost['min_ms'], 2)} | {cost['n']} |")
    judgment = r["request_costs"].get("judgment")
    if judgment:
        lines += [
            "",
            f"The judgment POST's statements ({judgment['queries']}): "
            + " · ".join(f"`{label}`" for label in judgment["sql"]) + ".",
        ]
    failures = [f for run in r["runs"].values() for f in run["failures"]]
    lines += ["", "Notes:", ""]
    if failures:
        lines.append("- Failures: " + "; ".join(
            f"{f['n']}× {f['name']}: {f['error'][:160]}" for f in failures[:5]))
    lines += [f"- {note}" for note in NOTES]
    problems = r["gunicorn_log_problems"]
    lines.append(
        f"- gunicorn's log (`bench/out/load/gunicorn.log`): {len(problems)} error entries"
        + (f"; first: `{problems[0].splitlines()[0][:200]}`" if problems else ".")
    )
    lines += ["", mark_end]
    return "\n".join(lines) + "\n"


NOTES = [
    "One machine for everything: locust, gunicorn, PostgreSQL and Redis compete for the same"
    " cores (the CPU line says how much each got). Latencies are locust's: they include"
    " waiting in gunicorn's backlog and locust's own scheduling.",
    "*next trial* is the time to fetch both images of a trial, one after the other (the real"
    " runner fetches them during the previous trial, so a participant waits only for what is"
    " left). The runner reads the session state once per page load (here: once per session).",
    "Static files (JS, CSS) are not fetched: a browser loads them once per participant"
    " (WhiteNoise, cacheable).",
    "Stimulus PNGs are crops of scikit-image's photographs with random-sign noise, not attack"
    " outputs (the server never looks at pixels).",
    "A user stopped at the end of a run leaves its session unfinished; its acknowledged"
    " judgments are checked like every other.",
]


def write_benchmarks(section: str, participants: int, think_ms: float, durable: bool) -> None:
    """Replace (or append) this run's section (bench/_common.py's one section writer)."""
    from bench._common import write_markdown_section

    _, mark_start, mark_end = section_ids(participants, think_ms, durable)
    write_markdown_section(BENCHMARKS, mark_start, mark_end, section)


# ------------------------------------------------------------------------------ main


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--participants", type=int, default=1000,
                        help="locust users at once, each a participant after another")
    parser.add_argument("--think-ms", type=float, default=3500,
                        help="mean pause per trial, ms (±30 %%); 0 = stress test")
    parser.add_argument("--duration", type=float, default=120,
                        help="steady-state seconds measured after the last user arrived")
    parser.add_argument("--spawn-rate", type=float, default=None,
                        help="users arriving per second (default: participants / the length of"
                             " a session at the pace, so that session starts are spread evenly"
                             " as in a study people join over time)")
    parser.add_argument("--workers", type=int, default=4, help="server worker processes")
    parser.add_argument("--threads", type=int, default=8,
                        help="threads per gthread worker (1: sync workers)")
    parser.add_argument("--keep-alive", type=int, default=10, help="gunicorn keep-alive, s")
    parser.add_argument("--trials", type=int, default=20, help="main trials per session")
    parser.add_argument("--practice", type=int, default=4, help="practice trials per session")
    parser.add_argument("--pairs", type=int, default=12000, help="data pairs")
    parser.add_argument("--k", type=int, default=5, help="judgments per pair (PAT study: 5)")
    parser.add_argument("--sentinels", type=int, default=200)
    parser.add_argument("--catch", type=int, default=200)
    parser.add_argument("--image-size", type=int, default=224, help="stimulus side, px")
    parser.add_argument("--distinct-images", type=int, default=1000,
                        help="distinct natural images (each with its own perturbed file)")
    parser.add_argument("--resend-every", type=int, default=10,
                        help="re-send every n-th judgment with its key (0: never)")
    parser.add_argument("--warmup", type=float, default=30,
                        help="seconds of unpaced sessions before measuring (not reported)")
    parser.add_argument("--burst-users", type=int, default=100)
    parser.add_argument("--burst-seconds", type=float, default=20)
    parser.add_argument("--durable", action="store_true",
                        help="PostgreSQL with fsync, synchronous_commit, full_page_writes on")
    parser.add_argument("--no-write", action="store_true", help="do not touch BENCHMARKS.md")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--rerender", type=Path, metavar="RESULTS_JSON",
                        help="only write the section of a saved results.json again")
    return parser.parse_args(argv)


def rerender(path: Path) -> None:
    """Write the section of a saved ``results.json`` again (after a change of the report)."""
    r = json.loads(path.read_text())
    section = render_markdown(r)
    write_benchmarks(section, r["runs"]["sessions"]["users"], r["think_ms"], r["durable"])
    print(section)


def main(argv: list[str] | None = None) -> int:  # noqa: C901 - one linear run reads best
    args = parse_args(argv)
    if args.rerender:
        rerender(args.rerender)
        return 0
    if args.spawn_rate is None:
        session_s = max(1.0, (args.trials + args.practice) * args.think_ms / 1000)
        args.spawn_rate = round(max(1.0, args.participants / session_s), 2)
    if not LOCUST.exists():
        print(f"no locust at {LOCUST.relative_to(ROOT)}: run `bash bench/setup_load_env.sh`"
              " once (locust gets its own environment, see bench/requirements-load.txt)",
              file=sys.stderr)
        return 2
    t_start, started_at = time.monotonic(), datetime.now()
    given = sys.argv[1:] if argv is None else argv
    command = " ".join([".venv/bin/python bench/load.py", *given])
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for old in OUT_DIR.glob("locust_*"):
        old.unlink()
    load_before = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    tmp = Path(tempfile.mkdtemp(prefix="perceptlab-load-"))
    gunicorn_log = OUT_DIR / "gunicorn.log"
    gunicorn_log.write_text("")

    from contextlib import ExitStack

    from tests.support.pgserver import temporary_postgres
    from tests.support.redisserver import temporary_redis

    durable = {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on"}
    print("starting PostgreSQL and Redis …", file=sys.stderr)
    try:
        with ExitStack() as stack:
            pg = stack.enter_context(
                temporary_postgres(settings={**(durable if args.durable else {}),
                                             "max_connections": "200"})
            )
            redis = stack.enter_context(temporary_redis())
            env = {
                **os.environ,
                "DATABASE_URL": pg.url,
                "DJANGO_SETTINGS_MODULE": "bench.load_settings",
                "DJANGO_SECRET_KEY": secrets.token_urlsafe(50),
                "DJANGO_DEBUG": "0",
                "PERCEPTLAB_VAR": str(tmp / "var"),
                "PERCEPTLAB_CACHE": redis.url,
                "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            }
            for name in ("DJANGO_SECURE", "PERCEPTLAB_MEDIA", "PERCEPTLAB_ROWS_DIR",
                         "PERCEPTLAB_RATE_PARTICIPANT_WRITE", "DJANGO_ALLOWED_HOSTS"):
                env.pop(name, None)
            os.environ.update({k: v for k, v in env.items() if k != "PYTHONPATH"})
            import django

            django.setup()
            from django.conf import settings
            from django.core.management import call_command
            from django.db import connection, connections

            print("migrating, writing the study …", file=sys.stderr)
            call_command("migrate", verbosity=0, interactive=False)
            study_info = build_study(args, Path(settings.MEDIA_ROOT))
            with connection.cursor() as cursor:
                cursor.execute("SELECT version()")
                pg_version = cursor.fetchone()[0].split(" on ")[0]
            postmaster = int((pg.data_dir / "postmaster.pid").read_text().split()[0])
            connections.close_all()

            port = free_port()
            print(f"starting {gunicorn_command_line(args)} …", file=sys.stderr)
            server = start_gunicorn(args, env, port, gunicorn_log)
            roots = {"gunicorn": server.pid, "postgres": postmaster, "redis": redis.pid}
            try:
                ramp_s = args.participants / args.spawn_rate
                # Warm-up (not reported; its judgments are checked too): every worker thread
                # imports and compiles its code paths, every stimulus file gets decoded.
                warmup = run_locust("warmup", "session", 4 * args.workers, 4 * args.workers,
                                    args.warmup, port, args, roots, tmp, think_ms=0)
                runs = {
                    "sessions": run_locust(
                        "sessions", "session", args.participants, args.spawn_rate,
                        ramp_s + args.duration + 2, port, args, roots, tmp),
                }
                # Only now, so that their leases never take pairs from the participants above
                # (a small study would turn them away: 403, study full). Enough for 720
                # judgments/s through the whole burst (24 per session): no user runs out.
                n_burst = prepare_submit_sessions(
                    max(args.burst_users, int(30 * args.burst_seconds)), tmp
                )
                connections.close_all()
                runs |= {
                    "submit": run_locust(
                        "submit", "submit", args.burst_users, args.burst_users,
                        args.burst_seconds + 2, port, args, roots, tmp),
                    "ping": run_locust(
                        "ping", "ping", args.burst_users, args.burst_users,
                        args.burst_seconds + 2, port, args, roots, tmp),
                }
            finally:
                stop_gunicorn(server)
            acks = warmup.pop("acks") + [a for run in runs.values() for a in run.pop("acks")]
            db = check_database(acks)
            print("measuring queries per request (in-process) …", file=sys.stderr)
            costs = request_costs()
            connections.close_all()
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    s, sub, ping = runs["sessions"], runs["submit"], runs["ping"]
    judgments = s["stats"].get("judgment", {}).get("n", 0)
    submit_rps = sub["stats"].get("judgment", {}).get("rps", 0.0)
    ping_rps = ping["stats"].get("ping (trivial view)", {}).get("rps", 0.0)
    submit_cpu = server_cpu_ms(sub, sub["stats"].get("judgment", {}).get("n", 0))
    ping_cpu = server_cpu_ms(ping, ping["stats"].get("ping (trivial view)", {}).get("n", 0))
    p99 = {name: s["stats"].get(name, {}).get("p99", float("nan"))
           for name in ("next trial (both images)", "image", "judgment")}
    per_trial_s = args.think_ms / 1000  # what the pace alone allows
    errors = sum(row["failures"] for run in runs.values() for row in run["stats"].values()
                 if row.get("n") is not None and row is not run["stats"].get("Aggregated"))
    targets = {
        "errors": errors,
        "p99_next": p99["next trial (both images)"], "p99_image": p99["image"],
        "p99_submit": p99["judgment"],
        "session_jps": judgments / s["steady_s"] if s["steady_s"] else 0.0,
        "offered_jps": args.participants / per_trial_s if per_trial_s else 0.0,
        "session_cpu_ms": server_cpu_ms(s, judgments),
        "submit_rps": submit_rps, "ping_rps": ping_rps,
        "ratio": submit_rps / ping_rps if ping_rps else 0.0,
        "submit_cpu_ms": submit_cpu, "ping_cpu_ms": ping_cpu,
        "cpu_ratio": ping_cpu / submit_cpu if submit_cpu else 0.0,
    }
    locust_version = subprocess.run([str(LOCUST), "--version"], capture_output=True,
                                    text=True).stdout.split()[1]
    result = {
        "command": command,
        "date": started_at.strftime("%Y-%m-%d %H:%M"),
        "total_s": time.monotonic() - t_start,
        "machine": machine_info(),
        "postgres_version": pg_version,
        "locust_version": locust_version,
        "load_before": load_before,
        "load_after": " / ".join(f"{x:.1f}" for x in os.getloadavg()),
        "server": gunicorn_command_line(args),
        "durable": args.durable,
        "study": study_info,
        "think_ms": args.think_ms,
        "spawn_rate": args.spawn_rate,
        "resend_every": args.resend_every,
        "burst_users": args.burst_users,
        "burst_seconds": args.burst_seconds,
        "burst_sessions_prepared": n_burst,
        "runs": runs,
        "targets": targets,
        "db": db,
        "request_costs": costs,
        "gunicorn_log_problems": gunicorn_problems(gunicorn_log)[:20],
    }
    (OUT_DIR / "results.json").write_text(json.dumps(result, indent=1, default=str))
    section = render_markdown(result)
    (OUT_DIR / "section.md").write_text(section)
    print(section)
    if not args.no_write:
        write_benchmarks(section, args.participants, args.think_ms, args.durable)
        title = section_ids(args.participants, args.think_ms, args.durable)[0]
        print(f"wrote the section '{title}' of {BENCHMARKS}", file=sys.stderr)
    return 1 if errors or db["lost"] else 0


if __name__ == "__main__":
    sys.exit(main())
