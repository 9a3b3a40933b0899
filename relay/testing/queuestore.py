"""
The IQueueStore contract, as a test suite any store can run.

Subclass L{QueueStoreContract} in a pytest module, name the subclass
C{Test...}, and implement L{makeStore}; every C{test_} method then runs
against your store::

    from relay.testing.queuestore import QueueStoreContract

    class TestMyStore(QueueStoreContract):
        def makeStore(self, path):
            return MyStore(path, blocking=runInline)

C{makeStore(path)} is called again with the same path to stand for a
restart; a store that keeps nothing across restarts (the memory store) returns
the same instance for the same path.  Stores must answer through Deferreds
that have fired by the time C{blocking} returns when given L{runInline}.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import maybeDeferred
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from relay.envelope import Envelope, Recipient, RecipientState, Status
from relay.interfaces import IIncomingMessage, IQueueStore

DATA = b"Received: from x\r\n\tby y; now\r\nSubject: contract\r\n\r\nbody \xff\x00 8bit\r\n.dot\r\n"


def resolve(value: Any) -> Any:
    """The result of a value or an already-fired Deferred (its failure re-raised)."""
    outcome: list[Any] = []
    maybeDeferred(lambda: value).addBoth(outcome.append)
    assert outcome, "the store's Deferred has not fired"
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    return outcome[0]


def dueTotalLater(scan: Any) -> tuple[Any, int, float | None]:
    """A scan's fields that every store must give (C{oldest} is optional)."""
    return (scan.due, scan.total, scan.later)


def envelopeFor(queueID: str, *addresses: str) -> Envelope:
    return Envelope(
        queue_id=queueID,
        sender="s@example.org",
        recipients=[Recipient(a, notify=("FAILURE",), orcpt=f"rfc822;{a}") for a in addresses or ("r@example.test",)],
        received_at=1_800_000_000.5,
        size=len(DATA),
        client_address="192.0.2.1",
        helo="client.example",
        body="8BITMIME",
        smtputf8=False,
        ret="HDRS",
        envid="ENV1",
    )


class QueueStoreContract:
    """
    Mix into a C{Test*} class and implement L{makeStore}; implement
    L{makeUpdatesFail} and L{makeUnusable} too, or the tests that need them
    are skipped.
    """

    def makeStore(self, path: Path) -> Any:
        raise NotImplementedError

    def makeUpdatesFail(self, store: Any, queueID: str, failing: bool) -> None:
        """Make C{store.update} of C{queueID} fail with an L{OSError} (C{failing}) or work again."""
        pytest.skip("this store cannot be made to fail updates")

    def makeUnusable(self, path: Path) -> None:
        """Break the store's storage at C{path} so that its next L{recover} must fail."""
        pytest.skip("this store cannot be made unusable")

    @pytest.fixture
    def store(self, tmp_path: Path) -> Any:
        self.path = tmp_path / "queue"
        store = self.current = self.makeStore(self.path)
        resolve(store.recover())
        yield store
        resolve(maybeDeferred(self.current.stop))

    def restart(self) -> tuple[Any, int]:
        """
        Stop the current store and start another on the same storage: its
        recover() count, or if it leaves counting to scans, its first scan's.
        """
        resolve(maybeDeferred(self.current.stop))
        store = self.current = self.makeStore(self.path)
        count = resolve(store.recover())
        assert count is None or isinstance(count, int), count
        if count is None:
            count = resolve(store.scan(1e12, 0, ())).total
        return store, count

    def queue(self, store: Any, *addresses: str, data: bytes = DATA, at: float | None = None) -> Envelope:
        incoming = store.begin()
        incoming.write(data[:10])
        incoming.write(data[10:])
        envelope = envelopeFor(incoming.queue_id, *addresses)
        if at is not None:
            envelope.received_at = at
        resolve(incoming.commit(envelope))
        return envelope

    def scanAll(self, store: Any, before: float = 1e12, limit: int = 1000, exclude: Any = ()) -> Any:
        return resolve(store.scan(before, limit, exclude))

    def test_provides_interfaces(self, store):
        assert verifyObject(IQueueStore, store)
        incoming = store.begin()
        assert verifyObject(IIncomingMessage, incoming)
        incoming.abort()

    def test_committed_message_survives_restart(self, store):
        envelope = self.queue(store, "a@example.test", "b@example.test")
        again, count = self.restart()
        assert count == 1
        assert resolve(again.load(envelope.queue_id)).toJSON() == envelope.toJSON()
        with again.openData(envelope.queue_id) as f:
            assert f.read() == DATA  # the data alone, nothing after it

    def test_data_reads_in_blocks_and_lines(self, store):
        envelope = self.queue(store)
        with store.openData(envelope.queue_id) as f:
            first = f.readline()
            assert first == DATA[: DATA.index(b"\n") + 1]
            assert f.read(5) == DATA[len(first) : len(first) + 5]
        with store.openData(envelope.queue_id) as f:
            pieces = []
            while piece := f.read(7):
                pieces.append(piece)
            assert b"".join(pieces) == DATA

    def test_queue_ids_unique_and_textual(self, store):
        ids = set()
        for _ in range(200):
            incoming = store.begin()
            assert incoming.queue_id.isalnum() and incoming.queue_id.isascii()
            ids.add(incoming.queue_id)
            incoming.abort()
        assert len(ids) == 200

    def test_uncommitted_and_aborted_messages_vanish(self, store):
        store.begin().write(DATA)
        aborted = store.begin()
        aborted.write(DATA)
        aborted.abort()
        aborted.abort()
        again, count = self.restart()
        assert count == 0
        assert dueTotalLater(self.scanAll(again)) == ([], 0, None)

    def test_abort_after_commit_keeps_the_message(self, store):
        incoming = store.begin()
        incoming.write(DATA)
        resolve(incoming.commit(envelopeFor(incoming.queue_id)))
        incoming.abort()
        again, count = self.restart()
        assert count == 1
        assert [queueID for _, queueID in self.scanAll(again).due] == [incoming.queue_id]

    def test_commit_twice_or_with_another_id_is_a_programming_error(self, store):
        incoming = store.begin()
        incoming.write(DATA)
        with pytest.raises(ValueError):
            resolve(incoming.commit(envelopeFor("someotherid")))
        other = store.begin()
        other.write(DATA)
        resolve(other.commit(envelopeFor(other.queue_id)))
        with pytest.raises(ValueError):
            resolve(other.commit(envelopeFor(other.queue_id)))

    def test_update_replaces_recipient_states(self, store):
        envelope = self.queue(store, "a@example.test", "b@example.test")
        envelope.recipients[0].state = RecipientState.DELIVERED
        envelope.recipients[1].attempts = 3
        envelope.recipients[1].next_attempt = 1_800_000_600.0
        envelope.recipients[1].last_status = Status(451, "4.4.1", "later")
        envelope.extra["warned"] = True
        resolve(store.update(envelope))
        envelope.recipients[1].attempts = 99  # the store keeps what it was given at update time
        again, _ = self.restart()
        recovered = resolve(again.load(envelope.queue_id))
        assert recovered.recipients[0].state is RecipientState.DELIVERED
        assert recovered.recipients[1].attempts == 3
        assert recovered.recipients[1].last_status == Status(451, "4.4.1", "later")
        assert recovered.extra == {"warned": True}
        # The rest of the envelope never changes.
        assert recovered.recipients[1].orcpt == "rfc822;b@example.test"
        assert (recovered.sender, recovered.envid, recovered.size) == (envelope.sender, "ENV1", len(DATA))

    def test_many_updates_keep_the_last(self, store):
        envelope = self.queue(store, "a@example.test")
        for attempt in range(1, 60):
            envelope.recipients[0].attempts = attempt
            envelope.recipients[0].next_attempt = 1_800_000_000.0 + attempt
            envelope.recipients[0].last_status = Status(451, "4.4.1", "x" * 100)
            resolve(store.update(envelope))
        again, _ = self.restart()
        assert resolve(again.load(envelope.queue_id)).recipients[0].attempts == 59

    def test_remove_forgets(self, store):
        kept = self.queue(store)
        gone = self.queue(store)
        resolve(store.update(gone))
        resolve(store.remove(gone.queue_id))
        resolve(store.remove(gone.queue_id))  # twice is fine
        again, count = self.restart()
        assert count == 1
        assert [queueID for _, queueID in self.scanAll(again).due] == [kept.queue_id]
        with pytest.raises(OSError):
            again.openData(gone.queue_id)
        with pytest.raises(FileNotFoundError):
            resolve(again.load(gone.queue_id))

    def test_open_or_load_unknown_id(self, store):
        with pytest.raises(OSError):
            store.openData("nosuchid")
        with pytest.raises(FileNotFoundError):
            resolve(store.load("nosuchid"))

    def test_large_message_streams(self, store):
        incoming = store.begin()
        chunk = bytes(range(256)) * 256
        for _ in range(64):  # 4 MiB
            incoming.write(chunk)
        resolve(incoming.commit(envelopeFor(incoming.queue_id)))
        with store.openData(incoming.queue_id) as f:
            assert f.read() == chunk * 64
        assert resolve(store.load(incoming.queue_id)).queue_id == incoming.queue_id

    def test_scan_in_due_order_with_limit_and_exclude(self, store):
        base = 1_800_000_000.0
        late = self.queue(store, at=base + 30)
        early = self.queue(store, at=base + 10)
        middle = self.queue(store, at=base + 20.25)
        future = self.queue(store, at=base + 1000)
        scan = self.scanAll(store, before=base + 100)
        assert scan.due == [(base + 10, early.queue_id), (base + 20.25, middle.queue_id), (base + 30, late.queue_id)]
        assert (scan.total, scan.later) == (4, base + 1000)
        # past the limit: left out, and the earliest of them is "later"
        scan = self.scanAll(store, before=base + 100, limit=1)
        assert scan.due == [(base + 10, early.queue_id)]
        assert (scan.total, scan.later) == (4, base + 20.25)
        # excluded: neither due nor later, but counted
        scan = self.scanAll(store, before=base + 100, limit=1, exclude={early.queue_id, middle.queue_id})
        assert scan.due == [(base + 30, late.queue_id)]
        assert (scan.total, scan.later) == (4, base + 1000)
        scan = self.scanAll(store, before=base, exclude={future.queue_id})
        assert (scan.due, scan.total, scan.later) == ([], 4, base + 10)
        assert dueTotalLater(self.scanAll(store, before=base + 30, limit=0)) == ([], 4, base + 10)

    def test_scan_tells_when_the_oldest_message_arrived(self, store):
        """
        C{oldest} is optional (C{None}: the store cannot tell cheaply), but a
        value given is the arrival of the oldest committed message, excluded
        ones included, and C{None} once the store is empty.
        """
        assert self.scanAll(store).oldest is None
        first = self.queue(store)
        second = self.queue(store)
        scan = self.scanAll(store, exclude={first.queue_id})
        if scan.oldest is not None:
            # Both stores here begin a message at 1,800,000,000 (their clock) and receive it 0.5 s later.
            assert abs(scan.oldest - first.received_at) <= 1.0, scan.oldest
        resolve(store.remove(first.queue_id))
        resolve(store.remove(second.queue_id))
        assert self.scanAll(store).oldest is None

    def test_update_moves_the_due_time_both_ways(self, store):
        base = 1_800_000_000.0
        envelope = self.queue(store, "a@example.test", "b@example.test", at=base)
        other = self.queue(store, at=base + 50)
        envelope.recipients[0].next_attempt = base + 300
        envelope.recipients[1].next_attempt = base + 100
        resolve(store.update(envelope))
        assert dueTotalLater(self.scanAll(store, before=base + 99)) == ([(base + 50, other.queue_id)], 2, base + 100)
        envelope.recipients[1].state = RecipientState.DELIVERED  # only the first is pending: due later
        resolve(store.update(envelope))
        assert self.scanAll(store, before=base + 299).later == base + 300
        envelope.recipients[0].next_attempt = base + 60  # brought forward
        resolve(store.update(envelope))
        again, _ = self.restart()
        assert self.scanAll(again, before=base + 1000).due == [
            (base + 50, other.queue_id),
            (base + 60, envelope.queue_id),
        ]

    def test_failed_update_leaves_the_old_state(self, store):
        envelope = self.queue(store, "a@example.test")
        envelope.recipients[0].attempts = 1
        resolve(store.update(envelope))
        self.makeUpdatesFail(store, envelope.queue_id, True)
        envelope.recipients[0].attempts = 2
        envelope.recipients[0].state = RecipientState.DELIVERED
        with pytest.raises(OSError):
            resolve(store.update(envelope))
        assert resolve(store.load(envelope.queue_id)).recipients[0].attempts == 1
        self.makeUpdatesFail(store, envelope.queue_id, False)
        envelope.recipients[0].attempts = 3
        resolve(store.update(envelope))  # and it works again afterwards
        again, _ = self.restart()
        loaded = resolve(again.load(envelope.queue_id))
        assert (loaded.recipients[0].attempts, loaded.recipients[0].state) == (3, RecipientState.DELIVERED)

    def test_recover_fails_on_an_unusable_queue(self, store):
        self.queue(store)
        resolve(maybeDeferred(self.current.stop))
        store = self.current = self.makeStore(self.path)
        self.makeUnusable(self.path)
        with pytest.raises((OSError, ValueError)):  # whatever the store finds wrong, it fails
            resolve(store.recover())
