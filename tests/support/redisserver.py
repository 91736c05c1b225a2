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


@contextmanager
def temporary_redis(
    executable: str | None = None, timeout: float = 20.0
) -> Iterator[RedisServer]:
    """Start redis-server (no RDB/AOF files, 127.0.0.1 only); yield it; stop it on exit."""
    executable = executable or find_redis()
    if executable is None:
        raise RedisUnavailable("redis-server not found; install Debian's redis-server package")
    folder = tempfile.mkdtemp(prefix="perceptlab-redis-")
    port = _free_port()
    proc = subprocess.Popen(
        [executable, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", folder, "--protected-mode", "yes"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                output = proc.stdout.read().decode(errors="replace")[-2000:] if proc.stdout else ""
                raise RedisUnavailable(f"redis-server did not start:\n{output}")
            time.sleep(0.05)
        yield RedisServer(f"redis://127.0.0.1:{port}/0", proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(folder, ignore_errors=True)
