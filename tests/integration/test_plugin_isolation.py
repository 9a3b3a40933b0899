"""
A plugin that raises or never answers costs one 451 (validator) or one
deferred attempt (backend) and a log line with the traceback; the session and
the process go on.
"""

from __future__ import annotations

import smtplib
import urllib.request
from pathlib import Path

import pytest
from relayproc import HEAD, waitFor

pytestmark = pytest.mark.integration

TESTS = Path(__file__).resolve().parents[1]

CONFIG = (
    HEAD
    + """\
local_domains = localhost
validators = broken
validator_timeout = 1s

[validator:broken]
plugin = brokenplugins:validator

[queue]
retry = 1h
delivery_timeout = 1s

[delivery:local]
plugin = maildir

[delivery:raising]
plugin = brokenplugins:backend
how = raise

[delivery:hanging]
plugin = brokenplugins:backend
how = hang

[routes]
localhost = local
raise.test = raising
hang.test = hanging

[metrics]
endpoint = tcp:{metrics}:interface=127.0.0.1
"""
)


def test_broken_plugins_cost_one_reply_or_one_attempt(relay, tmp_path):
    from relayproc import freePort

    port, metricsPort = freePort(), freePort()
    r = relay(
        config=CONFIG.format(state=tmp_path / "var", port=port, metrics=metricsPort),
        port=port,
        env={"PYTHONPATH": str(TESTS)},
    ).start()
    with smtplib.SMTP("127.0.0.1", r.port, timeout=10) as client:
        client.ehlo("client.test")
        client.mail("s@example.org")
        assert client.rcpt("boom@localhost")[0] == 451
        code, text = client.rcpt("hang@localhost")  # the validator never answers: 1 s
        assert (code, text[:5]) == (451, b"4.3.0")
        assert client.rcpt("fine@localhost")[0] == 250  # the same session goes on
        assert client.rcpt("x@raise.test")[0] == 250
        assert client.rcpt("y@hang.test")[0] == 250
        assert client.data(b"Subject: t\r\n\r\nbody\r\n")[0] == 250
    assert waitFor(lambda: len(r.delivered("fine@localhost")) == 1, 10), r.logText()[-3000:]
    log = r.logText()
    assert "validator broken failed for boom@localhost" in log and "validator exploded" in log  # with traceback
    assert "validator broken failed for hang@localhost" in log
    assert waitFor(lambda: r.logText().count("deferred ") >= 2, 10), r.logText()[-3000:]
    log = r.logText()
    assert "backend exploded" in log  # the traceback of the raising backend
    assert "deferred " in log and "to=<x@raise.test>" in log and "to=<y@hang.test>" in log
    assert r.proc is not None and r.proc.poll() is None  # still running

    # Each failure is counted, by kind and plugin (Prometheus text format).
    with urllib.request.urlopen(f"http://127.0.0.1:{metricsPort}/metrics", timeout=10) as response:
        text = response.read().decode()
    assert 'relay_plugin_failures_total{kind="validator",plugin="broken"} 2.0' in text
    assert 'relay_plugin_failures_total{kind="backend",plugin="raising"}' in text
    assert 'relay_plugin_failures_total{kind="backend",plugin="hanging"}' in text
    assert "relay_messages_accepted_total 1.0" in text
    assert 'relay_recipient_outcomes_total{backend="local",outcome="delivered"} 1.0' in text
