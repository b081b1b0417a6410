"""
`python -m mailrelay worker`: one worker process, started by the supervisor
(`mailrelay.workers.Supervisor`), never by hand.

It builds mailrelay from the configuration file (`--config`) or by running the same
`.tac` file again (`--tac`: `makeService` sees the worker's environment), listens on the
sockets it inherited, logs to stdout in the form the supervisor relays, and runs until
SIGTERM (draining its sessions) or until its supervisor dies.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from typing import Any, TextIO

from twisted.application.service import IService, loadApplication
from twisted.logger import ILogObserver, LogEvent, Logger, LogLevel, eventAsText, globalLogBeginner
from zope.interface import implementer

from .config import ConfigError, load_config
from .service import MailrelayService
from .workerlog import worker_log_line
from .workers import SUPERVISOR_PID, inherited_sockets

log = Logger()

PR_SET_PDEATHSIG = 1


@implementer(ILogObserver)
class WorkerLogObserver:
    """
    Writes every event as `LEVEL text` lines (no timestamp: the supervisor adds its own).

    While the reactor runs, what one turn of it logged leaves in one write, at the end of
    the turn: a busy worker wakes its supervisor once per turn rather than once per
    session line. Otherwise (starting, stopping) each event is written at once.
    """

    def __init__(self, out: TextIO, reactor: Any = None) -> None:
        self.out = out
        self.reactor = reactor
        self._flushing: Any = None

    def __call__(self, event: LogEvent) -> None:
        text = eventAsText(event, includeTimestamp=False, includeSystem=False)
        if text is None:
            return
        level = event.get("log_level", LogLevel.info)
        self.out.write(worker_log_line(level, text))
        if self.reactor is None or not self.reactor.running:
            self.out.flush()
        elif self._flushing is None:
            self._flushing = self.reactor.callLater(0, self.flush)

    def flush(self) -> None:
        self._flushing = None
        self.out.flush()


def _die_with_supervisor() -> bool:
    """Ask the kernel for SIGTERM when the supervisor dies (Linux), so that no worker
    outlives it; False when it is already gone."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: a worker then outlives a supervisor killed with SIGKILL
    expected = os.environ.get(SUPERVISOR_PID)
    return expected is None or os.getppid() == int(expected)


def install_reactor() -> None:
    """Run on `mailrelay.reactor`'s reactor where epoll exists and no reactor is installed
    yet (else on whatever `twisted.internet.reactor` gives)."""
    if "twisted.internet.reactor" in sys.modules:
        return
    try:
        from .reactor import install
    except ImportError:  # no epoll: not Linux
        return
    install()


def run(config: str | None, tac: str | None, reactor: Any = None) -> int:
    """Run one worker until it is stopped; the exit status."""
    inherited = inherited_sockets()
    if inherited is None:
        print("mailrelay worker: workers are started by mailrelay's supervisor (workers = N), not by hand", file=sys.stderr)
        return 2
    if not _die_with_supervisor():
        return 1
    # Until the service installs its own handler, a SIGHUP (whose default action kills)
    # is kept and delivered again once the worker serves.
    hangups: list[int] = []
    signal.signal(signal.SIGHUP, lambda number, frame: hangups.append(number))
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    observer = WorkerLogObserver(sys.stdout, reactor)
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    try:
        if tac is not None:
            service = IService(loadApplication(tac, "python"))
        else:
            assert config is not None
            service = MailrelayService(load_config(config), reactor=reactor, inherited=inherited)
        service.privilegedStartService()
    except ConfigError as e:
        for line in e.errors:
            log.error("invalid configuration: {line}", line=line)
        return 1
    except Exception:
        log.failure("worker could not start")
        return 1

    def start() -> None:
        service.startService()
        log.info("worker serving (reactor: {reactor})", reactor=type(reactor).__name__)
        if hangups:
            os.kill(os.getpid(), signal.SIGHUP)

    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()
    # Under systemd's default KillMode every process of the unit gets SIGTERM as well
    # as the one the supervisor sends: a second one, arriving once the reactor has put
    # back the default handlers, must not turn a clean stop into a death by signal.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    observer.flush()
    log.info("worker stopped")
    return 0
