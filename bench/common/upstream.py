"""
The upstream process of the benchmarks, in a process group of its own:

    python -m common.upstream --procs N [--tls PEM [--smtp]] [--echo]

(with bench/ on the path: `Upstream` starts it so). It serves a bulk sink/source
(threads) and an SMTP-like line server (asyncio, in N processes sharing the port through
SO_REUSEPORT); with `--tls` their TLS twins; with `--smtp` the SMTP server of
`common.smtp_server` (and its twin without AUTH, `mx`) and nginx's auth_http of
`common.auth_http`; with `--echo` the soak
test's checking echo servers (`common.echo`). It prints `ports bulk=P line=P [tls_bulk=P
tls_line=P] [smtp=P auth_http=P mx=P] [echo=P pop3_echo=P]` and serves until its stdin closes.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import select
import signal
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

from common.auth_http import AuthHTTPProtocol
from common.echo import EchoProtocol, POP3EchoProtocol, echo_summary
from common.processes import Children, die_with_parent
from common.smtp_server import SMTPServerProtocol
from common.wire import BYE, CHUNK, GREETING, HOST, IO_TIMEOUT, OK


def _bulk_connection(conn: socket.socket, zeros: memoryview, sink: memoryview, tls: ssl.SSLContext | None) -> None:
    """`SINK n\\n` + n bytes -> `n\\n` (received into `sink`);  `SOURCE n\\n` -> n bytes (of `zeros`)."""
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
            while got < size:
                n = conn.recv_into(sink, min(CHUNK, size - got))
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
    """A thread per connection (the many-streams test has 50 at once: `sock`'s backlog
    must hold them). One buffer each way for all of them: what a sink receives is thrown
    away, so its threads may overwrite each other's bytes, and a new connection costs no
    CHUNK-sized allocation inside a timed transfer."""
    zeros = memoryview(bytes(CHUNK))
    sink = memoryview(bytearray(CHUNK))
    while True:
        conn, _ = sock.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=_bulk_connection, args=(conn, zeros, sink, tls), daemon=True).start()


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


Served = tuple[socket.socket, str, ssl.SSLContext | None]
"""A listening socket of the asyncio upstream, what it serves (`line`, `smtp`, `auth_http`),
and its TLS context: a line port speaks TLS from the start; the SMTP port offers STARTTLS."""


def _server_loop(listeners: list[Served], parent_pipe: int | None) -> None:
    """The asyncio servers of one upstream process, until `parent_pipe` closes (if given)."""
    smtp_port = next((sock.getsockname()[1] for sock, kind, _ in listeners if kind == "smtp"), 0)
    mx_port = next((sock.getsockname()[1] for sock, kind, _ in listeners if kind == "mx"), 0)

    def factory(kind: str, tls: ssl.SSLContext | None) -> Callable[[], asyncio.Protocol]:
        if kind == "smtp":
            assert tls is not None
            return lambda: SMTPServerProtocol(tls)
        if kind == "mx":
            assert tls is not None
            return lambda: SMTPServerProtocol(tls, require_auth=False)
        if kind == "auth_http":
            return lambda: AuthHTTPProtocol(smtp_port, mx_port)
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
        served += [("smtp", tls), ("auth_http", None), ("mx", tls)]
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
        names.update(smtp=socks[2], auth_http=socks[3], mx=socks[4])
    if echo:
        names.update(echo=socks[-2], pop3_echo=socks[-1])
    print("ports " + " ".join(f"{name}={sock.getsockname()[1]}" for name, sock in names.items()), flush=True)
    _server_loop([(sock, kind, context) for sock, (kind, context) in zip(socks, served, strict=True)], sys.stdin.fileno())


class Upstream:
    """
    The upstream process: plain bulk and line ports, with `tls_pem` their TLS twins, and
    with `smtp` too an SMTP server offering STARTTLS and AUTH PLAIN, its twin `mx` that
    takes mail without AUTH, and nginx's auth_http;
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
        args = ["--procs", str(line_procs)]
        args += (["--tls", tls_pem] if tls_pem else []) + (["--smtp"] if smtp else []) + (["--echo"] if echo else [])
        self.proc = children.python("common.upstream", args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 20)
        line = self.proc.stdout.readline().decode() if ready else ""
        if not line.startswith("ports "):
            raise RuntimeError(f"the upstream process did not start (said {line!r})")
        ports = {name: int(port) for name, _, port in (item.partition("=") for item in line.split()[1:])}
        self.bulk, self.line = ports["bulk"], ports["line"]
        self.tls_bulk, self.tls_line = ports.get("tls_bulk", 0), ports.get("tls_line", 0)
        self.smtp, self.auth_http = ports.get("smtp", 0), ports.get("auth_http", 0)
        self.mx = ports.get("mx", 0)
        self.echo, self.pop3_echo = ports.get("echo", 0), ports.get("pop3_echo", 0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The benchmarks' upstream servers (started by bench/*.py).")
    parser.add_argument("--procs", type=int, default=2, help="processes of the line (and SMTP) servers (SO_REUSEPORT)")
    parser.add_argument("--tls", help="PEM file with certificate and key: also serve TLS twins of both ports")
    parser.add_argument(
        "--smtp", action="store_true", help="also serve SMTP (STARTTLS with --tls's certificate, AUTH PLAIN; and without AUTH)"
    )
    parser.add_argument("--echo", action="store_true", help="also serve the soak test's echo and POP3 echo servers")
    options = parser.parse_args(argv)
    serve_upstream(options.procs, options.tls, options.smtp, options.echo)


if __name__ == "__main__":
    main()
