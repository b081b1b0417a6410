"""
Client networks as the configuration writes them: a map rule's `client`, the `exempt`
of `[login_limits]` and of `[listener.connection_limits]`.

A leaf module (the standard library and `configtable` only), so that the configuration,
the login guard and the map router share one syntax without importing one another.
"""

from __future__ import annotations

import ipaddress
from typing import Literal

from .configtable import Table

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def read_values(table: Table, key: str) -> tuple[str, ...] | None | Literal[False]:
    """
    One string or an array of them under `key`, none empty (a map rule's conditions
    and every network list are written so); None if absent, False (with the error
    recorded on `table`) if invalid.
    """
    if not table.has(key):
        return None
    values = table.strings(key)
    if values is None:
        return False
    if not values:
        table.error(key, "must list at least one value")
        return False
    if "" in values:
        table.error(key, "must not be empty")
        return False
    return tuple(values)


def read_networks(table: Table, key: str) -> tuple[Network, ...] | None | Literal[False]:
    """Networks (CIDR) or single addresses under `key`; None if absent, False (with the
    error recorded) if invalid. A network with host bits set is refused, naming the
    network that was probably meant."""
    values = read_values(table, key)
    if not isinstance(values, tuple):
        return values
    networks: list[Network] = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value))
        except ValueError:
            try:
                loose = ipaddress.ip_network(value, strict=False)
            except ValueError:
                table.error(key, f'"{value}" is not an IP address or network (CIDR)')
            else:
                table.error(key, f'"{value}" has host bits set (the network is {loose})')
            return False
    return tuple(networks)


def client_addresses(host: str) -> tuple[Address, ...]:
    """
    The addresses a client at `host` is matched against networks by: its own, and its
    IPv4 form when it is IPv4-mapped (`::ffff:192.0.2.1`, what a dual-stack socket
    reports), so that it is in the IPv4 networks too; () for a UNIX socket's path.
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return ()
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return (address, mapped) if mapped is not None else (address,)
