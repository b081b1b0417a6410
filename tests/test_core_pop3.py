"""
The POP3 core with bytes only: no reactor, no socket, no Deferred. Each test feeds the
core what a client sends and the shell's news (TLS up, the Router's answer), and checks
what the core asks for: the bytes a client would read, StartTLS, Route, Close.
"""

from __future__ import annotations

import base64
from typing import Any

import pytest

from mailrelay.core.events import Close, Discarded, LoginRefused, Route, StartTLS
from mailrelay.core.facts import TLSInfo
from mailrelay.core.machine import Input, State
from mailrelay.core.pop3 import POP3Core
from mailrelay.router import Reject
from tests.support.cores import make_core, others, sent

HOSTNAME = "relay.test"
PLAIN = base64.b64encode(b"\0alice\0secret")


def core(mode: str = "starttls", tls_offered: bool = True, **config: Any) -> POP3Core:
    settings: dict[str, Any] = {"hostname": HOSTNAME, "starttls": "optional", **config}
    return make_core(POP3Core, 110, mode, tls_offered, **settings)


def greeted(**config: Any) -> POP3Core:
    pop3 = core(**config)
    assert sent(pop3.greet()) == b"+OK relay.test POP3 ready\r\n"
    return pop3


def test_greeting_then_commands_in_pre_login() -> None:
    pop3 = greeted()
    assert pop3.machine.state is State.PRE_LOGIN
    assert sent(pop3.receive(b"NOOP\r\n")) == b"+OK\r\n"
    assert sent(pop3.receive(b"CAPA\r\n")) == (
        b"+OK Capability list follows\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\nUSER\r\nSASL PLAIN LOGIN\r\nSTLS\r\n.\r\n"
    )


def test_an_apop_timestamp_when_apop_is_allowed() -> None:
    pop3 = core(auth=["apop"])
    pop3.now = lambda: 1700000000.0
    greeting = sent(pop3.greet())
    assert greeting.startswith(b"+OK relay.test POP3 ready <") and greeting.endswith(b".1700000000@relay.test>\r\n")


def test_user_pass_asks_the_router_and_reads_nothing_more_meanwhile() -> None:
    pop3 = greeted()
    events = pop3.receive(b"USER alice\r\nPASS secret\r\nLIST\r\n")
    assert sent(events) == b"+OK\r\n"
    [route] = others(events)
    assert isinstance(route, Route)
    assert route.facts == {"user": "alice", "password": "secret", "auth_method": "plain", "salt": None, "attempt": 1}
    assert pop3.machine.state is State.ROUTING
    assert pop3.receive(b"NOOP\r\n") == []  # kept for the upstream, not read
    pop3.machine.fire(Input.CONNECT)
    pop3.machine.fire(Input.LOG_IN)
    assert sent(pop3.logged_in(b"+OK Logged in.\r\n")) == b"+OK Logged in.\r\n"
    assert pop3.leftover() == b"LIST\r\nNOOP\r\n"


def test_a_refused_login_is_answered_counted_and_the_next_command_read() -> None:
    pop3 = greeted(max_attempts=2)
    pop3.receive(b"USER alice\r\nPASS wrong\r\nNOOP\r\n")
    events = pop3.refused(Reject("Invalid login"))
    assert sent(events) == b"-ERR [AUTH] Invalid login\r\n+OK\r\n"
    assert LoginRefused("Invalid login", 1, 2) in events
    assert pop3.machine.state is State.PRE_LOGIN
    pop3.receive(b"USER alice\r\nPASS wrong\r\n")
    events = pop3.refused(Reject("Invalid login", code="IN-USE", counts=True))
    assert sent(events) == b"-ERR [IN-USE] Invalid login\r\n"
    assert others(events)[-1] == Close("rejected", "Invalid login")
    assert pop3.machine.state is State.DRAINING


def test_a_refusal_that_does_not_count_and_one_that_closes() -> None:
    pop3 = greeted(max_attempts=1)
    pop3.receive(b"USER alice\r\nPASS x\r\n")
    events = pop3.refused(Reject("Mailbox in use", code="IN-USE", counts=False))
    assert sent(events) == b"-ERR [IN-USE] Mailbox in use\r\n" and not others(events)
    pop3.receive(b"USER alice\r\nPASS x\r\n")
    events = pop3.refused(Reject("Go away", close=True))
    assert others(events)[-1] == Close("rejected", "Go away")


@pytest.mark.parametrize(
    ("outcome", "reply", "closes"),
    [
        ("throttled", b"-ERR [SYS/TEMP] Too many failed logins, try again later\r\n", True),
        ("upstream-unavailable", b"-ERR [SYS/TEMP] Mail server temporarily unavailable, try again later\r\n", False),
        ("router-error", b"-ERR [SYS/TEMP] Temporary failure, try again later\r\n", False),
    ],
)
def test_temporary_failures(outcome: str, reply: bytes, closes: bool) -> None:
    pop3 = greeted()
    pop3.receive(b"USER alice\r\nPASS secret\r\n")
    events = pop3.unavailable(outcome, "why")
    assert sent(events) == reply
    assert (Close(outcome, "why") in events) == closes
    assert pop3.failed_logins == 0


def test_starttls_discards_what_was_pipelined_behind_it_and_starts_over() -> None:
    pop3 = greeted(starttls="required")
    pop3.receive(b"USER alice\r\n")
    events = pop3.receive(b"STLS\r\nUSER mallory\r\nPASS x\r\n")
    assert sent(events) == b"+OK Begin TLS negotiation now\r\n"
    assert others(events) == [Discarded(len(b"USER mallory\r\nPASS x\r\n")), StartTLS()]
    assert pop3.machine.state is State.STARTTLS_HANDSHAKE
    # What the TLS layer delivers during the handshake waits until it is done; USER given
    # before TLS is forgotten, so PASS needs a new USER.
    assert pop3.receive(b"PASS secret\r\n") == []
    assert sent(pop3.tls_established(TLSInfo())) == b"-ERR Send USER first\r\n"
    assert pop3.machine.state is State.PRE_LOGIN
    assert sent(pop3.receive(b"STLS\r\n")) == b"-ERR TLS is already active\r\n"


def test_an_implicit_tls_listener_greets_once_the_handshake_is_done() -> None:
    pop3 = core(mode="tls", tls_offered=False)
    pop3.machine.fire(Input.BEGIN_TLS)
    assert pop3.receive(b"CAPA\r\n") == []
    events = pop3.tls_established(TLSInfo())
    assert sent(events).startswith(b"+OK relay.test POP3 ready\r\n+OK Capability list follows\r\n")


PRE_TLS_REQUIRED = {
    b"CAPA": b"+OK Capability list follows\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\nSTLS\r\n.\r\n",
    b"NOOP": b"+OK\r\n",
    b"USER alice": b"-ERR [AUTH] Use STLS first: logins are not accepted before TLS\r\n",
    b"PASS x": b"-ERR [AUTH] Use STLS first: logins are not accepted before TLS\r\n",
    b"APOP alice 0123456789abcdef0123456789abcdef": b"-ERR [AUTH] Use STLS first: logins are not accepted before TLS\r\n",
    b"AUTH PLAIN": b"-ERR [AUTH] Use STLS first: logins are not accepted before TLS\r\n",
    b"LIST": b"-ERR Unknown command or not valid before login\r\n",
    b"RETR 1": b"-ERR Unknown command or not valid before login\r\n",
    b"QUIT": b"+OK Bye\r\n",
}
AFTER_TLS = {
    b"STLS": b"-ERR TLS is already active\r\n",
    b"PASS x": b"-ERR Send USER first\r\n",
    b"APOP alice 0123456789abcdef0123456789abcdef": b"-ERR APOP is not available\r\n",
    b"AUTH CRAM-MD5": b"-ERR Unsupported authentication mechanism\r\n",
    b"AUTH": b"+OK\r\nPLAIN\r\nLOGIN\r\n.\r\n",
    b"USER": b"-ERR USER takes a user name\r\n",
    b"DELE 1": b"-ERR Unknown command or not valid before login\r\n",
    b"USER a\0b": b"-ERR Bare CR or NUL character in command\r\n",
    b"USER a\rb": b"-ERR Bare CR or NUL character in command\r\n",
}


@pytest.mark.parametrize(("command", "reply"), PRE_TLS_REQUIRED.items())
def test_each_command_before_tls_when_tls_is_required(command: bytes, reply: bytes) -> None:
    pop3 = greeted(starttls="required")
    assert sent(pop3.receive(command + b"\r\n")) == reply


@pytest.mark.parametrize(("command", "reply"), AFTER_TLS.items())
def test_each_command_after_tls(command: bytes, reply: bytes) -> None:
    pop3 = greeted(starttls="required")
    pop3.receive(b"STLS\r\n")
    pop3.tls_established(TLSInfo())
    assert sent(pop3.receive(command + b"\r\n")) == reply


@pytest.mark.parametrize("state_path", [[Input.ROUTE], [Input.STARTTLS], [Input.CLOSE]])
def test_no_command_is_read_outside_pre_login(state_path: list[Input]) -> None:
    pop3 = greeted()
    for event in state_path:
        pop3.machine.fire(event)
    assert pop3.receive(b"QUIT\r\nUSER a\r\nPASS b\r\n") == []


def test_bytes_split_anywhere_make_the_same_commands() -> None:
    whole = greeted()
    expected = sent(whole.receive(b"CAPA\r\nNOOP\nUSER alice\r\n"))
    pieces = greeted()
    got = b"".join(sent(pieces.receive(bytes([byte]))) for byte in b"CAPA\r\nNOOP\nUSER alice\r\n")
    assert got == expected


def test_sasl_plain_with_an_initial_response_and_with_a_challenge() -> None:
    pop3 = greeted()
    [route] = others(pop3.receive(b"AUTH PLAIN " + PLAIN + b"\r\n"))
    assert isinstance(route, Route) and route.facts["user"] == "alice" and route.facts["password"] == "secret"
    pop3 = greeted()
    assert sent(pop3.receive(b"AUTH PLAIN\r\n")) == b"+ \r\n"
    [route] = others(pop3.receive(PLAIN + b"\r\n"))
    assert isinstance(route, Route) and route.facts["auth_method"] == "plain"


def test_sasl_cancelled_malformed_and_a_foreign_authzid() -> None:
    pop3 = greeted()
    pop3.receive(b"AUTH PLAIN\r\n")
    assert sent(pop3.receive(b"*\r\n")) == b"-ERR Authentication cancelled\r\n"
    pop3.receive(b"AUTH PLAIN\r\n")
    assert sent(pop3.receive(b"!!!\r\n")).startswith(b"-ERR Invalid authentication: ")
    assert pop3.errors == 1
    foreign = base64.b64encode(b"bob\0alice\0secret")
    events = pop3.receive(b"AUTH PLAIN " + foreign + b"\r\n")
    assert sent(events).startswith(b"-ERR [AUTH] ")
    assert not any(isinstance(e, Route) for e in events)
    assert pop3.failed_logins == 1 and pop3.machine.state is State.PRE_LOGIN


def test_an_over_long_line_is_skipped_and_answered_once() -> None:
    pop3 = greeted()
    assert pop3.receive(b"USER " + b"a" * (POP3Core.max_line_length + 10)) == []
    assert sent(pop3.receive(b"aaaa\r\nNOOP\r\n")) == b"-ERR Line too long\r\n+OK\r\n"
    assert pop3.errors == 1


def test_errors_past_the_limit_close() -> None:
    pop3 = greeted(max_errors=2)
    events = pop3.receive(b"XYZZY\r\nPLUGH\r\nNOOP\r\n")
    assert sent(events) == (b"-ERR Unknown command or not valid before login\r\n" * 2 + b"-ERR Too many invalid commands\r\n")
    assert others(events) == [Close("protocol-error", "2 malformed or unknown commands")]


def test_junk_past_the_limit_closes_unanswered() -> None:
    pop3 = greeted(max_junk_commands=3)
    events = pop3.receive(b"NOOP\r\n" * 5)
    assert sent(events) == b"+OK\r\n" * 3 + b"-ERR Too many commands\r\n"
    assert isinstance(others(events)[-1], Close)


def test_silence_and_the_deadline() -> None:
    pop3 = greeted(login_timeout=5)
    events = pop3.timed_out()
    assert sent(events) == b"-ERR Disconnected for inactivity\r\n"
    assert others(events) == [Close("idle-timeout", "no command within 5s before login")]
    # The deadline while a login is in flight: the login may finish; if it fails, the end.
    pop3 = greeted(login_deadline=60)
    pop3.receive(b"USER a\r\nPASS b\r\n")
    assert pop3.deadline_passed() == []
    events = pop3.refused(Reject("Invalid login"))
    assert sent(events) == b"-ERR [AUTH] Invalid login\r\n-ERR Disconnected for inactivity\r\n"
    assert others(events)[-1] == Close("login-timeout", "not logged in within 60s")


def test_a_half_close_answers_every_whole_line_then_ends() -> None:
    pop3 = greeted()
    pop3.receive(b"NOOP\r\nCAPA")  # the last line never ends
    events = pop3.client_ended()
    assert others(events) == [Close("client-gone", "client ended its stream before it was routed")]
    pop3 = greeted()
    pop3.receive(b"USER a\r\nPASS b\r\n")
    assert pop3.client_ended() == []  # a login is in flight: its answer decides
    events = pop3.refused(Reject("Invalid login"))
    assert others(events)[-1] == Close("rejected", "Invalid login")


def test_quit_after_a_failed_login_keeps_the_failure_as_the_outcome() -> None:
    pop3 = greeted()
    pop3.receive(b"USER a\r\nPASS b\r\n")
    pop3.refused(Reject("Invalid login"))
    events = pop3.receive(b"QUIT\r\n")
    assert sent(events) == b"+OK Bye\r\n"
    assert others(events) == [Close("rejected", "Invalid login")]
