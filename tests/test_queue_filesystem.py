"""The filesystem queue store: file format, commit protocol, recovery, failures, the lock."""

from __future__ import annotations

import errno
import json
import os
import zlib
from pathlib import Path

import pytest
from deferred import result
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessTerminated
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from relay import fsutil
from relay.envelope import Envelope, Recipient, RecipientState, Status
from relay.plugin import runInline
from relay.queue import filesystem, fsworker
from relay.queue.filesystem import QUEUE_ID, FilesystemQueueStore, ProcessEngine, QueueInUse, WorkerLost
from relay.queue.fsworker import FOOTER, RECORD, QueueFiles

DATA = b"Received: from x\r\n\tby y; now\r\nSubject: hi\r\n\r\nbody \xff\xfe\r\n.dot\r\n"
ARRIVAL = 1_700_000_000.25


@pytest.fixture
def stores():
    """Stores made by a test, stopped (and their locks released) at its end."""
    made: list[FilesystemQueueStore] = []
    yield made
    for store in made:
        store._unlock()


@pytest.fixture
def make(stores):
    def makeStore(path: Path, clock: Clock | None = None, blocking=runInline) -> FilesystemQueueStore:
        if clock is None:
            clock = Clock()
            clock.advance(ARRIVAL)
        store = FilesystemQueueStore(path, blocking, clock)
        stores.append(store)
        return store

    return makeStore


def reopen(store: FilesystemQueueStore, make) -> FilesystemQueueStore:
    """A restart: the store stops (releasing its lock) and another takes the queue."""
    result(store.stop())
    return make(store.path)


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
            try:
                outcome = f(*args)
            except Exception:
                waiting.errback()
            else:
                waiting.callback(outcome)


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
        received_at=ARRIVAL,
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
    """The files of the queue at C{path}, its lock and format mark left out."""
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and p.name not in ("lock", "format"))


def recovered(store: FilesystemQueueStore) -> int:
    """A start: recovery (which counts nothing), then the first scan, which counts (and tidies)."""
    assert result(store.recover()) is None
    return result(store.scan(2e9, 0, ())).total


def load(store: FilesystemQueueStore, queueID: str) -> Envelope:
    return result(store.load(queueID))


def logged():
    events: list[dict] = []

    class Capture:
        def __enter__(self):
            globalLogPublisher.addObserver(events.append)
            return self

        def __exit__(self, *exc):
            globalLogPublisher.removeObserver(events.append)

        def texts(self) -> list[str]:
            from twisted.logger import formatEvent

            return [formatEvent(event) for event in events]

    return Capture()


def countCalls(monkeypatch, module, name: str, failing: set[int] = frozenset()) -> list:
    """Count the calls of C{module.name}; the given calls (1-based) fail with EIO."""
    calls: list = []
    real = getattr(module, name)

    def wrapper(*args):
        calls.append(args)
        if len(calls) in failing:
            raise OSError(errno.EIO, "Input/output error")
        return real(*args)

    monkeypatch.setattr(module, name, wrapper)
    return calls


# -- layout and format ----------------------------------------------------------


def test_layout_and_modes(tmp_path, make):
    make(tmp_path / "q")
    for name in ("q", "q/incoming", "q/messages"):
        assert (tmp_path / name).is_dir()
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o700
    assert not (tmp_path / "q" / "spare").exists()
    assert (tmp_path / "q" / "lock").read_text() == f"{os.getpid()}\n"


def test_new_directories_are_made_durable(tmp_path, make, monkeypatch):
    """A power cut during the first run must not take back the queue: each parent is fsynced after its mkdir."""
    synced = countCalls(monkeypatch, fsutil, "fsyncDirectory")
    (tmp_path / "state").mkdir()
    make(tmp_path / "state" / "deep" / "queue")
    paths = [Path(args[0]) for args in synced]
    for parent in ("state", "state/deep", "state/deep/queue"):
        assert tmp_path / parent in paths, paths
    assert tmp_path not in paths  # up to the first that already existed
    assert paths.count(tmp_path / "state" / "deep" / "queue") == 2  # after incoming/, after messages/
    synced.clear()
    result(make(tmp_path / "other").stop())
    synced.clear()
    # A queue that exists: nothing created, nothing synced.
    assert fsutil.makeDirectories(tmp_path / "state" / "deep" / "queue") == []
    assert synced == []


def test_one_file_data_envelope_footer(tmp_path, make):
    store = make(tmp_path)
    envelope = queueOne(store)
    queueID = envelope.queue_id
    assert files(tmp_path) == [f"messages/{queueID}"]
    path = tmp_path / "messages" / queueID
    assert path.stat().st_mode & 0o777 == 0o600
    raw = path.read_bytes()
    assert raw.startswith(DATA)
    magic, version, dataLength, envelopeLength, qid, crc = FOOTER.unpack(raw[-FOOTER.size :])
    assert (magic, version, dataLength) == (fsworker.MAGIC, 1, len(DATA))
    assert qid.rstrip(b"\0") == queueID.encode()
    assert json.loads(raw[len(DATA) : len(DATA) + envelopeLength]) == envelope.toJSON()
    assert zlib.crc32(raw[:-4]) == crc
    again = reopen(store, make)
    assert recovered(again) == 1
    assert load(again, queueID) == envelope
    with again.openData(queueID) as f:
        assert f.read() == DATA


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda raw: raw[:5] + b"X" + raw[6:], "CRC mismatch"),  # one octet of the data
        (lambda raw: raw[:-30] + bytes([raw[-30] ^ 1]) + raw[-29:], "queue id"),  # the footer's queue id
        (lambda raw: raw[:-7], "no footer"),  # a torn tail
        (lambda raw: b"", "no footer"),
        (lambda raw: raw[: -FOOTER.size] + b"\0" * FOOTER.size, "no footer"),  # a footer never written
    ],
)
def test_a_file_that_does_not_check_out_is_set_aside(tmp_path, make, damage, reason):
    store = make(tmp_path)
    good, bad = queueOne(store), queueOne(store)
    envelope = bad
    envelope.recipients[0].attempts = 4
    result(store.update(envelope))
    path = tmp_path / "messages" / bad.queue_id
    path.write_bytes(damage(path.read_bytes()))
    with logged() as log:
        with pytest.raises(ValueError, match=reason):
            load(store, bad.queue_id)
    assert any(bad.queue_id in t and "damaged" in t and "set aside" in t for t in log.texts()), log.texts()
    assert files(tmp_path) == sorted(
        [f"messages/{good.queue_id}", f"messages/{bad.queue_id}.damaged", f"messages/{bad.queue_id}.state.damaged"]
    )
    assert [queueID for _, queueID in result(store.scan(2e9, 10, ())).due] == [good.queue_id]
    with logged() as log:
        assert recovered(reopen(store, make)) == 1
    assert any("1 damaged messages are set aside" in t for t in log.texts()), log.texts()


def test_another_message_s_file_under_this_name_is_never_taken_for_it(tmp_path, make):
    """What a power cut on a lax file system might do: a name showing another file's content."""
    store = make(tmp_path)
    first, second = queueOne(store, b"first message\r\n"), queueOne(store, b"second message\r\n")
    messages = tmp_path / "messages"
    (messages / second.queue_id).write_bytes((messages / first.queue_id).read_bytes())
    with pytest.raises(ValueError, match="queue id"):
        load(store, second.queue_id)
    with pytest.raises(FileNotFoundError):
        store.openData(second.queue_id)
    with store.openData(first.queue_id) as f:
        assert f.read() == b"first message\r\n"


def test_open_data_refuses_a_file_without_footer(tmp_path, make):
    store = make(tmp_path)
    envelope = queueOne(store)
    path = tmp_path / "messages" / envelope.queue_id
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(OSError) as info:
        store.openData(envelope.queue_id)
    assert info.value.errno == errno.EIO


# -- the journal ------------------------------------------------------------------


def test_update_appends_to_the_journal_never_rewriting_the_data(tmp_path, make, monkeypatch):
    store = make(tmp_path)
    envelope = queueOne(store)
    data = tmp_path / "messages" / envelope.queue_id
    before = (data.stat().st_ino, data.read_bytes())
    fsyncs = countCalls(monkeypatch, fsworker, "fsyncFile")
    directories = countCalls(monkeypatch, fsworker, "fsyncDirectory")
    envelope.recipients[0].state = RecipientState.FAILED
    envelope.recipients[0].last_status = Status(550, "5.1.1", "no such user")
    envelope.recipients[2].attempts = 2
    assert result(store.update(envelope)) is None
    assert (len(fsyncs), len(directories)) == (1, 1)  # the journal is new: its name too
    envelope.recipients[2].attempts = 3
    assert result(store.update(envelope)) is None
    assert (len(fsyncs), len(directories)) == (2, 1)  # an append: the file alone
    assert (data.stat().st_ino, data.read_bytes()) == before
    journal = tmp_path / "messages" / f"{envelope.queue_id}.state"
    assert journal.stat().st_mode & 0o777 == 0o600
    assert load(reopen(store, make), envelope.queue_id) == envelope


def test_update_snapshots_the_envelope(tmp_path, make):
    """The scheduler mutates the envelope after update(); what is written is what it was then."""
    pending = Pending()
    store = make(tmp_path, blocking=pending)
    incoming = store.begin()
    incoming.write(DATA)
    envelope = envelopeFor(incoming.queue_id)
    d = incoming.commit(envelope)
    pending.runAll()
    result(d)
    envelope.recipients[0].attempts = 7
    d = store.update(envelope)
    envelope.recipients[0].attempts = 99
    pending.runAll()
    assert result(d) is None
    d = store.load(envelope.queue_id)
    pending.runAll()
    assert result(d).recipients[0].attempts == 7


def test_torn_last_record_is_ignored_and_the_journal_rewritten(tmp_path, make):
    store = make(tmp_path)
    envelope = queueOne(store)
    for attempts in (1, 2):
        envelope.recipients[0].attempts = attempts
        result(store.update(envelope))
    journal = tmp_path / "messages" / f"{envelope.queue_id}.state"
    whole = journal.read_bytes()
    torn = fsworker.record(b'{"queue_id": "x", "recipients": []}')[:-3]
    journal.write_bytes(whole + torn)  # an append a power cut interrupted
    store = reopen(store, make)
    loaded = load(store, envelope.queue_id)
    assert loaded.recipients[0].attempts == 2  # the previous state stands
    loaded.recipients[0].attempts = 3
    result(store.update(loaded))
    # Appending after the torn record would hide it: the journal was rewritten instead.
    raw = journal.read_bytes()
    assert RECORD.unpack_from(raw)[1] + RECORD.size == len(raw)
    assert load(reopen(store, make), envelope.queue_id).recipients[0].attempts == 3


def test_a_damaged_record_in_the_middle_keeps_the_state_before_it(tmp_path, make):
    store = make(tmp_path)
    envelope = queueOne(store)
    for attempts in (1, 2, 3):
        envelope.recipients[0].attempts = attempts
        result(store.update(envelope))
    journal = tmp_path / "messages" / f"{envelope.queue_id}.state"
    raw = bytearray(journal.read_bytes())
    first = RECORD.size + RECORD.unpack_from(raw)[1]
    raw[first + RECORD.size + 5] ^= 0xFF  # inside the second record
    journal.write_bytes(bytes(raw))
    assert load(store, envelope.queue_id).recipients[0].attempts == 1


def test_another_message_s_journal_records_in_a_journal_are_not_its_state(tmp_path, make):
    """
    After a power cut, an append that was not synced may show a freed file's
    bytes (ext4 data=writeback; the power-loss test's stale mode): whole
    records of another message's journal.  They end the journal as a torn
    record does; the message is neither set aside (its recipients would never
    get it) nor given another's state.
    """
    store = make(tmp_path)
    envelope, other = queueOne(store), queueOne(store)
    for message in (envelope, other):
        message.recipients[0].attempts = 7
        result(store.update(message))
    messages = tmp_path / "messages"
    foreign = (messages / f"{other.queue_id}.state").read_bytes()
    journal = messages / f"{envelope.queue_id}.state"
    journal.write_bytes(foreign)  # the first append never synced: nothing of its own
    loaded = load(store, envelope.queue_id)
    assert loaded.recipients[0].attempts == 0  # the state at commit stands
    envelope.recipients[0].attempts = 8
    result(store.update(envelope))  # and the next update rewrites the journal
    assert load(store, envelope.queue_id).recipients[0].attempts == 8
    journal.write_bytes(journal.read_bytes() + foreign)  # a later append never synced
    assert load(store, envelope.queue_id).recipients[0].attempts == 8
    assert not list(messages.glob("*.damaged"))


def test_journal_is_compacted(tmp_path, make, monkeypatch):
    store = make(tmp_path)
    envelope = queueOne(store)
    journal = tmp_path / "messages" / f"{envelope.queue_id}.state"
    renames = countCalls(monkeypatch, os, "rename")
    sizes = []
    for attempts in range(1, 80):
        envelope.recipients[0].attempts = attempts
        result(store.update(envelope))
        sizes.append(journal.stat().st_size)
    assert max(sizes) <= fsworker.COMPACT_AT
    rewrites = [later for earlier, later in zip(sizes, sizes[1:], strict=False) if later < earlier]
    assert len(rewrites) >= 2 and max(rewrites) < 2 * sizes[0]  # rewritten as one record, several times
    assert [Path(args[1]).name for args in renames] == [journal.name] * len(renames) and renames
    assert not list((tmp_path / "messages").glob("*.new"))
    assert load(reopen(store, make), envelope.queue_id).recipients[0].attempts == 79


def test_failed_append_leaves_the_old_state_and_no_torn_record(tmp_path, make, monkeypatch):
    store = make(tmp_path)
    envelope = queueOne(store)
    envelope.recipients[0].attempts = 1
    result(store.update(envelope))
    journal = tmp_path / "messages" / f"{envelope.queue_id}.state"
    size = journal.stat().st_size
    countCalls(monkeypatch, fsworker, "fsyncFile", failing={1})
    envelope.recipients[0].attempts = 2
    with pytest.raises(OSError) as info:
        result(store.update(envelope))
    assert info.value.errno == errno.EIO
    assert journal.stat().st_size == size  # the record that may be torn was cut off
    assert load(store, envelope.queue_id).recipients[0].attempts == 1
    assert envelope.queue_id in store._compact  # and the journal is rewritten next time
    envelope.recipients[0].attempts = 3
    result(store.update(envelope))
    assert store._compact == set()
    assert load(reopen(store, make), envelope.queue_id).recipients[0].attempts == 3


def test_update_of_a_removed_message_fails_and_creates_nothing(tmp_path, make):
    store = make(tmp_path)
    envelope = queueOne(store)
    result(store.remove(envelope.queue_id))
    with pytest.raises(FileNotFoundError):
        result(store.update(envelope))
    assert files(tmp_path) == []


# -- the due-time hint ----------------------------------------------------------


def mtime(tmp_path: Path, queueID: str) -> int:
    return (tmp_path / "messages" / queueID).stat().st_mtime_ns


def test_due_hint_is_the_mtime(tmp_path, make, monkeypatch):
    store = make(tmp_path)
    envelope = queueOne(store)
    queueID = envelope.queue_id
    assert mtime(tmp_path, queueID) == 1_234_500_000_000  # a recipient's next attempt (else arrival)
    envelope.recipients[2].next_attempt = None
    result(store.update(envelope))
    assert mtime(tmp_path, queueID) == 1_700_000_000_250_000_000  # arrival
    fsyncs = countCalls(monkeypatch, fsworker, "fsyncFile")
    envelope.recipients[0].next_attempt = ARRIVAL + 600
    envelope.recipients[2].next_attempt = ARRIVAL + 300
    result(store.update(envelope))
    assert mtime(tmp_path, queueID) == 1_700_000_300_250_000_000  # the earliest pending
    assert len(fsyncs) == 1  # later: not made durable (lost, it makes the message due early)
    envelope.recipients[2].next_attempt = ARRIVAL + 60
    result(store.update(envelope))
    assert mtime(tmp_path, queueID) == 1_700_000_060_250_000_000
    assert len(fsyncs) == 3  # earlier: made durable before the state that says so
    assert result(store.scan(ARRIVAL + 59, 10, ())).later == ARRIVAL + 60


def test_a_lost_hint_makes_a_message_due_early_never_late(tmp_path, make):
    """
    Suppose the hint of an update moving the due time later is lost in a
    power cut: the stored state says later, the hint still says earlier.
    """
    store = make(tmp_path)
    envelope = queueOne(store)
    envelope.recipients[0].next_attempt = ARRIVAL + 600
    envelope.recipients[2].next_attempt = ARRIVAL + 600
    result(store.update(envelope))
    path = tmp_path / "messages" / envelope.queue_id
    os.utime(path, ns=(1_700_000_000_250_000_000,) * 2)  # the hint the commit left
    scan = result(store.scan(ARRIVAL, 10, ()))
    assert scan.due == [(ARRIVAL, envelope.queue_id)]  # due early: loaded, found not due, rescheduled
    assert load(store, envelope.queue_id).recipients[0].next_attempt == ARRIVAL + 600


def test_scan_reads_no_message(tmp_path, make, monkeypatch):
    store = make(tmp_path)
    queued = [queueOne(store).queue_id for _ in range(5)]
    opened = countCalls(monkeypatch, os, "open")
    scan = result(store.scan(2e9, 3, {queued[0]}))
    assert opened == []
    assert (len(scan.due), scan.total) == (3, 5)


# -- commits ------------------------------------------------------------------------


def commitFiveTogether(store: FilesystemQueueStore, pending: Pending) -> None:
    """Five commits handed to the store before its blocking work runs: the first alone, then the four that waited."""
    commits = []
    for _ in range(5):
        incoming = store.begin()
        incoming.write(DATA)
        commits.append(incoming.commit(envelopeFor(incoming.queue_id)))
    pending.runAll()
    assert [result(d) for d in commits] == [None] * 5


def test_commit_syncs_file_then_directory_once_per_batch(tmp_path, make, monkeypatch):
    """Group commit: messages waiting while one batch runs share the next directory sync."""
    pending = Pending()
    store = make(tmp_path, blocking=pending)
    fsyncs = countCalls(monkeypatch, fsworker, "fsyncFile")
    directories = countCalls(monkeypatch, fsworker, "fsyncDirectory")
    commitFiveTogether(store, pending)
    # The first commit's batch ran alone; the four that arrived while it ran
    # shared the second: one directory sync each, one fsync per file.
    assert (len(fsyncs), len(directories)) == (5, 2)
    assert [Path(args[0]) for args in directories] == [tmp_path / "messages"] * 2


def test_commit_batch_sizes_reach_the_metrics(tmp_path, make):
    """The thread engine's batches, as relay_queue_commit_batch_size sees them: 1 then the 4 that waited."""
    from relay.metrics import Metrics

    pending = Pending()
    store = make(tmp_path, blocking=pending)
    metrics = Metrics()
    metrics.watchStore(store)
    commitFiveTogether(store, pending)
    value = metrics.registry.get_sample_value
    assert (value("relay_queue_commit_batch_size_count"), value("relay_queue_commit_batch_size_sum")) == (2, 5)
    assert value("relay_queue_commit_batch_size_bucket", {"le": "1.0"}) == 1
    assert value("relay_queue_commit_batch_size_bucket", {"le": "4.0"}) == 2


def test_a_store_without_the_batch_hook_is_watched_as_before():
    from relay.metrics import Metrics
    from relay.queue.memory import MemoryQueueStore

    metrics = Metrics()
    metrics.watchStore(MemoryQueueStore())
    assert metrics.registry.get_sample_value("relay_queue_commit_batch_size_count") == 0


def test_remove_is_carried_by_the_next_batch(tmp_path, make, monkeypatch):
    store = make(tmp_path)
    first = queueOne(store)
    result(store.update(first))
    directories = countCalls(monkeypatch, fsworker, "fsyncDirectory")
    result(store.remove(first.queue_id))
    assert directories == []
    assert files(tmp_path) == []
    queueOne(store)
    assert len(directories) == 1


@pytest.mark.parametrize("where", ["fsyncFile", "fsyncDirectory"])
def test_commit_failure_at_sync_keeps_nothing(tmp_path, make, monkeypatch, where):
    store = make(tmp_path)
    incoming = store.begin()
    incoming.write(DATA)
    calls = countCalls(monkeypatch, fsworker, where, failing={1})
    with pytest.raises(OSError) as info:
        result(incoming.commit(envelopeFor(incoming.queue_id)))
    assert info.value.errno == errno.EIO
    assert calls
    monkeypatch.undo()
    assert files(tmp_path) == []
    assert recovered(reopen(store, make)) == 0


def test_commit_checks_the_stored_size(tmp_path, make):
    """A chunk lost between session and file: the commit fails rather than keep a different message."""
    store = make(tmp_path)
    incoming = store.begin()
    incoming.write(b"x" * (filesystem.SPILL + 10))
    incoming._size += 1  # the session counted an octet the file never got
    with pytest.raises(OSError, match="octets stored"):
        result(incoming.commit(envelopeFor(incoming.queue_id)))
    assert files(tmp_path) == []


def test_commit_failure_when_messages_is_not_a_directory(tmp_path, make):
    store = make(tmp_path)
    incoming = store.begin()
    incoming.write(DATA)
    (tmp_path / "messages").rmdir()
    (tmp_path / "messages").write_bytes(b"not a directory")
    with pytest.raises(OSError) as info:
        result(incoming.commit(envelopeFor(incoming.queue_id)))
    assert info.value.errno == errno.ENOTDIR
    incoming.abort()
    assert files(tmp_path / "incoming") == []
    with pytest.raises(OSError):
        result(store.recover())  # the queue cannot be used: start-up stops
    (tmp_path / "messages").unlink()
    assert recovered(reopen(store, make)) == 0


def test_commit_twice_or_with_foreign_envelope_fails(tmp_path, make):
    store = make(tmp_path)
    incoming = store.begin()
    with pytest.raises(ValueError):
        result(incoming.commit(envelopeFor("someoneelse")))
    assert files(tmp_path) == []
    incoming = store.begin()
    result(incoming.commit(envelopeFor(incoming.queue_id)))
    with pytest.raises(ValueError):
        result(incoming.commit(envelopeFor(incoming.queue_id)))


def _fullDisk(monkeypatch):
    """Every new incoming file is /dev/full: every write that reaches it gets ENOSPC."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    monkeypatch.setattr(fsworker, "create", lambda path: os.open("/dev/full", os.O_WRONLY | os.O_CLOEXEC))


def test_write_enospc_propagates(tmp_path, make, monkeypatch):
    store = make(tmp_path)
    _fullDisk(monkeypatch)
    incoming = store.begin()
    with pytest.raises(OSError) as info:
        incoming.write(b"x" * 1_000_000)  # larger than any buffer: reaches the device now
    assert info.value.errno == errno.ENOSPC
    incoming.abort()
    assert files(tmp_path) == []


def test_buffered_enospc_fails_commit(tmp_path, make, monkeypatch):
    store = make(tmp_path)
    _fullDisk(monkeypatch)
    incoming = store.begin()
    incoming.write(b"small")
    with pytest.raises(OSError) as info:
        result(incoming.commit(envelopeFor(incoming.queue_id)))
    assert info.value.errno == errno.ENOSPC
    incoming.abort()
    monkeypatch.undo()
    assert files(tmp_path) == []
    assert recovered(reopen(store, make)) == 0


def test_small_message_touches_no_file_before_commit(tmp_path, make):
    """The reactor thread never creates a file for a message that fits the buffer."""
    store = make(tmp_path)
    incoming = store.begin()
    incoming.write(b"x" * (filesystem.SPILL - 1))
    assert files(tmp_path) == []
    result(incoming.commit(envelopeFor(incoming.queue_id)))
    assert files(tmp_path) == [f"messages/{incoming.queue_id}"]


def test_large_message_spills_to_incoming_then_commits(tmp_path, make):
    store = make(tmp_path)
    incoming = store.begin()
    chunks = [bytes([65 + i % 26]) * 10_000 for i in range(70)]  # 700 kB, more than two spills
    for chunk in chunks:
        incoming.write(chunk)
    assert files(tmp_path) == [f"incoming/{incoming.queue_id}"]
    envelope = envelopeFor(incoming.queue_id)
    result(incoming.commit(envelope))
    store = reopen(store, make)
    assert recovered(store) == 1
    assert load(store, envelope.queue_id) == envelope
    with store.openData(envelope.queue_id) as f:
        assert f.read() == b"".join(chunks)


def test_abort_leaves_nothing(tmp_path, make):
    store = make(tmp_path)
    incoming = store.begin()
    incoming.write(DATA)
    incoming.abort()
    incoming.abort()
    assert files(tmp_path) == []
    with pytest.raises(ValueError):
        incoming.write(b"more")
    spilled = store.begin()
    spilled.write(b"x" * (filesystem.SPILL + 1))
    assert files(tmp_path) == [f"incoming/{spilled.queue_id}"]
    spilled.abort()
    assert files(tmp_path) == []


def test_spills_in_a_worker_keep_order_and_report_errors_late(tmp_path, make, monkeypatch):
    """
    With a real worker, spills run after write() returns, one after another;
    an error in one is raised by the next write(), and fails commit.
    """
    pending = Pending()
    store = make(tmp_path, blocking=pending)
    incoming = store.begin()
    first, second = b"1" * filesystem.SPILL, b"2" * filesystem.SPILL
    incoming.write(first)
    incoming.write(second)
    assert len(pending.calls) == 1  # the second spill waits for the first
    d = incoming.commit(envelopeFor(incoming.queue_id))
    pending.runAll()
    assert result(d) is None
    with store.openData(incoming.queue_id) as f:
        assert f.read() == first + second

    _fullDisk(monkeypatch)
    broken = store.begin()
    broken.write(b"x" * filesystem.SPILL)  # handed to the worker, not yet written
    pending.runAll()
    with pytest.raises(OSError) as info:
        broken.write(b"more")
    assert info.value.errno == errno.ENOSPC
    with pytest.raises(OSError):
        d = broken.commit(envelopeFor(broken.queue_id))
        pending.runAll()
        result(d)
    assert not (tmp_path / "incoming" / broken.queue_id).exists()


def test_a_client_faster_than_the_worker_is_held_back(tmp_path, make):
    """Past MAX_UNWRITTEN bytes the worker has not written yet, the incoming message asks the session to wait."""
    pending = Pending()
    store = make(tmp_path, blocking=pending)
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
    pending.runAll()


# -- queue ids --------------------------------------------------------------------


def test_queue_ids_unique_and_sortable(tmp_path, make):
    clock = Clock()
    clock.advance(1_700_000_000)
    store = make(tmp_path, clock)
    ids = []
    for i in range(10000):
        ids.append(store.newQueueID())
        if i % 100 == 99:
            clock.advance(0.001)
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    assert all(QUEUE_ID.match(q) and len(q) == 19 for q in ids)
    # Another store (another process, same clock reading) never repeats them.
    again = Clock()
    again.advance(1_700_000_000)
    other = make(tmp_path / "other", again)
    assert not {other.newQueueID() for _ in range(1000)} & set(ids)


def test_queue_ids_follow_the_clock(tmp_path, make):
    clock = Clock()
    store = make(tmp_path, clock)
    first = store.newQueueID()
    clock.advance(1)
    second = store.newQueueID()
    assert first < second
    assert int(second[:13], 16) == 1_000_000


def test_bad_queue_id_is_refused(tmp_path, make):
    store = make(tmp_path)
    with pytest.raises(ValueError):
        store.openData("../etc/passwd")
    with pytest.raises(ValueError):
        result(store.remove("a/b"))
    with pytest.raises(ValueError):
        result(store.load("a.state"))


# -- recovery ----------------------------------------------------------------------


def listed(monkeypatch, path: Path) -> list:
    """The listings of the directory C{path} (by C{os.scandir} or C{os.listdir}) from now on."""
    calls: list = []
    for name in ("scandir", "listdir"):
        real = getattr(os, name)

        def spy(*args, real=real):
            if args and Path(args[0]) == path:
                calls.append(args)
            return real(*args)

        monkeypatch.setattr(os, name, spy)
    return calls


def test_recovery_tidies_incoming_and_leaves_messages_to_the_first_scan(tmp_path, make, monkeypatch):
    """
    Recovery must not grow with the queue: it lists incoming/ only; the
    first scan, which lists messages/ anyway, removes the journals of
    removed messages and counts those set aside; later scans do neither.
    """
    store = make(tmp_path)
    assert result(store.recover()) is None  # the queue is marked: no later start lists messages/
    kept, removed, other = queueOne(store), queueOne(store), queueOne(store)
    result(store.update(removed))
    messages, incoming = tmp_path / "messages", tmp_path / "incoming"
    (messages / removed.queue_id).unlink()  # a removal whose second unlink did not become durable
    (messages / f"{other.queue_id}.state.new").write_bytes(b"a rewrite, then the message removed")
    (messages / other.queue_id).unlink()
    (messages / f"{kept.queue_id}.state.new").write_bytes(b"half a rewrite")
    (messages / "0000000000001aaaaaa.damaged").write_bytes(b"set aside earlier")
    (incoming / "0123456789abcdef000").write_bytes(b"a message being received")
    (incoming / kept.queue_id).hardlink_to(messages / kept.queue_id)  # a rename whose source removal was lost
    store = reopen(store, make)
    reads = countCalls(monkeypatch, fsworker, "readFooter")
    listings = listed(monkeypatch, store.messagesPath)
    with logged() as log:
        assert result(store.recover()) is None
    assert listings == [] and reads == []  # messages/ not listed, no message read
    assert files(tmp_path) == sorted(
        [
            f"messages/{kept.queue_id}",
            f"messages/{kept.queue_id}.state.new",
            f"messages/{removed.queue_id}.state",
            f"messages/{other.queue_id}.state.new",
            "messages/0000000000001aaaaaa.damaged",
        ]
    )
    assert any("discarded 2 uncommitted files" in t for t in log.texts()), log.texts()
    with logged() as log:
        scan = result(store.scan(2e9, 10, ()))
    assert (scan.total, [queueID for _, queueID in scan.due]) == (1, [kept.queue_id])
    assert reads == []
    # A live message's unfinished rewrite stays (the worker may be writing
    # it now; its next rewrite truncates it, and it goes once its message has).
    assert files(tmp_path) == sorted(
        [f"messages/{kept.queue_id}", f"messages/{kept.queue_id}.state.new", "messages/0000000000001aaaaaa.damaged"]
    )
    assert any("removed 2 journals of removed messages" in t for t in log.texts()), log.texts()
    assert any("1 damaged messages are set aside" in t for t in log.texts()), log.texts()
    (messages / f"{removed.queue_id}.state").write_bytes(b"")
    with logged() as log:
        assert result(store.scan(2e9, 10, ())).total == 1
    assert log.texts() == [] and (messages / f"{removed.queue_id}.state").exists()  # tidied at the next start
    assert load(store, kept.queue_id) == kept


def test_recovery_marks_a_new_queue_durably_and_refuses_another_format(tmp_path, make, monkeypatch):
    synced = countCalls(monkeypatch, filesystem, "fsyncDirectory")
    store = make(tmp_path / "q")
    assert not (tmp_path / "q" / "format").exists()
    assert result(store.recover()) is None
    assert (tmp_path / "q" / "format").read_text() == "2\n"
    assert not (tmp_path / "q" / "format.new").exists()
    assert Path(synced[-1][0]) == tmp_path / "q"  # the mark's name made durable
    (tmp_path / "q" / "format").write_bytes(b"\0\0")  # as a lax file system may show it after a cut: no mark
    store = reopen(store, make)
    assert result(store.recover()) is None
    assert (tmp_path / "q" / "format").read_text() == "2\n"
    (tmp_path / "q" / "format").write_text("3\n")  # a newer version's queue: not ours to touch
    store = reopen(store, make)
    queued = queueOne(store)
    with pytest.raises(ValueError, match="marked as format '3'"):
        result(store.recover())
    assert files(tmp_path / "q") == [f"messages/{queued.queue_id}"]


def test_a_marked_queue_with_spare_is_converted_again(tmp_path, make):
    """spare/ means an older version has used the queue since its conversion: convert what it left."""
    queue = tmp_path / "queue"
    store = make(queue)
    assert recovered(store) == 0
    (queue / "spare").mkdir()
    old = oldFormat(queue / "messages", "0000000000001aaaaaa", DATA)
    store = reopen(store, make)
    with logged() as log:
        assert recovered(store) == 1
    assert any("converted 1 messages" in t for t in log.texts()), log.texts()
    assert not (queue / "spare").exists()
    assert load(store, old.queue_id) == old


def test_an_unmarked_queue_of_this_format_is_marked_without_being_read(tmp_path, make, monkeypatch):
    """A queue made before the mark existed: listed once, nothing read, then marked."""
    store = make(tmp_path)
    envelope = queueOne(store)  # committed without a recovery: no mark yet
    assert not (tmp_path / "format").exists()
    store = reopen(store, make)
    reads = countCalls(monkeypatch, fsworker, "readFooter")
    assert recovered(store) == 1
    assert reads == [] and (tmp_path / "format").exists()
    assert load(store, envelope.queue_id) == envelope


def test_scan_memory_is_bounded_by_its_limit(tmp_path, make):
    """A queue of any size: the scan keeps the earliest C{limit} due entries, not a list of the queue."""
    import tracemalloc

    store = make(tmp_path)
    result(store.recover())
    messages = tmp_path / "messages"
    count = 20_000
    base = 1_700_000_000 * 10**9
    names = [f"{i:013x}{0:06x}" for i in range(count)]
    order = list(range(count))
    order = order[1::2] + order[::2]  # not in due order on disk
    for i in order:
        fd = os.open(messages / names[i], os.O_WRONLY | os.O_CREAT, 0o600)
        os.utime(fd, ns=(base + i * 10**6, base + i * 10**6))
        os.close(fd)
    exclude = frozenset(names[:3])
    tracemalloc.start()
    try:
        scan = result(store.scan(2e9, 10, exclude))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert scan.total == count
    assert [queueID for _, queueID in scan.due] == names[3:13]
    assert scan.due[0][0] == (base + 3 * 10**6) / 1e9
    assert scan.later == (base + 13 * 10**6) / 1e9
    assert peak < 256 * 1024, peak  # a list of every entry takes about 3 MB
    # Due later than C{before}, or past a zero limit: left out, the earliest noted.
    assert [q for _, q in result(store.scan((base + 5.5 * 10**6) / 1e9, 100, exclude)).due] == names[3:6]
    counted = result(store.scan(2e9, 0, ()))
    assert (counted.due, counted.total, counted.later) == ([], count, base / 1e9)


def test_recovery_leaves_this_process_messages_alone(tmp_path, make):
    """Listeners accept while recovery runs: what this store began is not a leftover."""
    store = make(tmp_path)
    old = queueOne(store)
    (tmp_path / "incoming" / "0000000000000leftover").write_bytes(b"x")
    store = reopen(store, make)
    committed = queueOne(store)
    result(store.update(committed))
    halfway = store.begin()
    halfway.write(b"y" * (filesystem.SPILL + 1))  # spilled into incoming/
    assert recovered(store) == 2
    assert files(tmp_path) == sorted(
        [
            f"incoming/{halfway.queue_id}",
            f"messages/{old.queue_id}",
            f"messages/{committed.queue_id}",
            f"messages/{committed.queue_id}.state",
        ]
    )
    result(halfway.commit(envelopeFor(halfway.queue_id)))
    assert result(store.remove(committed.queue_id)) is None
    assert recovered(reopen(store, make)) == 2


def test_recover_fails_when_the_queue_is_unusable(tmp_path, make):
    store = make(tmp_path / "q")
    (tmp_path / "q" / "incoming").rmdir()
    (tmp_path / "q" / "incoming").write_bytes(b"")
    with pytest.raises(OSError):
        result(store.recover())


def oldFormat(messages: Path, queueID: str, data: bytes, **changes) -> Envelope:
    """A message as the previous version stored it: data, and a JSON envelope beside it."""
    envelope = envelopeFor(queueID)
    (messages / queueID).write_bytes(data)
    fields = {**envelope.toJSON(), "data_size": len(data), **changes}
    (messages / f"{queueID}.json").write_text(json.dumps(fields))
    return envelope


def test_upgrade_converts_the_older_format(tmp_path, make):
    queue = tmp_path / "queue"
    messages = queue / "messages"
    messages.mkdir(parents=True)
    (queue / "incoming").mkdir()
    (queue / "spare").mkdir()
    (queue / "spare" / "1").write_bytes(b"a recycled file")
    first = oldFormat(messages, "0000000000001aaaaaa", DATA)
    second = oldFormat(messages, "0000000000002bbbbbb", b"x" * 3_000_000)
    oldFormat(messages, "0000000000003cccccc", DATA, data_size=len(DATA) + 1)  # interrupted commit
    (messages / "0000000000004dddddd").write_bytes(DATA)  # data without envelope: interrupted
    (messages / "0000000000005eeeeee.json").write_text(json.dumps(envelopeFor("0000000000005eeeeee").toJSON()))
    (messages / "0000000000006ffffff").write_bytes(DATA)
    (messages / "0000000000006ffffff.json").write_text('{"format": 1, "queue_')  # unreadable: kept aside
    (messages / f"{first.queue_id}.json.new").write_text("{")
    store = make(queue)
    with logged() as log:
        assert recovered(store) == 3
    assert any("converted 2 messages" in t for t in log.texts()), log.texts()
    assert any("spare/" in t for t in log.texts()), log.texts()
    assert not (queue / "spare").exists()
    assert files(queue) == sorted(
        [
            f"messages/{first.queue_id}",
            f"messages/{second.queue_id}",
            "messages/0000000000006ffffff",
            "messages/0000000000006ffffff.json.corrupt",
        ]
    )
    for envelope, data in ((first, DATA), (second, b"x" * 3_000_000)):
        assert load(store, envelope.queue_id) == envelope
        with store.openData(envelope.queue_id) as f:
            assert f.read() == data
    # The unreadable one is not delivered (and is set aside when loaded).
    with pytest.raises(ValueError):
        load(store, "0000000000006ffffff")
    assert recovered(reopen(store, make)) == 2


def test_upgrade_interrupted_after_the_rewrite(tmp_path, make):
    """A crash after a converted file replaced the old data, before the old envelope went."""
    queue = tmp_path / "queue"
    store = make(queue)
    envelope = queueOne(store)
    (queue / "messages" / f"{envelope.queue_id}.json").write_text(json.dumps(envelope.toJSON()))
    store = reopen(store, make)
    assert recovered(store) == 1
    assert files(queue) == [f"messages/{envelope.queue_id}"]
    assert load(store, envelope.queue_id) == envelope


# -- the lock ------------------------------------------------------------------------


def test_a_second_store_on_the_same_queue_is_refused(tmp_path, make):
    store = make(tmp_path)
    with pytest.raises(QueueInUse) as info:
        make(tmp_path)
    assert info.value.strerror == f"queue {tmp_path} is in use by another relay (pid {os.getpid()})"
    result(store.stop())
    again = make(tmp_path)  # released at stop
    assert recovered(again) == 0


def test_lock_is_not_inherited(tmp_path, make):
    store = make(tmp_path)
    assert os.get_inheritable(store._lockFd) is False


# -- the plugin ----------------------------------------------------------------------


def context(tmp_path):
    from relay.plugin import PluginContext

    return PluginContext(reactor=Clock(), hostname="h.example", postmaster="pm@h.example", state_dir=tmp_path)


def test_plugin_builds_store(tmp_path, stores):
    from relay.interfaces import IQueueStore, IQueueStoreFactory
    from relay.plugin import find

    factory = find("filesystem", IQueueStoreFactory)
    assert factory.name == "filesystem"
    assert set(factory.keys) == {"path", "sync"}
    store = factory.build({"path": str(tmp_path / "queue"), "sync": "fsync"}, context(tmp_path))
    stores.append(store)
    assert IQueueStore.providedBy(store)
    envelope = queueOne(store)
    assert load(store, envelope.queue_id) == envelope
    stores.append(factory.build({"path": str(tmp_path / "other")}, context(tmp_path)))


@pytest.mark.parametrize("value, words", [("syncfs", "not durable under POSIX power loss"), ("never", "'never'")])
def test_plugin_refuses_sync_other_than_fsync(tmp_path, value, words):
    from relay.errors import OptionError
    from relay.interfaces import IQueueStoreFactory
    from relay.plugin import find

    with pytest.raises(OptionError) as info:
        find("filesystem", IQueueStoreFactory).build({"path": str(tmp_path), "sync": value}, context(tmp_path))
    assert info.value.key == "sync"
    assert words in info.value.message


def test_plugin_refuses_unusable_path(tmp_path):
    from relay.errors import OptionError
    from relay.interfaces import IQueueStoreFactory
    from relay.plugin import find

    (tmp_path / "file").write_text("x")
    with pytest.raises(OptionError) as info:
        find("filesystem", IQueueStoreFactory).build({"path": str(tmp_path / "file" / "queue")}, context(tmp_path))
    assert info.value.key == "path"


def test_plugin_refuses_a_locked_queue(tmp_path, make):
    from relay.errors import OptionError
    from relay.interfaces import IQueueStoreFactory
    from relay.plugin import find

    make(tmp_path / "queue")
    with pytest.raises(OptionError) as info:
        find("filesystem", IQueueStoreFactory).build({"path": str(tmp_path / "queue")}, context(tmp_path))
    assert info.value.key == "path"
    assert info.value.message == f"queue {tmp_path / 'queue'} is in use by another relay (pid {os.getpid()})"


# -- worker replacement (the process engine, its worker played in this process) ---------------


class FakeWorker:
    """
    The transport of a L{ProcessEngine}: runs each write's requests through a
    real L{QueueFiles} of the generation it was spawned as, and answers
    unless told to die first.
    """

    def __init__(self, engine: ProcessEngine, path: Path, generation: int) -> None:
        self.engine, self.files = engine, QueueFiles(path, generation)
        self.decoder = fsworker.RequestDecoder()
        self.dieBeforeAnswering = False
        self.requests: list = []
        self.pipes: dict = {}

    def write(self, data: bytes) -> None:
        frames = self.decoder.feed(data)
        self.requests += [request for _, request in frames]
        errors = self.files.run([request for _, request in frames])
        if self.dieBeforeAnswering:
            return
        self.engine.outReceived(
            b"".join(fsworker.encodeReply(rid, e) for (rid, _), e in zip(frames, errors, strict=True))
        )

    def die(self) -> None:
        self.engine.processEnded(Failure(ProcessTerminated(signal=9)))


class FakeReactor(Clock):
    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self.workers: list[FakeWorker] = []

    def callWhenRunning(self, f, *args):
        f(*args)

    def spawnProcess(self, protocol, executable, args, env, childFDs):
        generation = int(args[4])
        worker = FakeWorker(protocol, self.path, generation)
        self.workers.append(worker)
        protocol.makeConnection(worker)


@pytest.fixture
def engineStore(tmp_path, make):
    reactor = FakeReactor(tmp_path)
    store = make(tmp_path)
    store.engine = ProcessEngine(reactor, tmp_path)
    return reactor, store


def test_chunks_that_went_to_a_dead_worker_fail_the_commit(tmp_path, engineStore):
    reactor, store = engineStore
    incoming = store.begin()
    incoming.write(b"a" * filesystem.SPILL)  # taken by worker 1
    assert (tmp_path / "incoming" / incoming.queue_id).exists()
    reactor.workers[0].die()
    reactor.advance(ProcessEngine.restartDelay)
    assert [worker.files.generation for worker in reactor.workers] == [1, 2]
    incoming.write(b"b" * 10)
    with pytest.raises(OSError, match="replaced"):
        result(incoming.commit(envelopeFor(incoming.queue_id)))
    # The new worker removed what the old one wrote.
    assert files(tmp_path) == []


def test_a_spill_after_the_replacement_fails_the_message_at_once(tmp_path, engineStore):
    reactor, store = engineStore
    incoming = store.begin()
    incoming.write(b"a" * filesystem.SPILL)
    reactor.workers[0].die()
    reactor.advance(ProcessEngine.restartDelay)
    with pytest.raises(OSError, match="replaced"):
        incoming.write(b"b" * filesystem.SPILL)
    incoming.abort()
    assert files(tmp_path) == []
    fresh = store.begin()
    fresh.write(b"c" * filesystem.SPILL)
    assert result(fresh.commit(envelopeFor(fresh.queue_id))) is None


def test_commits_a_dead_worker_left_unanswered_are_discarded_before_they_fail(tmp_path, engineStore):
    """
    The worker made the message durable in messages/ and died before its
    reply: the client is told 451, so the next worker removes the file (and
    syncs the directory) first; nothing the client will send again is
    delivered as well.
    """
    reactor, store = engineStore
    reactor.workers[0].dieBeforeAnswering = True
    incoming = store.begin()
    incoming.write(DATA)
    commit = incoming.commit(envelopeFor(incoming.queue_id))
    assert files(tmp_path) == [f"messages/{incoming.queue_id}"]  # durable, unanswered
    reactor.workers[0].die()
    assert not commit.called  # not before the file is gone
    reactor.advance(ProcessEngine.restartDelay)
    assert reactor.workers[1].requests[0].opcode == fsworker.DISCARD
    with pytest.raises(WorkerLost):
        result(commit)
    assert files(tmp_path) == []


def test_updates_a_dead_worker_left_unanswered_fail_and_rewrite_the_journal(tmp_path, engineStore):
    reactor, store = engineStore
    envelope = queueOne(store)
    reactor.workers[0].dieBeforeAnswering = True
    update = store.update(envelope)
    reactor.workers[0].die()
    with pytest.raises(WorkerLost):
        result(update)
    reactor.advance(ProcessEngine.restartDelay)
    envelope.recipients[0].attempts = 5
    result(store.update(envelope))
    assert reactor.workers[1].requests[-1].flags & fsworker.COMPACT
    assert load(store, envelope.queue_id).recipients[0].attempts == 5


def test_the_oldest_arrival_comes_from_the_queue_ids(tmp_path, make):
    # No message is read: the ids a store makes carry their arrival time, so
    # the scan's oldest is the least id's, to the microsecond.
    from relay.queue.filesystem import arrivalOf

    clock = Clock()
    clock.advance(1_800_000_000.25)
    store = make(tmp_path / "queue", clock)
    first = store.begin()
    clock.advance(3600)
    second = store.begin()
    for incoming in (second, first):
        incoming.write(b"Subject: x\r\n\r\nbody\r\n")
        result(incoming.commit(Envelope(incoming.queue_id, "s@example.org", [Recipient("r@example.test")], 0.0)))
    assert arrivalOf(first.queue_id) == 1_800_000_000.25
    assert result(store.scan(1e12, 10, {first.queue_id})).oldest == 1_800_000_000.25
    result(store.remove(first.queue_id))
    assert result(store.scan(1e12, 10, ())).oldest == 1_800_003_600.25
    assert arrivalOf("M000000000001") is None and arrivalOf("0123456789ABCDEF012") is None  # not made by newQueueID
