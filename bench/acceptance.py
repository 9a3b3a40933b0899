"""
Durable acceptance throughput: smtp-source against relay and against a private
Postfix (bench/postfixpeer.py), in the same run, on the same machine, for
2 KB, 100 KB and 1 MB messages.  Prints one table.

Both sides make every message durable before 250 and deliver nothing while
measured: Postfix puts every message on hold, relay runs with
``[queue] hold = yes`` and otherwise its default configuration.  Each relay
run is a fresh process on a fresh queue; every 250 must show up as an
``accepted`` log line (relay) or a held queue file (Postfix), or the run fails.
After an unmeasured warm-up run of each, the servers take turns, round after
round (who goes first alternates); each round's ratio compares two runs
seconds apart, and the median of those ratios is the figure.

    .venv/bin/python bench/acceptance.py [--sizes 2KB,100KB,1MB] [--messages N] [--rounds 3] [--settle SECONDS]
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import sys
from pathlib import Path

from common import (
    RELAY_BASE,
    RelayProcess,
    Row,
    addSettleOption,
    addTableOptions,
    freePort,
    printTable,
    requirePostfix,
    settle,
    sizeLabel,
    smtpSource,
    tableRows,
    target,
    workDirectory,
)
from postfixpeer import PostfixPeer

CONFIG = (
    RELAY_BASE
    + """\
[routes]
localhost = local

[queue]
hold = yes
"""
)

RUNS = itertools.count()


def relayRun(work: Path, size: int, messages: int, sessions: int, reuse: bool) -> float:
    """One fresh relay process on an empty queue, one smtp-source run: messages per second."""
    run = next(RUNS)
    port = freePort()
    text = CONFIG.format(state=work / f"accept-{run}", port=port)
    with RelayProcess(work, text, port, work / f"accept-{run}.log") as relay:
        seconds = smtpSource(port, messages, sessions, size, reuse, "sink@localhost")
        # Logged as the 250 goes out: a moment at most after smtp-source saw it.
        relay.wait("accepted", messages, timeout=30)
        if relay.count("delivered"):
            raise SystemExit(f"relay delivered in hold mode; see {relay.log}")
    # The queue is kept until the end: deleting thousands of files here would
    # leave the file system busy with that during the next run.
    return messages / seconds


def postfixRun(peer: PostfixPeer, size: int, messages: int, sessions: int, reuse: bool) -> float:
    before = peer.queued()
    seconds = smtpSource(peer.port, messages, sessions, size, reuse, "sink@localhost")
    held = peer.queued() - before
    if held != messages:
        raise SystemExit(f"postfix held {held} of {messages} messages; see {peer.directory / 'maillog'}")
    return messages / seconds


def warmUp(work: Path, peer: PostfixPeer, sessions: int) -> None:
    """Not measured: both servers' first run after start-up would fall on whoever goes first."""
    relayRun(work, 2048, 500, sessions, False)
    postfixRun(peer, 2048, 500, sessions, False)


def measure(work: Path, rows: list[Row], sessions: int, rounds: int) -> None:
    """
    Fill C{rows} with C{rounds} runs of each server, taking turns: within a
    round each row's relay run and Postfix run are back to back, and who goes
    first alternates from round to round.
    """
    with PostfixPeer(work / "postfix-hold", freePort(), freePort(), hold=True) as peer:
        warmUp(work, peer, sessions)
        for number in range(rounds):
            for row in rows:
                ours = (row.relay, relayRun, work)
                theirs = (row.postfix, postfixRun, peer)
                for rates, run, first in (ours, theirs) if number % 2 == 0 else (theirs, ours):
                    rates.append(run(first, row.size, row.messages, sessions, row.reuse))
                print(
                    f"  accept round {number + 1}/{rounds} {sizeLabel(row.size)} {row.mode}:"
                    f" relay {row.relay[-1]:.0f}/s postfix {row.postfix[-1]:.0f}/s",
                    flush=True,
                )


def report(rows: list[Row], sessions: int, rounds: int) -> None:
    printTable(
        f"durable acceptance (both in hold mode, durable before 250): smtp-source, {sessions} sessions,"
        f" {rounds} interleaved rounds; messages/s, median",
        rows,
        target,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    addTableOptions(parser, rounds=3)
    addSettleOption(parser)
    args = parser.parse_args()
    requirePostfix()
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
