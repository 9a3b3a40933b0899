"""
The DATA stream: dot-unstuffing and the end-of-data marker, fed in chunks.

Only CRLF "." CRLF ends the data (RFC 5321 section 4.1.1.4).  A bare LF or bare
CR never ends a line and never ends the data: a message containing one is
refused once its real end arrives, which is what keeps SMTP smuggling out
(a "<LF>.<LF>" that another MTA would take for the end is content here, and the
message carrying it is rejected).  An over-long line is refused the same way,
and because the reader keeps scanning for the real end, the rest of the body
never turns into commands.

A NUL octet is refused the same way: RFC 5321 forbids it in text, and some
next hops truncate a line at it or drop it.  Only BODY=BINARYMIME may carry
NUL, bare CR or bare LF, and such a body comes with BDAT, never through DATA.

L{LineChecker} applies the same rules to a BDAT body of 7BIT or 8BITMIME,
which has no dots to unstuff and no end marker: what a bad line is, is decided
here alone.

Memory stays bounded: a line fragment is kept only up to the line limit.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable

MAX_LINE = 1000  # octets, CRLF included (RFC 5321 section 4.5.3.1.6)


class DataError(enum.Enum):
    BARE_LF = "bare LF line ending"
    BARE_CR = "bare CR in a line"
    LINE_TOO_LONG = "line longer than 998 octets"
    NUL = "NUL octet"


class DotReader:
    """
    Decode one message's DATA section.

    @ivar error: the first defect seen, or None.  Once set, nothing more is
        passed to the sink, but the stream is still read to its end.
    """

    def __init__(self, sink: Callable[[bytes], None], maxLine: int = MAX_LINE) -> None:
        self._sink = sink
        self._maxLine = maxLine
        self._partial = b""
        self._overlong = False
        self._afterCRLF = True  # the DATA command's own CRLF precedes the first line
        self.error: DataError | None = None

    def _fail(self, error: DataError) -> None:
        if self.error is None:
            self.error = error

    def feed(self, data: bytes) -> int | None:
        """
        Consume C{data}.

        @return: None if the end has not been seen (everything was consumed),
            else the offset just past the terminating C{".\\r\\n"}: the bytes
            after it are the next commands.
        """
        if self.error is None and not self._overlong:
            # A chunk seldom ends at a line end: the line the last one began
            # (at most a line's worth) goes first, and the whole takes the
            # bulk path if it is clean.
            partial = self._partial
            fast = self._feedClean(partial + data if partial else data)
            if fast is not _UNCLEAN:
                return None if fast is None else fast - len(partial)  # type: ignore[operator]
        return self._feedLines(data)

    def _feedLines(self, data: bytes) -> int | None:
        """L{feed}, a line at a time: for chunks the bulk path does not take."""
        out: list[bytes] = []
        pos = 0
        end: int | None = None
        length = len(data)
        while pos < length:
            nl = data.find(b"\n", pos)
            if nl == -1:
                self._keepFragment(data[pos:])
                break
            line = self._partial + data[pos : nl + 1]
            # The limit does not count a dot added for transparency (RFC 5321 4.5.3.1.6).
            overlong = self._overlong or len(line) > self._maxLine + (line[:1] == b".")
            self._partial = b""
            self._overlong = False
            pos = nl + 1
            crlf = line.endswith(b"\r\n")
            if crlf and self._afterCRLF and not overlong and line == b".\r\n":
                end = pos
                break
            self._afterCRLF = crlf
            if overlong:
                self._fail(DataError.LINE_TOO_LONG)
            elif not crlf:
                self._fail(DataError.BARE_LF)
            elif line.find(b"\r", 0, len(line) - 2) != -1:
                self._fail(DataError.BARE_CR)
            elif line.find(b"\0") != -1:
                self._fail(DataError.NUL)
            if self.error is None:
                out.append(line[1:] if line[:1] == b"." else line)
        if out:
            self._sink(b"".join(out))
        return end

    def _feedClean(self, data: bytes) -> int | None | object:
        """
        The usual chunk, at C-scan speed rather than a line at a time: it
        starts a line, and every line it completes ends in CRLF, has no
        other CR and no NUL, starts with no dot and is within the limit.
        Anything else is C{_UNCLEAN}, and the line-by-line reader takes the
        chunk; nothing is consumed or changed then.

        Two regular expressions with a one-octet literal prefix (a fast scan
        to each CR, to each LF) find the first dot line or bare CR, and the
        first bare LF; the line limit is checked by hopping from line start
        to the last LF within reach, some 64 steps for a 64 KiB chunk.
        """
        if data[:1] == b".":
            return 3 if data[:3] == b".\r\n" else _UNCLEAN
        found = _DOT_LINE_OR_BARE_CR.search(data)
        if found is not None and found.start() == len(data) - 1:
            found = None  # a CR that ends the chunk: its LF may come with the next one
        if found is None:
            cut = data.rfind(b"\n") + 1
            end = None
        else:
            at = found.start()
            if data[at + 1 : at + 5] != b"\n.\r\n":
                return _UNCLEAN  # a bare CR, a dot line to unstuff, or the end marker cut short
            cut = at + 2
            end = at + 5
        if cut == 0:
            if end is None and len(data) > self._maxLine:
                return _UNCLEAN
            self._partial = data
            return end
        if _BARE_LF.search(data, 0, cut) is not None or data.find(b"\0", 0, cut) != -1:
            return _UNCLEAN
        limit = self._maxLine
        start = 0
        while cut - start > limit:
            # The line at start ends within the limit: so does every line up to the last LF in reach.
            start = data.rfind(b"\n", start, start + limit) + 1
            if not start:
                return _UNCLEAN
        if end is None and len(data) - cut > limit:
            return _UNCLEAN
        self._sink(data if cut == len(data) else data[:cut])
        self._partial = data[cut:] if end is None else b""
        return end

    def _keepFragment(self, fragment: bytes) -> None:
        if self._overlong or len(self._partial) + len(fragment) > self._maxLine:
            # Past the limit: the line is refused anyway.  Keep its last octet
            # so a CR right before the coming LF is still recognised.
            self._overlong = True
            self._partial = (self._partial + fragment)[-1:]
        else:
            self._partial += fragment


_UNCLEAN = object()

# The first CR of a chunk that is followed by a dot line (LF, dot) or stands
# alone (no LF after it): searched from CR to CR.
_DOT_LINE_OR_BARE_CR = re.compile(rb"\r(?:\n\.|(?!\n))")
# An LF without its CR: searched from LF to LF.
_BARE_LF = re.compile(rb"\n(?<!\r\n)")


class LineChecker:
    """
    The rules of L{DotReader} for a body that comes without dot-stuffing (BDAT
    of 7BIT or 8BITMIME): every line ends in CRLF, has no other CR, no NUL,
    and is at most C{maxLine} octets with its CRLF.  The body is not changed
    and not held back: the checker only looks, one chunk after another, and
    a CRLF split between two chunks is one line ending.

    @ivar error: the first defect seen (by kind, in the order of the checks
        below within a chunk), or None.
    """

    def __init__(self, maxLine: int = MAX_LINE) -> None:
        self._maxLine = maxLine
        self._line = 0  # octets of the current, unfinished line
        self._cr = False  # the last octet seen was a CR
        self.error: DataError | None = None

    def feed(self, data: bytes) -> None:
        if self.error is not None or not data:
            return
        start = 0
        if self._cr:
            # The line so far ends in a CR, counted in self._line.
            if data[0] != 0x0A:
                self.error = DataError.BARE_CR
                return
            if self._line + 1 > self._maxLine:
                self.error = DataError.LINE_TOO_LONG
                return
            self._cr = False
            self._line = 0
            start = 1
        lineFeeds = data.count(b"\n", start)
        crlf = data.count(b"\r\n", start)
        trailingCR = data[-1] == 0x0D and len(data) > start
        if lineFeeds != crlf:
            self.error = DataError.BARE_LF
            return
        if data.count(b"\r", start) - trailingCR != crlf:
            self.error = DataError.BARE_CR
            return
        if data.find(b"\0", start) != -1:
            self.error = DataError.NUL
            return
        self._cr = trailingCR
        if self._line + len(data) - start <= self._maxLine:
            # No line this chunk touches can be over the limit yet.
            self._line = len(data) - data.rfind(b"\n") - 1 if lineFeeds else self._line + len(data) - start
            return
        parts = data[start:].split(b"\n")
        if len(parts) > 1:
            longest = max(self._line + len(parts[0]), max(map(len, parts[1:-1]), default=0)) + 1
            self._line = len(parts[-1])
            if longest > self._maxLine:
                self.error = DataError.LINE_TOO_LONG
        else:
            self._line += len(parts[0])
        if self._line > self._maxLine:
            self.error = DataError.LINE_TOO_LONG

    def finish(self) -> DataError | None:
        """The verdict once the last chunk is in: a CR at the very end stands alone."""
        if self.error is None and self._cr:
            self.error = DataError.BARE_CR
        elif self.error is None and self._line and self._line + 2 > self._maxLine:
            self.error = DataError.LINE_TOO_LONG
        return self.error
