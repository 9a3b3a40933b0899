"""
The MX backend: deliver to each recipient domain's mail exchangers.

Lookups use dnspython in a worker thread (C{blocking}), never in the reactor.
MX records are tried by preference, equal preferences in random order, each
host's addresses in turn (IPv4, then IPv6); a refused or timed-out connection,
a greeting other than 220 or a 4xx to EHLO and HELO moves on to the next.  A
domain without MX is its own exchanger (RFC 5321 5.1); a null MX (RFC 7505)
and a domain that does not exist fail permanently; a DNS failure defers.
Answers are cached for their TTL.

The policy is Postfix's: at most C{max_mx} addresses per attempt
(C{smtp_mx_address_limit}); an exchanger that is this relay itself (one of
its listening addresses, at its port) ends the list together with every
exchanger not preferred to it, and when that leaves none the mail "loops back
to myself" (554 5.4.6), as it does when a server greets us, or answers EHLO,
with our own host name; and one attempt at one domain has a deadline, shorter
than the scheduler's C{delivery_timeout}, so that its reason is the one
recorded.

One session per recipient domain carries all its recipients.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.exception
import dns.flags
import dns.rdatatype
import dns.resolver
from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger
from zope.interface import implementer

from relay.delivery import remote
from relay.envelope import DeliveryResult, Envelope, Recipient, Status, StatusError
from relay.errors import OptionError
from relay.interfaces import IDeliveryBackend
from relay.logs import logEvent
from relay.plugin import choiceOption, portOption
from relay.smtp.client import ClientSettings, LoopError, SessionError, TLSPolicy, TLSPolicyError
from relay.smtp.tls import TLSError, clientOptions

TLS_MODES = ("opportunistic", "required", "verify")
NULL_MX = Status(556, "5.1.10", "recipient domain accepts no mail (null MX)")
NO_DOMAIN = Status(550, "5.1.2", "recipient domain does not exist")
NO_HOSTS = Status(451, "4.4.4", "no address for any mail exchanger of the recipient domain")

MAX_MX = 5  # addresses tried per attempt, as Postfix's smtp_mx_address_limit
MAX_MX_LIMIT = 100
# The deadline of one attempt at one domain, as a share of [queue] delivery_timeout
# (570 s of the default 10 minutes): it fires before the scheduler's, with its reason.
DEADLINE_SHARE = 0.95

_WILDCARDS = ("", "0.0.0.0", "::")


def loopsBack(domain: str) -> Status:
    """Postfix's words and code for mail that would come back to us."""
    return Status(554, "5.4.6", f"mail for {domain} loops back to myself")


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
        dnssec: bool = False,
    ) -> None:
        self._blocking = blocking
        self._clock = clock
        resolver = dns.resolver.Resolver(configure=not nameservers)
        if nameservers:
            resolver.nameservers = [host for host, _ in nameservers]
            resolver.nameserver_ports = {host: port for host, port in nameservers}
        resolver.lifetime = timeout
        if dnssec:
            # Ask for DNSSEC (DO) and for the validating resolver's verdict (AD, RFC 6840 5.7).
            resolver.use_edns(0, dns.flags.DO, 1232)
            resolver.flags = dns.flags.RD | dns.flags.AD
        self.dnssec = dnssec
        self._resolver = resolver
        self._cache: dict[tuple[str, str], tuple[float, Any, bool]] = {}

    def _query(self, name: str, rdtype: str) -> tuple[float, Any, bool]:
        """
        Worker thread: (ttl, rrset or None for no data, authenticated); raises
        for NXDOMAIN and failures.  The AD bit is believed only with
        C{dnssec}: the operator then says the nameservers validate and the
        path to them is trusted, as Postfix's smtp_dns_support_level = dnssec.
        """
        answer = self._resolver.resolve(name, rdtype, search=False, raise_on_no_answer=False)
        authenticated = self.dnssec and bool(answer.response.flags & dns.flags.AD)
        if answer.rrset is not None:
            return float(answer.rrset.ttl), answer.rrset, authenticated
        # No data: cached as the zone's SOA says (RFC 2308), else five minutes.
        for rrset in answer.response.authority:
            if rrset.rdtype == dns.rdatatype.SOA:
                return float(min(rrset.ttl, rrset[0].minimum)), None, authenticated
        return 300.0, None, authenticated

    async def lookupSecure(self, name: str, rdtype: str) -> tuple[Any, bool]:
        """
        The rrset (C{None}: no data) and whether the answer was authenticated
        (the AD bit, trusted only with C{dnssec}), cached for the TTL.
        """
        key = (name, rdtype)
        cached = self._cache.get(key)
        now = self._clock.seconds()
        if cached is not None and cached[0] > now:
            return cached[1], cached[2]
        ttl, rrset, authenticated = await self._blocking(self._query, name, rdtype)
        self._cache[key] = (now + ttl, rrset, authenticated)
        return rrset, authenticated

    async def lookup(self, name: str, rdtype: str) -> Any:
        return (await self.lookupSecure(name, rdtype))[0]

    def authenticated(self, name: str, rdtype: str) -> bool:
        """Whether the cached answer for C{name} (as given to C{exchangers}, or a host) was authenticated."""
        try:
            ascii = name.encode("idna").decode("ascii")
        except UnicodeError:
            return False
        cached = self._cache.get((ascii, rdtype))
        return cached is not None and cached[2]

    async def txt(self, name: str) -> list[str]:
        """
        The TXT records at C{name}, each one string (its character-strings
        joined, RFC 7208 3.3 style); C{[]} for no such name or no data.

        @raise dns.exception.DNSException: the lookup failed.
        """
        try:
            rrset = await self.lookup(name, "TXT")
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        if rrset is None:
            return []
        return [b"".join(r.strings).decode("utf-8", "replace") for r in rrset]

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


def hostAddresses() -> frozenset[str]:
    """
    This host's own IP addresses, read from C{/proc} (Linux): the IPv4 ones
    the kernel marks LOCAL in C{fib_trie}, the IPv6 ones in C{if_inet6}.
    Empty elsewhere: loopback addresses are recognised without it.
    """
    found: set[str] = set()
    try:
        leaf = None
        for line in Path("/proc/net/fib_trie").read_text().splitlines():
            text = line.strip()
            if text.startswith("|--"):
                leaf = text[3:].strip()
            elif text.startswith("/32 host LOCAL") and leaf is not None:
                found.add(leaf)
    except OSError:
        pass
    try:
        for line in Path("/proc/net/if_inet6").read_text().splitlines():
            found.add(str(ipaddress.IPv6Address(bytes.fromhex(line.split()[0]))))
    except (OSError, ValueError, IndexError):
        pass
    return frozenset(found)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(text.strip("[]").partition("%")[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class Myself:
    """
    Which addresses and ports reach this relay's own listeners.

    A listener on one interface is reached at that address alone; one on
    every interface (C{""}, C{0.0.0.0}, C{::}) at any loopback address and any
    address of this host (as C{localAddresses} finds them, once).  The
    unspecified address (0.0.0.0, ::) reaches the local host too.
    """

    def __init__(
        self,
        listening: Iterable[tuple[str, int]],
        localAddresses: Callable[[], frozenset[str]] = hostAddresses,
    ) -> None:
        self._exact: set[tuple[str, int]] = set()
        self._everywhere: set[int] = set()
        self._ports: set[int] = set()
        for interface, port in listening:
            self._ports.add(port)
            if interface in _WILDCARDS:
                self._everywhere.add(port)
            else:
                ip = _ip(interface)
                self._exact.add((str(ip) if ip is not None else interface.lower(), port))
        self._local = frozenset(str(_ip(a)) for a in localAddresses()) if self._everywhere else frozenset()

    def __contains__(self, hop: tuple[str, int]) -> bool:
        address, port = hop
        if port not in self._ports:
            return False
        ip = _ip(address)
        if ip is None:
            return False
        if ip.is_unspecified or (str(ip), port) in self._exact:
            return True
        return port in self._everywhere and (ip.is_loopback or str(ip) in self._local)


@dataclass
class _Progress:
    """Where one attempt is, for the reason given when its deadline passes."""

    step: str = "looking up the mail exchangers"
    tried: int = 0
    planned: int = 0
    last: Status | None = None


# RFC 8460 result types this backend reports (dane.py has the DANE ones).
STARTTLS_NOT_SUPPORTED = "starttls-not-supported"
CERTIFICATE_HOST_MISMATCH = "certificate-host-mismatch"
CERTIFICATE_EXPIRED = "certificate-expired"
CERTIFICATE_NOT_TRUSTED = "certificate-not-trusted"
VALIDATION_FAILURE = "validation-failure"
STS_POLICY_FETCH_ERROR = "sts-policy-fetch-error"
STS_POLICY_INVALID = "sts-policy-invalid"


def tlsFailure(error: SessionError) -> str | None:
    """
    The RFC 8460 result type of a session that failed for want of TLS or of
    a valid certificate; C{None} when it failed for another reason.
    """
    result = getattr(error, "result", None)
    if result is not None:
        return result
    if error.status.enhanced == "4.7.4":
        return STARTTLS_NOT_SUPPORTED
    if not error.tlsFailed:
        return None
    text = error.status.text.lower()
    if "expired" in text or "not yet valid" in text:
        return CERTIFICATE_EXPIRED
    if "hostname" in text or "mismatch" in text or "verificationerror" in text or "doesn't match" in text:
        return CERTIFICATE_HOST_MISMATCH
    if "certificate verify failed" in text or "self-signed" in text or "unable to get" in text:
        return CERTIFICATE_NOT_TRUSTED
    return VALIDATION_FAILURE


@dataclass
class _Plan:
    """
    The TLS policy of one domain's attempt: C{"mta-sts"} (enforce or
    testing, with C{policy}) or C{""} for none; C{fetchError} when a policy
    could not be fetched (TLS-RPT counts it).
    """

    kind: str = ""
    policy: Any = None
    fetchError: str | None = None
    fetchInvalid: bool = False
    dane: dict[str, Any] = field(default_factory=dict)  # MX host -> dane.HostPolicy, when kind is "dane"

    @property
    def enforce(self) -> bool:
        return self.kind == "mta-sts" and self.policy.mode == "enforce"

    @property
    def testing(self) -> bool:
        return self.kind == "mta-sts" and self.policy.mode == "testing"


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
        maxMX: int = MAX_MX,
        myself: Myself | None = None,
        deadline: float = DEADLINE_SHARE * 600.0,
        sts: Any = None,
        reports: Any = None,
        dane: bool = False,
    ) -> None:
        """
        @param sts: an L{relay.delivery.mtasts.STS} to honour MTA-STS
            policies, or C{None}.
        @param reports: a L{relay.delivery.tlsrpt.TLSReports} counting
            sessions for TLS reporting, or C{None}.
        @param dane: honour DANE TLSA records (RFC 7672) when the resolver's
            answers are authenticated (its C{dnssec}).
        """
        self.reactor = reactor
        self.helo = helo
        self.resolver = resolver
        self.port = port
        self.tls = tls
        self.caFile = caFile
        self.maxMX = maxMX
        self.myself = myself if myself is not None else Myself(())
        self.deadline = deadline
        self.sts = sts
        self.reports = reports
        self.dane = dane
        self.pool = remote.SessionPool(reactor)
        self._settings: dict[tuple[str, bool], ClientSettings] = {}

    def deliver(self, envelope: Envelope, recipients: Sequence[Recipient], openData: Any) -> Any:
        byDomain: dict[str, list[Recipient]] = {}
        for recipient in recipients:
            byDomain.setdefault(recipient.address.rpartition("@")[2].lower(), []).append(recipient)
        attempts = [self._attempt(domain, envelope, rcpts, openData) for domain, rcpts in byDomain.items()]
        d = gatherResults(attempts, consumeErrors=True)
        d.addCallback(lambda lists: [result for each in lists for result in each])
        return d

    def _attempt(
        self, domain: str, envelope: Envelope, recipients: list[Recipient], openData: Any
    ) -> Deferred[list[DeliveryResult]]:
        """
        One domain's attempt, cancelled at the deadline: whatever it was doing
        (a DNS lookup, a connection, a session) stops, and its recipients are
        deferred with what was going on.
        """
        progress = _Progress()
        d = Deferred.fromCoroutine(self._domain(domain, envelope, recipients, openData, progress))

        def expired(result: Any, timeout: float) -> list[DeliveryResult]:
            lookup = progress.tried == 0 and progress.planned == 0
            text = (
                f"delivery to {domain} took longer than {timeout:g} s, while {progress.step}"
                f" (address {progress.tried} of {progress.planned} tried)"
            )
            if progress.last is not None:
                text += f"; before: {progress.last.text}"
            status = Status(451, "4.4.3" if lookup else "4.4.2", text)
            self.log.info("{domain}: {status}", domain=domain, status=str(status))
            return remote.everyone(recipients, status)

        d.addTimeout(self.deadline, self.reactor, onTimeoutCancel=expired)
        return d

    def settingsFor(self, host: str, verify: bool = False) -> ClientSettings:
        """
        The client settings for mail exchanger C{host}: as the C{tls} key
        says, or with C{verify} (an MTA-STS policy) STARTTLS with a
        certificate valid for C{host}.
        """
        settings = self._settings.get((host, verify))
        if settings is None:
            if verify or self.tls == "verify":
                settings = ClientSettings(
                    self.helo, self.reactor, TLSPolicy.VERIFY, clientOptions(host, True, self.caFile)
                )
            else:
                policy = TLSPolicy.REQUIRED if self.tls == "required" else TLSPolicy.OPPORTUNISTIC
                settings = ClientSettings(self.helo, self.reactor, policy, clientOptions(host, verify=False))
            if len(self._settings) > 10_000:
                self._settings.clear()
            self._settings[(host, verify)] = settings
        return settings

    async def hops(self, domain: str, exchangers: Sequence[Exchanger]) -> list[tuple[Exchanger, str]]:
        """
        The addresses to try, in order, at most C{maxMX} of them.

        An exchanger with an address that is this relay (L{Myself}, at the mx
        port) is dropped with every exchanger not preferred to it (Postfix's
        C{smtp_truncate_self}): a backup MX hands the mail to a better one.
        Exchangers past the limit are not looked up, except those as preferred
        as the last one kept, which may be us.

        @raise DestinationError: 5.4.6 when we are among the best exchangers.
        """
        found: list[tuple[Exchanger, str]] = []
        for exchanger in exchangers:
            if len(found) >= self.maxMX and exchanger.preference > found[-1][0].preference:
                break
            addresses = await self.resolver.addresses(exchanger.host)
            ours = [address for address in addresses if (address, self.port) in self.myself]
            if ours:
                kept = [hop for hop in found if hop[0].preference < exchanger.preference]
                self.log.info(
                    "{domain}: MX {host} (preference {preference}) is this relay ({address} port {port});"
                    " {kept} address(es) of better mail exchangers kept",
                    domain=domain,
                    host=exchanger.host,
                    preference=exchanger.preference,
                    address=ours[0],
                    port=self.port,
                    kept=len(kept),
                )
                if not kept:
                    raise DestinationError(loopsBack(domain))
                found = kept
                break
            found += [(exchanger, address) for address in addresses]
        return found[: self.maxMX]

    async def _danePlan(self, domain: str, exchangers: Sequence[Exchanger]) -> _Plan | None:
        """
        DANE's policy for the first C{maxMX} exchangers, when the MX answer
        (and each host's addresses) were authenticated: a plan of kind
        C{"dane"} if any host has usable or failed TLSA lookups, else
        C{None} and MTA-STS or opportunistic TLS decide (RFC 7672 2.2).
        """
        from relay.delivery import dane

        if not self.dane or not self.resolver.authenticated(domain, "MX"):
            return None
        hosts: dict[str, Any] = {}
        for exchanger in exchangers[: self.maxMX]:
            await self.resolver.addresses(exchanger.host)  # cached: hops() asks again for nothing
            secure = self.resolver.authenticated(exchanger.host, "A") or self.resolver.authenticated(
                exchanger.host, "AAAA"
            )
            hosts[exchanger.host] = await dane.lookup(self.resolver.lookupSecure, exchanger.host, self.port, secure)
        if all(policy.mode is dane.Mode.NONE for policy in hosts.values()):
            return None
        return _Plan(kind="dane", dane=hosts)

    def _daneSettings(self, host: str, policy: Any) -> ClientSettings:
        """STARTTLS required, the peer checked against the TLSA records before anything of the mail is sent."""
        from relay.delivery import dane

        def check(client: Any) -> bool:
            verdict = dane.checkTransport(policy, client.transport, self.reactor.seconds())
            if not verdict.ok:
                raise TLSPolicyError(verdict.status(), verdict.result or VALIDATION_FAILURE)
            return verdict.verified

        return ClientSettings(
            self.helo, self.reactor, TLSPolicy.REQUIRED, clientOptions(host, verify=False), checkPeer=check
        )

    async def _plan(self, domain: str, exchangers: Sequence[Exchanger] = ()) -> _Plan:
        """
        The TLS policy of C{domain} (an A-label name): DANE when it applies
        (it wins over MTA-STS, RFC 8461 2), else MTA-STS when the backend
        honours it.
        """
        danePlan = await self._danePlan(domain, exchangers)
        if danePlan is not None:
            return danePlan
        if self.sts is None:
            return _Plan()
        found = await self.sts.policyFor(domain)
        plan = _Plan(fetchError=found.fetchError, fetchInvalid=found.invalid)
        if found.policy is not None and found.policy.mode in ("enforce", "testing"):
            plan.kind, plan.policy = "mta-sts", found.policy
        if plan.fetchError is not None and self.reports is not None:
            result = STS_POLICY_INVALID if plan.fetchInvalid else STS_POLICY_FETCH_ERROR
            self.reports.failure(domain, self._policyRef(plan), result, detail=plan.fetchError)
        return plan

    def _policyRef(self, plan: _Plan, host: str | None = None) -> Any:
        from relay.delivery.tlsrpt import PolicyRef

        if plan.kind == "dane" and host in plan.dane:
            return PolicyRef("tlsa", tuple(plan.dane[host].policyStrings()))
        if plan.kind == "mta-sts":
            return PolicyRef("sts", tuple(plan.policy.lines()), tuple(plan.policy.mx))
        return PolicyRef("no-policy-found")

    def _logTLS(
        self, domain: str, host: str, plan: _Plan, outcome: Any = None, failure: str | None = None, peer: Any = None
    ) -> None:
        """One line per session that ended a domain's attempt: which TLS policy applied, and what TLS it got."""
        tls = outcome is not None and outcome.tls
        verified = outcome is not None and outcome.verified
        if plan.kind:
            policy = plan.kind
        else:
            policy = "opportunistic" if tls else "none"
        fields = {
            "domain": domain,
            "mx": host,
            "relay": peer if peer is not None else getattr(outcome, "peer", None),
            "tls_policy": policy,
            "sts_mode": plan.policy.mode if plan.kind == "mta-sts" else None,
            "tls": tls,
            "tls_verified": verified,
            "tls_failure": failure,
        }
        logEvent(self.log, "tls", fields)

    async def _domain(
        self, domain: str, envelope: Envelope, recipients: list[Recipient], openData: Any, progress: _Progress
    ) -> list[DeliveryResult]:
        try:
            exchangers = await self.resolver.exchangers(domain)
            ascii = domain.encode("idna").decode("ascii")  # exchangers() has checked it encodes
            progress.step = "looking up the TLS policy (DANE, MTA-STS)"
            plan = await self._plan(ascii, exchangers)
            if plan.enforce:
                allowed = [e for e in exchangers if plan.policy.allows(e.host)]
                for each in exchangers:
                    if each not in allowed:
                        self.log.info(
                            "{domain}: MX {host} is not in the MTA-STS policy {id}; skipped",
                            domain=domain,
                            host=each.host,
                            id=plan.policy.id,
                        )
                if not allowed:
                    if self.reports is not None:
                        self.reports.failure(ascii, self._policyRef(plan), VALIDATION_FAILURE, detail="no MX matches")
                    text = f"no mail exchanger of {domain} matches its MTA-STS policy"
                    return remote.everyone(recipients, Status(451, "4.7.5", text))
                exchangers = allowed
            progress.step = "looking up the addresses of its mail exchangers"
            hops = await self.hops(domain, exchangers)
        except DestinationError as e:
            return remote.everyone(recipients, e.status)
        progress.planned = len(hops)
        message = remote.outgoing(envelope, recipients, openData)
        last = NO_HOSTS
        for exchanger, address in hops:
            hop = remote.Hop(exchanger.host, address, self.port)
            progress.tried += 1
            progress.step = f"delivering to {exchanger.host}[{address}]:{self.port}"
            hostPlan = plan
            required = plan.enforce
            verify = plan.enforce or plan.testing
            if plan.kind == "dane":
                policy = plan.dane.get(exchanger.host)
                if policy is None or policy.mode.value == "none":
                    hostPlan, required, verify = _Plan(), False, False  # this host: opportunistic
                elif policy.mode.value == "failed":
                    self._report(ascii, plan, exchanger.host, address, policy.result or "dnssec-invalid", policy.detail)
                    self._logTLS(domain, exchanger.host, plan, failure=policy.result)
                    last = progress.last = policy.status()
                    continue
                else:
                    required = verify = True
            if plan.testing and not plan.policy.allows(exchanger.host):
                verify = False
                self._report(ascii, plan, exchanger.host, address, VALIDATION_FAILURE, "MX not in the policy")
            if hostPlan.kind == "dane":
                settings = self._daneSettings(exchanger.host, plan.dane[exchanger.host])
            else:
                settings = self.settingsFor(exchanger.host, verify)
            try:
                try:
                    outcome = await remote.deliverTo(self.reactor, hop, settings, message, pool=self.pool)
                except SessionError as e:
                    failure = tlsFailure(e) if verify else None
                    if failure is None:
                        raise
                    self._report(ascii, plan, exchanger.host, address, failure, e.status.text)
                    self._logTLS(domain, exchanger.host, hostPlan, failure=failure, peer=remote.failedAt(e))
                    if required:
                        # Never in clear, never to an impostor: the next MX may do better (RFC 8461 5, RFC 7672 2.2).
                        what = "DANE" if hostPlan.kind == "dane" else "MTA-STS"
                        text = e.status.text
                        if not text.startswith("DANE"):
                            text = f"{exchanger.host}: {text}"
                        status = Status(451, "4.7.5", f"{what} policy of {domain}: {text}")
                        self.log.info("{domain}: {status}", domain=domain, status=str(status))
                        last = progress.last = status
                        continue
                    # testing: reported; delivered as without a policy.
                    outcome = await remote.deliverTo(
                        self.reactor, hop, self.settingsFor(exchanger.host), message, pool=self.pool
                    )
            except remote.Unreachable as e:
                self.log.info("{domain}: {status}; trying the next address", domain=domain, status=str(e.status))
                last = progress.last = e.status
                continue
            except LoopError as e:
                self.log.warn(
                    "{domain}: {host}[{address}] is this relay ({why})",
                    domain=domain,
                    host=exchanger.host,
                    address=address,
                    why=e.status.text,
                )
                return remote.everyone(recipients, loopsBack(domain))
            except SessionError as e:
                self.log.info("{domain} via {host}: {status}", domain=domain, host=exchanger.host, status=str(e.status))
                return remote.everyone(recipients, e.status, remote.failedAt(e))
            if verify and (outcome.verified or hostPlan.kind == "dane"):
                self._report(ascii, plan, exchanger.host, address, None)
            self._logTLS(domain, exchanger.host, hostPlan, outcome)
            return remote.results(recipients, outcome)
        return remote.everyone(recipients, last)

    def _report(self, domain: str, plan: _Plan, host: str, address: str, result: str | None, detail: str = "") -> None:
        """One session for TLS reporting: a success (C{result} None) or a failure of that RFC 8460 type."""
        if self.reports is None or not plan.kind:
            return
        if result is None:
            self.reports.success(domain, self._policyRef(plan, host))
        else:
            self.reports.failure(domain, self._policyRef(plan, host), result, host, address, detail)

    def stop(self) -> None:
        self.pool.close()
        if self.reports is not None:
            self.reports.stop()


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


def _maxMX(options: Mapping[str, Any]) -> int:
    text = options.get("max_mx", str(MAX_MX))
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 0 < value <= MAX_MX_LIMIT:
        raise OptionError("max_mx", f"bad value {text!r} (a number of addresses, 1 to {MAX_MX_LIMIT})")
    return value


def fromOptions(options: Mapping[str, Any], context: Any) -> MXBackend:
    port = portOption(options)
    maxMX = _maxMX(options)
    tls = choiceOption(options, "tls", TLS_MODES)
    caFile = Path(options["ca_file"]) if options.get("ca_file") else None
    if caFile is not None:
        try:
            clientOptions("check.invalid", True, caFile)
        except TLSError as e:
            raise OptionError(e.key, e.message) from None
    mtaSTS = choiceOption(options, "mta_sts", ("yes", "no")) == "yes"
    tlsReports = choiceOption(options, "tls_reports", ("no", "yes")) == "yes"
    stsPort = portOption(options, "mta_sts_port", 443) if "mta_sts_port" in options else None
    dnssec = choiceOption(options, "dnssec", ("no", "yes")) == "yes"
    useDANE = choiceOption(options, "dane", ("no", "yes")) == "yes"
    if useDANE and not dnssec:
        raise OptionError("dane", "needs dnssec = yes (and nameservers that validate DNSSEC)")
    # Lookups in the DNS pool when the context has one (a context built by hand may not).
    dns = getattr(context, "dns", None) or context.blocking
    resolver = Resolver(dns, context.reactor, _nameservers(options.get("nameservers", "")), dnssec=dnssec)
    listening = getattr(context, "listening", ())
    deadline = DEADLINE_SHARE * getattr(context, "delivery_timeout", 600.0)
    myself = Myself(listening)
    stateDir = Path(getattr(context, "state_dir", "."))
    section = getattr(context, "section", "") or "mx"
    sts = None
    if mtaSTS:
        from relay.delivery import mtasts

        fetcher = mtasts.Fetcher(
            context.reactor, lambda host: clientOptions(host, True, caFile), resolver.addresses, stsPort
        )
        cache = mtasts.PolicyCache(stateDir / "mta-sts" / _safe(section))
        sts = mtasts.STS(context.reactor, resolver.txt, fetcher, cache, context.blocking)
    reports = None
    if tlsReports:
        from relay.delivery import tlsrpt

        reports = tlsrpt.TLSReports(
            context.reactor,
            stateDir / "tls-reports" / _safe(section),
            organization=context.hostname,
            contact=getattr(context, "postmaster", f"postmaster@{context.hostname}"),
            txt=resolver.txt,
            submit=getattr(context, "submit", None),
            post=tlsrpt.Poster(context.reactor, lambda host: clientOptions(host, True, caFile), resolver.addresses),
            blocking=context.blocking,
        )
        reports.start()
    return MXBackend(
        context.reactor, context.hostname, resolver, port, tls, caFile, maxMX, myself, deadline, sts, reports, useDANE
    )


def _safe(section: str) -> str:
    """A section name as one directory name: C{delivery:internet} becomes C{delivery_internet}."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in section) or "mx"
