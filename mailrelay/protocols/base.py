"""
What every line-based front-end (SMTP, IMAP, POP3) shares: reading command lines,
the STARTTLS hand-over, and handing the connection on to be routed.

A front-end's life:

    accepted --[tls mode: handshake]--> greet() --> lines --> begin(): routed, spliced
                                                      |  ^
                                     start_tls(reply) v  | handshake done: tls_started()
                                                   handshaking

Invariants:
- Lines are taken out of `pending` one at a time. Whatever follows the line being
  handled stays there, so commands a client pipelined behind the one that hands the
  session on (`begin()`) reach the upstream unchanged, after the login.
- After `start_tls()` no byte that arrived before the TLS handshake is ever read as a
  command: the rest of the plaintext buffer is discarded (the CVE-2011-0411 class of
  command injection), and every later byte belongs to the TLS layer.
- STARTTLS happens at most once, and never on a connection that is already TLS.
"""

from __future__ import annotations

from twisted.logger import Logger

from ..relay import RoutedConnection


class LineFrontEnd(RoutedConnection):
    """A client connection that speaks a line protocol until it is routed."""

    log = Logger()
    max_line_length = 8192
    """Longest command line accepted, terminator included."""

    _reading = False
    _starttls_done = False

    def connectionMade(self) -> None:
        super().connectionMade()
        if self.listener.mode == "tls":
            self.expect_handshake()  # greet once TLS is up
        else:
            self._greet()

    def _greet(self) -> None:
        self._reading = True
        self.greet()
        self.pendingReceived()

    def greet(self) -> None:
        """Say the protocol's greeting."""

    def line_received(self, line: bytes) -> None:
        """One command line, without its line ending (CRLF, or a bare LF)."""

    def line_too_long(self) -> None:
        """A line longer than `max_line_length` arrived; by default the session ends.
        Front-ends answer with the protocol's error first."""
        self.close("protocol-error", f"command line longer than {self.max_line_length} bytes")

    def send(self, data: bytes) -> None:
        self.transport.write(data)

    def pendingReceived(self) -> None:
        while self._reading and self.lost_reason is None:
            end = self.pending.find(b"\n", 0, self.max_line_length)
            if end < 0:
                if len(self.pending) >= self.max_line_length:
                    self._reading = False
                    self.line_too_long()
                elif self.read_closed:
                    # Nothing more will come, and nothing was asked of an upstream yet.
                    self._reading = False
                    self.close("client-gone", "client ended its stream before it was routed")
                return
            line = bytes(self.pending[: end + 1])
            del self.pending[: end + 1]
            self.pendingConsumed()
            self.line_received(line[:-2] if line.endswith(b"\r\n") else line[:-1])

    def stop_reading(self) -> None:
        """Read no more lines: the session is being handed on (what is left in
        `pending` is for the upstream)."""
        self._reading = False

    def begin(self, **facts: object) -> None:
        self.stop_reading()
        super().begin(**facts)

    # STARTTLS

    def can_start_tls(self) -> bool:
        """Whether STARTTLS may be offered and accepted now."""
        return self.factory.tls is not None and self.tls is None and not self._starttls_done

    def start_tls(self, go_ahead: bytes) -> None:
        """
        Answer a STARTTLS command with `go_ahead` (in plaintext) and upgrade. The caller
        checked `can_start_tls()`. Bytes already received behind the command are
        discarded unread; lines are read again once the handshake is done, and the
        protocol's state is reset then (`tls_started()`).
        """
        assert self.can_start_tls() and self.factory.tls is not None
        self._starttls_done = True
        self._reading = False
        if self.pending:
            assert self.session is not None
            self.log.warn(
                "session {session_id}: discarded {count} byte(s) sent in plaintext after STARTTLS (command injection?)",
                session_id=self.session.id,
                count=len(self.pending),
            )
            del self.pending[:]
            self.pendingConsumed()
        self.send(go_ahead)
        self.transport.startTLS(self.factory.tls)
        self.expect_handshake()

    def handshake_done(self) -> None:
        if self._starttls_done:
            self.tls_started()
            self._reading = True
            self.pendingReceived()
        else:
            self._greet()

    def tls_started(self) -> None:
        """STARTTLS succeeded: forget everything the client said in plaintext (RFC 3207
        §4.2: the client starts over, e.g. with a new EHLO)."""
