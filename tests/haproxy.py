"""
A real HAProxy (Debian's package) for tests: C{haproxy -db} on a
configuration file, checked with C{-c} first, stopped by its PID.
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

from relayproc import listening, tool, waitFor


class HAProxy:
    """One haproxy -db process, stopped by its PID."""

    def __init__(self, config: Path, ports: list[int]) -> None:
        self.config = config
        self.ports = ports
        self.proc: subprocess.Popen | None = None

    def start(self) -> HAProxy:
        haproxy = tool("haproxy")
        check = subprocess.run([haproxy, "-c", "-q", "-f", str(self.config)], capture_output=True, timeout=30)
        assert check.returncode == 0, check.stderr.decode(errors="replace")
        self.proc = subprocess.Popen(
            [haproxy, "-db", "-f", str(self.config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        if not waitFor(lambda: self.proc.poll() is not None or all(listening(p) for p in self.ports), 15):
            self.stop()
            raise AssertionError("haproxy did not start listening")
        if self.proc.poll() is not None:
            out = self.stop()
            raise AssertionError(f"haproxy exited: {out!r}")
        return self

    def stop(self) -> bytes:
        proc, self.proc = self.proc, None
        if proc is None:
            return b""
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # haproxy -db: a hard stop
        try:
            out, _ = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate(timeout=10)
        return out
