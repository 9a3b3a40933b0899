"""
No backscatter, with the real process: what would bounce for certain is refused
at RCPT, and a client that may not relay cannot make the relay send reports
beyond failures.

Both relays listen on 127.0.0.1; the "outsider" one has relay_networks = ::1/128,
so that the test client, on 127.0.0.1, is outside it.  The sender is a local
mailbox, so that any report the relay sent would land in a maildir we read.
"""

from __future__ import annotations

import email
import email.policy
import smtplib
import time

import pytest
from relayproc import MINIMAL, Relay, freePort, waitFor

pytestmark = pytest.mark.integration

BODY = b"Subject: tracked\r\nFrom: writer@localhost\r\n\r\nbody\r\n"
ODD = ["a/b@localhost", '".hidden"@localhost', '"../.."@localhost', '"a\\/b"@localhost', "A/B@LOCALHOST"]


def started(relay, tmp_path, relayNetworks: str) -> Relay:
    port = freePort()
    config = MINIMAL.format(state=tmp_path / "var", port=port, retry="1m", queue="")
    config = config.replace("relay_networks = 127.0.0.0/8\n", f"relay_networks = {relayNetworks}\n")
    assert f"relay_networks = {relayNetworks}\n" in config
    return relay(config=config, port=port).start()


def sendTracked(port: int) -> None:
    """writer@localhost to bob@localhost, asking for a success report and the full message back."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("client.example.org")
        assert client.has_extn("dsn")
        assert client.mail("writer@localhost", options=["RET=FULL", "ENVID=track1"])[0] == 250
        assert client.rcpt("bob@localhost", options=["NOTIFY=SUCCESS"])[0] == 250
        assert client.data(BODY)[0] == 250


def queueEmpty(r: Relay) -> bool:
    messages = r.state / "queue" / "messages"
    return not messages.is_dir() or not list(messages.iterdir())


def test_odd_local_parts_are_refused_at_rcpt_and_nothing_is_queued(relay, tmp_path):
    r = started(relay, tmp_path, "::1/128")
    with smtplib.SMTP("127.0.0.1", r.port, timeout=10) as client:
        client.ehlo("client.example.org")
        assert client.mail("writer@localhost")[0] == 250
        for address in ODD:
            code, text = client.docmd("RCPT", f"TO:<{address}>")
            assert (code, text[:5]) == (550, b"5.1.3"), address
        assert client.docmd("DATA")[0] == 554  # no valid recipients
        assert client.rset()[0] == 250
    # nothing accepted, so nothing queued, nothing to bounce to writer@localhost
    time.sleep(0.5)
    assert queueEmpty(r)
    assert "accepted " not in r.logText() and "report " not in r.logText()
    assert not (r.state / "mail").exists()


def test_an_outsiders_notify_success_produces_no_report(relay, tmp_path):
    r = started(relay, tmp_path, "::1/128")
    sendTracked(r.port)
    assert waitFor(lambda: len(r.delivered("bob@localhost")) == 1, 10), r.logText()[-3000:]
    assert waitFor(lambda: queueEmpty(r), 10), r.logText()[-3000:]
    time.sleep(0.5)  # a report would have been queued in the same attempt; give it time to land anyway
    assert r.delivered("writer@localhost") == []
    assert "report " not in r.logText()


def test_an_insiders_notify_success_produces_a_report(relay, tmp_path):
    r = started(relay, tmp_path, "127.0.0.0/8")
    sendTracked(r.port)
    assert waitFor(lambda: len(r.delivered("writer@localhost")) == 1, 10), r.logText()[-3000:]
    [path] = r.delivered("writer@localhost")
    report = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
    assert report["Return-Path"] == "<>" and report.get_content_type() == "multipart/report"
    assert "delivered notice for" in r.logText()
