"""
`type = "map"`: rules and first match, passwords, the map file's reload, configuration
errors, and sessions routed through a real listener.

Unit tests drive the router with `twisted.internet.task.Clock` as its reactor (the
file check's LoopingCall runs on it) and pass `verify=` a synchronous password check;
the tests that use the real reactor check that hashing goes to its thread pool.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import tempfile
import textwrap
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import argon2
import bcrypt
import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.application.service import IService
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor
from twisted.logger import LogLevel, globalLogPublisher

from mailrelay import ConfigError, IReloadable, IRouter, Reject, Route, RouteRequest
from mailrelay.ask import ask_router
from mailrelay.config import load_config, parse_config
from mailrelay.configtable import Errors, Table
from mailrelay.routers.map import FileMapRouter, MapRouter
from mailrelay.routers.map_rules import RouteMap, Rule
from mailrelay.routers.passwords import threaded_verify, verify_password
from mailrelay.routerspec import RouterSpec, parse_router
from mailrelay.service import MailrelayService
from mailrelay.testing import resolve, route_request
from tests.support.net import LogCapture, ProxyTestCase, echo, exchange, tcp_port

PASSWORD = "correct horse battery"
BCRYPT_HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
ARGON2ID_HASH = argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1).hash(PASSWORD)
ARGON2I_HASH = argon2.low_level.hash_secret(PASSWORD.encode(), b"0123456789abcdef", 1, 8, 1, 16, argon2.low_level.Type.I).decode()

LISTENER = {"name": "relay", "listen": "tcp:0:interface=127.0.0.1", "mode": "splice"}


def request(**fields: Any) -> RouteRequest:
    defaults = {"listener": "imap", "protocol": "none", "mode": "splice", "client": ("192.0.2.7", 51514)}
    return route_request(**{**defaults, "local": ("198.51.100.1", 143), **fields})


def sync_verify(hashed: str, password: str) -> Deferred[bool]:
    return succeed(verify_password(hashed, password))


def outcome(d: Deferred[Any]) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    return results[0]


def spec_of(text: str, source: str = "test.toml", base_dir: str | None = None) -> tuple[RouterSpec | None, list[str]]:
    """Parse a `[router]` table written in TOML; the spec and the error lines."""
    errors = Errors(source, base_dir=base_dir)
    table = Table(tomllib.loads(textwrap.dedent(text))["router"], "router", errors)
    spec = parse_router(table)
    table.finish()
    return spec, errors.lines


def router_of(text: str, clock: Clock | None = None) -> Any:
    spec, errors = spec_of(text)
    assert errors == []
    assert spec is not None
    return spec.build(clock or Clock(), verify=sync_verify)


def ask(router: IRouter, **fields: Any) -> list[Route]:
    """The routes `router` answers for a request with `fields` (a refusal is raised)."""
    return resolve(router, request(**fields), router_timeout=5)


def ports(router: IRouter, **fields: Any) -> list[int] | str:
    """The ports of the answer's routes, or the Reject message."""
    try:
        return [route.port for route in ask(router, **fields)]
    except Reject as reject:
        return f"reject: {reject.message}"


def rejection(router: IRouter, **fields: Any) -> Reject:
    with pytest.raises(Reject) as refused:
        ask(router, **fields)
    return refused.value


def config_errors(router: dict[str, Any], source: str = "mailrelay.toml") -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config({"router": router, "listener": [LISTENER]}, source)
    return caught.value.errors


@pytest.fixture
def logs() -> Iterator[LogCapture]:
    capture = LogCapture()
    globalLogPublisher.addObserver(capture)
    yield capture
    globalLogPublisher.removeObserver(capture)


# -- conditions ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "condition, matching, not_matching",
    [
        ('user = "alice@example.org"', {"user": "Alice@EXAMPLE.org"}, [{"user": "bob@example.org"}, {"user": None}]),
        ('user = ["alice", "bob@example.org"]', {"user": "ALICE"}, [{"user": "alice@example.org"}]),
        (
            'domain = "Example.ORG"',
            {"user": "carol@example.org"},
            [{"user": "carol@sub.example.org"}, {"user": "example.org"}, {"user": None}],
        ),
        ('domain = "example.org"', {"user": "weird@name@EXAMPLE.org"}, [{"user": "x@example.org@evil.net"}]),
        ('listener = "submission"', {"listener": "submission"}, [{"listener": "Submission"}, {"listener": "imap"}]),
        ('protocol = ["smtp", "imap"]', {"protocol": "imap"}, [{"protocol": "pop3"}, {"protocol": "none"}]),
        (
            'client = "192.0.2.0/24"',
            {"client": ("192.0.2.200", 1)},
            [{"client": ("192.0.3.1", 1)}, {"client": ("2001:db8::1", 1)}],
        ),
        ('client = "192.0.2.7"', {"client": ("192.0.2.7", 1)}, [{"client": ("192.0.2.8", 1)}]),
        ('client = ["2001:db8::/32"]', {"client": ("2001:db8:ffff::1", 1)}, [{"client": ("2001:db9::1", 1)}]),
        ('client = "2001:db8::7"', {"client": ("2001:DB8:0::7", 1)}, [{"client": ("2001:db8::8", 1)}]),
        # A dual-stack socket reports IPv4 clients as IPv4-mapped IPv6 addresses.
        ('client = "192.0.2.0/24"', {"client": ("::ffff:192.0.2.1", 1)}, [{"client": ("::ffff:192.0.3.1", 1)}]),
        ('client = "::ffff:0:0/96"', {"client": ("::ffff:192.0.2.1", 1)}, [{"client": ("192.0.2.1", 1)}]),
        ('client = "fe80::/10"', {"client": ("fe80::1%eth0", 1)}, [{"client": ("/run/mailrelay.sock", 0)}]),
    ],
)
def test_each_condition_matches_what_it_names_and_nothing_else(
    condition: str, matching: dict[str, Any], not_matching: list[dict[str, Any]]
) -> None:
    router = router_of(
        f"""
        [router]
        type = "map"
        [[router.rule]]
        {condition}
        route = {{ host = "10.0.0.5", port = 143 }}
        [router.default]
        host = "10.0.0.9"
        port = 993
        """
    )
    assert ports(router, **matching) == [143]
    for fields in not_matching:
        assert ports(router, **fields) == [993], fields


def test_all_conditions_of_a_rule_must_match() -> None:
    router = router_of(
        """
        [router]
        type = "map"
        [[router.rule]]
        domain = "example.org"
        listener = "submission"
        client = ["192.0.2.0/24", "2001:db8::/32"]
        route = { host = "10.0.0.5", port = 587 }
        [router.default]
        reject = "not here"
        """
    )
    both = {"user": "a@example.org", "listener": "submission"}
    assert ports(router, **both) == [587]
    assert ports(router, **both, client=("2001:db8::5", 1)) == [587]
    assert ports(router, **{**both, "listener": "imap"}) == "reject: not here"
    assert ports(router, **{**both, "user": "a@example.net"}) == "reject: not here"
    assert ports(router, **both, client=("198.51.100.1", 1)) == "reject: not here"


FIRST_MATCH = """
[router]
type = "map"
[[router.rule]]
domain = "example.org"
route = { host = "10.0.0.1", port = 1 }
[[router.rule]]
user = "alice@example.org"
route = { host = "10.0.0.2", port = 2 }
[[router.rule]]
user = "bob@example.net"
route = { host = "10.0.0.3", port = 3 }
[[router.rule]]
client = "192.0.2.0/24"
route = { host = "10.0.0.4", port = 4 }
[[router.rule]]
domain = "example.net"
route = { host = "10.0.0.5", port = 5 }
[[router.rule]]
listener = "imap"
route = { host = "10.0.0.6", port = 6 }
"""


def test_the_first_matching_rule_wins_whatever_kind_it_is() -> None:
    router = router_of(FIRST_MATCH)
    # The domain rule comes before alice's own rule, so it wins for her.
    assert ports(router, user="alice@example.org") == [1]
    # bob's user rule comes before the client and domain rules that also match him.
    assert ports(router, user="bob@example.net") == [3]
    assert ports(router, user="carol@example.net") == [4]
    assert ports(router, user="carol@example.net", client=("198.51.100.1", 1)) == [5]
    assert ports(router, user="dave@example.com") == [4]
    assert ports(router, user="dave@example.com", client=("198.51.100.1", 1)) == [6]
    assert ports(router, user=None, client=("198.51.100.1", 1), listener="pop3") == "reject: no route for this session"


def test_routes_give_fallbacks_in_order() -> None:
    router = router_of(
        """
        [router]
        type = "map"
        [[router.rule]]
        user = "alice"
        routes = [{ host = "10.0.0.5", port = 143, tls = "starttls" }, { host = "10.0.0.6", port = 993, tls = "tls" }]
        [router.default]
        routes = [{ host = "10.0.0.9", port = 143 }, { host = "10.0.0.10", port = 143 }]
        """
    )
    assert ask(router, user="alice") == [
        Route(host="10.0.0.5", port=143, tls="starttls"),
        Route(host="10.0.0.6", port=993, tls="tls"),
    ]
    assert [r.host for r in ask(router, user="bob")] == ["10.0.0.9", "10.0.0.10"]


def test_without_default_a_session_no_rule_matches_is_refused() -> None:
    router = router_of('[router]\ntype = "map"\n[[router.rule]]\nuser = "alice"\nroute = { host = "h", port = 1 }\n')
    refused = rejection(router, user="bob")
    assert (refused.message, refused.wait, refused.close) == ("no route for this session", 0.0, False)


def test_reject_rules_and_their_wait() -> None:
    router = router_of(
        """
        [router]
        type = "map"
        [[router.rule]]
        user = "mallory@example.org"
        reject = "account disabled"
        reject_wait = 2.5
        [[router.rule]]
        domain = "example.org"
        reject = "moved to example.net"
        [router.default]
        reject = "who are you?"
        reject_wait = 0
        """
    )
    assert (rejection(router, user="mallory@example.org").message, rejection(router, user="mallory@example.org").wait) == (
        "account disabled",
        2.5,
    )
    moved = rejection(router, user="eve@example.org")
    assert (moved.message, moved.wait) == ("moved to example.net", 0.0)
    assert rejection(router, user="x@y.z").message == "who are you?"


def test_a_file_map_and_an_inline_map_are_services_only_when_they_watch_a_file(tmp_path: Path) -> None:
    inline = router_of('[router]\ntype = "map"\n[router.default]\nhost = "h"\nport = 1\n')
    assert isinstance(inline, MapRouter) and not IService.providedBy(inline) and not IReloadable.providedBy(inline)
    (tmp_path / "routes.toml").write_text('[default]\nhost = "h"\nport = 1\n')
    spec, errors = spec_of('[router]\ntype = "map"\nfile = "routes.toml"\n', base_dir=str(tmp_path))
    assert errors == [] and spec is not None
    watched = spec.build(Clock())
    assert IRouter.providedBy(watched) and IService.providedBy(watched) and IReloadable.providedBy(watched)


def test_descriptions_say_what_the_map_does() -> None:
    spec, _ = spec_of(FIRST_MATCH)
    assert spec is not None and spec.description == 'map: 6 rules, no match: reject "no route for this session"'
    spec, _ = spec_of('[router]\ntype = "map"\n[router.default]\nroutes = [{host = "a", port = 1}, {host = "b", port = 2}]\n')
    assert spec is not None and spec.description == "map: 0 rules, default a:1, then b:2"
    spec, _ = spec_of('[router]\ntype = "map"\nfile = "/etc/mailrelay/routes.toml"\ncheck_interval = 5\n')
    assert spec is not None and spec.description == "map: rules from /etc/mailrelay/routes.toml, checked every 5s"


# -- matching many rules: the index finds what trying every rule in order finds -------

USERS = ["a@x.org", "b@x.org", "c@y.org", "solo"]
NETWORKS = ["10.0.0.0/8", "10.1.0.0/16", "10.1.2.3", "::ffff:10.0.0.0/104", "2001:db8::/32", "2001:db8::1"]
CLIENTS = ["10.1.2.3", "10.2.0.1", "::ffff:10.1.2.3", "2001:db8::1", "2001:db8:1::", "192.0.2.1", "/tmp/socket"]


def _subset(values: list[str]) -> st.SearchStrategy[list[str]]:
    return st.lists(st.sampled_from(values), min_size=1, max_size=3, unique=True)


@st.composite
def rules(draw: st.DrawFn) -> list[dict[str, list[str]]]:
    conditions = st.fixed_dictionaries(
        {},
        optional={
            "user": _subset(USERS),
            "domain": _subset(["x.org", "y.org"]),
            "listener": _subset(["imap", "smtp"]),
            "protocol": _subset(["imap", "smtp", "none"]),
            "client": _subset(NETWORKS),
        },
    ).filter(bool)
    return draw(st.lists(conditions, max_size=12))


def _reference_match(rules: list[dict[str, list[str]]], r: RouteRequest) -> int | None:
    """The documented semantics, rule by rule, with nothing precomputed."""
    for index, rule in enumerate(rules):
        user = r.user.lower() if r.user else None
        if "user" in rule and user not in rule["user"]:
            continue
        if "domain" in rule and (user is None or "@" not in user or user.rsplit("@", 1)[1] not in rule["domain"]):
            continue
        if "listener" in rule and r.listener not in rule["listener"]:
            continue
        if "protocol" in rule and r.protocol not in rule["protocol"]:
            continue
        if "client" in rule:
            if r.client[0].startswith("/"):
                continue
            address = ipaddress.ip_address(r.client[0])
            forms = [address]
            if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
                forms.append(address.ipv4_mapped)
            if not any(form in ipaddress.ip_network(n) for form in forms for n in rule["client"]):
                continue
        return index
    return None


@given(
    rules(),
    st.sampled_from(USERS + ["A@X.ORG", "nobody@y.org", None]),
    st.sampled_from(["imap", "smtp"]),
    st.sampled_from(["imap", "smtp", "none"]),
    st.sampled_from(CLIENTS),
)
def test_the_index_answers_like_trying_every_rule_in_order(
    written: list[dict[str, list[str]]], user: str | None, listener: str, protocol: str, client: str
) -> None:
    route = Route(host="h", port=1)
    parsed = [
        Rule(
            index=i,
            routes=(route,),
            users=frozenset(rule["user"]) if "user" in rule else None,
            domains=frozenset(rule["domain"]) if "domain" in rule else None,
            listeners=frozenset(rule["listener"]) if "listener" in rule else None,
            protocols=frozenset(rule["protocol"]) if "protocol" in rule else None,
            networks=tuple(ipaddress.ip_network(n) for n in rule["client"]) if "client" in rule else None,
        )
        for i, rule in enumerate(written)
    ]
    r = request(user=user, listener=listener, protocol=protocol, client=(client, 0 if client.startswith("/") else 1))
    found = RouteMap(parsed, None, "test").match(r)
    assert (found.index if found is not None else None) == _reference_match(written, r)


def test_ten_thousand_user_rules_match_by_lookup() -> None:
    text = '[router]\ntype = "map"\n' + "".join(
        f'[[router.rule]]\nuser = "user{i}@example.org"\nroute = {{ host = "10.0.0.1", port = {i + 1} }}\n' for i in range(10_000)
    )
    router = router_of(text)
    assert ports(router, user="USER9999@example.org") == [10_000]
    assert ports(router, user="user0@example.org") == [1]
    # Only the rules filed under the request's own user are looked at.
    assert list(router.route_map._candidates(_facts(user="user5@example.org"))) == [5]


def _facts(**fields: Any) -> Any:
    from mailrelay.routers.map_rules import _Facts

    return _Facts.of(request(**fields))


# -- passwords -----------------------------------------------------------------------


def password_router(hashed: str, extra: str = "", verify: Any = sync_verify) -> Any:
    spec, errors = spec_of(
        f"""
        [router]
        type = "map"
        [[router.rule]]
        user = "alice@example.org"
        password = '{hashed}'
        route = {{ host = "10.0.0.5", port = 143 }}
        {extra}
        [[router.rule]]
        domain = "example.org"
        route = {{ host = "10.0.0.6", port = 143 }}
        """
    )
    assert errors == [] and spec is not None
    return spec.build(Clock(), verify=verify)


@pytest.mark.parametrize(
    "hashed",
    [BCRYPT_HASH, "$2a$" + BCRYPT_HASH[4:], "$2y$" + BCRYPT_HASH[4:], ARGON2ID_HASH, ARGON2I_HASH],
    ids=["bcrypt-2b", "bcrypt-2a", "bcrypt-2y", "argon2id", "argon2i"],
)
def test_a_password_rule_routes_only_the_right_password(hashed: str) -> None:
    router = password_router(hashed)
    for method in ("plain", "login"):
        assert ask(router, user="alice@example.org", password=PASSWORD, auth_method=method) == [Route(host="10.0.0.5", port=143)]
    wrong = rejection(router, user="alice@example.org", password="Correct horse battery", auth_method="plain")
    # A failed check refuses the session: it does not fall through to the domain rule.
    assert (wrong.message, wrong.wait, wrong.close) == ("invalid credentials", 2.0, False)


def test_a_missing_password_is_invalid_credentials_with_the_rule_s_wait() -> None:
    router = password_router(BCRYPT_HASH, extra="reject_wait = 5")
    for fields in ({"auth_method": "plain"}, {"auth_method": "none"}):
        missing = rejection(router, user="alice@example.org", **fields)
        assert (missing.message, missing.wait) == ("invalid credentials", 5.0)
    assert rejection(router, user="alice@example.org", password="nope", auth_method="login").wait == 5.0


def test_passwords_longer_than_bcrypt_takes_are_wrong_not_an_error() -> None:
    router = password_router(BCRYPT_HASH)
    assert rejection(router, user="alice@example.org", password="x" * 100, auth_method="plain").message == "invalid credentials"
    assert rejection(router, user="alice@example.org", password="\udcff", auth_method="plain").message == "invalid credentials"


@pytest.mark.parametrize("method", ["cram-md5", "apop", "xoauth2", "oauthbearer", "external"])
def test_methods_without_a_password_to_check_are_refused_clearly(method: str) -> None:
    checked: list[str] = []
    router = password_router(BCRYPT_HASH, verify=lambda h, p: checked.append(p))
    refused = rejection(router, user="alice@example.org", password="digest-or-token", auth_method=method)
    assert refused.message == (f"authentication method {method.upper()} cannot be checked for this account: use PLAIN or LOGIN")
    assert checked == []
    # Users of the same domain without a password rule are not affected.
    assert ports(router, user="bob@example.org", auth_method=method) == [143]


# An attacker guessing account names: an unknown user must be answered as a known user
# with a wrong password is, in words, in wait, and after a hash check of the same cost.


def test_an_unknown_user_s_password_login_is_refused_as_a_wrong_password_after_a_real_check() -> None:
    checked: list[tuple[str, str]] = []

    def recording_verify(hashed: str, password: str) -> Deferred[bool]:
        checked.append((hashed, password))
        return sync_verify(hashed, password)

    router = password_router(BCRYPT_HASH, extra="reject_wait = 3", verify=recording_verify)
    known = rejection(router, user="alice@example.org", password="guess", auth_method="plain")
    assert checked == [(BCRYPT_HASH, "guess")]
    unknown = rejection(router, user="mallory@example.net", password="guess", auth_method="plain")
    assert (
        (unknown.message, unknown.wait, unknown.close)
        == (known.message, known.wait, known.close)
        == (
            "invalid credentials",
            3.0,
            False,
        )
    )
    assert checked == [(BCRYPT_HASH, "guess")] * 2  # the decoy check ran as a real one would
    # Alice's own password does not open an account that does not exist.
    assert rejection(router, user="mallory@example.net", password=PASSWORD, auth_method="login").message == "invalid credentials"
    # Without a password, and with a method nothing can check: the same words as for alice.
    for fields in ({"auth_method": "plain"}, {"password": "token", "auth_method": "xoauth2"}):
        assert (
            rejection(router, user="mallory@example.net", **fields).message
            == rejection(router, user="alice@example.org", **fields).message
        )


def test_without_password_rules_an_unknown_user_s_password_login_is_invalid_credentials() -> None:
    router = router_of('[router]\ntype = "map"\n[[router.rule]]\nuser = "alice"\nroute = { host = "h", port = 1 }\n')
    refused = rejection(router, user="bob", password="x", auth_method="plain")
    assert (refused.message, refused.wait) == ("invalid credentials", 2.0)
    # Sessions without a password (MX, EXTERNAL, splice) are still told there is no route.
    for method in ("none", "external"):
        assert rejection(router, user="bob", auth_method=method).message == "no route for this session"


def test_the_password_is_never_logged_nor_in_any_error(tmp_path: Path, logs: LogCapture) -> None:
    secret = "Plaintext-Secret-42"
    # A plaintext password in the configuration: refused without being quoted.
    errors = config_errors({"type": "map", "rule": [{"user": "a", "password": secret, "route": {"host": "h", "port": 1}}]})
    assert errors == [
        "mailrelay.toml: router.rule[0].password: must be a bcrypt ($2b$...) or argon2 ($argon2id$...) hash,"
        " not a plaintext password"
    ]
    # ... nor in a map file being reloaded, whose error is logged.
    path = tmp_path / "routes.toml"
    path.write_text('[[rule]]\nuser = "a"\nroute = { host = "h", port = 1 }\n')
    router = FileMapRouter(str(path), 2, Clock(), sync_verify)
    path.write_text(f'[[rule]]\nuser = "a"\npassword = "{secret}"\nroute = {{ host = "h", port = 1 }}\n[[rule]]\nuser = 5\n')
    router.reload()
    # A wrong password and a right one, through the router.
    router = password_router(BCRYPT_HASH)
    rejection(router, user="alice@example.org", password=secret, auth_method="plain")
    ask(router, user="alice@example.org", password=PASSWORD, auth_method="plain")
    assert logs.events
    for event in logs.events:
        for text in (repr(event), *logs.lines()):
            assert secret not in text and PASSWORD not in text


class ThreadedPasswordTests(ProxyTestCase):
    """The real reactor: hashing runs in its thread pool, not on the reactor thread."""

    async def test_hashing_runs_in_the_reactor_thread_pool(self) -> None:
        router = password_router(BCRYPT_HASH, verify=threaded_verify(reactor))
        d = ask_router(router, request(user="alice@example.org", password=PASSWORD, auth_method="plain"), reactor, 30)
        self.assertFalse(d.called)  # it is being hashed in a thread
        self.assertEqual(await d, [Route(host="10.0.0.5", port=143)])
        wrong = ask_router(router, request(user="alice@example.org", password="wrong", auth_method="plain"), reactor, 30)
        with self.assertRaises(Reject):
            await wrong

    async def test_the_default_verify_is_the_threaded_one(self) -> None:
        text = f'[router]\ntype = "map"\n[[router.rule]]\nuser = "a"\npassword = \'{ARGON2ID_HASH}\'\n'
        spec, errors = spec_of(text + 'route = { host = "h", port = 1 }\n')
        assert spec is not None
        router = spec.build(reactor)
        d = ask_router(router, request(user="a", password=PASSWORD, auth_method="login"), reactor, 30)
        self.assertFalse(d.called)
        self.assertEqual(await d, [Route(host="h", port=1)])


# -- the map file: reloaded when it changes ---------------------------------------------


class MapFile:
    """A map file rewritten the way an administrator should: a new file renamed over
    the old one, each version with its own modification time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.version = 0

    def write(self, text: str) -> None:
        self.version += 1
        new = self.path.with_name(self.path.name + ".new")
        new.write_text(textwrap.dedent(text))
        stamp = (1_700_000_000 + self.version) * 1_000_000_000
        os.utime(new, ns=(stamp, stamp))
        os.replace(new, self.path)


def rules_to(*port_by_user: tuple[str, int]) -> str:
    return "".join(f'[[rule]]\nuser = "{user}"\nroute = {{ host = "10.0.0.1", port = {port} }}\n' for user, port in port_by_user)


@pytest.fixture
def map_file(tmp_path: Path) -> MapFile:
    return MapFile(tmp_path / "routes.toml")


def file_router(map_file: MapFile, clock: Clock, check_interval: float = 2) -> FileMapRouter:
    spec, errors = spec_of(
        f'[router]\ntype = "map"\nfile = "{map_file.path.name}"\ncheck_interval = {check_interval}\n',
        base_dir=str(map_file.path.parent),
    )
    assert errors == [] and spec is not None
    router = spec.build(clock, verify=sync_verify)
    assert isinstance(router, FileMapRouter)
    return router


def errors_logged(logs: LogCapture) -> list[str]:
    from twisted.logger import formatEvent

    return [formatEvent(e) for e in logs.events if e.get("log_level") == LogLevel.error]


def infos_logged(logs: LogCapture) -> list[str]:
    from twisted.logger import formatEvent

    return [formatEvent(e) for e in logs.events if e.get("log_level") == LogLevel.info]


def test_a_changed_file_is_picked_up_at_the_next_check(map_file: MapFile, logs: LogCapture) -> None:
    clock = Clock()
    map_file.write(rules_to(("alice", 1)))
    router = file_router(map_file, clock, check_interval=5)
    router.startService()
    assert ports(router, user="alice") == [1]
    map_file.write(rules_to(("alice", 2), ("bob", 3)))
    clock.advance(4.9)
    assert ports(router, user="alice") == [1]
    clock.advance(0.1)
    assert ports(router, user="alice") == [2] and ports(router, user="bob") == [3]
    assert infos_logged(logs)[-1] == f"route map {map_file.path} reloaded: 2 rules"
    clock.advance(50)  # unchanged: not read again
    assert sum("reloaded" in line for line in infos_logged(logs)) == 1
    router.stopService()
    assert clock.getDelayedCalls() == []
    map_file.write(rules_to(("alice", 4)))
    clock.advance(50)
    assert ports(router, user="alice") == [2]


def test_a_broken_file_keeps_the_old_map_and_is_logged_once(map_file: MapFile, logs: LogCapture) -> None:
    clock = Clock()
    map_file.write(rules_to(("alice", 1)))
    router = file_router(map_file, clock)
    router.startService()
    map_file.write('[[rule]]\nclient = "192.0.2.300"\nroute = { host = "h", port = 1 }\n[[rule]]\nuser = "bob"\n')
    for _ in range(5):
        clock.advance(2)
    assert ports(router, user="alice") == [1]
    assert errors_logged(logs) == [
        f"route map {map_file.path} not reloaded, keeping the previous 1 rule(s): "
        f'{map_file.path}: rule[0].client: "192.0.2.300" is not an IP address or network (CIDR); '
        f"{map_file.path}: rule[1]: needs route, routes or reject"
    ]
    # Another broken version is another error; then a good one is picked up.
    map_file.write("[[rule]\n")
    clock.advance(2)
    clock.advance(2)
    assert len(errors_logged(logs)) == 2
    assert errors_logged(logs)[1].startswith(f"route map {map_file.path} not reloaded, keeping the previous 1 rule(s): ")
    assert f"{map_file.path}: not valid TOML: " in errors_logged(logs)[1]
    map_file.write(rules_to(("alice", 2)))
    clock.advance(2)
    assert ports(router, user="alice") == [2]
    assert infos_logged(logs)[-1] == f"route map {map_file.path} reloaded: 1 rule"
    assert len(errors_logged(logs)) == 2


def test_a_removed_file_keeps_the_old_map_until_it_is_back(map_file: MapFile, logs: LogCapture) -> None:
    clock = Clock()
    map_file.write(rules_to(("alice", 1)))
    router = file_router(map_file, clock)
    router.startService()
    map_file.path.unlink()
    clock.advance(2)
    clock.advance(2)
    assert errors_logged(logs) == [
        f"route map {map_file.path} not reloaded, keeping the previous 1 rule(s): {map_file.path}: no such file"
    ]
    assert ports(router, user="alice") == [1]
    map_file.write(rules_to(("alice", 7)))
    clock.advance(2)
    assert ports(router, user="alice") == [7]


def test_reload_reads_the_file_now_and_reports_every_time(map_file: MapFile, logs: LogCapture) -> None:
    clock = Clock()
    map_file.write(rules_to(("alice", 1)))
    router = file_router(map_file, clock, check_interval=3600)
    router.startService()
    assert IReloadable.providedBy(router)
    map_file.write(rules_to(("alice", 2)))
    router.reload()  # synchronous: the new map answers as soon as it returns
    assert ports(router, user="alice") == [2]
    map_file.write("not = [toml\n")
    router.reload()
    router.reload()  # asked for: answered, even for the same broken version
    assert len(errors_logged(logs)) == 2
    clock.advance(3600)  # the check does not repeat it
    assert len(errors_logged(logs)) == 2
    assert ports(router, user="alice") == [2]


def test_a_session_keeps_the_map_it_was_routed_with(map_file: MapFile) -> None:
    """A password check in progress finishes with the rule it matched, whatever is reloaded meanwhile."""
    map_file.write(f'[[rule]]\nuser = "alice"\npassword = \'{BCRYPT_HASH}\'\nroute = {{ host = "h", port = 1 }}\n')
    pending: list[Deferred[bool]] = []

    def slow_verify(hashed: str, password: str) -> Deferred[bool]:
        d: Deferred[bool] = Deferred()
        pending.append(d)
        return d

    spec, _ = spec_of(f'[router]\ntype = "map"\nfile = "{map_file.path}"\n')
    assert spec is not None
    router = spec.build(Clock(), verify=slow_verify)
    assert isinstance(router, FileMapRouter)
    d = ask_router(router, request(user="alice", password=PASSWORD, auth_method="plain"), Clock(), 5)
    map_file.write(rules_to(("alice", 2)))
    router.reload()
    pending[0].callback(True)
    assert outcome(d) == [Route(host="h", port=1)]
    assert ports(router, user="alice") == [2]


# -- configuration errors ----------------------------------------------------------------

ROUTE = {"host": "10.0.0.5", "port": 143}


@pytest.mark.parametrize(
    "router, expected",
    [
        (
            {"type": "map", "rule": [{"route": ROUTE}]},
            [
                "router.rule[0]: has no condition (user, domain, listener, client, protocol);"
                " for sessions that no rule matches, use [router.default]"
            ],
        ),
        (
            {"type": "map", "rule": [{"client": ["192.0.2.0/24", "192.0.2.0/33"], "route": ROUTE}]},
            ['router.rule[0].client: "192.0.2.0/33" is not an IP address or network (CIDR)'],
        ),
        (
            {"type": "map", "rule": [{"client": "2001:db8::1/32", "route": ROUTE}]},
            ['router.rule[0].client: "2001:db8::1/32" has host bits set (the network is 2001:db8::/32)'],
        ),
        (
            {"type": "map", "rule": [{"client": [], "route": ROUTE}]},
            ["router.rule[0].client: must list at least one value"],
        ),
        (
            {"type": "map", "rule": [{"listener": "a"}, {"protocol": "http", "route": ROUTE}]},
            [
                "router.rule[0]: needs route, routes or reject",
                'router.rule[1].protocol: must be one of "smtp", "imap", "pop3", "none", not "http"',
            ],
        ),
        (
            {"type": "map", "rule": [{"user": "a", "route": {"host": "h"}}]},
            ["router.rule[0].route.port: is required"],
        ),
        (
            {"type": "map", "rule": [{"user": "a", "route": ROUTE, "reject": "no"}]},
            ["router.rule[0].reject: cannot be used with route"],
        ),
        (
            {"type": "map", "rule": [{"user": "a", "routes": []}]},
            ["router.rule[0].routes: must list at least one route"],
        ),
        (
            {"type": "map", "rule": [{"user": "a", "route": ROUTE, "reject_wait": 1}]},
            ["router.rule[0].reject_wait: applies only to a rule with reject or password"],
        ),
        (
            {"type": "map", "rule": [{"user": "a", "reject": "no", "reject_wait": -1}]},
            ["router.rule[0].reject_wait: must be 0 or more seconds, not -1"],
        ),
        (
            {"type": "map", "rule": [{"user": "a", "reject": ""}]},
            ["router.rule[0].reject: must not be empty (it is what the client is told)"],
        ),
        (
            {"type": "map", "rule": [{"user": "a", "reject": "no\r\n250 OK"}]},
            ["router.rule[0].reject: must be one line of text, without control characters"],
        ),
        (
            {"type": "map", "rule": [{"domain": "alice@example.org", "route": ROUTE}]},
            ['router.rule[0].domain: "alice@example.org" is not a domain (to match a whole address, use user)'],
        ),
        (
            {"type": "map", "rule": [{"user": "a", "colour": "red", "route": ROUTE}]},
            ["router.rule[0].colour: unknown key"],
        ),
        (
            {"type": "map", "rule": [{"user": "a", "password": "$2b$12$tooshort", "route": ROUTE}]},
            ["router.rule[0].password: is not a well-formed bcrypt hash"],
        ),
        (
            {"type": "map", "rule": [{"user": "a", "password": "$argon2id$v=19$nonsense", "route": ROUTE}]},
            ["router.rule[0].password: is not a well-formed argon2 hash"],
        ),
        (
            {"type": "map", "rule": [{"user": "a", "password": BCRYPT_HASH, "reject": "no"}]},
            ["router.rule[0].password: cannot be used with reject (a rejected session needs no password)"],
        ),
        (
            {"type": "map", "rule": [{"user": "a", "password": 1234, "route": ROUTE}]},
            ["router.rule[0].password: must be a string, not an integer"],
        ),
        (
            {"type": "map", "default": {"domain": "a", **ROUTE}},
            ["router.default.domain: unknown key"],
        ),
        (
            {"type": "map"},
            ["router: needs [[router.rule]] tables or a file of them (file = ...)"],
        ),
        (
            {"type": "map", "rule": []},
            ["router: has no [[router.rule]] and no [router.default]: it would refuse every session"],
        ),
        (
            {"type": "map", "file": "/etc/routes.toml", "rule": [{"user": "a", "route": ROUTE}], "default": ROUTE},
            [
                "router.rule: cannot be used with file: a file map's rules and default are all in /etc/routes.toml",
                "router.default: cannot be used with file: a file map's rules and default are all in /etc/routes.toml",
            ],
        ),
        (
            {"type": "map", "default": ROUTE, "check_interval": 5},
            ["router.check_interval: applies only with file"],
        ),
        (
            {"type": "map", "file": "/etc/routes.toml", "check_interval": 0},
            ["router.check_interval: must be a positive number of seconds, not 0"],
        ),
    ],
)
def test_config_errors_name_the_key_and_the_reason(router: dict[str, Any], expected: list[str]) -> None:
    assert config_errors(router) == [f"mailrelay.toml: {line}" for line in expected]


def test_errors_in_a_listener_s_own_map_name_its_path() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"listener": [{**LISTENER, "router": {"type": "map", "rule": [{"route": ROUTE}]}}]}, "m.toml")
    assert caught.value.errors == [
        "m.toml: listener[0].router.rule[0]: has no condition (user, domain, listener, client, protocol);"
        " for sessions that no rule matches, use [listener[0].router.default]"
    ]


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def build_errors(config_path: Path) -> list[str]:
    config = load_config(config_path)
    with pytest.raises(ConfigError) as caught:
        MailrelayService(config, reactor=MemoryReactor())
    return caught.value.errors


CONFIG_WITH_FILE = """
[router]
type = "map"
file = "routes.toml"

[[listener]]
name = "relay"
listen = "tcp:0:interface=127.0.0.1"
mode = "splice"
"""


def test_a_missing_map_file_stops_the_start(tmp_path: Path) -> None:
    config = write(tmp_path / "mailrelay.toml", CONFIG_WITH_FILE)
    assert build_errors(config) == [f"{config}: router.file: {tmp_path / 'routes.toml'}: no such file"]


def test_errors_in_the_map_file_name_that_file_and_paths_inside_it(tmp_path: Path) -> None:
    config = write(tmp_path / "mailrelay.toml", CONFIG_WITH_FILE)
    routes = write(
        tmp_path / "routes.toml",
        """
        [[rule]]
        user = "a"
        route = { host = "h", port = 1 }

        [[rule]]
        client = "10.0.0.0/8"
        password = "hunter2"
        routes = [{ host = "h", port = 0 }]

        [default]
        reject = "no"
        colour = "red"
        """,
    )
    assert build_errors(config) == [
        f"{routes}: rule[1].password: must be a bcrypt ($2b$...) or argon2 ($argon2id$...) hash, not a plaintext password",
        f"{routes}: rule[1].routes[0].port: must be from 1 to 65535, not 0",
        f"{routes}: default.colour: unknown key",
    ]
    write(routes, "[[rule]]\nuser = \n")
    [error] = build_errors(config)
    assert error.startswith(f"{routes}: not valid TOML: ")
    write(routes, "")
    assert build_errors(config) == [f"{routes}: has no [[rule]] and no [default]: it would refuse every session"]
    routes.write_bytes(b'[default]\nreject = "\xff"\n')
    assert build_errors(config) == [f"{routes}: not valid TOML: not UTF-8 text (byte 20)"]


def test_a_map_file_is_found_next_to_the_configuration(tmp_path: Path) -> None:
    config = write(tmp_path / "mailrelay.toml", CONFIG_WITH_FILE)
    write(tmp_path / "routes.toml", '[[rule]]\nlistener = "relay"\nroute = { host = "10.0.0.5", port = 143 }\n')
    parsed = load_config(config)
    assert parsed.router is not None
    assert parsed.router.description == f"map: rules from {tmp_path / 'routes.toml'}, checked every 2s"
    service = MailrelayService(parsed, reactor=MemoryReactor())
    [router] = service.routers
    assert ports(router, listener="relay") == [143]
    assert ports(router, listener="other") == "reject: no route for this session"


# -- end to end: a real listener, real upstreams ----------------------------------------


def tagged_echo(tag: bytes) -> Any:
    def handle(conn: socket.socket) -> int:
        conn.sendall(tag)
        return echo(conn)

    return handle


class EndToEndTests(ProxyTestCase):
    async def test_sessions_routed_by_client_network_and_listener_and_a_reloaded_file(self) -> None:
        a = self.server(tagged_echo(b"A:"))
        b = self.server(tagged_echo(b"B:"))
        directory = tempfile.TemporaryDirectory()
        self.addCleanup(directory.cleanup)
        map_file = MapFile(Path(directory.name) / "routes.toml")

        def rules(beta: int, loopback: int) -> str:
            return f"""
            [[rule]]
            listener = "beta"
            route = {{ host = "127.0.0.1", port = {beta} }}

            [[rule]]
            client = ["127.0.0.0/8", "::1"]
            route = {{ host = "127.0.0.1", port = {loopback} }}
            """

        map_file.write(rules(beta=b.port, loopback=a.port))
        listen = "tcp:0:interface=127.0.0.1"
        config = {
            "router": {"type": "map", "file": str(map_file.path), "check_interval": 3600},
            "listener": [
                {"name": "alpha", "listen": listen, "mode": "splice"},
                {"name": "beta", "listen": listen, "mode": "splice"},
            ],
        }
        service, alpha = await self.start_proxy(config)
        beta_port = service.listeners["beta"].port
        assert beta_port is not None
        beta = tcp_port(await beta_port)

        self.assertEqual(await self.in_thread(exchange, alpha, b"hello"), b"A:hello")
        self.assertEqual(await self.in_thread(exchange, beta, b"hello"), b"B:hello")

        map_file.write(rules(beta=a.port, loopback=b.port))
        await service.reload()
        self.assertEqual(await self.in_thread(exchange, alpha, b"again"), b"B:again")
        self.assertEqual(await self.in_thread(exchange, beta, b"again"), b"A:again")
        self.assertIn(f"route map {map_file.path} reloaded: 2 rules", self.logs.lines())
