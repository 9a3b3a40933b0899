"""
A queue store that keeps everything in memory.

For tests and for plugin authors who want a second implementation to compare
against; it honours the same contract as the filesystem store except that
nothing survives the process.  C{failWrites} / C{failCommits} let a test play a
full disk.
"""

from __future__ import annotations

import errno
import io
import itertools
from typing import BinaryIO

from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from relay.envelope import Envelope
from relay.interfaces import IIncomingMessage, IQueueStore


@implementer(IIncomingMessage)
class MemoryIncoming:
    def __init__(self, store: MemoryQueueStore, queueID: str) -> None:
        self.queue_id = queueID
        self._store = store
        self._chunks: list[bytes] = []
        self.aborted = False
        self.committed = False

    def write(self, data: bytes) -> None:
        if self._store.failWrites:
            raise OSError(errno.ENOSPC, "No space left on device")
        self._chunks.append(data)

    def commit(self, envelope: Envelope) -> Deferred[None]:
        if self.committed or envelope.queue_id != self.queue_id:
            return fail(ValueError("commit twice, or with another message's envelope"))
        if self._store.failCommits:
            return fail(OSError(errno.ENOSPC, "No space left on device"))
        self._store.messages[self.queue_id] = (envelope.copy(), b"".join(self._chunks))
        self._store.incoming.discard(self)
        self.committed = True
        return succeed(None)

    def abort(self) -> None:
        if self.committed:
            return
        self.aborted = True
        self._store.incoming.discard(self)


@implementer(IQueueStore)
class MemoryQueueStore:
    def __init__(self) -> None:
        self.messages: dict[str, tuple[Envelope, bytes]] = {}
        self.incoming: set[MemoryIncoming] = set()
        self.failWrites = False
        self.failCommits = False
        self._ids = itertools.count(1)

    def recover(self) -> list[Envelope]:
        return [envelope.copy() for envelope, _ in self.messages.values()]

    def begin(self) -> MemoryIncoming:
        incoming = MemoryIncoming(self, f"M{next(self._ids):012d}")
        self.incoming.add(incoming)
        return incoming

    def openData(self, queueID: str) -> BinaryIO:
        if queueID not in self.messages:
            raise FileNotFoundError(errno.ENOENT, "no such message", queueID)
        return io.BytesIO(self.messages[queueID][1])

    def update(self, envelope: Envelope) -> Deferred[None]:
        data = self.messages[envelope.queue_id][1]
        self.messages[envelope.queue_id] = (envelope.copy(), data)
        return succeed(None)

    def remove(self, queueID: str) -> Deferred[None]:
        self.messages.pop(queueID, None)
        return succeed(None)

    def stop(self) -> None:
        pass
