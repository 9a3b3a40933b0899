"""The IQueueStore contract suite, run against both built-in stores."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from relay.plugin import runInline
from relay.queue import fsworker
from relay.queue.filesystem import FilesystemQueueStore
from relay.queue.memory import MemoryQueueStore
from relay.testing.queuestore import QueueStoreContract


class TestFilesystemStore(QueueStoreContract):
    @pytest.fixture(autouse=True)
    def restoreFsync(self):
        real = fsworker.fsyncFile
        yield
        fsworker.fsyncFile = real

    def makeStore(self, path: Path) -> FilesystemQueueStore:
        clock = Clock()
        clock.advance(1_800_000_000)
        return FilesystemQueueStore(path, runInline, clock)

    def makeUpdatesFail(self, store: FilesystemQueueStore, queueID: str, failing: bool) -> None:
        # fsync reports a write-back error (EIO), as a failing disk does.
        real = self.__dict__.setdefault("_fsync", fsworker.fsyncFile)
        if failing:

            def broken(fd: int) -> None:
                raise OSError(errno.EIO, "Input/output error")

            fsworker.fsyncFile = broken
        else:
            fsworker.fsyncFile = real

    def makeUnusable(self, path: Path) -> None:
        (path / "messages").rename(path / "gone")
        (path / "messages").write_bytes(b"not a directory")


class TestMemoryStore(QueueStoreContract):
    """Memory keeps nothing across processes: a 'restart' is the same instance."""

    def makeStore(self, path: Path) -> MemoryQueueStore:
        stores = self.__dict__.setdefault("_stores", {})
        return stores.setdefault(path, MemoryQueueStore())

    def makeUpdatesFail(self, store: MemoryQueueStore, queueID: str, failing: bool) -> None:
        store.failUpdates = failing
