"""
The queue stores side by side: relay's durable acceptance with the default
filesystem store beside the same runs with ``[queue] store = postgres`` on a
private PostgreSQL server (bench/pgpeer.py: fsync and synchronous_commit on,
its data on the same disk as the filesystem store's queues), for 2 KB and
100 KB messages.  Prints one table.

Both are relay in hold mode as in bench/acceptance.py, each run a fresh
process on a fresh queue (a fresh database for postgres), taking turns round
after round (who goes first alternates); every 250 must show up as an
``accepted`` log line, and the postgres run's messages must all be rows of
its database.  The figure is the median of the rounds' ratios.

    .venv/bin/python bench/stores.py [--sizes 2KB,100KB] [--messages N] [--rounds 3] [--modes new|reuse|both]
"""

from __future__ import annotations

import sys
from pathlib import Path

import pgpeer
from common import Row, discardQueue, holdConfig, holdRun, interleave, printVersus, requirePostfix, tableMain

POSTGRES = "store = postgres\ndsn = {dsn}\nnode = bench\n"
DEFAULT_SIZES = "2KB,100KB"


def run(work: Path, size: int, messages: int, sessions: int, reuse: bool, server: pgpeer.Cluster | None) -> float:
    """One fresh relay process on an empty queue (C{server}: a fresh database of it), one smtp-source run."""
    dsn = server.createdb("bench") if server is not None else None
    queue = POSTGRES.format(dsn=dsn) if dsn else ""
    rate, state, log = holdRun(
        work, "stores", size, messages, sessions, reuse, lambda state, port: holdConfig(state, port, queue)
    )
    if dsn is not None:
        import psycopg

        with psycopg.connect(dsn, connect_timeout=10) as conn:
            (rows,) = conn.execute("SELECT count(*) FROM messages").fetchone()
        if rows != messages:
            raise SystemExit(f"the postgres store holds {rows} of {messages} messages; see {log}")
    discardQueue(state, size)
    return rate


def measure(work: Path, rows: list[Row], sessions: int, rounds: int) -> None:
    """C{row.relay}: the filesystem store; C{row.postfix}: the postgres store (the table names them)."""
    with pgpeer.benchServer(work / "postgres") as server:
        run(work, 2048, 300, sessions, False, server)  # warm-up of each, not measured
        run(work, 2048, 300, sessions, False, None)
        interleave(
            rows,
            rounds,
            "stores",
            ("filesystem", "postgres"),
            lambda row: run(work, row.size, row.messages, sessions, row.reuse, None),
            lambda row: run(work, row.size, row.messages, sessions, row.reuse, server),
        )


def report(rows: list[Row], sessions: int, rounds: int) -> None:
    printVersus(
        f"durable acceptance by queue store (relay in hold mode, durable before 250): smtp-source, {sessions}"
        f" sessions, {rounds} interleaved rounds; messages/s, median",
        rows,
        "fs",
        "pg",
        "pg/fs",
    )


def requireTools() -> None:
    requirePostfix()  # smtp-source
    why = pgpeer.available()
    if why is not None:
        raise SystemExit(f"bench/stores.py: {why}")


if __name__ == "__main__":
    sys.exit(tableMain(__doc__.splitlines()[1], measure, report, sizes=DEFAULT_SIZES, require=requireTools))
