"""
An authoritative DNS server on 127.0.0.1 for tests, serving zones given as Python data.

It stands in for the validating resolver an MTA is pointed at with
C{nameservers}: every answer from a zone marked C{authenticated} carries the AD
bit, as a validating resolver sets it on a DNSSEC-secure answer, and other
zones' answers do not.  As RFC 6840 5.7 asks of a real validator, AD is set
only when the query asked for it (the AD bit or EDNS DO), so a client that
forgets to ask sees unauthenticated answers here too.  A name listed in a
zone's C{servfail} answers SERVFAIL, which is what a validating resolver says
of a bogus signature.

Usage::

    with DNSZone(tmp_path, {
        "example.test": Zone([MX("example.test", 10, "mx.example.test"),
                              A("mx.example.test", "127.0.0.1"),
                              TLSA("_25._tcp.mx.example.test", "3 1 1 " + digest)],
                             authenticated=True),
    }) as dns:
        dns.nameservers   # [("127.0.0.1", port)], for the mx Resolver
        dns.setting       # "127.0.0.1:port", for the nameservers = key
        dns.update({...}) # new zones, seen by the next query

It runs as its own process (this file, run as a script) on Twisted's reactor
for the sockets, UDP and TCP on the same port, so a test can stop it to play
a DNS outage, and nothing in the test process needs a running reactor.  The
messages are dnspython's: twisted.names has no TLSA record type and no DO
bit, and records written in presentation form (C{"3 1 1 ab12..."}, C{"10
mx.example.test"}) are parsed by dnspython for every type.  The zones are a
JSON file the server reads again whenever it changes, so L{DNSZone.update}
needs no signal and no restart.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_TTL = 60
START_TIMEOUT = 20.0

Record = tuple[str, str, str, int]  # (type, owner name, value in presentation form, ttl)


def _absolute(name: str) -> str:
    return name.rstrip(".").lower() + "."


def MX(name: str, preference: int, host: str, ttl: int = DEFAULT_TTL) -> Record:
    return ("MX", name, f"{preference} {_absolute(host) if host else '.'}", ttl)


def A(name: str, address: str, ttl: int = DEFAULT_TTL) -> Record:
    return ("A", name, address, ttl)


def AAAA(name: str, address: str, ttl: int = DEFAULT_TTL) -> Record:
    return ("AAAA", name, address, ttl)


def TXT(name: str, text: str, ttl: int = DEFAULT_TTL) -> Record:
    """One TXT record; text longer than 255 octets is split into strings, as zone files do."""
    data = text.encode()
    chunks = [data[i : i + 255] for i in range(0, len(data), 255)] or [b""]
    return ("TXT", name, " ".join(json.dumps(chunk.decode()) for chunk in chunks), ttl)


def TLSA(name: str, text: str, ttl: int = DEFAULT_TTL) -> Record:
    """C{text} as C{"usage selector mtype hex"}."""
    return ("TLSA", name, text, ttl)


def CNAME(name: str, target: str, ttl: int = DEFAULT_TTL) -> Record:
    return ("CNAME", name, _absolute(target), ttl)


@dataclass
class Zone:
    records: list[Record]
    authenticated: bool = False
    servfail: tuple[str, ...] = ()  # names whose every query answers SERVFAIL (a bogus signature)
    ttl: int = DEFAULT_TTL  # the SOA's, for negative answers

    def asJSON(self) -> dict[str, Any]:
        return {
            "records": [list(r) for r in self.records],
            "authenticated": self.authenticated,
            "servfail": [_absolute(n) for n in self.servfail],
            "ttl": self.ttl,
        }


@dataclass
class DNSZone:
    """The server process; a context manager, or L{start} and L{stop}."""

    workdir: Path
    zones: dict[str, Zone]
    port: int = 0
    proc: subprocess.Popen | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.configPath = self.workdir / "dnszone.json"
        self.logPath = self.workdir / "dnszone.log"
        self._write(self.zones)

    def _write(self, zones: dict[str, Zone]) -> None:
        temporary = self.configPath.with_suffix(".tmp")
        temporary.write_text(json.dumps({_absolute(origin): zone.asJSON() for origin, zone in zones.items()}))
        os.replace(temporary, self.configPath)  # the server never reads half a file

    def update(self, zones: dict[str, Zone]) -> None:
        """Serve C{zones} from the next query on."""
        self.zones = zones
        self._write(zones)

    def start(self) -> DNSZone:
        port = self.port
        self.proc = subprocess.Popen(
            [sys.executable, __file__, str(self.configPath), str(port)],
            stdout=subprocess.PIPE,
            stderr=open(self.logPath, "ab"),
        )
        ready, _, _ = select.select([self.proc.stdout], [], [], START_TIMEOUT)
        line = self.proc.stdout.readline() if ready else b""
        if not line.startswith(b"ready "):
            self.stop()
            raise AssertionError(f"DNS test server did not start: {self.logPath.read_text(errors='replace')}")
        self.port = int(line.split()[1])
        return self

    def stop(self) -> None:
        """Stop the server (a DNS outage); L{start} again serves the same port if it is still free."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()

    def __enter__(self) -> DNSZone:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def nameservers(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", self.port)]

    @property
    def setting(self) -> str:
        """The mx backend's C{nameservers} value."""
        return f"127.0.0.1:{self.port}"


# -- the server process ---------------------------------------------------------


class _Zones:
    """The JSON file, read again when it changes, answering queries as dnspython messages."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.stamp: tuple[int, int] | None = None
        self.zones: dict[str, dict[str, Any]] = {}

    def _load(self) -> None:
        import dns.rdata
        import dns.rdataclass
        import dns.rdatatype

        info = os.stat(self.path)
        stamp = (info.st_mtime_ns, info.st_ino)
        if stamp == self.stamp:
            return
        with open(self.path) as f:
            config = json.load(f)
        zones = {}
        for origin, zone in config.items():
            names: dict[str, dict[int, tuple[int, list[Any]]]] = {}
            for rdtype, name, value, ttl in zone["records"]:
                rdtype = dns.rdatatype.from_text(rdtype)
                rdata = dns.rdata.from_text(dns.rdataclass.IN, rdtype, value)
                found = names.setdefault(_absolute(name), {}).setdefault(rdtype, (ttl, []))
                found[1].append(rdata)
            zones[origin] = {
                "names": names,
                "authenticated": zone["authenticated"],
                "servfail": set(zone["servfail"]),
                "ttl": zone["ttl"],
            }
        self.zones, self.stamp = zones, stamp

    def answer(self, wire: bytes, udp: bool) -> bytes | None:
        import dns.exception
        import dns.flags
        import dns.message
        import dns.name
        import dns.rcode
        import dns.rdataclass
        import dns.rdatatype
        import dns.rrset

        try:
            query = dns.message.from_wire(wire)
        except Exception:
            return None  # not DNS: say nothing, as servers do
        self._load()
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA | dns.flags.RA
        if not query.question:
            response.set_rcode(dns.rcode.FORMERR)
            return response.to_wire()
        question = query.question[0]
        name = question.name.to_text().lower()
        origin = max((o for o in self.zones if name == o or name.endswith("." + o)), key=len, default=None)
        if origin is None:
            response.set_rcode(dns.rcode.REFUSED)
            return response.to_wire()
        zone = self.zones[origin]
        if name in zone["servfail"]:
            response.set_rcode(dns.rcode.SERVFAIL)
            return response.to_wire()
        names = zone["names"]
        atName = names.get(name)
        if atName is not None and question.rdtype in atName:
            ttl, rdatas = atName[question.rdtype]
            response.answer.append(dns.rrset.from_rdata_list(question.name, ttl, rdatas))
        elif atName is not None and dns.rdatatype.CNAME in atName:
            ttl, rdatas = atName[dns.rdatatype.CNAME]
            response.answer.append(dns.rrset.from_rdata_list(question.name, ttl, rdatas))
        else:
            exists = atName is not None or any(other.endswith("." + name) for other in names) or name == origin
            if not exists:
                response.set_rcode(dns.rcode.NXDOMAIN)
            soa = dns.rrset.from_text(
                origin,
                zone["ttl"],
                "IN",
                "SOA",
                f"ns.{origin} root.{origin} 1 60 60 600 {zone['ttl']}",
            )
            response.authority.append(soa)
        # A validating resolver says an answer is secure only to a client that
        # asks (RFC 6840 5.7): AD set in the query, or EDNS with DO.
        asked = bool(query.flags & dns.flags.AD) or bool(query.ednsflags & dns.flags.DO)
        if zone["authenticated"] and asked:
            response.flags |= dns.flags.AD
        else:
            response.flags &= ~dns.flags.AD
        maxSize = 65535
        if udp:
            maxSize = max(512, min(query.payload, 4096)) if query.edns >= 0 else 512
        try:
            return response.to_wire(max_size=maxSize)
        except dns.exception.TooBig:
            response.flags |= dns.flags.TC
            response.answer.clear()
            response.authority.clear()
            return response.to_wire()


def _serve(configPath: str, port: int) -> None:
    import struct

    from twisted.internet import protocol, reactor

    zones = _Zones(configPath)

    class UDP(protocol.DatagramProtocol):
        def datagramReceived(self, data: bytes, address: tuple[str, int]) -> None:
            reply = zones.answer(data, udp=True)
            if reply is not None:
                self.transport.write(reply, address)

    class TCP(protocol.Protocol):
        buffer = b""

        def dataReceived(self, data: bytes) -> None:
            self.buffer += data
            while len(self.buffer) >= 2:
                (size,) = struct.unpack("!H", self.buffer[:2])
                if len(self.buffer) < 2 + size:
                    return
                message, self.buffer = self.buffer[2 : 2 + size], self.buffer[2 + size :]
                reply = zones.answer(message, udp=False)
                if reply is None:
                    self.transport.loseConnection()
                    return
                self.transport.write(struct.pack("!H", len(reply)) + reply)

    zones._load()  # a broken file fails here, before "ready"
    for _ in range(50):
        udp = reactor.listenUDP(port, UDP(), interface="127.0.0.1")
        chosen = udp.getHost().port
        try:
            reactor.listenTCP(chosen, protocol.Factory.forProtocol(TCP), interface="127.0.0.1")
        except Exception:
            udp.stopListening()
            if port:
                raise
            continue
        break
    else:
        raise SystemExit("no port free for both UDP and TCP")
    sys.stdout.write(f"ready {chosen}\n")
    sys.stdout.flush()
    reactor.run()


if __name__ == "__main__":
    _serve(sys.argv[1], int(sys.argv[2]))
