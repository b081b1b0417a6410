"""
A TLS client that decides what goes in each TCP write: Python's `ssl` over memory BIOs,
so a test can send many TLS records (one per piece) in one write, or data and its
close_notify together, as a busy peer or a middlebox may. For the tests of how
mailrelay's TLS layer delivers what one read decrypts (`mailrelay.tls_layer`).
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from tests.support.net import WAIT

T = TypeVar("T")


class RecordClient:
    """One TLS connection to 127.0.0.1:`port`, handshaken on creation; blocking (run it
    in a thread). `close()` closes the socket."""

    def __init__(self, port: int, context: ssl.SSLContext, server_name: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname=server_name)
        self._step(self.tls.do_handshake)

    def _step(self, operation: Callable[[], T]) -> T:
        """Run `operation` until it is done, carrying records both ways."""
        while True:
            try:
                return operation()
            except ssl.SSLWantReadError:
                self._flush()
                if not self._receive():
                    raise ConnectionError("the server closed the connection") from None

    def _flush(self) -> None:
        if pending := self.outgoing.read():
            self.sock.sendall(pending)

    def _receive(self) -> bool:
        data = self.sock.recv(1 << 16)
        if data:
            self.incoming.write(data)
        else:
            self.incoming.write_eof()
        return bool(data)

    def send_records(self, pieces: Iterable[bytes], close: bool = False) -> None:
        """Each piece in a record of its own, all in one write to the socket; with
        `close`, the close_notify too, right behind them."""
        for piece in pieces:
            self.tls.write(piece)
        if close:
            try:
                self.tls.unwrap()
            except ssl.SSLWantReadError:  # it sent close_notify; the server's is still to come
                pass
        self._flush()

    def read_until_closed(self) -> bytes:
        """Everything the server sends until its close_notify or end of stream."""
        received = bytearray()
        while True:
            try:
                data = self.tls.read(1 << 16)
            except ssl.SSLWantReadError:
                self._flush()
                if not self._receive():
                    return bytes(received)
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return bytes(received)
            if not data:
                return bytes(received)
            received += data

    def read_until(self, end: bytes) -> bytes:
        """What the server sends, up to and including the first `end` after what was read."""
        received = bytearray()
        while not received.endswith(end):
            received += self._step(lambda: self.tls.read(1))
        return bytes(received)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RecordClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def pieces_of(data: bytes, size: int) -> list[bytes]:
    """`data` cut every `size` bytes: lines split across records, records across lines."""
    return [data[i : i + size] for i in range(0, len(data), size)]
