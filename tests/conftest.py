"""Test-wide policy for tests that need external programs.

Tests marked ``browser`` need Debian's Chromium; tests marked ``postgres`` need a PostgreSQL
server binary (``initdb`` and ``pg_ctl``); tests marked ``redis`` need Debian's redis-server.
Where one is missing the test is skipped with the reason, on a laptop; with ``CI=true`` in
the environment it FAILS instead, so CI can never go green by skipping. The fixtures
``chromium_executable``, ``postgres_bin_dir`` and ``redis_server_executable`` give the found
paths. Servers themselves: :mod:`tests.support`.

Parallel runs (``make test`` runs pytest-xdist workers, see the README): every server a test
starts listens on a free port, each worker has its own test database (pytest-django), and
:func:`own_var_dir` gives each test process its own ``var`` folder (media, stimulus rows,
analysis output), so workers never share a file. Under xdist the slowest tests are sent out
first (:func:`pytest_collection_modifyitems`), so that none of them starts last and runs alone.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from django.test.utils import override_settings

from tests.support.pgserver import find_bin_dir
from tests.support.redisserver import find_redis

CHROMIUM_CANDIDATES = ("/usr/bin/chromium",)

# One CPU thread per test process (this one, xdist workers, and the subprocesses tests start),
# unless the environment says otherwise. Parallelism comes from the workers; PyTorch's
# OpenMP threads on top oversubscribe the cores, and on a busy machine their spin-waits made
# tiny-model training 6x slower (measured: the digits training of test_objectives 27.7 s with
# torch's 2 threads beside other work, 4.7 s with 1; a PAT test 549 s in a serial run). Set
# here, before anything imports torch (which reads the variable once).
for _variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")


def running_in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


def find_chromium() -> str | None:
    found = shutil.which("chromium")
    if found:
        return found
    return next((p for p in CHROMIUM_CANDIDATES if os.access(p, os.X_OK)), None)


def find_postgres_bin_dir() -> Path | None:
    """The folder holding ``initdb`` and ``pg_ctl`` (``tests.support.pgserver.find_bin_dir``)."""
    return find_bin_dir()


def find_redis_server() -> str | None:
    return find_redis()


REQUIREMENTS = {
    "browser": (
        find_chromium,
        "Chromium not found (neither `chromium` on PATH nor /usr/bin/chromium); "
        "install Debian's chromium package",
    ),
    "redis": (
        find_redis_server,
        "redis-server not found (on PATH or /usr/bin/redis-server); install Debian's "
        "redis-server package",
    ),
    "postgres": (
        find_postgres_bin_dir,
        "PostgreSQL server binaries not found (initdb/pg_ctl on PATH or in "
        "/usr/lib/postgresql/*/bin); install Debian's postgresql package",
    ),
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "redis: needs Debian's redis-server")


# Under xdist, tests marked with one of these go first, and so do the unmarked ones below that
# took 10-45 s in a parallel run (``--durations``; subprocesses, training). Only the order
# depends on this list: a stale entry costs nothing but balance.
SLOW_MARKERS = ("browser", "postgres", "redis", "slow")
LONG_TESTS = (
    "tests/engine/test_generate.py::",
    "tests/engine/test_train.py::test_ddp_two_gloo_processes_match_one_process",
    "tests/engine/test_train.py::test_resume_with_dropout_architecture_is_exact",
    "tests/studyapp/test_commands.py::test_demo_builds_the_study_prints_links_and_reruns",
    "tests/studyapp/test_production.py::",
)


def _slowness(item: pytest.Item) -> int:
    """0 for the long tests (real browsers, servers, subprocesses), 1 for the rest."""
    if item.nodeid.startswith(LONG_TESTS):
        return 0
    return 0 if any(item.get_closest_marker(m) for m in SLOW_MARKERS) else 1


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under xdist, run the long tests first (a stable sort: each group keeps its order).

    xdist hands tests out in collection order; a two-minute browser session collected last
    would run alone at the end while the other workers idle. Longest first is the classic
    schedule for that (LPT). Every worker collects, and sorts, identically (xdist checks)."""
    if hasattr(config, "workerinput"):
        items.sort(key=_slowness)


def missing(reason: str) -> None:
    """Skip the current test, or fail it under ``CI=true``."""
    if running_in_ci():
        pytest.fail(f"CI=true, so this cannot be skipped: {reason}", pytrace=False)
    pytest.skip(reason)


def pytest_runtest_setup(item: pytest.Item) -> None:
    for marker, (find, reason) in REQUIREMENTS.items():
        if item.get_closest_marker(marker) is not None and find() is None:
            missing(reason)


@pytest.fixture(scope="session", autouse=True)
def own_var_dir(tmp_path_factory: pytest.TempPathFactory):
    """This test process's own ``var`` folder (``settings.VAR_DIR``) and the defaults under it:
    ``MEDIA_ROOT`` and ``PERCEPTLAB_ROWS_DIR``; tests that need a fresh one override these
    again (``tests/studyapp/conftest.py``'s ``media_root``). Without it, parallel workers would
    share the checkout's ``var/`` (stimulus rows, analysis CSVs of the same study slugs)."""
    var = tmp_path_factory.mktemp("var")
    with override_settings(
        VAR_DIR=var, MEDIA_ROOT=var / "media", PERCEPTLAB_ROWS_DIR=var / "stimulus-rows"
    ):
        yield var


@pytest.fixture(scope="session")
def chromium_executable() -> str:
    path = find_chromium()
    if path is None:
        missing(REQUIREMENTS["browser"][1])
    return path


@pytest.fixture(scope="session")
def redis_server_executable() -> str:
    path = find_redis_server()
    if path is None:
        missing(REQUIREMENTS["redis"][1])
    return path


@pytest.fixture(scope="session")
def postgres_bin_dir() -> Path:
    path = find_postgres_bin_dir()
    if path is None:
        missing(REQUIREMENTS["postgres"][1])
    return path
