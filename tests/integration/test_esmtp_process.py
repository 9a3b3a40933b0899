"""
ESMTP extensions, TLS and AUTH against the real relay, with real clients:
swaks (STARTTLS, implicit TLS, AUTH, pipelining), msmtp (DSN), smtplib
(SMTPUTF8, BDAT, STARTTLS injection) and nmap's open-relay script.
"""

from __future__ import annotations

import json
import smtplib
import socket
import ssl
import subprocess
from pathlib import Path

import pytest
from certs import PKI
from relayproc import OUTBOUND_MAILDIR, RELAY_SECTION, Relay, freePort, tool, waitFor

from relay.queue import fsworker
from relay.queue.filesystem import QUEUE_ID
from relay.smtp.auth import hashPassword, writePasswords

pytestmark = pytest.mark.integration

PASSWORD = "s3cret pass"
BODY = b"Subject: esmtp\r\n\r\nhello\r\n"

CONFIG = (
    RELAY_SECTION
    + """\

[listener:smtp]
endpoint = tcp:{smtp}:interface=127.0.0.1
tls = starttls

[listener:submission]
endpoint = tcp:{submission}:interface=127.0.0.1
tls = starttls
auth = required

[listener:smtps]
endpoint = tcp:{smtps}:interface=127.0.0.1
tls = implicit
auth = optional

[listener:rig]
endpoint = tcp:{rig}:interface=127.0.0.1
auth = optional
plaintext_auth = yes

[tls]
certificate = {cert}
private_key = {key}

[auth]
passwords = {passwords}

[policy]
local_domains = localhost
relay_networks =

"""
    + OUTBOUND_MAILDIR
)


class Rig:
    def __init__(self, tmp_path: Path) -> None:
        pki = PKI(tmp_path)
        cert, key = pki.issue("relay.test", "localhost", "127.0.0.1")
        self.ca = pki.ca_file
        passwords = tmp_path / "passwords"
        writePasswords(passwords, {"alice": hashPassword(PASSWORD, rounds=4)})
        self.ports = {name: freePort() for name in ("smtp", "submission", "smtps", "rig")}
        config = CONFIG.format(state=tmp_path / "var", cert=cert, key=key, passwords=passwords, **self.ports)
        self.relay = Relay(tmp_path, config=config, port=self.ports["smtp"])

    def __getattr__(self, name: str):
        return getattr(self.relay, name)

    def outbound(self, address: str) -> list[Path]:
        local, _, domain = address.rpartition("@")
        new = self.relay.state / "outbound" / domain / local / "new"
        return sorted(new.iterdir()) if new.is_dir() else []


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path)
    r.relay.start()
    assert waitFor(lambda: all(_listening(p) for p in r.ports.values()), 10)
    yield r
    r.relay.stop()


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def swaks(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [tool("swaks"), "--timeout", "10", "--from", "s@example.org", *args], capture_output=True, timeout=60, text=True
    )


def submit(rig: Rig, *args: str) -> subprocess.CompletedProcess:
    """swaks to the submission listener, over STARTTLS, to a remote domain."""
    return swaks("--server", f"127.0.0.1:{rig.ports['submission']}", "--to", "far@remote.example", "-tls", *args)


def delivered(rig: Rig, address: str) -> bytes:
    assert waitFor(lambda: rig.relay.delivered(address), 5), rig.relay.logText()
    return rig.relay.delivered(address)[0].read_bytes()


def test_swaks_starttls(rig):
    result = swaks("--server", f"127.0.0.1:{rig.ports['smtp']}", "--to", "tls@localhost", "-tls")
    assert result.returncode == 0, result.stdout
    assert "<-  220 2.0.0 Ready to start TLS" in result.stdout
    assert b"with ESMTPS id" in delivered(rig, "tls@localhost")


def test_swaks_implicit_tls(rig):
    result = swaks("--server", f"127.0.0.1:{rig.ports['smtps']}", "--to", "implicit@localhost", "-tlsc")
    assert result.returncode == 0, result.stdout
    assert b"with ESMTPS id" in delivered(rig, "implicit@localhost")


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_swaks_submission_auth_relays(rig, mechanism):
    result = submit(
        rig,
        "--auth",
        mechanism,
        "--auth-user",
        "alice",
        "--auth-password",
        PASSWORD,
    )
    assert result.returncode == 0, result.stdout
    assert "235 2.7.0 Authentication successful" in result.stdout
    assert waitFor(lambda: rig.outbound("far@remote.example"), 5)
    assert b"with ESMTPSA id" in rig.outbound("far@remote.example")[0].read_bytes()


def test_submission_without_auth_gets_530(rig):
    result = submit(rig)
    assert result.returncode != 0
    assert "530 5.7.0 Authentication required" in result.stdout


def test_wrong_password_gets_535(rig):
    result = submit(
        rig,
        "--auth",
        "PLAIN",
        "--auth-user",
        "alice",
        "--auth-password",
        "wrong",
    )
    assert result.returncode != 0
    assert "535 5.7.8" in result.stdout


def test_no_auth_before_tls_and_no_relay_without_it(rig):
    with smtplib.SMTP("127.0.0.1", rig.ports["submission"], timeout=10) as client:
        client.ehlo("c.example")
        assert not client.has_extn("auth")
        assert client.has_extn("starttls")
        assert client.docmd("AUTH", "PLAIN AGFsaWNlAHgK")[0] == 538
    with smtplib.SMTP("127.0.0.1", rig.ports["smtp"], timeout=10) as client:
        client.ehlo("c.example")
        client.mail("s@example.org")
        code, text = client.rcpt("far@remote.example")
        assert (code, text[:5]) == (550, b"5.7.1")


def test_plaintext_auth_listener_for_test_rigs(rig):
    with smtplib.SMTP("127.0.0.1", rig.ports["rig"], timeout=10) as client:
        client.ehlo("c.example")
        assert "PLAIN" in client.esmtp_features["auth"]
        client.login("alice", PASSWORD)
        assert client.sendmail("s@example.org", ["far@remote.example"], BODY) == {}
    assert waitFor(lambda: rig.outbound("far@remote.example"), 5)


def test_swaks_pipelining(rig):
    result = swaks("--server", f"127.0.0.1:{rig.ports['smtp']}", "--to", "pipe@localhost", "--pipeline")
    assert result.returncode == 0, result.stdout
    delivered(rig, "pipe@localhost")


def test_smtplib_smtputf8(rig):
    with smtplib.SMTP("127.0.0.1", rig.ports["smtp"], timeout=10) as client:
        client.ehlo("c.example")
        assert client.has_extn("smtputf8")
        refused = client.sendmail("jörg@example.org", ["zoë@localhost"], BODY, mail_options=["SMTPUTF8"])
        assert refused == {}
    content = delivered(rig, "zoë@localhost")
    assert content.startswith("Return-Path: <jörg@example.org>\n".encode())
    assert b"with UTF8SMTP id" in content


def test_smtplib_bdat_raw(rig):
    payload = b"Subject: chunks\r\n\r\n.not stuffed\r\nQUIT\r\n"
    with smtplib.SMTP("127.0.0.1", rig.ports["smtp"], timeout=10) as client:
        client.ehlo("c.example")
        assert client.has_extn("chunking") and client.has_extn("binarymime")
        client.mail("s@example.org", ["BODY=BINARYMIME"])
        client.rcpt("bdat@localhost")
        client.send(b"BDAT 10\r\n" + payload[:10])
        assert client.getreply()[0] == 250
        client.send(b"BDAT %d LAST\r\n" % (len(payload) - 10) + payload[10:])
        code, text = client.getreply()
        assert code == 250 and text.startswith(b"2.0.0 Ok: queued as")
    assert delivered(rig, "bdat@localhost").endswith(payload.replace(b"\r\n", b"\n"))


def test_msmtp_dsn_parameters_are_stored(tmp_path):
    msmtp = tool("msmtp")
    r = Rig(tmp_path)
    # keep the message queued (the maildir tree cannot be made) to read its envelope
    r.relay.state.mkdir(parents=True)
    (r.relay.state / "mail").write_text("not a directory")
    r.relay.start()
    try:
        result = subprocess.run(
            [
                msmtp,
                "--host=127.0.0.1",
                # authenticated: a client that may not relay gets failure reports only
                f"--port={r.ports['rig']}",
                "--from=s@example.org",
                "--tls=off",
                "--auth=plain",
                "--user=alice",
                f"--passwordeval=echo '{PASSWORD}'",
                "--dsn-notify=success,delay",
                "--dsn-return=hdrs",
                "dsn@localhost",
            ],
            input=BODY,
            capture_output=True,
            timeout=30,
        )
        assert result.returncode == 0, result.stderr
        messages = r.relay.state / "queue" / "messages"
        assert waitFor(lambda: "deferred " in r.relay.logText(), 5)
        [messageFile] = [p for p in messages.iterdir() if QUEUE_ID.match(p.name)]
        envelope = json.loads(fsworker.readMessage(messageFile, messageFile.name)[1])
        assert envelope["ret"] == "HDRS"
        assert envelope["recipients"][0]["notify"] == ["SUCCESS", "DELAY"]
    finally:
        r.relay.stop()


def test_starttls_discards_injected_commands(rig):
    with socket.create_connection(("127.0.0.1", rig.ports["smtp"]), timeout=10) as raw:
        stream = raw.makefile("rb")
        assert stream.readline().startswith(b"220 ")
        raw.sendall(b"EHLO c.example\r\n")
        while not stream.readline().startswith(b"250 "):
            pass
        raw.sendall(b"STARTTLS\r\nMAIL FROM:<evil@example.org>\r\n")
        assert stream.readline().startswith(b"220 2.0.0")
        context = ssl.create_default_context(cafile=str(rig.ca))
        with context.wrap_socket(raw, server_hostname="relay.test") as tls:
            tls.sendall(b"MAIL FROM:<a@example.org>\r\n")
            reply = tls.recv(4096)
            # had the injected MAIL been kept, this would be a nested-MAIL or a 250
            assert reply.startswith(b"503 5.5.1 Error: send HELO/EHLO first"), reply


def test_smuggling_over_a_real_socket(rig):
    with socket.create_connection(("127.0.0.1", rig.ports["smtp"]), timeout=10) as raw:
        stream = raw.makefile("rb")
        stream.readline()
        raw.sendall(b"EHLO c.example\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<smug@localhost>\r\nDATA\r\n")
        lines = []
        for _ in range(30):  # bounded: EHLO's lines, then MAIL, RCPT, DATA
            lines.append(stream.readline())
            if lines[-1][:4] in (b"354 ", b""):
                break
        assert lines[-1].startswith(b"354 "), lines
        raw.sendall(
            b"Subject: x\r\n\r\ntext\n.\nMAIL FROM:<evil@example.org>\r\nRCPT TO:<victim@localhost>\r\n"
            b"DATA\r\nsmuggled\r\n\r\n.\r\nQUIT\r\n"
        )
        assert stream.readline().startswith(b"554 5.6.0")
        assert stream.readline().startswith(b"221 ")
    assert not rig.relay.delivered("victim@localhost")
    assert not rig.relay.delivered("smug@localhost")


def test_nmap_finds_no_open_relay(rig):
    nmap = tool("nmap")
    result = subprocess.run(
        [
            nmap,
            "-Pn",
            "-n",
            "-sV",  # the script only runs on a port nmap has identified as SMTP
            "--version-light",
            "-p",
            str(rig.ports["smtp"]),
            "--script",
            "smtp-open-relay",
            "--script-args",
            "smtp-open-relay.domain=relay.test",
            "127.0.0.1",
        ],
        capture_output=True,
        timeout=120,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "smtp-open-relay: Server doesn't seem to be an open relay, all tests failed" in result.stdout, result.stdout
    outbound = rig.relay.state / "outbound"
    assert not outbound.exists() or not list(outbound.rglob("new/*"))
