"""
mailrelay on real sockets but on a test's clock: a reactor whose I/O, threads and name
resolution are the real reactor's and whose time is a `task.Clock`, so that a timeout
test advances mailrelay's timers (`clock.advance(180)`) instead of waiting for them.

Only what asks the given reactor for the time moves with the clock: every mailrelay
timer does. Twisted's own transports keep the real reactor (a TCP connect's own timeout,
TLS's write coalescing), and so does a test's own waiting (`deferLater(reactor, ...)`).
A route to a host *name* would stall: `HostnameEndpoint` schedules its connection
attempts on the reactor it is given, so the tests route to addresses.
"""

from __future__ import annotations

import fcntl
import struct
import termios
from collections.abc import Callable
from typing import Any

from twisted.internet import reactor as global_reactor
from twisted.internet import tcp
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorFDSet
from twisted.internet.task import Clock, deferLater
from zope.interface import directlyProvides, providedBy

POLL = 0.01
"""How often a test looks again for what it waits for (the real reactor runs between)."""


class ClockedReactor:
    """
    `reactor` with its time taken from `clock`: `callLater`, `seconds` and
    `getDelayedCalls` answer from the clock, everything else is `reactor`'s own (listen,
    connect, threads, `callFromThread`, ...). It provides every interface `reactor`
    provides, so that `IReactorTCP.providedBy(...)` and friends hold as they do for it.
    """

    def __init__(self, reactor: Any, clock: Clock) -> None:
        self.reactor = reactor
        self.clock = clock
        directlyProvides(self, *providedBy(reactor))

    def __getattr__(self, name: str) -> Any:
        # Only reached for what this class does not define itself; zope.interface's own
        # attributes must not come from the real reactor (`directlyProvides` answers).
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.reactor, name)

    def callLater(self, delay: float, callable: Callable[..., Any], *args: object, **kw: object) -> IDelayedCall:
        return self.clock.callLater(delay, callable, *args, **kw)

    def seconds(self) -> float:
        return self.clock.seconds()

    def getDelayedCalls(self) -> list[IDelayedCall]:
        return list(self.clock.getDelayedCalls())


def owner(call: IDelayedCall) -> object:
    """The object whose method `call` is to call (None for a plain function): whose
    timer it is."""
    return getattr(getattr(call, "func", None), "__self__", None)


async def eventually(condition: Callable[[], object], limit: int = 6000) -> bool:
    """Let the real reactor run (and the tests' client threads with it) until
    `condition()` holds: True, or False after `limit` looks (a hang guard, one minute by
    default, never a timing assertion)."""
    for _ in range(limit):
        if condition():
            return True
        await deferLater(global_reactor, POLL)
    return bool(condition())


async def let_time_pass(clock: Clock, until: Deferred[Any], limit: int = 6000) -> None:
    """Advance `clock` from one pending call to the next, the real reactor running in
    between, until `until` has fired (or `limit` turns): what a service stopping with
    sessions still open needs, as it waits out its drain timeout on the clock."""
    for _ in range(limit):
        if until.called:
            return
        calls = clock.getDelayedCalls()
        if calls:
            clock.advance(max(0.0, min(c.getTime() for c in calls) - clock.seconds()))
        await deferLater(global_reactor, POLL)


def connections(peer_port: int, reactor: Any = global_reactor) -> list[tcp.Connection]:
    """The TCP connections `reactor` reads from or writes to whose peer is loopback port
    `peer_port`: mailrelay's side of a test client's connection (the client socket's
    own port) or of an upstream connection (the upstream's listening port). A connection
    paused both ways is in neither set."""
    fds = IReactorFDSet(reactor)
    found: list[tcp.Connection] = []
    for selectable in [*fds.getReaders(), *fds.getWriters()]:
        if isinstance(selectable, tcp.Connection) and selectable.connected and selectable not in found:
            if getattr(selectable.getPeer(), "port", None) == peer_port:
                found.append(selectable)
    return found


def reading_from(peer_port: int, reactor: Any = global_reactor) -> bool:
    """Whether `reactor` reads from a connection to `peer_port`: mailrelay has connected
    to that upstream and waits for its words; or that client has not yet half-closed
    (after an end of stream Twisted stops reading a half-closeable connection), nor been
    paused."""
    readers = IReactorFDSet(reactor).getReaders()
    return any(c in readers for c in connections(peer_port, reactor))


def all_read(peer_port: int, reactor: Any = global_reactor) -> bool:
    """Whether `reactor` has a connection to `peer_port` and has read every byte that
    reached it (none waits in its socket's receive queue). On loopback, what a client's
    `sendall` returned from has reached it: once this holds, mailrelay has read it."""
    found = connections(peer_port, reactor)
    return bool(found) and all(_unread(c) == 0 for c in found)


def _unread(connection: tcp.Connection) -> int:
    count: int = struct.unpack("i", fcntl.ioctl(connection.fileno(), termios.FIONREAD, b"\0" * 4))[0]
    return count


def connecting_to(port: int, reactor: Any = global_reactor) -> bool:
    """Whether `reactor` waits for a TCP connection to `port` to be answered."""
    return any(isinstance(c, tcp.Client) and not c.connected and c.addr[1] == port for c in IReactorFDSet(reactor).getWriters())


def writing_to(peer_port: int, reactor: Any = global_reactor) -> bool:
    """Whether `reactor` holds bytes for a connection to `peer_port` that its peer has
    not taken yet."""
    writers = IReactorFDSet(reactor).getWriters()
    return any(c in writers for c in connections(peer_port, reactor))
