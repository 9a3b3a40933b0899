"""
Listeners behind a load balancer that speaks the PROXY protocol
(C{[listener:NAME] proxy_protocol = v1 | v2}).

L{ProxyFactory} wraps a listener's factory (the SMTP server's, or the TLS
factory around it for implicit TLS, whose handshake follows the header in
clear as HAProxy sends it).  Each connection first reads the header, with
nothing sent and within a short deadline; only then is the wrapped protocol
built and connected, through a transport whose C{getPeer} is the client the
header names.  So everything the session does with its client address
(relay_networks, the per-client session limits and connection rate, logs,
the Received header, AUTH throttling) sees the real client, and admission
happens after the header, as it must.

A connection whose header is missing, malformed, of the other version or
late is closed without a word, and logged: one C{event=rejected
reason=proxy_header} line naming the peer and why, at most one a peer every
L{LOG_INTERVAL} seconds so that a flood cannot fill the disk.  Connections
still reading their header are capped (C{maxPending}): past the cap a new one
is closed at once, so that connections that never send a header cannot take
every descriptor.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IProtocolFactory
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import directlyProvides, providedBy

from relay.logs import logEvent
from relay.smtp.limits import LOG_INTERVAL, _LogLimit
from relay.smtp.proxy import ProxyHeader, ProxyHeaderError, parseHeader

__all__ = ["DEFAULT_TIMEOUT", "MAX_PENDING", "ProxiedTransport", "ProxyFactory", "ProxyProtocol"]

# How long a connection may take to send its whole header (Postfix's
# smtpd_upstream_proxy_timeout is 5s; a balancer sends it with its first segment).
DEFAULT_TIMEOUT = 10.0
# Connections reading their header at once, per listener.
MAX_PENDING = 1000
# Peers whose refusal lines are rate-limited; past this the table starts over.
_LOG_PEERS = 4096


class ProxiedTransport:
    """
    The connection's transport as the wrapped protocol sees it: the same in
    every way (writes, producers, STARTTLS, TLS details are the real
    transport's, looked up at each use) except for the addresses the header
    carried.
    """

    def __init__(self, transport: Any, peer: Any, host: Any) -> None:
        self._transport = transport
        self._peer = peer
        self._host = host
        directlyProvides(self, providedBy(transport))

    def getPeer(self) -> Any:
        return self._peer if self._peer is not None else self._transport.getPeer()

    def getHost(self) -> Any:
        return self._host if self._host is not None else self._transport.getHost()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def _address(pair: tuple[str, int] | None) -> Any:
    if pair is None:
        return None
    host, port = pair
    return IPv6Address("TCP", host, port) if ":" in host else IPv4Address("TCP", host, port)


class ProxyProtocol(Protocol):
    """Reads one connection's header, then hands the connection over to the wrapped protocol."""

    def __init__(self, factory: ProxyFactory) -> None:
        self.factory = factory
        self.wrapped: Any = None
        self._buffer = b""
        self._timer: Any = None
        self._done = False  # refused or handed over: no more header reading

    def connectionMade(self) -> None:
        factory = self.factory
        if factory.pending >= factory.maxPending:
            self._done = True
            self._refuse(f"more than {factory.maxPending} connections waiting for their PROXY header")
            return
        factory.pending += 1
        self._timer = factory.clock.callLater(factory.timeout, self._late)

    def dataReceived(self, data: bytes) -> None:
        if self.wrapped is not None:
            self.wrapped.dataReceived(data)
            return
        if self._done:
            return
        self._buffer += data
        try:
            header = parseHeader(self._buffer, self.factory.version)
        except ProxyHeaderError as e:
            self._finish()
            self._refuse(str(e))
            return
        if header is not None:
            self._handOver(header)

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self.wrapped is not None:
            wrapped, self.wrapped = self.wrapped, None
            wrapped.connectionLost(reason)
            return
        if not self._done:
            self._finish()

    def _finish(self) -> None:
        """Header reading is over: the deadline and the pending count with it."""
        self._done = True
        self.factory.pending -= 1
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _late(self) -> None:
        self._timer = None
        got = len(self._buffer)
        self._finish()
        self._refuse(f"no complete PROXY header within {self.factory.timeout:g}s ({got} octets received)")

    def _refuse(self, why: str) -> None:
        self._buffer = b""
        self.factory.refused(self.transport.getPeer(), why)
        self.transport.loseConnection()  # nothing was written: the peer sees the connection end, no greeting

    def _handOver(self, header: ProxyHeader) -> None:
        self._finish()
        rest, self._buffer = self._buffer[header.length :], b""
        transport = ProxiedTransport(self.transport, _address(header.source), _address(header.destination))
        wrapped = self.factory.wrappedFactory.buildProtocol(transport.getPeer())
        if wrapped is None:
            self.transport.loseConnection()
            return
        self.wrapped = wrapped
        wrapped.makeConnection(transport)
        # What came after the header in the same segment is the session's start (a pipelined EHLO).
        if rest and self.wrapped is not None:
            self.wrapped.dataReceived(rest)


class ProxyFactory(ServerFactory):
    """
    A listener's factory behind a PROXY protocol balancer.

    @param version: 1 or 2; a connection must start with a header of this version.
    @param timeout: seconds for the whole header to arrive.
    @param clock: the reactor's clock, for the deadline.
    @param metrics: L{relay.metrics.Metrics}, counting refusals as
        C{relay_messages_rejected_total{reason="proxy_header"}}; None: not counted.
    """

    noisy = False
    log = Logger()

    def __init__(
        self,
        wrappedFactory: IProtocolFactory,
        version: int,
        clock: Any,
        timeout: float = DEFAULT_TIMEOUT,
        maxPending: int = MAX_PENDING,
        metrics: Any = None,
        logInterval: float = LOG_INTERVAL,
    ) -> None:
        if version not in (1, 2):
            raise ValueError(f"no PROXY protocol version {version!r}")
        self.wrappedFactory = wrappedFactory
        self.version = version
        self.clock = clock
        self.timeout = timeout
        self.maxPending = maxPending
        self.metrics = metrics
        self.logInterval = logInterval
        self.pending = 0  # connections reading their header
        self._logged: dict[str, _LogLimit] = {}

    def buildProtocol(self, addr: Any) -> ProxyProtocol:
        return ProxyProtocol(self)

    def doStart(self) -> None:
        super().doStart()
        self.wrappedFactory.doStart()

    def doStop(self) -> None:
        self.wrappedFactory.doStop()
        super().doStop()

    def refused(self, peer: Any, why: str) -> None:
        """A connection closed for its header: counted, and logged unless its peer was logged just now."""
        if self.metrics is not None:
            self.metrics.rejected.labels(reason="proxy_header").inc()
        host = getattr(peer, "host", "") or ""
        if len(self._logged) >= _LOG_PEERS and host not in self._logged:
            self._logged.clear()
        limit = self._logged.setdefault(host, _LogLimit())
        now = self.clock.seconds()
        if limit.quiet(now, self.logInterval):
            limit.unlogged += 1
            return
        more, limit.loggedAt, limit.unlogged = limit.unlogged, now, 0
        fields = {
            "reason": "proxy_header",
            "client": host,
            "port": getattr(peer, "port", None),
            "error": why,
            "more": more or None,
        }
        logEvent(self.log, "rejected", fields)
