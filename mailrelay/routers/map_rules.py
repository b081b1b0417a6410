"""
A route map's rules: what a rule is, how a request is matched against many of them
fast, and how they are read from a `[router]` table or a map file (the syntax is in
`mailrelay.routers.map`'s docstring).
"""

from __future__ import annotations

import heapq
import os
from collections.abc import Iterable, Iterator
from typing import Any

import attrs

from ..configtable import Errors, Table, read_toml
from ..networks import Address, Network, client_addresses, read_networks, read_values
from ..router import PROTOCOLS, TRUSTING_LOGINS, Reject, Route, RouteRequest
from ..routerspec import PasswordListener, UncheckedLogin, refuse_unchecked_logins
from .passwords import hash_error
from .static import describe_route, route_from_table

CONDITIONS = ("user", "domain", "listener", "client", "protocol")


# -- rules -------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class Rule:
    """
    One rule (or the default, which has no condition). A condition that is None is
    not checked; one that is a set matches when the request's value is in it.
    """

    index: int
    users: frozenset[str] | None = None
    domains: frozenset[str] | None = None
    listeners: frozenset[str] | None = None
    protocols: frozenset[str] | None = None
    networks: tuple[Network, ...] | None = None
    routes: tuple[Route, ...] = ()
    route_keys: tuple[str, ...] = attrs.field(default=(), eq=False, repr=False)
    """The key path of each route's table, for messages."""
    reject: str | None = None
    reject_wait: float | None = None
    password: str | None = attrs.field(default=None, repr=False)

    def matches(self, facts: _Facts) -> bool:
        if self.users is not None and facts.user not in self.users:
            return False
        if self.domains is not None and facts.domain not in self.domains:
            return False
        if self.listeners is not None and facts.listener not in self.listeners:
            return False
        if self.protocols is not None and facts.protocol not in self.protocols:
            return False
        if self.networks is not None:
            return any(address in network for address in facts.addresses for network in self.networks)
        return True

    def answer(self) -> list[Route]:
        """The routes, or raise the rule's Reject."""
        if self.reject is not None:
            raise Reject(self.reject, wait=self.reject_wait or 0)
        return list(self.routes)

    def describe(self) -> str:
        if self.reject is not None:
            return f'reject "{self.reject}"'
        return ", then ".join(describe_route(route) for route in self.routes)

    def could_match(self, listener: str, protocol: str) -> bool:
        """Whether the rule can match a request on `listener` speaking `protocol`."""
        return (self.listeners is None or listener in self.listeners) and (self.protocols is None or protocol in self.protocols)

    def unchecked(self) -> list[tuple[Route, str]]:
        """The routes (with their key paths) on which the upstream checks no password,
        given without a password checked here."""
        if self.password is not None:
            return []
        keys = self.route_keys or ("",) * len(self.routes)
        return [(route, key) for route, key in zip(self.routes, keys, strict=True) if route.login in TRUSTING_LOGINS]


@attrs.frozen
class _Facts:
    """What rules look at in a request, normalised once."""

    user: str | None
    domain: str | None
    listener: str
    protocol: str
    addresses: tuple[Address, ...]
    """The client's address, and its IPv4 form when it is IPv4-mapped; () for no IP."""

    @classmethod
    def of(cls, request: RouteRequest) -> _Facts:
        # Without a login (SMTP auth "none"), the recipient being vetted is the user.
        name = request.user if request.user is not None else request.recipient
        user = name.lower() if name else None
        domain = user.rpartition("@")[2] if user is not None and "@" in user else None
        return cls(user, domain, request.listener, request.protocol, client_addresses(request.client[0]))


class RouteMap:
    """
    Rules in order, plus an optional default, indexed for matching many rules fast.

    Every rule is filed under one of its conditions (the most selective it has: user,
    then domain, client, listener, protocol), for each value of it. A request looks up
    its own user, domain, client address, listener and protocol, merges the rule
    indices found in ascending order, and checks each candidate's other conditions:
    the first that matches is the lowest-numbered matching rule, exactly what trying
    every rule in order would find.
    """

    def __init__(self, rules: Iterable[Rule], default: Rule | None, source: str) -> None:
        self.rules = tuple(rules)
        self.default = default
        self.source = source
        self._by: dict[str, dict[str, list[int]]] = {key: {} for key in ("user", "domain", "listener", "protocol")}
        # (address version, netmask) -> network address -> rule indices
        self._by_network: dict[tuple[int, int], dict[int, list[int]]] = {}
        for position, rule in enumerate(self.rules):
            assert rule.index == position
            self._file(rule)

    def __len__(self) -> int:
        return len(self.rules)

    @property
    def decoy(self) -> Rule | None:
        """The first rule with a password hash (the default's last): a password login no
        rule matches is checked against it and refused, so that an unknown user is
        answered as a known user with a wrong password is, in words and in time."""
        for rule in (*self.rules, self.default):
            if rule is not None and rule.password is not None:
                return rule
        return None

    def unchecked_logins(self, listener: str, protocol: str) -> list[UncheckedLogin]:
        """The routes that a password login on `listener` (speaking `protocol`) could get
        with `login = "xclient"` or `"none"` from a rule without a password hash (the
        default included): no one would check the password."""
        found: list[UncheckedLogin] = []
        for rule in (*self.rules, *((self.default,) if self.default is not None else ())):
            if rule.could_match(listener, protocol):
                for route, key in rule.unchecked():
                    what = "the default" if rule.index < 0 else "the rule"
                    found.append((f"{key}.login" if key else "login", route.login, f"{what} has no password hash"))
        return found

    def _file(self, rule: Rule) -> None:
        for key, values in (("user", rule.users), ("domain", rule.domains)):
            if values is not None:
                for value in values:
                    self._by[key].setdefault(value, []).append(rule.index)
                return
        if rule.networks is not None:
            for network in rule.networks:
                netmask = int(network.netmask)
                by_address = self._by_network.setdefault((network.version, netmask), {})
                by_address.setdefault(int(network.network_address), []).append(rule.index)
            return
        for key, values in (("listener", rule.listeners), ("protocol", rule.protocols)):
            if values is not None:
                for value in values:
                    self._by[key].setdefault(value, []).append(rule.index)
                return
        raise AssertionError(f"rule {rule.index} has no condition")

    def _candidates(self, facts: _Facts) -> Iterator[int]:
        lists: list[list[int]] = []
        for key, value in (
            ("user", facts.user),
            ("domain", facts.domain),
            ("listener", facts.listener),
            ("protocol", facts.protocol),
        ):
            found = self._by[key].get(value) if value is not None else None
            if found:
                lists.append(found)
        for (version, netmask), by_address in self._by_network.items():
            for address in facts.addresses:
                if address.version == version:
                    found = by_address.get(int(address) & netmask)
                    if found:
                        lists.append(found)
        previous = -1
        for index in heapq.merge(*lists):
            if index != previous:  # a rule filed under two networks that both hold the client
                yield index
            previous = index

    def match(self, request: RouteRequest) -> Rule | None:
        """The first rule that matches `request`, else the default (None without one)."""
        facts = _Facts.of(request)
        for index in self._candidates(facts):
            rule = self.rules[index]
            if rule.matches(facts):
                return rule
        return self.default


# -- reading rules -----------------------------------------------------------------


def parse_map(table: Table, default_path: str) -> RouteMap | None:
    """
    The `rule` array and `default` table of `table` (a `[router]` table, or a map
    file's top level); None, with errors recorded, when anything is invalid.
    `default_path` is how the default table is written, for messages.
    """
    rules = [_rule(t, index, default_path) for index, t in enumerate(table.tables("rule"))]
    default_table = table.table("default", None)
    default = _action(default_table, -1) if default_table is not None else None
    if default_table is not None:
        default_table.finish()
    if None in rules or (default_table is not None and default is None):
        return None
    if not rules and default is None:
        rule_path = table.key_path("rule")
        table.error(None, f"has no [[{rule_path}]] and no [{default_path}]: it would refuse every session")
        return None
    return RouteMap((r for r in rules if r is not None), default, table.errors.source)


def _rule(table: Table, index: int, default_path: str) -> Rule | None:
    conditions: dict[str, Any] = {
        "users": _names(table, "user", lower=True),
        "domains": _domains(table),
        "listeners": _names(table, "listener"),
        "protocols": _protocols(table),
        "networks": read_networks(table, "client"),
    }
    valid = False not in conditions.values()
    if not any(table.has(key) for key in CONDITIONS):
        table.error(None, f"has no condition ({', '.join(CONDITIONS)}); for sessions that no rule matches, use [{default_path}]")
        valid = False
    password = table.string("password", None, secret=True)
    if isinstance(password, str):
        why = hash_error(password)
        if why is None and table.has("reject"):
            why = "cannot be used with reject (a rejected session needs no password)"
        if why is not None:
            table.error("password", why)
            valid = False
    elif table.has("password"):
        valid = False  # not a string: reported by table.string()
    rule = _action(table, index, password_rule=table.has("password"))
    table.finish()
    if rule is None or not valid:
        return None
    return attrs.evolve(rule, password=password, **{k: v for k, v in conditions.items() if v is not None})


def _action(table: Table, index: int, password_rule: bool = False) -> Rule | None:
    """What a rule (or the default, index -1) answers: routes or a rejection."""
    given = [key for key in ("route", "routes", "reject") if table.has(key)]
    reject_wait = _reject_wait(table)
    if table.has("reject_wait") and "reject" not in given and not password_rule:
        table.error("reject_wait", "applies only to a rule with reject or password")
    if not given:
        if index < 0:
            # The default may be written as a route itself: [router.default] host = ...
            route = route_from_table(table)
            return Rule(index=index, routes=(route,), route_keys=(table.path,)) if route is not None else None
        table.error(None, "needs route, routes or reject")
        return None
    for extra in given[1:]:
        table.error(extra, f"cannot be used with {given[0]}")
    # Every answer given is read, so that its own mistakes are reported too.
    routes: list[Route | None] = []
    keys: list[str] = []
    if table.has("route"):
        route_table = table.table("route")
        routes.append(route_from_table(route_table) if route_table is not None else None)
        keys.append(table.key_path("route"))
    if table.has("routes"):
        for route_table in table.tables("routes"):
            routes.append(route_from_table(route_table))
            keys.append(route_table.path)
        if table.data["routes"] == []:
            table.error("routes", "must list at least one route")
            routes.append(None)
    message = table.string("reject", None)
    if message == "":
        table.error("reject", "must not be empty (it is what the client is told)")
        return None
    if isinstance(message, str) and any(ord(c) < 32 or ord(c) == 127 for c in message):
        # It goes into a protocol reply: a line break would let it forge further replies.
        table.error("reject", "must be one line of text, without control characters")
        return None
    if len(given) > 1 or None in routes or (not routes and message is None):
        return None
    if message is not None:
        return Rule(index=index, reject=message, reject_wait=reject_wait)
    return Rule(index=index, routes=tuple(r for r in routes if r is not None), route_keys=tuple(keys), reject_wait=reject_wait)


def _reject_wait(table: Table) -> float | None:
    value: float | None = table.number("reject_wait", None)
    return value


def _names(table: Table, key: str, lower: bool = False) -> frozenset[str] | None | bool:
    values = read_values(table, key)
    if not isinstance(values, tuple):
        return values
    return frozenset(v.lower() for v in values) if lower else frozenset(values)


def _domains(table: Table) -> frozenset[str] | None | bool:
    values = read_values(table, "domain")
    if not isinstance(values, tuple):
        return values
    for value in values:
        if "@" in value:
            table.error("domain", f'"{value}" is not a domain (to match a whole address, use user)')
            return False
    return frozenset(v.lower() for v in values)


def _protocols(table: Table) -> frozenset[str] | None | bool:
    values = read_values(table, "protocol")
    if not isinstance(values, tuple):
        return values
    for value in values:
        if value not in PROTOCOLS:
            names = ", ".join(f'"{p}"' for p in PROTOCOLS)
            table.error("protocol", f'must be one of {names}, not "{value}"')
            return False
    return frozenset(values)


Signature = tuple[int, int, int]
"""A file version as (mtime in ns, size, inode): whatever changes it, the file changed."""


def file_signature(path: str) -> Signature | None:
    try:
        status = os.stat(path)
    except OSError:
        return None
    return (status.st_mtime_ns, status.st_size, status.st_ino)


def read_map_file(path: str, password_listeners: Iterable[PasswordListener] = ()) -> tuple[RouteMap, Signature]:
    """
    Read and validate a map file; raise ConfigError whose lines name `path` and the key
    paths in it. The signature is that of the very file read. A map that would give a
    password login on one of `password_listeners` an unchecked route is invalid
    (`refuse_unchecked_logins`).
    """
    data, status = read_toml(path)
    errors = Errors(path, base_dir=os.path.dirname(os.path.abspath(path)))
    top = Table(data, "", errors)
    route_map = parse_map(top, "default")
    top.finish()
    if route_map is not None:
        refuse_unchecked_logins(route_map.unchecked_logins, password_listeners, errors)
    errors.raise_if_any()
    assert route_map is not None
    return route_map, (status.st_mtime_ns, status.st_size, status.st_ino)
