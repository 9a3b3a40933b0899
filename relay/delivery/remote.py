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

from relay.envelope import DeliveryResult, Envelope, Recipient, Status
from relay.smtp.client import (
    ClientSettings,
    GreetingError,
    Outcome,
    Outgoing,
    SessionError,
    SMTPClient,
    TLSPolicy,
    openSession,
    transaction,
)
from relay.smtp.client import quit as quitSession

log = Logger()

CONNECT_TIMEOUT = 30.0


class Unreachable(Exception):
    """No session with this host: connection refused or timed out, or no 220 greeting."""

    def __init__(self, status: Status) -> None:
        super().__init__(str(status))
        self.status = status


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


async def _session(reactor: Any, hop: Hop, settings: ClientSettings, message: Outgoing, implicit: Any) -> Outcome:
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
            raise Unreachable(Status(451, "4.4.2", f"{hop.name}[{hop.address}] greeted with {e.status}")) from None
        outcome = await transaction(client, message)
    except BaseException:
        if client.transport is not None:
            client.transport.abortConnection()
        raise
    await quitSession(client)
    return outcome


async def deliverTo(
    reactor: Any, hop: Hop, settings: ClientSettings, message: Outgoing, implicit: Any = None
) -> Outcome:
    """
    One session with one host.

    @raise Unreachable: no connection, or no 220 greeting: the caller may try
        another host.
    @raise SessionError: the session failed after the greeting.
    """
    try:
        return await _session(reactor, hop, settings, message, implicit)
    except SessionError as e:
        if e.tlsFailed and settings.tls is TLSPolicy.OPPORTUNISTIC:
            log.info("TLS with {host} failed ({why}); trying again without it", host=hop.name, why=e.status.text)
            return await _session(reactor, hop, replace(settings, tls=TLSPolicy.NONE), message, implicit)
        raise


def results(recipients: Sequence[Recipient], outcome: Outcome) -> list[DeliveryResult]:
    missing = Status(451, "4.4.0", "no reply for this recipient")
    return [
        DeliveryResult(r.address, outcome.statuses.get(r.address, missing), dsnPassed=outcome.dsnPassed)
        for r in recipients
    ]


def everyone(recipients: Sequence[Recipient], status: Status) -> list[DeliveryResult]:
    return [DeliveryResult(r.address, status) for r in recipients]


def run(coroutine: Any) -> Deferred[Any]:
    return Deferred.fromCoroutine(coroutine)
