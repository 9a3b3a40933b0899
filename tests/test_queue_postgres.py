"""
The postgres queue store: the IQueueStore contract on a private PostgreSQL
cluster (tests/pgcluster.py, one per session, a schema per test), then what
only a shared store has: group commit, chunked data, leases and claims
between two nodes, and a server that restarts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock

from relay.errors import OptionError
from relay.plugin import PluginContext, runInline
from relay.plugins.postgres import postgres
from relay.testing.queuestore import DATA, QueueStoreContract, envelopeFor, resolve

psycopg = pytest.importorskip("psycopg") if os.environ.get("CI") != "true" else __import__("psycopg")


def makeClock() -> Clock:
    clock = Clock()
    clock.advance(1_800_000_000)
    return clock


def build(
    dsn: str, path: Path, node: str = "a", lease: str = "5m", blocking: Any = runInline, clock: Any = None
) -> Any:
    context = PluginContext(
        reactor=clock or makeClock(), hostname="h", postmaster="p@h", state_dir=path, blocking=blocking
    )
    return postgres.build({"path": str(path), "dsn": dsn, "node": node, "lease": lease}, context)


def sql(dsn: str, statement: str, params: Any = None) -> list[Any]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(statement, params)
        return cur.fetchall() if cur.description else []


@pytest.fixture
def dsn(pgcluster: Any) -> str:
    """A schema of its own on the session's cluster."""
    return pgcluster.createSchema()


class TestPostgresStore(QueueStoreContract):
    @pytest.fixture(autouse=True)
    def schema(self, dsn: str) -> None:
        self.dsn = dsn

    def makeStore(self, path: Path) -> Any:
        return build(self.dsn, path)

    def makeUpdatesFail(self, store: Any, queueID: str, failing: bool) -> None:
        if failing:
            sql(
                self.dsn,
                "CREATE OR REPLACE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS"
                " $$ BEGIN RAISE EXCEPTION 'refused by the test'; END $$",
            )
            sql(
                self.dsn,
                "CREATE TRIGGER refuse BEFORE UPDATE ON messages FOR EACH ROW"
                f" WHEN (OLD.id = '{queueID}') EXECUTE FUNCTION refuse()",
            )
        else:
            sql(self.dsn, "DROP TRIGGER refuse ON messages")

    def makeUnusable(self, path: Path) -> None:
        # A schema written by a newer relay: refused rather than misread.
        sql(self.dsn, "UPDATE schema_version SET version = 999")


class Pending:
    """A C{blocking} that keeps the work until told: what arrives meanwhile shows how the store batches."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, tuple[Any, ...], Any]] = []

    def __call__(self, f: Any, *args: Any) -> Any:
        from twisted.internet.defer import Deferred

        d: Deferred[Any] = Deferred()
        self.calls.append((f, args, d))
        return d

    def runOne(self) -> None:
        from twisted.internet.defer import maybeDeferred

        f, args, d = self.calls.pop(0)
        maybeDeferred(f, *args).chainDeferred(d)

    def runAll(self, bound: int = 10_000) -> None:
        for _ in range(bound):
            if not self.calls:
                return
            self.runOne()
        raise AssertionError("work never ends")


def outcome(d: Any) -> Any:
    got: list[Any] = []
    d.addBoth(got.append)
    assert got, "not fired"
    return got[0]


@pytest.fixture
def stores(dsn: str, tmp_path: Path) -> Any:
    """Two nodes, a and b, on one database; lease 1 s."""
    made = []

    def make(node: str, blocking: Any = runInline, lease: str = "1s") -> Any:
        store = build(dsn, tmp_path / node, node=node, lease=lease)
        resolve(store.recover())
        store._blocking = blocking  # recovered: from now on, the test's runner
        made.append(store)
        return store

    yield make
    for store in made:
        store._blocking = runInline
        resolve(store.stop())


def expire(dsn: str, queueID: str) -> None:
    """The lease of C{queueID} runs out now, as it would after its node died."""
    sql(dsn, "UPDATE messages SET lease_until = now() - interval '1 second' WHERE id = %s", [queueID])


def commit(store: Any, *addresses: str, data: bytes = DATA) -> Any:
    incoming = store.begin()
    incoming.write(data)
    envelope = envelopeFor(incoming.queue_id, *addresses)
    return envelope, incoming.commit(envelope)


def test_group_commit_batches_concurrent_commits(stores):
    """Twenty commits handed over while the first transaction runs share one more: 2 transactions, not 20."""
    pending = Pending()
    store = stores("a", blocking=pending)
    batches: list[int] = []
    store.observeBatches(batches.append)
    results = [commit(store)[1] for _ in range(20)]
    pending.runAll()
    assert [outcome(d) for d in results] == [None] * 20
    print(f"\ngroup commit: 20 concurrent commits in {store.transactions} transactions, batches {batches}")
    assert (store.transactions, batches) == (2, [1, 19])
    store._blocking = runInline
    assert resolve(store.scan(1e12, 100, ())).total == 20


def test_large_message_in_chunks_with_bounded_memory(stores, dsn):
    """5 MB in 64 KB writes: chunks go as they come, the client waits on writable(), the data comes back whole."""
    pending = Pending()
    store = stores("a", blocking=pending)
    store.chunkSize = 256 * 1024
    incoming = store.begin()
    block = os.urandom(64 * 1024)
    peak = 0
    for _ in range(80):  # 5 MiB
        incoming.write(block)
        held = len(incoming._buffer) + sum(map(len, incoming._queued))
        peak = max(peak, held)
        behind = incoming.writable()
        if behind is not None:
            while not behind.called:
                pending.runOne()
    envelope = envelopeFor(incoming.queue_id)
    d = incoming.commit(envelope)
    pending.runAll()
    assert outcome(d) is None
    print(f"\nchunked 5 MiB message: at most {peak} bytes held by the store at once (chunk {store.chunkSize})")
    assert peak <= 2 * store.chunkSize
    assert sql(dsn, "SELECT count(*), sum(length(data)) FROM message_chunks")[0] == (21, 80 * len(block))
    assert sql(dsn, "SELECT count(*) FROM incoming")[0] == (0,)
    with store.openData(incoming.queue_id) as f:
        assert f.read() == block * 80
    # And another node makes its own copy from the database, a chunk at a time.
    other = stores("b")
    expire(dsn, incoming.queue_id)
    assert resolve(other.claim(incoming.queue_id)).queue_id == incoming.queue_id
    with other.openData(incoming.queue_id) as f:
        assert f.read() == block * 80


def test_an_aborted_or_crashed_message_leaves_nothing(stores, dsn):
    store = stores("a")
    store.chunkSize = 16
    aborted = store.begin()
    aborted.write(DATA)
    aborted.abort()
    left = store.begin()
    left.write(DATA)  # never committed: the node "crashes"
    assert sql(dsn, "SELECT count(*) FROM incoming")[0] == (1,)
    store._nodeLock.close()  # the process dies: the server ends its session and the node's lock with it
    again = stores("a")  # the same node starts again
    assert sql(dsn, "SELECT count(*) FROM message_chunks")[0] == (0,)
    assert sql(dsn, "SELECT count(*) FROM incoming")[0] == (0,)
    assert list(again.spool.iterdir()) == []


def test_leases_between_two_nodes(stores, dsn):
    a, b = stores("a"), stores("b")
    envelope, d = commit(a, "r@example.test")
    resolve(d)
    queueID = envelope.queue_id
    # Born leased by a: b's scan leaves it to a.
    assert [q for _, q in resolve(a.scan(1e12, 10, ())).due] == [queueID]
    assert resolve(b.scan(1e12, 10, ())).due == []
    assert resolve(b.scan(1e12, 10, ())).total == 1  # counted all the same
    assert resolve(b.claim(queueID)) is None
    # a dies: its lease runs out, b's scan finds it and b's claim takes it, data and all.
    expire(dsn, queueID)
    assert [q for _, q in resolve(b.scan(1e12, 10, ())).due] == [queueID]
    claimed = resolve(b.claim(queueID))
    assert claimed.toJSON() == envelope.toJSON()
    with b.openData(queueID) as f:
        assert f.read() == DATA
    assert sql(dsn, "SELECT lease_owner FROM messages")[0] == ("b",)
    # a's stale copy: its claim finds b's live lease; a's update and removal change nothing.
    assert resolve(a.claim(queueID)) is None
    assert resolve(a.leaseOwner(queueID)) == "b"
    stale = envelope.copy()
    stale.recipients[0].attempts = 7
    resolve(a.update(stale))
    resolve(a.remove(queueID))
    assert resolve(b.load(queueID)).recipients[0].attempts == 0
    # b's update ends its lease and bumps the version: a's next claim gets b's state, not its own.
    claimed.recipients[0].attempts = 1
    claimed.recipients[0].next_attempt = 1_800_000_300.0
    resolve(b.update(claimed))
    assert sql(dsn, "SELECT lease_owner, version FROM messages")[0] == (None, 2)
    fresh = resolve(a.claim(queueID))
    assert (fresh.recipients[0].attempts, fresh.recipients[0].next_attempt) == (1, 1_800_000_300.0)
    # unclaim frees it for any node.
    a.unclaim(queueID)
    assert resolve(b.claim(queueID)) is not None


def test_a_node_name_in_use_is_refused(stores, dsn, tmp_path, pgcluster):
    """
    A second store with a live store's node name fails its recover() naming
    [queue] node, and deletes nothing of the first's (its message being
    received, its lease); once the first is gone, the name is free.  Another
    schema is another queue: the same name is free there.
    """
    first = stores("a")
    first.chunkSize = 16
    receiving = first.begin()
    receiving.write(DATA)
    envelope, d = commit(first)
    resolve(d)
    second = build(dsn, tmp_path / "a2", node="a")
    with pytest.raises(OSError) as caught:
        resolve(second.recover())
    assert str(caught.value).startswith("[queue] node: node a is in use by another relay")
    assert sql(dsn, "SELECT count(*) FROM incoming")[0] == (1,)
    assert sql(dsn, "SELECT lease_owner FROM messages WHERE id = %s", [envelope.queue_id])[0] == ("a",)
    resolve(second.stop())
    elsewhere = build(pgcluster.createSchema(), tmp_path / "a3", node="a")
    resolve(elsewhere.recover())
    resolve(elsewhere.stop())
    receiving.abort()
    resolve(first.stop())
    third = build(dsn, tmp_path / "a4", node="a")
    resolve(third.recover())
    resolve(third.stop())


def test_a_commit_whose_chunks_do_not_add_up_fails(stores, dsn):
    """
    Defence in depth: a chunk missing (or one too many) under the message's
    id when it commits fails that commit alone with an OSError (the client's
    4xx) and leaves nothing; the commits sharing its transaction go through.
    """
    pending = Pending()
    store = stores("a", blocking=pending)
    store.chunkSize = 16
    incoming = store.begin()
    incoming.write(DATA)
    pending.runAll()
    sql(dsn, "DELETE FROM message_chunks WHERE id = %s AND seq = 1", [incoming.queue_id])
    envelope = envelopeFor(incoming.queue_id)
    bad = incoming.commit(envelope)
    others = [commit(store)[1] for _ in range(3)]
    pending.runAll()
    failure = outcome(bad)
    assert isinstance(getattr(failure, "value", None), OSError), failure
    assert "chunks" in str(failure.value)
    assert [outcome(d) for d in others] == [None] * 3
    assert sql(dsn, "SELECT count(*) FROM messages WHERE id = %s", [incoming.queue_id])[0] == (0,)
    assert sql(dsn, "SELECT count(*) FROM message_chunks WHERE id = %s", [incoming.queue_id])[0] == (0,)
    # One chunk too many (another writer under the same id) fails the same way.
    extra = store.begin()
    extra.write(DATA)
    pending.runAll()
    sql(dsn, "INSERT INTO message_chunks (id, seq, data) VALUES (%s, 999, 'x')", [extra.queue_id])
    d = extra.commit(envelopeFor(extra.queue_id))
    pending.runAll()
    assert isinstance(getattr(outcome(d), "value", None), OSError)


def test_a_scan_says_when_another_nodes_lease_ends(stores, dsn):
    """
    A message another node holds is not due for this one, but its lease's
    end is when this node's scheduler must look again (QueueScan.later): a
    dead node's mail is taken over then, not at the next periodic rescan.
    """
    a, b = stores("a", lease="60s"), stores("b")
    envelope, d = commit(a)
    resolve(d)
    scan = resolve(b.scan(b.clock.seconds() + 60, 10, ()))
    assert scan.due == []
    assert scan.later is not None and 55 < scan.later - b.clock.seconds() <= 61
    # Its own lease, or one excluded (in memory), tells nothing.
    assert resolve(a.scan(a.clock.seconds(), 0, ())).later is not None  # due now, beyond the limit
    assert resolve(b.scan(b.clock.seconds() + 60, 10, (envelope.queue_id,))).later is None


def test_leases_in_flight_are_renewed(stores, dsn):
    """A claim held through a long attempt is renewed every third of the lease; an ended one is not."""
    a = stores("a", lease="3s")
    envelope, d = commit(a)
    resolve(d)
    resolve(a.claim(envelope.queue_id))
    sql(dsn, "UPDATE messages SET lease_until = now() + interval '1 second'")
    a.clock.advance(1.0)
    (left,) = sql(dsn, "SELECT lease_until - now() > interval '2 seconds' FROM messages")[0]
    assert left
    assert a.heldLeases() == {envelope.queue_id}
    resolve(a.update(envelope))
    assert a.heldLeases() == frozenset()


def test_nothing_committed_is_lost_when_the_server_crashes(pgcluster, dsn, tmp_path):
    """
    pg_ctl stop -m immediate (no checkpoint, as a crash) after 50 commits
    fired: all 50 are there after the restart; a commit caught by the stop
    fails (the client gets a 4xx), and the store works again afterwards.
    """
    store = build(dsn, tmp_path / "a")
    resolve(store.recover())
    fired = []
    for _ in range(50):
        envelope, d = commit(store)
        resolve(d)
        fired.append(envelope.queue_id)
    pending = Pending()
    store._blocking = pending
    caught, d = commit(store)
    pgcluster.stop("immediate")
    try:
        store.pool.timeout = 2
        pending.runAll()
        failure = outcome(d)
        assert isinstance(getattr(failure, "value", None), OSError), failure
    finally:
        pgcluster.start()
        store.pool.timeout = 30  # the pool reconnects with a back-off of its own
    store._blocking = runInline
    later, d = commit(store)
    resolve(d)
    found = {q for _, q in resolve(store.scan(1e12, 1000, ())).due}
    assert found == set(fired) | {later.queue_id}
    resolve(store.stop())
    again = build(dsn, tmp_path / "a")
    resolve(again.recover())
    assert resolve(again.scan(1e12, 1000, ())).total == 51
    resolve(again.stop())


def test_options_are_checked(tmp_path):
    context = PluginContext(reactor=makeClock(), hostname="h", postmaster="p@h", state_dir=tmp_path)

    def refused(**options: str) -> str:
        with pytest.raises(OptionError) as caught:
            postgres.build({"path": str(tmp_path), **options}, context)
        return f"{caught.value.key}: {caught.value.message}"

    assert refused().startswith("dsn: the postgres store needs dsn")
    assert refused(dsn="postgresql://x/y", dsn_file="/f").startswith("dsn_file: give dsn or dsn_file")
    assert refused(dsn_file=str(tmp_path / "none")).startswith("dsn_file: cannot read")
    assert refused(dsn="postgresql://x/y", lease="soon").startswith("lease: bad duration")
    assert refused(dsn="postgresql://x/y", lease="0s").startswith("lease: must be between")
    assert refused(dsn="postgresql://x/y", node="two words").startswith("node: must be a name")
    assert refused(dsn="postgresql://h/db?bogus=1").startswith("dsn: not a PostgreSQL connection string")
    secret = tmp_path / "dsn"
    secret.write_text("postgresql://relay:secret@127.0.0.1/relay\n")
    store = postgres.build({"path": str(tmp_path), "dsn_file": str(secret)}, context)
    assert store.node and store.lease == 300.0
