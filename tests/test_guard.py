"""
Brute-force defence (`[login_limits]`): failed logins counted per client address and
per user; past the limit, logins are refused as a temporary failure without asking the
Router; the counts expire.
"""

from __future__ import annotations

import socket
from typing import Any

import pytest
from twisted.internet import reactor
from twisted.internet.task import Clock

from mailrelay.config import ConfigError, ListenerConfig, parse_config
from mailrelay.connector import UpstreamConnector
from mailrelay.guard import LoginGuard, LoginLimits, client_block
from mailrelay.listener import ListenerFactory
from mailrelay.router import Reject, Route, RouteRequest
from mailrelay.session import Sessions
from tests.support import WAIT, LogCapture, ProxyTestCase, echo, read_line
from tests.test_starttls import ToyFrontEnd


def login(user: str = "alice@example.org", client: str = "192.0.2.7") -> RouteRequest:
    return RouteRequest(
        listener="imap", protocol="imap", mode="starttls", client=(client, 40000), local=("192.0.2.1", 143), user=user
    )


def guard(**limits: Any) -> tuple[LoginGuard, Clock]:
    clock = Clock()
    return LoginGuard(LoginLimits(**limits), clock), clock


def test_a_user_past_the_limit_is_refused_until_the_failures_expire() -> None:
    g, clock = guard(window=600, max_per_user=3, max_per_client=0)
    for n in range(3):
        assert g.refusal(login()) is None
        g.failed(login(client=f"198.51.100.{n}"))  # from anywhere: counted for the user
        clock.advance(10)
    assert g.refusal(login()) == "too many failed logins for this user (3 in 600s)"
    assert g.refusal(login(user="ALICE@example.org")) is not None  # user names compared without case
    assert g.refusal(login(user="bob@example.org")) is None
    clock.advance(600 - 30 + 1)  # the first failure is now older than the window
    assert g.refusal(login()) is None


def test_an_address_past_the_limit_is_refused_whatever_the_user() -> None:
    g, clock = guard(window=60, max_per_client=4, max_per_user=0)
    for n in range(4):
        g.failed(login(user=f"user{n}@example.org"))
    assert g.refusal(login(user="anyone@example.org")) == "too many failed logins for this client (4 in 60s)"
    assert g.refusal(login(client="192.0.2.8")) is None
    clock.advance(61)
    assert g.refusal(login(user="anyone@example.org")) is None


def test_ipv6_clients_are_counted_per_64_and_mapped_ipv4_as_ipv4() -> None:
    assert client_block("2001:db8:1:2:aaaa::1") == client_block("2001:db8:1:2:bbbb::2") == "2001:db8:1:2::/64"
    assert client_block("2001:db8:1:3::1") != client_block("2001:db8:1:2::1")
    assert client_block("::ffff:192.0.2.7") == "192.0.2.7"
    g, _ = guard(max_per_client=2, max_per_user=0)
    g.failed(login(client="2001:db8:1:2::10"))
    g.failed(login(client="2001:db8:1:2::20"))
    assert g.refusal(login(client="2001:db8:1:2::30")) is not None


def test_requests_without_a_user_are_neither_counted_nor_refused() -> None:
    g, _ = guard(max_per_client=1)
    anonymous = RouteRequest(listener="relay", protocol="none", mode="splice", client=("192.0.2.7", 1), local=("::", 25))
    g.failed(anonymous)
    assert g.refusal(anonymous) is None
    assert g.refusal(login()) is None


def test_memory_is_bounded() -> None:
    g, _ = guard(max_per_client=0, max_per_user=5)
    g.max_keys = 100
    for n in range(1000):
        g.failed(login(user=f"made-up-{n}@example.org"))
    assert len(g._failures) == 100


def test_reaching_the_limit_is_logged_once() -> None:
    from twisted.logger import globalLogPublisher

    logs = LogCapture()
    globalLogPublisher.addObserver(logs)
    try:
        g, _ = guard(max_per_user=2, max_per_client=0)
        for _ in range(4):
            g.failed(login())
    finally:
        globalLogPublisher.removeObserver(logs)
    lines = [line for line in logs.lines() if line.startswith("login limit reached")]
    assert lines == ["login limit reached: 2 failed logins for user alice@example.org within 600s; refusing its logins for now"]


@pytest.mark.parametrize(
    "table, error",
    [
        ({"window": 0}, "login_limits.window: must be a positive number of seconds, not 0"),
        ({"max_per_user": -1}, "login_limits.max_per_user: must be from 0 to 1000000, not -1"),
        ({"delay": -2}, "login_limits.delay: must be 0 or more seconds, not -2"),
        ({"maximum": 3}, "login_limits.maximum: unknown key"),
    ],
)
def test_login_limits_errors(table: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(
            {
                "login_limits": table,
                "router": {"type": "static", "host": "127.0.0.1", "port": 1},
                "listener": [{"name": "l", "listen": "tcp:0", "mode": "splice"}],
            }
        )
    assert caught.value.errors == [f"<config>: {error}"]


def test_login_limits_defaults_and_settings() -> None:
    base = {
        "router": {"type": "static", "host": "127.0.0.1", "port": 1},
        "listener": [{"name": "l", "listen": "tcp:0", "mode": "splice"}],
    }
    assert parse_config(base).login_limits == LoginLimits(window=600, max_per_client=20, max_per_user=10, delay=1)
    custom = parse_config({"login_limits": {"window": 60, "max_per_client": 0, "max_per_user": 3, "delay": 0}, **base})
    assert custom.login_limits == LoginLimits(window=60, max_per_client=0, max_per_user=3, delay=0)


class PasswordRouter:
    """An auth service in miniature: one right password; counts the questions."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.asked = 0

    def route(self, request: RouteRequest) -> Route:
        self.asked += 1
        if request.password != "right":
            raise Reject("invalid credentials")
        return Route(host="127.0.0.1", port=self.port)


class GuardedSessionTests(ProxyTestCase):
    """Through real client sessions, with a small line protocol's LOGIN."""

    def listen(self, router: PasswordRouter, limits: LoginLimits) -> int:
        listener = ListenerConfig(name="toy", listen="tcp:0", mode="starttls", protocol="imap", router=None)
        factory = ListenerFactory(
            listener,
            router,
            UpstreamConnector(reactor, 5),
            Sessions(reactor),
            reactor,
            connection_class=ToyFrontEnd,
            guard=LoginGuard(limits, reactor),
        )
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    async def test_past_the_limit_the_router_is_not_asked_and_the_reply_is_temporary(self) -> None:
        upstream = self.server(echo)
        router = PasswordRouter(upstream.port)
        port = self.listen(router, LoginLimits(window=600, max_per_client=0, max_per_user=3, delay=0))

        def attempt(password: str) -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as conn:
                read_line(conn)
                conn.sendall(f"LOGIN alice@example.org {password}\r\n".encode())
                return read_line(conn)

        for _ in range(3):
            self.assertEqual(await self.in_thread(attempt, "guess"), b"NO invalid credentials\r\n")
        self.assertEqual(router.asked, 3)
        # Now even the right password gets the temporary refusal, and the router rests.
        self.assertEqual(await self.in_thread(attempt, "right"), b"TEMP throttled\r\n")
        self.assertEqual(router.asked, 3)
        outcomes = [(e["user"], e["outcome"], e["reason"]) for e in self.logs.sessions()]
        self.assertEqual(outcomes[-1], ("alice@example.org", "throttled", "too many failed logins for this user (3 in 600s)"))
        self.assertNotIn("guess", " ".join(self.logs.lines()))
