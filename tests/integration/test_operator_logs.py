"""
The operator's view of a running relay: one key=value line per event (or one
JSON object per line with [log] format = json), and /metrics that answers
"is mail flowing?" before and after a message.
"""

from __future__ import annotations

import json
import smtplib
import socket
import urllib.request

import pytest
from relayproc import HEAD, freePort, waitFor

pytestmark = pytest.mark.integration

CONFIG = (
    HEAD
    + """\
local_domains = localhost

[delivery:local]
plugin = maildir

[routes]
localhost = local

[metrics]
endpoint = tcp:{metrics}:interface=127.0.0.1
{extra}"""
)


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def bareLF(port: int) -> bytes:
    """A message with a bare LF, sent raw (smtplib would mend it): the 554 reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        f = s.makefile("rb")
        f.readline()
        s.sendall(b"HELO t\r\nMAIL FROM:<s@example.org>\r\nRCPT TO:<x@localhost>\r\nDATA\r\n")
        for _ in range(4):
            f.readline()
        s.sendall(b"Subject: t\r\n\r\nbare\nlf\r\n.\r\nQUIT\r\n")
        return f.readline()


def test_metrics_before_and_after_a_message(relay, tmp_path):
    port, metricsPort = freePort(), freePort()
    r = relay(config=CONFIG.format(state=tmp_path / "var", port=port, metrics=metricsPort, extra=""), port=port)
    r.start()
    assert waitFor(lambda: scrape(metricsPort).get("relay_sessions_open", 1) == 0, 10)
    before = scrape(metricsPort)
    assert before["relay_messages_accepted_total"] == 0
    assert before['relay_queue_messages{state="active"}'] == 0
    assert before["relay_queue_oldest_age_seconds"] == 0
    assert 'relay_delivery_seconds_count{backend="local"}' not in before
    assert before["relay_queue_commit_batch_size_count"] == 0

    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("client.test")
        assert waitFor(lambda: scrape(metricsPort)["relay_sessions_open"] == 1, 5)
        client.sendmail("s@example.org", ["someone@localhost"], b"Subject: t\r\n\r\nbody\r\n")
    assert bareLF(port).startswith(b"554 5.6.0")
    assert waitFor(lambda: len(r.delivered("someone@localhost")) == 1, 10), r.logText()[-3000:]
    assert waitFor(lambda: scrape(metricsPort)["relay_sessions_open"] == 0, 5)
    after = scrape(metricsPort)
    print(
        "metrics after one message:",
        {
            k: v
            for k, v in after.items()
            if k.startswith(("relay_sessions", "relay_messages", "relay_delivery_seconds_s"))
        },
    )
    assert after["relay_messages_accepted_total"] == 1
    assert after['relay_messages_rejected_total{reason="bare_lf"}'] == 1
    assert after['relay_delivery_seconds_count{backend="local"}'] == 1
    assert 0 < after['relay_delivery_seconds_sum{backend="local"}'] < 10
    assert after['relay_recipient_outcomes_total{backend="local",outcome="delivered"}'] == 1
    assert after['relay_queue_messages{state="active"}'] == 0 and after['relay_queue_messages{state="waiting"}'] == 0
    # The worker process's batches reach the relay: the commit, at least, made durable in one.
    assert after["relay_queue_commit_batch_size_count"] >= 1
    assert after["relay_queue_commit_batch_size_sum"] >= after["relay_queue_commit_batch_size_count"]

    log = r.logText()
    assert "event=connect client=127.0.0.1 port=" in log
    assert "event=disconnect client=127.0.0.1 messages=1 duration=" in log
    assert "event=accepted queue_id=" in log and "from=<s@example.org> size=" in log
    assert "event=rejected reason=bare_lf client=127.0.0.1 from=<s@example.org> code=554 dsn=5.6.0" in log
    assert "event=delivered queue_id=" in log and "to=<someone@localhost> backend=local code=250 dsn=2.0.0" in log
    assert "Starting factory" not in log


def test_json_log_carries_the_same_events(relay, tmp_path):
    port, metricsPort = freePort(), freePort()
    extra = "\n[log]\nformat = json\n"
    r = relay(config=CONFIG.format(state=tmp_path / "var", port=port, metrics=metricsPort, extra=extra), port=port)
    r.start()
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.sendmail("s@example.org", ["someone@localhost"], b"Subject: t\r\n\r\nbody\r\n")
    assert waitFor(lambda: '"event": "delivered"' in r.logText(), 10), r.logText()[-3000:]
    records = [json.loads(line) for line in r.logText().splitlines() if line.strip()]
    assert all({"time", "level", "system", "event"} <= set(record) for record in records)
    events = {record["event"]: record for record in records}
    accepted, delivered = events["accepted"], events["delivered"]
    assert (accepted["from"], accepted["nrcpt"], accepted["client"]) == ("s@example.org", 1, "127.0.0.1")
    assert delivered["queue_id"] == accepted["queue_id"]
    assert (delivered["to"], delivered["code"], delivered["dsn"], delivered["attempt"]) == (
        "someone@localhost",
        250,
        "2.0.0",
        1,
    )
    assert {"connect", "disconnect"} <= set(events)
