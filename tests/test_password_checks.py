"""
Who checks the password. With `login = "xclient"` or `"none"` the upstream takes
mailrelay's word for who logged in (XCLIENT LOGIN= tells Postfix; "none" logs in as
nobody at an upstream that trusts mailrelay), so on a listener that takes passwords
the Router must have checked it:

- the configuration refuses routes on which no one would (a static route, a map rule
  or default without a password hash that could answer such a listener): at `check`,
  at start, and when a map file is read again (which keeps the previous map);
- at run time, a Router that answers a password login with such a route without
  declaring `verifies_passwords` is a router error: the client gets a temporary
  failure and is never logged in.
"""

from __future__ import annotations

import os
import shutil
import smtplib
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import bcrypt
import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor
from twisted.python.failure import Failure

from mailrelay import Reject, Route, Router, RouteRequest, RouterError, makeService
from mailrelay.__main__ import check
from mailrelay.ask import ask_router
from mailrelay.config import ConfigError, load_config, parse_config
from mailrelay.routers.cache import CachingRouter
from mailrelay.routers.map import FileMapRouter, MapRouter
from mailrelay.routers.passwords import verify_password
from mailrelay.routers.static import StaticRouter
from mailrelay.service import MailrelayService
from tests.support.frontends import PASSWORD, USER
from tests.support.smtp import BOB, MESSAGE, PostfixTestCase, SMTPTestCase, lf

WAIT = 60.0  # hang guard for a subprocess, never a timing assertion
REPO = Path(__file__).resolve().parent.parent
HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()

SUBMISSION = """
[[listener]]
name = "submission"
listen = "tcp:0:interface=127.0.0.1"
mode = "starttls"
protocol = "smtp"
"""

MX = """
[[listener]]
name = "mx"
listen = "tcp:0:interface=127.0.0.1"
mode = "starttls"
protocol = "smtp"
auth = ["none"]
"""

ADVICE = (
    " makes the upstream take mailrelay's word for who logged in, but no one checks the password: {why}, and {which}"
    ' password logins. Use login = "passthrough" so that the upstream checks the password, give a map rule a password'
    " hash, or route with an http router or a python router that declares verifies_passwords = True"
)


def refusal(source: str, key: str, login: str, why: str, which: str = 'listener "submission" accepts') -> str:
    return f'{source}: {key}: "{login}"' + ADVICE.format(why=why, which=which)


def write(tmp_path: Path, text: str, name: str = "mailrelay.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def checked(path: Path, capsys: Any) -> tuple[int, list[str], list[str]]:
    """`python -m mailrelay check` in process: its status, stdout and stderr lines."""
    status = check(str(path))
    captured = capsys.readouterr()
    return status, captured.out.splitlines(), captured.err.splitlines()


def request(**fields: Any) -> RouteRequest:
    values: dict[str, Any] = dict(
        listener="submission", protocol="smtp", mode="starttls", client=("192.0.2.7", 50000), local=("192.0.2.1", 587)
    )
    values.update(fields)
    return RouteRequest(**values)


PLAIN = dict(user=USER, password="not the password", auth_method="plain")


def ask(router: Any, **fields: Any) -> Any:
    """What `ask_router` makes of `router`'s answer: the routes, or the Failure."""
    results: list[Any] = []
    ask_router(router, request(**fields), Clock(), 5).addBoth(results.append)
    assert results, "the router did not answer at once"
    return results[0]


def router_error(router: Any, **fields: Any) -> str:
    answer = ask(router, **fields)
    assert isinstance(answer, Failure), answer
    answer.trap(RouterError)
    return str(answer.value)


# -- the configuration ----------------------------------------------------------------


@pytest.mark.parametrize("login", ["xclient", "none"])
def test_check_refuses_a_static_route_that_trusts_mailrelay_on_a_listener_that_takes_passwords(
    tmp_path: Path, capsys: Any, login: str
) -> None:
    path = write(tmp_path, f'[router]\ntype = "static"\nhost = "127.0.0.1"\nport = 25\nlogin = "{login}"\n' + SUBMISSION)
    status, out, err = checked(path, capsys)
    assert status == 1 and out == []
    assert err == [
        f"{path}: configuration is invalid",
        refusal(str(path), "router.login", login, "the static router checks none"),
    ]


def test_each_refused_route_is_named_by_its_key_with_every_listener_it_would_serve(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [router]
        type = "static"
        routes = [ { host = "10.0.0.5", port = 25 }, { host = "10.0.0.6", port = 25, login = "xclient" } ]
        """
        + SUBMISSION
        + SUBMISSION.replace('"submission"', '"smtps"').replace('"starttls"', '"tls"')
        + """
        [[listener]]
        name = "imap"
        listen = "tcp:0:interface=127.0.0.1"
        mode = "starttls"
        protocol = "imap"
        router = { type = "static", host = "10.0.0.7", port = 143, login = "none" }
        """,
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.errors == [
        refusal(
            str(path),
            "router.routes[1].login",
            "xclient",
            "the static router checks none",
            'listeners "submission", "smtps" accept',
        ),
        refusal(str(path), "listener[2].router.login", "none", "the static router checks none", 'listener "imap" accepts'),
    ]


def test_startup_refuses_it_too(tmp_path: Path) -> None:
    config = {
        "router": {"type": "static", "host": "127.0.0.1", "port": 25, "login": "xclient"},
        "listener": [{"name": "submission", "listen": "tcp:0", "mode": "tls", "protocol": "smtp", "auth": ["plain"]}],
    }
    with pytest.raises(ConfigError) as caught:
        makeService(config, reactor=MemoryReactor())
    assert caught.value.errors == [refusal("<config>", "router.login", "xclient", "the static router checks none")]


def test_check_accepts_it_where_no_password_is_taken_and_shows_the_login_mode(tmp_path: Path, capsys: Any) -> None:
    # MX use (auth "none") and a splice listener take no password: XCLIENT only names the client.
    path = write(
        tmp_path,
        '[router]\ntype = "static"\nhost = "127.0.0.1"\nport = 25\nlogin = "xclient"\n'
        + MX
        + '[[listener]]\nname = "raw"\nlisten = "tcp:0:interface=127.0.0.1"\nmode = "splice"\n',
    )
    status, out, err = checked(path, capsys)
    assert (status, err) == (0, []), err
    assert "router: static: 127.0.0.1:25 (login=xclient)" in out
    assert not any("passwords:" in line for line in out)  # no listener here takes one


def test_check_accepts_passthrough_and_says_who_checks_the_password(tmp_path: Path, capsys: Any) -> None:
    path = write(tmp_path, '[router]\ntype = "static"\nhost = "127.0.0.1"\nport = 25\n' + SUBMISSION)
    status, out, err = checked(path, capsys)
    assert (status, err) == (0, []), err
    assert "router: static: 127.0.0.1:25" in out
    assert "  passwords: the router verifies none: checked by the upstream (login=passthrough)" in out


MAP = """
[router]
type = "map"
[[router.rule]]
user = "alice@example.org"
password = "{hash}"
route = {{ host = "10.0.0.5", port = 25, login = "xclient" }}
[[router.rule]]
listener = "mx"
route = {{ host = "10.0.0.6", port = 25, login = "none" }}
[[router.rule]]
protocol = "imap"
route = {{ host = "10.0.0.7", port = 25, login = "xclient" }}
[router.default]
host = "10.0.0.8"
port = 587
"""


def test_check_accepts_a_map_whose_trusting_routes_need_a_password_or_serve_no_password_listener(
    tmp_path: Path, capsys: Any
) -> None:
    path = write(tmp_path, MAP.format(hash=HASH) + SUBMISSION + MX)
    status, out, err = checked(path, capsys)
    assert (status, err) == (0, []), err
    assert "router: map: 3 rules (1 with a password hash), default 10.0.0.8:587" in out
    assert (
        "  passwords: verified by the router for rules with a password hash, by the upstream (login=passthrough) for the others"
        in out
    )
    assert HASH not in "\n".join(out)


@pytest.mark.parametrize(
    "old, new, key, login, why",
    [
        # The MX listener's rule, opened to the submission listener too.
        ('listener = "mx"', 'listener = ["mx", "submission"]', "router.rule[1].route.login", "none", "the rule"),
        # A rule for another protocol, opened to SMTP.
        ('protocol = "imap"', 'protocol = ["imap", "smtp"]', "router.rule[2].route.login", "xclient", "the rule"),
        # A rule that any listener's login may match.
        ('listener = "mx"', 'client = "192.0.2.0/24"', "router.rule[1].route.login", "none", "the rule"),
        # The default.
        ("port = 587", 'port = 587\nlogin = "xclient"', "router.default.login", "xclient", "the default"),
    ],
)
def test_check_refuses_a_map_rule_without_a_password_that_trusts_mailrelay_on_a_password_listener(
    tmp_path: Path, capsys: Any, old: str, new: str, key: str, login: str, why: str
) -> None:
    text = MAP.format(hash=HASH).replace(old, new)
    path = write(tmp_path, text + SUBMISSION + MX)
    status, out, err = checked(path, capsys)
    assert (status, out) == (1, [])
    assert err == [f"{path}: configuration is invalid", refusal(str(path), key, login, f"{why} has no password hash")]


def test_a_map_file_is_checked_for_the_listeners_it_serves_at_start(tmp_path: Path, capsys: Any) -> None:
    write(
        tmp_path,
        '[[rule]]\ndomain = "example.org"\nroutes = [ { host = "10.0.0.5", port = 25, login = "xclient" } ]\n',
        "routes.toml",
    )
    path = write(tmp_path, '[router]\ntype = "map"\nfile = "routes.toml"\n' + SUBMISSION + MX)
    expected = refusal(str(tmp_path / "routes.toml"), "rule[0].routes[0].login", "xclient", "the rule has no password hash")
    with pytest.raises(ConfigError) as caught:
        MailrelayService(load_config(path), reactor=MemoryReactor())
    assert caught.value.errors == [expected]
    status, out, err = checked(path, capsys)
    assert (status, out, err) == (1, [], [f"{path}: configuration is invalid", expected])
    # Served to the MX listener only (its own router), the same map is fine.
    path = write(tmp_path, MX.replace('auth = ["none"]', 'router = { type = "map", file = "routes.toml" }\nauth = ["none"]'))
    assert checked(path, capsys)[0] == 0


def test_a_map_file_reload_that_would_route_password_logins_unchecked_keeps_the_previous_map(tmp_path: Path) -> None:
    routes = write(tmp_path, '[[rule]]\ndomain = "example.org"\nroute = { host = "10.0.0.5", port = 25 }\n', "routes.toml")
    path = write(tmp_path, '[router]\ntype = "map"\nfile = "routes.toml"\n' + SUBMISSION + MX)
    service = MailrelayService(load_config(path), reactor=MemoryReactor())
    [router] = service.routers
    assert isinstance(router, FileMapRouter)
    assert router.password_listeners == (("submission", "smtp"),)
    before = router.route_map
    routes.write_text('[[rule]]\ndomain = "example.org"\nroute = { host = "10.0.0.5", port = 25, login = "xclient" }\n')
    router.reload()
    assert router.route_map is before
    # A password hash makes it acceptable.
    routes.write_text(
        f'[[rule]]\ndomain = "example.org"\npassword = "{HASH}"\nroute = {{ host = "10.0.0.5", port = 25, login = "xclient" }}\n'
    )
    router.reload()
    assert router.route_map is not before and router.route_map.rules[0].password == HASH


@pytest.mark.slow
def test_python_m_mailrelay_check_refuses_it(tmp_path: Path) -> None:
    write(tmp_path, '[router]\ntype = "static"\nhost = "127.0.0.1"\nport = 25\nlogin = "xclient"\n' + SUBMISSION)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, "-m", "mailrelay", "check", "mailrelay.toml"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.splitlines() == [
        "mailrelay.toml: configuration is invalid",
        refusal("mailrelay.toml", "router.login", "xclient", "the static router checks none"),
    ]


# -- at run time ----------------------------------------------------------------------


class TrustingRouter(Router):
    """Sends every login to Postfix with XCLIENT, checking no password: what must not work."""

    def __init__(self, port: int = 25) -> None:
        self.port = port

    def route(self, request: RouteRequest) -> Route:
        return Route(host="127.0.0.1", port=self.port, login="xclient")


class CheckingRouter(TrustingRouter):
    """Checks the password itself, and says so."""

    verifies_passwords = True

    def route(self, request: RouteRequest) -> Route:
        if request.password != PASSWORD:
            raise Reject("Authentication credentials invalid")
        return super().route(request)


def test_a_router_that_does_not_declare_it_cannot_answer_a_password_login_with_a_trusting_route() -> None:
    message = router_error(TrustingRouter(), **PLAIN)
    assert message == (
        'TrustingRouter answered a PLAIN login with a login = "xclient" route to 127.0.0.1:25, on which the upstream'
        " checks no password, and does not declare verifies_passwords = True: a router that checks request.password"
        ' itself declares it; otherwise use login = "passthrough" so that the upstream checks the password'
    )
    assert "not the password" not in message
    for method in ("login", "cram-md5", "xoauth2", "oauthbearer"):
        router_error(TrustingRouter(), user=USER, password="x", auth_method=method)
    static = StaticRouter((Route(host="10.0.0.5", port=25), Route(host="10.0.0.6", port=25, login="none")))
    assert 'StaticRouter answered a PLAIN login with a login = "none" route to 10.0.0.6:25' in router_error(static, **PLAIN)


def test_without_a_password_a_trusting_route_is_fine() -> None:
    # MX use (no login), a verified client certificate (EXTERNAL), a splice listener.
    assert ask(TrustingRouter(), auth_method="none", rcpt_to="RCPT TO:<bob@example.test>") == [
        Route(host="127.0.0.1", port=25, login="xclient")
    ]
    assert ask(TrustingRouter(), user="CN=alice", auth_method="external")[0].login == "xclient"
    assert ask(TrustingRouter(), protocol="none", mode="splice")[0].login == "xclient"


def test_a_router_that_declares_it_or_routes_with_passthrough_is_believed() -> None:
    assert ask(CheckingRouter(), user=USER, password=PASSWORD, auth_method="plain")[0].login == "xclient"
    assert ask(StaticRouter((Route(host="10.0.0.5", port=25),)), **PLAIN) == [Route(host="10.0.0.5", port=25)]


def test_a_cache_answers_for_the_router_it_wraps() -> None:
    declared = CachingRouter(CheckingRouter(), 60, 10, Clock())
    assert declared.verifies_passwords
    assert ask(declared, user=USER, password=PASSWORD, auth_method="plain")[0].login == "xclient"
    undeclared = CachingRouter(TrustingRouter(), 60, 10, Clock())
    assert not undeclared.verifies_passwords
    assert router_error(undeclared, **PLAIN).startswith("TrustingRouter answered a PLAIN login")


def sync_verify(hashed: str, password: str) -> Deferred[bool]:
    return succeed(verify_password(hashed, password))


def test_a_map_router_gives_a_trusting_route_to_a_password_login_only_after_checking_the_password() -> None:
    # Built without the configuration's check (as Python could): the router holds the line itself.
    config = parse_config(
        {
            "router": {
                "type": "map",
                "rule": [
                    {"user": USER, "password": HASH, "route": {"host": "10.0.0.5", "port": 25, "login": "xclient"}},
                    {"domain": "example.org", "route": {"host": "10.0.0.6", "port": 25, "login": "xclient"}},
                ],
            },
            "listener": [{"listen": "tcp:0", "mode": "starttls", "protocol": "smtp", "auth": ["none"]}],
        }
    )
    assert config.router is not None and config.router.verifies_passwords
    router = config.router.build(Clock(), verify=sync_verify)
    assert isinstance(router, MapRouter) and router.verifies_passwords
    assert ask(router, user=USER, password=PASSWORD, auth_method="plain")[0].port == 25
    assert ask(router, user=USER, password="wrong", auth_method="plain").check(Reject)  # after the check
    assert router_error(router, user="bob@example.org", password="x", auth_method="plain") == (
        '<config>: rule[1] answers a PLAIN login with a login = "xclient" route but has no password hash:'
        " no one would check the password"
    )
    # MX use: nothing to check.
    assert ask(router, auth_method="none", rcpt_to="RCPT TO:<bob@example.org>")[0].host == "10.0.0.6"


def auth_plain(smtp: smtplib.SMTP, user: str, password: str) -> Any:
    """One AUTH PLAIN: the success reply, or the refusal's (code, text)."""
    smtp.user, smtp.password = user, password
    try:
        return smtp.auth("PLAIN", smtp.auth_plain)
    except smtplib.SMTPAuthenticationError as e:
        return e.smtp_code, e.smtp_error


class RuntimeGuardTests(SMTPTestCase):
    """Through a real listener, with smtplib and the scripted upstream."""

    async def login(self, router: Router) -> tuple[Any, Any]:
        """AUTH PLAIN (one attempt): the reply, and the session's log line."""
        port = await self.proxy(router, mode="tls")

        def client() -> Any:
            with self.smtp(port, "tls") as smtp:
                return auth_plain(smtp, USER, PASSWORD)

        return await self.in_thread(client), await self.session_line()

    async def test_an_undeclared_router_answering_with_xclient_gets_the_client_451_and_the_upstream_hears_nothing(
        self,
    ) -> None:
        upstream = self.upstream(users={})
        reply, line = await self.login(TrustingRouter(upstream.port))
        self.assertEqual(reply, (451, b"4.3.0 Temporary failure, try again later"))
        self.assertEqual(line["outcome"], "router-error")
        self.assertIn("does not declare verifies_passwords = True", line["reason"])
        self.assertEqual(upstream.connections, 0)  # no XCLIENT, no connection at all

    async def test_a_router_that_declares_it_logs_in_with_xclient(self) -> None:
        upstream = self.upstream(users={})
        reply, _ = await self.login(CheckingRouter(upstream.port))
        self.assertEqual(reply, (235, b"2.7.0 Authentication successful"))
        heard = await self.in_thread(upstream.result)
        self.assertTrue(heard.lines[1].startswith(b"XCLIENT ADDR=127.0.0.1 "), heard.lines)
        self.assertIn(b" LOGIN=alice@example.test", heard.lines[1])


# -- against Postfix, which believes XCLIENT LOGIN= ----------------------------------


async def delivers_as_alice(case: PostfixTestCase, port: int) -> None:
    """The right password through mailrelay's SMTPS `port`: Postfix delivers, with
    alice as the authenticated sender."""

    def honest() -> Any:
        with case.smtp_from(port, "tls") as smtp:
            smtp.login(USER, PASSWORD)
            return smtp.sendmail(USER, [BOB], MESSAGE)

    case.assertEqual(await case.in_thread(honest), {})
    [(trace, message)] = await case.next_delivery()
    case.assertEqual(message, lf(MESSAGE))
    case.assertIn(b"(Authenticated sender: alice@example.test)", trace)


@pytest.mark.slow
class PostfixAttackTests(PostfixTestCase):
    def test_the_static_xclient_route_a_wrong_password_would_pass_is_refused_by_check(self) -> None:
        directory = Path(tempfile.mkdtemp(prefix="mailrelay-check-"))
        self.addCleanup(shutil.rmtree, directory, True)
        path = write(
            directory,
            f'[router]\ntype = "static"\nhost = "127.0.0.1"\nport = {self.postfix.port}\nlogin = "xclient"\n' + SUBMISSION,
        )
        with pytest.raises(ConfigError) as caught:
            makeService(str(path), reactor=MemoryReactor())
        [error] = caught.value.errors
        self.assertIn('router.login: "xclient" makes the upstream take mailrelay\'s word', error)
        self.assertEqual(check(str(path)), 1)

    async def test_a_wrong_password_never_becomes_an_authenticated_sender(self) -> None:
        # An undeclared Router that would send everyone to Postfix with XCLIENT LOGIN=.
        port = await self.proxy(TrustingRouter(self.postfix.port), mode="tls")

        def attack() -> Any:
            with self.smtp_from(port, "tls") as smtp:
                smtp.user, smtp.password = "postmaster@example.test", "wrong"
                try:
                    smtp.auth("PLAIN", smtp.auth_plain)
                except smtplib.SMTPAuthenticationError as e:
                    auth = e.smtp_code
                else:
                    auth = 235
                try:
                    smtp.sendmail(USER, [BOB], b"Subject: attack\r\n\r\nsent as postmaster\r\n")
                except smtplib.SMTPException as e:
                    return auth, type(e).__name__
                return auth, "sent"

        auth, sent = await self.in_thread(attack)
        self.assertEqual(auth, 451)
        self.assertNotEqual(sent, "sent")
        line = await self.session_line()
        self.assertEqual(line["outcome"], "router-error")

        # The same route from a Router that checks the password delivers; it is the only delivery.
        port = await self.proxy(CheckingRouter(self.postfix.port), mode="tls")

        await delivers_as_alice(self, port)
        delivered = await self.in_thread(self.postfix.messages, BOB)
        self.assertEqual(len(delivered), self.delivered_before + 1)
        self.assertFalse(any(b"Subject: attack" in m for m in delivered))


@pytest.mark.slow
class AccountGuessingTests(PostfixTestCase):
    """A map router that checks passwords, in front of Postfix with XCLIENT: an attacker
    who tries account names learns nothing from the answers. An unknown user is refused
    with the very reply a known user with a wrong password gets (the map checks the
    guess against a real hash first, so the time is the same too); the right password
    still delivers."""

    async def test_an_unknown_account_and_a_wrong_password_look_the_same(self) -> None:
        config = parse_config(
            {
                "router": {
                    "type": "map",
                    "rule": [
                        {
                            "user": USER,
                            "password": HASH,
                            "reject_wait": 0.05,
                            "route": {"host": "127.0.0.1", "port": self.postfix.port, "login": "xclient"},
                        }
                    ],
                },
                "listener": [{"listen": "tcp:0", "mode": "tls", "protocol": "smtp"}],
            }
        )
        assert config.router is not None
        checked: list[str] = []

        def verify(hashed: str, password: str) -> Deferred[bool]:
            checked.append(password)
            return sync_verify(hashed, password)

        port = await self.proxy(config.router.build(Clock(), verify=verify), mode="tls")

        def try_login(user: str, password: str) -> Any:
            with self.smtp_from(port, "tls") as smtp:
                return auth_plain(smtp, user, password)

        wrong_password = await self.in_thread(try_login, USER, "guess-1")
        wrong_line = await self.session_line()
        unknown_user = await self.in_thread(try_login, "root@example.test", "guess-2")
        unknown_line = await self.session_line()
        self.assertEqual(wrong_password, unknown_user)
        self.assertEqual(wrong_password[0], 535)
        self.assertEqual(checked, ["guess-1", "guess-2"])  # the unknown user's guess was hashed too
        self.assertEqual((wrong_line["outcome"], wrong_line["reason"]), (unknown_line["outcome"], unknown_line["reason"]))
        self.assertNotIn("guess", wrong_line["reason"] + unknown_line["reason"])

        await delivers_as_alice(self, port)
