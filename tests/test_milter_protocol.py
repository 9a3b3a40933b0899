"""The milter wire codec: tables of packets, and properties over any bytes in any split."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.milter import protocol as P


def test_packet_framing():
    assert P.packet(P.CONTINUE) == b"\0\0\0\x01c"
    assert P.encodeOptneg(6, 0x1FF, 0x1FFFFF) == b"\0\0\0\x0dO" + struct.pack("!III", 6, 0x1FF, 0x1FFFFF)
    assert P.encodeHelo("client.example") == b"\0\0\0\x10Hclient.example\0"
    assert P.encodeConnect("[192.0.2.1]", P.FAMILY_INET, 25, "192.0.2.1") == (
        b"\0\0\0\x1aC[192.0.2.1]\x004\x00\x19192.0.2.1\0"
    )
    assert P.encodeConnect("x", P.FAMILY_UNKNOWN, 0, "") == b"\0\0\0\x04Cx\0U"
    assert P.encodeMacros(P.MAIL, [("i", "Q1"), ("{mail_addr}", "a@b")]) == (b"\0\0\0\x17DMi\0Q1\0{mail_addr}\0a@b\0")
    assert P.encodeMail(["<a@b.example>", "SIZE=10"]) == b"\0\0\0\x17M<a@b.example>\0SIZE=10\0"
    assert P.encodeHeader("Subject", "hi\n\tthere") == b"\0\0\0\x13LSubject\0hi\n\tthere\0"
    assert P.encodeSimple(P.BODYEOB) == b"\0\0\0\x01E"


def test_nul_in_a_string_is_refused():
    with pytest.raises(ValueError):
        P.encodeHelo("a\0b")


def test_body_chunk_bound():
    assert len(P.encodeBody(b"x" * P.BODY_CHUNK)) == 5 + P.BODY_CHUNK
    with pytest.raises(ValueError):
        P.encodeBody(b"x" * (P.BODY_CHUNK + 1))


@pytest.mark.parametrize(
    "command, data, expected",
    [
        (P.CONTINUE, b"", P.Simple(P.CONTINUE)),
        (P.ACCEPT, b"", P.Simple(P.ACCEPT)),
        (P.REJECT, b"", P.Simple(P.REJECT)),
        (P.TEMPFAIL, b"", P.Simple(P.TEMPFAIL)),
        (P.DISCARD, b"", P.Simple(P.DISCARD)),
        (P.SKIP, b"", P.Simple(P.SKIP)),
        (P.PROGRESS, b"", P.Simple(P.PROGRESS)),
        (P.REPLYCODE, b"554 5.7.1 Spam detected\0", P.ReplyCode(554, "5.7.1", "Spam detected")),
        (P.REPLYCODE, b"450 try later\0", P.ReplyCode(450, "4.7.1", "try later")),
        (P.REPLYCODE, b"550-5.7.1 one\r\n550 5.7.1 two\0", P.ReplyCode(550, "5.7.1", "one two")),
        (P.ADDHEADER, b"X-Spam\0yes\0", P.HeaderChange(P.ADDHEADER, 0, "X-Spam", "yes")),
        (P.INSHEADER, b"\0\0\0\x00DKIM-Signature\0v=1\0", P.HeaderChange(P.INSHEADER, 0, "DKIM-Signature", "v=1")),
        (P.CHGHEADER, b"\0\0\0\x02Subject\0\0", P.HeaderChange(P.CHGHEADER, 2, "Subject", "")),
        (P.ADDRCPT, b"<x@y.example>\0", P.RecipientChange(P.ADDRCPT, "<x@y.example>")),
        (P.DELRCPT, b"<x@y.example>\0", P.RecipientChange(P.DELRCPT, "<x@y.example>")),
        (P.ADDRCPT_PAR, b"<x@y>\0NOTIFY=NEVER\0", P.RecipientChange(P.ADDRCPT_PAR, "<x@y>", "NOTIFY=NEVER")),
        (P.CHGFROM, b"<x@y>\0", P.RecipientChange(P.CHGFROM, "<x@y>")),
        (P.REPLBODY, b"new body\r\n", P.ReplaceBody(b"new body\r\n")),
        (P.QUARANTINE, b"virus found\0", P.Quarantine("virus found")),
        (
            P.OPTNEG,
            struct.pack("!III", 6, 0x21, 0x400) + b"\0\0\0\x02i {mail_addr}\0",
            P.Options(6, 0x21, 0x400, {2: ("i", "{mail_addr}")}),
        ),
    ],
)
def test_replies(command, data, expected):
    assert P.decodeReply(command, data) == expected


@pytest.mark.parametrize(
    "command, data",
    [
        (b"Z", b""),
        (P.CONTINUE, b"x"),
        (P.REPLYCODE, b"250 ok\0"),
        (P.REPLYCODE, b"554 no NUL"),
        (P.REPLYCODE, b"5x4 bad\0"),
        (P.REPLYCODE, b"550-a\r\n451 b\0"),
        (P.REPLYCODE, b"\0"),
        (P.ADDHEADER, b"X\0"),
        (P.ADDHEADER, b"\0value\0"),
        (P.INSHEADER, b"\0\0\0"),
        (P.CHGHEADER, b"\0\0\0\x01Subject\0x\0extra"),
        (P.ADDRCPT, b"a\0b\0"),
        (P.OPTNEG, b"\0\0\0\x06\0\0"),
        (P.OPTNEG, struct.pack("!III", 6, 0, 0) + b"\0\0\0\x01macros-without-nul"),
        (P.QUARANTINE, b""),
    ],
)
def test_bad_replies(command, data):
    with pytest.raises(P.MilterProtocolError):
        P.decodeReply(command, data)


def test_reply_text_is_made_printable():
    assert P.decodeReply(P.REPLYCODE, b"550 5.7.1 a\tb\x01c\0").text == "a?b?c"


def test_commands_round_trip():
    cases = [
        (P.encodeOptneg(6, 1, 2), P.Command(P.OPTNEG, (6, 1, 2))),
        (P.encodeMacros(P.CONNECT, [("j", "mx"), ("{client_addr}", "::1")]), None),
        (P.encodeConnect("[::1]", P.FAMILY_INET6, 4000, "::1"), P.Command(P.CONNECT, ("[::1]", b"6", 4000, "::1"))),
        (P.encodeConnect("h", P.FAMILY_UNKNOWN, 0, ""), P.Command(P.CONNECT, ("h", b"U", 0, ""))),
        (P.encodeHelo("c.example"), P.Command(P.HELO, ("c.example",))),
        (P.encodeMail(["<>"]), P.Command(P.MAIL, ("<>",))),
        (P.encodeRcpt(["<a@b>", "NOTIFY=NEVER"]), P.Command(P.RCPT, ("<a@b>", "NOTIFY=NEVER"))),
        (P.encodeHeader("Subject", "caf\udce9"), P.Command(P.HEADER, ("Subject", "caf\udce9"))),
        (P.encodeBody(b"\0\xff body"), P.Command(P.BODY, (b"\0\xff body",))),
        (P.encodeSimple(P.EOH), P.Command(P.EOH)),
        (P.encodeSimple(P.QUIT), P.Command(P.QUIT)),
    ]
    reader = P.PacketReader()
    for wire, expected in cases:
        [(command, data)] = reader.feed(wire)
        decoded = P.decodeCommand(command, data)
        if expected is None:
            assert decoded == P.Command(P.MACRO, (P.CONNECT, (("j", "mx"), ("{client_addr}", "::1"))))
        else:
            assert decoded == expected


def test_reader_refuses_bad_lengths():
    with pytest.raises(P.MilterProtocolError):
        P.PacketReader().feed(b"\0\0\0\0c")
    with pytest.raises(P.MilterProtocolError):
        P.PacketReader().feed(struct.pack("!I", P.MAX_PACKET + 1))
    reader = P.PacketReader(maxPacket=10)
    assert reader.feed(b"\0\0\0\x0a") == []
    assert reader.pending == 4


# -- properties ---------------------------------------------------------------

_text = st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=30)

_replies = st.one_of(
    st.sampled_from([P.CONTINUE, P.ACCEPT, P.REJECT, P.TEMPFAIL, P.DISCARD, P.SKIP, P.PROGRESS]).map(P.encodeReply),
    st.builds(lambda n, v: P.encodeReply(P.ADDHEADER, n, v), _text, _text),
    st.builds(lambda i, n, v: P.encodeReply(P.INSHEADER, i, n, v), st.integers(0, 2**32 - 1), _text, _text),
    st.builds(lambda a: P.encodeReply(P.ADDRCPT, a), _text),
    st.builds(lambda b: P.encodeReply(P.REPLBODY, b), st.binary(max_size=200)),
    st.builds(lambda r: P.encodeReply(P.QUARANTINE, r), _text),
)


@given(st.lists(_replies, max_size=8), st.lists(st.integers(0, 400), max_size=10))
@settings(max_examples=300, deadline=None)
def test_any_split_gives_the_same_packets(packets, cuts):
    wire = b"".join(packets)
    whole = P.PacketReader().feed(wire)
    assert len(whole) == len(packets)
    reader = P.PacketReader()
    got = []
    start = 0
    for cut in sorted(set(c for c in cuts if c < len(wire))) + [len(wire)]:
        got += reader.feed(wire[start:cut])
        start = cut
    assert got == whole
    assert reader.pending == 0


@given(st.binary(max_size=600), st.lists(st.integers(0, 600), max_size=6))
@settings(max_examples=500, deadline=None)
def test_any_bytes_never_raise_anything_but_protocol_errors(data, cuts):
    reader = P.PacketReader(maxPacket=4096)
    start = 0
    try:
        for cut in sorted(set(c for c in cuts if c < len(data))) + [len(data)]:
            for command, payload in reader.feed(data[start:cut]):
                for decode in (P.decodeReply, P.decodeCommand):
                    try:
                        decode(command, payload)
                    except P.MilterProtocolError:
                        pass
            start = cut
    except P.MilterProtocolError:
        return
    assert reader.pending <= 4 + 4096


@given(
    st.sampled_from(
        sorted(
            P._SIMPLE_REPLIES
            | {
                P.OPTNEG,
                P.REPLYCODE,
                P.ADDHEADER,
                P.INSHEADER,
                P.CHGHEADER,
                P.ADDRCPT,
                P.DELRCPT,
                P.ADDRCPT_PAR,
                P.CHGFROM,
                P.REPLBODY,
                P.QUARANTINE,
                P.SETSYMLIST,
                b"\xff",
            }
        )
    ),
    st.binary(max_size=80),
)
@settings(max_examples=1000, deadline=None)
def test_decoders_over_any_data(command, data):
    for decode in (P.decodeReply, P.decodeCommand):
        try:
            decode(command, data)
        except P.MilterProtocolError:
            pass


@given(st.text(max_size=120))
@settings(max_examples=500, deadline=None)
def test_reply_codes_over_any_text(text):
    try:
        reply = P.parseReplyCode(text)
    except P.MilterProtocolError:
        return
    assert reply.code // 100 in (4, 5)
    assert reply.enhanced[0] == str(reply.code // 100)
    assert reply.text.isprintable()
