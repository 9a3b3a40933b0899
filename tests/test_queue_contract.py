"""The IQueueStore contract suite, run against both built-in stores."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.task import Clock

from relay.plugin import runInline
from relay.queue.filesystem import SYNC_MODES, FilesystemQueueStore
from relay.queue.memory import MemoryQueueStore
from relay.testing.queuestore import QueueStoreContract


class TestFilesystemStore(QueueStoreContract):
    sync = "fsync"

    def makeStore(self, path: Path) -> FilesystemQueueStore:
        clock = Clock()
        clock.advance(1_800_000_000)
        return FilesystemQueueStore(path, runInline, clock, self.sync)


@pytest.mark.skipif("syncfs" not in SYNC_MODES, reason="syncfs(2) is Linux-only")
class TestFilesystemStoreSyncfs(TestFilesystemStore):
    sync = "syncfs"


class TestMemoryStore(QueueStoreContract):
    """Memory keeps nothing across processes: a 'restart' is the same instance."""

    def makeStore(self, path: Path) -> MemoryQueueStore:
        stores = self.__dict__.setdefault("_stores", {})
        return stores.setdefault(path, MemoryQueueStore())
