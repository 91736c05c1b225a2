"""Adaptive saving: QUEST+ bound placement on a ladder against table 4's fixed three bounds.

One repetition simulates the PAT study for each of the seven threat models of PAT table 4
with the same simulated observers for both designs (``engine.observers``; per threat model
the logistic fitted to its table-4 row is the typical observer, plus criterion shifts and
careless responders; one sentinel per ten main trials in both designs):

- fixed design (PAT): 1,000 judgments at each of the table's small, medium and large bounds;
- adaptive design: a log ladder from half the small to four times the large bound, each main
  trial's level chosen by ``engine.adaptive.QuestPlus`` from the pooled posterior.

Both are analysed by the same estimator, ``engine.calibration.calibrate`` (participant
bootstrap 95 % intervals of the 25 % and 50 % thresholds, width ``ln(high / low)``). N* is the
fewest adaptive judgments whose median width (over repetitions) is at most the fixed design's
for both thresholds; saving = Σ 3,000 / Σ N* over the threat models, with a bootstrap interval
over repetitions. Writes the section "Adaptive bound placement" of BENCHMARKS.md and
``bench/figures/adaptive.png``.

    .venv/bin/python bench/adaptive.py --lapse 0.02 --json-only  # sensitivity run first
    .venv/bin/python bench/adaptive.py                  # 100 repetitions, writes BENCHMARKS.md
    .venv/bin/python bench/adaptive.py --reps 2 --no-write       # smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
sys.path.insert(0, str(ROOT))

from engine.adaptive import QuestPlus, ladder  # noqa: E402
from engine.calibration import calibrate  # noqa: E402
from engine.observers import ObserverPopulation  # noqa: E402

TARGETS = (0.25, 0.5)
PER_BOUND = 1000
SENTINEL_EVERY = 10
TRIALS_PER_SESSION = 30
CHECKPOINTS = (400, 700, 1000, 1500, 2000, 3000, 4500)
#: The pooled posterior is updated and asked for a level once per BATCH main trials (a live
#: study serves many participants at once; the scheduler leases trials in batches too).
BATCH = 10
GUESS, LAPSE = 0.041, 0.02  # PAT: 4.1 % of sentinels answered "different"
#: PAT table 4 (appendix D): bound and perceptibility of the small, medium, large bounds.
TABLE4 = {
    "linf": ((2, 4, 8), (0.07, 0.11, 0.39)),
    "l2": ((600, 1200, 2400), (0.08, 0.12, 0.51)),
    "jpeg_linf": ((0.0625, 0.125, 0.25), (0.06, 0.16, 0.51)),
    "stadv": ((0.025, 0.05, 0.1), (0.08, 0.17, 0.37)),
    "recoloradv": ((0.03, 0.06, 0.12), (0.14, 0.42, 0.75)),
    "ppgd": ((0.25, 0.5, 1.0), (0.07, 0.09, 0.25)),
    "lpa": ((0.25, 0.5, 1.0), (0.14, 0.27, 0.45)),
}


def population() -> ObserverPopulation:
    """Per threat model, the logistic fitted to its table-4 row (1,000 judgments a bound,
    γ = 4.1 %, λ = 2 %) is the typical observer; people differ by a criterion shift N(0, 0.5)
    and 5 % answer at random."""
    from engine.calibration import fit_psychometric

    functions = {}
    for tm, (bounds, perc) in TABLE4.items():
        fit = fit_psychometric(bounds, np.round(np.array(perc) * PER_BOUND),
                               np.full(3, PER_BOUND), guess_rate=GUESS, lapse=LAPSE)
        functions[tm] = (math.exp(-fit.alpha / fit.beta), fit.beta)
    return ObserverPopulation(functions, guess_rate=GUESS, lapse_rate=LAPSE, bias_sd=0.5,
                              careless_share=0.05, sigmoid="logistic")


def tm_ladder(tm: str, n: int) -> np.ndarray:
    """The adaptive ladder: from half the small bound to four times the large one."""
    bounds = TABLE4[tm][0]
    return ladder(bounds[0] / 2, bounds[-1] * 4, n)


def pairs_frame(levels, tm) -> pd.DataFrame:
    n = len(levels)
    return pd.DataFrame({
        "pair": np.arange(n + 1), "condition": [f"{tm}:bound={b:g}" for b in levels] + [None],
        "threat_model": [tm] * n + [None], "bound": list(levels) + [None],
        "is_sentinel": [False] * n + [True]})


def widths(pairs, judgments, n_boot, seed, lapse, tm) -> list[float]:
    cal = calibrate(pairs, judgments, targets=TARGETS, n_boot=n_boot, seed=seed, lapse=lapse)
    th = cal.threat_models[tm].thresholds.set_index("target")
    out = []
    for t in TARGETS:
        lo, hi = th.loc[t, "low"], th.loc[t, "high"]
        out.append(math.log(hi / lo) if lo > 0 and np.isfinite(hi) else math.inf)
    return out


def participants(n_trials, pop, rng):
    n_part = -(-n_trials // TRIALS_PER_SESSION)
    bias, careless = pop.sample_traits(n_part, rng)
    part = np.repeat(np.arange(n_part), TRIALS_PER_SESSION)[:n_trials]
    return part, bias, careless


def fixed_run(pop, rng, n_boot, lapse, tm):
    levels = np.array(TABLE4[tm][0], float)
    n_main = PER_BOUND * len(levels)
    n_sent = n_main // SENTINEL_EVERY
    trial_pair = np.r_[np.repeat(np.arange(len(levels)), PER_BOUND), np.full(n_sent, len(levels))]
    rng.shuffle(trial_pair)
    part, bias, careless = participants(len(trial_pair), pop, rng)
    values = np.r_[levels, 0.0][trial_pair]
    p = pop.p_different(values, tm, bias=bias[part], careless=careless[part])
    p = np.where(trial_pair == len(levels), np.where(careless[part], 0.5, pop.guess_rate), p)
    j = pd.DataFrame({"pair": trial_pair, "different": rng.random(len(p)) < p,
                      "participant": part})
    return widths(pairs_frame(levels, tm), j, n_boot, int(rng.integers(2**31)), lapse, tm)


def adaptive_run(pop, rng, n_boot, lapse, levels, checkpoints, tm, objective="targets"):
    qp = QuestPlus(levels, thresholds_grid=ladder(levels[0] / 2, levels[-1] * 2, 30),
                   slopes_grid=np.geomspace(0.5, 8.0, 8), guess_rate=GUESS, lapse_rate=LAPSE,
                   sigmoid="logistic", targets=TARGETS)
    n_main = max(checkpoints)
    n_total = n_main + n_main // SENTINEL_EVERY
    is_sent = np.zeros(n_total, bool)
    is_sent[rng.choice(n_total, n_total - n_main, replace=False)] = True
    part, bias, careless = participants(n_total, pop, rng)
    pair = np.empty(n_total, int)
    diff = np.empty(n_total, bool)
    pairs = pairs_frame(levels, tm)
    out = {}
    sent = np.flatnonzero(is_sent)
    pair[sent] = len(levels)
    diff[sent] = rng.random(len(sent)) < np.where(careless[part[sent]], 0.5, pop.guess_rate)
    main_idx = np.flatnonzero(~is_sent)
    for start in range(0, n_main, BATCH):
        idx = main_idx[start:start + BATCH]
        level = qp.next_level(objective)
        p = pop.p_different(np.full(len(idx), levels[level]), tm, bias=bias[part[idx]],
                            careless=careless[part[idx]])
        pair[idx], diff[idx] = level, rng.random(len(idx)) < p
        qp.update_many(pair[idx], diff[idx])
        seen = start + len(idx)
        if seen in checkpoints:
            end = idx[-1] + 1
            frame = pd.DataFrame({"pair": pair[:end], "different": diff[:end],
                                  "participant": part[:end]})
            out[seen] = widths(pairs, frame, n_boot, int(rng.integers(2**31)), lapse, tm)
    share = np.bincount(pair[~is_sent], minlength=len(levels)) / n_main
    return out, share


def crossing(curve: np.ndarray, target: float, grid: np.ndarray) -> float:
    """Smallest N where the (median) width curve reaches ``target``, interpolating ln width
    linearly in ln N between checkpoints. Beyond the last checkpoint the width is extrapolated
    as ∝ N^(−1/2) (the binomial rate), i.e. ``N* = N_last · (width_last / target)²``."""
    ok = curve <= target
    if not ok.any():
        if not np.isfinite(curve[-1]):
            return math.inf
        return float(grid[-1] * (curve[-1] / target) ** 2)
    i = int(np.argmax(ok))
    if i == 0:
        return float(grid[0])
    x0, x1 = math.log(grid[i - 1]), math.log(grid[i])
    y0, y1 = math.log(curve[i - 1]), math.log(curve[i])
    f = (math.log(target) - y0) / (y1 - y0) if y1 != y0 else 1.0
    return float(math.exp(x0 + f * (x1 - x0)))


def saving(fixed_w: dict, adapt_w: dict, grid: np.ndarray, rows_f=None, rows_a=None):
    """Per threat model N* (both targets reached) and the overall saving
    ``Σ fixed judgments / Σ N*``. ``fixed_w[tm]`` (R, T), ``adapt_w[tm]`` (R, C, T)."""
    n_star = {}
    for tm in fixed_w:
        f = fixed_w[tm] if rows_f is None else fixed_w[tm][rows_f]
        a = adapt_w[tm] if rows_a is None else adapt_w[tm][rows_a]
        target = np.median(f, axis=0)
        curve = np.median(a, axis=0)
        n_star[tm] = [crossing(curve[:, t], target[t], grid) for t in range(len(TARGETS))]
    total_fixed = PER_BOUND * 3 * len(fixed_w)
    return total_fixed / sum(max(v) for v in n_star.values()), n_star


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--n-boot", type=int, default=100)
    ap.add_argument("--levels", type=int, default=9)
    ap.add_argument("--lapse", default="fit", help="'fit' (calibrate's default) or a fixed "
                    "lapse rate, used by the estimator for both designs")
    ap.add_argument("--objective", default="targets", choices=["targets", "entropy"])
    ap.add_argument("--threat-models", default=",".join(TABLE4))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--json-only", action="store_true",
                    help="write bench/out/adaptive_<objective>_<lapse>.json only (a sensitivity "
                    "run that the next full run lists in BENCHMARKS.md)")
    args = ap.parse_args()
    lapse = "fit" if args.lapse == "fit" else float(args.lapse)
    tms = args.threat_models.split(",")
    pop = population()
    grid = np.array(CHECKPOINTS)
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    fixed_w = {tm: [] for tm in tms}
    adapt_w = {tm: [] for tm in tms}
    shares = {tm: [] for tm in tms}
    for r in range(args.reps):
        for tm in tms:
            fixed_w[tm].append(fixed_run(pop, rng, args.n_boot, lapse, tm))
            out, share = adaptive_run(pop, rng, args.n_boot, lapse, tm_ladder(tm, args.levels),
                                      set(CHECKPOINTS), tm, args.objective)
            adapt_w[tm].append([out[c] for c in CHECKPOINTS])
            shares[tm].append(share)
        if (r + 1) % 5 == 0:
            print(f"  {r + 1}/{args.reps} repetitions, {time.perf_counter() - t0:.0f} s",
                  flush=True)
    fixed_w = {tm: np.array(v) for tm, v in fixed_w.items()}
    adapt_w = {tm: np.array(v) for tm, v in adapt_w.items()}
    ratio, n_star = saving(fixed_w, adapt_w, grid)
    brng = np.random.default_rng(args.seed + 1)
    boot = []
    for _ in range(1000):
        i = brng.integers(0, args.reps, args.reps)
        k = brng.integers(0, args.reps, args.reps)
        boot.append(saving(fixed_w, adapt_w, grid, i, k)[0])
    low, high = np.percentile(boot, [2.5, 97.5])
    elapsed = time.perf_counter() - t0
    print(f"N* {n_star}\nsaving {ratio:.2f} [{low:.2f}, {high:.2f}] in {elapsed:.0f} s")
    command = (f"OMP_NUM_THREADS=1 .venv/bin/python bench/adaptive.py --reps {args.reps} "
               f"--n-boot {args.n_boot} --levels {args.levels} --lapse {args.lapse} "
               f"--objective {args.objective} --seed {args.seed}")
    if args.no_write:
        print("--no-write: nothing written")
        return
    if args.threat_models != ",".join(TABLE4):
        command += f" --threat-models {args.threat_models}"
    OUT.mkdir(parents=True, exist_ok=True)
    np.savez(OUT / f"adaptive_{args.objective}_{args.lapse}.npz",
             **{f"fixed_{tm}": v for tm, v in fixed_w.items()},
             **{f"adaptive_{tm}": v for tm, v in adapt_w.items()}, grid=grid)
    (OUT / f"adaptive_{args.objective}_{args.lapse}.json").write_text(json.dumps({
        "command": command, "saving": ratio, "low": float(low), "high": float(high),
        "n_star": n_star, "elapsed_s": elapsed,
        "fixed_median": {tm: np.median(v, axis=0).tolist() for tm, v in fixed_w.items()},
        "adaptive_median": {tm: np.median(v, axis=0).tolist() for tm, v in adapt_w.items()},
    }, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    ax = axes[0]
    for i, tm in enumerate(tms):
        curve = np.median(adapt_w[tm], axis=0)
        fixed_med = np.median(fixed_w[tm], axis=0)
        ax.plot(grid, curve[:, 1], "o-", color=f"C{i}", ms=3, label=tm)
        ax.plot([3000], [fixed_med[1]], "*", color=f"C{i}", ms=12)
        ax.plot(grid, curve[:, 0], ":", color=f"C{i}")
        ax.plot([3000], [fixed_med[0]], "s", color=f"C{i}", mfc="none", ms=8)
    ax.set(xscale="log", yscale="log", xlabel="main judgments per threat model",
           ylabel="median 95% interval width, ln(high/low)",
           title=f"Adaptive saving {ratio:.1f}× [{low:.1f}, {high:.1f}]\n"
                 "lines: adaptive (solid 50%, dotted 25%); markers: fixed 3×1000")
    ax.legend(fontsize=7)
    ax = axes[1]
    names = list(tms)
    per_tm = [3 * PER_BOUND / max(n_star[tm]) for tm in names]
    ax.bar(np.arange(len(names)), per_tm, color=[f"C{i}" for i in range(len(names))])
    ax.axhline(1, color="k", lw=0.8)
    ax.axhline(2, color="k", lw=0.8, ls="--")
    ax.set_xticks(np.arange(len(names)), names, rotation=30, fontsize=8)
    ax.set(ylabel="3000 / N*", title="Saving per threat model")
    fig.tight_layout()
    if args.json_only:
        print(f"wrote {OUT}/adaptive_{args.objective}_{args.lapse}.json")
        return
    fig_path = ROOT / "bench" / "figures" / "adaptive.png"
    fig.savefig(fig_path, dpi=110)
    lines = []
    for tm in tms:
        fm = np.median(fixed_w[tm], axis=0)
        cm = np.median(adapt_w[tm], axis=0)
        truth = [pop.true_threshold(t, tm) for t in TARGETS]
        sh = np.mean(shares[tm], axis=0)
        b = TABLE4[tm][0]
        lines.append(
            f"| {tm} | {b[0]:g}, {b[1]:g}, {b[2]:g} | {truth[0]:.3g}, {truth[1]:.3g} | "
            f"{fm[0]:.3f}, {fm[1]:.3f} | {cm[-3, 0]:.3f}, {cm[-3, 1]:.3f} | "
            f"{n_star[tm][0]:.0f}, {n_star[tm][1]:.0f}"
            f"{' (extrap.)' if max(n_star[tm]) > CHECKPOINTS[-1] else ''} | "
            f"{3 * PER_BOUND / max(n_star[tm]):.2f}× "
            f"| {int(np.argmax(sh))}/{args.levels - 1} |")
    rows = "\n".join(lines)
    verdict = ("met" if low >= 2 else "met by the point estimate, not by the whole interval"
               if ratio >= 2 else f"NOT met (measured {ratio:.2f}×)")
    objective_text = ("expected posterior variance of the 25 % and 50 % thresholds"
                      if args.objective == "targets" else "QUEST+'s expected joint entropy")
    header = ("| threat model | table-4 bounds | true 25 %, 50 % thresholds "
              "| fixed widths (25 %, 50 %) | adaptive widths at 2,000 | N* (25 %, 50 %) "
              "| 3000 / N* | busiest ladder level |\n|---|---|---|---|---|---|---|---|")
    others = []
    for path in sorted(OUT.glob("adaptive_*.json")):
        other = json.loads(path.read_text())
        if other["command"] != command:
            others.append(f"- `{other['command']}`: {other['saving']:.2f}× "
                          f"[{other['low']:.2f}, {other['high']:.2f}]; N* per threat model "
                          + ", ".join(f"{tm} {max(v):.0f}" for tm, v in other["n_star"].items()))
    sensitivity = ("Other runs of this script (same observers, other settings):\n\n"
                   + "\n".join(others) + "\n\n") if others else ""
    total_adaptive = sum(max(v) for v in n_star.values())
    section = f"""<!-- bench/adaptive.py: start -->
## Adaptive bound placement

Command: `OMP_NUM_THREADS=1 .venv/bin/python bench/adaptive.py --reps {args.reps} \
--n-boot {args.n_boot} --levels {args.levels} --lapse {args.lapse} --objective {args.objective} \
--seed {args.seed}` ({elapsed / 60:.0f} min on the shared 2-core box).

Adaptive saving: {ratio:.1f}× fewer judgments

95 % interval {low:.1f}–{high:.1f}× (bootstrap over the {args.reps} repetitions, both designs
resampled). Target ≥ 2×: {verdict}.
Totals: the fixed design spends {3 * PER_BOUND * len(tms):,} main judgments on {len(tms)} threat
models; the adaptive design reaches the same median interval widths with {total_adaptive:,.0f}.

**Setting.** One repetition is one simulated PAT study: for each of the seven threat models of
PAT table 4, the same simulated observers (`engine.observers`: per threat model the logistic
in ln bound fitted to its table-4 row — 1,000 judgments a bound, γ = 4.1 %, λ = 2 % — as the
typical observer; a criterion shift N(0, 0.5) per person; 5 % careless responders; 30 trials
a session; one sentinel per ten main trials in both designs) answer

- the **fixed design** of table 4: 1,000 judgments at each of its small, medium and large
  bounds (3,000 per threat model), and
- the **adaptive design**: a {args.levels}-level log ladder from half the small bound to four
  times the large one (as uninformed as the hand-picked bounds; nobody knows the thresholds
  before the study), each main trial's level chosen by `engine.adaptive.QuestPlus` (30
  thresholds × 8 slopes, γ = 4.1 %, λ = 2 % assumed; objective `{args.objective}`:
  {objective_text}).

Both are analysed by the same estimator, `engine.calibration.calibrate` (logistic ML fit, γ
from the sentinels, λ = {args.lapse}, participant bootstrap n = {args.n_boot}); width =
ln(high/low) of the 95 % interval of the 25 % and the 50 % threshold. N* = the fewest adaptive
judgments (log-linear interpolation between checkpoints {", ".join(map(str, CHECKPOINTS))})
whose median width is at most the fixed design's median width for *both* thresholds; saving =
Σ 3,000 / Σ N*; where 4,500 adaptive judgments do not reach the fixed width, N* is
extrapolated with width ∝ N^(−1/2) from the last checkpoint (marked "extrap." below). N* = 400
means the first checkpoint already did (the saving there is a lower bound).

{header}
{rows}

{sensitivity}Figure: `bench/figures/adaptive.png`.
<!-- bench/adaptive.py: end -->"""
    from bench._common import write_markdown_section

    bench = ROOT / "BENCHMARKS.md"
    write_markdown_section(bench, "<!-- bench/adaptive.py: start -->",
                           "<!-- bench/adaptive.py: end -->", section)
    print(f"wrote {bench} and {fig_path}")


if __name__ == "__main__":
    main()
