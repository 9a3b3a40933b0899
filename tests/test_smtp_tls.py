"""
Real TLS handshakes between relay's contexts, in memory.

Both ends are L{TLSMemoryBIOFactory} wrappers joined by L{iosim}: OpenSSL does
every byte of the handshake, only the socket is simulated.
"""

# ruff: noqa: F811 -- the imported fixture `pki` is requested by parameters of the same name

from __future__ import annotations

import datetime
import socket
import ssl
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import trustme
from certs import PKI, pki  # noqa: F401 -- pki is a fixture, used by name
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IOpenSSLServerConnectionCreator
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import CertificateOptions
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.test import iosim
from zope.interface import implementer

from relay.errors import OptionError
from relay.smtp.tls import TLSError, clientOptions, serverOptions, wrapImplicit

HOST = "mx.example.test"
ADDRESS = IPv4Address("TCP", "127.0.0.1", 25)


class Recorder(Protocol):
    """Keeps what arrived and why the connection ended."""

    def __init__(self) -> None:
        self.received = b""
        self.lost: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost = reason


class Echo(Recorder):
    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        self.transport.write(data)


class Connection:
    """The two TLS ends of one in-memory connection."""

    def __init__(self, client: TLSMemoryBIOProtocol, server: TLSMemoryBIOProtocol, pump: iosim.IOPump) -> None:
        self.client = client
        self.server = server
        self.pump = pump
        # Kept here: the TLS wrapper forgets its wrapped protocol once the connection is lost.
        self.clientApp: Recorder = client.wrappedProtocol
        self.serverApp: Recorder = server.wrappedProtocol

    def exchange(self, data: bytes = b"EHLO client.example.test\r\n") -> bytes:
        """Send through the client, let the server echo it, return what came back."""
        self.client.write(data)
        self.pump.flush()
        return self.clientApp.received

    @property
    def version(self) -> str | None:
        return self.client.getHandle().get_protocol_version_name()


def connect(
    server: object,
    client: object,
    serverFactory: Callable[[Clock], TLSMemoryBIOFactory] | None = None,
) -> Connection:
    """
    Handshake C{client} (a client connection creator) against C{server} (a
    server one), or against the factory C{serverFactory} builds.
    """
    clock = Clock()
    if serverFactory is None:
        serverSide = TLSMemoryBIOFactory(server, False, Factory.forProtocol(Echo), clock=clock)
    else:
        serverSide = serverFactory(clock)
    clientSide = TLSMemoryBIOFactory(client, True, Factory.forProtocol(Recorder), clock=clock)
    clientProtocol, serverProtocol, pump = iosim.connectedServerAndClient(
        lambda: serverSide.buildProtocol(ADDRESS),
        lambda: clientSide.buildProtocol(ADDRESS),
        greet=False,
        clock=clock,
    )
    connection = Connection(clientProtocol, serverProtocol, pump)
    pump.flush()
    return connection


def assertSucceeds(connection: Connection) -> None:
    assert connection.exchange(b"EHLO a\r\n") == b"EHLO a\r\n"
    assert connection.serverApp.received == b"EHLO a\r\n"
    assert connection.clientApp.lost is None
    assert connection.serverApp.lost is None


def assertFails(connection: Connection) -> Failure:
    """The handshake failed on both ends and no application byte got through; the client's reason."""
    connection.client.write(b"secret")
    connection.pump.flush()
    assert connection.serverApp.received == b""
    assert connection.clientApp.received == b""
    assert connection.clientApp.lost is not None
    assert connection.serverApp.lost is not None
    return connection.clientApp.lost


# -- handshakes ---------------------------------------------------------------


def test_verified_handshake_succeeds_with_the_chain(pki: PKI) -> None:
    """The client trusts only the root; the server must send the intermediate for this to verify."""
    cert, key = pki.issue(HOST)
    connection = connect(serverOptions(cert, key), clientOptions(HOST, caFile=pki.ca_file))
    assertSucceeds(connection)
    assert connection.version in ("TLSv1.2", "TLSv1.3")
    assert connection.server.getHandle().get_servername() == HOST.encode()


def test_verified_handshake_accepts_an_absolute_hostname(pki: PKI) -> None:
    """MX targets from DNS end with a dot; the certificate names never do."""
    cert, key = pki.issue(HOST)
    connection = connect(serverOptions(cert, key), clientOptions(HOST + ".", caFile=pki.ca_file))
    assertSucceeds(connection)
    assert connection.server.getHandle().get_servername() == HOST.encode()


def test_verified_handshake_matches_a_wildcard(pki: PKI) -> None:
    cert, key = pki.issue("*.example.test")
    assertSucceeds(connect(serverOptions(cert, key), clientOptions(HOST, caFile=pki.ca_file)))


def test_hostname_mismatch_fails(pki: PKI) -> None:
    cert, key = pki.issue("other.example.test")
    reason = assertFails(connect(serverOptions(cert, key), clientOptions(HOST, caFile=pki.ca_file)))
    assert reason.check(VerificationError), reason


def test_self_signed_server_fails_verification(pki: PKI) -> None:
    cert, key = pki.selfSigned(HOST)
    reason = assertFails(connect(serverOptions(cert, key), clientOptions(HOST, caFile=pki.ca_file)))
    assert reason.check(SSL.Error), reason
    assert "certificate verify failed" in str(reason.value)


def test_platform_trust_does_not_trust_the_test_ca(pki: PKI) -> None:
    """Without ca_file the system store decides, and it has never heard of this CA."""
    cert, key = pki.issue(HOST)
    reason = assertFails(connect(serverOptions(cert, key), clientOptions(HOST)))
    assert reason.check(SSL.Error), reason


def test_unverified_accepts_self_signed_and_sends_sni(pki: PKI) -> None:
    cert, key = pki.selfSigned("somewhere.else.test")
    connection = connect(serverOptions(cert, key), clientOptions(HOST, verify=False))
    assertSucceeds(connection)
    assert connection.version in ("TLSv1.2", "TLSv1.3")
    assert connection.server.getHandle().get_servername() == HOST.encode()


def test_unverified_sends_sni_as_idna(pki: PKI) -> None:
    cert, key = pki.selfSigned(HOST)
    connection = connect(serverOptions(cert, key), clientOptions("mx.bücher.example.", verify=False))
    assertSucceeds(connection)
    assert connection.server.getHandle().get_servername() == b"mx.xn--bcher-kva.example"


def test_unverified_sends_no_sni_for_an_ip_literal(pki: PKI) -> None:
    """RFC 6066 forbids IP addresses in SNI."""
    cert, key = pki.selfSigned(HOST)
    connection = connect(serverOptions(cert, key), clientOptions("192.0.2.25", verify=False))
    assertSucceeds(connection)
    assert connection.server.getHandle().get_servername() is None


def test_unverified_creator_provides_the_interface() -> None:
    assert IOpenSSLClientConnectionCreator.providedBy(clientOptions(HOST, verify=False))
    assert IOpenSSLClientConnectionCreator.providedBy(clientOptions(HOST))


def test_wrap_implicit_end_to_end(pki: PKI) -> None:
    """TLS from the first byte: the wrapped protocol only ever sees plaintext."""
    cert, key = pki.issue(HOST)
    options = serverOptions(cert, key)
    connection = connect(
        None,
        clientOptions(HOST, caFile=pki.ca_file),
        serverFactory=lambda clock: wrapImplicit(Factory.forProtocol(Echo), options, clock=clock),
    )
    assert isinstance(connection.server, TLSMemoryBIOProtocol)
    assert isinstance(connection.serverApp, Echo)
    assertSucceeds(connection)


def test_wrap_implicit_refuses_plaintext(pki: PKI) -> None:
    """A client speaking cleartext SMTP to port 465 gets nothing to the application."""
    cert, key = pki.issue(HOST)
    clock = Clock()
    factory = wrapImplicit(Factory.forProtocol(Echo), serverOptions(cert, key), clock=clock)
    client, server, pump = iosim.connectedServerAndClient(
        lambda: factory.buildProtocol(ADDRESS), Recorder, greet=False, clock=clock
    )
    app = server.wrappedProtocol
    client.transport.write(b"EHLO client.example.test\r\n")
    pump.flush()
    assert app.received == b""
    assert app.lost is not None and app.lost.check(SSL.Error), app.lost
    assert client.lost is not None


def test_expired_certificate_is_served_with_a_warning(pki: PKI) -> None:
    now = datetime.datetime.now(datetime.UTC)
    cert, key = pki.issue(
        HOST, not_before=now - datetime.timedelta(days=30), not_after=now - datetime.timedelta(days=1)
    )
    with capturedLogs() as events:
        options = serverOptions(cert, key)
    warnings = [e for e in events if e.get("log_level") == LogLevel.warn]
    assert len(warnings) == 1
    assert "expired" in warnings[0]["log_format"]
    assert warnings[0]["path"] == str(cert)
    # Opportunistic clients still get encryption ...
    assertSucceeds(connect(options, clientOptions(HOST, verify=False)))
    # ... and verifying ones refuse, as they should.
    reason = assertFails(connect(options, clientOptions(HOST, caFile=pki.ca_file)))
    assert "certificate verify failed" in str(reason.value)


def test_valid_certificate_logs_no_warning(pki: PKI) -> None:
    cert, key = pki.issue(HOST)
    with capturedLogs() as events:
        serverOptions(cert, key)
    assert [e for e in events if e.get("log_level") == LogLevel.warn] == []


# -- protocol versions --------------------------------------------------------


def _legacyContext(maximum: int) -> SSL.Context:
    """
    A context allowing TLS 1.0 up to C{maximum}; security level 0, because
    modern OpenSSL defaults refuse the SHA-1 signatures TLS 1.1 needs.
    """
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(SSL.TLS1_VERSION)
    context.set_max_proto_version(maximum)
    context.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
    return context


@implementer(IOpenSSLClientConnectionCreator)
class LegacyClient:
    def __init__(self, maximum: int) -> None:
        self.context = _legacyContext(maximum)
        self.context.set_verify(SSL.VERIFY_NONE)

    def clientConnectionForTLS(self, protocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        return SSL.Connection(self.context, None)


@implementer(IOpenSSLServerConnectionCreator)
class LegacyServer:
    """A server that still accepts TLS 1.1: the control that shows our refusal is our own."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.context = _legacyContext(SSL.TLS1_3_VERSION)
        self.context.use_certificate_chain_file(str(cert))
        self.context.use_privatekey_file(str(key))

    def serverConnectionForTLS(self, protocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        return SSL.Connection(self.context, None)


def test_server_refuses_tls_1_1(pki: PKI) -> None:
    cert, key = pki.issue(HOST)
    try:
        legacy = LegacyClient(SSL.TLS1_1_VERSION)
    except SSL.Error as e:
        pytest.skip(f"this OpenSSL cannot make a TLS 1.1 client context: {e}")
    control = connect(LegacyServer(cert, key), legacy)
    if control.version != "TLSv1.1":
        pytest.skip("this OpenSSL cannot negotiate TLS 1.1 even with itself; nothing to refuse")
    assertSucceeds(control)

    connection = connect(serverOptions(cert, key), LegacyClient(SSL.TLS1_1_VERSION))
    reason = assertFails(connection)
    assert reason.check(SSL.Error), reason
    assert "protocol version" in str(reason.value)
    assert connection.serverApp.lost.check(SSL.Error)


def test_server_accepts_tls_1_2(pki: PKI) -> None:
    """The floor is 1.2, not 1.3: older MTAs that stop at 1.2 still get in."""
    cert, key = pki.issue(HOST)
    connection = connect(serverOptions(cert, key), LegacyClient(SSL.TLS1_2_VERSION))
    assertSucceeds(connection)
    assert connection.version == "TLSv1.2"


@pytest.mark.parametrize("verify", [True, False])
def test_client_refuses_a_tls_1_1_server(pki: PKI, verify: bool) -> None:
    cert, key = pki.issue(HOST)
    server = LegacyServer(cert, key)
    server.context.set_max_proto_version(SSL.TLS1_1_VERSION)
    reason = assertFails(connect(server, clientOptions(HOST, verify=verify, caFile=pki.ca_file)))
    assert reason.check(SSL.Error), reason
    assert "protocol version" in str(reason.value)


# -- serverOptions errors -----------------------------------------------------


def _assertTLSError(error: pytest.ExceptionInfo[TLSError], key: str, *words: str) -> None:
    assert isinstance(error.value, OptionError)
    assert error.value.key == key
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"{key}: ")
    for word in words:
        assert word in message


def test_missing_certificate_file(pki: PKI) -> None:
    _, key = pki.issue(HOST)
    missing = pki.directory / "nope.pem"
    with pytest.raises(TLSError) as error:
        serverOptions(missing, key)
    _assertTLSError(error, "certificate", str(missing))


def test_certificate_file_is_a_directory(pki: PKI) -> None:
    _, key = pki.issue(HOST)
    with pytest.raises(TLSError) as error:
        serverOptions(pki.directory, key)
    _assertTLSError(error, "certificate")


def test_garbage_certificate(pki: PKI) -> None:
    _, key = pki.issue(HOST)
    garbage = pki.directory / "garbage.pem"
    garbage.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n")
    with pytest.raises(TLSError) as error:
        serverOptions(garbage, key)
    _assertTLSError(error, "certificate", "no PEM certificate")


def test_certificate_file_holding_only_a_key(pki: PKI) -> None:
    _, key = pki.issue(HOST)
    with pytest.raises(TLSError) as error:
        serverOptions(key, key)
    _assertTLSError(error, "certificate", "no PEM certificate")


def test_combined_key_and_certificate_file_is_accepted(pki: PKI) -> None:
    """Many operators keep key and chain in one file and name it twice."""
    cert, key = pki.issue(HOST)
    combined = pki.directory / "combined.pem"
    combined.write_bytes(key.read_bytes() + cert.read_bytes())
    assertSucceeds(connect(serverOptions(combined, combined), clientOptions(HOST, caFile=pki.ca_file)))


def test_key_of_another_certificate(pki: PKI) -> None:
    cert, _ = pki.issue(HOST)
    _, otherKey = pki.issue(HOST, name="other")
    with pytest.raises(TLSError) as error:
        serverOptions(cert, otherKey)
    _assertTLSError(error, "private_key", "not the private key", str(otherKey))


def test_chain_in_the_wrong_order(pki: PKI) -> None:
    """Intermediate before leaf: the operator must fix the certificate file, not the key."""
    cert, key = pki.issue(HOST)
    leaf, intermediate = x509.load_pem_x509_certificates(cert.read_bytes())
    reordered = pki.directory / "reordered.pem"
    reordered.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (intermediate, leaf)))
    with pytest.raises(TLSError) as error:
        serverOptions(reordered, key)
    _assertTLSError(error, "certificate", "must come first")


def test_missing_key_file(pki: PKI) -> None:
    cert, _ = pki.issue(HOST)
    missing = pki.directory / "nokey.pem"
    with pytest.raises(TLSError) as error:
        serverOptions(cert, missing)
    _assertTLSError(error, "private_key", str(missing))


def test_garbage_key(pki: PKI) -> None:
    cert, _ = pki.issue(HOST)
    garbage = pki.directory / "garbage-key.pem"
    garbage.write_bytes(b"hello\n")
    with pytest.raises(TLSError) as error:
        serverOptions(cert, garbage)
    _assertTLSError(error, "private_key", "no PEM private key")


def test_key_file_holding_only_a_certificate(pki: PKI) -> None:
    cert, _ = pki.issue(HOST)
    with pytest.raises(TLSError) as error:
        serverOptions(cert, cert)
    _assertTLSError(error, "private_key", "no PEM private key")


def test_encrypted_key(pki: PKI) -> None:
    cert, key = pki.issue(HOST)
    loaded = serialization.load_pem_private_key(key.read_bytes(), None)
    encrypted = pki.directory / "encrypted-key.pem"
    encrypted.write_bytes(
        loaded.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    with pytest.raises(TLSError) as error:
        serverOptions(cert, encrypted)
    _assertTLSError(error, "private_key", "encrypted")


def test_certificate_openssl_refuses(pki: PKI) -> None:
    """
    A key too weak for OpenSSL's security level is refused at start-up, not at
    the first STARTTLS.
    """
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOST)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    trial = SSL.Context(SSL.TLS_METHOD)
    try:
        trial.use_certificate(certificate)
    except SSL.Error:
        pass
    else:
        pytest.skip("this OpenSSL's default security level accepts 1024-bit RSA")
    certPath = pki.directory / "weak-cert.pem"
    keyPath = pki.directory / "weak-key.pem"
    certPath.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    keyPath.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    with pytest.raises(TLSError) as error:
        serverOptions(certPath, keyPath)
    _assertTLSError(error, "certificate", "OpenSSL refuses")


# -- clientOptions errors -----------------------------------------------------


def test_garbage_ca_file(pki: PKI) -> None:
    garbage = pki.directory / "garbage-ca.pem"
    garbage.write_bytes(b"this is not a certificate\n")
    with pytest.raises(TLSError) as error:
        clientOptions(HOST, caFile=garbage)
    _assertTLSError(error, "ca_file", str(garbage))


def test_missing_ca_file(pki: PKI) -> None:
    missing = pki.directory / "no-ca.pem"
    with pytest.raises(TLSError) as error:
        clientOptions(HOST, caFile=missing)
    _assertTLSError(error, "ca_file", str(missing))


def test_ca_file_is_ignored_without_verification(pki: PKI) -> None:
    """verify = no means no trust store is consulted, so a stale ca_file cannot stop delivery."""
    cert, key = pki.selfSigned(HOST)
    missing = pki.directory / "no-ca.pem"
    assertSucceeds(connect(serverOptions(cert, key), clientOptions(HOST, verify=False, caFile=missing)))


def test_ca_file_with_several_authorities(pki: PKI) -> None:
    """A bundle: the server's CA may be any one of the certificates in it."""
    cert, key = pki.selfSigned(HOST)
    other = PKI(pki.directory / "other")
    bundle = pki.directory / "bundle.pem"
    bundle.write_bytes(pki.ca_file.read_bytes() + other.ca_file.read_bytes())
    otherCert, otherKey = other.issue(HOST)
    assertSucceeds(connect(serverOptions(otherCert, otherKey), clientOptions(HOST, caFile=bundle)))
    assertFails(connect(serverOptions(cert, key), clientOptions(HOST, caFile=bundle)))


# -- TLS 1.2 cipher suites, over a real socket on 127.0.0.1 --------------------


def _handshake(options: object, cipher: str | None, maximum: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2) -> str:
    """
    A Python C{ssl} client offering only C{cipher} (at security level 0, so
    that any refusal is the server's) against a pyOpenSSL server with the
    context of C{options}, across a real TCP connection; the suite agreed.

    @raise ssl.SSLError: the handshake failed.
    """
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            connection, _ = listener.accept()
            # Blocking (pyOpenSSL uses the descriptor itself); the client's timeout bounds it.
            connection.settimeout(None)
            server = SSL.Connection(options.getContext(), connection)  # type: ignore[attr-defined]
            server.set_accept_state()
            try:
                server.do_handshake()
                server.shutdown()
            except SSL.Error as e:
                errors.append(e)
            finally:
                connection.close()
        except BaseException as e:  # noqa: BLE001 -- reported by the test
            errors.append(e)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        context.maximum_version = maximum
        if cipher is not None:
            context.set_ciphers(f"{cipher}:@SECLEVEL=0")
        with socket.create_connection(listener.getsockname(), timeout=10) as raw:
            with context.wrap_socket(raw) as wrapped:
                agreed = wrapped.cipher()
                assert agreed is not None
                return agreed[0]
    finally:
        thread.join(10)
        listener.close()
        assert not thread.is_alive()


# Not forward-secret (RSA key exchange), or not AEAD (CBC with HMAC), or both.
LEGACY_SUITES = ["AES128-SHA", "AES256-GCM-SHA384", "ECDHE-ECDSA-AES128-SHA", "ECDHE-ECDSA-AES256-SHA384"]


@pytest.mark.parametrize("cipher", LEGACY_SUITES)
def test_server_refuses_tls_1_2_suites_without_forward_secrecy_or_aead(pki: PKI, cipher: str) -> None:
    cert, key = pki.issue(HOST)
    # The control: the same client and key get through with Twisted's own default list,
    # except for the RSA key exchange suites an ECDSA key cannot serve at all.
    options = serverOptions(cert, key)
    permissive = CertificateOptions(privateKey=options.privateKey, certificate=options.certificate)
    if cipher.startswith("ECDHE"):
        assert _handshake(permissive, cipher) == cipher
    with pytest.raises(ssl.SSLError):
        _handshake(serverOptions(cert, key), cipher)


@pytest.mark.parametrize("cipher", ["ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-CHACHA20-POLY1305"])
def test_server_accepts_forward_secret_aead_tls_1_2_suites(pki: PKI, cipher: str) -> None:
    cert, key = pki.issue(HOST)
    assert _handshake(serverOptions(cert, key), cipher) == cipher


def test_server_offers_tls_1_3_as_before(pki: PKI) -> None:
    cert, key = pki.issue(HOST)
    assert _handshake(serverOptions(cert, key), None, ssl.TLSVersion.TLSv1_3).startswith("TLS_")


def test_rsa_listener_offers_ecdhe_rsa_gcm_only(tmp_path: Path) -> None:
    ca = trustme.CA(key_type=trustme.KeyType.RSA)
    leaf = ca.issue_cert(HOST, key_type=trustme.KeyType.RSA)
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    assert _handshake(serverOptions(cert, key), "ECDHE-RSA-AES256-GCM-SHA384") == "ECDHE-RSA-AES256-GCM-SHA384"
    options = serverOptions(cert, key)
    permissive = CertificateOptions(privateKey=options.privateKey, certificate=options.certificate)
    for legacy in ("AES128-GCM-SHA256", "ECDHE-RSA-AES128-SHA"):
        assert _handshake(permissive, legacy) == legacy  # the control: refused below by our list alone
        with pytest.raises(ssl.SSLError):
            _handshake(serverOptions(cert, key), legacy)
