"""
The SMTP front-end: what a client (a mail user agent on 587 or 465, or a mail server
on 25) hears from mailrelay before it is routed.

    220 greeting -> EHLO -> [STARTTLS -> TLS -> EHLO] -> AUTH ... -> routed -> 235 -> spliced
                                                  or, with auth "none":
                                           MAIL FROM -> RCPT TO -> routed -> spliced

With a login, the Router is asked once the SASL exchange is complete, mailrelay logs in
upstream (`smtp_upstream`), and only when the upstream has accepted does the client
get `235`. With `auth = ["none"]` the Router is asked at the first RCPT TO with the
HELO name and the envelope; the upstream hears them replayed and its answer to that
RCPT is the client's.

Replies carry enhanced status codes (RFC 2034, 3463). Pre-login commands may be
pipelined (RFC 2920): they are answered in order, and what the client sends behind the
command that hands it on reaches the upstream after the login.

Junk (`max_junk_commands`): NOOP, RSET, HELP, VRFY and EXPN, an EHLO or HELO after the
first two (one before STARTTLS and one after are what a client needs), a SASL exchange
the client cancels, and any command refused for the session's state (AUTH before EHLO,
MAIL without a login, a second STARTTLS...). With `auth = ["none"]` the
`login_deadline` runs until the first RCPT the Router accepts.
"""

from __future__ import annotations

import re
from typing import Any

from ..connector import LoginStep, StartTLSStep, Upstream
from ..router import Reject, RouteRequest
from ..sasl import encode
from ..splice import SpliceResult
from .base import LineFrontEnd, printable
from .smtp_relay import SMTPRelay
from .smtp_stream import MAIL_ARGUMENTS, MAIL_SYNTAX, RCPT_ARGUMENTS, RCPT_SYNTAX
from .smtp_upstream import ClientFacts, SMTPUpstreamLogin

DEFAULT_CAPABILITIES = ("PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES")

_SIZE = re.compile(rb" SIZE=([0-9]{1,20})(?= |$)", re.IGNORECASE)
_REPLY_CODE = re.compile(r"[245][0-9][0-9]( [245]\.[0-9]{1,3}\.[0-9]{1,3})?")


class SMTPFrontEnd(LineFrontEnd):
    """One SMTP client before it is routed."""

    helo: bytes | None = None
    esmtp = False
    mail: bytes | None = None
    """The MAIL command of the transaction in progress (auth "none"), as typed."""
    rcpt: bytes | None = None
    """The RCPT command being vetted by the Router."""
    authenticating = False
    hellos = 0
    """Well-formed EHLO and HELO commands so far (the first two are not junk)."""
    _upstream_login: SMTPUpstreamLogin | None = None
    busy_reply = "421 4.7.0 {hostname} Error: too many connections, try again later"

    COMMANDS = {
        b"EHLO": "smtp_EHLO",
        b"HELO": "smtp_HELO",
        b"STARTTLS": "smtp_STARTTLS",
        b"AUTH": "smtp_AUTH",
        b"MAIL": "smtp_MAIL",
        b"RCPT": "smtp_RCPT",
        b"DATA": "smtp_DATA",
        b"BDAT": "smtp_DATA",
        b"RSET": "smtp_RSET",
        b"NOOP": "smtp_NOOP",
        b"QUIT": "smtp_QUIT",
        b"HELP": "smtp_HELP",
        b"VRFY": "smtp_VRFY",
        b"EXPN": "smtp_VRFY",
    }

    def reply(self, line: str) -> None:
        self.send(line.encode("utf-8") + b"\r\n")

    def junk_reply(self, line: str) -> None:
        """Answer a command that achieves nothing (see `junk()`) with `line`."""
        if self.junk():
            self.reply(line)

    @property
    def hostname(self) -> str:
        return self.config.hostname

    def greet(self) -> None:
        self.reply(f"220 {self.hostname} ESMTP ready")

    def line_received(self, line: bytes) -> None:
        verb, _, args = line.partition(b" ")
        method = self.COMMANDS.get(verb.upper())
        if b"\0" in line or b"\r" in line:
            # Some servers end a line at a bare CR: such a line means different things to different readers.
            self.error(b"500 5.5.2 Error: bare CR or NUL character in command\r\n")
        elif method is None:
            self.error(b"500 5.5.2 Error: command not recognized\r\n")
        else:
            getattr(self, method)(args.strip(b" "))

    def line_too_long(self) -> None:
        self.error(b"500 5.5.6 Error: line too long\r\n")

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

    def smtp_EHLO(self, args: bytes) -> None:
        self._hello(args, esmtp=True)

    def smtp_HELO(self, args: bytes) -> None:
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

    def smtp_STARTTLS(self, args: bytes) -> None:
        if args:
            self.error(b"501 5.5.4 Syntax: STARTTLS\r\n")
        elif self.tls is not None:
            self.junk_reply("503 5.5.1 Error: TLS already active")
        elif not self.can_start_tls():
            self.junk_reply("502 5.5.1 Error: STARTTLS not available")
        else:
            self.start_tls(b"220 2.0.0 Ready to start TLS\r\n")

    def tls_started(self) -> None:
        self.helo, self.esmtp = None, False
        self.reset_transaction()

    # AUTH

    def smtp_AUTH(self, args: bytes) -> None:
        mechanisms = self.mechanisms()
        if not mechanisms:
            self.junk_reply("503 5.5.1 Error: authentication not enabled")
        elif self.tls_required():
            self.junk_reply("530 5.7.0 Must issue a STARTTLS command first")
        elif self.helo is None:
            self.junk_reply("503 5.5.1 Error: send EHLO first")
        elif self.mail is not None:
            self.junk_reply("503 5.5.1 Error: MAIL transaction in progress")
        elif not args:
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

    def login(self, credentials: Any, **facts: Any) -> None:
        super().login(credentials, helo=self.helo_text(), **facts)

    def helo_text(self) -> str | None:
        return self.helo.decode("utf-8", "replace") if self.helo is not None else None

    def logged_in(self, upstream: Upstream) -> None:
        super().logged_in(upstream)
        if self.authenticating:
            self.reply("235 2.7.0 Authentication successful")

    # auth "none": the envelope

    def smtp_MAIL(self, args: bytes) -> None:
        if "none" not in self.config.auth:
            self.junk_reply("530 5.7.0 Authentication required")
        elif self.tls_required():
            self.junk_reply("530 5.7.0 Must issue a STARTTLS command first")
        elif self.helo is None:
            self.junk_reply("503 5.5.1 Error: send HELO/EHLO first")
        elif self.mail is not None:
            self.junk_reply("503 5.5.1 Error: nested MAIL command")
        elif (match := MAIL_ARGUMENTS.fullmatch(args)) is None:
            self.error(MAIL_SYNTAX)
        elif self.config.size and (size := _SIZE.search(match[2] or b"")) and int(size[1]) > self.config.size:
            self.reply("552 5.3.4 Message size exceeds fixed limit")
        else:
            self.mail = b"MAIL " + args
            self.reply("250 2.1.0 Ok")

    def smtp_RCPT(self, args: bytes) -> None:
        if "none" not in self.config.auth:
            self.junk_reply("530 5.7.0 Authentication required")
        elif self.tls_required():
            self.junk_reply("530 5.7.0 Must issue a STARTTLS command first")
        elif self.mail is None:
            self.junk_reply("503 5.5.1 Error: need MAIL command")
        elif RCPT_ARGUMENTS.fullmatch(args) is None:
            self.error(RCPT_SYNTAX)
        else:
            self.rcpt = b"RCPT " + args
            self.begin(
                auth_method="none",
                helo=self.helo_text(),
                mail_from=self.mail.decode("utf-8", "replace"),
                rcpt_to=self.rcpt.decode("utf-8", "replace"),
            )

    def smtp_DATA(self, args: bytes) -> None:
        if "none" not in self.config.auth:
            self.junk_reply("530 5.7.0 Authentication required")
        elif self.mail is None:
            self.junk_reply("503 5.5.1 Error: need MAIL command")
        else:
            self.junk_reply("554 5.5.1 Error: no valid recipients")

    # Other commands

    def smtp_RSET(self, args: bytes) -> None:
        if self.junk():
            self.reset_transaction()
            self.reply("250 2.0.0 Ok")

    def smtp_NOOP(self, args: bytes) -> None:
        self.junk_reply("250 2.0.0 Ok")

    def smtp_QUIT(self, args: bytes) -> None:
        self.quit(b"221 2.0.0 Bye\r\n")

    def smtp_HELP(self, args: bytes) -> None:
        self.junk_reply("214 2.0.0 Commands: EHLO HELO STARTTLS AUTH MAIL RCPT DATA RSET NOOP QUIT")

    def smtp_VRFY(self, args: bytes) -> None:
        self.junk_reply("502 5.5.1 Error: command not implemented")

    # Routing

    def upstream_steps(self, request: RouteRequest) -> tuple[LoginStep | None, StartTLSStep | None]:
        envelope = (self.mail, self.rcpt) if request.auth_method == "none" and self.mail and self.rcpt else None
        steps = self._upstream_login = SMTPUpstreamLogin(
            ClientFacts(
                hostname=self.hostname.encode("idna"),
                helo=self.helo,
                esmtp=self.esmtp,
                client=self.client,
                local=self.local,
                request=request,
                envelope=envelope,
            )
        )
        return steps.login, steps.starttls

    async def relay(self, upstream: Upstream) -> SpliceResult:
        """Not a blind splice: the session goes on through `SMTPRelay`, which lets no
        XCLIENT, smuggled message or unvetted recipient reach the upstream."""
        assert self._upstream_login is not None
        envelope = self.mail is not None and self.rcpt is not None and not self.authenticating
        relay = SMTPRelay(
            self,
            upstream,
            chunking=self._upstream_login.offers("CHUNKING"),
            helo=self.helo,
            mail=self.mail if envelope else None,
            rcpt_owed=envelope,
            vet=envelope and self.config.vet_recipients == "all",
        )
        self._splice = relay
        return await relay.run()

    def recipient_refusal(self, reject: Reject) -> bytes:
        """The reply to a RCPT the Router refused."""
        return f"{_reply_code(reject.code, '550 5.7.1')} {printable(reject.message)}\r\n".encode()

    def refuse_recipient(self, reject: Reject) -> None:
        self.send(self.recipient_refusal(reject))

    def refused(self, reject: Reject) -> None:
        if self.rcpt is not None:
            # A refused recipient is not a failed login: the transaction goes on.
            self.rcpt = None
            self.refuse_recipient(reject)
            if reject.close:
                self.close("rejected", reject.message)
            elif self.junk():  # each one cost a Router question: bounded as NOOPs are
                self.last_failure = ("rejected", reject.message)
                self.resume()
            return
        super().refused(reject)

    def login_failed(self, reject: Reject) -> None:
        self.authenticating = False
        self.reply(f"{_reply_code(reject.code, '535 5.7.8')} {printable(reject.message)}")

    def too_many_attempts(self) -> None:
        self.reply(f"421 4.7.0 {self.hostname} Error: too many failed logins, closing connection")

    def temporarily_failed(self, outcome: str) -> None:
        self.authenticating = False
        self.rcpt = None
        if outcome == "throttled":
            self.reply("421 4.7.0 Too many failed logins, try again later")
        elif outcome == "upstream-unavailable":
            self.reply("451 4.4.1 Mail server temporarily unavailable, try again later")
        else:
            self.reply("451 4.3.0 Temporary failure, try again later")

    def timed_out(self, outcome: str, reason: str) -> None:
        self.reply(f"421 4.4.2 {self.hostname} Error: timeout exceeded")
        super().timed_out(outcome, reason)

    def too_many_junk_commands(self) -> None:
        self.reply(f"421 4.7.0 {self.hostname} Error: too many commands")
        super().too_many_junk_commands()

    def too_many_errors(self) -> None:
        self.reply(f"421 4.7.0 {self.hostname} Error: too many errors")
        super().too_many_errors()


def _reply_code(code: str | int | None, default: str) -> str:
    """The reply code (and enhanced code) a Reject asks for, when it is one SMTP allows
    here: a 4xx or 5xx; anything else gets `default`."""
    if isinstance(code, int):
        code = str(code)
    if isinstance(code, str) and _REPLY_CODE.fullmatch(code) and code[0] in "45":
        return code
    return default
