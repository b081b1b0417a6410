"""
The IMAP front-end: what a mail client (on 143 or 993) hears from mailrelay before it is
routed.

    * OK [CAPABILITY ...] greeting -> [tag STARTTLS -> TLS] -> tag LOGIN | tag AUTHENTICATE
        -> routed, logged in upstream (`imap_upstream`) -> the upstream's tagged OK -> spliced

Before login a client may say CAPABILITY, NOOP, ID (answered `* ID NIL`; its fields are
passed on to the upstream), STARTTLS, LOGIN, AUTHENTICATE and LOGOUT; anything else is
`BAD` and counts towards `max_errors`, as does a command line (its CRLF or LF taken
off) that still holds a CR or a NUL: such a command is never acted on, so no bare CR
reaches an upstream or an auth service. Commands may be pipelined, and carry literals:
`{n}` is answered with a continuation, `{n+}` (LITERAL+) is not; a literal longer than
`max_literal` is refused (a synchronising one with `BAD`, a non-synchronising one,
whose bytes are already on the way, with `* BYE`).

The client's tagged reply to its login is the upstream's own (`a1 OK [CAPABILITY ...]
Logged in`), with whatever untagged lines the upstream sent before it: the client learns
the real post-login capabilities. A refused login gets `NO [AUTHENTICATIONFAILED]` after
the Reject's delay; after `max_attempts` of them, `* BYE`.

Junk (`max_junk_commands`): NOOP, CAPABILITY after the first two (one before STARTTLS,
one after), ID after the first, an AUTHENTICATE the client cancels, and a login refused
with `NO` before it is tried (LOGIN disabled, no TLS yet, an unsupported mechanism).
"""

from __future__ import annotations

from .. import sasl
from ..connector import LoginStep, StartTLSStep, Upstream
from ..router import Reject, RouteRequest
from .base import LineFrontEnd, printable
from .imap_syntax import LITERAL, Atom, Command, IMAPSyntaxError, Literal, Token, is_nil, is_string, tokenize
from .imap_upstream import ClientID, IMAPClientFacts, IMAPUpstreamLogin

OWN_CAPABILITIES = ("IMAP4rev1", "LITERAL+", "SASL-IR", "ID")
"""What mailrelay's IMAP front-end itself implements before login, always advertised."""

MAX_ID_FIELDS = 30
"""RFC 2971: at most 30 field-value pairs."""

BARE_CR_OR_NUL = b"Bare CR or NUL character in command"


class IMAPFrontEnd(LineFrontEnd):
    """One IMAP client before it is routed."""

    max_literal = 8192
    """Longest literal accepted before login (a user name, a password)."""
    max_command = 64 * 1024
    """Longest command, lines and literals together."""

    tag: bytes | None = None
    """The tag of the login command being routed (or of the AUTHENTICATE in progress)."""
    _command: Command | None = None
    client_id: ClientID | None = None
    """The fields of the client's ID command, to pass on upstream."""
    _upstream_login: IMAPUpstreamLogin | None = None
    busy_reply = "* BYE Too many connections, try again later"
    capability_commands = 0
    id_commands = 0

    COMMANDS = {
        b"CAPABILITY": "imap_CAPABILITY",
        b"NOOP": "imap_NOOP",
        b"LOGOUT": "imap_LOGOUT",
        b"STARTTLS": "imap_STARTTLS",
        b"LOGIN": "imap_LOGIN",
        b"AUTHENTICATE": "imap_AUTHENTICATE",
        b"ID": "imap_ID",
    }
    TAKES_LITERALS = (b"LOGIN", b"ID")

    def send_line(self, line: bytes) -> None:
        self.send(line + b"\r\n")

    def tagged(self, tag: bytes, status: bytes, text: bytes) -> None:
        self.send_line(tag + b" " + status + b" " + text)

    def junk_no(self, tag: bytes, text: bytes) -> None:
        """Refuse a command that cannot succeed in this state (junk: see `junk()`)."""
        if self.junk():
            self.tagged(tag, b"NO", text)

    def bad(self, tag: bytes | None, text: bytes) -> None:
        """A malformed or unknown command: `BAD` (untagged when the tag is unusable)."""
        self.error((tag or b"*") + b" BAD " + text + b"\r\n")

    def login_allowed(self) -> bool:
        """Whether LOGIN is accepted now (LOGINDISABLED is advertised while it is not)."""
        return not self.tls_required() and self.password_logins()

    def capabilities(self) -> list[str]:
        listed = [*OWN_CAPABILITIES, *(self.config.capabilities or ())]
        if not self.tls_required():
            listed += [f"AUTH={m.upper()}" for m in self.mechanisms()]
        if self.can_start_tls():
            listed.append("STARTTLS")
        if not self.login_allowed():
            listed.append("LOGINDISABLED")
        return list(dict.fromkeys(listed))  # a configured word mailrelay lists anyway is said once

    def greet(self) -> None:
        caps = " ".join(self.capabilities())
        self.send_line(f"* OK [CAPABILITY {caps}] {self.config.hostname} IMAP4rev1 ready".encode())

    # Reading commands: lines and literals

    def line_received(self, line: bytes) -> None:
        command = self._command or Command()
        marker = LITERAL.search(line)
        command.add(line if marker is None else line[: marker.start()])
        if marker is None:
            self._command = None
            self.command_received(command)
            return
        size, synchronising = int(marker[1]), not marker[2]
        tag, name = command.head
        if size > self.max_literal or command.size + size > self.max_command:
            self._command = None
            if synchronising:  # the client waits for our go-ahead: it will not send the literal
                self.bad(tag, b"Literal too large")
            else:  # its bytes are on their way, and could be anything
                self.send_line(b"* BYE Literal too large")
                self.close("protocol-error", f"a literal of {size} bytes, over the limit of {self.max_literal}")
            return
        if synchronising:
            if tag is None or name not in self.TAKES_LITERALS:
                self._command = None
                self.bad(tag, b"Unknown command or not valid before login")
                return
            if _bare_cr_or_nul(command):
                self._command = None  # refused before the client sends the literal
                self.bad(tag, BARE_CR_OR_NUL)
                return
            if name == b"LOGIN" and self._login_refused(tag):
                self._command = None  # before the client sends its password in a literal
                return
            self.send_line(b"+ OK")
        self._command = command
        self.read_bytes(size)

    def bytes_received(self, data: bytes) -> None:
        assert self._command is not None
        self._command.add(Literal(data))

    def line_too_long(self) -> None:
        self._command = None
        self.bad(None, b"Command line too long")

    def command_received(self, command: Command) -> None:
        if _bare_cr_or_nul(command):
            self.bad(command.head[0], BARE_CR_OR_NUL)
            return
        try:
            tokens = tokenize(command.parts)
        except IMAPSyntaxError as e:
            tag, _ = command.head
            self.bad(tag, _text(f"Invalid syntax: {e}"))
            return
        if not tokens:
            self.bad(None, b"Empty command line")
            return
        first = tokens[0]
        tag = command.head[0]
        if tag is None or not isinstance(first, Atom) or first != tag:
            self.bad(None, b"Invalid tag")
            return
        name = tokens[1] if len(tokens) > 1 else None
        method = self.COMMANDS.get(name.upper()) if isinstance(name, Atom) else None
        if method is None:
            self.bad(tag, b"Unknown command or not valid before login")
            return
        getattr(self, method)(tag, tokens[2:])

    # Commands

    def imap_CAPABILITY(self, tag: bytes, args: list[Token]) -> None:
        if args:
            self.bad(tag, b"CAPABILITY takes no arguments")
            return
        self.capability_commands += 1
        if self.capability_commands > 2 and not self.junk():
            return
        self.send_line(b"* CAPABILITY " + " ".join(self.capabilities()).encode())
        self.tagged(tag, b"OK", b"CAPABILITY completed")

    def imap_NOOP(self, tag: bytes, args: list[Token]) -> None:
        if self.junk():
            self.tagged(tag, b"OK", b"NOOP completed")

    def imap_LOGOUT(self, tag: bytes, args: list[Token]) -> None:
        self.quit(b"* BYE Logging out\r\n" + tag + b" OK LOGOUT completed\r\n")

    def imap_ID(self, tag: bytes, args: list[Token]) -> None:
        fields = _id_fields(args)
        if fields is None:
            self.bad(tag, b'ID takes NIL or a list of field-value pairs: ID ("name" "value")')
            return
        self.id_commands += 1
        if self.id_commands > 1 and not self.junk():
            return
        self.client_id = fields
        self.send_line(b"* ID NIL")
        self.tagged(tag, b"OK", b"ID completed")

    def imap_STARTTLS(self, tag: bytes, args: list[Token]) -> None:
        if args:
            self.bad(tag, b"STARTTLS takes no arguments")
        elif self.tls is not None:
            self.bad(tag, b"TLS is already active")
        elif not self.can_start_tls():
            self.bad(tag, b"STARTTLS is not available")
        else:
            self.start_tls(tag + b" OK Begin TLS negotiation now\r\n")

    def tls_started(self) -> None:
        # RFC 3501 6.2.1: forget what was learnt in plaintext.
        self.client_id = None
        self._command = None

    def _refuse_plaintext(self, tag: bytes) -> bool:
        if self.tls_required():
            self.junk_no(tag, b"[PRIVACYREQUIRED] Use STARTTLS first: logins are not accepted before TLS")
            return True
        return False

    def _login_refused(self, tag: bytes) -> bool:
        """Refuse LOGIN when it is not allowed now (and say so); whether it was."""
        if self._refuse_plaintext(tag):
            return True
        if not self.login_allowed():
            self.junk_no(tag, b"[CANNOT] LOGIN is disabled: use AUTHENTICATE")
            return True
        return False

    def imap_LOGIN(self, tag: bytes, args: list[Token]) -> None:
        if len(args) != 2 or not all(is_string(a) for a in args):
            self.bad(tag, b"LOGIN takes a user name and a password")
        elif self._login_refused(tag):
            pass
        else:
            user, password = args
            assert isinstance(user, bytes) and isinstance(password, bytes)
            try:
                credentials = sasl.password_login(user, password)
            except sasl.SASLSyntaxError as e:
                self.bad(tag, _text(f"Invalid LOGIN: {e}"))
                return
            self.tag = tag
            self.login(credentials)

    def imap_AUTHENTICATE(self, tag: bytes, args: list[Token]) -> None:
        if not 1 <= len(args) <= 2 or not isinstance(args[0], Atom) or (len(args) == 2 and not isinstance(args[1], Atom)):
            self.bad(tag, b"AUTHENTICATE takes a mechanism and an optional initial response")
            return
        if self._refuse_plaintext(tag):
            return
        mechanism = args[0].decode("ascii", "replace").lower()
        if mechanism not in self.mechanisms():
            self.junk_no(tag, b"Unsupported authentication mechanism")
            return
        self.tag = tag
        initial = args[1] if len(args) == 2 else None
        self.authenticate(mechanism, bytes(initial) if isinstance(initial, bytes) else None)

    def sasl_challenge(self, challenge: bytes) -> None:
        self.send_line(b"+ " + sasl.encode(challenge))

    def sasl_cancelled(self) -> None:
        assert self.tag is not None
        if self.junk():
            self.tagged(self.tag, b"BAD", b"Authentication cancelled")

    def sasl_malformed(self, why: str) -> None:
        self.bad(self.tag, _text(f"Invalid authentication: {why}"))

    # Routing

    def upstream_steps(self, request: RouteRequest) -> tuple[LoginStep | None, StartTLSStep | None]:
        assert self.tag is not None and self.session is not None
        self._upstream_login = IMAPUpstreamLogin(
            IMAPClientFacts(
                tag=self.tag,
                client=self.client,
                local=self.local,
                request=request,
                client_id=self.client_id,
                session_id=self.session.id,
            )
        )
        return self._upstream_login.login, self._upstream_login.starttls

    def logged_in(self, upstream: Upstream) -> None:
        super().logged_in(upstream)
        assert self._upstream_login is not None
        self.send(self._upstream_login.client_reply)

    def login_failed(self, reject: Reject) -> None:
        assert self.tag is not None
        code = reject.code if isinstance(reject.code, str) and reject.code.isalpha() else "AUTHENTICATIONFAILED"
        self.tagged(self.tag, b"NO", b"[" + code.upper().encode() + b"] " + _text(reject.message))
        if reject.close:  # RFC 3501 3.4: never close without a BYE
            self.send_line(b"* BYE " + _text(reject.message))

    def too_many_attempts(self) -> None:
        self.send_line(b"* BYE Too many failed logins")

    def temporarily_failed(self, outcome: str) -> None:
        assert self.tag is not None
        if outcome == "throttled":
            self.tagged(self.tag, b"NO", b"[UNAVAILABLE] Too many failed logins, try again later")
            self.send_line(b"* BYE Too many failed logins")
        elif outcome == "upstream-unavailable":
            self.tagged(self.tag, b"NO", b"[UNAVAILABLE] Mail server temporarily unavailable, try again later")
        else:
            self.tagged(self.tag, b"NO", b"[UNAVAILABLE] Temporary failure, try again later")

    def timed_out(self, outcome: str, reason: str) -> None:
        # Dovecot's words, for its hard pre-login limit as for silence.
        self.send_line(b"* BYE Disconnected for inactivity")
        super().timed_out(outcome, reason)

    def too_many_junk_commands(self) -> None:
        self.send_line(b"* BYE Too many commands")
        super().too_many_junk_commands()

    def too_many_errors(self) -> None:
        self.send_line(b"* BYE Too many invalid commands")
        super().too_many_errors()


def _bare_cr_or_nul(command: Command) -> bool:
    """Whether a line of `command` (not a literal: those are bytes) holds a CR or a NUL."""
    return any(b"\r" in part or b"\0" in part for part in command.parts if not isinstance(part, Literal))


def _id_fields(args: list[Token]) -> ClientID | None:
    """The field-value pairs of an ID command's argument, or None if malformed."""
    if len(args) != 1:
        return None
    (parameters,) = args
    if is_nil(parameters):
        return []
    if not isinstance(parameters, list) or len(parameters) % 2 or len(parameters) > 2 * MAX_ID_FIELDS:
        return None
    fields: list[tuple[str, str | None]] = []
    for key, value in zip(parameters[::2], parameters[1::2], strict=True):
        if not isinstance(key, bytes) or isinstance(key, Atom) or not isinstance(value, bytes):
            return None
        if isinstance(value, Atom) and not is_nil(value):
            return None
        fields.append((key.decode("utf-8", "replace"), None if is_nil(value) else value.decode("utf-8", "replace")))
    return fields


def _text(text: str) -> bytes:
    return printable(text).encode("ascii")
