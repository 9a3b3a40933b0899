"""
The ESMTP server: one protocol instance per connection, one explicit state machine.

Commands are read from a buffer one at a time and answered strictly in order.
A command whose answer needs to wait (a validator, the durable commit of a
message) makes the session I{busy}: reading stops until the answer is sent, so
pipelined commands queue up behind it and are answered in sequence.

The server never delivers.  It stores the message through the queue store's
L{IIncomingMessage} as the data arrives, and after the commit has reached the
disk it replies 250 and hands the envelope to C{onAccepted}.
"""

from __future__ import annotations

import enum
import errno
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

from relay.address import Mailbox, parseMailbox
from relay.envelope import Envelope, Recipient, Status
from relay.policy import Policy
from relay.smtp import parser
from relay.smtp.dotreader import DataError, DotReader
from relay.verdict import SessionInfo

# Command line limits (octets, CRLF included): RFC 5321 4.5.3.1.4, raised for
# MAIL and RCPT by the parameters of RFC 1870 (SIZE), RFC 3461 (DSN) and
# RFC 4954 (AUTH=).
LINE_LIMIT = 512
LINE_LIMITS = {b"MAIL": 512 + 26 + 100 + 500, b"RCPT": 512 + 500}
# Past this, an unterminated line is dropped while we look for its end.
BUFFER_LIMIT = 4096
# Pipelined input waiting behind a busy command before we stop reading.
PAUSE_ABOVE = 256 * 1024

# RFC 5321 4.5.3.2: server timeout 5 minutes, per DATA block 3 minutes.
COMMAND_TIMEOUT = 300.0
DATA_TIMEOUT = 180.0


class Phase(enum.Enum):
    CONNECTED = "connected"  # greeting sent, no HELO/EHLO yet
    READY = "ready"  # HELO/EHLO done, no transaction
    MAIL = "mail"  # MAIL accepted, no recipient yet
    RCPT = "rcpt"  # at least one recipient accepted
    DATA = "data"  # reading message data
    CLOSED = "closed"


def _reply(code: int, enhanced: str, text: str) -> Status:
    return Status(code, enhanced, text)


OK = _reply(250, "2.0.0", "Ok")
BAD_SEQUENCE_HELO = _reply(503, "5.5.1", "Error: send HELO/EHLO first")
BAD_SEQUENCE_MAIL = _reply(503, "5.5.1", "Error: need MAIL command")
BAD_SEQUENCE_RCPT = _reply(503, "5.5.1", "Error: need RCPT command")
NESTED_MAIL = _reply(503, "5.5.1", "Error: nested MAIL command")
NO_VALID_RECIPIENTS = _reply(554, "5.5.1", "Error: no valid recipients")
UNKNOWN_COMMAND = _reply(500, "5.5.2", "Error: command not recognized")
NOT_IMPLEMENTED = _reply(502, "5.5.1", "Error: command not implemented")
LINE_TOO_LONG = _reply(500, "5.5.2", "Error: line too long")
BARE_LF = _reply(500, "5.5.2", "Error: bare <LF> received; commands end with <CR><LF>")
TOO_MANY_RECIPIENTS = _reply(452, "4.5.3", "Error: too many recipients")
MESSAGE_TOO_BIG = _reply(552, "5.3.4", "Error: message size exceeds fixed limit")
NO_STORAGE = _reply(452, "4.3.1", "Error: insufficient system storage")
LOCAL_ERROR = _reply(451, "4.3.0", "Error: local error in processing; try again later")
VRFY_REPLY = _reply(252, "2.0.0", "Cannot VRFY user, but will accept message and attempt delivery")
EXPN_REPLY = _reply(502, "5.5.1", "Error: EXPN not available")
HELP_REPLY = _reply(214, "2.0.0", "See RFC 5321; commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP")
DATA_ERRORS = {
    DataError.BARE_LF: _reply(554, "5.6.0", "Error: message has bare <LF> line endings"),
    DataError.BARE_CR: _reply(554, "5.6.0", "Error: message has bare <CR> characters"),
    DataError.LINE_TOO_LONG: _reply(554, "5.6.0", "Error: message has a line longer than 998 octets"),
}


@dataclass(frozen=True)
class ServerSettings:
    """What a listener's sessions share; built once by the service."""

    hostname: str
    postmaster: str
    maxMessageSize: int
    maxRecipients: int
    policy: Policy
    store: Any  # IQueueStore
    onAccepted: Callable[[Envelope], None]
    clock: Any
    commandTimeout: float = COMMAND_TIMEOUT
    dataTimeout: float = DATA_TIMEOUT


@dataclass
class Transaction:
    sender: Mailbox | None
    body: str = "7BIT"
    declaredSize: int | None = None

    def __post_init__(self) -> None:
        self.recipients: list[Recipient] = []


class SMTPServer(Protocol, TimeoutMixin):
    log = Logger()

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.callLater = settings.clock.callLater  # TimeoutMixin: the given clock, not the global reactor
        self.phase = Phase.CONNECTED
        self.helo = ""
        self.esmtp = False
        self.transaction: Transaction | None = None
        self._buffer = b""
        self._discarding = False
        self._busy = False
        self._pumping = False
        self._paused = False
        self._reader: DotReader | None = None
        self._incoming: Any = None
        self._size = 0
        self._sizeExceeded = False
        self._storageError: OSError | None = None
        self.client = ""

    # -- connection ------------------------------------------------------

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.client = getattr(peer, "host", "") or ""
        self.setTimeout(self.settings.commandTimeout)
        self._send(_reply(220, "2.0.0", f"{self.settings.hostname} ESMTP relay"))

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.phase = Phase.CLOSED
        self.setTimeout(None)
        self._abortIncoming()

    def timeoutConnection(self) -> None:
        self._send(_reply(421, "4.4.2", f"{self.settings.hostname} Error: timeout exceeded"))
        self._close()

    def _send(self, status: Status) -> None:
        if self.phase is not Phase.CLOSED:
            self.transport.write(status.reply())

    def _sendLines(self, code: int, lines: list[str]) -> None:
        out = [f"{code}-{line}\r\n" for line in lines[:-1]]
        out.append(f"{code} {lines[-1]}\r\n")
        self.transport.write("".join(out).encode("utf-8"))

    def _close(self) -> None:
        self._abortIncoming()
        self.phase = Phase.CLOSED
        self.setTimeout(None)
        self.transport.loseConnection()

    # -- input -----------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.phase is Phase.CLOSED:
            return
        self._buffer += data
        if not self._busy:
            self.resetTimeout()
            self._pump()
        elif len(self._buffer) > PAUSE_ABOVE and not self._paused:
            self._paused = True
            self.transport.pauseProducing()

    def _pump(self) -> None:
        if self._pumping:
            return  # an answer that was ready at once: the running loop goes on
        self._pumping = True
        try:
            self._pumpLoop()
        finally:
            self._pumping = False
        if self._paused and not self._busy and len(self._buffer) <= PAUSE_ABOVE:
            self._paused = False
            self.transport.resumeProducing()

    def _pumpLoop(self) -> None:
        while not self._busy and self.phase is not Phase.CLOSED and self._buffer:
            if self.phase is Phase.DATA:
                self._pumpData()
                continue
            line = self._nextLine()
            if line is None:
                break
            self._handleLine(line)

    def _nextLine(self) -> bytes | None:
        """The next command line without CRLF, or None until one is complete."""
        while True:
            nl = self._buffer.find(b"\n")
            if nl == -1:
                if len(self._buffer) > BUFFER_LIMIT:
                    self._discarding = True
                    self._buffer = b""
                return None
            line, self._buffer = self._buffer[: nl + 1], self._buffer[nl + 1 :]
            if self._discarding:
                self._discarding = False
                self._send(LINE_TOO_LONG)
                continue
            if not line.endswith(b"\r\n"):
                self._send(BARE_LF)
                continue
            limit = LINE_LIMITS.get(line[:4].upper(), LINE_LIMIT)
            if len(line) > limit:
                self._send(LINE_TOO_LONG)
                continue
            return line[:-2]

    def _wait(self, d: Deferred[Status]) -> None:
        """Answer the current command when C{d} fires; read nothing meanwhile."""
        self._busy = True
        self.setTimeout(None)

        def done(status: Status) -> None:
            self._busy = False
            if self.phase is Phase.CLOSED:
                return
            self._send(status)
            self.setTimeout(self.settings.commandTimeout)
            self._pump()

        d.addCallback(done)
        d.addErrback(lambda f: self.log.failure("session error", f))

    # -- commands --------------------------------------------------------

    def _handleLine(self, line: bytes) -> None:
        utf8 = False
        command = parser.parseCommand(line, utf8=utf8)
        match command:
            case parser.Reject(status):
                self._send(status)
            case parser.Helo():
                self._helo(command)
            case parser.Mail():
                self._mail(command)
            case parser.Rcpt():
                self._rcpt(command)
            case parser.Simple("DATA"):
                self._data()
            case parser.Simple("RSET"):
                self._resetTransaction()
                self._send(OK)
            case parser.Simple("QUIT"):
                self._send(_reply(221, "2.0.0", "Bye"))
                self._close()
            case parser.WithText("NOOP"):
                self._send(OK)
            case parser.WithText("VRFY"):
                self._send(VRFY_REPLY)
            case parser.WithText("EXPN"):
                self._send(EXPN_REPLY)
            case parser.WithText("HELP"):
                self._send(HELP_REPLY)
            case parser.Simple("STARTTLS") | parser.Auth() | parser.Bdat():
                self._send(NOT_IMPLEMENTED)
            case _:
                self._send(UNKNOWN_COMMAND)

    def extensions(self) -> list[str]:
        return [
            "PIPELINING",
            f"SIZE {self.settings.maxMessageSize}",
            "8BITMIME",
            "ENHANCEDSTATUSCODES",
        ]

    def _helo(self, command: parser.Helo) -> None:
        self._resetTransaction()
        self.helo = command.domain
        self.esmtp = command.verb == "EHLO"
        self.phase = Phase.READY
        greeting = f"{self.settings.hostname} Hello {command.domain} [{self.client}]"
        if self.esmtp:
            self._sendLines(250, [greeting, *self.extensions()])
        else:
            self._sendLines(250, [greeting])

    def _mail(self, command: parser.Mail) -> None:
        if self.phase is Phase.CONNECTED:
            return self._send(BAD_SEQUENCE_HELO)
        if self.phase is not Phase.READY:
            return self._send(NESTED_MAIL)
        transaction = Transaction(command.sender)
        for key, value in command.params:
            if key == "SIZE" and self.esmtp:
                if value is None or not value.isdigit():
                    return self._send(_reply(501, "5.5.4", "Bad SIZE value"))
                if int(value) > self.settings.maxMessageSize:
                    return self._send(MESSAGE_TOO_BIG)
                transaction.declaredSize = int(value)
            elif key == "BODY" and self.esmtp:
                body = (value or "").upper()
                if body not in ("7BIT", "8BITMIME"):
                    return self._send(_reply(501, "5.5.4", "Bad BODY value"))
                transaction.body = body
            else:
                return self._send(_reply(555, "5.5.4", f"Unsupported parameter {key}"))
        if command.sender is not None and not command.sender.ascii:
            return self._send(_reply(553, "5.6.7", "UTF-8 addresses need SMTPUTF8"))
        self.transaction = transaction
        self.phase = Phase.MAIL
        self._send(_reply(250, "2.1.0", "Ok"))

    def _rcpt(self, command: parser.Rcpt) -> None:
        if self.phase is Phase.CONNECTED:
            return self._send(BAD_SEQUENCE_HELO)
        transaction = self.transaction
        if transaction is None or self.phase not in (Phase.MAIL, Phase.RCPT):
            return self._send(BAD_SEQUENCE_MAIL)
        if command.params:
            return self._send(_reply(555, "5.5.4", f"Unsupported parameter {command.params[0][0]}"))
        if len(transaction.recipients) >= self.settings.maxRecipients:
            return self._send(TOO_MANY_RECIPIENTS)
        if command.recipient is None:
            mailbox = parseMailbox(self.settings.postmaster)
            address = str(mailbox)
            d: Deferred[Status] = Deferred.fromCoroutine(_accepted())
        else:
            address = str(command.recipient)
            session = SessionInfo(
                client_address=self.client,
                helo=self.helo,
                sender=str(transaction.sender) if transaction.sender else "",
                local_domain=self.settings.policy.isLocal(command.recipient.domain),
            )
            mayRelay = self.settings.policy.mayRelay(self.client, None)
            d = self.settings.policy.checkRecipient(address, session, mayRelay)

        def decided(status: Status) -> Status:
            if status.ok and self.transaction is transaction:
                transaction.recipients.append(Recipient(address))
                self.phase = Phase.RCPT
            return status

        d.addCallback(decided)
        self._wait(d)

    def _data(self) -> None:
        if self.phase is Phase.CONNECTED:
            return self._send(BAD_SEQUENCE_HELO)
        if self.phase is Phase.MAIL:
            return self._send(NO_VALID_RECIPIENTS)
        if self.phase is not Phase.RCPT:
            return self._send(BAD_SEQUENCE_RCPT)
        try:
            self._incoming = self.settings.store.begin()
            self._size = 0
            self._sizeExceeded = False
            self._storageError = None
            self._writeRaw(self._receivedHeader())
        except OSError as e:
            self._abortIncoming()
            return self._send(NO_STORAGE if e.errno in (errno.ENOSPC, errno.EDQUOT) else LOCAL_ERROR)
        self._reader = DotReader(self._writeData)
        self.phase = Phase.DATA
        self.setTimeout(self.settings.dataTimeout)
        self._send(_reply(354, "2.0.0", "End data with <CR><LF>.<CR><LF>"))

    # -- message data ----------------------------------------------------

    def _receivedHeader(self) -> bytes:
        transaction = self.transaction
        assert transaction is not None
        protocol = "ESMTP" if self.esmtp else "SMTP"
        when = format_datetime(datetime.fromtimestamp(self.settings.clock.seconds(), UTC))
        forClause = ""
        if len(transaction.recipients) == 1:
            forClause = f"\r\n\tfor <{transaction.recipients[0].address}>"
        return (
            f"Received: from {self.helo} ([{self.client}])\r\n"
            f"\tby {self.settings.hostname} (relay) with {protocol} id {self._incoming.queue_id}"
            f"{forClause}; {when}\r\n"
        ).encode()

    def _writeRaw(self, data: bytes) -> None:
        self._incoming.write(data)

    def _writeData(self, data: bytes) -> None:
        if self._sizeExceeded or self._storageError is not None:
            return
        self._size += len(data)
        if self._size > self.settings.maxMessageSize:
            self._sizeExceeded = True
            return
        try:
            self._incoming.write(data)
        except OSError as e:
            self._storageError = e

    def _pumpData(self) -> None:
        assert self._reader is not None
        data, self._buffer = self._buffer, b""
        end = self._reader.feed(data)
        if end is None:
            return
        self._buffer = data[end:]
        self._wait(self._endOfData())

    def _endOfData(self) -> Deferred[Status]:
        transaction = self.transaction
        reader = self._reader
        incoming = self._incoming
        assert transaction is not None and reader is not None
        self._reader = None
        self.phase = Phase.READY
        self.transaction = None
        problem: Status | None = None
        if reader.error is not None:
            problem = DATA_ERRORS[reader.error]
        elif self._sizeExceeded:
            problem = MESSAGE_TOO_BIG
        elif self._storageError is not None:
            problem = NO_STORAGE if self._storageError.errno in (errno.ENOSPC, errno.EDQUOT) else LOCAL_ERROR
        if problem is not None:
            self._abortIncoming()
            return Deferred.fromCoroutine(_const(problem))
        self._incoming = None
        envelope = Envelope(
            queue_id=incoming.queue_id,
            sender=str(transaction.sender) if transaction.sender else "",
            recipients=transaction.recipients,
            received_at=self.settings.clock.seconds(),
            size=self._size,
            client_address=self.client,
            helo=self.helo,
            body=transaction.body,
        )
        d = maybeDeferred(incoming.commit, envelope)
        d.addCallbacks(lambda _: self._committed(envelope), lambda f: self._commitFailed(f, incoming))
        return d

    def _committed(self, envelope: Envelope) -> Status:
        self.log.info(
            "accepted {queue_id} from=<{sender}> size={size} nrcpt={nrcpt} client={client}",
            queue_id=envelope.queue_id,
            sender=envelope.sender,
            size=envelope.size,
            nrcpt=len(envelope.recipients),
            client=envelope.client_address,
        )
        try:
            self.settings.onAccepted(envelope)
        except Exception:
            # Durable already: recovery at the next start delivers it.
            self.log.failure("could not schedule {queue_id}", queue_id=envelope.queue_id)
        return _reply(250, "2.0.0", f"Ok: queued as {envelope.queue_id}")

    def _commitFailed(self, failure: Failure, incoming: Any) -> Status:
        incoming.abort()
        error = failure.value
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            self.log.warn("queue full: {error}", error=error)
            return NO_STORAGE
        self.log.failure("commit failed", failure)
        return LOCAL_ERROR

    def _abortIncoming(self) -> None:
        incoming, self._incoming = self._incoming, None
        self._reader = None
        if incoming is not None:
            incoming.abort()

    def _resetTransaction(self) -> None:
        self._abortIncoming()
        self.transaction = None
        if self.phase in (Phase.MAIL, Phase.RCPT, Phase.DATA):
            self.phase = Phase.READY


async def _const(status: Status) -> Status:
    return status


async def _accepted() -> Status:
    return _reply(250, "2.1.5", "Ok")


class SMTPServerFactory(ServerFactory):
    noisy = False  # one log line per accepted message is ours to write, not one per connection

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings

    def buildProtocol(self, addr: Any) -> SMTPServer:
        protocol = SMTPServer(self.settings)
        protocol.factory = self
        return protocol
