"""
Every upstream stage has a deadline (`[upstream] login_timeout`): an upstream that
accepts the connection and then says nothing, at any stage of the login, fails its
route with the stage named, and the next route is tried; the client hears its
protocol's temporary failure when none is left. Each session then leaves nothing
behind: no timer, no session, no file descriptor. And SMTP's relay aborts, after a
grace, a client connection it closed that does not take what was written to it.

Real sockets throughout: mailrelay's SMTP, IMAP and POP3 front-ends, scripted upstreams
that stall where a test says, raw clients. mailrelay's timers run on a `task.Clock`
(`ClockedReactor`): once mailrelay waits where the upstream stalls, the test advances
the clock past the deadline instead of waiting for it.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import Clock

from mailrelay.config import ConfigError, parse_config
from mailrelay.protocols.smtp_relay import SMTPRelay
from mailrelay.router import Route
from mailrelay.service import MailrelayService
from tests.support.clocked import reading_from, writing_to
from tests.support.frontends import PASSWORD, USER, FrontEndTestCase, Router, plain_ir
from tests.support.imap import ScriptedIMAP, read_tagged
from tests.support.net import WAIT, ThreadedServer, read_line, recv_all, reset
from tests.support.pop3 import ScriptedPOP3, logged_in_reply
from tests.support.smtp import ScriptedSMTP, raw_reply

TIMEOUT = 30.0
"""The `[upstream] login_timeout` of these tests (the default)."""

IDLE = 300.0
"""The SMTP relay's `idle_timeout` in these tests."""

SMTP_UNAVAILABLE = b"451 4.4.1 Mail server temporarily unavailable, try again later\r\n"
IMAP_UNAVAILABLE = b"a NO [UNAVAILABLE] Mail server temporarily unavailable, try again later\r\n"
POP3_UNAVAILABLE = b"-ERR [SYS/TEMP] Mail server temporarily unavailable, try again later\r\n"


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def closing(handle: Callable[[socket.socket], Any]) -> Callable[[socket.socket], Any]:
    """A ThreadedServer handler that closes its connection before it returns, so that
    a test awaiting its result knows the descriptor is gone."""

    def handler(conn: socket.socket) -> Any:
        try:
            return handle(conn)
        except OSError as e:  # mailrelay closed or aborted the connection
            return f"{type(e).__name__}"
        finally:
            conn.close()

    return handler


class Stalling:
    """
    An upstream that says `script[0]` on accept (nothing if it is empty), answers each
    line it then hears with the next item (`{tag}` replaced by the line's first word),
    and once the script is over reads on without a word, until mailrelay closes the
    connection: what it heard (a TLS ClientHello included). `accepted` is set on accept;
    `unanswered` is what it heard once its script was over, as it comes.
    """

    def __init__(self, *script: bytes) -> None:
        self.script = script
        self.accepted = threading.Event()
        self.unanswered = b""

    def __call__(self, conn: socket.socket) -> bytes:
        self.accepted.set()
        heard = b""
        if self.script and self.script[0]:
            conn.sendall(self.script[0])
        for answer in self.script[1:]:
            line = read_line(conn)
            heard += line
            if not line.endswith(b"\n"):
                return heard
            conn.sendall(answer.replace(b"{tag}", line.split(b" ", 1)[0]))
        try:
            while data := conn.recv(1 << 16):
                self.unanswered += data
        except OSError:
            pass
        return heard + self.unanswered


class DeadlineTestCase(FrontEndTestCase):
    """One front-end listener in plaintext (`starttls = "optional"`), with `login_timeout`
    = TIMEOUT; `settled()` checks that a finished session left nothing behind."""

    protocol = "smtp"

    def setUp(self) -> None:
        super().setUp()
        self.clock = Clock()

    def pending_calls(self) -> list[Any]:
        """The active calls on the clock and on the real reactor."""
        return [call for call in (*self.clock.getDelayedCalls(), *reactor.getDelayedCalls()) if call.active()]

    async def start(self, answer: Any, **listener: Any) -> int:
        """mailrelay on `self.clock`, routed by `answer` (a request -> Route(s)
        function); the port. The file descriptors and timers of the moment are the
        baseline `settled()` expects."""
        config = self.front_end_config(starttls="optional", **listener)
        config["upstream"] = {"login_timeout": TIMEOUT, "connect_timeout": 10}
        self.service: MailrelayService
        self.service, port = await self.start_proxy(config, router=Router(answer=answer), clock=self.clock)
        await self.in_thread(lambda: None)  # the reactor's first thread call opens its waker's pipe
        self.fds = open_fds()
        self.timers = set(self.pending_calls())
        return port

    async def stalled(self, upstream: ThreadedServer, stalling: Stalling) -> None:
        """Once mailrelay waits where `stalling`'s script ends: it said something there
        that is left unanswered or, to an upstream that says nothing at all, it is
        connected and reading."""
        if stalling.script:
            await self.eventually(lambda: stalling.unanswered, "mailrelay said nothing past the upstream's script")
        else:
            await self.eventually(lambda: reading_from(upstream.port), "mailrelay did not connect to the upstream")

    def upstream(self, handle: Callable[[socket.socket], Any]) -> ThreadedServer:
        return self.server(closing(handle))

    async def settled(self, *upstreams: ThreadedServer) -> None:
        """Once the client has closed: the session ended, no timer of it is left, and
        every descriptor it took (and each upstream's, whose handlers end) is released."""
        await self.session_line()
        for upstream in upstreams:
            for _ in range(upstream.connections):
                await self.in_thread(upstream.result)
        self.assertEqual(len(self.service.sessions), 0)
        left = [
            call
            for call in self.pending_calls()
            if call not in self.timers and not getattr(getattr(call, "func", None), "__module__", "").startswith("twisted.trial")
        ]
        self.assertEqual(left, [])
        self.assertEqual(open_fds(), self.fds)

    def failure_logged(self, upstream: ThreadedServer, why: str) -> None:
        lines = "\n".join(self.logs.lines())
        self.assertIn(f": upstream 127.0.0.1:{upstream.port} failed: {why}", lines)

    # Each protocol's client, in plaintext: connect and greet, log in, leave.

    def client(self, port: int) -> socket.socket:
        conn = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        self.addCleanup(conn.close)
        if self.protocol == "smtp":
            self.assertEqual(raw_reply(conn)[:4], b"220 ")
            conn.sendall(b"EHLO client.example\r\n")
            self.assertEqual(raw_reply(conn)[:4], b"250-")
        else:
            self.assertTrue(read_line(conn).startswith(b"* OK " if self.protocol == "imap" else b"+OK "))
        return conn

    def send_login(self, conn: socket.socket) -> None:
        if self.protocol == "smtp":
            conn.sendall(b"AUTH PLAIN " + plain_ir() + b"\r\n")
        elif self.protocol == "imap":
            conn.sendall(b"a LOGIN " + USER.encode() + b" " + PASSWORD.encode() + b"\r\n")
        else:
            conn.sendall(b"USER " + USER.encode() + b"\r\nPASS " + PASSWORD.encode() + b"\r\n")
            self.assertEqual(read_line(conn), b"+OK\r\n")

    def login_reply(self, conn: socket.socket) -> bytes:
        if self.protocol == "smtp":
            return raw_reply(conn)
        if self.protocol == "imap":
            return read_tagged(conn, b"a")
        return read_line(conn)

    def login(self, port: int) -> tuple[socket.socket, bytes]:
        conn = self.client(port)
        self.send_login(conn)
        return conn, self.login_reply(conn)

    def leave(self, conn: socket.socket) -> bytes:
        """Say goodbye; everything said until the close."""
        conn.sendall({"smtp": b"QUIT\r\n", "imap": b"z LOGOUT\r\n", "pop3": b"QUIT\r\n"}[self.protocol])
        answer = recv_all(conn)
        conn.close()
        return answer

    def working_upstream(self) -> ThreadedServer:
        if self.protocol == "smtp":
            return self.upstream(ScriptedSMTP(users={USER: PASSWORD}))
        if self.protocol == "imap":
            return self.upstream(ScriptedIMAP(users={USER: PASSWORD}))
        return self.upstream(ScriptedPOP3())

    # The tests each front-end runs

    async def check_fallback_after_a_silent_upstream(self, logged_in: bytes, goodbye: bytes) -> None:
        stalling = Stalling()
        silent, working = self.upstream(stalling), self.working_upstream()
        port = await self.start(lambda request: [Route(host="127.0.0.1", port=p) for p in (silent.port, working.port)])

        def client() -> tuple[bytes, bytes]:
            conn, reply = self.login(port)
            return reply, self.leave(conn)

        talking = self.in_thread(client)
        await self.stalled(silent, stalling)
        self.clock.advance(TIMEOUT)
        self.assertEqual(await talking, (logged_in, goodbye))
        self.failure_logged(silent, f"no greeting within {TIMEOUT:g}s")
        await self.settled(silent, working)
        line = self.logs.sessions()[-1]
        self.assertEqual((line["outcome"], line["upstream"]), ("closed", f"127.0.0.1:{working.port}"))

    async def check_temporary_failure_without_a_fallback(self, unavailable: bytes) -> None:
        stalling = Stalling()
        silent = self.upstream(stalling)
        port = await self.start(lambda request: Route(host="127.0.0.1", port=silent.port))

        def client() -> bytes:
            conn, reply = self.login(port)
            self.leave(conn)
            return reply

        talking = self.in_thread(client)
        await self.stalled(silent, stalling)
        self.clock.advance(TIMEOUT)
        self.assertEqual(await talking, unavailable)
        await self.settled(silent)
        line = self.logs.sessions()[-1]
        self.assertEqual(line["outcome"], "upstream-unavailable")
        self.assertEqual(line["reason"], f"127.0.0.1:{silent.port}: no greeting within {TIMEOUT:g}s")

    async def check_stall(self, stalling: Stalling, why: str, unavailable: bytes, **route: Any) -> None:
        """An upstream that stalls as `stalling` does fails its route with `why`."""
        upstream = self.upstream(stalling)
        port = await self.start(lambda request: Route(host="127.0.0.1", port=upstream.port, server_name="upstream.test", **route))

        def client() -> bytes:
            conn, reply = self.login(port)
            self.leave(conn)
            return reply

        talking = self.in_thread(client)
        await self.stalled(upstream, stalling)
        self.clock.advance(TIMEOUT)
        self.assertEqual(await talking, unavailable)
        await self.settled(upstream)
        self.failure_logged(upstream, why)
        self.assertEqual(self.logs.sessions()[-1]["reason"], f"127.0.0.1:{upstream.port}: {why}")

    async def check_half_closed_client(self, unavailable: bytes) -> None:
        """A client that half-closes while its login waits on a silent upstream hears the
        temporary failure, then the close: the session ends within the login deadline."""
        stalling = Stalling()
        silent = self.upstream(stalling)
        port = await self.start(lambda request: Route(host="127.0.0.1", port=silent.port))

        def client() -> socket.socket:
            conn = self.client(port)
            self.send_login(conn)
            conn.shutdown(socket.SHUT_WR)
            return conn

        def rest(conn: socket.socket) -> bytes:
            answer = recv_all(conn)
            conn.close()
            return answer

        conn = await self.in_thread(client)
        await self.stalled(silent, stalling)
        # Twisted stops reading a connection once it has read its end of stream.
        client_port = conn.getsockname()[1]
        await self.eventually(lambda: not reading_from(client_port), "mailrelay did not read the client's end of stream")
        self.clock.advance(TIMEOUT)
        self.assertEqual(await self.in_thread(rest, conn), unavailable)
        await self.settled(silent)
        line = self.logs.sessions()[-1]
        self.assertEqual(line["outcome"], "upstream-unavailable")
        self.assertIn(f"no greeting within {TIMEOUT:g}s", line["reason"])


class SMTPDeadlineTests(DeadlineTestCase):
    protocol = "smtp"

    async def test_a_silent_first_upstream_is_passed_over_for_the_second(self) -> None:
        await self.check_fallback_after_a_silent_upstream(b"235 2.7.0 Authentication successful\r\n", b"221 2.0.0 bye\r\n")

    async def test_without_a_fallback_the_client_hears_451(self) -> None:
        await self.check_temporary_failure_without_a_fallback(SMTP_UNAVAILABLE)

    async def test_no_answer_to_ehlo(self) -> None:
        await self.check_stall(Stalling(b"220 upstream\r\n"), f"no answer to EHLO within {TIMEOUT:g}s", SMTP_UNAVAILABLE)

    async def test_no_answer_to_starttls(self) -> None:
        stalling = Stalling(b"220 upstream\r\n", b"250-upstream\r\n250 STARTTLS\r\n")
        why = f"no answer to STARTTLS within {TIMEOUT:g}s"
        await self.check_stall(stalling, why, SMTP_UNAVAILABLE, tls="starttls")

    async def test_no_handshake_after_starttls(self) -> None:
        stalling = Stalling(b"220 upstream\r\n", b"250-upstream\r\n250 STARTTLS\r\n", b"220 2.0.0 go ahead\r\n")
        await self.check_stall(stalling, f"TLS: no handshake within {TIMEOUT:g}s", SMTP_UNAVAILABLE, tls="starttls")

    async def test_no_handshake_on_a_tls_route(self) -> None:
        await self.check_stall(Stalling(), f"TLS: no handshake within {TIMEOUT:g}s", SMTP_UNAVAILABLE, tls="tls")

    async def test_no_login_reply(self) -> None:
        stalling = Stalling(b"220 upstream\r\n", b"250-upstream\r\n250 AUTH PLAIN\r\n")
        await self.check_stall(stalling, f"no login reply within {TIMEOUT:g}s", SMTP_UNAVAILABLE)

    async def test_a_half_closed_client_is_answered_and_closed_within_the_deadline(self) -> None:
        await self.check_half_closed_client(SMTP_UNAVAILABLE)

    async def test_a_client_leaving_mid_login_cancels_it_and_no_other_route_is_tried(self) -> None:
        stalling = Stalling()
        silent, second = self.upstream(stalling), self.working_upstream()
        # The clock stands still: the client leaves before any deadline.
        port = await self.start(lambda request: [Route(host="127.0.0.1", port=p) for p in (silent.port, second.port)])

        def client() -> None:
            conn = self.client(port)
            self.send_login(conn)
            self.assertTrue(stalling.accepted.wait(WAIT))
            # A reset: an end of stream alone would be a half-close, after which the
            # client still hears how its login went.
            reset(conn)

        await self.in_thread(client)
        await self.settled(silent)
        line = self.logs.sessions()[-1]
        self.assertEqual((line["outcome"], line["reason"]), ("client-gone", "client closed the connection before the splice"))
        self.assertEqual(second.connections, 0)
        self.assertNotIn("failed:", "\n".join(self.logs.lines()))


class IMAPDeadlineTests(DeadlineTestCase):
    protocol = "imap"

    async def test_a_silent_first_upstream_is_passed_over_for_the_second(self) -> None:
        await self.check_fallback_after_a_silent_upstream(
            b"a OK [CAPABILITY IMAP4rev1 IDLE MOVE] Logged in\r\n", b"* BYE upstream logging out\r\nz OK LOGOUT completed\r\n"
        )

    async def test_without_a_fallback_the_client_hears_no_unavailable(self) -> None:
        await self.check_temporary_failure_without_a_fallback(IMAP_UNAVAILABLE)

    async def test_no_answer_to_starttls(self) -> None:
        stalling = Stalling(b"* OK [CAPABILITY IMAP4rev1 STARTTLS] upstream\r\n")
        await self.check_stall(stalling, f"no answer to STARTTLS within {TIMEOUT:g}s", IMAP_UNAVAILABLE, tls="starttls")

    async def test_no_answer_to_capability(self) -> None:
        await self.check_stall(Stalling(b"* OK upstream\r\n"), f"no answer to CAPABILITY within {TIMEOUT:g}s", IMAP_UNAVAILABLE)

    async def test_no_login_reply(self) -> None:
        stalling = Stalling(b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN] upstream\r\n")
        await self.check_stall(stalling, f"no login reply within {TIMEOUT:g}s", IMAP_UNAVAILABLE)

    async def test_a_half_closed_client_is_answered_and_closed_within_the_deadline(self) -> None:
        await self.check_half_closed_client(IMAP_UNAVAILABLE)


class POP3DeadlineTests(DeadlineTestCase):
    protocol = "pop3"

    async def test_a_silent_first_upstream_is_passed_over_for_the_second(self) -> None:
        await self.check_fallback_after_a_silent_upstream(logged_in_reply(USER) + b"\r\n", b"+OK Logging out.\r\n")

    async def test_without_a_fallback_the_client_hears_sys_temp(self) -> None:
        await self.check_temporary_failure_without_a_fallback(POP3_UNAVAILABLE)

    async def test_no_answer_to_capa(self) -> None:
        await self.check_stall(Stalling(b"+OK upstream\r\n"), f"no answer to CAPA within {TIMEOUT:g}s", POP3_UNAVAILABLE)

    async def test_no_answer_to_stls(self) -> None:
        stalling = Stalling(b"+OK upstream\r\n", b"+OK\r\nSTLS\r\n.\r\n")
        await self.check_stall(stalling, f"no answer to STLS within {TIMEOUT:g}s", POP3_UNAVAILABLE, tls="starttls")

    async def test_no_login_reply(self) -> None:
        stalling = Stalling(b"+OK upstream\r\n", b"+OK\r\nUSER\r\n.\r\n")
        await self.check_stall(stalling, f"no login reply within {TIMEOUT:g}s", POP3_UNAVAILABLE)

    async def test_a_half_closed_client_is_answered_and_closed_within_the_deadline(self) -> None:
        await self.check_half_closed_client(POP3_UNAVAILABLE)


class SMTPRelayCloseGraceTests(DeadlineTestCase):
    protocol = "smtp"

    async def test_a_client_that_stops_reading_is_aborted_after_the_grace(self) -> None:
        """The upstream answers three HELPs with 4 MB each and leaves; the client reads
        none of it. The session ends at its idle timeout, and the client connection,
        closed with megabytes still unsent, is aborted `close_grace` seconds later."""
        big = b"".join(b"214-%04d " % i + b"x" * 4000 + b"\r\n" for i in range(999)) + b"214 end of help\r\n"

        def upstream(conn: socket.socket) -> bytes:
            script = [b"250-upstream\r\n250 AUTH PLAIN\r\n", b"235 2.7.0 welcome\r\n", big, big, big]
            conn.sendall(b"220 upstream\r\n")
            for answer in script:
                read_line(conn)
                conn.sendall(answer)
            return b"sent"

        server = self.upstream(upstream)
        port = await self.start(lambda request: Route(host="127.0.0.1", port=server.port), idle_timeout=IDLE)

        def client() -> socket.socket:
            conn = socket.socket()
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # take little without reading
            conn.settimeout(WAIT)
            conn.connect(("127.0.0.1", port))
            self.addCleanup(conn.close)
            raw_reply(conn)
            conn.sendall(b"EHLO client.example\r\n")
            raw_reply(conn)
            conn.sendall(b"AUTH PLAIN " + plain_ir() + b"\r\n")
            self.assertEqual(raw_reply(conn), b"235 2.7.0 Authentication successful\r\n")
            conn.sendall(b"HELP\r\nHELP\r\nHELP\r\n")
            return conn

        conn = await self.in_thread(client)
        client_port = conn.getsockname()[1]
        # The relay holds bytes the client does not take, and so reads the upstream no more.
        await self.eventually(
            lambda: writing_to(client_port) and not reading_from(server.port), "the relay did not hold back the upstream"
        )
        self.clock.advance(IDLE)
        await self.in_thread(server.result)  # the upstream connection is closed
        # The client connection waits out the grace: no session line yet.
        self.assertEqual(self.logs.sessions(), [])
        self.assertEqual(open_fds(), self.fds + 2)
        self.clock.advance(SMTPRelay.close_grace)
        line = await self.session_line()
        self.assertEqual(line["outcome"], "idle-timeout")
        # mailrelay's two connections are gone; the client's socket is still open.
        self.assertEqual(open_fds(), self.fds + 1)
        conn.close()
        await self.settled()  # the upstream's handler has ended already


class ConfigTests(FrontEndTestCase):
    """`[upstream] login_timeout`: seconds, 30 by default, reaching the connector."""

    protocol = "smtp"

    def config(self, **upstream: Any) -> dict[str, Any]:
        config = self.front_end_config()
        config["router"] = {"type": "static", "routes": [{"host": "127.0.0.1", "port": 25}]}
        if upstream:
            config["upstream"] = upstream
        return config

    def test_the_default_is_30_seconds_and_the_connector_gets_it(self) -> None:
        config = parse_config(self.config())
        self.assertEqual((config.upstream.login_timeout, config.upstream.connect_timeout), (30.0, 10.0))
        service = MailrelayService(parse_config(self.config(login_timeout=2.5, connect_timeout=7)), reactor=reactor)
        self.assertEqual((service.connector.login_timeout, service.connector.connect_timeout), (2.5, 7.0))

    def test_a_login_timeout_below_the_connect_timeout_is_allowed(self) -> None:
        self.assertEqual(parse_config(self.config(login_timeout=1, connect_timeout=10)).upstream.login_timeout, 1.0)

    def test_only_positive_seconds(self) -> None:
        for value in (0, -1, "30s", True):
            with self.assertRaises(ConfigError) as caught:
                parse_config(self.config(login_timeout=value))
            self.assertIn("login_timeout", "\n".join(caught.exception.errors))
