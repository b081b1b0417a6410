"""
The fault-injection suite's machinery (`tests/test_faults.py`): scripted upstreams of
each protocol that misbehave at a chosen point of mailrelay's upstream login, an
nginx-style auth service that misbehaves, blocking clients of each front-end, and the
one check every case ends with, `FaultTestCase.check_case`: the session ended and was
logged, mailrelay holds no session, timer or file descriptor more than before, and it
still serves a good session.

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
import functools
import os
import queue
import random
import socket
import ssl
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import deferLater

from mailrelay.router import Route, RouteRequest
from tests.frontends import PASSWORD, USER, FrontEndTestCase, plain_ir
from tests.imap_support import read_tagged
from tests.smtp_support import raw_reply
from tests.support import WAIT, ThreadedServer, read_line, reset

POINTS = ("accept", "greeting", "capability", "starttls", "handshake", "login", "splice")
FAULTS = ("reset", "hang", "half-close", "garbage-random", "garbage-long", "garbage-http", "tls-garbage")

TIMEOUT = 1.0
"""Every deadline a case provokes: `[upstream] connect_timeout` and `login_timeout`, the
listeners' `router_timeout`, the auth service's `timeout`. Small, so that a hang costs
a second, and large enough for a good login on a busy machine."""
SETTLE = 10.0
LONG = 3 * SETTLE
"""The deadlines of a case that checks a cancellation: what is not cancelled outlives
the leak check's patience."""
"""How long the leak check lets closes already under way finish (aborts run on the next
reactor turn, scripted peers' threads end when mailrelay closes their connection): a
hang guard, never a timing assertion. A leak fails the case after this long."""

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


# -- the auth service ----------------------------------------------------------------------

AUTH_FAULTS = ("slow", "down", "not-http", "no-status", "twice", "length-long", "length-short", "reset", "reset-reused")
"""What the auth service does wrong: answers only after mailrelay gave up (`slow`), is
not listening (`down`), answers random bytes (`not-http`), an HTTP answer without
`Auth-Status` (`no-status`), two answers to one request (`twice`), a body shorter than
its Content-Length, then closes (`length-long`), a body longer than it (`length-short`),
resets the connection after the request (`reset`), answers well and keeps the
connection, then resets it when the next request comes on it (`reset-reused`: a
service whose keep-alive timeout is shorter than mailrelay's)."""


def auth_answer(port: int, *, close: bool = True, body: bytes = b"", length: int | None = None) -> bytes:
    """An auth_http answer routing to 127.0.0.1:`port` with a passthrough login."""
    return (
        b"HTTP/1.1 200 OK\r\nAuth-Status: OK\r\nAuth-Server: 127.0.0.1\r\nAuth-Port: %d\r\n"
        b"Mailrelay-Login: passthrough\r\nContent-Length: %d\r\n%s\r\n%s"
        % (port, len(body) if length is None else length, b"Connection: close\r\n" if close else b"", body)
    )


@attrs.define
class AuthService:
    """
    An nginx-style auth service on a raw socket, one request per connection unless a
    fault keeps the connection: routes every login to `good` (127.0.0.1 port), except
    that while `fault` is set it misbehaves as `AUTH_FAULTS` say. Where a fault sends
    bytes beyond its answer (a second answer, a body longer than its Content-Length),
    they hold an answer routing to `wrong` (a port where nothing listens), and the
    connection stays open for one more request, answered to `good`: a login of
    mailrelay that ends up at `wrong` was decided by stale bytes, not by the answer to
    its own request. `requests` counts the requests that arrived.
    """

    good: int
    wrong: int
    fault: str | None = None
    requests: int = 0

    def _request(self, peer: Peer) -> bool:
        """Read one request's head (a GET has no body); False if the stream ended."""
        while (line := peer.readline()) not in (b"\r\n", b"\n"):
            if not line:
                return False
        self.requests += 1
        return True

    def __call__(self, conn: socket.socket) -> str:
        peer = Peer(conn)
        if not self._request(peer):
            return "no request"
        fault = self.fault
        try:
            if fault is None:
                peer.send(auth_answer(self.good))
                return "served"
            if fault == "reset":
                reset(conn)
                return fault
            if fault == "slow":
                peer.wait_for_close()  # mailrelay gave up (router_timeout): only now the answer
                peer.send(auth_answer(self.good))
            elif fault == "not-http":
                peer.send(GARBAGE + b"\r\n")
            elif fault == "no-status":
                peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            elif fault == "length-long":
                peer.send(auth_answer(self.good, close=False, body=b"0123456789", length=100))
                return fault  # closed with 90 bytes of the body missing
            elif fault == "reset-reused":
                self.fault = None  # new connections are answered well
                peer.send(auth_answer(self.good, close=False))
                if self._request(peer):
                    reset(conn)
                return fault
            elif fault in ("twice", "length-short"):
                if fault == "twice":
                    peer.send(auth_answer(self.good, close=False) + auth_answer(self.wrong, close=False))
                else:
                    peer.send(
                        auth_answer(self.good, close=False, body=b"0123456789" + auth_answer(self.wrong, close=False), length=10)
                    )
                # The next request on this connection gets its own (good) answer, and
                # the connection closes: a login decided by the stale bytes instead
                # ends up at `wrong`.
                if self._request(peer):
                    peer.send(auth_answer(self.good))
                return fault
        except OSError:
            return fault or "served"
        peer.wait_for_close()
        return fault or "served"


# -- clients -------------------------------------------------------------------------------


@attrs.frozen
class Dialect:
    """What a client of one front-end says, and hears (the README's tables)."""

    protocol: str
    login: bytes
    """A login in one command line (SASL PLAIN with an initial response)."""
    logged_in: bytes
    """mailrelay's answer to it once the upstream has accepted it (the upstream's own,
    for IMAP and POP3)."""
    unavailable: bytes
    """The answer when no route could be connected or logged in."""
    temporary: bytes
    """The answer when the Router failed (the auth service is down, slow, broken)."""
    probe: bytes
    """A command for the upstream, once logged in (spliced or relayed), and..."""
    probe_answer: bytes
    """...the upstream's answer to it."""
    quit: bytes
    sasl_start: bytes
    """A SASL exchange that mailrelay answers with a continuation..."""
    continuation: bytes
    """...which begins so."""
    starttls: bytes
    go_ahead: bytes
    hello: bytes | None = None
    """What the client says after the greeting, before anything else (SMTP's EHLO)."""


SMTP = Dialect(
    "smtp",
    login=b"AUTH PLAIN " + plain_ir(),
    logged_in=b"235 2.7.0 Authentication successful\r\n",
    unavailable=b"451 4.4.1 Mail server temporarily unavailable, try again later\r\n",
    temporary=b"451 4.3.0 Temporary failure, try again later\r\n",
    probe=b"NOOP",
    probe_answer=b"250 2.0.0 upstream noop\r\n",
    quit=b"QUIT",
    sasl_start=b"AUTH LOGIN",
    continuation=b"334 VXNlcm5hbWU6\r\n",
    starttls=b"STARTTLS",
    go_ahead=b"220 2.0.0 Ready to start TLS\r\n",
    hello=b"EHLO client.test",
)
IMAP = Dialect(
    "imap",
    login=b"a1 AUTHENTICATE PLAIN " + plain_ir(),
    logged_in=b"a1 OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n",
    unavailable=b"a1 NO [UNAVAILABLE] Mail server temporarily unavailable, try again later\r\n",
    temporary=b"a1 NO [UNAVAILABLE] Temporary failure, try again later\r\n",
    probe=b"a2 NOOP",
    probe_answer=b"a2 OK upstream noop\r\n",
    quit=b"a3 LOGOUT",
    sasl_start=b"a1 AUTHENTICATE PLAIN",
    continuation=b"+ \r\n",
    starttls=b"s STARTTLS",
    go_ahead=b"s OK Begin TLS negotiation now\r\n",
)
POP3 = Dialect(
    "pop3",
    login=b"AUTH PLAIN " + plain_ir(),
    logged_in=b"+OK upstream: logged in\r\n",
    unavailable=b"-ERR [SYS/TEMP] Mail server temporarily unavailable, try again later\r\n",
    temporary=b"-ERR [SYS/TEMP] Temporary failure, try again later\r\n",
    probe=b"NOOP",
    probe_answer=b"+OK upstream noop\r\n",
    quit=b"QUIT",
    sasl_start=b"AUTH PLAIN",
    continuation=b"+ \r\n",
    starttls=b"STLS",
    go_ahead=b"+OK Begin TLS negotiation now\r\n",
)
NONE = Dialect(
    "none",
    login=b"",
    logged_in=b"",
    unavailable=b"",
    temporary=b"",
    probe=b"ping",
    probe_answer=b"pong ping\r\n",
    quit=b"",
    sasl_start=b"",
    continuation=b"",
    starttls=b"",
    go_ahead=b"",
)
DIALECTS = {d.protocol: d for d in (SMTP, IMAP, POP3, NONE)}


class Client:
    """A blocking client of one listener (run it off the reactor thread)."""

    def __init__(self, dialect: Dialect, port: int, context: ssl.SSLContext | None = None) -> None:
        """`context`: connect with TLS from the first byte (a `tls` listener)."""
        self.dialect = dialect
        self.port = port
        self.context = context
        self.conn: Any = None

    def connect(self, greet: bool = True) -> bytes:
        """Connect; read the greeting and say hello when `greet` (what was heard)."""
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=WAIT)
        self.conn = self.context.wrap_socket(raw, server_hostname="relay.test") if self.context else raw
        if not greet or self.dialect.protocol == "none":
            return b""
        heard = raw_reply(self.conn) if self.dialect.protocol == "smtp" else read_line(self.conn)
        if self.dialect.hello is not None:
            heard += self.command(self.dialect.hello)
        return heard

    def reply(self, tag: bytes = b"") -> bytes:
        """One whole reply (an IMAP one up to the line tagged `tag`)."""
        if self.dialect.protocol == "smtp":
            return raw_reply(self.conn)
        if self.dialect.protocol == "imap" and tag:
            return read_tagged(self.conn, tag)
        return read_line(self.conn)

    def command(self, line: bytes) -> bytes:
        self.conn.sendall(line + b"\r\n")
        tag = line.split(b" ", 1)[0] if self.dialect.protocol == "imap" else b""
        return self.reply(b"" if line == self.dialect.sasl_start else tag)

    def rest(self) -> bytes:
        """Everything until the end of the stream (raising if the connection is reset)."""
        data = b""
        while chunk := self.conn.recv(1 << 16):
            data += chunk
        return data

    def starttls(self, context: ssl.SSLContext) -> None:
        assert self.command(self.dialect.starttls) == self.dialect.go_ahead
        self.conn = context.wrap_socket(self.conn, server_hostname="relay.test")
        if self.dialect.hello is not None:
            self.command(self.dialect.hello)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()

    def reset(self) -> None:
        if self.conn is not None:
            reset(self.conn)

    def end(self, how: str) -> None:
        """Go away: "close" (an end of stream) or "reset"."""
        self.reset() if how == "reset" else self.close()


@attrs.define
class Transcript:
    """What a client heard in one session (`session()`)."""

    greeting: bytes = b""
    login: bytes = b""
    probe: bytes = b""
    rest: bytes = b""
    """What came after the last command, up to the end of the stream."""
    error: str | None = None
    """The exception that ended the session early (a reset), by name."""


def session(client: Client, login: bool = True) -> Transcript:
    """A whole client session: connect, log in, and when that succeeded carry the probe
    through and quit; otherwise quit. Reads to the end of the stream."""
    heard = Transcript()
    dialect = client.dialect
    try:
        heard.greeting = client.connect()
        logged_in = True
        if login and dialect.protocol != "none":
            heard.login = client.command(dialect.login)
            logged_in = heard.login == dialect.logged_in
        if logged_in:
            heard.probe = client.command(dialect.probe)
        if dialect.quit:
            client.conn.sendall(dialect.quit + b"\r\n")
        elif client.context is not None:
            return heard  # a splice over TLS cannot be half-closed: just go
        else:
            client.conn.shutdown(socket.SHUT_WR)  # a splice ends when both sides have
        heard.rest = client.rest()
    except OSError as e:
        heard.error = type(e).__name__
    finally:
        client.close()
    return heard


# -- routers ---------------------------------------------------------------------------------


class SwitchRouter:
    """Answers every request with `routes` as they are when it is asked, or with a
    Deferred that never fires while `slow` (cancelled by the listener's
    `router_timeout`, or when the client leaves). Records `requests`."""

    verifies_passwords = False

    def __init__(self, routes: list[Route]) -> None:
        self.routes = routes
        self.slow = False
        self.requests: list[RouteRequest] = []

    def route(self, request: RouteRequest) -> Any:
        self.requests.append(request)
        if self.slow:
            return Deferred()
        return list(self.routes)


# -- the leak check --------------------------------------------------------------------------


def open_fds() -> dict[int, str]:
    """This process's file descriptors and what each is."""
    found = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            found[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass  # the listing's own descriptor, closed by now
    return found


_HARNESS_MODULES = ("tests.", "twisted.trial", "twisted.python.threadpool", "twisted._threads")


def _callable_module(call: Any) -> str:
    func = call.func
    while isinstance(func, functools.partial):
        func = func.func
    func = getattr(func, "__func__", func)
    return getattr(func, "__module__", None) or ""


def _describe(call: Any) -> str:
    func = call.func
    name = getattr(func, "__qualname__", None) or repr(func)
    return f"{_callable_module(call)}.{name} due in {call.getTime() - reactor.seconds():.1f}s"


def pending_calls(before: frozenset[IDelayedCall]) -> list[IDelayedCall]:
    """Delayed calls pending now that were not before, except the test harness's own
    (trial's timeout, this suite's polling) and the thread pool's."""
    return [
        call
        for call in reactor.getDelayedCalls()
        if call not in before and call.active() and not _callable_module(call).startswith(_HARNESS_MODULES)
    ]


@attrs.frozen
class Snapshot:
    """What mailrelay and the test held when quiet: the baseline of the leak check."""

    fds: dict[int, str]
    calls: frozenset[IDelayedCall]
    lines: int
    """Session lines logged so far."""


class FaultTestCase(FrontEndTestCase):
    """
    A front-end test case (see `FrontEndTestCase`) for fault injection: scripted
    servers whose handlers are tracked, an upstream TLS context, the configuration
    every case uses (`TIMEOUT` for each deadline), and `check_case`.
    """

    def setUp(self) -> None:
        super().setUp()
        self.servers: list[ScriptedServer] = []
        issued = self.pki.issue("upstream", "upstream.test")
        self.upstream_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.upstream_tls.load_cert_chain(issued.cert, issued.key)

    def server(self, handle: Callable[[socket.socket], Any], host: str = "127.0.0.1", port: int = 0) -> ScriptedServer:
        """A scripted server (on `port`, when given) whose handlers the leak check waits for."""
        server = ScriptedServer(handle, host, port)
        self.addCleanup(server.close)
        self.servers.append(server)
        return server

    def refusing(self, port: int = 0) -> int:
        """A loopback port where connections are refused (`port`, or a new one), kept
        while the test runs: bound without listening, so that no other process (tests
        run in parallel) can start listening there. A `ScriptedServer` may listen on it
        too, and be closed again: connections are refused again then."""
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", port))
        self.addCleanup(sock.close)
        return int(sock.getsockname()[1])

    def route(self, port: int, tls: str = "none") -> Route:
        """A route to a scripted upstream on `port` (its TLS verified against the test CA)."""
        if tls == "none":
            return Route(host="127.0.0.1", port=port)
        return Route(host="127.0.0.1", port=port, tls=tls, server_name="upstream.test", tls_ca=self.pki.ca_file)  # type: ignore[arg-type]

    def config(
        self,
        protocol: str,
        mode: str = "starttls",
        router: dict[str, Any] | None = None,
        timeout: float = TIMEOUT,
        **listener: Any,
    ) -> dict[str, Any]:
        """One listener of `protocol` (a front-end on an optional-STARTTLS listener by
        default: logins in plaintext are allowed), with `timeout` for every deadline
        (the Router's, the connect, the upstream login). A case that must show that
        something pending is cancelled, not merely timed out, gives a `timeout` longer
        than `SETTLE`."""
        listener.setdefault("router_timeout", timeout)
        if protocol == "none":
            config: dict[str, Any] = {
                "tls": {"cert": self.issued.cert, "key": self.issued.key},
                "listener": [
                    {"name": "none", "listen": "tcp:0:interface=127.0.0.1", "mode": mode, "protocol": "none", **listener}
                ],
            }
        else:
            if mode == "starttls":
                listener.setdefault("starttls", "optional")
            config = self.front_end_config(mode, protocol, **listener)
        config["upstream"] = {"connect_timeout": timeout, "login_timeout": timeout}
        if router is not None:
            config["router"] = router
        return config

    async def start(self, config: dict[str, Any], router: Any = None) -> int:
        self.service, self.port = await self.start_proxy(config, router=router)
        return self.port

    def snapshot(self) -> Snapshot:
        return Snapshot(open_fds(), frozenset(reactor.getDelayedCalls()), len(self.logs.sessions()))

    async def until(self, condition: Callable[[], bool], limit: float = WAIT) -> bool:
        """Let the reactor run until `condition()` holds (True) or `limit` seconds pass."""
        for _ in range(int(limit / 0.01)):
            if condition():
                return True
            await deferLater(reactor, 0.01)
        return condition()

    def _quiet(self, before: Snapshot | None, sessions: int) -> bool:
        lines = len(self.logs.sessions()) - (before.lines if before else 0)
        return (
            lines >= sessions
            and len(self.service.sessions) == 0
            and all(server.active == 0 for server in self.servers)
            and (before is None or len(open_fds()) <= len(before.fds))
        )

    async def assert_no_leaks(self, case: str, before: Snapshot, sessions: int) -> None:
        """
        The check every case ends with: once closes already under way have finished
        (bounded by `SETTLE`), `sessions` more session lines were logged, the session
        registry is empty, no scripted peer waits on a connection mailrelay kept, no
        file descriptor is open that was not before, and no delayed call is pending
        that was not (but the harness's).
        """
        await self.until(lambda: self._quiet(before, sessions), SETTLE)
        lines = self.logs.sessions()[before.lines :]
        self.assertGreaterEqual(len(lines), sessions, f"{case}: {len(lines)} session line(s) logged, expected {sessions}")
        self.assertEqual(len(self.service.sessions), 0, f"{case}: sessions left open after their line was logged")
        busy = [server.port for server in self.servers if server.active]
        self.assertEqual(busy, [], f"{case}: scripted peers still connected (mailrelay kept their connection)")
        now = open_fds()
        new = sorted(f"{fd} -> {target}" for fd, target in now.items() if before.fds.get(fd) != target)
        self.assertLessEqual(len(now), len(before.fds), f"{case}: file descriptors leaked: {new}")
        leaked = [_describe(call) for call in pending_calls(before.calls)]
        self.assertEqual(leaked, [], f"{case}: delayed calls left pending")

    async def quiet_snapshot(self, case: str, sessions: int) -> Snapshot:
        """The baseline: once the `sessions` sessions run so far are over and closed."""
        if not await self.until(lambda: self._quiet(None, sessions), SETTLE):
            busy = [server.port for server in self.servers if server.active]
            self.fail(
                f"{case}: the warm-up session did not end: {len(self.logs.sessions())} session line(s),"
                f" {len(self.service.sessions)} session(s) open, scripted peers connected: {busy}"
            )
        await deferLater(reactor, 0.05)  # aborts and closes due on the next turns
        return self.snapshot()

    async def check_case(
        self,
        case: str,
        fault: Callable[[], Awaitable[Any]],
        good: Callable[[], Awaitable[Any]],
        sessions: int = 1,
    ) -> Any:
        """
        Run `good` once (so that what mailrelay opens once and keeps is in the
        baseline), take the baseline, run `fault` (a case making `sessions` sessions),
        check for leaks, run `good` again (mailrelay still serves) and check again.
        Returns what `fault` returned. `case` names the case in every failure.
        """
        await good()
        before = await self.quiet_snapshot(case, 1)
        result = await fault()
        await self.assert_no_leaks(case, before, sessions)
        await good()
        await self.assert_no_leaks(case + ", then a good session", before, sessions + 1)
        return result

    def outcome(self, index: int = -1) -> tuple[str, str | None]:
        """(outcome, reason) of a logged session line."""
        line = self.logs.sessions()[index]
        return line["outcome"], line.get("reason")

    def upstream_failures(self, port: int) -> list[str]:
        """The warnings logged for failed attempts at the route to `port`."""
        return [
            str(event.get("why")) for event in self.logs.events if event.get("upstream") == f"127.0.0.1:{port}" and "why" in event
        ]
