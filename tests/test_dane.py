"""
DANE (relay/delivery/dane.py): which TLSA records match which chains, what a
lookup makes of DNS answers, and the check of a real handshake.

Certificates come from tests/certs.py: a leaf issued by an intermediate,
sent as the server sends it (leaf, then intermediate), so the DANE-TA cases
anchor at the intermediate.  The DNS cases run against tests/dnszone.py, a
real server on 127.0.0.1 that sets the AD bit for authenticated zones.
"""

from __future__ import annotations

import datetime
import hashlib
import time

import dns.flags
import dns.resolver
import pytest
from certs import PKI
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from deferred import result
from dnszone import AAAA, MX, TLSA, TXT, A, DNSZone, Zone
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from OpenSSL import crypto
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test import iosim

from relay.delivery import dane
from relay.delivery.dane import HostPolicy, Mode, TLSARecord
from relay.delivery.mx import _nameservers
from relay.smtp.tls import clientOptions, serverOptions

HOST = "mx.example.test"
NOW = time.time()


def load(path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(path.read_bytes())


def association(certificate: x509.Certificate, selector: int, mtype: int) -> bytes:
    if selector == 0:
        data = certificate.public_bytes(serialization.Encoding.DER)
    else:
        data = certificate.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    return {0: data, 1: hashlib.sha256(data).digest(), 2: hashlib.sha512(data).digest()}[mtype]


def record(usage: int, selector: int, mtype: int, certificate: x509.Certificate) -> TLSARecord:
    return TLSARecord(usage, selector, mtype, association(certificate, selector, mtype))


@pytest.fixture
def chain(pki: PKI) -> list[x509.Certificate]:
    """What the MX sends: leaf for HOST, then the intermediate that issued it."""
    cert, _ = pki.issue(HOST)
    found = load(cert)
    assert len(found) == 2
    return found


# -- matching ---------------------------------------------------------------------


@pytest.mark.parametrize("usage, selector, mtype", [(3, 1, 1), (3, 0, 1), (3, 1, 2), (3, 0, 0), (3, 1, 0)])
def test_dane_ee_matches_the_leaf(chain, usage, selector, mtype) -> None:
    assert dane.matches([record(usage, selector, mtype, chain[0])], chain, [HOST], NOW)


@pytest.mark.parametrize("usage, selector, mtype", [(2, 1, 1), (2, 0, 1), (2, 1, 2), (2, 0, 0)])
def test_dane_ta_matches_the_intermediate(chain, usage, selector, mtype) -> None:
    assert dane.matches([record(usage, selector, mtype, chain[1])], chain, [HOST], NOW)


def test_chain_as_pyopenssl_certificates(chain) -> None:
    """The form pyOpenSSL's get_peer_cert_chain() gives by default."""
    openssl = [crypto.X509.from_cryptography(each) for each in chain]
    assert dane.matches([record(3, 1, 1, chain[0])], openssl, [HOST], NOW)
    assert dane.matches([record(2, 1, 1, chain[1])], openssl, [HOST], NOW)


def test_mismatching_digest_does_not_match(chain) -> None:
    good = record(3, 1, 1, chain[0])
    bad = TLSARecord(3, 1, 1, bytes(b ^ 0xFF for b in good.data))
    assert not dane.matches([bad], chain, [HOST], NOW)
    verdict = dane._verify([bad], chain, [HOST], NOW)
    assert verdict.result == dane.VALIDATION_FAILURE
    # The leaf's key is not a trust anchor, nor the intermediate's an end entity.
    assert not dane.matches([record(2, 1, 1, chain[0])], chain, [HOST], NOW)
    assert not dane.matches([record(3, 1, 1, chain[1])], chain, [HOST], NOW)


def test_pkix_usages_are_unusable(chain) -> None:
    """RFC 7672 3.1.3: PKIX-TA(0) and PKIX-EE(1) mean nothing to SMTP, even when they would match."""
    records = [record(0, 1, 1, chain[1]), record(1, 1, 1, chain[0])]
    assert dane.usable(records) == ()
    assert not dane.matches(records, chain, [HOST], NOW)
    # Unknown selectors and matching types, and digests of the wrong length, are unusable too.
    odd = [TLSARecord(3, 2, 1, b"\0" * 32), TLSARecord(3, 1, 3, b"\0" * 32), TLSARecord(3, 1, 1, b"\0" * 31)]
    assert dane.usable(odd) == ()
    assert dane.usable(records + [record(3, 1, 1, chain[0])]) == (record(3, 1, 1, chain[0]),)


def test_trust_anchor_that_did_not_issue_the_leaf(chain, tmp_path) -> None:
    other = PKI(tmp_path / "other")
    otherChain = load(other.issue(HOST)[0])
    assert not dane.matches([record(2, 1, 1, otherChain[1])], chain, [HOST], NOW)
    # Sent by the peer beside the real chain, it still does not anchor the leaf.
    assert not dane.matches([record(2, 1, 1, otherChain[1])], chain + otherChain[1:], [HOST], NOW)


def test_trust_anchor_not_sent_by_the_peer(pki, chain) -> None:
    """A digest can only match a certificate the peer sent; a full key (2 1 0) checks the signature."""
    root = x509.load_pem_x509_certificate(pki.ca_file.read_bytes())
    assert not dane.matches([record(2, 1, 1, root)], chain, [HOST], NOW)
    assert dane.matches([record(2, 1, 0, root)], chain, [HOST], NOW)
    assert dane.matches([record(2, 1, 0, chain[1])], chain[:1], [HOST], NOW)


def test_chain_in_any_order(chain) -> None:
    assert dane.matches([record(2, 1, 1, chain[1])], [chain[0], chain[1], chain[1]], [HOST], NOW)
    assert not dane.matches([record(2, 1, 1, chain[1])], [chain[1], chain[0]], [HOST], NOW)  # leaf first


def test_dane_ta_checks_the_name_and_dane_ee_does_not(chain) -> None:
    ta, ee = record(2, 1, 1, chain[1]), record(3, 1, 1, chain[0])
    verdict = dane._verify([ta], chain, ["other.example.test"], NOW)
    assert not verdict.ok and verdict.result == dane.CERTIFICATE_HOST_MISMATCH
    assert dane.matches([ee], chain, ["other.example.test"], NOW)
    # Either reference identifier will do: the TLSA base domain or the MX host name.
    assert dane.matches([ta], chain, ["base.example.test", HOST.upper() + "."], NOW)


def test_wildcard_stands_for_one_label(pki) -> None:
    wildcard = load(pki.issue("*.example.test", name="wild")[0])
    ta = record(2, 1, 1, wildcard[1])
    assert dane.matches([ta], wildcard, [HOST], NOW)
    assert not dane.matches([ta], wildcard, ["a.mx.example.test"], NOW)
    assert not dane.matches([ta], wildcard, ["example.test"], NOW)


def test_dane_ta_checks_dates_and_dane_ee_does_not(pki) -> None:
    past = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
    expired = load(pki.issue(HOST, name="old", not_before=past, not_after=past + datetime.timedelta(days=1))[0])
    verdict = dane._verify([record(2, 1, 1, expired[1])], expired, [HOST], NOW)
    assert not verdict.ok and verdict.result == dane.CERTIFICATE_EXPIRED
    assert dane.matches([record(3, 1, 1, expired[0])], expired, [HOST], NOW)
    # The clock is the caller's: the same chain was fine when it was current.
    assert dane.matches([record(2, 1, 1, expired[1])], expired, [HOST], past.timestamp() + 3600)


def test_no_certificate(chain) -> None:
    assert not dane.matches([record(3, 1, 1, chain[0])], [], [HOST], NOW)


usages = st.one_of(st.sampled_from([0, 1, 2, 3]), st.integers(0, 255))
records = st.builds(
    TLSARecord,
    usage=usages,
    selector=st.one_of(st.sampled_from([0, 1]), st.integers(0, 255)),
    mtype=st.one_of(st.sampled_from([0, 1, 2]), st.integers(0, 255)),
    data=st.one_of(st.binary(max_size=80), st.binary(min_size=32, max_size=32), st.binary(min_size=64, max_size=64)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(records, max_size=6), st.lists(st.integers(0, 2), max_size=4), st.lists(st.text(max_size=20)))
def test_random_records_never_crash(chain, tlsa, picks, names) -> None:
    """Whatever a zone publishes and whatever order a peer sends certificates in: True or False."""
    certificates = [chain[i] for i in picks if i < len(chain)]
    assert dane.matches(tlsa, certificates, names, NOW) in (True, False)


def test_random_full_keys_never_crash(chain) -> None:
    """A 2 1 0 whose data is not a key, or an unsupported one, matches nothing."""
    for data in (b"", b"\x30\x00", b"\x30\x03\x02\x01\x00", association(chain[0], 0, 0)):
        assert not dane.matches([TLSARecord(2, 1, 0, data)], chain, [HOST], NOW)


# -- lookup -----------------------------------------------------------------------


class Answers:
    """A resolve callable over fixed answers: name -> (rdatas or None, authenticated) or an exception."""

    def __init__(self, answers: dict) -> None:
        self.answers = answers
        self.asked: list[tuple[str, str]] = []

    async def __call__(self, name: str, rdtype: str):
        self.asked.append((name, rdtype))
        found = self.answers.get(name, dns.resolver.NXDOMAIN())
        if isinstance(found, Exception):
            raise found
        return found


def lookup(resolve, host: str = HOST, **kwargs) -> HostPolicy:
    return result(Deferred.fromCoroutine(dane.lookup(resolve, host, **kwargs)))


def tlsaRdata(text: str):
    import dns.rdata

    return dns.rdata.from_text("IN", "TLSA", text)


def test_lookup_modes(chain) -> None:
    ee = record(3, 1, 1, chain[0])
    name = f"_25._tcp.{HOST}"
    policy = lookup(Answers({name: ([tlsaRdata(str(ee))], True)}))
    assert policy.mode is Mode.AUTHENTICATE and policy.requiresTLS
    assert policy.records == (ee,) and policy.names == (HOST,)
    assert policy.policyStrings() == [str(ee)]

    assert lookup(Answers({name: ([tlsaRdata(str(ee))], False)})).mode is Mode.NONE  # unauthenticated: ignored
    assert lookup(Answers({name: (None, True)})).mode is Mode.NONE  # NODATA
    assert lookup(Answers({})).mode is Mode.NONE  # NXDOMAIN

    unusable = lookup(Answers({name: ([tlsaRdata("1 1 1 " + "ab" * 32)], True)}))
    assert unusable.mode is Mode.TLS_ONLY and unusable.requiresTLS and unusable.result == dane.TLSA_INVALID

    failed = lookup(Answers({name: dns.resolver.NoNameservers()}))
    assert failed.mode is Mode.FAILED and not failed.requiresTLS and failed.result == dane.DNSSEC_INVALID
    assert failed.status().code == 451 and failed.status().enhanced == "4.7.5"

    resolve = Answers({name: ([tlsaRdata(str(ee))], True)})
    assert lookup(resolve, secure=False).mode is Mode.NONE
    assert resolve.asked == []  # an insecure MX gets no TLSA query at all
    assert lookup(resolve, port=465, host=HOST + ".").mode is Mode.NONE
    assert resolve.asked == [(f"_465._tcp.{HOST}", "TLSA")]


def test_check_by_mode(chain) -> None:
    ee = record(3, 1, 1, chain[0])
    required = HostPolicy(HOST, Mode.AUTHENTICATE, (ee,), names=(HOST,))
    verdict = dane.check(required, chain, NOW)
    assert verdict.ok and verdict.verified and verdict.matched == ee
    clear = dane.check(required, None, NOW)
    assert not clear.ok and clear.result == dane.STARTTLS_NOT_SUPPORTED
    assert clear.status().enhanced == "4.7.5" and clear.status().code == 451
    wrong = HostPolicy(HOST, Mode.AUTHENTICATE, (record(3, 1, 1, chain[1]),), names=(HOST,))
    assert not dane.check(wrong, chain, NOW).ok
    tlsOnly = HostPolicy(HOST, Mode.TLS_ONLY, (record(1, 1, 1, chain[0]),), names=(HOST,))
    assert dane.check(tlsOnly, chain, NOW).ok and not dane.check(tlsOnly, chain, NOW).verified
    assert not dane.check(tlsOnly, None, NOW).ok
    assert dane.check(HostPolicy(HOST, Mode.NONE), None, NOW).ok


# -- a real handshake -------------------------------------------------------------


def handshake(cert, key):
    """The client end of a finished TLS connection to a server presenting C{cert}."""
    clock = Clock()
    address = IPv4Address("TCP", "127.0.0.1", 25)
    server = TLSMemoryBIOFactory(serverOptions(cert, key), False, Factory.forProtocol(Protocol), clock=clock)
    client = TLSMemoryBIOFactory(clientOptions(HOST, verify=False), True, Factory.forProtocol(Protocol), clock=clock)
    clientProtocol, _, pump = iosim.connectedServerAndClient(
        lambda: server.buildProtocol(address), lambda: client.buildProtocol(address), greet=False, clock=clock
    )
    pump.flush()
    return clientProtocol


def test_check_transport_after_a_real_handshake(pki, chain) -> None:
    cert, key = pki.issue(HOST, name="live")
    sent = load(cert)
    transport = handshake(cert, key)
    assert dane.peerChain(transport) == sent
    assert dane.peerChain(transport.getHandle()) == sent
    policy = HostPolicy(HOST, Mode.AUTHENTICATE, (record(2, 1, 1, sent[1]),), names=(HOST,))
    assert dane.checkTransport(policy, transport, NOW).verified
    other = HostPolicy(HOST, Mode.AUTHENTICATE, (record(3, 1, 1, chain[0]),), names=(HOST,))  # another leaf
    assert not dane.checkTransport(other, transport, NOW).ok
    assert dane.checkTransport(policy, Protocol(), NOW).result == dane.STARTTLS_NOT_SUPPORTED  # no TLS


def test_self_signed_leaf_with_dane_ee(pki) -> None:
    """The common DANE deployment: 3 1 1 for a certificate nobody else trusts."""
    cert, key = pki.selfSigned(HOST)
    transport = handshake(cert, key)
    leaf = load(cert)[0]
    policy = HostPolicy(HOST, Mode.AUTHENTICATE, (record(3, 1, 1, leaf),), names=(HOST,))
    assert dane.checkTransport(policy, transport, NOW).verified


# -- against the DNS test server ------------------------------------------------------


@pytest.fixture
def zone(tmp_path, chain):
    ee = record(3, 1, 1, chain[0])
    zones = {
        "signed.test": Zone(
            [
                MX("signed.test", 10, "mx.signed.test"),
                A("mx.signed.test", "127.0.0.1"),
                AAAA("mx.signed.test", "::1"),
                TLSA("_25._tcp.mx.signed.test", str(ee)),
                TXT("_mta-sts.signed.test", "v=STSv1; id=20261130"),
            ],
            authenticated=True,
            servfail=("_25._tcp.bogus.signed.test",),
        ),
        "unsigned.test": Zone(
            [MX("unsigned.test", 10, "mx.unsigned.test"), TLSA("_25._tcp.mx.unsigned.test", str(ee))],
        ),
    }
    with DNSZone(tmp_path / "dns", zones) as server:
        yield server


def resolverFor(setting: str, authenticated: bool = True) -> dns.resolver.Resolver:
    """dnspython as the mx backend configures it from its nameservers = setting."""
    servers = _nameservers(setting)
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [host for host, _ in servers]
    resolver.nameserver_ports = dict(servers)
    resolver.lifetime = 5
    if authenticated:
        resolver.flags = dns.flags.RD | dns.flags.AD
    return resolver


def test_authenticated_zone_sets_ad(zone) -> None:
    resolver = resolverFor(zone.setting)
    for name, rdtype in [("signed.test", "MX"), ("_25._tcp.mx.signed.test", "TLSA"), ("_mta-sts.signed.test", "TXT")]:
        answer = resolver.resolve(name, rdtype)
        assert answer.response.flags & dns.flags.AD, (name, rdtype)
    answer = resolver.resolve("unsigned.test", "MX")
    assert not answer.response.flags & dns.flags.AD
    assert [str(r.exchange) for r in answer.rrset] == ["mx.unsigned.test."]
    # A validator sets AD only for a client that asks: without AD or DO in the query, none.
    plain = resolverFor(zone.setting, authenticated=False).resolve("signed.test", "MX")
    assert not plain.response.flags & dns.flags.AD
    edns = resolverFor(zone.setting, authenticated=False)
    edns.use_edns(0, dns.flags.DO, 1232)
    assert edns.resolve("signed.test", "MX").response.flags & dns.flags.AD
    with pytest.raises(dns.resolver.NXDOMAIN):
        resolver.resolve("nowhere.signed.test", "A")
    with pytest.raises(dns.resolver.NoNameservers):  # SERVFAIL, as for a bogus signature
        resolver.resolve("_25._tcp.bogus.signed.test", "TLSA")


def test_zone_updates_and_outage(zone) -> None:
    resolver = resolverFor(zone.setting)
    zone.update({"signed.test": Zone([TXT("_mta-sts.signed.test", "v=STSv1; id=2")], authenticated=True)})
    answer = resolver.resolve("_mta-sts.signed.test", "TXT")
    assert [b"".join(r.strings) for r in answer.rrset] == [b"v=STSv1; id=2"]
    zone.stop()
    resolver.lifetime = 1
    with pytest.raises(dns.exception.Timeout):
        resolver.resolve("_mta-sts.signed.test", "TXT")


def test_lookup_through_dns(zone, chain) -> None:
    """lookup() over dnspython, with the authenticated flag read from the AD bit."""
    resolver = resolverFor(zone.setting)

    async def resolve(name: str, rdtype: str):
        answer = resolver.resolve(name, rdtype, search=False, raise_on_no_answer=False)
        return answer.rrset, bool(answer.response.flags & dns.flags.AD)

    signed = lookup(resolve, "mx.signed.test")
    assert signed.mode is Mode.AUTHENTICATE and signed.records == (record(3, 1, 1, chain[0]),)
    assert lookup(resolve, "mx.unsigned.test").mode is Mode.NONE  # served, but not authenticated
    assert lookup(resolve, "other.signed.test").mode is Mode.NONE  # NXDOMAIN
    assert lookup(resolve, "bogus.signed.test").mode is Mode.FAILED
