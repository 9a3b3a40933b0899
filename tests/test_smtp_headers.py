"""Counting trace headers as the message streams in."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from relay.smtp.headers import TraceCounter


def count(message: bytes, cuts: list[int]) -> tuple[int, bool]:
    counter = TraceCounter()
    start = 0
    for cut in sorted(set(cuts)) + [len(message)]:
        counter.feed(message[start:cut])
        start = max(start, cut)
    return counter.received, counter.done


def test_counts_only_the_header_section():
    message = b"Received: a\r\nRECEIVED: b\r\n\tcontinued\r\nX-Received: no\r\nSubject: x\r\n\r\nReceived: body\r\n"
    assert count(message, []) == (2, True)


def test_lf_only_message_and_no_body():
    assert count(b"Received: a\nReceived: b\n\nbody", []) == (2, True)
    assert count(b"Received: a\r\n", []) == (1, False)


@given(st.integers(min_value=0, max_value=60), st.lists(st.integers(min_value=0, max_value=2000), max_size=12))
def test_any_chunking_gives_the_same_count(n, cuts):
    message = b"".join(b"Received: from hop%d by x\r\n" % i for i in range(n)) + b"Subject: s\r\n\r\nReceived: x\r\n"
    assert count(message, cuts) == (n, True)
