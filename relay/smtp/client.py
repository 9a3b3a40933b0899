"""
The ESMTP client: one connection to a next hop (smart host or MX).

L{SMTPClient} reads replies and lets L{deliver} drive one session as plain
sequential code: greeting, EHLO (HELO when EHLO is refused), STARTTLS and a
second EHLO, AUTH, then one transaction -- MAIL, every RCPT and DATA in one
flight when the server offers PIPELINING -- and QUIT.  Every wait is bounded
by the RFC 5321 4.5.3.2 client timeouts.

Every reply is classified once, by L{expect}, against the command it answers:
the positive codes that command asks for, 4xx (temporary) or 5xx (permanent).
Anything else -- a 2xx or 3xx where it was not asked for, a code outside
200-599, a reply nobody asked for -- means the server and we no longer agree
on where the session stands.  Then nothing it said in this transaction is
trusted: the session is closed (never reused) and every recipient of the
transaction is deferred, never marked delivered and never bounced.

The body is streamed: a push producer reads the queued file a block at a
time and writes it as fast as the connection drains, so memory per session
stays bounded whatever the message size, and a next hop that stops reading
for longer than the data-block timeout costs the session, not the process.

The outcome is one L{relay.envelope.Status} per recipient: what the server
said to that RCPT, or, for the recipients it accepted, what it said at the
end of the data.  A failure before the transaction (no greeting, TLS refused
under a policy that requires it, AUTH refused) is a L{SessionError} with the
status every recipient gets.
"""

from __future__ import annotations

import base64
import enum
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from twisted.internet import tcp
from twisted.internet.defer import Deferred, TimeoutError, fail, succeed
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from relay.envelope import Recipient, Status, StatusError
from relay.fsutil import writeNow
from relay.smtp.dotwriter import DotWriter, LineEndings
from relay.smtp.params import encodeXtext

# RFC 5321 4.5.3.2, in seconds.  MAIL and RCPT share one (5 minutes each).
GREETING_TIMEOUT = 300.0
MAIL_TIMEOUT = 300.0
DATA_TIMEOUT = 120.0  # the reply to DATA
BLOCK_TIMEOUT = 180.0  # each block of the body: the next hop must take it in this time
DATA_END_TIMEOUT = 600.0  # the reply to the end of the data
QUIT_TIMEOUT = 30.0

CHUNK = 256 * 1024
# What one turn of the reactor sends straight into a socket that takes it,
# before letting other connections have theirs.
DIRECT_PER_TURN = 4 * CHUNK
MAX_REPLY_LINES = 100
MAX_LINE = 4096
# One reply, all its lines: far more than any EHLO reply needs.
MAX_REPLY_OCTETS = 64 * 1024
# Replies received but not yet read by deliver() (owed ones: a pipelined flight
# of many RCPTs) above this: stop reading the socket until they are read.
REPLY_BUFFER = 64 * 1024
MAX_STATUS_TEXT = 1000  # of a peer's reply kept in a recipient's status (envelope, DSN, logs)


class TLSPolicy(enum.Enum):
    NONE = "none"  # never STARTTLS
    OPPORTUNISTIC = "opportunistic"  # STARTTLS when offered, unverified; plain if it fails (by reconnecting)
    REQUIRED = "required"  # STARTTLS or no delivery; certificate not checked
    VERIFY = "verify"  # STARTTLS with a certificate valid for the host name
    IMPLICIT = "implicit"  # TLS from the first byte (the connection is already wrapped)


class Stage(enum.Enum):
    """
    What a reply answers, with the codes that mean "yes" to it (RFC 5321
    4.3.2, RFC 3030, RFC 3207, RFC 4954).  4xx and 5xx are in step with any
    command; every other code is in step with none but these.
    """

    GREETING = ("greeting", frozenset({220}))
    EHLO = ("EHLO", frozenset({250}))
    HELO = ("HELO", frozenset({250}))
    STARTTLS = ("STARTTLS", frozenset({220}))
    AUTH = ("AUTH", frozenset({235, 334}))
    RSET = ("RSET", frozenset({250}))
    MAIL = ("MAIL", frozenset({250}))
    RCPT = ("RCPT", frozenset({250, 251, 252}))
    DATA = ("DATA", frozenset({354}))
    END = ("end of data", frozenset({250}))
    BDAT = ("BDAT", frozenset({250}))

    def __init__(self, label: str, positive: frozenset[int]) -> None:
        self.label = label
        self.positive = positive


@dataclass(frozen=True)
class Reply:
    code: int
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        return " ".join(self.lines)

    @property
    def inStep(self) -> bool:
        """A refusal: an answer any command may get."""
        return 400 <= self.code <= 599

    def status(self, default: str | None = None) -> Status:
        """
        As a Status; the enhanced code from the reply when it carries one of
        the right class (RFC 2034), else C{default} if it is of the right
        class, else the class's X.0.0.  Only for 2xx, 4xx and 5xx replies.
        """
        klass = str(self.code // 100)
        first, _, rest = self.lines[0].partition(" ") if self.lines else ("", "", "")
        parts = first.split(".")
        if len(parts) == 3 and all(p.isdigit() and len(p) <= 3 for p in parts) and parts[0] == klass:
            text = " ".join([rest, *self.lines[1:]]).strip() or first
            return Status(self.code, first, _printable(text, MAX_STATUS_TEXT))
        enhanced = default if default is not None and default[:1] == klass else f"{klass}.0.0"
        return Status(self.code, enhanced, _printable(self.text, MAX_STATUS_TEXT) or str(self.code))

    def firstWord(self) -> str:
        return self.lines[0].split(" ", 1)[0].lower() if self.lines else ""


class SessionError(StatusError):
    """The session failed before or outside the transaction: every recipient gets C{status}."""

    def __init__(self, status: Status, tlsFailed: bool = False) -> None:
        super().__init__(status)
        self.tlsFailed = tlsFailed  # the STARTTLS handshake failed: a plain retry may work
        self.peer: str | None = None  # the server it failed with (peerOf), set by whoever holds the client


class GreetingError(SessionError):
    """No 220 greeting, or a refused EHLO/HELO that is not final: another host of the destination may do better."""


class LoopError(SessionError):
    """The server greets with our own name: the mail would come back to us (RFC 5321 5.1's "loops back to myself")."""


class TLSPolicyError(SessionError):
    """
    The next hop does not meet the destination's TLS policy (MTA-STS, DANE):
    it is not given the message, another MX may be.  C{result} is the
    RFC 8460 result type, for TLS reporting.
    """

    def __init__(self, status: Status, result: str) -> None:
        super().__init__(status)
        self.result = result


class OutOfStep(SessionError):
    """A reply that does not answer the command it follows: the session can no longer be trusted."""


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
    """
    Per recipient address, a status; whether the next hop took the DSN
    request; and who that next hop was (L{peerOf}), for the log lines.
    """

    statuses: dict[str, Status] = field(default_factory=dict)
    dsnPassed: bool = False
    peer: str | None = None
    tls: bool = False  # the session was encrypted (STARTTLS or implicit TLS)
    verified: bool = False  # ... and the peer was authenticated (VERIFY or checkPeer): MTA-STS, DANE


def peerOf(client: Any) -> str | None:
    """
    The address and port the client's connection reached (C{[v6]:port} for
    IPv6), or C{None} without one: the next hop actually used, whatever name
    or MX led to it.
    """
    transport = getattr(client, "transport", None)
    if transport is None:
        return None
    peer = transport.getPeer()
    host, port = getattr(peer, "host", None), getattr(peer, "port", None)
    if host is None or port is None:
        return None
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


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
    blockTimeout: float = BLOCK_TIMEOUT
    dataEndTimeout: float = DATA_END_TIMEOUT
    # After STARTTLS and the second EHLO, before anything of the mail is sent:
    # checkPeer(client) -> whether the peer was authenticated, or raises
    # TLSPolicyError to refuse it (DANE checks the certificate chain so).
    checkPeer: Callable[[Any], bool] | None = None


def _tlsReason(reason: Failure | None) -> str:
    """
    Why a TLS connection went, when TLS said why: OpenSSL's reasons
    (C{certificate verify failed}, C{certificate has expired}), or
    service_identity's name mismatch.  MTA-STS and TLS reporting tell the
    failures apart by it.
    """
    value = getattr(reason, "value", None)
    if value is None:
        return ""
    if type(value).__name__ == "VerificationError":  # service_identity, through Twisted's ClientTLSOptions
        return f": certificate does not match the host name ({_printable(str(value), 200)})"
    queue = value.args[0] if value.args else None
    if isinstance(queue, list) and queue and all(isinstance(entry, tuple) for entry in queue):  # OpenSSL.SSL.Error
        return ": " + _printable("; ".join(str(entry[-1]) for entry in queue if entry), 200)
    return ""


def _temporary(text: str, enhanced: str = "4.4.2") -> Status:
    return Status(451, enhanced, text)


def _printable(text: str, limit: int = 120) -> str:
    """Peer text for our own statuses and logs: one line, no control characters, bounded."""
    cleaned = "".join(c if c.isprintable() else "?" for c in text[:limit])
    return cleaned + ("..." if len(text) > limit else "")


class SMTPClient(Protocol):
    """
    Reads replies, one at a time, for L{deliver}.

    It counts the replies it is owed (one per command sent, one for the
    greeting): a reply beyond that is one nobody asked for, and the
    connection is closed at once.  So what a server can make us hold is
    bounded by what we sent, whatever it floods us with.  Each reply is
    bounded too (C{MAX_REPLY_LINES}, C{MAX_REPLY_OCTETS}), and while the
    replies received but not yet read exceed C{REPLY_BUFFER} (a pipelined
    flight of a thousand RCPTs, each answered at length), the socket is not
    read: the next hop's replies wait in its own buffers, not in ours.
    """

    def __init__(self, settings: ClientSettings) -> None:
        self.settings = settings
        self._buffer = b""
        self._lines: list[str] = []
        self._lineOctets = 0
        self._replies: list[Reply] = []
        self._queuedOctets = 0  # of the replies in _replies
        self.readingPaused = False
        self._waiting: list[Deferred[Reply]] = []
        self._lost: Failure | None = None
        self._owed = 1  # the greeting
        self.extensions: dict[str, str] = {}
        self.tls = False
        self.verified = False  # the peer's certificate was checked (VERIFY, or checkPeer said so)
        self.repliesReceived = 0
        self.needsReset = False  # a transaction was left open: RSET before the next

    # -- transport ---------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._lost is not None:
            return
        buffer = self._buffer + data if self._buffer else data
        start = 0
        while self._lost is None:
            nl = buffer.find(b"\n", start)
            if nl == -1:
                break
            if nl - start > MAX_LINE:
                return self._abort("reply line too long")
            self._line(buffer[start:nl].rstrip(b"\r").decode("utf-8", "replace"))
            start = nl + 1
        self._buffer = buffer[start:] if self._lost is None else b""
        if len(self._buffer) > MAX_LINE:
            self._buffer = b""
            self._abort("reply line too long")

    def _line(self, line: str) -> None:
        if len(line) < 3 or not line[:3].isdigit() or (len(line) > 3 and line[3] not in " -"):
            return self._abort(f"bad reply line {_printable(line, 80)!r}")
        self._lines.append(line[4:])
        self._lineOctets += len(line)
        if len(self._lines) > MAX_REPLY_LINES or self._lineOctets > MAX_REPLY_OCTETS:
            return self._abort("reply too long")
        if len(line) == 3 or line[3] == " ":
            reply = Reply(int(line[:3]), tuple(self._lines))
            octets, self._lines, self._lineOctets = self._lineOctets, [], 0
            if self._owed <= 0:
                return self._abort(f"reply nobody asked for: {reply.code} {_printable(reply.text, 80)}")
            self._owed -= 1
            self.repliesReceived += 1
            if self._waiting:
                self._waiting.pop(0).callback(reply)
            else:
                self._replies.append(reply)
                self._queuedOctets += octets
                if self._queuedOctets > REPLY_BUFFER and not self.readingPaused and self.transport is not None:
                    self.readingPaused = True
                    self.transport.pauseProducing()

    def _abort(self, why: str, error: type[SessionError] = OutOfStep) -> None:
        if self._lost is None:
            self._lost = Failure(error(_temporary(f"protocol error from server: {why}", "4.5.0")))
        if self.transport is not None:
            self.transport.abortConnection()
        self._failWaiting()

    def _failWaiting(self) -> None:
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.errback(self._lost)

    def outOfStep(self, stage: Stage, reply: Reply) -> OutOfStep:
        """Close the session over a reply that does not answer C{stage}; the error to raise."""
        self._abort(f"unexpected reply to {stage.label}: {reply.code} {_printable(reply.text, 80)}")
        assert self._lost is not None
        error = self._lost.value
        return error if isinstance(error, OutOfStep) else OutOfStep(error.status)

    @property
    def alive(self) -> bool:
        """Connected, nothing owed, and nothing has gone wrong: a session that can be reused."""
        return (
            self._lost is None and self._owed == 0 and self.transport is not None and not self.transport.disconnecting
        )

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self._lost is None:
            why = _tlsReason(reason) if self.tls else ""
            self._lost = Failure(SessionError(_temporary(f"connection lost{why}", "4.4.2")))
        self._failWaiting()

    # -- for deliver() -----------------------------------------------------

    def reply(self, timeout: float) -> Deferred[Reply]:
        """The next reply, in order; fails if the connection goes or C{timeout} passes."""
        if self._replies:
            reply = self._replies.pop(0)
            self._queuedOctets -= sum(len(line) + 4 for line in reply.lines)
            if self.readingPaused and self._queuedOctets <= REPLY_BUFFER // 2 and self._lost is None:
                self.readingPaused = False
                self.transport.resumeProducing()
            return succeed(reply)
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

    async def expect(self, stage: Stage, timeout: float) -> Reply:
        """The next reply, which must answer C{stage}: else L{OutOfStep} (and the session is closed)."""
        reply = await self.reply(timeout)
        if reply.code in stage.positive or reply.inStep:
            return reply
        raise self.outOfStep(stage, reply)

    def send(self, line: str) -> None:
        self.sendRaw(line.encode("utf-8") + b"\r\n")

    def sendRaw(self, data: bytes, replies: int = 1) -> None:
        """Bytes that C{replies} replies will answer."""
        self._owed += replies
        self.transport.write(data)

    def startTLS(self) -> None:
        self.transport.startTLS(self.settings.tlsOptions)
        self.tls = True


def _extensions(reply: Reply) -> dict[str, str]:
    found = {}
    for line in reply.lines[1:]:
        keyword, _, value = line.partition(" ")
        found[keyword.upper()] = value
    return found


def _checkLoop(client: SMTPClient, reply: Reply, what: str) -> None:
    if reply.code // 100 == 2 and reply.firstWord() == client.settings.helo.lower():
        client.transport.abortConnection()
        why = f"mail loops back to myself: the next hop's {what} names {reply.firstWord()}"
        raise LoopError(Status(554, "5.4.6", why))


async def _hello(client: SMTPClient) -> None:
    """EHLO, or HELO when EHLO is refused for good; a temporary refusal of either lets another host try."""
    settings = client.settings
    client.send(f"EHLO {settings.helo}")
    reply = await client.expect(Stage.EHLO, settings.commandTimeout)
    if reply.code == 250:
        _checkLoop(client, reply, "EHLO reply")
        client.extensions = _extensions(reply)
        return
    if reply.code < 500:
        raise GreetingError(reply.status("4.4.2"))
    client.send(f"HELO {settings.helo}")
    reply = await client.expect(Stage.HELO, settings.commandTimeout)
    if reply.code < 400:
        _checkLoop(client, reply, "HELO reply")
        client.extensions = {}
        return
    if reply.code < 500:
        raise GreetingError(reply.status("4.4.2"))
    raise SessionError(reply.status("5.5.0"))


async def _auth(client: SMTPClient) -> None:
    settings = client.settings
    if settings.username is None:
        return
    mechanisms = client.extensions.get("AUTH", "").upper().split()
    user, password = settings.username, settings.password or ""
    if "PLAIN" in mechanisms:
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        client.send(f"AUTH PLAIN {token}")
        reply = await client.expect(Stage.AUTH, settings.commandTimeout)
    elif "LOGIN" in mechanisms:
        client.send("AUTH LOGIN")
        reply = await client.expect(Stage.AUTH, settings.commandTimeout)
        for answer in (user, password):
            if reply.code != 334:
                break
            client.send(base64.b64encode(answer.encode()).decode())
            reply = await client.expect(Stage.AUTH, settings.commandTimeout)
    else:
        # Never sent in the clear to a server that did not offer it.
        raise SessionError(_temporary("smart host offers no AUTH PLAIN or LOGIN", "4.7.0"))
    if reply.code == 334:
        raise client.outOfStep(Stage.AUTH, reply)  # a challenge after the last answer
    if reply.code != 235:
        # A wrong password is the operator's to fix: the mail waits, it does not bounce.
        text = f"AUTH refused: {_printable(reply.text)}"
        raise SessionError(Status(454 if reply.code >= 500 else reply.code, "4.7.8", text))


async def openSession(client: SMTPClient) -> None:
    """Greeting, EHLO, STARTTLS (by policy) and AUTH."""
    settings = client.settings
    greeting = await client.reply(settings.greetingTimeout)
    if greeting.code != 220:
        # Another host may do better, whatever this one said (Postfix's smtp_skip_5xx_greeting).
        if greeting.inStep:
            raise GreetingError(greeting.status("4.4.2" if greeting.code < 500 else "5.4.0"))
        client.outOfStep(Stage.GREETING, greeting)
        raise GreetingError(_temporary(f"greeting was {greeting.code} {_printable(greeting.text, 80)}, not 220"))
    _checkLoop(client, greeting, "greeting")
    await _hello(client)
    policy = settings.tls
    if policy in (TLSPolicy.OPPORTUNISTIC, TLSPolicy.REQUIRED, TLSPolicy.VERIFY) and not client.tls:
        if "STARTTLS" not in client.extensions:
            if policy is not TLSPolicy.OPPORTUNISTIC:
                raise SessionError(_temporary("server does not offer STARTTLS, which is required", "4.7.4"))
        else:
            client.send("STARTTLS")
            reply = await client.expect(Stage.STARTTLS, settings.commandTimeout)
            if reply.code != 220:
                if policy is not TLSPolicy.OPPORTUNISTIC:
                    raise SessionError(_temporary(f"STARTTLS refused: {_printable(reply.text)}", "4.7.4"))
            else:
                client.startTLS()
                try:
                    await _hello(client)  # the first reply after the handshake: it fails if the handshake does
                except LoopError:
                    raise
                except SessionError as e:
                    raise SessionError(
                        _temporary(f"TLS handshake failed: {e.status.text}", "4.7.5"), tlsFailed=True
                    ) from None
                client.verified = policy is TLSPolicy.VERIFY
    if settings.checkPeer is not None and client.tls:
        client.verified = settings.checkPeer(client) or client.verified
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
    """
    One message: per-recipient statuses (the caller then QUITs or reuses the session).

    @raise SessionError: the session failed during the transaction (the
        connection went, a wait timed out, a reply was out of step): every
        recipient is to be deferred, and the session must not be reused.
    """
    outcome = Outcome(
        dsnPassed="DSN" in client.extensions, peer=peerOf(client), tls=client.tls, verified=client.verified
    )
    refusal = _unsendable(client, outgoing)
    if refusal is not None:
        outcome.statuses = {r.address: refusal for r in outgoing.recipients}
        return outcome
    await _transaction(client, outgoing, outcome)
    return outcome


async def _transaction(client: SMTPClient, outgoing: Outgoing, outcome: Outcome) -> None:
    settings = client.settings
    pipelining = "PIPELINING" in client.extensions
    if client.needsReset:
        # The previous transaction on this session did not reach its end.
        client.send("RSET")
        if not pipelining:
            await _reset(client)
    reset = client.needsReset and pipelining
    client.needsReset = True  # until this transaction ends
    commands = [_mailCommand(client, outgoing), *(_rcptCommand(client, r) for r in outgoing.recipients)]
    chunking = "CHUNKING" in client.extensions
    stages = [Stage.MAIL, *(Stage.RCPT for _ in outgoing.recipients)]
    if pipelining:
        # RFC 2920: MAIL, every RCPT and DATA in one flight.
        for command in commands:
            client.send(command)
        if not chunking:
            client.send("DATA")
        if reset:
            await _reset(client)  # RSET's, sent first in the flight
        replies = [await client.expect(stage, settings.commandTimeout) for stage in stages]
    else:
        replies = []
        for command, stage in zip(commands, stages, strict=True):
            client.send(command)
            replies.append(await client.expect(stage, settings.commandTimeout))
            if replies[0].code != 250:
                break
    mail, rcpts = replies[0], replies[1:]
    if mail.code != 250:
        status = mail.status("4.5.0" if mail.code < 500 else "5.5.0")
        outcome.statuses = {r.address: status for r in outgoing.recipients}
        if pipelining and not chunking:
            await _unwantedData(client)
        client.needsReset = False  # no transaction was opened
        return
    accepted = []
    for recipient, reply in zip(outgoing.recipients, rcpts, strict=True):
        if reply.code in Stage.RCPT.positive:
            accepted.append(recipient)  # 251 and 252 too: taken, so it is sent
        else:
            outcome.statuses[recipient.address] = reply.status("4.5.0" if reply.code < 500 else "5.1.1")
    if not accepted:
        if pipelining and not chunking:
            await _unwantedData(client)
        return
    if chunking:
        end = await _bdat(client, outgoing)
    else:
        if not pipelining:
            client.send("DATA")
        data = await client.expect(Stage.DATA, settings.dataTimeout)
        if data.code != 354:
            status = data.status("4.5.0" if data.code < 500 else "5.5.0")
            for recipient in accepted:
                outcome.statuses[recipient.address] = status
            return
        end = await _data(client, outgoing)
    status = end.status("2.0.0" if end.code == 250 else "4.5.0" if end.code < 500 else "5.5.0")
    for recipient in accepted:
        outcome.statuses[recipient.address] = status
    client.needsReset = False  # the end-of-data reply ends the transaction, whatever it says


async def _reset(client: SMTPClient) -> None:
    reply = await client.expect(Stage.RSET, client.settings.commandTimeout)
    if reply.code != 250:
        # A server that will not reset cannot be trusted with the next transaction.
        raise client.outOfStep(Stage.RSET, reply)


async def _unwantedData(client: SMTPClient) -> None:
    """The reply to a pipelined DATA that no recipient came through for: a refusal, or a 354 ended at once."""
    data = await client.expect(Stage.DATA, client.settings.dataTimeout)
    if data.code == 354:
        client.sendRaw(b".\r\n")  # an empty message to nobody: the server must refuse it
        await client.expect(Stage.END, client.settings.dataEndTimeout)


def _dotStuffed(source: BinaryIO) -> Iterator[bytes]:
    """
    The DATA payload: the body with dots stuffed and line endings made CRLF,
    then the end marker, which goes with the last block.  Sent on its own,
    the few octets of the marker would wait for the next hop's delayed ACK of
    the block before them (Nagle's algorithm): some 40 ms per message.  A
    short block is taken to be the last one (one more read confirms it), so
    no second block is held to find out.
    """
    writer = DotWriter()
    chunk = source.read(CHUNK)
    while chunk:
        piece = writer.feed(chunk)
        following = source.read(CHUNK) if len(chunk) < CHUNK else None
        if following == b"":
            yield piece + writer.end()
            return
        yield piece
        chunk = following if following is not None else source.read(CHUNK)
    yield writer.end()


def _chunks(source: BinaryIO, binary: bool) -> Iterator[tuple[bytes, bool]]:
    """
    The body in BDAT chunks, the last one marked: as it is when it is
    BINARYMIME, else with CRLF line endings only, as DATA would send it.
    """
    endings = None if binary else LineEndings()

    def read() -> bytes:
        while block := source.read(CHUNK):
            if endings is None:
                return block
            if block := endings.feed(block):
                return block
        return b""

    chunk = read()
    while True:
        following = read() if chunk else b""
        last = not following
        yield f"BDAT {len(chunk)}{' LAST' if last else ''}\r\n".encode() + chunk, last
        if last:
            return
        chunk = following


async def _data(client: SMTPClient, outgoing: Outgoing) -> Reply:
    def pieces() -> Iterator[tuple[bytes, int]]:
        with outgoing.openData() as source:
            for piece in _dotStuffed(source):
                yield piece, 0
        yield b"", 1  # the end marker went with the last piece: its reply is owed from here

    await BodySender(client, pieces()).send()
    return await client.expect(Stage.END, client.settings.dataEndTimeout)


async def _bdat(client: SMTPClient, outgoing: Outgoing) -> Reply:
    """RFC 3030: chunks sent as they are; one reply per chunk (pipelined), read once all are sent."""

    def pieces() -> Iterator[tuple[bytes, int]]:
        with outgoing.openData() as source:
            for piece, _ in _chunks(source, outgoing.body == "BINARYMIME"):
                yield piece, 1

    sender = BodySender(client, pieces())
    await sender.send()
    first: Reply | None = None
    for _ in range(sender.replies):
        reply = await client.expect(Stage.BDAT, client.settings.dataEndTimeout)
        if first is None and reply.code != 250:
            first = reply  # the chunk that failed decides; the rest are still read, in step
        last = reply
    return first or last


@implementer(IPushProducer)
class BodySender:
    """
    Writes a body into the client's transport as fast as it drains: a
    streaming producer, paused by the transport when its buffer is full and
    resumed when it has room.  Memory is one block plus the transport's
    buffer.  Paused for longer than the block timeout: the next hop has stopped
    reading, and the session is aborted.

    C{pieces} yields (bytes, replies owed for them); it is read lazily, so the
    file behind it is read a block at a time.
    """

    def __init__(self, client: SMTPClient, pieces: Iterator[tuple[bytes, int]]) -> None:
        self.client = client
        self.replies = 0
        self._pieces = pieces
        self._paused = False
        self._writing = False
        self._timer: Any = None
        self._done: Deferred[None] = Deferred()

    def send(self) -> Deferred[None]:
        """Fires when every piece is in the transport; fails if the session goes first."""
        if self.client._lost is not None:
            self._pieces.close()
            return fail(self.client._lost)
        self.client.transport.registerProducer(self, True)
        self._write()
        return self._done

    def _write(self) -> None:
        if self._writing:
            return  # resumed from inside our own write: the loop below goes on
        self._writing = True
        sent = 0
        try:
            while not self._paused and not self._done.called:
                if sent >= DIRECT_PER_TURN:
                    # The socket took all of it at once: others' turn, then ours again.
                    self.client.settings.clock.callLater(0, self._write)
                    return
                try:
                    piece, owed = next(self._pieces)
                except StopIteration:
                    self._finish(None)
                    return
                except Exception:
                    self._finish(Failure())
                    return
                if piece or owed:
                    self.replies += owed
                    sent += self._send(piece, owed)
        finally:
            self._writing = False

    def _send(self, piece: bytes, owed: int) -> int:
        """
        Write C{piece}; the octets that went straight into the socket.

        On plain TCP, what the socket takes goes at once, without a turn of
        the reactor (and Twisted's 128 KiB per turn); the rest is buffered by
        the transport, which pauses us past its buffer size as before.
        """
        transport = self.client.transport
        if not isinstance(transport, tcp.Connection) or transport.TLS or transport.disconnecting or not piece:
            self.client.sendRaw(piece, owed)
            return 0
        self.client._owed += owed
        before = len(transport.dataBuffer) - transport.offset + transport._tempDataLen
        writeNow(transport, piece, transport.socket.send)
        after = len(transport.dataBuffer) - transport.offset + transport._tempDataLen
        return len(piece) - (after - before)

    def _finish(self, failure: Failure | None) -> None:
        if self._done.called:
            return
        self._cancelTimer()
        self._pieces.close()
        transport = self.client.transport
        if transport is not None and getattr(transport, "producer", self) is self:
            transport.unregisterProducer()
        if failure is None:
            self._done.callback(None)
        else:
            self._done.errback(failure)

    def _cancelTimer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _stalled(self) -> None:
        self._timer = None
        stalled = _temporary("timeout sending data: the next hop stopped reading", "4.4.2")
        self.client._lost = Failure(SessionError(stalled))
        self._finish(self.client._lost)
        self.client.transport.abortConnection()

    # -- IPushProducer -----------------------------------------------------

    def pauseProducing(self) -> None:
        self._paused = True
        if self._timer is None and not self._done.called:
            self._timer = self.client.settings.clock.callLater(self.client.settings.blockTimeout, self._stalled)

    def resumeProducing(self) -> None:
        self._paused = False
        self._cancelTimer()
        if not self._done.called:
            self._write()

    def stopProducing(self) -> None:
        self._finish(self.client._lost or Failure(SessionError(_temporary("connection lost while sending data"))))


async def quit(client: SMTPClient) -> None:
    try:
        client.send("QUIT")
        await client.reply(QUIT_TIMEOUT)
    except Exception:
        pass
    client.transport.loseConnection()
