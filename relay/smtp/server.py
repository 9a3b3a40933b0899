"""
The ESMTP server: one protocol instance per connection, one explicit state machine.

Commands are read from a buffer one at a time and answered strictly in order.
A command whose answer needs to wait (a validator, a password check, the
durable commit of a message) makes the session I{busy}: reading stops until the
answer is sent, so pipelined commands queue up behind it and are answered in
sequence (RFC 2920).

The server never delivers.  It streams the message into the queue store's
L{IIncomingMessage} as it arrives, and after the commit has reached the disk it
replies 250 and hands the envelope to C{onAccepted}.
"""

from __future__ import annotations

import enum
import errno
import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

from twisted.cred.credentials import UsernamePassword
from twisted.internet import tcp
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

from relay import config
from relay.address import Mailbox, parseMailbox
from relay.envelope import Envelope, Recipient, Status
from relay.fsutil import writeNow
from relay.logs import logEvent
from relay.policy import Policy, clientIP
from relay.smtp import parser
from relay.smtp.auth import MECHANISMS, Challenge, Credentials, IMailUser, startExchange
from relay.smtp.dotreader import DataError, DotReader, LineChecker
from relay.smtp.headers import TraceCounter
from relay.smtp.limits import SessionLimits
from relay.smtp.params import MailParams, mailParams, rcptParams
from relay.verdict import SessionInfo

# Command line limits (octets, CRLF included): RFC 5321 4.5.3.1.4, raised for
# MAIL and RCPT by the parameters of RFC 1870 (SIZE), RFC 3461 (DSN) and
# RFC 4954 (AUTH=); SASL responses may be 12288 octets (RFC 4954 4).
LINE_LIMIT = 512
LINE_LIMITS = {b"MAIL": 512 + 26 + 100 + 500, b"RCPT": 512 + 500, b"AUTH": 12288}
SASL_LINE_LIMIT = 12288
# Past this, an unterminated line is dropped while we look for its end.
BUFFER_LIMIT = 16384
# Pipelined input waiting behind a busy command before we stop reading.
PAUSE_ABOVE = 256 * 1024
# After we close, how long a client that reads nothing may keep the
# connection (and its unsent replies) before it is cut.
CLOSE_GRACE = 10.0
# Octets asked of the socket at each read (Twisted's default is 64 KiB): a
# large message arrives in fewer turns of the reactor, and the DATA reader's
# scans run over longer stretches.  A read returns what is there, no more.
READ_SIZE = 256 * 1024

# RFC 5321 4.5.3.2: server timeout 5 minutes, per DATA block 3 minutes.
# These are idle limits: any data resets them.
IDLE_TIMEOUT = 300.0
DATA_TIMEOUT = 180.0
# Absolute limits, which no trickle of data resets ([listener:NAME] keys).
COMMAND_DEADLINE = 120.0
DATA_DEADLINE = 600.0
MIN_DATA_RATE = 1024
SESSION_DEADLINE = 3600.0
# "452 too many recipients" replies that do not count as errors, as Postfix's
# smtpd_recipient_overshoot_limit: a client sending more recipients than we
# take is told to send the rest later, not disconnected for it.
RECIPIENT_OVERSHOOT = 1000
# How long the store may take to make a message durable ([queue] commit_timeout).
COMMIT_TIMEOUT = 30.0


class Phase(enum.Enum):
    CONNECTED = "connected"  # greeting sent, no HELO/EHLO yet
    READY = "ready"  # HELO/EHLO done, no transaction
    MAIL = "mail"  # MAIL accepted, no recipient yet
    RCPT = "rcpt"  # at least one recipient accepted
    DATA = "data"  # reading DATA
    CHUNKING = "chunking"  # between BDAT chunks
    CLOSED = "closed"


def _reply(code: int, enhanced: str, text: str) -> Status:
    return Status(code, enhanced, text)


OK = _reply(250, "2.0.0", "Ok")
MAIL_OK = _reply(250, "2.1.0", "Ok")
RCPT_OK = _reply(250, "2.1.5", "Ok")
START_DATA = _reply(354, "2.0.0", "End data with <CR><LF>.<CR><LF>")
BYE = _reply(221, "2.0.0", "Bye")
BAD_SEQUENCE_HELO = _reply(503, "5.5.1", "Error: send HELO/EHLO first")
BAD_SEQUENCE_MAIL = _reply(503, "5.5.1", "Error: need MAIL command")
BAD_SEQUENCE_RCPT = _reply(503, "5.5.1", "Error: need RCPT command")
NESTED_MAIL = _reply(503, "5.5.1", "Error: nested MAIL command")
IN_TRANSACTION = _reply(503, "5.5.1", "Error: MAIL transaction in progress")
NO_VALID_RECIPIENTS = _reply(554, "5.5.1", "Error: no valid recipients")
UNKNOWN_COMMAND = _reply(500, "5.5.2", "Error: command not recognized")
NOT_IMPLEMENTED = _reply(502, "5.5.1", "Error: command not implemented")
LINE_TOO_LONG = _reply(500, "5.5.2", "Error: line too long")
BARE_LF = _reply(500, "5.5.2", "Error: bare <LF> received; commands end with <CR><LF>")
TOO_MANY_RECIPIENTS = _reply(452, "4.5.3", "Error: too many recipients")
MESSAGE_TOO_BIG = _reply(552, "5.3.4", "Error: message size exceeds fixed limit")
NO_STORAGE = _reply(452, "4.3.1", "Error: insufficient system storage")
LOCAL_ERROR = _reply(451, "4.3.0", "Error: local error in processing; try again later")
COMMIT_TOO_SLOW = _reply(451, "4.3.0", "Error: queue too slow to store the message; try again later")
TOO_MANY_HOPS = _reply(554, "5.4.6", "Error: too many hops (mail loop?)")
VRFY_REPLY = _reply(252, "2.0.0", "Cannot VRFY user, but will accept message and attempt delivery")
EXPN_REPLY = _reply(502, "5.5.1", "Error: EXPN not available")
HELP_REPLY = _reply(214, "2.0.0", "See RFC 5321; commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP ETRN")
ETRN_SYNTAX = _reply(501, "5.5.4", "Syntax: ETRN [@]domain")
ETRN_IN_TRANSACTION = _reply(503, "5.5.1", "Error: MAIL transaction in progress")
# RFC 1985: a node name is a domain, "@" before it for its sub-domains too;
# "#queue" names are not supported.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_ETRN_NODE = re.compile(rf"@?{_LABEL}(?:\.{_LABEL})*\.?")
TLS_NOT_AVAILABLE = _reply(502, "5.5.1", "Error: STARTTLS not available")
TLS_READY = _reply(220, "2.0.0", "Ready to start TLS")
AUTH_NOT_ENABLED = _reply(503, "5.5.1", "Error: authentication not enabled")
AUTH_NEEDS_TLS = _reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
AUTH_ALREADY = _reply(503, "5.5.1", "Error: already authenticated")
AUTH_MECHANISM = _reply(504, "5.5.4", "Unrecognized authentication type")
AUTH_OK = _reply(235, "2.7.0", "Authentication successful")
AUTH_FAILED = _reply(535, "5.7.8", "Authentication credentials invalid")
AUTH_REQUIRED = _reply(530, "5.7.0", "Authentication required")
BINARYMIME_NEEDS_BDAT = _reply(503, "5.5.1", "Error: BODY=BINARYMIME requires BDAT")
TOO_MANY_ERRORS = _reply(421, "4.7.0", "Error: too many errors")
SHUTTING_DOWN = _reply(421, "4.3.2", "Error: service shutting down, try again later")
AUTH_LOCKED_OUT = _reply(454, "4.7.0", "Error: too many authentication failures; try again later")
DATA_ERRORS = {
    DataError.BARE_LF: _reply(554, "5.6.0", "Error: message has bare <LF> line endings"),
    DataError.BARE_CR: _reply(554, "5.6.0", "Error: message has bare <CR> characters"),
    DataError.LINE_TOO_LONG: _reply(554, "5.6.0", "Error: message has a line longer than 998 octets"),
    DataError.NUL: _reply(554, "5.6.0", "Error: message has NUL characters"),
}
# Why a message was refused, for the rejected line and relay_messages_rejected_total{reason}.
_REFUSAL_REASONS = {
    DATA_ERRORS[DataError.BARE_LF]: "bare_lf",
    DATA_ERRORS[DataError.BARE_CR]: "bare_cr",
    DATA_ERRORS[DataError.LINE_TOO_LONG]: "line_too_long",
    DATA_ERRORS[DataError.NUL]: "nul",
    MESSAGE_TOO_BIG: "size",
    TOO_MANY_HOPS: "hops",
}
# Replies that say nothing bad about the client: not counted towards the error
# limit.  452 is counted (a client that meets it again and again is asking
# for it), except "too many recipients" within RECIPIENT_OVERSHOOT.
_NOT_ERRORS = frozenset({421})


@dataclass(frozen=True)
class ServerSettings:
    """What the sessions of one listener share; built once by the service."""

    hostname: str
    postmaster: str
    maxMessageSize: int
    maxRecipients: int
    policy: Policy
    store: Any  # IQueueStore
    onAccepted: Callable[[Envelope], None]
    clock: Any
    tls: str = "none"  # none | starttls | implicit
    tlsOptions: Any = None  # server CertificateOptions for STARTTLS
    auth: str = "none"  # none | optional | required
    plaintextAuth: bool = False
    portal: Any = None  # twisted.cred Portal answering IMailUser
    maxErrors: int = 20
    maxSessionsPerClient: int = 50
    maxSessionsPerRelayClient: int = 500
    maxConnectionRate: int = 120  # per address per minute, outside relay_networks; 0 = none
    maxReceived: int = 50
    idleTimeout: float = IDLE_TIMEOUT
    dataTimeout: float = DATA_TIMEOUT
    commandDeadline: float = COMMAND_DEADLINE
    dataDeadline: float = DATA_DEADLINE
    minDataRate: int = MIN_DATA_RATE
    sessionDeadline: float = SESSION_DEADLINE
    commitTimeout: float = COMMIT_TIMEOUT
    # One SessionLimits for all listeners (the global cap); None: the factory keeps its own, without a global cap.
    limits: SessionLimits | None = None
    # relay.smtp.throttle.AuthThrottle (lockedOut, failed, succeeded); None: no throttling.
    authThrottle: Any = None
    # relay.metrics.Metrics: sessions open, rejections by reason; None: not counted.
    metrics: Any = None
    # ETRN (RFC 1985): makes the queued mail for a domain ("@domain": and its
    # sub-domains) due now, firing with the number of messages; None: no ETRN.
    etrn: Callable[[str], Any] | None = None
    # relay.filters.runner.FilterChain ([policy] filters); None: no content filter, the data goes
    # straight to the store as it arrives (no spool, no copy).
    filters: Any = None


def listenerSettings(base: ServerSettings, listener: config.Listener) -> ServerSettings:
    """A listener's own limits and timers ([listener:NAME] keys) on the relay-wide C{base}."""
    return replace(
        base,
        maxErrors=listener.max_errors,
        maxSessionsPerClient=listener.max_sessions_per_client,
        maxSessionsPerRelayClient=listener.max_sessions_per_relay_client,
        maxConnectionRate=listener.max_connection_rate,
        idleTimeout=listener.idle_timeout,
        commandDeadline=listener.command_deadline,
        dataDeadline=listener.data_deadline,
        minDataRate=listener.min_data_rate,
        sessionDeadline=listener.session_deadline,
    )


@dataclass
class Transaction:
    sender: Mailbox | None
    params: MailParams
    recipients: list[Recipient] = field(default_factory=list)


@dataclass
class Chunk:
    """A BDAT chunk being read: its bytes are data, whatever they look like."""

    remaining: int
    last: bool
    refusal: Status | None


@functools.lru_cache(maxsize=4)
def _date(second: int) -> str:
    """An RFC 5322 date, formatted once per second, not once per message."""
    return format_datetime(datetime.fromtimestamp(second, UTC))


class SMTPServer(Protocol, TimeoutMixin):
    log = Logger()

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.callLater = settings.clock.callLater  # TimeoutMixin: the given clock, not the global reactor
        self.phase = Phase.CONNECTED
        self.helo = ""
        self.esmtp = False
        self.tls = settings.tls == "implicit"
        self._keywords: tuple[tuple[bool, bool, str | None], frozenset[str]] | None = None
        self.authenticated: str | None = None
        self.transaction: Transaction | None = None
        self.errors = 0
        self.client = ""
        self._buffer = b""
        self._discarding = False
        self._busy = False
        self._pumping = False
        self._paused = False  # too much pipelined input behind a busy command
        self._storeBehind: Any = None  # the incoming message whose store is behind the client
        self._writePaused = False  # the transport holds too many unsent replies
        self._readPaused = False  # what we last told the transport
        self._admitted = False
        self._overshoot = 0
        self._sessionTimer: Any = None
        self._commandTimer: Any = None
        self._dataTimer: Any = None
        self._dataStart = 0.0
        self._dataOctets = 0
        self._authDelay: Any = None
        self._closeTimer: Any = None
        self._reader: DotReader | None = None
        self._chunk: Chunk | None = None
        self._checker: LineChecker | None = None  # a BDAT body that must be text (not BINARYMIME)
        self._sasl: Any = None
        self._incoming: Any = None
        self._trace: TraceCounter | None = None
        self._size = 0
        self._problem: Status | None = None
        self._connectedAt: float | None = None  # admitted: connect logged, disconnect to log
        self._accepted = 0
        self._stopping = False  # the relay is stopping: 421 once no transaction is open

    # -- connection ------------------------------------------------------

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.client = getattr(peer, "host", "") or ""
        if isinstance(self.transport, tcp.Server):
            self.transport.bufferSize = READ_SIZE
        self.setTimeout(self.settings.idleTimeout)
        refusal = self.factory.admit(self)
        if refusal is not None:
            self._send(_reply(421, "4.7.0", f"{self.settings.hostname} Error: {refusal}"))
            self._close()
            return
        self._connectedAt = self.settings.clock.seconds()
        if self.settings.metrics is not None:
            self.settings.metrics.sessionsOpen.inc()
        logEvent(self.log, "connect", {"client": self.client, "port": getattr(peer, "port", None)})
        # The transport tells us when it holds too many unsent replies: a
        # client that pipelines commands and never reads is then not read.
        self.transport.registerProducer(self, True)
        self._sessionTimer = self.callLater(self.settings.sessionDeadline, self._deadlineExceeded, "session_deadline")
        self._send(self.factory.greeting)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.phase = Phase.CLOSED
        self.setTimeout(None)
        self._cancelTimers()
        self._abortIncoming()
        if self._connectedAt is not None:
            if self.settings.metrics is not None:
                self.settings.metrics.sessionsOpen.dec()
            duration = self.settings.clock.seconds() - self._connectedAt
            self._connectedAt = None
            logEvent(self.log, "disconnect", {"client": self.client, "messages": self._accepted, "duration": duration})
        self.factory.release(self)

    def _cancelTimers(self) -> None:
        for name in ("_sessionTimer", "_commandTimer", "_dataTimer", "_authDelay", "_closeTimer"):
            timer = getattr(self, name)
            setattr(self, name, None)
            if timer is not None and timer.active():
                timer.cancel()

    def timeoutConnection(self) -> None:
        self._send(_reply(421, "4.4.2", f"{self.settings.hostname} Error: timeout exceeded"))
        self._close()

    def _deadlineExceeded(self, which: str) -> None:
        """An absolute limit ([listener:NAME] C{which}) has passed: however slowly data came, the session ends."""
        setattr(
            self,
            {"session_deadline": "_sessionTimer", "command_deadline": "_commandTimer"}.get(which, "_dataTimer"),
            None,
        )
        if self.phase is Phase.CLOSED:
            return
        self.log.info("{which} exceeded: closing the session client={client}", which=which, client=self.client)
        self._send(_reply(421, "4.4.2", f"{self.settings.hostname} Error: timeout exceeded"))
        self._close()

    # -- producer of replies (the transport pauses us) --------------------

    def pauseProducing(self) -> None:
        # No more commands are answered; input still comes in up to
        # PAUSE_ABOVE, then reading stops.  Reading does not stop at once: a
        # TLS transport pauses us for the greeting written before its
        # handshake, which needs reading to complete.
        self._writePaused = True

    def resumeProducing(self) -> None:
        self._writePaused = False
        if self.phase is not Phase.CLOSED:
            self._pump()
        self._updateReading()

    def stopProducing(self) -> None:
        pass  # the connection is going: connectionLost follows

    def _updateReading(self) -> None:
        """Read from the client unless input is piling up behind an answer (or our replies), or the store is behind."""
        if self.phase is Phase.CLOSED:
            return
        pause = self._paused or self._storeBehind is not None
        if pause != self._readPaused:
            self._readPaused = pause
            if pause:
                self.transport.pauseProducing()
            else:
                self.transport.resumeProducing()

    def _send(self, status: Status, counted: bool = True) -> None:
        if self.phase is Phase.CLOSED:
            return
        self._write(status.reply())
        if counted and status.code >= 400 and status.code not in _NOT_ERRORS:
            self.errors += 1
            if self.errors >= self.settings.maxErrors:
                self._write(TOO_MANY_ERRORS.reply())
                self._close()
                return
        if self._stopping and self.phase is not Phase.CLOSED and self._betweenTransactions():
            self.shutdown(now=True)

    # -- stopping --------------------------------------------------------

    def _betweenTransactions(self) -> bool:
        return self.transaction is None and not self._busy and self._chunk is None and self.phase is not Phase.DATA

    def shutdown(self, now: bool = False) -> None:
        """
        The relay is stopping.  A session between transactions gets
        C{421 4.3.2} at once; one in the middle of a transaction (or owed the
        answer to its end of data) gets it right after the answer that ends
        it, unless C{now} (the grace is over): then at once, the message not
        acknowledged and dropped from the store, so the client sends it again.
        """
        if self.phase is Phase.CLOSED:
            return
        self._stopping = True
        if now or self._betweenTransactions():
            self._write(SHUTTING_DOWN.reply())
            self._close()

    def _sendLines(self, code: int, lines: list[str]) -> None:
        out = [f"{code}-{line}\r\n" for line in lines[:-1]]
        out.append(f"{code} {lines[-1]}\r\n")
        self._write("".join(out).encode("utf-8"))

    def _write(self, data: bytes) -> None:
        """
        A reply goes out now, not on the reactor's next turn: a client waits
        for each reply.  Plain TCP only; TLS takes the transport's own path.
        """
        transport = self.transport
        if self._direct:
            writeNow(transport, data, transport.socket.send)
        else:
            transport.write(data)

    def _close(self) -> None:
        self._abortIncoming()
        self.phase = Phase.CLOSED
        self.setTimeout(None)
        self._cancelTimers()
        transport = self.transport
        if self._admitted:
            transport.unregisterProducer()  # else loseConnection waits for the producer
        transport.loseConnection()
        # A client that reads nothing would keep its unsent replies, and the connection, for ever.
        abort = getattr(transport, "abortConnection", None)
        if abort is not None:
            self._closeTimer = self.callLater(CLOSE_GRACE, abort)

    # -- input -----------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.phase is Phase.CLOSED:
            return
        self._buffer += data
        if self._dataTimer is not None:
            self._dataOctets += len(data)
        if not self._busy:
            self.resetTimeout()
            self._pump()
        if (self._busy or self._writePaused) and len(self._buffer) > PAUSE_ABOVE and not self._paused:
            self._paused = True
            self._updateReading()

    def _pump(self) -> None:
        if self._pumping:
            return  # an answer that was ready at once: the running loop goes on
        self._pumping = True
        try:
            self._pumpLoop()
        finally:
            self._pumping = False
        if self.phase is Phase.CLOSED:
            return
        if self._paused and not self._busy and not self._writePaused and len(self._buffer) <= PAUSE_ABOVE:
            self._paused = False
            self._updateReading()
        self._watchCommand()

    def _watchCommand(self) -> None:
        """
        The command deadline runs from the first octet of a command line until
        its CRLF (or while an over-long one is being dropped), so that a line
        drip-fed an octet at a time ends at command_deadline, not never.
        """
        partial = (
            (self._buffer or self._discarding)
            and not self._busy
            and self._chunk is None
            and self.phase is not Phase.DATA
        )
        timer = self._commandTimer
        if partial:
            if timer is None:
                self._commandTimer = self.callLater(
                    self.settings.commandDeadline, self._deadlineExceeded, "command_deadline"
                )
        elif timer is not None:
            self._commandTimer = None
            timer.cancel()

    def _lineDone(self) -> None:
        timer, self._commandTimer = self._commandTimer, None
        if timer is not None:
            timer.cancel()

    def _pumpLoop(self) -> None:
        while (
            not self._busy
            and not self._writePaused
            and self.phase is not Phase.CLOSED
            and (self._buffer or self._chunkComplete())
        ):
            if self._chunk is not None:
                self._pumpChunk()
            elif self.phase is Phase.DATA:
                self._pumpData()
            elif self._sasl is not None:
                line = self._nextLine(SASL_LINE_LIMIT)
                if line is None:
                    break
                self._saslResponse(line)
            else:
                line = self._nextLine()
                if line is None:
                    break
                self._handleLine(line)

    def _nextLine(self, limit: int | None = None) -> bytes | None:
        """The next line without CRLF, or None until one is complete."""
        while True:
            nl = self._buffer.find(b"\n")
            if nl == -1:
                if len(self._buffer) > BUFFER_LIMIT:
                    self._discarding = True
                    self._buffer = b""
                return None
            line, self._buffer = self._buffer[: nl + 1], self._buffer[nl + 1 :]
            if self._commandTimer is not None:
                self._lineDone()
            if self._discarding:
                self._discarding = False
                self._send(LINE_TOO_LONG)
                continue
            if not line.endswith(b"\r\n"):
                self._send(BARE_LF)
                continue
            if len(line) > (limit or LINE_LIMITS.get(line[:4].upper(), LINE_LIMIT)):
                self._send(LINE_TOO_LONG)
                continue
            return line[:-2]

    def _wait(self, d: Deferred[Status]) -> None:
        """
        Answer the current command when C{d} fires; read nothing meanwhile,
        and let no idle timeout run while the answer is ours to give.
        """
        self._busy = True
        waited = False

        def done(status: Status) -> None:
            self._busy = False
            if self.phase is Phase.CLOSED:
                return
            self._send(status)
            timeout = self.settings.dataTimeout if self._chunk else self.settings.idleTimeout
            if waited or self.timeOut != timeout:
                self.setTimeout(timeout)
            self._pump()

        d.addCallback(done)
        d.addErrback(lambda f: self.log.failure("session error", f))
        if self._busy:  # not answered at once (an answer at once needs no timer work)
            waited = True
            self.setTimeout(None)
            self._lineDone()  # the answer is ours to give: no command deadline meanwhile

    # -- what this session offers ----------------------------------------

    def startTLSOffered(self) -> bool:
        return self.settings.tls == "starttls" and not self.tls

    def authOffered(self) -> bool:
        return (
            self.settings.auth != "none"
            and self.settings.portal is not None
            and (self.tls or self.settings.plaintextAuth)
            and self.authenticated is None
        )

    def extensions(self) -> list[str]:
        offered = [
            "PIPELINING",
            f"SIZE {self.settings.maxMessageSize}",
            "8BITMIME",
            "BINARYMIME",
            "CHUNKING",
            "SMTPUTF8",
            "DSN",
            "ENHANCEDSTATUSCODES",
        ]
        if self.startTLSOffered():
            offered.append("STARTTLS")
        if self.authOffered():
            offered.append("AUTH " + " ".join(MECHANISMS))
        if self.settings.etrn is not None:
            offered.append("ETRN")
        return offered

    def _offeredKeywords(self) -> frozenset[str]:
        """The EHLO keywords in force; asked at every MAIL and RCPT, so kept until the session changes."""
        state = (self.esmtp, self.tls, self.authenticated)
        if self._keywords is not None and self._keywords[0] == state:
            return self._keywords[1]
        keywords: set[str] = set()
        if self.esmtp:
            keywords = {e.split(" ", 1)[0] for e in self.extensions()}
            if self.settings.auth != "none" and (self.tls or self.settings.plaintextAuth):
                keywords.add("AUTH")  # AUTH= stays valid after authenticating
        self._keywords = (state, frozenset(keywords))
        return self._keywords[1]

    # -- commands --------------------------------------------------------

    def _handleLine(self, line: bytes) -> None:
        transaction = self.transaction
        command = parser.parseCommand(line, utf8=transaction is not None and transaction.params.smtputf8)
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
            case parser.Bdat():
                self._bdat(command)
            case parser.Simple("RSET"):
                self._resetTransaction()
                self._send(OK)
            case parser.Simple("QUIT"):
                self._send(BYE)
                self._close()
            case parser.Simple("STARTTLS"):
                self._startTLS()
            case parser.Auth():
                self._auth(command)
            case parser.WithText("NOOP"):
                self._send(OK)
            case parser.WithText("VRFY"):
                self._send(VRFY_REPLY)
            case parser.WithText("EXPN"):
                self._send(EXPN_REPLY)
            case parser.WithText("HELP"):
                self._send(HELP_REPLY)
            case parser.WithText("ETRN"):
                self._etrn(command.text)
            case _:
                self._send(UNKNOWN_COMMAND)

    def _etrn(self, node: str) -> None:
        """
        ETRN (RFC 1985): the queued mail for a domain is due now, for a
        client that may relay (relay_networks or authenticated): a site
        back on line asks for its mail instead of waiting for the next retry.
        """
        flush = self.settings.etrn
        if flush is None:
            return self._send(NOT_IMPLEMENTED)
        if self.phase is Phase.CONNECTED:
            return self._send(BAD_SEQUENCE_HELO)
        if self.transaction is not None:
            return self._send(ETRN_IN_TRANSACTION)
        if node.startswith("#"):
            return self._send(_reply(459, "4.3.0", f"Node {node[:64]} not allowed: queue names are not supported"))
        if len(node) > 256 or not _ETRN_NODE.fullmatch(node):
            return self._send(ETRN_SYNTAX)
        if not self.settings.policy.mayRelay(self.client, self.authenticated):
            return self._send(_reply(459, "4.7.1", f"Node {node} not allowed: relay access denied"))
        client = self.client

        def started(count: int) -> Status:
            self.log.info("etrn {node} client={client} messages={count}", node=node, client=client, count=count)
            if not count:
                return _reply(251, "2.0.0", f"OK, no messages waiting for node {node}")
            return _reply(250, "2.0.0", f"OK, queuing for node {node} started")

        def failed(failure: Failure) -> Status:
            self.log.failure("etrn {node} failed", failure, node=node)
            return _reply(458, "4.3.0", f"Unable to queue messages for node {node}")

        d = maybeDeferred(flush, node)
        d.addCallbacks(started, failed)
        self._wait(d)

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

    @property
    def _direct(self) -> bool:
        # Plain TCP only: after STARTTLS the same transport encrypts in write().
        transport = self.transport
        return type(transport) is tcp.Server and transport.TLS is False and not transport.disconnecting

    def _startTLS(self) -> None:
        if not self.startTLSOffered():
            return self._send(TLS_NOT_AVAILABLE)
        if self.phase is Phase.CONNECTED:
            return self._send(BAD_SEQUENCE_HELO)
        if self.phase is not Phase.READY:
            return self._send(IN_TRANSACTION)
        self._send(TLS_READY)
        # Anything the client sent after STARTTLS in the clear is discarded, and
        # everything learnt before the handshake is forgotten (RFC 3207 4.2;
        # the CVE-2011-0411 class of command injection).
        self._buffer = b""
        self._discarding = False
        self.transport.startTLS(self.settings.tlsOptions)
        self.tls = True
        self.helo = ""
        self.esmtp = False
        self.authenticated = None
        self.phase = Phase.CONNECTED

    def _auth(self, command: parser.Auth) -> None:
        if self.settings.auth == "none" or self.settings.portal is None:
            return self._send(AUTH_NOT_ENABLED)
        if self.phase is Phase.CONNECTED or not self.esmtp:
            return self._send(BAD_SEQUENCE_HELO)
        if self.authenticated is not None:
            return self._send(AUTH_ALREADY)
        if self.phase is not Phase.READY:
            return self._send(IN_TRANSACTION)
        if not (self.tls or self.settings.plaintextAuth):
            return self._send(AUTH_NEEDS_TLS)
        throttle = self.settings.authThrottle
        if throttle is not None and throttle.lockedOut(self.client):
            return self._send(AUTH_LOCKED_OUT)  # no exchange: a locked-out guesser costs no bcrypt time
        exchange = startExchange(command.mechanism, command.initial)
        if exchange is None:
            return self._send(AUTH_MECHANISM)
        self._sasl = exchange
        self._saslResult(exchange.start())

    def _saslResponse(self, line: bytes) -> None:
        try:
            text = line.decode("ascii")
        except UnicodeDecodeError:
            text = "\x00"  # not base64: the exchange refuses it
        self._saslResult(self._sasl.respond(text))

    def _saslResult(self, result: Any) -> None:
        if isinstance(result, Challenge):
            self.transport.write(f"334 {result.text}\r\n".encode("ascii"))
            return
        self._sasl = None
        if not isinstance(result, Credentials):
            return self._send(result.status)
        credentials = UsernamePassword(result.username.encode("utf-8"), result.password.encode("utf-8"))
        d = self.settings.portal.login(credentials, None, IMailUser)

        throttle = self.settings.authThrottle

        def succeeded(login: tuple[Any, Any, Any]) -> Status:
            self.authenticated = result.username
            self.log.info("authenticated {user} client={client}", user=result.username, client=self.client)
            if throttle is not None:
                throttle.succeeded(self.client)
            return AUTH_OK

        def failed(failure: Failure) -> Status | Deferred[Status]:
            self.log.info("authentication failed for {user} client={client}", user=result.username, client=self.client)
            delay = throttle.failed(self.client, result.username) if throttle is not None else 0.0
            if delay <= 0 or self.phase is Phase.CLOSED:
                return AUTH_FAILED
            # The 535 comes late, and the session reads nothing meanwhile: a
            # guesser waits, on our clock, without holding a thread.
            later: Deferred[Status] = Deferred()
            self._authDelay = self.callLater(delay, later.callback, AUTH_FAILED)
            return later

        d.addCallbacks(succeeded, failed)
        self._wait(d)

    def _mail(self, command: parser.Mail) -> None:
        if self.phase is Phase.CONNECTED:
            return self._send(BAD_SEQUENCE_HELO)
        if self.phase is not Phase.READY:
            return self._send(NESTED_MAIL)
        if self.settings.auth == "required" and self.authenticated is None:
            return self._send(AUTH_REQUIRED)
        params = mailParams(command.params, self._offeredKeywords(), self.settings.maxMessageSize)
        if isinstance(params, Status):
            return self._send(params)
        if command.sender is not None and not command.sender.ascii and not params.smtputf8:
            return self._send(_reply(553, "5.6.7", "Error: UTF-8 addresses need SMTPUTF8"))
        policy = self.settings.policy
        ret = policy.dsnRet(params.ret, policy.mayRelay(self.client, self.authenticated))
        if ret != params.ret:
            params = replace(params, ret=ret)  # honoured in part, silently (see Policy.dsnRet)
        self.transaction = Transaction(command.sender, params)
        self.phase = Phase.MAIL
        self._send(MAIL_OK)

    def _rcpt(self, command: parser.Rcpt) -> None:
        if self.phase is Phase.CONNECTED:
            return self._send(BAD_SEQUENCE_HELO)
        transaction = self.transaction
        if transaction is None or self.phase not in (Phase.MAIL, Phase.RCPT):
            return self._send(BAD_SEQUENCE_MAIL)
        params = rcptParams(command.params, self._offeredKeywords())
        if isinstance(params, Status):
            return self._send(params)
        if len(transaction.recipients) >= self.settings.maxRecipients:
            self._overshoot += 1
            return self._send(TOO_MANY_RECIPIENTS, counted=self._overshoot > RECIPIENT_OVERSHOOT)
        policy = self.settings.policy
        mayRelay = policy.mayRelay(self.client, self.authenticated)
        notify = policy.dsnNotify(params.notify, mayRelay)
        if command.recipient is None:
            address = str(parseMailbox(self.settings.postmaster))
            answer: Status | Deferred[Status] = RCPT_OK
        else:
            address = str(command.recipient)
            session = SessionInfo(
                client_address=self.client,
                helo=self.helo,
                sender=str(transaction.sender) if transaction.sender else "",
                authenticated=self.authenticated,
                tls=self.tls,
                local_domain=policy.isLocal(command.recipient.domain),
            )
            answer = policy.checkRecipient(address, session, mayRelay)

        def decided(status: Status) -> Status:
            if status.ok and self.transaction is transaction:
                transaction.recipients.append(Recipient(address, notify=notify, orcpt=params.orcpt))
                self.phase = Phase.RCPT
            elif not status.ok:
                sender = str(transaction.sender) if transaction.sender else ""
                self._rejected("recipient", status, sender, address)
            return status

        if isinstance(answer, Status):
            self._send(decided(answer))
        else:
            answer.addCallback(decided)
            self._wait(answer)

    def _data(self) -> None:
        if self.phase is Phase.CONNECTED:
            return self._send(BAD_SEQUENCE_HELO)
        if self.phase is Phase.MAIL:
            return self._send(NO_VALID_RECIPIENTS)
        if self.phase is not Phase.RCPT:
            return self._send(BAD_SEQUENCE_RCPT)
        assert self.transaction is not None
        if self.transaction.params.body == "BINARYMIME":
            return self._send(BINARYMIME_NEEDS_BDAT)
        refusal = self._beginMessage()
        if refusal is not None:
            return self._send(refusal)
        self._reader = DotReader(self._writeBody)
        self.phase = Phase.DATA
        self.setTimeout(self.settings.dataTimeout)
        self._startDataDeadline()
        self._send(START_DATA)

    def _bdat(self, command: parser.Bdat) -> None:
        # The chunk's bytes follow whatever we answer, so they are read in every
        # case; a refusal is sent once they have been consumed (RFC 3030 2).
        refusal: Status | None = None
        if "CHUNKING" not in self._offeredKeywords():
            refusal = BAD_SEQUENCE_HELO if self.phase is Phase.CONNECTED else NOT_IMPLEMENTED
        elif self.phase is Phase.CONNECTED:
            refusal = BAD_SEQUENCE_HELO
        elif self.phase is Phase.MAIL:
            refusal = NO_VALID_RECIPIENTS
        elif self.phase is Phase.RCPT:
            refusal = self._beginMessage()
            if refusal is None:
                self.phase = Phase.CHUNKING
                # The lines of a 7BIT or 8BITMIME body obey the rules DATA
                # enforces, or the body could smuggle a message to a next hop
                # that we relay it to with DATA; only BINARYMIME is free.
                assert self.transaction is not None
                binary = self.transaction.params.body == "BINARYMIME"
                self._checker = None if binary else LineChecker()
        elif self.phase is not Phase.CHUNKING:
            refusal = BAD_SEQUENCE_RCPT
        self._chunk = Chunk(command.size, command.last, refusal)
        self.setTimeout(self.settings.dataTimeout)
        self._startDataDeadline()

    # -- message data ----------------------------------------------------

    def _startDataDeadline(self) -> None:
        """
        A DATA transfer or BDAT chunk must end within data_deadline of its
        start, plus the time its octets take at min_data_rate (as Postfix
        scales smtpd_timeout): a drip ends at the floor, a large message at an
        honest speed does not.
        """
        self._stopDataDeadline()
        self._dataStart = self.settings.clock.seconds()
        self._dataOctets = 0
        self._dataTimer = self.callLater(self.settings.dataDeadline, self._checkDataDeadline)

    def _stopDataDeadline(self) -> None:
        timer, self._dataTimer = self._dataTimer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _checkDataDeadline(self) -> None:
        allowed = max(self.settings.dataDeadline, self._dataOctets / self.settings.minDataRate)
        left = self._dataStart + allowed - self.settings.clock.seconds()
        if left > 0:
            self._dataTimer = self.callLater(left, self._checkDataDeadline)
        else:
            self._deadlineExceeded("data_deadline")

    def _beginMessage(self) -> Status | None:
        try:
            self._incoming = self.settings.store.begin()
            self._size = 0
            self._problem = None
            self._trace = TraceCounter()
            received = self._receivedHeader()
            self._incoming.write(received)
            filters = self.settings.filters
            if filters is not None:
                # The data goes to a spool for the filters; the store gets the filtered message after them.
                from relay.filters.runner import SpooledMessage

                self._incoming = SpooledMessage(self._incoming, filters.newSpool(), received)
        except OSError as e:
            self._abortIncoming()
            return NO_STORAGE if e.errno in (errno.ENOSPC, errno.EDQUOT) else LOCAL_ERROR
        return None

    def _receivedHeader(self) -> bytes:
        transaction = self.transaction
        assert transaction is not None
        protocol = ("UTF8SMTP" if transaction.params.smtputf8 else "ESMTP") if self.esmtp else "SMTP"
        protocol += ("S" if self.tls else "") + ("A" if self.authenticated else "")
        when = _date(int(self.settings.clock.seconds()))
        forClause = ""
        if len(transaction.recipients) == 1:
            forClause = f"\r\n\tfor <{transaction.recipients[0].address}>"
        return (
            f"Received: from {self.helo} ([{self.client}])\r\n"
            f"\tby {self.settings.hostname} (relay) with {protocol} id {self._incoming.queue_id}"
            f"{forClause}; {when}\r\n"
        ).encode()

    def _writeBody(self, data: bytes) -> None:
        """Message bytes as the client sent them (unstuffed): check, count, store."""
        if self._problem is not None:
            return
        self._size += len(data)
        if self._size > self.settings.maxMessageSize:
            return self._refuseMessage(MESSAGE_TOO_BIG)
        trace = self._trace
        if trace is not None and not trace.done:
            trace.feed(data)
            if trace.received > self.settings.maxReceived:
                return self._refuseMessage(TOO_MANY_HOPS)
        incoming = self._incoming
        try:
            incoming.write(data)
        except OSError as e:
            return self._refuseMessage(NO_STORAGE if e.errno in (errno.ENOSPC, errno.EDQUOT) else LOCAL_ERROR)
        writable = getattr(incoming, "writable", None)  # optional: IIncomingMessage.writable
        if writable is not None and self._storeBehind is None:
            behind = writable()
            if behind is not None:
                # The store is behind the client: read nothing more until it catches up.
                self._storeBehind = incoming
                self._updateReading()
                behind.addBoth(self._storeCaughtUp, incoming)

    def _refuseMessage(self, problem: Status) -> None:
        """
        The message will be refused whatever follows: stop storing it now
        (the rest is read and dropped up to its end, memory bounded) and
        answer C{problem} there.
        """
        self._problem = problem
        incoming, self._incoming = self._incoming, None
        if self._storeBehind is not None:
            self._storeBehind = None
            self._updateReading()
        if incoming is not None:
            incoming.abort()

    def _storeCaughtUp(self, _: object, incoming: Any) -> None:
        if self._storeBehind is incoming:
            self._storeBehind = None
            self._updateReading()

    def _pumpData(self) -> None:
        assert self._reader is not None
        data, self._buffer = self._buffer, b""
        end = self._reader.feed(data)
        if end is None:
            return
        self._stopDataDeadline()
        self._buffer = data[end:]
        reader, self._reader = self._reader, None
        if reader.error is not None and self._problem is None:
            self._problem = DATA_ERRORS[reader.error]
        self._wait(self._endOfMessage())

    def _chunkComplete(self) -> bool:
        return self._chunk is not None and self._chunk.remaining == 0

    def _pumpChunk(self) -> None:
        chunk = self._chunk
        assert chunk is not None
        if chunk.remaining:
            piece = self._buffer[: chunk.remaining]
            self._buffer = self._buffer[len(piece) :]
            chunk.remaining -= len(piece)
            if chunk.refusal is None:
                self._writeBody(piece)
                checker = self._checker
                if checker is not None:
                    checker.feed(piece)
            if chunk.remaining:
                return
        self._chunk = None
        self._stopDataDeadline()
        checker = self._checker
        if chunk.refusal is None and checker is not None and self._problem is None:
            error = checker.finish() if chunk.last else checker.error
            if error is not None:
                self._problem = DATA_ERRORS[error]
        if chunk.refusal is not None:
            if self.phase is Phase.CHUNKING:
                self._resetTransaction()
            self._send(chunk.refusal)
        elif chunk.last:
            self._wait(self._endOfMessage())
        elif self._problem is not None:
            problem = self._problem
            self._rejected(_REFUSAL_REASONS.get(problem, "message"), problem, self.transaction)
            self._resetTransaction()
            self._send(problem)
        else:
            self._send(_reply(250, "2.0.0", f"{self._size} octets received"))

    def _endOfMessage(self) -> Deferred[Status]:
        transaction = self.transaction
        incoming = self._incoming
        assert transaction is not None
        self.phase = Phase.READY
        self.transaction = None
        self._trace = None
        if self._problem is not None:
            problem, self._problem = self._problem, None
            self._abortIncoming()
            self._rejected(_REFUSAL_REASONS.get(problem, "message"), problem, transaction)
            return succeed(problem)
        self._incoming = None
        params = transaction.params
        envelope = Envelope(
            queue_id=incoming.queue_id,
            sender=str(transaction.sender) if transaction.sender else "",
            recipients=transaction.recipients,
            received_at=self.settings.clock.seconds(),
            size=self._size,
            client_address=self.client,
            helo=self.helo,
            body=params.body,
            smtputf8=params.smtputf8,
            ret=params.ret,
            envid=params.envid,
            auth=self.authenticated,
        )
        if self.settings.filters is not None and not hasattr(incoming, "commit"):
            return self._filter(envelope, incoming)
        return self._commit(envelope, incoming)

    def _commit(self, envelope: Envelope, incoming: Any, logged: dict[str, Any] | None = None) -> Deferred[Status]:
        # The session's own timer is off while we owe the answer, so the
        # commit has a deadline of its own: a wedged disk costs a 451, never
        # a session hung for ever.
        answer: Deferred[Status] = Deferred()
        clock = self.settings.clock
        deadline = clock.callLater(self.settings.commitTimeout, self._commitTooSlow, answer, envelope, incoming)

        def outcome(result: object) -> None:
            if answer.called:
                self._commitLate(result, envelope)
                return
            deadline.cancel()
            if isinstance(result, Failure):
                answer.callback(self._commitFailed(result, incoming))
            else:
                answer.callback(self._committed(envelope, logged))

        maybeDeferred(incoming.commit, envelope).addBoth(outcome)
        return answer

    # -- content filters -------------------------------------------------

    def _filter(self, envelope: Envelope, spooled: Any) -> Deferred[Status]:
        """
        Run the content filters on the spooled message, then queue what they
        left (or answer what they decided).  The answer waits for both.
        """
        protocol, cipher = self._tlsInfo()
        peer = self.transport.getPeer()
        d = self.settings.filters.run(
            spooled.spool,
            [r.address for r in envelope.recipients],
            queue_id=envelope.queue_id,
            sender=envelope.sender,
            client_address=self.client,
            client_port=getattr(peer, "port", 0) or 0,
            helo=self.helo,
            authenticated=self.authenticated,
            tls=self.tls,
            tls_version=protocol,
            tls_cipher=cipher,
            receivedHeader=spooled.received.decode("utf-8", "surrogateescape").rstrip("\r\n"),
            relay_client=self.settings.policy.mayRelay(self.client, None),
            hostname=self.settings.hostname,
        )
        d.addCallback(self._filtered, envelope, spooled)

        def failed(failure: Failure) -> Status:
            spooled.abort()
            self.log.failure("content filters failed on {queue_id}", failure, queue_id=envelope.queue_id)
            return LOCAL_ERROR

        d.addErrback(failed)
        return d

    def _filtered(self, outcome: Any, envelope: Envelope, spooled: Any) -> Status | Deferred[Status]:
        from relay.filters.runner import copyInto
        from relay.filters.verdict import FilterDecision
        from relay.queue.scheduler import HELD_UNTIL

        state = outcome.state
        logged: dict[str, Any] = {"filters": outcome.summary()}
        if outcome.decision in (FilterDecision.REJECT, FilterDecision.TEMPFAIL):
            state.close()
            spooled.abort()
            self._rejected("filter", outcome.status, envelope.sender, None, logged)
            return outcome.status
        if outcome.decision is FilterDecision.DISCARD:
            state.close()
            spooled.abort()
            fields = {"queue_id": envelope.queue_id, "from": envelope.sender, "nrcpt": len(envelope.recipients)}
            logEvent(self.log, "discarded", {**fields, "client": self.client, "user": self.authenticated, **logged})
            return _reply(250, "2.0.0", f"Ok: queued as {envelope.queue_id}")
        kept = {r.address: r for r in envelope.recipients}
        recipients = [kept.get(address) or Recipient(address) for address in outcome.recipients]
        envelope = replace(envelope, recipients=recipients, size=state.size)
        if outcome.decision is FilterDecision.HOLD:
            envelope.extra["held"] = True
            for recipient in recipients:
                recipient.next_attempt = HELD_UNTIL
            logged["held"] = "yes"
        incoming = spooled.incoming

        async def copyThenCommit() -> Status:
            try:
                await copyInto(state, incoming, self.settings.clock)
            except OSError as e:
                incoming.abort()
                return NO_STORAGE if e.errno in (errno.ENOSPC, errno.EDQUOT) else LOCAL_ERROR
            finally:
                state.close()
            return await self._commit(envelope, incoming, logged)

        return Deferred.fromCoroutine(copyThenCommit())

    def _commitTooSlow(self, answer: Deferred[Status], envelope: Envelope, incoming: Any) -> None:
        """
        The store has not made the message durable in time: the client gets
        a 451 and tries again.  The message is aborted, so a store that can
        still drop it does; one whose commit completes all the same keeps it
        queued, and the scheduler delivers it from the disk: a possible
        second copy (the client's retry), never a loss.
        """
        self.log.warn(
            "commit of {queue_id} took more than {timeout}s: answered 451",
            queue_id=envelope.queue_id,
            timeout=self.settings.commitTimeout,
        )
        incoming.abort()
        answer.callback(COMMIT_TOO_SLOW)

    def _commitLate(self, result: object, envelope: Envelope) -> None:
        if isinstance(result, Failure):
            self.log.info("late commit of {queue_id} failed: nothing kept", queue_id=envelope.queue_id)
        else:
            self.log.warn(
                "late commit of {queue_id} succeeded after its 451: it stays queued and is delivered",
                queue_id=envelope.queue_id,
            )

    def _rejected(
        self, reason: str, status: Status, transaction: Any, to: str | None = None, more: dict[str, Any] | None = None
    ) -> None:
        """One C{rejected} line, and the count by C{reason}: a refused recipient or message."""
        if isinstance(transaction, Transaction):
            sender: str | None = str(transaction.sender) if transaction.sender else ""
        else:
            sender = transaction
        if self.settings.metrics is not None:
            self.settings.metrics.rejected.labels(reason=reason).inc()
        fields = {"reason": reason, "client": self.client, "from": sender, "to": to, "user": self.authenticated}
        fields.update(code=status.code, dsn=status.enhanced, reply=status.text)
        if more:
            fields.update(more)
        logEvent(self.log, "rejected", fields)

    def _tlsInfo(self) -> tuple[str | None, str | None]:
        """The session's TLS protocol and cipher (C{TLSv1.3}, C{TLS_AES_256_GCM_SHA384}), or Nones."""
        if not self.tls:
            return None, None
        try:
            connection = self.transport.getHandle()
            return connection.get_protocol_version_name(), connection.get_cipher_name()
        except Exception:
            return "yes", None

    def _committed(self, envelope: Envelope, logged: dict[str, Any] | None = None) -> Status:
        self._accepted += 1
        protocol, cipher = self._tlsInfo()
        fields = {
            "queue_id": envelope.queue_id,
            "from": envelope.sender,
            "size": envelope.size,
            "nrcpt": len(envelope.recipients),
            "client": envelope.client_address,
            "user": envelope.auth,
            "tls": protocol,
            "cipher": cipher,
        }
        if logged:
            fields.update(logged)
        logEvent(self.log, "accepted", fields)
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
        self._checker = None
        self._trace = None
        self._problem = None
        if incoming is not None:
            incoming.abort()

    def _resetTransaction(self) -> None:
        self._abortIncoming()
        self.transaction = None
        if self.phase in (Phase.MAIL, Phase.RCPT, Phase.DATA, Phase.CHUNKING):
            self.phase = Phase.READY


class SMTPServerFactory(ServerFactory):
    """
    Builds sessions for one listener and asks the relay's L{SessionLimits}
    whether each may start (the global cap, and this listener's caps per
    client address and connection rate).
    """

    noisy = False  # one log line per accepted message is ours to write, not one per connection

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.greeting = _reply(220, "2.0.0", f"{settings.hostname} ESMTP relay")
        self.limits = settings.limits if settings.limits is not None else SessionLimits(settings.clock)
        self.sessions: set[SMTPServer] = set()  # admitted and open, for shutdown
        self._closed: list[Deferred[None]] = []

    def buildProtocol(self, addr: Any) -> SMTPServer:
        protocol = SMTPServer(self.settings)
        protocol.factory = self
        return protocol

    def admit(self, protocol: SMTPServer) -> str | None:
        """None if the session may start (then counted until L{release}), else why not."""
        client = protocol.client
        # mayRelay is remembered per client: a relay client's session costs no address parse.
        trusted = self.settings.policy.mayRelay(client, None) or clientIP(client) is None
        refusal = self.limits.admit(client, trusted, self.settings)
        protocol._admitted = refusal is None
        if refusal is None:
            self.sessions.add(protocol)
        return refusal

    def release(self, protocol: SMTPServer) -> None:
        if protocol._admitted:
            protocol._admitted = False
            self.limits.release(protocol.client)
        self.sessions.discard(protocol)
        if not self.sessions:
            closed, self._closed = self._closed, []
            for d in closed:
                d.callback(None)

    def shutdown(self, grace: float) -> Deferred[None]:
        """
        Tell every session the relay is stopping (see L{SMTPServer.shutdown})
        and, after C{grace} seconds, close those still in a transaction.
        Fires once every session has gone; a client that does not read its
        421 is cut off by the session's close grace.
        """
        done: Deferred[None] = Deferred()
        if not self.sessions:
            done.callback(None)
            return done
        self._closed.append(done)
        for session in list(self.sessions):
            session.shutdown()
        if self.sessions:
            timer = self.settings.clock.callLater(grace, self._graceOver)
            done.addBoth(lambda result: (timer.cancel() if timer.active() else None, result)[1])
        return done

    def _graceOver(self) -> None:
        for session in list(self.sessions):
            session.shutdown(now=True)
