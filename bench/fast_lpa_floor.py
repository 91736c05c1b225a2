"""Pass-cost floors of the perceptual attacks (BENCHMARKS.md, attack speed targets: the floor).

    .venv/bin/python bench/fast_lpa_floor.py [--repeats 5] [--batch-size 8]

In the setting of ``bench/attacks.py`` (default: the PGD-AT digits AlexNet of
``bench/_trained.py`` at 64 px, LPIPS by the engine's ``alexnet:untrained``), times in CPU
seconds on one thread the building blocks an attack iteration is made of:

- ``cla F`` / ``cla F+B``: classifier forward without graph / forward with graph plus the
  backward pass to the input (every attack needs the latter once per iteration);
- ``lpi F`` / ``lpi F(graph)`` / ``lpi B``: the LPIPS features forward without graph, with
  graph, and the backward pass through it to the input (LPA and Fast-LPA need it only when an
  image is outside the ball; PPGD's CG needs one per product);
- ``tangent``: our hand-written tangent pass ``J v`` reusing the recorded forward's masks
  (:meth:`engine.distances.LPIPS.feature_tangents`), against ``jvp`` (``torch.func.jvp``, the
  former slope) and ``double-backward Jv`` (the former CG product) — with their largest
  relative difference from the float64 forward-mode result.

Then the floors: the cost of the passes each algorithm cannot avoid at ``N`` iterations, for
our side and for the authors' (their finite-difference slope is one ``lpi F``, their CG makes
``K + 1`` products of ``lpi F + lpi B`` plus one ``lpi F`` for the slope) — so the largest
ratio theirs / ours that equal work allows. Medians of ``--repeats``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from attacks import load_inputs, parse_args  # noqa: E402

from engine.attacks import parse_attack  # noqa: E402
from engine.distances import flatten_features  # noqa: E402


def cpu(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=10, help="N (PPGD, Fast-LPA)")
    parser.add_argument("--cg", type=int, default=5, help="K, CG products per PPGD step")
    parser.add_argument("--setting", choices=("trained", "untrained"), default="trained")
    own = parser.parse_args()
    args = parse_args(["--setting", own.setting, "--batch-size", str(own.batch_size),
                       "--no-write"])
    torch.set_num_threads(1)
    images, labels, classifier = load_inputs(args, torch.device("cpu"))
    lpips = parse_attack("fast_lpa:bound=0.5,lpips_model=alexnet:untrained").lpips_network(images)
    x = images.clone()
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))

    def flat(z):
        return flatten_features(lpips.features(z, check=False))

    def cla_f():
        with torch.no_grad():
            classifier(x)

    def cla_fb():
        leaf = x.clone().requires_grad_(True)
        torch.autograd.grad(classifier(leaf).sum(), leaf)

    def lpi_f():
        with torch.no_grad():
            flat(x)

    def lpi_f_graph():
        leaf = x.clone().requires_grad_(True)
        flat(leaf)

    graph = {}

    def lpi_b():
        if "phi" not in graph:
            leaf = x.clone().requires_grad_(True)
            graph["leaf"], graph["phi"] = leaf, flat(leaf)
        torch.autograd.grad(graph["phi"], graph["leaf"], v.new_ones(graph["phi"].shape),
                            retain_graph=True)

    with torch.no_grad():
        _, _, record = lpips.features_recorded(x)

    def tangent():
        lpips.feature_tangents(v, record)

    def jvp():
        torch.func.jvp(flat, (x,), (v,))

    double = {}

    def double_backward_jv():
        if "t" not in double:
            leaf = x.clone().requires_grad_(True)
            phi = flat(leaf)
            dummy = torch.zeros_like(phi, requires_grad=True)
            (t,) = torch.autograd.grad(phi, leaf, dummy, create_graph=True)
            double.update(t=t, dummy=dummy)
        torch.autograd.grad(double["t"], double["dummy"], v, retain_graph=True)

    r = own.repeats
    costs = {name: cpu(fn, r) for name, fn in (
        ("cla F", cla_f), ("cla F+B", cla_fb), ("lpi F", lpi_f), ("lpi F(graph)", lpi_f_graph),
        ("lpi B", lpi_b), ("tangent", tangent), ("jvp", jvp),
        ("double-backward Jv", double_backward_jv))}
    lpips64 = copy.deepcopy(lpips).double()
    _, reference = torch.func.jvp(lambda z: flatten_features(lpips64.features(z, check=False)),
                                  (x.double(),), (v.double(),))
    ours = flatten_features(lpips.feature_tangents(v, record)).double()
    _, theirs_ad = torch.func.jvp(flat, (x,), (v,))

    def error(a):
        return float(((a.double() - reference).norm(dim=1) / reference.norm(dim=1)).max())

    print(f"setting {own.setting}, batch {own.batch_size}, 64 px; CPU s, 1 thread, median of {r}:")
    for name, value in costs.items():
        print(f"  {name:20s} {value:.4f}")
    f = costs["lpi F"]
    print(f"tangent = {costs['tangent'] / f:.2f}× lpi F (error vs float64 {error(ours):.1e});"
          f" jvp = {costs['jvp'] / f:.2f}× lpi F (error {error(theirs_ad):.1e});"
          f" double-backward Jv = {costs['double-backward Jv'] / f:.2f}× lpi F")
    n, k = own.iterations, own.cg
    c = costs
    per_call = 2 * c["cla F"] + 2 * c["lpi F"]  # clean logits + φ(natural); final logits + size
    fast_ours_in = n * (c["cla F+B"] + c["lpi F(graph)"] + c["tangent"]) + per_call
    fast_ours_out = fast_ours_in + n * c["lpi B"]
    fast_theirs = n * (c["cla F+B"] + c["lpi F(graph)"] + c["lpi B"] + c["lpi F"]) + c["lpi F"]
    ppgd_ours = n * (c["cla F+B"] + c["lpi F(graph)"] + k * (c["tangent"] + c["lpi B"])
                     + c["tangent"]) + per_call
    ppgd_theirs = n * (c["cla F+B"] + c["lpi F(graph)"] + (k + 1) * (c["lpi F"] + c["lpi B"])
                       + c["lpi F"]) + c["lpi F"]
    print(f"Fast-LPA / LPA step floors, N={n}: ours {fast_ours_in:.3f} s (all inside the ball)"
          f" – {fast_ours_out:.3f} s (all outside); theirs {fast_theirs:.3f} s →"
          f" largest ratio theirs/ours {fast_theirs / fast_ours_out:.2f}–"
          f"{fast_theirs / fast_ours_in:.2f}")
    print(f"PPGD floor (no projection), N={n}, K={k}: ours {ppgd_ours:.3f} s, theirs"
          f" {ppgd_theirs:.3f} s (their CG not stopping early) → largest ratio"
          f" {ppgd_theirs / ppgd_ours:.2f} (more only by skipping CG for zero-gradient images)")


if __name__ == "__main__":
    main()
