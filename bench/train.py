"""Training-speed benchmark of the defenses (issue 9).

Measures, for every method of ``engine.objectives``, the time of training steps (forward,
attack, backward, SGD update) on synthetic CIFAR-shaped data and reports images/s, plus the
per-epoch time ratio PAT (self-bounded Fast-LPA) ÷ PGD-AT at EQUAL attack iterations (the PAT
paper says Fast-LPA training is "nearly as fast" as PGD; the goal here is ≤ 1.5×). An epoch
is the same number of equal steps for every method, so the ratio of step times is the ratio
of epoch times. CPU seconds (``time.process_time``) are reported next to wall seconds: they
are steadier on a shared machine.

With ``--device cuda`` it also times a CIFAR-10-shaped ResNet-50 PAT epoch (50 000 synthetic
images, batch 50 as in PAT table 12) with bf16 autocast + channels_last, extrapolated from
``--gpu-steps`` steps.

    python bench/train.py --write            # CPU, writes the BENCHMARKS.md section
    python bench/train.py --device cuda      # + the GPU ResNet-50 PAT epoch
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.architectures import build_architecture  # noqa: E402
from engine.objectives import StepContext, available_methods, build_method  # noqa: E402

SECTION = "## Training speed of the defenses (issue 9)"
MARK_START, MARK_END = "<!-- bench/train.py: start -->", "<!-- bench/train.py: end -->"
QUICK = "linf:bound=8/255,num_iterations={n}|l2:bound=1.0,num_iterations={n}"


def method_params(name: str, iterations: int) -> dict:
    """Each method at ``iterations`` attack iterations where it has such a parameter."""
    n = iterations
    return {
        "pgd_linf": {"num_iterations": n}, "pgd_l2": {"num_iterations": n},
        "trades": {"num_iterations": n},
        "pat_self": {"num_iterations": n, "only_correct": False},
        "pat_alexnet": {"num_iterations": n, "only_correct": False,
                        "lpips_model": "alexnet_cifar:untrained"},
        "multi_random": {"attacks": QUICK.format(n=n)},
        "multi_average": {"attacks": QUICK.format(n=n)},
        "multi_max": {"attacks": QUICK.format(n=n)},
        "lagrangian": {},  # the paper's 5 iterations
    }.get(name, {})


def time_steps(method_name: str, params: dict, *, arch: str, batch: int, steps: int,
               device: torch.device, amp: bool = False, channels_last: bool = False,
               progress: float = 0.0) -> tuple[float, float]:
    """Median (wall, CPU) seconds of one training step after one warm-up step."""
    torch.manual_seed(0)
    net = build_architecture(arch).to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    method = build_method(method_name, params)

    class _Bundle:  # PAG needs class representatives from "training data"
        num_classes = 10
        train = [(torch.rand(3, 32, 32), i % 10) for i in range(100)]

    method.bind(net, _Bundle())
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    images = torch.rand(batch, 3, 32, 32, device=device)
    labels = torch.randint(0, 10, (batch,), device=device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    walls, cpus = [], []
    for step in range(steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter(), time.process_time()
        ctx = StepContext(net=net, generator=torch.Generator().manual_seed(step),
                          progress=progress, step=step)
        net.train()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss, _ = method.loss(net, images, labels, ctx)
        optimizer.zero_grad()
        loss.backward()
        method.before_optimizer_step(net)
        optimizer.step()
        method.after_step(net)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step:  # the first step warms up
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--arch", default="resnet18", help="network of the PAT/PGD ratio")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=10, help="attack iterations")
    parser.add_argument("--all-arch", default="tiny", help="network of the every-method table")
    parser.add_argument("--all-batch", type=int, default=64)
    parser.add_argument("--gpu-steps", type=int, default=20)
    parser.add_argument("--write", action="store_true", help="replace the BENCHMARKS.md section")
    args = parser.parse_args()
    device = torch.device(args.device)
    command = "python " + " ".join(["bench/train.py", *sys.argv[1:]])
    lines = [SECTION, "", f"Command: `{command}` — {time.strftime('%Y-%m-%d', time.gmtime())},"
             f" {platform.processor() or platform.machine()}, torch {torch.__version__},"
             f" {torch.get_num_threads()} threads, device {device}. Synthetic 32×32 images"
             " (speed does not depend on the data). Median of"
             f" {args.steps} steps after one warm-up. Load average at the start:"
             f" {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs — on a shared machine wall"
             " times are inflated; CPU seconds (this process) are the comparable numbers.", ""]

    pgd = time_steps("pgd_linf", method_params("pgd_linf", args.iterations), arch=args.arch,
                     batch=args.batch, steps=args.steps, device=device)
    pat = time_steps("pat_self", method_params("pat_self", args.iterations), arch=args.arch,
                     batch=args.batch, steps=args.steps, device=device)
    lines += [f"### PAT (self-bounded Fast-LPA) ÷ PGD-AT, {args.iterations} attack iterations"
              f" each, {args.arch}, batch {args.batch}", "",
              "| method | s/step (wall) | s/step (CPU) |", "|---|---|---|",
              f"| pgd_linf | {pgd[0]:.3f} | {pgd[1]:.3f} |",
              f"| pat_self | {pat[0]:.3f} | {pat[1]:.3f} |", "",
              f"**Epoch-time ratio PAT ÷ PGD-AT: {pat[0] / pgd[0]:.2f}× wall,"
              f" {pat[1] / pgd[1]:.2f}× CPU** (goal ≤ 1.5×; Fast-LPA costs 2 forward + 1"
              " backward passes per iteration, PGD 1 + 1).", ""]
    print("\n".join(lines[-9:]), flush=True)

    rows = [f"### Every method, {args.all_arch}, batch {args.all_batch},"
            f" {args.iterations} attack iterations where the method has them", "",
            "| method | images/s (wall) | images/s (CPU) | s/step (CPU) | notes |",
            "|---|---|---|---|---|"]
    notes = {"oaat": "at 90 % of training (OA phase, alternating OI/OS steps, AWP on)",
             "lagrangian": "the paper's 5 iterations",
             "pag": "10 classes: one double-backward per class",
             "multi_average": "2 attacks (L∞, L2)", "multi_max": "2 attacks (L∞, L2)",
             "multi_random": "2 attacks (L∞, L2), one per step",
             "pat_alexnet": "LPIPS by the CIFAR AlexNet (untrained weights: speed only)"}
    for name in available_methods():
        wall, cpu = time_steps(name, method_params(name, args.iterations), arch=args.all_arch,
                               batch=args.all_batch, steps=args.steps, device=device,
                               progress=0.9 if name == "oaat" else 0.0)
        rows.append(f"| {name} | {args.all_batch / wall:.0f} | {args.all_batch / cpu:.0f} |"
                    f" {cpu:.3f} |"
                    f" {notes.get(name, '')} |")
        print(rows[-1], flush=True)
    lines += rows + [""]

    if device.type == "cuda":
        wall, _ = time_steps("pat_self", method_params("pat_self", 10), arch="resnet50",
                             batch=50, steps=args.gpu_steps, device=device, amp=True,
                             channels_last=True)
        epoch = wall * 50_000 / 50
        lines += ["### GPU: CIFAR-10-shaped ResNet-50 PAT epoch (bf16 + channels_last)", "",
                  f"{torch.cuda.get_device_name(device)}: {wall:.3f} s/step × 1000 steps ="
                  f" **{epoch:.0f} s per epoch** (goal < 60 s; PAT paper: ≈ 7 min on an"
                  " RTX 2080 Ti).", ""]
        print(lines[-2], flush=True)
    else:
        lines += ["No GPU in this run: the ResNet-50 bf16 epoch and DDP scaling were not"
                  " measured (run with `--device cuda`).", ""]

    text = "\n".join(lines)
    if args.write:
        from bench._common import write_markdown_section

        write_markdown_section(ROOT / "BENCHMARKS.md", MARK_START, MARK_END,
                               f"{MARK_START}\n{text.rstrip()}\n{MARK_END}")
    print(text)


if __name__ == "__main__":
    main()
