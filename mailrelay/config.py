"""
TOML configuration -> typed, validated objects.

`load_config()` reads the whole file and reports every problem at once (file, key
path, reason) as a `ConfigError`; a `Config` that exists is complete and consistent, so
nothing listens until the whole configuration is valid.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from typing import Any

import attrs
from twisted.internet.endpoints import serverFromString

from .configtable import ConfigError, Errors, Table, read_toml
from .connlimits import ConnectionLimits, read_connection_limits
from .core.settings import DEFAULT_AUTH, FrontEndConfig
from .guard import LoginLimits
from .networks import Network, read_networks
from .redisurl import RedisAddress, parse_redis_url
from .router import MODES, PASSWORDLESS_METHODS, PROTOCOLS
from .routerspec import RouterSpec, parse_router, refuse_unchecked_logins
from .sasl import MECHANISMS
from .tls import MIN_VERSIONS, CertificateFiles, ServerTLSConfig

__all__ = [
    "Config",
    "ConfigError",
    "FrontEndConfig",
    "ListenerConfig",
    "LogConfig",
    "MetricsConfig",
    "RedisConfig",
    "UpstreamConfig",
    "load_config",
    "parse_config",
]

TLS_MODES = ("tls", "starttls")
FRONT_END_PROTOCOLS = ("smtp", "imap", "pop3")

AUTH_METHODS = {"smtp": (*MECHANISMS, "none"), "imap": MECHANISMS, "pop3": (*MECHANISMS, "apop")}
"""What a listener's `auth` may name, per protocol."""


TOP_LEVEL_KEYS = frozenset({"drain_timeout", "workers"})


@attrs.frozen
class MetricsConfig:
    """`[metrics]`: where Prometheus scrapes mailrelay (see `mailrelay.metrics`)."""

    listen: str
    """A server endpoint string, as a listener's `listen`."""


@attrs.frozen
class RedisConfig:
    """`[redis]`: the store a fleet of mailrelay processes shares login limits and the
    route cache in (see `mailrelay.shared`)."""

    url: str = attrs.field(repr=False)
    """`redis://[[user]:password@]host:port/db` or `unix:/path` (may hold a password:
    show `address.describe()`, never this)."""
    timeout: float = 0.5
    """Seconds each Redis call may take before this process decides alone."""
    key_prefix: str = "mailrelay:"
    """Prefix of every key mailrelay writes (several fleets may share one Redis)."""
    secret_file: str | None = None
    """A file only the fleet can read, holding its shared secret: it keys the digests
    in the route cache's keys and authenticates its entries. Without it, the route
    cache stays each process's own."""

    @property
    def address(self) -> RedisAddress:
        return parse_redis_url(self.url)

    def describe(self) -> str:
        """The settings, for `check`: never the password."""
        cache = "and the route cache (secret_file)" if self.secret_file else "only (no secret_file: route caches per process)"
        return f"{self.address.describe()} timeout={self.timeout:g}s key_prefix={self.key_prefix!r}; shares login counts {cache}"


@attrs.frozen
class LogConfig:
    """`[log]`: how mailrelay writes its log."""

    sessions: str = "text"
    """The session line's form: `text` (one line of key=value), or `json` (one JSON
    object per session, the same fields, for log shippers)."""


@attrs.frozen
class UpstreamConfig:
    """`[upstream]`: how the shared connector reaches upstream servers."""

    connect_timeout: float = 10.0
    """Seconds for each route's TCP connect, name resolution included."""
    login_timeout: float = 30.0
    """Seconds for all of each route's attempt: connect, TLS handshake, greeting,
    STARTTLS and login (Dovecot's login_proxy_timeout). A smaller one than
    `connect_timeout` bounds the connect too."""
    ca: str | None = None
    """PEM file of the CAs upstream certificates are verified against; None: the
    system trust store."""


LOOPBACK: tuple[Network, ...] = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
"""Who may send a PROXY header when a listener does not say (`trusted_proxies`)."""


@attrs.frozen
class ListenerConfig:
    """One `[[listener]]`."""

    name: str
    listen: str
    mode: str
    protocol: str
    router: RouterSpec | None
    """This listener's own router; None means the configuration's default router."""
    idle_timeout: float = 3600.0
    router_timeout: float = 30.0
    handshake_timeout: float = 30.0
    """`tls` and `starttls` listeners: how long a client may take to finish its TLS handshake."""
    preread_sni: bool = False
    """`splice` listeners: peek the SNI name from a client's ClientHello for the Router."""
    preread_timeout: float = 10.0
    """How long a `preread_sni` listener waits for the client's first bytes."""
    zero_copy: bool = True
    """Splice bytes between two plain TCP legs inside the kernel (`os.splice`) instead of
    through Python; False keeps every byte in the userspace pump (`mailrelay.zerocopy`)."""
    front_end: FrontEndConfig = FrontEndConfig()
    """Listeners with a mail protocol: greeting, STARTTLS, authentication."""
    connection_limits: ConnectionLimits = ConnectionLimits()
    """`[listener.connection_limits]`: the connections taken at once, per client, and per
    client and minute."""
    proxy_protocol: bool = False
    """Every connection starts with a PROXY protocol header (v1 or v2) naming the real
    client (see `mailrelay.proxied`)."""
    trusted_proxies: tuple[Network, ...] = LOOPBACK
    """`proxy_protocol` listeners: the peers allowed to send the header; others are closed."""
    proxy_timeout: float = 5.0
    """`proxy_protocol` listeners: seconds to receive the whole header."""

    @property
    def terminates_tls(self) -> bool:
        return self.mode in TLS_MODES

    @property
    def accepts_passwords(self) -> bool:
        """Whether a client may log in with a password (or a token, a digest): any `auth`
        method but "none" (MX use) and "external" (a client certificate mailrelay
        verified). Someone must check it: the Router, or the upstream."""
        return self.protocol in FRONT_END_PROTOCOLS and any(m not in PASSWORDLESS_METHODS for m in self.front_end.auth)


@attrs.frozen
class Config:
    """A whole, valid configuration."""

    source: str
    listeners: tuple[ListenerConfig, ...]
    router: RouterSpec | None
    upstream: UpstreamConfig = UpstreamConfig()
    drain_timeout: float = 30.0
    tls: ServerTLSConfig | None = None
    """`[tls]`; None: `tls` and `starttls` listeners get a self-signed certificate."""
    login_limits: LoginLimits = LoginLimits()
    """`[login_limits]`: the brute-force defence shared by every listener."""
    workers: int = 1
    """Processes serving every listener (`workers = "auto"`: one per core)."""
    metrics: MetricsConfig | None = None
    """`[metrics]`; None: no metrics endpoint."""
    redis: RedisConfig | None = None
    """`[redis]`; None: login limits and the route cache are each process's own."""
    log: LogConfig = LogConfig()

    def router_for(self, listener: ListenerConfig) -> RouterSpec | None:
        return listener.router or self.router


def load_config(path: str | os.PathLike[str], systemd_sockets_later: bool = False) -> Config:
    """Read and validate a TOML file; raise ConfigError naming the file otherwise.
    `systemd_sockets_later`: a `systemd:` listener need not have its socket now."""
    data, _ = read_toml(path)
    base_dir = os.path.dirname(os.path.abspath(path))
    return parse_config(data, str(path), base_dir=base_dir, systemd_sockets_later=systemd_sockets_later)


def parse_config(
    data: Mapping[str, Any], source: str = "<config>", base_dir: str | None = None, systemd_sockets_later: bool = False
) -> Config:
    """
    Validate already-parsed TOML data (a `.tac` file or a test may build it in Python).
    Relative file names are taken relative to `base_dir` (default: the current directory).
    """
    errors = Errors(source, TOP_LEVEL_KEYS, base_dir)
    errors.systemd_sockets_later = systemd_sockets_later
    top = Table(dict(data), "", errors)
    drain_timeout = top.seconds("drain_timeout", 30.0)
    workers = _workers(top)

    upstream = UpstreamConfig()
    upstream_table = top.table("upstream", None)
    if upstream_table is not None:
        upstream = UpstreamConfig(
            connect_timeout=upstream_table.seconds("connect_timeout", 10.0),
            login_timeout=upstream_table.seconds("login_timeout", 30.0),
            ca=upstream_table.file("ca", None),
        )
        upstream_table.finish()

    tls_table = top.table("tls", None)
    tls = _tls(tls_table) if tls_table is not None else None

    login_limits = LoginLimits()
    limits_table = top.table("login_limits", None)
    if limits_table is not None:
        login_limits = _login_limits(limits_table) or login_limits

    router_table = top.table("router", None)
    default_router = _router(router_table)

    metrics_table = top.table("metrics", None)
    metrics = _metrics(metrics_table) if metrics_table is not None else None
    redis_table = top.table("redis", None)
    redis = _redis(redis_table) if redis_table is not None else None
    log_table = top.table("log", None)
    log = _log(log_table) if log_table is not None else LogConfig()

    listeners = [_listener(t) for t in top.tables("listener")]
    if not top.has("listener") or top.data["listener"] == []:
        # `listener = []` is an array of no tables: as good as no listener at all.
        top.error("listener", "at least one [[listener]] is required")
    top.finish()

    valid = [listener for listener in listeners if listener is not None]
    seen: dict[str, int] = {}
    for index, listener in enumerate(listeners):
        if listener is None:
            continue
        if listener.name in seen:
            errors.add(f"listener[{index}].name", f'"{listener.name}" is already the name of listener[{seen[listener.name]}]')
        seen.setdefault(listener.name, index)
        if "external" in listener.front_end.auth and (tls is None or tls.client_ca is None):
            errors.add(f"listener[{index}].auth", '"external" needs client certificates: set [tls] client_ca')
    _refuse_unchecked_logins(valid, default_router, errors)
    errors.raise_if_any()
    return Config(
        source=source,
        listeners=tuple(valid),
        router=default_router,
        upstream=upstream,
        drain_timeout=drain_timeout,
        tls=tls,
        login_limits=login_limits,
        workers=workers or 1,
        metrics=metrics,
        redis=redis,
        log=log or LogConfig(),
    )


def _refuse_unchecked_logins(listeners: list[ListenerConfig], default: RouterSpec | None, errors: Errors) -> None:
    """A listener that takes passwords must not be routed with `login = "xclient"` or
    `"none"` (the upstream takes mailrelay's word) unless its router checks the password:
    one error per such route, naming the listeners (a map file is checked when read)."""
    by_router: dict[int, tuple[RouterSpec, list[tuple[str, str]]]] = {}
    for listener in listeners:
        spec = listener.router or default
        if spec is not None and listener.accepts_passwords:
            by_router.setdefault(id(spec), (spec, []))[1].append((listener.name, listener.protocol))
    for spec, password_listeners in by_router.values():
        refuse_unchecked_logins(spec.unchecked_logins, password_listeners, errors)


def _router(table: Table | None) -> RouterSpec | None:
    if table is None:
        return None
    spec = parse_router(table)
    table.finish()
    return spec


def _listener(table: Table) -> ListenerConfig | None:
    listen = table.string("listen")
    if isinstance(listen, str):
        listen = _check_endpoint(table, listen)
    name = table.string("name", listen)
    mode = table.string("mode", choices=MODES)
    protocol = table.string("protocol", "none", choices=PROTOCOLS)
    if mode == "starttls" and protocol == "none":
        table.error("protocol", 'mode "starttls" needs a mail protocol (smtp, imap or pop3)')
        protocol = None
    if mode == "splice" and protocol not in (None, "none"):
        table.error("protocol", f'mode "splice" reads nothing of the session: "{protocol}" needs mode "tls" or "starttls"')
        protocol = None
    idle_timeout = table.seconds("idle_timeout", 3600.0)
    router_timeout = table.seconds("router_timeout", 30.0)
    handshake_timeout = _for_modes(table, mode, TLS_MODES, "handshake_timeout", table.seconds, 30.0)
    preread_sni = _for_modes(table, mode, ("splice",), "preread_sni", table.boolean, False)
    preread_timeout = _for_modes(table, mode, ("splice",), "preread_timeout", table.seconds, 10.0)
    zero_copy = table.boolean("zero_copy", True)
    front_end = _front_end(table, mode, protocol)
    proxy_protocol, trusted_proxies, proxy_timeout = _proxy_protocol(table)
    router_table = table.table("router", None)
    router = _router(router_table)
    limits_table = table.table("connection_limits", None)
    connection_limits = (
        ConnectionLimits() if limits_table is None else read_connection_limits(limits_table, _exempt(limits_table))
    )
    table.finish()
    required = (
        listen,
        name,
        mode,
        protocol,
        idle_timeout,
        router_timeout,
        handshake_timeout,
        preread_sni,
        preread_timeout,
        zero_copy,
        front_end,
        connection_limits,
        proxy_protocol,
        trusted_proxies,
        proxy_timeout,
    )
    if None in required or front_end is None or connection_limits is None or (router_table and router is None):
        return None
    return ListenerConfig(
        name=name,
        listen=listen,
        mode=mode,
        protocol=protocol,
        router=router,
        idle_timeout=idle_timeout,
        router_timeout=router_timeout,
        handshake_timeout=handshake_timeout,
        preread_sni=preread_sni,
        preread_timeout=preread_timeout,
        zero_copy=zero_copy,
        front_end=front_end,
        connection_limits=connection_limits,
        proxy_protocol=proxy_protocol,
        trusted_proxies=trusted_proxies,
        proxy_timeout=proxy_timeout,
    )


def _proxy_protocol(table: Table) -> tuple[Any, Any, Any]:
    """`proxy_protocol`, `trusted_proxies`, `proxy_timeout` (each None if invalid); the
    last two mean something only with the first (an error without it: the
    administrator expects them to do something)."""
    enabled = table.boolean("proxy_protocol", False)
    trusted: tuple[Network, ...] | None = LOOPBACK
    networks = read_networks(table, "trusted_proxies")
    if networks is False:
        trusted = None
    elif networks is not None:
        trusted = networks
    timeout = table.seconds("proxy_timeout", 5.0)
    if enabled is False:
        for key in ("trusted_proxies", "proxy_timeout"):
            if table.has(key):
                table.error(key, "applies only with proxy_protocol = true")
    return enabled, trusted, timeout


OPTIONAL_FRONT_END_KEYS = ("capabilities", "size")
"""Front-end keys whose value may be None (not set); None in any other is an error."""
FRONT_END_KEYS = (
    "hostname",
    "auth",
    "max_attempts",
    "max_errors",
    "login_timeout",
    "login_deadline",
    "max_junk_commands",
    "capabilities",
)


def _front_end(table: Table, mode: str | None, protocol: str | None) -> FrontEndConfig | None:
    """The keys of listeners with a mail protocol (an error on the others, where they
    would do nothing)."""
    if protocol not in FRONT_END_PROTOCOLS:
        for key in (*FRONT_END_KEYS, "starttls", "size", "vet_recipients"):
            if table.has(key) and protocol is not None:
                table.error(key, f'applies only to listeners with a mail protocol (smtp, imap, pop3), not protocol "{protocol}"')
            table.consume(key)
        return FrontEndConfig() if protocol is not None else None
    default = FrontEndConfig()
    values: dict[str, Any] = dict(
        hostname=table.string("hostname", default.hostname),
        starttls=_for_modes(table, mode, ("starttls",), "starttls", _choice(table, ("optional", "required")), default.starttls),
        auth=table.strings("auth", DEFAULT_AUTH),
        max_attempts=table.integer("max_attempts", default.max_attempts, minimum=1, maximum=1000),
        max_errors=table.integer("max_errors", default.max_errors, minimum=1, maximum=1000),
        login_timeout=table.seconds("login_timeout", default.login_timeout),
        login_deadline=table.seconds("login_deadline", default.login_deadline),
        max_junk_commands=table.integer("max_junk_commands", default.max_junk_commands, minimum=1, maximum=10000),
        capabilities=table.strings("capabilities", None) if table.has("capabilities") else None,
        size=_for_protocol(table, protocol, "size", lambda key, d: table.integer(key, d, minimum=0), None),
        vet_recipients=_for_protocol(table, protocol, "vet_recipients", _choice(table, ("first", "all")), default.vet_recipients),
    )
    hostname = values["hostname"]
    if isinstance(hostname, str) and not _SNI_NAME.fullmatch(hostname):
        table.error("hostname", f'"{hostname}" is not a host name')
        values["hostname"] = None
    auth = values["auth"]
    if auth is not None:
        allowed = AUTH_METHODS[protocol]
        unknown = [m for m in auth if m.lower() not in allowed]
        if unknown:
            table.error("auth", f'"{unknown[0]}" is not a {protocol} login method (one of: {", ".join(allowed)})')
            values["auth"] = None
        elif not auth:
            table.error("auth", "must name at least one method")
            values["auth"] = None
        else:
            values["auth"] = tuple(dict.fromkeys(m.lower() for m in auth))
    capabilities = values["capabilities"]
    for capability in capabilities or ():
        if (
            not capability
            or not capability.isprintable()
            or capability.split()[0].upper() in ("STARTTLS", "AUTH", "STLS", "SASL", "USER", "LOGINDISABLED")
            or capability.upper().startswith("AUTH=")
        ):
            table.error(
                "capabilities",
                f'"{capability}" cannot be listed: STARTTLS (STLS) and the login methods are advertised'
                " from `starttls` and `auth`",
            )
            values["capabilities"] = None
            break
    if any(value is None for key, value in values.items() if key not in OPTIONAL_FRONT_END_KEYS):
        return None
    if capabilities is not None and values["capabilities"] is None:
        return None
    return FrontEndConfig(**values)


def _choice(table: Table, choices: tuple[str, ...]) -> Any:
    return lambda key, default: table.string(key, default, choices=choices)


def _for_protocol(table: Table, protocol: str, key: str, read: Any, default: Any) -> Any:
    """A key that means something only for SMTP listeners."""
    value = read(key, default)
    if table.has(key) and protocol != "smtp":
        table.error(key, f'applies only to protocol "smtp" listeners, not "{protocol}"')
    return value


def _for_modes(table: Table, mode: str | None, modes: tuple[str, ...], key: str, read: Any, default: Any) -> Any:
    """A listener key that means something only in some modes; elsewhere it is an error
    (the administrator expects it to do something)."""
    value = read(key, default)
    if table.has(key) and mode is not None and mode not in modes:
        names = " and ".join(f'"{m}"' for m in modes)
        table.error(key, f'applies only to mode {names} listeners, not "{mode}"')
    return value


def _workers(top: Table) -> int | None:
    """`workers`: a number of processes, or "auto" for one per core."""
    if top.data.get("workers") == "auto":
        top.consume("workers")
        return os.cpu_count() or 1
    return top.integer("workers", 1, minimum=1, maximum=1024)


def _metrics(table: Table) -> MetricsConfig | None:
    listen = table.string("listen")
    table.finish()
    if listen is None:
        return None
    listen = _check_endpoint(table, listen)
    return MetricsConfig(listen=listen) if listen is not None else None


def _redis(table: Table) -> RedisConfig | None:
    url = table.string("url", secret=True)
    if isinstance(url, str):
        try:
            parse_redis_url(url)
        except ValueError as e:
            table.error("url", str(e))
            url = None
    timeout = table.seconds("timeout", 0.5)
    key_prefix = table.string("key_prefix", "mailrelay:")
    if isinstance(key_prefix, str) and (len(key_prefix) > 64 or not key_prefix.isprintable()):
        table.error("key_prefix", "must be at most 64 printable characters")
        key_prefix = None
    secret_file = table.file("secret_file", None)
    table.finish()
    if url is None or timeout is None or key_prefix is None:
        return None
    return RedisConfig(url=url, timeout=timeout, key_prefix=key_prefix, secret_file=secret_file)


def _log(table: Table) -> LogConfig | None:
    sessions = table.string("sessions", "text", choices=("text", "json"))
    table.finish()
    return LogConfig(sessions=sessions) if sessions is not None else None


def _login_limits(table: Table) -> LoginLimits | None:
    default = LoginLimits()
    values = dict(
        window=table.seconds("window", default.window),
        max_per_client=table.integer("max_per_client", default.max_per_client, minimum=0, maximum=1_000_000),
        max_per_user=table.integer("max_per_user", default.max_per_user, minimum=0, maximum=1_000_000),
        delay=table.number("delay", default.delay),
        max_delay=table.seconds("max_delay", default.max_delay),
        exempt=_exempt(table),
    )
    table.finish()
    if None in values.values():
        return None
    return LoginLimits(**values)


def _exempt(table: Table) -> tuple[Network, ...] | None:
    """`exempt`: networks or addresses (a map rule's `client` syntax); `[]` is none."""
    if table.data.get("exempt") == []:
        table.consume("exempt")
        return ()
    networks = read_networks(table, "exempt")
    if networks is False:
        return None
    return networks if isinstance(networks, tuple) else ()


def _tls(table: Table) -> ServerTLSConfig | None:
    default = _certificate(table, "tls")
    sni = [_certificate(t, t.path, sni=True) for t in table.tables("sni")]
    min_version = table.string("min_version", "1.2", choices=tuple(MIN_VERSIONS))
    ciphers = table.string("ciphers", None)
    client_ca = table.file("client_ca", None)
    client_cert = table.string("client_cert", None, choices=("optional", "required"))
    if client_cert is not None and client_ca is None:
        table.error("client_cert", "needs client_ca, the CA file client certificates are verified against")
    table.finish()
    if default is None or None in sni or min_version is None:
        return None
    return ServerTLSConfig(
        default=default,
        sni=tuple(c for c in sni if c is not None),
        min_version=min_version,
        ciphers=ciphers,
        client_ca=client_ca,
        client_cert=client_cert or "optional",
    )


def _certificate(table: Table, where: str, sni: bool = False) -> CertificateFiles | None:
    cert = table.file("cert")
    key = table.file("key", cert)
    names: tuple[str, ...] = ()
    if sni:
        # `names = [...]`, or `name = "..."` for one (as earlier documentation showed it).
        one = table.string("name", None)
        listed = table.strings("names", None)
        names_key = "names"
        if one is not None and listed is not None:
            table.error("name", 'and "names" cannot both be set: list every name in names = [...]')
            listed = None
        elif one is not None:
            names_key, listed = "name", (one,)
        for name in listed or ():
            if not _SNI_NAME.fullmatch(name):
                table.error(names_key, f'"{name}" is not a host name or a *.wildcard one')
        names = tuple(n.lower().rstrip(".") for n in listed or ())
        table.finish()
    if cert is None or key is None:
        return None
    return CertificateFiles(cert=cert, key=key, names=names, where=where)


_SNI_NAME = re.compile(r"(\*\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?")


ENDPOINT_EXAMPLES = '"tcp:587", "tcp:587:interface=127.0.0.1", "tcp6:587:interface=\\:\\:1" or "unix:/run/mailrelay.sock"'
"""Shown after a bad endpoint's reason: what a good one looks like."""


def _check_endpoint(table: Table, description: str) -> str | None:
    """Parse a server endpoint string without listening; report why it is wrong."""
    from twisted.internet import reactor

    try:
        serverFromString(reactor, description)
    except Exception as e:  # endpoint parsers raise ValueError, TypeError...
        reason = str(e) or type(e).__name__
        if description.startswith("systemd:") and isinstance(e, (IndexError, KeyError)):
            if "MAILRELAY_LISTEN_FDS" in os.environ:  # a worker (mailrelay.workers.LISTEN_FDS):
                return description  # it accepts on the socket its supervisor got from systemd
            if table.errors.systemd_sockets_later:
                return description
            # Twisted's own words are "list index out of range".
            fds = os.environ.get("LISTEN_FDS", "none")
            reason = f"no such socket from systemd (LISTEN_FDS={fds}): start it through its .socket unit"
        else:
            if isinstance(e, ValueError) and reason.startswith("invalid literal for int()"):
                reason = "the port must be a number, not " + reason.rpartition(": ")[2]
            reason += f" (an endpoint looks like {ENDPOINT_EXAMPLES})"
        table.error("listen", f'bad endpoint "{description}": {reason}')
        return None
    return description
