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
    """Mix into a C{Test*} class and implement L{makeStore}."""

    def makeStore(self, path: Path) -> Any:
        raise NotImplementedError

    @pytest.fixture
    def store(self, tmp_path: Path) -> Any:
        self.path = tmp_path / "queue"
        store = self.makeStore(self.path)
        resolve(store.recover())
        return store

    def restart(self) -> Any:
        store = self.makeStore(self.path)
        return store, resolve(store.recover())

    def queue(self, store: Any, *addresses: str, data: bytes = DATA) -> Envelope:
        incoming = store.begin()
        incoming.write(data[:10])
        incoming.write(data[10:])
        envelope = envelopeFor(incoming.queue_id, *addresses)
        resolve(incoming.commit(envelope))
        return envelope

    def test_provides_interfaces(self, store):
        assert verifyObject(IQueueStore, store)
        incoming = store.begin()
        assert verifyObject(IIncomingMessage, incoming)
        incoming.abort()

    def test_committed_message_survives_restart(self, store):
        envelope = self.queue(store, "a@example.test", "b@example.test")
        again, recovered = self.restart()
        assert [e.toJSON() for e in recovered] == [envelope.toJSON()]
        with again.openData(envelope.queue_id) as f:
            assert f.read() == DATA

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
        _, recovered = self.restart()
        assert recovered == []

    def test_abort_after_commit_keeps_the_message(self, store):
        incoming = store.begin()
        incoming.write(DATA)
        resolve(incoming.commit(envelopeFor(incoming.queue_id)))
        incoming.abort()
        _, recovered = self.restart()
        assert [e.queue_id for e in recovered] == [incoming.queue_id]

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
        resolve(store.update(envelope))
        envelope.recipients[1].attempts = 99  # the store keeps what it was given at update time
        _, [recovered] = self.restart()
        assert recovered.recipients[0].state is RecipientState.DELIVERED
        assert recovered.recipients[1].attempts == 3
        assert recovered.recipients[1].last_status == Status(451, "4.4.1", "later")

    def test_remove_forgets(self, store):
        kept = self.queue(store)
        gone = self.queue(store)
        resolve(store.remove(gone.queue_id))
        resolve(store.remove(gone.queue_id))  # twice is fine
        again, recovered = self.restart()
        assert [e.queue_id for e in recovered] == [kept.queue_id]
        with pytest.raises(OSError):
            again.openData(gone.queue_id)

    def test_open_unknown_id(self, store):
        with pytest.raises(OSError):
            store.openData("nosuchid")

    def test_large_message_streams(self, store):
        incoming = store.begin()
        chunk = bytes(range(256)) * 256
        for _ in range(64):  # 4 MiB
            incoming.write(chunk)
        resolve(incoming.commit(envelopeFor(incoming.queue_id)))
        with store.openData(incoming.queue_id) as f:
            assert f.read() == chunk * 64
