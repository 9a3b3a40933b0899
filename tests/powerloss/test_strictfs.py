"""
The strict file system models POSIX durability and nothing more: these tests
prove the model through a real FUSE mount (os calls on the mountpoint), since a
power-cut test is only as good as the file system it cuts.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from fusemount import StrictMount
from strictfs import Model

pytestmark = pytest.mark.integration


def writeFile(path: Path, data: bytes, sync: bool = True, datasync: bool = False) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        if sync:
            (os.fdatasync if datasync else os.fsync)(fd)
    finally:
        os.close(fd)


def syncDir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under C{root}: a file's content, None for a directory."""
    found: dict[str, bytes | None] = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs:
            found[os.path.relpath(os.path.join(directory, name), root)] = None
        for name in files:
            path = os.path.join(directory, name)
            found[os.path.relpath(path, root)] = Path(path).read_bytes()
    return found


@pytest.fixture
def mounted(tmp_path):
    """A fresh mount, and a cut() that returns what a restart would find."""
    mount = StrictMount(tmp_path / "mnt", log=tmp_path / "strictfs.log").start()
    out = tmp_path / "durable"

    def cut(mode: str = "strict") -> dict[str, bytes | None]:
        mount.cut(out, mode)
        return tree(out)

    try:
        yield mount.mountpoint, cut
    finally:
        mount.stop()


def test_unsynced_write_is_lost(mounted):
    """The name was made durable, the content never: the file comes back empty."""
    mnt, cut = mounted
    writeFile(mnt / "f", b"never synced", sync=False)
    syncDir(mnt)
    assert (mnt / "f").read_bytes() == b"never synced"  # live, it is there
    assert cut() == {"f": b""}


def test_unsynced_new_name_is_lost(mounted):
    mnt, cut = mounted
    writeFile(mnt / "f", b"data", sync=False)
    assert cut() == {}


def test_synced_file_under_unsynced_name_is_lost(mounted):
    mnt, cut = mounted
    writeFile(mnt / "f", b"data")
    assert cut() == {}


def test_synced_content_and_directory_survive(mounted):
    mnt, cut = mounted
    (mnt / "d").mkdir()
    writeFile(mnt / "d" / "f", b"kept")
    writeFile(mnt / "d" / "g", b"kept too", datasync=True)  # fdatasync counts as fsync
    syncDir(mnt / "d")
    syncDir(mnt)
    assert cut() == {"d": None, "d/f": b"kept", "d/g": b"kept too"}


def test_write_after_fsync_reverts_to_synced_content(mounted):
    """An overwrite in place that was not synced again leaves the old bytes: a recycled file shows its old message."""
    mnt, cut = mounted
    writeFile(mnt / "f", b"first message")
    syncDir(mnt)
    fd = os.open(mnt / "f", os.O_WRONLY)
    os.write(fd, b"SECOND")
    os.close(fd)
    assert (mnt / "f").read_bytes() == b"SECONDmessage"
    assert cut() == {"f": b"first message"}


def test_times_are_durable_after_fsync_not_fdatasync(mounted, tmp_path):
    """A store may keep a due time in an mtime: it survives only an fsync of the file."""
    mnt, cut = mounted
    for name in ("fsynced", "fdatasynced", "unsynced"):
        writeFile(mnt / name, b"data")
        os.utime(mnt / name, ns=(2_000_000_000_000_000_000, 2_000_000_000_000_000_000))
        if name != "unsynced":
            fd = os.open(mnt / name, os.O_RDONLY)
            (os.fsync if name == "fsynced" else os.fdatasync)(fd)
            os.close(fd)
    assert os.stat(mnt / "unsynced").st_mtime_ns == 2_000_000_000_000_000_000
    syncDir(mnt)
    cut()
    durable = tmp_path / "durable"
    assert os.stat(durable / "fsynced").st_mtime_ns == 2_000_000_000_000_000_000
    assert os.stat(durable / "fdatasynced").st_mtime_ns < 2_000_000_000_000_000_000
    assert os.stat(durable / "unsynced").st_mtime_ns < 2_000_000_000_000_000_000


def test_rename_without_dir_fsync_reverts_to_old_name(mounted):
    mnt, cut = mounted
    writeFile(mnt / "old", b"data")
    syncDir(mnt)
    os.rename(mnt / "old", mnt / "new")
    assert cut() == {"old": b"data"}


def test_rename_with_dir_fsync_survives(mounted):
    mnt, cut = mounted
    writeFile(mnt / "old", b"data")
    syncDir(mnt)
    os.rename(mnt / "old", mnt / "new")
    syncDir(mnt)
    assert cut() == {"new": b"data"}


def test_cross_directory_rename_synced_at_target_only_leaves_two_names(mounted, tmp_path):
    """Each directory keeps its own entries: the inode comes back under both names, as one inode."""
    mnt, cut = mounted
    for name in ("a", "b"):
        (mnt / name).mkdir()
    syncDir(mnt)
    writeFile(mnt / "a" / "f", b"data")
    syncDir(mnt / "a")
    os.rename(mnt / "a" / "f", mnt / "b" / "f")
    syncDir(mnt / "b")
    assert cut() == {"a": None, "b": None, "a/f": b"data", "b/f": b"data"}
    durable = tmp_path / "durable"
    assert os.stat(durable / "a" / "f").st_ino == os.stat(durable / "b" / "f").st_ino


def test_unlink_without_dir_fsync_brings_file_back(mounted):
    mnt, cut = mounted
    writeFile(mnt / "f", b"data")
    syncDir(mnt)
    os.unlink(mnt / "f")
    assert not (mnt / "f").exists()
    assert cut() == {"f": b"data"}


def test_unlink_with_dir_fsync_is_gone(mounted):
    mnt, cut = mounted
    writeFile(mnt / "f", b"data")
    syncDir(mnt)
    os.unlink(mnt / "f")
    syncDir(mnt)
    assert cut() == {}


def test_mkdir_without_parent_fsync_loses_directory_and_contents(mounted):
    mnt, cut = mounted
    (mnt / "d").mkdir()
    writeFile(mnt / "d" / "f", b"data")
    syncDir(mnt / "d")
    assert cut() == {}


def test_hard_link_needs_its_directory_synced(mounted):
    mnt, cut = mounted
    writeFile(mnt / "f", b"data")
    syncDir(mnt)
    os.link(mnt / "f", mnt / "g")
    assert os.stat(mnt / "g").st_nlink == 2
    assert cut() == {"f": b"data"}


def test_open_unlinked_file_still_works_live(mounted):
    mnt, cut = mounted
    fd = os.open(mnt / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.unlink(mnt / "f")
        os.write(fd, b"anonymous")
        os.ftruncate(fd, 4)
        os.fsync(fd)
        assert os.pread(fd, 100, 0) == b"anon"
    finally:
        os.close(fd)
    syncDir(mnt)
    assert cut() == {}


def test_cut_freezes_the_mount(mounted):
    mnt, cut = mounted
    writeFile(mnt / "f", b"data")
    cut()
    with pytest.raises(OSError) as caught:
        writeFile(mnt / "g", b"too late")
    assert caught.value.errno == errno.EIO


def test_a_new_mount_starts_from_the_durable_tree(tmp_path):
    """What survived is durable in the next life, hard links included; a second cut at once keeps all of it."""
    with StrictMount(tmp_path / "mnt1") as first:
        (first.mountpoint / "q").mkdir()
        writeFile(first.mountpoint / "q" / "f", b"data")
        os.link(first.mountpoint / "q" / "f", first.mountpoint / "q" / "g")
        writeFile(first.mountpoint / "q" / "lost", b"x", sync=False)
        syncDir(first.mountpoint / "q")
        syncDir(first.mountpoint)
        first.cut(tmp_path / "life1")
    with StrictMount(tmp_path / "mnt2", source=tmp_path / "life1") as second:
        q = second.mountpoint / "q"
        assert (q / "f").read_bytes() == b"data"
        assert os.stat(q / "f").st_ino == os.stat(q / "g").st_ino
        # Writing through one name changes the other: one inode, as on a disk.
        fd = os.open(q / "g", os.O_WRONLY)
        os.write(fd, b"DATA")
        os.close(fd)
        assert (q / "f").read_bytes() == b"DATA"
        second.cut(tmp_path / "life2")
    assert tree(tmp_path / "life2") == {"q": None, "q/f": b"data", "q/g": b"data", "q/lost": b""}


@pytest.mark.parametrize("mode", ["torn", "stale"])
def test_torn_and_stale_cuts_show_old_or_new_state(tmp_path, mode):
    """
    The torn and stale modes, on the model: each directory comes back as
    synced or as live, each page of an unsynced file as synced, live or zero
    bytes, or (stale) bytes of a freed file, never anything else.
    """
    seen: set[bytes] = set()
    staleSeen = False
    for seed in range(40):
        model = Model()
        model.mkdir("/d", 0o700)
        fh = model.create("/d/old", 0o600)
        model.write(None, b"O" * 5000, 0, fh)
        model.fsync(None, fh)
        model.release(fh)
        fh = model.create("/d/freed", 0o600)
        model.write(None, b"S" * 9000, 0, fh)
        model.release(fh)
        model.fsyncdir("/d", None)
        model.fsyncdir("/", None)
        model.unlink("/d/freed")
        fh = model.create("/d/new", 0o600)
        model.write(None, b"N" * 6000, 0, fh)
        model.release(fh)
        fh = model.open("/d/old")
        model.write(None, b"o" * 8000, 0, fh)
        model.release(fh)
        out = tmp_path / f"seed{seed}"
        model.cut(out, mode, seed)
        found = tree(out)
        assert set(found) in ({"d", "d/old", "d/freed"}, {"d", "d/old", "d/new"})
        old = found["d/old"]
        assert len(old) in (5000, 8000)
        for start in range(0, len(old), 4096):
            page = old[start : start + 4096]
            # one source per page; past a shorter source's end, zeros (as a hole reads)
            assert (
                set(page.rstrip(b"\0")) <= {ord("O")}
                or set(page.rstrip(b"\0")) <= {ord("o")}
                or set(page.rstrip(b"\0")) <= {ord("S")}
            )
        seen.add(old)
        staleSeen = staleSeen or b"S" in old or b"S" in found.get("d/new", b"")
        if "d/new" in found:
            assert len(found["d/new"]) in (0, 6000)
            assert set(found["d/new"]) <= set(b"NS\0")
    assert len(seen) > 3, "the cut should vary with the seed"
    assert staleSeen == (mode == "stale")
    with pytest.raises(OSError):
        model.getattr("/d")
