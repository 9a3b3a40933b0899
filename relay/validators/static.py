"""
A fixed list of addresses: the valid mailboxes of a local domain (mode allow)
or a block list (mode deny).

Entries are C{user@domain} or C{@domain} (the whole domain), compared without
regard to case, as most MTAs do for local mailboxes.  A list file is re-read
when it changes, so adding a user needs no restart.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from relay.address import AddressError, parseDomain, parseMailbox
from relay.errors import OptionError
from relay.interfaces import IRecipientValidator
from relay.verdict import ACCEPT, CONTINUE, SessionInfo, Verdict, deny, denySoft

UNKNOWN_USER = deny("Recipient address rejected: User unknown", "5.1.1")
BLOCKED = deny("Recipient address rejected: Access denied", "5.7.1")
LIST_UNAVAILABLE = denySoft("Recipient address temporarily rejected: address list unavailable", "4.3.0")


def parseEntry(text: str) -> str:
    """Normalise one entry; L{ValueError} if it is neither an address nor C{@domain}."""
    try:
        if text.startswith("@"):
            return "@" + parseDomain(text[1:], utf8=True)
        mailbox = parseMailbox(text, utf8=True)
    except AddressError as e:
        raise ValueError(f"bad entry {text!r}: {e}") from None
    return f"{mailbox.local.lower()}@{mailbox.domain}"


def readEntries(path: Path) -> frozenset[str]:
    entries = set()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if line:
            try:
                entries.add(parseEntry(line))
            except ValueError as e:
                raise ValueError(f"{path}:{number}: {e}") from None
    return frozenset(entries)


@dataclass
class _ListFile:
    path: Path
    stamp: tuple[int, int] | None = None
    entries: frozenset[str] = frozenset()

    def current(self) -> frozenset[str]:
        """Blocking: stat, and re-read if the file changed."""
        st = os.stat(self.path)
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self.stamp:
            self.entries = readEntries(self.path)
            self.stamp = stamp
        return self.entries


@implementer(IRecipientValidator)
class StaticValidator:
    log = Logger()

    def __init__(
        self, addresses: Iterable[str], listFile: Path | None, mode: str, blocking: Callable[..., Deferred[Any]]
    ) -> None:
        self.addresses = frozenset(addresses)
        self.listFile = _ListFile(listFile) if listFile is not None else None
        self.mode = mode
        self._blocking = blocking

    def validate(self, recipient: str, session: SessionInfo) -> Verdict | Deferred[Verdict]:
        if self.listFile is None:
            return self._judge(recipient, session, self.addresses)
        d = self._blocking(self.listFile.current)
        d.addCallbacks(lambda entries: self._judge(recipient, session, self.addresses | entries), self._unavailable)
        return d

    def _unavailable(self, failure: Any) -> Verdict:
        assert self.listFile is not None
        self.log.error("address list {path} unavailable: {error}", path=str(self.listFile.path), error=failure.value)
        return LIST_UNAVAILABLE

    def _judge(self, recipient: str, session: SessionInfo, entries: frozenset[str]) -> Verdict:
        local, _, domain = recipient.rpartition("@")
        domain = domain.lower()
        listed = f"{local.lower()}@{domain}" in entries or f"@{domain}" in entries
        if self.mode == "deny":
            return BLOCKED if listed else CONTINUE
        if listed:
            return ACCEPT
        return UNKNOWN_USER if session.local_domain else CONTINUE


def build(options: dict[str, str], stateDir: Path, blocking: Callable[..., Deferred[Any]]) -> StaticValidator:
    mode = options.get("mode", "allow").strip().lower()
    if mode not in ("allow", "deny"):
        raise OptionError("mode", f"must be allow or deny, not {mode!r}")
    addresses = set()
    for word in options.get("addresses", "").split():
        try:
            addresses.add(parseEntry(word))
        except ValueError as e:
            raise OptionError("addresses", str(e)) from None
    listFile = None
    if options.get("file", "").strip():
        listFile = stateDir / options["file"].strip()
        try:
            readEntries(listFile)
        except (OSError, UnicodeDecodeError) as e:
            raise OptionError("file", f"cannot read {listFile}: {e}") from None
        except ValueError as e:
            raise OptionError("file", str(e)) from None
    if not addresses and listFile is None:
        raise OptionError("addresses", "give addresses, a file, or both")
    return StaticValidator(addresses, listFile, mode, blocking)
