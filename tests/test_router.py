"""The Router contract: values, every answering style, and the built-in routers."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from mailrelay import IRouter, Reject, Route, Router, RouteRequest
from mailrelay.ask import ask_router
from mailrelay.configtable import Errors, Table
from mailrelay.router import RouterError, format_address
from mailrelay.routers.python import load_class
from mailrelay.routers.static import StaticRouter
from mailrelay.routerspec import parse_router
from mailrelay.testing import resolve, route_request

REQUEST = route_request(
    listener="submission",
    protocol="smtp",
    client=("192.0.2.7", 51514),
    local=("198.51.100.1", 587),
    user="alice@example.com",
    password="hunter2-secret",
)
A = Route(host="10.0.0.5", port=25)
B = Route(host="10.0.0.6", port=25)


def outcome(d: Deferred[Any]) -> Any:
    """The result of an already-fired Deferred, or its Failure."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    return results[0]


class FunctionRouter(Router):
    def __init__(self, answer: Any) -> None:
        self.answer = answer

    def route(self, request: RouteRequest) -> Any:
        return self.answer(request)


def ask(answer: Any, clock: Clock | None = None, timeout: float = 5) -> Any:
    return outcome(ask_router(FunctionRouter(answer), REQUEST, clock or Clock(), timeout))


def test_password_is_never_in_the_repr_of_requests_or_routes() -> None:
    route = Route(host="h", port=1, user="u", password="hunter2-secret")
    assert "hunter2-secret" not in repr(REQUEST)
    assert "hunter2-secret" not in repr(route)
    assert "alice@example.com" in repr(REQUEST)


def test_requests_and_routes_are_read_only() -> None:
    with pytest.raises(AttributeError):
        REQUEST.user = "mallory"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        A.port = 26  # type: ignore[misc]


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"host": "", "port": 25}, "host must be a non-empty string"),
        ({"host": "h", "port": 0}, "port must be an integer from 1 to 65535"),
        ({"host": "h", "port": 65536}, "port must be an integer from 1 to 65535"),
        ({"host": "h", "port": True}, "port must be an integer"),
        ({"host": "h", "port": 25, "tls": "ssl"}, "tls must be one of 'none', 'tls', 'starttls'"),
        ({"host": "h", "port": 25, "login": "magic"}, "login must be one of"),
        ({"host": "h", "port": 25, "proxy_protocol": 3}, "proxy_protocol must be one of None, 1, 2"),
        ({"host": "h", "port": 25, "tls_verify": "no"}, "tls_verify"),
    ],
)
def test_invalid_routes_are_refused_at_construction(fields: dict[str, Any], message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        Route(**fields)


def test_route_defaults_are_the_safe_ones() -> None:
    assert (A.tls, A.tls_verify, A.login, A.proxy_protocol) == ("none", True, "passthrough", None)


@pytest.mark.parametrize(
    "address, text",
    [(("10.0.0.5", 25), "10.0.0.5:25"), (("::1", 143), "[::1]:143"), (("/run/mail.sock", 0), "/run/mail.sock")],
)
def test_addresses_are_written_as_administrators_write_them(address: tuple[str, int], text: str) -> None:
    assert format_address(address) == text


def test_router_may_answer_with_a_plain_route() -> None:
    assert ask(lambda r: A) == [A]


def test_router_may_answer_with_a_list_of_fallbacks() -> None:
    assert ask(lambda r: [A, B]) == [A, B]
    assert ask(lambda r: (B, A)) == [B, A]


def test_router_may_answer_with_a_deferred() -> None:
    assert ask(lambda r: succeed(A)) == [A]


def test_router_may_answer_from_a_coroutine() -> None:
    class Async(Router):
        async def route(self, request: RouteRequest) -> Route:
            return Route(host=request.user.split("@")[1], port=143) if request.user else A

    assert resolve(Async(), REQUEST) == [Route(host="example.com", port=143)]


def test_router_awaiting_a_deferred_inside_a_coroutine() -> None:
    gate: Deferred[Route] = Deferred()

    class Waits(Router):
        async def route(self, request: RouteRequest) -> Route:
            return await gate

    d = ask_router(Waits(), REQUEST, Clock(), 5)
    assert not d.called
    gate.callback(B)
    assert outcome(d) == [B]


def test_reject_reaches_the_caller_with_its_wait_and_code() -> None:
    def refuse(request: RouteRequest) -> Route:
        raise Reject("unknown user", wait=2, code=550)

    failure = ask(refuse)
    assert isinstance(failure, Failure)
    reject = failure.value
    assert isinstance(reject, Reject)
    assert (reject.message, reject.wait, reject.code) == ("unknown user", 2.0, 550)


def test_reject_from_a_coroutine_and_a_deferred() -> None:
    class Async(Router):
        async def route(self, request: RouteRequest) -> Route:
            raise Reject("no", wait=1)

    assert outcome(ask_router(Async(), REQUEST, Clock(), 5)).check(Reject)
    d: Deferred[Route] = Deferred()
    d.errback(Reject("no"))
    assert ask(lambda r: d).check(Reject)


@pytest.mark.parametrize("answer", [None, "10.0.0.5:25", [], [A, "b"], {"host": "h"}])
def test_an_answer_that_is_not_routes_is_a_router_error(answer: Any) -> None:
    failure = ask(lambda r: answer)
    assert failure.check(RouterError)
    assert "expected a Route or a non-empty list of Routes" in str(failure.value)


def test_an_exception_is_a_router_error_that_keeps_its_cause() -> None:
    failure = ask(lambda r: 1 / 0)
    assert failure.check(RouterError)
    assert isinstance(failure.value.__cause__, ZeroDivisionError)


def test_a_router_that_does_not_answer_in_time_is_cancelled() -> None:
    clock = Clock()
    cancelled: list[bool] = []
    pending: Deferred[Route] = Deferred(lambda d: cancelled.append(True))
    d = ask_router(FunctionRouter(lambda r: pending), REQUEST, clock, timeout=3)
    clock.advance(2.9)
    assert not d.called
    clock.advance(0.2)
    failure = outcome(d)
    assert failure.check(RouterError) and str(failure.value) == "router did not answer within 3s"
    assert cancelled == [True]


def test_cancelling_the_question_cancels_the_router() -> None:
    cancelled: list[bool] = []
    pending: Deferred[Route] = Deferred(lambda d: cancelled.append(True))
    d = ask_router(FunctionRouter(lambda r: pending), REQUEST, Clock(), timeout=3)
    d.cancel()
    assert cancelled == [True]
    assert outcome(d).check(CancelledError)


def test_base_router_must_be_subclassed() -> None:
    assert IRouter.providedBy(Router())
    with pytest.raises(RouterError, match="Router must implement route"):
        resolve(Router(), REQUEST)


def test_static_router_answers_its_routes_in_order() -> None:
    router = StaticRouter((A, B))
    assert IRouter.providedBy(router)
    assert resolve(router, REQUEST) == [A, B]


def _router_table(data: dict[str, Any]) -> tuple[Any, list[str]]:
    errors = Errors("test.toml")
    table = Table(data, "router", errors)
    spec = parse_router(table)
    table.finish()
    return spec, errors.lines


def test_static_router_from_a_table_with_every_route_field() -> None:
    spec, errors = _router_table(
        {
            "type": "static",
            "host": "mx.example.net",
            "port": 465,
            "tls": "tls",
            "tls_verify": False,
            "server_name": "smtp.example.net",
            "user": "relay",
            "password": "s3cret",
            "login": "xclient",
            "proxy_protocol": 2,
            "auth_mechanism": "login",
            "forward_client": True,
        }
    )
    assert errors == []
    assert spec.build().routes == (
        Route(
            host="mx.example.net",
            port=465,
            tls="tls",
            tls_verify=False,
            server_name="smtp.example.net",
            user="relay",
            password="s3cret",
            login="xclient",
            proxy_protocol=2,
            auth_mechanism="login",
            forward_client=True,
        ),
    )
    assert "s3cret" not in spec.description
    assert "forward_client" in spec.description


def test_static_router_table_errors_name_their_key() -> None:
    spec, errors = _router_table({"type": "static", "routes": [{"host": "a", "port": 25}, {"host": "b", "port": "x"}]})
    assert spec is None
    assert errors == ["test.toml: router.routes[1].port: must be an integer, not a string ('x')"]
    spec, errors = _router_table({"type": "static", "routes": []})
    assert errors == ["test.toml: router.routes: must list at least one route"]
    spec, errors = _router_table({"type": "carrier-pigeon"})
    assert errors == ['test.toml: router.type: must be one of "static", "python", "http", "map", not "carrier-pigeon"']


class OptionRouter(Router):
    def __init__(self, upstream: str, port: int = 25) -> None:
        self.route_to = Route(host=upstream, port=port)

    def route(self, request: RouteRequest) -> Route:
        return self.route_to


def test_python_router_is_built_with_the_table_options() -> None:
    spec, errors = _router_table({"type": "python", "class": f"{__name__}:OptionRouter", "upstream": "10.1.1.1", "port": 2525})
    assert errors == []
    router = spec.build()
    assert isinstance(router, OptionRouter) and router.route_to == Route(host="10.1.1.1", port=2525)
    assert spec.description == f"python: {__name__}:OptionRouter with port, upstream"


@pytest.mark.parametrize(
    "spec, message",
    [
        ("tests.test_router", 'must look like "package.module:Class"'),
        ("tests.test_router:NoSuchThing", 'has no "NoSuchThing"'),
        ("tests.test_router:REQUEST", "is not a class"),
        ("tests.test_router:Clock", "is not a Router"),
        ("no_such_module_here:X", 'cannot import module "no_such_module_here"'),
    ],
)
def test_python_router_class_errors(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_class(spec)


@given(st.text(min_size=1), st.integers(min_value=1, max_value=65535))
def test_any_host_and_valid_port_make_a_route(host: str, port: int) -> None:
    route = Route(host=host, port=port)
    assert route.address.endswith(f":{port}") or host.startswith("/")
