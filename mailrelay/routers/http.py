"""
`type = "http"`: nginx's auth_http protocol, so the auth service an nginx mail proxy
already asks decides where mailrelay's sessions go, unchanged.

For every routing decision mailrelay sends one `GET` to `url` with the facts in request
headers, and reads the decision from the response headers; the status code and the body
are ignored. `auth_request_headers()` builds the request and `parse_auth_response()` reads
the answer; both are pure functions. `HTTPRouter` does the I/O.

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
user information or its query string (`display_url()`).

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

import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import attrs
from OpenSSL import SSL
from twisted.application.service import Service
from twisted.internet import error as net
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.endpoints import wrapClientTLS
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IStreamClientEndpoint
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import URI, Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IPolicyForHTTPS, IResponse
from zope.interface import implementer

from ..configtable import ConfigError, Table
from ..connector import tcp_endpoint
from ..interfaces import IReloadable
from ..logtext import loggable
from ..router import AUTH_MECHANISMS, LOGINS, UPSTREAM_TLS, IRouter, Reject, Route, RouteRequest, RouterError
from ..tls import ClientTLS, TLSSetupError, describe_tls_error

if TYPE_CHECKING:
    from . import RouterSpec

__all__ = ["HTTPRouter", "Wait", "auth_request_headers", "display_url", "escape", "parse_auth_response", "parse_url"]


# -- the request ---------------------------------------------------------------------------

_AUTH_METHODS = {
    "plain": b"plain",
    "login": b"plain",  # nginx reports AUTH LOGIN as plain
    "cram-md5": b"cram-md5",
    "apop": b"apop",
    "external": b"external",
    "none": b"none",
    "xoauth2": b"xoauth2",
    "oauthbearer": b"oauthbearer",
}

_ESCAPED = frozenset(range(0x20)) | {ord(" "), ord("%")}

REQUEST_HEADERS = (
    "Host",
    "Auth-Method",
    "Auth-User",
    "Auth-Pass",
    "Auth-Salt",
    "Auth-Protocol",
    "Auth-Login-Attempt",
    "Client-IP",
    "Client-Host",
    "Auth-SMTP-Helo",
    "Auth-SMTP-From",
    "Auth-SMTP-To",
    "Auth-SSL",
    "Auth-SSL-Protocol",
    "Auth-SSL-Cipher",
    "Auth-SSL-Verify",
    "Auth-SSL-Subject",
    "Auth-SSL-Issuer",
    "Auth-SSL-Serial",
    "Auth-SSL-Fingerprint",
)
"""Every header mailrelay sends itself; a configured extra header may not reuse one."""

_RESERVED = frozenset(name.lower() for name in (*REQUEST_HEADERS, "Connection", "Content-Length", "Transfer-Encoding"))


def _utf8(value: str) -> bytes:
    try:
        return value.encode("utf-8", "surrogateescape")  # bytes a front-end could not decode, as received
    except UnicodeEncodeError:
        return value.encode("utf-8", "replace")


def escape(value: str) -> bytes:
    """nginx's escaping of Auth-User and Auth-Pass: control bytes, space and `%` as `%XX`."""
    return b"".join(b"%%%02X" % byte if byte in _ESCAPED else bytes((byte,)) for byte in _utf8(value))


def _raw(value: str) -> bytes:
    """A value nginx sends unescaped; a line break (which no front-end lets through)
    becomes a space, as Twisted would write it anyway."""
    return b" ".join(_utf8(value).splitlines())


def auth_request_headers(request: RouteRequest, host: str, extra: Sequence[tuple[str, str]] = ()) -> list[tuple[bytes, bytes]]:
    """The request headers nginx would send for `request`, in its order, then `extra`."""
    method = _AUTH_METHODS[request.auth_method]
    headers = [
        (b"Host", host.encode("ascii")),
        (b"Auth-Method", method),
        (b"Auth-User", escape(request.user or "")),
        (b"Auth-Pass", escape(request.password or "")),
    ]
    if method in (b"cram-md5", b"apop") and request.salt:
        headers.append((b"Auth-Salt", _raw(request.salt)))
    client = request.client[0]
    headers += [
        (b"Auth-Protocol", request.protocol.encode("ascii")),
        (b"Auth-Login-Attempt", b"%d" % request.attempt),
        (b"Client-IP", _raw(client) if isIPAddress(client) or isIPv6Address(client) else b"unix:"),
    ]
    if request.protocol == "smtp":
        headers.append((b"Client-Host", b"[UNAVAILABLE]"))
        if method == b"none":
            headers += [
                (b"Auth-SMTP-Helo", _raw(request.helo or "")),
                (b"Auth-SMTP-From", _raw(request.mail_from or "")),
                (b"Auth-SMTP-To", _raw(request.rcpt_to or "")),
            ]
    if request.tls:
        headers.append((b"Auth-SSL", b"on"))
        if request.tls_version:
            headers.append((b"Auth-SSL-Protocol", _raw(request.tls_version)))
        if request.tls_cipher:
            headers.append((b"Auth-SSL-Cipher", _raw(request.tls_cipher)))
        cert = request.client_cert
        if cert is not None:
            headers += [
                (b"Auth-SSL-Verify", b"SUCCESS"),
                (b"Auth-SSL-Subject", escape(cert.subject)),
                (b"Auth-SSL-Issuer", escape(cert.issuer)),
                (b"Auth-SSL-Serial", _raw(cert.serial)),
                (b"Auth-SSL-Fingerprint", _raw(cert.fingerprint)),
            ]
    headers += [(name.encode("ascii"), _raw(value)) for name, value in extra]
    return headers


class _ExactCaseHeaders(Headers):
    """
    Headers written with the spelling given (`Client-IP`, `Auth-SSL`), not Twisted's
    canonical `Client-Ip`: names are case-insensitive, but an auth script written for
    nginx may not know it.
    """

    __slots__ = ("_spelling",)

    def __init__(self, pairs: Iterable[tuple[bytes, bytes]] = ()) -> None:
        super().__init__()
        self._spelling: dict[bytes, bytes] = {}
        for name, value in pairs:
            self.addRawHeader(name, value)
            self._spelling[name.lower()] = name

    def copy(self) -> _ExactCaseHeaders:
        new = _ExactCaseHeaders()
        new._rawHeaders = {name: list(values) for name, values in self._rawHeaders.items()}
        new._spelling = dict(self._spelling)
        return new

    def getAllRawHeaders(self) -> Any:
        for name, values in super().getAllRawHeaders():
            yield self._spelling.get(name.lower(), name), values


# -- the response --------------------------------------------------------------------------


@attrs.frozen
class Wait:
    """The service answered `Auth-Status: WAIT`: ask again after `seconds`."""

    seconds: float


MAX_AUTH_WAIT = 60.0
"""The longest `Auth-Wait` obeyed, in seconds (for WAIT and for a refusal): a longer one
is taken as this, so that a broken service cannot hold a session for hours."""

_HOST_NAME = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9_-]{1,63}(?<!-))*\.?")
_NUMBER = re.compile(r"[0-9]+(\.[0-9]+)?")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _host(value: str) -> str | None:
    """An IP address (IPv6 with or without brackets) or a host name; None if neither."""
    if value.startswith("[") and value.endswith("]"):
        return value[1:-1] if isIPv6Address(value[1:-1]) else None
    if isIPAddress(value) or isIPv6Address(value):
        return value
    if len(value) > 253 or not _HOST_NAME.fullmatch(value) or re.fullmatch(r"[0-9.]+", value):
        return None
    return value


def _port(value: str) -> int | None:
    return int(value) if value.isascii() and value.isdigit() and 0 < int(value) < 65536 else None


def _address(value: str) -> tuple[str, int] | None:
    """`host:port` or `[v6]:port`."""
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
        return (host, p) if sep and isIPv6Address(host) and (p := _port(port)) else None
    host, sep, port = value.rpartition(":")
    return (h, p) if sep and ":" not in host and (h := _host(host)) and (p := _port(port)) else None


class _Answer:
    """The response headers, read one name at a time, each at most once."""

    def __init__(self, headers: Headers | Iterable[tuple[str | bytes, str | bytes]], service: str) -> None:
        # Pairs are kept as given (a `Headers` would turn a CR or LF into a space), so
        # that a value holding one is refused, not quietly changed.
        pairs = headers.getAllRawHeaders() if isinstance(headers, Headers) else ((n, [v]) for n, v in headers)
        self.values: dict[bytes, list[bytes]] = {}
        for name, values in pairs:
            for value in values:
                key = (name.encode("latin-1") if isinstance(name, str) else name).lower()
                self.values.setdefault(key, []).append(value.encode("utf-8") if isinstance(value, str) else value)
        self.service = service

    def error(self, reason: str) -> RouterError:
        return RouterError(f"{self.service}: {reason}")

    def get(self, name: str) -> str | None:
        values = self.values.get(name.lower().encode("ascii"))
        if not values:
            return None
        if len(values) > 1:
            raise self.error(f"answered with {len(values)} {name} headers")
        try:
            value = values[0].decode("utf-8").strip(" \t")
        except UnicodeDecodeError:
            raise self.error(f"answered with a {name} that is not UTF-8") from None
        if _CONTROL.search(value):
            # Never shown: it may be Auth-Pass, and it is not fit for a log line anyway.
            raise self.error(f"answered with control characters in {name}")
        return value

    def invalid(self, name: str, value: str) -> RouterError:
        shown = value if len(value) <= 100 else value[:100] + "..."
        return self.error(f'answered with an invalid {name}: "{shown}"')

    def choice(self, name: str, choices: dict[str, Any], default: Any) -> Any:
        value = self.get(name)
        if value is None:
            return default
        if value not in choices:
            raise self.invalid(name, value)
        return choices[value]

    def seconds(self, name: str) -> float:
        value = self.get(name)
        if value is None:
            return 0.0
        if not _NUMBER.fullmatch(value):
            raise self.invalid(name, value)
        return min(float(value), MAX_AUTH_WAIT)


def parse_auth_response(
    headers: Headers | Iterable[tuple[str | bytes, str | bytes]],
    request: RouteRequest,
    service: str = "auth service",
) -> list[Route] | Wait:
    """
    Read an auth_http answer to `request`: the routes to try, in order, or `Wait`.

    Raises `Reject` when the service refuses the session and `RouterError` (its message
    starting with `service`) when the answer is missing, malformed or incomplete.
    """
    answer = _Answer(headers, service)
    status = answer.get("Auth-Status")
    if status is None:
        raise answer.error("answered without Auth-Status")
    if status == "WAIT":
        return Wait(answer.seconds("Auth-Wait"))
    if status != "OK":
        if not status:
            raise answer.error("answered with an empty Auth-Status")
        wait = answer.seconds("Auth-Wait")
        code = answer.get("Auth-Error-Code") or None
        raise Reject(status, wait=wait, code=code, close=wait == 0)

    server, port = answer.get("Auth-Server"), answer.get("Auth-Port")
    missing = [name for name, value in (("Auth-Server", server), ("Auth-Port", port)) if not value]
    if missing:
        raise answer.error(f"answered OK without {' and '.join(missing)}")
    assert server and port
    host, port_number = _host(server), _port(port)
    if host is None:
        raise answer.invalid("Auth-Server", server)
    if port_number is None:
        raise answer.invalid("Auth-Port", port)
    addresses = [(host, port_number)]
    fallback = answer.get("Mailrelay-Fallback")
    if fallback is not None:
        for item in fallback.split(","):
            address = _address(item.strip())
            if address is None:
                raise answer.invalid("Mailrelay-Fallback", fallback)
            addresses.append(address)

    server_name = answer.get("Mailrelay-Server-Name")
    if server_name is not None and _host(server_name) is None:
        raise answer.invalid("Mailrelay-Server-Name", server_name)
    password = answer.get("Auth-Pass")
    login = answer.choice("Mailrelay-Login", {v: v for v in LOGINS}, "xclient" if request.protocol == "smtp" else "passthrough")
    needs_password = request.auth_method in ("cram-md5", "apop")
    if needs_password and login == "passthrough" and password is None:
        raise answer.error(f"answered OK to a {request.auth_method} login without the Auth-Pass the upstream login needs")
    settings = dict(
        tls=answer.choice("Mailrelay-TLS", {v: v for v in UPSTREAM_TLS}, "none"),
        tls_verify=answer.choice("Mailrelay-TLS-Verify", {"on": True, "off": False}, True),
        server_name=server_name,
        user=answer.get("Auth-User"),
        password=password,
        login=login,
        proxy_protocol=answer.choice("Mailrelay-Proxy-Protocol", {"1": 1, "2": 2}, None),
        auth_mechanism=answer.choice("Mailrelay-Auth-Mechanism", {v: v for v in AUTH_MECHANISMS}, "plain"),
        forward_client=answer.choice("Mailrelay-Forward-Client", {"on": True, "off": False}, False),
    )
    return [Route(host=h, port=p, **settings) for h, p in addresses]


# -- the service's address -----------------------------------------------------------------


@attrs.frozen
class AuthURL:
    """A checked `url`: what to connect to and what to call it in messages."""

    url: str
    scheme: str
    host: str
    """As written, without IPv6 brackets."""
    port: int

    @property
    def host_header(self) -> str:
        """What nginx sends as `Host`: the host without the port."""
        return f"[{self.host}]" if ":" in self.host else self.host

    @property
    def display(self) -> str:
        """The URL for messages (`display_url()`)."""
        return display_url(self.url)


def display_url(url: str) -> str:
    """
    `url` as a message may show it, whatever it holds (a malformed one too): the
    password of its user information is `...` (`http://user:...@host/`), a query string
    or fragment (which may hold a key) is `?...` / `#...`, control characters are
    escaped. Every message about a configured URL shows it through this.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    # The authority is taken up to the first `/` only: a password may hold `?` or `#`.
    slash = rest.find("/")
    authority, path = (rest[:slash], rest[slash:]) if slash >= 0 else (rest, "")
    if "@" in authority:
        userinfo, _, host = authority.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        if any(c in user for c in "?#"):
            user = "..."
        elif colon:
            user += ":..."
        authority = f"{user}@{host}"
    rest = authority + path
    cut = min((i for i in (rest.find("?"), rest.find("#")) if i >= 0), default=-1)
    if cut >= 0:
        rest = rest[:cut] + rest[cut] + "..."
    return loggable(scheme + sep + rest, 500)


def parse_url(url: str) -> AuthURL:
    """Check an auth service URL; ValueError says what is wrong with it (showing the URL
    through `display_url()`: no password, no query string)."""
    shown = display_url(url)
    if not url.isascii() or any(c.isspace() or ord(c) < 0x20 for c in url):
        raise ValueError(f'must be ASCII without spaces (percent-encode the path, a host name in its xn-- form), not "{shown}"')
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
    except ValueError:  # "Invalid IPv6 URL", and other things urlsplit cannot split
        raise ValueError(f'is not a valid URL: "{shown}"') from None
    if parts.scheme.lower() not in ("http", "https") or not url.lower().startswith(parts.scheme.lower() + "://"):
        raise ValueError(f'must be an http:// or https:// URL, not "{shown}"')
    if "@" in netloc:
        raise ValueError("must not hold a user name or password (send credentials with headers)")
    if parts.fragment or url.endswith("#"):
        raise ValueError(f'must not have a #fragment: "{shown}"')
    if netloc.startswith("["):
        host, _, rest = netloc[1:].partition("]")
        if not isIPv6Address(host):
            raise ValueError(f'has an invalid IPv6 address: "{shown}"')
        port_text = rest[1:] if rest.startswith(":") else None
        if rest and port_text is None:
            raise ValueError(f'has an invalid host: "{shown}"')
    else:
        host, sep, port_text_or_empty = netloc.partition(":")
        port_text = port_text_or_empty if sep else None
        if not host:
            raise ValueError(f'has no host: "{shown}"')
        if _host(host) is None:
            raise ValueError(f'has an invalid host "{loggable(host)}"')
    default = 443 if parts.scheme.lower() == "https" else 80
    port = default if port_text is None else _port(port_text)
    if port is None:
        raise ValueError(f'has an invalid port (1 to 65535): "{shown}"')
    return AuthURL(url=url, scheme=parts.scheme.lower(), host=host, port=port)


# -- TLS to the service --------------------------------------------------------------------


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
    """Whether `error` is, or (as Twisted's HTTP client reports it) wraps, a cancellation."""
    reasons = getattr(error, "reasons", None) or ()
    return isinstance(error, CancelledError) or any(_cancelled(reason.value) for reason in reasons)


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
            if not _TOKEN.fullmatch(name) or name.lower() in _RESERVED:
                raise ValueError(f'"{name}" cannot be an extra header')
        self.service = f"auth service {self.url.display}"
        self.timeout = timeout
        self.headers = tuple(headers)
        self.ca = ca
        self.max_wait_retries = max_wait_retries
        self.reactor = reactor
        self.tls = ClientTLS(ca, where=ca_key) if self.url.scheme == "https" else None
        self.pool = HTTPConnectionPool(reactor, persistent=True)
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
        d: Deferred[IResponse] = self.agent.request(b"GET", self.url.url.encode("ascii"), _ExactCaseHeaders(headers))
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

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _extra_headers(table: Table) -> list[tuple[str, str]] | None:
    """`headers = { Name = "value" }`: names checked, values never shown (secrets)."""
    headers: list[tuple[str, str]] = []
    seen: dict[str, str] = {}
    valid = True
    for name in list(table.data):
        value = table.string(name, secret=True)
        if not _TOKEN.fullmatch(name):
            table.error(name, "is not a valid HTTP header name")
        elif name.lower() in _RESERVED:
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
    from . import RouterSpec

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
