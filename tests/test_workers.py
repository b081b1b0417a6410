"""
`workers = N`: a supervisor opening every listener once and N worker processes serving
them; restarts with backoff, SIGHUP and SIGTERM passed to every worker, the worker log
lines relayed. The supervisor's bookkeeping is tested on a fake reactor; the rest with
`twistd` running the installed package, real sockets on loopback, and real signals.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from twisted.application.service import Service
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock
from twisted.logger import LogEvent, LogLevel, globalLogPublisher
from twisted.python.failure import Failure

from mailrelay import ConfigError, Route, Router, RouteRequest, makeService
from mailrelay.config import parse_config
from mailrelay.workerlog import MAX_LINE, worker_log_line
from mailrelay.workers import (
    LISTEN_FDS,
    InheritedSocket,
    Supervisor,
    inherited_sockets,
    worker_command,
)
from tests.support.net import LogCapture, ThreadedServer, connect, echo, exchange, payload
from tests.support.processes import LISTENING, SHUT_DOWN, TWISTD, WAIT, Process
from tests.support.systemd import ACTIVATE, SOCKET_LINE
from tests.support.workers import alive, frozen, kill_quietly, sessions_by_worker, wait_gone, worker_pid

SOURCE = Path(__file__).resolve().parent.parent


def workers_config(**top: Any) -> Any:
    data = {"listener": [{"name": "relay", "listen": "tcp:0:interface=127.0.0.1", "mode": "splice"}]}
    data.update(top)
    return parse_config(data, "mailrelay.toml")


# -- what a worker is told --------------------------------------------------------------


def test_inherited_sockets_are_read_from_the_environment() -> None:
    assert inherited_sockets({}) is None  # not a worker
    found = inherited_sockets({LISTEN_FDS: json.dumps({"tcp:25:interface=::1": [3, "AF_INET6"], "imap": [4, "AF_UNIX"]})})
    assert found == {
        "tcp:25:interface=::1": InheritedSocket(3, socket.AF_INET6),
        "imap": InheritedSocket(4, socket.AF_UNIX),
    }


@pytest.mark.parametrize("raw", ["", "[3]", '{"relay": [3]}', '{"relay": ["x", "AF_INET"]}', '{"relay": [3, "AF_NOPE"]}'])
def test_a_malformed_socket_list_is_a_configuration_error(raw: str) -> None:
    with pytest.raises(ConfigError, match=LISTEN_FDS):
        inherited_sockets({LISTEN_FDS: raw})


def test_workers_run_the_configuration_file_or_the_tac_file_again(tmp_path: Path) -> None:
    path = tmp_path / "mailrelay.toml"
    path.write_text("")
    config = attrs.evolve(workers_config(workers=2), source=str(path))
    prefix = [sys.executable, "-m", "mailrelay", "worker"]
    assert worker_command(config, False, ["pytest"]) == prefix + ["--config", str(path)]
    assert worker_command(config, True, ["twistd", "-ny", "x.tac"]) == prefix + ["--tac", os.path.abspath("x.tac")]
    assert worker_command(config, False, ["twistd", "--nodaemon", "--python=x.tac"]) == prefix + [
        "--tac",
        os.path.abspath("x.tac"),
    ]


@pytest.mark.parametrize("router_given", [True, False])
def test_what_cannot_reach_a_worker_is_refused(router_given: bool) -> None:
    """A router object, or configuration data that is no file, exists in this process
    only: outside a `.tac` (which each worker runs again), workers could not build it."""
    config = workers_config(workers=2)  # source "mailrelay.toml": no such file here
    with pytest.raises(ConfigError, match=r"workers = 2 with .* needs a \.tac file"):
        worker_command(config, router_given, ["twistd", "-n", "mailrelay", "--config", "mailrelay.toml"])


class Nowhere(Router):
    async def route(self, request: RouteRequest) -> list[Route]:
        return [Route(host="127.0.0.1", port=9)]


def test_make_service_refuses_a_router_object_with_workers_outside_a_tac() -> None:
    with pytest.raises(ConfigError, match=r"router object \(router=\)"):
        makeService({"workers": 2, "listener": [{"listen": "tcp:0", "mode": "splice"}]}, router=Nowhere())


def test_worker_log_lines_carry_their_level() -> None:
    assert worker_log_line(LogLevel.warn, "a\nb") == "warn a\nwarn b\n"


# -- the supervisor's bookkeeping, on a fake reactor ------------------------------------


@attrs.define
class FakeProcess:
    pid: int
    protocol: Any
    signals: list[str] = attrs.Factory(list)

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)

    def end(self, reason: Failure) -> None:
        self.protocol.processEnded(reason)


class ProcessReactor(Clock):
    """A Clock that records spawnProcess calls instead of starting anything."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[FakeProcess] = []
        self.environments: list[dict[str, str]] = []

    def spawnProcess(self, protocol: Any, executable: str, args: list[str], env: dict[str, str], childFDs: Any) -> FakeProcess:
        process = FakeProcess(1000 + len(self.spawned), protocol)
        self.spawned.append(process)
        self.environments.append(env)
        protocol.makeConnection(process)
        return process


def supervisor(reactor: ProcessReactor, **kwargs: Any) -> Supervisor:
    config = workers_config(workers=2, drain_timeout=5)
    service = Supervisor(config, {}, ["mailrelay-worker"], reactor, environ={}, **kwargs)
    service.startService()
    return service


CRASHED = Failure(ProcessTerminated(exitCode=1))


@pytest.fixture
def logged() -> Iterator[list[LogEvent]]:
    capture = LogCapture()
    globalLogPublisher.addObserver(capture)
    yield capture.events
    globalLogPublisher.removeObserver(capture)


def test_a_worker_that_keeps_dying_is_restarted_with_doubling_delays(logged: list[LogEvent]) -> None:
    reactor = ProcessReactor()
    service = supervisor(reactor)
    assert [p.pid for p in reactor.spawned] == service.pids == [1000, 1001]
    delays = []
    worker_one = reactor.spawned[0]
    for _ in range(7):
        worker_one.end(CRASHED)
        (call,) = reactor.getDelayedCalls()
        delays.append(call.getTime() - reactor.seconds())
        reactor.advance(delays[-1])
        worker_one = reactor.spawned[-1]
    assert delays == [1, 2, 4, 8, 16, 30, 30]
    assert len(reactor.spawned) == 9  # the other worker was never touched
    assert reactor.spawned[1].signals == []
    # A worker that has run a while before dying starts the backoff again.
    reactor.advance(60)
    reactor.spawned[-1].end(CRASHED)
    (call,) = reactor.getDelayedCalls()
    assert call.getTime() - reactor.seconds() == 1
    assert any("worker 1 [pid 1000] exited with status 1" in str(e.get("log_format", "")).format(**e) for e in logged)


def test_sighup_and_sigterm_go_to_every_worker_and_stopping_waits_for_them() -> None:
    reactor = ProcessReactor()
    service = supervisor(reactor)
    service.reload()
    assert [p.signals for p in reactor.spawned] == [["HUP"], ["HUP"]]
    stopped = service.stopService()
    assert [p.signals for p in reactor.spawned] == [["HUP", "TERM"], ["HUP", "TERM"]]
    reactor.spawned[0].end(Failure(ProcessDone(0)))
    assert not stopped.called
    assert reactor.getDelayedCalls()[0].getTime() == 5 + 10  # drain_timeout + margin, then SIGKILL
    reactor.advance(15)
    assert reactor.spawned[1].signals[-1] == "KILL"
    assert reactor.spawned[0].signals[-1] == "TERM"  # gone: not signalled again
    reactor.spawned[1].end(Failure(ProcessTerminated(signal=signal.SIGKILL)))
    assert stopped.called
    assert len(reactor.spawned) == 2 and not reactor.getDelayedCalls()  # no restart while stopping


def test_a_restart_pending_at_stop_is_cancelled() -> None:
    reactor = ProcessReactor()
    service = supervisor(reactor)
    reactor.spawned[0].end(CRASHED)
    stopped = service.stopService()
    reactor.spawned[1].end(Failure(ProcessDone(0)))
    assert stopped.called
    reactor.advance(60)
    assert len(reactor.spawned) == 2


class Metrics(Service):
    """The metrics component's side of the supervisor (see mailrelay.metrics)."""

    def __init__(self) -> None:
        self.died: list[int] = []

    def child_environment(self) -> dict[str, str]:
        return {"PROMETHEUS_MULTIPROC_DIR": "/run/metrics"}

    def worker_died(self, pid: int) -> None:
        self.died.append(pid)

    def service(self) -> Service:
        return self


def test_metrics_hooks_see_every_worker_start_and_die() -> None:
    reactor = ProcessReactor()
    metrics = Metrics()
    service = supervisor(reactor, metrics=metrics)
    assert metrics.running  # the endpoint runs in the supervisor
    assert [env["PROMETHEUS_MULTIPROC_DIR"] for env in reactor.environments] == ["/run/metrics"] * 2
    assert [env["MAILRELAY_WORKER"] for env in reactor.environments] == ["1", "2"]
    reactor.spawned[1].end(CRASHED)
    assert metrics.died == [1001]
    service.stopService()
    reactor.spawned[0].end(Failure(ProcessDone(0)))
    assert metrics.died == [1001, 1000] and not metrics.running


def test_socket_activation_variables_stay_with_the_supervisor() -> None:
    reactor = ProcessReactor()
    config = workers_config(workers=1)
    environ = {"LISTEN_FDS": "1", "LISTEN_PID": "1", "LISTEN_FDNAMES": "x", "PATH": "/bin"}
    Supervisor(config, {}, ["w"], reactor, environ=environ).startService()
    (env,) = reactor.environments
    assert env["PATH"] == "/bin" and not {"LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"} & set(env)


def test_worker_lines_are_relayed_with_their_level_and_cut_when_too_long(logged: list[LogEvent]) -> None:
    reactor = ProcessReactor()
    supervisor(reactor)
    protocol = reactor.spawned[0].protocol
    protocol.childDataReceived(1, b"info session 1 ok\nwarn some")
    protocol.childDataReceived(1, b"thing odd\n" + b"info " + b"x" * (3 * MAX_LINE))
    protocol.childDataReceived(1, b"y" * 100 + b"\nerror after the long line\n")
    protocol.childDataReceived(2, b"Traceback (most recent call last):\n")
    protocol.childDataReceived(1, b"no newline at the end")
    reactor.spawned[0].end(CRASHED)
    relayed = [(e["log_level"], e["line"]) for e in logged if e.get("log_format", "").startswith("worker {worker} [pid {pid}]:")]
    assert [(level, line[:30]) for level, line in relayed] == [
        (LogLevel.info, "session 1 ok"),
        (LogLevel.warn, "something odd"),
        (LogLevel.info, "x" * 30),
        (LogLevel.error, "after the long line"),
        (LogLevel.warn, "Traceback (most recent call las"[:30]),
        (LogLevel.info, "no newline at the end"),
    ]
    long = relayed[2][1]
    assert long.endswith(" [line cut]") and len(long) < MAX_LINE + 20


# -- twistd with real workers -----------------------------------------------------------


@pytest.fixture
def upstream() -> Iterator[ThreadedServer]:
    server = ThreadedServer(echo)
    yield server
    server.close()


def workers_toml(upstream_port: int, workers: int = 2, drain_timeout: int = 30, listen: str = "tcp:0:interface=127.0.0.1") -> str:
    return f"""
workers = {workers}
drain_timeout = {drain_timeout}
[router]
type = "static"
routes = [{{ host = "127.0.0.1", port = {upstream_port} }}]
[[listener]]
name = "relay"
listen = "{listen}"
mode = "splice"
"""


@attrs.define
class Workers:
    """A running `twistd mailrelay` with workers, and the port its listener got."""

    process: Process
    port: int
    pids: dict[int, int]

    def all_pids(self) -> list[int]:
        """Every worker pid the supervisor ever started."""
        return [int(pid) for pid in re.findall(r"worker \d+ started: pid (\d+)", self.process.output)]


def start(spawn: Callable[..., Process], tmp_path: Path, toml: str, workers: int = 2) -> Workers:
    (tmp_path / "mailrelay.toml").write_text(toml)
    process = spawn(TWISTD, "-n", "--pidfile=", "mailrelay", "--config", "mailrelay.toml")
    return started(process, workers)


def started(process: Process, workers: int) -> Workers:
    port = int(process.wait_for(LISTENING.format(name="relay")).group(1))
    pids = {index: worker_pid(process, index) for index in range(1, workers + 1)}
    for index, pid in pids.items():  # every worker serving, not only started, on mailrelay's reactor
        process.wait_for(rf"worker {index} \[pid {pid}\]: worker serving \(reactor: LeanEPollReactor\)")
    return Workers(process, port, pids)


@pytest.fixture
def cleanup() -> Iterator[list[Workers]]:
    """Workers started by a test: SIGKILLed at teardown whatever happened (the
    supervisor's own `spawn` cleanup cannot reach them once it is dead)."""
    runs: list[Workers] = []
    yield runs
    for run in runs:
        kill_quietly(run.all_pids(), signal.SIGCONT)
        kill_quietly(run.all_pids(), signal.SIGKILL)


@pytest.fixture
def two_workers(tmp_path: Path, spawn: Any, upstream: ThreadedServer, cleanup: list[Workers]) -> Workers:
    """mailrelay with `workers = 2` in front of `upstream`, killed at teardown (`cleanup`)."""
    run = start(spawn, tmp_path, workers_toml(upstream.port))
    cleanup.append(run)
    return run


def stopped_served(run: Workers, stopped: int, served: int, sessions: int, total_before: int) -> int:
    """With worker `stopped` frozen (SIGSTOP), `sessions` connections all go to `served`."""
    with frozen(run.pids[stopped]):
        for n in range(sessions):
            data = payload(1000, seed=n + 1)
            assert exchange(run.port, data) == data
        counts = sessions_by_worker(run.process, total_before + sessions)
    return counts[(served, run.pids[served])]


@pytest.mark.slow
def test_both_workers_serve_one_listener(two_workers: Workers) -> None:
    """
    Each worker serves the shared socket on its own: with the other frozen, every
    connection goes to it (how the kernel spreads accept() among processes that are
    both awake is its business, and no test should lean on it).
    """
    run = two_workers
    for n in range(10):  # both awake: every connection served, by whichever accepts it
        assert exchange(run.port, payload(100, seed=n + 1)) == payload(100, seed=n + 1)
    counts = sessions_by_worker(run.process, 10)
    assert sum(counts.values()) == 10 and set(counts) <= {(1, run.pids[1]), (2, run.pids[2])}
    by_two = counts[(2, run.pids[2])]
    assert stopped_served(run, stopped=1, served=2, sessions=5, total_before=10) == by_two + 5
    by_one = sessions_by_worker(run.process, 15)[(1, run.pids[1])]
    assert stopped_served(run, stopped=2, served=1, sessions=5, total_before=15) == by_one + 5
    run.process.signal(signal.SIGTERM)
    assert run.process.wait() in (0, -signal.SIGTERM)
    wait_gone(run.pids.values())


@pytest.mark.slow
def test_a_killed_worker_is_replaced_and_the_other_keeps_serving(two_workers: Workers) -> None:
    run = two_workers
    old = run.pids[1]
    os.kill(old, signal.SIGKILL)
    run.process.wait_for(rf"worker 1 \[pid {old}\] was killed by SIGKILL")
    # Meanwhile worker 2 serves everyone.
    assert exchange(run.port, b"while worker 1 is down") == b"while worker 1 is down"
    run.process.wait_for(r"restarting worker 1 in 1s")
    run.pids[1] = worker_pid(run.process, 1, count=2)
    assert run.pids[1] != old and not alive(old)
    run.process.wait_for(rf"worker 1 \[pid {run.pids[1]}\]: worker serving")
    # The new worker serves: with worker 2 frozen, it takes the connections.
    served = stopped_served(run, stopped=2, served=1, sessions=3, total_before=1)
    assert served == 3
    run.process.signal(signal.SIGTERM)
    run.process.wait()
    wait_gone(run.all_pids())


@pytest.mark.slow
def test_sighup_and_sigterm_reach_every_worker_and_open_sessions_drain(two_workers: Workers) -> None:
    run = two_workers
    run.process.signal(signal.SIGHUP)
    for index, pid in run.pids.items():
        run.process.wait_for(rf"worker {index} \[pid {pid}\]: reload requested: 1 component\(s\) to reload")
    # One open session in each worker (the other frozen while it connects).
    sessions = {}
    for index, other in ((1, 2), (2, 1)):
        with frozen(run.pids[other]):
            client = connect(run.port)
            client.sendall(b"first half ")
            assert client.recv(100) == b"first half "
        sessions[index] = client
    run.process.signal(signal.SIGTERM)
    for index, pid in run.pids.items():
        run.process.wait_for(rf"worker {index} \[pid {pid}\]: draining 1 session\(s\)")
    with pytest.raises(ConnectionRefusedError):  # nobody listens any more
        connect(run.port).close()
    for client in sessions.values():  # each transfer finishes during the drain
        with client:
            client.sendall(b"second half")
            assert client.recv(100) == b"second half"
            client.shutdown(socket.SHUT_WR)
            assert client.recv(100) == b""
    status = run.process.wait()
    output = run.process.output
    assert status in (0, -signal.SIGTERM), output
    assert SHUT_DOWN in output and "Traceback" not in output, output
    for index, pid in run.pids.items():
        assert re.search(rf"worker {index} \[pid {pid}\]: session [0-9a-f]+ listener=relay .* up=22 down=22 ", output), output
        assert f"worker {index} [pid {pid}] exited with status 0" in output
    wait_gone(run.pids.values())  # no orphan


@pytest.mark.slow
def test_workers_die_with_a_killed_supervisor(two_workers: Workers) -> None:
    run = two_workers
    run.process.signal(signal.SIGKILL)
    run.process.wait()
    wait_gone(run.pids.values())


@pytest.mark.slow
def test_a_worker_that_cannot_start_backs_off_and_the_other_keeps_serving(two_workers: Workers, tmp_path: Path) -> None:
    run = two_workers
    (tmp_path / "mailrelay.toml").write_text("workers = 2\n[[listener]]\nbroken = true\n")
    run.process.signal(signal.SIGHUP)  # the running workers reload; the supervisor checks the file
    run.process.wait_for(r"mailrelay\.toml is invalid now; a worker started again would not start: .*broken")
    os.kill(run.pids[1], signal.SIGKILL)
    run.process.wait_for(r"restarting worker 1 in 1s")
    run.process.wait_for(r"worker 1 \[pid \d+\]: invalid configuration: .*broken")
    run.process.wait_for(r"restarting worker 1 in 2s")
    run.process.wait_for(r"restarting worker 1 in 4s")
    assert exchange(run.port, b"still served") == b"still served"
    sessions_by_worker(run.process, 1)  # by worker 2, the only one running
    assert re.search(rf"worker 2 \[pid {run.pids[2]}\]: session ", run.process.output)
    assert len(run.all_pids()) == 4  # 2 at start, then one per restart: no spinning
    run.process.signal(signal.SIGTERM)
    run.process.wait()
    wait_gone(run.all_pids())


@pytest.mark.slow
def test_a_unix_socket_outlives_a_worker_restart(
    tmp_path: Path, spawn: Any, upstream: ThreadedServer, cleanup: list[Workers]
) -> None:
    path = tmp_path / "relay.sock"
    (tmp_path / "mailrelay.toml").write_text(workers_toml(upstream.port, listen=f"unix:{path}"))
    process = spawn(TWISTD, "-n", "--pidfile=", "mailrelay", "--config", "mailrelay.toml")
    first = [worker_pid(process, 1), worker_pid(process, 2)]
    run = Workers(process, 0, {1: first[0], 2: first[1]})
    cleanup.append(run)
    for index, pid in run.pids.items():
        process.wait_for(rf"worker {index} \[pid {pid}\]: worker serving")
    os.kill(first[0], signal.SIGTERM)  # a worker stopping on its own stops listening...
    process.wait_for(rf"worker 1 \[pid {first[0]}\] exited with status 0")
    assert path.exists()  # ...but leaves the socket file, still served by the others
    with socket.socket(socket.AF_UNIX) as client:
        client.settimeout(WAIT)
        client.connect(str(path))
        client.sendall(b"over unix")
        assert client.recv(100) == b"over unix"
    process.signal(signal.SIGTERM)
    process.wait()
    assert not path.exists()  # the supervisor removes it when it stops
    wait_gone(run.all_pids())


TAC = """
import os
from twisted.application.service import Application
from mailrelay import Route, Router, makeService

class Upstream(Router):
    async def route(self, request):
        return [Route(host="127.0.0.1", port=int(os.environ["UPSTREAM_PORT"]))]

config = {
    "workers": 2,
    "listener": [{"name": "relay", "listen": "tcp:0:interface=127.0.0.1", "mode": "splice"}],
}
application = Application("mailrelay")
makeService(config, router=Upstream()).setServiceParent(application)
"""


@pytest.mark.slow
def test_a_tac_with_a_python_router_runs_in_every_worker(
    tmp_path: Path, spawn: Any, upstream: ThreadedServer, cleanup: list[Workers]
) -> None:
    (tmp_path / "workers.tac").write_text(TAC)
    process = spawn(TWISTD, "-n", "--pidfile=", "-y", "workers.tac", UPSTREAM_PORT=str(upstream.port))
    run = started(process, 2)
    cleanup.append(run)
    assert f"--tac {tmp_path / 'workers.tac'}" in " ".join(open(f"/proc/{run.pids[1]}/cmdline").read().split("\0"))
    assert stopped_served(run, stopped=1, served=2, sessions=2, total_before=0) == 2
    assert stopped_served(run, stopped=2, served=1, sessions=2, total_before=2) == 2
    process.signal(signal.SIGTERM)
    process.wait()
    wait_gone(run.pids.values())


@pytest.mark.slow
def test_socket_activation_passes_through_to_the_workers(
    tmp_path: Path, spawn: Any, upstream: ThreadedServer, cleanup: list[Workers]
) -> None:
    """systemd's socket (here played by `ACTIVATE`) goes to the supervisor, which hands
    it on: the workers accept on the very socket systemd bound."""
    toml = workers_toml(upstream.port, listen="systemd:domain=INET:index=0")
    (tmp_path / "mailrelay.toml").write_text(toml)
    command = [TWISTD, "-n", "--pidfile=", "mailrelay", "--config", "mailrelay.toml"]
    process = spawn(sys.executable, "-c", ACTIVATE, "50", "relay", "127.0.0.1:0", "--", *command)
    port = int(process.wait_for(SOCKET_LINE.format(index=0)).group(1))
    pids = {index: worker_pid(process, index) for index in (1, 2)}
    run = Workers(process, port, pids)
    cleanup.append(run)
    for index, pid in pids.items():
        process.wait_for(rf"worker {index} \[pid {pid}\]: worker serving")
        assert "LISTEN_PID=" not in open(f"/proc/{pid}/environ").read()
    assert stopped_served(run, stopped=1, served=2, sessions=2, total_before=0) == 2
    assert stopped_served(run, stopped=2, served=1, sessions=2, total_before=2) == 2
    process.signal(signal.SIGTERM)
    assert process.wait() in (0, -signal.SIGTERM)
    wait_gone(pids.values())
