"""
The one UpstreamConnector every listener mode shares: Route -> connected, logged-in
upstream connection, ready to be spliced.

It knows no mail protocol. A front-end that must log in passes a `LoginStep`, which
talks to the upstream through `UpstreamProtocol` (`protocols.upstream.run_dialogue`
runs a protocol core's login dialogue on it); bytes the step does not consume stay
pending and reach the client when the splice starts.

Upstream TLS is the connector's: `Route.tls = "tls"` wraps the connection in TLS from
the first byte; `"starttls"` runs the front-end's `StartTLSStep` (the protocol's words
up to its "go ahead"), then upgrades. Either way the handshake, and the certificate
check, finish before any login step runs or any client byte is spliced: a session never
talks to an upstream that failed verification.

Every route attempt has a deadline, `login_timeout` (Dovecot's login_proxy_timeout):
TCP connect (itself bounded by `connect_timeout`, name resolution included), TLS
handshake, greeting, STARTTLS and login together. An upstream that accepts the
connection and then says nothing fails its route, naming what it was waiting for
(`UpstreamProtocol.stage`: "no greeting within 30s"), and the next route is tried.

A route with `proxy_protocol = 1 | 2` is told the client's address by a PROXY header,
the first bytes on its TCP connection (before a TLS ClientHello, before the greeting
is read): `ProxyHeaderEndpoint`, between `stream_endpoint` and TLS. The addresses are
the caller's (`connect(client=, local=)`: the accepted socket's, or a trusted inbound
PROXY header's), never anything the client said.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

import attrs
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import defer
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.error import (
    ConnectError,
    ConnectingCancelledError,
    ConnectionRefusedError,
    DNSLookupError,
    TimeoutError,
)
from twisted.internet.interfaces import (
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from . import proxyprotocol
from .core.errors import UpstreamProtocolError
from .logtext import loggable
from .metrics import NO_METRICS, Metrics
from .proxy_endpoint import ProxyHeaderEndpoint
from .router import Address, Reject, Route
from .splice import LineTooLong, PeerClosed, SpliceableProtocol
from .tls import TLSSetupError
from .tls_client import ClientTLS
from .tls_facts import describe_tls_error
from .tls_layer import wrap_client_tls
from .zerocopy import write_through

LoginStep = Callable[["UpstreamProtocol", Route], Awaitable[None]]
"""A protocol's upstream login: raise `Reject` when the upstream refuses the
credentials (final), anything else when this route is unusable (next route is tried).
Before each wait it names what it waits for in `UpstreamProtocol.stage`, for the
failure should the login deadline pass; it may be cancelled at any await."""

StartTLSStep = Callable[["UpstreamProtocol", Route], Awaitable[None]]
"""A protocol's upstream STARTTLS exchange (greeting, EHLO, `STARTTLS`, `220`): it
returns when the upstream is ready for the TLS handshake, or raises like a login step."""


_Addresses = tuple[Address | None, Address | None]
"""A PROXY header's (source, destination): the client's address and the one it connected to."""


class UpstreamTLSError(Exception):
    """The TLS handshake with the upstream failed (certificate, name, protocol)."""


class UpstreamTimeout(Exception):
    """A route attempt's `login_timeout` passed: the message says what the upstream
    left unanswered."""


class UpstreamProtocol(SpliceableProtocol):
    """The upstream leg of a session (see `TLSUpstreamProtocol` for TLS routes)."""

    peer = "upstream"

    def __init__(self) -> None:
        super().__init__()
        self._handshake: Deferred[None] | None = None
        self.tls = False
        """Whether the TLS handshake with the upstream has completed."""
        self.stage = "greeting"
        """What the connection is waiting for from the upstream before the splice, in
        the words of the failure if the login deadline passes ("no {stage} within
        30s"): the connector sets "handshake", the login steps "answer to EHLO",
        "login reply" and the like before each read."""

    def _handshake_completed(self) -> None:
        self.tls = True
        handshake, self._handshake = self._handshake, None
        if handshake is not None:
            handshake.callback(None)

    async def wait_for_handshake(self) -> None:
        """Return once the TLS handshake is done; raise UpstreamTLSError if it fails."""
        if self.tls:
            return
        if self.lost_reason is not None:
            raise _handshake_failure(self.lost_reason)
        self._handshake = Deferred()
        await self._handshake

    def start_tls(self, creator: IOpenSSLClientConnectionCreator) -> None:
        """
        Upgrade to TLS now (after the upstream said yes to STARTTLS). Anything the
        upstream sent after that answer was sent in plaintext, where anyone could have
        written it: it would be read as if it came over TLS, so the route is refused.
        """
        if self.pending:
            raise UpstreamTLSError(f"upstream sent {len(self.pending)} byte(s) after its STARTTLS answer, before TLS")
        self.transport.startTLS(creator)

    def lostBeforeSplice(self, reason: Failure) -> None:
        handshake, self._handshake = self._handshake, None
        if handshake is not None:
            handshake.errback(_handshake_failure(reason))

    def write(self, data: bytes) -> None:
        write_through(self.transport, data)  # to the socket when nothing waits: no reactor turn


def _handshake_failure(reason: Failure) -> UpstreamTLSError:
    if isinstance(reason.value, (SSL.Error, VerificationError)):
        return UpstreamTLSError(describe_tls_error(reason.value))
    return UpstreamTLSError("TLS: upstream closed the connection during the handshake")


def _timed_out(result: object, timeout: float) -> Failure:
    # Cancelling an endpoint's connect fails with ConnectingCancelledError, which
    # addTimeout would not recognise as its own doing.
    return Failure(defer.TimeoutError(f"no connection within {timeout:g}s"))


def deadline_passed(stage: str, timeout: float) -> UpstreamTimeout:
    """The failure of a route whose login deadline passed while waiting for `stage`."""
    if stage == "handshake":
        return UpstreamTimeout(f"TLS: no handshake within {timeout:g}s")
    return UpstreamTimeout(f"no {stage} within {timeout:g}s")


@attrs.define
class _Attempt:
    """One route attempt in progress: the connection once there is one."""

    protocol: UpstreamProtocol | None = None

    @property
    def stage(self) -> str:
        return self.protocol.stage if self.protocol is not None else "connection"


@implementer(IHandshakeListener)
class TLSUpstreamProtocol(UpstreamProtocol):
    """
    The upstream leg of a TLS route. A separate class because Twisted's endpoint
    wrapper copies only the last of the interfaces it forwards (`directlyProvides` in
    a loop): a protocol that listened for handshakes would lose its half-close, which
    only plain TCP legs need.
    """

    def handshakeCompleted(self) -> None:
        self._handshake_completed()


class _UpstreamFactory(Factory):
    noisy = False  # one "Starting factory" line per session drowns the session lines

    def __init__(self, tls: bool) -> None:
        self.protocol = TLSUpstreamProtocol if tls else UpstreamProtocol


@attrs.frozen
class Upstream:
    """A connected (and logged-in) upstream."""

    route: Route
    protocol: UpstreamProtocol


class UpstreamUnavailable(Exception):
    """No route could be used; `failures` says why for each, in order."""

    def __init__(self, failures: Sequence[tuple[Route, str]]) -> None:
        self.failures = list(failures)
        super().__init__("; ".join(f"{route.address}: {why}" for route, why in self.failures) or "no route")


def unsupported(route: Route, starttls: StartTLSStep | None) -> str | None:
    """Why this version cannot use `route` in this session, or None."""
    if route.tls == "starttls" and starttls is None:
        return 'tls = "starttls" needs a mail protocol on the listener; use tls = "tls" with protocol "none"'
    return None


def tcp_endpoint(reactor: Any, host: str, port: int, timeout: float) -> IStreamClientEndpoint:
    """A TCP client endpoint to `host` (an address or a name) and `port`."""
    # An address needs no resolution: HostnameEndpoint would still send it through
    # getaddrinfo on the thread pool and its happy-eyeballs machinery, which cost about a
    # third of a short session's CPU (bench/README.md), and 0.3 s more on a refusal.
    if isIPAddress(host):
        return TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
    if isIPv6Address(host):
        return TCP6ClientEndpoint(reactor, host, port, timeout=timeout)
    return HostnameEndpoint(reactor, host, port, timeout=timeout)


def describe_failure(error: BaseException, timeout: float) -> str:
    """A short reason for the log, in an administrator's words."""
    if isinstance(error, (UpstreamTLSError, UpstreamTimeout, UpstreamProtocolError, TLSSetupError, PeerClosed, LineTooLong)):
        return str(error)
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, (TimeoutError, defer.TimeoutError)):
        return f"no connection within {timeout:g}s"
    if isinstance(error, DNSLookupError):
        return "host name does not resolve"
    if isinstance(error, ConnectError):
        # "Connection reset by peer", not "An error occurred while connecting: 104: ...".
        detail = [str(part) for part in (error.osError, *error.args) if part and not isinstance(part, int)]
        return ": ".join(detail) if detail else str(error).strip()
    return f"{type(error).__name__}: {error}"


class UpstreamConnector:
    """Connects to the first usable of a session's routes and runs its login step."""

    log = Logger()
    metrics: Metrics = NO_METRICS
    """Where each successful TCP connect's duration is observed (the service sets it)."""

    def __init__(
        self, reactor: Any, connect_timeout: float = 10.0, tls: ClientTLS | None = None, login_timeout: float = 30.0
    ) -> None:
        """
        `reactor` provides TCP, time and name resolution (the global reactor in
        production); `tls` verifies upstream certificates (default: against the system
        trust store). `connect_timeout` bounds each route's TCP connect (name
        resolution included), `login_timeout` all of a route's attempt: connect, TLS
        handshake, greeting, STARTTLS and login (a smaller one bounds the connect too).
        """
        self.reactor = reactor
        self.connect_timeout = connect_timeout
        self.login_timeout = login_timeout
        self.tls = tls if tls is not None else ClientTLS()

    def endpoint_for(self, route: Route, client: Address | None = None, local: Address | None = None) -> IStreamClientEndpoint:
        """
        The client endpoint that reaches `route`: `stream_endpoint`, then the PROXY
        header when `route.proxy_protocol` asks for one (`ProxyHeaderEndpoint`: from
        `client` to `local`, the address the client connected to; "UNKNOWN" when one
        is not an IP address or not given), then TLS when `route.tls` is "tls".
        """
        endpoint = self.stream_endpoint(route)
        if route.proxy_protocol is not None:
            endpoint = ProxyHeaderEndpoint(endpoint, proxyprotocol.header(route.proxy_protocol, client, local))
        if route.tls == "tls":
            return wrap_client_tls(self.tls.creator(route), endpoint)
        return endpoint

    def stream_endpoint(self, route: Route) -> IStreamClientEndpoint:
        """
        The endpoint of the byte stream to `route`, beneath any TLS: TCP to its `host`
        and `port` within `connect_timeout`. The one place the connector reaches the
        network, so a subclass may override it to connect elsewhere (`mailrelay.testing`
        connects to a scripted upstream in memory); TLS, timeouts, fallbacks and login
        steps still run on top of what it returns.
        """
        return tcp_endpoint(self.reactor, route.host, route.port, self.connect_timeout)

    async def connect(
        self,
        routes: Sequence[Route],
        login: LoginStep | None = None,
        session_id: str = "-",
        starttls: StartTLSStep | None = None,
        client: Address | None = None,
        local: Address | None = None,
    ) -> Upstream:
        """
        Try `routes` in order; return the first one connected, secured as it asks, and
        logged in. A route with `proxy_protocol` is sent a PROXY header naming `client`
        and `local` (the address it connected to) first: these must come from the
        accepted socket or a trusted inbound PROXY header, as an upstream that reads
        the header believes them (without them, the header says UNKNOWN).

        A route that cannot be connected to, whose TLS handshake or certificate check
        fails, whose login step fails for any reason but `Reject`, or that is not done
        within `login_timeout`, is logged and the next one is tried (a route that timed
        out has its connection aborted). `Reject` from the login step is final. Raises
        `UpstreamUnavailable` when every route failed. `starttls` is the protocol's
        exchange before an upstream STARTTLS; without one, such routes are unusable.

        Cancelling (the client left) aborts the attempt in progress and tries no other
        route: the result is a CancelledError. No timer outlives the call.
        """
        failures: list[tuple[Route, str]] = []
        for route in routes:
            why = unsupported(route, starttls)
            if why is None:
                try:
                    return await self._connect_one(route, login, starttls, (client, local))
                except (Reject, CancelledError):
                    raise
                except ConnectingCancelledError:
                    # Only our caller cancels a connect (timeouts become TimeoutError or
                    # UpstreamTimeout): the session is over, no other route is wanted.
                    raise CancelledError() from None
                except Exception as e:
                    why = describe_failure(e, self.connect_timeout)
            failures.append((route, why))
            self.log.warn(
                "session {session_id}: upstream {upstream} failed: {why}",
                session_id=session_id,
                upstream=route.address,
                why=loggable(why, 500),
            )
        raise UpstreamUnavailable(failures)

    async def _connect_one(
        self, route: Route, login: LoginStep | None, starttls: StartTLSStep | None, addresses: _Addresses
    ) -> Upstream:
        """One route, within `login_timeout`. Our deadline cancels the attempt (which
        aborts its connection) and fails it with an UpstreamTimeout naming the stage;
        the caller's cancellation goes through as it is."""
        attempt = _Attempt()
        attempting = Deferred.fromCoroutine(self._attempt(route, login, starttls, addresses, attempt))
        attempting.addTimeout(
            self.login_timeout, self.reactor, onTimeoutCancel=lambda _, timeout: Failure(deadline_passed(attempt.stage, timeout))
        )
        return await attempting

    async def _attempt(
        self,
        route: Route,
        login: LoginStep | None,
        starttls: StartTLSStep | None,
        addresses: _Addresses,
        attempt: _Attempt,
    ) -> Upstream:
        started = self.reactor.seconds()
        connecting = self.endpoint_for(route, *addresses).connect(_UpstreamFactory(route.tls != "none"))
        # The endpoint's own timeout covers each TCP attempt; this one also bounds
        # name resolution and the happy-eyeballs races.
        connecting.addTimeout(self.connect_timeout, self.reactor, onTimeoutCancel=_timed_out)
        protocol = attempt.protocol = cast(UpstreamProtocol, await connecting)
        self.metrics.upstream_connected(self.reactor.seconds() - started)
        try:
            if route.tls == "starttls":
                assert starttls is not None
                await starttls(protocol, route)
                protocol.start_tls(self.tls.creator(route))
            if route.tls != "none":
                protocol.stage = "handshake"
                await protocol.wait_for_handshake()
                protocol.stage = "greeting" if route.tls == "tls" else "reply"  # a login step names its own
            if login is not None:
                await login(protocol, route)
        except BaseException:
            protocol.transport.abortConnection()
            raise
        return Upstream(route, protocol)
