"""makeService: what it accepts, the order things start and stop in, listening failures."""

from __future__ import annotations

import os
import signal
import socket
import tempfile
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet import reactor
from twisted.internet.error import CannotListenError
from twisted.internet.task import deferLater
from zope.interface import implementer

from mailrelay import IReloadable, Route, Router, RouteRequest, makeService
from tests.support.net import ProxyTestCase, connect, exchange, recv_all, splice_config, tcp_port


def echo(conn: socket.socket) -> bytes:
    data = recv_all(conn)
    conn.sendall(data)
    return data


class LifecycleRouter(Router, Service):
    """A router with a lifecycle (a connection pool, a file watcher...)."""

    def __init__(self, route: Route, events: list[str]) -> None:
        self.to = route
        self.events = events

    def startService(self) -> None:
        super().startService()
        self.events.append("router started")

    def stopService(self) -> None:
        self.events.append("router stopped")
        super().stopService()

    def route(self, request: RouteRequest) -> Route:
        self.events.append("routed")
        return self.to


class ServiceTests(ProxyTestCase):
    async def test_a_router_service_starts_first_and_stops_after_sessions_drained(self) -> None:
        upstream = self.server(echo)
        events: list[str] = []
        router = LifecycleRouter(Route(host="127.0.0.1", port=upstream.port), events)
        service, port = await self.start_proxy(splice_config(("127.0.0.1", 1)), router=router)
        self.assertEqual(events, ["router started"])

        conn = await self.in_thread(connect, port)
        await self.in_thread(conn.sendall, b"hello")
        while "routed" not in events:
            await self.in_thread(lambda: None)
        stopping = service.stopService()
        self.assertEqual(events, ["router started", "routed"])  # still draining
        conn.shutdown(socket.SHUT_WR)
        self.assertEqual(await self.in_thread(recv_all, conn), b"hello")
        conn.close()
        await stopping
        self.assertEqual(events, ["router started", "routed", "router stopped"])

    async def test_config_file_path_and_router_override(self) -> None:
        upstream = self.server(echo)
        directory = tempfile.TemporaryDirectory()
        self.addCleanup(directory.cleanup)
        path = Path(directory.name) / "mailrelay.toml"
        path.write_text(
            '[router]\ntype = "static"\nhost = "127.0.0.1"\nport = 1\n\n'
            '[[listener]]\nname = "file"\nlisten = "tcp:0:interface=127.0.0.1"\nmode = "splice"\n'
        )
        events: list[str] = []
        service = makeService(path, router=LifecycleRouter(Route(host="127.0.0.1", port=upstream.port), events))
        service.startService()
        self.addCleanup(service.stopService)
        listening = service.listeners["file"].port
        assert listening is not None
        port = tcp_port(await listening)
        self.assertEqual(await self.in_thread(exchange, port, b"through the override"), b"through the override")
        self.assertIn("routed", events)

    async def test_sighup_reloads_reloadable_routers_and_survives_a_broken_one(self) -> None:
        @implementer(IReloadable)
        class ReloadingRouter(LifecycleRouter):
            reloads = 0

            def reload(self) -> None:
                type(self).reloads += 1

        @implementer(IReloadable)
        class BrokenReload(LifecycleRouter):
            def reload(self) -> None:
                raise RuntimeError("bug in reload")

        good = ReloadingRouter(Route(host="127.0.0.1", port=25), [])
        service, _ = await self.start_proxy(splice_config(("127.0.0.1", 25)), router=good)
        service.routers.append(BrokenReload(Route(host="127.0.0.1", port=25), []))

        os.kill(os.getpid(), signal.SIGHUP)
        while ReloadingRouter.reloads == 0:
            await deferLater(reactor, 0.01)
        await deferLater(reactor, 0.01)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertIn("reload requested: 3 component(s) to reload", self.logs.lines())

    def test_a_port_in_use_fails_the_start(self) -> None:
        taken = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(taken.close)
        config: dict[str, Any] = splice_config(("127.0.0.1", 25))
        config["listener"][0]["listen"] = f"tcp:{taken.getsockname()[1]}:interface=127.0.0.1"
        service = makeService(config, reactor=reactor)
        with self.assertRaises(CannotListenError):
            service.startService()

    async def test_without_tls_config_a_tls_listener_serves_a_self_signed_certificate_and_warns(self) -> None:
        import ssl

        from cryptography import x509

        upstream = self.server(echo)
        _, port = await self.start_proxy(splice_config(("127.0.0.1", upstream.port), mode="tls"))

        def client() -> bytes:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE  # nobody can trust it: that is the point of the warning
            with context.wrap_socket(connect(port), server_hostname="localhost") as tls:
                der = tls.getpeercert(binary_form=True)
                assert der is not None
                tls.sendall(b"through TLS")
                tls.unwrap()  # close_notify: the proxy ends the session, the upstream sees its end
                return der

        der = await self.in_thread(client)
        certificate = x509.load_der_x509_certificate(der)
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.DNSName
        )
        self.assertIn("localhost", names)
        self.assertEqual(certificate.issuer, certificate.subject)
        warning = [
            line for line in self.logs.lines() if line.startswith("no [tls] in <config>: serving a self-signed certificate")
        ]
        self.assertEqual(len(warning), 1, self.logs.lines())
        self.assertTrue(warning[0].endswith("; clients will not trust it"), warning)
        self.assertEqual(await self.in_thread(upstream.result), b"through TLS")
