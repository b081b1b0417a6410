"""
Listeners with `proxy_protocol = true` behind a (simulated) load balancer, over real
sockets on loopback: what the balancer's header says is who the client is, for the
Router, the session line, connection limits, auth_http and XCLIENT; and every way a
header can be wrong, late, or sent by someone who may not.
"""

from __future__ import annotations

import functools
import smtplib
import socket
import ssl
import threading
from typing import Any

import pytest
from twisted.internet import reactor, tcp
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.task import Clock
from twisted.logger import LogLevel

from mailrelay.config import parse_config
from mailrelay.proxied import ProxiedFactory, ProxyHeaderReceiver
from mailrelay.router import Route
from mailrelay.testing import RecordingRouter
from mailrelay.zerocopy import PIPE_SIZE
from tests.support.frontends import PASSWORD, USER, FrontEndTestCase, Router
from tests.support.httpauth import AuthService, ok
from tests.support.imap import ScriptedIMAP, read_tagged
from tests.support.net import (
    WAIT,
    ProxyTestCase,
    digest_after_eof,
    echo,
    exchange,
    payload,
    read_line,
    recv_all,
    sha,
    splice_config,
    zero_copy_pumps,
)
from tests.support.pki import PKI, client_context, client_hello
from tests.support.proxyheader import CLIENT, SERVER, V2_LOCAL, ProxiedSMTP, connect_proxied, receivers, v1, v2
from tests.support.smtp import MESSAGE, SMTPTestCase, password_check, raw_reply

MiB = 1 << 20


def proxied_splice(upstream_port: int, **listener: Any) -> dict[str, Any]:
    return splice_config(("127.0.0.1", upstream_port), proxy_protocol=True, **listener)


def received_so_far(counts: list[int]) -> bool:
    """Whether the connections reading a header have read `counts` bytes (in any order)."""
    return sorted(r._received for r in receivers()) == sorted(counts)


def ends(conn: socket.socket) -> bytes:
    """End our stream, then read everything until the peer closes (a reset, which may
    come first, counts as a close)."""
    try:
        conn.shutdown(socket.SHUT_WR)
        return recv_all(conn)
    except (ConnectionResetError, OSError):
        return b""


class ProxiedTestCase(ProxyTestCase):
    def refusals(self) -> list[str]:
        return [line for line in self.logs.lines() if "closed a connection from" in line]

    async def exchange_after(self, port: int, first: bytes, send: bytes = b"", host: str = "127.0.0.1") -> bytes:
        """Connect, send `first` then `send` (in one write), end the stream, and read to the end."""

        def client() -> bytes:
            try:
                conn = connect_proxied(port, first + send, host)
            except OSError:  # refused before our connect() returned, or while we sent
                return b""
            with conn:
                return ends(conn)

        received: bytes = await self.in_thread(client)
        return received


class AddressTests(ProxiedTestCase):
    """The header's client is the session's client, everywhere it is seen."""

    async def routed(self, first: bytes, host: str = "127.0.0.1") -> tuple[Any, bytes]:
        upstream = self.server(echo)
        router = RecordingRouter(Route(host="127.0.0.1", port=upstream.port))
        config = proxied_splice(upstream.port)
        if host == "::1":
            config["listener"][0]["listen"] = "tcp6:0:interface=\\:\\:1"
        _, port = await self.start_proxy(config, router=router)
        echoed = await self.exchange_after(port, first, b"hello through the balancer", host)
        [request] = router.requests
        return request, echoed

    async def test_v1_tcp4_names_the_client_and_what_follows_in_the_same_segment_is_relayed(self) -> None:
        request, echoed = await self.routed(v1())
        self.assertEqual((request.client, request.local), (CLIENT, SERVER))
        self.assertEqual(echoed, b"hello through the balancer")
        line = await self.session_line()
        self.assertEqual((line["client"], line["outcome"]), ("192.0.2.1:56324", "closed"))

    async def test_v2_tcp4(self) -> None:
        request, echoed = await self.routed(v2())
        self.assertEqual((request.client, request.local, echoed), (CLIENT, SERVER, b"hello through the balancer"))

    async def test_v1_and_v2_tcp6_over_an_ipv6_listener(self) -> None:
        source, destination = ("2001:db8::7", 4711), ("2001:db8::25", 993)
        for build in (v1, v2):
            request, _ = await self.routed(build(source, destination), host="::1")
            self.assertEqual((request.client, request.local), (source, destination))

    async def test_v2_local_keeps_the_real_addresses(self) -> None:
        request, echoed = await self.routed(V2_LOCAL)
        self.assertEqual((request.client[0], request.local[0]), ("127.0.0.1", "127.0.0.1"))
        self.assertNotEqual(request.client[1], 0)
        self.assertEqual(echoed, b"hello through the balancer")

    async def test_v1_unknown_keeps_the_real_addresses(self) -> None:
        request, _ = await self.routed(b"PROXY UNKNOWN whatever\r\n")
        self.assertEqual(request.client[0], "127.0.0.1")

    async def test_header_in_pieces(self) -> None:
        upstream = self.server(echo)
        router = RecordingRouter(Route(host="127.0.0.1", port=upstream.port))
        _, port = await self.start_proxy(proxied_splice(upstream.port), router=router)
        first = v2()
        conn = await self.in_thread(connect_proxied, port, b"")
        self.addCleanup(conn.close)
        for n in range(1, len(first)):
            await self.in_thread(conn.sendall, first[n - 1 : n])
            # Each byte is read on its own before the next is sent.
            await self.eventually(functools.partial(received_so_far, [n]), f"byte {n} not read")
        self.assertEqual((router.requests, self.logs.sessions()), ([], []))
        await self.in_thread(conn.sendall, first[-1:] + b"after")
        self.assertEqual(await self.in_thread(ends, conn), b"after")
        self.assertEqual([r.client for r in router.requests], [CLIENT])


class RefusalTests(ProxiedTestCase):
    """A connection without a valid header from a trusted peer never reaches the listener."""

    async def test_malformed_header_is_closed_and_logged_without_a_session(self) -> None:
        upstream = self.server(echo)
        router = RecordingRouter(Route(host="127.0.0.1", port=upstream.port))
        _, port = await self.start_proxy(proxied_splice(upstream.port), router=router)
        for first in (b"PROXY TCP4 192.0.2.1 198.51.100.7 56324 025\r\nhello", b"EHLO me\r\n", b"\r\n\r\n\0\r\nQUIT\n\x22"):
            self.assertEqual(await self.exchange_after(port, first), b"")
        self.assertEqual(router.requests, [])
        self.assertEqual(self.logs.sessions(), [])
        refusals = self.refusals()
        self.assertEqual(len(refusals), 3, refusals)
        self.assertIn("invalid PROXY header: destination port b'025' has a leading zero", refusals[0])
        self.assertIn("starts neither a v1 nor a v2 header", refusals[1])
        self.assertIn("command 2", refusals[2])
        self.assertEqual(upstream.connections, 0)

    async def test_untrusted_peer_is_closed_at_once(self) -> None:
        upstream = self.server(echo)
        router = RecordingRouter(Route(host="127.0.0.1", port=upstream.port))
        _, port = await self.start_proxy(proxied_splice(upstream.port, trusted_proxies=["192.0.2.0/24", "::1"]), router=router)
        self.assertEqual(await self.exchange_after(port, v1(), b"hello"), b"")
        self.assertEqual(router.requests, [])
        self.assertEqual(self.logs.sessions(), [])
        [refusal] = self.refusals()
        self.assertIn("from 127.0.0.1:", refusal)
        self.assertIn("not in trusted_proxies", refusal)

    async def test_untrusted_peer_that_waits_gets_a_clean_close(self) -> None:
        upstream = self.server(echo)
        _, port = await self.start_proxy(proxied_splice(upstream.port, trusted_proxies=["192.0.2.0/24"]))

        def wait_for_the_end() -> bytes:
            with connect_proxied(port, b"") as conn:
                return conn.recv(1024)  # a reset would raise ConnectionResetError

        self.assertEqual(await self.in_thread(wait_for_the_end), b"")
        self.assertEqual(len(self.refusals()), 1)

    async def test_trusted_network_other_than_loopback(self) -> None:
        """127.0.0.2 is trusted, 127.0.0.1 (the same machine) is not."""
        upstream = self.server(echo)
        router = RecordingRouter(Route(host="127.0.0.1", port=upstream.port))
        config = proxied_splice(upstream.port, trusted_proxies=["127.0.0.2"])
        config["listener"][0]["listen"] = "tcp:0:interface=0.0.0.0"
        _, port = await self.start_proxy(config, router=router)

        def from_address(source: str) -> bytes:
            try:
                conn = connect_proxied(port, v1() + b"hi", source=source)
            except OSError:
                return b""
            with conn:
                return ends(conn)

        self.assertEqual(await self.in_thread(from_address, "127.0.0.2"), b"hi")
        self.assertEqual(await self.in_thread(from_address, "127.0.0.1"), b"")
        self.assertEqual([r.client for r in router.requests], [CLIENT])

    async def test_incomplete_header_times_out_on_the_listeners_clock(self) -> None:
        clock = Clock()
        upstream = self.server(echo)
        router = RecordingRouter(Route(host="127.0.0.1", port=upstream.port))
        _, port = await self.start_proxy(proxied_splice(upstream.port, proxy_timeout=3), router=router, clock=clock)
        silent = await self.in_thread(connect_proxied, port, b"")
        self.addCleanup(silent.close)
        partial = await self.in_thread(connect_proxied, port, v1()[:20])
        self.addCleanup(partial.close)
        await self.eventually(functools.partial(received_so_far, [0, 20]), "connections not accepted")

        clock.advance(2.9)
        self.assertEqual(len(receivers()), 2)  # not yet
        clock.advance(0.1)

        self.assertEqual(await self.in_thread(ends, silent), b"")
        self.assertEqual(await self.in_thread(ends, partial), b"")
        refusals = self.refusals()
        self.assertEqual(len(refusals), 2, refusals)
        self.assertTrue(any(r.endswith("no complete PROXY header within 3s") for r in refusals), refusals)
        self.assertTrue(any(r.endswith("no complete PROXY header within 3s (20 bytes of it)") for r in refusals), refusals)
        self.assertEqual((router.requests, self.logs.sessions()), ([], []))

    async def test_connections_waiting_for_their_header_are_bounded_by_max_sessions(self) -> None:
        """Until its header is read a connection has no client to count it under: past
        `max_sessions` of them waiting, a new one is closed at once, one warning a burst."""
        upstream = self.server(echo)
        _, port = await self.start_proxy(proxied_splice(upstream.port, connection_limits={"max_sessions": 2}))
        silent = [await self.in_thread(connect_proxied, port, b"") for _ in range(2)]
        for conn in silent:
            self.addCleanup(conn.close)
        await self.eventually(functools.partial(received_so_far, [0, 0]), "connections not accepted")

        self.assertEqual(await self.exchange_after(port, v1(), b"hi"), b"")
        self.assertEqual(await self.exchange_after(port, v1(), b"hi"), b"")
        [refusal] = self.refusals()
        self.assertIn("2 connections are already waiting for their PROXY header (max_sessions)", refusal)

        silent.pop().close()
        await self.eventually(functools.partial(received_so_far, [0]), "the closed connection still waits")
        self.assertEqual(await self.exchange_after(port, v1(), b"hi"), b"hi")
        self.assertTrue(
            any("1 more connections closed while 2 were waiting for their PROXY header" in line for line in self.logs.lines()),
            self.logs.lines(),
        )
        await self.eventually(lambda: len(self.logs.sessions()) == 1, "no session line")
        self.assertEqual([(e["outcome"], e["client"]) for e in self.logs.sessions()], [("closed", "192.0.2.1:56324")])

    async def test_closing_without_a_byte_is_not_logged_but_inside_a_header_is(self) -> None:
        upstream = self.server(echo)
        _, port = await self.start_proxy(proxied_splice(upstream.port))
        self.assertEqual(await self.exchange_after(port, b""), b"")  # a TCP health check
        self.assertEqual(await self.exchange_after(port, b"PROXY TCP4 1.2."), b"")
        await self.eventually(lambda: receivers() == [], "connections still open")
        [refusal] = self.refusals()
        self.assertIn("it closed after 15 bytes of an incomplete PROXY header", refusal)
        self.assertEqual(self.logs.sessions(), [])

    async def test_a_header_on_a_listener_without_proxy_protocol_is_just_bad_input(self) -> None:
        """A splice listener passes it on like any bytes; the SMTP one is in SMTPTests."""
        upstream = self.server(echo)
        router = RecordingRouter(Route(host="127.0.0.1", port=upstream.port))
        _, port = await self.start_proxy(splice_config(("127.0.0.1", upstream.port)), router=router)
        self.assertEqual(await self.exchange_after(port, v1(), b"x"), v1() + b"x")
        self.assertEqual(router.requests[0].client[0], "127.0.0.1")


def test_trust_matches_ipv4_mapped_peers_and_trusts_unix_sockets() -> None:
    from twisted.internet.address import UNIXAddress

    listener = parse_config(
        {
            "router": {"type": "static", "host": "h", "port": 1},
            "listener": [{"listen": "tcp:0", "mode": "splice", "proxy_protocol": True}],
        }
    ).listeners[0]
    factory = ProxiedFactory(None, listener, Clock())  # type: ignore[arg-type]
    assert factory.trusts(IPv4Address("TCP", "127.9.9.9", 1))
    assert factory.trusts(IPv6Address("TCP", "::ffff:127.0.0.1", 1))
    assert factory.trusts(IPv6Address("TCP", "::1", 1))
    assert not factory.trusts(IPv6Address("TCP", "::ffff:192.0.2.1", 1))
    assert not factory.trusts(IPv4Address("TCP", "192.0.2.1", 1))
    assert not factory.trusts(IPv6Address("TCP", "::2", 1))
    assert factory.trusts(UNIXAddress(b"/run/mailrelay.sock"))
    assert isinstance(factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1)), ProxyHeaderReceiver)


class StreamTests(ProxiedTestCase):
    """Bytes, ends of stream and back-pressure pass through the wrapper as without it."""

    async def test_16_mib_each_way(self) -> None:
        upstream = self.server(echo)
        _, port = await self.start_proxy(proxied_splice(upstream.port))
        data = payload(16 * MiB)
        received = await self.in_thread(exchange, port, v2() + data)
        self.assertEqual((len(received), sha(received)), (len(data), sha(data)))
        line = await self.session_line()
        self.assertEqual((line["bytes_up"], line["bytes_down"]), (len(data), len(data)))

    async def test_client_end_of_stream_reaches_upstream_which_still_answers(self) -> None:
        upstream = self.server(digest_after_eof)
        _, port = await self.start_proxy(proxied_splice(upstream.port))
        question = payload(300_000)
        self.assertEqual(await self.in_thread(exchange, port, v1() + question), sha(question).encode())
        self.assertEqual(await self.in_thread(upstream.result), len(question))

    @pytest.mark.slow  # a second of the client's sending getting nowhere tells it stalled
    async def test_a_slow_upstream_pauses_the_client(self) -> None:
        await self._slow_upstream_pauses_the_client(zero_copy=True)

    @pytest.mark.slow
    async def test_a_slow_upstream_pauses_the_client_on_the_userspace_pump(self) -> None:
        await self._slow_upstream_pauses_the_client(zero_copy=False)

    async def _slow_upstream_pauses_the_client(self, zero_copy: bool) -> None:
        release = threading.Event()
        data = payload(64 * MiB)

        def slow_reader(conn: socket.socket) -> str:
            release.wait(WAIT)
            return sha(recv_all(conn))

        upstream = self.server(slow_reader)
        _, port = await self.start_proxy(proxied_splice(upstream.port, zero_copy=zero_copy))

        def send_until_stalled() -> tuple[socket.socket, int]:
            conn = connect_proxied(port, v2())
            conn.settimeout(1.0)
            sent = 0
            while sent < len(data):
                try:
                    sent += conn.send(data[sent : sent + MiB])
                except TimeoutError:
                    break
            return conn, sent

        conn, sent = await self.in_thread(send_until_stalled)
        self.addCleanup(conn.close)
        self.assertLess(sent, len(data) // 2)
        # What mailrelay holds for the upstream stays small: it stopped reading the client.
        if zero_copy:  # through the PROXY listener's transport, to the socket beneath
            [pump] = zero_copy_pumps()
            self.assertLessEqual(pump.in_flight, PIPE_SIZE)
        else:
            buffered = [
                len(s.dataBuffer) - s.offset + s._tempDataLen
                for s in set(reactor.getReaders()) | set(reactor.getWriters())
                if isinstance(s, tcp.Client)
            ]
            self.assertEqual(len(buffered), 1)
            self.assertLessEqual(buffered[0], 512 * 1024)

        release.set()

        def finish() -> None:
            conn.settimeout(WAIT)
            conn.sendall(data[sent:])
            ends(conn)

        await self.in_thread(finish)
        self.assertEqual(await self.in_thread(upstream.result), sha(data))


def tls_echo_in_one_segment(port: int, context: ssl.SSLContext, first: bytes) -> bytes:
    """A TLS client (Python's ssl over memory BIOs) whose first write is `first` and its
    ClientHello together; what its echo upstream sends back, decrypted."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="relay.test")

    def step(operation: Any) -> Any:
        """Run `operation` until it is done, carrying TLS records both ways."""
        while True:
            try:
                return operation()
            except ssl.SSLWantReadError:
                if pending := outgoing.read():
                    conn.sendall(pending)
                data = conn.recv(1 << 16)
                if not data:
                    raise ConnectionError("mailrelay closed the connection") from None
                incoming.write(data)

    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    with connect_proxied(port, first + outgoing.read()) as conn:
        step(tls.do_handshake)
        tls.write(b"decrypted by mailrelay")
        conn.sendall(outgoing.read())
        received = b""
        while len(received) < len(b"decrypted by mailrelay"):
            received += step(lambda: tls.read(100))
        return received


class TLSTests(ProxiedTestCase):
    """The header comes before any TLS: a `tls` listener's handshake, a splice listener's peek."""

    async def test_tls_listener_reads_the_header_then_handshakes(self) -> None:
        pki = PKI(self)
        issued = pki.issue("relay", "relay.test")
        upstream = self.server(echo)
        router = RecordingRouter(Route(host="127.0.0.1", port=upstream.port))
        config = {
            "tls": {"cert": issued.cert, "key": issued.key},
            "listener": [{"name": "tls", "listen": "tcp:0:interface=127.0.0.1", "mode": "tls", "proxy_protocol": True}],
        }
        _, port = await self.start_proxy(config, router=router)
        context = client_context(pki.ca)

        def client() -> bytes:
            with connect_proxied(port, v2()) as raw, context.wrap_socket(raw, server_hostname="relay.test") as tls:
                tls.sendall(b"decrypted by mailrelay")
                received = b""
                while len(received) < len(b"decrypted by mailrelay"):
                    received += tls.recv(100)
                return received

        self.assertEqual(await self.in_thread(client), b"decrypted by mailrelay")
        # Now the header and the ClientHello in one segment, as a balancer may send them.
        self.assertEqual(await self.in_thread(tls_echo_in_one_segment, port, context, v1()), b"decrypted by mailrelay")
        self.assertEqual([(r.client, r.local, r.tls, r.sni) for r in router.requests], [(CLIENT, SERVER, True, "relay.test")] * 2)

    async def test_splice_listener_peeks_the_client_hello_behind_the_header(self) -> None:
        upstream = self.server(echo)
        router = RecordingRouter(Route(host="127.0.0.1", port=upstream.port))
        _, port = await self.start_proxy(proxied_splice(upstream.port, preread_sni=True), router=router)
        hello = client_hello("mail.example.test")
        # In one segment: the header, and the hello the upstream must get unchanged.
        self.assertEqual(await self.exchange_after(port, v1(), hello), hello)
        [request] = router.requests
        self.assertEqual((request.client, request.sni), (CLIENT, "mail.example.test"))


class SMTPTests(SMTPTestCase):
    """A mail front-end behind the balancer: greeting, limits, XCLIENT, auth_http."""

    async def proxied_smtp_listener(self, router: Any, **listener: Any) -> tuple[Any, int]:
        service, port = await self.start_proxy(self.front_end_config("starttls", proxy_protocol=True, **listener), router=router)
        return service, port

    def smtp_via(self, port: int, first: bytes) -> smtplib.SMTP:
        client = ProxiedSMTP(first, "127.0.0.1", port, local_hostname="client.example", timeout=WAIT)
        client.starttls(context=self.context)
        client.ehlo()
        return client

    async def test_no_greeting_and_no_session_before_the_header(self) -> None:
        service, port = await self.proxied_smtp_listener(Router())
        conn = await self.in_thread(connect_proxied, port, b"")
        self.addCleanup(conn.close)
        await self.eventually(lambda: len(receivers()) == 1, "not accepted")
        self.assertEqual(len(service.sessions), 0)
        await self.in_thread(conn.sendall, v1()[:-1])
        await self.eventually(functools.partial(received_so_far, [len(v1()) - 1]), "not read")
        self.assertEqual(len(service.sessions), 0)
        await self.in_thread(conn.sendall, v1()[-1:])
        self.assertEqual(await self.in_thread(raw_reply, conn), b"220 relay.test ESMTP ready\r\n")
        self.assertEqual(len(service.sessions), 1)

    async def test_a_balancers_health_check_logs_quietly_unless_it_fails(self) -> None:
        """A LOCAL header (HAProxy's check-send-proxy) is the balancer speaking for
        itself: a check that ends well is logged at debug level, not once per check at
        info; one that fails still warns. A client's session stays at info."""
        _, port = await self.proxied_smtp_listener(Router())

        def check(first: bytes, say: bytes) -> bytes:
            with connect_proxied(port, first) as conn:
                greeting = raw_reply(conn)
                if say:
                    conn.sendall(say)
                    return greeting + raw_reply(conn)
                return greeting

        self.assertEqual(await self.in_thread(check, V2_LOCAL, b"QUIT\r\n"), b"220 relay.test ESMTP ready\r\n221 2.0.0 Bye\r\n")
        self.assertEqual(await self.in_thread(check, v1(), b"QUIT\r\n"), b"220 relay.test ESMTP ready\r\n221 2.0.0 Bye\r\n")
        await self.in_thread(check, V2_LOCAL, b"")  # gone after the greeting: not well
        await self.eventually(lambda: len(self.logs.sessions()) == 3, "session lines missing")
        seen = [(e["client"].split(":")[0], e["outcome"], e["log_level"]) for e in self.logs.sessions()]
        self.assertEqual(
            seen,
            [
                ("127.0.0.1", "closed", LogLevel.debug),
                ("192.0.2.1", "closed", LogLevel.info),
                ("127.0.0.1", "client-gone", LogLevel.warn),
            ],
        )

    async def test_xclient_names_the_headers_client(self) -> None:
        upstream = self.upstream(users={})
        router = Router(answer=password_check(upstream.port, login="xclient"))
        _, port = await self.proxied_smtp_listener(router)

        def client() -> None:
            with self.smtp_via(port, v2()) as smtp:
                smtp.login(USER, PASSWORD)
                smtp.sendmail(USER, ["bob@example.test"], MESSAGE)

        await self.in_thread(client)
        heard = await self.in_thread(upstream.result)
        self.assertEqual(
            heard.lines[1],
            b"XCLIENT ADDR=192.0.2.1 PORT=56324 NAME=[UNAVAILABLE] HELO=client.example PROTO=ESMTP"
            b" DESTADDR=198.51.100.7 DESTPORT=25 LOGIN=alice@example.test\r\n",
        )
        self.assertEqual(heard.messages, [MESSAGE])
        self.assertEqual([r.client for r in router.requests], [CLIENT])
        line = await self.session_line()
        self.assertEqual((line["client"], line["user"]), ("192.0.2.1:56324", USER))

    async def test_auth_http_is_told_the_headers_client(self) -> None:
        upstream = self.upstream(users={})
        service = AuthService(ok("127.0.0.1", upstream.port))
        self.addCleanup(service.close)
        config = self.front_end_config("starttls", proxy_protocol=True)
        config["router"] = {"type": "http", "url": service.url, "timeout": 5}
        _, port = await self.start_proxy(config)

        def client() -> Any:
            with self.smtp_via(port, v1(("2001:db8::7", 4711), ("2001:db8::25", 587))) as smtp:
                return smtp.login(USER, PASSWORD)

        self.assertEqual((await self.in_thread(client))[0], 235)
        [seen] = service.requests
        self.assertEqual(seen.get("Client-IP"), "2001:db8::7")
        heard = await self.in_thread(upstream.result)
        self.assertTrue(heard.lines[1].startswith(b"XCLIENT ADDR=IPV6:2001:db8::7 PORT=4711 "), heard.lines[1])

    async def test_connection_limits_count_the_headers_client(self) -> None:
        _, port = await self.proxied_smtp_listener(Router(), connection_limits={"max_per_client": 1})

        def greeting(first: bytes) -> bytes:
            conn = connect_proxied(port, first)
            self.addCleanup(conn.close)
            return raw_reply(conn)

        first = await self.in_thread(greeting, v1(("192.0.2.1", 1000)))
        other = await self.in_thread(greeting, v1(("192.0.2.2", 1000)))
        again = await self.in_thread(greeting, v1(("192.0.2.1", 1001)))
        self.assertEqual((first[:4], other[:4], again[:4]), (b"220 ", b"220 ", b"421 "))

    async def test_a_header_on_a_listener_without_proxy_protocol_is_an_unknown_command(self) -> None:
        _, port = await self.start_proxy(self.front_end_config("starttls"), router=Router())

        def client() -> tuple[bytes, bytes]:
            with connect_proxied(port, b"") as conn:
                raw_reply(conn)
                conn.sendall(v1())
                refused = raw_reply(conn)
                conn.sendall(b"QUIT\r\n")
                return refused, raw_reply(conn)

        refused, bye = await self.in_thread(client)
        self.assertTrue(refused.startswith(b"5"), refused)
        self.assertTrue(bye.startswith(b"221 "), bye)
        self.assertNotIn("Traceback", "\n".join(self.logs.lines()))

    async def test_login_limits_count_the_headers_client(self) -> None:
        upstream = self.upstream()
        router = Router(answer=password_check(upstream.port))
        config = self.front_end_config("starttls", proxy_protocol=True)
        config["login_limits"] = {"max_per_client": 2, "max_per_user": 100, "delay": 0}
        _, port = await self.start_proxy(config, router=router)

        def log_in(first: bytes, password: str) -> int:
            with self.smtp_via(port, first) as smtp:
                smtp.user, smtp.password = USER, password
                try:
                    return smtp.auth("PLAIN", smtp.auth_plain)[0]
                except (smtplib.SMTPAuthenticationError, smtplib.SMTPServerDisconnected) as e:
                    return getattr(e, "smtp_code", 0)

        guessing, other = v1(("192.0.2.66", 1)), v1(("192.0.2.1", 1))
        codes = [await self.in_thread(log_in, guessing, "bad") for _ in range(2)]
        codes.append(await self.in_thread(log_in, guessing, PASSWORD))
        codes.append(await self.in_thread(log_in, other, PASSWORD))
        self.assertEqual(codes, [535, 535, 421, 235])
        self.assertEqual([r.client[0] for r in router.requests], ["192.0.2.66"] * 2 + ["192.0.2.1"])


class IMAPTests(FrontEndTestCase):
    protocol = "imap"

    async def test_imap_id_forwards_the_headers_client_over_implicit_tls(self) -> None:
        upstream = self.server(ScriptedIMAP(users={USER: PASSWORD}))
        router = Router(port=upstream.port, forward_client=True)
        _, port = await self.start_proxy(self.front_end_config("tls", proxy_protocol=True), router=router)

        def client() -> bytes:
            with connect_proxied(port, v2()) as raw, self.context.wrap_socket(raw, server_hostname="relay.test") as conn:
                read_line(conn)
                conn.sendall(b"a LOGIN alice@example.test s3cret-Pa55\r\nz LOGOUT\r\n")
                return read_tagged(conn, b"a")

        self.assertIn(b"a OK ", await self.in_thread(client))
        heard = await self.in_thread(upstream.result)
        self.assertIn(
            b'"x-originating-ip" "192.0.2.1" "x-originating-port" "56324"'
            b' "x-connected-ip" "198.51.100.7" "x-connected-port" "25"',
            heard.commands[0],
        )
        self.assertEqual([r.client for r in router.requests], [CLIENT])
