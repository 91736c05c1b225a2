"""Bot detection rates of the worker score (:mod:`engine.bots`) over many simulated workers.

One simulated study (two threat models, six bounds around each threshold plus a sub-threshold
probe condition a grey level strong, 10 % sentinels, 5 % catch pairs, 40 main trials per
worker): ``--workers`` honest people with criterion, slope and threshold spread and
response times that rise near their threshold; as many pixel-diff bots that sleep a log-normal,
human-like time and flip 2-15 % of their answers; as many bots of the older kind (perfect
pixel answers at a constant pace). All are scored together (the population function is
fitted from everyone's judgments, then refitted without the first round's flags), as
``studyapp.quality`` does for a real study.

Also shown, for comparison, what the older rules alone make of the same workers: "response
times too regular" (robust SD < 40 ms or CV < 0.10) and a sentinel false alarm.

    .venv/bin/python bench/bots.py                    # 500 of each, writes BENCHMARKS.md
    .venv/bin/python bench/bots.py --workers 100 --no-write   # smoke run

Never asserts; prints the table and writes the section "Bot detection".
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SECTION = "bench/bots.py"


def _regular_rt(rt_ms: np.ndarray) -> bool:
    """``studyapp.quality``'s "response times too regular" rule."""
    median = float(np.median(rt_ms))
    sd = 1.4826 * float(np.median(np.abs(rt_ms - median)))
    return len(rt_ms) >= 10 and (sd < 40.0 or sd / median < 0.10)


def _markdown(frame: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.to_numpy()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=500, help="of each kind (default 500)")
    parser.add_argument("--trials", type=int, default=40, help="main trials per worker")
    parser.add_argument("--seed", type=int, default=17)
    parser.add_argument("--no-write", action="store_true", help="do not touch BENCHMARKS.md")
    args = parser.parse_args()

    from tqdm import tqdm

    from engine import bots

    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    frames = []
    for kind in tqdm(("person", "pixel_bot", "pace_bot"), desc="simulating"):
        counts = {"n_people": 0, "n_pixel_bots": 0, "n_pace_bots": 0}
        counts[{"person": "n_people", "pixel_bot": "n_pixel_bots",
                "pace_bot": "n_pace_bots"}[kind]] = args.workers
        frames.append(bots.simulate_study(**counts, rng=rng, n_trials=args.trials))
    trials = pd.concat(frames, ignore_index=True)
    t_sim = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores = bots.score_workers(trials)
    t_score = time.perf_counter() - t0

    table = pd.DataFrame([s.as_dict() for s in scores.values()])
    table["truth"] = table["worker"].str.split(":").str[0]
    by_worker = trials.groupby("worker")
    table["regular_rt"] = table["worker"].map(
        by_worker["rt_ms"].apply(lambda r: _regular_rt(r.to_numpy())))
    sentinel = trials[trials["kind"] == bots.KIND_SENTINEL]
    table["sentinel_fa"] = table["worker"].map(
        sentinel.groupby("worker")["different"].any()).fillna(False)
    rows = []
    for truth in ("person", "pixel_bot", "pace_bot"):
        t = table[table["truth"] == truth]
        rows.append({
            "workers": truth, "n": len(t), "flagged by score": f"{t['flagged'].mean():.1%}",
            "score p1 / p50 / p99 (nats)": " / ".join(
                f"{v:.1f}" for v in np.percentile(t["score"], [1, 50, 99])),
            "answers LLR p50": f"{t['llr_answers'].median():.1f}",
            "RT LLR p50": f"{t['llr_rt'].median():.1f}",
            "old rule: RT too regular": f"{t['regular_rt'].mean():.1%}",
            "any sentinel false alarm": f"{t['sentinel_fa'].mean():.1%}",
        })
    result = pd.DataFrame(rows)
    honest = table[table["truth"] == "person"]["flagged"].mean()
    bot = table[table["truth"] != "person"]["flagged"].mean()
    verdict = (f"bots flagged {bot:.1%} (target ≥ 99 %), honest people flagged {honest:.1%} "
               f"(target ≤ 1 %): {'met' if bot >= 0.99 and honest <= 0.01 else 'NOT met'}")
    print(result.to_string(index=False))
    print(verdict, f"\nsimulated in {t_sim:.0f} s, scored in {t_score:.0f} s")
    if args.no_write:
        return
    from bench._common import write_markdown_section

    command = f".venv/bin/python bench/bots.py --workers {args.workers} --trials {args.trials}"
    if args.seed != 17:
        command += f" --seed {args.seed}"
    block = "\n".join([
        f"<!-- {SECTION}: start -->",
        "## Bot detection",
        "",
        f"`{command}` (seed {args.seed}): one simulated study, {args.trials} main trials per "
        "worker, every worker scored by `engine.bots.score_workers` (the likelihood ratio of "
        "\"one of this study's people\" against \"a pixel-comparing bot\", answers plus "
        "response times; flag below 0 nats). Honest people: criterion SD 0.6 (logit), slope "
        "and threshold factors log-normal (SD 0.3, 0.2), RT log-normal and 0.4 ln-units slower "
        "at threshold. Pixel bots: log-normal RT with a human median (550-1100 ms) and σ "
        "(0.25-0.45), 2-15 % of answers flipped. Pace bots: the older bots of "
        "`tests/studyapp/test_bots.py` (perfect answers, 400 ms).",
        "",
        _markdown(result),
        "",
        f"**{verdict}.** The older rules alone, in the two right-hand columns: a pixel bot "
        "with human timing passes the regularity rule, and a sentinel false alarm tells little "
        "(people make them too; a bot's are its deliberate errors). The simulation's human "
        "model is an assumption (`engine.bots.HumanTraits`); the score itself fits the "
        "population function and the spread of people from each study's own judgments.",
        f"<!-- {SECTION}: end -->",
    ])
    write_markdown_section(ROOT / "BENCHMARKS.md", f"<!-- {SECTION}: start -->",
                           f"<!-- {SECTION}: end -->", block)


if __name__ == "__main__":
    main()
