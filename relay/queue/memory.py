"""
A queue store that keeps everything in memory.

For tests and for plugin authors who want a second implementation to compare
against; it honours the same contract as the filesystem store except that
nothing survives the process.  C{failWrites} / C{failCommits} let a test play a
full disk, and C{failUpdates} / C{failRemoves} a failing one.
"""

from __future__ import annotations

import errno
import io
import itertools
from collections.abc import Collection
from typing import BinaryIO

from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from relay.envelope import Envelope, QueueScan
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


def dueTime(envelope: Envelope) -> float:
    """
    When a message is next due: the earliest next attempt of its pending
    recipients, or its arrival when none has been attempted.
    """
    times = [r.next_attempt for r in envelope.pending() if r.next_attempt is not None]
    return min(times) if times else envelope.received_at


@implementer(IQueueStore)
class MemoryQueueStore:
    def __init__(self) -> None:
        self.messages: dict[str, tuple[Envelope, bytes]] = {}
        self.incoming: set[MemoryIncoming] = set()
        self.failWrites = False
        self.failCommits = False
        self.failUpdates = False
        self.failRemoves = False
        self._ids = itertools.count(1)

    def recover(self) -> Deferred[int | None]:
        # Counting costs nothing here; a store for which it does fires with None.
        return succeed(len(self.messages))

    def scan(self, before: float, limit: int, exclude: Collection[str]) -> Deferred[QueueScan]:
        candidates = sorted(
            (dueTime(envelope), queueID)
            for queueID, (envelope, _) in self.messages.items()
            if queueID not in exclude and envelope.pending()
        )
        due = [c for c in candidates if c[0] <= before][:limit]
        left = candidates[len(due) :]
        oldest = min((envelope.received_at for envelope, _ in self.messages.values()), default=None)
        return succeed(QueueScan(due, len(self.messages), left[0][0] if left else None, oldest))

    def load(self, queueID: str) -> Deferred[Envelope]:
        if queueID not in self.messages:
            return fail(FileNotFoundError(errno.ENOENT, "no such message", queueID))
        return succeed(self.messages[queueID][0].copy())

    def begin(self) -> MemoryIncoming:
        incoming = MemoryIncoming(self, f"M{next(self._ids):012d}")
        self.incoming.add(incoming)
        return incoming

    def openData(self, queueID: str) -> BinaryIO:
        if queueID not in self.messages:
            raise FileNotFoundError(errno.ENOENT, "no such message", queueID)
        return io.BytesIO(self.messages[queueID][1])

    def update(self, envelope: Envelope) -> Deferred[None]:
        if self.failUpdates:
            return fail(OSError(errno.EIO, "Input/output error"))
        data = self.messages[envelope.queue_id][1]
        self.messages[envelope.queue_id] = (envelope.copy(), data)
        return succeed(None)

    def remove(self, queueID: str) -> Deferred[None]:
        if self.failRemoves:
            return fail(OSError(errno.EIO, "Input/output error"))
        self.messages.pop(queueID, None)
        return succeed(None)

    def stop(self) -> None:
        pass
