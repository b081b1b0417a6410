"""
The fleet as `examples/` ships it, run for real: Debian's HAProxy (`examples/haproxy.cfg`
behind Debian's defaults) sending PROXY v2 to two mailrelay processes, each started from
`examples/mailrelay.service` and `examples/mailrelay.socket` the way systemd's socket
activation starts it, each running `examples/fleet.toml`, counting failed logins in a
real Redis, in front of a real Dovecot. Only addresses, ports and certificate paths are
changed, to loopback ones and the test's.

Clients connect from 127.0.0.2, HAProxy and mailrelay from 127.0.0.1: Dovecot's log can
only say rip=127.0.0.2 if the address went client -> HAProxy (PROXY v2) -> mailrelay
(IMAP ID) -> Dovecot. The attacks beside: a PROXY header from a peer that is not a
trusted proxy, one a client sends through HAProxy, and a guesser spread over the relays.
The unit files are also checked on their own (`systemd-analyze` when installed), and
run alone: ExecStart with the socket unit's sockets, ExecReload, the stop.

The twistd processes run the installed package: `.venv/bin/pip install .` after
changing mailrelay/.
"""

from __future__ import annotations

import contextlib
import imaplib
import os
import re
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trustme

from mailrelay.workers import KILL_MARGIN
from tests.support.dovecot import Dovecot
from tests.support.haproxy import HAProxy
from tests.support.net import read_line
from tests.support.processes import LISTENING, TWISTD, WAIT, Process, assert_clean_stop, child_env
from tests.support.redis import RedisServer
from tests.support.systemd import ACTIVATE, SOCKET_LINE, exec_command, loopback_stream, read_unit, systemd_analyze, timespan

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CLIENT = "127.0.0.2"
"""Where every client connects from; HAProxy and mailrelay connect from 127.0.0.1."""
HOSTNAME = "mail.example.org"
PASSWORD = "fleet-secret"
USERS = {f"{name}@example.test": PASSWORD for name in ("rr", "activated", "forged", "smuggled")}
FORGED = "10.9.9.9"
"""The address an attacker claims; Dovecot must never hear of it."""


# -- PROXY headers, built here by hand (not by mailrelay's own builder) -------------------

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def proxy_v2(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """A PROXY v2 PROXY command for a TCP over IPv4 connection."""
    body = socket.inet_aton(source[0]) + socket.inet_aton(destination[0]) + struct.pack("!HH", source[1], destination[1])
    return V2_SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", len(body)) + body


def proxy_v1(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    return f"PROXY TCP4 {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n".encode()


# -- clients --------------------------------------------------------------------------------


class IMAPFrom(imaplib.IMAP4):
    """imaplib connecting from `source` to 127.0.0.1, sending `header` (a PROXY header)
    before anything; its host is HOSTNAME, the name STARTTLS verifies."""

    def __init__(self, port: int, *, source: str = CLIENT, header: bytes = b"") -> None:
        self.source, self.header = source, header
        super().__init__(HOSTNAME, port, timeout=WAIT)

    def _create_socket(self, timeout: Any) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout, source_address=(self.source, 0))
        sock.sendall(self.header)
        return sock


class IMAPSFrom(imaplib.IMAP4_SSL):
    def __init__(self, port: int, context: ssl.SSLContext, *, source: str = CLIENT, header: bytes = b"") -> None:
        self.source, self.header = source, header
        super().__init__(HOSTNAME, port, ssl_context=context, timeout=WAIT)

    def _create_socket(self, timeout: Any) -> Any:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout, source_address=(self.source, 0))
        sock.sendall(self.header)
        return self.ssl_context.wrap_socket(sock, server_hostname=HOSTNAME)


def log_in_and_out(imap: imaplib.IMAP4, user: str, context: ssl.SSLContext | None = None) -> None:
    """STARTTLS when given a context (the imap listener requires it), LOGIN, SELECT, LOGOUT."""
    if context is not None:
        imap.starttls(context)
    imap.login(user, PASSWORD)
    assert imap.select("INBOX")[0] == "OK"
    imap.logout()


# -- the examples, moved to loopback ----------------------------------------------------------


def replace_once(text: str, old: str, new: str) -> str:
    """`text` with `old` replaced; the example must hold it exactly once (else the test
    would quietly run something else than what ships)."""
    assert text.count(old) == 1, f"{old!r} appears {text.count(old)} times"
    return text.replace(old, new)


def fleet_toml(dovecot_port: int, redis_url: str, trusted: str = "127.0.0.1/32") -> str:
    """examples/fleet.toml with the test's certificate, Dovecot, Redis and trusted proxy."""
    text = (EXAMPLES / "fleet.toml").read_text()
    text = replace_once(text, 'url = "redis://10.0.1.5:6379/0"', f'url = "{redis_url}"')
    # "auto" is a process per core: two, whatever the machine, so that every run is alike.
    text = replace_once(text, 'workers = "auto"', "workers = 2")
    text = replace_once(text, "/etc/mailrelay/mail.example.org/fullchain.pem", "fullchain.pem")
    text = replace_once(text, "/etc/mailrelay/mail.example.org/privkey.pem", "privkey.pem")
    text = replace_once(text, 'host = "imap.internal.example.org"\nport = 143\n', f'host = "127.0.0.1"\nport = {dovecot_port}\n')
    trusted_lines = re.findall(r"trusted_proxies = \[[^\]]*\]", text)
    assert len(trusted_lines) == 2, trusted_lines
    return re.sub(r"trusted_proxies = \[[^\]]*\]", f'trusted_proxies = ["{trusted}"]', text)


SERVICE = read_unit((EXAMPLES / "mailrelay.service").read_text())
SOCKET = read_unit((EXAMPLES / "mailrelay.socket").read_text())


def activated_command(config: str) -> list[str]:
    """mailrelay.service's ExecStart with this venv's twistd and `config`, run by
    ACTIVATE with mailrelay.socket's sockets (on loopback, free ports)."""
    command = exec_command(SERVICE.value("Service", "ExecStart"))
    assert Path(command[0]).name == "twistd", command
    assert command[command.index("--config") + 1] == "/etc/mailrelay/fleet.toml", command
    command[0] = str(TWISTD)
    command[command.index("--config") + 1] = config
    streams = [loopback_stream(listen) for listen in SOCKET.values("Socket", "ListenStream")]
    names = ":".join(SOCKET.values("Socket", "FileDescriptorName") or ["mailrelay.socket"] * len(streams))
    backlog = (SOCKET.values("Socket", "Backlog") or ["4096"])[0]
    return [sys.executable, "-c", ACTIVATE, backlog, names, *streams, "--", *command]


def service_environment() -> dict[str, str]:
    """The unit's Environment= settings. (User= and the hardening need systemd itself:
    systemd-analyze checks those lines.)"""
    env = {}
    for setting in SERVICE.values("Service", "Environment"):
        for pair in exec_command(setting):
            key, value = pair.split("=", 1)
            env[key] = value
    return env


@attrs.define
class Relay:
    """One mailrelay started as systemd would; its listeners' ports by name."""

    process: Process
    ports: dict[str, int]

    def output(self) -> str:
        return self.process.output


def start_relay(directory: Path, config: str) -> Relay:
    process = Process(activated_command(config), directory, child_env(**service_environment()))
    try:
        sockets = [int(process.wait_for(SOCKET_LINE.format(index=i)).group(1)) for i in range(2)]
        ports = {name: int(process.wait_for(LISTENING.format(name=name)).group(1)) for name in ("imap", "imaps")}
    except BaseException:
        process.kill()
        raise
    # The listeners adopted systemd's sockets, in mailrelay.socket's order.
    assert [ports["imap"], ports["imaps"]] == sockets, process.output
    return Relay(process, ports)


def stop_relay(relay: Relay) -> str:
    """Stop as `systemctl stop` does: KillSignal, then at most TimeoutStopSec."""
    relay.process.signal(signal.Signals[SERVICE.value("Service", "KillSignal")])
    relay.process.wait(timespan(SERVICE.value("Service", "TimeoutStopSec")))
    return assert_clean_stop(relay.process)


# -- what the tests share: a Dovecot, a Redis, the relay's certificate -------------------------


@attrs.define
class Site:
    directory: Path
    dovecot: Dovecot
    redis: RedisServer
    context: ssl.SSLContext
    """Trusts mailrelay's certificate."""


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    # Open to other users: Dovecot's mail processes (nobody) go through it.
    directory = Path(tempfile.mkdtemp(prefix="mailrelay-fleet-"))
    os.chmod(directory, 0o755)
    # Dovecot names its instance (and its processes' titles) after its folder's name: a
    # name no other test's Dovecot has, so that stopping one never touches the other.
    (directory / directory.name).mkdir()
    # Dovecot trusts loopback: it takes the client's address from mailrelay's IMAP ID,
    # and without one logs mailrelay's own (127.0.0.1).
    dovecot = Dovecot(str(directory / directory.name), users=USERS, trusted_networks="127.0.0.0/8")
    ca = trustme.CA()
    leaf = ca.issue_cert(HOSTNAME)
    leaf.private_key_pem.write_to_path(str(directory / "privkey.pem"))
    for blob in leaf.cert_chain_pems:
        blob.write_to_path(str(directory / "fullchain.pem"), append=True)
    context = ssl.create_default_context()
    ca.configure_trust(context)
    redis = RedisServer()
    try:
        dovecot.start()
        redis.start()
        (directory / "fleet.toml").write_text(fleet_toml(dovecot.imap_port, redis.url))
        yield Site(directory, dovecot, redis, context)
    finally:
        redis.cleanup()
        dovecot.stop()
        shutil.rmtree(directory, ignore_errors=True)


@attrs.define
class Fleet:
    relays: list[Relay]
    haproxy: HAProxy

    def explained(self, site: Site) -> contextlib.AbstractContextManager[None]:
        """A failure inside comes with what HAProxy, each relay and Dovecot logged."""
        logs = {"HAProxy": self.haproxy.output} | {f"mr{i + 1}": relay.output for i, relay in enumerate(self.relays)}
        return explained(site, **logs)


@contextlib.contextmanager
def explained(site: Site, **logs: Callable[[], str]) -> Iterator[None]:
    """A failure inside comes with the logs named (and Dovecot's)."""
    try:
        yield
    except Exception as error:
        texts = [f"--- {name}:\n{log()}" for name, log in logs.items()] + [f"--- Dovecot:\n{site.dovecot.log_text()}"]
        raise AssertionError(f"{error!r}\n" + "\n".join(texts)) from error


@pytest.fixture(scope="module")
def fleet(site: Site) -> Iterator[Fleet]:
    """HAProxy -> two mailrelay processes -> Dovecot, all running."""
    relays: list[Relay] = []
    haproxy = None
    try:
        for _ in range(2):
            relays.append(start_relay(site.directory, "fleet.toml"))  # one by one: a failed start leaves none behind
        servers = {
            backend: {f"mr{i + 1}": relay.ports[listener] for i, relay in enumerate(relays)}
            for backend, listener in (("mailrelay_imap", "imap"), ("mailrelay_imaps", "imaps"))
        }
        haproxy = HAProxy(site.directory, (EXAMPLES / "haproxy.cfg").read_text(), servers)
        haproxy.start()
        yield Fleet(relays, haproxy)
        haproxy.stop()
        for relay in relays:
            output = stop_relay(relay)
            assert "Traceback" not in output, output
    finally:
        if haproxy is not None:
            haproxy.stop()
        for relay in relays:
            relay.process.kill()


def session_lines(relay: Relay, user: str) -> list[str]:
    return re.findall(rf"session \S+ listener=\S+ client=\S+ user={re.escape(user)} .*", relay.process.output)


def dovecot_logins(site: Site, user: str, count: int) -> list[str]:
    return site.dovecot.wait_for_log(f"Login: user=<{user}>", count=count)


# -- the fleet --------------------------------------------------------------------------------


def test_haproxy_balances_logins_over_two_relays_and_dovecot_sees_the_client(site: Site, fleet: Fleet) -> None:
    with fleet.explained(site):
        user = "rr@example.test"
        # Two logins on each frontend: round-robin gives each relay one of each.
        for _ in range(2):
            log_in_and_out(IMAPFrom(fleet.haproxy.ports["imap"]), user, site.context)
        for _ in range(2):
            log_in_and_out(IMAPSFrom(fleet.haproxy.ports["imaps"], site.context), user)

        logins = dovecot_logins(site, user, 4)
        assert len(logins) == 4 and all(f"rip={CLIENT}," in line for line in logins), logins
        for relay in fleet.relays:
            for listener in ("imap", "imaps"):
                line = (
                    rf"session \S+ listener={listener} client=127\.0\.0\.2:\d+ user={re.escape(user)} upstream=127\.0\.0\.1:\d+ "
                )
                relay.process.wait_for(line)
            lines = session_lines(relay, user)
            assert len(lines) == 2, lines  # one per listener, no more
        # HAProxy's own log says the same: each server of each backend had a connection from the client.
        for backend in ("mailrelay_imap", "mailrelay_imaps"):
            for server in ("mr1", "mr2"):
                fleet.haproxy.wait_for(rf"(?m)^127\.0\.0\.2:\d+ \[.*\] \S+ {backend}/{server} ")


def test_haproxy_health_checks_pass(site: Site, fleet: Fleet) -> None:
    """The example's checks (an IMAP greeting and LOGOUT, in plaintext on 143 and through
    TLS on 993, after a PROXY v2 LOCAL header) pass against mailrelay, which serves them
    as connections of HAProxy's own: every server is up, by checks that ran."""
    with fleet.explained(site):
        states = fleet.haproxy.wait_for_checks()
        backends = ("mailrelay_imap", "mailrelay_imaps")
        assert states == {(backend, server): ("UP", "L7OK") for backend in backends for server in ("mr1", "mr2")}, states
        for relay in fleet.relays:
            for listener in ("imap", "imaps"):
                relay.process.wait_for(
                    rf"session \S+ listener={listener} client=127\.0\.0\.1:\d+ user=- upstream=- .* outcome=closed"
                    r" reason='client quit before it was routed'"
                )
        assert " is DOWN" not in fleet.haproxy.output()


def test_failed_logins_through_either_relay_count_together(site: Site, fleet: Fleet) -> None:
    """A guesser whose connections HAProxy spreads over both relays gets the fleet's one
    allowance (`max_per_client`, counted in Redis by the address in HAProxy's header),
    not one per relay: each relay alone has seen only half of the failures."""
    guesser = "127.0.0.3"  # not CLIENT: the other tests' logins must not be throttled
    limit = tomllib.loads((EXAMPLES / "fleet.toml").read_text())["login_limits"]["max_per_client"]
    port = fleet.haproxy.ports["imap"]
    with fleet.explained(site):
        for attempt in range(limit):
            imap = IMAPFrom(port, source=guesser)
            imap.starttls(site.context)
            # A user of its own each time: the per-user slowdown stays out of the way.
            with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
                imap.login(f"guess{attempt}@example.test", "not the password")
            imap.logout()
        for relay in fleet.relays:
            failures = re.findall(r"login refused for guess\d+@example\.test from 127\.0\.0\.3", relay.output())
            assert 0 < len(failures) < limit, failures
        for _ in fleet.relays:  # whichever relay HAProxy picks: the fleet's count says no
            imap = IMAPFrom(port, source=guesser)
            imap.starttls(site.context)
            with pytest.raises(imaplib.IMAP4.error, match="UNAVAILABLE"):
                imap.login("rr@example.test", PASSWORD)
        for relay in fleet.relays:
            relay.process.wait_for(r"listener=imap client=127\.0\.0\.3:\d+ user=rr@example\.test .* outcome=throttled")
        assert "not the password" not in site.redis.dump()


# -- attacks ----------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [1, 2])
def test_a_forged_header_from_an_untrusted_peer_is_refused(site: Site, fleet: Fleet, version: int) -> None:
    """Straight to a relay from 127.0.0.2, which is not in trusted_proxies, with a header
    claiming 10.9.9.9: closed before a byte is answered, and nobody hears of 10.9.9.9."""
    with fleet.explained(site):
        relay = fleet.relays[0]
        port = relay.ports["imap"]
        header = (proxy_v1 if version == 1 else proxy_v2)((FORGED, 40000), ("127.0.0.1", port))
        received = b""
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=WAIT, source_address=(CLIENT, 0)) as sock:
                sock.sendall(header + b"a LOGIN forged@example.test " + PASSWORD.encode() + b"\r\n")
                while data := sock.recv(4096):
                    received += data
        except (ConnectionResetError, BrokenPipeError):
            # Closed with a reset, perhaps before all was sent, or even before connect()
            # returned (a socket with a timeout learns the outcome of its connect after
            # the fact, when the reset may be there already): a close all the same.
            pass
        assert received == b""
        relay.process.wait_for(r"listener imap: closed a connection from 127\.0\.0\.2:\d+: not in trusted_proxies")
        assert FORGED not in relay.process.output
        assert FORGED not in site.dovecot.log_text()
        assert "forged@example.test" not in site.dovecot.log_text()


def converse(sock: Any, line: bytes) -> list[bytes]:
    """Send a tagged command (the tag is its first word); the lines answered, up to the tagged one."""
    sock.sendall(line + b"\r\n")
    tag, answer = line.split(b" ", 1)[0] + b" ", list[bytes]()
    while not answer or not answer[-1].startswith(tag):
        answer.append(read_line(sock))
        assert answer[-1], answer  # not closed
    return answer


def test_a_header_sent_by_the_client_through_haproxy_is_only_a_bad_command(site: Site, fleet: Fleet) -> None:
    """mailrelay reads one header, HAProxy's: a second one, the client's, is IMAP from the
    client (a bad command), and the login after it is still the client's own address."""
    with fleet.explained(site):
        user = "smuggled@example.test"
        port = fleet.haproxy.ports["imap"]
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT, source_address=(CLIENT, 0)) as sock:
            sock.sendall(proxy_v1((FORGED, 40000), ("127.0.0.1", port)))
            assert read_line(sock).startswith(b"* OK ")
            assert read_line(sock).startswith(b"PROXY BAD ")
            assert converse(sock, b"a STARTTLS")[-1].startswith(b"a OK ")
            with site.context.wrap_socket(sock, server_hostname=HOSTNAME) as tls:
                assert converse(tls, b"b LOGIN " + user.encode() + b" " + PASSWORD.encode())[-1].startswith(b"b OK ")
                assert converse(tls, b"c LOGOUT")[-1].startswith(b"c OK ")
        [login] = dovecot_logins(site, user, 1)
        assert f"rip={CLIENT}," in login, login
        assert FORGED not in site.dovecot.log_text()
        for relay in fleet.relays:
            assert FORGED not in relay.process.output
            assert not re.search(rf"client=(?!127\.0\.0\.2:)\S+ user={re.escape(user)} ", relay.process.output)


# -- systemd ----------------------------------------------------------------------------------


def test_the_units_are_consistent_with_the_configuration() -> None:
    """What systemd does with the units matches what fleet.toml expects of them."""
    config = tomllib.loads((EXAMPLES / "fleet.toml").read_text())
    # A stop lets running sessions drain, and is not cut short by SIGKILL, even when a
    # supervisor waits for its workers (workers = N) past the drain.
    assert timespan(SERVICE.value("Service", "TimeoutStopSec")) > config["drain_timeout"] + KILL_MARGIN
    assert SERVICE.value("Service", "KillMode") == "mixed"  # SIGTERM to the supervisor, which tells its workers
    assert SERVICE.value("Service", "KillSignal") == "SIGTERM"
    assert exec_command(SERVICE.value("Service", "ExecReload"), MAINPID="4711") == ["/bin/kill", "-HUP", "4711"]
    # One systemd socket per listener, in the socket unit's order, of its address family.
    streams = SOCKET.values("Socket", "ListenStream")
    listens = [listener["listen"] for listener in config["listener"]]
    assert listens == [f"systemd:domain=INET:index={i}" for i in range(len(streams))], listens
    assert all(loopback_stream(stream).startswith("127.") for stream in streams), streams  # IPv4: domain=INET
    assert SOCKET.value("Socket", "Accept") == "no"
    command = exec_command(SERVICE.value("Service", "ExecStart"))
    assert "--nodaemon" in command and "--pidfile=" in command, command


def test_systemd_analyze_verifies_the_units(tmp_path: Path) -> None:
    analyze = systemd_analyze()
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # verify checks that ExecStart's program exists: this venv's twistd stands for /opt/mailrelay's.
    service = (EXAMPLES / "mailrelay.service").read_text().replace("/opt/mailrelay/bin/twistd", str(TWISTD))
    (tmp_path / "mailrelay.service").write_text(service)
    shutil.copy(EXAMPLES / "mailrelay.socket", tmp_path / "mailrelay.socket")
    units = [str(tmp_path / "mailrelay.socket"), str(tmp_path / "mailrelay.service")]
    verified = subprocess.run([analyze, "verify", *units], capture_output=True, text=True, timeout=WAIT)
    assert verified.returncode == 0 and not verified.stderr.strip(), verified.stdout + verified.stderr
    # The hardening, as systemd itself rates it: "1.5 OK" when written; 2.0 at most.
    security = subprocess.run(
        [analyze, "security", "--offline=yes", "--threshold=20", units[1]], capture_output=True, text=True, timeout=WAIT
    )
    assert security.returncode == 0, security.stdout + security.stderr
    assert re.search(r"Overall exposure level for mailrelay\.service: [01]\.\d OK", security.stdout), security.stdout


def test_socket_activation_serves_reloads_and_stops(site: Site) -> None:
    """ExecStart with mailrelay.socket's sockets handed over: a connection made as soon as
    the sockets exist (before mailrelay may have started) is served; the supervisor's two
    workers serve both sockets; ExecReload reaches both workers; KillSignal stops them all
    within TimeoutStopSec."""
    user = "activated@example.test"
    process = Process(activated_command("fleet.toml"), site.directory, child_env(**service_environment()))
    try:
        with explained(site, mailrelay=lambda: process.output):
            imap_port = int(process.wait_for(SOCKET_LINE.format(index=0)).group(1))
            # The header a trusted proxy (here: the test, from 127.0.0.1) would send for 192.0.2.7.
            header = proxy_v2(("192.0.2.7", 40000), ("127.0.0.1", imap_port))
            early = IMAPFrom(imap_port, source="127.0.0.1", header=header)  # waits in the backlog if need be
            imaps_port = int(process.wait_for(SOCKET_LINE.format(index=1)).group(1))
            log_in_and_out(early, user, site.context)
            header = proxy_v2(("192.0.2.8", 40001), ("127.0.0.1", imaps_port))
            log_in_and_out(IMAPSFrom(imaps_port, site.context, source="127.0.0.1", header=header), user)
            logins = dovecot_logins(site, user, 2)
            assert "rip=192.0.2.7," in logins[0] and "rip=192.0.2.8," in logins[1], logins
            process.wait_for(
                rf"worker \d \[pid \d+\]: .*session \S+ listener=imaps client=192\.0\.2\.8:40001 user={re.escape(user)} "
            )
            for count in (1, 2):
                started = process.wait_for(r"worker serving|invalid configuration|worker could not start", count=count)
                assert started.group(0) == "worker serving"

            reload = exec_command(SERVICE.value("Service", "ExecReload"), MAINPID=str(process.popen.pid))
            subprocess.run(reload, check=True, timeout=WAIT)
            process.wait_for(r"reload: passing SIGHUP to 2 worker\(s\)")
            for worker in (1, 2):
                process.wait_for(rf"worker {worker} \[pid \d+\]: .*reload requested")
            log_in_and_out(IMAPSFrom(imaps_port, site.context, source="127.0.0.1", header=header), user)  # still serving

            output = stop_relay(Relay(process, {}))
    finally:
        process.kill()
    assert re.search(r"worker 1 \[pid \d+\]: .*worker stopped", output) and re.search(
        r"worker 2 \[pid \d+\]: .*worker stopped", output
    ), output
    assert "restarting worker" not in output and "Traceback" not in output
    assert PASSWORD not in output


def test_started_without_its_sockets_it_refuses_to_start(site: Site) -> None:
    """ExecStart run by hand, outside systemd: no inherited socket, a clear refusal."""
    command = activated_command("fleet.toml")
    twistd = command[command.index("--") + 1 :]
    result = subprocess.run(twistd, cwd=site.directory, env=child_env(), capture_output=True, text=True, timeout=WAIT)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    # Named: the listener's endpoint, that systemd's socket is missing, what systemd gave.
    assert re.search(r'"systemd:domain=INET:index=0".* from systemd \(LISTEN_FDS=none\)', output), output
    assert "Traceback" not in output and "starting up" not in output


def test_check_passes_where_systemd_gives_no_sockets(site: Site) -> None:
    """`check` by hand or as ExecStartPre (systemd passes sockets to ExecStart only):
    everything is checked but the sockets, which the start checks."""
    config = site.directory / "fleet.toml"
    result = subprocess.run(
        [sys.executable, "-m", "mailrelay", "check", str(config)],
        cwd=site.directory,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert 'listener "imap": systemd:domain=INET:index=0 ' in result.stdout
    assert "LISTEN_FDS" not in result.stdout + result.stderr
