"""A throwaway PostgreSQL cluster: ``initdb`` in a temporary folder, a free TCP port, gone on exit.

For the concurrency tests and the load benchmark, which need a real PostgreSQL server but must
never touch one that holds data::

    with temporary_postgres() as pg:
        os.environ["DATABASE_URL"] = pg.url    # postgres://perceptlab@127.0.0.1:PORT/perceptlab
        ...

or from a shell (prints ``DATABASE_URL=...``, stops and deletes the cluster on Ctrl-C)::

    python -m tests.support.pgserver

PostgreSQL refuses to run as root. As root, the cluster is owned by and run as the ``postgres``
system user (Debian's postgresql package creates it), else ``nobody``; otherwise as the
current user. The server listens on 127.0.0.1 only, trusts local connections (no password),
and runs with ``fsync=off``: it is fast and disposable, never a place for real data.
"""

from __future__ import annotations

import argparse
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SUPERUSER = "perceptlab"
DEFAULT_DB = "perceptlab"
SERVER_SETTINGS = {
    # Disposable cluster: durability off, more connections than the benchmark's clients.
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "300",
    "listen_addresses": "127.0.0.1",
}


class PostgresUnavailable(RuntimeError):
    """The PostgreSQL server binaries are missing, or the server did not start."""


@dataclass(frozen=True)
class PostgresServer:
    """A running throwaway cluster. ``url`` is a ``DATABASE_URL`` for its database ``dbname``."""

    host: str
    port: int
    user: str
    dbname: str
    data_dir: Path
    log_file: Path

    @property
    def url(self) -> str:
        return f"postgres://{self.user}@{self.host}:{self.port}/{self.dbname}"

    def url_for(self, dbname: str) -> str:
        return f"postgres://{self.user}@{self.host}:{self.port}/{dbname}"

    def create_database(self, dbname: str) -> str:
        """Create another (empty) database in the cluster; returns its URL."""
        _execute(self, f'CREATE DATABASE "{dbname}"')
        return self.url_for(dbname)


def find_bin_dir() -> Path | None:
    """The folder holding ``initdb`` and ``pg_ctl``: PATH first, then Debian's layout."""
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl", path=str(Path(initdb).parent)):
        return Path(initdb).parent
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if all(os.access(Path(folder) / name, os.X_OK) for name in ("initdb", "pg_ctl")):
            return Path(folder)
    return None


def _run_as() -> pwd.struct_passwd | None:
    """The unprivileged account to run the server as, or None to run as ourselves."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise PostgresUnavailable(
        "running as root and neither a 'postgres' nor a 'nobody' user exists; "
        "PostgreSQL refuses to run as root"
    )


def _temp_parent(account: pwd.struct_passwd | None) -> str | None:
    """Where the cluster's folder goes: the usual temp dir, unless ``account`` could not reach
    it (e.g. TMPDIR under /root), then /tmp."""
    if account is None:
        return None
    folder = Path(tempfile.gettempdir()).resolve()
    reachable = all(os.stat(p).st_mode & 0o001 for p in [folder, *folder.parents])
    return str(folder) if reachable else "/tmp"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _command(args: Sequence[str], account: pwd.struct_passwd | None, *, timeout: float) -> None:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "LANG": "C"}
    kwargs: dict = {}
    if account is not None:
        kwargs = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
        env["HOME"] = "/tmp"
    result = subprocess.run(
        list(args), env=env, capture_output=True, text=True, timeout=timeout, **kwargs
    )
    if result.returncode != 0:
        raise PostgresUnavailable(
            f"{Path(args[0]).name} failed ({result.returncode}): "
            f"{(result.stderr or result.stdout).strip()[-2000:]}"
        )


def _execute(server: PostgresServer, sql: str) -> None:
    import psycopg

    with psycopg.connect(
        host=server.host, port=server.port, user=server.user, dbname="postgres", autocommit=True
    ) as conn:
        conn.execute(sql)


def _chown_tree(path: Path, account: pwd.struct_passwd | None) -> None:
    if account is None:
        return
    os.chown(path, account.pw_uid, account.pw_gid)
    for child in path.rglob("*"):
        os.chown(child, account.pw_uid, account.pw_gid, follow_symlinks=False)


@contextmanager
def temporary_postgres(
    bin_dir: Path | str | None = None,
    *,
    dbname: str = DEFAULT_DB,
    settings: dict[str, str] | None = None,
    start_timeout: float = 60.0,
) -> Iterator[PostgresServer]:
    """Start a fresh cluster with an empty database ``dbname``; stop and delete it on exit.

    ``settings`` adds or overrides server settings (``postgres -c name=value``). Raises
    :class:`PostgresUnavailable` when the binaries are missing or the server does not start
    (with the end of its log).
    """
    bin_dir = Path(bin_dir) if bin_dir else find_bin_dir()
    if bin_dir is None:
        raise PostgresUnavailable(
            "PostgreSQL server binaries not found (initdb/pg_ctl on PATH or in "
            "/usr/lib/postgresql/*/bin); install Debian's postgresql package"
        )
    account = _run_as()
    root = Path(tempfile.mkdtemp(prefix="perceptlab-pg-", dir=_temp_parent(account)))
    data_dir, socket_dir, log_file = root / "data", root / "sock", root / "server.log"
    socket_dir.mkdir()
    log_file.touch()
    _chown_tree(root, account)
    started = False
    try:
        _command(
            [
                str(bin_dir / "initdb"), "-D", str(data_dir), "-U", SUPERUSER, "--auth=trust",
                "-E", "UTF8", "--no-locale", "--no-sync", "--no-instructions",
            ],
            account,
            timeout=120,
        )
        config = {**SERVER_SETTINGS, **(settings or {})}
        last_error: PostgresUnavailable | None = None
        for _attempt in range(3):  # the free port may be taken between probing and binding
            port = _free_port()
            options = " ".join(
                [f"-p {port}", f"-k {socket_dir}"] + [f"-c {k}={v}" for k, v in config.items()]
            )
            try:
                _command(
                    [
                        str(bin_dir / "pg_ctl"), "-D", str(data_dir), "-l", str(log_file),
                        "-o", options, "-w", "-t", str(int(start_timeout)), "start",
                    ],
                    account,
                    timeout=start_timeout + 10,
                )
            except PostgresUnavailable as exc:
                last_error = exc
                continue
            started = True
            break
        if not started:
            log_tail = log_file.read_text(errors="replace")[-2000:]
            raise PostgresUnavailable(f"{last_error}\nserver log:\n{log_tail}")
        server = PostgresServer("127.0.0.1", port, SUPERUSER, dbname, data_dir, log_file)
        _execute(server, f'CREATE DATABASE "{dbname}"')
        yield server
    finally:
        try:
            if started:
                _stop(bin_dir, data_dir, account)
        finally:
            shutil.rmtree(root, ignore_errors=True)


def _stop(bin_dir: Path, data_dir: Path, account: pwd.struct_passwd | None) -> None:
    """``pg_ctl stop`` (fast, then immediate); as a last resort SIGKILL the postmaster."""
    pg_ctl = str(bin_dir / "pg_ctl")
    for mode in ("fast", "immediate"):
        try:
            _command([pg_ctl, "-D", str(data_dir), "-m", mode, "-w", "stop"], account, timeout=60)
            return
        except (PostgresUnavailable, subprocess.TimeoutExpired):
            continue
    try:
        pid = int((data_dir / "postmaster.pid").read_text().split()[0])
        os.kill(pid, signal.SIGKILL)
    except (OSError, ValueError, IndexError):
        pass


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Run a throwaway PostgreSQL cluster until Ctrl-C (then delete it)."
    )
    parser.add_argument("--dbname", default=DEFAULT_DB)
    args = parser.parse_args(argv)
    with temporary_postgres(dbname=args.dbname) as pg:
        print(f"DATABASE_URL={pg.url}", flush=True)
        print(f"data: {pg.data_dir}  log: {pg.log_file}  (Ctrl-C stops and deletes it)", flush=True)
        stop = False

        def _stop(*_args) -> None:
            nonlocal stop
            stop = True

        signal.signal(signal.SIGTERM, _stop)
        try:
            while not stop:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
