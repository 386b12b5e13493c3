"""Certificates for the remote (mutual TLS) door's tests, minted in memory with trustme.

``Pki(dir)`` makes a CA, a server certificate for the loopback addresses the
tests listen on, and client certificates on demand (``client("alice")``), each
written as PEM files; ``revoke`` writes a CRL (built with cryptography,
trustme's own dependency). ``remote_section`` is the daemon's ``remote``
config for them. docs/scaling.md has the openssl recipe for production.
"""

from __future__ import annotations

import datetime
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trustme

#: every address the tests' daemons and HAProxy listen on (Linux routes all of 127/8 to lo)
SERVER_NAMES = ("127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4", "localhost")


@dataclass(frozen=True)
class ClientCert:
    cert_file: str
    key_file: str
    serial: int

    def tls(self, ca_file: str, server_hostname: str | None = None) -> Any:
        import cruised

        return cruised.TLS(cert_file=self.cert_file, key_file=self.key_file, ca_file=ca_file, server_hostname=server_hostname)


class Pki:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ca = trustme.CA(organization_name="cruised tests")
        self.ca_file = str(self.dir / "ca.pem")
        self.ca.cert_pem.write_to_path(self.ca_file)
        self.server_cert_file = str(self.dir / "server.pem")
        self.server_key_file = str(self.dir / "server.key")
        self.issue_server()
        self.crl_file = str(self.dir / "crl.pem")
        self.revoked: list[int] = []
        self.write_crl()

    def issue_server(self, organization: str = "cruised daemon") -> int:
        """(Re)write the server certificate and key files; returns the new certificate's serial."""
        leaf = self.ca.issue_cert(*SERVER_NAMES, common_name="cruised-daemon", organization_name=organization)
        leaf.private_key_pem.write_to_path(self.server_key_file)
        with open(self.server_cert_file, "wb") as fh:
            for pem in leaf.cert_chain_pems:
                fh.write(pem.bytes())
        return _serial(leaf.cert_chain_pems[0].bytes())

    def client(self, name: str, ca: trustme.CA | None = None, expired: bool = False, san: str | None = None) -> ClientCert:
        """A client certificate with CN ``name`` (and ``san``, a DNS name or e-mail address) signed by ``ca`` (default: this CA)."""
        ca = ca or self.ca
        kw: dict[str, Any] = {}
        if expired:
            now = datetime.datetime.now(datetime.timezone.utc)
            kw = {"not_before": now - datetime.timedelta(days=30), "not_after": now - datetime.timedelta(days=1)}
        identities = [san] if san else [f"{name}.clients.invalid"]
        leaf = ca.issue_cert(*identities, common_name=name, **kw)
        stem = f"{name}{'-expired' if expired else ''}{'-other' if ca is not self.ca else ''}"
        cert_file, key_file = str(self.dir / f"{stem}.pem"), str(self.dir / f"{stem}.key")
        leaf.private_key_pem.write_to_path(key_file)
        with open(cert_file, "wb") as fh:
            for pem in leaf.cert_chain_pems:
                fh.write(pem.bytes())
        return ClientCert(cert_file, key_file, _serial(leaf.cert_chain_pems[0].bytes()))

    def revoke(self, cert: ClientCert) -> None:
        self.revoked.append(cert.serial)
        self.write_crl()

    def write_crl(self) -> None:
        """The CA's CRL listing ``revoked`` (empty is valid: OpenSSL then knows nothing is revoked)."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization

        key = serialization.load_pem_private_key(self.ca.private_key_pem.bytes(), password=None)
        ca_cert = x509.load_pem_x509_certificate(self.ca.cert_pem.bytes())
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(ca_cert.subject)
            .last_update(now - datetime.timedelta(minutes=5))
            .next_update(now + datetime.timedelta(days=1))
        )
        for serial in self.revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now - datetime.timedelta(minutes=1)).build()
            )
        crl = builder.sign(key, hashes.SHA256())  # type: ignore[arg-type]  # trustme's CA key: EC or RSA, both sign CRLs
        Path(self.crl_file).write_bytes(crl.public_bytes(serialization.Encoding.PEM))

    def remote_section(self, listen: str, allowed: list[str], crl: bool = False) -> dict[str, Any]:
        section: dict[str, Any] = {
            "listen": listen,
            "cert_file": self.server_cert_file,
            "key_file": self.server_key_file,
            "client_ca_file": self.ca_file,
            "allowed_clients": allowed,
        }
        if crl:
            section["crl_file"] = self.crl_file
        return section

    def raw_context(self, client: ClientCert | None, maximum: ssl.TLSVersion | None = None) -> ssl.SSLContext:
        """A plain ``ssl`` client context (for what cruised's own client refuses to do: no certificate, TLS 1.2)."""
        ctx = ssl.create_default_context(cafile=self.ca_file)
        if maximum is not None:
            ctx.maximum_version = maximum
        if client is not None:
            ctx.load_cert_chain(client.cert_file, client.key_file)
        return ctx


def _serial(pem: bytes) -> int:
    from cryptography import x509

    return int(x509.load_pem_x509_certificate(pem).serial_number)
