"""The ESMTP client, against scripted replies and against relay's own server."""

from __future__ import annotations

import io

import pytest
from deferred import result
from hypothesis import given, settings
from hypothesis import strategies as st
from smtphelpers import Session
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.test import iosim

from relay.envelope import Recipient
from relay.smtp.client import (
    ClientSettings,
    GreetingError,
    Outgoing,
    SessionError,
    SMTPClient,
    TLSPolicy,
    openSession,
    transaction,
)
from relay.smtp.dotwriter import stuff

BODY = b"Subject: hi\r\n\r\n.leading dot\r\n..two\r\nlast\r\n"


class Scripted:
    """A client on a StringTransport; the test plays the server."""

    def __init__(self, tls: TLSPolicy = TLSPolicy.NONE, **kwargs) -> None:
        self.clock = Clock()
        self.client = SMTPClient(ClientSettings("relay.example.test", self.clock, tls, **kwargs))
        self.transport = StringTransport()
        self.client.makeConnection(self.transport)

    def sent(self) -> list[str]:
        lines = self.transport.value().decode().split("\r\n")
        self.transport.clear()
        return lines[:-1]

    def reply(self, *lines: str) -> None:
        self.client.dataReceived("".join(line + "\r\n" for line in lines).encode())


def message(*addresses: str, body: bytes = BODY, **kwargs) -> Outgoing:
    return Outgoing(
        "s@example.org", [Recipient(a) for a in addresses], lambda: io.BytesIO(body), size=len(body), **kwargs
    )


def opened(peer: Scripted, *ehlo: str) -> None:
    d = Deferred.fromCoroutine(openSession(peer.client))
    peer.reply("220 mx.example.test ESMTP")
    assert peer.sent() == ["EHLO relay.example.test"]
    peer.reply(*ehlo)
    result(d)


def test_pipelined_transaction_with_mixed_recipient_replies():
    peer = Scripted()
    opened(peer, "250-mx.example.test", "250-PIPELINING", "250 SIZE 1000")
    d = Deferred.fromCoroutine(transaction(peer.client, message("a@x.test", "b@x.test", "c@x.test")))
    # One flight: MAIL, every RCPT and DATA before any reply.
    assert peer.sent() == [
        f"MAIL FROM:<s@example.org> SIZE={len(BODY)}",
        "RCPT TO:<a@x.test>",
        "RCPT TO:<b@x.test>",
        "RCPT TO:<c@x.test>",
        "DATA",
    ]
    peer.reply("250 2.1.0 ok", "250 2.1.5 ok", "450 4.2.1 mailbox busy", "550 5.1.1 no such user")
    peer.reply("354 go ahead")
    assert peer.transport.value() == stuff(BODY)
    peer.transport.clear()
    peer.reply("250 2.0.0 queued as X")
    outcome = result(d)
    assert {a: (s.code, s.enhanced) for a, s in outcome.statuses.items()} == {
        "a@x.test": (250, "2.0.0"),
        "b@x.test": (450, "4.2.1"),
        "c@x.test": (550, "5.1.1"),
    }
    assert outcome.dsnPassed is False


def test_without_pipelining_one_command_at_a_time_and_mail_refusal_stops():
    peer = Scripted()
    opened(peer, "250 mx.example.test")
    d = Deferred.fromCoroutine(transaction(peer.client, message("a@x.test")))
    assert peer.sent() == ["MAIL FROM:<s@example.org>"]
    peer.reply("553 5.7.1 sender refused")
    outcome = result(d)
    assert outcome.statuses["a@x.test"].code == 553


def test_helo_when_ehlo_is_refused():
    peer = Scripted()
    d = Deferred.fromCoroutine(openSession(peer.client))
    peer.reply("220 old.example.test")
    assert peer.sent() == ["EHLO relay.example.test"]
    peer.reply("502 5.5.1 what")
    assert peer.sent() == ["HELO relay.example.test"]
    peer.reply("250 old.example.test")
    result(d)
    assert peer.client.extensions == {}


def test_greeting_refused_is_a_greeting_error():
    peer = Scripted()
    d = Deferred.fromCoroutine(openSession(peer.client))
    peer.reply("421 4.3.2 busy, try later")
    with pytest.raises(GreetingError) as info:
        result(d)
    assert info.value.status.code == 421


def test_dsn_parameters_pass_through_when_offered():
    peer = Scripted()
    opened(peer, "250-mx", "250-DSN", "250-8BITMIME", "250 PIPELINING")
    outgoing = Outgoing(
        "s@example.org",
        [Recipient("a@x.test", notify=("SUCCESS", "FAILURE"), orcpt="rfc822;A+B@x.test")],
        lambda: io.BytesIO(BODY),
        body="8BITMIME",
        ret="HDRS",
        envid="id=1",
    )
    d = Deferred.fromCoroutine(transaction(peer.client, outgoing))
    assert peer.sent()[:2] == [
        "MAIL FROM:<s@example.org> BODY=8BITMIME RET=HDRS ENVID=id+3D1",
        "RCPT TO:<a@x.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;A+2BB@x.test",
    ]
    peer.reply("250 ok", "250 ok", "354 go")
    peer.reply("250 ok")
    assert result(d).dsnPassed is True


def test_utf8_envelope_to_a_server_without_smtputf8_bounces_unsent():
    peer = Scripted()
    opened(peer, "250-mx", "250 PIPELINING")
    d = Deferred.fromCoroutine(transaction(peer.client, message("zoë@x.test", smtputf8=True)))
    assert peer.sent() == []
    status = result(d).statuses["zoë@x.test"]
    assert (status.code, status.enhanced) == (553, "5.6.7")


def test_utf8_domain_alone_goes_as_a_labels_without_smtputf8():
    peer = Scripted()
    opened(peer, "250-mx", "250 PIPELINING")
    d = Deferred.fromCoroutine(transaction(peer.client, message("user@bücher.test")))
    assert peer.sent()[1] == "RCPT TO:<user@xn--bcher-kva.test>"
    peer.reply("250 ok", "250 ok", "354 go")
    peer.reply("250 ok")
    assert result(d).statuses["user@bücher.test"].code == 250


def test_required_tls_not_offered_defers():
    peer = Scripted(tls=TLSPolicy.REQUIRED)
    d = Deferred.fromCoroutine(openSession(peer.client))
    peer.reply("220 mx")
    peer.sent()
    peer.reply("250 mx")
    with pytest.raises(SessionError) as info:
        result(d)
    assert info.value.status.code == 451 and info.value.status.enhanced == "4.7.4"


def test_wrong_password_defers():
    peer = Scripted(username="u", password="wrong")
    d = Deferred.fromCoroutine(openSession(peer.client))
    peer.reply("220 mx")
    peer.sent()
    peer.reply("250-mx", "250 AUTH PLAIN LOGIN")
    assert peer.sent() == ["AUTH PLAIN AHUAd3Jvbmc="]
    peer.reply("535 5.7.8 authentication failed")
    with pytest.raises(SessionError) as info:
        result(d)
    assert info.value.status.code == 454  # the operator's to fix: deferred, never bounced


def test_timeout_waiting_for_greeting():
    peer = Scripted()
    d = Deferred.fromCoroutine(openSession(peer.client))
    peer.clock.advance(301)
    with pytest.raises(SessionError) as info:
        result(d)
    assert info.value.status.code == 451


def test_bdat_when_chunking_is_offered():
    peer = Scripted()
    opened(peer, "250-mx", "250-PIPELINING", "250 CHUNKING")
    d = Deferred.fromCoroutine(transaction(peer.client, message("a@x.test")))
    assert peer.sent() == ["MAIL FROM:<s@example.org>", "RCPT TO:<a@x.test>"]
    peer.reply("250 ok", "250 ok")
    assert peer.transport.value() == f"BDAT {len(BODY)} LAST\r\n".encode() + BODY
    peer.reply("250 2.0.0 ok")
    assert result(d).statuses["a@x.test"].code == 250


# -- dot-stuffing -------------------------------------------------------------

# Text lines as our server accepts them: no CR, LF or NUL inside a line.
lines = st.lists(
    st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"").replace(b"\0", b""))
    | st.sampled_from([b".", b"..", b""]),
    max_size=30,
)


# -- against relay's own server, over iosim -----------------------------------


@settings(max_examples=100, deadline=None)
@given(lines)
def test_body_arrives_byte_identical_at_a_real_server(bodyLines):
    body = b"Subject: t\r\n\r\n" + b"".join(line + b"\r\n" for line in bodyLines)
    server = Session()
    clock = server.clock
    client = SMTPClient(ClientSettings("relay.example.test", clock, TLSPolicy.NONE))
    serverProtocol = server.factory.buildProtocol(None)
    _, _, pump = iosim.connectedServerAndClient(lambda: serverProtocol, lambda: client, greet=False)

    async def run():
        await openSession(client)
        return await transaction(client, message("user@localhost", body=body))

    d = Deferred.fromCoroutine(run())
    for _ in range(50):
        pump.flush()
        if d.called:
            break
    outcome = result(d)
    assert outcome.statuses["user@localhost"].code == 250
    [envelope] = server.accepted
    with server.store.openData(envelope.queue_id) as f:
        stored = f.read()
    assert stored.startswith(b"Received: ")  # the server's trace header, then the body as sent
    assert stored.endswith(body)


def test_rset_only_after_a_transaction_left_open():
    peer = Scripted()
    opened(peer, "250-mx", "250 PIPELINING")
    first = Deferred.fromCoroutine(transaction(peer.client, message("gone@x.test")))
    assert peer.sent()[0] == "MAIL FROM:<s@example.org>"
    peer.reply("250 ok", "550 5.1.1 no such user", "554 5.5.1 no valid recipients")
    assert result(first).statuses["gone@x.test"].code == 550
    # MAIL was accepted and never ended: the next flight starts with RSET.
    second = Deferred.fromCoroutine(transaction(peer.client, message("a@x.test")))
    assert peer.sent() == ["RSET", "MAIL FROM:<s@example.org>", "RCPT TO:<a@x.test>", "DATA"]
    peer.reply("250 reset", "250 ok", "250 ok", "354 go")
    peer.transport.clear()
    peer.reply("250 2.0.0 ok")
    assert result(second).statuses["a@x.test"].code == 250
    # That one ended cleanly: no RSET before the third.
    Deferred.fromCoroutine(transaction(peer.client, message("b@x.test")))
    assert peer.sent()[0] == "MAIL FROM:<s@example.org>"


def _bdatPayload(wire: bytes) -> tuple[bytes, int]:
    """The body a BDAT receiver reads by byte count, and how many chunks carried it."""
    body, chunks = b"", 0
    while wire:
        command, _, wire = wire.partition(b"\r\n")
        size = int(command.split()[1])
        body, wire = body + wire[:size], wire[size:]
        chunks += 1
    return body, chunks


@pytest.mark.parametrize("binary", [False, True])
def test_bdat_sends_text_with_crlf_only_and_binary_as_it_is(binary):
    from relay.smtp.client import CHUNK

    # A bare LF, a bare CR, and a CRLF cut by the chunk boundary.
    stored = b"Subject: x\r\n\r\nbare\nlf and bare\rcr\r\n" + b"y" * (CHUNK - 36) + b"\r\n" + b"z" * 100 + b"\r\n"
    assert stored[CHUNK - 1 : CHUNK + 1] == b"\r\n"
    peer = Scripted()
    opened(peer, "250-mx", "250-PIPELINING", "250-BINARYMIME", "250-8BITMIME", "250 CHUNKING")
    outgoing = message("a@x.test", body=stored)
    outgoing.body = "BINARYMIME" if binary else "8BITMIME"
    d = Deferred.fromCoroutine(transaction(peer.client, outgoing))
    peer.sent()
    peer.reply("250 ok", "250 ok")
    sent, chunks = _bdatPayload(peer.transport.value())
    assert chunks == 2
    if binary:
        assert sent == stored
    else:
        assert sent == stored.replace(b"\nlf", b"\r\nlf").replace(b"\rcr", b"\r\ncr")
        assert sent.count(b"\n") == sent.count(b"\r\n") == sent.count(b"\r")
    peer.reply("250 ok", "250 ok")
    assert result(d).statuses["a@x.test"].ok
