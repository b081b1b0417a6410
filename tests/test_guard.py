"""
Brute-force defence (`[login_limits]`): failed logins and logins in flight counted per
client address and per user; past the client's limit, logins are refused as a
temporary failure without asking the Router; past the user's, they are held back
longer and longer but still asked about; the counts expire. Also the bound on password
checks a map router runs at once and keeps waiting.

Unit tests use `twisted.internet.task.Clock` and Deferreds fired by hand; the end-to-end
tests drive real POP3 sessions (poplib, from chosen loopback addresses) through a map
router with a bcrypt hash, and count what reaches the hash check.
"""

from __future__ import annotations

import ipaddress
import poplib
import socket
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import bcrypt
import pytest
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock, deferLater
from twisted.python.failure import Failure

from mailrelay.ask import ask_router
from mailrelay.config import ConfigError, ListenerConfig, parse_config
from mailrelay.configtable import Errors, Table
from mailrelay.connector import UpstreamConnector
from mailrelay.guard import LoginGuard, LoginLimits, client_block, user_key
from mailrelay.listener import ListenerFactory
from mailrelay.router import Reject, Route, RouteRequest, RouterError
from mailrelay.routers import passwords as map_router  # its verify_password is what a map router runs
from mailrelay.routers.passwords import bounded_verify, verify_password
from mailrelay.routerspec import parse_router
from mailrelay.session import Sessions
from tests.support.frontends import PASSWORD, USER, FrontEndTestCase
from tests.support.net import WAIT, LogCapture, ProxyTestCase, echo, read_line, tcp_port
from tests.support.pop3 import ScriptedPOP3, logged_in_reply
from tests.support.toy import ToyFrontEnd

BCRYPT_HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
THROTTLED = b"-ERR [SYS/TEMP] Too many failed logins, try again later"
WRONG = b"-ERR [AUTH] invalid credentials"
BUSY = b"-ERR [SYS/TEMP] Temporary failure, try again later"


def login(user: str = "alice@example.org", client: str = "192.0.2.7") -> RouteRequest:
    return RouteRequest(
        listener="imap", protocol="imap", mode="starttls", client=(client, 40000), local=("192.0.2.1", 143), user=user
    )


def guard(**limits: Any) -> tuple[LoginGuard, Clock]:
    clock = Clock()
    return LoginGuard(LoginLimits(**limits), clock), clock


def test_a_user_past_the_limit_is_slowed_down_more_and_more_but_never_refused() -> None:
    g, clock = guard(window=600, max_per_user=3, max_per_client=0, delay=1, max_delay=5)
    for n in range(3):
        assert g.slowdown(login()) == 0
        g.failed(login(client=f"198.51.100.{n}"))  # from anywhere: counted for the user
        clock.advance(10)
    delays = []
    for n in range(5):
        assert g.refusal(login()) is None
        delays.append(g.slowdown(login()))
        g.failed(login(client=f"198.51.100.{10 + n}"))
    assert delays == [1, 2, 4, 5, 5]  # doubling, up to max_delay
    assert g.admit(login()).delay == 5 and g.admit(login()).refusal is None
    assert g.slowdown(login(user="ALICE@example.org")) == 5  # user names compared without case
    assert g.slowdown(login(user="bob@example.org")) == 0
    # Failures past the point where the slowdown stops growing are not kept.
    assert max(len(times) for times in g._limited.values()) == 3 + 3  # 1 -> 2 -> 4 -> 5: three steps
    clock.advance(600)  # every failure is now older than the window
    assert g.slowdown(login()) == 0


def test_without_a_delay_the_per_user_limit_slows_nothing_down() -> None:
    g, _ = guard(max_per_user=1, max_per_client=0, delay=0)
    for _ in range(3):
        g.failed(login())
    assert (g.refusal(login()), g.slowdown(login())) == (None, 0)


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


def test_logins_in_flight_count_against_their_client() -> None:
    g, _ = guard(window=600, max_per_client=3, max_per_user=0)
    attempts = [g.admit(login(user=f"user{n}@example.org")) for n in range(3)]
    assert [a.refusal for a in attempts] == [None] * 3
    # Nothing has failed yet, but three guesses are out: a fourth must wait its turn.
    refused = g.admit(login(user="user3@example.org"))
    assert refused.refusal == "too many failed logins for this client (0 in 600s, 3 in progress)"
    assert g.refusal(login(client="192.0.2.8")) is None  # another client is not affected
    attempts[0].end()  # logged in: its place is free
    fourth = g.admit(login(user="user3@example.org"))
    assert fourth.refusal is None
    attempts[1].end(failed=True)  # a failed login: still counted, now as a failure
    attempts[1].end()  # a `finally:` ending it again changes nothing
    refused.end()  # a refused attempt was never counted
    assert g.refusal(login()) == "too many failed logins for this client (1 in 600s, 2 in progress)"
    attempts[2].end()
    fourth.end()
    assert g.refusal(login()) is None
    assert g._in_flight == {}


def test_a_user_s_parallel_logins_do_not_slow_each_other_down() -> None:
    # A mail client opens many connections at once: only failures slow its user down.
    g, _ = guard(max_per_user=2, max_per_client=0, delay=1, max_delay=30)
    attempts = [g.admit(login()) for _ in range(16)]
    assert [a.delay for a in attempts] == [0] * 16
    for attempt in attempts[:3]:
        attempt.end(failed=True)
    assert g.admit(login(client="198.51.100.9")).delay == 2
    for attempt in attempts[3:]:
        attempt.end()


def test_exempt_networks_are_not_limited_per_client_but_count_for_the_user() -> None:
    exempt = tuple(ipaddress.ip_network(n) for n in ("192.0.2.10", "10.0.0.0/8", "2001:db8::/32"))
    g, _ = guard(max_per_client=2, max_per_user=3, exempt=exempt)
    for client in ("192.0.2.10", "10.1.2.3", "::ffff:10.1.2.3", "2001:db8:1::5"):
        assert g.exempt(client)
        for n in range(5):
            g.failed(login(user=f"user{n}@example.org", client=client))
        assert g.refusal(login(client=client)) is None
        assert all(g.admit(login(client=client)).refusal is None for _ in range(5))  # nor counted in flight
    for client in ("192.0.2.11", "11.0.0.1", "2001:db9::1", "/run/mailrelay.sock"):
        assert not g.exempt(client)
    # A webmail can be used for guessing too: its failures count for the user.
    g, _ = guard(max_per_client=2, max_per_user=3, exempt=exempt)
    for _ in range(3):
        g.failed(login(client="10.0.0.5"))
    assert g.slowdown(login(client="10.0.0.5")) == 1
    assert g.slowdown(login(client="192.0.2.99")) == 1


def test_user_names_are_counted_casefolded_and_without_surrounding_spaces() -> None:
    g, _ = guard(max_per_user=3, max_per_client=0)
    for user in (" Alice@Example.ORG", "ALICE@EXAMPLE.ORG\t", "alice@example.org "):
        g.failed(login(user=user))
    assert g.slowdown(login(user="alice@example.org")) == 1
    assert user_key(" Stra\u00dfe@example.org ") == user_key("STRASSE@EXAMPLE.ORG") == "strasse@example.org"


def test_a_flood_of_made_up_names_does_not_make_the_guard_forget_a_user_under_attack() -> None:
    g, _ = guard(max_per_client=0, max_per_user=5)
    g.max_keys = 100
    for _ in range(5):
        g.failed(login())  # alice is at her limit
    for n in range(1000):
        g.failed(login(user=f"made-up-{n}@example.org"))
    assert g.slowdown(login()) == 1
    assert len(g._counting) == 100  # memory stays bounded
    # Keys at their limit are bounded too.
    for n in range(150):
        for _ in range(5):
            g.failed(login(user=f"attacked-{n}@example.org"))
    assert len(g._limited) == 100


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
    assert lines == [
        "login limit reached: 2 failed logins for user alice@example.org within 600s;"
        " holding its logins back 1s, doubling up to 30s"
    ]


@pytest.mark.parametrize(
    "table, error",
    [
        ({"window": 0}, "login_limits.window: must be a positive number of seconds, not 0"),
        ({"max_per_user": -1}, "login_limits.max_per_user: must be from 0 to 1000000, not -1"),
        ({"delay": -2}, "login_limits.delay: must be 0 or more seconds, not -2"),
        ({"maximum": 3}, "login_limits.maximum: unknown key"),
        ({"max_delay": 0}, "login_limits.max_delay: must be a positive number of seconds, not 0"),
        ({"exempt": ["10.0.0.1/8"]}, 'login_limits.exempt: "10.0.0.1/8" has host bits set (the network is 10.0.0.0/8)'),
        (
            {"exempt": ["webmail.example.org"]},
            'login_limits.exempt: "webmail.example.org" is not an IP address or network (CIDR)',
        ),
        ({"exempt": 10}, "login_limits.exempt: must be a string or an array of strings, not an integer (10)"),
        ({"exempt": [""]}, "login_limits.exempt: must not be empty"),
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
    assert parse_config(base).login_limits == LoginLimits(
        window=600, max_per_client=20, max_per_user=10, delay=1, max_delay=30, exempt=()
    )
    custom = parse_config({"login_limits": {"window": 60, "max_per_client": 0, "max_per_user": 3, "delay": 0}, **base})
    assert custom.login_limits == LoginLimits(window=60, max_per_client=0, max_per_user=3, delay=0)
    exempt = parse_config({"login_limits": {"exempt": ["192.0.2.10", "10.0.0.0/8", "2001:db8::/32"], "max_delay": 10}, **base})
    assert exempt.login_limits.exempt == (
        ipaddress.ip_network("192.0.2.10/32"),
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("2001:db8::/32"),
    )
    assert exempt.login_limits.max_delay == 10
    assert parse_config({"login_limits": {"exempt": []}, **base}).login_limits.exempt == ()
    assert parse_config({"login_limits": {"exempt": "192.0.2.10"}, **base}).login_limits.exempt == (
        ipaddress.ip_network("192.0.2.10/32"),
    )


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

    def listen(self, router: Any, limits: LoginLimits) -> int:
        self.guard = LoginGuard(limits, reactor)
        self.sessions = Sessions(reactor)
        listener = ListenerConfig(name="toy", listen="tcp:0", mode="starttls", protocol="imap", router=None)
        factory = ListenerFactory(
            listener,
            router,
            UpstreamConnector(reactor, 5),
            self.sessions,
            reactor,
            connection_class=ToyFrontEnd,
            guard=self.guard,
        )
        # Twisted annotates the factory as a ServerFactory; any IProtocolFactory does.
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[arg-type]
        self.addCleanup(port.stopListening)
        return tcp_port(port)

    async def test_past_the_client_limit_the_router_is_not_asked_and_the_reply_is_temporary(self) -> None:
        upstream = self.server(echo)
        router = PasswordRouter(upstream.port)
        port = self.listen(router, LoginLimits(window=600, max_per_client=3, max_per_user=0, delay=0))

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
        self.assertEqual(outcomes[-1], ("alice@example.org", "throttled", "too many failed logins for this client (3 in 600s)"))
        self.assertNotIn("guess", " ".join(self.logs.lines()))

    async def test_a_login_cancelled_while_routed_is_no_longer_in_flight(self) -> None:
        asked: list[Deferred[Route]] = []

        class NeverAnswers:
            def route(self, request: RouteRequest) -> Deferred[Route]:
                asked.append(Deferred())
                return asked[-1]

        port = self.listen(NeverAnswers(), LoginLimits(max_per_client=1, max_per_user=1))

        def login_then_wait_for_the_end() -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as conn:
                read_line(conn)
                conn.sendall(b"LOGIN alice@example.org guess\r\n")
                try:
                    return conn.recv(100)
                except ConnectionResetError:
                    return b""

        client = self.in_thread(login_then_wait_for_the_end)
        for _ in range(int(WAIT / 0.01)):
            if asked:  # the router has the question: the login is in flight
                break
            await deferLater(reactor, 0.01)
        self.assertEqual(len(self.guard._in_flight), 2)  # its client and its user
        await self.sessions.drain(0.01)  # a shutdown drops the session: its routing is cancelled
        self.assertEqual(await client, b"")
        self.assertEqual(self.logs.sessions()[-1]["outcome"], "drain-timeout")
        self.assertTrue(asked[0].called)  # cancelled
        self.assertEqual(self.guard._in_flight, {})
        # Nothing failed: the address and the user are as fresh as before.
        self.assertIsNone(self.guard.refusal(login(client="127.0.0.1")))
        self.assertEqual(self.guard.slowdown(login()), 0)


# -- the bound on password checks ----------------------------------------------------


class HeldChecks:
    """A `verify` whose checks wait until the test answers them, in order."""

    def __init__(self) -> None:
        self.pending: list[Deferred[bool]] = []
        self.started = 0

    def __call__(self, hashed: str, password: str) -> Deferred[bool]:
        self.started += 1
        self.pending.append(Deferred())
        return self.pending[-1]

    def answer(self, ok: bool = False) -> None:
        self.pending.pop(0).callback(ok)


def outcome(d: Deferred[Any]) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    return results[0] if results else None


def test_password_checks_run_at_most_k_at_once_and_excess_past_the_queue_fails_at_once() -> None:
    held = HeldChecks()
    verify = bounded_verify(held, max_checks=2, max_queue=3)
    checks = [verify("hash", f"guess{n}") for n in range(5)]
    assert held.started == 2  # two running, three waiting
    busy = outcome(verify("hash", "one too many"))
    assert isinstance(busy, Failure) and busy.check(RouterError)
    assert str(busy.value) == "password checks busy: 2 running, 3 waiting"
    held.answer(True)
    assert outcome(checks[0]) is True
    assert held.started == 3  # the first waiting one took the free turn
    for _ in range(4):
        held.answer(False)
    assert [outcome(d) for d in checks[1:]] == [False] * 4
    assert held.started == 5 and verify("hash", "now") is not None and held.started == 6


def test_a_waiting_check_that_is_cancelled_leaves_the_queue() -> None:
    held = HeldChecks()
    verify = bounded_verify(held, max_checks=1, max_queue=1)
    running = verify("hash", "first")
    waiting = verify("hash", "second")
    assert isinstance(outcome(verify("hash", "third")), Failure)  # the queue is full
    waiting.cancel()
    assert outcome(waiting).check(CancelledError)
    queued = verify("hash", "third")  # its place is free again
    assert not queued.called
    held.answer(False)
    assert outcome(running) is False
    assert held.started == 2  # the cancelled check never ran
    held.answer(True)
    assert outcome(queued) is True


def test_a_running_check_that_is_cancelled_keeps_its_turn_until_it_ends() -> None:
    held = HeldChecks()
    verify = bounded_verify(held, max_checks=1, max_queue=5)
    running = verify("hash", "first")
    waiting = verify("hash", "second")
    running.cancel()  # its client left; the hashing thread cannot be stopped
    assert outcome(running).check(CancelledError)
    assert held.started == 1  # still one at a time
    held.answer(True)  # the thread ends; its answer goes nowhere
    assert held.started == 2
    held.answer(False)
    assert outcome(waiting) is False


def map_router_table(**keys: Any) -> dict[str, Any]:
    return {
        "type": "map",
        "rule": [{"user": USER, "password": BCRYPT_HASH, "reject_wait": 0, "route": {"host": "127.0.0.1", "port": 1}}],
        **keys,
    }


@pytest.mark.parametrize(
    "keys, error",
    [
        ({"max_hash_checks": 0}, "router.max_hash_checks: must be from 1 to 1000, not 0"),
        ({"max_hash_queue": -1}, "router.max_hash_queue: must be from 0 to 1000000, not -1"),
        ({"max_hash_queue": "10"}, "router.max_hash_queue: must be an integer, not a string ('10')"),
    ],
)
def test_hash_check_bound_errors(keys: dict[str, Any], error: str) -> None:
    errors = Errors("<config>")
    table = Table(map_router_table(**keys), "router", errors)
    parse_router(table)
    table.finish()
    assert errors.lines == [f"<config>: {error}"]


def test_a_full_queue_is_the_router_s_temporary_failure_never_a_wrong_password() -> None:
    errors = Errors("<config>")
    spec = parse_router(Table(map_router_table(), "router", errors))
    assert spec is not None and errors.lines == []
    held = HeldChecks()
    router = spec.build(Clock(), verify=bounded_verify(held, max_checks=1, max_queue=0))
    request = RouteRequest(
        listener="pop3",
        protocol="pop3",
        mode="tls",
        client=("192.0.2.7", 1),
        local=("192.0.2.1", 995),
        user=USER,
        password="guess",
        auth_method="plain",
    )
    first = ask_router(router, request, Clock(), 30)
    second = outcome(ask_router(router, request, Clock(), 30))
    assert isinstance(second, Failure) and second.check(RouterError) and not second.check(Reject)
    held.answer(False)
    assert outcome(first).check(Reject)


# -- end to end: real POP3 sessions through a map router with a bcrypt hash --------------


class POP3From(poplib.POP3):
    """poplib's client, connecting from a chosen loopback address (any 127.0.0.x)."""

    def __init__(self, source: str, port: int) -> None:
        self.source = source
        super().__init__("127.0.0.1", port, timeout=WAIT)

    def _create_socket(self, timeout: float) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout, source_address=(self.source, 0))


def pop3_login(source: str, port: int, password: str) -> bytes:
    """USER and PASS from `source`: the answer to PASS (a `-ERR` too), then the client leaves."""
    client = POP3From(source, port)
    try:
        client.user(USER)
        try:
            return client.pass_(password)
        except poplib.error_proto as e:
            answer: bytes = e.args[0]
            return answer
    finally:
        client.close()


class CountingChecks:
    """A `verify` that counts the checks asked of it and holds them until `release()`,
    then answers them with the real bcrypt check."""

    def __init__(self) -> None:
        self.held: list[tuple[Deferred[bool], str, str]] = []
        self.calls = 0

    def __call__(self, hashed: str, password: str) -> Deferred[bool]:
        self.calls += 1
        d: Deferred[bool] = Deferred()
        self.held.append((d, hashed, password))
        return d

    def release(self) -> None:
        held, self.held = self.held, []
        for d, hashed, password in held:
            d.callback(verify_password(hashed, password))


class LoginLimitsEndToEndTests(FrontEndTestCase):
    protocol = "pop3"

    def config(self, login_limits: dict[str, Any], **router: Any) -> dict[str, Any]:
        config = self.front_end_config("starttls", starttls="optional")
        config["login_limits"] = login_limits
        if router:
            config["router"] = router
        return config

    def clients(self, count: int) -> ThreadPoolExecutor:
        pool = ThreadPoolExecutor(max_workers=count)
        self.addCleanup(pool.shutdown, wait=False)
        return pool

    async def until(self, condition: Callable[[], bool]) -> None:
        """Wait for `condition` (hang guard: WAIT)."""
        for _ in range(int(WAIT / 0.01)):
            if condition():
                return
            await deferLater(reactor, 0.01)
        self.fail("the condition never held")

    async def test_parallel_guesses_from_one_address_reach_the_hash_check_no_more_than_the_limit(self) -> None:
        errors = Errors("<config>")
        spec = parse_router(Table(map_router_table(), "router", errors))
        assert spec is not None
        checks = CountingChecks()
        limits = {"max_per_client": 5, "max_per_user": 0, "delay": 0}
        _, port = await self.start_proxy(self.config(limits), router=spec.build(reactor, verify=checks))

        pool = self.clients(30)
        guesses: list[Future[bytes]] = [pool.submit(pop3_login, "127.0.0.4", port, f"guess{n}") for n in range(30)]

        def throttled() -> int:
            return sum(1 for e in self.logs.sessions() if e["outcome"] == "throttled")

        # Every guess is either at the hash check (held there) or refused.
        await self.until(lambda: checks.calls + throttled() == 30)
        self.assertEqual(checks.calls, 5)
        checks.release()
        await self.until(lambda: all(f.done() for f in guesses))
        answers = sorted(f.result() for f in guesses)
        self.assertEqual(answers, sorted([WRONG] * 5 + [THROTTLED] * 25))
        self.assertEqual(checks.calls, 5)

    async def test_the_owner_logs_in_after_a_flood_of_guesses_for_their_name_from_elsewhere(self) -> None:
        upstream = self.server(ScriptedPOP3())
        router = map_router_table()
        router["rule"][0]["route"]["port"] = upstream.port
        limits = {"max_per_user": 3, "max_per_client": 20, "delay": 0.01, "max_delay": 0.05}
        service, port = await self.start_proxy(self.config(limits, **router))

        for n in range(6):
            self.assertEqual(await self.in_thread(pop3_login, "127.0.0.2", port, f"guess{n}"), WRONG)
        owner = login(user=USER, client="127.0.0.3")
        self.assertIsNone(service.guard.refusal(owner))
        self.assertGreater(service.guard.slowdown(owner), 0)  # held back, not refused
        self.assertEqual(await self.in_thread(pop3_login, "127.0.0.3", port, PASSWORD), logged_in_reply(USER))
        heard = await self.in_thread(upstream.result)
        self.assertEqual(heard.login, USER)

    async def test_password_checks_past_the_queue_get_the_temporary_failure_at_once(self) -> None:
        gate = threading.Event()
        self.addCleanup(gate.set)
        started: list[str] = []

        def blocked_verify(hashed: str, password: str) -> bool:
            started.append(password)
            gate.wait(WAIT)
            return verify_password(hashed, password)

        self.patch(map_router, "verify_password", blocked_verify)
        limits = {"max_per_client": 100, "max_per_user": 0}
        config = self.config(limits, **map_router_table(max_hash_checks=1, max_hash_queue=2))
        _, port = await self.start_proxy(config)

        pool = self.clients(5)
        guesses = [pool.submit(pop3_login, f"127.0.0.{10 + n}", port, f"guess{n}") for n in range(5)]
        # One check runs (blocked), two wait: the other two are answered while it is blocked.
        await self.until(lambda: sum(f.done() for f in guesses) == 2)
        self.assertEqual([f.result() for f in guesses if f.done()], [BUSY, BUSY])
        self.assertEqual(len(started), 1)
        gate.set()
        await self.until(lambda: all(f.done() for f in guesses))
        self.assertEqual(sorted(f.result() for f in guesses), sorted([BUSY] * 2 + [WRONG] * 3))
        self.assertEqual(len(started), 3)
