"""
The operator's commands: the scheduler's queue operations (hold, release,
flush, delete, bounce) against attempts in flight and scans, and the AMP
control protocol between relayctl's client and the relay, over iosim.
"""

from __future__ import annotations

import json
from pathlib import Path

from test_scheduler import LATER, OK, queue, setup
from twisted.internet.defer import Deferred
from twisted.test import iosim

from relay import control
from relay.envelope import RecipientState
from relay.queue.scheduler import HELD_UNTIL, OperationRefused, UnknownMessage


def run(operation, clock) -> object:
    """The result (or Failure) of an operator's command, the clock advanced by zero."""
    results: list = []
    Deferred.fromCoroutine(operation).addBoth(results.append)
    clock.advance(0)
    assert results, "the operation did not finish"
    return results[0]


def test_hold_is_stored_and_never_attempted_until_released():
    clock, store, backend, scheduler = setup({"a@x.example": [LATER, OK]}, retry=(30.0,))
    envelope = queue(store, clock, "a@x.example")
    scheduler.enqueue(envelope)
    clock.advance(0)
    assert len(backend.calls) == 1
    assert run(scheduler.holdMessage(envelope.queue_id), clock) is True
    stored = store.messages[envelope.queue_id][0]
    assert stored.extra["held"] is True and stored.recipients[0].next_attempt == HELD_UNTIL
    clock.advance(3600)  # past every retry and rescan
    assert len(backend.calls) == 1
    assert run(scheduler.flushQueue(), clock) == 0
    assert len(backend.calls) == 1
    assert run(scheduler.holdMessage(envelope.queue_id), clock) is False  # held already
    assert run(scheduler.releaseMessage(envelope.queue_id), clock) is None
    assert len(backend.calls) == 2 and envelope.queue_id not in store.messages


def test_hold_during_an_attempt_waits_for_its_outcome():
    clock, store, backend, scheduler = setup({"a@x.example": [LATER, OK]}, retry=(5.0,))
    backend.hold = Deferred()
    envelope = queue(store, clock, "a@x.example")
    scheduler.enqueue(envelope)
    clock.advance(0)
    results: list = []
    Deferred.fromCoroutine(scheduler.holdMessage(envelope.queue_id)).addBoth(results.append)
    clock.advance(0)
    assert results == []  # the attempt is in flight
    backend.hold.callback(None)
    clock.advance(0)
    assert results == [True]
    stored = store.messages[envelope.queue_id][0]
    assert stored.extra["held"] and stored.recipients[0].attempts == 1
    backend.hold = None
    clock.advance(600)
    assert len(backend.calls) == 1  # the attempt's own retry (5 s) did not undo the hold


def test_a_scan_in_progress_does_not_undo_a_hold():
    clock, store, backend, scheduler = setup({"a@x.example": [LATER, OK]}, retry=(3600.0,))
    envelope = queue(store, clock, "a@x.example")
    scheduler.enqueue(envelope)
    clock.advance(0)  # deferred an hour: leaves memory
    loads: list[Deferred] = []
    realLoad = store.load

    def slowLoad(queueID):
        # The state as it is now, handed over later: after the hold.
        now: list = []
        realLoad(queueID).addCallback(now.append)
        d = Deferred()
        loads.append(d)
        d.addCallback(lambda _: now[0])
        return d

    store.load = slowLoad
    clock.advance(3600)  # due: a scan finds it and starts loading it
    assert len(loads) == 1
    store.load = realLoad
    assert run(scheduler.holdMessage(envelope.queue_id), clock) is True
    loads[0].callback(None)  # the scan's load, of the state before the hold
    clock.advance(600)
    assert len(backend.calls) == 1


def test_delete_bounce_and_unknown_ids():
    clock, store, backend, scheduler = setup(
        {"a@x.example": [LATER], "b@x.example": [LATER], "s@example.org": [OK]}, retry=(3600.0,), reportingMTA="mx"
    )
    first = queue(store, clock, "a@x.example")
    second = queue(store, clock, "b@x.example")
    scheduler.enqueue(first)
    scheduler.enqueue(second)
    clock.advance(0)
    assert run(scheduler.deleteMessage(first.queue_id), clock) is None
    assert first.queue_id not in store.messages and scheduler.queued() == 1
    assert run(scheduler.bounceMessage(second.queue_id), clock) is None
    assert second.queue_id not in store.messages
    # The failure report went to the sender, and was delivered.
    report = [call for call in backend.calls if call[1] == ["s@example.org"]]
    assert len(report) == 1 and b"Returned to the sender by the postmaster" in report[0][2]
    for operation in (scheduler.holdMessage, scheduler.releaseMessage, scheduler.deleteMessage):
        assert run(operation("nosuchid"), clock).check(UnknownMessage)


def test_release_of_a_message_not_held_is_refused():
    clock, store, backend, scheduler = setup({"a@x.example": [LATER]}, retry=(3600.0,))
    envelope = queue(store, clock, "a@x.example")
    scheduler.enqueue(envelope)
    clock.advance(0)
    failure = run(scheduler.releaseMessage(envelope.queue_id), clock)
    assert failure.check(OperationRefused) and "not held" in failure.getErrorMessage()


def test_describe_states_and_times():
    clock, store, backend, scheduler = setup({"a@x.example": [LATER], "b@x.example": [OK]}, retry=(60.0,))
    envelope = queue(store, clock, "a@x.example", "b@x.example")
    scheduler.enqueue(envelope)
    clock.advance(0)
    found = control.describe(store.messages[envelope.queue_id][0])
    assert found["held"] is False and found["arrived"] == "1970-01-01T00:16:40Z"
    states = {r["address"]: (r["state"], r["next_attempt"], r["last_reply"]) for r in found["recipients"]}
    assert states == {
        "a@x.example": ("deferred", "1970-01-01T00:17:40Z", "451 4.4.1 try later"),
        "b@x.example": ("delivered", None, "250 2.0.0 ok"),
    }
    assert store.messages[envelope.queue_id][0].recipients[1].state is RecipientState.DELIVERED


def test_client_endpoints():
    assert control.clientEndpoint("unix:/var/relay/control.sock:mode=600:lockfile=1") == (
        "unix:path=/var/relay/control.sock"
    )
    assert control.clientEndpoint("tcp:7000:interface=127.0.0.1") == "tcp:host=127.0.0.1:port=7000"
    assert control.defaultEndpoint(Path("/a:b")) == "unix:/a\\:b/control.sock:mode=600:lockfile=1"


def test_amp_queue_listing_streams_in_chunks():
    """A listing larger than one AMP value (64 KiB) arrives whole, in order."""
    clock, store, backend, scheduler = setup({}, retry=(60.0,))
    scheduler.hold = True  # nothing attempted: every message stays queued
    addresses = [f"recipient-{i:04d}-{'x' * 40}@x.example" for i in range(600)]
    envelopes = [queue(store, clock, *addresses) for _ in range(3)]
    service = control.ControlService(None, scheduler, clock, sessions=lambda: 7)
    server = control.ControlProtocol(service)
    client = control.ControlClient()
    pump = iosim.connect(server, iosim.makeFakeServer(server), client, iosim.makeFakeClient(client))
    answers: list = []
    client.callRemote(control.QueueList).addBoth(answers.append)
    for _ in range(200):
        pump.pump()
        clock.advance(0)
        if answers:
            break
    assert answers == [{"total": 3}]
    listed = client.lines()
    assert [m["id"] for m in listed] == [e.queue_id for e in envelopes]
    assert [r["address"] for r in listed[0]["recipients"]] == addresses
    assert len(json.dumps(listed)) > 3 * 65536
    client.callRemote(control.Stats).addBoth(answers.append)
    for _ in range(50):
        pump.pump()
        clock.advance(0)
    stats = json.loads(answers[1]["stats"])
    assert stats["messages"] == 3 and stats["sessions_open"] == 7 and stats["recipients_by_state"]["pending"] == 1800
    client.callRemote(control.Hold, ids=["nosuchid", envelopes[0].queue_id]).addBoth(answers.append)
    for _ in range(50):
        pump.pump()
        clock.advance(0)
    assert answers[2] == {"done": [envelopes[0].queue_id], "errors": ["nosuchid: no such message in the queue"]}
    client.callRemote(control.Reload).addBoth(answers.append)
    for _ in range(50):
        pump.pump()
        clock.advance(0)
    assert "reload not supported" in answers[3].getErrorMessage()
