"""
Recipient domain to delivery backend.

The router only maps; it never delivers.  Grouping recipients by backend lets
one attempt carry every recipient that goes the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from relay.envelope import Recipient


class Router:
    def __init__(self, route: Callable[[str], str | None], backends: Mapping[str, Any]) -> None:
        self._route = route
        self.backends = dict(backends)

    def backendName(self, address: str) -> str | None:
        domain = address.rpartition("@")[2].lower()
        return self._route(domain)

    def backendFor(self, address: str) -> tuple[str, Any] | None:
        """The name and backend C{address} is routed to, or C{None}."""
        name = self.backendName(address)
        if name is None or name not in self.backends:
            return None
        return name, self.backends[name]

    def group(self, recipients: Iterable[Recipient]) -> tuple[dict[str, list[Recipient]], list[Recipient]]:
        """
        @return: recipients by backend name, and those no route covers (a
            configuration change since they were accepted).
        """
        groups: dict[str, list[Recipient]] = {}
        unrouted: list[Recipient] = []
        for recipient in recipients:
            name = self.backendName(recipient.address)
            if name is None or name not in self.backends:
                unrouted.append(recipient)
            else:
                groups.setdefault(name, []).append(recipient)
        return groups, unrouted
