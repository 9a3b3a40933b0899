"""
The built-in milter filter, registered like any third-party plugin.

The implementation is imported only when built, so discovery stays cheap.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.plugin import IPlugin
from zope.interface import implementer

from relay.interfaces import IMessageFilterFactory


@implementer(IPlugin, IMessageFilterFactory)
class MilterFilterFactory:
    name = "milter"
    description = "Ask a Sendmail milter (protocol 6: OpenDKIM, rspamd, clamav-milter...) about each message"
    keys = {
        "endpoint": "the milter's address: tcp:HOST:PORT or unix:PATH (a Twisted client endpoint)",
        "timeout": "how long to wait for the connection and for each answer (default 30s)",
        "daemon_name": "the {daemon_name} macro the milter sees (default relay)",
    }

    def build(self, options: Mapping[str, Any], context: Any) -> Any:
        from relay.milter.filter import build

        return build(options, context)


milter = MilterFilterFactory()
