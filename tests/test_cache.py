"""Route caching (`cache_ttl` on a router): what is remembered, for whom, and how long."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from zope.interface import implementer

from mailrelay.config import ConfigError, parse_config
from mailrelay.router import ClientCertificate, IRouter, Reject, Route, RouteRequest, RouterError
from mailrelay.routers import components
from mailrelay.routers.cache import CachingRouter

UPSTREAM = Route(host="10.0.0.5", port=143)


def login(user: str | None = "alice@example.org", password: str | None = "right", **fields: Any) -> RouteRequest:
    values: dict[str, Any] = dict(
        listener="imap",
        protocol="imap",
        mode="tls",
        client=("192.0.2.7", 50000),
        local=("192.0.2.1", 993),
        tls=True,
        auth_method="plain",
    )
    values.update(fields)
    return RouteRequest(user=user, password=password, **values)


@implementer(IRouter)
class CountingRouter:
    """Answers like an auth service would, counting the questions."""

    verifies_passwords = False  # undeclared, as IRouter's default

    def __init__(self) -> None:
        self.asked: list[RouteRequest] = []

    async def route(self, request: RouteRequest) -> Route:
        self.asked.append(request)
        if request.password == "down":
            raise RouterError("auth service down")
        if request.password != "right":
            raise Reject("invalid credentials", wait=2)
        return UPSTREAM


def ask(router: CachingRouter, request: RouteRequest) -> Any:
    """The router's answer, or the exception it raised (the coroutine finishes synchronously here)."""
    result: list[Any] = []
    Deferred.fromCoroutine(router.route(request)).addBoth(result.append)
    [answer] = result
    return answer.value if hasattr(answer, "value") and isinstance(answer.value, Exception) else answer


def cache(ttl: float = 60, size: int = 100) -> tuple[CachingRouter, CountingRouter, Clock]:
    inner, clock = CountingRouter(), Clock()
    return CachingRouter(inner, ttl, size, clock), inner, clock


def test_the_router_is_asked_once_for_many_logins_within_the_ttl() -> None:
    router, inner, clock = cache(ttl=60)
    for _ in range(50):
        assert ask(router, login(client=("192.0.2.7", 50000 + _))) is UPSTREAM  # a new port each time
        clock.advance(1)
    assert len(inner.asked) == 1
    clock.advance(11)  # 61 s after the first answer
    assert ask(router, login()) is UPSTREAM
    assert len(inner.asked) == 2


def test_failures_are_never_remembered() -> None:
    router, inner, _ = cache()
    for _ in range(3):
        assert isinstance(ask(router, login(password="wrong")), Reject)
        assert isinstance(ask(router, login(password="down")), RouterError)
    assert len(inner.asked) == 6
    # ...and a success after failures is remembered from then on.
    assert ask(router, login()) is UPSTREAM
    assert ask(router, login()) is UPSTREAM
    assert len(inner.asked) == 7


def test_a_different_password_or_address_or_listener_is_asked_about() -> None:
    router, inner, _ = cache()
    assert ask(router, login()) is UPSTREAM
    # A cached success must never let another password in.
    assert isinstance(ask(router, login(password="wrong")), Reject)
    assert ask(router, login(client=("198.51.100.9", 1))) is UPSTREAM
    assert ask(router, login(listener="submission", protocol="smtp")) is UPSTREAM
    assert ask(router, login(tls=False)) is UPSTREAM
    assert ask(router, login(sni="mail.other.org")) is UPSTREAM
    assert len(inner.asked) == 6


def test_two_certificates_with_one_subject_never_share_an_answer() -> None:
    """An EXTERNAL login's user is its certificate's subject, which another CA (or the
    same one, again) can issue to someone else: the answer for one certificate is
    never served to another, whose Router might decide differently."""
    subject = "CN=alice,O=Example"
    bob = ClientCertificate(subject=subject, issuer="CN=Client CA", serial="1A", fingerprint="aa" * 20)
    other = ClientCertificate(subject=subject, issuer="CN=Client CA", serial="2B", fingerprint="bb" * 20)
    asked: list[RouteRequest] = []

    def decide(request: RouteRequest) -> Route:
        asked.append(request)
        if request.client_cert is not None and request.client_cert.serial != "1A":
            raise Reject("certificate revoked")
        return UPSTREAM

    router = CachingRouter(type("Inner", (), {"route": staticmethod(decide)})(), 60, 100, Clock())

    def external(cert: ClientCertificate) -> RouteRequest:
        return login(user=subject, password=None, auth_method="external", client_cert=cert)

    assert ask(router, external(bob)) is UPSTREAM
    assert ask(router, external(bob)) is UPSTREAM  # cached for that certificate...
    for _ in range(2):  # ...and never for the other one
        assert isinstance(ask(router, external(other)), Reject)
    assert [r.client_cert for r in asked] == [bob, other, other]
    assert ask(router, login(user=subject, password=None, auth_method="external")) is UPSTREAM  # without one: its own key
    assert len(asked) == 4


def test_requests_without_a_user_and_challenge_logins_are_not_cached() -> None:
    router, inner, _ = cache()
    for request in [login(user=None, password=None), login(auth_method="cram-md5", salt="<1.2@mx>")]:
        ask(router, request)
        ask(router, request)
    assert len(inner.asked) == 4


def test_the_cache_is_bounded_and_emptied_on_reload() -> None:
    router, inner, _ = cache(size=3)
    users = [f"user{i}@example.org" for i in range(5)]
    for user in users:
        ask(router, login(user=user))
    assert len(router) == 3
    ask(router, login(user=users[-1]))  # still there
    ask(router, login(user=users[0]))  # forgotten: asked again
    assert len(inner.asked) == 6
    router.reload()
    assert len(router) == 0
    ask(router, login(user=users[-1]))
    assert len(inner.asked) == 7


def test_no_password_is_kept_in_the_cache() -> None:
    router, _, _ = cache()
    ask(router, login(password="right"))
    [key] = list(router._entries)
    assert "right" not in repr(key) and b"right" not in b"".join(k for k in key if isinstance(k, bytes))


def test_cache_ttl_wraps_any_router_type() -> None:
    config = parse_config(
        {
            "router": {"type": "static", "host": "10.0.0.5", "port": 143, "cache_ttl": 30, "cache_size": 5},
            "listener": [{"name": "l", "listen": "tcp:0", "mode": "splice"}],
        }
    )
    assert config.router is not None
    assert config.router.description == "static: 10.0.0.5:143 (answers cached 30s)"
    built = config.router.build(Clock())
    assert isinstance(built, CachingRouter) and (built.ttl, built.size) == (30, 5)
    assert [type(c).__name__ for c in components(built)] == ["CachingRouter", "StaticRouter"]


@pytest.mark.parametrize(
    "keys, error",
    [
        ({"cache_ttl": 0}, "router.cache_ttl: must be a positive number of seconds, not 0"),
        ({"cache_ttl": "1m"}, "router.cache_ttl: must be a number of seconds, not a string ('1m')"),
        ({"cache_ttl": 5, "cache_size": 0}, "router.cache_size: must be from 1 to 10000000, not 0"),
    ],
)
def test_cache_settings_errors(keys: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(
            {
                "router": {"type": "static", "host": "10.0.0.5", "port": 143, **keys},
                "listener": [{"name": "l", "listen": "tcp:0", "mode": "splice"}],
            }
        )
    assert caught.value.errors == [f"<config>: {error}"]


def test_a_router_whose_answers_changed_empties_the_cache() -> None:
    router, inner, _ = cache()
    inner.generation = 1  # type: ignore[attr-defined]  # what a file map router keeps
    router._generation = 1
    ask(router, login())
    ask(router, login())
    assert len(inner.asked) == 1
    inner.generation = 2  # type: ignore[attr-defined]  # its file was re-read
    ask(router, login())
    assert len(inner.asked) == 2


def test_a_cached_route_map_answers_from_its_new_file_at_once(tmp_path: Any) -> None:
    routes = tmp_path / "routes.toml"
    routes.write_text('[default]\nhost = "10.0.0.5"\nport = 143\n')
    config = parse_config(
        {
            "router": {"type": "map", "file": str(routes), "check_interval": 1, "cache_ttl": 600},
            "listener": [{"name": "l", "listen": "tcp:0", "mode": "splice"}],
        }
    )
    assert config.router is not None
    clock = Clock()
    router = config.router.build(clock)
    assert isinstance(router, CachingRouter)  # cache_ttl wraps the map
    file_map = components(router)[-1]
    file_map.startService()
    try:
        assert ask(router, login()) == [Route(host="10.0.0.5", port=143)]
        routes.write_text('[default]\nhost = "10.0.0.66"\nport = 1143\n')
        clock.advance(1)  # the map sees its file changed
        assert ask(router, login()) == [Route(host="10.0.0.66", port=1143)]
    finally:
        file_map.stopService()
