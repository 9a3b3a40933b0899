"""
One queue, one relay: a second relay started on a queue in use refuses to
start, with one line naming the holder; once the first is gone (even by
SIGKILL, its queue worker with it), the queue can be taken again.
"""

from __future__ import annotations

import subprocess

import pytest
from relayproc import MINIMAL, Relay, freePort

pytestmark = pytest.mark.integration


def second(tmp_path, first: Relay) -> Relay:
    """A relay of its own (config, port, log) whose state_dir is the first one's."""
    workdir = tmp_path / "second"
    workdir.mkdir(exist_ok=True)
    port = freePort()
    config = MINIMAL.format(state=first.state, port=port, retry="1m", queue="")
    return Relay(workdir, config=config, port=port)


def test_a_second_relay_on_the_same_queue_refuses_to_start(relay, tmp_path):
    first = relay().start()
    other = second(tmp_path, first)
    done = subprocess.run(other.command(), cwd=other.workdir, capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode != 0
    lines = done.stderr.decode().strip().splitlines()
    queue = first.state / "queue"
    assert lines == [
        f"relay: {other.config}: [queue] path: queue {queue} is in use by another relay (pid {first.proc.pid})"
    ], done.stderr
    assert (queue / "lock").read_text() == f"{first.proc.pid}\n"  # the holder's pid is left as it was

    # Gone by SIGKILL: the lock goes with the process (its worker does not hold it).
    first.kill9()
    other.start()
    assert (queue / "lock").read_text() == f"{other.proc.pid}\n"
    other.stop()
