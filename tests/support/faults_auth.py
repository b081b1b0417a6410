"""
The nginx-style auth service of the fault-injection suite (`tests/test_faults.py`), on a
raw socket so that it can misbehave in ways http.server would not.
"""

from __future__ import annotations

import socket

import attrs

from tests.support.faults_peers import GARBAGE, Peer
from tests.support.net import reset

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
