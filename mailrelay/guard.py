"""
Brute-force defence: logins counted per client address and per user, across every
listener of the process.

Per client: once an address has `max_per_client` failed logins within the last
`window` seconds *plus logins in flight* (let through to the Router and not answered
yet), its next logins are refused with the protocol's temporary failure (after `delay`
seconds) without asking the Router: a guesser learns nothing, and the auth service is
spared the load. Counting the logins in flight means that N guesses sent in parallel
cannot all pass the check before the first of them has failed.

Per user: a user is never locked out, only slowed down. Once a user has
`max_per_user` failed logins within the window (failures only: a mail client's own
parallel connections must not slow each other down), each of its next logins is held
back `delay * 2**excess` seconds (excess: how far past the limit the count is), at most
`max_delay`, and then goes to the Router as usual. A guesser
spread over many addresses is slowed down; the owner, from an address under its own
limit, still logs in with the right password.

Addresses in `exempt` (a webmail host that logs in for all its users from one
address) are neither counted nor limited per client. Their failed logins still count
for the user: a webmail can be abused for guessing too.

The counts forget each failure `window` seconds after it happened, so a refused
address or a slowed-down user is let in at full speed again without anyone's
intervention. User names are counted casefolded, surrounding whitespace stripped.

What counts as a failed login: a Router's `Reject` of a request that carried a user
(wrong password, unknown account), and an upstream refusing the login mailrelay made
on the client's behalf. Requests without a user (splice and tls listeners, SMTP
without AUTH) are neither counted nor refused. IPv6 clients are counted per /64, the
block one subscriber usually holds. Successful logins do not reset the counts: a
guesser with one valid account must not be able to wipe its own record.

Memory is bounded, and a flood cannot make the guard forget a key under attack:
addresses and users below their limit, and those at or past it, are kept in two maps
each capped at `LoginGuard.max_keys` (the least recently failed forgotten first), so
made-up user names, each below the limit, only ever push out one another.

Shared by a fleet (`[redis]`, `LoginGuard.shared`): `enter()` asks the fleet's counts
(failures and logins in flight of every process, `mailrelay.shared.limits`) as well
as this process's own, and a login is refused or held back when either says so. The
process keeps counting on its own all along, so that when the shared counts do not
answer in time (Redis down or slow) it decides alone, with what it has seen; failures
counted while Redis was unavailable stay this process's (they are not replayed).
"""

from __future__ import annotations

import ipaddress
import math
import secrets
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Protocol

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from .logtext import loggable
from .networks import Network
from .router import RouteRequest

Key = tuple[str, str]
"""What is counted: ("client", its `client_block`) or ("user", its `user_key`)."""


@attrs.frozen
class LoginLimits:
    """`[login_limits]`."""

    window: float = 600.0
    max_per_client: int = 20
    """0: no limit per address."""
    max_per_user: int = 10
    """0: no slowdown per user."""
    delay: float = 1.0
    """Seconds before a refused login is answered (a tarpit, like `Reject.wait`), and the
    first step of the per-user slowdown (0: no tarpit and no slowdown)."""
    max_delay: float = 30.0
    """The longest a login of a user past `max_per_user` is held back."""
    exempt: tuple[Network, ...] = ()
    """Client networks neither counted nor limited per client (a webmail host)."""

    def slowdown(self, count: int) -> float:
        """How long a login of a user with `count` failed logins is
        held back: 0 below `max_per_user`, then `delay`, doubling, up to `max_delay`."""
        excess = count - self.max_per_user
        if self.max_per_user <= 0 or self.delay <= 0 or excess < 0:
            return 0.0
        return float(min(self.max_delay, self.delay * 2.0 ** min(excess, 64)))

    @property
    def user_steps(self) -> int:
        """Failed logins past `max_per_user` that still lengthen the slowdown: a user's
        count needs to go no further (nor its memory grow)."""
        if self.delay <= 0 or self.max_delay <= self.delay:
            return 0
        return math.ceil(math.log2(self.max_delay / self.delay))


@attrs.frozen
class SharedCount:
    """What the fleet's counts said of a login (`SharedCounts.admit()`)."""

    refused: bool
    """Its client is at `max_per_client` (failures and logins in flight); then it was
    not counted in flight."""
    client_failed: int
    client_in_flight: int
    user_failed: int


class SharedCounts(Protocol):
    """Failure counts and logins in flight kept outside this process, shared by a fleet
    (`mailrelay.shared.SharedLoginCounts`). `client` is a `client_block` (None: not
    counted per client), `user` a `user_key` (None: not counted per user)."""

    async def admit(self, attempt: str, client: str | None, user: str | None, now: float) -> SharedCount | None:
        """Check `client` against `max_per_client` and, unless refused, count the login
        `attempt` in flight there, at once; None when the counts cannot be reached now."""

    def ended(self, attempt: str, client: str | None, user: str | None, now: float, failed: bool) -> None:
        """The login `attempt` is over: no longer in flight; `failed`: count it. Sent
        without waiting (and lost if the counts cannot be reached)."""


class Attempt:
    """
    A login the guard has seen, from `LoginGuard.admit()` to `end()`. Unless refused, it
    counts against its client and user while it lasts, as if it had failed already.
    """

    def __init__(
        self,
        guard: LoginGuard | None = None,
        request: RouteRequest | None = None,
        keys: tuple[Key, ...] = (),
        refusal: str | None = None,
        delay: float = 0.0,
    ) -> None:
        """`Attempt()`: a login no one counts (no guard)."""
        self._guard = guard
        self._request = request
        self._keys = keys
        self.refusal = refusal
        """Why the login must be refused now, without asking the Router (then nothing
        is counted for it), or None."""
        self.delay = delay
        """Seconds to hold the login back before the Router is asked (the per-user slowdown)."""
        self._ended: Callable[[bool], None] | None = None
        """Tells the shared counts of the outcome, when they counted this login."""

    def end(self, failed: bool = False) -> None:
        """The login's outcome is known; `failed`: count it as a failed login. Only the
        first call counts (a `finally:` may call it again)."""
        guard, self._guard = self._guard, None
        if guard is None:
            return
        guard._release(self._keys)
        if failed and self._request is not None:
            guard.failed(self._request)
        ended, self._ended = self._ended, None
        if ended is not None:
            ended(failed)


class LoginGuard:
    """
    Counts failed logins and logins in flight; says when a login must be refused
    without asking, and how long one must be held back.
    """

    log = Logger()
    max_keys = 100_000
    """Addresses and users remembered at most, below their limit and at it (each map
    this many), so that a flood of made-up user names cannot exhaust memory."""

    def __init__(self, limits: LoginLimits, clock: IReactorTime) -> None:
        self.limits = limits
        self.clock = clock
        self._counting: OrderedDict[Key, deque[float]] = OrderedDict()
        """Failure times of the keys below their limit, least recently failed first."""
        self._limited: OrderedDict[Key, deque[float]] = OrderedDict()
        """Failure times of the keys at or past their limit: a flood of keys below the
        limit never pushes one of these out."""
        self._in_flight: dict[Key, int] = {}
        """Logins let through and not ended yet, per key (only keys with some)."""
        self.shared: SharedCounts | None = None
        """The fleet's counts (`[redis]`), asked by `enter()`; None: this process's only."""

    def _client_key(self, request: RouteRequest) -> Key | None:
        host = request.client[0]
        if self.limits.max_per_client <= 0 or request.user is None or self.exempt(host):
            return None
        return ("client", client_block(host))

    def _user_key(self, request: RouteRequest) -> Key | None:
        if self.limits.max_per_user <= 0 or request.user is None:
            return None
        return ("user", user_key(request.user))

    def _limit(self, key: Key) -> int:
        return self.limits.max_per_client if key[0] == "client" else self.limits.max_per_user

    def exempt(self, host: str) -> bool:
        """Whether a client at `host` is in an `exempt` network (an IPv4-mapped IPv6
        address is in the IPv4 networks of its IPv4 address too)."""
        if not self.limits.exempt:
            return False
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False  # a UNIX socket path
        addresses: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [address]
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            addresses.append(address.ipv4_mapped)
        return any(a in network for a in addresses for network in self.limits.exempt)

    def _recent(self, key: Key, now: float) -> deque[float] | None:
        for table in (self._limited, self._counting):
            times = table.get(key)
            if times is None:
                continue
            while times and times[0] <= now - self.limits.window:
                times.popleft()
            if not times:
                del table[key]
                return None
            return times
        return None

    def _count(self, key: Key, now: float) -> tuple[int, int]:
        """The failed logins within the window and the logins in flight of `key`."""
        times = self._recent(key, now)
        return (len(times) if times is not None else 0, self._in_flight.get(key, 0))

    def refusal(self, request: RouteRequest) -> str | None:
        """Why this login must be refused now (its client is past `max_per_client`), or
        None when it may go ahead."""
        key = self._client_key(request)
        if key is None:
            return None
        failed, in_flight = self._count(key, self.clock.seconds())
        if failed + in_flight < self.limits.max_per_client:
            return None
        return self._too_many(failed, in_flight)

    def _too_many(self, failed: int, in_flight: int) -> str:
        pending = f", {in_flight} in progress" if in_flight else ""
        return f"too many failed logins for this client ({failed} in {self.limits.window:g}s{pending})"

    def slowdown(self, request: RouteRequest) -> float:
        """Seconds a login of `request`'s user would be held back now (0: none). Only
        failures count here, not logins in flight: a mail client opens several
        connections at once, and its owner must not wait for its own parallel logins."""
        key = self._user_key(request)
        if key is None:
            return 0.0
        failed, _ = self._count(key, self.clock.seconds())
        return self.limits.slowdown(failed)

    def admit(self, request: RouteRequest) -> Attempt:
        """
        A login is about to be routed: refuse it, or let it through, counted in flight
        until its `Attempt.end()`. Checking and counting happen at once, so parallel
        logins of one client are each counted against those before them.
        """
        refusal = self.refusal(request)
        if refusal is not None or request.user is None:
            return Attempt(None, request, (), refusal, 0.0)
        delay = self.slowdown(request)
        keys = tuple(key for key in (self._client_key(request), self._user_key(request)) if key is not None)
        for key in keys:
            self._in_flight[key] = self._in_flight.get(key, 0) + 1
        return Attempt(self, request, keys, None, delay)

    async def enter(self, request: RouteRequest) -> Attempt:
        """
        `admit()`, asking the fleet's counts too when the guard shares them (`shared`):
        refused when either this process's or the fleet's counts refuse, held back as
        long as the longer of their slowdowns says. When the fleet's counts do not
        answer (in the store's deadline), this process's decision stands.
        """
        attempt = self.admit(request)
        shared = self.shared
        if shared is None or attempt._guard is None:
            return attempt  # refused here already, or not counted
        client_key, user_key_ = self._client_key(request), self._user_key(request)
        client = client_key[1] if client_key is not None else None
        user = user_key_[1] if user_key_ is not None else None
        name = secrets.token_hex(12)
        try:
            counted = await shared.admit(name, client, user, self.clock.seconds())
        except BaseException:
            # Cancelled (the client left) or a bug: not in flight here, nor there.
            attempt.end()
            shared.ended(name, client, user, self.clock.seconds(), False)
            raise
        if counted is None:
            return attempt
        if counted.refused:
            attempt.end()
            return Attempt(None, request, (), self._too_many(counted.client_failed, counted.client_in_flight), 0.0)
        attempt.delay = max(attempt.delay, self.limits.slowdown(counted.user_failed))
        attempt._ended = lambda failed: shared.ended(name, client, user, self.clock.seconds(), failed)
        return attempt

    def _release(self, keys: tuple[Key, ...]) -> None:
        for key in keys:
            left = self._in_flight[key] - 1
            if left:
                self._in_flight[key] = left
            else:
                del self._in_flight[key]

    def failed(self, request: RouteRequest) -> None:
        """Count a failed login of `request`."""
        now = self.clock.seconds()
        for key in (self._client_key(request), self._user_key(request)):
            if key is None:
                continue
            limit = self._limit(key)
            times = self._recent(key, now)
            if times is None:
                # A user's count goes on past its limit, as far as it lengthens the slowdown.
                times = deque(maxlen=limit + (self.limits.user_steps if key[0] == "user" else 0))
            was_at_limit = len(times) >= limit
            times.append(now)
            self._file(key, times, limit)
            if not was_at_limit and len(times) >= limit:
                kind, value = key
                if kind != "user":
                    then = "refusing its logins for now"
                elif self.limits.delay > 0:
                    then = f"holding its logins back {self.limits.slowdown(limit):g}s, doubling up to {self.limits.max_delay:g}s"
                else:
                    then = "not slowing its logins down (delay = 0)"
                self.log.warn(
                    "login limit reached: {count} failed logins for {kind} {value} within {window:g}s; {then}",
                    count=limit,
                    kind=kind,
                    value=loggable(value),
                    window=self.limits.window,
                    then=then,
                )

    def _file(self, key: Key, times: deque[float], limit: int) -> None:
        """Keep `key` as the most recently failed of its map (limited or counting),
        forgetting the least recently failed keys of that map beyond `max_keys`."""
        here, there = (self._limited, self._counting) if len(times) >= limit else (self._counting, self._limited)
        there.pop(key, None)
        here[key] = times
        here.move_to_end(key)
        while len(here) > self.max_keys:
            here.popitem(last=False)


def user_key(user: str) -> str:
    """The name a user is counted under: casefolded, surrounding whitespace stripped,
    so that `Alice@Example.org ` and `alice@example.org` are one user."""
    return user.strip().casefold()


def client_block(host: str) -> str:
    """The unit an address is counted in: itself for IPv4, its /64 for IPv6."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host  # a UNIX socket path
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)
