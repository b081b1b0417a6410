"""
What every protocol's upstream login shares: the error for an upstream that does not
speak as it should, and which credentials and mechanism a passthrough login uses.
"""

from __future__ import annotations

import attrs

from .. import sasl
from ..connector import UpstreamProtocolError as UpstreamProtocolError  # for the login steps
from ..router import Route, RouteRequest

MAX_RESPONSE_LINE = 64 * 1024
"""Longest line an upstream may send during the login (capability lists run long)."""
MAX_RESPONSE_LINES = 100
"""Most lines an upstream may send in answer to one login command."""


@attrs.frozen
class UpstreamCredentials:
    """Who mailrelay logs in as upstream, and how."""

    user: str
    secret: str = attrs.field(repr=False)
    mechanism: str
    """"plain" or "login" (a password: the SASL mechanism, or for IMAP and POP3 the
    protocol's own LOGIN / USER and PASS), or "xoauth2" / "oauthbearer" (a token)."""

    def sasl_response(self) -> bytes:
        """The initial response of a one-step mechanism (PLAIN, XOAUTH2, OAUTHBEARER),
        before base64."""
        if self.mechanism == "xoauth2":
            return sasl.xoauth2_response(self.user, self.secret)
        if self.mechanism == "oauthbearer":
            return sasl.oauthbearer_response(self.user or None, self.secret)
        return sasl.plain_response(self.user, self.secret)


def upstream_credentials(request: RouteRequest, route: Route, alternative: str = "") -> UpstreamCredentials:
    """
    The Route's user and password when it names them, else the client's: a password
    goes up with the Route's `auth_mechanism`, a token in its own mechanism. A client
    that proved itself without revealing a secret (CRAM-MD5, APOP, EXTERNAL) cannot be
    passed through: the Route must supply the password (`alternative` says what else
    the protocol offers).
    """
    user = route.user or request.user or ""
    if route.password is not None:
        return UpstreamCredentials(user, route.password, route.auth_mechanism)
    method = request.auth_method
    if method in ("xoauth2", "oauthbearer"):
        return UpstreamCredentials(user, request.password or "", method)
    if method in ("plain", "login"):
        return UpstreamCredentials(user, request.password or "", route.auth_mechanism)
    raise UpstreamProtocolError(
        f"a {method} login cannot be passed through: the Route must supply the upstream password{alternative}"
    )


def unusable_login(route: Route, protocol: str) -> str | None:
    """Why `route.login` cannot be done in `protocol` (IMAP and POP3 always log in)."""
    if route.login == "xclient":
        return f"login = \"xclient\" is SMTP's; for {protocol} use forward_client = true to pass the client's address"
    if route.login == "none":
        return f'login = "none": a {protocol} upstream needs a login (give the Route a user and password for a master login)'
    return None


def shown(line: bytes) -> str:
    """An upstream's line as a log message quotes it: bounded, escaped."""
    return repr(line[:80])
