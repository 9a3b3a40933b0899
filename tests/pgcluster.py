"""
A private PostgreSQL cluster for tests: Debian's binaries, a temporary data
directory, 127.0.0.1 and a free port, durability left on.

    with privateCluster() as cluster:
        dsn = cluster.createdb("mine")      # a fresh database, its DSN
        cluster.restart(immediate=True)     # a crash of the server, then start

The session fixture C{pgcluster} (tests/conftest.py) starts one for the whole
test session.  Missing binaries skip, except under C{CI=true}, where they fail
(.ci/run installs Debian's postgresql).  As root, the server runs as the
C{postgres} user that Debian's package creates (PostgreSQL refuses root).
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


def binaries() -> Path | None:
    """The directory holding initdb and pg_ctl: on PATH, else Debian's newest /usr/lib/postgresql/*/bin."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(versions[-1]).parent if versions else None


def requireBinaries() -> Path:
    found = binaries()
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("PostgreSQL (initdb, pg_ctl) is not installed (.ci/run installs Debian's postgresql)")
        pytest.skip("PostgreSQL (initdb, pg_ctl) is not installed")
    return found


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """One running server; L{dsn} names its C{postgres} database."""

    def __init__(self, bindir: Path, base: Path) -> None:
        self.bindir = bindir
        self.base = base
        self.data = base / "data"
        self.port = freePort()
        self.user: str | None = None
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                pytest.fail("running as root needs the postgres user (Debian's postgresql package creates it)")
            self.user = "postgres"
        self._names = itertools.count(1)

    def _run(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        command = [str(self.bindir / argv[0]), *argv[1:]]
        if self.user is not None:
            command = ["runuser", "-u", self.user, "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=self.base)
        if done.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed ({done.returncode}): {done.stdout}{done.stderr}")
        return done

    def init(self) -> None:
        if self.user is not None:
            shutil.chown(self.base, self.user)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-instructions")
        with open(self.data / "postgresql.conf", "a") as conf:
            # Durability stays on: tests claim what a power cut would leave.
            conf.write(
                f"listen_addresses = '127.0.0.1'\nport = {self.port}\n"
                f"unix_socket_directories = '{self.base}'\nfsync = on\nsynchronous_commit = on\n"
                "max_connections = 200\nshared_buffers = 32MB\nlogging_collector = off\n"
            )

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.base / "server.log"), "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")
        except (RuntimeError, subprocess.TimeoutExpired):
            self.kill()

    def kill(self) -> None:
        """The fallback: SIGKILL the postmaster by the PID in its own file."""
        try:
            pid = int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)

    def restart(self, immediate: bool = False) -> None:
        """C{immediate}: the server stops without a checkpoint, as after a crash, and recovers from its WAL."""
        self.stop("immediate" if immediate else "fast")
        self.start()

    @property
    def dsn(self) -> str:
        return self.dsnFor("postgres")

    def dsnFor(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def sql(self, statement: str, database: str = "postgres") -> None:
        """One statement in autocommit (CREATE DATABASE cannot run in a transaction)."""
        import psycopg

        with psycopg.connect(self.dsnFor(database), autocommit=True, connect_timeout=10) as conn:
            conn.execute(statement)

    def createdb(self, prefix: str = "relay") -> str:
        """A fresh, empty database; its DSN."""
        name = f"{prefix}_{next(self._names)}"
        self.sql(f'CREATE DATABASE "{name}"')
        return self.dsnFor(name)

    def createSchema(self, database: str = "postgres", prefix: str = "t") -> str:
        """
        A fresh schema in C{database}: a DSN whose connections use it alone
        (search_path), much cheaper than a database per test.
        """
        name = f"{prefix}_{next(self._names)}"
        self.sql(f'CREATE SCHEMA "{name}"', database)
        return f"{self.dsnFor(database)}?options=-csearch_path%3D{name}"


@contextlib.contextmanager
def privateCluster() -> Iterator[Cluster]:
    """A running private cluster, stopped (and its directory removed) on the way out."""
    bindir = requireBinaries()
    try:
        import psycopg  # noqa: F401
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("psycopg is not installed (the test extra installs it)")
        pytest.skip("psycopg is not installed: pip install 'relay[postgres]'")
    base = Path(tempfile.mkdtemp(prefix="relay-pg-"))
    cluster = Cluster(bindir, base)
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def pgcluster() -> Iterator[Cluster]:
    """One private cluster for the whole test session, started when a test first asks for it."""
    with privateCluster() as cluster:
        yield cluster
