"""The client side of DATA: dot-stuffing, against the server's DotReader."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from relay.smtp.dotreader import DotReader
from relay.smtp.dotwriter import DotWriter, stuff

lines = st.lists(
    st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
    | st.sampled_from([b".", b"..", b""]),
    max_size=30,
)


@settings(max_examples=500)
@given(lines, st.lists(st.integers(1, 50), min_size=1, max_size=10))
def test_any_body_at_any_chunking_survives_stuffing_and_unstuffing(bodyLines, sizes):
    body = b"".join(line + b"\r\n" for line in bodyLines)
    writer = DotWriter()
    wire = b""
    position, i = 0, 0
    while position < len(body):
        size = sizes[i % len(sizes)]
        wire += writer.feed(body[position : position + size])
        position += size
        i += 1
    wire += writer.end()
    received: list[bytes] = []
    reader = DotReader(received.append)
    assert reader.feed(wire) == len(wire)  # the end marker is the last thing
    assert reader.error is None
    assert b"".join(received) == body


def test_body_without_final_crlf_gets_one():
    assert stuff(b"no newline") == b"no newline\r\n.\r\n"
    assert stuff(b"") == b".\r\n"
    assert stuff(b".\r\n") == b"..\r\n.\r\n"
