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

import itertools
import sys
from pathlib import Path

from common import Row, discardQueue, holdConfig, holdRun, interleave, printVersus, requirePostfix, tableMain

FILTERS = """\
[filter:dkim]
plugin = dkim
domain = example.org
selector = bench
private_key = {key}
"""
DEFAULT_SIZES = "2KB,100KB"


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
    text = holdConfig(state, port)
    if key is not None:
        text = text.replace("relay_networks = 127.0.0.0/8\n", "relay_networks = 127.0.0.0/8\nfilters = dkim\n", 1)
        text += "\n" + FILTERS.format(key=key)
    return text


def run(work: Path, size: int, messages: int, sessions: int, reuse: bool, key: Path | None, check: bool) -> float:
    """One fresh relay process, one smtp-source run: messages per second."""
    rate, state, log = holdRun(
        work, "dkim", size, messages, sessions, reuse, lambda state, port: config(state, port, key)
    )
    if check and not any(
        b"DKIM-Signature:" in p.read_bytes()[:8192] for p in itertools.islice(state.rglob("*"), 200) if p.is_file()
    ):
        raise SystemExit(f"no DKIM-Signature found in the queue of {state}; see {log}")
    discardQueue(state, size)
    return rate


def measure(work: Path, rows: list[Row], sessions: int, rounds: int) -> None:
    """C{row.relay}: without the filter; C{row.postfix}: with it (the table names them)."""
    key = makeKey(work)
    run(work, 2048, 300, sessions, False, key, check=True)  # warm-up, and the check
    run(work, 2048, 300, sessions, False, None, check=False)
    interleave(
        rows,
        rounds,
        "dkim",
        ("off", "on"),
        lambda row: run(work, row.size, row.messages, sessions, row.reuse, None, check=False),
        lambda row: run(work, row.size, row.messages, sessions, row.reuse, key, check=False),
    )


def report(rows: list[Row], sessions: int, rounds: int) -> None:
    printVersus(
        f"durable acceptance with the dkim filter (RSA 2048) and without: smtp-source, {sessions} sessions,"
        f" {rounds} interleaved rounds; messages/s, median",
        rows,
        "off",
        "dkim",
        "on/off",
    )


if __name__ == "__main__":
    sys.exit(tableMain(__doc__.splitlines()[1], measure, report, sizes=DEFAULT_SIZES, require=requirePostfix))
