"""
What every line-based front-end core (SMTP, IMAP, POP3) shares, without I/O: reading
command lines, the STARTTLS hand-over, SASL exchanges, counting failed logins, malformed
commands and commands that achieve nothing, and handing the session on to be routed.

A core is fed bytes (`receive()`) and the shell's news (`tls_established()`,
`refused()`, `unavailable()`, `logged_in()`, `timed_out()`, `client_ended()`); each call
returns the `events` the shell performs. Its session's state is the `SessionMachine` it
shares with the shell: commands are read only in `pre-login`.

Invariants:
- Lines are taken out of the buffer one at a time. Whatever follows the line being
  handled stays there, so commands a client pipelined behind the one that hands the
  session on (`Route`) reach the upstream unchanged, after the login (`leftover()`).
- After STARTTLS no byte that arrived before the TLS handshake is ever read as a
  command: the rest of the plaintext buffer is discarded (the CVE-2011-0411 class of
  command injection), and every later byte belongs to the TLS layer.
- STARTTLS happens at most once, and never on a connection that is already TLS.
- A login the Router (or the upstream) refuses leaves the client where it was: it may
  try again, up to the listener's `max_attempts`, and commands it pipelined behind the
  refused one are read next. A temporary failure (Router down, no upstream reachable)
  does not count as an attempt.
- A line longer than `max_line_length` is skipped up to its end and answered as an
  error; past `max_errors` errors the connection is closed.
- Before login a client spends at most `max_junk_commands` commands that achieve
  nothing (a NOOP, a third EHLO, a command refused in this state: `junk()`), and at most
  `login_deadline` seconds (the shell's timer calls `deadline_passed()`). A login or
  route attempt in flight when the deadline passes is not cut: if it fails, the session
  closes instead of reading again.
- A client that ends its stream (a half-close) before it is routed is answered for
  every whole line it sent, then closed at once as `client-gone` (or as its last
  failed login).
- A core may take a counted run of bytes instead of a line (`read_bytes()`, an IMAP
  literal); line reading goes on after it.

What a protocol says when a limit is reached or a login cannot go on is one table per
protocol (`Replies`), not a method per case.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import attrs

from .. import sasl
from ..router import Reject
from .events import Close, Discarded, Event, LoginRefused, Route, Send, StartTLS
from .facts import ConnectionFacts, TLSInfo
from .machine import Input, SessionMachine, State
from .settings import FrontEndConfig


def printable(text: str, limit: int = 200) -> str:
    """A message fit for a reply line: one line of printable ASCII, bounded (a Reject's
    message or a parse error may carry anything)."""
    return "".join(c if c.isprintable() and c.isascii() else " " for c in text)[:limit].strip() or "-"


@attrs.frozen(kw_only=True)
class Replies:
    """
    What one protocol says, by situation. Each is a template for `str.format` with
    `hostname` and (IMAP) `tag` — the tag of the command being answered or routed —
    and is sent followed by CRLF; None says nothing.
    """

    timeout: str
    """Silence before login past `login_timeout`, or past `login_deadline`."""
    too_many_junk: str
    """Past `max_junk_commands`."""
    too_many_errors: str
    """Past `max_errors` malformed or unknown commands."""
    too_many_attempts: str | None
    """After the last failed login `max_attempts` allows (before the close)."""
    throttled: str
    """The login limits refuse the login now (the connection closes)."""
    upstream_unavailable: str
    """No upstream could be reached or logged into: try again later."""
    temporary: str
    """The Router could not decide (it failed, or took too long): try again later."""
    line_too_long: str
    """A command line over `max_line_length` (counts as an error)."""
    bare_cr_or_nul: str
    """A command line holding a CR or a NUL (counts as an error)."""
    unknown_command: str
    """A command that does not exist, or not before login (counts as an error)."""
    busy: str
    """Said, in plaintext, to a client the listener's connection limits turn away."""

    def get(self, name: str, **fields: Any) -> bytes:
        template: str | None = getattr(self, name)
        if template is None:
            return b""
        return template.format(**fields).encode("utf-8") + b"\r\n"


class FrontEndCore:
    """A client connection that speaks a line protocol until it is routed."""

    protocol: ClassVar[str]
    """"smtp", "imap" or "pop3"."""
    replies: ClassVar[Replies]
    max_line_length = 32 * 1024
    """Longest command line accepted, terminator included: a SASL response of
    `sasl.MAX_RESPONSE` bytes (an OAuth token) fits in base64."""
    COMMANDS: dict[bytes, Callable[..., None]] = {}
    """A verb and its arguments (SMTP, POP3): the verb, in upper case -> its handler,
    called with the core and the arguments. IMAP reads its tagged commands its own way."""
    REFUSALS: ClassVar[Mapping[bytes, Sequence[tuple[Callable[[Any], bool], str]]]] = {}
    """Why a command cannot be taken in the session's state now, by verb: (condition,
    reply) pairs, checked in order before the command runs. The first condition that
    holds answers the command with its reply (and counts it as junk: a command refused
    in this state achieves nothing); the command itself only runs when none holds."""
    strip_arguments: ClassVar[bool] = False
    """Whether the spaces around a command's arguments go (SMTP) or stay (POP3: a
    password given to PASS may begin or end with one)."""

    def __init__(self, config: FrontEndConfig, connection: ConnectionFacts, machine: SessionMachine | None = None) -> None:
        self.config = config
        self.connection = connection
        self.machine = machine if machine is not None else SessionMachine()
        self.tls: TLSInfo | None = None
        """What the client's TLS handshake established; None while the connection is plaintext."""
        self._buffer = bytearray()
        self._out: list[Event] = []
        self._starttls_done = False
        self._discarding = False
        """Inside an over-long line: skipping to its end."""
        self._bytes_wanted: int | None = None
        """Set by `read_bytes()`: the next bytes are taken as they are, not as a line."""
        self._sasl: sasl.Exchange | None = None
        self._ended = False
        """The client ended its stream (nothing more will arrive)."""
        self._deadline_passed = False
        self.failed_logins = 0
        self.errors = 0
        self.junk_commands = 0
        self.commands_read = 0
        """Lines and literals taken so far: the shell's silence timer restarts on each."""
        self.last_failure: tuple[str, str] | None = None
        """(outcome, reason) of the last login that did not succeed: what the session line
        says if the client gives up after it."""

    # The shell's calls

    def greet(self) -> list[Event]:
        """Say the protocol's greeting (after the handshake, on a `tls` listener)."""
        self.machine.fire(Input.GREET)
        self.send(self.greeting())
        return self._read()

    def receive(self, data: bytes) -> list[Event]:
        """Bytes from the client."""
        self._buffer += data
        return self._read()

    def client_ended(self) -> list[Event]:
        """The client half-closed: answer what it sent, then close."""
        self._ended = True
        return self._read()

    def tls_established(self, tls: TLSInfo) -> list[Event]:
        """The client's TLS handshake succeeded: at accept (greet now) or after STARTTLS
        (forget what was said in plaintext: RFC 3207 4.2, the client starts over)."""
        self.tls = tls
        if self.machine.state is State.TLS_HANDSHAKE:
            return self.greet()
        self.machine.fire(Input.TLS_ESTABLISHED)
        self.tls_started()
        return self._resume()

    def refused(self, reject: Reject) -> list[Event]:
        """The Router or the upstream refused the login (after `reject.wait`): say so,
        then let the client try again, unless that was its last attempt."""
        self.machine.fire(Input.REFUSED)
        if self.refuse(reject):
            return self._resume()
        return self._flush()

    def unavailable(self, outcome: str, reason: str) -> list[Event]:
        """A login or route could not be decided or reached now: say so; the client may
        try again, except when throttled."""
        self.machine.fire(Input.UNAVAILABLE)
        self.last_failure = (outcome, reason)
        self.temporarily_failed(outcome)
        if outcome == "throttled":
            self.close(outcome, reason)
            return self._flush()
        return self._resume()

    def logged_in(self, client_reply: bytes) -> list[Event]:
        """The upstream accepted the login; `client_reply` is its answer, for the client
        (empty where the protocol's own reply is due: SMTP's 235)."""
        self.send(client_reply)
        return self._flush()

    def timed_out(self) -> list[Event]:
        """`login_timeout` seconds of silence before login."""
        self.say("timeout")
        self.close("idle-timeout", f"no command within {self.config.login_timeout:g}s before login")
        return self._flush()

    def deadline_passed(self) -> list[Event]:
        """`login_deadline` seconds passed since accept, and no login succeeded. A
        login in flight may finish; if it fails, the session closes."""
        self._deadline_passed = True
        if self.machine.state is State.PRE_LOGIN:
            self._login_timed_out()
        return self._flush()

    def leftover(self) -> bytes:
        """What the client sent past the command that handed the session on: it goes
        to the upstream, after the login."""
        data, self._buffer = bytes(self._buffer), bytearray()
        return data

    @property
    def buffered(self) -> int:
        """Bytes received and not read yet (the shell stops reading past a limit)."""
        return len(self._buffer)

    # For the protocols

    def greeting(self) -> bytes:
        """The protocol's greeting, line ending included."""
        raise NotImplementedError

    def line_received(self, line: bytes) -> None:
        """One command line, without its line ending (CRLF, or a bare LF): a verb and
        its arguments, the verb looked up in `COMMANDS`."""
        verb, _, args = line.partition(b" ")
        command = self.COMMANDS.get(verb.upper())
        if b"\0" in line or b"\r" in line:
            # Some servers end a line at a bare CR: such a line means different things to different readers.
            self.error(self.text("bare_cr_or_nul"))
        elif command is None:
            self.error(self.text("unknown_command"))
        elif (refusal := self.refusal(verb.upper())) is not None:
            if self.junk():
                self.send(refusal.encode("utf-8") + b"\r\n")
        else:
            command(self, args.strip(b" ") if self.strip_arguments else args)

    def refusal(self, verb: bytes) -> str | None:
        """Why `verb` cannot be taken now (`REFUSALS`), or None."""
        return next((reply for holds, reply in self.REFUSALS.get(verb, ()) if holds(self)), None)

    def bytes_received(self, data: bytes) -> None:
        """The bytes `read_bytes()` asked for."""

    def tls_started(self) -> None:
        """STARTTLS succeeded: forget what the client said in plaintext."""

    def refuse(self, reject: Reject) -> bool:
        """Answer a refused login (by the Router, the upstream, or the SASL exchange
        itself) and count it; whether the client may go on."""
        self.last_failure = ("rejected", reject.message)
        if reject.counts:
            self.failed_logins += 1
            self._out.append(LoginRefused(reject.message, self.failed_logins, self.config.max_attempts))
        self.login_failed(reject)
        if reject.close:
            self.close("rejected", reject.message)
        elif reject.counts and self.failed_logins >= self.config.max_attempts:
            self.say("too_many_attempts")
            self.close("rejected", reject.message)
        else:
            return True
        return False

    def login_failed(self, reject: Reject) -> None:
        """Tell the client its login failed."""
        raise NotImplementedError

    def temporarily_failed(self, outcome: str) -> None:
        """Tell the client this failure is temporary (`outcome` says which)."""
        self.say({"throttled": "throttled", "upstream-unavailable": "upstream_unavailable"}.get(outcome, "temporary"))

    def reply_fields(self) -> dict[str, Any]:
        """The fields `Replies` templates may use."""
        return {"hostname": self.config.hostname}

    def send(self, data: bytes) -> None:
        if data:
            self._out.append(Send(data))

    def text(self, name: str) -> bytes:
        """The protocol's reply for situation `name` (see `Replies`), CRLF included."""
        return self.replies.get(name, **self.reply_fields())

    def say(self, name: str) -> None:
        """Send the protocol's reply for situation `name`."""
        self.send(self.text(name))

    def error(self, reply: bytes) -> None:
        """Answer a malformed or unknown command with `reply`; past `max_errors` of them,
        say goodbye and close."""
        self.errors += 1
        self.send(reply)
        if self.errors >= self.config.max_errors:
            self.say("too_many_errors")
            self.close("protocol-error", f"{self.errors} malformed or unknown commands")

    def junk(self) -> bool:
        """
        Count a command that achieves nothing before login: a NOOP, one more EHLO or
        CAPABILITY than a client needs, a command refused in the session's state. Call
        it before answering; whether to answer. Past `max_junk_commands` the command is
        not answered: the client is told so and closed.

        Malformed commands (`error()`) and failed logins have their own limits and are
        not junk.
        """
        self.junk_commands += 1
        if self.junk_commands <= self.config.max_junk_commands:
            return True
        self.say("too_many_junk")
        self.close("protocol-error", f"more than {self.config.max_junk_commands} commands that achieve nothing before login")
        return False

    def quit(self, goodbye: bytes) -> None:
        """The client asked to leave before it was routed."""
        self.send(goodbye)
        # A clean goodbye (a monitoring probe's EHLO, QUIT) is no warning, unless a login failed.
        outcome, reason = self.last_failure or ("closed", "client quit before it was routed")
        self.close(outcome, reason)

    def close(self, outcome: str, reason: str) -> None:
        """End the session after what was said goes out."""
        if self.machine.can(Input.CLOSE):
            self.machine.fire(Input.CLOSE)
            self._out.append(Close(outcome, reason))

    def read_bytes(self, count: int) -> None:
        """Take the next `count` bytes as they are (an IMAP literal): `bytes_received()`
        gets them, then lines are read again. Call it from `line_received()`."""
        self._bytes_wanted = count

    def route(self, **facts: Any) -> None:
        """Hand the session on: the Router is asked with `facts` (and the connection's
        own); no more lines are read unless the login fails."""
        self.machine.fire(Input.ROUTE)
        self._out.append(Route(facts))

    # Authentication

    def tls_required(self) -> bool:
        """Whether logins (and SMTP's mail commands) must wait for STARTTLS."""
        return self.tls is None and self.connection.mode == "starttls" and self.config.starttls == "required"

    def password_logins(self) -> bool:
        """Whether the protocol's own cleartext login (IMAP LOGIN, POP3 USER and PASS) is
        accepted: it carries the password PLAIN and LOGIN do, and goes with either."""
        return any(m in self.config.auth for m in ("plain", "login"))

    def mechanisms(self) -> tuple[str, ...]:
        """The SASL mechanisms a client may use now (and that are advertised)."""
        methods = tuple(m for m in self.config.auth if m in sasl.MECHANISMS)
        if self.tls is None or self.tls.client_cert is None:
            methods = tuple(m for m in methods if m != "external")
        return methods

    def authenticate(self, mechanism: str, initial_response: bytes | None) -> None:
        """Run a SASL exchange; `mechanism` is one of `mechanisms()`. Challenges go out
        through `sasl_challenge()`, the outcome to `login()` or the failure replies."""
        context = sasl.Context(hostname=self.config.hostname, client_cert=self.tls.client_cert if self.tls else None)
        exchange = self._sasl = sasl.Exchange(mechanism, initial_response, context)
        self._sasl_step(exchange.start)

    def _sasl_step(self, step: Callable[[], bytes | sasl.Credentials]) -> None:
        try:
            result = step()
        except sasl.SASLCancelled:
            self._sasl = None
            self.sasl_cancelled()
        except sasl.SASLSyntaxError as e:
            self._sasl = None
            self.sasl_malformed(str(e))
        except sasl.SASLRefused as e:
            self._sasl = None
            self.refuse(Reject(str(e)))
        else:
            if isinstance(result, bytes):
                self.sasl_challenge(result)
            else:
                self._sasl = None
                self.login(result)

    def sasl_challenge(self, challenge: bytes) -> None:
        """Send a SASL challenge (raw: the protocol encodes it)."""
        raise NotImplementedError

    def sasl_cancelled(self) -> None:
        """The client cancelled the exchange with `*`."""
        raise NotImplementedError

    def sasl_malformed(self, why: str) -> None:
        """The client's SASL response was malformed (counts as an error)."""
        raise NotImplementedError

    def login(self, credentials: sasl.Credentials, **facts: Any) -> None:
        """Route the client as the user it authenticated as."""
        self.route(
            user=credentials.user,
            password=credentials.password,
            auth_method=credentials.method,
            salt=credentials.salt,
            attempt=self.failed_logins + 1,
            **facts,
        )

    # STARTTLS

    def can_start_tls(self) -> bool:
        """Whether STARTTLS may be offered and accepted now."""
        return self.connection.starttls_available and self.tls is None and not self._starttls_done

    def start_tls(self, go_ahead: bytes) -> None:
        """
        Answer a STARTTLS command with `go_ahead` (in plaintext) and upgrade. The caller
        checked `can_start_tls()`. Bytes already received behind the command are
        discarded unread; lines are read again once the handshake is done, and the
        protocol's state is reset then (`tls_started()`).
        """
        assert self.can_start_tls()
        self.machine.fire(Input.STARTTLS)
        self._starttls_done = True
        self._bytes_wanted = None
        if self._buffer:
            self._out.append(Discarded(len(self._buffer)))
            self._buffer.clear()
        self.send(go_ahead)
        self._out.append(StartTLS())

    # Reading

    def _resume(self) -> list[Event]:
        """Read commands again: after a failed login, a handshake."""
        if self._deadline_passed:  # a login that was in flight at the deadline failed
            self._login_timed_out()
            return self._flush()
        return self._read()

    def _login_timed_out(self) -> None:
        self.say("timeout")
        self.close("login-timeout", f"not logged in within {self.config.login_deadline:g}s")

    def _flush(self) -> list[Event]:
        out, self._out = self._out, []
        return out

    def _read(self) -> list[Event]:
        while self.machine.state is State.PRE_LOGIN and self._take_one():
            pass
        if self.machine.state is State.PRE_LOGIN and self._ended:
            # Nothing more will come, and nothing was asked of an upstream yet.
            outcome, reason = self.last_failure or ("client-gone", "client ended its stream before it was routed")
            self.close(outcome, reason)
        return self._flush()

    def _take_one(self) -> bool:
        """Handle the next line (or counted bytes) if it is all there; whether one was."""
        buffer = self._buffer
        if self._bytes_wanted is not None:
            if len(buffer) < self._bytes_wanted:
                return False
            data = bytes(buffer[: self._bytes_wanted])
            del buffer[: self._bytes_wanted]
            self._bytes_wanted = None
            self.commands_read += 1
            self.bytes_received(data)
            return True
        end = buffer.find(b"\n", 0, self.max_line_length)
        if end < 0:
            if len(buffer) < self.max_line_length:
                return False
            # Skip to the end of the line; answer once it is over.
            self._discarding = True
            end = buffer.find(b"\n")
            if end < 0:
                buffer.clear()
                return False
            del buffer[:end]
            return True
        line = bytes(buffer[: end + 1])
        del buffer[: end + 1]
        self.commands_read += 1
        line = line[:-2] if line.endswith(b"\r\n") else line[:-1]
        if self._discarding:
            self._discarding = False
            if self._sasl is not None:  # the answer to a challenge: the exchange fails
                self._sasl = None
                self.sasl_malformed("response too long")
            else:
                self.error(self.text("line_too_long"))
        elif self._sasl is not None:
            exchange = self._sasl
            self._sasl_step(lambda: exchange.respond(line))
        else:
            self.line_received(line)
        return True
