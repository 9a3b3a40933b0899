"""
The body goes out as the connection drains: read a block at a time, never
whole; a next hop that stops reading costs the session after the block
timeout, and the file is closed whatever happens.
"""

from __future__ import annotations

import io
import socket

import pytest
from deferred import result
from twisted.internet import tcp
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport

from relay.envelope import Recipient
from relay.smtp import client as clientModule
from relay.smtp.client import (
    BLOCK_TIMEOUT,
    CHUNK,
    BodySender,
    ClientSettings,
    Outgoing,
    SessionError,
    SMTPClient,
    TLSPolicy,
    openSession,
    transaction,
)


class DrainingTransport(StringTransport):
    """A socket with a small send buffer: full past C{limit} bytes until the test drains it."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.paused = False
        self.most = 0

    def write(self, data: bytes) -> None:
        super().write(data)
        self.most = max(self.most, len(self.value()))
        if self.producer is not None and self.streaming and len(self.value()) > self.limit and not self.paused:
            self.paused = True
            self.producer.pauseProducing()

    def drain(self) -> bytes:
        sent = self.value()
        self.clear()
        if self.paused and self.producer is not None:
            self.paused = False
            self.producer.resumeProducing()
        return sent


class CountingFile(io.BytesIO):
    """Counts what was read of it, and whether it was closed."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.readSoFar = 0
        self.wasClosed = False

    def read(self, size: int = -1) -> bytes:
        assert size != -1, "the body must never be read whole"
        data = super().read(size)
        self.readSoFar += len(data)
        return data

    def close(self) -> None:
        self.wasClosed = True
        super().close()


def session(ehlo: tuple[str, ...], body: bytes, limit: int = 4 * CHUNK):
    clock = Clock()
    client = SMTPClient(ClientSettings("relay.example.test", clock, TLSPolicy.NONE))
    transport = DrainingTransport(limit)
    client.makeConnection(transport)
    source = CountingFile(body)
    outgoing = Outgoing("s@example.org", [Recipient("a@x.test")], lambda: source, size=len(body))

    async def run():
        await openSession(client)
        return await transaction(client, outgoing)

    d = Deferred.fromCoroutine(run())
    client.dataReceived(b"220 mx ESMTP\r\n")
    transport.drain()
    client.dataReceived(("\r\n".join(["250-mx", *(f"250-{k}" for k in ehlo), "250 8BITMIME"]) + "\r\n").encode())
    return clock, client, transport, source, d


BIG = (b"x" * 998 + b"\r\n") * 35_000  # 35 MB


@pytest.mark.parametrize("ehlo", [("PIPELINING",), ("PIPELINING", "CHUNKING")])
def test_a_large_body_is_read_only_as_fast_as_the_connection_drains(ehlo):
    clock, client, transport, source, d = session(ehlo, BIG)
    transport.drain()  # MAIL, RCPT (and DATA)
    client.dataReceived(b"250 ok\r\n250 ok\r\n" + (b"" if "CHUNKING" in ehlo else b"354 go\r\n"))
    # Paused with the buffer full: a few blocks read, not the message.
    assert transport.paused
    assert source.readSoFar <= 8 * CHUNK
    assert transport.most <= 4 * CHUNK + 2 * CHUNK + 100
    received = 0
    for _ in range(10_000):
        received += len(transport.drain())
        assert transport.most <= 6 * CHUNK + 100
        if not transport.paused:
            break
    received += len(transport.drain())
    assert source.readSoFar == len(BIG) and source.wasClosed
    assert received >= len(BIG)
    replies = 1 if "CHUNKING" not in ehlo else -(-len(BIG) // CHUNK)
    client.dataReceived(b"250 2.0.0 ok\r\n" * replies)
    assert result(d).statuses["a@x.test"].code == 250


def test_a_next_hop_that_stops_reading_costs_the_session_after_the_block_timeout():
    clock, client, transport, source, d = session(("PIPELINING",), BIG)
    transport.drain()
    client.dataReceived(b"250 ok\r\n250 ok\r\n354 go\r\n")
    assert transport.paused and not d.called
    clock.advance(BLOCK_TIMEOUT - 1)
    assert not d.called
    clock.advance(2)
    assert transport.disconnecting
    client.connectionLost(None)
    with pytest.raises(SessionError) as info:
        result(d)
    assert info.value.status.code == 451 and "stopped reading" in info.value.status.text
    assert source.wasClosed and source.readSoFar < 10 * CHUNK


def test_a_slow_but_moving_next_hop_is_not_timed_out():
    clock, client, transport, source, d = session(("PIPELINING",), BIG[: 40 * CHUNK])
    transport.drain()
    client.dataReceived(b"250 ok\r\n250 ok\r\n354 go\r\n")
    for _ in range(100):
        if not transport.paused:
            break
        clock.advance(BLOCK_TIMEOUT - 10)  # each block taken just in time
        transport.drain()
    assert not transport.disconnecting
    client.dataReceived(b"250 ok\r\n")
    assert result(d).statuses["a@x.test"].ok


def test_the_connection_lost_while_sending_closes_the_file_and_defers():
    clock, client, transport, source, d = session(("PIPELINING",), BIG)
    transport.drain()
    client.dataReceived(b"250 ok\r\n250 ok\r\n354 go\r\n")
    transport.producer.stopProducing()
    client.connectionLost(None)
    with pytest.raises(SessionError):
        result(d)
    assert source.wasClosed


def test_on_plain_tcp_the_body_goes_straight_into_the_socket_a_few_blocks_a_turn(monkeypatch):
    # Twisted's own TCP transport on a real socket pair: what the socket takes
    # is sent at once, no more than DIRECT_PER_TURN octets before the other
    # connections get a turn of the reactor; then the rest.
    monkeypatch.setattr(clientModule, "DIRECT_PER_TURN", 3 * 16384)
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    clock = Clock()
    client = SMTPClient(ClientSettings("relay.example.test", clock, TLSPolicy.NONE))
    transport = tcp.Server(ours, client, ("192.0.2.1", 25), None, 1, MemoryReactorClock())
    client.makeConnection(transport)
    blocks = [bytes([65 + i]) * 16384 for i in range(5)]

    def pieces():
        for block in blocks:
            yield block, 0
        yield b"", 1

    sender = BodySender(client, pieces())

    def received() -> bytes:
        out = b""
        while True:
            try:
                chunk = theirs.recv(1 << 20)
            except BlockingIOError:
                return out
            out += chunk

    try:
        d = sender.send()
        assert received() == b"".join(blocks[:3])  # no turn of the reactor yet
        assert not transport.dataBuffer and not transport._tempDataBuffer and not d.called
        clock.advance(0)
        assert received() == b"".join(blocks[3:])
        assert d.called and sender.replies == 1
    finally:
        ours.close()
        theirs.close()


@pytest.mark.parametrize(
    ("size", "pieces"),
    [(2000, 1), (CHUNK - 1, 1), (CHUNK, 2), (CHUNK + 1, 2), (2 * CHUNK + CHUNK // 2, 3)],
)
def test_the_end_marker_goes_with_the_last_block(size, pieces):
    # Alone, the marker's few octets would wait for the next hop's delayed
    # ACK (Nagle): one piece for a body under a block, and no extra piece for
    # the marker unless the body ends exactly at a block's end.
    body = (b"x" * 78 + b"\r\n") * (size // 80 + 1)
    body = body[: size - 2] + b"\r\n"
    sent = list(clientModule._dotStuffed(io.BytesIO(body)))
    assert b"".join(sent) == body + b".\r\n"
    assert len(sent) == pieces
    assert sent[-1].endswith(b"\r\n.\r\n") or sent[-1] == b".\r\n"
