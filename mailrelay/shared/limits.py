"""
`SharedLoginCounts`: the failure counts and logins in flight of `guard.LoginGuard`,
kept in Redis so that every process and machine of a fleet counts the same.

Per counted key (a client's address block, a user) Redis holds sorted sets:

- `<prefix>login:failed:client:<block>` and `<prefix>login:failed:user:<digest>`: one
  member per failed login, scored with the time it failed; members older than
  `window` are removed before each count, at most as many kept as still matter (the
  limit, plus the slowdown's steps for a user), and the key expires `window` seconds
  after the last failure. Memory per key is bounded; the number of keys is bounded by
  the failures of one window.
- `<prefix>login:inflight:client:<block>`: one member per login let through and not
  ended yet, scored with the time it stops counting (`IN_FLIGHT_TTL` after it began).
  Logins in flight are shared so that parallel guesses spread over several processes
  are counted against each other; a process that dies with logins in flight leaves
  members that expire by themselves, so it never locks a client out for longer.

Checking and counting are one Lua script (atomic in Redis): parallel logins of one
client, through any process, are each counted against those before them.

User names (casefolded, as the guard counts them) are never keys themselves: a
digest of them is (keyed with the fleet's secret when there is one), so a made-up
name of any size makes a key of fixed size. Client addresses are kept readable
(`login:failed:client:192.0.2.7`) so that an administrator can find and delete one.

Times are this process's clock: the machines of a fleet need clocks that agree to
within a small part of `window` (NTP does).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from typing import Any

from ..guard import LoginLimits, SharedCount
from .store import SharedStore, StoreUnavailable

__all__ = ["IN_FLIGHT_TTL", "SharedLoginCounts"]

IN_FLIGHT_TTL = 300.0
"""Seconds a login in flight counts at most: longer than any login takes (a router's
and an upstream's timeouts), short enough that one a dead process left behind is
soon forgotten."""

ADMIT = """
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
local cf, cp, uf = 0, 0, 0
if ARGV[6] == '1' then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  cf = redis.call('ZCARD', KEYS[1])
  cp = redis.call('ZCARD', KEYS[2])
  if cf + cp >= limit then
    return {1, cf, cp, 0}
  end
  redis.call('ZADD', KEYS[2], ARGV[5], ARGV[4])
  redis.call('PEXPIRE', KEYS[2], ARGV[8])
end
if ARGV[7] == '1' then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - window)
  uf = redis.call('ZCARD', KEYS[3])
end
return {0, cf, cp, uf}
"""
"""KEYS: client failures, client in flight, user failures. ARGV: now, window,
max_per_client, the attempt's member, when it stops counting, client counted ('1'),
user counted ('1'), the in-flight key's lifetime (ms). Returns {refused, client
failures, client in flight, user failures}."""

END = """
redis.call('ZREM', KEYS[2], ARGV[1])
if ARGV[2] == '1' then
  for i, key in ipairs({KEYS[1], KEYS[3]}) do
    local keep = tonumber(ARGV[5 + i])
    if ARGV[3 + i] == '1' and keep > 0 then
      redis.call('ZADD', key, ARGV[3], ARGV[1])
      redis.call('ZREMRANGEBYRANK', key, 0, -(keep + 1))
      redis.call('PEXPIRE', key, ARGV[8])
    end
  end
end
return 1
"""
"""KEYS: as ADMIT's. ARGV: the attempt's member, failed ('1'), now, client counted,
user counted, failures kept for the client, for the user, the window (ms)."""


class SharedLoginCounts:
    """The guard's counts in Redis (`guard.SharedCounts`); None answers when Redis is
    unavailable, so that the guard decides with its own counts."""

    def __init__(self, store: SharedStore, limits: LoginLimits) -> None:
        self.store = store
        self.limits = limits

    def _keys(self, client: str | None, user: str | None) -> list[str]:
        block = _client_part(client or "", self.store.secret)
        digest = _user_part(user or "", self.store.secret)
        return [
            self.store.key("login", "failed", "client", block),
            self.store.key("login", "inflight", "client", block),
            self.store.key("login", "failed", "user", digest),
        ]

    async def admit(self, attempt: str, client: str | None, user: str | None, now: float) -> SharedCount | None:
        limits = self.limits
        args = [
            repr(now),
            repr(limits.window),
            str(limits.max_per_client),
            attempt,
            repr(now + IN_FLIGHT_TTL),
            "1" if client is not None else "0",
            "1" if user is not None else "0",
            str(int(IN_FLIGHT_TTL * 1000)),
        ]
        try:
            answer = await self.store.eval(ADMIT, self._keys(client, user), args)
        except StoreUnavailable:
            return None
        try:
            refused, client_failed, in_flight, user_failed = (int(v) for v in answer)
        except (TypeError, ValueError):
            return None  # not our script's answer: decide locally
        return SharedCount(bool(refused), client_failed, in_flight, user_failed)

    def ended(self, attempt: str, client: str | None, user: str | None, now: float, failed: bool) -> None:
        limits = self.limits
        args = [
            attempt,
            "1" if failed else "0",
            repr(now),
            "1" if client is not None else "0",
            "1" if user is not None else "0",
            str(limits.max_per_client),
            str(limits.max_per_user + limits.user_steps if limits.max_per_user > 0 else 0),
            str(max(1, int(limits.window * 1000))),
        ]
        d = _background(self.store.eval(END, self._keys(client, user), args))
        del d


def _background(coroutine: Any) -> Any:
    """Run `coroutine` without waiting for it: a failure has degraded the store already."""
    from twisted.internet.defer import Deferred

    d = Deferred.fromCoroutine(coroutine)
    d.addErrback(lambda failure: failure.trap(StoreUnavailable))
    return d


def _client_part(block: str, secret: bytes | None) -> str:
    """An address block as it is (short, and what an administrator looks for); anything
    else (a UNIX socket path) as a digest."""
    try:
        ipaddress.ip_network(block, strict=False)
        return block
    except ValueError:
        return "h" + _digest(block, secret)


def _user_part(user: str, secret: bytes | None) -> str:
    return _digest(user, secret)


def _digest(text: str, secret: bytes | None) -> str:
    data = text.encode("utf-8", "surrogateescape")
    if secret is not None:
        return hmac.new(secret, b"login-key\0" + data, hashlib.sha256).hexdigest()[:32]
    return hashlib.sha256(b"mailrelay-login-key\0" + data).hexdigest()[:32]
