"""
Issue 13, AUTH storm, against the real relay (twistd): 50 sessions from
127.0.0.1 (outside relay_networks) send wrong passwords over and over, while an
honest client on 127.0.0.2 sends mail to a local recipient.  The guesser is
slowed, then locked out (454 4.7.0, no bcrypt), and the honest mail gets its
250 within a second throughout, since password hashing has its own threads.
The figures are printed (run with -s).
"""

from __future__ import annotations

import smtplib
import socket
import subprocess
import threading
import time

import pytest
from relayproc import MINIMAL, Relay, waitFor

from relay.smtp.auth import hashPassword, writePasswords

pytestmark = pytest.mark.integration

BODY = b"Subject: honest\r\n\r\nbody\r\n"
SESSIONS = 50
STORM_SECONDS = 8.0


def start(tmp_path) -> Relay:
    passwords = tmp_path / "passwords"
    writePasswords(passwords, {"alice": hashPassword("right", rounds=12)})  # a realistic cost: about 0.2 s a check
    r = Relay(tmp_path)
    text = MINIMAL.format(state=r.state, port=r.port, retry="1m", queue="")
    text = text.replace("relay_networks = 127.0.0.0/8", "relay_networks = ::1/128")
    listener = (
        "auth = optional\nplaintext_auth = yes\nbacklog = 777\nmax_sessions_per_client = 100\nmax_connection_rate = 0\n"
    )
    text = text.replace("interface=127.0.0.1\n", "interface=127.0.0.1\n" + listener, 1)
    text += f"\n[auth]\npasswords = {passwords}\n"
    r.config.write_text(text)
    return r.start()


def honestMessage(port: int) -> float:
    """Seconds from connecting (from 127.0.0.2) to the 250 for a message to a local recipient."""
    began = time.monotonic()
    with smtplib.SMTP("127.0.0.1", port, timeout=10, source_address=("127.0.0.2", 0)) as client:
        assert client.sendmail("a@example.org", ["user@localhost"], BODY) == {}
    return time.monotonic() - began


class Storm:
    """SESSIONS threads guessing alice's password from 127.0.0.1; each answer is recorded with its time."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.stop = threading.Event()
        self.answers: list[tuple[float, int]] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.guess, args=(i,), daemon=True) for i in range(SESSIONS)]

    def guess(self, index: int) -> None:
        attempt = 0
        while not self.stop.is_set():
            try:
                with smtplib.SMTP("127.0.0.1", self.port, timeout=15) as client:
                    client.ehlo(f"guesser{index}.example")
                    while not self.stop.is_set():
                        attempt += 1
                        password = f"guess-{index}-{attempt}"
                        token = smtplib.base64.b64encode(f"\0alice\0{password}".encode()).decode()
                        code, _ = client.docmd("AUTH", f"PLAIN {token}")
                        with self.lock:
                            self.answers.append((time.monotonic(), code))
                        if code == 421:
                            break
            except (smtplib.SMTPException, OSError):
                pass

    def __enter__(self) -> Storm:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(20)
        assert not any(thread.is_alive() for thread in self.threads)


def sendQueue(port: int) -> int:
    """The listen backlog of the socket on C{port}, as the kernel reports it (ss's Send-Q)."""
    out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, timeout=10).stdout
    return int(out.split()[2])


def test_an_auth_storm_slows_and_locks_out_the_guesser_while_honest_mail_flows(tmp_path):
    try:
        socket.create_connection(("127.0.0.1", 9), timeout=1, source_address=("127.0.0.2", 0)).close()
    except ConnectionRefusedError:
        pass
    except OSError as e:
        pytest.skip(f"cannot connect from 127.0.0.2: {e}")
    r = start(tmp_path)
    try:
        assert sendQueue(r.port) == 777  # [listener:NAME] backlog reached listen()
        latencies = []
        began = time.monotonic()
        with Storm(r.port) as storm:
            time.sleep(0.5)  # the auth threads are busy from here on
            while time.monotonic() - began < STORM_SECONDS:
                latencies.append(honestMessage(r.port))
                time.sleep(0.5)
            answers = list(storm.answers)
        codes = [code for _, code in answers]
        locked = [t for t, code in answers if code == 454]
        assert locked, f"never locked out: {sorted(set(codes))}"
        lockedAt = min(locked)
        checked = [t for t, code in answers if code == 535]
        before = [t for t in checked if t < lockedAt]
        after = [t for t in checked if t >= lockedAt]
        beforeRate = len(before) / max(lockedAt - began, 1e-3)
        afterRate = len(after) / max(time.monotonic() - lockedAt, 1e-3)
        print(
            f"\nAUTH storm, {SESSIONS} sessions: {len(checked)} guesses checked, {len(locked)} answered 454;"
            f" {beforeRate:.1f} guesses/s before the lockout ({lockedAt - began:.2f} s in),"
            f" {afterRate:.2f} guesses/s after (checks already under way);"
            f" honest 250 latencies: max {max(latencies):.3f} s, mean {sum(latencies) / len(latencies):.3f} s"
            f" over {len(latencies)} messages"
        )
        assert max(latencies) < 1.0, latencies
        assert len(latencies) >= 5
        assert not [code for code in codes if code == 235]
        # After the lockout, no guess is checked but those already under way (at most one per session).
        assert len(after) <= SESSIONS
        assert waitFor(lambda: len(r.delivered("user@localhost")) == len(latencies), 10)
        log = r.logText()
        assert "AUTH locked out" in log and "client=127.0.0.1" in log and "last_user=alice" in log
        assert "guess-" not in log  # no password is ever logged
    finally:
        r.stop()
