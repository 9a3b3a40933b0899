"""
The relay's text log observer writes what twistd's own would, byte for byte
(log shippers and the tests' own log readers depend on the format), and is
only offered to twistd when twistd would write text to standard output.
"""

from __future__ import annotations

import io
import json
import os
import time

import pytest
from twisted.application.service import Application
from twisted.logger import ILogObserver, LogLevel, formatEventAsClassicLogText
from twisted.python.failure import Failure

from relay.logs import SecondStamps, TextLogObserver, twistdObserver

NOW = 1795928436.25  # 2026-11-30T05:00:36Z

EVENTS = [
    {"log_format": "accepted {queue_id}", "queue_id": "Q1", "log_namespace": "relay.smtp", "log_level": LogLevel.info},
    {"log_format": "plain", "log_system": "-", "log_time": NOW},
    {"log_format": "two\nlines", "log_namespace": "n", "log_level": LogLevel.warn},
    {"log_format": "no namespace"},
    {"log_format": "{a} and {{braces}}", "a": 1, "log_system": 42},
    {"log_format": "", "log_namespace": "n"},
    {"message": ("legacy",), "log_namespace": "n"},
    {"log_format": "missing {field}"},
]


@pytest.mark.parametrize("event", EVENTS)
def test_lines_are_twisteds_own(event):
    event = dict(event)
    event.setdefault("log_time", NOW + 0.5)
    assert TextLogObserver(io.StringIO()).format(event) == formatEventAsClassicLogText(event)


def test_a_failure_keeps_its_traceback():
    try:
        _ = 1 / 0
    except ZeroDivisionError:
        failure = Failure()
    event = {"log_format": "it broke", "log_failure": failure, "log_time": NOW, "log_namespace": "n"}
    line = TextLogObserver(io.StringIO()).format(event)
    assert line == formatEventAsClassicLogText(event)
    assert "ZeroDivisionError" in line and line.count("\n\t") > 2


def test_observer_writes_and_flushes_each_line():
    out = io.StringIO()
    observer = TextLogObserver(out)
    observer({"log_format": "one", "log_time": NOW, "log_system": "s"})
    observer({"log_format": "", "log_time": NOW})  # nothing to say: nothing written
    assert out.getvalue() == formatEventAsClassicLogText({"log_format": "one", "log_time": NOW, "log_system": "s"})


@pytest.mark.parametrize("zone", ["UTC", "Europe/Berlin", "America/St_Johns", "Asia/Kolkata"])
def test_stamps_follow_the_local_zone_across_a_change_of_daylight_saving_time(zone, monkeypatch):
    monkeypatch.setenv("TZ", zone)
    time.tzset()
    try:
        stamps = SecondStamps()
        # 2026-03-29 01:00 UTC: Europe's clocks go forward; St John's and Kolkata as controls.
        change = 1774746000
        for when in (change - 1.5, change - 0.25, change, change + 0.75, change + 3600, NOW):
            assert stamps(when) == formatEventAsClassicLogText({"log_format": "x", "log_time": when}).split(" ")[0]
        assert stamps(None) == "-"
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    assert os.environ.get("TZ") is None


def test_offered_only_when_twistd_would_write_text_to_standard_output():
    out = io.StringIO()
    foreground = {"nodaemon": True, "logfile": None, "syslog": False, "logger": None}
    assert isinstance(twistdObserver(foreground, out), TextLogObserver)
    assert isinstance(twistdObserver({**foreground, "logfile": "-"}, out), TextLogObserver)
    assert twistdObserver({**foreground, "logfile": "/var/log/relay.log"}, out) is None
    assert twistdObserver({**foreground, "syslog": True}, out) is None
    assert twistdObserver({**foreground, "logger": "my.observer"}, out) is None
    assert twistdObserver({**foreground, "nodaemon": False}, out) is None
    assert twistdObserver(None, out) is None


def test_the_relay_service_hands_its_observer_to_the_application():
    from relay.service import RelayService

    service = RelayService(settings=None, store=None, scheduler=None)
    application = Application("relay")
    service.setServiceParent(application)
    assert application.getComponent(ILogObserver, None) is None  # none offered: twistd's own
    service.disownServiceParent()

    observer = TextLogObserver(io.StringIO())
    service.logObserver = observer
    application = Application("relay")
    service.setServiceParent(application)
    assert application.getComponent(ILogObserver, None) is observer


# -- operator events ---------------------------------------------------------


def test_event_text_is_stable_key_value():
    from relay.logs import eventText

    fields = {"queue_id": "Q1", "from": "", "to": "a@b", "user": None, "reply": 'said "no" = x', "delay": 1.23456}
    assert eventText("accepted", fields) == (
        'event=accepted queue_id=Q1 from=<> to=<a@b> reply="said \\"no\\" = x" delay=1.235'
    )


def test_json_observer_writes_one_object_per_line_with_the_events_fields():
    from twisted.logger import Logger

    from relay.logs import JSONLogObserver, logEvent

    out = io.StringIO()
    log = Logger(namespace="relay.test", observer=JSONLogObserver(out))
    logEvent(log, "delivered", {"queue_id": "Q{1}", "to": "a@b", "code": 250, "relay": None})
    log.info("plain {x}", x=1)
    try:
        _ = 1 / 0
    except ZeroDivisionError:
        log.failure("it broke")
    lines = out.getvalue().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 3
    assert records[0]["event"] == "delivered" and records[0]["queue_id"] == "Q{1}" and records[0]["code"] == 250
    assert "relay" not in records[0] and records[0]["level"] == "info" and records[0]["time"].endswith("Z")
    assert records[1]["event"] == "log" and records[1]["text"] == "plain 1"
    assert "ZeroDivisionError" in records[2]["traceback"]


def test_the_text_observer_writes_the_events_key_value_form():
    from twisted.logger import Logger

    from relay.logs import logEvent

    out = io.StringIO()
    log = Logger(namespace="relay.test", observer=TextLogObserver(out))
    logEvent(log, "rejected", {"reason": "bare_lf", "from": "a{b}@c", "code": 554})
    assert out.getvalue().endswith("[relay.test#info] event=rejected reason=bare_lf from=<a{b}@c> code=554\n")


def test_json_format_is_offered_for_standard_output_and_log_files(tmp_path):
    from relay.logs import JSONLogObserver

    out = io.StringIO()
    foreground = {"nodaemon": True, "logfile": None, "syslog": False, "logger": None}
    assert isinstance(twistdObserver(foreground, out, "json"), JSONLogObserver)
    assert isinstance(twistdObserver({**foreground, "logfile": str(tmp_path / "r.log")}, out, "json"), JSONLogObserver)
    assert twistdObserver({**foreground, "syslog": True}, out, "json") is None


def test_the_benchmarks_count_the_lines_the_relay_writes():
    # bench/ counts accepted and delivered messages by these lines: a change
    # of the log format must not leave make bench waiting for lines that never come.
    import re
    import sys
    from pathlib import Path

    from twisted.logger import Logger

    from relay.logs import logEvent

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    try:
        from common import RelayProcess
    finally:
        sys.path.pop(0)
    out = io.StringIO()
    log = Logger(namespace="relay.smtp.server.SMTPServer", observer=TextLogObserver(out))
    logEvent(log, "accepted", {"queue_id": "19c2b0d5e3a41a3f9e0", "from": "a@example.org", "size": 312, "nrcpt": 1})
    logEvent(log, "delivered", {"queue_id": "19c2b0d5e3a41a3f9e0", "to": "someone@localhost", "code": 250})
    accepted, delivered = out.getvalue().encode().splitlines()
    assert re.search(RelayProcess.PATTERNS["accepted"], accepted) and not re.search(
        RelayProcess.PATTERNS["accepted"], delivered
    )
    assert re.search(RelayProcess.PATTERNS["delivered"], delivered) and not re.search(
        RelayProcess.PATTERNS["delivered"], accepted
    )


class CountingOut(io.StringIO):
    """Counts writes and flushes: a write is a system call on a stream that writes through."""

    def __init__(self) -> None:
        super().__init__()
        self.flushes = 0
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


def test_with_a_clock_the_lines_of_one_turn_are_flushed_together():
    from twisted.internet.task import Clock

    clock = Clock()
    out = CountingOut()
    observer = TextLogObserver(out, clock)
    for n in range(3):
        observer({"log_format": f"line {n}", "log_time": NOW, "log_system": "s"})
    assert out.writes == 0 and out.flushes == 0  # kept, to go out at the end of the turn
    clock.advance(0)
    assert out.writes == 1 and out.flushes == 1 and out.getvalue().count("\n") == 3
    observer({"log_format": "next turn", "log_time": NOW, "log_system": "s"})
    clock.advance(0)
    assert out.flushes == 2
    observer({"log_format": "last", "log_time": NOW, "log_system": "s"})
    observer.flush()  # as at shutdown, before the turn ends: nothing left behind
    assert out.getvalue().endswith("last\n") and out.writes == 3 and not clock.getDelayedCalls()


def test_without_a_clock_every_line_is_flushed():
    out = CountingOut()
    observer = TextLogObserver(out)
    observer({"log_format": "one", "log_time": NOW, "log_system": "s"})
    observer({"log_format": "two", "log_time": NOW, "log_system": "s"})
    assert out.writes == 2 and out.flushes == 2
