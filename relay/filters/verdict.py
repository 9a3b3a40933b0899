"""
What a content filter answers: one decision and the changes it wants made.

The decisions follow a milter's replies (continue, accept, reject, tempfail,
discard, quarantine), so that the milter plugin maps each reply to one of them
and a Python filter has the same vocabulary:

  - L{FilterDecision.CONTINUE}: no objection, ask the next filter;
  - L{FilterDecision.ACCEPT}: take the message, ask no further filter;
  - L{FilterDecision.REJECT}: refuse it with its 5xx L{Status};
  - L{FilterDecision.TEMPFAIL}: refuse it for now with its 4xx L{Status};
  - L{FilterDecision.DISCARD}: answer 250, keep nothing, log it;
  - L{FilterDecision.HOLD}: queue it held: nothing is delivered until an
    operator's C{relayctl release}.

Modifications are applied whatever the decision, except that a rejected,
tempfailed or discarded message is not kept, so its changes are moot.  They
are applied in this order, each filter's after the previous filter's:
L{FilterVerdict.changeHeaders}, L{FilterVerdict.insertHeaders},
L{FilterVerdict.addHeaders}, L{FilterVerdict.replaceBody}, then recipients
(L{FilterVerdict.removeRecipients}, then L{FilterVerdict.addRecipients}).
A later filter sees the message as the earlier ones left it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import IO

from relay.envelope import Status


class FilterDecision(enum.Enum):
    CONTINUE = "continue"
    ACCEPT = "accept"
    REJECT = "reject"
    TEMPFAIL = "tempfail"
    DISCARD = "discard"
    HOLD = "hold"


def _checkHeader(name: str, value: str | None) -> None:
    # A name or value that would break the header block (or smuggle a second
    # field in) is a plugin's bug: refused here, so it costs a 451 and a log
    # line, never a malformed message on the wire.
    if not name or any(c in name for c in ": \t\r\n") or not name.isascii() or not name.isprintable():
        raise ValueError(f"bad header field name {name!r}")
    if value is not None:
        for line in value.split("\r\n")[1:]:
            if line[:1] not in (" ", "\t"):
                raise ValueError(f"header {name}: a continuation line must start with a space or a tab")
        if "\r" in value.replace("\r\n", "") or "\n" in value.replace("\r\n", ""):
            raise ValueError(f"header {name}: bare CR or LF in its value")


@dataclass(frozen=True)
class FilterVerdict:
    """
    One filter's answer about one message.

    @ivar decision: a L{FilterDecision}.
    @ivar status: the reply for REJECT (a 5xx) and TEMPFAIL (a 4xx); must be
        C{None} otherwise.
    @ivar addHeaders: C{(name, value)} pairs prepended at the top of the
        header block, in the order given (the first ends up first): how a
        C{DKIM-Signature} or C{Authentication-Results} field is added.  A
        value may be folded (C{"\\r\\n\\t"} between lines); it has no final CRLF.
    @ivar insertHeaders: C{(index, name, value)}: insert the field before
        the header at C{index} (0-based, counted in the message's own header
        block, the relay's Received not counted), or at the end of the block
        if C{index} is past it.  A milter's SMFIR_INSHEADER.
    @ivar changeHeaders: C{(name, occurrence, value)}: replace the
        C{occurrence}th (1-based) field called C{name} (case-insensitive) with
        C{value}, or delete it when C{value} is C{None}; an occurrence that
        does not exist adds the field at the end when C{value} is not
        C{None} (what Sendmail does with SMFIR_CHGHEADER).
    @ivar replaceBody: a binary file positioned at the start of the new body
        (CRLF line endings, no header block), read once, a block at a time,
        and closed by the relay; or C{None}.
    @ivar addRecipients: addresses (C{local@domain}) added to the envelope.
    @ivar removeRecipients: addresses removed from it (compared
        case-insensitively on the domain, exactly on the local part).  A
        message left with no recipient is discarded with a log line.
    @ivar reason: a short text for the log line and the trace header, e.g.
        C{"dkim=signed d=example.org s=sel"} or C{"milter rspamd: reject"}.
    """

    decision: FilterDecision = FilterDecision.CONTINUE
    status: Status | None = None
    addHeaders: tuple[tuple[str, str], ...] = ()
    insertHeaders: tuple[tuple[int, str, str], ...] = ()
    changeHeaders: tuple[tuple[str, int, str | None], ...] = ()
    replaceBody: IO[bytes] | None = field(default=None, compare=False)
    addRecipients: tuple[str, ...] = ()
    removeRecipients: tuple[str, ...] = ()
    reason: str = ""

    def __post_init__(self) -> None:
        if self.decision is FilterDecision.REJECT and (self.status is None or not self.status.permanent):
            raise ValueError("reject needs a 5xx status")
        if self.decision is FilterDecision.TEMPFAIL and (self.status is None or not self.status.temporary):
            raise ValueError("tempfail needs a 4xx status")
        if self.decision not in (FilterDecision.REJECT, FilterDecision.TEMPFAIL) and self.status is not None:
            raise ValueError(f"{self.decision.value} takes no status")
        for name, value in self.addHeaders:
            _checkHeader(name, value)
        for _index, name, value in self.insertHeaders:
            _checkHeader(name, value)
        for name, occurrence, value in self.changeHeaders:
            _checkHeader(name, value)
            if occurrence < 1:
                raise ValueError(f"header {name}: occurrence counts from 1, not {occurrence}")
        if "\r" in self.reason or "\n" in self.reason:
            raise ValueError("reason must be a single line")

    @property
    def modifies(self) -> bool:
        """Whether applying it changes the message or its envelope."""
        return bool(
            self.addHeaders
            or self.insertHeaders
            or self.changeHeaders
            or self.replaceBody is not None
            or self.addRecipients
            or self.removeRecipients
        )

    def withHeaders(self, *headers: tuple[str, str]) -> FilterVerdict:
        """This verdict with C{headers} prepended as well (after its own C{addHeaders})."""
        return replace(self, addHeaders=self.addHeaders + tuple(headers))

    def withReason(self, reason: str) -> FilterVerdict:
        return replace(self, reason=reason)


def cont(reason: str = "") -> FilterVerdict:
    """No objection: the next filter decides."""
    return FilterVerdict(FilterDecision.CONTINUE, reason=reason)


def accept(reason: str = "") -> FilterVerdict:
    """Take the message; no further filter is asked."""
    return FilterVerdict(FilterDecision.ACCEPT, reason=reason)


def reject(text: str = "Message content rejected", code: int = 550, enhanced: str = "5.7.1") -> FilterVerdict:
    return FilterVerdict(FilterDecision.REJECT, Status(code, enhanced, text), reason=f"reject {code} {enhanced}")


def tempfail(
    text: str = "Message content temporarily rejected", code: int = 451, enhanced: str = "4.7.1"
) -> FilterVerdict:
    return FilterVerdict(FilterDecision.TEMPFAIL, Status(code, enhanced, text), reason=f"tempfail {code} {enhanced}")


def discard(reason: str = "discarded") -> FilterVerdict:
    """Answer 250 and keep nothing; the log line says so."""
    return FilterVerdict(FilterDecision.DISCARD, reason=reason)


def hold(reason: str = "held") -> FilterVerdict:
    """Queue the message held until C{relayctl release}."""
    return FilterVerdict(FilterDecision.HOLD, reason=reason)


def withHeaders(verdict: FilterVerdict, *headers: tuple[str, str]) -> FilterVerdict:
    """C{verdict} with C{headers} prepended as well."""
    return verdict.withHeaders(*headers)
