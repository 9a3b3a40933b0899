"""The queue worker: its pipe protocol, and serving requests from a pipe as its child process does."""

from __future__ import annotations

import errno
import json
import os
import threading
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from relay.queue import fsworker
from relay.queue.fsworker import APPEND, COMMIT, DISCARD, REMOVE, SYNC_MODES, UPDATE, QueueFiles

queueIDs = st.text(alphabet="0123456789abcdef", min_size=1, max_size=24)
requests = st.tuples(st.sampled_from(fsworker.OPCODES), queueIDs, st.binary(max_size=300), st.binary(max_size=300))


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


def served(tmp_path: Path, frames: list, sync: str = SYNC_MODES[0]) -> list:
    """Run serve() on a pipe as the child process does, send frames, close, read every reply."""
    for name in ("incoming", "messages"):
        (tmp_path / name).mkdir(exist_ok=True)
    fromRelay, toWorker = os.pipe()
    fromWorker, toRelay = os.pipe()
    files = QueueFiles(tmp_path, sync)
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
    return fsworker.ReplyDecoder().feed(out)


def test_serve_commits_updates_and_removes(tmp_path):
    envelope = json.dumps({"queue_id": "q1"}).encode()
    replies = served(
        tmp_path,
        [
            (1, (APPEND, "q1", b"first ", b"")),
            (2, (COMMIT, "q1", b"second", envelope)),
            (3, (UPDATE, "q1", b"", b'{"updated": true}')),
            (4, (COMMIT, "q2", b"other", b"{}")),
            (5, (REMOVE, "q2", b"", b"")),
            (6, (APPEND, "q3", b"abandoned", b"")),
            (7, (DISCARD, "q3", b"", b"")),
        ],
    )
    assert replies == [(i, None) for i in range(1, 8)]
    assert sorted(os.listdir(tmp_path / "messages")) == ["q1", "q1.json"]
    assert (tmp_path / "messages" / "q1").read_bytes() == b"first second"
    assert (tmp_path / "messages" / "q1.json").read_bytes() == b'{"updated": true}'
    assert os.listdir(tmp_path / "incoming") == []


def test_serve_reports_errors_per_request(tmp_path):
    (tmp_path / "incoming").mkdir()
    (tmp_path / "incoming" / "bad").symlink_to("/dev/full")
    replies = served(
        tmp_path,
        [
            (1, (APPEND, "bad", b"x" * 100_000, b"")),
            (2, (COMMIT, "bad", b"", b"{}")),
            (3, (COMMIT, "good", b"data", b"{}")),
        ],
    )
    assert replies[0][0] == 1 and replies[0][1][0] == errno.ENOSPC
    assert replies[1][0] == 2 and replies[1][1][0] == errno.ENOSPC  # the commit fails with the append's error
    assert replies[2] == (3, None)
    assert sorted(os.listdir(tmp_path / "messages")) == ["good", "good.json"]
    assert os.listdir(tmp_path / "incoming") == []
