"""relay.smtp.limits: the global cap, per-address caps and rates, release, forgetting, log lines."""

from __future__ import annotations

from dataclasses import dataclass

from twisted.internet.task import Clock
from twisted.logger import Logger, formatEvent

from relay.smtp.limits import SWEEP_INTERVAL, SessionLimits, sessionCap


@dataclass
class Listener:
    """The listener numbers SessionLimits reads (a ServerSettings has them all)."""

    maxSessionsPerClient: int = 2
    maxSessionsPerRelayClient: int = 4
    maxConnectionRate: int = 0


def limits(maxSessions: int | None = None) -> tuple[SessionLimits, Clock, list[str]]:
    clock = Clock()
    clock.advance(1_000_000)
    lines: list[str] = []
    cap = SessionLimits(clock, maxSessions)
    cap.log = Logger(observer=lambda event: lines.append(formatEvent(event)))
    return cap, clock, lines


def test_session_cap():
    assert sessionCap(None, 1024) == 384
    assert sessionCap(None, 1 << 20) == 1000
    assert sessionCap(None, 100) == 1
    assert sessionCap(7, 1024) == 7
    assert sessionCap(5000, 1024) == 5000  # as set: the service warns, not refuses


def test_global_cap_counts_every_listener_and_address():
    cap, _, lines = limits(maxSessions=3)
    a, b = Listener(), Listener(maxSessionsPerClient=10)
    assert cap.admit("192.0.2.1", False, a) is None
    assert cap.admit("192.0.2.2", False, b) is None
    assert cap.admit("127.0.0.1", True, b) is None
    refusal = cap.admit("192.0.2.3", False, a)
    assert refusal is not None and "limit 3" in refusal
    assert lines == ["refused connection from 192.0.2.3: max_sessions (3) reached"]
    assert cap.sessions == 3  # the refused one holds nothing
    cap.release("192.0.2.2")
    assert cap.admit("192.0.2.3", False, a) is None


def test_per_address_cap_and_relay_networks_own_cap():
    cap, _, lines = limits()
    listener = Listener(maxSessionsPerClient=2, maxSessionsPerRelayClient=3)
    assert [cap.admit("192.0.2.1", False, listener) for _ in range(3)][:2] == [None, None]
    assert lines == ["refused connection from 192.0.2.1: max_sessions_per_client (2) reached"]
    assert cap.admit("192.0.2.2", False, listener) is None  # another address is not affected
    assert [cap.admit("127.0.0.1", True, listener) for _ in range(4)] == [
        None,
        None,
        None,
        "too many sessions from your address (limit 3)",
    ]
    cap.release("192.0.2.1")
    assert cap.admit("192.0.2.1", False, listener) is None
    assert cap.sessions == 6


def test_connection_rate_per_address_refills_and_ignores_relay_networks():
    cap, clock, _ = limits()
    listener = Listener(
        maxSessionsPerClient=1000, maxSessionsPerRelayClient=1000, maxConnectionRate=60
    )  # one a second, bursts of 60
    results = [cap.admit("192.0.2.1", False, listener) for _ in range(61)]
    assert results[:60] == [None] * 60
    assert results[60] == "too many connections from your address (limit 60 per minute)"
    assert cap.admit("192.0.2.2", False, listener) is None
    assert all(cap.admit("127.0.0.1", True, listener) is None for _ in range(100))
    clock.advance(1)
    assert cap.admit("192.0.2.1", False, listener) is None
    assert cap.admit("192.0.2.1", False, listener) is not None
    for _ in range(10):  # refused attempts do not use the rate up
        cap.admit("192.0.2.1", False, listener)
    clock.advance(5)
    assert [cap.admit("192.0.2.1", False, listener) for _ in range(6)].count(None) == 5


def test_release_frees_the_address_and_global_counts():
    cap, _, _ = limits(maxSessions=10)
    listener = Listener(maxSessionsPerClient=1)
    assert cap.admit("192.0.2.1", False, listener) is None
    assert cap.admit("192.0.2.1", False, listener) is not None
    cap.release("192.0.2.1")
    assert cap.sessions == 0
    assert cap.admit("192.0.2.1", False, listener) is None
    assert cap.sessions == 1


def test_refusals_are_logged_at_most_once_per_address_per_interval():
    cap, clock, lines = limits()
    listener = Listener(maxSessionsPerClient=1)
    cap.admit("192.0.2.1", False, listener)
    for _ in range(1000):
        cap.admit("192.0.2.1", False, listener)
    cap.admit("192.0.2.2", False, listener)
    cap.admit("192.0.2.2", False, listener)
    assert len(lines) == 2
    clock.advance(10)
    cap.admit("192.0.2.1", False, listener)
    assert lines[-1] == (
        "refused connection from 192.0.2.1: max_sessions_per_client (1) reached (999 more refused since the last line)"
    )


def test_idle_addresses_are_forgotten():
    cap, clock, _ = limits()
    listener = Listener(maxSessionsPerClient=5, maxConnectionRate=10)
    for i in range(10_000):
        client = f"10.0.{i // 256}.{i % 256}"
        assert cap.admit(client, False, listener) is None
        cap.release(client)
    assert cap.admit("192.0.2.1", False, listener) is None  # still in session
    assert len(cap) == 10_001
    clock.advance(SWEEP_INTERVAL)
    assert cap.admit("192.0.2.2", False, listener) is None
    assert len(cap) == 2  # the one in session stays, and the newcomer
    # what a forgotten address comes back to is a full bucket
    assert [cap.admit("10.0.0.0", False, listener) for _ in range(6)].count(None) == 5


def test_an_address_in_session_keeps_its_count_across_sweeps():
    cap, clock, _ = limits()
    listener = Listener(maxSessionsPerClient=1)
    assert cap.admit("192.0.2.1", False, listener) is None
    clock.advance(SWEEP_INTERVAL * 3)
    cap.admit("192.0.2.9", False, listener)  # sweeps
    assert cap.admit("192.0.2.1", False, listener) is not None
