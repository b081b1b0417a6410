"""
Telling an upstream who the client is with a PROXY protocol header: an endpoint that
writes the header as the first bytes of each connection it makes, beneath any TLS.
The header itself is `mailrelay.proxyprotocol.header`; reading one from a balancer is
`mailrelay.proxied`.
"""

from __future__ import annotations

from typing import cast

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IAddress,
    IHalfCloseableProtocol,
    IHandshakeListener,
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import directlyProvides, implementer

__all__ = ["ProxyHeaderEndpoint"]


@implementer(IStreamClientEndpoint)
@attrs.frozen
class ProxyHeaderEndpoint:
    """
    `endpoint`, with `header` (a PROXY protocol header) written as the first bytes of
    each connection, before the protocol connected through it is made: under
    `wrapClientTLS`, the header precedes the ClientHello; for a server-first protocol,
    it goes out before the greeting can be read.

    Why a wrapper of the connection, not of the protocol: it hands the protocol the
    real transport, so what the upstream leg relies on there (a TCP transport's
    half-close and TCP_NODELAY, pause and resume for the splice, `abortConnection`,
    `startTLS`) is untouched. Its own protocol only writes the header, then passes on
    what the transport tells (bytes, the end, half-close, the TLS handshake of a
    STARTTLS) to the one it connected, and declares the interfaces for those that that
    one declares.
    """

    endpoint: IStreamClientEndpoint
    header: bytes

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        """Connect `protocolFactory`'s protocol through `endpoint`, the header first;
        the result is that protocol (not the wrapper's)."""
        connecting: Deferred[IProtocol] = self.endpoint.connect(_HeaderFirstFactory(protocolFactory, self.header))
        return connecting.addCallback(_connected)


def _connected(first: IProtocol) -> IProtocol:
    return cast(_HeaderFirst, first).protocol


class _HeaderFirstFactory(Factory):
    noisy = False  # as _UpstreamFactory: no "Starting factory" line per session

    def __init__(self, factory: IProtocolFactory, header: bytes) -> None:
        self.factory = factory
        self.header = header

    def doStart(self) -> None:
        self.factory.doStart()

    def doStop(self) -> None:
        self.factory.doStop()

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        protocol = self.factory.buildProtocol(cast(IAddress, addr))
        return None if protocol is None else _HeaderFirst(protocol, self.header)


class _HeaderFirst(Protocol):
    """Writes the header, then connects `protocol` to the transport itself."""

    def __init__(self, protocol: IProtocol, header: bytes) -> None:
        self.protocol = protocol
        self.header = header
        # Only what `protocol` listens for: Twisted's TCP transport takes a protocol
        # without IHalfCloseableProtocol to want a full close at the end of stream.
        directlyProvides(self, *(i for i in (IHalfCloseableProtocol, IHandshakeListener) if i.providedBy(protocol)))

    def connectionMade(self) -> None:
        # One write, before anything of the protocol's (the spec asks for one segment).
        transport = self.transport
        assert transport is not None  # set by makeConnection
        transport.write(self.header)
        self.protocol.makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.protocol.connectionLost(reason)

    def readConnectionLost(self) -> None:
        cast(IHalfCloseableProtocol, self.protocol).readConnectionLost()

    def writeConnectionLost(self) -> None:
        cast(IHalfCloseableProtocol, self.protocol).writeConnectionLost()

    def handshakeCompleted(self) -> None:
        cast(IHandshakeListener, self.protocol).handshakeCompleted()
