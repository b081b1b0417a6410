"""
The built-in routers, by the `type` an administrator writes in a `[router]` table.

Each router module offers `parse(table) -> RouterSpec | None`: it reads and validates
its own keys (reporting problems on the table) and returns how to build the router.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

from ..configtable import Table
from ..router import IRouter
from . import http, map, python, static
from .cache import CachingRouter


@attrs.frozen
class RouterSpec:
    """
    A validated router table: its type, a one-line description and a builder.

    `build(reactor)` makes the router; `reactor` (None: the global one) is what a router
    that does I/O or keeps time must use, so that tests can give it a fake clock.
    """

    type: str
    description: str
    build: Callable[..., IRouter]


ROUTER_TYPES: dict[str, Callable[[Table], RouterSpec | None]] = {
    "static": static.parse,
    "python": python.parse,
    "http": http.parse,
    "map": map.parse,
}


PLANNED_TYPES: tuple[str, ...] = ()


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
    spec = ROUTER_TYPES[kind](table)
    if spec is None or cache_ttl is None or cache_size is None:
        return spec
    return cached(spec, cache_ttl, cache_size)


def cached(spec: RouterSpec, ttl: float, size: int) -> RouterSpec:
    """`spec` with its successful answers remembered for `ttl` seconds (routers/cache.py)."""

    def build(reactor: Any = None) -> IRouter:
        if reactor is None:
            from twisted.internet import reactor
        return CachingRouter(spec.build(reactor), ttl, size, reactor)

    return RouterSpec(spec.type, f"{spec.description} (answers cached {ttl:g}s)", build)


def components(router: IRouter) -> list[Any]:
    """A router and the routers it wraps (a cache wraps its router), outermost first:
    each may be a service to start or a component to reload."""
    found: list[Any] = [router]
    while (inner := getattr(found[-1], "inner", None)) is not None:
        found.append(inner)
    return found
