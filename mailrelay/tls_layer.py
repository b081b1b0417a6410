"""
How mailrelay's TLS layer uses OpenSSL: what every context is set to, and the
protocol wrapper of the connections whose TLS layer mailrelay builds itself.

`release_buffers(context)` is the one place that sets `SSL_MODE_RELEASE_BUFFERS`, on
every context mailrelay makes, server side (`mailrelay.tls`: default, SNI and reloaded
contexts) and client side (`mailrelay.tls_client`: upstreams, an https auth service;
the verified ones come from Twisted's `optionsForClientTLS`, which keeps its context to
itself and sets the same mode on it, as all of Twisted's `CertificateOptions` do).
With it OpenSSL frees a connection's read and write buffers (about 34 KiB together)
whenever they are empty, instead of keeping them for the connection's whole life: an
idle session, which is what most mail sessions are most of the time, costs that much
less. nginx sets the same mode on all its contexts.

`RecordTLSFactory` is a `TLSMemoryBIOFactory` whose protocol (`RecordTLSProtocol`)
changes only how bytes move through OpenSSL, never which bytes or in what order:

- a write is encrypted whole, at once, record after record, and everything it produced
  leaves in one write, straight to the socket when nothing waits before it
  (`zerocopy.write_through`): Twisted's layer flushes the memory BIO and writes to the
  transport after every 16 KiB record, copies each record's plaintext first, and (its
  `BufferingTLSTransport`) holds small writes for the next reactor turn, where the
  transport holds them for one more; a reply crossing the proxy waited two turns;
- the records one pass over the received bytes decrypts reach the wrapped protocol in
  one `dataReceived` (Twisted's layer calls it once per record). Only bytes that pass
  has already decrypted are joined: nothing is held back waiting for more, so the
  wrapped protocol sees every byte as soon as it would have without this layer, and
  bytes before and after a close or an error are never joined across it.

Connections upgraded by `ITLSTransport.startTLS` (the STARTTLS front-ends, STARTTLS
to an upstream) get Twisted's own layer: the reactor builds it and takes no factory.
"""

from __future__ import annotations

from OpenSSL import SSL
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from .zerocopy import write_through

RECORD = 2**14
"""The most plaintext one TLS record carries."""
RECORD_OVERHEAD = 5 + 16 + 256
"""Room for a record's header, AEAD tag and any padding or explicit nonce: what a record
may add to its plaintext, so one `bio_read` usually takes a whole write's records."""


def release_buffers(context: SSL.Context) -> SSL.Context:
    """
    Make `context` release each connection's buffers while they are empty
    (`SSL_MODE_RELEASE_BUFFERS`), and return it. Call it before the context's first
    connection: OpenSSL copies a context's mode into a connection when it makes it, and
    pyOpenSSL refuses to change a context once it has made one.
    """
    context.set_mode(SSL.MODE_RELEASE_BUFFERS)
    return context


class RecordTLSProtocol(TLSMemoryBIOProtocol):
    """Twisted's TLS layer, encrypting each write whole and at once, writing it straight
    to an idle socket, and delivering each pass's decrypted records at once (module
    docstring)."""

    def _write(self, bytes: bytes) -> None:  # noqa: A002 (the name Twisted's signature uses)
        if self._lostTLSConnection or not bytes:
            return
        data = memoryview(bytes)
        sent = 0
        try:
            while sent < len(data):
                # One record per send(): pyOpenSSL enables partial writes. A view, not a copy.
                sent += self._tlsConnection.send(data[sent:])
        except SSL.WantReadError:
            # Mid-handshake (or renegotiation): what is left waits for the peer, as in Twisted.
            self._flushSendBIO()
            self._bufferedWrite(bytes[sent:])
            return
        except SSL.Error:
            failure = Failure()
            self._flushSendBIO()
            self._tlsShutdownFinished(failure)
            return
        self._flushSendBIO(len(data) + RECORD_OVERHEAD * (len(data) // RECORD + 1))

    def _flushSendBIO(self, expected: int = 2**15) -> None:
        """Write everything OpenSSL has for the peer in one transport write; `expected`
        is how many bytes that probably is (more is read in further rounds)."""
        chunks = []
        while True:
            try:
                chunks.append(self._tlsConnection.bio_read(expected))
            except SSL.WantReadError:
                break
        if chunks:
            transport = self.transport
            assert transport is not None
            write_through(transport, chunks[0] if len(chunks) == 1 else b"".join(chunks))

    def _flushReceiveBIO(self) -> None:
        received: list[bytes] = []
        while not self._lostTLSConnection:
            try:
                received.append(self._tlsConnection.recv(2**15))
            except SSL.WantReadError:
                break
            except SSL.ZeroReturnError:
                # The peer's close_notify: what came before it is delivered before the end.
                self._deliver(received)
                self._shutdownTLS()
                self._tlsShutdownFinished(None)
            except SSL.Error:
                failure = Failure()
                self._deliver(received)
                self._tlsShutdownFinished(failure)
        self._deliver(received)
        self._flushSendBIO()

    def _deliver(self, received: list[bytes]) -> None:
        """Hand what was decrypted to the wrapped protocol (unless aborted), and forget it."""
        data = received[0] if len(received) == 1 else b"".join(received)
        received.clear()
        if data and not self._aborted:
            self.wrappedProtocol.dataReceived(data)


class RecordTLSFactory(TLSMemoryBIOFactory):
    """`TLSMemoryBIOFactory` with `RecordTLSProtocol`: for `tls` listeners and implicit
    TLS to upstreams (`wrap_client_tls`)."""

    protocol = RecordTLSProtocol


@implementer(IStreamClientEndpoint)
class _ClientTLSEndpoint:
    def __init__(self, creator: IOpenSSLClientConnectionCreator, endpoint: IStreamClientEndpoint) -> None:
        self.creator = creator
        self.endpoint = endpoint

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        connecting = self.endpoint.connect(RecordTLSFactory(self.creator, True, protocolFactory))
        return connecting.addCallback(_inside_tls)


def _inside_tls(layer: IProtocol) -> IProtocol:
    assert isinstance(layer, TLSMemoryBIOProtocol)
    return layer.wrappedProtocol


def wrap_client_tls(creator: IOpenSSLClientConnectionCreator, endpoint: IStreamClientEndpoint) -> IStreamClientEndpoint:
    """Twisted's `wrapClientTLS` with `RecordTLSFactory`: connects with `endpoint`,
    then speaks TLS as `creator` says; the connected protocol is the caller's own."""
    return _ClientTLSEndpoint(creator, endpoint)
