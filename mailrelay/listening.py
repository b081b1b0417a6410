"""
A service that listens on one server endpoint while it runs: mailrelay's listeners and
its metrics endpoint.

The port is bound in `privilegedStartService`, so that twistd takes ports below 1024
before it drops privileges, and a port that cannot be bound (already in use, no
permission) raises there and then, stopping the start-up instead of leaving a service
that listens nowhere. Stopping the service stops listening.

What stops the start is a `ListenFailed`: a `CannotListenError` whose text is one line
for the administrator (which listener, which endpoint, why, what to do); twistd's
plugin turns it into that line and exit status 1 instead of a traceback.
"""

from __future__ import annotations

import errno

from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IAddress, IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.python.failure import Failure

__all__ = ["ExitOnListenFailure", "ListenFailed", "ListeningService", "describe_host", "listen_failed"]


class ListenFailed(CannotListenError):
    """A port could not be bound; `str()` is one line saying what, where, why and what to do."""

    def __init__(self, what: str, error: CannotListenError) -> None:
        super().__init__(error.interface, error.port, error.socketError)
        self.what = what

    def __str__(self) -> str:
        port = self.port
        where = f"{self.interface}:{port}" if self.interface else f"port {port}"
        code = getattr(self.socketError, "errno", None)
        reason = getattr(self.socketError, "strerror", None) or str(self.socketError)
        hint = _LISTEN_HINTS.get(code, "").format(port=port) if code is not None else ""
        if code == errno.EACCES and isinstance(port, int) and port >= 1024:
            hint = ""  # not the low-port rule: a security module or a container's policy
        return f"{self.what} cannot listen on {where}: {reason}" + (f": {hint}" if hint else "")


_LISTEN_HINTS = {
    errno.EADDRINUSE: (
        "another program (or another mailrelay) already listens there; `ss -ltnp 'sport = :{port}'`"
        " shows which: stop it, or choose another port"
    ),
    errno.EACCES: (
        "ports below 1024 need root: start twistd as root (it binds, then drops to --uid/--gid),"
        " grant CAP_NET_BIND_SERVICE (systemd: AmbientCapabilities=), or use a port above 1023"
    ),
    errno.EADDRNOTAVAIL: "no network interface of this machine has that address: check the listen endpoint's interface=",
}


def listen_failed(what: str, error: BaseException | None) -> BaseException:
    """The exception to raise when `what` (`listener "imap"`, `the metrics endpoint`)
    failed to listen with `error`: a `ListenFailed` for a port that cannot be bound,
    anything else unchanged."""
    if isinstance(error, CannotListenError) and not isinstance(error, ListenFailed):
        return ListenFailed(what, error)
    return error if error is not None else RuntimeError(f"{what}: listening failed")


class ExitOnListenFailure(MultiService):
    """Runs `service` for twistd: a port it cannot bind ends the start with the
    `ListenFailed`'s one line and exit status 1 (a SystemExit, which twistd prints as
    it is) rather than a traceback that buries the reason."""

    def __init__(self, service: IService) -> None:
        super().__init__()
        self.service = service
        service.setServiceParent(self)

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except ListenFailed as e:
            raise SystemExit(f"mailrelay cannot start: {e}") from None

    def startService(self) -> None:
        try:
            super().startService()
        except ListenFailed as e:
            raise SystemExit(f"mailrelay cannot start: {e}") from None


class ListeningService(Service):
    """Listens with `factory` on `endpoint` while running; `port` fires with the
    listening port. Subclasses say what listens where in `listened()`, and what they
    are in `what` (for the message when the port cannot be bound)."""

    what = "mailrelay"

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
            raise listen_failed(self.what, failed[0].value) from None

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
