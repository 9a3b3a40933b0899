"""
The scheduler's bounded active set with the real process and the real store:
a queue larger than the active set is held, counted, and then delivered in
refills, never holding more than the limit in memory.
"""

from __future__ import annotations

import re
import smtplib
import time
import urllib.request

import pytest
from relayproc import MINIMAL, Relay, freePort, waitFor

pytestmark = pytest.mark.integration

BODY = b"Subject: queue size\r\n\r\nbody\r\n"


def metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
        text = response.read().decode()
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert match, text
    return float(match.group(1))


def config(r: Relay, metrics: int, queue: str) -> str:
    text = MINIMAL.format(state=r.state, port=r.port, retry="1m", queue=queue)
    return text + f"\n[metrics]\nendpoint = tcp:{metrics}:interface=127.0.0.1\n"


def test_queue_larger_than_the_active_set_is_held_then_delivered_in_refills(tmp_path):
    r = Relay(tmp_path)
    metrics = freePort()
    r.config.write_text(config(r, metrics, "active_limit = 10\nhold = yes"))
    r.start()
    try:
        with smtplib.SMTP("127.0.0.1", r.port, timeout=10) as client:
            client.ehlo("c.example")
            for i in range(40):
                assert client.sendmail("a@example.org", [f"user{i}@localhost"], BODY) == {}
        assert metric(metrics, "relay_queued_messages") == 40
        assert metric(metrics, "relay_active_messages") == 0  # held mail stays on disk
        r.stop()

        r.config.write_text(config(r, metrics, "active_limit = 10"))
        r.start()
        assert waitFor(lambda: "recovered 40 queued messages" in r.logText(), 5), r.logText()
        peak = 0.0
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            peak = max(peak, metric(metrics, "relay_active_messages"))
            if all(r.delivered(f"user{i}@localhost") for i in range(40)):
                break
            time.sleep(0.05)
        assert all(len(r.delivered(f"user{i}@localhost")) == 1 for i in range(40)), r.logText()
        assert 0 < peak <= 10, peak
        assert waitFor(lambda: metric(metrics, "relay_queued_messages") == 0, 5)
    finally:
        r.stop()
