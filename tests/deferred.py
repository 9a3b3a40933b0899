"""Reading Deferreds in synchronous tests."""

from __future__ import annotations

from typing import Any

from twisted.python.failure import Failure


def result(d: Any) -> Any:
    """The value a Deferred fired with (re-raising its failure); it must have fired."""
    outcome: list[Any] = []
    d.addBoth(outcome.append)
    assert outcome, "Deferred did not fire"
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    return outcome[0]
