"""
Delivery status notifications (RFC 3464, RFC 3461, RFC 6522).

What the sender learns: a failure report when a recipient is given up, one
delay warning after C{warn_after}, and a success report where NOTIFY=SUCCESS
asked for it.  Who gets one is decided here too: never the null sender (a
bounce is never bounced), never a recipient that said NOTIFY=NEVER.

The report is built as bytes with CRLF line endings, like every message in the
queue; the original is attached as it was stored (trace headers included),
headers only when RET=HDRS, for delay and success reports, or when it is larger
than C{maxReturned}.
"""

from __future__ import annotations

import enum
import secrets
from collections.abc import Sequence
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import BinaryIO

from relay.envelope import Envelope, Recipient

MAX_RETURNED = 256 * 1024


class Kind(enum.Enum):
    FAILURE = "failed"
    DELAY = "delayed"
    SUCCESS = "delivered"
    RELAYED = "relayed"


_NOTIFY = {Kind.FAILURE: "FAILURE", Kind.DELAY: "DELAY", Kind.SUCCESS: "SUCCESS", Kind.RELAYED: "SUCCESS"}
_SUBJECT = {
    Kind.FAILURE: "Undelivered Mail Returned to Sender",
    Kind.DELAY: "Delayed Mail (still being retried)",
    Kind.SUCCESS: "Successful Mail Delivery Report",
    Kind.RELAYED: "Mail Relayed Report",
}
_INTRO = {
    Kind.FAILURE: "I'm sorry to have to inform you that your message could not\r\n"
    "be delivered to one or more recipients. The report is attached below.",
    Kind.DELAY: "This is a warning only: your message has not been delivered yet\r\n"
    "to the recipients below. Delivery will be tried again; you need not resend it.",
    Kind.SUCCESS: "Your message was delivered to the recipients below.",
    Kind.RELAYED: "Your message was passed on to a server that does not send\r\n"
    "delivery notifications, for the recipients below.",
}


def wants(recipient: Recipient, kind: Kind) -> bool:
    """
    RFC 3461 4.1: with no NOTIFY, failures and delays are reported (our
    choice, as most MTAs do); with NOTIFY, exactly what it lists.
    """
    if recipient.notify is None:
        return kind in (Kind.FAILURE, Kind.DELAY)
    return _NOTIFY[kind] in recipient.notify


def recipientsToNotify(envelope: Envelope, recipients: Sequence[Recipient], kind: Kind) -> list[Recipient]:
    if envelope.sender == "":
        return []
    return [r for r in recipients if wants(r, kind)]


def _date(when: float) -> str:
    return format_datetime(datetime.fromtimestamp(when, UTC))


def _headerSection(original: BinaryIO) -> bytes:
    lines = []
    for line in original:
        if line in (b"\r\n", b"\n"):
            break
        lines.append(line)
    return b"".join(lines)


def _recipientFields(recipient: Recipient, kind: Kind, now: float, retryUntil: float | None) -> list[str]:
    fields = []
    if recipient.orcpt:
        addrType, _, address = recipient.orcpt.partition(";")
        fields.append(f"Original-Recipient: {addrType}; {address}")
    fields.append(f"Final-Recipient: rfc822; {recipient.address}")
    fields.append(f"Action: {kind.value}")
    status = recipient.last_status
    if status is not None:
        fields.append(f"Status: {status.enhanced}")
    else:
        fields.append("Status: " + {Kind.FAILURE: "5.0.0", Kind.DELAY: "4.0.0"}.get(kind, "2.0.0"))
    if status is not None and kind is not Kind.SUCCESS:
        fields.append(f"Diagnostic-Code: smtp; {status.code} {status.enhanced} {status.text}")
    fields.append(f"Last-Attempt-Date: {_date(now)}")
    if kind is Kind.DELAY and retryUntil is not None:
        fields.append(f"Will-Retry-Until: {_date(retryUntil)}")
    return fields


def buildReport(
    envelope: Envelope,
    recipients: Sequence[Recipient],
    kind: Kind,
    reportingMTA: str,
    original: BinaryIO,
    now: float,
    retryUntil: float | None = None,
    maxReturned: int = MAX_RETURNED,
) -> bytes:
    """The whole DSN message, ready to be queued from the null sender to C{envelope.sender}."""
    boundary = f"{envelope.queue_id}.{secrets.token_hex(8)}/{reportingMTA}"
    full = kind is Kind.FAILURE and envelope.ret != "HDRS" and envelope.size <= maxReturned
    if full:
        returned = original.read(maxReturned + 64 * 1024)
        returnedType = "message/rfc822"
        returnedDescription = "Undelivered Message"
    else:
        returned = _headerSection(original)
        returnedType = "text/rfc822-headers"
        returnedDescription = "Message Headers"
    human = [_INTRO[kind], ""]
    for recipient in recipients:
        reason = f": {recipient.last_status}" if recipient.last_status and kind is not Kind.SUCCESS else ""
        human.append(f"<{recipient.address}>{reason}")
    perMessage = [f"Reporting-MTA: dns; {reportingMTA}"]
    if envelope.envid:
        perMessage.append(f"Original-Envelope-Id: {envelope.envid}")
    perMessage.append(f"Arrival-Date: {_date(envelope.received_at)}")
    status = "\r\n".join(perMessage) + "\r\n"
    for recipient in recipients:
        status += "\r\n" + "\r\n".join(_recipientFields(recipient, kind, now, retryUntil)) + "\r\n"
    head = (
        f"From: Mail Delivery System <MAILER-DAEMON@{reportingMTA}>\r\n"
        f"To: <{envelope.sender}>\r\n"
        f"Subject: {_SUBJECT[kind]}\r\n"
        f"Date: {_date(now)}\r\n"
        f"Message-ID: <{envelope.queue_id}.{kind.name.lower()}.{secrets.token_hex(4)}@{reportingMTA}>\r\n"
        "Auto-Submitted: auto-replied\r\n"
        "MIME-Version: 1.0\r\n"
        f'Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary="{boundary}"\r\n'
        "\r\n"
        "This is a MIME-encapsulated message.\r\n"
        "\r\n"
        f"--{boundary}\r\n"
        "Content-Description: Notification\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "\r\n" + "\r\n".join(human) + "\r\n"
        "\r\n"
        f"--{boundary}\r\n"
        "Content-Description: Delivery report\r\n"
        "Content-Type: message/delivery-status\r\n"
        "\r\n" + status + "\r\n"
        f"--{boundary}\r\n"
        f"Content-Description: {returnedDescription}\r\n"
        f"Content-Type: {returnedType}\r\n"
        "\r\n"
    )
    if returned and not returned.endswith(b"\r\n"):
        returned += b"\r\n"
    return head.encode("utf-8") + returned + f"\r\n--{boundary}--\r\n".encode("ascii")
