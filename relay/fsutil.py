"""Durability primitives shared by everything that writes to disk."""

from __future__ import annotations

import os


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
