"""What a front-end knows about its client connection, in one value."""

from __future__ import annotations

import attrs

from ..router import Address, ClientCertificate


@attrs.frozen(kw_only=True)
class ConnectionFacts:
    """The client connection as the listener accepted it: all the front-end core and
    the upstream login (`login.UpstreamLogin`) know of it, one value for both."""

    client: Address
    local: Address
    listener: str = "-"
    mode: str = "starttls"
    """The listener's mode: "tls" (TLS from the first byte) or "starttls"."""
    starttls_available: bool = False
    """Whether the listener can upgrade this connection (it has a certificate)."""
    session_id: str = "-"


@attrs.frozen(kw_only=True)
class TLSInfo:
    """What the client's TLS handshake established that a protocol core uses."""

    client_cert: ClientCertificate | None = None
