"""
A service that listens on one server endpoint while it runs: mailrelay's listeners and
its metrics endpoint.

The port is bound in `privilegedStartService`, so that twistd takes ports below 1024
before it drops privileges, and a port that cannot be bound (already in use, no
permission) raises there and then, stopping the start-up instead of leaving a service
that listens nowhere. Stopping the service stops listening.
"""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IAddress, IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.python.failure import Failure

__all__ = ["ListeningService", "describe_host"]


class ListeningService(Service):
    """Listens with `factory` on `endpoint` while running; `port` fires with the
    listening port. Subclasses say what listens where in `listened()`."""

    def __init__(self, endpoint: IStreamServerEndpoint, factory: IProtocolFactory) -> None:
        self.endpoint = endpoint
        self.factory = factory
        self.port: Deferred[IListeningPort] | None = None
        self._listening: IListeningPort | None = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self.port = self.endpoint.listen(self.factory)
        failed: list[Failure] = []
        self.port.addCallbacks(self._listened, failed.append)
        if failed:
            # Raised synchronously (endpoints listen at once): the start-up stops here.
            failed[0].raiseException()

    def _listened(self, port: IListeningPort) -> IListeningPort:
        self._listening = port
        self.listened(port.getHost())
        return port

    def listened(self, host: IAddress) -> None:
        """The endpoint is listening on `host`: a subclass logs where."""

    def startService(self) -> None:
        if self.port is None:
            self.privilegedStartService()
        super().startService()

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        port, self.port, self._listening = self._listening, None, None
        if port is not None:
            return maybeDeferred(port.stopListening)  # type: ignore[call-overload]
        return None


def describe_host(host: IAddress) -> str:
    """`host:port` of a listening address (a UNIX socket: its path)."""
    name = getattr(host, "name", None)
    if name is not None and not hasattr(host, "port"):
        return name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)
    return f"{getattr(host, 'host', '')}:{getattr(host, 'port', '')}"
