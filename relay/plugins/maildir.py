"""
The built-in maildir delivery backend, registered like any third-party one.

The backend module is imported only when built, so that plugin discovery stays
cheap.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.plugin import IPlugin
from zope.interface import implementer

from relay.interfaces import IDeliveryBackendFactory


@implementer(IPlugin, IDeliveryBackendFactory)
class MaildirBackendFactory:
    name = "maildir"
    description = "Deliver into local maildirs (LF line endings, fsynced before success)"
    keys = {"path": "maildir path template under state_dir; {domain} and {local} are replaced"}

    def build(self, options: Mapping[str, Any], context: Any) -> Any:
        from relay.delivery.maildir import fromOptions

        return fromOptions(options, context)


maildir = MaildirBackendFactory()
