"""
The built-in DKIM signing filter, registered like any third-party plugin.

The implementation (and dkimpy) is imported only when built, so discovery stays cheap.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.plugin import IPlugin
from zope.interface import implementer

from relay.interfaces import IMessageFilterFactory


@implementer(IPlugin, IMessageFilterFactory)
class DKIMFilterFactory:
    name = "dkim"
    description = "Sign outgoing mail with DKIM (RFC 6376, relaxed/relaxed), RSA or Ed25519"
    keys = {
        "domain": "the signing domain (d=); signs mail whose From domain is it or a sub-domain of it",
        "selector": "the selector (s=): the key is published at SELECTOR._domainkey.DOMAIN",
        "private_key": "the private key file, PEM (RSA of 1024 bits or more, or Ed25519), under state_dir unless"
        " absolute",
        "headers": "the header fields to sign (default: from, to, cc, subject, date, message-id, reply-to,"
        " mime-version, content-type, ... with From over-signed)",
        "sign": "whose mail to sign: authenticated, relay_networks or all (default: authenticated relay_networks)",
    }

    def build(self, options: Mapping[str, Any], context: Any) -> Any:
        from relay.filters import dkim

        return dkim.build(options, context)


dkim = DKIMFilterFactory()
