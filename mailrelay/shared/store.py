"""
`SharedStore`: a process's one Redis connection, as an `IService`, with a deadline on
every call and a local fallback.

Contract: `call()` and `eval()` either answer within `timeout` seconds or raise
`StoreUnavailable`; after a failure (refused, lost, erroring, slower than `timeout`)
the store is *degraded*: every call raises `StoreUnavailable` at once, without
touching the network, so that no login waits on a Redis known to be down, and a
PING probe every `probe_interval` seconds finds out when it is back. Going degraded
logs one warning and coming back one info line, however many calls failed between.
Callers then use their own (per process) state: they never refuse anything because
the store is unavailable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from ..redisurl import RedisAddress
from ..timers import cancel

__all__ = ["SharedStore", "StoreUnavailable", "connect_txredisapi", "read_secret"]

MIN_SECRET = 16
"""Bytes a `secret_file` must hold at least."""


class StoreUnavailable(Exception):
    """Redis did not answer (in time): decide with this process's own state."""


def connect_txredisapi(address: RedisAddress) -> Any:
    """A lazily connecting, reconnecting txredisapi client for `address`: commands sent
    before it is connected wait for the connection (under the caller's deadline)."""
    import txredisapi  # type: ignore[import-untyped]

    options: dict[str, Any] = dict(
        dbid=address.db,
        reconnect=True,
        password=address.password,
        username=address.username,
        connectTimeout=5,
    )
    if address.host is None:
        return txredisapi.lazyUnixConnection(address.path, **options)
    return txredisapi.lazyConnection(address.host, address.port, **options)


def read_secret(path: str) -> bytes:
    """The fleet's secret from `path` (surrounding whitespace stripped); ValueError when
    it cannot be read or is too short to be a secret."""
    try:
        with open(path, "rb") as f:
            secret = f.read(65536).strip()
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None
    if len(secret) < MIN_SECRET:
        raise ValueError(f"{path} holds {len(secret)} bytes; a secret needs at least {MIN_SECRET} (e.g. `openssl rand -hex 32`)")
    return secret


class SharedStore(Service):
    """The Redis connection of this process (see the module docstring)."""

    log = Logger()
    probe_interval = 2.0
    """Seconds between PINGs while degraded."""

    def __init__(
        self,
        address: RedisAddress,
        clock: IReactorTime,
        timeout: float = 0.5,
        key_prefix: str = "mailrelay:",
        secret: bytes | None = None,
        connect: Callable[[RedisAddress], Any] = connect_txredisapi,
    ) -> None:
        self.address = address
        self.clock = clock
        self.timeout = timeout
        self.key_prefix = key_prefix
        self.secret = secret
        """The fleet's shared secret (`secret_file`), or None."""
        self._connect = connect
        self._client: Any = None
        self._degraded = False
        self._probe: IDelayedCall | None = None

    @property
    def available(self) -> bool:
        """Whether calls go to Redis now (running and not degraded)."""
        return self._client is not None and not self._degraded

    def key(self, *parts: str) -> str:
        """A key of this fleet: the prefix, then `parts` joined by colons."""
        return self.key_prefix + ":".join(parts)

    def startService(self) -> None:
        super().startService()
        self._client = self._connect(self.address)
        self.log.info("redis at {where}: login limits shared through it", where=self.address.describe())
        # Find out now, not at the first login, whether Redis is there.
        self._ping()

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        cancel(self._probe)
        self._probe = None
        client, self._client = self._client, None
        if client is None:
            return None
        d = maybeDeferred(client.disconnect)
        d.addErrback(lambda _: None)  # a connection already gone is closed enough
        return d

    async def call(self, *command: Any) -> Any:
        """Run one Redis command (`"ZCARD", key`); raise `StoreUnavailable` when Redis
        does not answer it within `timeout`."""
        return await self._run(lambda client: client.execute_command(*command))

    async def eval(self, script: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run a Lua script (by its digest once Redis knows it); as `call()`."""
        return await self._run(lambda client: client.eval(script, list(keys), list(args)))

    async def _run(self, send: Callable[[Any], Deferred[Any]]) -> Any:
        client = self._client
        if client is None or self._degraded:
            raise StoreUnavailable("redis is unavailable")
        try:
            d = maybeDeferred(send, client)
            d.addTimeout(self.timeout, self.clock)
            return await d
        except Exception as e:
            self._failed(e)
            raise StoreUnavailable(str(e) or type(e).__name__) from e

    def _failed(self, reason: Exception) -> None:
        if self._degraded or self._client is None:
            return
        self._degraded = True
        self.log.warn(
            "redis at {where} unavailable: {reason}; using this process's own login counts and route cache until it is back"
            " (check that Redis runs there and that [redis] url names it)",
            where=self.address.describe(),
            reason=_describe(reason, self.timeout),
        )
        self._schedule_probe()

    def _schedule_probe(self) -> None:
        if self._client is not None and (self._probe is None or not self._probe.active()):
            self._probe = self.clock.callLater(self.probe_interval, self._ping)

    def _ping(self) -> None:
        self._probe = None
        client = self._client
        if client is None:
            return
        d = maybeDeferred(client.execute_command, "PING")
        d.addTimeout(self.timeout, self.clock)
        d.addCallbacks(self._answered, self._unanswered)

    def _answered(self, _: object) -> None:
        if self._degraded and self._client is not None:
            self._degraded = False
            self.log.info(
                "redis at {where} is back: login counts and the route cache are shared again",
                where=self.address.describe(),
            )

    def _unanswered(self, failure: Any) -> None:
        if self._degraded:
            self._schedule_probe()
        else:
            self._failed(failure.value)


def _describe(reason: Exception, timeout: float) -> str:
    from twisted.internet.defer import TimeoutError as DeferredTimeout

    if isinstance(reason, DeferredTimeout):
        return f"no answer within {timeout:g}s"
    text = str(reason).strip() or type(reason).__name__
    return text.splitlines()[0][:200]
