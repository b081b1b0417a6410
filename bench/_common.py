"""
What the benchmarks in bench/ share: process hygiene, the upstream servers, the clients,
starting mailrelay (twistd) and third-party proxies, measuring, and the report.

Run as a script, this module is the upstream process (`Upstream.start` does that):

    python bench/_common.py --procs N [--tls PEM [--smtp]] [--echo]

It prints `ports bulk=P line=P [tls_bulk=P tls_line=P] [smtp=P auth_http=P] [echo=P
pop3_echo=P]` and serves until its stdin closes. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import binascii
import ctypes
import functools
import hashlib
import multiprocessing
import os
import platform
import re
import resource
import select
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import unquote

HOST = "127.0.0.1"
CHUNK = 4 << 20  # application buffer for bulk transfers, both ends
IO_TIMEOUT = 60.0  # hang guard for every client socket
MB = 1_000_000

GREETING = b"220 bench.example ESMTP ready\r\n"
OK = b"250 ok\r\n"
BYE = b"221 bye\r\n"
SESSION_COMMANDS = (
    b"EHLO client.example.org\r\n",
    b"MAIL FROM:<sender@example.org>\r\n",
    b"RCPT TO:<rcpt@example.net>\r\n",
)
QUIT = b"QUIT\r\n"
NOOP = b"NOOP\r\n"

Dial = Callable[[int], socket.socket]
"""Opens a client connection to a port on HOST (plain TCP, or TLS on top)."""


# --------------------------------------------------------------------------------------
# Process hygiene


def _libc() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


_LIBC = _libc()


def die_with_parent() -> None:
    """In a child before exec: get SIGTERM when the bench process dies (Linux)."""
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _proc_stats() -> Any:
    """(fields of /proc/PID/stat from field 3, `state`, on) for every process."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        yield stat[stat.rfind(b")") + 2 :].split()


def cpu_of_group(pgid: int, reaped: bool = False) -> float:
    """
    CPU seconds (user+system) used so far by the live processes of a process group; with
    `reaped`, also by the children they have collected after they exited (cutime, cstime):
    for a server that forks a short-lived process per connection, such as Dovecot.
    """
    # fields[0] is field 3 (state): pgrp is field 5, utime 14, stime 15, cutime 16, cstime 17.
    ticks = sum(int(f[11]) + int(f[12]) + (int(f[13]) + int(f[14]) if reaped else 0) for f in _proc_stats() if int(f[2]) == pgid)
    return ticks / os.sysconf("SC_CLK_TCK")


def _signal_group_and_wait(proc: subprocess.Popen[Any], sig: int, grace: float) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        pass


def _group_alive(pgid: int) -> bool:
    return any(int(f[2]) == pgid and f[0] != b"Z" for f in _proc_stats())


def machine_busy() -> float:
    """CPU seconds all cores of the machine spent on anything but idling so far (/proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal ...: idle, iowait and steal are not work done here.
    busy = sum(fields[:8]) - fields[3] - fields[4] - fields[7]
    return busy / os.sysconf("SC_CLK_TCK")


def own_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Children:
    """Every process this script started; `stop_all()` ends them by process group id."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[Any]] = []
        self.workers: list[multiprocessing.process.BaseProcess] = []

    def popen(self, argv: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        proc = subprocess.Popen(argv, start_new_session=True, preexec_fn=die_with_parent, **kwargs)
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[Any], grace: float = 5.0) -> None:
        """SIGTERM to the process's own group (pgid == its pid), SIGKILL to what is left."""
        if proc.poll() is None:
            _signal_group_and_wait(proc, signal.SIGTERM, grace)
        # Members of its group still alive (nginx workers, forked upstream servers, or
        # the process itself if SIGTERM was not enough): the group id cannot have been
        # reused while they exist.
        if proc.poll() is None or _group_alive(proc.pid):
            _signal_group_and_wait(proc, signal.SIGKILL, grace)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()

    def stop_all(self) -> None:
        for worker in self.workers:
            if worker.is_alive():
                worker.terminate()
        for worker in self.workers:
            worker.join(2)
            if worker.is_alive():
                worker.kill()
                worker.join(2)
        for proc in reversed(self.procs):
            self.stop(proc)


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None, only: tuple[str, ...]) -> argparse.Namespace:
    """Add the options every benchmark ends with (--no-others, --only, --keep) and parse `argv`."""
    parser.add_argument("--no-others", dest="others", action="store_false", help="do not run haproxy/nginx even if on PATH")
    parser.add_argument("--only", default=",".join(only), help=f"comma-separated subset of: {', '.join(only)}")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (configs, logs) and print its path")
    args = parser.parse_args(argv)
    args.only = {part.strip() for part in args.only.split(",") if part.strip()}
    unknown = args.only - set(only)
    if unknown:
        parser.error(f"--only: unknown {', '.join(sorted(unknown))}")
    return args


def _raise_on_signal(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_bench(args: argparse.Namespace, run: Callable[[argparse.Namespace, Children, Path, list[str]], int]) -> int:
    """
    `run(args, children, workdir, failures)` with the hygiene around it: SIGTERM and SIGHUP
    stop the bench like Ctrl-C, and every process it started is ended however it ends.
    """
    signal.signal(signal.SIGTERM, _raise_on_signal)
    signal.signal(signal.SIGHUP, _raise_on_signal)
    children = Children()
    workdir = Path(tempfile.mkdtemp(prefix="mailrelay-bench-"))
    failures: list[str] = []
    try:
        return run(args, children, workdir, failures)
    except RuntimeError as e:  # a server that would not start: say why, without a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: stopping every process the bench started", file=sys.stderr)
        return 130
    finally:
        children.stop_all()
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


# --------------------------------------------------------------------------------------
# Upstream servers (run in their own process group: this file as a script)


def _bulk_connection(conn: socket.socket, zeros: memoryview, tls: ssl.SSLContext | None) -> None:
    """`SINK n\\n` + n bytes -> `n\\n`;  `SOURCE n\\n` -> n bytes."""
    with conn:
        conn.settimeout(IO_TIMEOUT)
        if tls is not None:
            try:
                conn = tls.wrap_socket(conn, server_side=True)
            except OSError:
                return
        head = b""
        while b"\n" not in head:
            data = conn.recv(256)
            if not data:
                return
            head += data
        line, rest = head.split(b"\n", 1)
        verb, size_text = line.split()
        size = int(size_text)
        if verb == b"SINK":
            got = len(rest)
            sink = bytearray(CHUNK)
            view = memoryview(sink)
            while got < size:
                n = conn.recv_into(view, min(CHUNK, size - got))
                if not n:
                    return
                got += n
            conn.sendall(b"%d\n" % got)
        elif verb == b"SOURCE":
            left = size
            while left:
                n = min(left, CHUNK)
                conn.sendall(zeros[:n])
                left -= n
        # Wait for the client to close first, so that no RST races the last bytes.
        try:
            while conn.recv(65536):
                pass
        except OSError:
            pass


def _bulk_server(sock: socket.socket, tls: ssl.SSLContext | None) -> None:
    zeros = memoryview(bytes(CHUNK))
    while True:
        conn, _ = sock.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=_bulk_connection, args=(conn, zeros, tls), daemon=True).start()


class LineProtocol(asyncio.Protocol):
    """An SMTP-like server: greeting, `250 ok` per line, `221 bye` + close on QUIT."""

    def connection_made(self, transport: Any) -> None:  # asyncio sets TCP_NODELAY (see _reuseport_socket)
        self.transport = transport
        self.buffer = b""
        transport.write(GREETING)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        out = []
        while True:
            end = self.buffer.find(b"\n")
            if end < 0:
                break
            line, self.buffer = self.buffer[: end + 1], self.buffer[end + 1 :]
            if line[:4].upper() == b"QUIT":
                out.append(BYE)
                self.transport.write(b"".join(out))
                self.transport.close()
                return
            out.append(OK)
        if out:
            self.transport.write(b"".join(out))

    def eof_received(self) -> bool:
        return False


# The SMTP upstream of bench/smtp.py (and the account its clients and nginx's auth_http use).
SMTP_USER = "bench@example.org"
SMTP_PASSWORD = "bench-Pa55word"
SMTP_HOSTNAME = "upstream.bench.example"
SMTP_MAX_LINE = 4096
_SMTP_EHLO = (
    b"250-" + SMTP_HOSTNAME.encode() + b"\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n250-SIZE 52428800\r\n"
)
SMTP_EHLO_PLAIN = _SMTP_EHLO + b"250-AUTH PLAIN\r\n250 STARTTLS\r\n"
SMTP_EHLO_TLS = _SMTP_EHLO + b"250 AUTH PLAIN\r\n"


def plain_response(user: str, password: str) -> bytes:
    """The base64 of a SASL PLAIN initial response (no authorization identity)."""
    return binascii.b2a_base64(b"\0" + user.encode() + b"\0" + password.encode(), newline=False)


class SMTPServerProtocol(asyncio.Protocol):
    """
    A small, fast SMTP server: ESMTP with STARTTLS (`tls`: the bench certificate) and AUTH
    PLAIN for SMTP_USER/SMTP_PASSWORD (accepted with or without TLS; with or without an
    initial response), MAIL (after AUTH only), RCPT, DATA read to the end marker and
    answered `250 ... (N bytes)` with the size of what it read, RSET, NOOP, QUIT.
    Commands may be pipelined; nothing is stored.
    """

    def __init__(self, tls: ssl.SSLContext) -> None:
        self.tls_context = tls
        self.transport: Any = None
        self.buffer = b""
        self.tls = False
        self.helo = self.authenticated = self.auth_pending = self.mail = self.in_data = False
        self.rcpts = 0
        self.tail = b""  # the last bytes of the message read so far (the end marker may straddle reads)
        self.size = 0
        self.task: asyncio.Task[None] | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.write(b"220 " + SMTP_HOSTNAME.encode() + b" ESMTP ready\r\n")

    def data_received(self, data: bytes) -> None:
        if self.task is not None:
            # The TLS handshake is done but start_tls() has not returned the TLS transport
            # yet (the client's first command came with its Finished): wait for it.
            self.buffer += data
            return
        out: list[bytes] = []
        if self.buffer:
            data, self.buffer = self.buffer + data, b""
        while data:
            if self.in_data:
                data = self._message(data, out)
                continue
            end = data.find(b"\n")
            if end < 0:
                if len(data) > SMTP_MAX_LINE:
                    out.append(b"500 5.5.6 line too long\r\n")
                    break
                self.buffer = data
                break
            line, data = data[: end + 1], data[end + 1 :]
            action = self._command(line.rstrip(b"\r\n"), out)
            if action == "quit":
                self.transport.write(b"".join(out))
                self.transport.close()
                return
            if action == "starttls":
                self.transport.write(b"".join(out))
                if data:  # plaintext pipelined behind STARTTLS (RFC 3207: never to be executed)
                    self.transport.abort()
                    return
                # Not a byte more in plaintext: the ClientHello goes to the TLS layer.
                self.transport.pause_reading()
                self.task = asyncio.get_running_loop().create_task(self._start_tls())
                return
        if out:
            self.transport.write(b"".join(out))

    def _message(self, data: bytes, out: list[bytes]) -> bytes:
        """Message data up to the end marker; what follows it (pipelined commands)."""
        probe = self.tail + data
        end = probe.find(b"\r\n.\r\n")
        if end < 0:
            self.size += len(data)
            self.tail = probe[-4:]
            return b""
        self.size += end + 2 - len(self.tail)  # up to and including the CRLF before the dot
        out.append(b"250 2.0.0 Ok: queued (%d bytes)\r\n" % self.size)
        self.in_data = self.mail = False
        self.rcpts = 0
        return data[end + 5 - len(self.tail) :]

    def _command(self, line: bytes, out: list[bytes]) -> str | None:
        if self.auth_pending:
            self.auth_pending = False
            out.append(self._check_plain(line))
            return None
        verb = line[:8].split(b" ", 1)[0].upper()
        if verb == b"EHLO":
            self.helo, self.mail, self.rcpts = True, False, 0
            out.append(SMTP_EHLO_TLS if self.tls else SMTP_EHLO_PLAIN)
        elif verb == b"HELO":
            self.helo, self.mail, self.rcpts = True, False, 0
            out.append(b"250 " + SMTP_HOSTNAME.encode() + b"\r\n")
        elif verb == b"STARTTLS":
            if self.tls:
                out.append(b"503 5.5.1 TLS already active\r\n")
                return None
            out.append(b"220 2.0.0 Ready to start TLS\r\n")
            return "starttls"
        elif verb == b"AUTH":
            words = line.split()
            if not self.helo or self.authenticated or self.mail:
                out.append(b"503 5.5.1 Error: EHLO first, once, and not in a transaction\r\n")
            elif len(words) < 2 or words[1].upper() != b"PLAIN":
                out.append(b"504 5.5.4 Unrecognized authentication type\r\n")
            elif len(words) == 2:
                self.auth_pending = True
                out.append(b"334 \r\n")
            else:
                out.append(self._check_plain(words[2]))
        elif verb == b"MAIL":
            if not self.authenticated:
                out.append(b"530 5.7.0 Authentication required\r\n")
            elif self.mail:
                out.append(b"503 5.5.1 Error: nested MAIL command\r\n")
            else:
                self.mail = True
                out.append(b"250 2.1.0 Ok\r\n")
        elif verb == b"RCPT":
            if not self.mail:
                out.append(b"503 5.5.1 Error: need MAIL command\r\n")
            else:
                self.rcpts += 1
                out.append(b"250 2.1.5 Ok\r\n")
        elif verb == b"DATA":
            if not self.rcpts:
                out.append(b"503 5.5.1 Error: need RCPT command\r\n")
            else:
                self.in_data, self.tail, self.size = True, b"\r\n", 0
                out.append(b"354 End data with <CR><LF>.<CR><LF>\r\n")
        elif verb == b"RSET":
            self.mail, self.rcpts = False, 0
            out.append(b"250 2.0.0 Ok\r\n")
        elif verb == b"NOOP":
            out.append(b"250 2.0.0 Ok\r\n")
        elif verb == b"QUIT":
            out.append(b"221 2.0.0 Bye\r\n")
            return "quit"
        else:
            out.append(b"502 5.5.2 Error: command not recognized\r\n")
        return None

    def _check_plain(self, response: bytes) -> bytes:
        if response == b"*":
            return b"501 5.7.0 Authentication cancelled\r\n"
        try:
            _, user, password = binascii.a2b_base64(response).split(b"\0")
        except (binascii.Error, ValueError):
            return b"501 5.5.2 Cannot decode the response\r\n"
        if user == SMTP_USER.encode() and password == SMTP_PASSWORD.encode():
            self.authenticated = True
            return b"235 2.7.0 Authentication successful\r\n"
        return b"535 5.7.8 Authentication credentials invalid\r\n"

    async def _start_tls(self) -> None:
        try:
            transport = await asyncio.get_running_loop().start_tls(self.transport, self, self.tls_context, server_side=True)
        except Exception:  # a client that gave up in the handshake: nothing to report
            self.transport.abort()
            return
        if transport is None:
            return
        # RFC 3207: forget everything from before TLS.
        self.transport, self.tls, self.task = transport, True, None
        self.helo = self.authenticated = self.mail = False
        self.rcpts = 0
        if self.buffer:
            data, self.buffer = self.buffer, b""
            self.data_received(data)

    def eof_received(self) -> bool:
        return False


class AuthHTTPProtocol(asyncio.Protocol):
    """
    nginx's auth_http for bench/smtp.py: `Auth-Status: OK` with the SMTP upstream's
    address for SMTP_USER/SMTP_PASSWORD, `Invalid login` otherwise; one request per
    connection (HTTP/1.0), as nginx asks.
    """

    def __init__(self, smtp_port: int) -> None:
        self.smtp_port = smtp_port
        self.buffer = b""

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        head, found, _ = self.buffer.partition(b"\r\n\r\n")
        if not found:
            return
        headers = {}
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = unquote(value.strip().decode("latin-1"))
        if headers.get(b"auth-user") == SMTP_USER and headers.get(b"auth-pass") == SMTP_PASSWORD:
            answer = f"Auth-Status: OK\r\nAuth-Server: {HOST}\r\nAuth-Port: {self.smtp_port}\r\n"
        else:
            answer = "Auth-Status: Invalid login\r\nAuth-Wait: 1\r\n"
        self.transport.write(b"HTTP/1.0 200 OK\r\n" + answer.encode() + b"\r\n")
        self.transport.close()


# The echo upstream of the soak test (tests/soak_support.py, bench/soak.py).
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


Served = tuple[socket.socket, str, ssl.SSLContext | None]
"""A listening socket of the asyncio upstream, what it serves (`line`, `smtp`, `auth_http`),
and its TLS context: a line port speaks TLS from the start; the SMTP port offers STARTTLS."""


def _server_loop(listeners: list[Served], parent_pipe: int | None) -> None:
    """The asyncio servers of one upstream process, until `parent_pipe` closes (if given)."""
    smtp_port = next((sock.getsockname()[1] for sock, kind, _ in listeners if kind == "smtp"), 0)

    def factory(kind: str, tls: ssl.SSLContext | None) -> Callable[[], asyncio.Protocol]:
        if kind == "smtp":
            assert tls is not None
            return lambda: SMTPServerProtocol(tls)
        if kind == "auth_http":
            return lambda: AuthHTTPProtocol(smtp_port)
        if kind == "echo":
            return EchoProtocol
        if kind == "pop3_echo":
            return POP3EchoProtocol
        return LineProtocol

    async def main() -> None:
        loop = asyncio.get_running_loop()
        servers = [
            await loop.create_server(factory(kind, tls), sock=sock, ssl=tls if kind == "line" else None, backlog=4096)
            for sock, kind, tls in listeners
        ]
        done = loop.create_future()

        def parent_gone() -> None:
            if not done.done():
                done.set_result(None)

        if parent_pipe is not None:
            # The parent's end of the pipe closes when it exits, however it exits.
            loop.add_reader(parent_pipe, parent_gone)
        await done
        for server in servers:
            server.close()
        if any(kind in ("echo", "pop3_echo") for _, kind, _ in listeners):
            await echo_summary()

    asyncio.run(main())


def _reuseport_socket(port: int) -> socket.socket:
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets whose `proto` says TCP.
    # Without it, the TLS server's close_notify after `221` waited for the client's
    # delayed ACK (40 ms).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((HOST, port))
    return sock


def server_tls_context(pem: str) -> ssl.SSLContext:
    """The upstream's TLS: Python's defaults for a server (TLS 1.2+), certificate and key from `pem`."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pem)
    return context


def serve_upstream(line_procs: int, tls_pem: str | None, smtp: bool = False, echo: bool = False) -> None:
    """Entry point of the upstream process: prints its ports and serves until stdin closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the bench stops us; Ctrl-C is its business
    tls = None if tls_pem is None else server_tls_context(tls_pem)
    contexts: list[ssl.SSLContext | None] = [None] if tls is None else [None, tls]
    bulk = [(socket.create_server((HOST, 0), backlog=128), context) for context in contexts]
    served: list[tuple[str, ssl.SSLContext | None]] = [("line", context) for context in contexts]
    if smtp:
        if tls is None:
            raise SystemExit("--smtp needs --tls (the certificate STARTTLS uses)")
        served += [("smtp", tls), ("auth_http", None)]
    if echo:
        served += [("echo", None), ("pop3_echo", None)]
    socks = [_reuseport_socket(0) for _ in served]
    ports = [sock.getsockname()[1] for sock in socks]
    # More processes on the same ports (SO_REUSEPORT spreads the connections), so that a
    # single-threaded upstream is not what limits sessions/s.
    for _ in range(max(0, line_procs - 1)):
        pid = os.fork()
        if pid == 0:
            die_with_parent()
            for sock in socks:
                sock.close()
            own = [_reuseport_socket(port) for port in ports]
            for sock in own:
                sock.listen(4096)
            try:
                _server_loop([(sock, kind, context) for sock, (kind, context) in zip(own, served, strict=True)], None)
            finally:
                os._exit(0)
    for sock, context in bulk:
        threading.Thread(target=_bulk_server, args=(sock, context), daemon=True).start()
    for sock in socks:
        sock.listen(4096)
    names = {"bulk": bulk[0][0], "line": socks[0]}
    if tls is not None:
        names.update(tls_bulk=bulk[1][0], tls_line=socks[1])
    if smtp:
        names.update(smtp=socks[2], auth_http=socks[3])
    if echo:
        names.update(echo=socks[-2], pop3_echo=socks[-1])
    print("ports " + " ".join(f"{name}={sock.getsockname()[1]}" for name, sock in names.items()), flush=True)
    _server_loop([(sock, kind, context) for sock, (kind, context) in zip(socks, served, strict=True)], sys.stdin.fileno())


class Upstream:
    """
    The upstream process: plain bulk and line ports, with `tls_pem` their TLS twins, and
    with `smtp` too an SMTP server offering STARTTLS and AUTH PLAIN, and nginx's auth_http;
    with `echo` the checking echo servers (`EchoProtocol`, `POP3EchoProtocol`). Its stderr
    goes to `stderr` (a file object; default: ours).
    """

    def __init__(
        self,
        children: Children,
        line_procs: int,
        tls_pem: str | None = None,
        smtp: bool = False,
        echo: bool = False,
        stderr: Any = None,
    ) -> None:
        # Its own process (group), told to stop when our end of its stdin closes.
        argv = [sys.executable, os.path.abspath(__file__), "--procs", str(line_procs)]
        argv += (["--tls", tls_pem] if tls_pem else []) + (["--smtp"] if smtp else []) + (["--echo"] if echo else [])
        self.proc = children.popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 20)
        line = self.proc.stdout.readline().decode() if ready else ""
        if not line.startswith("ports "):
            raise RuntimeError(f"the upstream process did not start (said {line!r})")
        ports = {name: int(port) for name, _, port in (item.partition("=") for item in line.split()[1:])}
        self.bulk, self.line = ports["bulk"], ports["line"]
        self.tls_bulk, self.tls_line = ports.get("tls_bulk", 0), ports.get("tls_line", 0)
        self.smtp, self.auth_http = ports.get("smtp", 0), ports.get("auth_http", 0)
        self.echo, self.pop3_echo = ports.get("echo", 0), ports.get("pop3_echo", 0)


# --------------------------------------------------------------------------------------
# Clients


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
        sock.sendall(b"SINK %d\n" % size)
        left = size
        while left:
            n = min(left, CHUNK)
            sock.sendall(buf[:n])
            left -= n
        reply = read_line(sock)
        elapsed = time.perf_counter() - start
    if int(reply) != size:
        raise ConnectionError(f"sink got {int(reply)} bytes of {size}")
    return elapsed


def bulk_down(port: int, size: int, dial: Dial = connect) -> float:
    """Upstream -> client: seconds from the request to the last byte received."""
    buf = memoryview(bytearray(CHUNK))
    with dial(port) as sock:
        start = time.perf_counter()
        sock.sendall(b"SOURCE %d\n" % size)
        got = 0
        while got < size:
            n = sock.recv_into(buf, min(CHUNK, size - got))
            if not n:
                raise ConnectionError(f"source sent {got} bytes of {size}")
            got += n
        elapsed = time.perf_counter() - start
    return elapsed


# --------------------------------------------------------------------------------------
# Targets: what the clients connect to


@dataclass
class Target:
    """
    Somewhere to send the traffic: its bulk and line ports (a bulk port of 0: no bulk
    tests), how a client connects to them, and whose CPU to count.
    """

    name: str
    bulk_port: int
    line_port: int
    pgid: int | None
    note: str = ""
    dial: Dial = connect
    until_closed: bool = False
    """Sessions read on after `221` until the server has closed."""
    log_files: list[Path] = field(default_factory=list)
    proc: subprocess.Popen[Any] | None = None

    def session(self, commands: list[list[bytes]], quit_parts: list[bytes]) -> None:
        one_session(self.line_port, commands, quit_parts, self.dial, self.until_closed)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_until_serving(target: Target, proc: subprocess.Popen[Any], timeout: float, what: str) -> None:
    """Until one whole session works through `target` (and the process is still there)."""
    deadline = time.monotonic() + timeout
    commands, quit_parts = session_script(1)
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode}")
        try:
            target.session(commands, quit_parts)
            return
        except OSError as e:
            last_error = e
            time.sleep(0.05)
    raise RuntimeError(f"{what} does not serve within {timeout:g}s: {last_error!r}")


LISTENER_LINE = re.compile(r"listener (\S+) on 127\.0\.0\.1:(\d+)")


def twistd_command() -> str:
    twistd = Path(sys.executable).parent / "twistd"
    return str(twistd) if twistd.exists() else (shutil.which("twistd") or "twistd")


def start_twistd(
    children: Children, workdir: Path, name: str, config_text: str, listeners: int, python_wrapper: str | None = None
) -> tuple[subprocess.Popen[Any], dict[str, int], Path, list[str]]:
    """
    `twistd -n mailrelay --config TMP/NAME.toml` (or `python -c WRAPPER` with the same
    arguments), until its log names the ports of `listeners` listeners.
    Returns (process, {listener name: port}, log file, twistd's arguments).
    """
    config = workdir / f"{name}.toml"
    config.write_text(config_text)
    log = workdir / f"{name}.log"
    log.unlink(missing_ok=True)  # twistd appends: old listener lines would give old ports
    twistd_args = ["-n", "--pidfile=", f"--logfile={log}", "mailrelay", "--config", str(config)]
    argv = [sys.executable, "-c", python_wrapper, *twistd_args] if python_wrapper else [twistd_command(), *twistd_args]
    with open(workdir / f"{name}.out", "wb") as out:
        proc = children.popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    ports: dict[str, int] = {}
    deadline = time.monotonic() + 30
    while len(ports) < listeners:
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = (workdir / f"{name}.out").read_text(errors="replace")[-2000:]
            if log.exists():
                tail += log.read_text(errors="replace")[-2000:]
            raise RuntimeError(
                f"{name} did not start listening (exit status {proc.poll()}); is mailrelay installed "
                f"in this venv (`.venv/bin/pip install .`)?\n{tail}"
            )
        if log.exists():
            for m in LISTENER_LINE.finditer(log.read_text(errors="replace")):
                ports[m.group(1)] = int(m.group(2))
        time.sleep(0.05)
    return proc, ports, log, twistd_args


SERVER_NAME = "localhost"  # what TLS clients ask for (SNI) and verify; the certificate also names 127.0.0.1


class Certificates:
    """
    One ECDSA P-256 CA and one ECDSA P-256 server certificate for `localhost` and
    127.0.0.1, made by trustme, as files in `workdir`; `dial` is a client that trusts them.
    """

    def __init__(self, workdir: Path) -> None:
        try:
            import trustme
        except ImportError:
            raise RuntimeError("the benchmark makes its certificates with trustme: .venv/bin/pip install trustme") from None
        ca = trustme.CA(key_type=trustme.KeyType.ECDSA)
        leaf = ca.issue_cert(SERVER_NAME, HOST, key_type=trustme.KeyType.ECDSA)
        self.ca = workdir / "ca.pem"
        self.chain = workdir / "server-chain.pem"
        self.key = workdir / "server-key.pem"
        self.combined = workdir / "server-key-and-chain.pem"  # haproxy's `crt`, the upstream's load_cert_chain
        ca.cert_pem.write_to_path(str(self.ca))
        self.chain.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(self.key))
        leaf.private_key_and_cert_chain_pem.write_to_path(str(self.combined))
        self.dial = TLSDial(str(self.ca), SERVER_NAME)


def launch_proxy(children: Children, workdir: Path, target: Target, argv: list[str], how: str, logs: list[str]) -> Target:
    """Start a third-party proxy for `target` and wait until it serves; its output and `logs` explain a failure."""
    name = target.name
    with open(workdir / f"{name}.out", "wb") as out:
        proc = children.popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    target.pgid, target.proc, target.note = proc.pid, proc, f"{argv[0]} {how}"
    try:
        wait_until_serving(target, proc, 10, name)
    except RuntimeError as e:
        text = "".join(
            (workdir / log).read_text(errors="replace")[-1500:] for log in [f"{name}.out", *logs] if (workdir / log).exists()
        )
        raise RuntimeError(f"{e}\n{text}") from None
    return target


HAPROXY_CONFIG = """\
global
    maxconn 4096
    nbthread 1
defaults
    mode tcp
    timeout connect 10s
    timeout client 1h
    timeout server 1h
listen bulk
    bind 127.0.0.1:{p_bulk}{ssl}
    server upstream 127.0.0.1:{u_bulk}
listen smtp
    bind 127.0.0.1:{p_line}{ssl}
    server upstream 127.0.0.1:{u_line}
"""


def _terminating(target: Target, certs: Certificates | None) -> Target:
    """A proxy's target, reached over TLS when it terminates TLS with `certs`."""
    if certs is not None:
        target.dial, target.until_closed = certs.dial, True
    return target


def start_haproxy(children: Children, workdir: Path, binary: str, upstream: Upstream, certs: Certificates | None) -> Target:
    """haproxy in front of the plain upstream ports; with `certs`, terminating TLS."""
    p_bulk, p_line = free_port(), free_port()
    config = workdir / "haproxy.cfg"
    ssl = f" ssl crt {certs.combined}" if certs else ""
    config.write_text(HAPROXY_CONFIG.format(p_bulk=p_bulk, p_line=p_line, u_bulk=upstream.bulk, u_line=upstream.line, ssl=ssl))
    target = _terminating(Target("haproxy", p_bulk, p_line, None), certs)
    how = "-db (mode tcp, bind ... ssl crt, nbthread 1)" if certs else "-db (mode tcp, nbthread 1)"
    return launch_proxy(children, workdir, target, [binary, "-db", "-f", str(config)], how, [])


NGINX_PREAMBLE = """\
daemon off;
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log;
{user}
{load_module}
events {{ worker_connections 8192; }}
"""
"""The start of every nginx configuration the benchmarks write (a format string)."""

NGINX_CONFIG = (
    NGINX_PREAMBLE
    + """\
stream {{{stream_ssl}
    server {{ listen 127.0.0.1:{p_bulk}{ssl}; proxy_pass 127.0.0.1:{u_bulk}; }}
    server {{ listen 127.0.0.1:{p_line}{ssl}; proxy_pass 127.0.0.1:{u_line}; }}
}}
"""
)

NGINX_STREAM_SSL = """
    ssl_certificate {chain};
    ssl_certificate_key {key};
    ssl_protocols TLSv1.2 TLSv1.3;  # nginx 1.22's default stops at TLSv1.2"""


def start_nginx(children: Children, workdir: Path, binary: str, upstream: Upstream, certs: Certificates | None) -> Target:
    """nginx's stream proxy in front of the plain upstream ports; with `certs`, terminating TLS."""
    usable, load_module = nginx_module(binary, "stream")
    if not usable:
        raise RuntimeError(load_module)
    p_bulk, p_line = free_port(), free_port()
    config = workdir / "nginx.conf"
    config.write_text(
        NGINX_CONFIG.format(
            workdir=workdir,
            user=nginx_user_line(),
            load_module=load_module,
            p_bulk=p_bulk,
            p_line=p_line,
            u_bulk=upstream.bulk,
            u_line=upstream.line,
            stream_ssl=NGINX_STREAM_SSL.format(chain=certs.chain, key=certs.key) if certs else "",
            ssl=" ssl" if certs else "",
        )
    )
    argv = [binary, "-p", f"{workdir}/", "-c", str(config), "-e", f"{workdir}/nginx-error.log"]
    target = _terminating(Target("nginx", p_bulk, p_line, None), certs)
    how = "(stream, listen ... ssl, worker_processes 1)" if certs else "(stream proxy_pass, worker_processes 1)"
    return launch_proxy(children, workdir, target, argv, how, ["nginx-error.log"])


def nginx_module(binary: str, name: str) -> tuple[bool, str]:
    """
    Whether nginx at `binary` can run its `name` module ("stream", "mail"): built in
    (`--with-NAME` in `nginx -V`), or as ngx_NAME_module.so in one of the usual module
    directories. Returns (usable, its load_module line or "" / why not).
    """
    info = subprocess.run([binary, "-V"], capture_output=True, text=True, timeout=10)
    flags = info.stdout + info.stderr
    if re.search(rf"--with-{name}(?=\s|$)", flags):
        return True, ""
    paths = re.findall(r"--modules-path=(\S+)", flags)
    prefix = re.findall(r"--prefix=(\S+)", flags)
    relocated = Path(binary).resolve().parent.parent / "lib" / "nginx" / "modules"  # e.g. /usr/sbin -> /usr/lib
    candidates = [
        *paths,
        *[p + "/modules" for p in prefix],
        str(relocated),
        "/usr/lib/nginx/modules",
        "/usr/lib64/nginx/modules",
        "/usr/share/nginx/modules",
        "/usr/local/nginx/modules",
    ]
    for directory in candidates:
        module = Path(directory) / f"ngx_{name}_module.so"
        if module.exists():
            return True, f"load_module {module};"
    if f"--with-{name}=dynamic" in flags:
        return False, f"nginx has a dynamic {name} module but ngx_{name}_module.so was not found"
    return False, f"nginx was built without the {name} module and no ngx_{name}_module.so was found"


def nginx_user_line() -> str:
    """nginx run as root wants an unprivileged user for its workers."""
    if os.geteuid() != 0:
        return ""
    import grp

    def has_group(name: str) -> bool:
        try:
            grp.getgrnam(name)
            return True
        except KeyError:
            return False

    group = next((g for g in ("nogroup", "nobody") if has_group(g)), "root")
    return f"user nobody {group};"


def start_others(
    args: argparse.Namespace,
    children: Children,
    workdir: Path,
    targets: list[Target],
    upstream: Upstream,
    certs: Certificates | None = None,
) -> list[str]:
    """
    Start haproxy and nginx in front of the plain upstream (terminating TLS with `certs`)
    when on PATH and wanted; add them to `targets`; return what was skipped and why.
    """
    skipped = []
    for name, starter in (("haproxy", start_haproxy), ("nginx", start_nginx)):
        binary = shutil.which(name)
        if not args.others:
            skipped.append(f"{name} (--no-others)")
        elif binary is None:
            skipped.append(f"{name} (not on PATH)")
        else:
            try:
                targets.append(starter(children, workdir, binary, upstream, certs))
            except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                skipped.append(f"{name} (failed to start: {str(e).splitlines()[0]})")
                print(f"{name} failed to start:\n{e}", file=sys.stderr)
    return skipped


# --------------------------------------------------------------------------------------
# Measurements


class Window:
    """
    The measured parts of one measurement (one per round): wall time and the CPU each
    party used in them. Warm-ups and start-up waits happen before `begin()`, so they
    count for nothing.
    """

    def __init__(self, upstream_pgid: int, proxy_pgid: int | None, upstream_reaped: bool = False) -> None:
        self.upstream_pgid = upstream_pgid
        self.proxy_pgid = proxy_pgid
        self.upstream_reaped = upstream_reaped  # count the upstream's exited children (see cpu_of_group)
        self.client_cpu: float | None = None  # set by measurements whose clients are other processes
        self.totals = {"wall": 0.0, "client": 0.0, "upstream": 0.0, "proxy": 0.0, "machine": 0.0}

    def _proxy(self) -> float:
        return cpu_of_group(self.proxy_pgid) if self.proxy_pgid else 0.0

    def begin(self) -> None:
        self.client_cpu = None
        self._t0 = time.perf_counter()
        self._me0 = own_cpu()
        self._up0 = cpu_of_group(self.upstream_pgid, self.upstream_reaped)
        self._px0 = self._proxy()
        self._all0 = machine_busy()

    def end(self) -> None:
        self.totals["wall"] += time.perf_counter() - self._t0
        self.totals["client"] += self.client_cpu if self.client_cpu is not None else own_cpu() - self._me0
        self.totals["upstream"] += cpu_of_group(self.upstream_pgid, self.upstream_reaped) - self._up0
        self.totals["proxy"] += self._proxy() - self._px0
        self.totals["machine"] += machine_busy() - self._all0

    @property
    def cpu(self) -> dict[str, float]:
        """% of one core used by each party over all measured parts."""
        wall = self.totals["wall"] or 1.0
        return {k: 100 * v / wall for k, v in self.totals.items() if k != "wall"}


class Measurements:
    """
    The values of one run, keyed by (measurement key, target name), with a Window per
    pair; `rounds()` runs a measurement over the targets, `store()` keeps its result.
    """

    def __init__(
        self, targets: list[Target], upstream_pgid: int, started: float, failures: list[str], upstream_reaped: bool = False
    ) -> None:
        self.targets = targets
        self.upstream_pgid = upstream_pgid
        self.upstream_reaped = upstream_reaped
        self.started = started
        self.failures = failures
        self.values: dict[tuple[str, str], Any] = {}
        self.windows: dict[tuple[str, str], Window] = {}
        self.rows: list[tuple[str, str]] = []

    def progress(self, text: str) -> None:
        print(f"  [{time.monotonic() - self.started:5.1f}s] {text}", file=sys.stderr, flush=True)

    def rounds(
        self,
        key: str,
        label: str,
        count: int,
        body: Callable[[Window, Target], Any],
        only: Callable[[Target], bool] | None = None,
    ) -> dict[str, list[Any]]:
        """
        `count` passes over every target (those `only` accepts), so that a drift of the
        machine's speed (it is a shared 2-core VM) affects every column alike. A target
        that fails once is out of this measurement.
        """
        targets = [t for t in self.targets if only is None or only(t)]
        results: dict[str, list[Any]] = {t.name: [] for t in targets}
        for n in range(count):
            for t in targets:
                if (key, t.name) in self.values:  # failed earlier
                    continue
                self.progress(f"{label} via {t.name} ({n + 1}/{count})")
                win = self.windows.setdefault((key, t.name), Window(self.upstream_pgid, t.pgid, self.upstream_reaped))
                try:
                    results[t.name].append(body(win, t))
                except (OSError, RuntimeError, ValueError) as e:
                    self.failures.append(f"{label} via {t.name}: {e!r}")
                    self.values[(key, t.name)] = "ERR"
                    results[t.name] = []
        return results

    def store(self, key: str, results: dict[str, list[Any]], reduce: Callable[[list[Any]], dict[str, Any]]) -> None:
        for name, items in results.items():
            if items:
                self.values.update({(k, name): v for k, v in reduce(items).items()})
            else:
                for k in (key, f"{key}_med", f"{key}_p99"):
                    self.values.setdefault((k, name), "ERR")

    def cpu(self) -> dict[tuple[str, str], dict[str, float]]:
        return {key: win.cpu for key, win in self.windows.items() if win.totals["wall"] > 0}

    def check_alive(self) -> None:
        for t in self.targets:
            if t.proc is not None and t.proc.poll() is not None:
                self.failures.append(f"{t.name} exited during the run with status {t.proc.returncode}")

    def print_results(self, lower_is_better: str) -> None:
        """The table of the measurements (a row each: per target its value and the ratio to direct)."""
        self.check_alive()
        print()
        print_table(self.rows, [t.name for t in self.targets], self.values)
        print(f"ratio = value / direct: for MB/s and sessions/s higher is better, for {lower_is_better} lower is better.")

    def print_cpu(self, machine: bool = False) -> None:
        print()
        print_cpu_table(self.rows, [t.name for t in self.targets], self.cpu(), machine)

    def bulk(self, args: argparse.Namespace) -> None:
        """MB/s each way: median of `args.repeat` transfers of `args.bulk_mib` MiB, for the targets with a bulk port."""
        size = args.bulk_mib << 20
        for direction, label in (("up", "bulk client->upstream, MB/s"), ("down", "bulk upstream->client, MB/s")):
            self.rows.append((direction, label))
            results = self.rounds(
                direction,
                f"bulk {direction}",
                args.repeat,
                lambda w, t: measure_bulk(w, t, direction, size),
                only=lambda t: t.bulk_port > 0,
            )
            self.store(direction, results, functools.partial(_median_of, direction))

    def sessions(self, args: argparse.Namespace, children: Children, what: str = "sessions", times: bool = False) -> None:
        """
        Sessions/s with one client, then with `args.clients` concurrent ones (median of the
        rounds); with `times`, also the p50 and p99 of every session's duration (ms), pooled.
        """
        concurrent = f"{args.clients} concurrent"
        variants: tuple[tuple[str, str, str, Callable[[Window, Target], SessionsResult]], ...] = (
            (
                "serial",
                "1 client",
                f"{what} one at a time",
                lambda w, t: measure_sessions_serial(w, t, args.pieces, args.duration),
            ),
            (
                "concurrent",
                concurrent,
                f"{what}, {concurrent}",
                lambda w, t: measure_sessions_concurrent(
                    w, children, t, args.pieces, args.duration, args.clients, args.client_procs
                ),
            ),
        )
        for key, label, progress, measure in variants:
            self.rows.append((key, f"sessions/s, {label}"))
            if times:
                self.rows += [(f"{key}_med", f"session p50 ms, {label}"), (f"{key}_p99", f"session p99 ms, {label}")]
            results = self.rounds(key, progress, args.rounds, measure)
            self.store(key, results, functools.partial(_sessions_values, key, times=times))

    def print_session_errors(self) -> None:
        errors = [
            f"{t.name}: {self.values[('concurrent_errors', t.name)]} failed sessions "
            f"({self.values.get(('concurrent_first_error', t.name))})"
            for t in self.targets
            if self.values.get(("concurrent_errors", t.name))
        ]
        if errors:
            print("session errors in the concurrent test: " + "; ".join(errors))

    def finish(self) -> int:
        """The end of the report: what failed, the time it all took; the exit status."""
        if self.failures:
            print("\nFAILED measurements:")
            for f in self.failures:
                print(f"  {f}")
        print(f"\ntotal time {time.monotonic() - self.started:.1f}s")
        return 1 if self.failures else 0


def _median_of(key: str, results: list[float]) -> dict[str, float]:
    return {key: statistics.median(results)}


class SessionsResult(NamedTuple):
    rate: float
    """Sessions per second."""
    sessions: int
    errors: int
    first_error: str | None
    samples: list[int]
    """Nanoseconds of each session."""


def _sessions_values(key: str, results: list[SessionsResult], times: bool) -> dict[str, Any]:
    values = {
        key: statistics.median(r.rate for r in results),
        f"{key}_errors": sum(r.errors for r in results),
        f"{key}_first_error": next((r.first_error for r in results if r.first_error), None),
    }
    if times:
        ordered = sorted(s for r in results for s in r.samples)
        values[f"{key}_med"] = percentile(ordered, 0.5) / 1e6
        values[f"{key}_p99"] = percentile(ordered, 0.99) / 1e6
        values[f"{key}_n"] = len(ordered)
    return values


def measure_bulk(win: Window, target: Target, direction: str, size: int) -> float:
    """MB/s of one transfer of `size` bytes (after a small warm-up transfer)."""
    transfer = bulk_up if direction == "up" else bulk_down
    transfer(target.bulk_port, min(size, 16 << 20), target.dial)
    win.begin()
    seconds = transfer(target.bulk_port, size, target.dial)
    win.end()
    return size / seconds / MB


def measure_sessions_serial(win: Window, target: Target, pieces: int, duration: float) -> SessionsResult:
    """One client, one session after the other, for `duration` seconds."""
    commands, quit_parts = session_script(pieces)
    for _ in range(20):
        target.session(commands, quit_parts)
    count = 0
    samples: list[int] = []
    win.begin()
    start = time.perf_counter()
    end = start + duration
    now = start
    while now < end:
        t0 = time.perf_counter_ns()
        target.session(commands, quit_parts)
        samples.append(time.perf_counter_ns() - t0)
        count += 1
        now = time.perf_counter()
    win.end()
    return SessionsResult(count / (now - start), count, 0, None, samples)


def _session_thread(target: Target, pieces: int, start_at: float, end_at: float, out: list[Any]) -> None:
    commands, quit_parts = session_script(pieces)
    count = errors = 0
    first_error = None
    samples: list[int] = []
    delay = start_at - time.time()
    if delay > 0:
        time.sleep(delay)
    last = time.time()
    while last < end_at:
        t0 = time.perf_counter_ns()
        try:
            target.session(commands, quit_parts)
            samples.append(time.perf_counter_ns() - t0)
            count += 1
        except OSError as e:
            errors += 1
            first_error = first_error or repr(e)
        last = time.time()
    out.append((count, errors, last, first_error, samples))


def _session_process(target: Target, pieces: int, threads: int, start_at: float, end_at: float, conn: Any) -> None:
    """One client process of the concurrent test: `threads` clients, each one session at a time."""
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # the parent's handlers are not for us
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    out: list[Any] = []
    workers = [
        threading.Thread(target=_session_thread, args=(target, pieces, start_at, end_at, out), daemon=True)
        for _ in range(threads)
    ]
    for w in workers:
        w.start()
    delay = start_at - time.time()
    if delay > 0:
        time.sleep(delay)
    cpu0 = own_cpu()
    for w in workers:
        w.join()
    conn.send((out, own_cpu() - cpu0))
    conn.close()


def measure_sessions_concurrent(
    win: Window, children: Children, target: Target, pieces: int, duration: float, clients: int, procs: int
) -> SessionsResult:
    """`clients` clients at once, threads in `procs` forked processes, each one session after the other."""
    commands, quit_parts = session_script(pieces)
    for _ in range(20):
        target.session(commands, quit_parts)
    ctx = multiprocessing.get_context("fork")
    procs = max(1, min(procs, clients))
    per_proc = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
    start_at = time.time() + 0.3
    end_at = start_at + duration
    pipes = []
    workers = []
    for threads in per_proc:
        parent_end, child_end = ctx.Pipe(duplex=False)
        worker = ctx.Process(target=_session_process, args=(target, pieces, threads, start_at, end_at, child_end), daemon=True)
        worker.start()
        children.workers.append(worker)
        child_end.close()
        pipes.append(parent_end)
        workers.append(worker)
    delay = start_at - time.time()
    if delay > 0:
        time.sleep(delay)
    win.begin()
    results = []
    for pipe in pipes:
        if not pipe.poll(duration + IO_TIMEOUT + 10):
            raise RuntimeError("a client process did not report")
        results.append(pipe.recv())
    win.client_cpu = sum(cpu for _, cpu in results)
    win.end()
    for worker in workers:
        worker.join(5)
        children.workers.remove(worker)
    threads_out = [item for out, _ in results for item in out]
    count = sum(item[0] for item in threads_out)
    errors = sum(item[1] for item in threads_out)
    first_error = next((item[3] for item in threads_out if item[3]), None)
    last = max(item[2] for item in threads_out)
    samples = [s for item in threads_out for s in item[4]]
    return SessionsResult(count / (last - start_at), count, errors, first_error, samples)


def percentile(sorted_samples: list[int], q: float) -> float:
    return float(sorted_samples[min(len(sorted_samples) - 1, int(round(q * (len(sorted_samples) - 1))))])


# --------------------------------------------------------------------------------------
# Report


def twisted_version() -> str:
    try:
        from importlib.metadata import version

        return version("twisted")
    except Exception:
        return "?"


def print_machine(title: str) -> None:
    """The first lines of a report: what ran where, and how busy the machine already was."""
    print(f"{title}  {time.strftime('%Y-%m-%d %H:%M')}  {platform.node()}")
    print(
        f"machine: {os.cpu_count()} cores, Linux {platform.release()}, Python {platform.python_version()}, "
        f"Twisted {twisted_version()}"
    )
    load = os.getloadavg()
    print(f"load average before the run: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (anything else running skews the numbers)")


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def print_grid(table: list[list[str]]) -> None:
    """Rows of cells, the first one a heading: first column left-aligned, the others right."""
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for i, r in enumerate(table):
        print("  ".join(c.ljust(widths[0]) if j == 0 else c.rjust(widths[j]) for j, c in enumerate(r)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def print_table(rows: list[tuple[str, str]], targets: list[str], values: dict[tuple[str, str], Any]) -> None:
    head = ["measurement", "direct"]
    for name in targets[1:]:
        head += [name, "ratio"]
    table = [head]
    for key, label in rows:
        direct = values.get((key, "direct"))
        line = [label, fmt(direct) if isinstance(direct, float) else str(direct or "-")]
        for name in targets[1:]:
            v = values.get((key, name))
            if isinstance(v, float):
                line.append(fmt(v))
                line.append(f"{v / direct:.2f}" if isinstance(direct, float) and direct else "-")
            else:
                line += [str(v or "-"), "-"]
        table.append(line)
    print_grid(table)


def print_cpu_table(
    rows: list[tuple[str, str]], names: list[str], cpu: dict[tuple[str, str], dict[str, float]], machine: bool = False
) -> None:
    """
    One line per measurement (its `_med` and `_p99` rows folded in): client / upstream /
    proxy CPU per target, and with `machine` what all cores were busy with, kernel included.
    """
    parties = ["client", "upstream", "proxy"] + (["machine"] if machine else [])
    whole = f" / whole machine (all {os.cpu_count()} cores: at most {100 * (os.cpu_count() or 1)})" if machine else ""
    print(f"CPU use during each measurement, % of one core: client / upstream / proxy{whole}")
    table = [["measurement", *names]]
    keys = {key for key, _ in rows}
    for key, label in rows:
        base = key[: -len("_med")] if key.endswith("_med") else key
        if key.endswith("_p99") or (base != key and base in keys):
            continue
        line = [label.replace(" median", "")]
        for name in names:
            c = cpu.get((base, name))
            line.append("-" if c is None else " / ".join(f"{c[party]:.0f}" for party in parties))
        table.append(line)
    print_grid(table)


@dataclass
class SessionLog:
    """What mailrelay's log says about its sessions (see `read_session_log`)."""

    outcomes: dict[tuple[str, str], int] = field(default_factory=dict)
    """(listener, outcome) -> session lines."""
    up: dict[str, int] = field(default_factory=dict)
    """listener -> the sum of the `up=` bytes of its session lines (client to upstream)."""
    down: dict[str, int] = field(default_factory=dict)
    """listener -> the sum of the `down=` bytes (upstream to client)."""
    problems: list[str] = field(default_factory=list)
    """Lines that look like a crash: a traceback, an unhandled error, an internal error."""

    def count(self, outcome: str | None = None) -> int:
        """Session lines with `outcome` (any outcome: None), over all listeners."""
        return sum(n for (_, o), n in self.outcomes.items() if outcome is None or o == outcome)


_SESSION_BYTES = re.compile(r" up=(\d+) down=(\d+) ")


def read_session_log(log_files: list[Path]) -> SessionLog:
    """
    The session lines of mailrelay's logs, rotated files (`NAME.1`, ...) included. A log
    that twistd rotates while it is read can be counted twice or not at all: read until
    two reads agree when that matters.
    """
    result = SessionLog()
    for log in log_files:
        for path in sorted(log.parent.glob(log.name + "*")):
            try:
                text = path.read_text(errors="replace")
            except FileNotFoundError:  # rotated away between the glob and the read
                continue
            for line in text.splitlines():
                m = re.search(r" outcome=(\S+)", line)
                if m and " session " in line:
                    named = re.search(r" listener=(\S+)", line)
                    listener = named.group(1) if named else "?"
                    key = (listener, m.group(1))
                    result.outcomes[key] = result.outcomes.get(key, 0) + 1
                    counted = _SESSION_BYTES.search(line)
                    if counted:
                        result.up[listener] = result.up.get(listener, 0) + int(counted.group(1))
                        result.down[listener] = result.down.get(listener, 0) + int(counted.group(2))
                elif "Traceback" in line or "Unhandled" in line or "internal error" in line:
                    result.problems.append(line)
    return result


def mailrelay_log_summary(name: str, log_files: list[Path], by_listener: bool = False) -> str:
    """Session log lines counted by outcome (and by listener), and anything that looks like a crash."""
    log = read_session_log(log_files)
    outcomes: dict[str, int] = {}
    for (listener, outcome), n in log.outcomes.items():
        key = f"{listener} {outcome}" if by_listener else outcome
        outcomes[key] = outcomes.get(key, 0) + n
    text = ", ".join(f"{k}={v}" for k, v in sorted(outcomes.items())) or "no session lines"
    return f"{name} log: sessions {text}; tracebacks/internal errors: {len(log.problems)}"


def mailrelay_warnings(log_files: list[Path], limit: int = 5) -> list[str]:
    """The distinct warning and error lines of mailrelay's log (session ids and ports folded), with counts."""
    counts: dict[str, int] = {}
    for log in log_files:
        for path in sorted(log.parent.glob(log.name + "*")):
            for line in path.read_text(errors="replace").splitlines():
                if " outcome=closed" in line or ("listener " in line and " on " in line):
                    continue
                if re.search(r"(?i)warn|error|fail|traceback|unhandled|outcome=", line):
                    text = re.sub(r"^\S+ \S+ ", "", line)  # the timestamp
                    text = re.sub(r"\b[0-9a-f]{8}\b", "ID", text)
                    text = re.sub(r"(\d+\.\d+\.\d+\.\d+):\d+", r"\1:PORT", text)
                    text = re.sub(r"\b(up|down)=\d+|duration=[0-9.]+s", r"\1=N", text)
                    counts[text] = counts.get(text, 0) + 1
    ranked = sorted(counts.items(), key=lambda item: -item[1])
    lines = [f"  {n:6d} x {text}" for text, n in ranked[:limit]]
    if len(ranked) > limit:
        lines.append(f"  ... and {len(ranked) - limit} more kinds")
    return lines


def print_cpu_per_session(m: Measurements, names: list[str], keys: list[tuple[str, str]]) -> None:
    """CPU seconds of each party over the measured parts, divided by the sessions in them (in ms)."""
    print("CPU per session, ms: client / upstream / proxy")
    table = [["sessions", *names]]
    for key, label in keys:
        line = [label]
        for name in names:
            win, count = m.windows.get((key, name)), m.values.get((f"{key}_n", name))
            if win is None or not isinstance(count, int) or not count:
                line.append("-")
                continue
            line.append(" / ".join(f"{1000 * win.totals[party] / count:.2f}" for party in ("client", "upstream", "proxy")))
        table.append(line)
    print_grid(table)


def pyopenssl_version() -> str:
    try:
        from OpenSSL import SSL

        return SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()
    except Exception:
        return "OpenSSL ?"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="The benchmarks' upstream servers (started by bench/*.py).")
    parser.add_argument("--procs", type=int, default=2, help="processes of the line (and SMTP) servers (SO_REUSEPORT)")
    parser.add_argument("--tls", help="PEM file with certificate and key: also serve TLS twins of both ports")
    parser.add_argument("--smtp", action="store_true", help="also serve SMTP (STARTTLS with --tls's certificate, AUTH PLAIN)")
    parser.add_argument("--echo", action="store_true", help="also serve the soak test's echo and POP3 echo servers")
    options = parser.parse_args()
    serve_upstream(options.procs, options.tls, options.smtp, options.echo)


def print_logs_and_notes(targets: list[Target]) -> None:
    """After the tables: each mailrelay log's session summary and its unusual lines, then
    how each proxy was run (targets[0] is the direct connection)."""
    for t in targets:
        if t.log_files:
            print(mailrelay_log_summary("mailrelay", t.log_files, by_listener=True))
            warnings = mailrelay_warnings(t.log_files)
            if warnings:
                print("mailrelay log, lines other than closed sessions (most frequent first):")
                print("\n".join(warnings))
    for note in dict.fromkeys(f"{t.name if t.name in ('haproxy', 'nginx') else 'mailrelay'}: {t.note}" for t in targets[1:]):
        print(note)
