"""
The file work of the filesystem queue store, done in batches.

L{QueueFiles} carries out requests (append, commit, update, remove, discard)
a batch at a time.  It runs either in a thread of the relay (unit tests, and
systems without C{fork}) or, in production, in a child process of its own
(C{python -m relay.queue.fsworker PATH SYNC}) that reads framed requests on
stdin and answers on stdout.  The child has its own interpreter lock: the
dozens of system calls of a batch never wait for the reactor thread to let go
of the GIL, and their CPU time is spent on another core.

Batches form by themselves: while one is being synced, new requests pile up
in the pipe (or the thread's queue) and all of them are the next batch.

Files are recycled rather than unlinked: a removed message's two files, and
the envelope an update replaces, go to C{spare/}, and new files are written
into spare ones and renamed into place.  Allocating and freeing inodes is the
dearest part of a queue file's life on ext4 (without a journal, each new inode
is checked against every recently freed one in its group), and a relay that
delivers as fast as it accepts would otherwise allocate two and free two per
message.

This module imports nothing from Twisted, so the child starts fast.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path

from relay.fsutil import fsyncDirectory  # imports nothing but os

APPEND, COMMIT, UPDATE, REMOVE, DISCARD = 1, 2, 3, 4, 5
OPCODES = (APPEND, COMMIT, UPDATE, REMOVE, DISCARD)

SPARES = 2048
"""Most spare files kept for reuse."""
SPARE_SIZE = 64 * 1024
"""Largest file kept as a spare: bigger ones are unlinked when removed."""

Request = tuple[int, str, bytes, bytes]  # opcode, queue id, data, envelope payload
Error = tuple[int, str]  # errno (0: not an OSError), text


def _syncfsFunction() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).syncfs  # type: ignore[no-any-return]
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


def fsyncFile(fd: int) -> None:
    os.fsync(fd)


def create(path: Path) -> int:
    """A new private file: queued mail is nobody else's business."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)


def _renameat2() -> Callable[[bytes, bytes], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    AT_FDCWD, RENAME_EXCHANGE = -100, 2

    def exchange(first: bytes, second: bytes) -> int:
        return function(AT_FDCWD, first, AT_FDCWD, second, RENAME_EXCHANGE)  # type: ignore[no-any-return]

    return exchange


_exchange = _renameat2()


def exchange(first: Path, second: Path) -> bool:
    """
    Swap two names atomically (Linux C{renameat2(RENAME_EXCHANGE)}): C{second}
    gets C{first}'s file and C{first} keeps the file C{second} had, so an
    update frees no inode.  C{False} where the system or file system cannot
    (then nothing changed).
    """
    global _exchange
    if _exchange is not None:
        if _exchange(os.fsencode(first), os.fsencode(second)) == 0:
            return True
        code = ctypes.get_errno()
        if code not in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise OSError(code, os.strerror(code), str(second))
        if code == errno.ENOSYS:
            _exchange = None
    return False


def writeAll(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def closeQuietly(fd: int | None) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


def unlinkQuietly(path: Path) -> bool:
    """Remove C{path} if it is there; C{True} if something was removed."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


class _Operation:
    """
    One request, done in three stages so that a batch shares the expensive
    part: every operation of a batch is written before any is synced, then all
    are renamed, then one sync covers every rename of the batch.
    """

    changed = False  # whether publish() changed messages/ (then it must be synced)
    writes = False  # whether prepare() wrote something that must be durable
    counted = True  # a change of the queue (not the bookkeeping of an incoming message)

    def prepare(self) -> None:
        """Write what is new."""

    def sync(self) -> None:
        """fsync what prepare() wrote (C{sync = fsync} only)."""

    def publish(self) -> None:
        """Rename or unlink into place: the change becomes visible."""

    def undo(self) -> None:
        """Leave nothing half-done behind after a failure in any stage."""


class _Append(_Operation):
    counted = False

    def __init__(self, files: QueueFiles, queueID: str, chunk: bytes) -> None:
        self.files, self.queueID, self.chunk = files, queueID, chunk

    def prepare(self) -> None:
        files = self.files
        if self.queueID in files.broken:
            raise files.broken[self.queueID]
        try:
            fd = files.open.get(self.queueID)
            if fd is None:
                fd = files.open[self.queueID] = files.newFile(files.incoming / self.queueID)
            writeAll(fd, self.chunk)
        except OSError as e:
            # The message is lost: its commit will fail with this error.
            files.broken[self.queueID] = e
            raise


class _Commit(_Operation):
    """
    With C{fsync}: written in C{incoming/}, fsynced, renamed into C{messages/}
    (data first), directory fsynced.  With C{syncfs}: written straight into
    C{messages/} and made durable by the batch's one file system sync; a
    crash before that sync completes can leave a prefix of either file, which
    recovery recognises (unparsable envelope, or data shorter than the
    envelope's C{data_size}) as a commit that was never acknowledged.
    """

    def __init__(self, files: QueueFiles, queueID: str, tail: bytes, payload: bytes) -> None:
        self.files, self.queueID, self.tail, self.payload = files, queueID, tail, payload
        self.fd: int | None = None
        self.envelopeFd: int | None = None
        self.changed = files.sync == "fsync"
        self.writes = True

    def prepare(self) -> None:
        files = self.files
        if self.queueID in files.broken:
            raise files.broken.pop(self.queueID)
        direct = files.sync == "syncfs"
        where = files.messages if direct else files.incoming
        self.fd = files.open.pop(self.queueID, None)
        if self.fd is None:
            self.fd = files.writeFile(where / self.queueID, self.tail)
        else:
            writeAll(self.fd, self.tail)
            if direct:
                os.rename(files.incoming / self.queueID, where / self.queueID)
        self.envelopeFd = files.writeFile(where / (self.queueID + ".json"), self.payload)

    def sync(self) -> None:
        assert self.fd is not None and self.envelopeFd is not None
        fsyncFile(self.fd)
        fsyncFile(self.envelopeFd)

    def publish(self) -> None:
        self._close()
        if self.files.sync == "syncfs":
            return  # in place, and durable since the batch's sync
        incoming, messages = self.files.incoming, self.files.messages
        # Data first: an envelope in messages/ always has its data beside it.
        os.rename(incoming / self.queueID, messages / self.queueID)
        os.rename(incoming / (self.queueID + ".json"), messages / (self.queueID + ".json"))

    def undo(self) -> None:
        self._close()
        self.files.discard(self.queueID, published=True)

    def _close(self) -> None:
        fd, self.fd = self.fd, None
        envelopeFd, self.envelopeFd = self.envelopeFd, None
        closeQuietly(fd)
        closeQuietly(envelopeFd)


class _Update(_Operation):
    """
    Write-new, sync, then swap: the new envelope is written into a spare file
    (or C{<qid>.json.new}), made durable, and exchanged with the old one,
    which becomes a spare.
    """

    changed = True
    writes = True

    def __init__(self, files: QueueFiles, queueID: str, payload: bytes) -> None:
        self.files = files
        self.target = files.messages / (queueID + ".json")
        self.payload = payload
        self.fd: int | None = None
        self.temporary: Path | None = None

    def prepare(self) -> None:
        spare = self.files.openSpare(self.payload)
        if spare is None:
            self.temporary = self.target.with_name(self.target.name + ".new")
            self.fd = create(self.temporary)
            writeAll(self.fd, self.payload)
        else:
            self.fd, self.temporary = spare

    def sync(self) -> None:
        assert self.fd is not None
        fsyncFile(self.fd)

    def publish(self) -> None:
        fd, self.fd = self.fd, None
        closeQuietly(fd)
        assert self.temporary is not None
        if exchange(self.temporary, self.target):
            self.files.recycle(self.temporary)  # the old envelope
        else:
            os.rename(self.temporary, self.target)
        self.temporary = None

    def undo(self) -> None:
        fd, self.fd = self.fd, None
        closeQuietly(fd)
        if self.temporary is not None:
            try:
                unlinkQuietly(self.temporary)
            except OSError:
                pass


class _Remove(_Operation):
    # Not synced on its own (IQueueStore.remove promises no durability): the
    # next batch's sync carries it; a crash before then repeats a delivery.
    def __init__(self, files: QueueFiles, queueID: str) -> None:
        self.files = files
        self.paths = (files.messages / (queueID + ".json"), files.messages / queueID)

    def publish(self) -> None:
        # Envelope first: data without an envelope is what recovery deletes.
        for path in self.paths:
            self.files.recycle(path)


class _Discard(_Operation):
    counted = False

    def __init__(self, files: QueueFiles, queueID: str) -> None:
        self.files, self.queueID = files, queueID

    def prepare(self) -> None:
        self.files.discard(self.queueID, published=False)


class QueueFiles:
    """
    The files of one queue directory, and the requests that change them.

    @ivar open: incoming data files being appended to, by queue id.
    @ivar broken: the write error of incoming messages that can no longer be
        committed, by queue id.
    """

    def __init__(self, path: Path, sync: str) -> None:
        if sync not in SYNC_MODES:
            raise ValueError(f"sync must be one of {', '.join(SYNC_MODES)} here, not {sync!r}")
        self.sync = sync
        self.incoming = Path(path) / "incoming"
        self.messages = Path(path) / "messages"
        self.spare = Path(path) / "spare"
        self.spare.mkdir(mode=0o700, exist_ok=True)
        # Spare files (name, size), and the next name; sizes of spares a
        # previous run left are unknown (-1).
        self.spares: list[tuple[str, int]] = []
        highest = 0
        for name in os.listdir(self.spare):
            if name.isdigit():
                self.spares.append((name, -1))
                highest = max(highest, int(name))
        self._nextSpare = highest + 1
        self.open: dict[str, int] = {}
        self.broken: dict[str, BaseException] = {}
        self.batches = 0
        self.changes = 0
        self.syncSeconds = 0.0

    # -- spare files --------------------------------------------------------

    def openSpare(self, content: bytes | None) -> tuple[int, Path] | None:
        """
        A spare, no longer one, open for writing: holding C{content}, or
        emptied for appending when C{content} is C{None}.  Spares that have
        gone (an operator cleaned C{spare/}) are forgotten; C{None} when none
        is left.
        """
        while self.spares:
            name, size = self.spares.pop()
            path = self.spare / name
            flags = os.O_WRONLY | os.O_CLOEXEC | (os.O_TRUNC if content is None else 0)
            try:
                fd = os.open(path, flags)
            except FileNotFoundError:
                continue
            try:
                if content is not None:
                    writeAll(fd, content)
                    if size < 0 or size > len(content):
                        os.ftruncate(fd, len(content))
            except BaseException:
                os.close(fd)
                unlinkQuietly(path)
                raise
            return fd, path
        return None

    def writeFile(self, target: Path, content: bytes) -> int:
        """
        A file at C{target} holding C{content}, open for syncing.  A spare is
        written first and renamed after, so C{target} never shows what the
        spare held before.
        """
        spare = self.openSpare(content)
        if spare is None:
            fd = create(target)
            writeAll(fd, content)
            return fd
        return self._moveSpare(spare, target)

    def newFile(self, target: Path) -> int:
        """An empty file at C{target}, for appending, from a spare if there is one."""
        spare = self.openSpare(None)
        if spare is None:
            return create(target)
        return self._moveSpare(spare, target)

    def _moveSpare(self, spare: tuple[int, Path], target: Path) -> int:
        fd, path = spare
        try:
            os.rename(path, target)
        except BaseException:
            os.close(fd)
            unlinkQuietly(path)
            raise
        return fd

    def recycle(self, path: Path) -> None:
        """
        Make C{path} a spare, or unlink it when there are enough spares or it
        is large (a spare keeps its blocks until it is reused).
        """
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            return
        if path.parent == self.spare and size <= SPARE_SIZE:
            self.spares.append((path.name, size))  # a spare already (an update's old envelope)
        elif len(self.spares) < SPARES and size <= SPARE_SIZE:
            name = str(self._nextSpare)
            try:
                os.rename(path, self.spare / name)
            except FileNotFoundError:
                return
            self._nextSpare += 1
            self.spares.append((name, size))
        else:
            unlinkQuietly(path)

    def _operation(self, request: Request) -> _Operation:
        opcode, queueID, data, payload = request
        if opcode == APPEND:
            return _Append(self, queueID, data)
        if opcode == COMMIT:
            return _Commit(self, queueID, data, payload)
        if opcode == UPDATE:
            return _Update(self, queueID, payload)
        if opcode == REMOVE:
            return _Remove(self, queueID)
        if opcode == DISCARD:
            return _Discard(self, queueID)
        raise ValueError(f"unknown opcode {opcode}")

    def run(self, requests: list[Request]) -> list[Error | None]:
        """
        Carry out a batch; the error of each request, or C{None}.

        With C{sync = fsync}, every file written is fsynced, then renamed, then
        C{messages/} is fsynced.  With C{syncfs}, one file system sync after
        writing makes the whole batch durable: one journal commit, whatever
        the batch size, where fsyncs of newly written files each force their
        own.  Only envelope updates (a rename over the old envelope, whose new
        content must be durable first) need a second sync after publishing.
        """
        operations = [self._operation(request) for request in requests]
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
                sync(self.messages)
            except OSError as e:
                for i, operation in enumerate(operations):
                    if errors[i] is None and operation.counted:
                        errors[i] = e
                        operation.undo()

        stage("prepare")
        if self.sync == "syncfs":
            if any(errors[i] is None and operation.writes for i, operation in enumerate(operations)):
                durably(syncFilesystem)
        else:
            stage("sync")
        stage("publish")
        if any(errors[i] is None and operation.changed for i, operation in enumerate(operations)):
            durably(syncFilesystem if self.sync == "syncfs" else fsyncDirectory)
        counted = sum(1 for operation in operations if operation.counted)
        if counted:
            self.batches += 1
            self.changes += counted
            self.syncSeconds += time.monotonic() - started
        return [None if e is None else (getattr(e, "errno", None) or 0, str(e)) for e in errors]

    def discard(self, queueID: str, published: bool) -> None:
        """Forget an incoming message; C{published}: its files may be in messages/ too."""
        closeQuietly(self.open.pop(queueID, None))
        self.broken.pop(queueID, None)
        paths = [self.incoming / (queueID + ".json"), self.incoming / queueID]
        if published:
            paths[:0] = [self.messages / (queueID + ".json"), self.messages / queueID]
        removed = False
        for path in paths:
            try:
                removed = unlinkQuietly(path) or removed
            except OSError:
                pass
        if removed and published:
            try:
                fsyncDirectory(self.messages)
            except OSError:
                pass

    def statistics(self) -> str:
        """One log line: what group commit achieved."""
        if not self.changes:
            return "queue store: no changes"
        return (
            f"queue store: {self.changes} changes in {self.batches} batches "
            f"({self.changes / self.batches:.1f} per batch), "
            f"{1000 * self.syncSeconds / self.changes:.3f} ms of syncing per change"
        )


# -- the pipe protocol ----------------------------------------------------------

_REQUEST = struct.Struct("!IBHII")  # request id, opcode, len(queue id), len(data), len(payload)
_REPLY = struct.Struct("!IiI")  # request id, errno (0 ok, -1 not an OSError), len(text)


def encodeRequest(requestID: int, request: Request) -> bytes:
    opcode, queueID, data, payload = request
    qid = queueID.encode("ascii")
    return _REQUEST.pack(requestID, opcode, len(qid), len(data), len(payload)) + qid + data + payload


def encodeReply(requestID: int, error: Error | None) -> bytes:
    if error is None:
        return _REPLY.pack(requestID, 0, 0)
    code, text = error
    raw = text.encode("utf-8", "replace")
    return _REPLY.pack(requestID, code or -1, len(raw)) + raw


class RequestDecoder:
    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, Request]]:
        self._buffer += data
        out: list[tuple[int, Request]] = []
        buffer, offset = self._buffer, 0
        while len(buffer) - offset >= _REQUEST.size:
            requestID, opcode, qidLength, dataLength, payloadLength = _REQUEST.unpack_from(buffer, offset)
            start = offset + _REQUEST.size
            end = start + qidLength + dataLength + payloadLength
            if len(buffer) < end:
                break
            qid = bytes(buffer[start : start + qidLength]).decode("ascii")
            data = bytes(buffer[start + qidLength : start + qidLength + dataLength])
            payload = bytes(buffer[start + qidLength + dataLength : end])
            out.append((requestID, (opcode, qid, data, payload)))
            offset = end
        del buffer[:offset]
        return out


class ReplyDecoder:
    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, Error | None]]:
        self._buffer += data
        out: list[tuple[int, Error | None]] = []
        buffer, offset = self._buffer, 0
        while len(buffer) - offset >= _REPLY.size:
            requestID, code, length = _REPLY.unpack_from(buffer, offset)
            end = offset + _REPLY.size + length
            if len(buffer) < end:
                break
            text = bytes(buffer[offset + _REPLY.size : end]).decode("utf-8", "replace")
            out.append((requestID, None if code == 0 else (max(code, 0), text)))
            offset = end
        del buffer[:offset]
        return out


def serve(files: QueueFiles, inFd: int, outFd: int, limit: int = 1 << 20) -> None:
    """
    Answer requests from C{inFd} until it is closed.  Everything already
    waiting in the pipe is one batch.
    """
    decoder = RequestDecoder()
    ended = False
    while not ended:
        chunk = os.read(inFd, limit)
        if not chunk:
            break
        frames = decoder.feed(chunk)
        while select.select([inFd], [], [], 0)[0]:
            more = os.read(inFd, limit)
            if not more:
                ended = True
                break
            frames += decoder.feed(more)
        if frames:
            errors = files.run([request for _, request in frames])
            writeAll(outFd, b"".join(encodeReply(rid, error) for (rid, _), error in zip(frames, errors, strict=True)))


def main(argv: list[str]) -> int:
    import signal

    # The relay decides when this process ends, by closing its stdin: a ^C
    # at the terminal must not kill it under a batch the relay waits for.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    path, sync = argv[1], argv[2]
    files = QueueFiles(Path(path), sync)
    serve(files, 0, 1)
    sys.stderr.write(files.statistics() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
