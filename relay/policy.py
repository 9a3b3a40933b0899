"""
Who may send what: relay access rules and the recipient validator chain.

The rules, in order, for each recipient:

  1. C{postmaster} at a local domain is always accepted (RFC 5321 4.5.1).
  2. A recipient outside C{local_domains} needs a client that may relay
     (authenticated, or inside C{relay_networks}) and a route; else 550 5.7.1.
  3. The validators are asked in order; the first that does not answer
     CONTINUE decides.  One that raises or does not answer in time costs a
     451 4.3.0 for this recipient and nothing else.
  4. Nobody objected: accepted.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger

from relay.envelope import Status
from relay.verdict import Decision, SessionInfo, Verdict

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

RELAY_DENIED = Status(550, "5.7.1", "Relay access denied")
VALIDATOR_FAILED = Status(451, "4.3.0", "Temporary failure checking recipient; try again later")
ACCEPTED = Status(250, "2.1.5", "Ok")


def clientIP(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class Policy:
    log = Logger()

    def __init__(
        self,
        localDomains: frozenset[str],
        relayNetworks: Sequence[Network],
        route: Callable[[str], str | None],
        validators: Sequence[tuple[str, Any]],
        clock: Any,
        validatorTimeout: float = 30.0,
        metrics: Any = None,
    ) -> None:
        self.localDomains = localDomains
        self.relayNetworks = tuple(relayNetworks)
        self._route = route
        self.validators = tuple(validators)
        self._clock = clock
        self._timeout = validatorTimeout
        self.metrics = metrics
        self._mayRelay: dict[str, bool] = {}  # address -> in relay_networks: checked per session and RCPT

    def isLocal(self, domain: str) -> bool:
        return domain.lower() in self.localDomains

    def mayRelay(self, client: str, authenticated: str | None) -> bool:
        if authenticated:
            return True
        known = self._mayRelay.get(client)
        if known is None:
            ip = clientIP(client)
            known = ip is not None and any(ip in net for net in self.relayNetworks)
            if len(self._mayRelay) >= 4096:
                self._mayRelay.clear()  # bounded: many distinct clients just recompute
            self._mayRelay[client] = known
        return known

    def checkRecipient(self, address: str, session: SessionInfo, mayRelay: bool) -> Status | Deferred[Status]:
        """
        @return: the reply for this RCPT, 250 when accepted, else the
            refusal: at once when no validator needs asking (the common case
            costs no Deferred), else a Deferred firing with it.  It never fails.
        """
        local, _, domain = address.rpartition("@")
        isLocal = self.isLocal(domain)
        if isLocal and local.lower() == "postmaster":
            return ACCEPTED
        if not isLocal and (not mayRelay or self._route(domain) is None):
            return RELAY_DENIED
        if not self.validators:
            return ACCEPTED
        return Deferred.fromCoroutine(self._ask(address, session))

    async def _ask(self, address: str, session: SessionInfo) -> Status:
        for name, validator in self.validators:
            try:
                d = maybeDeferred(validator.validate, address, session)
                d.addTimeout(self._timeout, self._clock)
                verdict = await d
                if not isinstance(verdict, Verdict):
                    raise TypeError(f"validator returned {verdict!r}, not a Verdict")
            except Exception:
                self.log.failure("validator {validator} failed for {address}", validator=name, address=address)
                if self.metrics is not None:
                    self.metrics.pluginFailed("validator", name)
                return VALIDATOR_FAILED
            if verdict.decision is Decision.CONTINUE:
                continue
            if verdict.decision is Decision.ACCEPT:
                return ACCEPTED
            assert verdict.status is not None
            return verdict.status
        return ACCEPTED
