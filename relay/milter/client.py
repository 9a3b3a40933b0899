"""
One conversation with a milter, as an MTA holds it.

L{MilterClient} connects through a Twisted client endpoint (C{tcp:host:port}
or C{unix:path}), negotiates options, then sends one message's steps in the
order Sendmail and Postfix do (connect, helo, mail, rcpt..., data, header...,
eoh, body chunks, end of message), each preceded by its macros, and returns
each step's reply.  What the milter negotiated is honoured: a step it asked
not to get is not sent (L{SKIPPED}), a step it will not answer is not waited
for (L{NO_REPLY}).  At the end of the message it collects the modification
actions and the final reply.

Every wait is bounded by C{timeout} (a C{SMFIR_PROGRESS} restarts it, as in
Sendmail); a milter that is down, too slow, closes the connection or breaks the
protocol raises L{MilterError}, and the connection is then dropped, never
reused (Postfix's rule: after an error nobody knows what is still in flight).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from relay.milter import protocol as P


class MilterError(Exception):
    """The milter could not be asked: down, too slow, gone, or speaking something else."""


class MilterTimeout(MilterError):
    pass


# What the relay can do at the end of a message, offered in negotiation.  Not
# offered: changing the sender (SMFIF_CHGFROM) and recipients with ESMTP
# arguments (SMFIF_ADDRCPT_PAR), which a content filter's verdict cannot
# express; a milter that needs them fails negotiation rather than have its
# changes silently dropped.
OFFERED_ACTIONS = (
    P.SMFIF_ADDHDRS
    | P.SMFIF_CHGBODY
    | P.SMFIF_ADDRCPT
    | P.SMFIF_DELRCPT
    | P.SMFIF_CHGHDRS
    | P.SMFIF_QUARANTINE
    | P.SMFIF_SETSYMLIST
)
# Every step may be skipped or left unanswered, SMFIR_SKIP is understood, and
# header values keep their leading space on request.  Not offered: larger body
# chunks (SMFIP_MDS_*).
OFFERED_PROTOCOL = 0x1FFFFF

# A step, its NO flag (not sent) and its NR flag (not answered).
STEPS: dict[bytes, tuple[int, int]] = {
    P.CONNECT: (P.SMFIP_NOCONNECT, P.SMFIP_NR_CONN),
    P.HELO: (P.SMFIP_NOHELO, P.SMFIP_NR_HELO),
    P.MAIL: (P.SMFIP_NOMAIL, P.SMFIP_NR_MAIL),
    P.RCPT: (P.SMFIP_NORCPT, P.SMFIP_NR_RCPT),
    P.DATA: (P.SMFIP_NODATA, P.SMFIP_NR_DATA),
    P.HEADER: (P.SMFIP_NOHDRS, P.SMFIP_NR_HDR),
    P.EOH: (P.SMFIP_NOEOH, P.SMFIP_NR_EOH),
    P.BODY: (P.SMFIP_NOBODY, P.SMFIP_NR_BODY),
    P.UNKNOWN: (P.SMFIP_NOUNKNOWN, P.SMFIP_NR_UNKN),
}
STAGE_OF = {command: stage for stage, command in P.STAGE_COMMANDS.items()}

# Pseudo-replies for steps that got no answer.
SKIPPED = P.Simple(b"")  # not sent: the milter asked not to see it
NO_REPLY = P.Simple(P.CONTINUE)  # sent, not answered: counts as continue

# Replies that end a step (anything else at a step that is not the end of the
# message is a protocol error).
FINAL = frozenset([P.ACCEPT, P.CONTINUE, P.DISCARD, P.REJECT, P.TEMPFAIL, P.SKIP])
# What each modification needs to have been negotiated.
_NEEDS = {
    P.ADDHEADER: P.SMFIF_ADDHDRS,
    P.INSHEADER: P.SMFIF_ADDHDRS,
    P.CHGHEADER: P.SMFIF_CHGHDRS,
    P.REPLBODY: P.SMFIF_CHGBODY,
    P.ADDRCPT: P.SMFIF_ADDRCPT,
    P.ADDRCPT_PAR: P.SMFIF_ADDRCPT_PAR,
    P.DELRCPT: P.SMFIF_DELRCPT,
    P.CHGFROM: P.SMFIF_CHGFROM,
}


class _Wire(Protocol):
    def __init__(self, client: MilterClient) -> None:
        self.client = client
        self.reader = P.PacketReader()

    def connectionMade(self) -> None:
        self.client._connected(self)

    def dataReceived(self, data: bytes) -> None:
        try:
            for command, payload in self.reader.feed(data):
                self.client._received(P.decodeReply(command, payload))
        except P.MilterProtocolError as e:
            self.client._fail(MilterError(f"protocol error: {e}"))

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.client._lost(reason)


class MilterClient:
    """
    One milter connection for one message.

    @ivar name: for error texts (the C{[filter:NAME]}).
    @ivar options: what was negotiated (after L{open}).
    """

    def __init__(
        self, endpoint: IStreamClientEndpoint, clock: Any, timeout: float = 30.0, name: str = "milter"
    ) -> None:
        self.endpoint = endpoint
        self.clock = clock
        self.timeout = timeout
        self.name = name
        self.options: P.Options | None = None
        self._wire: _Wire | None = None
        self._replies: deque[P.Reply] = deque()
        self._waiter: Deferred[P.Reply] | None = None
        self._timer: Any = None
        self._error: MilterError | None = None
        self._closed = False

    # -- the connection ------------------------------------------------------

    async def open(self) -> P.Options:
        """Connect and negotiate.  @raise MilterError: down, slow, or asks for what the relay does not offer."""
        factory = Factory.forProtocol(lambda: _Wire(self))
        d = self.endpoint.connect(factory)
        timedOut = []

        def expire() -> None:
            timedOut.append(True)
            d.cancel()

        timer = self.clock.callLater(self.timeout, expire)
        try:
            await d
        except CancelledError:
            if timedOut:
                raise MilterTimeout(f"milter {self.name}: no connection within {self.timeout:g}s") from None
            raise
        except Exception as e:
            raise MilterError(f"milter {self.name}: cannot connect: {e}") from None
        finally:
            if timer.active():
                timer.cancel()
        self._send(P.encodeOptneg(P.VERSION, OFFERED_ACTIONS, OFFERED_PROTOCOL))
        reply = await self._next()
        if not isinstance(reply, P.Options):
            raise self._fail(MilterError(f"milter {self.name}: answered option negotiation with {reply}"))
        if not 2 <= reply.version <= P.VERSION:
            raise self._fail(MilterError(f"milter {self.name}: protocol version {reply.version}"))
        if reply.actions & ~OFFERED_ACTIONS:
            raise self._fail(
                MilterError(f"milter {self.name}: wants actions {reply.actions & ~OFFERED_ACTIONS:#x} not offered")
            )
        if reply.protocol & ~OFFERED_PROTOCOL:
            raise self._fail(
                MilterError(f"milter {self.name}: wants protocol steps {reply.protocol & ~OFFERED_PROTOCOL:#x}")
            )
        self.options = reply
        return reply

    def close(self) -> None:
        """Say goodbye (SMFIC_QUIT) if the conversation is sound, and drop the connection."""
        if self._closed:
            return
        self._closed = True
        self._cancelTimer()
        if self._wire is not None and self._wire.transport is not None:
            if self._error is None:
                self._wire.transport.write(P.encodeSimple(P.QUIT))
                self._wire.transport.loseConnection()
            else:
                self._wire.transport.abortConnection()
        if self._waiter is not None:
            waiter, self._waiter = self._waiter, None
            waiter.errback(MilterError(f"milter {self.name}: closed"))

    # -- the steps -----------------------------------------------------------

    def wants(self, command: bytes) -> bool:
        """Whether the milter wants this step sent at all."""
        assert self.options is not None
        noFlag = STEPS.get(command, (0, 0))[0]
        return not self.options.protocol & noFlag

    def macroNames(self, stage: int, default: Sequence[str]) -> Sequence[str]:
        """The macros to send at C{stage}: the milter's list (SMFIR_SETSYMLIST in negotiation) or C{default}."""
        assert self.options is not None
        return self.options.symlists.get(stage, default)

    async def step(self, command: bytes, encoded: bytes, macros: Iterable[tuple[str, str]] = ()) -> P.Reply:
        """
        Send one step (after its macros, if any) and return its reply:
        L{SKIPPED} if the milter asked not to see it, L{NO_REPLY} if it
        will not answer it.  Macros are sent even for a skipped step, as
        Postfix does, so that the milter sees them at the next one.
        """
        assert self.options is not None
        macros = list(macros)
        if macros and command in STAGE_OF:
            self._send(P.encodeMacros(command, macros))
        noFlag, nrFlag = STEPS.get(command, (0, 0))
        if self.options.protocol & noFlag:
            return SKIPPED
        self._send(encoded)
        if self.options.protocol & nrFlag:
            return NO_REPLY
        reply = await self._next()
        if not (isinstance(reply, P.ReplyCode) or (isinstance(reply, P.Simple) and reply.command in FINAL)):
            raise self._fail(MilterError(f"milter {self.name}: unexpected reply {reply} to {command!r}"))
        if isinstance(reply, P.Simple) and reply.command == P.SKIP and command != P.BODY:
            raise self._fail(MilterError(f"milter {self.name}: SMFIR_SKIP in answer to {command!r}"))
        return reply

    async def endOfMessage(self, macros: Iterable[tuple[str, str]] = ()) -> tuple[list[P.Reply], P.Reply]:
        """
        Send SMFIC_BODYEOB and collect the modifications up to the final
        reply.  @return: C{(modifications, final)}.
        """
        assert self.options is not None
        macros = list(macros)
        if macros:
            self._send(P.encodeMacros(P.BODYEOB, macros))
        self._send(P.encodeSimple(P.BODYEOB))
        changes: list[P.Reply] = []
        while True:
            reply = await self._next()
            if isinstance(reply, P.ReplyCode):
                return changes, reply
            if isinstance(reply, P.Simple):
                if reply.command in FINAL and reply.command != P.SKIP:
                    return changes, reply
                raise self._fail(MilterError(f"milter {self.name}: unexpected reply {reply} at end of message"))
            if isinstance(reply, P.Options):
                raise self._fail(MilterError(f"milter {self.name}: option negotiation at end of message"))
            if isinstance(reply, P.Quarantine):
                need = P.SMFIF_QUARANTINE
            elif isinstance(reply, P.ReplaceBody):
                need = P.SMFIF_CHGBODY
            else:
                need = _NEEDS[reply.command]  # type: ignore[union-attr]
            if not self.options.actions & need:
                raise self._fail(MilterError(f"milter {self.name}: {reply!r:.80} was not negotiated"))
            changes.append(reply)

    def abort(self) -> None:
        """SMFIC_ABORT: the message is over for the milter (it was refused at an earlier step)."""
        if self._error is None and not self._closed and self._wire is not None:
            self._send(P.encodeSimple(P.ABORT))

    # -- plumbing ------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        if self._error is not None:
            raise self._error
        if self._wire is None or self._wire.transport is None or self._closed:
            raise MilterError(f"milter {self.name}: not connected")
        self._wire.transport.write(data)

    def _next(self) -> Deferred[P.Reply]:
        """The next reply, within C{timeout}; SMFIR_PROGRESS restarts the clock and is not returned."""
        if self._error is not None:
            raise self._error
        assert self._waiter is None, "one reply at a time"
        d: Deferred[P.Reply] = Deferred(lambda _: self._cancelled())
        if self._replies:
            d.callback(self._replies.popleft())
            return d
        self._waiter = d
        self._startTimer()
        return d

    def _cancelled(self) -> None:
        self._waiter = None
        self._fail(MilterError(f"milter {self.name}: cancelled"))

    def _startTimer(self) -> None:
        self._cancelTimer()
        self._timer = self.clock.callLater(self.timeout, self._expired)

    def _cancelTimer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _expired(self) -> None:
        self._timer = None
        self._fail(MilterTimeout(f"milter {self.name}: no reply within {self.timeout:g}s"))

    def _connected(self, wire: _Wire) -> None:
        self._wire = wire

    def _received(self, reply: P.Reply) -> None:
        if self._error is not None:
            return
        if isinstance(reply, P.Simple) and reply.command == P.PROGRESS:
            if self._waiter is not None:
                self._startTimer()
            return
        if isinstance(reply, P.Simple) and reply.command in (P.SHUTDOWN, P.CONN_FAIL):
            self._fail(
                MilterError(
                    f"milter {self.name}: {'shutting down' if reply.command == P.SHUTDOWN else 'connection failure'}"
                )
            )
            return
        if self._waiter is None:
            if len(self._replies) > 1000:
                self._fail(MilterError(f"milter {self.name}: replies nobody asked for"))
                return
            self._replies.append(reply)
            return
        waiter, self._waiter = self._waiter, None
        self._cancelTimer()
        waiter.callback(reply)

    def _fail(self, error: MilterError) -> MilterError:
        """Record the first error, drop the connection, fail whoever waits.  Returns the error to raise."""
        if self._error is None:
            self._error = error
        self._cancelTimer()
        if self._wire is not None and self._wire.transport is not None and not self._closed:
            self._wire.transport.abortConnection()
        if self._waiter is not None:
            waiter, self._waiter = self._waiter, None
            waiter.errback(self._error)
        return self._error

    def _lost(self, reason: Failure | None) -> None:
        if not self._closed:
            why = reason.getErrorMessage() if reason is not None else "connection lost"
            self._fail(MilterError(f"milter {self.name}: connection lost: {why}"))


def macroList(values: Mapping[str, str], names: Iterable[str]) -> list[tuple[str, str]]:
    """C{(name, value)} for each of C{names} that has a value, in order: undefined ones are not sent (Postfix)."""
    found = []
    for name in names:
        key = name if len(name) == 1 or name.startswith("{") else "{" + name + "}"
        if key in values:
            found.append((key, values[key]))
    return found
