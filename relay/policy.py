"""
Who may send what: relay access rules and the recipient validator chain.

The rules, in order, for each recipient:

  1. C{postmaster} at a local domain is always accepted (RFC 5321 4.5.1).
  2. A recipient outside C{local_domains} needs a client that may relay
     (authenticated, or inside C{relay_networks}) and a route; else 550 5.7.1.
  3. The delivery backend the recipient is routed to is asked whether it
     would certainly refuse it (the optional C{refuses} of
     L{relay.interfaces.IDeliveryBackend}; the maildir backend refuses a
     local part that cannot be a mailbox path): such a recipient is refused
     now, with the status delivery would give, rather than accepted and
     bounced later to a sender who may be forged (backscatter).
  4. The validators are asked in order; the first that does not answer
     CONTINUE decides.  One that raises or does not answer in time costs a
     451 4.3.0 for this recipient and nothing else.  A backend check that
     raises costs the same.
  5. Nobody objected: accepted.

DSN requests (RFC 3461) are honoured in full only for clients that may
relay.  Anyone can put any address in MAIL FROM, so a report is mail sent to
an address nobody proved is theirs: from other clients the relay keeps the
reports it owes any sender (failures, with the headers only) and nothing a
forger could use to aim a copy of their message, or a report at every
delivery, at somebody else.  See L{Policy.dsnNotify} and L{Policy.dsnRet}.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger

from relay.envelope import Status
from relay.verdict import Decision, SessionInfo, Verdict

if TYPE_CHECKING:
    from relay.delivery.router import Router

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

RELAY_DENIED = Status(550, "5.7.1", "Relay access denied")
VALIDATOR_FAILED = Status(451, "4.3.0", "Temporary failure checking recipient; try again later")
ACCEPTED = Status(250, "2.1.5", "Ok")

# What an untrusted client's NOTIFY becomes (unless NEVER): failures only.
OUTSIDER_NOTIFY = ("FAILURE",)


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
        router: Router | None = None,
    ) -> None:
        """
        @param router: the delivery router, whose backends are asked at RCPT
            whether they would certainly refuse a recipient; C{None} asks
            nobody.
        """
        self.localDomains = localDomains
        self.relayNetworks = tuple(relayNetworks)
        self._route = route
        self.validators = tuple(validators)
        self._clock = clock
        self._timeout = validatorTimeout
        self.metrics = metrics
        self._router = router
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
        refusal = self._backendRefusal(address)
        if refusal is not None:
            return refusal
        if not self.validators:
            return ACCEPTED
        return Deferred.fromCoroutine(self._ask(address, session))

    def _backendRefusal(self, address: str) -> Status | None:
        """The permanent refusal the routed backend would certainly give C{address}, if it says so."""
        found = self._router.backendFor(address) if self._router is not None else None
        if found is None:
            return None
        name, backend = found
        refuses = getattr(backend, "refuses", None)
        if refuses is None:
            return None  # an optional method: a backend without it is never asked
        try:
            status = refuses(address)
            if status is not None and not (isinstance(status, Status) and status.permanent):
                raise TypeError(f"refuses() returned {status!r}, not None or a 5xx Status")
        except Exception:
            return self._pluginFailed("backend", name, address)
        return status

    def _pluginFailed(self, kind: str, name: str, address: str) -> Status:
        """A plugin raised or misbehaved over one recipient: logged with the traceback, counted, and a 451."""
        self.log.failure("{kind} {plugin} failed for {address}", kind=kind, plugin=name, address=address)
        if self.metrics is not None:
            self.metrics.pluginFailed(kind, name)
        return VALIDATOR_FAILED

    def dsnNotify(self, notify: tuple[str, ...] | None, trusted: bool) -> tuple[str, ...] | None:
        """
        The NOTIFY the relay will honour for a recipient.

        @param notify: what the client asked for (C{None}: no NOTIFY).
        @param trusted: the client may relay (see L{mayRelay}).
        @return: C{notify} for a trusted client; for any other, failures only
            (SUCCESS and DELAY, asked for or by default, are dropped; a
            request for SUCCESS alone gets what no request gets), except that
            NEVER stays NEVER: asking for fewer reports is always honoured.
        """
        if trusted or notify == ("NEVER",):
            return notify
        return OUTSIDER_NOTIFY

    def dsnRet(self, ret: str | None, trusted: bool) -> str | None:
        """
        The RET the relay will honour for a message: a trusted client's, else
        C{HDRS}, so that a failure report never carries a copy of a message
        an outsider sent to wherever its MAIL FROM points.
        """
        return ret if trusted else "HDRS"

    async def _ask(self, address: str, session: SessionInfo) -> Status:
        for name, validator in self.validators:
            try:
                d = maybeDeferred(validator.validate, address, session)
                d.addTimeout(self._timeout, self._clock)
                verdict = await d
                if not isinstance(verdict, Verdict):
                    raise TypeError(f"validator returned {verdict!r}, not a Verdict")
            except Exception:
                return self._pluginFailed("validator", name, address)
            if verdict.decision is Decision.CONTINUE:
                continue
            if verdict.decision is Decision.ACCEPT:
                return ACCEPTED
            assert verdict.status is not None
            return verdict.status
        return ACCEPTED
