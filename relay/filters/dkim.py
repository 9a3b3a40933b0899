"""
DKIM signing (RFC 6376) as a content filter, on dkimpy.

dkimpy signs a message given whole as bytes; a relay's message may be 35 MB,
so the body is never handed to it.  The body hash (C{bh=}) is computed here
while the message streams from its spool file, with the relaxed body
canonicalization written out as RFC 6376 3.4.4 and dkimpy have it (tested
against dkimpy's on random bodies); dkimpy gets the header block alone and
makes the signature over the headers and that body hash, as its own C{sign}
does.  Memory per signature is the header block (at most 1 MiB) and the
longest body line.  Signing runs in a C{context.blocking} thread.

Which messages: those of clients that C{sign} names (by default
authenticated clients and clients in C{relay_networks}: outgoing mail, not
mail from outside passing through), whose From domain is C{domain} or a
sub-domain of it (DMARC's relaxed alignment).  Several C{[filter:NAME]}
sections with this plugin sign for several domains; a message whose From
domain matches two of them (example.org and mail.example.org) gets both
signatures, which RFC 6376 4.2 allows.
"""

from __future__ import annotations

import base64
import hashlib
import re
import time
from collections.abc import Callable, Mapping
from email.utils import getaddresses
from pathlib import Path
from typing import IO, Any

from relay.errors import OptionError
from relay.filters.message import FilterMessage
from relay.filters.verdict import FilterVerdict, cont

# Signed by default: what OpenDKIM's and the Postfix guides' lists have, and
# RFC 6376 5.4.1 recommends.  From is signed once more than it occurs
# (over-signed), so that nobody can add a second From after us.
DEFAULT_HEADERS = (
    "from",
    "sender",
    "reply-to",
    "subject",
    "date",
    "message-id",
    "to",
    "cc",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
    "content-id",
    "content-description",
    "in-reply-to",
    "references",
    "list-id",
    "list-help",
    "list-unsubscribe",
    "list-unsubscribe-post",
    "list-subscribe",
    "list-post",
    "list-owner",
    "list-archive",
)
OVERSIGNED = ("from",)
SIGN_CHOICES = ("authenticated", "relay_networks", "all")
HEADER_LIMIT = 1024 * 1024
_BLOCK = 256 * 1024
_WSP = re.compile(rb"[\t ]+")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_SELECTOR = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")


class RelaxedBodyHash:
    """
    The hash of a body under the relaxed body canonicalization, fed in
    pieces of any size: runs of WSP become one SP, WSP at the end of a line
    goes, empty lines at the end of the body go, and a non-empty body ends
    with CRLF.  Holds one line and a count of empty lines, never the body.
    """

    def __init__(self, hasher: Callable[[], Any] = hashlib.sha256) -> None:
        self._hash = hasher()
        self._tail = b""
        self._empty = 0  # empty lines seen and not yet written: written only if something follows

    def update(self, data: bytes) -> None:
        # A whole block at a time, not line by line: a line-by-line loop held the
        # interpreter for milliseconds per 100 KB message.
        if self._tail:
            data = self._tail + data
        cut = data.rfind(b"\r\n")
        if cut < 0:
            self._tail = data
            return
        lines, self._tail = data[:cut], data[cut + 2 :]  # complete lines, joined by CRLF
        # Runs of WSP become one SP with bytes.replace (a regular expression scanned
        # 100 KB in 2.5 ms even where nothing matched), then no SP before CRLF.
        if b"\t" in lines:
            lines = lines.replace(b"\t", b" ")
        while b"  " in lines:
            lines = lines.replace(b"  ", b" ")
        lines = lines.replace(b" \r\n", b"\r\n")
        if lines.endswith(b" "):
            lines = lines[:-1]
        # Empty lines at the end of these wait: they count only if something follows.
        end, empty = len(lines), 0
        while end >= 2 and lines[end - 2 : end] == b"\r\n":
            end -= 2
            empty += 1
        if end == 0:
            self._empty += empty + 1  # every line of the block is empty
            return
        if self._empty:
            self._hash.update(b"\r\n" * self._empty)
        self._hash.update(lines[:end] + b"\r\n")
        self._empty = empty

    def _line(self, line: bytes) -> None:
        if not line:
            self._empty += 1
            return
        if self._empty:
            self._hash.update(b"\r\n" * self._empty)
            self._empty = 0
        self._hash.update(line + b"\r\n")

    def digest(self) -> bytes:
        if self._tail:
            # A last line without CRLF: dkimpy compresses its WSP but keeps a final one, then adds the CRLF.
            self._line(_WSP.sub(b" ", self._tail))
            self._tail = b""
        return self._hash.digest()


def readHeaderBlock(f: IO[bytes], limit: int = HEADER_LIMIT) -> tuple[bytes, bytes] | None:
    """
    The header block at the start of C{f} (through its empty line) and
    what was read past it; C{None} if it is longer than C{limit}.
    """
    head = b""
    while True:
        block = f.read(_BLOCK)
        if not block:
            return head, b""
        start = max(0, len(head) - 3)
        head += block
        if head.startswith(b"\r\n"):
            return b"\r\n", head[2:]
        end = head.find(b"\r\n\r\n", start)
        if end != -1:
            return head[: end + 4], head[end + 4 :]
        if len(head) > limit:
            return None


def _domainOf(value: str | None) -> str | None:
    if not value:
        return None
    addresses = [a for _, a in getaddresses([value]) if "@" in a]
    if len(addresses) != 1:
        return None  # no address, or several authors: not ours to pick one
    return _canonical(addresses[0].rpartition("@")[2])


def _canonical(domain: str) -> str:
    domain = domain.strip().rstrip(".").lower()
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return domain


def loadKey(path: Path) -> tuple[bytes, Any]:
    """
    C{(signature algorithm, private key)} from a key file: a PEM RSA key
    (PKCS#1 or PKCS#8) or Ed25519 key (PKCS#8), or the base64 seed that
    dkimpy's dknewkey writes for Ed25519.  The key is a C{cryptography} one:
    signing goes through OpenSSL, not dkimpy's pure-Python RSA, which took
    about 8 ms of the interpreter per 2048-bit signature (114 messages/s
    against 938 without the filter, bench/dkim.py).

    @raise ValueError: not a key we can sign with (RSA below 1024 bits:
        RFC 8301 forbids them).
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    data = path.read_bytes()
    if b"-----BEGIN" not in data:
        seed = base64.b64decode(data.strip(), validate=True)
        if len(seed) != 32:
            raise ValueError("neither a PEM key nor a base64 Ed25519 key of 32 octets")
        return b"ed25519-sha256", ed25519.Ed25519PrivateKey.from_private_bytes(seed)
    key = serialization.load_pem_private_key(data, password=None)
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < 1024:
            raise ValueError(f"an RSA key of {key.key_size} bits (RFC 8301: at least 1024; 2048 is usual)")
        return b"rsa-sha256", key
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return b"ed25519-sha256", key
    raise ValueError(f"a {type(key).__name__}: only RSA and Ed25519 keys sign DKIM")


class DKIMSigner:
    """One signing domain and selector: an L{relay.interfaces.IMessageFilter}."""

    def __init__(
        self,
        domain: str,
        selector: str,
        algorithm: bytes,
        key: Any,
        headers: tuple[str, ...] = DEFAULT_HEADERS,
        sign: frozenset[str] = frozenset({"authenticated", "relay_networks"}),
        blocking: Callable[..., Any] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.domain = _canonical(domain)
        self.selector = selector
        self.algorithm = algorithm
        self.key = key
        self.headers = headers
        self.sign = sign
        self.blocking = blocking
        self.clock = clock

    def wants(self, message: FilterMessage) -> str | None:
        """Why this message is not signed here, or C{None} if it is."""
        if "all" not in self.sign:
            authenticated = "authenticated" in self.sign and message.authenticated is not None
            trusted = "relay_networks" in self.sign and message.relay_client
            if not (authenticated or trusted):
                return "not a signing client"
        fromDomain = _domainOf(message.header("from"))
        if fromDomain is None:
            return "no single From address"
        if fromDomain != self.domain and not fromDomain.endswith("." + self.domain):
            return f"From domain {fromDomain} is not {self.domain}"
        return None

    def check(self, message: FilterMessage) -> Any:
        why = self.wants(message)
        if why is not None:
            return cont(f"dkim=none d={self.domain} ({why})")
        if self.blocking is None:
            return self.signMessage(message)
        return self.blocking(self.signMessage, message)

    def signMessage(self, message: FilterMessage) -> FilterVerdict:
        """Read the message once from its file and sign it (in a worker thread)."""
        with message.open() as f:
            parts = readHeaderBlock(f)
            if parts is None:
                return cont(f"dkim=none d={self.domain} (header block over {HEADER_LIMIT} octets)")
            head, rest = parts
            body = RelaxedBodyHash()
            body.update(rest)
            while block := f.read(_BLOCK):
                body.update(block)
        value = self.signature(head, body.digest())
        return cont(f"dkim=signed d={self.domain} s={self.selector}").withHeaders(("DKIM-Signature", value))

    def signature(self, head: bytes, bodyHash: bytes) -> str:
        """
        The DKIM-Signature field value (folded, without its name) for a
        header block and a body hash: what dkimpy's C{DKIM.sign} makes (its
        header parsing, canonicalization, selection, folding and header
        hash), with the body hash given instead of computed from a body in
        memory, and the signature made by OpenSSL.
        """
        import dkim
        from dkim.canonicalization import CanonicalizationPolicy

        d = dkim.DKIM(head, signature_algorithm=self.algorithm)
        present = [name.lower() for name, _ in d.headers]
        include = [n for n in present if n.decode("ascii", "replace") in self.headers]
        include += [n.encode() for n in OVERSIGNED if n in self.headers]
        policy = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
        fields = [
            (b"v", b"1"),
            (b"a", self.algorithm),
            (b"c", policy.to_c_value()),
            (b"d", self.domain.encode()),
            (b"i", b"@" + self.domain.encode()),
            (b"q", b"dns/txt"),
            (b"s", self.selector.encode()),
            (b"t", str(int(self.clock())).encode()),
            (b"h", b" : ".join(include)),
            (b"bh", base64.b64encode(bodyHash)),
            (b"b", b"0" * 60),  # as dkimpy: b= folds onto its own line
        ]
        name = b"DKIM-Signature"
        value = dkim.fold(b"; ".join(b"=".join(x) for x in fields), namelen=len(name), linesep=b"\r\n")
        value = dkim.RE_BTAG.sub(b"\\1", value)
        h = hashlib.sha256()
        dkim.hash_headers(h, policy, policy.canonicalize_headers(d.headers), include, (name, b" " + value), None)
        fields[-1] = (b"b", base64.b64encode(self._sign(h.digest())))
        value = dkim.fold(b"; ".join(b"=".join(x) for x in fields) + b"\r\n", namelen=len(name), linesep=b"\r\n")
        return value.decode("ascii").strip()

    def _sign(self, digest: bytes) -> bytes:
        if self.algorithm == b"rsa-sha256":
            from cryptography.hazmat.primitives import hashes
            from cryptography.hazmat.primitives.asymmetric import padding, utils

            return self.key.sign(digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))
        return self.key.sign(digest)  # ed25519-sha256 signs the SHA-256 of the headers (RFC 8463 3)

    def stop(self) -> None:
        pass


def _words(text: str) -> list[str]:
    return text.replace(",", " ").replace(":", " ").split()


def build(options: Mapping[str, str], context: Any) -> DKIMSigner:
    """A L{DKIMSigner} from the keys of its C{[filter:NAME]} section; L{OptionError} names the bad key."""
    domain = (options.get("domain") or "").strip()
    if not domain or "." not in domain or any(c in domain for c in " @;/"):
        raise OptionError("domain", f"a signing domain is required (such as example.org), not {domain!r}")
    selector = (options.get("selector") or "").strip()
    if not _SELECTOR.fullmatch(selector):
        raise OptionError("selector", f"a selector is required (letters, digits, hyphens, dots), not {selector!r}")
    keyText = (options.get("private_key") or "").strip()
    if not keyText:
        raise OptionError("private_key", "the private key file is required (PEM, RSA or Ed25519)")
    keyPath = Path(keyText) if Path(keyText).is_absolute() else Path(context.state_dir) / keyText
    try:
        algorithm, key = loadKey(keyPath)
    except OSError as e:
        raise OptionError("private_key", f"cannot read {keyPath}: {e.strerror or e}") from None
    except Exception as e:
        raise OptionError("private_key", f"{keyPath} is not a usable key: {e}") from None
    headers = DEFAULT_HEADERS
    if options.get("headers", "").strip():
        headers = tuple(h.lower() for h in _words(options["headers"]))
        if "from" not in headers:
            raise OptionError("headers", "must include from (RFC 6376 5.4)")
        for h in headers:
            if not re.fullmatch(r"[!-9;-~]+", h):
                raise OptionError("headers", f"bad header field name {h!r}")
    sign = frozenset(_words(options.get("sign", "authenticated relay_networks")))
    if not sign or not sign <= set(SIGN_CHOICES):
        raise OptionError("sign", f"one or more of {', '.join(SIGN_CHOICES)}, not {options.get('sign')!r}")
    return DKIMSigner(domain, selector, algorithm, key, headers=headers, sign=sign, blocking=context.blocking)
