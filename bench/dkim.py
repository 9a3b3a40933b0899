"""
The cost of DKIM signing: relay's durable acceptance with the dkim filter on
(a 2048-bit RSA key, signing every message of the relay client smtp-source
is) beside the same run without it, for 2 KB and 100 KB messages.  Prints
one table.

Both runs are relay in hold mode as in bench/acceptance.py, each a fresh
process on a fresh queue, taking turns round after round (who goes first
alternates); the figure is the median of the rounds' ratios.  With the
filter on, the server spools each message, signs it in a thread and copies
it into the queue: the table is what that costs.  The first run with the
filter on checks that the queued messages carry a DKIM-Signature.

    .venv/bin/python bench/dkim.py [--sizes 2KB,100KB] [--messages N] [--rounds 3] [--modes new|reuse|both]
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import statistics
import sys
from pathlib import Path

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
{filters}

[routes]
localhost = local

[queue]
hold = yes
"""
)
FILTERS = """\
[filter:dkim]
plugin = dkim
domain = example.org
selector = bench
private_key = {key}
"""
DEFAULT_SIZES = "2KB,100KB"
RUNS = itertools.count()


def makeKey(work: Path) -> Path:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = work / "dkim.pem"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
        )
    )
    return path


def config(state: Path, port: int, key: Path | None) -> str:
    text = CONFIG.format(state=state, port=port, filters=FILTERS.format(key=key) if key else "")
    if key is not None:
        text = text.replace("relay_networks = 127.0.0.0/8\n", "relay_networks = 127.0.0.0/8\nfilters = dkim\n", 1)
    return text


def run(work: Path, size: int, messages: int, sessions: int, reuse: bool, key: Path | None, check: bool) -> float:
    """One fresh relay process, one smtp-source run: messages per second."""
    number = next(RUNS)
    state = work / f"dkim-{number}"
    port = freePort()
    with RelayProcess(work, config(state, port, key), port, work / f"dkim-{number}.log") as relay:
        seconds = smtpSource(port, messages, sessions, size, reuse, "sink@localhost")
        relay.wait("accepted", messages, timeout=30)
    if check and not any(
        b"DKIM-Signature:" in p.read_bytes()[:8192] for p in itertools.islice(state.rglob("*"), 200) if p.is_file()
    ):
        raise SystemExit(f"no DKIM-Signature found in the queue of {state}; see {relay.log}")
    return messages / seconds


def measure(work: Path, rows: list[Row], sessions: int, rounds: int) -> None:
    """C{row.relay}: without the filter; C{row.postfix}: with it (the table names them)."""
    key = makeKey(work)
    run(work, 2048, 300, sessions, False, key, check=True)  # warm-up, and the check
    run(work, 2048, 300, sessions, False, None, check=False)
    for number in range(rounds):
        for row in rows:
            plain = (row.relay, None)
            signed = (row.postfix, key)
            for rates, k in (plain, signed) if number % 2 == 0 else (signed, plain):
                rates.append(run(work, row.size, row.messages, sessions, row.reuse, k, check=False))
            print(
                f"  dkim round {number + 1}/{rounds} {sizeLabel(row.size)} {row.mode}:"
                f" off {row.relay[-1]:.0f}/s on {row.postfix[-1]:.0f}/s",
                flush=True,
            )


def report(rows: list[Row], sessions: int, rounds: int) -> None:
    print()
    print(
        f"durable acceptance with the dkim filter (RSA 2048) and without: smtp-source, {sessions} sessions,"
        f" {rounds} interleaved rounds; messages/s, median"
    )
    print(
        "{:<7} {:<8} {:>8} {:>8} {:>8} {:>6} {:>9} {:>9}  on/off per round".format(
            "size", "mode", "messages", "off/s", "dkim/s", "on/off", "off MB/s", "dkim MB/s"
        )
    )
    for row in rows:
        off, on = statistics.median(row.relay), statistics.median(row.postfix)
        ratios = [b / a for a, b in zip(row.relay, row.postfix, strict=True)]
        mbs = f"{off * row.size / MB:>9.1f} {on * row.size / MB:>9.1f}" if row.size >= 100 * KB else " " * 19
        print(
            f"{sizeLabel(row.size):<7} {row.mode:<8} {row.messages:>8} {off:>8.0f} {on:>8.0f}"
            f" {statistics.median(ratios):>5.2f}x {mbs}  {' '.join(f'{r:.2f}' for r in ratios)}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    addTableOptions(parser, rounds=3)
    addSettleOption(parser)
    parser.set_defaults(sizes=DEFAULT_SIZES)
    args = parser.parse_args()
    requirePostfix()  # smtp-source
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
