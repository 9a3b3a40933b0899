"""
The PROXY protocol header (HAProxy's proxy-protocol.txt, versions 1 and 2):
pure functions from the first octets of a connection to the client address a
load balancer passes on.  No I/O, so any bytes can be thrown at it.

L{parseHeader} is called with everything received so far and answers one of
three things: more octets are needed (None), the header is complete (a
L{ProxyHeader} saying how many octets it took), or it can never be a valid
header (L{ProxyHeaderError}, whose text names why, for the log line).  It
decides as early as it can: a connection that starts with anything but the
header's first octets is refused at its first segment, not after the
deadline.

A header that carries no usable client address (v1 C{UNKNOWN}, v2 C{LOCAL},
the balancer's own health checks, or a v2 address family other than IPv4 and
IPv6 over TCP) is valid with C{source} None: the connection's own peer stays
the client, as Postfix does.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

__all__ = ["V1_MAX", "V2_SIGNATURE", "ProxyHeader", "ProxyHeaderError", "formatV1", "formatV2", "parseHeader"]

# The longest v1 header, CRLF included (proxy-protocol.txt 2.1).
V1_MAX = 107
V1_PREFIX = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_FIXED = 16  # signature, version and command, family, length
# v2 commands and address families (proxy-protocol.txt 2.2)
_LOCAL, _PROXY = 0x0, 0x1
_AF_UNSPEC, _AF_INET, _AF_INET6, _AF_UNIX = 0x0, 0x1, 0x2, 0x3
_UNSPEC, _STREAM, _DGRAM = 0x0, 0x1, 0x2

Address = tuple[str, int]


class ProxyHeaderError(ValueError):
    """The octets received can never be a valid header of the expected version; the text says why."""


@dataclass(frozen=True)
class ProxyHeader:
    """
    A complete header.  C{source} is the client's address and port, and
    C{destination} the address it connected to on the balancer; both None
    when the header carries none (the connection's own addresses stand).
    """

    version: int
    length: int  # octets the header took; what follows is the proxied stream
    source: Address | None = None
    destination: Address | None = None


def parseHeader(data: bytes, version: int) -> ProxyHeader | None:
    """
    The header of C{version} (1 or 2) at the start of C{data}: None while it
    may still be completed by more octets.

    @raise ProxyHeaderError: C{data} does not start with a valid header.
    """
    if version == 1:
        return _parseV1(data)
    if version == 2:
        return _parseV2(data)
    raise ValueError(f"no PROXY protocol version {version!r}")


def _startsLike(data: bytes, prefix: bytes) -> bool:
    """C{data} is C{prefix}, or its beginning, or begins with it."""
    n = min(len(data), len(prefix))
    return data[:n] == prefix[:n]


def _parseV1(data: bytes) -> ProxyHeader | None:
    if not _startsLike(data, V1_PREFIX):
        if _startsLike(data, V2_SIGNATURE):
            raise ProxyHeaderError("a PROXY v2 header where v1 is expected")
        raise ProxyHeaderError("no PROXY v1 header")
    end = data.find(b"\n", 0, V1_MAX)
    if end == -1:
        if len(data) >= V1_MAX:
            raise ProxyHeaderError(f"PROXY v1 header longer than {V1_MAX} octets")
        return None
    if end == 0 or data[end - 1 : end] != b"\r":
        raise ProxyHeaderError("PROXY v1 header not ended by CRLF")
    line = data[: end - 1]
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise ProxyHeaderError("PROXY v1 header is not ASCII") from None
    if not text.isprintable():
        raise ProxyHeaderError("PROXY v1 header holds control characters")
    words = text.split(" ")
    length = end + 1
    if len(words) >= 2 and words[1] == "UNKNOWN":
        # The rest of the line, whatever it says, is to be ignored (2.1).
        return ProxyHeader(1, length)
    if len(words) != 6 or words[1] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError("PROXY v1 header malformed (want PROXY TCP4|TCP6|UNKNOWN src dst sport dport)")
    family = ipaddress.IPv4Address if words[1] == "TCP4" else ipaddress.IPv6Address
    source = _v1Address(words[2], family), _v1Port(words[4])
    destination = _v1Address(words[3], family), _v1Port(words[5])
    return ProxyHeader(1, length, source, destination)


def _v1Address(text: str, family: type[ipaddress.IPv4Address] | type[ipaddress.IPv6Address]) -> str:
    if "%" in text:  # a scoped IPv6 address names an interface of the balancer, not a client
        raise ProxyHeaderError(f"PROXY v1 header has a bad address {text[:45]!r}")
    try:
        return str(family(text))
    except ValueError:
        raise ProxyHeaderError(f"PROXY v1 header has a bad address {text[:45]!r}") from None


def _v1Port(text: str) -> int:
    if not (text.isdigit() and text.isascii() and len(text) <= 5 and (text == "0" or text[0] != "0")):
        raise ProxyHeaderError(f"PROXY v1 header has a bad port {text[:8]!r}")
    port = int(text)
    if port > 65535:
        raise ProxyHeaderError(f"PROXY v1 header has a bad port {text!r}")
    return port


def _parseV2(data: bytes) -> ProxyHeader | None:
    if not _startsLike(data, V2_SIGNATURE):
        if _startsLike(data, V1_PREFIX):
            raise ProxyHeaderError("a PROXY v1 header where v2 is expected")
        raise ProxyHeaderError("no PROXY v2 header")
    if len(data) > 12 and data[12] >> 4 != 2:
        raise ProxyHeaderError(f"PROXY v2 header has version {data[12] >> 4}, not 2")
    if len(data) > 12 and data[12] & 0xF not in (_LOCAL, _PROXY):
        raise ProxyHeaderError(f"PROXY v2 header has an unknown command {data[12] & 0xF}")
    if len(data) < _V2_FIXED:
        return None
    command = data[12] & 0xF
    family, transport = data[13] >> 4, data[13] & 0xF
    (size,) = struct.unpack_from("!H", data, 14)
    length = _V2_FIXED + size
    if len(data) < length:
        return None
    if command == _LOCAL:
        # The balancer speaking for itself (a health check): the address block, if any, is ignored.
        return ProxyHeader(2, length)
    if transport == _DGRAM or transport > _DGRAM or family > _AF_UNIX:
        raise ProxyHeaderError(f"PROXY v2 header has an unsupported address family or transport 0x{data[13]:02x}")
    block = data[_V2_FIXED:length]
    if family == _AF_INET and transport == _STREAM:
        if size < 12:
            raise ProxyHeaderError(f"PROXY v2 header's IPv4 address block is too short ({size} octets)")
        src, dst = str(ipaddress.IPv4Address(block[0:4])), str(ipaddress.IPv4Address(block[4:8]))
        sport, dport = struct.unpack_from("!HH", block, 8)
        return ProxyHeader(2, length, (src, sport), (dst, dport))
    if family == _AF_INET6 and transport == _STREAM:
        if size < 36:
            raise ProxyHeaderError(f"PROXY v2 header's IPv6 address block is too short ({size} octets)")
        src, dst = str(ipaddress.IPv6Address(block[0:16])), str(ipaddress.IPv6Address(block[16:32]))
        sport, dport = struct.unpack_from("!HH", block, 32)
        return ProxyHeader(2, length, (src, sport), (dst, dport))
    # AF_UNSPEC, AF_UNIX, or an unspecified transport: no client address to use (2.2).
    return ProxyHeader(2, length)


def formatV1(source: Address | None, destination: Address | None = None) -> bytes:
    """The v1 header for these addresses (C{PROXY UNKNOWN} without a source): for tests and tools."""
    if source is None:
        return b"PROXY UNKNOWN\r\n"
    if destination is None:
        destination = ("::1", 25) if ":" in source[0] else ("127.0.0.1", 25)
    kind = "TCP6" if ":" in source[0] else "TCP4"
    return f"PROXY {kind} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n".encode("ascii")


def formatV2(source: Address | None, destination: Address | None = None, tlvs: bytes = b"") -> bytes:
    """
    The v2 header for these addresses (C{LOCAL} without a source), with
    C{tlvs} appended to the address block: for tests and tools.
    """
    if source is None:
        return V2_SIGNATURE + bytes([0x20, 0x00]) + struct.pack("!H", len(tlvs)) + tlvs
    ip = ipaddress.ip_address(source[0])
    if destination is None:
        destination = ("::1", 25) if ip.version == 6 else ("127.0.0.1", 25)
    dst = ipaddress.ip_address(destination[0])
    block = ip.packed + dst.packed + struct.pack("!HH", source[1], destination[1]) + tlvs
    family = 0x21 if ip.version == 6 else 0x11
    return V2_SIGNATURE + bytes([0x21, family]) + struct.pack("!H", len(block)) + block
