"""
IMAP towards the upstream: what mailrelay says to the server it routed a client to,
before the splice (the connector's `LoginStep` and `StartTLSStep`).

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
from ..connector import UpstreamProtocol
from ..router import Address, Reject, Route, RouteRequest
from .imap_syntax import LITERAL, Status, id_list, quoted, status, untagged_capabilities
from .upstream import MAX_RESPONSE_LINE, MAX_RESPONSE_LINES, UpstreamProtocolError, shown, unusable_login, upstream_credentials

ClientID = Sequence[tuple[str, str | None]]
"""An ID command's field-value pairs."""

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


@attrs.frozen(kw_only=True)
class IMAPClientFacts:
    """What the upstream steps need to know of the client's side of the session."""

    tag: bytes
    """The tag of the client's LOGIN or AUTHENTICATE."""
    client: Address
    local: Address
    request: RouteRequest
    client_id: ClientID | None = None
    session_id: str = "-"


class IMAPUpstreamLogin:
    """The upstream dialogue of one IMAP session; `starttls` and `login` are the
    connector's steps, `client_reply` what the client hears once they succeeded."""

    def __init__(self, facts: IMAPClientFacts) -> None:
        self.facts = facts
        self.client_reply = b""
        self._connection: UpstreamProtocol | None = None
        self._capabilities: frozenset[str] | None = None
        self._tags = itertools.count(1)

    async def _start(self, upstream: UpstreamProtocol, route: Route) -> None:
        """The greeting, once per connection."""
        if self._connection is upstream:
            return
        self._connection = upstream
        self._capabilities = None
        upstream.stage = "greeting"
        line = await upstream.read_line(MAX_RESPONSE_LINE)
        greeting = status(line)
        if greeting is None or greeting.tag != b"*":
            raise UpstreamProtocolError(f"upstream greeted with {shown(line)}")
        if greeting.status != b"OK":
            raise UpstreamProtocolError(f"upstream greeted with {_said(greeting)}")
        self._capabilities = greeting.capabilities()

    async def capabilities(self, upstream: UpstreamProtocol) -> frozenset[str]:
        """The upstream's capabilities, asked for when not known."""
        if self._capabilities is None:
            answer = await self._command(upstream, b"CAPABILITY", "CAPABILITY")
            listed = [c for c in map(untagged_capabilities, answer.untagged) if c is not None]
            self._capabilities = answer.status.capabilities() or (listed[-1] if listed else frozenset())
        return self._capabilities

    async def _command(self, upstream: UpstreamProtocol, line: bytes, what: str, required: bool = True) -> Answer:
        """Send one of mailrelay's commands (CRLF added) and read up to its tagged answer,
        which must be OK when `required`. `what` names it in errors: never the line itself."""
        tag = b"mr%d" % next(self._tags)
        upstream.stage = f"answer to {what}"
        upstream.write(tag + b" " + line + b"\r\n")
        answer = await self._answer(upstream, tag)
        if required and answer.status.status != b"OK":
            raise UpstreamProtocolError(f"upstream answered {what} with {_said(answer.status)}")
        return answer

    async def _answer(self, upstream: UpstreamProtocol, tag: bytes, mechanism: str | None = None) -> Answer:
        """The tagged answer to `tag`, with the untagged lines before it. During an
        AUTHENTICATE (`mechanism`), a continuation is the server's error challenge, which
        a SASL client must answer before the verdict comes (RFC 7628 3.2.3)."""
        lines: list[bytes] = []
        while len(lines) < MAX_RESPONSE_LINES:
            line = await upstream.read_line(MAX_RESPONSE_LINE)
            if line.startswith(b"* "):
                lines.append(await self._with_literals(upstream, line))
                continue
            if line.startswith(b"+") and mechanism is not None:
                upstream.write(b"\r\n" if mechanism == "xoauth2" else sasl.encode(b"\x01") + b"\r\n")
                mechanism = None
                continue
            answer = status(line)
            if answer is None or answer.tag != tag:
                raise UpstreamProtocolError(f"upstream sent {shown(line)} where the answer to its command was due")
            return Answer(answer, tuple(lines), line)
        raise UpstreamProtocolError(f"upstream sent more than {MAX_RESPONSE_LINES} lines before its answer")

    async def _with_literals(self, upstream: UpstreamProtocol, line: bytes) -> bytes:
        """An untagged response whole: a line that announces a literal (`* ID ("name"
        {7}`) goes on after the literal's bytes, up to the line that does not."""
        whole = line
        while (literal := LITERAL.search(line.rstrip(b"\r\n"))) is not None:
            size = int(literal[1])
            if len(whole) + size > MAX_RESPONSE_LINE:
                raise UpstreamProtocolError(f"upstream sent a response of more than {MAX_RESPONSE_LINE} bytes")
            line = await upstream.read_exactly(size) + await upstream.read_line(MAX_RESPONSE_LINE)
            whole += line
        return whole

    # The connector's steps

    async def starttls(self, upstream: UpstreamProtocol, route: Route) -> None:
        await self._start(upstream, route)
        if "STARTTLS" not in await self.capabilities(upstream):
            raise UpstreamProtocolError("upstream does not offer STARTTLS")
        await self._command(upstream, b"STARTTLS", "STARTTLS")
        self._capabilities = None  # RFC 3501 6.2.1: what was said in plaintext is forgotten

    async def login(self, upstream: UpstreamProtocol, route: Route) -> None:
        why = unusable_login(route, "IMAP")
        if why is not None:
            raise UpstreamProtocolError(why)
        await self._start(upstream, route)
        capabilities = await self.capabilities(upstream)
        await self._identify(upstream, route, capabilities)
        credentials = upstream_credentials(self.facts.request, route)
        tag = self.facts.tag
        mechanism = credentials.mechanism
        upstream.stage = "login reply"
        if mechanism == "plain" and "AUTH=PLAIN" not in capabilities:
            mechanism = "login"  # every IMAP server has LOGIN
        if mechanism == "login":
            if "LOGINDISABLED" in capabilities:
                raise UpstreamProtocolError("upstream refuses LOGIN (LOGINDISABLED): route it with tls or starttls")
            await self._send_login(upstream, tag, credentials.user.encode(), credentials.secret.encode(), capabilities)
        else:
            if f"AUTH={mechanism.upper()}" not in capabilities:
                raise UpstreamProtocolError(f"upstream does not offer AUTHENTICATE {mechanism.upper()}")
            response = sasl.encode(credentials.sasl_response()) or b"="
            command = tag + b" AUTHENTICATE " + mechanism.upper().encode()
            if "SASL-IR" in capabilities:
                upstream.write(command + b" " + response + b"\r\n")
            else:
                upstream.write(command + b"\r\n")
                await self._continuation(upstream, tag, "AUTHENTICATE")
                upstream.write(response + b"\r\n")
        await self._verdict(upstream, tag, mechanism)

    async def _identify(self, upstream: UpstreamProtocol, route: Route, capabilities: frozenset[str]) -> None:
        """ID: the client's own fields, and its address when the Route forwards it."""
        fields = forwardable(self.facts.client_id or ())
        if route.forward_client:
            if "ID" not in capabilities:
                raise UpstreamProtocolError("upstream does not offer ID, so it cannot learn the client's address")
            client, local = self.facts.client, self.facts.local
            fields += [
                ("x-originating-ip", client[0]),
                ("x-originating-port", str(client[1])),
                ("x-connected-ip", local[0]),
                ("x-connected-port", str(local[1])),
                ("x-session-ext-id", self.facts.session_id),
            ]
        elif not fields or "ID" not in capabilities:
            return
        # The client's own fields are informational: an upstream that refuses them still logs it in.
        await self._command(upstream, b"ID " + id_list(fields), "ID", required=route.forward_client)

    async def _send_login(
        self, upstream: UpstreamProtocol, tag: bytes, user: bytes, password: bytes, capabilities: frozenset[str]
    ) -> None:
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
                upstream.write(line + b" {%d}\r\n" % len(value))
                await self._continuation(upstream, tag, "LOGIN")
                line = value
        upstream.write(line + b"\r\n")

    async def _continuation(self, upstream: UpstreamProtocol, tag: bytes, what: str) -> None:
        line = await upstream.read_line(MAX_RESPONSE_LINE)
        if not line.startswith(b"+"):
            answer = status(line)
            if answer is not None and answer.tag == tag:
                raise UpstreamProtocolError(f"upstream answered {what} with {_said(answer)}")
            raise UpstreamProtocolError(f"upstream sent {shown(line)} where a continuation was due")

    async def _verdict(self, upstream: UpstreamProtocol, tag: bytes, mechanism: str) -> None:
        answer = await self._answer(upstream, tag, mechanism if mechanism in ("xoauth2", "oauthbearer") else None)
        verdict = answer.status
        if verdict.status == b"OK":
            self.client_reply = b"".join(answer.untagged) + answer.line
            return
        if verdict.status == b"NO" and verdict.code_name not in TEMPORARY_CODES:
            code = verdict.code_name.decode("ascii", "replace") or "AUTHENTICATIONFAILED"
            # INUSE (RFC 5530): the credentials were right, the mailbox is busy: not a failed login.
            raise Reject(_text(verdict) or "Authentication failed", code=code, counts=code != "INUSE")
        raise UpstreamProtocolError(f"upstream answered the {mechanism} login with {_said(verdict)}")


@attrs.frozen
class Answer:
    """A tagged answer (`status`, and the `line` as it came), with the untagged lines before it."""

    status: Status
    untagged: tuple[bytes, ...]
    line: bytes


def _said(answer: Status) -> str:
    return f"{answer.status.decode()} {_text(answer)}".rstrip()


def _text(answer: Status) -> str:
    return answer.text.decode("utf-8", "replace")[:200]
