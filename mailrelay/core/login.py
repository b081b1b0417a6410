"""
What every protocol's upstream login shares: the credentials a passthrough login sends,
and `UpstreamLogin`, the steps SMTP, IMAP and POP3 take alike before the splice:

    greeting (once per connection) -> capabilities (asked once, forgotten after STARTTLS)
      -> [STARTTLS, the go-ahead] -> ... the protocol's own login ... -> the client's reply

Each protocol's subclass (`smtp_login`, `imap_login`, `pop3_login`) says how a greeting,
a capability list and an answer read, and how it logs in. Its `starttls(route)` and
`login(route)` are `Dialogue`s: no I/O here; `protocols.upstream.login_steps()` runs them
as the connector's steps.

Errors name what was asked (`what`: "EHLO", "the AUTH LOGIN user name"), never the line
sent: it may hold a password.
"""

from __future__ import annotations

from collections.abc import Container
from typing import ClassVar, Generic, TypeVar

import attrs

from .. import sasl
from ..router import Route, RouteRequest
from .dialogue import Dialogue, Send
from .errors import UpstreamProtocolError
from .facts import ConnectionFacts

MAX_RESPONSE_LINES = 100
"""Most lines an upstream may send in answer to one login command."""


@attrs.frozen
class UpstreamCredentials:
    """Who mailrelay logs in as upstream, and how."""

    user: str
    secret: str = attrs.field(repr=False)
    mechanism: str
    """"plain" or "login" (a password: the SASL mechanism, or for IMAP and POP3 the
    protocol's own LOGIN / USER and PASS), or "xoauth2" / "oauthbearer" (a token)."""

    def sasl_response(self) -> bytes:
        """The initial response of a one-step mechanism (PLAIN, XOAUTH2, OAUTHBEARER),
        before base64."""
        if self.mechanism == "xoauth2":
            return sasl.xoauth2_response(self.user, self.secret)
        if self.mechanism == "oauthbearer":
            return sasl.oauthbearer_response(self.user or None, self.secret)
        return sasl.plain_response(self.user, self.secret)


def upstream_credentials(request: RouteRequest, route: Route, alternative: str = "") -> UpstreamCredentials:
    """
    The Route's user and password when it names them, else the client's: a password
    goes up with the Route's `auth_mechanism`, a token in its own mechanism. A client
    that proved itself without revealing a secret (CRAM-MD5, APOP, EXTERNAL) cannot be
    passed through: the Route must supply the password (`alternative` says what else
    the protocol offers).
    """
    user = route.user or request.user or ""
    if route.password is not None:
        return UpstreamCredentials(user, route.password, route.auth_mechanism)
    method = request.auth_method
    if method in ("xoauth2", "oauthbearer"):
        return UpstreamCredentials(user, request.password or "", method)
    if method in ("plain", "login"):
        return UpstreamCredentials(user, request.password or "", route.auth_mechanism)
    raise UpstreamProtocolError(
        f"a {method} login cannot be passed through: the Route must supply the upstream password{alternative}"
    )


def unusable_login(route: Route, protocol: str) -> str | None:
    """Why `route.login` cannot be done in `protocol` (IMAP and POP3 always log in)."""
    if route.login == "xclient":
        return f"login = \"xclient\" is SMTP's; for {protocol} use forward_client = true to pass the client's address"
    if route.login == "none":
        return f'login = "none": a {protocol} upstream needs a login (give the Route a user and password for a master login)'
    return None


def shown(line: bytes) -> str:
    """An upstream's line as a log message quotes it: bounded, escaped."""
    return repr(line[:80])


def error_challenge_response(mechanism: str) -> bytes:
    """What a SASL client answers a token mechanism's error challenge with, to hear the
    verdict (RFC 7628 3.2.3; XOAUTH2 wants an empty line)."""
    return b"\r\n" if mechanism == "xoauth2" else sasl.encode(b"\x01") + b"\r\n"


A = TypeVar("A")
"""What one answer of the upstream reads as (an SMTP reply, an IMAP tagged answer, a POP3 line)."""
C = TypeVar("C", bound=Container[str])
"""The upstream's capability list: capability names (in upper case) are `in` it."""


class UpstreamLogin(Generic[A, C]):
    """
    The upstream dialogue of one session. The connector may try several routes: the
    shell calls `new_connection()` before it runs a step on another connection, so that
    each connection is greeted once, and the capabilities heard on one connection (or
    before its STARTTLS) are never used on another (or after).

    It knows the client through the `connection` (the same `ConnectionFacts` the
    front-end core has) and the `request` the Router answered; each protocol's subclass
    takes, as keyword arguments, only what its own front-end learnt besides (SMTP's HELO
    name and envelope, IMAP's tag and ID fields).

    Subclasses read the protocol: `greeting`, `ask_capabilities`, `answer`, `verdict`
    and `said`, and log in (`log_in`).
    """

    protocol: ClassVar[str]
    """"SMTP", "IMAP" or "POP3", for error messages."""
    starttls_command: ClassVar[str] = "STARTTLS"
    """The command (and the capability that offers it) before an upstream TLS handshake."""
    success: ClassVar[tuple[object, ...]]
    """The `verdict` of an answer that says yes."""
    go_ahead: ClassVar[tuple[object, ...] | None] = None
    """The `verdict` of the answer that lets the TLS handshake start, if not `success`."""

    def __init__(self, connection: ConnectionFacts, request: RouteRequest) -> None:
        self.connection = connection
        """The client's connection, as the listener accepted it."""
        self.request = request
        self.client_reply = b""
        """What the client hears once the login succeeded (the upstream's own words for
        IMAP and POP3)."""
        self._greeted = False
        self._capabilities: C | None = None

    def new_connection(self) -> None:
        """The next step runs on a new connection: whatever the last one said is forgotten."""
        self._greeted = False
        self._capabilities = None

    def offers(self, capability: str) -> bool:
        """Whether the capabilities the session goes on from (after the login) list
        `capability`: SMTP's `CHUNKING`, IMAP's `LITERAL+`."""
        return self._capabilities is not None and capability.upper() in self._capabilities

    # The connector's steps

    def starttls(self, route: Route) -> Dialogue[None]:
        """Up to the upstream's go-ahead for the TLS handshake."""
        yield from self._greet(route)
        capabilities = yield from self.capabilities(route)
        if self.starttls_command not in capabilities:
            raise UpstreamProtocolError(f"upstream does not offer {self.starttls_command}")
        yield from self.command(self.starttls_command.encode(), self.starttls_command, self.go_ahead)
        # RFC 3207, 3501 6.2.1, 2595: what the upstream said in plaintext is forgotten.
        self._capabilities = None

    def login(self, route: Route) -> Dialogue[bytes]:
        """Log in (after `starttls` on a starttls route); the client's reply. Raises
        `Reject` when the upstream refuses the credentials, `UpstreamProtocolError`
        when the route is unusable."""
        why = self.unusable(route)
        if why is not None:
            raise UpstreamProtocolError(why)
        yield from self._greet(route)
        capabilities = yield from self.capabilities(route)
        self.client_reply = yield from self.log_in(route, capabilities)
        return self.client_reply

    # Shared steps

    def _greet(self, route: Route) -> Dialogue[None]:
        if not self._greeted:
            self._greeted = True
            yield from self.greeting(route)

    def capabilities(self, route: Route) -> Dialogue[C]:
        """The upstream's capabilities, asked for when not known."""
        if self._capabilities is None:
            self._capabilities = yield from self.ask_capabilities(route)
        return self._capabilities

    def ask(self, line: bytes, what: str) -> Dialogue[A]:
        """Send one command (CRLF added) and read its answer, whatever it says."""
        yield Send(self.framed(line) + b"\r\n")
        return (yield from self.answer(f"answer to {what}"))

    def command(self, line: bytes, what: str, expect: tuple[object, ...] | None = None) -> Dialogue[A]:
        """Send one command (CRLF added) and read its answer, which must say yes (or
        have a `verdict` in `expect`). `what` names the command in errors: never the
        line, which may hold a credential."""
        answer = yield from self.ask(line, what)
        if self.verdict(answer) not in (self.success if expect is None else expect):
            raise UpstreamProtocolError(f"upstream answered {what} with {self.said(answer)}")
        return answer

    # What each protocol says

    def unusable(self, route: Route) -> str | None:
        """Why this protocol cannot log in as `route.login` says, or None."""
        return unusable_login(route, self.protocol)

    def greeting(self, route: Route) -> Dialogue[None]:
        """Read the greeting; raise UpstreamProtocolError unless it welcomes mailrelay."""
        raise NotImplementedError

    def ask_capabilities(self, route: Route) -> Dialogue[C]:
        raise NotImplementedError

    def framed(self, line: bytes) -> bytes:
        """A command line of mailrelay's own as sent (IMAP tags it)."""
        return line

    def answer(self, stage: str) -> Dialogue[A]:
        """The upstream's whole answer to the last command."""
        raise NotImplementedError

    def verdict(self, answer: A) -> object:
        """What `success`, `go_ahead` and `expect` are compared with."""
        raise NotImplementedError

    def said(self, answer: A) -> str:
        """The answer as an error message quotes it (bounded)."""
        raise NotImplementedError

    def log_in(self, route: Route, capabilities: C) -> Dialogue[bytes]:
        """The protocol's login once greeted; the client's reply."""
        raise NotImplementedError
