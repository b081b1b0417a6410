"""
Every configuration key, declared: where it goes, its type, default, allowed values, the
listeners it applies to, and what it is for, in a mail administrator's words.

The parser (`mailrelay.config` and each router type's `parse`) stays the authority on
what is valid; this is its description. `mailrelay.reference` renders it as
`docs/configuration.md`, and `tests/test_reference.py` reads configurations with
`mailrelay.configtable.recording` on and fails when a key the parser reads is missing
here, or has another type or default, or when a key here is never read.

A key's path is its section's path and its name: `listener.idle_timeout`,
`listener.connection_limits.max_sessions`, `tls.sni.cert`. The keys of each router
`type` are in `router(static)`, `router(http)`, `router(map)` and `router(python)`; a
route's keys (wherever a route is written) in `route`; a map rule's in `rule`; a map
file's top level in `map_file`.
"""

from __future__ import annotations

from typing import Any

import attrs

from .configtable import REQUIRED

__all__ = ["COMPUTED", "KINDS", "REQUIRED", "SAME", "SCHEMA", "Key", "Section", "keys"]


class _Marker:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


SAME: Any = _Marker("SAME")
"""`Key.read_default`: the parser passes `Key.default`."""
COMPUTED: Any = _Marker("COMPUTED")
"""`Key.read_default`: the parser's default is computed (from another key, the machine)."""

KINDS = ("string", "integer", "seconds", "number", "boolean", "strings", "file", "table", "tables")
"""The `configtable.Table` methods a key is read with: its type."""

MAIL = ("smtp", "imap", "pop3")
TLS_MODES = ("tls", "starttls")


@attrs.frozen
class Key:
    """One configuration key."""

    name: str
    """As written in its table."""
    kind: str
    """One of `KINDS`."""
    description: str
    """What it does and when to change it, for a mail administrator."""
    default: Any = REQUIRED
    """The value when the key is absent: a TOML value, None (not set), or REQUIRED."""
    example: Any = None
    """A valid value to show and to test with; None: the default."""
    choices: tuple[str, ...] = ()
    minimum: int | None = None
    maximum: int | None = None
    modes: tuple[str, ...] = ()
    """The listener modes it applies to; (): all."""
    protocols: tuple[str, ...] = ()
    """The listener protocols it applies to; (): all."""
    shown_default: str = ""
    """The default in words, when it is not a plain value (computed, or absence)."""
    read_default: Any = SAME
    """What the parser passes as the default when that is not `default`: REQUIRED for a
    key read only when present (its absence means `shown_default`), COMPUTED."""

    @property
    def value(self) -> Any:
        """The example value, else the default."""
        return self.example if self.example is not None else self.default


@attrs.frozen
class Section:
    """A table of keys (or the top level), with a short introduction."""

    path: str
    """The keys' path prefix ("" for the top level)."""
    title: str
    intro: str
    keys: tuple[Key, ...]
    free_keys: str = ""
    """When the table also takes keys of any name: what they are (not read one by one
    by name, so not in `keys`)."""

    def path_of(self, key: Key) -> str:
        return f"{self.path}.{key.name}" if self.path else key.name


def _route_keys() -> tuple[Key, ...]:
    return (
        Key("host", "string", "The upstream server's host name or IP address.", example="10.0.0.5"),
        Key("port", "integer", "The upstream server's port.", example=143, minimum=1, maximum=65535),
        Key(
            "tls",
            "string",
            "How to speak TLS to the upstream: `none`, `tls` (implicit TLS), or `starttls` (the protocol's"
            " STARTTLS first: listeners with a mail protocol only; elsewhere the route is skipped).",
            default="none",
            example="tls",
            choices=("none", "tls", "starttls"),
        ),
        Key(
            "tls_verify",
            "boolean",
            "Verify the upstream's certificate and name. `false` is an explicit opt-out, logged as a"
            " warning once per upstream: use `tls_ca` for a private CA instead.",
            default=True,
        ),
        Key(
            "server_name",
            "string",
            "The name the upstream certificate must carry, and the SNI sent.",
            default=None,
            example="imap.internal.example.org",
            shown_default="`host`",
        ),
        Key(
            "tls_ca",
            "file",
            "A PEM file of the CAs this upstream's certificate is verified against.",
            default=None,
            example="internal-ca.pem",
            shown_default="`[upstream] ca`, else the system trust store",
        ),
        Key(
            "user",
            "string",
            "Log in upstream with this user name (and `password`) instead of the client's credentials.",
            default=None,
            example="proxy@example.org",
            shown_default="the client's",
        ),
        Key(
            "password",
            "string",
            "The password of `user` upstream; never shown in messages or logs.",
            default=None,
            example="secret",
            shown_default="the client's",
        ),
        Key(
            "login",
            "string",
            "How the upstream is logged in: `passthrough` (the client's or the route's credentials:"
            " the upstream checks the password), `xclient` (Postfix XCLIENT: the upstream takes"
            " mailrelay's word) or `none`. `xclient` and `none` are refused on listeners that take"
            " passwords unless the router checks them.",
            default="passthrough",
            choices=("passthrough", "xclient", "none"),
        ),
        Key(
            "proxy_protocol",
            "integer",
            "Send a PROXY protocol header of this version (1 or 2) naming the client first on the"
            " upstream connection (Dovecot's `haproxy_trusted_networks`, Postfix's"
            " `smtpd_upstream_proxy_protocol`).",
            default=None,
            example=2,
            minimum=1,
            maximum=2,
            shown_default="no header",
        ),
        Key(
            "auth_mechanism",
            "string",
            "The upstream AUTH mechanism of a `passthrough` login (Exchange wants `login`; for IMAP and"
            " POP3 `login` means the LOGIN command, or USER and PASS).",
            default="plain",
            choices=("plain", "login"),
        ),
        Key(
            "forward_client",
            "boolean",
            "Tell the upstream the client's address before the login: IMAP `ID`, POP3 and SMTP `XCLIENT`"
            " (the upstream must trust mailrelay for it).",
            default=False,
            example=True,
        ),
    )


SCHEMA: tuple[Section, ...] = (
    Section(
        "",
        "Top level",
        "Keys that must come before the first `[table]` of the file.",
        (
            Key(
                "drain_timeout",
                "seconds",
                "When the service stops, how long open sessions may go on before they are dropped.",
                default=30,
            ),
            Key(
                "workers",
                "integer",
                'Processes serving every listener; `"auto"` is one per CPU core. Each counts connection and'
                " login limits for itself unless `[redis]` is set (see [workers.md](workers.md)).",
                default=1,
                example=2,
                minimum=1,
                maximum=1024,
            ),
            Key("upstream", "table", "How upstream servers are reached: `[upstream]`.", default=None),
            Key("tls", "table", "The certificates of `tls` and `starttls` listeners: `[tls]`.", default=None),
            Key("login_limits", "table", "The brute-force defence: `[login_limits]`.", default=None),
            Key("router", "table", "The router of every listener without its own: `[router]`.", default=None),
            Key("metrics", "table", "A Prometheus endpoint: `[metrics]`.", default=None),
            Key("redis", "table", "Login limits and the route cache shared by a fleet: `[redis]`.", default=None),
            Key("log", "table", "The session log line's form: `[log]`.", default=None),
            Key("listener", "tables", "The listeners: at least one `[[listener]]`."),
        ),
    ),
    Section(
        "listener",
        "[[listener]]",
        "One address mailrelay accepts connections on, and what it does with them. `mode`:"
        " `splice` forwards the bytes as they are (routing by client address, or by the SNI name"
        " with `preread_sni`); `tls` terminates TLS at accept; `starttls` speaks the protocol until"
        " the client's STARTTLS. With a mail `protocol` mailrelay takes the login itself and asks"
        " the router where it goes.",
        (
            Key(
                "listen",
                "string",
                "Where to listen: a Twisted server endpoint string such as `tcp:993`,"
                " `tcp6:993:interface=\\:\\:`, `unix:/run/mailrelay.sock` or `systemd:domain=INET:index=0`.",
                example="tcp:993",
            ),
            Key(
                "name",
                "string",
                "The listener's name in logs, metrics and a router's requests; names must be unique.",
                default=None,
                example="imaps",
                shown_default="the `listen` string",
                read_default=COMPUTED,
            ),
            Key(
                "mode",
                "string",
                "`splice`, `tls` or `starttls` (see above).",
                choices=("splice", "tls", "starttls"),
                example="tls",
            ),
            Key(
                "protocol",
                "string",
                "The mail protocol spoken before routing: `smtp`, `imap`, `pop3`; `none` routes at once"
                " (by address, SNI) and splices (`starttls` needs a mail protocol; `splice` takes only"
                " `none`).",
                default="none",
                example="smtp",
                choices=("smtp", "imap", "pop3", "none"),
            ),
            Key(
                "idle_timeout",
                "seconds",
                "Once spliced or relayed, close a session after this long without a byte either way.",
                default=3600,
            ),
            Key(
                "router_timeout",
                "seconds",
                "A router that has not answered by then fails the request (a temporary failure for the"
                " client, who may try again).",
                default=30,
            ),
            Key(
                "handshake_timeout",
                "seconds",
                "How long a client may take to finish its TLS handshake.",
                default=30,
                modes=TLS_MODES,
            ),
            Key(
                "preread_sni",
                "boolean",
                "Peek the SNI name of the client's TLS ClientHello for the router, forwarding the bytes"
                " unchanged (nginx's `ssl_preread`): the upstream terminates TLS.",
                default=False,
                example=True,
                modes=("splice",),
            ),
            Key(
                "preread_timeout",
                "seconds",
                "With `preread_sni`, how long to wait for the client's first bytes; a silent client"
                " (plain SMTP, IMAP, POP3) is then routed without a name.",
                default=10,
                modes=("splice",),
            ),
            Key(
                "zero_copy",
                "boolean",
                "Move bytes between two plain TCP connections inside the kernel (`os.splice`); `false`"
                " keeps every byte in Python (see [performance.md](performance.md)).",
                default=True,
            ),
            Key(
                "hostname",
                "string",
                "mailrelay's name in the greeting, the EHLO reply and the CRAM-MD5 challenge.",
                default=None,
                example="mail.example.org",
                protocols=MAIL,
                shown_default="this machine's host name",
                read_default=COMPUTED,
            ),
            Key(
                "starttls",
                "string",
                "`required` refuses logins and mail before STARTTLS; `optional` allows them in plaintext.",
                default="required",
                choices=("optional", "required"),
                modes=("starttls",),
                protocols=MAIL,
            ),
            Key(
                "auth",
                "strings",
                "The login mechanisms accepted and advertised: `plain`, `login`, `cram-md5`, `xoauth2`,"
                " `oauthbearer`, `external` (a verified client certificate: needs `[tls] client_ca`);"
                " SMTP also `none` (mail without a login: MX and relay use), POP3 also `apop`.",
                default=["plain", "login"],
                protocols=MAIL,
            ),
            Key(
                "max_attempts",
                "integer",
                "Failed logins after which the connection is closed.",
                default=3,
                minimum=1,
                maximum=1000,
                protocols=MAIL,
            ),
            Key(
                "max_errors",
                "integer",
                "Unknown or malformed commands after which the connection is closed.",
                default=5,
                minimum=1,
                maximum=1000,
                protocols=MAIL,
            ),
            Key(
                "login_timeout",
                "seconds",
                "How long a client may stay silent before it is routed.",
                default=60,
                protocols=MAIL,
            ),
            Key(
                "login_deadline",
                "seconds",
                "How long after accept a client may take to log in (or, without a login, to be routed),"
                " however busy it keeps the connection; a login in flight is finished first.",
                default=180,
                protocols=MAIL,
            ),
            Key(
                "max_junk_commands",
                "integer",
                "Commands achieving nothing before the login (NOOP, RSET, a third EHLO...) after which the connection is closed.",
                default=20,
                minimum=1,
                maximum=10000,
                protocols=MAIL,
            ),
            Key(
                "capabilities",
                "strings",
                "The extensions advertised besides STARTTLS and the login methods (which come from"
                " `starttls` and `auth`): list only what the upstream supports after the login.",
                default=None,
                example=["PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES"],
                protocols=MAIL,
                shown_default="the protocol's usual set",
            ),
            Key(
                "size",
                "integer",
                "The message size limit advertised as SIZE (0: SIZE without a number).",
                default=None,
                example=52428800,
                minimum=0,
                protocols=("smtp",),
                shown_default="not advertised",
            ),
            Key(
                "vet_recipients",
                "string",
                'With `auth = ["none"]`, ask the router about the `first` RCPT of a session only (as'
                " nginx does), or about `all` of them.",
                default="first",
                choices=("first", "all"),
                protocols=("smtp",),
            ),
            Key(
                "proxy_protocol",
                "boolean",
                "Every connection starts with a PROXY protocol header (v1 or v2) naming the real client:"
                " for listeners behind HAProxy or a load balancer (see [proxy-protocol.md](proxy-protocol.md)).",
                default=False,
                example=True,
            ),
            Key(
                "trusted_proxies",
                "strings",
                "With `proxy_protocol`, the addresses or networks allowed to send the header; a"
                " connection from anywhere else is closed.",
                default=None,
                example=["10.0.0.10", "192.0.2.0/24"],
                shown_default='`["127.0.0.0/8", "::1"]`',
                read_default=REQUIRED,
            ),
            Key(
                "proxy_timeout",
                "seconds",
                "With `proxy_protocol`, how long a connection may take to send the whole header.",
                default=5,
            ),
            Key(
                "router",
                "table",
                "This listener's own router, any `type` (the keys of `[router]`); without it, the `[router]` table routes.",
                default=None,
                shown_default="`[router]`",
            ),
            Key(
                "connection_limits",
                "table",
                "The listener's limits on connections: `[listener.connection_limits]`.",
                default=None,
                shown_default="the defaults below",
            ),
        ),
    ),
    Section(
        "listener.connection_limits",
        "[listener.connection_limits]",
        "How many connections a listener takes, in all and per client (an IPv4 address, an IPv6"
        " /64); 0 turns a limit off. Past a limit a connection is turned away before a session"
        " starts, with the protocol's temporary failure.",
        (
            Key(
                "max_sessions",
                "integer",
                "Sessions open on the listener at once, exempt clients included. Each holds two file"
                " descriptors; mailrelay warns at start when its limit on open files (systemd's"
                " `LimitNOFILE`) is too low for this.",
                default=5000,
                minimum=0,
                maximum=1_000_000,
            ),
            Key(
                "max_per_client",
                "integer",
                "Sessions open at once per client. IMAP clients keep five or more connections per"
                " account: put large NATs and webmail hosts in `exempt`.",
                default=200,
                minimum=0,
                maximum=1_000_000,
            ),
            Key(
                "max_rate_per_client",
                "integer",
                "New connections per client per minute (a burst of this many, refilled at this rate).",
                default=300,
                minimum=0,
                maximum=1_000_000,
            ),
            Key(
                "exempt",
                "strings",
                "Addresses or networks with no per-client limits (webmail hosts, large NATs); `max_sessions` still counts them.",
                default=None,
                example=["10.0.0.0/8"],
                shown_default="none",
                read_default=REQUIRED,
            ),
        ),
    ),
    Section(
        "upstream",
        "[upstream]",
        "How mailrelay reaches the upstream servers its routers name.",
        (
            Key(
                "connect_timeout",
                "seconds",
                "Each route's TCP connect, name resolution included; past it the next route is tried.",
                default=10,
            ),
            Key(
                "login_timeout",
                "seconds",
                "Each route's whole attempt: connect, TLS handshake, greeting, STARTTLS and login"
                " (Dovecot's `login_proxy_timeout`).",
                default=30,
            ),
            Key(
                "ca",
                "file",
                "A PEM file of the CAs upstream certificates are verified against (a private CA).",
                default=None,
                example="internal-ca.pem",
                shown_default="the system trust store",
            ),
        ),
    ),
    Section(
        "tls",
        "[tls]",
        "The certificates `tls` and `starttls` listeners present. Without `[tls]`, they get a"
        " self-signed certificate (and a warning is logged). Files are read and checked before"
        " anything listens, and again on SIGHUP.",
        (
            Key("cert", "file", "The certificate chain (PEM), leaf first.", example="fullchain.pem"),
            Key(
                "key",
                "file",
                "The certificate's private key (PEM, not encrypted).",
                default=None,
                example="privkey.pem",
                shown_default="the `cert` file (a combined PEM)",
                read_default=COMPUTED,
            ),
            Key(
                "min_version",
                "string",
                "The oldest TLS version accepted.",
                default="1.2",
                choices=("1.0", "1.1", "1.2", "1.3"),
            ),
            Key(
                "ciphers",
                "string",
                "An OpenSSL cipher string for TLS 1.2 and older.",
                default=None,
                example="ECDHE+AESGCM:ECDHE+CHACHA20",
                shown_default="Mozilla's intermediate list",
            ),
            Key(
                "client_ca",
                "file",
                "Ask clients for a certificate, verified against the CAs in this PEM file (for `auth ="
                ' ["external"]` and the routers\' `client_cert`).',
                default=None,
                example="clients-ca.pem",
                shown_default="no client certificates asked for",
            ),
            Key(
                "client_cert",
                "string",
                "With `client_ca`: `optional` serves clients without a certificate too; `required` refuses them.",
                default=None,
                example="optional",
                choices=("optional", "required"),
                shown_default='`"optional"`',
            ),
            Key("sni", "tables", "More certificates, chosen by the name a client asks for: `[[tls.sni]]`.", default=None),
        ),
    ),
    Section(
        "tls.sni",
        "[[tls.sni]]",
        "A further certificate, presented to a client whose SNI name matches one of its names"
        " exactly or a `*.` wildcard one label deep (the first match wins); other clients get"
        " the `[tls]` one.",
        (
            Key("cert", "file", "The certificate chain (PEM), leaf first.", example="other-fullchain.pem"),
            Key(
                "key",
                "file",
                "Its private key.",
                default=None,
                example="other-privkey.pem",
                shown_default="the `cert` file",
                read_default=COMPUTED,
            ),
            Key(
                "names",
                "strings",
                "The names it serves (`mail.other.org`, `*.other.org`).",
                default=None,
                example=["mail.other.org", "*.other.org"],
                shown_default="the certificate's own DNS names",
            ),
            Key(
                "name",
                "string",
                "One name, instead of `names` (not both).",
                default=None,
                example="mail.other.org",
            ),
        ),
    ),
    Section(
        "login_limits",
        "[login_limits]",
        "The brute-force defence shared by every listener, on by default: failed logins are"
        " counted per client address (IPv6 per /64) and per user over `window` seconds. Past"
        " `max_per_client` an address gets temporary failures without the router being asked;"
        " past `max_per_user` a user's logins are slowed down, never locked out.",
        (
            Key("window", "seconds", "How long a failed login is remembered.", default=600),
            Key(
                "max_per_client",
                "integer",
                "Failed logins (and logins in flight) from one address; 0: no limit.",
                default=20,
                minimum=0,
                maximum=1_000_000,
            ),
            Key(
                "max_per_user",
                "integer",
                "Failed logins of one user before its logins are slowed down; 0: no slowdown.",
                default=10,
                minimum=0,
                maximum=1_000_000,
            ),
            Key(
                "delay",
                "number",
                "Seconds before a refused login is answered (a tarpit), and the first step of the"
                " per-user slowdown, which doubles with each failure; 0 turns both off.",
                default=1,
            ),
            Key("max_delay", "seconds", "The longest a login of a user past `max_per_user` is held back.", default=30),
            Key(
                "exempt",
                "strings",
                "Addresses or networks (a webmail host) neither counted nor limited per address; their"
                " failed logins still count for the user.",
                default=None,
                example=["192.0.2.10", "2001:db8::/32"],
                shown_default="none",
                read_default=REQUIRED,
            ),
        ),
    ),
    Section(
        "metrics",
        "[metrics]",
        "A Prometheus endpoint (see [metrics.md](metrics.md)); without `[metrics]`, none.",
        (
            Key(
                "listen",
                "string",
                "Where `/metrics` is served: a server endpoint string, as a listener's `listen`. Keep it on a private address.",
                example="tcp:9108:interface=127.0.0.1",
            ),
        ),
    ),
    Section(
        "redis",
        "[redis]",
        "A Redis server a fleet of mailrelay processes shares login counts (and, with"
        " `secret_file`, the route cache) in (see [redis.md](redis.md)); without it, each process keeps"
        " its own.",
        (
            Key(
                "url",
                "string",
                "`redis://[[user]:password@]host:port/db`, or `unix:/path/to/redis.sock`; the password is never shown.",
                example="redis://127.0.0.1:6379/0",
            ),
            Key(
                "timeout",
                "seconds",
                "How long each Redis call may take; past it the process decides alone (one warning until Redis is back).",
                default=0.5,
            ),
            Key(
                "key_prefix",
                "string",
                "The prefix of every key mailrelay writes (at most 64 printable characters), so that"
                " several fleets can share one Redis.",
                default="mailrelay:",
            ),
            Key(
                "secret_file",
                "file",
                "A file only the fleet can read, holding its shared secret: it keys and authenticates the"
                " shared route cache's entries. Without it, route caches stay per process.",
                default=None,
                example="fleet.key",
                shown_default="route caches per process",
            ),
        ),
    ),
    Section(
        "log",
        "[log]",
        "How mailrelay writes its log.",
        (
            Key(
                "sessions",
                "string",
                "The session line's form: `text` (one line of key=value) or `json` (one JSON object per"
                " session, for log shippers).",
                default="text",
                choices=("text", "json"),
            ),
        ),
    ),
    Section(
        "router",
        "[router]",
        "Who decides where each session goes. `[router]` serves every listener without its own"
        " `router = { ... }`. Every type takes `type`, `cache_ttl` and `cache_size`; the others"
        " are the type's.",
        (
            Key(
                "type",
                "string",
                "`static` (fixed routes), `http` (an nginx-style auth_http service), `map` (rules from"
                " the configuration or a file), `python` (your own class).",
                example="static",
                choices=("static", "python", "http", "map"),
            ),
            Key(
                "cache_ttl",
                "seconds",
                "Remember each successful answer this long, per login (user, a keyed digest of the"
                " password, client, listener, TLS facts); refusals are never remembered. Emptied on SIGHUP.",
                default=None,
                example=60,
                shown_default="no cache",
            ),
            Key(
                "cache_size",
                "integer",
                "With `cache_ttl`, the most answers remembered.",
                default=10000,
                minimum=1,
                maximum=10_000_000,
            ),
        ),
    ),
    Section(
        "router(static)",
        'Routers of type "static"',
        "Every session goes to the same route, or the first of several that can be connected:"
        " write one route's keys (see [Routes](#routes)) in `[router]` itself, or `routes`.",
        (
            Key(
                "routes",
                "tables",
                "Routes tried in order while connecting or logging in fails: `routes = [{ host = ..., port = ... }, ...]`.",
                default=None,
                shown_default="the route in `[router]` itself",
            ),
        ),
    ),
    Section(
        "router(http)",
        'Routers of type "http"',
        "Asks an HTTP service for each login the way nginx's `auth_http` does (the same request"
        " headers, the same answers: `Auth-Status`, `Auth-Server`, `Auth-Port`...): see"
        " [routers.md](routers.md); the module docstring of"
        " [mailrelay/routers/http.py](../mailrelay/routers/http.py) is the full reference.",
        (
            Key("url", "string", "The service: an `http://` or `https://` URL.", example="https://auth.example.org/mail"),
            Key("timeout", "seconds", "How long the service may take to answer a request.", default=10),
            Key(
                "headers",
                "table",
                'Extra request headers (nginx\'s `auth_http_header`), e.g. `{ X-Auth-Key = "..." }`;'
                " their values are never shown.",
                default=None,
                example={"X-Auth-Key": "secret"},
            ),
            Key(
                "ca",
                "file",
                "With an `https://` URL, a PEM file of the CAs the service's certificate is verified against.",
                default=None,
                example="auth-ca.pem",
                shown_default="the system trust store",
            ),
            Key(
                "max_connections",
                "integer",
                "Idle keep-alive connections kept to the service.",
                default=10,
                minimum=1,
                maximum=10000,
            ),
            Key(
                "max_wait_retries",
                "integer",
                "How many `Auth-Status: WAIT` answers are followed (asking again after `Auth-Wait`) before the request fails.",
                default=10,
                minimum=0,
                maximum=10000,
            ),
        ),
    ),
    Section(
        "router(http).headers",
        "[router] headers",
        "Extra headers sent with every request to the auth service.",
        (),
        free_keys="Each key is a header name, each value (a string) its value.",
    ),
    Section(
        "router(map)",
        'Routers of type "map"',
        "Routes by rules, the first that matches wins: `[[router.rule]]` tables and a"
        " `[router.default]` in the configuration, or a separate file of them (`file`), re-read"
        " when it changes. A rule may check the client's password against a hash.",
        (
            Key(
                "file",
                "file",
                "A map file of `[[rule]]` tables and a `[default]` (see [A map file](#a-map-file)), re-read when it changes"
                " and on SIGHUP; a broken version keeps the previous map. Not together with `rule`"
                " and `default`.",
                default=None,
                example="routes.toml",
                shown_default="the rules are in `[router]`",
            ),
            Key(
                "check_interval",
                "seconds",
                "With `file`, how often the file is looked at for a change.",
                default=2,
            ),
            Key(
                "max_hash_checks",
                "integer",
                "Password hashes checked at once (they are slow on purpose).",
                default=4,
                minimum=1,
                maximum=1000,
            ),
            Key(
                "max_hash_queue",
                "integer",
                "Password checks waiting their turn; past it a login gets a temporary failure.",
                default=100,
                minimum=0,
                maximum=1_000_000,
            ),
            Key("rule", "tables", "The rules, in order: `[[router.rule]]` (see [Map rules](#map-rules)).", default=None),
            Key(
                "default",
                "table",
                "The answer when no rule matches: a route's keys, or `route`, `routes`, `reject`, `reject_wait` as in a rule.",
                default=None,
                shown_default='refuse: "no route for this session" ("invalid credentials" for a password login)',
            ),
        ),
    ),
    Section(
        "router(python)",
        'Routers of type "python"',
        "Your own Router class (see [routers.md](routers.md)).",
        (
            Key(
                "class",
                "string",
                "The class, as `package.module:Class`; it must be importable where mailrelay runs.",
                example="mycompany.routing:Router",
            ),
        ),
        free_keys="Every other key is passed to the class as a keyword argument (not checked here: the class checks them).",
    ),
    Section(
        "rule",
        "Map rules",
        "A `[[router.rule]]` table (in a map file, `[[rule]]`): conditions, all of which must match"
        " (each one value or a list, any of which may), and one answer. `[router.default]` takes the answer"
        " keys (`route`, `routes`, `reject`, `reject_wait`) too.",
        (
            Key(
                "user",
                "strings",
                "The login name, whole, compared case-insensitively (SMTP without a login: the recipient).",
                default=None,
                example=["alice@example.org"],
                shown_default="any",
                read_default=REQUIRED,
            ),
            Key(
                "domain",
                "strings",
                "The part of the login after its last `@`, exactly (no subdomains).",
                default=None,
                example=["example.org"],
                shown_default="any",
                read_default=REQUIRED,
            ),
            Key(
                "listener",
                "strings",
                "The listener's `name`.",
                default=None,
                example=["imaps"],
                shown_default="any",
                read_default=REQUIRED,
            ),
            Key(
                "client",
                "strings",
                "The client's address: networks (`192.0.2.0/24`) or single addresses.",
                default=None,
                example=["192.0.2.0/24", "2001:db8::/32"],
                shown_default="any",
                read_default=REQUIRED,
            ),
            Key(
                "protocol",
                "strings",
                "The listener's protocol: `smtp`, `imap`, `pop3` or `none`.",
                default=None,
                example=["imap", "pop3"],
                shown_default="any",
                read_default=REQUIRED,
            ),
            Key(
                "password",
                "string",
                "A bcrypt (`$2b$...`) or argon2 (`$argon2id$...`) hash the client's password must match"
                " (PLAIN and LOGIN logins); a mismatch refuses the login after `reject_wait` (2 s)."
                ' Only such a rule may answer a password login with a `login = "xclient"` or'
                ' `"none"` route.',
                default=None,
                example="$2b$12$" + "K" * 53,
                shown_default="no check",
            ),
            Key("route", "table", "The answer: one route (see [Routes](#routes)).", read_default=REQUIRED, default=None),
            Key("routes", "tables", "The answer: routes tried in order.", default=None),
            Key(
                "reject",
                "string",
                "The answer: refuse the login with this one-line message, shown to the client.",
                default=None,
                example="this account has moved",
            ),
            Key(
                "reject_wait",
                "number",
                "Seconds before a `reject`, or a failed `password` check, is answered.",
                default=None,
                example=3,
                shown_default="0 (2 for a failed password)",
            ),
        ),
    ),
    Section(
        "route",
        "Routes",
        "An upstream server and how to log in to it: the keys of a `static` `[router]` or of each"
        " of its `routes`, of a map rule's `route` or `routes`, and of a map's default.",
        _route_keys(),
    ),
    Section(
        "map_file",
        "A map file",
        "The file a `map` router's `file` names holds, at its top level, the rules as"
        " `[[rule]]` tables and the answer without a match as `[default]` (the same keys as in"
        " `[router]`). Replace it atomically (write a new file, rename it over the old).",
        (
            Key("rule", "tables", "The rules, in order (see [Map rules](#map-rules)).", default=None),
            Key(
                "default",
                "table",
                "The answer when no rule matches.",
                default=None,
                shown_default='refuse: "no route for this session" ("invalid credentials" for a password login)',
            ),
        ),
    ),
)
"""Every section, in the order the reference shows them."""


def keys() -> dict[str, tuple[Section, Key]]:
    """Every key by its path."""
    return {section.path_of(key): (section, key) for section in SCHEMA for key in section.keys}
