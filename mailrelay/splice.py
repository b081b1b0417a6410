"""
The two-way byte pump between a client and its upstream.

Invariants:
- bytes leave in the order and the exact form they arrived, nothing added or dropped;
- each transport is the streaming producer of the other, so a side that cannot keep
  up pauses reading on the other side: memory per session stays bounded by the
  transports' buffer size, not by the payload;
- an end of stream (half-close) travels across: when one peer stops writing, the other
  peer's write side is shut down once everything before it is delivered, and the
  opposite direction keeps flowing until it ends too;
- a connection that is lost outright closes the other one after its buffered bytes
  have been written (or aborts it, if its peer has not read them `close_grace`
  seconds later).

`SpliceableProtocol` is the protocol of either leg before and during the splice: until
a `Splice` adopts it, it keeps what it receives (and notes an end of stream), so no byte
that arrives while the route is decided or the upstream is logged into is lost.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IPushProducer,
    IReactorTime,
    ISSLTransport,
    ITCPTransport,
    ITransport,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from .timers import cancel
from .zerocopy import ZeroCopyPump, can_splice, read_in_large_chunks, socket_connection, write_through


def set_nodelay(transport: ITransport) -> None:
    """Turn Nagle's algorithm off: with delayed ACKs it costs ~40 ms per exchange when
    a peer writes a command or message in several pieces."""
    if ITCPTransport.providedBy(transport):
        transport.setTcpNoDelay(True)


def can_half_close(transport: ITransport) -> bool:
    """
    Whether shutting down only our write side is possible: on plain TCP, yes. Under TLS
    the TCP half-close would cut the stream beneath the TLS layer without its
    close_notify (TLS wrappers pass `loseWriteConnection` through to the socket), so a
    TLS leg closes fully instead.
    """
    return (
        ITCPTransport.providedBy(transport)
        and not ISSLTransport.providedBy(transport)
        and not isinstance(transport, TLSMemoryBIOProtocol)
    )


class PeerClosed(Exception):
    """The peer closed the connection while a line or bytes were awaited from it."""

    def __init__(self, peer: str) -> None:
        super().__init__(f"{peer} closed the connection")
        self.peer = peer


class LineTooLong(Exception):
    """The peer sent a longer line than the reader accepts."""

    def __init__(self, peer: str, max_length: int) -> None:
        super().__init__(f"{peer} sent a line longer than {max_length} bytes")
        self.peer = peer


@implementer(IHalfCloseableProtocol)
class SpliceableProtocol(Protocol):
    """
    A connection that keeps what it receives until a Splice adopts it.

    Keeping is bounded: past `pending_limit` bytes the transport is paused, and the
    splice resumes it. Subclasses that speak a protocol before the splice (front-ends,
    upstream login steps) read and consume `pending` themselves.
    """

    pending_limit = 64 * 1024
    peer = "peer"
    """Who is at the other end, for error messages: "client" or "upstream"."""
    transport: Any  # a TCP transport, or any ITransport with pause/resume and abortConnection

    linger_timeout = 5.0
    """Seconds `close_lingering()` keeps reading (and dropping) what the peer still sends."""

    def __init__(self) -> None:
        self.pending = bytearray()
        self.read_closed = False
        self._linger: Any = None
        """The timer of a lingering close in progress (see `close_lingering()`)."""
        self.lost_reason: Failure | None = None
        self._paused_for_pending = False
        self._held = False
        """Reading is paused because the peer cannot take more now (`hold()`)."""
        self._side: _Side | None = None
        self._waiting: Deferred[None] | None = None
        self._lost: list[Deferred[None]] = []

    def _wake(self) -> None:
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.callback(None)

    async def more(self) -> None:
        """Wait until more bytes arrive in `pending`; raise PeerClosed if none will."""
        if self.read_closed or self.lost_reason is not None:
            raise PeerClosed(self.peer)
        self._waiting = Deferred()
        await self._waiting

    async def read_line(self, max_length: int = 8192) -> bytes:
        """The next line from `pending` (waiting for it), with its line ending."""
        while True:
            end = self.pending.find(b"\n", 0, max_length)
            if end >= 0:
                line = bytes(self.pending[: end + 1])
                del self.pending[: end + 1]
                self.pendingConsumed()
                return line
            if len(self.pending) >= max_length:
                raise LineTooLong(self.peer, max_length)
            await self.more()

    async def read_exactly(self, count: int) -> bytes:
        """The next `count` bytes from `pending` (waiting for them)."""
        while len(self.pending) < count:
            await self.more()
        data = bytes(self.pending[:count])
        del self.pending[:count]
        self.pendingConsumed()
        return data

    def connectionMade(self) -> None:
        set_nodelay(self.transport)

    def dataReceived(self, data: bytes) -> None:
        if self._side is not None:
            self._side.received(data)
            return
        if self._linger is not None:
            return  # closing: dropped unread
        self.pending += data
        self.pendingReceived()
        self._wake()
        if len(self.pending) >= self.pending_limit and not self._paused_for_pending:
            self._paused_for_pending = True
            if not self._held:
                self.transport.pauseProducing()

    def pendingReceived(self) -> None:
        """Called when bytes were added to `pending` before the splice; override to parse them."""

    def pendingConsumed(self) -> None:
        """Call after taking bytes out of `pending`: reading resumes once there is room."""
        if self._paused_for_pending and len(self.pending) < self.pending_limit:
            self._paused_for_pending = False
            if not self._held:
                self.transport.resumeProducing()

    def hold(self) -> None:
        """Stop reading until `release()`: what this connection delivers goes to a peer
        that cannot take more now. Independent of the pause for a full `pending`."""
        if not self._held:
            self._held = True
            if not self._paused_for_pending:
                self.transport.pauseProducing()

    def release(self) -> None:
        if self._held:
            self._held = False
            if not self._paused_for_pending:
                self.transport.resumeProducing()

    def readConnectionLost(self) -> None:
        if self._side is not None:
            self._side.read_closed()
        elif self._linger is not None:
            self.transport.loseConnection()  # the peer has closed too: done lingering
        else:
            self.read_closed = True
            self.pendingReceived()
            self._wake()

    def writeConnectionLost(self) -> None:
        if self._side is not None:
            self._side.write_closed()

    def close_lingering(self, clock: IReactorTime) -> None:
        """
        Close after what was written, as the peer will read it: closing a TCP socket
        with unread bytes in it makes the kernel reset the connection, and a reset can
        destroy the last reply before the peer reads it (a client that pipelined a
        command after the one refused). So: end our side of the stream (after the
        buffered bytes), then read and drop what the peer still sends until it closes
        too, for at most `linger_timeout` seconds. Without a socket that can be half
        closed (TLS, a transport in memory) this is a plain close.
        """
        if self._linger is not None or self._side is not None:
            return
        if socket_connection(self.transport) is None:
            self.transport.loseConnection()
            return
        self._linger = clock.callLater(self.linger_timeout, self._linger_expired)
        self.pending.clear()
        self._held = self._paused_for_pending = False
        self.transport.resumeProducing()
        self.transport.loseWriteConnection()
        if self.read_closed:
            self.transport.loseConnection()

    def _linger_expired(self) -> None:
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        cancel(self._linger)
        if self._side is not None:
            self._side.lost(reason)
        else:
            self.lost_reason = reason
            self.lostBeforeSplice(reason)
            self._wake()
            lost, self._lost = self._lost, []
            for waiting in lost:
                waiting.callback(None)

    def when_lost(self) -> Deferred[None]:
        """Fires (never fails) once the connection is gone, at once if it is. For a
        relay that reads through `pending` and closes the connection itself (SMTP's);
        a connection adopted by a `Splice` reports its end to the Splice instead."""
        if self.lost_reason is not None:
            return succeed(None)
        waiting: Deferred[None] = Deferred()
        self._lost.append(waiting)
        return waiting

    def lostBeforeSplice(self, reason: Failure) -> None:
        """The connection ended before any splice adopted it."""

    def attach(self, side: _Side) -> None:
        """
        Deliver to `side` (one leg of a `Splice`) from now on instead of keeping: what
        was kept goes first, then the end of stream or the loss if either happened
        already. Reading resumes if it was paused for a full `pending`.
        """
        self._side = side
        if self._paused_for_pending:
            self._paused_for_pending = False
            if not self._held:
                self.transport.resumeProducing()
        early, self.pending = bytes(self.pending), bytearray()
        if early:
            side.received(early)
        if self.lost_reason is not None:
            side.lost(self.lost_reason)
        elif self.read_closed:
            side.read_closed()


@implementer(IPushProducer)
class Pacer:
    """
    The producer registered with one connection's transport on behalf of the protocol
    that feeds it: when the transport's buffer fills, `protocol` stops reading
    (`hold()`) until it drains. For relays that read what they forward through
    `pending` instead of adopting both legs into a `Splice`.
    """

    def __init__(self, protocol: SpliceableProtocol) -> None:
        self.protocol = protocol

    def pauseProducing(self) -> None:
        self.protocol.hold()

    def resumeProducing(self) -> None:
        self.protocol.release()

    def stopProducing(self) -> None:
        pass


@attrs.define
class SpliceResult:
    """How a splice ended."""

    bytes_up: int
    """Bytes from the client delivered towards the upstream."""
    bytes_down: int
    """Bytes from the upstream delivered towards the client."""
    outcome: str
    """`closed` (both sides ended), `idle-timeout`, or the reason given to `abort()`."""
    ended_by: str | None
    """`client` or `upstream`: which side closed or reset first (None for timeouts, aborts)."""
    reason: str | None = None
    """Why the session ended, when more needs saying than `ended_by` (a relay's refusal)."""


ZERO_COPY_TRIES = 100
"""Reactor turns a splice waits for its legs' buffers to empty before it stays in userspace."""


class _Side:
    """One leg of a splice: what happens when its peer reads, ends or vanishes."""

    def __init__(self, splice: Splice, name: str, protocol: SpliceableProtocol) -> None:
        self.splice = splice
        self.name = name
        self.protocol = protocol
        self.transport: Any = protocol.transport
        self.peer: _Side = self  # set by Splice
        self.bytes = 0
        self.reading_done = False
        self.writing_done = False
        self.gone = False
        self.paced = False
        """Whether our transport has the peer's transport registered as its producer."""

    def stop_pacing(self) -> None:
        """Unregister the peer as our producer: a paused producer keeps a transport
        from finishing a close or a half-close, and the peer is done anyway."""
        if self.paced:
            self.paced = False
            self.transport.unregisterProducer()

    def received(self, data: bytes) -> None:
        self.bytes += len(data)
        self.splice.last_activity = self.splice.clock.seconds()
        write_through(self.peer.transport, data)

    def read_closed(self) -> None:
        """Our peer will send nothing more: pass the end of stream on."""
        self.reading_done = True
        self.splice.note_first_end(self.name)
        self.peer.finish_writing()
        self._close_if_done()

    def finish_writing(self) -> None:
        """Shut down our write side once what is buffered has been sent."""
        if self.gone or self.writing_done:
            return
        self.stop_pacing()
        if can_half_close(self.transport):
            self.transport.loseWriteConnection()
        else:
            self.writing_done = True
            self.transport.loseConnection()

    def write_closed(self) -> None:
        self.writing_done = True
        self._close_if_done()

    def _close_if_done(self) -> None:
        if self.reading_done and self.writing_done and not self.gone:
            self.transport.loseConnection()

    def lost(self, reason: Failure) -> None:
        self.splice.stop_pump()  # Twisted closed the socket under it (an abort from elsewhere)
        self.gone = True
        self.splice.note_first_end(self.name)
        peer = self.peer
        if not peer.gone:
            peer.stop_pacing()
            peer.transport.loseConnection()
            self.splice.abort_later()
        self.splice.side_gone()


class Splice:
    """
    Pumps bytes between two adopted connections until both have ended.

    A session with no byte in either direction for `idle_timeout` seconds is closed.

    `start()` returns a Deferred that fires with a `SpliceResult` once both
    connections are closed; it never fails.
    """

    def __init__(
        self,
        client: SpliceableProtocol,
        upstream: SpliceableProtocol,
        clock: IReactorTime,
        idle_timeout: float,
        close_grace: float = 10.0,
        zero_copy: bool = True,
    ) -> None:
        """`zero_copy`: move the bytes with `os.splice` when both legs are plain TCP
        (`mailrelay.zerocopy`); otherwise, or when False, through Python."""
        self._client = _Side(self, "client", client)
        self._upstream = _Side(self, "upstream", upstream)
        self._client.peer, self._upstream.peer = self._upstream, self._client
        self.clock = clock
        self._idle_timeout = idle_timeout
        self.close_grace = close_grace
        self._idle_call: Any = None
        self._abort_call: Any = None
        self._outcome = "closed"
        self._ended_by: str | None = None
        self._done: Deferred[SpliceResult] = Deferred()
        self.last_activity = clock.seconds()
        self._zero_copy = zero_copy
        self._pump: ZeroCopyPump | None = None
        self._zero_copy_tries = ZERO_COPY_TRIES

    @property
    def pump(self) -> str:
        """Which pump carries the bytes now: "zero-copy" or "userspace"."""
        return "zero-copy" if self._pump is not None and self._pump.running else "userspace"

    @property
    def bytes_up(self) -> int:
        return self._client.bytes

    @property
    def bytes_down(self) -> int:
        return self._upstream.bytes

    def start(self) -> Deferred[SpliceResult]:
        self._pace()
        for side in (self._client, self._upstream):
            side.protocol.attach(side)
            read_in_large_chunks(side.transport)
        if not self._done.called:
            self._idle_call = self.clock.callLater(self._idle_timeout, self._check_idle)
            if self._zero_copy and all(socket_connection(side.transport) for side in (self._client, self._upstream)):
                self._try_zero_copy()
        return self._done

    def _try_zero_copy(self) -> None:
        """Hand the bytes to a zero-copy pump once nothing is buffered on either leg
        (bytes kept before the splice are still being written by the transports: try
        again on the reactor's next turns, the userspace pump carrying them meanwhile)."""
        sides = (self._client, self._upstream)
        if self._done.called or any(side.gone or side.reading_done or side.writing_done for side in sides):
            return
        reactor: Any = getattr(socket_connection(self._client.transport), "reactor", None)
        if can_splice(self._client.transport, self._upstream.transport):
            try:
                pump = ZeroCopyPump(self._client, self._upstream, reactor, self._touched, self.note_first_end, self._pump_done)
            except OSError:  # no descriptor to spare now: this session stays in userspace
                return
            for side in sides:
                side.stop_pacing()
            self._pump = pump
            pump.start()
        elif self._zero_copy_tries > 0 and reactor is not None:
            self._zero_copy_tries -= 1
            reactor.callLater(0, self._try_zero_copy)

    def _pace(self) -> None:
        """Make each transport the other's producer (the userspace pump's back-pressure)."""
        for side in (self._client, self._upstream):
            if not side.paced:
                side.transport.registerProducer(side.peer.transport, True)
                side.paced = True

    def _touched(self) -> None:
        self.last_activity = self.clock.seconds()

    def _pump_done(self, lost: _Side | None, reason: Failure | None) -> None:
        """The zero-copy pump is over: both directions ended (close both connections),
        or a socket failed (it is dropped as Twisted drops a failed connection; the
        other one closes after what it still has to write)."""
        if lost is not None:
            lost.transport.abortConnection()
        elif reason is None:
            for side in (self._client, self._upstream):
                side.transport.loseConnection()
        else:  # the pump could not go on: the userspace pump takes over
            self._pace()
            for side in (self._client, self._upstream):
                side.transport.resumeProducing()

    def stop_pump(self) -> None:
        """Hand the connections back to their transports, if a zero-copy pump has them."""
        if self._pump is not None:
            self._pump.stop()

    def abort(self, outcome: str) -> None:
        """Drop both connections now, discarding what is buffered (drain timeout)."""
        if self._outcome == "closed":
            self._outcome = outcome
        self.stop_pump()
        for side in (self._client, self._upstream):
            if not side.gone:
                side.transport.abortConnection()

    def close(self, outcome: str) -> None:
        """Close both connections after their buffered bytes are written; abort
        whatever is still open `close_grace` seconds later (a peer that reads nothing)."""
        if self._outcome == "closed":
            self._outcome = outcome
        self.stop_pump()
        for side in (self._client, self._upstream):
            if not side.gone:
                side.stop_pacing()
                side.transport.loseConnection()
        self.abort_later()

    def abort_later(self) -> None:
        """Abort whatever is still open `close_grace` seconds from now."""
        if self._abort_call is None:
            self._abort_call = self.clock.callLater(self.close_grace, self.abort, self._outcome)

    def _check_idle(self) -> None:
        self._idle_call = None
        remaining = self.last_activity + self._idle_timeout - self.clock.seconds()
        if remaining > 0:
            self._idle_call = self.clock.callLater(remaining, self._check_idle)
        else:
            self.close("idle-timeout")

    def note_first_end(self, name: str) -> None:
        if self._ended_by is None:
            self._ended_by = name

    def side_gone(self) -> None:
        if self._client.gone and self._upstream.gone and not self._done.called:
            cancel(self._idle_call)
            cancel(self._abort_call)
            self._idle_call = self._abort_call = None
            ended_by = self._ended_by if self._outcome == "closed" else None
            self._done.callback(SpliceResult(self.bytes_up, self.bytes_down, self._outcome, ended_by))
