"""DSNs that Python's email parser reads as valid RFC 3464 reports."""

from __future__ import annotations

import email
import email.policy
import io
import re
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.bounce import Kind, buildReport, recipientsToNotify, wants
from relay.envelope import Envelope, Recipient, RecipientState, Status
from relay.smtp.dotwriter import stuff
from relay.smtp.params import decodeXtext, encodeXtext

ORIGINAL = b"Received: from x\r\n\tby y; now\r\nSubject: the original\r\nFrom: s@example.org\r\n\r\nbody line\r\n"
ORIGINAL_SIZE = len(ORIGINAL)


def envelope(ret=None, size=ORIGINAL_SIZE, sender="s@example.org") -> Envelope:
    return Envelope(
        queue_id="Q123",
        sender=sender,
        recipients=[
            Recipient(
                "gone@far.example",
                orcpt="rfc822;Gone@Far.example",
                state=RecipientState.FAILED,
                last_status=Status(550, "5.1.1", "User unknown"),
            ),
            Recipient("slow@far.example", notify=("DELAY", "FAILURE"), last_status=Status(451, "4.4.1", "no answer")),
            Recipient(
                "ok@far.example",
                notify=("SUCCESS",),
                state=RecipientState.DELIVERED,
                last_status=Status(250, "2.0.0", "ok"),
            ),
        ],
        received_at=1_800_000_000,
        size=size,
        ret=ret,
        envid="ENV-7",
    )


def parse(kind, env, recipients, **kw):
    data = buildReport(env, recipients, kind, "relay.test", io.BytesIO(ORIGINAL), 1_800_003_600, **kw)
    assert b"\r\n" in data and b"\n" not in data.replace(b"\r\n", b"")
    return email.message_from_bytes(data, policy=email.policy.default)


def reports(message):
    report = [p for p in message.walk() if p.get_content_type() == "message/delivery-status"][0]
    perMessage, *perRecipient = report.get_payload()
    return perMessage, perRecipient


def test_failure_report():
    env = envelope()
    message = parse(Kind.FAILURE, env, [env.recipients[0]])
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    assert message["To"].addresses[0].addr_spec == "s@example.org"
    assert message["Auto-Submitted"] == "auto-replied"
    parts = [p.get_content_type() for p in message.iter_parts()]
    assert parts == ["text/plain", "message/delivery-status", "message/rfc822"]
    perMessage, [rcpt] = reports(message)
    assert perMessage["Reporting-MTA"] == "dns; relay.test"
    assert perMessage["Original-Envelope-Id"] == "ENV-7"
    assert rcpt["Action"] == "failed"
    assert rcpt["Status"] == "5.1.1"
    assert rcpt["Final-Recipient"] == "rfc822; gone@far.example"
    assert rcpt["Original-Recipient"] == "rfc822; Gone@Far.example"
    assert rcpt["Diagnostic-Code"] == "smtp; 550 5.1.1 User unknown"
    returned = list(message.iter_parts())[2].get_payload()[0]
    assert returned["Subject"] == "the original"


def test_delay_report_has_headers_only_and_retry_until():
    env = envelope()
    message = parse(Kind.DELAY, env, [env.recipients[1]], retryUntil=1_800_432_000)
    assert [p.get_content_type() for p in message.iter_parts()][-1] == "text/rfc822-headers"
    _, [rcpt] = reports(message)
    assert (rcpt["Action"], rcpt["Status"]) == ("delayed", "4.4.1")
    assert rcpt["Diagnostic-Code"] == "smtp; 451 4.4.1 no answer"
    assert "Will-Retry-Until" in rcpt
    assert b"body line" not in message.as_bytes()


def test_success_report():
    env = envelope()
    message = parse(Kind.SUCCESS, env, [env.recipients[2]])
    _, [rcpt] = reports(message)
    assert (rcpt["Action"], rcpt["Status"]) == ("delivered", "2.0.0")
    assert "Diagnostic-Code" not in rcpt


@pytest.mark.parametrize("ret, size", [("HDRS", ORIGINAL_SIZE), (None, 10_000_000)])
def test_headers_only_for_ret_hdrs_or_large_messages(ret, size):
    env = envelope(ret=ret, size=size)
    message = parse(Kind.FAILURE, env, [env.recipients[0]])
    assert [p.get_content_type() for p in message.iter_parts()][-1] == "text/rfc822-headers"
    assert b"body line" not in message.as_bytes()


def test_who_is_notified():
    env = envelope()
    gone, slow, ok = env.recipients
    assert wants(gone, Kind.FAILURE) and wants(gone, Kind.DELAY) and not wants(gone, Kind.SUCCESS)
    assert wants(slow, Kind.DELAY) and not wants(slow, Kind.SUCCESS)
    assert wants(ok, Kind.SUCCESS) and not wants(ok, Kind.FAILURE)
    assert not wants(Recipient("n@x.example", notify=("NEVER",)), Kind.FAILURE)
    assert recipientsToNotify(envelope(sender=""), [gone], Kind.FAILURE) == []  # never bounce a bounce
    assert recipientsToNotify(env, [gone, ok], Kind.FAILURE) == [gone]


# -- nothing copied into a report can forge a line ------------------------------

# The ORCPT of the issue, as an older version stored it (decoded, unchecked).
EVIL = "x\n.\r\nMAIL FROM:<ceo@relay.localhost>\r\nRCPT TO:<victim2@example.net>\r\nDATA\r\nFrom: CEO\r\n"
# A lax next hop ends the data on a lone dot after any line ending.
LAX_END = re.compile(rb"(?:\A|\r\n|\r|\n)\.(?:\r\n|\r|\n)")


def evilEnvelope(**kwargs) -> Envelope:
    return Envelope(
        queue_id="Q9",
        sender="s@example.org",
        recipients=[
            Recipient(
                "postmaster@localhost",
                notify=("SUCCESS",),
                orcpt="rfc822;" + EVIL,
                state=RecipientState.DELIVERED,
                last_status=Status(250, "2.0.0", "ok"),
            )
        ],
        received_at=1_800_000_000,
        size=ORIGINAL_SIZE,
        **kwargs,
    )


def controlsOutsideLineEndings(data: bytes) -> set[int]:
    """Control octets other than CRLF pairs and the folding TAB."""
    return {b for b in data.replace(b"\r\n", b"") if b < 0x20 and b != 0x09 or b == 0x7F}


def test_a_stored_evil_orcpt_gives_one_message_to_a_lax_receiver():
    env = evilEnvelope(envid="E\r\nMAIL FROM:<x@y>")
    data = buildReport(env, env.recipients, Kind.SUCCESS, "relay.test", io.BytesIO(ORIGINAL), 1_800_003_600)
    wire = stuff(data)
    assert wire.count(b"\r") == wire.count(b"\n") == wire.count(b"\r\n")  # no bare line ending
    assert [m.end() for m in LAX_END.finditer(wire)] == [len(wire)]  # exactly one message
    assert b"\r\nMAIL FROM" not in wire and b"\r\nRCPT TO" not in wire and b"\r\nFrom: CEO" not in wire
    _, [rcpt] = reports(email.message_from_bytes(data, policy=email.policy.default))
    # written as xtext, which RFC 3461 allows, so that nothing of it is lost
    assert rcpt["Original-Recipient"] == "rfc822; " + encodeXtext(EVIL)
    assert decodeXtext(rcpt["Original-Recipient"].split("; ", 1)[1]) == EVIL


@settings(max_examples=300, deadline=None)
@given(
    st.text(max_size=40),
    st.text(max_size=40),
    st.text(max_size=40).filter(lambda t: "\r" not in t and "\n" not in t),
    st.text(max_size=40),
)
def test_no_control_character_reaches_a_report(orcpt, envid, diagnostic, address):
    env = Envelope(
        queue_id="Q1",
        sender="s" + address + "@example.org",
        recipients=[
            Recipient(
                address + "@far.example",
                orcpt=f"rfc822;{orcpt}",
                state=RecipientState.FAILED,
                last_status=Status(550, "5.1.1", diagnostic),
            )
        ],
        received_at=1_800_000_000,
        size=ORIGINAL_SIZE,
        envid=envid or None,
    )
    for kind in (Kind.FAILURE, Kind.SUCCESS):
        data = buildReport(env, env.recipients, kind, "relay.test", io.BytesIO(ORIGINAL), 1_800_003_600)
        assert controlsOutsideLineEndings(data) == set()
        assert set("\x85\u2028\u2029").isdisjoint(data.decode("utf-8"))
        assert max(map(len, data.split(b"\r\n"))) <= 998


def test_long_values_are_cut_to_the_line_limit():
    env = envelope()
    gone = Recipient("gone@far.example", orcpt="rfc822;" + "\x01" * 500, last_status=Status(550, "5.1.1", "é" * 900))
    data = buildReport(env, [gone], Kind.FAILURE, "relay.test", io.BytesIO(ORIGINAL), 1_800_003_600)
    assert max(map(len, data.split(b"\r\n"))) <= 998
    data.decode("utf-8")  # not cut inside a character


def test_binarymime_original_returned_as_headers_only_and_as_text():
    original = b"Subject: bin\rX-Odd: a\nb\0c\r\n\r\n\0\xff\n.\r\nMAIL FROM:<x@y>\r\n"
    env = replace(envelope(), body="BINARYMIME", size=len(original))
    data = buildReport(env, [env.recipients[0]], Kind.FAILURE, "relay.test", io.BytesIO(original), 1_800_003_600)
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert [p.get_content_type() for p in message.iter_parts()][-1] == "text/rfc822-headers"
    assert b"MAIL FROM" not in data and b"\xff" not in data
    assert b"\r\nSubject: bin\r\nX-Odd: a\r\nbc\r\n" in data
    assert controlsOutsideLineEndings(data) == set()


def test_header_section_read_is_bounded():
    class Endless(io.RawIOBase):
        """A binary body with no line end at all."""

        def readable(self) -> bool:
            return True

        def readinto(self, buffer) -> int:
            buffer[:] = b"x" * len(buffer)
            return len(buffer)

    env = replace(envelope(), body="BINARYMIME", size=10**9)
    endless = io.BufferedReader(Endless())
    data = buildReport(env, [env.recipients[0]], Kind.FAILURE, "relay.test", endless, 0, maxReturned=4096)
    assert len(data) < 4096 + 4096
