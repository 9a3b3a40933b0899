"""
The built-in remote delivery backends, registered like any third-party one:
``smarthost`` (everything to one upstream server) and ``mx`` (each domain's
mail exchangers).  Their modules are imported only when built.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.plugin import IPlugin
from zope.interface import implementer

from relay.interfaces import IDeliveryBackendFactory


@implementer(IPlugin, IDeliveryBackendFactory)
class SmartHostBackendFactory:
    name = "smarthost"
    description = "Relay everything to one upstream server (STARTTLS or implicit TLS, AUTH, verified certificate)"
    keys = {
        "host": "the smart host's name or address (required)",
        "port": "its port (default 25)",
        "tls": "starttls (default), implicit or none",
        "verify": "yes (default): the certificate must be valid for host; no: encrypt only",
        "ca_file": "PEM file of trusted CAs (default: the system trust store)",
        "username": "AUTH user (with password_file)",
        "password_file": "file holding the AUTH password alone (a trailing newline is ignored)",
    }

    def build(self, options: Mapping[str, Any], context: Any) -> Any:
        from relay.delivery.smarthost import fromOptions

        return fromOptions(options, context)


@implementer(IPlugin, IDeliveryBackendFactory)
class MXBackendFactory:
    name = "mx"
    description = "Deliver to each recipient domain's mail exchangers (MX, else A/AAAA; null MX bounces)"
    keys = {
        "port": "SMTP port of every mail exchanger (default 25)",
        "tls": "opportunistic (default), required or verify (certificate valid for the MX name)",
        "ca_file": "PEM file of trusted CAs for verify, MTA-STS and TLS reports (default: the system trust store)",
        "nameservers": "host:port ... to ask instead of the system resolver",
        "max_mx": "at most this many mail exchanger addresses tried per attempt (default 5, 1 to 100)",
        "mta_sts": "yes (default): honour MTA-STS policies (RFC 8461), cached under state_dir; no: ignore them",
        "mta_sts_port": "port of the MTA-STS policy servers (default 443; for tests)",
        "tls_reports": "yes: send daily TLS reports (RFC 8460) to the domains that ask for them; no (default)",
        "dnssec": "yes: trust the AD bit of the nameservers' answers (they must validate DNSSEC); no (default)",
        "dane": "yes: honour DANE TLSA records (RFC 7672) of authenticated MX hosts (needs dnssec = yes); no (default)",
    }

    def build(self, options: Mapping[str, Any], context: Any) -> Any:
        from relay.delivery.mx import fromOptions

        return fromOptions(options, context)


smarthost = SmartHostBackendFactory()
mx = MXBackendFactory()
