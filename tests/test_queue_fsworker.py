"""
The queue worker: its pipe protocol, serving requests from a pipe as its
child process does, its death with its parent, and the real process being
killed under a relay's store.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from relay.metrics import Metrics
from relay.queue import fsworker
from relay.queue.filesystem import ProcessEngine
from relay.queue.fsworker import APPEND, BATCH_ID, COMMIT, DISCARD, REMOVE, UPDATE, QueueFiles, Request

queueIDs = st.text(alphabet="0123456789abcdef", min_size=1, max_size=24)
requests = st.builds(
    Request,
    st.sampled_from(fsworker.OPCODES),
    queueIDs,
    st.binary(max_size=300),
    st.binary(max_size=300),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**64 - 1),
    st.integers(-(2**63), 2**63 - 1),
    st.integers(0, 255),
)


@settings(max_examples=300)
@given(st.lists(st.tuples(st.integers(0, 2**32 - 1), requests), max_size=8), st.data())
def test_requests_survive_any_chunking(frames, data):
    wire = b"".join(fsworker.encodeRequest(rid, request) for rid, request in frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=6)))
    decoder = fsworker.RequestDecoder()
    decoded = []
    for start, end in zip([0, *cuts], [*cuts, len(wire)], strict=True):
        decoded += decoder.feed(wire[start:end])
    assert decoded == frames


@settings(max_examples=300)
@given(
    st.lists(
        st.tuples(st.integers(0, 2**32 - 1), st.none() | st.tuples(st.integers(0, 200), st.text(max_size=80))),
        max_size=8,
    ),
    st.integers(1, 7),
)
def test_replies_survive_any_chunking(replies, step):
    wire = b"".join(fsworker.encodeReply(rid, error) for rid, error in replies)
    decoder = fsworker.ReplyDecoder()
    decoded = []
    for i in range(0, len(wire), step):
        decoded += decoder.feed(wire[i : i + step])
    # A reply with errno 0 that is an error (not an OSError) stays an error.
    assert decoded == [(rid, None if error is None else (error[0], error[1])) for rid, error in replies]


def served(tmp_path: Path, frames: list) -> list:
    """Run serve() on a pipe as the child process does, send frames, close, read every reply to a request."""
    return [reply for reply in fsworker.ReplyDecoder().feed(servedBytes(tmp_path, frames)) if reply[0] != BATCH_ID]


def servedBytes(tmp_path: Path, frames: list) -> bytes:
    """Run serve() on a pipe as the child process does, send frames, close: everything it wrote back."""
    for name in ("incoming", "messages"):
        (tmp_path / name).mkdir(exist_ok=True)
    fromRelay, toWorker = os.pipe()
    fromWorker, toRelay = os.pipe()
    files = QueueFiles(tmp_path)
    worker = threading.Thread(target=fsworker.serve, args=(files, fromRelay, toRelay))
    worker.start()
    fsworker.writeAll(toWorker, b"".join(fsworker.encodeRequest(rid, request) for rid, request in frames))
    os.close(toWorker)
    worker.join(timeout=30)
    assert not worker.is_alive()
    os.close(toRelay)
    out = b""
    while chunk := os.read(fromWorker, 65536):
        out += chunk
    os.close(fromWorker)
    os.close(fromRelay)
    return out


class NeverRunning(Clock):
    """A reactor that never starts: the engine spawns no worker of its own."""

    def callWhenRunning(self, f, *args) -> None:
        pass


def test_the_worker_reports_each_batch_size_and_the_engine_hands_it_to_the_metrics(tmp_path):
    """
    Five commits, an update and a removal in one write are two batches (the
    update and the removal of a message committed in the first batch need
    their own): a batch frame for each, ahead of the replies, and the
    relay's histogram counts them.
    """
    frames = [(i, Request(COMMIT, f"q{i}", b"data", b"{}", size=4)) for i in range(1, 6)]
    frames += [(6, Request(UPDATE, "q1", payload=b"{}", due=1)), (7, Request(REMOVE, "q2"))]
    out = servedBytes(tmp_path, frames)
    replies = fsworker.ReplyDecoder().feed(out)
    assert replies[:2] == [(BATCH_ID, (5, "")), (BATCH_ID, (2, ""))]
    assert replies[2:] == [(i, None) for i in range(1, 8)]

    metrics = Metrics()
    engine = ProcessEngine(NeverRunning(), tmp_path)  # its worker is the serve() above
    engine.onBatch = metrics.commitBatchSize.observe
    for i in range(len(out)):  # a byte at a time: frames cut anywhere
        engine.outReceived(out[i : i + 1])
    value = metrics.registry.get_sample_value
    assert (value("relay_queue_commit_batch_size_count"), value("relay_queue_commit_batch_size_sum")) == (2, 7)
    assert value("relay_queue_commit_batch_size_bucket", {"le": "4.0"}) == 1


def test_serve_commits_updates_and_removes(tmp_path):
    envelope = json.dumps({"queue_id": "q1"}).encode()
    replies = served(
        tmp_path,
        [
            (1, Request(APPEND, "q1", b"first ", generation=1)),
            (2, Request(COMMIT, "q1", b"second", envelope, generation=1, size=12, due=5_000_000_000)),
            (3, Request(UPDATE, "q1", payload=b'{"updated": true}', due=7_000_000_000)),
            (4, Request(COMMIT, "q2", b"other", b"{}", size=5)),
            (5, Request(REMOVE, "q2")),
            (6, Request(APPEND, "q3", b"abandoned")),
            (7, Request(DISCARD, "q3")),
            (8, Request(COMMIT, "q4", b"short", b"{}", size=6)),  # an octet short of what was sent
            (9, Request(COMMIT, "q5", b"", b"{}", generation=2)),  # for another worker
        ],
    )
    assert replies[:7] == [(i, None) for i in range(1, 8)]
    assert replies[7][0] == 8 and replies[7][1][0] == errno.EIO and "5 octets stored of the 6" in replies[7][1][1]
    assert replies[8][0] == 9 and replies[8][1][0] == errno.EIO and "replaced" in replies[8][1][1]
    assert sorted(os.listdir(tmp_path / "messages")) == ["q1", "q1.state"]
    raw = (tmp_path / "messages" / "q1").read_bytes()
    assert raw.startswith(b"first second" + envelope)
    assert fsworker.readMessage(tmp_path / "messages" / "q1", "q1") == (12, envelope)
    assert fsworker.readJournal(tmp_path / "messages" / "q1.state") == (b'{"updated": true}', True)
    assert (tmp_path / "messages" / "q1").stat().st_mtime_ns == 7_000_000_000
    assert os.listdir(tmp_path / "incoming") == []


def test_serve_reports_errors_per_request(tmp_path, monkeypatch):
    monkeypatch.setattr(
        fsworker,
        "create",
        lambda path: (
            os.open("/dev/full", os.O_WRONLY)
            if "bad" in str(path)
            else os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        ),
    )
    replies = served(
        tmp_path,
        [
            (1, Request(APPEND, "bad", b"x" * 100_000)),
            (2, Request(COMMIT, "bad", b"", b"{}", size=100_000)),
            (3, Request(COMMIT, "good", b"data", b"{}", size=4)),
        ],
    )
    assert replies[0][0] == 1 and replies[0][1][0] == errno.ENOSPC
    assert replies[1][0] == 2 and replies[1][1][0] == errno.ENOSPC  # the commit fails with the append's error
    assert replies[2] == (3, None)
    assert sorted(os.listdir(tmp_path / "messages")) == ["good"]
    assert os.listdir(tmp_path / "incoming") == []


def test_a_batch_starts_every_write_back_then_fsyncs_each_file_then_the_directory(tmp_path, monkeypatch):
    """
    Group commit: the write-back of all the batch's files starts before the
    first fsync (so one journal commit can carry them all), every file is
    fsynced, and messages/ once, after the last file and before any reply.
    """
    (tmp_path / "incoming").mkdir()
    (tmp_path / "messages").mkdir()
    files = QueueFiles(tmp_path)
    events: list[tuple[str, object]] = []
    monkeypatch.setattr(fsworker, "startWriteBack", lambda fd, offset=0, length=None: events.append(("start", fd)))
    monkeypatch.setattr(fsworker, "fsyncFile", lambda fd: events.append(("fsync", fd)))
    monkeypatch.setattr(fsworker, "fsyncDirectory", lambda path: events.append(("directory", Path(path).name)))
    errors = files.run([Request(COMMIT, f"q{i}", b"data", b"{}", size=4) for i in range(8)])
    assert errors == [None] * 8
    kinds = [kind for kind, _ in events]
    assert kinds == ["start"] * 8 + ["fsync"] * 8 + ["directory"]
    assert [fd for kind, fd in events if kind == "start"] == [fd for kind, fd in events if kind == "fsync"]
    assert len({fd for kind, fd in events if kind == "fsync"}) == 8
    assert events[-1] == ("directory", "messages")
    assert sorted(os.listdir(tmp_path / "messages")) == [f"q{i}" for i in range(8)]


def test_a_failed_fsync_fails_its_own_message_only(tmp_path, monkeypatch):
    (tmp_path / "incoming").mkdir()
    (tmp_path / "messages").mkdir()
    files = QueueFiles(tmp_path)
    calls = [0]

    def sync(fd):
        calls[0] += 1
        if calls[0] == 2:
            raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(fsworker, "fsyncFile", sync)
    errors = files.run([Request(COMMIT, f"q{i}", b"data", b"{}", size=4) for i in range(3)])
    assert errors[0] is None and errors[2] is None
    assert errors[1][0] == errno.EIO
    assert sorted(os.listdir(tmp_path / "messages")) == ["q0", "q2"]


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def test_worker_exits_when_its_parent_dies(tmp_path):
    """
    Its stdin stays open (another process holds the pipe), so only the
    parent's death tells it: PR_SET_PDEATHSIG, or the getppid() check.
    """
    (tmp_path / "incoming").mkdir()
    (tmp_path / "messages").mkdir()
    stdinRead, stdinWrite = os.pipe()
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import os, subprocess, sys, time
                worker = subprocess.Popen(
                    [sys.executable, "-m", "relay.queue.fsworker", {str(tmp_path)!r}, "1", str(os.getpid())],
                    stdin={stdinRead}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, pass_fds=({stdinRead},),
                )
                print(worker.pid, flush=True)
                time.sleep(60)
                """
            ),
        ],
        stdout=subprocess.PIPE,
        pass_fds=(stdinRead,),
    )
    try:
        worker = int(parent.stdout.readline())
        time.sleep(0.5)  # let it start serving
        assert alive(worker)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 5
        while alive(worker) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not alive(worker)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(timeout=10)
        parent.stdout.close()
        os.close(stdinRead)
        os.close(stdinWrite)


# -- the real worker process killed under a store -------------------------------------------

DRIVER = textwrap.dedent(
    """
    import json, os, random, signal, sys
    from pathlib import Path

    from twisted.internet import defer, task
    from twisted.internet.threads import deferToThread

    from relay.queue.filesystem import SPILL, FilesystemQueueStore, ProcessEngine
    from relay.testing.queuestore import envelopeFor

    async def until(reactor, predicate, timeout=60.0):
        for _ in range(int(timeout / 0.01)):
            if predicate():
                return
            await task.deferLater(reactor, 0.01, lambda: None)
        raise AssertionError("timed out")

    async def main(reactor, path, mode):
        store = FilesystemQueueStore(Path(path), lambda f, *a: deferToThread(f, *a), reactor)
        engine = store.engine = ProcessEngine(reactor, store.path)
        engine.restartDelay = 0.1
        await until(reactor, lambda: engine.transport is not None)
        outcome = {}
        if mode == "spill":
            incoming = store.begin()
            incoming.write(b"a" * SPILL)
            spilled = store.incomingPath / incoming.queue_id
            await until(reactor, lambda: spilled.exists() and spilled.stat().st_size == SPILL)
            os.kill(engine.transport.pid, signal.SIGKILL)
            await until(reactor, lambda: engine.generation == 2 and engine.transport is not None)
            incoming.write(b"b" * 10)
            try:
                await incoming.commit(envelopeFor(incoming.queue_id))
                outcome["commit"] = "ok"
            except OSError as e:
                outcome["commit"] = str(e)
        else:
            rng = random.Random(int(mode))
            commits = {}
            for i in range(200):
                incoming = store.begin()
                incoming.write(b"message %d\\r\\n" % i)
                commits[incoming.queue_id] = incoming.commit(envelopeFor(incoming.queue_id))
                if i == 100 + rng.randrange(50):
                    # Blocking the reactor: whatever the worker answers now is not read before it dies.
                    for _ in range(500_000):
                        if os.listdir(store.messagesPath):
                            break
                    os.kill(engine.transport.pid, signal.SIGKILL)
            results = {}
            for queueID, d in commits.items():
                try:
                    await d
                    results[queueID] = "ok"
                except OSError as e:
                    results[queueID] = str(e)
            outcome["committed"] = sorted(q for q, r in results.items() if r == "ok")
            outcome["failed"] = len(results) - len(outcome["committed"])
        await until(reactor, lambda: engine.transport is not None)
        await store.stop()
        outcome["messages"] = sorted(os.listdir(store.messagesPath))
        outcome["incoming"] = sorted(os.listdir(store.incomingPath))
        print(json.dumps(outcome))

    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor, sys.argv[1], sys.argv[2])))
    """
)


def drive(tmp_path: Path, mode: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, str(tmp_path / "queue"), mode], capture_output=True, timeout=120, text=True
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_real_worker_killed_between_spills(tmp_path):
    outcome = drive(tmp_path, "spill")
    assert "replaced" in outcome["commit"]
    assert outcome["messages"] == [] and outcome["incoming"] == []


def test_real_worker_killed_among_commits_leaves_exactly_the_answered_ones(tmp_path):
    """
    Commits the dead worker did not answer fail (the client will send them
    again), and none of them is left in messages/ to be delivered as well;
    every commit that succeeded is there.
    """
    failed = 0
    for seed in range(3):
        outcome = drive(tmp_path / str(seed), str(seed))
        assert outcome["messages"] == outcome["committed"]
        assert outcome["incoming"] == []
        failed += outcome["failed"]
    assert failed > 0  # the kills did land among commits


def test_appends_start_their_write_back_at_once(tmp_path, monkeypatch):
    # A large message's spills head for the disk while the rest arrives; only
    # the commit's fsync makes them durable, and it still runs.
    started: list[tuple[int, int]] = []
    real = fsworker.startWriteBack
    monkeypatch.setattr(fsworker, "startWriteBack", lambda fd, offset=0, length=None: started.append((offset, length)))
    synced: list[int] = []
    monkeypatch.setattr(fsworker, "fsyncFile", lambda fd: synced.append(fd))
    for name in ("incoming", "messages"):
        (tmp_path / name).mkdir()
    files = QueueFiles(tmp_path)
    errors = files.run(
        [
            Request(APPEND, "q1", b"a" * 1000, generation=1),
            Request(APPEND, "q1", b"b" * 500, generation=1),
            Request(COMMIT, "q1", b"c", b"{}", generation=1, size=1501),
        ]
    )
    assert errors == [None, None, None]
    assert started == [(0, 1000), (1000, 500)]
    assert len(synced) == 1
    fd = os.open(tmp_path / "messages" / "q1", os.O_RDONLY)
    try:
        real(fd, 0, 1501)  # the real call on a real file: no error
    finally:
        os.close(fd)
