"""
A toy line protocol on the front-end core and shell (`mailrelay.core.frontend`,
`mailrelay.protocols.frontend`): just enough to watch what every front-end shares (the
STARTTLS hand-over, the hand-off to the upstream, refusals) without any real mail
protocol in the way.
"""

from __future__ import annotations

from collections.abc import Callable

from mailrelay.core.frontend import FrontEndCore, Replies
from mailrelay.protocols.frontend import FrontEnd
from mailrelay.router import Reject

REPLIES = Replies(
    timeout="BYE timeout",
    too_many_junk="BYE too many commands",
    too_many_errors="BYE too many errors",
    too_many_attempts=None,
    throttled="TEMP throttled",
    upstream_unavailable="TEMP upstream-unavailable",
    temporary="TEMP router-error",
    line_too_long="BAD line too long",
    bare_cr_or_nul="BAD bare CR or NUL",
    unknown_command="BAD unknown command",
    busy="BYE busy",
)


class ToyCore(FrontEndCore):
    """Just enough protocol to watch the hand-over: counts commands since the last reset."""

    protocol = "toy"
    replies = REPLIES
    seen = 0

    def greeting(self) -> bytes:
        return b"* toy ready\r\n"

    def line_received(self, line: bytes) -> None:
        if line == b"STARTTLS":
            if self.can_start_tls():
                self.start_tls(b"OK begin TLS\r\n")
            else:
                self.send(b"BAD TLS already active\r\n")
            return
        self.seen += 1
        command: Callable[[], None] | None = {
            b"NOOP": lambda: self.send(b"OK noop\r\n"),
            b"STATE": lambda: self.send(f"OK tls={self.tls is not None} seen={self.seen}\r\n".encode()),
            b"RELAY": lambda: self.route(),
        }.get(line)
        if command is not None:
            command()
        elif line.startswith(b"LOGIN "):
            user, password = line[6:].decode().split(" ", 1)
            self.route(user=user, password=password, auth_method="plain")
        else:
            self.send(self.text("unknown_command"))

    def error(self, reply: bytes) -> None:
        # The toy's one error is the over-long line, and it ends the session.
        self.send(reply)
        self.close("protocol-error", f"command line longer than {self.max_line_length} bytes")

    def tls_started(self) -> None:
        self.seen = 0

    def login_failed(self, reject: Reject) -> None:
        self.send(f"NO {reject.message}\r\n".encode())


class ToyFrontEnd(FrontEnd):
    core_class = ToyCore
