"""
How L{ProcessEngine} hands requests to its worker: one C{writev} of the
frame's pieces straight into the pipe, what the pipe does not take buffered
by the transport in order, and the pipe enlarged so that a spill seldom has
to wait for the worker.
"""

from __future__ import annotations

import fcntl
import os

import pytest
from twisted.internet import process
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock

from relay.queue import filesystem, fsworker
from relay.queue.filesystem import ProcessEngine
from relay.queue.fsworker import APPEND, COMMIT, Request


class Writer:
    """The relay's end of the pipe as Twisted's process writer has it: a descriptor and a buffer."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.dataBuffer = b""
        self._tempDataBuffer: list[bytes] = []
        self.buffered: list[bytes] = []

    def writeSequence(self, parts: list[bytes]) -> None:
        self.buffered += parts
        self._tempDataBuffer += parts


class Transport:
    def __init__(self, writer: Writer) -> None:
        self.pipes = {0: writer}


class Reactor(Clock):
    def callWhenRunning(self, f, *args):
        pass  # no worker is spawned: the test plays the transport


@pytest.fixture
def pipe():
    read, write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    fcntl.fcntl(write, fcntl.F_SETPIPE_SZ, 65536)
    yield read, write
    os.close(read)
    os.close(write)


def drain(fd: int) -> bytes:
    out = b""
    while True:
        try:
            chunk = os.read(fd, 1 << 20)
        except BlockingIOError:
            return out
        if not chunk:
            return out
        out += chunk


def engineOn(tmp_path, fd: int) -> tuple[ProcessEngine, Writer]:
    engine = ProcessEngine(Reactor(), tmp_path)
    writer = Writer(fd)
    engine.transport = Transport(writer)
    return engine, writer


def test_what_the_pipe_does_not_take_is_buffered_in_order(tmp_path, pipe):
    read, write = pipe
    engine, writer = engineOn(tmp_path, write)
    first = Request(APPEND, "q1", bytes(range(256)) * 1000, generation=1)  # 256,000 octets: more than the pipe holds
    second = Request(COMMIT, "q1", b"tail", b'{"queue_id": "q1"}', generation=1, size=256_004)
    engine.submit(first)
    engine.submit(second)
    wire = drain(read) + b"".join(writer.buffered)
    assert wire == fsworker.encodeRequest(1, first) + fsworker.encodeRequest(2, second)
    # The second frame went behind the first one's buffered rest, not into the pipe.
    assert writer.buffered[-3:] == list(fsworker.encodeRequestParts(2, second))
    assert fsworker.RequestDecoder().feed(wire) == [(1, first), (2, second)]


def test_a_frame_the_pipe_takes_whole_is_not_buffered(tmp_path, pipe):
    read, write = pipe
    engine, writer = engineOn(tmp_path, write)
    request = Request(APPEND, "q1", b"x" * 60_000, generation=1)
    engine.submit(request)
    assert writer.buffered == []
    assert drain(read) == fsworker.encodeRequest(1, request)


def test_the_pipe_to_the_worker_is_enlarged(tmp_path, pipe):
    read, write = pipe
    engine, writer = engineOn(tmp_path, write)
    engine.connectionMade()
    assert fcntl.fcntl(write, fcntl.F_GETPIPE_SZ) == filesystem.PIPE_SIZE


def test_a_spill_goes_through_a_real_pipe_in_one_write(tmp_path):
    # The process writer Twisted gives the engine, on a pipe of the size asked for.
    read, write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.fcntl(write, fcntl.F_SETPIPE_SZ, filesystem.PIPE_SIZE)
        engine = ProcessEngine(Reactor(), tmp_path)
        writer = process.ProcessWriter(MemoryReactorClock(), Transport(None), 0, write)
        engine.transport = Transport(writer)
        request = Request(APPEND, "q1", b"y" * filesystem.SPILL, generation=1)
        engine.submit(request)
        assert not writer.dataBuffer and not writer._tempDataBuffer
        assert drain(read) == fsworker.encodeRequest(1, request)
    finally:
        os.close(read)
