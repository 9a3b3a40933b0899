"""
Every reply classified once: what the client makes of each code at each
position of a session, against a scripted next hop.

The rule under test: a recipient is delivered only when the next hop said
2xx to its RCPT and 250 to the end of a body it was sent; a 4xx or 5xx is
taken at its word; anything else (a 2xx or 3xx where it was not asked for, a
code outside 200-599, garbage, a reply nobody asked for, a disconnect) defers
every recipient of the transaction and the session is never used again.
"""

from __future__ import annotations

import io

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from relay.delivery import remote
from relay.envelope import Recipient
from relay.smtp.client import (
    MAX_REPLY_OCTETS,
    REPLY_BUFFER,
    ClientSettings,
    GreetingError,
    LoopError,
    Outgoing,
    OutOfStep,
    SessionError,
    SMTPClient,
    TLSPolicy,
    openSession,
    transaction,
)

BODY = b"Subject: t\r\n\r\nhello\r\n.dot\r\n"
POSITIVE = {"greeting": 220, "EHLO": 250, "MAIL": 250, "RCPT": 250, "DATA": 354, "END": 250, "BDAT": 250}


class NextHop:
    """
    Plays the server on a StringTransport: answers each command as it comes,
    with the code the test chose for that position (positive otherwise).
    Records whether the whole body reached it.
    """

    def __init__(self, codes: dict[str, int | str], ehlo: tuple[str, ...] = ("PIPELINING",), close: str = "") -> None:
        self.clock = Clock()
        self.client = SMTPClient(ClientSettings("relay.example.test", self.clock, TLSPolicy.NONE))
        self.transport = StringTransport()
        self.client.makeConnection(self.transport)
        self.codes = codes
        self.ehlo = ehlo
        self.close = close  # a position at which the next hop hangs up in the middle of its reply
        self.bodies: list[bytes] = []
        self._data: bytes | None = None
        self._bdat = b""
        self._bdatLeft = 0
        self._pending = b""

    def _code(self, position: str) -> int | str:
        return self.codes.get(position, POSITIVE[position])

    def _answer(self, position: str) -> None:
        if self.transport.disconnecting or self.client._lost is not None:
            return
        code = self._code(position)
        if position == self.close:
            self.client.dataReceived(f"{code}-first line of a reply that never ends\r\n".encode())
            self.client.connectionLost(None)
            self.transport.disconnecting = True
            return
        if isinstance(code, str):  # garbage
            line = code
        elif position == "EHLO" and code == 250:
            line = "\r\n".join(["250-mx.example.test", *(f"250-{k}" for k in self.ehlo[:-1]), f"250 {self.ehlo[-1]}"])
        elif position == "greeting":
            line = f"{code} mx.example.test ESMTP"
        else:
            line = f"{code} reply to {position}"
        self.client.dataReceived(line.encode() + b"\r\n")

    def greet(self) -> None:
        self._answer("greeting")

    def pump(self, rounds: int = 50) -> None:
        for _ in range(rounds):
            sent = self.transport.value()
            self.transport.clear()
            if not sent:
                return
            self._pending += sent
            self._consume()

    def _consume(self) -> None:
        while self._pending:
            if self._data is not None:
                end = self._pending.find(b"\r\n.\r\n")
                if end == -1 and self._data == b"" and self._pending.startswith(b".\r\n"):
                    self._pending = self._pending[3:]
                    self.bodies.append(b"")
                    self._data = None
                    self._answer("END")
                    continue
                if end == -1:
                    self._data += self._pending
                    self._pending = b""
                    return
                stuffed = b"\r\n" + self._data + self._pending[: end + 2]
                self.bodies.append(stuffed.replace(b"\r\n.", b"\r\n")[2:])  # unstuffed
                self._pending = self._pending[end + 5 :]
                self._data = None
                self._answer("END")
                continue
            if self._bdatLeft:
                piece = self._pending[: self._bdatLeft]
                self._pending = self._pending[len(piece) :]
                self._bdat += piece
                self._bdatLeft -= len(piece)
                if self._bdatLeft:
                    return
                if self._bdatLast:
                    self.bodies.append(self._bdat)
                    self._bdat = b""
                self._answer("BDAT")
                continue
            nl = self._pending.find(b"\r\n")
            if nl == -1:
                return
            line, self._pending = self._pending[:nl].decode(), self._pending[nl + 2 :]
            verb = line.split(" ", 1)[0].upper()
            if verb == "BDAT":
                words = line.split()
                self._bdatLeft = int(words[1])
                self._bdatLast = len(words) > 2
                if not self._bdatLeft:
                    if self._bdatLast:
                        self.bodies.append(self._bdat)
                        self._bdat = b""
                    self._answer("BDAT")
                continue
            position = {"EHLO": "EHLO", "HELO": "EHLO", "MAIL": "MAIL", "RCPT": "RCPT", "DATA": "DATA"}.get(verb)
            if position is None:
                self.client.dataReceived(b"250 ok\r\n")  # RSET, QUIT
                continue
            self._answer(position)
            if position == "DATA" and self._code("DATA") == 354:
                self._data = b""


def message(*addresses: str) -> Outgoing:
    return Outgoing("s@example.org", [Recipient(a) for a in addresses], lambda: io.BytesIO(BODY), size=len(BODY))


def run(hop: NextHop, *addresses: str) -> tuple[dict[str, object] | None, Exception | None]:
    """The session to its end: per-recipient statuses, or the session error that defers them all."""

    async def session():
        await openSession(hop.client)
        return await transaction(hop.client, message(*addresses))

    d = Deferred.fromCoroutine(session())
    hop.greet()
    hop.pump()
    outcome: list[object] = []
    d.addBoth(outcome.append)
    assert outcome, "the session did not end"
    if isinstance(outcome[0], Exception) or hasattr(outcome[0], "value"):
        return None, getattr(outcome[0], "value", outcome[0])
    return outcome[0].statuses, None


@pytest.mark.parametrize("code", [251, 252])
def test_rcpt_251_and_252_are_accepted_and_the_body_is_sent(code):
    hop = NextHop({"RCPT": code})
    statuses, error = run(hop, "a@x.test")
    assert error is None
    assert statuses["a@x.test"].code == 250 and statuses["a@x.test"].ok
    assert hop.bodies == [BODY]


@pytest.mark.parametrize("pipelining", [True, False])
def test_a_3xx_to_rcpt_defers_everyone_and_closes_the_session(pipelining):
    hop = NextHop({"RCPT": 354}, ehlo=("PIPELINING",) if pipelining else ("SIZE",))
    statuses, error = run(hop, "a@x.test")
    assert isinstance(error, OutOfStep) and error.status.code == 451 and error.status.enhanced == "4.5.0"
    assert "unexpected reply to RCPT: 354" in error.status.text
    assert hop.bodies == []
    assert not hop.client.alive and hop.transport.disconnecting


def test_354_to_mail_defers_and_sends_no_body():
    hop = NextHop({"MAIL": 354})
    statuses, error = run(hop, "a@x.test", "b@x.test")
    assert isinstance(error, OutOfStep)
    assert hop.bodies == [] and not hop.client.alive


def test_a_250_greeting_is_no_greeting_and_raises_no_exception_but_a_greeting_error():
    hop = NextHop({"greeting": 250})
    statuses, error = run(hop, "a@x.test")
    assert isinstance(error, GreetingError) and error.status.code == 451
    assert not hop.client.alive


def test_a_250_to_data_sends_no_body():
    hop = NextHop({"DATA": 250})
    statuses, error = run(hop, "a@x.test")
    assert isinstance(error, OutOfStep) and hop.bodies == []


@pytest.mark.parametrize("garbage", ["hello there", "25", "2500 ok", "250x ok", "\x00\x01\x02"])
def test_garbage_is_a_protocol_error_that_defers(garbage):
    hop = NextHop({"END": garbage})
    statuses, error = run(hop, "a@x.test")
    assert isinstance(error, SessionError) and error.status.code == 451
    assert not hop.client.alive


@pytest.mark.parametrize("position", ["MAIL", "RCPT", "DATA", "END"])
def test_a_disconnect_in_the_middle_of_a_reply_defers(position):
    hop = NextHop({}, close=position)
    statuses, error = run(hop, "a@x.test")
    assert isinstance(error, SessionError) and error.status.code == 451


def test_a_reply_nobody_asked_for_closes_the_session_at_once():
    hop = NextHop({})
    statuses, error = run(hop, "a@x.test")
    assert statuses["a@x.test"].ok and hop.client.alive
    # Idle now, as a pooled session is: a flood of replies is cut at the first.
    hop.client.dataReceived(b"250 ok\r\n" * 100_000)
    assert not hop.client.alive and hop.transport.disconnecting
    assert hop.client._replies == []


def test_a_reply_line_without_end_is_bounded():
    hop = NextHop({})
    run(hop, "a@x.test")
    hop.client.dataReceived(b"250-" + b"x" * 100_000)
    assert not hop.client.alive and len(hop.client._buffer) == 0


def test_a_session_that_went_out_of_step_is_never_reused_by_the_pool():
    hop = NextHop({"RCPT": 354})
    run(hop, "a@x.test")
    pool = remote.SessionPool(hop.clock)
    pool.give("key", hop.client)
    assert pool.take("key") is None


def test_our_own_name_in_the_greeting_is_a_loop():
    hop = NextHop({})
    hop.client.settings.helo = "mx.example.test"
    statuses, error = run(hop, "a@x.test")
    assert isinstance(error, LoopError)
    assert (error.status.code, error.status.enhanced) == (554, "5.4.6")


@pytest.mark.parametrize("code", [421, 450])
def test_a_4xx_to_ehlo_lets_another_host_try(code):
    hop = NextHop({"EHLO": code})
    statuses, error = run(hop, "a@x.test")
    assert isinstance(error, GreetingError) and error.status.code == code


POSITIONS = ["greeting", "EHLO", "MAIL", "RCPT", "DATA", "END", "BDAT"]


@settings(max_examples=600, deadline=None)
@given(
    position=st.sampled_from(POSITIONS),
    code=st.integers(100, 699) | st.sampled_from([220, 250, 251, 252, 334, 354, 421, 450, 550]),
    pipelining=st.booleans(),
    chunking=st.booleans(),
    recipients=st.integers(1, 3),
)
def test_every_code_at_every_position(position, code, pipelining, chunking, recipients):
    """Delivered only with a 2xx to RCPT and a 250 to a body that was sent; never a 5xx from an out-of-step session."""
    ehlo = tuple(k for k, on in (("PIPELINING", pipelining), ("CHUNKING", chunking)) if on) or ("SIZE",)
    hop = NextHop({position: code}, ehlo=ehlo)
    addresses = [f"r{i}@x.test" for i in range(recipients)]
    statuses, error = run(hop, *addresses)
    expected = POSITIVE[position]
    used = position not in (("DATA", "END") if chunking else ("BDAT",))  # else a position this session never reaches
    inStep = code == expected or 400 <= code <= 599 or (position == "RCPT" and code in (250, 251, 252))
    if statuses is not None:
        for status in statuses.values():
            if status.ok:
                assert hop.bodies == [BODY], "delivered without the body"
                assert code == expected or not used or (position == "RCPT" and code in (251, 252))
        if used and not inStep:
            pytest.fail(f"{code} at {position} was taken at its word: {statuses}")
    else:
        assert error.status.code // 100 in (4, 5)
        if not inStep and used:
            assert error.status.code // 100 == 4, "an out-of-step session bounced mail"
            assert not hop.client.alive
    if used and not inStep:
        assert not hop.client.alive


def _longReply(index: int, lines: int = 20) -> bytes:
    text = [f"250-{index} " + "x" * 150 for _ in range(lines - 1)] + [f"250 {index} ok"]
    return ("\r\n".join(text) + "\r\n").encode()


def test_a_flood_of_owed_replies_stops_the_reading_until_they_are_read():
    hop = NextHop({})
    run(hop, "a@x.test")
    client, transport = hop.client, hop.transport
    client.sendRaw(b"RCPT TO:<a@x.test>\r\n" * 1000, replies=1000)  # a pipelined flight: 1000 replies owed
    flood = b"".join(_longReply(i) for i in range(1000))  # about 3 MB of 250 lines
    offset = 0
    while offset < len(flood) and transport.producerState != "paused":
        client.dataReceived(flood[offset : offset + 16384])
        offset += 16384
    assert transport.producerState == "paused" and client.readingPaused
    assert offset < len(flood) // 10, "reading went on"
    assert client._queuedOctets <= REPLY_BUFFER + 16384 + MAX_REPLY_OCTETS
    # As deliver() reads them, reading resumes; everything arrives in order.
    codes = []
    for _ in range(1000):
        got = []
        client.reply(1).addCallback(got.append)
        while not got and offset < len(flood):
            assert transport.producerState == "producing"
            client.dataReceived(flood[offset : offset + 16384])
            offset += 16384
        assert got, "a reply never came"
        codes.append(got[0].lines[0].split()[0])
        assert client._queuedOctets <= REPLY_BUFFER + 16384 + MAX_REPLY_OCTETS
    assert codes == [str(i) for i in range(1000)]
    assert client.alive and transport.producerState == "producing"


def test_one_reply_larger_than_its_bound_closes_the_session():
    hop = NextHop({})
    run(hop, "a@x.test")
    hop.client.sendRaw(b"NOOP\r\n")
    hop.client.dataReceived(b"".join(b"250-" + b"y" * 4000 + b"\r\n" for _ in range(20)))
    assert not hop.client.alive and hop.transport.disconnecting
    assert hop.client._lines == [] or hop.client._lost is not None
