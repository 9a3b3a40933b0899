"""
The data that travels with a message: envelope, recipients, and typed results.

Every refusal and every delivery outcome is a L{Status}: one SMTP reply code, one
RFC 3463 enhanced code and a text.  Whether a failure is permanent or temporary
is decided here, from the code, and nowhere else.

Envelopes are stored as JSON (see L{Envelope.toJSON}); the message body is never
part of the envelope and never decoded.
"""

from __future__ import annotations

import enum
import functools
import re
from dataclasses import dataclass, field, replace
from typing import Any

_ENHANCED = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")


@dataclass(frozen=True)
class Status:
    """
    An SMTP reply: basic code, enhanced code (RFC 3463) and human text.

    The class of the enhanced code must agree with the basic code; that is
    checked on construction so that a plugin cannot return a 250 that claims
    to be a permanent failure.
    """

    code: int
    enhanced: str
    text: str

    def __post_init__(self) -> None:
        if not 200 <= self.code <= 599:
            raise ValueError(f"SMTP code out of range: {self.code}")
        if not _ENHANCED.match(self.enhanced):
            raise ValueError(f"bad enhanced status code: {self.enhanced!r}")
        if self.enhanced[0] != str(self.code)[0] and self.code // 100 in (2, 4, 5):
            raise ValueError(f"enhanced code {self.enhanced} disagrees with {self.code}")
        if "\r" in self.text or "\n" in self.text:
            raise ValueError("status text must be a single line")

    # The one place an outcome is read from a code.  Only a 2xx is success:
    # a 3xx (or any code a peer had no business sending) where an outcome
    # was due is neither delivered nor failed, so whoever acts on a Status
    # retries it, and nothing is marked delivered that was not.

    @property
    def ok(self) -> bool:
        """Accepted or delivered: a 2xx."""
        return 200 <= self.code < 300

    @property
    def temporary(self) -> bool:
        """A 4xx: try again later."""
        return 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        """A 5xx: nobody should try again."""
        return self.code >= 500

    def reply(self) -> bytes:
        """The reply line as sent on the wire, CRLF included."""
        return self._wire

    @functools.cached_property
    def _wire(self) -> bytes:
        # Statuses are constants sent over and over: encoded once.
        return f"{self.code} {self.enhanced} {self.text}\r\n".encode()

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"

    def toJSON(self) -> dict[str, Any]:
        return {"code": self.code, "enhanced": self.enhanced, "text": self.text}

    @classmethod
    def fromJSON(cls, data: dict[str, Any]) -> Status:
        return cls(int(data["code"]), str(data["enhanced"]), str(data["text"]))


class StatusError(Exception):
    """
    A failure that amounts to one SMTP reply: C{status} is what the affected
    recipients get.  Subclasses say where it happened, so callers catch only
    the ones they can handle.
    """

    def __init__(self, status: Status) -> None:
        super().__init__(str(status))
        self.status = status


def temporary(enhanced: str, text: str, code: int = 451) -> Status:
    """A transient failure: the sender (or our queue) tries again later."""
    return Status(code, enhanced, text)


def permanent(enhanced: str, text: str, code: int = 550) -> Status:
    """A permanent failure: nobody should try again."""
    return Status(code, enhanced, text)


class RecipientState(enum.Enum):
    """Where one recipient of a queued message stands."""

    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


@dataclass
class Recipient:
    """
    One envelope recipient and its own delivery state.

    A message is stored once; each recipient carries its DSN parameters
    (RFC 3461) and its own progress, so a partial delivery never repeats the
    recipients that already succeeded.
    """

    address: str
    notify: tuple[str, ...] | None = None
    orcpt: str | None = None
    state: RecipientState = RecipientState.PENDING
    attempts: int = 0
    next_attempt: float | None = None
    last_status: Status | None = None
    backend: str | None = None

    def toJSON(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "notify": list(self.notify) if self.notify is not None else None,
            "orcpt": self.orcpt,
            "state": self.state.value,
            "attempts": self.attempts,
            "next_attempt": self.next_attempt,
            "last_status": self.last_status.toJSON() if self.last_status else None,
            "backend": self.backend,
        }

    @classmethod
    def fromJSON(cls, data: dict[str, Any]) -> Recipient:
        notify = data.get("notify")
        status = data.get("last_status")
        return cls(
            address=str(data["address"]),
            notify=tuple(notify) if notify is not None else None,
            orcpt=data.get("orcpt"),
            state=RecipientState(data.get("state", "pending")),
            attempts=int(data.get("attempts", 0)),
            next_attempt=data.get("next_attempt"),
            last_status=Status.fromJSON(status) if status else None,
            backend=data.get("backend"),
        )


@dataclass
class Envelope:
    """
    Everything the relay knows about a message except its bytes.

    C{sender} is the reverse path as text; the null reverse path (bounces) is
    the empty string.  C{received_at} is a POSIX timestamp taken from the
    reactor's clock when the message was accepted.
    """

    queue_id: str
    sender: str
    recipients: list[Recipient]
    received_at: float
    size: int = 0
    client_address: str = ""
    helo: str = ""
    body: str = "7BIT"
    smtputf8: bool = False
    ret: str | None = None
    envid: str | None = None
    auth: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    FORMAT = 1

    def pending(self) -> list[Recipient]:
        return [r for r in self.recipients if r.state is RecipientState.PENDING]

    def toJSON(self) -> dict[str, Any]:
        return {
            "format": self.FORMAT,
            "queue_id": self.queue_id,
            "sender": self.sender,
            "recipients": [r.toJSON() for r in self.recipients],
            "received_at": self.received_at,
            "size": self.size,
            "client_address": self.client_address,
            "helo": self.helo,
            "body": self.body,
            "smtputf8": self.smtputf8,
            "ret": self.ret,
            "envid": self.envid,
            "auth": self.auth,
            "extra": self.extra,
        }

    @classmethod
    def fromJSON(cls, data: dict[str, Any]) -> Envelope:
        if data.get("format") != cls.FORMAT:
            raise ValueError(f"unknown envelope format {data.get('format')!r}")
        return cls(
            queue_id=str(data["queue_id"]),
            sender=str(data["sender"]),
            recipients=[Recipient.fromJSON(r) for r in data["recipients"]],
            received_at=float(data["received_at"]),
            size=int(data.get("size", 0)),
            client_address=str(data.get("client_address", "")),
            helo=str(data.get("helo", "")),
            body=str(data.get("body", "7BIT")),
            smtputf8=bool(data.get("smtputf8", False)),
            ret=data.get("ret"),
            envid=data.get("envid"),
            auth=data.get("auth"),
            extra=dict(data.get("extra") or {}),
        )

    def copy(self) -> Envelope:
        return replace(self, recipients=[replace(r) for r in self.recipients], extra=dict(self.extra))


@dataclass(frozen=True)
class DeliveryResult:
    """
    What a delivery backend says about one recipient after one attempt.

    @ivar dsnPassed: for a delivered recipient, who reports success to the
        sender when it asked (NOTIFY=SUCCESS): C{None}, this was the final
        delivery, the relay sends a "delivered" report; C{True}, the next hop
        took the DSN request and reports itself; C{False}, the next hop does
        not do DSN, the relay sends a "relayed" report (RFC 3461 5.2.2).
    @ivar relay: the next hop that gave this status, as C{address:port}
        (C{[address]:port} for IPv6), when there was one: the server the
        attempt actually talked to, which a name with many addresses or an
        MX list leaves unknown otherwise.  Only for the log lines
        (C{relay=}); C{None} for a final delivery or no session.
    """

    recipient: str
    status: Status
    dsnPassed: bool | None = None
    relay: str | None = None

    @property
    def delivered(self) -> bool:
        return self.status.ok


@dataclass(frozen=True)
class QueueScan:
    """
    What L{relay.interfaces.IQueueStore.scan} found.

    @ivar due: C{(due time, queue id)} of the messages due, earliest first.
    @ivar total: the number of committed messages in the store.
    @ivar later: the earliest due time of the messages left out for being due
        later or past the limit (not counting the excluded ones), or C{None}.
    @ivar oldest: when the oldest committed message (excluded ones included)
        arrived, if the store can tell without reading messages; C{None} when
        the store is empty or cannot tell.  It feeds the oldest-queued-age
        metric, which the active set alone would understate.
    """

    due: list[tuple[float, str]]
    total: int
    later: float | None
    oldest: float | None = None
