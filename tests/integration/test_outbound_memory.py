"""
Memory while sending, with the real process: large bodies to a next hop that
stops reading, and a next hop that floods replies.  The relay's resident
memory is read from /proc and printed; the bounds are generous against
noise but far below what buffering a body (or the flood) would cost.
"""

from __future__ import annotations

import smtplib
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from relayproc import Relay, freePort, smarthostConfig, waitFor

pytestmark = pytest.mark.integration

MB = 1024 * 1024
LINE = b"x" * 998 + b"\r\n"
BIG = b"Subject: big\r\n\r\n" + LINE * (35 * MB // len(LINE))


def memory(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process, in bytes."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["VmHWM"]


class Growth:
    """The relay's resident memory from now on: growth and peak growth, printed with what was done."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.before, _ = memory(pid)

    def report(self, what: str) -> tuple[int, int]:
        now, peak = memory(self.pid)
        print(
            f"\n{what}: relay RSS {self.before / MB:.1f} MB before, {now / MB:.1f} MB after "
            f"(+{(now - self.before) / MB:.1f} MB), peak {peak / MB:.1f} MB (+{(peak - self.before) / MB:.1f} MB)"
        )
        return now - self.before, peak - self.before


class ScriptedHop:
    """
    A next hop on 127.0.0.1 in threads of the test: answers EHLO (PIPELINING,
    no CHUNKING), MAIL, RCPT and DATA, then, by C{mode}: C{stall} reads
    nothing more; C{flood} takes the body, answers 250 and then sends 250s
    nobody asked for until the connection breaks or 5 s pass.
    """

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.port = freePort()
        self.stop = threading.Event()
        self.dataStarted = 0
        self.delivered = 0
        self.flooded = 0  # bytes of unasked replies the relay took before it hung up
        self.hungUpAfter: float | None = None  # seconds into the flood
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", self.port))
        self.listener.settimeout(0.2)
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._session, args=(conn,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _session(self, conn: socket.socket) -> None:
        conn.settimeout(1.0)
        buffer = b""
        try:
            conn.sendall(b"220 hop.test ESMTP\r\n")
            while not self.stop.is_set():
                while b"\r\n" not in buffer:
                    try:
                        data = conn.recv(65536)
                    except TimeoutError:
                        if self.stop.is_set():
                            return
                        continue
                    if not data:
                        return
                    buffer += data
                line, _, buffer = buffer.partition(b"\r\n")
                verb = line[:4].upper()
                if verb == b"EHLO":
                    conn.sendall(b"250-hop.test\r\n250-PIPELINING\r\n250 SIZE 100000000\r\n")
                elif verb == b"DATA":
                    conn.sendall(b"354 go\r\n")
                    with self.lock:
                        self.dataStarted += 1
                    if self.mode == "stall":
                        self.stop.wait(120)
                        return
                    buffer = self._body(conn, buffer)
                    conn.sendall(b"250 2.0.0 taken\r\n")
                    with self.lock:
                        self.delivered += 1
                    self._flood(conn)
                    return
                elif verb == b"QUIT":
                    conn.sendall(b"221 bye\r\n")
                    return
                else:
                    conn.sendall(b"250 ok\r\n")
        except OSError:
            return
        finally:
            conn.close()

    def _body(self, conn: socket.socket, buffer: bytes) -> bytes:
        while b"\r\n.\r\n" not in buffer[-(1 << 20) :]:
            data = conn.recv(1 << 20)
            if not data:
                raise OSError("closed in the body")
            buffer = buffer[-8:] + data
        return b""

    def _flood(self, conn: socket.socket) -> None:
        reply = b"250 ok\r\n" * 8192
        conn.settimeout(0.5)
        started = time.monotonic()
        while time.monotonic() < started + 5 and not self.stop.is_set():
            try:
                sent = conn.send(reply)
            except TimeoutError:
                continue
            except OSError:
                self.hungUpAfter = time.monotonic() - started  # what we wanted
                return
            with self.lock:
                self.flooded += sent

    def close(self) -> None:
        self.stop.set()
        self.listener.close()
        for thread in self.threads:
            thread.join(timeout=5)


@pytest.fixture
def hop():
    made: list[ScriptedHop] = []

    def make(mode: str) -> ScriptedHop:
        made.append(ScriptedHop(mode))
        return made[-1]

    yield make
    for each in made:
        each.close()


def relayTo(relay, tmp_path: Path, peer: int) -> Relay:
    port = freePort()
    queue = "retry = 1h\ndestination_concurrency = 30"
    config = smarthostConfig(tmp_path / "var", port, peer, queue=queue, policy="max_message_size = 40M")
    return relay(config=config, port=port).start()


def send(port: int, body: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=120) as client:
        assert client.sendmail("sender@localhost", ["far@example.net"], body) == {}


def test_twenty_35mb_messages_to_a_stalled_next_hop(relay, tmp_path, hop):
    peer = hop("stall")
    r = relayTo(relay, tmp_path, peer.port)
    pid = r.proc.pid
    time.sleep(0.5)
    growth = Growth(pid)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: send(r.port, BIG), range(20)))
    assert waitFor(lambda: peer.dataStarted == 20, 60), f"{peer.dataStarted} sessions reached DATA"
    time.sleep(2)  # every session has filled what the sockets take and is paused
    during, peak = growth.report("20 x 35 MB received, then sent to a stalled next hop")
    assert during < 60 * MB
    assert peak < 80 * MB


def test_one_35mb_message_costs_little_memory(relay, tmp_path, hop):
    peer = hop("flood")
    r = relayTo(relay, tmp_path, peer.port)
    pid = r.proc.pid
    time.sleep(0.5)
    send(r.port, b"Subject: warm-up\r\n\r\nsmall\r\n")
    assert waitFor(lambda: peer.delivered == 1, 30)
    growth = Growth(pid)
    send(r.port, BIG)
    assert waitFor(lambda: peer.delivered == 2, 60)
    _, peak = growth.report("one 35 MB message received and relayed")
    # Receiving it holds at most the spill threshold and what the worker has
    # not written; sending it, a block and the transport's buffer.
    assert peak < 5 * MB


def test_a_next_hop_flooding_replies(relay, tmp_path, hop):
    peer = hop("flood")
    r = relayTo(relay, tmp_path, peer.port)
    pid = r.proc.pid
    time.sleep(0.5)
    growth = Growth(pid)
    send(r.port, b"Subject: small\r\n\r\nhello\r\n")
    assert waitFor(lambda: peer.delivered == 1, 30)
    assert waitFor(lambda: peer.hungUpAfter is not None, 6), "the relay took the flood for 5 s"
    after, peak = growth.report(
        f"a next hop flooding 250s into the idle session: hung up on after {peer.hungUpAfter:.3f} s, "
        f"{peer.flooded / MB:.2f} MB into the socket"
    )
    assert after < 10 * MB and peak < 10 * MB
