"""
The auth_http answer: the response headers of the auth service read into the routes to
try, a `Wait`, or a `Reject` (a pure function; `mailrelay.routers.http` documents each
header and what is refused).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import attrs
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.web.http_headers import Headers

from ..router import AUTH_MECHANISMS, LOGINS, UPSTREAM_TLS, Reject, Route, RouteRequest, RouterError


@attrs.frozen
class Wait:
    """The service answered `Auth-Status: WAIT`: ask again after `seconds`."""

    seconds: float


MAX_AUTH_WAIT = 60.0
"""The longest `Auth-Wait` obeyed, in seconds (for WAIT and for a refusal): a longer one
is taken as this, so that a broken service cannot hold a session for hours."""

_HOST_NAME = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9_-]{1,63}(?<!-))*\.?")
_NUMBER = re.compile(r"[0-9]+(\.[0-9]+)?")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def valid_host(value: str) -> str | None:
    """An IP address (IPv6 with or without brackets, returned without) or a host name;
    None if neither. What `Auth-Server` and the host of `url` may be."""
    if value.startswith("[") and value.endswith("]"):
        return value[1:-1] if isIPv6Address(value[1:-1]) else None
    if isIPAddress(value) or isIPv6Address(value):
        return value
    if len(value) > 253 or not _HOST_NAME.fullmatch(value) or re.fullmatch(r"[0-9.]+", value):
        return None
    return value


def valid_port(value: str) -> int | None:
    """A port number, 1 to 65535, in plain ASCII digits; None otherwise."""
    return int(value) if value.isascii() and value.isdigit() and 0 < int(value) < 65536 else None


def _address(value: str) -> tuple[str, int] | None:
    """`host:port` or `[v6]:port`."""
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
        return (host, p) if sep and isIPv6Address(host) and (p := valid_port(port)) else None
    host, sep, port = value.rpartition(":")
    return (h, p) if sep and ":" not in host and (h := valid_host(host)) and (p := valid_port(port)) else None


class _Answer:
    """The response headers, read one name at a time, each at most once."""

    def __init__(self, headers: Headers | Iterable[tuple[str | bytes, str | bytes]], service: str) -> None:
        # Pairs are kept as given (a `Headers` would turn a CR or LF into a space), so
        # that a value holding one is refused, not quietly changed.
        pairs = headers.getAllRawHeaders() if isinstance(headers, Headers) else ((n, [v]) for n, v in headers)
        self.values: dict[bytes, list[bytes]] = {}
        for name, values in pairs:
            for value in values:
                key = (name.encode("latin-1") if isinstance(name, str) else name).lower()
                self.values.setdefault(key, []).append(value.encode("utf-8") if isinstance(value, str) else value)
        self.service = service

    def error(self, reason: str) -> RouterError:
        return RouterError(f"{self.service}: {reason}")

    def get(self, name: str) -> str | None:
        values = self.values.get(name.lower().encode("ascii"))
        if not values:
            return None
        if len(values) > 1:
            raise self.error(f"answered with {len(values)} {name} headers")
        try:
            value = values[0].decode("utf-8").strip(" \t")
        except UnicodeDecodeError:
            raise self.error(f"answered with a {name} that is not UTF-8") from None
        if _CONTROL.search(value):
            # Never shown: it may be Auth-Pass, and it is not fit for a log line anyway.
            raise self.error(f"answered with control characters in {name}")
        return value

    def invalid(self, name: str, value: str) -> RouterError:
        shown = value if len(value) <= 100 else value[:100] + "..."
        return self.error(f'answered with an invalid {name}: "{shown}"')

    def choice(self, name: str, choices: dict[str, Any], default: Any) -> Any:
        value = self.get(name)
        if value is None:
            return default
        if value not in choices:
            raise self.invalid(name, value)
        return choices[value]

    def seconds(self, name: str) -> float:
        value = self.get(name)
        if value is None:
            return 0.0
        if not _NUMBER.fullmatch(value):
            raise self.invalid(name, value)
        return min(float(value), MAX_AUTH_WAIT)


def parse_auth_response(
    headers: Headers | Iterable[tuple[str | bytes, str | bytes]],
    request: RouteRequest,
    service: str = "auth service",
) -> list[Route] | Wait:
    """
    Read an auth_http answer to `request`: the routes to try, in order, or `Wait`.

    Raises `Reject` when the service refuses the session and `RouterError` (its message
    starting with `service`) when the answer is missing, malformed or incomplete.
    """
    answer = _Answer(headers, service)
    status = answer.get("Auth-Status")
    if status is None:
        raise answer.error("answered without Auth-Status")
    if status == "WAIT":
        return Wait(answer.seconds("Auth-Wait"))
    if status != "OK":
        if not status:
            raise answer.error("answered with an empty Auth-Status")
        wait = answer.seconds("Auth-Wait")
        code = answer.get("Auth-Error-Code") or None
        raise Reject(status, wait=wait, code=code, close=wait == 0)

    server, port = answer.get("Auth-Server"), answer.get("Auth-Port")
    missing = [name for name, value in (("Auth-Server", server), ("Auth-Port", port)) if not value]
    if missing:
        raise answer.error(f"answered OK without {' and '.join(missing)}")
    assert server and port
    host, port_number = valid_host(server), valid_port(port)
    if host is None:
        raise answer.invalid("Auth-Server", server)
    if port_number is None:
        raise answer.invalid("Auth-Port", port)
    addresses = [(host, port_number)]
    fallback = answer.get("Mailrelay-Fallback")
    if fallback is not None:
        for item in fallback.split(","):
            address = _address(item.strip())
            if address is None:
                raise answer.invalid("Mailrelay-Fallback", fallback)
            addresses.append(address)

    server_name = answer.get("Mailrelay-Server-Name")
    if server_name is not None and valid_host(server_name) is None:
        raise answer.invalid("Mailrelay-Server-Name", server_name)
    password = answer.get("Auth-Pass")
    login = answer.choice("Mailrelay-Login", {v: v for v in LOGINS}, "xclient" if request.protocol == "smtp" else "passthrough")
    needs_password = request.auth_method in ("cram-md5", "apop")
    if needs_password and login == "passthrough" and password is None:
        raise answer.error(f"answered OK to a {request.auth_method} login without the Auth-Pass the upstream login needs")
    settings = dict(
        tls=answer.choice("Mailrelay-TLS", {v: v for v in UPSTREAM_TLS}, "none"),
        tls_verify=answer.choice("Mailrelay-TLS-Verify", {"on": True, "off": False}, True),
        server_name=server_name,
        user=answer.get("Auth-User"),
        password=password,
        login=login,
        proxy_protocol=answer.choice("Mailrelay-Proxy-Protocol", {"1": 1, "2": 2}, None),
        auth_mechanism=answer.choice("Mailrelay-Auth-Mechanism", {v: v for v in AUTH_MECHANISMS}, "plain"),
        forward_client=answer.choice("Mailrelay-Forward-Client", {"on": True, "off": False}, False),
    )
    return [Route(host=h, port=p, **settings) for h, p in addresses]
