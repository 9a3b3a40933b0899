"""
What a content filter sees of one message: L{FilterMessage}.

It is a read-only snapshot made once the message data is complete and before
the reply to end-of-data.  The data is in a spool file (or the queue store's
file), never required in memory: L{FilterMessage.open} gives a new file to
read a block at a time, L{FilterMessage.headers} the parsed header block
(bounded).  A filter must not keep it beyond its C{check}.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO

# headers() reads at most this much of the header block and returns at most
# this many fields: a filter is never handed an unbounded list.  A message
# with more has them all delivered; a filter just does not see the excess
# (Postfix's header_size_limit is 100 KB per field, and 1,000 fields is far
# past anything legitimate).
MAX_HEADER_BYTES = 256 * 1024
MAX_HEADERS = 1000

_BLOCK = 64 * 1024


def parseHeaderBlock(
    f: IO[bytes], maxBytes: int = MAX_HEADER_BYTES, maxFields: int = MAX_HEADERS
) -> list[tuple[str, str]]:
    """
    The header fields at the start of C{f}, as C{(name, value)}: unfolded
    (CRLF before a continuation removed, the continuation's whitespace kept),
    the value without the space after the colon nor its line end, decoded as
    UTF-8 with surrogateescape (so that 8-bit octets round-trip).  Stops at
    the empty line, at C{maxBytes} or at C{maxFields}.  A line without a
    colon in the header block ends it (what RFC 5322 readers do with a
    body that starts without the empty line).
    """
    fields: list[tuple[bytes, bytes]] = []
    read = 0
    pending = b""
    done = False
    while not done and read < maxBytes:
        block = f.read(min(_BLOCK, maxBytes - read))
        if not block:
            break
        read += len(block)
        pending += block
        lines = pending.split(b"\n")
        pending = lines.pop()
        for raw in lines:
            line = raw[:-1] if raw.endswith(b"\r") else raw
            if not line:
                done = True
                break
            if line[:1] in (b" ", b"\t") and fields:
                name, value = fields[-1]
                fields[-1] = (name, value + line)
                continue
            name, colon, value = line.partition(b":")
            if not colon or not name or name != name.strip():
                done = True
                break
            if len(fields) >= maxFields:
                done = True
                break
            fields.append((name, value))
    return [(n.decode("ascii", "replace"), _value(v)) for n, v in fields]


def _value(raw: bytes) -> str:
    value = raw.decode("utf-8", "surrogateescape")
    return value[1:] if value[:1] == " " else value


@dataclass(frozen=True)
class FilterMessage:
    """
    One message as a content filter sees it.

    @ivar queue_id: the queue id the message will have (as in the relay's
        Received header and its log lines).
    @ivar sender: the envelope sender, C{""} for the null sender.
    @ivar recipients: the envelope recipients (C{local@domain}), as accepted
        at RCPT TO, or as earlier filters left them.
    @ivar client_address: the client's IP address (the proxied client behind
        a PROXY-protocol balancer).
    @ivar client_port: its port (0 when unknown).
    @ivar helo: what the client said in HELO/EHLO.
    @ivar authenticated: the SMTP AUTH user, or C{None}.
    @ivar tls: whether the session is under TLS.
    @ivar tls_version: e.g. C{"TLSv1.3"}, or C{None}.
    @ivar tls_cipher: e.g. C{"TLS_AES_256_GCM_SHA384"}, or C{None}.
    @ivar relay_client: whether the client's address is in
        C{relay_networks} (whatever its authentication: see
        C{authenticated}); with it, what "outgoing mail" means to a signing
        filter.
    @ivar size: the size of the message data in octets, as L{open} gives it.
    @ivar receivedHeader: the relay's own C{Received:} field (one line,
        folded with CRLF + tab, no final CRLF, starting with C{"Received: "})
        that is prepended when the message is queued.  It is not part of
        L{open} nor L{headers}; a milter plugin sends it first, as Postfix does.
    @ivar hostname: the relay's host name (a milter's C{j} macro).
    """

    queue_id: str
    sender: str
    recipients: tuple[str, ...]
    client_address: str
    client_port: int
    helo: str
    authenticated: str | None
    tls: bool
    tls_version: str | None
    tls_cipher: str | None
    size: int
    receivedHeader: str
    opener: Callable[[], IO[bytes]] = field(repr=False, compare=False)
    relay_client: bool = False
    hostname: str = ""
    _cache: dict[str, object] = field(default_factory=dict, repr=False, compare=False)

    def open(self) -> IO[bytes]:
        """
        A new binary file positioned at the start of the message as received
        (or as earlier filters changed it): CRLF line endings, the header
        block, the empty line, the body; dot-stuffing undone; the relay's
        Received field not included.  The caller closes it.  Each call gives
        an independent file; reading it never disturbs another.
        """
        return self.opener()

    def headers(self) -> list[tuple[str, str]]:
        """
        The message's header fields in order as C{(name, value)}, unfolded,
        values without the leading space (see L{parseHeaderBlock}); at most
        L{MAX_HEADERS} fields from the first L{MAX_HEADER_BYTES} octets.
        Read once and cached: the list is a copy, changing it changes nothing.
        """
        if "headers" not in self._cache:
            with self.open() as f:
                self._cache["headers"] = parseHeaderBlock(f)
        return list(self._cache["headers"])  # type: ignore[call-overload]

    def header(self, name: str) -> str | None:
        """The value of the first field called C{name} (case-insensitive), or C{None}."""
        lower = name.lower()
        for n, v in self.headers():
            if n.lower() == lower:
                return v
        return None
