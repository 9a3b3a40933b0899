"""
What the benchmarks share: free ports, smtp-source, a relay process, and the
private Postfix of ../shared/tools/postfix-peer.  Everything on 127.0.0.1;
every process started is stopped by its PID.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
POSTFIX_PEER = ROOT.parent / "shared" / "tools" / "postfix-peer"
TWISTD = str(Path(sys.executable).parent / "twistd")

# What every benchmarked relay has; each bench adds its routes and the rest.
RELAY_BASE = """\
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
"""


SETTLE_SECONDS = 61.0


def addSettleOption(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--settle",
        type=float,
        default=SETTLE_SECONDS,
        metavar="SECONDS",
        help=f"wait this long for a quiet file system before measuring (default {SETTLE_SECONDS:.0f}; 0: don't)",
    )


def settle(seconds: float) -> None:
    """
    Start on a quiet file system.

    ext4 without a journal (this machine's root file system) checks every
    inode freed in the last 60 seconds (360 while its inode table block is
    unwritten) against each file it creates in that group: after something
    deleted thousands of files (a test run, the previous benchmark's clean-up)
    a file costs 10 to 40 times more to create, for a minute or more, and
    the more so for whichever server creates more files per message.
    Everything is written out first, so the 60 seconds apply, then we wait.
    The benchmarks themselves delete nothing until they are done.
    """
    if seconds <= 0:
        return
    print(f"settling: {seconds:.0f} s for the file system to forget recent deletions (--settle 0 skips)", flush=True)
    os.sync()
    time.sleep(seconds)


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


def tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
    if found is None:
        raise SystemExit(f"{name} is not installed (Debian's postfix package)")
    return found


def smtpSource(port: int, messages: int, sessions: int, size: int, reuse: bool, to: str) -> float:
    """Seconds smtp-source took to have every message acknowledged."""
    command = [tool("smtp-source"), "-s", str(sessions), "-l", str(size), "-m", str(messages)]
    command += ["-f", "bench@example.org", "-t", to]
    if reuse:
        command.insert(1, "-d")
    os.sync()  # every run starts with nothing of the previous one left to write
    started = time.monotonic()
    subprocess.run([*command, f"127.0.0.1:{port}"], check=True, timeout=600, capture_output=True)
    return time.monotonic() - started


class RelayProcess:
    """C{twistd -n relay} on a configuration text; a context manager."""

    def __init__(self, workdir: Path, config: str, port: int, log: Path) -> None:
        self.workdir = workdir
        self.port = port
        self.log = log
        self.configFile = workdir / "relay.ini"
        self.configFile.write_text(config)
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> RelayProcess:
        command = [TWISTD, "-n", "--pidfile=", "--logfile", str(self.log), "relay", "--config", str(self.configFile)]
        self.proc = subprocess.Popen(command, cwd=self.workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        waitListening(self.port)
        return self

    def __exit__(self, *exc: object) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


class PostfixPeer:
    """The private Postfix: accepts on C{port}, relays everything to [127.0.0.1]:C{nexthop}."""

    def __init__(self, directory: Path, port: int, nexthop: int) -> None:
        self.directory = directory
        self.port = port
        self.nexthop = nexthop

    def __enter__(self) -> PostfixPeer:
        subprocess.run(
            [str(POSTFIX_PEER), "start", str(self.directory), str(self.port), str(self.nexthop)],
            check=True,
            timeout=120,
            capture_output=True,
        )
        waitListening(self.port)
        return self

    def hold(self) -> None:
        subprocess.run([str(POSTFIX_PEER), "hold", str(self.directory)], check=True, timeout=60, capture_output=True)
        time.sleep(1)

    def queued(self) -> int:
        """Messages still in Postfix's queue (not yet delivered)."""
        spool = self.directory / "spool"
        total = 0
        for name in ("maildrop", "incoming", "active", "deferred", "hold"):
            for _, _, files in os.walk(spool / name):
                total += len(files)
        return total

    def __exit__(self, *exc: object) -> None:
        if self.directory.exists():
            subprocess.run([str(POSTFIX_PEER), "stop", str(self.directory)], timeout=60, capture_output=True)
