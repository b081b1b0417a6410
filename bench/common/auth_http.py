"""
nginx's auth_http for the benchmarks that run nginx's mail proxy: in the upstream
process (`common.upstream --smtp`, answering with its SMTP port), or as a process of
its own answering with another port (bench/imap.py: Dovecot's):

    python -m common.auth_http PORT

which prints `port P` and serves until its stdin closes.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from typing import Any
from urllib.parse import unquote

from common.processes import Children
from common.smtp_server import SMTP_PASSWORD, SMTP_USER
from common.wire import HOST


class AuthHTTPProtocol(asyncio.Protocol):
    """
    nginx's auth_http for bench/smtp.py: `Auth-Status: OK` with the SMTP upstream's
    address for SMTP_USER/SMTP_PASSWORD, `Invalid login` otherwise; one request per
    connection (HTTP/1.0), as nginx asks. With `mx_port`, a session without a login
    (`Auth-Method: none`, nginx's `smtp_auth none`, asked at RCPT TO) is sent there.
    """

    def __init__(self, smtp_port: int, mx_port: int = 0) -> None:
        self.smtp_port = smtp_port
        self.mx_port = mx_port
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
        elif self.mx_port and headers.get(b"auth-method") == "none":
            answer = f"Auth-Status: OK\r\nAuth-Server: {HOST}\r\nAuth-Port: {self.mx_port}\r\n"
        else:
            answer = "Auth-Status: Invalid login\r\nAuth-Wait: 1\r\n"
        self.transport.write(b"HTTP/1.0 200 OK\r\n" + answer.encode() + b"\r\n")
        self.transport.close()


def start_auth_http(children: Children, answer_port: int) -> int:
    """An auth_http service in a process of its own, answering with `answer_port`; its port."""
    proc = children.python("common.auth_http", [str(answer_port)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    if not line.startswith("port "):
        raise RuntimeError(f"nginx's auth_http service did not start (said {line!r})")
    return int(line.split()[1])


async def _serve(answer_port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: AuthHTTPProtocol(answer_port), HOST, 0, backlog=4096)
    print("port", server.sockets[0].getsockname()[1], flush=True)
    done: asyncio.Future[None] = loop.create_future()

    def stdin_closed() -> None:
        if not done.done():
            done.set_result(None)

    loop.add_reader(0, stdin_closed)
    await done
    server.close()


if __name__ == "__main__":
    asyncio.run(_serve(int(sys.argv[1])))
