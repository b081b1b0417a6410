"""
A worker's log, carried to its supervisor: the worker writes every event as lines on
its stdout, each starting with the event's level (`worker_log_line`); the supervisor
reads them (`WorkerOutput`) and logs each again at that level, so that one stream
(`twistd --logfile`, the journal) holds every process's lines.

A worker cannot make its supervisor buffer without limit: a line longer than
`MAX_LINE` bytes is relayed cut, and the rest of it dropped.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.protocol import ProcessProtocol
from twisted.logger import LogLevel
from twisted.python.failure import Failure

__all__ = ["LEVELS", "MAX_LINE", "WorkerOutput", "worker_log_line"]

MAX_LINE = 16384
"""Longest line relayed whole, in bytes."""
LEVELS = {level.name: level for level in LogLevel.iterconstants()}
"""The level names a worker's stdout lines start with."""


def worker_log_line(level: LogLevel, text: str) -> str:
    """How a worker writes one log event for its supervisor: every line of it starting
    with its level's name."""
    return "".join(f"{level.name} {line}\n" for line in (text.splitlines() or [""]))


class WorkerOutput(ProcessProtocol):
    """
    Reads a worker's stdout and stderr line by line; calls `relay(level, pid, line)` for
    each line (stdout: at the level it starts with; stderr, where only what escapes the
    logging goes, such as an interpreter's crash: at warn), then `ended(reason)` when
    the process has exited, after its last lines.
    """

    def __init__(self, relay: Callable[[LogLevel, int | None, str], None], ended: Callable[[Failure], None]) -> None:
        self.relay = relay
        self.ended = ended
        self.pid: int | None = None
        self.buffers: dict[int, bytearray] = {}
        self.cutting: set[int] = set()
        """The descriptors whose current line was relayed cut: the rest is dropped."""

    def connectionMade(self) -> None:
        self.pid = getattr(self.transport, "pid", None)

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        buffer = self.buffers.setdefault(childFD, bytearray())
        buffer += data
        while (end := buffer.find(b"\n")) >= 0:
            line = bytes(buffer[:end])
            del buffer[: end + 1]
            if childFD in self.cutting:
                self.cutting.discard(childFD)  # the end of a line already relayed cut
            else:
                self._relay(childFD, line)
        if len(buffer) > MAX_LINE:
            if childFD not in self.cutting:
                self._relay(childFD, bytes(buffer[:MAX_LINE]), cut=True)
                self.cutting.add(childFD)
            buffer.clear()

    def _relay(self, fd: int, raw: bytes, cut: bool = False) -> None:
        text = raw.decode("utf-8", "replace").rstrip("\r")
        level = LogLevel.info if fd == 1 else LogLevel.warn
        name, _, rest = text.partition(" ")
        if fd == 1 and name in LEVELS:
            level, text = LEVELS[name], rest
        if cut:
            text += " [line cut]"
        self.relay(level, self.pid, text)

    def processEnded(self, reason: Failure) -> None:
        for fd, buffer in self.buffers.items():
            if buffer and fd not in self.cutting:
                self._relay(fd, bytes(buffer))
            buffer.clear()
        self.ended(reason)
