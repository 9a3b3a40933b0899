"""
MTA-STS (RFC 8461): which mail exchangers of a domain may take its mail, and
that they must do so over TLS with a certificate valid for their name.

A domain announces a policy with a TXT record at C{_mta-sts.DOMAIN}
(C{v=STSv1; id=...}) and serves it at
C{https://mta-sts.DOMAIN/.well-known/mta-sts.txt}.  The policy is fetched
over HTTPS with a certificate verified against the system trust store or the
backend's C{ca_file}; redirects are refused (RFC 8461 3.3), the body is
bounded (64 KB) and so is the time (60 s, 3.3 again).

A fetched policy is kept, under C{state_dir}, for its C{max_age}: across
restarts, because the point of the policy is to survive an attacker who
strips the TXT record or blocks the HTTPS fetch later (RFC 8461 5.1).  A
new TXT C{id} makes us fetch again; a failed fetch keeps the cached policy,
or, with none cached, no policy applies (and TLS-RPT counts
C{sts-policy-fetch-error}).

The parsers are pure functions, fuzzed in C{tests/test_mtasts.py}.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from relay.fsutil import replaceFile

log = Logger()

POLICY_PATH = "/.well-known/mta-sts.txt"
MAX_BODY = 64 * 1024  # RFC 8461 3.3: "a reasonable maximum", Postfix's mta-sts-resolver uses 64 KB
FETCH_TIMEOUT = 60.0  # RFC 8461 3.3: "SHOULD use a timeout of at most 60 seconds"
MAX_AGE_LIMIT = 31_557_600  # RFC 8461 3.2: at most a year
MODES = ("enforce", "testing", "none")
RETRY_FETCH = 300.0  # after a failed fetch, the same record id is not fetched again for this long
_ID = re.compile(r"[A-Za-z0-9]{1,32}")
_FIELD = re.compile(r"[A-Za-z0-9_.-]+")


class PolicyError(ValueError):
    """A TXT record or a policy that does not follow RFC 8461: it is as if there were none."""


# -- parsing ---------------------------------------------------------------


def parseRecord(text: str) -> str:
    """
    The C{id} of an C{_mta-sts} TXT record (RFC 8461 3.1):
    C{v=STSv1; id=ID} with optional other fields, C{v} first.

    @raise PolicyError: not an STSv1 record, or a bad or missing id.
    """
    fields: dict[str, str] = {}
    order: list[str] = []
    for part in text.split(";"):
        part = part.strip(" \t")
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep or not _FIELD.fullmatch(key):
            raise PolicyError(f"bad field {part[:40]!r} in the _mta-sts record")
        order.append(key)
        fields.setdefault(key, value)
    if not order or order[0] != "v" or fields["v"] != "STSv1":
        raise PolicyError("the _mta-sts record does not start with v=STSv1")
    ident = fields.get("id")
    if ident is None or not _ID.fullmatch(ident):
        raise PolicyError("the _mta-sts record has no valid id (1 to 32 letters and digits)")
    return ident


@dataclass(frozen=True)
class Policy:
    """
    One domain's policy as served, with the C{id} of the TXT record that led
    to it and when it was fetched (seconds since the epoch).
    """

    mode: str
    mx: tuple[str, ...]
    maxAge: int
    id: str = ""
    fetched: float = 0.0
    text: str = field(default="", compare=False)  # as served, for TLS-RPT's policy-string

    def expired(self, now: float) -> bool:
        return now >= self.fetched + self.maxAge

    def allows(self, host: str) -> bool:
        """
        Whether mail exchanger C{host} is one the policy names (RFC 8461 4.1):
        an exact name, or C{*.example.com} for one more label on the left.
        """
        name = host.rstrip(".").lower()
        for pattern in self.mx:
            if pattern.startswith("*."):
                label, dot, rest = name.partition(".")
                if dot and label and rest == pattern[2:]:
                    return True
            elif name == pattern:
                return True
        return False

    def lines(self) -> list[str]:
        """The policy's lines, as TLS-RPT's C{policy-string} wants them (RFC 8460 4.4)."""
        return [line.rstrip("\r") for line in self.text.split("\n") if line.strip()]


def parsePolicy(text: str, ident: str = "", fetched: float = 0.0) -> Policy:
    """
    A policy file (RFC 8461 3.2): C{key: value} lines, C{version: STSv1},
    C{mode}, C{max_age} and, unless the mode is C{none}, one or more C{mx}.
    Unknown keys are ignored, as the RFC asks.

    @raise PolicyError: a missing or bad field.
    """
    version = mode = maxAge = None
    mx: list[str] = []
    for line in text.split("\n"):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        key, sep, value = line.partition(":")
        key, value = key.strip(), value.strip(" \t")
        if not sep or not _FIELD.fullmatch(key):
            raise PolicyError(f"bad policy line {line[:60]!r}")
        if key == "version" and version is None:
            version = value
        elif key == "mode" and mode is None:
            mode = value
        elif key == "max_age" and maxAge is None:
            if not value.isascii() or not value.isdigit() or len(value) > 10:
                raise PolicyError(f"bad max_age {value[:20]!r}")
            maxAge = min(int(value), MAX_AGE_LIMIT)
        elif key == "mx":
            pattern = value.rstrip(".").lower()
            if not _validPattern(pattern):
                raise PolicyError(f"bad mx {value[:60]!r}")
            mx.append(pattern)
    if version != "STSv1":
        raise PolicyError("the policy has no version: STSv1")
    if mode not in MODES:
        raise PolicyError(f"bad mode {str(mode)[:20]!r} (enforce, testing or none)")
    if maxAge is None:
        raise PolicyError("the policy has no max_age")
    if mode != "none" and not mx:
        raise PolicyError(f"a {mode} policy needs at least one mx")
    return Policy(mode, tuple(mx), maxAge, ident, fetched, text)


_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")


def _validPattern(pattern: str) -> bool:
    if pattern.startswith("*."):
        pattern = pattern[2:]
    labels = pattern.split(".")
    return 0 < len(pattern) <= 253 and all(_LABEL.fullmatch(label) for label in labels)


# -- cache -------------------------------------------------------------------


class PolicyCache:
    """
    Policies by domain, in memory and in one JSON file per domain under
    C{directory}, written atomically (temporary file, fsync, rename, fsync of
    the directory) so that a crash leaves the old policy or the new one.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._policies: dict[str, Policy] = {}
        self._loaded = False

    def _path(self, domain: str) -> Path:
        return self.directory / f"{domain}.json"

    def get(self, domain: str) -> Policy | None:
        policy = self._policies.get(domain)
        if policy is None and domain not in self._policies:
            policy = self._read(domain)
            self._policies[domain] = policy  # type: ignore[assignment]
        return policy

    def _read(self, domain: str) -> Policy | None:
        try:
            data = json.loads(self._path(domain).read_text(encoding="utf-8"))
            return parsePolicy(data["text"], data["id"], float(data["fetched"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warn("ignoring the cached MTA-STS policy of {domain}: {error}", domain=domain, error=str(e))
            return None

    def put(self, domain: str, policy: Policy) -> None:
        """Blocking (file system): call it in a worker thread."""
        data = {"id": policy.id, "fetched": policy.fetched, "text": policy.text}
        replaceFile(self._path(domain), json.dumps(data).encode())

    def remember(self, domain: str, policy: Policy) -> None:
        self._policies[domain] = policy


# -- fetching ----------------------------------------------------------------


class FetchError(Exception):
    """The policy could not be fetched (TLS-RPT: sts-policy-fetch-error) or is invalid (sts-policy-invalid)."""

    def __init__(self, text: str, invalid: bool = False) -> None:
        super().__init__(text)
        self.invalid = invalid


class _Body(Protocol):
    """Reads a response body up to C{limit} octets; more is an error, and the connection is dropped."""

    def __init__(self, limit: int, done: Deferred[bytes]) -> None:
        self.limit = limit
        self.done = done
        self.parts: list[bytes] = []
        self.size = 0

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self.size += len(data)
        if self.size > self.limit:
            self.transport.stopProducing()
            self.done.errback(FetchError(f"the policy is larger than {self.limit} octets"))
            return
        self.parts.append(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self.done.called:
            return
        if reason is None or reason.check(ResponseDone):
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(FetchError(f"the policy's body was cut short: {reason.getErrorMessage()}"))


def readBody(response: Any, limit: int) -> Deferred[bytes]:
    """The body of a twisted.web response, at most C{limit} octets."""
    done: Deferred[bytes] = Deferred()
    body = _Body(limit, done)
    response.deliverBody(body)

    def cancelled(failure: Failure) -> Failure:
        if body.transport is not None:
            body.transport.stopProducing()
        return failure

    done.addErrback(cancelled)
    return done


@implementer(IAgentEndpointFactory)
class PinnedEndpoints:
    """
    The endpoints Agent connects through: TLS to the URI's host name
    (certificate checked for that name by C{tlsFor}), the TCP connection to
    an address C{addressOf} gives (our own resolver, the one the mx backend
    asks) and C{port}: with a test's DNS server and port, the whole fetch
    stays on 127.0.0.1.
    """

    def __init__(self, reactor: Any, tlsFor: Callable[[str], Any], address: str, port: int | None) -> None:
        self.reactor = reactor
        self.tlsFor = tlsFor
        self.address = address
        self.port = port

    def endpointForURI(self, uri: Any) -> Any:
        host = uri.host.decode("ascii")
        port = self.port or uri.port
        address = self.address or host
        if ":" in address:
            tcp = TCP6ClientEndpoint(self.reactor, address, port, timeout=FETCH_TIMEOUT)
        elif address.replace(".", "").isdigit():
            tcp = TCP4ClientEndpoint(self.reactor, address, port, timeout=FETCH_TIMEOUT)
        else:
            tcp = HostnameEndpoint(self.reactor, address.encode("idna"), port, timeout=FETCH_TIMEOUT)
        return wrapClientTLS(self.tlsFor(host), tcp)


class Fetcher:
    """
    One HTTPS GET per policy, with twisted.web's Agent (no redirects: Agent
    follows none unless wrapped).  C{tlsFor(host)} is the client TLS
    creator, verifying; C{addresses(host)} resolves the policy host through
    the backend's resolver; C{port} replaces 443, for tests.
    """

    def __init__(
        self,
        reactor: Any,
        tlsFor: Callable[[str], Any],
        addresses: Callable[[str], Awaitable[list[str]]],
        port: int | None = None,
        timeout: float = FETCH_TIMEOUT,
        limit: int = MAX_BODY,
    ) -> None:
        self.reactor = reactor
        self.tlsFor = tlsFor
        self.addresses = addresses
        self.port = port
        self.timeout = timeout
        self.limit = limit

    async def fetch(self, domain: str) -> str:
        """
        The text of C{domain}'s policy.

        @raise FetchError: no address, no connection, a bad certificate, a
            status other than 200 (a redirect included), a content type
            other than text/plain, a body too large, too slow.
        """
        host = f"mta-sts.{domain}"
        addresses = await self.addresses(host)
        if not addresses:
            raise FetchError(f"{host} has no address")
        agent = Agent.usingEndpointFactory(
            self.reactor, PinnedEndpoints(self.reactor, self.tlsFor, addresses[0], self.port)
        )
        url = f"https://{host}{POLICY_PATH}".encode("ascii")
        d = agent.request(b"GET", url, Headers({b"User-Agent": [b"relay MTA-STS"]}))

        async def get() -> str:
            response = await d
            if response.code != 200:
                response.deliverBody(Protocol())
                where = response.headers.getRawHeaders(b"location", [b""])[0].decode("latin-1")[:80]
                raise FetchError(f"{url.decode()} answered {response.code}" + (f" (to {where})" if where else ""))
            kind = response.headers.getRawHeaders(b"content-type", [b""])[0].decode("latin-1")
            if kind.split(";")[0].strip().lower() != "text/plain":
                response.deliverBody(Protocol())
                raise FetchError(f"{url.decode()} is {kind or 'of no type'!r}, not text/plain", invalid=True)
            body = await readBody(response, self.limit)
            try:
                return body.decode("utf-8")
            except UnicodeDecodeError:
                raise FetchError("the policy is not UTF-8", invalid=True) from None

        whole = Deferred.fromCoroutine(get())
        whole.addTimeout(self.timeout, self.reactor)
        try:
            return await whole
        except FetchError:
            raise
        except Exception as e:
            raise FetchError(f"cannot fetch {url.decode()}: {_why(e)}") from None


def _why(error: BaseException) -> str:
    reasons = getattr(error, "reasons", None)
    if reasons:  # twisted.web's ResponseNeverReceived and friends hold failures
        return "; ".join(_why(r.value) for r in reasons)
    text = " ".join(str(error).split())
    return text[:200] or type(error).__name__


# -- the policy of a domain -----------------------------------------------------


@dataclass
class Lookup:
    """What L{STS.policyFor} found: the policy to apply (or C{None}) and, for TLS-RPT, why a fetch failed."""

    policy: Policy | None
    fetchError: str | None = None
    invalid: bool = False


class STS:
    """
    The policy of each domain, from DNS, HTTPS and the cache (RFC 8461 5).

    C{txt(name)} returns the TXT strings at C{name} (C{[]} when none) and
    raises for a DNS failure; C{blocking(f, *args)} runs file work in a
    worker thread.
    """

    def __init__(
        self,
        clock: Any,
        txt: Callable[[str], Awaitable[Sequence[str]]],
        fetcher: Fetcher,
        cache: PolicyCache,
        blocking: Callable[..., Deferred[Any]] = lambda f, *a: succeed(f(*a)),
    ) -> None:
        self.clock = clock
        self.txt = txt
        self.fetcher = fetcher
        self.cache = cache
        self.blocking = blocking
        self._running: dict[str, list[Deferred[Lookup]]] = {}
        # domain -> (until, record id, error, invalid): a policy host that is down or broken must
        # not cost every attempt at the domain a fetch of up to a minute.
        self._failed: dict[str, tuple[float, str, str, bool]] = {}

    def policyFor(self, domain: str) -> Deferred[Lookup]:
        """One lookup per domain at a time: concurrent attempts wait for the same answer."""
        waiting = self._running.get(domain)
        d: Deferred[Lookup] = Deferred()
        if waiting is not None:
            waiting.append(d)
            return d
        self._running[domain] = [d]

        def done(result: Any) -> None:
            for each in self._running.pop(domain, []):
                if isinstance(result, Failure):
                    each.errback(result)
                else:
                    each.callback(result)

        Deferred.fromCoroutine(self._lookup(domain)).addBoth(done)
        return d

    def _cached(self, domain: str) -> Policy | None:
        policy = self.cache.get(domain)
        if policy is not None and policy.expired(self.clock.seconds()):
            return None
        return policy

    async def _lookup(self, domain: str) -> Lookup:
        cached = self._cached(domain)
        try:
            records = [r for r in await self.txt(f"_mta-sts.{domain}") if r.startswith("v=STSv1")]
        except Exception as e:
            # A DNS failure: the cached policy, if any, still holds (RFC 8461 5.1).
            log.info("MTA-STS: TXT lookup for {domain} failed ({why})", domain=domain, why=_why(e))
            return Lookup(cached)
        if len(records) != 1:
            return Lookup(cached)  # none (or several: as if none, RFC 8461 3.1); a cached policy holds
        try:
            ident = parseRecord(records[0])
        except PolicyError as e:
            log.info("MTA-STS: {domain}: {why}", domain=domain, why=str(e))
            return Lookup(cached)
        if cached is not None and cached.id == ident:
            return Lookup(cached)
        failed = self._failed.get(domain)
        if failed is not None and failed[0] > self.clock.seconds() and failed[1] == ident:
            return Lookup(cached, failed[2], failed[3])
        try:
            text = await self.fetcher.fetch(domain)
            policy = parsePolicy(text, ident, self.clock.seconds())
        except (FetchError, PolicyError) as e:
            invalid = isinstance(e, PolicyError) or getattr(e, "invalid", False)
            if len(self._failed) > 10_000:
                self._failed.clear()
            self._failed[domain] = (self.clock.seconds() + RETRY_FETCH, ident, str(e), invalid)
            log.info(
                "MTA-STS: {domain}: {why}; {using}",
                domain=domain,
                why=str(e),
                using="using the cached policy" if cached is not None else "no policy applies",
            )
            return Lookup(cached, str(e), invalid)
        self._failed.pop(domain, None)
        self.cache.remember(domain, policy)
        try:
            await self.blocking(self.cache.put, domain, policy)
        except OSError as e:
            log.warn("MTA-STS: cannot cache the policy of {domain}: {why}", domain=domain, why=str(e))
        log.info(
            "MTA-STS: {domain}: policy {id} fetched, mode {mode}, max_age {age}",
            domain=domain,
            id=ident,
            mode=policy.mode,
            age=policy.maxAge,
        )
        return Lookup(policy)
