"""
Accepting client connections: one factory per `[[listener]]`, one protocol per mode.

A `splice` listener parses nothing. Its session's life is:

    accepted --ask router--> routed --connector--> connected --splice--> closed
        \\ Reject: wait, close      \\ every route failed: close
         \\ the client leaves at any point before the splice: cancel what is pending

Bytes the client sends while the route is being decided are kept (up to the
protocol's pending limit, then reading pauses) and delivered first.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.internet.protocol import Factory
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from .config import ListenerConfig
from .connector import UpstreamConnector, UpstreamUnavailable
from .router import Address, IRouter, Reject, RouteRequest, RouterError, ask_router
from .session import Session, Sessions
from .splice import Splice, SpliceableProtocol


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

    def buildProtocol(self, addr: IAddress | None) -> SpliceModeProtocol:
        return SpliceModeProtocol(self)


class SpliceModeProtocol(SpliceableProtocol):
    """A `splice` listener's client connection: route from connection facts, splice."""

    log = Logger()

    def __init__(self, factory: ListenerFactory) -> None:
        super().__init__()
        self.factory = factory
        self.session: Session | None = None
        self._splice: Splice | None = None
        self._task: Deferred[None] | None = None
        self._aborted_as: str | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        client = address_of(self.transport.getPeer())
        self.session = self.factory.sessions.open(self.factory.listener.name, client, self._abort)
        self._task = Deferred.fromCoroutine(self._serve(client, address_of(self.transport.getHost())))
        self._task.addErrback(self._crashed)

    def lostBeforeSplice(self, reason: Failure) -> None:
        if self._task is not None and not self._task.called:
            self._task.cancel()

    async def _serve(self, client: Address, local: Address) -> None:
        factory, session = self.factory, self.session
        assert session is not None
        listener = factory.listener
        request = RouteRequest(
            listener=listener.name, protocol="none", mode="splice", client=client, local=local
        )
        try:
            routes = await ask_router(factory.router, request, factory.clock, listener.router_timeout)
        except Reject as reject:
            if reject.wait > 0:
                await deferLater(factory.clock, reject.wait)
            self._close("rejected", reject.message)
            return
        except RouterError as e:
            if e.__cause__ is not None:  # the router raised: its author needs the traceback
                self.log.failure("session {session_id}: router failed", Failure(e.__cause__), session_id=session.id)
            self._close("router-error", str(e))
            return
        if self.lost_reason is not None:  # a router that ignored its cancellation
            raise CancelledError()
        try:
            upstream = await factory.connector.connect(routes, session_id=session.id)
        except UpstreamUnavailable as e:
            self._close("upstream-unavailable", str(e))
            return
        session.upstream = upstream.route.address
        self._splice = Splice(self, upstream.protocol, factory.clock, listener.idle_timeout)
        result = await self._splice.start()
        session.bytes_up, session.bytes_down = result.bytes_up, result.bytes_down
        session.finish(result.outcome, f"{result.ended_by} closed first" if result.ended_by else None)

    def _close(self, outcome: str, reason: str) -> None:
        assert self.session is not None
        self.session.finish(outcome, reason)
        self.transport.loseConnection()

    def _abort(self, outcome: str) -> None:
        """Drop the session (drain timeout): the log line says `outcome`."""
        self._aborted_as = outcome
        if self._splice is not None:
            self._splice.abort(outcome)
        else:
            self.transport.abortConnection()

    def _crashed(self, failure: Failure) -> Any:
        assert self.session is not None
        if failure.check(CancelledError):
            if self._aborted_as:
                self.session.finish(self._aborted_as)
            else:
                self.session.finish("client-gone", "client closed the connection before the splice")
            return None
        self.log.failure("session {session_id}: internal error", failure, session_id=self.session.id)
        self.session.finish("error", f"internal error: {failure.value!r}")
        self.transport.abortConnection()
        return None
