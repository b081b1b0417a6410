"""
docs/troubleshooting.md shows lines the code writes.

Every line in the document's `log` blocks must be explained by mailrelay's source (see
`tests/support/loglines.py`): a line the code no longer writes fails here. The common
situations are also reproduced for real (a port in use, a bad certificate, a
configuration mistake, an upstream that refuses, a wrong password, the login limit, a
plaintext client on a TLS port, a PROXY header from a stranger), and the line logged
must have the documented line's shape: the same text once addresses, paths, session
ids and numbers are set aside.
"""

from __future__ import annotations

import errno
import imaplib
import re
import shutil
import smtplib
import socket
import ssl
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import argon2
import pytest
from twisted.application.service import Service
from twisted.internet import reactor
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import SynchronousTestCase

from mailrelay.config import ConfigError, load_config
from mailrelay.listening import ExitOnListenFailure, ListenFailed, listen_failed
from mailrelay.service import MailrelayService, makeService
from tests.support.loglines import explained, is_value
from tests.support.net import ProxyTestCase, closed_port, connect, splice_config, tcp_port
from tests.support.pki import PKI
from tests.support.processes import TWISTD, Process, child_env

ROOT = Path(__file__).resolve().parent.parent

DOCUMENT = Path(__file__).resolve().parents[1] / "docs" / "troubleshooting.md"
TWISTD_PREFIX = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[[^\]]*\] ")


def documented() -> list[str]:
    """Every line of the document's `log` blocks, without twistd's timestamp and system."""
    lines: list[str] = []
    inside = False
    for line in DOCUMENT.read_text().splitlines():
        if line.startswith("```"):
            inside = line == "```log" if not inside else False
            continue
        if inside and line.strip():
            lines.append(TWISTD_PREFIX.sub("", line))
    return lines


def shape(line: str) -> str:
    """`line` with what differs between two runs of the same situation set aside."""
    line = TWISTD_PREFIX.sub("", line.strip())
    line = re.sub(r"\S*mailrelay\.toml|<config>", "CONFIG", line)
    line = re.sub(r"\b[0-9a-f]{8}\b", "ID", line)
    line = re.sub(r"/[\w.-]+(/[\w.-]+)*", "PATH", line)
    line = re.sub(r"\d+\.\d+\.\d+\.\d+(:\d+)?", "ADDR", line)
    return re.sub(r"\d+(\.\d+)?", "N", line)


def the_documented(*fragments: str) -> str:
    """The one documented line holding every fragment."""
    found = sorted({line for line in documented() if all(f in line for f in fragments)})
    assert len(found) == 1, (fragments, found)
    return found[0]


def assert_documented(logged: list[str], *fragments: str) -> None:
    """One of the `logged` lines has the shape of the documented line with `fragments`."""
    expected = shape(the_documented(*fragments))
    shapes = [shape(line) for line in logged]
    assert expected in shapes, f"documented:\n  {expected}\nlogged:\n  " + "\n  ".join(shapes)


# -- the document against the source ------------------------------------------------


def test_the_document_has_examples_for_each_situation() -> None:
    text = DOCUMENT.read_text()
    lines = documented()
    assert len(lines) >= 40, len(lines)
    for situation in ("does not start", "configuration is refused", "Certificates", "Clients are refused", "upstream fails"):
        assert situation in text


@pytest.mark.parametrize("line", documented())
def test_every_documented_line_is_one_the_code_writes(line: str) -> None:
    assert explained(line), f"no template in mailrelay/ explains: {line}"


@pytest.mark.parametrize(
    "invented",
    [
        "listener relay: exploded into many pieces",
        "session f25dc0f6: upstream 127.0.0.1:25 failed: connection rejected by the gods",
        "mailrelay.toml: listener[0].idle_timout: unknown key (perhaps you meant something else)",
        "session 9bcd5611: login refused for bob@example.org from 192.0.2.7: wrong password entered (attempt 1 of 3)",
    ],
)
def test_a_line_the_code_does_not_write_is_not_explained(invented: str) -> None:
    assert not explained(invented)


def test_values_are_not_prose() -> None:
    assert is_value("bob@example.org") and is_value("127.0.0.1:25") and is_value("tcp:25:interface=\\:\\:1")
    assert not is_value("connection refused")


# -- starting up ------------------------------------------------------------------------


def _taken_port() -> socket.socket:
    taken = socket.create_server(("127.0.0.1", 0))
    return taken


def test_a_port_in_use_is_one_line_with_the_fix() -> None:
    taken = _taken_port()
    port = taken.getsockname()[1]
    try:
        config = splice_config(("127.0.0.1", 25))
        config["listener"][0].update(name="relay", listen=f"tcp:{port}:interface=127.0.0.1")
        service = ExitOnListenFailure(makeService(config, reactor=reactor))
        with pytest.raises(SystemExit) as exited:
            service.privilegedStartService()
        service.stopService()
    finally:
        taken.close()
    message = str(exited.value.code)
    assert "\n" not in message
    assert_documented([message], "Address already in use", 'listener "relay"')


def test_a_low_port_without_root_is_one_line_with_the_fix() -> None:
    # Permission is the kernel's to refuse, and tests may run as root: the error as Twisted raises it.
    class LowPort(Service):
        def privilegedStartService(self) -> None:
            denied = CannotListenError("", 143, OSError(errno.EACCES, "Permission denied"))
            raise listen_failed('listener "imap" (tcp:143)', denied)

    with pytest.raises(SystemExit) as exited:
        ExitOnListenFailure(LowPort()).privilegedStartService()
    assert_documented([str(exited.value.code)], "cannot listen on port 143: Permission denied")
    # Above 1023 a refusal is not the low-port rule: no advice about root.
    refused = CannotListenError("", 1143, OSError(errno.EACCES, "Permission denied"))
    high = str(ListenFailed('listener "imap" (tcp:1143)', refused))
    assert high == 'listener "imap" (tcp:1143) cannot listen on port 1143: Permission denied'


def _start_on_a_taken_port(tmp_path: Path, start: Callable[[int], tuple[list[Any], dict[str, str]]]) -> None:
    """Run what `start(port)` gives (twistd's command line and environment) with its
    listener on a port another socket holds: it exits 1 with the documented line and no
    traceback."""
    taken = _taken_port()
    command, env = start(taken.getsockname()[1])
    process = Process(command, tmp_path, child_env(**env))
    try:
        status = process.wait()
    finally:
        process.kill()
        taken.close()
    output = process.output
    assert status == 1, output
    assert "Traceback" not in output, output
    [line] = [line for line in output.splitlines() if "cannot start" in line]
    assert_documented([line], "Address already in use", 'listener "relay"')


@pytest.mark.slow
def test_twistd_with_a_port_in_use_exits_with_one_clear_line(tmp_path: Path) -> None:
    config = tmp_path / "mailrelay.toml"

    def start(port: int) -> tuple[list[Any], dict[str, str]]:
        config.write_text(
            '[router]\ntype = "static"\nhost = "127.0.0.1"\nport = 25\n\n'
            f'[[listener]]\nname = "relay"\nlisten = "tcp:{port}:interface=127.0.0.1"\nmode = "splice"\n'
        )
        return [TWISTD, "-n", "--pidfile=", "mailrelay", "--config", config], {}

    _start_on_a_taken_port(tmp_path, start)


@pytest.mark.slow
def test_the_shipped_tac_with_a_port_in_use_exits_with_one_clear_line(tmp_path: Path) -> None:
    def start(port: int) -> tuple[list[Any], dict[str, str]]:
        env = {"MAILRELAY_LISTEN": f"tcp:{port}:interface=127.0.0.1", "MAILRELAY_UPSTREAM": "127.0.0.1:25"}
        return [TWISTD, "-ny", ROOT / "mailrelay.tac", "--pidfile="], env

    _start_on_a_taken_port(tmp_path, start)


# -- configuration and certificates -------------------------------------------------------


def config_errors(text: str, tmp_path: Path) -> list[str]:
    path = tmp_path / "mailrelay.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        MailrelayService(load_config(path), reactor=MemoryReactor())
    return caught.value.errors


ROUTER = '[router]\ntype = "static"\nhost = "127.0.0.1"\nport = 25\n'


def test_configuration_mistakes_are_reported_as_documented(tmp_path: Path) -> None:
    errors = config_errors(
        ROUTER + '[[listener]]\nlisten = "tcp:143"\nmode = "splice"\nidle_timout = 60\n'
        '[[listener]]\nlisten = "tcp:nope"\nmode = "splice"\ndrain_timeout = 30\n',
        tmp_path,
    )
    assert_documented(errors, "did you mean")
    assert_documented(errors, "a top-level key must come before")
    assert_documented(errors, "the port must be a number")


class Certificates(SynchronousTestCase):
    def test_certificate_problems_are_reported_as_documented(self) -> None:
        # Not self.mktemp(): under pytest it makes its folder in the current directory.
        folder = Path(tempfile.mkdtemp(prefix="mailrelay-certs-"))
        self.addCleanup(shutil.rmtree, folder, True)
        pki = PKI(self)
        issued = pki.issue("mail", "mail.example.org")
        other = pki.issue("other", "mail.example.org")
        listener = '[[listener]]\nlisten = "tcp:993"\nmode = "tls"\n'

        def errors(cert: str, key: str) -> list[str]:
            return config_errors(f'[tls]\ncert = "{cert}"\nkey = "{key}"\n' + ROUTER + listener, folder)

        assert_documented(errors(issued.key, issued.key), "mailrelay.toml: tls.cert:", "holds no PEM certificate")
        assert_documented(errors(issued.cert, issued.cert), "holds no usable PEM private key")
        assert_documented(errors(issued.cert, other.key), "does not belong to the certificate")
        assert_documented(errors(str(folder / "nope.pem"), issued.key), "cannot read certificate")


# -- sessions, for real ----------------------------------------------------------------------

PASSWORD_HASH = argon2.PasswordHasher(time_cost=1, memory_cost=1024).hash("right")


def map_router(upstream_port: int) -> dict[str, Any]:
    return {
        "type": "map",
        "rule": [
            {"user": "bob@example.org", "password": PASSWORD_HASH, "route": {"host": "127.0.0.1", "port": upstream_port}},
            {"user": "mallory@example.org", "reject": "account disabled", "reject_wait": 0},
        ],
        "default": {"reject": "no route for this session"},
    }


def login_config(upstream_port: int) -> dict[str, Any]:
    front_end = {"mode": "starttls", "starttls": "optional", "router": map_router(upstream_port)}
    return {
        "login_limits": {"max_per_client": 3, "delay": 0},
        "listener": [
            {"name": "imap", "listen": "tcp:0:interface=127.0.0.1", "protocol": "imap", **front_end},
            {"name": "smtp", "listen": "tcp:0:interface=127.0.0.1", "protocol": "smtp", **front_end},
        ],
    }


def imap_login(port: int, user: str, password: str) -> str:
    client = imaplib.IMAP4("127.0.0.1", port, timeout=30)
    try:
        client.login(user, password)
        return "logged in"
    except imaplib.IMAP4.error as e:
        return str(e)
    finally:
        client.shutdown()


def smtp_login(port: int, user: str, password: str) -> str:
    client = smtplib.SMTP("127.0.0.1", port, timeout=30)
    try:
        client.ehlo()
        client.login(user, password)
        return "logged in"
    except smtplib.SMTPException as e:
        return str(e)
    finally:
        client.close()


def plaintext_to(port: int) -> bytes:
    with connect(port) as conn:
        conn.sendall(b"a1 LOGIN bob secret\r\n")
        try:
            return conn.recv(100)
        except (ConnectionResetError, ssl.SSLError):
            return b""


class SessionLines(ProxyTestCase):
    async def test_an_upstream_that_refuses(self) -> None:
        config = splice_config(("127.0.0.1", closed_port()))
        config["listener"][0]["name"] = "relay"
        _, port = await self.start_proxy(config)
        conn = await self.in_thread(connect, port)
        await self.in_thread(conn.sendall, b"hello")
        await self.session_line()
        conn.close()
        lines = self.logs.lines()
        assert_documented(lines, "session f25dc0f6: upstream", "failed: connection refused")
        assert_documented(lines, "outcome=upstream-unavailable reason='127.0.0.1:25: connection refused'")

    async def test_a_wrong_password_a_reject_and_the_login_limit(self) -> None:
        service, imap = await self.start_proxy(login_config(closed_port()))
        listening = service.listeners["smtp"].port
        assert listening is not None
        smtp = tcp_port(await listening)

        heard = [
            await self.in_thread(imap_login, imap, "bob@example.org", "wrong"),
            await self.in_thread(imap_login, imap, "mallory@example.org", "x"),
            await self.in_thread(smtp_login, smtp, "bob@example.org", "wrong"),
            await self.in_thread(smtp_login, smtp, "bob@example.org", "right"),
        ]
        self.assertIn("invalid credentials", heard[0])
        self.assertIn("account disabled", heard[1])
        # The third failure reaches max_per_client: that session ends throttled, and so
        # does the next one, its login refused unheard.
        self.assertIn("Too many failed logins", heard[2])
        await self.eventually(lambda: any(e["outcome"] == "throttled" for e in self.logs.sessions()), "no throttled session")

        lines = self.logs.lines()
        assert_documented(lines, "login refused for bob@example.org", "invalid credentials")
        assert_documented(lines, "login refused for mallory@example.org", "account disabled")
        assert_documented(lines, "login limit reached")
        assert_documented(lines, "outcome=throttled")

    async def test_a_plaintext_client_on_a_tls_port(self) -> None:
        config = splice_config(("127.0.0.1", closed_port()), mode="tls", protocol="imap")
        config["listener"][0]["name"] = "imaps"
        _, port = await self.start_proxy(config)
        await self.in_thread(plaintext_to, port)
        await self.session_line()
        assert_documented(self.logs.lines(), "outcome=tls-failed", "wrong version number")
        assert_documented(self.logs.lines(), "no [tls] in")

    async def test_a_proxy_header_from_a_stranger(self) -> None:
        config = splice_config(("127.0.0.1", closed_port()), proxy_protocol=True, trusted_proxies=["192.0.2.0/24"])
        config["listener"][0]["name"] = "proxied"
        _, port = await self.start_proxy(config)
        conn = await self.in_thread(connect, port)
        await self.in_thread(conn.sendall, b"PROXY TCP4 203.0.113.9 192.0.2.1 5000 25\r\n")
        await self.eventually(lambda: any("trusted_proxies" in line for line in self.logs.lines()), "no refusal logged")
        conn.close()
        assert_documented(self.logs.lines(), "not in trusted_proxies")
