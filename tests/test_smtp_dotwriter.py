"""
The client side of DATA: whatever the body and its chunking, what goes out has
CRLF line endings only, every line starting with a dot is stuffed, and neither
a strict receiver nor a lax one finds the end of the data before its real end.
"""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from relay.smtp.dotreader import DotReader
from relay.smtp.dotwriter import DotWriter, stuff

# Bodies built of the pieces smuggling is made of, and of arbitrary bytes.
PIECES = [b".", b"..", b"\r", b"\n", b"\r\n", b"\0", b"\n.", b"\r.", b".\r\n", b"\n.\n", b"x", b"MAIL FROM:<a@b>"]
bodies = st.lists(st.sampled_from(PIECES) | st.binary(max_size=20), max_size=40).map(b"".join)
chunkings = st.lists(st.integers(1, 50), min_size=1, max_size=10)

# A lax receiver ends the data on a line holding one dot, whatever ends the
# lines around it: CRLF, a bare LF or a bare CR, in any mix.
LAX_END = re.compile(rb"(?:\A|\r\n|\r|\n)\.(?:\r\n|\r|\n)")


def write(body: bytes, sizes: list[int]) -> bytes:
    writer = DotWriter()
    wire = b""
    position, i = 0, 0
    while position < len(body):
        size = sizes[i % len(sizes)]
        wire += writer.feed(body[position : position + size])
        position += size
        i += 1
    return wire + writer.end()


def normalised(body: bytes) -> bytes:
    """The body as the writer is meant to send it: no NUL, CRLF line endings, a final CRLF."""
    body = body.replace(b"\0", b"").replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    return body if not body or body.endswith(b"\r\n") else body + b"\r\n"


@settings(max_examples=1000, deadline=None)
@given(bodies, chunkings)
def test_only_crlf_line_endings_leave_whatever_the_body(body, sizes):
    wire = write(body, sizes)
    assert b"\0" not in wire
    assert wire.count(b"\r") == wire.count(b"\n") == wire.count(b"\r\n")


@settings(max_examples=1000, deadline=None)
@given(bodies, chunkings)
def test_a_strict_receiver_reads_the_normalised_body(body, sizes):
    wire = write(body, sizes)
    received: list[bytes] = []
    reader = DotReader(received.append)
    assert reader.feed(wire + b"QUIT\r\n") == len(wire)  # the end marker is the last thing written
    assert reader.error is None
    assert b"".join(received) == normalised(body)


@settings(max_examples=1000, deadline=None)
@given(bodies, chunkings)
def test_a_lax_receiver_finds_the_end_only_at_the_end(body, sizes):
    wire = write(body, sizes)
    ends = [m.end() for m in LAX_END.finditer(wire)]
    assert ends == [len(wire)]


def test_the_smuggling_sequences_are_defused():
    smuggled = b"Subject: x\r\n\r\nhello\n.\r\nMAIL FROM:<ceo@relay.localhost>\r\n"
    assert stuff(smuggled) == b"Subject: x\r\n\r\nhello\r\n..\r\nMAIL FROM:<ceo@relay.localhost>\r\n.\r\n"
    assert stuff(b"a\n.\nb") == b"a\r\n..\r\nb\r\n.\r\n"
    assert stuff(b"a\r.\rb") == b"a\r\n..\r\nb\r\n.\r\n"
    assert stuff(b"a\r\n\0.\r\nb\r\n") == b"a\r\n..\r\nb\r\n.\r\n"


def test_a_crlf_split_between_chunks_is_one_line_ending():
    writer = DotWriter()
    assert writer.feed(b"a\r") == b"a\r\n"
    assert writer.feed(b"\n.b\r") == b"..b\r\n"
    assert writer.feed(b"\n") == b""
    assert writer.feed(b"\n") == b"\r\n"  # a second LF is a line ending of its own
    assert writer.end() == b".\r\n"


def test_body_without_final_crlf_gets_one():
    assert stuff(b"no newline") == b"no newline\r\n.\r\n"
    assert stuff(b"") == b".\r\n"
    assert stuff(b".\r\n") == b"..\r\n.\r\n"
    assert stuff(b"\0") == b".\r\n"
    assert stuff(b"ends in a bare CR\r") == b"ends in a bare CR\r\n.\r\n"


def test_clean_chunks_pass_unchanged_but_for_stuffing():
    body = b"".join(b"line %d of text\r\n" % i for i in range(30)) + b".dot\r\n"
    writer = DotWriter()
    assert writer.feed(body) == body.replace(b"\r\n.", b"\r\n..")
