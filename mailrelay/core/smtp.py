"""
SMTP as a client (a mail user agent on 587 or 465, or a mail server on 25) speaks it to
mailrelay before it is routed.

    220 greeting -> EHLO -> [STARTTLS -> TLS -> EHLO] -> AUTH ... -> routed -> 235 -> relayed
                                                  or, with auth "none":
                                           MAIL FROM -> RCPT TO -> routed -> relayed

With a login, the Router is asked once the SASL exchange is complete, mailrelay logs in
upstream (`smtp_login`), and only when the upstream has accepted does the client get
`235`. With `auth = ["none"]` the Router is asked at the first RCPT TO with the HELO
name and the envelope; the upstream hears them replayed and its answer to that RCPT is
the client's. A recipient the Router refuses is not a failed login: the client hears
the refusal and the transaction goes on (`refuse_recipient()`, which the relay asks too
when it vets later recipients).

Replies carry enhanced status codes (RFC 2034, 3463). Pre-login commands may be
pipelined (RFC 2920): they are answered in order, and what the client sends behind the
command that hands it on reaches the upstream after the login.

Before login a client may say EHLO, HELO, STARTTLS, AUTH, MAIL, RCPT, DATA, BDAT, RSET,
NOOP, QUIT, HELP, VRFY and EXPN; anything else is `500 5.5.2` and counts towards
`max_errors`, as does a command line (its CRLF or LF taken off) that still holds a CR or
a NUL, which is never acted on.

Junk (`max_junk_commands`): NOOP, RSET, HELP, VRFY and EXPN, an EHLO or HELO after the
first two (one before STARTTLS and one after are what a client needs), a SASL exchange
the client cancels, a recipient the Router refuses, and any command refused for the
session's state (AUTH before EHLO, MAIL without a login, a second STARTTLS...). With
`auth = ["none"]` the `login_deadline` runs until the first RCPT the Router accepts.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import attrs

from ..router import Reject
from ..sasl import Credentials, encode
from .events import Event
from .frontend import FrontEndCore, Replies, printable
from .machine import Input, State
from .smtp_stream import MAIL_ARGUMENTS, MAIL_SYNTAX, RCPT_ARGUMENTS, RCPT_SYNTAX

DEFAULT_CAPABILITIES = ("PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES")
"""Extensions advertised in the EHLO reply that describe the upstream (the
`capabilities` default)."""

_SIZE = re.compile(rb" SIZE=([0-9]{1,20})(?= |$)", re.IGNORECASE)
_REPLY_CODE = re.compile(r"[245][0-9][0-9]( [245]\.[0-9]{1,3}\.[0-9]{1,3})?")

REPLIES = Replies(
    timeout="421 4.4.2 {hostname} Error: timeout exceeded",
    too_many_junk="421 4.7.0 {hostname} Error: too many commands",
    too_many_errors="421 4.7.0 {hostname} Error: too many errors",
    too_many_attempts="421 4.7.0 {hostname} Error: too many failed logins, closing connection",
    throttled="421 4.7.0 Too many failed logins, try again later",
    upstream_unavailable="451 4.4.1 Mail server temporarily unavailable, try again later",
    temporary="451 4.3.0 Temporary failure, try again later",
    line_too_long="500 5.5.6 Error: line too long",
    bare_cr_or_nul="500 5.5.2 Error: bare CR or NUL character in command",
    unknown_command="500 5.5.2 Error: command not recognized",
    busy="421 4.7.0 {hostname} Error: too many connections, try again later",
)

TOO_MANY_REFUSED = "421 4.7.0 {hostname} Error: too many recipients refused\r\n"
"""The goodbye, once relaying, past `max_junk_commands` (before login it is
`too_many_junk`: the count holds every kind of junk there)."""


@attrs.frozen
class RecipientRefusal:
    """What becomes of a recipient the Router refused."""

    reply: bytes
    """What the client hears: the refusal, and the goodbye when the session ends."""
    end: tuple[str, str] | None = None
    """(outcome, reason) of the session when it ends here; None: it goes on."""


class SMTPCore(FrontEndCore):
    """One SMTP client before it is routed. What the shell reads afterwards: `helo`,
    `esmtp`, `mail`, `rcpt` (the upstream login replays them) and `authenticating`."""

    protocol = "smtp"
    replies = REPLIES
    strip_arguments = True
    helo: bytes | None = None
    """The client's EHLO or HELO name, as it sent it (forgotten after STARTTLS)."""
    esmtp = False
    """Whether that was EHLO."""
    mail: bytes | None = None
    """The MAIL command of the transaction in progress (auth "none"), as typed."""
    rcpt: bytes | None = None
    """The RCPT command being vetted by the Router."""
    authenticating = False
    """A SASL exchange, or the login it ended in, is under way (the client is owed `235`
    when it succeeds)."""
    hellos = 0
    """Well-formed EHLO and HELO commands so far (the first two are not junk)."""

    def reply(self, line: str) -> None:
        self.send(line.encode("utf-8") + b"\r\n")

    def junk_reply(self, line: str) -> None:
        """Answer a command that achieves nothing (see `junk()`) with `line`."""
        if self.junk():
            self.reply(line)

    @property
    def hostname(self) -> str:
        return self.config.hostname

    def greeting(self) -> bytes:
        return f"220 {self.hostname} ESMTP ready\r\n".encode()

    def reset_transaction(self) -> None:
        self.mail = self.rcpt = None

    # Greeting and TLS

    def capabilities(self) -> list[str]:
        """The extensions of the EHLO reply, as they are now."""
        config = self.config
        listed = list(DEFAULT_CAPABILITIES if config.capabilities is None else config.capabilities)
        if config.size is not None:
            listed.insert(0, f"SIZE {config.size}" if config.size else "SIZE")
        mechanisms = self.mechanisms()
        if mechanisms and not self.tls_required():
            listed.append("AUTH " + " ".join(m.upper() for m in mechanisms))
        if self.can_start_tls():
            listed.append("STARTTLS")
        return listed

    def ehlo(self, args: bytes) -> None:
        self._hello(args, esmtp=True)

    def helo_command(self, args: bytes) -> None:
        self._hello(args, esmtp=False)

    def _hello(self, args: bytes, esmtp: bool) -> None:
        name = args.split(b" ", 1)[0]
        if not name:
            self.error(b"501 5.5.4 Syntax: %s hostname\r\n" % (b"EHLO" if esmtp else b"HELO"))
            return
        self.hellos += 1
        if self.hellos > 2 and not self.junk():
            return
        self.helo, self.esmtp = name, esmtp
        self.reset_transaction()
        if not esmtp:
            self.reply(f"250 {self.hostname}")
            return
        lines = [self.hostname, *self.capabilities()]
        self.send(b"".join(f"250{'-' if i < len(lines) - 1 else ' '}{text}\r\n".encode() for i, text in enumerate(lines)))

    def starttls(self, args: bytes) -> None:
        if args:
            self.error(b"501 5.5.4 Syntax: STARTTLS\r\n")
        elif self.tls is not None:
            self.junk_reply("503 5.5.1 Error: TLS already active")
        elif not self.can_start_tls():
            self.junk_reply("502 5.5.1 Error: STARTTLS not available")
        else:
            self.start_tls(b"220 2.0.0 Ready to start TLS\r\n")

    def tls_started(self) -> None:
        # RFC 3207 4.2: the client starts over with a new EHLO. The count of hellos
        # goes on: it bounds the session, not the phase.
        self.helo, self.esmtp = None, False
        self.reset_transaction()

    # AUTH

    def auth(self, args: bytes) -> None:
        mechanisms = self.mechanisms()
        if not args:
            self.error(b"501 5.5.4 Syntax: AUTH mechanism [initial-response]\r\n")
        else:
            name, _, initial = args.partition(b" ")
            mechanism = name.decode("ascii", "replace").lower()
            if mechanism not in mechanisms:
                self.error(b"504 5.5.4 Unrecognized authentication type\r\n")
                return
            self.authenticating = True
            self.authenticate(mechanism, initial.strip(b" ") or None)

    def sasl_challenge(self, challenge: bytes) -> None:
        self.send(b"334 " + encode(challenge) + b"\r\n")

    def sasl_cancelled(self) -> None:
        self.authenticating = False
        self.junk_reply("501 5.7.0 Authentication cancelled")

    def sasl_malformed(self, why: str) -> None:
        self.authenticating = False
        self.error(f"501 5.5.2 {printable(why)}\r\n".encode())

    def login(self, credentials: Credentials, **facts: Any) -> None:
        super().login(credentials, helo=self.helo_text(), **facts)

    def helo_text(self) -> str | None:
        return self.helo.decode("utf-8", "replace") if self.helo is not None else None

    def logged_in(self, client_reply: bytes) -> list[Event]:
        """The upstream accepted the login (or, auth "none", the replayed envelope): a
        client that authenticated hears `235` (the upstream's own answer to its RCPT
        reaches an auth "none" client relayed)."""
        if self.authenticating:
            self.reply("235 2.7.0 Authentication successful")
        return super().logged_in(client_reply)

    # auth "none": the envelope

    def mail_command(self, args: bytes) -> None:
        if (match := MAIL_ARGUMENTS.fullmatch(args)) is None:
            self.error(MAIL_SYNTAX)
        elif self.config.size and (size := _SIZE.search(match[2] or b"")) and int(size[1]) > self.config.size:
            self.reply("552 5.3.4 Message size exceeds fixed limit")
        else:
            self.mail = b"MAIL " + args
            self.reply("250 2.1.0 Ok")

    def rcpt_command(self, args: bytes) -> None:
        if RCPT_ARGUMENTS.fullmatch(args) is None:
            self.error(RCPT_SYNTAX)
        else:
            assert self.mail is not None  # REFUSALS
            self.rcpt = b"RCPT " + args
            self.route(
                auth_method="none",
                helo=self.helo_text(),
                mail_from=self.mail.decode("utf-8", "replace"),
                rcpt_to=self.rcpt.decode("utf-8", "replace"),
            )

    def data(self, args: bytes) -> None:
        # A recipient the Router accepted hands the session on: none has been.
        self.junk_reply("554 5.5.1 Error: no valid recipients")

    # Other commands

    def rset(self, args: bytes) -> None:
        if self.junk():
            self.reset_transaction()
            self.reply("250 2.0.0 Ok")

    def noop(self, args: bytes) -> None:
        self.junk_reply("250 2.0.0 Ok")

    def quit_command(self, args: bytes) -> None:
        self.quit(b"221 2.0.0 Bye\r\n")

    def help_command(self, args: bytes) -> None:
        self.junk_reply("214 2.0.0 Commands: EHLO HELO STARTTLS AUTH MAIL RCPT DATA RSET NOOP QUIT")

    def vrfy(self, args: bytes) -> None:
        self.junk_reply("502 5.5.1 Error: command not implemented")

    COMMANDS: dict[bytes, Callable[[SMTPCore, bytes], None]] = {
        b"EHLO": ehlo,
        b"HELO": helo_command,
        b"STARTTLS": starttls,
        b"AUTH": auth,
        b"MAIL": mail_command,
        b"RCPT": rcpt_command,
        b"DATA": data,
        b"BDAT": data,
        b"RSET": rset,
        b"NOOP": noop,
        b"QUIT": quit_command,
        b"HELP": help_command,
        b"VRFY": vrfy,
        b"EXPN": vrfy,
    }
    """What each command (its verb in upper case) does before login."""

    REFUSALS = {
        b"AUTH": (
            (lambda c: not c.mechanisms(), "503 5.5.1 Error: authentication not enabled"),
            (lambda c: c.tls_required(), "530 5.7.0 Must issue a STARTTLS command first"),
            (lambda c: c.helo is None, "503 5.5.1 Error: send EHLO first"),
            (lambda c: c.mail is not None, "503 5.5.1 Error: MAIL transaction in progress"),
        ),
        b"MAIL": (
            (lambda c: "none" not in c.config.auth, "530 5.7.0 Authentication required"),
            (lambda c: c.tls_required(), "530 5.7.0 Must issue a STARTTLS command first"),
            (lambda c: c.helo is None, "503 5.5.1 Error: send HELO/EHLO first"),
            (lambda c: c.mail is not None, "503 5.5.1 Error: nested MAIL command"),
        ),
        b"RCPT": (
            (lambda c: "none" not in c.config.auth, "530 5.7.0 Authentication required"),
            (lambda c: c.tls_required(), "530 5.7.0 Must issue a STARTTLS command first"),
            (lambda c: c.mail is None, "503 5.5.1 Error: need MAIL command"),
        ),
        **dict.fromkeys(
            (b"DATA", b"BDAT"),
            (
                (lambda c: "none" not in c.config.auth, "530 5.7.0 Authentication required"),
                (lambda c: c.mail is None, "503 5.5.1 Error: need MAIL command"),
            ),
        ),
    }
    """Why a mail command cannot be taken in the session's state (see `FrontEndCore.REFUSALS`)."""

    # Refusals

    def refused(self, reject: Reject) -> list[Event]:
        """The Router refused the recipient being routed (auth "none"), or the login."""
        if self.rcpt is None:
            return super().refused(reject)
        # A refused recipient is not a failed login: the transaction goes on.
        self.machine.fire(Input.REFUSED)
        self.rcpt = None
        refusal = self.refuse_recipient(reject)
        self.send(refusal.reply)
        if refusal.end is not None:
            self.close(*refusal.end)
            return self._flush()
        self.last_failure = ("rejected", reject.message)
        return self._resume()

    def refuse_recipient(self, reject: Reject) -> RecipientRefusal:
        """
        A RCPT the Router refused (after `reject.wait`, which the caller waits), before
        login or, vetting every recipient, while relaying: the reply is the Reject's
        code when SMTP allows one here (else `550 5.7.1`) and its message. The session
        ends when the Reject says `close`, and when refused recipients take the client
        past `max_junk_commands`: each cost a Router question, and no upstream saw it to
        count it (Postfix's `smtpd_hard_error_limit`). Counts it; changes no state.
        """
        refusal = f"{reply_code(reject.code, '550 5.7.1')} {printable(reject.message)}\r\n".encode()
        if reject.close:
            return RecipientRefusal(refusal, ("rejected", reject.message))
        self.junk_commands += 1
        limit = self.config.max_junk_commands
        if self.junk_commands <= limit:
            return RecipientRefusal(refusal)
        if self.machine.state is State.RELAYING:
            goodbye = TOO_MANY_REFUSED.format(**self.reply_fields()).encode()
            return RecipientRefusal(refusal + goodbye, ("protocol-error", f"more than {limit} recipients refused"))
        return RecipientRefusal(
            refusal + self.text("too_many_junk"),
            ("protocol-error", f"more than {limit} commands that achieve nothing before login"),
        )

    def login_failed(self, reject: Reject) -> None:
        self.authenticating = False
        self.reply(f"{reply_code(reject.code, '535 5.7.8')} {printable(reject.message)}")

    def temporarily_failed(self, outcome: str) -> None:
        self.authenticating = False
        self.rcpt = None
        super().temporarily_failed(outcome)


def reply_code(code: str | int | None, default: str) -> str:
    """The reply code (and enhanced code) a Reject asks for, when it is one SMTP allows
    here: a 4xx or 5xx; anything else gets `default`."""
    if isinstance(code, int):
        code = str(code)
    if isinstance(code, str) and _REPLY_CODE.fullmatch(code) and code[0] in "45":
        return code
    return default
