"""
Configuration -> running service: listeners, routers, the shared connector, drain.

Start order: routers that are services, then listeners. Stop order: listeners stop
accepting, running sessions get `drain_timeout` seconds to finish (then are aborted),
then routers stop.

SIGHUP (whose default action would kill the process) asks every component that
provides `IReloadable` to re-read what it reads, without touching running sessions.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from twisted.application.internet import TimerService
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, fail, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IAddress, IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.logger import Logger
from zope.interface import implementer

from .config import Config, ConfigError, ListenerConfig, load_config, parse_config
from .connector import UpstreamConnector
from .guard import LoginGuard
from .interfaces import IReloadable
from .listener import ListenerFactory
from .listening import ListeningService, describe_host
from .metrics import TRAFFIC_INTERVAL, MetricsService, MultiprocessMetrics, metrics_for
from .proxied import ProxiedFactory
from .router import IRouter
from .routers import components
from .routerspec import RouterSpec
from .session import Sessions
from .shared import SharedLoginCounts, SharedRoutes, SharedStore, read_secret
from .tls import ServerTLS, ServerTLSConfig, TLSSetupError
from .tls_client import ClientTLS
from .tls_layer import RecordTLSFactory
from .workers import InheritedSocket, Supervisor, inherited_sockets, worker_command

T = TypeVar("T")


class ListenerService(ListeningService):
    """One `[[listener]]`, listening on its endpoint while running."""

    log = Logger()

    def __init__(self, listener: ListenerConfig, endpoint: IStreamServerEndpoint, factory: IProtocolFactory) -> None:
        super().__init__(endpoint, factory)
        self.name = listener.name
        self.listener = listener
        self.what = f'listener "{listener.name}" ({listener.listen})'

    def listened(self, host: IAddress) -> None:
        self.log.info(
            "listener {listener} on {address} (mode={mode}, protocol={protocol})",
            listener=self.name,
            address=describe_host(host),
            mode=self.listener.mode,
            protocol=self.listener.protocol,
        )


class MailrelayService(MultiService):
    """All of mailrelay for one configuration."""

    log = Logger()

    def __init__(
        self,
        config: Config,
        router: IRouter | None = None,
        reactor: Any = None,
        inherited: Mapping[str, InheritedSocket] | None = None,
        worker_command: list[str] | None = None,
    ) -> None:
        """`inherited`: in a worker, the sockets its listeners accept on. `worker_command`
        with `config.workers > 1` outside a worker: this process supervises workers
        running that command instead of listening itself (`workers.Supervisor`)."""
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self.config = config
        self.reactor = reactor
        # Without [metrics], NO_METRICS; in a worker, counted for the supervisor to serve.
        self.metrics, metrics_listen = metrics_for(config.metrics.listen if config.metrics is not None else None)
        self.sessions = Sessions(reactor, self.metrics, json_lines=config.log.sessions == "json")
        self.metrics_services: list[IService] = []
        """The metrics endpoint (or a worker's traffic reports): stopped last."""
        self.routers: list[IRouter] = []
        self.server_tls: ServerTLS | None = None
        self.listeners: dict[str, ListenerService] = {}
        self._sighup_installed = False
        self._previous_sighup: Any = None
        self.supervisor: Supervisor | None = None
        self.worker_metrics: MultiprocessMetrics | None = None
        """A supervisor's sum of its workers' metrics (with `[metrics]`)."""
        supervising = worker_command is not None and inherited is None and config.workers > 1

        # Build every router and load every certificate before anything can listen,
        # reporting all failures at once.
        errors: list[str] = []
        client_tls = self._tls_setup(lambda: ClientTLS(config.upstream.ca), errors)
        self.connector = UpstreamConnector(
            reactor, config.upstream.connect_timeout, client_tls, login_timeout=config.upstream.login_timeout
        )
        self.connector.metrics = self.metrics
        self.guard = LoginGuard(config.login_limits, reactor)
        self.store: SharedStore | None = None
        """The fleet's Redis (`[redis]`): login counts, and the route cache with a secret."""
        self.shared_routes: SharedRoutes | None = None
        if config.redis is not None:
            self.store = _store(config, reactor, errors)
            self.guard.shared = SharedLoginCounts(self.store, config.login_limits)
            if self.store.secret is not None:
                self.shared_routes = SharedRoutes(self.store)
            if not supervising:  # the workers count logins, not their supervisor
                self.store.setServiceParent(self)  # before the listeners: started first
        if any(listener.terminates_tls for listener in config.listeners):
            self.server_tls = self._tls_setup(lambda: ServerTLS(config.tls or ServerTLSConfig(default=None)), errors)
        # A router that reads its routes later (a map file) refuses, then and on reload,
        # routes that would log a password login in unchecked on the listeners it serves.
        default_passwords = [(lst.name, lst.protocol) for lst in config.listeners if lst.router is None and lst.accepts_passwords]
        default = router if router is not None else _build(config.router, errors, reactor, default_passwords)
        routers: dict[str, IRouter] = {}
        for listener in config.listeners:
            own = default
            if listener.router is not None:
                passwords = [(listener.name, listener.protocol)] if listener.accepts_passwords else []
                own = _build(listener.router, errors, reactor, passwords)
            if own is not None:
                routers[listener.name] = own
            elif listener.router is None and config.router is None:
                errors.append(
                    f'{config.source}: listener "{listener.name}" has no router: add a [router] table,'
                    " a router to the listener, or pass router= to makeService()"
                )
        if errors:
            raise ConfigError(errors)
        for listener in config.listeners:
            if not supervising:  # a supervisor builds routers to check them; workers run them
                self._add_router(routers[listener.name])
            tls = None
            if self.server_tls is not None and listener.terminates_tls:
                tls = self.server_tls.creator(listener.protocol if listener.protocol != "none" else None)
            factory: IProtocolFactory = ListenerFactory(
                listener,
                routers[listener.name],
                self.connector,
                self.sessions,
                reactor,
                tls=tls if listener.mode == "starttls" else None,
                guard=self.guard,
                metrics=self.metrics,
            )
            if listener.mode == "tls":
                assert tls is not None
                tls_factory = RecordTLSFactory(tls, False, factory)
                tls_factory.noisy = False  # one "starting on" line per listener is ours to write
                factory = tls_factory
            if listener.proxy_protocol:  # outside TLS: the header comes before the handshake
                factory = ProxiedFactory(factory, listener, reactor)
            if inherited is None:
                endpoint = _server_endpoint(reactor, listener.listen)
            elif listener.name in inherited:
                endpoint = inherited[listener.name].endpoint(reactor)
            else:
                raise ConfigError([f'{config.source}: listener "{listener.name}" is new: restart mailrelay to add it'])
            self.listeners[listener.name] = ListenerService(listener, endpoint, factory)
        if supervising:
            assert worker_command is not None
            endpoints = {name: service.endpoint for name, service in self.listeners.items()}
            # The workers count into a directory of the supervisor's, which serves the sum.
            self.worker_metrics = MultiprocessMetrics(metrics_listen, reactor) if metrics_listen is not None else None
            metrics_listen = None
            self.supervisor = Supervisor(config, endpoints, worker_command, reactor, metrics=self.worker_metrics)
            self.supervisor.setServiceParent(self)
        else:
            for service in self.listeners.values():
                service.setServiceParent(self)
        self._add_metrics_services(metrics_listen, supervising)

    def _add_metrics_services(self, listen: str | None, supervising: bool) -> None:
        """Serve the metrics on `listen`, counting the bytes of open sessions at each
        scrape; a worker (metrics but nowhere to serve them) reports those bytes every
        `TRAFFIC_INTERVAL` seconds instead. A supervisor's endpoint is its `Supervisor`'s."""
        if listen is not None:
            self.metrics.before_scrape.append(self.sessions.report_traffic)
            self.metrics_services.append(MetricsService(listen, self.metrics.scrape, self.reactor))
        elif self.metrics.enabled and not supervising:
            timer = TimerService(TRAFFIC_INTERVAL, self.sessions.report_traffic)
            timer.clock = self.reactor
            self.metrics_services.append(timer)
        for service in self.metrics_services:
            service.setServiceParent(self)

    def _tls_setup(self, build: Callable[[], T], errors: list[str]) -> T | None:
        try:
            return build()
        except TLSSetupError as e:
            errors.append(f"{self.config.source}: {e}")
            return None

    @property
    def reloadables(self) -> list[Any]:
        """Every component SIGHUP reloads: certificates, upstream trust, routers."""
        if self.supervisor is not None:
            return [self.supervisor]  # SIGHUP goes to the workers, which reload
        found = [c for c in (self.server_tls, self.connector.tls) if c is not None]
        return found + [c for r in self.routers for c in components(r) if IReloadable.providedBy(c)]

    def startService(self) -> None:
        _raise_descriptor_limit()
        if self.server_tls is not None and self.supervisor is None:
            if self.server_tls.self_signed:
                self.log.warn(
                    "no [tls] in {source}: serving a self-signed {what}; clients will not trust it",
                    source=self.config.source,
                    what=self.server_tls.describe(),
                )
            else:
                self.log.info("TLS: {what}", what=self.server_tls.describe())
                self.server_tls.warn_expiry()
        super().startService()
        # Signal handlers can only be set from the main thread (an embedding program may
        # run the reactor elsewhere; it can call reload() itself).
        if hasattr(signal, "SIGHUP") and threading.current_thread() is threading.main_thread():
            self._previous_sighup = signal.signal(signal.SIGHUP, self._sighup)
            self._sighup_installed = True

    def _sighup(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.reload)

    def reload(self) -> Deferred[Any]:
        """Reload every reloadable component (what SIGHUP does); fires when all are done."""
        reloadable = self.reloadables
        self.log.info("reload requested: {count} component(s) to reload", count=len(reloadable))
        return DeferredList([Deferred.fromCoroutine(self._reload_one(c)) for c in reloadable])

    async def _reload_one(self, component: Any) -> None:
        try:
            await maybeDeferred(component.reload)
        except Exception:
            # A component keeps its old state when its new one is broken; an exception
            # here is a bug in it, and must not stop the others from reloading.
            self.log.failure("reload of {component!r} failed", component=component)

    def _add_router(self, router: IRouter) -> None:
        if any(r is router for r in self.routers):
            return
        self.routers.append(router)
        for component in components(router):
            # A route cache (routers.cache, not imported here: no backend is) shares.
            share = getattr(component, "share", None)
            if share is not None and self.shared_routes is not None:
                share(self.shared_routes)
            if IService.providedBy(component):
                IService(component).setServiceParent(self)

    def stopService(self) -> Deferred[Any]:
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        Service.stopService(self)
        if self._sighup_installed:
            previous = self._previous_sighup
            signal.signal(signal.SIGHUP, previous if previous is not None else signal.SIG_DFL)
            self._sighup_installed = False
        if self.supervisor is not None:
            await self.supervisor.stopService()  # the workers drain
        await DeferredList([maybeDeferred(s.stopService) for s in self.listeners.values()])
        if len(self.sessions):
            self.log.info(
                "draining {count} session(s) for up to {timeout:g}s",
                count=len(self.sessions),
                timeout=self.config.drain_timeout,
            )
        await self.sessions.drain(self.config.drain_timeout)
        routers = [IService(c) for r in self.routers for c in components(r) if IService.providedBy(c)]
        await DeferredList([maybeDeferred(r.stopService) for r in reversed(routers)])
        if self.store is not None:  # last: draining sessions still count their logins
            await maybeDeferred(self.store.stopService)
        await DeferredList([maybeDeferred(s.stopService) for s in self.metrics_services])
        if self.worker_metrics is not None:  # every worker has exited
            self.worker_metrics.close()


def _server_endpoint(reactor: Any, description: str) -> IStreamServerEndpoint:
    """`serverFromString`; a `systemd:` socket systemd did not pass (only `check` gets
    this far without one) listens nowhere, and says so if asked to."""
    try:
        return serverFromString(reactor, description)
    except (IndexError, KeyError):
        if not description.startswith("systemd:"):
            raise
        return _NoSystemdSocket(description)


@implementer(IStreamServerEndpoint)
class _NoSystemdSocket:
    def __init__(self, description: str) -> None:
        self.description = description

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        return fail(ConfigError([f'listen "{self.description}": no such socket from systemd']))


def _store(config: Config, reactor: Any, errors: list[str]) -> SharedStore:
    """The Redis store of `[redis]` (a secret that cannot be read is in `errors`)."""
    redis = config.redis
    assert redis is not None
    secret = None
    if redis.secret_file is not None:
        try:
            secret = read_secret(redis.secret_file)
        except ValueError as e:
            errors.append(f"{config.source}: redis.secret_file: {e}")
    return SharedStore(redis.address, reactor, timeout=redis.timeout, key_prefix=redis.key_prefix, secret=secret)


def _build(spec: RouterSpec | None, errors: list[str], reactor: Any, password_listeners: list[tuple[str, str]]) -> IRouter | None:
    """`spec`'s router (None with the reasons in `errors`); `password_listeners` are the
    (name, protocol) of the listeners it serves that take password logins."""
    if spec is None:
        return None
    try:
        return spec.build(reactor, password_listeners=password_listeners)
    except ConfigError as e:
        errors.extend(e.errors)
        return None


def makeService(
    config_or_path: Config | Mapping[str, Any] | str | os.PathLike[str],
    router: IRouter | None = None,
    reactor: Any = None,
) -> MailrelayService:
    """
    Build mailrelay's service from a Config, a TOML file path, or parsed TOML data.

    `router`, when given, is the router of every listener that does not name its own
    (it replaces the configuration's `[router]`). Raises `ConfigError` for an invalid
    configuration; nothing listens until the returned service is started.

    With `workers > 1` the service supervises that many worker processes, which run
    the same configuration file or `.tac` file again (`mailrelay.workers`); inside a
    worker it listens on the sockets the supervisor opened.
    """
    if isinstance(config_or_path, Config):
        config = config_or_path
    elif isinstance(config_or_path, Mapping):
        config = parse_config(config_or_path)
    else:
        config = load_config(config_or_path)
    inherited = inherited_sockets()
    command = worker_command(config, router is not None) if inherited is None and config.workers > 1 else None
    return MailrelayService(config, router, reactor, inherited=inherited, worker_command=command)


def _raise_descriptor_limit() -> None:
    """Lift the soft limit on open files to the hard one, as HAProxy and nginx's
    `worker_rlimit_nofile` do: each session holds two descriptors, and systemd's default
    soft limit (1024) would cap a proxy near 500 sessions whatever `max_sessions` says."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, OSError, ValueError):
        pass  # not on this platform, or not allowed: listeners warn if it is too low
