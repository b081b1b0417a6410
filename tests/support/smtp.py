"""
SMTP peers for the front-end tests: a scripted upstream that records every byte it
hears (to check XCLIENT, AUTH and replayed commands byte for byte), smtplib helpers,
and the TestCase of the SMTP front-end's tests.
"""

from __future__ import annotations

import base64
import functools
import os
import shutil
import smtplib
import socket
import ssl
from typing import Any

import attrs

from tests.support import frontends
from tests.support.frontends import PASSWORD, USER, FrontEndTestCase
from tests.support.net import WAIT, recv_all
from tests.support.postfix import Postfix, split_delivered


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


REFUSED = "Authentication credentials invalid"

password_check = functools.partial(frontends.password_check, message=REFUSED)
"""`tests.support.frontends.password_check`, refusing with SMTP's words."""


class SMTPTestCase(FrontEndTestCase):
    """mailrelay with one SMTP listener, a `ScriptedSMTP` upstream per test, smtplib clients."""

    protocol = "smtp"

    def upstream(self, **options: Any) -> Any:
        options.setdefault("users", {USER: PASSWORD})
        return self.server(ScriptedSMTP(**options))

    def smtp(self, port: int, mode: str = "starttls") -> smtplib.SMTP:
        """An smtplib client, through TLS (STARTTLS or implicit) and EHLO'd."""
        if mode == "tls":
            client: smtplib.SMTP = smtplib.SMTP_SSL(
                "127.0.0.1", port, local_hostname="client.example", timeout=WAIT, context=self.context
            )
        else:
            client = smtplib.SMTP("127.0.0.1", port, local_hostname="client.example", timeout=WAIT)
            client.starttls(context=self.context)
        client.ehlo()
        return client

    def tls_connect(self, port: int, context: Any = None) -> Any:
        """A raw client of an implicit-TLS listener, its greeting read."""
        raw = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        conn = (context or self.context).wrap_socket(raw, server_hostname="relay.test")
        self.assertEqual(raw_reply(conn)[:4], b"220 ")
        return conn

    def tls_exchange(self, port: int, send: bytes) -> bytes:
        """Over implicit TLS: EHLO, then `send` in one write; everything until the close."""
        with self.tls_connect(port) as conn:
            conn.sendall(b"EHLO c.example\r\n")
            raw_reply(conn)
            conn.sendall(send)
            return recv_all(conn)

    def try_auth(self, port: int, mode: str = "tls", password: str = PASSWORD) -> tuple[int, bytes]:
        """AUTH PLAIN with smtplib: the reply's code and text, success or not."""
        with self.smtp(port, mode) as smtp:
            smtp.user, smtp.password = USER, password
            try:
                return smtp.auth("PLAIN", smtp.auth_plain)
            except smtplib.SMTPAuthenticationError as e:
                assert isinstance(e.smtp_error, bytes)  # a server's reply, as smtplib read it
                return e.smtp_code, e.smtp_error

    def raw(self, port: int) -> socket.socket:
        conn = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        self.addCleanup(conn.close)
        self.assertEqual(raw_reply(conn)[:4], b"220 ")
        return conn


MESSAGE = (
    b"From: Alice <alice@example.test>\r\nTo: bob@example.test\r\nSubject: caf\xc3\xa9\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    b"Hello Bob,\r\n.a line that starts with a dot\r\n8-bit: \xe2\x82\xac \xff\xfe\r\n"
)


# -- in front of a real Postfix (the slow tier)

CLIENT_ADDRESS = "127.0.0.2"
"""Where clients connect from: Postfix sees mailrelay at 127.0.0.1, so it can learn the
client's address only through XCLIENT."""
BOB = "bob@example.test"


def lf(message: bytes) -> bytes:
    """A message as Postfix stores it in a maildir: LF line ends."""
    return message.replace(b"\r\n", b"\n")


class PostfixTestCase(SMTPTestCase):
    """The SMTP front-end in front of a real Postfix, started once for the class, which
    delivers mail for alice and bob to maildirs; clients connect from CLIENT_ADDRESS."""

    postfix: Postfix

    @classmethod
    def setUpClass(cls) -> None:
        # The directory is open to others: Postfix's daemons and its delivery agent go through it.
        cert, key = cls.upstream_pki("mailrelay-postfix-", "mx.upstream.test")
        os.mkdir(f"{cls.directory}/postfix")
        cls.postfix = Postfix(f"{cls.directory}/postfix", tls=(cert, key), users=(USER, BOB))
        cls.postfix.start()

    @classmethod
    def tearDownClass(cls) -> None:
        cls.postfix.stop()
        shutil.rmtree(cls.directory, ignore_errors=True)

    def setUp(self) -> None:
        super().setUp()
        self.delivered_before = len(self.postfix.messages(BOB))

    def smtp_from(self, port: int, mode: str = "starttls") -> smtplib.SMTP:
        """smtplib from 127.0.0.2, through TLS, EHLO'd."""
        source = (CLIENT_ADDRESS, 0)
        if mode == "tls":
            client: smtplib.SMTP = smtplib.SMTP_SSL(
                "127.0.0.1", port, local_hostname="client.example", timeout=WAIT, context=self.context, source_address=source
            )
        else:
            client = smtplib.SMTP("127.0.0.1", port, local_hostname="client.example", timeout=WAIT, source_address=source)
            client.starttls(context=self.context)
        client.ehlo()
        return client

    async def next_delivery(self, count: int = 1) -> list[tuple[bytes, bytes]]:
        """The next `count` messages delivered to bob: (Postfix's trace fields, message)."""
        files = await self.in_thread(self.postfix.wait_for_messages, BOB, self.delivered_before + count)
        return [split_delivered(f) for f in files[self.delivered_before :]]
