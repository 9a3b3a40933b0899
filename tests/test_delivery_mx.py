"""
The MX backend's policy, in memory: the address limit, loops back to
ourselves (by address and by greeting), a 4xx greeting moving on, and the
deadline of one attempt.  Connections go to a MemoryReactorClock; the test
refuses them, or plays the server on a StringTransport.
"""

from __future__ import annotations

import io

import pytest
from deferred import result
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from relay.delivery.mx import (
    DEADLINE_SHARE,
    MAX_MX,
    DestinationError,
    Exchanger,
    MXBackend,
    Myself,
    fromOptions,
    hostAddresses,
    loopsBack,
)
from relay.envelope import Envelope, Recipient, Status
from relay.errors import OptionError
from relay.plugin import PluginContext

PORT = 2525


class StaticResolver:
    """The two questions the backend asks, answered from a table (the real Resolver is tested against DNS)."""

    def __init__(self, mx: dict[str, list[tuple[int, str]]], hosts: dict[str, list[str]]) -> None:
        self.mx = mx
        self.hosts = hosts
        self.asked: list[str] = []

    async def exchangers(self, domain: str) -> list[Exchanger]:
        if domain not in self.mx:
            raise DestinationError(Status(550, "5.1.2", "recipient domain does not exist"))
        return [Exchanger(preference, host) for preference, host in sorted(self.mx[domain])]

    async def addresses(self, host: str) -> list[str]:
        self.asked.append(host)
        return list(self.hosts.get(host, []))


def backend(
    resolver: StaticResolver,
    listening: tuple[tuple[str, int], ...] = (("127.0.0.1", PORT),),
    **kwargs,
) -> tuple[MXBackend, MemoryReactorClock]:
    reactor = MemoryReactorClock()
    mx = MXBackend(reactor, "relay.test", resolver, PORT, tls="opportunistic", myself=Myself(listening), **kwargs)
    return mx, reactor


def deliver(mx: MXBackend, *addresses: str):
    recipients = [Recipient(a) for a in addresses]
    envelope = Envelope("q1", "sender@example.org", recipients, 0.0, size=10)
    return mx.deliver(envelope, recipients, lambda: io.BytesIO(b"Subject: x\r\n\r\nbody\r\n"))


def refuseAll(reactor: MemoryReactorClock, limit: int = 50) -> list[str]:
    """Refuse every connection attempt as it is made (each refusal starts the next); the hosts tried."""
    tried = []
    for n in range(limit):
        if n >= len(reactor.tcpClients):
            break
        host, port, factory, _, _ = reactor.tcpClients[n]
        assert port == PORT
        tried.append(host)
        factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
    return tried


def connectAs(reactor: MemoryReactorClock, n: int) -> StringTransport:
    """Complete the C{n}th connection attempt; the test then plays the server."""
    _, _, factory, _, _ = reactor.tcpClients[n]
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    transport.protocol = protocol
    return transport


def statuses(d) -> dict[str, Status]:
    return {r.recipient: r.status for r in result(d)}


def sevenHosts(preferences=(10, 20, 30, 40, 50, 60, 70)) -> StaticResolver:
    hosts = {f"mx{n}.far.test": [f"192.0.2.{n}"] for n in range(1, len(preferences) + 1)}
    mx = {"far.test": [(p, f"mx{n}.far.test") for n, p in enumerate(preferences, 1)]}
    return StaticResolver(mx, hosts)


def test_at_most_max_mx_addresses_are_tried_and_the_last_status_stays():
    resolver = sevenHosts()
    mx, reactor = backend(resolver)
    d = deliver(mx, "a@far.test", "b@far.test")
    tried = refuseAll(reactor)
    assert tried == [f"192.0.2.{n}" for n in range(1, MAX_MX + 1)]
    assert resolver.asked == [f"mx{n}.far.test" for n in range(1, MAX_MX + 1)]  # the rest not even looked up
    found = statuses(d)
    assert set(found) == {"a@far.test", "b@far.test"}
    for status in found.values():
        assert (status.code, status.enhanced) == (451, "4.4.1")
        assert "192.0.2.5" in status.text  # the last one tried


def test_max_mx_counts_addresses_not_hosts():
    resolver = StaticResolver(
        {"far.test": [(10, "big.far.test"), (20, "small.far.test")]},
        {"big.far.test": ["192.0.2.1", "192.0.2.2", "2001:db8::1"], "small.far.test": ["192.0.2.9"]},
    )
    mx, reactor = backend(resolver, maxMX=2)
    d = deliver(mx, "a@far.test")
    assert refuseAll(reactor) == ["192.0.2.1", "192.0.2.2"]
    assert statuses(d)["a@far.test"].code == 451


def test_the_best_mx_being_ourselves_bounces_5_4_6_without_connecting():
    resolver = StaticResolver(
        {"loop.test": [(10, "mx.loop.test"), (20, "backup.loop.test")]},
        {"mx.loop.test": ["127.0.0.1"], "backup.loop.test": ["192.0.2.20"]},
    )
    mx, reactor = backend(resolver)
    d = deliver(mx, "a@loop.test")
    assert reactor.tcpClients == []
    assert statuses(d)["a@loop.test"] == Status(554, "5.4.6", "mail for loop.test loops back to myself")
    assert loopsBack("loop.test").permanent


def test_an_equally_preferred_mx_that_is_ourselves_also_loops():
    resolver = StaticResolver(
        {"loop.test": [(10, "other.loop.test"), (10, "self.loop.test")]},
        {"other.loop.test": ["192.0.2.1"], "self.loop.test": ["::ffff:127.0.0.1"]},  # v4-mapped is still us
    )
    mx, reactor = backend(resolver, maxMX=1)  # the limit does not hide an equal preference
    d = deliver(mx, "a@loop.test")
    assert reactor.tcpClients == []
    assert statuses(d)["a@loop.test"].enhanced == "5.4.6"


def test_as_a_backup_mx_we_deliver_to_the_better_ones_only():
    resolver = StaticResolver(
        {"backup.test": [(10, "primary.backup.test"), (20, "us.backup.test"), (30, "worse.backup.test")]},
        {"primary.backup.test": ["192.0.2.1"], "us.backup.test": ["127.0.0.1"], "worse.backup.test": ["192.0.2.3"]},
    )
    mx, reactor = backend(resolver)
    d = deliver(mx, "a@backup.test")
    assert refuseAll(reactor) == ["192.0.2.1"]
    status = statuses(d)["a@backup.test"]
    assert status.code == 451 and "192.0.2.1" in status.text  # deferred: the primary may come back


def test_our_address_at_another_port_is_not_ourselves():
    resolver = StaticResolver({"x.test": [(10, "mx.x.test")]}, {"mx.x.test": ["127.0.0.1"]})
    mx, reactor = backend(resolver, listening=(("127.0.0.1", PORT + 1),))
    deliver(mx, "a@x.test")
    assert [c[0] for c in reactor.tcpClients] == ["127.0.0.1"]


def test_myself_by_listener():
    one = Myself([("127.0.0.1", 25)], localAddresses=lambda: frozenset())
    assert ("127.0.0.1", 25) in one
    assert ("127.0.0.2", 25) not in one  # nothing of ours listens there
    assert ("127.0.0.1", 26) not in one
    assert ("0.0.0.0", 25) in one  # connecting to the unspecified address reaches this host
    assert ("::ffff:127.0.0.1", 25) in one
    assert ("mx.example.test", 25) not in one

    everywhere = Myself([("", 25), ("::", 587)], localAddresses=lambda: frozenset({"192.0.2.7", "2001:db8::7"}))
    for address in ("127.0.0.1", "127.3.4.5", "::1", "192.0.2.7", "2001:db8::7", "[2001:db8::7]"):
        assert (address, 25) in everywhere, address
    assert ("192.0.2.8", 25) not in everywhere
    assert ("2001:db8::7", 587) in everywhere
    assert ("192.0.2.7", 2525) not in everywhere

    assert ("127.0.0.1", 25) not in Myself([])


def test_host_addresses_are_found():
    found = hostAddresses()
    assert "127.0.0.1" in found  # on Linux: /proc knows loopback at least


def test_a_4xx_greeting_tries_the_next_mx():
    resolver = sevenHosts((10, 20))
    mx, reactor = backend(resolver)
    d = deliver(mx, "a@far.test")
    first = connectAs(reactor, 0)
    first.protocol.dataReceived(b"421 4.3.2 mx1 is busy\r\n")
    assert len(reactor.tcpClients) == 2 and reactor.tcpClients[1][0] == "192.0.2.2"
    assert first.disconnecting  # the refusing session is not kept
    second = connectAs(reactor, 1)
    second.protocol.dataReceived(b"220-mx2 ready\r\n220 here\r\n")
    assert second.value().startswith(b"EHLO relay.test\r\n")
    second.protocol.dataReceived(b"451 4.3.0 not now\r\n")  # a 4xx to EHLO: the next one too
    found = statuses(d)["a@far.test"]
    assert found.code == 451
    assert "192.0.2.2" in found.text and "not now" in found.text  # the last host's words


def test_a_server_greeting_with_our_name_is_a_loop():
    resolver = sevenHosts((10, 20))
    mx, reactor = backend(resolver)
    d = deliver(mx, "a@far.test")
    connectAs(reactor, 0).protocol.dataReceived(b"220 relay.test ESMTP\r\n")
    assert statuses(d)["a@far.test"] == loopsBack("far.test")
    assert len(reactor.tcpClients) == 1  # no other MX: it would be the same mistake in DNS


def test_the_deadline_ends_an_attempt_with_its_reason():
    resolver = sevenHosts((10, 20))
    mx, reactor = backend(resolver, deadline=100.0)
    d = deliver(mx, "a@far.test")
    refuseAll(reactor, limit=1)
    transport = connectAs(reactor, 1)  # the second MX answers, then goes quiet
    transport.protocol.dataReceived(b"220 mx2.far.test\r\n")
    reactor.advance(99)
    assert not d.called
    reactor.advance(1)
    status = statuses(d)["a@far.test"]
    assert (status.code, status.enhanced) == (451, "4.4.2")
    assert "took longer than 100 s" in status.text and "mx2.far.test[192.0.2.2]" in status.text
    assert "address 2 of 2" in status.text
    assert transport.disconnecting  # the session is dropped, not left behind
    transport.protocol.connectionLost(Failure(ConnectionDone()))  # and its end raises nothing


def test_the_deadline_while_connecting():
    resolver = sevenHosts((10,))
    mx, reactor = backend(resolver, deadline=50.0)
    d = deliver(mx, "a@far.test")
    connector = reactor.connectors[0]
    reactor.advance(50)
    assert statuses(d)["a@far.test"].enhanced == "4.4.2"
    assert connector.stoppedConnecting


def test_options_max_mx_and_the_deadline_from_the_context(tmp_path):
    context = PluginContext(
        MemoryReactorClock(),
        "relay.test",
        "postmaster@relay.test",
        tmp_path,
        listening=(("127.0.0.1", 2525),),
        delivery_timeout=120.0,
    )
    mx = fromOptions({"max_mx": "3"}, context)
    assert mx.maxMX == 3
    assert mx.deadline == pytest.approx(DEADLINE_SHARE * 120.0)
    assert ("127.0.0.1", 25) not in mx.myself and ("127.0.0.1", 2525) in mx.myself
    assert fromOptions({}, context).maxMX == MAX_MX == 5
    for bad in ("0", "-1", "many", "101"):
        with pytest.raises(OptionError) as info:
            fromOptions({"max_mx": bad}, context)
        assert info.value.key == "max_mx"


def test_options_mta_sts_and_tls_reports(tmp_path):
    context = PluginContext(
        MemoryReactorClock(), "relay.test", "postmaster@relay.test", tmp_path, section="delivery:out"
    )
    default = fromOptions({}, context)
    assert default.sts is not None and default.reports is None  # MTA-STS on, reports off, by default
    assert default.sts.cache.directory == tmp_path / "mta-sts" / "delivery_out"
    assert default.sts.fetcher.port is None  # 443, from the URL
    off = fromOptions({"mta_sts": "no", "tls_reports": "yes", "mta_sts_port": "8443"}, context)
    assert off.sts is None and off.reports is not None
    assert off.reports.directory == tmp_path / "tls-reports" / "delivery_out"
    off.stop()
    for key, bad in (("mta_sts", "maybe"), ("tls_reports", "1"), ("mta_sts_port", "0"), ("dnssec", "on")):
        with pytest.raises(OptionError) as info:
            fromOptions({key: bad}, context)
        assert info.value.key == key
    with pytest.raises(OptionError) as info:
        fromOptions({"dane": "yes"}, context)  # the AD bit is not trusted without dnssec = yes
    assert info.value.key == "dane" and "dnssec = yes" in info.value.message
    secure = fromOptions({"dane": "yes", "dnssec": "yes"}, context)
    assert secure.dane and secure.resolver.dnssec
