"""
The default queue store: one data file and one JSON envelope per message.

Layout under the store's directory::

    incoming/<qid>          data of a message still being received
    incoming/<qid>.json     its envelope, written during commit
    messages/<qid>          committed data
    messages/<qid>.json     committed envelope: its presence is the commit point

A message is renamed into C{messages/} data first, envelope second, so a crash
can leave data without an envelope (discarded at recovery: the client was never
told 250) but never an envelope that was acknowledged without its data.  Every
file is fsynced before it is renamed, and C{messages/} is fsynced after.

Group commit: all file work runs in one worker thread (C{blocking}, the
store's own thread in production), one batch at a time.  Commits, updates and
removals that arrive while a batch runs form the next one; the whole batch is
written, then synced, then renamed, then C{messages/} is synced once, and only
then do all its 250s go out.  The busier the relay, the larger the batches and
the less each message pays for durability; the reactor never waits on the disk.
"""

from __future__ import annotations

import ctypes
import json
import os
import random
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from relay.envelope import Envelope
from relay.fsutil import fsyncDirectory
from relay.interfaces import IIncomingMessage, IQueueStore

QUEUE_ID = re.compile(r"^[0-9A-Za-z]+$")

_OPEN, _COMMITTING, _COMMITTED, _FAILED, _ABORTED = range(5)


SPILL = 256 * 1024
"""Bytes of a message held in memory before they are appended to its incoming
file; most messages are smaller and never touch the disk before commit."""


def _create(path: Path) -> int:
    """A new private file: queued mail is nobody else's business."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)


def _writeAll(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsyncFile(fd: int) -> None:
    os.fsync(fd)


def _closeFd(fd: int | None) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


def _syncfsFunction() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syncfs  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


_syncfs = _syncfsFunction()
SYNC_MODES = ("syncfs", "fsync") if _syncfs is not None else ("fsync",)


def syncFilesystem(path: Path) -> None:
    """
    Make everything written to the file system that holds C{path} durable:
    data, inodes and directory entries alike (Linux C{syncfs(2)}, which
    reports write-back errors since Linux 5.8).
    """
    assert _syncfs is not None
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _syncfs(fd) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), str(path))
    finally:
        os.close(fd)


def _unlinkQuietly(path: Path) -> bool:
    """Remove C{path} if it is there; C{True} if something was removed."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def _encode(envelope: Envelope) -> bytes:
    # Serialised in the caller's thread: the scheduler keeps mutating the
    # envelope after update() returns, the worker thread must see a snapshot.
    return json.dumps(envelope.toJSON(), ensure_ascii=False, separators=(",", ":")).encode()


class _Operation:
    """
    One change to C{messages/}, done in three stages so that a batch of them
    shares the expensive part: every operation of a batch is written before
    any is synced, so the first fsync commits the file system journal for all
    of them and the later ones find little left to do; then one fsync of
    C{messages/} covers every rename of the batch.
    """

    changed = True  # whether publish() changed messages/ (then it must be synced)

    def prepare(self) -> None:
        """Write what is new (worker thread)."""

    def sync(self) -> None:
        """fsync what prepare() wrote."""

    def publish(self) -> None:
        """Rename or unlink into place: the change becomes visible."""

    def undo(self) -> None:
        """Leave nothing half-done behind after a failure in any stage."""


class _Commit(_Operation):
    def __init__(self, store: FilesystemQueueStore, queueID: str, fd: int | None, tail: bytes, payload: bytes) -> None:
        self.store = store
        self.queueID = queueID
        self.fd = fd
        self.tail = tail
        self.payload = payload
        self.envelopeFd: int | None = None

    def prepare(self) -> None:
        incoming = self.store.incomingPath
        if self.fd is None:
            self.fd = _create(incoming / self.queueID)
        _writeAll(self.fd, self.tail)
        self.envelopeFd = _create(incoming / (self.queueID + ".json"))
        _writeAll(self.envelopeFd, self.payload)

    def sync(self) -> None:
        assert self.fd is not None and self.envelopeFd is not None
        _fsyncFile(self.fd)
        _fsyncFile(self.envelopeFd)

    def publish(self) -> None:
        self._close()
        incoming, messages = self.store.incomingPath, self.store.messagesPath
        # Data first: an envelope in messages/ always has its data beside it.
        os.rename(incoming / self.queueID, messages / self.queueID)
        os.rename(incoming / (self.queueID + ".json"), messages / (self.queueID + ".json"))

    def undo(self) -> None:
        self._close()
        self.store._discardCommit(self.queueID)

    def _close(self) -> None:
        fd, self.fd = self.fd, None
        envelopeFd, self.envelopeFd = self.envelopeFd, None
        _closeFd(fd)
        _closeFd(envelopeFd)


class _Update(_Operation):
    def __init__(self, target: Path, payload: bytes) -> None:
        self.target = target
        self.temporary = target.with_name(target.name + ".new")
        self.payload = payload
        self.fd: int | None = None

    def prepare(self) -> None:
        self.fd = _create(self.temporary)
        _writeAll(self.fd, self.payload)

    def sync(self) -> None:
        assert self.fd is not None
        _fsyncFile(self.fd)

    def publish(self) -> None:
        fd, self.fd = self.fd, None
        _closeFd(fd)
        os.rename(self.temporary, self.target)

    def undo(self) -> None:
        fd, self.fd = self.fd, None
        _closeFd(fd)
        try:
            _unlinkQuietly(self.temporary)
        except OSError:
            pass


class _Remove(_Operation):
    def __init__(self, *paths: Path) -> None:
        self.paths = paths
        self.changed = False

    def publish(self) -> None:
        for path in self.paths:
            self.changed = _unlinkQuietly(path) or self.changed


class _Batcher:
    """
    Group commit: one batch of operations in the worker at a time; whatever
    arrives while it runs becomes the next batch, so the busier the relay,
    the more messages share each round of fsyncs.
    """

    def __init__(self, run: Callable[[list[_Operation]], list[BaseException | None]], store: Any) -> None:
        self._run = run
        self._store = store
        self._running = False
        self._waiting: list[tuple[_Operation, Deferred[None]]] = []

    def submit(self, operation: _Operation) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self._waiting.append((operation, d))
        if not self._running:
            self._start()
        return d

    def _start(self) -> None:
        batch, self._waiting = self._waiting, []
        self._running = True
        self._store._blocking(self._run, [operation for operation, _ in batch]).addBoth(self._done, batch)

    def _done(self, outcome: Any, batch: list[tuple[_Operation, Deferred[None]]]) -> None:
        self._running = False
        if self._waiting:
            self._start()
        for i, (_, d) in enumerate(batch):
            if isinstance(outcome, Failure):
                d.errback(outcome)
            elif outcome[i] is None:
                d.callback(None)
            else:
                d.errback(Failure(outcome[i]))


@implementer(IIncomingMessage)
class FilesystemIncoming:
    """
    A message being received; see L{IIncomingMessage}.

    Data is buffered in memory up to L{SPILL} bytes, then appended to
    C{incoming/<qid>} in the worker, so the reactor never creates or writes a
    file (file creation waits for the file system journal, which the commits
    of other messages keep busy).  A write error of the worker is raised by the
    next L{write} or fails L{commit}.
    """

    log = Logger()

    def __init__(self, store: FilesystemQueueStore, queueID: str) -> None:
        self.queue_id = queueID
        self._store = store
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._fd: int | None = None
        self._spilling: Deferred[None] | None = None
        self._error: Failure | None = None
        self._state = _OPEN

    def write(self, data: bytes) -> None:
        if self._state != _OPEN:
            raise ValueError(f"message {self.queue_id} is no longer open for writing")
        if self._error is None:
            self._chunks.append(data)
            self._buffered += len(data)
            if self._buffered >= SPILL:
                self._spill()
        if self._error is not None:
            self._error.raiseException()

    def _spill(self) -> None:
        chunk = b"".join(self._chunks)
        self._chunks, self._buffered = [], 0
        if self._spilling is None:
            self._spilling = succeed(None)
        self._spilling.addCallback(lambda _: self._store._blocking(self._append, chunk))
        self._spilling.addErrback(self._spillFailed)

    def _append(self, chunk: bytes) -> None:
        if self._error is not None:
            return
        if self._fd is None:
            self._fd = _create(self._store.incomingPath / self.queue_id)
        _writeAll(self._fd, chunk)

    def _spillFailed(self, failure: Failure) -> None:
        self._error = failure

    def commit(self, envelope: Envelope) -> Deferred[None]:
        if self._state != _OPEN:
            return fail(ValueError(f"message {self.queue_id} cannot be committed now"))
        if envelope.queue_id != self.queue_id:
            self.abort()
            return fail(ValueError(f"envelope of {envelope.queue_id} given to message {self.queue_id}"))
        self._state = _COMMITTING
        try:
            payload = _encode(envelope)
        except Exception:
            return self._failed(Failure())
        tail = b"".join(self._chunks)
        self._chunks, self._buffered = [], 0
        if self._spilling is None:
            d = self._submit(payload, tail)
        else:
            d = self._spilling
            d.addCallback(lambda _: self._submit(payload, tail))
        d.addCallbacks(self._committed, self._failed)
        return d

    def _submit(self, payload: bytes, tail: bytes) -> Deferred[None]:
        if self._error is not None:
            return fail(self._error)
        fd, self._fd = self._fd, None  # the operation owns it now, and closes it
        return self._store._batcher.submit(_Commit(self._store, self.queue_id, fd, tail, payload))

    def _committed(self, _: object) -> None:
        self._state = _COMMITTED

    def _failed(self, failure: Failure) -> Deferred[None]:
        self._state = _FAILED
        d = self._store._blocking(self._discard)

        def cleanupFailed(cleanup: Failure) -> None:
            self.log.failure("could not clean up after failed commit of {queue_id}", cleanup, queue_id=self.queue_id)

        d.addErrback(cleanupFailed)
        d.addCallback(lambda _: failure)
        return d

    def _discard(self) -> None:
        fd, self._fd = self._fd, None
        _closeFd(fd)
        self._store._discardCommit(self.queue_id)

    def abort(self) -> None:
        # After a commit (in flight, done or failed) there is nothing partial left
        # that this object owns: the commit either kept the message or removed it.
        if self._state != _OPEN:
            return
        self._state = _ABORTED
        self._chunks, self._buffered = [], 0
        if self._spilling is None:
            return  # nothing reached the disk

        def discard(_: object) -> Deferred[None]:
            return self._store._blocking(self._discard)

        def discardFailed(failure: Failure) -> None:
            # Recovery empties incoming/ at the next start.
            self.log.failure("could not remove aborted message {queue_id}", failure, queue_id=self.queue_id)

        self._spilling.addBoth(discard).addErrback(discardFailed)


@implementer(IQueueStore)
class FilesystemQueueStore:
    """See the module docstring for the layout and the commit protocol."""

    log = Logger()

    def __init__(
        self, path: Path, blocking: Callable[..., Deferred[Any]], clock: Any, sync: str = SYNC_MODES[0]
    ) -> None:
        if sync not in SYNC_MODES:
            raise ValueError(f"sync must be one of {', '.join(SYNC_MODES)} here, not {sync!r}")
        self.sync = sync
        self.path = Path(path)
        self.incomingPath = self.path / "incoming"
        self.messagesPath = self.path / "messages"
        self._blocking = blocking
        self._clock = clock
        self._lastMicros = -1
        self._random = random.Random()  # seeded from os.urandom
        for directory in (self.path, self.incomingPath, self.messagesPath):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._batcher = _Batcher(self._runBatch, self)
        # Written by the worker only (one batch at a time), read at stop().
        self.batches = 0
        self.operations = 0
        self.syncSeconds = 0.0

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

    def _messageFile(self, queueID: str, suffix: str = "") -> Path:
        if not QUEUE_ID.match(queueID):
            raise ValueError(f"bad queue id {queueID!r}")
        return self.messagesPath / (queueID + suffix)

    # -- IQueueStore -----------------------------------------------------

    def begin(self) -> FilesystemIncoming:
        return FilesystemIncoming(self, self.newQueueID())

    def openData(self, queueID: str) -> BinaryIO:
        return open(self._messageFile(queueID), "rb")

    def update(self, envelope: Envelope) -> Deferred[None]:
        try:
            target = self._messageFile(envelope.queue_id, ".json")
            payload = _encode(envelope)
        except Exception:
            return fail()
        return self._batcher.submit(_Update(target, payload))

    def remove(self, queueID: str) -> Deferred[None]:
        try:
            data = self._messageFile(queueID)
        except ValueError:
            return fail()
        return self._batcher.submit(_Remove(data.with_name(queueID + ".json"), data))

    def recover(self) -> Deferred[list[Envelope]]:
        d = self._blocking(self._scan)
        d.addCallback(self._recovered)
        return d

    def stop(self) -> None:
        if self.operations:
            self.log.info(
                "queue store: {operations} changes in {batches} batches ({perBatch:.1f} per batch), "
                "{perChange:.3f} ms of syncing per change",
                operations=self.operations,
                batches=self.batches,
                perBatch=self.operations / self.batches,
                perChange=1000 * self.syncSeconds / self.operations,
            )

    # -- worker-thread parts ---------------------------------------------

    def _runBatch(self, operations: list[_Operation]) -> list[BaseException | None]:
        """
        Carry out a batch; the error of each operation, or C{None}.

        With C{sync = fsync}, every file written is fsynced, then renamed, then
        C{messages/} is fsynced.  With C{syncfs}, two file system syncs replace
        them: one after writing (data durable before any name points at it),
        one after renaming.  That is one journal commit each, whatever the
        batch size, where fsyncs of newly written files each force their own.
        """
        errors: list[BaseException | None] = [None] * len(operations)
        started = time.monotonic()

        def stage(name: str) -> None:
            for i, operation in enumerate(operations):
                if errors[i] is None:
                    try:
                        getattr(operation, name)()
                    except Exception as e:
                        errors[i] = e
                        operation.undo()

        def durably(sync: Callable[[Path], None]) -> None:
            try:
                sync(self.messagesPath)
            except OSError as e:
                for i, operation in enumerate(operations):
                    if errors[i] is None:
                        errors[i] = e
                        operation.undo()

        stage("prepare")
        if self.sync == "syncfs":
            durably(syncFilesystem)
        else:
            stage("sync")
        stage("publish")
        if any(errors[i] is None and operation.changed for i, operation in enumerate(operations)):
            durably(syncFilesystem if self.sync == "syncfs" else fsyncDirectory)
        self.batches += 1
        self.operations += len(operations)
        self.syncSeconds += time.monotonic() - started
        return errors

    def _discardCommit(self, queueID: str) -> None:
        removed = False
        for path in (
            self.messagesPath / (queueID + ".json"),
            self.messagesPath / queueID,
            self.incomingPath / (queueID + ".json"),
            self.incomingPath / queueID,
        ):
            try:
                removed = _unlinkQuietly(path) or removed
            except OSError:
                pass
        if removed:
            try:
                fsyncDirectory(self.messagesPath)
            except OSError:
                pass

    def _scan(self) -> tuple[list[Envelope], list[tuple[str, dict[str, Any]]]]:
        """
        Sort out what a previous run left behind.

        Log lines are returned rather than emitted: this runs in a worker
        thread, and the caller logs from the reactor thread.
        """
        notes: list[tuple[str, dict[str, Any]]] = []
        for directory in (self.path, self.incomingPath, self.messagesPath):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)

        discarded = 0
        for entry in os.scandir(self.incomingPath):
            try:
                os.unlink(entry.path)
                discarded += 1
            except IsADirectoryError:
                notes.append(("unexpected directory {path} left in place", {"path": entry.path}))
        if discarded:
            notes.append(("discarded {count} uncommitted files from incoming/", {"count": discarded}))

        names = set(os.listdir(self.messagesPath))
        envelopes: list[Envelope] = []
        for name in sorted(names):
            if name.endswith(".json.new"):
                _unlinkQuietly(self.messagesPath / name)
                continue
            if not name.endswith(".json"):
                continue
            queueID = name[: -len(".json")]
            if not QUEUE_ID.match(queueID):
                continue
            envelopeFile = self.messagesPath / name
            if queueID not in names:
                _unlinkQuietly(envelopeFile)
                notes.append(
                    (
                        "envelope {queue_id} has no data file: message lost, envelope deleted",
                        {"queue_id": queueID},
                    )
                )
                continue
            try:
                envelope = Envelope.fromJSON(json.loads(envelopeFile.read_bytes()))
                if envelope.queue_id != queueID:
                    raise ValueError(f"envelope names queue id {envelope.queue_id!r}")
            except Exception as e:
                # Never fatal and never silent: an operator may be able to repair it.
                names.add(self._setAside(envelopeFile, e, notes))
                continue
            envelopes.append(envelope)

        for name in sorted(names):
            if not QUEUE_ID.match(name):
                continue
            if name + ".json" in names or name + ".json.corrupt" in names:
                continue
            if _unlinkQuietly(self.messagesPath / name):
                notes.append(("data file {queue_id} has no envelope (commit interrupted); deleted", {"queue_id": name}))
        return envelopes, notes

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
