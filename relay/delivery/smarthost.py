"""
The smart host backend: every message to one upstream server.

``tls = starttls`` (the default) requires STARTTLS, ``implicit`` speaks TLS
from the first byte, ``none`` never encrypts.  With ``verify = yes`` (the
default) the certificate must be valid for ``host``, against ``ca_file`` or
the system trust store.  ``username`` and ``password_file`` turn on AUTH
PLAIN or LOGIN, only ever over TLS unless ``tls = none``.

A refused password or a certificate that does not verify defers the mail:
the operator fixes the configuration and nothing bounces meanwhile.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from relay.delivery import remote
from relay.envelope import DeliveryResult, Envelope, Recipient
from relay.errors import OptionError
from relay.interfaces import IDeliveryBackend
from relay.plugin import choiceOption, portOption
from relay.smtp.client import ClientSettings, SessionError, TLSPolicy
from relay.smtp.tls import TLSError, clientOptions

TLS_MODES = ("starttls", "implicit", "none")  # the first is the default


@implementer(IDeliveryBackend)
class SmartHostBackend:
    log = Logger()

    def __init__(
        self,
        reactor: Any,
        helo: str,
        host: str,
        port: int,
        tls: str = "starttls",
        tlsOptions: Any = None,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self.reactor = reactor
        self.hop = remote.Hop(host, host, port)
        self.implicit = tlsOptions if tls == "implicit" else None
        self.pool = remote.SessionPool(reactor)
        # STARTTLS is required; whether the certificate is checked is in tlsOptions.
        policy = {"none": TLSPolicy.NONE, "starttls": TLSPolicy.REQUIRED, "implicit": TLSPolicy.IMPLICIT}[tls]
        self.settings = ClientSettings(
            helo=helo, clock=reactor, tls=policy, tlsOptions=tlsOptions, username=username, password=password
        )

    def deliver(self, envelope: Envelope, recipients: Sequence[Recipient], openData: Any) -> Any:
        return Deferred.fromCoroutine(self._deliver(envelope, recipients, openData))

    async def _deliver(
        self, envelope: Envelope, recipients: Sequence[Recipient], openData: Any
    ) -> list[DeliveryResult]:
        message = remote.outgoing(envelope, recipients, openData)
        try:
            outcome = await remote.deliverTo(self.reactor, self.hop, self.settings, message, self.implicit, self.pool)
        except (remote.Unreachable, SessionError) as e:
            self.log.info("smart host {host}: {status}", host=self.hop.name, status=str(e.status))
            return remote.everyone(recipients, e.status, remote.failedAt(e))
        return remote.results(recipients, outcome)

    def stop(self) -> None:
        self.pool.close()


def _password(options: Mapping[str, Any]) -> str | None:
    name = options.get("password_file")
    if name is None:
        return None
    try:
        text = Path(name).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise OptionError("password_file", f"cannot read {name!r}: {e}") from None
    return text[:-1] if text.endswith("\n") else text


def fromOptions(options: Mapping[str, Any], context: Any) -> SmartHostBackend:
    host = (options.get("host") or "").strip()
    if not host:
        raise OptionError("host", "required: the smart host's name or address")
    port = portOption(options)
    tls = choiceOption(options, "tls", TLS_MODES)
    verify = choiceOption(options, "verify", ("yes", "no"))
    username = options.get("username")
    password = _password(options)
    if (username is None) != (password is None):
        raise OptionError("username" if username is None else "password_file", "username and password_file go together")
    caFile = options.get("ca_file")
    tlsOptions = None
    if tls != "none":
        try:
            tlsOptions = clientOptions(host, verify=verify == "yes", caFile=Path(caFile) if caFile else None)
        except TLSError as e:
            raise OptionError(e.key, e.message) from None
    return SmartHostBackend(
        context.reactor, context.hostname, host, port, tls, tlsOptions, username=username, password=password
    )
