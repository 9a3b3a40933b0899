"""Durability and write primitives shared by everything that writes to disk or to a peer."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any


def fsyncDirectory(path: str | os.PathLike[str]) -> None:
    """
    Make the entries of a directory durable.

    A rename or a new file survives a crash only once its directory is synced;
    fsync of the file alone does not cover the name.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
