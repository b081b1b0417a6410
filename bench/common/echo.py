"""
The echo upstream of the soak test (tests/support/soak.py, bench/soak.py): a checking
echo server, alone and behind a POP3 login.
"""

from __future__ import annotations

import asyncio
import binascii
import hashlib
import sys
import time
from typing import Any

from common.smtp_server import SMTP_MAX_LINE

ECHO_MAX_HEAD = 32
ECHO_TRAILER = 65  # the hex SHA-256 of what was echoed and a newline
POP3_USER = "soak@example.org"
POP3_PASSWORD = "soak-Pa55word"


class EchoProtocol(asyncio.Protocol):
    """
    A checking echo server. The client sends `SIZE\\n` and then SIZE bytes; every byte is
    echoed as it comes, and after the last one the server sends the hex SHA-256 of the
    SIZE bytes it received and a newline, then ends its side of the stream (a TCP
    half-close) and reads on until the client closes.

    Anything that is not such a session, a malformed head, an end of stream before SIZE
    bytes, a byte after them, a connection reset, is written to stderr as one line starting
    `echo problem:`, which the soak test fails on: the client cannot see bytes that
    arrive at the upstream after its payload.

    Reading pauses while the client does not read the echo (asyncio's write buffer
    limits), so a slow reader exerts back-pressure through the proxy, as a real server does.
    The class counts, over the process, connections, payload bytes and problems; when the
    process is told to stop it waits (up to 10 s) for its open connections to end and then
    writes them to stderr (`echo_summary`).
    """

    connections = 0
    open = 0
    payload_bytes = 0
    problems = 0

    def __init__(self) -> None:
        self.transport: Any = None
        self.head = b""
        self.left: int | None = None  # payload bytes still to come; None before the head
        self.size = 0
        self.digest = hashlib.sha256()
        self.extra = 0
        self.eof = False

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        EchoProtocol.connections += 1
        EchoProtocol.open += 1

    def problem(self, what: str) -> None:
        EchoProtocol.problems += 1
        peer = self.transport.get_extra_info("peername") if self.transport else None
        print(f"echo problem: {what} (from {peer})", file=sys.stderr, flush=True)

    def data_received(self, data: bytes) -> None:
        if self.left is None:
            self.head += data
            line, found, data = self.head.partition(b"\n")
            if not found:
                if len(self.head) > ECHO_MAX_HEAD:
                    self.problem(f"no size line in {self.head[:40]!r}")
                    self.transport.abort()
                return
            if not line.isdigit():
                self.problem(f"bad size line {line[:40]!r}")
                self.transport.abort()
                return
            self.left = self.size = int(line)
            self.head = b""
            if not self.left:
                self._finish()
        if not data:
            return
        if self.left == 0:
            self.extra += len(data)
            return
        assert self.left is not None
        part = data[: self.left] if len(data) > self.left else data
        self.left -= len(part)
        EchoProtocol.payload_bytes += len(part)
        self.digest.update(part)
        self.transport.write(part)
        if len(part) < len(data):
            self.extra += len(data) - len(part)
        if self.left == 0:
            self._finish()

    def _finish(self) -> None:
        self.transport.write(self.digest.hexdigest().encode() + b"\n")
        self.transport.write_eof()

    def pause_writing(self) -> None:
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.transport.resume_reading()

    def eof_received(self) -> bool:
        self.eof = True
        if self.left is None or self.left:
            done = "no size line" if self.left is None else f"{self.size - self.left} of {self.size} bytes"
            self.problem(f"end of stream after {done}")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        EchoProtocol.open -= 1
        if self.extra:
            self.problem(f"{self.extra} bytes after the {self.size}-byte payload")
        if not self.eof and self.left != 0:
            self.problem(f"connection lost ({exc!r}) with {self.left} payload bytes to come")


async def echo_summary() -> None:
    """Once the echo connections have ended (or 10 s passed), `echo summary: ...` on stderr."""
    deadline = time.monotonic() + 10
    while EchoProtocol.open and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    print(
        f"echo summary: connections={EchoProtocol.connections} open={EchoProtocol.open} "
        f"payload_bytes={EchoProtocol.payload_bytes} problems={EchoProtocol.problems}",
        file=sys.stderr,
        flush=True,
    )


class POP3EchoProtocol(EchoProtocol):
    """
    `EchoProtocol` behind a POP3 login, for the POP3 front-end: greets `+OK`, answers CAPA
    (USER, SASL PLAIN), USER/PASS and AUTH PLAIN with an initial response for
    POP3_USER/POP3_PASSWORD (`-ERR [AUTH]` otherwise), then is an echo server from the
    byte after the successful login's line on.
    """

    def __init__(self) -> None:
        super().__init__()
        self.lines = b""
        self.user: bytes | None = None
        self.logged_in = False

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        transport.write(b"+OK soak upstream ready\r\n")

    def data_received(self, data: bytes) -> None:
        if self.logged_in:
            super().data_received(data)
            return
        self.lines += data
        while not self.logged_in:
            line, found, rest = self.lines.partition(b"\n")
            if not found:
                if len(self.lines) > SMTP_MAX_LINE:
                    self.problem("POP3 line too long")
                    self.transport.abort()
                return
            self.lines = rest
            self._command(line.rstrip(b"\r"))
        rest, self.lines = self.lines, b""
        if rest:
            super().data_received(rest)

    def _command(self, line: bytes) -> None:
        verb, _, args = line.partition(b" ")
        verb = verb.upper()
        if verb == b"CAPA":
            self.transport.write(b"+OK\r\nUSER\r\nSASL PLAIN\r\n.\r\n")
        elif verb == b"USER":
            self.user = args
            self.transport.write(b"+OK\r\n")
        elif verb == b"PASS":
            self._verdict(self.user, args)
        elif verb == b"AUTH" and args[:6].upper() == b"PLAIN ":
            try:
                _, user, password = binascii.a2b_base64(args[6:]).split(b"\0")
            except (binascii.Error, ValueError):
                self._verdict(None, None)
                return
            self._verdict(user, password)
        else:
            self.transport.write(b"-ERR soak upstream: not here\r\n")

    def _verdict(self, user: bytes | None, password: bytes | None) -> None:
        if user == POP3_USER.encode() and password == POP3_PASSWORD.encode():
            self.logged_in = True
            self.transport.write(b"+OK soak upstream: logged in\r\n")
        else:
            self.problem(f"login refused for {user!r}")
            self.transport.write(b"-ERR [AUTH] soak upstream: wrong user or password\r\n")
