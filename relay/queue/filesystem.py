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
file is fsynced before it is renamed, and C{messages/} is fsynced after; those
directory fsyncs are shared by all the messages that are waiting for one at the
same time (group commit), so a burst of messages costs few directory syncs.

All file work except opening and appending to the incoming data file runs
through C{blocking}, a thread pool in production, so a slow disk never stalls
the reactor.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from relay.envelope import Envelope
from relay.fsutil import fsyncDirectory
from relay.interfaces import IIncomingMessage, IQueueStore

QUEUE_ID = re.compile(r"^[0-9A-Za-z]+$")

_OPEN, _COMMITTING, _COMMITTED, _FAILED, _ABORTED = range(5)


def _private(path: str, flags: int) -> int:
    """Opener for C{open()}: queued mail is nobody else's business."""
    return os.open(path, flags, 0o600)


def _unlinkQuietly(path: Path) -> bool:
    """Remove C{path} if it is there; C{True} if something was removed."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def _writeDurably(path: Path, payload: bytes) -> None:
    with open(path, "wb", opener=_private) as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())


def _encode(envelope: Envelope) -> bytes:
    # Serialised in the caller's thread: the scheduler keeps mutating the
    # envelope after update() returns, the worker thread must see a snapshot.
    return json.dumps(envelope.toJSON(), ensure_ascii=False, separators=(",", ":")).encode()


class _GroupSync:
    """
    Coalesces fsyncs of one directory.

    A caller that asks while a sync is running cannot know whether that sync
    saw its rename, so it waits for the next one; everybody who asked in the
    meantime shares that next sync.
    """

    def __init__(self, path: Path, blocking: Callable[..., Deferred[Any]]) -> None:
        self._path = path
        self._blocking = blocking
        self._running = False
        self._waiting: list[Deferred[None]] = []

    def sync(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self._waiting.append(d)
        if not self._running:
            self._start()
        return d

    def _start(self) -> None:
        waiters, self._waiting = self._waiting, []
        self._running = True
        self._blocking(fsyncDirectory, self._path).addBoth(self._done, waiters)

    def _done(self, result: object, waiters: list[Deferred[None]]) -> None:
        self._running = False
        if self._waiting:
            self._start()
        for d in waiters:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(None)


@implementer(IIncomingMessage)
class FilesystemIncoming:
    """A message being written to C{incoming/}; see L{IIncomingMessage}."""

    log = Logger()

    def __init__(self, store: FilesystemQueueStore, queueID: str) -> None:
        self.queue_id = queueID
        self._store = store
        self._path = store.incomingPath / queueID
        self._file: BinaryIO | None = open(self._path, "wb", opener=_private)
        self._state = _OPEN

    def write(self, data: bytes) -> None:
        if self._state != _OPEN or self._file is None:
            raise ValueError(f"message {self.queue_id} is no longer open for writing")
        self._file.write(data)

    def commit(self, envelope: Envelope) -> Deferred[None]:
        if self._state != _OPEN or self._file is None:
            return fail(ValueError(f"message {self.queue_id} cannot be committed now"))
        if envelope.queue_id != self.queue_id:
            self.abort()
            return fail(ValueError(f"envelope of {envelope.queue_id} given to message {self.queue_id}"))
        self._state = _COMMITTING
        f, self._file = self._file, None
        try:
            payload = _encode(envelope)
            f.flush()
        except Exception:
            failure = Failure()
            _closeQuietly(f)
            return self._failed(failure)
        store = self._store
        d = store._blocking(store._commitFiles, f, self.queue_id, payload)
        d.addCallback(lambda _: store._syncMessages())
        d.addCallbacks(self._committed, self._failed)
        return d

    def _committed(self, _: object) -> None:
        self._state = _COMMITTED

    def _failed(self, failure: Failure) -> Deferred[None]:
        self._state = _FAILED
        d = self._store._blocking(self._store._discardCommit, self.queue_id)

        def cleanupFailed(cleanup: Failure) -> None:
            self.log.failure("could not clean up after failed commit of {queue_id}", cleanup, queue_id=self.queue_id)

        d.addErrback(cleanupFailed)
        d.addCallback(lambda _: failure)
        return d

    def abort(self) -> None:
        # After a commit (in flight, done or failed) there is nothing partial left
        # that this object owns: the commit either kept the message or removed it.
        if self._state != _OPEN:
            return
        self._state = _ABORTED
        f, self._file = self._file, None
        if f is not None:
            _closeQuietly(f)
        try:
            _unlinkQuietly(self._path)
        except OSError:
            # Recovery empties incoming/ at the next start.
            self.log.failure("could not remove aborted message {queue_id}", queue_id=self.queue_id)


def _closeQuietly(f: BinaryIO) -> None:
    # A close after a failed write retries the flush and fails again (ENOSPC);
    # the descriptor is released either way.
    try:
        f.close()
    except OSError:
        pass


@implementer(IQueueStore)
class FilesystemQueueStore:
    """See the module docstring for the layout and the commit protocol."""

    log = Logger()

    def __init__(self, path: Path, blocking: Callable[..., Deferred[Any]], clock: Any) -> None:
        self.path = Path(path)
        self.incomingPath = self.path / "incoming"
        self.messagesPath = self.path / "messages"
        self._blocking = blocking
        self._clock = clock
        self._lastMicros = -1
        for directory in (self.path, self.incomingPath, self.messagesPath):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._messagesSync = _GroupSync(self.messagesPath, blocking)

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
        return f"{micros:013x}{secrets.token_hex(3)}"

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
        d = self._blocking(self._replaceEnvelope, target, payload)
        d.addCallback(lambda _: self._syncMessages())
        return d

    def remove(self, queueID: str) -> Deferred[None]:
        try:
            data = self._messageFile(queueID)
        except ValueError:
            return fail()
        d = self._blocking(self._removeFiles, data.with_name(queueID + ".json"), data)
        d.addCallback(lambda removed: self._syncMessages() if removed else None)
        return d

    def recover(self) -> Deferred[list[Envelope]]:
        d = self._blocking(self._scan)
        d.addCallback(self._recovered)
        return d

    def stop(self) -> None:
        pass

    # -- worker-thread parts ---------------------------------------------

    def _syncMessages(self) -> Deferred[None]:
        return self._messagesSync.sync()

    def _commitFiles(self, f: BinaryIO, queueID: str, payload: bytes) -> None:
        try:
            os.fsync(f.fileno())
        finally:
            f.close()
        envelopeFile = self.incomingPath / (queueID + ".json")
        _writeDurably(envelopeFile, payload)
        os.rename(self.incomingPath / queueID, self.messagesPath / queueID)
        os.rename(envelopeFile, self.messagesPath / (queueID + ".json"))

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

    def _replaceEnvelope(self, target: Path, payload: bytes) -> None:
        temporary = target.with_name(target.name + ".new")
        try:
            _writeDurably(temporary, payload)
            os.rename(temporary, target)
        except BaseException:
            try:
                _unlinkQuietly(temporary)
            except OSError:
                pass
            raise

    def _removeFiles(self, *paths: Path) -> bool:
        removed = False
        for path in paths:
            removed = _unlinkQuietly(path) or removed
        return removed

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
