"""
Accepting client connections: one factory per `[[listener]]`, one protocol per mode.

Every mode ends the same way (`RoutedConnection.route_and_splice`): ask the Router,
connect through the shared connector, splice. What differs is what is known before:

    splice:   accepted [--peek ClientHello for SNI-->] routed --> connected --> spliced
    tls:      accepted --TLS handshake--> routed --> connected --> spliced
                  \\ handshake fails or times out: closed, logged as tls-failed

Along the way: a Reject waits, then closes; every route failing closes; the client
leaving at any point before the splice cancels what is pending. Bytes the client sends
while the route is being decided are kept (up to the protocol's pending limit, then
reading pauses) and delivered first.

Before all that, the listener's connection limits (`connlimits`) decide at accept: a
connection past them gets a `TurnedAway` protocol instead, which says the front-end's
`busy_reply` (plaintext listeners only), closes, and opens no session.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IAddress, IDelayedCall, IOpenSSLServerConnectionCreator, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from .clienthello import ClientHello, MalformedClientHello, NotTLS, peek_client_hello
from .config import ListenerConfig
from .connector import UpstreamConnector
from .connlimits import ConnectionLimiter
from .core.machine import Input
from .guard import LoginGuard
from .metrics import NO_METRICS, Metrics
from .protocols import FRONT_ENDS
from .relay import RoutedConnection, address_of
from .router import IRouter
from .session import Sessions
from .timers import cancel

__all__ = ["ListenerFactory", "SpliceModeProtocol", "TLSModeProtocol", "TurnedAway", "address_of"]


class ListenerFactory(Factory):
    """Builds the protocol of one listener, sharing its router, connector and sessions,
    within the listener's connection limits (`limiter`)."""

    noisy = False
    log = Logger()

    def __init__(
        self,
        listener: ListenerConfig,
        router: IRouter,
        connector: UpstreamConnector,
        sessions: Sessions,
        clock: IReactorTime,
        tls: IOpenSSLServerConnectionCreator | None = None,
        connection_class: type[RoutedConnection] | None = None,
        guard: LoginGuard | None = None,
        metrics: Metrics = NO_METRICS,
    ) -> None:
        """
        `tls` is the server TLS of a `starttls` listener (a `tls` listener's factory is
        wrapped in Twisted's TLS layer instead). `connection_class` replaces the
        protocol the listener's mode and protocol call for. `metrics` counts logins,
        limit hits and the Router's time (sessions are counted by `sessions`).
        """
        self.listener = listener
        self.router = router
        self.connector = connector
        self.sessions = sessions
        self.clock = clock
        self.tls = tls
        self.guard = guard
        self.metrics = metrics
        self.connection_class = (
            connection_class or MODE_PROTOCOLS.get((listener.mode, listener.protocol)) or FRONT_ENDS[listener.protocol]
        )
        self.limiter = ConnectionLimiter(
            listener.connection_limits, listener.name, clock, hit=lambda limit: metrics.limit_hit(listener.name, limit)
        )
        busy = self.connection_class.busy_reply
        self.busy_reply = b""
        """What a connection turned away hears before the close (nothing on a `tls`
        listener: not a byte before the TLS handshake, and no handshake for it)."""
        if busy is not None and listener.mode != "tls":
            self.busy_reply = busy.format(hostname=listener.front_end.hostname).encode() + b"\r\n"

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        """The listener's protocol for a connection from `addr`, or a `TurnedAway` past
        the connection limits (never None: Twisted's TLS layer wraps what this returns)."""
        slot = self.limiter.admit(address_of(addr)[0] if addr is not None else "")
        if slot is None:
            return TurnedAway(self.busy_reply)
        protocol = self.connection_class(self)
        protocol.connection_slot = slot
        return protocol

    def startFactory(self) -> None:
        self.limiter.start()
        self._check_descriptors()

    def stopFactory(self) -> None:
        self.limiter.stop()  # no summary timer outlives the listener

    def _check_descriptors(self) -> None:
        """Warn when `max_sessions` cannot be reached: each session holds two file
        descriptors, and past the process's limit accept() and upstream connections fail
        for everyone instead of the excess being turned away."""
        sessions = self.listener.connection_limits.max_sessions
        try:
            import resource

            soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        except (ImportError, OSError, ValueError):
            return
        if sessions and soft != resource.RLIM_INFINITY and 2 * sessions > soft:
            self.log.warn(
                "listener {listener}: max_sessions={sessions} needs up to {needed} file descriptors,"
                " but this process may open {soft}: raise its limit (ulimit -n, systemd's LimitNOFILE)"
                " or lower max_sessions",
                listener=self.listener.name,
                sessions=sessions,
                needed=2 * sessions,
                soft=soft,
            )


class TurnedAway(Protocol):
    """
    A connection the listener's connection limits turned away: it hears `reply` (the
    front-end's busy reply; nothing on `splice` and `tls` listeners) and is closed at
    once. It opens no session, holds no timer, and reads nothing (what the client sends
    is dropped with the connection).
    """

    def __init__(self, reply: bytes) -> None:
        self.reply = reply

    def connectionMade(self) -> None:
        transport: Any = self.transport
        if self.reply:
            transport.write(self.reply)
        # Inside Twisted's TLS layer (a `tls` listener), before the handshake, this
        # drops the TCP connection without a TLS alert.
        transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        pass


class SpliceModeProtocol(RoutedConnection):
    """
    A `splice` listener's client connection: routed from connection facts, and with
    `preread_sni` from the SNI name of the client's TLS ClientHello, which is peeked at
    and forwarded unchanged (the upstream terminates that TLS).

    A client that sends nothing within `preread_timeout` is routed without a name
    (server-speaks-first protocols: plain SMTP, IMAP, POP3); one whose first bytes are
    not TLS likewise at once; one that starts a ClientHello and does not finish it in
    time, or sends a malformed one, is closed.
    """

    _preread: IDelayedCall | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        if self.listener.preread_sni:
            self._preread = self.factory.clock.callLater(self.listener.preread_timeout, self._preread_expired)
        else:
            self.begin()

    def pendingReceived(self) -> None:
        if self._preread is None:
            return
        try:
            hello = peek_client_hello(bytes(self.pending))
        except MalformedClientHello as e:
            self._end_preread()
            self.end("protocol-error", f"malformed TLS ClientHello: {e}")
            return
        if isinstance(hello, NotTLS):
            self._end_preread()
            self.begin()
        elif isinstance(hello, ClientHello):
            self._end_preread()
            self.begin(sni=hello.server_name)
        elif self.read_closed:  # no more is coming: decide now rather than at the timeout
            self._end_preread()
            if self.pending:
                self.end("protocol-error", f"client ended its stream inside a TLS ClientHello ({len(self.pending)} bytes)")
            else:
                self.begin()

    def _end_preread(self) -> None:
        cancel(self._preread)
        self._preread = None

    def _preread_expired(self) -> None:
        self._preread = None
        if self.pending:
            self.end_now(
                "protocol-error",
                f"incomplete TLS ClientHello ({len(self.pending)} bytes) after {self.listener.preread_timeout:g}s",
            )
        else:
            self.begin()

    def lost_before_routing(self, reason: Failure) -> None:
        self._end_preread()
        super().lost_before_routing(reason)


class TLSModeProtocol(RoutedConnection):
    """
    A `tls` listener's client connection with protocol `none`: TLS is terminated by the
    listener (this protocol sits inside Twisted's TLS layer) and the decrypted bytes are
    spliced, as stunnel or nginx's stream+ssl do. Routed once the handshake is done,
    so that the Router sees the SNI name and the client certificate.
    """

    def connectionMade(self) -> None:
        super().connectionMade()
        self.machine.fire(Input.BEGIN_TLS)
        self.expect_handshake()

    def handshake_done(self) -> None:
        self.begin()


MODE_PROTOCOLS: dict[tuple[str, str], type[RoutedConnection]] = {
    ("splice", "none"): SpliceModeProtocol,
    ("tls", "none"): TLSModeProtocol,
}
"""The protocols that speak no mail protocol; every other listener gets its protocol's
front-end (`protocols.FRONT_ENDS`), which handles the `tls` and `starttls` modes itself."""
