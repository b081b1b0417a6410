"""
A toy line protocol on the front-end base class (`mailrelay.protocols.base`): just
enough to watch what every front-end shares (the STARTTLS hand-over, the hand-off to
the upstream, refusals) without any real mail protocol in the way.
"""

from __future__ import annotations

from mailrelay.protocols.base import LineFrontEnd
from mailrelay.router import Reject


class ToyFrontEnd(LineFrontEnd):
    """Just enough protocol to watch the hand-over: counts commands since the last reset."""

    seen = 0

    def greet(self) -> None:
        self.send(b"* toy ready\r\n")

    def line_received(self, line: bytes) -> None:
        if line == b"STARTTLS":
            if self.can_start_tls():
                self.start_tls(b"OK begin TLS\r\n")
            else:
                self.send(b"BAD TLS already active\r\n")
            return
        self.seen += 1
        if line == b"NOOP":
            self.send(b"OK noop\r\n")
        elif line == b"STATE":
            self.send(f"OK tls={self.tls is not None} seen={self.seen}\r\n".encode())
        elif line == b"RELAY":
            self.begin()
        elif line.startswith(b"LOGIN "):
            user, password = line[6:].decode().split(" ", 1)
            self.begin(user=user, password=password, auth_method="plain")
        else:
            self.send(b"BAD unknown command\r\n")

    def line_too_long(self) -> None:
        self.send(b"BAD line too long\r\n")
        super().line_too_long()

    def tls_started(self) -> None:
        self.seen = 0

    def refused(self, reject: Reject) -> None:
        self.send(f"NO {reject.message}\r\n".encode())
        super().refused(reject)

    def unavailable(self, outcome: str, reason: str) -> None:
        self.send(f"TEMP {outcome}\r\n".encode())
        super().unavailable(outcome, reason)
