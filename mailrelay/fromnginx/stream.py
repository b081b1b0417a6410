"""
nginx's `stream {}` block -> mailrelay `splice` listeners (or `tls` ones with protocol
"none" for `listen ... ssl`) with `static` routers.

`proxy_pass host:port` is one route, `proxy_pass name` an `upstream {}`'s servers in
order (its `backup` servers last): mailrelay tries them in that order for every
session, so nginx's load balancing becomes primary-and-fallbacks, warned. `ssl_preread
on` is `preread_sni`; a `map` on `$ssl_preread_server_name` has no equivalent (the map
router matches users, domains, listeners and client networks, not SNI names): its
default target is used, warned.
"""

from __future__ import annotations

from typing import Any

from .listen import inbound_proxy_protocol, server_listens
from .parser import Directive
from .result import Listener, Translation
from .scope import Scope, flag, seconds_of
from .tlspool import TLSPool

__all__ = ["translate_stream"]

WARNED = {
    "error_log": "mailrelay logs through twistd (-l FILE, or stdout under systemd)",
    "access_log": "mailrelay writes one session line per connection to its log instead",
    "log_format": 'mailrelay\'s session line has its own fields ([log] sessions = "json" for JSON)',
    "proxy_bind": "no equivalent: upstream connections leave from the system's choice of address",
    "proxy_buffer_size": "no equivalent: mailrelay sizes its buffers itself (os.splice between plain legs)",
    "proxy_upload_rate": "no equivalent: no rate limit",
    "proxy_download_rate": "no equivalent: no rate limit",
    "proxy_half_close": "mailrelay passes a half-close on between plain TCP legs always",
    "proxy_responses": "UDP only",
    "proxy_requests": "UDP only",
    "proxy_next_upstream": "mailrelay always tries the next route when connecting fails",
    "proxy_next_upstream_tries": "mailrelay tries every route once per session",
    "proxy_next_upstream_timeout": "no equivalent: each route gets [upstream] connect_timeout",
    "proxy_socket_keepalive": "TCP keepalive is not set on upstream connections",
    "proxy_ssl_certificate": "no equivalent: mailrelay presents no client certificate upstream",
    "proxy_ssl_certificate_key": "no equivalent: mailrelay presents no client certificate upstream",
    "proxy_ssl_ciphers": "no equivalent: upstream TLS uses mailrelay's defaults (TLS 1.2 and later)",
    "proxy_ssl_protocols": "no equivalent: upstream TLS uses mailrelay's defaults (TLS 1.2 and later)",
    "proxy_ssl_session_reuse": "no equivalent",
    "proxy_ssl_crl": "no equivalent",
    "proxy_ssl_verify_depth": "no equivalent: OpenSSL's default depth applies",
    "proxy_ssl_password_file": "no equivalent",
    "proxy_ssl_conf_command": "no equivalent",
    "preread_buffer_size": "no equivalent: a ClientHello of up to 32 KiB is read",
    "tcp_nodelay": "mailrelay sets TCP_NODELAY on every connection",
    "limit_conn": "use [listener.connection_limits] (per listener, per client address)",
    "limit_conn_zone": "use [listener.connection_limits] (per listener, per client address)",
    "limit_conn_log_level": "no equivalent",
    "allow": "no equivalent on a splice listener's static router: use a map router with client rules",
    "deny": "no equivalent on a splice listener's static router: use a map router with client rules",
    "server_name": "no equivalent: a stream server is chosen by its listen address",
    "variables_hash_max_size": "no equivalent",
    "variables_hash_bucket_size": "no equivalent",
    "ssl_preread_buffer_size": "no equivalent",
    "so_keepalive": "TCP keepalive is not set",
}
UPSTREAM_WARNED = {
    "hash": "mailrelay has no hashing: every session tries the servers in order",
    "least_conn": "mailrelay has no balancing: every session tries the servers in order",
    "least_time": "mailrelay has no balancing: every session tries the servers in order",
    "random": "mailrelay has no balancing: every session tries the servers in order",
    "zone": "no equivalent (nothing is shared between workers)",
    "keepalive": "no equivalent",
    "state": "no equivalent",
    "resolver": "mailrelay resolves upstream names with the system resolver, at each connect",
    "resolver_timeout": "names are resolved within [upstream] connect_timeout",
}


def translate_stream(stream: Directive, t: Translation, pool: TLSPool) -> None:
    """Translate one `stream {}` block into `t`."""
    assert stream.block is not None
    outer = tuple(d for d in stream.block if d.name not in ("server", "upstream", "map"))
    upstreams = {d.args[0]: d for d in stream.block if d.name == "upstream" and d.args}
    maps = {d.args[1]: d for d in stream.block if d.name == "map" and len(d.args) == 2}
    servers = [d for d in stream.block if d.name == "server"]
    used: set[str] = set()
    for server in servers:
        _server(server, outer, upstreams, maps, used, t, pool)
    for name, upstream in upstreams.items():
        if name not in used:
            t.ignored(upstream, "no translated server uses it")
            for directive in upstream.block or ():
                t.ignored(directive, "its upstream is not used")
    for directive in stream.block:
        if t.noted(directive):
            continue
        if directive.name == "map":
            t.ignored(directive, "no translated server uses its variable")
            for entry in directive.block or ():
                t.ignored(entry, "its map is not used")
        elif directive.name in ("resolver", "resolver_timeout"):
            t.ignored(directive, "mailrelay resolves names with the system resolver")
        elif directive.name in WARNED:
            t.warn(directive, WARNED[directive.name])
        elif directive.block is not None:
            t.warn(directive, "not a stream block from-nginx knows: not translated")
        else:
            t.ignored(directive, "every server sets its own")


def _server(
    server: Directive,
    outer: tuple[Directive, ...],
    upstreams: dict[str, Directive],
    maps: dict[str, Directive],
    used: set[str],
    t: Translation,
    pool: TLSPool,
) -> None:
    assert server.block is not None
    scope = Scope(outer, server.block)
    listens = server_listens(scope, t)
    routes = _routes(server, scope, upstreams, maps, used, t)
    if not listens or routes is None:
        if not t.noted(server):
            t.ignored(server, "not translated: see the warning on its listen or proxy_pass")
        for directive in scope.rest():
            t.ignored(directive, "its server is not translated (see the warning on it)")
        pool.take_unused(scope, t)
        return
    t.mapped(server, f"{len(listens)} [[listener]] with a static router")
    keys: dict[str, Any] = {}
    preread = scope.last("ssl_preread")
    preread_timeout = scope.last("preread_timeout")
    t.map_time(scope.last("proxy_timeout"), keys, "idle_timeout")
    connect_timeout = scope.last("proxy_connect_timeout")
    if connect_timeout is not None:
        value = seconds_of(connect_timeout)
        previous = t.upstream.get("connect_timeout")
        if value and previous not in (None, value):
            t.upstream["connect_timeout"] = max(previous, value)
            t.warn(
                connect_timeout,
                f"[upstream] connect_timeout is shared by every listener: {t.upstream['connect_timeout']:g} s, the longest",
            )
        elif value:
            t.upstream["connect_timeout"] = value
            t.mapped(connect_timeout, "[upstream] connect_timeout (shared by every listener)")
        else:
            t.warn(connect_timeout, "not a time: mailrelay's default (10 s) applies")
    handshake = scope.last("ssl_handshake_timeout")
    real_ip_from = scope.take("set_real_ip_from")
    for directive in scope.take("resolver") + scope.take("resolver_timeout"):
        t.ignored(directive, "mailrelay resolves upstream names with the system resolver, at each connect")

    terminates = False
    for listen, sources in listens:
        entry: dict[str, Any] = {"name": t.unique_name(f"stream-{listen.port or 'unix'}"), "listen": listen.endpoint}
        if listen.ssl:
            terminates = True
            entry["mode"] = "tls"
            if handshake is not None and (handshake_seconds := seconds_of(handshake)):
                entry["handshake_timeout"] = handshake_seconds
                t.mapped(handshake, "handshake_timeout")
        else:
            entry["mode"] = "splice"
        entry["protocol"] = "none"
        entry.update(keys)
        if preread is not None and flag(preread) is True:
            if listen.ssl:
                t.warn(preread, "on a listen ... ssl port mailrelay reads the SNI name in its own handshake: not needed")
            else:
                entry["preread_sni"] = True
                t.mapped(preread, "preread_sni")
                if preread_timeout is not None:
                    value = seconds_of(preread_timeout)
                    if value:
                        entry["preread_timeout"] = value
                        t.warn(
                            preread_timeout,
                            "preread_timeout: a client silent that long is routed without a name (nginx closes it)",
                        )
        if listen.proxy_protocol:
            inbound_proxy_protocol(entry, real_ip_from, sources[0], t)
        comment = [f"{server.where} server {{ {' '.join(d.text() for d in sources)} }}"]
        t.listeners.append(Listener(comment, {**entry, "router": {"type": "static", "routes": routes}}))
    if preread is not None and not t.noted(preread):
        t.ignored(preread, "off is the default")
    if preread_timeout is not None and not t.noted(preread_timeout):
        t.ignored(preread_timeout, "no ssl_preread here")
    if handshake is not None and not t.noted(handshake):
        t.ignored(handshake, "no listen ... ssl here")
    if not any(listen.proxy_protocol for listen, _ in listens):
        for directive in real_ip_from:
            t.ignored(directive, "no listen ... proxy_protocol here: nginx does not use it either")
    if terminates:
        pool.add(server, scope, None, t, True)
    else:
        pool.take_unused(scope, t)
    for directive in scope.rest():
        t.unknown(directive, WARNED, "stream")


def _routes(
    server: Directive,
    scope: Scope,
    upstreams: dict[str, Directive],
    maps: dict[str, Directive],
    used: set[str],
    t: Translation,
) -> list[dict[str, Any]] | None:
    """The static router's routes from `proxy_pass` and the proxy_* settings that go
    on every route; None (warned) when there is no usable target."""
    proxy_pass = scope.last("proxy_pass")
    if proxy_pass is None or not proxy_pass.args:
        t.warn(server, "no proxy_pass: not translated (mailrelay's splice listener needs a route)")
        return None
    target: str | None = proxy_pass.args[0]
    if target is not None and target.startswith("$"):
        target = _through_map(proxy_pass, target, maps, t)
    if target is None:
        return None
    routes: list[dict[str, Any]] | None
    if target in upstreams:
        used.add(target)
        routes = _upstream(upstreams[target], t)
        if routes is None:
            t.warn(proxy_pass, f'the upstream "{target}" has no usable server: not translated')
            return None
        t.mapped(proxy_pass, f'routes = the servers of upstream "{target}", in order')
    else:
        route = _address(target)
        if route is None:
            t.warn(proxy_pass, f'"{target}" has no equivalent (a route is host:port over TCP): not translated')
            return None
        routes = [route]
        if not t.noted(proxy_pass):
            t.mapped(proxy_pass, "a static route")
    _route_settings(scope, routes, t)
    return routes


def _through_map(proxy_pass: Directive, variable: str, maps: dict[str, Directive], t: Translation) -> str | None:
    """`proxy_pass $name` where a map sets $name: its default entry, warned."""
    found = maps.get(variable)
    if found is None:
        t.warn(proxy_pass, f"{variable} is not set by a map in this stream block: not translated")
        return None
    source = found.args[0]
    default = next((e for e in found.block or () if e.name == "default" and e.args), None)
    why = (
        "mailrelay's map router routes by user, domain, listener and client network, not by SNI name"
        if source == "$ssl_preread_server_name"
        else f"mailrelay cannot route by {source}"
    )
    for entry in found.block or ():
        if entry is not default:
            t.warn(entry, f"not translated: {why}")
    if default is None:
        t.warn(found, f"{why}, and the map has no default: the server is not translated")
        t.warn(proxy_pass, f"{variable} has no default in its map: not translated")
        return None
    t.warn(
        found,
        f"{why}: every session goes to the map's default ({default.args[0]}); for several upstreams by name,"
        " write a python router that reads request.sni, or an http router (Auth-Protocol: none)",
    )
    t.mapped(default, "the listener's routes")
    t.mapped(proxy_pass, f"the routes of the map's default, {default.args[0]}")
    return default.args[0]


def _address(target: str) -> dict[str, Any] | None:
    """`host:port` or `[v6]:port` as a route; None for unix: and the unusable."""
    if target.startswith("unix:") or "$" in target:
        return None
    if target.startswith("["):
        host, _, rest = target[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port = target.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        return None
    return {"host": host, "port": int(port)}


def _upstream(upstream: Directive, t: Translation) -> list[dict[str, Any]] | None:
    primaries: list[dict[str, Any]] = []
    backups: list[dict[str, Any]] = []
    for directive in upstream.block or ():
        if directive.name != "server":
            t.warn(directive, UPSTREAM_WARNED.get(directive.name, "not an upstream directive from-nginx knows"))
            continue
        route = _address(directive.args[0]) if directive.args else None
        if route is None:
            t.warn(
                directive, "a route is host:port over TCP (a unix: socket or a server without a port has no equivalent): left out"
            )
            continue
        notes, backup, down = [], False, False
        for parameter in directive.args[1:]:
            name = parameter.partition("=")[0]
            if parameter == "backup":
                backup = True
            elif parameter == "down":
                down = True
            elif name == "weight":
                notes.append(f"{parameter}: no weights, the servers are tried in order")
            elif name in ("max_fails", "fail_timeout"):
                notes.append(f"{parameter}: no failure accounting, every session tries the servers in order")
            elif name == "max_conns":
                notes.append(f"{parameter}: no per-server limit")
            else:
                notes.append(f"{parameter}: no equivalent")
        if down:
            t.warn(directive, "down: left out")
            continue
        (backups if backup else primaries).append(route)
        if notes:
            t.warn(directive, "; ".join(notes))
        else:
            t.mapped(directive, "a route (the fallbacks after it)" if not backup else "a route after the primaries")
    if len(primaries) > 1:
        t.warn(
            upstream,
            "nginx balances connections over the servers; mailrelay sends every session to the first"
            " and falls back to the next when connecting fails",
        )
    else:
        t.mapped(upstream, "routes")
    routes = primaries + backups
    return routes or None


def _route_settings(scope: Scope, routes: list[dict[str, Any]], t: Translation) -> None:
    """proxy_protocol and proxy_ssl*: settings of every route."""
    proxy_protocol = scope.last("proxy_protocol")
    if proxy_protocol is not None:
        if proxy_protocol.args[:1] in (("on",), ("v2",)):
            version = 2 if proxy_protocol.args[0] == "v2" else 1
            for route in routes:
                route["proxy_protocol"] = version
            t.mapped(proxy_protocol, f"proxy_protocol = {version} on every route")
        else:
            t.ignored(proxy_protocol, "off is the default")
    proxy_ssl = scope.last("proxy_ssl")
    verify = scope.last("proxy_ssl_verify")
    trusted = scope.last("proxy_ssl_trusted_certificate")
    name = scope.last("proxy_ssl_name")
    server_name = scope.last("proxy_ssl_server_name")
    if proxy_ssl is None or flag(proxy_ssl) is not True:
        if proxy_ssl is not None:
            t.ignored(proxy_ssl, "off is the default")
        for directive in (verify, trusted, name, server_name):
            if directive is not None:
                t.ignored(directive, "no proxy_ssl here")
        return
    for route in routes:
        route["tls"] = "tls"
    t.mapped(proxy_ssl, 'tls = "tls" on every route')
    if verify is None or flag(verify) is not True:
        t.warn(
            verify or proxy_ssl,
            "nginx does not verify the upstream's certificate by default (proxy_ssl_verify off); mailrelay verifies it"
            " (against the system store, or tls_ca): set tls_verify = false on the routes only if you must",
        )
    else:
        t.mapped(verify, "mailrelay verifies upstream certificates (tls_verify = true, the default)")
    if trusted is not None and trusted.args:
        for route in routes:
            route["tls_ca"] = trusted.args[0]
        t.mapped(trusted, "tls_ca on every route")
    if name is not None and name.args:
        if "$" in name.args[0]:
            t.warn(name, "a variable has no equivalent: each route's host name is verified")
        else:
            for route in routes:
                route["server_name"] = name.args[0]
            t.mapped(name, "server_name on every route")
    if server_name is not None:
        t.mapped(server_name, "mailrelay sends the name it verifies as SNI always")
