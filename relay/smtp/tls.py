"""
TLS contexts for the listeners and for outbound delivery.

Everything an operator can get wrong (a path, a PEM file, a key that belongs to
another certificate) is found here, when the relay starts, and reported as a
L{TLSError} naming the key of the C{[tls]} or C{[delivery:NAME]} section; a
relay that starts must not then fail its first STARTTLS.

Both directions refuse anything older than TLS 1.2.  Listeners offer TLS 1.2
clients only forward-secret AEAD suites (the Mozilla "intermediate" profile);
TLS 1.3 suites are OpenSSL's, all of them both.  The client verifies the
peer through Twisted's C{optionsForClientTLS}, which checks the hostname with
C{service_identity} (RFC 6125) rather than OpenSSL's own matching.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import idna
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from OpenSSL import SSL, crypto
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IProtocolFactory, IReactorTime
from twisted.internet.ssl import (
    AcceptableCiphers,
    Certificate,
    CertificateOptions,
    TLSVersion,
    optionsForClientTLS,
    platformTrust,
    trustRootFromCertificates,
)
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from zope.interface import implementer

from relay.errors import OptionError

__all__ = ["TLSError", "clientOptions", "serverOptions", "wrapImplicit"]

_log = Logger()

# The floor for both directions: TLS 1.0 and 1.1 are deprecated by RFC 8996.
MINIMUM_VERSION = TLSVersion.TLSv1_2

# What listeners offer a TLS 1.2 client: ECDHE (or DHE) key exchange, so a key
# stolen later decrypts nothing recorded before, and AEAD ciphers (GCM,
# ChaCha20-Poly1305), no CBC with its padding oracles.  This is the Mozilla
# "intermediate" profile (v5.7); every TLS 1.2 client of the last decade has
# one of these.  The DHE suites are used only with DH parameters, which
# Twisted sets only when given some, so in practice the ECDHE ones.  TLS 1.3
# suites are all forward-secret AEAD and are not affected by this list.
SERVER_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"
    "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384:DHE-RSA-CHACHA20-POLY1305"
)


class TLSError(OptionError):
    """
    A TLS file the operator named cannot be used.

    C{key} is C{"certificate"}, C{"private_key"} or C{"ca_file"}: the
    configuration layer adds file and section, so the operator is pointed at the
    one line to fix.
    """


def _read(path: Path, key: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise TLSError(key, f"cannot read {what} {str(path)!r}: {e.strerror or e}")


def _loadCertificates(path: Path, key: str, what: str) -> list[x509.Certificate]:
    """
    Every certificate in a PEM file, in file order.

    Other PEM blocks (a private key in a combined file) are skipped, as OpenSSL
    tools do; a file with no certificate at all is an error, because an empty
    chain or trust store would only fail later, at the first handshake.
    """
    data = _read(path, key, what)
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        certificates = []
    if not certificates:
        raise TLSError(key, f"no PEM certificate found in {str(path)!r}")
    return certificates


def _loadPrivateKey(path: Path) -> PrivateKeyTypes:
    data = _read(path, "private_key", "private key")
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        # Raised for an encrypted key: nobody is there to type a passphrase.
        raise TLSError("private_key", f"{str(path)!r} is encrypted; relay needs an unencrypted key")
    except ValueError:
        raise TLSError("private_key", f"no PEM private key found in {str(path)!r}")
    except Exception as e:  # an unsupported key type
        raise TLSError("private_key", f"cannot load private key {str(path)!r}: {e}")


def _publicKey(thing: x509.Certificate | PrivateKeyTypes) -> bytes | None:
    """The SubjectPublicKeyInfo as DER, the one form every key type compares in."""
    try:
        return thing.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    except Exception:
        return None


def _warnAboutValidity(certificate: x509.Certificate, path: Path) -> None:
    """
    An out-of-date certificate is a warning, not a refusal to start.

    Most SMTP clients encrypt opportunistically without verifying, so a relay
    with an expired certificate still protects mail on the wire; refusing to
    start would turn a renewal oversight into an outage.
    """
    now = datetime.now(UTC)
    notAfter = certificate.not_valid_after_utc
    notBefore = certificate.not_valid_before_utc
    if notAfter < now:
        _log.warn(
            "TLS certificate {path} expired on {notAfter}; clients that verify will refuse it",
            path=str(path),
            notAfter=notAfter.isoformat(),
        )
    elif notBefore > now:
        _log.warn(
            "TLS certificate {path} is not valid before {notBefore}; clients that verify will refuse it",
            path=str(path),
            notBefore=notBefore.isoformat(),
        )


def serverOptions(certificate: Path, privateKey: Path) -> CertificateOptions:
    """
    The server side of STARTTLS and of implicit-TLS listeners.

    The certificate file holds the server's own certificate first, then the
    intermediates a client needs to reach its trust anchor (the order nginx and
    Postfix expect); the intermediates are sent with every handshake.  Clients
    are not asked for a certificate: SMTP clients authenticate with AUTH.

    TLS 1.2 is offered with L{SERVER_CIPHERS} only.  Outbound connections
    (L{clientOptions}) keep Twisted's wider list: a next hop that speaks only
    an older suite would otherwise get the mail in plaintext, which is worse.
    """
    chain = _loadCertificates(certificate, "certificate", "certificate")
    leaf, intermediates = chain[0], chain[1:]
    key = _loadPrivateKey(privateKey)

    keyPublic = _publicKey(key)
    if keyPublic != _publicKey(leaf):
        if any(keyPublic == _publicKey(other) for other in intermediates):
            raise TLSError(
                "certificate",
                f"the server's own certificate must come first in {str(certificate)!r}, before intermediates",
            )
        raise TLSError(
            "private_key",
            f"{str(privateKey)!r} is not the private key of the certificate in {str(certificate)!r}",
        )

    # Let OpenSSL itself accept the pair now, as it would at the first
    # handshake: it refuses what its security level forbids (a 1024-bit RSA
    # key, a SHA-1 signature) and that must stop start-up, not a connection.
    trial = SSL.Context(SSL.TLS_METHOD)
    try:
        try:
            trial.use_certificate(leaf)
            forms: tuple[object, object, list[object]] = (leaf, key, list(intermediates))
        except TypeError:
            # pyOpenSSL before 24.3 takes only its own X509 and PKey types
            # (24.3 and later deprecate them).
            forms = (
                crypto.X509.from_cryptography(leaf),
                crypto.PKey.from_cryptography_key(key),
                [crypto.X509.from_cryptography(each) for each in intermediates],
            )
            trial.use_certificate(forms[0])
    except SSL.Error as e:
        raise TLSError("certificate", f"OpenSSL refuses {str(certificate)!r}: {_describe(e)}")
    openSSLLeaf, openSSLKey, openSSLChain = forms
    try:
        trial.use_privatekey(openSSLKey)
        trial.check_privatekey()
    except SSL.Error as e:
        raise TLSError("private_key", f"OpenSSL refuses {str(privateKey)!r}: {_describe(e)}")

    _warnAboutValidity(leaf, certificate)
    return CertificateOptions(
        privateKey=openSSLKey,
        certificate=openSSLLeaf,
        extraCertChain=openSSLChain,
        raiseMinimumTo=MINIMUM_VERSION,
        acceptableCiphers=AcceptableCiphers.fromOpenSSLCipherString(SERVER_CIPHERS),
    )


def _describe(error: SSL.Error) -> str:
    """OpenSSL's error queue as one line (it arrives as a list of tuples)."""
    queue = error.args[0] if error.args else None
    if isinstance(queue, list):
        reasons = [str(entry[-1]) for entry in queue if isinstance(entry, tuple) and entry]
        if reasons:
            return "; ".join(reasons)
    return " ".join(str(error).split()) or type(error).__name__


def _serverName(hostname: str) -> str:
    """
    The name to send as SNI and to verify.

    Names from DNS (an MX target) may be absolute, with a trailing dot; neither
    SNI (RFC 6066) nor certificates carry it.
    """
    return hostname[:-1] if hostname.endswith(".") else hostname


@implementer(IOpenSSLClientConnectionCreator)
class _UnverifiedClientTLS:
    """
    Encryption without authentication, still naming the server.

    SNI is sent even though nothing is verified: a server hosting several
    domains picks the certificate by it, and some refuse a handshake without
    it.  Like Twisted's own ClientTLSOptions, an IP literal is not sent
    (RFC 6066 forbids it).
    """

    def __init__(self, options: CertificateOptions, hostname: str) -> None:
        self._options = options
        if isIPAddress(hostname) or isIPv6Address(hostname):
            self._serverName: bytes | None = None
        else:
            self._serverName = idna.encode(hostname)

    def clientConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        connection = self._options.clientConnectionForTLS(tlsProtocol)
        if self._serverName is not None:
            connection.set_tlsext_host_name(self._serverName)
        return connection


def clientOptions(hostname: str, verify: bool = True, caFile: Path | None = None) -> IOpenSSLClientConnectionCreator:
    """
    The client side of a delivery connection (smart host or MX).

    With C{verify}, the peer must present a certificate for C{hostname} that
    chains to C{caFile} (one or more PEM certificates) or, when it is C{None},
    to the system trust store.  Without it the connection is encrypted against
    passive eavesdroppers only, which is what opportunistic SMTP TLS is.
    """
    name = _serverName(hostname)
    if not verify:
        return _UnverifiedClientTLS(CertificateOptions(verify=False, raiseMinimumTo=MINIMUM_VERSION), name)
    if caFile is None:
        trustRoot = platformTrust()
    else:
        authorities = _loadCertificates(caFile, "ca_file", "CA file")
        try:
            trustRoot = trustRootFromCertificates(
                [Certificate(crypto.X509.from_cryptography(each)) for each in authorities]
            )
        except Exception as e:
            raise TLSError("ca_file", f"cannot use CA file {str(caFile)!r}: {e}")
    return optionsForClientTLS(
        name,
        trustRoot=trustRoot,
        extraCertificateOptions={"raiseMinimumTo": MINIMUM_VERSION},
    )


def wrapImplicit(
    factory: IProtocolFactory,
    options: CertificateOptions,
    clock: IReactorTime | None = None,
) -> TLSMemoryBIOFactory:
    """
    TLS from the first byte, for port-465 style listeners (RFC 8314).

    The wrapped factory's protocols see only plaintext, so the SMTP server is
    the same code for implicit TLS as for a cleartext port.  C{clock} is the
    reactor that batches small TLS writes; Twisted falls back to the global
    reactor without it, so callers that were given a reactor should pass it.
    """
    return TLSMemoryBIOFactory(options, False, factory, clock=clock)
