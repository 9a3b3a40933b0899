"""
A private Postfix on loopback, the reference the benchmarks compare against.

It runs from a directory of its own (configuration, queue, data and log under
it), listens on 127.0.0.1 only, and relays everything to [127.0.0.1]:NEXTHOP;
the system's Postfix, if any, is not touched.  Needs root (Postfix's master
runs as root and its daemons as the C{postfix} user) and Debian's C{postfix}
package.  It is started with C{postfix start} and stopped by the PID of its
master process and of the master's children, every wait bounded.

As a command, for trying it by hand::

    python bench/postfixpeer.py start DIR LISTEN_PORT NEXTHOP_PORT [--hold]
    python bench/postfixpeer.py stop DIR
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

MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {dir}/spool
data_directory = {dir}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = peer.example.test
mydomain = example.test
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mydestination =
mynetworks = 127.0.0.0/8
relayhost = [127.0.0.1]:{nexthop}
smtpd_relay_restrictions = permit_mynetworks, reject
smtp_tls_security_level = none
smtpd_tls_security_level = none
default_process_limit = 100
smtpd_client_connection_rate_limit = 0
default_destination_concurrency_limit = 20
smtp_connection_cache_on_demand = yes
maillog_file_prefixes = {dir}
maillog_file = {dir}/maillog
"""

HOLD = "smtpd_end_of_data_restrictions = check_client_access static:hold\n"
"""Accept and queue every message, fsync before 250 as always, but put it on
hold: nothing is delivered, so a run times durable acceptance alone."""

QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")


class Unavailable(Exception):
    """Postfix cannot run here (not root, or not installed); the text says why."""


def postfixTool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin")
    if found is None:
        raise Unavailable(f"{name} is not installed (Debian's postfix package: apt-get install postfix)")
    return found


def checkAvailable() -> None:
    """
    Raise L{Unavailable} unless a private Postfix can be started here.
    """
    if os.geteuid() != 0:
        raise Unavailable("a private Postfix needs root (its master runs as root, its daemons as user postfix)")
    postfixTool("postfix")
    if not Path("/etc/postfix/master.cf").exists():
        raise Unavailable("/etc/postfix/master.cf is missing (Debian's postfix package)")
    try:
        import pwd

        pwd.getpwnam("postfix")
    except KeyError:
        raise Unavailable("there is no user postfix (Debian's postfix package creates it)") from None


def alive(pid: int) -> bool:
    """Whether C{pid} is a process that has not exited (a zombie has)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def children(pid: int) -> list[int]:
    """The processes whose parent is C{pid}."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rpartition(")")[2].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def _waitGone(pids: list[int], timeout: float) -> list[int]:
    """Wait until none of C{pids} is alive; those still alive after C{timeout}."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = [pid for pid in pids if alive(pid)]
        if not left:
            return []
        time.sleep(0.05)
    return [pid for pid in pids if alive(pid)]


def _signal(pids: list[int], number: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, number)
        except ProcessLookupError:
            pass


def waitListening(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


class PostfixPeer:
    """
    The private Postfix: accepts on 127.0.0.1:C{port}, relays everything to
    [127.0.0.1]:C{nexthop}, or, with C{hold}, keeps everything on hold.  A
    context manager: started on entry, stopped on exit; the directory is the
    caller's to remove.
    """

    def __init__(self, directory: Path, port: int, nexthop: int, hold: bool = False) -> None:
        self.directory = directory.resolve()
        self.port = port
        self.nexthop = nexthop
        self.hold = hold
        self.master: int | None = None
        self._maillog = 0
        self._sent = 0

    @property
    def etc(self) -> Path:
        return self.directory / "etc"

    def _postfix(self, *args: str, timeout: float = 60) -> None:
        result = subprocess.run(
            [postfixTool("postfix"), "-c", str(self.etc), *args], timeout=timeout, capture_output=True, text=True
        )
        if result.returncode != 0:
            raise RuntimeError(f"postfix {' '.join(args)} failed: {(result.stderr or result.stdout).strip()}")

    def start(self) -> None:
        checkAvailable()
        for name in ("etc", "spool", "data"):
            (self.directory / name).mkdir(parents=True, exist_ok=True)
        shutil.chown(self.directory / "data", user="postfix")
        # Postfix's daemons (user postfix) must reach their directories, and
        # tempfile.mkdtemp makes folders only their owner may enter.
        for folder in (self.directory, self.directory.parent):
            os.chmod(folder, os.stat(folder).st_mode | 0o111)
        # Debian's master.cf, with the public smtpd replaced by a loopback one.
        lines = []
        for line in Path("/etc/postfix/master.cf").read_text().splitlines():
            fields = line.split()
            if len(fields) > 1 and fields[0] == "smtp" and fields[1] == "inet":
                line = "#" + line
            lines.append(line)
        lines.append(f"127.0.0.1:{self.port} inet n - n - - smtpd")
        (self.etc / "master.cf").write_text("\n".join(lines) + "\n")
        main = MAIN_CF.format(dir=self.directory, nexthop=self.nexthop)
        (self.etc / "main.cf").write_text(main + (HOLD if self.hold else ""))
        self._postfix("check")
        self._postfix("start", timeout=120)
        pidFile = self.directory / "spool" / "pid" / "master.pid"
        try:
            self.master = int(pidFile.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            self.stop()
            raise RuntimeError(f"postfix started but left no pid in {pidFile}") from None
        if not waitListening(self.port, 20):
            self.stop()
            raise RuntimeError(f"postfix: nothing listens on 127.0.0.1:{self.port}")

    def stop(self) -> None:
        """
        Stop the master by its PID, then whatever of its children is left,
        waiting a bounded time for each (SIGTERM, then SIGKILL).
        """
        master, self.master = self.master, None
        if master is None:
            pidFile = self.directory / "spool" / "pid" / "master.pid"
            try:
                master = int(pidFile.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                return
        if not alive(master):
            return
        daemons = children(master)
        _signal([master], signal.SIGTERM)
        left = _waitGone([master, *daemons], 20)
        if left:
            _signal(left, signal.SIGKILL)
            left = _waitGone(left, 10)
        if left:
            raise RuntimeError(f"postfix processes {left} did not exit")

    def __enter__(self) -> PostfixPeer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def queueIDs(self) -> set[str]:
        """The queue ids of the messages in Postfix's queue (held ones included)."""
        found: set[str] = set()
        for name in QUEUES:
            for _, _, files in os.walk(self.directory / "spool" / name):
                found.update(files)
        return found

    def deleteQueued(self, ids: set[str]) -> None:
        """Delete these queued messages, as C{postsuper -d -} does with ids on its input."""
        if not ids:
            return
        result = subprocess.run(
            [postfixTool("postsuper"), "-c", str(self.etc), "-d", "-"],
            input="".join(f"{queueID}\n" for queueID in sorted(ids)),
            timeout=120,
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise SystemExit(f"postsuper -d failed: {result.stderr.strip()}")

    def queued(self) -> int:
        """Messages in Postfix's queue: received, not yet delivered (held ones included)."""
        total = 0
        spool = self.directory / "spool"
        for name in QUEUES:
            for _, _, files in os.walk(spool / name):
                total += len(files)
        return total

    def sent(self) -> int:
        """
        Deliveries logged so far (C{status=sent}), read incrementally from the
        maillog, so that polling it costs what is new, not the whole log.
        """
        try:
            with open(self.directory / "maillog", "rb") as log:
                log.seek(self._maillog)
                text = log.read()
        except FileNotFoundError:
            return self._sent
        complete = text.rfind(b"\n") + 1
        self._maillog += complete
        self._sent += text[:complete].count(b" status=sent ")
        return self._sent


def main() -> int:
    parser = argparse.ArgumentParser(description="a private Postfix on loopback, for the benchmarks")
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("start")
    start.add_argument("directory", type=Path)
    start.add_argument("port", type=int)
    start.add_argument("nexthop", type=int)
    start.add_argument("--hold", action="store_true", help="keep every message on hold (deliver nothing)")
    stop = commands.add_parser("stop")
    stop.add_argument("directory", type=Path)
    args = parser.parse_args()
    try:
        options = vars(args)
        peer = PostfixPeer(
            args.directory, options.get("port", 0), options.get("nexthop", 0), options.get("hold", False)
        )
        if args.command == "start":
            peer.start()
            print(f"postfix master {peer.master} on 127.0.0.1:{peer.port}")
        else:
            peer.stop()
    except (Unavailable, RuntimeError) as e:
        print(f"postfixpeer: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
