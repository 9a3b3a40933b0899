"""The MX resolver against a real twisted.names server on 127.0.0.1: order, ties, IDNA, null MX, TTL cache."""

from __future__ import annotations

import pytest
from deferred import result
from peers import DNSServer
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from relay.delivery.mx import NO_DOMAIN, NULL_MX, DestinationError, Exchanger, Resolver
from relay.plugin import runInline

pytestmark = pytest.mark.integration

ZONES = {
    "ties.test": """\
    MX('ties.test', 20, 'backup.ties.test'),
    MX('ties.test', 10, 'a.ties.test'),
    MX('ties.test', 10, 'b.ties.test'),
    A('a.ties.test', '127.0.0.1'),
    AAAA('a.ties.test', '::1'),
""",
    "implicit.test": """\
    A('implicit.test', '127.0.0.3'),
""",
    "nullmx.test": """\
    MX('nullmx.test', 0, ''),
""",
    "xn--bcher-kva.test": """\
    MX('xn--bcher-kva.test', 5, 'mx.xn--bcher-kva.test'),
""",
}


@pytest.fixture
def dns(tmp_path):
    server = DNSServer(tmp_path, ZONES).start()
    yield server
    server.stop()


def resolverFor(dns: DNSServer, clock: Clock | None = None) -> Resolver:
    return Resolver(runInline, clock or Clock(), [("127.0.0.1", dns.port)], timeout=5)


def call(coroutine):
    return result(Deferred.fromCoroutine(coroutine))


def test_order_by_preference_ties_shuffled(dns):
    resolver = resolverFor(dns)
    orders = set()
    for _ in range(40):
        found = call(resolver.exchangers("ties.test"))
        assert [e.preference for e in found] == [10, 10, 20]
        assert found[-1] == Exchanger(20, "backup.ties.test")
        orders.add(tuple(e.host for e in found[:2]))
    assert orders == {("a.ties.test", "b.ties.test"), ("b.ties.test", "a.ties.test")}


def test_addresses_v4_then_v6(dns):
    assert call(resolverFor(dns).addresses("a.ties.test")) == ["127.0.0.1", "::1"]


def test_no_mx_means_the_domain_itself(dns):
    assert call(resolverFor(dns).exchangers("implicit.test")) == [Exchanger(0, "implicit.test")]


def test_null_mx_and_missing_domain_fail_permanently(dns):
    resolver = resolverFor(dns)
    with pytest.raises(DestinationError) as info:
        call(resolver.exchangers("nullmx.test"))
    assert info.value.status == NULL_MX
    with pytest.raises(DestinationError) as info:
        call(resolver.exchangers("nowhere.ties.test"))
    assert info.value.status == NO_DOMAIN


def test_idna_domain(dns):
    assert call(resolverFor(dns).exchangers("bücher.test")) == [Exchanger(5, "mx.xn--bcher-kva.test")]


def test_answers_are_cached_for_their_ttl(dns):
    clock = Clock()
    resolver = resolverFor(dns, clock)
    first = call(resolver.exchangers("implicit.test"))
    dns.stop()  # nobody answers now
    assert call(resolver.exchangers("implicit.test")) == first  # from the cache
    clock.advance(61)  # the zone's TTL is 60 s
    with pytest.raises(DestinationError) as info:
        call(resolver.exchangers("implicit.test"))
    assert info.value.status.code == 451  # a DNS failure defers
