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
without a default the session is refused ("no route for this session"; a password
login is refused as a wrong password is, see below). A rule with no
condition is an error: that is what `default` is for. A `reject` answer waits
`reject_wait` seconds (default 0) and its text, shown to the client, must be one line.

Password check: a rule may carry `password = "<bcrypt or argon2 hash>"`. When it is the
first match, the client's password must verify against it (in the reactor's thread pool:
hashing is slow on purpose) or the session is refused with "invalid credentials" after
`reject_wait` seconds (default 2). A failed check does not fall through to later rules.
A password login no rule matches gets that same refusal after a check against the first
password rule's hash (with its `reject_wait`): an unknown account looks like a wrong
password, in words and in time.
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

from collections.abc import Iterable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from ..configtable import ConfigError, Table
from ..interfaces import IReloadable
from ..router import PASSWORDLESS_METHODS, IRouter, Reject, Route, RouteRequest, RouterError
from ..routerspec import PasswordListener, RouterSpec
from .map_rules import RouteMap, Rule, Signature, file_signature, parse_map, read_map_file
from .passwords import DEFAULT_MAX_HASH_CHECKS, DEFAULT_MAX_HASH_QUEUE, Verify, threaded_verify

CHECKABLE_METHODS = ("plain", "login")
DEFAULT_CHECK_INTERVAL = 2.0
DEFAULT_PASSWORD_WAIT = 2.0
NO_ROUTE = "no route for this session"
INVALID_CREDENTIALS = "invalid credentials"


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
            if request.auth_method in PASSWORDLESS_METHODS:
                raise Reject(NO_ROUTE)
            # A password login for a user no rule knows: "no route" at once would tell an
            # attacker which accounts exist. Refuse it as a wrong password, after a check
            # against a real hash of the map, which takes as long as one.
            decoy = self.route_map.decoy
            if decoy is None:
                raise Reject(INVALID_CREDENTIALS, wait=DEFAULT_PASSWORD_WAIT)
            return self._checked_answer(decoy, request, refuse_anyway=True)
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
        return self._checked_answer(rule, request)

    def _checked_answer(self, rule: Rule, request: RouteRequest, refuse_anyway: bool = False) -> Deferred[list[Route]]:
        """`rule`'s answer if the request's password verifies against its hash; a
        `Reject` after its `reject_wait` otherwise, and always with `refuse_anyway` (the
        check is then only there to take the time a real one takes)."""
        assert rule.password is not None
        wait = rule.reject_wait if rule.reject_wait is not None else DEFAULT_PASSWORD_WAIT
        if request.auth_method not in CHECKABLE_METHODS + ("none",):
            raise Reject(
                f"authentication method {request.auth_method.upper()} cannot be checked for this account: use PLAIN or LOGIN"
            )
        if request.password is None:
            raise Reject(INVALID_CREDENTIALS, wait=wait)

        def checked(ok: bool) -> list[Route]:
            if refuse_anyway or not ok:
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
            signature = file_signature(self.path)
            if signature == self._signature or signature == self._failed:
                return
            self._load(forced=False, seen=signature)
        except Exception:
            # A bug here must not stop the checks (LoopingCall stops at an exception).
            self.log.failure("route map {file}: checking for changes failed", file=self.path)

    def _load(self, forced: bool, seen: Signature | None = _NEVER) -> None:
        if seen is _NEVER:
            seen = file_signature(self.path)
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
        return _inline_spec(route_map, hashing)

    conflicts = [key for key in ("rule", "default") if table.has(key)]
    for key in conflicts:
        table.error(key, f"cannot be used with file: a file map's rules and default are all in {path or 'the file'}")
        table.consume(key)  # reported once, not as an unknown key too
    if path is None or check_interval is None or conflicts:
        return None
    interval = float(check_interval)
    named_by = f"{table.errors.source}: {table.key_path('file')}"

    def build(reactor: Any = None, verify: Verify | None = None, password_listeners: Iterable[PasswordListener] = ()) -> IRouter:
        reactor = _reactor(reactor)
        try:
            return FileMapRouter(path, interval, reactor, verify or threaded_verify(reactor, *hashing), password_listeners)
        except ConfigError as e:
            # A file that is not there: say which key named it (its contents' errors name the file).
            missing = f"{path}: no such file"
            if e.errors == [missing] or (len(e.errors) == 1 and e.errors[0].startswith(f"{path}: cannot read:")):
                raise ConfigError([f"{named_by}: {e.errors[0]}"]) from None
            raise

    description = f"map: rules from {path}, checked every {interval:g}s"
    return RouterSpec("map", description, build, verifies_passwords=True)


def _hash_bounds(table: Table) -> tuple[int, int]:
    """`max_hash_checks` and `max_hash_queue` (an invalid one is reported, and the
    configuration with it)."""
    checks = table.integer("max_hash_checks", DEFAULT_MAX_HASH_CHECKS, minimum=1, maximum=1000)
    queue = table.integer("max_hash_queue", DEFAULT_MAX_HASH_QUEUE, minimum=0, maximum=1_000_000)
    return (checks or DEFAULT_MAX_HASH_CHECKS, DEFAULT_MAX_HASH_QUEUE if queue is None else queue)


def _inline_spec(route_map: RouteMap, hashing: tuple[int, int]) -> RouterSpec:
    def build(reactor: Any = None, verify: Verify | None = None, password_listeners: Iterable[PasswordListener] = ()) -> IRouter:
        # The configuration checked `unchecked_logins` for the listeners it serves.
        return MapRouter(route_map, verify or threaded_verify(_reactor(reactor), *hashing))

    count = len(route_map)
    hashed = sum(1 for rule in route_map.rules if rule.password is not None)
    rules = f"{count} rule{'' if count == 1 else 's'}" + (f" ({hashed} with a password hash)" if hashed else "")
    default = f"default {route_map.default.describe()}" if route_map.default else f'no match: reject "{NO_ROUTE}"'
    return RouterSpec(
        "map", f"map: {rules}, {default}", build, verifies_passwords=True, unchecked_logins=route_map.unchecked_logins
    )


def _reactor(reactor: Any) -> Any:
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        return global_reactor
    return reactor
