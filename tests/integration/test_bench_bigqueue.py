"""
The queue-size benchmark (bench/bigqueue.py) as a smoke test: a thousand
held messages instead of a million, so that the harness keeps working (the
fill through the store plugin, a start, a SIGKILL, a restart and its first
250) whatever becomes of the store.  The figures themselves are not held to
their targets here: a loaded CI machine is no place to time them.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bigqueue.py"


def test_bigqueue_smoke(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH), "--messages", "1000", "--watch", "1", "--timeout", "60"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "BENCH_DIR": str(tmp_path)},
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "filled 1000 of 1000" in out
    # Both starts answered a new message, and memory was read each time.
    first = re.search(r"first start: a new message got 250 ([\d.]+) s after the start", out)
    restart = re.search(r"restart after SIGKILL: a new message got 250 ([\d.]+) s after the start", out)
    assert first and restart, out
    assert 0 < float(restart.group(1)) < 60
    rss = re.findall(r"relay RSS (\d+) MB \(peak (\d+) MB", out)
    assert len(rss) == 2 and all(0 < int(peak) < 1000 for _, peak in rss), out
    # The queue worker goes with its relay, and the queue is removed.
    assert "exited by themselves" in out, out
    work = re.search(r"queue on (\S+)", out)
    assert work and not Path(work.group(1)).exists()
