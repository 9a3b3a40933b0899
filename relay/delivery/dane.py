"""
DANE for SMTP (RFC 7672): authenticating an MX host by its DNSSEC-signed TLSA records.

Opportunistic STARTTLS can be stripped or intercepted by anyone on the path.  A
receiving domain that signs its zone can publish, at C{_25._tcp.MXHOST}, which
certificate or key its MX presents; a sender that honours them refuses to send
in clear and refuses an impostor.  This module decides, for one MX host, whether
DANE applies and checks a finished TLS handshake against the records.  It does
no DNS and no networking of its own: the C{mx} backend passes its resolver in
and calls the check on its own connection.

The whole API, in the order the C{mx} backend uses it::

    policy = await dane.lookup(resolve, mxHost, secure=mxAnswerAuthenticated)
    if policy.mode is Mode.FAILED:        # TLSA lookup failed on a signed host
        defer this host with policy.status()            (451 4.7.5), try the next MX
    elif policy.requiresTLS:              # DANE applies: it wins over MTA-STS
        connect with TLSPolicy.REQUIRED and relay.smtp.tls.clientOptions(mxHost, verify=False)
            (no STARTTLS offered or refused: defer 4.7.5, result STARTTLS_NOT_SUPPORTED)
        after STARTTLS and the second EHLO, before MAIL FROM:
        verdict = dane.checkTransport(policy, client.transport, clock.seconds())
        if not verdict.ok: QUIT, defer with verdict.status() (451 4.7.5); nothing is sent
    else:                                 # Mode.NONE: MTA-STS or opportunistic TLS as before

C{resolve} is the one thing this module needs from the backend::

    async def resolve(name: str, rdtype: str) -> tuple[rrset | None, bool]

It returns the dnspython RRset of the answer (C{None} for NODATA) and whether
the answer was authenticated, i.e. the validating resolver set the AD bit in
its reply (C{answer.response.flags & dns.flags.AD}).  As Postfix does, the AD
bit is trusted only because the operator asked for it (C{dnssec = yes}) and
points C{nameservers} at a validating resolver on a trusted path (normally
127.0.0.1); and a validating resolver sets AD only when the query asks for it,
so the backend's dnspython resolver must send queries with the AD flag
(C{resolver.flags = dns.flags.RD | dns.flags.AD}) or with EDNS DO
(C{resolver.use_edns(0, dns.flags.DO, 1232)}).  It raises
C{dns.resolver.NXDOMAIN} for a name that does not exist and any other
C{dns.exception.DNSException} (or C{OSError}) when the lookup failed: SERVFAIL,
which is what a validating resolver answers for a bogus signature, or a
timeout.

What RFC 7672 asks, and how it maps here:

  - DANE applies to an MX host only when the MX RRset (and the host's address
    records) were authenticated (RFC 7672 2.2.1, 2.2.2); the caller says so with
    C{secure}, and no TLSA lookup is made otherwise.  An unauthenticated TLSA
    answer is ignored: L{Mode.NONE}, the other policies decide.
  - A TLSA lookup that fails (not NXDOMAIN, not NODATA) on a secure host makes
    the host unusable for now (2.2.3): L{Mode.FAILED}, deferred with 4.7.5, the
    next MX is tried.
  - Only DANE-TA(2) and DANE-EE(3), selectors 0 and 1, matching types 0, 1 and
    2 are usable (3.1.3); PKIX-TA(0) and PKIX-EE(1) are treated as unusable.
    When authenticated records exist but none is usable, TLS is still mandatory
    but the peer is not authenticated (2.2): L{Mode.TLS_ONLY}.
  - DANE-EE(3) matches the leaf alone; its names and dates are ignored (3.1.1).
  - DANE-TA(2) matches a certificate (or, for C{2 1 0}, a bare key) that the
    leaf chains to through the certificates the peer sent; then the chain below
    the anchor must be valid now and the leaf must carry the TLSA base domain
    or the MX host name, wildcards in the leftmost label allowed (3.1.2, 3.2.2,
    3.2.3).

Failures carry their RFC 8460 result type (L{STARTTLS_NOT_SUPPORTED},
L{CERTIFICATE_HOST_MISMATCH}, L{CERTIFICATE_EXPIRED}, L{VALIDATION_FAILURE},
L{TLSA_INVALID}, L{DNSSEC_INVALID}) so TLS reporting can count them, and
L{HostPolicy.policyStrings} gives the TLSA records in the form RFC 8460's
C{policy-string} wants.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import dns.exception
import dns.resolver
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.x509.oid import NameOID

from relay.envelope import Status

__all__ = [
    "CERTIFICATE_EXPIRED",
    "CERTIFICATE_HOST_MISMATCH",
    "DNSSEC_INVALID",
    "STARTTLS_NOT_SUPPORTED",
    "TLSA_INVALID",
    "VALIDATION_FAILURE",
    "HostPolicy",
    "Mode",
    "Resolve",
    "TLSARecord",
    "Verdict",
    "check",
    "checkTransport",
    "lookup",
    "matches",
    "peerChain",
    "usable",
]

# Certificate usages, selectors and matching types (RFC 6698, names from RFC 7218).
PKIX_TA, PKIX_EE, DANE_TA, DANE_EE = 0, 1, 2, 3
CERT, SPKI = 0, 1
FULL, SHA2_256, SHA2_512 = 0, 1, 2

# RFC 8460 section 4.3 result types, for TLS reporting.
STARTTLS_NOT_SUPPORTED = "starttls-not-supported"
CERTIFICATE_HOST_MISMATCH = "certificate-host-mismatch"
CERTIFICATE_EXPIRED = "certificate-expired"
VALIDATION_FAILURE = "validation-failure"
TLSA_INVALID = "tlsa-invalid"
DNSSEC_INVALID = "dnssec-invalid"

# A peer's chain is walked at most this deep: a path longer than any real one
# costs a hostile server nothing to send and us a signature check per step.
MAX_DEPTH = 8

Resolve = Callable[[str, str], Awaitable[tuple[Any, bool]]]
"""C{resolve(name, rdtype) -> (rrset or None, authenticated)}; see the module docstring."""

Chain = Sequence[Any]
"""The peer's certificates, leaf first: pyOpenSSL C{X509} or C{cryptography} certificates."""


@dataclass(frozen=True)
class TLSARecord:
    """One TLSA record; C{data} is the certificate association data, raw bytes."""

    usage: int
    selector: int
    mtype: int
    data: bytes

    @classmethod
    def fromRdata(cls, rdata: Any) -> TLSARecord:
        """From a dnspython C{TLSA} rdata (its C{usage}, C{selector}, C{mtype}, C{cert})."""
        return cls(int(rdata.usage), int(rdata.selector), int(rdata.mtype), bytes(rdata.cert))

    @classmethod
    def parse(cls, text: str) -> TLSARecord:
        """From presentation form, C{"3 1 1 0123abcd..."} (the hex may be split by spaces)."""
        usage, selector, mtype, *data = text.split()
        return cls(int(usage), int(selector), int(mtype), bytes.fromhex("".join(data)))

    def __str__(self) -> str:
        return f"{self.usage} {self.selector} {self.mtype} {self.data.hex()}"

    @property
    def usable(self) -> bool:
        """RFC 7672 3.1.3; a digest of the wrong length can match nothing and is unusable too."""
        if self.usage not in (DANE_TA, DANE_EE) or self.selector not in (CERT, SPKI):
            return False
        if self.mtype == SHA2_256:
            return len(self.data) == 32
        if self.mtype == SHA2_512:
            return len(self.data) == 64
        return self.mtype == FULL and len(self.data) > 0


def usable(records: Iterable[TLSARecord]) -> tuple[TLSARecord, ...]:
    """The records SMTP may authenticate with: DANE-TA(2)/DANE-EE(3), selector 0/1, matching 0/1/2."""
    return tuple(record for record in records if record.usable)


class Mode(enum.Enum):
    NONE = "none"  # DANE does not apply: MTA-STS or opportunistic TLS decide
    AUTHENTICATE = "dane"  # TLS required, and the peer must match a usable TLSA record
    TLS_ONLY = "dane-tls-only"  # authenticated TLSA records, none usable: TLS required, peer not authenticated
    FAILED = "failed"  # the TLSA lookup failed on a secure host: defer this host, try the next MX


@dataclass(frozen=True)
class HostPolicy:
    """
    What DANE requires of one MX host.

    C{names} are the reference identifiers a DANE-TA chain's leaf must carry
    one of: the TLSA base domain and the MX host name (the same name unless the
    caller followed a CNAME and passes both).
    """

    host: str
    mode: Mode
    records: tuple[TLSARecord, ...] = ()  # every authenticated record, usable or not
    names: tuple[str, ...] = ()
    result: str | None = None  # for FAILED, the RFC 8460 result type
    detail: str = ""

    @property
    def usableRecords(self) -> tuple[TLSARecord, ...]:
        return usable(self.records)

    @property
    def requiresTLS(self) -> bool:
        return self.mode in (Mode.AUTHENTICATE, Mode.TLS_ONLY)

    def policyStrings(self) -> list[str]:
        """The TLSA records as RFC 8460 C{policy-string} entries (C{"3 1 1 HEX"})."""
        return [str(record) for record in self.records]

    def status(self) -> Status:
        """The deferral of a L{Mode.FAILED} host."""
        return Status(451, "4.7.5", f"DANE: {self.detail or 'TLSA lookup failed'} for {self.host}")


@dataclass(frozen=True)
class Verdict:
    """
    The outcome of checking a finished handshake.

    C{verified} is whether the peer was authenticated (False for
    L{Mode.TLS_ONLY}, which is still C{ok}); C{result} is the RFC 8460 result
    type of a failure.
    """

    ok: bool
    verified: bool = False
    result: str | None = None
    detail: str = ""
    matched: TLSARecord | None = field(default=None, compare=False)

    def status(self) -> Status:
        """The deferral for a failed check: the MX is not given the message."""
        return Status(451, "4.7.5", f"DANE: {self.detail or self.result or 'verification failed'}")


def _name(host: str) -> str:
    """Lower-case A-labels without the root dot: the one form names compare in."""
    host = host.rstrip(".").lower()
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError:
        return host


async def lookup(resolve: Resolve, host: str, port: int = 25, secure: bool = True) -> HostPolicy:
    """
    DANE's policy for MX host C{host}: the authenticated C{_PORT._tcp.HOST} TLSA records.

    C{secure} is whether the MX RRset that named C{host} (and C{host}'s
    address records) were authenticated; without it DANE does not apply and no
    TLSA query is sent (RFC 7672 2.2.1, 2.2.2).
    """
    base = _name(host)
    if not secure:
        return HostPolicy(base, Mode.NONE, names=(base,), detail="MX or address records not authenticated")
    name = f"_{port}._tcp.{base}"
    try:
        rrset, authenticated = await resolve(name, "TLSA")
    except dns.resolver.NXDOMAIN:
        return HostPolicy(base, Mode.NONE, names=(base,), detail="no TLSA records")
    except (dns.exception.DNSException, OSError) as e:
        return HostPolicy(
            base,
            Mode.FAILED,
            names=(base,),
            result=DNSSEC_INVALID,
            detail=f"TLSA lookup of {name} failed ({type(e).__name__})",
        )
    if rrset is None:
        return HostPolicy(base, Mode.NONE, names=(base,), detail="no TLSA records")
    if not authenticated:
        return HostPolicy(base, Mode.NONE, names=(base,), detail="TLSA records not authenticated, ignored")
    records = tuple(TLSARecord.fromRdata(rdata) for rdata in rrset)
    if not usable(records):
        return HostPolicy(
            base, Mode.TLS_ONLY, records, names=(base,), result=TLSA_INVALID, detail="no usable TLSA record"
        )
    return HostPolicy(base, Mode.AUTHENTICATE, records, names=(base,))


# -- matching -------------------------------------------------------------------


def _cryptography(certificate: Any) -> x509.Certificate:
    if isinstance(certificate, x509.Certificate):
        return certificate
    return certificate.to_cryptography()  # pyOpenSSL X509


def _selected(certificate: x509.Certificate, selector: int) -> bytes:
    if selector == CERT:
        return certificate.public_bytes(serialization.Encoding.DER)
    return certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _associated(record: TLSARecord, selected: bytes) -> bool:
    if record.mtype == SHA2_256:
        return hashlib.sha256(selected).digest() == record.data
    if record.mtype == SHA2_512:
        return hashlib.sha512(selected).digest() == record.data
    return record.mtype == FULL and selected == record.data


def _matchesCertificate(record: TLSARecord, certificate: x509.Certificate) -> bool:
    try:
        return _associated(record, _selected(certificate, record.selector))
    except (ValueError, UnsupportedAlgorithm):
        return False  # a key type cryptography cannot serialise matches nothing


def _issued(child: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def _signedByKey(child: x509.Certificate, spki: bytes) -> bool:
    """For C{2 1 0}: the trust anchor is a bare key, so only the signature can be checked."""
    try:
        key = serialization.load_der_public_key(spki)
        algorithm = child.signature_hash_algorithm
        if isinstance(key, rsa.RSAPublicKey):
            if algorithm is None:
                return False
            key.verify(child.signature, child.tbs_certificate_bytes, padding.PKCS1v15(), algorithm)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            if algorithm is None:
                return False
            key.verify(child.signature, child.tbs_certificate_bytes, ec.ECDSA(algorithm))
        elif isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
            key.verify(child.signature, child.tbs_certificate_bytes)
        else:
            return False
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def _isCA(certificate: x509.Certificate) -> bool:
    try:
        return bool(certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _path(chain: list[x509.Certificate]) -> list[x509.Certificate]:
    """The leaf and its issuers among what the peer sent, in signing order, whatever order they came in."""
    path = [chain[0]]
    others = chain[1:]
    while len(path) < MAX_DEPTH:
        current = path[-1]
        if current.issuer == current.subject and _issued(current, current):
            break  # self-signed: the top
        issuer = next(
            (
                c
                for c in others
                if all(c is not p for p in path) and c.subject == current.issuer and _issued(current, c)
            ),
            None,
        )
        if issuer is None:
            break
        path.append(issuer)
    return path


def _dnsNames(certificate: x509.Certificate) -> list[str]:
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        found = names.get_values_for_type(x509.DNSName)
    except (x509.ExtensionNotFound, ValueError):
        found = []
    if not found:  # RFC 7672 3.2.3: the common name only when there is no DNS name at all
        try:
            found = [str(a.value) for a in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        except ValueError:
            found = []
    return [_name(name) for name in found]


def _nameMatches(pattern: str, name: str) -> bool:
    if pattern == name:
        return True
    # A wildcard stands for exactly one whole leftmost label (RFC 7672 3.2.3).
    if pattern.startswith("*.") and "*" not in pattern[2:]:
        head, _, rest = name.partition(".")
        return bool(head) and rest == pattern[2:] and "." in rest
    return False


def _hostMatches(leaf: x509.Certificate, names: Iterable[str]) -> bool:
    wanted = [_name(n) for n in names]
    return any(_nameMatches(pattern, n) for pattern in _dnsNames(leaf) for n in wanted)


def _current(certificate: x509.Certificate, now: datetime) -> bool:
    return certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc


def _verify(records: Sequence[TLSARecord], chain: Chain, names: Iterable[str], now: float) -> Verdict:
    records = usable(records)
    if not chain:
        return Verdict(False, result=VALIDATION_FAILURE, detail="the server sent no certificate")
    try:
        certificates = [_cryptography(each) for each in chain]
    except Exception:
        return Verdict(False, result=VALIDATION_FAILURE, detail="the server's certificate cannot be parsed")
    leaf = certificates[0]
    for record in records:
        if record.usage == DANE_EE and _matchesCertificate(record, leaf):
            return Verdict(
                True,
                verified=True,
                detail=f"DANE-EE matched ({record.usage} {record.selector} {record.mtype})",
                matched=record,
            )
    anchors = [r for r in records if r.usage == DANE_TA]
    if not anchors:
        return Verdict(False, result=VALIDATION_FAILURE, detail="no TLSA record matches the server's certificate")
    path = _path(certificates)
    when = datetime.fromtimestamp(now, UTC)
    failure: Verdict | None = None
    for record in anchors:
        # Where the chain reaches the anchor: the index of the first certificate it
        # vouches for, the anchor itself a certificate in the path (depth >= 1) or
        # a bare key that signed path[depth - 1].
        depth = next((i for i in range(1, len(path)) if _matchesCertificate(record, path[i])), None)
        if depth is not None:
            below = path[: depth + 1]
        elif record.selector == SPKI and record.mtype == FULL:
            top = next((i for i in range(len(path)) if _signedByKey(path[i], record.data)), None)
            if top is None:
                continue
            below = path[: top + 1]
        else:
            continue
        if not all(_isCA(issuer) for issuer in below[1:]):
            failure = failure or Verdict(False, result=VALIDATION_FAILURE, detail="an issuer in the chain is not a CA")
            continue
        if not all(_current(each, when) for each in below):
            failure = Verdict(
                False, result=CERTIFICATE_EXPIRED, detail="a certificate in the chain is expired or not yet valid"
            )
            continue
        if not _hostMatches(leaf, names):
            failure = Verdict(
                False,
                result=CERTIFICATE_HOST_MISMATCH,
                detail=f"the certificate is not for {', '.join(names)}",
            )
            continue
        return Verdict(
            True,
            verified=True,
            detail=f"DANE-TA matched ({record.usage} {record.selector} {record.mtype})",
            matched=record,
        )
    return failure or Verdict(
        False, result=VALIDATION_FAILURE, detail="no TLSA record matches the server's certificate chain"
    )


def matches(records: Sequence[TLSARecord], chain: Chain, names: Iterable[str], now: float) -> bool:
    """
    Whether the peer's C{chain} (leaf first, as sent) satisfies one of the usable C{records}.

    C{names} are the reference identifiers a DANE-TA chain's leaf must carry
    (see L{HostPolicy}); C{now} (POSIX seconds, from the caller's clock) dates
    a DANE-TA chain.  Both are ignored for DANE-EE.  Whatever the records and
    the chain hold, the answer is True or False, never an exception.
    """
    return _verify(records, chain, tuple(names), now).ok


def check(policy: HostPolicy, chain: Chain | None, now: float) -> Verdict:
    """
    The verdict on a handshake with C{policy.host}; C{chain} is None without TLS.

    C{now} is the caller's clock (POSIX seconds).
    """
    if policy.mode is Mode.NONE:
        return Verdict(True, detail="DANE does not apply")
    if policy.mode is Mode.FAILED:
        return Verdict(False, result=policy.result, detail=policy.detail)
    if chain is None:
        return Verdict(False, result=STARTTLS_NOT_SUPPORTED, detail="TLS is required by DANE and was not used")
    if policy.mode is Mode.TLS_ONLY:
        return Verdict(True, detail="no usable TLSA record: encrypted, not authenticated")
    return _verify(policy.records, chain, policy.names, now)


def peerChain(transport: Any) -> list[x509.Certificate] | None:
    """
    The certificates the peer sent on a finished TLS connection, leaf first; None without TLS.

    C{transport} is what the SMTP client writes to: a TCP transport after
    C{startTLS} (its C{protocol} is Twisted's C{TLSMemoryBIOProtocol}), a
    C{TLSMemoryBIOProtocol} itself, or the pyOpenSSL C{Connection}.
    """
    from OpenSSL import SSL
    from twisted.protocols.tls import TLSMemoryBIOProtocol

    connection = transport
    if not isinstance(connection, SSL.Connection):
        if not isinstance(connection, TLSMemoryBIOProtocol):
            connection = getattr(transport, "protocol", None)
        if not isinstance(connection, TLSMemoryBIOProtocol):
            return None
        connection = connection.getHandle()
    chain = connection.get_peer_cert_chain(as_cryptography=True)
    return list(chain) if chain else []


def checkTransport(policy: HostPolicy, transport: Any, now: float) -> Verdict:
    """L{check} on the connection the SMTP client used, after STARTTLS and before MAIL FROM."""
    return check(policy, peerChain(transport), now)
