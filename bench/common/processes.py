"""
The processes a benchmark starts, and the CPU they use.

Every child runs in a process group of its own and gets SIGTERM when the bench process
dies (PR_SET_PDEATHSIG), so `Children.stop_all()` can end it and whatever it forked by
group id, and nothing outlives a bench that is killed outright. CPU time is read from
/proc, per process group, so that a server's forked workers count too.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import resource
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent.parent
"""bench/: what a `python -m common.X` child needs on its path."""


def _libc() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


_LIBC = _libc()


def die_with_parent() -> None:
    """In a child before exec: get SIGTERM when the bench process dies (Linux)."""
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _proc_stats() -> Any:
    """(fields of /proc/PID/stat from field 3, `state`, on) for every process."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        yield stat[stat.rfind(b")") + 2 :].split()


def cpu_of_group(pgid: int, reaped: bool = False) -> float:
    """
    CPU seconds (user+system) used so far by the live processes of a process group; with
    `reaped`, also by the children they have collected after they exited (cutime, cstime):
    for a server that forks a short-lived process per connection, such as Dovecot.
    """
    # fields[0] is field 3 (state): pgrp is field 5, utime 14, stime 15, cutime 16, cstime 17.
    ticks = sum(int(f[11]) + int(f[12]) + (int(f[13]) + int(f[14]) if reaped else 0) for f in _proc_stats() if int(f[2]) == pgid)
    return ticks / os.sysconf("SC_CLK_TCK")


def _signal_group_and_wait(proc: subprocess.Popen[Any], sig: int, grace: float) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        pass


def _group_alive(pgid: int) -> bool:
    return any(int(f[2]) == pgid and f[0] != b"Z" for f in _proc_stats())


def machine_busy() -> float:
    """CPU seconds all cores of the machine spent on anything but idling so far (/proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal ...: idle, iowait and steal are not work done here.
    busy = sum(fields[:8]) - fields[3] - fields[4] - fields[7]
    return busy / os.sysconf("SC_CLK_TCK")


def own_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _child_setup(setup: Callable[[], None] | None) -> Callable[[], None]:
    if setup is None:
        return die_with_parent

    def both() -> None:
        die_with_parent()
        setup()

    return both


class Children:
    """Every process this script started; `stop_all()` ends them by process group id."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[Any]] = []
        self.members: list[subprocess.Popen[Any]] = []
        """Processes in the group of one of `procs` (`popen_group`): stopped with it."""
        self.workers: list[multiprocessing.process.BaseProcess] = []

    def popen(self, argv: list[str], setup: Callable[[], None] | None = None, **kwargs: Any) -> subprocess.Popen[Any]:
        """`argv` in a process group of its own; `setup` runs in the child before the exec."""
        proc = subprocess.Popen(argv, start_new_session=True, preexec_fn=_child_setup(setup), **kwargs)
        self.procs.append(proc)
        return proc

    def popen_group(
        self, argv: list[str], leader: subprocess.Popen[Any] | None = None, setup: Callable[[], None] | None = None, **kwargs: Any
    ) -> subprocess.Popen[Any]:
        """
        As `popen`, but in a new process group of this session (a group of another session
        cannot be joined), or with `leader` (started so) in its group: its CPU counts with
        the leader's, and `stop(leader)` ends it too.
        """
        proc = subprocess.Popen(argv, process_group=leader.pid if leader else 0, preexec_fn=_child_setup(setup), **kwargs)
        (self.members if leader else self.procs).append(proc)
        return proc

    def python(self, module: str, args: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """`python -m module args` (a module of this package, e.g. `common.upstream`), as `popen`."""
        path = os.pathsep.join(p for p in (str(BENCH), os.environ.get("PYTHONPATH", "")) if p)
        return self.popen([sys.executable, "-m", module, *args], env={**os.environ, "PYTHONPATH": path}, **kwargs)

    def stop(self, proc: subprocess.Popen[Any], grace: float = 5.0) -> None:
        """SIGTERM to the process's own group (pgid == its pid), SIGKILL to what is left."""
        if proc.poll() is None:
            _signal_group_and_wait(proc, signal.SIGTERM, grace)
        # Members of its group still alive (nginx workers, forked upstream servers, or
        # the process itself if SIGTERM was not enough): the group id cannot have been
        # reused while they exist.
        if proc.poll() is None or _group_alive(proc.pid):
            _signal_group_and_wait(proc, signal.SIGKILL, grace)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()

    def stop_all(self) -> None:
        for worker in self.workers:
            if worker.is_alive():
                worker.terminate()
        for worker in self.workers:
            worker.join(2)
            if worker.is_alive():
                worker.kill()
                worker.join(2)
        for proc in reversed(self.procs):
            self.stop(proc)
        for proc in self.members:  # their groups are gone: reap them
            if proc.poll() is None:
                proc.kill()
            proc.wait()
