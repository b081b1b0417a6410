"""
The SMTP upstream of bench/smtp.py, and the account its clients, nginx's auth_http
(`common.auth_http`) and bench/imap.py's Dovecot use.
"""

from __future__ import annotations

import asyncio
import binascii
import ssl
from typing import Any

SMTP_USER = "bench@example.org"
SMTP_PASSWORD = "bench-Pa55word"
SMTP_HOSTNAME = "upstream.bench.example"
SMTP_MAX_LINE = 4096
_SMTP_EHLO = (
    b"250-" + SMTP_HOSTNAME.encode() + b"\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n250-SIZE 52428800\r\n"
)
SMTP_EHLO_PLAIN = _SMTP_EHLO + b"250-AUTH PLAIN\r\n250 STARTTLS\r\n"
SMTP_EHLO_TLS = _SMTP_EHLO + b"250 AUTH PLAIN\r\n"


def plain_response(user: str, password: str) -> bytes:
    """The base64 of a SASL PLAIN initial response (no authorization identity)."""
    return binascii.b2a_base64(b"\0" + user.encode() + b"\0" + password.encode(), newline=False)


class SMTPServerProtocol(asyncio.Protocol):
    """
    A small, fast SMTP server: ESMTP with STARTTLS (`tls`: the bench certificate) and AUTH
    PLAIN for SMTP_USER/SMTP_PASSWORD (accepted with or without TLS; with or without an
    initial response), MAIL (after AUTH only), RCPT, DATA read to the end marker and
    answered `250 ... (N bytes)` with the size of what it read, RSET, NOOP, QUIT.
    Commands may be pipelined; nothing is stored. With `require_auth` false (an MX's
    upstream, bench/smtp.py's plain sessions) MAIL needs no AUTH.
    """

    def __init__(self, tls: ssl.SSLContext, require_auth: bool = True) -> None:
        self.tls_context = tls
        self.require_auth = require_auth
        self.transport: Any = None
        self.buffer = b""
        self.tls = False
        self.helo = self.authenticated = self.auth_pending = self.mail = self.in_data = False
        self.rcpts = 0
        self.tail = b""  # the last bytes of the message read so far (the end marker may straddle reads)
        self.size = 0
        self.task: asyncio.Task[None] | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.write(b"220 " + SMTP_HOSTNAME.encode() + b" ESMTP ready\r\n")

    def data_received(self, data: bytes) -> None:
        if self.task is not None:
            # The TLS handshake is done but start_tls() has not returned the TLS transport
            # yet (the client's first command came with its Finished): wait for it.
            self.buffer += data
            return
        out: list[bytes] = []
        if self.buffer:
            data, self.buffer = self.buffer + data, b""
        while data:
            if self.in_data:
                data = self._message(data, out)
                continue
            end = data.find(b"\n")
            if end < 0:
                if len(data) > SMTP_MAX_LINE:
                    out.append(b"500 5.5.6 line too long\r\n")
                    break
                self.buffer = data
                break
            line, data = data[: end + 1], data[end + 1 :]
            action = self._command(line.rstrip(b"\r\n"), out)
            if action == "quit":
                self.transport.write(b"".join(out))
                self.transport.close()
                return
            if action == "starttls":
                self.transport.write(b"".join(out))
                if data:  # plaintext pipelined behind STARTTLS (RFC 3207: never to be executed)
                    self.transport.abort()
                    return
                # Not a byte more in plaintext: the ClientHello goes to the TLS layer.
                self.transport.pause_reading()
                self.task = asyncio.get_running_loop().create_task(self._start_tls())
                return
        if out:
            self.transport.write(b"".join(out))

    def _message(self, data: bytes, out: list[bytes]) -> bytes:
        """Message data up to the end marker; what follows it (pipelined commands)."""
        probe = self.tail + data
        end = probe.find(b"\r\n.\r\n")
        if end < 0:
            self.size += len(data)
            self.tail = probe[-4:]
            return b""
        self.size += end + 2 - len(self.tail)  # up to and including the CRLF before the dot
        out.append(b"250 2.0.0 Ok: queued (%d bytes)\r\n" % self.size)
        self.in_data = self.mail = False
        self.rcpts = 0
        return data[end + 5 - len(self.tail) :]

    def _command(self, line: bytes, out: list[bytes]) -> str | None:
        if self.auth_pending:
            self.auth_pending = False
            out.append(self._check_plain(line))
            return None
        verb = line[:8].split(b" ", 1)[0].upper()
        if verb == b"EHLO":
            self.helo, self.mail, self.rcpts = True, False, 0
            out.append(SMTP_EHLO_TLS if self.tls else SMTP_EHLO_PLAIN)
        elif verb == b"HELO":
            self.helo, self.mail, self.rcpts = True, False, 0
            out.append(b"250 " + SMTP_HOSTNAME.encode() + b"\r\n")
        elif verb == b"STARTTLS":
            if self.tls:
                out.append(b"503 5.5.1 TLS already active\r\n")
                return None
            out.append(b"220 2.0.0 Ready to start TLS\r\n")
            return "starttls"
        elif verb == b"AUTH":
            words = line.split()
            if not self.helo or self.authenticated or self.mail:
                out.append(b"503 5.5.1 Error: EHLO first, once, and not in a transaction\r\n")
            elif len(words) < 2 or words[1].upper() != b"PLAIN":
                out.append(b"504 5.5.4 Unrecognized authentication type\r\n")
            elif len(words) == 2:
                self.auth_pending = True
                out.append(b"334 \r\n")
            else:
                out.append(self._check_plain(words[2]))
        elif verb == b"MAIL":
            if self.require_auth and not self.authenticated:
                out.append(b"530 5.7.0 Authentication required\r\n")
            elif self.mail:
                out.append(b"503 5.5.1 Error: nested MAIL command\r\n")
            else:
                self.mail = True
                out.append(b"250 2.1.0 Ok\r\n")
        elif verb == b"RCPT":
            if not self.mail:
                out.append(b"503 5.5.1 Error: need MAIL command\r\n")
            else:
                self.rcpts += 1
                out.append(b"250 2.1.5 Ok\r\n")
        elif verb == b"DATA":
            if not self.rcpts:
                out.append(b"503 5.5.1 Error: need RCPT command\r\n")
            else:
                self.in_data, self.tail, self.size = True, b"\r\n", 0
                out.append(b"354 End data with <CR><LF>.<CR><LF>\r\n")
        elif verb == b"RSET":
            self.mail, self.rcpts = False, 0
            out.append(b"250 2.0.0 Ok\r\n")
        elif verb == b"NOOP":
            out.append(b"250 2.0.0 Ok\r\n")
        elif verb == b"QUIT":
            out.append(b"221 2.0.0 Bye\r\n")
            return "quit"
        else:
            out.append(b"502 5.5.2 Error: command not recognized\r\n")
        return None

    def _check_plain(self, response: bytes) -> bytes:
        if response == b"*":
            return b"501 5.7.0 Authentication cancelled\r\n"
        try:
            _, user, password = binascii.a2b_base64(response).split(b"\0")
        except (binascii.Error, ValueError):
            return b"501 5.5.2 Cannot decode the response\r\n"
        if user == SMTP_USER.encode() and password == SMTP_PASSWORD.encode():
            self.authenticated = True
            return b"235 2.7.0 Authentication successful\r\n"
        return b"535 5.7.8 Authentication credentials invalid\r\n"

    async def _start_tls(self) -> None:
        try:
            transport = await asyncio.get_running_loop().start_tls(self.transport, self, self.tls_context, server_side=True)
        except Exception:  # a client that gave up in the handshake: nothing to report
            self.transport.abort()
            return
        if transport is None:
            return
        # RFC 3207: forget everything from before TLS.
        self.transport, self.tls, self.task = transport, True, None
        self.helo = self.authenticated = self.mail = False
        self.rcpts = 0
        if self.buffer:
            data, self.buffer = self.buffer, b""
            self.data_received(data)

    def eof_received(self) -> bool:
        return False
