# Single entry point: `make demo` serves a working study, `make test` runs every test.
# Both create/refresh the virtual environment first (fast and idempotent when up to date).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1:8000
PYTEST_ARGS ?=
# `make test` runs the suite in parallel (pytest-xdist): TEST_WORKERS processes, each with its
# own test database and var folder (tests/conftest.py). Tests are handed out two at a time,
# longest first, so no browser session starts last. TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= auto

.PHONY: setup demo serve test lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (set PYTHON=...)"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	@touch $@

demo: setup
	DJANGO_DEBUG=1 $(PY) manage.py demo --serve --host $(HOST)

# Production server (see README, "Running a real study"): needs DJANGO_SECRET_KEY etc. in the
# environment; migrates first (idempotent), then gunicorn with $(WORKERS) gthread workers of
# $(THREADS) threads (threads keep connections alive and overlap database waits).
WORKERS ?= 4
THREADS ?= 4
serve: setup
	$(PY) manage.py migrate --no-input
	$(PY) manage.py prepare_stimuli
	$(VENV)/bin/gunicorn studyapp.wsgi -k gthread -w $(WORKERS) --threads $(THREADS) -b $(HOST)

test: setup
	$(PY) -m pytest -n $(TEST_WORKERS) --dist load --maxschedchunk 2 $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check engine studyapp tests bench manage.py

clean:
	rm -rf $(VENV) var
