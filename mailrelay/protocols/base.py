"""
What every line-based front-end (SMTP, IMAP, POP3) shares: reading command lines,
the STARTTLS hand-over, SASL exchanges, counting failed logins and malformed commands,
the pre-login timeouts and the count of commands that achieve nothing, and handing the
connection on to be routed.

A front-end's life:

    accepted --[tls mode: handshake]--> greet() --> lines --> begin(): routed, spliced
                                                      |  ^
                                     start_tls(reply) v  | handshake done: tls_started()
                                                   handshaking

Invariants:
- Lines are taken out of `pending` one at a time. Whatever follows the line being
  handled stays there, so commands a client pipelined behind the one that hands the
  session on (`begin()`) reach the upstream unchanged, after the login.
- After `start_tls()` no byte that arrived before the TLS handshake is ever read as a
  command: the rest of the plaintext buffer is discarded (the CVE-2011-0411 class of
  command injection), and every later byte belongs to the TLS layer.
- STARTTLS happens at most once, and never on a connection that is already TLS.
- A login the Router (or the upstream) refuses leaves the client where it was: it may
  try again, up to the listener's `max_attempts`, and commands it pipelined behind the
  refused one are read next. A temporary failure (Router down, no upstream reachable)
  does not count as an attempt.
- A line longer than `max_line_length` is skipped up to its end and answered as an
  error; past `max_errors` errors, or `login_timeout` seconds of silence, the
  connection is closed.
- Before login a client spends at most `login_deadline` seconds from accept (TLS
  handshake included) and `max_junk_commands` commands that achieve nothing (a NOOP,
  a third EHLO, a command refused in this state: `junk()`), whatever else it sends. A
  login or route attempt in flight when the deadline passes is not cut: if it fails,
  the session closes instead of reading again. The deadline's timer ends when the
  session is logged in (`logged_in()`), closed, or lost.
- A client that ends its stream (a half-close) before it is routed is answered for
  every whole line it sent, then closed at once as `client-gone` (or as its last
  failed login): nothing waits for a timer.
- A front-end may take a counted run of bytes instead of a line (`read_bytes()`, an
  IMAP literal); line reading goes on after it.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from .. import sasl
from ..config import FrontEndConfig
from ..connector import Upstream
from ..logtext import loggable
from ..relay import RoutedConnection
from ..router import Reject


def printable(text: str, limit: int = 200) -> str:
    """A message fit for a reply line: one line of printable ASCII, bounded (a Reject's
    message or a parse error may carry anything)."""
    return "".join(c if c.isprintable() and c.isascii() else " " for c in text)[:limit].strip() or "-"


class LineFrontEnd(RoutedConnection):
    """A client connection that speaks a line protocol until it is routed."""

    log = Logger()
    peer = "client"
    max_line_length = 32 * 1024
    """Longest command line accepted, terminator included: a SASL response of
    `sasl.MAX_RESPONSE` bytes (an OAuth token) fits in base64."""

    _reading = False
    _starttls_done = False
    _discarding = False
    """Inside an over-long line: skipping to its end."""
    _silence: IDelayedCall | None = None
    _deadline: IDelayedCall | None = None
    """Fires `login_deadline` seconds after accept, unless logged in or gone first."""
    _deadline_passed = False
    """The deadline has passed: an attempt then in flight may finish, but if it fails
    the session closes instead of reading again."""
    _bytes_wanted: int | None = None
    """Set by `read_bytes()`: the next bytes are taken as they are, not as a line."""
    _parsing = False
    """Inside `pendingReceived()` (which a synchronous `resume()` must not enter again)."""
    _sasl: sasl.Exchange | None = None
    failed_logins = 0
    errors = 0
    junk_commands = 0
    last_failure: tuple[str, str] | None = None
    """(outcome, reason) of the last login that did not succeed: what the session line
    says if the client gives up after it."""

    @property
    def config(self) -> FrontEndConfig:
        return self.listener.front_end

    def connectionMade(self) -> None:
        super().connectionMade()
        self._deadline = self.factory.clock.callLater(self.config.login_deadline, self._deadline_reached)
        if self.listener.mode == "tls":
            self.expect_handshake()  # greet once TLS is up
        else:
            self._greet()

    def _greet(self) -> None:
        self.greet()
        self.resume()

    def resume(self) -> None:
        """Read command lines (again): after the greeting, a handshake, a failed login."""
        self._task = None
        if self._deadline_passed:  # a login that was in flight at the deadline failed
            self.login_timed_out()
            return
        self._reading = True
        self._listen_for_silence()
        self.pendingReceived()

    def _listen_for_silence(self) -> None:
        if self._silence is not None and self._silence.active():
            self._silence.reset(self.config.login_timeout)
        else:
            self._silence = self.factory.clock.callLater(self.config.login_timeout, self._silent_too_long)

    def _stop_listening_for_silence(self) -> None:
        if self._silence is not None and self._silence.active():
            self._silence.cancel()
        self._silence = None

    def _silent_too_long(self) -> None:
        self._silence = None
        self.timed_out("idle-timeout", f"no command within {self.config.login_timeout:g}s before login")

    def _deadline_reached(self) -> None:
        self._deadline = None
        self._deadline_passed = True
        if self._task is not None or self._splice is not None:
            return  # the Router and the upstream have their own deadlines; `resume()` closes
        if self._handshake_timer is not None:
            # No protocol reply can reach a client inside a TLS handshake.
            self._stop_handshake_timer()
            self.finish("login-timeout", self._deadline_reason() + " (in a TLS handshake)")
            self.transport.abortConnection()
            return
        self.login_timed_out()

    def _deadline_reason(self) -> str:
        return f"not logged in within {self.config.login_deadline:g}s"

    def _stop_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def login_timed_out(self) -> None:
        """`login_deadline` seconds passed since accept, and no login succeeded."""
        self.timed_out("login-timeout", self._deadline_reason())

    def timed_out(self, outcome: str, reason: str) -> None:
        """The client took too long: `login_timeout` seconds of silence ("idle-timeout"),
        or past `login_deadline` ("login-timeout"). Front-ends say goodbye first."""
        self.close(outcome, reason)

    def greet(self) -> None:
        """Say the protocol's greeting."""

    def line_received(self, line: bytes) -> None:
        """One command line, without its line ending (CRLF, or a bare LF)."""

    def line_too_long(self) -> None:
        """A line longer than `max_line_length` arrived (and was skipped); by default
        the session ends. Front-ends answer with `error()`."""
        self.close("protocol-error", f"command line longer than {self.max_line_length} bytes")

    def error(self, reply: bytes) -> None:
        """Answer a malformed or unknown command with `reply`; past `max_errors` of them,
        say `too_many_errors()` and close."""
        self.errors += 1
        self.send(reply)
        if self.errors >= self.config.max_errors:
            self.too_many_errors()

    def too_many_errors(self) -> None:
        """`max_errors` malformed commands: front-ends say goodbye first."""
        self.close("protocol-error", f"{self.errors} malformed or unknown commands")

    def junk(self) -> bool:
        """
        Count a command that achieves nothing before login: a NOOP, one more EHLO or
        CAPABILITY than a client needs, a command refused in the session's state. Call
        it before answering; whether to answer. Past `max_junk_commands` the command is
        not answered: the client hears `too_many_junk_commands()` and is closed.

        Malformed commands (`error()`) and failed logins have their own limits and are
        not junk.
        """
        self.junk_commands += 1
        if self.junk_commands <= self.config.max_junk_commands:
            return True
        self.too_many_junk_commands()
        return False

    def too_many_junk_commands(self) -> None:
        """Past `max_junk_commands`: front-ends say goodbye first."""
        self.close("protocol-error", f"more than {self.config.max_junk_commands} commands that achieve nothing before login")

    def quit(self, goodbye: bytes) -> None:
        """The client asked to leave before it was routed."""
        self.send(goodbye)
        # A clean goodbye (a monitoring probe's EHLO, QUIT) is no warning, unless a login failed.
        outcome, reason = self.last_failure or ("closed", "client quit before it was routed")
        self.close(outcome, reason)

    def close(self, outcome: str, reason: str) -> None:
        self._reading = False
        self._stop_listening_for_silence()
        self._stop_deadline()
        super().close(outcome, reason)

    def send(self, data: bytes) -> None:
        self.transport.write(data)

    def read_bytes(self, count: int) -> None:
        """Take the next `count` bytes as they are (an IMAP literal): `bytes_received()`
        gets them, then lines are read again. Call it from `line_received()`."""
        self._bytes_wanted = count

    def bytes_received(self, data: bytes) -> None:
        """The bytes `read_bytes()` asked for."""

    def pendingReceived(self) -> None:
        # Not re-entrant: a login refused at once resumes reading from inside the line
        # that asked for it; the loop below goes on with the next line instead of a
        # nested one (200 pipelined failing logins must not mean 200 stack frames).
        if self._parsing:
            return
        self._parsing = True
        try:
            self._parse_pending()
        finally:
            self._parsing = False

    def _parse_pending(self) -> None:
        while self._reading and self.lost_reason is None:
            if self._bytes_wanted is not None:
                if len(self.pending) < self._bytes_wanted:
                    if self.read_closed:
                        self._client_ended()
                    return
                data = bytes(self.pending[: self._bytes_wanted])
                del self.pending[: self._bytes_wanted]
                self._bytes_wanted = None
                self.pendingConsumed()
                self._listen_for_silence()
                self.bytes_received(data)
                continue
            end = self.pending.find(b"\n", 0, self.max_line_length)
            if end < 0:
                if len(self.pending) >= self.max_line_length:
                    # Skip to the end of the line; answer once it is over.
                    self._discarding = True
                    end = self.pending.find(b"\n")
                    del self.pending[: end if end >= 0 else len(self.pending)]
                    self.pendingConsumed()
                    if end >= 0:
                        continue
                elif self.read_closed:
                    # Nothing more will come, and nothing was asked of an upstream yet.
                    self._client_ended()
                return
            line = bytes(self.pending[: end + 1])
            del self.pending[: end + 1]
            self.pendingConsumed()
            self._listen_for_silence()
            if self._discarding:
                self._discarding = False
                if self._sasl is not None:  # the answer to a challenge: the exchange fails
                    self._sasl = None
                    self.sasl_malformed("response too long")
                else:
                    self.line_too_long()
            elif self._sasl is not None:
                self._sasl_response(line[:-2] if line.endswith(b"\r\n") else line[:-1])
            else:
                self.line_received(line[:-2] if line.endswith(b"\r\n") else line[:-1])

    def _client_ended(self) -> None:
        outcome, reason = self.last_failure or ("client-gone", "client ended its stream before it was routed")
        self.close(outcome, reason)

    def stop_reading(self) -> None:
        """Read no more lines: the session is being handed on (what is left in
        `pending` is for the upstream)."""
        self._reading = False

    def begin(self, **facts: object) -> None:
        self.stop_reading()
        self._stop_listening_for_silence()
        super().begin(**facts)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stop_listening_for_silence()
        self._stop_deadline()
        super().connectionLost(reason)

    def logged_in(self, upstream: Upstream) -> None:
        """The deadline is met: the session is handed on. Front-ends that override this
        (to tell the client) call it first."""
        self._stop_deadline()

    def lost_before_routing(self, reason: Failure) -> None:
        if self.last_failure is not None and self._handshake_timer is None:
            self.finish(*self.last_failure)
        else:
            super().lost_before_routing(reason)

    # Authentication

    def tls_required(self) -> bool:
        """Whether logins (and SMTP's mail commands) must wait for STARTTLS."""
        return self.tls is None and self.listener.mode == "starttls" and self.config.starttls == "required"

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
        self._sasl = sasl.Exchange(mechanism, initial_response, context)
        self._sasl_step(self._sasl.start)

    def _sasl_response(self, line: bytes) -> None:
        assert self._sasl is not None
        exchange = self._sasl
        self._sasl_step(lambda: exchange.respond(line))

    def _sasl_step(self, step: Any) -> None:
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
            self.refused(Reject(str(e)))
        else:
            if isinstance(result, bytes):
                self.sasl_challenge(result)
            else:
                self._sasl = None
                self.login(result)

    def sasl_challenge(self, challenge: bytes) -> None:
        """Send a SASL challenge (raw: the front-end encodes it)."""
        raise NotImplementedError

    def sasl_cancelled(self) -> None:
        """The client cancelled the exchange with `*`."""
        raise NotImplementedError

    def sasl_malformed(self, why: str) -> None:
        """The client's SASL response was malformed (counts as an error)."""
        raise NotImplementedError

    def login(self, credentials: sasl.Credentials, **facts: Any) -> None:
        """Route the client as the user it authenticated as."""
        self.begin(
            user=credentials.user,
            password=credentials.password,
            auth_method=credentials.method,
            salt=credentials.salt,
            attempt=self.failed_logins + 1,
            **facts,
        )

    def refused(self, reject: Reject) -> None:
        """A login was refused: say so (`login_failed()`), then let the client try again,
        unless that was its last attempt."""
        self.last_failure = ("rejected", reject.message)
        if not reject.counts:
            self.login_failed(reject)
            if reject.close:
                self.close("rejected", reject.message)
            else:
                self.resume()
            return
        self.failed_logins += 1
        assert self.session is not None
        self.log.info(
            "session {session_id}: login refused for {user} from {client}: {why} (attempt {attempt} of {max_attempts})",
            session_id=self.session.id,
            user=loggable(self.session.user),
            client=self.client[0],
            why=loggable(reject.message),
            attempt=self.failed_logins,
            max_attempts=self.config.max_attempts,
        )
        self.login_failed(reject)
        if reject.close:
            self.close("rejected", reject.message)
        elif self.failed_logins >= self.config.max_attempts:
            self.too_many_attempts()
            self.close("rejected", reject.message)
        else:
            self.resume()

    def login_failed(self, reject: Reject) -> None:
        """Tell the client its login failed."""

    def too_many_attempts(self) -> None:
        """Tell the client the connection closes after its last failed login."""

    def unavailable(self, outcome: str, reason: str) -> None:
        """A login or route could not be decided or reached now: say so
        (`temporarily_failed()`); the client may try again, except when throttled."""
        self.last_failure = (outcome, reason)
        self.temporarily_failed(outcome)
        if outcome == "throttled":
            self.close(outcome, reason)
        else:
            self.resume()

    def temporarily_failed(self, outcome: str) -> None:
        """Tell the client this failure is temporary (`outcome` says which)."""

    # STARTTLS

    def can_start_tls(self) -> bool:
        """Whether STARTTLS may be offered and accepted now."""
        return self.factory.tls is not None and self.tls is None and not self._starttls_done

    def start_tls(self, go_ahead: bytes) -> None:
        """
        Answer a STARTTLS command with `go_ahead` (in plaintext) and upgrade. The caller
        checked `can_start_tls()`. Bytes already received behind the command are
        discarded unread; lines are read again once the handshake is done, and the
        protocol's state is reset then (`tls_started()`).
        """
        assert self.can_start_tls() and self.factory.tls is not None
        self._starttls_done = True
        self._reading = False
        self._bytes_wanted = None
        self._stop_listening_for_silence()  # the handshake has its own deadline
        if self.pending:
            assert self.session is not None
            self.log.warn(
                "session {session_id}: discarded {count} byte(s) sent in plaintext after STARTTLS (command injection?)",
                session_id=self.session.id,
                count=len(self.pending),
            )
            del self.pending[:]
            self.pendingConsumed()
        self.send(go_ahead)
        self.transport.startTLS(self.factory.tls)
        self.expect_handshake()

    def handshake_done(self) -> None:
        if self._starttls_done:
            self.tls_started()
            self.resume()
        else:
            self._greet()

    def tls_started(self) -> None:
        """STARTTLS succeeded: forget everything the client said in plaintext (RFC 3207
        §4.2: the client starts over, e.g. with a new EHLO)."""
