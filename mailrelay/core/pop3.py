"""
POP3 as a mail client (on 110 or 995) speaks it to mailrelay before it is routed.

    +OK greeting [<timestamp> for APOP] -> [STLS -> TLS] -> USER/PASS | APOP | AUTH
        -> routed, logged in upstream (`pop3_login`) -> the upstream's +OK -> spliced

Before login a client may say CAPA, STLS, USER, PASS, APOP, AUTH, NOOP and QUIT; anything
else is `-ERR` and counts towards `max_errors`, as does a command line (its CRLF or LF
taken off) that still holds a CR or a NUL, which is never acted on: no bare CR reaches
an upstream or an auth service. Replies carry RFC 2449/3206 response codes: `-ERR [AUTH]`
for a refused login (after the Reject's delay; the connection closes after
`max_attempts` of them), `-ERR [SYS/TEMP]` for a temporary failure. Command lines may be
as long as OAuth tokens need (`max_line_length`), not nginx's 128 bytes.

Junk (`max_junk_commands`): NOOP, CAPA and a bare AUTH (the mechanism list) after the
first two of each (one before STLS, one after), a USER that replaces one awaiting its
PASS, an AUTH the client cancels, and a command refused for the session's state (STLS
when not available, a login before TLS, PASS without USER...).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable

from .. import sasl
from ..router import Reject
from .frontend import FrontEndCore, Replies, printable

DEFAULT_CAPABILITIES = ("TOP", "UIDL")
"""Words advertised in CAPA that describe the upstream (the `capabilities` default)."""
OWN_CAPABILITIES = ("RESP-CODES", "AUTH-RESP-CODE")
"""What mailrelay's POP3 front-end itself implements before login."""

_APOP = re.compile(rb"(.+) ([0-9a-fA-F]{32})", re.DOTALL)
_RESPONSE_CODE = re.compile(r"[A-Z][A-Z0-9/-]{0,39}")

PLAINTEXT_REFUSED = "-ERR [AUTH] Use STLS first: logins are not accepted before TLS"

REPLIES = Replies(
    timeout="-ERR Disconnected for inactivity",
    too_many_junk="-ERR Too many commands",
    too_many_errors="-ERR Too many invalid commands",
    too_many_attempts=None,  # the last -ERR [AUTH] says it; the close follows
    throttled="-ERR [SYS/TEMP] Too many failed logins, try again later",
    upstream_unavailable="-ERR [SYS/TEMP] Mail server temporarily unavailable, try again later",
    temporary="-ERR [SYS/TEMP] Temporary failure, try again later",
    line_too_long="-ERR Line too long",
    bare_cr_or_nul="-ERR Bare CR or NUL character in command",
    unknown_command="-ERR Unknown command or not valid before login",
    busy="-ERR [SYS/TEMP] Too many connections, try again later",
)


class POP3Core(FrontEndCore):
    """One POP3 client before it is routed."""

    protocol = "pop3"
    replies = REPLIES
    user: bytes | None = None
    """The name a USER command gave, awaiting its PASS."""
    timestamp: str | None = None
    """The greeting's APOP timestamp, when APOP is allowed."""
    now: Callable[[], float] = staticmethod(lambda: 0.0)
    """The time, for the APOP timestamp (the shell gives its clock's)."""
    capa_commands = 0
    mechanism_lists = 0

    def reply(self, line: bytes) -> None:
        self.send(line + b"\r\n")

    def junk_reply(self, line: bytes) -> None:
        """Answer a command that achieves nothing (see `junk()`) with `line`."""
        if self.junk():
            self.reply(line)

    def greeting(self) -> bytes:
        greeting = b"+OK " + self.config.hostname.encode() + b" POP3 ready"
        if "apop" in self.config.auth:
            # RFC 1939 7: unique per greeting; nginx's form, which auth services know.
            self.timestamp = f"<{secrets.randbits(63)}.{int(self.now())}@{self.config.hostname}>"
            greeting += b" " + self.timestamp.encode()
        return greeting + b"\r\n"

    def capabilities(self) -> list[str]:
        listed = [*(DEFAULT_CAPABILITIES if self.config.capabilities is None else self.config.capabilities), *OWN_CAPABILITIES]
        if not self.tls_required():
            if self.password_logins():
                listed.append("USER")
            mechanisms = self.mechanisms()
            if mechanisms:
                listed.append("SASL " + " ".join(m.upper() for m in mechanisms))
        if self.can_start_tls():
            listed.append("STLS")
        return list(dict.fromkeys(listed))  # a configured word mailrelay lists anyway is said once

    # Commands

    def capa(self, args: bytes) -> None:
        self.capa_commands += 1
        if self.capa_commands > 2 and not self.junk():
            return
        self.send(b"+OK Capability list follows\r\n" + b"".join(c.encode() + b"\r\n" for c in self.capabilities()) + b".\r\n")

    def noop(self, args: bytes) -> None:
        self.junk_reply(b"+OK")

    def quit_command(self, args: bytes) -> None:
        self.quit(b"+OK Bye\r\n")

    def stls(self, args: bytes) -> None:
        self.start_tls(b"+OK Begin TLS negotiation now\r\n")

    def tls_started(self) -> None:
        self.user = None

    def user_command(self, args: bytes) -> None:
        if not args:
            self.error(b"-ERR USER takes a user name\r\n")
        elif self.user is None or self.junk():
            self.user = args
            self.reply(b"+OK")

    def pass_command(self, args: bytes) -> None:
        assert self.user is not None  # REFUSALS
        user, self.user = self.user, None
        try:
            credentials = sasl.password_login(user, args)
        except sasl.SASLSyntaxError as e:
            self.error(b"-ERR " + _text(f"Invalid login: {e}") + b"\r\n")
            return
        self.login(credentials)

    def apop(self, args: bytes) -> None:
        assert self.timestamp is not None  # REFUSALS
        match = _APOP.fullmatch(args)
        if match is None:
            self.error(b"-ERR APOP takes a user name and a 32-digit hexadecimal digest\r\n")
        else:
            try:
                user = sasl.password_login(match[1], b"").user
            except sasl.SASLSyntaxError as e:
                self.error(b"-ERR " + _text(f"Invalid APOP: {e}") + b"\r\n")
                return
            self.login(sasl.Credentials(user=user, password=match[2].decode().lower(), method="apop", salt=self.timestamp))

    def auth(self, args: bytes) -> None:
        mechanisms = self.mechanisms()
        if not args:
            # Not in RFC 5034, but what clients probe with (and nginx and Dovecot answer).
            self.mechanism_lists += 1
            if self.mechanism_lists > 2 and not self.junk():
                return
            self.send(b"+OK\r\n" + b"".join(m.upper().encode() + b"\r\n" for m in mechanisms) + b".\r\n")
            return
        name, _, initial = args.partition(b" ")
        mechanism = name.decode("ascii", "replace").lower()
        if mechanism not in mechanisms:
            self.junk_reply(b"-ERR Unsupported authentication mechanism")
            return
        self.authenticate(mechanism, initial.strip(b" ") or None)

    COMMANDS: dict[bytes, Callable[[POP3Core, bytes], None]] = {
        b"CAPA": capa,
        b"STLS": stls,
        b"USER": user_command,
        b"PASS": pass_command,
        b"APOP": apop,
        b"AUTH": auth,
        b"NOOP": noop,
        b"QUIT": quit_command,
    }

    REFUSALS = {
        b"STLS": (
            (lambda c: c.tls is not None, "-ERR TLS is already active"),
            (lambda c: not c.can_start_tls(), "-ERR STLS is not available"),
        ),
        b"USER": (
            (lambda c: c.tls_required(), PLAINTEXT_REFUSED),
            (lambda c: not c.password_logins(), "-ERR USER is disabled: use AUTH"),
        ),
        b"PASS": (
            (lambda c: c.tls_required(), PLAINTEXT_REFUSED),
            (lambda c: c.user is None, "-ERR Send USER first"),
        ),
        b"APOP": (
            (lambda c: c.tls_required(), PLAINTEXT_REFUSED),
            (lambda c: c.timestamp is None, "-ERR APOP is not available"),
        ),
        b"AUTH": ((lambda c: c.tls_required(), PLAINTEXT_REFUSED),),
    }
    """Why a command cannot be taken in the session's state (see `FrontEndCore.REFUSALS`)."""

    def sasl_challenge(self, challenge: bytes) -> None:
        self.reply(b"+ " + sasl.encode(challenge))

    def sasl_cancelled(self) -> None:
        self.junk_reply(b"-ERR Authentication cancelled")

    def sasl_malformed(self, why: str) -> None:
        self.error(b"-ERR " + _text(f"Invalid authentication: {why}") + b"\r\n")

    def login_failed(self, reject: Reject) -> None:
        code = reject.code if isinstance(reject.code, str) and _RESPONSE_CODE.fullmatch(reject.code.upper()) else "AUTH"
        self.reply(b"-ERR [" + code.upper().encode() + b"] " + _text(reject.message))


def _text(text: str) -> bytes:
    return printable(text).encode("ascii")
