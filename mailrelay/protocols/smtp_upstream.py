"""
SMTP towards the upstream: what mailrelay says to the server it routed a client to,
before the splice. The connector runs these steps (`connector.LoginStep`,
`connector.StartTLSStep`); they know the client only through `ClientFacts`.

    greeting 220 -> EHLO -> [STARTTLS 220 -> TLS -> EHLO again]
        login = "xclient":      EHLO was mailrelay's name; XCLIENT ADDR= PORT= NAME= HELO=
                                PROTO= DESTADDR= DESTPORT= [LOGIN=] (those the upstream
                                offers) 220 -> EHLO (or HELO) with the client's name
        login = "passthrough":  EHLO was the client's name; AUTH PLAIN or LOGIN as the
                                Route says (or the client's token mechanism) 235; with
                                forward_client, XCLIENT (without LOGIN=) and EHLO first
        login = "none":         EHLO was the client's name; nothing more
    auth "none" (MX/relay): then MAIL FROM as the client typed it (250), then its RCPT TO,
        whose reply is the client's: it is left unread and reaches the client spliced.

An upstream that refuses the credentials (535) refuses the login (`Reject`, final); any
other failure makes the route unusable and the connector tries the next one.
"""

from __future__ import annotations

import re

import attrs

from .. import sasl
from ..connector import UpstreamProtocol
from ..router import Address, Reject, Route, RouteRequest
from .upstream import UpstreamProtocolError, upstream_credentials

MAX_REPLY_LINE = 4096
MAX_REPLY_LINES = 100
XCLIENT_MAX = 512
"""Longest XCLIENT command Postfix accepts, CRLF included; longer ones are split."""

_REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])([ -]?)(.*?)\r?\n", re.DOTALL)


@attrs.frozen
class Reply:
    code: int
    lines: tuple[bytes, ...]
    """The text of each line, without code and separator."""

    @property
    def text(self) -> str:
        """The first line's text, printable, for a log line."""
        first = self.lines[0] if self.lines else b""
        return first.decode("utf-8", "replace")[:200]

    def __str__(self) -> str:
        return f"{self.code} {self.text}".rstrip()


async def read_reply(upstream: UpstreamProtocol) -> Reply:
    """One (multi-line) SMTP reply."""
    lines: list[bytes] = []
    code = None
    while len(lines) < MAX_REPLY_LINES:
        raw = await upstream.read_line(MAX_REPLY_LINE)
        match = _REPLY_LINE.fullmatch(raw)
        if match is None or (code is not None and int(match[1]) != code):
            raise UpstreamProtocolError(f"upstream sent a malformed reply line: {raw[:80]!r}")
        code = int(match[1])
        lines.append(match[3])
        if match[2] != b"-":
            return Reply(code, tuple(lines))
    raise UpstreamProtocolError(f"upstream sent a reply of more than {MAX_REPLY_LINES} lines")


async def command(upstream: UpstreamProtocol, line: bytes, expect: tuple[int, ...], what: str) -> Reply:
    """Send one command line (CRLF added) and read its reply, which must be one of
    `expect`. `what` names the command in errors: never the line, which may hold a
    credential."""
    upstream.stage = f"answer to {what}"
    upstream.write(line + b"\r\n")
    reply = await read_reply(upstream)
    if reply.code not in expect:
        raise UpstreamProtocolError(f"upstream answered {what} with {reply}")
    return reply


def extensions(ehlo: Reply) -> dict[str, tuple[str, ...]]:
    """The EHLO reply's extensions: keyword (upper case) -> parameters."""
    found = {}
    for line in ehlo.lines[1:]:
        words = line.decode("ascii", "replace").split()
        if words:
            found[words[0].upper()] = tuple(words[1:])
    return found


def xtext(value: bytes) -> bytes:
    """RFC 3461 xtext: `+`, `=` and bytes outside `!`..`~` as `+XX`."""
    return b"".join(bytes([c]) if 0x21 <= c <= 0x7E and c not in b"+=" else b"+%02X" % c for c in value)


@attrs.frozen(kw_only=True)
class ClientFacts:
    """What the upstream steps need to know of the client's side of the session."""

    hostname: bytes
    """mailrelay's own name, for its EHLO."""
    helo: bytes | None
    """The client's HELO/EHLO argument, as it sent it."""
    esmtp: bool
    """Whether the client said EHLO (not HELO)."""
    client: Address
    local: Address
    request: RouteRequest
    envelope: tuple[bytes, bytes] | None = None
    """auth "none": the client's MAIL and RCPT command lines, to replay as sent."""


class SMTPUpstreamLogin:
    """The upstream dialogue of one SMTP session; `starttls` and `login` are the
    connector's steps (a new instance per attempt is not needed: every route starts at
    the greeting)."""

    def __init__(self, facts: ClientFacts) -> None:
        self.facts = facts
        self._extensions: dict[str, tuple[str, ...]] | None = None
        self._connection: UpstreamProtocol | None = None

    def offers(self, keyword: str) -> bool:
        """Whether the upstream's last EHLO reply (the one the session goes on from)
        listed the extension `keyword`."""
        return keyword.upper() in (self._extensions or {})

    async def _hello(self, upstream: UpstreamProtocol, name: bytes) -> None:
        ehlo = await command(upstream, b"EHLO " + name, (250,), "EHLO")
        self._extensions = extensions(ehlo)

    def _name(self, route: Route) -> bytes:
        """The EHLO name: the client's, but mailrelay's own until XCLIENT has said who
        the client is (an upstream may check the name against the connecting address)."""
        facts = self.facts
        return facts.hostname if _sends_xclient(route) or not facts.helo else facts.helo

    async def _start(self, upstream: UpstreamProtocol, route: Route) -> None:
        """Greeting and EHLO, once per connection."""
        if self._connection is upstream:
            return
        self._connection = upstream
        upstream.stage = "greeting"
        greeting = await read_reply(upstream)
        if greeting.code != 220:
            raise UpstreamProtocolError(f"upstream greeted with {greeting}")
        await self._hello(upstream, self._name(route))

    async def starttls(self, upstream: UpstreamProtocol, route: Route) -> None:
        await self._start(upstream, route)
        assert self._extensions is not None
        if "STARTTLS" not in self._extensions:
            raise UpstreamProtocolError("upstream does not offer STARTTLS")
        await command(upstream, b"STARTTLS", (220,), "STARTTLS")
        self._extensions = None  # RFC 3207: forget what was said in plaintext

    async def login(self, upstream: UpstreamProtocol, route: Route) -> None:
        await self._start(upstream, route)
        if self._extensions is None:  # after STARTTLS
            await self._hello(upstream, self._name(route))
        if _sends_xclient(route):
            await self._xclient(upstream, route)
        if route.login == "passthrough" and self.facts.request.auth_method != "none":
            await self._authenticate(upstream, route)
        if self.facts.envelope is not None:
            await self._replay(upstream, route)

    # XCLIENT

    async def _xclient(self, upstream: UpstreamProtocol, route: Route) -> None:
        assert self._extensions is not None
        offered = self._extensions.get("XCLIENT")
        if offered is None:
            raise UpstreamProtocolError("upstream does not offer XCLIENT to mailrelay (Postfix: smtpd_authorized_xclient_hosts)")
        names = {name.upper() for name in offered}
        attributes = [(name, value) for name, value in self._xclient_attributes(route) if name in names]
        for line in _xclient_commands(attributes):
            await command(upstream, line, (220, 250), "XCLIENT")
        # XCLIENT resets the session to just after the greeting: greet again, as the client.
        facts = self.facts
        hello = b"EHLO " if facts.esmtp else b"HELO "
        ehlo = await command(upstream, hello + (facts.helo or facts.hostname), (250,), hello.strip().decode())
        self._extensions = extensions(ehlo)

    def _xclient_attributes(self, route: Route) -> list[tuple[str, bytes]]:
        facts, request = self.facts, self.facts.request
        attributes = [
            ("ADDR", _xclient_address(facts.client[0])),
            ("PORT", b"%d" % facts.client[1] if facts.client[1] else b"[UNAVAILABLE]"),
            ("NAME", b"[UNAVAILABLE]"),  # no reverse lookup: the upstream may do its own
            ("HELO", xtext(facts.helo) if facts.helo else b"[UNAVAILABLE]"),
            ("PROTO", b"ESMTP" if facts.esmtp else b"SMTP"),
            ("DESTADDR", _xclient_address(facts.local[0])),
            ("DESTPORT", b"%d" % facts.local[1] if facts.local[1] else b"[UNAVAILABLE]"),
        ]
        login = route.user or request.user
        if route.login == "xclient" and request.auth_method != "none" and login:
            attributes.append(("LOGIN", xtext(login.encode())))
        return attributes

    # AUTH

    async def _authenticate(self, upstream: UpstreamProtocol, route: Route) -> None:
        credentials = upstream_credentials(self.facts.request, route, ', or use login = "xclient"')
        user, secret, mechanism = credentials.user, credentials.secret, credentials.mechanism
        assert self._extensions is not None
        offered = {m.upper() for m in self._extensions.get("AUTH", ())}
        if not offered:
            raise UpstreamProtocolError("upstream offers no AUTH (does it want TLS first?)")
        if mechanism.upper() not in offered:
            raise UpstreamProtocolError(f"upstream does not offer AUTH {mechanism.upper()}")
        if mechanism == "login":
            await command(upstream, b"AUTH LOGIN", (334,), "AUTH LOGIN")
            await command(upstream, sasl.encode(user.encode()), (334,), "the AUTH LOGIN user name")
            upstream.write(sasl.encode(secret.encode()) + b"\r\n")
        else:
            upstream.write(b"AUTH " + mechanism.upper().encode() + b" " + sasl.encode(credentials.sasl_response()) + b"\r\n")
        upstream.stage = "login reply"
        reply = await read_reply(upstream)
        if reply.code == 334:  # a token mechanism's error challenge: answer it to get the verdict
            upstream.write(b"\r\n" if mechanism == "xoauth2" else sasl.encode(b"\x01") + b"\r\n")
            reply = await read_reply(upstream)
        if reply.code == 235:
            return
        if reply.code in (535, 534):
            raise Reject("Authentication credentials invalid", code="535 5.7.8")
        raise UpstreamProtocolError(f"upstream answered AUTH with {reply}")

    # auth "none": the client's envelope

    async def _replay(self, upstream: UpstreamProtocol, route: Route) -> None:
        assert self.facts.envelope is not None
        mail, rcpt = self.facts.envelope
        upstream.stage = "answer to MAIL FROM"
        upstream.write(mail + b"\r\n")
        reply = await read_reply(upstream)
        if reply.code != 250:
            # The client already heard 250 for its MAIL: the upstream's refusal answers its RCPT.
            raise Reject(reply.text or "sender refused", code=reply.code)
        upstream.write(rcpt + b"\r\n")  # its reply is for the client


def _sends_xclient(route: Route) -> bool:
    """XCLIENT tells the upstream who the client is: instead of a login (`login =
    "xclient"`, with LOGIN=), or before the passthrough AUTH (`forward_client`)."""
    return route.login == "xclient" or (route.forward_client and route.login == "passthrough")


def _xclient_address(host: str) -> bytes:
    if ":" in host:
        return b"IPV6:" + host.encode()
    if host.replace(".", "").isdigit():
        return host.encode()
    return b"[UNAVAILABLE]"  # a UNIX socket


def _xclient_commands(attributes: list[tuple[str, bytes]]) -> list[bytes]:
    """As few XCLIENT commands as keep each within Postfix's 512 bytes."""
    commands: list[bytes] = []
    current = b"XCLIENT"
    for name, value in attributes:
        item = b" " + name.encode() + b"=" + value
        if len(current) + len(item) + 2 > XCLIENT_MAX and current != b"XCLIENT":
            commands.append(current)
            current = b"XCLIENT"
        current += item
    if current != b"XCLIENT":
        commands.append(current)
    return commands
