"""
`SharedRoutes`: the route cache (`cache_ttl`) kept in Redis, so that an answer one
process got from the auth service serves the whole fleet.

Only with the fleet's secret (`[redis] secret_file`), and then:

- the entry's key is `<prefix>route:<HMAC(secret, login)>:<epoch>`, where the login
  is everything the cache keys on, the password's keyed digest included: a reader of
  Redis cannot test a password guess against it faster than by asking the auth
  service (it would need the secret). Without a secret the digest would have to be
  unkeyed (or keyed per process, and then not shared), so the cache stays each
  process's own;
- the value is the answer's routes as JSON of their fields, with an HMAC over key and
  value: an entry someone else wrote into Redis (to send a user's login to their own
  server) is not authentic, and is a miss; so is anything that is not a valid answer;
- an answer carrying an upstream password (`Route.password`, a master password) is
  never written to Redis: it stays in the process's own cache;
- `forget()` (a reload) increments `<prefix>route:epoch`: entries of earlier epochs
  are never read again and expire with their TTL; an answer asked for before the
  epoch changed is not stored under the new one.

Every call is under the store's deadline; when Redis is unavailable a lookup is a
miss and a store is skipped.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

import attrs
from twisted.internet.defer import Deferred

from ..router import Route
from .store import SharedStore, StoreUnavailable

__all__ = ["Found", "SharedRoutes"]

GET = """
local epoch = redis.call('GET', KEYS[1]) or '0'
local key = ARGV[1] .. ':' .. epoch
return {epoch, redis.call('GET', key) or '', redis.call('PTTL', key)}
"""
"""KEYS: the epoch. ARGV: the entry's key without its epoch. Returns {epoch, value
('' when none), milliseconds left}."""

PUT = """
local epoch = redis.call('GET', KEYS[1]) or '0'
if epoch ~= ARGV[2] then
  return 0
end
redis.call('SET', ARGV[1] .. ':' .. epoch, ARGV[3], 'PX', ARGV[4])
return 1
"""
"""KEYS: the epoch. ARGV: the entry's key without its epoch, the epoch the answer was
asked in, the value, its lifetime (ms). Stores only if the epoch has not changed."""

MAX_VALUE = 64 * 1024
"""An entry longer than this is not one of ours."""


@attrs.frozen
class Found:
    """A shared lookup: the answer (None: a miss), its seconds left, and the epoch it
    was looked up in (None: Redis did not answer; then do not store)."""

    answer: Any = None
    ttl: float = 0.0
    epoch: str | None = None


class SharedRoutes:
    """The fleet's route cache; needs the store's secret."""

    def __init__(self, store: SharedStore) -> None:
        if store.secret is None:
            raise ValueError("a shared route cache needs the fleet's secret ([redis] secret_file)")
        self.store = store
        self.secret: bytes = store.secret

    def _key(self, login: bytes) -> str:
        digest = hmac.new(self.secret, b"route-key\0" + login, hashlib.sha256).hexdigest()
        return self.store.key("route", digest)

    def _mac(self, key: str, epoch: str, body: str) -> str:
        signed = f"{key}:{epoch}\0{body}".encode()
        return hmac.new(self.secret, b"route-value\0" + signed, hashlib.sha256).hexdigest()

    async def get(self, login: bytes) -> Found:
        """The answer stored for `login` (a cache key's bytes), if any and authentic."""
        key = self._key(login)
        try:
            reply = await self.store.eval(GET, [self.store.key("route", "epoch")], [key])
            epoch, value, left = reply
            epoch, value, left = str(epoch), str(value), int(left)
        except StoreUnavailable:
            return Found()
        except (TypeError, ValueError):
            return Found()  # not what the script answers: someone else's key
        if not value:
            return Found(epoch=epoch)
        answer = self._decode(key, epoch, value)
        if answer is None or left <= 0:
            return Found(epoch=epoch)
        return Found(answer, left / 1000.0, epoch)

    def put(self, login: bytes, epoch: str, answer: Any, ttl: float) -> bool:
        """Store `answer` for `ttl` seconds if it may be shared (no route carries a
        password) and the epoch is still `epoch`; sent without waiting. Whether it
        was sent."""
        routes = [answer] if isinstance(answer, Route) else list(answer)
        if any(route.password is not None for route in routes):
            return False
        body = json.dumps(
            {"v": 1, "one": isinstance(answer, Route), "routes": [attrs.asdict(route) for route in routes]},
            separators=(",", ":"),
            sort_keys=True,
        )
        key = self._key(login)
        value = self._mac(key, epoch, body) + "." + body
        args = [key, epoch, value, str(max(1, int(ttl * 1000)))]
        d = Deferred.fromCoroutine(self.store.eval(PUT, [self.store.key("route", "epoch")], args))
        d.addErrback(lambda failure: failure.trap(StoreUnavailable))
        return True

    def forget(self) -> None:
        """Make every entry stored so far unreadable (a reload); sent without waiting."""
        d = Deferred.fromCoroutine(self.store.call("INCR", self.store.key("route", "epoch")))
        d.addErrback(lambda failure: failure.trap(StoreUnavailable))

    def _decode(self, key: str, epoch: str, value: str) -> Any:
        """The answer in `value`, or None when it is not an authentic, valid one."""
        if len(value) > MAX_VALUE:
            return None
        mac, _, body = value.partition(".")
        if not hmac.compare_digest(mac.encode(), self._mac(key, epoch, body).encode()):
            return None
        try:
            data = json.loads(body)
            if not isinstance(data, dict) or data.get("v") != 1 or not isinstance(data.get("routes"), list):
                return None
            routes = [_route(fields) for fields in data["routes"]]
        except (ValueError, TypeError):
            return None
        if not routes or any(route is None for route in routes):
            return None
        if data.get("one") is True:
            return routes[0] if len(routes) == 1 else None
        return routes


_ROUTE_FIELDS = {field.name: field for field in attrs.fields(Route)}


def _route(fields: Any) -> Route | None:
    """A Route from its stored fields, or None: unknown fields, wrong types, a
    password (never stored) or values its validators refuse."""
    if not isinstance(fields, dict) or not set(fields) <= set(_ROUTE_FIELDS) or fields.get("password") is not None:
        return None
    if any(value is not None and not isinstance(value, (str, int, bool)) for value in fields.values()):
        return None
    try:
        return Route(**fields)
    except (TypeError, ValueError):
        return None
