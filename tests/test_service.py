"""Start-up: nothing answers or delivers until the queue is recovered; a queue that cannot be used stops the relay."""

from __future__ import annotations

import errno
import resource
import threading
from pathlib import Path
from types import SimpleNamespace

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.python.threadpool import ThreadPool

from relay.config import ThreadSettings
from relay.delivery.router import Router
from relay.plugin import PluginContext
from relay.queue.memory import MemoryQueueStore
from relay.queue.scheduler import Scheduler
from relay.service import Executors, Listener, RelayService, raiseFdLimit, withBacklog
from tests.smtphelpers import Session


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


# -- executors -------------------------------------------------------------------


def _saturate(pool, release: threading.Event, jobs: int) -> None:
    for _ in range(jobs):
        pool.callInThread(release.wait, 10)  # slow password hashing: every thread taken


def test_a_saturated_auth_pool_delays_no_delivery_or_validator_work():
    executors = Executors(Clock(), ThreadSettings(auth=2, dns=1, delivery=1, validators=1))
    executors.start()
    release = threading.Event()
    try:
        _saturate(executors.pool("auth"), release, 20)
        for kind in ("delivery", "validators", "dns"):
            done = threading.Event()
            executors.pool(kind).callInThread(done.set)
            assert done.wait(5), f"{kind} work waited behind the auth pool"
    finally:
        release.set()
        executors.stop()
    assert not [t for t in threading.enumerate() if t.name.startswith("relay-")]


def test_one_shared_pool_would_have_delayed_it():
    """The control: the old single pool, saturated the same way, runs nothing else."""
    shared = ThreadPool(minthreads=0, maxthreads=2, name="relay-shared")
    shared.start()
    release = threading.Event()
    try:
        _saturate(shared, release, 20)
        done = threading.Event()
        shared.callInThread(done.set)
        assert not done.wait(0.5)
    finally:
        release.set()
        shared.stop()


def test_executors_are_started_and_stopped_with_the_relay():
    executors = Executors(Clock(), ThreadSettings())
    recovery: Deferred = Deferred()
    top, listener, fatal = relay(recovery)
    top.executors = executors
    top.startService()
    assert executors.running and all(pool.started for pool in executors.pools.values())
    recovery.callback(0)
    top.stopService()
    assert not executors.running and not any(pool.started for pool in executors.pools.values())


def test_plugin_context_dns_defaults_to_blocking():
    def runner(f, *args):
        return succeed(f(*args))

    context = PluginContext(reactor=Clock(), hostname="h", postmaster="p@h", state_dir=Path("."), blocking=runner)
    assert context.dns is runner


def test_listeners_get_the_configured_backlog_unless_they_name_one():
    assert withBacklog("tcp:2525:interface=127.0.0.1", 1024) == "tcp:2525:interface=127.0.0.1:backlog=1024"
    assert withBacklog("unix:/run/relay.sock", 100) == "unix:/run/relay.sock:backlog=100"
    assert withBacklog("ssl:465:privateKey=k.pem", 100) == "ssl:465:privateKey=k.pem:backlog=100"
    assert withBacklog("tcp:25:backlog=5", 1024) == "tcp:25:backlog=5"
    assert withBacklog("systemd:domain=INET:index=0", 1024) == "systemd:domain=INET:index=0"


def test_the_fd_limit_is_raised_to_the_hard_limit_where_allowed():
    before, now, hard = raiseFdLimit()
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert now == soft >= before
    if hard != resource.RLIM_INFINITY:
        assert now == hard


# -- graceful stop: the sessions ---------------------------------------------------


def _closed(session) -> None:
    """StringTransport does not call connectionLost; the reactor would."""
    session.server.connectionLost(None)


def test_an_idle_session_gets_421_at_once_and_shutdown_fires_when_it_has_gone():
    session = Session()
    session.ready()
    done = []
    session.factory.shutdown(30).addCallback(done.append)
    assert session.take() == b"421 4.3.2 Error: service shutting down, try again later\r\n"
    assert session.transport.disconnecting and not done
    _closed(session)
    assert done == [None] and not session.factory.sessions


def test_a_session_in_a_transaction_may_finish_it_then_gets_421():
    session = Session()
    session.ready()
    session.send(b"MAIL FROM:<a@example.test>\r\nRCPT TO:<b@localhost>\r\n")
    done = []
    session.factory.shutdown(30).addCallback(done.append)
    assert session.take() == b"" and not session.transport.disconnecting
    session.clock.advance(29)
    replies = session.send(b"DATA\r\n") + session.send(b"Subject: x\r\n\r\nhi\r\n.\r\n")
    assert b"250 2.0.0 Ok: queued as" in replies
    assert replies.endswith(b"421 4.3.2 Error: service shutting down, try again later\r\n")
    assert len(session.accepted) == 1 and session.transport.disconnecting
    _closed(session)
    assert done == [None]


def test_after_the_grace_a_transaction_is_cut_off_unacknowledged_and_nothing_is_kept():
    session = Session()
    session.ready()
    session.send(b"MAIL FROM:<a@example.test>\r\nRCPT TO:<b@localhost>\r\nDATA\r\nSubject: x\r\n\r\npart")
    session.factory.shutdown(5)
    session.take()
    session.clock.advance(5)
    assert session.take() == b"421 4.3.2 Error: service shutting down, try again later\r\n"
    assert session.transport.disconnecting and session.accepted == []
    assert session.store.messages == {} and all(incoming.aborted for incoming in session.store.incoming)


def test_shutdown_with_no_session_fires_at_once():
    session = Session()
    _closed(session)
    done = []
    session.factory.shutdown(30).addCallback(done.append)
    assert done == [None]


# -- graceful stop: the relay -------------------------------------------------------


class Slow(Service):
    """A child whose stop never ends: a delivery stuck in flight."""

    def stopService(self):
        super().stopService()
        return Deferred()


def test_the_relay_stops_within_the_grace_abandoning_what_still_runs():
    clock = Clock()
    top, listener, fatal = relay(succeed(0))
    top.settings.shutdown_grace = 3.0
    top.clock = clock
    top.scheduler.stopService = Slow().stopService  # deliveries in flight that never end
    top.startService()
    stopped = []
    top.stopService().addCallback(stopped.append)
    assert not listener.running and not stopped
    clock.advance(3)
    assert stopped


def test_a_listener_that_cannot_bind_stops_start_up_with_one_line():
    class Taken:
        _port = 25
        _interface = "127.0.0.1"

        def listen(self, factory):
            from twisted.internet.error import CannotListenError

            return fail(CannotListenError("127.0.0.1", 25, OSError(errno.EADDRINUSE, "Address already in use")))

    top, listener, fatal = relay(Deferred())
    bound = Listener(Taken(), object())
    bound.setName("listener:smtp")
    bound.setServiceParent(top)
    lines = []

    def failed(message):
        lines.append(message)
        raise SystemExit(1)

    top.startupFailed = failed
    try:
        top.privilegedStartService()
    except SystemExit:
        pass
    assert lines == ["listener:smtp: cannot listen on 127.0.0.1:25: Address already in use"]


def test_an_unusable_state_dir_is_one_config_error(tmp_path):
    from relay.errors import ConfigError
    from relay.service import _usableStateDir

    blocker = tmp_path / "file"
    blocker.write_text("")
    settings = SimpleNamespace(path=tmp_path / "relay.ini", state_dir=blocker / "var")
    try:
        _usableStateDir(settings)
    except ConfigError as e:
        assert str(e).startswith(f"{tmp_path / 'relay.ini'}: [relay] state_dir: cannot use {blocker / 'var'}")
    else:
        raise AssertionError("no error")


def test_an_attempt_cut_off_by_the_stop_is_logged_as_abandoned():
    # Its outcome is never stored, so the next start tries it again: if the
    # next hop had already said 250, that is a second copy, and the operator
    # reading the log must be able to tell which message it was.
    from twisted.logger import formatEvent, globalLogPublisher

    from tests.test_scheduler import OK, ScriptedBackend, queue

    clock = Clock()
    clock.advance(1000)
    store = MemoryQueueStore()
    backend = ScriptedBackend({"r@x.example": [OK]})
    backend.hold = Deferred()  # the next hop never answers
    scheduler = Scheduler(store, Router(lambda domain: "local", {"local": backend}), clock, (60.0,), 3600.0)
    settings = SimpleNamespace(queue=SimpleNamespace(path=Path("/var/relay/queue")), shutdown_grace=3.0)
    top = RelayService(settings, store, scheduler)
    top.clock = clock
    scheduler.setServiceParent(top)
    top.startService()
    envelope = queue(store, clock, "r@x.example")
    scheduler.enqueue(envelope)
    clock.advance(0)
    assert backend.calls and scheduler.attemptsInFlight() == {envelope.queue_id: {("local", "x.example")}}
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        stopped: list[object] = []
        top.stopService().addCallback(stopped.append)
        clock.advance(2.9)
        assert not [e for e in events if e.get("relay_event") == "abandoned"]  # within the grace: not yet
        clock.advance(0.2)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert stopped
    lines = [formatEvent(e) for e in events if e.get("relay_event") == "abandoned"]
    assert lines == [
        f"event=abandoned queue_id={envelope.queue_id} backend=local domain=x.example"
        ' note="not stored: tried again at the next start, twice over if already delivered"'
    ]
    assert envelope.queue_id in store.messages  # still queued, unmarked
