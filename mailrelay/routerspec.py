"""
A validated `[router]` table: `RouterSpec`, and `parse_router()` that makes one of any
type.

The backends are named here by `type`, as `"module:function"` strings, and imported only
when a table of that type is read: importing the configuration pulls in no router
backend (nor twisted.web, which the http router needs), and no backend is imported by
anything below it. Each backend module offers `parse(table) -> RouterSpec | None`: it
reads and validates its own keys (reporting problems on the table) and returns how to
build the router.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from typing import Any

import attrs

from .configtable import Errors, Table
from .router import IRouter

__all__ = [
    "PasswordListener",
    "RouterSpec",
    "UncheckedLogin",
    "parse_router",
    "refuse_unchecked_logins",
]

UncheckedLogin = tuple[str, str, str]
"""A route configured to log password logins in on mailrelay's word with no password
check before it: (the key path of its `login`, the login, what does not check)."""
PasswordListener = tuple[str, str]
"""A listener that takes password logins: (name, protocol)."""


def _none(listener: str, protocol: str) -> list[UncheckedLogin]:
    return []


@attrs.frozen
class RouterSpec:
    """
    A validated router table: its type, a one-line description and a builder.

    `build(reactor, password_listeners=())` makes the router; `reactor` (None: the
    global one) is what a router that does I/O or keeps time must use, so that tests can
    give it a fake clock; `password_listeners` are the (name, protocol) of the listeners
    it serves that accept password logins, for a router that reads its routes later
    (a map file) to refuse routes no one would check a password for.
    """

    type: str
    description: str
    build: Callable[..., IRouter]
    verifies_passwords: bool = False
    """Whether the router checks passwords (a map: for rules with a password hash)."""
    unchecked_logins: Callable[[str, str], list[UncheckedLogin]] = _none
    """`(listener, protocol)`: the routes in the table that a password login on that
    listener could get with `login = "xclient"` or `"none"` and no password checked;
    the configuration refuses them."""


ROUTER_TYPES: dict[str, str] = {
    "static": "mailrelay.routers.static:parse",
    "python": "mailrelay.routers.python:parse",
    "http": "mailrelay.routers.http:parse",
    "map": "mailrelay.routers.map:parse",
}
"""Each `type`'s `parse(table) -> RouterSpec | None`, imported when a table of it is read."""

CACHED = "mailrelay.routers.cache:cached"
"""`cached(spec, ttl, size) -> RouterSpec`: a spec whose router's answers are remembered."""

PLANNED_TYPES: tuple[str, ...] = ()


def load(target: str) -> Any:
    """The object a `"package.module:name"` string names (a registry entry above)."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def parse_router(table: Table) -> RouterSpec | None:
    """Read a `[router]` table of any type; None (with errors recorded) when invalid."""
    kind = table.string("type", choices=tuple(ROUTER_TYPES) + PLANNED_TYPES)
    if kind in PLANNED_TYPES:
        available = ", ".join(ROUTER_TYPES)
        table.error("type", f'"{kind}" is not available in this version of mailrelay (available: {available})')
        kind = None
    # Keys every type has, read first (a python router hands the rest to its class).
    cache_ttl = table.seconds("cache_ttl", None)
    cache_size = table.integer("cache_size", 10_000, minimum=1, maximum=10_000_000)
    if kind is None:
        table.rest()
        return None
    parse: Callable[[Table], RouterSpec | None] = load(ROUTER_TYPES[kind])
    spec = parse(table)
    if spec is None or cache_ttl is None or cache_size is None:
        return spec
    cached: Callable[[RouterSpec, float, int], RouterSpec] = load(CACHED)
    return cached(spec, cache_ttl, cache_size)


def refuse_unchecked_logins(
    unchecked_logins: Callable[[str, str], list[UncheckedLogin]], password_listeners: Iterable[PasswordListener], errors: Errors
) -> None:
    """
    Report each route that `unchecked_logins` (a RouterSpec's, a route map's) finds for
    one of `password_listeners`: with `login = "xclient"` or `"none"` the upstream takes
    mailrelay's word for who logged in, so on a listener that takes passwords someone
    before it must check them. One error per route, naming the listeners, saying what
    to do instead.
    """
    found: dict[UncheckedLogin, list[str]] = {}
    for name, protocol in password_listeners:
        for unchecked in unchecked_logins(name, protocol):
            found.setdefault(unchecked, []).append(name)
    for (key, login, why), names in found.items():
        listed = ", ".join(f'"{name}"' for name in names)
        which = f"listener {listed} accepts" if len(names) == 1 else f"listeners {listed} accept"
        errors.add(
            key,
            f'"{login}" makes the upstream take mailrelay\'s word for who logged in, but no one checks the password:'
            f' {why}, and {which} password logins. Use login = "passthrough" so that the upstream checks the'
            " password, give a map rule a password hash, or route with an http router or a python router that"
            " declares verifies_passwords = True",
        )
