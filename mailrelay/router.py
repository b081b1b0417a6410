"""
The routing contract: what a session asks (`RouteRequest`), what a Router answers
(`Route`, a list of them, or `Reject`). Calling a Router is `mailrelay.ask`'s.

Every listener mode and every router backend meets here, so nothing in this module
knows about sockets or protocols.
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import attrs
from zope.interface import Attribute, Interface, implementer

if TYPE_CHECKING:  # a Router may answer with a Deferred; this module needs no Twisted
    from twisted.internet.defer import Deferred

Address = tuple[str, int]
"""A (host, port) pair; for a UNIX socket the host is the path and the port 0."""

Protocol = Literal["smtp", "imap", "pop3", "none"]
Mode = Literal["splice", "tls", "starttls"]
AuthMethod = Literal["plain", "login", "cram-md5", "apop", "xoauth2", "oauthbearer", "external", "none"]
UpstreamTLS = Literal["none", "tls", "starttls"]
Login = Literal["passthrough", "xclient", "none"]
AuthMechanism = Literal["plain", "login"]

PROTOCOLS: tuple[str, ...] = ("smtp", "imap", "pop3", "none")
MODES: tuple[str, ...] = ("splice", "tls", "starttls")
UPSTREAM_TLS: tuple[str, ...] = ("none", "tls", "starttls")
LOGINS: tuple[str, ...] = ("passthrough", "xclient", "none")
AUTH_MECHANISMS: tuple[str, ...] = ("plain", "login")

TRUSTING_LOGINS: tuple[str, ...] = ("xclient", "none")
"""Route logins the upstream takes on mailrelay's word: XCLIENT LOGIN= tells it who
logged in, "none" logs in as nobody at an upstream that trusts mailrelay. Unlike
"passthrough", the upstream checks no password: someone before it must have."""
PASSWORDLESS_METHODS: tuple[str, ...] = ("none", "external")
"""Auth methods that carry no password to check: no login at all (SMTP MX use), and a
client certificate that mailrelay verified."""


def format_address(address: Address) -> str:
    """`host:port`, with an IPv6 host in brackets; a UNIX socket path as it is."""
    host, port = address
    if host.startswith("/") or not port:
        return host
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _one_of(choices: tuple[Any, ...]) -> Any:
    def check(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if value not in choices:
            names = ", ".join(repr(c) for c in choices)
            raise ValueError(f"{attribute.name} must be one of {names}, not {value!r}")

    return check


def _port(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 65536:
        raise ValueError(f"{attribute.name} must be an integer from 1 to 65535, not {value!r}")


def _nonempty_str(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{attribute.name} must be a non-empty string, not {value!r}")


@attrs.frozen(kw_only=True)
class ClientCertificate:
    """A certificate the client presented and mailrelay verified against `[tls] client_ca`."""

    subject: str
    """RFC 4514 distinguished name, e.g. `CN=alice,O=Example`."""
    issuer: str
    serial: str
    """Hexadecimal, upper case."""
    fingerprint: str
    """SHA-1 of the DER certificate, lower-case hexadecimal (nginx's `$ssl_client_fingerprint`)."""


@attrs.frozen(kw_only=True)
class RouteRequest:
    """
    Everything known about a session when its Router is asked where it goes.

    Read-only. Fields that a listener mode cannot know are None (a `splice` listener
    knows no user). `password` is left out of `repr()` so that logging a request never
    writes a credential.
    """

    listener: str
    protocol: Protocol
    mode: Mode
    client: Address
    local: Address
    tls: bool = False
    """Whether the client's connection to mailrelay is encrypted (always False in `splice` mode)."""
    sni: str | None = None
    """The TLS server name the client asked for: from the handshake when mailrelay
    terminates TLS, peeked from the ClientHello in `splice` mode when enabled."""
    tls_version: str | None = None
    """`TLSv1.3`, `TLSv1.2`...: the client's TLS version when mailrelay terminates its TLS."""
    tls_cipher: str | None = None
    """The OpenSSL name of the cipher the client's TLS connection uses."""
    client_cert: ClientCertificate | None = None
    """The client's verified certificate, when `[tls] client_ca` asks for one."""
    user: str | None = None
    password: str | None = attrs.field(default=None, repr=False)
    auth_method: AuthMethod = "none"
    salt: str | None = None
    helo: str | None = None
    """SMTP: the client's HELO/EHLO argument."""
    mail_from: str | None = None
    """SMTP with auth "none": the MAIL command as typed (`MAIL FROM:<s@x> SIZE=100`), as
    nginx passes it to its auth service; `sender` is the address alone."""
    rcpt_to: str | None = None
    """SMTP with auth "none": the RCPT command being vetted, as typed; `recipient` is the
    address alone."""
    attempt: int = 1

    @property
    def sender(self) -> str | None:
        """The address in `mail_from` (`""` for the null sender `<>`)."""
        return _path(self.mail_from)

    @property
    def recipient(self) -> str | None:
        """The address in `rcpt_to`."""
        return _path(self.rcpt_to)


def _path(command: str | None) -> str | None:
    if command is None:
        return None
    _, colon, rest = command.partition(":")
    rest = rest.strip()
    if not colon:
        return None
    if rest.startswith("<"):
        end = rest.find(">")
        return rest[1:end] if end >= 0 else rest[1:]
    return rest.split(" ", 1)[0]


@attrs.frozen(kw_only=True)
class Route:
    """
    Where a session goes and how to reach the upstream.

    `tls` is the upstream transport security, `server_name` the name its certificate
    must carry (default: `host`; sent as SNI too), `tls_verify = False` skips the
    certificate check (logged), `user`/`password` replace the client's credentials
    for the upstream login, `login` picks how that login happens, `proxy_protocol`
    sends a PROXY header of that version first. Invalid values raise ValueError at
    construction, so a Route that exists is a Route the connector can read.
    """

    host: str = attrs.field(validator=_nonempty_str)
    port: int = attrs.field(validator=_port)
    tls: UpstreamTLS = attrs.field(default="none", validator=_one_of(UPSTREAM_TLS))
    tls_verify: bool = attrs.field(default=True, validator=attrs.validators.instance_of(bool))
    server_name: str | None = None
    user: str | None = None
    password: str | None = attrs.field(default=None, repr=False)
    login: Login = attrs.field(default="passthrough", validator=_one_of(LOGINS))
    proxy_protocol: int | None = attrs.field(default=None, validator=_one_of((None, 1, 2)))
    tls_ca: str | None = None
    """A PEM file of CAs to verify this upstream against, instead of `[upstream] ca` or
    the system trust store."""
    auth_mechanism: AuthMechanism = attrs.field(default="plain", validator=_one_of(AUTH_MECHANISMS))
    """`login = "passthrough"` with a password: the SASL mechanism of the upstream login
    (Exchange wants LOGIN). Token logins (XOAUTH2, OAUTHBEARER) are passed on in their
    own mechanism unless the Route supplies a password."""
    forward_client: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))
    """Tell the upstream the client's address before logging in: IMAP `ID` with
    `x-originating-ip`/`x-originating-port`, POP3 `XCLIENT` (Dovecot honours both from
    its `login_trusted_networks`), SMTP `XCLIENT` without `LOGIN=` before the AUTH
    (Postfix's `smtpd_authorized_xclient_hosts`; `login = "xclient"` always sends it)."""

    @property
    def address(self) -> str:
        """`host:port` as an administrator writes it."""
        return format_address((self.host, self.port))


class Reject(Exception):
    """
    Raised by a Router to refuse a session.

    The client gets its protocol's failure reply after `wait` seconds (a tarpit for
    guessers); `code` optionally carries a protocol-specific reply code. `message` is
    for the log and, for protocols that show it, the client: it must not hold secrets.
    `close` ends the connection after the reply even when the listener's
    `max_attempts` would allow another try (what nginx does when its auth service
    answers a failure without `Auth-Wait`). `counts = False` marks a refusal that says
    nothing against the credentials (an upstream's mailbox in use): it is not counted
    towards `max_attempts` or the login limits.
    """

    def __init__(
        self, message: str, wait: float = 0, code: str | int | None = None, close: bool = False, counts: bool = True
    ) -> None:
        super().__init__(message)
        self.message = message
        self.wait = float(wait)
        self.code = code
        self.close = close
        self.counts = counts

    def __repr__(self) -> str:
        return f"Reject({self.message!r}, wait={self.wait!r}, code={self.code!r}, close={self.close!r}, counts={self.counts!r})"


RouteAnswer = Route | Sequence[Route]


class IRouter(Interface):
    """Decides where a session goes."""

    verifies_passwords = Attribute(
        """
        Optional (default False): whether this router checks the client's password
        before it answers a password login (an auth service does, a route map's rule
        with a password hash does; a static route does not). Only a router that says so
        may answer a password login with `login = "xclient"` or `"none"`, routes on
        which the upstream checks no password: otherwise the answer is a RouterError.
        """
    )

    def route(request: RouteRequest) -> RouteAnswer | Awaitable[RouteAnswer] | Deferred[RouteAnswer]:
        """
        Answer with a Route or a non-empty sequence of Routes (tried in order while
        connecting fails), synchronously, as an awaitable or as a Deferred; raise (or
        fail with) `Reject` to refuse the session.

        A router that also provides `twisted.application.service.IService` is started
        before the listeners that use it and stopped after they have drained.
        """


@implementer(IRouter)
class Router:
    """Base class for routers written in Python; override `route`."""

    verifies_passwords: bool = False
    """Set True on a subclass that checks `request.password` itself, so that it may
    answer password logins with `login = "xclient"` or `"none"` routes."""

    def route(self, request: RouteRequest) -> RouteAnswer | Awaitable[RouteAnswer] | Deferred[RouteAnswer]:
        raise NotImplementedError(f"{type(self).__qualname__} must implement route()")


class RouterError(Exception):
    """
    The Router could not decide: it raised, timed out, answered nonsense, or its own
    service (an auth server) is unavailable. The client gets its protocol's
    temporary-failure reply (SMTP 451, IMAP `NO [UNAVAILABLE]`, POP3 `-ERR [SYS/TEMP]`),
    never "wrong password". A Router may raise it itself, with a message for the log.
    """


def as_routes(answer: object) -> list[Route]:
    """A Router's answer as the list of Routes it means; RouterError if it is none."""
    if isinstance(answer, Route):
        return [answer]
    if isinstance(answer, (list, tuple)) and answer and all(isinstance(r, Route) for r in answer):
        return list(answer)
    raise RouterError(f"router answered {answer!r}; expected a Route or a non-empty list of Routes")


def verifies_passwords(router: object) -> bool:
    """Whether `router` declares that it checks passwords (a cache asks the router it wraps)."""
    return bool(getattr(router, "verifies_passwords", False))


def refuse_unchecked_login(router: object, request: RouteRequest, routes: list[Route]) -> list[Route]:
    """
    `routes`, unless they would log a password login in on mailrelay's word with no one
    having checked the password: a route with `login = "xclient"` or `"none"` answering
    a login that carried a password (any method but "none" and "external"), from a
    router that does not declare `verifies_passwords`. That is a RouterError (the client
    gets a temporary failure and is never logged in), whatever the configuration said.
    """
    if request.auth_method in PASSWORDLESS_METHODS or verifies_passwords(router):
        return routes
    trusting = next((route for route in routes if route.login in TRUSTING_LOGINS), None)
    if trusting is None:
        return routes
    while getattr(router, "inner", None) is not None:  # name the router a cache wraps
        router = router.inner  # type: ignore[attr-defined]
    raise RouterError(
        f'{type(router).__qualname__} answered a {request.auth_method.upper()} login with a login = "{trusting.login}"'
        f" route to {trusting.address}, on which the upstream checks no password, and does not declare"
        " verifies_passwords = True: a router that checks request.password itself declares it; otherwise use"
        ' login = "passthrough" so that the upstream checks the password'
    )
