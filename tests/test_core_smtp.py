"""
The SMTP core (`mailrelay.core.smtp`) driven with bytes alone: no reactor, no socket, no
Deferred. Every state a session's client side passes through, every command in each
(the command table), and what the core hands on. Then, once each, the timers the Twisted
shell (`mailrelay.protocols.smtp`) owns, on `task.Clock` with an in-memory transport.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import attrs
import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from zope.interface import implementer

from mailrelay.config import FrontEndConfig, ListenerConfig
from mailrelay.core.events import Close, Discarded, Event, LoginRefused, Route, Send, StartTLS
from mailrelay.core.facts import TLSInfo
from mailrelay.core.machine import IllegalTransition, Input, State
from mailrelay.core.smtp import SMTPCore
from mailrelay.core.smtp_stream import MAIL_SYNTAX, RCPT_SYNTAX
from mailrelay.listener import ListenerFactory
from mailrelay.protocols.smtp import SMTPFrontEnd
from mailrelay.router import ClientCertificate, IRouter, Reject
from mailrelay.session import Sessions
from tests.support.cores import make_core, others, sent

HOST = "relay.test"
PLAIN_IR = base64.b64encode(b"\0alice@example.test\0s3cret")
GREETING = b"220 relay.test ESMTP ready\r\n"
EHLO_PLAINTEXT = b"250-relay.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n250 STARTTLS\r\n"
EHLO_TLS = b"250-relay.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n250 AUTH PLAIN LOGIN\r\n"
EHLO_MX = EHLO_PLAINTEXT
TIMEOUT = b"421 4.4.2 relay.test Error: timeout exceeded\r\n"
TOO_MANY_COMMANDS = b"421 4.7.0 relay.test Error: too many commands\r\n"


def core_of(mode: str = "starttls", starttls_available: bool = True, **config: Any) -> SMTPCore:
    """A core for a client of a submission listener (auth PLAIN and LOGIN, STARTTLS
    required) unless `config` says otherwise."""
    return make_core(SMTPCore, 587, mode, starttls_available, hostname=HOST, **config)


said = sent


def greeted(**options: Any) -> SMTPCore:
    core = core_of(**options)
    assert said(core.greet()) == GREETING
    return core


def secured(core: SMTPCore, cert: ClientCertificate | None = None) -> SMTPCore:
    """STARTTLS, and its handshake done."""
    events = core.receive(b"STARTTLS\r\n")
    assert (said(events), others(events)) == (b"220 2.0.0 Ready to start TLS\r\n", [StartTLS()])
    assert core.machine.state is State.STARTTLS_HANDSHAKE
    assert core.tls_established(TLSInfo(client_cert=cert)) == []
    return core


def routed(core: SMTPCore, data: bytes) -> dict[str, Any]:
    """Feed `data`, which must end in a Route (and nothing said); its facts."""
    events = core.receive(data)
    assert said(events) == b"" and len(events) == 1 and isinstance(events[0], Route), events
    assert core.machine.state is State.ROUTING
    return events[0].facts


def logged_in(core: SMTPCore, client_reply: bytes = b"") -> list[Event]:
    """What the shell does once the upstream accepted the login, up to the relay."""
    core.machine.fire(Input.CONNECT)
    core.machine.fire(Input.LOG_IN)
    events = core.logged_in(client_reply)
    core.machine.fire(Input.RELAY)
    return events


# -- the states, as a client gets there --------------------------------------------------------


def plaintext() -> SMTPCore:
    return greeted()


def plaintext_ehlo() -> SMTPCore:
    core = greeted()
    core.receive(b"EHLO client.example\r\n")
    return core


def tls() -> SMTPCore:
    """After STARTTLS: the EHLO before it is forgotten (one hello counted)."""
    return secured(plaintext_ehlo())


def tls_ehlo() -> SMTPCore:
    """Two hellos counted: a third is junk."""
    core = tls()
    core.receive(b"EHLO client.example\r\n")
    return core


def mx_ehlo() -> SMTPCore:
    core = greeted(auth=("none",), starttls="optional")
    core.receive(b"EHLO mx.sender.example\r\n")
    return core


def mx_mail() -> SMTPCore:
    core = mx_ehlo()
    assert said(core.receive(b"MAIL FROM:<s@sender.example>\r\n")) == b"250 2.1.0 Ok\r\n"
    return core


PRE_LOGIN: dict[str, Callable[[], SMTPCore]] = {
    "plaintext": plaintext,
    "plaintext, EHLO": plaintext_ehlo,
    "TLS": tls,
    "TLS, EHLO": tls_ehlo,
    "MX, EHLO": mx_ehlo,
    "MX, MAIL": mx_mail,
}
"""The pre-login states a client may be in, by what it said."""


@attrs.frozen
class Cell:
    """What a command gets in one state: `reply`, and whether it counts as `junk` or an
    `error`; `then` is what else happens (a Route, STARTTLS, the close)."""

    reply: bytes
    count: str = ""
    then: type[Event] | None = None


def ok(reply: bytes, then: type[Event] | None = None) -> Cell:
    return Cell(reply, then=then)


def junk(reply: bytes) -> Cell:
    return Cell(reply, "junk")


def error(reply: bytes) -> Cell:
    return Cell(reply, "error")


ROUTED = Cell(b"", then=Route)
STARTS_TLS = ok(b"220 2.0.0 Ready to start TLS\r\n", StartTLS)
AUTH_REQUIRED = junk(b"530 5.7.0 Authentication required\r\n")
TLS_FIRST = junk(b"530 5.7.0 Must issue a STARTTLS command first\r\n")
NEED_MAIL = junk(b"503 5.5.1 Error: need MAIL command\r\n")
HELO_REPLY = b"250 relay.test\r\n"
UNKNOWN = error(b"500 5.5.2 Error: command not recognized\r\n")


def same(cell: Cell) -> dict[str, Cell]:
    return dict.fromkeys(PRE_LOGIN, cell)


COMMAND_TABLE: dict[bytes, dict[str, Cell]] = {
    b"EHLO client.example": {
        "plaintext": ok(EHLO_PLAINTEXT),
        "plaintext, EHLO": ok(EHLO_PLAINTEXT),
        "TLS": ok(EHLO_TLS),
        "TLS, EHLO": Cell(EHLO_TLS, "junk"),  # the third hello
        "MX, EHLO": ok(EHLO_MX),
        "MX, MAIL": ok(EHLO_MX),
    },
    b"HELO client.example": {**same(ok(HELO_REPLY)), "TLS, EHLO": junk(HELO_REPLY)},
    b"EHLO": same(error(b"501 5.5.4 Syntax: EHLO hostname\r\n")),
    b"HELO": same(error(b"501 5.5.4 Syntax: HELO hostname\r\n")),
    b"STARTTLS": {
        **same(STARTS_TLS),
        "TLS": junk(b"503 5.5.1 Error: TLS already active\r\n"),
        "TLS, EHLO": junk(b"503 5.5.1 Error: TLS already active\r\n"),
    },
    b"STARTTLS now": same(error(b"501 5.5.4 Syntax: STARTTLS\r\n")),
    b"AUTH PLAIN " + PLAIN_IR: {
        "plaintext": TLS_FIRST,
        "plaintext, EHLO": TLS_FIRST,
        "TLS": junk(b"503 5.5.1 Error: send EHLO first\r\n"),
        "TLS, EHLO": ROUTED,
        "MX, EHLO": junk(b"503 5.5.1 Error: authentication not enabled\r\n"),
        "MX, MAIL": junk(b"503 5.5.1 Error: authentication not enabled\r\n"),
    },
    b"AUTH": {
        "plaintext": TLS_FIRST,
        "plaintext, EHLO": TLS_FIRST,
        "TLS": junk(b"503 5.5.1 Error: send EHLO first\r\n"),
        "TLS, EHLO": error(b"501 5.5.4 Syntax: AUTH mechanism [initial-response]\r\n"),
        "MX, EHLO": junk(b"503 5.5.1 Error: authentication not enabled\r\n"),
        "MX, MAIL": junk(b"503 5.5.1 Error: authentication not enabled\r\n"),
    },
    b"AUTH GSSAPI": {
        "plaintext": TLS_FIRST,
        "plaintext, EHLO": TLS_FIRST,
        "TLS": junk(b"503 5.5.1 Error: send EHLO first\r\n"),
        "TLS, EHLO": error(b"504 5.5.4 Unrecognized authentication type\r\n"),
        "MX, EHLO": junk(b"503 5.5.1 Error: authentication not enabled\r\n"),
        "MX, MAIL": junk(b"503 5.5.1 Error: authentication not enabled\r\n"),
    },
    b"MAIL FROM:<s@sender.example>": {
        **same(AUTH_REQUIRED),
        "MX, EHLO": ok(b"250 2.1.0 Ok\r\n"),
        "MX, MAIL": junk(b"503 5.5.1 Error: nested MAIL command\r\n"),
    },
    b"MAIL FROM:s@sender.example": {
        **same(AUTH_REQUIRED),
        "MX, EHLO": error(MAIL_SYNTAX),
        "MX, MAIL": junk(b"503 5.5.1 Error: nested MAIL command\r\n"),
    },
    b"RCPT TO:<bob@example.test>": {**same(AUTH_REQUIRED), "MX, EHLO": NEED_MAIL, "MX, MAIL": ROUTED},
    b"RCPT TO:<ok@example.test>RCPT TO:<no@example.test>": {
        **same(AUTH_REQUIRED),
        "MX, EHLO": NEED_MAIL,
        "MX, MAIL": error(RCPT_SYNTAX),
    },
    b"DATA": {**same(AUTH_REQUIRED), "MX, EHLO": NEED_MAIL, "MX, MAIL": junk(b"554 5.5.1 Error: no valid recipients\r\n")},
    b"BDAT 5 LAST": {
        **same(AUTH_REQUIRED),
        "MX, EHLO": NEED_MAIL,
        "MX, MAIL": junk(b"554 5.5.1 Error: no valid recipients\r\n"),
    },
    b"RSET": same(junk(b"250 2.0.0 Ok\r\n")),
    b"NOOP": same(junk(b"250 2.0.0 Ok\r\n")),
    b"HELP": same(junk(b"214 2.0.0 Commands: EHLO HELO STARTTLS AUTH MAIL RCPT DATA RSET NOOP QUIT\r\n")),
    b"VRFY bob": same(junk(b"502 5.5.1 Error: command not implemented\r\n")),
    b"EXPN staff": same(junk(b"502 5.5.1 Error: command not implemented\r\n")),
    b"QUIT": same(ok(b"221 2.0.0 Bye\r\n", Close)),
    b"XCLIENT ADDR=10.0.0.1": same(UNKNOWN),
    b"STARTTLS\r": same(error(b"500 5.5.2 Error: bare CR or NUL character in command\r\n")),
    b"NOOP\0QUIT": same(error(b"500 5.5.2 Error: bare CR or NUL character in command\r\n")),
}
"""For each command line (CRLF added), what it gets in each pre-login state."""


@pytest.mark.parametrize("state", PRE_LOGIN)
@pytest.mark.parametrize("command", COMMAND_TABLE)
def test_the_command_table(command: bytes, state: str) -> None:
    core = PRE_LOGIN[state]()
    expected = COMMAND_TABLE[command][state]
    junk_before, errors_before = core.junk_commands, core.errors
    events = core.receive(command + b"\r\n")
    assert said(events) == expected.reply
    assert [type(e) for e in others(events)] == ([expected.then] if expected.then else [])
    assert (core.junk_commands - junk_before, core.errors - errors_before) == (
        int(expected.count == "junk"),
        int(expected.count == "error"),
    )


def test_the_table_covers_every_command() -> None:
    verbs = {line.split(b" ")[0].rstrip(b"\r") for line in COMMAND_TABLE}
    assert set(SMTPCore.COMMANDS) <= verbs
    assert all(set(cells) == set(PRE_LOGIN) for cells in COMMAND_TABLE.values())


def in_handshake() -> SMTPCore:
    core = plaintext_ehlo()
    core.receive(b"STARTTLS\r\n")
    return core


def before_tls() -> SMTPCore:
    """A `tls` listener's connection, inside its handshake (nothing said yet)."""
    core = core_of(mode="tls")
    core.machine.fire(Input.BEGIN_TLS)
    return core


def routing() -> SMTPCore:
    core = tls_ehlo()
    routed(core, b"AUTH PLAIN " + PLAIN_IR + b"\r\n")
    return core


def relaying() -> SMTPCore:
    core = routing()
    logged_in(core)
    return core


def draining() -> SMTPCore:
    core = plaintext_ehlo()
    core.receive(b"QUIT\r\n")
    return core


def closed() -> SMTPCore:
    core = draining()
    core.machine.fire(Input.LOST)
    return core


NOT_READING: dict[str, tuple[Callable[[], SMTPCore], State]] = {
    "before the greeting": (core_of, State.ACCEPTED),
    "TLS handshake": (before_tls, State.TLS_HANDSHAKE),
    "STARTTLS handshake": (in_handshake, State.STARTTLS_HANDSHAKE),
    "routing": (routing, State.ROUTING),
    "relaying": (relaying, State.RELAYING),
    "draining": (draining, State.DRAINING),
    "closed": (closed, State.CLOSED),
}


@pytest.mark.parametrize("state", NOT_READING)
@pytest.mark.parametrize("command", COMMAND_TABLE)
def test_outside_pre_login_no_command_is_read(command: bytes, state: str) -> None:
    make, expected_state = NOT_READING[state]
    core = make()
    assert core.machine.state is expected_state
    assert core.receive(command + b"\r\n") == []
    assert core.machine.state is expected_state
    assert (core.buffered, core.junk_commands, core.errors) == (len(command) + 2, 0, 0)
    if state in ("routing", "relaying"):
        assert core.leftover() == command + b"\r\n"


# -- the greeting and TLS ----------------------------------------------------------------------


def test_commands_sent_before_the_greeting_are_answered_after_it() -> None:
    core = core_of()
    assert core.receive(b"EHLO early.example\r\nNOOP\r\n") == []
    assert said(core.greet()) == GREETING + EHLO_PLAINTEXT + b"250 2.0.0 Ok\r\n"


def test_a_tls_listener_greets_once_the_handshake_is_done_and_offers_auth() -> None:
    core = before_tls()
    assert core.receive(b"EHLO client.example\r\n") == []
    assert said(core.tls_established(TLSInfo())) == GREETING + EHLO_TLS
    assert core.machine.state is State.PRE_LOGIN


def test_starttls_discards_what_was_pipelined_behind_it_and_forgets_the_ehlo() -> None:
    core = plaintext_ehlo()
    events = core.receive(b"STARTTLS\r\nAUTH PLAIN " + PLAIN_IR + b"\r\n")
    assert others(events) == [Discarded(len(b"AUTH PLAIN " + PLAIN_IR + b"\r\n")), StartTLS()]
    assert core.leftover() == b""
    core.tls_established(TLSInfo())
    assert core.helo is None and not core.esmtp
    assert said(core.receive(b"AUTH PLAIN " + PLAIN_IR + b"\r\n")) == b"503 5.5.1 Error: send EHLO first\r\n"


def test_commands_sent_inside_the_handshake_are_read_after_it() -> None:
    core = in_handshake()
    assert core.receive(b"EHLO client.example\r\n") == []
    assert said(core.tls_established(TLSInfo())) == EHLO_TLS


def test_starttls_resets_the_transaction() -> None:
    core = mx_mail()
    secured(core)
    assert core.mail is None
    assert said(core.receive(b"EHLO mx.sender.example\r\nRCPT TO:<bob@example.test>\r\n")).endswith(
        b"503 5.5.1 Error: need MAIL command\r\n"
    )


def test_starttls_is_refused_where_no_certificate_is_configured() -> None:
    core = greeted(starttls_available=False, starttls="optional")
    ehlo = said(core.receive(b"EHLO client.example\r\n"))
    assert b"STARTTLS" not in ehlo and b"250 AUTH PLAIN LOGIN\r\n" in ehlo
    assert said(core.receive(b"STARTTLS\r\n")) == b"502 5.5.1 Error: STARTTLS not available\r\n"
    assert core.junk_commands == 1


def test_size_and_capabilities_are_as_configured() -> None:
    core = greeted(size=1000, capabilities=("PIPELINING",), auth=("none",), starttls="optional")
    assert said(core.receive(b"EHLO c\r\n")) == b"250-relay.test\r\n250-SIZE 1000\r\n250-PIPELINING\r\n250 STARTTLS\r\n"
    assert said(core.receive(b"MAIL FROM:<s@x> SIZE=1001\r\n")) == b"552 5.3.4 Message size exceeds fixed limit\r\n"
    assert core.mail is None
    assert said(core.receive(b"MAIL FROM:<s@x> SIZE=1000\r\n")) == b"250 2.1.0 Ok\r\n"
    unlimited = greeted(size=0)
    assert b"250-SIZE\r\n" in said(unlimited.receive(b"EHLO c\r\n"))


# -- framing -----------------------------------------------------------------------------------


def test_a_command_split_anywhere_is_answered_once_its_line_is_complete() -> None:
    core = greeted()
    line = b"EHLO client.example\r\n"
    for byte in line[:-1]:
        assert core.receive(bytes([byte])) == []
    assert said(core.receive(line[-1:])) == EHLO_PLAINTEXT


def test_a_bare_lf_ends_a_line_too() -> None:
    core = greeted()
    assert said(core.receive(b"HELO client.example\nNOOP\n")) == HELO_REPLY + b"250 2.0.0 Ok\r\n"


def test_pipelined_commands_are_answered_in_order_up_to_the_one_that_routes() -> None:
    core = greeted(auth=("none",), starttls="optional")
    rest = b"DATA\r\nSubject: hi\r\n\r\nhello\r\n.\r\nQU"
    events = core.receive(b"EHLO mx.sender.example\r\nMAIL FROM:<s@sender.example>\r\nRCPT TO:<bob@example.test>\r\n" + rest)
    assert said(events) == EHLO_MX + b"250 2.1.0 Ok\r\n"
    [route] = others(events)
    assert isinstance(route, Route)
    facts = route.facts
    assert facts == {
        "auth_method": "none",
        "helo": "mx.sender.example",
        "mail_from": "MAIL FROM:<s@sender.example>",
        "rcpt_to": "RCPT TO:<bob@example.test>",
    }
    assert (core.mail, core.rcpt, core.helo, core.esmtp) == (
        b"MAIL FROM:<s@sender.example>",
        b"RCPT TO:<bob@example.test>",
        b"mx.sender.example",
        True,
    )
    assert core.receive(b"IT\r\n") == []
    assert core.leftover() == rest + b"IT\r\n"


def test_an_over_long_line_is_skipped_to_its_end_and_answered_as_an_error() -> None:
    core = greeted()
    long = b"NOOP " + b"x" * core.max_line_length
    assert core.receive(long[:20000]) == []
    assert core.receive(long[20000:]) == []
    assert said(core.receive(b"QUIT\r\nNOOP\r\n")) == b"500 5.5.6 Error: line too long\r\n" + b"250 2.0.0 Ok\r\n"
    assert (core.errors, core.junk_commands) == (1, 1)


def test_a_line_within_the_limit_is_read() -> None:
    core = greeted()
    line = b"HELO " + b"h" * (core.max_line_length - 7) + b"\r\n"
    assert len(line) == core.max_line_length
    assert said(core.receive(line)).startswith(b"250 ")


def test_a_bare_cr_never_makes_two_commands() -> None:
    core = greeted()
    assert said(core.receive(b"NOOP\rQUIT\r\n")) == b"500 5.5.2 Error: bare CR or NUL character in command\r\n"
    assert core.machine.state is State.PRE_LOGIN and core.errors == 1


# -- limits ------------------------------------------------------------------------------------


def test_past_max_errors_the_client_is_told_and_closed() -> None:
    core = greeted(max_errors=3)
    events = core.receive(b"FOO\r\nBAR\r\nBAZ\r\nNOOP\r\n")
    assert said(events) == b"500 5.5.2 Error: command not recognized\r\n" * 3 + b"421 4.7.0 relay.test Error: too many errors\r\n"
    assert others(events) == [Close("protocol-error", "3 malformed or unknown commands")]
    assert core.machine.state is State.DRAINING
    assert core.buffered == len(b"NOOP\r\n")  # never read


def test_past_max_junk_commands_the_command_is_not_answered() -> None:
    core = greeted(max_junk_commands=3)
    events = core.receive(b"NOOP\r\nRSET\r\nVRFY x\r\nHELP\r\n")
    assert said(events) == b"250 2.0.0 Ok\r\n250 2.0.0 Ok\r\n502 5.5.1 Error: command not implemented\r\n" + TOO_MANY_COMMANDS
    assert others(events) == [Close("protocol-error", "more than 3 commands that achieve nothing before login")]


def test_the_first_two_hellos_are_free_the_third_is_junk() -> None:
    core = greeted(max_junk_commands=1)
    assert said(core.receive(b"EHLO a\r\nHELO b\r\n")) == EHLO_PLAINTEXT + b"250 relay.test\r\n"
    assert core.junk_commands == 0
    assert said(core.receive(b"HELO c\r\n")) == b"250 relay.test\r\n"
    assert said(core.receive(b"HELO d\r\n")) == TOO_MANY_COMMANDS
    assert core.helo == b"c"  # the refused one changed nothing


def test_rset_ends_the_transaction() -> None:
    core = mx_mail()
    assert (
        said(core.receive(b"RSET\r\nRCPT TO:<bob@example.test>\r\n")) == b"250 2.0.0 Ok\r\n503 5.5.1 Error: need MAIL command\r\n"
    )


def test_a_client_that_ends_its_stream_is_answered_then_closed() -> None:
    core = greeted()
    assert core.receive(b"EHLO client.example\r\nNOOP") == [Send(EHLO_PLAINTEXT)]
    assert core.client_ended() == [Close("client-gone", "client ended its stream before it was routed")]


def test_quit_after_a_failed_login_is_logged_as_that_failure() -> None:
    core = tls_ehlo()
    routed(core, b"AUTH PLAIN " + PLAIN_IR + b"\r\nQUIT\r\n")
    events = core.refused(Reject("Invalid login"))
    assert said(events) == b"535 5.7.8 Invalid login\r\n221 2.0.0 Bye\r\n"
    assert others(events)[-1] == Close("rejected", "Invalid login")


# -- SASL --------------------------------------------------------------------------------------


def test_auth_plain_with_an_initial_response_routes_with_the_credentials() -> None:
    core = tls_ehlo()
    facts = routed(core, b"AUTH PLAIN " + PLAIN_IR + b"\r\n")
    assert facts == {
        "user": "alice@example.test",
        "password": "s3cret",
        "auth_method": "plain",
        "salt": None,
        "attempt": 1,
        "helo": "client.example",
    }
    assert core.authenticating


def test_auth_plain_without_an_initial_response_is_asked_for_it() -> None:
    core = tls_ehlo()
    assert said(core.receive(b"AUTH PLAIN\r\n")) == b"334 \r\n"
    assert routed(core, PLAIN_IR + b"\r\n")["user"] == "alice@example.test"


def test_auth_login_asks_for_the_user_then_the_password() -> None:
    core = tls_ehlo()
    assert said(core.receive(b"auth login\r\n")) == b"334 VXNlcm5hbWU6\r\n"
    assert said(core.receive(base64.b64encode(b"alice") + b"\r\n")) == b"334 UGFzc3dvcmQ6\r\n"
    facts = routed(core, base64.b64encode(b"pw") + b"\r\n")
    assert (facts["user"], facts["password"], facts["auth_method"]) == ("alice", "pw", "login")


def test_cram_md5_routes_with_the_digest_and_its_challenge() -> None:
    core = core_of(auth=("cram-md5",))
    core.greet()
    secured(core)
    core.receive(b"EHLO c\r\n")
    challenge = base64.b64decode(said(core.receive(b"AUTH CRAM-MD5\r\n"))[4:-2])
    assert challenge.startswith(b"<") and challenge.endswith(b"@relay.test>")
    digest = hmac.new(b"pw", challenge, hashlib.md5).hexdigest().encode()
    facts = routed(core, base64.b64encode(b"alice " + digest) + b"\r\n")
    assert (facts["auth_method"], facts["password"], facts["salt"]) == ("cram-md5", digest.decode(), challenge.decode())


def test_external_is_offered_only_with_a_client_certificate() -> None:
    cert = ClientCertificate(subject="CN=alice", issuer="CN=CA", serial="01", fingerprint="ab")
    core = core_of(auth=("external",))
    core.greet()
    secured(core, cert)
    assert b"250 AUTH EXTERNAL\r\n" in said(core.receive(b"EHLO c\r\n"))
    assert routed(core, b"AUTH EXTERNAL =\r\n")["user"] == "CN=alice"
    without = core_of(auth=("external",))
    without.greet()
    secured(without)
    assert said(without.receive(b"EHLO c\r\nAUTH EXTERNAL =\r\n")).endswith(b"503 5.5.1 Error: authentication not enabled\r\n")


def test_a_cancelled_exchange_is_junk_and_the_client_may_go_on() -> None:
    core = tls_ehlo()
    assert (
        said(core.receive(b"AUTH LOGIN\r\n*\r\nNOOP\r\n"))
        == b"334 VXNlcm5hbWU6\r\n501 5.7.0 Authentication cancelled\r\n250 2.0.0 Ok\r\n"
    )
    assert (core.authenticating, core.junk_commands, core.errors) == (False, 2, 0)


def test_a_malformed_response_is_an_error() -> None:
    core = tls_ehlo()
    assert said(core.receive(b"AUTH PLAIN\r\nnot base64!\r\n")) == b"334 \r\n501 5.5.2 invalid base64 in the response\r\n"
    assert (core.authenticating, core.errors) == (False, 1)


def test_an_over_long_response_fails_the_exchange() -> None:
    core = tls_ehlo()
    core.receive(b"AUTH PLAIN\r\n")
    assert said(core.receive(b"A" * core.max_line_length + b"\r\n")) == b"501 5.5.2 response too long\r\n"
    assert core.errors == 1


def test_a_login_the_exchange_itself_refuses_is_a_failed_attempt() -> None:
    core = tls_ehlo()
    other = base64.b64encode(b"bob\0alice\0pw")
    events = core.receive(b"AUTH PLAIN " + other + b"\r\n")
    assert said(events) == b"535 5.7.8 an authorization identity other than the user is not supported\r\n"
    assert others(events) == [LoginRefused("an authorization identity other than the user is not supported", 1, 3)]
    assert core.machine.state is State.PRE_LOGIN


# -- routing: refused, unavailable, logged in --------------------------------------------------


def test_a_refused_login_lets_the_client_try_again_with_what_it_pipelined() -> None:
    core = tls_ehlo()
    routed(core, b"AUTH PLAIN " + PLAIN_IR + b"\r\nNOOP\r\nAUTH PLAIN " + PLAIN_IR + b"\r\nNOOP\r\n")
    events = core.refused(Reject("Invalid login"))
    assert said(events) == b"535 5.7.8 Invalid login\r\n250 2.0.0 Ok\r\n"
    assert [type(e) for e in others(events)] == [LoginRefused, Route]
    assert others(events)[1].facts["attempt"] == 2  # type: ignore[union-attr]
    assert core.leftover() == b"NOOP\r\n"


def test_the_reject_says_the_code_when_smtp_allows_it() -> None:
    cases: list[tuple[str | int, bytes]] = [
        ("454 4.7.0", b"454 4.7.0 Try later\r\n"),
        (534, b"534 Try later\r\n"),
        ("250 2.0.0", b"535 5.7.8 Try later\r\n"),
        ("bogus", b"535 5.7.8 Try later\r\n"),
    ]
    for code, expected in cases:
        core = routing()
        assert said(core.refused(Reject("Try later", code=code))) == expected, code


def test_the_last_attempt_closes_the_connection() -> None:
    core = routing()
    for _ in range(2):
        core.refused(Reject("Invalid login"))
        routed(core, b"AUTH PLAIN " + PLAIN_IR + b"\r\n")
    events = core.refused(Reject("Invalid login\r\nbad"))
    assert (
        said(events)
        == b"535 5.7.8 Invalid login  bad\r\n421 4.7.0 relay.test Error: too many failed logins, closing connection\r\n"
    )
    assert others(events) == [LoginRefused("Invalid login\r\nbad", 3, 3), Close("rejected", "Invalid login\r\nbad")]


def test_a_reject_that_closes_closes_and_one_that_does_not_count_is_no_attempt() -> None:
    core = routing()
    events = core.refused(Reject("go away", close=True, counts=False))
    assert others(events) == [Close("rejected", "go away")]
    core = routing()
    assert others(core.refused(Reject("later", counts=False))) == []
    assert core.failed_logins == 0


def test_unavailable_is_temporary_and_throttled_closes() -> None:
    for outcome, reply in [
        ("upstream-unavailable", b"451 4.4.1 Mail server temporarily unavailable, try again later\r\n"),
        ("router-error", b"451 4.3.0 Temporary failure, try again later\r\n"),
    ]:
        core = routing()
        events = core.unavailable(outcome, "why")
        assert (said(events), others(events), core.machine.state) == (reply, [], State.PRE_LOGIN)
        assert not core.authenticating
    core = routing()
    events = core.unavailable("throttled", "too many")
    assert said(events) == b"421 4.7.0 Too many failed logins, try again later\r\n"
    assert others(events) == [Close("throttled", "too many")]


def test_a_client_that_authenticated_hears_235_once_logged_in() -> None:
    core = tls_ehlo()
    routed(core, b"AUTH PLAIN " + PLAIN_IR + b"\r\nMAIL FROM:<a@example.test>\r\nRCPT TO:<b@exa")
    assert said(logged_in(core)) == b"235 2.7.0 Authentication successful\r\n"
    assert core.leftover() == b"MAIL FROM:<a@example.test>\r\nRCPT TO:<b@exa"


def test_an_mx_client_hears_nothing_of_mailrelay_once_routed() -> None:
    core = mx_mail()
    routed(core, b"RCPT TO:<bob@example.test>\r\n")
    assert logged_in(core) == []  # the upstream's own answer to its RCPT is relayed


# -- recipients the Router refuses (auth "none") ----------------------------------------------


def test_a_refused_recipient_is_not_a_failed_login_and_the_transaction_goes_on() -> None:
    core = mx_mail()
    routed(core, b"RCPT TO:<gone@example.test>\r\nRCPT TO:<bob@example.test>\r\n")
    events = core.refused(Reject("no such user", code="550 5.1.1"))
    assert said(events) == b"550 5.1.1 no such user\r\n"
    [route] = others(events)
    assert isinstance(route, Route) and route.facts["rcpt_to"] == "RCPT TO:<bob@example.test>"
    assert (core.failed_logins, core.junk_commands, core.mail) == (0, 1, b"MAIL FROM:<s@sender.example>")


def test_a_refused_recipient_without_a_code_smtp_allows_gets_550() -> None:
    core = mx_mail()
    routed(core, b"RCPT TO:<gone@example.test>\r\n")
    assert said(core.refused(Reject("spam", code="235"))) == b"550 5.7.1 spam\r\n"
    assert core.rcpt is None and core.last_failure == ("rejected", "spam")


def test_a_recipient_reject_that_closes_closes() -> None:
    core = mx_mail()
    routed(core, b"RCPT TO:<gone@example.test>\r\n")
    assert core.refused(Reject("blocked", code=554, close=True)) == [Send(b"554 blocked\r\n"), Close("rejected", "blocked")]


def test_refused_recipients_count_as_junk_before_login() -> None:
    core = greeted(auth=("none",), starttls="optional", max_junk_commands=2)
    core.receive(b"EHLO x\r\nMAIL FROM:<s@x>\r\n")
    for _ in range(2):
        routed(core, b"RCPT TO:<no@x>\r\n")
        assert said(core.refused(Reject("no"))) == b"550 5.7.1 no\r\n"
    routed(core, b"RCPT TO:<no@x>\r\n")
    events = core.refused(Reject("no"))
    assert said(events) == b"550 5.7.1 no\r\n" + TOO_MANY_COMMANDS
    assert others(events) == [Close("protocol-error", "more than 2 commands that achieve nothing before login")]


def test_while_relaying_the_count_of_refused_recipients_goes_on() -> None:
    core = greeted(auth=("none",), starttls="optional", max_junk_commands=2)
    core.receive(b"EHLO x\r\nNOOP\r\nMAIL FROM:<s@x>\r\n")
    routed(core, b"RCPT TO:<yes@x>\r\n")
    logged_in(core)
    first = core.refuse_recipient(Reject("no", code="550 5.1.1"))
    assert (first.reply, first.end) == (b"550 5.1.1 no\r\n", None)
    last = core.refuse_recipient(Reject("no"))
    assert last.reply == b"550 5.7.1 no\r\n421 4.7.0 relay.test Error: too many recipients refused\r\n"
    assert last.end == ("protocol-error", "more than 2 recipients refused")
    closing = core.refuse_recipient(Reject("bye", close=True))
    assert (closing.reply, closing.end) == (b"550 5.7.1 bye\r\n", ("rejected", "bye"))
    assert core.machine.state is State.RELAYING  # the relay ends the session, not the core


# -- the machine refuses what cannot happen ---------------------------------------------------


def test_news_of_a_login_nobody_asked_for_is_refused() -> None:
    core = plaintext_ehlo()
    with pytest.raises(IllegalTransition):
        core.refused(Reject("no"))
    with pytest.raises(IllegalTransition):
        core.unavailable("router-error", "no")
    with pytest.raises(IllegalTransition):
        core.tls_established(TLSInfo())


# -- timeouts ----------------------------------------------------------------------------------


def test_silence_before_login() -> None:
    core = plaintext_ehlo()
    assert core.timed_out() == [Send(TIMEOUT), Close("idle-timeout", "no command within 60s before login")]


def test_the_login_deadline_before_login() -> None:
    core = greeted(login_deadline=90)
    assert core.deadline_passed() == [Send(TIMEOUT), Close("login-timeout", "not logged in within 90s")]


def test_a_login_in_flight_at_the_deadline_finishes_and_if_it_fails_the_session_closes() -> None:
    core = routing()
    assert core.deadline_passed() == []
    events = core.refused(Reject("Invalid login"))
    assert said(events) == b"535 5.7.8 Invalid login\r\n" + TIMEOUT
    assert others(events)[-1] == Close("login-timeout", "not logged in within 180s")


def test_a_recipient_refused_after_the_deadline_closes_the_session() -> None:
    core = mx_mail()
    routed(core, b"RCPT TO:<gone@example.test>\r\nRCPT TO:<bob@example.test>\r\n")
    core.deadline_passed()
    events = core.refused(Reject("no such user", code="550 5.1.1"))
    assert said(events) == b"550 5.1.1 no such user\r\n" + TIMEOUT
    assert others(events) == [Close("login-timeout", "not logged in within 180s")]


# -- the shell's timers, on a Clock ------------------------------------------------------------


class TLSStringTransport(StringTransport):
    """Records a STARTTLS instead of doing it."""

    tls_context: object = None

    def startTLS(self, context: object) -> None:
        self.tls_context = context


@implementer(IRouter)
class NeverAnswers:
    """A Router whose answer never comes."""

    verifies_passwords = True

    def __init__(self) -> None:
        self.asked: list[Any] = []

    def route(self, request: Any) -> Deferred[Any]:
        self.asked.append(request)
        return Deferred()


@attrs.define
class Shell:
    """An SMTP front-end on an in-memory transport, with the listener's clock."""

    clock: Clock
    protocol: SMTPFrontEnd
    transport: TLSStringTransport
    router: NeverAnswers

    def said(self) -> bytes:
        data = self.transport.value()
        self.transport.clear()
        return data

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)


def shell(handshake_timeout: float = 30.0, router_timeout: float = 30.0, **front_end: Any) -> Shell:
    clock = Clock()
    listener = ListenerConfig(
        name="smtp",
        listen="tcp:0",
        mode="starttls",
        protocol="smtp",
        router=None,
        handshake_timeout=handshake_timeout,
        router_timeout=router_timeout,
        front_end=FrontEndConfig(hostname=HOST, **front_end),
    )
    router = NeverAnswers()
    factory = ListenerFactory(listener, router, cast(Any, None), Sessions(clock), clock, tls=cast(Any, "server TLS"))
    protocol = factory.buildProtocol(IPv4Address("TCP", "192.0.2.10", 50000))
    assert isinstance(protocol, SMTPFrontEnd)
    transport = TLSStringTransport(
        hostAddress=IPv4Address("TCP", "192.0.2.1", 587), peerAddress=IPv4Address("TCP", "192.0.2.10", 50000)
    )
    protocol.makeConnection(transport)
    return Shell(clock, protocol, transport, router)


def outcome(logs: Sequence[Mapping[str, Any]]) -> tuple[str, str | None]:
    [line] = [e for e in logs if "outcome" in e]
    return line["outcome"], line["reason"]


def test_shell_silence_timer_restarts_with_each_command() -> None:
    with capturedLogs() as logs:
        s = shell(login_timeout=10)
        assert s.said() == GREETING
        s.clock.advance(9)
        s.send(b"EHLO c\r\n")
        s.clock.advance(9)
        assert s.said() == EHLO_PLAINTEXT and not s.transport.disconnecting
        s.clock.advance(1)
        assert s.said() == TIMEOUT and s.transport.disconnecting
    assert outcome(logs) == ("idle-timeout", "no command within 10s before login")


def test_shell_login_deadline_ends_a_busy_client() -> None:
    with capturedLogs() as logs:
        s = shell(login_timeout=10, login_deadline=25)
        s.said()
        for _ in range(4):
            s.clock.advance(6)
            s.send(b"NOOP\r\n")
        assert s.said() == b"250 2.0.0 Ok\r\n" * 4
        s.clock.advance(1)
        assert s.said() == TIMEOUT and s.transport.disconnecting
    assert outcome(logs) == ("login-timeout", "not logged in within 25s")


def test_shell_handshake_timer_aborts_a_stalled_starttls() -> None:
    with capturedLogs() as logs:
        s = shell(handshake_timeout=5, login_timeout=1)
        s.said()
        s.send(b"STARTTLS\r\n")
        assert s.said() == b"220 2.0.0 Ready to start TLS\r\n" and s.transport.tls_context == "server TLS"
        s.clock.advance(4.9)  # the silence timer is not running inside the handshake
        assert not s.transport.disconnecting
        s.clock.advance(0.1)
        assert s.transport.disconnected  # aborted: no reply can reach a client mid-handshake
        assert s.said() == b""
    assert outcome(logs) == ("tls-failed", "no TLS handshake within 5s")


def test_shell_deadline_inside_a_handshake_aborts() -> None:
    with capturedLogs() as logs:
        s = shell(handshake_timeout=60, login_deadline=3)
        s.said()
        s.send(b"STARTTLS\r\n")
        s.clock.advance(3)
        assert s.transport.disconnected and s.said() == b"220 2.0.0 Ready to start TLS\r\n"
    assert outcome(logs) == ("login-timeout", "not logged in within 3s (in a TLS handshake)")


def test_shell_router_timeout_is_a_temporary_failure_and_the_client_goes_on() -> None:
    with capturedLogs() as logs:
        s = shell(router_timeout=7, auth=("none",), starttls="optional", login_timeout=100)
        s.said()
        s.send(b"EHLO c\r\nMAIL FROM:<s@x>\r\nRCPT TO:<bob@example.test>\r\nNOOP\r\n")
        assert s.said() == EHLO_MX + b"250 2.1.0 Ok\r\n"
        assert len(s.router.asked) == 1 and s.protocol.machine.state is State.ROUTING
        s.clock.advance(7)
        assert s.said() == b"451 4.3.0 Temporary failure, try again later\r\n250 2.0.0 Ok\r\n"
        assert s.protocol.machine.state is State.PRE_LOGIN
        s.send(b"QUIT\r\n")
        assert s.said() == b"221 2.0.0 Bye\r\n"
    assert outcome(logs) == ("router-error", "router did not answer within 7s")
