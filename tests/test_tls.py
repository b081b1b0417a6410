"""
TLS end to end: certificates served by SNI, protocol versions, reload, verified upstream
TLS, handshake failures, SNI preread in splice mode, client certificates and ALPN. Real
sockets on loopback, Python's `ssl` module as the client and as TLS upstreams (in
threads), mailrelay in the reactor, certificates from `trustme`.
"""

from __future__ import annotations

import functools
import hashlib
import os
import select
import shutil
import socket
import ssl
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import Clock, deferLater
from twisted.logger import LogEvent, LogLevel, formatEvent
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

from mailrelay import ConfigError, Route, Router, RouteRequest, makeService
from mailrelay.tls import CertificateFiles, ServerTLS, ServerTLSConfig
from mailrelay.tls_facts import ALPNRefused, describe_tls_error
from tests.support.clocked import all_read
from tests.support.net import WAIT, ProxyTestCase, connect, echo, payload, recv_all, recv_exactly, sha, tcp_port
from tests.support.pki import PKI, Issued, client_hello, common_name, dns_names, tls_server

MiB = 1 << 20
LISTEN = "tcp:0:interface=127.0.0.1"


# --- certificates -------------------------------------------------------------------


# --- clients and upstreams (blocking, run in threads) --------------------------------


def client_context(ca_file: str | None, check_hostname: bool = True, cert: Issued | None = None) -> ssl.SSLContext:
    """A TLS client context trusting only `ca_file` (None: verifying nothing)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if ca_file is None:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context.load_verify_locations(ca_file)
        context.check_hostname = check_hostname
    if cert is not None:
        context.load_cert_chain(cert.cert, cert.key)
    return context


def legacy_context(version: ssl.TLSVersion, ca_file: str | None = None, server: Issued | None = None) -> ssl.SSLContext:
    """A context that speaks exactly `version` (TLS 1.0 or 1.1, with their old suites)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "ssl.TLSVersion.TLSv1_1 is deprecated"
        context.minimum_version = version
        context.maximum_version = version
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    if server is not None:
        context.load_cert_chain(server.cert, server.key)
    elif ca_file is not None:
        context.load_verify_locations(ca_file)
        context.check_hostname = False
    return context


def python_ssl_speaks(version: ssl.TLSVersion, pki: PKI) -> str | None:
    """Whether Python's own OpenSSL can complete a `version` handshake with itself
    (None), or why not: a client that cannot offer it proves nothing when refused."""
    issued = pki.issue(f"probe-{version.name}", "probe.test")
    server_context = legacy_context(version, server=issued)
    client = legacy_context(version, ca_file=pki.ca_file)
    left, right = socket.socketpair()
    left.settimeout(WAIT)
    right.settimeout(WAIT)
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            with server_context.wrap_socket(left, server_side=True):
                pass
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with client.wrap_socket(right, server_hostname="probe.test") as tls:
            spoken = tls.version()
    except ssl.SSLError as e:
        return f"{ssl.OPENSSL_VERSION} (Python's ssl) cannot do {version.name} with itself: {e}"
    finally:
        thread.join(WAIT)
    if errors or spoken is None:
        return f"{ssl.OPENSSL_VERSION} (Python's ssl) cannot do {version.name} with itself: {errors or spoken}"
    return None


def tls_connect(port: int, context: ssl.SSLContext, server_name: str | None) -> ssl.SSLSocket:
    return context.wrap_socket(connect(port), server_hostname=server_name)


def certificate_seen(port: int, context: ssl.SSLContext, server_name: str | None) -> x509.Certificate:
    """The certificate a client asking for `server_name` is served."""
    with tls_connect(port, context, server_name) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def tls_echo(port: int, context: ssl.SSLContext, server_name: str | None, message: bytes) -> bytes:
    """Handshake, send `message`, read back as many bytes."""
    with tls_connect(port, context, server_name) as tls:
        tls.sendall(message)
        return recv_exactly(tls, len(message))


def refused(port: int, context: ssl.SSLContext, server_name: str | None) -> str:
    """Connect, try to have a byte echoed; return how that failed (raise if it worked)."""
    try:
        with tls_connect(port, context, server_name) as tls:
            # TLS 1.3: a client finishes its handshake before the server has judged its
            # certificate; the refusal arrives as an alert on the first read.
            tls.sendall(b"x")
            data = tls.recv(1)
    except ssl.SSLError as e:
        return f"SSLError: {e.reason or e}"
    except (ConnectionResetError, BrokenPipeError) as e:
        return type(e).__name__
    if data:
        raise AssertionError(f"the client was served: {data!r}")
    return "closed"


def closed_by_peer(conn: socket.socket) -> str:
    """Wait (10 s hang guard) for the peer to close: "eof" or "reset"."""
    conn.settimeout(10)
    try:
        while conn.recv(1 << 16):
            pass
    except ConnectionResetError:
        return "reset"
    return "eof"


def duplex(conn: socket.socket, send: bytes, expect: int) -> bytes:
    """
    Send `send` while receiving `expect` bytes, both in this one thread (an SSLSocket
    must not be read and written from two threads at once). What is received is shorter
    than `expect` only if the peer closed first.
    """
    is_tls = isinstance(conn, ssl.SSLSocket)
    chunk = 16384 if is_tls else 1 << 18
    view = memoryview(send)
    sent = 0
    received = bytearray()
    eof = False
    deadline = time.monotonic() + WAIT
    conn.setblocking(False)
    try:
        while sent < len(send) or (len(received) < expect and not eof):
            if time.monotonic() > deadline:
                raise TimeoutError(f"duplex: sent {sent}/{len(send)}, received {len(received)}/{expect}")
            want_read = want_write = False
            while len(received) < expect and not eof:
                try:
                    data = conn.recv(min(1 << 17, expect - len(received)))
                except (ssl.SSLWantReadError, BlockingIOError):
                    want_read = True
                    break
                except ssl.SSLWantWriteError:
                    want_write = True
                    break
                if data:
                    received += data
                else:
                    eof = True
            while sent < len(send):
                try:
                    # A refused TLS write must be retried with the same bytes: it is.
                    sent += conn.send(view[sent : sent + chunk])
                except (ssl.SSLWantWriteError, BlockingIOError):
                    want_write = True
                    break
                except ssl.SSLWantReadError:
                    want_read = True
                    break
            if want_read or want_write:
                select.select([conn] if want_read else [], [conn] if want_write else [], [], 0.5)
    finally:
        conn.settimeout(WAIT)
    return bytes(received)


def named_echo(name: str, tls: ssl.SSLSocket) -> tuple[str, int]:
    """`echo`, and the name of the server that did it."""
    return name, echo(tls)


def swap(send: bytes, expect: int) -> Callable[[socket.socket], tuple[str, int]]:
    """Upstream handler: send `send` while reading `expect` bytes; answer (sha, length) of those."""

    def handle(conn: socket.socket) -> tuple[str, int]:
        received = duplex(conn, send, expect)
        return sha(received), len(received)

    return handle


# --- mailrelay side -----------------------------------------------------------------


class RecordingRouter(Router):
    """Routes with `choose(request)` and keeps every request."""

    def __init__(self, choose: Callable[[RouteRequest], Any]) -> None:
        self.choose = choose
        self.requests: list[RouteRequest] = []

    def route(self, request: RouteRequest) -> Any:
        self.requests.append(request)
        return self.choose(request)


def to(port: int, **fields: Any) -> Callable[[RouteRequest], Route]:
    return lambda request: Route(host="127.0.0.1", port=port, **fields)


def tls_listener(tls: dict[str, Any] | None, **listener: Any) -> dict[str, Any]:
    """A `tls` listener (protocol none) on a free loopback port; route with router=."""
    config: dict[str, Any] = {"drain_timeout": 5, "listener": [{"name": "tls", "listen": LISTEN, "mode": "tls", **listener}]}
    if tls is not None:
        config["tls"] = tls
    return config


def splice_listener(**listener: Any) -> dict[str, Any]:
    return {"drain_timeout": 5, "listener": [{"name": "splice", "listen": LISTEN, "mode": "splice", **listener}]}


def static_tls_route(port: int, ca: str | None = None, **route: Any) -> dict[str, Any]:
    """A splice listener routed statically to a TLS upstream on `port`."""
    config = splice_listener()
    config["router"] = {"type": "static", "host": "127.0.0.1", "port": port, "tls": "tls", **route}
    if ca is not None:
        config["upstream"] = {"ca": ca}
    return config


class TLSTestCase(ProxyTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.pki = PKI(self)

    async def session_lines(self, count: int = 1) -> list[LogEvent]:
        """The session lines, once there are at least `count` (hang guard: WAIT)."""
        deadline = time.monotonic() + WAIT
        while len(self.logs.sessions()) < count:
            if time.monotonic() > deadline:
                self.fail(f"expected {count} session line(s), got {self.logs.lines()}")
            await deferLater(reactor, 0.02)
        return self.logs.sessions()

    async def last_session(self, count: int = 1) -> LogEvent:
        return (await self.session_lines(count))[-1]

    def log_lines(self, containing: str) -> list[LogEvent]:
        return [e for e in self.logs.events if containing in formatEvent(e)]


# --- 1. SNI ---------------------------------------------------------------------------


class SNITests(TLSTestCase):
    async def test_each_name_gets_its_certificate_and_anything_else_the_default(self) -> None:
        default = self.pki.issue("default", "mail.test")
        other = self.pki.issue("other", "mail.other.test", "alias.other.test")
        wild = self.pki.issue("wild", "*.wild.test")
        upstream = self.server(echo)
        router = RecordingRouter(to(upstream.port))
        tls = {
            "cert": default.cert,
            "key": default.key,
            "sni": [
                {"cert": other.pem},  # key: the same file; names: from the certificate's SAN
                {"cert": wild.cert, "key": wild.key, "names": "*.wild.test"},
            ],
        }
        _, port = await self.start_proxy(tls_listener(tls), router=router)
        verifying = client_context(self.pki.ca_file, check_hostname=False)

        seen = {}
        for name in ["mail.test", "mail.other.test", "alias.other.test", "x.wild.test", "a.b.wild.test", "wild.test", None]:
            certificate = await self.in_thread(certificate_seen, port, verifying, name)
            seen[name] = dns_names(certificate)

        self.assertEqual(
            seen,
            {
                "mail.test": ["mail.test"],
                "mail.other.test": ["mail.other.test", "alias.other.test"],
                "alias.other.test": ["mail.other.test", "alias.other.test"],
                "x.wild.test": ["*.wild.test"],
                "a.b.wild.test": ["mail.test"],  # a wildcard is one label deep
                "wild.test": ["mail.test"],
                None: ["mail.test"],
            },
        )
        # With its hostname check on, a client accepts what it is served.
        checking = client_context(self.pki.ca_file)
        for name in ["mail.test", "alias.other.test", "x.wild.test"]:
            message = b"hello " + name.encode()
            self.assertEqual(await self.in_thread(tls_echo, port, checking, name, message), message)
        await self.session_lines(10)
        self.assertEqual(
            [(r.tls, r.sni, r.client_cert) for r in router.requests],
            [(True, name, None) for name in seen] + [(True, n, None) for n in ["mail.test", "alias.other.test", "x.wild.test"]],
        )
        # What the handshake settled reaches the router too (Python's client speaks TLS 1.3 here).
        self.assertEqual({r.tls_version for r in router.requests}, {"TLSv1.3"})
        self.assertTrue(all(r.tls_cipher and r.tls_cipher.startswith("TLS_") for r in router.requests))


# --- 2. protocol versions ------------------------------------------------------------


LEGACY = [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1]


class VersionTests(TLSTestCase):
    def check_python_ssl(self, version: ssl.TLSVersion) -> None:
        why = python_ssl_speaks(version, self.pki)
        if why is not None:
            self.fail(why + ": this test needs a client that offers it")

    async def test_tls_1_0_and_1_1_are_refused_by_default_and_1_2_works(self) -> None:
        default = self.pki.issue("default", "mail.test")
        upstream = self.server(echo)
        _, port = await self.start_proxy(tls_listener({"cert": default.pem}), router=RecordingRouter(to(upstream.port)))

        for version in LEGACY:
            await self.in_thread(self.check_python_ssl, version)
            client = legacy_context(version, self.pki.ca_file)
            how = await self.in_thread(refused, port, client, "mail.test")
            self.assertEqual(how, "SSLError: TLSV1_ALERT_PROTOCOL_VERSION")
        lines = await self.session_lines(2)
        self.assertEqual(
            [(e["outcome"], e["reason"]) for e in lines],
            [("tls-failed", "TLS: unsupported protocol (the TLS versions the peer offers are below min_version)")] * 2,
        )

        tls12 = client_context(self.pki.ca_file)
        tls12.minimum_version = tls12.maximum_version = ssl.TLSVersion.TLSv1_2

        def speak_tls12() -> tuple[str | None, bytes]:
            with tls_connect(port, tls12, "mail.test") as tls:
                tls.sendall(b"1.2")
                return tls.version(), recv_exactly(tls, 3)

        self.assertEqual(await self.in_thread(speak_tls12), ("TLSv1.2", b"1.2"))

    async def test_min_version_1_0_lets_the_same_old_clients_in(self) -> None:
        default = self.pki.issue("default", "mail.test")
        upstream = self.server(echo)
        tls = {"cert": default.pem, "min_version": "1.0"}
        _, port = await self.start_proxy(tls_listener(tls), router=RecordingRouter(to(upstream.port)))

        for version, name in [(ssl.TLSVersion.TLSv1, "TLSv1"), (ssl.TLSVersion.TLSv1_1, "TLSv1.1")]:
            await self.in_thread(self.check_python_ssl, version)
            client = legacy_context(version, self.pki.ca_file)

            def speak(client: ssl.SSLContext = client) -> tuple[str | None, bytes]:
                with tls_connect(port, client, "mail.test") as tls:
                    tls.sendall(b"old")
                    return tls.version(), recv_exactly(tls, 3)

            self.assertEqual(await self.in_thread(speak), (name, b"old"))


# --- 3. reload ------------------------------------------------------------------------


class ReloadTests(TLSTestCase):
    async def test_reload_serves_new_clients_the_new_certificate_and_keeps_it_when_broken(self) -> None:
        first = self.pki.issue("first", "mail.test", common_name="first")
        second = self.pki.issue("second", "mail.test", common_name="second")
        cert_file, key_file = self.pki.path("served.crt"), self.pki.path("served.key")
        shutil.copyfile(first.cert, cert_file)
        shutil.copyfile(first.key, key_file)
        upstream = self.server(echo)
        service, port = await self.start_proxy(
            tls_listener({"cert": cert_file, "key": key_file}), router=RecordingRouter(to(upstream.port))
        )
        checking = client_context(self.pki.ca_file)

        session = await self.in_thread(tls_connect, port, checking, "mail.test")
        self.addCleanup(session.close)
        await self.in_thread(session.sendall, b"before")
        self.assertEqual(await self.in_thread(recv_exactly, session, 6), b"before")

        shutil.copyfile(second.cert, cert_file)
        shutil.copyfile(second.key, key_file)
        await service.reload()

        await self.in_thread(session.sendall, b"after reload")
        self.assertEqual(await self.in_thread(recv_exactly, session, 12), b"after reload")
        seen = await self.in_thread(certificate_seen, port, checking, "mail.test")
        self.assertEqual((common_name(seen), seen.serial_number), ("second", second.x509.serial_number))
        self.assertNotEqual(first.x509.serial_number, second.x509.serial_number)

        with open(cert_file, "wb") as f:
            f.write(b"this is no certificate\n" + os.urandom(64))
        await service.reload()

        [error] = [e for e in self.logs.events if e.get("log_level") == LogLevel.error]
        self.assertIn(cert_file, formatEvent(error))
        self.assertIn("TLS reload failed", formatEvent(error))
        seen = await self.in_thread(certificate_seen, port, checking, "mail.test")
        self.assertEqual((common_name(seen), seen.serial_number), ("second", second.x509.serial_number))
        await self.in_thread(session.sendall, b"still")
        self.assertEqual(await self.in_thread(recv_exactly, session, 5), b"still")


# --- 4. upstream TLS ------------------------------------------------------------------


class UpstreamTLSTests(TLSTestCase):
    async def test_bytes_reach_a_verified_tls_upstream_unchanged_both_ways(self) -> None:
        up, down = payload(MiB), payload(MiB)
        issued = self.pki.issue("upstream", "mail.test")
        upstream = self.server(tls_server(issued, swap(down, len(up))))
        _, port = await self.start_proxy(static_tls_route(upstream.port, ca=self.pki.ca_file, server_name="mail.test"))

        def client() -> bytes:
            with connect(port) as conn:
                return duplex(conn, up, len(down))

        received = await self.in_thread(client)
        self.assertEqual((sha(received), len(received)), (sha(down), len(down)))
        self.assertEqual(await self.in_thread(upstream.result), (sha(up), len(up)))
        line = await self.last_session()
        self.assertEqual((line["outcome"], line["upstream"]), ("closed", f"127.0.0.1:{upstream.port}"))

    async def assert_upstream_refused(self, port: int) -> str:
        """The client is closed without a byte; returns the session line's reason."""

        def client() -> bytes:
            with connect(port) as conn:
                conn.sendall(b"EHLO client\r\n")
                try:
                    return conn.recv(1 << 16)  # b"" when closed; an echo if it was not refused
                except ConnectionResetError:
                    return b""

        self.assertEqual(await self.in_thread(client), b"")
        line = await self.last_session()
        self.assertEqual(line["outcome"], "upstream-unavailable")
        return str(line["reason"])

    async def test_wrong_name_is_refused(self) -> None:
        issued = self.pki.issue("upstream", "other.test")
        upstream = self.server(tls_server(issued, echo))
        _, port = await self.start_proxy(static_tls_route(upstream.port, ca=self.pki.ca_file, server_name="mail.test"))

        reason = await self.assert_upstream_refused(port)
        self.assertEqual(reason, f"127.0.0.1:{upstream.port}: TLS: the upstream certificate is not valid for mail.test")

    async def test_untrusted_ca_is_refused(self) -> None:
        stranger = trustme.CA(organization_name="not trusted")
        issued = self.pki.issue("upstream", "mail.test", ca=stranger)
        upstream = self.server(tls_server(issued, echo))
        _, port = await self.start_proxy(static_tls_route(upstream.port, ca=self.pki.ca_file, server_name="mail.test"))

        reason = await self.assert_upstream_refused(port)
        self.assertEqual(reason, f"127.0.0.1:{upstream.port}: TLS: certificate verify failed")

    async def test_unverified_upstream_works_and_is_warned_about_once(self) -> None:
        issued = self.pki.issue("upstream", "other.test")
        upstream = self.server(tls_server(issued, echo))
        config = static_tls_route(upstream.port, ca=self.pki.ca_file, server_name="mail.test", tls_verify=False)
        _, port = await self.start_proxy(config)

        def client(message: bytes) -> bytes:
            with connect(port) as conn:
                conn.sendall(message)
                return recv_exactly(conn, len(message))

        self.assertEqual(await self.in_thread(client, b"first session"), b"first session")
        self.assertEqual(await self.in_thread(client, b"second session"), b"second session")
        lines = await self.session_lines(2)
        self.assertEqual([e["outcome"] for e in lines], ["closed", "closed"])
        [warning] = self.log_lines("NOT verified")
        self.assertEqual(warning["log_level"], LogLevel.warn)
        self.assertIn(f"127.0.0.1:{upstream.port}", formatEvent(warning))

    async def test_route_tls_ca_overrides_upstream_ca(self) -> None:
        stranger = trustme.CA(organization_name="another CA")
        stranger_file = self.pki.write_ca(stranger, "stranger")
        issued = self.pki.issue("upstream", "mail.test")
        upstream = self.server(tls_server(issued, echo))

        def client() -> bytes:
            with connect(port) as conn:
                conn.sendall(b"via tls_ca")
                return recv_exactly(conn, 10)

        # [upstream] ca does not trust the upstream; the route's tls_ca does.
        config = static_tls_route(upstream.port, ca=stranger_file, server_name="mail.test", tls_ca=self.pki.ca_file)
        service, port = await self.start_proxy(config)
        self.assertEqual(await self.in_thread(client), b"via tls_ca")
        await self.last_session()
        await service.stopService()

        # ... and the other way round.
        config = static_tls_route(upstream.port, ca=self.pki.ca_file, server_name="mail.test", tls_ca=stranger_file)
        _, port = await self.start_proxy(config)
        reason = await self.assert_upstream_refused(port)
        self.assertEqual(reason, f"127.0.0.1:{upstream.port}: TLS: certificate verify failed")

    async def test_system_trust_store_honours_ssl_cert_file(self) -> None:
        issued = self.pki.issue("upstream", "mail.test")
        upstream = self.server(tls_server(issued, echo))
        stranger_file = self.pki.write_ca(trustme.CA(organization_name="another CA"), "stranger")
        previous = os.environ.get("SSL_CERT_FILE")
        self.addCleanup(_restore_environ, "SSL_CERT_FILE", previous)

        # No [upstream] ca: OpenSSL's default paths, where SSL_CERT_FILE wins.
        os.environ["SSL_CERT_FILE"] = stranger_file
        service, port = await self.start_proxy(static_tls_route(upstream.port, server_name="mail.test"))
        reason = await self.assert_upstream_refused(port)
        self.assertEqual(reason, f"127.0.0.1:{upstream.port}: TLS: certificate verify failed")
        await service.stopService()

        os.environ["SSL_CERT_FILE"] = self.pki.ca_file
        _, port = await self.start_proxy(static_tls_route(upstream.port, server_name="mail.test"))

        def client() -> bytes:
            with connect(port) as conn:
                conn.sendall(b"system trust")
                return recv_exactly(conn, 12)

        self.assertEqual(await self.in_thread(client), b"system trust")


def _restore_environ(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


# --- 5. handshake failures -----------------------------------------------------------


class HandshakeFailureTests(TLSTestCase):
    async def start(self, clock: Clock | None = None, **listener: Any) -> tuple[RecordingRouter, int]:
        default = self.pki.issue("default", "mail.test")
        upstream = self.server(echo)
        router = RecordingRouter(to(upstream.port))
        _, port = await self.start_proxy(tls_listener({"cert": default.pem}, **listener), router=router, clock=clock)
        return router, port

    async def assert_still_serving(self, port: int) -> None:
        answer = await self.in_thread(tls_echo, port, client_context(self.pki.ca_file), "mail.test", b"still serving")
        self.assertEqual(answer, b"still serving")

    async def test_garbage_and_plaintext_are_closed_as_tls_failed(self) -> None:
        router, port = await self.start()

        def send(data: bytes) -> str:
            with connect(port) as conn:
                conn.sendall(data)
                return closed_by_peer(conn)

        for data in [b"\x16\x03\x01\x00\x05hello" + os.urandom(200), b"EHLO x\r\n"]:
            self.assertIn(await self.in_thread(send, data), ("eof", "reset"))
        lines = await self.session_lines(2)
        self.assertEqual(
            [(e["outcome"], e["reason"]) for e in lines],
            [
                ("tls-failed", "TLS: unexpected message"),
                (
                    "tls-failed",
                    "TLS: wrong version number (the peer did not speak TLS: plaintext on a TLS port,"
                    " or STARTTLS where implicit TLS is expected)",
                ),
            ],
        )
        self.assertEqual(router.requests, [])
        await self.assert_still_serving(port)

    async def test_silent_and_stalled_clients_are_closed_after_handshake_timeout(self) -> None:
        clock = Clock()
        router, port = await self.start(clock=clock, handshake_timeout=30)

        def sends(data: bytes) -> socket.socket:
            conn = connect(port)
            self.addCleanup(conn.close)
            conn.sendall(data)
            return conn

        def stalled(conn: socket.socket) -> Callable[[], bool]:
            """Accepted (its handshake timer runs) and read to the last byte sent."""
            client_port = conn.getsockname()[1]
            return lambda: bool(clock.getDelayedCalls()) and all_read(client_port)

        # Nothing at all; then the first half of a ClientHello, and silence.
        for data in [b"", client_hello("mail.test")[:60]]:
            conn = await self.in_thread(sends, data)
            await self.eventually(stalled(conn), "mailrelay did not read what the client sent")
            clock.advance(30)
            self.assertIn(await self.in_thread(closed_by_peer, conn), ("eof", "reset"))
        lines = await self.session_lines(2)
        self.assertEqual([(e["outcome"], e["reason"]) for e in lines], [("tls-failed", "no TLS handshake within 30s")] * 2)
        self.assertEqual(router.requests, [])
        await self.assert_still_serving(port)


# --- 6. SNI preread in splice mode ---------------------------------------------------


class PrereadTests(TLSTestCase):
    async def test_routes_by_the_peeked_name_and_forwards_the_hello_unchanged(self) -> None:
        servers = {}
        for name in ["a.test", "b.test"]:
            issued = self.pki.issue(name, name)
            servers[name] = self.server(tls_server(issued, functools.partial(named_echo, name)))

        def by_name(request: RouteRequest) -> Route:
            assert request.sni is not None
            return Route(host="127.0.0.1", port=servers[request.sni].port)

        router = RecordingRouter(by_name)
        _, port = await self.start_proxy(splice_listener(preread_sni=True), router=router)
        checking = client_context(self.pki.ca_file)
        data = payload(256 * 1024)

        def client(name: str) -> tuple[list[str], str]:
            # The client checks the upstream's certificate for `name` against the CA: the
            # upstream itself answered the very ClientHello this client sent.
            with tls_connect(port, checking, name) as tls:
                served = dns_names(x509.load_der_x509_certificate(tls.getpeercert(binary_form=True) or b""))
                return served, sha(duplex(tls, data, len(data)))

        for name in ["a.test", "b.test", "a.test"]:
            self.assertEqual(await self.in_thread(client, name), ([name], sha(data)))
        self.assertEqual([r.sni for r in router.requests], ["a.test", "b.test", "a.test"])
        self.assertEqual([(r.tls, r.mode) for r in router.requests], [(False, "splice")] * 3)
        self.assertEqual(await self.in_thread(servers["a.test"].result), ("a.test", len(data)))
        self.assertEqual(await self.in_thread(servers["b.test"].result), ("b.test", len(data)))
        self.assertEqual(await self.in_thread(servers["a.test"].result), ("a.test", len(data)))

    async def test_a_silent_plaintext_client_is_routed_without_a_name(self) -> None:
        def greet(conn: socket.socket) -> bytes:
            conn.sendall(b"220 upstream ready\r\n")
            return recv_all(conn)

        upstream = self.server(greet)
        router = RecordingRouter(to(upstream.port))
        clock = Clock()
        _, port = await self.start_proxy(splice_listener(preread_sni=True, preread_timeout=10), router=router, clock=clock)

        def client() -> bytes:
            with connect(port) as conn:
                greeting = conn.recv(100)
                conn.sendall(b"QUIT\r\n")
                conn.shutdown(socket.SHUT_WR)
                return greeting + recv_all(conn)

        talking = self.in_thread(client)
        await self.eventually(clock.getDelayedCalls, "mailrelay did not accept the connection")  # its preread timer
        clock.advance(10)
        self.assertEqual(await talking, b"220 upstream ready\r\n")
        self.assertEqual(await self.in_thread(upstream.result), b"QUIT\r\n")
        self.assertEqual([r.sni for r in router.requests], [None])

    async def test_malformed_and_truncated_hellos_are_protocol_errors(self) -> None:
        upstream = self.server(echo)
        router = RecordingRouter(to(upstream.port))
        clock = Clock()
        _, port = await self.start_proxy(splice_listener(preread_sni=True, preread_timeout=10), router=router, clock=clock)

        def send(data: bytes) -> str:
            with connect(port) as conn:
                conn.sendall(data)
                return closed_by_peer(conn)

        def sends(data: bytes) -> socket.socket:
            conn = connect(port)
            self.addCleanup(conn.close)
            conn.sendall(data)
            return conn

        malformed = b"\x16\x03\x01\x00\x10" + b"\x02" + os.urandom(15)
        self.assertIn(await self.in_thread(send, malformed), ("eof", "reset"))
        line = await self.last_session()
        self.assertEqual(
            (line["outcome"], line["reason"]),
            ("protocol-error", "malformed TLS ClientHello: handshake message type 2 is not client_hello"),
        )

        hello = client_hello("a.test")
        self.assertGreater(len(hello), 20)
        conn = await self.in_thread(sends, hello[:20])
        client_port = conn.getsockname()[1]
        await self.eventually(lambda: all_read(client_port), "mailrelay did not read the start of the ClientHello")
        clock.advance(10)
        self.assertIn(await self.in_thread(closed_by_peer, conn), ("eof", "reset"))
        line = await self.last_session(2)
        self.assertEqual((line["outcome"], line["reason"]), ("protocol-error", "incomplete TLS ClientHello (20 bytes) after 10s"))
        self.assertEqual(router.requests, [])
        self.assertEqual(upstream.connections, 0)

    async def test_an_end_of_stream_during_preread_is_decided_at_once(self) -> None:
        upstream = self.server(echo)
        router = RecordingRouter(to(upstream.port))
        # A timeout no test waits for: the end of stream must decide.
        _, port = await self.start_proxy(splice_listener(preread_sni=True, preread_timeout=WAIT * 2), router=router)

        def send_then_end(data: bytes) -> bytes:
            with connect(port) as conn:
                conn.sendall(data)
                conn.shutdown(socket.SHUT_WR)
                try:
                    return recv_all(conn)
                except ConnectionResetError:
                    return b""

        self.assertEqual(await self.in_thread(send_then_end, client_hello("a.test")[:20]), b"")
        line = await self.last_session()
        self.assertEqual(
            (line["outcome"], line["reason"]),
            ("protocol-error", "client ended its stream inside a TLS ClientHello (20 bytes)"),
        )
        # Nothing sent at all: routed without a name, and the end of stream passed on.
        self.assertEqual(await self.in_thread(send_then_end, b""), b"")
        self.assertEqual([r.sni for r in router.requests], [None])
        self.assertEqual(await self.in_thread(upstream.result), 0)


# --- 7. bulk transfer -----------------------------------------------------------------


class BulkTLSTests(TLSTestCase):
    async def test_64_mib_each_way_through_a_tls_listener_arrive_byte_identical(self) -> None:
        up, down = payload(64 * MiB), payload(64 * MiB)
        default = self.pki.issue("default", "mail.test")
        upstream = self.server(swap(down, len(up)))
        _, port = await self.start_proxy(tls_listener({"cert": default.pem}), router=RecordingRouter(to(upstream.port)))
        checking = client_context(self.pki.ca_file)

        def client() -> bytes:
            with tls_connect(port, checking, "mail.test") as tls:
                return duplex(tls, up, len(down))

        received = await self.in_thread(client)
        self.assertEqual((sha(received), len(received)), (sha(down), len(down)))
        self.assertEqual(await self.in_thread(upstream.result), (sha(up), len(up)))
        line = await self.last_session()
        self.assertEqual((line["outcome"], line["bytes_up"], line["bytes_down"]), ("closed", len(up), len(down)))


# --- 8. client certificates ----------------------------------------------------------


class ClientCertificateTests(TLSTestCase):
    async def start(self, client_cert: str | None) -> tuple[RecordingRouter, int, trustme.CA]:
        default = self.pki.issue("default", "mail.test")
        other = self.pki.issue("other", "mail.other.test")
        clients = trustme.CA(organization_name="mailrelay client CA")
        tls = {"cert": default.pem, "sni": [{"cert": other.pem}], "client_ca": self.pki.write_ca(clients, "clients")}
        if client_cert is not None:
            tls["client_cert"] = client_cert
        upstream = self.server(echo)
        router = RecordingRouter(to(upstream.port))
        _, port = await self.start_proxy(tls_listener(tls), router=router)
        return router, port, clients

    async def test_a_certificate_from_client_ca_reaches_the_router(self) -> None:
        router, port, clients = await self.start(None)
        alice = self.pki.issue("alice", "alice@example.test", ca=clients, common_name="alice")
        context = client_context(self.pki.ca_file, cert=alice)

        self.assertEqual(await self.in_thread(tls_echo, port, context, "mail.test", b"it is me"), b"it is me")
        # An SNI certificate's context verifies client certificates as well.
        self.assertEqual(await self.in_thread(tls_echo, port, context, "mail.other.test", b"me again"), b"me again")

        self.assertEqual([(r.tls, r.sni) for r in router.requests], [(True, "mail.test"), (True, "mail.other.test")])
        self.assertEqual(router.requests[0].client_cert, router.requests[1].client_cert)
        certificate = router.requests[0].client_cert
        assert certificate is not None
        self.assertIn("CN=alice", certificate.subject.split(","))
        self.assertEqual(certificate.subject, alice.x509.subject.rfc4514_string())
        self.assertEqual(certificate.issuer, alice.x509.issuer.rfc4514_string())
        self.assertIn("O=mailrelay client CA", certificate.issuer.split(","))
        self.assertEqual(certificate.serial, format(alice.x509.serial_number, "X"))
        der = alice.x509.public_bytes(serialization.Encoding.DER)
        self.assertEqual(certificate.fingerprint, hashlib.sha1(der).hexdigest())

    async def test_a_certificate_from_another_ca_is_refused(self) -> None:
        router, port, _ = await self.start(None)
        mallory = self.pki.issue("mallory", "mallory@example.test", common_name="mallory")  # the server CA, not client_ca
        context = client_context(self.pki.ca_file, cert=mallory)

        for name in ["mail.test", "mail.other.test"]:
            how = await self.in_thread(refused, port, context, name)
            self.assertEqual(how, "SSLError: TLSV1_ALERT_UNKNOWN_CA")
        lines = await self.session_lines(2)
        self.assertEqual([(e["outcome"], e["reason"]) for e in lines], [("tls-failed", "TLS: certificate verify failed")] * 2)
        self.assertEqual(router.requests, [])

    async def test_required_refuses_a_client_without_certificate(self) -> None:
        router, port, _ = await self.start("required")

        how = await self.in_thread(refused, port, client_context(self.pki.ca_file), "mail.test")
        self.assertEqual(how, "SSLError: TLSV13_ALERT_CERTIFICATE_REQUIRED")
        line = await self.last_session()
        self.assertEqual(
            (line["outcome"], line["reason"]),
            (
                "tls-failed",
                'TLS: peer did not return a certificate (client_cert = "required" and the client sent none)',
            ),
        )
        self.assertEqual(router.requests, [])

    async def test_optional_routes_a_client_without_certificate(self) -> None:
        router, port, _ = await self.start("optional")

        answer = await self.in_thread(tls_echo, port, client_context(self.pki.ca_file), "mail.test", b"anonymous")
        self.assertEqual(answer, b"anonymous")
        [request] = router.requests
        self.assertEqual((request.tls, request.sni, request.client_cert), (True, "mail.test", None))


# --- 9. ALPN --------------------------------------------------------------------------


class _Echo(Protocol):
    def __init__(self, lost: list[Failure]) -> None:
        self.lost = lost

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost.append(reason)


class ALPNTests(TLSTestCase):
    async def test_a_listener_of_a_protocol_accepts_its_alpn_or_none_and_refuses_others(self) -> None:
        default = self.pki.issue("default", "mail.test")
        server_tls = ServerTLS(ServerTLSConfig(default=CertificateFiles(cert=default.cert, key=default.key)))
        lost: list[Failure] = []
        factory = TLSMemoryBIOFactory(server_tls.creator("imap"), False, Factory.forProtocol(lambda: _Echo(lost)))
        # Twisted annotates the factory as a ServerFactory; any IProtocolFactory does.
        listening = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[arg-type]
        self.addCleanup(listening.stopListening)
        port = tcp_port(listening)

        def offer(protocols: list[str] | None) -> tuple[str | None, bytes]:
            context = client_context(self.pki.ca_file)
            if protocols is not None:
                context.set_alpn_protocols(protocols)
            with tls_connect(port, context, "mail.test") as tls:
                tls.sendall(b"a1 NOOP\r\n")
                return tls.selected_alpn_protocol(), recv_exactly(tls, 9)

        self.assertEqual(await self.in_thread(offer, ["imap"]), ("imap", b"a1 NOOP\r\n"))
        self.assertEqual(await self.in_thread(offer, ["pop3", "imap"]), ("imap", b"a1 NOOP\r\n"))
        self.assertEqual(await self.in_thread(offer, None), (None, b"a1 NOOP\r\n"))
        with self.assertRaises(ssl.SSLError) as refusal:
            await self.in_thread(offer, ["h2", "http/1.1"])
        # The client got the alert (Python's ssl names no `reason` for this one).
        self.assertIn("tlsv1 alert no application protocol", str(refusal.exception))
        deadline = time.monotonic() + WAIT
        while len(lost) < 4 and time.monotonic() < deadline:
            await deferLater(reactor, 0.02)
        self.assertEqual(len(lost), 4)
        [refused_here] = [f.value for f in lost if isinstance(f.value, SSL.Error)]
        self.assertIsInstance(refused_here, ALPNRefused)
        self.assertEqual(describe_tls_error(refused_here), "TLS: client offered ALPN h2, http/1.1, not imap")


# --- configuration checked at start-up -----------------------------------------------


class StartupTests(TLSTestCase):
    def test_a_cipher_string_openssl_refuses_stops_the_start(self) -> None:
        default = self.pki.issue("default", "mail.test")
        config = tls_listener({"cert": default.pem, "ciphers": "NO-SUCH-CIPHER"})

        with self.assertRaises(ConfigError) as refusal:
            makeService(config, router=RecordingRouter(to(1)))
        self.assertEqual(refusal.exception.errors, ["<config>: tls.ciphers: OpenSSL refuses 'NO-SUCH-CIPHER': no cipher match"])
