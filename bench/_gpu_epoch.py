"""A PAT and a PGD-AT training epoch, CIFAR-10 shaped, timed (step 3 of ``bench/gpu.sh``).

Both at 10 attack iterations (PAT: self-bounded Fast-LPA, bound 0.5, every image attacked;
PGD-AT: L∞ 8/255), a ResNet-50 for 32 px inputs, batch 50 as in PAT table 12, bf16 autocast
and channels_last on CUDA. The median step (after one warm-up) of synthetic 32×32 images ×
1000 steps = one 50 000-image epoch: a step's speed does not depend on the pixels, so no
CIFAR-10 download is needed. Prints a Markdown table for the BENCHMARKS.md section.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.train import method_params, time_steps  # noqa: E402

EPOCH_IMAGES = 50_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per method")
    parser.add_argument("--iterations", type=int, default=10, help="attack iterations")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--amp", choices=("bf16", "off"), default="bf16")
    args = parser.parse_args()
    device = torch.device(args.device)
    amp = args.amp == "bf16"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    rows = {}
    for method in ("pgd_linf", "pat_self"):
        wall, cpu = time_steps(method, method_params(method, args.iterations), arch=args.arch,
                               batch=args.batch, steps=args.steps, device=device, amp=amp,
                               channels_last=device.type == "cuda")
        rows[method] = wall
        print(f"{method}: {wall:.4f} s/step", flush=True)
    steps = EPOCH_IMAGES / args.batch
    print(f"### Training epochs: {args.arch}, CIFAR-10 shape (32 px, {EPOCH_IMAGES} synthetic"
          f" images, batch {args.batch}), {args.iterations} attack iterations,"
          f" {'bf16 autocast' if amp else 'fp32'}"
          f"{', channels_last' if device.type == 'cuda' else ''}, {device}")
    print(f"| method | s/step (median of {args.steps}) | s/epoch |")
    print("|---|---|---|")
    for method, wall in rows.items():
        print(f"| {method} | {wall:.4f} | {wall * steps:.0f} |")
    print(f"**PAT ÷ PGD-AT epoch time: {rows['pat_self'] / rows['pgd_linf']:.2f}×**")


if __name__ == "__main__":
    main()
