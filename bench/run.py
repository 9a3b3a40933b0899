"""
``make bench``: relay beside a private Postfix, in one run on one machine.

Two tables, each with rows for 2 KB, 100 KB and 1 MB messages, a new
connection per message and all of a session's messages on one (smtp-source
``-d``): durable acceptance (bench/acceptance.py: both servers in hold mode,
durable before 250) and end to end (bench/endtoend.py: smtp-source → server →
smtp-sink, first connection to last delivery).  A third table (bench/dkim.py)
gives relay's durable acceptance with the dkim filter on beside the same
runs without it, for the sizes up to 100 KB.  A fourth (bench/stores.py)
gives relay's durable acceptance with the filesystem store beside the same
runs with the postgres store on a private PostgreSQL server, for the sizes up
to 100 KB on new connections, in at most 3 rounds.  Each row gives both servers'
messages per second (medians of interleaved rounds), the median of the
rounds' ratios beside issue 12's target for that size, and MB/s for the
large sizes.  relay runs its default configuration throughout.

Nothing is deleted between the tables but what the servers themselves delete
while relaying, which both do alike, one queue file per message; a settling
wait at the start (C{--settle}) is no longer needed (see C{common.settle}).

Needs root and Debian's postfix (for Postfix itself, smtp-source and
smtp-sink); exits with one line saying so otherwise.

    .venv/bin/python bench/run.py [--sizes 2KB,100KB,1MB] [--rounds 5] [--settle SECONDS]
        [--only acceptance|endtoend|dkim|stores]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import acceptance
import dkim as dkimbench
import endtoend
import pgpeer
import stores as storesbench
from common import (
    ROOT,
    TREE,
    addSettleOption,
    addTableOptions,
    filesystemOf,
    requirePostfix,
    settle,
    tableRows,
    tool,
    workDirectory,
)


def describe(work: Path) -> str:
    """What was measured, and where: enough to tell two tables apart later."""
    tree = Path(TREE) if TREE else ROOT
    try:
        commit = subprocess.run(
            ["git", "-C", str(tree), "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    postfix = subprocess.run([tool("postconf"), "-dh", "mail_version"], capture_output=True, text=True, timeout=10)
    mount, kind = filesystemOf(work)
    return (
        f"relay {commit or '(not a git checkout)'} from {tree}, default configuration; Postfix"
        f" {postfix.stdout.strip()}; {os.cpu_count()} CPUs, Python {platform.python_version()};"
        f" queues in {work} ({kind} on {mount})"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    addTableOptions(parser, rounds=5)
    addSettleOption(parser)
    parser.add_argument("--only", choices=("acceptance", "endtoend", "dkim", "stores"), help="one table only")
    args = parser.parse_args()
    requirePostfix()
    rows = {"acceptance": tableRows(args), "endtoend": tableRows(args)}
    rows["dkim"] = [row for row in tableRows(args) if row.size <= 100 * 1024]
    rows["stores"] = [row for row in tableRows(args) if row.size <= 100 * 1024 and not row.reuse]
    storeRounds = min(args.rounds, 3)
    if args.only:
        rows = {args.only: rows[args.only]}
    skipped = pgpeer.available() if rows.get("stores") else None
    if skipped is not None:
        print(f"no postgres store table: {skipped}", flush=True)
        rows.pop("stores")
    started = time.monotonic()
    work = workDirectory()
    print(describe(work), flush=True)
    try:
        settle(args.settle)
        if "acceptance" in rows:
            acceptance.measure(work, rows["acceptance"], args.sessions, args.rounds)
        if "endtoend" in rows:
            endtoend.measure(work, rows["endtoend"], args.sessions, args.rounds)
        if rows.get("dkim"):
            dkimbench.measure(work, rows["dkim"], args.sessions, args.rounds)
        if rows.get("stores"):
            storesbench.measure(work, rows["stores"], args.sessions, storeRounds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if "acceptance" in rows:
        acceptance.report(rows["acceptance"], args.sessions, args.rounds)
    if "endtoend" in rows:
        endtoend.report(rows["endtoend"], args.sessions, args.rounds)
    if rows.get("dkim"):
        dkimbench.report(rows["dkim"], args.sessions, args.rounds)
    if rows.get("stores"):
        storesbench.report(rows["stores"], args.sessions, storeRounds)
    print(f"\n{time.monotonic() - started:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
