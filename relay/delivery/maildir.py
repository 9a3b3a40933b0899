"""
Local delivery into maildirs.

Each recipient's maildir comes from a path template (C{mail/{domain}/{local}}
under the state directory by default).  A message is written to C{tmp/},
fsynced, renamed into C{new/}, and C{new/} is fsynced: only then is it
reported delivered, so a crash never loses a message the queue has forgotten.

Files use LF line endings (the maildir convention); apart from that and the
Return-Path and Delivered-To lines put in front, the body is byte-identical to
the queued data.  The data is streamed, so memory use does not grow with the
message size.
"""

from __future__ import annotations

import errno
import itertools
import os
import string
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from relay.address import AddressError, parseMailbox
from relay.envelope import DeliveryResult, Envelope, Recipient, Status
from relay.errors import OptionError
from relay.fsutil import fsyncDirectory
from relay.interfaces import IDeliveryBackend

DEFAULT_TEMPLATE = "mail/{domain}/{local}"
FIELDS = frozenset({"local", "domain"})

BAD_MAILBOX = Status(550, "5.1.3", "Bad destination mailbox address")
MAILBOX_FULL = Status(452, "4.2.2", "Mailbox full")
_FULL = (errno.ENOSPC, errno.EDQUOT)

CHUNK = 64 * 1024

# One counter per process, not per backend: two backends whose templates lead
# to the same maildir must still never produce the same file name.
_deliveries = itertools.count(1)


def checkTemplate(template: str) -> str | None:
    """
    Why C{template} is unusable, or C{None}.

    Only C{{local}} (required) and C{{domain}} may appear, plain: a format
    spec or attribute access would let the path differ from what the
    operator reads in the configuration.
    """
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        return f"bad template {template!r}: {e}"
    seen = set()
    for _, field, spec, conversion in parsed:
        if field is None:
            continue
        if field not in FIELDS:
            return f"unknown field {{{field}}} in {template!r} (only {{local}} and {{domain}} are replaced)"
        if spec or conversion:
            return f"field {{{field}}} in {template!r} takes no conversion or format spec"
        seen.add(field)
    if "local" not in seen:
        return f"template {template!r} must contain {{local}}"
    return None


def _fixedPrefix(template: str) -> str:
    """The directory part of C{template} before its first field."""
    literal = []
    for text, field, _, _ in string.Formatter().parse(template):
        literal.append(text)
        if field is not None:
            break
    prefix = "".join(literal)
    if prefix.endswith("/"):
        return prefix.rstrip("/") or "/"
    return os.path.dirname(prefix)


def _escapeHostname(hostname: str) -> str:
    return hostname.replace("/", "\\057").replace(":", "\\072")


# Linux's NAME_MAX and PATH_MAX, less room for tmp/ and a unique file name:
# a longer maildir would fail at every attempt, so it is refused at once.
_NAME_MAX = 255
_PATH_MAX = 4096 - 256


def _badPart(part: str) -> bool:
    """
    A local part or domain that cannot be one path component as written:
    empty, a separator, a hidden name (C{.}, C{..}, C{.x}), or a character
    that is not printable (NUL, controls, C1 controls, format characters such
    as bidirectional overrides, surrogates) and would make a name that reads
    differently from what it is.
    """
    return not part or "/" in part or part.startswith(".") or not part.isprintable()


def _tooLong(path: str) -> bool:
    encoded = path.encode("utf-8", "surrogateescape")
    return len(encoded) > _PATH_MAX or any(len(name) > _NAME_MAX for name in encoded.split(b"/"))


def _header(value: str) -> bytes:
    # Addresses come parsed from the envelope and cannot hold line breaks;
    # this keeps a header line a single line even if one slipped through.
    return value.replace("\r", "").replace("\n", "").encode("utf-8", "surrogateescape")


def _makedirs(path: str) -> None:
    """
    C{os.makedirs} with mode 0700 for every level it creates.

    The parent of each new directory is fsynced so that the maildir itself is
    as durable as the message put into it.
    """
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        if not os.path.isdir(path):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path) from None
        return
    except FileNotFoundError:
        parent = os.path.dirname(path)
        if not parent or parent == path:
            raise
        _makedirs(parent)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            if not os.path.isdir(path):
                raise
            return
    fsyncDirectory(os.path.dirname(path) or ".")


def copyToLF(source: BinaryIO, target: BinaryIO, chunkSize: int = CHUNK) -> None:
    """
    Copy C{source} to C{target}, turning CRLF into LF.

    A CR that ends a chunk is held back until the next chunk shows whether an
    LF follows; a lone CR anywhere is kept as it is.
    """
    pending = b""
    while True:
        chunk = source.read(chunkSize)
        if not chunk:
            break
        data = pending + chunk
        if data.endswith(b"\r"):
            data, pending = data[:-1], b"\r"
        else:
            pending = b""
        target.write(data.replace(b"\r\n", b"\n"))
    target.write(pending)


@implementer(IDeliveryBackend)
class MaildirBackend:
    """Delivers into maildirs named by a template; see the module docstring."""

    log = Logger()

    def __init__(
        self,
        template: str,
        state_dir: Path,
        hostname: str,
        blocking: Callable[..., Deferred[Any]],
        clock: Any,
    ) -> None:
        problem = checkTemplate(template)
        if problem is not None:
            raise ValueError(problem)
        self.template = template
        self._base = os.path.abspath(state_dir)
        self._prefix = os.path.normpath(os.path.join(self._base, _fixedPrefix(template)))
        self._hostname = _escapeHostname(hostname)
        self._blocking = blocking
        self._clock = clock
        # refuses() answers for the same few addresses all day, once per RCPT.
        self._refused: dict[str, bool] = {}

    def maildirFor(self, address: str) -> str | None:
        """The maildir of C{address}, or C{None} if the address cannot name one safely."""
        try:
            mailbox = parseMailbox(address, utf8=True)
        except AddressError:
            return None
        # the mailbox name, not its quoted form: "john doe"@x is the maildir john doe
        local, domain = mailbox.local.lower(), mailbox.domain.lower()
        if _badPart(local) or _badPart(domain):
            return None
        path = os.path.normpath(os.path.join(self._base, self.template.format(local=local, domain=domain)))
        if not path.startswith(self._prefix.rstrip(os.sep) + os.sep) or _tooLong(path):
            return None
        return path

    def refuses(self, address: str) -> Status | None:
        """
        L{IDeliveryBackend.refuses}: an address that names no maildir
        (see L{maildirFor}) would get L{BAD_MAILBOX} at every attempt, so the
        server refuses it at RCPT instead of accepting it and sending a
        report, perhaps to a forged sender, later.  No file system access.
        """
        refused = self._refused.get(address)
        if refused is None:
            if len(self._refused) >= 4096:
                self._refused.clear()  # bounded: many distinct addresses just recompute
            refused = self._refused[address] = self.maildirFor(address) is None
        return BAD_MAILBOX if refused else None

    def uniqueName(self) -> str:
        """A maildir file name: C{<secs>.M<usecs>P<pid>Q<counter>.<hostname>}."""
        secs, usecs = divmod(int(self._clock.seconds() * 1_000_000), 1_000_000)
        return f"{secs}.M{usecs}P{os.getpid()}Q{next(_deliveries)}.{self._hostname}"

    def deliver(
        self,
        envelope: Envelope,
        recipients: Sequence[Recipient],
        openData: Callable[[], BinaryIO],
    ) -> Deferred[list[DeliveryResult]]:
        attempts = []
        for recipient in recipients:
            maildir = self.maildirFor(recipient.address)
            if maildir is None:
                d: Deferred[Status] = succeed(BAD_MAILBOX)
            else:
                d = self._blocking(
                    self._deliverOne, maildir, self.uniqueName(), envelope.sender, recipient.address, openData
                )
                d.addErrback(self._unexpected, recipient.address)
            d.addCallback(lambda status, address=recipient.address: DeliveryResult(address, status))
            attempts.append(d)
        return gatherResults(attempts)

    def _unexpected(self, failure: Failure, address: str) -> Status:
        self.log.failure("maildir delivery to {address} failed", failure, address=address)
        return Status(451, "4.3.0", "Maildir delivery failed")

    def _deliverOne(
        self, maildir: str, unique: str, sender: str, address: str, openData: Callable[[], BinaryIO]
    ) -> Status:
        """Runs in a worker thread: one recipient, start to end."""
        tmp = os.path.join(maildir, "tmp", unique)
        created = False
        try:
            for sub in ("tmp", "new", "cur"):
                _makedirs(os.path.join(maildir, sub))
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            created = True
            with open(fd, "wb") as target:
                target.write(b"Return-Path: <" + _header(sender) + b">\n")
                target.write(b"Delivered-To: " + _header(address) + b"\n")
                with openData() as source:
                    copyToLF(source, target)
                target.flush()
                os.fsync(target.fileno())
            new = os.path.join(maildir, "new")
            os.rename(tmp, os.path.join(new, unique))
            created = False
            fsyncDirectory(new)
        except BaseException as e:
            if created:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
            if not isinstance(e, OSError):
                raise
            if e.errno in _FULL:
                return MAILBOX_FULL
            return Status(451, "4.3.0", f"Maildir delivery failed: {e.strerror or e}")
        return Status(250, "2.0.0", f"Delivered to maildir {unique}")

    def stop(self) -> None:
        pass


def fromOptions(options: Mapping[str, Any], context: Any) -> MaildirBackend:
    """The backend a C{path} option describes; shared by the backend and validator plugins."""
    template = str(options.get("path", DEFAULT_TEMPLATE))
    problem = checkTemplate(template)
    if problem is not None:
        raise OptionError("path", problem)
    return MaildirBackend(template, context.state_dir, context.hostname, context.blocking, context.reactor)
