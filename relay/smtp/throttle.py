"""
AUTH throttling per client address: what makes password guessing slow and
then pointless, without touching anyone else.

Each failed AUTH of an address costs it a growing wait before its 535 (like
Postfix's C{smtpd_error_sleep_time}, but growing): C{failure_delay} doubled
with each failure in C{failure_window}, up to C{max_failure_delay}.  The wait
is the session's own (the server sends the 535 late, reading nothing in the
meantime), so it costs no thread and slows only that client.  After
C{max_failures} failures in the window the address is locked out for
C{lockout}: the server answers its AUTH with C{454 4.7.0} without checking the
password, so a guesser gets no more answers and burns no more bcrypt time,
however many connections it opens.

The table is bounded: addresses are forgotten once their window (or lockout)
is over, and past C{MAX_ENTRIES} the least recently failing one goes first.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from twisted.logger import Logger

if TYPE_CHECKING:
    from relay.config import AuthSettings

__all__ = ["MAX_ENTRIES", "AuthThrottle"]

MAX_ENTRIES = 100_000
# Expired entries dropped per call, at most: the cost of one call stays bounded.
_SWEEP = 64


@dataclass
class _Entry:
    failures: deque[float] = field(default_factory=deque)
    lockedUntil: float = 0.0
    lastFailure: float = 0.0


def _shown(user: str) -> str:
    """A user name as logged: printable and bounded (it comes from the client)."""
    cleaned = "".join(c if c.isprintable() else "?" for c in user[:64])
    return cleaned + ("..." if len(user) > 64 else "")


class AuthThrottle:
    """
    Failure counts per client address, on C{clock}.

    @param settings: C{[auth]}: C{failure_delay}, C{max_failure_delay},
        C{max_failures}, C{failure_window} and C{lockout}, in seconds.
    """

    log = Logger()

    def __init__(self, clock: Any, settings: AuthSettings, maxEntries: int = MAX_ENTRIES) -> None:
        self.clock = clock
        self.settings = settings
        self.maxEntries = maxEntries
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def lockedOut(self, client: str) -> bool:
        """Whether AUTH from C{client} is refused without a check (454 4.7.0)."""
        entry = self._entries.get(client)
        return entry is not None and entry.lockedUntil > self.clock.seconds()

    def failed(self, client: str, user: str) -> float:
        """
        Count a failed AUTH; the seconds to wait before answering it.

        The C{max_failures}th failure in the window also locks the address out.
        """
        now = self.clock.seconds()
        settings = self.settings
        self._forget(now)
        entry = self._entries.pop(client, None) or _Entry()
        self._entries[client] = entry  # most recent last
        failures = entry.failures
        while failures and failures[0] <= now - settings.failure_window:
            failures.popleft()
        failures.append(now)
        entry.lastFailure = now
        count = len(failures)
        if count >= settings.max_failures and entry.lockedUntil <= now:
            entry.lockedUntil = now + settings.lockout
            failures.clear()  # a new window starts after the lockout
            self.log.warn(
                "AUTH locked out for {lockout:.0f}s: {count} failures in {window:.0f}s"
                " client={client} last_user={user}",
                lockout=settings.lockout,
                count=count,
                window=settings.failure_window,
                client=client,
                user=_shown(user),
            )
        while len(self._entries) > self.maxEntries:
            self._entries.popitem(last=False)
        return float(min(settings.failure_delay * 2 ** min(count - 1, 62), settings.max_failure_delay))

    def succeeded(self, client: str) -> None:
        """A correct password: that address starts again from nothing."""
        entry = self._entries.get(client)
        if entry is not None and entry.lockedUntil <= self.clock.seconds():
            del self._entries[client]

    def _forget(self, now: float) -> None:
        """Drop the oldest entries whose window and lockout are over (a few per call)."""
        window = self.settings.failure_window
        for _ in range(_SWEEP):
            if not self._entries:
                return
            client, entry = next(iter(self._entries.items()))
            if entry.lastFailure > now - window or entry.lockedUntil > now:
                return
            del self._entries[client]
