"""Coverage of calibrate's 95 % threshold intervals over many simulated studies.

Each study: a 7-level log ladder (1..16, threshold units arbitrary), observers from
``engine.observers`` (logistic, typical threshold 4, slope 2.5, criterion spread N(0, 0.5),
slope spread ×exp(N(0, 0.2)), γ = 5 %, λ = 2 %), 120 sessions of 27 main trials and 3
sentinels; quality control excludes a session whose sentinel false-alarm rate exceeds 0.34
(2 of 3), and ``calibrate`` gets that limit (``sentinel_limit``: γ estimated jointly, as the
``calibrate`` command does for such a study). The truth is the population-average threshold
(``ObserverPopulation.true_threshold``) at 25/50/75 %. Coverage = share of studies whose 95 %
participant-bootstrap interval contains it, with a Wilson 95 % interval; writes the section
"Calibration interval coverage" of BENCHMARKS.md.

    OMP_NUM_THREADS=1 .venv/bin/python bench/calibration_coverage.py --studies 100
    .venv/bin/python bench/calibration_coverage.py --studies 3 --no-write     # smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.analysis import wilson_interval  # noqa: E402
from engine.calibration import calibrate  # noqa: E402
from engine.observers import ObserverPopulation  # noqa: E402

TARGETS = (0.25, 0.5, 0.75)
LEVELS = np.geomspace(1, 16, 7)
SESSIONS, MAIN, SENTINELS, LIMIT = 120, 27, 3, 0.34


def study(rng, pop):
    pairs = pd.DataFrame({
        "pair": np.arange(8), "condition": [f"tm:{b:.4g}" for b in LEVELS] + [None],
        "threat_model": ["tm"] * 7 + [None], "bound": list(LEVELS) + [None],
        "is_sentinel": [False] * 7 + [True]})
    bias, careless = pop.sample_traits(SESSIONS, rng)
    slope = pop.sample_slopes(SESSIONS, rng)
    pair = np.concatenate([np.r_[rng.integers(0, 7, MAIN), np.full(SENTINELS, 7)]
                           for _ in range(SESSIONS)])
    part = np.repeat(np.arange(SESSIONS), MAIN + SENTINELS)
    values = np.r_[LEVELS, 1e-300][pair]
    p = pop.p_different(values, "tm", bias=bias[part], careless=careless[part],
                        slope_factor=slope[part])
    p = np.where(pair == 7, pop.guess_rate, p)
    diff = rng.random(len(p)) < p
    fa = np.bincount(part, weights=diff * (pair == 7), minlength=SESSIONS) / SENTINELS
    keep = fa[part] <= LIMIT
    j = pd.DataFrame({"pair": pair, "different": diff, "participant": part, "session": part})
    return pairs, j[keep], int((fa > LIMIT).sum())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--studies", type=int, default=100)
    ap.add_argument("--n-boot", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    pop = ObserverPopulation({"tm": (4.0, 2.5)}, guess_rate=0.05, lapse_rate=0.02,
                             bias_sd=0.5, slope_sd=0.2)
    truth = {t: pop.true_threshold(t, "tm") for t in TARGETS}
    rng = np.random.default_rng(args.seed)
    hits = {t: 0 for t in TARGETS}
    widths = {t: [] for t in TARGETS}
    gammas, excluded = [], []
    t0 = time.perf_counter()
    for i in tqdm(range(args.studies), desc="simulated studies", unit="study"):
        pairs, j, n_ex = study(rng, pop)
        cal = calibrate(pairs, j, targets=TARGETS, n_boot=args.n_boot, seed=i,
                        sentinel_limit=LIMIT)
        th = cal.threat_models["tm"].thresholds.set_index("target")
        for t in TARGETS:
            hits[t] += bool(th.loc[t, "low"] <= truth[t] <= th.loc[t, "high"])
            widths[t].append(np.log(th.loc[t, "high"] / th.loc[t, "low"]))
        gammas.append(cal.guess_rate)
        excluded.append(n_ex)
    elapsed = time.perf_counter() - t0
    n = args.studies
    rows = []
    for t in TARGETS:
        lo, hi = wilson_interval(hits[t], n)
        rows.append(f"| {t:.0%} | {truth[t]:.4g} | {hits[t]}/{n} = {hits[t] / n:.1%} "
                    f"| {lo:.1%}–{hi:.1%} | {np.median(widths[t]):.3f} |")
    total = sum(hits.values())
    lo, hi = wilson_interval(total, n * len(TARGETS))
    summary = (f"Coverage of the 95 % intervals: {total / (n * len(TARGETS)):.1%} "
               f"({total}/{n * len(TARGETS)}; Wilson 95 % {lo:.1%}–{hi:.1%}); aim 93–97 %.")
    print(summary)
    print("\n".join(rows))
    print(f"γ̂ mean {np.mean(gammas):.4f} (true 0.05); sessions excluded per study "
          f"{np.mean(excluded):.1f}; {elapsed:.0f} s")
    if args.no_write:
        return
    section = f"""<!-- bench/calibration_coverage.py: start -->
## Calibration interval coverage

Command: `OMP_NUM_THREADS=1 .venv/bin/python bench/calibration_coverage.py --studies {n} \
--n-boot {args.n_boot} --seed {args.seed}` ({elapsed / 60:.0f} min on the shared 2-core box,
load average {os.getloadavg()[0]:.1f} at the end).

{summary}

Each of {n} simulated studies: a 7-level log ladder, {SESSIONS} sessions of {MAIN} main trials
and {SENTINELS} sentinels; observers with criterion spread N(0, 0.5), slope spread
×exp(N(0, 0.2)), γ = 5 %, λ = 2 %; quality control drops sessions whose sentinel false-alarm
rate exceeds {LIMIT} (on average {np.mean(excluded):.1f} a study), and `calibrate` gets that
limit, so γ is estimated jointly (mean γ̂ {np.mean(gammas):.4f}; the kept sentinels alone would
give less). Truth: the population-average threshold. Intervals: participant bootstrap,
n = {args.n_boot}, percentile.

| target | true threshold | covered | Wilson 95 % | median width ln(high/low) |
|---|---|---|---|---|
{chr(10).join(rows)}
<!-- bench/calibration_coverage.py: end -->"""
    from bench._common import write_markdown_section

    path = ROOT / "BENCHMARKS.md"
    write_markdown_section(path, "<!-- bench/calibration_coverage.py: start -->",
                           "<!-- bench/calibration_coverage.py: end -->", section)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
