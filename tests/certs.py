"""
A throw-away PKI for tests: a root CA, an intermediate, and leaf certificates.

Leaves are issued by an intermediate, not the root, so that every test that
verifies a server also proves the server sends its chain: the client trusts
only C{ca.pem}.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
import trustme


class PKI:
    """Certificates written as PEM files, the form an operator configures."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.ca = trustme.CA()
        self._issuer = self.ca.create_child_ca()
        self.ca_file = self.directory / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))

    def issue(
        self,
        *hostnames: str,
        name: str = "server",
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
    ) -> tuple[Path, Path]:
        """A leaf for C{hostnames}; the certificate file holds leaf then intermediate."""
        leaf = self._issuer.issue_cert(*hostnames, not_before=not_before, not_after=not_after)
        return self._write(name, leaf, chain=True)

    def selfSigned(self, hostname: str, name: str = "selfsigned") -> tuple[Path, Path]:
        """A leaf from an unrelated CA, shipped without its chain: nothing here trusts it."""
        return self._write(name, trustme.CA().issue_cert(hostname), chain=False)

    def _write(self, name: str, leaf: trustme.LeafCert, chain: bool) -> tuple[Path, Path]:
        cert = self.directory / f"{name}-cert.pem"
        key = self.directory / f"{name}-key.pem"
        pems = leaf.cert_chain_pems if chain else leaf.cert_chain_pems[:1]
        cert.write_bytes(b"".join(pem.bytes() for pem in pems))
        leaf.private_key_pem.write_to_path(str(key))
        return cert, key


@pytest.fixture
def pki(tmp_path: Path) -> PKI:
    return PKI(tmp_path)
