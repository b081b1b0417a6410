"""
The PROXY header mailrelay sends upstream (`Route.proxy_protocol`): its exact bytes
(v1, v2, TCP4, TCP6), its place (the very first bytes: before a TLS ClientHello, before
a STARTTLS exchange, on every route tried), that a client cannot choose the address it
carries, and real servers that believe it: Dovecot (`haproxy = yes`) and Postfix
(`smtpd_upstream_proxy_protocol = haproxy`), configured from the example files an
administrator would use (`examples/dovecot-proxy.conf`, `examples/postfix-proxy.cf`).
"""

from __future__ import annotations

import imaplib
import os
import re
import shutil
import smtplib
import socket
import ssl
import struct
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred

from mailrelay.connector import UpstreamConnector, UpstreamProtocol, UpstreamUnavailable
from mailrelay.router import Route
from mailrelay.tls_client import ClientTLS
from tests.support.dovecot import Dovecot
from tests.support.frontends import PASSWORD, USER, FrontEndTestCase, Router, password_check
from tests.support.net import WAIT, ProxyTestCase, read_line, recv_all, recv_exactly
from tests.support.pki import PKI
from tests.support.postfix import Postfix, split_delivered
from tests.support.servers import free_ports
from tests.support.smtp import BOB, MESSAGE, lf

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CLIENT = "127.0.0.2"
"""Where clients connect from: mailrelay connects upstream from 127.0.0.1, so an
upstream can only learn 127.0.0.2 from the header."""
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def v1(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    family = "TCP6" if ":" in source[0] else "TCP4"
    return f"PROXY {family} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n".encode()


def v2_tcp4(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """Written out from the spec (section 2.2), not with mailrelay's builder."""
    block = socket.inet_aton(source[0]) + socket.inet_aton(destination[0]) + struct.pack("!HH", source[1], destination[1])
    return V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", len(block)) + block


def recording(reply: bytes = b"") -> Any:
    """A ThreadedServer handler: everything until the client's end of stream, then (the
    other direction still open) `reply`."""

    def serve(conn: socket.socket) -> bytes:
        heard = recv_all(conn)
        conn.sendall(reply)
        return heard

    return serve


def send_and_close(port: int, data: bytes, source: str = CLIENT, host: str = "127.0.0.1") -> tuple[int, bytes]:
    """From `source`: send `data`, shut down writing, read until the end; (our port, what came back)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as conn:
        conn.settimeout(WAIT)
        conn.bind((source, 0))
        conn.connect((host, port))
        conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)
        return conn.getsockname()[1], recv_all(conn)


def splice_to(*routes: dict[str, Any], listen: str = "tcp:0:interface=127.0.0.1") -> dict[str, Any]:
    return {
        "router": {"type": "static", "routes": list(routes)},
        "listener": [{"name": "splice", "listen": listen, "mode": "splice"}],
    }


class SpliceTests(ProxyTestCase):
    """A splice listener in front of a recording upstream: the header, then the client's bytes."""

    async def test_v1_then_the_client_bytes_and_half_close_still_works(self) -> None:
        upstream = self.server(recording(b"upstream's answer after the client's end"))
        _, port = await self.start_proxy(splice_to({"host": "127.0.0.1", "port": upstream.port, "proxy_protocol": 1}))
        client_port, answer = await self.in_thread(send_and_close, port, b"hello\r\n")
        heard = await self.in_thread(upstream.result)
        self.assertEqual(heard, v1((CLIENT, client_port), ("127.0.0.1", port)) + b"hello\r\n")
        # The client's end of stream reached the upstream as a half-close, and its answer came back.
        self.assertEqual(answer, b"upstream's answer after the client's end")

    async def test_the_upstream_half_close_reaches_the_client_through_the_header_layer(self) -> None:
        def serve(conn: socket.socket) -> tuple[bytes, bytes, bytes]:
            header = read_line(conn)
            first = read_line(conn)
            conn.sendall(b"bye\r\n")
            conn.shutdown(socket.SHUT_WR)  # the upstream is done writing, still reading
            return header, first, recv_all(conn)

        def client(port: int) -> tuple[int, bytes, bytes]:
            with socket.create_connection(("127.0.0.1", port), WAIT, source_address=(CLIENT, 0)) as conn:
                conn.sendall(b"first\r\n")
                until_end = recv_all(conn)
                conn.sendall(b"after your end\r\n")
                conn.shutdown(socket.SHUT_WR)
                return conn.getsockname()[1], until_end, recv_all(conn)

        upstream = self.server(serve)
        _, port = await self.start_proxy(splice_to({"host": "127.0.0.1", "port": upstream.port, "proxy_protocol": 1}))
        client_port, until_end, after = await self.in_thread(client, port)
        self.assertEqual((until_end, after), (b"bye\r\n", b""))
        heard = await self.in_thread(upstream.result)
        self.assertEqual(heard, (v1((CLIENT, client_port), ("127.0.0.1", port)), b"first\r\n", b"after your end\r\n"))

    async def test_v2_bytes(self) -> None:
        upstream = self.server(recording())
        _, port = await self.start_proxy(splice_to({"host": "127.0.0.1", "port": upstream.port, "proxy_protocol": 2}))
        client_port, _ = await self.in_thread(send_and_close, port, b"\x00binary\xff")
        heard = await self.in_thread(upstream.result)
        self.assertEqual(heard, v2_tcp4((CLIENT, client_port), ("127.0.0.1", port)) + b"\x00binary\xff")
        self.assertEqual(len(heard), 28 + 8)

    async def test_an_ipv6_client_is_announced_as_tcp6(self) -> None:
        upstream = self.server(recording(), host="::1")
        config = splice_to({"host": "::1", "port": upstream.port, "proxy_protocol": 1}, listen=r"tcp6:0:interface=\:\:1")
        _, port = await self.start_proxy(config)
        client_port, _ = await self.in_thread(send_and_close, port, b"six\r\n", "::1", "::1")
        heard = await self.in_thread(upstream.result)
        self.assertEqual(heard, f"PROXY TCP6 ::1 ::1 {client_port} {port}\r\n".encode() + b"six\r\n")

    async def test_a_client_cannot_choose_the_address_by_sending_its_own_header(self) -> None:
        # A splice listener reads nothing of what the client says: its own PROXY line
        # (or v2 header) is data, after mailrelay's header with the real address.
        forged_v1 = b"PROXY TCP4 192.0.2.66 192.0.2.1 4444 143\r\n"
        forged_v2 = v2_tcp4(("192.0.2.66", 4444), ("192.0.2.1", 143))
        for version, forged in ((1, forged_v1), (2, forged_v2)):
            upstream = self.server(recording())
            _, port = await self.start_proxy(splice_to({"host": "127.0.0.1", "port": upstream.port, "proxy_protocol": version}))
            client_port, _ = await self.in_thread(send_and_close, port, forged + b"a LOGIN x y\r\n")
            heard = await self.in_thread(upstream.result)
            real = (v1 if version == 1 else v2_tcp4)((CLIENT, client_port), ("127.0.0.1", port))
            self.assertEqual(heard, real + forged + b"a LOGIN x y\r\n")

    async def test_a_trusted_inbound_header_is_what_the_upstream_is_told(self) -> None:
        # Behind a balancer (loopback is trusted by default): the client and the address
        # it connected to are the inbound header's, and so go on to the upstream.
        upstream = self.server(recording())
        config = splice_to({"host": "127.0.0.1", "port": upstream.port, "proxy_protocol": 2})
        config["listener"][0]["proxy_protocol"] = True
        _, port = await self.start_proxy(config)
        inbound = b"PROXY TCP4 203.0.113.7 198.51.100.25 5555 143\r\n"
        await self.in_thread(send_and_close, port, inbound + b"a LOGIN x y\r\n")
        heard = await self.in_thread(upstream.result)
        self.assertEqual(heard, v2_tcp4(("203.0.113.7", 5555), ("198.51.100.25", 143)) + b"a LOGIN x y\r\n")

    async def test_no_header_unless_the_route_asks(self) -> None:
        upstream = self.server(recording())
        _, port = await self.start_proxy(splice_to({"host": "127.0.0.1", "port": upstream.port}))
        await self.in_thread(send_and_close, port, b"PROXY TCP4 192.0.2.66 192.0.2.1 4444 143\r\n")
        self.assertEqual(await self.in_thread(upstream.result), b"PROXY TCP4 192.0.2.66 192.0.2.1 4444 143\r\n")


async def expect(upstream: UpstreamProtocol, code: bytes) -> None:
    line = await upstream.read_line()
    if not line.startswith(code):
        raise RuntimeError(f"expected {code!r}, upstream said {line!r}")


async def greeted(upstream: UpstreamProtocol, route: Route) -> None:
    """A login step: the greeting, and nothing more."""
    await expect(upstream, b"220")


async def starttls_step(upstream: UpstreamProtocol, route: Route) -> None:
    await expect(upstream, b"220")
    upstream.write(b"STARTTLS\r\n")
    await expect(upstream, b"220")


SOURCE, DESTINATION = (CLIENT, 40001), ("127.0.0.1", 993)
"""What the connector is told about the session (a front-end passes its connection's)."""


class ConnectorTests(ProxyTestCase):
    """The connector itself: where the header goes with TLS, STARTTLS and fallbacks."""

    def setUp(self) -> None:
        super().setUp()
        self.pki = PKI(self)
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.pki.ca.issue_cert("mail.test").configure_cert(self.context)

    def connector(self) -> UpstreamConnector:
        return UpstreamConnector(reactor, connect_timeout=WAIT, tls=ClientTLS(self.pki.ca_file), login_timeout=WAIT)

    async def test_the_header_precedes_the_tls_client_hello(self) -> None:
        header = v1(SOURCE, DESTINATION)

        def serve(conn: socket.socket) -> tuple[bytes, bytes, bytes]:
            before = recv_exactly(conn, len(header))
            # The first bytes after it, left in place for the handshake: a TLS record
            # of type handshake (0x16), version 3.x.
            record = conn.recv(2, socket.MSG_PEEK | socket.MSG_WAITALL)
            with self.context.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"220 over TLS\r\n")
                return before, record, read_line(tls)

        server = self.server(serve)
        route = Route(host="127.0.0.1", port=server.port, tls="tls", server_name="mail.test", proxy_protocol=1)
        upstream = await Deferred.fromCoroutine(
            self.connector().connect([route], login=greeted, client=SOURCE, local=DESTINATION)
        )
        upstream.protocol.write(b"hello\r\n")
        before, record, line = await self.in_thread(server.result)
        upstream.protocol.transport.loseConnection()
        self.assertEqual((before, record, line), (header, b"\x16\x03", b"hello\r\n"))

    async def test_the_header_precedes_the_greeting_of_a_starttls_route(self) -> None:
        header = v2_tcp4(SOURCE, DESTINATION)

        def serve(conn: socket.socket) -> tuple[bytes, bytes, bytes]:
            before = recv_exactly(conn, len(header))
            conn.sendall(b"220 plain greeting\r\n")
            command = read_line(conn)
            conn.sendall(b"220 go ahead\r\n")
            with self.context.wrap_socket(conn, server_side=True) as tls:
                return before, command, read_line(tls)

        server = self.server(serve)
        route = Route(host="127.0.0.1", port=server.port, tls="starttls", server_name="mail.test", proxy_protocol=2)
        upstream = await Deferred.fromCoroutine(
            self.connector().connect([route], starttls=starttls_step, client=SOURCE, local=DESTINATION)
        )
        # The handshake reached the protocol through the header's layer.
        self.assertTrue(upstream.protocol.tls)
        upstream.protocol.write(b"over TLS\r\n")
        self.assertEqual(await self.in_thread(server.result), (header, b"STARTTLS\r\n", b"over TLS\r\n"))
        upstream.protocol.transport.loseConnection()

    async def test_each_route_tried_gets_its_own_header(self) -> None:
        def hangs_up(conn: socket.socket) -> bytes:
            return recv_exactly(conn, len(v1(SOURCE, DESTINATION)))

        def greets(conn: socket.socket) -> bytes:
            header = recv_exactly(conn, 28)
            conn.sendall(b"220 second\r\n")
            return header + recv_all(conn)

        first, second = self.server(hangs_up), self.server(greets)
        routes = [
            Route(host="127.0.0.1", port=first.port, proxy_protocol=1),
            Route(host="127.0.0.1", port=second.port, proxy_protocol=2),
        ]
        upstream = await Deferred.fromCoroutine(self.connector().connect(routes, login=greeted, client=SOURCE, local=DESTINATION))
        self.assertEqual(upstream.route.port, second.port)
        upstream.protocol.transport.loseConnection()
        self.assertEqual(await self.in_thread(first.result), v1(SOURCE, DESTINATION))
        self.assertEqual(await self.in_thread(second.result), v2_tcp4(SOURCE, DESTINATION))

    async def test_without_addresses_the_header_says_unknown(self) -> None:
        # A caller that knows no IP addresses (a UNIX socket listener) lets the upstream
        # use the connection's own: v1 UNKNOWN, v2 with no address block.
        for version, expected in ((1, b"PROXY UNKNOWN\r\n"), (2, V2_SIGNATURE + b"\x21\x00\x00\x00")):
            server = self.server(recording())
            route = Route(host="127.0.0.1", port=server.port, proxy_protocol=version)
            upstream = await Deferred.fromCoroutine(
                self.connector().connect([route], client=("/run/mailrelay.sock", 0), local=("/run/mailrelay.sock", 0))
            )
            upstream.protocol.transport.loseConnection()
            self.assertEqual(await self.in_thread(server.result), expected)

    async def test_a_refused_route_is_still_reported_as_refused(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            dead = s.getsockname()[1]
        with self.assertRaises(UpstreamUnavailable) as caught:
            await Deferred.fromCoroutine(
                self.connector().connect([Route(host="127.0.0.1", port=dead, proxy_protocol=2)], client=SOURCE, local=DESTINATION)
            )
        self.assertEqual([why for _, why in caught.exception.failures], ["connection refused"])


# -- real servers, configured from the example files


def example(name: str) -> str:
    return (EXAMPLES / name).read_text()


def example_route(text: str) -> dict[str, Any]:
    """The mailrelay route an example file shows in its comments (the indented TOML
    after "#   [router]"), as a table."""
    lines = text.splitlines()
    start = lines.index("#   [router]")
    block = []
    for line in lines[start + 1 :]:
        if not line.startswith("#   "):
            break
        block.append(line[4:])
    return tomllib.loads("\n".join(block))


def dovecot_fragment(trusted: str, ports: dict[int, int]) -> str:
    """examples/dovecot-proxy.conf with our networks and ports (example's port -> ours)."""
    text = example("dovecot-proxy.conf")
    text, count = re.subn(r"(?m)^haproxy_trusted_networks = .*$", f"haproxy_trusted_networks = {trusted}", text)
    assert count == 1, "the example no longer sets haproxy_trusted_networks"
    for theirs, ours in ports.items():
        text, count = re.subn(rf"(?m)^(\s*port = ){theirs}$", rf"\g<1>{ours}", text)
        assert count == 1, f"the example no longer has a listener on port {theirs}"
    return text


@pytest.mark.slow
class DovecotTests(FrontEndTestCase):
    """mailrelay's IMAP listener in front of a Dovecot whose haproxy listeners come from
    examples/dovecot-proxy.conf, trusting loopback."""

    protocol = "imap"
    dovecot: Dovecot
    ports: dict[int, int]

    @classmethod
    def setUpClass(cls) -> None:
        cert, key = cls.upstream_pki("mailrelay-proxy-dovecot-", "imap.upstream.test")
        os.mkdir(f"{cls.directory}/dovecot")
        imap, imaps, pop3 = free_ports(3)
        cls.ports = {10143: imap, 10993: imaps, 10110: pop3}
        fragment = dovecot_fragment("127.0.0.0/8", cls.ports)
        users = {USER: PASSWORD, "bob@example.test": PASSWORD}
        cls.dovecot = Dovecot(f"{cls.directory}/dovecot", tls=(cert, key), users=users, extra_config=fragment)
        cls.dovecot.start()

    @classmethod
    def tearDownClass(cls) -> None:
        cls.dovecot.stop()
        shutil.rmtree(cls.directory, ignore_errors=True)

    async def log_in(self, config: dict[str, Any], user: str) -> str:
        """Log `user` in through mailrelay (from 127.0.0.2) with this config, and return Dovecot's login line."""
        _, port = await self.start_proxy(config)
        login = f"Login: user=<{user}>"
        before = self.dovecot.log_text().count(login)

        def client() -> None:
            imap = IMAPFrom("127.0.0.1", port, timeout=WAIT)
            imap.starttls(self.context)
            imap.login(user, PASSWORD)
            imap.logout()

        await self.in_thread(client)
        lines = await self.in_thread(self.dovecot.wait_for_log, login, before + 1)
        return str(lines[before])

    def router(self, **overrides: Any) -> dict[str, Any]:
        """The example's route, to our Dovecot."""
        route = example_route(example("dovecot-proxy.conf"))
        self.assertEqual(route["proxy_protocol"], 2)
        route.update(host="127.0.0.1", port=self.ports[route["port"]])
        route.update(overrides)
        return route

    async def test_dovecot_logs_the_client_address_from_mailrelay_header(self) -> None:
        config = {**self.front_end_config(), "router": self.router()}
        line = await self.log_in(config, USER)
        self.assertIn(f"rip={CLIENT},", line)

    async def test_v1_over_implicit_tls_to_the_haproxy_imaps_listener(self) -> None:
        router = self.router(
            port=self.ports[10993], proxy_protocol=1, tls="tls", server_name="imap.upstream.test", tls_ca=self.upstream_ca_file
        )
        line = await self.log_in({**self.front_end_config(), "router": router}, "bob@example.test")
        self.assertIn(f"rip={CLIENT},", line)
        self.assertIn("TLS", line)  # Dovecot's "secured" note: the login came over TLS

    async def test_a_client_s_own_header_through_a_splice_listener_is_only_a_bad_command(self) -> None:
        """The attack: a client of a raw splice listener (mailrelay reads nothing of it)
        starts with its own PROXY header claiming 10.9.9.9. Dovecot reads mailrelay's
        header first, so the client's is an IMAP command it does not know, and the login
        after it is logged from the client's real address."""
        router = {"type": "static", **self.router()}
        listener = {"name": "raw", "listen": "tcp:0:interface=127.0.0.1", "mode": "splice"}
        _, port = await self.start_proxy({"router": router, "listener": [listener]})
        login = f"Login: user=<{USER}>"
        before = self.dovecot.log_text().count(login)

        def client() -> list[bytes]:
            with socket.create_connection(("127.0.0.1", port), timeout=WAIT, source_address=(CLIENT, 0)) as conn:
                replies = [read_line(conn)]
                conn.sendall(b"PROXY TCP4 10.9.9.9 127.0.0.1 4711 143\r\n")
                replies.append(read_line(conn))
                conn.sendall(f'a1 LOGIN "{USER}" "{PASSWORD}"\r\n'.encode())
                while not (line := read_line(conn)).startswith(b"a1 ") and line:
                    pass
                replies.append(line)
                conn.sendall(b"a2 LOGOUT\r\n")
                return replies

        greeting, forged, logged_in = await self.in_thread(client)
        self.assertTrue(greeting.startswith(b"* OK"), greeting)
        self.assertTrue(forged.startswith(b"PROXY BAD"), forged)
        self.assertTrue(logged_in.startswith(b"a1 OK"), logged_in)
        lines = await self.in_thread(self.dovecot.wait_for_log, login, before + 1)
        self.assertIn(f"rip={CLIENT},", str(lines[before]))
        self.assertNotIn("10.9.9.9", self.dovecot.log_text())

    async def test_without_the_header_dovecot_sees_mailrelay(self) -> None:
        # The same login to Dovecot's ordinary listener, no header: mailrelay's address.
        # (What the tests above would see, were the header not sent or not believed.)
        router = self.router(port=self.dovecot.imap_port)
        del router["proxy_protocol"]
        line = await self.log_in({**self.front_end_config(), "router": router}, USER)
        self.assertIn("rip=127.0.0.1,", line)


class IMAPFrom(imaplib.IMAP4):
    """imaplib connecting from 127.0.0.2."""

    def _create_socket(self, timeout: Any) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout, source_address=(CLIENT, 0))


def postfix_fragment(port: int) -> str:
    """examples/postfix-proxy.cf's service (its comments dropped), on 127.0.0.1:`port`."""
    text = example("postfix-proxy.cf")
    service = "\n".join(line for line in text.splitlines() if line and not line.startswith("#")) + "\n"
    service, count = re.subn(r"(?m)^10025 ", f"127.0.0.1:{port} ", service)
    assert count == 1, "the example no longer has its smtpd on port 10025"
    return service


@pytest.mark.slow
class PostfixTests(FrontEndTestCase):
    """mailrelay's SMTP listener in front of a Postfix whose smtpd from
    examples/postfix-proxy.cf reads the header."""

    protocol = "smtp"
    postfix: Postfix
    proxied_port: int

    @classmethod
    def setUpClass(cls) -> None:
        cls.directory = tempfile.mkdtemp(prefix="mailrelay-proxy-postfix-")
        os.chmod(cls.directory, 0o755)
        os.mkdir(f"{cls.directory}/postfix")
        [cls.proxied_port] = free_ports(1)
        cls.postfix = Postfix(f"{cls.directory}/postfix", users=(USER, BOB), extra_master_cf=postfix_fragment(cls.proxied_port))
        cls.postfix.start()

    @classmethod
    def tearDownClass(cls) -> None:
        cls.postfix.stop()
        shutil.rmtree(cls.directory, ignore_errors=True)

    async def send(self, port: int) -> tuple[bytes, bytes]:
        """Through mailrelay (logged in, from 127.0.0.2), a message to bob; what Postfix delivered."""
        before = len(self.postfix.messages(BOB))
        relay = await self.proxy(Router(answer=password_check(port, login="none", **self.route_fields(port))))

        def client() -> Any:
            with smtplib.SMTP(
                "127.0.0.1", relay, local_hostname="client.example", timeout=WAIT, source_address=(CLIENT, 0)
            ) as smtp:
                smtp.starttls(context=self.context)
                smtp.ehlo()
                smtp.login(USER, PASSWORD)
                return smtp.sendmail(USER, [BOB], MESSAGE)

        self.assertEqual(await self.in_thread(client), {})
        files = await self.in_thread(self.postfix.wait_for_messages, BOB, before + 1)
        return split_delivered(files[before])

    def route_fields(self, port: int) -> dict[str, Any]:
        """The example's route fields (but its host and port) when sending to the proxied smtpd."""
        if port != self.proxied_port:
            return {}
        route = example_route(example("postfix-proxy.cf"))
        self.assertEqual((route.pop("type"), route.pop("port")), ("static", 10025))
        route.pop("host")
        return route

    async def test_postfix_names_the_client_from_mailrelay_header(self) -> None:
        trace, message = await self.send(self.proxied_port)
        self.assertEqual(message, lf(MESSAGE))
        self.assertIn(b"from client.example (unknown [127.0.0.2])", trace)
        self.assertRegex(self.postfix.log_text(), r"postfix/mailrelay/smtpd\[\d+\]: connect from unknown\[127\.0\.0\.2\]")

    async def test_without_the_header_postfix_sees_mailrelay(self) -> None:
        trace, _ = await self.send(self.postfix.port)
        self.assertIn(b" [127.0.0.1])", trace)
        self.assertNotIn(b"127.0.0.2", trace)
