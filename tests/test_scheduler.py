"""The scheduler: due times, retries, per-recipient outcomes, recovery."""

from __future__ import annotations

import email
import email.policy
import random

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher

from relay.delivery.router import Router
from relay.envelope import DeliveryResult, Envelope, Recipient, RecipientState, Status
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


def setup(answers, retry=(60.0, 300.0), maxAge=3600.0, concurrency=20, destinationConcurrency=20):
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
    )
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
    assert envelope.recipients[0].state is RecipientState.FAILED
    assert store.messages == {}


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


def test_recovered_messages_due_now_and_done_ones_removed():
    clock, store, backend, scheduler = setup({"a@x.example": [OK]})
    pending = queue(store, clock, "a@x.example")
    done = queue(store, clock, "b@x.example")
    done.recipients[0].state = RecipientState.DELIVERED
    store.update(done)
    scheduler.recovered(store.recover())
    clock.advance(0)
    assert [c[0] for c in backend.calls] == [pending.queue_id]
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
