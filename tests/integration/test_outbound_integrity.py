"""
Outbound integrity with the real process: nothing the relay sends lets a lax
next hop read a second, forged message (SMTP smuggling), whether the bytes
come from a client's DSN parameters or from a BDAT body.

The next hop is scripted (tests/scriptedpeer.py): DATA only, no PIPELINING,
no CHUNKING, and it ends the data on LF.CRLF and LF.LF as well as CRLF.CRLF,
reading whatever follows as commands.  Each test counts the messages it gets.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
from relayproc import Relay, freePort, smarthostConfig
from scriptedpeer import LaxMessage, LaxPeer

pytestmark = pytest.mark.integration


# The attack of issue 11: an ORCPT whose xtext decodes to an LF, a dot, and a
# whole second transaction.
EVIL_ORCPT = (
    b"rfc822;x+0A.+0D+0AMAIL+20FROM:<ceo@relay.localhost>+0D+0ARCPT+20TO:<victim2@example.net>"
    b"+0D+0ADATA+0D+0AFrom:+20CEO+0D+0A+0D+0Apay+20now+0D+0A.+0D+0A"
)
# A body that ends the data early for a lax receiver (LF.CRLF), then carries a
# forged transaction, then does the same with a proper CRLF.CRLF.
SMUGGLED = (
    b"hello\n.\r\nMAIL FROM:<ceo@relay.localhost>\r\nRCPT TO:<victim2@example.net>\r\nDATA\r\n"
    b"From: CEO <ceo@relay.localhost>\r\n\r\npay now\r\n.\r\n"
    b"and again\r\n.\r\nMAIL FROM:<ceo@relay.localhost>\r\nRCPT TO:<victim3@example.net>\r\nDATA\r\n"
    b"forged\r\n"
)
SETTLE = 1.5  # seconds to wait, after the expected message, for one that must not come


class Client:
    """A raw ESMTP client: smtplib cannot send BDAT, nor a parameter as it is."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buffer = b""
        assert self.reply().startswith("220")
        assert self.command(b"EHLO client.test").startswith("250")

    def reply(self) -> str:
        """The last line of the next reply ("250 2.0.0 ...")."""
        while True:
            while b"\r\n" not in self.buffer:
                data = self.sock.recv(65536)
                assert data, "the relay closed the connection"
                self.buffer += data
            line, _, self.buffer = self.buffer.partition(b"\r\n")
            if line[3:4] != b"-":
                return line.decode()

    def command(self, line: bytes) -> str:
        self.sock.sendall(line + b"\r\n")
        return self.reply()

    def bdat(self, body: bytes) -> str:
        self.sock.sendall(b"BDAT %d LAST\r\n" % len(body) + body)
        return self.reply()

    def close(self) -> None:
        try:
            self.command(b"QUIT")
        finally:
            self.sock.close()


@pytest.fixture
def lax():
    peer = LaxPeer().start()
    yield peer
    peer.stop()


def relayVia(relay, tmp_path: Path, peer: LaxPeer) -> Relay:
    port = freePort()
    return relay(config=smarthostConfig(tmp_path / "var", port, peer.port), port=port).start()


def assertClean(message: LaxMessage) -> None:
    """What the next hop got is one message with CRLF line endings only and no forged transaction."""
    wire = message.wire
    assert wire.count(b"\r") == wire.count(b"\n") == wire.count(b"\r\n"), wire
    assert wire.endswith(b"\r\n.\r\n")
    assert b"\0" not in wire


def onlyOne(peer: LaxPeer, r: Relay) -> LaxMessage:
    assert peer.waitForMessages(1), r.logText()[-3000:]
    time.sleep(SETTLE)
    messages = peer.messages
    assert len(messages) == 1, [m.sender for m in messages]
    # every transaction the next hop saw is the report's, from the null sender
    assert [c[:12] for c in peer.mailCommands] == [b"MAIL FROM:<>"], peer.mailCommands
    return messages[0]


def test_orcpt_attack_is_refused_and_the_success_report_arrives_alone(relay, tmp_path, lax):
    r = relayVia(relay, tmp_path, lax)
    client = Client(r.port)
    assert client.command(b"MAIL FROM:<victim@example.net>").startswith("250")
    refused = client.command(b"RCPT TO:<postmaster@localhost> NOTIFY=SUCCESS ORCPT=" + EVIL_ORCPT)
    assert refused.startswith("501 5.5.4"), refused
    # the session goes on
    assert client.command(b"RCPT TO:<postmaster@localhost> NOTIFY=SUCCESS").startswith("250")
    assert client.command(b"DATA").startswith("354")
    assert client.command(b"Subject: hello\r\n\r\nhi\r\n.").startswith("250")
    client.close()

    report = onlyOne(lax, r)
    assert report.recipients == ["victim@example.net"]
    assertClean(report)
    assert b"Successful Mail Delivery Report" in report.data
    assert b"ceo@relay.localhost" not in report.wire
    assert len(r.delivered("postmaster@localhost")) == 1


@pytest.mark.parametrize("body", [b"", b" BODY=7BIT", b" BODY=8BITMIME"], ids=["none", "7bit", "8bitmime"])
def test_bdat_text_body_with_bare_lf_is_refused(relay, tmp_path, lax, body):
    r = relayVia(relay, tmp_path, lax)
    client = Client(r.port)
    assert client.command(b"MAIL FROM:<victim@example.net>" + body).startswith("250")
    assert client.command(b"RCPT TO:<someone@far.test>").startswith("250")
    refused = client.bdat(b"Subject: chunked\r\n\r\n" + SMUGGLED)
    assert refused.startswith("554 5.6.0"), refused
    assert client.command(b"NOOP").startswith("250")  # the chunk was data, never commands
    client.close()
    time.sleep(SETTLE)
    assert lax.messages == [] and lax.mailCommands == []
    assert "accepted " not in r.logText()


def test_bdat_dot_lines_are_stuffed_for_the_next_hop(relay, tmp_path, lax):
    """Without a bare line ending, a BDAT body may hold a line with one dot: it is content, and stays content."""
    r = relayVia(relay, tmp_path, lax)
    client = Client(r.port)
    body = b"Subject: dots\r\n\r\nbefore\r\n.\r\nMAIL FROM:<ceo@relay.localhost>\r\nDATA\r\n.\r\n..after\r\n"
    assert client.command(b"MAIL FROM:<sender@example.net> BODY=8BITMIME").startswith("250")
    assert client.command(b"RCPT TO:<someone@far.test>").startswith("250")
    assert client.bdat(body).startswith("250")
    client.close()
    assert lax.waitForMessages(1), r.logText()[-3000:]
    time.sleep(SETTLE)
    [message] = lax.messages
    assert message.recipients == ["someone@far.test"]
    assertClean(message)
    assert message.data.endswith(body)  # unstuffed, it is the body byte for byte
    [mail] = lax.mailCommands
    assert mail.startswith(b"MAIL FROM:<sender@example.net>")


def test_binarymime_to_a_hop_without_chunking_is_bounced_and_the_bounce_arrives_alone(relay, tmp_path, lax):
    r = relayVia(relay, tmp_path, lax)
    client = Client(r.port)
    # the smuggling sequence in the header section too: the bounce returns the headers
    binary = b"Subject: binary\r\nX-Smuggle: a\n.\r\nMAIL FROM:<ceo@relay.localhost>\r\n\r\n\0\xff" + SMUGGLED
    assert client.command(b"MAIL FROM:<victim@example.net> BODY=BINARYMIME").startswith("250")
    assert client.command(b"RCPT TO:<someone@far.test>").startswith("250")
    assert client.bdat(binary).startswith("250")  # BINARYMIME may hold anything
    client.close()

    bounce = onlyOne(lax, r)
    assert bounce.recipients == ["victim@example.net"]
    assertClean(bounce)
    assert b"Status: 5.6.3" in bounce.data
    assert b"text/rfc822-headers" in bounce.data
    assert b"\xff" not in bounce.wire and b"pay now" not in bounce.wire  # headers only
    # the header section came back as content: its would-be command is a header line, its dot stuffed
    assert b"\r\nX-Smuggle: a\r\n..\r\nMAIL FROM:<ceo@relay.localhost>\r\n" in bounce.wire
