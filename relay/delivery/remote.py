"""
One delivery attempt to one next-hop host, shared by the smart host and MX
backends: connect (implicit TLS if asked), run the session of
L{relay.smtp.client}, and turn its outcome into L{DeliveryResult}s.

Opportunistic TLS that fails in the handshake is retried once on a new
connection without STARTTLS, as RFC 3207 leaves it to the client.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from relay.envelope import DeliveryResult, Envelope, Recipient, Status, StatusError
from relay.smtp.client import (
    ClientSettings,
    GreetingError,
    Outcome,
    Outgoing,
    SessionError,
    SMTPClient,
    TLSPolicy,
    openSession,
    peerOf,
    transaction,
)
from relay.smtp.client import quit as quitSession

log = Logger()

CONNECT_TIMEOUT = 30.0


class Unreachable(StatusError):
    """No session with this host: connection refused or timed out, no 220 greeting, or EHLO refused."""


@dataclass(frozen=True)
class Hop:
    name: str  # the host name: certificate checks and log lines
    address: str  # what to connect to: an IP address, or a name to resolve
    port: int


def outgoing(envelope: Envelope, recipients: Sequence[Recipient], openData: Any) -> Outgoing:
    return Outgoing(
        sender=envelope.sender,
        recipients=list(recipients),
        openData=openData,
        size=envelope.size,
        body=envelope.body,
        smtputf8=envelope.smtputf8,
        ret=envelope.ret,
        envid=envelope.envid,
    )


def _endpoint(reactor: Any, hop: Hop, timeout: float) -> Any:
    try:
        ip = ipaddress.ip_address(hop.address)
    except ValueError:
        return HostnameEndpoint(reactor, hop.address.encode("idna"), hop.port, timeout=timeout)
    endpoint = TCP6ClientEndpoint if ip.version == 6 else TCP4ClientEndpoint
    return endpoint(reactor, hop.address, hop.port, timeout=timeout)


class SessionPool:
    """
    Sessions kept open after a transaction, for the next message to the same
    host.  An idle session is closed with QUIT after C{idle} seconds.
    """

    def __init__(self, clock: Any, idle: float = 5.0, perHost: int = 20) -> None:
        self.clock = clock
        self.idle = idle
        self.perHost = perHost
        self._idle: dict[Any, list[tuple[SMTPClient, Any]]] = {}

    def take(self, key: Any) -> SMTPClient | None:
        sessions = self._idle.get(key)
        while sessions:
            client, timer = sessions.pop()
            if timer.active():
                timer.cancel()
            if client.alive:
                return client
        return None

    def give(self, key: Any, client: SMTPClient) -> None:
        sessions = self._idle.setdefault(key, [])
        if len(sessions) >= self.perHost or not client.alive:
            Deferred.fromCoroutine(quitSession(client))
            return

        def expire() -> None:
            for i, (each, _) in enumerate(sessions):
                if each is client:
                    del sessions[i]
                    break
            Deferred.fromCoroutine(quitSession(client))

        sessions.append((client, self.clock.callLater(self.idle, expire)))

    def close(self) -> None:
        """QUIT every idle session (the backend is stopping)."""
        idle, self._idle = self._idle, {}
        for sessions in idle.values():
            for client, timer in sessions:
                if timer.active():
                    timer.cancel()
                Deferred.fromCoroutine(quitSession(client))


async def _reused(pool: SessionPool, key: Any, message: Outgoing) -> Outcome | None:
    """
    The message over an idle session, if one works.  No RSET first: a
    transaction that ended with its reply leaves the session clean (RFC 5321
    4.1.4).  A session the server closed while idle fails before the first
    reply of the transaction, when nothing can have been accepted: then the
    next idle session, or a new connection, gets the message.
    """
    client = pool.take(key)
    while client is not None:
        before = client.repliesReceived
        try:
            outcome = await transaction(client, message)
        except SessionError as e:
            _blame(e, client)
            if client.transport is not None:
                client.transport.abortConnection()
            if client.repliesReceived != before:
                raise  # the server had answered: this attempt ends here
            client = pool.take(key)
            continue
        pool.give(key, client)
        return outcome
    return None


async def _session(
    reactor: Any, hop: Hop, settings: ClientSettings, message: Outgoing, implicit: Any, pool: SessionPool | None
) -> Outcome:
    key = (hop, settings.tls, settings.username, settings.checkPeer)  # a policy check: its own sessions
    if pool is not None:
        outcome = await _reused(pool, key, message)
        if outcome is not None:
            return outcome
    endpoint = _endpoint(reactor, hop, CONNECT_TIMEOUT)
    if implicit is not None:
        endpoint = wrapClientTLS(implicit, endpoint)
    client = SMTPClient(settings)
    try:
        await endpoint.connect(Factory.forProtocol(lambda: client))
    except (ConnectError, DNSLookupError, OSError) as e:
        raise Unreachable(Status(451, "4.4.1", f"cannot connect to {hop.name}[{hop.address}]:{hop.port}: {e}"))
    try:
        try:
            await openSession(client)
        except GreetingError as e:
            # A refusal at the greeting or at EHLO/HELO, whatever its code, lets the
            # next host try; if none takes the mail, the last one's words are kept.
            where = f"{hop.name}[{hop.address}]:{hop.port}"
            raise Unreachable(Status(451, "4.4.2", f"{where} refused the session: {e.status}")) from None
        outcome = await transaction(client, message)
    except BaseException as e:
        if isinstance(e, SessionError):
            _blame(e, client)
        if client.transport is not None:
            client.transport.abortConnection()
        raise
    if pool is not None:
        pool.give(key, client)
    else:
        await quitSession(client)
    return outcome


def _blame(error: SessionError, client: SMTPClient) -> None:
    """
    Note on C{error} the peer whose session failed (C{error.peer}), before
    the connection is aborted: a deferral's log line names the server that
    failed, as a delivery's names the server that took the mail.
    """
    if error.peer is None:
        error.peer = peerOf(client)


async def deliverTo(
    reactor: Any,
    hop: Hop,
    settings: ClientSettings,
    message: Outgoing,
    implicit: Any = None,
    pool: SessionPool | None = None,
) -> Outcome:
    """
    One session with one host.

    @raise Unreachable: no connection, no 220 greeting, or a temporary
        refusal of EHLO or HELO: the caller may try another host.
    @raise SessionError: the session failed after the greeting.
    """
    try:
        return await _session(reactor, hop, settings, message, implicit, pool)
    except SessionError as e:
        if e.tlsFailed and settings.tls is TLSPolicy.OPPORTUNISTIC:
            log.info("TLS with {host} failed ({why}); trying again without it", host=hop.name, why=e.status.text)
            return await _session(reactor, hop, replace(settings, tls=TLSPolicy.NONE), message, implicit, pool)
        raise


def results(recipients: Sequence[Recipient], outcome: Outcome) -> list[DeliveryResult]:
    missing = Status(451, "4.4.0", "no reply for this recipient")
    return [
        DeliveryResult(
            r.address, outcome.statuses.get(r.address, missing), dsnPassed=outcome.dsnPassed, relay=outcome.peer
        )
        for r in recipients
    ]


def everyone(recipients: Sequence[Recipient], status: Status, relay: str | None = None) -> list[DeliveryResult]:
    """
    The same status for every recipient; C{relay} is the peer that gave it
    (a L{SessionError}'s C{peer}), C{None} when no session was had.
    """
    return [DeliveryResult(r.address, status, relay=relay) for r in recipients]


def failedAt(error: StatusError) -> str | None:
    """The peer a session error happened with (see L{_blame}), or C{None} (no session: unreachable)."""
    return getattr(error, "peer", None)
