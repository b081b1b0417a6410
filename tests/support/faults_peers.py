"""
The scripted upstreams of the fault-injection suite (`tests/test_faults.py`): a server
of each protocol that misbehaves at a chosen point of mailrelay's upstream login.

Where a fault can strike (`POINTS`), in the order an upstream login meets them:

    accept      the connection is accepted, nothing said yet (a greeting is due)
    greeting    right after the greeting
    capability  right after the answer to EHLO / CAPABILITY / CAPA
    starttls    right after the STARTTLS "go ahead"
    handshake   the TLS ClientHello has arrived (a `tls = "tls"` route), no ServerHello yet
    login       the login command has arrived, its answer is due
    splice      logged in; the first command the client sends through has arrived

What the upstream does there (`FAULTS`): `reset` (SO_LINGER 0, then close: a TCP RST),
`hang` (silence), `half-close` (shutdown SHUT_WR), `garbage-random` (random bytes and a
line end), `garbage-long` (a line longer than any limit, with no line end),
`garbage-http` (an HTTP error reply), `tls-garbage` (plaintext where a ServerHello is
due). Every fault but a reset then waits for mailrelay to close the connection, so the
upstream's thread (and its descriptor) ends only when mailrelay lets go.
"""

from __future__ import annotations

import base64
import queue
import random
import socket
import ssl
import threading
from collections.abc import Callable
from typing import Any

import attrs

from tests.support.frontends import PASSWORD, USER
from tests.support.net import ThreadedServer, reset

POINTS = ("accept", "greeting", "capability", "starttls", "handshake", "login", "splice")
FAULTS = ("reset", "hang", "half-close", "garbage-random", "garbage-long", "garbage-http", "tls-garbage")

GARBAGE = b"\xff\xfe" + random.Random(14).randbytes(510) + b"\r\n"
"""Random bytes, ending a line (none of mailrelay's readers waits for more); the first
two make sure no protocol could take them for a reply."""
LONG_LINE = b"x" * (80 * 1024)
"""Longer than any line mailrelay reads from an upstream (SMTP 4 KiB, IMAP and POP3
64 KiB), and no line end."""
HTTP_REPLY = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n"
PLAINTEXT_HELLO = b"220 upstream.test ESMTP this is not TLS\r\n"


# -- scripted peers ------------------------------------------------------------------------


class ScriptedServer(ThreadedServer):
    """A `ThreadedServer` that knows how many of its handlers are still running, so the
    leak check can wait for them (each holds a descriptor until it returns), that may
    listen on a given port (to come back where it was), and that really stops
    listening when closed."""

    def __init__(self, handle: Callable[[socket.socket], Any], host: str = "127.0.0.1", port: int = 0) -> None:
        self.active = 0
        self._lock = threading.Lock()
        self.handle = handle
        # SO_REUSEPORT: a `refusing()` socket may keep the port while the server is away.
        self.sock = socket.create_server((host, port), reuse_port=True)
        self.port = self.sock.getsockname()[1]
        self.results = queue.Queue()
        self.connections = 0
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        # Closing alone would leave a thread blocked in accept() holding the socket,
        # still listening; shutting it down wakes the thread.
        if not self._closed:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        super().close()

    def _serve(self, conn: socket.socket) -> None:
        with self._lock:
            self.active += 1
        try:
            super()._serve(conn)
        finally:
            with self._lock:
                self.active -= 1


class Peer:
    """One accepted connection of a scripted server: lines over a plain or TLS socket."""

    def __init__(self, conn: socket.socket) -> None:
        self.raw = conn
        self.sock: Any = conn
        self.buffer = bytearray()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def readline(self) -> bytes:
        """The next line with its end; b"" when the stream ends (or is reset) first."""
        while (end := self.buffer.find(b"\n")) < 0:
            try:
                data = self.sock.recv(1 << 16)
            except OSError:
                data = b""
            if not data:
                return b""
            self.buffer += data
        line = bytes(self.buffer[: end + 1])
        del self.buffer[: end + 1]
        return line

    def client_hello(self) -> bytes:
        """What arrives first from a TLS client: its ClientHello."""
        return self.sock.recv(1 << 16)

    def start_tls(self, context: ssl.SSLContext) -> None:
        self.sock = context.wrap_socket(self.raw, server_side=True)
        self.buffer.clear()

    def wait_for_close(self) -> None:
        """Read (and drop) until the other end closes or resets the connection."""
        try:
            while self.sock.recv(1 << 16):
                pass
        except OSError:
            pass

    def inject(self, fault: str) -> str:
        """Misbehave as `fault` says; then wait for the other end to close, unless the
        fault closed the connection. Returns `fault`, for the server's results."""
        if fault == "reset":
            reset(self.sock)
            return fault
        try:
            if fault == "half-close":
                self.sock.shutdown(socket.SHUT_WR)
            elif fault == "garbage-random":
                self.send(GARBAGE)
            elif fault == "garbage-long":
                self.send(LONG_LINE)
            elif fault == "garbage-http":
                self.send(HTTP_REPLY)
            elif fault == "tls-garbage":
                self.send(PLAINTEXT_HELLO)
            else:
                assert fault == "hang", fault
        except OSError:
            pass  # mailrelay gave up in the middle of our write: that is its right
        self.wait_for_close()
        return fault


def _plain_login(encoded: bytes) -> tuple[str, str] | None:
    """(user, password) of a base64 SASL PLAIN response, None if it is not one."""
    try:
        _, user, password = base64.b64decode(encoded, validate=True).split(b"\0")
        return user.decode(), password.decode()
    except ValueError:
        return None


@attrs.define
class ScriptedUpstream:
    """
    A small upstream of `protocol` ("smtp", "imap", "pop3", or "none": a line echo for
    splice listeners) that plays its part of mailrelay's login correctly, except that
    at `point` it does `fault` (see the module docstring); without a fault, a good
    upstream. `tls` is its server context, for STARTTLS (offered when given) and for
    `implicit_tls` (a `tls = "tls"` route). Each connection's handler returns "served",
    or the fault it injected.
    """

    protocol: str
    point: str | None = None
    fault: str | None = None
    tls: ssl.SSLContext | None = None
    implicit_tls: bool = False

    def __call__(self, conn: socket.socket) -> str:
        peer = Peer(conn)
        if self.implicit_tls:
            assert self.tls is not None
            if self.point == "handshake":
                peer.client_hello()
                return self.misbehave(peer)
            try:
                peer.start_tls(self.tls)
            except OSError:
                return "handshake failed"
        if self.point == "accept":
            return self.misbehave(peer)
        return _DIALOGUES[self.protocol](self, peer).run()

    def misbehave(self, peer: Peer) -> str:
        assert self.fault is not None
        return peer.inject(self.fault)


class _Dialogue:
    """One connection's conversation; subclasses speak the protocol."""

    greeting = b""

    def __init__(self, script: ScriptedUpstream, peer: Peer) -> None:
        self.script = script
        self.peer = peer
        self.secure = script.implicit_tls
        self.capabilities_said = False
        self.logged_in = False
        self.result: str | None = None

    def at(self, point: str) -> bool:
        return self.script.point == point

    def misbehave(self) -> None:
        self.result = self.script.misbehave(self.peer)

    def run(self) -> str:
        if self.greeting:
            self.peer.send(self.greeting)
            if self.at("greeting"):
                return self.script.misbehave(self.peer)
        while self.result is None:
            line = self.peer.readline()
            if not line:
                return "served"
            if self.logged_in and self.at("splice"):
                self.misbehave()
            else:
                self.handle(line.rstrip(b"\r\n"))
        return self.result

    def handle(self, line: bytes) -> None:
        raise NotImplementedError

    def said_capabilities(self) -> None:
        """After the first answer to EHLO / CAPABILITY / CAPA."""
        if not self.capabilities_said:
            self.capabilities_said = True
            if self.at("capability"):
                self.misbehave()

    def went_ahead(self) -> None:
        """After the STARTTLS "go ahead": the handshake, or the fault."""
        if self.at("starttls"):
            self.misbehave()
        elif self.at("handshake"):
            self.peer.client_hello()
            self.misbehave()
        else:
            assert self.script.tls is not None
            try:
                self.peer.start_tls(self.script.tls)
            except OSError:
                self.result = "handshake failed"
            self.secure = True

    def login(self, credentials: tuple[str, str] | None, good: Callable[[], None], bad: Callable[[], None]) -> None:
        """The login command arrived: the fault, or the verdict on `credentials`."""
        if self.at("login"):
            self.misbehave()
        elif credentials == (USER, PASSWORD):
            self.logged_in = True
            good()
        else:
            bad()

    def offers_tls(self) -> bool:
        return self.script.tls is not None and not self.secure


class _SMTP(_Dialogue):
    greeting = b"220 upstream.test ESMTP scripted\r\n"

    def handle(self, line: bytes) -> None:
        verb, _, arg = line.partition(b" ")
        verb, send = verb.upper(), self.peer.send
        if verb == b"EHLO":
            send(
                b"250-upstream.test\r\n250-AUTH PLAIN LOGIN\r\n"
                + (b"250-STARTTLS\r\n" if self.offers_tls() else b"")
                + b"250 8BITMIME\r\n"
            )
            self.said_capabilities()
        elif verb == b"STARTTLS":
            send(b"220 2.0.0 go ahead\r\n")
            self.went_ahead()
        elif verb == b"AUTH" and arg[:6].upper() == b"PLAIN ":
            self.login(_plain_login(arg[6:]), lambda: send(b"235 2.7.0 welcome\r\n"), lambda: send(b"535 5.7.8 no\r\n"))
        elif verb == b"NOOP":
            send(b"250 2.0.0 upstream noop\r\n")
        elif verb == b"QUIT":
            send(b"221 2.0.0 bye\r\n")
            self.result = "served"
        else:
            send(b"502 5.5.1 not in this script\r\n")


class _IMAP(_Dialogue):
    greeting = b"* OK upstream ready\r\n"
    """Without its capabilities, so that mailrelay asks (the `capability` point)."""

    def handle(self, line: bytes) -> None:
        tag, _, rest = line.partition(b" ")
        name, _, arg = rest.partition(b" ")
        name, send = name.upper(), self.peer.send
        if name == b"CAPABILITY":
            send(b"* CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN" + (b" STARTTLS" if self.offers_tls() else b"") + b"\r\n")
            send(tag + b" OK CAPABILITY completed\r\n")
            self.said_capabilities()
        elif name == b"STARTTLS":
            send(tag + b" OK Begin TLS negotiation now\r\n")
            self.went_ahead()
        elif name == b"AUTHENTICATE" and arg[:6].upper() == b"PLAIN ":
            self.login(
                _plain_login(arg[6:]),
                lambda: send(tag + b" OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n"),
                lambda: send(tag + b" NO [AUTHENTICATIONFAILED] Invalid credentials (upstream)\r\n"),
            )
        elif name == b"NOOP":
            send(tag + b" OK upstream noop\r\n")
        elif name == b"LOGOUT":
            send(b"* BYE upstream logging out\r\n" + tag + b" OK LOGOUT completed\r\n")
            self.result = "served"
        else:
            send(tag + b" BAD not in this script\r\n")


class _POP3(_Dialogue):
    greeting = b"+OK upstream ready\r\n"

    def handle(self, line: bytes) -> None:
        verb, _, arg = line.partition(b" ")
        verb, send = verb.upper(), self.peer.send
        if verb == b"CAPA":
            send(b"+OK\r\nUSER\r\nSASL PLAIN\r\nRESP-CODES\r\n" + (b"STLS\r\n" if self.offers_tls() else b"") + b".\r\n")
            self.said_capabilities()
        elif verb == b"STLS":
            send(b"+OK Begin TLS negotiation now\r\n")
            self.went_ahead()
        elif verb == b"AUTH" and arg[:6].upper() == b"PLAIN ":
            self.login(
                _plain_login(arg[6:]),
                lambda: send(b"+OK upstream: logged in\r\n"),
                lambda: send(b"-ERR [AUTH] Authentication failed.\r\n"),
            )
        elif verb == b"NOOP":
            send(b"+OK upstream noop\r\n")
        elif verb == b"QUIT":
            send(b"+OK bye\r\n")
            self.result = "served"
        else:
            send(b"-ERR not in this script\r\n")


class _Echo(_Dialogue):
    """Behind a splice listener: no greeting, each line answered `pong <line>`."""

    def handle(self, line: bytes) -> None:
        self.peer.send(b"pong " + line + b"\r\n")

    def run(self) -> str:
        self.logged_in = True  # nothing to log into: the first line is spliced
        return super().run()


_DIALOGUES: dict[str, type[_Dialogue]] = {"smtp": _SMTP, "imap": _IMAP, "pop3": _POP3, "none": _Echo}
