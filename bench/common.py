"""
What the benchmarks share: free ports, smtp-source, a relay process whose log
is counted as it is written, and the settling wait.  Everything runs on
127.0.0.1; every process started is stopped by its PID, every wait is bounded.

The relay is always run in its default configuration (etc/relay.ini's
defaults: the filesystem store, made durable by fsync), plus what a benchmark
must say: where to listen, where to route, and C{[queue] hold} for the
acceptance benchmark.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from postfixpeer import Unavailable, checkAvailable

ROOT = Path(__file__).resolve().parents[1]
TWISTD = str(Path(sys.executable).parent / "twistd")
TREE = os.environ.get("RELAY_BENCH_TREE")
"""Another source tree of relay to measure instead of this checkout (say, a
commit exported with C{git archive}): put first on the relay's C{PYTHONPATH},
it is where C{relay} and its twistd plugin are imported from."""


def relayEnvironment() -> dict[str, str]:
    environment = dict(os.environ)
    if TREE:
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, (TREE, environment.get("PYTHONPATH"))))
    return environment


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

# The acceptance benchmarks' relay: everything held, nothing delivered while
# measured.  [queue] is the last section, so that a bench can add its lines.
HOLD_CONFIG = (
    RELAY_BASE
    + """\
[routes]
localhost = local

[queue]
hold = yes
"""
)


def holdConfig(state: Path, port: int, queue: str = "") -> str:
    """L{HOLD_CONFIG} for one run; C{queue}: more lines of its [queue] section."""
    return HOLD_CONFIG.format(state=state, port=port) + queue


KB = 1024
MB = 1024 * 1024

SETTLE_SECONDS = 0.0


def addSettleOption(parser: argparse.ArgumentParser, default: float = SETTLE_SECONDS) -> None:
    parser.add_argument(
        "--settle",
        type=float,
        default=default,
        metavar="SECONDS",
        help=f"wait this long for a quiet file system before measuring (default {default:.0f}: don't; 61 to be sure)",
    )


def settle(seconds: float) -> None:
    """
    Start on a quiet file system, if asked to.

    ext4 without a journal (this machine's root file system) checks every
    inode freed in the last 60 seconds against each file it creates in that
    group: after something deleted thousands of files (a test run, say) a
    file costs more to create for a minute or so.  That weighed on whichever
    server created more files per message (Postfix, beside a store that
    recycled its files); now that the store, like Postfix, creates one file
    per message, it weighs on both alike and does not show: right after
    20,000 files were deleted, 2 KB acceptance measured 0.86x (relay 1143/s,
    Postfix 1331/s) without waiting, 0.83x (1134/s, 1382/s) after 61 s; 100 KB
    0.67x both ways.  So the default is not to wait.  Everything is written
    out first, so that the 60 seconds apply, then we wait.
    """
    if seconds <= 0:
        return
    print(f"settling: {seconds:.0f} s for the file system to forget recent deletions (--settle 0 skips)", flush=True)
    os.sync()
    time.sleep(seconds)


def requirePostfix() -> None:
    """Exit with one line unless a private Postfix and its smtp-source/smtp-sink can run here."""
    try:
        checkAvailable()
    except Unavailable as e:
        raise SystemExit(f"benchmark skipped: {e}") from None
    tool("smtp-source")
    tool("smtp-sink")


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def waitListening(port: int, timeout: float = 20.0, alive: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if alive is not None and alive.poll() is not None:
            raise SystemExit(f"the process meant to listen on 127.0.0.1:{port} exited with {alive.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.02)
    raise SystemExit(f"nothing listens on 127.0.0.1:{port}")


def tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
    if found is None:
        raise SystemExit(f"benchmark skipped: {name} is not installed (Debian's postfix package)")
    return found


def smtpSource(port: int, messages: int, sessions: int, size: int, reuse: bool, to: str) -> float:
    """
    Seconds smtp-source took to have every message acknowledged.  C{reuse}:
    all of a session's messages over one connection (C{-d}); otherwise a new
    connection per message.
    """
    command = [tool("smtp-source"), "-s", str(sessions), "-l", str(size), "-m", str(messages)]
    command += ["-f", "bench@example.org", "-t", to]
    if reuse:
        command.insert(1, "-d")
    os.sync()  # every run starts with nothing of the previous one left to write
    started = time.monotonic()
    subprocess.run([*command, f"127.0.0.1:{port}"], check=True, timeout=900, capture_output=True)
    return time.monotonic() - started


class LogCounter:
    """
    Reads a process's log from a pipe as it is written, into a file, and
    counts the lines that match each pattern; a thread of its own.
    """

    def __init__(self, stream: IO[bytes], path: Path, patterns: dict[str, bytes]) -> None:
        self.path = path
        self.patterns = {name: re.compile(pattern) for name, pattern in patterns.items()}
        self.counts = dict.fromkeys(patterns, 0)
        self.firsts: dict[str, tuple[float, bytes]] = {}
        self._changed = threading.Condition()
        self._stream = stream
        self._thread = threading.Thread(target=self._read, name=f"log {path.name}", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        with open(self.path, "ab") as out:
            for line in self._stream:
                out.write(line)
                out.flush()
                with self._changed:
                    for name, pattern in self.patterns.items():
                        if pattern.search(line):
                            self.counts[name] += 1
                            self.firsts.setdefault(name, (time.monotonic(), line))
                    self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait(self, name: str, count: int, timeout: float) -> float:
        """
        Wait until C{count} lines matched C{name}; the monotonic time it
        was seen.  Exits with a message after C{timeout} seconds.
        """
        deadline = time.monotonic() + timeout
        with self._changed:
            while self.counts[name] < count:
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    raise SystemExit(
                        f"{self.counts[name]} of {count} {name!r} lines after {timeout:.0f} s; see {self.path}"
                    )
                self._changed.wait(min(left, 1.0))
            return time.monotonic()

    def close(self, timeout: float = 10.0) -> None:
        self._thread.join(timeout)


class RelayProcess:
    """
    C{twistd -n relay} on a configuration text; a context manager.  Its log
    goes to C{log} and its C{accepted} and C{delivered} lines are counted as
    they come (L{LogCounter}).
    """

    PATTERNS = {
        "accepted": rb" event=accepted queue_id=",
        "delivered": rb" event=delivered queue_id=",
        "recovered": rb"recovered \d+",
    }

    def __init__(self, workdir: Path, config: str, port: int, log: Path, listenTimeout: float = 60.0) -> None:
        self.workdir = workdir
        self.port = port
        self.log = log
        self.listenTimeout = listenTimeout
        self.configFile = workdir / f"{log.stem}.ini"
        self.configFile.write_text(config)
        self.proc: subprocess.Popen[bytes] | None = None
        self.counter: LogCounter | None = None

    def start(self) -> None:
        command = [TWISTD, "-n", "--pidfile=", "--logfile", "-", "relay", "--config", str(self.configFile)]
        self.proc = subprocess.Popen(
            command, cwd=self.workdir, env=relayEnvironment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        assert self.proc.stdout is not None
        self.counter = LogCounter(self.proc.stdout, self.log, self.PATTERNS)

    def __enter__(self) -> RelayProcess:
        self.start()
        assert self.proc is not None
        try:
            waitListening(self.port, self.listenTimeout, alive=self.proc)
        except SystemExit as e:
            self.stop()
            raise SystemExit(f"{e}; the end of its log ({self.log}):\n{self.tail()}") from None
        except BaseException:
            self.stop()
            raise
        return self

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def count(self, name: str) -> int:
        assert self.counter is not None
        return self.counter.counts[name]

    def wait(self, name: str, count: int, timeout: float = 600.0) -> float:
        assert self.counter is not None
        return self.counter.wait(name, count, timeout)

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.kill()
        proc.wait(timeout=10)
        self._closeLog()

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        self._closeLog()

    def _closeLog(self) -> None:
        if self.counter is not None:
            self.counter.close()

    def __exit__(self, *exc: object) -> None:
        self.stop()


RUNS = itertools.count()


def holdRun(
    work: Path,
    name: str,
    size: int,
    messages: int,
    sessions: int,
    reuse: bool,
    config: Callable[[Path, int], str] = holdConfig,
) -> tuple[float, Path, Path]:
    """
    One fresh relay process in hold mode on an empty queue, one smtp-source
    run: messages per second, the run's state directory and its log, for the
    checks a bench makes afterwards.  C{config(state, port)}: the relay's
    configuration.  Every 250 must show up as an C{accepted} line and nothing
    may be delivered, or the run fails.
    """
    number = next(RUNS)
    state = work / f"{name}-{number}"
    port = freePort()
    with RelayProcess(work, config(state, port), port, work / f"{name}-{number}.log") as relay:
        seconds = smtpSource(port, messages, sessions, size, reuse, "sink@localhost")
        # Logged as the 250 goes out: a moment at most after smtp-source saw it.
        relay.wait("accepted", messages, timeout=30)
        if relay.count("delivered"):
            raise SystemExit(f"relay delivered in hold mode; see {relay.log}")
    return messages / seconds, state, relay.log


# A measured run's queue is thrown away only when it holds big messages.
DISCARD_FROM = 512 * KB


def discardQueue(state: Path, size: int) -> None:
    """
    Throw away a measured run's queue of big messages and write that out,
    outside the measured time; keep the others to the end.  Kept, the 1 MB
    runs' queues grew to gigabytes over a full ``make bench`` and this
    machine's disk slowed in the later rounds (1 MB -d acceptance 1.19,
    1.23, 0.84, 0.87, 0.80 round by round, against 1.06-1.21 for the same
    rows run alone).  Deleting the thousands of files of small-message runs
    costs the next runs instead: ext4 without a journal checks each new
    inode against those freed in the last minute (2 KB -d fell from 1.7x to
    1.27x when every queue was deleted).  A 1 MB run is 200 files.
    """
    if size < DISCARD_FROM:
        return
    shutil.rmtree(state)
    os.sync()


def rss(pid: int) -> tuple[int, int]:
    """Resident and peak resident memory of C{pid}, in bytes."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["VmHWM"]


def sizeLabel(size: int) -> str:
    if size >= MB and size % MB == 0:
        return f"{size // MB} MB"
    if size >= KB and size % KB == 0:
        return f"{size // KB} KB"
    return f"{size} B"


def parseSize(text: str) -> int:
    """C{2k}, C{100K}, C{1m}, C{2048}: bytes."""
    text = text.strip().upper().removesuffix("B")
    factor = {"K": KB, "M": MB}.get(text[-1:], 1)
    return int(text.rstrip("KM")) * factor


class Row:
    """One line of a comparison table: a message size and a connection mode, its rounds."""

    def __init__(self, size: int, messages: int, reuse: bool) -> None:
        self.size = size
        self.messages = messages
        self.reuse = reuse
        self.relay: list[float] = []
        self.postfix: list[float] = []

    @property
    def mode(self) -> str:
        return "-d" if self.reuse else "new conn"

    def ratios(self) -> list[float]:
        # Each round's two runs are seconds apart, so they share the disk's
        # mood; the median of the rounds' ratios is the figure to quote.
        return [a / b for a, b in zip(self.relay, self.postfix, strict=True)]


def printTable(title: str, rows: list[Row], target: Callable[[int], float]) -> None:
    """
    The medians of each row, their ratio (median of the rounds' ratios), and
    MB/s from 100 KB up, where bytes are what counts.
    """
    print()
    print(title)
    header = ("size", "mode", "messages", "relay/s", "postfix/s", "ratio", "target", "relay MB/s", "postfix MB/s")
    print("{:<7} {:<8} {:>8} {:>8} {:>9} {:>6} {:>6} {:>10} {:>12}  ratio per round".format(*header))
    for row in rows:
        ours, theirs = statistics.median(row.relay), statistics.median(row.postfix)
        ratio = statistics.median(row.ratios())
        if row.size >= 100 * KB:
            mbs = f"{ours * row.size / MB:>10.1f} {theirs * row.size / MB:>12.1f}"
        else:
            mbs = f"{'':>10} {'':>12}"
        rounds = " ".join(f"{r:.2f}" for r in row.ratios())
        print(
            f"{sizeLabel(row.size):<7} {row.mode:<8} {row.messages:>8} {ours:>8.0f} {theirs:>9.0f}"
            f" {ratio:>5.2f}x {target(row.size):>5.1f}x {mbs}  {rounds}"
        )
    sys.stdout.flush()


def interleave(
    rows: list[Row],
    rounds: int,
    label: str,
    names: tuple[str, str],
    first: Callable[[Row], float],
    second: Callable[[Row], float],
) -> None:
    """
    Fill C{row.relay} with C{first}'s runs and C{row.postfix} with
    C{second}'s (messages per second), C{rounds} of each, taking turns:
    within a round each row's two runs are back to back, so that the round's
    ratio compares two runs seconds apart that share the disk's mood, and who
    goes first alternates from round to round.  C{names}: the two sides in
    the progress lines.
    """
    for number in range(rounds):
        for row in rows:
            ours = (row.relay, first)
            theirs = (row.postfix, second)
            for rates, run in (ours, theirs) if number % 2 == 0 else (theirs, ours):
                rates.append(run(row))
            print(
                f"  {label} round {number + 1}/{rounds} {sizeLabel(row.size)} {row.mode}:"
                f" {names[0]} {row.relay[-1]:.0f}/s {names[1]} {row.postfix[-1]:.0f}/s",
                flush=True,
            )


def printVersus(title: str, rows: list[Row], base: str, other: str, ratio: str) -> None:
    """
    A table of relay against relay (C{row.relay}: the C{base} runs,
    C{row.postfix}: the C{other} runs), with no target: the medians, the
    median of the rounds' C{other}/C{base} ratios, and MB/s from 100 KB up.
    """
    print()
    print(title)
    width = max(8, len(f"{base} MB/s"), len(f"{other} MB/s"))
    header = ("size", "mode", "messages", f"{base}/s", f"{other}/s", ratio, f"{base} MB/s", f"{other} MB/s")
    print(
        f"{header[0]:<7} {header[1]:<8} {header[2]:>8} {header[3]:>8} {header[4]:>8} {header[5]:>6}"
        f" {header[6]:>{width}} {header[7]:>{width}}  {ratio} per round"
    )
    for row in rows:
        ours, theirs = statistics.median(row.relay), statistics.median(row.postfix)
        ratios = [b / a for a, b in zip(row.relay, row.postfix, strict=True)]
        if row.size >= 100 * KB:
            mbs = f"{ours * row.size / MB:>{width}.1f} {theirs * row.size / MB:>{width}.1f}"
        else:
            mbs = " " * (2 * width + 1)
        print(
            f"{sizeLabel(row.size):<7} {row.mode:<8} {row.messages:>8} {ours:>8.0f} {theirs:>8.0f}"
            f" {statistics.median(ratios):>5.2f}x {mbs}  {' '.join(f'{r:.2f}' for r in ratios)}"
        )
    sys.stdout.flush()


def target(size: int) -> float:
    """Issue 12: at least 1.5x Postfix for small messages, at least equal from 100 KB."""
    return 1.5 if size < 100 * KB else 1.0


SIZES = (2 * KB, 100 * KB, MB)


def defaultMessages(size: int) -> int:
    """Enough messages for a run of a few seconds at each size, no more: the whole of make bench stays short."""
    if size <= 16 * KB:
        return 2000
    if size <= 256 * KB:
        return 1000
    return 200


def addTableOptions(parser: argparse.ArgumentParser, rounds: int) -> None:
    parser.add_argument(
        "--sizes",
        default=",".join(sizeLabel(s).replace(" ", "") for s in SIZES),
        help="message sizes, comma-separated (default: %(default)s)",
    )
    parser.add_argument(
        "--messages", type=int, help="messages per run (default: 2000 up to 16 KB, 1000 up to 256 KB, 200 above)"
    )
    parser.add_argument("--sessions", type=int, default=20, help="concurrent smtp-source sessions (default: 20)")
    parser.add_argument(
        "--rounds", type=int, default=rounds, help="interleaved relay/Postfix rounds (default: %(default)s)"
    )
    parser.add_argument(
        "--modes",
        choices=("new", "reuse", "both"),
        default="both",
        help="a new connection per message, all of a session's messages on one (smtp-source -d), or both rows",
    )


def tableRows(args: argparse.Namespace) -> list[Row]:
    sizes = [parseSize(s) for s in args.sizes.split(",") if s.strip()]
    modes = {"new": (False,), "reuse": (True,), "both": (False, True)}[args.modes]
    return [Row(size, args.messages or defaultMessages(size), reuse) for size in sizes for reuse in modes]


def tableMain(
    description: str,
    measure: Callable[[Path, list[Row], int, int], None],
    report: Callable[[list[Row], int, int], None],
    sizes: str | None = None,
    require: Callable[[], None] = requirePostfix,
) -> int:
    """
    A table bench run alone: its options, C{require} (exits with one line
    when something is missing), the settling wait, C{measure} in a fresh work
    directory removed afterwards, then C{report}.  C{sizes}: the default
    C{--sizes} when not all of L{SIZES}.
    """
    parser = argparse.ArgumentParser(description=description)
    addTableOptions(parser, rounds=3)
    addSettleOption(parser)
    if sizes is not None:
        parser.set_defaults(sizes=sizes)
    args = parser.parse_args()
    require()
    rows = tableRows(args)
    settle(args.settle)
    work = workDirectory()
    try:
        measure(work, rows, args.sessions, args.rounds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(rows, args.sessions, args.rounds)
    return 0


def filesystemOf(path: Path) -> tuple[str, str]:
    """The mount point and type of the file system that holds C{path}."""
    path = path.resolve()
    best = ("/", "?")
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        mount = fields[1].replace("\\040", " ")
        if path.is_relative_to(mount) and len(mount) >= len(best[0]):
            best = (mount, fields[2])
    return best


def workDirectory(prefix: str = "relay-bench-") -> Path:
    """
    A fresh directory for a benchmark's queues and logs, on a disk: C{$BENCH_DIR}
    if set, else the temporary directory unless it is a tmpfs (where fsync
    costs nothing and a benchmark would measure nothing), else /var/tmp.
    """
    parent = os.environ.get("BENCH_DIR")
    if parent is None:
        parent = tempfile.gettempdir()
        if filesystemOf(Path(parent))[1] in ("tmpfs", "ramfs"):
            parent = "/var/tmp"
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(work, 0o755)
    return work
