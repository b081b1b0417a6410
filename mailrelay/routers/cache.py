"""
`cache_ttl = N` on any `[router]`: successful answers remembered for N seconds, so that
a busy auth service is not asked on every login of the same user.

What is cached, and for whom:
- only successful answers (Routes); a Reject or a failure is never remembered, so a
  wrong password is always asked about and a fixed account works at once;
- only requests that carry a user; the key is everything that could change the
  answer for that user: listener, protocol, auth method, user, a keyed digest of the
  password (never the password itself), the client's address (not its port), TLS,
  SNI, and the fingerprint of the client's verified certificate. A cache hit therefore
  needs the same credentials from the same address, with the same certificate: one
  certificate's answer is never served to another, even one with the same subject
  (an EXTERNAL login's user), as a Router may decide on the issuer, serial or
  fingerprint;
- never challenge-response logins (CRAM-MD5, APOP): their answer depends on a
  per-session challenge, so no two requests are alike.

The cache holds at most `cache_size` entries (least recently used go first) and is
emptied on reload, and whenever the router it wraps says its answers changed (a
`generation` attribute that changes, as a route map re-read from its file has), so
that a changed route map or auth decision applies at once.

Shared by a fleet (`[redis]` with a `secret_file`, `share()`): an answer is looked up
in this process's memory, then in Redis (`mailrelay.shared.routes`), and only then
asked for; a new answer goes to both, unless a route carries an upstream password
(then only to memory). The fleet's secret then keys the password digests, so that
every process computes the same keys.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import attrs
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from ..ask import call_router
from ..interfaces import IReloadable
from ..router import IRouter, Route, RouteRequest, verifies_passwords
from ..routerspec import PasswordListener, RouterSpec
from ..shared.routes import SharedRoutes

UNCACHEABLE_METHODS = frozenset({"cram-md5", "apop"})

CacheKey = tuple[Any, ...]


@implementer(IRouter, IReloadable)
class CachingRouter:
    """Answers from memory what `inner` answered for the same login not long ago."""

    def __init__(self, inner: IRouter, ttl: float, size: int, clock: IReactorTime) -> None:
        self.inner = inner
        self.ttl = ttl
        self.size = size
        self.clock = clock
        self._entries: OrderedDict[CacheKey, tuple[float, Any]] = OrderedDict()
        # Keys hold a digest of the password; the random key makes that digest useless
        # outside this process (no dictionary attack on a memory dump).
        self._secret = secrets.token_bytes(32)
        self._generation = getattr(inner, "generation", None)
        self.shared: SharedRoutes | None = None
        """The fleet's cache (`share()`), or None: this process's memory only."""

    def share(self, shared: SharedRoutes) -> None:
        """Keep answers in the fleet's cache too; its secret keys the password digests."""
        self.shared = shared
        self._secret = shared.secret
        self._entries.clear()  # keyed with the old secret

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def verifies_passwords(self) -> bool:
        """The router it wraps checks passwords (an answer comes from it, or from memory
        of it for the same password)."""
        return verifies_passwords(self.inner)

    def key(self, request: RouteRequest) -> CacheKey | None:
        """The cache key of `request`, or None when it must not be cached."""
        if request.user is None or request.auth_method in UNCACHEABLE_METHODS:
            return None
        password = hmac.new(self._secret, (request.password or "").encode("utf-8", "surrogateescape"), hashlib.sha256)
        return (
            request.listener,
            request.protocol,
            request.auth_method,
            request.user,
            password.digest(),
            request.client[0],
            request.tls,
            request.sni,
            request.client_cert.fingerprint if request.client_cert is not None else None,
        )

    async def route(self, request: RouteRequest) -> Any:
        generation = getattr(self.inner, "generation", None)
        if generation != self._generation:
            self._entries.clear()
            self._generation = generation
        key = self.key(request)
        now = self.clock.seconds()
        if key is not None:
            entry = self._entries.get(key)
            if entry is not None:
                expires, answer = entry
                if expires > now:
                    self._entries.move_to_end(key)
                    return answer
                del self._entries[key]
        shared, epoch = self.shared, None
        if key is not None and shared is not None:
            found = await shared.get(_login(key, generation))
            if found.answer is not None:
                self._remember(key, self.clock.seconds() + min(found.ttl, self.ttl), found.answer)
                return found.answer
            epoch = found.epoch
        answer = await call_router(self.inner, request)
        if key is not None and _is_success(answer):
            self._remember(key, now + self.ttl, answer)
            if shared is not None and epoch is not None:
                shared.put(_login(key, generation), epoch, answer, self.ttl)
        return answer

    def _remember(self, key: CacheKey, expires: float, answer: Any) -> None:
        self._entries[key] = (expires, answer)
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def reload(self) -> None:
        self._entries.clear()
        if self.shared is not None:
            self.shared.forget()


def _login(key: CacheKey, generation: object) -> bytes:
    """A cache key (and the wrapped router's generation) as the bytes the fleet's
    cache digests: the same in every process for the same login."""
    fields = [part.hex() if isinstance(part, bytes) else part for part in key]
    return json.dumps([repr(generation), *fields], separators=(",", ":")).encode("utf-8", "surrogateescape")


def _is_success(answer: object) -> bool:
    if isinstance(answer, Route):
        return True
    return isinstance(answer, (list, tuple)) and bool(answer) and all(isinstance(r, Route) for r in answer)


def cached(spec: RouterSpec, ttl: float, size: int) -> RouterSpec:
    """`spec` with its successful answers remembered for `ttl` seconds, at most `size` of them."""

    def build(reactor: Any = None, password_listeners: Iterable[PasswordListener] = ()) -> IRouter:
        if reactor is None:
            from twisted.internet import reactor
        return CachingRouter(spec.build(reactor, password_listeners=password_listeners), ttl, size, reactor)

    description = f"{spec.description} (answers cached {ttl:g}s)"
    return attrs.evolve(spec, description=description, build=build)
