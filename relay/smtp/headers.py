"""
Watching the header section of a message as it streams past.

Only what the server must decide on the way in is looked at: how many trace
(Received) fields the message already carries, to stop mail loops (RFC 5321
6.3).  The body is never examined.
"""

from __future__ import annotations

_RECEIVED = b"received:"


class TraceCounter:
    """
    Count C{Received:} header fields until the end of the header section.

    Fed the message in arbitrary chunks; keeps at most a few bytes between
    chunks, and nothing once the headers are over.
    """

    def __init__(self) -> None:
        self.received = 0
        self.done = False
        self._prefix = b""  # the start of the current line, up to len("received:")
        self._midLine = False  # inside a line whose start was already judged

    def feed(self, data: bytes) -> None:
        pos = 0
        length = len(data)
        while pos < length and not self.done:
            nl = data.find(b"\n", pos)
            end = length if nl == -1 else nl
            if not self._midLine:
                self._prefix += data[pos : min(end, pos + len(_RECEIVED) - len(self._prefix))]
                if nl != -1 or len(self._prefix) >= len(_RECEIVED):
                    self._judge(complete=nl != -1)
            if nl == -1:
                return
            self._prefix = b""
            self._midLine = False
            pos = nl + 1

    def _judge(self, complete: bool) -> None:
        line = self._prefix
        if complete and line.rstrip(b"\r") == b"":
            self.done = True  # the empty line that ends the header section
            return
        if line.lower() == _RECEIVED:
            self.received += 1
        self._midLine = True
