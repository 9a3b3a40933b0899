"""Start-up: nothing answers or delivers until the queue is recovered; a queue that cannot be used stops the relay."""

from __future__ import annotations

import errno
from pathlib import Path
from types import SimpleNamespace

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from relay.delivery.router import Router
from relay.queue.memory import MemoryQueueStore
from relay.queue.scheduler import Scheduler
from relay.service import Listener, RelayService


class Store(MemoryQueueStore):
    def __init__(self, recovery: Deferred) -> None:
        super().__init__()
        self.recovery = recovery

    def recover(self):
        return self.recovery


def relay(recovery: Deferred) -> tuple[RelayService, Service, list[str]]:
    store = Store(recovery)
    scheduler = Scheduler(store, Router(lambda domain: None, {}), Clock(), (60.0,), 3600.0)
    fatal: list[str] = []
    settings = SimpleNamespace(queue=SimpleNamespace(path=Path("/var/relay/queue")))
    top = RelayService(settings, store, scheduler, onFatal=fatal.append)
    scheduler.setServiceParent(top)
    listener = Service()
    listener.setServiceParent(top)
    return top, listener, fatal


def test_nothing_starts_before_recovery_succeeds():
    recovery: Deferred = Deferred()
    top, listener, fatal = relay(recovery)
    top.startService()
    assert top.running and not listener.running and not top.scheduler.running
    recovery.callback(42)
    assert listener.running and top.scheduler.running
    assert top.scheduler.queued() == 42 and fatal == []
    stopped = []
    top.stopService().addCallback(stopped.append)
    assert stopped and not listener.running


def test_failed_recovery_stops_the_relay_with_one_line_and_starts_nothing():
    top, listener, fatal = relay(fail(OSError(errno.ENOTDIR, "Not a directory")))
    top.startService()
    assert fatal == ["cannot use the queue at /var/relay/queue: [Errno 20] Not a directory"]
    assert not listener.running and not top.scheduler.running
    stopped = []
    top.stopService().addCallback(stopped.append)  # the shutdown that follows: nothing to stop but the store
    assert stopped


def test_stopped_during_recovery_starts_nothing_afterwards():
    recovery: Deferred = Deferred()
    top, listener, fatal = relay(recovery)
    top.startService()
    top.stopService()
    recovery.callback(1)
    assert not listener.running and not top.scheduler.running and fatal == []


class Port:
    def __init__(self) -> None:
        self.reading = True

    def stopReading(self) -> None:
        self.reading = False

    def startReading(self) -> None:
        self.reading = True


class Endpoint:
    def __init__(self) -> None:
        self.port = Port()

    def listen(self, factory):
        return succeed(self.port)


def test_listener_binds_at_once_but_accepts_only_once_started():
    endpoint = Endpoint()
    listener = Listener(endpoint, object())
    listener.privilegedStartService()  # twistd binds before the reactor runs (and before dropping root)
    assert not endpoint.port.reading
    listener.startService()
    assert endpoint.port.reading


def test_a_failure_while_starting_stops_the_relay_too():
    top, listener, fatal = relay(succeed("not a count"))
    top.startService()
    assert fatal and fatal[0].startswith("start-up failed: ")
    assert not listener.running
