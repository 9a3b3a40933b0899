"""The scheduler: due times, retries, per-recipient outcomes, recovery."""

from __future__ import annotations

import email
import email.policy
import random

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher

from relay.delivery.router import Router
from relay.envelope import DeliveryResult, Envelope, QueueScan, Recipient, RecipientState, Status
from relay.queue.memory import MemoryQueueStore
from relay.queue.scheduler import Scheduler

OK = Status(250, "2.0.0", "ok")
LATER = Status(451, "4.4.1", "try later")
NEVER = Status(550, "5.1.1", "no such user")


class ScriptedBackend:
    """Answers each recipient from a table; records every attempt."""

    def __init__(self, answers: dict[str, list[Status]]) -> None:
        self.answers = answers
        self.calls: list[tuple[str, list[str], bytes]] = []
        self.hold: Deferred | None = None

    def deliver(self, envelope, recipients, openData):
        with openData() as f:
            data = f.read()
        self.calls.append((envelope.queue_id, [r.address for r in recipients], data))
        results = [DeliveryResult(r.address, self.answers[r.address].pop(0)) for r in recipients]
        if self.hold is not None:
            self.hold.addCallback(lambda _: results)
            return self.hold
        return results

    def stop(self):
        pass


def setup(answers, retry=(60.0, 300.0), maxAge=3600.0, concurrency=20, destinationConcurrency=20, **kw):
    clock = Clock()
    clock.advance(1000)
    store = MemoryQueueStore()
    backend = ScriptedBackend(answers)
    router = Router(lambda domain: "local" if domain != "unrouted.example" else None, {"local": backend})
    scheduler = Scheduler(
        store,
        router,
        clock,
        retry,
        maxAge,
        concurrency=concurrency,
        destinationConcurrency=destinationConcurrency,
        jitter=0.0,
        rng=random.Random(1),
        **kw,
    )
    scheduler.recovered(0)
    return clock, store, backend, scheduler


def queue(store, clock, *addresses, data=b"Subject: x\r\n\r\nbody\r\n"):
    incoming = store.begin()
    incoming.write(data)
    envelope = Envelope(incoming.queue_id, "s@example.org", [Recipient(a) for a in addresses], clock.seconds())
    incoming.commit(envelope)
    return envelope


def test_delivered_at_once_and_removed():
    clock, store, backend, scheduler = setup({"a@x.example": [OK], "b@x.example": [OK]})
    envelope = queue(store, clock, "a@x.example", "b@x.example")
    scheduler.enqueue(envelope)
    clock.advance(0)
    assert backend.calls == [(envelope.queue_id, ["a@x.example", "b@x.example"], b"Subject: x\r\n\r\nbody\r\n")]
    assert store.messages == {}
    assert scheduler.queued() == 0


def test_temporary_failure_retried_on_schedule_only_failed_recipient():
    clock, store, backend, scheduler = setup({"a@x.example": [OK], "b@x.example": [LATER, LATER, OK]})
    envelope = queue(store, clock, "a@x.example", "b@x.example")
    scheduler.enqueue(envelope)
    clock.advance(0)
    stored = store.messages[envelope.queue_id][0]
    assert [r.state for r in stored.recipients] == [RecipientState.DELIVERED, RecipientState.PENDING]
    assert stored.recipients[1].next_attempt == 1060.0
    assert stored.recipients[1].last_status == LATER
    clock.advance(59)
    assert len(backend.calls) == 1
    clock.advance(1)
    assert backend.calls[1][1] == ["b@x.example"]
    clock.advance(299)
    assert len(backend.calls) == 2
    clock.advance(1)  # the last retry interval repeats: 300 s
    assert backend.calls[2][1] == ["b@x.example"]
    assert store.messages == {}


def test_permanent_failure_not_retried():
    clock, store, backend, scheduler = setup({"a@x.example": [NEVER]})
    envelope = queue(store, clock, "a@x.example")
    scheduler.enqueue(envelope)
    clock.advance(0)
    clock.advance(10_000)
    assert len(backend.calls) == 1
    assert envelope.recipients[0].state is RecipientState.FAILED


def test_expires_after_max_age():
    clock, store, backend, scheduler = setup({"a@x.example": [LATER] * 100}, retry=(600.0,), maxAge=1800.0)
    envelope = queue(store, clock, "a@x.example")
    scheduler.enqueue(envelope)
    clock.advance(0)
    for _ in range(10):
        clock.advance(600)
    assert len(backend.calls) == 4  # at 0, 600, 1200, 1800: expired at the fourth
    assert store.messages == {}  # given up (and removed), not retried for ever


def test_unrouted_recipient_is_deferred_not_lost():
    clock, store, backend, scheduler = setup({})
    envelope = queue(store, clock, "a@unrouted.example")
    scheduler.enqueue(envelope)
    clock.advance(0)
    assert envelope.recipients[0].state is RecipientState.PENDING
    assert envelope.recipients[0].last_status.enhanced == "4.3.5"


def test_unrouted_report_is_given_up_at_once_with_a_log_line():
    """A report is never bounced: retrying it until max_age would only end in dropping it."""
    clock, store, backend, scheduler = setup({})
    scheduler.reportingMTA = "relay.test"
    incoming = store.begin()
    incoming.write(b"Subject: report\r\n\r\nbody\r\n")
    report = Envelope(incoming.queue_id, "", [Recipient("forged@unrouted.example")], clock.seconds())
    incoming.commit(report)
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        scheduler.enqueue(report)
        clock.advance(0)
    finally:
        globalLogPublisher.removeObserver(events.append)
    [recipient] = report.recipients
    assert recipient.state is RecipientState.FAILED
    assert (recipient.last_status.code, recipient.last_status.enhanced) == (550, "5.4.4")
    assert store.messages == {} and scheduler.queued() == 0
    assert backend.calls == []
    dropped = [formatEvent(e) for e in events if "dropped undeliverable report" in e.get("log_format", "")]
    assert dropped == [
        f"dropped undeliverable report {report.queue_id} to=<forged@unrouted.example>: "
        "550 5.4.4 No route for recipient domain"
    ]


def test_backend_raising_defers_its_recipients():
    clock, store, backend, scheduler = setup({})
    envelope = queue(store, clock, "boom@x.example")  # KeyError in the scripted backend
    scheduler.enqueue(envelope)
    clock.advance(0)
    assert envelope.recipients[0].state is RecipientState.PENDING
    assert envelope.recipients[0].last_status.code == 451
    assert envelope.queue_id in store.messages


def test_hanging_backend_times_out():
    clock, store, backend, scheduler = setup({"a@x.example": [OK]})
    backend.hold = Deferred()
    envelope = queue(store, clock, "a@x.example")
    scheduler.enqueue(envelope)
    clock.advance(0)
    assert envelope.recipients[0].attempts == 0
    clock.advance(601)
    assert envelope.recipients[0].state is RecipientState.PENDING
    assert envelope.recipients[0].last_status.code == 451


def test_concurrency_limit():
    clock, store, backend, scheduler = setup({f"r{i}@x.example": [OK] for i in range(5)}, concurrency=2)
    backend.hold = Deferred()
    for i in range(5):
        scheduler.enqueue(queue(store, clock, f"r{i}@x.example"))
    clock.advance(0)
    assert len(backend.calls) == 2
    held, backend.hold = backend.hold, None
    held.callback(None)
    clock.advance(0)
    assert len(backend.calls) == 5
    assert store.messages == {}


def test_destination_concurrency_limit():
    """A busy destination waits for its own slots; other destinations go on."""
    answers = {f"r{i}@x.example": [OK] for i in range(5)}
    answers.update({f"r{i}@y.example": [OK] for i in range(2)})
    clock, store, backend, scheduler = setup(answers, destinationConcurrency=2)
    backend.hold = Deferred()
    for address in answers:
        scheduler.enqueue(queue(store, clock, address))
    clock.advance(0)
    assert sorted(c[1][0].split("@")[1] for c in backend.calls) == ["x.example"] * 2 + ["y.example"] * 2
    assert scheduler.busy() == {("local", "x.example"): 2, ("local", "y.example"): 2}
    held, backend.hold = backend.hold, None
    held.callback(None)
    clock.advance(0)
    assert len(backend.calls) == 7
    assert store.messages == {}
    assert scheduler.busy() == {}


class SlowRemoves(MemoryQueueStore):
    """Removes answer only when the test says: a queue whose next batch of fsyncs is still to come."""

    def __init__(self) -> None:
        super().__init__()
        self.pending: list[Deferred[None]] = []

    def remove(self, queueID):
        d: Deferred[None] = Deferred()
        d.addCallback(lambda _: super(SlowRemoves, self).remove(queueID))
        self.pending.append(d)
        return d


def test_destination_slot_is_free_once_answered_not_once_stored():
    """
    With one slot for x.example, the second message goes as soon as the first
    has its 250, while the first's removal is still waiting on the store; the
    first still counts as an attempt in flight until it is stored.
    """
    clock, _, backend, _ = setup({})
    store = SlowRemoves()
    backend = ScriptedBackend({"a@x.example": [OK], "b@x.example": [OK]})
    router = Router(lambda domain: "local", {"local": backend})
    scheduler = Scheduler(store, router, clock, (60.0, 300.0), 3600.0, destinationConcurrency=1, jitter=0.0)
    scheduler.recovered(0)
    first = queue(store, clock, "a@x.example")
    second = queue(store, clock, "b@x.example")
    scheduler.enqueue(first)
    scheduler.enqueue(second)
    clock.advance(0)
    assert [c[0] for c in backend.calls] == [first.queue_id, second.queue_id]
    assert len(store.pending) == 2 and set(store.messages) == {first.queue_id, second.queue_id}
    assert set(scheduler.attemptsInFlight()) == {first.queue_id, second.queue_id}
    assert scheduler.busy() == {}
    for d in store.pending:
        d.callback(None)
    assert store.messages == {} and scheduler.attemptsInFlight() == {}


def test_message_for_two_destinations_waits_for_the_full_one():
    clock, store, backend, scheduler = setup(
        {"a@x.example": [OK, OK], "b@y.example": [OK], "c@x.example": [OK]}, destinationConcurrency=1
    )
    backend.hold = Deferred()
    first = queue(store, clock, "a@x.example")
    both = queue(store, clock, "b@y.example", "c@x.example")
    scheduler.enqueue(first)
    scheduler.enqueue(both)
    clock.advance(0)
    assert [c[0] for c in backend.calls] == [first.queue_id]
    held, backend.hold = backend.hold, None
    held.callback(None)
    clock.advance(0)
    assert [c[0] for c in backend.calls] == [first.queue_id, both.queue_id]
    assert store.messages == {}


def test_stop_waits_for_running_attempts():
    clock, store, backend, scheduler = setup({"a@x.example": [OK]})
    scheduler.startService()
    backend.hold = Deferred()
    scheduler.enqueue(queue(store, clock, "a@x.example"))
    clock.advance(0)
    stopped = scheduler.stopService()
    assert isinstance(stopped, Deferred) and not stopped.called
    backend.hold.callback(None)
    assert stopped.called


# -- delivery status notifications ------------------------------------------------


def reporting(answers, **kw):
    clock, store, backend, scheduler = setup(answers, **kw)
    scheduler.reportingMTA = "relay.test"
    return clock, store, backend, scheduler


def reportsSent(backend):
    sent = []
    for _, addresses, data in backend.calls:
        message = email.message_from_bytes(data, policy=email.policy.default)
        if message.get_content_type() == "multipart/report":
            status = [p for p in message.walk() if p.get_content_type() == "message/delivery-status"][0]
            actions = [block["Action"] for block in status.get_payload()[1:]]
            sent.append((addresses, actions))
    return sent


def test_permanent_failure_bounces_to_the_sender():
    clock, store, backend, scheduler = reporting({"a@x.example": [NEVER], "b@x.example": [OK], "s@example.org": [OK]})
    scheduler.enqueue(queue(store, clock, "a@x.example", "b@x.example"))
    clock.advance(0)
    clock.advance(0)
    assert reportsSent(backend) == [(["s@example.org"], ["failed"])]
    assert store.messages == {}


def test_bounce_of_a_bounce_is_dropped():
    clock, store, backend, scheduler = reporting({"a@x.example": [NEVER], "s@example.org": [NEVER]})
    scheduler.enqueue(queue(store, clock, "a@x.example"))
    for _ in range(3):
        clock.advance(0)
    assert [c[1] for c in backend.calls] == [["a@x.example"], ["s@example.org"]]
    assert store.messages == {}


def test_notify_never_and_success():
    clock, store, backend, scheduler = reporting({"a@x.example": [NEVER], "b@x.example": [OK], "s@example.org": [OK]})
    envelope = queue(store, clock, "a@x.example", "b@x.example")
    envelope.recipients[0].notify = ("NEVER",)
    envelope.recipients[1].notify = ("SUCCESS",)
    scheduler.enqueue(envelope)
    clock.advance(0)
    clock.advance(0)
    assert reportsSent(backend) == [(["s@example.org"], ["delivered"])]


def test_one_delay_warning_after_warn_after():
    clock, store, backend, scheduler = reporting(
        {"a@x.example": [LATER] * 10 + [OK], "s@example.org": [OK]}, retry=(600.0,), maxAge=86400.0
    )
    scheduler.warnAfter = 1000.0
    scheduler.enqueue(queue(store, clock, "a@x.example"))
    clock.advance(0)
    for _ in range(6):
        clock.advance(600)
    assert reportsSent(backend) == [(["s@example.org"], ["delayed"])]
    assert any(e.extra.get("delay_warned") for e, _ in store.messages.values())


def test_hold_keeps_everything_queued():
    clock, store, backend, scheduler = setup({"a@x.example": [OK]})
    scheduler.hold = True
    envelope = queue(store, clock, "a@x.example")
    scheduler.enqueue(envelope)
    clock.advance(86400)
    assert backend.calls == []
    assert list(store.messages) == [envelope.queue_id]
    assert scheduler.queued() == 1


# -- the active set, scans and recovery --------------------------------------------


class Timed(ScriptedBackend):
    """Also records when each attempt was made and how many envelopes the scheduler held then."""

    def __init__(self, answers, clock) -> None:
        super().__init__(answers)
        self.clock = clock
        self.scheduler = None
        self.times: dict[str, list[float]] = {}
        self.heldAtAttempt: list[int] = []

    def deliver(self, envelope, recipients, openData):
        self.times.setdefault(envelope.queue_id, []).append(self.clock.seconds())
        self.heldAtAttempt.append(self.scheduler.held())
        return super().deliver(envelope, recipients, openData)


def restarted(store, clock, answers, count=None, **kw):
    """A scheduler started on C{store}, as after a restart: nothing in memory."""
    backend = Timed(answers, clock)
    router = Router(lambda domain: "local", {"local": backend})
    kw.setdefault("jitter", 0.0)
    scheduler = Scheduler(store, router, clock, kw.pop("retry", (60.0,)), kw.pop("maxAge", 86400.0), **kw)
    backend.scheduler = scheduler
    scheduler.recovered(len(store.messages) if count is None else count)
    return backend, scheduler


def stored(store, clock, address, receivedAt, nextAttempt=None, attempts=0):
    incoming = store.begin()
    incoming.write(b"Subject: " + address.encode() + b"\r\n\r\nbody\r\n")
    envelope = Envelope(incoming.queue_id, "s@example.org", [Recipient(address)], receivedAt)
    incoming.commit(envelope)
    if nextAttempt is not None:
        envelope.recipients[0].next_attempt = nextAttempt
        envelope.recipients[0].attempts = attempts
        store.update(envelope)
    return envelope


class LogLines:
    def __init__(self) -> None:
        self.events: list[dict] = []

    def __enter__(self) -> LogLines:
        globalLogPublisher.addObserver(self.events.append)
        return self

    def __exit__(self, *exc) -> None:
        globalLogPublisher.removeObserver(self.events.append)

    def matching(self, fragment: str) -> list[str]:
        return [formatEvent(e) for e in self.events if fragment in e.get("log_format", "")]


def test_active_set_is_bounded_and_everything_goes_in_due_order():
    clock = Clock()
    clock.advance(10_000)
    store = MemoryQueueStore()
    addresses = [f"r{i}@x.example" for i in range(100)]
    rng = random.Random(7)
    arrivals = {a: 5_000.0 + rng.uniform(0, 4_000) for a in addresses}
    for address in addresses:
        stored(store, clock, address, arrivals[address])
    backend, scheduler = restarted(store, clock, {a: [OK] for a in addresses}, activeLimit=10, recoverySpread=0.0)
    for _ in range(30):
        assert scheduler.held() <= 10
        clock.advance(1)
    assert store.messages == {} and scheduler.queued() == 0 and scheduler.held() == 0
    assert max(backend.heldAtAttempt) <= 10
    delivered = [c[1][0] for c in backend.calls]
    assert delivered == sorted(addresses, key=arrivals.__getitem__)  # earliest due first
    assert scheduler.scans <= 12, scheduler.scans  # ten refills of ten, not one scan per message


def test_commits_beyond_the_active_set_stay_on_disk_until_there_is_room():
    clock, store, backend, scheduler = setup({f"r{i}@x.example": [OK] for i in range(7)}, activeLimit=3)
    backend.hold = Deferred()
    for i in range(7):
        scheduler.enqueue(queue(store, clock, f"r{i}@x.example"))
    assert scheduler.held() == 3 and scheduler.queued() == 7 and len(store.messages) == 7
    clock.advance(0)
    assert len(backend.calls) == 3
    held, backend.hold = backend.hold, None
    held.callback(None)
    clock.advance(0)
    clock.advance(1)  # the refill scan waits a scan spacing after the last
    clock.advance(1)
    assert len(backend.calls) == 7 and store.messages == {} and scheduler.queued() == 0
    assert scheduler.scans <= 3


def test_scans_are_sparing_when_nothing_happens():
    clock, store, backend, scheduler = setup({})
    for _ in range(3600):
        clock.advance(1)
    assert scheduler.scans == 12  # the periodic rescan alone, every five minutes


def test_deferred_message_leaves_memory_and_comes_back_when_due():
    clock, store, backend, scheduler = setup({"a@x.example": [LATER, OK]}, retry=(600.0,))
    envelope = queue(store, clock, "a@x.example")
    scheduler.enqueue(envelope)
    clock.advance(0)
    assert scheduler.held() == 0 and scheduler.queued() == 1  # on disk only, with its next attempt
    assert store.messages[envelope.queue_id][0].recipients[0].next_attempt == 1600.0
    clock.advance(599)
    assert len(backend.calls) == 1
    clock.advance(1)
    assert len(backend.calls) == 2 and store.messages == {}
    assert scheduler.scans <= 3  # two periodic ones and the one at its due time


def test_deferred_message_due_soon_stays_in_memory():
    clock, store, backend, scheduler = setup({"a@x.example": [LATER, OK]}, retry=(30.0,))
    scheduler.enqueue(queue(store, clock, "a@x.example"))
    clock.advance(0)
    assert scheduler.held() == 1
    clock.advance(30)
    assert len(backend.calls) == 2 and store.messages == {}
    assert scheduler.scans == 0


def test_recovery_honours_stored_next_attempts_and_spreads_the_due_ones():
    clock = Clock()
    clock.advance(100_000)
    start = clock.seconds()
    store = MemoryQueueStore()
    due = [stored(store, clock, f"due{i}@x.example", start - 5_000 + i) for i in range(40)]
    later = [
        stored(store, clock, f"later{i}@x.example", start - 9_000, nextAttempt=start + 100 * (i + 1), attempts=1)
        for i in range(10)
    ]
    answers = {e.recipients[0].address: [OK] for e in due + later}
    backend, scheduler = restarted(store, clock, answers, recoveryRate=10.0, rng=random.Random(3))
    # 50 messages at 10 a second: those already due are spread over 5 seconds.
    for _ in range(1100):
        clock.advance(1)
    assert store.messages == {}
    dueTimes = [backend.times[e.queue_id][0] - start for e in due]
    assert all(0 <= t <= 5 for t in dueTimes), dueTimes
    assert len({round(t) for t in dueTimes}) >= 4  # spread, not one burst
    for i, envelope in enumerate(later):
        [attempted] = backend.times[envelope.queue_id]
        assert start + 100 * (i + 1) <= attempted <= start + 100 * (i + 1) + 1  # never early, hardly late


def test_new_message_during_a_recovery_spread_goes_at_once():
    clock = Clock()
    clock.advance(100_000)
    store = MemoryQueueStore()
    old = [stored(store, clock, f"old{i}@x.example", 50_000.0) for i in range(600)]
    answers = {e.recipients[0].address: [OK] for e in old}
    answers["new@x.example"] = [OK]
    backend, scheduler = restarted(store, clock, answers, rng=random.Random(5))
    clock.advance(0)
    fresh = queue(store, clock, "new@x.example")
    scheduler.enqueue(fresh)
    clock.advance(0)
    assert backend.times[fresh.queue_id] == [100_000.0]
    assert len(backend.calls) < 100  # the 600 old ones are spread over 3 seconds
    for _ in range(5):
        clock.advance(1)
    assert store.messages == {}


def test_update_failure_keeps_the_message_and_retries_the_update_before_delivering_again():
    clock, store, backend, scheduler = setup({"a@x.example": [OK], "b@x.example": [LATER, OK]}, retry=(60.0,))
    envelope = queue(store, clock, "a@x.example", "b@x.example")
    store.failUpdates = True
    with LogLines() as log:
        scheduler.enqueue(envelope)
        clock.advance(0)
        clock.advance(5)  # tried again after 5 s, then 10 s, 20 s...
        clock.advance(10)
        clock.advance(20)
        clock.advance(40)  # past the recipient's next attempt: still not attempted while unsaved
    assert len(backend.calls) == 1
    assert scheduler.held() == 1
    assert [r.state for r in store.messages[envelope.queue_id][0].recipients] == [RecipientState.PENDING] * 2
    lines = log.matching("could not {operation}")
    assert lines[0] == f"could not update {envelope.queue_id}: [Errno 5] Input/output error; trying again in 5s"
    assert len(lines) == 5
    store.failUpdates = False
    clock.advance(80)
    # Stored at last, then delivered to the one recipient still pending: a@ is not sent twice.
    assert [c[1] for c in backend.calls] == [["a@x.example", "b@x.example"], ["b@x.example"]]
    assert store.messages == {} and scheduler.held() == 0 and scheduler.queued() == 0


def test_remove_failure_is_logged_and_retried_never_delivered_again():
    clock, store, backend, scheduler = setup({"a@x.example": [OK]})
    envelope = queue(store, clock, "a@x.example")
    store.failRemoves = True
    with LogLines() as log:
        scheduler.enqueue(envelope)
        clock.advance(0)
        for _ in range(4):
            clock.advance(300)  # periodic scans meanwhile: the message is not loaded again
    assert len(backend.calls) == 1
    assert envelope.queue_id in store.messages and scheduler.held() == 1
    assert log.matching("could not {operation}")[0] == (
        f"could not remove {envelope.queue_id}: [Errno 5] Input/output error; trying again in 5s"
    )
    store.failRemoves = False
    clock.advance(300)
    assert store.messages == {} and scheduler.held() == 0 and scheduler.queued() == 0
    assert len(backend.calls) == 1


class Damaging(MemoryQueueStore):
    """A memory store with a damaged message, one removed behind our back, and one done but not removed."""

    def __init__(self) -> None:
        super().__init__()
        self.damaged: set[str] = set()
        self.vanished: set[str] = set()

    def scan(self, before, limit, exclude):
        scan = super().scan(before, limit, exclude)
        found = []
        scan.addCallback(found.append)
        [result] = found
        extra = [(1.0, q) for q, (e, _) in self.messages.items() if not e.pending() and q not in exclude]
        return succeed(QueueScan(extra + result.due + [(1.0, q) for q in self.vanished], result.total, result.later))

    def load(self, queueID):
        if queueID in self.damaged:
            return fail(ValueError(f"damaged envelope {queueID}: set aside"))
        return super().load(queueID)


def test_load_failures_skip_the_message_with_a_log_line():
    clock = Clock()
    clock.advance(10_000)
    store = Damaging()
    good = stored(store, clock, "good@x.example", 9_000.0)
    bad = stored(store, clock, "bad@x.example", 9_000.0)
    done = stored(store, clock, "done@x.example", 9_000.0)
    done.recipients[0].state = RecipientState.DELIVERED
    store.update(done)
    store.damaged.add(bad.queue_id)
    store.vanished.add("M-gone")
    with LogLines() as log:
        backend, scheduler = restarted(store, clock, {"good@x.example": [OK]})
        clock.advance(1)
    assert [c[0] for c in backend.calls] == [good.queue_id]
    assert log.matching("skipped damaged message") == [
        f"skipped damaged message {bad.queue_id}: damaged envelope {bad.queue_id}: set aside"
    ]
    assert list(store.messages) == [bad.queue_id]  # the done one was removed, the damaged one left alone
    assert not log.matching("went wrong")  # the vanished one is no error
    assert scheduler.held() == 0


def test_hold_keeps_nothing_in_memory_and_never_scans():
    clock, store, backend, scheduler = setup({"a@x.example": [OK]}, hold=True)
    for _ in range(3):
        scheduler.enqueue(queue(store, clock, "a@x.example"))
    for _ in range(3600):
        clock.advance(1)
    assert (scheduler.held(), scheduler.queued(), scheduler.scans) == (0, 3, 0)


def uncounted(store, clock, answers, **kw):
    """A scheduler started on C{store} whose recovery did not count the queue (recover() fired with None)."""
    backend = Timed(answers, clock)
    router = Router(lambda domain: "local", {"local": backend})
    scheduler = Scheduler(store, router, clock, (60.0,), 86400.0, jitter=0.0, **kw)
    backend.scheduler = scheduler
    scheduler.recovered(None)
    return backend, scheduler


def test_a_queue_recovery_did_not_count_is_counted_and_spread_by_the_first_scan():
    clock = Clock()
    clock.advance(100_000)
    start = clock.seconds()
    store = MemoryQueueStore()
    due = [stored(store, clock, f"due{i}@x.example", start - 5_000 + i) for i in range(50)]
    answers = {e.recipients[0].address: [OK] for e in due}
    with LogLines() as log:
        backend, scheduler = uncounted(store, clock, answers, recoveryRate=10.0, rng=random.Random(3))
        assert scheduler.queued() == 0
        clock.advance(0)
    assert scheduler.scans == 1 and scheduler.queued() == 50  # the first scan ran at once and counted
    assert log.matching("recovered") == [
        "recovered the queue; its first scan counts it",
        "recovered 50 queued messages",
    ]
    for _ in range(60):
        clock.advance(1)
    assert store.messages == {} and scheduler.queued() == 0
    # 50 messages at 10 a second, as if recovery had counted them: spread over 5 seconds.
    dueTimes = [backend.times[e.queue_id][0] - start for e in due]
    assert all(0 <= t <= 5 for t in dueTimes), dueTimes
    assert len({round(t) for t in dueTimes}) >= 4


def test_hold_counts_a_queue_recovery_did_not_count_with_one_scan_and_loads_nothing():
    clock = Clock()
    clock.advance(100_000)
    store = MemoryQueueStore()
    for i in range(3):
        stored(store, clock, f"held{i}@x.example", clock.seconds())
    backend, scheduler = uncounted(store, clock, {}, hold=True)
    scheduler.enqueue(queue(store, clock, "new@x.example"))
    for _ in range(3600):
        clock.advance(1)
    assert (scheduler.held(), scheduler.queued(), scheduler.scans, backend.calls) == (0, 4, 1, [])


class ResultLike:
    """What a third-party backend may hand back instead of a DeliveryResult: no relay attribute at all."""

    def __init__(self, recipient: str, status: Status) -> None:
        self.recipient, self.status, self.dsnPassed = recipient, status, None


def test_relay_is_logged_when_the_backend_names_one_and_left_out_otherwise():
    clock, store, backend, scheduler = setup({})
    answers = {
        "a@x.example": DeliveryResult("a@x.example", OK, relay="192.0.2.7:25"),
        "b@x.example": DeliveryResult("b@x.example", Status(451, "4.2.1", "busy"), relay="[2001:db8::7]:2525"),
        "c@x.example": DeliveryResult("c@x.example", OK),
        "d@x.example": ResultLike("d@x.example", OK),
    }
    backend.deliver = lambda envelope, recipients, openData: [answers[r.address] for r in recipients]
    with LogLines() as lines:
        scheduler.enqueue(queue(store, clock, *answers))
        clock.advance(0)
    logged = {line.split(" to=<")[1].split(">")[0]: line for line in lines.matching("event=")}
    assert "to=<a@x.example> backend=local relay=192.0.2.7:25 code=250" in logged["a@x.example"]
    assert "event=deferred" in logged["b@x.example"]
    assert "backend=local relay=[2001:db8::7]:2525 code=451" in logged["b@x.example"]
    assert "to=<c@x.example> backend=local code=250" in logged["c@x.example"]
    assert "to=<d@x.example> backend=local code=250" in logged["d@x.example"]


def test_the_oldest_age_counts_mail_left_on_disk():
    # Deferred mail the active set does not hold is still the oldest in the
    # queue: the operator's "oldest queued age" must not look young.
    clock = Clock()
    clock.advance(10_000)
    store = MemoryQueueStore()
    stored(store, clock, "old@x.example", 4_000.0, nextAttempt=50_000.0)  # on disk, due much later
    stored(store, clock, "new@x.example", 9_000.0)
    backend, scheduler = restarted(store, clock, {"new@x.example": [OK]}, recoverySpread=0.0)
    clock.advance(1)
    assert [c[1][0] for c in backend.calls] == ["new@x.example"]
    assert scheduler.held() == 0 and scheduler.queued() == 1  # the old one waits on disk, not in memory
    assert scheduler.oldestAge() == 6_001.0  # arrived at 4,000: known from the scan, not the active set


# -- a store shared by several relays (the postgres store's claims) ------


@pytest.fixture
def sharedNodes(pgcluster, tmp_path):
    """
    Two relays, a and b, on one PostgreSQL schema: a store, a scheduler and
    a backend each, one clock.  The stores answer inline; leases last 60 s
    of the database's time (a test ends them in SQL).  Stopped at the end.
    """
    from relay.testing.queuestore import resolve

    stores = []

    def make(answers):
        dsn, clock, nodes = _sharedNodes(pgcluster, tmp_path, answers)
        stores.extend(store for store, _, _ in nodes.values())
        return dsn, clock, nodes

    yield make
    for store in stores:
        resolve(store.stop())


def _sharedNodes(pgcluster, tmp_path, answers):
    pytest.importorskip("psycopg")
    from relay.plugin import PluginContext
    from relay.plugins.postgres import postgres
    from relay.testing.queuestore import resolve

    dsn = pgcluster.createSchema()
    clock = Clock()
    clock.advance(1000)
    nodes = {}
    for name in ("a", "b"):
        context = PluginContext(reactor=clock, hostname=name, postmaster="p@h", state_dir=tmp_path)
        store = postgres.build({"path": str(tmp_path / name), "dsn": dsn, "node": name, "lease": "60s"}, context)
        resolve(store.recover())
        backend = ScriptedBackend({address: list(statuses) for address, statuses in answers.items()})
        router = Router(lambda domain: "local", {"local": backend})
        scheduler = Scheduler(store, router, clock, (60.0,), 86400.0, jitter=0.0, claimWaits=(1.0, 1.0))
        nodes[name] = (store, backend, scheduler)
    return dsn, clock, nodes


def expireLeases(dsn):
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE messages SET lease_until = now() - interval '1 second'")


def test_shared_store_two_schedulers_deliver_each_message_once(sharedNodes):
    """
    Both nodes hold the same messages in memory (a's leases ended, as if a
    had restarted); a's attempts are in flight when b's fall due: b's claims
    find a's leases and b forgets them; once a has delivered, the messages
    are gone and nothing goes twice.
    """
    answers = {f"r{i}@x.example": [OK] for i in range(6)}
    dsn, clock, nodes = sharedNodes(answers)
    (storeA, backendA, a), (storeB, backendB, b) = nodes["a"], nodes["b"]
    queued = [queue(storeA, clock, f"r{i}@x.example") for i in range(6)]
    expireLeases(dsn)
    backendA.hold = Deferred()
    a.recovered(None)
    clock.advance(1)  # a scans, loads and attempts all six (spread over 0.03 s): held by its backend
    b.recovered(None)
    clock.advance(1)  # b's scan: a holds the leases, so b sees none of them
    assert b.held() == 0 and a.inFlight() == 6
    # b learns of them another way (as if its scan ran before a's claims): its claims find a's leases.
    for envelope in queued:
        b.enqueue(envelope)
    clock.advance(1)
    assert backendB.calls == [] and b.held() == 0
    backendA.hold.callback(None)
    clock.advance(61)
    b._scan()
    clock.advance(61)
    assert sorted(call[0] for call in backendA.calls) == sorted(e.queue_id for e in queued)
    assert backendB.calls == []
    from relay.testing.queuestore import resolve

    assert resolve(storeB.scan(1e12, 100, ())).total == 0


def test_shared_store_a_dead_nodes_messages_are_delivered_by_another(sharedNodes):
    """a received two messages and died before attempting them: once their leases expire, b's scan takes them."""
    dsn, clock, nodes = sharedNodes({"r@x.example": [OK, OK]})
    (storeA, _, _), (_, backendB, b) = nodes["a"], nodes["b"]
    queued = [queue(storeA, clock, "r@x.example") for _ in range(2)]
    b.recovered(None)
    clock.advance(0)
    assert backendB.calls == []  # born leased by a
    expireLeases(dsn)
    clock.advance(b.rescanInterval)
    assert sorted(call[0] for call in backendB.calls) == sorted(e.queue_id for e in queued)
    assert [call[2] for call in backendB.calls] == [b"Subject: x\r\n\r\nbody\r\n"] * 2  # data fetched by b


def test_shared_store_mail_of_a_node_that_died_after_the_last_scan_is_found_within_a_lease(sharedNodes):
    """
    b's scan saw an empty queue (no lease of a's to wait for); a then
    received a message and died.  b looks again within one lease (the
    store's rescanWithin), not at the periodic rescan five minutes on.
    """
    dsn, clock, nodes = sharedNodes({"r@x.example": [OK]})
    (storeA, _, _), (storeB, backendB, b) = nodes["a"], nodes["b"]
    b.recovered(None)
    clock.advance(0)
    assert b.scans >= 1 and backendB.calls == []
    queued = queue(storeA, clock, "r@x.example")
    expireLeases(dsn)
    assert b.rescanInterval == storeB.rescanWithin < 300
    clock.advance(storeB.rescanWithin)
    assert [call[0] for call in backendB.calls] == [queued.queue_id]


def test_shared_store_the_stored_state_wins_over_memory(sharedNodes):
    """
    b holds a message in memory, due now; a held it meanwhile (an operator
    on a): b's attempt claims it, finds it held and lets it go.  Released on
    a and deferred there, b's stale copy is not attempted before the stored
    next attempt.
    """
    from relay.testing.queuestore import resolve

    dsn, clock, nodes = sharedNodes({"r@x.example": [LATER, OK]})
    (storeA, backendA, a), (storeB, backendB, b) = nodes["a"], nodes["b"]
    a.recovered(0)
    b.recovered(0)
    envelope = queue(storeA, clock, "r@x.example")
    b.enqueue(envelope.copy())  # b's copy, due now, not yet attempted
    results = []
    Deferred.fromCoroutine(a.holdMessage(envelope.queue_id)).addBoth(results.append)
    assert results == [True]
    clock.advance(0)
    assert backendB.calls == [] and b.held() == 0  # held: b forgot it
    assert resolve(storeB.load(envelope.queue_id)).extra == {"held": True}
    # Released and attempted on a (deferred 60 s); b gets a stale copy due now.
    Deferred.fromCoroutine(a.releaseMessage(envelope.queue_id)).addBoth(results.append)
    clock.advance(0)
    assert len(backendA.calls) == 1
    b.enqueue(envelope.copy())
    clock.advance(1)
    assert backendB.calls == []  # the stored next attempt is 59 s away
    assert b.held() == 1  # kept in memory, due then
    clock.advance(60)
    assert len(backendA.calls) + len(backendB.calls) == 2
    assert resolve(storeA.scan(1e12, 10, ())).total == 0


def test_shared_store_operator_waits_for_another_nodes_attempt_then_names_it(sharedNodes):
    """
    An operator's hold on a, while b delivers the message: a waits (its
    claimWaits), then refuses naming b; once b is done, a's delete works,
    and a's listing shows the whole cluster's queue meanwhile.
    """
    from relay.queue.scheduler import OperationRefused, UnknownMessage

    dsn, clock, nodes = sharedNodes({"r@x.example": [LATER], "s@x.example": [OK]})
    (_, _, a), (storeB, backendB, b) = nodes["a"], nodes["b"]
    a.recovered(0)
    b.recovered(0)
    envelope = queue(storeB, clock, "r@x.example")
    backendB.hold = Deferred()
    b.enqueue(envelope)
    clock.advance(0)
    assert b.inFlight() == 1
    listed = []
    Deferred.fromCoroutine(a.listQueue(listed.append)).addBoth(listed.append)
    assert [e.queue_id for e in listed[:-1]] == [envelope.queue_id] and listed[-1] == 1
    results = []
    Deferred.fromCoroutine(a.holdMessage(envelope.queue_id)).addBoth(results.append)
    clock.advance(1)
    assert results == []  # waiting
    clock.advance(1)
    (failure,) = results
    assert failure.check(OperationRefused) and "node b is delivering it now" in str(failure.value)
    backendB.hold.callback(None)  # b's attempt ends: deferred, stored, lease ended
    results = []
    Deferred.fromCoroutine(a.deleteMessage(envelope.queue_id)).addBoth(results.append)
    assert results == [None]
    Deferred.fromCoroutine(a.deleteMessage(envelope.queue_id)).addBoth(results.append)
    assert results[1].check(UnknownMessage)
    clock.advance(120)
    assert len(backendB.calls) == 1  # b's copy was forgotten at its claim: never attempted again
