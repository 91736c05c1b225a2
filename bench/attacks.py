"""Attack benchmark: our PPGD / LPA / Fast-LPA against plain PGD and the PAT authors' code.

One run, one model, one batch of inputs::

    .venv/bin/python bench/attacks.py            # full CPU run → BENCHMARKS.md "Attacks (CPU)"
    .venv/bin/python bench/attacks.py --quick    # smoke run: 4 images, 1 repeat, bench/out/ only
    .venv/bin/python bench/attacks.py --device cuda --autocast bf16 --size 224 \
        --model resnet50 --batch-size 64         # GPU run → BENCHMARKS.md "Attacks (GPU)"

Setting (default ``--setting trained``): a robust classifier, torchvision AlexNet trained with
PGD-AT on scikit-learn's digits at 64 px by ``bench/_trained.py`` (cached in bench/out/), on
test digits it classifies correctly, with their true labels — the attacks need their
iterations there. Early exit is OFF on our side (``early_stop=false``; the reference PPGD and
Fast-LPA have none; the reference LPA always drops an image once it succeeds), so both sides
run the same iterations; ``*_early`` cases time ours with early exit on, reported apart.
``--setting untrained``: the former setting (untrained torchvision network seeded, crops of
scikit-image photographs, labels = its own predictions), where every image falls at once.
LPIPS is bounded by an untrained AlexNet (the engine's ``alexnet:untrained``), bound 0.5.

Our attacks run here; the reference attacks (``perceptual-advex`` 0.2.6) run in a subprocess
of the reference environment ``bench/.venv`` (``bench/README.md``) on the same images,
labels, classifier weights and LPIPS weights, at the same thread count. Every output, ours
or theirs, is judged here by the same classifier and the same LPIPS network. Times are the
median of ``--repeats`` calls after a warm-up call; results are ratios within this run —
nothing here passes or fails on time.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import hashlib
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchvision
from tqdm import tqdm

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(ROOT))

from _common import (  # noqa: E402
    FEASIBLE_SLACK,
    REPLY_PREFIX,
    PassCounter,
    first_conv,
    median,
    profile_table,
    timed,
    write_markdown_section,
)

from engine.attacks import parse_attack  # noqa: E402
from engine.attacks.base import margin_loss  # noqa: E402
from engine.data import load_sources  # noqa: E402
from engine.distances import flatten_features  # noqa: E402
from engine.models import load_classifier  # noqa: E402

REFERENCE_PYTHON = BENCH / ".venv" / "bin" / "python"
RESULTS_FILE = ROOT / "BENCHMARKS.md"
OUT = BENCH / "out"
FIGURES = BENCH / "figures"
#: Seed of the untrained classifier's weights (the LPIPS AlexNet is the engine's
#: ``alexnet:untrained``, seed 0, so the two networks differ).
CLASSIFIER_SEED = 1
PHOTOGRAPHS = 6  # scikit-image photographs behind engine.data.load_sources('skimage')
TARGET_VS_PGD = 1.5
TARGET_VS_REFERENCE = 1.2  # issue 14: ≥ 1.2× the authors' code in CPU time, equal iterations


# ------------------------------------------------------------------------------ cases


@dataclass
class Case:
    """One attack configuration, run by us and (if ``reference``) by the reference code."""

    key: str
    label: str
    spec: str
    iterations: int  # gradient iterations per call (the unit of "equal iterations")
    reference: dict | None = None  # the reference class's constructor arguments
    lpips_self: bool = False
    external_lpips: bool = True
    note: str = ""


def build_cases(args: argparse.Namespace) -> list[Case]:
    b = args.bound
    lpips = "lpips_model=alexnet:untrained"
    early = "" if args.early_stop else ",early_stop=false"
    cases = [
        Case("pgd", "PGD-L∞", f"linf:bound=4/255,num_iterations={args.iterations}",
             args.iterations, external_lpips=False,
             note="L∞ bound 4/255 (medium); the time baseline"),
        Case("fast_lpa", "Fast-LPA",
             f"fast_lpa:bound={b},num_iterations={args.iterations},{lpips}", args.iterations,
             reference=dict(bound=b, num_iterations=args.iterations),
             note="their defaults otherwise: lam=10, h=0.1 (ours: exact slope), kappa=inf,"
                  " projection='none'"),
    ]
    if args.model == "alexnet":
        cases.append(Case(
            "fast_lpa_self", "Fast-LPA (self)",
            f"fast_lpa:bound={b},num_iterations={args.iterations},lpips_model=self",
            args.iterations, reference=dict(bound=b, num_iterations=args.iterations),
            lpips_self=True, external_lpips=False,
            note="self-bounded: the classifier's own 5 ReLU outputs define LPIPS (extra row)"))
    cases += [
        Case("lpa", "LPA",
             f"lpa:bound={b},num_iterations={args.lpa_iterations},"
             f"num_lambdas={args.lpa_lambdas},{lpips}{early}",
             args.lpa_iterations * args.lpa_lambdas,
             reference=dict(bound=b, num_iterations=args.lpa_iterations,
                            binary_steps=args.lpa_lambdas),
             note="their defaults: 20 iterations × 5 λ rounds, h=0.1 (ours: exact slope),"
                  " kappa=1, Newton projection; theirs always drops an image once it is"
                  " misclassified inside the bound (no switch), ours "
                  + ("too" if args.early_stop else "does not (early_stop=false)")),
        Case("ppgd", "PPGD",
             f"ppgd:bound={b},num_iterations={args.ppgd_iterations},cg_iterations=5,"
             f"{lpips}{early}",
             args.ppgd_iterations,
             reference=dict(bound=b, num_iterations=args.ppgd_iterations, cg_iterations=5),
             note="5 CG steps, h=1e-3 (ours: exact products), kappa=1, step 2·bound/iterations,"
                  " Newton projection; neither side stops early"
                  + ("" if not args.early_stop else " (ours: early_stop=true)")),
    ]
    if not args.early_stop and not args.no_early_line:
        cases += [
            Case("lpa_early", "LPA (early exit)",
                 f"lpa:bound={b},num_iterations={args.lpa_iterations},"
                 f"num_lambdas={args.lpa_lambdas},{lpips}",
                 args.lpa_iterations * args.lpa_lambdas,
                 note="ours with early_stop=true (the default): the early-exit line"),
            Case("ppgd_early", "PPGD (early exit)",
                 f"ppgd:bound={b},num_iterations={args.ppgd_iterations},cg_iterations=5,"
                 f"{lpips}", args.ppgd_iterations,
                 note="ours with early_stop=true (the default): the early-exit line"),
        ]
    wanted = args.attacks.split(",") if args.attacks else None
    if wanted:
        unknown = set(wanted) - {c.key for c in cases}
        if unknown:
            raise SystemExit(f"unknown --attacks {sorted(unknown)}; have {[c.key for c in cases]}")
        cases = [c for c in cases if c.key in wanted or c.key == "pgd"]
    return cases


# ------------------------------------------------------------------------------ results


@dataclass
class Run:
    """Timings and judged outputs of one implementation of one case."""

    case: Case
    impl: str  # "ours", "theirs" (frozen weights) or "theirs (as shipped)"
    times: list[float]  # wall seconds of the timed calls
    cpu_times: list[float]  # CPU seconds of the same calls (all threads of the process)
    warmup: float
    success: float = math.nan
    margin: float = math.nan
    lpips: list[float] = field(default_factory=list)
    counts: dict = field(default_factory=dict)
    profile: str | None = None
    lpips_agreement: float | None = None  # max |their LPIPS − ours| on their outputs
    reference_versions: dict | None = None  # reference runs: versions in bench/.venv
    baseline: Run | None = None  # PGD timed in the same interleaved rounds as this run
    their_lpips: list | None = None  # reference runs: their LPIPSDistance of each output
    success_each: list[bool] = field(default_factory=list)  # per output, pooled

    def success_within(self, bound: float) -> float:
        """Share of outputs misclassified AND within the bound (what counts for Fast-LPA,
        which neither side projects)."""
        pairs = list(zip(self.success_each, self.lpips, strict=True))
        return (sum(s and d <= bound * (1 + FEASIBLE_SLACK) for s, d in pairs) / len(pairs)
                if pairs else math.nan)

    @property
    def time(self) -> float:
        """Median wall seconds per call."""
        return median(self.times)

    @property
    def cpu(self) -> float:
        """Median CPU seconds per call."""
        return median(self.cpu_times)

    @property
    def lpips_mean(self) -> float:
        return sum(self.lpips) / len(self.lpips) if self.lpips else math.nan

    @property
    def lpips_max(self) -> float:
        return max(self.lpips) if self.lpips else math.nan

    def versus_pgd(self, pgd: Run) -> tuple[float, float]:
        """(wall, CPU) median time / PGD's, against the PGD calls interleaved with this case
        (``pgd``, PGD's own case, only when there were none)."""
        base = self.baseline or pgd
        return self.time / base.time, self.cpu / base.cpu

    def within(self, bound: float) -> float:
        if not self.lpips:
            return math.nan
        inside = [d <= bound * (1 + FEASIBLE_SLACK) for d in self.lpips]
        return sum(inside) / len(inside)


# ------------------------------------------------------------------------------ setup


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def autocast_context(args: argparse.Namespace):
    if args.autocast == "none":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.autocast]
    return torch.autocast(torch.device(args.device).type, dtype=dtype)


def load_inputs(args: argparse.Namespace, device: torch.device):
    if args.setting == "trained":
        from _trained import digits_test_batch, load_trained

        classifier, info = load_trained()
        args.trained_info = info
        images, labels = digits_test_batch(args.batch_size, classifier)
        return images.to(device), labels.to(device), classifier.to(device)
    crops = max(1, math.ceil(args.batch_size / PHOTOGRAPHS))
    sources = load_sources("skimage", size=args.size, crops_per_image=crops, seed=args.seed)
    if len(sources) < args.batch_size:
        raise SystemExit(f"only {len(sources)} crops for --batch-size {args.batch_size}")
    images = torch.stack([s.tensor() for s in sources[: args.batch_size]]).to(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(CLASSIFIER_SEED)
        classifier = load_classifier(f"{args.model}:untrained").to(device)
    if args.logit_scale != 1:
        scale_logits(classifier, args.logit_scale)
    with torch.no_grad():
        labels = classifier(images).argmax(dim=1)
    return images, labels, classifier


@torch.no_grad()
def scale_logits(classifier: torch.nn.Module, factor: float) -> None:
    """Multiply the last linear layer's weight and bias by ``factor``: logits × factor.

    Predictions (and so labels and success) do not change, but every loss, gradient and
    margin scales with it. An untrained network's logits are ~100× smaller than a trained
    one's, which trips absolute thresholds tuned for trained networks (PAT's margin clamp
    kappa=1, the reference PPGD's CG stop at residual² < 0.1 and its 1e-4 gradient cut-off).
    """
    last = [m for m in classifier.modules() if isinstance(m, torch.nn.Linear)][-1]
    last.weight.mul_(factor)
    if last.bias is not None:
        last.bias.mul_(factor)


# ------------------------------------------------------------------------------ running


class OursRunner:
    """Our attack for one case, called in this process."""

    impl = "ours"

    def __init__(self, case: Case, classifier, images, labels, args):
        self.case, self.args = case, args
        self.classifier, self.images, self.labels = classifier, images, labels
        self.attack = parse_attack(case.spec)
        self.layers = {"classifier": first_conv(classifier)}
        if case.external_lpips:  # built on first use; build it now (outside the timings)
            self.layers["lpips"] = first_conv(self.attack.lpips_network(images).network)
        self.counter = PassCounter(batch=images.shape[0])
        self.walls, self.cpus, self.outputs = [], [], []
        self.warmup = math.nan
        self.profile_text = None

    def _run(self, seed: int):
        generator = torch.Generator().manual_seed(seed)
        with autocast_context(self.args):
            return self.attack(self.classifier, self.images, self.labels,
                               generator=generator).adversarial

    def call(self, seed: int, *, keep: bool, count: bool = False) -> None:
        watch = self.counter.watch(self.layers) if count else contextlib.nullcontext()
        with watch:
            wall, cpu, adversarial = timed(lambda: self._run(seed), self.images.device)
        self._record(wall, cpu, keep)
        if keep:
            self.outputs.append(adversarial.float())

    def _record(self, wall: float, cpu: float, keep: bool) -> None:
        if keep:
            self.walls.append(wall)
            self.cpus.append(cpu)
        else:
            self.warmup = wall

    def profile(self, seed: int) -> None:
        self.profile_text = profile_table(lambda: self._run(seed))

    def finish(self) -> tuple[Run, list]:
        run = Run(self.case, self.impl, self.walls, self.cpus, self.warmup,
                  counts={k: c.as_dict() for k, c in self.counter.counts.items()},
                  profile=self.profile_text)
        return run, self.outputs


class ReferenceFailed(Exception):
    """The reference worker died; ``args[0]`` is its last stderr line, ``args[1]`` more."""


class ReferenceRunner(OursRunner):
    """The reference attack for one case, in a worker process of the reference environment
    (``bench/_advex.py --serve``), driven by JSON lines so calls interleave with ours."""

    def __init__(self, case: Case, weights: str, classifier, lpips_state, images, labels,
                 args, tmp: Path):
        self.case, self.args = case, args
        self.impl = "theirs" if weights == "frozen" else "theirs (as shipped)"
        self.walls, self.cpus = [], []
        self.warmup = math.nan
        self.tmp = tmp
        job = {
            "attack": case.key.removesuffix("_self"),
            "params": case.reference,
            "lpips_self": case.lpips_self,
            "arch": args.model,
            "classifier_state": {k: v.cpu() for k, v in classifier.network.state_dict().items()},
            # trained setting: the very module (torch/torchvision classes only; its head is
            # sized for 64 px), so the reference side needs no architecture of ours
            "classifier_module": (copy.deepcopy(classifier.network).cpu()
                                  if args.setting == "trained" else None),
            "lpips_state": lpips_state,
            "images": images.cpu(),
            "labels": labels.cpu(),
            "threads": args.threads,
            "device": args.device,
            "autocast": args.autocast,
            "weights": weights,
        }
        job_path = tmp / f"{case.key}-{weights}-job.pt"
        torch.save(job, job_path)
        self.log_path = tmp / f"{case.key}-{weights}-stderr.txt"
        self._log = self.log_path.open("w")
        self.process = subprocess.Popen(
            [str(args.reference_python), str(BENCH / "_advex.py"), "--serve", str(job_path)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True,
            bufsize=1, cwd=ROOT,
        )
        self.versions = self._read()["versions"]

    def _read(self) -> dict:
        for line in self.process.stdout:
            if line.startswith(REPLY_PREFIX):
                return json.loads(line[len(REPLY_PREFIX):])
        self.process.wait()
        self._log.close()
        lines = [line for line in self.log_path.read_text().splitlines() if line.strip()]
        raise ReferenceFailed(lines[-1] if lines else f"exit {self.process.returncode}",
                              "\n".join(lines[-30:]))

    def _request(self, **request) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return self._read()

    def call(self, seed: int, *, keep: bool, count: bool = False) -> None:
        answer = self._request(op="call", seed=seed, keep=keep, count=count)
        self._record(answer["wall"], answer["cpu"], keep)

    def profile(self, seed: int) -> None:
        self._request(op="profile", seed=seed)

    def finish(self) -> tuple[Run, list]:
        result_path = self.tmp / f"{self.case.key}-{self.impl.split()[0]}-result.pt"
        self._request(op="finish", result=str(result_path))
        self.process.wait()
        self._log.close()
        result = torch.load(result_path, weights_only=False)
        run = Run(self.case, self.impl, self.walls, self.cpus, self.warmup,
                  counts=result["counts"], profile=result["profile"],
                  reference_versions=self.versions, their_lpips=result["their_lpips"])
        return run, result["adversarial"]

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._log.close()


def run_case(case: Case, runners: list, args, bar, failures: list[str]
             ) -> list[tuple[Run, list]]:
    """Warm up every runner (counting passes), then the timed repeats, interleaved: repeat
    ``r`` calls the runners in an order rotated by ``r``, so that a change of load on the
    machine hits ours and theirs alike. A reference worker that dies is dropped and its error
    recorded in ``failures`` (their code is not autocast-safe, for instance)."""
    alive = list(runners)

    def attempt(runner, action) -> None:
        try:
            action()
        except ReferenceFailed as exc:
            alive.remove(runner)
            failures.append(f"{case.label}, {runner.impl}: {exc.args[0]}")
            tqdm.write(f"reference run failed ({case.label}, {runner.impl}):\n{exc.args[1]}")

    for runner in list(alive):
        bar.set_postfix_str(f"{runner.case.label} {runner.impl} warm-up")
        attempt(runner, lambda r=runner: r.call(args.seed - 1, keep=False, count=True))
        bar.update(1 + (0 if runner in alive else args.repeats))
    for repeat in range(args.repeats):
        shift = repeat % len(alive)
        for runner in alive[shift:] + alive[:shift]:
            bar.set_postfix_str(f"{runner.case.label} {runner.impl} {repeat + 1}/{args.repeats}")
            attempt(runner, lambda r=runner, k=repeat: r.call(args.seed + k, keep=True))
            bar.update(1 if runner in alive else args.repeats - repeat)
    if args.profile:
        for runner in [r for r in alive if r.case is case]:  # not the PGD companion
            bar.set_postfix_str(f"{runner.case.label} {runner.impl} profile")
            attempt(runner, lambda r=runner: r.profile(args.seed))
    results = []
    for runner in list(alive):
        try:
            results.append(runner.finish())
        except ReferenceFailed as exc:
            failures.append(f"{case.label}, {runner.impl}: {exc.args[0]}")
    return results


@torch.no_grad()
def judge(run: Run, outputs: list, classifier, images, labels, lpips_fn) -> None:
    """Success, margin and LPIPS of every timed repeat's output, by OUR classifier and LPIPS."""
    success, margins, distances = [], [], []
    for adversarial in outputs:
        adversarial = adversarial.to(images.device, images.dtype)
        logits = classifier(adversarial)
        success.append((logits.argmax(dim=1) != labels).float())
        margins.append(margin_loss(logits, labels))
        distances.append(lpips_fn(images, adversarial))
    run.success_each = [bool(v) for v in torch.cat(success)]
    run.success = float(torch.cat(success).mean())
    run.margin = float(torch.cat(margins).mean())
    run.lpips = [float(d) for d in torch.cat(distances)]
    if run.their_lpips is not None:
        ours = torch.cat(distances).cpu()
        run.lpips_agreement = float((torch.cat(run.their_lpips) - ours).abs().max())


def component_costs(classifier, lpips, images, repeats: int = 5) -> dict[str, float]:
    """Median CPU seconds of one full-batch pass of each building block (``--profile``):
    ``cla F`` / ``lpi F`` forward without graph, ``cla F+B`` / ``lpi F+B`` forward with graph
    plus the backward pass to the input only (what an attack iteration needs)."""

    def cla_forward():
        with torch.no_grad():
            classifier(images)

    def cla_backward():
        x = images.detach().requires_grad_(True)
        torch.autograd.grad(classifier(x).sum(), x)

    def lpi_forward():
        with torch.no_grad():
            flatten_features(lpips.features(images, check=False))

    def lpi_backward():
        x = images.detach().requires_grad_(True)
        torch.autograd.grad(flatten_features(lpips.features(x, check=False)).sum(), x)

    costs = {}
    for name, call in (("cla F", cla_forward), ("cla F+B", cla_backward),
                       ("lpi F", lpi_forward), ("lpi F+B", lpi_backward)):
        call()  # warm-up
        costs[name] = median([timed(call, images.device)[1] for _ in range(repeats)])
    return costs


def predicted_cpu(run: Run, costs: dict[str, float]) -> float:
    """CPU seconds the run's pass counts cost at the measured unit costs (backward passes are
    priced as F+B, the remaining forward passes as F)."""
    total = 0.0
    for name, short in (("classifier", "cla"), ("lpips", "lpi")):
        c = run.counts.get(name)
        if c:
            total += c["backward"] * costs[f"{short} F+B"]
            total += max(c["forward"] - c["backward"], 0.0) * costs[f"{short} F"]
    return total


# ------------------------------------------------------------------------------ reporting


def fmt(value: float, digits: int = 3) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{value:.{digits}g}"


def passes(run: Run) -> str:
    """``classifier F/B + LPIPS F/B`` per call, in full-batch passes."""
    parts = []
    for name in ("classifier", "lpips"):
        c = run.counts.get(name)
        if c:
            parts.append(f"{name[:3]} {c['forward']:.3g}F/{c['backward']:.3g}B")
    return ", ".join(parts) or "—"


def table(runs: list[Run], pgd: Run, bound: float, gpu: bool) -> str:
    n_images = len(pgd.lpips) // max(1, len(pgd.times))
    head = ["attack", "impl", "iters", "wall s", "min–max", "CPU s"]
    if gpu:
        head.append("images/s")
    head += ["× PGD", "theirs / ours", "success", "mean margin", "LPIPS mean", "LPIPS max",
             f"≤ {bound:g}", "passes per call"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ours = {r.case.key: r for r in runs if r.impl == "ours"}
    for run in runs:
        mine = ours.get(run.case.key)
        versus = ""
        if run.impl != "ours" and mine:
            versus = f"**{run.time / mine.time:.2f}** ({run.cpu / mine.cpu:.2f})"
        row = [run.case.label, run.impl, str(run.case.iterations), f"{run.time:.2f}",
               f"{min(run.times):.2f}–{max(run.times):.2f}", f"{run.cpu:.2f}"]
        if gpu:
            row.append(f"{n_images / run.time:.1f}")
        wall_ratio, cpu_ratio = run.versus_pgd(pgd)
        row += [f"**{wall_ratio:.2f}** ({cpu_ratio:.2f})", versus,
                f"{run.success:.0%}", f"{run.margin:.3g}",
                fmt(run.lpips_mean), fmt(run.lpips_max),
                "—" if run.case.key == "pgd" else f"{run.within(bound):.0%}",
                passes(run)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def verdicts(runs: list[Run], pgd: Run, bound: float) -> list[str]:
    """The targets of the issue, each met / NOT met, with the numbers behind it."""
    out = []
    by = {(r.case.key, r.impl): r for r in runs}
    fast = by.get(("fast_lpa", "ours"))
    if fast:
        ratio, cpu_ratio = fast.versus_pgd(pgd)

        def verdict(value: float) -> str:
            return "met" if value <= TARGET_VS_PGD else "NOT met"

        out.append(f"Fast-LPA (ours) ≤ {TARGET_VS_PGD}× PGD-{pgd.case.iterations} at equal"
                   f" iterations: {ratio:.2f}× in wall time — **{verdict(ratio)}**;"
                   f" {cpu_ratio:.2f}× in CPU time — **{verdict(cpu_ratio)}**")
    for key in ("fast_lpa", "fast_lpa_self", "lpa", "ppgd"):
        mine = by.get((key, "ours"))
        for impl in ("theirs", "theirs (as shipped)"):
            theirs = by.get((key, impl))
            if mine and theirs:
                line = _versus(mine, theirs, bound)
                if key == "lpa" and "early_stop=false" in mine.case.spec:
                    line = ("(not the target: the reference LPA always stops an image once it"
                            " succeeds, so this is not equal work) " + line)
                out.append(line)
        early = by.get((f"{key}_early", "ours"))
        if key == "lpa" and early and by.get(("lpa", "theirs")):
            # Equal work for LPA: both stop an image once it is misclassified inside the
            # bound (the reference has no switch to turn that off), same iteration cap.
            out.append("LPA target, both sides stopping an image once it succeeds: "
                       + _versus(early, by[("lpa", "theirs")], bound))
    for key in ("lpa", "ppgd"):  # the early-exit line, apart from the equal-work targets
        off, on = by.get((key, "ours")), by.get((f"{key}_early", "ours"))
        if off and on:
            theirs = by.get((key, "theirs"))
            versus = (f"; theirs / ours-with-early-exit {theirs.cpu / on.cpu:.2f}× in CPU time"
                      if theirs else "")
            out.append(
                f"Early exit (not counted for the targets): {on.case.label} takes"
                f" {on.cpu:.2f} CPU s against {off.cpu:.2f} without early exit, a"
                f" {off.cpu / on.cpu:.2f}× speed-up (success {on.success:.0%} vs"
                f" {off.success:.0%}, mean margin {on.margin:.3g} vs {off.margin:.3g}: early"
                f" exit returns the first misclassified iterate, not the strongest){versus}")
    return out


def _versus(mine: Run, theirs: Run, bound: float) -> str:
    speed, cpu_speed = theirs.time / mine.time, theirs.cpu / mine.cpu
    success_ok = mine.success >= theirs.success and mine.margin >= theirs.margin
    if mine.case.key.startswith("fast_lpa"):  # neither side projects: compare the shares
        inside_ok = mine.within(bound) >= theirs.within(bound)
        # an output outside the bound is no success: compare success within the bound
        success_ok = mine.success_within(bound) >= theirs.success_within(bound)
        inside = (f"within bound {mine.within(bound):.0%} vs {theirs.within(bound):.0%}"
                  f" (neither projects), success within the bound"
                  f" {mine.success_within(bound):.0%} vs {theirs.success_within(bound):.0%}")
    else:
        inside_ok = mine.within(bound) == 1.0
        inside = f"within bound {mine.within(bound):.0%} (theirs {theirs.within(bound):.0%})"
    quality = []
    if not success_ok:
        quality.append("lower success or margin")
    if not inside_ok:
        quality.append("LPIPS bound")

    def verdict(value: float) -> str:
        reasons = ([f"{value:.2f}× < {TARGET_VS_REFERENCE}×"] if value < TARGET_VS_REFERENCE
                   else []) + quality
        return "met" if not reasons else "NOT met (" + "; ".join(reasons) + ")"

    against = "frozen weights" if theirs.impl == "theirs" else "as shipped"
    return (f"{mine.case.label} vs theirs ({against}), ≥ {TARGET_VS_REFERENCE}× faster at equal"
            f" iterations, equal or better success and margin, LPIPS within bound: success"
            f" {mine.success:.0%} vs"
            f" {theirs.success:.0%}, mean margin {mine.margin:.3g} vs {theirs.margin:.3g},"
            f" {inside}; {speed:.2f}× faster in wall time — **{verdict(speed)}**;"
            f" {cpu_speed:.2f}× in CPU time — **{verdict(cpu_speed)}**")


FAIRNESS_TRAINED = (
    "The classifier is adversarially trained (PGD-AT, L∞), so the attacks need their"
    " iterations; the LPIPS AlexNet is untrained (no pretrained weights offline): its"
    " distances are not those of the pretrained LPIPS, but both sides bound the same network."
    " The reference PPGD's absolute thresholds (CG stops once every image's squared residual"
    " is below 0.1; it skips the whole batch when the largest gradient entry is below 1e-4)"
    " were tuned for trained networks like this one.")
FAIRNESS_UNTRAINED = (
    "The networks are UNTRAINED (no pretrained weights offline): their logits are nearly"
    " flat, so success rates are high for every attack and say little about strength; the mean"
    " margin (max other logit − label logit, positive = misclassified) is the finer signal."
    " The reference code has absolute thresholds tuned for trained networks (PPGD's CG stop at"
    " residual² < 0.1, its 1e-4 gradient cut-off) that an untrained network's tiny logits make"
    " fire early; `--logit-scale 300` gives trained-like logit magnitudes.")

FAIRNESS = """\
- Same process-level conditions on both sides: the same torch/torchvision build (the reference
  environment pins them), the same thread count, the same images, labels, classifier weights and
  LPIPS AlexNet weights (saved by this script and loaded by the reference side). Every output is
  judged here by the same classifier and LPIPS network; `LPIPS agreement` is the largest
  difference between the reference's own LPIPS of its outputs and ours (it checks that both
  sides bound the same distance).
- "theirs" runs with every network parameter frozen (`requires_grad=False`), the best case for
  the reference code: its `loss.backward()` would otherwise also compute weight gradients.
  "theirs (as shipped)" leaves the parameters as torchvision hands them out (and as the authors'
  `get_lpips_model` does), i.e. what a user of their code gets. Our attacks take gradients with
  respect to the input only in both cases.
- Our times include the `Attack.__call__` protocol (input checks, one clean and one final
  classifier forward pass to return logits and success); theirs return images only.
- Differences of algorithm kept as each side ships them: the reference LPA always stops
  attacking an image once it is misclassified inside the bound (our LPA and PPGD do so only
  with `early_stop=true`, our default, which the `(early exit)` rows use; the main rows run
  `early_stop=false`); ours checks success on the iterate it returns, where the reference
  keeps the post-step point. Our LPIPS slopes and CG products are exact (a hand-written
  tangent pass reusing the forward's ReLU masks and max-pool indices, checked against
  forward-mode and double-backward AD in the tests), the reference's are finite differences
  (h = 0.1 slopes, h = 1e-3 CG products); ours skips CG for images whose gradient is zero and
  the LPIPS backward pass while every image is inside the ball (both change no result); the
  reference Newton projection uses overshoot 0.1 (ours 0.02·bound) and ours verifies its result
  (falling back to bisection); the reference Fast-LPA schedules use t/N, ours t/(N−1). Random
  starts are both x + 0.01·N(0, 1) but from different generators.
- {setting_note}
- The machine is shared (2 cores, other sessions' tests): wall time moves with their load. Our
  calls, theirs and a PGD-10 re-timed inside every case are interleaved repeat by repeat, and
  CPU times are given beside wall times; where the two ratios disagree, the CPU-time ratio is
  the one to trust.
- Success and LPIPS are pooled over the timed repeats (different random starts)."""


def load_average() -> str:
    try:
        return "/".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def engine_fingerprint() -> str:
    """Short content hashes of the attack modules measured, read when this run started (the
    engine is being changed while benchmarks run; these say which version was measured)."""
    return ", ".join(f"{name} {digest}" for name, digest in ENGINE_HASHES.items())


def _hash_engine_files() -> dict[str, str]:
    folder = ROOT / "engine" / "attacks"
    names = ("base.py", "lp.py", "perceptual.py")
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest()[:12]
            for name in names if (folder / name).exists()}


ENGINE_HASHES = _hash_engine_files()  # at import, i.e. when the engine was loaded


def machine_info(args, reference_versions: dict | None) -> str:
    info = (f"{cpu_model()}, {os.cpu_count()} logical CPUs, torch.set_num_threads({args.threads}),"
            f" torch {torch.__version__}, torchvision {torchvision.__version__},"
            f" Python {platform.python_version()}")
    if args.device == "cuda" and torch.cuda.is_available():
        info += f", GPU {torch.cuda.get_device_name()}"
    info += (f"; load average (1/5/15 min) {args.load_before} at the start,"
             f" {load_average()} at the end")
    if reference_versions:
        info += ("; reference env: perceptual-advex " + reference_versions["perceptual-advex"]
                 + f", torch {reference_versions['torch']},"
                 f" torchvision {reference_versions['torchvision']}")
    return info


def command_line() -> str:
    python = Path(sys.executable)
    with contextlib.suppress(ValueError):
        python = python.relative_to(Path.cwd())
    return shlex.join([str(python), "bench/attacks.py", *sys.argv[1:]])


def section_markers(key: str) -> tuple[str, str]:
    """BENCHMARKS.md's markers around this script's section ``key`` (``cpu``, ``gpu`` …)."""
    return f"<!-- bench/attacks.py {key}: start -->", f"<!-- bench/attacks.py {key}: end -->"


def write_section(path: Path, key: str, text: str) -> None:
    """Replace (or append) the section between this key's markers; keep everything else
    (bench/_common.py's one section writer)."""
    start, end = section_markers(key)
    write_markdown_section(path, start, end, f"{start}\n{text.rstrip()}\n{end}")


def plot(runs: list[Run], pgd: Run, bound: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in dict.fromkeys(r.case.key for r in runs) if k != "pgd"]
    impls = ["ours", "theirs", "theirs (as shipped)"]
    colors = {"ours": "#1f77b4", "theirs": "#d62728", "theirs (as shipped)": "#f4a3a3"}
    by = {(r.case.key, r.impl): r for r in runs}
    labels = [by[(k, "ours")].case.label for k in keys]
    fig, (ax_time, ax_lpips) = plt.subplots(1, 2, figsize=(11, 4.2))
    present = [impl for impl in impls if any((k, impl) in by for k in keys)]
    width = 0.8 / len(present)
    for i, impl in enumerate(present):
        xs, ys, cpu = [], [], []
        for j, key in enumerate(keys):
            if (key, impl) in by:
                xs.append(j + (i - (len(present) - 1) / 2) * width)
                wall_ratio, cpu_ratio = by[(key, impl)].versus_pgd(pgd)
                ys.append(wall_ratio)
                cpu.append(cpu_ratio)
        if xs:
            bars = ax_time.bar(xs, ys, width, label=impl, color=colors[impl])
            ax_time.bar_label(bars, fmt="%.1f", fontsize=7)
            ax_time.scatter(xs, cpu, marker="_", s=200, color="k", zorder=3,
                            label="CPU-time ratio" if i == 0 else None)
    ax_time.axhline(1.0, color="k", lw=1, label=f"PGD-{pgd.case.iterations} ({pgd.time:.2f} s)")
    ax_time.axhline(TARGET_VS_PGD, color="k", lw=1, ls="--", label=f"{TARGET_VS_PGD}× PGD")
    ax_time.set_yscale("log")
    ax_time.set_xticks(range(len(keys)), labels, fontsize=8)
    ax_time.set_ylabel("wall time / PGD time (log)")
    ax_time.set_title("time per call / PGD's (bars: wall, ticks: CPU; medians)")
    ax_time.legend(fontsize=7)

    positions, data, tick_labels, face = [], [], [], []
    for j, key in enumerate(keys):
        for i, impl in enumerate(impls[:2]):
            run = by.get((key, impl))
            if run and run.lpips:
                positions.append(j + (i - 0.5) * 0.35)
                data.append(run.lpips)
                face.append(colors[impl])
                tick_labels.append(f"{run.success:.0%}")
    if data:
        parts = ax_lpips.boxplot(data, positions=positions, widths=0.3, patch_artist=True,
                                 showfliers=True)
        for patch, color in zip(parts["boxes"], face, strict=True):
            patch.set_facecolor(color)
        for x, run_success in zip(positions, tick_labels, strict=True):
            ax_lpips.annotate(run_success, (x, 0), xycoords=("data", "axes fraction"),
                              xytext=(0, 3), textcoords="offset points", ha="center", fontsize=7)
    ax_lpips.axhline(bound, color="k", ls="--", lw=1, label=f"bound {bound:g}")
    ax_lpips.set_xticks(range(len(keys)), labels, fontsize=8)
    ax_lpips.set_ylabel("LPIPS(x, x_adv) per image")
    ax_lpips.set_title("output LPIPS (ours blue, theirs red; % = success)")
    ax_lpips.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=("trained", "untrained"), default="trained",
                        help="trained (default): the PGD-AT digits AlexNet of bench/_trained.py"
                             " at 64 px, true labels; untrained: seeded torchvision network on"
                             " photographs, labels = its predictions")
    parser.add_argument("--early-stop", action="store_true",
                        help="run our LPA and PPGD with early exit (default: off, equal"
                             " iterations with the reference)")
    parser.add_argument("--no-early-line", action="store_true",
                        help="skip the ours-only early-exit cases")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 4 images, 1 repeat, frozen reference only; writes"
                             " under bench/out/ only")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--autocast", choices=("none", "bf16", "fp16"), default="none",
                        help="autocast dtype around every attack call (GPU runs)")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--model", default="alexnet", help="classifier architecture (untrained)")
    parser.add_argument("--batch-size", type=int, default=None, help="images (default 16)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed calls after the warm-up (default 3)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads on both sides (default 1: on a small shared"
                             " machine, OpenMP threads stall under outside load)")
    parser.add_argument("--bound", type=float, default=0.5, help="LPIPS bound (0.5 = medium)")
    parser.add_argument("--iterations", type=int, default=10,
                        help="PGD and Fast-LPA iterations (default 10)")
    parser.add_argument("--lpa-iterations", type=int, default=20,
                        help="LPA iterations per λ round (their default 20)")
    parser.add_argument("--lpa-lambdas", type=int, default=5,
                        help="LPA λ rounds (their binary_steps, default 5)")
    parser.add_argument("--ppgd-iterations", type=int, default=10, help="PPGD iterations")
    parser.add_argument("--attacks", default=None,
                        help="comma-separated subset of pgd,fast_lpa,fast_lpa_self,lpa,ppgd,"
                             "lpa_early,ppgd_early"
                             " (PGD always runs: it is the baseline)")
    parser.add_argument("--reference", choices=("frozen", "both", "none"), default=None,
                        help="reference runs: frozen weights, also as shipped (default:"
                             " both; --quick: frozen), or none")
    parser.add_argument("--reference-python", type=Path, default=REFERENCE_PYTHON,
                        help="Python of the reference environment (default bench/.venv)")
    parser.add_argument("--logit-scale", type=float, default=1.0,
                        help="multiply the untrained classifier's logits by this (its last"
                             " layer's weights): trained-like logit magnitudes, same"
                             " predictions (default 1: as initialised)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true",
                        help="also run each attack once under torch.profiler; tables go to"
                             " bench/out/profile/")
    parser.add_argument("--no-write", action="store_true",
                        help="print only; do not touch BENCHMARKS.md or figures")
    args = parser.parse_args(argv)
    if args.setting == "trained":
        args.size, args.model = 64, "alexnet"  # what bench/_trained.py trains
    args.trained_info = None
    args.batch_size = args.batch_size or (4 if args.quick else 16)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.reference = args.reference or ("frozen" if args.quick else "both")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device here")
    if args.reference != "none" and not Path(args.reference_python).exists():
        raise SystemExit(
            f"reference environment not found ({args.reference_python}); set it up with"
            " `bash bench/setup_reference_env.sh` (see bench/README.md), or pass"
            " --reference none to time our attacks only")
    torch.set_num_threads(args.threads)
    args.load_before = load_average()
    started = time.time()
    images, labels, classifier = load_inputs(args, device)
    cases = build_cases(args)
    weights_modes = {"none": [], "frozen": ["frozen"], "both": ["frozen", "trainable"]}[
        args.reference]
    per_run = 1 + args.repeats
    total = sum(per_run * (1 + (c.key != "pgd") + (len(weights_modes) if c.reference else 0))
                for c in cases)
    print(f"{classifier_label(args)} at {args.size} px, batch"
          f" {args.batch_size}, LPIPS alexnet:untrained, bound {args.bound:g}, device"
          f" {args.device}, autocast {args.autocast}, {args.threads} threads", flush=True)

    runs: list[Run] = []
    pgd_runs: list[Run] = []  # the PGD calls interleaved with the other cases
    failures: list[str] = []
    reference_versions = None
    external_judge = parse_attack(f"fast_lpa:bound={args.bound},lpips_model=alexnet:untrained")
    external_lpips = external_judge.lpips_network(images)  # what every external case uses
    lpips_state = {k: v.cpu() for k, v in external_lpips.network.features.state_dict().items()}
    with tqdm(total=total, unit="call", desc="attacks", dynamic_ncols=True) as bar, \
            tempfile.TemporaryDirectory(prefix="bench-attacks-") as tmp:
        for case in cases:
            ours = OursRunner(case, classifier, images, labels, args)
            runners: list[OursRunner] = [ours]
            if case.key != "pgd":  # PGD again, interleaved, so that × PGD shares the load
                runners.append(OursRunner(cases[0], classifier, images, labels, args))
            try:
                if case.reference:
                    for weights in weights_modes:
                        bar.set_postfix_str(f"{case.label} starting reference ({weights})")
                        runners.append(ReferenceRunner(case, weights, classifier, lpips_state,
                                                       images, labels, args, Path(tmp)))
                results = run_case(case, runners, args, bar, failures)
            finally:
                for runner in runners:
                    if isinstance(runner, ReferenceRunner):
                        runner.kill()
            if case.lpips_self:
                def lpips_fn(x, y, attack=ours.attack):
                    return attack.lpips_distance(x, y, model=classifier)
            else:  # the external AlexNet (also for PGD, for comparison)
                lpips_fn = external_lpips
            companion = None
            if case.key != "pgd":
                index = next(i for i, (r, _) in enumerate(results) if r.case.key == "pgd")
                companion = results.pop(index)[0]
                pgd_runs.append(companion)
            for run, outputs in results:
                judge(run, outputs, classifier, images, labels, lpips_fn)
                run.baseline = companion
                runs.append(run)
                reference_versions = run.reference_versions or reference_versions

    costs = component_costs(classifier, external_lpips, images) if args.profile else None
    pgd = next(r for r in runs if r.case.key == "pgd")
    gpu = device.type == "cuda"
    elapsed = time.time() - started
    text = report(args, runs, pgd, reference_versions, elapsed, gpu, failures, costs, pgd_runs)
    print()
    print(text)
    OUT.mkdir(parents=True, exist_ok=True)
    tag = (("gpu" if gpu else "cpu") + ("_untrained" if args.setting == "untrained" else "")
           + (f"_logits{args.logit_scale:g}" if args.logit_scale != 1 else ""))
    raw = [{"attack": r.case.key, "label": r.case.label, "impl": r.impl, "spec": r.case.spec,
            "iterations": r.case.iterations, "reference_args": r.case.reference,
            "times": r.times, "cpu_times": r.cpu_times, "warmup": r.warmup,
            "success": r.success, "mean_margin": r.margin, "lpips": r.lpips,
            "counts": r.counts, "lpips_agreement": r.lpips_agreement} for r in runs]
    (OUT / f"attacks_{tag}{'_quick' if args.quick else ''}.json").write_text(
        json.dumps({"command": command_line(), "machine": machine_info(args, reference_versions),
                    "engine": ENGINE_HASHES, "component_costs": costs, "failures": failures,
                    "runs": raw}, indent=1))
    if args.profile:
        folder = OUT / "profile"
        folder.mkdir(parents=True, exist_ok=True)
        for r in runs:
            if r.profile:
                shipped = "_shipped" if "shipped" in r.impl else ""
                name = f"{r.case.key}_{r.impl.split()[0]}{shipped}"
                (folder / f"{name}.txt").write_text(r.profile)
        print(f"profiles: {folder.relative_to(ROOT)}/")
    if args.no_write:
        return
    title = (f"{classifier_label(args, short=True)}"
             + (f", logits ×{args.logit_scale:g}" if args.logit_scale != 1 else "")
             + f" {args.size}px batch {args.batch_size},"
             f" LPIPS alexnet (untrained) bound {args.bound:g}, {args.device}"
             f" {args.autocast}, {args.threads} threads")
    if args.quick:
        figure = OUT / f"attacks_{tag}_quick.png"
        plot(runs, pgd, args.bound, figure, title)
        (OUT / f"attacks_{tag}_quick.md").write_text(text + "\n")
        print(f"quick run: wrote {figure.relative_to(ROOT)} and the table beside it"
              " (BENCHMARKS.md untouched)")
        return
    figure = FIGURES / f"attacks_{tag}.png"
    plot(runs, pgd, args.bound, figure, title)
    section = text + f"\n\n![attack times and LPIPS]({figure.relative_to(ROOT).as_posix()})\n"
    write_section(RESULTS_FILE, tag, section)
    print(f"wrote {RESULTS_FILE.name} (section '{section_title(args, gpu)}') and"
          f" {figure.relative_to(ROOT)}")


def section_title(args, gpu: bool) -> str:
    scale = f", logits ×{args.logit_scale:g}" if args.logit_scale != 1 else ""
    untrained = ", untrained classifier" if args.setting == "untrained" else ""
    return f"Attacks ({'GPU' if gpu else 'CPU'}{untrained}{scale})"


def classifier_label(args, short: bool = False) -> str:
    if args.setting == "trained":
        return "AlexNet PGD-AT on digits (trained)" if short else (
            args.trained_info["label"] if args.trained_info else "trained AlexNet")
    return f"{args.model} (UNTRAINED, seed {CLASSIFIER_SEED})"


def setting_text(args) -> str:
    """The 'Setting:' paragraph of the report."""
    n = args.batch_size
    if args.setting == "trained":
        info = args.trained_info or {}
        return (f"Setting: {info.get('label', 'trained AlexNet')} — clean test accuracy"
                f" {info.get('clean_accuracy', math.nan):.1%}, PGD-10 accuracy"
                f" {info.get('pgd10_accuracy', math.nan):.1%} (first 128 test digits);"
                f" {n} test digits it classifies correctly, {args.size}×{args.size} px, true"
                " labels; LPIPS: externally bounded by the engine's `alexnet:untrained` (seed 0;"
                " no pretrained AlexNet offline) at bound"
                f" {args.bound:g}, autocast {args.autocast}. Our LPA and PPGD run with early"
                f" exit {'ON' if args.early_stop else 'OFF (`early_stop=false`)'}, so both"
                " sides run every iteration (except the reference LPA, which always drops an"
                " image once it is misclassified inside the bound). Times: median of"
                f" {args.repeats} calls after one warm-up call, whole batch per call.")
    return (f"Setting: {args.model} classifier, **UNTRAINED** (torchvision initialisation from"
            f" seed {CLASSIFIER_SEED}; no pretrained weights offline — fine for timing)"
            + (f", its logits multiplied by {args.logit_scale:g} (last layer's weights; same"
               " predictions, trained-like loss and gradient magnitudes)"
               if args.logit_scale != 1 else "")
            + f", {n} crops of"
            f" {args.size}×{args.size} px of scikit-image's bundled photographs, labels = the"
            " classifier's predictions; LPIPS: externally bounded by the engine's"
            f" `alexnet:untrained` (seed 0) at bound {args.bound:g}, autocast {args.autocast}."
            f" Times: median of {args.repeats} calls after one warm-up call, whole batch per"
            " call.")


def report(args, runs: list[Run], pgd: Run, reference_versions, elapsed: float, gpu: bool,
           failures: list[str], costs: dict[str, float] | None = None,
           pgd_runs: list[Run] | None = None) -> str:
    when = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    lines = [
        f"## {section_title(args, gpu)}",
        "",
        f"Command: `{command_line()}` ({when}, {elapsed / 60:.1f} min in all)",
        "",
        f"Machine: {machine_info(args, reference_versions)}.",
        "",
        f"Engine measured (sha256 prefixes of `engine/attacks/`): {engine_fingerprint()}.",
        "",
        setting_text(args),
        "",
        table(runs, pgd, args.bound, gpu),
        "",
        "Columns: *wall s* = median wall seconds per call (*min–max* over the repeats), *CPU s* ="
        " median CPU seconds of the process (all threads); *× PGD* = median wall time / that of"
        " the PGD-10 calls interleaved with the same case (CPU-time ratio in brackets);"
        " *theirs / ours* = the reference's median wall time /"
        " ours (> 1: ours is faster; CPU-time ratio in brackets); *success* = share of outputs"
        " our classifier misclassifies"
        " (pooled over the timed repeats); *≤ bound* = share of outputs with LPIPS ≤ bound;"
        " *passes per call* = forward (F) / backward (B) passes through the classifier (cla)"
        " and the LPIPS network (lpi), in full batches (a pass over k of n images counts k/n),"
        " counted by hooks during the warm-up call.",
        "",
    ]
    if pgd_runs:
        walls = [r.time for r in [pgd, *pgd_runs]]
        cpus = [r.cpu for r in [pgd, *pgd_runs]]
        lines += [f"PGD-10 was re-timed inside every case (interleaved with its calls); its"
                  f" medians ranged {min(walls):.2f}–{max(walls):.2f} s wall and"
                  f" {min(cpus):.2f}–{max(cpus):.2f} s CPU over the run (the spread is the"
                  " machine's changing load).", ""]
    if len(runs) > 1:
        lines += ["Targets:", ""] + [f"- {v}" for v in verdicts(runs, pgd, args.bound)] + [""]
    if failures:
        lines += ["Reference runs that failed (their code, unmodified, raised):", ""]
        lines += [f"- {failure}" for failure in failures] + [""]
    agreement = [r.lpips_agreement for r in runs if r.lpips_agreement is not None]
    if agreement:
        lines += [f"LPIPS agreement (reference's own LPIPS of its outputs vs ours): max |Δ| ="
                  f" {max(agreement):.2e}.", ""]
    if costs:
        lines += [
            "Where the time goes (`--profile`): CPU seconds of one full-batch pass — "
            + ", ".join(f"{name} {value:.3f}" for name, value in costs.items())
            + ". Priced by each run's pass counts (backward passes at F+B, other forward"
            " passes at F), the measured median CPU time is:", ""]
        lines += ["| attack | impl | CPU s measured | from passes | rest (overhead) |",
                  "|---|---|---|---|---|"]
        for run in runs:
            model = predicted_cpu(run, costs)
            lines.append(f"| {run.case.label} | {run.impl} | {run.cpu:.2f} | {model:.2f} |"
                         f" {run.cpu - model:+.2f} ({(run.cpu - model) / run.cpu:+.0%}) |")
        lines += ["", "Operator tables (torch.profiler, one call each): `bench/out/profile/`"
                  " (not committed).", ""]
    lines += ["Specs (ours) and reference arguments:", ""]
    for case in dict.fromkeys(r.case.key for r in runs):
        c = next(r.case for r in runs if r.case.key == case)
        ref = f"; theirs: `{c.reference}`" if c.reference else ""
        lines.append(f"- {c.label}: `{c.spec}`{ref}. {c.note}")
    note = FAIRNESS_TRAINED if args.setting == "trained" else FAIRNESS_UNTRAINED
    lines += ["", "Fairness notes:", "", FAIRNESS.replace("{setting_note}", note)]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
