"""
A FUSE file system with a strictly volatile page cache, for power-cut tests.

POSIX promises little about a crash: a file's content is on disk once that
file was fsynced, and a name (create, rename, unlink, link, mkdir, rmdir) once
its directory was fsynced.  Real file systems usually keep more (ext4 commits
its journal every few seconds, and its data=ordered mode writes new blocks
before the metadata that points at them), which is why a store that relies on
more than POSIX passes its crash tests on a laptop and loses mail on the day
the power goes.  This file system keeps exactly what POSIX promises and not a
byte more, so that a test can cut the power at any moment and see what a store
really made durable.

Every inode has a live state (what processes see) and a durable state:

- a regular file's durable content is a snapshot taken by its last fsync or
  fdatasync (modelled the same); a file never fsynced is durably empty;
- a directory's durable entries are a snapshot of its entries taken by its
  last fsync (FUSE's fsyncdir).  A rename is two changes, the source's removal
  and the target's creation, each durable only with its own directory; an
  inode stays alive as long as any durable name points at it, so a rename
  whose target directory was synced and whose source was not leaves one inode
  under two names after a cut (as the inode-reuse bug in issue 12 did).

A power cut, asked for on the control socket, freezes the file system (every
later operation fails with EIO, as a dead disk would) and writes what was
durable into a plain directory: durable entries walked from the root, hard
links kept as hard links, each file with its durable content.  A new mount can
start from that directory (C{--from}), everything in it durable.

Three cut modes:

- C{strict}: exactly the durable state above;
- C{torn}: what a real disk may also show.  Each directory comes back either
  as last synced or as it was live; each file's size is its synced or its live
  one, and each 4 KiB page holds its synced bytes, its live bytes or zeros (a
  torn write, an extent allocated but never written);
- C{stale}: as C{torn}, but a page never written holds stale bytes of a freed
  file (ext4 data=writeback): this is how one message's bytes show up in
  another's file on a real disk.

A store that checks what it reads (sizes, checksums) and never trusts a file
because its name is there survives all three.

Run as C{python tests/powerloss/strictfs.py MOUNTPOINT --control SOCKET
[--from DIR]}; it stays in the foreground until unmounted
(C{fusermount3 -u MOUNTPOINT}).  The control socket takes one JSON line per
connection and answers one: C{{"op": "cut", "out": DIR, "mode": "strict",
"seed": 1}}, C{{"op": "stats"}}.
"""

from __future__ import annotations

import argparse
import errno
import functools
import json
import logging
import os
import random
import socket
import stat
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

PAGE = 4096
MODES = ("strict", "torn", "stale")
UTIME_NOW, UTIME_OMIT = (1 << 30) - 1, (1 << 30) - 2
ROOT = 1


class Inode:
    """One file, directory or symbolic link: live state and durable state."""

    __slots__ = (
        "ino", "mode", "data", "synced", "entries", "durable", "target", "links", "opens", "times", "syncedTimes"
    )  # fmt: skip

    def __init__(self, ino: int, mode: int) -> None:
        self.ino = ino
        self.mode = mode
        self.data = bytearray()  # a file's live content
        self.synced: bytes | None = None  # a file's content at its last fsync
        self.entries: dict[str, int] = {}  # a directory's live entries
        self.durable: dict[str, int] = {}  # a directory's entries at its last fsync
        self.target = ""  # a symbolic link's target
        self.links = 0  # live names
        self.opens = 0
        now = time.time_ns()
        self.times = [now, now, now]  # atime, mtime, ctime
        # Times as of the last fsync (not fdatasync); an inode is created with its name.
        self.syncedTimes = list(self.times)

    @property
    def isDir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def isFile(self) -> bool:
        return stat.S_ISREG(self.mode)


class Frozen(OSError):
    def __init__(self) -> None:
        super().__init__(errno.EIO, "power cut: the file system is frozen")


def _op(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A model operation: under the lock, refused once frozen, counted."""

    def decorate(method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def run(self: Model, *args: Any) -> Any:
            with self.lock:
                self._check()
                self._count(name)
                return method(self, *args)

        return run

    return decorate


class Model:
    """
    The file system's state and operations, without FUSE: the mount calls
    these with absolute paths ("/a/b") or open handles, and a unit test can
    call them directly.  One lock serialises everything, so a cut happens
    between two operations, never inside one.
    """

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.inodes: dict[int, Inode] = {}
        self.nextIno = ROOT
        self.handles: dict[int, int] = {}  # handle -> inode
        self.nextHandle = 1
        self.frozen = False
        # Content of files that were unlinked or overwritten: the "free
        # blocks" a stale cut fills unwritten pages from.
        self.freed: deque[bytes] = deque(maxlen=64)
        self.counts: dict[str, int] = {}
        root = self._new(stat.S_IFDIR | 0o755)
        root.links = 1

    # -- helpers -----------------------------------------------------------

    def _count(self, name: str) -> None:
        self.counts[name] = self.counts.get(name, 0) + 1

    def _new(self, mode: int) -> Inode:
        inode = Inode(self.nextIno, mode)
        self.inodes[inode.ino] = inode
        self.nextIno += 1
        return inode

    def _check(self) -> None:
        if self.frozen:
            raise Frozen()

    @staticmethod
    def _split(path: str) -> list[str]:
        return [part for part in path.split("/") if part]

    def _lookup(self, path: str) -> Inode:
        inode = self.inodes[ROOT]
        for part in self._split(path):
            if not inode.isDir:
                raise OSError(errno.ENOTDIR, path)
            ino = inode.entries.get(part)
            if ino is None:
                raise OSError(errno.ENOENT, path)
            inode = self.inodes[ino]
        return inode

    def _parent(self, path: str) -> tuple[Inode, str]:
        parts = self._split(path)
        if not parts:
            raise OSError(errno.EBUSY, path)
        parent = self._lookup("/" + "/".join(parts[:-1]))
        if not parent.isDir:
            raise OSError(errno.ENOTDIR, path)
        return parent, parts[-1]

    def _node(self, path: str | None, fh: int | None) -> Inode:
        if fh is not None and fh in self.handles:
            return self.inodes[self.handles[fh]]
        if path is None:
            raise OSError(errno.EBADF, "no path and no handle")
        return self._lookup(path)

    def _unlinked(self, inode: Inode) -> None:
        """A live name of C{inode} is gone."""
        inode.links -= 1
        self._collect(inode)

    def _collect(self, inode: Inode) -> None:
        # A file no live name or handle reaches keeps its inode only if a
        # durable name may still point at it (checked at the cut).
        if inode.isFile and inode.links <= 0 and inode.opens <= 0:
            self.freed.append(bytes(inode.data))
            if not self._durablyNamed(inode.ino):
                del self.inodes[inode.ino]

    def _durablyNamed(self, ino: int) -> bool:
        return any(ino in d.durable.values() for d in self.inodes.values() if d.isDir)

    def _handle(self, inode: Inode) -> int:
        fh = self.nextHandle
        self.nextHandle += 1
        self.handles[fh] = inode.ino
        inode.opens += 1
        return fh

    # -- operations --------------------------------------------------------

    @_op("getattr")
    def getattr(self, path: str | None, fh: int | None = None) -> dict[str, Any]:
        inode = self._node(path, fh)
        if inode.isDir:
            nlink = 2 + sum(1 for ino in inode.entries.values() if self.inodes[ino].isDir)
            size = PAGE
        else:
            nlink = max(inode.links, 0)
            size = len(inode.data) if inode.isFile else len(inode.target)
        return {
            "st_mode": inode.mode,
            "st_ino": inode.ino,
            "st_nlink": nlink,
            "st_size": size,
            "st_blocks": (size + 511) // 512,
            "st_blksize": PAGE,
            "st_uid": os.getuid(),
            "st_gid": os.getgid(),
            "st_atime": inode.times[0],
            "st_mtime": inode.times[1],
            "st_ctime": inode.times[2],
        }

    @_op("readdir")
    def readdir(self, path: str | None, fh: int | None = None) -> list[tuple[str, dict[str, int], int]]:
        """Names with their inode numbers and types (an entry with inode 0 would be hidden by libc)."""
        inode = self._node(path, fh)
        if not inode.isDir:
            raise OSError(errno.ENOTDIR, path)
        listing = [
            (".", {"st_ino": inode.ino, "st_mode": inode.mode}, 0),
            ("..", {"st_mode": stat.S_IFDIR, "st_ino": ROOT}, 0),
        ]
        for name, ino in inode.entries.items():
            child = self.inodes[ino]
            listing.append((name, {"st_ino": ino, "st_mode": child.mode}, 0))
        return listing

    @_op("mkdir")
    def mkdir(self, path: str, mode: int) -> None:
        parent, name = self._parent(path)
        if name in parent.entries:
            raise OSError(errno.EEXIST, path)
        child = self._new(stat.S_IFDIR | (mode & 0o7777))
        child.links = 1
        parent.entries[name] = child.ino
        parent.times[1] = parent.times[2] = time.time_ns()

    @_op("rmdir")
    def rmdir(self, path: str) -> None:
        parent, name = self._parent(path)
        inode = self._lookup(path)
        if not inode.isDir:
            raise OSError(errno.ENOTDIR, path)
        if inode.entries:
            raise OSError(errno.ENOTEMPTY, path)
        del parent.entries[name]
        inode.links -= 1

    @_op("create")
    def create(self, path: str, mode: int) -> int:
        parent, name = self._parent(path)
        if name in parent.entries:
            inode = self.inodes[parent.entries[name]]
            if inode.isDir:
                raise OSError(errno.EISDIR, path)
            return self._handle(inode)
        inode = self._new(stat.S_IFREG | (mode & 0o7777))
        inode.links = 1
        parent.entries[name] = inode.ino
        return self._handle(inode)

    @_op("mknod")
    def mknod(self, path: str, mode: int) -> None:
        if not stat.S_ISREG(mode):
            raise OSError(errno.EPERM, "only regular files here")
        parent, name = self._parent(path)
        if name in parent.entries:
            raise OSError(errno.EEXIST, path)
        inode = self._new(mode)
        inode.links = 1
        parent.entries[name] = inode.ino

    @_op("open")
    def open(self, path: str) -> int:
        return self._handle(self._lookup(path))

    @_op("opendir")
    def opendir(self, path: str) -> int:
        inode = self._lookup(path)
        if not inode.isDir:
            raise OSError(errno.ENOTDIR, path)
        return self._handle(inode)

    @_op("release")
    def release(self, fh: int) -> None:
        ino = self.handles.pop(fh, None)
        if ino is not None and ino in self.inodes:
            inode = self.inodes[ino]
            inode.opens -= 1
            self._collect(inode)

    @_op("read")
    def read(self, path: str | None, size: int, offset: int, fh: int | None) -> bytes:
        inode = self._node(path, fh)
        return bytes(inode.data[offset : offset + size])

    @_op("write")
    def write(self, path: str | None, data: bytes, offset: int, fh: int | None) -> int:
        inode = self._node(path, fh)
        if not inode.isFile:
            raise OSError(errno.EISDIR, path)
        if offset > len(inode.data):
            inode.data.extend(bytes(offset - len(inode.data)))
        inode.data[offset : offset + len(data)] = data
        inode.times[1] = inode.times[2] = time.time_ns()
        return len(data)

    @_op("truncate")
    def truncate(self, path: str | None, length: int, fh: int | None = None) -> None:
        inode = self._node(path, fh)
        if not inode.isFile:
            raise OSError(errno.EISDIR, path)
        if length < len(inode.data):
            self.freed.append(bytes(inode.data[length:]))
            del inode.data[length:]
        else:
            inode.data.extend(bytes(length - len(inode.data)))
        inode.times[1] = inode.times[2] = time.time_ns()

    @_op("fsync")
    def fsync(self, path: str | None, fh: int | None, datasync: bool = False) -> None:
        """
        fsync(2) and fdatasync(2) on a file: its content is durable, not its
        names; fsync makes its times durable too (a store may keep a due time
        in an mtime), fdatasync does not.
        """
        inode = self._node(path, fh)
        if inode.isDir:
            inode.durable = dict(inode.entries)
        elif inode.isFile:
            inode.synced = bytes(inode.data)
        if not datasync:
            inode.syncedTimes = list(inode.times)

    @_op("fsyncdir")
    def fsyncdir(self, path: str | None, fh: int | None) -> None:
        """fsync(2) on a directory: its entries as they are now are durable."""
        inode = self._node(path, fh)
        if not inode.isDir:
            raise OSError(errno.ENOTDIR, path)
        before = set(inode.durable.values())
        inode.durable = dict(inode.entries)
        for ino in before - set(inode.durable.values()):
            gone = self.inodes.get(ino)
            if gone is not None and gone.isFile and gone.links <= 0 and gone.opens <= 0:
                if not self._durablyNamed(ino):
                    del self.inodes[ino]

    @_op("unlink")
    def unlink(self, path: str) -> None:
        parent, name = self._parent(path)
        inode = self._lookup(path)
        if inode.isDir:
            raise OSError(errno.EISDIR, path)
        del parent.entries[name]
        parent.times[1] = parent.times[2] = time.time_ns()
        self._unlinked(inode)

    @_op("link")
    def link(self, new: str, existing: str) -> None:
        inode = self._lookup(existing)
        if inode.isDir:
            raise OSError(errno.EPERM, existing)
        parent, name = self._parent(new)
        if name in parent.entries:
            raise OSError(errno.EEXIST, new)
        parent.entries[name] = inode.ino
        inode.links += 1

    @_op("symlink")
    def symlink(self, new: str, target: str) -> None:
        parent, name = self._parent(new)
        if name in parent.entries:
            raise OSError(errno.EEXIST, new)
        inode = self._new(stat.S_IFLNK | 0o777)
        inode.target = target
        inode.links = 1
        parent.entries[name] = inode.ino

    @_op("readlink")
    def readlink(self, path: str) -> str:
        inode = self._lookup(path)
        if not stat.S_ISLNK(inode.mode):
            raise OSError(errno.EINVAL, path)
        return inode.target

    @_op("rename")
    def rename(self, old: str, new: str) -> None:
        source, oldName = self._parent(old)
        target, newName = self._parent(new)
        inode = self._lookup(old)
        if (new.rstrip("/") + "/").startswith(old.rstrip("/") + "/") and inode.isDir and old != new:
            raise OSError(errno.EINVAL, new)
        replaced = target.entries.get(newName)
        if replaced == inode.ino:
            return
        if replaced is not None:
            victim = self.inodes[replaced]
            if victim.isDir != inode.isDir:
                raise OSError(errno.EISDIR if victim.isDir else errno.ENOTDIR, new)
            if victim.isDir and victim.entries:
                raise OSError(errno.ENOTEMPTY, new)
        del source.entries[oldName]
        target.entries[newName] = inode.ino
        now = time.time_ns()
        source.times[1] = source.times[2] = target.times[1] = target.times[2] = now
        if replaced is not None:
            self._unlinked(self.inodes[replaced])

    @_op("chmod")
    def chmod(self, path: str | None, mode: int, fh: int | None = None) -> None:
        inode = self._node(path, fh)
        inode.mode = stat.S_IFMT(inode.mode) | (mode & 0o7777)

    @_op("utimens")
    def utimens(self, path: str | None, times: tuple[int, int] | None, fh: int | None = None) -> None:
        inode = self._node(path, fh)
        now = time.time_ns()
        for index, value in enumerate(times if times is not None else (now, now)):
            # libfuse passes UTIME_NOW and UTIME_OMIT in the nanoseconds
            if value % 1_000_000_000 == UTIME_NOW:
                inode.times[index] = now
            elif value % 1_000_000_000 != UTIME_OMIT:
                inode.times[index] = value
        inode.times[2] = now

    # -- loading and the cut -------------------------------------------------

    def load(self, source: Path) -> None:
        """Start from a plain tree: everything in it is durable (it is what survived a cut)."""
        seen: dict[tuple[int, int], int] = {}

        def walk(directory: Path, inode: Inode) -> None:
            for entry in sorted(os.scandir(directory), key=lambda e: e.name):
                st = entry.stat(follow_symlinks=False)
                key = (st.st_dev, st.st_ino)
                if key in seen:
                    child = self.inodes[seen[key]]
                elif stat.S_ISDIR(st.st_mode):
                    child = self._new(st.st_mode)
                    walk(Path(entry.path), child)
                elif stat.S_ISLNK(st.st_mode):
                    child = self._new(st.st_mode)
                    child.target = os.readlink(entry.path)
                elif stat.S_ISREG(st.st_mode):
                    child = self._new(st.st_mode)
                    child.data = bytearray(Path(entry.path).read_bytes())
                    child.synced = bytes(child.data)
                    child.times = [st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns]
                    child.syncedTimes = list(child.times)
                else:
                    continue  # sockets, fifos: nothing of a store's state
                seen[key] = child.ino
                child.links += 1
                inode.entries[entry.name] = child.ino
            inode.durable = dict(inode.entries)

        with self.lock:
            walk(source, self.inodes[ROOT])

    def cut(self, out: Path, mode: str = "strict", seed: int = 0) -> dict[str, Any]:
        """
        Power cut: freeze, and write what a restart would find into C{out}.

        Returns counts for the report: files written, files whose content
        differs from what processes last saw, names that were lost or came back.
        """
        if mode not in MODES:
            raise ValueError(f"unknown cut mode {mode!r}")
        rng = random.Random(seed)
        with self.lock:
            self.frozen = True
            return self._materialize(out, mode, rng)

    def _entries(self, inode: Inode, mode: str, rng: random.Random) -> dict[str, int]:
        if mode != "strict" and inode.entries != inode.durable and rng.random() < 0.5:
            return inode.entries
        return inode.durable

    def _content(self, inode: Inode, mode: str, rng: random.Random) -> bytes:
        synced = inode.synced if inode.synced is not None else b""
        if mode == "strict" or bytes(inode.data) == synced:
            return synced
        live = bytes(inode.data)
        size = rng.choice((len(synced), len(live)))
        pages = []
        for start in range(0, size, PAGE):
            choice = rng.random()
            if choice < 0.4 and start < len(live):
                page = live[start : start + PAGE]
            elif choice < 0.8 and start < len(synced):
                page = synced[start : start + PAGE]
            elif mode == "stale" and self.freed:
                page = rng.choice(self.freed)[start : start + PAGE]
            else:
                page = b""
            pages.append(page.ljust(min(PAGE, size - start), b"\0")[: size - start])
        return b"".join(pages)

    def _materialize(self, out: Path, mode: str, rng: random.Random) -> dict[str, Any]:
        out.mkdir(parents=True, exist_ok=True)
        written: dict[int, Path] = {}
        report = {"files": 0, "directories": 0, "hardlinks": 0, "unsynced": 0, "lost_names": 0, "revived_names": 0}

        def walk(inode: Inode, path: Path, ancestors: frozenset[int]) -> None:
            entries = self._entries(inode, mode, rng)
            report["lost_names"] += len(set(inode.entries) - set(entries))
            report["revived_names"] += len(set(entries) - set(inode.entries))
            for name, ino in sorted(entries.items()):
                child = self.inodes.get(ino)
                if child is None or ino in ancestors:
                    continue
                target = path / name
                if child.isDir:
                    target.mkdir(mode=0o700)
                    os.chmod(target, stat.S_IMODE(child.mode) | 0o700)
                    report["directories"] += 1
                    walk(child, target, ancestors | {ino})
                elif stat.S_ISLNK(child.mode):
                    os.symlink(child.target, target)
                elif ino in written:
                    os.link(written[ino], target)
                    report["hardlinks"] += 1
                else:
                    content = self._content(child, mode, rng)
                    if content != bytes(child.data):
                        report["unsynced"] += 1
                    target.write_bytes(content)
                    os.chmod(target, stat.S_IMODE(child.mode))
                    times = child.times if mode != "strict" and rng.random() < 0.5 else child.syncedTimes
                    os.utime(target, ns=(times[0], times[1]))
                    written[ino] = target
                    report["files"] += 1

        walk(self.inodes[ROOT], out, frozenset({ROOT}))
        return report


def operations(model: Model) -> Any:
    """The mfusepy adapter: FUSE callbacks to L{Model} calls, handles preferred to paths."""
    import mfusepy

    class StrictFS(mfusepy.Operations):
        use_ns = True

        def getattr(self, path: str | None, fh: int | None = None) -> dict[str, Any]:
            return model.getattr(path, fh)

        def readdir(self, path: str | None, fh: int) -> list[tuple[str, dict[str, int], int]]:
            return model.readdir(path, fh)

        def opendir(self, path: str) -> int:
            return model.opendir(path)

        def releasedir(self, path: str | None, fh: int) -> int:
            model.release(fh)
            return 0

        def fsyncdir(self, path: str | None, datasync: int, fh: int) -> int:
            model.fsyncdir(path, fh)
            return 0

        def mkdir(self, path: str, mode: int) -> int:
            model.mkdir(path, mode)
            return 0

        def rmdir(self, path: str) -> int:
            model.rmdir(path)
            return 0

        def create(self, path: str, mode: int, flags: int = 0) -> int:
            return model.create(path, mode)

        def mknod(self, path: str, mode: int, dev: int) -> int:
            model.mknod(path, mode)
            return 0

        def open(self, path: str, flags: int) -> int:
            return model.open(path)

        def release(self, path: str | None, fh: int) -> int:
            model.release(fh)
            return 0

        def flush(self, path: str | None, fh: int) -> int:
            with model.lock:
                model._check()
            return 0

        def read(self, path: str | None, size: int, offset: int, fh: int) -> bytes:
            return model.read(path, size, offset, fh)

        def write(self, path: str | None, data: bytes, offset: int, fh: int) -> int:
            return model.write(path, data, offset, fh)

        def truncate(self, path: str | None, length: int, fh: int | None = None) -> int:
            model.truncate(path, length, fh)
            return 0

        def fsync(self, path: str | None, datasync: int, fh: int) -> int:
            model.fsync(path, fh, bool(datasync))
            return 0

        def unlink(self, path: str) -> int:
            model.unlink(path)
            return 0

        def link(self, target: str, source: str) -> int:
            model.link(target, source)
            return 0

        def symlink(self, target: str, source: str) -> int:
            model.symlink(target, source)
            return 0

        def readlink(self, path: str) -> str:
            return model.readlink(path)

        def rename(self, old: str, new: str) -> int:
            model.rename(old, new)
            return 0

        def chmod(self, path: str | None, mode: int) -> int:
            model.chmod(path, mode)
            return 0

        def chown(self, path: str | None, uid: int, gid: int) -> int:
            with model.lock:
                model._check()
            return 0

        def utimens(self, path: str | None, times: tuple[int, int] | None = None) -> int:
            model.utimens(path, times)
            return 0

        def access(self, path: str, amode: int) -> int:
            with model.lock:
                model._check()
            return 0

        def statfs(self, path: str) -> dict[str, int]:
            with model.lock:
                model._check()
            return {"f_bsize": PAGE, "f_frsize": PAGE, "f_blocks": 1 << 22, "f_bfree": 1 << 21,
                    "f_bavail": 1 << 21, "f_files": 1 << 20, "f_ffree": 1 << 19, "f_favail": 1 << 19,
                    "f_namemax": 255}  # fmt: skip

    return StrictFS()


def fuseClass() -> Any:
    """mfusepy's FUSE, passing the open handle to truncate and chmod (a file may have no path left)."""
    import mfusepy

    class FUSE(mfusepy.FUSE):
        def truncate_fuse_3(self, path: bytes | None, length: int, fip: Any) -> int:
            fh = fip.contents.fh if fip else None
            return self.operations.truncate(None if path is None else path.decode(), length, fh)

    return FUSE


def serveControl(model: Model, path: Path) -> None:
    """Answer one JSON request per connection on the UNIX socket C{path}."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(4)

    def loop() -> None:
        while True:
            connection, _ = server.accept()
            with connection:
                try:
                    request = json.loads(connection.makefile("rb").readline())
                    if request["op"] == "cut":
                        answer = model.cut(Path(request["out"]), request.get("mode", "strict"), request.get("seed", 0))
                    elif request["op"] == "stats":
                        with model.lock:
                            answer = dict(model.counts)
                    elif request["op"] == "ping":
                        answer = {}
                    else:
                        raise ValueError(f"unknown op {request['op']!r}")
                    reply = {"ok": True, "result": answer}
                except Exception as e:  # the test reads the reason
                    reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
                connection.sendall(json.dumps(reply).encode() + b"\n")

    threading.Thread(target=loop, name="control", daemon=True).start()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mountpoint")
    parser.add_argument("--control", required=True, help="UNIX socket for cut and stats requests")
    parser.add_argument("--from", dest="source", help="start from this plain tree (all of it durable)")
    parser.add_argument("--debug", action="store_true")
    options = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if options.debug else logging.ERROR)
    model = Model()
    if options.source:
        model.load(Path(options.source))
    serveControl(model, Path(options.control))
    fuseClass()(
        operations(model),
        options.mountpoint,
        foreground=True,
        nothreads=False,
        hard_remove=True,
        use_ino=True,
        fsname="strictfs",
        subtype="strictfs",
        # No kernel caching of names or attributes: every lookup reaches the model.
        entry_timeout=0,
        attr_timeout=0,
        negative_timeout=0,
    )


if __name__ == "__main__":
    main()
