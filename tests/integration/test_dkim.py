"""
DKIM signing in the real twistd relay: mail from a relay client, relayed to a
scripted next hop, arrives signed and verifies with dkimpy against the public
key served by a DNS server on 127.0.0.1 (RSA for one domain, Ed25519 for
another); mail from an outside client is not signed.
"""

from __future__ import annotations

import smtplib

import dkim
import dns.resolver
import pytest
from dnszone import TXT, DNSZone, Zone
from relayproc import freePort, smarthostConfig, waitFor
from scriptedpeer import LaxPeer
from test_filters_dkim import edKey, rsaKey

pytestmark = pytest.mark.integration

# Two signing domains on a relay whose relay client is 127.0.0.2 alone.
FILTERS = """\

[filter:org]
plugin = dkim
domain = example.org
selector = rsa1
private_key = {rsa}

[filter:net]
plugin = dkim
domain = example.net
selector = ed1
private_key = {ed}
"""


def message(author: str) -> bytes:
    return (
        f"From: <{author}>\r\nTo: <bob@far.example>\r\nSubject: signed?\r\n"
        f"Message-ID: <{author}.1@test>\r\n\r\nHello,\r\n\r\nthe body.\r\n"
    ).encode()


@pytest.fixture
def dnsServer(tmp_path):
    rsaPath, rsaRecord = rsaKey(tmp_path)
    edPath, edRecord = edKey(tmp_path)
    zones = {
        "example.org": Zone([TXT("rsa1._domainkey.example.org", rsaRecord.decode())]),
        "example.net": Zone([TXT("ed1._domainkey.example.net", edRecord.decode())]),
    }
    with DNSZone(tmp_path / "dns", zones) as server:
        yield server, rsaPath, edPath


def dnsfunc(server):
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = ["127.0.0.1"]
    resolver.port = server.port

    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        answer = resolver.resolve(name.decode().rstrip("."), "TXT", lifetime=timeout)
        return b"".join(b"".join(record.strings) for record in answer)

    return lookup


def test_relayed_mail_is_signed_and_verifies_outside_mail_is_not(relay, tmp_path, dnsServer):
    server, rsaPath, edPath = dnsServer
    peer = LaxPeer().start()
    try:
        port = freePort()
        config = smarthostConfig(
            tmp_path / "var", port, peer.port, policy="filters = org net", relayNetworks="127.0.0.2/32"
        ) + FILTERS.format(rsa=rsaPath, ed=edPath)
        r = relay(config=config, port=port).start()
        with smtplib.SMTP("127.0.0.1", r.port, timeout=20, source_address=("127.0.0.2", 0)) as inside:
            assert inside.sendmail("ann@example.org", ["bob@far.example"], message("ann@example.org")) == {}
            assert inside.sendmail("cat@example.net", ["bob@far.example"], message("cat@mail.example.net")) == {}
        with smtplib.SMTP("127.0.0.1", r.port, timeout=20) as outside:
            assert outside.sendmail("ann@example.org", ["postmaster@localhost"], message("ann@example.org")) == {}
        assert peer.waitForMessages(2), r.logText()[-3000:]
        lookup = dnsfunc(server)
        byAuthor = {}
        for m in peer.messages:
            byAuthor[b"example.net" in m.data.split(b"From:")[1][:40]] = m.data
        for isNet, data in byAuthor.items():
            assert data.count(b"DKIM-Signature:") == 1
            assert (b"d=example.net" if isNet else b"d=example.org") in data
            assert (b"a=ed25519-sha256" if isNet else b"a=rsa-sha256") in data
            assert dkim.verify(data, dnsfunc=lookup), data[:1500]
            assert not dkim.verify(data.replace(b"the body.", b"the BODY."), dnsfunc=lookup)
        assert waitFor(lambda: len(r.delivered("postmaster@localhost")) == 1, 10)
        local = r.delivered("postmaster@localhost")[0].read_bytes()
        assert b"DKIM-Signature" not in local
        log = r.logText()
        assert "filters=org:continue,net:continue" in log
        assert log.count("event=accepted") == 3
    finally:
        peer.stop()
