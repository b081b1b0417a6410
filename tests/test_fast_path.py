"""
The routing fast path (`mailrelay.ask.ask_router_now`): a Router whose answer is known
at once (returned, or a coroutine that returns without waiting) is used without a
Deferred or a timer, and a session routed so ends exactly as one whose Router answered
through a Deferred: the same outcome, the same session line (all but its id and
duration), the same metrics. Real sockets, a real upstream, mailrelay on a test clock
that records every timer set on it, so that the test sees whether a Router's deadline
was armed: the fast path arms none.
"""

from __future__ import annotations

import contextvars
import re
import socket
import string
from collections.abc import Callable
from typing import Any

from prometheus_client.registry import CollectorRegistry
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import Clock, deferLater
from zope.interface import implementer

from mailrelay import IRouter, Reject, Route, RouteRequest
from mailrelay.ask import ask_router_now
from mailrelay.router import RouterError
from mailrelay.session import SESSION_LINE
from mailrelay.testing import route_request
from tests.support.net import WAIT, ProxyTestCase, closed_port, connect, echo, reset

ROUTER_TIMEOUT = 7.25
"""The listeners' `router_timeout`: no other timer of mailrelay's is set for as long,
so a timer of this length is a Router's deadline."""

CLIENT_BYTES = b"x" * 32

LINE_FIELDS = (
    *(name for _, name, _, _ in string.Formatter().parse(SESSION_LINE) if name not in (None, "reason_text")),
    "reason",
    "session_line",
    "log_level",
    "log_namespace",
    "log_format",
)
"""What an observer of session lines reads in the event."""

Decide = Callable[[RouteRequest], Any]
"""What a scenario's Router answers: a Route, nonsense, or it raises."""


class RecordingClock(Clock):
    """A test clock that remembers the length of every timer set on it."""

    def __init__(self) -> None:
        super().__init__()
        self.delays: list[float] = []

    def callLater(self, delay: float, callable: Callable[..., Any], *args: object, **kw: object) -> IDelayedCall:
        self.delays.append(delay)
        return super().callLater(delay, callable, *args, **kw)

    def router_deadlines(self) -> int:
        return sum(1 for delay in self.delays if delay == ROUTER_TIMEOUT)


class AtOnce:
    """Answers from `route()` itself: the fast path."""

    def __init__(self, decide: Decide) -> None:
        self.decide = decide

    def route(self, request: RouteRequest) -> Any:
        return self.decide(request)


class CoroutineAtOnce(AtOnce):
    """An `async def` Router that answers without waiting (a cache hit): the fast path."""

    async def route(self, request: RouteRequest) -> Any:
        return self.decide(request)


class Later(AtOnce):
    """Answers through a Deferred that fires on a later turn of the reactor: the slow path."""

    def route(self, request: RouteRequest) -> Any:
        return deferLater(reactor, 0, self.decide, request)


class CoroutineLater(AtOnce):
    """An `async def` Router that waits before it answers: the slow path, the coroutine
    going on under Twisted after `ask_router_now` started it."""

    async def route(self, request: RouteRequest) -> Any:
        await deferLater(reactor, 0, lambda: None)
        return self.decide(request)


FAST = (AtOnce, CoroutineAtOnce)
SLOW = (Later, CoroutineLater)


def nonsense(request: RouteRequest) -> Any:
    return "nonsense"


def raising(request: RouteRequest) -> Any:
    raise ZeroDivisionError("a bug in the router")


def rejecting(request: RouteRequest) -> Any:
    raise Reject("no such mailbox")


def rejecting_after_wait(request: RouteRequest) -> Any:
    raise Reject("go away", wait=3)


def refusing_router_error(request: RouteRequest) -> Any:
    raise RouterError("auth service down")


def to(port: int) -> Decide:
    return lambda request: Route(host="127.0.0.1", port=port)


def client_session(port: int) -> bytes:
    """Connect, send 32 bytes, end the stream, read until mailrelay closes. A session
    refused at once may be closed before the client has written (or reset, its 32 bytes
    unread): then what came before."""
    received = bytearray()
    with connect(port) as conn:
        try:
            conn.sendall(CLIENT_BYTES)
            conn.shutdown(socket.SHUT_WR)
            while data := conn.recv(1 << 16):
                received += data
        except OSError:  # reset, or closed before the client wrote
            pass
    return bytes(received)


def metric_samples(registry: CollectorRegistry) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample but creation times (a clock reading of the real time)."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in registry.collect()
        for sample in family.samples
        if not sample.name.endswith("_created")
    }


def line_fields(event: Any) -> dict[str, Any]:
    """A session event's fields, and its text, without what changes from one run to
    the next (the session's id and duration, the client's port)."""
    fields = {key: event[key] for key in LINE_FIELDS}
    del fields["session_id"], fields["duration"]
    text = fields.pop("session_line")
    client = fields.pop("client")
    assert f" client={client} " in text, text
    fields["client_host"] = client.rpartition(":")[0]
    text = text.replace(f"session {event['session_id']} ", "session - ", 1).replace(f" client={client} ", " client=- ", 1)
    fields["text"] = re.sub(r" duration=\S+ ", " ", text)
    return fields


class FastPathTests(ProxyTestCase):
    """Each scenario runs once per Router style; the sessions must end alike."""

    async def run_session(self, router: Any, decide: Decide, wait: float = 0) -> tuple[bytes, dict[str, Any], Any, int]:
        """One spliced session routed by `router(decide)`: what the client received,
        the session line's fields, the metrics, and the Router deadlines armed."""
        clock = RecordingClock()
        config = {
            "listener": [
                {"name": "relay", "listen": "tcp:0:interface=127.0.0.1", "mode": "splice", "router_timeout": ROUTER_TIMEOUT}
            ],
            "metrics": {"listen": "tcp:0:interface=127.0.0.1"},
        }
        before = len(self.logs.sessions())
        service, port = await self.start_proxy(config, router=router(decide), clock=clock)
        received: Deferred[bytes] = self.in_thread(client_session, port)
        if wait:
            await self.eventually(lambda: wait in clock.delays, "the refusal's wait did not start")
            clock.advance(wait)
        data = await received
        await self.eventually(lambda: len(self.logs.sessions()) > before, "no session line was logged")
        [event] = self.logs.sessions()[before:]
        assert service.metrics.registry is not None
        return data, line_fields(event), metric_samples(service.metrics.registry), clock.router_deadlines()

    async def check_alike(self, decide: Decide, wait: float = 0) -> dict[str, Any]:
        """Run the scenario with every Router style; assert that the sessions ended
        alike, that the fast styles armed no Router deadline and the slow ones did;
        return the session line's fields."""
        results = {style: await self.run_session(style, decide, wait) for style in FAST + SLOW}
        for style in FAST:
            self.assertEqual(results[style][3], 0, f"{style.__name__}: the fast path was not taken")
        for style in SLOW:
            self.assertEqual(results[style][3], 1, f"{style.__name__}: a Router answering later has no deadline")
        first = results[AtOnce][:3]
        for style, result in results.items():
            self.assertEqual(result[:3], first, f"{style.__name__} differs from AtOnce")
        return first[1]

    async def test_an_accepted_route_splices_alike(self) -> None:
        upstream = self.server(echo)
        line = await self.check_alike(to(upstream.port))
        self.assertEqual(line["outcome"], "closed")
        self.assertEqual((line["bytes_up"], line["bytes_down"]), (32, 32))
        self.assertEqual(line["upstream"], f"127.0.0.1:{upstream.port}")
        for _ in range(4):
            self.assertEqual(upstream.result(WAIT), 32)

    async def test_a_reject_ends_alike(self) -> None:
        line = await self.check_alike(rejecting)
        self.assertEqual((line["outcome"], line["reason"]), ("rejected", "no such mailbox"))

    async def test_a_reject_with_a_wait_ends_alike_after_the_wait(self) -> None:
        line = await self.check_alike(rejecting_after_wait, wait=3)
        self.assertEqual((line["outcome"], line["reason"]), ("rejected", "go away"))

    async def test_a_raising_router_ends_alike_and_its_traceback_is_logged(self) -> None:
        line = await self.check_alike(raising)
        self.assertEqual(line["outcome"], "router-error")
        self.assertIn("ZeroDivisionError", line["reason"])
        failures = [e for e in self.logs.events if e.get("log_format") == "session {session_id}: router failed"]
        self.assertEqual(len(failures), 4)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 4)

    async def test_a_router_error_ends_alike(self) -> None:
        line = await self.check_alike(refusing_router_error)
        self.assertEqual((line["outcome"], line["reason"]), ("router-error", "auth service down"))

    async def test_a_nonsense_answer_ends_alike(self) -> None:
        line = await self.check_alike(nonsense)
        self.assertEqual(line["outcome"], "router-error")
        self.assertIn("'nonsense'", line["reason"])

    async def test_a_refused_upstream_ends_alike(self) -> None:
        line = await self.check_alike(to(closed_port()))
        self.assertEqual(line["outcome"], "upstream-unavailable")
        self.assertIn("connection refused", line["reason"])


class WaitsForever:
    """An `async def` Router that waits for an answer that never comes, noting how its
    wait ended."""

    def __init__(self) -> None:
        self.waiting: Deferred[Any] = Deferred()
        self.asked = False
        self.ended: list[str] = []

    async def route(self, request: RouteRequest) -> Any:
        self.asked = True
        try:
            return await self.waiting
        except CancelledError:
            self.ended.append("cancelled")
            raise


class CancellationTests(ProxyTestCase):
    async def test_a_client_leaving_cancels_a_coroutine_router_that_had_to_wait(self) -> None:
        """A coroutine `ask_router_now` started, and handed on to Twisted when it had to
        wait, is cancelled through that wait when the client leaves."""
        router = WaitsForever()
        config = {"listener": [{"name": "relay", "listen": "tcp:0:interface=127.0.0.1", "mode": "splice"}]}
        _, port = await self.start_proxy(config, router=router, clock=RecordingClock())
        conn = await self.in_thread(connect, port)
        await self.eventually(lambda: router.asked, "the router was not asked")
        reset(conn)  # a half-closed client would still be routed
        line = await self.session_line()
        self.assertEqual(line["outcome"], "client-gone")
        self.assertEqual(router.ended, ["cancelled"])


LOGIN: contextvars.ContextVar[str] = contextvars.ContextVar("LOGIN", default="unset")


@implementer(IRouter)
class SetsContext:
    """An `async def` Router that sets a context variable, waits or not, and answers
    with what it then reads back (as the Route's host)."""

    verifies_passwords = False

    def __init__(self, wait: bool) -> None:
        self.wait = wait

    async def route(self, request: RouteRequest) -> Route:
        LOGIN.set("127.0.0.2")
        if self.wait:
            await deferLater(reactor, 0, lambda: None)
        return Route(host=LOGIN.get(), port=25)


class ContextTests(ProxyTestCase):
    async def test_a_coroutine_router_keeps_its_context_to_itself_on_either_path(self) -> None:
        """As under `Deferred.fromCoroutine`: the router sees what it set, before and
        after a wait; its caller does not."""
        for wait in (False, True):
            answer = ask_router_now(SetsContext(wait), route_request(), Clock(), 5)
            self.assertEqual(isinstance(answer, Deferred), wait)
            routes = await answer if isinstance(answer, Deferred) else answer
            self.assertEqual([route.host for route in routes], ["127.0.0.2"])
            self.assertEqual(LOGIN.get(), "unset")
