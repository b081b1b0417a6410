"""
TLS from mailrelay to the servers it connects to: upstreams, and an https auth service.

`ClientTLS` makes the connection creators Twisted's TLS layer needs, verified against
the system trust store or a CA file, with the host name checked by service_identity and
sent as SNI. They are cached, because building a context loads a whole trust store;
`reload()` reads the trust again. `tls_verify = false` still sends SNI but checks
nothing, and says so in the log once per upstream.
Their contexts release a connection's buffers while they are empty: those made here
through `mailrelay.tls_layer.release_buffers`, those `optionsForClientTLS` makes by
Twisted's own default (it keeps them out of reach; tests/test_tls_buffers.py checks).
"""

from __future__ import annotations

from typing import Any

from cryptography import x509
from OpenSSL import SSL, crypto
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    TLSVersion,
    optionsForClientTLS,
    platformTrust,
    trustRootFromCertificates,
)
from twisted.logger import Logger
from zope.interface import implementer

from .interfaces import IReloadable
from .router import Route
from .tls import TLSSetupError, read_pem_file
from .tls_layer import release_buffers


@implementer(IOpenSSLClientConnectionCreator)
class _UnverifiedClientTLS:
    """Upstream TLS without certificate checks (`tls_verify = false`), still sending SNI."""

    def __init__(self, options: CertificateOptions, server_name: str) -> None:
        self.options = options
        release_buffers(options.getContext())
        self.send_name = not (isIPAddress(server_name) or isIPv6Address(server_name))
        self.server_name = server_name.encode("idna") if self.send_name else b""

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = self.options.clientConnectionForTLS(tlsProtocol)
        if self.send_name:
            connection.set_tlsext_host_name(self.server_name)
        return connection


@implementer(IReloadable)
class ClientTLS:
    """
    Connection creators for TLS to servers mailrelay connects to (upstreams, an https
    auth service). Verified against `ca` (a PEM file) or, when None, the system trust
    store (OpenSSL's default paths, so `SSL_CERT_FILE` and `SSL_CERT_DIR` apply); a
    Route may name its own CA file in `tls_ca`. `where` names `ca` in messages.
    """

    log = Logger()
    cache_size = 1024

    def __init__(self, ca: str | None = None, min_version: str = "1.2", where: str = "upstream.ca") -> None:
        """Raise TLSSetupError when `ca` is unusable (a configuration error)."""
        self.ca = ca
        self.where = where
        self.min_version = TLSVersion.TLSv1_3 if min_version == "1.3" else TLSVersion.TLSv1_2
        self._trust: dict[str | None, Any] = {ca: load_trust_root(ca, where)}
        self._creators: dict[tuple[str, str | None, bool], IOpenSSLClientConnectionCreator] = {}
        self._warned: set[tuple[str, str]] = set()

    def reload(self) -> None:
        """Read `ca` (or the system store) again; keep the old one when it is now broken.
        A Route's own CA files are read again at their next use."""
        try:
            trust = load_trust_root(self.ca, self.where)
        except TLSSetupError as e:
            self.log.error("TLS trust not reloaded, keeping the previous one: {why}", why=str(e))
            return
        self._trust = {self.ca: trust}
        self._creators.clear()

    def creator(self, route: Route) -> IOpenSSLClientConnectionCreator:
        """How to speak TLS to `route`; raise TLSSetupError if its CA file is unusable."""
        server_name = route.server_name or route.host
        if not route.tls_verify and (route.address, server_name) not in self._warned:
            self._warned.add((route.address, server_name))
            self.log.warn(
                "upstream {upstream}: TLS certificate NOT verified (tls_verify = false); anyone between mailrelay"
                " and it can read and change the sessions",
                upstream=route.address,
            )
        return self.creator_for(server_name, route.tls_ca, route.tls_verify)

    def creator_for(self, server_name: str, ca: str | None = None, verify: bool = True) -> IOpenSSLClientConnectionCreator:
        """For a server that must prove it is `server_name` (sent as SNI too), against
        `ca` or this object's own trust. Cached: a context loads a whole trust store."""
        ca = ca or self.ca
        key = (server_name, ca, verify)
        creator = self._creators.get(key)
        if creator is None:
            if len(self._creators) >= self.cache_size:
                self._creators.clear()
            if verify:
                if ca not in self._trust:
                    self._trust[ca] = load_trust_root(ca, "route tls_ca")
                creator = optionsForClientTLS(
                    server_name, trustRoot=self._trust[ca], extraCertificateOptions={"raiseMinimumTo": self.min_version}
                )
            else:
                creator = _UnverifiedClientTLS(CertificateOptions(verify=False, raiseMinimumTo=self.min_version), server_name)
            self._creators[key] = creator
        return creator


def load_trust_root(ca: str | None, where: str) -> Any:
    """The CAs in the PEM file `ca`, or the system's trust store when None."""
    if ca is None:
        return platformTrust()
    return trustRootFromCertificates([Certificate(c) for c in _load_cas(ca, where)])


def _load_cas(path: str, where: str) -> list[Any]:
    pem = read_pem_file(path, "CA file", where)
    try:
        return [crypto.X509.from_cryptography(c) for c in x509.load_pem_x509_certificates(pem)]
    except ValueError:
        raise TLSSetupError(
            f"{where}: {path} holds no PEM certificate: expected the CA certificates to trust, as PEM text"
            " (-----BEGIN CERTIFICATE-----)"
        ) from None
