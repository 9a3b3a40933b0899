"""
Crash safety with the real process: 2000 messages sent by concurrent clients
while the relay is killed with SIGKILL at random moments and restarted. Every
message that got a 250 must reach the maildir; duplicates are counted (a
message whose 250 was lost with the connection is sent again by the client,
and a delivery cut short before its state was stored is repeated).
"""

from __future__ import annotations

import random
import re
import smtplib
import threading
import time

import pytest
from relayproc import waitFor

pytestmark = pytest.mark.integration

MESSAGES = 2000
SESSIONS = 8
KILLS = 6


def test_sigkill_storm_loses_nothing(relay):
    r = relay().start()
    rng = random.Random(4)
    lock = threading.Lock()
    todo = list(range(MESSAGES))
    acked: set[int] = set()
    attempts = {"sent": 0, "errors": 0}
    deadline = time.monotonic() + 240

    def sender() -> None:
        while time.monotonic() < deadline:
            with lock:
                if not todo:
                    return
                seq = todo.pop()
            try:
                with smtplib.SMTP("127.0.0.1", r.port, timeout=10) as client:
                    client.sendmail("s@example.org", ["storm@localhost"], f"X-Seq: {seq}\r\n\r\nmessage {seq}\r\n")
                with lock:
                    acked.add(seq)
                    attempts["sent"] += 1
            except (OSError, smtplib.SMTPException):
                with lock:
                    attempts["errors"] += 1
                    todo.append(seq)  # what a real client does: try again later
                time.sleep(0.05)

    threads = [threading.Thread(target=sender, daemon=True) for _ in range(SESSIONS)]
    for t in threads:
        t.start()
    kills = 0
    while kills < KILLS and any(t.is_alive() for t in threads) and time.monotonic() < deadline:
        time.sleep(rng.uniform(0.2, 0.8))
        r.kill9()
        kills += 1
        r.start()
    for t in threads:
        t.join(timeout=max(1, deadline - time.monotonic()))
    assert not todo and len(acked) == MESSAGES, (len(acked), attempts)

    def delivered() -> list[int]:
        return [int(re.search(rb"X-Seq: (\d+)", p.read_bytes()).group(1)) for p in r.delivered("storm@localhost")]

    messages = r.state / "queue" / "messages"
    assert waitFor(lambda: not list(messages.glob("*.json")), 60), r.logText()[-3000:]
    seen = delivered()
    lost = acked - set(seen)
    duplicates = len(seen) - len(set(seen))
    print(
        f"\ncrash storm: {MESSAGES} acknowledged, {kills} SIGKILLs, {attempts['errors']} client retries, "
        f"{len(seen)} delivered, {len(lost)} lost, {duplicates} duplicates"
    )
    assert kills == KILLS
    assert lost == set()
