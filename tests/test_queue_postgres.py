"""
The postgres queue store: the IQueueStore contract on a private PostgreSQL
cluster (tests/pgcluster.py, one per session, a schema per test), then what
only a shared store has: group commit, chunked data, leases and claims
between two nodes, and a server that restarts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock

from relay.plugin import PluginContext, runInline
from relay.plugins.postgres import postgres
from relay.testing.queuestore import QueueStoreContract

psycopg = pytest.importorskip("psycopg") if os.environ.get("CI") != "true" else __import__("psycopg")


def makeClock() -> Clock:
    clock = Clock()
    clock.advance(1_800_000_000)
    return clock


def build(
    dsn: str, path: Path, node: str = "a", lease: str = "5m", blocking: Any = runInline, clock: Any = None
) -> Any:
    context = PluginContext(
        reactor=clock or makeClock(), hostname="h", postmaster="p@h", state_dir=path, blocking=blocking
    )
    return postgres.build({"path": str(path), "dsn": dsn, "node": node, "lease": lease}, context)


def sql(dsn: str, statement: str, params: Any = None) -> list[Any]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(statement, params)
        return cur.fetchall() if cur.description else []


@pytest.fixture
def dsn(pgcluster: Any) -> str:
    """A schema of its own on the session's cluster."""
    return pgcluster.createSchema()


class TestPostgresStore(QueueStoreContract):
    @pytest.fixture(autouse=True)
    def schema(self, dsn: str) -> None:
        self.dsn = dsn

    def makeStore(self, path: Path) -> Any:
        return build(self.dsn, path)

    def makeUpdatesFail(self, store: Any, queueID: str, failing: bool) -> None:
        if failing:
            sql(
                self.dsn,
                "CREATE OR REPLACE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS"
                " $$ BEGIN RAISE EXCEPTION 'refused by the test'; END $$",
            )
            sql(
                self.dsn,
                "CREATE TRIGGER refuse BEFORE UPDATE ON messages FOR EACH ROW"
                f" WHEN (OLD.id = '{queueID}') EXECUTE FUNCTION refuse()",
            )
        else:
            sql(self.dsn, "DROP TRIGGER refuse ON messages")

    def makeUnusable(self, path: Path) -> None:
        # A schema written by a newer relay: refused rather than misread.
        sql(self.dsn, "UPDATE schema_version SET version = 999")
