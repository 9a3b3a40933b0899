"""Server extensions and hardening: SMTPUTF8, DSN, CHUNKING, STARTTLS state, limits."""

from __future__ import annotations

from smtphelpers import Session

from relay.envelope import Recipient

MESSAGE = b"Subject: hi\r\n\r\nbody\r\n"


def transaction(
    s: Session, mail: bytes = b"MAIL FROM:<a@example.org>", rcpts: tuple[bytes, ...] = (b"RCPT TO:<u@localhost>",)
):
    s.ready()
    return s.codes(mail + b"\r\n" + b"".join(r + b"\r\n" for r in rcpts))


def test_ehlo_offers_extensions_helo_offers_none():
    s = Session()
    s.take()
    reply = s.send(b"EHLO c.example\r\n")
    for keyword in (b"SMTPUTF8", b"DSN", b"CHUNKING", b"BINARYMIME", b"8BITMIME", b"PIPELINING"):
        assert b"250-" + keyword + b"\r\n" in reply or b"250 " + keyword + b"\r\n" in reply, keyword
    assert b"STARTTLS" not in reply and b"AUTH" not in reply
    h = Session()
    h.take()
    h.send(b"HELO c.example\r\n")
    assert h.codes(b"MAIL FROM:<a@example.org> SIZE=10\r\n") == ["555 5.5.4"]
    assert h.codes(b"MAIL FROM:<a@example.org>\r\nBDAT 3 LAST\r\nabc") == ["250 2.1.0", "502 5.5.1"]


def test_smtputf8_transaction_stored_and_marked():
    s = Session(localDomains=frozenset({"localhost", "bücher.example"}), routes={"bücher.example": "local"})
    s.ready()
    assert s.codes("MAIL FROM:<jörg@example.org> SMTPUTF8\r\n".encode()) == ["250 2.1.0"]
    assert s.codes("RCPT TO:<ü@bücher.example>\r\n".encode()) == ["250 2.1.5"]
    s.send(b"DATA\r\n")
    assert s.codes(MESSAGE + b".\r\n") == ["250 2.0.0"]
    envelope = s.accepted[0]
    assert envelope.smtputf8 and envelope.sender == "jörg@example.org"
    assert envelope.recipients[0].address == "ü@bücher.example"
    assert b"with UTF8SMTP id" in s.store.messages[envelope.queue_id][1]


def test_utf8_recipient_needs_smtputf8_transaction():
    s = Session()
    transaction(s)
    assert s.codes("RCPT TO:<ü@localhost>\r\n".encode()) == ["553 5.6.7"]


def test_dsn_parameters_validated_and_stored():
    s = Session(client="127.0.0.1")  # a client that may relay: its DSN requests are honoured as asked
    s.ready()
    assert s.codes(b"MAIL FROM:<a@example.org> RET=HDRS ENVID=abc+2Bdef\r\n") == ["250 2.1.0"]
    assert s.codes(b"RCPT TO:<u@localhost> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;u+2Bx@localhost\r\n") == ["250 2.1.5"]
    assert s.codes(b"RCPT TO:<v@localhost> NOTIFY=NEVER\r\n") == ["250 2.1.5"]
    assert s.codes(b"RCPT TO:<w@localhost> NOTIFY=NEVER,SUCCESS\r\n") == ["501 5.5.4"]
    assert s.codes(b"RCPT TO:<w@localhost> NOTIFY=SOMETIMES\r\n") == ["501 5.5.4"]
    assert s.codes(b"RCPT TO:<w@localhost> ORCPT=nosemicolon\r\n") == ["501 5.5.4"]
    assert s.codes(b"RCPT TO:<w@localhost> ORCPT=rfc822;bad+zz\r\n") == ["501 5.5.4"]
    s.send(b"DATA\r\n" + MESSAGE + b".\r\n")
    envelope = s.accepted[0]
    assert (envelope.ret, envelope.envid) == ("HDRS", "abc+def")
    assert envelope.recipients[0] == Recipient("u@localhost", notify=("SUCCESS", "DELAY"), orcpt="rfc822;u+x@localhost")
    assert envelope.recipients[1].notify == ("NEVER",)


def test_bad_mail_parameters():
    s = Session()
    s.ready()
    for line in (b"RET=ALL", b"ENVID=", b"BODY=9BIT", b"SMTPUTF8=yes", b"SIZE=ten", b"AUTH=<>"):
        # AUTH= only where AUTH is offered; an empty value is refused by the parser
        expected = "555 5.5.4" if line in (b"AUTH=<>", b"ENVID=") else "501 5.5.4"
        assert s.codes(b"MAIL FROM:<a@example.org> " + line + b"\r\n") == [expected], line


def test_bdat_chunks_then_last():
    s = Session()
    transaction(s)
    assert s.codes(b"BDAT 6\r\nSubjecBDAT 9\r\nt: x\r\n\r\nb") == ["250 2.0.0", "250 2.0.0"]
    assert s.codes(b"BDAT 3 LAST\r\nody") == ["250 2.0.0"]
    data = s.store.messages[s.accepted[0].queue_id][1]
    assert data.endswith(b"\r\nSubject: x\r\n\r\nbody")


def test_bdat_data_is_never_a_command_and_bare_lf_refused_unless_binarymime():
    for body in (b"", b" BODY=7BIT", b" BODY=8BITMIME"):
        s = Session()
        transaction(s, mail=b"MAIL FROM:<a@example.org>" + body)
        payload = b"QUIT\r\n.\r\nRSET\nx"
        assert s.codes(b"BDAT %d LAST\r\n" % len(payload) + payload + b"NOOP\r\n") == ["554 5.6.0", "250 2.0.0"]
        assert s.accepted == []
    s = Session()
    transaction(s, mail=b"MAIL FROM:<a@example.org> BODY=BINARYMIME")
    payload = b"QUIT\r\n.\r\nRSET\nx"
    assert s.codes(b"BDAT %d LAST\r\n" % len(payload) + payload + b"NOOP\r\n") == ["250 2.0.0", "250 2.0.0"]
    assert s.store.messages[s.accepted[0].queue_id][1].endswith(payload)  # byte for byte


def test_bdat_smuggling_refused_whatever_the_chunking():
    smuggled = b"Subject: x\r\n\r\nhello\n.\r\nMAIL FROM:<ceo@relay.localhost>\r\nRCPT TO:<v@example.net>\r\n"
    for cut in range(1, len(smuggled)):
        s = Session()
        transaction(s)
        first, second = smuggled[:cut], smuggled[cut:]
        replies = s.codes(b"BDAT %d\r\n" % len(first) + first)
        if replies == ["250 2.0.0"]:
            replies += s.codes(b"BDAT %d LAST\r\n" % len(second) + second)
            assert replies == ["250 2.0.0", "554 5.6.0"]
        else:
            assert replies == ["554 5.6.0"]  # refused at the chunk that showed the bare LF
        assert s.accepted == []
        assert s.codes(b"NOOP\r\n") == ["250 2.0.0"]  # the session goes on


def test_bdat_crlf_split_between_chunks_and_other_refusals():
    s = Session()
    transaction(s)
    assert s.codes(b"BDAT 3\r\nab\r") == ["250 2.0.0"]
    assert s.codes(b"BDAT 3 LAST\r\n\nb\r") == ["554 5.6.0"]  # a CR right at the end stands alone
    cases = ((b"a\x00b\r\n", "554 5.6.0"), (b"x" * 999 + b"\r\n", "554 5.6.0"), (b"a\r\nb\r\n", "250 2.0.0"))
    for body, problem in cases:
        s = Session()
        transaction(s)
        assert s.codes(b"BDAT 1\r\n" + body[:1]) == ["250 2.0.0"]
        assert s.codes(b"BDAT %d LAST\r\n" % (len(body) - 1) + body[1:]) == [problem]
    assert s.store.messages[s.accepted[0].queue_id][1].endswith(b"\r\na\r\nb\r\n")


def test_bdat_zero_last_and_in_pieces():
    s = Session()
    transaction(s)
    out = []
    for piece in (b"BDAT 4\r\nab", b"cd", b"BDAT 0 LAST\r\n"):
        out += s.codes(piece)
    assert out == ["250 2.0.0", "250 2.0.0"]
    assert s.store.messages[s.accepted[0].queue_id][1].endswith(b"abcd")


def test_bdat_refused_still_consumes_its_bytes():
    s = Session()
    s.ready()
    assert s.codes(b"BDAT 10 LAST\r\nMAIL FROM:NOOP\r\n") == ["503 5.5.1", "250 2.0.0"]
    s.send(b"MAIL FROM:<a@example.org>\r\n")
    assert s.codes(b"BDAT 6\r\nRSET\r\nNOOP\r\n") == ["554 5.5.1", "250 2.0.0"]


def test_bdat_and_data_do_not_mix():
    s = Session()
    transaction(s)
    assert s.codes(b"BDAT 2\r\nabDATA\r\n") == ["250 2.0.0", "503 5.5.1"]


def test_binarymime_requires_bdat():
    s = Session()
    transaction(s, mail=b"MAIL FROM:<a@example.org> BODY=BINARYMIME")
    assert s.codes(b"DATA\r\n") == ["503 5.5.1"]
    assert s.codes(b"BDAT 3 LAST\r\n\x00\xff\n") == ["250 2.0.0"]
    assert s.accepted[0].body == "BINARYMIME"


def test_bdat_size_limit():
    s = Session(maxMessageSize=100)
    transaction(s)
    assert s.codes(b"BDAT 80\r\n" + b"x" * 80 + b"BDAT 80 LAST\r\n" + b"y" * 80) == ["250 2.0.0", "552 5.3.4"]
    assert not s.store.messages and not s.store.incoming


def test_mail_loop_refused():
    s = Session(maxMessageSize=100_000)
    transaction(s)
    s.send(b"DATA\r\n")
    headers = b"".join(b"Received: from hop%d\r\n" % i for i in range(51))
    assert s.codes(headers + b"\r\nbody\r\n.\r\n") == ["554 5.4.6"]
    fine = Session(maxMessageSize=100_000)
    transaction(fine)
    fine.send(b"DATA\r\n")
    headers = b"".join(b"Received: from hop%d\r\n" % i for i in range(50))
    assert fine.codes(headers + b"\r\n" + b"Received: in the body\r\n" * 10 + b".\r\n") == ["250 2.0.0"]


def test_error_limit_closes_with_421():
    s = Session(maxErrors=3)
    s.ready()
    assert s.codes(b"FOO\r\nBAR\r\nBAZ\r\nNOOP\r\n") == ["500 5.5.2", "500 5.5.2", "500 5.5.2", "421 4.7.0"]
    assert s.transport.disconnecting


def test_per_client_connection_limit_and_relay_networks_own_cap():
    s = Session(client="192.0.2.7", maxSessionsPerClient=2)
    second = s.connect("192.0.2.7")
    third = s.connect("192.0.2.7")
    assert third[0].value().startswith(b"421 4.7.0") and third[0].disconnecting
    third[1].connectionLost(None)
    s.server.connectionLost(None)
    fourth = s.connect("192.0.2.7")
    assert fourth[0].value().startswith(b"220 ")
    assert second[0].value().startswith(b"220 ")
    inside = Session(client="127.0.0.1", maxSessionsPerClient=1, maxSessionsPerRelayClient=2)
    assert inside.connect("127.0.0.1")[0].value().startswith(b"220 ")
    assert inside.connect("127.0.0.1")[0].value().startswith(b"421 4.7.0")  # counted too (issue 13)


def test_starttls_not_offered_without_tls_listener():
    s = Session()
    s.ready()
    assert s.codes(b"STARTTLS\r\n") == ["502 5.5.1"]


def test_starttls_discards_pipelined_plaintext_and_forgets_state():
    s = Session(tls="starttls", tlsOptions=object())
    s.take()
    reply = s.send(b"EHLO c.example\r\n")
    assert b"250 STARTTLS\r\n" in reply
    assert s.codes(b"STARTTLS\r\nMAIL FROM:<evil@example.org>\r\nRCPT TO:<u@localhost>\r\n") == ["220 2.0.0"]
    assert s.transport.tlsStarted is s.settings.tlsOptions
    # the injected commands were dropped; HELO state is gone
    assert s.codes(b"MAIL FROM:<a@example.org>\r\n") == ["503 5.5.1"]
    reply = s.send(b"EHLO c.example\r\n")
    assert b"STARTTLS" not in reply
    assert s.codes(b"STARTTLS\r\n") == ["502 5.5.1"]
    assert s.codes(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<u@localhost>\r\nDATA\r\n") == [
        "250 2.1.0",
        "250 2.1.5",
        "354 2.0.0",
    ]
    s.send(MESSAGE + b".\r\n")
    assert b"with ESMTPS id" in s.store.messages[s.accepted[0].queue_id][1]


def test_starttls_refused_in_transaction_and_before_ehlo():
    s = Session(tls="starttls", tlsOptions=object())
    s.take()
    assert s.codes(b"STARTTLS\r\n") == ["503 5.5.1"]
    s.send(b"EHLO c.example\r\nMAIL FROM:<a@example.org>\r\n")
    assert s.codes(b"STARTTLS\r\n") == ["503 5.5.1"]
    assert s.transport.tlsStarted is None


def test_auth_not_enabled():
    s = Session()
    s.ready()
    assert s.codes(b"AUTH PLAIN AGEAYg==\r\n") == ["503 5.5.1"]
