"""Scripted dialogs against the server protocol, all in memory."""

from __future__ import annotations

import base64
import errno
import socket

import pytest
from smtphelpers import Session
from twisted.internet import tcp
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger, formatEvent

from relay import verdict
from relay.config import AuthSettings
from relay.delivery.maildir import MaildirBackend
from relay.delivery.router import Router
from relay.plugin import runInline
from relay.queue.memory import MemoryQueueStore
from relay.smtp import server as serverModule
from relay.smtp.auth import PasswordFile, hashPassword, makePortal, writePasswords
from relay.smtp.server import SMTPServer
from relay.smtp.throttle import AuthThrottle

MESSAGE = b"Subject: hi\r\n\r\nbody\r\n"


def test_greeting_and_ehlo_extensions():
    s = Session()
    assert s.take() == b"220 2.0.0 mx.example.test ESMTP relay\r\n"
    reply = s.send(b"EHLO client.example.test\r\n")
    lines = reply.split(b"\r\n")
    assert lines[0] == b"250-mx.example.test Hello client.example.test [192.0.2.10]"
    assert b"250-PIPELINING" in lines
    assert b"250-SIZE 10000" in lines
    assert b"250-8BITMIME" in lines
    assert lines[-2] == b"250 ENHANCEDSTATUSCODES"


def test_helo_single_line():
    s = Session()
    s.take()
    assert s.send(b"HELO client\r\n") == b"250 mx.example.test Hello client [192.0.2.10]\r\n"


def test_full_transaction_is_stored_with_received_header():
    s = Session()
    s.ready()
    assert s.codes(b"MAIL FROM:<a@example.org>\r\n") == ["250 2.1.0"]
    assert s.codes(b"RCPT TO:<someone@localhost>\r\n") == ["250 2.1.5"]
    assert s.codes(b"DATA\r\n") == ["354 2.0.0"]
    reply = s.send(MESSAGE + b".\r\n")
    assert reply.startswith(b"250 2.0.0 Ok: queued as ")
    [envelope] = s.accepted
    assert reply.strip().endswith(envelope.queue_id.encode())
    stored_env, data = s.store.messages[envelope.queue_id]
    assert stored_env.sender == "a@example.org"
    assert [r.address for r in stored_env.recipients] == ["someone@localhost"]
    assert stored_env.client_address == "192.0.2.10"
    assert stored_env.helo == "client.example.test"
    assert stored_env.size == len(MESSAGE)
    header, _, body = data.partition(b"Subject:")
    assert header.startswith(
        b"Received: from client.example.test ([192.0.2.10])\r\n\tby mx.example.test (relay) with ESMTP id "
    )
    assert b"\tfor <someone@localhost>; " in header
    assert header.endswith(b"+0000\r\n")
    assert b"Subject:" + body == MESSAGE


def test_dot_unstuffing_and_lone_dots():
    s = Session()
    s.ready()
    s.send(b"MAIL FROM:<>\r\nRCPT TO:<x@localhost>\r\nDATA\r\n")
    reply = s.send(b"..\r\n..leading\r\n.\r\n")
    assert reply.startswith(b"250 ")
    data = s.store.messages[s.accepted[0].queue_id][1]
    assert data.endswith(b"\r\n.\r\n.leading\r\n")
    assert s.accepted[0].sender == ""


def test_data_split_at_every_byte():
    s = Session()
    s.ready()
    s.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<x@localhost>\r\nDATA\r\n")
    payload = b"a\r\n..b\r\n\r\n.\r\nQUIT\r\n"
    out = b""
    for i in range(len(payload)):
        out += s.send(payload[i : i + 1])
    assert out.startswith(b"250 2.0.0 Ok: queued as ")
    assert out.endswith(b"221 2.0.0 Bye\r\n")
    assert s.store.messages[s.accepted[0].queue_id][1].endswith(b"\r\na\r\n.b\r\n\r\n")


def test_pipelined_replies_in_order_including_errors():
    s = Session()
    s.ready()
    reply = s.codes(
        b"MAIL FROM:<a@example.org>\r\n"
        b"RCPT TO:<one@localhost>\r\n"
        b"RCPT TO:<bad@@x>\r\n"
        b"RCPT TO:<far@elsewhere.example>\r\n"
        b"RCPT TO:<two@example.test>\r\n"
        b"DATA\r\n"
    )
    assert reply == ["250 2.1.0", "250 2.1.5", "501 5.1.3", "550 5.7.1", "250 2.1.5", "354 2.0.0"]
    assert s.codes(MESSAGE + b".\r\nNOOP\r\nQUIT\r\n") == ["250 2.0.0", "250 2.0.0", "221 2.0.0"]
    assert [r.address for r in s.accepted[0].recipients] == ["one@localhost", "two@example.test"]


class Slow:
    """A validator that answers when the test says: C{pending} holds its unanswered Deferreds."""

    def __init__(self) -> None:
        self.pending: list[Deferred] = []

    def validate(self, recipient, session):
        d = Deferred()
        self.pending.append(d)
        return d


def test_pipelining_behind_slow_validator_keeps_order():
    slow = Slow()
    pending = slow.pending
    s = Session(validators=[("slow", slow)])
    s.ready()
    assert s.codes(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<a@localhost>\r\nRCPT TO:<b@localhost>\r\nNOOP\r\n") == [
        "250 2.1.0"
    ]
    pending.pop(0).callback(verdict.deny("No such user"))
    assert s.codes(b"") == ["550 5.1.1"]
    pending.pop(0).callback(verdict.CONTINUE)
    assert s.codes(b"") == ["250 2.1.5", "250 2.0.0"]


@pytest.mark.parametrize(
    "commands, expected",
    [
        (b"MAIL FROM:<a@b.example>\r\n", "503 5.5.1"),
        (b"RCPT TO:<a@localhost>\r\n", "503 5.5.1"),
        (b"DATA\r\n", "503 5.5.1"),
    ],
)
def test_commands_before_helo(commands, expected):
    s = Session()
    s.take()
    assert s.codes(commands) == [expected]


def test_bad_sequences_after_helo():
    s = Session()
    s.ready()
    assert s.codes(b"RCPT TO:<a@localhost>\r\n") == ["503 5.5.1"]
    assert s.codes(b"DATA\r\n") == ["503 5.5.1"]
    assert s.codes(b"MAIL FROM:<a@b.example>\r\n") == ["250 2.1.0"]
    assert s.codes(b"MAIL FROM:<a@b.example>\r\n") == ["503 5.5.1"]
    assert s.codes(b"DATA\r\n") == ["554 5.5.1"]
    assert s.codes(b"RSET\r\nRCPT TO:<a@localhost>\r\n") == ["250 2.0.0", "503 5.5.1"]


def test_syntax_errors_and_unknown_commands_keep_session():
    s = Session()
    s.ready()
    assert s.codes(b"FOO bar\r\n") == ["500 5.5.2"]
    assert s.codes(b"MAIL TO:<a@b.example>\r\n") == ["501 5.5.4"]
    assert s.codes(b"MAIL FROM:<a@b.example> FROB=1\r\n") == ["555 5.5.4"]
    assert s.codes(b"EHLO\r\n") == ["501 5.5.4"]
    assert s.codes(b"DATA extra\r\n") == ["501 5.5.4"]
    assert s.codes(b"\x00\x01\r\n") == ["500 5.5.2"]
    assert s.codes(b"\xff\xfe\r\n") == ["500 5.5.2"]
    assert s.codes(b"NOOP\r\n") == ["250 2.0.0"]


def test_vrfy_expn_help_noop():
    s = Session()
    s.ready()
    assert s.codes(b"VRFY root\r\n") == ["252 2.0.0"]
    assert s.codes(b"EXPN staff\r\n") == ["502 5.5.1"]
    assert s.codes(b"VRFY\r\n") == ["501 5.5.4"]
    assert s.codes(b"HELP\r\n") == ["214 2.0.0"]
    assert s.codes(b"NOOP hello\r\n") == ["250 2.0.0"]


def test_quit_closes():
    s = Session()
    s.ready()
    assert s.send(b"QUIT\r\n") == b"221 2.0.0 Bye\r\n"
    assert s.transport.disconnecting


def test_postmaster_always_accepted_even_if_validator_denies():
    class No:
        def validate(self, recipient, session):
            return verdict.deny()

    s = Session(validators=[("no", No())])
    s.ready()
    assert s.codes(b"MAIL FROM:<a@b.example>\r\n") == ["250 2.1.0"]
    assert s.codes(b"RCPT TO:<user@localhost>\r\n") == ["550 5.1.1"]
    assert s.codes(b"RCPT TO:<Postmaster>\r\n") == ["250 2.1.5"]
    assert s.codes(b"RCPT TO:<POSTMASTER@localhost>\r\n") == ["250 2.1.5"]
    s.send(b"DATA\r\n" + MESSAGE + b".\r\n")
    assert [r.address for r in s.accepted[0].recipients] == ["postmaster@example.test", "POSTMASTER@localhost"]


def test_no_open_relay_for_outside_client_and_relay_for_networks():
    s = Session(client="192.0.2.10", routes={"localhost": "local", "*": "internet"})
    s.ready()
    s.send(b"MAIL FROM:<a@b.example>\r\n")
    assert s.codes(b"RCPT TO:<x@far.example>\r\n") == ["550 5.7.1"]
    inside = Session(client="127.0.0.1", routes={"localhost": "local", "*": "internet"})
    inside.ready()
    inside.send(b"MAIL FROM:<a@b.example>\r\n")
    assert inside.codes(b"RCPT TO:<x@far.example>\r\n") == ["250 2.1.5"]


def test_relay_network_without_route_is_refused():
    s = Session(client="127.0.0.1", routes={"localhost": "local"})
    s.ready()
    s.send(b"MAIL FROM:<a@b.example>\r\n")
    assert s.codes(b"RCPT TO:<x@far.example>\r\n") == ["550 5.7.1"]


def test_validator_that_raises_or_hangs_costs_one_451():
    class Boom:
        def validate(self, recipient, session):
            raise RuntimeError("broken plugin")

    s = Session(validators=[("boom", Boom())])
    s.ready()
    s.send(b"MAIL FROM:<a@b.example>\r\n")
    assert s.codes(b"RCPT TO:<x@localhost>\r\nRCPT TO:<postmaster@localhost>\r\n") == ["451 4.3.0", "250 2.1.5"]

    class Hang:
        def validate(self, recipient, session):
            return Deferred()

    h = Session(validators=[("hang", Hang())])
    h.ready()
    h.send(b"MAIL FROM:<a@b.example>\r\n")
    assert h.codes(b"RCPT TO:<x@localhost>\r\n") == []
    h.clock.advance(31)
    assert h.codes(b"") == ["451 4.3.0"]


def test_too_many_recipients():
    s = Session(maxRecipients=2)
    s.ready()
    s.send(b"MAIL FROM:<a@b.example>\r\n")
    assert s.codes(b"RCPT TO:<a@localhost>\r\nRCPT TO:<b@localhost>\r\nRCPT TO:<c@localhost>\r\n") == [
        "250 2.1.5",
        "250 2.1.5",
        "452 4.5.3",
    ]


def test_size_declared_too_big_and_actual_too_big():
    s = Session(maxMessageSize=100)
    s.ready()
    assert s.codes(b"MAIL FROM:<a@b.example> SIZE=101\r\n") == ["552 5.3.4"]
    assert s.codes(b"MAIL FROM:<a@b.example> SIZE=50 BODY=8BITMIME\r\n") == ["250 2.1.0"]
    s.send(b"RCPT TO:<a@localhost>\r\nDATA\r\n")
    assert s.codes(b"x" * 80 + b"\r\n" + b"y" * 80 + b"\r\n.\r\nNOOP\r\n") == ["552 5.3.4", "250 2.0.0"]
    assert s.accepted == []
    assert not s.store.messages


def test_command_line_too_long_does_not_desync():
    s = Session()
    s.ready()
    assert s.codes(b"NOOP " + b"x" * 600 + b"\r\nNOOP\r\n") == ["500 5.5.2", "250 2.0.0"]
    # a line far beyond the buffer limit, in pieces
    out = []
    for _ in range(10):
        out += s.codes(b"y" * 1000)
    out += s.codes(b"\r\nMAIL FROM:<a@b.example>\r\n")
    assert out == ["500 5.5.2", "250 2.1.0"]


def test_bare_lf_command_refused():
    s = Session()
    s.ready()
    assert s.codes(b"NOOP\nNOOP\r\n") == ["500 5.5.2", "250 2.0.0"]


# Every end-of-data variant the public smtpsmug tool tries.
SMUGGLING_ENDINGS = {
    "lflf": b"\n.\n",
    "crcr": b"\r.\r",
    "crlf": b"\r.\n",
    "lfcr": b"\n.\r",
    "lfcrlf": b"\n.\r\n",
    "crlflf": b"\r\n.\n",
    "crcrlf": b"\r.\r\n",
    "crlfcr": b"\r\n.\r",
    "nullbefore": b"\r\n\x00.\r\n",
}
SMUGGLED = b"MAIL FROM:<evil@x.example>\r\nRCPT TO:<victim@localhost>\r\nDATA\r\nsmuggled\r\n"


@pytest.mark.parametrize("ending", SMUGGLING_ENDINGS.values(), ids=SMUGGLING_ENDINGS.keys())
def test_smuggling_endings_never_end_data(ending):
    s = Session(maxMessageSize=100_000)
    s.ready()
    s.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<a@localhost>\r\nDATA\r\nSubject: x\r\n\r\ntext")
    # The would-be smuggled transaction is read as data, never as commands:
    # exactly one reply for the whole stream, and no second message.
    replies = s.codes(ending + SMUGGLED + b"\r\n.\r\nNOOP\r\n")
    # A NUL line is no end either, and a NUL is refused like a bare line ending.
    assert replies == ["554 5.6.0", "250 2.0.0"]
    assert s.accepted == []


@pytest.mark.parametrize("body", [b"a\nb\r\n", b"a\rb\r\n", b"x" * 1001 + b"\r\n"], ids=["lf", "cr", "long"])
def test_bad_lines_refused_and_the_real_end_still_found(body):
    s = Session(maxMessageSize=100_000)
    s.ready()
    s.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<a@localhost>\r\nDATA\r\n")
    assert s.codes(body + b"MAIL FROM:<evil@x.example>\r\n\r\n.\r\nNOOP\r\n") == ["554 5.6.0", "250 2.0.0"]
    assert s.accepted == []


def test_overlong_data_line_never_becomes_commands():
    s = Session(maxMessageSize=100_000)
    s.ready()
    s.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<a@localhost>\r\nDATA\r\n")
    assert s.codes(b"z" * 5000 + b"RSET\r\nQUIT\r\n.\r\n") == ["554 5.6.0"]
    assert not s.transport.disconnecting


def test_full_disk_at_data_and_at_commit():
    s = Session()
    s.ready()
    s.store.failWrites = True
    s.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<a@localhost>\r\n")
    assert s.codes(b"DATA\r\n") == ["452 4.3.1"]
    s.store.failWrites = False
    s.store.failCommits = True
    assert s.codes(b"DATA\r\n") == ["354 2.0.0"]
    assert s.codes(MESSAGE + b".\r\n") == ["452 4.3.1"]
    assert s.accepted == [] and not s.store.messages and not s.store.incoming


def test_full_disk_while_streaming():
    s = Session()
    s.ready()
    s.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<a@localhost>\r\nDATA\r\n")
    s.store.failWrites = True
    assert s.codes(MESSAGE + b".\r\n") == ["452 4.3.1"]
    assert not s.store.messages


def test_commit_failure_other_than_disk_full():
    s = Session()

    class Broken:
        queue_id = "Q1"

        def write(self, data):
            pass

        def commit(self, envelope):
            raise OSError(errno.EIO, "I/O error")

        def abort(self):
            self.aborted = True

    broken = Broken()
    s.store.begin = lambda: broken
    s.ready()
    s.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<a@localhost>\r\nDATA\r\n")
    assert s.codes(MESSAGE + b".\r\n") == ["451 4.3.0"]
    assert broken.aborted


class Wedged:
    """An incoming message whose commit answers only when the test says (a wedged sync)."""

    queue_id = "Q1"

    def __init__(self) -> None:
        self.commits: list[Deferred] = []
        self.aborted = False

    def write(self, data):
        pass

    def commit(self, envelope):
        d = Deferred()
        self.commits.append(d)
        return d

    def abort(self):
        self.aborted = True


def test_commit_past_its_deadline_gets_451_and_the_session_goes_on():
    s = Session(commitTimeout=30.0, idleTimeout=300.0)
    wedged = Wedged()
    s.store.begin = lambda: wedged
    s.ready()
    s.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<a@localhost>\r\nDATA\r\n")
    assert s.codes(MESSAGE + b".\r\nNOOP\r\n") == []  # the commit is pending: nothing answered yet
    s.clock.advance(29.9)
    assert s.take() == b""
    s.clock.advance(0.2)
    assert s.codes(b"") == ["451 4.3.0", "250 2.0.0"]  # the pipelined NOOP is answered too
    assert wedged.aborted and s.accepted == []
    # The late result is ignored, whatever it is: no second answer, nothing scheduled.
    wedged.commits[0].callback(None)
    assert s.take() == b"" and s.accepted == []
    # The session goes on, with its command timeout running again.
    s.store.begin = MemoryQueueStore.begin.__get__(s.store)
    s.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<a@localhost>\r\nDATA\r\n")
    assert s.codes(MESSAGE + b".\r\n") == ["250 2.0.0"]
    assert len(s.accepted) == 1
    s.clock.advance(301)
    assert s.take().startswith(b"421 4.4.2 ")


def test_commit_within_its_deadline_is_answered_250_and_the_deadline_forgotten():
    s = Session(commitTimeout=30.0)
    wedged = Wedged()
    s.store.begin = lambda: wedged
    s.ready()
    s.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<a@localhost>\r\nDATA\r\n")
    assert s.codes(MESSAGE + b".\r\n") == []
    s.clock.advance(29)
    wedged.commits[0].callback(None)
    assert s.codes(b"") == ["250 2.0.0"]
    assert not wedged.aborted and [e.queue_id for e in s.accepted] == ["Q1"]
    s.clock.advance(5)
    assert s.take() == b""  # no 451 after the 250
    assert all(c.getTime() > s.clock.seconds() + 200 for c in s.clock.getDelayedCalls())  # the idle timer only


def test_idle_timeout_sends_421():
    s = Session()
    s.ready()
    s.clock.advance(299)
    assert s.take() == b""
    s.clock.advance(2)
    assert s.take().startswith(b"421 4.4.2 ")
    assert s.transport.disconnecting


def test_no_idle_timeout_while_an_answer_is_ours_then_the_command_timeout_again():
    slow = Slow()
    pending = slow.pending
    s = Session(validators=[("slow", slow)], idleTimeout=10.0)
    s.ready()
    assert s.codes(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<a@localhost>\r\n") == ["250 2.1.0"]
    s.clock.advance(25)  # the validator is slow (within its own limit): the client is not to blame
    assert s.take() == b""
    pending.pop(0).callback(verdict.CONTINUE)
    assert s.codes(b"") == ["250 2.1.5"]
    s.clock.advance(9)
    assert s.take() == b""
    s.clock.advance(2)
    assert s.take().startswith(b"421 4.4.2 ")


def test_after_a_message_the_command_timeout_applies_not_the_data_timeout():
    s = Session(idleTimeout=300.0, dataTimeout=10.0)
    s.ready()
    assert s.codes(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<a@localhost>\r\nDATA\r\n")[-1] == "354 2.0.0"
    assert s.codes(MESSAGE + b".\r\n") == ["250 2.0.0"]
    s.clock.advance(11)
    assert s.take() == b""
    s.clock.advance(290)
    assert s.take().startswith(b"421 4.4.2 ")


def test_connection_lost_mid_data_aborts():
    s = Session()
    s.ready()
    s.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<a@localhost>\r\nDATA\r\npartial")
    assert len(s.store.incoming) == 1
    s.server.connectionLost(None)
    assert not s.store.incoming and not s.store.messages


def test_rset_mid_transaction_then_new_one():
    s = Session()
    s.ready()
    s.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<a@localhost>\r\n")
    assert s.codes(b"RSET\r\nMAIL FROM:<c@d.example>\r\nRCPT TO:<e@localhost>\r\nDATA\r\n") == [
        "250 2.0.0",
        "250 2.1.0",
        "250 2.1.5",
        "354 2.0.0",
    ]
    s.send(MESSAGE + b".\r\n")
    assert s.accepted[0].sender == "c@d.example"


def test_utf8_address_without_smtputf8_refused():
    s = Session()
    s.ready()
    assert s.codes("MAIL FROM:<jörg@b.example>\r\n".encode()) == ["553 5.6.7"]


def test_accepted_line_is_logged_as_sent_braces_and_all(monkeypatch):
    events: list[dict] = []
    monkeypatch.setattr(SMTPServer, "log", Logger(observer=events.append))
    s = Session()
    s.ready()
    commands = b"MAIL FROM:<a{x}b@example.org>\r\nRCPT TO:<a@localhost>\r\nDATA\r\n"
    assert s.codes(commands + MESSAGE + b".\r\n")[-1] == "250 2.0.0"
    [event] = [e for e in events if e.get("relay_event") == "accepted"]
    accepted = s.accepted[0]
    assert formatEvent(event) == (
        f"event=accepted queue_id={accepted.queue_id} from=<a{{x}}b@example.org> size={accepted.size} nrcpt=1"
        " client=192.0.2.10"
    )
    assert (event["relay_fields"]["from"], event["relay_fields"]["nrcpt"]) == ("a{x}b@example.org", 1)


# -- no backscatter --------------------------------------------------------


def maildirSession(tmp_path, **kwargs) -> Session:
    routes = {"localhost": "local", "example.test": "local"}
    backend = MaildirBackend("mail/{domain}/{local}", tmp_path, "mx.example.test", runInline, None)
    return Session(router=Router(routes.get, {"local": backend}), **kwargs)


def test_a_recipient_the_maildir_backend_would_refuse_is_refused_at_rcpt(tmp_path):
    s = maildirSession(tmp_path)
    s.ready()
    assert s.codes(
        b"MAIL FROM:<anyone@example.org>\r\n"
        b"RCPT TO:<a/b@localhost>\r\n"
        b'RCPT TO:<".hidden"@localhost>\r\n'
        b'RCPT TO:<"../.."@localhost>\r\n'
        b'RCPT TO:<"a\\/b"@LOCALHOST>\r\n'
        b"RCPT TO:<A/B@Example.Test>\r\n"
        b"DATA\r\n"
    ) == ["250 2.1.0"] + ["550 5.1.3"] * 5 + ["554 5.5.1"]
    assert s.store.messages == {} and s.accepted == []


def test_good_and_bad_recipients_in_one_transaction(tmp_path):
    s = maildirSession(tmp_path)
    s.ready()
    assert s.codes(
        b'MAIL FROM:<anyone@example.org>\r\nRCPT TO:<alice@localhost>\r\nRCPT TO:<".x"@localhost>\r\nDATA\r\n'
    ) == ["250 2.1.0", "250 2.1.5", "550 5.1.3", "354 2.0.0"]
    assert s.codes(MESSAGE + b".\r\n") == ["250 2.0.0"]
    assert [r.address for r in s.accepted[0].recipients] == ["alice@localhost"]


DSN_TRANSACTION = (
    b"MAIL FROM:<a@example.org> RET=FULL ENVID=e1\r\n"
    b"RCPT TO:<u@localhost> NOTIFY=SUCCESS ORCPT=rfc822;u@localhost\r\n"
    b"RCPT TO:<v@localhost> NOTIFY=SUCCESS,FAILURE,DELAY\r\n"
    b"RCPT TO:<w@localhost> NOTIFY=NEVER\r\n"
    b"RCPT TO:<x@localhost>\r\n"
    b"DATA\r\n"
)


def dsnRequests(s: Session) -> tuple[str | None, list[tuple[str, ...] | None]]:
    s.ready()
    assert s.codes(DSN_TRANSACTION + MESSAGE + b".\r\n")[-1] == "250 2.0.0"
    [envelope] = s.accepted
    assert envelope.envid == "e1" and envelope.recipients[0].orcpt == "rfc822;u@localhost"
    return envelope.ret, [r.notify for r in envelope.recipients]


def test_an_outsiders_dsn_requests_become_failures_only_headers_only():
    s = Session(client="192.0.2.10")  # not in relay_networks, not authenticated
    # accepted as asked (the client is told nothing), stored as honoured
    assert dsnRequests(s) == ("HDRS", [("FAILURE",), ("FAILURE",), ("NEVER",), ("FAILURE",)])


def test_an_insiders_dsn_requests_are_kept_as_asked():
    s = Session(client="127.0.0.1")
    assert dsnRequests(s) == ("FULL", [("SUCCESS",), ("SUCCESS", "FAILURE", "DELAY"), ("NEVER",), None])


def test_an_authenticated_clients_dsn_requests_are_kept_as_asked():
    s = Session(client="192.0.2.10")
    s.server.authenticated = "alice"  # what a successful AUTH leaves (AUTH itself: test_smtp_auth)
    assert dsnRequests(s) == ("FULL", [("SUCCESS",), ("SUCCESS", "FAILURE", "DELAY"), ("NEVER",), None])


def test_a_store_behind_the_client_pauses_reading_until_it_catches_up():
    session = Session(client="127.0.0.1")
    caughtUp: Deferred[None] = Deferred()
    begin = session.store.begin

    def begun():
        incoming = begin()
        incoming.writable = lambda: caughtUp if not caughtUp.called else None
        return incoming

    session.store.begin = begun
    session.send(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@localhost>\r\nDATA\r\n")
    session.send(b"Subject: x\r\n\r\nbody\r\n")
    assert session.transport.producerState == "paused"
    caughtUp.callback(None)
    assert session.transport.producerState == "producing"
    session.send(b".\r\n")
    assert session.accepted


def test_a_large_message_is_read_in_large_pieces():
    # Twisted's own TCP transport on a real socket pair, driven by hand: one
    # read takes up to READ_SIZE octets, not Twisted's default of 64 KiB.
    s = Session()
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    for sock in (ours, theirs):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    protocol = s.factory.buildProtocol(None)
    seen: list[int] = []
    received = protocol.dataReceived
    protocol.dataReceived = lambda data: (seen.append(len(data)), received(data))[1]
    try:
        transport = tcp.Server(ours, protocol, ("192.0.2.10", 40000), None, 1, MemoryReactorClock())
        protocol.makeConnection(transport)
        theirs.sendall(b"x" * 200_000)
        transport.doRead()
        assert seen == [200_000] and serverModule.READ_SIZE >= 200_000
    finally:
        ours.close()
        theirs.close()


# -- abuse resistance (issue 13) ----------------------------------------------


def transaction(s: Session) -> None:
    s.ready()
    assert s.codes(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<u@localhost>\r\n") == ["250 2.1.0", "250 2.1.5"]


def test_452_counts_toward_the_error_limit():
    s = Session(maxErrors=3)
    s.store.failWrites = True  # the Received header cannot be written: 452 4.3.1 at DATA
    s.ready()
    s.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<u@localhost>\r\n")
    assert s.codes(b"DATA\r\nDATA\r\n") == ["452 4.3.1", "452 4.3.1"]
    assert not s.transport.disconnecting
    assert s.codes(b"DATA\r\n") == ["452 4.3.1", "421 4.7.0"]
    assert s.transport.disconnecting


def test_too_many_recipients_within_the_overshoot_is_not_an_error():
    s = Session(maxErrors=3, maxRecipients=1)
    transaction(s)
    assert s.codes(b"RCPT TO:<v@localhost>\r\n" * 10) == ["452 4.5.3"] * 10
    assert s.codes(b"DATA\r\n" + MESSAGE + b".\r\n") == ["354 2.0.0", "250 2.0.0"]
    assert not s.transport.disconnecting


def test_a_locked_out_address_gets_454_without_any_password_check(tmp_path):
    s = authSession(tmp_path, AuthThrottle(Clock(), AuthSettings(max_failures=1)))
    s.settings.authThrottle.failed("192.0.2.10", "alice")
    s.take()
    s.send(b"EHLO c.example\r\n")
    assert s.codes(b"AUTH PLAIN " + base64.b64encode(b"\0alice\0right") + b"\r\n") == ["454 4.7.0"]
    assert s.codes(b"NOOP\r\n") == ["250 2.0.0"]


def test_a_failed_auth_is_answered_after_the_throttle_delay_reading_nothing_meanwhile(tmp_path, monkeypatch):
    events: list[dict] = []
    monkeypatch.setattr(SMTPServer, "log", Logger(observer=events.append))
    clock = Clock()
    throttle = AuthThrottle(clock, AuthSettings(failure_delay=2.0, max_failure_delay=10.0, max_failures=10))
    s = authSession(tmp_path, throttle)
    clock.advance(s.clock.seconds())  # the throttle's clock at the session's time
    s.take()
    s.send(b"EHLO c.example\r\n")
    wrong = b"AUTH PLAIN " + base64.b64encode(b"\0alice\0secret-guess") + b"\r\n"
    assert s.send(wrong + b"NOOP\r\n") == b""  # the 535 waits, and the NOOP behind it
    s.clock.advance(1.9)
    assert s.take() == b""
    s.clock.advance(0.1)
    assert s.take() == b"535 5.7.8 Authentication credentials invalid\r\n250 2.0.0 Ok\r\n"
    s.send(wrong)
    s.clock.advance(3.9)
    assert s.take() == b""  # the second failure waits twice as long
    s.clock.advance(0.1)
    assert s.take().startswith(b"535 5.7.8")
    lines = [formatEvent(e) for e in events]
    assert lines.count("authentication failed for alice client=192.0.2.10") == 2
    assert not any("secret-guess" in line for line in lines)
    assert s.codes(b"AUTH PLAIN " + base64.b64encode(b"\0alice\0right") + b"\r\n") == ["235 2.7.0"]


def test_a_pending_auth_delay_is_cancelled_with_the_connection(tmp_path):
    s = authSession(tmp_path, AuthThrottle(Clock(), AuthSettings(failure_delay=5.0)))
    s.take()
    s.send(b"EHLO c.example\r\nAUTH PLAIN " + base64.b64encode(b"\0alice\0wrong") + b"\r\n")
    assert s.server._authDelay is not None
    s.server.connectionLost(None)
    assert not s.clock.getDelayedCalls()


def authSession(tmp_path, throttle) -> Session:
    passwords = tmp_path / "passwords"
    writePasswords(passwords, {"alice": hashPassword("right", rounds=4)})
    portal = makePortal(PasswordFile(passwords, runInline))
    return Session(portal=portal, auth="optional", plaintextAuth=True, authThrottle=throttle)


def test_replies_the_transport_cannot_send_stop_the_reading():
    s = Session()
    s.ready()
    s.server.pauseProducing()  # what the transport does when its buffer of replies is full
    assert s.send(b"NOOP\r\n" * 1000) == b""  # kept, not answered
    assert s.transport.producerState == "producing"  # a TLS handshake may still need reading
    s.send(b"NOOP\r\n" * (serverModule.PAUSE_ABOVE // 6))
    assert s.transport.producerState == "paused"  # input piles up: no more reading
    s.server.resumeProducing()  # drained
    assert s.take() == b"250 2.0.0 Ok\r\n" * (1000 + serverModule.PAUSE_ABOVE // 6)
    assert s.transport.producerState == "producing"


def test_a_client_that_never_reads_replies_is_not_read():
    # Twisted's own TCP transport on a real socket pair: the peer sends
    # NOOPs and reads nothing; once the socket and the transport's buffer are
    # full, the session stops reading, and what it holds stays bounded.
    s = Session()
    reactor = MemoryReactorClock()
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    protocol = s.factory.buildProtocol(None)
    try:
        transport = tcp.Server(ours, protocol, ("192.0.2.10", 40000), None, 1, reactor)
        protocol.makeConnection(transport)
        noops = b"NOOP\r\n" * 20_000
        sent = 0
        for _ in range(2000):
            try:
                sent += theirs.send(noops)
            except BlockingIOError:
                pass
            if transport not in reactor.getReaders():
                break
            transport.doRead()
            if transport in reactor.getWriters():
                transport.doWrite()
        assert transport not in reactor.getReaders()
        held = len(transport.dataBuffer) - transport.offset + transport._tempDataLen
        assert held <= 2 * serverModule.READ_SIZE + 64 * 1024
        assert len(protocol._buffer) <= serverModule.READ_SIZE + serverModule.PAUSE_ABOVE
        # the client reads: the session goes on answering, and reading
        for _ in range(1000):
            try:
                theirs.recv(1 << 20)
            except BlockingIOError:
                pass
            if transport in reactor.getWriters():
                transport.doWrite()
            if transport in reactor.getReaders():
                break
        assert transport in reactor.getReaders()
    finally:
        ours.close()
        theirs.close()


def test_a_command_line_drip_fed_is_closed_at_the_command_deadline():
    s = Session(commandDeadline=30.0, idleTimeout=20.0)
    s.ready()
    for octet in b"NOOP":
        s.send(bytes([octet]))
        s.clock.advance(7)  # each octet resets the idle timer, not the deadline
    assert s.take() == b""
    s.clock.advance(2)
    assert s.take() == b"421 4.4.2 mx.example.test Error: timeout exceeded\r\n"
    assert s.transport.disconnecting


def test_the_command_deadline_runs_per_line():
    s = Session(commandDeadline=30.0)
    s.ready()
    for _ in range(5):
        s.send(b"NO")
        s.clock.advance(20)
        assert s.codes(b"OP\r\n") == ["250 2.0.0"]
    s.send(b"NOOP\r\nNO")  # a pipelined line, then the start of the next
    s.clock.advance(29)
    assert s.codes(b"OP\r\n") == ["250 2.0.0"]
    s.clock.advance(100)
    assert not s.transport.disconnecting


def test_an_over_long_line_being_dropped_is_still_under_the_command_deadline():
    s = Session(commandDeadline=30.0)
    s.ready()
    s.send(b"X" * (serverModule.BUFFER_LIMIT + 1))  # dropped while we look for its end
    s.clock.advance(15)
    s.send(b"X" * 100)
    s.clock.advance(15)
    assert s.take().startswith(b"421 4.4.2")


def test_data_drip_fed_is_closed_at_the_data_deadline():
    s = Session(dataDeadline=60.0, dataTimeout=20.0)
    transaction(s)
    s.send(b"DATA\r\n")
    for _ in range(29):
        s.clock.advance(2)
        s.send(b"x")
    assert s.take() == b""
    s.clock.advance(2)
    assert s.take().startswith(b"421 4.4.2")
    assert s.transport.disconnecting and s.store.incoming == set()


def test_the_data_deadline_grows_with_the_octets_received():
    # 60 s floor, 1000 octets/s: 5,000 octets a second for 200 s (1 MB) earns 1000 s
    s = Session(dataDeadline=60.0, minDataRate=1000, maxMessageSize=10_000_000)
    transaction(s)
    s.send(b"DATA\r\n")
    line = b"x" * 98 + b"\r\n"
    for _ in range(200):
        s.send(line * 50)
        s.clock.advance(1)
    assert s.codes(b".\r\n") == ["250 2.0.0"]


def test_a_bdat_chunk_drip_fed_is_closed_at_the_data_deadline():
    s = Session(dataDeadline=60.0)
    transaction(s)
    s.send(b"BDAT 100 LAST\r\n")
    for _ in range(30):
        s.send(b"x")
        s.clock.advance(2)
    assert s.take().startswith(b"421 4.4.2")


def test_the_session_deadline_ends_even_a_busy_session():
    s = Session(sessionDeadline=100.0)
    s.ready()
    for _ in range(9):
        s.clock.advance(10)
        assert s.codes(b"NOOP\r\n") == ["250 2.0.0"]
    s.clock.advance(10)
    assert s.take().startswith(b"421 4.4.2")
    assert s.transport.disconnecting


def test_a_closed_client_that_reads_nothing_is_cut_after_a_grace():
    s = Session()
    s.ready()
    s.send(b"QUIT\r\n")
    assert s.transport.disconnecting and not s.transport.disconnected
    s.clock.advance(serverModule.CLOSE_GRACE)
    assert s.transport.disconnected  # StringTransport: abortConnection


def test_a_message_over_the_limit_stops_being_stored_at_once():
    s = Session(maxMessageSize=10_000)
    transaction(s)
    s.send(b"DATA\r\n")
    [incoming] = s.store.incoming
    s.send(b"x" * 998 + b"\r\n")
    assert not incoming.aborted
    for _ in range(20):
        s.send(b"x" * 998 + b"\r\n")
    assert incoming.aborted and s.store.incoming == set()
    stored = sum(map(len, incoming._chunks))
    assert stored <= 10_000 + 1_000  # the Received header and less than one piece
    for _ in range(1000):  # the rest is read and dropped
        s.send(b"x" * 998 + b"\r\n")
    assert sum(map(len, incoming._chunks)) == stored
    assert s.codes(b".\r\nNOOP\r\n") == ["552 5.3.4", "250 2.0.0"]
    assert s.store.messages == {}


def test_a_bdat_message_over_the_limit_stops_being_stored_and_is_refused_at_the_chunk():
    s = Session(maxMessageSize=10_000)
    transaction(s)
    s.send(b"BDAT 30000\r\n" + b"x" * 5000)
    [incoming] = s.store.incoming
    s.send(b"x" * 6000)
    assert incoming.aborted
    assert s.codes(b"x" * 19000) == ["552 5.3.4"]
    assert s.codes(b"NOOP\r\n") == ["250 2.0.0"]
    assert s.store.messages == {}


def test_a_declared_size_over_the_limit_is_refused_at_mail():
    s = Session(maxMessageSize=10_000)
    s.ready()
    assert s.codes(b"MAIL FROM:<a@example.org> SIZE=10001\r\n") == ["552 5.3.4"]
    assert s.codes(b"MAIL FROM:<a@example.org> SIZE=10000\r\n") == ["250 2.1.0"]
