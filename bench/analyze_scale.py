"""How ``analyze`` and the staff dashboard scale with the number of judgments.

Builds a throwaway study — SQLite (its own ``PERCEPTLAB_VAR`` under ``bench/out/``) or, with
``--database postgres``, a throwaway PostgreSQL cluster (``tests.support.pgserver``) — bulk-inserts
simulated judgments in steps (100k, 200k, 500k, 1M by default: participants, sessions,
trials and judgments with ``bulk_create``, answers drawn from a logistic psychometric
function of the bound), and at each step times

- ``frames``: reading the study's pairs and judgments into DataFrames (``studyapp.frames``);
- ``counts``: the progress counts (``studyapp.reports.study_overview``, two aggregate queries);
- ``analyze``: ``engine.analysis.analyze`` on them (1000 participant-bootstrap resamples);
- ``command``: the whole ``manage.py analyze --json`` (frames + counts + statistics + CSV +
  JSON), the end-to-end number;

and, at the first step, the dashboard study page cold (analysis computed) and warm (cached by
study state), through Django's test client as a staff user.

    .venv/bin/python bench/analyze_scale.py --steps 1000000 --no-dashboard   # SQLite
    .venv/bin/python bench/analyze_scale.py --steps 1000000 --no-dashboard --database postgres
    .venv/bin/python bench/analyze_scale.py                 # 100k..1M, writes BENCHMARKS.md
    .venv/bin/python bench/analyze_scale.py --steps 20000,50000 --no-write   # smoke run
    .venv/bin/python bench/analyze_scale.py --steps 100000 --dashboard-only  # page time only

Never asserts on time; prints a table, keeps each database's last run in
``bench/out/analyze_scale_<database>.json`` and writes the section "analyze at scale" from every
database's last run.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SECTION = "bench/analyze_scale.py"
TRIALS_PER_SESSION = 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", default="100000,200000,500000,1000000",
                        help="cumulative judgment counts to measure at")
    parser.add_argument("--pairs-per-condition", type=int, default=500)
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--dashboard-at", type=int, default=100_000,
                        help="measure the dashboard at the first step with at least this many")
    parser.add_argument("--dashboard-only", action="store_true",
                        help="stop after the dashboard measurement; write only its section")
    parser.add_argument("--no-dashboard", action="store_true", help="skip the dashboard")
    parser.add_argument("--database", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--section-only", action="store_true",
                        help="measure nothing: write the section from the runs kept in bench/out")
    args = parser.parse_args()
    if args.section_only:
        text = "\n".join(scale_section(ROOT / "bench" / "out", 8, args.pairs_per_condition,
                                        args.n_boot))
        print(text)
        if not args.no_write:
            write_section(SECTION, text)
        return
    if args.database == "postgres":
        from tests.support.pgserver import temporary_postgres

        with temporary_postgres() as pg:
            run(args, pg.url)
    else:
        run(args, None)


def run(args, pg_url) -> None:
    steps = [int(s) for s in args.steps.split(",")]

    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    var = Path(tempfile.mkdtemp(prefix="analyze-scale-", dir=out))
    os.environ.update(PERCEPTLAB_VAR=str(var), DJANGO_SETTINGS_MODULE="studyapp.settings",
                      DATABASE_URL=pg_url or f"sqlite:///{var / 'db.sqlite3'}", DJANGO_DEBUG="0",
                      DJANGO_SECRET_KEY="bench-only", DJANGO_ALLOWED_HOSTS="testserver")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import django

    django.setup()
    import numpy as np
    from django.core.management import call_command
    from django.db import connection
    from tqdm import tqdm

    from engine.analysis import analyze
    from studyapp.frames import judgments_frame, pairs_frame
    from studyapp.models import Condition, Judgment, Pair, Participant, Session, Study, Trial
    from studyapp.reports import study_overview

    call_command("migrate", verbosity=0)
    if pg_url is None:
        with connection.cursor() as c:  # bulk loading: durability is not the point here
            c.execute("PRAGMA journal_mode=WAL")
            c.execute("PRAGMA synchronous=OFF")
    study = Study.objects.create(slug="scale", title="scale", trials_per_session=TRIALS_PER_SESSION,
                                 judgments_per_pair=10**6)
    rng = np.random.default_rng(0)
    specs = [("linf", b) for b in (1 / 255, 2 / 255, 4 / 255, 8 / 255)] + [
        ("l2", b) for b in (0.25, 0.5, 1.0, 2.0)]
    pair_rows = []
    for tm, bound in specs:
        cond = Condition.objects.create(study=study, threat_model=tm, bound=bound,
                                        spec=f"{tm}:bound={bound}")
        pair_rows += [Pair(study=study, condition=cond, key=f"{tm}{bound}-{i}", source_image="x",
                           natural_path="n.png", other_path="o.png", width=64, height=64,
                           attack_success=bool(rng.random() < 0.8),
                           distances={"l2": bound * (1 + 0.1 * rng.standard_normal()),
                                      "lpips_alexnet": bound * rng.uniform(0.5, 1.5)})
                      for i in range(args.pairs_per_condition)]
    pair_rows += [Pair(study=study, is_sentinel=True, key=f"s{i}", source_image="x",
                       natural_path="n.png", other_path="n.png", width=64, height=64)
                  for i in range(100)]
    Pair.objects.bulk_create(pair_rows, batch_size=2000)
    pairs = list(Pair.objects.filter(study=study).values_list(
        "pk", "is_sentinel", "condition__threat_model", "condition__bound"))
    pair_ids = np.array([p[0] for p in pairs])
    # P(different): logistic in log bound, 50% at 4/255 (linf) or 1.0 (l2); sentinels 5%
    mid = {"linf": 4 / 255, "l2": 1.0}
    p_diff = np.array([0.05 if s else 0.05 + 0.93 / (1 + np.exp(-3 * np.log(b / mid[tm])))
                       for _, s, tm, b in pairs])

    index = {int(pk): i for i, pk in enumerate(pair_ids)}

    def insert(n_judgments: int, offset: int) -> None:
        n_sessions = n_judgments // TRIALS_PER_SESSION
        batch = 500
        for start in tqdm(range(0, n_sessions, batch), desc=f"insert {n_judgments:,}",
                          unit="×500 sessions"):
            k = min(batch, n_sessions - start)
            people = Participant.objects.bulk_create([
                Participant(study=study, external_id=f"b{offset + start + i}", is_simulated=True)
                for i in range(k)])
            sessions = Session.objects.bulk_create([Session(participant=p) for p in people])
            trials = []
            for s in sessions:
                chosen = rng.choice(len(pair_ids), TRIALS_PER_SESSION, replace=False)
                trials += [Trial(session=s, position=j, pair_id=int(pair_ids[c]),
                                 natural_first=True) for j, c in enumerate(chosen)]
            trials = Trial.objects.bulk_create(trials, batch_size=5000)
            said = rng.random(len(trials)) < p_diff[[index[t.pair_id] for t in trials]]
            rts = rng.lognormal(6.4, 0.3, len(trials)).round(1).tolist()
            Judgment.objects.bulk_create([
                Judgment(trial=t, response="different" if d else "same", response_time_ms=rt,
                         first_ms=1000.0, blank_ms=250.0, second_ms=1000.0,
                         idempotency_key=str(t.pk))
                for t, d, rt in zip(trials, said, rts, strict=True)], batch_size=5000)

    from django.contrib.auth import get_user_model
    from django.core.cache import cache
    from django.test import Client

    def measure_dashboard(user, n: int) -> dict:
        cache.clear()
        client = Client()
        client.force_login(user)
        times = []
        for _ in range(3):
            t = time.perf_counter()
            r = client.get("/dashboard/scale/")
            times.append(time.perf_counter() - t)
            assert r.status_code == 200, r.status_code
        t = time.perf_counter()
        client.get("/dashboard/")
        listing = time.perf_counter() - t
        t = time.perf_counter()
        client.get("/dashboard/scale/figures/fig4a.png")
        fig_warm = time.perf_counter() - t
        out = {"n": n, "cold": times[0], "warm": min(times[1:]), "list": listing,
               "fig_warm": fig_warm}
        print(f"dashboard at {n:,}: page cold {times[0]:.2f} s (analysis + every figure),"
              f" warm {out['warm']:.3f} s; study list {listing:.3f} s; a cached figure"
              f" {fig_warm:.3f} s", flush=True)
        return out

    staff = get_user_model().objects.create_user("bench", password="x", is_staff=True)
    results, page = [], {}
    have = 0
    for step in steps:
        insert(step - have, have)
        have = step
        n = Judgment.objects.count()
        if pg_url is not None:
            with connection.cursor() as c:
                c.execute("VACUUM ANALYZE")
        load0 = os.getloadavg()[0]
        c0 = time.process_time()
        t0 = time.perf_counter()
        p = pairs_frame(study)
        j = judgments_frame(study)
        t1 = time.perf_counter()
        study_overview(study)
        tc = time.perf_counter() - t1
        t1 = time.perf_counter()
        analyze(p, j, n_boot=args.n_boot, seed=0, include_simulated=True)
        t2 = time.perf_counter()
        c2 = time.process_time()
        with open(os.devnull, "w") as sink:
            call_command("analyze", "--study", "scale", "--json", str(var / "a.json"),
                         "--include-simulated", "--n-boot", str(args.n_boot),
                         "--csv", str(var / "a.csv"), stdout=sink)
        t3 = time.perf_counter()
        c3 = time.process_time()
        results.append((n, t1 - t0 - tc, tc, t2 - t1, t3 - t2, load0, os.getloadavg()[0],
                        c3 - c2, c2 - c0))
        print(f"{n:>9,} judgments: frames {t1 - t0 - tc:6.2f} s, counts {tc:6.2f} s, analyze"
              f" {t2 - t1:6.2f} s, command {t3 - t2:6.2f} s", flush=True)
        if not page and not args.no_dashboard and args.dashboard_at <= n:
            page = measure_dashboard(staff, n)
            if args.dashboard_only:
                break

    dash = [
        f"<!-- {SECTION} dashboard: start -->",
        "### Staff dashboard at scale", "",
        f"Command: `.venv/bin/python bench/analyze_scale.py --steps {args.steps}"
        f"{' --dashboard-only' if args.dashboard_only else ''}` ({datetime.now():%Y-%m-%d %H:%M})",
        "",
        f"Study page `/dashboard/scale/` at {page['n']:,} judgments (Django test client, staff,"
        f" SQLite): **{page['warm']:.3f} s warm** (analysis, progress counts and figures cached"
        f" by study state), {page['cold']:.2f} s cold (once per study state: frames, analysis"
        f" with {args.n_boot} resamples, progress counts, and all 5 figures × PNG/SVG/CSV"
        f" rendered); study list {page['list']:.3f} s; a cached figure {page['fig_warm']:.3f} s.",
        f"<!-- {SECTION} dashboard: end -->",
    ] if page else []
    sections = [("dashboard", dash)]
    if not args.dashboard_only:
        import json

        engine_name = "PostgreSQL" if pg_url else "SQLite"
        if pg_url:
            with connection.cursor() as c:
                c.execute("SHOW server_version")
                engine_name += " " + c.fetchone()[0].split()[0]
        record = {"database": args.database, "engine": engine_name, "results": results,
                  "command": f".venv/bin/python bench/analyze_scale.py --steps {args.steps}"
                             f"{' --no-dashboard' if args.no_dashboard else ''}"
                             f" --database {args.database}",
                  "when": f"{datetime.now():%Y-%m-%d %H:%M}", "n_boot": args.n_boot,
                  "pairs_per_condition": args.pairs_per_condition}
        (out / f"analyze_scale_{args.database}.json").write_text(json.dumps(record))
        lines = scale_section(out, len(specs), args.pairs_per_condition, args.n_boot)
        sections.insert(0, ("", lines))
    for marker, lines in sections:
        if not lines:
            continue
        text = "\n".join(lines)
        print(text)
        if not args.no_write:
            write_section(f"{SECTION}{' ' + marker if marker else ''}", text)


def scale_section(out: Path, n_specs: int, pairs_per_condition: int, n_boot: int) -> list[str]:
    """The section "analyze at scale" from every database's last run (bench/out/*.json)."""
    import json

    specs = range(n_specs)
    args = argparse.Namespace(pairs_per_condition=pairs_per_condition, n_boot=n_boot)
    runs = [json.loads((out / f"analyze_scale_{db}.json").read_text())
            for db in ("sqlite", "postgres") if (out / f"analyze_scale_{db}.json").exists()]
    lines = [
        f"<!-- {SECTION}: start -->",
        "## analyze at scale", "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical"
        f" CPUs shared with 7 other engineers' work (the load average is in the table),"
        f" Python {platform.python_version()}. Study: {len(specs)} conditions ×"
        f" {args.pairs_per_condition} pairs + 100 sentinels, {TRIALS_PER_SESSION} judgments"
        f" per session (one participant each, so 1M judgments = 50,000 participants);"
        f" {args.n_boot} participant-bootstrap resamples. *frames*: pairs and judgments read"
        " into DataFrames; *counts*: `studyapp.reports.study_overview` (the progress counts,"
        " two aggregate queries); *analyze*: `engine.analysis.analyze` (bootstrap weights"
        " drawn once, shared by every table); *whole command*: `manage.py analyze --json`"
        " end to end (frames + counts + statistics + CSV + JSON). Target: ≤ 15 s at 1M."
        " Wall seconds, and in brackets the CPU seconds of this Python process"
        " (`time.process_time`; the PostgreSQL server's own work is not in it): on a"
        " machine this loaded the wall time is mostly waiting for a core.", "",
        "| database | command (run at) | judgments | frames s | counts s | analyze s |"
        " whole `analyze --json` s [CPU s] | load average before → after |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        for n, a, c, b, w, l0, l1, cpu_cmd, _cpu_parts in r["results"]:
            lines.append(f"| {r['engine']} | `{r['command']}` ({r['when']}) | {n:,} |"
                         f" {a:.2f} | {c:.2f} | {b:.2f} | **{w:.2f}** [{cpu_cmd:.2f}] |"
                         f" {l0:.1f} → {l1:.1f} |")
    lines.append(f"<!-- {SECTION}: end -->")
    return lines


def write_section(name: str, text: str) -> None:
    """Replace (or append) the section ``name`` (bench/_common.py's one section writer)."""
    from bench._common import write_markdown_section

    path = ROOT / "BENCHMARKS.md"
    write_markdown_section(path, f"<!-- {name}: start -->", f"<!-- {name}: end -->", text)
    print(f"wrote the section {name!r} to {path}")


if __name__ == "__main__":
    main()
