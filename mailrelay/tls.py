"""
TLS towards clients: the certificates mailrelay serves and the policy it enforces, for
every `tls` and `starttls` listener.

`ServerTLS` holds one default certificate and any number of SNI certificates, each
read from PEM files into its own `SSL.Context`. A client's SNI name picks a context
during the handshake (exact name first, then a `*.` wildcard one label deep, then the
default). Every context refuses TLS below the configured minimum (1.2
by default), compression and renegotiation; when a listener speaks a known protocol,
its ALPN name is required of clients that send ALPN at all (the ALPACA defence).
Every context releases a connection's buffers while they are empty
(`mailrelay.tls_layer.release_buffers`), so an idle session holds about 34 KiB less.

`reload()` reads every file again and swaps the whole set at once; a connection keeps
the contexts it started with, so a running session never sees the change, and a set
that fails to load leaves the old one serving. OpenSSL contexts cannot be changed once
used, which is why a reload builds new ones instead of editing.

Upstream TLS is `mailrelay.tls_client`; what a finished (or failed) handshake tells a
Router and the log is `mailrelay.tls_facts`.
"""

from __future__ import annotations

import datetime
import errno
import hashlib
import socket
from collections.abc import Sequence
from functools import cache
from typing import Any

import attrs
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from zope.interface import implementer

from .interfaces import IReloadable
from .tls_facts import ALPNRefused, ssl_reason
from .tls_layer import release_buffers

MIN_VERSIONS = {
    "1.0": SSL.TLS1_VERSION,
    "1.1": SSL.TLS1_1_VERSION,
    "1.2": SSL.TLS1_2_VERSION,
    "1.3": SSL.TLS1_3_VERSION,
}

# Mozilla's "intermediate" TLS 1.2 suites: forward secret AEAD only. TLS 1.3 suites
# are OpenSSL's own, which are all fine.
MODERN_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
        "DHE-RSA-AES128-GCM-SHA256",
        "DHE-RSA-AES256-GCM-SHA384",
        "DHE-RSA-CHACHA20-POLY1305",
    ]
)
# For `min_version` below 1.2 (old scanners, printers, phones): those clients know
# only CBC suites signed with SHA-1, which OpenSSL 3 allows only at security level 0.
LEGACY_CIPHERS = "HIGH:!aNULL:!eNULL:!MD5:!RC4:!3DES:@SECLEVEL=0"

_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
_SERVER_OPTIONS = SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION | SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_NO_TICKET


class TLSSetupError(Exception):
    """A certificate, key or CA file cannot be used; the message names the file and why."""


@attrs.frozen
class CertificateFiles:
    """Where one certificate lives, as configured."""

    cert: str
    """PEM file: the certificate first, then its chain (a `fullchain.pem`)."""
    key: str
    """PEM file with the unencrypted private key (may be the same file as `cert`)."""
    names: tuple[str, ...] = ()
    """SNI names it serves (`mail.example.org`, `*.example.org`); empty: the names in
    the certificate itself."""
    where: str = "tls"
    """Its key path in the configuration, for messages."""


@attrs.frozen
class ServerTLSConfig:
    """`[tls]`: the certificates and policy of every `tls` and `starttls` listener."""

    default: CertificateFiles | None
    """None: a self-signed certificate is generated (and a warning logged)."""
    sni: tuple[CertificateFiles, ...] = ()
    min_version: str = "1.2"
    ciphers: str | None = None
    """OpenSSL cipher string for TLS 1.2 and below; None picks one for `min_version`."""
    client_ca: str | None = None
    """Ask clients for a certificate and verify it against this CA file."""
    client_cert: str = "optional"
    """`optional` or `required` (only with `client_ca`)."""


@attrs.frozen
class LoadedCertificate:
    chain: tuple[x509.Certificate, ...]
    key: Any
    names: tuple[str, ...]
    where: str

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    def describe(self) -> str:
        until = self.leaf.not_valid_after_utc.strftime("%Y-%m-%d")
        return f"{', '.join(self.names) or self.leaf.subject.rfc4514_string()} (until {until})"


def read_pem_file(path: str, what: str, where: str) -> bytes:
    """The bytes of `path`; TLSSetupError naming `where` (a configuration key) if unreadable."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        hint = " (it is read by the user mailrelay starts as, and again on reload: let that user read it)"
        raise TLSSetupError(
            f"{where}: cannot read {what} {path}: {e.strerror or e}" + (hint if e.errno == errno.EACCES else "")
        ) from None


def _first_sentence(error: Exception) -> str:
    """The first sentence of a cryptography error (the rest is a link to its FAQ)."""
    return str(error).split(". ", 1)[0].rstrip(".") or type(error).__name__


def certificate_names(certificate: x509.Certificate) -> tuple[str, ...]:
    """The DNS names a certificate is valid for (its subjectAltName), lower-cased."""
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    return tuple(name.lower() for name in san.get_values_for_type(x509.DNSName))


def load_certificate(files: CertificateFiles) -> LoadedCertificate:
    """Read and check one certificate, chain and key; raise TLSSetupError if unusable."""
    cert_pem = read_pem_file(files.cert, "certificate", files.where + ".cert")
    try:
        chain = tuple(x509.load_pem_x509_certificates(cert_pem))
    except ValueError:
        raise TLSSetupError(
            f"{files.where}.cert: {files.cert} holds no PEM certificate: expected the certificate, then its chain,"
            " as PEM text (-----BEGIN CERTIFICATE-----), such as a fullchain.pem"
        ) from None
    key_pem = cert_pem if files.key == files.cert else read_pem_file(files.key, "key", files.where + ".key")
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise TLSSetupError(f"{files.where}.key: the key in {files.key} is encrypted: mailrelay needs it unencrypted") from None
    except (ValueError, UnsupportedAlgorithm) as e:
        raise TLSSetupError(
            f"{files.where}.key: {files.key} holds no usable PEM private key: expected an unencrypted key as PEM text"
            f" (-----BEGIN PRIVATE KEY-----), such as a privkey.pem ({_first_sentence(e)})"
        ) from None
    if key.public_key().public_bytes(*_SPKI) != chain[0].public_key().public_bytes(*_SPKI):
        raise TLSSetupError(f"{files.where}.key: the key in {files.key} does not belong to the certificate in {files.cert}")
    names = files.names or certificate_names(chain[0])
    return LoadedCertificate(chain, key, tuple(n.lower().rstrip(".") for n in names), files.where)


@cache
def self_signed_certificate(name: str | None = None) -> LoadedCertificate:
    """
    A certificate for this machine's name (and localhost) made up on the spot, for a
    configuration without `[tls]`. Clients will not trust it: it exists so that a test
    set-up works, and the service warns about it. Made once per process.
    """
    name = name or socket.gethostname() or "localhost"
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    names = [name] if name == "localhost" else [name, "localhost"]
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return LoadedCertificate((certificate,), key, tuple(names), "self-signed")


def _alpn_selector(protocol: bytes) -> Any:
    def select(connection: SSL.Connection, offered: list[bytes]) -> bytes:
        if protocol in offered:
            return protocol
        raise ALPNRefused(f"client offered ALPN {b', '.join(offered).decode('latin-1')!s}, not {protocol.decode()}")

    return select


@attrs.frozen
class _Contexts:
    """One generation of server contexts: built together, replaced together."""

    default: SSL.Context
    exact: dict[str, SSL.Context]
    wildcard: dict[str, SSL.Context]
    """Keyed by the part after `*.`."""

    def for_name(self, name: str) -> SSL.Context | None:
        context = self.exact.get(name)
        if context is None and "." in name:
            context = self.wildcard.get(name.split(".", 1)[1])
        return context


@implementer(IOpenSSLServerConnectionCreator)
class _ListenerTLS:
    """The connection creator of one ALPN protocol (or none), over a shared ServerTLS."""

    def __init__(self, server_tls: ServerTLS, alpn: str | None) -> None:
        self.server_tls = server_tls
        self.alpn = alpn

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        return SSL.Connection(self.server_tls.contexts_for(self.alpn).default, None)


@implementer(IReloadable)
class ServerTLS:
    """
    The certificates mailrelay serves, reloadable; `creator(alpn)` gives what Twisted's
    TLS layer (`TLSMemoryBIOFactory`, `startTLS`) needs for a listener.
    """

    log = Logger()

    def __init__(self, config: ServerTLSConfig) -> None:
        """Load everything now; raise TLSSetupError naming the file if anything is unusable."""
        self.config = config
        self._alpns: set[str | None] = {None}
        self._certificates, self._client_cas = self._load()
        self._contexts: dict[str | None, _Contexts] = {}
        self.contexts_for(None)  # an unusable policy (`ciphers`) is found now, not at the first client

    @property
    def self_signed(self) -> bool:
        return self.config.default is None

    def describe(self) -> str:
        default, *sni = self._certificates
        text = f"certificate {default.describe()}"
        if sni:
            text += "; by SNI: " + "; ".join(c.describe() for c in sni)
        return text

    def creator(self, alpn: str | None) -> IOpenSSLServerConnectionCreator:
        """For a listener of protocol `alpn` (`smtp`, `imap`, `pop3`), or None for no ALPN."""
        self._alpns.add(alpn)
        return _ListenerTLS(self, alpn)

    def contexts_for(self, alpn: str | None) -> _Contexts:
        contexts = self._contexts.get(alpn)
        if contexts is None:
            contexts = self._contexts[alpn] = self._build(self._certificates, self._client_cas, alpn)
        return contexts

    def reload(self) -> Deferred[None] | None:
        """Read every file again; on any problem keep serving the old set and log why."""
        if self.self_signed:
            return None
        try:
            certificates, client_cas = self._load()
            contexts = {alpn: self._build(certificates, client_cas, alpn) for alpn in self._alpns}
        except TLSSetupError as e:
            self.log.error("TLS reload failed, keeping the previous certificates: {why}", why=str(e))
            return None
        self._certificates, self._client_cas, self._contexts = certificates, client_cas, contexts
        self.log.info("TLS reloaded: {what}", what=self.describe())
        self.warn_expiry()
        return None

    def warn_expiry(self) -> None:
        now = datetime.datetime.now(datetime.UTC)
        for certificate in self._certificates:
            left = certificate.leaf.not_valid_after_utc - now
            if left < datetime.timedelta(days=14):
                state = "expired" if left.total_seconds() < 0 else f"expires in {left.days} day(s)"
                self.log.warn(
                    "TLS certificate {what} {state}: renew it, then reload mailrelay (SIGHUP) to serve the new one",
                    what=certificate.describe(),
                    state=state,
                )

    def _load(self) -> tuple[list[LoadedCertificate], list[x509.Certificate]]:
        config = self.config
        default = load_certificate(config.default) if config.default else self_signed_certificate()
        certificates = [default] + [load_certificate(files) for files in config.sni]
        for certificate in certificates[1:]:
            if not certificate.names:
                raise TLSSetupError(f"{certificate.where}: the certificate names no DNS name; set names = [...]")
        client_cas: list[x509.Certificate] = []
        if config.client_ca is not None:
            pem = read_pem_file(config.client_ca, "CA file", "tls.client_ca")
            try:
                client_cas = x509.load_pem_x509_certificates(pem)
            except ValueError:
                raise TLSSetupError(
                    f"tls.client_ca: {config.client_ca} holds no PEM certificate: expected the CA certificates"
                    " that sign client certificates, as PEM text (-----BEGIN CERTIFICATE-----)"
                ) from None
        return certificates, client_cas

    def _build(
        self, certificates: Sequence[LoadedCertificate], client_cas: Sequence[x509.Certificate], alpn: str | None
    ) -> _Contexts:
        contexts = [self._context(c, client_cas, alpn) for c in certificates]
        exact: dict[str, SSL.Context] = {}
        wildcard: dict[str, SSL.Context] = {}
        # Later SNI entries do not override earlier ones: first match wins, as in the file.
        for certificate, context in zip(certificates[1:], contexts[1:], strict=True):
            for name in certificate.names:
                if name.startswith("*."):
                    wildcard.setdefault(name[2:], context)
                else:
                    exact.setdefault(name, context)
        built = _Contexts(contexts[0], exact, wildcard)

        def choose(connection: SSL.Connection) -> None:
            sent = connection.get_servername()
            if sent:
                context = built.for_name(sent.decode("ascii", "replace").lower().rstrip("."))
                if context is not None:
                    connection.set_context(context)

        contexts[0].set_tlsext_servername_callback(choose)
        return built

    def _context(self, certificate: LoadedCertificate, client_cas: Sequence[x509.Certificate], alpn: str | None) -> SSL.Context:
        config = self.config
        context = SSL.Context(SSL.TLS_SERVER_METHOD)
        release_buffers(context)  # SNI and reloaded contexts too: every one is made here
        try:
            context.set_min_proto_version(MIN_VERSIONS[config.min_version])
            context.set_options(_SERVER_OPTIONS)
            context.set_cipher_list((config.ciphers or _default_ciphers(config.min_version)).encode("ascii"))
        except SSL.Error as e:
            raise TLSSetupError(f"tls.ciphers: OpenSSL refuses {config.ciphers!r}: {ssl_reason(e)}") from None
        context.use_certificate(certificate.leaf)
        for intermediate in certificate.chain[1:]:
            context.add_extra_chain_cert(intermediate)
        context.use_privatekey(certificate.key)
        # No server-side session cache: OpenSSL's default keeps up to 20,480 sessions per
        # context for two hours, which the soak test (tests/test_soak.py) saw as RSS growing
        # by ~25 MiB per listener; with tickets off too (forward secrecy without ticket-key
        # rotation), every handshake is a full one. The id still scopes client-certificate
        # verification to this listener.
        context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
        context.set_session_id(hashlib.sha256(repr((alpn, config)).encode()).hexdigest()[:32].encode())
        if client_cas:
            store = context.get_cert_store()
            assert store is not None
            for ca in client_cas:
                store.add_cert(crypto.X509.from_cryptography(ca))
            for ca in client_cas:
                context.add_client_ca(ca)  # set_client_ca_list's X509Name is deprecated
            mode = SSL.VERIFY_PEER | SSL.VERIFY_CLIENT_ONCE
            if config.client_cert == "required":
                mode |= SSL.VERIFY_FAIL_IF_NO_PEER_CERT
            context.set_verify(mode)
        if alpn is not None:
            context.set_alpn_select_callback(_alpn_selector(alpn.encode("ascii")))
        return context


def _default_ciphers(min_version: str) -> str:
    return MODERN_CIPHERS if MIN_VERSIONS[min_version] >= SSL.TLS1_2_VERSION else LEGACY_CIPHERS
