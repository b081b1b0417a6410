"""
The one UpstreamConnector every listener mode shares: Route -> connected, logged-in
upstream connection, ready to be spliced.

It knows no mail protocol. A front-end that must log in passes a `LoginStep`, which
talks to the upstream through `UpstreamProtocol.read_line()` and `write()`; bytes the
step does not consume stay pending and reach the client when the splice starts.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

import attrs
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
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from .router import Reject, Route
from .splice import SpliceableProtocol

LoginStep = Callable[["UpstreamProtocol", Route], Awaitable[None]]
"""A protocol's upstream login: raise `Reject` when the upstream refuses the
credentials (final), anything else when this route is unusable (next route is tried)."""


class UpstreamClosed(Exception):
    """The upstream closed the connection while a login step was reading from it."""


class LineTooLong(Exception):
    """The upstream sent a line longer than the login step accepts."""


class UpstreamProtocol(SpliceableProtocol):
    """The upstream leg of a session."""

    def __init__(self) -> None:
        super().__init__()
        self._waiting: Deferred[None] | None = None

    def pendingReceived(self) -> None:
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.callback(None)

    def lostBeforeSplice(self, reason: Failure) -> None:
        self.pendingReceived()

    def write(self, data: bytes) -> None:
        self.transport.write(data)

    async def read_line(self, max_length: int = 8192) -> bytes:
        """The next line from the upstream, with its line ending."""
        while True:
            end = self.pending.find(b"\n", 0, max_length)
            if end >= 0:
                line = bytes(self.pending[: end + 1])
                del self.pending[: end + 1]
                return line
            if len(self.pending) >= max_length:
                raise LineTooLong(f"upstream sent a line longer than {max_length} bytes")
            if self.read_closed or self.lost_reason is not None:
                raise UpstreamClosed("upstream closed the connection")
            self._waiting = Deferred()
            await self._waiting


def _timed_out(result: object, timeout: float) -> Failure:
    # Cancelling an endpoint's connect fails with ConnectingCancelledError, which
    # addTimeout would not recognise as its own doing.
    return Failure(defer.TimeoutError(f"no connection within {timeout:g}s"))


class _UpstreamFactory(Factory):
    noisy = False  # one "Starting factory" line per session drowns the session lines
    protocol = UpstreamProtocol


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


def unsupported(route: Route) -> str | None:
    """Why this version cannot use `route`, or None."""
    if route.tls != "none":
        return f'upstream TLS (tls = "{route.tls}") is not available in this version of mailrelay'
    if route.proxy_protocol is not None:
        return "sending the PROXY protocol upstream is not available in this version of mailrelay"
    return None


def describe_failure(error: BaseException, timeout: float) -> str:
    """A short reason for the log, in an administrator's words."""
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, (TimeoutError, defer.TimeoutError)):
        return f"no connection within {timeout:g}s"
    if isinstance(error, DNSLookupError):
        return "host name does not resolve"
    if isinstance(error, ConnectError):
        return error.osError if isinstance(getattr(error, "osError", None), str) else str(error).strip()
    return f"{type(error).__name__}: {error}"


class UpstreamConnector:
    """Connects to the first usable of a session's routes and runs its login step."""

    log = Logger()

    def __init__(self, reactor: Any, connect_timeout: float = 10.0) -> None:
        """`reactor` provides TCP, time and name resolution (the global reactor in production)."""
        self.reactor = reactor
        self.connect_timeout = connect_timeout

    def endpoint_for(self, route: Route) -> IStreamClientEndpoint:
        """The client endpoint that reaches `route` (the seam for upstream TLS)."""
        # An address needs no resolution: HostnameEndpoint would still send it through
        # getaddrinfo on the thread pool and its happy-eyeballs machinery, which cost
        # about a third of a short session's CPU (bench/README.md).
        if isIPAddress(route.host):
            return TCP4ClientEndpoint(self.reactor, route.host, route.port, timeout=self.connect_timeout)
        if isIPv6Address(route.host):
            return TCP6ClientEndpoint(self.reactor, route.host, route.port, timeout=self.connect_timeout)
        return HostnameEndpoint(self.reactor, route.host, route.port, timeout=self.connect_timeout)

    async def connect(
        self, routes: Sequence[Route], login: LoginStep | None = None, session_id: str = "-"
    ) -> Upstream:
        """
        Try `routes` in order; return the first one connected and logged in.

        A route that cannot be connected to, or whose login step fails for any reason
        but `Reject`, is logged and the next one is tried. `Reject` from the login step
        is final. Raises `UpstreamUnavailable` when every route failed.
        """
        failures: list[tuple[Route, str]] = []
        for route in routes:
            why = unsupported(route)
            if why is None:
                try:
                    return await self._connect_one(route, login)
                except (Reject, CancelledError):
                    raise
                except ConnectingCancelledError:
                    # Only our caller cancels a connect (timeouts become TimeoutError):
                    # the session is over, no other route is wanted.
                    raise CancelledError() from None
                except Exception as e:
                    why = describe_failure(e, self.connect_timeout)
            failures.append((route, why))
            self.log.warn(
                "session {session_id}: upstream {upstream} failed: {why}",
                session_id=session_id,
                upstream=route.address,
                why=why,
            )
        raise UpstreamUnavailable(failures)

    async def _connect_one(self, route: Route, login: LoginStep | None) -> Upstream:
        connecting = self.endpoint_for(route).connect(_UpstreamFactory())
        # The endpoint's own timeout covers each TCP attempt; this one also bounds
        # name resolution and the happy-eyeballs races.
        connecting.addTimeout(self.connect_timeout, self.reactor, onTimeoutCancel=_timed_out)
        protocol = cast(UpstreamProtocol, await connecting)
        if login is not None:
            try:
                await login(protocol, route)
            except BaseException:
                protocol.transport.abortConnection()
                raise
        return Upstream(route, protocol)
