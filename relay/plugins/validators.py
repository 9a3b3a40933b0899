"""
The built-in recipient validators, registered like any third-party plugin.

Implementation modules are imported only when built, so discovery stays cheap.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.plugin import IPlugin
from zope.interface import implementer

from relay.interfaces import IRecipientValidatorFactory


@implementer(IPlugin, IRecipientValidatorFactory)
class StaticValidatorFactory:
    name = "static"
    description = "Accept (mode allow) or refuse (mode deny) the addresses of a list or a file"
    keys = {
        "addresses": "space-separated user@domain or @domain entries",
        "file": "a file of entries, one per line, under state_dir unless absolute; re-read when it changes",
        "mode": "allow (listed are the valid local mailboxes; default) or deny (a block list)",
    }

    def build(self, options: Mapping[str, Any], context: Any) -> Any:
        from relay.validators import static

        return static.build(dict(options), context.state_dir, context.blocking)


@implementer(IPlugin, IRecipientValidatorFactory)
class MaildirValidatorFactory:
    name = "maildir"
    description = "Accept a local recipient only if its maildir exists"
    keys = {"path": "the maildir path template, as for the maildir delivery backend (default mail/{domain}/{local})"}

    def build(self, options: Mapping[str, Any], context: Any) -> Any:
        from relay.delivery.maildir import fromOptions
        from relay.validators.maildir import MaildirValidator

        return MaildirValidator(fromOptions(options, context), context.blocking)


static = StaticValidatorFactory()
maildir = MaildirValidatorFactory()
