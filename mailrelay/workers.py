"""
`workers = N`: one supervising process, N worker processes serving every listener.

The supervisor opens every listener's socket once, before twistd drops privileges
(ports below 1024, `systemd:` sockets passed in by socket activation), never accepts on
them, and starts N workers that inherit them (fd 3, 4, ... in listener order). Every
worker is a whole mailrelay (one reactor, its own sessions) accepting on the same
sockets: the kernel hands each connection to one of them, and a connection waiting in
the accept queue of a worker that dies is taken by another, not lost.

Contracts:

- A worker that exits while the supervisor runs is logged and started again after a
  backoff: `restart_delay`, doubling up to `max_restart_delay` while it keeps dying
  within `stable_after` seconds of its start, back to `restart_delay` once it has run
  longer. A worker that cannot start at all therefore costs one spawn per 30 s, and the
  others keep serving.
- SIGHUP to the supervisor (its `reload()`) is SIGHUP to every worker; the supervisor
  itself reloads nothing.
- Stopping the supervisor sends SIGTERM to every worker (each drains its sessions for
  `drain_timeout`), SIGKILL to those still running `KILL_MARGIN` seconds after that, and
  fires when every worker has exited; no worker is started once stopping has begun.
- Every line a worker writes (stdout and stderr) is logged again by the supervisor,
  prefixed `worker N [pid P]:`, at the level the worker gave it (`workerlog`).
- A worker learns its sockets from `MAILRELAY_LISTEN_FDS` (JSON: listener name ->
  [fd, address family]), and dies with its supervisor (Linux: PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any, Protocol

import attrs
from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import AdoptedStreamServerEndpoint
from twisted.internet.error import ProcessDone
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IStreamServerEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from .config import Config, ConfigError, load_config
from .listening import listen_failed
from .timers import cancel
from .workerlog import WorkerOutput

__all__ = [
    "LISTEN_FDS",
    "WORKER",
    "InheritedSocket",
    "InheritedSocketEndpoint",
    "Supervisor",
    "WorkerMetrics",
    "inherited_sockets",
    "worker_command",
]

WORKER = "MAILRELAY_WORKER"
"""Environment variable: the worker's number (1..N); set only in workers."""
LISTEN_FDS = "MAILRELAY_LISTEN_FDS"
"""Environment variable: JSON {listener name: [fd, address family name]}."""
SUPERVISOR_PID = "MAILRELAY_SUPERVISOR_PID"
"""Environment variable: the supervisor's pid, so a worker started after its supervisor
died notices (its parent is then someone else) and exits."""
FIRST_FD = 3
KILL_MARGIN = 10.0
"""Seconds past `drain_timeout` a worker gets to exit after SIGTERM before SIGKILL."""
SYSTEMD_VARIABLES = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")
"""Socket activation's variables, meant for the supervisor only."""


@attrs.frozen
class InheritedSocket:
    """A listening socket a worker inherited from its supervisor."""

    fd: int
    family: socket.AddressFamily

    def endpoint(self, reactor: Any) -> IStreamServerEndpoint:
        return InheritedSocketEndpoint(reactor, self.fd, self.family)


def inherited_sockets(environ: Mapping[str, str] = os.environ) -> dict[str, InheritedSocket] | None:
    """The sockets of a worker by listener name; None outside a worker."""
    raw = environ.get(LISTEN_FDS)
    if raw is None:
        return None
    try:
        return {name: InheritedSocket(int(fd), socket.AddressFamily[family]) for name, (fd, family) in json.loads(raw).items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError([f"{LISTEN_FDS} is malformed ({e}): workers are started by mailrelay's supervisor only"]) from None


class InheritedSocketEndpoint(AdoptedStreamServerEndpoint):
    """Twisted's adopted-socket endpoint, except that a Unix socket stopped in one worker
    keeps serving in the others."""

    def listen(self, factory: Any) -> Deferred[IListeningPort]:
        listening: Deferred[IListeningPort] = super().listen(factory)
        if self.addressFamily == socket.AF_UNIX:
            listening.addCallback(_share_unix_socket)
        return listening


def _share_unix_socket(port: Any) -> Any:
    # twisted.internet.unix.Port, even for a socket it adopted (Twisted 26.10), unlinks
    # the socket's file when it stops listening and calls shutdown() on the socket, which
    # stops it listening in every process that holds it. Its TCP port skips the shutdown
    # for adopted sockets (`_shouldShutdown`), and never unlinks an abstract-namespace
    # path; both are private attributes, so test_workers checks that this still works.
    port._shouldShutdown = False
    port._bindPath = b"\0"
    return port


class WorkerMetrics(Protocol):
    """What the metrics component needs from the supervisor (all optional to use)."""

    def child_environment(self) -> dict[str, str]:
        """Variables set in every worker's environment (a multiprocess metrics folder)."""

    def worker_died(self, pid: int) -> None:
        """A worker process has exited (its metrics files can be merged)."""

    def service(self) -> IService | None:
        """A service the supervisor runs (the aggregated metrics endpoint), or None."""


def worker_command(config: Config, router_given: bool, argv: Sequence[str] = sys.argv) -> list[str]:
    """
    The command line of a worker: the same `.tac` file when twistd runs one (`twistd -y`),
    else the configuration file. A configuration given as Python data or a Python
    router object outside a `.tac` cannot reach a worker: ConfigError.
    """
    tac = _tac_file(argv)
    base = [sys.executable, "-m", "mailrelay", "worker"]
    if tac is not None:
        return base + ["--tac", os.path.abspath(tac)]
    if not router_given and os.path.isfile(config.source):
        return base + ["--config", os.path.abspath(config.source)]
    what = "a router object (router=)" if router_given else "a configuration that is not a file"
    raise ConfigError(
        [
            f"{config.source}: workers = {config.workers} with {what} needs a .tac file"
            " run by `twistd -y`, which each worker runs again"
        ]
    )


def _tac_file(argv: Sequence[str]) -> str | None:
    """The `.tac` file of a `twistd -y FILE` command line, if that is what runs."""
    from twisted.python import usage
    from twisted.scripts.twistd import ServerOptions

    class TacOptions(ServerOptions):
        @property
        def subCommands(self) -> list[Any]:
            return []  # `twistd mailrelay ...` runs no .tac; and loading plugins is not needed

    options = TacOptions()
    try:
        options.parseOptions(list(argv[1:]))
    except (usage.UsageError, SystemExit, ValueError):
        return None
    python = options["python"]
    return str(python) if python else None


class SupervisorSocket(Factory):
    """The factory of the supervisor's own listening ports, which never accept (their
    reading is stopped at once); a connection it somehow gets is closed."""

    noisy = False

    class protocol(TwistedProtocol):
        def connectionMade(self) -> None:
            assert self.transport is not None
            self.transport.loseConnection()


@attrs.define
class _Worker:
    index: int
    process: Any = None
    pid: int | None = None
    started: float = 0.0
    delay: float = 0.0
    restart: IDelayedCall | None = None
    exited: Deferred[None] | None = None


class Supervisor(MultiService):
    """Opens the listeners' sockets and keeps `config.workers` workers serving them."""

    log = Logger()

    def __init__(
        self,
        config: Config,
        endpoints: Mapping[str, IStreamServerEndpoint],
        command: Sequence[str],
        reactor: Any,
        metrics: WorkerMetrics | None = None,
        restart_delay: float = 1.0,
        max_restart_delay: float = 30.0,
        stable_after: float = 60.0,
        environ: Mapping[str, str] = os.environ,
    ) -> None:
        super().__init__()
        self.config = config
        self.endpoints = dict(endpoints)
        self.command = list(command)
        self.reactor = reactor
        self.metrics = metrics
        self.restart_delay = restart_delay
        self.max_restart_delay = max_restart_delay
        self.stable_after = stable_after
        self.environ = dict(environ)
        self.ports: dict[str, IListeningPort] = {}
        self.workers = [_Worker(index) for index in range(1, config.workers + 1)]
        self.stopping = False
        if metrics is not None and (extra := metrics.service()) is not None:
            extra.setServiceParent(self)

    @property
    def pids(self) -> list[int]:
        """The pids of the workers running now."""
        return [w.pid for w in self.workers if w.pid is not None]

    def privilegedStartService(self) -> None:
        for name, endpoint in self.endpoints.items():
            self.ports[name] = self._open(name, endpoint)
        super().privilegedStartService()

    def _open(self, name: str, endpoint: IStreamServerEndpoint) -> IListeningPort:
        listening = endpoint.listen(SupervisorSocket())
        result: list[Any] = []
        listening.addBoth(result.append)
        if not result or isinstance(result[0], Failure):
            # Raised synchronously so that a port in use stops the start (every endpoint
            # mailrelay listens on answers at once).
            if result:
                raise listen_failed(f'listener "{name}"', result[0].value)
            raise RuntimeError(f"listener {name}: its endpoint did not listen at once")
        port: IListeningPort = result[0]
        port.stopReading()  # type: ignore[attr-defined]
        host: Any = port.getHost()
        if hasattr(host, "port"):
            address = f"{host.host}:{host.port}"
        else:  # a Unix socket
            address = os.fsdecode(getattr(host, "name", b"") or b"")
        self.log.info(
            "listener {listener} on {address} (shared by {workers} workers)",
            listener=name,
            address=address,
            workers=len(self.workers),
        )
        return port

    def startService(self) -> None:
        if not self.ports:
            self.privilegedStartService()
        super().startService()
        if self.config.redis is None:
            self.log.warn(
                "{workers} workers and no [redis]: login limits and the route cache are each worker's own",
                workers=len(self.workers),
            )
        for worker in self.workers:
            self._spawn(worker)

    def _environment(self, worker: _Worker) -> dict[str, str]:
        env = {k: v for k, v in self.environ.items() if k not in SYSTEMD_VARIABLES}
        if self.metrics is not None:
            env.update(self.metrics.child_environment())
        fds = {}
        for offset, (name, port) in enumerate(self.ports.items()):
            family = port.socket.family  # type: ignore[attr-defined]
            fds[name] = [FIRST_FD + offset, socket.AddressFamily(family).name]
        env[LISTEN_FDS] = json.dumps(fds)
        env[WORKER] = str(worker.index)
        env[SUPERVISOR_PID] = str(os.getpid())
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def _spawn(self, worker: _Worker) -> None:
        worker.restart = None
        if self.stopping:
            return
        child_fds: dict[int, int | str] = {0: "w", 1: "r", 2: "r"}
        for offset, port in enumerate(self.ports.values()):
            child_fds[FIRST_FD + offset] = port.fileno()  # type: ignore[attr-defined]
        worker.started = self.reactor.seconds()
        worker.exited = Deferred()
        try:
            worker.process = self.reactor.spawnProcess(
                WorkerOutput(partial(self._relay, worker), partial(self._ended, worker)),
                self.command[0],
                self.command,
                env=self._environment(worker),
                childFDs=child_fds,
            )
        except Exception:
            self.log.failure("worker {worker}: could not be started", worker=worker.index)
            self._ended(worker, None)
            return
        worker.pid = worker.process.pid
        self.log.info("worker {worker} started: pid {pid}", worker=worker.index, pid=worker.pid)

    def _relay(self, worker: _Worker, level: LogLevel, pid: int | None, line: str) -> None:
        self.log.emit(level, "worker {worker} [pid {pid}]: {line}", worker=worker.index, pid=pid, line=line)

    def _ended(self, worker: _Worker, reason: Failure | None) -> None:
        pid, worker.pid, worker.process = worker.pid, None, None
        exited, worker.exited = worker.exited, None
        how = "could not start" if reason is None else _exit_text(reason)
        if pid is not None:
            if self.metrics is not None:
                self.metrics.worker_died(pid)
            if self.stopping:
                self.log.info("worker {worker} [pid {pid}] {how}", worker=worker.index, pid=pid, how=how)
            else:
                self.log.warn("worker {worker} [pid {pid}] {how}", worker=worker.index, pid=pid, how=how)
        if not self.stopping:
            ran = self.reactor.seconds() - worker.started
            if ran >= self.stable_after or worker.delay == 0:
                worker.delay = self.restart_delay
            else:
                worker.delay = min(worker.delay * 2, self.max_restart_delay)
            self.log.info("restarting worker {worker} in {delay:g}s", worker=worker.index, delay=worker.delay)
            worker.restart = self.reactor.callLater(worker.delay, self._spawn, worker)
        if exited is not None:
            exited.callback(None)

    def reload(self) -> Deferred[None]:
        """SIGHUP every worker (each reloads its certificates and routers)."""
        self.log.info("reload: passing SIGHUP to {count} worker(s)", count=len(self.pids))
        self._signal_all("HUP")
        if "--config" in self.command:
            # Running workers keep the configuration they started with; one started
            # again reads the file as it is now: say so if that would fail.
            path = self.command[self.command.index("--config") + 1]
            try:
                load_config(path)
            except ConfigError as e:
                self.log.warn(
                    "{path} is invalid now; a worker started again would not start: {errors}",
                    path=path,
                    errors="; ".join(e.errors),
                )
        return succeed(None)

    def _signal_all(self, name: str) -> None:
        for worker in self.workers:
            if worker.process is not None:
                try:
                    worker.process.signalProcess(name)
                except Exception:  # it has just exited; processEnded will say so
                    pass

    def stopService(self) -> Deferred[Any]:
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        self.stopping = True
        for worker in self.workers:
            cancel(worker.restart)
            worker.restart = None
        running = [w.exited for w in self.workers if w.exited is not None]
        self.log.info(
            "stopping {count} worker(s): they drain for up to {timeout:g}s",
            count=len(running),
            timeout=self.config.drain_timeout,
        )
        # Closed first rather than after the drain: once the workers have closed theirs
        # too, new connections are refused, as they are when one process stops.
        ports, self.ports = list(self.ports.values()), {}
        for port in ports:
            await Deferred.fromCoroutine(_stop_listening(port))
        self._signal_all("TERM")
        kill = self.reactor.callLater(self.config.drain_timeout + KILL_MARGIN, self._kill_all)
        await DeferredList(running)
        cancel(kill)
        await super().stopService()

    def _kill_all(self) -> None:
        self.log.warn(
            "workers still running {timeout:g}s after SIGTERM: killing them", timeout=self.config.drain_timeout + KILL_MARGIN
        )
        self._signal_all("KILL")


async def _stop_listening(port: IListeningPort) -> None:
    result = port.stopListening()
    if isinstance(result, Deferred):
        await result


def _exit_text(reason: Failure) -> str:
    value = reason.value
    if isinstance(value, ProcessDone):
        return "exited with status 0"
    signal_number = getattr(value, "signal", None)
    if signal_number:
        return f"was killed by {signal.Signals(signal_number).name}"
    return f"exited with status {getattr(value, 'exitCode', '?')}"
