"""
Outbound delivery with the real process: relay → aiosmtpd peers found through
a twisted.names DNS server on 127.0.0.1 (MX), or configured as a smart host.
"""

from __future__ import annotations

import email
import email.policy
import smtplib
from pathlib import Path

import pytest
from certs import PKI
from peers import DNSServer, Handler, SMTPPeer, waitForMessages
from relayproc import HEAD, Relay, freePort, waitFor

pytestmark = pytest.mark.integration

BODY = b"Subject: out\r\nFrom: sender@localhost\r\n\r\nline one\r\n.dot line\r\n..two dots\r\nlast\r\n"

BASE = (
    HEAD
    + """\
local_domains = localhost

[queue]
retry = 1s

[delivery:local]
plugin = maildir

{delivery}

[routes]
localhost = local
* = internet
"""
)

EXAMPLE_ZONE = """\
    MX('example.test', 10, 'mx1.example.test'),
    MX('example.test', 20, 'mx2.example.test'),
    A('mx1.example.test', '127.0.0.2'),
    A('mx2.example.test', '127.0.0.1'),
"""
NULL_MX_ZONE = """\
    MX('nullmx.test', 0, ''),
"""


def relayWith(relay, tmp_path: Path, delivery: str) -> Relay:
    """A started relay (the fixture stops it) with one more [delivery:internet] section."""
    port = freePort()
    return relay(config=BASE.format(state=tmp_path / "var", port=port, delivery=delivery), port=port).start()


def send(port: int, recipients: list[str], sender: str = "sender@localhost", body: bytes = BODY) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        assert client.sendmail(sender, recipients, body) == {}


def reports(r: Relay, address: str = "sender@localhost") -> list[email.message.Message]:
    return [email.message_from_bytes(p.read_bytes(), policy=email.policy.default) for p in r.delivered(address)]


def statuses(report: email.message.Message) -> dict[str, str]:
    """Final-Recipient → Status of a delivery-status report."""
    found = {}
    for part in report.walk():
        if part.get_content_type() == "message/delivery-status":
            for block in part.get_payload()[1:]:
                found[block["Final-Recipient"].split(";")[1].strip()] = block["Status"]
    return found


@pytest.fixture
def smtpPeers():
    """Start aiosmtpd peers; all are stopped after the test."""
    started: list[SMTPPeer] = []

    def peer(handler: Handler | None = None, **kwargs) -> SMTPPeer:
        started.append(SMTPPeer(handler, **kwargs).start())
        return started[-1]

    yield peer
    for each in started:
        each.stop()


@pytest.fixture
def mxWorld(tmp_path, smtpPeers):
    """A DNS server for example.test (MX 10 → 127.0.0.2, nothing there; MX 20 → 127.0.0.1) and peers."""
    dns = DNSServer(tmp_path, {"example.test": EXAMPLE_ZONE, "nullmx.test": NULL_MX_ZONE}).start()
    yield dns, smtpPeers
    dns.stop()


def mxDelivery(dns: DNSServer, port: int, tls: str = "opportunistic") -> str:
    return f"[delivery:internet]\nplugin = mx\nport = {port}\ntls = {tls}\nnameservers = 127.0.0.1:{dns.port}\n"


def test_first_mx_down_second_gets_it_byte_identical(relay, tmp_path, mxWorld):
    dns, peer = mxWorld
    sink = peer()
    r = relayWith(relay, tmp_path, mxDelivery(dns, sink.port))
    send(r.port, ["someone@example.test"])
    assert waitForMessages(sink, 1), r.logText()[-3000:]
    [message] = sink.messages
    assert message.recipients == ["someone@example.test"]
    assert message.data.endswith(BODY)
    assert message.data.startswith(b"Received: ")
    assert waitFor(lambda: "delivered " in r.logText(), 5)
    assert "127.0.0.2" in r.logText()  # the first MX was tried, and refused
    # The line names the exchanger that took it, not the first one tried.
    assert f"to=<someone@example.test> backend=internet relay=127.0.0.1:{sink.port} code=250" in r.logText()


def test_one_of_three_refused_two_delivered_one_bounced(relay, tmp_path, mxWorld):
    dns, peer = mxWorld
    sink = peer(Handler(rcpt=lambda a: "550 5.1.1 no such user" if a.startswith("ghost@") else None))
    r = relayWith(relay, tmp_path, mxDelivery(dns, sink.port))
    send(r.port, ["a@example.test", "ghost@example.test", "b@example.test"])
    assert waitForMessages(sink, 1), r.logText()[-3000:]
    assert sink.messages[0].recipients == ["a@example.test", "b@example.test"]
    assert waitFor(lambda: len(reports(r)) == 1, 10), r.logText()[-3000:]
    assert statuses(reports(r)[0]) == {"ghost@example.test": "5.1.1"}
    log = r.logText()
    assert "event=bounced queue_id=" in log
    assert f"to=<ghost@example.test> backend=internet relay=127.0.0.1:{sink.port} code=550 dsn=5.1.1" in log
    assert f"to=<a@example.test> backend=internet relay=127.0.0.1:{sink.port} code=250" in log


def test_temporary_refusal_is_retried_and_delivered(relay, tmp_path, mxWorld):
    dns, peer = mxWorld
    seen: list[str] = []

    def onceBusy(address: str) -> str | None:
        seen.append(address)
        return "451 4.2.1 try again later" if len(seen) == 1 else None

    sink = peer(Handler(rcpt=onceBusy))
    r = relayWith(relay, tmp_path, mxDelivery(dns, sink.port))
    send(r.port, ["later@example.test"])
    assert waitForMessages(sink, 1, timeout=20), r.logText()[-3000:]
    assert len(seen) == 2
    assert "deferred " in r.logText()
    assert f"to=<later@example.test> backend=internet relay=127.0.0.1:{sink.port} code=451 dsn=4.2.1" in r.logText()
    assert reports(r) == []


def test_null_mx_bounces_with_5_1_10(relay, tmp_path, mxWorld):
    dns, peer = mxWorld
    sink = peer()
    r = relayWith(relay, tmp_path, mxDelivery(dns, sink.port))
    send(r.port, ["nobody@nullmx.test"])
    assert waitFor(lambda: len(reports(r)) == 1, 10), r.logText()[-3000:]
    assert statuses(reports(r)[0]) == {"nobody@nullmx.test": "5.1.10"}
    assert sink.messages == []


def smartHost(peerPort: int, pki: PKI | None, tmp_path: Path, password: str = "secret", verify: str = "yes") -> str:
    (tmp_path / "password").write_text(password + "\n")
    lines = ["[delivery:internet]", "plugin = smarthost", "host = localhost", f"port = {peerPort}"]
    if pki is not None:
        lines += ["tls = starttls", f"verify = {verify}", f"ca_file = {pki.ca_file}"]
    else:
        lines += ["tls = none"]
    lines += ["username = relayuser", f"password_file = {tmp_path / 'password'}"]
    return "\n".join(lines) + "\n"


def test_smart_host_with_starttls_and_auth(relay, tmp_path, pki, smtpPeers):
    peer = smtpPeers(certificate=pki.issue("localhost"), users={"relayuser": "secret"})
    r = relayWith(relay, tmp_path, smartHost(peer.port, pki, tmp_path))
    send(r.port, ["far@elsewhere.test"])
    assert waitForMessages(peer, 1), r.logText()[-3000:]
    assert peer.messages[0].data.endswith(BODY)


def test_smart_host_wrong_password_defers_not_bounces(relay, tmp_path, pki, smtpPeers):
    peer = smtpPeers(certificate=pki.issue("localhost"), users={"relayuser": "secret"})
    r = relayWith(relay, tmp_path, smartHost(peer.port, pki, tmp_path, password="wrong"))
    send(r.port, ["far@elsewhere.test"])
    assert waitFor(lambda: r.logText().count("deferred ") >= 2, 15), r.logText()[-3000:]
    assert "AUTH refused" in r.logText()
    assert peer.messages == [] and reports(r) == []
    # A session that failed still names the server it failed with.
    assert f"to=<far@elsewhere.test> backend=internet relay=127.0.0.1:{peer.port} code=" in r.logText()


def test_smart_host_certificate_for_another_name_defers(relay, tmp_path, pki, smtpPeers):
    peer = smtpPeers(certificate=pki.issue("other.example"), users={"relayuser": "secret"})
    r = relayWith(relay, tmp_path, smartHost(peer.port, pki, tmp_path))
    send(r.port, ["far@elsewhere.test"])
    assert waitFor(lambda: r.logText().count("deferred ") >= 2, 15), r.logText()[-3000:]
    assert peer.messages == [] and reports(r) == []


def test_notify_success_through_a_hop_without_dsn_gets_a_relayed_report(relay, tmp_path, mxWorld):
    dns, peer = mxWorld
    sink = peer()  # aiosmtpd does not offer DSN
    r = relayWith(relay, tmp_path, mxDelivery(dns, sink.port))
    with smtplib.SMTP("127.0.0.1", r.port, timeout=10) as client:
        client.ehlo("client.test")
        client.mail("sender@localhost")
        assert client.rcpt("tracked@example.test", options=["NOTIFY=SUCCESS"])[0] == 250
        assert client.data(BODY)[0] == 250
    assert waitForMessages(sink, 1), r.logText()[-3000:]
    assert waitFor(lambda: len(reports(r)) == 1, 10), r.logText()[-3000:]
    [report] = reports(r)
    assert "Relayed" in report["Subject"]
    for part in report.walk():
        if part.get_content_type() == "message/delivery-status":
            assert part.get_payload()[1]["Action"] == "relayed"


def test_sessions_are_reused_for_the_next_messages(relay, tmp_path, mxWorld):
    dns, peer = mxWorld
    sink = peer()
    r = relayWith(relay, tmp_path, mxDelivery(dns, sink.port))
    for n in range(3):
        send(r.port, [f"r{n}@example.test"])
        assert waitForMessages(sink, n + 1), r.logText()[-3000:]
    assert sink.handler.ehlos == 1  # one session for the three


def test_opportunistic_tls_that_fails_falls_back_to_plain(relay, tmp_path, mxWorld, pki):
    dns, peer = mxWorld
    sink = peer(certificate=pki.issue("mx2.example.test"), brokenTLS=True)
    r = relayWith(relay, tmp_path, mxDelivery(dns, sink.port))
    send(r.port, ["plain@example.test"])
    assert waitForMessages(sink, 1), r.logText()[-3000:]
    assert "trying again without it" in r.logText()


def test_required_tls_that_fails_defers(relay, tmp_path, mxWorld, pki):
    dns, peer = mxWorld
    sink = peer(certificate=pki.issue("mx2.example.test"), brokenTLS=True)
    r = relayWith(relay, tmp_path, mxDelivery(dns, sink.port, tls="required"))
    send(r.port, ["secret@example.test"])
    assert waitFor(lambda: r.logText().count("deferred ") >= 2, 15), r.logText()[-3000:]
    assert sink.messages == [] and reports(r) == []


def test_smart_host_with_implicit_tls(relay, tmp_path, pki, smtpPeers):
    peer = smtpPeers(certificate=pki.issue("localhost"), implicit=True)
    config = (
        f"[delivery:internet]\nplugin = smarthost\nhost = localhost\nport = {peer.port}\n"
        f"tls = implicit\nca_file = {pki.ca_file}\n"
    )
    r = relayWith(relay, tmp_path, config)
    send(r.port, ["far@elsewhere.test"])
    assert waitForMessages(peer, 1), r.logText()[-3000:]
    assert peer.messages[0].data.endswith(BODY)


def test_smart_host_lines_name_the_relay_actually_used(relay, tmp_path, smtpPeers):
    """
    relay=ADDRESS:PORT is the server the attempt talked to (host = localhost
    reached at 127.0.0.1); an attempt that had no session (nothing listening
    yet) is deferred without it.
    """
    port = freePort()
    lines = ["[delivery:internet]", "plugin = smarthost", "host = localhost", f"port = {port}", "tls = none"]
    r = relayWith(relay, tmp_path, "\n".join(lines) + "\n")
    send(r.port, ["far@elsewhere.test"])
    assert waitFor(lambda: "event=deferred " in r.logText(), 10), r.logText()[-3000:]
    [deferred] = [line for line in r.logText().splitlines() if "event=deferred " in line][:1]
    assert "to=<far@elsewhere.test> backend=internet code=451 dsn=4.4.1" in deferred and "relay=" not in deferred
    peer = smtpPeers(port=port)
    assert waitForMessages(peer, 1, timeout=20), r.logText()[-3000:]
    assert waitFor(lambda: "event=delivered " in r.logText(), 5), r.logText()[-3000:]
    assert f"to=<far@elsewhere.test> backend=internet relay=127.0.0.1:{port} code=250" in r.logText()
