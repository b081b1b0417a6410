"""`type = "static"`: every session goes to the same route, or list of fallbacks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import attrs
from zope.interface import implementer

from ..configtable import Table
from ..router import AUTH_MECHANISMS, LOGINS, TRUSTING_LOGINS, UPSTREAM_TLS, IRouter, Route, RouteRequest
from ..routerspec import RouterSpec, UncheckedLogin


@implementer(IRouter)
@attrs.frozen
class StaticRouter:
    """Answers every request with the same routes, in order."""

    verifies_passwords: ClassVar[bool] = False
    """It checks no password: on a listener that takes passwords, only routes on which
    the upstream checks them (`login = "passthrough"`) are safe."""
    routes: Sequence[Route]

    def route(self, request: RouteRequest) -> list[Route]:
        return list(self.routes)


def route_from_table(table: Table) -> Route | None:
    """A Route from a table whose keys are Route's fields; None if invalid."""
    fields = dict(
        host=table.string("host"),
        port=table.integer("port", minimum=1, maximum=65535),
        tls=table.string("tls", "none", choices=UPSTREAM_TLS),
        tls_verify=table.boolean("tls_verify", True),
        server_name=table.string("server_name", None),
        user=table.string("user", None),
        password=table.string("password", None, secret=True),
        login=table.string("login", "passthrough", choices=LOGINS),
        proxy_protocol=table.integer("proxy_protocol", None, minimum=1, maximum=2),
        tls_ca=table.file("tls_ca", None),
        auth_mechanism=table.string("auth_mechanism", "plain", choices=AUTH_MECHANISMS),
        forward_client=table.boolean("forward_client", False),
    )
    table.finish()
    if fields["host"] == "":
        table.error("host", "must not be empty")
        return None
    if any(fields[k] is None for k in ("host", "port", "tls", "tls_verify", "login", "auth_mechanism", "forward_client")):
        return None
    return Route(**fields)


def parse(table: Table) -> RouterSpec | None:
    if table.has("routes"):
        tables = list(table.tables("routes"))
        routes = [route_from_table(t) for t in tables]
        if not table.data["routes"]:
            table.error("routes", "must list at least one route")
        table.finish()
    else:
        tables = [table]
        routes = [route_from_table(table)]
    if not routes or None in routes:
        return None
    valid = [r for r in routes if r is not None]
    description = "static: " + ", then ".join(describe_route(r) for r in valid)
    # Whatever the listener, every route answers every login: none is checked here.
    unchecked: list[UncheckedLogin] = [
        (t.key_path("login"), r.login, "the static router checks none")
        for t, r in zip(tables, valid, strict=True)
        if r.login in TRUSTING_LOGINS
    ]
    return RouterSpec(
        "static",
        description,
        lambda reactor=None, password_listeners=(): StaticRouter(tuple(valid)),
        unchecked_logins=lambda listener, protocol: unchecked,
    )


def describe_route(route: Route) -> str:
    """`host:port`, with what is not the default in parentheses (never a password)."""
    extras = [f"tls={route.tls}"] if route.tls != "none" else []
    if route.login != "passthrough":
        extras.append(f"login={route.login}")
    if route.proxy_protocol:
        extras.append(f"proxy_protocol={route.proxy_protocol}")
    if route.forward_client:
        extras.append("forward_client")
    return route.address + (f" ({', '.join(extras)})" if extras else "")
