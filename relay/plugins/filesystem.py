"""
The built-in queue store, registered like any third-party one.

Importing this module must stay cheap (plugin discovery imports every module
of C{relay.plugins}), so the store itself is imported only when built.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from twisted.plugin import IPlugin
from zope.interface import implementer

from relay.errors import OptionError
from relay.interfaces import IQueueStoreFactory


@implementer(IPlugin, IQueueStoreFactory)
class FilesystemQueueStoreFactory:
    name = "filesystem"
    description = "Durable queue in a directory: one file per message, written once, fsynced with its directory"
    keys = {
        "path": "queue directory (relative paths are under state_dir)",
        "sync": "fsync (the only value: every file, then its directory, before 250)",
    }

    def build(self, options: Mapping[str, Any], context: Any) -> Any:
        from twisted.internet.interfaces import IReactorProcess

        from relay.queue.filesystem import SYNC_MODES, FilesystemQueueStore, ProcessEngine, QueueInUse

        path = Path(options["path"])
        sync = options.get("sync", SYNC_MODES[0]).strip()
        if sync == "syncfs":
            raise OptionError(
                "sync",
                "syncfs is no longer supported: it is not durable under POSIX power loss "
                "(it makes nothing durable on some file systems, and recycled files could show "
                "another message's data); remove the key or use fsync",
            )
        if sync not in SYNC_MODES:
            raise OptionError("sync", f"must be {' or '.join(SYNC_MODES)}, not {sync!r}")
        try:
            store = FilesystemQueueStore(path, context.blocking, context.reactor)
        except QueueInUse as e:
            raise OptionError("path", e.strerror) from None
        except OSError as e:
            # Found at start-up, not at the first message.
            raise OptionError("path", f"cannot use queue directory {str(path)!r}: {e.strerror or e}") from None
        if IReactorProcess.providedBy(context.reactor):
            # A child process of its own: its system calls never wait for our GIL.
            store.engine = ProcessEngine(context.reactor, store.path)
        return store


filesystem = FilesystemQueueStoreFactory()
