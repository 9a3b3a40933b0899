"""The command parser: tables of lines, and properties over any bytes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.address import Mailbox
from relay.smtp.parser import (
    Auth,
    Bdat,
    Helo,
    Mail,
    Rcpt,
    Reject,
    Simple,
    Unknown,
    WithText,
    parseCommand,
    serialize,
)


@pytest.mark.parametrize(
    "line, expected",
    [
        (b"EHLO client.example", Helo("EHLO", "client.example")),
        (b"helo [192.0.2.1]", Helo("HELO", "[192.0.2.1]")),
        (b"MAIL FROM:<a@Example.ORG>", Mail(Mailbox("a", "example.org"))),
        (
            b"mail from: <a@b.example> SIZE=100 body=8bitmime",
            Mail(Mailbox("a", "b.example"), (("SIZE", "100"), ("BODY", "8bitmime"))),
        ),
        (b"MAIL FROM:<>", Mail(None)),
        (b"MAIL FROM:a@b.example", Mail(Mailbox("a", "b.example"))),
        (b'MAIL FROM:<"john doe"@b.example>', Mail(Mailbox("john doe", "b.example"))),
        (b'MAIL FROM:<"a>b"@b.example> SIZE=1', Mail(Mailbox("a>b", "b.example"), (("SIZE", "1"),))),
        (b"MAIL FROM:<@relay.example,@r2.example:u@b.example>", Mail(Mailbox("u", "b.example"))),
        (b"RCPT TO:<u@[127.0.0.1]>", Rcpt(Mailbox("u", "[127.0.0.1]"))),
        (b"RCPT TO:<u@[IPv6:::1]>", Rcpt(Mailbox("u", "[IPv6:::1]"))),
        (b"RCPT TO:<Postmaster>", Rcpt(None)),
        (
            b"RCPT TO:<u@b.example> NOTIFY=SUCCESS,FAILURE",
            Rcpt(Mailbox("u", "b.example"), (("NOTIFY", "SUCCESS,FAILURE"),)),
        ),
        (b"DATA", Simple("DATA")),
        (b"rset", Simple("RSET")),
        (b"NOOP", WithText("NOOP", "")),
        (b"NOOP anything at all", WithText("NOOP", "anything at all")),
        (b"VRFY root", WithText("VRFY", "root")),
        (b"AUTH PLAIN AGEAYg==", Auth("PLAIN", "AGEAYg==")),
        (b"AUTH login", Auth("LOGIN", None)),
        (b"BDAT 100 LAST", Bdat(100, True)),
        (b"BDAT 0", Bdat(0, False)),
        (b"XYZZY", Unknown("XYZZY")),
    ],
)
def test_accepted(line, expected):
    assert parseCommand(line) == expected


@pytest.mark.parametrize(
    "line, code",
    [
        (b"", "500 5.5.2"),
        (b" NOOP", "500 5.5.2"),
        (b"EHLO", "501 5.5.4"),
        (b"EHLO a b", "501 5.5.4"),
        (b"MAIL <a@b.example>", "501 5.5.4"),
        (b"MAIL FROM:<a@b.example", "501 5.5.4"),
        (b"MAIL FROM:<a@b.example>x", "501 5.5.4"),
        (b"MAIL FROM:<a>", "501 5.1.3"),
        (b"MAIL FROM:<a..b@c.example>", "501 5.1.3"),
        (b"MAIL FROM:<a@-bad.example>", "501 5.1.3"),
        (b"RCPT TO:<>", "501 5.1.3"),
        (b"RCPT TO:<" + b"a" * 65 + b"@b.example>", "501 5.1.3"),
        (b"MAIL FROM:<a@b.example> SIZE=1 SIZE=2", "555 5.5.4"),
        (b"MAIL FROM:<a@b.example> =x", "555 5.5.4"),
        (b"MAIL FROM:<a@b.example> SIZE=", "555 5.5.4"),
        ("MAIL FROM:<jörg@b.example>".encode(), "553 5.6.7"),
        ("NOOP ä".encode(), "500 5.5.2"),
        (b"DATA now", "501 5.5.4"),
        (b"VRFY", "501 5.5.4"),
        (b"BDAT x", "501 5.5.4"),
        (b"BDAT 1 FIRST", "501 5.5.4"),
        (b"AUTH", "501 5.5.4"),
        (b"NOOP\x00", "500 5.5.2"),
        (b"NOOP\r", "500 5.5.2"),
    ],
)
def test_rejected(line, code):
    result = parseCommand(line)
    assert isinstance(result, Reject), result
    assert f"{result.status.code} {result.status.enhanced}" == code


def test_utf8_addresses_under_smtputf8():
    line = "MAIL FROM:<jörg@bücher.example> SMTPUTF8".encode()
    assert parseCommand(line) == Mail(Mailbox("jörg", "bücher.example"), (("SMTPUTF8", None),))
    assert parseCommand("RCPT TO:<ü@x.example>".encode(), utf8=True) == Rcpt(Mailbox("ü", "x.example"))
    assert isinstance(parseCommand("RCPT TO:<ü@x.example>".encode()), Reject)


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=600))
def test_any_bytes_never_raise(line):
    result = parseCommand(line)
    assert result is not None


_words = st.sampled_from(
    [
        b"MAIL FROM:",
        b"RCPT TO:",
        b"EHLO ",
        b"HELO ",
        b"DATA",
        b"AUTH ",
        b"BDAT ",
        b"VRFY ",
        b"<",
        b">",
        b"@",
        b'"',
        b"\\",
        b" ",
        b"=",
        b".",
        b"SIZE=",
        b"a",
        b"B",
        b"1",
        b"[",
        b"]",
        b":",
        b",",
        "é".encode(),
    ]
)


@settings(max_examples=3000, deadline=None)
@given(st.lists(_words, max_size=20).map(b"".join), st.booleans())
def test_accepted_commands_round_trip(line, utf8):
    command = parseCommand(line, utf8=utf8)
    if isinstance(command, Reject):
        return
    again = parseCommand(serialize(command), utf8=utf8)
    assert again == command
