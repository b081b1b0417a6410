"""
What the private mail servers for tests (`postfix.Postfix`, `dovecot.Dovecot`) share:
free loopback ports, REAPER (which outlives and collects every process of an
instance), the stop of forgotten instances at exit, and /proc and file helpers.

Every server starts with `start()` or `with`, and `stop()` (idempotent) leaves nothing
running. The Debian packages are installed by dev/test, and only the slow test tier
starts them.
"""

from __future__ import annotations

import atexit
import os
import socket
import weakref
from typing import Protocol

WAIT = 30.0
"""Upper bound for starting a server or waiting for mail: a hang guard, never a timing assertion."""

SIZE_LIMIT = 64 * 1024 * 1024
"""Largest message either server accepts (the tests move up to 16 MiB)."""


def free_ports(count: int) -> list[int]:
    """`count` distinct loopback ports that were free a moment ago (bound together, then closed)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


REAPER = """
import ctypes, os, sys
# PR_SET_CHILD_SUBREAPER: the processes the master leaves when it exits come here, not to
# PID 1, which may never collect them (a container's) and leaves them listed meanwhile.
ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)
child = os.posix_spawn(sys.argv[1], sys.argv[1:], os.environ)
code = 1
while True:
    try:
        pid, status = os.wait()
    except ChildProcessError:
        sys.exit(code)
    if pid == child:
        code = os.waitstatus_to_exitcode(status)
"""
"""Runs a command and exits, with its status, once it and every process it left have exited."""

NOBODY = 65534
"""The uid and gid Postfix's virtual delivery agent writes maildirs as, and Dovecot's mail processes read them as."""


class Stoppable(Protocol):
    def stop(self) -> None: ...


running_servers: weakref.WeakSet[Stoppable] = weakref.WeakSet()
"""The instances started and not stopped yet: a server adds itself when it launches and
discards itself when it stops."""


@atexit.register
def _stop_all() -> None:
    """A test run that ends without stopping its instances (an interrupt) still stops them."""
    for instance in list(running_servers):
        instance.stop()


def ancestors(path: str) -> list[str]:
    """Every directory above `path`, nearest first."""
    result: list[str] = []
    while True:
        parent = os.path.dirname(path)
        if parent == path:
            return result
        result.append(parent)
        path = parent


def server_environment() -> dict[str, str]:
    """This process's environment for a server's commands: no MAIL_CONFIG or MAIL_DEBUG
    of ours, and the sbin directories on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAIL_CONFIG", "MAIL_DEBUG")}
    env["PATH"] = os.pathsep.join([env.get("PATH", ""), "/usr/sbin", "/usr/bin", "/sbin", "/bin"])
    return env


def remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def read_text(path: str) -> str:
    """A log file's text so far ('' when there is none yet)."""
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


def kill_quietly(pid: int, signal_number: int) -> None:
    try:
        os.kill(pid, signal_number)
    except ProcessLookupError:
        pass


def listening_inodes(port: int) -> list[int]:
    """The inodes of the TCP sockets that listen on the port (any IPv4 address), from /proc/net/tcp."""
    inodes = []
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            local, state = fields[1], fields[3]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                inodes.append(int(fields[9]))
    return inodes


def listeners(port: int) -> int:
    """How many TCP sockets listen on the port (on any IPv4 address), from /proc/net/tcp."""
    return len(listening_inodes(port))
