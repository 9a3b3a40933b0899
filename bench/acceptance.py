"""
Durable acceptance throughput: smtp-source against relay and against a private
Postfix (../shared/tools/postfix-peer in hold mode), in the same run, on the
same machine. Prints one table.

Both sides fsync before 250 and deliver nothing while measured: Postfix puts
every message on hold, relay runs with ``[queue] hold = yes``.  Each relay run
is a fresh process, whose queue store logs at shutdown how many changes each
batch of syncs carried (group commit) and what durability cost per change;
the 1-session row shows that cost at no concurrency, beside 20 sessions.
After a minute's settling (see C{common.settle}) and an unmeasured warm-up
run of each, the servers take turns, round after round; each round's ratio
compares two runs seconds apart, and the median of those ratios is the figure.

    .venv/bin/python bench/acceptance.py [--messages 2000] [--sessions 20] [--size 2048] [--settle 61]
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from common import RELAY_BASE, PostfixPeer, RelayProcess, addSettleOption, freePort, settle, smtpSource

CONFIG = (
    RELAY_BASE
    + """\
[routes]
localhost = local

[queue]
hold = yes
{sync}
"""
)


RUNS = itertools.count()
STORE_LINE = re.compile(r"queue store: (\d+) changes in (\d+) batches \(([\d.]+) per batch\), ([\d.]+) ms")


def relayRow(work: Path, messages: int, sessions: int, size: int, reuse: bool, sync: str) -> tuple[float, str, str]:
    """One fresh relay process, one smtp-source run: seconds, changes per batch, ms of syncing per change."""
    run = next(RUNS)
    state = work / f"var-{run}"
    port = freePort()
    log = work / f"relay-{run}.log"
    text = CONFIG.format(state=state, port=port, sync=f"sync = {sync}" if sync else "")
    with RelayProcess(work, text, port, log):
        seconds = smtpSource(port, messages, sessions, size, reuse, "sink@localhost")
    queued = sum(1 for name in os.listdir(state / "queue" / "messages") if name.endswith(".json"))
    if queued != messages:
        raise SystemExit(f"relay queued {queued} of {messages} messages; see {log}")
    found = STORE_LINE.findall(log.read_text())
    perBatch, perChange = (found[-1][2], found[-1][3]) if found else ("?", "?")
    # Kept until the end: deleting thousands of files here would leave the
    # file system busy with that during the next run.
    return seconds, perBatch, perChange


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved relay/Postfix rounds")
    parser.add_argument("--sync", choices=("syncfs", "fsync"), help="[queue] sync of relay (default: its default)")
    addSettleOption(parser)
    args = parser.parse_args()
    settle(args.settle)
    rates: dict[tuple[str, str, int], list[float]] = {}
    store: dict[tuple[str, str, int], list[tuple[str, str]]] = {}
    work = Path(tempfile.mkdtemp(prefix="relay-bench-"))
    os.chmod(work, 0o755)
    postfix = work / "postfix"

    def relay(sessions: int, reuse: bool) -> None:
        seconds, perBatch, perChange = relayRow(work, args.messages, sessions, args.size, reuse, args.sync)
        key = ("relay (hold)", "-d" if reuse else "new conn", sessions)
        rates.setdefault(key, []).append(args.messages / seconds)
        store.setdefault(key, []).append((perBatch, perChange))

    try:
        with PostfixPeer(postfix, freePort(), freePort()) as peer:
            peer.hold()
            # Warm-up, not measured: both servers' first run after start-up
            # (and Postfix's own start-up work) would fall on whoever goes first.
            relayRow(work, 500, args.sessions, args.size, False, args.sync)
            smtpSource(peer.port, 500, args.sessions, args.size, False, "sink@localhost")
            relay(1, False)
            # What else the machine does comes and goes: the two servers take
            # turns, and each round's ratio is one sample.
            for _ in range(args.rounds):
                for reuse in (False, True):
                    relay(args.sessions, reuse)
                    seconds = smtpSource(peer.port, args.messages, args.sessions, args.size, reuse, "sink@localhost")
                    key = ("postfix (hold)", "-d" if reuse else "new conn", args.sessions)
                    rates.setdefault(key, []).append(args.messages / seconds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"durable acceptance: {args.messages} messages of {args.size} bytes (smtp-source), fsync before 250, "
        f"{args.rounds} interleaved rounds"
    )
    header = ("server", "mode", "sessions", "median/s", "rounds (msg/s)", "per batch", "sync ms/change")
    print("{:<16} {:<9} {:>8} {:>8}  {:<22} {:>9} {:>14}".format(*header))
    for key, values in rates.items():
        server, mode, sessions = key
        batches = store.get(key, [("", "")])
        perBatch = "/".join(b for b, _ in batches)
        perChange = "/".join(c for _, c in batches)
        rounds = " ".join(f"{v:.0f}" for v in values)
        print(
            f"{server:<16} {mode:<9} {sessions:>8} {statistics.median(values):>8.0f}  {rounds:<22}"
            f" {perBatch:>9} {perChange:>14}"
        )
    for mode in ("new conn", "-d"):
        ours = rates[("relay (hold)", mode, args.sessions)]
        theirs = rates[("postfix (hold)", mode, args.sessions)]
        # Each round's two runs are seconds apart, so they share the disk's
        # mood; the median of the rounds' ratios is the figure to quote.
        ratios = [a / b for a, b in zip(ours, theirs, strict=True)]
        rounds = " ".join(f"{r:.2f}" for r in ratios)
        ofMedians = statistics.median(ours) / statistics.median(theirs)
        print(
            f"relay / postfix ({mode}, {args.sessions} sessions): median of rounds {statistics.median(ratios):.2f}x"
            f" (rounds: {rounds}; of medians {ofMedians:.2f}x)   target: 1.5x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
