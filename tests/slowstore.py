"""
A queue store for start-up tests, named by dotted path (slowstore:store): the
memory store, whose recovery answers only after C{delay} seconds, and then
fails (C{outcome = fail}) or counts the queue (C{outcome = ok}).
"""

from __future__ import annotations

import errno
from typing import Any

from twisted.internet.defer import Deferred
from twisted.plugin import IPlugin
from zope.interface import implementer

from relay.interfaces import IQueueStoreFactory
from relay.queue.memory import MemoryQueueStore


class SlowStore(MemoryQueueStore):
    def __init__(self, reactor: Any, delay: float, outcome: str) -> None:
        super().__init__()
        self.reactor = reactor
        self.delay = delay
        self.outcome = outcome

    def recover(self) -> Deferred[int]:
        d: Deferred[int] = Deferred()

        def answer() -> None:
            if self.outcome == "fail":
                d.errback(OSError(errno.EIO, "Input/output error"))
            else:
                d.callback(len(self.messages))

        self.reactor.callLater(self.delay, answer)
        return d


@implementer(IPlugin, IQueueStoreFactory)
class SlowStoreFactory:
    name = "slow-store"
    description = "memory store with a slow (and perhaps failing) recovery"
    keys = {"path": "ignored", "delay": "seconds recovery takes", "outcome": "ok or fail"}

    def build(self, options: Any, context: Any) -> SlowStore:
        return SlowStore(context.reactor, float(options.get("delay", "1")), options.get("outcome", "ok"))


store = SlowStoreFactory()
