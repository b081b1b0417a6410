"""
The auth_http request: the headers nginx's mail proxy sends for a login, built from a
`RouteRequest` (a pure function; `mailrelay.routers.http` documents each header).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.web.http_headers import Headers

from ..router import RouteRequest

_AUTH_METHODS = {
    "plain": b"plain",
    "login": b"plain",  # nginx reports AUTH LOGIN as plain
    "cram-md5": b"cram-md5",
    "apop": b"apop",
    "external": b"external",
    "none": b"none",
    "xoauth2": b"xoauth2",
    "oauthbearer": b"oauthbearer",
}

_ESCAPED = frozenset(range(0x20)) | {ord(" "), ord("%")}

REQUEST_HEADERS = (
    "Host",
    "Auth-Method",
    "Auth-User",
    "Auth-Pass",
    "Auth-Salt",
    "Auth-Protocol",
    "Auth-Login-Attempt",
    "Client-IP",
    "Client-Host",
    "Auth-SMTP-Helo",
    "Auth-SMTP-From",
    "Auth-SMTP-To",
    "Auth-SSL",
    "Auth-SSL-Protocol",
    "Auth-SSL-Cipher",
    "Auth-SSL-Verify",
    "Auth-SSL-Subject",
    "Auth-SSL-Issuer",
    "Auth-SSL-Serial",
    "Auth-SSL-Fingerprint",
)
"""Every header mailrelay sends itself; a configured extra header may not reuse one."""

RESERVED_HEADERS = frozenset(name.lower() for name in (*REQUEST_HEADERS, "Connection", "Content-Length", "Transfer-Encoding"))
"""The header names (lower case) a configured extra header may not have."""

HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
"""An HTTP header name (RFC 9110's token)."""


def _utf8(value: str) -> bytes:
    try:
        return value.encode("utf-8", "surrogateescape")  # bytes a front-end could not decode, as received
    except UnicodeEncodeError:
        return value.encode("utf-8", "replace")


def escape(value: str) -> bytes:
    """nginx's escaping of Auth-User and Auth-Pass: control bytes, space and `%` as `%XX`."""
    return b"".join(b"%%%02X" % byte if byte in _ESCAPED else bytes((byte,)) for byte in _utf8(value))


def _raw(value: str) -> bytes:
    """A value nginx sends unescaped; a line break (which no front-end lets through)
    becomes a space, as Twisted would write it anyway."""
    return b" ".join(_utf8(value).splitlines())


def auth_request_headers(request: RouteRequest, host: str, extra: Sequence[tuple[str, str]] = ()) -> list[tuple[bytes, bytes]]:
    """The request headers nginx would send for `request`, in its order, then `extra`."""
    method = _AUTH_METHODS[request.auth_method]
    headers = [
        (b"Host", host.encode("ascii")),
        (b"Auth-Method", method),
        (b"Auth-User", escape(request.user or "")),
        (b"Auth-Pass", escape(request.password or "")),
    ]
    if method in (b"cram-md5", b"apop") and request.salt:
        headers.append((b"Auth-Salt", _raw(request.salt)))
    client = request.client[0]
    headers += [
        (b"Auth-Protocol", request.protocol.encode("ascii")),
        (b"Auth-Login-Attempt", b"%d" % request.attempt),
        (b"Client-IP", _raw(client) if isIPAddress(client) or isIPv6Address(client) else b"unix:"),
    ]
    if request.protocol == "smtp":
        headers.append((b"Client-Host", b"[UNAVAILABLE]"))
        if method == b"none":
            headers += [
                (b"Auth-SMTP-Helo", _raw(request.helo or "")),
                (b"Auth-SMTP-From", _raw(request.mail_from or "")),
                (b"Auth-SMTP-To", _raw(request.rcpt_to or "")),
            ]
    if request.tls:
        headers.append((b"Auth-SSL", b"on"))
        if request.tls_version:
            headers.append((b"Auth-SSL-Protocol", _raw(request.tls_version)))
        if request.tls_cipher:
            headers.append((b"Auth-SSL-Cipher", _raw(request.tls_cipher)))
        cert = request.client_cert
        if cert is not None:
            headers += [
                (b"Auth-SSL-Verify", b"SUCCESS"),
                (b"Auth-SSL-Subject", escape(cert.subject)),
                (b"Auth-SSL-Issuer", escape(cert.issuer)),
                (b"Auth-SSL-Serial", _raw(cert.serial)),
                (b"Auth-SSL-Fingerprint", _raw(cert.fingerprint)),
            ]
    headers += [(name.encode("ascii"), _raw(value)) for name, value in extra]
    return headers


class ExactCaseHeaders(Headers):
    """
    Headers written with the spelling given (`Client-IP`, `Auth-SSL`), not Twisted's
    canonical `Client-Ip`: names are case-insensitive, but an auth script written for
    nginx may not know it.
    """

    __slots__ = ("_spelling",)

    def __init__(self, pairs: Iterable[tuple[bytes, bytes]] = ()) -> None:
        super().__init__()
        self._spelling: dict[bytes, bytes] = {}
        for name, value in pairs:
            self.addRawHeader(name, value)
            self._spelling[name.lower()] = name

    def copy(self) -> ExactCaseHeaders:
        new = ExactCaseHeaders()
        new._rawHeaders = {name: list(values) for name, values in self._rawHeaders.items()}
        new._spelling = dict(self._spelling)
        return new

    def getAllRawHeaders(self) -> Any:
        for name, values in super().getAllRawHeaders():
            yield self._spelling.get(name.lower(), name), values
