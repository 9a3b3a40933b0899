"""
The control service: what C{relayctl} asks a running relay, over AMP.

It listens on C{[control] endpoint}, by default a UNIX socket C{control.sock}
under C{state_dir} with mode 0600: whoever can open it can delete mail, so it
is the relay's own user's (and root's) alone.  There is no other
authentication.

Every answer that may be long (the queue of an outage is millions of
messages) comes as lines of JSON streamed back to the caller with L{Output},
each sent only once the previous one was taken, since an AMP value is at most
64 KiB and the relay must not build the whole listing in memory.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols import amp

from relay.envelope import Envelope, Recipient, RecipientState
from relay.queue.scheduler import HELD_UNTIL, OperationRefused, Scheduler, UnknownMessage, isHeld

# Characters per Output chunk: at most 4 octets each in UTF-8, under AMP's 64 KiB.
CHUNK = 16_000
# Header octets shown by "show" at most.
HEADER_LIMIT = 64 * 1024


def defaultEndpoint(stateDir: Path) -> str:
    """The control socket when C{[control]} names none: under C{state_dir}, mode 0600."""
    path = str(stateDir / "control.sock").replace("\\", "\\\\").replace(":", "\\:")
    return f"unix:{path}:mode=600:lockfile=1"


def clientEndpoint(server: str) -> str:
    """
    The client endpoint that reaches a control server endpoint: C{unix:PATH}
    and C{tcp:PORT:interface=HOST} are understood.

    @raise ValueError: any other kind (use C{relayctl --socket}).
    """
    parts = _split(server)
    kind = parts[0].lower()
    if kind == "unix":
        path = next((p for p in parts[1:] if "=" not in p or p.startswith("address=")), None)
        if path is None:
            raise ValueError(f"no path in {server!r}")
        path = path.removeprefix("address=")
        return "unix:path=" + path.replace("\\", "\\\\").replace(":", "\\:")
    if kind in ("tcp", "tcp6"):
        port = next((p for p in parts[1:] if "=" not in p or p.startswith("port=")), None)
        options = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
        host = options.get("interface") or ("::1" if kind == "tcp6" else "127.0.0.1")
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1" if kind == "tcp" else "::1"
        if port is None:
            raise ValueError(f"no port in {server!r}")
        return f"tcp:host={host.replace(':', chr(92) + ':')}:port={port.removeprefix('port=')}"
    raise ValueError(f"relayctl cannot reach a {kind!r} endpoint: give --socket PATH")


def _split(text: str) -> list[str]:
    parts, current, escaped = [], [], False
    for c in text:
        if escaped:
            current.append(c)
            escaped = False
        elif c == "\\":
            escaped = True
        elif c == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(c)
    parts.append("".join(current))
    return parts


# -- the commands ------------------------------------------------------------


class Output(amp.Command):
    """Relay to relayctl: one piece of the answer being built (lines of JSON, cut anywhere)."""

    arguments = [(b"chunk", amp.Unicode())]
    response: list[Any] = []


class QueueList(amp.Command):
    """Every queued message, one JSON object per line (see L{describe}), then the count in the store."""

    arguments: list[Any] = []
    response = [(b"total", amp.Integer())]


class Show(amp.Command):
    """One message, as in L{QueueList} plus its C{headers}, as one line of Output."""

    arguments = [(b"id", amp.Unicode())]
    response: list[Any] = []
    errors = {UnknownMessage: b"UNKNOWN", OperationRefused: b"REFUSED"}


class Stats(amp.Command):
    arguments: list[Any] = []
    response = [(b"stats", amp.Unicode())]


class _OnMessages(amp.Command):
    """An operation on each queue id named: the ones it failed on come back, one line each."""

    arguments = [(b"ids", amp.ListOf(amp.Unicode()))]
    response = [(b"done", amp.ListOf(amp.Unicode())), (b"errors", amp.ListOf(amp.Unicode()))]


class Hold(_OnMessages):
    pass


class Release(_OnMessages):
    pass


class Delete(_OnMessages):
    pass


class Bounce(_OnMessages):
    pass


class Flush(amp.Command):
    """The messages named, or all of them (or those for C{domain}), are due now."""

    arguments = [(b"ids", amp.ListOf(amp.Unicode())), (b"domain", amp.Unicode(optional=True))]
    response = [
        (b"count", amp.Integer()),
        (b"done", amp.ListOf(amp.Unicode())),
        (b"errors", amp.ListOf(amp.Unicode())),
    ]


class Reload(amp.Command):
    arguments: list[Any] = []
    response = [(b"message", amp.Unicode())]
    errors = {OperationRefused: b"REFUSED"}


# -- what a message looks like to the operator -------------------------------


def rfc3339(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def recipientState(recipient: Recipient) -> str:
    """C{pending} (never tried), C{deferred} (tried, to be tried again), C{delivered}, C{failed}."""
    if recipient.state is RecipientState.PENDING:
        return "deferred" if recipient.attempts else "pending"
    return recipient.state.value


def describe(envelope: Envelope) -> dict[str, Any]:
    """One message as C{relayctl queue --json} prints it (the fields are documented in README)."""
    held = isHeld(envelope)
    recipients = []
    for r in envelope.recipients:
        nextAttempt = r.next_attempt if r.state is RecipientState.PENDING else None
        if held or (nextAttempt is not None and nextAttempt >= HELD_UNTIL):
            nextAttempt = None
        elif r.state is RecipientState.PENDING and nextAttempt is None:
            nextAttempt = envelope.received_at
        recipients.append(
            {
                "address": r.address,
                "state": recipientState(r),
                "attempts": r.attempts,
                "next_attempt": rfc3339(nextAttempt),
                "last_reply": str(r.last_status) if r.last_status is not None else None,
            }
        )
    return {
        "id": envelope.queue_id,
        "sender": envelope.sender,
        "size": envelope.size,
        "arrived": rfc3339(envelope.received_at),
        "held": held,
        "recipients": recipients,
    }


def readHeaders(openData: Callable[[], Any]) -> str:
    """The header section of a queued message (up to HEADER_LIMIT octets), as text."""
    with openData() as f:
        lines = []
        total = 0
        while total < HEADER_LIMIT:
            line = f.readline(HEADER_LIMIT - total)
            if not line or line in (b"\r\n", b"\n"):
                break
            lines.append(line)
            total += len(line)
    return b"".join(lines).decode("utf-8", errors="replace")


# -- the server --------------------------------------------------------------


class ControlProtocol(amp.AMP):
    log = Logger()

    def __init__(self, control: ControlService) -> None:
        super().__init__()
        self.control = control

    async def _emit(self, text: str) -> None:
        for start in range(0, len(text), CHUNK):
            await self.callRemote(Output, chunk=text[start : start + CHUNK])

    @QueueList.responder
    def queueList(self) -> Deferred[dict[str, Any]]:
        async def run() -> dict[str, Any]:
            total = await self.control.scheduler.listQueue(lambda e: self._emit(json.dumps(describe(e)) + "\n"))
            return {"total": total}

        return Deferred.fromCoroutine(run())

    @Show.responder
    def show(self, id: str) -> Deferred[dict[str, Any]]:
        scheduler = self.control.scheduler

        async def run() -> dict[str, Any]:
            envelope = await scheduler.find(id)
            found = describe(envelope)
            try:
                found["headers"] = readHeaders(lambda: scheduler.store.openData(id))
            except OSError as e:
                found["headers"] = None
                found["headers_error"] = str(e)
            await self._emit(json.dumps(found) + "\n")
            return {}

        return Deferred.fromCoroutine(run())

    @Stats.responder
    def stats(self) -> Deferred[dict[str, Any]]:
        return Deferred.fromCoroutine(self.control.stats()).addCallback(lambda s: {"stats": json.dumps(s)})

    def _each(self, operation: Callable[[str], Any], verb: str, ids: list[str]) -> Deferred[dict[str, Any]]:
        async def run() -> dict[str, Any]:
            done, errors = [], []
            for queueID in ids:
                try:
                    await operation(queueID)
                except UnknownMessage:
                    errors.append(f"{queueID}: no such message in the queue")
                except OperationRefused as e:
                    errors.append(str(e))
                except Exception as e:
                    self.log.failure("{verb} {queue_id} failed", verb=verb, queue_id=queueID)
                    errors.append(f"{queueID}: {verb} failed: {e}")
                else:
                    done.append(queueID)
            return {"done": done, "errors": errors}

        return Deferred.fromCoroutine(run())

    @Hold.responder
    def hold(self, ids: list[str]) -> Deferred[dict[str, Any]]:
        return self._each(self.control.scheduler.holdMessage, "hold", ids)

    @Release.responder
    def release(self, ids: list[str]) -> Deferred[dict[str, Any]]:
        return self._each(self.control.scheduler.releaseMessage, "release", ids)

    @Delete.responder
    def delete(self, ids: list[str]) -> Deferred[dict[str, Any]]:
        return self._each(self.control.scheduler.deleteMessage, "delete", ids)

    @Bounce.responder
    def bounce(self, ids: list[str]) -> Deferred[dict[str, Any]]:
        return self._each(self.control.scheduler.bounceMessage, "bounce", ids)

    @Flush.responder
    def flush(self, ids: list[str], domain: str | None = None) -> Deferred[dict[str, Any]]:
        scheduler = self.control.scheduler

        async def run() -> dict[str, Any]:
            if ids:
                result = await self._each(scheduler.flushMessage, "flush", ids)
                return {"count": len(result["done"]), **result}
            count = await scheduler.flushQueue(domain or None)
            return {"count": count, "done": [], "errors": []}

        return Deferred.fromCoroutine(run())

    def _why(self) -> str:
        """The configuration error a refused reload logged, for relayctl's one line."""
        from relay.config import load
        from relay.errors import ConfigError

        path = self.control.configPath
        if path is not None:
            try:
                load(str(path))
            except ConfigError as e:
                return str(e)
            except Exception as e:
                return f"{path}: {e}"
        return "see the relay's log"

    @Reload.responder
    def reload(self) -> Deferred[dict[str, Any]]:
        reload = self.control.reload
        if reload is None:
            raise OperationRefused("reload not supported by this relay")
        d = maybeDeferred(reload)

        def failed(failure: Any) -> None:
            raise OperationRefused(f"reload refused: {failure.getErrorMessage()}")

        def done(result: Any) -> dict[str, Any]:
            if result is False:
                raise OperationRefused(f"reload refused, the running configuration stays: {self._why()}")
            return {"message": result if isinstance(result, str) else "reloaded"}

        d.addCallbacks(done, failed)
        return d


class ControlService(StreamServerEndpointService):
    """
    The control endpoint.  C{sessions} counts the SMTP sessions open;
    C{reload} (if any) is what SIGHUP does, returning a Deferred or raising
    when the new configuration is refused.
    """

    def __init__(
        self,
        endpoint: Any,
        scheduler: Scheduler,
        clock: Any,
        sessions: Callable[[], int] | None = None,
        reload: Callable[[], Any] | None = None,
        configPath: Path | None = None,
    ) -> None:
        self.configPath = configPath
        self.scheduler = scheduler
        self.clock = clock
        self.sessions = sessions
        self.reload = reload
        factory = Factory.forProtocol(lambda: ControlProtocol(self))
        factory.noisy = False
        super().__init__(endpoint, factory)

    async def stats(self) -> dict[str, Any]:
        messages = {"held": 0, "pending": 0, "deferred": 0}
        recipients = {"pending": 0, "deferred": 0, "delivered": 0, "failed": 0}
        oldest: list[float] = []

        def count(envelope: Envelope) -> None:
            if isHeld(envelope):
                messages["held"] += 1
            elif any(r.attempts for r in envelope.pending()):
                messages["deferred"] += 1
            else:
                messages["pending"] += 1
            for r in envelope.recipients:
                recipients[recipientState(r)] += 1
            if not oldest or envelope.received_at < oldest[0]:
                oldest[:] = [envelope.received_at]

        total = await self.scheduler.listQueue(count)
        now = self.clock.seconds()
        return {
            "messages": total,
            "messages_by_state": messages,
            "recipients_by_state": recipients,
            "oldest_age": round(now - oldest[0], 3) if oldest else None,
            "sessions_open": self.sessions() if self.sessions is not None else None,
            "deliveries_in_flight": self.scheduler.inFlight(),
        }


def controlService(
    settings: Any,
    reactor: Any,
    scheduler: Scheduler,
    sessions: Callable[[], int] | None = None,
    reload: Callable[[], Any] | None = None,
) -> ControlService:
    """The control service for C{settings}: C{[control] endpoint}, or the default socket under C{state_dir}."""
    text = settings.control_endpoint or defaultEndpoint(settings.state_dir)
    service = ControlService(
        serverFromString(reactor, text), scheduler, reactor, sessions=sessions, reload=reload, configPath=settings.path
    )
    service.setName("control")
    return service


# -- the client --------------------------------------------------------------


class ControlClient(amp.AMP):
    """relayctl's side: collects what the relay streams back with L{Output}."""

    def __init__(self) -> None:
        super().__init__()
        self.received: list[str] = []

    @Output.responder
    def output(self, chunk: str) -> dict[str, Any]:
        self.received.append(chunk)
        return {}

    def lines(self) -> list[Any]:
        """The JSON lines received since the last call."""
        text, self.received = "".join(self.received), []
        return [json.loads(line) for line in text.splitlines() if line]
