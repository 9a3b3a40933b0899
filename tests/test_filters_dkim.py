"""The dkim filter: its streaming body hash against dkimpy's, signatures dkimpy verifies, whom it signs, its keys."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import subprocess
import tracemalloc
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from dkim.canonicalization import Relaxed
from hypothesis import given, settings
from hypothesis import strategies as st
from smtphelpers import Session

from relay.errors import OptionError
from relay.filters import dkim as dkimfilter
from relay.filters.message import FilterMessage
from relay.filters.runner import FilterChain, FilterSpec
from relay.plugin import PluginContext

MESSAGE = (
    b"From: Ann <ann@example.org>\r\n"
    b"To: bob@example.net\r\n"
    b"Subject: a  test \r\n"
    b"Date: Tue, 1 Apr 2025 10:00:00 +0000\r\n"
    b"Message-ID: <1@example.org>\r\n"
    b"\r\n"
    b"Hello  Bob, \t\r\n"
    b"\r\n"
    b"bye\r\n"
    b"\r\n\r\n"
)


def rsaKey(tmp_path: Path, bits: int = 2048, name: str = "rsa.pem", pkcs8: bool = False) -> tuple[Path, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    fmt = serialization.PrivateFormat.PKCS8 if pkcs8 else serialization.PrivateFormat.TraditionalOpenSSL
    path = tmp_path / name
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption()))
    public = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return path, b"v=DKIM1; k=rsa; p=" + base64.b64encode(public)


def edKey(tmp_path: Path, name: str = "ed.pem") -> tuple[Path, bytes]:
    key = ed25519.Ed25519PrivateKey.generate()
    path = tmp_path / name
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return path, b"v=DKIM1; k=ed25519; p=" + base64.b64encode(public)


def context(tmp: Path) -> PluginContext:
    return PluginContext(reactor=None, hostname="mx.example.org", postmaster="postmaster@example.org", state_dir=tmp)


def signer(tmp_path: Path, key: Path, **options: str) -> dkimfilter.DKIMSigner:
    s = dkimfilter.build(
        {"domain": "example.org", "selector": "sel", "private_key": str(key), **options}, context(tmp_path)
    )
    s.blocking = None  # sign inline in unit tests
    return s


def zone(records: dict[bytes, bytes]):
    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        return records.get(name.rstrip(b"."))

    return dnsfunc


def message(data: bytes, authenticated: str | None = None, relay: bool = True) -> FilterMessage:
    return FilterMessage(
        queue_id="q1",
        sender="ann@example.org",
        recipients=("bob@example.net",),
        client_address="127.0.0.1",
        client_port=1,
        helo="client",
        authenticated=authenticated,
        tls=False,
        tls_version=None,
        tls_cipher=None,
        size=len(data),
        receivedHeader="Received: from client",
        opener=lambda: io.BytesIO(data),
        relay_client=relay,
    )


def signed(verdict, data: bytes) -> bytes:
    [(name, value)] = verdict.addHeaders
    assert name == "DKIM-Signature"
    return f"{name}: {value}\r\n".encode() + data


# -- the body hash -------------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(
    body=st.lists(
        st.sampled_from([b"a", b"bc", b" ", b"\t", b"\r\n", b"\r", b"\n", b"\r\n\r\n", b" \r\n"]), max_size=40
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=6),
)
def test_streaming_relaxed_body_hash_is_dkimpys(body, cuts):
    data = b"".join(body)
    expected = hashlib.sha256(Relaxed.canonicalize_body(data)).digest()
    h = dkimfilter.RelaxedBodyHash()
    last = 0
    for cut in sorted(c for c in cuts if c <= len(data)):
        h.update(data[last:cut])
        last = cut
    h.update(data[last:])
    assert h.digest() == expected


def test_header_block_split():
    assert dkimfilter.readHeaderBlock(io.BytesIO(b"A: b\r\n\r\nbody")) == (b"A: b\r\n\r\n", b"body")
    assert dkimfilter.readHeaderBlock(io.BytesIO(b"\r\nbody")) == (b"\r\n", b"body")
    assert dkimfilter.readHeaderBlock(io.BytesIO(b"A: b\r\n")) == (b"A: b\r\n", b"")
    assert dkimfilter.readHeaderBlock(io.BytesIO(b"A: " + b"x" * 100 + b"\r\n"), limit=50) is None


# -- signatures ----------------------------------------------------------


@pytest.mark.parametrize("kind", ["rsa", "rsa-pkcs8", "ed25519"])
def test_signature_verifies_with_dkimpy(tmp_path, kind):
    key, record = edKey(tmp_path) if kind == "ed25519" else rsaKey(tmp_path, pkcs8=kind == "rsa-pkcs8")
    verdict = signer(tmp_path, key).check(message(MESSAGE))
    assert verdict.reason == "dkim=signed d=example.org s=sel"
    out = signed(verdict, MESSAGE)
    dns = zone({b"sel._domainkey.example.org": record})
    assert dkim.verify(out, dnsfunc=dns)
    value = verdict.addHeaders[0][1]
    assert "c=relaxed/relaxed" in value
    assert ("a=ed25519-sha256" if kind == "ed25519" else "a=rsa-sha256") in value
    # Changing the body, a signed header, or adding a second From breaks it.
    assert not dkim.verify(out.replace(b"bye", b"BYE"), dnsfunc=dns)
    assert not dkim.verify(out.replace(b"a  test", b"another test"), dnsfunc=dns)
    assert not dkim.verify(out.replace(b"To: bob", b"From: mallory@evil.example\r\nTo: bob"), dnsfunc=dns)
    # Relaxed: whitespace changes and a folded header still verify.
    assert dkim.verify(out.replace(b"Hello  Bob,", b"Hello Bob,").replace(b"a  test ", b"a\r\n test"), dnsfunc=dns)


def test_headers_signed_by_default_and_from_oversigned(tmp_path):
    key, _ = rsaKey(tmp_path)
    value = signer(tmp_path, key).check(message(MESSAGE)).addHeaders[0][1]
    h = dkim.util.parse_tag_value(value.encode())[b"h"]
    assert [x.strip() for x in h.split(b":")] == [b"from", b"to", b"subject", b"date", b"message-id", b"from"]
    value = signer(tmp_path, key, headers="from subject").check(message(MESSAGE)).addHeaders[0][1]
    assert [x.strip() for x in dkim.util.parse_tag_value(value.encode())[b"h"].split(b":")] == [
        b"from",
        b"subject",
        b"from",
    ]


def test_whom_it_signs(tmp_path):
    key, _ = rsaKey(tmp_path)
    default = signer(tmp_path, key)
    assert default.check(message(MESSAGE, relay=True)).addHeaders
    assert default.check(message(MESSAGE, authenticated="ann", relay=False)).addHeaders
    outside = default.check(message(MESSAGE, relay=False))
    assert not outside.addHeaders and outside.reason == "dkim=none d=example.org (not a signing client)"
    assert signer(tmp_path, key, sign="all").check(message(MESSAGE, relay=False)).addHeaders
    assert not signer(tmp_path, key, sign="authenticated").check(message(MESSAGE, relay=True)).addHeaders
    # The From domain: the domain itself or a sub-domain, not another domain, not two authors.
    sub = MESSAGE.replace(b"ann@example.org", b"ann@mail.Example.ORG")
    assert default.check(message(sub)).addHeaders
    for other in (b"ann@example.org.evil.example", b"ann@notexample.org", b"a@example.org, b@example.org"):
        verdict = default.check(message(MESSAGE.replace(b"ann@example.org", other)))
        assert not verdict.addHeaders, other
    assert not default.check(message(b"Subject: no from\r\n\r\nx\r\n")).addHeaders


def test_large_message_signed_in_bounded_memory(tmp_path):
    key, record = rsaKey(tmp_path)
    path = tmp_path / "big.eml"
    line = b"0123456789 " * 7 + b"\r\n"
    with open(path, "wb") as f:
        f.write(MESSAGE.partition(b"\r\n\r\n")[0] + b"\r\n\r\n")
        for _ in range(35 * 1024 * 1024 // len(line)):
            f.write(line)
    m = message(b"")
    m = FilterMessage(**{**m.__dict__, "opener": lambda: open(path, "rb"), "_cache": {}})
    s = signer(tmp_path, key)
    tracemalloc.start()
    try:
        verdict = s.check(m)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    print(f"\ndkim: signing a {os.path.getsize(path) / 2**20:.1f} MiB message allocated {peak / 2**20:.2f} MiB at peak")
    assert peak < 8 * 2**20
    out = signed(verdict, path.read_bytes())
    assert dkim.verify(out, dnsfunc=zone({b"sel._domainkey.example.org": record}))


def test_signed_through_the_server(tmp_path):
    key, record = edKey(tmp_path)
    chain = FilterChain([FilterSpec("dkim", signer(tmp_path, key))], None, tmp_path, "mx.example.org")
    s = Session(client="127.0.0.1", filters=chain)
    chain.clock = s.clock
    s.ready()
    s.send(b"MAIL FROM:<ann@example.org>\r\nRCPT TO:<x@localhost>\r\nDATA\r\n")
    assert s.codes(MESSAGE.replace(b"\r\n.", b"\r\n..") + b".\r\n") == ["250 2.0.0"]
    [envelope] = s.accepted
    data = s.store.messages[envelope.queue_id][1]
    assert data.startswith(b"Received: ")
    assert dkim.verify(data, dnsfunc=zone({b"sel._domainkey.example.org": record}))


# -- options -------------------------------------------------------------


def test_bad_options_name_their_key(tmp_path):
    key, _ = rsaKey(tmp_path)
    small = tmp_path / "small.pem"  # cryptography makes no key this short: openssl does
    subprocess.run(["openssl", "genrsa", "-out", str(small), "512"], check=True, capture_output=True)
    (tmp_path / "junk.pem").write_bytes(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    good = {"domain": "example.org", "selector": "sel", "private_key": str(key)}
    cases = [
        ({"domain": ""}, "domain"),
        ({"domain": "a@b.org"}, "domain"),
        ({"selector": ""}, "selector"),
        ({"selector": "bad selector"}, "selector"),
        ({"private_key": ""}, "private_key"),
        ({"private_key": str(tmp_path / "missing.pem")}, "private_key"),
        ({"private_key": str(tmp_path / "junk.pem")}, "private_key"),
        ({"private_key": str(small)}, "private_key"),
        ({"headers": "subject to"}, "headers"),
        ({"sign": "everyone"}, "sign"),
    ]
    for change, keyName in cases:
        with pytest.raises(OptionError) as e:
            dkimfilter.build({**good, **change}, context(tmp_path))
        assert e.value.key == keyName, change
    # A relative key path is under state_dir; a dknewkey-style base64 Ed25519 seed works too.
    (tmp_path / "seed.key").write_bytes(base64.b64encode(os.urandom(32)) + b"\n")
    assert dkimfilter.build({**good, "private_key": "seed.key"}, context(tmp_path)).algorithm == b"ed25519-sha256"
