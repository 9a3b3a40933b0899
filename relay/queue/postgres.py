"""
A queue store on PostgreSQL, shared by every relay of a cluster.

Durability is PostgreSQL's: a message's last chunk and its row are inserted
in one transaction, and the 250 waits for its COMMIT, with
C{synchronous_commit = on} set by every connection (whatever the server's
default).  Commits, updates, removals and lease changes go through one queue
per store: while a transaction runs, the work arriving meanwhile waits and
goes in the next one together (group commit: one WAL flush for many
sessions).  Every database call runs through C{blocking}, never on the
reactor thread.

Data arrives in chunks of L{CHUNK} bytes: each full chunk is inserted at once
(autocommit, under an C{incoming} row that recover() tidies if the message is
never committed), and C{writable()} holds the client back while one is on its
way, so memory stays bounded whatever the message size.  A node also keeps a
local copy of the data it receives or is about to deliver (the spool, under
C{path}): C{openData} is synchronous and read on the reactor thread, so it
reads that file and never the database.  L{PostgresQueueStore.claim} makes
the copy local before an attempt.

Claims and leases: a node delivers or changes a message only under a lease
(C{lease_owner}, C{lease_until} in the database's time).  A new message is
born leased by the node that received it; L{claim} takes or renews one (when
free, ours, or expired); L{update}, L{remove} and L{unclaim} end it.  Leases
held for attempts in flight are renewed every third of their length, so only
a node that stops renewing (dead, or cut off) loses them, and then another
node's scan finds its messages and delivers them (a scan tells the scheduler
when the earliest of the other nodes' leases ends, so it looks again then,
not at its next periodic rescan).  A node's name is held by an advisory lock
for the life of its process, so two relays cannot run as one node.  What the dead node had
already delivered without storing it is delivered again: the one way a
cluster duplicates mail.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
from collections.abc import Callable, Collection, Iterable
from pathlib import Path
from typing import Any, BinaryIO

from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from relay.envelope import Envelope, QueueScan
from relay.interfaces import IIncomingMessage, IQueueStore
from relay.queue import pgschema
from relay.queue.memory import dueTime

CHUNK = 256 * 1024
# An incoming message left by any node (crashed, or gone for good) is discarded after this.
ABANDONED = "1 day"
# A scan looks again this long after the earliest end of another node's lease (clock steps, rounding).
LEASE_SLACK = 0.5
_VISIBLE = "(lease_owner IS NULL OR lease_owner = %(me)s OR lease_until < now())"

log = Logger()


class DataMismatch(OSError):
    """A message's chunks in the database are not what its writer sent: its commit fails (the client gets 4xx)."""


class NodeInUse(OSError):
    """Another live relay runs with this node name on this queue: both would take each other's leases."""


def _asOSError(failure: Failure) -> Failure:
    """A database error as the L{OSError} the store's callers expect (a 451 or a retry, never a traceback)."""
    if failure.check(OSError, ValueError):
        return failure
    return Failure(OSError(errno.EIO, f"PostgreSQL: {failure.getErrorMessage().strip()}"))


def _checked(queueID: str) -> str:
    if not (queueID.isascii() and queueID.isalnum()):
        raise FileNotFoundError(errno.ENOENT, "no such message", queueID)
    return queueID


@implementer(IIncomingMessage)
class PostgresIncoming:
    """One message being received: full chunks go to the database as they come, the last with the commit."""

    def __init__(self, store: PostgresQueueStore, queueID: str) -> None:
        self.queue_id = queueID
        self._store = store
        self._buffer = bytearray()
        self._queued: list[bytes] = []  # full chunks waiting for the one in flight
        self._sending = False
        self._seq = 0
        self._octets = 0  # written by the client: the commit checks the database holds as many
        self._error: OSError | None = None
        self._state = "open"  # committing, committed, aborted
        self._cleanupAfter = False
        self._waiters: list[Deferred[None]] = []

    # -- data ------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self._error is not None:
            raise self._error
        if self._state != "open":
            raise ValueError("write after commit or abort")
        self._buffer += data
        self._octets += len(data)
        size = self._store.chunkSize
        while len(self._buffer) >= size:
            self._queued.append(bytes(self._buffer[:size]))
            del self._buffer[:size]
        self._pump()

    def writable(self) -> Deferred[None] | None:
        """Back-pressure: the client waits while a full chunk waits behind the one in flight."""
        if not self._queued or self._error is not None:
            return None
        return self._drained()

    def _drained(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        if not self._queued and not self._sending:
            d.callback(None)
        else:
            self._waiters.append(d)
        return d

    def _pump(self) -> None:
        if self._sending or not self._queued or self._error is not None or self._state == "aborted":
            return
        piece = self._queued.pop(0)
        seq, self._seq = self._seq, self._seq + 1
        self._sending = True
        d = self._store._db(self._store._appendChunk, self.queue_id, seq, piece)
        d.addCallbacks(self._sent, self._failed)

    def _sent(self, _: object) -> None:
        self._sending = False
        self._pump()
        self._wake()

    def _failed(self, failure: Failure) -> None:
        self._sending = False
        self._queued.clear()
        value = _asOSError(failure).value
        self._error = value if isinstance(value, OSError) else OSError(errno.EIO, str(value))
        self._wake()

    def _wake(self) -> None:
        if self._sending and self._queued:
            return
        if self._sending:
            return
        if self._state == "aborted" and self._cleanupAfter:
            self._cleanupAfter = False
            self._store._cleanup(self.queue_id)
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None)

    # -- the end ---------------------------------------------------------

    def commit(self, envelope: Envelope) -> Deferred[None]:
        if self._state != "open" or envelope.queue_id != self.queue_id:
            return fail(ValueError("commit twice, or with another message's envelope"))
        if self._error is not None:
            return fail(self._error)
        self._state = "committing"
        last = bytes(self._buffer)
        self._buffer = bytearray()
        return Deferred.fromCoroutine(self._commit(envelope, last))

    async def _commit(self, envelope: Envelope, last: bytes) -> None:
        await self._drained()
        try:
            if self._error is not None:
                raise self._error
            await self._store._submit("commit", envelope, self._seq, last, self._octets)
        except BaseException:
            self._state = "aborted"
            self._store._cleanup(self.queue_id)
            raise
        self._state = "committed"

    def abort(self) -> None:
        if self._state != "open":
            return  # committed (kept), committing (its failure cleans up), or aborted already
        self._state = "aborted"
        self._queued.clear()
        self._buffer = bytearray()
        if self._sending:
            self._cleanupAfter = True
        else:
            self._store._cleanup(self.queue_id)


@implementer(IQueueStore)
class PostgresQueueStore:
    """
    @param pool: a C{psycopg_pool.ConnectionPool}, not yet open (L{recover} opens it).
    @param path: the local spool directory (a cache of data; nothing durable lives there).
    @param node: this relay's name in the cluster, unique per relay.
    @param lease: seconds a claim lasts unless renewed.
    """

    def __init__(
        self,
        pool: Any,
        path: Path,
        node: str,
        lease: float,
        blocking: Callable[..., Deferred[Any]],
        clock: Any,
        chunkSize: int = CHUNK,
    ) -> None:
        self.pool = pool
        self.path = Path(path)
        self.spool = self.path / "spool"
        self.node = node
        self.lease = lease
        # IQueueStore's optional rescanWithin: a scan that saw no other node's lease cannot
        # know of leases taken after it, so the scheduler looks again within one lease.
        self.rescanWithin = lease + LEASE_SLACK
        self.chunkSize = chunkSize
        self._blocking = blocking
        self.clock = clock
        self._ops: list[tuple[str, tuple[Any, ...], Deferred[Any]]] = []
        self._batching = False
        self._onBatch: Callable[[int], None] | None = None
        self._leases: set[str] = set()  # claimed for an attempt or a command, not yet ended
        self._renewal: Any = None
        self._stopped = False
        self._idle: list[Deferred[None]] = []
        self._nodeLock: Any = None  # the connection holding this node's name (see _takeNode)
        self.transactions = 0  # batches committed, for tests and figures

    # -- plumbing --------------------------------------------------------

    def _db(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """C{f(*args)} off the reactor thread; database errors become OSError."""
        return self._blocking(f, *args).addErrback(_asOSError)

    def observeBatches(self, onBatch: Callable[[int], None] | None) -> None:
        """Have C{onBatch(changes)} called for each transaction of the group commit, as the filesystem store does."""
        self._onBatch = onBatch

    def _submit(self, kind: str, *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self._ops.append((kind, args, d))
        self._kick()
        return d

    def _kick(self) -> None:
        if self._batching or not self._ops:
            return
        ops, self._ops = self._ops, []
        self._batching = True
        work = [(kind, args) for kind, args, _ in ops]
        self._blocking(self._runBatch, work).addBoth(self._batchDone, ops)

    def _batchDone(self, results: Any, ops: list[tuple[str, tuple[Any, ...], Deferred[Any]]]) -> None:
        self._batching = False
        if isinstance(results, Failure):
            failure = _asOSError(results)
            for _, _, d in ops:
                d.errback(failure)
        else:
            if self._onBatch is not None:
                self._onBatch(len(ops))
            for (_, _, d), result in zip(ops, results, strict=True):
                if isinstance(result, BaseException):
                    d.errback(_asOSError(Failure(result)))
                else:
                    d.callback(result)
        self._kick()
        if not self._batching and not self._ops:
            idle, self._idle = self._idle, []
            for d in idle:
                d.callback(None)

    def _runBatch(self, work: list[tuple[str, tuple[Any, ...]]]) -> list[Any]:
        """
        One transaction for the whole batch (in a worker thread).  If one
        change fails for what it is (not a lost connection), the others are
        redone one transaction each, so it fails alone.
        """
        import psycopg

        after: list[Callable[[], None]] = []
        with self.pool.connection() as conn:
            try:
                with conn.transaction():
                    results = [self._apply(conn, kind, args, after) for kind, args in work]
                self.transactions += 1
            except psycopg.OperationalError:
                raise
            except (psycopg.Error, DataMismatch) as e:
                if len(work) == 1:
                    return [e]
                results = []
                after = []
                for kind, args in work:
                    try:
                        mine: list[Callable[[], None]] = []
                        with conn.transaction():
                            results.append(self._apply(conn, kind, args, mine))
                        self.transactions += 1
                        after.extend(mine)
                    except psycopg.OperationalError:
                        raise
                    except (psycopg.Error, DataMismatch) as e:
                        results.append(e)
        for action in after:
            try:
                action()
            except OSError:
                pass  # the spool is a cache: a missing copy is fetched again
        return results

    def _apply(self, conn: Any, kind: str, args: tuple[Any, ...], after: list[Callable[[], None]]) -> Any:
        me = {"me": self.node, "lease": self.lease}
        if kind == "commit":
            envelope, seq, last, octets = args
            queueID = envelope.queue_id
            conn.execute("INSERT INTO message_chunks (id, seq, data) VALUES (%s, %s, %s)", [queueID, seq, last])
            # Defence in depth: the chunks under this id are exactly the ones written, or nothing is committed.
            chunks, length = conn.execute(
                "SELECT count(*), coalesce(sum(octet_length(data)), 0) FROM message_chunks WHERE id = %s", [queueID]
            ).fetchone()
            if (chunks, length) != (seq + 1, octets):
                raise DataMismatch(
                    errno.EIO,
                    f"message {queueID}: the database holds {chunks} chunks of {length} octets,"
                    f" {seq + 1} chunks of {octets} octets were written; not committed",
                )
            conn.execute(
                "INSERT INTO messages (id, node, envelope, size, received_at, due, lease_owner, lease_until)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, now() + %s * interval '1 second')",
                [
                    queueID,
                    self.node,
                    json.dumps(envelope.toJSON()),
                    envelope.size,
                    envelope.received_at,
                    dueTime(envelope),
                    self.node,
                    self.lease,
                ],
            )
            if seq:
                conn.execute("DELETE FROM incoming WHERE id = %s", [queueID])
            after.append(lambda: self._spoolLast(queueID, last))
            return None
        if kind == "update":
            (envelope,) = args
            cur = conn.execute(
                "UPDATE messages SET envelope = %(env)s, due = %(due)s, lease_owner = NULL, lease_until = NULL,"
                f" version = version + 1 WHERE id = %(id)s AND {_VISIBLE} RETURNING id",
                {**me, "env": json.dumps(envelope.toJSON()), "due": dueTime(envelope), "id": envelope.queue_id},
            )
            if cur.fetchone() is None:
                self._lost(conn, envelope.queue_id, "update")
            return None
        if kind == "remove":
            (queueID,) = args
            cur = conn.execute(
                f"DELETE FROM messages WHERE id = %(id)s AND {_VISIBLE} RETURNING id", {**me, "id": queueID}
            )
            if cur.fetchone() is None:
                self._lost(conn, queueID, "remove")
            else:
                conn.execute("DELETE FROM message_chunks WHERE id = %s", [queueID])
            after.append(lambda: self._unspool(queueID))
            return None
        if kind == "claim":
            (queueID,) = args
            cur = conn.execute(
                "WITH old AS (SELECT id, lease_owner, lease_until < now() AS expired FROM messages"
                " WHERE id = %(id)s FOR UPDATE SKIP LOCKED)"
                " UPDATE messages m SET lease_owner = %(me)s, lease_until = now() + %(lease)s * interval '1 second'"
                " FROM old WHERE m.id = old.id"
                " AND (old.lease_owner IS NULL OR old.lease_owner = %(me)s OR old.expired)"
                " RETURNING m.envelope, old.lease_owner, old.expired",
                {**me, "id": queueID},
            )
            row = cur.fetchone()
            if row is None:
                return None
            envelope, previous, expired = row
            if previous is not None and previous != self.node and expired:
                log.warn(
                    "took over {queue_id} from node {node} whose lease expired: what that node delivered "
                    "without storing it goes again",
                    queue_id=queueID,
                    node=previous,
                )
            return envelope
        if kind == "unclaim":
            (queueID,) = args
            conn.execute(
                "UPDATE messages SET lease_owner = NULL, lease_until = NULL WHERE id = %s AND lease_owner = %s",
                [queueID, self.node],
            )
            return None
        if kind == "renew":
            (ids,) = args
            conn.execute(
                "UPDATE messages SET lease_until = now() + %s * interval '1 second'"
                " WHERE id = ANY(%s) AND lease_owner = %s",
                [self.lease, list(ids), self.node],
            )
            return None
        raise AssertionError(kind)

    def _lost(self, conn: Any, queueID: str, what: str) -> None:
        """An update or removal found another live node's lease (or nothing): ours is stale, the other's counts."""
        row = conn.execute("SELECT lease_owner FROM messages WHERE id = %s", [queueID]).fetchone()
        if row is not None:
            log.warn(
                "{what} of {queue_id} not stored: node {node} holds it now (this node's lease expired)",
                what=what,
                queue_id=queueID,
                node=row[0],
            )

    # -- the spool (local copies of the data) ----------------------------

    def _spoolPath(self, queueID: str) -> Path:
        return self.spool / _checked(queueID)

    def _appendChunk(self, queueID: str, seq: int, data: bytes) -> None:
        """A full chunk of a message being received: in the database at once, and in the local copy."""
        with self.pool.connection() as conn:
            conn.autocommit = True
            try:
                if seq == 0:
                    conn.execute("INSERT INTO incoming (id, node) VALUES (%s, %s)", [queueID, self.node])
                conn.execute("INSERT INTO message_chunks (id, seq, data) VALUES (%s, %s, %s)", [queueID, seq, data])
            finally:
                conn.autocommit = False
        with open(self.spool / f"{_checked(queueID)}.tmp", "wb" if seq == 0 else "ab") as f:
            f.write(data)

    def _spoolLast(self, queueID: str, last: bytes) -> None:
        """After the COMMIT: the local copy of a message just received is complete."""
        temporary = self.spool / f"{_checked(queueID)}.tmp"
        with open(temporary, "ab") as f:
            f.write(last)
        os.replace(temporary, self._spoolPath(queueID))

    def _unspool(self, queueID: str) -> None:
        try:
            os.unlink(self._spoolPath(queueID))
        except FileNotFoundError:
            pass

    def _fetch(self, queueID: str) -> None:
        """Make a claimed message's data local, a chunk at a time; nothing if it is already."""
        final = self._spoolPath(queueID)
        if final.exists():
            return
        temporary = self.spool / f"{queueID}.{secrets.token_hex(4)}.fetch"
        found = False
        try:
            with self.pool.connection() as conn, open(temporary, "wb") as f:
                cur = conn.cursor()
                for (data,) in cur.stream("SELECT data FROM message_chunks WHERE id = %s ORDER BY seq", [queueID]):
                    f.write(data)
                    found = True
                conn.rollback()
            if not found:
                raise FileNotFoundError(errno.ENOENT, "no data for message", queueID)
            os.replace(temporary, final)
        finally:
            if temporary.exists():
                temporary.unlink()

    def _cleanup(self, queueID: str) -> None:
        """A message that will not be committed: its chunks and local copy go (never a committed one's)."""

        def work() -> None:
            with self.pool.connection() as conn, conn.transaction():
                conn.execute(
                    "DELETE FROM message_chunks WHERE id = %s AND NOT EXISTS (SELECT 1 FROM messages WHERE id = %s)",
                    [queueID, queueID],
                )
                conn.execute("DELETE FROM incoming WHERE id = %s", [queueID])
            try:
                os.unlink(self.spool / f"{queueID}.tmp")
            except FileNotFoundError:
                pass

        self._db(work).addErrback(
            lambda f: log.warn(
                "could not discard incoming {queue_id}: {error}; the next start does",
                queue_id=queueID,
                error=f.getErrorMessage(),
            )
        )

    # -- IQueueStore -----------------------------------------------------

    def recover(self) -> Deferred[int | None]:
        return self._db(self._recover)

    def _recover(self) -> None:
        self.spool.mkdir(parents=True, exist_ok=True)
        self.pool.open(wait=True, timeout=30)
        with self.pool.connection() as conn:
            pgschema.migrate(conn)
        self._takeNode()
        with self.pool.connection() as conn:
            with conn.transaction():
                # This node's leftovers: it restarted, so none of them is still being received or delivered.
                conn.execute(
                    "DELETE FROM message_chunks c USING incoming i WHERE c.id = i.id"
                    f" AND (i.node = %s OR i.started < now() - interval '{ABANDONED}')"
                    " AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.id = c.id)",
                    [self.node],
                )
                conn.execute(
                    f"DELETE FROM incoming WHERE node = %s OR started < now() - interval '{ABANDONED}'", [self.node]
                )
                conn.execute(
                    "UPDATE messages SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = %s", [self.node]
                )
            # Local copies of messages gone (delivered by another node, or while this one was away).
            names = [p.name for p in self.spool.iterdir()]
            for name in names:
                if not name.isalnum():
                    (self.spool / name).unlink(missing_ok=True)
            kept = [n for n in names if n.isalnum()]
            for start in range(0, len(kept), 1000):
                batch = kept[start : start + 1000]
                rows = conn.execute("SELECT id FROM messages WHERE id = ANY(%s)", [batch]).fetchall()
                conn.rollback()
                present = {r[0] for r in rows}
                for name in batch:
                    if name not in present:
                        (self.spool / name).unlink(missing_ok=True)
        # Counting a table costs time in proportion to it: the first scan counts.
        return None

    def _takeNode(self) -> None:
        """
        Hold this node's name for the life of the process: a session-level
        advisory lock (keyed by the schema and the name) on a connection of
        its own, which the server releases when the process dies, however it
        dies.  Two relays with one C{node} would each take the other's
        leases and, at start-up, delete its incoming data: the second is
        refused, as the filesystem store refuses a queue directory in use.

        If the database server restarts, the lock goes with the connection:
        a second relay started with the same name during that window is not
        refused (a configuration error the lock only guards against).
        """
        import psycopg

        if self._nodeLock is not None:
            return
        conn = psycopg.connect(self.pool.conninfo, **{**self.pool.kwargs, "autocommit": True})
        try:
            (taken,) = conn.execute(
                "SELECT pg_try_advisory_lock(('x' || substr(md5('relay node ' || current_schema() || ' ' || %s),"
                " 1, 16))::bit(64)::bigint)",
                [self.node],
            ).fetchone()
        except BaseException:
            conn.close()
            raise
        if not taken:
            conn.close()
            raise NodeInUse(
                f"[queue] node: node {self.node} is in use by another relay on this database"
                " (give each relay its own node name)",
            )
        self._nodeLock = conn

    def scan(self, before: float, limit: int, exclude: Collection[str]) -> Deferred[QueueScan]:
        return self._db(self._scan, before, limit, list(exclude), True)

    def listing(self, limit: int) -> Deferred[QueueScan]:
        """
        Every queued message of the whole cluster, whoever holds its lease,
        earliest due first (held ones last): what C{relayctl queue} lists on
        any node.  Optional (see L{relay.interfaces.IQueueStore}).
        """
        return self._db(self._scan, float(2**33), limit, [], False)

    def _scan(self, before: float, limit: int, exclude: list[str], visibleOnly: bool) -> QueueScan:
        with self.pool.connection() as conn:
            total, oldest = conn.execute("SELECT count(*), min(received_at) FROM messages").fetchone()
            where = "NOT (id = ANY(%(exclude)s))"
            if visibleOnly:
                where += f" AND {_VISIBLE}"
            rows = conn.execute(
                f"SELECT due, id FROM messages WHERE {where} ORDER BY due, id LIMIT %(limit)s",
                {"exclude": exclude, "me": self.node, "limit": limit + 1},
            ).fetchall()
            expiring = None
            if visibleOnly:
                # Messages other nodes hold now: visible once their leases end (the node died, or
                # left them), so the earliest end is when this node's scheduler should look again.
                (expiring,) = conn.execute(
                    "SELECT extract(epoch FROM min(lease_until) - now()) FROM messages"
                    " WHERE lease_owner IS NOT NULL AND lease_owner <> %(me)s AND lease_until >= now()"
                    " AND NOT (id = ANY(%(exclude)s))",
                    {"exclude": exclude, "me": self.node},
                ).fetchone()
            conn.rollback()
        due = []
        later = None
        for when, queueID in rows:
            if when <= before and len(due) < limit:
                due.append((when, queueID))
            else:
                later = when
                break
        if expiring is not None:
            # In the caller's time (the scheduler's clock), a little after the database's end of the lease.
            freed = self.clock.seconds() + float(expiring) + LEASE_SLACK
            later = freed if later is None else min(later, freed)
        return QueueScan(due, total, later, oldest)

    def load(self, queueID: str) -> Deferred[Envelope]:
        return self._db(self._load, queueID)

    def _load(self, queueID: str) -> Envelope:
        with self.pool.connection() as conn:
            row = conn.execute("SELECT envelope FROM messages WHERE id = %s", [queueID]).fetchone()
            conn.rollback()
        if row is None:
            raise FileNotFoundError(errno.ENOENT, "no such message", queueID)
        return Envelope.fromJSON(row[0])

    def begin(self) -> PostgresIncoming:
        return PostgresIncoming(self, self.newQueueID())

    def newQueueID(self) -> str:
        """Arrival in microseconds (13 hex digits, so ids sort by arrival), then 32 random bits: unique across nodes."""
        return f"{int(self.clock.seconds() * 1e6):013X}{secrets.token_hex(4).upper()}"

    def openData(self, queueID: str) -> BinaryIO:
        """
        The local copy, made when the message was received here or claimed:
        never a database query on the reactor thread.
        """
        try:
            return open(self._spoolPath(queueID), "rb")
        except FileNotFoundError:
            raise FileNotFoundError(
                errno.ENOENT, "message data not on this node (claim() fetches it)", queueID
            ) from None

    def update(self, envelope: Envelope) -> Deferred[None]:
        self._leases.discard(envelope.queue_id)
        return self._submit("update", envelope.copy())

    def remove(self, queueID: str) -> Deferred[None]:
        self._leases.discard(queueID)
        return self._submit("remove", queueID)

    # -- claims (optional, see IQueueStore) ------------------------------

    def claim(self, queueID: str) -> Deferred[Envelope | None]:
        """
        Lease a message for this node and make its data local: fires with the
        envelope as stored (fresher than a copy in memory if another node
        changed it), or C{None} if another live node holds it or it is gone.

        The row is taken with C{SELECT ... FOR UPDATE SKIP LOCKED}: a row
        another node's transaction has locked is being claimed or changed by
        that node, so it is theirs (C{None}), and this node's batch, which
        carries other sessions' commits, never waits behind another node's
        transaction.
        """
        return Deferred.fromCoroutine(self._claim(queueID))

    async def _claim(self, queueID: str) -> Envelope | None:
        stored = await self._submit("claim", queueID)
        if stored is None:
            self._leases.discard(queueID)
            await self._db(self._unspool, queueID)
            return None
        self._leases.add(queueID)
        self._armRenewal()
        try:
            envelope = Envelope.fromJSON(stored)
            await self._db(self._fetch, queueID)
        except BaseException:
            self.unclaim(queueID)
            raise
        return envelope

    def unclaim(self, queueID: str) -> Deferred[None]:
        """End a claim that ends without an update or removal: the message is free for any node."""
        self._leases.discard(queueID)
        d = self._submit("unclaim", queueID)
        d.addErrback(lambda f: log.warn("could not end the lease of {queue_id}: {error}", queue_id=queueID, error=f))
        return d

    def leaseOwner(self, queueID: str) -> Deferred[str | None]:
        """The node holding a live lease on the message, if any (for an operator's error message)."""

        def work() -> str | None:
            with self.pool.connection() as conn:
                row = conn.execute(
                    "SELECT lease_owner FROM messages WHERE id = %s AND lease_until >= now()", [queueID]
                ).fetchone()
                conn.rollback()
            return row[0] if row else None

        return self._db(work)

    def _armRenewal(self) -> None:
        if self._renewal is None and not self._stopped:
            self._renewal = self.clock.callLater(self.lease / 3, self._renew)

    def _renew(self) -> None:
        self._renewal = None
        if not self._leases or self._stopped:
            return
        d = self._submit("renew", tuple(self._leases))
        d.addErrback(lambda f: log.warn("could not renew leases: {error}", error=f.getErrorMessage()))
        self._armRenewal()

    def heldLeases(self) -> Iterable[str]:
        """Messages this node holds a claim on now, for tests."""
        return frozenset(self._leases)

    def stop(self) -> Deferred[None]:
        self._stopped = True
        if self._renewal is not None and self._renewal.active():
            self._renewal.cancel()
        self._renewal = None
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self._batching or self._ops:
            d: Deferred[None] = Deferred()
            self._idle.append(d)
            await d  # the changes handed over are done before the pool closes
        await self._db(self.pool.close)
        if self._nodeLock is not None:
            lock, self._nodeLock = self._nodeLock, None
            await self._db(lock.close)
