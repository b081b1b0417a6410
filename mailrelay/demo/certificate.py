"""
The demo's certificates: a throw-away CA and, signed by it, the certificate of
mailrelay's `tls` and `starttls` listeners, valid for `localhost` and 127.0.0.1.

A CA rather than one self-signed certificate so that the printed commands teach what a
real deployment does: the client verifies the server against a CA it trusts
(`curl --cacert ca.pem`), never `-k`.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["DemoCertificates", "write_certificates"]

VALIDITY = datetime.timedelta(days=90)
"""Past mailrelay's 14-day expiry warning, which a demo should not print."""


@attrs.frozen
class DemoCertificates:
    ca: Path
    """The CA certificate clients verify against (PEM)."""
    cert: Path
    """The listeners' certificate (PEM), for `[tls] cert`."""
    key: Path
    """Its private key (PEM, unencrypted, readable by the owner only), for `[tls] key`."""


def write_certificates(folder: Path, now: datetime.datetime | None = None) -> DemoCertificates:
    """Write `ca.pem`, `cert.pem` and `key.pem` into `folder`. The CA's key is never
    written: nothing else can be signed with it once this returns."""
    now = now or datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mailrelay demo CA")])
    ca = (
        _builder(now, ca_name, ca_name, ca_key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        _builder(now, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]), ca_name, key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    written = DemoCertificates(ca=folder / "ca.pem", cert=folder / "cert.pem", key=folder / "key.pem")
    written.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    written.cert.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    written.key.touch(mode=0o600)
    written.key.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return written


def _builder(
    now: datetime.datetime, subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # a client clock slightly behind
        .not_valid_after(now + VALIDITY)
    )


def _key_usage(ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )
