"""
The C{milter} content filter: asks a milter about each message, as Postfix
does, and turns its replies and modifications into a L{FilterVerdict}.

One connection per message: the relay runs its filters once the data is
complete, so the whole conversation (connect, helo, mail, rcpt..., data,
headers, end of headers, body, end of message) is replayed then, from the
L{FilterMessage}.  Like Postfix, the relay's own Received field is not shown
to the milter (Sendmail compatibility: a signature must go above the fields
it signs); a header insertion's index counts it, a header change's does not,
again as in Postfix.

How replies map:

  - continue, or accept at any step: no objection (CONTINUE); a milter's
    accept ends that milter's say, not the other filters';
  - reject: 5xx (C{550 5.7.1 Command rejected}, or the milter's
    C{SMFIR_REPLYCODE} text); tempfail: 4xx (C{451 4.7.1 Service
    unavailable - try again later}); discard: DISCARD.  A refusal at RCPT
    refuses the whole message: the recipients were accepted before DATA, and
    dropping one silently would lose its mail;
  - quarantine: HOLD (queued, delivered after C{relayctl release});
  - add, insert and change header, replace body, add and delete recipient:
    the verdict's changes.

A milter that is down, too slow (C{timeout} for each answer), or breaks the
protocol raises L{MilterError}; the relay turns that into C{451 4.3.0}, or
skips the filter with C{on_error = accept}.
"""

from __future__ import annotations

import ipaddress
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString
from twisted.logger import Logger

from relay.envelope import Status
from relay.errors import OptionError
from relay.filters.message import FilterMessage
from relay.filters.verdict import FilterDecision, FilterVerdict
from relay.milter import protocol as P
from relay.milter.client import NO_REPLY, SKIPPED, MilterClient, MilterError, macroList

# Postfix's default macro lists (milter_*_macros), plus the client's address,
# name and port at connect, which Postfix defines for any stage that asks.
DEFAULT_MACROS: dict[int, tuple[str, ...]] = {
    P.STAGE_CONNECT: (
        "j",
        "{daemon_name}",
        "{daemon_addr}",
        "v",
        "_",
        "{client_addr}",
        "{client_name}",
        "{client_port}",
    ),
    P.STAGE_HELO: ("{tls_version}", "{cipher}", "{cipher_bits}", "{cert_subject}", "{cert_issuer}"),
    P.STAGE_ENVFROM: (
        "i",
        "{auth_type}",
        "{auth_authen}",
        "{auth_author}",
        "{mail_addr}",
        "{mail_host}",
        "{mail_mailer}",
    ),
    P.STAGE_ENVRCPT: ("i", "{rcpt_addr}", "{rcpt_host}", "{rcpt_mailer}"),
    P.STAGE_DATA: ("i",),
    P.STAGE_EOH: ("i",),
    P.STAGE_EOM: ("i",),
}

# Postfix's texts for a bare reject or tempfail.
REJECTED = ("Command rejected", 550, "5.7.1")
TEMPFAILED = ("Service unavailable - try again later", 451, "4.7.1")

HEADER_LIMIT = 1024 * 1024  # as the filter runner: a longer header block goes on as body
# Insert an added header past any index: SMFIR_ADDHEADER appends at the end.
AT_END = 1 << 30


def readHeaders(f: IO[bytes], leadingSpace: bool) -> tuple[list[tuple[str, str]], bytes]:
    """
    The header fields at the start of C{f} as a milter gets them: the name,
    and the value with its folding kept as LF (what Sendmail and Postfix send)
    and, unless C{leadingSpace} (SMFIP_HDR_LEADSPC), the space after the
    colon removed.  Stops as the filter runner does: at the empty line (which
    is consumed), at a line that is not a field, or past L{HEADER_LIMIT}.
    @return: the fields, and octets already read that belong to the body.
    """
    raw: list[bytes] = []
    offset = 0
    rest = b""
    while offset < HEADER_LIMIT:
        line = f.readline(HEADER_LIMIT - offset + 1)
        if not line:
            break
        if line in (b"\r\n", b"\n"):
            break
        if line[:1] in (b" ", b"\t") and raw and offset + len(line) <= HEADER_LIMIT:
            raw[-1] += line
            offset += len(line)
            continue
        name, colon, _ = line.partition(b":")
        if (
            not colon
            or not name
            or name != name.strip()
            or offset + len(line) > HEADER_LIMIT
            or not line.endswith(b"\n")
        ):
            rest = line
            break
        raw.append(line)
        offset += len(line)
    fields = []
    for field in raw:
        name, _, value = field.partition(b":")
        value = value.rstrip(b"\r\n").replace(b"\r\n", b"\n")
        if not leadingSpace:
            value = value.lstrip(b" \t")
        fields.append((name.decode("ascii", "replace"), value.decode("utf-8", "surrogateescape")))
    return fields, rest


def _family(address: str) -> bytes:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return P.FAMILY_UNKNOWN
    return P.FAMILY_INET if ip.version == 4 else P.FAMILY_INET6


def _address(text: str, what: str) -> str:
    address = text.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    if not address or "@" not in address or any(c in address for c in "<> \t\r\n"):
        raise MilterError(f"{what}: bad address {text[:80]!r}")
    return address


def _headerValue(value: str, leadingSpace: bool) -> str:
    # Milters fold with LF (libmilter's documentation) or CRLF; the message has CRLF.
    if leadingSpace and value[:1] == " ":
        value = value[1:]
    return value.replace("\r\n", "\n").replace("\n", "\r\n")


class _BodyWriter:
    """The chunks of SMFIR_REPLBODY, to a temporary file, line ends made CRLF, bounded."""

    def __init__(self, directory: Path, limit: int) -> None:
        self.file = tempfile.TemporaryFile(dir=directory, prefix="milter-body-")
        self.limit = limit
        self.size = 0
        self.carry = b""

    def write(self, chunk: bytes) -> None:
        data = self.carry + chunk
        self.carry = b""
        if data.endswith(b"\r"):
            data, self.carry = data[:-1], b"\r"
        data = re.sub(rb"\r\n|\r|\n", b"\r\n", data)
        self.size += len(data)
        if self.size > self.limit:
            raise MilterError(f"replaced body over {self.limit} octets")
        self.file.write(data)

    def finish(self) -> IO[bytes]:
        if self.carry:
            self.file.write(b"\r\n")
        self.file.seek(0)
        return self.file


class MilterFilter:
    """
    L{relay.interfaces.IMessageFilter} over one milter.

    @ivar name: the C{[filter:NAME]} name, in texts and reasons.
    @ivar connect: returns a new client endpoint for each message.
    """

    log = Logger()

    def __init__(
        self,
        name: str,
        endpoint: Any,
        clock: Any,
        timeout: float,
        blocking: Any,
        state_dir: Path,
        daemonName: str = "relay",
    ) -> None:
        self.name = name
        self.endpoint = endpoint
        self.clock = clock
        self.timeout = timeout
        self.blocking = blocking
        self.state_dir = Path(state_dir)
        self.daemonName = daemonName
        self._clients: set[MilterClient] = set()

    def check(self, message: FilterMessage) -> Deferred[FilterVerdict]:
        return Deferred.fromCoroutine(self._check(message))

    def stop(self) -> None:
        for client in list(self._clients):
            client.close()

    async def _check(self, message: FilterMessage) -> FilterVerdict:
        client = MilterClient(self.endpoint, self.clock, self.timeout, self.name)
        self._clients.add(client)
        f: IO[bytes] | None = None
        try:
            await client.open()
            verdict, f = await self._converse(client, message)
            return verdict
        finally:
            self._clients.discard(client)
            client.close()
            if f is not None:
                f.close()

    def _macros(self, message: FilterMessage) -> dict[str, str]:
        values = {
            "j": message.hostname or "localhost",
            "{daemon_name}": self.daemonName,
            "v": "relay",
            "_": f"unknown [{message.client_address}]",
            "{client_addr}": message.client_address,
            "{client_name}": "unknown",
            "{client_port}": str(message.client_port),
            "i": message.queue_id,
            "{mail_addr}": message.sender,
            "{mail_mailer}": "smtp",
        }
        if message.tls:
            values["{tls_version}"] = message.tls_version or "TLS"
            if message.tls_cipher:
                values["{cipher}"] = message.tls_cipher
        if message.authenticated:
            values["{auth_authen}"] = message.authenticated
        if "@" in message.sender:
            values["{mail_host}"] = message.sender.rpartition("@")[2]
        return values

    async def _converse(self, client: MilterClient, message: FilterMessage) -> tuple[FilterVerdict, IO[bytes] | None]:
        values = self._macros(message)

        def macros(stage: int) -> list[tuple[str, str]]:
            return macroList(values, client.macroNames(stage, DEFAULT_MACROS[stage]))

        address = message.client_address
        family = _family(address)
        steps: list[tuple[bytes, bytes, int | None]] = [
            (P.CONNECT, P.encodeConnect(f"[{address}]", family, message.client_port, address), P.STAGE_CONNECT),
            (P.HELO, P.encodeHelo(message.helo or address), P.STAGE_HELO),
            (P.MAIL, P.encodeMail([f"<{message.sender}>"]), P.STAGE_ENVFROM),
        ]
        for command, encoded, stage in steps:
            reply = await client.step(command, encoded, macros(stage) if stage is not None else ())
            early = self._early(reply, command)
            if early is not None:
                client.abort()
                return early, None
        for rcpt in message.recipients:
            values["{rcpt_addr}"] = rcpt
            values["{rcpt_host}"] = rcpt.rpartition("@")[2]
            values["{rcpt_mailer}"] = "smtp"
            reply = await client.step(P.RCPT, P.encodeRcpt([f"<{rcpt}>"]), macros(P.STAGE_ENVRCPT))
            early = self._early(reply, P.RCPT)
            if early is not None:
                client.abort()
                return early, None
        for key in ("{rcpt_addr}", "{rcpt_host}", "{rcpt_mailer}"):
            values.pop(key, None)
        reply = await client.step(P.DATA, P.encodeSimple(P.DATA), macros(P.STAGE_DATA))
        early = self._early(reply, P.DATA)
        if early is not None:
            client.abort()
            return early, None

        assert client.options is not None
        leading = bool(client.options.protocol & P.SMFIP_HDR_LEADSPC)
        f = await self.blocking(message.open)
        try:
            fields, rest = await self.blocking(readHeaders, f, leading)
            if client.wants(P.HEADER):
                for name, value in fields:
                    reply = await client.step(P.HEADER, P.encodeHeader(name, value))
                    early = self._early(reply, P.HEADER)
                    if early is not None:
                        client.abort()
                        return early, f
            reply = await client.step(P.EOH, P.encodeSimple(P.EOH), macros(P.STAGE_EOH))
            early = self._early(reply, P.EOH)
            if early is not None:
                client.abort()
                return early, f
            if client.wants(P.BODY):
                pending = rest
                while True:
                    if len(pending) < P.BODY_CHUNK:
                        more = await self.blocking(f.read, P.BODY_CHUNK)
                        pending += more
                        if not more and not pending:
                            break
                    chunk, pending = pending[: P.BODY_CHUNK], pending[P.BODY_CHUNK :]
                    reply = await client.step(P.BODY, P.encodeBody(chunk))
                    if isinstance(reply, P.Simple) and reply.command == P.SKIP:
                        break
                    early = self._early(reply, P.BODY)
                    if early is not None:
                        client.abort()
                        return early, f
            changes, final = await client.endOfMessage(macros(P.STAGE_EOM))
            return self._verdict(changes, final, message, leading), f
        except BaseException:
            f.close()
            raise

    def _refusal(self, reply: P.Reply) -> FilterVerdict | None:
        """The verdict for a final reply that refuses the message, or None."""
        if isinstance(reply, P.ReplyCode):
            decision = FilterDecision.REJECT if reply.code >= 500 else FilterDecision.TEMPFAIL
            status = Status(reply.code, reply.enhanced, reply.text or REJECTED[0])
            return FilterVerdict(
                decision, status, reason=f"milter {self.name}: {decision.value} {reply.code} {reply.enhanced}"
            )
        assert isinstance(reply, P.Simple)
        if reply.command == P.REJECT:
            text, code, enhanced = REJECTED
            return FilterVerdict(
                FilterDecision.REJECT, Status(code, enhanced, text), reason=f"milter {self.name}: reject"
            )
        if reply.command == P.TEMPFAIL:
            text, code, enhanced = TEMPFAILED
            return FilterVerdict(
                FilterDecision.TEMPFAIL, Status(code, enhanced, text), reason=f"milter {self.name}: tempfail"
            )
        if reply.command == P.DISCARD:
            return FilterVerdict(FilterDecision.DISCARD, reason=f"milter {self.name}: discard")
        return None

    def _early(self, reply: P.Reply, command: bytes) -> FilterVerdict | None:
        """A reply before the end of the message: None to go on, else the verdict."""
        if reply is SKIPPED or reply is NO_REPLY:
            return None
        if isinstance(reply, P.Simple) and reply.command == P.CONTINUE:
            return None
        if isinstance(reply, P.Simple) and reply.command == P.ACCEPT:
            return FilterVerdict(FilterDecision.CONTINUE, reason=f"milter {self.name}: accept")
        refusal = self._refusal(reply)
        if refusal is None:
            raise MilterError(f"milter {self.name}: unexpected {reply} at {command!r}")
        return refusal

    def _verdict(self, changes: list[P.Reply], final: P.Reply, message: FilterMessage, leading: bool) -> FilterVerdict:
        refusal = self._refusal(final)
        if refusal is not None:
            return refusal  # the message is not kept: its changes are moot
        inserts: list[tuple[int, str, str]] = []
        edits: list[tuple[str, int, str | None]] = []
        added: list[str] = []
        removed: list[str] = []
        quarantine: str | None = None
        body: _BodyWriter | None = None
        try:
            for change in changes:
                if isinstance(change, P.HeaderChange):
                    value = _headerValue(change.value, leading)
                    if change.command == P.ADDHEADER:
                        inserts.append((AT_END, change.name, value))
                    elif change.command == P.INSHEADER:
                        # Postfix counts its own Received field (index 0 is above it); the relay's
                        # is always on top, so index 0 and 1 both mean the top of the message's own.
                        inserts.append((max(0, change.index - 1), change.name, value))
                    else:
                        edits.append((change.name, max(1, change.index), value if value.strip() else None))
                elif isinstance(change, P.RecipientChange):
                    address = _address(change.address, f"milter {self.name}")
                    (added if change.command in (P.ADDRCPT, P.ADDRCPT_PAR) else removed).append(address)
                elif isinstance(change, P.ReplaceBody):
                    if body is None:
                        body = _BodyWriter(self.state_dir, 2 * message.size + 1024 * 1024)
                    body.write(change.chunk)
                elif isinstance(change, P.Quarantine):
                    quarantine = change.reason
            decision = FilterDecision.CONTINUE if quarantine is None else FilterDecision.HOLD
            what = "continue" if isinstance(final, P.Simple) and final.command == P.CONTINUE else "accept"
            reason = f"milter {self.name}: " + (
                f"quarantine ({_oneLine(quarantine)})" if quarantine is not None else what
            )
            return FilterVerdict(
                decision,
                insertHeaders=tuple(inserts),
                changeHeaders=tuple(edits),
                replaceBody=body.finish() if body is not None else None,
                addRecipients=tuple(added),
                removeRecipients=tuple(removed),
                reason=reason,
            )
        except BaseException:
            if body is not None:
                body.file.close()
            raise


def _oneLine(text: str) -> str:
    return " ".join(text.split())[:120]


def _endpointCheck(reactor: Any, text: str) -> Any:
    if not text:
        raise OptionError("endpoint", "the milter's address is required: tcp:HOST:PORT or unix:PATH")
    kind = text.partition(":")[0]
    if kind not in ("tcp", "unix"):
        raise OptionError("endpoint", f"tcp:HOST:PORT or unix:PATH, not {text!r}")
    try:
        return clientFromString(reactor, text)
    except Exception as e:
        raise OptionError("endpoint", f"{text!r} is not a client endpoint: {e}") from None


def build(options: Mapping[str, str], context: Any) -> MilterFilter:
    """A L{MilterFilter} from the keys of its C{[filter:NAME]} section; L{OptionError} names the bad key."""
    from relay.config import parse_duration

    endpoint = _endpointCheck(context.reactor, (options.get("endpoint") or "").strip())
    try:
        timeout = parse_duration(options.get("timeout", "30s"))
    except ValueError as e:
        raise OptionError("timeout", str(e)) from None
    if timeout <= 0:
        raise OptionError("timeout", "must be more than 0")
    daemonName = (options.get("daemon_name") or "relay").strip()
    if not daemonName or not daemonName.isprintable():
        raise OptionError("daemon_name", f"a name, not {daemonName!r}")
    name = context.section.partition(":")[2] or context.section or "milter"
    return MilterFilter(name, endpoint, context.reactor, timeout, context.blocking, context.state_dir, daemonName)
