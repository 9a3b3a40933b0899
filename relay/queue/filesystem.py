"""
The default queue store: one data file and one JSON envelope per message.

Layout under the store's directory::

    incoming/<qid>          data of a message still being received
    incoming/<qid>.json     its envelope, written during commit
    messages/<qid>          committed data
    messages/<qid>.json     committed envelope: its presence is the commit point
    spare/<n>               files of removed messages and replaced envelopes,
                            reused for new ones (see L{relay.queue.fsworker})

With C{sync = fsync}, a message is renamed into C{messages/} data first,
envelope second, so a crash can leave data without an envelope (discarded at
recovery: the client was never told 250) but never an envelope that was
acknowledged without its data; every file is durable before it is renamed,
and the renames are durable before the 250 goes out.  With C{sync = syncfs},
both files are written in place and one file system sync makes the batch
durable; the envelope carries C{data_size}, so recovery deletes a commit that
a crash cut short (an empty envelope, or shorter data), never acknowledged.

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
import itertools
import json
import os
import random
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ProcessDone
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from relay.envelope import Envelope
from relay.fsutil import writeNow
from relay.interfaces import IIncomingMessage, IQueueStore
from relay.queue import fsworker
from relay.queue.fsworker import APPEND, COMMIT, DISCARD, REMOVE, SYNC_MODES, UPDATE, QueueFiles, Request

__all__ = ["SYNC_MODES", "FilesystemQueueStore", "ProcessEngine", "ThreadEngine", "QUEUE_ID", "SPILL"]

QUEUE_ID = re.compile(r"^[0-9A-Za-z]+$")

SPILL = 256 * 1024
"""Bytes of a message held in memory before they are appended to its incoming
file; most messages are smaller and never touch the disk before commit."""

MAX_UNWRITTEN = 4 * SPILL
"""Bytes of one message handed to the worker and not yet written by it.
Past this, L{FilesystemIncoming.writable} asks the session to stop reading
from its client until the worker catches up: a client faster than the disk
costs the relay this much memory, not the whole message."""

_OPEN, _COMMITTING, _COMMITTED, _FAILED, _ABORTED = range(5)


_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def _encode(envelope: Envelope, dataSize: int | None = None) -> bytes:
    # Serialised in the caller's thread: the scheduler keeps mutating the
    # envelope after update() returns, the worker must see a snapshot.
    fields = envelope.toJSON()
    if dataSize is not None:
        # Recovery compares it with the data file: a shorter file is a commit
        # a crash interrupted before its sync, never acknowledged.
        fields["data_size"] = dataSize
    return _JSON.encode(fields).encode()


def _error(error: fsworker.Error) -> OSError:
    code, text = error
    return OSError(code or errno.EIO, text)


class ThreadEngine:
    """
    Runs L{QueueFiles} through C{blocking} (inline in unit tests, a thread of
    its own otherwise), one batch at a time; what arrives meanwhile waits and
    becomes the next batch.
    """

    log = Logger()

    def __init__(self, files: QueueFiles, blocking: Callable[..., Deferred[Any]]) -> None:
        self.files = files
        self.blocking = blocking
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

    If the child dies, what it was doing fails (the clients get 451 and try
    again; leftovers are sorted out by the next recovery) and a new one is
    started a second later.
    """

    log = Logger()
    restartDelay = 1.0
    stopTimeout = 30.0

    def __init__(self, reactor: Any, path: Path, sync: str) -> None:
        self.reactor = reactor
        self.path = path
        self.sync = sync
        self._ids = itertools.count(1)
        self._pending: dict[int, Deferred[None]] = {}
        self._outbox: list[bytes] = []
        self._decoder = fsworker.ReplyDecoder()
        self._stopping = False
        self._ended: list[Deferred[None]] = []
        self._stderr = b""
        reactor.callWhenRunning(self._spawn)

    def _spawn(self) -> None:
        if self._stopping:
            return
        self._decoder = fsworker.ReplyDecoder()
        argv = [sys.executable, "-m", "relay.queue.fsworker", str(self.path), self.sync]
        self.reactor.spawnProcess(self, sys.executable, argv, env=dict(os.environ), childFDs={0: "w", 1: "r", 2: "r"})

    def connectionMade(self) -> None:
        outbox, self._outbox = self._outbox, []
        if outbox:
            self.transport.write(b"".join(outbox))

    def submit(self, request: Request) -> Deferred[None]:
        requestID = next(self._ids)
        d: Deferred[None] = Deferred()
        self._pending[requestID] = d
        frame = fsworker.encodeRequest(requestID, request)
        if self.transport is not None and not self._stopping:
            self._write(frame)
        else:
            self._outbox.append(frame)
        return d

    def _write(self, data: bytes) -> None:
        # Straight into the pipe: the worker starts on this request while the
        # reactor is still busy with others.
        writer = getattr(self.transport, "pipes", {}).get(0)
        if writer is None:
            self.transport.write(data)
        else:
            writeNow(writer, data, lambda chunk: os.write(writer.fd, chunk))

    def outReceived(self, data: bytes) -> None:
        for requestID, error in self._decoder.feed(data):
            d = self._pending.pop(requestID, None)
            if d is None:
                continue
            if error is None:
                d.callback(None)
            else:
                d.errback(Failure(_error(error)))

    def errReceived(self, data: bytes) -> None:
        self._stderr += data
        *lines, self._stderr = self._stderr.split(b"\n")
        for line in lines:
            if line.strip():
                self.log.info("{line}", line=line.decode("utf-8", "replace"))

    def processEnded(self, reason: Failure) -> None:
        self.transport = None
        pending, self._pending = self._pending, {}
        for d in pending.values():
            d.errback(Failure(OSError(errno.EIO, f"queue worker exited: {reason.getErrorMessage()}")))
        if self._stopping:
            ended, self._ended = self._ended, []
            for d in ended:
                d.callback(None)
            return
        if not reason.check(ProcessDone) or pending:
            self.log.error("queue worker exited ({reason}); starting another", reason=reason.getErrorMessage())
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
    L{write} and fails L{commit}.
    """

    log = Logger()

    def __init__(self, store: FilesystemQueueStore, queueID: str) -> None:
        self.queue_id = queueID
        self._store = store
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._size = 0
        self._spilled = False
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
        chunk = b"".join(self._chunks)
        self._chunks, self._buffered = [], 0
        self._spilled = True
        # Requests are carried out in order: no need to wait for this one.
        self._unwritten += len(chunk)
        d = self._store.engine.submit((APPEND, self.queue_id, chunk, b""))
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
        try:
            payload = _encode(envelope, self._size)
        except Exception:
            self._state = _FAILED
            failure = Failure()
            self._discard()
            return fail(failure)
        tail = b"".join(self._chunks)
        self._chunks, self._buffered = [], 0
        # The worker fails the commit itself if an earlier append failed.
        d = self._store.engine.submit((COMMIT, self.queue_id, tail, payload))
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
        if not self._spilled:
            return  # nothing reached the disk

        def discardFailed(failure: Failure) -> None:
            # Recovery empties incoming/ at the next start.
            self.log.failure("could not remove aborted message {queue_id}", failure, queue_id=self.queue_id)

        self._store.engine.submit((DISCARD, self.queue_id, b"", b"")).addErrback(discardFailed)

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


@implementer(IQueueStore)
class FilesystemQueueStore:
    """
    See the module docstring for the layout and the commit protocol.

    @param blocking: runs recovery (and, without an C{engine}, the file work)
        off the reactor thread.
    @param engine: what carries out the file work; by default a
        L{ThreadEngine} over C{blocking}.
    """

    log = Logger()

    def __init__(
        self,
        path: Path,
        blocking: Callable[..., Deferred[Any]],
        clock: Any,
        sync: str = SYNC_MODES[0],
        engine: Any = None,
    ) -> None:
        self.sync = sync
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
        for directory in (self.path, self.incomingPath, self.messagesPath):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        files = QueueFiles(self.path, sync)  # checks sync
        self.engine = engine if engine is not None else ThreadEngine(files, lambda *a: self._blocking(*a))

    # -- queue ids -------------------------------------------------------

    def newQueueID(self) -> str:
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
        return open(self.messagesPath / self._checked(queueID), "rb")

    def update(self, envelope: Envelope) -> Deferred[None]:
        try:
            request = (UPDATE, self._checked(envelope.queue_id), b"", _encode(envelope))
        except Exception:
            return fail()
        return self.engine.submit(request)

    def remove(self, queueID: str) -> Deferred[None]:
        try:
            request = (REMOVE, self._checked(queueID), b"", b"")
        except ValueError:
            return fail()
        self._ours.discard(queueID)
        return self.engine.submit(request)

    def recover(self) -> Deferred[list[Envelope]]:
        d = self._blocking(self._scan)
        d.addCallback(self._recovered)
        return d

    def stop(self) -> Deferred[None] | None:
        return self.engine.stop()

    # -- recovery (in a worker thread) -------------------------------------

    def _scan(self) -> tuple[list[Envelope], list[tuple[str, dict[str, Any]]]]:
        """
        Sort out what a previous run left behind.

        Log lines are returned rather than emitted: this runs in a worker
        thread, and the caller logs from the reactor thread.  Files of
        messages this process has begun are not the previous run's: they are
        left alone, whatever state they are in.
        """
        notes: list[tuple[str, dict[str, Any]]] = []

        def ours(name: str) -> bool:
            return name.split(".", 1)[0] in self._ours

        for directory in (self.path, self.incomingPath, self.messagesPath):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)

        discarded = 0
        for entry in os.scandir(self.incomingPath):
            if ours(entry.name):
                continue
            try:
                os.unlink(entry.path)
                discarded += 1
            except IsADirectoryError:
                notes.append(("unexpected directory {path} left in place", {"path": entry.path}))
        if discarded:
            notes.append(("discarded {count} uncommitted files from incoming/", {"count": discarded}))

        names = {name for name in os.listdir(self.messagesPath) if not ours(name)}
        envelopes: list[Envelope] = []
        for name in sorted(names):
            if name.endswith(".json.new"):
                fsworker.unlinkQuietly(self.messagesPath / name)
                continue
            if not name.endswith(".json"):
                continue
            queueID = name[: -len(".json")]
            if not QUEUE_ID.match(queueID):
                continue
            envelopeFile = self.messagesPath / name
            if queueID not in names:
                fsworker.unlinkQuietly(envelopeFile)
                notes.append(
                    (
                        "envelope {queue_id} has no data file: message lost, envelope deleted",
                        {"queue_id": queueID},
                    )
                )
                continue
            try:
                raw = envelopeFile.read_bytes()
                if not raw:
                    # Created, never written: a commit a crash cut short before its
                    # sync, so never acknowledged (C{sync = syncfs} writes in place).
                    self._discardInterrupted(queueID, names, notes)
                    continue
                fields = json.loads(raw)
                envelope = Envelope.fromJSON(fields)
                if envelope.queue_id != queueID:
                    raise ValueError(f"envelope names queue id {envelope.queue_id!r}")
            except Exception as e:
                # Never fatal and never silent: an operator may be able to repair it.
                names.add(self._setAside(envelopeFile, e, notes))
                continue
            dataSize = fields.get("data_size")
            if dataSize is not None and os.stat(self.messagesPath / queueID).st_size != dataSize:
                self._discardInterrupted(queueID, names, notes)
                continue
            envelopes.append(envelope)

        for name in sorted(names):
            if not QUEUE_ID.match(name):
                continue
            if name + ".json" in names or name + ".json.corrupt" in names:
                continue
            if fsworker.unlinkQuietly(self.messagesPath / name):
                notes.append(("data file {queue_id} has no envelope (commit interrupted); deleted", {"queue_id": name}))
        return envelopes, notes

    def _discardInterrupted(self, queueID: str, names: set[str], notes: list[tuple[str, dict[str, Any]]]) -> None:
        fsworker.unlinkQuietly(self.messagesPath / (queueID + ".json"))
        fsworker.unlinkQuietly(self.messagesPath / queueID)
        names.discard(queueID)
        notes.append(("{queue_id} was being committed (never acknowledged); deleted", {"queue_id": queueID}))

    def _setAside(self, envelopeFile: Path, error: Exception, notes: list[tuple[str, dict[str, Any]]]) -> str:
        """Rename an unreadable envelope to C{.corrupt}; its data file is kept beside it."""
        corrupt = envelopeFile.name + ".corrupt"
        fields = {"name": envelopeFile.name, "error": str(error) or type(error).__name__, "corrupt": corrupt}
        try:
            os.rename(envelopeFile, envelopeFile.with_name(corrupt))
        except OSError as e:
            fields["renameError"] = str(e)
            notes.append(("envelope {name} is unreadable ({error}) and could not be renamed: {renameError}", fields))
            return envelopeFile.name
        notes.append(("envelope {name} is unreadable ({error}); kept as {corrupt}", fields))
        return corrupt

    def _recovered(self, scanned: tuple[list[Envelope], list[tuple[str, dict[str, Any]]]]) -> list[Envelope]:
        envelopes, notes = scanned
        for message, fields in notes:
            self.log.warn("queue recovery: " + message, **fields)
        return envelopes
