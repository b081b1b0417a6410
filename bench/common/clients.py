"""
The client side of the benchmarks: connections (plain, or TLS through `TLSDial`), the
line sessions and bulk transfers the upstream of `common.upstream` answers, and the
pieces the SMTP and IMAP benchmarks' own sessions share.
"""

from __future__ import annotations

import os
import socket
import ssl
import time
from collections.abc import Callable

from common.wire import CHUNK, HOST, IO_TIMEOUT, QUIT, SESSION_COMMANDS

Dial = Callable[[int], socket.socket]
"""Opens a client connection to a port on HOST (plain TCP, or TLS on top)."""


def connect(port: int) -> socket.socket:
    sock = socket.create_connection((HOST, port), timeout=IO_TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class TLSDial:
    """
    A TLS client that verifies the server against `cafile` and sends `server_name` as SNI.
    It never offers a session to resume (Python resumes only when given `session=`), so
    every connection is a full handshake; one that was resumed anyway is an error.
    """

    def __init__(self, cafile: str, server_name: str) -> None:
        self.cafile = cafile
        self.server_name = server_name
        self._contexts: dict[int, ssl.SSLContext] = {}

    def context(self) -> ssl.SSLContext:
        # One per process: contexts are made after a fork, never inherited through one.
        context = self._contexts.get(os.getpid())
        if context is None:
            context = self._contexts[os.getpid()] = ssl.create_default_context(cafile=self.cafile)
        return context

    def __call__(self, port: int) -> socket.socket:
        return self.wrap(connect(port))

    def wrap(self, sock: socket.socket) -> ssl.SSLSocket:
        """The TLS client handshake on a connected socket (at connect, or after STARTTLS)."""
        tls = self.context().wrap_socket(sock, server_hostname=self.server_name)
        if tls.session_reused:
            tls.close()
            raise ConnectionError("TLS session was resumed")
        return tls


def read_line(sock: socket.socket) -> bytes:
    data = sock.recv(4096)
    while not data.endswith(b"\n"):
        more = sock.recv(4096)
        if not more:
            raise ConnectionError(f"connection closed after {data!r}")
        data += more
    return data


def pieces_of(line: bytes, pieces: int) -> list[bytes]:
    """`line` cut into `pieces` consecutive parts of about the same size."""
    pieces = max(1, min(pieces, len(line)))
    bounds = [round(i * len(line) / pieces) for i in range(pieces + 1)]
    return [line[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def command(sock: socket.socket, parts: list[bytes], expect: bytes) -> None:
    for part in parts:
        sock.sendall(part)
    reply = read_line(sock)
    if not reply.startswith(expect):
        raise ConnectionError(f"expected {expect!r}..., got {reply!r}")


def one_session(
    port: int, commands: list[list[bytes]], quit_parts: list[bytes], dial: Dial = connect, until_closed: bool = False
) -> None:
    """connect, greeting, each command -> 250, QUIT -> 221, (`until_closed`: the server closes,) close."""
    with dial(port) as sock:
        if not read_line(sock).startswith(b"220"):
            raise ConnectionError("no greeting")
        for parts in commands:
            command(sock, parts, b"250")
        command(sock, quit_parts, b"221")
        if until_closed and sock.recv(4096):
            raise ConnectionError("data after 221")


def session_script(pieces: int) -> tuple[list[list[bytes]], list[bytes]]:
    return [pieces_of(c, pieces) for c in SESSION_COMMANDS], pieces_of(QUIT, pieces)


def bulk_up(port: int, size: int, dial: Dial = connect) -> float:
    """Client -> upstream: seconds from the request to the sink's acknowledgement."""
    buf = memoryview(bytearray(CHUNK))
    with dial(port) as sock:
        start = time.perf_counter()
        sink(sock, size, buf)
        return time.perf_counter() - start


def bulk_down(port: int, size: int, dial: Dial = connect) -> float:
    """Upstream -> client: seconds from the request to the last byte received."""
    buf = memoryview(bytearray(CHUNK))
    with dial(port) as sock:
        start = time.perf_counter()
        source(sock, size, buf)
        return time.perf_counter() - start


def sink(sock: socket.socket, size: int, buf: memoryview) -> None:
    """`SINK size` on a connected bulk socket: the request, `size` bytes (from `buf`, CHUNK
    bytes), until the sink's acknowledgement, which must count `size` bytes (ConnectionError
    if not)."""
    sock.sendall(b"SINK %d\n" % size)
    left = size
    while left:
        n = min(left, CHUNK)
        sock.sendall(buf[:n])
        left -= n
    reply = read_line(sock)
    if int(reply) != size:
        raise ConnectionError(f"sink got {int(reply)} bytes of {size}")


def source(sock: socket.socket, size: int, buf: memoryview) -> None:
    """`SOURCE size` on a connected bulk socket: the request, then until `size` bytes have
    arrived (into `buf`, CHUNK bytes; ConnectionError if the connection ends sooner)."""
    sock.sendall(b"SOURCE %d\n" % size)
    got = 0
    while got < size:
        n = sock.recv_into(buf, min(CHUNK, size - got))
        if not n:
            raise ConnectionError(f"source sent {got} bytes of {size}")
        got += n


def bulk_span(direction: str, port: int, size: int, buf: memoryview, dial: Dial = connect) -> tuple[float, float]:
    """
    One transfer of `size` bytes (`direction` "up": `sink`, "down": `source`; `buf`: CHUNK
    bytes) on a new connection: `time.monotonic()` before the connect and after the
    acknowledgement (the last byte). CLOCK_MONOTONIC is one clock for every process of the
    machine, so spans measured in different client processes can be compared.
    """
    transfer = sink if direction == "up" else source
    start = time.monotonic()
    with dial(port) as sock:
        transfer(sock, size, buf)
        return start, time.monotonic()


def negotiated(sock: ssl.SSLSocket) -> str:
    """The TLS version and cipher a client's handshake settled on (`TLSv1.3 TLS_AES_256_GCM_SHA384`)."""
    cipher = sock.cipher()
    return f"{sock.version()} {cipher[0] if cipher else '?'}"


def make_message(size: int, headers: bytes) -> bytes:
    """A plain-text message of exactly `size` bytes: `headers` (CRLF-ended lines), a blank
    line, then a body of CRLF lines, none starting with a dot."""
    head = headers + b"\r\n"
    line = b"The quick brown fox jumps over the lazy dog, 0123456789 times over and again.\r\n"
    lines, rest = divmod(size - len(head) - 2, len(line))
    if lines < 0:
        raise ValueError(f"a message needs at least {len(head) + 2} bytes")
    return head + line * lines + b"x" * rest + b"\r\n"
