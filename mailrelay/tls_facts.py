"""
What a TLS handshake established, and why one failed, in the words a Router and an
administrator read.

`tls_facts()` reads a finished server-side handshake (the SNI name, version, cipher and
a verified client certificate) into `TLSFacts` for the `RouteRequest`;
`describe_tls_error()` turns the exception of a failed handshake, on either side, into
the short reason a session's log line and a refused route carry. Nothing here builds a
context or reads a file: the server side is `mailrelay.tls`, the client side
`mailrelay.tls_client`.
"""

from __future__ import annotations

import hashlib
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL

from .router import ClientCertificate


@attrs.frozen
class TLSFacts:
    """What a finished server-side handshake established."""

    sni: str | None
    """The server name the client asked for, lower-cased, without a trailing dot."""
    version: str
    cipher: str | None
    client_cert: ClientCertificate | None
    """Only a certificate that was verified against `[tls] client_ca`."""


class ALPNRefused(SSL.Error):
    """The client offered ALPN protocols, none of them ours (cross-protocol attack or a
    misdirected client). An `SSL.Error`, so the handshake fails like any other."""

    def __init__(self, message: str) -> None:
        # Shaped like OpenSSL's error queue, [(library, function, reason)], as Twisted's
        # TLS layer reads every SSL.Error: a bare string made it crash instead of
        # sending the client its no_application_protocol alert.
        super().__init__([("SSL routines", "", message)])
        self.message = message

    def __str__(self) -> str:
        return self.message


def client_certificate_of(certificate: x509.Certificate) -> ClientCertificate:
    """What a Router learns of a verified client certificate (as nginx tells auth_http)."""
    return ClientCertificate(
        subject=certificate.subject.rfc4514_string(),
        issuer=certificate.issuer.rfc4514_string(),
        serial=format(certificate.serial_number, "X"),
        fingerprint=hashlib.sha1(certificate.public_bytes(serialization.Encoding.DER)).hexdigest(),
    )


def tls_facts(transport: Any) -> TLSFacts:
    """What a finished server-side handshake on `transport` established."""
    connection: SSL.Connection = transport.getHandle()
    name = connection.get_servername()
    peer = connection.get_peer_certificate(as_cryptography=True)
    return TLSFacts(
        sni=name.decode("ascii", "replace").lower().rstrip(".") if name else None,
        version=connection.get_protocol_version_name(),
        cipher=connection.get_cipher_name(),
        client_cert=client_certificate_of(peer) if peer is not None else None,
    )


def ssl_reason(error: SSL.Error) -> str:
    """The last OpenSSL reason string of an SSL.Error ("certificate verify failed")."""
    details = error.args[0] if error.args else None
    if isinstance(details, list) and details and isinstance(details[-1], tuple):
        return str(details[-1][-1])
    return str(error) or type(error).__name__


def describe_tls_error(error: BaseException | None) -> str:
    """A short reason for a failed handshake, in an administrator's words."""
    from service_identity import VerificationError

    if isinstance(error, VerificationError):
        names = []
        for mismatch in error.errors:
            wanted = getattr(mismatch, "mismatched_id", None)
            value = getattr(wanted, "hostname", None) or getattr(wanted, "ip", None)
            names.append(value.decode("ascii", "replace") if isinstance(value, bytes) else str(value))
        return f"TLS: the upstream certificate is not valid for {', '.join(names) or 'the expected name'}"
    if isinstance(error, ALPNRefused):
        return f"TLS: {error}"
    if isinstance(error, SSL.Error):
        reason = ssl_reason(error)
        hint = _TLS_HINTS.get(reason.lower())
        return f"TLS: {reason} ({hint})" if hint else f"TLS: {reason}"
    return f"{type(error).__name__}: {error}"


_TLS_HINTS = {
    "wrong version number": "the peer did not speak TLS: plaintext on a TLS port, or STARTTLS where implicit TLS is expected",
    "http request": "the peer sent HTTP, not TLS",
    "unsupported protocol": "the TLS versions the peer offers are below min_version",
    "no shared cipher": "no cipher in common: check ciphers, and the certificate's key type",
    "peer did not return a certificate": 'client_cert = "required" and the client sent none',
    "tlsv1 alert unknown ca": "the peer does not trust the certificate it was shown: a private CA, or a file without its chain",
    "sslv3 alert certificate unknown": "the peer refused the certificate it was shown: wrong name, expired, or not trusted",
}
"""What a handshake failure's OpenSSL reason usually means, for the administrator
reading it: shown after the reason."""
