"""
The default queue store: one file per message, written once, never reused.

Layout under the store's directory::

    lock                    flock()ed by the relay using the queue; holds its pid
    format                  the queue's format (2), once it is in this one
    incoming/<qid>          a message being received (spilled data), or being
                            committed
    messages/<qid>          a committed message: data, envelope JSON, footer
    messages/<qid>.state    journal of its recipients' states (after updates)
    messages/<qid>.damaged  a message that did not check out, set aside

A commit appends the envelope and a footer (queue id, lengths, CRC32) to the
message's new file in C{incoming/}, fsyncs it, renames it into C{messages/}
and fsyncs that directory: only then is the commit done and the 250 sent.
Nothing relies on a file system's ordering or on C{syncfs}; no inode ever
holds two messages, and a file whose footer does not name its queue id and
match its content is never delivered (see L{relay.queue.fsworker}).

An update appends a record to the message's journal and fsyncs it; the data
is never rewritten.  The message's due time is kept as the mtime of its data
file, a hint that lets L{FilesystemQueueStore.scan} order a queue of any size
without reading it; the journal holds the truth, and the hint is kept so that
losing it makes a message due early, never late.

Group commit: the file work is done by L{relay.queue.fsworker}, in a child
process in production (L{ProcessEngine}), one batch at a time.  Commits,
updates and removals that arrive while a batch runs form the next one, so the
busier the relay, the larger the batches and the less each message pays for
durability.  The reactor thread never creates, writes or syncs a queue file:
message data is buffered in memory and only past L{SPILL} bytes appended to
its incoming file, by the worker.
"""

from __future__ import annotations

import errno
import fcntl
import heapq
import io
import itertools
import json
import math
import os
import random
import re
import shutil
import sys
import zlib
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, BinaryIO

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ProcessDone
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from relay.envelope import Envelope, QueueScan, RecipientState, Status
from relay.fsutil import fsyncDirectory, makeDirectories
from relay.interfaces import IIncomingMessage, IQueueStore
from relay.queue import fsworker
from relay.queue.fsworker import APPEND, COMMIT, COMPACT, DISCARD, REMOVE, UPDATE, Damaged, QueueFiles, Request
from relay.queue.memory import dueTime

__all__ = [
    "FilesystemQueueStore",
    "ProcessEngine",
    "ThreadEngine",
    "QueueInUse",
    "WorkerLost",
    "QUEUE_ID",
    "SPILL",
    "SYNC_MODES",
]

QUEUE_ID = re.compile(r"^[0-9A-Za-z]{1,32}$")

SYNC_MODES = ("fsync",)
"""The values C{[queue] sync} accepts: there is one way to be durable."""

FORMAT = 2
"""The queue's format, written to L{FORMAT_FILE} once a queue is in it."""

FORMAT_FILE = "format"

SPILL = 256 * 1024
"""Bytes of a message held in memory before they are appended to its incoming
file; most messages are smaller and never touch the disk before commit."""

PIPE_SIZE = 1 << 20
"""The capacity asked for the pipe to the worker (Linux's default limit for
one pipe): a spill goes into it in one system call instead of sixteen 64 KiB
turns of the reactor, each copying what is left over in the transport's
buffer."""

MAX_UNWRITTEN = 4 * SPILL
"""Bytes of one message handed to the worker and not yet written by it.
Past this, L{FilesystemIncoming.writable} asks the session to stop reading
from its client until the worker catches up: a client faster than the disk
costs the relay this much memory, not the whole message."""

_OPEN, _COMMITTING, _COMMITTED, _FAILED, _ABORTED = range(5)

_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))

_MUTABLE = ("state", "attempts", "next_attempt", "last_status", "backend")


class QueueInUse(OSError):
    """Another relay holds the queue's lock."""


class WorkerLost(OSError):
    """The queue worker died before it answered: the request may or may not have been carried out."""


def _encode(envelope: Envelope) -> bytes:
    # Serialised in the caller's thread: the scheduler keeps mutating the
    # envelope after update() returns, the worker must see a snapshot.
    return _JSON.encode(envelope.toJSON()).encode()


def _encodeState(envelope: Envelope) -> bytes:
    """The mutable state of a message: one journal record's JSON."""
    recipients = []
    for recipient in envelope.recipients:
        fields = recipient.toJSON()
        recipients.append({key: fields[key] for key in _MUTABLE})
    return _JSON.encode({"queue_id": envelope.queue_id, "recipients": recipients, "extra": envelope.extra}).encode()


def _applyState(envelope: Envelope, payload: bytes) -> None:
    """Bring a committed envelope to the state of a journal record; L{Damaged} if it does not fit."""
    try:
        fields = json.loads(payload)
        if fields["queue_id"] != envelope.queue_id:
            raise Damaged(f"journal names queue id {fields['queue_id']!r}")
        states = fields["recipients"]
        if len(states) != len(envelope.recipients):
            raise Damaged(f"journal has {len(states)} recipients, the envelope {len(envelope.recipients)}")
        for recipient, state in zip(envelope.recipients, states, strict=True):
            status = state.get("last_status")
            recipient.state = RecipientState(state["state"])
            recipient.attempts = int(state["attempts"])
            recipient.next_attempt = state.get("next_attempt")
            recipient.last_status = Status.fromJSON(status) if status else None
            recipient.backend = state.get("backend")
        envelope.extra = dict(fields.get("extra") or {})
    except Damaged:
        raise
    except Exception as e:
        raise Damaged(f"journal record unreadable: {e}") from None


def _nanoseconds(when: float) -> int:
    # Whole seconds and fraction apart: a float POSIX time has no nanosecond
    # precision, and scaling it whole would round 20.25 to 20.2499999.
    whole = math.floor(when)
    return whole * 1_000_000_000 + round((when - whole) * 1_000_000_000)


_TIMED_ID = re.compile(r"^[0-9a-f]{19}$")
"""A queue id as L{FilesystemQueueStore.newQueueID} makes them: arrival in microseconds (13 hex digits), 6 random."""


def arrivalOf(queueID: str) -> float | None:
    """When a message began to arrive, from its queue id; None for an id not made by newQueueID."""
    if not _TIMED_ID.match(queueID):
        return None
    return int(queueID[:13], 16) / 1_000_000


def _seconds(nanoseconds: int) -> float:
    # The inverse of _nanoseconds: a time stored from a float comes back as that float.
    return nanoseconds // 1_000_000_000 + (nanoseconds % 1_000_000_000) / 1e9


def _error(error: fsworker.Error) -> OSError:
    code, text = error
    return OSError(code or errno.EIO, text)


def _reportBatches(onBatch: Callable[[int], None] | None, sizes: list[int]) -> None:
    """Tell C{onBatch} (the metrics) the size of each batch; its failure is logged, never the store's."""
    if onBatch is None:
        return
    for size in sizes:
        try:
            onBatch(size)
        except Exception:
            Logger().failure("queue store: the batch size hook failed")


class ThreadEngine:
    """
    Runs L{QueueFiles} through C{blocking} (inline in unit tests, a thread of
    its own otherwise), one batch at a time; what arrives meanwhile waits and
    becomes the next batch.  A thread never dies: its generation is always 1.
    """

    log = Logger()
    generation = 1

    def __init__(self, files: QueueFiles, blocking: Callable[..., Deferred[Any]]) -> None:
        self.files = files
        self.blocking = blocking
        self.onBatch: Callable[[int], None] | None = None
        self._running = False
        self._waiting: list[tuple[Request, Deferred[None]]] = []

    def submit(self, request: Request) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self._waiting.append((request, d))
        if not self._running:
            self._start()
        return d

    def _start(self) -> None:
        batch, self._waiting = self._waiting, []
        self._running = True
        self.blocking(self.files.run, [request for request, _ in batch]).addBoth(self._done, batch)

    def _done(self, outcome: Any, batch: list[tuple[Request, Deferred[None]]]) -> None:
        # Taken before the next batch starts, in the thread that could change them.
        _reportBatches(self.onBatch, self.files.takeBatchSizes())
        self._running = False
        if self._waiting:
            self._start()
        for i, (_, d) in enumerate(batch):
            if isinstance(outcome, Failure):
                d.errback(outcome)
            elif outcome[i] is None:
                d.callback(None)
            else:
                d.errback(Failure(_error(outcome[i])))

    def stop(self) -> None:
        if self.files.changes:
            self.log.info("{line}", line=self.files.statistics())


class ProcessEngine(ProcessProtocol):
    """
    Runs L{QueueFiles} in a child process (C{python -m relay.queue.fsworker}),
    talking over its stdin and stdout.

    Each incarnation of the child has a generation, and requests that belong
    to a message name the one that received its first chunk: a message whose
    chunks went to a worker that has died can no longer be committed (its
    session answers 451).  When the child dies, the commits it had not
    answered are discarded by the next one (whatever of them reached
    C{messages/} is unlinked and the directory synced) before they fail, so
    that no message a client was told to send again is delivered as well.
    Its other unanswered requests fail at once (L{WorkerLost}).  A new child
    is started L{restartDelay} seconds later.
    """

    log = Logger()
    restartDelay = 1.0
    stopTimeout = 30.0

    def __init__(self, reactor: Any, path: Path) -> None:
        self.reactor = reactor
        self.path = path
        self.generation = 1
        self.transport: Any = None
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[Request, Deferred[None]]] = {}
        self._outbox: list[bytes] = []
        self._decoder = fsworker.ReplyDecoder()
        self._stopping = False
        self._ended: list[Deferred[None]] = []
        self._stderr = b""
        self.onBatch: Callable[[int], None] | None = None
        reactor.callWhenRunning(self._spawn)

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "relay.queue.fsworker", str(self.path), str(self.generation), str(os.getpid())]

    def _spawn(self) -> None:
        if self._stopping:
            return
        self._decoder = fsworker.ReplyDecoder()
        argv = self.argv()
        self.reactor.spawnProcess(self, argv[0], argv, env=dict(os.environ), childFDs={0: "w", 1: "r", 2: "r"})

    def connectionMade(self) -> None:
        writer = getattr(self.transport, "pipes", {}).get(0)
        if writer is not None:
            try:
                fcntl.fcntl(writer.fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
            except OSError:
                pass  # the system's limit for pipes: the default size works, more slowly
        outbox, self._outbox = self._outbox, []
        if outbox:
            self.transport.write(b"".join(outbox))

    def submit(self, request: Request) -> Deferred[None]:
        requestID = next(self._ids)
        d: Deferred[None] = Deferred()
        self._pending[requestID] = (request, d)
        parts = fsworker.encodeRequestParts(requestID, request)
        if self.transport is not None and not self._stopping:
            self._write(parts)
        else:
            self._outbox.append(b"".join(parts))
        return d

    def _write(self, parts: tuple[bytes, ...]) -> None:
        """
        Straight into the pipe, with one C{writev} and no copy of the data
        in this process: the worker starts on this request while the reactor
        is still busy with others.  What the pipe does not take is buffered
        by the transport and written as the worker reads, as usual.
        """
        writer = getattr(self.transport, "pipes", {}).get(0)
        if writer is None:
            self.transport.write(b"".join(parts))
            return
        if not writer.dataBuffer and not writer._tempDataBuffer:
            try:
                sent = os.writev(writer.fd, parts)
            except OSError:
                sent = 0  # a full pipe, or an error the transport's own write reports
            rest: list[bytes] = []
            for part in parts:
                if sent >= len(part):
                    sent -= len(part)
                else:
                    rest.append(part[sent:] if sent else part)
                    sent = 0
            parts = tuple(rest)
        if parts:
            writer.writeSequence(parts)

    def outReceived(self, data: bytes) -> None:
        for requestID, error in self._decoder.feed(data):
            if requestID == fsworker.BATCH_ID:
                _reportBatches(self.onBatch, [error[0] if error else 0])
                continue
            entry = self._pending.pop(requestID, None)
            if entry is None:
                continue
            if error is None:
                entry[1].callback(None)
            else:
                entry[1].errback(Failure(_error(error)))

    def errReceived(self, data: bytes) -> None:
        self._stderr += data
        *lines, self._stderr = self._stderr.split(b"\n")
        for line in lines:
            if line.strip():
                self.log.info("{line}", line=line.decode("utf-8", "replace"))

    def processEnded(self, reason: Failure) -> None:
        self.transport = None
        pending, self._pending = self._pending, {}
        self.generation += 1
        why = f"queue worker exited: {reason.getErrorMessage()}"
        if self._stopping:
            for _, d in pending.values():
                d.errback(Failure(WorkerLost(errno.EIO, why)))
            ended, self._ended = self._ended, []
            for d in ended:
                d.callback(None)
            return
        discards = 0
        for request, d in pending.values():
            if request.opcode in (COMMIT, DISCARD):
                # Whatever the dead worker did of it is undone before anyone hears of it.
                discards += 1
                done = self.submit(Request(DISCARD, request.queueID))
                if request.opcode == COMMIT:
                    done.addBoth(lambda _, d=d: d.errback(Failure(WorkerLost(errno.EIO, why))))
                else:
                    done.chainDeferred(d)
            else:
                d.errback(Failure(WorkerLost(errno.EIO, why)))
        if not reason.check(ProcessDone) or pending:
            self.log.error(
                "queue worker exited ({reason}); starting another, which first discards {count} unfinished commits",
                reason=reason.getErrorMessage(),
                count=discards,
            )
        self.reactor.callLater(self.restartDelay, self._spawn)

    def stop(self) -> Deferred[None]:
        """Let the child finish what it has, print its statistics and exit."""
        self._stopping = True
        if self.transport is None:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._ended.append(d)
        self.transport.closeStdin()
        timer = self.reactor.callLater(self.stopTimeout, self._kill)
        d.addBoth(lambda result: (timer.cancel() if timer.active() else None, result)[1])
        return d

    def _kill(self) -> None:
        if self.transport is not None:
            self.log.error("queue worker did not exit in {seconds}s; killing it", seconds=self.stopTimeout)
            self.transport.signalProcess("KILL")


@implementer(IIncomingMessage)
class FilesystemIncoming:
    """
    A message being received; see L{IIncomingMessage}.

    Data is buffered in memory up to L{SPILL} bytes, then handed to the
    worker to append.  A write error of the worker is raised by the next
    L{write} and fails L{commit}; so does the death of the worker that took
    its first chunk (its generation is recorded then).
    """

    log = Logger()

    def __init__(self, store: FilesystemQueueStore, queueID: str) -> None:
        self.queue_id = queueID
        self._store = store
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._size = 0
        self._generation = 0
        self._unwritten = 0
        self._caughtUp: Deferred[None] | None = None
        self._error: Failure | None = None
        self._state = _OPEN

    def write(self, data: bytes) -> None:
        if self._state != _OPEN:
            raise ValueError(f"message {self.queue_id} is no longer open for writing")
        if self._error is None:
            self._chunks.append(data)
            self._buffered += len(data)
            self._size += len(data)
            if self._buffered >= SPILL:
                self._spill()
        if self._error is not None:
            self._error.raiseException()

    def _spill(self) -> None:
        engine = self._store.engine
        chunk = b"".join(self._chunks)
        self._chunks, self._buffered = [], 0
        if not self._generation:
            self._generation = engine.generation
        elif self._generation != engine.generation:
            self._error = Failure(WorkerLost(errno.EIO, "the queue worker was replaced during this message"))
            return
        # Requests are carried out in order: no need to wait for this one.
        self._unwritten += len(chunk)
        d = engine.submit(Request(APPEND, self.queue_id, chunk, generation=self._generation))
        d.addCallbacks(self._appended, self._spillFailed, callbackArgs=(len(chunk),))

    def _appended(self, _: object, size: int) -> None:
        self._unwritten -= size
        if self._unwritten <= MAX_UNWRITTEN // 2:
            self._release()

    def _release(self) -> None:
        caughtUp, self._caughtUp = self._caughtUp, None
        if caughtUp is not None:
            caughtUp.callback(None)

    def writable(self) -> Deferred[None] | None:
        """
        Back-pressure: None while more may be written at once, else a
        Deferred that fires once the worker has caught up (or failed, which
        the next L{write} or the commit reports).
        """
        if self._unwritten <= MAX_UNWRITTEN or self._state != _OPEN or self._error is not None:
            return None
        if self._caughtUp is None:
            self._caughtUp = Deferred()
        return self._caughtUp

    def _spillFailed(self, failure: Failure) -> None:
        if self._error is None:
            self._error = failure
        self._release()

    def commit(self, envelope: Envelope) -> Deferred[None]:
        if self._state != _OPEN:
            return fail(ValueError(f"message {self.queue_id} cannot be committed now"))
        if envelope.queue_id != self.queue_id:
            self.abort()
            return fail(ValueError(f"envelope of {envelope.queue_id} given to message {self.queue_id}"))
        self._state = _COMMITTING
        if self._error is not None:
            failure, self._state = self._error, _FAILED
            self._discard()
            self._store._ours.discard(self.queue_id)
            return fail(failure)
        try:
            payload = _encode(envelope)
            due = _nanoseconds(dueTime(envelope))
        except Exception:
            self._state = _FAILED
            failure = Failure()
            self._discard()
            return fail(failure)
        tail = b"".join(self._chunks)
        self._chunks, self._buffered = [], 0
        engine = self._store.engine
        # The worker fails the commit itself if an earlier append failed, if
        # the data it holds is not all the session sent, or if it is not the
        # worker that took the first chunk.
        request = Request(
            COMMIT,
            self.queue_id,
            tail,
            payload,
            generation=self._generation or engine.generation,
            size=self._size,
            due=due,
        )
        d = engine.submit(request)
        d.addCallbacks(self._committed, self._failed)
        return d

    def _committed(self, _: object) -> None:
        self._state = _COMMITTED

    def _failed(self, failure: Failure) -> Failure:
        # The worker has removed whatever the commit had written.
        self._state = _FAILED
        self._store._ours.discard(self.queue_id)
        return failure

    def _discard(self) -> None:
        if not self._generation:
            return  # nothing reached the disk

        def discardFailed(failure: Failure) -> None:
            # Recovery empties incoming/ at the next start.
            self.log.failure("could not remove aborted message {queue_id}", failure, queue_id=self.queue_id)

        self._store.engine.submit(Request(DISCARD, self.queue_id)).addErrback(discardFailed)

    def abort(self) -> None:
        # After a commit (in flight, done or failed) there is nothing partial left
        # that this object owns: the commit either kept the message or removed it.
        if self._state != _OPEN:
            return
        self._state = _ABORTED
        self._chunks, self._buffered = [], 0
        self._release()
        self._store._ours.discard(self.queue_id)
        self._discard()


class _DataReader(io.RawIOBase):
    """The first C{length} octets of a message file: its data, without envelope and footer."""

    def __init__(self, fd: int, length: int) -> None:
        super().__init__()
        self._fd, self._length, self._position = fd, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        wanted = min(len(view), self._length - self._position)
        if wanted <= 0:
            return 0
        count = os.preadv(self._fd, [view[:wanted]], self._position)
        self._position += count
        return count

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._length}[whence]
        if base + offset < 0:
            raise OSError(errno.EINVAL, "negative seek position")
        self._position = base + offset
        return self._position

    def tell(self) -> int:
        return self._position

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


@implementer(IQueueStore)
class FilesystemQueueStore:
    """
    See the module docstring for the layout and the commit protocol.

    @param blocking: runs recovery, scans and loads (and, without an
        C{engine}, the file work) off the reactor thread.
    @param engine: what carries out the file work; by default a
        L{ThreadEngine} over C{blocking}.
    @raise QueueInUse: another relay holds the queue's lock.
    @raise OSError: the queue directory cannot be created or locked.
    """

    log = Logger()

    def __init__(self, path: Path, blocking: Callable[..., Deferred[Any]], clock: Any, engine: Any = None) -> None:
        self.path = Path(path)
        self.incomingPath = self.path / "incoming"
        self.messagesPath = self.path / "messages"
        self._blocking = blocking
        self._clock = clock
        self._lastMicros = -1
        self._random = random.Random()  # seeded from os.urandom
        # Messages of this process, received or not yet removed: recovery runs
        # while the listeners already accept, and must leave them alone.
        self._ours: set[str] = set()
        # Messages whose journal may end in a torn record: rewritten at their next update.
        self._compact: set[str] = set()
        # The next scan also tidies what recovery left to it (see _scan).
        self._tidy = False
        makeDirectories(self.path)
        self._lockFd: int | None = self._lock()
        try:
            for directory in (self.incomingPath, self.messagesPath):
                makeDirectories(directory)
        except BaseException:
            self._unlock()
            raise
        self.engine = (
            engine if engine is not None else ThreadEngine(QueueFiles(self.path), lambda *a: self._blocking(*a))
        )

    def observeBatches(self, onBatch: Callable[[int], None] | None) -> None:
        """
        Have C{onBatch(changes)} called, on the reactor thread, once for each
        batch the engine made durable with its number of changes (commits,
        updates, removals): how much group commit saves, for the metrics.
        Optional for a store; the relay asks only for stores that have it.
        """
        self.engine.onBatch = onBatch

    # -- the lock --------------------------------------------------------

    def _lock(self) -> int:
        """
        Take the queue: two relays delivering from one queue would send
        everything twice.  The descriptor is close-on-exec, so the worker
        does not hold the lock after the relay has gone.
        """
        fd = os.open(self.path / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise QueueInUse(errno.EAGAIN, f"queue {self.path} is in use by another relay (pid {holder})") from None
        except BaseException:
            os.close(fd)
            raise
        self._writePid(fd)
        return fd

    @staticmethod
    def _writePid(fd: int) -> None:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)

    def _unlock(self) -> None:
        fd, self._lockFd = self._lockFd, None
        fsworker.closeQuietly(fd)

    # -- queue ids -------------------------------------------------------

    def newQueueID(self) -> str:  # see arrivalOf for the other direction
        """
        A queue id: microseconds of the clock, then random digits.

        Ids sort by arrival time; within one process the time part never
        repeats (it is bumped past the previous id), and the random part keeps
        ids of different runs apart when the clock was the same.
        """
        micros = max(int(self._clock.seconds() * 1_000_000), self._lastMicros + 1)
        self._lastMicros = micros
        return f"{micros:013x}{self._random.getrandbits(24):06x}"

    def _checked(self, queueID: str) -> str:
        if not QUEUE_ID.match(queueID):
            raise ValueError(f"bad queue id {queueID!r}")
        return queueID

    # -- IQueueStore -----------------------------------------------------

    def begin(self) -> FilesystemIncoming:
        incoming = FilesystemIncoming(self, self.newQueueID())
        self._ours.add(incoming.queue_id)
        return incoming

    def openData(self, queueID: str) -> BinaryIO:
        fd = os.open(self.messagesPath / self._checked(queueID), os.O_RDONLY | os.O_CLOEXEC)
        try:
            dataLength, _, _ = fsworker.readFooter(fd, queueID)
        except Damaged as e:
            os.close(fd)
            raise OSError(errno.EIO, f"message {queueID} is damaged: {e}") from None
        except BaseException:
            os.close(fd)
            raise
        return io.BufferedReader(_DataReader(fd, dataLength), 64 * 1024)  # type: ignore[return-value]

    def update(self, envelope: Envelope) -> Deferred[None]:
        try:
            queueID = self._checked(envelope.queue_id)
            request = Request(
                UPDATE,
                queueID,
                payload=_encodeState(envelope),
                due=_nanoseconds(dueTime(envelope)),
                flags=COMPACT if queueID in self._compact else 0,
            )
        except Exception:
            return fail()

        def failed(failure: Failure) -> Failure:
            # The old state stands, but the journal may end in a torn record
            # (a worker killed while writing it): the next update rewrites it.
            self._compact.add(queueID)
            return failure

        def done(_: object) -> None:
            if request.flags & COMPACT:
                self._compact.discard(queueID)

        return self.engine.submit(request).addCallbacks(done, failed)

    def remove(self, queueID: str) -> Deferred[None]:
        try:
            request = Request(REMOVE, self._checked(queueID))
        except ValueError:
            return fail()
        self._ours.discard(queueID)
        self._compact.discard(queueID)
        return self.engine.submit(request)

    def recover(self) -> Deferred[int | None]:
        """
        See L{IQueueStore.recover}: fires with C{None}, since counting a
        large queue would hold up the first 250 (a million messages took
        3 s); the scheduler's first scan counts it.
        """
        d = self._blocking(self._recover)
        d.addCallback(self._logged)
        d.addCallback(lambda _: None)
        return d

    def scan(self, before: float, limit: int, exclude: Collection[str]) -> Deferred[QueueScan]:
        tidy, self._tidy = self._tidy, False
        return self._blocking(self._scan, before, limit, exclude, tidy).addCallback(self._logged)

    def load(self, queueID: str) -> Deferred[Envelope]:
        try:
            self._checked(queueID)
        except ValueError:
            return fail()
        return self._blocking(self._load, queueID).addCallback(self._loaded, queueID)

    def stop(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        try:
            stopped = self.engine.stop()
            if isinstance(stopped, Deferred):
                await stopped
        finally:
            self._unlock()

    # -- scan and load (in a worker thread) --------------------------------

    def _scan(
        self, before: float, limit: int, exclude: Collection[str], tidy: bool = False
    ) -> tuple[QueueScan, list[tuple[str, dict[str, Any]]]]:
        """
        Every committed message's due time from its mtime: one C{stat} each,
        nothing read.  Names stream from the directory and only the earliest
        C{limit} due entries are kept (a heap), so memory is bounded by
        C{limit} whatever the queue's size.

        With C{tidy} (the first scan after L{recover}, which leaves this to
        it so as not to list the queue before the first 250), it also
        removes the journals of removed messages and counts those set
        aside.  Log lines are returned, as L{_recover}'s are.
        """
        total = 0
        later: int | None = None
        cutoff = _nanoseconds(before)
        # A max-heap (due negated) of the earliest due entries so far.
        heap: list[tuple[int, str]] = []
        first: str | None = None  # ids sort by arrival: the least is the oldest message
        orphans = damaged = 0
        directory = str(self.messagesPath)
        with os.scandir(directory) as entries:
            for entry in entries:
                name = entry.name
                if not QUEUE_ID.match(name):
                    if tidy:
                        queueID, _, suffix = name.partition(".")
                        if suffix == "damaged":
                            damaged += 1
                        elif suffix in ("state", "state.new") and not os.path.lexists(os.path.join(directory, queueID)):
                            # The journal of a removed message (ids are never
                            # reused: it can belong to no other); a live
                            # message's unfinished rewrite stays, the worker
                            # truncates it at its next one.
                            try:
                                orphans += fsworker.unlinkQuietly(entry.path)
                            except OSError:
                                pass  # tidied at a later start, then
                    continue
                try:
                    due = entry.stat().st_mtime_ns
                except FileNotFoundError:
                    continue  # removed meanwhile
                total += 1
                if (first is None or name < first) and _TIMED_ID.match(name):
                    first = name  # equal-length hex: text order is numeric order
                if name in exclude:
                    continue
                if due <= cutoff:
                    if len(heap) < limit:
                        heapq.heappush(heap, (-due, name))
                        continue
                    if heap and due < -heap[0][0]:
                        due = -heapq.heapreplace(heap, (-due, name))[0]
                if later is None or due < later:
                    later = due
        kept = sorted((-negated, name) for negated, name in heap)
        notes: list[tuple[str, dict[str, Any]]] = []
        if orphans:
            notes.append(("removed {count} journals of removed messages", {"count": orphans}))
        if damaged:
            notes.append(
                ("{count} damaged messages are set aside in messages/ (*.damaged) for an operator", {"count": damaged})
            )
        due = [(_seconds(due), name) for due, name in kept]
        oldest = None if first is None else arrivalOf(first)
        return QueueScan(due, total, None if later is None else _seconds(later), oldest), notes

    def _load(self, queueID: str) -> tuple[Envelope, bool] | Damaged:
        """The envelope with its journal's state, and whether the journal was clean; or what is wrong."""
        path = self.messagesPath / queueID
        try:
            _, raw = fsworker.readMessage(path, queueID)
            envelope = Envelope.fromJSON(json.loads(raw))
            if envelope.queue_id != queueID:
                raise Damaged(f"envelope names queue id {envelope.queue_id!r}")
            payload, clean = fsworker.readJournal(self.messagesPath / fsworker.stateName(queueID), queueID)
            if payload is not None:
                _applyState(envelope, payload)
        except FileNotFoundError:
            raise
        except (Damaged, ValueError, KeyError, TypeError) as e:
            error = e if isinstance(e, Damaged) else Damaged(f"envelope unreadable: {e}")
            self._setAside(queueID)
            return error
        return envelope, clean

    def _setAside(self, queueID: str) -> None:
        for name in (queueID, fsworker.stateName(queueID)):
            try:
                os.rename(self.messagesPath / name, self.messagesPath / (name + ".damaged"))
            except FileNotFoundError:
                pass
            except OSError:
                pass  # set aside at the next load, then

    def _loaded(self, outcome: tuple[Envelope, bool] | Damaged, queueID: str) -> Envelope:
        if isinstance(outcome, Damaged):
            self.log.error(
                "queued message {queue_id} is damaged ({error}): set aside as {name}, not delivered",
                queue_id=queueID,
                error=str(outcome),
                name=f"messages/{queueID}.damaged",
            )
            raise outcome
        envelope, clean = outcome
        if not clean:
            # A record an update could not finish: its next update rewrites the journal.
            self._compact.add(queueID)
        return envelope

    # -- recovery (in a worker thread) -------------------------------------

    def _recover(self) -> tuple[None, list[tuple[str, dict[str, Any]]]]:
        """
        Only what must happen before the first 250, in a time that does not
        grow with the queue: take the queue (the lock's pid), check that it
        can be written, discard what C{incoming/} holds (uncommitted, so few),
        and, only on a queue not yet marked as this format, convert an older
        one.  C{messages/} is not listed otherwise: the journals of removed
        messages and the count of damaged ones are left to the first scan,
        and the count of messages to the scheduler's scans.

        Log lines are returned rather than emitted: this runs in a worker
        thread, and the caller logs from the reactor thread.  Files of
        messages this process has begun are not the previous run's: they are
        left alone, whatever state they are in.
        """
        notes: list[tuple[str, dict[str, Any]]] = []
        if self._lockFd is not None:
            self._writePid(self._lockFd)  # after twistd has daemonised: the pid that runs
        for directory in (self.incomingPath, self.messagesPath):
            makeDirectories(directory)
        # A queue made by an older version may never have been made durable.
        fsyncDirectory(self.path.parent)
        fsyncDirectory(self.path)
        probe = self.incomingPath / f"probe.{os.getpid()}"
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600))
        os.unlink(probe)

        def ours(name: str) -> bool:
            return name.split(".", 1)[0] in self._ours

        discarded = 0
        with os.scandir(self.incomingPath) as entries:
            for entry in entries:
                if ours(entry.name):
                    continue
                try:
                    os.unlink(entry.path)
                    discarded += 1
                except IsADirectoryError:
                    notes.append(("unexpected directory {path} left in place", {"path": entry.path}))
        if discarded:
            notes.append(("discarded {count} uncommitted files from incoming/", {"count": discarded}))

        spare = self.path / "spare"
        old = spare.is_dir()
        if old:
            shutil.rmtree(spare)
            notes.append(("removed spare/ (recycled files of an older version)", {}))
        if old or self._format() != FORMAT:
            self._upgrade(old, notes)
        self._tidy = True
        return None, notes

    def _format(self) -> int | None:
        """
        The format the queue is marked as (L{FORMAT_FILE}), C{None} if it is
        not marked (made by an older version, or never recovered; an empty
        mark, which a lax file system may show after a power cut, is none).
        @raise ValueError: a mark this version cannot read: a newer version's
            queue, which it must not touch.
        """
        try:
            raw = (self.path / FORMAT_FILE).read_bytes().strip(b"\0 \n")
        except FileNotFoundError:
            return None
        if not raw:
            return None
        text = raw.decode("ascii", "replace")
        if text != str(FORMAT):
            raise ValueError(
                f"queue {self.path} is marked as format {text!r} in {FORMAT_FILE}; this relay reads format {FORMAT}"
            )
        return FORMAT

    def _upgrade(self, old: bool, notes: list[tuple[str, dict[str, Any]]]) -> None:
        """
        Once per queue: convert what an older version left in C{messages/},
        then mark the queue durably as this format, so that no later start
        lists it.  The names are streamed, and held in memory only when
        there is something to convert.
        """
        with os.scandir(self.messagesPath) as entries:
            older = old or any(entry.name.endswith((".json", ".json.new")) for entry in entries)
        if older:
            names = {name for name in os.listdir(self.messagesPath) if name.split(".", 1)[0] not in self._ours}
            if self._convert(names, notes):
                fsyncDirectory(self.messagesPath)
        # The mark is written only once the conversion is durable: a cut
        # before it means converting (what is left) again.
        temporary = self.path / (FORMAT_FILE + ".new")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            fsworker.writeAll(fd, f"{FORMAT}\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temporary, self.path / FORMAT_FILE)
        fsyncDirectory(self.path)

    def _convert(self, names: set[str], notes: list[tuple[str, dict[str, Any]]]) -> bool:
        """
        Bring messages of the previous format (C{<qid>} data and C{<qid>.json}
        envelope) to this one, durably, before their old files go: an upgrade
        loses nothing.  C{True} if C{messages/} changed.
        """
        changed = False
        converted = 0
        for name in sorted(names):
            if not name.endswith(".json"):
                if name.endswith(".json.new"):
                    fsworker.unlinkQuietly(self.messagesPath / name)
                    names.discard(name)
                    changed = True
                continue
            queueID = name[: -len(".json")]
            if not QUEUE_ID.match(queueID):
                continue
            envelopeFile, dataFile = self.messagesPath / name, self.messagesPath / queueID
            if queueID not in names:
                fsworker.unlinkQuietly(envelopeFile)
                names.discard(name)
                changed = True
                notes.append(
                    ("envelope {queue_id} has no data file: message lost, envelope deleted", {"queue_id": queueID})
                )
                continue
            if self._isCurrent(dataFile, queueID):
                # Converted already; the old envelope's removal was not yet durable.
                fsworker.unlinkQuietly(envelopeFile)
                names.discard(name)
                changed = True
                continue
            try:
                fields = json.loads(envelopeFile.read_bytes())
                dataSize = fields.pop("data_size", None)
                envelope = Envelope.fromJSON(fields)
                if envelope.queue_id != queueID:
                    raise ValueError(f"envelope names queue id {envelope.queue_id!r}")
            except Exception as e:
                corrupt = envelopeFile.with_name(name + ".corrupt")
                os.rename(envelopeFile, corrupt)
                names.discard(name)
                names.add(corrupt.name)  # its data stays beside it
                notes.append(
                    (
                        "envelope {name} (older format) is unreadable ({error}); kept as {corrupt} with its data",
                        {"name": name, "error": str(e) or type(e).__name__, "corrupt": corrupt.name},
                    )
                )
                continue
            if dataSize is not None and os.stat(dataFile).st_size != dataSize:
                for path in (envelopeFile, dataFile):
                    fsworker.unlinkQuietly(path)
                names.difference_update((name, queueID))
                changed = True
                notes.append(("{queue_id} was being committed (never acknowledged); deleted", {"queue_id": queueID}))
                continue
            self._rewrite(dataFile, envelope)
            fsworker.unlinkQuietly(envelopeFile)
            names.discard(name)
            changed = True
            converted += 1
        for name in sorted(names):
            if (
                QUEUE_ID.match(name)
                and name + ".json.corrupt" not in names
                and not self._isCurrent(self.messagesPath / name, name)
            ):
                # Data without an envelope, in the older format: a commit that was interrupted.
                fsworker.unlinkQuietly(self.messagesPath / name)
                names.discard(name)
                changed = True
                notes.append(("data file {queue_id} has no envelope (commit interrupted); deleted", {"queue_id": name}))
        if converted:
            notes.append(("converted {count} messages from the older queue format", {"count": converted}))
        return changed

    def _isCurrent(self, path: Path, queueID: str) -> bool:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fsworker.readFooter(fd, queueID)
        except Damaged:
            return False
        finally:
            os.close(fd)
        return True

    def _rewrite(self, dataFile: Path, envelope: Envelope) -> None:
        """Write an older-format message as a new file and rename it over its old data, durably."""
        queueID = envelope.queue_id
        temporary = self.incomingPath / queueID
        fsworker.unlinkQuietly(temporary)
        fd = fsworker.create(temporary)
        try:
            crc, size = 0, 0
            with open(dataFile, "rb") as source:
                while chunk := source.read(1 << 20):
                    fsworker.writeAll(fd, chunk)
                    crc = zlib.crc32(chunk, crc)
                    size += len(chunk)
            payload = _encode(envelope)
            crc = zlib.crc32(payload, crc)
            fsworker.writeAll(fd, payload + fsworker.footerFor(queueID, size, len(payload), crc))
            due = _nanoseconds(dueTime(envelope))
            os.utime(fd, ns=(due, due))
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            fsworker.unlinkQuietly(temporary)
            raise
        os.close(fd)
        os.rename(temporary, dataFile)
        fsyncDirectory(self.messagesPath)  # before the old envelope goes

    def _logged(self, outcome: tuple[Any, list[tuple[str, dict[str, Any]]]]) -> Any:
        """Log, from the reactor thread, what recovery or a scan found to tidy; their result."""
        value, notes = outcome
        for message, fields in notes:
            self.log.warn("queue recovery: " + message, **fields)
        return value
