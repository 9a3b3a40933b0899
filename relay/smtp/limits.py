"""
Connection limits shared by every listener: what keeps one client, or a burst
of them, from taking the sessions (and file descriptors) everybody else needs.

One L{SessionLimits} serves the whole relay: the global cap counts the
sessions of all listeners, since they draw on one descriptor table.  The
per-address numbers are each listener's own and come with every call, from
the listener's C{ServerSettings} (C{maxSessionsPerClient},
C{maxSessionsPerRelayClient}, C{maxConnectionRate}).

A refused connection counts toward nothing: it holds no session, and it does
not use up its address's connection rate (a client over a cap is not kept out
longer for trying again).  Addresses are forgotten once they hold no session
and their rate bucket has refilled, so memory follows the clients of the last
minute, not every client ever seen.  Refusals are logged, at most one line per
address every C{logInterval} seconds (with the number left unlogged), so a
flood cannot fill the disk.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from twisted.logger import Logger

__all__ = ["LOG_INTERVAL", "SessionLimits", "sessionCap"]

# Descriptors kept for everything that is not a client session: the queue,
# deliveries, logs, the worker's pipes, DNS.
RESERVED_FDS = 256
AUTO_CAP = 1000
LOG_INTERVAL = 10.0
# How often idle addresses are forgotten (seconds of the clock).
SWEEP_INTERVAL = 60.0
RATE_PERIOD = 60.0


def sessionCap(setting: int | None, fdLimit: int) -> int:
    """
    The global session cap: C{[relay] max_sessions} as set, or for C{auto}
    (None) C{min(1000, (fdLimit - 256) // 2)}: each session may need a second
    descriptor (a file of the queue), and the rest of the relay keeps 256.
    Never below 1, so that a tiny fd limit still serves someone.
    """
    if setting is not None:
        return setting
    return max(1, min(AUTO_CAP, (fdLimit - RESERVED_FDS) // 2))


@dataclass
class _LogLimit:
    """At most one refusal line per interval; the ones left out are counted and told in the next."""

    loggedAt: float = float("-inf")
    unlogged: int = 0

    def quiet(self, now: float, interval: float) -> bool:
        return now - self.loggedAt < interval

    def suffix(self, now: float, interval: float) -> str | None:
        """The tail of a line to log now, or None (counted) when one was logged less than C{interval} ago."""
        if self.quiet(now, interval):
            self.unlogged += 1
            return None
        more = f" ({self.unlogged} more refused since the last line)" if self.unlogged else ""
        self.loggedAt, self.unlogged = now, 0
        return more


@dataclass
class _Address:
    sessions: int = 0
    tokens: float = 0.0  # connections left in the rate bucket, as of `stamp`
    stamp: float = 0.0
    rate: int = 0  # the bucket's size (per minute) when last used; 0 = no bucket
    logged: _LogLimit = field(default_factory=_LogLimit)


class SessionLimits:
    """
    Admission of new sessions, on C{clock}.

    @param maxSessions: the global cap (see L{sessionCap}); None for none.
    """

    log = Logger()

    def __init__(self, clock: Any, maxSessions: int | None = None, logInterval: float = LOG_INTERVAL) -> None:
        self.clock = clock
        self.maxSessions = maxSessions
        self.logInterval = logInterval
        self.sessions = 0
        self._addresses: dict[str, _Address] = {}
        self._lastSweep = clock.seconds()
        self._globalLogged = _LogLimit()

    def __len__(self) -> int:
        """Addresses remembered (for tests: memory stays bounded)."""
        return len(self._addresses)

    def admit(self, client: str, trusted: bool, settings: Any) -> str | None:
        """
        Count a new session from C{client}, or say why it may not have one.

        @param trusted: the client is in C{relay_networks} (or not an IP
            peer): it gets C{maxSessionsPerRelayClient} and no rate limit.
        @param settings: the listener's C{ServerSettings}.
        @return: None when admitted (then L{release} it exactly once), else
            the text of the refusal, naming the limit.
        """
        now = self.clock.seconds()
        if now - self._lastSweep >= SWEEP_INTERVAL:
            self._sweep(now)
        if self.maxSessions is not None and self.sessions >= self.maxSessions:
            self._logGlobal(now, client)
            return f"too many sessions on this server (limit {self.maxSessions}); try again later"
        entry = self._addresses.get(client)
        if entry is None:
            entry = self._addresses[client] = _Address(stamp=now)
        if trusted:
            cap, rate, key = settings.maxSessionsPerRelayClient, 0, "max_sessions_per_relay_client"
        else:
            cap, rate, key = settings.maxSessionsPerClient, settings.maxConnectionRate, "max_sessions_per_client"
        if entry.sessions >= cap:
            self._logRefusal(entry, now, client, f"{key} ({cap}) reached")
            return f"too many sessions from your address (limit {cap})"
        if rate:
            self._refill(entry, now, rate)
            if entry.tokens < 1:
                self._logRefusal(entry, now, client, f"max_connection_rate ({rate} per minute) reached")
                return f"too many connections from your address (limit {rate} per minute)"
        if rate:
            entry.tokens -= 1
        entry.sessions += 1
        self.sessions += 1
        return None

    def release(self, client: str) -> None:
        """A session L{admit} counted has ended."""
        self.sessions -= 1
        entry = self._addresses.get(client)
        if entry is not None:
            entry.sessions -= 1

    # -- internals -------------------------------------------------------

    @staticmethod
    def _refill(entry: _Address, now: float, rate: int) -> None:
        if entry.rate != rate:  # a new bucket, or the listener's rate differs: start full
            entry.rate = rate
            entry.tokens = float(rate)
        else:
            entry.tokens = min(float(rate), entry.tokens + (now - entry.stamp) * rate / RATE_PERIOD)
        entry.stamp = now

    def _sweep(self, now: float) -> None:
        """Forget every address that holds no session and whose bucket is full again."""
        self._lastSweep = now
        for client in [
            client
            for client, entry in self._addresses.items()
            if entry.sessions <= 0
            and (entry.rate == 0 or now - entry.stamp >= RATE_PERIOD)
            and not entry.logged.quiet(now, self.logInterval)
        ]:
            del self._addresses[client]

    def _logRefusal(self, entry: _Address, now: float, client: str, reason: str) -> None:
        more = entry.logged.suffix(now, self.logInterval)
        if more is not None:
            self.log.warn("refused connection from {client}: {reason}{more}", client=client, reason=reason, more=more)

    def _logGlobal(self, now: float, client: str) -> None:
        # One line per interval for the whole server: this limit is not any one address's doing.
        more = self._globalLogged.suffix(now, self.logInterval)
        if more is not None:
            self.log.warn(
                "refused connection from {client}: max_sessions ({limit}) reached{more}",
                client=client,
                limit=self.maxSessions,
                more=more,
            )
