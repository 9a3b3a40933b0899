"""AUTH throttling per client address (relay.smtp.throttle), on a deterministic clock."""

from __future__ import annotations

from dataclasses import replace

import pytest
from twisted.internet.task import Clock
from twisted.logger import capturedLogs

from relay.config import AuthSettings
from relay.smtp.throttle import AuthThrottle

DEFAULTS = AuthSettings(failure_delay=1.0, max_failure_delay=10.0, max_failures=10, failure_window=600.0, lockout=600.0)


def throttle(maxEntries: int = 100_000, **overrides: float) -> tuple[Clock, AuthThrottle]:
    clock = Clock()
    clock.advance(1_000_000)
    return clock, AuthThrottle(clock, replace(DEFAULTS, **overrides), maxEntries=maxEntries)


def test_the_delay_doubles_with_each_failure_up_to_the_cap() -> None:
    _, t = throttle()
    delays = [t.failed("192.0.2.1", "alice") for _ in range(6)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_addresses_are_counted_apart() -> None:
    _, t = throttle()
    for _ in range(5):
        t.failed("192.0.2.1", "alice")
    assert t.failed("192.0.2.2", "alice") == 1.0
    assert not t.lockedOut("192.0.2.2")


def test_failures_outside_the_window_are_not_counted() -> None:
    clock, t = throttle(failure_window=60.0)
    t.failed("192.0.2.1", "alice")
    t.failed("192.0.2.1", "alice")
    clock.advance(61)
    assert t.failed("192.0.2.1", "alice") == 1.0


def test_max_failures_in_the_window_lock_the_address_out_for_the_lockout() -> None:
    clock, t = throttle(max_failures=3, lockout=300.0)
    with capturedLogs() as events:
        for _ in range(3):
            assert not t.lockedOut("192.0.2.1")
            t.failed("192.0.2.1", "mallory")
    assert t.lockedOut("192.0.2.1")
    assert not t.lockedOut("192.0.2.9")
    [event] = [e for e in events if "locked out" in e["log_format"]]
    assert event["client"] == "192.0.2.1" and event["user"] == "mallory"
    clock.advance(299)
    assert t.lockedOut("192.0.2.1")
    clock.advance(2)
    assert not t.lockedOut("192.0.2.1")
    # After the lockout a new window starts: the next failure is the first.
    assert t.failed("192.0.2.1", "mallory") == 1.0
    assert not t.lockedOut("192.0.2.1")


def test_a_success_resets_the_count_but_not_a_lockout() -> None:
    _, t = throttle(max_failures=3)
    t.failed("192.0.2.1", "alice")
    t.failed("192.0.2.1", "alice")
    t.succeeded("192.0.2.1")
    assert t.failed("192.0.2.1", "alice") == 1.0
    t.failed("192.0.2.1", "alice")
    t.failed("192.0.2.1", "alice")
    assert t.lockedOut("192.0.2.1")
    t.succeeded("192.0.2.1")  # an answer already under way cannot lift it
    assert t.lockedOut("192.0.2.1")


def test_logged_user_names_are_printable_and_bounded() -> None:
    _, t = throttle(max_failures=1)
    with capturedLogs() as events:
        t.failed("192.0.2.1", "x\r\n" + "y" * 500)
    [event] = events
    assert "\n" not in event["user"] and len(event["user"]) <= 70


def test_the_table_is_bounded_and_forgets_the_oldest_first() -> None:
    _, t = throttle(maxEntries=100)
    for i in range(1000):
        t.failed(f"10.0.{i // 256}.{i % 256}", "u")
    assert len(t) == 100
    assert t.failed("10.0.3.231", "u") == 2.0  # the 1000th address is still known
    assert t.failed("10.0.0.0", "u") == 1.0  # the first one was forgotten


def test_expired_entries_are_forgotten() -> None:
    clock, t = throttle(failure_window=60.0, lockout=60.0)
    for i in range(50):
        t.failed(f"10.0.0.{i}", "u")
    clock.advance(61)
    t.failed("10.0.1.1", "u")
    assert len(t) == 1


@pytest.mark.parametrize("count", [1, 63, 64, 200])
def test_the_delay_never_overflows(count: int) -> None:
    _, t = throttle(max_failures=1000, max_failure_delay=10.0)
    for _ in range(count):
        delay = t.failed("192.0.2.1", "u")
    assert 0 < delay <= 10.0
