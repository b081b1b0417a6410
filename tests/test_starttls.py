"""
The STARTTLS hand-over every front-end shares (`core/frontend.py` and its shell
`protocols/frontend.py`), driven through a
small line protocol over real sockets and real TLS: discarding plaintext sent behind
STARTTLS, resetting state, refusing a second STARTTLS, the handshake deadline, and the
hand-off to the upstream with pipelined commands intact.
"""

from __future__ import annotations

import socket
import ssl
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.protocols.tls import TLSMemoryBIOFactory

from mailrelay.config import ListenerConfig
from mailrelay.connector import UpstreamConnector
from mailrelay.listener import ListenerFactory
from mailrelay.session import Sessions
from mailrelay.tls import CertificateFiles, ServerTLS, ServerTLSConfig
from tests.support.clocked import ClockedReactor
from tests.support.frontends import Router
from tests.support.net import WAIT, ProxyTestCase, read_line, recv_all, tcp_port
from tests.support.pki import PKI
from tests.support.toy import ToyFrontEnd


def rest_until_closed(conn: socket.socket) -> bytes:
    """Everything until the proxy closes; a reset (an aborted handshake) counts as closed."""
    try:
        return recv_all(conn)
    except ConnectionResetError:
        return b""


class StartTLSTests(ProxyTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.pki = PKI(self)
        issued = self.pki.issue("mail", "mail.test")
        self.server_tls = ServerTLS(ServerTLSConfig(default=CertificateFiles(cert=issued.cert, key=issued.key)))

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.pki.ca.configure_trust(context)
        return context

    def listen(
        self, mode: str = "starttls", upstream_port: int = 9, handshake_timeout: float = 30.0, clock: Clock | None = None
    ) -> tuple[Router, int]:
        """The toy listener, its timers on `clock` if one is given; its Router and port."""
        listener = ListenerConfig(
            name="toy", listen="tcp:0", mode=mode, protocol="imap", router=None, handshake_timeout=handshake_timeout
        )
        router = Router(upstream_port)
        creator = self.server_tls.creator("imap")
        clocked: Any = reactor if clock is None else ClockedReactor(reactor, clock)
        factory: Any = ListenerFactory(
            listener,
            router,
            UpstreamConnector(clocked, 5),
            Sessions(clocked),
            clocked,
            tls=creator if mode == "starttls" else None,
            connection_class=ToyFrontEnd,
        )
        if mode == "tls":
            factory = TLSMemoryBIOFactory(creator, False, factory)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return router, tcp_port(port)

    def starttls(self, port: int, behind: bytes = b"") -> tuple[ssl.SSLSocket, list[bytes]]:
        """Connect, STARTTLS (with `behind` in the same write), handshake; the plaintext lines read."""
        conn = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        lines = [read_line(conn)]
        conn.sendall(b"STARTTLS\r\n" + behind)
        lines.append(read_line(conn))
        return self.client_context().wrap_socket(conn, server_hostname="mail.test"), lines

    async def test_plaintext_pipelined_after_starttls_is_discarded(self) -> None:
        _, port = self.listen()

        def client() -> tuple[list[bytes], bytes]:
            tls, lines = self.starttls(port, behind=b"NOOP\r\nNOOP\r\nSTATE\r\n")
            with tls:
                tls.sendall(b"STATE\r\n")
                return lines, read_line(tls)

        lines, state = await self.in_thread(client)

        self.assertEqual(lines, [b"* toy ready\r\n", b"OK begin TLS\r\n"])
        # No NOOP ran: not before the handshake (its reply would have broken TLS) nor after.
        self.assertEqual(state, b"OK tls=True seen=1\r\n")
        self.assertIn("discarded 19 byte(s) sent in plaintext after STARTTLS (command injection?)", " ".join(self.logs.lines()))

    async def test_partial_plaintext_line_is_not_joined_to_the_first_tls_line(self) -> None:
        _, port = self.listen()

        def client() -> list[bytes]:
            tls, _ = self.starttls(port, behind=b"NO")
            with tls:
                tls.sendall(b"OP\r\nNOOP\r\n")
                return [read_line(tls), read_line(tls)]

        self.assertEqual(await self.in_thread(client), [b"BAD unknown command\r\n", b"OK noop\r\n"])

    async def test_state_is_reset_after_starttls(self) -> None:
        _, port = self.listen()

        def client() -> list[bytes]:
            conn = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
            read_line(conn)
            conn.sendall(b"NOOP\r\nNOOP\r\nSTATE\r\n")
            before = [read_line(conn) for _ in range(3)][-1]
            conn.sendall(b"STARTTLS\r\n")
            read_line(conn)
            with self.client_context().wrap_socket(conn, server_hostname="mail.test") as tls:
                tls.sendall(b"STATE\r\n")
                return [before, read_line(tls)]

        self.assertEqual(await self.in_thread(client), [b"OK tls=False seen=3\r\n", b"OK tls=True seen=1\r\n"])

    async def test_second_starttls_is_refused(self) -> None:
        _, port = self.listen()

        def client() -> list[bytes]:
            tls, _ = self.starttls(port)
            with tls:
                tls.sendall(b"STARTTLS\r\nNOOP\r\n")
                return [read_line(tls), read_line(tls)]

        self.assertEqual(await self.in_thread(client), [b"BAD TLS already active\r\n", b"OK noop\r\n"])

    async def test_starttls_on_an_implicit_tls_listener_is_refused(self) -> None:
        _, port = self.listen(mode="tls")

        def client() -> list[bytes]:
            raw = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
            with self.client_context().wrap_socket(raw, server_hostname="mail.test") as tls:
                greeting = read_line(tls)  # only after the handshake
                tls.sendall(b"STARTTLS\r\nSTATE\r\n")
                return [greeting, read_line(tls), read_line(tls)]

        self.assertEqual(
            await self.in_thread(client),
            [b"* toy ready\r\n", b"BAD TLS already active\r\n", b"OK tls=True seen=1\r\n"],
        )

    async def test_plaintext_instead_of_a_handshake_ends_the_session(self) -> None:
        _, port = self.listen()

        def client() -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as conn:
                read_line(conn)
                conn.sendall(b"STARTTLS\r\n")
                read_line(conn)
                conn.sendall(b"NOOP\r\n")  # a later segment, after the go-ahead: TLS's to read
                return rest_until_closed(conn)

        self.assertEqual(await self.in_thread(client), b"")
        await self.session_line()
        [session] = self.logs.sessions()
        self.assertEqual(session["outcome"], "tls-failed")
        self.assertTrue(session["reason"].startswith("TLS: "), session["reason"])

    async def test_a_handshake_that_never_comes_times_out(self) -> None:
        clock = Clock()
        _, port = self.listen(handshake_timeout=30, clock=clock)

        def client() -> socket.socket:
            conn = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
            self.addCleanup(conn.close)
            read_line(conn)
            conn.sendall(b"STARTTLS\r\n")
            read_line(conn)  # the go-ahead: the handshake timer runs
            return conn

        conn = await self.in_thread(client)
        clock.advance(30)
        self.assertEqual(await self.in_thread(rest_until_closed, conn), b"")
        await self.session_line()
        [session] = self.logs.sessions()
        self.assertEqual((session["outcome"], session["reason"]), ("tls-failed", "no TLS handshake within 30s"))

    async def test_commands_pipelined_behind_the_hand_off_reach_the_upstream(self) -> None:
        def upstream(conn: socket.socket) -> bytes:
            conn.sendall(b"upstream says hi\r\n")
            return recv_all(conn)

        server = self.server(upstream)
        router, port = self.listen(upstream_port=server.port)

        def client() -> bytes:
            tls, _ = self.starttls(port)
            with tls:
                tls.sendall(b"RELAY\r\nfirst for the upstream\r\nsecond\r\n")
                answer = read_line(tls)
                tls.close()
                return answer

        self.assertEqual(await self.in_thread(client), b"upstream says hi\r\n")
        self.assertEqual(await self.in_thread(server.result), b"first for the upstream\r\nsecond\r\n")
        [request] = router.requests
        self.assertEqual((request.tls, request.sni, request.mode), (True, "mail.test", "starttls"))

    async def test_an_over_long_line_gets_an_error_and_a_close(self) -> None:
        _, port = self.listen()

        def client() -> list[bytes]:
            with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as conn:
                read_line(conn)
                conn.sendall(b"NOOP " + b"x" * 100_000 + b"\r\n")  # skipped to its end, then answered
                return [read_line(conn), recv_all(conn)]

        self.assertEqual(await self.in_thread(client), [b"BAD line too long\r\n", b""])
        await self.session_line()
        [session] = self.logs.sessions()
        self.assertEqual(session["outcome"], "protocol-error")

    async def test_a_client_that_ends_its_stream_before_routing_is_closed(self) -> None:
        _, port = self.listen()

        def client() -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as conn:
                read_line(conn)
                conn.sendall(b"NOOP\r\nNOOP\r\n")
                conn.shutdown(socket.SHUT_WR)
                return rest_until_closed(conn)

        self.assertEqual(await self.in_thread(client), b"OK noop\r\nOK noop\r\n")
        await self.session_line()
        [session] = self.logs.sessions()
        self.assertEqual((session["outcome"], session["reason"]), ("client-gone", "client ended its stream before it was routed"))
