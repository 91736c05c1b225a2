"""A throwaway redis-server on a free port of 127.0.0.1, no persistence, gone on exit.

For the test of the Redis-backed rate limits and the load benchmark::

    with temporary_redis() as server:  # server.url = redis://127.0.0.1:PORT/0
        os.environ["PERCEPTLAB_CACHE"] = server.url
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

CANDIDATES = ("/usr/bin/redis-server", "/usr/sbin/redis-server")


class RedisUnavailable(RuntimeError):
    """redis-server is missing or did not start."""


@dataclass(frozen=True)
class RedisServer:
    url: str
    pid: int


def find_redis() -> str | None:
    found = shutil.which("redis-server")
    if found:
        return found
    return next((p for p in CANDIDATES if os.access(p, os.X_OK)), None)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(executable: str, folder: str, timeout: float) -> tuple[subprocess.Popen, int]:
    """Start redis-server on a free port and wait for its PONG; ``(process, port)``.

    The port is probed free, then bound by redis-server: another process (a parallel test
    worker, another engineer's tests) may take it in between, and redis-server then exits at
    once ("Address already in use"). That is retried on a new port, a few times."""
    last = ""
    for _attempt in range(5):
        port = _free_port()
        proc = subprocess.Popen(
            [executable, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", folder, "--protected-mode", "yes"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return proc, port
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        last = proc.stdout.read().decode(errors="replace")[-2000:] if proc.stdout else ""
        if "already in use" not in last:
            break
    raise RedisUnavailable(f"redis-server did not start:\n{last}")


@contextmanager
def temporary_redis(
    executable: str | None = None, timeout: float = 20.0
) -> Iterator[RedisServer]:
    """Start redis-server (no RDB/AOF files, 127.0.0.1 only); yield it; stop it on exit."""
    executable = executable or find_redis()
    if executable is None:
        raise RedisUnavailable("redis-server not found; install Debian's redis-server package")
    folder = tempfile.mkdtemp(prefix="perceptlab-redis-")
    try:
        proc, port = _start(executable, folder, timeout)
        try:
            yield RedisServer(f"redis://127.0.0.1:{port}/0", proc.pid)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
