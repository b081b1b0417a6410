"""
Every timer of a session, on `twisted.internet.task.Clock` through `mailrelay.testing`:
the silence before login, the pre-login deadline whatever the client sends, a Router
slower than `router_timeout`, an upstream that accepts and says nothing (the route
attempt's `login_timeout`, then the fallback route), a Reject's wait. Minutes of
protocol time each, milliseconds of real time: nothing here sleeps.
"""

from __future__ import annotations

import base64
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from mailrelay.router import Reject, Route, RouteRequest
from mailrelay.testing import Pause, RecordingRouter, ScriptedUpstream, converse

PLAIN = base64.b64encode(b"\0alice\0s3cret").decode()

LOGIN = {
    "smtp": ["EHLO laptop", f"AUTH PLAIN {PLAIN}"],
    "imap": ["a1 LOGIN alice s3cret"],
    "pop3": ["USER alice", "PASS s3cret"],
}
NOOP = {"smtp": "NOOP", "imap": "a0 NOOP", "pop3": "NOOP"}
GOODBYE = {
    "smtp": "421 4.4.2 relay.test Error: timeout exceeded",
    "imap": "* BYE Disconnected for inactivity",
    "pop3": "-ERR Disconnected for inactivity",
}
TEMPORARY = {
    "smtp": "451 4.4.1 Mail server temporarily unavailable, try again later",
    "imap": "a1 NO [UNAVAILABLE] Mail server temporarily unavailable, try again later",
    "pop3": "-ERR [SYS/TEMP] Mail server temporarily unavailable, try again later",
}
ROUTER_TEMPORARY = {
    "smtp": "451 4.3.0 Temporary failure, try again later",
    "imap": "a1 NO [UNAVAILABLE] Temporary failure, try again later",
    "pop3": "-ERR [SYS/TEMP] Temporary failure, try again later",
}
UPSTREAMS: dict[str, Any] = {
    "smtp": lambda: ScriptedUpstream(
        "220 upstream ESMTP",
        {"EHLO": "250-upstream\r\n250 AUTH PLAIN", "AUTH PLAIN": "235 2.7.0 ok", "QUIT": "221 bye"},
    ),
    "imap": lambda: ScriptedUpstream(
        "* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN SASL-IR ID] upstream",
        {"a1 ID": "* ID NIL\r\na1 OK ID done", "a1 AUTHENTICATE": "a1 OK [CAPABILITY IMAP4rev1] Logged in"},
    ),
    "pop3": lambda: ScriptedUpstream(
        "+OK upstream",
        {"CAPA": "+OK\r\nSASL PLAIN\r\nUSER\r\n.", "AUTH PLAIN": "+OK Logged in.", "QUIT": "+OK bye"},
    ),
}


def listener(protocol: str, **keys: Any) -> dict[str, Any]:
    return {
        "name": protocol,
        "listen": "tcp:0",
        "mode": "starttls",
        "protocol": protocol,
        "hostname": "relay.test",
        "starttls": "optional",
        **keys,
    }


def duration(transcript: Any) -> float:
    """How long the session lasted, from its log line (on the test's clock)."""
    [line] = [event for event in transcript.log if "outcome" in event and "duration" in event]
    return float(line["duration"])


def route(**keys: Any) -> Route:
    return Route(host="10.0.0.5", port=25, login="passthrough", **keys)


PROTOCOLS = ("smtp", "imap", "pop3")


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_silence_before_login_past_login_timeout_closes(protocol: str) -> None:
    clock = Clock()
    transcript = converse(listener(protocol, login_timeout=60), RecordingRouter(route()), [Pause(61)], clock=clock)
    assert transcript.lines()[-1] == GOODBYE[protocol]
    assert (transcript.outcome, transcript.reason) == ("idle-timeout", "no command within 60s before login")
    assert transcript.ended_by == "mailrelay"
    assert duration(transcript) == pytest.approx(60)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_command_every_fifty_seconds_is_closed_at_the_login_deadline(protocol: str) -> None:
    """The slow-loris: each NOOP restarts the silence timer, the deadline runs from accept."""
    clock = Clock()
    lines: list[Any] = []
    for _ in range(10):
        lines += [NOOP[protocol], Pause(50)]
    config = listener(protocol, login_timeout=60, login_deadline=180, max_junk_commands=100)
    transcript = converse(config, RecordingRouter(route()), lines, clock=clock)
    assert transcript.lines()[-1] == GOODBYE[protocol]
    assert (transcript.outcome, transcript.reason) == ("login-timeout", "not logged in within 180s")
    assert duration(transcript) == pytest.approx(180)
    assert transcript.unsent  # the client had more to say


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_router_slower_than_router_timeout_is_a_temporary_failure(protocol: str) -> None:
    clock = Clock()
    router = RecordingRouter(lambda request: Deferred())  # never answers
    transcript = converse(listener(protocol, router_timeout=5), router, LOGIN[protocol], clock=clock)
    assert transcript.lines()[-1] == ROUTER_TEMPORARY[protocol]
    assert duration(transcript) == pytest.approx(5)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_silent_upstream_fails_its_route_at_login_timeout_and_the_next_one_logs_in(protocol: str) -> None:
    clock = Clock()
    silent = ScriptedUpstream(None)  # accepts, says nothing
    config = {"upstream": {"login_timeout": 30}, "listener": [listener(protocol)]}
    routes = [Route(host="10.0.0.5", port=1), Route(host="10.0.0.6", port=1)]
    upstreams = {"10.0.0.5:1": silent, "10.0.0.6:1": UPSTREAMS[protocol]()}
    transcript = converse(config, RecordingRouter(routes), LOGIN[protocol], upstream=upstreams, clock=clock)
    assert duration(transcript) == pytest.approx(30)
    assert any("10.0.0.5:1 failed: no greeting within 30s" in message for message in transcript.messages())
    assert len(transcript.upstream_connections) == 2
    assert transcript.outcome == "closed"
    assert TEMPORARY[protocol] not in transcript.lines()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_silent_upstream_without_a_fallback_is_a_temporary_failure(protocol: str) -> None:
    clock = Clock()
    config = {"upstream": {"login_timeout": 30}, "listener": [listener(protocol)]}
    transcript = converse(
        config, RecordingRouter(Route(host="10.0.0.5", port=1)), LOGIN[protocol], upstream=ScriptedUpstream(None), clock=clock
    )
    assert transcript.lines()[-1] == TEMPORARY[protocol]
    assert duration(transcript) == pytest.approx(30)


def test_a_reject_waits_on_the_clock_before_the_refusal() -> None:
    clock = Clock()
    answered: list[float] = []

    def refuse(request: RouteRequest) -> Route:
        answered.append(clock.seconds())
        raise Reject("Invalid login", wait=4)

    transcript = converse(listener("pop3"), RecordingRouter(refuse), LOGIN["pop3"], clock=clock)
    assert transcript.lines()[-1] == "-ERR [AUTH] Invalid login"
    assert answered == [0] and clock.seconds() == pytest.approx(4)


def test_a_login_in_flight_at_the_deadline_finishes() -> None:
    """The deadline does not cut a login the Router is still deciding: it succeeds."""
    clock = Clock()

    def slowly(request: RouteRequest) -> Deferred[Route]:
        decided: Deferred[Route] = Deferred()
        clock.callLater(20, decided.callback, Route(host="10.0.0.5", port=1))
        return decided

    config = listener("pop3", login_deadline=180, login_timeout=175)
    transcript = converse(
        config, RecordingRouter(slowly), [Pause(170), *LOGIN["pop3"]], upstream=UPSTREAMS["pop3"](), clock=clock
    )
    assert transcript.lines()[-1] == "+OK Logged in."
    assert transcript.outcome == "closed"
