"""
IMAP as a mail client (on 143 or 993) speaks it to mailrelay before it is routed.

    * OK [CAPABILITY ...] greeting -> [tag STARTTLS -> TLS] -> tag LOGIN | tag AUTHENTICATE
        -> routed, logged in upstream (`imap_login`) -> the upstream's tagged OK -> spliced

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

from collections.abc import Callable
from typing import Any

from .. import sasl
from ..router import Reject
from .frontend import FrontEndCore, Replies, printable
from .imap_login import ClientID
from .imap_syntax import LITERAL, Atom, Command, IMAPSyntaxError, Literal, Token, is_nil, is_string, tokenize

OWN_CAPABILITIES = ("IMAP4rev1", "LITERAL+", "SASL-IR", "ID")
"""What mailrelay's IMAP front-end itself implements before login, always advertised."""

MAX_ID_FIELDS = 30
"""RFC 2971: at most 30 field-value pairs."""

PLAINTEXT_REFUSED = "[PRIVACYREQUIRED] Use STARTTLS first: logins are not accepted before TLS"

REPLIES = Replies(
    # Dovecot's words, for its hard pre-login limit as for silence.
    timeout="* BYE Disconnected for inactivity",
    too_many_junk="* BYE Too many commands",
    too_many_errors="* BYE Too many invalid commands",
    too_many_attempts="* BYE Too many failed logins",
    throttled="{tag} NO [UNAVAILABLE] Too many failed logins, try again later\r\n* BYE Too many failed logins",
    upstream_unavailable="{tag} NO [UNAVAILABLE] Mail server temporarily unavailable, try again later",
    temporary="{tag} NO [UNAVAILABLE] Temporary failure, try again later",
    line_too_long="* BAD Command line too long",
    bare_cr_or_nul="{tag} BAD Bare CR or NUL character in command",
    unknown_command="{tag} BAD Unknown command or not valid before login",
    busy="* BYE Too many connections, try again later",
)


class IMAPCore(FrontEndCore):
    """One IMAP client before it is routed."""

    protocol = "imap"
    replies = REPLIES
    max_literal = 8192
    """Longest literal accepted before login (a user name, a password)."""
    max_command = 64 * 1024
    """Longest command, lines and literals together."""

    tag: bytes | None = None
    """The tag of the login command being routed (or of the AUTHENTICATE in progress):
    the upstream login is sent under it, and the login's outcome is answered under it."""
    client_id: ClientID | None = None
    """The fields of the client's ID command, to pass on upstream."""
    _command: Command | None = None
    """The command being received: its lines and literals so far."""
    capability_commands = 0
    id_commands = 0

    TAKES_LITERALS = (b"LOGIN", b"ID")
    """The commands whose synchronising literals are accepted (their arguments are strings)."""

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

    def bad_by_table(self, name: str, tag: bytes | None) -> None:
        """A malformed or unknown command, answered with the `Replies` entry `name` under
        the command's own tag."""
        self.error(self.replies.get(name, **{**self.reply_fields(), "tag": _tag(tag)}))

    def error(self, reply: bytes) -> None:
        # A malformed part ends the command it belonged to: the next line starts a new
        # one (an over-long line after a literal included).
        self._command = None
        super().error(reply)

    def reply_fields(self) -> dict[str, Any]:
        return {**super().reply_fields(), "tag": _tag(self.tag)}

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

    def greeting(self) -> bytes:
        caps = " ".join(self.capabilities())
        return f"* OK [CAPABILITY {caps}] {self.config.hostname} IMAP4rev1 ready\r\n".encode()

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
                self.bad_by_table("unknown_command", tag)
                return
            if _bare_cr_or_nul(command):  # refused before the client sends the literal
                self.bad_by_table("bare_cr_or_nul", tag)
                return
            if name == b"LOGIN" and self._refused(tag, b"LOGIN"):
                self._command = None  # before the client sends its password in a literal
                return
            self.send_line(b"+ OK")
        self._command = command
        self.read_bytes(size)

    def bytes_received(self, data: bytes) -> None:
        assert self._command is not None
        self._command.add(Literal(data))

    def command_received(self, command: Command) -> None:
        tag = command.head[0]
        if _bare_cr_or_nul(command):
            self.bad_by_table("bare_cr_or_nul", tag)
            return
        try:
            tokens = tokenize(command.parts)
        except IMAPSyntaxError as e:
            self.bad(tag, _text(f"Invalid syntax: {e}"))
            return
        if not tokens:
            self.bad(None, b"Empty command line")
            return
        first = tokens[0]
        if tag is None or not isinstance(first, Atom) or first != tag:
            self.bad(None, b"Invalid tag")
            return
        name = tokens[1] if len(tokens) > 1 else None
        handler = self.COMMANDS.get(name.upper()) if isinstance(name, Atom) else None
        if handler is None:
            self.bad_by_table("unknown_command", tag)
            return
        handler(self, tag, tokens[2:])

    # Commands

    def capability(self, tag: bytes, args: list[Token]) -> None:
        if args:
            self.bad(tag, b"CAPABILITY takes no arguments")
            return
        self.capability_commands += 1
        if self.capability_commands > 2 and not self.junk():
            return
        self.send_line(b"* CAPABILITY " + " ".join(self.capabilities()).encode())
        self.tagged(tag, b"OK", b"CAPABILITY completed")

    def noop(self, tag: bytes, args: list[Token]) -> None:
        if self.junk():
            self.tagged(tag, b"OK", b"NOOP completed")

    def logout(self, tag: bytes, args: list[Token]) -> None:
        self.quit(b"* BYE Logging out\r\n" + tag + b" OK LOGOUT completed\r\n")

    def id_command(self, tag: bytes, args: list[Token]) -> None:
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

    def starttls(self, tag: bytes, args: list[Token]) -> None:
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

    def _refused(self, tag: bytes, verb: bytes) -> bool:
        """Refuse a login command the session's state does not allow now (`REFUSALS`),
        once its syntax is known good (IMAP says BAD to syntax first); whether it was."""
        refusal = self.refusal(verb)
        if refusal is None:
            return False
        self.junk_no(tag, refusal.encode("ascii"))
        return True

    def login_command(self, tag: bytes, args: list[Token]) -> None:
        if len(args) != 2 or not all(is_string(a) for a in args):
            self.bad(tag, b"LOGIN takes a user name and a password")
        elif not self._refused(tag, b"LOGIN"):
            user, password = args
            assert isinstance(user, bytes) and isinstance(password, bytes)
            try:
                credentials = sasl.password_login(user, password)
            except sasl.SASLSyntaxError as e:
                self.bad(tag, _text(f"Invalid LOGIN: {e}"))
                return
            self.tag = tag
            self.login(credentials)

    def authenticate_command(self, tag: bytes, args: list[Token]) -> None:
        if not 1 <= len(args) <= 2 or not isinstance(args[0], Atom) or (len(args) == 2 and not isinstance(args[1], Atom)):
            self.bad(tag, b"AUTHENTICATE takes a mechanism and an optional initial response")
            return
        if self._refused(tag, b"AUTHENTICATE"):
            return
        mechanism = args[0].decode("ascii", "replace").lower()
        if mechanism not in self.mechanisms():
            self.junk_no(tag, b"Unsupported authentication mechanism")
            return
        self.tag = tag
        initial = args[1] if len(args) == 2 else None
        self.authenticate(mechanism, bytes(initial) if isinstance(initial, bytes) else None)

    COMMANDS: dict[bytes, Callable[[IMAPCore, bytes, list[Token]], None]] = {
        b"CAPABILITY": capability,
        b"NOOP": noop,
        b"LOGOUT": logout,
        b"STARTTLS": starttls,
        b"LOGIN": login_command,
        b"AUTHENTICATE": authenticate_command,
        b"ID": id_command,
    }

    REFUSALS = {
        b"LOGIN": (
            (lambda c: c.tls_required(), PLAINTEXT_REFUSED),
            (lambda c: not c.login_allowed(), "[CANNOT] LOGIN is disabled: use AUTHENTICATE"),
        ),
        b"AUTHENTICATE": ((lambda c: c.tls_required(), PLAINTEXT_REFUSED),),
    }
    """Why a login command cannot be taken in the session's state: the text of its tagged
    NO (see `FrontEndCore.REFUSALS`; IMAP checks a command's syntax first, so its own
    dispatch consults this table after the arguments are parsed)."""

    # SASL and the login's outcome

    def sasl_challenge(self, challenge: bytes) -> None:
        self.send_line(b"+ " + sasl.encode(challenge))

    def sasl_cancelled(self) -> None:
        assert self.tag is not None
        if self.junk():
            self.tagged(self.tag, b"BAD", b"Authentication cancelled")

    def sasl_malformed(self, why: str) -> None:
        self.bad(self.tag, _text(f"Invalid authentication: {why}"))

    def login_failed(self, reject: Reject) -> None:
        assert self.tag is not None
        code = reject.code if isinstance(reject.code, str) and reject.code.isalpha() else "AUTHENTICATIONFAILED"
        self.tagged(self.tag, b"NO", b"[" + code.upper().encode() + b"] " + _text(reject.message))
        if reject.close:  # RFC 3501 3.4: never close without a BYE
            self.send_line(b"* BYE " + _text(reject.message))


def _tag(tag: bytes | None) -> str:
    """A tag for a `Replies` template: `*` when there is none (a TAG is printable ASCII)."""
    return (tag or b"*").decode("ascii")


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
