"""
The built-in routers, by the `type` an administrator writes in a `[router]` table.

Each router module offers `parse(table) -> RouterSpec | None`: it reads and validates
its own keys (reporting problems on the table) and returns how to build the router.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs

from ..configtable import Table
from ..router import IRouter
from . import python, static


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
}


PLANNED_TYPES = ("http", "map")


def parse_router(table: Table) -> RouterSpec | None:
    """Read a `[router]` table of any type; None (with errors recorded) when invalid."""
    kind = table.string("type", choices=tuple(ROUTER_TYPES) + PLANNED_TYPES)
    if kind in PLANNED_TYPES:
        available = ", ".join(ROUTER_TYPES)
        table.error("type", f'"{kind}" is not available in this version of mailrelay (available: {available})')
        kind = None
    if kind is None:
        table.rest()
        return None
    return ROUTER_TYPES[kind](table)
