"""
mailrelay as it is deployed: `twistd` processes running the *installed* package (each
is started in a temporary directory, so the source tree is not importable), real
sockets on loopback, SIGTERM to stop them; and a fresh virtual environment built from
the source tree.

The child processes and what a clean stop is: `tests/support/processes.py`.
"""

from __future__ import annotations

import filecmp
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509
from cryptography.x509.oid import NameOID

from tests.support.net import ThreadedServer, closed_port, connect, exchange, payload, recv_all, sha
from tests.support.processes import LISTENING, TWISTD, WAIT, Process, assert_clean_stop, child_env

pytestmark = pytest.mark.slow

SOURCE = Path(__file__).resolve().parent.parent


@pytest.fixture
def servers() -> Iterator[Callable[[Callable[[socket.socket], Any]], ThreadedServer]]:
    made: list[ThreadedServer] = []

    def make(handle: Callable[[socket.socket], Any]) -> ThreadedServer:
        server = ThreadedServer(handle)
        made.append(server)
        return server

    yield make
    for server in made:
        server.close()


GREETING = b"220 upstream ready\r\n"


def greet_and_echo(conn: socket.socket) -> str:
    """Upstream: greet, then echo every chunk until the client ends; the sha of what came."""
    conn.sendall(GREETING)
    received = bytearray()
    while data := conn.recv(1 << 16):
        received += data
        conn.sendall(data)
    return sha(bytes(received))


def echo(conn: socket.socket) -> bytes:
    """Upstream: echo every chunk until the client ends; everything that came."""
    received = bytearray()
    while data := conn.recv(1 << 16):
        received += data
        conn.sendall(data)
    return bytes(received)


def recv_exactly(conn: socket.socket, size: int) -> bytes:
    parts = bytearray()
    while len(parts) < size:
        data = conn.recv(size - len(parts))
        if not data:
            raise AssertionError(f"connection closed after {len(parts)} of {size} bytes: {bytes(parts)!r}")
        parts += data
    return bytes(parts)


def splice_toml(upstream_port: int, **top: float) -> str:
    lines = [f"{key} = {value}" for key, value in top.items()]
    lines += [
        "[router]",
        'type = "static"',
        f'routes = [{{ host = "127.0.0.1", port = {upstream_port} }}]',
        "[[listener]]",
        'name = "relay"',
        'listen = "tcp:0:interface=127.0.0.1"',
        'mode = "splice"',
    ]
    return "\n".join(lines) + "\n"


def start_mailrelay(spawn: Callable[..., Process], tmp_path: Path, toml: str) -> tuple[Process, int]:
    (tmp_path / "mailrelay.toml").write_text(toml)
    process = spawn(TWISTD, "-n", "--pidfile=", "mailrelay", "--config", "mailrelay.toml")
    port = int(process.wait_for(LISTENING.format(name="relay")).group(1))
    return process, port


def session_line(output: str, outcome: str) -> re.Match[str]:
    match = re.search(
        r"session [0-9a-f]+ listener=relay client=127\.0\.0\.1:\d+ user=- upstream=(?P<upstream>\S+)"
        r" up=(?P<up>\d+) down=(?P<down>\d+) duration=\S+s outcome=" + re.escape(outcome),
        output,
    )
    assert match, f"no session line with outcome={outcome}:\n{output}"
    return match


# -- the installed package ------------------------------------------------------------


def test_children_import_the_installed_package(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", "import mailrelay; print(mailrelay.__file__)"],
        cwd=tmp_path,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    assert result.returncode == 0, result.stderr
    location = Path(result.stdout.strip()).resolve()
    site_packages = Path(sysconfig.get_paths()["purelib"]).resolve()
    assert location.is_relative_to(site_packages), location
    assert "site-packages" in location.parts
    assert not location.is_relative_to(SOURCE / "mailrelay")


def test_installed_copy_matches_the_source() -> None:
    """Otherwise these tests exercise stale code: `pip install .` after changing mailrelay/."""
    site_packages = Path(sysconfig.get_paths()["purelib"])
    sources = sorted((SOURCE / "mailrelay").rglob("*.py")) + [SOURCE / "twisted" / "plugins" / "mailrelay_plugin.py"]
    stale = [
        str(path.relative_to(SOURCE))
        for path in sources
        if not filecmp.cmp(path, site_packages / path.relative_to(SOURCE), shallow=False)
    ]
    assert not stale, f"installed copy differs from the source (run `.venv/bin/pip install .`): {stale}"


# -- a. twistd mailrelay --config -----------------------------------------------------


def test_twistd_splices_and_stops_on_sigterm(tmp_path: Path, spawn: Any, servers: Any) -> None:
    upstream = servers(greet_and_echo)
    process, port = start_mailrelay(spawn, tmp_path, splice_toml(upstream.port))
    data = payload(1 << 20)  # 1 MiB of random bytes, binary and all
    assert exchange(port, data) == GREETING + data  # client -> upstream -> client
    assert upstream.result() == sha(data)  # what the upstream received
    process.wait_for(r"outcome=closed")
    process.signal(signal.SIGTERM)
    output = assert_clean_stop(process)
    line = session_line(output, "closed")
    assert line["upstream"] == f"127.0.0.1:{upstream.port}"
    assert (int(line["up"]), int(line["down"])) == (len(data), len(GREETING) + len(data))


def test_the_mailrelay_reactor_splices_and_stops(tmp_path: Path, spawn: Any, servers: Any) -> None:
    """`twistd --reactor mailrelay`: epoll without a logging context per event."""
    upstream = servers(greet_and_echo)
    (tmp_path / "mailrelay.toml").write_text(splice_toml(upstream.port))
    process = spawn(TWISTD, "--reactor", "mailrelay", "-n", "--pidfile=", "mailrelay", "--config", "mailrelay.toml")
    process.wait_for(r"reactor class: mailrelay\.reactor\.LeanEPollReactor")
    port = int(process.wait_for(LISTENING.format(name="relay")).group(1))
    data = payload(1 << 20)
    assert exchange(port, data) == GREETING + data
    assert upstream.result() == sha(data)
    process.wait_for(r"outcome=closed")
    process.signal(signal.SIGTERM)
    session_line(assert_clean_stop(process), "closed")


def test_sighup_reloads_instead_of_killing(tmp_path: Path, spawn: Any, servers: Any) -> None:
    upstream = servers(echo)
    process, port = start_mailrelay(spawn, tmp_path, splice_toml(upstream.port))
    with connect(port) as client:
        client.sendall(b"before SIGHUP\r\n")
        assert recv_exactly(client, 15) == b"before SIGHUP\r\n"
        process.signal(signal.SIGHUP)
        process.wait_for(r"reload requested: 1 component\(s\) to reload")  # upstream TLS trust
        client.sendall(b"after SIGHUP\r\n")  # the running session is untouched
        assert recv_exactly(client, 14) == b"after SIGHUP\r\n"
    assert process.popen.poll() is None
    process.signal(signal.SIGTERM)
    assert_clean_stop(process)


def test_sighup_reloads_certificates_without_touching_open_sessions(tmp_path: Path, spawn: Any, servers: Any) -> None:
    ca = trustme.CA()
    ca.issue_cert("mail.test", common_name="first").private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "mail.pem"))
    upstream = servers(echo)
    toml = splice_toml(upstream.port).replace('mode = "splice"', 'mode = "tls"')
    process, port = start_mailrelay(spawn, tmp_path, '[tls]\ncert = "mail.pem"\n' + toml)
    context = ssl.create_default_context()
    ca.configure_trust(context)

    def common_name_seen() -> str:
        with context.wrap_socket(connect(port), server_hostname="mail.test") as client:
            der = client.getpeercert(binary_form=True)
            assert der is not None
            name = x509.load_der_x509_certificate(der).subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
            assert isinstance(name, str)
            return name

    assert common_name_seen() == "first"
    with context.wrap_socket(connect(port), server_hostname="mail.test") as session:
        session.sendall(b"before SIGHUP\r\n")
        assert recv_exactly(session, 15) == b"before SIGHUP\r\n"
        ca.issue_cert("mail.test", common_name="second").private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "mail.pem"))
        process.signal(signal.SIGHUP)
        process.wait_for(r"TLS reloaded: certificate mail\.test")
        session.sendall(b"after SIGHUP\r\n")  # the open session keeps its TLS connection
        assert recv_exactly(session, 14) == b"after SIGHUP\r\n"
        assert common_name_seen() == "second"

        (tmp_path / "mail.pem").write_text("half-written file\n")
        process.signal(signal.SIGHUP)
        process.wait_for(
            r"TLS reload failed, keeping the previous certificates: tls\.cert: \S+mail\.pem holds no PEM certificate"
        )
        assert common_name_seen() == "second"
        session.sendall(b"still here\r\n")
        assert recv_exactly(session, 12) == b"still here\r\n"
    process.signal(signal.SIGTERM)
    assert_clean_stop(process)


def test_a_route_map_file_change_applies_without_a_restart(tmp_path: Path, spawn: Any, servers: Any) -> None:
    def greets(name: bytes) -> Callable[[socket.socket], None]:
        return lambda conn: conn.sendall(b"220 " + name + b"\r\n")

    first, second, third = servers(greets(b"first")), servers(greets(b"second")), servers(greets(b"third"))
    routes = tmp_path / "routes.toml"

    def route_everyone_to(upstream: ThreadedServer) -> None:
        # Written beside, then renamed over: a check never sees half a file.
        (tmp_path / "routes.new").write_text(f'[default]\nhost = "127.0.0.1"\nport = {upstream.port}\n')
        os.replace(tmp_path / "routes.new", routes)

    def greeting() -> bytes:
        with connect(port) as client:
            return recv_all(client)  # the upstream greets, then closes

    route_everyone_to(first)
    toml = splice_toml(1).replace('routes = [{ host = "127.0.0.1", port = 1 }]', 'file = "routes.toml"\ncheck_interval = 0.2')
    toml = toml.replace('type = "static"', 'type = "map"')
    process, port = start_mailrelay(spawn, tmp_path, toml)
    assert greeting() == b"220 first\r\n"

    route_everyone_to(second)  # noticed by the periodic check
    process.wait_for(r"route map \S+routes\.toml reloaded: 0 rules")
    assert greeting() == b"220 second\r\n"

    (tmp_path / "routes.toml").write_text("[default\n")  # broken: the previous map stays
    process.wait_for(r"route map \S+routes\.toml not reloaded, keeping the previous 0 rule\(s\)")
    assert greeting() == b"220 second\r\n"

    route_everyone_to(third)
    process.signal(signal.SIGHUP)
    process.wait_for(r"reload requested: 2 component\(s\) to reload")  # upstream trust, the map
    process.wait_for(r"route map \S+routes\.toml reloaded: 0 rules", count=2)
    assert greeting() == b"220 third\r\n"
    process.signal(signal.SIGTERM)
    assert_clean_stop(process)


# -- b. draining on SIGTERM -------------------------------------------------------------


def test_sigterm_drains_open_session(tmp_path: Path, spawn: Any, servers: Any) -> None:
    upstream = servers(echo)
    process, port = start_mailrelay(spawn, tmp_path, splice_toml(upstream.port, drain_timeout=600))
    with connect(port) as client:
        client.sendall(b"before SIGTERM\r\n")
        assert recv_exactly(client, 16) == b"before SIGTERM\r\n"

        process.signal(signal.SIGTERM)
        process.wait_for(r"draining 1 session\(s\) for up to 600s")
        # Not accepting any more...
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=WAIT).close()
        # ...but the open session still works both ways.
        for i in range(3):
            line = b"after SIGTERM %d\r\n" % i
            client.sendall(line)
            assert recv_exactly(client, len(line)) == line
        assert process.popen.poll() is None
        client.shutdown(socket.SHUT_WR)
        assert client.recv(1) == b""  # the upstream ended after our end of stream
    output = assert_clean_stop(process)
    assert upstream.result() == b"before SIGTERM\r\n" + b"".join(b"after SIGTERM %d\r\n" % i for i in range(3))
    assert upstream.connections == 1
    summary = session_line(output, "closed")
    assert int(summary["up"]) == int(summary["down"]) == 16 + 3 * 17
    assert "drain-timeout" not in output


def test_drain_timeout_ends_the_process(tmp_path: Path, spawn: Any, servers: Any) -> None:
    upstream = servers(echo)
    process, port = start_mailrelay(spawn, tmp_path, splice_toml(upstream.port, drain_timeout=1))
    with connect(port) as client:
        client.sendall(b"hello\r\n")
        assert recv_exactly(client, 7) == b"hello\r\n"
        process.signal(signal.SIGTERM)
        # The client keeps the session open; the drain timeout ends it, then the process.
        output = assert_clean_stop(process)
        session_line(output, "drain-timeout")
        try:
            assert client.recv(1) == b""
        except ConnectionResetError:
            pass  # aborted: a reset is as good as an end of stream here
    assert "outcome=closed" not in output


# -- c. the shipped .tac file -----------------------------------------------------------


def start_tac(spawn: Callable[..., Process], upstream: str, fallback: str | None = None) -> tuple[Process, int]:
    env = {"MAILRELAY_LISTEN": "tcp:0:interface=127.0.0.1", "MAILRELAY_UPSTREAM": upstream}
    if fallback is not None:
        env["MAILRELAY_FALLBACK"] = fallback
    process = spawn(TWISTD, "-ny", SOURCE / "mailrelay.tac", "--pidfile=", **env)
    port = int(process.wait_for(LISTENING.format(name="relay")).group(1))
    return process, port


def test_tac_serves_and_stops(spawn: Any, servers: Any) -> None:
    upstream = servers(greet_and_echo)
    process, port = start_tac(spawn, f"127.0.0.1:{upstream.port}")
    data = payload(256 * 1024, seed=7)
    assert exchange(port, data) == GREETING + data
    assert upstream.result() == sha(data)
    process.wait_for(r"outcome=closed")
    process.signal(signal.SIGTERM)
    output = assert_clean_stop(process)
    assert session_line(output, "closed")["upstream"] == f"127.0.0.1:{upstream.port}"


def test_tac_uses_fallback_when_upstream_is_down(spawn: Any, servers: Any) -> None:
    fallback = servers(greet_and_echo)
    down = closed_port()
    process, port = start_tac(spawn, f"127.0.0.1:{down}", f"127.0.0.1:{fallback.port}")
    data = b"EHLO client.example\r\n" * 100
    assert exchange(port, data) == GREETING + data
    assert fallback.result() == sha(data)
    assert fallback.connections == 1
    process.wait_for(r"outcome=closed")
    process.signal(signal.SIGTERM)
    output = assert_clean_stop(process)
    assert session_line(output, "closed")["upstream"] == f"127.0.0.1:{fallback.port}"


# -- d. an invalid configuration --------------------------------------------------------


def run_twistd_config(tmp_path: Path, toml: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "bad.toml").write_text(toml)
    return subprocess.run(
        [str(TWISTD), "-n", "--pidfile=", "mailrelay", "--config", "bad.toml"],
        cwd=tmp_path,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=WAIT,  # a hang guard: it must exit on its own
    )


def test_twistd_refuses_invalid_config(tmp_path: Path) -> None:
    port = closed_port()
    toml = splice_toml(25).replace("tcp:0:", f"tcp:{port}:") + "colour = 1\n"
    result = run_twistd_config(tmp_path, toml)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "bad.toml: listener[0].colour: unknown key" in output
    assert "Traceback" not in output
    # The problems alone, not twistd's usage text above them.
    assert result.stderr.startswith("mailrelay cannot start: invalid configuration, 1 problem:\n"), result.stderr
    assert "--reactor" not in output
    assert "Server Shut Down" not in output and "starting up" not in output  # never started


def test_twistd_refuses_config_without_router(tmp_path: Path) -> None:
    """An error found when building the service (not when reading the file) stops it too."""
    toml = splice_toml(25).split("[[listener]]")[1]
    result = run_twistd_config(tmp_path, "[[listener]]" + toml)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert 'bad.toml: listener "relay" has no router' in output
    assert "Traceback" not in output
    assert "listener relay on" not in output


# -- e. a fresh virtual environment -----------------------------------------------------


def test_fresh_virtualenv(tmp_path: Path) -> None:
    venv = tmp_path / "venv"

    def run(*args: str | os.PathLike[str], timeout: float = WAIT) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(a) for a in args], cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=timeout
        )
        assert result.returncode == 0, f"{args}: exit status {result.returncode}\n{result.stdout}{result.stderr}"
        return result

    # The interpreter running the tests is one mailrelay supports (a bare python3 may be older).
    run(sys.executable, "-m", "venv", venv, timeout=300)
    run(venv / "bin" / "pip", "install", "--disable-pip-version-check", SOURCE, timeout=600)  # from PyPI: minutes at most

    assert "--config" in run(venv / "bin" / "twistd", "mailrelay", "--help").stdout
    plugins = run(venv / "bin" / "twistd", "--help").stdout
    assert re.search(r"^\s+mailrelay\s", plugins, re.MULTILINE), plugins
    where = run(venv / "bin" / "python", "-c", "import mailrelay; print(mailrelay.__file__)").stdout
    assert Path(where.strip()).is_relative_to(venv), where
