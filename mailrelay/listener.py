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
"""

from __future__ import annotations

from typing import Any

from OpenSSL import SSL
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IAddress, IDelayedCall, IHandshakeListener, IReactorTime
from twisted.internet.protocol import Factory
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .clienthello import ClientHello, MalformedClientHello, NotTLS, peek_client_hello
from .config import ListenerConfig
from .connector import LoginStep, StartTLSStep, UpstreamConnector, UpstreamUnavailable
from .router import Address, IRouter, Reject, RouteRequest, RouterError, ask_router
from .session import Session, Sessions
from .splice import Splice, SpliceableProtocol
from .tls import describe_tls_error, tls_facts


def address_of(address: IAddress) -> Address:
    """(host, port) of a Twisted address; a UNIX socket is (path, 0)."""
    host = getattr(address, "host", None)
    if host is not None:
        return (host, address.port)  # type: ignore[attr-defined]
    name = getattr(address, "name", None)
    if isinstance(name, bytes):
        name = name.decode("utf-8", "replace")
    return (name or "unix", 0)


class ListenerFactory(Factory):
    """Builds the protocol of one listener, sharing its router, connector and sessions."""

    noisy = False

    def __init__(
        self,
        listener: ListenerConfig,
        router: IRouter,
        connector: UpstreamConnector,
        sessions: Sessions,
        clock: IReactorTime,
    ) -> None:
        self.listener = listener
        self.router = router
        self.connector = connector
        self.sessions = sessions
        self.clock = clock
        self.connection_class = MODE_PROTOCOLS[(listener.mode, listener.protocol)]

    def buildProtocol(self, addr: IAddress | None) -> RoutedConnection:
        return self.connection_class(self)


class RoutedConnection(SpliceableProtocol):
    """
    A client connection that ends up routed and spliced. Subclasses decide when
    enough is known (`begin()`); this class owns the session, its one log line, and
    every way it can end.
    """

    log = Logger()

    def __init__(self, factory: ListenerFactory) -> None:
        super().__init__()
        self.factory = factory
        self.listener = factory.listener
        self.session: Session | None = None
        self.client: Address = ("", 0)
        self.local: Address = ("", 0)
        self._splice: Splice | None = None
        self._task: Deferred[None] | None = None
        self._aborted_as: str | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self.client = address_of(self.transport.getPeer())
        self.local = address_of(self.transport.getHost())
        self.session = self.factory.sessions.open(self.listener.name, self.client, self._abort)

    def begin(self, **facts: Any) -> None:
        """Route with what is known now (`facts` are RouteRequest fields), connect, splice."""
        request = RouteRequest(
            listener=self.listener.name,
            protocol=self.listener.protocol,  # type: ignore[arg-type]
            mode=self.listener.mode,  # type: ignore[arg-type]
            client=self.client,
            local=self.local,
            **facts,
        )
        self._task = Deferred.fromCoroutine(self.route_and_splice(request))
        self._task.addErrback(self._crashed)

    def lostBeforeSplice(self, reason: Failure) -> None:
        if self._task is not None and not self._task.called:
            self._task.cancel()
        elif self._task is None:
            self.lost_before_routing(reason)

    def lost_before_routing(self, reason: Failure) -> None:
        """The client went away before `begin()`."""
        self.finish("client-gone", "client closed the connection before it was routed")

    async def route_and_splice(
        self, request: RouteRequest, login: LoginStep | None = None, starttls: StartTLSStep | None = None
    ) -> None:
        factory, session = self.factory, self.session
        assert session is not None
        try:
            routes = await ask_router(factory.router, request, factory.clock, self.listener.router_timeout)
        except Reject as reject:
            if reject.wait > 0:
                await deferLater(factory.clock, reject.wait)
            self.close("rejected", reject.message)
            return
        except RouterError as e:
            if e.__cause__ is not None:  # the router raised: its author needs the traceback
                self.log.failure("session {session_id}: router failed", Failure(e.__cause__), session_id=session.id)
            self.close("router-error", str(e))
            return
        if self.lost_reason is not None:  # a router that ignored its cancellation
            raise CancelledError()
        try:
            upstream = await factory.connector.connect(routes, login=login, session_id=session.id, starttls=starttls)
        except UpstreamUnavailable as e:
            self.close("upstream-unavailable", str(e))
            return
        session.upstream = upstream.route.address
        self._splice = Splice(self, upstream.protocol, factory.clock, self.listener.idle_timeout)
        result = await self._splice.start()
        session.bytes_up, session.bytes_down = result.bytes_up, result.bytes_down
        session.finish(result.outcome, f"{result.ended_by} closed first" if result.ended_by else None)

    def finish(self, outcome: str, reason: str | None = None) -> None:
        assert self.session is not None
        self.session.finish(outcome, reason)

    def close(self, outcome: str, reason: str) -> None:
        """End the session, letting what was written reach the client first."""
        self.finish(outcome, reason)
        self.transport.loseConnection()

    def _abort(self, outcome: str) -> None:
        """Drop the session (drain timeout): the log line says `outcome`."""
        self._aborted_as = outcome
        if self._splice is not None:
            self._splice.abort(outcome)
        else:
            if self._task is None:
                self.finish(outcome)
            self.transport.abortConnection()

    def _crashed(self, failure: Failure) -> Any:
        if failure.check(CancelledError):
            if self._aborted_as:
                self.finish(self._aborted_as)
            else:
                self.finish("client-gone", "client closed the connection before the splice")
            return None
        assert self.session is not None
        self.log.failure("session {session_id}: internal error", failure, session_id=self.session.id)
        self.finish("error", f"internal error: {failure.value!r}")
        self.transport.abortConnection()
        return None


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
            self.close("protocol-error", f"malformed TLS ClientHello: {e}")
            return
        if isinstance(hello, NotTLS):
            self._end_preread()
            self.begin()
        elif isinstance(hello, ClientHello):
            self._end_preread()
            self.begin(sni=hello.server_name)

    def _end_preread(self) -> None:
        if self._preread is not None:
            if self._preread.active():
                self._preread.cancel()
            self._preread = None

    def _preread_expired(self) -> None:
        self._preread = None
        if self.pending:
            self.finish(
                "protocol-error",
                f"incomplete TLS ClientHello ({len(self.pending)} bytes) after {self.listener.preread_timeout:g}s",
            )
            self.transport.abortConnection()
        else:
            self.begin()

    def lost_before_routing(self, reason: Failure) -> None:
        self._end_preread()
        super().lost_before_routing(reason)


@implementer(IHandshakeListener)
class TLSModeProtocol(RoutedConnection):
    """
    A `tls` listener's client connection with protocol `none`: TLS is terminated by the
    listener (this protocol sits inside Twisted's TLS layer) and the decrypted bytes are
    spliced, as stunnel or nginx's stream+ssl do. Routed once the handshake is done,
    so that the Router sees the SNI name and the client certificate.
    """

    _handshake_timer: IDelayedCall | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self._handshake_timer = self.factory.clock.callLater(self.listener.handshake_timeout, self._handshake_expired)

    def handshakeCompleted(self) -> None:
        self._stop_handshake_timer()
        facts = tls_facts(self.transport)
        self.begin(tls=True, sni=facts.sni, client_cert=facts.client_cert)

    def _stop_handshake_timer(self) -> None:
        if self._handshake_timer is not None and self._handshake_timer.active():
            self._handshake_timer.cancel()
        self._handshake_timer = None

    def _handshake_expired(self) -> None:
        self._handshake_timer = None
        self.finish("tls-failed", f"no TLS handshake within {self.listener.handshake_timeout:g}s")
        self.transport.abortConnection()

    def lost_before_routing(self, reason: Failure) -> None:
        self._stop_handshake_timer()
        if isinstance(reason.value, SSL.Error):
            self.finish("tls-failed", describe_tls_error(reason.value))
        else:
            self.finish("client-gone", "client closed the connection during the TLS handshake")


MODE_PROTOCOLS: dict[tuple[str, str], type[RoutedConnection]] = {
    ("splice", "none"): SpliceModeProtocol,
    ("tls", "none"): TLSModeProtocol,
}
"""The protocol serving each (mode, protocol) pair a listener may have."""
