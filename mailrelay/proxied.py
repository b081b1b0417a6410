"""
A listener behind a load balancer: read the PROXY protocol header (v1 or v2) a trusted
balancer sends first, and only then start the listener's own protocol, which sees the
client the header names as its peer.

    accepted --peer not in trusted_proxies--> closed (one log line)
        \\--header read (in any number of pieces)--> listener's protocol built for the
              header's client, connected, handed what followed the header
        \\--malformed, or not complete within proxy_timeout--> closed (one log line)

What a caller may rely on:
- nothing of the listener's protocol exists before the header is complete: no greeting
  is written, no session is opened, and its connection limits count the header's
  client, not the balancer (`buildProtocol` is called with the header's address);
- `getPeer()` and `getHost()` of the transport the listener's protocol sees answer the
  header's source and destination; a LOCAL header (the balancer's health check) and
  an UNKNOWN/UNSPEC one leave the real connection's addresses;
- the wrapper sits outside Twisted's TLS layer, so a `tls` listener reads the header
  before its handshake and a `splice` listener before its ClientHello peek; STARTTLS
  (`transport.startTLS`) still works inside it;
- everything else is the real transport's: writes, producers and back-pressure,
  half-close (forwarded when the listener's protocol is half-closeable), TLS handshake
  events (forwarded when it listens for them), the interfaces it provides;
- a connection that ends without sending a byte is not logged: that is what a
  balancer's plain TCP health check does; a LOCAL header's session (a balancer's
  health check) is logged at debug level when it ends well (`IBalancerAddress`);
- connections still reading their header are bounded: past the listener's
  `max_sessions` of them at once (its connection limits cannot count them yet, not
  knowing their clients), a new one is closed at once, with one warning per burst.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHalfCloseableProtocol,
    IHandshakeListener,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import alsoProvides, providedBy
from zope.interface.declarations import Declaration

from .config import ListenerConfig
from .interfaces import IBalancerAddress
from .networks import client_addresses
from .proxyprotocol import InvalidProxyHeader, ProxyHeader, ProxyHeaderParser
from .relay import address_of
from .router import format_address
from .timers import cancel

__all__ = ["ProxiedFactory", "ProxiedTransport", "ProxyHeaderReceiver"]


class ProxiedFactory(Factory):
    """
    Wraps a listener's factory (`wrappedFactory`: its `ListenerFactory`, or Twisted's TLS
    factory around it) so that every connection must start with a PROXY header from a
    peer in the listener's `trusted_proxies`, read within `proxy_timeout` on `clock`.
    """

    noisy = False
    log = Logger()

    def __init__(self, wrappedFactory: IProtocolFactory, listener: ListenerConfig, clock: IReactorTime) -> None:
        self.wrappedFactory = wrappedFactory
        self.listener = listener
        self.clock = clock
        self.waiting = 0
        """Connections reading their header now."""
        self._turned_away = 0
        """Connections closed for `waiting` being full since it last had room."""

    def doStart(self) -> None:
        self.wrappedFactory.doStart()
        super().doStart()

    def doStop(self) -> None:
        self.wrappedFactory.doStop()
        super().doStop()

    def trusts(self, peer: IAddress) -> bool:
        """Whether `peer` may tell us who the client is. A UNIX socket's peer is trusted:
        who may connect to one is decided by its file's permissions."""
        if not isinstance(peer, (IPv4Address, IPv6Address)):
            return True
        return any(address in network for address in client_addresses(peer.host) for network in self.listener.trusted_proxies)

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        if addr is None:  # Twisted's ports always give one
            return None
        if not self.trusts(addr):
            return Untrusted(self, addr)
        limit = self.listener.connection_limits.max_sessions
        if limit and self.waiting >= limit:
            self._turned_away += 1
            if self._turned_away == 1:  # the first of a burst; `header_done` counts the rest
                self.refused(addr, f"{self.waiting} connections are already waiting for their PROXY header (max_sessions)")
            return Untrusted(self, addr, reason=None)
        self.waiting += 1
        return ProxyHeaderReceiver(self, addr)

    def header_done(self) -> None:
        """A connection stopped waiting for its header (read, refused or gone)."""
        self.waiting -= 1
        if self._turned_away > 1:
            self.log.warn(
                "listener {listener}: {count} more connections closed while {limit} were waiting for their PROXY header",
                listener=self.listener.name,
                count=self._turned_away - 1,
                limit=self.listener.connection_limits.max_sessions,
            )
        self._turned_away = 0

    def refused(self, peer: IAddress, reason: str) -> None:
        """One warning line for a connection closed before its listener saw it."""
        self.log.warn(
            "listener {listener}: closed a connection from {peer}: {reason}",
            listener=self.listener.name,
            peer=format_address(address_of(peer)),
            reason=reason,
        )


UNTRUSTED = (
    "not in trusted_proxies: this listener takes connections from its balancers only"
    " (list the balancer's address in trusted_proxies, or point clients at a listener without proxy_protocol)"
)


class Untrusted(Protocol):
    """A connection closed at once, nothing read: from a peer not in `trusted_proxies`,
    or one too many waiting for a header (`reason` None: already logged)."""

    def __init__(self, factory: ProxiedFactory, peer: IAddress, reason: str | None = UNTRUSTED) -> None:
        self.factory = factory
        self.peer = peer
        self.reason = reason

    def connectionMade(self) -> None:
        if self.reason is not None:
            self.factory.refused(self.peer, self.reason)
        # A clean close (FIN), nothing read: what it sent is dropped with the connection
        # (the kernel answers bytes still unread with a reset, as it must).
        self.transport.loseConnection()  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        pass


class ProxyHeaderReceiver(Protocol):
    """
    The protocol of a connection from a trusted peer: reads the header, then builds the
    listener's protocol and from then on relays between it and the real transport
    (`inner`: the listener's protocol, None until the header is read).
    """

    def __init__(self, factory: ProxiedFactory, peer: IAddress) -> None:
        self.factory = factory
        self.peer = peer
        self.inner: IProtocol | None = None
        self._parser = ProxyHeaderParser()
        self._received = 0
        self._closing = False
        self._timer: IDelayedCall | None = None
        self._waiting = True
        """Counted in the factory's `waiting` (until the header is read, refused or lost)."""

    def connectionMade(self) -> None:
        timeout = self.factory.listener.proxy_timeout
        self._timer = self.factory.clock.callLater(timeout, self._expired)

    def dataReceived(self, data: bytes) -> None:
        if self.inner is not None:
            self.inner.dataReceived(data)
            return
        if self._closing:
            return
        self._received += len(data)
        try:
            header = self._parser.feed(data)
        except InvalidProxyHeader as e:
            self._refuse(f"invalid PROXY header: {e.reason}")
            return
        if header is not None:
            self._start(header)

    def _expired(self) -> None:
        self._timer = None
        received = f" ({self._received} bytes of it)" if self._received else ""
        self._refuse(f"no complete PROXY header within {self.factory.listener.proxy_timeout:g}s{received}")

    def _refuse(self, reason: str) -> None:
        self._closing = True
        self._stop_timer()
        self.factory.refused(self.peer, reason)
        assert self.transport is not None
        self.transport.loseConnection()

    def _stop_timer(self) -> None:
        """The wait for the header is over, whichever way."""
        cancel(self._timer)
        self._timer = None
        if self._waiting:
            self._waiting = False
            self.factory.header_done()

    def _start(self, header: ProxyHeader) -> None:
        self._stop_timer()
        transport: Any = self.transport
        peer, host = transport.getPeer(), transport.getHost()
        addresses = header.addresses if header.command == "PROXY" else None
        if addresses is not None:
            peer, host = _twisted_address(addresses[0]), _twisted_address(addresses[1])
        elif header.command == "LOCAL" and isinstance(peer, (IPv4Address, IPv6Address)):
            # The balancer speaking for itself (a health check): its own address, marked.
            peer = attrs.evolve(peer)
            alsoProvides(peer, IBalancerAddress)
        inner = self.factory.wrappedFactory.buildProtocol(peer)
        if inner is None:  # as Twisted's own ports do with a factory that declines
            self._closing = True
            transport.loseConnection()
            return
        self.inner = inner
        # The real transport asks its protocol (this one) for these when the time comes.
        alsoProvides(self, *(i for i in (IHalfCloseableProtocol, IHandshakeListener) if i.providedBy(inner)))
        inner.makeConnection(ProxiedTransport(transport, peer, host))
        if header.rest:
            inner.dataReceived(header.rest)

    def readConnectionLost(self) -> None:
        assert self.inner is not None  # only provided once there is a half-closeable inner
        IHalfCloseableProtocol(self.inner).readConnectionLost()

    def writeConnectionLost(self) -> None:
        assert self.inner is not None
        IHalfCloseableProtocol(self.inner).writeConnectionLost()

    def handshakeCompleted(self) -> None:
        assert self.inner is not None
        IHandshakeListener(self.inner).handshakeCompleted()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stop_timer()
        inner, self.inner = self.inner, None
        if inner is not None:
            inner.connectionLost(reason)
        elif not self._closing and self._received:
            self.factory.refused(self.peer, f"it closed after {self._received} bytes of an incomplete PROXY header")


class ProxiedTransport:
    """
    The transport the listener's protocol sees: the real one (`transport`), except that
    its peer and host are those the PROXY header named. It provides whatever the real
    transport provides at the time of asking (after STARTTLS, ISSLTransport too).
    """

    def __init__(self, transport: Any, peer: IAddress, host: IAddress) -> None:
        self.transport = transport
        self._peer = peer
        self._host = host

    @property
    def socket_transport(self) -> Any:
        """The real transport, for what works on its socket (`mailrelay.zerocopy`)."""
        return self.transport

    @property
    def __providedBy__(self) -> Declaration:  # noqa: PLW3201 (zope.interface's hook)
        return providedBy(self.transport)

    def getPeer(self) -> IAddress:
        return self._peer

    def getHost(self) -> IAddress:
        return self._host

    def __getattr__(self, name: str) -> Any:
        # Only reached for what this class does not define: everything else of a
        # transport (write, producers, loseWriteConnection, startTLS, getHandle...).
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.transport, name)

    def __repr__(self) -> str:
        return f"<ProxiedTransport {format_address(address_of(self._peer))} over {self.transport!r}>"


def _twisted_address(address: tuple[str, int]) -> IPv4Address | IPv6Address:
    host, port = address
    return IPv6Address("TCP", host, port) if ":" in host else IPv4Address("TCP", host, port)
