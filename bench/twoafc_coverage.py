"""Coverage of the 2AFC distance–choice slope's 95 % intervals over many simulated studies.

Each study (the design of ``tests/engine/test_protocol_observers.py``): 100 triplets with
``d_a, d_b ~ U(0, 0.4)`` drawn afresh per study (``--fixed-items``: one item set for all),
``TwoAFCPopulation(sigma=0.1, bias_sd=0.3)`` (no lapses), P participants × 50 trials, each
participant 50 distinct items (``engine.observers._assign``). Truth: the population-average
probit, ``β* = 1/(σ √(1 + bias_sd²))``, ``α* = 0``. Per study the probit is fitted once and
its participant-bootstrap replicates once (``engine.protocol_analysis._twoafc_slope_fit``);
every interval method is computed from the same replicates:

- ``percentile``: 2.5/97.5 % of the replicates (``numpy.percentile``; the method before);
- ``basic``: ``[2θ̂ − q₉₇.₅, 2θ̂ − q₂.₅]``;
- ``normal``: ``θ̂ ± 1.96 · sd(θ*)``;
- ``SE·t(P-1)``: ``θ̂ ± t_{0.975,P−1} √(P/(P−1)) sd(θ*)`` — what
  ``twoafc_choice_slope`` returns now (checked against it on the first studies).

Also measured: mean ``β̂ − β*`` (is the pooled ML unbiased for the marginal slope under the
unbalanced assignment?), the sampling SD of ``β̂`` against the bootstrap SE, and (once) that
a bootstrap replicate equals the fit on the participants it draws, duplicated explicitly.
For comparison the same methods on the replicates of the lpips 2AFC score of
``twoafc_scores`` (percentile interval, not changed; truth: the score of the
population-average choice shares of the study's items).
Coverage comes with a Wilson 95 % interval; writes the section of BENCHMARKS.md between the
``bench/twoafc_coverage.py`` markers.

    OMP_NUM_THREADS=1 .venv/bin/python bench/twoafc_coverage.py --seeds 1000 300 \
        --n-boot 200 1000 --participants 80 30
    .venv/bin/python bench/twoafc_coverage.py --seeds 5 --no-write     # smoke run
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine import protocol_analysis as pa  # noqa: E402
from engine.analysis import participant_weights, wilson_interval  # noqa: E402
from engine.observers import TwoAFCPopulation  # noqa: E402

N_ITEMS, TRIALS = 100, 50
CHECKED = 20  # studies on which twoafc_choice_slope's own interval is compared
METHODS = ("percentile", "basic", "normal", "SE·t(P-1)")


def items_of(rng, n=N_ITEMS) -> pd.DataFrame:
    """The test's ``twoafc_items``: triplets with ``a_lpips, b_lpips ~ U(0, 0.4)``."""
    return pd.DataFrame({"item": [f"t{i}" for i in range(n)], "condition_a": "linf:4",
                         "condition_b": "l2:1", "is_control": False,
                         "a_lpips": rng.uniform(0, 0.4, n), "b_lpips": rng.uniform(0, 0.4, n)})


def intervals(est: float, reps: np.ndarray, p: int) -> dict:
    q_lo, q_hi = np.percentile(reps, [2.5, 97.5])
    sd = reps.std(ddof=1)
    return {"percentile": (q_lo, q_hi), "basic": (2 * est - q_hi, 2 * est - q_lo),
            "normal": (est - 1.96 * sd, est + 1.96 * sd),
            "SE·t(P-1)": pa._bootstrap_se_interval(est, reps, p)}


def check_weights(rows: pd.DataFrame, n_boot: int, seed: int) -> float:
    """Largest |β| difference between the first 3 replicates of ``_twoafc_slope_fit`` and
    probit fits of the rows of the participants each replicate draws (a participant drawn w
    times contributes its rows w times) — a check of ``_boot_sums``'s resampling."""
    fit = pa._twoafc_slope_fit(rows, "lpips", 0.0, n_boot, seed, False)
    w = participant_weights(fit["n_participants"], 3, seed)
    parts = np.sort(rows["participant"].unique())
    x = (rows["a_lpips"] - rows["b_lpips"]).to_numpy()
    code = np.searchsorted(parts, rows["participant"].to_numpy())
    worst = 0.0
    for r in range(3):
        rep = w[r][code]  # each row weighted by its participant's draw count
        item_x, inv = np.unique(x, return_inverse=True)
        k = np.bincount(inv, weights=rep * rows["chose_b"].to_numpy(float))
        n = np.bincount(inv, weights=rep)
        keep = n > 0
        theta, _ = pa.fit_probit(item_x[keep], k[keep], n[keep])
        worst = max(worst, abs(theta[0, 1] - fit["replicates"][r, 1]))
    return worst


def run(participants: int, n_boot: int, seeds: int, fixed_items: bool) -> dict:
    pop = TwoAFCPopulation(sigma=0.1, bias_sd=0.3, distance="lpips")
    truth = {"beta": pop.probit_parameters()["beta"], "alpha": 0.0}
    fixed = items_of(np.random.default_rng(12345))
    keys = ("beta", "alpha", "score")
    miss = {(k, m): np.zeros(3, int) for k in keys for m in METHODS}  # below, in, above
    width = {(k, m): [] for k in keys for m in METHODS}
    beta, se = [], []
    weights_err = math.nan
    for seed in tqdm(range(seeds), desc=f"P={participants} B={n_boot}", unit="study"):
        rng = np.random.default_rng(seed)
        items = fixed if fixed_items else items_of(rng)
        rows = pop.simulate(items, n_participants=participants,
                            trials_per_participant=TRIALS, rng=rng)
        fit = pa._twoafc_slope_fit(rows, "lpips", 0.0, n_boot, seed, False)
        product = (pa.twoafc_choice_slope(rows, "lpips", n_boot=n_boot, seed=seed)
                   if seed < CHECKED else None)
        if seed == 0:
            weights_err = check_weights(rows, n_boot, seed)
        p = fit["n_participants"]
        for j, key in enumerate(("alpha", "beta")):
            est, reps = float(fit["theta"][j]), fit["replicates"][:, j]
            ivs = intervals(est, reps, p)
            if product is not None:
                assert np.allclose(ivs["SE·t(P-1)"],
                                   (product[f"{key}_low"], product[f"{key}_high"])), key
            for m, (lo, hi) in ivs.items():
                miss[key, m][0 if truth[key] < lo else 2 if truth[key] > hi else 1] += 1
                width[key, m].append(hi - lo)
            if key == "beta":
                beta.append(est)
                se.append(reps.std(ddof=1))
        # the BAPPS 2AFC score of lpips (twoafc_scores: percentile interval, unchanged);
        # truth: the score of the population-average choice shares of these items
        data = pa._twoafc(rows)
        boot = pa._twoafc_boot(data, n_boot, seed, ["lpips"])
        est = float(pa._twoafc_scores(data, ["lpips"], n_boot, seed, boot)["score"].iloc[0])
        p_pop = pop.mean_p_choose_b(items["a_lpips"], items["b_lpips"])
        true_score = float(np.mean(pa.bapps_item_scores(items["a_lpips"], items["b_lpips"],
                                                        p_pop)))
        for m, (lo, hi) in intervals(est, boot.scores["lpips"], p).items():
            miss["score", m][0 if true_score < lo else 2 if true_score > hi else 1] += 1
            width["score", m].append(hi - lo)
    beta, se = np.array(beta), np.array(se)
    return {"participants": participants, "n_boot": n_boot, "seeds": seeds, "truth": truth,
            "miss": miss, "width": width, "bias": beta.mean() - truth["beta"],
            "bias_se": beta.std(ddof=1) / math.sqrt(seeds), "sd": beta.std(ddof=1),
            "boot_se": math.sqrt(np.mean(se ** 2)),
            "skew": float(stats.skew(beta)), "weights_err": weights_err}


def table(results: list[dict]) -> tuple[str, str]:
    rows, notes = [], []
    for r in results:
        for key in ("beta", "alpha", "score"):
            for m in METHODS:
                below, inside, above = r["miss"][key, m]
                n = r["seeds"]
                lo, hi = wilson_interval(int(inside), n)
                tag = " (before)" if m == "percentile" and key != "score" else (
                    " (**after**)" if m == "SE·t(P-1)" and key != "score" else "")
                tag = " (unchanged)" if m == "percentile" and key == "score" else tag
                par = {"beta": "β", "alpha": "α", "score": "2AFC score"}[key]
                rows.append(f"| {r['participants']} | {r['n_boot']} | {par} "
                            f"| {m}{tag} | {inside}/{n} = {inside / n:.1%} | {lo:.1%}–{hi:.1%} "
                            f"| {below / n:.1%} / {above / n:.1%} "
                            f"| {np.median(r['width'][key, m]):.3f} |")
        p = r["participants"]
        notes.append(
            f"- P = {p}, B = {r['n_boot']}: β* = {r['truth']['beta']:.4f}, mean β̂ − β* = "
            f"{r['bias']:+.4f} ± {r['bias_se']:.4f} (SE); sampling SD of β̂ {r['sd']:.4f}, "
            f"RMS bootstrap SE {r['boot_se']:.4f} (ratio {r['boot_se'] / r['sd']:.3f}; "
            f"× √(P/(P−1)) {r['boot_se'] / r['sd'] * math.sqrt(p / (p - 1)):.3f}); skewness "
            f"of β̂ {r['skew']:.2f}; replicate vs explicit resampling |Δβ| "
            f"{r['weights_err']:.1e}.")
    return "\n".join(rows), "\n".join(notes)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1000, 300],
                    help="simulated studies per design, one per --n-boot (last one repeats)")
    ap.add_argument("--participants", type=int, nargs="+", default=[80, 30])
    ap.add_argument("--n-boot", type=int, nargs="+", default=[200, 1000],
                    help="bootstrap replicates (each with every --participants)")
    ap.add_argument("--fixed-items", action="store_true", help="one item set for all studies")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    t0 = time.perf_counter()
    seeds = [args.seeds[min(i, len(args.seeds) - 1)] for i in range(len(args.n_boot))]
    results = [run(p, b, s, args.fixed_items)
               for b, s in zip(args.n_boot, seeds, strict=True) for p in args.participants]
    elapsed = time.perf_counter() - t0
    rows, notes = table(results)
    head = ("| P | B | parameter | interval | covered | Wilson 95 % | truth below / above "
            "| median width |\n|---|---|---|---|---|---|---|---|")
    print(head + "\n" + rows + "\n" + notes + f"\n{elapsed:.0f} s")
    if args.no_write:
        return
    cmd = ("OMP_NUM_THREADS=1 .venv/bin/python bench/twoafc_coverage.py "
           f"--seeds {' '.join(map(str, seeds))} "
           f"--participants {' '.join(map(str, args.participants))} "
           f"--n-boot {' '.join(map(str, args.n_boot))}"
           + (" --fixed-items" if args.fixed_items else ""))
    section = f"""<!-- bench/twoafc_coverage.py: start -->
## 2AFC choice-slope interval coverage

Command: `{cmd}` ({elapsed / 60:.0f} min on the shared 2-core box, load average
{os.getloadavg()[0]:.1f} at the end).

Each simulated study: {N_ITEMS} triplets, d_a, d_b ~ U(0, 0.4){' (one item set)' if
args.fixed_items else ' drawn per study'}, `TwoAFCPopulation(sigma=0.1, bias_sd=0.3)`,
P participants × {TRIALS} distinct items; truth the population-average probit
(β* = 1/(σ√(1 + bias_sd²)), α* = 0). All intervals from the same B participant-bootstrap
replicates per study; `twoafc_choice_slope` returns the SE·t(P-1) interval,
β̂ ± t₀.₉₇₅,P−1 √(P/(P−1)) sd(β*) (checked on the first {CHECKED} studies of each design).
Aim: 93–97 %.

| P | B | parameter | interval | covered | Wilson 95 % | truth below / above | median width |
|---|---|---|---|---|---|---|---|
{rows}

{notes}

Reading: β̂ is unbiased for β* at P = 80 (the truth formula and the pooled fit are right;
the unbalanced item assignment per participant does not bias it) and nearly symmetric, and
the replicates resample participants correctly. The percentile interval misses because
(i) at B = 200 `numpy.percentile`'s 2.5/97.5 % points sit inside the replicates' true
quantiles (expected tails 2.97 %, not 2.5 %), (ii) the bootstrap SE is about 3 % below the
sampling SD ((P − 1)/P of the variance, and the small-sample shortfall of the cluster
sandwich it approximates), (iii) the replicates are more right-skewed than β̂, which moves
the percentile interval up (truth below it more often than above). SE·t(P-1) avoids (i)
and (iii) and offsets (ii): √(P/(P−1)) and t₀.₉₇₅,₇₉ = 1.990 widen it by 2 % at P = 80 (its SE
equals statsmodels' cluster-robust CR1 SE within 0.2 % on average, so CR1 is short here
too). At P = 30 β̂ is itself right-skewed and slightly biased up, so SE·t(P-1) misses more
often below than above there (the basic interval follows that skew but misses 5 % above at
P = 80). The lpips 2AFC score's percentile interval (`twoafc_scores`, not changed here)
under-covers at P = 80 as the slope's did (92.6 %; SE·t(P-1) would give 94.1 %).
<!-- bench/twoafc_coverage.py: end -->"""
    from bench._common import write_markdown_section

    path = ROOT / "BENCHMARKS.md"
    write_markdown_section(path, "<!-- bench/twoafc_coverage.py: start -->",
                           "<!-- bench/twoafc_coverage.py: end -->", section)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
