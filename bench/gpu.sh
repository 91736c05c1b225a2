#!/usr/bin/env bash
# The GPU run of issue 14, prepared: one script, no network, about 7 minutes on one H200.
#
#   bash bench/gpu.sh             # on a CUDA machine: writes the BENCHMARKS.md section
#   bash bench/gpu.sh --dry-run   # CPU, tiny sizes: checks every step runs (a few minutes on
#                                 # a quiet machine; step limits ×5); writes bench/out/gpu/ only
#   bash bench/gpu.sh --no-gpu-note   # no CUDA here: record in BENCHMARKS.md that none was
#                                     # available (nothing is timed)
#
# Steps (each under its own `timeout`, 480 s in all, so the run stays within 8 minutes; a step that
# fails or times out is reported as such and the run goes on):
#   1. the CUDA tests: every test named *cuda* in tests/engine (skipped without CUDA);
#   2. our PPGD / LPA / Fast-LPA against the PAT authors' code, bench/attacks.py on the GPU
#      (ResNet-50, 224 px, bf16 autocast). The authors' code runs in bench/.venv
#      (bench/setup_reference_env.sh; it needs the network once, so build it before, or carry
#      it); without it the step times ours only (--reference none) and says so;
#   3. a PAT (self-bounded Fast-LPA, 10 iterations) and a PGD-AT (L∞, 10 iterations) training
#      epoch: CIFAR-10 shape (32 px, 50 000 images, batch 50), ResNet-50, bf16 autocast,
#      channels_last, extrapolated from timed steps on synthetic images (the speed of a step
#      does not depend on the pixels; no CIFAR-10 download is needed);
#   4. 2-process DDP with torchrun against 1 process (digits, the CIFAR ResNet-18, a fixed
#      number of steps). With 2+ GPUs on CUDA/NCCL; with one GPU on CPU/gloo, because NCCL
#      cannot put two ranks on one device — the section says which.
# Every step's output is kept in bench/out/gpu/*.log.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
MODE=gpu
case "${1:-}" in
  --dry-run) MODE=dry ;;
  --no-gpu-note) MODE=note ;;
  "") ;;
  *) echo "usage: bash bench/gpu.sh [--dry-run | --no-gpu-note]" >&2; exit 2 ;;
esac
OUT=bench/out/gpu
mkdir -p "$OUT"
RESULTS=$OUT/results.txt
: > "$RESULTS"

if [[ $MODE == gpu ]] && ! $PY -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
  echo "no CUDA device: run with --dry-run to check the script, or --no-gpu-note" >&2
  exit 1
fi

# step NAME SECONDS COMMAND...: run under timeout, log to $OUT/NAME.log, record the outcome.
step() {
  local name=$1 limit=$(( $2 * LIMIT_SCALE )) start rc
  shift 2
  start=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  local took=$(( $(date +%s) - start ))
  local outcome="ok"
  [[ $rc == 124 || $rc == 137 ]] && outcome="TIMED OUT after ${limit} s"
  [[ $rc != 0 && $outcome == ok ]] && outcome="FAILED (exit $rc)"
  echo "$name|$took|$outcome" >> "$RESULTS"
  echo "== $name: $outcome, ${took} s"
}

LIMIT_SCALE=1
if [[ $MODE == dry ]]; then
  LIMIT_SCALE=${LIMIT_SCALE_DRY:-5}  # a CPU check, not a timing: slow shared machines
  DEVICE=cpu
  ATTACKS=(bench/attacks.py --quick --reference none --no-write --size 64 --model resnet18
           --iterations 2 --ppgd-iterations 2 --lpa-iterations 2 --lpa-lambdas 1)
  EPOCH=(--arch resnet18 --batch 4 --steps 1 --device cpu --amp off)
  DDP_DEVICE=cpu; DDP_STEPS=3
elif [[ $MODE == gpu ]]; then
  DEVICE=cuda
  REF=none
  [[ -x bench/.venv/bin/python ]] && REF=frozen
  ATTACKS=(bench/attacks.py --device cuda --autocast bf16 --size 224 --model resnet50
           --batch-size 32 --repeats 2 --reference "$REF" --no-write)
  EPOCH=(--arch resnet50 --batch 50 --steps 20 --device cuda --amp bf16)
  GPUS=$($PY -c 'import torch; print(torch.cuda.device_count())')
  if (( GPUS >= 2 )); then DDP_DEVICE=cuda; else DDP_DEVICE=cpu; fi
  DDP_STEPS=30
fi

if [[ $MODE != note ]]; then
  step cuda_tests 120 $PY -m pytest -q -rs -k cuda tests/engine/test_attacks.py \
    tests/engine/test_attacks_narrow.py tests/engine/test_attacks_perceptual.py \
    tests/engine/test_attacks_precision.py
  step attacks 170 $PY "${ATTACKS[@]}"
  step epochs 90 $PY bench/_gpu_epoch.py "${EPOCH[@]}"
  for n in 1 2; do  # the same number of training steps on digits, 1 process, then 2
    rm -rf "$OUT/ddp$n"
    step "ddp$n" 50 $PY -m torch.distributed.run --standalone --nproc_per_node "$n" \
      -m engine train --out "$OUT/ddp$n" --dataset digits --arch resnet18 --method pgd_linf \
      --epochs 1 --batch-size 64 --stop-after "$DDP_STEPS" --eval-limit 64 \
      --device "$DDP_DEVICE" --no-resume --no-progress
  done
fi

# The BENCHMARKS.md section (dry runs write it under bench/out/gpu/ only).
$PY - "$MODE" "$OUT" "${DDP_DEVICE:-}" <<'EOF'
import datetime as dt
import platform
import re
import sys
from pathlib import Path

sys.path.insert(0, "bench")
from _common import write_markdown_section  # noqa: E402

mode, out, ddp_device = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
start, end = "<!-- bench/gpu.sh: start -->", "<!-- bench/gpu.sh: end -->"
lines = [start, "## GPU run (issue 14: `bench/gpu.sh`)", ""]
day = dt.date.today().isoformat()
if mode == "note":
    lines += [f"{day}: **no GPU was available to this session**, so nothing here is measured"
              " yet. `bash bench/gpu.sh` on a CUDA machine (no network needed, about 7 minutes"
              " on one H200) runs the CUDA tests, times our PPGD / LPA / Fast-LPA against the"
              " authors' code, a PAT and a PGD-AT ResNet-50 epoch (CIFAR-10 shape, bf16,"
              " channels_last) and 2-process DDP, and replaces this section with the figures."
              " `bash bench/gpu.sh --dry-run` checks the script on a CPU.", end]
else:
    import torch

    device = (torch.cuda.get_device_name(0) if mode == "gpu"
              else f"CPU ({platform.processor() or platform.machine()}), DRY RUN: tiny sizes")
    lines += [f"Command: `bash bench/gpu.sh{' --dry-run' if mode == 'dry' else ''}` — {day},"
              f" {device}, torch {torch.__version__}. Logs: `bench/out/gpu/*.log`.", "",
              "| step | seconds | outcome |", "|---|---|---|"]
    for row in (out / "results.txt").read_text().splitlines():
        name, took, outcome = row.split("|")
        lines.append(f"| {name} | {took} | {outcome} |")
    lines.append("")
    tests = (out / "cuda_tests.log").read_text().strip().splitlines()
    lines += ["CUDA tests: " + (tests[-1] if tests else "no output"), ""]
    epoch = (out / "epochs.log").read_text()
    lines += [line for line in epoch.splitlines() if line.startswith(("|", "**", "###"))]
    lines.append("")
    times = {}
    for n in (1, 2):
        found = re.findall(r"^ddp%d\|(\d+)\|ok$" % n,
                           (out / "results.txt").read_text(), re.M)
        times[n] = int(found[0]) if found else None
    if times[1] and times[2]:
        lines.append(f"DDP ({ddp_device}{'/gloo: one GPU cannot host two NCCL ranks' if mode == 'gpu' and ddp_device == 'cpu' else ''}):"
                     f" the same steps took {times[1]} s with 1 process and {times[2]} s with"
                     f" 2 (wall, including start-up): {times[1] / times[2]:.2f}× speed-up.")
    attacks = (out / "attacks.log").read_text().splitlines()
    table = [line for line in attacks if line.startswith("|")]
    lines += ["", "Attacks (`bench/attacks.py`, its table):", "", *table[-30:], "", end]
text = "\n".join(lines)
target = Path("BENCHMARKS.md") if mode != "dry" else out / "BENCHMARKS-dry-run.md"
write_markdown_section(target, start, end, text)
print(text)
print(f"wrote {target}")
EOF
