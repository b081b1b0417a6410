"""
mailrelay with `workers = N` as a child process: what its supervisor's log says about
the workers (their pids, the sessions each served), and waiting for processes to go.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from tests.support.processes import WAIT, Process

STARTED = r"worker {index} started: pid (\d+)"
SESSION = r"worker (\d+) \[pid (\d+)\]: session [0-9a-f]+ listener={listener} "


def worker_pid(process: Process, index: int, count: int = 1) -> int:
    """The pid of the `count`th start of worker `index`, waiting for it."""
    return int(process.wait_for(STARTED.format(index=index), count=count).group(1))


def sessions_by_worker(process: Process, total: int, listener: str = "relay") -> Counter[tuple[int, int]]:
    """Once the supervisor has relayed `total` session lines of `listener`: how many
    each worker wrote, by (worker number, pid)."""
    pattern = SESSION.format(listener=re.escape(listener))
    process.wait_for(pattern, count=total)
    return Counter((int(m.group(1)), int(m.group(2))) for m in re.finditer(pattern, process.output))


def state(pid: int) -> str | None:
    """The process state letter of `pid` (R, S, T, Z...), None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return None


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie does not: it has exited and waits to be collected)."""
    return state(pid) not in (None, "Z", "X")


@contextmanager
def frozen(pid: int) -> Iterator[None]:
    """`pid` stopped (SIGSTOP, and seen stopped, so that it cannot accept a connection
    made inside), then continued."""
    os.kill(pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + WAIT
        while state(pid) != "T":
            if time.monotonic() > deadline:
                raise AssertionError(f"{pid} did not stop: {state(pid)}")
            time.sleep(0.01)
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def wait_gone(pids: Iterable[int], timeout: float = WAIT) -> None:
    """Wait until none of `pids` runs (a hang guard, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    left = [pid for pid in pids if alive(pid)]
    while left:
        if time.monotonic() > deadline:
            raise AssertionError(f"still running after {timeout:g}s: {left}")
        time.sleep(0.05)
        left = [pid for pid in left if alive(pid)]


def kill_quietly(pids: Iterable[int], number: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, number)
        except ProcessLookupError:
            pass
