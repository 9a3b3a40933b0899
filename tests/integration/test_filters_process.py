"""
Content filters in the real twistd relay: a filter that raises, one that
hangs past filter_timeout, each costing 451 4.3.0 (or skipped with
on_error = accept), with the session and the process going on; the trace.
"""

from __future__ import annotations

import smtplib
from pathlib import Path

import pytest
from relayproc import HEAD, freePort, waitFor

pytestmark = pytest.mark.integration

TESTS = Path(__file__).resolve().parents[1]

CONFIG = (
    HEAD
    + """\
local_domains = localhost
filters = {filters}
filter_trace = yes

[queue]
retry = 1h

[delivery:local]
plugin = maildir

[routes]
localhost = local
"""
)
SECTIONS = {
    "raising": "plugin = test_filters:brokenFilter\nhow = raise\n",
    "hanging": "plugin = test_filters:brokenFilter\nhow = hang\nfilter_timeout = 1s\n",
    "tag": "plugin = test_filters:brokenFilter\nhow = tag\n",
}


def start(relay, tmp_path, filters, onError=""):
    port = freePort()
    config = CONFIG.format(state=tmp_path / "var", port=port, filters=filters)
    for name in filters.split():
        config += f"\n[filter:{name}]\n{SECTIONS[name]}{onError}\n"
    return relay(config=config, port=port, env={"PYTHONPATH": str(TESTS)}).start()


def send(r, to="a@localhost"):
    with smtplib.SMTP("127.0.0.1", r.port, timeout=20) as client:
        client.ehlo("client.test")
        client.mail("s@example.org")
        client.rcpt(to)
        try:
            return client.data(b"Subject: t\r\n\r\nbody\r\n")
        finally:
            assert client.noop()[0] == 250  # the session goes on


def test_raising_and_hanging_filters_cost_451_and_the_relay_stays_up(relay, tmp_path):
    r = start(relay, tmp_path, "tag raising")
    code, text = send(r)
    assert (code, text[:5]) == (451, b"4.3.0")
    r.stop()
    r = start(relay, tmp_path, "hanging tag")
    code, text = send(r)
    assert (code, text[:5]) == (451, b"4.3.0")
    assert r.proc.poll() is None
    log = r.logText()
    assert "filter hanging failed" in log and "no answer within 1s" in log
    assert "reason=filter" in log and "filters=hanging:error" in log
    assert r.delivered("a@localhost") == []


def test_on_error_accept_skips_them_and_the_trace_says_so(relay, tmp_path):
    r = start(relay, tmp_path, "raising hanging tag", "on_error = accept\n")
    code, _ = send(r)
    assert code == 250
    assert waitFor(lambda: len(r.delivered("a@localhost")) == 1, 10), r.logText()[-3000:]
    data = r.delivered("a@localhost")[0].read_bytes()
    assert b"X-Tagged: yes\r\n" in data or b"X-Tagged: yes\n" in data
    assert b"X-Relay-Filter: relay.test; raising=error" in data
    log = r.logText()
    assert "filters=raising:error,hanging:error,tag:continue" in log
    assert "skipped (on_error = accept)" in log
