"""
State a fleet shares through Redis (`[redis]`, `mailrelay.shared`): login limits and
the route cache.

Quick tests drive the store's deadline and its fall back to this process's own state
with a fake Redis client that hangs or fails, on a `task.Clock`. The slow tests run
Debian's redis-server (`tests.support.redis`): two guards and two route caches of
"two processes" sharing it, Redis stopped under them, and the issue's end-to-end test,
two `twistd mailrelay` processes in front of a real Dovecot sharing one Redis.
"""

from __future__ import annotations

import imaplib
import json
import os
import re
import shutil
import signal
import socket
import tempfile
from collections.abc import Callable
from typing import Any, cast

import attrs
import pytest
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, Logger, LogLevel, formatEvent
from twisted.trial import unittest
from zope.interface import implementer

from mailrelay.config import ConfigError, parse_config
from mailrelay.guard import LoginGuard, LoginLimits, SharedCount
from mailrelay.redisurl import RedisAddress, parse_redis_url
from mailrelay.router import IRouter, Route, RouteRequest
from mailrelay.shared import SharedLoginCounts, SharedRoutes, SharedStore, StoreUnavailable, read_secret
from mailrelay.shared.routes import Found
from tests.support.processes import WAIT

SECRET = b"s3cret-of-the-fleet-0123456789abcdef"
ADDRESS = RedisAddress(host="127.0.0.1", port=6379)


def login(user: str | None = "alice@example.org", client: str = "192.0.2.7", password: str | None = "pw") -> RouteRequest:
    return RouteRequest(
        listener="imap",
        protocol="imap",
        mode="starttls",
        client=(client, 40000),
        local=("192.0.2.1", 143),
        user=user,
        password=password,
        auth_method="plain",
    )


class FakeRedis:
    """A Redis client that hangs (`mode = "hang"`), fails (`"fail"`) or answers with
    `reply(command)` (`"answer"`), recording what it was sent."""

    def __init__(self, mode: str = "hang", reply: Any = None) -> None:
        self.mode = mode
        self.reply = reply or (lambda command: "PONG")
        self.sent: list[tuple[Any, ...]] = []
        self.pending: list[Deferred[Any]] = []
        self.disconnected = False

    def _answer(self, command: tuple[Any, ...]) -> Deferred[Any]:
        self.sent.append(command)
        if self.mode == "hang":
            d: Deferred[Any] = Deferred()
            self.pending.append(d)
            return d
        if self.mode == "fail":
            return fail(ConnectionError("Connection refused"))
        return succeed(self.reply(command))

    def execute_command(self, *args: Any) -> Deferred[Any]:
        return self._answer(args)

    def eval(self, script: str, keys: list[str], args: list[Any]) -> Deferred[Any]:
        return self._answer(("EVAL", script, keys, args))

    def disconnect(self) -> Deferred[None]:
        self.disconnected = True
        return succeed(None)


def store_with(client: FakeRedis, secret: bytes | None = None) -> tuple[SharedStore, Clock, list[dict[str, Any]]]:
    clock = Clock()
    events: list[dict[str, Any]] = []
    store = SharedStore(ADDRESS, clock, timeout=0.5, secret=secret, connect=lambda address: client)
    store.log = Logger(observer=cast(ILogObserver, events.append))
    return store, clock, events


def warnings(events: list[dict[str, Any]]) -> list[str]:
    return [formatEvent(e) for e in events if e["log_level"] == LogLevel.warn]


def infos(events: list[dict[str, Any]]) -> list[str]:
    return [formatEvent(e) for e in events if e["log_level"] == LogLevel.info]


def result(d: Deferred[Any]) -> Any:
    """What a Deferred fired with (it must have fired)."""
    found: list[Any] = []
    d.addBoth(found.append)
    assert found, "not fired"
    if hasattr(found[0], "raiseException"):
        found[0].raiseException()
    return found[0]


def run(coroutine: Any) -> Deferred[Any]:
    return Deferred.fromCoroutine(coroutine)


# -- the URL


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://127.0.0.1:6379/0", RedisAddress(host="127.0.0.1", port=6379, db=0)),
        ("redis://redis.example", RedisAddress(host="redis.example")),
        ("redis://:pw@[::1]:6380/3", RedisAddress(host="::1", port=6380, db=3, password="pw")),
        ("redis://mailrelay:p%40ss@h/1", RedisAddress(host="h", db=1, username="mailrelay", password="p@ss")),
        ("unix:/run/redis/redis.sock", RedisAddress(host=None, path="/run/redis/redis.sock")),
        ("unix:///run/redis.sock?db=2", RedisAddress(host=None, path="/run/redis.sock", db=2)),
    ],
)
def test_redis_urls_are_parsed(url: str, expected: RedisAddress) -> None:
    assert parse_redis_url(url) == expected


@pytest.mark.parametrize(
    "url",
    [
        "http://h/0",
        "redis://",
        "redis://:topsecret@h:port/0",
        "redis://:topsecret@h/x",
        "redis://:topsecret@h/0?db=1",
        "rediss://:topsecret@h/0",
        "unix:relative.sock",
        "unix:/s.sock?timeout=1",
        "unix://host/s.sock",
    ],
)
def test_bad_redis_urls_are_refused_without_showing_the_password(url: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_redis_url(url)
    assert "topsecret" not in str(caught.value)


def test_a_password_in_the_url_is_never_shown() -> None:
    address = parse_redis_url("redis://:topsecret@127.0.0.1:6379/0")
    assert address.password == "topsecret"
    assert "topsecret" not in repr(address) and "topsecret" not in address.describe()
    assert address.describe() == "127.0.0.1:6379 db 0 (with a password)"


def listener() -> dict[str, Any]:
    return {"name": "imap", "listen": "tcp:0", "mode": "starttls", "protocol": "imap"}


def test_the_redis_table_is_read() -> None:
    config = parse_config(
        {
            "redis": {"url": "redis://:topsecret@10.0.0.9/2", "timeout": 0.25, "key_prefix": "fleet1:"},
            "listener": [listener()],
            "router": {"type": "static", "host": "127.0.0.1", "port": 143},
        }
    )
    assert config.redis is not None
    assert (config.redis.timeout, config.redis.key_prefix, config.redis.secret_file) == (0.25, "fleet1:", None)
    assert config.redis.address == RedisAddress(host="10.0.0.9", db=2, password="topsecret")
    assert "topsecret" not in repr(config) and "topsecret" not in config.redis.describe()
    assert "route caches per process" in config.redis.describe()


def test_redis_table_errors_are_reported_without_the_password() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(
            {
                "redis": {"url": "redis://:topsecret@h:x/0", "timeout": 0, "key_prefix": "x" * 65, "secret": "no"},
                "listener": [listener()],
                "router": {"type": "static", "host": "127.0.0.1", "port": 143},
            }
        )
    text = "\n".join(caught.value.errors)
    assert "redis.url" in text and "redis.timeout" in text and "redis.key_prefix" in text and "redis.secret" in text
    assert "topsecret" not in text


def test_a_secret_file_must_hold_a_secret(tmp_path: Any) -> None:
    short = tmp_path / "short"
    short.write_bytes(b"tiny\n")
    with pytest.raises(ValueError, match="at least 16"):
        read_secret(str(short))
    with pytest.raises(ValueError, match="cannot read"):
        read_secret(str(tmp_path / "missing"))
    good = tmp_path / "good"
    good.write_bytes(SECRET + b"\n")
    assert read_secret(str(good)) == SECRET


def test_check_shows_the_redis_settings_without_the_password(tmp_path: Any) -> None:
    from tests.support.processes import run_check

    base = (
        '[router]\ntype = "static"\nhost = "127.0.0.1"\nport = 143\n'
        '[[listener]]\nname = "imap"\nlisten = "tcp:0"\nmode = "starttls"\nprotocol = "imap"\n'
    )
    (tmp_path / "mailrelay.toml").write_text('[redis]\nurl = "redis://:topsecret@127.0.0.1:6390/1"\n' + base)
    checked = run_check(tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert (
        "redis: 127.0.0.1:6390 db 1 (with a password) timeout=0.5s key_prefix='mailrelay:'; shares login counts"
        " only (no secret_file: route caches per process)"
    ) in checked.stdout
    assert "topsecret" not in checked.stdout + checked.stderr
    (tmp_path / "mailrelay.toml").write_text('[redis]\nurl = "redis://127.0.0.1"\nsecret_file = "nope"\n' + base)
    checked = run_check(tmp_path)
    assert checked.returncode == 1 and "redis.secret_file: cannot read" in checked.stderr, checked.stderr


# -- the store: deadline, degrade, back


def test_a_call_redis_does_not_answer_in_time_falls_back_with_one_warning() -> None:
    client = FakeRedis("answer")
    store, clock, events = store_with(client)
    store.startService()
    assert store.available and client.sent == [("PING",)]
    client.mode = "hang"
    d = run(store.call("ZCARD", "k"))
    assert not d.called
    clock.advance(0.49)
    assert not d.called  # within the deadline: still waiting
    clock.advance(0.01)
    with pytest.raises(StoreUnavailable):
        result(d)
    assert warnings(events) == [
        "redis at 127.0.0.1:6379 db 0 unavailable: no answer within 0.5s; using this process's own login counts"
        " and route cache until it is back (check that Redis runs there and that [redis] url names it)"
    ]
    # Degraded: further calls do not wait on Redis at all, and warn no more.
    sent = len(client.sent)
    for _ in range(3):
        with pytest.raises(StoreUnavailable):
            result(run(store.call("ZCARD", "k")))
    assert len(client.sent) == sent and len(warnings(events)) == 1
    # The probe finds it back.
    client.mode = "answer"
    clock.advance(store.probe_interval)
    assert client.sent[-1] == ("PING",)
    assert store.available
    assert infos(events)[-1] == "redis at 127.0.0.1:6379 db 0 is back: login counts and the route cache are shared again"
    assert result(run(store.call("ZCARD", "k"))) == "PONG"


def test_a_failing_redis_warns_once_and_probes_until_it_answers() -> None:
    client = FakeRedis("fail")
    store, clock, events = store_with(client)
    store.startService()  # its first PING fails: the warning comes at start
    assert not store.available
    assert len(warnings(events)) == 1 and "Connection refused" in warnings(events)[0]
    for _ in range(5):
        clock.advance(store.probe_interval)
    assert client.sent.count(("PING",)) == 6 and len(warnings(events)) == 1
    client.mode = "answer"
    clock.advance(store.probe_interval)
    assert store.available and sum("is back" in line for line in infos(events)) == 1


def test_stopping_the_store_closes_its_connection_and_stops_probing() -> None:
    client = FakeRedis("fail")
    store, clock, _ = store_with(client)
    store.startService()
    result(store.stopService() or succeed(None))
    assert client.disconnected and not clock.getDelayedCalls()
    with pytest.raises(StoreUnavailable):
        result(run(store.call("PING")))


# -- the guard with shared counts


class FakeCounts:
    """`guard.SharedCounts` answering what a test says (None: unavailable)."""

    def __init__(self, answer: SharedCount | None | Deferred[Any] = None) -> None:
        self.answer = answer
        self.admitted: list[tuple[Any, ...]] = []
        self.ended_with: list[tuple[Any, ...]] = []

    async def admit(self, attempt: str, client: str | None, user: str | None, now: float) -> SharedCount | None:
        self.admitted.append((attempt, client, user, now))
        if isinstance(self.answer, Deferred):
            return await self.answer
        return self.answer

    def ended(self, attempt: str, client: str | None, user: str | None, now: float, failed: bool) -> None:
        self.ended_with.append((attempt, client, user, failed))


def shared_guard(counts: Any, **limits: Any) -> LoginGuard:
    guard = LoginGuard(LoginLimits(**limits), Clock())
    guard.shared = counts
    return guard


def test_a_login_the_fleet_counts_refuse_is_refused_here_too() -> None:
    counts = FakeCounts(SharedCount(refused=True, client_failed=3, client_in_flight=1, user_failed=0))
    guard = shared_guard(counts, max_per_client=3)
    attempt = result(run(guard.enter(login())))
    assert attempt.refusal == "too many failed logins for this client (3 in 600s, 1 in progress)"
    assert counts.admitted[0][1:3] == ("192.0.2.7", "alice@example.org")
    # Not in flight here either: a refused login holds nothing.
    assert guard.refusal(login()) is None and guard._in_flight == {}


def test_the_fleet_counts_slow_a_user_down_and_hear_the_outcome() -> None:
    counts = FakeCounts(SharedCount(refused=False, client_failed=0, client_in_flight=0, user_failed=12))
    guard = shared_guard(counts, max_per_user=10, delay=1.0)
    attempt = result(run(guard.enter(login(user=" Alice@Example.ORG"))))
    assert attempt.refusal is None and attempt.delay == 4.0  # 2 past the limit: 1, 2, 4
    assert counts.admitted[0][2] == "alice@example.org"
    attempt.end(failed=True)
    attempt.end(failed=True)  # only the first counts
    assert [(c, u, f) for _, c, u, f in counts.ended_with] == [("192.0.2.7", "alice@example.org", True)]
    assert counts.ended_with[0][0] == counts.admitted[0][0]
    assert guard._count(("client", "192.0.2.7"), guard.clock.seconds()) == (1, 0)  # counted here too


def test_without_an_answer_from_the_fleet_this_process_decides() -> None:
    guard = shared_guard(FakeCounts(None), max_per_client=2)
    for _ in range(2):
        result(run(guard.enter(login()))).end(failed=True)
    assert result(run(guard.enter(login()))).refusal is not None  # its own count
    assert result(run(guard.enter(login(client="192.0.2.8")))).refusal is None


def test_a_login_cancelled_while_the_fleet_is_asked_is_in_flight_nowhere() -> None:
    pending: Deferred[Any] = Deferred()
    counts = FakeCounts(pending)
    guard = shared_guard(counts, max_per_client=5)
    d = run(guard.enter(login()))
    assert guard._in_flight  # counted here while the fleet is asked
    d.cancel()
    with pytest.raises(CancelledError):
        result(d)
    assert guard._in_flight == {}
    assert [f for *_, f in counts.ended_with] == [False]


def test_a_hanging_redis_holds_a_login_back_no_longer_than_its_timeout() -> None:
    client = FakeRedis("hang")
    store, clock, events = store_with(client)
    store._client = client  # running, Redis not known to be down yet
    limits = LoginLimits(max_per_client=3)
    guard = LoginGuard(limits, clock)
    guard.shared = SharedLoginCounts(store, limits)
    d = run(guard.enter(login()))
    assert not d.called
    clock.advance(0.5)
    attempt = result(d)
    assert attempt.refusal is None and attempt.delay == 0
    attempt.end(failed=True)  # Redis is down: counted here only, no wait
    assert len(client.sent) == 1 and len(warnings(events)) == 1
    assert result(run(guard.enter(login()))).refusal is None  # at once, no Redis call
    assert len(client.sent) == 1


def test_user_names_never_become_keys_of_their_own_size() -> None:
    client = FakeRedis("answer", reply=lambda command: [0, 0, 0, 0])
    store, _, _ = store_with(client)
    store._client = client
    counts = SharedLoginCounts(store, LoginLimits())
    result(run(counts.admit("a1", "2001:db8::/64", "x" * 100_000 + "\r\n\0", 100.0)))
    keys = client.sent[0][2]
    assert keys[:2] == ["mailrelay:login:failed:client:2001:db8::/64", "mailrelay:login:inflight:client:2001:db8::/64"]
    assert len(keys[2]) == len("mailrelay:login:failed:user:") + 32
    # A client that is not an address (a UNIX socket path) is a digest too.
    result(run(counts.admit("a2", "/run/x.sock" * 1000, None, 100.0)))
    assert all(len(key) < 80 for key in client.sent[1][2])


def test_a_shared_answer_that_is_not_the_scripts_is_no_answer() -> None:
    client = FakeRedis("answer", reply=lambda command: "garbage")
    store, _, _ = store_with(client)
    store._client = client
    assert result(run(SharedLoginCounts(store, LoginLimits()).admit("a", "192.0.2.7", None, 1.0))) is None


# -- the shared route cache: what goes into Redis, and what is believed coming back


def routes_store(reply: Any = None) -> tuple[SharedRoutes, FakeRedis]:
    client = FakeRedis("answer", reply=reply)
    store, _, _ = store_with(client, secret=SECRET)
    store._client = client
    return SharedRoutes(store), client


def test_an_answer_round_trips_through_the_shared_cache() -> None:
    shared, client = routes_store(reply=lambda command: 1)
    route = Route(host="10.0.0.5", port=143, tls="starttls", server_name="imap.test", forward_client=True)
    assert shared.put(b"login", "7", route, 60.0)
    ((_, _, keys, (key, epoch, value, ttl)),) = client.sent
    assert keys == ["mailrelay:route:epoch"] and epoch == "7" and ttl == "60000"
    assert key.startswith("mailrelay:route:") and len(key) == len("mailrelay:route:") + 64
    client.reply = lambda command: ["7", value, 59_000]
    found = result(run(shared.get(b"login")))
    assert found == Found(route, 59.0, "7")
    # A list of routes too.
    shared.put(b"two", "7", [route, attrs.evolve(route, port=144)], 60.0)
    value = client.sent[-1][3][2]
    client.reply = lambda command: ["7", value, 1000]
    assert result(run(shared.get(b"two"))).answer == [route, attrs.evolve(route, port=144)]


def test_a_route_carrying_a_password_never_goes_to_redis() -> None:
    shared, client = routes_store()
    master = Route(host="10.0.0.5", port=143, user="alice*master", password="master-secret")
    assert not shared.put(b"login", "0", master, 60.0)
    assert not shared.put(b"login", "0", [Route(host="10.0.0.6", port=143), master], 60.0)
    assert client.sent == []


def value_for(shared: SharedRoutes, login: bytes, epoch: str, body: str) -> str:
    return shared._mac(shared._key(login), epoch, body) + "." + body


@pytest.mark.parametrize(
    "body",
    [
        "not json",
        "[]",
        '{"v": 2, "one": true, "routes": [{"host": "h", "port": 1}]}',
        '{"v": 1, "one": true, "routes": []}',
        '{"v": 1, "one": true, "routes": [{"host": "h", "port": 0}]}',
        '{"v": 1, "one": true, "routes": [{"host": "h", "port": 1, "evil": 1}]}',
        '{"v": 1, "one": true, "routes": [{"host": "h", "port": 1, "password": "x"}]}',
        '{"v": 1, "one": true, "routes": [{"host": ["h"], "port": 1}]}',
        '{"v": 1, "one": true, "routes": [{"host": "h", "port": 1}, {"host": "h", "port": 2}]}',
        '{"v": 1, "one": true, "routes": ["h:1"]}',
    ],
)
def test_an_authentic_entry_that_is_not_a_valid_answer_is_a_miss(body: str) -> None:
    shared, client = routes_store()
    value = value_for(shared, b"login", "0", body)
    client.reply = lambda command: ["0", value, 1000]
    assert result(run(shared.get(b"login"))) == Found(None, 0.0, "0")


def test_an_entry_not_written_with_the_fleets_secret_is_a_miss() -> None:
    shared, client = routes_store()
    body = json.dumps({"v": 1, "one": True, "routes": [{"host": "attacker.example", "port": 143}]})
    forged = "0" * 64 + "." + body
    other_epoch = value_for(shared, b"login", "1", body)  # right MAC, for another epoch
    other_key = value_for(shared, b"another login", "0", body)  # right MAC, for another login
    for value in (forged, other_epoch, other_key, "x" * 100_000, ""):
        client.reply = lambda command, value=value: ["0", value, 1000]
        assert result(run(shared.get(b"login"))).answer is None
    for reply in ("garbage", None, [1, 2], ["0", ["nested"], "x"]):
        client.reply = lambda command, reply=reply: reply
        assert result(run(shared.get(b"login"))).answer is None


def test_a_shared_route_cache_needs_the_fleets_secret() -> None:
    store, _, _ = store_with(FakeRedis())
    with pytest.raises(ValueError, match="secret_file"):
        SharedRoutes(store)


# -- with a real Redis (Debian's redis-server): "two processes" in one test process


def redis_or_skip() -> Any:
    from tests.support.redis import RedisServer, redis_server_command

    if redis_server_command() is None:
        pytest.skip("redis-server is not installed (dev/test installs it)")
    server = RedisServer()
    server.start()
    return server


class FleetOfTwo:
    """Two stores on the real reactor, as two mailrelay processes have, sharing one Redis."""

    def __init__(self, server: Any, limits: LoginLimits, secret: bytes | None = None, clock: Any = None) -> None:
        from twisted.internet import reactor

        self.server = server
        self.limits = limits
        self.stores = [SharedStore(parse_redis_url(server.url), reactor, timeout=2.0, secret=secret) for _ in range(2)]
        self.events: list[list[dict[str, Any]]] = [[], []]
        self.guards = []
        for store, events in zip(self.stores, self.events, strict=True):
            store.log = Logger(observer=cast(ILogObserver, events.append))
            store.startService()
            guard = LoginGuard(limits, clock if clock is not None else reactor)
            guard.shared = SharedLoginCounts(store, limits)
            self.guards.append(guard)

    async def ready(self) -> None:
        for store in self.stores:
            await store.call("PING")

    async def stop(self) -> None:
        for store in self.stores:
            await (store.stopService() or succeed(None))


async def drain(store: SharedStore) -> None:
    """Wait until what the store sent without waiting (an END script) was run: one
    connection runs commands in order, so a PING's answer comes after theirs."""
    await store.call("PING")


@pytest.mark.slow
class RedisSharedTests(unittest.TestCase):
    """Login counts and route caches of two "processes" in one real Redis (the real
    reactor; every wait on Redis is bounded by the store's own deadline)."""

    def setUp(self) -> None:
        self.server = redis_or_skip()
        self.addCleanup(self.server.cleanup)

    def fleet(self, limits: LoginLimits, secret: bytes | None = None, clock: Any = None) -> FleetOfTwo:
        fleet = FleetOfTwo(self.server, limits, secret, clock)
        self.addCleanup(lambda: Deferred.fromCoroutine(fleet.stop()))
        return fleet

    def test_failed_logins_counted_in_one_process_refuse_in_the_other(self) -> Deferred[None]:
        async def scenario() -> None:
            fleet = self.fleet(LoginLimits(max_per_client=3, max_per_user=0, delay=0))
            await fleet.ready()
            a, b = fleet.guards
            for _ in range(3):
                (await a.enter(login())).end(failed=True)
            await drain(fleet.stores[0])
            refused = await b.enter(login(user="bob@example.org"))
            assert refused.refusal == "too many failed logins for this client (3 in 600s)"
            assert b.refusal(login()) is None  # B's own counts know nothing: the fleet's refused
            other = await b.enter(login(client="192.0.2.8"))  # another client is not affected
            assert other.refusal is None
            other.end()
            keys = self.server.keys()
            assert "mailrelay:login:failed:client:192.0.2.7" in keys
            assert self.server.command("ZCARD", "mailrelay:login:failed:client:192.0.2.7") == 3
            assert 0 < self.server.command("PTTL", "mailrelay:login:failed:client:192.0.2.7") <= 600_000
            assert not any("alice" in key for key in keys)  # user names are digests
            assert fleet.events == [[e for e in events if e["log_level"] != LogLevel.warn] for events in fleet.events]

        return Deferred.fromCoroutine(scenario())

    def test_a_users_failures_in_one_process_slow_its_logins_in_the_other(self) -> Deferred[None]:
        async def scenario() -> None:
            fleet = self.fleet(LoginLimits(max_per_client=0, max_per_user=2, delay=1.0, max_delay=8.0))
            await fleet.ready()
            a, b = fleet.guards
            for n in range(1, 5):
                (await a.enter(login(user="Alice@example.org", client=f"192.0.2.{n}"))).end(failed=True)
            await drain(fleet.stores[0])
            attempt = await b.enter(login(user="alice@EXAMPLE.org ", client="192.0.2.99"))
            assert attempt.refusal is None and attempt.delay == 4.0  # 2 past the limit of 2
            attempt.end()
            for n in range(5, 10):
                (await a.enter(login(user="alice@example.org", client=f"192.0.2.{n}"))).end(failed=True)
            await drain(fleet.stores[0])
            attempt = await b.enter(login(user="alice@example.org", client="192.0.2.99"))
            assert attempt.delay == 8.0  # max_delay
            attempt.end()
            # Bounded: a user's failures are kept only as far as they lengthen the slowdown.
            (key,) = [k for k in self.server.keys() if k.startswith("mailrelay:login:failed:user:")]
            assert self.server.command("ZCARD", key) == 2 + LoginLimits(max_per_user=2, max_delay=8.0).user_steps

        return Deferred.fromCoroutine(scenario())

    def test_logins_in_flight_count_across_processes_and_a_dead_ones_expire(self) -> Deferred[None]:
        async def scenario() -> None:
            from mailrelay.shared.limits import IN_FLIGHT_TTL

            clock = Clock()
            clock.advance(1_800_000_000)
            fleet = self.fleet(LoginLimits(max_per_client=2, max_per_user=0, delay=0), clock=clock)
            await fleet.ready()
            a, b = fleet.guards
            first, second = await a.enter(login()), await b.enter(login())
            assert first.refusal is None and second.refusal is None
            third = await b.enter(login())
            assert third.refusal == "too many failed logins for this client (0 in 600s, 2 in progress)"
            first.end()
            await drain(fleet.stores[0])
            fourth = await b.enter(login())
            assert fourth.refusal is None
            fourth.end()
            await drain(fleet.stores[1])
            # Process A dies with a login in flight: it is forgotten IN_FLIGHT_TTL later.
            crashed = await a.enter(login())
            assert crashed.refusal is None
            assert (await b.enter(login())).refusal is not None  # second's and crashed's
            clock.advance(IN_FLIGHT_TTL)
            second.end()
            await drain(fleet.stores[1])
            assert (await b.enter(login())).refusal is None

        return Deferred.fromCoroutine(scenario())

    def test_redis_stopped_under_the_fleet_logins_go_on_with_one_warning_each(self) -> Deferred[None]:
        async def scenario() -> None:
            fleet = self.fleet(LoginLimits(max_per_client=2, max_per_user=0, delay=0))
            await fleet.ready()
            a, b = fleet.guards
            (await a.enter(login())).end(failed=True)
            self.server.stop()
            for _ in range(3):
                for guard in (a, b):
                    attempt = await guard.enter(login(client="192.0.2.50"))
                    assert attempt.refusal is None  # never refused because Redis is down
                    attempt.end()
            for events in fleet.events:
                assert len(warnings(events)) == 1, warnings(events)
                assert "unavailable" in warnings(events)[0]
            # Local counts go on: A counted one failure before, and counts this one.
            (await a.enter(login())).end(failed=True)
            assert (await a.enter(login())).refusal is not None
            # Back: each process says so once, and shares again.
            self.server.start()
            for store in fleet.stores:
                while not store.available:
                    await deferLater(reactor, 0.05)  # the store's own probe finds it
            for events in fleet.events:
                assert sum("is back" in line for line in infos(events)) == 1

        from twisted.internet import reactor
        from twisted.internet.task import deferLater

        return Deferred.fromCoroutine(scenario())

    def test_a_route_one_process_got_is_served_to_the_other_from_redis(self) -> Deferred[None]:
        async def scenario() -> None:
            from twisted.internet import reactor

            from mailrelay.routers.cache import CachingRouter

            fleet = self.fleet(LoginLimits(), secret=SECRET)
            await fleet.ready()
            asked: list[RouteRequest] = []

            @implementer(IRouter)
            class AuthService:
                verifies_passwords = False

                def route(self, request: RouteRequest) -> Route:
                    asked.append(request)
                    if request.user == "master@example.org":
                        return Route(host="10.0.0.6", port=143, user="master*x", password="MASTER-PW")
                    return Route(host="10.0.0.5", port=143, forward_client=True)

            caches = [CachingRouter(AuthService(), 300.0, 100, reactor) for _ in range(2)]
            for cache, store in zip(caches, fleet.stores, strict=True):
                cache.share(SharedRoutes(store))
            a, b = caches
            route = await a.route(login(password="right"))
            await drain(fleet.stores[0])
            assert await b.route(login(password="right")) == route
            assert len(asked) == 1  # B was served from Redis
            await b.route(login(password="wrong"))  # another password is another entry
            await drain(fleet.stores[1])
            assert len(asked) == 2
            (key,) = [k for k in self.server.keys("mailrelay:route:*") if k != "mailrelay:route:epoch"][:1]
            dump = self.server.dump()
            assert "right" not in dump and "alice" not in dump
            # A route carrying a password stays in A's memory.
            before = self.server.keys()
            await a.route(login(user="master@example.org", password="pw"))
            await drain(fleet.stores[0])
            assert self.server.keys() == before and "MASTER-PW" not in self.server.dump()
            await b.route(login(user="master@example.org", password="pw"))
            assert len(asked) == 4
            # Garbage in an entry is a miss, not a crash.
            for entry in self.server.keys("mailrelay:route:*"):
                if entry != "mailrelay:route:epoch":
                    self.server.command("SET", entry, "garbage", "KEEPTTL")
            c = CachingRouter(AuthService(), 300.0, 100, reactor)
            c.share(SharedRoutes(fleet.stores[1]))
            assert await c.route(login(password="right")) == route
            assert len(asked) == 5
            # A reload anywhere makes every shared entry unreadable.
            await drain(fleet.stores[1])
            a.reload()
            await drain(fleet.stores[0])
            d = CachingRouter(AuthService(), 300.0, 100, reactor)
            d.share(SharedRoutes(fleet.stores[1]))
            await d.route(login(password="right"))
            assert len(asked) == 6
            del key

        return Deferred.fromCoroutine(scenario())


# -- the test: two twistd processes, one Redis, a real Dovecot

USERS = {"alice@example.test": "alice-secret", "bob@example.test": "bob-secret"}


class IMAPFrom(imaplib.IMAP4):
    """imaplib connecting to 127.0.0.1 from `source`."""

    def __init__(self, port: int, source: str) -> None:
        self.source = source
        super().__init__("127.0.0.1", port, timeout=WAIT)

    def _create_socket(self, timeout: Any) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout, source_address=(self.source, 0))


def imap_login(port: int, user: str, password: str, source: str = "127.0.0.1") -> None:
    """Log in (raising imaplib's error when refused) and out."""
    client = IMAPFrom(port, source)
    try:
        client.login(user, password)
        client.select("INBOX", readonly=True)
    except BaseException:
        client.shutdown()
        raise
    client.logout()


def auth_answer(dovecot_port: int) -> Callable[[Any], Any]:
    """An auth_http service that knows the users' passwords; bob's answer names the
    password to log in upstream with (as a master-password setup does)."""

    def decide(seen: Any) -> Any:
        user, password = seen.get("Auth-User"), seen.get("Auth-Pass")
        if USERS.get(user) != password:
            return 200, [("Auth-Status", "Invalid login or password"), ("Auth-Wait", "0")], b""
        headers = [("Auth-Status", "OK"), ("Auth-Server", "127.0.0.1"), ("Auth-Port", str(dovecot_port))]
        if user.startswith("bob"):
            headers.append(("Auth-Pass", password))
        return 200, headers, b""

    return decide


@pytest.mark.slow
def test_two_mailrelay_processes_share_login_limits_and_routes_through_redis(tmp_path: Any, spawn: Any) -> None:
    """Failed logins counted in one process refuse in the other, an answer one got is
    served to the other from Redis (never one carrying a password), garbage in Redis is
    a miss, and with Redis stopped logins still work, with one warning per process."""
    from tests.support.dovecot import Dovecot
    from tests.support.httpauth import AuthService
    from tests.support.processes import LISTENING, TWISTD, assert_clean_stop

    redis = redis_or_skip()
    directory = tempfile.mkdtemp(prefix="mailrelay-shared-")
    os.chmod(directory, 0o755)
    try:
        with Dovecot(directory, users=USERS) as dovecot:
            auth = AuthService(auth_answer(dovecot.imap_port))
            try:
                (tmp_path / "fleet.secret").write_text("0123456789abcdef0123456789abcdef\n")
                (tmp_path / "mailrelay.toml").write_text(
                    f'[redis]\nurl = "{redis.url}"\ntimeout = 1\nsecret_file = "fleet.secret"\n'
                    "[login_limits]\nmax_per_client = 3\nmax_per_user = 0\ndelay = 0\n"
                    f'[router]\ntype = "http"\nurl = "{auth.url}"\ncache_ttl = 300\n'
                    '[[listener]]\nname = "imap"\nlisten = "tcp:0:interface=127.0.0.1"\nmode = "starttls"\n'
                    'protocol = "imap"\nstarttls = "optional"\n'
                )
                a = spawn(TWISTD, "-n", "--pidfile=", "mailrelay", "--config", "mailrelay.toml")
                b = spawn(TWISTD, "-n", "--pidfile=", "mailrelay", "--config", "mailrelay.toml")
                port_a = int(a.wait_for(LISTENING.format(name="imap")).group(1))
                port_b = int(b.wait_for(LISTENING.format(name="imap")).group(1))

                # The route cache: A asks the auth service and stores the answer in Redis...
                imap_login(port_a, "alice@example.test", "alice-secret")
                assert len(auth.requests) == 1
                (entry,) = [key for key in redis.keys("mailrelay:route:*") if key != "mailrelay:route:epoch"]
                # ...garbage there is a miss for B: it asks, and the login works...
                redis.command("SET", entry, "garbage", "KEEPTTL")
                imap_login(port_b, "alice@example.test", "alice-secret")
                assert len(auth.requests) == 2
                # ...and an authentic entry A stored serves B.
                imap_login(port_a, "alice@example.test", "alice-secret", source="127.0.0.4")
                imap_login(port_b, "alice@example.test", "alice-secret", source="127.0.0.4")
                assert len(auth.requests) == 3
                # An answer carrying the upstream password is not shared (nor in Redis).
                imap_login(port_a, "bob@example.test", "bob-secret")
                imap_login(port_b, "bob@example.test", "bob-secret")
                assert len(auth.requests) == 5
                dump = redis.dump()
                assert "secret" not in dump and "alice" not in dump and "bob" not in dump, dump
                assert not any("127.0.0." in key for key in redis.keys())  # keys say nothing of a login

                # Login limits: three failures through A refuse the client in B, unasked.
                for _ in range(3):
                    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED|Invalid"):
                        imap_login(port_a, "alice@example.test", "wrong", source="127.0.0.2")
                asked = len(auth.requests)
                with pytest.raises(imaplib.IMAP4.error, match=r"UNAVAILABLE\] Too many failed logins"):
                    imap_login(port_b, "alice@example.test", "alice-secret", source="127.0.0.2")
                assert len(auth.requests) == asked
                b.wait_for(r"outcome=throttled")

                # Redis stops: logins still work, through both, with one warning each.
                redis.stop()
                for port in (port_a, port_b, port_a, port_b):
                    imap_login(port, "alice@example.test", "alice-secret", source="127.0.0.3")
                for process in (a, b):
                    process.wait_for("unavailable: .*using this process's own login counts")
                imap_login(port_b, "bob@example.test", "bob-secret", source="127.0.0.3")
                for process in (a, b):
                    process.signal(signal.SIGTERM)
                outputs = [assert_clean_stop(process) for process in (a, b)]
            finally:
                auth.close()
    finally:
        redis.cleanup()
        shutil.rmtree(directory, ignore_errors=True)
    for output in outputs:
        assert len(re.findall(r"redis at 127\.0\.0\.1:\d+ db 0 unavailable", output)) == 1, output
        assert "secret" not in output.replace("secret_file", "").replace("fleet.secret", ""), output
