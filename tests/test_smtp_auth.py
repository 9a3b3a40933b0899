"""SASL PLAIN and LOGIN, the bcrypt password file, and AUTH in a server session."""

from __future__ import annotations

import base64
import os

import bcrypt
import pytest
from deferred import result
from smtphelpers import Session
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred
from twisted.logger import LogLevel, capturedLogs, formatEvent

from relay.plugin import runInline
from relay.smtp.auth import (
    Challenge,
    Credentials,
    Failed,
    IMailUser,
    PasswordFile,
    hashPassword,
    makePortal,
    readPasswords,
    startExchange,
    writePasswords,
)


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_plain_with_initial_response():
    assert startExchange("plain", b64("\0alice\0pw")).start() == Credentials("alice", "pw")
    assert startExchange("PLAIN", b64("alice\0alice\0pw")).start() == Credentials("alice", "pw", "alice")


def test_plain_without_initial_response_and_empty_initial():
    exchange = startExchange("PLAIN", None)
    assert exchange.start() == Challenge("")
    assert exchange.respond(b64("\0bob\0x y")) == Credentials("bob", "x y")
    assert isinstance(startExchange("PLAIN", "=").start(), Failed)  # empty: no fields


def test_login_both_ways():
    exchange = startExchange("LOGIN", None)
    assert exchange.start() == Challenge(b64("Username:"))
    assert exchange.respond(b64("alice")) == Challenge(b64("Password:"))
    assert exchange.respond(b64("pw")) == Credentials("alice", "pw")
    quick = startExchange("LOGIN", b64("alice"))
    assert quick.start() == Challenge(b64("Password:"))
    assert quick.respond(b64("pw")) == Credentials("alice", "pw")


@pytest.mark.parametrize(
    "mechanism, line, code",
    [
        ("PLAIN", "*", "501 5.7.0"),
        ("PLAIN", "not base64!", "501 5.5.2"),
        ("PLAIN", b64("carol\0alice\0pw"), "535 5.7.8"),
        ("PLAIN", b64("\0alice\0pw\0extra"), "501 5.5.2"),
        ("PLAIN", b64("\0\0pw"), "501 5.5.2"),
        ("PLAIN", b64("\0al\rice\0pw"), "501 5.5.2"),
        ("LOGIN", "*", "501 5.7.0"),
    ],
)
def test_refusals(mechanism, line, code):
    exchange = startExchange(mechanism, None)
    exchange.start()
    outcome = exchange.respond(line)
    assert isinstance(outcome, Failed) and f"{outcome.status.code} {outcome.status.enhanced}" == code


def test_unknown_mechanism():
    assert startExchange("CRAM-MD5", None) is None


@pytest.fixture
def passwords(tmp_path):
    path = tmp_path / "passwords"
    writePasswords(path, {"alice": hashPassword("right", rounds=4)})
    return path


def login(checker, user: bytes, password: bytes):
    return makePortal(checker).login(UsernamePassword(user, password), None, IMailUser)


def test_password_file_checks(passwords):
    assert os.stat(passwords).st_mode & 0o777 == 0o600
    checker = PasswordFile(passwords, runInline)
    interface, avatar, logout = result(login(checker, b"alice", b"right"))
    assert (interface, avatar) == (IMailUser, "alice")
    for user, password in ((b"alice", b"wrong"), (b"mallory", b"right"), (b"Alice", b"right")):
        with pytest.raises(UnauthorizedLogin):
            result(login(checker, user, password))


def test_password_file_reloaded_and_malformed_lines_skipped(passwords):
    checker = PasswordFile(passwords, runInline)
    with pytest.raises(UnauthorizedLogin):
        result(login(checker, b"bob", b"pw"))
    text = passwords.read_text() + "garbage line\n# comment\n\nbob:" + hashPassword("pw", rounds=4) + "\n"
    passwords.write_text(text)
    assert readPasswords(passwords).keys() == {"alice", "bob"}
    assert result(login(checker, b"bob", b"pw"))[1] == "bob"
    assert result(login(checker, b"alice", b"right"))[1] == "alice"


def test_missing_file_refuses_everyone(tmp_path):
    with pytest.raises(UnauthorizedLogin):
        result(login(PasswordFile(tmp_path / "absent", runInline), b"alice", b"right"))


def test_bcrypt_runs_through_blocking(passwords):
    calls = []

    def recording(f, *args):
        calls.append(f)
        return runInline(f, *args)

    result(login(PasswordFile(passwords, recording), b"alice", b"right"))
    assert len(calls) == 1
    assert bcrypt.checkpw(b"right", readPasswords(passwords)["alice"].encode())


# -- AUTH in a session --------------------------------------------------------


def authSession(passwords, **overrides):
    overrides.setdefault("auth", "optional")
    overrides.setdefault("plaintextAuth", True)
    return Session(portal=makePortal(PasswordFile(passwords, runInline)), **overrides)


def test_auth_plain_then_relay(passwords):
    s = authSession(passwords, routes={"localhost": "local", "*": "out"})
    s.take()
    assert b"250 AUTH PLAIN LOGIN\r\n" in s.send(b"EHLO c.example\r\n")
    assert s.codes(b"AUTH PLAIN " + b64("\0alice\0right").encode() + b"\r\n") == ["235 2.7.0"]
    assert b"AUTH" not in s.send(b"EHLO c.example\r\n")  # not offered twice
    assert s.codes(b"AUTH PLAIN " + b64("\0alice\0right").encode() + b"\r\n") == ["503 5.5.1"]
    assert s.codes(b"MAIL FROM:<a@example.org> AUTH=<>\r\nRCPT TO:<x@far.example>\r\nDATA\r\n") == [
        "250 2.1.0",
        "250 2.1.5",
        "354 2.0.0",
    ]
    s.send(b"Subject: x\r\n\r\n.\r\n")
    assert s.accepted[0].auth == "alice"
    assert b"with ESMTPA id" in s.store.messages[s.accepted[0].queue_id][1]


def test_auth_login_dialog_and_wrong_password(passwords):
    s = authSession(passwords)
    s.ready()
    assert s.send(b"AUTH LOGIN\r\n") == b"334 " + b64("Username:").encode() + b"\r\n"
    assert s.send(b64("alice").encode() + b"\r\n") == b"334 " + b64("Password:").encode() + b"\r\n"
    assert s.codes(b64("nope").encode() + b"\r\n") == ["535 5.7.8"]
    assert s.codes(b"AUTH LOGIN " + b64("alice").encode() + b"\r\n" + b64("right").encode() + b"\r\n") == [
        "334 " + b64("Password:"),
        "235 2.7.0",
    ]


def test_auth_cancel_and_unknown_mechanism(passwords):
    s = authSession(passwords)
    s.ready()
    assert s.send(b"AUTH PLAIN\r\n") == b"334 \r\n"
    assert s.codes(b"*\r\n") == ["501 5.7.0"]
    assert s.codes(b"AUTH CRAM-MD5\r\n") == ["504 5.5.4"]
    assert s.codes(b"NOOP\r\n") == ["250 2.0.0"]


def test_auth_needs_tls_unless_plaintext_allowed(passwords):
    s = authSession(passwords, plaintextAuth=False, tls="starttls", tlsOptions=object())
    s.take()
    assert b"AUTH" not in s.send(b"EHLO c.example\r\n")
    assert s.codes(b"AUTH PLAIN " + b64("\0alice\0right").encode() + b"\r\n") == ["538 5.7.11"]
    s.send(b"STARTTLS\r\n")
    assert b"AUTH PLAIN LOGIN" in s.send(b"EHLO c.example\r\n")


def test_required_auth_refuses_mail_with_530(passwords):
    s = authSession(passwords, auth="required")
    s.ready()
    assert s.codes(b"MAIL FROM:<a@example.org>\r\n") == ["530 5.7.0"]


def test_pipelined_commands_wait_for_the_password_check(passwords):
    pending: list[Deferred] = []

    def later(f, *args):
        d = Deferred()
        pending.append(d)
        d.addCallback(lambda _: f(*args))
        return d

    s = Session(portal=makePortal(PasswordFile(passwords, later)), auth="optional", plaintextAuth=True)
    s.ready()
    assert s.codes(b"AUTH PLAIN " + b64("\0alice\0right").encode() + b"\r\nNOOP\r\n") == []
    pending.pop().callback(None)
    assert s.codes(b"") == ["235 2.7.0", "250 2.0.0"]


def test_a_hash_dearer_than_max_bcrypt_cost_is_refused_with_a_log_line_naming_the_user(passwords):
    cheap = hashPassword("pw", rounds=4)
    dear = "$2b$20$" + cheap[len("$2b$04$") :]  # the cost as stored: checking it would take about a minute
    passwords.write_text(passwords.read_text() + f"bob:{dear}\ncarol:{cheap}\n")
    with capturedLogs() as events:
        users = readPasswords(passwords, maxCost=14)
    assert users.keys() == {"alice", "carol"}
    [event] = [e for e in events if e["log_level"] == LogLevel.error]
    assert event["user"] == "bob" and event["cost"] == 20 and event["line"] == 2
    assert dear not in formatEvent(event) and "pw" not in formatEvent(event)
    checker = PasswordFile(passwords, runInline, maxCost=14)
    with pytest.raises(UnauthorizedLogin):
        result(login(checker, b"bob", b"pw"))  # the dummy hash is checked instead: no minute spent
    assert result(login(checker, b"carol", b"pw"))[1] == "carol"
    assert readPasswords(passwords).keys() == {"alice", "bob", "carol"}  # no bound: as before
