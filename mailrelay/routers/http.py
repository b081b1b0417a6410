"""
`type = "http"`: nginx's auth_http protocol, so the auth service an nginx mail proxy
already asks decides where mailrelay's sessions go, unchanged.

For every routing decision mailrelay sends one `GET` to `url` with the facts in request
headers, and reads the decision from the response headers; the status code and the body
are ignored. `http_request.auth_request_headers()` builds the request and
`http_answer.parse_auth_response()` reads the answer, both pure functions;
`http_url.parse_url()` checks `url`. `HTTPRouter`, here, does the I/O.

Configuration (`[router]`, or a listener's `router = { ... }`):

    type = "http"
    url = "https://auth.example.net/mail"   # http:// or https://, required
    timeout = 10                            # seconds for each request, connecting included
    headers = { X-Auth-Key = "secret" }     # nginx's auth_http_header; values never shown
    ca = "/etc/mailrelay/auth-ca.pem"       # https only; default: the system trust store
    max_connections = 10                    # idle persistent connections kept
    max_wait_retries = 10                   # WAIT answers followed before giving up

Request headers, in nginx's order (each optional one only when it applies):

- `Host`: the URL's host, without the port (nginx's way).
- `Auth-Method`: `plain` (also for AUTH LOGIN, as nginx reports it), `cram-md5`, `apop`,
  `external`, `none`, and two nginx does not have: `xoauth2`, `oauthbearer`.
- `Auth-User`, `Auth-Pass`: always present, empty when unknown; escaped the way nginx
  does (bytes 0x00-0x1F, space and `%` become `%XX`, everything else, UTF-8 included,
  is sent raw; decode with percent-decoding only, `+` is not a space).
- `Auth-Salt`: the challenge, for `cram-md5` and `apop` only.
- `Auth-Protocol`: `smtp`, `imap`, `pop3`, or `none` for a `splice`/`tls` listener that
  knows no protocol: the service then routes on `Client-IP` (and the TLS facts), with
  `Auth-Method: none` and empty credentials.
- `Auth-Login-Attempt`: 1, 2... within a session.
- `Client-IP`: the client's address (`unix:` for a UNIX-socket client, as nginx).
- `Client-Host`: SMTP only, always `[UNAVAILABLE]`: mailrelay has no resolver.
- `Auth-SMTP-Helo`, `Auth-SMTP-From`, `Auth-SMTP-To`: SMTP with `Auth-Method: none`;
  what the front-end collected, not escaped.
- `Auth-SSL: on`, `Auth-SSL-Protocol`, `Auth-SSL-Cipher`: the client's connection to
  mailrelay is TLS. With a verified client certificate also `Auth-SSL-Verify: SUCCESS`,
  `Auth-SSL-Subject` and `Auth-SSL-Issuer` (escaped like Auth-User), `Auth-SSL-Serial`,
  `Auth-SSL-Fingerprint` (SHA-1, lower-case hex).
- The `headers` table of the configuration (nginx's `auth_http_header`), last, in order.

Response headers (names case-insensitive, values trimmed of spaces and tabs, unknown
ones ignored). A value read that holds a control character (below 0x20, or 0x7F: a NUL,
an ESC, a tab inside it) is an error: those values go upstream (`Auth-User`,
`Auth-Pass`, `Auth-Server`) or into the client's reply (`Auth-Status`,
`Auth-Error-Code`), where such a byte could inject a command. On the wire a line ends
at LF, and a bare CR inside a value is read as a space (RFC 9112 2.2, done by Twisted's
parser); `parse_auth_response()` refuses a CR or LF it is given all the same.

- `Auth-Status: OK`: success; `Auth-Server` (an IP address or a host name) and
  `Auth-Port` (1-65535) are required. `Auth-User`/`Auth-Pass` replace the client's
  credentials for the upstream login (taken as sent, not percent-decoded, as nginx).
  Without `Auth-Pass` a session that logged in with CRAM-MD5/APOP cannot be passed
  through, so that answer is an error (nginx: "did not send password"); SMTP's default
  login, XCLIENT, needs no password.
- `Auth-Status: WAIT`: ask again after `Auth-Wait` seconds (default 0), at most
  `max_wait_retries` times. `Auth-Wait` is at most `MAX_AUTH_WAIT` (60) seconds, for a
  WAIT and for a refusal alike: a longer one is taken as 60, so that a broken service
  cannot hold sessions open for hours.
- Any other `Auth-Status` text: the session is refused with that text as the client's
  message (`Reject`), after `Auth-Wait` seconds; without `Auth-Wait` (or with 0) the
  connection is closed after the reply, otherwise the client may try again.
  `Auth-Error-Code` (SMTP) replaces the default reply code.

mailrelay's own response headers, which nginx ignores (all apply to every route):

- `Mailrelay-TLS: none|tls|starttls`: how to secure the upstream connection (default none).
- `Mailrelay-TLS-Verify: on|off`: verify the upstream's certificate (default on).
- `Mailrelay-Server-Name: name`: the name the upstream certificate must carry, sent as SNI.
- `Mailrelay-Login: passthrough|xclient|none`: how the upstream login happens; the
  default is nginx's: `xclient` for SMTP, `passthrough` otherwise.
- `Mailrelay-Auth-Mechanism: plain|login`: the mechanism of a passthrough login (default
  plain; Exchange's SMTP wants login; for IMAP and POP3, login means the LOGIN command
  or USER and PASS).
- `Mailrelay-Proxy-Protocol: 1|2`: send a PROXY protocol header of that version first.
- `Mailrelay-Forward-Client: on|off`: IMAP and POP3, tell the upstream the client's
  address before logging in (Dovecot's `login_trusted_networks`; default off).
- `Mailrelay-Fallback: host:port[, host:port...]`: more upstreams, tried in order when
  connecting to `Auth-Server:Auth-Port` fails (an IPv6 address in brackets).

An invalid value of any header read is an error naming the header. Every failure that is
not the service's decision (unreachable, refused, timed out, reset, not HTTP, no or
invalid `Auth-Status`, an `OK` without a server) raises `RouterError`: the client gets
its protocol's temporary failure, never "wrong password". The messages never carry a
password or a configured header value, and show the URL without the password of its
user information or its query string (`http_url.display_url()`).

Deviations from nginx:

- HTTP/1.1 with persistent connections (`max_connections` idle ones kept, more opened
  when requests overlap) instead of one HTTP/1.0 connection per request; a service that
  answers HTTP/1.0 and closes works the same.
- `https://` URLs, verified against `ca` or the system trust store, TLS 1.2 or later.
  `unix:` URLs are not supported. The host name is resolved for each new connection, not
  once at start.
- The answer must be an HTTP response (nginx also takes bare header lines), and is not
  limited to 1024 bytes (Twisted's own limits apply).
- `Auth-Server` may be a host name; an IPv6 address may be in brackets.
- A header that decides (`Auth-Status`, `Auth-Server`, ...) sent twice, an empty
  `Auth-Status`, or a value that is not UTF-8, is an error. `Auth-Wait` may be fractional.
- WAIT is followed at most `max_wait_retries` times; every request is bounded by
  `timeout` (default 10 s; nginx's is 60 s) and the whole decision by the listener's
  `router_timeout`.
- Never sent: `Proxy-Protocol-*` (a route request does not carry the PROXY header's
  addresses), `Auth-SSL-Cert`, `Auth-SSL-Verify` other than `SUCCESS` (a certificate
  that fails verification never gets this far). `Client-Host` is never a real name.
- The request header names are written exactly as nginx writes them (`Client-IP`,
  `Auth-SSL`), not in Twisted's canonical case.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from OpenSSL import SSL
from twisted.application.service import Service
from twisted.internet import error as net
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.endpoints import wrapClientTLS
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IStreamClientEndpoint
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import URI, Agent, HTTPConnectionPool, _HTTP11ClientFactory
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IPolicyForHTTPS, IResponse
from zope.interface import implementer

from ..configtable import ConfigError, Table
from ..connector import tcp_endpoint
from ..interfaces import IReloadable
from ..router import IRouter, Route, RouteRequest, RouterError
from ..routerspec import RouterSpec
from ..tls import TLSSetupError
from ..tls_client import ClientTLS
from ..tls_facts import describe_tls_error
from .http_answer import Wait, parse_auth_response
from .http_request import HEADER_NAME, RESERVED_HEADERS, ExactCaseHeaders, auth_request_headers
from .http_url import parse_url

__all__ = ["HTTPRouter", "describe_failure", "parse"]


# -- TLS to the service --------------------------------------------------------------------


class _QuietHTTPFactory(_HTTP11ClientFactory):
    """The pool's factory without a log line as each connection starts and stops: the
    administrator reads session lines, not the auth service's connection churn."""

    noisy = False


@implementer(IPolicyForHTTPS)
class _VerifiedTLS:
    """Verify the service's certificate with `tls` (its CA or the system's), TLS 1.2 or later."""

    def __init__(self, tls: ClientTLS) -> None:
        self.tls = tls

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        return self.tls.creator_for(hostname.decode("ascii"))


@implementer(IAgentEndpointFactory)
class _Endpoints:
    """How the Agent reaches the service: the connector's TCP endpoints (an address is
    connected to directly: Twisted's default goes through name resolution and waits
    0.3 s after a refused connection), TLS for https."""

    def __init__(self, reactor: Any, timeout: float, tls: _VerifiedTLS | None) -> None:
        self.reactor = reactor
        self.timeout = timeout
        self.tls = tls

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        endpoint = tcp_endpoint(self.reactor, uri.host.decode("ascii"), uri.port, self.timeout)
        if uri.scheme == b"https":
            assert self.tls is not None
            endpoint = wrapClientTLS(self.tls.creatorForNetloc(uri.host, uri.port), endpoint)
        return endpoint


# -- the router ----------------------------------------------------------------------------


class _Discard(Protocol):
    """Reads a response body to its end and forgets it, so the connection can be reused."""

    def __init__(self) -> None:
        self.done: Deferred[None] = Deferred(self._abort)

    def _abort(self, done: Deferred[None]) -> None:
        # The transport is Twisted's TransportProxyProducer: stopping it drops the connection.
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.done.called:
            self.done.callback(None)


def _cancelled(error: BaseException) -> bool:
    """Whether `error` is, or (as Twisted's HTTP client reports it) wraps, a cancellation.

    Cancelled before the TCP connection was made, the endpoint says
    `ConnectingCancelledError` instead (a loaded machine makes that window wide).
    """
    reasons = getattr(error, "reasons", None) or ()
    if isinstance(error, (CancelledError, net.ConnectingCancelledError)):
        return True
    return any(_cancelled(reason.value) for reason in reasons)


def describe_failure(error: BaseException) -> str:
    """Why an HTTP request failed, in an administrator's words (no header values)."""
    from service_identity import VerificationError

    reasons = getattr(error, "reasons", None)
    if reasons:
        # Twisted wraps the transport's failure; the first one is the cause.
        return describe_failure(reasons[0].value)
    if isinstance(error, net.ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, net.DNSLookupError):
        return "host name not found"
    if isinstance(error, (net.TimeoutError, net.TCPTimedOutError)):
        return "connection timed out"
    if isinstance(error, net.ConnectionDone):
        return "connection closed before a complete answer"
    if isinstance(error, net.ConnectionLost):
        return "connection lost before a complete answer"
    if isinstance(error, VerificationError):
        return "TLS: the service's certificate is not valid for its host name"
    if isinstance(error, SSL.Error):
        return describe_tls_error(error)
    if type(error).__name__ in ("ParseError", "BadResponseVersion"):
        return "answered something that is not HTTP"
    if isinstance(error, net.ConnectError):
        return f"cannot connect: {error}"
    return f"{type(error).__name__}: {error}"


@implementer(IRouter, IReloadable)
class HTTPRouter(Service):
    """
    Routes by asking an nginx-style auth service over HTTP(S).

    A service (started before the listeners, stopped after them): stopping closes the
    idle persistent connections. Reloading re-reads `ca` (a broken file keeps the old).
    """

    log = Logger()
    verifies_passwords = True
    """The auth service checks the password (nginx's contract): it may answer with XCLIENT."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 10.0,
        headers: Sequence[tuple[str, str]] = (),
        ca: str | None = None,
        max_connections: int = 10,
        max_wait_retries: int = 10,
        reactor: Any = None,
        ca_key: str = "router.ca",
    ) -> None:
        """Raise ValueError for a bad url or header, TLSSetupError for an unusable `ca`
        (named `ca_key` in the message)."""
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self.url = parse_url(url)
        for name, _ in headers:
            if not HEADER_NAME.fullmatch(name) or name.lower() in RESERVED_HEADERS:
                raise ValueError(f'"{name}" cannot be an extra header')
        self.service = f"auth service {self.url.display}"
        self.timeout = timeout
        self.headers = tuple(headers)
        self.ca = ca
        self.max_wait_retries = max_wait_retries
        self.reactor = reactor
        self.tls = ClientTLS(ca, where=ca_key) if self.url.scheme == "https" else None
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool._factory = _QuietHTTPFactory  # no "Starting factory" lines per connection to the service
        self.pool.maxPersistentPerHost = max_connections
        endpoints = _Endpoints(reactor, timeout, _VerifiedTLS(self.tls) if self.tls is not None else None)
        self.agent = Agent.usingEndpointFactory(reactor, endpoints, pool=self.pool)

    def __repr__(self) -> str:
        return f"<HTTPRouter {self.url.display}>"

    async def route(self, request: RouteRequest) -> list[Route]:
        headers = auth_request_headers(request, self.url.host_header, self.headers)
        waits = 0
        while True:
            answer = parse_auth_response(await self.ask(headers), request, self.service)
            if not isinstance(answer, Wait):
                return answer
            if waits >= self.max_wait_retries:
                raise RouterError(f"{self.service}: still answering WAIT after {waits + 1} requests")
            waits += 1
            if answer.seconds > 0:
                await deferLater(self.reactor, answer.seconds)

    async def ask(self, headers: Sequence[tuple[bytes, bytes]]) -> Headers:
        """One GET; the response's headers once its body has been read (and dropped)."""
        deadline = self.reactor.seconds() + self.timeout
        d: Deferred[IResponse] = self.agent.request(b"GET", self.url.url.encode("ascii"), ExactCaseHeaders(headers))
        d.addTimeout(self.timeout, self.reactor, onTimeoutCancel=self._expired)
        try:
            response = await d
        except RouterError:
            raise
        except Exception as e:
            if _cancelled(e):  # ask_router's own timeout, or the client went away
                raise CancelledError() from None
            raise RouterError(f"{self.service}: {describe_failure(e)}") from None
        body = _Discard()
        response.deliverBody(body)
        # The decision is in the headers; a body that does not end in time costs the
        # connection, not the answer.
        body.done.addTimeout(max(0.0, deadline - self.reactor.seconds()), self.reactor)
        try:
            await body.done
        except TimeoutError:
            pass  # the connection was dropped; a cancellation from above goes on up
        return response.headers

    def _expired(self, result: Any, timeout: float) -> Failure:
        return Failure(RouterError(f"{self.service}: no answer within {timeout:g}s"))

    def reload(self) -> None:
        """Read `ca` again (keeping the old one, with an error logged, when it is broken)."""
        if self.tls is not None:
            self.tls.reload()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        closed: Deferred[None] = self.pool.closeCachedConnections()
        return closed


# -- configuration -------------------------------------------------------------------------


def _extra_headers(table: Table) -> list[tuple[str, str]] | None:
    """`headers = { Name = "value" }`: names checked, values never shown (secrets)."""
    headers: list[tuple[str, str]] = []
    seen: dict[str, str] = {}
    valid = True
    for name in list(table.data):
        value = table.string(name, secret=True)
        if not HEADER_NAME.fullmatch(name):
            table.error(name, "is not a valid HTTP header name")
        elif name.lower() in RESERVED_HEADERS:
            table.error(name, "is a header mailrelay sends itself")
        elif name.lower() in seen:
            table.error(name, f'repeats the header "{seen[name.lower()]}" (header names are case-insensitive)')
        elif isinstance(value, str) and any(c in value for c in "\r\n\0"):
            table.error(name, "must not contain line breaks or NUL characters")
        elif isinstance(value, str):
            seen[name.lower()] = name
            headers.append((name, value))
            continue
        valid = False
    return headers if valid else None


def parse(table: Table) -> RouterSpec | None:
    url_text = table.string("url")
    url = table.check("url", parse_url) if isinstance(url_text, str) else None
    timeout = table.seconds("timeout", 10.0)
    # Read as a secret: a mistyped `headers = "X-Key: secret"` must not echo the secret.
    headers_table = table.table("headers", None, secret=True)
    headers = _extra_headers(headers_table) if headers_table is not None else []
    ca = table.file("ca", None)
    if ca is not None and url is not None and url.scheme != "https":
        table.error("ca", "applies only to an https:// url")
    max_connections = table.integer("max_connections", 10, minimum=1, maximum=10000)
    max_wait_retries = table.integer("max_wait_retries", 10, minimum=0, maximum=10000)
    table.finish()
    if url is None or headers is None or None in (timeout, max_connections, max_wait_retries):
        return None
    if ca is not None and url.scheme != "https":
        return None

    description = f"http: {url.display} timeout={timeout:g}s"
    if headers:
        description += " headers=" + ",".join(name for name, _ in headers)
    if url.scheme == "https":
        description += f" ca={ca or 'the system trust store'}"

    def build(reactor: Any = None, password_listeners: Any = ()) -> IRouter:
        try:
            router = HTTPRouter(
                url.url,
                timeout=timeout,
                headers=headers,
                ca=ca,
                max_connections=max_connections,
                max_wait_retries=max_wait_retries,
                reactor=reactor,
                ca_key=table.key_path("ca"),
            )
        except TLSSetupError as e:
            raise ConfigError([f"{table.errors.source}: {e}"]) from None
        return router

    return RouterSpec("http", description, build, verifies_passwords=True)
