"""
Durable acceptance throughput: smtp-source against relay and against a private
Postfix (bench/postfixpeer.py), in the same run, on the same machine, for
2 KB, 100 KB and 1 MB messages.  Prints one table.

Both sides make every message durable before 250 and deliver nothing while
measured: Postfix puts every message on hold, relay runs with
``[queue] hold = yes`` and otherwise its default configuration.  Each relay
run is a fresh process on a fresh queue; every 250 must show up as an
``accepted`` log line (relay) or a held queue file (Postfix), or the run fails;
a run of big messages then has its queue deleted, unmeasured (common.discardQueue).
After an unmeasured warm-up run of each, the servers take turns, round after
round (who goes first alternates); each round's ratio compares two runs
seconds apart, and the median of those ratios is the figure.

    .venv/bin/python bench/acceptance.py [--sizes 2KB,100KB,1MB] [--messages N] [--rounds 3] [--settle SECONDS]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from common import (
    DISCARD_FROM,
    Row,
    discardQueue,
    freePort,
    holdRun,
    interleave,
    printTable,
    smtpSource,
    tableMain,
    target,
)
from postfixpeer import PostfixPeer


def relayRun(work: Path, size: int, messages: int, sessions: int, reuse: bool) -> float:
    """One fresh relay process on an empty queue, one smtp-source run: messages per second."""
    rate, state, _ = holdRun(work, "accept", size, messages, sessions, reuse)
    discardQueue(state, size)
    return rate


def postfixRun(peer: PostfixPeer, size: int, messages: int, sessions: int, reuse: bool) -> float:
    before = peer.queueIDs()
    seconds = smtpSource(peer.port, messages, sessions, size, reuse, "sink@localhost")
    held = peer.queueIDs() - before
    if len(held) != messages:
        raise SystemExit(f"postfix held {len(held)} of {messages} messages; see {peer.directory / 'maillog'}")
    if size >= DISCARD_FROM:  # as discardQueue does for the relay
        peer.deleteQueued(held)
        if peer.queueIDs() & held:
            raise SystemExit("postsuper left messages of the run in Postfix's queue")
        os.sync()
    return messages / seconds


def warmUp(work: Path, peer: PostfixPeer, sessions: int) -> None:
    """Not measured: both servers' first run after start-up would fall on whoever goes first."""
    relayRun(work, 2048, 500, sessions, False)
    postfixRun(peer, 2048, 500, sessions, False)


def measure(work: Path, rows: list[Row], sessions: int, rounds: int) -> None:
    """Fill C{rows} with C{rounds} runs of each server, taking turns (L{common.interleave})."""
    with PostfixPeer(work / "postfix-hold", freePort(), freePort(), hold=True) as peer:
        warmUp(work, peer, sessions)
        interleave(
            rows,
            rounds,
            "accept",
            ("relay", "postfix"),
            lambda row: relayRun(work, row.size, row.messages, sessions, row.reuse),
            lambda row: postfixRun(peer, row.size, row.messages, sessions, row.reuse),
        )


def report(rows: list[Row], sessions: int, rounds: int) -> None:
    printTable(
        f"durable acceptance (both in hold mode, durable before 250): smtp-source, {sessions} sessions,"
        f" {rounds} interleaved rounds; messages/s, median",
        rows,
        target,
    )


if __name__ == "__main__":
    sys.exit(tableMain(__doc__.splitlines()[1], measure, report))
