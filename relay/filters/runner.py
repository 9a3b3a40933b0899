"""
Running the content filters of C{[policy] filters} on one message.

The server spools the message data to an unlinked file (L{Spool}) instead of
the queue store's; at end-of-data L{FilterChain.run} asks each filter in
turn, applying its changes to a L{MessageState} (the header block in memory,
bounded; the body left in its file), and gives an L{Outcome}: the final
decision, the recipients, a trace per filter, and the message to write into
the store.  Nothing here touches the store or the session: the server does.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from relay.envelope import Status
from relay.filters.message import FilterMessage
from relay.filters.verdict import FilterDecision, FilterVerdict

FILTER_FAILED = Status(451, "4.3.0", "Error: content filter failed, try again later")

# The header block a filter may change is held in memory up to this size;
# lines past it count as body (they are kept, in order, but no filter change
# reaches them).  Postfix's header_size_limit is 100 KB per field.
HEADER_LIMIT = 1024 * 1024
_BLOCK = 256 * 1024
# The trace field (filter_trace = yes).  Not Authentication-Results: that
# field is for the results of authentication methods registered with IANA,
# named by an authserv-id that receivers trust or strip (RFC 8601), and a
# filter's "hold" or "reject" is neither.
TRACE_HEADER = "X-Relay-Filter"


class _FdReader(io.RawIOBase):
    """Reads a file descriptor of its own (a dup) from an offset with pread, so readers never share a position."""

    def __init__(self, fd: int, offset: int) -> None:
        self._fd = os.dup(fd)
        self._pos = offset

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = os.pread(self._fd, len(buffer), self._pos)
        n = len(data)
        buffer[:n] = data
        self._pos += n
        return n

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


class _Chain(io.RawIOBase):
    """Several binary files read one after the other: the header block, then the body's file."""

    def __init__(self, parts: Sequence[IO[bytes]]) -> None:
        self._parts = list(parts)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while self._parts:
            data = self._parts[0].read(len(buffer))
            if data:
                buffer[: len(data)] = data
                return len(data)
            self._parts.pop(0).close()
        return 0

    def close(self) -> None:
        for part in self._parts:
            part.close()
        self._parts = []
        super().close()


class Spool:
    """
    The message data of one transaction in an unlinked temporary file: what
    filters read, since the queue store's message is written only after them.
    Bounded by the server's C{max_message_size} check like the store's file.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.file = tempfile.TemporaryFile(dir=directory, prefix="spool-")
        self.size = 0

    def write(self, data: bytes) -> None:
        self.file.write(data)
        self.size += len(data)

    def finish(self) -> None:
        self.file.flush()

    def fileno(self) -> int:
        return self.file.fileno()

    def close(self) -> None:
        self.file.close()


def _encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _fieldName(raw: bytes) -> bytes:
    return raw.partition(b":")[0].strip().lower()


class MessageState:
    """
    The message as the filters have left it so far: the header block as a
    list of raw fields (each with its folding and final CRLF) once a filter
    changes it, the body as a file and offset.  Until a change, the spool
    file is the whole message and nothing is parsed.
    """

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self.fields: list[bytes] | None = None  # None: not parsed, the spool is the message
        self.separator = b""  # the empty line after the header block, if it had one
        self.bodyFd = spool.fileno()
        self.bodyOffset = 0
        self.bodySize = spool.size
        self._bodyFile: IO[bytes] | None = None  # a replaced body's own file

    def _parse(self) -> list[bytes]:
        if self.fields is not None:
            return self.fields
        fields: list[bytes] = []
        offset = 0
        separator = b""
        with io.BufferedReader(_FdReader(self.spool.fileno(), 0), _BLOCK) as f:
            while offset < HEADER_LIMIT:
                line = f.readline(HEADER_LIMIT - offset + 1)
                if not line:
                    break
                if line in (b"\r\n", b"\n"):
                    separator = line
                    offset += len(line)
                    break
                if line[:1] in (b" ", b"\t") and fields:
                    if offset + len(line) > HEADER_LIMIT:
                        break
                    fields[-1] += line
                    offset += len(line)
                    continue
                name, colon, _ = line.partition(b":")
                if not colon or not name or name != name.strip() or offset + len(line) > HEADER_LIMIT:
                    break
                if not line.endswith(b"\n"):
                    break  # a last header line without its end: leave it to the body
                fields.append(line)
                offset += len(line)
        self.fields = fields
        self.separator = separator
        self.bodyOffset = offset
        self.bodySize = self.spool.size - offset
        return fields

    @property
    def size(self) -> int:
        if self.fields is None:
            return self.spool.size
        return sum(map(len, self.fields)) + len(self.separator) + self.bodySize

    def open(self) -> IO[bytes]:
        if self.fields is None:
            return io.BufferedReader(_FdReader(self.spool.fileno(), 0), _BLOCK)
        head = io.BytesIO(b"".join(self.fields) + self.separator)
        return io.BufferedReader(_Chain([head, _FdReader(self.bodyFd, self.bodyOffset)]), _BLOCK)

    def apply(self, verdict: FilterVerdict, maxSize: int) -> None:
        """
        Make C{verdict}'s changes to the message.  @raise ValueError: a
        replaced body larger than C{maxSize} (the filter's fault, as if it
        had raised).
        """
        if not (verdict.changeHeaders or verdict.insertHeaders or verdict.addHeaders or verdict.replaceBody):
            return
        fields = self._parse()
        for name, occurrence, value in verdict.changeHeaders:
            wanted = name.lower().encode()
            seen = 0
            for i, raw in enumerate(fields):
                if _fieldName(raw) == wanted:
                    seen += 1
                    if seen == occurrence:
                        if value is None:
                            del fields[i]
                        else:
                            fields[i] = raw.partition(b":")[0] + b": " + _encode(value) + b"\r\n"
                        break
            else:
                if value is not None:
                    fields.append(_encode(f"{name}: {value}\r\n"))
        for index, name, value in verdict.insertHeaders:
            fields.insert(max(0, index), _encode(f"{name}: {value}\r\n"))
        fields[:0] = [_encode(f"{name}: {value}\r\n") for name, value in verdict.addHeaders]
        if fields and not self.separator and self.bodySize:
            self.separator = b"\r\n"  # a body followed a header line without an empty line: keep them apart
        if verdict.replaceBody is not None:
            self._replaceBody(verdict.replaceBody, maxSize)

    def _replaceBody(self, source: IO[bytes], maxSize: int) -> None:
        new = tempfile.TemporaryFile(dir=self.spool.directory, prefix="body-")
        try:
            size = 0
            while block := source.read(_BLOCK):
                size += len(block)
                if size > maxSize:
                    raise ValueError(f"replaced body is larger than {maxSize} octets")
                new.write(block)
            new.flush()
        except BaseException:
            new.close()
            raise
        finally:
            source.close()
        if self._bodyFile is not None:
            self._bodyFile.close()
        self._bodyFile = new
        self.bodyFd = new.fileno()
        self.bodyOffset = 0
        self.bodySize = size
        if not self.separator:
            self.separator = b"\r\n"

    def close(self) -> None:
        if self._bodyFile is not None:
            self._bodyFile.close()
            self._bodyFile = None
        self.spool.close()


@dataclass
class FilterSpec:
    """One configured filter: its C{[filter:NAME]} name, the component, and what the relay does about its failures."""

    name: str
    filter: Any  # IMessageFilter
    timeout: float = 60.0
    onError: str = "tempfail"  # tempfail | accept


@dataclass
class Outcome:
    """
    What the filters decided about one message.

    @ivar decision: ACCEPT (queue it: every filter continued or one
        accepted), REJECT, TEMPFAIL, DISCARD or HOLD (queue it held).
    @ivar status: the reply for REJECT and TEMPFAIL.
    @ivar recipients: the envelope recipients after the filters' changes.
    @ivar trace: C{(name, decision, reason)} per filter asked, in order.
    @ivar state: the message to queue.
    """

    decision: FilterDecision
    status: Status | None
    recipients: list[str]
    trace: list[tuple[str, str, str]] = field(default_factory=list)
    state: MessageState | None = None

    def summary(self) -> str:
        """C{dkim:continue,av:hold}: the log line's C{filters} field."""
        return ",".join(f"{name}:{decision}" for name, decision, _ in self.trace)


def _sameAddress(a: str, b: str) -> bool:
    la, _, da = a.rpartition("@")
    lb, _, db = b.rpartition("@")
    return la == lb and da.lower() == db.lower()


class FilterChain:
    """
    The filters of C{[policy] filters}, in order.

    @ivar spoolDir: where spool files go (under C{state_dir}).
    @ivar trace: add an C{X-Relay-Filter} field naming each filter's decision.
    """

    log = Logger()

    def __init__(
        self,
        filters: Sequence[FilterSpec],
        clock: Any,
        spoolDir: Path,
        hostname: str,
        trace: bool = False,
        maxSize: int = 35 * 1024 * 1024,
    ) -> None:
        self.filters = list(filters)
        self.clock = clock
        self.spoolDir = spoolDir
        self.hostname = hostname
        self.trace = trace
        self.maxSize = maxSize

    def newSpool(self) -> Spool:
        return Spool(self.spoolDir)

    async def _ask(self, spec: FilterSpec, message: FilterMessage) -> FilterVerdict:
        d = maybeDeferred(spec.filter.check, message)
        expired = []

        def expire() -> None:
            expired.append(True)
            d.cancel()

        timer = self.clock.callLater(spec.timeout, expire)
        try:
            verdict = await d
        except CancelledError:
            if expired:
                raise TimeoutError(f"no answer within {spec.timeout:g}s") from None
            raise
        finally:
            if timer.active():
                timer.cancel()
        if not isinstance(verdict, FilterVerdict):
            raise TypeError(f"check returned {verdict!r}, not a FilterVerdict")
        return verdict

    def run(self, spool: Spool, recipients: Sequence[str], **snapshot: Any) -> Deferred[Outcome]:
        """
        Ask every filter about the spooled message.  C{snapshot} holds the
        L{FilterMessage} fields other than the data and recipients.  Never
        fails: a filter's failure is an L{Outcome} (TEMPFAIL, or skipped).
        """
        return Deferred.fromCoroutine(self._run(spool, list(recipients), snapshot))

    async def _run(self, spool: Spool, recipients: list[str], snapshot: dict[str, Any]) -> Outcome:
        spool.finish()
        state = MessageState(spool)
        outcome = Outcome(FilterDecision.ACCEPT, None, recipients, state=state)
        held = False
        for spec in self.filters:
            message = FilterMessage(
                recipients=tuple(outcome.recipients), size=state.size, opener=state.open, **snapshot
            )
            try:
                verdict = await self._ask(spec, message)
                state.apply(verdict, self.maxSize)
            except Exception as e:
                failure = Failure()
                why = f"{type(e).__name__}: {e}" if isinstance(e, TimeoutError | TypeError | ValueError) else str(e)
                if spec.onError == "accept":
                    self.log.failure(
                        "filter {name} failed on {queue_id}, skipped (on_error = accept): {why}",
                        failure,
                        name=spec.name,
                        queue_id=snapshot.get("queue_id"),
                        why=why,
                    )
                    outcome.trace.append((spec.name, "error", f"skipped: {why}"[:200]))
                    continue
                self.log.failure(
                    "filter {name} failed on {queue_id}: answered 451: {why}",
                    failure,
                    name=spec.name,
                    queue_id=snapshot.get("queue_id"),
                    why=why,
                )
                outcome.trace.append((spec.name, "error", why[:200]))
                outcome.decision, outcome.status = FilterDecision.TEMPFAIL, FILTER_FAILED
                return outcome
            outcome.trace.append((spec.name, verdict.decision.value, verdict.reason))
            for address in verdict.removeRecipients:
                outcome.recipients = [r for r in outcome.recipients if not _sameAddress(r, address)]
            for address in verdict.addRecipients:
                if not any(_sameAddress(r, address) for r in outcome.recipients):
                    outcome.recipients.append(address)
            decision = verdict.decision
            if decision in (FilterDecision.REJECT, FilterDecision.TEMPFAIL, FilterDecision.DISCARD):
                outcome.decision, outcome.status = decision, verdict.status
                return outcome
            if decision is FilterDecision.HOLD:
                held = True  # the next filters still run: a later one may sign, or reject
            elif decision is FilterDecision.ACCEPT:
                break
        if not outcome.recipients:
            outcome.trace.append(("relay", "discard", "no recipient left"))
            outcome.decision = FilterDecision.DISCARD
            return outcome
        if held:
            outcome.decision = FilterDecision.HOLD
        if self.trace:
            text = f"{self.hostname}; " + "; ".join(
                f"{name}={decision}" + (f" ({reason})" if reason else "") for name, decision, reason in outcome.trace
            )
            state.apply(FilterVerdict(addHeaders=((TRACE_HEADER, _fold(text)),)), self.maxSize)
        return outcome

    def stop(self) -> Deferred[Any]:
        from twisted.internet.defer import DeferredList

        stops = []
        for spec in self.filters:
            d = maybeDeferred(spec.filter.stop)
            d.addErrback(lambda f, name=spec.name: self.log.failure("stopping filter {name} failed", f, name=name))
            stops.append(d)
        return DeferredList(stops)


def _fold(text: str, width: int = 76) -> str:
    """Fold a trace value at its "; " separators so no line grows past what RFC 5322 recommends."""
    text = text.replace("\r", " ").replace("\n", " ")
    parts = text.split("; ")
    lines = [parts[0]]
    for part in parts[1:]:
        if len(lines[-1]) + 2 + len(part) > width:
            lines[-1] += ";"
            lines.append("\t" + part)
        else:
            lines[-1] += "; " + part
    return "\r\n".join(lines)


class SpooledMessage:
    """
    Stands in for the queue store's L{IIncomingMessage} while a message is
    received for the filters: the data goes to a L{Spool}, and the store's
    message (which already holds the relay's Received field and gives the
    queue id) gets the filtered message afterwards, through L{copyInto}.
    """

    def __init__(self, incoming: Any, spool: Spool, received: bytes) -> None:
        self.incoming = incoming
        self.spool = spool
        self.received = received
        self.queue_id = incoming.queue_id

    def write(self, data: bytes) -> None:
        self.spool.write(data)

    def abort(self) -> None:
        self.spool.close()
        self.incoming.abort()


async def copyInto(state: MessageState, incoming: Any, clock: Any) -> None:
    """
    Write the filtered message into the store's incoming message, a block
    at a time, waiting whenever the store asks to (its optional
    C{writable}), and letting the reactor run every few megabytes.
    """
    from twisted.internet.task import deferLater

    with state.open() as f:
        blocks = 0
        while block := f.read(_BLOCK):
            incoming.write(block)
            writable = getattr(incoming, "writable", None)
            behind = writable() if writable is not None else None
            if behind is not None:
                await behind
            blocks += 1
            if blocks % 16 == 0:
                await deferLater(clock, 0, lambda: None)
