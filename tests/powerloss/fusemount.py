"""
Mount, cut and unmount the strict file system (strictfs.py) from a test.

Every wait is bounded, and the file system process is stopped by its PID if
unmounting does not end it.  A laptop without FUSE skips these tests; under
CI=true a missing piece is a failure (.ci/run installs fuse3 and mfusepy).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

STRICTFS = Path(__file__).with_name("strictfs.py")


def requireFuse() -> str:
    """The fusermount3 path, or skip (fail under CI) when FUSE cannot run here."""
    problems = []
    if not os.path.exists("/dev/fuse"):
        problems.append("/dev/fuse is missing")
    fusermount = shutil.which("fusermount3")
    if fusermount is None:
        problems.append("fusermount3 is not installed (Debian fuse3)")
    try:
        import mfusepy  # noqa: F401
    except (ImportError, OSError) as e:  # OSError: libfuse3 itself is missing
        problems.append(f"mfusepy does not load: {e}")
    if problems:
        if os.environ.get("CI") == "true":
            pytest.fail("; ".join(problems) + " (.ci/run installs them)")
        pytest.skip("; ".join(problems))
    return fusermount


def isMounted(path: Path) -> bool:
    """From the mount table: after a cut the mount's root answers EIO, so os.path.ismount says no."""
    wanted = os.path.realpath(path)
    with open("/proc/self/mounts") as mounts:
        return any(line.split()[1] == wanted for line in mounts)


def waitUntil(predicate: Any, timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


class StrictMount:
    """One strictfs process mounted at C{mountpoint}, optionally started from a plain tree."""

    def __init__(self, mountpoint: Path, source: Path | None = None, log: Path | None = None) -> None:
        self.fusermount = requireFuse()
        self.mountpoint = mountpoint
        self.source = source
        self.log = log
        # A UNIX socket path is limited to 108 bytes: keep it short, outside the mount.
        self.controlDir = Path(tempfile.mkdtemp(prefix="sfs"))
        self.control = self.controlDir / "ctl"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> StrictMount:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, str(STRICTFS), str(self.mountpoint), "--control", str(self.control)]
        if self.source is not None:
            command += ["--from", str(self.source)]
        output = open(self.log, "ab") if self.log is not None else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=output, stderr=output)
        finally:
            if output is not subprocess.DEVNULL:
                output.close()
        ok = waitUntil(lambda: self.proc.poll() is not None or isMounted(self.mountpoint), timeout)
        if not ok or self.proc.poll() is not None:
            self.stop()
            raise AssertionError(f"strictfs did not mount {self.mountpoint}: {self.logText()}")
        return self

    def logText(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log is not None and self.log.exists() else ""

    def request(self, request: dict[str, Any], timeout: float = 60.0) -> Any:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(self.control))
            s.sendall(json.dumps(request).encode() + b"\n")
            reply = json.loads(s.makefile("rb").readline())
        if not reply["ok"]:
            raise AssertionError(f"strictfs refused {request}: {reply['error']}")
        return reply["result"]

    def cut(self, out: Path, mode: str = "strict", seed: int = 0) -> dict[str, int]:
        """Power cut: freeze the mount and write what was durable into C{out}."""
        return self.request({"op": "cut", "out": str(out), "mode": mode, "seed": seed})

    def stats(self) -> dict[str, int]:
        return self.request({"op": "stats"})

    def stop(self, timeout: float = 10.0) -> None:
        """Unmount (lazily if something still holds it) and end the process."""
        proc, self.proc = self.proc, None
        for args in (["-u"], ["-u", "-z"]):
            if not isMounted(self.mountpoint):
                break
            subprocess.run([self.fusermount, *args, str(self.mountpoint)], capture_output=True, timeout=timeout)
        if proc is not None:
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)
        shutil.rmtree(self.controlDir, ignore_errors=True)

    def __enter__(self) -> StrictMount:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
