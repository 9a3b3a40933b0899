"""
The real relay: twistd started as an operator would, real clients, real files.
"""

from __future__ import annotations

import os
import signal
import smtplib
import socket
import subprocess
import time
from pathlib import Path

import pytest
from relayproc import TWISTD, Relay, alive, children, freePort, listening, tool, waitFor

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BODY = b"Subject: integration\r\nFrom: a@example.org\r\n\r\nfirst line\r\n.leading dot\r\n\r\nlast line\r\n"


def send(port: int, to: list[str], body: bytes = BODY, sender: str = "a@example.org") -> str:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("client.example.org")
        refused = client.sendmail(sender, to, body)
        assert refused == {}
        code, text = client.noop()
        assert code == 250
    return "sent"


def test_smtplib_message_lands_in_maildir_with_trace_headers(relay):
    r = relay().start()
    started = time.monotonic()
    send(r.port, ["someone@localhost", "Other@Example.test"])
    assert waitFor(lambda: r.delivered("someone@localhost") and r.delivered("other@example.test"), 5)
    elapsed = time.monotonic() - started
    [path] = r.delivered("someone@localhost")
    content = path.read_bytes()
    assert content.startswith(b"Return-Path: <a@example.org>\nDelivered-To: someone@localhost\nReceived: from ")
    assert b"\r" not in content
    assert content.endswith(BODY.replace(b"\r\n", b"\n"))
    assert elapsed < 1.0, f"delivery took {elapsed:.2f}s"
    log = r.logText()
    assert "accepted " in log and "from=<a@example.org>" in log and "nrcpt=2" in log and "client=127.0.0.1" in log
    assert waitFor(lambda: "delivered " in r.logText() and "to=<someone@localhost> backend=local" in r.logText(), 5)
    # nothing left in the queue
    assert waitFor(lambda: not list((r.state / "queue" / "messages").iterdir()), 5)


def test_swaks_message_lands_in_maildir(relay):
    swaks = tool("swaks")
    r = relay().start()
    result = subprocess.run(
        [
            swaks,
            "--server",
            f"127.0.0.1:{r.port}",
            "--to",
            "someone@localhost",
            "--from",
            "s@example.org",
            "--timeout",
            "10",
        ],
        capture_output=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    assert b"250 2.0.0 Ok: queued as " in result.stdout
    assert waitFor(lambda: len(r.delivered("someone@localhost")) == 1, 5)


def test_default_config_with_swaks(tmp_path):
    """The embedded etc/relay.ini, unmodified, as `make run` starts it."""
    swaks = tool("swaks")
    if listening(2525):
        pytest.fail("127.0.0.1:2525 is taken; the default config needs it") if _ci() else pytest.skip("2525 busy")
    r = Relay(tmp_path, config=(ROOT / "etc" / "relay.ini").read_text(), port=2525)
    r.start()
    try:
        result = subprocess.run(
            [swaks, "--server", "127.0.0.1:2525", "--to", "someone@localhost", "--timeout", "10"],
            capture_output=True,
            timeout=30,
        )
        assert result.returncode == 0, result.stdout.decode()
        new = tmp_path / "var" / "mail" / "localhost" / "someone" / "new"
        assert waitFor(lambda: new.is_dir() and len(list(new.iterdir())) == 1, 1.0)
        # and the default relays nothing, not even for loopback clients
        with smtplib.SMTP("127.0.0.1", 2525, timeout=10) as client:
            client.ehlo("c.example")
            client.mail("a@example.org")
            code, text = client.rcpt("x@elsewhere.example")
            assert (code, text[:5]) == (550, b"5.7.1")
    finally:
        r.stop()


def _ci() -> bool:
    import os

    return os.environ.get("CI") == "true"


def deferOneThenKill(r, address: str) -> None:
    """
    Start C{r} with its first delivery failing (a file where the maildir tree
    goes), queue one message for C{address}, SIGKILL the relay once the
    deferral is stored, and start it again with delivery possible.
    """
    r.state.mkdir(parents=True)
    (r.state / "mail").write_text("not a directory")
    r.start()
    send(r.port, [address])
    assert waitFor(lambda: "deferred " in r.logText(), 5), r.logText()
    # The log line comes before the new state is stored: wait for the journal
    # record (and its directory entry) before pulling the plug.
    journals = lambda: list((r.state / "queue" / "messages").glob("*.state"))  # noqa: E731
    assert waitFor(lambda: journals() and journals()[0].stat().st_size > 0, 5), r.logText()
    time.sleep(0.2)
    r.kill9()
    (r.state / "mail").unlink()
    r.start()


def test_kill9_after_250_then_restart_delivers(relay):
    r = relay(retry="3s")
    deferOneThenKill(r, "survivor@localhost")
    assert waitFor(lambda: len(r.delivered("survivor@localhost")) == 1, 10), r.logText()
    assert "recovered 1 queued messages" in r.logText()


def test_restart_honours_stored_next_attempts_and_new_mail_goes_at_once(relay):
    """After a restart a deferred message waits for its next attempt (an hour here); new mail does not wait."""
    r = relay(retry="1h")
    deferOneThenKill(r, "later@localhost")
    send(r.port, ["now@localhost"])
    assert waitFor(lambda: len(r.delivered("now@localhost")) == 1, 5), r.logText()
    time.sleep(2)
    assert r.delivered("later@localhost") == []
    assert "recovered 1 queued messages" in r.logText()


def test_kill9_right_after_250_loses_nothing(relay):
    r = relay().start()
    ids = []
    for i in range(20):
        with smtplib.SMTP("127.0.0.1", r.port, timeout=10) as client:
            client.ehlo("c.example")
            client.mail("a@example.org")
            client.rcpt(f"user{i}@localhost")
            code, text = client.data(BODY)
            assert code == 250
            ids.append(text)
    r.kill9()
    r.start()
    for i in range(20):
        assert waitFor(lambda i=i: len(r.delivered(f"user{i}@localhost")) >= 1, 5), i


def test_bad_config_stops_startup_with_one_line(tmp_path):
    config = tmp_path / "bad.ini"
    config.write_text(Relay(tmp_path).config.read_text().replace("[queue]\n", "[queue]\nmax_age = forever\n"))
    result = subprocess.run(
        [TWISTD, "-n", "--pidfile=", "relay", "--config", str(config)], cwd=tmp_path, capture_output=True, timeout=30
    )
    assert result.returncode != 0
    err = result.stderr.decode()
    assert "Traceback" not in err
    assert f"{config}: [queue] max_age: " in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_unknown_plugin_lists_known_ones(tmp_path):
    config = tmp_path / "bad.ini"
    config.write_text(Relay(tmp_path).config.read_text().replace("plugin = maildir", "plugin = nosuch"))
    result = subprocess.run(
        [TWISTD, "-n", "--pidfile=", "relay", "--config", str(config)], cwd=tmp_path, capture_output=True, timeout=30
    )
    err = result.stderr.decode()
    assert result.returncode != 0
    assert "[delivery:local] plugin: unknown plugin 'nosuch' (known: " in err and "maildir" in err, err


def test_sessions_survive_garbage(relay):
    r = relay().start()
    with smtplib.SMTP("127.0.0.1", r.port, timeout=10) as client:
        client.ehlo("c.example")
        assert client.docmd("FOO")[0] == 500
        assert client.docmd("MAIL", "TO:<x@y.example>")[0] == 501
        assert client.docmd("RCPT", "TO:<x@localhost>")[0] == 503
        assert client.docmd("NOOP", "x" * 600)[0] == 500
        assert client.docmd("VRFY", "root")[0] == 252
        assert client.noop()[0] == 250


def test_port_is_free_after_stop(relay):
    r = relay().start()
    r.stop()
    assert not listening(r.port)
    assert freePort()


def test_configured_validators_decide_recipients(tmp_path):
    from relayproc import MINIMAL

    config = MINIMAL.format(state=tmp_path / "var", port=freePort(), retry="1m", queue="")
    config = config.replace(
        "local_domains = localhost example.test\n",
        "local_domains = localhost example.test\nvalidators = blocked users\n\n"
        "[validator:blocked]\nplugin = static\nmode = deny\naddresses = spam@localhost\n\n"
        "[validator:users]\nplugin = maildir\n",
    )
    r = Relay(tmp_path, config=config, port=int(config.split("endpoint = tcp:")[1].split(":")[0]))
    (r.state / "mail" / "localhost" / "alice" / "new").mkdir(parents=True)
    r.start()
    try:
        with smtplib.SMTP("127.0.0.1", r.port, timeout=10) as client:
            client.ehlo("c.example")
            client.mail("a@example.org")
            assert client.rcpt("alice@localhost")[0] == 250
            assert client.rcpt("bob@localhost")[:2] == (
                550,
                b"5.1.1 Recipient address rejected: User unknown in local mailbox table",
            )
            assert client.rcpt("spam@localhost")[0] == 550
            assert client.rcpt("postmaster@localhost")[0] == 250
    finally:
        r.stop()


def test_undeliverable_mail_bounces_to_a_local_sender(relay):
    """
    A recipient given up (its maildir cannot be made, until max_age) comes
    back as an RFC 3464 report.  (A mailbox name that cannot be a maildir at
    all is refused at RCPT: tests/integration/test_backscatter.py.)
    """
    import email
    import email.policy

    r = relay(retry="1s", queue="max_age = 2s")
    r.maildir("stuck@localhost").parent.mkdir(parents=True)
    r.maildir("stuck@localhost").write_text("a file where the maildir goes")
    r.start()
    send(r.port, ["Stuck@localhost"], sender="writer@localhost")
    assert waitFor(lambda: r.delivered("writer@localhost"), 10), r.logText()
    report = email.message_from_bytes(r.delivered("writer@localhost")[0].read_bytes(), policy=email.policy.default)
    assert report["Return-Path"] == "<>"
    assert report.get_content_type() == "multipart/report"
    status = [p for p in report.walk() if p.get_content_type() == "message/delivery-status"][0]
    [block] = status.get_payload()[1:]
    assert (block["Action"], block["Status"]) == ("failed", "4.3.0")
    assert block["Final-Recipient"] == "rfc822; Stuck@localhost"
    assert "failed notice for" in r.logText()


def queueWorkers(pid: int) -> list[int]:
    return children(pid, b"relay.queue.fsworker")


def test_queue_worker_killed_is_replaced_and_never_outlives_the_relay(relay):
    r = relay().start()
    send(r.port, ["before@localhost"])
    assert waitFor(lambda: len(r.delivered("before@localhost")) == 1, 5), r.logText()
    assert waitFor(lambda: len(queueWorkers(r.proc.pid)) == 1, 10)
    [worker] = queueWorkers(r.proc.pid)
    os.kill(worker, signal.SIGKILL)
    assert waitFor(lambda: queueWorkers(r.proc.pid) not in ([], [worker]), 10), r.logText()
    assert "queue worker exited" in r.logText()
    send(r.port, ["after@localhost"])
    assert waitFor(lambda: len(r.delivered("after@localhost")) == 1, 5), r.logText()

    [replacement] = queueWorkers(r.proc.pid)
    r.stop()
    assert waitFor(lambda: not alive(replacement), 10)
    assert "queue store: " in r.logText()  # the worker's statistics, logged at a clean stop

    r.start()
    assert waitFor(lambda: len(queueWorkers(r.proc.pid)) == 1, 10)
    [worker] = queueWorkers(r.proc.pid)
    r.kill9()
    # Its stdin closes with the relay: it finishes its batch and exits.
    assert waitFor(lambda: not alive(worker), 10)


# -- start-up fails closed -----------------------------------------------------------

TESTS = ROOT / "tests"


def greeting(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    try:
        return sock.recv(1024)
    except TimeoutError:
        return b""
    except OSError:
        return b""  # reset: the process ended


def test_queue_that_cannot_be_used_stops_startup_with_one_line(tmp_path):
    """A regular file where the queue directory goes: found at start-up, before any client is answered."""
    r = Relay(tmp_path)
    r.state.mkdir(parents=True)
    (r.state / "queue").write_text("not a directory")
    result = subprocess.run(r.command(), cwd=tmp_path, capture_output=True, timeout=30)
    err = result.stderr.decode()
    assert result.returncode != 0, (err, r.logText())
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert str(r.state / "queue") in err, err
    assert not listening(r.port)


def test_failed_recovery_answers_nobody_and_exits_non_zero(tmp_path):
    r = Relay(tmp_path, queue="store = slowstore:store\ndelay = 1.5\noutcome = fail", env={"PYTHONPATH": str(TESTS)})
    r.proc = subprocess.Popen(r.command(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=r.env)
    try:
        assert waitFor(lambda: listening(r.port) or r.proc.poll() is not None, 10), r.logText()
        with socket.create_connection(("127.0.0.1", r.port), timeout=5) as sock:
            # Bound (the port is taken at once), but nobody is answered while the queue is recovered...
            assert greeting(sock, 1.0) == b""
            # ...and when recovery fails, nobody ever is: the process ends.
            assert r.proc.wait(timeout=15) != 0
            assert greeting(sock, 1.0) == b""
        err = r.proc.stderr.read().decode()
        assert err.strip() == f"relay: cannot use the queue at {r.state / 'queue'}: [Errno 5] Input/output error", err
        assert "cannot use the queue at" in r.logText()
    finally:
        r.stop()


def test_clients_wait_for_recovery_then_are_served(tmp_path):
    r = Relay(tmp_path, queue="store = slowstore:store\ndelay = 1.5\noutcome = ok", env={"PYTHONPATH": str(TESTS)})
    r.start()
    started = time.monotonic()
    try:
        with smtplib.SMTP("127.0.0.1", r.port, timeout=10) as client:
            waited = time.monotonic() - started
            client.ehlo("c.example")
            assert client.sendmail("a@example.org", ["early@localhost"], BODY) == {}
        assert 0.5 < waited < 5, waited
        assert waitFor(lambda: len(r.delivered("early@localhost")) == 1, 5), r.logText()
        assert "recovered 0 queued messages" in r.logText()
    finally:
        r.stop()
