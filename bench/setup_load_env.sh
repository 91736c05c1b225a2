#!/usr/bin/env bash
# Build bench/.venv-load for bench/load.py: locust (and its gevent stack) in its own virtual
# environment, apart from the project's .venv (see bench/requirements-load.txt for why).
# Idempotent; about a minute the first time. bench/.venv-load is ignored by git.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
VENV=bench/.venv-load
command -v "$PYTHON" >/dev/null || { echo "need $PYTHON (set PYTHON=...)"; exit 1; }
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r bench/requirements-load.txt
"$VENV/bin/locust" --version
