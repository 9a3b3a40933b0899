"""
A queue of any size: the relay's memory and its restart with a million held
messages (issue 12: RSS under 300 MB; after a SIGKILL and a restart, a new
message answered 250 within 2 s of the start).

1. Fill: C{--messages} messages of C{--size} bytes are committed to an empty
   queue through the store's own API (the C{filesystem} plugin's C{build},
   C{begin}, C{write}, C{commit}), in a process of their own, many commits in
   flight so that they share their syncs as the relay's would.  Nothing is
   faked: the queue is exactly what that many accepted messages leave.
2. The relay starts on it with C{[queue] hold = yes} (and otherwise its
   default configuration): how long until a new message gets 250, then its
   resident memory (and its queue worker's) while it settles.
3. SIGKILL; whether its queue worker goes too; a restart: how long from the
   start of the process until a new message gets 250, and the memory again.

The queue lives in a directory on disk (see C{common.workDirectory}: never a
tmpfs) and is removed at the end, the time that takes included in the output.
C{--messages 1000} is the smoke test the suite runs.

    .venv/bin/python bench/bigqueue.py [--messages 1000000] [--size 2048] [--keep]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import smtplib
import subprocess
import sys
import time
from pathlib import Path

from common import RelayProcess, freePort, holdConfig, relayEnvironment, rss, workDirectory
from postfixpeer import alive, children

RSS_TARGET = 300 * 1024 * 1024
RESTART_TARGET = 2.0
SETTLE = 10.0
"""Seconds the relay is watched after its first 250 while it takes in the queue."""


def fill(queue: Path, count: int, size: int, window: int) -> None:
    """
    Commit C{count} messages of C{size} bytes to the queue store at C{queue}
    through its plugin, C{window} commits in flight.  This is the one function
    that knows how to make a queue; it uses only the store contract
    (L{relay.interfaces.IQueueStore}), so any store plugin could be filled.
    """
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred, gatherResults
    from twisted.internet.threads import deferToThreadPool
    from twisted.logger import globalLogBeginner, textFileLogObserver

    # What the store logs (its worker's troubles, its sync statistics) goes
    # to stderr; our own progress lines to stdout.
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)

    from relay.envelope import Envelope, Recipient
    from relay.interfaces import IQueueStoreFactory
    from relay.plugin import PluginContext, find

    pool = reactor.getThreadPool()
    context = PluginContext(
        reactor=reactor,
        hostname="bench.relay.test",
        postmaster="postmaster@localhost",
        state_dir=queue.parent,
        section="queue",
        blocking=lambda f, *a, **kw: deferToThreadPool(reactor, pool, f, *a, **kw),
    )
    header = b"From: <bench@example.org>\r\nTo: <sink@localhost>\r\nSubject: held\r\n\r\n"
    line = b"x" * 76 + b"\r\n"
    body = (line * (size // len(line) + 1))[: max(0, size - len(header) - 2)] + b"\r\n"
    data = header + body
    started = time.monotonic()
    made = 0

    async def committer(store: object, share: range) -> None:
        nonlocal made
        for _ in share:
            incoming = store.begin()  # type: ignore[attr-defined]
            incoming.write(data)
            envelope = Envelope(
                queue_id=incoming.queue_id,
                sender="bench@example.org",
                recipients=[Recipient("sink@localhost")],
                received_at=time.time(),
                size=len(data),
                client_address="127.0.0.1",
                helo="bench",
            )
            await incoming.commit(envelope)
            made += 1
            if made % max(1, count // 10) == 0:
                rate = made / (time.monotonic() - started)
                print(f"  filled {made} of {count} ({rate:.0f}/s)", flush=True)

    async def run() -> None:
        store = find("filesystem", IQueueStoreFactory).build({"path": str(queue)}, context)
        try:
            await store.recover()
            shares = [range(i, count, window) for i in range(min(window, count))]
            await gatherResults([Deferred.fromCoroutine(committer(store, share)) for share in shares])
        finally:
            stopped = store.stop()
            if stopped is not None:
                await stopped

    failures = []

    def main() -> None:
        d = Deferred.fromCoroutine(run())
        d.addErrback(failures.append)
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(main)
    reactor.run()
    if failures:
        failures[0].raiseException()


def firstAcceptance(port: int, since: float, timeout: float = 120.0) -> float:
    """
    Send one message as soon as anything listens on C{port}: seconds from
    C{since} until it was answered 250 (a refused connection or a 4xx is
    tried again at once, a 5xx is an error).
    """
    deadline = time.monotonic() + timeout
    message = b"From: <probe@example.org>\r\nTo: <probe@localhost>\r\nSubject: new\r\n\r\nafter restart\r\n"
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
                client.sendmail("probe@example.org", ["probe@localhost"], message)
                return time.monotonic() - since
        except (OSError, smtplib.SMTPServerDisconnected, smtplib.SMTPConnectError) as e:
            last = e
        except smtplib.SMTPResponseException as e:
            if e.smtp_code >= 500:
                raise
            last = e
        time.sleep(0.01)
    raise SystemExit(f"no 250 within {timeout:.0f} s of the start: {last}")


def memory(pid: int, seconds: float) -> tuple[int, int, int]:
    """
    Watch C{pid} for C{seconds}: its highest resident memory seen, its peak
    (VmHWM) at the end, and the highest resident memory of its children
    (the queue worker).
    """
    deadline = time.monotonic() + seconds
    highest = workers = 0
    while True:
        highest = max(highest, rss(pid)[0])
        kids = 0
        for child in children(pid):
            try:
                kids += rss(child)[0]
            except (OSError, KeyError):
                pass
        workers = max(workers, kids)
        if time.monotonic() >= deadline:
            return highest, rss(pid)[1], workers
        time.sleep(0.2)


class QueueRelay(RelayProcess):
    """A relay whose log also tells when its queue was recovered, before it was counted."""

    PATTERNS = {**RelayProcess.PATTERNS, "opened": rb"recovered the queue"}


def recovery(relay: RelayProcess, began: float) -> str:
    """
    When the relay logged its queue's recovery (the listeners wait for it:
    where a slow start goes) and its count (the first scan's, which does not
    hold up the 250), if it did.
    """
    assert relay.counter is not None
    said = []
    for name, what in (("opened", "recovery"), ("recovered", "the count")):
        seen = relay.counter.firsts.get(name)
        if seen:
            said.append(f"{what} logged after {seen[0] - began:.2f} s")
    return "; " + ", ".join(said) if said else ""


def mb(size: int) -> str:
    return f"{size / 1024 / 1024:.0f} MB"


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def measure(work: Path, args: argparse.Namespace) -> bool:
    queue = work / "var" / "queue"
    queue.parent.mkdir(parents=True)
    print(f"filling {queue} with {args.messages} messages of {args.size} bytes", flush=True)
    started = time.monotonic()
    command = [sys.executable, __file__, "fill", str(queue), str(args.messages), str(args.size), str(args.window)]
    # In the work directory: the store's worker runs with -m, which puts the
    # current directory first on its path.
    subprocess.run(command, check=True, cwd=work, env=relayEnvironment(), timeout=args.fill_timeout)
    os.sync()
    filled = time.monotonic() - started
    print(f"filled in {filled:.0f} s ({args.messages / filled:.0f} messages/s, durable)", flush=True)

    port = freePort()
    text = holdConfig(work / "var", port)
    relay = QueueRelay(work, text, port, work / "relay-1.log", listenTimeout=args.timeout)
    began = time.monotonic()
    relay.start()
    ok = True
    try:
        assert relay.proc is not None
        first = firstAcceptance(port, began, args.timeout)
        print(f"first start: a new message got 250 {first:.2f} s after the start{recovery(relay, began)}", flush=True)
        highest, peak, worker = memory(relay.proc.pid, args.watch)
        ok &= peak < RSS_TARGET
        print(
            f"first start: relay RSS {mb(highest)} (peak {mb(peak)}; target under {mb(RSS_TARGET)}:"
            f" {verdict(peak < RSS_TARGET)}), queue worker {mb(worker)}, watched {args.watch:.0f} s",
            flush=True,
        )
        pid = relay.proc.pid
        workers = children(pid)
        relay.kill()
        deadline = time.monotonic() + 5
        while any(alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = [w for w in workers if alive(w)]
        if left:
            print(f"after SIGKILL: its children {left} still run 5 s later (killed now)", flush=True)
            for w in left:
                os.kill(w, signal.SIGKILL)
        else:
            print(f"after SIGKILL: its {len(workers)} child process(es) exited by themselves", flush=True)
    finally:
        relay.stop()

    relay = QueueRelay(work, text, port, work / "relay-2.log", listenTimeout=args.timeout)
    began = time.monotonic()
    relay.start()
    try:
        assert relay.proc is not None
        restart = firstAcceptance(port, began, args.timeout)
        ok &= restart <= RESTART_TARGET
        print(
            f"restart after SIGKILL: a new message got 250 {restart:.2f} s after the start"
            f" (target within {RESTART_TARGET:.0f} s: {verdict(restart <= RESTART_TARGET)}){recovery(relay, began)}",
            flush=True,
        )
        highest, peak, worker = memory(relay.proc.pid, args.watch)
        ok &= peak < RSS_TARGET
        print(
            f"restart: relay RSS {mb(highest)} (peak {mb(peak)}: {verdict(peak < RSS_TARGET)}),"
            f" queue worker {mb(worker)}, watched {args.watch:.0f} s",
            flush=True,
        )
        # What the relay says about its queue at start-up, for the record.
        for line in relay.log.read_text(errors="replace").splitlines():
            said = line.split("] ", 1)[-1]
            if re.search(r"recover|queue", said) and "accepted" not in said:
                print(f"  relay log: {said[:160]}")
    finally:
        relay.stop()
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--messages", type=int, default=1_000_000, help="queued messages (default: %(default)s)")
    parser.add_argument("--size", type=int, default=2048, help="bytes of each (default: %(default)s)")
    parser.add_argument("--window", type=int, default=256, help="commits in flight while filling")
    parser.add_argument("--watch", type=float, default=SETTLE, help="seconds to watch memory after each start")
    parser.add_argument("--timeout", type=float, default=120.0, help="longest wait for a 250 after a start")
    parser.add_argument("--fill-timeout", type=float, default=3600.0, help="longest the fill may take")
    parser.add_argument("--keep", action="store_true", help="leave the queue directory for a look")
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    args = parser.parse_args()
    work = workDirectory("relay-bigqueue-")
    print(f"queue on {work}", flush=True)
    try:
        ok = measure(work, args)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            started = time.monotonic()
            shutil.rmtree(work, ignore_errors=True)
            print(f"removed the queue in {time.monotonic() - started:.0f} s")
    return 1 if args.check and not ok else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["fill"]:
        queue, count, size, window = sys.argv[2], *map(int, sys.argv[3:6])
        fill(Path(queue), count, size, window)
    else:
        sys.exit(main())
