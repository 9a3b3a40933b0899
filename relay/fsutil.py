"""Durability and write primitives shared by everything that writes to disk or to a peer."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def fsyncDirectory(path: str | os.PathLike[str]) -> None:
    """
    Make the entries of a directory durable.

    A rename or a new file survives a crash only once its directory is synced;
    fsync of the file alone does not cover the name.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def makeDirectories(path: str | os.PathLike[str], mode: int = 0o700) -> list[Path]:
    """
    Create C{path} and any missing parents, durably: after each C{mkdir} its
    parent directory is fsynced, from the first directory that already
    existed down, so that a power cut cannot take back a directory (and
    everything later put in it) that was created by a run which went on to
    acknowledge mail.

    @return: the directories created, outermost first (none if C{path}
        already existed).
    @raise OSError: a directory cannot be created or synced, or something
        in the way is not a directory.
    """
    target = Path(path)
    missing: list[Path] = []
    current = target
    while not current.exists():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    if not current.is_dir() and current not in missing:
        raise NotADirectoryError(20, "Not a directory", str(current))
    created: list[Path] = []
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=mode)
        except FileExistsError:
            if not directory.is_dir():
                raise
            continue  # made by someone else meanwhile
        created.append(directory)
        fsyncDirectory(directory.parent)
    return created


def replaceFile(path: Path, data: bytes) -> None:
    """
    Replace the file C{path} with C{data} so that a crash or a power cut
    leaves either the old content or the new, whole: written to
    C{NAME.tmp} beside it (mode 0600) and fsynced, renamed over C{path}, then
    its directory fsynced.  The directory is created, durably, if missing.
    Blocking: call it in a worker thread.
    """
    makeDirectories(path.parent)
    temporary = path.with_name(path.name + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)
    fsyncDirectory(path.parent)


def writeNow(descriptor: Any, data: bytes, send: Callable[[bytes], int]) -> None:
    """
    Write through C{send} at once when the Twisted C{descriptor} has nothing
    buffered before it; whatever C{send} does not take (a full socket or pipe,
    an error) goes to C{descriptor.write}, which buffers it and reports errors
    as usual.  A peer waiting for these bytes gets them without a turn of the
    reactor and two epoll changes in between.
    """
    if not descriptor.dataBuffer and not descriptor._tempDataBuffer:
        try:
            sent = send(data)
        except OSError:
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    descriptor.write(data)
