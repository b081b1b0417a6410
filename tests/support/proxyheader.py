"""
Clients that speak as a load balancer would: a PROXY protocol header first, then the
client's bytes; and a way to find mailrelay's side of such a connection while it waits
for the rest of its header.
"""

from __future__ import annotations

import smtplib
import socket
from typing import Any

from twisted.internet import reactor

from mailrelay.proxied import ProxyHeaderReceiver
from mailrelay.proxyprotocol import header
from tests.support.net import WAIT

CLIENT = ("192.0.2.1", 56324)
"""The client a balancer's header names (TEST-NET-1): an address no test connects from."""
SERVER = ("198.51.100.7", 25)
"""The address the header says the client connected to."""


def v1(source: tuple[str, int] = CLIENT, destination: tuple[str, int] = SERVER) -> bytes:
    return header(1, source, destination)


def v2(source: tuple[str, int] = CLIENT, destination: tuple[str, int] = SERVER) -> bytes:
    return header(2, source, destination)


V2_LOCAL = bytes.fromhex("0d0a0d0a000d0a515549540a20000000")
"""A v2 LOCAL header (a balancer's health check)."""


def connect_proxied(port: int, first: bytes, host: str = "127.0.0.1", source: str | None = None) -> socket.socket:
    """A connection to mailrelay on `port` that has sent `first` (a header, and maybe
    more) in one write."""
    conn = socket.create_connection((host, port), timeout=WAIT, source_address=(source, 0) if source else None)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if first:
        conn.sendall(first)
    return conn


class ProxiedSMTP(smtplib.SMTP):
    """smtplib behind a balancer: `proxy_header` goes first on the connection."""

    def __init__(self, proxy_header: bytes, *args: Any, **kwargs: Any) -> None:
        self.proxy_header = proxy_header
        super().__init__(*args, **kwargs)

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        sock: socket.socket = super()._get_socket(host, port, timeout)  # type: ignore[misc]
        sock.sendall(self.proxy_header)
        return sock


def receivers() -> list[ProxyHeaderReceiver]:
    """mailrelay's side of every connection in this process still reading its header or
    past it (their protocols, as the reactor knows them)."""
    found = []
    for selectable in set(reactor.getReaders()) | set(reactor.getWriters()):
        protocol = getattr(selectable, "protocol", None)
        protocol = getattr(protocol, "wrappedProtocol", protocol)  # under STARTTLS's TLS layer
        if isinstance(protocol, ProxyHeaderReceiver):
            found.append(protocol)
    return found
