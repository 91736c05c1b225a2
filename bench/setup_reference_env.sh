#!/usr/bin/env bash
# Build the reference environment bench/.venv for bench/attacks.py: the PAT authors'
# perceptual-advex 0.2.6 on the SAME torch/torchvision build as the project (so the benchmark
# compares algorithms, not torch versions). Idempotent; about 2 minutes the first time.
# bench/.venv is ignored by git through the `.venv/` pattern of .gitignore.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
VENV=bench/.venv
command -v "$PYTHON" >/dev/null || { echo "need $PYTHON (set PYTHON=...)"; exit 1; }
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
# 1. torch + torchvision exactly as pinned for the project (constraints.txt).
"${PIP[@]}" -c constraints.txt torch torchvision
# 2. The authors' package and the packages its import chain needs, without their declared
#    (old, partly unbuildable) dependencies. See the comments in the requirements file.
"${PIP[@]}" --no-deps -r bench/requirements-reference.txt
# 3. Check: imports the three attack classes (through the torchvision.models.utils shim).
"$VENV/bin/python" bench/_advex.py --check
