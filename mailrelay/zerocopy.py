"""
Moving a splice's bytes without Python touching them.

When both legs of a splice are plain TCP (no TLS on either side) on a reactor that runs on
file descriptors, the bytes go from one socket into a pipe and from the pipe into the
other socket with `os.splice`: the kernel moves pages, Python only decides when. The
pump is driven by the reactor's readiness events like any transport, through its own
`IReadDescriptor`/`IWriteDescriptor` per socket (a duplicate of the transport's file
descriptor, so that the reactor's registrations of the transport and of the pump never
collide), and keeps the userspace pump's contract (`mailrelay.splice`):

- order and content unchanged: a direction reads again only once what it read has left
  its pipe, so at most one pipe's worth (`PIPE_SIZE`) is in flight per direction, and a
  reader that stops reading stops the writer (back-pressure);
- an end of stream travels across as a half-close, the other direction goes on;
- bytes are counted as they are read, for the session line and the metrics, and every
  read or write moves the idle timer;
- on anything else (a reset, a write to a closed peer, a timeout closing the session) the
  pump hands both connections back to their Twisted transports, with whatever was still
  in a pipe written into the transport's buffer, and the userspace rules apply from
  there: nothing read is dropped.

Pipes are shared by the process (`PipePool`): a direction holds one only while bytes wait
in it, so an idle session holds none, and a busy one does not pay two `pipe2()` per
session.

`write_through()` is the userspace pump's shortcut for the legs that cannot splice (TLS
on the other side): bytes go straight to a plain TCP socket whose transport has nothing
buffered, instead of waiting in Twisted's buffer for the next reactor turn.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable
from typing import Any

from twisted.internet import tcp
from twisted.internet.interfaces import IReactorFDSet, IReadDescriptor, IWriteDescriptor
from twisted.python.failure import Failure
from zope.interface import implementer

try:
    import fcntl

    _SPLICE = os.splice  # Linux 2.6.17+, Python 3.10+
    _FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
    _SET_PIPE_SIZE = fcntl.F_SETPIPE_SZ
    _GET_PIPE_SIZE = fcntl.F_GETPIPE_SZ
    AVAILABLE = True
except (ImportError, AttributeError):  # not Linux
    AVAILABLE = False

PIPE_SIZE = 1024 * 1024
"""Bytes a pipe holds: the most one direction has in flight. Linux's default limit for
an unprivileged process (/proc/sys/fs/pipe-max-size), and what moved a gigabyte with the
least CPU here (256 KiB took a third more). Past the user's pipe quota
(/proc/sys/fs/pipe-user-pages-soft, 64 MiB of capacity: 64 such pipes busy at once)
Linux makes smaller pipes, which still work, with more system calls per megabyte."""

READS_PER_EVENT = 4
"""Reads one readiness event may do while each fills the pipe and empties at once."""

READ_SIZE = 256 * 1024
"""What the userspace pump reads at once from a plain TCP socket (Twisted's default is
64 KiB): fewer reads and writes per megabyte."""


def socket_connection(transport: Any) -> tcp.Connection | None:
    """The plain TCP (or UNIX stream) connection under `transport`, or None when there is
    none or TLS runs on it. Sees through a PROXY-protocol listener's transport, which
    only answers `getPeer()`/`getHost()` differently. (On every write: kept cheap.)"""
    real = transport if isinstance(transport, tcp.Connection) else _socket_transport(transport)
    # Twisted's startTLS sets `TLS` on the connection it turns into a TLS one.
    if real is None or real.TLS:
        return None
    return real


_WRAPS_A_SOCKET: dict[type, bool] = {}
"""Whether a transport class says which transport is its socket's (`socket_transport`)."""


def _socket_transport(transport: Any) -> Any:
    """What `transport` says is its socket's transport, if its own class says so: a
    wrapper that forwards unknown attributes to what it wraps (Twisted's TLS layer
    does) must not answer for the plaintext transport beneath it."""
    if isinstance(transport, tcp.Connection):
        return transport
    kind = type(transport)
    wraps = _WRAPS_A_SOCKET.get(kind)
    if wraps is None:
        wraps = _WRAPS_A_SOCKET[kind] = any("socket_transport" in vars(cls) for cls in kind.__mro__)
    real = transport.socket_transport if wraps else None
    return real if isinstance(real, tcp.Connection) else None


def socket_beneath(transport: Any) -> tcp.Connection | None:
    """The TCP connection at the bottom of `transport`, TLS layers and all, for settings
    of the socket itself (its read size)."""
    for _ in range(4):  # a TLS layer over a PROXY-protocol transport over TCP at most
        if isinstance(transport, tcp.Connection):
            return transport
        transport = _socket_transport(transport) or getattr(transport, "transport", None)
    return None


def _writable(connection: tcp.Connection) -> bool:
    """Open for writing, not on its way to closing, and nothing waiting to be written."""
    return bool(
        connection.connected
        and not connection.disconnecting
        and not connection._writeDisconnecting
        and not getattr(connection, "_aborting", True)
        and _nothing_buffered(connection)
    )


def read_in_large_chunks(transport: Any) -> None:
    """Read `READ_SIZE` bytes at a time from the socket under `transport`."""
    connection = socket_beneath(transport)
    if connection is not None:
        connection.bufferSize = READ_SIZE


def _nothing_buffered(connection: tcp.Connection) -> bool:
    # Twisted keeps what it could not write yet in these; none of them is public API,
    # so a Twisted that renamed them reads as "something buffered" (the safe answer).
    data_buffer = getattr(connection, "dataBuffer", None)
    if data_buffer is None:
        return False
    return len(data_buffer) - getattr(connection, "offset", 0) + getattr(connection, "_tempDataLen", 1) == 0


def write_through(transport: Any, data: bytes) -> None:
    """Write `data` to `transport`, straight to its socket when that is plain TCP with
    nothing buffered before it (what does not fit waits in the transport as usual)."""
    connection = socket_connection(transport)
    if connection is None or not _writable(connection):
        transport.write(data)
        return
    try:
        sent = connection.socket.send(data)
    except OSError:  # would block, or an error the transport's own write will meet
        sent = 0
    if sent < len(data):
        transport.write(data[sent:])


class _Pipe:
    __slots__ = ("read_fd", "size", "write_fd")

    def __init__(self, size: int) -> None:
        self.read_fd, self.write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(self.write_fd, _SET_PIPE_SIZE, size)
        except OSError:  # past the user's pipe quota: the default size still works
            pass
        self.size: int = fcntl.fcntl(self.write_fd, _GET_PIPE_SIZE)

    def close(self) -> None:
        os.close(self.read_fd)
        os.close(self.write_fd)


PIPES_KEPT = 8
"""Empty pipes a process keeps for its next splices (two descriptors each)."""


class PipePool:
    """Empty pipes for the process's zero-copy splices; at most `keep` wait unused."""

    def __init__(self, size: int = PIPE_SIZE, keep: int = PIPES_KEPT) -> None:
        self.size = size
        self.keep = keep
        self._idle: list[_Pipe] = []
        self.created = 0

    def take(self) -> _Pipe:
        if self._idle:
            return self._idle.pop()
        self.created += 1
        return _Pipe(self.size)

    def give(self, pipe: _Pipe) -> None:
        """Take back `pipe`, which must be empty."""
        if len(self._idle) < self.keep:
            self._idle.append(pipe)
        else:
            pipe.close()

    def close(self) -> None:
        idle, self._idle = self._idle, []
        for pipe in idle:
            pipe.close()


POOL = PipePool()


def _descriptor_budget() -> int:
    """How many descriptors the pumps' duplicates may hold at once: a quarter of what
    the process may open, so that zero-copy never takes from accept() and connect()
    what they need (a session beyond it uses the userspace pump)."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):
        return 256
    return 1 << 30 if soft == resource.RLIM_INFINITY else soft // 4


DESCRIPTOR_BUDGET = _descriptor_budget()


def can_splice(*transports: Any) -> bool:
    """Whether a zero-copy pump can carry a splice between `transports` now: plain TCP
    each, on a reactor of file descriptors, open, nothing of theirs waiting to be
    written, and descriptors to spare (`DESCRIPTOR_BUDGET`)."""
    if not AVAILABLE or 2 * ZeroCopyPump.running_pumps + 2 > DESCRIPTOR_BUDGET:
        return False
    for transport in transports:
        connection = socket_connection(transport)
        if connection is None or not IReactorFDSet.providedBy(connection.reactor) or not _writable(connection):
            return False
    return True


class Leg:
    """What the pump needs of one side of the splice (`splice._Side` provides it)."""

    name: str
    transport: Any
    bytes: int
    reading_done: bool
    writing_done: bool


@implementer(IReadDescriptor, IWriteDescriptor)
class _End:
    """One socket of the pump, as the reactor sees it."""

    def __init__(self, pump: ZeroCopyPump, leg: Any) -> None:
        self.pump = pump
        self.leg = leg
        connection = socket_connection(leg.transport)
        assert connection is not None  # can_splice() said so
        self.connection = connection
        self.fd = os.dup(connection.fileno())

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:
        return "zerocopy"

    def doRead(self) -> None:
        self.pump.readable(self)

    def doWrite(self) -> None:
        self.pump.writable(self)

    def connectionLost(self, reason: Failure) -> None:
        # The reactor saw an error or hang-up without readable data, and stopped
        # reading from this descriptor.
        self.pump.hung_up(self)


class _Direction:
    """Bytes from `source` to `target`."""

    __slots__ = ("ended", "in_pipe", "pipe", "source", "target")

    def __init__(self, source: _End, target: _End) -> None:
        self.source = source
        self.target = target
        self.pipe: _Pipe | None = None
        self.in_pipe = 0
        self.ended = False


class ZeroCopyPump:
    """
    Carries a splice between two plain TCP connections with `os.splice` until both
    directions have ended (then `done(None)`) or until it hands the connections back to
    their transports (`stop()`; after a failure, `done(failure)` with the side it
    happened on).

    `activity()` is called whenever bytes are read; `first_end(name)` at each end of
    stream or failure, with the side's name; `done(lost, reason)` once, when the pump is
    over by itself: `(None, None)` when both directions ended, `(leg, failure)` when a
    socket failed, `(None, failure)` when the pump could not go on (no pipe could be
    made) and the connections should carry on without it. The pump has handed the
    connections back before it calls `done`.
    """

    def __init__(
        self,
        client: Any,
        upstream: Any,
        reactor: Any,
        activity: Callable[[], None],
        first_end: Callable[[str], None],
        done: Callable[[Any | None, Failure | None], None],
        pool: PipePool = POOL,
    ) -> None:
        self._reactor = reactor
        self._activity = activity
        self._first_end = first_end
        self._done = done
        self._pool = pool
        # Raises OSError (EMFILE...) when the process has no descriptor left to spare:
        # the caller keeps the userspace pump.
        self._client = _End(self, client)
        try:
            self._upstream = _End(self, upstream)
        except OSError:
            os.close(self._client.fd)
            raise
        self._up = _Direction(self._client, self._upstream)
        self._down = _Direction(self._upstream, self._client)
        self._reading: dict[_End, _Direction] = {self._client: self._up, self._upstream: self._down}
        self._writing: dict[_End, _Direction] = {self._upstream: self._up, self._client: self._down}
        self.running = False

    @property
    def in_flight(self) -> int:
        """Bytes read and not yet written, both directions together."""
        return self._up.in_pipe + self._down.in_pipe

    running_pumps = 0
    """Pumps of this process that hold their duplicate descriptors now."""

    def start(self) -> None:
        self.running = True
        ZeroCopyPump.running_pumps += 1
        for end in (self._client, self._upstream):
            end.connection.stopReading()
            end.connection.stopWriting()
            self._reactor.addReader(end)

    def readable(self, end: _End) -> None:
        direction = self._reading[end]
        # A full pipe that emptied at once means more is probably waiting: read again
        # (a few times) rather than going back to the reactor for the next event.
        for _ in range(READS_PER_EVENT):
            if direction.in_pipe or direction.ended or not self.running:
                return  # a stale event (see `writable`); reading waits for the pipe to empty
            try:
                pipe = self._pool.take()
            except OSError as e:  # no descriptor or pipe left: carry on in userspace
                self.stop()
                self._done(None, Failure(e))
                return
            try:
                count = _SPLICE(end.fd, pipe.write_fd, pipe.size, flags=_FLAGS)
            except BlockingIOError:
                self._pool.give(pipe)
                return
            except OSError as e:
                self._pool.give(pipe)
                self.failed(end, Failure(_connection_error(e)))
                return
            if count == 0:
                self._pool.give(pipe)
                self._end_of_stream(direction)
                return
            end.leg.bytes += count
            direction.pipe, direction.in_pipe = pipe, count
            self._activity()
            self._flush(direction)
            if count < pipe.size:
                return

    def writable(self, end: _End) -> None:
        # An event may be stale: polled for an earlier owner of the same descriptor
        # number, closed and reused while the reactor worked through one batch.
        direction = self._writing[end]
        if self.running and direction.pipe is not None:
            self._flush(direction)

    def hung_up(self, end: _End) -> None:
        """The reactor reported an error on `end` (and stopped reading it). A stale
        event (see `writable`) finds no error on the socket: reading resumes."""
        if not self.running:
            return
        error = end.connection.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            self.failed(end, Failure(_connection_error(OSError(error, os.strerror(error)))))
            return
        direction = self._reading[end]
        if not direction.ended and not direction.in_pipe:
            self._reactor.addReader(end)

    def _flush(self, direction: _Direction) -> None:
        pipe, target = direction.pipe, direction.target
        assert pipe is not None
        try:
            while direction.in_pipe:
                direction.in_pipe -= _SPLICE(pipe.read_fd, target.fd, direction.in_pipe, flags=_FLAGS)
        except BlockingIOError:
            pass
        except OSError as e:
            self.failed(target, Failure(_connection_error(e)))
            return
        if direction.in_pipe:  # the target's socket is full: wait until it takes more
            self._reactor.removeReader(direction.source)
            self._reactor.addWriter(target)
            return
        direction.pipe = None
        self._pool.give(pipe)
        self._reactor.removeWriter(target)
        self._reactor.addReader(direction.source)

    def _end_of_stream(self, direction: _Direction) -> None:
        """The source sent its last byte and everything has reached the target: pass
        the end of stream on (shut down the target's write side)."""
        direction.ended = True
        source, target = direction.source, direction.target
        self._reactor.removeReader(source)
        self._first_end(source.leg.name)
        source.leg.reading_done = True
        try:
            target.connection.socket.shutdown(socket.SHUT_WR)
        except OSError as e:
            self.failed(target, Failure(_connection_error(e)))
            return
        target.leg.writing_done = True
        if self._up.ended and self._down.ended:
            self.stop()
            self._done(None, None)

    def failed(self, end: _End, reason: Failure) -> None:
        """Something went wrong on `end`'s socket: hand back, then report."""
        if not self.running:
            return
        self._first_end(end.leg.name)
        self.stop(lost=end)
        self._done(end.leg, reason)

    def stop(self, lost: _End | None = None) -> None:
        """Hand both connections back to their transports: bytes still in a pipe go into
        the target transport's buffer (dropped if the target is `lost`)."""
        if not self.running:
            return
        self.running = False
        ZeroCopyPump.running_pumps -= 1
        for end in (self._client, self._upstream):
            self._reactor.removeReader(end)
            self._reactor.removeWriter(end)
            os.close(end.fd)
        for direction in (self._up, self._down):
            pipe, direction.pipe = direction.pipe, None
            if pipe is None:
                continue
            left = _drain(pipe, direction.in_pipe)
            direction.in_pipe = 0
            self._pool.give(pipe)
            if left and direction.target is not lost:
                direction.target.leg.transport.write(left)


def _drain(pipe: _Pipe, count: int) -> bytes:
    chunks = []
    while count > 0:
        try:
            chunk = os.read(pipe.read_fd, count)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
        count -= len(chunk)
    return b"".join(chunks)


def _connection_error(error: OSError) -> Exception:
    """The exception Twisted's own transports report for `error`."""
    from twisted.internet import error as twisted_errors

    if error.errno in (errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED, errno.ETIMEDOUT):
        return twisted_errors.ConnectionLost(os.strerror(error.errno or 0))
    return error
