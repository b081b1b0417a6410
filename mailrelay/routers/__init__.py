"""
The built-in routers, one module (or a few) per `type` an administrator writes in a
`[router]` table: `static`, `python`, `http`, `map`, and `cache` in front of any of them.

`mailrelay.routerspec` names each type's `parse(table)` and imports it only when a table
of that type is read; this package imports none of its modules, so importing one
backend imports no other.
"""

from __future__ import annotations

from typing import Any

from ..router import IRouter

__all__ = ["components"]


def components(router: IRouter) -> list[Any]:
    """A router and the routers it wraps (a cache wraps its router), outermost first:
    each may be a service to start or a component to reload."""
    found: list[Any] = [router]
    while (inner := getattr(found[-1], "inner", None)) is not None:
        found.append(inner)
    return found
