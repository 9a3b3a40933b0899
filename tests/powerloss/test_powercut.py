"""
Power cuts under load: the relay's one promise, checked on a file system that
keeps only what POSIX promises (strictfs.py).

The relay runs with its state_dir on a strictfs mount and relays everything to
an SMTP sink outside the mount.  Client threads send messages, each with a
unique id in its sender, its headers and its body, to a random one to three of
eight recipients.  At a random moment (during start-up and recovery too) the
power is cut: the mount freezes and writes out what was durable, the relay and
its queue worker are killed.  The next round mounts a new strictfs started from
that tree and a new relay on it: a restart after the cut, whose own recovery
can be cut in turn.  After the last cut the relay drains, and then:

- every message that got 250 was delivered to each of its recipients, byte for
  byte (after the relay's Received header);
- no delivery carries another message's content, or goes to a recipient the
  message did not have: a mix-up, the worst thing a relay can do;
- duplicates (deliveries repeated because their removal was not yet durable)
  are counted and printed, never a failure.

The strictfs is mounted anew for each life rather than the relay being run on
the plain materialised tree, so that what the restarted relay does (recovery,
redelivery) is held to the same rules and can itself be cut.

POWERLOSS_SEED repeats a run; POWERLOSS_CUTS, POWERLOSS_MODES (strict, torn,
stale), POWERLOSS_QUEUE (more [queue] lines) and POWERLOSS_RELAY_SOURCE (run
the relay of another checkout) vary it.
"""

from __future__ import annotations

import os
import random
import re
import signal
import smtplib
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from fusemount import StrictMount, waitUntil
from peers import Handler, SMTPPeer
from relayproc import TWISTD, children, freePort, listening, smarthostConfig

pytestmark = pytest.mark.integration

CUTS = int(os.environ.get("POWERLOSS_CUTS", "24"))
MODES = os.environ.get("POWERLOSS_MODES", "strict torn stale").split()
QUEUE = os.environ.get("POWERLOSS_QUEUE", "").replace("\\n", "\n")
SOURCE = os.environ.get("POWERLOSS_RELAY_SOURCE")
CLIENTS = 4
RECIPIENTS = [f"u{i}@sink.test" for i in range(8)]
# Many messages of one size: a data file holding another message's bytes of the
# same length must not pass for the right one.
SIZES = (800, 2000, 2000, 2000, 2000, 6000, 6000, 60_000, 300_000)
DEFER = 0.1  # the sink defers this share of RCPTs, so recipients' states are updated
CUT_AFTER = (0.3, 3.5)  # seconds after the relay starts
DRAIN = 90.0
STALLED = 15.0  # seconds without a delivery after which the drain gives up
VENV = str(Path(TWISTD).parent).encode()
ID = re.compile(rb"X-Powerloss-Id: (m[0-9a-z-]+)\r\n")
SENDER = re.compile(r"^s-(m[0-9a-z-]+)@client\.test$")
RECEIVED = re.compile(rb"\A(?:Received: [^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*)+\Z")


@dataclass
class Message:
    mid: str
    recipients: list[str]
    body: bytes
    acked: bool = False

    @property
    def sender(self) -> str:
        return f"s-{self.mid}@client.test"


def makeMessage(mid: str, rng: random.Random) -> Message:
    recipients = rng.sample(RECIPIENTS, rng.randint(1, 3))
    size = rng.choice(SIZES)
    head = (
        f"From: <s-{mid}@client.test>\r\nTo: {', '.join(recipients)}\r\nSubject: power cut test {mid}\r\n"
        f"X-Powerloss-Id: {mid}\r\n\r\n"
    ).encode()
    line = (mid.encode() + b" ") * 8
    lines = []
    length = len(head)
    while length < size:
        text = line[: rng.randint(20, 76)] + b"\r\n"
        lines.append(text)
        length += len(text)
    return Message(mid, recipients, head + b"".join(lines))


@dataclass
class Book:
    """Every message a client sent, by id."""

    rng: random.Random
    messages: dict[str, Message] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    count: int = 0

    def new(self, life: int) -> Message:
        with self.lock:
            self.count += 1
            message = makeMessage(f"m{life}-{self.count}", self.rng)
            self.messages[message.mid] = message
            return message


def client(port: int, life: int, book: Book, stop: threading.Event) -> None:
    """Send messages until told to stop; a message that got 250 is marked acknowledged."""
    while not stop.is_set():
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as session:
                while not stop.is_set():
                    message = book.new(life)
                    try:
                        refused = session.sendmail(message.sender, message.recipients, message.body)
                    except smtplib.SMTPResponseException:
                        continue  # a 4xx or 5xx: not acknowledged, the session goes on
                    message.recipients = [r for r in message.recipients if r not in refused]
                    message.acked = bool(message.recipients)
        except (OSError, smtplib.SMTPException):
            stop.wait(0.05)  # refused, reset or killed: try again while the life lasts


class RelayProcess:
    """The relay in a session of its own: the cut kills it and its queue worker together."""

    def __init__(self, workdir: Path, config: Path, port: int, life: int) -> None:
        env = dict(os.environ)
        if SOURCE:
            env["PYTHONPATH"] = SOURCE + os.pathsep + env.get("PYTHONPATH", "")
        self.port = port
        self.log = workdir / f"twistd-{life}.log"
        command = [TWISTD, "-n", "--pidfile=", "--logfile", str(self.log), "relay", "--config", str(config)]
        with open(workdir / f"twistd-{life}.out", "wb") as output:
            self.proc = subprocess.Popen(
                command,
                cwd=workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=output,
                start_new_session=True,
            )

    def descendants(self) -> list[int]:
        """Its children and theirs, and whatever else is left in its session (a worker whose parent died)."""
        found, todo = [], [self.proc.pid]
        while todo:
            for pid in children(todo.pop(), b""):
                found.append(pid)
                todo.append(pid)
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) in found:
                continue
            try:
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
                ours = VENV in (entry / "cmdline").read_bytes()  # started by this interpreter
            except OSError:
                continue
            if int(fields[3]) == self.proc.pid and ours:
                found.append(int(entry.name))
        return found

    def kill(self) -> None:
        """SIGKILL the relay and everything it started, by their PIDs."""
        running = self.proc.poll() is None
        if running:
            os.kill(self.proc.pid, signal.SIGSTOP)  # no new worker while we look for them
        for pid in [self.proc.pid] * running + self.descendants():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def logTail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""


@dataclass
class Verdict:
    acked: int = 0
    unacked_delivered: int = 0
    deliveries: int = 0
    duplicates: int = 0
    bounces: int = 0
    lost: list[str] = field(default_factory=list)
    mixups: list[str] = field(default_factory=list)
    damaged: list[str] = field(default_factory=list)


def judge(book: Book, received: list) -> Verdict:
    """Compare what the sink received with what the clients were told."""
    verdict = Verdict(acked=sum(m.acked for m in book.messages.values()))
    got: dict[str, dict[str, int]] = {}
    for delivery in received:
        verdict.deliveries += 1
        ids = [i.decode() for i in ID.findall(delivery.data)]
        if delivery.sender == "":
            verdict.bounces += 1
            for mid in ids:
                owner = book.messages.get(mid)
                if owner is None or delivery.recipients != [owner.sender]:
                    verdict.mixups.append(f"a bounce to {delivery.recipients} returns {mid}")
            continue
        match = SENDER.match(delivery.sender)
        envelope = book.messages.get(match.group(1)) if match else None
        if envelope is None:
            verdict.mixups.append(f"delivery from unknown sender {delivery.sender!r} to {delivery.recipients}")
            continue
        strangers = sorted(set(delivery.recipients) - set(envelope.recipients))
        if strangers:
            verdict.mixups.append(f"{envelope.mid} went to {strangers}, not its recipients {envelope.recipients}")
        if ids != [envelope.mid]:
            verdict.mixups.append(f"{envelope.mid}'s envelope delivered content of {ids or 'no message'}")
            continue
        prefix = delivery.data[: len(delivery.data) - len(envelope.body)]
        if not delivery.data.endswith(envelope.body) or not RECEIVED.match(prefix):
            verdict.damaged.append(f"{envelope.mid}: {len(delivery.data)} bytes delivered, not its own")
            continue
        for recipient in delivery.recipients:
            counts = got.setdefault(envelope.mid, {})
            counts[recipient] = counts.get(recipient, 0) + 1
    for mid, message in book.messages.items():
        counts = got.get(mid, {})
        verdict.duplicates += sum(n - 1 for n in counts.values())
        missing = [r for r in message.recipients if r not in counts]
        if message.acked and missing:
            verdict.lost.append(f"{mid} (to {missing})")
        if not message.acked and counts:
            verdict.unacked_delivered += 1
    return verdict


def test_power_cuts_lose_and_mix_up_nothing(tmp_path, capsys):
    seed = int(os.environ.get("POWERLOSS_SEED") or random.SystemRandom().randrange(1 << 32))
    rng = random.Random(seed)
    book = Book(random.Random(rng.random()))
    deferRng = random.Random(rng.random())

    def rcpt(address: str) -> str | None:
        return "451 4.3.0 try again later" if deferRng.random() < DEFER else None

    sink = SMTPPeer(Handler(rcpt=rcpt)).start()
    port = freePort()
    mountpoint = tmp_path / "disk"
    config = tmp_path / "relay.ini"
    queue = "retry = 1s\n" + QUEUE
    # The control socket lives outside the mount: strictfs models files and
    # directories, not sockets, and a relay whose control endpoint cannot bind
    # does not start.
    control = f"\n[control]\nendpoint = unix:{tmp_path / 'control.sock'}\n"
    config.write_text(smarthostConfig(mountpoint / "var", port, sink.port, queue=queue) + control)
    lives: list[str] = []
    mount: StrictMount | None = None
    relay: RelayProcess | None = None
    tree: Path | None = None
    try:
        for life in range(CUTS + 1):
            last = life == CUTS
            mount = StrictMount(mountpoint, source=tree, log=tmp_path / "strictfs.log").start()
            started = time.monotonic()
            relay = RelayProcess(tmp_path, config, port, life)
            if last:
                break
            stop = threading.Event()
            threads = [threading.Thread(target=client, args=(port, life, book, stop)) for _ in range(CLIENTS)]
            for t in threads:
                t.start()
            cutAt = rng.uniform(*CUT_AFTER)
            mode = rng.choice(MODES)
            before = book.count
            proc = relay.proc
            waitUntil(lambda proc=proc: proc.poll() is not None, max(0.0, started + cutAt - time.monotonic()))
            if proc.poll() is not None:
                stop.set()
                raise AssertionError(f"the relay exited in life {life}: {relay.logTail()}")
            tree = tmp_path / f"durable-{life}"
            stats = mount.stats()
            report = mount.cut(tree, mode, rng.randrange(1 << 32))
            relay.kill()
            relay = None
            stop.set()
            for t in threads:
                t.join(timeout=15)
            mount.stop()
            mount = None
            lives.append(
                f"cut {life + 1}: {mode} at {cutAt:.2f}s, {book.count - before} sent, "
                f"{stats.get('fsync', 0)} fsync, {stats.get('fsyncdir', 0)} fsyncdir; restart finds "
                f"{report['files']} files ({report['hardlinks']} extra hard links, {report['unsynced']} "
                f"not as last written), {report['lost_names']} names lost, {report['revived_names']} revived"
            )
        # The last life: no cut, no clients; the relay recovers and delivers.
        assert waitUntil(lambda: listening(port) or relay.proc.poll() is not None, 30), relay.logTail()
        assert relay.proc.poll() is None, f"the relay exited after the last cut: {relay.logTail()}"

        progress = {"count": -1, "at": time.monotonic()}

        def drained() -> bool:
            # Everything acknowledged has arrived, or nothing has for a while (lost for good).
            if len(sink.messages) != progress["count"]:
                progress.update(count=len(sink.messages), at=time.monotonic())
            return not judge(book, list(sink.messages)).lost or time.monotonic() - progress["at"] > STALLED

        waitUntil(drained, DRAIN, interval=0.5)
        time.sleep(2)  # late duplicates and mix-ups count too
        relay.stop()
        relay = None
        verdict = judge(book, list(sink.messages))
    finally:
        if relay is not None:
            relay.kill()
        if mount is not None:
            mount.stop()
        sink.stop()

    summary = (
        f"power cuts (seed {seed}, {CUTS} cuts, modes {' '.join(MODES)}{', ' + QUEUE.strip() if QUEUE else ''}): "
        f"{len(book.messages)} sent, {verdict.acked} acknowledged, {verdict.deliveries} deliveries, "
        f"{len(verdict.lost)} lost, {len(verdict.mixups)} mixed up, {len(verdict.damaged)} damaged, "
        f"{verdict.duplicates} duplicates, {verdict.unacked_delivered} delivered without 250, "
        f"{verdict.bounces} bounces"
    )
    with capsys.disabled():
        print("\n" + "\n".join(lives) + "\n" + summary)
    assert verdict.acked >= CUTS, "too few messages acknowledged to prove anything: " + summary
    byLife: dict[str, int] = {}
    for lost in verdict.lost:
        life = lost.split("-", 1)[0][1:]
        byLife[life] = byLife.get(life, 0) + 1
    if byLife:
        summary += "\nlost, by the life that acknowledged them: " + ", ".join(f"{k}: {v}" for k, v in byLife.items())
    problems = verdict.mixups[:10] + verdict.damaged[:10] + verdict.lost[:10]
    assert not (verdict.lost or verdict.mixups or verdict.damaged), summary + "\n" + "\n".join(problems)
