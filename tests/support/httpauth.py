"""
An nginx-style auth_http service for the `http` router's tests, written the way nginx
users write theirs: the standard library's http.server, in a thread.
"""

from __future__ import annotations

import ssl
import threading
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Reply = tuple[int, Sequence[tuple[str, str]], bytes]


class Seen:
    """One request as the auth service received it: header lines in order, raw bytes."""

    def __init__(self, path: str, headers: list[tuple[str, bytes]]) -> None:
        self.path = path
        self.headers = headers

    def get(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value.decode("utf-8")
        return None


class AuthService:
    """
    An HTTP auth service on 127.0.0.1: `answer(seen)` gives (status, headers, body) for
    each request. Records every request, and counts the connections accepted and ended.
    """

    def __init__(self, answer: Callable[[Seen], Reply], http11: bool = False, tls: ssl.SSLContext | None = None) -> None:
        self.answer = answer
        self.requests: list[Seen] = []
        self.connections = 0
        self.ended = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1" if http11 else "HTTP/1.0"

            def do_GET(self) -> None:
                # http.client reads header lines as ISO-8859-1: encoding back gives the bytes sent.
                seen = Seen(self.path, [(name, value.encode("latin-1")) for name, value in self.headers.raw_items()])
                owner.requests.append(seen)
                status, headers, body = owner.answer(seen)
                self.send_response(status)
                for name, value in headers:
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def finish(self) -> None:
                try:
                    super().finish()
                finally:
                    owner.ended += 1

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            block_on_close = False  # a handler still sleeping is not waited for

            def get_request(self) -> Any:
                conn, address = super().get_request()
                owner.connections += 1
                if tls is not None:
                    conn = tls.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
                return conn, address

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a client that went away (a timeout, a refused certificate) is expected

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.scheme = "https" if tls is not None else "http"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}/auth"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def answer(*headers: tuple[str, str], status: int = 200, body: bytes = b"") -> Callable[[Seen], Reply]:
    return lambda seen: (status, headers, body)


def ok(host: str = "127.0.0.1", port: int = 143, *more: tuple[str, str]) -> Callable[[Seen], Reply]:
    return answer(("Auth-Status", "OK"), ("Auth-Server", host), ("Auth-Port", str(port)), *more)
