"""
Brute-force defence: failed logins counted per client address and per user, across
every listener of the process.

Once an address or a user has `max_per_client` / `max_per_user` failed logins within
the last `window` seconds, its next logins are refused with the protocol's temporary
failure (after `delay` seconds) without asking the Router: a guesser learns nothing,
and the auth service is spared the load. The count forgets each failure `window`
seconds after it happened, so a locked-out user or address is let in again without
anyone's intervention.

What counts as a failed login: a Router's `Reject` of a request that carried a user
(wrong password, unknown account), and an upstream refusing the login mailrelay made
on the client's behalf. Requests without a user (splice and tls listeners, SMTP
without AUTH) are neither counted nor refused. IPv6 clients are counted per /64, the
block one subscriber usually holds. Successful logins do not reset the counts: a
guesser with one valid account must not be able to wipe its own record.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict, deque

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from .router import RouteRequest


@attrs.frozen
class LoginLimits:
    """`[login_limits]`."""

    window: float = 600.0
    max_per_client: int = 20
    """0: no limit per address."""
    max_per_user: int = 10
    """0: no limit per user."""
    delay: float = 1.0
    """Seconds before a refused login is answered (a tarpit, like `Reject.wait`)."""


class LoginGuard:
    """Counts failed logins and says when a login must be refused without asking."""

    log = Logger()
    max_keys = 100_000
    """Distinct addresses and users remembered at most (the oldest are forgotten first),
    so that a flood of made-up user names cannot exhaust memory."""

    def __init__(self, limits: LoginLimits, clock: IReactorTime) -> None:
        self.limits = limits
        self.clock = clock
        self._failures: OrderedDict[tuple[str, str], deque[float]] = OrderedDict()

    def _keys(self, request: RouteRequest) -> list[tuple[tuple[str, str], int]]:
        keys = []
        if self.limits.max_per_client > 0:
            keys.append((("client", client_block(request.client[0])), self.limits.max_per_client))
        if self.limits.max_per_user > 0 and request.user is not None:
            keys.append((("user", request.user.casefold()), self.limits.max_per_user))
        return keys

    def _recent(self, key: tuple[str, str], now: float) -> deque[float] | None:
        times = self._failures.get(key)
        if times is None:
            return None
        while times and times[0] <= now - self.limits.window:
            times.popleft()
        if not times:
            del self._failures[key]
            return None
        return times

    def refusal(self, request: RouteRequest) -> str | None:
        """Why this login must be refused now, or None when it may go ahead."""
        if request.user is None:
            return None
        now = self.clock.seconds()
        for key, limit in self._keys(request):
            times = self._recent(key, now)
            if times is not None and len(times) >= limit:
                kind, value = key
                return f"too many failed logins for this {kind} ({len(times)} in {self.limits.window:g}s)"
        return None

    def failed(self, request: RouteRequest) -> None:
        """Count a failed login of `request`."""
        if request.user is None:
            return
        now = self.clock.seconds()
        for key, limit in self._keys(request):
            times = self._recent(key, now)
            if times is None:
                times = self._failures[key] = deque(maxlen=limit)
            was_refusing = len(times) >= limit
            times.append(now)
            self._failures.move_to_end(key)
            if not was_refusing and len(times) == limit:
                kind, value = key
                self.log.warn(
                    "login limit reached: {count} failed logins for {kind} {value} within {window:g}s;"
                    " refusing its logins for now",
                    count=limit,
                    kind=kind,
                    value=value,
                    window=self.limits.window,
                )
        while len(self._failures) > self.max_keys:
            self._failures.popitem(last=False)


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
