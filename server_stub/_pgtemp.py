"""A throwaway PostgreSQL server (``initdb`` + ``pg_ctl``), for tests and benchmarks.

The binaries are looked up on ``PATH``, then under ``/usr/lib/postgresql/*/bin``
(Debian's layout). PostgreSQL refuses to run as root, so as root the cluster
belongs to the ``postgres`` account (which Debian's package creates) and every
command runs through ``runuser -u postgres``. The data directory and the
unix-socket directory live in one temporary directory, removed by ``stop()``.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType
from typing import List, Mapping, Optional

__all__ = ["BENCHMARK_SETTINGS", "TEST_SETTINGS", "PostgresUnavailable", "TemporaryPostgres"]

TEST_SETTINGS: Mapping[str, str] = {
    # Nothing here has to survive a crash: skip every flush to disk.
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "200",
}
"""Fast and not crash-safe: for test suites."""

BENCHMARK_SETTINGS: Mapping[str, str] = {"max_connections": "200"}
"""PostgreSQL's defaults (durable commits), with room for many workers' pools."""

_START_ATTEMPTS = 3


class PostgresUnavailable(RuntimeError):
    """PostgreSQL's binaries are missing, or the server did not start."""


def find_bindir() -> Path:
    """The directory holding ``initdb`` and ``pg_ctl`` (PostgresUnavailable if none)."""
    on_path = shutil.which("initdb")
    if on_path is not None and shutil.which("pg_ctl") is not None:
        return Path(os.path.realpath(on_path)).parent
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda path: [int(part) for part in path.split("/")[4].split(".") if part.isdigit()],
    )
    if candidates:
        return Path(candidates[-1]).parent
    raise PostgresUnavailable(
        "PostgreSQL's initdb was not found on PATH nor under /usr/lib/postgresql/*/bin;"
        " install it (e.g. apt-get install postgresql)"
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


class TemporaryPostgres:
    """A PostgreSQL server on 127.0.0.1 and a free port, trusting local connections.

    ``with TemporaryPostgres() as pg: pg.url()`` — or ``start()`` and ``stop()``.
    """

    def __init__(
        self, settings: Mapping[str, str] = TEST_SETTINGS, *, bindir: Optional[Path] = None
    ) -> None:
        self.settings = dict(settings)
        self.bindir = bindir
        self.port = 0
        self.directory: Optional[Path] = None
        self._as_postgres = os.geteuid() == 0

    def __repr__(self) -> str:
        return f"<TemporaryPostgres port={self.port} directory={self.directory}>"

    def __enter__(self) -> TemporaryPostgres:
        return self.start()

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        traceback: Optional[TracebackType],
    ) -> None:
        self.stop()

    def url(self, dbname: str = "postgres", *, search_path: Optional[str] = None) -> str:
        """A URL for ``dbname`` as the superuser, optionally with its own ``search_path``."""
        url = f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"
        if search_path is not None:
            url += f"?options=-csearch_path%3D{search_path}"
        return url

    @property
    def _data(self) -> Path:
        assert self.directory is not None
        return self.directory / "data"

    def start(self) -> TemporaryPostgres:
        """initdb and start; raises PostgresUnavailable (with the server's log) on failure."""
        bindir = self.bindir or find_bindir()
        self.directory = Path(tempfile.mkdtemp(prefix="telemetry-pg-"))
        try:
            sockets = self.directory / "sockets"
            sockets.mkdir()
            if self._as_postgres:
                try:
                    account = pwd.getpwnam("postgres")
                except KeyError:
                    raise PostgresUnavailable(
                        "running as root, and there is no 'postgres' account to run PostgreSQL as"
                    ) from None
                for path in (self.directory, sockets):
                    os.chown(path, account.pw_uid, account.pw_gid)
            self._run(
                [
                    str(bindir / "initdb"),
                    "--pgdata",
                    str(self._data),
                    "--username",
                    "postgres",
                    "--auth",
                    "trust",
                    "--encoding",
                    "UTF8",
                    "--no-locale",
                    "--no-sync",
                ]
            )
            base_settings = {
                "listen_addresses": "'127.0.0.1'",
                "unix_socket_directories": f"'{sockets}'",
                **{name: f"'{value}'" for name, value in self.settings.items()},
            }
            self._start_on_a_free_port(bindir, base_settings)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_on_a_free_port(self, bindir: Path, base_settings: Mapping[str, str]) -> None:
        assert self.directory is not None
        log = self.directory / "server.log"
        # A free port can be taken by someone else before the server binds it: retry.
        for attempt in range(1, _START_ATTEMPTS + 1):
            self.port = _free_port()
            # postgresql.auto.conf is read last and is ours alone: no quoting of a
            # command line, whatever the paths.
            lines = [f"{name} = {value}" for name, value in base_settings.items()]
            lines.append(f"port = {self.port}")
            self._write(self._data / "postgresql.auto.conf", "\n".join(lines) + "\n")
            try:
                self._pg_ctl(
                    bindir, self._data, "--log", str(log), "--wait", "--timeout", "60", "start"
                )
            except PostgresUnavailable:
                if attempt == _START_ATTEMPTS:
                    tail = log.read_text(errors="replace")[-4000:] if log.exists() else ""
                    message = f"PostgreSQL did not start; its log:\n{tail}"
                    raise PostgresUnavailable(message) from None
            else:
                return

    def stop(self) -> None:
        """Stop the server at once and remove its directory; safe to call twice."""
        directory, self.directory = self.directory, None
        if directory is None:
            return
        if (directory / "data" / "postmaster.pid").exists():
            bindir = self.bindir or find_bindir()
            with contextlib.suppress(PostgresUnavailable):
                self._pg_ctl(bindir, directory / "data", "--mode", "immediate", "--wait", "stop")
        shutil.rmtree(directory, ignore_errors=True)

    def _write(self, path: Path, text: str) -> None:
        path.write_text(text)
        if self._as_postgres:
            account = pwd.getpwnam("postgres")
            os.chown(path, account.pw_uid, account.pw_gid)

    def _pg_ctl(self, bindir: Path, data: Path, *arguments: str) -> None:
        self._run([str(bindir / "pg_ctl"), "--pgdata", str(data), *arguments], cwd=data.parent)

    def _run(self, command: List[str], *, cwd: Optional[Path] = None) -> None:
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        result = subprocess.run(  # noqa: S603 - our own argument list, no shell
            command,
            # A directory the postgres account can enter, unlike maybe the caller's.
            cwd=cwd or self.directory,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if result.returncode != 0:
            raise PostgresUnavailable(
                f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}{result.stderr}"
            )
