"""
The Sendmail milter protocol, version 6, as bytes: pure functions, no I/O.

Every packet is C{uint32 length} (network order, counting the command octet
and its data), one command octet, then the data.  Strings are NUL-terminated;
integers are network-order C{uint32} (the connect port is a C{uint16}).  The
constants are those of Sendmail's C{libmilter/mfdef.h}, which Postfix's
C{milter8.c} (the MTA side we follow) and every milter library share.

The MTA sends commands (C{SMFIC_*}), the milter answers with replies
(C{SMFIR_*}).  Both directions are encoded and decoded here: the relay needs
the MTA's encoders and the milter's decoders; the tests' scripted milter needs
the other two.  L{PacketReader} takes arbitrary bytes in any split and raises
nothing but L{MilterProtocolError}; so do the decoders, whatever the packet.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

VERSION = 6
# The largest packet accepted from a milter.  Replies are small except body
# replacement chunks, which are at most 65,535 octets unless the larger sizes
# (SMFIP_MDS_256K/1M) were negotiated, which the relay never offers; Postfix
# refuses anything over its own bound the same way.
MAX_PACKET = 1024 * 1024
# Body chunks the MTA sends: libmilter's MILTER_CHUNK_SIZE.
BODY_CHUNK = 65535


class MilterProtocolError(Exception):
    """The peer broke the protocol: a bad length, an unknown command, a truncated field."""


# Commands, MTA to milter (SMFIC_*).
ABORT = b"A"
BODY = b"B"
CONNECT = b"C"
MACRO = b"D"
BODYEOB = b"E"
HELO = b"H"
QUIT_NC = b"K"
HEADER = b"L"
MAIL = b"M"
EOH = b"N"
OPTNEG = b"O"
QUIT = b"Q"
RCPT = b"R"
DATA = b"T"
UNKNOWN = b"U"

# Replies, milter to MTA (SMFIR_*).
ADDRCPT = b"+"
DELRCPT = b"-"
ADDRCPT_PAR = b"2"
SHUTDOWN = b"4"
ACCEPT = b"a"
REPLBODY = b"b"
CONTINUE = b"c"
DISCARD = b"d"
CHGFROM = b"e"
CONN_FAIL = b"f"
ADDHEADER = b"h"
INSHEADER = b"i"
SETSYMLIST = b"l"
CHGHEADER = b"m"
PROGRESS = b"p"
QUARANTINE = b"q"
REJECT = b"r"
SKIP = b"s"
TEMPFAIL = b"t"
REPLYCODE = b"y"

# Actions the milter may take at end of message (SMFIF_*), offered by the
# MTA and requested by the milter in option negotiation.
SMFIF_ADDHDRS = 0x01
SMFIF_CHGBODY = 0x02
SMFIF_ADDRCPT = 0x04
SMFIF_DELRCPT = 0x08
SMFIF_CHGHDRS = 0x10
SMFIF_QUARANTINE = 0x20
SMFIF_CHGFROM = 0x40
SMFIF_ADDRCPT_PAR = 0x80
SMFIF_SETSYMLIST = 0x100

# Protocol steps (SMFIP_*): the milter asks the MTA not to send a step
# (NO*), or says it will not reply to one (NR_*).
SMFIP_NOCONNECT = 0x01
SMFIP_NOHELO = 0x02
SMFIP_NOMAIL = 0x04
SMFIP_NORCPT = 0x08
SMFIP_NOBODY = 0x10
SMFIP_NOHDRS = 0x20
SMFIP_NOEOH = 0x40
SMFIP_NR_HDR = 0x80
SMFIP_NOUNKNOWN = 0x100
SMFIP_NODATA = 0x200
SMFIP_SKIP = 0x400
SMFIP_RCPT_REJ = 0x800
SMFIP_NR_CONN = 0x1000
SMFIP_NR_HELO = 0x2000
SMFIP_NR_MAIL = 0x4000
SMFIP_NR_RCPT = 0x8000
SMFIP_NR_DATA = 0x10000
SMFIP_NR_UNKN = 0x20000
SMFIP_NR_EOH = 0x40000
SMFIP_NR_BODY = 0x80000
SMFIP_HDR_LEADSPC = 0x100000
SMFIP_MDS_256K = 0x10000000
SMFIP_MDS_1M = 0x20000000

# Macro stages (SMFIM_*), as the milter names them in its symbol lists.
STAGE_CONNECT = 0
STAGE_HELO = 1
STAGE_ENVFROM = 2
STAGE_ENVRCPT = 3
STAGE_DATA = 4
STAGE_EOM = 5
STAGE_EOH = 6

# The command each macro stage precedes: a SMFIC_MACRO packet names it.
STAGE_COMMANDS = {
    STAGE_CONNECT: CONNECT,
    STAGE_HELO: HELO,
    STAGE_ENVFROM: MAIL,
    STAGE_ENVRCPT: RCPT,
    STAGE_DATA: DATA,
    STAGE_EOM: BODYEOB,
    STAGE_EOH: EOH,
}

# Address families of SMFIC_CONNECT (SMFIA_*).
FAMILY_UNKNOWN = b"U"
FAMILY_UNIX = b"L"
FAMILY_INET = b"4"
FAMILY_INET6 = b"6"

_COMMANDS = frozenset(
    [ABORT, BODY, CONNECT, MACRO, BODYEOB, HELO, QUIT_NC, HEADER, MAIL, EOH, OPTNEG, QUIT, RCPT, DATA, UNKNOWN]
)
_LENGTH = struct.Struct("!I")


def _text(raw: bytes) -> str:
    # Headers and addresses may carry 8-bit octets: they round-trip.
    return raw.decode("utf-8", "surrogateescape")


def _raw(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def packet(command: bytes, data: bytes = b"") -> bytes:
    """One packet: length, command, data."""
    return _LENGTH.pack(len(data) + 1) + command + data


def _cstr(text: str | bytes) -> bytes:
    raw = text if isinstance(text, bytes) else _raw(text)
    if b"\0" in raw:
        raise ValueError(f"NUL in a milter string: {raw[:40]!r}")
    return raw + b"\0"


# -- MTA to milter ----------------------------------------------------------


def encodeOptneg(version: int = VERSION, actions: int = 0, protocol: int = 0) -> bytes:
    return packet(OPTNEG, struct.pack("!III", version, actions, protocol))


def encodeMacros(command: bytes, macros: Iterable[tuple[str, str]]) -> bytes:
    """The macros defined for the step C{command} (sent just before it, never answered)."""
    return packet(MACRO, command + b"".join(_cstr(name) + _cstr(value) for name, value in macros))


def encodeConnect(hostname: str, family: bytes, port: int, address: str) -> bytes:
    if family == FAMILY_UNKNOWN:
        return packet(CONNECT, _cstr(hostname) + family)
    return packet(CONNECT, _cstr(hostname) + family + struct.pack("!H", port) + _cstr(address))


def encodeHelo(name: str) -> bytes:
    return packet(HELO, _cstr(name))


def encodeMail(args: Sequence[str]) -> bytes:
    """C{args}: the sender in angle brackets, then its ESMTP parameters."""
    return packet(MAIL, b"".join(_cstr(a) for a in args))


def encodeRcpt(args: Sequence[str]) -> bytes:
    return packet(RCPT, b"".join(_cstr(a) for a in args))


def encodeHeader(name: str, value: str) -> bytes:
    return packet(HEADER, _cstr(name) + _cstr(value))


def encodeBody(chunk: bytes) -> bytes:
    if len(chunk) > BODY_CHUNK:
        raise ValueError(f"body chunk of {len(chunk)} octets, at most {BODY_CHUNK}")
    return packet(BODY, chunk)


def encodeSimple(command: bytes) -> bytes:
    """DATA, EOH, BODYEOB, ABORT, QUIT, QUIT_NC: no data."""
    return packet(command)


# -- milter to MTA ----------------------------------------------------------


def encodeReply(command: bytes, *fields: str | bytes | int) -> bytes:
    """A reply packet: C{int} fields as uint32, C{str} as C-strings, C{bytes} raw."""
    data = b""
    for f in fields:
        if isinstance(f, int):
            data += _LENGTH.pack(f)
        elif isinstance(f, str):
            data += _cstr(f)
        else:
            data += f
    return packet(command, data)


def encodeOptnegReply(version: int, actions: int, protocol: int, symlists: Iterable[tuple[int, str]] = ()) -> bytes:
    data = struct.pack("!III", version, actions, protocol)
    for stage, names in symlists:
        data += _LENGTH.pack(stage) + _cstr(names)
    return packet(OPTNEG, data)


# -- reading packets --------------------------------------------------------


class PacketReader:
    """
    Splits a byte stream into C{(command, data)} packets.  Holds at most one
    packet's worth (L{MAX_PACKET}) however the bytes arrive.
    """

    def __init__(self, maxPacket: int = MAX_PACKET) -> None:
        self.maxPacket = maxPacket
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        """
        The packets completed by C{data}.  @raise MilterProtocolError: a
        length of 0 or over the bound; the reader is then unusable.
        """
        self._buffer += data
        packets = []
        while len(self._buffer) >= 4:
            (length,) = _LENGTH.unpack_from(self._buffer)
            if length < 1:
                raise MilterProtocolError("packet length 0")
            if length > self.maxPacket:
                raise MilterProtocolError(f"packet length {length} over {self.maxPacket}")
            if len(self._buffer) < 4 + length:
                break
            command = bytes(self._buffer[4:5])
            packets.append((command, bytes(self._buffer[5 : 4 + length])))
            del self._buffer[: 4 + length]
        return packets

    @property
    def pending(self) -> int:
        """Octets received that do not yet make a packet."""
        return len(self._buffer)


class _Fields:
    """Reads the fields of one packet's data; every shortfall is a L{MilterProtocolError}."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.offset = 0
        self.what = what

    def uint32(self) -> int:
        if len(self.data) - self.offset < 4:
            raise MilterProtocolError(f"{self.what}: truncated integer")
        (value,) = _LENGTH.unpack_from(self.data, self.offset)
        self.offset += 4
        return value

    def uint16(self) -> int:
        if len(self.data) - self.offset < 2:
            raise MilterProtocolError(f"{self.what}: truncated port")
        (value,) = struct.unpack_from("!H", self.data, self.offset)
        self.offset += 2
        return value

    def octet(self) -> bytes:
        if self.offset >= len(self.data):
            raise MilterProtocolError(f"{self.what}: truncated")
        value = self.data[self.offset : self.offset + 1]
        self.offset += 1
        return value

    def string(self) -> str:
        end = self.data.find(b"\0", self.offset)
        if end < 0:
            raise MilterProtocolError(f"{self.what}: string without its NUL")
        value = self.data[self.offset : end]
        self.offset = end + 1
        return _text(value)

    def strings(self) -> list[str]:
        values = []
        while self.offset < len(self.data):
            values.append(self.string())
        return values

    @property
    def left(self) -> int:
        return len(self.data) - self.offset

    def end(self) -> None:
        if self.offset != len(self.data):
            raise MilterProtocolError(f"{self.what}: {len(self.data) - self.offset} octets left over")


# -- replies as values --------------------------------------------------------


@dataclass(frozen=True)
class Options:
    """SMFIC_OPTNEG, either way: version, actions, protocol steps, and the milter's macro lists."""

    version: int
    actions: int
    protocol: int
    symlists: dict[int, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class Simple:
    """A reply without data: accept, continue, discard, reject, tempfail, skip, progress, ..."""

    command: bytes


@dataclass(frozen=True)
class ReplyCode:
    """SMFIR_REPLYCODE: the SMTP reply the milter wants given (a final answer, 4xx or 5xx)."""

    code: int
    enhanced: str
    text: str


@dataclass(frozen=True)
class HeaderChange:
    """ADDHEADER (index 0), INSHEADER (the position) or CHGHEADER (the occurrence; C{""} deletes)."""

    command: bytes
    index: int
    name: str
    value: str


@dataclass(frozen=True)
class RecipientChange:
    """ADDRCPT, ADDRCPT_PAR (with ESMTP arguments), DELRCPT, or CHGFROM (the sender)."""

    command: bytes
    address: str
    args: str = ""


@dataclass(frozen=True)
class ReplaceBody:
    chunk: bytes


@dataclass(frozen=True)
class Quarantine:
    reason: str


Reply = Options | Simple | ReplyCode | HeaderChange | RecipientChange | ReplaceBody | Quarantine

_SIMPLE_REPLIES = frozenset([ACCEPT, CONTINUE, DISCARD, REJECT, TEMPFAIL, SKIP, PROGRESS, CONN_FAIL, SHUTDOWN])
_REPLY_LINE = re.compile(r"([2-5][0-9][0-9])([ -])(?:([2-5]\.[0-9]{1,3}\.[0-9]{1,3}) )?(.*)", re.DOTALL)


def parseReplyCode(text: str) -> ReplyCode:
    """
    C{"550 5.7.1 text"}, possibly several lines (C{"550-5.7.1 a\\r\\n550
    5.7.1 b"}): the code, its enhanced code (or the class default), and the
    lines' texts joined by a space, since the relay answers one line.
    """
    lines = [line for line in re.split(r"\r?\n", text) if line]
    if not lines:
        raise MilterProtocolError("SMFIR_REPLYCODE without text")
    codes = set()
    enhanced = ""
    texts = []
    for line in lines:
        m = _REPLY_LINE.fullmatch(line)
        if m is None:
            raise MilterProtocolError(f"SMFIR_REPLYCODE: bad reply line {line[:60]!r}")
        codes.add(m.group(1))
        enhanced = enhanced or (m.group(3) or "")
        texts.append(m.group(4).strip())
    if len(codes) != 1:
        raise MilterProtocolError(f"SMFIR_REPLYCODE: lines with different codes {sorted(codes)}")
    code = int(codes.pop())
    if code // 100 not in (4, 5):
        raise MilterProtocolError(f"SMFIR_REPLYCODE {code}: not a 4xx or 5xx")
    if not enhanced or enhanced[0] != str(code // 100):
        enhanced = f"{code // 100}.7.1"
    body = " ".join(t for t in texts if t)
    if not body.isprintable():
        body = "".join(c if c.isprintable() else "?" for c in body)
    return ReplyCode(code, enhanced, body)


def decodeReply(command: bytes, data: bytes) -> Reply:
    """One milter reply.  @raise MilterProtocolError: unknown command or malformed data."""
    name = f"reply {command!r}"
    f = _Fields(data, name)
    if command == OPTNEG:
        version, actions, protocol = f.uint32(), f.uint32(), f.uint32()
        symlists: dict[int, tuple[str, ...]] = {}
        while f.left:
            stage = f.uint32()
            symlists[stage] = tuple(f.string().split())
        return Options(version, actions, protocol, symlists)
    if command in _SIMPLE_REPLIES:
        f.end()
        return Simple(command)
    if command == REPLYCODE:
        text = f.string()
        f.end()
        return parseReplyCode(text)
    if command == ADDHEADER:
        header = HeaderChange(command, 0, f.string(), f.string())
    elif command in (INSHEADER, CHGHEADER):
        header = HeaderChange(command, f.uint32(), f.string(), f.string())
    elif command in (ADDRCPT, DELRCPT):
        rcpt = RecipientChange(command, f.string())
        f.end()
        return rcpt
    elif command in (ADDRCPT_PAR, CHGFROM):
        address = f.string()
        args = f.string() if f.left else ""
        f.end()
        return RecipientChange(command, address, args)
    elif command == REPLBODY:
        return ReplaceBody(data)
    elif command == QUARANTINE:
        reason = f.string()
        f.end()
        return Quarantine(reason)
    else:
        raise MilterProtocolError(f"unknown reply {command!r}")
    f.end()
    if not header.name:
        raise MilterProtocolError(f"{name}: empty header name")
    return header


# -- commands as values (for a milter: the tests' scripted one) ---------------


@dataclass(frozen=True)
class Command:
    """One MTA command as a milter sees it: C{args} depends on the command."""

    command: bytes
    args: tuple = ()


def decodeCommand(command: bytes, data: bytes) -> Command:
    """One MTA command.  @raise MilterProtocolError: unknown command or malformed data."""
    if command not in _COMMANDS:
        raise MilterProtocolError(f"unknown command {command!r}")
    f = _Fields(data, f"command {command!r}")
    if command == OPTNEG:
        args: tuple = (f.uint32(), f.uint32(), f.uint32())
    elif command == MACRO:
        stage = f.octet()
        values = f.strings()
        if len(values) % 2:
            raise MilterProtocolError("macro without its value")
        args = (stage, tuple(zip(values[::2], values[1::2], strict=True)))
    elif command == CONNECT:
        hostname = f.string()
        family = f.octet()
        if family == FAMILY_UNKNOWN:
            args = (hostname, family, 0, "")
        else:
            args = (hostname, family, f.uint16(), f.string())
    elif command in (HELO, UNKNOWN):
        args = (f.string(),)
    elif command in (MAIL, RCPT):
        args = tuple(f.strings())
        if not args:
            raise MilterProtocolError(f"{command!r} without an address")
    elif command == HEADER:
        args = (f.string(), f.string())
    elif command == BODY:
        return Command(command, (data,))
    else:
        args = ()
    f.end()
    return Command(command, args)
