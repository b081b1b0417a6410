"""
POP3 peers for the front-end tests: a scripted upstream that records every line it
hears (to check CAPA, XCLIENT, USER/PASS and AUTH byte for byte) and serves a mailbox of
one message, and raw-socket helpers that read POP3 replies as they come.
"""

from __future__ import annotations

import base64
import socket
import ssl
from typing import Any

import attrs

from tests.support.frontends import PASSWORD, USER
from tests.support.net import read_line

MESSAGE = (
    b"From: Alice <alice@example.test>\r\nTo: bob@example.test\r\nSubject: caf\xc3\xa9\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    b"Hello Bob,\r\n.a line that starts with a dot\r\n.\r\n..two dots\r\n8-bit: \xe2\x82\xac \xff\xfe\r\n"
    b"-ERR is not a reply here\r\n+OK neither\r\n.\r\nthe end\r\n"
)
"""The upstream's only message: lines that start with a dot (one is a lone dot, which
would end the reply unstuffed), 8-bit bytes, lines that look like POP3 replies."""

DEFAULT_CAPABILITIES = ("USER", "SASL PLAIN", "RESP-CODES", "TOP", "UIDL")
LOGIN_FAILED = b"-ERR [AUTH] Authentication failed."


def stuffed(message: bytes) -> bytes:
    """`message` as a multi-line reply carries it (RFC 1939 3): a line that starts with
    "." gets another one; the terminating ".\\r\\n" is not included."""
    return b"".join(b"." + line if line.startswith(b".") else line for line in message.splitlines(keepends=True))


def logged_in_reply(user: str) -> bytes:
    """What `ScriptedPOP3` answers a successful login with (no CRLF)."""
    return b"+OK upstream: logged in as " + user.encode()


@attrs.define
class Heard:
    """What one connection to `ScriptedPOP3` said."""

    lines: list[bytes] = attrs.field(factory=list)
    """Every line received, in order, CRLF included: commands and SASL responses."""
    login: str | None = None
    """The user that logged in."""
    tls: bool = False
    """Whether the connection went through STLS."""


class ScriptedPOP3:
    """
    A small but real POP3 server (one thread per connection, see `ThreadedServer`):
    greets `+OK upstream ready` (`+OK [XCLIENT] upstream ready` with `xclient`, as Dovecot
    greets a trusted proxy), answers CAPA with `capabilities` (plus STLS when `tls` is
    given and the connection is still plaintext), STLS, XCLIENT (`+OK` only when greeted
    or listed), USER/PASS and AUTH PLAIN (initial response or `+ ` continuation) and
    XOAUTH2 against `users`; a wrong login is answered `login_failure`. Once logged in:
    STAT, LIST, UIDL, RETR and TOP of its one message (byte-stuffed), NOOP, QUIT. The
    handler returns a `Heard`.
    """

    def __init__(
        self,
        users: dict[str, str] | None = None,
        capabilities: tuple[str, ...] = DEFAULT_CAPABILITIES,
        xclient: bool = False,
        login_failure: bytes = LOGIN_FAILED,
        tls: ssl.SSLContext | None = None,
        message: bytes = MESSAGE,
    ) -> None:
        self.users = {USER: PASSWORD} if users is None else users
        self.capabilities = capabilities
        self.xclient = xclient
        self.login_failure = login_failure
        self.tls = tls
        self.message = message

    @property
    def greeting(self) -> bytes:
        return b"+OK [XCLIENT] upstream ready" if self.xclient else b"+OK upstream ready"

    def __call__(self, conn: socket.socket) -> Heard:
        heard = Heard()
        sock: Any = conn
        stream: Any = conn.makefile("rb", buffering=0)

        def send(data: bytes) -> None:
            sock.sendall(data + b"\r\n")

        def readline() -> bytes:
            try:
                line: bytes = stream.readline(1 << 20)
            except ConnectionResetError:  # mailrelay aborts a connection whose login failed
                return b""
            if line:
                heard.lines.append(line)
            return line

        def check(user: bytes, password: bytes) -> None:
            if self.users.get(user.decode()) == password.decode():
                heard.login = user.decode()
                send(logged_in_reply(heard.login))
            else:
                send(self.login_failure)

        send(self.greeting)
        user: bytes | None = None
        while True:
            line = readline()
            if not line:
                return heard
            verb, _, arg = line.rstrip(b"\r\n").partition(b" ")
            verb = verb.upper()
            if verb == b"QUIT":
                send(b"+OK Logging out.")
                return heard
            if verb == b"NOOP":
                send(b"+OK")
            elif heard.login is not None:
                self.transaction(verb, arg, send, sock)
            elif verb == b"CAPA":
                listed = list(self.capabilities)
                if self.tls is not None and not heard.tls:
                    listed.append("STLS")
                send(b"+OK\r\n" + b"".join(c.encode() + b"\r\n" for c in listed) + b".")
            elif verb == b"STLS" and self.tls is not None and not heard.tls:
                send(b"+OK Begin TLS negotiation now.")
                sock = self.tls.wrap_socket(conn, server_side=True)
                stream = sock.makefile("rb", buffering=0)
                heard.tls = True
            elif verb == b"XCLIENT" and (self.xclient or "XCLIENT" in self.capabilities):
                send(b"+OK")
            elif verb == b"USER":
                user = arg
                send(b"+OK")
            elif verb == b"PASS" and user is not None:
                check(user, arg)
                user = None
            elif verb == b"AUTH":
                mechanism, _, initial = arg.partition(b" ")
                offered = [m.upper() for c in self.capabilities if c.startswith("SASL ") for m in c.split()[1:]]
                if mechanism.upper().decode() not in offered:
                    send(b"-ERR Unsupported authentication mechanism.")
                    continue
                if not initial:
                    send(b"+ ")
                    initial = readline().rstrip(b"\r\n")
                response = base64.b64decode(initial)
                if mechanism.upper() == b"PLAIN":
                    _, name, password = response.split(b"\0")
                else:  # XOAUTH2: user=U ^A auth=Bearer T ^A ^A; the token is the user's password here
                    fields = dict(f.split(b"=", 1) for f in response.rstrip(b"\x01").split(b"\x01"))
                    name, password = fields[b"user"], fields[b"auth"].removeprefix(b"Bearer ")
                check(name, password)
            else:
                send(b"-ERR Unknown command.")

    def transaction(self, verb: bytes, arg: bytes, send: Any, sock: Any) -> None:
        """The TRANSACTION state (RFC 1939 5), a mailbox of one message."""
        size = len(self.message)
        if verb == b"STAT":
            send(b"+OK 1 %d" % size)
        elif verb == b"LIST" and not arg:
            send(b"+OK 1 messages:\r\n1 %d\r\n." % size)
        elif verb == b"LIST" and arg == b"1":
            send(b"+OK 1 %d" % size)
        elif verb == b"UIDL" and not arg:
            send(b"+OK\r\n1 uid-0001\r\n.")
        elif verb == b"RETR" and arg == b"1":
            sock.sendall(b"+OK %d octets\r\n" % size + stuffed(self.message) + b".\r\n")
        elif verb == b"TOP" and arg.split(b" ")[0] == b"1":
            header = self.message.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
            sock.sendall(b"+OK\r\n" + stuffed(header) + b".\r\n")
        elif verb in (b"RETR", b"LIST", b"TOP", b"DELE"):
            send(b"-ERR There's no message " + arg)
        else:
            send(b"-ERR Unknown command.")


def read_multiline(conn: Any) -> bytes:
    """A whole multi-line reply (`+OK` ... `.`), as received; a `-ERR` is one line."""
    reply = first = read_line(conn)
    if not first.startswith(b"+OK"):
        return reply
    while (line := read_line(conn)) not in (b".\r\n", b""):
        reply += line
    return reply + line


def capabilities(reply: bytes) -> list[str]:
    """The capability lines of a CAPA reply (read by `read_multiline`)."""
    lines = reply.decode().split("\r\n")
    assert lines[0].startswith("+OK") and lines[-2:] == [".", ""], reply
    return lines[1:-2]
