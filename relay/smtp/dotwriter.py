"""
The client side of DATA: a body streamed in chunks of any size, made safe for
any receiver.

What leaves through this writer has only CRLF line endings and a dot stuffed
at the start of every line that begins with one (RFC 5321 4.5.2), whatever it
is fed: relayed bodies, DSNs, or anything a plugin produces.

- A bare LF or a bare CR becomes CRLF.  A CR at the end of one chunk and an LF
  at the start of the next are one CRLF.  Bodies that came through our own
  server never have bare line endings (it refuses them), but envelopes stored
  by older versions, reports and plugins may; sent as they are, a next hop that
  ends data on "<LF>.<CRLF>" or "<LF>.<LF>" would read the rest as commands
  (SMTP smuggling).  With every line ending a CRLF and every line that starts
  with a dot stuffed, the only line consisting of a single dot is the end
  marker, however lax the receiver.
- NUL octets are dropped.  RFC 5321 forbids them in text, our server refuses
  them outside BODY=BINARYMIME (which never comes here: it goes only to a
  CHUNKING peer, with BDAT), and a receiver that truncates at or strips NUL
  could otherwise read a line such as "<NUL>." differently from us.

The writer remembers only whether the last octet it saw was a CR and whether
output is at the start of a line, so the work per chunk is proportional to the
chunk, and a clean chunk (the usual one) costs three C-level scans.
"""

from __future__ import annotations

import re

_CR = 0x0D
_LF = 0x0A
_DOT = 0x2E


class LineEndings:
    """
    A text body made CRLF-only, chunk by chunk: bare CR and bare LF become
    CRLF, NUL is dropped.  What the DATA writer sends, and what BDAT sends of
    a body that is not BINARYMIME, so that no next hop ever sees a line
    ending it could read otherwise than we do.
    """

    def __init__(self) -> None:
        # The last octet fed was a CR, already sent as CRLF: an LF right after
        # it completes that same line ending and is dropped.
        self._cr = False

    def feed(self, chunk: bytes) -> bytes:
        if b"\0" in chunk:
            chunk = chunk.replace(b"\0", b"")
        if not chunk:
            return b""
        if self._cr:
            self._cr = False
            if chunk[0] == _LF:
                chunk = chunk[1:]
                if not chunk:
                    return b""
        bareCR = _BARE_CR.search(chunk)
        if bareCR is not None and bareCR.start() == len(chunk) - 1 and _BARE_LF.search(chunk) is None:
            # Only the last octet, a CR whose LF (if any) starts the next
            # chunk: sent as CRLF now, and that LF dropped (the usual case
            # of a block boundary inside a line ending).
            self._cr = True
            return chunk + b"\n"
        if bareCR is not None or _BARE_LF.search(chunk) is not None:
            # Some CR or LF stands alone: every line ending becomes CRLF.
            self._cr = chunk[-1] == _CR
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
        return chunk


# A CR without an LF after it, searched from CR to CR; an LF without a CR
# before it, from LF to LF; a line (after a CRLF) that starts with a dot.
# Each is a scan at C speed to the next CR or LF: a clean 64 KiB chunk
# costs three such scans.
_BARE_CR = re.compile(rb"\r(?!\n)")
_BARE_LF = re.compile(rb"\n(?<!\r\n)")
_DOT_LINE = re.compile(rb"\r\n\.")


class DotWriter:
    def __init__(self) -> None:
        self._endings = LineEndings()
        # The body starts as if after a CRLF: a leading "." is stuffed too.
        self._lineStart = True

    def feed(self, chunk: bytes) -> bytes:
        """The normalised, stuffed form of C{chunk}, to send now."""
        chunk = self._endings.feed(chunk)
        if not chunk:
            return b""
        # Every line ending is now a CRLF: stuff the dot that starts a line.
        out = chunk.replace(b"\r\n.", b"\r\n..") if _DOT_LINE.search(chunk) else chunk
        if self._lineStart and out[0] == _DOT:
            out = b"." + out
        self._lineStart = out.endswith(b"\r\n")
        return out

    def end(self) -> bytes:
        """What closes the body: a CRLF if the body did not end with one, then ".CRLF"."""
        if self._lineStart:
            return b".\r\n"
        return b"\r\n.\r\n"


def stuff(body: bytes) -> bytes:
    """The whole DATA payload of C{body}, for tests and small messages."""
    writer = DotWriter()
    return writer.feed(body) + writer.end()
