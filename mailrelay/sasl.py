"""
SASL, both ways: the mechanisms a client may authenticate to mailrelay with, and the
responses mailrelay sends when it authenticates to an upstream for the client.

Client side, a mechanism is a generator: it yields each challenge (raw bytes, before
base64) and is sent each decoded response; it returns the `Credentials` the Router is
asked about. Protocol front-ends do the framing (`334 `, `+ `), the base64 and the
replies; `Exchange` drives a mechanism for them:

    exchange = Exchange("plain", initial_response, context)
    step = exchange.start()            # a challenge (bytes) or Credentials
    step = exchange.respond(line)      # for each line the client answers a challenge with

Malformed input raises `SASLSyntaxError` (the protocol's syntax reply), a `*` line
`SASLCancelled`, and an exchange that is well formed but cannot succeed `SASLRefused`,
which is answered as a failed login and counts as one: EXTERNAL without a verified
certificate, and an authorization identity other than the one authenticated (PLAIN's
authzid naming another user, EXTERNAL's naming anyone but the certificate's subject).
A client logs in as the identity it proved, never as one it merely names.

The password is the mechanism's secret as the client sent it: the password for PLAIN
and LOGIN, the hex digest for CRAM-MD5 (with the challenge as `salt`), the bearer
token for XOAUTH2 and OAUTHBEARER, nothing for EXTERNAL.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
import time
from collections.abc import Callable, Generator

import attrs

from .router import ClientCertificate

MECHANISMS = ("plain", "login", "cram-md5", "xoauth2", "oauthbearer", "external")
"""Every mechanism a listener's `auth` may name, in the order they are advertised."""

MAX_RESPONSE = 16384
"""Longest decoded response accepted (OAuth tokens reach a few kilobytes)."""


class SASLSyntaxError(Exception):
    """The client's response is malformed; the message says how (safe to show it)."""


class SASLCancelled(SASLSyntaxError):
    """The client answered a challenge with `*`."""

    def __init__(self) -> None:
        super().__init__("authentication cancelled")


class SASLRefused(Exception):
    """The exchange is well formed but cannot authenticate anyone (a failed login)."""


@attrs.frozen(kw_only=True)
class Credentials:
    """What a client authenticated with; `password` stays out of `repr()`."""

    user: str | None
    password: str | None = attrs.field(default=None, repr=False)
    method: str
    salt: str | None = None


@attrs.frozen(kw_only=True)
class Context:
    """What mechanisms need to know about the session."""

    hostname: str
    """Mailrelay's name, in the CRAM-MD5 challenge."""
    client_cert: ClientCertificate | None = None
    """The client's verified certificate, for EXTERNAL."""
    now: Callable[[], float] = time.time


Steps = Generator[bytes, bytes, Credentials]


# -- base64 framing ---------------------------------------------------------------------


def decode(data: bytes) -> bytes:
    """A base64 response (or initial response, where `=` means empty), strictly decoded."""
    data = data.strip(b" \t")
    if data == b"=":
        return b""
    if len(data) > MAX_RESPONSE * 4 // 3 + 4:
        raise SASLSyntaxError("response too long")
    try:
        decoded = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise SASLSyntaxError("invalid base64 in the response") from None
    if len(decoded) > MAX_RESPONSE:  # the length check above lets up to 2 more bytes through
        raise SASLSyntaxError("response too long")
    return decoded


def encode(data: bytes) -> bytes:
    """Base64 of a challenge or of an upstream response, on one line."""
    return base64.b64encode(data)


def _text(data: bytes, what: str) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise SASLSyntaxError(f"{what} is not UTF-8") from None
    if "\0" in text or "\r" in text or "\n" in text or (what == "user name" and any(ord(c) < 32 for c in text)):
        # A user name with control characters would break the upstream's framing
        # (XOAUTH2 separates fields with ^A).
        raise SASLSyntaxError(f"{what} contains control characters")
    return text


# -- client-side mechanisms -----------------------------------------------------------------


def plain(initial: bytes | None, context: Context) -> Steps:
    """RFC 4616: `[authzid] NUL authcid NUL passwd`."""
    response = initial if initial is not None else (yield b"")
    parts = response.split(b"\0")
    if len(parts) != 3:
        raise SASLSyntaxError("PLAIN response is not authzid NUL user NUL password")
    authzid, user, password = (
        _text(p, name) for p, name in zip(parts, ("authorization identity", "user name", "password"), strict=True)
    )
    if not user:
        raise SASLSyntaxError("empty user name")
    if authzid and authzid != user:
        # Acting as another user needs the upstream's consent, which a proxy cannot give.
        # Well formed, so not a syntax error: a failed login (IMAP NO, POP3 -ERR, SMTP 535).
        raise SASLRefused("an authorization identity other than the user is not supported")
    return Credentials(user=user, password=password, method="plain")


def login(initial: bytes | None, context: Context) -> Steps:
    """The LOGIN mechanism (draft-murchison-sasl-login): user, then password."""
    user = _text(initial if initial is not None else (yield b"Username:"), "user name")
    if not user:
        raise SASLSyntaxError("empty user name")
    password = _text((yield b"Password:"), "password")
    return Credentials(user=user, password=password, method="login")


CRAM_RESPONSE = re.compile(rb"(.+) ([0-9a-fA-F]{32})", re.DOTALL)


def cram_challenge(context: Context) -> str:
    """`<random.unixtime@hostname>` (RFC 2195), the form nginx sends as Auth-Salt."""
    return f"<{secrets.randbits(63)}.{int(context.now())}@{context.hostname}>"


def cram_md5(initial: bytes | None, context: Context) -> Steps:
    """RFC 2195: the client answers `user SP hex(HMAC-MD5(password, challenge))`."""
    if initial is not None:
        raise SASLSyntaxError("CRAM-MD5 takes no initial response")
    challenge = cram_challenge(context)
    match = CRAM_RESPONSE.fullmatch((yield challenge.encode()))
    if match is None:
        raise SASLSyntaxError("CRAM-MD5 response is not user SP 32-hex-digits")
    user = _text(match[1], "user name")
    return Credentials(user=user, password=match[2].decode().lower(), method="cram-md5", salt=challenge)


def _bearer(fields: dict[str, str], mechanism: str) -> str:
    auth = fields.get("auth", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise SASLSyntaxError(f"{mechanism} response has no `auth=Bearer <token>`")
    return token


def _kvpairs(data: bytes, mechanism: str) -> dict[str, str]:
    if not data.endswith(b"\x01\x01"):
        raise SASLSyntaxError(f"{mechanism} response does not end with ^A^A")
    fields = {}
    for pair in data[:-2].split(b"\x01"):
        key, sep, value = pair.partition(b"=")
        if not sep:
            raise SASLSyntaxError(f"{mechanism} response has a field without `=`")
        fields[_text(key, "field name")] = _text(value, "field value")
    return fields


def xoauth2(initial: bytes | None, context: Context) -> Steps:
    """Google's XOAUTH2: `user=U ^A auth=Bearer T ^A ^A`."""
    response = initial if initial is not None else (yield b"")
    fields = _kvpairs(response, "XOAUTH2")
    user = fields.get("user", "")
    if not user:
        raise SASLSyntaxError("XOAUTH2 response names no user")
    return Credentials(user=user, password=_bearer(fields, "XOAUTH2"), method="xoauth2")


GS2_HEADER = re.compile(rb"([ny]|p=[^,]*),(?:a=([^,]*))?,\x01")  # with the ^A that ends it (RFC 7628 3.1)


def oauthbearer(initial: bytes | None, context: Context) -> Steps:
    """RFC 7628: `n,a=user, ^A host=... ^A auth=Bearer T ^A ^A`."""
    response = initial if initial is not None else (yield b"")
    header = GS2_HEADER.match(response)
    if header is None:
        raise SASLSyntaxError("OAUTHBEARER response has no GS2 header")
    if header[1].startswith(b"p="):
        raise SASLSyntaxError("OAUTHBEARER channel binding is not supported")
    fields = _kvpairs(response[header.end() :], "OAUTHBEARER")
    # RFC 5801 escapes `,` and `=` in the authzid as =2C and =3D.
    user = _text(header[2] or b"", "user name").replace("=2C", ",").replace("=3D", "=")
    return Credentials(user=user or None, password=_bearer(fields, "OAUTHBEARER"), method="oauthbearer")


def external(initial: bytes | None, context: Context) -> Steps:
    """RFC 4422 EXTERNAL: the verified client certificate authenticates, and its subject
    is the user. The response is an optional authorization identity: empty, or the
    subject itself; any other is refused, as a certificate proves one identity only (a
    client holding bob's certificate must not log in as alice by naming her)."""
    response = initial if initial is not None else (yield b"")
    if context.client_cert is None:
        raise SASLRefused("EXTERNAL needs a verified client certificate")
    subject = context.client_cert.subject
    authzid = _text(response, "authorization identity")
    if authzid and authzid != subject:
        raise SASLRefused("the client certificate does not authorize that identity")
    if any(c in subject for c in "\0\r\n"):
        # The subject is the upstream login's user name: a line break in it would end a
        # POP3 USER command early and start another. (Other control characters are
        # harmless there, and escaped in log lines.)
        raise SASLRefused("the client certificate's subject holds a line break or NUL")
    return Credentials(user=subject, method="external")


def password_login(user: bytes, password: bytes) -> Credentials:
    """The credentials of a protocol's own cleartext login (IMAP LOGIN, POP3 USER and
    PASS), checked like PLAIN's; the method is reported as "plain", as nginx does."""
    name = _text(user, "user name")
    if not name:
        raise SASLSyntaxError("empty user name")
    return Credentials(user=name, password=_text(password, "password"), method="plain")


MECHANISM_STEPS: dict[str, Callable[[bytes | None, Context], Steps]] = {
    "plain": plain,
    "login": login,
    "cram-md5": cram_md5,
    "xoauth2": xoauth2,
    "oauthbearer": oauthbearer,
    "external": external,
}


class Exchange:
    """One client authentication in progress."""

    def __init__(self, mechanism: str, initial: bytes | None, context: Context) -> None:
        """`initial` is the initial response as sent (base64, `=` for empty), or None."""
        self.mechanism = mechanism
        self._initial = initial
        self._context = context
        self._steps: Steps | None = None

    def start(self) -> bytes | Credentials:
        """The first challenge, or the credentials when the initial response said it all."""
        initial = None if self._initial is None else decode(self._initial)
        self._steps = MECHANISM_STEPS[self.mechanism](initial, self._context)
        return self._advance(None)

    def respond(self, line: bytes) -> bytes | Credentials:
        """The client's answer to the last challenge, as the line it sent."""
        if line.strip() == b"*":
            raise SASLCancelled()
        return self._advance(decode(line))

    def _advance(self, response: bytes | None) -> bytes | Credentials:
        assert self._steps is not None
        try:
            return self._steps.send(response)  # type: ignore[arg-type]  # None starts it
        except StopIteration as done:
            return done.value


# -- upstream side: what mailrelay sends --------------------------------------------------


def plain_response(user: str, password: str) -> bytes:
    """The PLAIN response that logs in as `user` (no authorization identity)."""
    return b"\0" + user.encode() + b"\0" + password.encode()


def xoauth2_response(user: str, token: str) -> bytes:
    """Raises ValueError for a user or token that would break the ^A framing."""
    if "\x01" in user or "\x01" in token:
        raise ValueError("XOAUTH2 cannot carry ^A in a user name or token")
    return b"user=" + user.encode() + b"\x01auth=Bearer " + token.encode() + b"\x01\x01"


def oauthbearer_response(user: str | None, token: str) -> bytes:
    authzid = (user or "").replace("=", "=3D").replace(",", "=2C")
    return (
        f"n,a={authzid},\x01auth=Bearer {token}\x01\x01".encode() if authzid else f"n,,\x01auth=Bearer {token}\x01\x01".encode()
    )
