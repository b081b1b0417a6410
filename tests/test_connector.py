"""The shared UpstreamConnector against real upstream servers on loopback."""

from __future__ import annotations

import datetime
import socket
import ssl
import threading
from typing import Any

from cryptography.hazmat.primitives import serialization
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock

from mailrelay.connector import UpstreamConnector, UpstreamProtocol, UpstreamUnavailable
from mailrelay.router import Reject, Route
from mailrelay.tls import self_signed_certificate
from mailrelay.tls_client import ClientTLS
from tests.support.clocked import ClockedReactor, connecting_to, reading_from
from tests.support.net import ProxyTestCase, closed_port, recv_all
from tests.support.pki import PKI


def greeter(conn: socket.socket) -> bytes:
    """A server-first upstream: greets, answers one command, pipelines a second reply."""
    conn.sendall(b"220 upstream ready\r\n")
    command = b""
    while not command.endswith(b"\r\n"):
        command += conn.recv(100)
    conn.sendall(b"250 hello " + command[5:-2] + b"\r\n" + b"250 early second reply\r\n")
    return command + recv_all(conn)


async def expect(upstream: UpstreamProtocol, code: bytes, error: type[Exception] = Reject) -> bytes:
    """The upstream's next line, which must start with `code` (else `error` is raised)."""
    line = await upstream.read_line()
    if not line.startswith(code):
        raise error(f"expected {code!r}, upstream said {line!r}")
    return line


async def ehlo_login(upstream: UpstreamProtocol, route: Route) -> None:
    await expect(upstream, b"220")
    upstream.write(b"EHLO mailrelay\r\n")
    await expect(upstream, b"250")


class ConnectorTests(ProxyTestCase):
    def connector(self, timeout: float = 5) -> UpstreamConnector:
        return UpstreamConnector(reactor, connect_timeout=timeout)

    async def test_login_step_talks_to_the_upstream_and_unread_bytes_stay_pending(self) -> None:
        server = self.server(greeter)
        upstream = await Deferred.fromCoroutine(
            self.connector().connect([Route(host="127.0.0.1", port=server.port)], login=ehlo_login)
        )
        while b"\n" not in upstream.protocol.pending:
            await Deferred.fromCoroutine(_tick())
        self.assertEqual(bytes(upstream.protocol.pending), b"250 early second reply\r\n")
        upstream.protocol.transport.loseConnection()
        self.assertEqual(await self.in_thread(server.result), b"EHLO mailrelay\r\n")

    async def test_ipv6_addresses_and_host_names_are_reached(self) -> None:
        for host, listen in (("::1", "::1"), ("localhost", "127.0.0.1")):
            server = self.server(greeter, host=listen)
            upstream = await Deferred.fromCoroutine(
                self.connector().connect([Route(host=host, port=server.port)], login=ehlo_login)
            )
            self.assertEqual(upstream.route.host, host)
            upstream.protocol.transport.loseConnection()
            self.assertEqual(await self.in_thread(server.result), b"EHLO mailrelay\r\n")

    async def test_reject_from_the_login_step_is_final(self) -> None:
        def refuses(conn: socket.socket) -> None:
            conn.sendall(b"554 go away\r\n")

        first, second = self.server(refuses), self.server(greeter)
        routes = [Route(host="127.0.0.1", port=first.port), Route(host="127.0.0.1", port=second.port)]
        with self.assertRaises(Reject):
            await Deferred.fromCoroutine(self.connector().connect(routes, login=ehlo_login))
        self.assertEqual(second.connections, 0)

    async def test_an_upstream_that_hangs_up_during_login_makes_the_next_route_tried(self) -> None:
        def hangs_up(conn: socket.socket) -> None:
            conn.sendall(b"220 partial")

        first, second = self.server(hangs_up), self.server(greeter)
        routes = [Route(host="127.0.0.1", port=first.port), Route(host="127.0.0.1", port=second.port)]
        upstream = await Deferred.fromCoroutine(self.connector().connect(routes, login=ehlo_login, session_id="abc"))
        self.assertEqual(upstream.route.port, second.port)
        self.assertTrue(
            any(
                f"session abc: upstream 127.0.0.1:{first.port} failed: upstream closed the connection" in line
                for line in self.logs.lines()
            )
        )
        upstream.protocol.transport.loseConnection()

    async def test_an_over_long_upstream_line_fails_the_route(self) -> None:
        def babbles(conn: socket.socket) -> None:
            conn.sendall(b"220 " + b"x" * 20000)
            recv_all(conn)

        server = self.server(babbles)
        with self.assertRaises(UpstreamUnavailable) as caught:
            await Deferred.fromCoroutine(self.connector().connect([Route(host="127.0.0.1", port=server.port)], login=ehlo_login))
        self.assertIn("longer than 8192 bytes", str(caught.exception))

    async def test_every_route_failing_says_why_for_each(self) -> None:
        dead = closed_port()
        routes = [
            Route(host="127.0.0.1", port=dead),
            Route(host="127.0.0.1", port=dead, tls="starttls"),
            Route(host="127.0.0.1", port=dead, proxy_protocol=2),
        ]
        with self.assertRaises(UpstreamUnavailable) as caught:
            await Deferred.fromCoroutine(self.connector().connect(routes))
        reasons = [why for _, why in caught.exception.failures]
        self.assertEqual(reasons[0], "connection refused")
        self.assertEqual(
            reasons[1], 'tls = "starttls" needs a mail protocol on the listener; use tls = "tls" with protocol "none"'
        )
        self.assertEqual(reasons[2], "connection refused")  # a PROXY route is tried like any other


async def _tick() -> None:
    from twisted.internet.task import deferLater

    await deferLater(reactor, 0.01)


class UpstreamStartTLSTests(ProxyTestCase):
    """The connector's side of an upstream STARTTLS, with a toy protocol's exchange."""

    def setUp(self) -> None:
        super().setUp()
        self.pki = PKI(self)

    def starttls_server(self, name: str = "mail.test", after_go_ahead: bytes = b"") -> Any:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.pki.ca.issue_cert(name).configure_cert(context)

        def serve(conn: socket.socket) -> bytes:
            conn.sendall(b"220 plain greeting\r\n")
            command = b""
            while not command.endswith(b"\r\n"):
                command += conn.recv(1)
            conn.sendall(b"220 go ahead\r\n" + after_go_ahead)
            try:
                tls = context.wrap_socket(conn, server_side=True)
            except (ssl.SSLError, OSError) as e:
                return f"handshake failed: {e}".encode()
            line = b""
            while not line.endswith(b"\r\n"):
                line += tls.recv(1)
            tls.sendall(b"250 over TLS: " + line)
            return command + line

        return self.server(serve)

    def connector(self) -> UpstreamConnector:
        return UpstreamConnector(reactor, connect_timeout=5, tls=ClientTLS(self.pki.ca_file))

    async def test_starttls_exchange_then_verified_tls(self) -> None:
        server = self.starttls_server()
        route = Route(host="127.0.0.1", port=server.port, tls="starttls", server_name="mail.test")
        upstream = await Deferred.fromCoroutine(self.connector().connect([route], starttls=toy_starttls))
        self.assertTrue(upstream.protocol.tls)
        upstream.protocol.write(b"hello\r\n")
        self.assertEqual(await Deferred.fromCoroutine(upstream.protocol.read_line()), b"250 over TLS: hello\r\n")
        upstream.protocol.transport.loseConnection()
        self.assertEqual(await self.in_thread(server.result), b"STARTTLS\r\nhello\r\n")

    async def test_plaintext_after_the_go_ahead_fails_the_route(self) -> None:
        server = self.starttls_server(after_go_ahead=b"250 injected\r\n")
        route = Route(host="127.0.0.1", port=server.port, tls="starttls", server_name="mail.test")
        with self.assertRaises(UpstreamUnavailable) as caught:
            await Deferred.fromCoroutine(self.connector().connect([route], starttls=toy_starttls))
        [(_, why)] = caught.exception.failures
        self.assertEqual(why, "upstream sent 14 byte(s) after its STARTTLS answer, before TLS")

    async def test_a_certificate_for_another_name_fails_the_route(self) -> None:
        server = self.starttls_server(name="other.test")
        route = Route(host="127.0.0.1", port=server.port, tls="starttls", server_name="mail.test")
        with self.assertRaises(UpstreamUnavailable) as caught:
            await Deferred.fromCoroutine(self.connector().connect([route], starttls=toy_starttls))
        [(_, why)] = caught.exception.failures
        self.assertEqual(why, "TLS: the upstream certificate is not valid for mail.test")

    async def test_an_upstream_that_hangs_up_during_the_handshake_fails_the_route(self) -> None:
        def hangs_up(conn: socket.socket) -> None:
            conn.recv(100)  # the ClientHello, then nothing back

        server = self.server(hangs_up)
        route = Route(host="127.0.0.1", port=server.port, tls="tls", server_name="mail.test")
        with self.assertRaises(UpstreamUnavailable) as caught:
            await Deferred.fromCoroutine(self.connector().connect([route]))
        [(_, why)] = caught.exception.failures
        self.assertEqual(why, "TLS: upstream closed the connection during the handshake")


async def toy_starttls(upstream: UpstreamProtocol, route: Route) -> None:
    await expect(upstream, b"220", RuntimeError)
    upstream.write(b"STARTTLS\r\n")
    await expect(upstream, b"220", RuntimeError)


class UpstreamCertificateTests(ProxyTestCase):
    """Implicit TLS to an upstream whose certificate must not be trusted, for the name
    the route expects and from the CA mailrelay trusts unless said otherwise: the route
    fails with the reason, and the upstream sees its handshake refused. (A certificate
    for another name, or from another CA, is refused in tests/test_tls.py.)"""

    def setUp(self) -> None:
        super().setUp()
        self.pki = PKI(self)
        self.now = datetime.datetime.now(datetime.UTC)

    def tls_upstream(self, configure: Any) -> Any:
        """A TLS upstream whose context `configure(context)` gives its certificate; its
        result is what became of the handshake."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        configure(context)

        def serve(conn: socket.socket) -> str:
            try:
                with context.wrap_socket(conn, server_side=True) as tls:
                    return f"served: {tls.recv(100)!r}"
            except (ssl.SSLError, OSError) as e:
                return f"handshake failed: {e}"

        return self.server(serve)

    async def refusal(self, configure: Any) -> tuple[str, str]:
        """Why the connector refused the upstream `configure` sets up, and how the
        upstream's handshake ended."""
        server = self.tls_upstream(configure)
        route = Route(host="127.0.0.1", port=server.port, tls="tls", server_name="mail.test")
        connector = UpstreamConnector(reactor, connect_timeout=5, tls=ClientTLS(self.pki.ca_file))
        with self.assertRaises(UpstreamUnavailable) as caught:
            await Deferred.fromCoroutine(connector.connect([route]))
        [(_, why)] = caught.exception.failures
        return why, await self.in_thread(server.result)

    async def test_an_expired_certificate_fails_the_route(self) -> None:
        expired = self.pki.ca.issue_cert(
            "mail.test", not_before=self.now - datetime.timedelta(days=30), not_after=self.now - datetime.timedelta(days=1)
        )
        why, upstream = await self.refusal(expired.configure_cert)
        self.assertEqual(why, "TLS: certificate verify failed")
        self.assertIn("alert certificate expired", upstream)

    async def test_a_certificate_not_yet_valid_fails_the_route(self) -> None:
        early = self.pki.ca.issue_cert(
            "mail.test", not_before=self.now + datetime.timedelta(days=1), not_after=self.now + datetime.timedelta(days=30)
        )
        why, upstream = await self.refusal(early.configure_cert)
        self.assertEqual(why, "TLS: certificate verify failed")
        self.assertIn("alert bad certificate", upstream)

    async def test_a_self_signed_certificate_for_the_right_name_fails_the_route(self) -> None:
        # What a mailrelay without [tls] serves: a self-signed certificate for its name.
        own = self_signed_certificate("mail.test")
        pem = self.pki.path("self-signed.pem")
        with open(pem, "wb") as f:
            f.write(own.leaf.public_bytes(serialization.Encoding.PEM))
            f.write(
                own.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
            )
        why, upstream = await self.refusal(lambda context: context.load_cert_chain(pem))
        self.assertEqual(why, "TLS: certificate verify failed")
        self.assertIn("alert unknown ca", upstream)


class LoginDeadlineTests(ProxyTestCase):
    """`login_timeout` bounds each route's whole attempt; the route that overruns it is
    aborted, named with the stage it was stuck in, and the next one is tried. The
    connector's timers run on a Clock (`ClockedReactor`), advanced once it waits."""

    def setUp(self) -> None:
        super().setUp()
        self.clock = Clock()

    def clocked(self, connect_timeout: float, login_timeout: float) -> UpstreamConnector:
        return UpstreamConnector(
            ClockedReactor(reactor, self.clock), connect_timeout=connect_timeout, login_timeout=login_timeout
        )

    def silent(self) -> tuple[Any, threading.Event]:
        """An upstream that accepts and says nothing until mailrelay goes; an Event set on accept."""
        accepted = threading.Event()

        def serve(conn: socket.socket) -> bytes:
            accepted.set()
            try:
                return recv_all(conn)
            except OSError:  # mailrelay aborted the connection
                return b"aborted"

        return self.server(serve), accepted

    def assert_no_timer_left(self) -> None:
        left = [
            call
            for call in (*self.clock.getDelayedCalls(), *reactor.getDelayedCalls())
            if call.active() and not getattr(getattr(call, "func", None), "__module__", "").startswith("twisted.trial")
        ]
        self.assertEqual(left, [])

    async def test_a_silent_upstream_fails_its_route_with_its_stage_and_the_next_is_tried(self) -> None:
        (silent, _), working = self.silent(), self.server(greeter)
        routes = [Route(host="127.0.0.1", port=silent.port), Route(host="127.0.0.1", port=working.port)]
        connector = self.clocked(connect_timeout=10, login_timeout=30)
        connecting = Deferred.fromCoroutine(connector.connect(routes, login=ehlo_login, session_id="abc"))
        await self.eventually(lambda: reading_from(silent.port), "the connector did not connect to the silent upstream")
        self.clock.advance(30)
        upstream = await connecting
        self.assertEqual(upstream.route.port, working.port)
        self.assertIn(f"session abc: upstream 127.0.0.1:{silent.port} failed: no greeting within 30s", self.logs.lines())
        self.assertEqual(await self.in_thread(silent.result), b"aborted")
        upstream.protocol.transport.loseConnection()
        await self.in_thread(working.result)
        self.assert_no_timer_left()

    async def test_a_step_names_the_stage_it_waits_in(self) -> None:
        heard: list[bytes] = []

        def greets(conn: socket.socket) -> bytes:
            conn.sendall(b"220 hello\r\n")
            try:
                while data := conn.recv(100):
                    heard.append(data)
            except OSError:  # mailrelay aborted the connection
                pass
            return b"".join(heard)

        async def foo_login(upstream: UpstreamProtocol, route: Route) -> None:
            await expect(upstream, b"220")
            upstream.stage = "answer to FOO"
            upstream.write(b"FOO\r\n")
            await expect(upstream, b"250")

        server = self.server(greets)
        connector = self.clocked(connect_timeout=10, login_timeout=30)
        connecting = Deferred.fromCoroutine(connector.connect([Route(host="127.0.0.1", port=server.port)], login=foo_login))
        await self.eventually(lambda: heard, "the step did not say FOO")
        self.clock.advance(30)
        with self.assertRaises(UpstreamUnavailable) as caught:
            await connecting
        self.assertEqual(caught.exception.failures[0][1], "no answer to FOO within 30s")
        self.assertEqual(await self.in_thread(server.result), b"FOO\r\n")

    async def test_a_login_timeout_below_the_connect_timeout_bounds_the_connect(self) -> None:
        connector = self.clocked(connect_timeout=60, login_timeout=30)
        host, port = self.black_hole()
        connecting = Deferred.fromCoroutine(connector.connect([Route(host=host, port=port)]))
        await self.eventually(lambda: connecting_to(port), "the connector did not start connecting")
        self.clock.advance(30)  # a connection to the black hole is never answered
        with self.assertRaises(UpstreamUnavailable) as caught:
            await connecting
        self.assertEqual(caught.exception.failures[0][1], "no connection within 30s")
        self.assert_no_timer_left()

    async def test_the_callers_cancellation_aborts_the_attempt_and_tries_no_other_route(self) -> None:
        (silent, accepted), second = self.silent(), self.server(greeter)
        routes = [Route(host="127.0.0.1", port=silent.port), Route(host="127.0.0.1", port=second.port)]
        connector = UpstreamConnector(reactor, connect_timeout=5, login_timeout=30)
        connecting = Deferred.fromCoroutine(connector.connect(routes, login=ehlo_login))
        self.assertTrue(await self.in_thread(accepted.wait, 30))
        connecting.cancel()
        with self.assertRaises(CancelledError):
            await connecting
        self.assertEqual(await self.in_thread(silent.result), b"aborted")
        self.assertEqual(second.connections, 0)
        self.assertFalse(any("failed:" in line for line in self.logs.lines()))
        self.assert_no_timer_left()
