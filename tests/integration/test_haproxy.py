"""
The real relay behind a real HAProxy (Debian's package), which passes each
client's address in a PROXY protocol header: v2 (C{send-proxy-v2}) on a
STARTTLS listener and an implicit-TLS one, v1 (C{send-proxy}) on a third.

HAProxy connects to the relay from 127.0.0.1; the client connects to HAProxy
from 127.0.0.2, the only address in relay_networks.  So the client may relay
only if the relay takes its address from the header, and the Received header
and the connect line name 127.0.0.2 only if every part of the session does.

HAPROXY_CFG is the configuration docs/deploy.rst shows for a cluster, reduced
to one relay: add a C{server} line per node.
"""

from __future__ import annotations

import smtplib
import socket
import ssl
import time
from pathlib import Path

import pytest
from certs import PKI
from haproxy import HAProxy
from relayproc import OUTBOUND_MAILDIR, RELAY_SECTION, Relay, freePort, tool, waitFor

pytestmark = pytest.mark.integration

# mode tcp: HAProxy passes the SMTP session through untouched (STARTTLS and
# implicit TLS included) after the header.  "check" probes each relay; with
# "check-send-proxy" the probe starts with a PROXY v2 LOCAL header, which the
# relay answers as a connection from the balancer itself.
HAPROXY_CFG = """\
global
    maxconn 4096

defaults
    mode tcp
    timeout connect 5s
    timeout client 5m
    timeout server 5m

# Port 25 style: STARTTLS, the client's address in a PROXY v2 header.
frontend smtp
    bind 127.0.0.1:{front_smtp}
    default_backend relays_smtp

backend relays_smtp
    server relay1 127.0.0.1:{relay_smtp} send-proxy-v2 check check-send-proxy inter 2s

# Port 465 style: implicit TLS; the header goes first, in clear, then the handshake.
frontend smtps
    bind 127.0.0.1:{front_smtps}
    default_backend relays_smtps

backend relays_smtps
    server relay1 127.0.0.1:{relay_smtps} send-proxy-v2

# The same with the text header of version 1 (send-proxy).
frontend smtp_v1
    bind 127.0.0.1:{front_v1}
    default_backend relays_v1

backend relays_v1
    server relay1 127.0.0.1:{relay_v1} send-proxy
"""

RELAY_CFG = (
    RELAY_SECTION
    + """\

[listener:smtp]
endpoint = tcp:{relay_smtp}:interface=127.0.0.1
tls = starttls
proxy_protocol = v2
proxy_timeout = 2s

[listener:smtps]
endpoint = tcp:{relay_smtps}:interface=127.0.0.1
tls = implicit
proxy_protocol = v2

[listener:smtp_v1]
endpoint = tcp:{relay_v1}:interface=127.0.0.1
proxy_protocol = v1

[tls]
certificate = {cert}
private_key = {key}

[policy]
local_domains = localhost
relay_networks = 127.0.0.2/32

[queue]
retry = 1h

"""
    + OUTBOUND_MAILDIR
)

CLIENT = "127.0.0.2"  # in relay_networks; HAProxy itself connects from 127.0.0.1, which is not
BODY = b"Subject: proxied\r\n\r\nhello\r\n"


class Rig:
    def __init__(self, workdir: Path) -> None:
        pki = PKI(workdir / "pki")
        cert, key = pki.issue("relay.test", "127.0.0.1")
        self.ca = str(pki.ca_file)
        self.ports = {
            name: freePort()
            for name in ("relay_smtp", "relay_smtps", "relay_v1", "front_smtp", "front_smtps", "front_v1")
        }
        config = RELAY_CFG.format(state=workdir / "var", cert=cert, key=key, **self.ports)
        self.relay = Relay(workdir, config=config, port=self.ports["relay_smtp"])
        haproxyConfig = workdir / "haproxy.cfg"
        haproxyConfig.write_text(HAPROXY_CFG.format(**self.ports))
        self.haproxy = HAProxy(haproxyConfig, [self.ports[p] for p in ("front_smtp", "front_smtps", "front_v1")])

    def tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.ca)

    def smtp(self, frontend: str, source: str = CLIENT) -> smtplib.SMTP:
        port = self.ports[frontend]
        if frontend == "front_smtps":
            return smtplib.SMTP_SSL("127.0.0.1", port, source_address=(source, 0), timeout=10, context=self.tls())
        return smtplib.SMTP("127.0.0.1", port, source_address=(source, 0), timeout=10)

    def stored(self, path: str) -> bytes:
        """The one message delivered to C{path} (under state_dir), waited for."""
        new = self.relay.state / path / "new"
        assert waitFor(lambda: new.is_dir() and any(new.iterdir()), 15), f"nothing delivered to {path}"
        [message] = list(new.iterdir())
        return message.read_bytes()

    def logged(self, fragment: str) -> bool:
        return waitFor(lambda: fragment in self.relay.logText(), 10)


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    tool("haproxy")
    r = Rig(tmp_path_factory.mktemp("haproxy"))
    r.relay.start()
    try:
        r.haproxy.start()
        yield r
    finally:
        r.haproxy.stop()
        r.relay.stop()


def test_the_balancers_health_checks_are_greeted(rig):
    """
    check-send-proxy: HAProxy's probes (every 2 s) start with a v2 LOCAL
    header and are sessions from the balancer itself, not refusals.  First in
    this file, before any client connects from 127.0.0.1.
    """
    assert rig.logged("event=connect client=127.0.0.1 ")
    assert "reason=proxy_header" not in rig.relay.logText()


@pytest.mark.parametrize("frontend", ["front_smtp", "front_v1"])
def test_relay_networks_and_received_see_the_client(rig, frontend):
    """
    From 127.0.0.2 (in relay_networks) through HAProxy, mail to another
    domain is relayed; the relay saw HAProxy's connection come from
    127.0.0.1, so only the header could have told it.
    """
    with rig.smtp(frontend) as client:
        client.ehlo("client.test")
        refused = client.sendmail("a@example.org", [f"far-{frontend}@elsewhere.example"], BODY)
        assert refused == {}
    message = rig.stored(f"outbound/elsewhere.example/far-{frontend}")
    # Delivered maildir files have LF line ends, Return-Path and Delivered-To on top.
    assert b"\nReceived: from client.test ([127.0.0.2])\n\tby relay.test (relay) with ESMTP id " in message, message
    assert rig.logged("event=connect client=127.0.0.2 ")
    assert rig.logged("event=accepted ")
    accepted = [line for line in rig.relay.logText().splitlines() if f"far-{frontend}" in line or "accepted" in line]
    assert any("client=127.0.0.2" in line for line in accepted)


@pytest.mark.parametrize("frontend", ["front_smtp", "front_v1"])
def test_a_client_outside_relay_networks_may_not_relay(rig, frontend):
    with rig.smtp(frontend, source="127.0.0.1") as client:
        client.ehlo("outsider.test")
        code, text = client.mail("a@example.org")
        assert code == 250
        code, text = client.rcpt("far@elsewhere.example")
        assert (code, text[:5]) == (550, b"5.7.1"), text
        assert client.rcpt("someone@localhost")[0] == 250


def test_starttls_through_haproxy(rig):
    with rig.smtp("front_smtp") as client:
        client.ehlo("tls.test")
        assert client.has_extn("starttls")
        client.starttls(context=rig.tls())
        client.ehlo("tls.test")
        assert client.sendmail("a@example.org", ["starttls@localhost"], BODY) == {}
        assert client.sock.version() in ("TLSv1.2", "TLSv1.3")
    message = rig.stored("mail/localhost/starttls")
    assert b"\nReceived: from tls.test ([127.0.0.2])\n\tby relay.test (relay) with ESMTPS id " in message, message


def test_implicit_tls_through_haproxy(rig):
    """HAProxy sends the header in clear, then passes the client's TLS handshake through."""
    with rig.smtp("front_smtps") as client:
        client.ehlo("smtps.test")
        assert client.sendmail("a@example.org", ["far-smtps@elsewhere.example"], BODY) == {}
    message = rig.stored("outbound/elsewhere.example/far-smtps")
    assert b"\nReceived: from smtps.test ([127.0.0.2])\n\tby relay.test (relay) with ESMTPS id " in message, message


def test_a_direct_connection_without_a_header_is_closed_without_a_greeting(rig):
    with socket.create_connection(("127.0.0.1", rig.ports["relay_smtp"]), timeout=10) as s:
        s.sendall(b"EHLO direct.test\r\n")
        assert s.recv(1024) == b""
    assert rig.logged("event=rejected reason=proxy_header client=127.0.0.1 ")
    assert "no PROXY v2 header" in rig.relay.logText()
    # A v1 header on the v2 listener is named as such.
    with socket.create_connection(("127.0.0.1", rig.ports["relay_smtp"]), timeout=10) as s:
        s.sendall(b"PROXY TCP4 127.0.0.2 127.0.0.1 1000 25\r\nEHLO direct.test\r\n")
        assert s.recv(1024) == b""


def test_a_silent_direct_connection_is_closed_at_the_proxy_timeout(rig):
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", rig.ports["relay_smtp"]), timeout=10) as s:
        assert s.recv(1024) == b""
    took = time.monotonic() - started
    print(f"\nsilent connection closed after {took:.2f}s (proxy_timeout = 2s)")
    assert 1.5 < took < 8  # the refusal line itself is rate-limited: the test above logged one for 127.0.0.1
