"""
nginx's `listen` (mail and stream alike) -> a Twisted server endpoint string.

`listen 993`, `*:993`, `127.0.0.1:993`, `[::1]:993`, `localhost:993`, `unix:/path`,
with parameters: `ssl`, `proxy_protocol` and `udp` are reported for the caller to act
on, `backlog=N` goes into the endpoint, the socket options nginx sets and Twisted's
endpoints do not (`rcvbuf=`, `sndbuf=`, `reuseport`, `so_keepalive=`...) are listed
as not translated.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import attrs

from .parser import Directive
from .result import Translation
from .scope import Scope

__all__ = ["Listen", "ListenError", "inbound_proxy_protocol", "merge_wildcards", "server_listens", "parse_listen"]

IGNORED_PARAMETERS = {
    "rcvbuf": "the socket's receive buffer is the system's default",
    "sndbuf": "the socket's send buffer is the system's default",
    "bind": "mailrelay binds every listener to its own address anyway",
    "ipv6only": "an IPv6 wildcard listener takes IPv4 clients too when the system allows (net.ipv6.bindv6only=0)",
    "reuseport": "mailrelay's workers share one listening socket instead (workers = N)",
    "so_keepalive": "TCP keepalive is not set on accepted connections",
    "fastopen": "TCP Fast Open is not enabled",
    "deferred": "TCP_DEFER_ACCEPT is not set",
    "accept_filter": "accept filters are FreeBSD's",
    "setfib": "routing tables (FreeBSD) are not chosen",
    "multipath": "MPTCP is not enabled",
    "default_server": "mailrelay has no name-based servers on one address",
    "default": "mailrelay has no name-based servers on one address",
    "http2": "not a mail or stream parameter",
    "quic": "not a mail or stream parameter",
}


class ListenError(Exception):
    """A listen directive that cannot be translated (the reason is the message)."""


@attrs.frozen
class Listen:
    """What one `listen` says."""

    endpoint: str
    """A Twisted server endpoint string."""
    port: int | None
    """None for a UNIX socket."""
    host: str | None
    """The address as written (None for the wildcard, the path for `unix:`)."""
    wildcard: bool
    ipv6: bool
    ssl: bool = False
    proxy_protocol: bool = False
    udp: bool = False
    dropped: tuple[str, ...] = ()
    """Parameters with no equivalent, with why, for a warning."""

    def with_endpoint(self, endpoint: str) -> Listen:
        return attrs.evolve(self, endpoint=endpoint)


def _escape(text: str) -> str:
    """A value inside an endpoint string: `:`, `=` and `\\` escaped with a backslash."""
    return text.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


def _port(text: str) -> int:
    if "-" in text:
        raise ListenError(f'the port range "{text}" has no equivalent: list a listener per port')
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ListenError(f'"{text}" is not a port')
    return int(text)


def parse_listen(directive: Directive) -> Listen:
    """The endpoint of a `listen` directive; ListenError when it cannot be translated."""
    if not directive.args:
        raise ListenError("listen without an address")
    address, *parameters = directive.args
    ssl = proxy_protocol = udp = False
    backlog: str | None = None
    dropped: list[str] = []
    for parameter in parameters:
        name, _, setting = parameter.partition("=")
        if parameter == "ssl":
            ssl = True
        elif parameter == "proxy_protocol":
            proxy_protocol = True
        elif parameter == "udp":
            udp = True
        elif name == "backlog":
            if not setting.lstrip("-").isdigit():
                raise ListenError(f'invalid backlog "{setting}"')
            # nginx's -1 means the system's maximum (somaxconn).
            backlog = "4096" if setting.startswith("-") else setting
        elif name in IGNORED_PARAMETERS:
            dropped.append(f"{parameter}: {IGNORED_PARAMETERS[name]}")
        else:
            dropped.append(f"{parameter}: not a parameter from-nginx knows")
    extra = f":backlog={backlog}" if backlog else ""
    if address.startswith("unix:"):
        path = address[len("unix:") :]
        dropped.append(
            f"{address}: clients on a UNIX socket have no address, so Client-IP is unix: and per-address limits and"
            " client rules do not apply to them"
        )
        return Listen(f"unix:{_escape(path)}{extra}", None, path, False, False, ssl, proxy_protocol, udp, tuple(dropped))
    host: str | None
    if address.startswith("["):
        close = address.find("]")
        if close < 0:
            raise ListenError(f'invalid IPv6 address in "{address}"')
        host = address[1:close]
        rest = address[close + 1 :]
        if not rest.startswith(":"):
            raise ListenError(f'"{address}" has no port')
        port = _port(rest[1:])
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ListenError(f'"{host}" is not an IPv6 address') from None
        wildcard = ipaddress.IPv6Address(host).is_unspecified
        endpoint = f"tcp6:{port}:interface={_escape(host)}{extra}"
        return Listen(endpoint, port, None if wildcard else host, wildcard, True, ssl, proxy_protocol, udp, tuple(dropped))
    if ":" in address:
        host, _, port_text = address.rpartition(":")
        port = _port(port_text)
    elif address.isdigit() or "-" in address and address.replace("-", "").isdigit():
        host, port = None, _port(address)
    else:
        # `listen host;` means port 80 in http; mail and stream want a port.
        raise ListenError(f'"{address}" has no port')
    if host in (None, "*", "0.0.0.0"):
        return Listen(f"tcp:{port}{extra}", port, None, True, False, ssl, proxy_protocol, udp, tuple(dropped))
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        # A name: Twisted binds what it resolves to first; nginx listens on every address.
        dropped.append(f"{host}: bound to the first address the name resolves to (nginx listens on each)")
    return Listen(
        f"tcp:{port}:interface={_escape(str(host))}{extra}", port, host, False, False, ssl, proxy_protocol, udp, tuple(dropped)
    )


def server_listens(scope: Scope, t: Translation) -> list[tuple[Listen, list[Directive]]]:
    """Each address to listen on, with the listen directives it comes from (an IPv4 and
    an IPv6 wildcard on one port become one dual-stack listener)."""
    found: list[tuple[Listen, list[Directive]]] = []
    directives = scope.take("listen")
    for directive in directives:
        try:
            listen = parse_listen(directive)
        except ListenError as e:
            t.warn(directive, f"{e}: no listener")
            continue
        if listen.udp:
            t.warn(directive, "UDP has no equivalent (mailrelay proxies TCP): no listener")
            continue
        if listen.dropped:
            t.warn(directive, "; ".join(listen.dropped))
        else:
            t.mapped(directive, "listen (and mode) of a [[listener]]")
        found.append((listen, [directive]))
    return merge_wildcards(found, t)


def merge_wildcards(found: list[tuple[Listen, list[Directive]]], t: Translation) -> list[tuple[Listen, list[Directive]]]:
    """`listen 993` beside `listen [::]:993`: one listener on `::`, which takes IPv4
    clients too (as ::ffff:a.b.c.d), since two would collide on Linux's dual stack."""
    merged: list[tuple[Listen, list[Directive]]] = []
    for listen, sources in found:
        twin = next(
            (
                m
                for m in merged
                if m[0].wildcard
                and listen.wildcard
                and m[0].port == listen.port
                and m[0].ipv6 != listen.ipv6
                and (m[0].ssl, m[0].proxy_protocol) == (listen.ssl, listen.proxy_protocol)
            ),
            None,
        )
        if twin is None:
            merged.append((listen, sources))
            continue
        v6 = twin[0] if twin[0].ipv6 else listen
        merged[merged.index(twin)] = (v6, twin[1] + sources)
        for directive in twin[1] + sources:
            t.mapped(directive, f'one dual-stack listener "{v6.endpoint}" for the IPv4 and IPv6 wildcards')
    return merged


def inbound_proxy_protocol(entry: dict[str, Any], real_ip_from: list[Directive], listen: Directive, t: Translation) -> None:
    """`listen ... proxy_protocol` with `set_real_ip_from` (mail and stream alike) ->
    the listener's `proxy_protocol` and `trusted_proxies`."""
    entry["proxy_protocol"] = True
    networks = [d.args[0] for d in real_ip_from if d.args and d.args[0] != "unix:"]
    for directive in real_ip_from:
        if directive.args[:1] == ("unix:",):
            t.warn(directive, "unix: has no equivalent: trusted_proxies lists networks")
        else:
            t.mapped(directive, "trusted_proxies")
    if networks:
        entry["trusted_proxies"] = networks
    else:
        t.warn(
            listen,
            "proxy_protocol without set_real_ip_from: nginx reads the header from anyone and keeps the peer's address;"
            " mailrelay takes the header's address, from trusted_proxies only (default: loopback): list your balancers",
        )
