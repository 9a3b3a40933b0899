"""
Two real relays sharing one queue on PostgreSQL (issue 15): a private
cluster (tests/pgcluster.py), two C{twistd -n relay} processes with their own
state_dir and node name, both relaying by smart host to one slow aiosmtpd
next hop that records, for every message, its Message-ID, the relay that
received it (its Received field's C{by}) and the relay that delivered it (the
session's EHLO name).

One node is killed with SIGKILL while it delivers: every acknowledged message
must arrive, and a message may arrive twice only when the dead node had it in
flight, after its lease expired and the survivor took it over.  Then the
operator's view across nodes: relayctl on one node lists, holds, releases,
flushes and deletes mail the other received.
"""

from __future__ import annotations

import asyncio
import re
import smtplib
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser
from pathlib import Path
from typing import Any

import pytest
from peers import Handler, SMTPPeer
from relayproc import Relay, ctl, ctlJSON, freePort, queueJSON, smarthostConfig, waitFor

pytestmark = pytest.mark.integration

TOOK_OVER = re.compile(r"took over (\w+) from node (\S+) whose lease expired")


@dataclass
class Arrival:
    message_id: str
    received_by: str  # the relay that accepted it from the client
    delivered_by: str  # the relay whose session handed it over
    queue_id: str


@dataclass
class SlowHandler(Handler):
    """Answers DATA after C{delay} seconds, then records it: as a next hop that commits, then says 250."""

    delay: float = 0.1
    arrivals: list[Arrival] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        await asyncio.sleep(self.delay)
        headers = BytesHeaderParser().parsebytes(envelope.original_content)
        received = headers.get("Received", "")
        by = re.search(r"by (\S+) \(relay\) with \S+ id (\w+)", received)
        with self.lock:
            self.arrivals.append(
                Arrival(
                    headers.get("Message-ID", ""),
                    by.group(1) if by else "",
                    session.host_name or "",
                    by.group(2) if by else "",
                )
            )
        return await super().handle_DATA(server, session, envelope)


def node(tmp_path: Path, name: str, dsn: str, peer: int, queue: str = "", port: int | None = None) -> Relay:
    """A relay named C{name}.relay.test whose queue is the shared database, as node C{name}."""
    workdir = tmp_path / name
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or freePort()
    state = workdir / "var"
    settings = f"store = postgres\ndsn = {dsn}\nnode = {name}\nlease = 5s\n{queue}"
    config = smarthostConfig(state, port, peer, queue=settings).replace(
        "hostname = relay.test", f"hostname = {name}.relay.test"
    )
    return Relay(workdir, config=config, port=port)


def queued(relay: Relay) -> int:
    return ctlJSON(relay, "stats")["messages"]


@pytest.fixture
def cluster(pgcluster: Any, tmp_path: Path):
    """The shared database, and a list the test adds its relays and peers to (all stopped at the end)."""
    started: list[Any] = []
    yield pgcluster.createdb("cluster"), started
    for thing in reversed(started):
        thing.stop()


class Loader(threading.Thread):
    """One client connection at a time to one relay, sending until told to stop or its quota is done."""

    def __init__(self, relay: Relay, prefix: str, quota: int) -> None:
        super().__init__(daemon=True)
        self.relay = relay
        self.prefix = prefix
        self.quota = quota
        self.sent: set[str] = set()  # DATA sent: may have been accepted even if no reply came
        self.acknowledged: dict[str, str] = {}  # Message-ID -> queue id from the 250
        self.errors: list[str] = []
        self.halt = threading.Event()

    def run(self) -> None:
        client: smtplib.SMTP | None = None
        number = 0
        deadline = time.monotonic() + 120
        while number < self.quota and not self.halt.is_set() and time.monotonic() < deadline:
            try:
                if client is None:
                    client = smtplib.SMTP("127.0.0.1", self.relay.port, timeout=20)
                    client.ehlo("loader.test")
                messageID = f"<{self.prefix}-{number}@cluster.test>"
                client.mail("sender@example.net")
                client.rcpt(f"r{number}@example.net")
                self.sent.add(messageID)
                code, reply = client.data(
                    f"Message-ID: {messageID}\r\nSubject: {self.prefix} {number}\r\n\r\nbody {number}\r\n"
                )
                number += 1
                if code == 250:
                    found = re.search(rb"queued as (\w+)", reply)
                    self.acknowledged[messageID] = found.group(1).decode() if found else ""
                else:
                    self.errors.append(f"{code} {reply!r}")
            except (OSError, smtplib.SMTPException) as e:
                self.errors.append(repr(e))
                client = None
                if self.halt.is_set():
                    break
                time.sleep(0.05)
        if client is not None:
            try:
                client.quit()
            except (OSError, smtplib.SMTPException):
                pass


def test_a_node_killed_while_it_delivers(cluster, tmp_path):
    """
    Load through both nodes; SIGKILL n1 while it delivers and keep loading
    n2; every message acknowledged by either reaches the next hop, the copies
    twice only of what n2 took over from n1 after its lease expired; n2 ends
    with an empty queue; n1 started again delivers nothing twice more.
    """
    dsn, started = cluster
    handler = SlowHandler(delay=0.1)
    peer = SMTPPeer(handler).start()
    started.append(peer)
    n1 = node(tmp_path, "n1", dsn, peer.port).start()
    started.append(n1)
    n2 = node(tmp_path, "n2", dsn, peer.port).start()
    started.append(n2)

    loaders = [
        Loader(n1, "a", 150),
        Loader(n1, "b", 150),
        Loader(n2, "c", 150),
        Loader(n2, "d", 150),
    ]
    for loader in loaders:
        loader.start()
    # Kill n1 once it has accepted a good part of its share and is delivering it.
    assert waitFor(
        lambda: (
            sum(len(x.acknowledged) for x in loaders[:2]) >= 120
            and sum(a.delivered_by == "n1.relay.test" for a in list(handler.arrivals)) >= 20
        ),
        60,
        0.01,
    ), [x.errors[:3] for x in loaders]
    n1.kill9()
    killedAt = time.monotonic()
    for loader in loaders[:2]:
        loader.halt.set()
    for loader in loaders:
        loader.join(150)
        assert not loader.is_alive()
    sent = set().union(*(x.sent for x in loaders))
    acknowledged = {k: v for x in loaders for k, v in x.acknowledged.items()}
    assert all(len(x.acknowledged) == x.quota for x in loaders[2:]), [x.errors[:3] for x in loaders[2:]]

    # Every acknowledged message reaches the next hop (a lease of 5 s, then n2's scan: well within 60 s).
    def arrived() -> set[str]:
        return {a.message_id for a in list(handler.arrivals)}

    assert waitFor(lambda: set(acknowledged) <= arrived(), 60, 0.2), sorted(set(acknowledged) - arrived())[:10]
    assert waitFor(lambda: queued(n2) == 0, 30, 0.5), queueJSON(n2)[:3]
    finished = time.monotonic() - killedAt
    arrivals = list(handler.arrivals)
    counts = Counter(a.message_id for a in arrivals)
    assert set(counts) <= sent  # nothing the clients did not send
    duplicates = {m for m, n in counts.items() if n > 1}
    log2 = n2.logText()
    tookOver = {queueID for queueID, owner in TOOK_OVER.findall(log2) if owner == "n1"}
    print(
        f"\nacknowledged {len(acknowledged)}, delivered {len(set(acknowledged) & set(counts))},"
        f" duplicates {len(duplicates)} (leases expired mid-delivery);"
        f" n2 took over {len(tookOver)} of n1's messages; all delivered {finished:.1f} s after the kill"
    )
    # n2 delivered mail n1 had received, after taking it over (its log says so).
    fromN1 = {a.queue_id for a in arrivals if a.received_by == "n1.relay.test" and a.delivered_by == "n2.relay.test"}
    assert fromN1 and fromN1 <= tookOver
    # A copy twice only of a message n1 had in flight: one copy from n1, one from n2 after taking it over.
    for messageID in duplicates:
        copies = [a for a in arrivals if a.message_id == messageID]
        assert len(copies) == 2, copies
        assert sorted(a.delivered_by for a in copies) == ["n1.relay.test", "n2.relay.test"], copies
        assert copies[0].received_by == "n1.relay.test" and copies[0].queue_id in tookOver, copies

    # n1 starts again (its node name is free once its process is gone) and delivers nothing twice more.
    before = len(handler.arrivals)
    offset = len(n1.logText())
    n1.start()
    time.sleep(7)  # more than a lease and a scan
    assert len(handler.arrivals) == before
    assert "event=delivered" not in n1.logText()[offset:]
    assert queued(n1) == 0


def test_a_second_relay_with_a_node_name_in_use_refuses_to_start(cluster, tmp_path):
    """As a second relay on a queue directory in use: one line naming [queue] node; the first is untouched."""
    dsn, started = cluster
    peer = SMTPPeer(SlowHandler(delay=0)).start()
    started.append(peer)
    first = node(tmp_path, "n1", dsn, peer.port).start()
    started.append(first)
    twin = node(tmp_path / "twin", "n1", dsn, peer.port)
    done = subprocess.run(twin.command(), cwd=twin.workdir, capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode != 0
    lines = done.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "[queue] node: node n1 is in use by another relay" in lines[0], done.stderr
    with smtplib.SMTP("127.0.0.1", first.port, timeout=10) as client:
        client.sendmail("s@example.net", ["r@example.net"], "Subject: still here\r\n\r\nbody\r\n")
    assert waitFor(lambda: len(peer.messages) == 1, 20)


def send(relay: Relay, recipient: str, subject: str) -> str:
    """One message through C{relay}; its queue id."""
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
        client.ehlo("client.test")
        assert client.mail("sender@example.net")[0] == 250
        assert client.rcpt(recipient)[0] == 250
        code, reply = client.data(f"Subject: {subject}\r\n\r\nbody\r\n")
    assert code == 250, reply
    return re.search(rb"queued as (\w+)", reply).group(1).decode()


def test_relayctl_on_one_node_operates_on_the_other_nodes_mail(cluster, tmp_path):
    """
    n1 receives two messages its next hop defers (451); relayctl on n2 lists
    them, holds one and releases it, flushes it once the next hop accepts
    (n2 delivers it), and deletes the other, which is gone for n1 too.  ETRN
    on n2 delivers mail n1 received.
    """
    dsn, started = cluster
    handler = SlowHandler(delay=0)
    handler.rcpt = lambda address: "451 4.3.0 try later" if address.startswith("later") else None
    peer = SMTPPeer(handler).start()
    started.append(peer)
    retry = "retry = 1h\n"
    n1 = node(tmp_path, "n1", dsn, peer.port, queue=retry).start()
    started.append(n1)
    n2 = node(tmp_path, "n2", dsn, peer.port, queue=retry).start()
    started.append(n2)
    kept = send(n1, "later1@example.net", "kept")
    dropped = send(n1, "later2@example.net", "dropped")

    def deferred(relay: Relay) -> dict[str, dict]:
        found = {m["id"]: m for m in queueJSON(relay)}
        if set(found) == {kept, dropped} and all(r["attempts"] >= 1 for m in found.values() for r in m["recipients"]):
            return found
        return {}

    # n2 lists n1's mail, attempted (by n1) and deferred.
    assert waitFor(lambda: deferred(n2), 30, 0.2), queueJSON(n2)
    listing = deferred(n2)
    assert listing[kept]["recipients"][0]["state"] == "deferred"
    assert listing[kept]["recipients"][0]["last_reply"].startswith("451")

    # hold from n2: held for both; release from n2.
    assert ctl(n2, "hold", kept)[:2] == (0, f"held {kept}\n")
    assert {m["id"]: m["held"] for m in queueJSON(n1)}[kept] is True
    status, out, err = ctl(n2, "release", kept)
    assert (status, out) == (0, f"released {kept}\n"), err
    assert {m["id"]: m["held"] for m in queueJSON(n1)}[kept] is False

    # delete from n2: gone for n1 too, and never delivered by anyone.
    assert ctl(n2, "delete", dropped)[:2] == (0, f"deleted {dropped}\n")
    assert dropped not in {m["id"] for m in queueJSON(n1)}
    status, _, err = ctl(n1, "show", dropped)
    assert status != 0 and dropped in err

    # The next hop accepts now: flush on n2 delivers what n1 received (the release's attempt may be in flight).
    handler.rcpt = lambda address: None
    assert waitFor(lambda: ctl(n2, "flush", kept)[0] == 0, 30, 0.5)
    assert waitFor(lambda: len(handler.arrivals) == 1, 20, 0.1)
    (arrival,) = handler.arrivals
    assert (arrival.queue_id, arrival.received_by, arrival.delivered_by) == (kept, "n1.relay.test", "n2.relay.test")
    assert waitFor(lambda: queueJSON(n1) == [] and queueJSON(n2) == [], 20, 0.2)

    # ETRN on n2 for mail n1 received and deferred.
    handler.rcpt = lambda address: "451 4.3.0 try later" if address.startswith("later") else None
    etrned = send(n1, "later3@example.org", "etrn")
    assert waitFor(lambda: [r["attempts"] for m in queueJSON(n2) for r in m["recipients"]] == [1], 30, 0.2)
    handler.rcpt = lambda address: None
    with smtplib.SMTP("127.0.0.1", n2.port, timeout=10) as client:
        client.ehlo("operator.test")
        code, reply = client.docmd("ETRN", "example.org")
    assert code in (250, 251, 252, 253), reply
    assert waitFor(lambda: len(handler.arrivals) == 2, 20, 0.1)
    assert handler.arrivals[1].queue_id == etrned
    assert handler.arrivals[1].delivered_by == "n2.relay.test"
    time.sleep(1)
    assert len(handler.arrivals) == 2  # delivered once: n1 never had it again
