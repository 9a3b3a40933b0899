"""
SMTP command lines to typed commands: pure functions, no I/O, fuzzable.

L{parseCommand} takes one command line without its CRLF and returns either a
command object or a L{Reject} carrying the exact reply to send.  It never
raises, whatever the bytes.  L{serialize} turns a command back into a line;
C{parseCommand(serialize(c)) == c} for every command C{parseCommand} returns.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from relay.address import AddressError, Mailbox, parsePath
from relay.envelope import Status

_KEYWORD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*$")
_VERB = re.compile(r"^[A-Za-z]{1,16}$")


@dataclass(frozen=True)
class Reject:
    """The line cannot be accepted; C{status} is the reply."""

    status: Status


@dataclass(frozen=True)
class Helo:
    verb: str  # "HELO" or "EHLO"
    domain: str


@dataclass(frozen=True)
class Mail:
    sender: Mailbox | None  # None: the null reverse path <>
    params: tuple[tuple[str, str | None], ...] = ()

    def param(self, name: str) -> str | None:
        return dict(self.params).get(name)


@dataclass(frozen=True)
class Rcpt:
    recipient: Mailbox | None  # None: the bare <postmaster> of RFC 5321 4.5.1
    params: tuple[tuple[str, str | None], ...] = ()


@dataclass(frozen=True)
class Simple:
    """A command without arguments: DATA, RSET, QUIT, STARTTLS."""

    verb: str


@dataclass(frozen=True)
class WithText:
    """A command with free text: NOOP, HELP (optional), VRFY, EXPN, ETRN (required)."""

    verb: str
    text: str


@dataclass(frozen=True)
class Auth:
    mechanism: str
    initial: str | None = None


@dataclass(frozen=True)
class Bdat:
    size: int
    last: bool = False


@dataclass(frozen=True)
class Unknown:
    verb: str


Command = Helo | Mail | Rcpt | Simple | WithText | Auth | Bdat | Unknown

SIMPLE = frozenset({"DATA", "RSET", "QUIT", "STARTTLS"})
TEXT_OPTIONAL = frozenset({"NOOP", "HELP"})
TEXT_REQUIRED = frozenset({"VRFY", "EXPN", "ETRN"})

_SYNTAX = "5.5.4"


def _reject(text: str, code: int = 501, enhanced: str = _SYNTAX) -> Reject:
    return Reject(Status(code, enhanced, text))


def _splitPath(arg: str) -> tuple[str, str]:
    """Split C{<path> params} at the closing bracket, honouring quoted local parts."""
    arg = arg.lstrip(" ")
    if not arg.startswith("<"):
        path, _, rest = arg.partition(" ")
        return path, rest
    if '"' not in arg:  # the usual path: nothing quoted, the first ">" closes it
        i = arg.find(">")
        if i == -1:
            raise ValueError("unterminated path")
        rest = arg[i + 1 :]
        if rest and not rest.startswith(" "):
            raise ValueError("text after path")
        return arg[: i + 1], rest.strip(" ")
    quoted = False
    escaped = False
    for i, c in enumerate(arg):
        if escaped:
            escaped = False
        elif c == "\\" and quoted:
            escaped = True
        elif c == '"':
            quoted = not quoted
        elif c == ">" and not quoted:
            rest = arg[i + 1 :]
            if rest and not rest.startswith(" "):
                raise ValueError("text after path")
            return arg[: i + 1], rest.strip(" ")
    raise ValueError("unterminated path")


def _params(text: str) -> tuple[tuple[str, str | None], ...] | Reject:
    seen: dict[str, str | None] = {}
    for item in text.split(" "):
        if not item:
            continue
        keyword, eq, value = item.partition("=")
        if not _KEYWORD.match(keyword):
            return _reject(f"Bad parameter {item[:40]!r}", 555)
        if eq and (not value or any(c == "=" or ord(c) < 33 or ord(c) == 127 for c in value)):
            return _reject(f"Bad value for parameter {keyword.upper()}", 555)
        keyword = keyword.upper()
        if keyword in seen:
            return _reject(f"Duplicate parameter {keyword}", 555)
        seen[keyword] = value if eq else None
    return tuple(seen.items())


def _mailOrRcpt(verb: str, arg: str, utf8: bool) -> Command | Reject:
    prefix = "FROM:" if verb == "MAIL" else "TO:"
    if arg[: len(prefix)].upper() != prefix:
        return _reject(f"Syntax: {verb} {prefix}<address>")
    try:
        path, rest = _splitPath(arg[len(prefix) :])
    except ValueError as e:
        return _reject(f"Bad address syntax: {e}")
    params = _params(rest)
    if isinstance(params, Reject):
        return params
    if verb == "MAIL":
        utf8 = utf8 or any(k == "SMTPUTF8" for k, _ in params)
        try:
            return Mail(parsePath(path, utf8=utf8, allowNull=True), params)
        except AddressError as e:
            return _addressReject(e, path)
    if path.lower() == "<postmaster>":
        return Rcpt(None, params)
    try:
        mailbox = parsePath(path, utf8=utf8)
    except AddressError as e:
        return _addressReject(e, path)
    assert mailbox is not None
    return Rcpt(mailbox, params)


def _addressReject(error: AddressError, path: str) -> Reject:
    if not path.isascii() and "SMTPUTF8" in str(error):
        return _reject(str(error), 553, "5.6.7")
    return _reject(f"Bad address syntax: {error}", 501, "5.1.3")


_CONTROL = re.compile("[\x00-\x1f\x7f]")


def parseCommand(line: bytes, utf8: bool = False) -> Command | Reject:
    """
    Parse one command line (no CRLF).

    @param utf8: the transaction was opened with SMTPUTF8, so UTF-8 addresses
        are allowed in RCPT.  MAIL decides that for itself from its own
        parameters; the server checks that the extension was offered.
    """
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return _reject("Invalid characters in command", 500, "5.5.2")
    if _CONTROL.search(text):
        return _reject("Control characters in command", 500, "5.5.2")
    verb, _, arg = text.partition(" ")
    if not _VERB.match(verb):
        return _reject("Command not recognized", 500, "5.5.2")
    verb = verb.upper()
    if not text.isascii() and verb not in ("MAIL", "RCPT"):
        return _reject("Invalid characters in command", 500, "5.5.2")
    if verb in ("HELO", "EHLO"):
        domain = arg.strip(" ")
        if not domain or " " in domain or len(domain) > 255:
            return _reject(f"Syntax: {verb} hostname")
        return Helo(verb, domain)
    if verb in ("MAIL", "RCPT"):
        return _mailOrRcpt(verb, arg, utf8)
    if verb in SIMPLE:
        if arg.strip(" "):
            return _reject(f"Syntax: {verb} takes no arguments")
        return Simple(verb)
    if verb in TEXT_OPTIONAL:
        return WithText(verb, arg.strip(" "))
    if verb in TEXT_REQUIRED:
        if not arg.strip(" "):
            return _reject(f"Syntax: {verb} string")
        return WithText(verb, arg.strip(" "))
    if verb == "AUTH":
        parts = arg.split()
        if not 1 <= len(parts) <= 2 or not _KEYWORD.match(parts[0]):
            return _reject("Syntax: AUTH mechanism [initial-response]")
        return Auth(parts[0].upper(), parts[1] if len(parts) == 2 else None)
    if verb == "BDAT":
        parts = arg.split()
        if not 1 <= len(parts) <= 2 or not parts[0].isdigit() or len(parts[0]) > 18:
            return _reject("Syntax: BDAT size [LAST]")
        if len(parts) == 2 and parts[1].upper() != "LAST":
            return _reject("Syntax: BDAT size [LAST]")
        return Bdat(int(parts[0]), len(parts) == 2)
    return Unknown(verb)


def _serializeParams(params: tuple[tuple[str, str | None], ...]) -> str:
    return "".join(f" {k}" if v is None else f" {k}={v}" for k, v in params)


def serialize(command: Command) -> bytes:
    """The command as a line (without CRLF), as our client sends it."""
    match command:
        case Helo(verb, domain):
            text = f"{verb} {domain}"
        case Mail(sender, params):
            text = f"MAIL FROM:<{sender if sender else ''}>{_serializeParams(params)}"
        case Rcpt(recipient, params):
            text = f"RCPT TO:<{recipient if recipient else 'postmaster'}>{_serializeParams(params)}"
        case Simple(verb):
            text = verb
        case WithText(verb, arg):
            text = f"{verb} {arg}" if arg else verb
        case Auth(mechanism, initial):
            text = f"AUTH {mechanism}" + (f" {initial}" if initial is not None else "")
        case Bdat(size, last):
            text = f"BDAT {size}" + (" LAST" if last else "")
        case Unknown(verb):
            text = verb
    return text.encode("utf-8")
