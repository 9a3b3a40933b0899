"""
A private PostgreSQL server: Debian's binaries, a data directory of its own,
127.0.0.1 and a free port, fsync and synchronous_commit on, as a production
server.  The one recipe for the benchmarks and the tests: it needs neither
pytest nor the rest of bench/ (only the standard library, and psycopg for
the SQL), so that tests/pgcluster.py, which adds pytest's skip and fail,
imports it from here.  As root, the server runs as the C{postgres} user that
Debian's package creates (PostgreSQL refuses root).

    with benchServer(work / "postgres") as server:
        dsn = server.createdb("run")        # a fresh, empty database
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
import time
from collections.abc import Iterator
from pathlib import Path

SETTINGS = """\
listen_addresses = '127.0.0.1'
port = {port}
unix_socket_directories = '{base}'
fsync = on
synchronous_commit = on
max_connections = {maxConnections}
shared_buffers = {sharedBuffers}
logging_collector = off
"""


class PostgresError(RuntimeError):
    """The server could not be set up, started or stopped; the message says why."""


def binaries() -> Path | None:
    """The directory holding initdb and pg_ctl: on PATH, else Debian's newest /usr/lib/postgresql/*/bin."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(versions[-1]).parent if versions else None


def serverUser() -> str | None:
    """Whom the server runs as: C{postgres} under root, else ourselves (None)."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise PostgresError(
            "running as root needs the postgres user (Debian's postgresql package creates it)"
        ) from None
    return "postgres"


def available() -> str | None:
    """Why the benchmark's postgres rows cannot run here, or None."""
    if binaries() is None:
        return "PostgreSQL is not installed (apt-get install postgresql)"
    try:
        import psycopg  # noqa: F401
        import psycopg_pool  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install 'relay[postgres]')"
    try:
        serverUser()
    except PostgresError as e:
        return str(e)
    return None


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """One server whose data lives under C{base}; L{dsn} names its C{postgres} database."""

    def __init__(self, bindir: Path, base: Path, maxConnections: int, sharedBuffers: str) -> None:
        self.bindir = bindir
        self.base = base
        self.data = base / "data"
        self.port = freePort()
        self.user = serverUser()
        self.settings = SETTINGS.format(
            port=self.port, base=base, maxConnections=maxConnections, sharedBuffers=sharedBuffers
        )
        self._names = itertools.count(1)

    def _run(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        command = [str(self.bindir / argv[0]), *argv[1:]]
        if self.user is not None:
            command = ["runuser", "-u", self.user, "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=self.base)
        if done.returncode != 0:
            raise PostgresError(f"{argv[0]} failed ({done.returncode}): {done.stdout}{done.stderr}")
        return done

    def init(self) -> None:
        if self.user is not None:
            shutil.chown(self.base, self.user)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-instructions")
        with open(self.data / "postgresql.conf", "a") as conf:
            # Durability stays on: tests claim what a power cut would leave, benchmarks measure what it costs.
            conf.write(self.settings)

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.base / "server.log"), "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")
        except (PostgresError, subprocess.TimeoutExpired):
            self.kill()

    def kill(self) -> None:
        """The fallback: SIGKILL the postmaster by the PID in its own file, and wait for it to go."""
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

    def createdb(self, prefix: str) -> str:
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
def running(bindir: Path, base: Path, maxConnections: int, sharedBuffers: str) -> Iterator[Cluster]:
    """A server initialised in C{base} (an existing, empty directory) and started; stopped on the way out."""
    cluster = Cluster(bindir, base, maxConnections, sharedBuffers)
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@contextlib.contextmanager
def benchServer(base: Path) -> Iterator[Cluster]:
    """
    The benchmark's server, its data in C{base} (created here) on the disk of
    the filesystem store's queues, so that both stores pay for the same
    fsyncs; room for the relay's own connections (20 sessions committing
    through its pool of at most 10, and the node's lock).  What goes wrong
    exits with one line, as the other benchmarks do.
    """
    bindir = binaries()
    if bindir is None:
        raise SystemExit(available())
    base.mkdir(parents=True)
    try:
        with running(bindir, base, maxConnections=100, sharedBuffers="128MB") as cluster:
            yield cluster
    except PostgresError as e:
        raise SystemExit(str(e)) from None
