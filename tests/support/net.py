"""
Real peers for tests: blocking TCP servers and clients on loopback, run in threads so
that the proxy under test has the reactor to itself.
"""

from __future__ import annotations

import hashlib
import os
import queue
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any

from twisted.internet import reactor, threads
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import Clock, deferLater
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.trial import unittest
from zope.interface import implementer

from mailrelay.service import MailrelayService, makeService
from mailrelay.splice import SpliceableProtocol
from mailrelay.zerocopy import ZeroCopyPump
from tests.support.clocked import POLL, ClockedReactor, eventually, let_time_pass

WAIT = 60.0
"""Upper bound for any blocking wait in a test: a hang guard, never a timing assertion."""


def payload(size: int, seed: int = 0) -> bytes:
    """`size` pseudo-random bytes, the same for the same seed."""
    if seed == 0:
        return os.urandom(size)
    block = hashlib.sha512(str(seed).encode()).digest() * 1024
    return (block * (size // len(block) + 1))[:size]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def recv_all(conn: socket.socket, chunk: int = 1 << 20) -> bytes:
    parts: list[bytes] = []
    while True:
        data = conn.recv(chunk)
        if not data:
            return b"".join(parts)
        parts.append(data)


def recv_exactly(conn: socket.socket, size: int) -> bytes:
    """`size` bytes, or what came before the end of the stream."""
    data = bytearray()
    while len(data) < size:
        chunk = conn.recv(min(1 << 17, size - len(data)))
        if not chunk:
            break
        data += chunk
    return bytes(data)


def digest_after_eof(conn: socket.socket) -> int:
    """A `ThreadedServer` handler: read to the client's end of stream, then answer (the
    other direction still open) the SHA-256 of what came; the byte count is its result."""
    data = recv_all(conn)
    conn.sendall(sha(data).encode())
    return len(data)


def read_line(conn: Any) -> bytes:
    """One line, LF (or CRLF) included, read a byte at a time so that nothing behind it is
    consumed (a STARTTLS reply is followed by the TLS handshake); b"" at the end of the
    stream, or what came before it."""
    line = b""
    while not line.endswith(b"\n"):
        byte = conn.recv(1)
        if not byte:
            return line
        line += byte
    return line


def echo(conn: socket.socket) -> int:
    """ThreadedServer handler: send back everything, as it comes, until the end of stream."""
    total = 0
    while data := conn.recv(1 << 16):
        conn.sendall(data)
        total += len(data)
    return total


def closed_port() -> int:
    """A loopback port on which nothing listens (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reset(conn: socket.socket) -> None:
    """Close with a TCP reset instead of an end of stream."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


class ThreadedServer:
    """
    A blocking TCP server on 127.0.0.1: each accepted connection is handled by
    `handle(conn)` in its own thread; what it returns (or raises) is put on `results`.
    """

    def __init__(self, handle: Callable[[socket.socket], Any], host: str = "127.0.0.1") -> None:
        self.handle = handle
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.create_server((host, 0), family=family)
        self.port: int = self.sock.getsockname()[1]
        self.results: queue.Queue[Any] = queue.Queue()
        self.connections = 0
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(WAIT)
        try:
            with conn:
                self.results.put(self.handle(conn))
        except BaseException as e:
            self.results.put(e)

    def result(self, timeout: float = WAIT) -> Any:
        """The next handler result (blocking); an exception it raised is raised here."""
        value = self.results.get(timeout=timeout)
        if isinstance(value, BaseException):
            raise value
        return value

    def close(self) -> None:
        self._closed = True
        self.sock.close()


def connect(port: int) -> socket.socket:
    conn = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    return conn


def exchange(port: int, send: bytes, chunk: int = 1 << 20) -> bytes:
    """
    Connect, send `send` while receiving concurrently, shut down writing, and return
    everything received until the peer closes.
    """
    with connect(port) as conn:
        errors: list[BaseException] = []

        def sender() -> None:
            try:
                view = memoryview(send)
                for start in range(0, len(view), chunk):
                    conn.sendall(view[start : start + chunk])
                conn.shutdown(socket.SHUT_WR)
            except BaseException as e:
                errors.append(e)

        thread = threading.Thread(target=sender, daemon=True)
        thread.start()
        received = recv_all(conn)
        thread.join(WAIT)
        if errors:
            raise errors[0]
        return received


@implementer(ILogObserver)
class LogCapture:
    """Collects every log event published while it is attached."""

    def __init__(self) -> None:
        self.events: list[LogEvent] = []

    def __call__(self, event: LogEvent) -> None:
        self.events.append(event)

    def lines(self) -> list[str]:
        return [formatEvent(e) for e in self.events]

    def sessions(self) -> list[LogEvent]:
        """The one-line-per-session summary events."""
        return [e for e in self.events if "session_id" in e and "outcome" in e]


class ProxyTestCase(unittest.TestCase):
    """Starts mailrelay in this process's reactor on a loopback port."""

    def setUp(self) -> None:
        self.logs = LogCapture()
        globalLogPublisher.addObserver(self.logs)
        self.addCleanup(globalLogPublisher.removeObserver, self.logs)
        self.addCleanup(end_lingering_closes)  # runs last: after the clients' sockets are closed

    async def start_proxy(
        self, config: dict[str, Any], router: Any = None, clock: Clock | None = None
    ) -> tuple[MailrelayService, int]:
        """Start a service whose first listener binds a free loopback port; return it and the port.
        With a `clock`, every mailrelay timer runs on it (`ClockedReactor`): the test
        advances it, and stopping the service lets its time pass until it has stopped."""
        service = makeService(config, router=router, reactor=reactor if clock is None else ClockedReactor(reactor, clock))
        service.startService()
        if clock is None:
            self.addCleanup(service.stopService)
        else:
            self.addCleanup(lambda: Deferred.fromCoroutine(let_time_pass(clock, service.stopService())))
        listener = next(iter(service.listeners.values()))
        assert listener.port is not None
        port = await listener.port
        return service, tcp_port(port)

    def black_hole(self) -> tuple[str, int]:
        """An address whose accept queue is full, so connections to it are never
        answered: the loopback equivalent of an unreachable host."""
        listener = socket.socket()
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        filler = socket.create_connection(listener.getsockname())
        self.addCleanup(filler.close)
        return listener.getsockname()

    def server(self, handle: Callable[[socket.socket], Any], host: str = "127.0.0.1") -> ThreadedServer:
        server = ThreadedServer(handle, host)
        self.addCleanup(server.close)
        return server

    def in_thread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run blocking client code off the reactor thread; a Deferred of its result."""
        return threads.deferToThread(f, *args, **kwargs)

    async def session_line(self) -> Any:
        """The last session line, once one is logged (hang guard: WAIT)."""
        await self.eventually(self.logs.sessions, "no session line was logged")
        return self.logs.sessions()[-1]

    async def eventually(self, condition: Callable[[], object], failure: str) -> None:
        """Let the reactor and the client threads run until `condition()` holds; fail
        with `failure` if it does not within WAIT (a hang guard, not a timing check):
        how a test on a clock waits for its client's bytes to be handled before it
        advances the clock."""
        if not await eventually(condition, int(WAIT / POLL)):
            self.fail(failure)


def tcp_port(listening: IListeningPort) -> int:
    """The TCP port number a listening port was bound to (port 0 asks for a free one)."""
    address = listening.getHost()
    assert isinstance(address, (IPv4Address, IPv6Address)), address
    return address.port


def is_lingering_close(call: Any) -> bool:
    """Whether the delayed `call` is the timer of a lingering close."""
    return getattr(getattr(call, "func", None), "__name__", None) == SpliceableProtocol._linger_expired.__name__


async def end_lingering_closes() -> None:
    """Wait until mailrelay's lingering closes (`SpliceableProtocol.close_lingering`) on
    the real reactor have seen their clients' end of stream, as they do a moment after
    a test closes its sockets (a client a test left open is closed by the lingering
    close's own timeout), so that the test ends with a clean reactor; abort any left
    after that."""

    def lingering() -> list[Any]:
        return [call for call in reactor.getDelayedCalls() if is_lingering_close(call)]

    for _ in range(int((SpliceableProtocol.linger_timeout + 1) / POLL)):
        if not lingering():
            return
        await deferLater(reactor, POLL)
    for call in lingering():
        call.func.__self__.transport.abortConnection()
    await deferLater(reactor, 0)


def zero_copy_pumps() -> set[ZeroCopyPump]:
    """The zero-copy pumps the reactor is watching sockets for."""
    selectables = set(reactor.getReaders()) | set(reactor.getWriters())
    pumps = (getattr(selectable, "pump", None) for selectable in selectables)
    return {pump for pump in pumps if isinstance(pump, ZeroCopyPump)}


def splice_config(*routes: tuple[str, int], **listener: Any) -> dict[str, Any]:
    """A one-listener splice config on a free loopback port, routed statically."""
    return {
        "router": {"type": "static", "routes": [{"host": h, "port": p} for h, p in routes]},
        "listener": [{"name": "test", "listen": "tcp:0:interface=127.0.0.1", "mode": "splice", **listener}],
    }
