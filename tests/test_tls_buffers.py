"""
Every OpenSSL connection mailrelay holds releases its buffers while they are empty
(`SSL_MODE_RELEASE_BUFFERS`, `mailrelay.tls_layer.release_buffers`), on both sides of
a session: the client's (a `tls` listener, with an SNI certificate after a reload; a
STARTTLS front-end) and the upstream's (a route with tls = "tls", verified or not; one
with tls = "starttls"). Real sockets on loopback, Python's `ssl` for clients and
upstreams (in threads), mailrelay in the reactor; each test looks at the connections
while the session is idle.

And what mailrelay's own TLS layer (`RecordTLSProtocol`) delivers when one read holds
many records: a line protocol's framing stays as sent, and data the client sends right
before its close_notify all arrives before the end.
"""

from __future__ import annotations

import smtplib
import socket
import ssl
from collections.abc import Callable
from typing import Any

from OpenSSL import SSL
from OpenSSL._util import lib as openssl
from twisted.internet import reactor, tcp
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol

from mailrelay.router import Reject, Route, RouteRequest
from mailrelay.tls import CertificateFiles, ServerTLS, ServerTLSConfig
from mailrelay.tls_client import ClientTLS
from mailrelay.tls_layer import RecordTLSProtocol
from tests.support.frontends import PASSWORD, USER, Router
from tests.support.net import WAIT, ProxyTestCase, echo, payload, recv_all, recv_exactly, sha
from tests.support.pki import PKI, server_context, tls_server
from tests.support.smtp import MESSAGE, ScriptedSMTP, SMTPTestCase
from tests.support.tls_records import RecordClient, pieces_of

RELEASE = SSL.MODE_RELEASE_BUFFERS


def modes(connection: SSL.Connection) -> tuple[int, int]:
    """
    The mode of `connection` itself (what OpenSSL acts on: copied from the context it
    was made from) and of the context it has now (after SNI, the chosen certificate's).
    pyOpenSSL has no getter, and refuses `set_mode` on a context that has made a
    connection, so this asks OpenSSL through pyOpenSSL's bindings: setting no bits
    returns the mode unchanged.
    """
    return openssl.SSL_set_mode(connection._ssl, 0), openssl.SSL_CTX_set_mode(connection.get_context()._context, 0)


def tls_layer(protocol: Any) -> TLSMemoryBIOProtocol | None:
    """The TLS layer among `protocol` and the protocols it wraps, if any."""
    while protocol is not None and not isinstance(protocol, TLSMemoryBIOProtocol):
        protocol = getattr(protocol, "wrappedProtocol", None) or getattr(protocol, "_wrappedProtocol", None)
    return protocol


def held(port: int) -> list[TLSMemoryBIOProtocol]:
    """The TLS layers of this reactor's TCP connections from or to `port`: those mailrelay
    accepted on it (a listener's port) or made to it (an upstream's)."""
    found = []
    for selectable in {*reactor.getReaders(), *reactor.getWriters()}:
        if isinstance(selectable, tcp.Connection) and port in (selectable.getHost().port, selectable.getPeer().port):
            layer = tls_layer(selectable.protocol)
            if layer is not None:
                found.append(layer)
    return found


class ReleasesBuffers:
    """Assertions on the TLS connections a session holds."""

    assertEqual: Callable[..., None]

    def assert_releases(self, layer: TLSMemoryBIOProtocol, side: str) -> None:
        connection = layer.getHandle()
        self.assertEqual(
            tuple(mode & RELEASE for mode in modes(connection)),
            (RELEASE, RELEASE),
            f"{side}: mode of the connection, of its context",
        )

    def assert_one_each(self, listener_port: int, upstream_port: int) -> tuple[TLSMemoryBIOProtocol, TLSMemoryBIOProtocol]:
        """The one TLS connection on each side of the idle session, each checked."""
        [client_side], [upstream_side] = held(listener_port), held(upstream_port)
        self.assert_releases(client_side, "client side")
        self.assert_releases(upstream_side, "upstream side")
        return client_side, upstream_side


class ImplicitTLSTests(ProxyTestCase, ReleasesBuffers):
    """A `tls` listener spliced to an upstream with tls = "tls"."""

    def setUp(self) -> None:
        super().setUp()
        self.pki = PKI(self)

    async def idle_session(self, verify: bool) -> tuple[Any, int, int]:
        """Start mailrelay (default and SNI certificates, reloaded once), open a session
        for sni.test through it and leave it idle; the service and both ports."""
        default, sni = self.pki.issue("default", "mail.test"), self.pki.issue("sni", "sni.test")
        upstream = self.server(tls_server(self.pki.issue("upstream", "upstream.test"), echo))
        config = {
            "drain_timeout": 5,
            "tls": {"cert": default.cert, "key": default.key, "sni": [{"cert": sni.cert, "key": sni.key}]},
            "listener": [{"name": "tls", "listen": "tcp:0:interface=127.0.0.1", "mode": "tls"}],
            "upstream": {"ca": self.pki.ca_file},
            "router": {
                "type": "static",
                "host": "127.0.0.1",
                "port": upstream.port,
                "tls": "tls",
                "server_name": "upstream.test",
                "tls_verify": verify,
            },
        }
        service, port = await self.start_proxy(config)
        await service.reload()  # what a session gets is a reloaded generation of contexts
        context = ssl.create_default_context(cafile=self.pki.ca_file)

        def client() -> ssl.SSLSocket:
            conn = context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=WAIT), server_hostname="sni.test")
            conn.sendall(b"ping")
            assert recv_exactly(conn, 4) == b"ping"  # through both TLS connections: the session is up
            return conn

        conn = await self.in_thread(client)
        self.addCleanup(conn.close)
        return service, port, upstream.port

    async def test_both_sides_release_buffers_with_an_sni_certificate_after_reload(self) -> None:
        service, port, upstream_port = await self.idle_session(verify=True)
        client_side, upstream_side = self.assert_one_each(port, upstream_port)
        # The connection checked is the SNI certificate's, of the reloaded generation.
        self.assertIs(client_side.getHandle().get_context(), service.server_tls.contexts_for(None).exact["sni.test"])
        # mailrelay builds these TLS layers itself (`mailrelay.tls_layer`).
        self.assertIsInstance(client_side, RecordTLSProtocol)
        self.assertIsInstance(upstream_side, RecordTLSProtocol)

    async def test_an_unverified_upstream_releases_buffers_too(self) -> None:
        _, port, upstream_port = await self.idle_session(verify=False)
        self.assert_one_each(port, upstream_port)


class StartTLSTests(SMTPTestCase, ReleasesBuffers):
    """A STARTTLS SMTP front-end relaying to an upstream with tls = "starttls"."""

    async def test_both_sides_release_buffers_after_starttls(self) -> None:
        issued = self.pki.issue("upstream", "upstream.test")
        upstream_tls = server_context(issued)
        upstream = self.upstream(tls=upstream_tls)
        router = Router(port=upstream.port, tls="starttls", server_name="upstream.test", tls_ca=self.pki.ca_file)
        port = await self.proxy(router, mode="starttls")

        def client() -> smtplib.SMTP:
            smtp = self.smtp(port, "starttls")
            smtp.login(USER, PASSWORD)  # passed through: the upstream's TLS is up
            return smtp

        smtp = await self.in_thread(client)
        self.addCleanup(smtp.close)
        self.assert_one_each(port, upstream.port)
        await self.in_thread(smtp.quit)


class ContextTests(ProxyTestCase):
    """Every context is set before its first connection, including ones no test above
    connects through (a wildcard SNI certificate's, an https auth service's)."""

    def test_every_server_context_releases_buffers(self) -> None:
        pki = PKI(self)
        default, sni, wild = pki.issue("d", "mail.test"), pki.issue("s", "sni.test"), pki.issue("w", "*.wild.test")
        server_tls = ServerTLS(
            ServerTLSConfig(
                default=CertificateFiles(default.cert, default.key),
                sni=(CertificateFiles(sni.cert, sni.key), CertificateFiles(wild.cert, wild.key)),
            )
        )
        for alpn in (None, "smtp"):
            server_tls.creator(alpn)
            built = server_tls.contexts_for(alpn)
            contexts = [built.default, *built.exact.values(), *built.wildcard.values()]
            self.assertEqual(len(contexts), 3)
            self.assertEqual([c.set_mode(0) & RELEASE for c in contexts], [RELEASE] * 3)

    def test_every_client_connection_releases_buffers(self) -> None:
        client_tls = ClientTLS(PKI(self).ca_file)
        for verify in (True, False):
            creator = client_tls.creator_for("upstream.test", verify=verify)
            layer = TLSMemoryBIOFactory(creator, True, Factory.forProtocol(Protocol)).buildProtocol(None)
            connection = creator.clientConnectionForTLS(layer)
            self.assertEqual([mode & RELEASE for mode in modes(connection)], [RELEASE, RELEASE], f"verify={verify}")


class DeliveryTests(SMTPTestCase):
    """Many records in one read, through `tls` listeners (mailrelay's own TLS layer)."""

    async def test_smtp_cut_into_many_records_in_one_write_is_framed_as_sent(self) -> None:
        def answer(request: RouteRequest) -> Route:
            if request.recipient and request.recipient.startswith("no"):
                raise Reject("5.7.1 Recipient refused by policy", code=550)
            return Route(host="127.0.0.1", port=upstream.port, login="none")

        upstream = self.server(ScriptedSMTP())
        port = await self.proxy(Router(answer=answer), mode="tls", auth=["none"], vet_recipients="all")
        session = (
            b"EHLO c.example\r\nMAIL FROM:<s@x.example>\r\nRCPT TO:<ok@y.example>\r\nRCPT TO:<no@y.example>\r\n"
            b"RCPT TO:<ok2@y.example>\r\nDATA\r\n" + MESSAGE.replace(b"\r\n.", b"\r\n..") + b".\r\nNOOP\r\nQUIT\r\n"
        )

        def replies(size: int) -> bytes:
            with RecordClient(port, self.context, "relay.test") as client:
                client.read_until(b"\r\n")  # the greeting
                client.send_records(pieces_of(session, size))
                return client.read_until_closed()

        whole, cut = await self.in_thread(replies, len(session)), await self.in_thread(replies, 5)
        self.assertEqual(cut, whole)
        codes = [line[:3] for line in whole.split(b"\r\n") if line[3:4] == b" "]
        self.assertEqual(codes, [b"250", b"250", b"250", b"550", b"250", b"354", b"250", b"250", b"221"])
        heard = [await self.in_thread(upstream.result) for _ in range(2)]
        self.assertEqual([h.messages for h in heard], [[MESSAGE], [MESSAGE]])
        self.assertEqual(heard[0].lines, heard[1].lines)

    async def test_data_right_before_close_notify_all_reaches_the_upstream(self) -> None:
        data = payload(1 << 20)
        upstream = self.server(recv_all)
        config = {
            "drain_timeout": 5,
            "tls": {"cert": self.issued.cert, "key": self.issued.key},
            "listener": [{"name": "tls", "listen": "tcp:0:interface=127.0.0.1", "mode": "tls"}],
            "router": {"type": "static", "host": "127.0.0.1", "port": upstream.port},
        }
        _, port = await self.start_proxy(config)

        def client() -> bytes:
            with RecordClient(port, self.context, "relay.test") as client:
                client.send_records(pieces_of(data, 1000), close=True)
                return client.read_until_closed()

        self.assertEqual(await self.in_thread(client), b"")
        received = await self.in_thread(upstream.result)
        self.assertEqual((len(received), sha(received)), (len(data), sha(data)))


def test_the_twisted_internals_the_record_layer_overrides_are_still_there() -> None:
    """`RecordTLSProtocol` replaces three private methods of Twisted's TLS layer and uses
    its private state: a Twisted that renamed them would leave the overrides unused (or
    broken) without a word. This names each one, so an upgrade fails here first."""
    from twisted.protocols.tls import TLSMemoryBIOProtocol

    from mailrelay.tls_layer import RecordTLSProtocol

    overridden = ("_write", "_flushSendBIO", "_flushReceiveBIO")
    used = ("_bufferedWrite", "_shutdownTLS", "_tlsShutdownFinished")
    for name in overridden + used:
        assert callable(getattr(TLSMemoryBIOProtocol, name, None)), f"Twisted's TLS layer has no {name} any more"
    for name in overridden:
        assert name in vars(RecordTLSProtocol)
    layer = TLSMemoryBIOProtocol.__new__(TLSMemoryBIOProtocol)
    for state in ("_lostTLSConnection", "_aborted"):
        assert hasattr(layer, state), f"Twisted's TLS layer keeps no {state} any more"
