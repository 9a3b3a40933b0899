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

import argparse
import itertools
import shutil
import statistics
import sys
from pathlib import Path

import pgpeer
from common import (
    KB,
    MB,
    RELAY_BASE,
    RelayProcess,
    Row,
    addSettleOption,
    addTableOptions,
    freePort,
    requirePostfix,
    settle,
    sizeLabel,
    smtpSource,
    tableRows,
    workDirectory,
)

CONFIG = (
    RELAY_BASE
    + """\
[routes]
localhost = local

[queue]
hold = yes
{store}
"""
)
POSTGRES = "store = postgres\ndsn = {dsn}\nnode = bench\n"
DEFAULT_SIZES = "2KB,100KB"
RUNS = itertools.count()


def run(work: Path, size: int, messages: int, sessions: int, reuse: bool, server: pgpeer.PostgresPeer | None) -> float:
    """One fresh relay process on an empty queue (C{server}: a fresh database of it), one smtp-source run."""
    number = next(RUNS)
    state = work / f"stores-{number}"
    port = freePort()
    dsn = server.createdb() if server is not None else None
    store = POSTGRES.format(dsn=dsn) if dsn else ""
    with RelayProcess(
        work, CONFIG.format(state=state, port=port, store=store), port, work / f"stores-{number}.log"
    ) as relay:
        seconds = smtpSource(port, messages, sessions, size, reuse, "sink@localhost")
        relay.wait("accepted", messages, timeout=30)
        if relay.count("delivered"):
            raise SystemExit(f"relay delivered in hold mode; see {relay.log}")
    if dsn is not None:
        import psycopg

        with psycopg.connect(dsn, connect_timeout=10) as conn:
            (rows,) = conn.execute("SELECT count(*) FROM messages").fetchone()
        if rows != messages:
            raise SystemExit(f"the postgres store holds {rows} of {messages} messages; see {relay.log}")
    return messages / seconds


def measure(work: Path, rows: list[Row], sessions: int, rounds: int) -> None:
    """C{row.relay}: the filesystem store; C{row.postfix}: the postgres store (the table names them)."""
    with pgpeer.PostgresPeer(work / "postgres") as server:
        run(work, 2048, 300, sessions, False, server)  # warm-up of each, not measured
        run(work, 2048, 300, sessions, False, None)
        for number in range(rounds):
            for row in rows:
                filesystem = (row.relay, None)
                postgres = (row.postfix, server)
                for rates, s in (filesystem, postgres) if number % 2 == 0 else (postgres, filesystem):
                    rates.append(run(work, row.size, row.messages, sessions, row.reuse, s))
                print(
                    f"  stores round {number + 1}/{rounds} {sizeLabel(row.size)} {row.mode}:"
                    f" filesystem {row.relay[-1]:.0f}/s postgres {row.postfix[-1]:.0f}/s",
                    flush=True,
                )


def report(rows: list[Row], sessions: int, rounds: int) -> None:
    print()
    print(
        f"durable acceptance by queue store (relay in hold mode, durable before 250): smtp-source, {sessions}"
        f" sessions, {rounds} interleaved rounds; messages/s, median"
    )
    print(
        "{:<7} {:<8} {:>8} {:>8} {:>8} {:>6} {:>8} {:>8}  pg/fs per round".format(
            "size", "mode", "messages", "fs/s", "pg/s", "pg/fs", "fs MB/s", "pg MB/s"
        )
    )
    for row in rows:
        fs, pg = statistics.median(row.relay), statistics.median(row.postfix)
        ratios = [b / a for a, b in zip(row.relay, row.postfix, strict=True)]
        mbs = f"{fs * row.size / MB:>8.1f} {pg * row.size / MB:>8.1f}" if row.size >= 100 * KB else " " * 17
        print(
            f"{sizeLabel(row.size):<7} {row.mode:<8} {row.messages:>8} {fs:>8.0f} {pg:>8.0f}"
            f" {statistics.median(ratios):>5.2f}x {mbs}  {' '.join(f'{r:.2f}' for r in ratios)}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    addTableOptions(parser, rounds=3)
    addSettleOption(parser)
    parser.set_defaults(sizes=DEFAULT_SIZES)
    args = parser.parse_args()
    requirePostfix()  # smtp-source
    why = pgpeer.available()
    if why is not None:
        raise SystemExit(f"bench/stores.py: {why}")
    rows = tableRows(args)
    settle(args.settle)
    work = workDirectory()
    try:
        measure(work, rows, args.sessions, args.rounds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(rows, args.sessions, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
