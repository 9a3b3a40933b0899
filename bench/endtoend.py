"""
End-to-end relaying: smtp-source → relay → smtp-sink, beside smtp-source →
Postfix (bench/postfixpeer.py) → the same smtp-sink, in one run on one
machine, for 2 KB, 100 KB and 1 MB messages.  The time is from the first
connection to the last delivery (relay: its last ``delivered`` log line;
Postfix: its last ``status=sent`` maillog line), so it covers acceptance with
its durability, the queue, and delivery over SMTP.  Prints one table.

relay runs its default configuration with a smarthost backend to the sink;
Postfix relays through its relayhost.  After an unmeasured warm-up run of
each, the servers take turns, round after round (who goes first alternates);
each round's ratio is one sample and their median is the figure.

    .venv/bin/python bench/endtoend.py [--sizes 2KB,100KB,1MB] [--messages N] [--rounds 3] [--settle SECONDS]
"""

from __future__ import annotations

import itertools
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from common import (
    RELAY_BASE,
    RelayProcess,
    Row,
    freePort,
    interleave,
    printTable,
    smtpSource,
    tableMain,
    target,
    tool,
    waitListening,
)
from postfixpeer import PostfixPeer

CONFIG = (
    RELAY_BASE
    + """\
[delivery:sink]
plugin = smarthost
host = 127.0.0.1
port = {sink}
tls = none

[routes]
localhost = local
* = sink
"""
)

RUNS = itertools.count()
DRAIN_TIMEOUT = 600.0


def relayRun(work: Path, sink: int, size: int, messages: int, sessions: int, reuse: bool) -> float:
    """One fresh relay process on an empty queue: messages per second, first connection to last delivery."""
    run = next(RUNS)
    port = freePort()
    text = CONFIG.format(state=work / f"relay-{run}", port=port, sink=sink)
    with RelayProcess(work, text, port, work / f"relay-{run}.log") as relay:
        started = time.monotonic()
        smtpSource(port, messages, sessions, size, reuse, "sink@example.test")
        ended = relay.wait("delivered", messages, timeout=DRAIN_TIMEOUT)
    return messages / (ended - started)


def waitUntil(done: Callable[[], bool], timeout: float, what: str) -> float:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise SystemExit(f"{what} after {timeout:.0f} s")
        time.sleep(0.005)
    return time.monotonic()


def postfixRun(peer: PostfixPeer, size: int, messages: int, sessions: int, reuse: bool) -> float:
    goal = peer.sent() + messages
    started = time.monotonic()
    smtpSource(peer.port, messages, sessions, size, reuse, "sink@example.test")
    ended = waitUntil(lambda: peer.sent() >= goal, DRAIN_TIMEOUT, "postfix did not deliver everything")
    # Not timed: its queue is empty again (a queue file goes once it is sent).
    waitUntil(lambda: peer.queued() == 0, 60, "postfix's queue did not empty")
    return messages / (ended - started)


@contextmanager
def smtpSink() -> Iterator[int]:
    """smtp-sink on a free port: accepts everything, as fast as it can, 256 connections at once."""
    port = freePort()
    sink = subprocess.Popen(
        [tool("smtp-sink"), "-u", "nobody", f"127.0.0.1:{port}", "256"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        waitListening(port, alive=sink)
        yield port
    finally:
        sink.terminate()
        try:
            sink.wait(timeout=10)
        except subprocess.TimeoutExpired:
            sink.kill()
            sink.wait(timeout=10)


def measure(work: Path, rows: list[Row], sessions: int, rounds: int) -> None:
    """Fill C{rows} with C{rounds} runs of each server, taking turns (L{common.interleave})."""
    with smtpSink() as sink, PostfixPeer(work / "postfix-relay", freePort(), sink) as peer:
        # Not measured: start-up work falls here.
        relayRun(work, sink, 2048, 500, sessions, False)
        postfixRun(peer, 2048, 500, sessions, False)
        interleave(
            rows,
            rounds,
            "end-to-end",
            ("relay", "postfix"),
            lambda row: relayRun(work, sink, row.size, row.messages, sessions, row.reuse),
            lambda row: postfixRun(peer, row.size, row.messages, sessions, row.reuse),
        )


def report(rows: list[Row], sessions: int, rounds: int) -> None:
    printTable(
        f"end to end: smtp-source → server → smtp-sink, {sessions} sessions, first connection to last delivery,"
        f" {rounds} interleaved rounds; messages/s, median",
        rows,
        target,
    )


if __name__ == "__main__":
    sys.exit(tableMain(__doc__.splitlines()[1], measure, report))
