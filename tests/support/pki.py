"""Test certificates: trustme CAs and leaves written as PEM files, removed after the test."""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import tempfile
from collections.abc import Callable
from typing import Any

import attrs
import trustme
from cryptography import x509
from cryptography.x509.oid import NameOID


@attrs.frozen
class Issued:
    """A leaf certificate written to disk: `cert` holds the chain, `key` the key,
    `pem` both (for `key` defaulting to `cert`)."""

    cert: str
    key: str
    pem: str
    x509: x509.Certificate


class PKI:
    """trustme CAs and certificates, as PEM files in a directory removed after the test."""

    def __init__(self, test: Any) -> None:
        """`test` is a TestCase: the folder is removed when it ends."""
        self.dir = tempfile.mkdtemp(prefix="mailrelay-tls-")
        test.addCleanup(shutil.rmtree, self.dir, True)
        self.ca = trustme.CA(organization_name="mailrelay test CA")
        self.ca_file = self.write_ca(self.ca, "ca")

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def write_ca(self, ca: trustme.CA, name: str) -> str:
        path = self.path(f"{name}.pem")
        ca.cert_pem.write_to_path(path)
        return path

    def issue(self, name: str, *identities: str, ca: trustme.CA | None = None, common_name: str | None = None) -> Issued:
        leaf = (ca or self.ca).issue_cert(*identities, common_name=common_name)
        issued = Issued(self.path(f"{name}.crt"), self.path(f"{name}.key"), self.path(f"{name}.pem"), _leaf_of(leaf))
        for blob in leaf.cert_chain_pems:
            blob.write_to_path(issued.cert, append=True)
        leaf.private_key_pem.write_to_path(issued.key)
        leaf.private_key_and_cert_chain_pem.write_to_path(issued.pem)
        return issued


def server_context(issued: Issued) -> ssl.SSLContext:
    """A TLS server context (Python's defaults) with `issued`'s certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(issued.cert, issued.key)
    return context


def tls_server(issued: Issued, then: Callable[[ssl.SSLSocket], Any]) -> Callable[[socket.socket], Any]:
    """ThreadedServer handler: terminate TLS with `issued`, then run `then` on the TLS socket."""
    context = server_context(issued)

    def handle(conn: socket.socket) -> Any:
        with context.wrap_socket(conn, server_side=True) as tls:
            return then(tls)

    return handle


def client_context(ca: Any) -> ssl.SSLContext:
    """A client context trusting the test CA (a trustme CA)."""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def _leaf_of(leaf: trustme.LeafCert) -> x509.Certificate:
    return x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())


def dns_names(certificate: x509.Certificate) -> list[str]:
    san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.DNSName)


def common_name(certificate: x509.Certificate) -> str:
    [attribute] = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attribute.value)


def client_hello(server_name: str) -> bytes:
    """The ClientHello Python's ssl sends for `server_name`."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname=server_name)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()
