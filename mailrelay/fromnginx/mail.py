"""
nginx's `mail {}` block -> mailrelay listeners with an `http` router.

Each `server {}` with its `listen`s becomes one listener per address: `listen ... ssl`
is mode "tls", `starttls on|only` mode "starttls" with starttls "optional"|"required".
A plain listen (no ssl, no starttls: nginx takes passwords in the clear there) has no
equivalent: mailrelay's mail listeners always offer STARTTLS, so it becomes a
`starttls` listener with starttls "required" (or "optional" for an SMTP listener that
takes no password, MX use), warned. `auth_http` becomes an `http` router, which speaks
nginx's auth_http protocol, so the same auth service answers mailrelay unchanged.
"""

from __future__ import annotations

from typing import Any

from .listen import Listen, inbound_proxy_protocol, server_listens
from .parser import Directive
from .result import Listener, Translation
from .scope import Scope, flag, hostname_ok, seconds_of
from .tlspool import TLSPool

__all__ = ["translate_mail"]

PORT_PROTOCOLS = {143: "imap", 993: "imap", 110: "pop3", 995: "pop3", 25: "smtp", 465: "smtp", 587: "smtp"}
"""How nginx guesses a server's protocol from its first listen port when it has none."""

NGINX_AUTH_DEFAULTS = {"smtp": ("plain", "login"), "imap": ("plain",), "pop3": ("plain",)}
MAILRELAY_AUTH = {
    "smtp": ("plain", "login", "cram-md5", "external", "none"),
    "imap": ("plain", "login", "cram-md5", "external"),
    "pop3": ("plain", "apop", "cram-md5", "external"),
}
"""The nginx methods each protocol takes, all of which mailrelay's `auth` names alike."""

OWN_CAPABILITIES = {
    "smtp": ("STARTTLS", "AUTH"),
    "imap": ("IMAP4REV1", "LITERAL+", "SASL-IR", "ID", "STARTTLS", "LOGINDISABLED"),
    "pop3": ("USER", "SASL", "STLS", "RESP-CODES", "AUTH-RESP-CODE"),
}
"""Capabilities mailrelay advertises itself (from `auth` and `starttls`): not listed again."""

WARNED = {
    "error_log": "mailrelay logs through twistd (-l FILE, or stdout under systemd)",
    "smtp_greeting_delay": "no equivalent: mailrelay greets at once (pipelining before the greeting is answered as usual)",
    "smtp_client_buffer": "no equivalent: mailrelay takes command lines of up to 32 KiB",
    "imap_client_buffer": "no equivalent: mailrelay takes command lines of up to 32 KiB",
    "proxy_buffer": "no equivalent: mailrelay sizes its buffers itself",
    "auth_http_pass_client_cert": "no equivalent: mailrelay sends the certificate's subject, issuer, serial and"
    " fingerprint (Auth-SSL-*), never Auth-SSL-Cert",
    "so_keepalive": "TCP keepalive is not set on mailrelay's connections",
}
IGNORED = {
    "proxy": "nginx never reads it either",
}


def translate_mail(mail: Directive, t: Translation, pool: TLSPool) -> None:
    """Translate one `mail {}` block into `t`."""
    assert mail.block is not None
    outer = tuple(d for d in mail.block if d.name != "server")
    servers = [d for d in mail.block if d.name == "server"]
    if not servers:
        t.warn(mail, "no server {} block: nothing to translate")
    for server in servers:
        _server(server, outer, t, pool)
    for directive in outer:
        if not t.noted(directive):
            if directive.block is not None:
                t.warn(directive, "not a block of the mail module: not translated")
            elif directive.name.split("_")[0] in ("smtp", "imap", "pop3"):
                t.ignored(directive, f"no {directive.name.split('_')[0]} server uses it")
            else:
                t.ignored(directive, "every server sets its own")


def _server(server: Directive, outer: tuple[Directive, ...], t: Translation, pool: TLSPool) -> None:
    assert server.block is not None
    scope = Scope(outer, server.block)
    listens = server_listens(scope, t)
    protocol = _protocol(server, scope, listens, t)
    router = _router(server, scope, t)
    if not listens or protocol is None or router is None:
        if not t.noted(server):
            t.ignored(server, "not translated: see the warnings on its directives")
        _rest(scope, t, protocol, skipped=True)
        return
    t.mapped(server, f'{len(listens)} [[listener]] with protocol = "{protocol}"')

    keys: dict[str, Any] = {}
    hostname = _hostname(scope, keys, t)
    auth = _auth(scope, protocol, pool, t)
    keys["auth"] = list(auth)
    _capabilities(scope, protocol, keys, t)
    starttls = scope.last("starttls")
    obsolete_ssl = scope.last("ssl")
    ssl_on = obsolete_ssl is not None and flag(obsolete_ssl) is True
    if obsolete_ssl is not None:
        if ssl_on:
            t.warn(obsolete_ssl, 'obsolete (removed in nginx 1.25.1): mode = "tls" on every listen of this server')
        else:
            t.ignored(obsolete_ssl, "off is the default")
    _timeouts(scope, keys, t)
    max_errors = scope.last("max_errors")
    if max_errors is not None:
        if max_errors.args and max_errors.args[0].isdigit() and 1 <= int(max_errors.args[0]) <= 1000:
            keys["max_errors"] = int(max_errors.args[0])
            t.mapped(max_errors, "max_errors")
        else:
            t.warn(max_errors, "not a number from 1 to 1000: mailrelay's default (5) applies")
    _smtp_login(scope, protocol, t)
    _error_messages(scope, t)
    _resolver(scope, protocol, t)
    _outbound_proxy_protocol(scope, t)
    real_ip_from = scope.take("set_real_ip_from")

    nginx_tls = False
    for listen, sources in listens:
        entry: dict[str, Any] = {"name": t.unique_name(f"{protocol}-{listen.port or 'unix'}"), "listen": listen.endpoint}
        if listen.ssl or ssl_on:
            entry["mode"] = "tls"
            nginx_tls = True
            if starttls is not None and starttls.args[:1] != ("off",):
                t.warn(starttls, "ignored on a listen ... ssl port (TLS from the first byte)")
        else:
            entry["mode"] = "starttls"
            entry["starttls"] = _starttls(starttls, auth, sources[0], t)
            nginx_tls = nginx_tls or (starttls is not None and starttls.args[:1] in (("on",), ("only",)))
        entry["protocol"] = protocol
        entry.update(keys)
        if listen.proxy_protocol:
            inbound_proxy_protocol(entry, real_ip_from, sources[0], t)
        comment = [f"{server.where} server {{ {' '.join(d.text() for d in sources)} }}"]
        t.listeners.append(Listener(comment, {**entry, "router": router}))
    if not any(listen.proxy_protocol for listen, _ in listens):
        for directive in real_ip_from:
            t.ignored(directive, "no listen ... proxy_protocol here: nginx does not use it either")
    if starttls is not None and not t.noted(starttls):
        t.mapped(starttls, "mode and starttls of the listeners")
    # Every mail listener of mailrelay terminates TLS (a plain port offers STARTTLS).
    pool.add(server, scope, hostname, t, nginx_tls)
    _rest(scope, t, protocol)


def _rest(scope: Scope, t: Translation, protocol: str | None, skipped: bool = False) -> None:
    """The directives no handler took: known ones warned or ignored with why, unknown
    ones warned; another protocol's left for the block's pass."""
    for directive in scope.rest():
        prefix = directive.name.split("_")[0]
        if prefix in ("smtp", "imap", "pop3") and prefix != protocol:
            continue
        if skipped:
            t.ignored(directive, "its server is not translated (see the warning on it)")
        elif directive.name in IGNORED:
            t.ignored(directive, IGNORED[directive.name])
        else:
            t.unknown(directive, WARNED, "mail")


def _protocol(server: Directive, scope: Scope, listens: list[tuple[Listen, list[Directive]]], t: Translation) -> str | None:
    directive = scope.last("protocol")
    if directive is not None:
        if directive.args[:1] in (("smtp",), ("imap",), ("pop3",)):
            t.mapped(directive, "protocol")
            return directive.args[0]
        t.warn(directive, "not smtp, imap or pop3 (nginx refuses it): the server is not translated")
        return None
    if not listens:
        t.warn(server, "no usable listen (nginx refuses a server without one): not translated")
        return None
    port = listens[0][0].port
    guessed = PORT_PROTOCOLS.get(port or 0)
    if guessed is None:
        t.warn(server, "no protocol and no well-known port (nginx refuses it): not translated")
    return guessed


def _router(server: Directive, scope: Scope, t: Translation) -> dict[str, Any] | None:
    auth_http = scope.last("auth_http")
    headers = scope.take("auth_http_header")
    timeout = scope.last("auth_http_timeout")
    if auth_http is None or not auth_http.args:
        t.warn(server, 'no auth_http (nginx refuses it: "no auth_http is defined for server"): not translated')
        return None
    url = auth_http.args[0]
    if url.startswith("unix:"):
        t.warn(
            auth_http, "a unix: auth service has no equivalent (mailrelay's http router speaks TCP): the server is not translated"
        )
        return None
    if "://" not in url:
        url = "http://" + url
    if url.count("/") < 3:
        url += "/"
    router: dict[str, Any] = {"type": "http", "url": url}
    t.mapped(auth_http, 'router = { type = "http", url = ... }: the same auth service, asked the same way')
    if headers:
        router["headers"] = {}
        for header in headers:
            if len(header.args) != 2:
                t.warn(header, "needs a name and a value: not translated")
                continue
            router["headers"][header.args[0]] = header.args[1]
            t.mapped(header, "the http router's headers (values are never shown by check)")
    if timeout is not None:
        value = seconds_of(timeout)
        if value:
            router["timeout"] = value
            t.mapped(timeout, "the http router's timeout")
        else:
            t.warn(timeout, "not a time: mailrelay's default (10 s) applies")
    return router


def _hostname(scope: Scope, keys: dict[str, Any], t: Translation) -> str | None:
    directive = scope.last("server_name")
    if directive is None:
        return None
    name = directive.args[0] if len(directive.args) == 1 else ""
    if not hostname_ok(name):
        t.warn(directive, "not one host name: mailrelay uses the machine's name, as nginx's default does")
        return None
    keys["hostname"] = name
    t.mapped(directive, "hostname (greeting, EHLO reply, CRAM-MD5 and APOP challenges)")
    return name


def _auth(scope: Scope, protocol: str, pool: TLSPool, t: Translation) -> tuple[str, ...]:
    """mailrelay's `auth`: nginx always accepts PLAIN and LOGIN, whatever it lists."""
    directive = scope.last(f"{protocol}_auth")
    listed = tuple(a.lower() for a in directive.args) if directive is not None else NGINX_AUTH_DEFAULTS[protocol]
    unknown = [m for m in listed if m not in MAILRELAY_AUTH[protocol]]
    methods = [m for m in listed if m in MAILRELAY_AUTH[protocol]]
    notes = []
    if "external" in methods and not pool.client_certificates(scope):
        methods.remove("external")
        notes.append("external needs ssl_verify_client on|optional and ssl_client_certificate: left out")
    if unknown:
        notes.append(f"{', '.join(unknown)}: not a {protocol} method, left out")
    if methods == ["none"]:
        auth: tuple[str, ...] = ("none",)
        notes.append(
            'auth = ["none"] (MX use): nginx also accepts AUTH PLAIN and LOGIN here though it does not advertise'
            ' them; mailrelay takes what auth lists: add "plain", "login" if clients log in on this port'
        )
    else:
        auth = tuple(dict.fromkeys(("plain", "login", *methods)))
    if directive is None:
        return auth
    if notes:
        t.warn(directive, "; ".join(notes))
    else:
        t.mapped(directive, f"auth = {list(auth)} (nginx always accepts PLAIN and LOGIN too)")
    return auth


def _capabilities(scope: Scope, protocol: str, keys: dict[str, Any], t: Translation) -> None:
    directive = scope.last(f"{protocol}_capabilities")
    if directive is None:
        return
    kept: list[str] = []
    dropped: list[str] = []
    for capability in directive.args:
        word = capability.split()[0].upper() if capability.split() else ""
        if protocol == "smtp" and word == "SIZE":
            size = capability.split()[1:] or ["0"]
            if size[0].isdigit():
                keys["size"] = int(size[0])
                continue
        if not word or not capability.isprintable():
            t.warn(directive, f"{capability!r} is not a capability: left out")
        elif word in OWN_CAPABILITIES[protocol] or word.startswith("AUTH="):
            dropped.append(capability)
        else:
            kept.append(capability)
    if kept:
        keys["capabilities"] = kept
    message = "capabilities" + (" and size" if "size" in keys else "")
    if dropped:
        message += f"; {', '.join(dropped)} left out: mailrelay advertises those itself (from auth and starttls)"
    t.mapped(directive, message)


def _starttls(starttls: Directive | None, auth: tuple[str, ...], listen: Directive, t: Translation) -> str:
    value = starttls.args[0] if starttls is not None and starttls.args else "off"
    if value == "only":
        if "none" in auth:
            assert starttls is not None
            t.warn(
                starttls,
                'starttls = "required": mailrelay refuses MAIL and RCPT before STARTTLS too, where nginx lets mail'
                ' without a login through in the clear (its "only" covers logins alone): set starttls = "optional"'
                " if senders without TLS must get through",
            )
        return "required"
    if value == "on":
        return "optional"
    # A plain port: nginx takes passwords in the clear there. mailrelay's mail
    # listeners always offer STARTTLS; requiring it is the safe reading, except where
    # no password is taken (MX), where senders without TLS must still get through.
    if auth == ("none",):
        t.warn(
            starttls or listen,
            'a plain port: mode = "starttls" with starttls = "optional" (STARTTLS offered, not required: MX senders'
            " without TLS get through as with nginx)",
        )
        return "optional"
    t.warn(
        starttls or listen,
        'a plain port where nginx takes passwords in the clear: mode = "starttls" with starttls = "required"'
        ' (clients must use STARTTLS before logging in); set starttls = "optional" only if clients cannot',
    )
    return "required"


def _timeouts(scope: Scope, keys: dict[str, Any], t: Translation) -> None:
    timeout = scope.last("timeout")
    if timeout is not None:
        value = seconds_of(timeout)
        if value:
            keys["login_timeout"] = value
            keys["handshake_timeout"] = value
            if value > 180:
                keys["login_deadline"] = value
            t.mapped(timeout, "login_timeout and handshake_timeout (the silence allowed before the session is proxied)")
        else:
            t.warn(timeout, "not a time: mailrelay's defaults apply")
    t.map_time(scope.last("proxy_timeout"), keys, "idle_timeout")
    t.map_time(scope.last("ssl_handshake_timeout"), keys, "handshake_timeout")


def _smtp_login(scope: Scope, protocol: str, t: Translation) -> None:
    """xclient and proxy_smtp_auth: how nginx logs in to the SMTP upstream. The http
    router's SMTP default is nginx's (XCLIENT); the other ways are the auth service's
    answer (`Mailrelay-Login`), there being no key for them."""
    xclient = scope.last("xclient")
    smtp_auth = scope.last("proxy_smtp_auth")
    if protocol != "smtp":
        for directive in (xclient, smtp_auth):
            if directive is not None:
                t.ignored(directive, "SMTP only")
        return
    xclient_on = xclient is None or flag(xclient) is not False
    auth_on = smtp_auth is not None and flag(smtp_auth) is True
    if auth_on:
        forward = " and Mailrelay-Forward-Client: on (XCLIENT with the client's address first)" if xclient_on else ""
        assert smtp_auth is not None
        t.warn(
            smtp_auth,
            "no key for it: the auth service must answer Mailrelay-Login: passthrough (AUTH PLAIN to the"
            f" upstream){forward}; without it mailrelay uses XCLIENT",
        )
        if xclient is not None and not xclient_on:
            t.mapped(xclient, "see proxy_smtp_auth")
        elif xclient is not None:
            t.mapped(xclient, "see proxy_smtp_auth (Mailrelay-Forward-Client)")
        return
    if smtp_auth is not None:
        t.ignored(smtp_auth, "off is the default")
    if xclient is None:
        return
    if xclient_on:
        t.mapped(xclient, "the http router logs SMTP in with XCLIENT by default, as nginx does")
    else:
        t.warn(
            xclient,
            "no key for it: the auth service must answer Mailrelay-Login: none (EHLO only, as nginx with xclient off);"
            " without it mailrelay uses XCLIENT, which an upstream that does not offer it refuses",
        )


def _error_messages(scope: Scope, t: Translation) -> None:
    directive = scope.last("proxy_pass_error_message")
    if directive is None:
        return
    if flag(directive) is True:
        t.mapped(directive, "mailrelay always passes the upstream's refusal of a login to the client")
    else:
        t.warn(directive, "mailrelay passes the upstream's refusal of a login to the client (its code and text) anyway")


def _resolver(scope: Scope, protocol: str, t: Translation) -> None:
    for name in ("resolver", "resolver_timeout"):
        directive = scope.last(name)
        if directive is None:
            continue
        if protocol == "smtp" and name == "resolver" and directive.args[:1] != ("off",):
            t.warn(
                directive,
                "mailrelay does no reverse lookup of clients: Client-Host and XCLIENT NAME are [UNAVAILABLE];"
                " names it connects to are resolved by the system resolver",
            )
        else:
            t.ignored(directive, "nginx's mail proxy resolves only SMTP clients' names; mailrelay uses the system resolver")


def _outbound_proxy_protocol(scope: Scope, t: Translation) -> None:
    directive = scope.last("proxy_protocol")
    if directive is None:
        return
    if directive.args[:1] in (("on",), ("v2",)):
        version = 2 if directive.args[0] == "v2" else 1
        t.warn(
            directive,
            f"no key for the http router: the auth service must answer Mailrelay-Proxy-Protocol: {version}"
            " for mailrelay to send the header",
        )
    else:
        t.ignored(directive, "off is the default")
