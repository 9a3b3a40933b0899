"""
The PROXY protocol: the header parser (tables, and properties over any bytes
in any split), and listeners behind it, all in memory.
"""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from smtphelpers import Session, TLSRecordingTransport
from twisted.internet.address import IPv4Address
from twisted.logger import Logger, globalLogPublisher

from relay.smtp.proxied import ProxyFactory
from relay.smtp.proxy import V1_MAX, V2_SIGNATURE, ProxyHeader, ProxyHeaderError, formatV1, formatV2, parseHeader

# -- the parser --------------------------------------------------------------

V2_TCP4 = formatV2(("192.0.2.7", 40001), ("198.51.100.1", 25))


@pytest.mark.parametrize(
    "data, version, expected",
    [
        (
            b"PROXY TCP4 192.0.2.7 198.51.100.1 40001 25\r\n",
            1,
            ProxyHeader(1, 44, ("192.0.2.7", 40001), ("198.51.100.1", 25)),
        ),
        (
            b"PROXY TCP6 2001:db8::7 2001:db8::1 65535 0\r\nEHLO x\r\n",
            1,
            ProxyHeader(1, 44, ("2001:db8::7", 65535), ("2001:db8::1", 0)),
        ),
        (b"PROXY UNKNOWN\r\n", 1, ProxyHeader(1, 15)),
        (b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n", 1, ProxyHeader(1, 59)),
        (V2_TCP4, 2, ProxyHeader(2, 28, ("192.0.2.7", 40001), ("198.51.100.1", 25))),
        (
            formatV2(("2001:db8::7", 1), ("2001:db8::1", 587)),
            2,
            ProxyHeader(2, 52, ("2001:db8::7", 1), ("2001:db8::1", 587)),
        ),
        # TLVs (here an ALPN and a NOOP, as HAProxy may send) are skipped.
        (
            formatV2(("192.0.2.7", 40001), ("198.51.100.1", 25), b"\x01\x00\x04smtp\x04\x00\x00") + b"EHLO",
            2,
            ProxyHeader(2, 28 + 10, ("192.0.2.7", 40001), ("198.51.100.1", 25)),
        ),
        # LOCAL (a health check), with or without an address block: no client address.
        (formatV2(None), 2, ProxyHeader(2, 16)),
        (V2_SIGNATURE + b"\x20\x11\x00\x0c" + bytes(12), 2, ProxyHeader(2, 28)),
        # PROXY with AF_UNSPEC or AF_UNIX: keep the connection's own peer.
        (V2_SIGNATURE + b"\x21\x00\x00\x00", 2, ProxyHeader(2, 16)),
        (V2_SIGNATURE + b"\x21\x31\x00\xd8" + bytes(216), 2, ProxyHeader(2, 232)),
    ],
)
def test_valid_headers(data, version, expected):
    assert parseHeader(data, version) == expected


@pytest.mark.parametrize(
    "data, version, why",
    [
        (b"EHLO client\r\n", 1, "no PROXY v1 header"),
        (b"\x16\x03\x01", 1, "no PROXY v1 header"),  # a TLS ClientHello
        (V2_TCP4, 1, "v2 header where v1 is expected"),
        (b"PROXY TCP4 192.0.2.7 198.51.100.1 40001 25\r\n", 2, "v1 header where v2 is expected"),
        (b"EHLO", 2, "no PROXY v2 header"),
        (b"PROXY TCP4 192.0.2.7 198.51.100.1 40001 25\n", 1, "not ended by CRLF"),
        (b"PROXY TCP4 192.0.2.7 198.51.100.1 40001\r\n", 1, "malformed"),
        (b"PROXY TCP4  192.0.2.7 198.51.100.1 40001 25\r\n", 1, "malformed"),
        (b"PROXY UDP4 192.0.2.7 198.51.100.1 40001 25\r\n", 1, "malformed"),
        (b"PROXY TCP4 2001:db8::7 198.51.100.1 40001 25\r\n", 1, "bad address"),
        (b"PROXY TCP6 192.0.2.7 2001:db8::1 40001 25\r\n", 1, "bad address"),
        (b"PROXY TCP4 192.0.2.007 198.51.100.1 40001 25\r\n", 1, "bad address"),
        (b"PROXY TCP6 fe80::1%eth0 2001:db8::1 40001 25\r\n", 1, "bad address"),
        (b"PROXY TCP4 192.0.2.7 198.51.100.1 65536 25\r\n", 1, "bad port"),
        (b"PROXY TCP4 192.0.2.7 198.51.100.1 040001 25\r\n", 1, "bad port"),
        (b"PROXY TCP4 192.0.2.7 198.51.100.1 -1 25\r\n", 1, "bad port"),
        (b"PROXY TCP4 192.0.2.7\xff 198.51.100.1 1 25\r\n", 1, "not ASCII"),
        (b"PROXY TCP4 192.0.2.7\t198.51.100.1 1 25\r\n", 1, "control characters"),
        (b"PROXY UNKNOWN " + b"x" * V1_MAX, 1, "longer than 107"),
        (V2_SIGNATURE + b"\x11", 2, "version 1, not 2"),
        (V2_SIGNATURE + b"\x22", 2, "unknown command 2"),
        (V2_SIGNATURE + b"\x21\x12\x00\x0c" + bytes(12), 2, "unsupported address family or transport 0x12"),
        (V2_SIGNATURE + b"\x21\x41\x00\x00", 2, "unsupported address family"),
        (V2_SIGNATURE + b"\x21\x11\x00\x08" + bytes(8), 2, "IPv4 address block is too short"),
        (V2_SIGNATURE + b"\x21\x21\x00\x0c" + bytes(12), 2, "IPv6 address block is too short"),
    ],
)
def test_invalid_headers(data, version, why):
    with pytest.raises(ProxyHeaderError, match=why):
        parseHeader(data, version)


@pytest.mark.parametrize("version", [1, 2])
def test_a_prefix_of_a_valid_header_asks_for_more(version):
    header = formatV1(("192.0.2.7", 40001)) if version == 1 else formatV2(("192.0.2.7", 40001))
    for n in range(len(header)):
        assert parseHeader(header[:n], version) is None


def test_a_v1_header_may_be_107_octets_and_no_more():
    full = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    tcp6 = f"PROXY TCP6 {full} {full} 65535 65535\r\n".encode()
    assert parseHeader(tcp6, 1) == ProxyHeader(1, 104, (full, 65535), (full, 65535))
    # The spec's worst case: UNKNOWN followed by the longest TCP6 addresses.
    longest = f"PROXY UNKNOWN {full} {full} 65535 65535\r\n".encode()
    assert len(longest) == V1_MAX
    assert parseHeader(longest, 1).length == V1_MAX
    assert parseHeader(b"PROXY UNKNOWN " + b"x" * 91 + b"\r\n", 1) == ProxyHeader(1, 107)
    with pytest.raises(ProxyHeaderError, match="longer than 107"):
        parseHeader(b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n", 1)


_addresses = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
)
_ports = st.integers(0, 65535)


@settings(max_examples=500, deadline=None)
@given(st.sampled_from([1, 2]), st.ip_addresses(), st.ip_addresses(), _ports, _ports, st.binary(max_size=40))
def test_valid_headers_round_trip(version, src, dst, sport, dport, after):
    if src.version != dst.version:
        dst = ipaddress.ip_address(int(dst) % (2**32)) if src.version == 4 else ipaddress.IPv6Address(int(dst))
    source, destination = (str(src), sport), (str(dst), dport)
    header = (formatV1 if version == 1 else formatV2)(source, destination)
    assert parseHeader(header + after, version) == ProxyHeader(version, len(header), source, destination)


def _check(data: bytes, version: int) -> ProxyHeader | None:
    """The parser's answer; anything raised but its own error fails the test."""
    try:
        return parseHeader(data, version)
    except ProxyHeaderError:
        return None


@settings(max_examples=3000, deadline=None)
@given(
    st.sampled_from([1, 2]),
    st.one_of(
        st.binary(max_size=300),
        # Mostly-valid starts, so the fuzz gets past the signature.
        st.tuples(
            st.sampled_from([b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 ", V2_SIGNATURE]), st.binary(max_size=120)
        ).map(b"".join),
        st.tuples(
            st.just(V2_SIGNATURE), st.integers(0, 255), st.integers(0, 255), st.binary(min_size=2, max_size=2)
        ).map(lambda t: t[0] + bytes([t[1], t[2]]) + t[3]),
    ),
)
def test_any_bytes_give_a_header_more_or_the_parsers_error(version, data):
    try:
        header = parseHeader(data, version)
    except ProxyHeaderError:
        return
    if header is not None:
        assert 0 < header.length <= len(data)
        assert header.version == version


@settings(max_examples=1000, deadline=None)
@given(
    st.sampled_from([1, 2]),
    st.one_of(st.binary(max_size=200), st.sampled_from([V2_TCP4, formatV1(("192.0.2.7", 1)), formatV2(None)])),
    st.binary(max_size=30),
    st.lists(st.integers(0, 230), max_size=6),
)
def test_any_split_gives_the_same_answer(version, data, after, cuts):
    """Fed in segments, the answer is the one the whole gives: more is never asked of a header already complete."""
    data += after
    try:
        whole: object = parseHeader(data, version)
    except ProxyHeaderError as e:
        whole = type(e)
    seen = b""
    answer: object = None
    for end in [*sorted(c for c in cuts if c <= len(data)), len(data)]:
        seen = data[:end]
        try:
            answer = parseHeader(seen, version)
        except ProxyHeaderError as e:
            answer = type(e)
        if answer is not None:
            break
    assert answer == whole or (whole is None and answer is None)


# -- listeners behind a balancer ------------------------------------------------

BALANCER = "10.0.0.5"
MESSAGE = b"Subject: hi\r\n\r\nbody\r\n"


class Rig:
    """An SMTP factory behind a ProxyFactory; connections come from the balancer at 10.0.0.5."""

    def __init__(self, version: int = 2, timeout: float = 10.0, maxPending: int = 1000, **session) -> None:
        session.setdefault("relayNetworks", ("192.0.2.0/24",))
        session.setdefault("routes", {"localhost": "local", "*": "internet"})
        self.session = Session(**session)
        self.session.take()  # the Session's own direct connection: not used
        self.clock = self.session.clock
        self.events: list[dict] = []
        self.factory = ProxyFactory(self.session.factory, version, self.clock, timeout=timeout, maxPending=maxPending)
        self.factory.log = Logger(observer=self.events.append)

    def connect(self, peer: str = BALANCER):
        transport = TLSRecordingTransport(peerAddress=IPv4Address("TCP", peer, 5000))
        protocol = self.factory.buildProtocol(transport.getPeer())
        protocol.makeConnection(transport)
        return transport, protocol

    def lines(self) -> list[str]:
        return [e["relay_text"] for e in self.events if "relay_text" in e]


def send(protocol, transport, data: bytes) -> bytes:
    protocol.dataReceived(data)
    out = transport.value()
    transport.clear()
    return out


@pytest.mark.parametrize(
    "version, header, client",
    [
        (1, formatV1(("192.0.2.7", 40001)), "192.0.2.7"),
        (1, formatV1(("2001:db8::7", 40001)), "2001:db8::7"),
        (2, formatV2(("192.0.2.7", 40001)), "192.0.2.7"),
        (2, formatV2(("2001:db8::7", 40001)), "2001:db8::7"),
    ],
)
def test_the_header_names_the_client(version, header, client):
    rig = Rig(version, relayNetworks=("192.0.2.0/24", "2001:db8::/32"))
    logged: list[str] = []
    observer = lambda event: logged.append(event.get("relay_text", ""))  # noqa: E731
    globalLogPublisher.addObserver(observer)
    try:
        transact(rig, header, client)
    finally:
        globalLogPublisher.removeObserver(observer)
    [connect] = [line for line in logged if line.startswith("event=connect ")]
    assert connect == f"event=connect client={client} port=40001"


def transact(rig: Rig, header: bytes, client: str) -> None:
    transport, protocol = rig.connect()
    assert transport.value() == b""  # nothing before the header
    assert send(protocol, transport, header).startswith(b"220 ")
    reply = send(protocol, transport, b"EHLO client.example\r\n")
    assert f"Hello client.example [{client}]".encode() in reply
    server = protocol.wrapped
    assert server.client == client
    assert server.transport.getPeer().port == 40001
    assert protocol.factory.wrappedFactory.limits._addresses.keys() >= {client}
    # relay_networks decides by the proxied address: a non-local domain may be relayed to.
    reply = send(protocol, transport, b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@elsewhere.example>\r\nDATA\r\n")
    assert reply.splitlines()[1].startswith(b"250 "), reply
    reply = send(protocol, transport, MESSAGE + b".\r\n")
    assert reply.startswith(b"250 2.0.0 Ok: queued as ")
    [envelope] = rig.session.accepted
    assert envelope.client_address == client
    data = rig.session.store.messages[envelope.queue_id][1]
    assert data.startswith(f"Received: from client.example ([{client}])\r\n".encode())


def test_the_balancers_address_is_not_the_clients():
    """The balancer (10.0.0.5) may relay; a client it passes on, outside relay_networks, may not."""
    rig = Rig(2, relayNetworks=("10.0.0.0/8",))
    transport, protocol = rig.connect()
    send(protocol, transport, formatV2(("203.0.113.9", 1234)) + b"EHLO c\r\n")
    reply = send(protocol, transport, b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@elsewhere.example>\r\n")
    assert reply.splitlines()[1].startswith(b"550 5.7.1 Relay access denied"), reply
    assert protocol.wrapped.client == "203.0.113.9"


@pytest.mark.parametrize("version, header", [(1, b"PROXY UNKNOWN\r\n"), (2, formatV2(None))])
def test_unknown_and_local_keep_the_balancer_as_client(version, header):
    rig = Rig(version, relayNetworks=(BALANCER + "/32",))
    transport, protocol = rig.connect()
    assert send(protocol, transport, header).startswith(b"220 ")
    assert protocol.wrapped.client == BALANCER
    reply = send(protocol, transport, b"HELO lb\r\nMAIL FROM:<>\r\nRCPT TO:<b@elsewhere.example>\r\nQUIT\r\n")
    assert reply.splitlines()[2].startswith(b"250 "), reply


@pytest.mark.parametrize("version", [1, 2])
def test_a_header_split_across_segments(version):
    rig = Rig(version)
    transport, protocol = rig.connect()
    header = (formatV1 if version == 1 else formatV2)(("192.0.2.7", 40001))
    for octet in header[:-1]:
        assert send(protocol, transport, bytes([octet])) == b""
    assert protocol.wrapped is None
    assert send(protocol, transport, header[-1:]).startswith(b"220 ")
    assert protocol.wrapped.client == "192.0.2.7"


@pytest.mark.parametrize("version", [1, 2])
def test_commands_pipelined_after_the_header_are_the_session(version):
    rig = Rig(version)
    transport, protocol = rig.connect()
    header = (formatV1 if version == 1 else formatV2)(("192.0.2.7", 40001))
    reply = send(
        protocol, transport, header + b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<x@localhost>\r\nDATA\r\n"
    )
    codes = [line[:4] for line in reply.split(b"\r\n") if line[3:4] == b" "]
    assert codes == [b"220 ", b"250 ", b"250 ", b"250 ", b"354 "], reply
    assert b"[192.0.2.7]" in reply


def refusals(rig: Rig) -> list[str]:
    return [line for line in rig.lines() if line.startswith("event=rejected reason=proxy_header")]


@pytest.mark.parametrize(
    "version, data, why",
    [
        (2, b"EHLO client\r\n", "no PROXY v2 header"),
        (1, b"\x16\x03\x01\x02\x00", "no PROXY v1 header"),
        (1, formatV2(("192.0.2.7", 1)), "a PROXY v2 header where v1 is expected"),
        (2, formatV1(("192.0.2.7", 1)), "a PROXY v1 header where v2 is expected"),
        (1, b"PROXY TCP4 192.0.2.7 junk 1 25\r\nEHLO x\r\n", "bad address"),
    ],
)
def test_a_bad_header_closes_without_a_greeting(version, data, why):
    rig = Rig(version)
    transport, protocol = rig.connect()
    assert send(protocol, transport, data) == b""
    assert transport.disconnecting
    assert protocol.wrapped is None
    [line] = refusals(rig)
    assert f"client={BALANCER} port=5000" in line
    assert why in line
    assert rig.factory.pending == 0
    assert rig.session.factory.limits.sessions == 1  # only the Session's own direct connection was admitted
    protocol.connectionLost(None)
    assert rig.factory.pending == 0


def test_a_header_not_complete_within_the_deadline():
    rig = Rig(1, timeout=5.0)
    before = len(rig.clock.getDelayedCalls())  # the Session's own connection's timers
    transport, protocol = rig.connect()
    send(protocol, transport, b"PROXY TCP4 192.0.2.7")
    rig.clock.advance(4.9)
    assert not transport.disconnecting
    rig.clock.advance(0.2)
    assert transport.disconnecting and transport.value() == b""
    [line] = refusals(rig)
    assert "within 5s (20 octets received)" in line
    assert len(rig.clock.getDelayedCalls()) == before  # nothing left running for it
    protocol.connectionLost(None)
    assert rig.factory.pending == 0


def test_the_deadline_stops_once_the_header_is_in():
    rig = Rig(2, timeout=5.0)
    transport, protocol = rig.connect()
    send(protocol, transport, formatV2(("192.0.2.7", 1)))
    rig.clock.advance(6)
    assert not transport.disconnecting
    assert send(protocol, transport, b"NOOP\r\n").startswith(b"250 ")


def test_refusals_are_logged_at_most_once_a_peer_every_ten_seconds():
    rig = Rig(2)
    for _ in range(5):
        transport, protocol = rig.connect()
        send(protocol, transport, b"garbage\r\n")
    rig.connect("10.0.0.6")[1].dataReceived(b"x")
    assert len(refusals(rig)) == 2
    rig.clock.advance(10)
    transport, protocol = rig.connect()
    send(protocol, transport, b"garbage\r\n")
    lines = refusals(rig)
    assert len(lines) == 3 and "more=4" in lines[-1]


def test_connections_waiting_for_their_header_are_capped():
    rig = Rig(2, maxPending=2)
    waiting = [rig.connect() for _ in range(2)]
    transport, protocol = rig.connect()
    assert transport.disconnecting
    assert "more than 2 connections waiting" in refusals(rig)[0]
    protocol.connectionLost(None)
    send(waiting[0][1], waiting[0][0], formatV2(("192.0.2.7", 1)))
    assert rig.factory.pending == 1
    transport, protocol = rig.connect()
    assert not transport.disconnecting


def test_session_limits_count_the_proxied_client():
    """Per-client caps apply to the address in the header, not to the balancer all clients come through."""
    rig = Rig(2, maxSessionsPerClient=2, relayNetworks=())
    for n in range(2):
        transport, protocol = rig.connect()
        assert send(protocol, transport, formatV2(("203.0.113.1", 1000 + n))).startswith(b"220 ")
    transport, protocol = rig.connect()
    assert send(protocol, transport, formatV2(("203.0.113.1", 1002))).startswith(b"421 4.7.0")
    transport, protocol = rig.connect()
    assert send(protocol, transport, formatV2(("203.0.113.2", 1000))).startswith(b"220 ")


def test_starttls_goes_to_the_connections_transport():
    rig = Rig(2, tls="starttls", tlsOptions=object())
    transport, protocol = rig.connect()
    send(protocol, transport, formatV2(("192.0.2.7", 1)) + b"EHLO c\r\n")
    assert send(protocol, transport, b"STARTTLS\r\n").startswith(b"220 2.0.0")
    assert transport.tlsStarted is rig.session.settings.tlsOptions
    assert protocol.wrapped.transport.getPeer().host == "192.0.2.7"


def test_the_connection_lost_reaches_the_session():
    rig = Rig(2)
    transport, protocol = rig.connect()
    send(protocol, transport, formatV2(("192.0.2.7", 1)))
    assert rig.session.factory.limits.sessions == 2
    protocol.connectionLost(None)
    assert rig.session.factory.limits.sessions == 1
    assert rig.factory.pending == 0
