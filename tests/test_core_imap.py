"""
The IMAP core with bytes only: no reactor, no socket, no Deferred. Each test feeds the
core what a client sends and the shell's news (TLS up, the Router's answer, a timer),
and checks what the core asks for: the bytes a client would read, StartTLS, Route,
Close. At the end, one test per timer of the shell, on `task.Clock`.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any, cast

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import ILogObserver, LogEvent, Logger

from mailrelay.config import parse_config
from mailrelay.connector import UpstreamConnector
from mailrelay.core.events import Close, Discarded, Event, LoginRefused, Route, Send, StartTLS
from mailrelay.core.facts import TLSInfo
from mailrelay.core.imap import IMAPCore
from mailrelay.core.machine import IllegalTransition, Input, State
from mailrelay.listener import ListenerFactory
from mailrelay.protocols.imap import IMAPFrontEnd
from mailrelay.router import ClientCertificate, Reject
from mailrelay.session import Session, Sessions
from mailrelay.testing import RecordingRouter
from tests.support.cores import make_core, others, sent

HOSTNAME = "relay.test"
PLAIN = base64.b64encode(b"\0alice\0secret")
GREETING = b"* OK [CAPABILITY IMAP4rev1 LITERAL+ SASL-IR ID AUTH=PLAIN AUTH=LOGIN STARTTLS] relay.test IMAP4rev1 ready\r\n"
UNKNOWN = b" BAD Unknown command or not valid before login\r\n"
PRIVACY = b" NO [PRIVACYREQUIRED] Use STARTTLS first: logins are not accepted before TLS\r\n"
CAPABILITIES = b"* CAPABILITY IMAP4rev1 LITERAL+ SASL-IR ID AUTH=PLAIN AUTH=LOGIN STARTTLS\r\na OK CAPABILITY completed\r\n"
BAD_ID = b'c BAD ID takes NIL or a list of field-value pairs: ID ("name" "value")\r\n'


def core(mode: str = "starttls", tls_offered: bool = True, **config: Any) -> IMAPCore:
    settings: dict[str, Any] = {"hostname": HOSTNAME, "starttls": "optional", **config}
    return make_core(IMAPCore, 143, mode, tls_offered, **settings)


def greeted(**config: Any) -> IMAPCore:
    imap = core(**config)
    imap.greet()
    return imap


def routed(imap: IMAPCore, login: bytes = b"a1 LOGIN alice secret\r\n") -> Route:
    [route] = others(imap.receive(login))
    assert isinstance(route, Route) and imap.machine.state is State.ROUTING
    return route


def after_starttls(**config: Any) -> IMAPCore:
    imap = greeted(**config)
    imap.receive(b"t STARTTLS\r\n")
    imap.tls_established(TLSInfo())
    return imap


# The greeting


def test_the_greeting_says_what_may_be_done_now() -> None:
    imap = core()
    assert imap.machine.state is State.ACCEPTED
    assert sent(imap.greet()) == GREETING
    assert imap.machine.state is State.PRE_LOGIN
    required = core(starttls="required", capabilities=["IDLE", "ID"])
    assert sent(required.greet()) == (
        b"* OK [CAPABILITY IMAP4rev1 LITERAL+ SASL-IR ID IDLE STARTTLS LOGINDISABLED] relay.test IMAP4rev1 ready\r\n"
    )
    # AUTHENTICATE only: LOGIN is disabled, whatever the TLS.
    assert b"AUTH=XOAUTH2 STARTTLS LOGINDISABLED]" in sent(core(auth=["xoauth2"]).greet())


def test_a_tls_listener_greets_once_the_handshake_is_done() -> None:
    imap = core(mode="tls", tls_offered=False, starttls="required")
    imap.machine.fire(Input.BEGIN_TLS)
    assert imap.receive(b"a CAPABILITY\r\n") == []  # kept for after the greeting
    events = imap.tls_established(TLSInfo())
    assert sent(events) == (
        b"* OK [CAPABILITY IMAP4rev1 LITERAL+ SASL-IR ID AUTH=PLAIN AUTH=LOGIN] relay.test IMAP4rev1 ready\r\n"
        b"* CAPABILITY IMAP4rev1 LITERAL+ SASL-IR ID AUTH=PLAIN AUTH=LOGIN\r\na OK CAPABILITY completed\r\n"
    )
    assert sent(imap.receive(b"b STARTTLS\r\n")) == b"b BAD TLS is already active\r\n"


def test_external_is_offered_only_with_a_client_certificate() -> None:
    imap = core(mode="tls", tls_offered=False, auth=["plain", "external"])
    imap.machine.fire(Input.BEGIN_TLS)
    assert b"AUTH=EXTERNAL" not in sent(imap.tls_established(TLSInfo()))
    imap = core(mode="tls", tls_offered=False, auth=["plain", "external"])
    imap.machine.fire(Input.BEGIN_TLS)
    cert = ClientCertificate(subject="CN=alice", issuer="CN=ca", serial="01", fingerprint="00")
    assert b"AUTH=PLAIN AUTH=EXTERNAL]" in sent(imap.tls_established(TLSInfo(client_cert=cert)))


# Every command in every state that reads commands: its reply, and what it counts as.

OPTIONAL = {
    # command: (reply, junk, errors)
    b"a CAPABILITY": (
        b"* CAPABILITY IMAP4rev1 LITERAL+ SASL-IR ID AUTH=PLAIN AUTH=LOGIN STARTTLS\r\na OK CAPABILITY completed\r\n",
        0,
        0,
    ),
    b"a capability": (
        b"* CAPABILITY IMAP4rev1 LITERAL+ SASL-IR ID AUTH=PLAIN AUTH=LOGIN STARTTLS\r\na OK CAPABILITY completed\r\n",
        0,
        0,
    ),
    b"a CAPABILITY x": (b"a BAD CAPABILITY takes no arguments\r\n", 0, 1),
    b"b NOOP": (b"b OK NOOP completed\r\n", 1, 0),
    b"c ID NIL": (b"* ID NIL\r\nc OK ID completed\r\n", 0, 0),
    b'c ID ("name" "Mail" "version" NIL)': (b"* ID NIL\r\nc OK ID completed\r\n", 0, 0),
    b"c ID": (BAD_ID, 0, 1),
    b'c ID ("name")': (BAD_ID, 0, 1),
    b'c ID (name "x")': (BAD_ID, 0, 1),
    b'c ID ("name" x)': (BAD_ID, 0, 1),
    b"c ID " + b"(" + b'"k" "v" ' * 31 + b")": (
        b'c BAD ID takes NIL or a list of field-value pairs: ID ("name" "value")\r\n',
        0,
        1,
    ),
    b"d STARTTLS x": (b"d BAD STARTTLS takes no arguments\r\n", 0, 1),
    b"e LOGIN alice": (b"e BAD LOGIN takes a user name and a password\r\n", 0, 1),
    b"e LOGIN alice (secret)": (b"e BAD LOGIN takes a user name and a password\r\n", 0, 1),
    b'e LOGIN "" secret': (b"e BAD Invalid LOGIN: empty user name\r\n", 0, 1),
    b"f AUTHENTICATE": (b"f BAD AUTHENTICATE takes a mechanism and an optional initial response\r\n", 0, 1),
    b'f AUTHENTICATE "PLAIN"': (b"f BAD AUTHENTICATE takes a mechanism and an optional initial response\r\n", 0, 1),
    b"f AUTHENTICATE PLAIN a b": (b"f BAD AUTHENTICATE takes a mechanism and an optional initial response\r\n", 0, 1),
    b"f AUTHENTICATE CRAM-MD5": (b"f NO Unsupported authentication mechanism\r\n", 1, 0),
    b"f AUTHENTICATE PLAIN": (b"+ \r\n", 0, 0),
    b"f AUTHENTICATE LOGIN": (b"+ VXNlcm5hbWU6\r\n", 0, 0),
    b"g SELECT INBOX": (b"g" + UNKNOWN, 0, 1),
    b"g FETCH 1 BODY[]": (b"g" + UNKNOWN, 0, 1),
    b"g STATUS INBOX (MESSAGES)": (b"g" + UNKNOWN, 0, 1),
    b"g XYZZY": (b"g" + UNKNOWN, 0, 1),
    b"g": (b"g" + UNKNOWN, 0, 1),
    b'g "NOOP"': (b"g" + UNKNOWN, 0, 1),
    b"": (b"* BAD Empty command line\r\n", 0, 1),
    b"+ NOOP": (b"* BAD Invalid tag\r\n", 0, 1),
    b'"h" NOOP': (b"* BAD Invalid tag\r\n", 0, 1),
    b"h NOOP (": (b"h BAD Invalid syntax: unbalanced parenthesis\r\n", 0, 1),
    b"h NOOP )": (b"h BAD Invalid syntax: unbalanced parenthesis\r\n", 0, 1),
    b'h LOGIN "alice secret': (b"h BAD Invalid syntax: unterminated quoted string\r\n", 0, 1),
    b'h LOGIN "al\\ice" x': (b"h BAD Invalid syntax: invalid backslash escape in a quoted string\r\n", 0, 1),
    b"h LOGIN al%ce x": (b"h BAD Invalid syntax: unexpected character %\r\n", 0, 1),
    b"i NOOP\rLOGOUT": (b"i BAD Bare CR or NUL character in command\r\n", 0, 1),
    b"i LOGIN alice se\0cret": (b"i BAD Bare CR or NUL character in command\r\n", 0, 1),
    b"\0": (b"* BAD Bare CR or NUL character in command\r\n", 0, 1),
}
LOGOUT = b"* BYE Logging out\r\nj OK LOGOUT completed\r\n"
REQUIRED = {  # plaintext, TLS required
    b"a CAPABILITY": (
        b"* CAPABILITY IMAP4rev1 LITERAL+ SASL-IR ID STARTTLS LOGINDISABLED\r\na OK CAPABILITY completed\r\n",
        0,
        0,
    ),
    b"b NOOP": (b"b OK NOOP completed\r\n", 1, 0),
    b"c ID NIL": (b"* ID NIL\r\nc OK ID completed\r\n", 0, 0),
    b"e LOGIN alice secret": (b"e" + PRIVACY, 1, 0),
    b"e LOGIN alice": (b"e BAD LOGIN takes a user name and a password\r\n", 0, 1),
    b"f AUTHENTICATE PLAIN": (b"f" + PRIVACY, 1, 0),
    b"f AUTHENTICATE CRAM-MD5": (b"f" + PRIVACY, 1, 0),
    b"f AUTHENTICATE": (b"f BAD AUTHENTICATE takes a mechanism and an optional initial response\r\n", 0, 1),
    b"g SELECT INBOX": (b"g" + UNKNOWN, 0, 1),
}
AFTER_TLS = {
    b"a CAPABILITY": (b"* CAPABILITY IMAP4rev1 LITERAL+ SASL-IR ID AUTH=PLAIN AUTH=LOGIN\r\na OK CAPABILITY completed\r\n", 0, 0),
    b"b NOOP": (b"b OK NOOP completed\r\n", 1, 0),
    b"d STARTTLS": (b"d BAD TLS is already active\r\n", 0, 1),
    b"f AUTHENTICATE EXTERNAL": (b"f NO Unsupported authentication mechanism\r\n", 1, 0),
    b"f AUTHENTICATE PLAIN": (b"+ \r\n", 0, 0),
    b"g SELECT INBOX": (b"g" + UNKNOWN, 0, 1),
}
NO_STARTTLS = {  # a plaintext listener with no certificate
    b"a CAPABILITY": (b"* CAPABILITY IMAP4rev1 LITERAL+ SASL-IR ID AUTH=PLAIN AUTH=LOGIN\r\na OK CAPABILITY completed\r\n", 0, 0),
    b"d STARTTLS": (b"d BAD STARTTLS is not available\r\n", 0, 1),
}
AUTHENTICATE_ONLY = {  # auth = ["xoauth2"]: no LOGIN
    b"e LOGIN alice secret": (b"e NO [CANNOT] LOGIN is disabled: use AUTHENTICATE\r\n", 1, 0),
    b"f AUTHENTICATE PLAIN": (b"f NO Unsupported authentication mechanism\r\n", 1, 0),
    b"f AUTHENTICATE XOAUTH2": (b"+ \r\n", 0, 0),
}


def _table() -> list[Any]:
    return list(_rows())


def _rows() -> Iterator[Any]:
    for name, table, make in (
        ("optional", OPTIONAL, lambda: greeted()),
        ("required", REQUIRED, lambda: greeted(starttls="required")),
        ("after-tls", AFTER_TLS, lambda: after_starttls(starttls="required")),
        ("no-starttls", NO_STARTTLS, lambda: greeted(tls_offered=False)),
        ("authenticate-only", AUTHENTICATE_ONLY, lambda: greeted(auth=["xoauth2"])),
    ):
        for command, (reply, junk, errors) in table.items():
            yield pytest.param(make, command, reply, junk, errors, id=f"{name}:{command[:30]!r}")


@pytest.mark.parametrize(("make", "command", "reply", "junk", "errors"), _table())
def test_each_command_in_each_state_that_reads_commands(make: Any, command: bytes, reply: bytes, junk: int, errors: int) -> None:
    imap: IMAPCore = make()
    before = (imap.junk_commands, imap.errors)
    events = imap.receive(command + b"\r\n")
    assert sent(events) == reply
    assert (imap.junk_commands - before[0], imap.errors - before[1]) == (junk, errors)
    assert others(events) == [] and imap.machine.state is State.PRE_LOGIN


@pytest.mark.parametrize("make", [greeted, after_starttls, lambda: greeted(starttls="required")])
def test_logout_in_every_pre_login_state(make: Any) -> None:
    imap = make()
    events = imap.receive(b"j LOGOUT\r\nk NOOP\r\n")
    assert sent(events) == LOGOUT
    assert others(events) == [Close("closed", "client quit before it was routed")]
    assert imap.machine.state is State.DRAINING


def test_starttls_in_plaintext_hands_over_to_tls() -> None:
    imap = greeted()
    events = imap.receive(b"d STARTTLS\r\n")
    assert sent(events) == b"d OK Begin TLS negotiation now\r\n"
    assert others(events) == [StartTLS()]
    assert imap.machine.state is State.STARTTLS_HANDSHAKE


def _to(state: State) -> IMAPCore:
    """A core in `state`, the way the session gets there."""
    imap = greeted()
    paths: dict[State, list[bytes | Input]] = {
        State.STARTTLS_HANDSHAKE: [b"t STARTTLS\r\n"],
        State.ROUTING: [b"a1 LOGIN alice secret\r\n"],
        State.CONNECTING: [b"a1 LOGIN alice secret\r\n", Input.CONNECT],
        State.LOGGING_IN: [b"a1 LOGIN alice secret\r\n", Input.CONNECT, Input.LOG_IN],
        State.SPLICED: [b"a1 LOGIN alice secret\r\n", Input.CONNECT, Input.LOG_IN, Input.SPLICE],
        State.DRAINING: [b"q LOGOUT\r\n"],
        State.CLOSED: [Input.LOST],
    }
    for step in paths[state]:
        if isinstance(step, bytes):
            imap.receive(step)
        else:
            imap.machine.fire(step)
    assert imap.machine.state is state
    return imap


COMMANDS = [
    b"a CAPABILITY",
    b"b NOOP",
    b"c ID NIL",
    b"d STARTTLS",
    b"e LOGIN bob secret",
    b"f AUTHENTICATE PLAIN",
    b"g SELECT INBOX",
    b"j LOGOUT",
    b"\0",
    b"x" * (IMAPCore.max_line_length + 1),
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: repr(c[:20]))
@pytest.mark.parametrize(
    "state",
    [State.STARTTLS_HANDSHAKE, State.ROUTING, State.CONNECTING, State.LOGGING_IN, State.SPLICED, State.DRAINING, State.CLOSED],
)
def test_no_command_is_answered_outside_pre_login(state: State, command: bytes) -> None:
    imap = _to(state)
    counts = (imap.junk_commands, imap.errors, imap.failed_logins, imap.commands_read)
    assert imap.receive(command + b"\r\n") == []
    assert (imap.junk_commands, imap.errors, imap.failed_logins, imap.commands_read) == counts
    assert imap.machine.state is state


def test_what_arrives_while_a_login_is_in_flight_goes_to_the_upstream_after_it() -> None:
    imap = greeted()
    route = routed(imap, b"a1 LOGIN alice secret\r\na2 SELECT INBOX\r\n")
    assert route.facts == {"user": "alice", "password": "secret", "auth_method": "plain", "salt": None, "attempt": 1}
    assert imap.tag == b"a1"
    assert imap.receive(b"a3 FETCH 1 (FLAGS)\r\n") == []
    imap.machine.fire(Input.CONNECT)
    imap.machine.fire(Input.LOG_IN)
    reply = b"* CAPABILITY IMAP4rev1 IDLE\r\na1 OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n"
    assert imap.logged_in(reply) == [Send(reply)]
    imap.machine.fire(Input.SPLICE)
    assert imap.leftover() == b"a2 SELECT INBOX\r\na3 FETCH 1 (FLAGS)\r\n"
    assert imap.leftover() == b""


def test_the_client_s_id_is_kept_for_the_upstream_and_forgotten_at_starttls() -> None:
    imap = greeted()
    assert imap.client_id is None
    imap.receive(b'c ID ("name" "Mail" "version" NIL "x-originating-ip" "192.0.2.66")\r\n')
    assert imap.client_id == [("name", "Mail"), ("version", None), ("x-originating-ip", "192.0.2.66")]
    imap.receive(b"t STARTTLS\r\n")
    imap.tls_established(TLSInfo())
    assert imap.client_id is None  # RFC 3501 6.2.1: what was said in plaintext is forgotten
    imap.receive(b"c ID NIL\r\n")
    assert imap.client_id == []


def test_literals_with_and_without_a_continuation() -> None:
    imap = greeted()
    assert sent(imap.receive(b"a1 LOGIN {5}\r\n")) == b"+ OK\r\n"
    assert sent(imap.receive(b"alice {6}\r\n")) == b"+ OK\r\n"
    route = routed(imap, b'se"c\\t\r\n')
    assert (route.facts["user"], route.facts["password"]) == ("alice", 'se"c\\t')
    imap = greeted()
    route = routed(imap, b"a1 LOGIN {5+}\r\nalice {6+}\r\nsecret\r\n")  # LITERAL+: no go-ahead
    assert (route.facts["user"], route.facts["password"]) == ("alice", "secret")
    # A literal holds bytes, line ends included; an ID value too.
    imap = greeted()
    assert sent(imap.receive(b'c ID ("name" {4+}\r\nM\r\nx)\r\n')) == b"* ID NIL\r\nc OK ID completed\r\n"
    assert imap.client_id == [("name", "M\r\nx")]


def test_a_literal_split_anywhere_makes_the_same_command() -> None:
    whole = b"a1 LOGIN {5}\r\nalice {6+}\r\nsecret\r\n"
    imap = greeted()
    events: list[Event] = []
    for byte in whole:
        events += imap.receive(bytes([byte]))
    assert sent(events) == b"+ OK\r\n"
    [route] = others(events)
    assert isinstance(route, Route) and route.facts["password"] == "secret"


def test_literals_too_large() -> None:
    imap = greeted()
    events = imap.receive(b"a1 LOGIN alice {8193}\r\na2 NOOP\r\n")
    assert sent(events) == b"a1 BAD Literal too large\r\na2 OK NOOP completed\r\n"  # no go-ahead: nothing was sent
    assert imap.errors == 1
    imap = greeted()
    events = imap.receive(b"a1 LOGIN alice {8193+}\r\n" + b"x" * 8193)
    assert sent(events) == b"* BYE Literal too large\r\n"
    assert others(events) == [Close("protocol-error", "a literal of 8193 bytes, over the limit of 8192")]
    # A command's lines and literals together are bounded too.
    imap = greeted()
    chunk = b"x" * 8000
    events = imap.receive(b"c ID (" + b"".join(b'"k" {8000+}\r\n' + chunk + b" " for _ in range(8)) + b'"k" {8000}\r\n')
    assert sent(events) == b"c BAD Literal too large\r\n"


def test_a_literal_is_refused_before_it_is_sent_when_the_command_cannot_take_it() -> None:
    imap = greeted()
    assert sent(imap.receive(b"a SELECT {5}\r\n")) == b"a" + UNKNOWN
    assert sent(imap.receive(b"{5}\r\n")) == b"*" + UNKNOWN
    assert sent(imap.receive(b"b LOGIN a\rb {5}\r\n")) == b"b BAD Bare CR or NUL character in command\r\n"
    assert imap.errors == 3
    # LOGIN before TLS: refused before the client sends its password.
    imap = greeted(starttls="required")
    assert sent(imap.receive(b"c LOGIN alice {6}\r\n")) == b"c" + PRIVACY
    assert sent(imap.receive(b"d NOOP\r\n")) == b"d OK NOOP completed\r\n"  # a new command, not the literal
    assert imap.junk_commands == 2


def test_a_literal_carries_any_byte_and_the_login_checks_them() -> None:
    imap = greeted()
    route = routed(imap, "a1 LOGIN alice {7+}\r\nsécret\r\n".encode())
    assert route.facts["password"] == "sécret"
    # A CR in a literal is data, not a bare CR in a line: the login's own check refuses it.
    imap = greeted()
    events = imap.receive(b"a1 LOGIN alice {3+}\r\nx\ry\r\n")
    assert sent(events) == b"a1 BAD Invalid LOGIN: password contains control characters\r\n"
    assert sent(imap.receive(b"a2 LOGIN {5+}\r\nalice x\ry\r\n")) == b"a2 BAD Bare CR or NUL character in command\r\n"
    assert imap.errors == 2


def test_an_over_long_line_is_skipped_and_answered_once() -> None:
    imap = greeted()
    assert imap.receive(b"a1 LOGIN alice " + b"a" * IMAPCore.max_line_length) == []
    assert sent(imap.receive(b"aaaa\r\nb NOOP\r\n")) == b"* BAD Command line too long\r\nb OK NOOP completed\r\n"
    assert imap.errors == 1
    # After a literal: the over-long line ends the command; the next line is a new one.
    imap = greeted()
    imap.receive(b"a1 LOGIN {5+}\r\nalice")
    events = imap.receive(b"x" * IMAPCore.max_line_length + b"\r\nb NOOP\r\n")
    assert sent(events) == b"* BAD Command line too long\r\nb OK NOOP completed\r\n"
    assert imap.machine.state is State.PRE_LOGIN


def test_bare_lf_ends_lines_too_and_lines_split_anywhere_are_the_same() -> None:
    stream = b"a CAPABILITY\nb NOOP\r\nc ID NIL\nd LOGIN alice secret\r\n"
    whole = greeted()
    expected = whole.receive(stream)
    pieces = greeted()
    got: list[Event] = []
    for byte in stream:
        got += pieces.receive(bytes([byte]))
    assert sent(got) == sent(expected) and others(got) == others(expected)
    assert isinstance(others(got)[-1], Route)


def test_pipelined_commands_are_answered_in_order() -> None:
    imap = greeted()
    events = imap.receive(b"a CAPABILITY\r\nb NOOP\r\nc SELECT INBOX\r\nd ID NIL\r\n")
    assert sent(events) == (
        b"* CAPABILITY IMAP4rev1 LITERAL+ SASL-IR ID AUTH=PLAIN AUTH=LOGIN STARTTLS\r\na OK CAPABILITY completed\r\n"
        b"b OK NOOP completed\r\nc" + UNKNOWN + b"* ID NIL\r\nd OK ID completed\r\n"
    )


# STARTTLS


def test_starttls_discards_what_was_pipelined_behind_it_and_starts_over() -> None:
    imap = greeted(starttls="required")
    imap.receive(b'c ID ("name" "Mail")\r\n')
    events = imap.receive(b"t STARTTLS\r\nu LOGIN mallory x\r\n")
    assert sent(events) == b"t OK Begin TLS negotiation now\r\n"
    assert others(events) == [Discarded(len(b"u LOGIN mallory x\r\n")), StartTLS()]
    # What the TLS layer delivers during the handshake waits until it is done.
    assert imap.receive(b"a CAPABILITY\r\n") == []
    events = imap.tls_established(TLSInfo())
    assert sent(events) == b"* CAPABILITY IMAP4rev1 LITERAL+ SASL-IR ID AUTH=PLAIN AUTH=LOGIN\r\na OK CAPABILITY completed\r\n"
    assert imap.machine.state is State.PRE_LOGIN and imap.client_id is None
    route = routed(imap, b"b LOGIN alice secret\r\n")
    assert route.facts["user"] == "alice"


def test_starttls_inside_a_literal_s_command_is_no_command() -> None:
    imap = greeted()
    # The literal's bytes are the ID's value, not a STARTTLS.
    assert sent(imap.receive(b'c ID ("name" {12+}\r\nt STARTTLS\r\n)\r\n')) == b"* ID NIL\r\nc OK ID completed\r\n"
    assert imap.machine.state is State.PRE_LOGIN


# Logging in


def test_login_and_authenticate_route_under_their_tag() -> None:
    imap = greeted()
    route = routed(imap, b"A001 AUTHENTICATE PLAIN " + PLAIN + b"\r\n")
    assert imap.tag == b"A001" and route.facts["user"] == "alice" and route.facts["password"] == "secret"
    imap = greeted()
    assert sent(imap.receive(b"x AUTHENTICATE PLAIN\r\n")) == b"+ \r\n"
    route = routed(imap, PLAIN + b"\r\n")
    assert imap.tag == b"x" and route.facts["auth_method"] == "plain"
    imap = greeted()
    assert sent(imap.receive(b"y AUTHENTICATE LOGIN\r\n")) == b"+ VXNlcm5hbWU6\r\n"
    assert sent(imap.receive(base64.b64encode(b"alice") + b"\r\n")) == b"+ UGFzc3dvcmQ6\r\n"
    route = routed(imap, base64.b64encode(b"secret") + b"\r\n")
    assert (route.facts["user"], route.facts["password"], route.facts["auth_method"]) == ("alice", "secret", "login")


def test_sasl_cancelled_malformed_too_long_and_a_foreign_authzid() -> None:
    imap = greeted()
    imap.receive(b"x AUTHENTICATE PLAIN\r\n")
    assert sent(imap.receive(b"*\r\n")) == b"x BAD Authentication cancelled\r\n"
    assert (imap.junk_commands, imap.errors) == (1, 0)
    imap.receive(b"y AUTHENTICATE PLAIN\r\n")
    assert sent(imap.receive(b"!!!\r\n")) == b"y BAD Invalid authentication: invalid base64 in the response\r\n"
    assert imap.errors == 1
    imap.receive(b"z AUTHENTICATE PLAIN\r\n")
    assert imap.receive(b"A" * IMAPCore.max_line_length) == []
    assert sent(imap.receive(b"A\r\n")) == b"z BAD Invalid authentication: response too long\r\n"
    assert imap.errors == 2
    foreign = base64.b64encode(b"bob\0alice\0secret")
    events = imap.receive(b"w AUTHENTICATE PLAIN " + foreign + b"\r\n")
    assert sent(events).startswith(b"w NO [AUTHENTICATIONFAILED] ")
    assert others(events) == [LoginRefused(imap.last_failure[1] if imap.last_failure else "", 1, 3)]
    assert imap.failed_logins == 1 and imap.machine.state is State.PRE_LOGIN


def test_a_sasl_cancel_past_the_junk_limit_closes() -> None:
    imap = greeted(max_junk_commands=1)
    imap.receive(b"b NOOP\r\nx AUTHENTICATE PLAIN\r\n")
    events = imap.receive(b"*\r\n")
    assert sent(events) == b"* BYE Too many commands\r\n"
    assert isinstance(others(events)[-1], Close)


@pytest.mark.parametrize(
    "asking", [[], [Input.CONNECT], [Input.CONNECT, Input.LOG_IN]], ids=["routing", "connecting", "logging-in"]
)
def test_a_refused_login_is_answered_counted_and_the_next_command_read(asking: list[Input]) -> None:
    imap = greeted(max_attempts=2)
    routed(imap, b"a1 LOGIN alice wrong\r\na2 NOOP\r\n")
    for event in asking:
        imap.machine.fire(event)
    events = imap.refused(Reject("Invalid login"))
    assert sent(events) == b"a1 NO [AUTHENTICATIONFAILED] Invalid login\r\na2 OK NOOP completed\r\n"
    assert others(events) == [LoginRefused("Invalid login", 1, 2)]
    assert imap.machine.state is State.PRE_LOGIN
    route = routed(imap, b"a3 LOGIN alice wrong\r\n")
    assert route.facts["attempt"] == 2
    events = imap.refused(Reject("Invalid login"))
    assert sent(events) == b"a3 NO [AUTHENTICATIONFAILED] Invalid login\r\n* BYE Too many failed logins\r\n"
    assert others(events) == [LoginRefused("Invalid login", 2, 2), Close("rejected", "Invalid login")]
    assert imap.machine.state is State.DRAINING


def test_refusals_with_a_code_without_counting_and_closing() -> None:
    imap = greeted(max_attempts=1)
    routed(imap)
    events = imap.refused(Reject("Mailbox in use", code="inuse", counts=False))
    assert events == [Send(b"a1 NO [INUSE] Mailbox in use\r\n")]
    routed(imap, b"a2 LOGIN alice secret\r\n")
    assert sent(imap.refused(Reject("Nope", code="NOT-ALPHA", counts=False))) == b"a2 NO [AUTHENTICATIONFAILED] Nope\r\n"
    routed(imap, b"a3 LOGIN alice secret\r\n")
    events = imap.refused(Reject("Go away\r\n* OK injected", close=True, counts=False))
    assert sent(events) == b"a3 NO [AUTHENTICATIONFAILED] Go away  * OK injected\r\n* BYE Go away  * OK injected\r\n"
    assert others(events) == [Close("rejected", "Go away\r\n* OK injected")]


@pytest.mark.parametrize(
    ("outcome", "reply", "closes"),
    [
        ("throttled", b"a1 NO [UNAVAILABLE] Too many failed logins, try again later\r\n* BYE Too many failed logins\r\n", True),
        ("upstream-unavailable", b"a1 NO [UNAVAILABLE] Mail server temporarily unavailable, try again later\r\n", False),
        ("router-error", b"a1 NO [UNAVAILABLE] Temporary failure, try again later\r\n", False),
    ],
)
def test_temporary_failures_under_the_login_s_tag(outcome: str, reply: bytes, closes: bool) -> None:
    imap = greeted()
    routed(imap, b"a1 LOGIN alice secret\r\nb NOOP\r\n")
    events = imap.unavailable(outcome, "why")
    if closes:
        assert sent(events) == reply and others(events) == [Close(outcome, "why")]
    else:
        assert sent(events) == reply + b"b OK NOOP completed\r\n" and others(events) == []
    assert imap.failed_logins == 0


def test_the_shell_s_news_in_the_wrong_state_is_a_bug_the_machine_catches() -> None:
    imap = greeted()
    with pytest.raises(IllegalTransition):
        imap.refused(Reject("no login was asked for"))
    with pytest.raises(IllegalTransition):
        imap.unavailable("router-error", "nor routed")
    routed(imap)
    with pytest.raises(IllegalTransition):
        imap.tls_established(TLSInfo())  # no STARTTLS was said


# Limits and timers


def test_errors_past_the_limit_close() -> None:
    imap = greeted(max_errors=2)
    events = imap.receive(b"a XYZZY\r\nb PLUGH\r\nc NOOP\r\n")
    assert sent(events) == b"a" + UNKNOWN + b"b" + UNKNOWN + b"* BYE Too many invalid commands\r\n"
    assert others(events) == [Close("protocol-error", "2 malformed or unknown commands")]


def test_junk_past_the_limit_closes_unanswered() -> None:
    imap = greeted(max_junk_commands=3)
    events = imap.receive(b"a NOOP\r\n" * 5)
    assert sent(events) == b"a OK NOOP completed\r\n" * 3 + b"* BYE Too many commands\r\n"
    assert others(events) == [Close("protocol-error", "more than 3 commands that achieve nothing before login")]


def test_two_capabilities_and_one_id_are_free_then_junk() -> None:
    imap = greeted(max_junk_commands=1)
    imap.receive(b"a CAPABILITY\r\nb ID NIL\r\nc CAPABILITY\r\n")
    assert imap.junk_commands == 0
    events = imap.receive(b"d ID NIL\r\ne CAPABILITY\r\n")
    assert sent(events) == b"* ID NIL\r\nd OK ID completed\r\n* BYE Too many commands\r\n"
    assert isinstance(others(events)[-1], Close)


def test_failed_logins_are_not_junk_nor_errors() -> None:
    imap = greeted(max_junk_commands=1, max_errors=1, max_attempts=5)
    for _ in range(3):
        routed(imap, b"a LOGIN alice wrong\r\n")
        imap.refused(Reject("Invalid login"))
    assert (imap.junk_commands, imap.errors, imap.failed_logins) == (0, 0, 3)


def test_silence_and_the_deadline() -> None:
    imap = greeted(login_timeout=5)
    events = imap.timed_out()
    assert sent(events) == b"* BYE Disconnected for inactivity\r\n"
    assert others(events) == [Close("idle-timeout", "no command within 5s before login")]
    imap = greeted(login_deadline=60)
    events = imap.deadline_passed()
    assert sent(events) == b"* BYE Disconnected for inactivity\r\n"
    assert others(events) == [Close("login-timeout", "not logged in within 60s")]
    # The deadline while a login is in flight: the login may finish; if it fails, the end.
    imap = greeted(login_deadline=60)
    routed(imap, b"a1 LOGIN alice wrong\r\na2 NOOP\r\n")
    assert imap.deadline_passed() == []
    events = imap.refused(Reject("Invalid login"))
    assert sent(events) == b"a1 NO [AUTHENTICATIONFAILED] Invalid login\r\n* BYE Disconnected for inactivity\r\n"
    assert others(events)[-1] == Close("login-timeout", "not logged in within 60s")
    # ... and if it succeeds, the session goes on.
    imap = greeted(login_deadline=60)
    routed(imap)
    imap.deadline_passed()
    imap.machine.fire(Input.CONNECT)
    assert imap.logged_in(b"a1 OK Logged in\r\n") == [Send(b"a1 OK Logged in\r\n")]


def test_a_half_close_answers_every_whole_line_then_ends() -> None:
    imap = greeted()
    imap.receive(b"a NOOP\r\nb CAPA")  # the last line never ends
    events = imap.client_ended()
    assert others(events) == [Close("client-gone", "client ended its stream before it was routed")]
    imap = greeted()
    imap.receive(b"a1 LOGIN alice {6+}\r\nsec")  # nor does the literal
    assert others(imap.client_ended()) == [Close("client-gone", "client ended its stream before it was routed")]
    imap = greeted()
    routed(imap)
    assert imap.client_ended() == []  # a login is in flight: its answer decides
    events = imap.refused(Reject("Invalid login"))
    assert others(events)[-1] == Close("rejected", "Invalid login")


def test_logout_after_a_failed_login_keeps_the_failure_as_the_outcome() -> None:
    imap = greeted()
    routed(imap)
    imap.refused(Reject("Invalid login"))
    events = imap.receive(b"q LOGOUT\r\n")
    assert sent(events) == b"* BYE Logging out\r\nq OK LOGOUT completed\r\n"
    assert others(events) == [Close("rejected", "Invalid login")]


def test_each_read_restarts_the_silence_timer() -> None:
    imap = greeted()
    imap.receive(b"a NOOP\r\nb LOGIN {5}\r\n")
    assert imap.commands_read == 2
    imap.receive(b"alice")  # a literal counts once it is whole
    assert imap.commands_read == 3
    imap.receive(b" x\r\n")
    assert imap.commands_read == 4


# The shell's timers, on a Clock


class _Transport(StringTransport):
    def __init__(self) -> None:
        super().__init__(hostAddress=IPv4Address("TCP", "192.0.2.1", 143), peerAddress=IPv4Address("TCP", "192.0.2.7", 50000))
        self.tls_started = False
        self.aborted = False

    def startTLS(self, contextFactory: Any) -> None:
        self.tls_started = True

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()


@pytest.fixture
def session_lines(monkeypatch: pytest.MonkeyPatch) -> list[LogEvent]:
    lines: list[LogEvent] = []
    monkeypatch.setattr(Session, "log", Logger(observer=cast(ILogObserver, lines.append)))
    return lines


def _shell(**front_end: Any) -> tuple[IMAPFrontEnd, _Transport, Clock]:
    listener = {"name": "imap", "listen": "tcp:0", "mode": "starttls", "protocol": "imap", "hostname": HOSTNAME, **front_end}
    config = parse_config({"listener": [listener]}, "<test>")
    clock = Clock()
    factory = ListenerFactory(
        config.listeners[0],
        RecordingRouter(Reject("unused")),
        UpstreamConnector(clock),
        Sessions(clock),
        clock,
        tls=object(),  # type: ignore[arg-type]  # only handed to the transport's startTLS
    )
    protocol = factory.buildProtocol(IPv4Address("TCP", "192.0.2.7", 50000))
    assert isinstance(protocol, IMAPFrontEnd)
    transport = _Transport()
    protocol.makeConnection(transport)
    return protocol, transport, clock


def _finish(protocol: IMAPFrontEnd, clock: Clock) -> None:
    protocol.connectionLost()
    assert clock.getDelayedCalls() == []  # every timer is gone with the connection


def test_the_shell_closes_a_silent_client(session_lines: list[LogEvent]) -> None:
    protocol, transport, clock = _shell(login_timeout=20, login_deadline=100)
    assert (
        transport.value()
        == b"* OK [CAPABILITY IMAP4rev1 LITERAL+ SASL-IR ID STARTTLS LOGINDISABLED] relay.test IMAP4rev1 ready\r\n"
    )
    transport.clear()
    clock.advance(19)
    protocol.dataReceived(b"a NOOP\r\n")  # a command restarts the silence
    clock.advance(19)
    assert transport.value() == b"a OK NOOP completed\r\n" and not transport.disconnecting
    clock.advance(1)
    assert transport.value() == b"a OK NOOP completed\r\n* BYE Disconnected for inactivity\r\n" and transport.disconnecting
    assert [(e["outcome"], e["reason"]) for e in session_lines] == [("idle-timeout", "no command within 20s before login")]
    _finish(protocol, clock)


def test_the_shell_closes_a_busy_client_at_the_login_deadline(session_lines: list[LogEvent]) -> None:
    protocol, transport, clock = _shell(login_timeout=20, login_deadline=50, max_junk_commands=100)
    for _ in range(4):
        clock.advance(12)
        protocol.dataReceived(b"a NOOP\r\n")
    assert not transport.disconnecting
    clock.advance(2)
    assert transport.value().endswith(b"a OK NOOP completed\r\n* BYE Disconnected for inactivity\r\n") and transport.disconnecting
    assert [(e["outcome"], e["reason"]) for e in session_lines] == [("login-timeout", "not logged in within 50s")]
    _finish(protocol, clock)


def test_the_shell_drops_a_client_that_never_finishes_its_starttls_handshake(session_lines: list[LogEvent]) -> None:
    protocol, transport, clock = _shell(login_timeout=20, login_deadline=100, handshake_timeout=10)
    protocol.dataReceived(b"t STARTTLS\r\n")
    assert transport.value().endswith(b"t OK Begin TLS negotiation now\r\n") and transport.tls_started
    handshake_timeout = protocol.listener.handshake_timeout
    assert handshake_timeout < 20  # what ends it is the handshake's timer, not silence
    clock.advance(handshake_timeout)
    assert transport.aborted
    assert [(e["outcome"], e["reason"]) for e in session_lines] == [
        ("tls-failed", f"no TLS handshake within {handshake_timeout:g}s")
    ]
    _finish(protocol, clock)
