"""
MAIL and RCPT parameters: which are allowed, and what they mean.

A parameter is accepted only if this session advertised its extension; the
answer to anything else is 555 5.5.4 (RFC 5321 4.1.1.11).  Pure functions: the
server passes in what it offered.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass

from relay.address import AddressError, parseMailbox
from relay.envelope import Status

Params = tuple[tuple[str, str | None], ...]

_XTEXT_HEX = re.compile(r"\+([0-9A-F]{2})")
_ADDR_TYPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*$")
NOTIFY_VALUES = frozenset({"SUCCESS", "FAILURE", "DELAY"})
BODY_VALUES = {"7BIT": None, "8BITMIME": "8BITMIME", "BINARYMIME": "BINARYMIME"}


def decodeXtext(text: str) -> str:
    """RFC 3461 xtext: printable ASCII, with '+XX' for anything else and for '+' and '='."""
    for c in text:
        if not 33 <= ord(c) <= 126 or c == "=":
            raise ValueError("invalid character in xtext")
    if "+" in _XTEXT_HEX.sub("", text):
        raise ValueError("bad '+' escape in xtext")
    return _XTEXT_HEX.sub(lambda m: chr(int(m.group(1), 16)), text)


def encodeXtext(text: str) -> str:
    """
    RFC 3461 xtext of C{text}.  A character above U+00FF has no octet to
    stand for: it goes as the \\x{HEX} of RFC 6533's utf-8-addr-xtext.
    """
    return "".join(
        c if 33 <= ord(c) <= 126 and c not in "+=" else f"+{ord(c):02X}" if ord(c) < 256 else f"\\x{{{ord(c):X}}}"
        for c in text
    )


def isPrintableASCII(text: str) -> bool:
    """
    Only characters from space to tilde: no control character (below 0x20,
    or DEL) and no octet that xtext decoding turned into a Latin-1 letter.
    A value we copy into a header we write (ORCPT into Original-Recipient,
    ENVID into Original-Envelope-Id) must be this, or a CR LF in it would
    start a new header line, or a new message, at the next hop.
    """
    return text.isascii() and text.isprintable()


def _bad(text: str, code: int = 501, enhanced: str = "5.5.4") -> Status:
    return Status(code, enhanced, text)


def _xtext(key: str, value: str | None) -> str | Status:
    try:
        return decodeXtext(value or "")
    except ValueError as e:
        return _bad(f"Bad {key} value: {e}")


def _unsupported(key: str) -> Status:
    return _bad(f"Unsupported parameter {key}", 555)


@dataclass(frozen=True)
class MailParams:
    size: int | None = None
    body: str = "7BIT"
    smtputf8: bool = False
    ret: str | None = None
    envid: str | None = None
    auth: str | None = None


@dataclass(frozen=True)
class RcptParams:
    notify: tuple[str, ...] | None = None
    orcpt: str | None = None


def mailParams(params: Params, offered: Collection[str], maxSize: int) -> MailParams | Status:
    """
    @param offered: the EHLO keywords of this session (SIZE, 8BITMIME, ...).
    @return: the parameters, or the reply refusing the command.
    """
    values: dict[str, object] = {}
    for key, value in params:
        if key == "SIZE" and "SIZE" in offered:
            if value is None or not value.isdigit() or len(value) > 20:
                return _bad("Bad SIZE value")
            if int(value) > maxSize:
                return _bad("Message size exceeds fixed maximum message size", 552, "5.3.4")
            values["size"] = int(value)
        elif key == "BODY" and "8BITMIME" in offered:
            body = (value or "").upper()
            if body not in BODY_VALUES or (body == "BINARYMIME" and "BINARYMIME" not in offered):
                return _bad("Bad BODY value")
            values["body"] = body
        elif key == "SMTPUTF8" and "SMTPUTF8" in offered:
            if value is not None:
                return _bad("SMTPUTF8 takes no value")
            values["smtputf8"] = True
        elif key == "RET" and "DSN" in offered:
            ret = (value or "").upper()
            if ret not in ("FULL", "HDRS"):
                return _bad("Bad RET value")
            values["ret"] = ret
        elif key == "ENVID" and "DSN" in offered:
            envid = _xtext(key, value)
            if isinstance(envid, Status):
                return envid
            if not envid or len(envid) > 100 or not isPrintableASCII(envid):
                return _bad("Bad ENVID parameter syntax")
            values["envid"] = envid
        elif key == "AUTH" and "AUTH" in offered:
            auth = _xtext(key, value)
            if isinstance(auth, Status):
                return auth
            if auth != "<>":
                try:
                    parseMailbox(auth, utf8=True)
                except AddressError:
                    return _bad("Bad AUTH value")
            values["auth"] = auth
        else:
            return _unsupported(key)
    return MailParams(**values)  # type: ignore[arg-type]


def rcptParams(params: Params, offered: Collection[str]) -> RcptParams | Status:
    notify: tuple[str, ...] | None = None
    orcpt: str | None = None
    for key, value in params:
        if key == "NOTIFY" and "DSN" in offered:
            items = tuple((value or "").upper().split(","))
            if items != ("NEVER",) and (not items or not set(items) <= NOTIFY_VALUES or len(set(items)) != len(items)):
                return _bad("Bad NOTIFY value")
            notify = items
        elif key == "ORCPT" and "DSN" in offered:
            addrType, semi, encoded = (value or "").partition(";")
            if not semi or not _ADDR_TYPE.match(addrType) or not encoded:
                return _bad("Bad ORCPT value")
            address = _xtext(key, encoded)
            if isinstance(address, Status):
                return address
            if len(address) > 500 or not isPrintableASCII(address):
                # As Postfix answers: the decoded address is copied into the
                # DSN's Original-Recipient field, so it must be text.
                return _bad("Bad ORCPT parameter syntax")
            orcpt = f"{addrType.lower()};{address}"
        else:
            return _unsupported(key)
    return RcptParams(notify, orcpt)
