"""
SMTP towards the upstream: what mailrelay says to the server it routed a client to,
before the splice, as a `Dialogue` (no I/O). It knows the client only through the
connection's `ConnectionFacts`, the `RouteRequest`, and what the SMTP core learnt (the
client's HELO name, and with auth "none" its envelope).

    greeting 220 -> EHLO -> [STARTTLS 220 -> TLS -> EHLO again]
        login = "xclient":      EHLO was mailrelay's name; XCLIENT ADDR= PORT= NAME= HELO=
                                PROTO= DESTADDR= DESTPORT= [LOGIN=] (those the upstream
                                offers) 220 -> EHLO (or HELO) with the client's name
        login = "passthrough":  EHLO was the client's name; AUTH PLAIN or LOGIN as the
                                Route says (or the client's token mechanism) 235; with
                                forward_client, XCLIENT (without LOGIN=) and EHLO first
        login = "none":         EHLO was the client's name; nothing more
    auth "none" (MX/relay): then MAIL FROM as the client typed it (250), then its RCPT TO
        (pipelined with the MAIL when the upstream offers PIPELINING), whose reply is the
        client's: it is left unread and reaches the client relayed.

An upstream that refuses the credentials (535) refuses the login (`Reject`, final); any
other failure makes the route unusable and the connector tries the next one.
"""

from __future__ import annotations

import attrs

from .. import sasl
from ..router import Reject, Route, RouteRequest
from .dialogue import Dialogue, ReadLine, Send
from .errors import UpstreamProtocolError
from .facts import ConnectionFacts
from .login import UpstreamLogin, error_challenge_response, upstream_credentials
from .smtp_stream import MAX_REPLY_LINE, MalformedReply, reply_line

MAX_REPLY_LINES = 100
"""Most lines of one reply during the login (the relayed session allows more)."""
XCLIENT_MAX = 512
"""Longest XCLIENT command Postfix accepts, CRLF included; longer ones are split."""


Extensions = dict[str, tuple[str, ...]]
"""An EHLO reply's extensions: keyword (upper case) -> parameters."""


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


def read_reply(stage: str) -> Dialogue[Reply]:
    """One (multi-line) SMTP reply."""
    lines: list[bytes] = []
    code = None
    need = ReadLine(stage, MAX_REPLY_LINE)  # frozen: one for every line
    while len(lines) < MAX_REPLY_LINES:
        raw = yield need
        try:
            line = reply_line(raw)
        except MalformedReply as e:
            raise UpstreamProtocolError(str(e)) from None
        if code is not None and line.code != code:
            raise UpstreamProtocolError(f"upstream changed the code within a multi-line reply: {raw[:80]!r}")
        code = line.code
        lines.append(line.text)
        if line.last:
            return Reply(code, tuple(lines))
    raise UpstreamProtocolError(f"upstream sent a reply of more than {MAX_REPLY_LINES} lines")


def extensions(ehlo: Reply) -> Extensions:
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


class SMTPLogin(UpstreamLogin[Reply, Extensions]):
    """The upstream dialogue of one SMTP session. `offers("CHUNKING")` afterwards says
    what the EHLO reply the session goes on from listed."""

    protocol = "SMTP"
    success = (250,)
    go_ahead = (220,)

    def __init__(
        self,
        connection: ConnectionFacts,
        request: RouteRequest,
        *,
        hostname: bytes,
        helo: bytes | None,
        esmtp: bool,
        envelope: tuple[bytes, bytes] | None = None,
    ) -> None:
        super().__init__(connection, request)
        self.hostname = hostname
        """mailrelay's own name, for its EHLO."""
        self.helo = helo
        """The client's HELO/EHLO argument, as it sent it."""
        self.esmtp = esmtp
        """Whether the client said EHLO (not HELO)."""
        self.envelope = envelope
        """auth "none": the client's MAIL and RCPT command lines, to replay as sent."""

    def unusable(self, route: Route) -> str | None:
        return None  # every Route.login is SMTP's

    def greeting(self, route: Route) -> Dialogue[None]:
        greeting = yield from read_reply("greeting")
        if greeting.code != 220:
            raise UpstreamProtocolError(f"upstream greeted with {greeting}")

    def ask_capabilities(self, route: Route) -> Dialogue[Extensions]:
        ehlo = yield from self.command(b"EHLO " + self._name(route), "EHLO")
        return extensions(ehlo)

    def answer(self, stage: str) -> Dialogue[Reply]:
        return (yield from read_reply(stage))

    def verdict(self, answer: Reply) -> object:
        return answer.code

    def said(self, answer: Reply) -> str:
        return str(answer)

    def _name(self, route: Route) -> bytes:
        """The EHLO name: the client's, but mailrelay's own until XCLIENT has said who
        the client is (an upstream may check the name against the connecting address)."""
        return self.hostname if _sends_xclient(route) or not self.helo else self.helo

    def log_in(self, route: Route, capabilities: Extensions) -> Dialogue[bytes]:
        if _sends_xclient(route):
            capabilities = yield from self._xclient(route, capabilities)
        if route.login == "passthrough" and self.request.auth_method != "none":
            yield from self._authenticate(route, capabilities)
        if self.envelope is not None:
            yield from self._replay(pipelining="PIPELINING" in capabilities)
        # Nothing of the upstream's is the client's: the core says 235 to a client that
        # authenticated, and an auth "none" client's RCPT reply is relayed.
        return b""

    # XCLIENT

    def _xclient(self, route: Route, capabilities: Extensions) -> Dialogue[Extensions]:
        offered = capabilities.get("XCLIENT")
        if offered is None:
            raise UpstreamProtocolError("upstream does not offer XCLIENT to mailrelay (Postfix: smtpd_authorized_xclient_hosts)")
        names = {name.upper() for name in offered}
        attributes = [(name, value) for name, value in self._xclient_attributes(route) if name in names]
        for line in _xclient_commands(attributes):
            yield from self.command(line, "XCLIENT", (220, 250))
        # XCLIENT resets the session to just after the greeting: greet again, as the client.
        hello = b"EHLO " if self.esmtp else b"HELO "
        ehlo = yield from self.command(hello + (self.helo or self.hostname), hello.strip().decode())
        self._capabilities = extensions(ehlo)
        return self._capabilities

    def _xclient_attributes(self, route: Route) -> list[tuple[str, bytes]]:
        client, local, request = self.connection.client, self.connection.local, self.request
        attributes = [
            ("ADDR", _xclient_address(client[0])),
            ("PORT", b"%d" % client[1] if client[1] else b"[UNAVAILABLE]"),
            ("NAME", b"[UNAVAILABLE]"),  # no reverse lookup: the upstream may do its own
            ("HELO", xtext(self.helo) if self.helo else b"[UNAVAILABLE]"),
            ("PROTO", b"ESMTP" if self.esmtp else b"SMTP"),
            ("DESTADDR", _xclient_address(local[0])),
            ("DESTPORT", b"%d" % local[1] if local[1] else b"[UNAVAILABLE]"),
        ]
        login = route.user or request.user
        if route.login == "xclient" and request.auth_method != "none" and login:
            attributes.append(("LOGIN", xtext(login.encode())))
        return attributes

    # AUTH

    def _authenticate(self, route: Route, capabilities: Extensions) -> Dialogue[None]:
        credentials = upstream_credentials(self.request, route, ', or use login = "xclient"')
        user, secret, mechanism = credentials.user, credentials.secret, credentials.mechanism
        offered = {m.upper() for m in capabilities.get("AUTH", ())}
        if not offered:
            raise UpstreamProtocolError("upstream offers no AUTH (does it want TLS first?)")
        if mechanism.upper() not in offered:
            raise UpstreamProtocolError(f"upstream does not offer AUTH {mechanism.upper()}")
        if mechanism == "login":
            yield from self.command(b"AUTH LOGIN", "AUTH LOGIN", (334,))
            yield from self.command(sasl.encode(user.encode()), "the AUTH LOGIN user name", (334,))
            yield Send(sasl.encode(secret.encode()) + b"\r\n")
        else:
            yield Send(b"AUTH " + mechanism.upper().encode() + b" " + sasl.encode(credentials.sasl_response()) + b"\r\n")
        reply = yield from read_reply("login reply")
        if reply.code == 334:  # a token mechanism's error challenge: answer it to get the verdict
            yield Send(error_challenge_response(mechanism))
            reply = yield from read_reply("login reply")
        if reply.code == 235:
            return
        if reply.code in (535, 534):
            raise Reject("Authentication credentials invalid", code="535 5.7.8")
        raise UpstreamProtocolError(f"upstream answered AUTH with {reply}")

    # auth "none": the client's envelope

    def _replay(self, pipelining: bool) -> Dialogue[None]:
        """MAIL, then RCPT, whose reply is left for the client. An upstream that offers
        PIPELINING gets both in one write (RFC 2920: one round trip less); if it refuses
        the MAIL, its answer to the RCPT is never read (the connection is dropped)."""
        assert self.envelope is not None
        mail, rcpt = self.envelope
        yield Send(mail + b"\r\n")
        if pipelining:
            yield Send(rcpt + b"\r\n")  # its reply is for the client
        reply = yield from read_reply("answer to MAIL FROM")
        if reply.code != 250:
            # The client already heard 250 for its MAIL: the upstream's refusal answers its RCPT.
            raise Reject(reply.text or "sender refused", code=reply.code)
        if not pipelining:
            yield Send(rcpt + b"\r\n")  # its reply is for the client


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
