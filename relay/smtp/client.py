"""
The ESMTP client: one connection to a next hop (smart host or MX).

L{SMTPClient} reads replies and lets L{deliver} drive one session as plain
sequential code: greeting, EHLO (HELO when EHLO is refused), STARTTLS and a
second EHLO, AUTH, then one transaction -- MAIL, every RCPT and DATA in one
flight when the server offers PIPELINING -- and QUIT.  Every wait is bounded
by the RFC 5321 4.5.3.2 client timeouts.

The outcome is one L{relay.envelope.Status} per recipient: what the server
said to that RCPT, or, for the recipients it accepted, what it said at the
end of the data.  A failure before the transaction (no greeting, TLS refused
under a policy that requires it, AUTH refused) is a L{SessionError} with the
status every recipient gets.
"""

from __future__ import annotations

import base64
import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from twisted.internet.defer import Deferred, TimeoutError, fail, succeed
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from relay.envelope import Recipient, Status, StatusError
from relay.smtp.dotwriter import DotWriter
from relay.smtp.params import encodeXtext

# RFC 5321 4.5.3.2, in seconds.  MAIL and RCPT share one (5 minutes each);
# the body is handed to the transport whole, so its blocks are bounded by the
# wait for the end-of-data reply rather than one by one.
GREETING_TIMEOUT = 300.0
MAIL_TIMEOUT = 300.0
DATA_TIMEOUT = 120.0
DATA_END_TIMEOUT = 600.0
QUIT_TIMEOUT = 30.0

CHUNK = 64 * 1024
MAX_REPLY_LINES = 100
MAX_LINE = 4096


class TLSPolicy(enum.Enum):
    NONE = "none"  # never STARTTLS
    OPPORTUNISTIC = "opportunistic"  # STARTTLS when offered, unverified; plain if it fails (by reconnecting)
    REQUIRED = "required"  # STARTTLS or no delivery; certificate not checked
    VERIFY = "verify"  # STARTTLS with a certificate valid for the host name
    IMPLICIT = "implicit"  # TLS from the first byte (the connection is already wrapped)


@dataclass(frozen=True)
class Reply:
    code: int
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        return " ".join(self.lines)

    def status(self, default: str) -> Status:
        """As a Status; the enhanced code from the reply when it carries one (RFC 2034)."""
        first, _, rest = self.lines[0].partition(" ") if self.lines else ("", "", "")
        parts = first.split(".")
        if len(parts) == 3 and all(p.isdigit() for p in parts) and parts[0] == str(self.code // 100):
            return Status(self.code, first, " ".join([rest, *self.lines[1:]]).strip() or first)
        return Status(self.code, default, self.text)


class SessionError(StatusError):
    """The session failed before or outside the transaction: every recipient gets C{status}."""

    def __init__(self, status: Status, tlsFailed: bool = False) -> None:
        super().__init__(status)
        self.tlsFailed = tlsFailed  # the STARTTLS handshake failed: a plain retry may work


class GreetingError(SessionError):
    """No 220 greeting: another host of the destination may do better."""


@dataclass
class Outgoing:
    """One message for one next hop."""

    sender: str
    recipients: Sequence[Recipient]
    openData: Callable[[], BinaryIO]
    size: int = 0
    body: str = "7BIT"
    smtputf8: bool = False
    ret: str | None = None
    envid: str | None = None


@dataclass
class Outcome:
    """Per recipient address, a status; and whether the next hop took the DSN request."""

    statuses: dict[str, Status] = field(default_factory=dict)
    dsnPassed: bool = False


@dataclass
class ClientSettings:
    helo: str
    clock: Any
    tls: TLSPolicy = TLSPolicy.OPPORTUNISTIC
    tlsOptions: Any = None  # IOpenSSLClientConnectionCreator for STARTTLS
    username: str | None = None
    password: str | None = None
    greetingTimeout: float = GREETING_TIMEOUT
    commandTimeout: float = MAIL_TIMEOUT
    dataTimeout: float = DATA_TIMEOUT
    dataEndTimeout: float = DATA_END_TIMEOUT


def _temporary(text: str, enhanced: str = "4.4.2") -> Status:
    return Status(451, enhanced, text)


class SMTPClient(Protocol):
    """Reads replies, one at a time, for L{deliver}."""

    def __init__(self, settings: ClientSettings) -> None:
        self.settings = settings
        self._buffer = b""
        self._lines: list[str] = []
        self._replies: list[Reply] = []
        self._waiting: list[Deferred[Reply]] = []
        self._lost: Failure | None = None
        self.extensions: dict[str, str] = {}
        self.tls = False
        self.repliesReceived = 0
        self.needsReset = False  # a transaction was left open: RSET before the next

    # -- transport ---------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        while b"\n" in self._buffer:
            raw, self._buffer = self._buffer.split(b"\n", 1)
            self._line(raw.rstrip(b"\r").decode("utf-8", "replace"))
        if len(self._buffer) > MAX_LINE:
            self._abort("reply line too long")

    def _line(self, line: str) -> None:
        if len(line) < 3 or not line[:3].isdigit() or (len(line) > 3 and line[3] not in " -"):
            return self._abort(f"bad reply line {line[:80]!r}")
        self._lines.append(line[4:])
        if len(self._lines) > MAX_REPLY_LINES:
            return self._abort("reply too long")
        if len(line) == 3 or line[3] == " ":
            reply = Reply(int(line[:3]), tuple(self._lines))
            self._lines = []
            self.repliesReceived += 1
            if self._waiting:
                self._waiting.pop(0).callback(reply)
            else:
                self._replies.append(reply)

    def _abort(self, why: str) -> None:
        self._lost = Failure(SessionError(_temporary(f"protocol error from server: {why}", "4.5.0")))
        self.transport.abortConnection()

    @property
    def alive(self) -> bool:
        """Connected, and nothing has gone wrong: a session that can be reused."""
        return self._lost is None and self.transport is not None and not self.transport.disconnecting

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self._lost is None:
            self._lost = Failure(SessionError(_temporary("connection lost", "4.4.2")))
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.errback(self._lost)

    # -- for deliver() -----------------------------------------------------

    def reply(self, timeout: float) -> Deferred[Reply]:
        """The next reply, in order; fails if the connection goes or C{timeout} passes."""
        if self._replies:
            return succeed(self._replies.pop(0))
        if self._lost is not None:
            return fail(self._lost)
        d: Deferred[Reply] = Deferred()
        self._waiting.append(d)

        def timedOut(failure: Failure) -> Failure:
            if failure.check(TimeoutError):
                self._lost = Failure(SessionError(_temporary("timeout waiting for the server", "4.4.2")))
                self.transport.abortConnection()
                return self._lost
            return failure

        d.addTimeout(timeout, self.settings.clock)
        d.addErrback(timedOut)
        return d

    def send(self, line: str) -> None:
        self.transport.write(line.encode("utf-8") + b"\r\n")

    def startTLS(self) -> None:
        self.transport.startTLS(self.settings.tlsOptions)
        self.tls = True


def _extensions(reply: Reply) -> dict[str, str]:
    found = {}
    for line in reply.lines[1:]:
        keyword, _, value = line.partition(" ")
        found[keyword.upper()] = value
    return found


async def _hello(client: SMTPClient) -> None:
    settings = client.settings
    client.send(f"EHLO {settings.helo}")
    reply = await client.reply(settings.commandTimeout)
    if reply.code == 250:
        client.extensions = _extensions(reply)
        return
    client.send(f"HELO {settings.helo}")
    reply = await client.reply(settings.commandTimeout)
    if reply.code != 250:
        raise SessionError(reply.status("4.5.0" if reply.code < 500 else "5.5.0"))
    client.extensions = {}


async def _auth(client: SMTPClient) -> None:
    settings = client.settings
    if settings.username is None:
        return
    mechanisms = client.extensions.get("AUTH", "").upper().split()
    user, password = settings.username, settings.password or ""
    if "PLAIN" in mechanisms:
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        client.send(f"AUTH PLAIN {token}")
        reply = await client.reply(settings.commandTimeout)
    elif "LOGIN" in mechanisms:
        client.send("AUTH LOGIN")
        reply = await client.reply(settings.commandTimeout)
        for answer in (user, password):
            if reply.code != 334:
                break
            client.send(base64.b64encode(answer.encode()).decode())
            reply = await client.reply(settings.commandTimeout)
    else:
        # Never sent in the clear to a server that did not offer it.
        raise SessionError(_temporary("smart host offers no AUTH PLAIN or LOGIN", "4.7.0"))
    if reply.code != 235:
        # A wrong password is the operator's to fix: the mail waits, it does not bounce.
        raise SessionError(Status(454 if reply.code >= 500 else reply.code, "4.7.8", f"AUTH refused: {reply.text}"))


async def openSession(client: SMTPClient) -> None:
    """Greeting, EHLO, STARTTLS (by policy) and AUTH."""
    settings = client.settings
    greeting = await client.reply(settings.greetingTimeout)
    if greeting.code != 220:
        raise GreetingError(greeting.status("4.4.2" if greeting.code < 500 else "5.4.0"))
    await _hello(client)
    policy = settings.tls
    if policy in (TLSPolicy.OPPORTUNISTIC, TLSPolicy.REQUIRED, TLSPolicy.VERIFY) and not client.tls:
        if "STARTTLS" not in client.extensions:
            if policy is not TLSPolicy.OPPORTUNISTIC:
                raise SessionError(_temporary("server does not offer STARTTLS, which is required", "4.7.4"))
        else:
            client.send("STARTTLS")
            reply = await client.reply(settings.commandTimeout)
            if reply.code != 220:
                if policy is not TLSPolicy.OPPORTUNISTIC:
                    raise SessionError(_temporary(f"STARTTLS refused: {reply.text}", "4.7.4"))
            else:
                client.startTLS()
                try:
                    await _hello(client)  # the first reply after the handshake: it fails if the handshake does
                except SessionError as e:
                    raise SessionError(
                        _temporary(f"TLS handshake failed: {e.status.text}", "4.7.5"), tlsFailed=True
                    ) from None
    await _auth(client)


def _onWire(client: SMTPClient, address: str) -> str | None:
    """
    The form of an address this server can take: as it is when it is ASCII or
    the server offers SMTPUTF8; with the domain in A-labels (IDNA) when only
    the domain is not ASCII; None when the local part is not ASCII either.
    """
    if address.isascii() or "SMTPUTF8" in client.extensions:
        return address
    local, _, domain = address.rpartition("@")
    if not local.isascii():
        return None
    try:
        return f"{local}@{domain.encode('idna').decode('ascii')}"
    except UnicodeError:
        return None


def _mailCommand(client: SMTPClient, outgoing: Outgoing) -> str:
    params = []
    offered = client.extensions
    if "SIZE" in offered and outgoing.size:
        params.append(f"SIZE={outgoing.size}")
    if outgoing.body in ("8BITMIME", "BINARYMIME") and (
        "8BITMIME" in offered if outgoing.body == "8BITMIME" else "BINARYMIME" in offered
    ):
        params.append(f"BODY={outgoing.body}")
    if outgoing.smtputf8 and "SMTPUTF8" in offered:
        params.append("SMTPUTF8")
    if "DSN" in offered:
        if outgoing.ret:
            params.append(f"RET={outgoing.ret}")
        if outgoing.envid:
            params.append(f"ENVID={encodeXtext(outgoing.envid)}")
    return " ".join([f"MAIL FROM:<{_onWire(client, outgoing.sender)}>", *params])


def _rcptCommand(client: SMTPClient, recipient: Recipient) -> str:
    params = []
    if "DSN" in client.extensions:
        if recipient.notify:
            params.append("NOTIFY=" + ",".join(recipient.notify))
        if recipient.orcpt:
            kind, _, address = recipient.orcpt.partition(";")
            params.append(f"ORCPT={kind};{encodeXtext(address)}")
    return " ".join([f"RCPT TO:<{_onWire(client, recipient.address)}>", *params])


def _unsendable(client: SMTPClient, outgoing: Outgoing) -> Status | None:
    """A message this server cannot take, whatever it says: bounce rather than mangle."""
    addresses = [outgoing.sender, *(r.address for r in outgoing.recipients)]
    if any(_onWire(client, a) is None for a in addresses if a):
        return Status(553, "5.6.7", "next hop does not support SMTPUTF8, which this envelope needs")
    if outgoing.body == "BINARYMIME" and not {"BINARYMIME", "CHUNKING"} <= client.extensions.keys():
        return Status(554, "5.6.3", "next hop does not support BINARYMIME, which this message needs")
    if "SIZE" in client.extensions:
        limit = client.extensions["SIZE"].strip()
        if limit.isdigit() and int(limit) and outgoing.size > int(limit):
            return Status(552, "5.3.4", f"message is larger than the next hop accepts ({limit} bytes)")
    return None


async def transaction(client: SMTPClient, outgoing: Outgoing) -> Outcome:
    """One message: per-recipient statuses (the caller then QUITs or reuses the session)."""
    settings = client.settings
    outcome = Outcome(dsnPassed="DSN" in client.extensions)
    refusal = _unsendable(client, outgoing)
    if refusal is not None:
        outcome.statuses = {r.address: refusal for r in outgoing.recipients}
        return outcome
    pipelining = "PIPELINING" in client.extensions
    if client.needsReset:
        # The previous transaction on this session did not reach its end.
        client.send("RSET")
        if not pipelining:
            await client.reply(settings.commandTimeout)
    reset = client.needsReset and pipelining
    client.needsReset = True  # until this transaction ends
    commands = [_mailCommand(client, outgoing), *(_rcptCommand(client, r) for r in outgoing.recipients)]
    chunking = "CHUNKING" in client.extensions
    if pipelining:
        # RFC 2920: MAIL, every RCPT and DATA in one flight.
        for command in commands:
            client.send(command)
        if not chunking:
            client.send("DATA")
        if reset:
            await client.reply(settings.commandTimeout)  # RSET's, sent first in the flight
        replies = [await client.reply(settings.commandTimeout) for _ in commands]
    else:
        replies = []
        for command in commands:
            client.send(command)
            replies.append(await client.reply(settings.commandTimeout))
            if replies[0].code != 250:
                break
    mail, rcpts = replies[0], replies[1:]
    if mail.code != 250:
        status = mail.status("4.5.0" if mail.code < 500 else "5.5.0")
        outcome.statuses = {r.address: status for r in outgoing.recipients}
        if pipelining and not chunking:
            await client.reply(settings.dataTimeout)  # DATA's reply (an error)
        client.needsReset = False  # no transaction was opened
        return outcome
    accepted = []
    for recipient, reply in zip(outgoing.recipients, rcpts, strict=True):
        if reply.code in (250, 251):
            accepted.append(recipient)
        else:
            outcome.statuses[recipient.address] = reply.status("4.5.0" if reply.code < 500 else "5.1.1")
    if not accepted:
        if pipelining and not chunking:
            data = await client.reply(settings.dataTimeout)
            if data.code == 354:  # a server that takes DATA with no recipient: end it empty
                client.transport.write(b".\r\n")
                await client.reply(settings.dataEndTimeout)
        return outcome
    if chunking:
        end = await _bdat(client, outgoing)
    else:
        if not pipelining:
            client.send("DATA")
        data = await client.reply(settings.dataTimeout)
        if data.code != 354:
            status = data.status("4.5.0" if data.code < 500 else "5.5.0")
            for recipient in accepted:
                outcome.statuses[recipient.address] = status
            return outcome
        end = await _data(client, outgoing)
    status = end.status("4.5.0" if end.code < 500 else "5.5.0") if end.code != 250 else end.status("2.0.0")
    for recipient in accepted:
        outcome.statuses[recipient.address] = status
    client.needsReset = False  # the end-of-data reply ends the transaction, whatever it says
    return outcome


async def _data(client: SMTPClient, outgoing: Outgoing) -> Reply:
    writer = DotWriter()
    with outgoing.openData() as f:
        while chunk := f.read(CHUNK):
            client.transport.write(writer.feed(chunk))
    client.transport.write(writer.end())
    return await client.reply(client.settings.dataEndTimeout)


async def _bdat(client: SMTPClient, outgoing: Outgoing) -> Reply:
    """RFC 3030: chunks sent as they are; one reply per chunk (pipelined)."""
    sent = 0
    with outgoing.openData() as f:
        chunk = f.read(CHUNK)
        while True:
            following = f.read(CHUNK) if chunk else b""
            last = not following
            client.transport.write(f"BDAT {len(chunk)}{' LAST' if last else ''}\r\n".encode() + chunk)
            sent += 1
            if last:
                break
            chunk = following
    replies = [await client.reply(client.settings.dataEndTimeout) for _ in range(sent)]
    for reply in replies:
        if reply.code != 250:
            return reply
    return replies[-1]


async def quit(client: SMTPClient) -> None:
    try:
        client.send("QUIT")
        await client.reply(QUIT_TIMEOUT)
    except Exception:
        pass
    client.transport.loseConnection()
