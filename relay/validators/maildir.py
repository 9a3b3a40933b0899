"""
The mailbox exists: a local recipient is valid when its maildir (as the maildir
delivery backend would name it) has been created.

Refusing unknown users at RCPT time, rather than accepting and bouncing later,
keeps the relay from sending backscatter to forged senders.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import implementer

from relay.delivery.maildir import MaildirBackend
from relay.interfaces import IRecipientValidator
from relay.verdict import ACCEPT, CONTINUE, SessionInfo, Verdict, deny

NO_MAILBOX = deny("Recipient address rejected: User unknown in local mailbox table", "5.1.1")
BAD_MAILBOX = deny("Recipient address rejected: Bad destination mailbox address", "5.1.3")


@implementer(IRecipientValidator)
class MaildirValidator:
    def __init__(self, backend: MaildirBackend, blocking: Any) -> None:
        # The backend is used only to name mailboxes, so both agree on paths.
        self._backend = backend
        self._blocking = blocking

    def validate(self, recipient: str, session: SessionInfo) -> Verdict | Deferred[Verdict]:
        if not session.local_domain:
            return CONTINUE
        path = self._backend.maildirFor(recipient)
        if path is None:
            return BAD_MAILBOX
        d = self._blocking(os.path.isdir, os.path.join(path, "new"))
        d.addCallback(lambda exists: ACCEPT if exists else NO_MAILBOX)
        return d
