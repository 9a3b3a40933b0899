"""
SMTP AUTH (RFC 4954): the SASL PLAIN (RFC 4616) and LOGIN exchanges, and
password checking through twisted.cred against a file of bcrypt hashes.

The exchanges are pure state machines: the server feeds them lines and acts on
what they return.  bcrypt is slow on purpose, so every check runs in a worker
thread (C{blocking}); the reactor never waits for it.
"""

from __future__ import annotations

import base64
import binascii
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bcrypt
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import Interface, implementer

from relay.envelope import Status
from relay.fsutil import fsyncDirectory

MECHANISMS: tuple[str, ...] = ("PLAIN", "LOGIN")
_log = Logger()

BAD_BASE64 = Status(501, "5.5.2", "Cannot decode response")
CANCELLED = Status(501, "5.7.0", "Authentication cancelled")
BAD_PROXY = Status(535, "5.7.8", "Authorization identity differs from authentication identity")


@dataclass(frozen=True)
class Challenge:
    """Send C{"334 " + text}; C{text} is already base64."""

    text: str


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str
    authzid: str | None = None


@dataclass(frozen=True)
class Failed:
    status: Status


Step = Challenge | Credentials | Failed


def _decode(text: str) -> str | Failed:
    if text == "*":
        return Failed(CANCELLED)
    if text == "=":
        return ""
    try:
        return base64.b64decode(text, validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return Failed(BAD_BASE64)


def _clean(*values: str) -> bool:
    return all("\x00" not in v and "\r" not in v and "\n" not in v for v in values)


class SASLExchange:
    """One AUTH command's conversation."""

    def __init__(self, initial: str | None) -> None:
        self.initial = initial

    def start(self) -> Step:
        raise NotImplementedError

    def respond(self, line: str) -> Step:
        raise NotImplementedError


class _Plain(SASLExchange):
    def start(self) -> Step:
        if self.initial is None:
            return Challenge("")
        return self.respond(self.initial)

    def respond(self, line: str) -> Step:
        decoded = _decode(line)
        if isinstance(decoded, Failed):
            return decoded
        fields = decoded.split("\x00")
        if len(fields) != 3 or not fields[1] or not _clean(*fields):
            return Failed(BAD_BASE64)
        authzid, username, password = fields
        if authzid and authzid != username:
            return Failed(BAD_PROXY)
        return Credentials(username, password, authzid or None)


class _Login(SASLExchange):
    USERNAME = base64.b64encode(b"Username:").decode()
    PASSWORD = base64.b64encode(b"Password:").decode()

    def __init__(self, initial: str | None) -> None:
        super().__init__(initial)
        self.username: str | None = None

    def start(self) -> Step:
        if self.initial is None:
            return Challenge(self.USERNAME)
        return self.respond(self.initial)

    def respond(self, line: str) -> Step:
        decoded = _decode(line)
        if isinstance(decoded, Failed):
            return decoded
        if not _clean(decoded):
            return Failed(BAD_BASE64)
        if self.username is None:
            if not decoded:
                return Failed(BAD_BASE64)
            self.username = decoded
            return Challenge(self.PASSWORD)
        return Credentials(self.username, decoded)


def startExchange(mechanism: str, initial: str | None) -> SASLExchange | None:
    """The exchange for C{mechanism}, or None if we do not speak it (504)."""
    kind = {"PLAIN": _Plain, "LOGIN": _Login}.get(mechanism.upper())
    return kind(initial) if kind else None


# -- passwords ---------------------------------------------------------------


def hashPassword(password: str, rounds: int = 12) -> str:
    return bcrypt.hashpw(password.encode("utf-8"), bcrypt.gensalt(rounds)).decode("ascii")


def bcryptCost(hashed: str) -> int | None:
    """The cost (log2 of the rounds) of a C{$2?$NN$...} hash, or None if it is not one."""
    parts = hashed.split("$")
    if len(parts) != 4 or parts[0] or not parts[1].startswith("2") or len(parts[2]) != 2 or not parts[2].isdigit():
        return None
    return int(parts[2])


def readPasswords(path: Path, maxCost: int | None = None) -> dict[str, str]:
    """
    C{user:bcrypt-hash} lines; a malformed line is skipped and logged by number, never by content.

    A hash dearer than C{maxCost} (C{[auth] max_bcrypt_cost}) is refused too,
    with a log line naming the user: every check of it, right or wrong, would
    hold an auth thread for seconds (cost 20 is about a minute), so one such
    entry would let anyone who knows the user name tie up the pool.  It is the
    entry that is refused, not the file, because the file is re-read while
    the relay runs (C{relayctl passwd}) and other users must go on working.
    """
    users: dict[str, str] = {}
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, colon, hashed = line.partition(":")
        cost = bcryptCost(hashed)
        if not colon or not user or cost is None:
            _log.warn("{path}:{line}: not a user:bcrypt-hash line; skipped", path=str(path), line=number)
            continue
        if maxCost is not None and cost > maxCost:
            _log.error(
                "{path}:{line}: the hash of user {user} has bcrypt cost {cost}, above max_bcrypt_cost {max};"
                " user refused until the password is set again",
                path=str(path),
                line=number,
                user=user,
                cost=cost,
                max=maxCost,
            )
            continue
        users[user] = hashed
    return users


def writePasswords(path: Path, users: Mapping[str, str]) -> None:
    """Replace the file atomically (temporary file, fsync, rename, fsync of the directory), mode 0600."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=directory)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for user, hashed in users.items():
                f.write(f"{user}:{hashed}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    fsyncDirectory(directory)


# A valid hash that matches nothing: unknown users cost as much as known ones.
_DUMMY = bcrypt.hashpw(b"no such user", bcrypt.gensalt(12))


@implementer(ICredentialsChecker)
class PasswordFile:
    """Checks IUsernamePassword against the passwords file, re-read when it changes."""

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, path: Path, blocking: Callable[..., Deferred[Any]], maxCost: int | None = None) -> None:
        self.path = Path(path)
        self._blocking = blocking
        self.maxCost = maxCost
        self._stamp: tuple[int, int] | None = None
        self._users: dict[str, str] = {}

    def _current(self) -> dict[str, str]:
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp != self._stamp:
                self._users = readPasswords(self.path, self.maxCost)
                self._stamp = stamp
        except (OSError, UnicodeDecodeError) as e:
            _log.error("cannot read passwords file {path}: {error}", path=str(self.path), error=e)
            self._users, self._stamp = {}, None
        return self._users

    def requestAvatarId(self, credentials: Any) -> Deferred[str]:
        username = credentials.username.decode("utf-8", "replace")
        password = credentials.password
        hashed = self._current().get(username)

        def check() -> bool:
            candidate = hashed.encode("ascii") if hashed else _DUMMY
            try:
                return bcrypt.checkpw(password, candidate) and hashed is not None
            except ValueError:
                return False

        def decide(ok: bool) -> str:
            if not ok:
                raise UnauthorizedLogin()
            return username

        return self._blocking(check).addCallback(decide)


class IMailUser(Interface):
    """The avatar of an authenticated SMTP client: its username."""


@implementer(IRealm)
class _Realm:
    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> tuple[Any, Any, Callable[[], None]]:
        if IMailUser not in interfaces:
            raise NotImplementedError("only IMailUser")
        return IMailUser, avatarId, lambda: None


def makePortal(checker: Any) -> Portal:
    return Portal(_Realm(), [checker])
