"""
Mailbox and domain syntax (RFC 5321 section 4.1.2, RFC 6531 for UTF-8).

Addresses are parsed once, at the edge, into L{Mailbox}; everything inside the
relay handles the normalised text form (domain lower-cased, local part as sent,
quoted only when it has to be).
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass

# atext of RFC 5322 without the specials; UTF-8 (any non-ASCII code point) is
# admitted separately, and only when the caller allows it.
_ATEXT = r"A-Za-z0-9!#$%&'*+\-/=?^_`{|}~"
_DOT_STRING = {
    utf8: re.compile(r"(?:[{0}]+)(?:\.[{0}]+)*".format(_ATEXT + ("\x80-\U0010ffff" if utf8 else "")))
    for utf8 in (False, True)
}
_LDH = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_MAX_LOCAL = 64
_MAX_DOMAIN = 255
_MAX_PATH = 256


class AddressError(ValueError):
    """The text is not a mailbox this relay can carry."""


@dataclass(frozen=True)
class Mailbox:
    local: str
    domain: str

    def __str__(self) -> str:
        return self.text

    @functools.cached_property
    def text(self) -> str:
        """The path form; asked for at every step of a transaction, so kept."""
        return f"{quoteLocal(self.local)}@{self.domain}"

    @property
    def ascii(self) -> bool:
        return str(self).isascii()


def _isUTF8(ch: str) -> bool:
    return ord(ch) > 127


def _isDotString(text: str, utf8: bool) -> bool:
    return _DOT_STRING[utf8].fullmatch(text) is not None


def quoteLocal(local: str) -> str:
    """The local part as it must appear in a path: quoted unless it is a dot-string."""
    if _isDotString(local, utf8=True):
        return local
    return '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _unquote(text: str, utf8: bool) -> str:
    """Decode a Quoted-string (the surrounding quotes included)."""
    out = []
    i = 1
    end = len(text) - 1
    while i < end:
        c = text[i]
        if c == "\\":
            if i + 1 >= end:
                raise AddressError("dangling backslash in quoted local part")
            nxt = text[i + 1]
            if not (32 <= ord(nxt) <= 126):
                raise AddressError("bad quoted pair in local part")
            out.append(nxt)
            i += 2
            continue
        if c == '"' or not (32 <= ord(c) <= 126 or (utf8 and _isUTF8(c))):
            raise AddressError("bad character in quoted local part")
        out.append(c)
        i += 1
    return "".join(out)


def parseDomain(text: str, utf8: bool = False) -> str:
    """
    A domain or address literal, normalised (lower case; literals canonical).

    U-labels are accepted only with C{utf8}; they are kept in Unicode form
    (lower-cased) so that maildir paths and logs read naturally; use
    L{asciiDomain} when talking DNS.
    """
    if not text or len(text) > _MAX_DOMAIN:
        raise AddressError("bad domain length")
    if text.startswith("["):
        if not text.endswith("]"):
            raise AddressError("unterminated address literal")
        inner = text[1:-1]
        try:
            if inner[:5].lower() == "ipv6:":
                return "[IPv6:" + ipaddress.IPv6Address(inner[5:]).compressed + "]"
            return "[" + str(ipaddress.IPv4Address(inner)) + "]"
        except ValueError:
            raise AddressError(f"bad address literal {text!r}") from None
    labels = text.split(".")
    for label in labels:
        if label.isascii():
            if not _LDH.match(label):
                raise AddressError(f"bad domain {text!r}")
        elif not utf8:
            raise AddressError(f"non-ASCII domain {text!r} needs SMTPUTF8")
        else:
            try:
                label.encode("idna")
            except UnicodeError:
                raise AddressError(f"bad internationalised domain {text!r}") from None
    return text.lower()


def asciiDomain(domain: str) -> str:
    """The A-label form of a domain, for DNS and for comparison."""
    if domain.isascii():
        return domain
    return domain.encode("idna").decode("ascii")


def parseMailbox(text: str, utf8: bool = False) -> Mailbox:
    """Parse C{local@domain} (no angle brackets)."""
    if not text:
        raise AddressError("empty address")
    if text.startswith('"'):
        close = 1
        while True:
            close = text.find('"', close)
            if close == -1:
                raise AddressError("unterminated quoted local part")
            backslashes = len(text[:close]) - len(text[:close].rstrip("\\"))
            if backslashes % 2 == 0:
                break
            close += 1
        if text[close + 1 : close + 2] != "@":
            raise AddressError("quoted local part must be followed by @")
        local = _unquote(text[: close + 1], utf8)
        domain = text[close + 2 :]
    else:
        local, at, domain = text.rpartition("@")
        if not at:
            raise AddressError("address has no domain")
        if not _isDotString(local, utf8):
            if not utf8 and not local.isascii():
                raise AddressError("non-ASCII local part needs SMTPUTF8")
            raise AddressError(f"bad local part {local!r}")
    if len(local.encode("utf-8")) > _MAX_LOCAL:
        raise AddressError("local part longer than 64 octets")
    return Mailbox(local, parseDomain(domain, utf8))


def parsePath(text: str, utf8: bool = False, allowNull: bool = False) -> Mailbox | None:
    """
    Parse a reverse- or forward-path: C{<mailbox>}, C{<@relay,@relay:mailbox>}
    (source routes are dropped, RFC 5321 section 4.1.1.3), or C{<>} when
    C{allowNull}.  A missing pair of angle brackets is tolerated, as most MTAs
    do, when the mailbox has no spaces.

    @return: the mailbox, or L{None} for the null path.
    """
    if len(text.encode("utf-8")) > _MAX_PATH:
        raise AddressError("path longer than 256 octets")
    if text.startswith("<"):
        if not text.endswith(">"):
            raise AddressError("unterminated path")
        inner = text[1:-1]
    else:
        if " " in text or ">" in text:
            raise AddressError("bad path")
        inner = text
    if inner == "":
        if allowNull and text == "<>":
            return None
        raise AddressError("empty path")
    if inner.startswith("@"):
        route, colon, inner = inner.partition(":")
        if not colon:
            raise AddressError("bad source route")
        for hop in route.split(","):
            if not hop.startswith("@"):
                raise AddressError("bad source route")
            parseDomain(hop[1:], utf8)
    return parseMailbox(inner, utf8)
