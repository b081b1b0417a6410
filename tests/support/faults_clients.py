"""
Blocking clients of each front-end for the fault-injection suite (`tests/test_faults.py`):
what each protocol says (`Dialect`) and one whole session (`session`).
"""

from __future__ import annotations

import socket
import ssl
from typing import Any

import attrs

from tests.support.frontends import plain_ir
from tests.support.imap import read_tagged
from tests.support.net import WAIT, read_line, reset
from tests.support.smtp import raw_reply


@attrs.frozen
class Dialect:
    """What a client of one front-end says, and hears (the tables of docs/smtp.md and docs/imap-pop3.md)."""

    protocol: str
    login: bytes
    """A login in one command line (SASL PLAIN with an initial response)."""
    logged_in: bytes
    """mailrelay's answer to it once the upstream has accepted it (the upstream's own,
    for IMAP and POP3)."""
    unavailable: bytes
    """The answer when no route could be connected or logged in."""
    temporary: bytes
    """The answer when the Router failed (the auth service is down, slow, broken)."""
    probe: bytes
    """A command for the upstream, once logged in (spliced or relayed), and..."""
    probe_answer: bytes
    """...the upstream's answer to it."""
    quit: bytes
    sasl_start: bytes
    """A SASL exchange that mailrelay answers with a continuation..."""
    continuation: bytes
    """...which begins so."""
    starttls: bytes
    go_ahead: bytes
    hello: bytes | None = None
    """What the client says after the greeting, before anything else (SMTP's EHLO)."""


SMTP = Dialect(
    "smtp",
    login=b"AUTH PLAIN " + plain_ir(),
    logged_in=b"235 2.7.0 Authentication successful\r\n",
    unavailable=b"451 4.4.1 Mail server temporarily unavailable, try again later\r\n",
    temporary=b"451 4.3.0 Temporary failure, try again later\r\n",
    probe=b"NOOP",
    probe_answer=b"250 2.0.0 upstream noop\r\n",
    quit=b"QUIT",
    sasl_start=b"AUTH LOGIN",
    continuation=b"334 VXNlcm5hbWU6\r\n",
    starttls=b"STARTTLS",
    go_ahead=b"220 2.0.0 Ready to start TLS\r\n",
    hello=b"EHLO client.test",
)
IMAP = Dialect(
    "imap",
    login=b"a1 AUTHENTICATE PLAIN " + plain_ir(),
    logged_in=b"a1 OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n",
    unavailable=b"a1 NO [UNAVAILABLE] Mail server temporarily unavailable, try again later\r\n",
    temporary=b"a1 NO [UNAVAILABLE] Temporary failure, try again later\r\n",
    probe=b"a2 NOOP",
    probe_answer=b"a2 OK upstream noop\r\n",
    quit=b"a3 LOGOUT",
    sasl_start=b"a1 AUTHENTICATE PLAIN",
    continuation=b"+ \r\n",
    starttls=b"s STARTTLS",
    go_ahead=b"s OK Begin TLS negotiation now\r\n",
)
POP3 = Dialect(
    "pop3",
    login=b"AUTH PLAIN " + plain_ir(),
    logged_in=b"+OK upstream: logged in\r\n",
    unavailable=b"-ERR [SYS/TEMP] Mail server temporarily unavailable, try again later\r\n",
    temporary=b"-ERR [SYS/TEMP] Temporary failure, try again later\r\n",
    probe=b"NOOP",
    probe_answer=b"+OK upstream noop\r\n",
    quit=b"QUIT",
    sasl_start=b"AUTH PLAIN",
    continuation=b"+ \r\n",
    starttls=b"STLS",
    go_ahead=b"+OK Begin TLS negotiation now\r\n",
)
NONE = Dialect(
    "none",
    login=b"",
    logged_in=b"",
    unavailable=b"",
    temporary=b"",
    probe=b"ping",
    probe_answer=b"pong ping\r\n",
    quit=b"",
    sasl_start=b"",
    continuation=b"",
    starttls=b"",
    go_ahead=b"",
)
DIALECTS = {d.protocol: d for d in (SMTP, IMAP, POP3, NONE)}


class Client:
    """A blocking client of one listener (run it off the reactor thread)."""

    def __init__(self, dialect: Dialect, port: int, context: ssl.SSLContext | None = None) -> None:
        """`context`: connect with TLS from the first byte (a `tls` listener)."""
        self.dialect = dialect
        self.port = port
        self.context = context
        self.conn: Any = None

    def connect(self, greet: bool = True) -> bytes:
        """Connect; read the greeting and say hello when `greet` (what was heard)."""
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=WAIT)
        self.conn = self.context.wrap_socket(raw, server_hostname="relay.test") if self.context else raw
        if not greet or self.dialect.protocol == "none":
            return b""
        heard = raw_reply(self.conn) if self.dialect.protocol == "smtp" else read_line(self.conn)
        if self.dialect.hello is not None:
            heard += self.command(self.dialect.hello)
        return heard

    def reply(self, tag: bytes = b"") -> bytes:
        """One whole reply (an IMAP one up to the line tagged `tag`)."""
        if self.dialect.protocol == "smtp":
            return raw_reply(self.conn)
        if self.dialect.protocol == "imap" and tag:
            return read_tagged(self.conn, tag)
        return read_line(self.conn)

    def command(self, line: bytes) -> bytes:
        self.conn.sendall(line + b"\r\n")
        tag = line.split(b" ", 1)[0] if self.dialect.protocol == "imap" else b""
        return self.reply(b"" if line == self.dialect.sasl_start else tag)

    def rest(self) -> bytes:
        """Everything until the end of the stream (raising if the connection is reset)."""
        data = b""
        while chunk := self.conn.recv(1 << 16):
            data += chunk
        return data

    def starttls(self, context: ssl.SSLContext) -> None:
        assert self.command(self.dialect.starttls) == self.dialect.go_ahead
        self.conn = context.wrap_socket(self.conn, server_hostname="relay.test")
        if self.dialect.hello is not None:
            self.command(self.dialect.hello)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()

    def reset(self) -> None:
        if self.conn is not None:
            reset(self.conn)

    def end(self, how: str) -> None:
        """Go away: "close" (an end of stream) or "reset"."""
        self.reset() if how == "reset" else self.close()


@attrs.define
class Transcript:
    """What a client heard in one session (`session()`)."""

    greeting: bytes = b""
    login: bytes = b""
    probe: bytes = b""
    rest: bytes = b""
    """What came after the last command, up to the end of the stream."""
    error: str | None = None
    """The exception that ended the session early (a reset), by name."""


def session(client: Client, login: bool = True) -> Transcript:
    """A whole client session: connect, log in, and when that succeeded carry the probe
    through and quit; otherwise quit. Reads to the end of the stream."""
    heard = Transcript()
    dialect = client.dialect
    try:
        heard.greeting = client.connect()
        logged_in = True
        if login and dialect.protocol != "none":
            heard.login = client.command(dialect.login)
            logged_in = heard.login == dialect.logged_in
        if logged_in:
            heard.probe = client.command(dialect.probe)
        if dialect.quit:
            client.conn.sendall(dialect.quit + b"\r\n")
        elif client.context is not None:
            return heard  # a splice over TLS cannot be half-closed: just go
        else:
            client.conn.shutdown(socket.SHUT_WR)  # a splice ends when both sides have
        heard.rest = client.rest()
    except OSError as e:
        heard.error = type(e).__name__
    finally:
        client.close()
    return heard
