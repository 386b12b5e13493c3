"""Mutual TLS for the remote native door: the server context and who the peer is.

Both are pure functions of the ``remote`` config section, so the config
loader checks the files with the very code that serves them (a certificate
that does not match its key is a config error at load, with its key path),
and a reload builds a fresh context the same way.

The context is TLS 1.3 only and requires a client certificate signed by
``client_ca_file`` (and, with ``crl_file``, not revoked): everything else is
refused by OpenSSL inside the handshake. Session tickets are off, so every
connection is a full handshake whose client certificate is verified against
the CA and CRL loaded *now* (a resumed session would skip that after a
reload). Which verified certificates may actually use the daemon is the
allow-list, checked by ``peer_identity`` on the certificate OpenSSL verified,
right after the handshake and before any frame is read.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cruised.config import RemoteConfig

#: subjectAltName types that may name a client in ``remote.allowed_clients`` (getpeercert()'s spelling)
SAN_TYPES = ("DNS", "IP Address", "email", "URI")


class TlsSetupError(Exception):
    """A file of the ``remote`` section that OpenSSL refused; ``setting`` is the key to fix."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(f"{setting}: {message}")
        self.setting = setting
        self.message = message


def _reason(exc: ssl.SSLError) -> str:
    return exc.reason or exc.strerror or str(exc)


def server_context(cfg: RemoteConfig) -> ssl.SSLContext:
    """The remote door's TLS context, built from the files as they are now; TlsSetupError names a bad one."""
    assert cfg.cert_file and cfg.key_file and cfg.client_ca_file  # RemoteConfig.validate requires them with listen
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.options |= ssl.OP_NO_TICKET
    ctx.num_tickets = 0  # TLS 1.3: no resumption, every client certificate is verified in full
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        probe.load_verify_locations(cafile=cfg.cert_file)  # a cert file that parses as PEM certificates
    except (ssl.SSLError, OSError) as exc:
        reason = _reason(exc) if isinstance(exc, ssl.SSLError) else (exc.strerror or str(exc))
        raise TlsSetupError("cert_file", f"not a PEM certificate ({reason}): {cfg.cert_file}") from None
    try:
        ctx.load_cert_chain(cfg.cert_file, cfg.key_file)
    except ssl.SSLError as exc:
        raise TlsSetupError("key_file", f"cannot use it with cert_file ({_reason(exc)}): {cfg.key_file}") from None
    except OSError as exc:
        raise TlsSetupError("key_file", f"cannot read it ({exc.strerror or exc}): {cfg.key_file}") from None
    try:
        ctx.load_verify_locations(cafile=cfg.client_ca_file)
    except (ssl.SSLError, OSError) as exc:
        reason = _reason(exc) if isinstance(exc, ssl.SSLError) else (exc.strerror or str(exc))
        raise TlsSetupError("client_ca_file", f"not a PEM CA certificate ({reason}): {cfg.client_ca_file}") from None
    if cfg.crl_file:
        try:
            ctx.load_verify_locations(cafile=cfg.crl_file)
        except (ssl.SSLError, OSError) as exc:
            reason = _reason(exc) if isinstance(exc, ssl.SSLError) else (exc.strerror or str(exc))
            raise TlsSetupError("crl_file", f"not a PEM certificate revocation list ({reason}): {cfg.crl_file}") from None
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    return ctx


def subject_text(cert: dict[str, Any]) -> str:
    """``CN=alice,O=team`` for the log: the certificate's subject, RDNs in order."""
    parts = []
    for rdn in cert.get("subject", ()):
        for name, value in rdn:
            short = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU", "countryName": "C"}.get(name, name)
            parts.append(f"{short}={value}")
    return ",".join(parts) or "-"


def identities(cert: dict[str, Any]) -> list[str]:
    """The names a verified client certificate may be allowed under: its subject CN(s), then its SAN values."""
    names = [value for rdn in cert.get("subject", ()) for name, value in rdn if name == "commonName"]
    names.extend(value for kind, value in cert.get("subjectAltName", ()) if kind in SAN_TYPES)
    return names


def peer_identity(cert: dict[str, Any] | None, allowed: frozenset[str]) -> str | None:
    """The first of the certificate's identities in ``allowed`` (the caller's name), else None.

    ``cert`` is what ``getpeercert()`` returns after a handshake with
    CERT_REQUIRED, so it was verified against the CA (and CRL); empty or None
    (no certificate) is never allowed.
    """
    if not cert:
        return None
    for name in identities(cert):
        if name in allowed:
            return name
    return None
