"""
relayctl against a running relay: the real C{relayctl} script talks to a real
twistd over the control socket; every subcommand, its --json output parsed,
its exit status checked.

The relay relays to a smart host on a port where nothing listens, so
messages stay queued (deferred, retry 1h) until the test moves the smart host
to a scripted next hop and restarts the relay.
"""

from __future__ import annotations

import json
import smtplib
import subprocess

from relayproc import RELAYCTL, ctl, freePort, queueJSON, smarthostConfig, tool, waitFor
from scriptedpeer import LaxPeer


def send(relay, sender: str, recipients: list[str], subject: str) -> None:
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
        client.sendmail(sender, recipients, f"Subject: {subject}\r\n\r\nbody\r\n")


def deferredQueue(relay, count: int) -> list[dict]:
    """The queue once C{count} messages have each been attempted (and deferred)."""
    found: list[dict] = []

    def ready() -> bool:
        found[:] = queueJSON(relay)
        return len(found) == count and all(r["attempts"] >= 1 for m in found for r in m["recipients"])

    assert waitFor(ready, 20, 0.2), found
    return found


def oneLineError(err: str) -> None:
    assert err.count("\n") == 1 and err.startswith("relayctl: ") and "Traceback" not in err, err


def test_every_subcommand(relay, tmp_path):
    dead, port = freePort(), freePort()
    r = relay(config=smarthostConfig(tmp_path / "var", port, dead, queue="retry = 1h"), port=port)
    r.start()
    send(r, "alice@localhost", ["b@far.test", "c@far.test"], "first")
    send(r, "alice@localhost", ["d@far.test"], "second")
    send(r, "alice@localhost", ["e@far.test"], "third")
    send(r, "alice@localhost", ["f@far.test"], "fourth")
    messages = deferredQueue(r, 4)
    for message in messages:
        assert set(message) == {"id", "sender", "size", "arrived", "held", "recipients"}
        assert message["sender"] == "alice@localhost" and message["held"] is False and message["size"] > 0
        assert message["arrived"].endswith("Z")
        for recipient in message["recipients"]:
            assert set(recipient) == {"address", "state", "attempts", "next_attempt", "last_reply"}
            assert recipient["state"] == "deferred" and recipient["next_attempt"].endswith("Z")
            assert recipient["last_reply"].startswith("451 ")
    byRecipient = {m["recipients"][0]["address"]: m["id"] for m in messages}
    first, second, third, fourth = (byRecipient[a] for a in ("b@far.test", "d@far.test", "e@far.test", "f@far.test"))

    status, out, err = ctl(r, "queue")
    assert status == 0 and first in out and "<b@far.test> deferred" in out, (out, err)

    status, out, _ = ctl(r, "stats", "--json")
    stats = json.loads(out)
    assert status == 0 and stats["messages"] == 4 and stats["messages_by_state"]["deferred"] == 4
    assert stats["recipients_by_state"]["deferred"] == 5 and stats["oldest_age"] >= 0
    assert stats["sessions_open"] == 0 and stats["deliveries_in_flight"] == 0
    assert ctl(r, "stats")[0] == 0

    status, out, _ = ctl(r, "show", first, "--json")
    shown = json.loads(out)
    assert status == 0 and shown["id"] == first and "Subject: first" in shown["headers"]
    assert "Received: from" in shown["headers"]
    status, out, _ = ctl(r, "show", first)
    assert status == 0 and "Subject: first" in out

    status, out, err = ctl(r, "hold", first)
    assert (status, out) == (0, f"held {first}\n"), err
    held = {m["id"]: m for m in queueJSON(r)}[first]
    assert held["held"] is True and all(rc["next_attempt"] is None for rc in held["recipients"])
    status, out, err = ctl(r, "flush", first)
    assert status == 1 and "held" in err
    oneLineError(err)

    status, out, err = ctl(r, "delete", second)
    assert (status, out) == (0, f"deleted {second}\n"), err
    status, out, err = ctl(r, "bounce", third)
    assert (status, out) == (0, f"bounced {third}\n"), err
    # The failure report goes to alice@localhost, delivered locally.
    assert waitFor(lambda: len(r.delivered("alice@localhost")) == 1, 20)
    report = r.delivered("alice@localhost")[0].read_bytes()
    assert b"Returned to the sender by the postmaster" in report and b"e@far.test" in report

    ids = {m["id"] for m in queueJSON(r)}
    assert ids == {first, fourth}

    for command in ("hold", "release", "delete", "bounce", "flush", "show"):
        status, out, err = ctl(r, command, "0000nosuchid")
        assert status == 1, (command, out, err)
        oneLineError(err)
        assert "0000nosuchid" in err
    status, _, err = ctl(r, "release", fourth)
    assert status == 1 and "not held" in err

    assert ctl(r, "reload") == (0, "reloaded\n", "")
    good = r.config.read_text()
    r.config.write_text(good.replace("[policy]\n", "[policy]\nmax_message_size = huge\n"))
    # The file is broken, so relayctl finds the socket with --socket.
    proc = subprocess.run(
        [RELAYCTL, "--socket", str(r.state / "control.sock"), "reload"], capture_output=True, text=True, timeout=30
    )
    status, err = proc.returncode, proc.stderr
    assert status == 1 and "[policy] max_message_size" in err, err
    oneLineError(err)
    r.config.write_text(good)
    assert {m["id"] for m in queueJSON(r)} == {first, fourth}  # still running, as it was

    # The hold survives a restart; the next hop is now up: flush delivers
    # everything but the held message, release delivers that one.
    r.stop()
    peer = LaxPeer().start()
    try:
        r.config.write_text(r.config.read_text().replace(f"port = {dead}", f"port = {peer.port}"))
        r.start()
        held = {m["id"]: m for m in queueJSON(r)}[first]
        assert held["held"] is True
        status, out, err = ctl(r, "flush")
        assert status == 0 and out.endswith("messages due now\n"), err
        assert peer.waitForMessages(1)
        assert waitFor(lambda: [m["id"] for m in queueJSON(r)] == [first], 20, 0.2)
        assert len(peer.messages) == 1 and b"Subject: fourth" in peer.messages[0].data
        status, out, err = ctl(r, "release", first)
        assert (status, out) == (0, f"released {first}\n"), err
        assert peer.waitForMessages(2)
        assert b"Subject: first" in peer.messages[1].data
        assert waitFor(lambda: queueJSON(r) == [], 20, 0.2)
        assert ctl(r, "queue") == (0, "queue is empty\n", "")
    finally:
        r.stop()
        peer.stop()

    # Not running: one line, exit 1.
    status, out, err = ctl(r, "queue")
    assert status == 1 and "not running" in err
    oneLineError(err)


def test_usage_and_configuration_errors(tmp_path):
    bad = tmp_path / "bad.ini"
    bad.write_text("[relay]\nnonsense = 1\n")
    proc = subprocess.run([RELAYCTL, "--config", str(bad), "queue"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "nonsense" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([RELAYCTL, "hold"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    proc = subprocess.run(
        [RELAYCTL, "--socket", str(tmp_path / "none.sock"), "stats"], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 1 and "not running" in proc.stderr
    oneLineError(proc.stderr)


def test_etrn_with_swaks(relay, tmp_path):
    """
    Mail sent with swaks waits for a next hop that is down; once it is up,
    ETRN for its domain delivers it at once instead of at the next retry
    (an hour away); ETRN for another domain answers 251.
    """
    swaks = tool("swaks")
    dead, port = freePort(), freePort()
    r = relay(config=smarthostConfig(tmp_path / "var", port, dead, queue="retry = 1h"), port=port)
    r.start()
    peer = LaxPeer().start()
    try:
        sent = subprocess.run(
            [swaks, "--server", "127.0.0.1", "--port", str(port), "--from", "alice@localhost"]
            + ["--to", "bob@far.test", "--header", "Subject: etrn", "--timeout", "20"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert sent.returncode == 0, sent.stdout
        assert "<-  250-ETRN" in sent.stdout or "<-  250 ETRN" in sent.stdout
        deferredQueue(r, 1)
        r.stop()
        r.config.write_text(r.config.read_text().replace(f"port = {dead}", f"port = {peer.port}"))
        r.start()
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.ehlo("etrn.test")
            assert client.has_extn("etrn")
            assert client.docmd("ETRN", "other.test")[0] == 251
            code, text = client.docmd("ETRN", "far.test")
            assert (code, text) == (250, b"2.0.0 OK, queuing for node far.test started")
        assert peer.waitForMessages(1)
        assert b"Subject: etrn" in peer.messages[0].data
        assert waitFor(lambda: queueJSON(r) == [], 20, 0.2)
        assert "etrn far.test client=127.0.0.1 messages=1" in r.logText()
    finally:
        r.stop()
        peer.stop()
