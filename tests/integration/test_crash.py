"""
Crash safety with the real process: 2000 messages sent by concurrent clients
while the relay is killed with SIGKILL at random moments and restarted. Every
message that got a 250 must reach the maildir; duplicates are counted (a
message whose 250 was lost with the connection is sent again by the client,
and a delivery cut short before its state was stored is repeated).

Two clients, with the default (and only) store configuration: smtp-source,
one process per message to its own recipient (its exit status says whether
the message got its 250, the recipient's maildir says whether it arrived),
and smtplib, which tags each message with a header.  A SIGKILL is not a power
cut (the page cache survives it): tests/powerloss/ tests that.
"""

from __future__ import annotations

import random
import smtplib
import subprocess
import threading
import time
from collections.abc import Callable

import pytest
from relayproc import tool, waitFor

from relay.queue.filesystem import QUEUE_ID

pytestmark = pytest.mark.integration

MESSAGES = 2000
SESSIONS = 8
KILLS = 6


def sendWithSmtplib(port: int, seq: int) -> bool:
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.sendmail("s@example.org", [f"storm-{seq}@localhost"], f"X-Seq: {seq}\r\n\r\nmessage {seq}\r\n")
    except (OSError, smtplib.SMTPException):
        return False
    return True


def smtpSourceSender(tool: str) -> Callable[[int, int], bool]:
    def send(port: int, seq: int) -> bool:
        command = [tool, "-s", "1", "-m", "1", "-l", "512", "-f", "s@example.org", "-t", f"storm-{seq}@localhost"]
        try:
            done = subprocess.run([*command, f"127.0.0.1:{port}"], capture_output=True, timeout=20)
        except subprocess.TimeoutExpired:
            return False
        return done.returncode == 0

    return send


@pytest.mark.parametrize("client", ["smtp-source", "smtplib"])
def test_sigkill_storm_loses_nothing(relay, client):
    send = smtpSourceSender(tool("smtp-source")) if client == "smtp-source" else sendWithSmtplib
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
            if send(r.port, seq):
                with lock:
                    acked.add(seq)
                    attempts["sent"] += 1
            else:
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
        mail = r.state / "mail" / "localhost"
        return [int(p.parent.parent.name.split("-")[1]) for p in mail.glob("storm-*/new/*")]

    messages = r.state / "queue" / "messages"
    assert waitFor(lambda: not [p for p in messages.iterdir() if QUEUE_ID.match(p.name)], 60), r.logText()[-3000:]
    seen = delivered()
    lost = acked - set(seen)
    duplicates = len(seen) - len(set(seen))
    print(
        f"\ncrash storm ({client}): {MESSAGES} acknowledged, {kills} SIGKILLs, "
        f"{attempts['errors']} client retries, "
        f"{len(seen)} delivered, {len(lost)} lost, {duplicates} duplicates"
    )
    assert kills == KILLS
    assert lost == set()
