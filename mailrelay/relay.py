"""
The path every client connection ends on: ask the Router, connect through the shared
connector, splice. Listener modes and protocol front-ends differ only in what they
learn before (`RoutedConnection.begin`) and what they say to the client.

A connection that terminates TLS (at accept, or after STARTTLS) is given a bounded
time for the handshake; its outcome is logged as `tls-failed` when the handshake fails
or times out, and what the handshake established (SNI, client certificate) reaches the
Router.
"""

from __future__ import annotations

from typing import Any, Protocol

from OpenSSL import SSL
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IAddress, IDelayedCall, IHandshakeListener, IOpenSSLServerConnectionCreator, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .ask import ask_router_now
from .config import ListenerConfig
from .connector import LoginStep, StartTLSStep, Upstream, UpstreamConnector, UpstreamProtocol, UpstreamUnavailable
from .connlimits import Slot
from .core.machine import Input, SessionMachine, State
from .guard import Attempt, LoginGuard
from .interfaces import IBalancerAddress
from .metrics import Metrics
from .router import Address, IRouter, Reject, Route, RouteRequest, RouterError
from .session import Session, Sessions
from .splice import Splice, SpliceableProtocol, SpliceResult
from .timers import cancel
from .tls_facts import TLSFacts, describe_tls_error, tls_facts


def address_of(address: IAddress) -> Address:
    """(host, port) of a Twisted address; a UNIX socket is (path, 0)."""
    host = getattr(address, "host", None)
    if host is not None:
        return (host, address.port)  # type: ignore[attr-defined]
    name = getattr(address, "name", None)
    if isinstance(name, bytes):
        name = name.decode("utf-8", "replace")
    return (name or "unix", 0)


class Relay(Protocol):
    """What carries a session once it is logged in: a `Splice`, or a protocol's own
    relay (SMTP's)."""

    def abort(self, outcome: str) -> None:
        """Drop both connections now; the session line says `outcome`."""

    @property
    def bytes_up(self) -> int:
        """Bytes from the client delivered towards the upstream so far."""

    @property
    def bytes_down(self) -> int:
        """Bytes from the upstream delivered towards the client so far."""


class RoutedConnectionFactory(Protocol):
    """What a RoutedConnection needs from its listener (see `listener.ListenerFactory`)."""

    listener: ListenerConfig
    router: IRouter
    connector: UpstreamConnector
    sessions: Sessions
    clock: IReactorTime
    tls: IOpenSSLServerConnectionCreator | None
    """The server TLS a connection upgrades to on STARTTLS (None: no STARTTLS)."""
    guard: LoginGuard | None
    """Counts failed logins, and refuses logins past its limits (None: no limits)."""
    metrics: Metrics
    """Where logins, limit hits and the Router's answering time are counted."""


@implementer(IHandshakeListener)
class RoutedConnection(SpliceableProtocol):
    """
    A client connection that ends up routed and spliced. Subclasses decide when
    enough is known (`begin()`); this class owns the session, its state machine
    (`machine`: every change of the session's state goes through it), its one log line,
    every way it can end, and the watch over a TLS handshake (`expect_handshake()`).
    """

    log = Logger()
    busy_reply: str | None = None
    """What a client turned away at accept by the listener's connection limits hears
    before the close, in plaintext (a template for `str.format` with `hostname`); None:
    closed without a word. Never said on a `tls` listener, before any handshake."""
    connection_slot: Slot | None = None
    """This connection's place in its listener's connection limits, given back when
    the connection is lost (None: counted by no one)."""

    def __init__(self, factory: RoutedConnectionFactory) -> None:
        super().__init__()
        self.factory = factory
        self.listener = factory.listener
        self.machine = SessionMachine()
        self.session: Session | None = None
        self.client: Address = ("", 0)
        self.local: Address = ("", 0)
        self.tls: TLSFacts | None = None
        """What the client's TLS handshake established; None while the connection is plaintext."""
        self._relay: Relay | None = None
        self._task: Deferred[None] | None = None
        """The route attempt in flight (routing, connecting, logging in, relaying)."""
        self._aborted_as: str | None = None
        self._handshake_timer: IDelayedCall | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        peer = self.transport.getPeer()
        self.client = address_of(peer)
        self.local = address_of(self.transport.getHost())
        # A balancer's health check (mailrelay.proxied) logs quietly when it goes well.
        quiet = IBalancerAddress.providedBy(peer)
        self.session = self.factory.sessions.open(self.listener.name, self.client, self._abort, quiet=quiet)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        try:
            super().connectionLost(reason)  # `lostBeforeSplice()` sees the state it was lost in
        finally:  # however the connection ended, its client may open another
            self.machine.fire(Input.LOST)
            if self.connection_slot is not None:
                self.connection_slot.release()

    def expect_handshake(self) -> None:
        """A TLS handshake is under way: give it `handshake_timeout` seconds."""
        self._handshake_timer = self.factory.clock.callLater(self.listener.handshake_timeout, self._handshake_expired)

    def handshakeCompleted(self) -> None:
        self._stop_handshake_timer()
        self.tls = tls_facts(self.transport)
        self.handshake_done()

    def handshake_done(self) -> None:
        """The client's TLS handshake succeeded; `self.tls` says what it established."""

    def _stop_handshake_timer(self) -> None:
        cancel(self._handshake_timer)
        self._handshake_timer = None

    def _handshake_expired(self) -> None:
        self._handshake_timer = None
        self.end_now("tls-failed", f"no TLS handshake within {self.listener.handshake_timeout:g}s")

    def begin(self, **facts: Any) -> None:
        """
        Route with what is known now, connect, splice (a listener that speaks no
        protocol). `facts` are RouteRequest fields beyond the connection's own.
        """
        self.machine.fire(Input.ROUTE)
        self.start_route(**facts)

    def start_route(self, **facts: Any) -> None:
        """The session is in `routing`: ask the Router, connect, relay. `facts` are
        RouteRequest fields beyond the connection's own (the TLS ones are filled in)."""
        request = self.request(**facts)
        login, starttls = self.upstream_steps(request)
        task = Deferred.fromCoroutine(
            self.route_and_splice(request, login=self._watched(login), starttls=self._watched(starttls))
        )
        # A Router that answers at once may have ended the attempt already (a refusal,
        # and the front-end reading again): then there is no task in flight to keep.
        if not task.called:
            self._task = task
        task.addErrback(self._crashed)

    def _watched(self, step: LoginStep | None) -> LoginStep | None:
        """`step`, telling the machine when the first upstream is reached and talked to."""
        if step is None:
            return None
        machine = self.machine

        async def watched(protocol: UpstreamProtocol, route: Route) -> None:
            if machine.state is State.CONNECTING:
                machine.fire(Input.LOG_IN)
            await step(protocol, route)

        return watched

    def request(self, **facts: Any) -> RouteRequest:
        """What to ask the Router: the connection's facts, its TLS facts, and `facts`."""
        if self.tls is not None:
            facts = {
                "tls": True,
                "sni": self.tls.sni,
                "tls_version": self.tls.version,
                "tls_cipher": self.tls.cipher,
                "client_cert": self.tls.client_cert,
                **facts,
            }
        return RouteRequest(
            listener=self.listener.name,
            protocol=self.listener.protocol,  # type: ignore[arg-type]
            mode=self.listener.mode,  # type: ignore[arg-type]
            client=self.client,
            local=self.local,
            **facts,
        )

    def upstream_steps(self, request: RouteRequest) -> tuple[LoginStep | None, StartTLSStep | None]:
        """The protocol's upstream login and STARTTLS exchange for `request` (none: splice
        what the upstream says from its first byte)."""
        return None, None

    def lostBeforeSplice(self, reason: Failure) -> None:
        if self._relay is not None:
            return  # a relay reading through `pending` sees the end itself
        if self.machine.asking:
            assert self._task is not None
            self._task.cancel()
        else:
            self.lost_before_routing(reason)

    def lost_before_routing(self, reason: Failure) -> None:
        """The client went away before `begin()`."""
        during_handshake = self._handshake_timer is not None
        self._stop_handshake_timer()
        if isinstance(reason.value, SSL.Error):
            self.finish("tls-failed", describe_tls_error(reason.value))
        elif during_handshake:
            self.finish("client-gone", "client closed the connection during the TLS handshake")
        else:
            self.finish("client-gone", "client closed the connection before it was routed")

    async def route_and_splice(
        self, request: RouteRequest, login: LoginStep | None = None, starttls: StartTLSStep | None = None
    ) -> None:
        """
        Route `request`, connect (running the front-end's `starttls` and `login` steps
        upstream), splice. A refusal ends in `refused()`, a failure to decide or to
        reach an upstream in `unavailable()`: front-ends override those to answer in
        their protocol. Failed logins are counted by the listener's guard, which may
        refuse a login before the Router is asked, or hold it back; a login it lets
        through counts as in flight until its outcome is known, however it ends.
        """
        factory, session, machine = self.factory, self.session, self.machine
        assert session is not None
        session.user = request.user
        guard, metrics, name = factory.guard, factory.metrics, self.listener.name
        attempt = Attempt()  # without a guard: counted by no one
        login_result = "abandoned"  # the client left before the outcome (mailrelay_logins_total)
        if guard is not None:
            attempt = await guard.enter(request)  # the fleet's counts too, when shared
            if attempt.refusal is not None:
                metrics.limit_hit(name, "login_max_per_client")
                metrics.login(name, "throttled")
                if guard.limits.delay > 0:
                    await deferLater(factory.clock, guard.limits.delay)
                self.unavailable("throttled", attempt.refusal)
                return
        try:
            if attempt.delay > 0:  # the per-user slowdown
                metrics.limit_hit(name, "login_max_per_user")
                await deferLater(factory.clock, attempt.delay)
            routes = self.ask_router(request)
            if isinstance(routes, Deferred):  # else known at once: no Deferred, no timer
                routes = await routes
            if self.lost_reason is not None:  # a router that ignored its cancellation
                raise CancelledError()
            machine.fire(Input.CONNECT)
            upstream = await factory.connector.connect(
                routes, login=login, session_id=session.id, starttls=starttls, client=request.client, local=request.local
            )
            login_result = "success"
        except Reject as reject:  # by the Router, or by the upstream refusing our login
            attempt.end(failed=reject.counts)  # before the front-end may read the next login
            login_result = "failure" if reject.counts else "refused"
            if reject.wait > 0:
                await deferLater(factory.clock, reject.wait)
            self.refused(reject)
            return
        except RouterError as e:
            attempt.end()
            login_result = "error"
            if e.__cause__ is not None:  # the router raised: its author needs the traceback
                self.log.failure("session {session_id}: router failed", Failure(e.__cause__), session_id=session.id)
            self.unavailable("router-error", str(e))
            return
        except UpstreamUnavailable as e:
            attempt.end()
            login_result = "error"
            self.unavailable("upstream-unavailable", str(e))
            return
        finally:  # logged in or cancelled (ending twice is harmless): no longer in flight
            attempt.end()
            if request.user is not None:
                metrics.login(name, login_result)
        session.upstream = upstream.route.address
        session.traffic = self._traffic
        self.logged_in(upstream)
        result = await self.relay(upstream)
        session.bytes_up, session.bytes_down = result.bytes_up, result.bytes_down
        session.finish(result.outcome, result.reason or (f"{result.ended_by} closed first" if result.ended_by else None))

    def ask_router(self, request: RouteRequest) -> list[Route] | Deferred[list[Route]]:
        """
        The Router's answer to `request` (`ask.ask_router_now`), timed in the metrics:
        the Routes when it is known at once, else a Deferred of them; `Reject` and
        `RouterError` raised at once or failing the Deferred. `route_and_splice` is the
        one place that decides what follows, whichever way the answer came.
        """
        factory = self.factory
        router, clock, timeout = factory.router, factory.clock, self.listener.router_timeout
        return factory.metrics.timed_router(lambda: ask_router_now(router, request, clock, timeout), clock)

    def _traffic(self) -> tuple[int, int]:
        """Bytes the relay carried so far (up, down), for the metrics."""
        relay = self._relay
        return (relay.bytes_up, relay.bytes_down) if relay is not None else (0, 0)

    async def relay(self, upstream: Upstream) -> SpliceResult:
        """Carry the session between client and upstream until it ends: splice it."""
        self.machine.fire(Input.SPLICE)
        splice = Splice(
            self, upstream.protocol, self.factory.clock, self.listener.idle_timeout, zero_copy=self.listener.zero_copy
        )
        self._relay = splice
        return await splice.start()

    def logged_in(self, upstream: Upstream) -> None:
        """The upstream is connected and logged in; the relay starts next. A front-end
        tells its client here (SMTP's `235`)."""

    def refused(self, reject: Reject) -> None:
        """The session was refused (after `reject.wait`); without a protocol, close."""
        self.end("rejected", reject.message)

    def unavailable(self, outcome: str, reason: str) -> None:
        """No route could be decided or reached now: a temporary failure. Without a
        protocol to say so in, close."""
        self.end(outcome, reason)

    def finish(self, outcome: str, reason: str | None = None) -> None:
        assert self.session is not None
        self.session.finish(outcome, reason)

    def end(self, outcome: str, reason: str) -> None:
        """End the session, letting what was written reach the client first."""
        if self.machine.can(Input.CLOSE):
            self.machine.fire(Input.CLOSE)
        self.close(outcome, reason)

    def close(self, outcome: str, reason: str) -> None:
        """Log the session's line and close the connection after what was written (the
        machine is already `draining`)."""
        self.finish(outcome, reason)
        self.close_lingering(self.factory.clock)

    def end_now(self, outcome: str, reason: str | None = None) -> None:
        """End the session dropping the connection: nothing can be said (inside a TLS
        handshake), or the peer reads nothing."""
        if self.machine.can(Input.CLOSE):
            self.machine.fire(Input.CLOSE)
        self.finish(outcome, reason)
        self.transport.abortConnection()

    def _abort(self, outcome: str) -> None:
        """Drop the session (drain timeout): the log line says `outcome`."""
        self._aborted_as = outcome
        if self._relay is not None:
            self._relay.abort(outcome)
        else:
            if not self.machine.asking:  # else the attempt's cancellation logs it
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
