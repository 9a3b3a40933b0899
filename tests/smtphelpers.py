"""Shared test scaffolding: a server session over StringTransport with a Clock."""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from relay.envelope import Envelope
from relay.policy import Policy
from relay.queue.memory import MemoryQueueStore
from relay.smtp.server import ServerSettings, SMTPServer, SMTPServerFactory


class TLSRecordingTransport(StringTransport):
    """A StringTransport that records STARTTLS instead of doing it (real TLS is tested against twistd)."""

    tlsStarted: Any = None

    def startTLS(self, options: Any) -> None:
        self.tlsStarted = options


class Session:
    """One server protocol with everything it talks to, all in memory."""

    def __init__(
        self,
        client: str = "192.0.2.10",
        localDomains: frozenset[str] = frozenset({"localhost", "example.test"}),
        relayNetworks: tuple[str, ...] = ("127.0.0.0/8",),
        routes: dict[str, str] | None = None,
        validators: list[tuple[str, Any]] | None = None,
        maxMessageSize: int = 10_000,
        maxRecipients: int = 5,
        router: Any = None,
        **overrides: Any,
    ) -> None:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.store = MemoryQueueStore()
        self.accepted: list[Envelope] = []
        routes = routes if routes is not None else {"localhost": "local", "example.test": "local"}
        self.policy = Policy(
            localDomains,
            [ipaddress.ip_network(n) for n in relayNetworks],
            lambda domain: routes.get(domain, routes.get("*")),
            validators or [],
            self.clock,
            router=router,
        )
        self.settings = ServerSettings(
            hostname="mx.example.test",
            postmaster="postmaster@example.test",
            maxMessageSize=maxMessageSize,
            maxRecipients=maxRecipients,
            policy=self.policy,
            store=self.store,
            onAccepted=self.accepted.append,
            clock=self.clock,
            **overrides,
        )
        self.factory = SMTPServerFactory(self.settings)
        self.transport, self.server = self.connect(client)

    def connect(self, client: str) -> tuple[TLSRecordingTransport, SMTPServer]:
        transport = TLSRecordingTransport(peerAddress=IPv4Address("TCP", client, 40000))
        server: SMTPServer = self.factory.buildProtocol(None)
        server.makeConnection(transport)
        return transport, server

    def take(self) -> bytes:
        out = self.transport.value()
        self.transport.clear()
        return out

    def send(self, data: bytes) -> bytes:
        """Feed bytes, return every reply they caused."""
        self.server.dataReceived(data)
        return self.take()

    def codes(self, data: bytes) -> list[str]:
        """Feed bytes; the final reply line of each reply as 'CODE ENH'."""
        return [
            b" ".join(line.split(b" ")[:2]).decode()
            for line in self.send(data).split(b"\r\n")
            if line and line[3:4] == b" "
        ]

    def ready(self, client: bytes = b"EHLO client.example.test\r\n") -> None:
        self.take()
        self.send(client)
