"""
IMAP towards the upstream: what mailrelay says to the server it routed a client to,
before the splice, as a `Dialogue` (no I/O).

    greeting `* OK [CAPABILITY ...]` -> [CAPABILITY] -> [STARTTLS -> TLS -> CAPABILITY]
      -> [ID (client's fields, x-originating-ip ... when the Route forwards the client)]
      -> <client's tag> AUTHENTICATE PLAIN <initial response>   (Route.auth_mechanism "plain",
                                                                  when the upstream offers it)
       | <client's tag> LOGIN <user> <password>                 (otherwise, or "login")
       | <client's tag> AUTHENTICATE XOAUTH2 / OAUTHBEARER       (a client's token, passed on)
      -> <client's tag> OK [CAPABILITY ...] Logged in            (the client's reply, verbatim)

mailrelay's own commands carry its own tags; the login carries the client's, so that
the upstream's tagged answer, and any untagged lines it sends before it (Gmail and
SmarterMail send `* CAPABILITY`), go to the client unchanged. A tagged `NO` refuses the
login (`Reject`); `NO [UNAVAILABLE]` and any other failure make the route unusable.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import attrs

from .. import sasl
from ..router import Reject, Route, RouteRequest
from .dialogue import MAX_RESPONSE_LINE, Dialogue, ReadBytes, ReadLine, Send
from .errors import UpstreamProtocolError
from .facts import ConnectionFacts
from .imap_syntax import LITERAL, Status, id_list, quoted, status, untagged_capabilities
from .login import MAX_RESPONSE_LINES, UpstreamLogin, error_challenge_response, shown, upstream_credentials

ClientID = Sequence[tuple[str, str | None]]
"""An ID command's field-value pairs."""

Capabilities = frozenset[str]

TEMPORARY_CODES = frozenset({b"UNAVAILABLE", b"SERVERBUG", b"LIMIT"})
"""Response codes of a NO that says "not now" rather than "wrong credentials"."""

MAX_ID_VALUE = 1024
"""RFC 2971 3.3: field values are at most 1024 octets (Dovecot closes the connection on longer ones)."""


def forwardable(client_id: ClientID) -> list[tuple[str, str | None]]:
    """The client's ID fields that may be passed on: not the `x-` ones, with which a
    client could claim another address to an upstream that trusts mailrelay; values
    made 7-bit (they are informational: a name, a version) and cut to RFC 2971's limit."""
    fields: list[tuple[str, str | None]] = []
    for key, value in client_id:
        if key.lower().startswith("x-") or len(key) > 30 or not key.isascii() or not key.isprintable():
            continue
        if value is not None:
            value = "".join(c if c.isascii() and c.isprintable() else "?" for c in value)[:MAX_ID_VALUE]
        fields.append((key, value))
    return fields[:30]


@attrs.frozen
class Answer:
    """A tagged answer (`status`, and the `line` as it came), with the untagged lines before it."""

    status: Status
    untagged: tuple[bytes, ...]
    line: bytes


class IMAPLogin(UpstreamLogin[Answer, Capabilities]):
    """The upstream dialogue of one IMAP session; `client_reply` afterwards is the
    upstream's tagged OK (with the untagged lines before it) under the client's tag."""

    protocol = "IMAP"
    success = (b"OK",)

    def __init__(
        self, connection: ConnectionFacts, request: RouteRequest, *, tag: bytes, client_id: ClientID | None = None
    ) -> None:
        super().__init__(connection, request)
        self.tag = tag
        """The tag of the client's LOGIN or AUTHENTICATE, which the upstream's login carries."""
        self.client_id = client_id
        """The fields of the client's ID command, if it sent one."""
        self._tags = itertools.count(1)
        self._awaited = b""
        """The tag of mailrelay's last command."""

    def new_connection(self) -> None:
        super().new_connection()
        self._tags = itertools.count(1)

    def greeting(self, route: Route) -> Dialogue[None]:
        line = yield ReadLine("greeting")
        greeting = status(line)
        if greeting is None or greeting.tag != b"*":
            raise UpstreamProtocolError(f"upstream greeted with {shown(line)}")
        if greeting.status != b"OK":
            raise UpstreamProtocolError(f"upstream greeted with {_said(greeting)}")
        self._capabilities = greeting.capabilities()

    def ask_capabilities(self, route: Route) -> Dialogue[Capabilities]:
        answer = yield from self.command(b"CAPABILITY", "CAPABILITY")
        listed = [c for c in map(untagged_capabilities, answer.untagged) if c is not None]
        return answer.status.capabilities() or (listed[-1] if listed else frozenset())

    def framed(self, line: bytes) -> bytes:
        self._awaited = b"mr%d" % next(self._tags)
        return self._awaited + b" " + line

    def answer(self, stage: str) -> Dialogue[Answer]:
        return (yield from self._answer(stage, self._awaited))

    def verdict(self, answer: Answer) -> object:
        return answer.status.status

    def said(self, answer: Answer) -> str:
        return _said(answer.status)

    def _answer(self, stage: str, tag: bytes, mechanism: str | None = None) -> Dialogue[Answer]:
        """The tagged answer to `tag`, with the untagged lines before it. During an
        AUTHENTICATE (`mechanism`), a continuation is the server's error challenge, which
        a SASL client must answer before the verdict comes (RFC 7628 3.2.3)."""
        lines: list[bytes] = []
        while len(lines) < MAX_RESPONSE_LINES:
            line = yield ReadLine(stage)
            if line.startswith(b"* "):
                lines.append((yield from self._with_literals(stage, line)))
                continue
            if line.startswith(b"+") and mechanism is not None:
                yield Send(error_challenge_response(mechanism))
                mechanism = None
                continue
            answer = status(line)
            if answer is None or answer.tag != tag:
                raise UpstreamProtocolError(f"upstream sent {shown(line)} where the answer to its command was due")
            return Answer(answer, tuple(lines), line)
        raise UpstreamProtocolError(f"upstream sent more than {MAX_RESPONSE_LINES} lines before its answer")

    def _with_literals(self, stage: str, line: bytes) -> Dialogue[bytes]:
        """An untagged response whole: a line that announces a literal (`* ID ("name"
        {7}`) goes on after the literal's bytes, up to the line that does not."""
        whole = line
        while (literal := LITERAL.search(line.rstrip(b"\r\n"))) is not None:
            size = int(literal[1])
            if len(whole) + size > MAX_RESPONSE_LINE:
                raise UpstreamProtocolError(f"upstream sent a response of more than {MAX_RESPONSE_LINE} bytes")
            data = yield ReadBytes(stage, size)
            line = data + (yield ReadLine(stage))
            whole += line
        return whole

    # The login

    def log_in(self, route: Route, capabilities: Capabilities) -> Dialogue[bytes]:
        yield from self._identify(route, capabilities)
        credentials = upstream_credentials(self.request, route)
        tag = self.tag
        mechanism = credentials.mechanism
        if mechanism == "plain" and "AUTH=PLAIN" not in capabilities:
            mechanism = "login"  # every IMAP server has LOGIN
        if mechanism == "login":
            if "LOGINDISABLED" in capabilities:
                raise UpstreamProtocolError("upstream refuses LOGIN (LOGINDISABLED): route it with tls or starttls")
            yield from self._send_login(tag, credentials.user.encode(), credentials.secret.encode(), capabilities)
        else:
            if f"AUTH={mechanism.upper()}" not in capabilities:
                raise UpstreamProtocolError(f"upstream does not offer AUTHENTICATE {mechanism.upper()}")
            response = sasl.encode(credentials.sasl_response()) or b"="
            command = tag + b" AUTHENTICATE " + mechanism.upper().encode()
            if "SASL-IR" in capabilities:
                yield Send(command + b" " + response + b"\r\n")
            else:
                yield Send(command + b"\r\n")
                yield from self._continuation(tag, "AUTHENTICATE")
                yield Send(response + b"\r\n")
        return (yield from self._verdict(tag, mechanism))

    def _identify(self, route: Route, capabilities: Capabilities) -> Dialogue[None]:
        """ID: the client's own fields, and its address when the Route forwards it."""
        fields = forwardable(self.client_id or ())
        if route.forward_client:
            if "ID" not in capabilities:
                raise UpstreamProtocolError("upstream does not offer ID, so it cannot learn the client's address")
            client, local = self.connection.client, self.connection.local
            fields += [
                ("x-originating-ip", client[0]),
                ("x-originating-port", str(client[1])),
                ("x-connected-ip", local[0]),
                ("x-connected-port", str(local[1])),
                ("x-session-ext-id", self.connection.session_id),
            ]
            yield from self.command(b"ID " + id_list(fields), "ID")
        elif fields and "ID" in capabilities:
            # The client's own fields are informational: an upstream that refuses them still logs it in.
            yield from self.ask(b"ID " + id_list(fields), "ID")

    def _send_login(self, tag: bytes, user: bytes, password: bytes, capabilities: Capabilities) -> Dialogue[None]:
        """LOGIN with quoted strings where they can carry the values, literals otherwise
        (non-synchronising when the upstream has LITERAL+)."""
        line = tag + b" LOGIN"
        for value in (user, password):
            as_quoted = quoted(value)
            if as_quoted is not None:
                line += b" " + as_quoted
            elif "LITERAL+" in capabilities:
                line += b" {%d+}\r\n" % len(value) + value
            else:
                yield Send(line + b" {%d}\r\n" % len(value))
                yield from self._continuation(tag, "LOGIN")
                line = value
        yield Send(line + b"\r\n")

    def _continuation(self, tag: bytes, what: str) -> Dialogue[None]:
        line = yield ReadLine("login reply")
        if not line.startswith(b"+"):
            answer = status(line)
            if answer is not None and answer.tag == tag:
                raise UpstreamProtocolError(f"upstream answered {what} with {_said(answer)}")
            raise UpstreamProtocolError(f"upstream sent {shown(line)} where a continuation was due")

    def _verdict(self, tag: bytes, mechanism: str) -> Dialogue[bytes]:
        answer = yield from self._answer("login reply", tag, mechanism if mechanism in ("xoauth2", "oauthbearer") else None)
        verdict = answer.status
        if verdict.status == b"OK":
            return b"".join(answer.untagged) + answer.line
        if verdict.status == b"NO" and verdict.code_name not in TEMPORARY_CODES:
            code = verdict.code_name.decode("ascii", "replace") or "AUTHENTICATIONFAILED"
            # INUSE (RFC 5530): the credentials were right, the mailbox is busy: not a failed login.
            raise Reject(_text(verdict) or "Authentication failed", code=code, counts=code != "INUSE")
        raise UpstreamProtocolError(f"upstream answered the {mechanism} login with {_said(verdict)}")


def _said(answer: Status) -> str:
    return f"{answer.status.decode()} {_text(answer)}".rstrip()


def _text(answer: Status) -> str:
    return answer.text.decode("utf-8", "replace")[:200]
