"""Test-wide policy for tests that need external programs.

Tests marked ``browser`` need Debian's Chromium; tests marked ``postgres`` need a PostgreSQL
server binary (``initdb`` and ``pg_ctl``); tests marked ``redis`` need Debian's redis-server.
Where one is missing the test is skipped with the reason, on a laptop; with ``CI=true`` in
the environment it FAILS instead, so CI can never go green by skipping. The fixtures
``chromium_executable``, ``postgres_bin_dir`` and ``redis_server_executable`` give the found
paths. Servers themselves: :mod:`tests.support`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.support.pgserver import find_bin_dir
from tests.support.redisserver import find_redis

CHROMIUM_CANDIDATES = ("/usr/bin/chromium",)


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


def missing(reason: str) -> None:
    """Skip the current test, or fail it under ``CI=true``."""
    if running_in_ci():
        pytest.fail(f"CI=true, so this cannot be skipped: {reason}", pytrace=False)
    pytest.skip(reason)


def pytest_runtest_setup(item: pytest.Item) -> None:
    for marker, (find, reason) in REQUIREMENTS.items():
        if item.get_closest_marker(marker) is not None and find() is None:
            missing(reason)


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
