"""
End-to-end relaying: smtp-source → relay → smtp-sink, beside smtp-source →
Postfix (../shared/tools/postfix-peer) → the same smtp-sink, in one run on one
machine.  The time is from the first connection to the last message leaving
the queue (relay: its queue directory is empty; Postfix: its spool is), so it
covers acceptance with fsync, the queue, and delivery over SMTP.

relay delivers through its smarthost backend to the sink; Postfix through its
relayhost.  After a minute's settling (see C{common.settle}) and an unmeasured
warm-up run of each, the servers take turns, round after round; each round's
ratio is one sample and their median is the figure.

    .venv/bin/python bench/endtoend.py [--messages 2000] [--sessions 20] [--size 2048] [--rounds 3] [--settle 61]
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from common import (
    RELAY_BASE,
    PostfixPeer,
    RelayProcess,
    addSettleOption,
    freePort,
    settle,
    smtpSource,
    tool,
    waitListening,
)

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


def drained(count: Callable[[], int], timeout: float = 600.0) -> float:
    """Wait until C{count()} is 0; the time it happened."""
    deadline = time.monotonic() + timeout
    while count() and time.monotonic() < deadline:
        time.sleep(0.01)
    if count():
        raise SystemExit("the queue did not drain")
    return time.monotonic()


def relayRun(work: Path, sink: int, args: argparse.Namespace, reuse: bool) -> float:
    run = next(RUNS)
    state, port = work / f"var-{run}", freePort()
    text = CONFIG.format(state=state, port=port, sink=sink)
    messages = state / "queue" / "messages"
    with RelayProcess(work, text, port, work / f"relay-{run}.log"):
        started = time.monotonic()
        smtpSource(port, args.messages, args.sessions, args.size, reuse, "sink@example.test")
        ended = drained(lambda: sum(1 for name in os.listdir(messages) if name.endswith(".json")))
    return args.messages / (ended - started)


def postfixRun(peer: PostfixPeer, args: argparse.Namespace, reuse: bool) -> float:
    started = time.monotonic()
    smtpSource(peer.port, args.messages, args.sessions, args.size, reuse, "sink@example.test")
    ended = drained(peer.queued)
    return args.messages / (ended - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=3)
    addSettleOption(parser)
    args = parser.parse_args()
    settle(args.settle)
    work = Path(tempfile.mkdtemp(prefix="relay-bench-"))
    os.chmod(work, 0o755)
    sinkPort = freePort()
    # smtp-sink: accepts everything, as fast as it can, 256 connections at once.
    sink = subprocess.Popen(
        [tool("smtp-sink"), "-u", "nobody", f"127.0.0.1:{sinkPort}", "256"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    rates: dict[tuple[str, str], list[float]] = {}
    try:
        waitListening(sinkPort)
        with PostfixPeer(work / "postfix", freePort(), sinkPort) as peer:
            warmUp = argparse.Namespace(**{**vars(args), "messages": 500})
            relayRun(work, sinkPort, warmUp, False)  # not measured: start-up work falls here
            postfixRun(peer, warmUp, False)
            for _ in range(args.rounds):
                for reuse in (False, True):
                    mode = "-d" if reuse else "new conn"
                    rates.setdefault(("relay", mode), []).append(relayRun(work, sinkPort, args, reuse))
                    rates.setdefault(("postfix", mode), []).append(postfixRun(peer, args, reuse))
    finally:
        sink.terminate()
        sink.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"end to end: {args.messages} messages of {args.size} bytes, {args.sessions} sessions, smtp-source → server"
        f" → smtp-sink, first accept to last delivery, {args.rounds} interleaved rounds"
    )
    print("{:<10} {:<9} {:>9}  {}".format("server", "mode", "median/s", "rounds (msg/s)"))
    for (server, mode), values in rates.items():
        rounds = " ".join(f"{v:.0f}" for v in values)
        print(f"{server:<10} {mode:<9} {statistics.median(values):>9.0f}  {rounds}")
    for mode in ("new conn", "-d"):
        ratios = [a / b for a, b in zip(rates[("relay", mode)], rates[("postfix", mode)], strict=True)]
        rounds = " ".join(f"{r:.2f}" for r in ratios)
        median = statistics.median(ratios)
        print(f"relay / postfix ({mode}): median of rounds {median:.2f}x (rounds: {rounds})   target: 1.5x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
