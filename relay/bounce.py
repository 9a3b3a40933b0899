"""
Delivery status notifications (RFC 3464, RFC 3461, RFC 6522).

What the sender learns: a failure report when a recipient is given up, one
delay warning after C{warn_after}, and a success report where NOTIFY=SUCCESS
asked for it.  Who gets one is decided here too: never the null sender (a
bounce is never bounced), never a recipient that said NOTIFY=NEVER.

The report is built as bytes with CRLF line endings, like every message in the
queue; the original is attached as it was stored (trace headers included),
headers only when RET=HDRS, for delay and success reports, when it is larger
than C{maxReturned}, or when it is BODY=BINARYMIME (the report itself is
8BITMIME text, which a binary body cannot be part of).

Nothing we copy into the report can forge a line of it, or of the SMTP session
that carries it: ORCPT and ENVID values that are not printable ASCII are
written as xtext (RFC 3461 allows it, and our server refuses them anyway, but
an envelope stored by an older version or written by a plugin may hold one),
any other control character in an address or a remote server's text is shown
as \\xHH, each field line is kept within 998 octets, and the returned original
has its line endings made CRLF and its NUL octets removed.
"""

from __future__ import annotations

import enum
import re
import secrets
from collections.abc import Sequence
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import BinaryIO

from relay.envelope import Envelope, Recipient
from relay.smtp.params import encodeXtext, isPrintableASCII

MAX_RETURNED = 256 * 1024
MAX_FIELD = 998  # octets in a header or DSN field line (RFC 5322 2.1.1)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_ADDR_TYPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*$")


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


def _headerSection(original: BinaryIO, limit: int) -> bytes:
    """The original's header section, at most C{limit} octets of it (a binary body may have no line end at all)."""
    lines = []
    left = limit
    while left > 0:
        line = original.readline(left)
        if not line or line in (b"\r\n", b"\n"):
            break
        lines.append(line)
        left -= len(line)
    return b"".join(lines)


def _crlf(data: bytes) -> bytes:
    """C{data} with CRLF line endings only and no NUL: what the queue holds as text."""
    return data.replace(b"\0", b"").replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


def _visible(text: str) -> str:
    """C{text} with every control character (C0, DEL, C1, line separators) shown as \\xHH."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02X}", text)


def _xtextIfNeeded(text: str) -> str:
    """ORCPT and ENVID as stored, or their xtext where they are not printable ASCII (RFC 3461 4.2, 5.4)."""
    return text if isPrintableASCII(text) else encodeXtext(text)


def _cut(line: str) -> str:
    """C{line} cut to L{MAX_FIELD} octets, so that no next hop has to fold or refuse it."""
    encoded = line.encode("utf-8")
    if len(encoded) <= MAX_FIELD:
        return line
    return encoded[:MAX_FIELD].decode("utf-8", "ignore")


def _line(name: str, value: str) -> str:
    return _cut(f"{name}: {value}")


def _recipientFields(recipient: Recipient, kind: Kind, now: float, retryUntil: float | None) -> list[str]:
    fields = []
    if recipient.orcpt:
        addrType, _, address = recipient.orcpt.partition(";")
        if not _ADDR_TYPE.match(addrType):
            addrType = "rfc822"
        fields.append(_line("Original-Recipient", f"{addrType}; {_xtextIfNeeded(address)}"))
    fields.append(_line("Final-Recipient", f"rfc822; {_visible(recipient.address)}"))
    fields.append(f"Action: {kind.value}")
    status = recipient.last_status
    if status is not None:
        fields.append(_line("Status", _visible(status.enhanced)))
    else:
        fields.append("Status: " + {Kind.FAILURE: "5.0.0", Kind.DELAY: "4.0.0"}.get(kind, "2.0.0"))
    if status is not None and kind is not Kind.SUCCESS:
        fields.append(_line("Diagnostic-Code", _visible(f"smtp; {status.code} {status.enhanced} {status.text}")))
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
    full = (
        kind is Kind.FAILURE
        and envelope.ret != "HDRS"
        and envelope.size <= maxReturned
        and envelope.body != "BINARYMIME"
    )
    if full:
        returned = original.read(maxReturned + 64 * 1024)
        returnedType = "message/rfc822"
        returnedDescription = "Undelivered Message"
    else:
        returned = _headerSection(original, maxReturned)
        returnedType = "text/rfc822-headers"
        returnedDescription = "Message Headers"
    returned = _crlf(returned)
    human = [_INTRO[kind], ""]
    for recipient in recipients:
        reason = f": {recipient.last_status}" if recipient.last_status and kind is not Kind.SUCCESS else ""
        human.append(_cut(_visible(f"<{recipient.address}>{reason}")))
    perMessage = [f"Reporting-MTA: dns; {reportingMTA}"]
    if envelope.envid:
        perMessage.append(_line("Original-Envelope-Id", _xtextIfNeeded(envelope.envid)))
    perMessage.append(f"Arrival-Date: {_date(envelope.received_at)}")
    status = "\r\n".join(perMessage) + "\r\n"
    for recipient in recipients:
        status += "\r\n" + "\r\n".join(_recipientFields(recipient, kind, now, retryUntil)) + "\r\n"
    to = _line("To", f"<{_visible(envelope.sender)}>")
    head = (
        f"From: Mail Delivery System <MAILER-DAEMON@{reportingMTA}>\r\n"
        f"{to}\r\n"
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
