"""DSNs that Python's email parser reads as valid RFC 3464 reports."""

from __future__ import annotations

import email
import email.policy
import io

import pytest

from relay.bounce import Kind, buildReport, recipientsToNotify, wants
from relay.envelope import Envelope, Recipient, RecipientState, Status

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
