"""
SMTP peers for the front-end tests: a scripted upstream that records every byte it
hears (to check XCLIENT, AUTH and replayed commands byte for byte), and smtplib
helpers.
"""

from __future__ import annotations

import base64
import socket
import ssl
from typing import Any

import attrs

from tests.support import WAIT


@attrs.define
class Heard:
    """What one connection to `ScriptedSMTP` said and carried."""

    lines: list[bytes] = attrs.field(factory=list)
    """Every command line received, CRLF included (DATA content excluded)."""
    messages: list[bytes] = attrs.field(factory=list)
    """The content of each DATA, dot-unstuffed, as received."""
    login: str | None = None
    chunks: list[bytes] = attrs.field(factory=list)
    """BDAT chunks of the message in progress."""


class ScriptedSMTP:
    """
    A small but real SMTP server (one thread per connection, see `ThreadedServer`):
    EHLO with the given extensions, XCLIENT, AUTH PLAIN and LOGIN against `users`,
    STARTTLS with `tls`, MAIL/RCPT/DATA/RSET/NOOP/QUIT. `refuse_rcpt` are recipients
    answered 550. The handler returns a `Heard`.
    """

    def __init__(
        self,
        users: dict[str, str] | None = None,
        extensions: tuple[str, ...] = ("PIPELINING", "8BITMIME", "XCLIENT NAME ADDR PORT PROTO HELO LOGIN DESTADDR DESTPORT"),
        tls: ssl.SSLContext | None = None,
        refuse_rcpt: tuple[str, ...] = (),
        auth_reply: bytes | None = None,
        mechanisms: tuple[str, ...] = ("PLAIN", "LOGIN"),
    ) -> None:
        self.users = users or {}
        self.extensions = extensions
        self.tls = tls
        self.refuse_rcpt = refuse_rcpt
        self.auth_reply = auth_reply
        self.mechanisms = mechanisms

    def __call__(self, conn: socket.socket) -> Heard:
        heard = Heard()
        stream: Any = conn.makefile("rwb", buffering=0)
        sock: Any = conn

        def send(line: bytes) -> None:
            sock.sendall(line + b"\r\n")

        def readline() -> bytes:
            line = stream.readline(1 << 20)
            return line

        send(b"220 upstream.test ESMTP scripted")
        secure = False
        while True:
            line = readline()
            if not line:
                return heard
            heard.lines.append(line)
            verb, _, arg = line.rstrip(b"\r\n").partition(b" ")
            verb = verb.upper()
            if verb == b"EHLO":
                extensions = list(self.extensions)
                if self.users:
                    extensions.append("AUTH " + " ".join(self.mechanisms))
                if self.tls is not None and not secure:
                    extensions.append("STARTTLS")
                reply = [b"upstream.test", *(e.encode() for e in extensions)]
                for i, text in enumerate(reply):
                    send(b"250" + (b"-" if i < len(reply) - 1 else b" ") + text)
            elif verb == b"HELO":
                send(b"250 upstream.test")
            elif verb == b"STARTTLS" and self.tls is not None:
                send(b"220 2.0.0 go ahead")
                sock = self.tls.wrap_socket(conn, server_side=True)
                stream = sock.makefile("rwb", buffering=0)
                secure = True
            elif verb == b"XCLIENT":
                send(b"220 upstream.test ESMTP after XCLIENT")
            elif verb == b"AUTH":
                mechanism, _, initial = arg.partition(b" ")
                if mechanism.upper() == b"PLAIN":
                    _, user, password = base64.b64decode(initial).split(b"\0")
                elif mechanism.upper() == b"LOGIN":
                    send(b"334 VXNlcm5hbWU6")
                    user_line = readline()
                    heard.lines.append(user_line)
                    user = base64.b64decode(user_line.strip())
                    send(b"334 UGFzc3dvcmQ6")
                    password_line = readline()
                    heard.lines.append(password_line)
                    password = base64.b64decode(password_line.strip())
                elif mechanism.upper() in (b"XOAUTH2", b"OAUTHBEARER") and mechanism.upper().decode() in self.mechanisms:
                    # Recorded, not checked: the token is the user's password here.
                    response = base64.b64decode(initial)
                    heard.lines.append(b"decoded: " + response + b"\r\n")
                    user = (
                        response.split(b"user=")[-1].split(b"\x01")[0]
                        if mechanism.upper() == b"XOAUTH2"
                        else response.split(b",")[1][2:]
                    )
                    password = response.split(b"Bearer ")[1].split(b"\x01")[0]
                else:
                    send(b"504 5.5.4 unsupported")
                    continue
                if self.auth_reply is not None:
                    send(self.auth_reply)
                elif self.users.get(user.decode()) == password.decode():
                    heard.login = user.decode()
                    send(b"235 2.7.0 welcome")
                else:
                    send(b"535 5.7.8 no")
            elif verb == b"MAIL":
                send(b"250 2.1.0 sender ok")
            elif verb == b"RCPT":
                address = arg.partition(b"<")[2].partition(b">")[0].decode()
                if address in self.refuse_rcpt:
                    send(b"550 5.1.1 <" + address.encode() + b"> no such user")
                else:
                    send(b"250 2.1.5 recipient ok")
            elif verb == b"DATA":
                send(b"354 go ahead")
                content = []
                while (data_line := readline()) not in (b".\r\n", b""):
                    content.append(data_line[1:] if data_line.startswith(b".") else data_line)
                heard.messages.append(b"".join(content))
                send(b"250 2.0.0 queued as %d" % len(heard.messages))
            elif verb == b"BDAT":
                size, _, last = arg.partition(b" ")
                chunk = b""
                while len(chunk) < int(size):
                    chunk += stream.read(int(size) - len(chunk))
                heard.chunks.append(chunk)
                if last.upper() == b"LAST":
                    heard.messages.append(b"".join(heard.chunks))
                    heard.chunks.clear()
                send(b"250 2.0.0 %d octets received" % len(chunk))
            elif verb in (b"RSET", b"NOOP"):
                send(b"250 2.0.0 ok")
            elif verb == b"QUIT":
                send(b"221 2.0.0 bye")
                return heard
            else:
                send(b"500 5.5.2 what?")


def client_context(ca: Any) -> ssl.SSLContext:
    """A client context trusting the test CA (a trustme CA)."""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def raw_reply(conn: Any) -> bytes:
    """One whole (multi-line) SMTP reply, read a byte at a time."""
    reply = b""
    while True:
        line = b""
        while not line.endswith(b"\n"):
            byte = conn.recv(1)
            if not byte:
                return reply + line
            line += byte
        reply += line
        if line[3:4] != b"-":
            return reply


def timeout_socket(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=WAIT)
