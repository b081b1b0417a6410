"""
The fault-injection suite's machinery (`tests/test_faults.py`): scripted upstreams of
each protocol that misbehave at a chosen point of mailrelay's upstream login, an
nginx-style auth service that misbehaves, blocking clients of each front-end, and the
one check every case ends with, `FaultTestCase.check_case`: the session ended and was
logged, mailrelay holds no session, timer or file descriptor more than before, and it
still serves a good session.

The scripted upstreams and where they fail: `faults_peers`; the auth service:
`faults_auth`; the clients: `faults_clients`.
"""

from __future__ import annotations

import functools
import os
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import deferLater

from mailrelay.router import Route, RouteRequest
from tests.support.faults_peers import ScriptedServer
from tests.support.frontends import FrontEndTestCase
from tests.support.net import WAIT

TIMEOUT = 1.0
"""Every deadline a case provokes: `[upstream] connect_timeout` and `login_timeout`, the
listeners' `router_timeout`, the auth service's `timeout`. Small, so that a hang costs
a second, and large enough for a good login on a busy machine."""
SETTLE = 10.0
"""How long the leak check lets closes already under way finish (aborts run on the next
reactor turn, scripted peers' threads end when mailrelay closes their connection): a
hang guard, never a timing assertion. A leak fails the case after this long."""
LONG = 3 * SETTLE
"""The deadlines of a case that checks a cancellation: what is not cancelled outlives
the leak check's patience."""


# -- routers ---------------------------------------------------------------------------------


class SwitchRouter:
    """Answers every request with `routes` as they are when it is asked, or with a
    Deferred that never fires while `slow` (cancelled by the listener's
    `router_timeout`, or when the client leaves). Records `requests`."""

    verifies_passwords = False

    def __init__(self, routes: list[Route]) -> None:
        self.routes = routes
        self.slow = False
        self.requests: list[RouteRequest] = []

    def route(self, request: RouteRequest) -> Any:
        self.requests.append(request)
        if self.slow:
            return Deferred()
        return list(self.routes)


# -- the leak check --------------------------------------------------------------------------


def open_fds() -> dict[int, str]:
    """This process's file descriptors and what each is."""
    found = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            found[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass  # the listing's own descriptor, closed by now
    return found


_HARNESS_MODULES = ("tests.", "twisted.trial", "twisted.python.threadpool", "twisted._threads")


def _callable_module(call: Any) -> str:
    func = call.func
    while isinstance(func, functools.partial):
        func = func.func
    func = getattr(func, "__func__", func)
    return getattr(func, "__module__", None) or ""


def _describe(call: Any) -> str:
    func = call.func
    name = getattr(func, "__qualname__", None) or repr(func)
    return f"{_callable_module(call)}.{name} due in {call.getTime() - reactor.seconds():.1f}s"


def pending_calls(before: frozenset[IDelayedCall]) -> list[IDelayedCall]:
    """Delayed calls pending now that were not before, except the test harness's own
    (trial's timeout, this suite's polling) and the thread pool's."""
    return [
        call
        for call in reactor.getDelayedCalls()
        if call not in before and call.active() and not _callable_module(call).startswith(_HARNESS_MODULES)
    ]


@attrs.frozen
class Snapshot:
    """What mailrelay and the test held when quiet: the baseline of the leak check."""

    fds: dict[int, str]
    calls: frozenset[IDelayedCall]
    lines: int
    """Session lines logged so far."""


class FaultTestCase(FrontEndTestCase):
    """
    A front-end test case (see `FrontEndTestCase`) for fault injection: scripted
    servers whose handlers are tracked, an upstream TLS context, the configuration
    every case uses (`TIMEOUT` for each deadline), and `check_case`.
    """

    def setUp(self) -> None:
        super().setUp()
        self.servers: list[ScriptedServer] = []
        issued = self.pki.issue("upstream", "upstream.test")
        self.upstream_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.upstream_tls.load_cert_chain(issued.cert, issued.key)

    def server(self, handle: Callable[[socket.socket], Any], host: str = "127.0.0.1", port: int = 0) -> ScriptedServer:
        """A scripted server (on `port`, when given) whose handlers the leak check waits for."""
        server = ScriptedServer(handle, host, port)
        self.addCleanup(server.close)
        self.servers.append(server)
        return server

    def refusing(self, port: int = 0) -> int:
        """A loopback port where connections are refused (`port`, or a new one), kept
        while the test runs: bound without listening, so that no other process (tests
        run in parallel) can start listening there. A `ScriptedServer` may listen on it
        too, and be closed again: connections are refused again then."""
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", port))
        self.addCleanup(sock.close)
        return int(sock.getsockname()[1])

    def route(self, port: int, tls: str = "none") -> Route:
        """A route to a scripted upstream on `port` (its TLS verified against the test CA)."""
        if tls == "none":
            return Route(host="127.0.0.1", port=port)
        return Route(host="127.0.0.1", port=port, tls=tls, server_name="upstream.test", tls_ca=self.pki.ca_file)  # type: ignore[arg-type]

    def config(
        self,
        protocol: str,
        mode: str = "starttls",
        router: dict[str, Any] | None = None,
        timeout: float = TIMEOUT,
        **listener: Any,
    ) -> dict[str, Any]:
        """One listener of `protocol` (a front-end on an optional-STARTTLS listener by
        default: logins in plaintext are allowed), with `timeout` for every deadline
        (the Router's, the connect, the upstream login). A case that must show that
        something pending is cancelled, not merely timed out, gives a `timeout` longer
        than `SETTLE`."""
        listener.setdefault("router_timeout", timeout)
        if protocol == "none":
            config: dict[str, Any] = {
                "tls": {"cert": self.issued.cert, "key": self.issued.key},
                "listener": [
                    {"name": "none", "listen": "tcp:0:interface=127.0.0.1", "mode": mode, "protocol": "none", **listener}
                ],
            }
        else:
            if mode == "starttls":
                listener.setdefault("starttls", "optional")
            config = self.front_end_config(mode, protocol, **listener)
        config["upstream"] = {"connect_timeout": timeout, "login_timeout": timeout}
        if router is not None:
            config["router"] = router
        return config

    async def start(self, config: dict[str, Any], router: Any = None) -> int:
        self.service, self.port = await self.start_proxy(config, router=router)
        return self.port

    def snapshot(self) -> Snapshot:
        return Snapshot(open_fds(), frozenset(reactor.getDelayedCalls()), len(self.logs.sessions()))

    async def until(self, condition: Callable[[], bool], limit: float = WAIT) -> bool:
        """Let the reactor run until `condition()` holds (True) or `limit` seconds pass."""
        for _ in range(int(limit / 0.01)):
            if condition():
                return True
            await deferLater(reactor, 0.01)
        return condition()

    def _quiet(self, before: Snapshot | None, sessions: int) -> bool:
        lines = len(self.logs.sessions()) - (before.lines if before else 0)
        return (
            lines >= sessions
            and len(self.service.sessions) == 0
            and all(server.active == 0 for server in self.servers)
            and (before is None or len(open_fds()) <= len(before.fds))
        )

    async def assert_no_leaks(self, case: str, before: Snapshot, sessions: int) -> None:
        """
        The check every case ends with: once closes already under way have finished
        (bounded by `SETTLE`), `sessions` more session lines were logged, the session
        registry is empty, no scripted peer waits on a connection mailrelay kept, no
        file descriptor is open that was not before, and no delayed call is pending
        that was not (but the harness's).
        """
        await self.until(lambda: self._quiet(before, sessions), SETTLE)
        lines = self.logs.sessions()[before.lines :]
        self.assertGreaterEqual(len(lines), sessions, f"{case}: {len(lines)} session line(s) logged, expected {sessions}")
        self.assertEqual(len(self.service.sessions), 0, f"{case}: sessions left open after their line was logged")
        busy = [server.port for server in self.servers if server.active]
        self.assertEqual(busy, [], f"{case}: scripted peers still connected (mailrelay kept their connection)")
        now = open_fds()
        new = sorted(f"{fd} -> {target}" for fd, target in now.items() if before.fds.get(fd) != target)
        self.assertLessEqual(len(now), len(before.fds), f"{case}: file descriptors leaked: {new}")
        leaked = [_describe(call) for call in pending_calls(before.calls)]
        self.assertEqual(leaked, [], f"{case}: delayed calls left pending")

    async def quiet_snapshot(self, case: str, sessions: int) -> Snapshot:
        """The baseline: once the `sessions` sessions run so far are over and closed."""
        if not await self.until(lambda: self._quiet(None, sessions), SETTLE):
            busy = [server.port for server in self.servers if server.active]
            self.fail(
                f"{case}: the warm-up session did not end: {len(self.logs.sessions())} session line(s),"
                f" {len(self.service.sessions)} session(s) open, scripted peers connected: {busy}"
            )
        await deferLater(reactor, 0.05)  # aborts and closes due on the next turns
        return self.snapshot()

    async def check_case(
        self,
        case: str,
        fault: Callable[[], Awaitable[Any]],
        good: Callable[[], Awaitable[Any]],
        sessions: int = 1,
    ) -> Any:
        """
        Run `good` once (so that what mailrelay opens once and keeps is in the
        baseline), take the baseline, run `fault` (a case making `sessions` sessions),
        check for leaks, run `good` again (mailrelay still serves) and check again.
        Returns what `fault` returned. `case` names the case in every failure.
        """
        await good()
        before = await self.quiet_snapshot(case, 1)
        result = await fault()
        await self.assert_no_leaks(case, before, sessions)
        await good()
        await self.assert_no_leaks(case + ", then a good session", before, sessions + 1)
        return result

    def outcome(self, index: int = -1) -> tuple[str, str | None]:
        """(outcome, reason) of a logged session line."""
        line = self.logs.sessions()[index]
        return line["outcome"], line.get("reason")

    def upstream_failures(self, port: int) -> list[str]:
        """The warnings logged for failed attempts at the route to `port`."""
        return [
            str(event.get("why")) for event in self.logs.events if event.get("upstream") == f"127.0.0.1:{port}" and "why" in event
        ]
