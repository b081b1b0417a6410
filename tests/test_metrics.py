"""
The metrics endpoint (`[metrics] listen`) scraped over HTTP after a known workload, the
counts of two services in one process kept apart, the JSON session line, and the sum
over worker processes (prometheus_client's multiprocess mode).
"""

from __future__ import annotations

import imaplib
import json
import signal
import socket
import string
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher

from mailrelay.config import Config, parse_config
from mailrelay.logtext import loggable
from mailrelay.metrics import NO_METRICS, MetricsService, MultiprocessMetrics
from mailrelay.router import Route, RouteRequest
from mailrelay.service import MailrelayService
from mailrelay.session import SESSION_LINE, Sessions
from tests.support.frontends import PASSWORD, USER, FrontEndTestCase, Router, password_check
from tests.support.imap import ScriptedIMAP
from tests.support.net import WAIT, LogCapture, ThreadedServer, connect, recv_all, recv_exactly, tcp_port
from tests.support.processes import LISTENING, TWISTD, Process, assert_clean_stop

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of a scrape, by (name, labels)."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def named(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    """The samples of one name, by labels."""
    return {labels: v for (n, labels), v in samples.items() if n == name}


def get(url: str) -> tuple[int, str]:
    """GET `url` (blocking): status and body."""
    try:
        with urllib.request.urlopen(url, timeout=WAIT) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def echo_held(conn: socket.socket) -> int:
    """Echo until the client ends its stream; the bytes echoed."""
    total = 0
    while data := conn.recv(65536):
        conn.sendall(data)
        total += len(data)
    return total


METRICS = {"listen": "tcp:0:interface=127.0.0.1"}


class MetricsTestCase(FrontEndTestCase):
    protocol = "imap"

    async def serve(self, config: dict[str, Any], router: Any) -> tuple[MailrelayService, dict[str, int], str]:
        """Start a service with `[metrics]`: it, its listeners' ports, and its metrics URL."""
        service = MailrelayService(_parsed(config), router=router)
        service.startService()
        self.addCleanup(service.stopService)
        ports = {}
        for name, listener in service.listeners.items():
            assert listener.port is not None
            ports[name] = tcp_port(await listener.port)
        endpoint = service.metrics_services[0]
        assert isinstance(endpoint, MetricsService) and endpoint.port is not None
        return service, ports, f"http://127.0.0.1:{tcp_port(await endpoint.port)}/metrics"

    async def scrape(self, url: str) -> Samples:
        status, body = await self.in_thread(get, url)
        self.assertEqual(status, 200, body)
        return parse(body)

    def session_lines(self, listener: str) -> list[Any]:
        return [e for e in self.logs.sessions() if e["listener"] == listener]


def _parsed(config: dict[str, Any]) -> Config:
    return parse_config(config, source="test")


class KnownWorkloadTests(MetricsTestCase):
    async def test_the_endpoint_shows_the_counts_of_a_known_workload(self) -> None:
        echo = self.server(echo_held)
        imap = self.server(ScriptedIMAP(users={USER: PASSWORD}))
        check = password_check(imap.port)

        def answer(request: RouteRequest) -> Route:
            if request.listener == "relay":
                return Route(host="127.0.0.1", port=echo.port)
            return check(request)

        config = self.front_end_config(mode="tls")
        config["listener"].append(
            {
                "name": "relay",
                "listen": "tcp:0:interface=127.0.0.1",
                "mode": "splice",
                "connection_limits": {"max_per_client": 3},
            }
        )
        config["metrics"] = METRICS
        config["log"] = {"sessions": "json"}
        service, ports, url = await self.serve(config, Router(answer=answer, verifies_passwords=True))

        # Three spliced sessions, held open, carrying 1000, 2000 and 3000 bytes each way.
        sizes = (1000, 2000, 3000)
        held = []
        for size in sizes:
            conn = await self.in_thread(connect, ports["relay"])
            self.addCleanup(conn.close)
            await self.in_thread(conn.sendall, b"x" * size)
            self.assertEqual(await self.in_thread(recv_exactly, conn, size), b"x" * size)
            held.append(conn)
        while_open = await self.scrape(url)
        self.assertEqual(value(while_open, "mailrelay_sessions_open", listener="relay"), 3)
        # Counted while they flow: these sessions have not ended.
        self.assertEqual(value(while_open, "mailrelay_bytes_total", listener="relay", direction="up"), 6000)
        self.assertEqual(value(while_open, "mailrelay_bytes_total", listener="relay", direction="down"), 6000)
        self.assertEqual(named(while_open, "mailrelay_sessions_total"), {})

        # A fourth connection from the same client is past max_per_client: closed at once.
        turned_away = await self.in_thread(connect, ports["relay"])
        self.addCleanup(turned_away.close)
        self.assertEqual(await self.in_thread(recv_all, turned_away), b"")

        for conn in held:
            conn.shutdown(socket.SHUT_WR)
            self.assertEqual(await self.in_thread(recv_all, conn), b"")
        await self.eventually(lambda: len(self.session_lines("relay")) == 3, "the relay sessions did not end")

        # Two refused logins and a good one in one IMAP session, then a client that
        # does not speak TLS to the TLS listener.
        def imap_client() -> list[bytes]:
            failures = []
            with imaplib.IMAP4_SSL("127.0.0.1", ports["imap"], ssl_context=self.context, timeout=WAIT) as client:
                for wrong in ("wrong-1-Pa55", "wrong-2-Pa55"):
                    try:
                        client.login(USER, wrong)
                    except imaplib.IMAP4.error as e:
                        failures.append(e.args[0])
                client.login(USER, PASSWORD)
                client.logout()
            return failures

        self.assertEqual(await self.in_thread(imap_client), [b"[AUTHENTICATIONFAILED] Invalid login"] * 2)
        plain = await self.in_thread(connect, ports["imap"])
        self.addCleanup(plain.close)
        await self.in_thread(plain.sendall, b"a LOGIN alice secret\r\n")
        await self.in_thread(recv_all, plain)
        await self.eventually(lambda: len(self.session_lines("imap")) == 2, "the imap sessions did not end")

        after = await self.scrape(url)
        imap_outcomes = sorted(e["outcome"] for e in self.session_lines("imap"))
        self.assertEqual(imap_outcomes, ["closed", "tls-failed"])
        self.assertEqual(
            named(after, "mailrelay_sessions_total"),
            {
                frozenset({("listener", "relay"), ("outcome", "closed")}): 3,
                frozenset({("listener", "imap"), ("outcome", "closed")}): 1,
                frozenset({("listener", "imap"), ("outcome", "tls-failed")}): 1,
            },
        )
        self.assertEqual(
            named(after, "mailrelay_sessions_open"),
            {frozenset({("listener", "relay")}): 0, frozenset({("listener", "imap")}): 0},
        )
        self.assertEqual(
            named(after, "mailrelay_logins_total"),
            {
                frozenset({("listener", "imap"), ("result", "failure")}): 2,
                frozenset({("listener", "imap"), ("result", "success")}): 1,
            },
        )
        self.assertEqual(value(after, "mailrelay_bytes_total", listener="relay", direction="up"), 6000)
        self.assertEqual(value(after, "mailrelay_bytes_total", listener="relay", direction="down"), 6000)
        self.assertGreater(value(after, "mailrelay_bytes_total", listener="imap", direction="down") or 0, 0)
        self.assertEqual(
            named(after, "mailrelay_tls_handshake_failures_total"),
            {frozenset({("listener", "imap")}): 1},
        )
        self.assertEqual(
            named(after, "mailrelay_limit_hits_total"),
            {frozenset({("listener", "relay"), ("limit", "max_per_client")}): 1},
        )
        # The Router answered 3 splices and 3 logins; 4 upstream connections were made.
        self.assertEqual(value(after, "mailrelay_router_seconds_count"), 6)
        self.assertEqual(value(after, "mailrelay_upstream_connect_seconds_count"), 4)
        self.assertEqual(value(after, "mailrelay_upstream_connect_seconds_bucket", le="+Inf"), 4)

        # The session lines were JSON, and no password reached the log.
        everything = "\n".join(self.logs.lines())
        for password in ("wrong-1-Pa55", "wrong-2-Pa55", PASSWORD):
            self.assertNotIn(password, everything)
        for event in self.logs.sessions():
            line = json.loads(formatEvent(event))
            self.assertEqual(line["session_id"], event["session_id"])

    async def test_login_limits_count_their_hits_and_throttled_logins(self) -> None:
        config = self.front_end_config(mode="tls")
        config["metrics"] = METRICS
        # The third failure refuses the client; each login of the user after its first
        # failure is held back (for a millisecond).
        config["login_limits"] = {"max_per_client": 3, "max_per_user": 1, "delay": 0.001, "max_delay": 0.001}
        _, ports, url = await self.serve(config, Router(answer=password_check(9)))

        def login(password: str) -> bytes:
            with imaplib.IMAP4_SSL("127.0.0.1", ports["imap"], ssl_context=self.context, timeout=WAIT) as client:
                try:
                    client.login(USER, password)
                except imaplib.IMAP4.error as e:
                    return bytes(e.args[0])
            raise AssertionError("logged in")

        for n in range(3):
            self.assertEqual(await self.in_thread(login, f"wrong-{n}"), b"[AUTHENTICATIONFAILED] Invalid login")
        self.assertIn(b"[UNAVAILABLE]", await self.in_thread(login, PASSWORD))

        samples = await self.scrape(url)
        self.assertEqual(
            named(samples, "mailrelay_logins_total"),
            {
                frozenset({("listener", "imap"), ("result", "failure")}): 3,
                frozenset({("listener", "imap"), ("result", "throttled")}): 1,
            },
        )
        self.assertEqual(
            named(samples, "mailrelay_limit_hits_total"),
            {
                frozenset({("listener", "imap"), ("limit", "login_max_per_user")}): 2,
                frozenset({("listener", "imap"), ("limit", "login_max_per_client")}): 1,
            },
        )
        # A throttled login never reaches the Router.
        self.assertEqual(value(samples, "mailrelay_router_seconds_count"), 3)

    async def test_only_the_metrics_path_is_served(self) -> None:
        config = self.front_end_config(mode="tls")
        config["metrics"] = METRICS
        _, _, url = await self.serve(config, Router())
        status, body = await self.in_thread(get, url)
        self.assertEqual(status, 200)
        self.assertIn("# TYPE mailrelay_sessions_total counter", body)
        self.assertIn("# TYPE mailrelay_router_seconds histogram", body)
        for other in ("/", "/metrics/more", "/other"):
            status, _ = await self.in_thread(get, url.replace("/metrics", other))
            self.assertEqual(status, 404, other)

    async def test_two_services_in_one_process_count_apart(self) -> None:
        echo = self.server(echo_held)
        router = Router(port=echo.port)
        config = {
            "listener": [{"name": "relay", "listen": "tcp:0:interface=127.0.0.1", "mode": "splice"}],
            "metrics": METRICS,
        }
        _, first_ports, first_url = await self.serve(config, router)
        _, _, second_url = await self.serve(config, router)
        conn = await self.in_thread(connect, first_ports["relay"])
        self.addCleanup(conn.close)
        await self.in_thread(conn.sendall, b"hello")
        conn.shutdown(socket.SHUT_WR)
        self.assertEqual(await self.in_thread(recv_all, conn), b"hello")
        await self.eventually(lambda: len(self.session_lines("relay")) == 1, "the session did not end")

        first, second = await self.scrape(first_url), await self.scrape(second_url)
        self.assertEqual(value(first, "mailrelay_sessions_total", listener="relay", outcome="closed"), 1)
        self.assertEqual(value(first, "mailrelay_bytes_total", listener="relay", direction="up"), 5)
        self.assertEqual(named(second, "mailrelay_sessions_total"), {})
        self.assertEqual(named(second, "mailrelay_bytes_total"), {})

    async def test_without_metrics_nothing_is_counted_or_served(self) -> None:
        service = MailrelayService(_parsed(self.front_end_config(mode="tls")), router=Router())
        self.assertIs(service.metrics, NO_METRICS)
        self.assertEqual(service.metrics_services, [])
        self.assertIs(service.sessions.metrics, NO_METRICS)


# -- the JSON session line ------------------------------------------------------------


def logged_session(json_lines: bool, user: str | None, outcome: str = "rejected", reason: str | None = "Invalid login") -> Any:
    """The one event a session logs when it ends."""
    capture = LogCapture()
    globalLogPublisher.addObserver(capture)
    try:
        sessions = Sessions(Clock(), json_lines=json_lines)
        session = sessions.open("imap", ("192.0.2.7", 51514), lambda outcome: None)
        session.user = user
        session.finish(outcome, reason)
    finally:
        globalLogPublisher.removeObserver(capture)
    [event] = capture.sessions()
    return event


def test_a_hostile_user_name_makes_one_json_object_with_the_text_lines_fields() -> None:
    user = 'mallory"}\n{"outcome":"closed\x00\r\u2028\x1b[2J'
    line = formatEvent(logged_session(True, user))
    assert "\n" not in line and "\r" not in line and line.isascii() and line.isprintable()
    record = json.loads(line)
    text_fields = {name for _, name, _, _ in string.Formatter().parse(SESSION_LINE) if name} - {"reason_text"}
    assert set(record) == text_fields | {"reason"}
    assert record["user"] == loggable(user)
    assert record["outcome"] == "rejected"
    assert record["reason"] == "Invalid login"
    assert record["client"] == "192.0.2.7:51514"
    assert record["upstream"] is None


def test_a_json_line_without_a_user_says_null_and_the_text_line_is_unchanged() -> None:
    record = json.loads(formatEvent(logged_session(True, None, outcome="client-gone", reason=None)))
    assert record["user"] is None and record["reason"] is None
    assert record["bytes_up"] == 0 and record["duration"] == 0
    text = formatEvent(logged_session(False, "alice"))
    assert text.startswith("session ") and " user=alice " in text and text.endswith("outcome=rejected reason='Invalid login'")


# -- several processes: the sum ---------------------------------------------------------


def relay_toml(upstream_port: int) -> str:
    return (
        "[router]\n"
        'type = "static"\n'
        f'routes = [{{ host = "127.0.0.1", port = {upstream_port} }}]\n'
        "[metrics]\n"
        'listen = "tcp:0:interface=127.0.0.1"\n'
        "[[listener]]\n"
        'name = "relay"\n'
        'listen = "tcp:0:interface=127.0.0.1"\n'
        'mode = "splice"\n'
    )


def splice(port: int, data: bytes) -> bytes:
    with connect(port) as conn:
        conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)
        return recv_all(conn)


@pytest.mark.slow
def test_the_counts_of_worker_processes_are_summed(tmp_path: Path, spawn: Callable[..., Process]) -> None:
    """Two mailrelay processes in the environment a supervisor gives its workers: the
    supervisor's scrape sums their counts; a dead one's open sessions leave the gauge,
    its counts stay in the sums. (Run `.venv/bin/pip install .` after changing mailrelay/.)"""
    echo = ThreadedServer(echo_held)
    metrics = MultiprocessMetrics("tcp:0:interface=127.0.0.1")
    try:
        (tmp_path / "mailrelay.toml").write_text(relay_toml(echo.port))
        workers = [spawn(TWISTD, "-n", "--pidfile=", "mailrelay", "--config", "mailrelay.toml", **metrics.child_environment())]
        workers.append(
            spawn(TWISTD, "-n", "--pidfile=", "mailrelay", "--config", "mailrelay.toml", **metrics.child_environment())
        )
        ports = [int(worker.wait_for(LISTENING.format(name="relay")).group(1)) for worker in workers]

        assert splice(ports[0], b"a" * 100) == b"a" * 100
        assert splice(ports[0], b"b" * 200) == b"b" * 200
        assert splice(ports[1], b"c" * 50) == b"c" * 50
        held = connect(ports[1])
        held.settimeout(WAIT)
        try:
            held.sendall(b"ping")
            assert recv_exactly(held, 4) == b"ping"
            workers[0].wait_for(r"outcome=closed", count=2)
            workers[1].wait_for(r"outcome=closed", count=1)

            body, content_type = metrics.scrape()
            samples = parse(body.decode())
            assert content_type.startswith("text/plain")
            assert value(samples, "mailrelay_sessions_total", listener="relay", outcome="closed") == 3
            assert value(samples, "mailrelay_bytes_total", listener="relay", direction="up") == 350
            assert value(samples, "mailrelay_sessions_open", listener="relay") == 1
            assert value(samples, "mailrelay_router_seconds_count") == 4
            for worker in workers:
                assert "metrics on" not in worker.output  # workers serve no endpoint

            pid = workers[1].popen.pid
            workers[1].signal(signal.SIGKILL)
            workers[1].wait()
            metrics.worker_died(pid)
            samples = parse(metrics.scrape()[0].decode())
            assert value(samples, "mailrelay_sessions_open", listener="relay") == 0
            assert value(samples, "mailrelay_sessions_total", listener="relay", outcome="closed") == 3
        finally:
            held.close()
    finally:
        echo.close()
        for worker in workers:
            worker.kill()
        metrics.close()
    assert not Path(metrics.directory).exists()


def test_without_metrics_a_supervisor_gives_workers_nothing() -> None:
    metrics = MultiprocessMetrics(None)
    assert metrics.child_environment() == {}
    assert metrics.service() is None
    metrics.worker_died(12345)
    metrics.close()


@pytest.mark.slow
def test_a_supervisor_serves_the_sum_of_its_workers(tmp_path: Path, spawn: Callable[..., Process]) -> None:
    """`workers = 2` with `[metrics]`: one endpoint (the supervisor's) counts every
    worker's sessions, and its directory is gone once the supervisor has stopped."""
    echo = ThreadedServer(echo_held)
    try:
        (tmp_path / "mailrelay.toml").write_text("workers = 2\n" + relay_toml(echo.port))
        temporary = tmp_path / "tmp"  # where the supervisor makes its metrics directory
        temporary.mkdir()
        supervisor = spawn(TWISTD, "-n", "--pidfile=", "mailrelay", "--config", "mailrelay.toml", TMPDIR=str(temporary))
        url = supervisor.wait_for(r"metrics on (http://127\.0\.0\.1:\d+/metrics)").group(1)
        port = int(supervisor.wait_for(LISTENING.format(name="relay")).group(1))
        for n in range(6):
            assert splice(port, b"%d" % n * 10) == b"%d" % n * 10
        supervisor.wait_for(r"outcome=closed", count=6)
        status, body = get(url)
        assert status == 200, body
        samples = parse(body)
        assert value(samples, "mailrelay_sessions_total", listener="relay", outcome="closed") == 6
        assert value(samples, "mailrelay_bytes_total", listener="relay", direction="up") == 60
        assert value(samples, "mailrelay_sessions_open", listener="relay") == 0
        [directory] = temporary.iterdir()
        assert directory.name.startswith("mailrelay-metrics-")
        supervisor.signal(signal.SIGTERM)
        assert_clean_stop(supervisor)
        assert list(temporary.iterdir()) == []
    finally:
        echo.close()
