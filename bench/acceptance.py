"""
Durable acceptance throughput: smtp-source against relay and against a private
Postfix (../shared/tools/postfix-peer in hold mode), in the same run, on the
same machine. Prints one table.

Both sides fsync before 250. relay also delivers what it accepts into maildirs
while it is measured (it has no hold mode), so its figure is conservative.

    .venv/bin/python bench/acceptance.py [--messages 2000] [--sessions 20] [--size 2048]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
POSTFIX_PEER = ROOT.parent / "shared" / "tools" / "postfix-peer"
TWISTD = str(Path(sys.executable).parent / "twistd")

CONFIG = """\
[relay]
hostname = bench.relay.test
postmaster = postmaster@localhost
state_dir = {state}

[listener:smtp]
endpoint = tcp:{port}:interface=127.0.0.1

[policy]
local_domains = localhost
relay_networks = 127.0.0.0/8

[delivery:local]
plugin = maildir

[routes]
localhost = local
"""


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def waitListening(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on 127.0.0.1:{port}")


def smtpSource(port: int, messages: int, sessions: int, size: int, reuse: bool) -> float:
    tool = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
    command = [
        tool,
        "-s",
        str(sessions),
        "-l",
        str(size),
        "-m",
        str(messages),
        "-f",
        "bench@example.org",
        "-t",
        "sink@localhost",
    ]
    if reuse:
        command.insert(1, "-d")
    started = time.monotonic()
    subprocess.run([*command, f"127.0.0.1:{port}"], check=True, timeout=600, capture_output=True)
    return time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--size", type=int, default=2048)
    args = parser.parse_args()
    rows: list[tuple[str, str, float]] = []
    work = Path(tempfile.mkdtemp(prefix="relay-bench-"))
    os.chmod(work, 0o755)
    relayPort, postfixPort = freePort(), freePort()
    (work / "relay.ini").write_text(CONFIG.format(state=work / "var", port=relayPort))
    relay = subprocess.Popen(
        [
            TWISTD,
            "-n",
            "--pidfile=",
            "--logfile",
            str(work / "relay.log"),
            "relay",
            "--config",
            str(work / "relay.ini"),
        ],
        cwd=work,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    postfix = work / "postfix"
    try:
        waitListening(relayPort)
        for reuse in (False, True):
            rows.append(
                (
                    "relay",
                    "-d" if reuse else "new conn",
                    smtpSource(relayPort, args.messages, args.sessions, args.size, reuse),
                )
            )
        subprocess.run(
            [str(POSTFIX_PEER), "start", str(postfix), str(postfixPort), str(freePort())],
            check=True,
            timeout=120,
            capture_output=True,
        )
        subprocess.run([str(POSTFIX_PEER), "hold", str(postfix)], check=True, timeout=60, capture_output=True)
        time.sleep(1)
        for reuse in (False, True):
            rows.append(
                (
                    "postfix (hold)",
                    "-d" if reuse else "new conn",
                    smtpSource(postfixPort, args.messages, args.sessions, args.size, reuse),
                )
            )
    finally:
        relay.send_signal(signal.SIGTERM)
        try:
            relay.wait(timeout=30)
        except subprocess.TimeoutExpired:
            relay.kill()
            relay.wait(timeout=10)
        if postfix.exists():
            subprocess.run([str(POSTFIX_PEER), "stop", str(postfix)], timeout=60, capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    print(f"durable acceptance: {args.messages} messages of {args.size} bytes, {args.sessions} sessions (smtp-source)")
    print(f"{'server':<16} {'mode':<10} {'seconds':>8} {'msg/s':>8}")
    rates = {}
    for server, mode, seconds in rows:
        rates[(server, mode)] = args.messages / seconds
        print(f"{server:<16} {mode:<10} {seconds:>8.2f} {args.messages / seconds:>8.0f}")
    for mode in ("new conn", "-d"):
        ratio = rates[("relay", mode)] / rates[("postfix (hold)", mode)]
        print(f"relay / postfix ({mode}): {ratio:.2f}x   (target: 1.5x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
