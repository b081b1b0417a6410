"""
`type = "map"`: route by rules, first match wins, from the `[router]` table itself or
from a separate TOML file that is reloaded when it changes.

A rule is a table of conditions and one answer:

    [[router.rule]]                     # in a map file: [[rule]]
    user = "alice@example.org"          # conditions, all of which must match
    route = { host = "10.0.0.5", port = 143 }
    # or routes = [ {...}, {...} ] (fallbacks), or reject = "why" (+ reject_wait)

    [router.default]                    # in a map file: [default]
    host = "10.0.0.9"                   # a route, routes = [...], or reject = "why"
    port = 143

Conditions, each one value or a list of values of which any may match:

- `user`: the whole `request.user`, compared case-insensitively (for SMTP with
  `auth = ["none"]`, where no one logs in, the recipient being vetted);
- `domain`: the part of `request.user` after its last `@`, case-insensitively, exactly
  (no subdomains); a user without `@` has no domain;
- `listener`: `request.listener`, exactly;
- `client`: networks (`192.0.2.0/24`, `2001:db8::/32`) or single addresses; a client at
  an IPv4-mapped IPv6 address (`::ffff:192.0.2.1`, what a dual-stack socket reports)
  matches the IPv4 networks too (and IPv6 networks that hold it), while a plain IPv4
  client matches IPv4 networks only; a client on a UNIX socket matches no network;
- `protocol`: `smtp`, `imap`, `pop3` or `none`.

A request without a user matches no `user` or `domain` rule. Rules are tried in order
and the first whose conditions all match answers; with none, `default` answers, and
without a default the session is refused ("no route for this session"). A rule with no
condition is an error: that is what `default` is for. A `reject` answer waits
`reject_wait` seconds (default 0) and its text, shown to the client, must be one line.

Password check: a rule may carry `password = "<bcrypt or argon2 hash>"`. When it is the
first match, the client's password must verify against it (in the reactor's thread pool:
hashing is slow on purpose) or the session is refused with "invalid credentials" after
`reject_wait` seconds (default 2). A failed check does not fall through to later rules.
Only PLAIN and LOGIN carry a password mailrelay can check; other methods are refused.
At most `max_hash_checks` checks (default 4) run at once per map router, and at most
`max_hash_queue` (default 100) wait for their turn; past that a check fails at once with
a RouterError, the client's temporary failure (never "invalid credentials"), so that a
flood of logins costs neither unbounded memory (argon2 takes tens of MiB per check) nor
an unbounded queue. A check whose login is cancelled while it waits leaves the queue.

A route with `login = "xclient"` or `"none"` makes the upstream take mailrelay's word
for who logged in: for a password login, only a rule with a password hash may answer
with one. A map with a rule (or default) without one that could answer a listener that
takes passwords (any `auth` but "none" and "external") with such a route is refused: in
the configuration, and in a map file when it is read (at start, and on reload, which
keeps the previous map). Should a request get there anyway, it is a RouterError.

Rules come from the `[router]` table or from `file`, never both (two places would
make "first match" depend on how they are merged). A file map is re-read when its
(mtime, size, inode) changes, checked every `check_interval` seconds, and on
`reload()` (SIGHUP); a broken version keeps the previous map and is logged once. Replace
the file atomically (write a new one, rename it over the old) so that no check reads it
half-written.
"""

from __future__ import annotations

import heapq
import ipaddress
import os
import re
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import argon2
import attrs
import bcrypt
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, DeferredSemaphore, fail, maybeDeferred
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..configtable import ConfigError, Errors, Table, read_toml
from ..interfaces import IReloadable
from ..router import (
    PASSWORDLESS_METHODS,
    PROTOCOLS,
    TRUSTING_LOGINS,
    IRouter,
    Reject,
    Route,
    RouteRequest,
    RouterError,
)
from .static import describe_route, route_from_table

if TYPE_CHECKING:
    from . import PasswordListener, RouterSpec, UncheckedLogin

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Verify = Callable[[str, str], "Deferred[bool]"]
"""`verify(hash, password)`: fires with whether `password` matches `hash`."""

CONDITIONS = ("user", "domain", "listener", "client", "protocol")
CHECKABLE_METHODS = ("plain", "login")
DEFAULT_CHECK_INTERVAL = 2.0
DEFAULT_PASSWORD_WAIT = 2.0
DEFAULT_MAX_HASH_CHECKS = 4
DEFAULT_MAX_HASH_QUEUE = 100
NO_ROUTE = "no route for this session"
INVALID_CREDENTIALS = "invalid credentials"

_BCRYPT = re.compile(r"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")
_ARGON2_PREFIXES = ("$argon2id$", "$argon2i$")
_argon2 = argon2.PasswordHasher()


# -- passwords ---------------------------------------------------------------------


def hash_error(value: str) -> str | None:
    """Why `value` is not a usable password hash, or None; never quotes `value`."""
    if value.startswith(("$2a$", "$2b$", "$2y$")):
        return None if _BCRYPT.fullmatch(value) else "is not a well-formed bcrypt hash"
    if value.startswith(_ARGON2_PREFIXES):
        try:
            argon2.extract_parameters(value)
        except argon2.exceptions.InvalidHashError:
            return "is not a well-formed argon2 hash"
        return None
    return "must be a bcrypt ($2b$...) or argon2 ($argon2id$...) hash, not a plaintext password"


def verify_password(hashed: str, password: str) -> bool:
    """Whether `password` matches a bcrypt or argon2 `hashed`; blocking and slow on purpose."""
    try:
        secret = password.encode("utf-8")
    except UnicodeError:
        return False
    if hashed.startswith("$2"):
        try:
            return bcrypt.checkpw(secret, hashed.encode("ascii"))
        except ValueError:  # bcrypt 5 refuses passwords longer than 72 bytes
            return False
    try:
        return _argon2.verify(hashed, secret)
    except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
        return False


def threaded_verify(reactor: Any, max_checks: int = DEFAULT_MAX_HASH_CHECKS, max_queue: int = DEFAULT_MAX_HASH_QUEUE) -> Verify:
    """`verify_password` in `reactor`'s thread pool, so that hashing never blocks the
    reactor, at most `max_checks` at once and `max_queue` waiting (`bounded_verify`)."""

    def verify(hashed: str, password: str) -> Deferred[bool]:
        return deferToThreadPool(reactor, reactor.getThreadPool(), verify_password, hashed, password)

    return bounded_verify(verify, max_checks, max_queue)


def bounded_verify(verify: Verify, max_checks: int, max_queue: int) -> Verify:
    """
    `verify` run at most `max_checks` at once, with at most `max_queue` checks waiting
    for their turn; one more fails at once with RouterError.

    Invariant: no more than `max_checks` checks of `verify` are ever running, even when
    their callers give up: a check that is cancelled while it waits leaves the queue, one
    cancelled while it runs (a thread cannot be stopped) keeps its turn until it ends.
    """
    turns = DeferredSemaphore(max_checks)

    def bounded(hashed: str, password: str) -> Deferred[bool]:
        if turns.tokens == 0 and len(turns.waiting) >= max_queue:
            return fail(RouterError(f"password checks busy: {max_checks} running, {max_queue} waiting"))

        turn = turns.acquire()
        # Cancelling the answer takes a waiting check out of the queue (`turn.cancel()`);
        # a running one goes on, its turn held until it ends.
        answer: Deferred[bool] = Deferred(canceller=lambda _: turn.cancel())

        def ended(result: bool | Failure) -> None:
            turns.release()
            if answer.called:
                return None  # the caller gave up (a failure is dropped with it)
            if isinstance(result, Failure):
                answer.errback(result)
            else:
                answer.callback(result)

        def run(_: object) -> None:
            maybeDeferred(verify, hashed, password).addBoth(ended)

        turn.addCallbacks(run, lambda failure: failure.trap(CancelledError))
        return answer

    return bounded


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
        addresses: tuple[Address, ...] = ()
        try:
            address = ipaddress.ip_address(request.client[0])
        except ValueError:
            pass  # a UNIX socket's path
        else:
            mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
            addresses = (address, mapped) if mapped is not None else (address,)
        return cls(user, domain, request.listener, request.protocol, addresses)


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
        "networks": _networks(table),
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


def _values(table: Table, key: str) -> tuple[str, ...] | None | bool:
    """A condition's values (a string or a list of them); None if absent, False if invalid."""
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


def _names(table: Table, key: str, lower: bool = False) -> frozenset[str] | None | bool:
    values = _values(table, key)
    if not isinstance(values, tuple):
        return values
    return frozenset(v.lower() for v in values) if lower else frozenset(values)


def _domains(table: Table) -> frozenset[str] | None | bool:
    values = _values(table, "domain")
    if not isinstance(values, tuple):
        return values
    for value in values:
        if "@" in value:
            table.error("domain", f'"{value}" is not a domain (to match a whole address, use user)')
            return False
    return frozenset(v.lower() for v in values)


def _protocols(table: Table) -> frozenset[str] | None | bool:
    values = _values(table, "protocol")
    if not isinstance(values, tuple):
        return values
    for value in values:
        if value not in PROTOCOLS:
            names = ", ".join(f'"{p}"' for p in PROTOCOLS)
            table.error("protocol", f'must be one of {names}, not "{value}"')
            return False
    return frozenset(values)


def _networks(table: Table, key: str = "client") -> tuple[Network, ...] | None | bool:
    """Networks or single addresses under `key` (a rule's `client`; `[login_limits]`
    reads its `exempt` with it too); None if absent, False if invalid."""
    values = _values(table, key)
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


Signature = tuple[int, int, int]
"""A file version as (mtime in ns, size, inode): whatever changes it, the file changed."""


def _signature(path: str) -> Signature | None:
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
        from . import refuse_unchecked_logins

        refuse_unchecked_logins(route_map.unchecked_logins, password_listeners, errors)
    errors.raise_if_any()
    assert route_map is not None
    return route_map, (status.st_mtime_ns, status.st_size, status.st_ino)


# -- the routers -------------------------------------------------------------------


@implementer(IRouter)
class MapRouter:
    """
    Answers from a `RouteMap`: the first matching rule's routes or rejection, after
    checking the client's password when the rule has one.

    `verify(hash, password)` does the check (default: `verify_password` in the thread
    pool of the reactor given to `build()`); tests may pass a synchronous one.

    Invariant: a password login gets a route on which the upstream checks no password
    (`login = "xclient"` or `"none"`) only from a rule whose password hash it matched;
    a rule without one that would answer so is a RouterError (the configuration
    refuses such maps for listeners that take passwords; this holds for any other).
    Hence `verifies_passwords`.
    """

    verifies_passwords = True

    def __init__(self, route_map: RouteMap, verify: Verify) -> None:
        self.route_map = route_map
        self.verify = verify

    def route(self, request: RouteRequest) -> list[Route] | Deferred[list[Route]]:
        rule = self.route_map.match(request)
        if rule is None:
            raise Reject(NO_ROUTE)
        if rule.password is None:
            unchecked = rule.unchecked()
            if unchecked and request.auth_method not in PASSWORDLESS_METHODS:
                route, _ = unchecked[0]
                which = "the default" if rule.index < 0 else f"rule[{rule.index}]"
                raise RouterError(
                    f"{self.route_map.source}: {which} answers a {request.auth_method.upper()} login with a"
                    f' login = "{route.login}" route but has no password hash: no one would check the password'
                )
            return rule.answer()
        wait = rule.reject_wait if rule.reject_wait is not None else DEFAULT_PASSWORD_WAIT
        if request.auth_method not in CHECKABLE_METHODS + ("none",):
            raise Reject(
                f"authentication method {request.auth_method.upper()} cannot be checked for this account: use PLAIN or LOGIN"
            )
        if request.password is None:
            raise Reject(INVALID_CREDENTIALS, wait=wait)

        def checked(ok: bool) -> list[Route]:
            if not ok:
                raise Reject(INVALID_CREDENTIALS, wait=wait)
            return rule.answer()

        return self.verify(rule.password, request.password).addCallback(checked)


_NEVER: Any = object()


@implementer(IReloadable)
class FileMapRouter(MapRouter, Service):
    """
    A `MapRouter` whose map is a file: re-read when its signature changes (checked
    every `check_interval` seconds while the service runs) and on `reload()`.

    Invariant: `route_map` is always a valid map; a broken file never replaces it. A
    broken version is logged once (by its signature), a `reload()` logs every time.
    """

    log = Logger()
    generation = 0
    """Counts the maps read: a route cache in front of this router empties when it changes."""

    def __init__(
        self, path: str, check_interval: float, clock: Any, verify: Verify, password_listeners: Iterable[PasswordListener] = ()
    ) -> None:
        self.password_listeners = tuple(password_listeners)
        """The (name, protocol) of the listeners it serves that take passwords: a map
        that would route their logins unchecked is refused, at start and on reload."""
        route_map, self._signature = read_map_file(path, self.password_listeners)  # ConfigError: nothing listens
        super().__init__(route_map, verify)
        self.path = path
        self.check_interval = check_interval
        self.clock = clock
        self._failed: Signature | None = _NEVER
        self._loop: LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        self.log.info(
            "route map {file}: {count} rule(s), checked every {interval:g}s",
            file=self.path,
            count=len(self.route_map),
            interval=self.check_interval,
        )
        self._loop = LoopingCall(self._check)
        self._loop.clock = self.clock
        self._loop.start(self.check_interval, now=False).addErrback(
            lambda failure: self.log.failure("route map {file}: checking stopped", failure, file=self.path)
        )

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()
        return None

    def reload(self) -> None:
        """Read the file again, changed or not (SIGHUP)."""
        self._load(forced=True)

    def _check(self) -> None:
        try:
            signature = _signature(self.path)
            if signature == self._signature or signature == self._failed:
                return
            self._load(forced=False, seen=signature)
        except Exception:
            # A bug here must not stop the checks (LoopingCall stops at an exception).
            self.log.failure("route map {file}: checking for changes failed", file=self.path)

    def _load(self, forced: bool, seen: Signature | None = _NEVER) -> None:
        if seen is _NEVER:
            seen = _signature(self.path)
        try:
            route_map, signature = read_map_file(self.path, self.password_listeners)
        except ConfigError as e:
            if forced or seen != self._failed:
                self._failed = seen
                self.log.error(
                    "route map {file} not reloaded, keeping the previous {count} rule(s): {reasons}",
                    file=self.path,
                    count=len(self.route_map),
                    reasons="; ".join(e.errors),
                )
            return
        self.route_map, self._signature, self._failed = route_map, signature, _NEVER
        self.generation += 1
        count = len(route_map)
        self.log.info("route map {file} reloaded: {count} rule{s}", file=self.path, count=count, s="" if count == 1 else "s")


# -- the [router] table ------------------------------------------------------------


def parse(table: Table) -> RouterSpec | None:
    from . import RouterSpec

    has_file = table.has("file")
    path = table.file("file", None)
    check_interval = table.seconds("check_interval", DEFAULT_CHECK_INTERVAL)
    hashing = _hash_bounds(table)
    if not has_file:
        if table.has("check_interval"):
            table.error("check_interval", "applies only with file")
        if not table.has("rule") and not table.has("default"):
            table.error(None, f"needs [[{table.key_path('rule')}]] tables or a file of them (file = ...)")
            return None
        route_map = parse_map(table, table.key_path("default"))
        if route_map is None or table.has("check_interval"):
            return None
        return _inline_spec(RouterSpec, route_map, hashing)

    conflicts = [key for key in ("rule", "default") if table.has(key)]
    for key in conflicts:
        table.error(key, f"cannot be used with file: a file map's rules and default are all in {path or 'the file'}")
        table.consume(key)  # reported once, not as an unknown key too
    if path is None or check_interval is None or conflicts:
        return None
    interval = float(check_interval)

    def build(reactor: Any = None, verify: Verify | None = None, password_listeners: Iterable[PasswordListener] = ()) -> IRouter:
        reactor = _reactor(reactor)
        return FileMapRouter(path, interval, reactor, verify or threaded_verify(reactor, *hashing), password_listeners)

    description = f"map: rules from {path}, checked every {interval:g}s"
    return RouterSpec("map", description, build, verifies_passwords=True)


def _hash_bounds(table: Table) -> tuple[int, int]:
    """`max_hash_checks` and `max_hash_queue` (an invalid one is reported, and the
    configuration with it)."""
    checks = table.integer("max_hash_checks", DEFAULT_MAX_HASH_CHECKS, minimum=1, maximum=1000)
    queue = table.integer("max_hash_queue", DEFAULT_MAX_HASH_QUEUE, minimum=0, maximum=1_000_000)
    return (checks or DEFAULT_MAX_HASH_CHECKS, DEFAULT_MAX_HASH_QUEUE if queue is None else queue)


def _inline_spec(spec: type[RouterSpec], route_map: RouteMap, hashing: tuple[int, int]) -> RouterSpec:
    def build(reactor: Any = None, verify: Verify | None = None, password_listeners: Iterable[PasswordListener] = ()) -> IRouter:
        # The configuration checked `unchecked_logins` for the listeners it serves.
        return MapRouter(route_map, verify or threaded_verify(_reactor(reactor), *hashing))

    count = len(route_map)
    hashed = sum(1 for rule in route_map.rules if rule.password is not None)
    rules = f"{count} rule{'' if count == 1 else 's'}" + (f" ({hashed} with a password hash)" if hashed else "")
    default = f"default {route_map.default.describe()}" if route_map.default else f'no match: reject "{NO_ROUTE}"'
    return spec("map", f"map: {rules}, {default}", build, verifies_passwords=True, unchecked_logins=route_map.unchecked_logins)


def _reactor(reactor: Any) -> Any:
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        return global_reactor
    return reactor
