"""The DATA reader: unstuffing, the end marker, and its refusals, at any chunking."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from relay.smtp import dotreader
from relay.smtp.dotreader import DataError, DotReader, LineChecker


def read(stream: bytes, cuts: list[int] | None = None) -> tuple[bytes, int | None, DataError | None, bytes]:
    """Feed C{stream} in pieces; return (data, end offset in stream, error, rest)."""
    out: list[bytes] = []
    reader = DotReader(out.append)
    points = sorted(set(cuts or [])) + [len(stream)]
    start = 0
    for point in points:
        end = reader.feed(stream[start:point])
        if end is not None:
            return b"".join(out), start + end, reader.error, stream[start + end :]
        start = point
    return b"".join(out), None, reader.error, b""


def test_simple_message_and_rest():
    data, end, error, rest = read(b"a\r\n..b\r\n.\r\nQUIT\r\n")
    assert (data, error, rest) == (b"a\r\n.b\r\n", None, b"QUIT\r\n")


def test_empty_message():
    assert read(b".\r\n")[:3] == (b"", 3, None)


def test_no_end_consumes_everything():
    assert read(b"a\r\nb\r\n")[1] is None


def test_line_of_998_is_fine_999_is_not():
    assert read(b"x" * 998 + b"\r\n.\r\n")[2] is None
    assert read(b"x" * 999 + b"\r\n.\r\n")[2] is DataError.LINE_TOO_LONG
    # the dot added for transparency does not count
    assert read(b"." * 999 + b"\r\n.\r\n", [500, 999, 1000])[2] is None
    assert read(b"." * 1000 + b"\r\n.\r\n")[2] is DataError.LINE_TOO_LONG


def test_nul_is_refused_like_a_bare_line_ending():
    for cuts in ([], [2], [3], [4]):
        data, end, error, rest = read(b"ab\r\nc\0d\r\n.\r\nNEXT", cuts)
        assert (error, rest) == (DataError.NUL, b"NEXT")


def test_dot_line_after_overlong_fragment_is_not_the_end():
    # the '.' closes an over-long line: it is content, the end comes later
    data, end, error, rest = read(b"y" * 2000 + b".\r\n.\r\nNEXT", cuts=[1999])
    assert error is DataError.LINE_TOO_LONG
    assert rest == b"NEXT"


@settings(max_examples=500, deadline=None)
@given(
    st.lists(
        st.binary(max_size=80).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"").replace(b"\0", b"")),
        max_size=30,
    ),
    st.lists(st.integers(min_value=0, max_value=3000), max_size=10),
)
def test_stuffed_lines_round_trip_at_any_chunking(lines, cuts):
    body = b"".join(line + b"\r\n" for line in lines)
    stuffed = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)
    data, end, error, rest = read(stuffed + b".\r\nAFTER", cuts)
    assert error is None
    assert data == body
    assert rest == b"AFTER"


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=300), st.lists(st.integers(min_value=0, max_value=400), max_size=8))
def test_end_is_only_crlf_dot_crlf(payload, cuts):
    stream = b"\r\n" + payload  # make the first line of payload follow a CRLF too
    data, end, error, rest = read(stream, cuts)
    if end is not None:
        consumed = stream[:end]
        assert consumed.endswith(b"\r\n.\r\n") or consumed == b".\r\n"
        # the marker found is the first CRLF.CRLF of the stream
        assert consumed.find(b"\r\n.\r\n") == len(consumed) - 5
    else:
        assert b"\r\n.\r\n" not in stream


def readLineByLine(stream: bytes, cuts: list[int]) -> tuple[bytes, int | None, DataError | None, bytes]:
    """L{read} with the bulk path for clean chunks turned off."""
    original = DotReader._feedClean
    DotReader._feedClean = lambda self, data: dotreader._UNCLEAN  # type: ignore[method-assign]
    try:
        return read(stream, cuts)
    finally:
        DotReader._feedClean = original  # type: ignore[method-assign]


PIECES = [b"a", b"x" * 40, b".", b"\r", b"\n", b"\r\n", b"\r\n.", b".\r\n", b"y" * 997, b"\0"]


@settings(max_examples=1000, deadline=None)
@given(
    st.lists(st.sampled_from(PIECES), max_size=40),
    st.lists(st.integers(min_value=0, max_value=5000), max_size=8),
)
def test_bulk_path_agrees_with_line_by_line(pieces, cuts):
    """Whatever the chunking and content, the fast path changes no outcome."""
    stream = b"".join(pieces) + b"\r\n.\r\nREST"
    assert read(stream, cuts) == readLineByLine(stream, cuts)


def test_bulk_path_takes_clean_chunks_and_only_those():
    body = b"".join(b"line %d of text\r\n" % i for i in range(30))
    out: list[bytes] = []
    assert DotReader(out.append)._feedClean(body + b".\r\nQUIT") == len(body) + 3
    assert out == [body]
    for unclean in (b"a\r\n..b\r\n", b"a\nb\r\n", b"a\rb\r\n", b"x" * 999 + b"\r\n", b"x" * 1001, b"a\0\r\n"):
        assert DotReader(out.append)._feedClean(unclean) is dotreader._UNCLEAN


# -- the same rules for a BDAT body (no dots, no end marker) --------------------


def check(body: bytes, cuts: list[int] | None = None) -> DataError | None:
    checker = LineChecker()
    points = sorted(set(cuts or [])) + [len(body)]
    start = 0
    for point in points:
        checker.feed(body[start:point])
        start = max(start, point)
    return checker.finish()


def test_line_checker_examples():
    assert check(b"a\r\nb\r\n", [2]) is None  # a CRLF split between chunks
    assert check(b"a\r\nb\r\n", [1, 2, 3, 4, 5]) is None
    assert check(b"no final CRLF") is None
    assert check(b"a\nb\r\n") is DataError.BARE_LF
    assert check(b"a\r\n\nb\r\n", [2]) is DataError.BARE_LF
    assert check(b"a\rb\r\n", [2]) is DataError.BARE_CR
    assert check(b"ends in CR\r") is DataError.BARE_CR
    assert check(b"a\0b\r\n") is DataError.NUL
    assert check(b"x" * 998 + b"\r\n", [500, 999]) is None
    assert check(b"x" * 999 + b"\r\n", [999]) is DataError.LINE_TOO_LONG
    assert check(b"x" * 999 + b"\r\n", [1000]) is DataError.LINE_TOO_LONG
    assert check(b"x" * 999) is DataError.LINE_TOO_LONG  # it would need a CRLF to be sent
    assert check(b"hello\n.\r\nMAIL FROM:<ceo@relay.localhost>\r\n") is DataError.BARE_LF


def dotReaderVerdict(body: bytes) -> DataError | None:
    """What DATA would say of the same body, sent dot-stuffed with its final CRLF."""
    stuffed = (b"." if body[:1] == b"." else b"") + body.replace(b"\n.", b"\n..")
    if body and not body.endswith(b"\n"):
        stuffed += b"\r\n"
    return read(stuffed + b".\r\n")[2]


@settings(max_examples=2000, deadline=None)
@given(
    st.lists(st.sampled_from(PIECES + [b"z" * 500, b"\r\r", b"\n\n"]), max_size=40),
    st.lists(st.integers(min_value=0, max_value=5000), max_size=8),
)
def test_line_checker_agrees_with_the_data_reader(pieces, cuts):
    """One notion of a bad line: a BDAT body is refused exactly when DATA would refuse it."""
    body = b"".join(pieces)
    assert (check(body, cuts) is None) == (dotReaderVerdict(body) is None)


def test_after_a_line_split_between_chunks_the_rest_takes_the_bulk_path():
    body = b"".join(b"line %d of text\r\n" % i for i in range(30))
    out: list[bytes] = []
    reader = DotReader(out.append)
    assert reader.feed(b"first li") is None
    assert reader.feed(b"ne\r\n" + body + b"tail") is None
    assert out == [b"first line\r\n" + body]  # the line finished and the rest, in one piece
    assert reader.feed(b"\r\n.\r\nQUIT") == 5
    assert b"".join(out) == b"first line\r\n" + body + b"tail\r\n"


def bulkOnly(reader: DotReader) -> None:
    """Make C{reader} fail the test if a chunk falls back to the line-by-line path."""

    def refused(data: bytes) -> int | None:
        raise AssertionError(f"line-by-line path taken for {data[:40]!r}...")

    reader._feedLines = refused  # type: ignore[method-assign]


def test_clean_chunks_cut_anywhere_stay_on_the_bulk_path():
    # Text with dots inside lines, base64-like lines, empty lines; cut in the
    # middle of a line, between CR and LF, right after a CRLF, and at the
    # end marker's start: no chunk but the one holding a dot line is slow.
    body = b"".join(b"Line %d. Some text, a.b.c. 0123456789+/=\r\n\r\n" % i for i in range(200))
    stream = body + b".\r\nQUIT\r\n"
    for cut in (1, 7, body.index(b"\r") + 1, body.index(b"\n") + 1, 3000, len(body)):
        out: list[bytes] = []
        reader = DotReader(out.append)
        bulkOnly(reader)
        assert reader.feed(stream[:cut]) is None
        assert reader.feed(stream[cut:]) == len(stream) - cut - len(b"QUIT\r\n")
        assert (b"".join(out), reader.error) == (body, None)


def test_bulk_path_leaves_what_it_cannot_take_untouched():
    # A dot line, a bare CR or LF, a NUL or a long line: the chunk goes line by
    # line, from the state before it (the partial line included).
    for bad in (b"..x\r\n", b"a\rb\r\n", b"a\nb\r\n", b"a\0\r\n", b"x" * 999 + b"\r\n"):
        out: list[bytes] = []
        reader = DotReader(out.append)
        assert reader.feed(b"ok\r\npart") is None
        assert reader._feedClean(b"part" + b"ial\r\n" + bad + b"more\r\n") is dotreader._UNCLEAN
        assert (reader._partial, out) == (b"part", [b"ok\r\n"])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=4000), max_size=12))
def test_clean_message_is_read_whole_at_any_chunking(cuts):
    body = b"".join(b"%d: " % i + b"x" * (i * 37 % 990) + b"\r\n" for i in range(60))
    data, end, error, rest = read(body + b".\r\nNEXT", cuts)
    assert (data, error, rest) == (body, None, b"NEXT")
