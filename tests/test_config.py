"""
Configuration: `load_config` / `parse_config` in process, and `python -m mailrelay check`
as a real subprocess (run from a temporary directory, so it uses the installed package).

Every error is one line `file: key.path: reason`; a configuration with several mistakes
reports them all in one run; nothing listens unless the whole configuration is valid.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.internet.testing import MemoryReactor

from mailrelay.config import (
    ENDPOINT_EXAMPLES,
    Config,
    ConfigError,
    ListenerConfig,
    MetricsConfig,
    load_config,
    parse_config,
)
from mailrelay.router import Route, RouteRequest
from mailrelay.service import MailrelayService, makeService
from tests.support.net import closed_port
from tests.support.processes import run_check

WAIT = 60.0  # hang guard for a subprocess, never a timing assertion

ROUTER = """
[router]
type = "static"
host = "127.0.0.1"
port = 2525
"""

LISTENER = """
[[listener]]
name = "relay"
listen = "tcp:0:interface=127.0.0.1"
mode = "splice"
"""

ROUTER_MODULE = '''
"""Routers for the configuration tests (written into a temporary directory)."""
from mailrelay import Route, Router


class EchoRouter(Router):
    """Sends every session to host:port; `password` is a secret option it accepts."""

    def __init__(self, host="127.0.0.1", port=2525, password=None):
        self.routes = [Route(host=host, port=port, password=password)]

    def route(self, request):
        return self.routes


class StrictRouter(Router):
    """Refuses every option it is given."""

    def __init__(self, **options):
        raise ValueError("unsupported options: " + ", ".join(sorted(options)))


class NotARouter:
    """A class without route()."""


NOT_A_CLASS = "just a string"
'''

BROKEN_MODULE = 'raise RuntimeError("boom at import")\n'


# -- helpers -----------------------------------------------------------------------


@pytest.fixture
def modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, str]]:
    """
    (router module, broken module): two freshly named modules in tmp_path, which is
    put on sys.path for the in-process tests (and on PYTHONPATH for `check`).
    """
    suffix = uuid.uuid4().hex[:8]
    good, broken = f"mr_routers_{suffix}", f"mr_broken_{suffix}"
    (tmp_path / f"{good}.py").write_text(ROUTER_MODULE)
    (tmp_path / f"{broken}.py").write_text(BROKEN_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield good, broken
    for name in (good, broken):
        sys.modules.pop(name, None)


def write(tmp_path: Path, text: str, name: str = "mailrelay.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def errors_of(path: Path) -> list[str]:
    """The error lines of loading `path` (which must be invalid)."""
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == "\n".join(caught.value.errors)
    return caught.value.errors


def parse_errors(text: str) -> list[str]:
    """The errors `parse_config` raises for the TOML `text`, named by the source "inline.toml"."""
    import tomllib

    with pytest.raises(ConfigError) as caught:
        parse_config(tomllib.loads(text), "inline.toml")
    return caught.value.errors


def build_errors(config: Config) -> list[str]:
    """The error lines of building the service of a config that parsed."""
    with pytest.raises(ConfigError) as caught:
        MailrelayService(config, reactor=MemoryReactor())
    return caught.value.errors


def check_fails_with(tmp_path: Path, lines: list[str], name: str = "mailrelay.toml") -> str:
    """Run `check` and assert it exits non-zero with exactly `lines` (file relative) on stderr."""
    result = run_check(tmp_path, name)
    assert result.returncode != 0, result
    assert result.stdout == ""
    assert result.stderr.splitlines() == [f"{name}: configuration is invalid", *lines]
    return result.stderr


# -- errors found while reading the file (load_config) -------------------------------

# (id, TOML text, expected errors as "key.path: reason"); each is checked in process
# against load_config and through `python -m mailrelay check`.
CASES = [
    (
        "unknown-key-top-level",
        'colour = "red"\n' + ROUTER + LISTENER,
        ["colour: unknown key"],
    ),
    (
        "unknown-key-router",
        ROUTER + 'colour = "red"\n' + LISTENER,
        ["router.colour: unknown key"],
    ),
    (
        "unknown-key-listener",
        ROUTER + LISTENER + "colour = 1\n",
        ["listener[0].colour: unknown key"],
    ),
    (
        "unknown-key-route-in-routes",
        """
        [router]
        type = "static"
        routes = [
            { host = "127.0.0.1", port = 2525 },
            { host = "127.0.0.1", port = 2526, colour = "red" },
        ]
        """
        + LISTENER,
        ["router.routes[1].colour: unknown key"],
    ),
    (
        "unknown-key-listener-router",
        LISTENER + 'router = { type = "static", host = "127.0.0.1", port = 25, colour = "red" }\n',
        ["listener[0].router.colour: unknown key"],
    ),
    (
        "unknown-key-upstream",
        ROUTER + "[upstream]\nconnect_timeout = 5\ncolour = 1\n" + LISTENER,
        ["upstream.colour: unknown key"],
    ),
    (
        "string-for-seconds",
        'drain_timeout = "30"\n' + ROUTER + LISTENER,
        ["drain_timeout: must be a number of seconds, not a string ('30')"],
    ),
    (
        "string-for-port",
        ROUTER.replace("port = 2525", 'port = "2525"') + LISTENER,
        ["router.port: must be an integer, not a string ('2525')"],
    ),
    (
        "string-for-listener-timeout",
        ROUTER + LISTENER + 'idle_timeout = "long"\n',
        ["listener[0].idle_timeout: must be a number of seconds, not a string ('long')"],
    ),
    (
        "string-for-zero-copy",
        ROUTER + LISTENER + 'zero_copy = "no"\n',
        ["listener[0].zero_copy: must be true or false, not a string ('no')"],
    ),
    (
        "boolean-for-port",
        ROUTER.replace("port = 2525", "port = true") + LISTENER,
        ["router.port: must be an integer, not a boolean (True)"],
    ),
    (
        "boolean-for-seconds",
        "drain_timeout = true\n" + ROUTER + LISTENER,
        ["drain_timeout: must be a number of seconds, not a boolean (True)"],
    ),
    (
        "port-zero",
        ROUTER.replace("port = 2525", "port = 0") + LISTENER,
        ["router.port: must be from 1 to 65535, not 0"],
    ),
    (
        "port-too-big-in-routes",
        """
        [router]
        type = "static"
        routes = [{ host = "127.0.0.1", port = 70000 }]
        """
        + LISTENER,
        ["router.routes[0].port: must be from 1 to 65535, not 70000"],
    ),
    (
        "negative-seconds",
        "drain_timeout = -1\n" + ROUTER + LISTENER,
        ["drain_timeout: must be a positive number of seconds, not -1"],
    ),
    (
        "missing-listen",
        ROUTER + '[[listener]]\nname = "relay"\nmode = "splice"\n',
        ["listener[0].listen: is required"],
    ),
    (
        "missing-host",
        '[router]\ntype = "static"\nport = 25\n' + LISTENER,
        ["router.host: is required"],
    ),
    (
        "no-listener",
        ROUTER,
        ["listener: at least one [[listener]] is required"],
    ),
    (
        "unknown-mode",
        ROUTER + LISTENER.replace('mode = "splice"', 'mode = "bogus"'),
        ['listener[0].mode: must be one of "splice", "tls", "starttls", not "bogus"'],
    ),
    (
        "protocol-with-splice",
        ROUTER + LISTENER + 'protocol = "imap"\n',
        ['listener[0].protocol: mode "splice" reads nothing of the session: "imap" needs mode "tls" or "starttls"'],
    ),
    (
        "mode-starttls-without-protocol",
        ROUTER + LISTENER.replace('mode = "splice"', 'mode = "starttls"'),
        ['listener[0].protocol: mode "starttls" needs a mail protocol (smtp, imap or pop3)'],
    ),
    (
        "front-end-keys-on-a-splice-listener",
        ROUTER + LISTENER + 'auth = ["plain"]\nmax_attempts = 2\n',
        [
            'listener[0].auth: applies only to listeners with a mail protocol (smtp, imap, pop3), not protocol "none"',
            'listener[0].max_attempts: applies only to listeners with a mail protocol (smtp, imap, pop3), not protocol "none"',
        ],
    ),
    (
        "smtp-front-end-values",
        ROUTER
        + LISTENER.replace('mode = "splice"', 'mode = "tls"')
        + 'protocol = "smtp"\nauth = ["plain", "apop"]\nstarttls = "optional"\nvet_recipients = "some"\n'
        + 'hostname = "not a name"\ncapabilities = ["PIPELINING", "AUTH PLAIN"]\nmax_attempts = 0\n',
        [
            'listener[0].starttls: applies only to mode "starttls" listeners, not "tls"',
            "listener[0].max_attempts: must be from 1 to 1000, not 0",
            'listener[0].vet_recipients: must be one of "first", "all", not "some"',
            'listener[0].hostname: "not a name" is not a host name',
            'listener[0].auth: "apop" is not a smtp login method'
            " (one of: plain, login, cram-md5, xoauth2, oauthbearer, external, none)",
            'listener[0].capabilities: "AUTH PLAIN" cannot be listed:'
            " STARTTLS (STLS) and the login methods are advertised from `starttls` and `auth`",
        ],
    ),
    (
        "external-needs-client-certificates",
        ROUTER + LISTENER.replace('mode = "splice"', 'mode = "starttls"') + 'protocol = "smtp"\nauth = ["external"]\n',
        ['listener[0].auth: "external" needs client certificates: set [tls] client_ca'],
    ),
    (
        "protocol-with-splice-smtp",
        ROUTER + LISTENER + 'protocol = "smtp"\n',
        ['listener[0].protocol: mode "splice" reads nothing of the session: "smtp" needs mode "tls" or "starttls"'],
    ),
    (
        "unknown-router-type",
        '[router]\ntype = "carrier-pigeon"\n' + LISTENER,
        ['router.type: must be one of "static", "python", "http", "map", not "carrier-pigeon"'],
    ),
    (
        "top-level-key-written-after-a-table",
        '[router]\ntype = "static"\nhost = "127.0.0.1"\nport = 25\ndrain_timeout = 5\n' + LISTENER,
        ["router.drain_timeout: unknown key (a top-level key must come before the first [table] in TOML)"],
    ),
    (
        "router-type-map-without-rules",
        '[router]\ntype = "map"\n' + LISTENER,
        ["router: needs [[router.rule]] tables or a file of them (file = ...)"],
    ),
    (
        "password-of-the-wrong-type-is-not-echoed",
        '[router]\ntype = "static"\nhost = "127.0.0.1"\nport = 25\npassword = 987654321\n' + LISTENER,
        ["router.password: must be a string, not an integer"],
    ),
    (
        "duplicate-listener-names",
        ROUTER + LISTENER + LISTENER.replace("tcp:0:", "tcp:0:backlog=5:"),
        ['listener[1].name: "relay" is already the name of listener[0]'],
    ),
    (
        "duplicate-default-names",
        # A listener without a name is named by its endpoint string.
        ROUTER + '[[listener]]\nlisten = "tcp:0:interface=127.0.0.1"\nmode = "splice"\n' * 2,
        ['listener[1].name: "tcp:0:interface=127.0.0.1" is already the name of listener[0]'],
    ),
    (
        "listener-not-a-table",
        'listener = ["tcp:25"]\n' + ROUTER,
        ["listener[0]: must be a table, not a string ('tcp:25')"],
    ),
    (
        "several-errors-at-once",
        """
        drain_timeout = "soon"
        colour = "red"

        [router]
        type = "static"
        routes = [
            { host = "127.0.0.1", port = true },
            { host = "", port = 2526, shape = "round" },
        ]

        [[listener]]
        name = "a"
        listen = "tcp:0:interface=127.0.0.1"
        mode = "starttls"

        [[listener]]
        name = "b"
        listen = "tcp:0:interface=127.0.0.1"
        mode = "splice"
        idle_timeout = 0
        extra = 1
        """,
        [
            "drain_timeout: must be a number of seconds, not a string ('soon')",
            "router.routes[0].port: must be an integer, not a boolean (True)",
            "router.routes[1].shape: unknown key",
            "router.routes[1].host: must not be empty",
            'listener[0].protocol: mode "starttls" needs a mail protocol (smtp, imap or pop3)',
            "listener[1].idle_timeout: must be a positive number of seconds, not 0",
            "listener[1].extra: unknown key",
            "colour: unknown key",
        ],
    ),
]


@pytest.mark.parametrize("text, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_load_config_error(tmp_path: Path, text: str, expected: list[str]) -> None:
    path = write(tmp_path, text)
    assert errors_of(path) == [f"{path}: {line}" for line in expected]


@pytest.mark.parametrize("text, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_parse_config_error(text: str, expected: list[str]) -> None:
    """The same errors from already-parsed data, named by the given source."""
    assert parse_errors(textwrap.dedent(text)) == [f"inline.toml: {line}" for line in expected]


@pytest.mark.slow
@pytest.mark.parametrize("text, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_check_error(tmp_path: Path, text: str, expected: list[str]) -> None:
    write(tmp_path, text)
    check_fails_with(tmp_path, [f"mailrelay.toml: {line}" for line in expected])


def test_parse_config_default_source() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"colour": 1, "router": {"type": "static", "host": "h", "port": 1}, "listener": [{"mode": "splice"}]})
    assert caught.value.errors == ["<config>: listener[0].listen: is required", "<config>: colour: unknown key"]


def test_empty_listener_array(tmp_path: Path) -> None:
    """`listener = []` is no listener at all, not a valid configuration that listens nowhere."""
    path = write(tmp_path, "listener = []\n" + ROUTER)
    assert errors_of(path) == [f"{path}: listener: at least one [[listener]] is required"]


# Bad endpoint strings: the reason comes from Twisted's endpoint parser, so only its
# gist is pinned down.


@pytest.mark.parametrize(
    "listen, gist",
    [("tcp:abc", "'abc'"), ("nope:1", "nope"), ("tcp:25:interface=127.0.0.1:bogus=1", "bogus")],
    ids=["tcp-port-not-a-number", "unknown-endpoint-type", "unknown-endpoint-argument"],
)
def test_bad_endpoint(tmp_path: Path, listen: str, gist: str) -> None:
    path = write(tmp_path, ROUTER + LISTENER.replace("tcp:0:interface=127.0.0.1", listen))
    [error] = errors_of(path)
    prefix = f'{path}: listener[0].listen: bad endpoint "{listen}": '
    assert error.startswith(prefix)
    reason = error[len(prefix) :]
    assert gist in reason
    if listen == "nope:1":
        assert "endpoint type" in reason.lower()


@pytest.mark.slow
def test_check_bad_endpoints(tmp_path: Path) -> None:
    write(
        tmp_path,
        ROUTER
        + LISTENER.replace("tcp:0:interface=127.0.0.1", "tcp:abc")
        + LISTENER.replace('"relay"', '"other"').replace("tcp:0:interface=127.0.0.1", "nope:1"),
    )
    result = run_check(tmp_path)
    assert result.returncode != 0
    lines = result.stderr.splitlines()
    assert lines[0] == "mailrelay.toml: configuration is invalid"
    assert len(lines) == 3
    assert lines[1].startswith('mailrelay.toml: listener[0].listen: bad endpoint "tcp:abc": ')
    assert lines[2].startswith('mailrelay.toml: listener[1].listen: bad endpoint "nope:1": ')
    assert "nope" in lines[2].split(": ", 3)[-1]


# -- the file itself ------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    assert errors_of(path) == [f"{path}: no such file"]


def test_unreadable_file(tmp_path: Path) -> None:
    # A directory cannot be read as a file, even by root.
    path = tmp_path / "dir.toml"
    path.mkdir()
    [error] = errors_of(path)
    assert error.startswith(f"{path}: cannot read: ")


def test_invalid_toml(tmp_path: Path) -> None:
    path = write(tmp_path, ROUTER + "[[listener]]\nname = relay\n")
    [error] = errors_of(path)
    assert error.startswith(f"{path}: not valid TOML: ")
    assert "line 7" in error  # tomllib says where


def test_a_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b"# r\xe9sum\xe9\n" + ROUTER.encode())
    assert errors_of(path) == [f"{path}: not valid TOML: not UTF-8 text (byte 3)"]


@pytest.mark.slow
def test_check_missing_file(tmp_path: Path) -> None:
    check_fails_with(tmp_path, ["absent.toml: no such file"], name="absent.toml")


@pytest.mark.slow
def test_check_invalid_toml(tmp_path: Path) -> None:
    write(tmp_path, "a = [\n")
    result = run_check(tmp_path)
    assert result.returncode != 0
    lines = result.stderr.splitlines()
    assert lines[0] == "mailrelay.toml: configuration is invalid"
    assert len(lines) == 2 and lines[1].startswith("mailrelay.toml: not valid TOML: ")


@pytest.mark.slow
def test_check_without_arguments_is_a_usage_error(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "mailrelay"], cwd=tmp_path, capture_output=True, text=True, timeout=WAIT)
    assert result.returncode == 2
    assert "usage:" in result.stderr


# -- python routers -------------------------------------------------------------------


def python_router_config(router_line: str) -> str:
    return LISTENER + f"router = {router_line}\n"


def test_python_router_class_missing(tmp_path: Path, modules: tuple[str, str]) -> None:
    good, _ = modules
    path = write(tmp_path, python_router_config(f'{{ type = "python", class = "{good}:Nope" }}'))
    assert errors_of(path) == [f'{path}: listener[0].router.class: module "{good}" has no "Nope"']


def test_python_router_not_a_class(tmp_path: Path, modules: tuple[str, str]) -> None:
    good, _ = modules
    path = write(tmp_path, python_router_config(f'{{ type = "python", class = "{good}:NOT_A_CLASS" }}'))
    assert errors_of(path) == [f'{path}: listener[0].router.class: "{good}:NOT_A_CLASS" is not a class']


def test_python_router_not_a_router(tmp_path: Path, modules: tuple[str, str]) -> None:
    good, _ = modules
    path = write(tmp_path, python_router_config(f'{{ type = "python", class = "{good}:NotARouter" }}'))
    assert errors_of(path) == [f'{path}: listener[0].router.class: "{good}:NotARouter" is not a Router: it has no route() method']


def test_python_router_module_fails_to_import(tmp_path: Path, modules: tuple[str, str]) -> None:
    _, broken = modules
    path = write(tmp_path, python_router_config(f'{{ type = "python", class = "{broken}:Router" }}'))
    assert errors_of(path) == [
        f'{path}: listener[0].router.class: cannot import module "{broken}": importing it raised'
        f" RuntimeError('boom at import') at {tmp_path / broken}.py:1"
    ]


def test_python_router_module_missing(tmp_path: Path) -> None:
    path = write(tmp_path, python_router_config('{ type = "python", class = "no_such_module_xyz:Router" }'))
    assert errors_of(path) == [
        f'{path}: listener[0].router.class: cannot import module "no_such_module_xyz": no module "no_such_module_xyz"'
        " on mailrelay's Python path (install it into the environment mailrelay runs in, or add the folder holding it"
        " to PYTHONPATH)"
    ]


@pytest.mark.parametrize("spec", ["just_a_module", ":Router", "module:"])
def test_python_router_class_malformed(tmp_path: Path, spec: str) -> None:
    path = write(tmp_path, python_router_config(f'{{ type = "python", class = "{spec}" }}'))
    assert errors_of(path) == [f'{path}: listener[0].router.class: must look like "package.module:Class", not "{spec}"']


def test_python_router_class_required(tmp_path: Path) -> None:
    path = write(tmp_path, python_router_config('{ type = "python", password = "s3cret" }'))
    errors = errors_of(path)
    assert errors == [f"{path}: listener[0].router.class: is required"]


def test_python_router_constructor_rejects_options(tmp_path: Path, modules: tuple[str, str]) -> None:
    """The class loads, so the file parses; building the service (as `check` does) fails."""
    good, _ = modules
    path = write(
        tmp_path,
        python_router_config(f'{{ type = "python", class = "{good}:StrictRouter", colour = "red", password = "s3cret" }}'),
    )
    config = load_config(path)
    errors = build_errors(config)
    assert errors == [
        f"{path}: listener[0].router: {good}:StrictRouter(**['colour', 'password']) failed: "
        "ValueError('unsupported options: colour, password')"
    ]
    assert "s3cret" not in "\n".join(errors)
    with pytest.raises(ConfigError):
        makeService(path, reactor=MemoryReactor())


def test_python_router_unexpected_option(tmp_path: Path, modules: tuple[str, str]) -> None:
    """A default [router] of type python: its constructor's own TypeError is reported."""
    good, _ = modules
    text = f"""
    [router]
    type = "python"
    class = "{good}:EchoRouter"
    host = "127.0.0.1"
    colour = "red"
    """
    path = write(tmp_path, text + LISTENER)
    [error] = build_errors(load_config(path))
    assert error.startswith(f"{path}: router: {good}:EchoRouter(**['colour', 'host']) failed: TypeError(")
    assert "unexpected keyword argument 'colour'" in error


@pytest.mark.slow
def test_check_python_router_errors(tmp_path: Path, modules: tuple[str, str]) -> None:
    good, broken = modules
    text = (
        LISTENER.replace('"relay"', '"a"')
        + f'router = {{ type = "python", class = "{good}:Nope" }}\n'
        + LISTENER.replace('"relay"', '"b"')
        + f'router = {{ type = "python", class = "{good}:NOT_A_CLASS" }}\n'
        + LISTENER.replace('"relay"', '"c"')
        + f'router = {{ type = "python", class = "{broken}:Router" }}\n'
    )
    write(tmp_path, text)
    check_fails_with(
        tmp_path,
        [
            f'mailrelay.toml: listener[0].router.class: module "{good}" has no "Nope"',
            f'mailrelay.toml: listener[1].router.class: "{good}:NOT_A_CLASS" is not a class',
            f'mailrelay.toml: listener[2].router.class: cannot import module "{broken}": importing it raised'
            f" RuntimeError('boom at import') at {tmp_path / broken}.py:1",
        ],
    )


@pytest.mark.slow
def test_check_python_router_constructor_rejects_options(tmp_path: Path, modules: tuple[str, str]) -> None:
    good, _ = modules
    write(
        tmp_path,
        python_router_config(f'{{ type = "python", class = "{good}:StrictRouter", colour = "red", password = "s3cret" }}'),
    )
    stderr = check_fails_with(
        tmp_path,
        [
            f"mailrelay.toml: listener[0].router: {good}:StrictRouter(**['colour', 'password']) failed: "
            "ValueError('unsupported options: colour, password')"
        ],
    )
    assert "s3cret" not in stderr


# -- a listener without a router ------------------------------------------------------


def test_listener_without_router(tmp_path: Path) -> None:
    path = write(tmp_path, LISTENER)
    config = load_config(path)  # the file is well-formed...
    assert config.router is None and config.listeners[0].router is None
    # ...but nothing can route its sessions, so no service is built from it.
    assert build_errors(config) == [
        f'{path}: listener "relay" has no router: add a [router] table, a router to the listener, '
        "or pass router= to makeService()"
    ]


def test_listener_without_router_is_fine_with_router_argument(tmp_path: Path, modules: tuple[str, str]) -> None:
    good, _ = modules
    router = __import__(good).EchoRouter()
    service = makeService(write(tmp_path, LISTENER), router=router, reactor=MemoryReactor())
    assert service.routers == [router]


@pytest.mark.slow
def test_check_listener_without_router(tmp_path: Path) -> None:
    write(tmp_path, LISTENER + LISTENER.replace('"relay"', '"other"'))
    check_fails_with(
        tmp_path,
        [
            f'mailrelay.toml: listener "{name}" has no router: add a [router] table, a router to the listener, '
            "or pass router= to makeService()"
            for name in ("relay", "other")
        ],
    )


# -- nothing listens unless the configuration is valid ---------------------------------


def test_invalid_config_builds_no_listener(tmp_path: Path, modules: tuple[str, str]) -> None:
    """
    The first listener is valid, the second's router cannot be built: makeService
    raises before anything is bound, on a recording reactor and on the real one.
    """
    good, _ = modules
    port = closed_port()
    text = (
        ROUTER
        + LISTENER.replace("tcp:0:", f"tcp:{port}:")
        + LISTENER.replace('"relay"', '"strict"')
        + f'router = {{ type = "python", class = "{good}:StrictRouter", colour = "red" }}\n'
    )
    path = write(tmp_path, text)
    memory = MemoryReactor()
    with pytest.raises(ConfigError):
        makeService(path, reactor=memory)
    assert memory.tcpServers == []
    with pytest.raises(ConfigError):
        makeService(path)  # the global reactor
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), timeout=WAIT):
        pass


def test_valid_config_listens_only_when_started(tmp_path: Path) -> None:
    memory = MemoryReactor()
    service = makeService(write(tmp_path, ROUTER + LISTENER), reactor=memory)
    assert memory.tcpServers == []
    service.privilegedStartService()
    service.startService()
    try:
        [(port, _factory, _backlog, interface)] = memory.tcpServers
        assert (port, interface) == (0, "127.0.0.1")
    finally:
        service.stopService()


# -- valid configurations -------------------------------------------------------------

VALID = """
drain_timeout = 5

[upstream]
connect_timeout = 2.5

[router]
type = "static"
routes = [
    {{ host = "127.0.0.1", port = 2525, user = "relay", password = "s3cret" }},
    {{ host = "::1", port = 2526, tls = "tls", tls_verify = false }},
]

[[listener]]
name = "relay"
listen = "tcp:0:interface=127.0.0.1"
mode = "splice"
idle_timeout = 600

[[listener]]
name = "custom"
listen = "tcp:0:interface=127.0.0.1"
mode = "splice"
router_timeout = 7
zero_copy = false
router = {{ type = "python", class = "{module}:EchoRouter", port = 2527, password = "s3cret" }}

[[listener]]
name = "single"
listen = "tcp:0:interface=127.0.0.1"
mode = "splice"
protocol = "none"
router = {{ type = "static", host = "127.0.0.1", port = 2528, proxy_protocol = 2, password = "s3cret" }}
"""


def test_load_valid_config(tmp_path: Path, modules: tuple[str, str]) -> None:
    good, _ = modules
    path = write(tmp_path, VALID.format(module=good))
    config = load_config(path)
    assert config.source == str(path)
    assert config.drain_timeout == 5.0 and config.upstream.connect_timeout == 2.5
    relay, custom, single = config.listeners
    assert relay == ListenerConfig(
        name="relay", listen="tcp:0:interface=127.0.0.1", mode="splice", protocol="none", router=None, idle_timeout=600.0
    )
    assert (custom.router_timeout, custom.idle_timeout) == (7.0, 3600.0)
    assert config.router is not None and config.router_for(relay) is config.router
    assert config.router.type == "static"
    request = RouteRequest(listener="relay", protocol="none", mode="splice", client=("127.0.0.1", 1), local=("127.0.0.1", 2))
    assert config.router.build().route(request) == [
        Route(host="127.0.0.1", port=2525, user="relay", password="s3cret"),
        Route(host="::1", port=2526, tls="tls", tls_verify=False),
    ]
    assert custom.router is not None and custom.router.type == "python"
    assert config.router_for(custom) is custom.router
    assert custom.router.build().route(request) == [Route(host="127.0.0.1", port=2527, password="s3cret")]
    assert single.router is not None
    assert single.router.build().route(request) == [Route(host="127.0.0.1", port=2528, proxy_protocol=2, password="s3cret")]
    # Descriptions are what `check` shows: never an option's value.
    for spec in (config.router, custom.router, single.router):
        assert "s3cret" not in spec.description
    # Building the service builds every router without listening.
    memory = MemoryReactor()
    service = MailrelayService(config, reactor=memory)
    assert set(service.listeners) == {"relay", "custom", "single"}
    assert memory.tcpServers == []


def test_parse_config_defaults() -> None:
    config = parse_config(
        {"router": {"type": "static", "host": "127.0.0.1", "port": 25}, "listener": [{"listen": "tcp:2525", "mode": "splice"}]}
    )
    assert config.source == "<config>"
    assert config.drain_timeout == 30.0 and config.upstream.connect_timeout == 10.0
    [listener] = config.listeners
    assert (listener.name, listener.protocol, listener.idle_timeout, listener.router_timeout) == (
        "tcp:2525",
        "none",
        3600.0,
        30.0,
    )
    assert listener.zero_copy is True


def test_zero_copy_can_be_turned_off() -> None:
    config = parse_config(
        {
            "router": {"type": "static", "host": "127.0.0.1", "port": 25},
            "listener": [{"listen": "tcp:2525", "mode": "splice", "zero_copy": False}],
        }
    )
    assert config.listeners[0].zero_copy is False


def test_shipped_example_is_valid() -> None:
    example = Path(__file__).resolve().parent.parent / "examples" / "splice.toml"
    config = load_config(example)
    assert [listener.name for listener in config.listeners] == ["relay"]
    assert config.router is not None and config.router.description == "static: 127.0.0.1:25, then 127.0.0.1:2526"


@pytest.mark.slow
def test_check_valid(tmp_path: Path, modules: tuple[str, str]) -> None:
    good, _ = modules
    write(tmp_path, VALID.format(module=good))
    result = run_check(tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    out = result.stdout
    assert "s3cret" not in out  # neither the static route's nor the python router's password
    lines = out.splitlines()
    assert lines[0] == "mailrelay.toml: configuration is valid"
    # The default router, with its fallback after the first route.
    assert "router: static: 127.0.0.1:2525, then [::1]:2526 (tls=tls)" in lines
    # Each listener, followed by its router.
    listener_lines = [i for i, line in enumerate(lines) if line.startswith("listener ")]
    assert len(listener_lines) == 3
    relay, custom, single = (lines[i : i + 2] for i in listener_lines)
    assert relay[0].startswith('listener "relay": tcp:0:interface=127.0.0.1 mode=splice protocol=none')
    assert "idle_timeout=600s" in relay[0]
    assert relay[1].strip() == "router: the default router"
    assert custom[0].startswith('listener "custom": tcp:0:interface=127.0.0.1 mode=splice')
    assert "router_timeout=7s" in custom[0] and custom[0].endswith(" zero_copy=false")
    assert "zero_copy" not in relay[0]  # on by default, not worth a word
    # The python router: its class and the names of its options, never their values.
    assert custom[1].strip() == f"router: python: {good}:EchoRouter with password, port"
    assert single[0].startswith('listener "single": ')
    assert single[1].strip() == "router: static: 127.0.0.1:2528 (proxy_protocol=2)"
    assert (
        "upstream: connect_timeout=2.5s login_timeout=30s, TLS verified against the system trust store; drain_timeout=5s" in lines
    )
    assert "login_limits: window=600s max_per_client=20 max_per_user=10 delay=1s max_delay=30s exempt=none" in lines


@pytest.mark.slow
def test_check_shipped_example(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parent.parent / "examples" / "splice.toml"
    (tmp_path / "splice.toml").write_bytes(example.read_bytes())
    result = run_check(tmp_path, "splice.toml")
    assert result.returncode == 0, result.stderr
    assert 'listener "relay": tcp:2525:interface=127.0.0.1 mode=splice' in result.stdout
    assert "router: static: 127.0.0.1:25, then 127.0.0.1:2526" in result.stdout


def test_shipped_map_example_is_valid() -> None:
    example = Path(__file__).resolve().parent.parent / "examples" / "map.toml"
    config = load_config(example)
    assert config.router is not None and config.router.type == "map"
    assert config.login_limits.max_per_user == 10
    MailrelayService(config, reactor=MemoryReactor())  # reads routes.toml beside it


# -- PROXY protocol listener keys (mailrelay.proxied) -----------------------------------

PROXY_CASES = [
    (
        'trusted_proxies = ["10.0.0.0/8"]\nproxy_timeout = 3\n',
        [
            "listener[0].trusted_proxies: applies only with proxy_protocol = true",
            "listener[0].proxy_timeout: applies only with proxy_protocol = true",
        ],
    ),
    (
        'proxy_protocol = true\ntrusted_proxies = ["10.0.0.1/8"]\n',
        ['listener[0].trusted_proxies: "10.0.0.1/8" has host bits set (the network is 10.0.0.0/8)'],
    ),
    ("proxy_protocol = true\ntrusted_proxies = []\n", ["listener[0].trusted_proxies: must list at least one value"]),
    (
        'proxy_protocol = true\ntrusted_proxies = ["balancer.example"]\n',
        ['listener[0].trusted_proxies: "balancer.example" is not an IP address or network (CIDR)'],
    ),
    ('proxy_protocol = "yes"\n', ["listener[0].proxy_protocol: must be true or false, not a string ('yes')"]),
    ("proxy_protocol = true\nproxy_timeout = 0\n", ["listener[0].proxy_timeout: must be a positive number of seconds, not 0"]),
]


@pytest.mark.parametrize("extra, expected", PROXY_CASES)
def test_proxy_protocol_key_errors(extra: str, expected: list[str]) -> None:
    assert parse_errors(ROUTER + LISTENER + extra) == [f"inline.toml: {line}" for line in expected]


def test_proxy_protocol_keys() -> None:
    import ipaddress
    import tomllib

    default = parse_config(tomllib.loads(ROUTER + LISTENER)).listeners[0]
    assert (default.proxy_protocol, default.proxy_timeout) == (False, 5.0)
    assert default.trusted_proxies == (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
    text = ROUTER + LISTENER + 'proxy_protocol = true\ntrusted_proxies = ["10.0.0.0/8", "2001:db8::5"]\nproxy_timeout = 2.5\n'
    listener = parse_config(tomllib.loads(text)).listeners[0]
    assert (listener.proxy_protocol, listener.proxy_timeout) == (True, 2.5)
    assert listener.trusted_proxies == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::5/128"))
    single = parse_config(tomllib.loads(ROUTER + LISTENER + 'proxy_protocol = true\ntrusted_proxies = "10.1.2.3"\n')).listeners[0]
    assert single.trusted_proxies == (ipaddress.ip_network("10.1.2.3/32"),)


def test_check_shows_the_proxy_protocol_settings(tmp_path: Path) -> None:
    text = ROUTER + LISTENER + 'proxy_protocol = true\ntrusted_proxies = ["10.0.0.0/8", "::1"]\nproxy_timeout = 2.5\n'
    (tmp_path / "mailrelay.toml").write_text(text)
    result = run_check(tmp_path)
    assert result.returncode == 0, result.stderr
    assert "  proxy_protocol: v1 or v2 header first, from 10.0.0.0/8,::1/128 only, within 2.5s\n" in result.stdout


# -- workers, [metrics], [log] (issue 16) -------------------------------------------


def test_workers_metrics_and_log_keys() -> None:
    import os
    import tomllib

    default = parse_config(tomllib.loads(ROUTER + LISTENER))
    assert (default.workers, default.metrics, default.log.sessions) == (1, None, "text")
    text = 'workers = 3\n[metrics]\nlisten = "tcp:9108:interface=127.0.0.1"\n[log]\nsessions = "json"\n' + ROUTER + LISTENER
    config = parse_config(tomllib.loads(text))
    assert (config.workers, config.metrics, config.log.sessions) == (3, MetricsConfig("tcp:9108:interface=127.0.0.1"), "json")
    assert parse_config(tomllib.loads('workers = "auto"\n' + ROUTER + LISTENER)).workers == (os.cpu_count() or 1)


TOP_LEVEL_CASES = [
    ("workers = 0\n", ["workers: must be from 1 to 1024, not 0"]),
    ('workers = "many"\n', ["workers: must be an integer, not a string ('many')"]),
    (
        '[metrics]\nlisten = "bogus:9108"\n',
        [
            "metrics.listen: bad endpoint \"bogus:9108\": Unknown endpoint type: 'bogus'"
            f" (an endpoint looks like {ENDPOINT_EXAMPLES})"
        ],
    ),
    ("[metrics]\n", ["metrics.listen: is required"]),
    ('[metrics]\nlisten = "tcp:9108"\npath = "/m"\n', ["metrics.path: unknown key"]),
    ('[log]\nsessions = "xml"\n', ['log.sessions: must be one of "text", "json", not "xml"']),
]


@pytest.mark.parametrize("top, expected", TOP_LEVEL_CASES)
def test_workers_metrics_and_log_key_errors(top: str, expected: list[str]) -> None:
    assert parse_errors(top + ROUTER + LISTENER) == [f"inline.toml: {line}" for line in expected]
