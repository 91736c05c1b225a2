"""Pass-count floor of self-bounded Fast-LPA (BENCHMARKS.md, "Fast-LPA floor").

    .venv/bin/python bench/fast_lpa_floor.py [--logit-scale 300] [--repeats 5]

Times, in CPU seconds on one thread, the passes a self-bounded Fast-LPA call cannot avoid in
the setting of bench/attacks.py (untrained AlexNet, 16 crops of 128 px): per iteration one
classifier forward+backward (logits and LPIPS features from the same pass, the gradient of
the Lagrangian) and one forward-mode JVP of the features (the exact LPIPS slope ‖J u‖); per
call one forward (clean logits and φ(natural)) and one forward (the returned images' logits
and size). floor = iterations·(F+B + JVP) + 2·F_full. Then times the attack itself and prints
the ratio. Medians of --repeats.
"""

from __future__ import annotations

import argparse
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
from engine.attacks.perceptual import SELF, feature_jvp  # noqa: E402
from engine.distances import LPIPS, flatten_features  # noqa: E402


def cpu(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--logit-scale", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=10)
    own = parser.parse_args()
    args = parse_args(["--logit-scale", str(own.logit_scale), "--no-write"])
    torch.set_num_threads(1)
    images, labels, classifier = load_inputs(args, torch.device("cpu"))
    attack = parse_attack(f"fast_lpa:bound=0.5,num_iterations={own.iterations},"
                          f"lpips_model={SELF}")
    lpips: LPIPS = attack.lpips_network(images, classifier)
    x = images.clone()
    u = torch.randn_like(x)

    def forward_full():
        with torch.no_grad():
            lpips.logits_and_features(x, check=False)

    def forward_backward():
        leaf = x.clone().requires_grad_(True)
        logits, features = lpips.logits_and_features(leaf, check=False)
        loss = logits.sum() + flatten_features(features).sum()
        torch.autograd.grad(loss, leaf)

    def jvp():
        feature_jvp(lambda z: flatten_features(lpips.features(z, check=False)), x, u)

    def run_attack():
        attack(classifier, images, labels, generator=torch.Generator().manual_seed(0))

    f = cpu(forward_full, own.repeats)
    fb = cpu(forward_backward, own.repeats)
    j = cpu(jvp, own.repeats)
    measured = cpu(run_attack, max(2, own.repeats // 2))
    floor = own.iterations * (fb + j) + 2 * f
    print(f"F_full {f:.3f} s, F+B {fb:.3f} s, JVP(features) {j:.3f} s (CPU, 1 thread)")
    print(f"floor = {own.iterations}·(F+B + JVP) + 2·F = {floor:.3f} s; Fast-LPA (self)"
          f" measured {measured:.3f} s; ratio {measured / floor:.3f}")


if __name__ == "__main__":
    main()
