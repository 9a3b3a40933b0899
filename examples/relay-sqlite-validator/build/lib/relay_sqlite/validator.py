"""
The validator.  Lookups run through ``blocking`` (a worker thread), each on a
connection of its own thread, read-only: a slow disk never stalls the relay,
and the database can be updated by other programs while the relay runs.
Recipients outside the local domains are left to the relay's policy
(``CONTINUE``).
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import implementer

from relay.interfaces import IRecipientValidator
from relay.verdict import CONTINUE, SessionInfo, accept, deny


@implementer(IRecipientValidator)
class SQLiteValidator:
    def __init__(self, path: Path, query: str, blocking: Any) -> None:
        self.path = path
        self.query = query
        self.blocking = blocking
        self._local = threading.local()
        self._lookup("probe@invalid")  # a missing file or a bad query stops start-up here

    def _connection(self) -> sqlite3.Connection:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
            self._local.connection = connection
        return connection

    def _lookup(self, address: str) -> bool:
        return self._connection().execute(self.query, (address.lower(),)).fetchone() is not None

    def validate(self, address: str, session: SessionInfo) -> Any:
        if not session.local_domain:
            return CONTINUE
        d: Deferred = self.blocking(self._lookup, address)
        d.addCallback(lambda found: accept() if found else deny("No such mailbox here", "5.1.1"))
        return d
