"""
A private PostgreSQL cluster for tests: bench/pgpeer.py's server (Debian's
binaries, 127.0.0.1 and a free port, durability left on) in a temporary
directory, with what only a test needs: pytest's skip and fail.

    with privateCluster() as cluster:
        dsn = cluster.createdb("mine")      # a fresh database, its DSN
        cluster.restart(immediate=True)     # a crash of the server, then start

The session fixture C{pgcluster} (tests/conftest.py) starts one for the whole
test session.  Missing binaries skip, except under C{CI=true}, where they fail
(.ci/run installs Debian's postgresql).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

# bench/ is not a package: its helpers import one another by name.  Only
# pgpeer is taken from it (it imports nothing of bench/), and bench/ leaves
# sys.path at once, so that its module names (dkim, common) shadow nothing.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
try:
    from pgpeer import Cluster, PostgresError, binaries, running
finally:
    sys.path.pop(0)


def requireBinaries() -> Path:
    found = binaries()
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("PostgreSQL (initdb, pg_ctl) is not installed (.ci/run installs Debian's postgresql)")
        pytest.skip("PostgreSQL (initdb, pg_ctl) is not installed")
    return found


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
    try:
        with running(bindir, base, maxConnections=200, sharedBuffers="32MB") as cluster:
            yield cluster
    except PostgresError as e:
        pytest.fail(str(e))
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def pgcluster() -> Iterator[Cluster]:
    """One private cluster for the whole test session, started when a test first asks for it."""
    with privateCluster() as cluster:
        yield cluster
