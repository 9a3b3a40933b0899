"""
The MX backend: deliver to each recipient domain's mail exchangers.

Lookups use dnspython in a worker thread (C{blocking}), never in the reactor.
MX records are tried by preference, equal preferences in random order, each
host's addresses in turn (IPv4, then IPv6); a refused or timed-out connection
or a greeting other than 220 moves on to the next.  A domain without MX is
its own exchanger (RFC 5321 5.1); a null MX (RFC 7505) and a domain that does
not exist fail permanently; a DNS failure defers.  Answers are cached for
their TTL.

One session per recipient domain carries all its recipients.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dns.exception
import dns.rdatatype
import dns.resolver
from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger
from zope.interface import implementer

from relay.delivery import remote
from relay.envelope import DeliveryResult, Envelope, Recipient, Status, StatusError
from relay.errors import OptionError
from relay.interfaces import IDeliveryBackend
from relay.plugin import choiceOption, portOption
from relay.smtp.client import ClientSettings, SessionError, TLSPolicy
from relay.smtp.tls import TLSError, clientOptions

TLS_MODES = ("opportunistic", "required", "verify")
NULL_MX = Status(556, "5.1.10", "recipient domain accepts no mail (null MX)")
NO_DOMAIN = Status(550, "5.1.2", "recipient domain does not exist")
NO_HOSTS = Status(451, "4.4.4", "no address for any mail exchanger of the recipient domain")


class DestinationError(StatusError):
    """The recipient domain has no usable mail exchanger: null MX, no such domain, DNS failure."""


@dataclass(frozen=True)
class Exchanger:
    preference: int
    host: str


class Resolver:
    """dnspython, called in a worker thread, with a cache honouring TTLs."""

    def __init__(
        self,
        blocking: Callable[..., Any],
        clock: Any,
        nameservers: Sequence[tuple[str, int]] = (),
        timeout: float = 10.0,
    ) -> None:
        self._blocking = blocking
        self._clock = clock
        resolver = dns.resolver.Resolver(configure=not nameservers)
        if nameservers:
            resolver.nameservers = [host for host, _ in nameservers]
            resolver.nameserver_ports = {host: port for host, port in nameservers}
        resolver.lifetime = timeout
        self._resolver = resolver
        self._cache: dict[tuple[str, str], tuple[float, Any]] = {}

    def _query(self, name: str, rdtype: str) -> tuple[float, Any]:
        """Worker thread: (ttl, rrset or None for no data); raises for NXDOMAIN and failures."""
        answer = self._resolver.resolve(name, rdtype, search=False, raise_on_no_answer=False)
        if answer.rrset is not None:
            return float(answer.rrset.ttl), answer.rrset
        # No data: cached as the zone's SOA says (RFC 2308), else five minutes.
        for rrset in answer.response.authority:
            if rrset.rdtype == dns.rdatatype.SOA:
                return float(min(rrset.ttl, rrset[0].minimum)), None
        return 300.0, None

    async def lookup(self, name: str, rdtype: str) -> Any:
        key = (name, rdtype)
        cached = self._cache.get(key)
        now = self._clock.seconds()
        if cached is not None and cached[0] > now:
            return cached[1]
        ttl, rrset = await self._blocking(self._query, name, rdtype)
        self._cache[key] = (now + ttl, rrset)
        return rrset

    async def exchangers(self, domain: str) -> list[Exchanger]:
        """
        @raise DestinationError: null MX, no such domain, or DNS failure.
        """
        try:
            ascii = domain.encode("idna").decode("ascii")
        except UnicodeError:
            raise DestinationError(Status(553, "5.1.2", f"bad recipient domain {domain!r}")) from None
        try:
            rrset = await self.lookup(ascii, "MX")
        except dns.resolver.NXDOMAIN:
            raise DestinationError(NO_DOMAIN) from None
        except (dns.exception.DNSException, OSError) as e:
            raise DestinationError(Status(451, "4.4.3", f"DNS lookup of MX for {ascii} failed: {e}")) from None
        if rrset is None:
            return [Exchanger(0, ascii)]  # implicit MX
        records = [(r.preference, str(r.exchange).rstrip(".")) for r in rrset]
        if len(records) == 1 and records[0][1] == "":
            raise DestinationError(NULL_MX)
        records = [r for r in records if r[1]]
        random.shuffle(records)  # then a stable sort: equal preferences stay shuffled
        records.sort(key=lambda r: r[0])
        return [Exchanger(preference, host) for preference, host in records]

    async def addresses(self, host: str) -> list[str]:
        found: list[str] = []
        for rdtype in ("A", "AAAA"):
            try:
                rrset = await self.lookup(host, rdtype)
            except (dns.exception.DNSException, OSError):
                continue
            if rrset is not None:
                found += [r.address for r in rrset]
        return found


@implementer(IDeliveryBackend)
class MXBackend:
    log = Logger()

    def __init__(
        self,
        reactor: Any,
        helo: str,
        resolver: Resolver,
        port: int = 25,
        tls: str = "opportunistic",
        caFile: Path | None = None,
    ) -> None:
        self.reactor = reactor
        self.helo = helo
        self.resolver = resolver
        self.port = port
        self.tls = tls
        self.caFile = caFile
        self.pool = remote.SessionPool(reactor)
        self._settings: dict[str, ClientSettings] = {}

    def deliver(self, envelope: Envelope, recipients: Sequence[Recipient], openData: Any) -> Any:
        byDomain: dict[str, list[Recipient]] = {}
        for recipient in recipients:
            byDomain.setdefault(recipient.address.rpartition("@")[2].lower(), []).append(recipient)
        attempts = [
            Deferred.fromCoroutine(self._domain(domain, envelope, rcpts, openData))
            for domain, rcpts in byDomain.items()
        ]
        d = gatherResults(attempts, consumeErrors=True)
        d.addCallback(lambda lists: [result for each in lists for result in each])
        return d

    def settingsFor(self, host: str) -> ClientSettings:
        settings = self._settings.get(host)
        if settings is None:
            if self.tls == "verify":
                settings = ClientSettings(
                    self.helo, self.reactor, TLSPolicy.VERIFY, clientOptions(host, True, self.caFile)
                )
            else:
                policy = TLSPolicy.REQUIRED if self.tls == "required" else TLSPolicy.OPPORTUNISTIC
                settings = ClientSettings(self.helo, self.reactor, policy, clientOptions(host, verify=False))
            if len(self._settings) > 10_000:
                self._settings.clear()
            self._settings[host] = settings
        return settings

    async def _domain(
        self, domain: str, envelope: Envelope, recipients: list[Recipient], openData: Any
    ) -> list[DeliveryResult]:
        try:
            exchangers = await self.resolver.exchangers(domain)
        except DestinationError as e:
            return remote.everyone(recipients, e.status)
        message = remote.outgoing(envelope, recipients, openData)
        last = NO_HOSTS
        for exchanger in exchangers:
            for address in await self.resolver.addresses(exchanger.host):
                hop = remote.Hop(exchanger.host, address, self.port)
                try:
                    outcome = await remote.deliverTo(
                        self.reactor, hop, self.settingsFor(exchanger.host), message, pool=self.pool
                    )
                except remote.Unreachable as e:
                    self.log.info("{domain}: {status}; trying the next address", domain=domain, status=str(e.status))
                    last = e.status
                    continue
                except SessionError as e:
                    self.log.info(
                        "{domain} via {host}: {status}", domain=domain, host=exchanger.host, status=str(e.status)
                    )
                    return remote.everyone(recipients, e.status)
                return remote.results(recipients, outcome)
        return remote.everyone(recipients, last)

    def stop(self) -> None:
        self.pool.close()


def _nameservers(text: str) -> list[tuple[str, int]]:
    servers = []
    for word in text.split():
        host, sep, port = word.rpartition(":")
        if not sep:
            host, port = word, "53"
        host = host.strip("[]")
        try:
            servers.append((host, int(port)))
        except ValueError:
            raise OptionError("nameservers", f"bad nameserver {word!r} (host:port)") from None
    return servers


def fromOptions(options: Mapping[str, Any], context: Any) -> MXBackend:
    port = portOption(options)
    tls = choiceOption(options, "tls", TLS_MODES)
    caFile = Path(options["ca_file"]) if options.get("ca_file") else None
    if caFile is not None:
        try:
            clientOptions("check.invalid", True, caFile)
        except TLSError as e:
            raise OptionError(e.key, e.message) from None
    resolver = Resolver(context.blocking, context.reactor, _nameservers(options.get("nameservers", "")))
    return MXBackend(context.reactor, context.hostname, resolver, port, tls, caFile)
