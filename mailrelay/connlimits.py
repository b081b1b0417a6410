"""
Connection limits of one listener (`[listener.connection_limits]`), decided at accept.

A new connection is turned away when the listener already carries `max_sessions`
sessions, when its client already has `max_per_client` of them, or when its client has
opened connections faster than `max_rate_per_client` a minute. A client is counted in
the unit one subscriber holds: an IPv4 address, an IPv6 /64, and an IPv4-mapped IPv6
address (`::ffff:192.0.2.7`) as its IPv4 address. Clients in `exempt` networks (a
webmail host, a NAT in front of a whole office) and peers without an IP address (a
UNIX socket: a local process) are limited by `max_sessions` only, which protects the
process's file descriptors from everyone.

Invariants:
- A connection that is let in holds a `Slot` until `Slot.release()` (its connection
  closed, whatever way); releasing twice counts once. A connection turned away holds
  nothing: it is counted in no table and opens no session.
- The rate is a token bucket per client: `max_rate_per_client` connections may be
  opened at once, then one more every `60 / max_rate_per_client` seconds. Only
  connections let in take a token, so a client hammering past its limit still gets its
  share once it slows down, and a client that backs off is let in again by itself.
- Memory is bounded: the per-client counts hold only clients with sessions open (at
  most `max_sessions` of them); the rate table forgets a client once its bucket has
  refilled, and never holds more than `ConnectionLimiter.max_clients` (the least
  recently seen forgotten first: a forgotten client starts with a full bucket); the
  log keeps at most `max_bursts` clients apart, counting the others together.
- Refusals are logged once per burst, not once per connection: the first refusal of a
  client (or of the listener, for `max_sessions`) is a warning at once, later ones are
  counted and summed up every `report_interval` seconds while they go on; a burst is
  over after a whole interval without a refusal. The one summary timer runs only
  while some burst is open, and `stop()` (the listener stopping) cancels it after
  logging what was still uncounted.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Callable

import attrs
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from .configtable import Table
from .guard import Network, client_block
from .timers import cancel

__all__ = ["ConnectionLimiter", "ConnectionLimits", "Slot", "read_connection_limits"]

MAX_SETTING = 1_000_000

KEYS = ("max_sessions", "max_per_client", "max_rate_per_client", "exempt")


@attrs.frozen
class ConnectionLimits:
    """`[listener.connection_limits]`; 0 turns a limit off."""

    max_sessions: int = 5000
    """Sessions open on the listener at once, exempt clients included. Each session
    holds two file descriptors (client and upstream): 5000 of them need 10000, which a
    process may open once `ulimit -n` (systemd's LimitNOFILE) is raised; under the
    limit, a flood ends in refused connections rather than in failing accept() calls
    and upstream connections for everyone."""
    max_per_client: int = 200
    """Sessions open at once per client (IPv4 address, IPv6 /64). IMAP clients keep 5
    or more connections per account (Thunderbird 5, plus a phone's): 200 lets about 40
    users share one NAT address; larger NATs and webmail hosts belong in `exempt`.
    Postfix allows 50 per client for SMTP alone. One address still cannot fill more
    than a 25th of the default `max_sessions`."""
    max_rate_per_client: int = 300
    """New connections per client per minute (a bucket of this many, refilled at this
    rate): a whole office's clients starting together fit, a client reconnecting in a
    loop or a connection flood from one address does not. Webmail hosts, which open a
    connection per page view, belong in `exempt`."""
    exempt: tuple[Network, ...] = ()
    """Client networks not limited per client (nor in rate); `max_sessions` still
    counts them."""

    def describe(self) -> str:
        """The settings as `check` shows them."""

        def shown(value: int, unit: str = "") -> str:
            return f"{value}{unit}" if value else "off"

        return (
            f"max_sessions={shown(self.max_sessions)} max_per_client={shown(self.max_per_client)}"
            f" max_rate_per_client={shown(self.max_rate_per_client, '/min')}"
            f" exempt={','.join(str(network) for network in self.exempt) or 'none'}"
        )


def read_connection_limits(table: Table, exempt: tuple[Network, ...] | None) -> ConnectionLimits | None:
    """
    The limits of a `[listener.connection_limits]` table, every
    other key in it reported as unknown; `exempt` is its `exempt` key already read (the
    syntax of `[login_limits] exempt`; None when it was invalid). None when anything is
    invalid (the errors are recorded in the table's `Errors`).
    """
    default = ConnectionLimits()
    values = dict(
        max_sessions=table.integer("max_sessions", default.max_sessions, minimum=0, maximum=MAX_SETTING),
        max_per_client=table.integer("max_per_client", default.max_per_client, minimum=0, maximum=MAX_SETTING),
        max_rate_per_client=table.integer("max_rate_per_client", default.max_rate_per_client, minimum=0, maximum=MAX_SETTING),
    )
    table.consume("exempt")
    table.finish()
    if None in values.values() or exempt is None:
        return None
    return ConnectionLimits(exempt=exempt, **values)


class Slot:
    """A connection let in: counted against its listener (and its client) until released."""

    def __init__(self, limiter: ConnectionLimiter, client: str | None) -> None:
        self._limiter: ConnectionLimiter | None = limiter
        self.client = client
        """The client's key (`guard.client_block`), or None when it is not counted per
        client (exempt, or not an IP address)."""

    def release(self) -> None:
        """The connection closed; only the first call counts."""
        limiter, self._limiter = self._limiter, None
        if limiter is not None:
            limiter._release(self.client)


@attrs.define
class _Burst:
    """Refusals of one client (or of the listener as a whole) not yet over."""

    limit: str
    """The limit the latest refusal hit, as `name=value`."""
    since: float
    """When the last line about this burst was logged."""
    last: float
    """When the latest refusal happened."""
    silent: int = 0
    """Refusals since the last line about this burst."""


_LISTENER = ""
"""The burst key of refusals at `max_sessions` (whoever the client)."""
_OTHERS = "*"
"""The burst key of clients past `max_bursts`, counted together."""


class ConnectionLimiter:
    """Decides at accept whether a listener takes a connection, and counts those it took."""

    log = Logger()
    max_clients = 100_000
    """Clients whose rate is remembered at most (a few hundred bytes each)."""
    max_bursts = 1000
    """Clients whose refusals are logged apart at most; the others are summed up together."""
    report_interval = 60.0
    """Seconds between the summaries of a burst of refusals."""

    def __init__(
        self, limits: ConnectionLimits, listener: str, clock: IReactorTime, hit: Callable[[str], object] | None = None
    ) -> None:
        """`hit`: told the name of the limit (`max_sessions`...) each refusal hit (the metrics)."""
        self.limits = limits
        self.listener = listener
        self.clock = clock
        self.hit = hit
        self.sessions = 0
        """Connections let in and not released yet."""
        self._per_client: dict[str, int] = {}
        """Connections open per client key (only keys with some)."""
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()
        """[tokens, when computed] per client key, least recently updated first."""
        self._bursts: dict[str, _Burst] = {}
        self._report: IDelayedCall | None = None
        self._stopped = False

    def client_key(self, host: str) -> str | None:
        """The unit `host` is limited in (`guard.client_block`), or None when it is not
        limited per client: in an `exempt` network, or not an IP address."""
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return None  # a UNIX socket: a local process
        if self.limits.exempt:
            addresses: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [address]
            if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
                addresses.append(address.ipv4_mapped)
            if any(a in network for a in addresses for network in self.limits.exempt):
                return None
        return client_block(host)

    def clients(self) -> dict[str, int]:
        """Connections open per limited client (a copy, for tests and reports)."""
        return dict(self._per_client)

    def admit(self, host: str) -> Slot | None:
        """
        A connection from `host` was accepted: let it in (its `Slot`, to be released when
        it closes) or turn it away (None; the refusal is counted for the log). Checking
        and counting happen at once.
        """
        limits = self.limits
        now = self.clock.seconds()
        if limits.max_sessions and self.sessions >= limits.max_sessions:
            self._refused(_LISTENER, f"max_sessions={limits.max_sessions}", now)
            return None
        key = self.client_key(host)
        bucket: list[float] | None = None
        if key is not None:
            if limits.max_per_client and self._per_client.get(key, 0) >= limits.max_per_client:
                self._refused(key, f"max_per_client={limits.max_per_client}", now)
                return None
            if limits.max_rate_per_client:
                bucket = self._bucket(key, now)
                if bucket[0] < 1:
                    self._refused(key, f"max_rate_per_client={limits.max_rate_per_client}/min", now)
                    return None
        if bucket is not None:
            bucket[0] -= 1
        self.sessions += 1
        if key is not None:
            self._per_client[key] = self._per_client.get(key, 0) + 1
        return Slot(self, key)

    def _release(self, key: str | None) -> None:
        self.sessions -= 1
        if key is not None:
            left = self._per_client[key] - 1
            if left:
                self._per_client[key] = left
            else:
                del self._per_client[key]

    # The rate

    @property
    def _refill(self) -> float:
        """Tokens a bucket gains per second."""
        return self.limits.max_rate_per_client / 60.0

    def _bucket(self, key: str, now: float) -> list[float]:
        """`key`'s bucket, refilled up to `now`, as the most recently seen; stale buckets
        (refilled full: no different from none) and those past `max_clients` forgotten."""
        capacity = float(self.limits.max_rate_per_client)
        bucket = self._buckets.pop(key, None)
        if bucket is None:
            bucket = [capacity, now]
        else:
            bucket[0] = min(capacity, bucket[0] + (now - bucket[1]) * self._refill)
            bucket[1] = now
        while self._buckets:
            oldest = next(iter(self._buckets.values()))
            full = oldest[0] + (now - oldest[1]) * self._refill >= capacity
            if not full and len(self._buckets) < self.max_clients:
                break
            self._buckets.popitem(last=False)
        self._buckets[key] = bucket
        return bucket

    def rate_table_size(self) -> int:
        """Clients whose rate is remembered now."""
        return len(self._buckets)

    # The log

    def _refused(self, key: str, limit: str, now: float) -> None:
        if self.hit is not None:
            self.hit(limit.partition("=")[0])
        burst = self._bursts.get(key)
        if burst is None and key not in (_LISTENER, _OTHERS) and len(self._bursts) >= self.max_bursts:
            key, burst = _OTHERS, self._bursts.get(_OTHERS)
        if burst is not None:
            burst.silent += 1
            burst.last = now
            burst.limit = limit
        else:
            self._bursts[key] = _Burst(limit=limit, since=now, last=now)
            self.log.warn(
                "listener {listener}: turning connections away{whom} ({limit})",
                listener=self.listener,
                client=self._client_field(key),
                whom=self._whom(key),
                limit=limit,
            )
        if self._report is None and not self._stopped:
            self._report = self.clock.callLater(self.report_interval, self._summarise)

    @staticmethod
    def _client_field(key: str) -> str | None:
        """The `client` field of a log event: the client's key, None for the listener and
        for the others counted together."""
        return None if key in (_LISTENER, _OTHERS) else key

    def _whom(self, key: str) -> str:
        if key == _LISTENER:
            return ""
        if key == _OTHERS:
            return f" from more clients (past {self.max_bursts} reported apart, counted together)"
        return f" from {key}"

    def _summarise(self, final: bool = False) -> None:
        """Log what each open burst refused since its last line; forget bursts that have
        been quiet a whole interval; go on while any is open (never once `final`)."""
        self._report = None
        now = self.clock.seconds()
        for key, burst in list(self._bursts.items()):
            if burst.silent:
                self.log.warn(
                    "listener {listener}: turned away {count} more connection{s}{whom} in the last {seconds:.0f}s ({limit})",
                    listener=self.listener,
                    client=self._client_field(key),
                    count=burst.silent,
                    s="" if burst.silent == 1 else "s",
                    whom=self._whom(key),
                    seconds=now - burst.since,
                    limit=burst.limit,
                )
                burst.silent = 0
                burst.since = now
            elif final or now - burst.last >= self.report_interval:
                del self._bursts[key]
        if final:
            self._bursts.clear()
        elif self._bursts and not self._stopped:
            self._report = self.clock.callLater(self.report_interval, self._summarise)

    def bursts(self) -> dict[str, int]:
        """Refusals not logged yet, per burst key ("" for `max_sessions`)."""
        return {key: burst.silent for key, burst in self._bursts.items()}

    def stop(self) -> None:
        """The listener stopped: log what was still uncounted, and leave no timer behind
        (a later refusal, which a stopped listener cannot have, would start none)."""
        self._stopped = True
        cancel(self._report)
        self._report = None
        self._summarise(final=True)

    def start(self) -> None:
        """The listener (re)started: refusals are summed up again (from the next one on)."""
        self._stopped = False
