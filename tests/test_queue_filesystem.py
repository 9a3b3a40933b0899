"""The filesystem queue store: commit protocol, recovery after crashes, failures."""

from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path

import pytest
from deferred import result
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from relay.envelope import Envelope, Recipient, RecipientState, Status
from relay.plugin import runInline
from relay.queue import filesystem, fsworker
from relay.queue.filesystem import QUEUE_ID, SYNC_MODES, FilesystemQueueStore

DATA = b"Received: from x\r\n\tby y; now\r\nSubject: hi\r\n\r\nbody \xff\xfe\r\n.dot\r\n"


SYNC = "fsync"


@pytest.fixture(autouse=True, params=SYNC_MODES)
def sync(request, monkeypatch):
    """Every test runs with each way of making a batch durable."""
    monkeypatch.setattr(sys.modules[__name__], "SYNC", request.param)
    return request.param


def makeStore(path: Path, clock: Clock | None = None) -> FilesystemQueueStore:
    if clock is None:
        clock = Clock()
        clock.advance(1_700_000_000.25)
    return FilesystemQueueStore(path, runInline, clock, SYNC)


class Pending:
    """A C{blocking} that runs nothing until told: the test decides when the worker gets to each batch."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def __call__(self, f, *args) -> Deferred:
        d = Deferred()
        self.calls.append((d, f, args))
        return d

    def runAll(self, until=lambda: False) -> None:
        while self.calls and not until():
            waiting, f, args = self.calls.pop(0)
            waiting.callback(f(*args))


def envelopeFor(queueID: str) -> Envelope:
    return Envelope(
        queue_id=queueID,
        sender="sender@example.org",
        recipients=[
            Recipient("a@example.test", notify=("SUCCESS", "FAILURE"), orcpt="rfc822;A@example.test"),
            Recipient(
                "b@example.test",
                state=RecipientState.DELIVERED,
                attempts=2,
                next_attempt=None,
                last_status=Status(250, "2.0.0", "ok"),
                backend="local",
            ),
            Recipient("ü@exämple.test", attempts=1, next_attempt=1234.5, last_status=Status(451, "4.4.1", "later")),
        ],
        received_at=1_700_000_000.25,
        size=len(DATA),
        client_address="192.0.2.1",
        helo="client.example.org",
        body="8BITMIME",
        smtputf8=True,
        ret="HDRS",
        envid="xyz",
        auth="user",
        extra={"k": [1, "v"]},
    )


def queueOne(store: FilesystemQueueStore, data: bytes = DATA) -> Envelope:
    incoming = store.begin()
    incoming.write(data[:10])
    incoming.write(data[10:])
    envelope = envelopeFor(incoming.queue_id)
    assert result(incoming.commit(envelope)) is None
    return envelope


def files(path: Path) -> list[str]:
    """The files of the queue at C{path}, spares left out."""
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and p.parent.name != "spare")


def spares(path: Path) -> dict[int, bytes]:
    """The spare files of the queue at C{path}: their content by inode number."""
    return {p.stat().st_ino: p.read_bytes() for p in (path / "spare").iterdir()}


def test_layout_and_modes(tmp_path):
    makeStore(tmp_path / "q")
    for name in ("q", "q/incoming", "q/messages", "q/spare"):
        assert (tmp_path / name).is_dir()
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o700


def test_commit_then_recover_in_new_instance(tmp_path):
    envelope = queueOne(makeStore(tmp_path))
    assert files(tmp_path) == [f"messages/{envelope.queue_id}", f"messages/{envelope.queue_id}.json"]
    assert (tmp_path / "messages" / envelope.queue_id).stat().st_mode & 0o777 == 0o600

    store = makeStore(tmp_path)
    recovered = result(store.recover())
    assert recovered == [envelope]
    with store.openData(envelope.queue_id) as f:
        assert f.read() == DATA


def test_update_then_recover(tmp_path):
    store = makeStore(tmp_path)
    envelope = queueOne(store)
    envelope.recipients[0].state = RecipientState.FAILED
    envelope.recipients[0].last_status = Status(550, "5.1.1", "no such user")
    envelope.recipients[2].attempts = 2
    assert result(store.update(envelope)) is None
    assert not list((tmp_path / "messages").glob("*.new"))
    assert result(makeStore(tmp_path).recover()) == [envelope]


def test_update_snapshots_the_envelope(tmp_path):
    """The scheduler mutates the envelope after update(); what is written is what it was then."""
    pending = Pending()
    store = FilesystemQueueStore(tmp_path, runInline, Clock(), SYNC)
    envelope = queueOne(store)
    store._blocking = pending
    envelope.recipients[0].attempts = 7
    d = store.update(envelope)
    envelope.recipients[0].attempts = 99
    pending.runAll()
    assert result(d) is None
    assert result(makeStore(tmp_path).recover())[0].recipients[0].attempts == 7


def test_remove_then_recover(tmp_path):
    store = makeStore(tmp_path)
    first = queueOne(store)
    second = queueOne(store)
    assert result(store.remove(first.queue_id)) is None
    assert result(store.remove(first.queue_id)) is None  # missing files are fine
    assert result(makeStore(tmp_path).recover()) == [second]
    assert files(tmp_path) == [f"messages/{second.queue_id}", f"messages/{second.queue_id}.json"]
    assert len(spares(tmp_path)) == 2


def test_removed_files_are_reused_for_new_messages(tmp_path):
    """
    A removal frees no inode and a commit allocates none while there are
    spares; a spare's old content never shows through, even when it was
    longer than the new one, and spares outlive the store.
    """
    store = makeStore(tmp_path)
    first = queueOne(store, DATA * 50)
    assert result(store.remove(first.queue_id)) is None
    left = spares(tmp_path)
    assert len(left) == 2 and DATA * 50 in left.values()
    store = makeStore(tmp_path)  # a new run finds the spares
    second = queueOne(store)
    assert spares(tmp_path) == {}
    inodes = {(tmp_path / name).stat().st_ino for name in files(tmp_path)}
    assert inodes == set(left)
    assert (tmp_path / "messages" / second.queue_id).read_bytes() == DATA
    assert result(makeStore(tmp_path).recover()) == [second]
    with store.openData(second.queue_id) as f:
        assert f.read() == DATA


def test_update_swaps_envelopes_through_a_spare(tmp_path):
    store = makeStore(tmp_path)
    first = queueOne(store)
    second = queueOne(store)
    assert result(store.remove(first.queue_id)) is None
    before = {(tmp_path / name).stat().st_ino for name in files(tmp_path)} | set(spares(tmp_path))
    second.recipients[0].attempts = 5
    assert result(store.update(second)) is None
    after = {(tmp_path / name).stat().st_ino for name in files(tmp_path)} | set(spares(tmp_path))
    assert after == before
    assert result(makeStore(tmp_path).recover())[0].recipients[0].attempts == 5
    # the old envelope is a spare now
    assert any(json.loads(content)["recipients"][0]["attempts"] == 0 for content in spares(tmp_path).values())


def test_large_or_surplus_files_are_unlinked_not_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(fsworker, "SPARES", 3)
    store = makeStore(tmp_path)
    big = queueOne(store, b"x" * (fsworker.SPARE_SIZE + 1))
    assert result(store.remove(big.queue_id)) is None
    assert [json.loads(content)["queue_id"] for content in spares(tmp_path).values()] == [big.queue_id]
    envelopes = [queueOne(store) for _ in range(3)]
    for envelope in envelopes:
        assert result(store.remove(envelope.queue_id)) is None
    assert len(spares(tmp_path)) == 3
    assert files(tmp_path) == []


def test_recover_sorts_by_queue_id(tmp_path):
    clock = Clock()
    store = makeStore(tmp_path, clock)
    queued = []
    for _ in range(5):
        queued.append(queueOne(store).queue_id)
        clock.advance(0.5)
    assert [e.queue_id for e in result(makeStore(tmp_path).recover())] == queued


def test_abort_leaves_nothing(tmp_path):
    store = makeStore(tmp_path)
    incoming = store.begin()
    incoming.write(DATA)
    incoming.abort()
    incoming.abort()
    assert files(tmp_path) == []
    with pytest.raises(ValueError):
        incoming.write(b"more")


def test_abort_after_commit_keeps_message(tmp_path):
    store = makeStore(tmp_path)
    incoming = store.begin()
    incoming.write(DATA)
    envelope = envelopeFor(incoming.queue_id)
    result(incoming.commit(envelope))
    incoming.abort()
    assert result(makeStore(tmp_path).recover()) == [envelope]


def test_uncommitted_message_vanishes_at_recover(tmp_path):
    store = makeStore(tmp_path)
    incoming = store.begin()
    incoming.write(DATA)
    (tmp_path / "incoming" / "stray.json").write_text("{}")
    assert result(makeStore(tmp_path).recover()) == []
    assert files(tmp_path) == []


def test_crash_states(tmp_path):
    store = makeStore(tmp_path)
    good = queueOne(store)
    noEnvelope = queueOne(store)
    noData = queueOne(store)
    leftover = queueOne(store)
    corrupt = queueOne(store)
    wrongID = queueOne(store)
    messages = tmp_path / "messages"
    (messages / f"{noEnvelope.queue_id}.json").unlink()
    (messages / noData.queue_id).unlink()
    (messages / f"{leftover.queue_id}.json.new").write_text('{"half": ')
    (messages / f"{corrupt.queue_id}.json").write_bytes(b'{"format": 1, "queue_id": ')
    (messages / f"{wrongID.queue_id}.json").write_text(json.dumps(envelopeFor(good.queue_id).toJSON()))

    recovered = result(makeStore(tmp_path).recover())

    assert sorted(e.queue_id for e in recovered) == sorted([good.queue_id, leftover.queue_id])
    assert files(tmp_path) == sorted(
        [
            f"messages/{good.queue_id}",
            f"messages/{good.queue_id}.json",
            f"messages/{leftover.queue_id}",
            f"messages/{leftover.queue_id}.json",
            # Corrupt envelopes are set aside with their data, never deleted.
            f"messages/{corrupt.queue_id}",
            f"messages/{corrupt.queue_id}.json.corrupt",
            f"messages/{wrongID.queue_id}",
            f"messages/{wrongID.queue_id}.json.corrupt",
        ]
    )
    assert (messages / f"{corrupt.queue_id}.json.corrupt").read_bytes() == b'{"format": 1, "queue_id": '
    # A second recovery is stable.
    assert sorted(e.queue_id for e in result(makeStore(tmp_path).recover())) == sorted(
        [good.queue_id, leftover.queue_id]
    )


def test_recovery_is_logged(tmp_path):
    from twisted.logger import globalLogPublisher

    store = makeStore(tmp_path)
    corrupt = queueOne(store)
    (tmp_path / "messages" / f"{corrupt.queue_id}.json").write_bytes(b"\xff\xfe not json")
    noData = queueOne(store)
    (tmp_path / "messages" / noData.queue_id).unlink()
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        assert result(makeStore(tmp_path).recover()) == []
    finally:
        globalLogPublisher.removeObserver(events.append)
    texts = [event.get("log_format", "").format(**event) for event in events]
    assert any(corrupt.queue_id in t and "corrupt" in t for t in texts), texts
    assert any(noData.queue_id in t and "no data" in t for t in texts), texts


def test_commit_failure_when_messages_is_not_a_directory(tmp_path):
    store = makeStore(tmp_path)
    incoming = store.begin()
    incoming.write(DATA)
    (tmp_path / "messages").rmdir()
    (tmp_path / "messages").write_bytes(b"not a directory")
    with pytest.raises(OSError) as info:
        result(incoming.commit(envelopeFor(incoming.queue_id)))
    assert info.value.errno == errno.ENOTDIR
    incoming.abort()
    incoming.abort()
    assert files(tmp_path / "incoming") == []
    (tmp_path / "messages").unlink()
    assert result(makeStore(tmp_path).recover()) == []
    assert files(tmp_path) == []


def failSyncs(monkeypatch, name: str, failing: set[int]) -> list:
    """Make the given calls (1-based) of fsworker.NAME fail with EIO; the others run."""
    calls: list = []
    real = getattr(fsworker, name)

    def sync(arg):
        calls.append(arg)
        if len(calls) in failing:
            raise OSError(errno.EIO, "Input/output error")
        return real(arg)

    monkeypatch.setattr(fsworker, name, sync)
    return calls


@pytest.mark.parametrize("where", ["file", "batch"])
def test_commit_failure_at_sync_removes_committed_files(tmp_path, monkeypatch, sync, where):
    """
    A sync of a commit fails (fsync of a file or of the directory; the
    batch's one syncfs), or writing its envelope does: nothing is kept, the
    commit fails.
    """
    store = makeStore(tmp_path)
    incoming = store.begin()
    incoming.write(DATA)
    if sync == "syncfs":
        # No single file is synced: the file case fails creating the envelope file.
        calls = failSyncs(monkeypatch, "create" if where == "file" else "syncFilesystem", {2 if where == "file" else 1})
    else:
        calls = failSyncs(monkeypatch, "fsyncFile" if where == "file" else "fsyncDirectory", {1})
    with pytest.raises(OSError) as info:
        result(incoming.commit(envelopeFor(incoming.queue_id)))
    assert info.value.errno == errno.EIO
    assert calls  # the failure came from the sync
    monkeypatch.undo()
    assert files(tmp_path) == []
    assert result(makeStore(tmp_path).recover()) == []


def test_syncs_per_batch(tmp_path, monkeypatch, sync):
    """syncfs: one sync for a batch of commits, a second only when it updates an envelope."""
    store = makeStore(tmp_path)
    name = "syncFilesystem" if sync == "syncfs" else "fsyncDirectory"
    calls = failSyncs(monkeypatch, name, set())
    envelope = queueOne(store)
    assert len(calls) == 1
    envelope.recipients[0].attempts = 5
    result(store.update(envelope))
    assert len(calls) == (3 if sync == "syncfs" else 2)
    result(store.remove(envelope.queue_id))  # not synced of its own: the next batch's sync carries it
    assert len(calls) == (3 if sync == "syncfs" else 2)


def test_update_fails_when_its_rename_cannot_be_made_durable(tmp_path, monkeypatch, sync):
    store = makeStore(tmp_path)
    envelope = queueOne(store)
    name = "syncFilesystem" if sync == "syncfs" else "fsyncDirectory"
    failSyncs(monkeypatch, name, {2} if sync == "syncfs" else {1})
    envelope.recipients[0].attempts = 5
    with pytest.raises(OSError):
        result(store.update(envelope))


def test_interrupted_in_place_commits_are_discarded(tmp_path):
    """What a crash during a syncfs commit can leave: an empty envelope, or data shorter than recorded."""
    store = makeStore(tmp_path)
    good, empty, short = queueOne(store), queueOne(store), queueOne(store)
    messages = tmp_path / "messages"
    (messages / f"{empty.queue_id}.json").write_bytes(b"")
    (messages / short.queue_id).write_bytes(DATA[:5])
    assert result(makeStore(tmp_path).recover()) == [good]
    assert files(tmp_path) == [f"messages/{good.queue_id}", f"messages/{good.queue_id}.json"]


def test_commit_twice_or_with_foreign_envelope_fails(tmp_path):
    store = makeStore(tmp_path)
    incoming = store.begin()
    with pytest.raises(ValueError):
        result(incoming.commit(envelopeFor("someoneelse")))
    assert files(tmp_path) == []
    incoming = store.begin()
    result(incoming.commit(envelopeFor(incoming.queue_id)))
    with pytest.raises(ValueError):
        result(incoming.commit(envelopeFor(incoming.queue_id)))


def _devFullIncoming(store, monkeypatch, tmp_path):
    """An incoming message whose data file is /dev/full: every write that reaches it gets ENOSPC."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    queueID = "0123456789abcdeff00"
    monkeypatch.setattr(store, "newQueueID", lambda: queueID)
    (tmp_path / "incoming" / queueID).symlink_to("/dev/full")  # where spilled data goes
    (tmp_path / "messages" / queueID).symlink_to("/dev/full")  # where syncfs commits write
    return store.begin()


def test_write_enospc_propagates(tmp_path, monkeypatch):
    store = makeStore(tmp_path)
    incoming = _devFullIncoming(store, monkeypatch, tmp_path)
    with pytest.raises(OSError) as info:
        incoming.write(b"x" * 1_000_000)  # larger than any buffer: reaches the device now
    assert info.value.errno == errno.ENOSPC
    incoming.abort()
    assert os.path.exists("/dev/full")
    assert files(tmp_path) == []


def test_buffered_enospc_fails_commit(tmp_path, monkeypatch):
    store = makeStore(tmp_path)
    incoming = _devFullIncoming(store, monkeypatch, tmp_path)
    incoming.write(b"small")
    with pytest.raises(OSError) as info:
        result(incoming.commit(envelopeFor(incoming.queue_id)))
    assert info.value.errno == errno.ENOSPC
    incoming.abort()
    assert os.path.exists("/dev/full")
    assert result(makeStore(tmp_path).recover()) == []
    assert files(tmp_path) == []


def test_queue_ids_unique_and_sortable(tmp_path):
    clock = Clock()
    clock.advance(1_700_000_000)
    store = makeStore(tmp_path, clock)
    ids = []
    for i in range(10000):
        incoming = store.begin()
        ids.append(incoming.queue_id)
        incoming.abort()
        if i % 100 == 99:
            clock.advance(0.001)
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    assert all(QUEUE_ID.match(q) and len(q) == 19 for q in ids)
    # Another store (another process, same clock reading) never repeats them.
    again = Clock()
    again.advance(1_700_000_000)
    other = makeStore(tmp_path, again)
    assert not {other.newQueueID() for _ in range(1000)} & set(ids)


def test_queue_ids_follow_the_clock(tmp_path):
    clock = Clock()
    store = makeStore(tmp_path, clock)
    first = store.newQueueID()
    clock.advance(1)
    second = store.newQueueID()
    assert first < second
    assert int(second[:13], 16) == 1_000_000


def test_group_commit_shares_directory_syncs(tmp_path, monkeypatch):
    """Messages waiting for a directory sync while one runs share the next one."""
    pending = Pending()
    syncs = []
    name = "syncFilesystem" if SYNC == "syncfs" else "fsyncDirectory"
    real = getattr(fsworker, name)
    monkeypatch.setattr(fsworker, name, lambda path: (syncs.append(path), real(path)))
    store = FilesystemQueueStore(tmp_path, pending, Clock(), SYNC)
    commits = []
    for _ in range(5):
        incoming = store.begin()
        incoming.write(DATA)
        commits.append(incoming.commit(envelopeFor(incoming.queue_id)))
    pending.runAll()
    assert [result(d) for d in commits] == [None] * 5
    # The first commit's batch ran alone; the four that arrived while it ran
    # shared the second: one directory sync or one file system sync each.
    assert len(syncs) == 2
    assert len(result(makeStore(tmp_path).recover())) == 5


def test_bad_queue_id_is_refused(tmp_path):
    store = makeStore(tmp_path)
    with pytest.raises(ValueError):
        store.openData("../etc/passwd")
    with pytest.raises(ValueError):
        result(store.remove("a/b"))


def test_plugin_builds_store(tmp_path):
    from relay.interfaces import IQueueStore, IQueueStoreFactory
    from relay.plugin import PluginContext, find

    factory = find("filesystem", IQueueStoreFactory)
    assert factory.name == "filesystem"
    assert set(factory.keys) == {"path", "sync"}
    context = PluginContext(reactor=Clock(), hostname="h.example", postmaster="pm@h.example", state_dir=tmp_path)
    store = factory.build({"path": str(tmp_path / "queue"), "sync": SYNC}, context)
    assert IQueueStore.providedBy(store)
    assert store.sync == SYNC
    envelope = queueOne(store)
    assert result(makeStore(tmp_path / "queue").recover()) == [envelope]
    assert factory.build({"path": str(tmp_path / "other")}, context).sync == SYNC_MODES[0]


def test_plugin_refuses_unknown_sync(tmp_path):
    from relay.errors import OptionError
    from relay.interfaces import IQueueStoreFactory
    from relay.plugin import PluginContext, find

    context = PluginContext(reactor=Clock(), hostname="h.example", postmaster="pm@h.example", state_dir=tmp_path)
    with pytest.raises(OptionError) as info:
        find("filesystem", IQueueStoreFactory).build({"path": str(tmp_path), "sync": "never"}, context)
    assert info.value.key == "sync"
    assert "'never'" in info.value.message


def test_plugin_refuses_unusable_path(tmp_path):
    from relay.errors import OptionError
    from relay.interfaces import IQueueStoreFactory
    from relay.plugin import PluginContext, find

    (tmp_path / "file").write_text("x")
    context = PluginContext(reactor=Clock(), hostname="h.example", postmaster="pm@h.example", state_dir=tmp_path)
    with pytest.raises(OptionError) as info:
        find("filesystem", IQueueStoreFactory).build({"path": str(tmp_path / "file" / "queue")}, context)
    assert info.value.key == "path"


def test_small_message_touches_no_file_before_commit(tmp_path):
    """The reactor thread never creates a file for a message that fits the buffer."""
    store = makeStore(tmp_path)
    incoming = store.begin()
    incoming.write(b"x" * (filesystem.SPILL - 1))
    assert files(tmp_path) == []
    result(incoming.commit(envelopeFor(incoming.queue_id)))
    assert files(tmp_path) == [f"messages/{incoming.queue_id}", f"messages/{incoming.queue_id}.json"]


def test_large_message_spills_to_incoming_then_commits(tmp_path):
    store = makeStore(tmp_path)
    incoming = store.begin()
    chunks = [bytes([65 + i % 26]) * 10_000 for i in range(70)]  # 700 kB, more than two spills
    for chunk in chunks:
        incoming.write(chunk)
    assert files(tmp_path) == [f"incoming/{incoming.queue_id}"]
    envelope = envelopeFor(incoming.queue_id)
    result(incoming.commit(envelope))
    store = makeStore(tmp_path)
    assert result(store.recover()) == [envelope]
    with store.openData(envelope.queue_id) as f:
        assert f.read() == b"".join(chunks)


def test_abort_after_spill_removes_the_file(tmp_path):
    store = makeStore(tmp_path)
    incoming = store.begin()
    incoming.write(b"x" * (filesystem.SPILL + 1))
    assert files(tmp_path) == [f"incoming/{incoming.queue_id}"]
    incoming.abort()
    assert files(tmp_path) == []


def test_spills_in_a_worker_keep_order_and_report_errors_late(tmp_path, monkeypatch):
    """
    With a real worker, spills run after write() returns, one after another;
    an error in one is raised by the next write(), and fails commit.
    """
    pending: list[tuple] = []

    def deferred(f, *args):
        d = Deferred()
        pending.append((d, f, args))
        return d

    def runAll():
        while pending:
            waiting, f, args = pending.pop(0)
            try:
                outcome = f(*args)
            except Exception:
                waiting.errback()
            else:
                waiting.callback(outcome)

    store = FilesystemQueueStore(tmp_path, deferred, Clock(), SYNC)
    incoming = store.begin()
    first, second = b"1" * filesystem.SPILL, b"2" * filesystem.SPILL
    incoming.write(first)
    incoming.write(second)
    assert len(pending) == 1  # the second spill waits for the first
    d = incoming.commit(envelopeFor(incoming.queue_id))
    runAll()
    assert result(d) is None
    with store.openData(incoming.queue_id) as f:
        assert f.read() == first + second

    broken = _devFullIncoming(store, monkeypatch, tmp_path)
    broken.write(b"x" * filesystem.SPILL)  # handed to the worker, not yet written
    runAll()
    with pytest.raises(OSError) as info:
        broken.write(b"more")
    assert info.value.errno == errno.ENOSPC
    with pytest.raises(OSError):
        d = broken.commit(envelopeFor(broken.queue_id))
        runAll()
        result(d)
    assert not (tmp_path / "incoming" / broken.queue_id).exists()
    assert os.path.exists("/dev/full")


def test_recovery_leaves_this_process_messages_alone(tmp_path):
    """Listeners accept while recovery runs: what this store began is not a leftover."""
    old = queueOne(makeStore(tmp_path))
    (tmp_path / "incoming" / "0000000000000leftover").write_bytes(b"x")
    store = makeStore(tmp_path)
    committed = queueOne(store)
    halfway = store.begin()
    halfway.write(b"y" * (filesystem.SPILL + 1))  # spilled into incoming/
    (tmp_path / "messages" / f"{committed.queue_id}.json.new").write_text("{")  # an update in flight
    assert result(store.recover()) == [old]
    assert sorted(files(tmp_path)) == sorted(
        [
            f"incoming/{halfway.queue_id}",
            f"messages/{old.queue_id}",
            f"messages/{old.queue_id}.json",
            f"messages/{committed.queue_id}",
            f"messages/{committed.queue_id}.json",
            f"messages/{committed.queue_id}.json.new",
        ]
    )
    result(halfway.commit(envelopeFor(halfway.queue_id)))
    assert result(store.remove(committed.queue_id)) is None
    assert sorted(e.queue_id for e in result(makeStore(tmp_path).recover())) == sorted([old.queue_id, halfway.queue_id])


def test_update_without_exchange_renames(tmp_path, monkeypatch):
    """Where renameat2 is missing, an update is a plain write-new and rename."""
    monkeypatch.setattr(fsworker, "_exchange", None)
    store = makeStore(tmp_path)
    envelope = queueOne(store)
    envelope.recipients[0].attempts = 3
    assert result(store.update(envelope)) is None
    assert result(makeStore(tmp_path).recover())[0].recipients[0].attempts == 3
    assert spares(tmp_path) == {}


def test_spares_removed_behind_the_store_s_back_are_skipped(tmp_path):
    store = makeStore(tmp_path)
    for envelope in [queueOne(store), queueOne(store)]:
        assert result(store.remove(envelope.queue_id)) is None
    for spare in sorted((tmp_path / "spare").iterdir())[:3]:
        spare.unlink()  # an operator tidying up
    first, second = queueOne(store), queueOne(store)
    assert result(makeStore(tmp_path).recover()) == [first, second]
    assert spares(tmp_path) == {}


def test_a_client_faster_than_the_worker_is_held_back(tmp_path):
    """Past MAX_UNWRITTEN bytes the worker has not written yet, the incoming message asks the session to wait."""
    pending = Pending()
    store = FilesystemQueueStore(tmp_path, pending, Clock(), SYNC)
    incoming = store.begin()
    block = b"x" * 998 + b"\r\n"
    written = 0
    while incoming.writable() is None:
        incoming.write(block * 64)
        written += len(block) * 64
        assert written < 10 * filesystem.MAX_UNWRITTEN, "never held back"
    assert filesystem.MAX_UNWRITTEN < written <= filesystem.MAX_UNWRITTEN + filesystem.SPILL + len(block) * 64
    caughtUp = incoming.writable()
    assert not caughtUp.called
    pending.runAll(until=lambda: caughtUp.called)
    assert caughtUp.called and incoming.writable() is None
    incoming.abort()
