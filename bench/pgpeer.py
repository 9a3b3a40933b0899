"""
A private PostgreSQL server for benchmarks: Debian's binaries, a data
directory under the bench's work directory (the disk the filesystem store's
queues are on, so both stores pay for the same fsyncs), 127.0.0.1 and a free
port, fsync and synchronous_commit on, as a production server.  The same
recipe as tests/pgcluster.py, without pytest: bench/ runs without it.

    with PostgresPeer(work / "postgres") as server:
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
import subprocess
import time
from pathlib import Path

from common import freePort

# The relay's own connections: 20 sessions committing through its pool (at most 10) and the node's lock.
SETTINGS = """\
listen_addresses = '127.0.0.1'
port = {port}
unix_socket_directories = '{base}'
fsync = on
synchronous_commit = on
max_connections = 100
shared_buffers = 128MB
logging_collector = off
"""


def binaries() -> Path | None:
    """initdb and pg_ctl: on PATH, else Debian's newest /usr/lib/postgresql/*/bin."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(versions[-1]).parent if versions else None


def available() -> str | None:
    """Why the postgres rows cannot run here, or None."""
    if binaries() is None:
        return "PostgreSQL is not installed (apt-get install postgresql)"
    try:
        import psycopg  # noqa: F401
        import psycopg_pool  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install 'relay[postgres]')"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root needs the postgres user (Debian's postgresql package creates it)"
    return None


class PostgresPeer:
    def __init__(self, base: Path) -> None:
        bindir = binaries()
        if bindir is None:
            raise SystemExit(available())
        self.bindir = bindir
        self.base = base
        self.data = base / "data"
        self.port = freePort()
        self.user = "postgres" if os.geteuid() == 0 else None
        self._names = itertools.count(1)

    def _run(self, *argv: str, timeout: float = 120) -> None:
        command = [str(self.bindir / argv[0]), *argv[1:]]
        if self.user is not None:
            command = ["runuser", "-u", self.user, "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=self.base)
        if done.returncode != 0:
            raise SystemExit(f"{argv[0]} failed ({done.returncode}): {done.stdout}{done.stderr}")

    def __enter__(self) -> PostgresPeer:
        self.base.mkdir(parents=True)
        if self.user is not None:
            shutil.chown(self.base, self.user)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-instructions")
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(SETTINGS.format(port=self.port, base=self.base))
        try:
            self._run("pg_ctl", "-D", str(self.data), "-l", str(self.base / "server.log"), "-w", "-t", "60", "start")
        except BaseException:
            self._kill()
            raise
        return self

    def createdb(self, prefix: str = "bench") -> str:
        """A fresh, empty database; its DSN."""
        import psycopg

        name = f"{prefix}_{next(self._names)}"
        with psycopg.connect(self.dsnFor("postgres"), autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.dsnFor(name)

    def dsnFor(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def __exit__(self, *exc: object) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")
        except (SystemExit, subprocess.TimeoutExpired):
            self._kill()

    def _kill(self) -> None:
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
