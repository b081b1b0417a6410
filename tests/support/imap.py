"""
IMAP peers for the front-end tests: a scripted upstream that really parses what it is
sent (quoted strings, synchronising and non-synchronising literals, SASL) and records
every byte it hears, to check mailrelay's ID, LOGIN and AUTHENTICATE byte for byte; and
raw-socket helpers for clients.
"""

from __future__ import annotations

import base64
import imaplib
import re
import select
import socket
import ssl
from typing import Any

import attrs

from tests.support.net import WAIT, read_line

GREETING_CAPABILITIES = ("IMAP4rev1", "SASL-IR", "ID", "LITERAL+", "AUTH=PLAIN")
LOGGED_IN_CAPABILITIES = "IMAP4rev1 IDLE MOVE"

_LITERAL = re.compile(rb"\{([0-9]+)(\+?)\}\r?\n\Z")


class Atom(bytes):
    """An atom as sent; strings (quoted or literal) are plain `bytes`."""


class _Literal(bytes):
    """A literal's bytes among a command's parts."""


Token = Any
"""An `Atom`, a string (`bytes`), or a list of tokens."""


class IMAPParseError(Exception):
    """What the scripted server was sent is not IMAP."""


def tokenize(parts: list[bytes]) -> list[Token]:
    """The tokens of a command whose `parts` are its lines (without line ends and literal
    markers) and literals (`_Literal`)."""
    stack: list[list[Token]] = [[]]
    for part in parts:
        if isinstance(part, _Literal):
            stack[-1].append(bytes(part))
            continue
        i = 0
        while i < len(part):
            c = part[i : i + 1]
            if c == b" ":
                i += 1
            elif c == b"(":
                inner: list[Token] = []
                stack[-1].append(inner)
                stack.append(inner)
                i += 1
            elif c == b")":
                if len(stack) == 1:
                    raise IMAPParseError("unbalanced )")
                stack.pop()
                i += 1
            elif c == b'"':
                value = bytearray()
                i += 1
                while True:
                    if i >= len(part):
                        raise IMAPParseError("unterminated quoted string")
                    if part[i : i + 1] == b'"':
                        i += 1
                        break
                    if part[i : i + 1] == b"\\":
                        if part[i + 1 : i + 2] not in (b"\\", b'"'):
                            raise IMAPParseError("bad escape")
                        value += part[i + 1 : i + 2]
                        i += 2
                    else:
                        value += part[i : i + 1]
                        i += 1
                stack[-1].append(bytes(value))
            else:
                start = i
                while i < len(part) and part[i : i + 1] not in (b" ", b"(", b")", b'"'):
                    i += 1
                stack[-1].append(Atom(part[start:i]))
    if len(stack) != 1:
        raise IMAPParseError("unbalanced (")
    return stack[0]


@attrs.define
class Heard:
    """What one connection to `ScriptedIMAP` said and carried."""

    lines: list[bytes] = attrs.field(factory=list)
    """Every line (CRLF included) and every literal received, as received, in order:
    joined, they are every byte the server heard."""
    commands: list[bytes] = attrs.field(factory=list)
    """Every command as received: its lines and literals joined."""
    continuations: list[bytes] = attrs.field(factory=list)
    """Every continuation request the server sent (`+ ...`), CRLF included."""
    early: list[bytes] = attrs.field(factory=list)
    """Bytes the client sent after announcing a synchronising literal, before the
    server's continuation: a client that does not wait for it."""
    login: str | None = None
    """The user the server logged in."""
    id: Token = None
    """The parameter of the last ID command (a list of strings, or the atom NIL)."""
    tls: bool = False
    """Whether STARTTLS was done."""

    @property
    def raw(self) -> bytes:
        return b"".join(self.lines)


class _Stream:
    """A buffered reader over a (possibly TLS) socket, so that what is already
    received can be seen."""

    def __init__(self, sock: Any) -> None:
        self.sock = sock
        self.buffer = bytearray()

    def _fill(self) -> bool:
        try:
            data = self.sock.recv(1 << 16)
        except ConnectionResetError:  # mailrelay aborts a connection it gave up on
            return False
        if not data:
            return False
        self.buffer += data
        return True

    def readline(self) -> bytes:
        while (end := self.buffer.find(b"\n")) < 0:
            if not self._fill():
                rest = bytes(self.buffer)
                self.buffer.clear()
                return rest
        line = bytes(self.buffer[: end + 1])
        del self.buffer[: end + 1]
        return line

    def read(self, count: int) -> bytes:
        while len(self.buffer) < count:
            if not self._fill():
                break
        data = bytes(self.buffer[:count])
        del self.buffer[:count]
        return data

    def unasked(self, delay: float = 0.05) -> bytes:
        """Whatever the peer sends within `delay` seconds, left in the buffer (for a
        check that it sends nothing now)."""
        if not self.buffer and not (isinstance(self.sock, ssl.SSLSocket) and self.sock.pending()):
            readable, _, _ = select.select([self.sock], [], [], delay)
            if readable:
                self.sock.settimeout(delay)
                try:
                    self._fill()
                except (TimeoutError, ssl.SSLWantReadError):
                    pass
                finally:
                    self.sock.settimeout(WAIT)
        return bytes(self.buffer)


class ScriptedIMAP:
    """
    A small but real IMAP server (one thread per connection, see `ThreadedServer`).

    Before login: CAPABILITY, NOOP, ID (answered `id_reply`, `* ID NIL` by default),
    STARTTLS (with `tls`), LOGIN with atoms, quoted strings and literals (`+ ` for
    synchronising ones), AUTHENTICATE PLAIN and XOAUTH2 (when listed in `capabilities`;
    with or without an initial response; a wrong XOAUTH2 token gets Gmail's error
    challenge first), LOGOUT. The greeting lists `capabilities` in a `[CAPABILITY ...]`
    code unless `greeting_capabilities` is False (the client must ask).

    A login is checked against `users` (XOAUTH2: the token is the password) unless
    `login_reply` answers every login (`NO [UNAVAILABLE] ...`); a good one is answered
    `<tag> OK [CAPABILITY IMAP4rev1 IDLE MOVE] Logged in`, preceded by
    `* CAPABILITY <untagged_capability>` when that is given (as Gmail does). A verdict
    is tagged `verdict_tag`, when given, instead of the login's own tag (a broken
    server). After login: NOOP, CAPABILITY, `ECHO <anything>` (`* ECHO <anything>`),
    LOGOUT. The handler returns a `Heard`.
    """

    def __init__(
        self,
        users: dict[str, str] | None = None,
        capabilities: tuple[str, ...] = GREETING_CAPABILITIES,
        greeting_capabilities: bool = True,
        tls: ssl.SSLContext | None = None,
        untagged_capability: str | None = None,
        login_reply: bytes | None = None,
        id_reply: bytes = b"* ID NIL",
        id_status: bytes = b"OK ID completed",
        verdict_tag: bytes | None = None,
    ) -> None:
        self.users = users or {}
        self.capabilities = capabilities
        self.greeting_capabilities = greeting_capabilities
        self.tls = tls
        self.untagged_capability = untagged_capability
        self.login_reply = login_reply
        self.id_reply = id_reply
        self.id_status = id_status
        self.verdict_tag = verdict_tag

    def __call__(self, conn: socket.socket) -> Heard:
        heard = Heard()
        sock: Any = conn
        stream = _Stream(sock)

        def send(line: bytes) -> None:
            sock.sendall(line + b"\r\n")

        def capabilities() -> bytes:
            listed = list(self.capabilities)
            if self.tls is not None and not heard.tls:
                listed.append("STARTTLS")
            return " ".join(listed).encode()

        def read_command() -> tuple[list[bytes], bytes] | None:
            """(parts, raw bytes) of the next command; None at the end of the stream."""
            line = stream.readline()
            if not line:
                return None
            parts: list[bytes] = []
            raw = []
            while True:
                heard.lines.append(line)
                raw.append(line)
                if not line.endswith(b"\n"):
                    raise IMAPParseError(f"stream ended inside a command: {line!r}")
                marker = _LITERAL.search(line)
                if marker is None:
                    parts.append(line.rstrip(b"\r\n"))
                    break
                parts.append(line[: marker.start()])
                if not marker[2]:
                    early = stream.unasked()
                    if early:
                        heard.early.append(early)
                    continuation = b"+ Ready for literal data\r\n"
                    heard.continuations.append(continuation)
                    sock.sendall(continuation)
                literal = stream.read(int(marker[1]))
                heard.lines.append(literal)
                raw.append(literal)
                parts.append(_Literal(literal))
                line = stream.readline()
            heard.commands.append(b"".join(raw))
            return parts, b"".join(raw)

        def sasl_response(initial: Token) -> bytes | None:
            """The decoded SASL response (initial or after a `+ `), None if cancelled."""
            if isinstance(initial, bytes):
                encoded = bytes(initial)
            else:
                continuation = b"+ \r\n"
                heard.continuations.append(continuation)
                sock.sendall(continuation)
                encoded = stream.readline()
                heard.lines.append(encoded)
                encoded = encoded.rstrip(b"\r\n")
                if encoded == b"*":
                    return None
            return b"" if encoded == b"=" else base64.b64decode(encoded, validate=True)

        def verdict(tag: bytes, user: bytes, password: bytes) -> bool:
            tag = self.verdict_tag or tag
            if self.login_reply is not None:
                send(tag + b" " + self.login_reply)
                return False
            if self.users.get(user.decode("utf-8")) != password.decode("utf-8"):
                send(tag + b" NO [AUTHENTICATIONFAILED] Invalid credentials (upstream)")
                return False
            heard.login = user.decode("utf-8")
            if self.untagged_capability is not None:
                send(b"* CAPABILITY " + self.untagged_capability.encode())
            send(tag + b" OK [CAPABILITY " + LOGGED_IN_CAPABILITIES.encode() + b"] Logged in")
            return True

        if self.greeting_capabilities:
            send(b"* OK [CAPABILITY " + capabilities() + b"] upstream ready")
        else:
            send(b"* OK upstream ready")
        logged_in = False
        while True:
            command = read_command()
            if command is None:
                return heard
            parts, raw = command
            tokens = tokenize(parts)
            if len(tokens) < 2:
                send(b"* BAD no command")
                continue
            tag, name, args = tokens[0], tokens[1].upper(), tokens[2:]
            if name == b"LOGOUT":
                send(b"* BYE upstream logging out")
                send(tag + b" OK LOGOUT completed")
                return heard
            if name == b"NOOP":
                send(tag + b" OK NOOP completed by the upstream")
            elif name == b"CAPABILITY":
                send(b"* CAPABILITY " + (LOGGED_IN_CAPABILITIES.encode() if logged_in else capabilities()))
                send(tag + b" OK CAPABILITY completed")
            elif logged_in and name == b"ECHO":
                send(b"* ECHO " + parts[0].split(b" ", 2)[2])
                send(tag + b" OK ECHO completed")
            elif logged_in:
                send(tag + b" BAD unknown command")
            elif name == b"ID" and "ID" in self.capabilities:
                heard.id = args[0]
                send(self.id_reply)
                send(tag + b" " + self.id_status)
            elif name == b"STARTTLS" and self.tls is not None and not heard.tls:
                send(tag + b" OK Begin TLS negotiation now")
                sock = self.tls.wrap_socket(conn, server_side=True)
                stream = _Stream(sock)
                heard.tls = True
            elif name == b"LOGIN" and len(args) == 2:
                if "LOGINDISABLED" in self.capabilities:
                    send(tag + b" NO [PRIVACYREQUIRED] LOGIN is disabled")
                else:
                    logged_in = verdict(tag, args[0], args[1])
            elif name == b"AUTHENTICATE" and 1 <= len(args) <= 2:
                mechanism = args[0].upper()
                if "AUTH=" + mechanism.decode() not in self.capabilities:
                    send(tag + b" NO unsupported mechanism")
                    continue
                response = sasl_response(args[1] if len(args) == 2 else None)
                if response is None:
                    send(tag + b" BAD cancelled")
                elif mechanism == b"PLAIN":
                    _, user, password = response.split(b"\0")
                    logged_in = verdict(tag, user, password)
                else:  # XOAUTH2: user=U ^A auth=Bearer T ^A ^A
                    fields = dict(f.split(b"=", 1) for f in response.rstrip(b"\x01").split(b"\x01"))
                    user, token = fields[b"user"], fields[b"auth"].removeprefix(b"Bearer ")
                    if self.login_reply is None and self.users.get(user.decode()) != token.decode():
                        # Gmail: an error challenge, which the client answers with an empty line.
                        error = b"+ " + base64.b64encode(b'{"status":"401","schemes":"Bearer","scope":"imap"}') + b"\r\n"
                        heard.continuations.append(error)
                        sock.sendall(error)
                        heard.lines.append(stream.readline())
                    logged_in = verdict(tag, user, token)
            else:
                send(tag + b" BAD unknown command or wrong arguments: " + raw.split(b"\r\n")[0][:100])


# -- clients ------------------------------------------------------------------------------------


def read_tagged(conn: Any, tag: bytes) -> bytes:
    """Every line up to and including the one tagged `tag` (or up to the end of the stream)."""
    lines = b""
    while True:
        line = read_line(conn)
        lines += line
        if not line or line.startswith(tag + b" "):
            return lines


def fetch_message(client: imaplib.IMAP4, number: int) -> bytes:
    """Message `number` of the selected mailbox, as BODY.PEEK[] gives it (imaplib)."""
    typ, data = client.fetch(str(number), "(BODY.PEEK[])")
    assert typ == "OK", data
    item = data[0]
    assert isinstance(item, tuple), data
    return item[1]
