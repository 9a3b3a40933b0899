"""
The client side of DATA: dot-stuffing a body streamed in chunks of any size.

A line that begins with "." goes out with one more "." (RFC 5321 4.5.2).
Line starts can fall anywhere in a chunk, or on the boundary between two; the
writer remembers the last two bytes it saw, so a CRLF split across chunks is
still found.  The body is sent otherwise byte for byte.
"""

from __future__ import annotations


class DotWriter:
    def __init__(self) -> None:
        # The body starts as if after a CRLF: a leading "." is stuffed too.
        self._tail = b"\r\n"
        self._empty = True

    def feed(self, chunk: bytes) -> bytes:
        """The stuffed form of C{chunk}, to send now."""
        if not chunk:
            return b""
        self._empty = False
        tail = self._tail
        work = tail + chunk
        # Every insertion lands after a CRLF, so at index >= 2 = len(tail):
        # never inside the tail, which was already sent.
        stuffed = work.replace(b"\r\n.", b"\r\n..")
        self._tail = work[-2:]
        return stuffed[len(tail) :]

    def end(self) -> bytes:
        """What closes the body: a CRLF if the body did not end with one, then ".CRLF"."""
        if self._empty or self._tail == b"\r\n":
            return b".\r\n"
        return b"\r\n.\r\n"


def stuff(body: bytes) -> bytes:
    """The whole DATA payload of C{body}, for tests and small messages."""
    writer = DotWriter()
    return writer.feed(body) + writer.end()
