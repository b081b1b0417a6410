"""
What a client may do before it logs in, on SMTP, IMAP and POP3 listeners alike, over
real sockets on loopback: `login_deadline` (a hard limit from accept, whatever the
client sends), `max_junk_commands` (commands that achieve nothing), and a client that
half-closes before login. After each case no timer of the session is left, on the
clock or in the reactor.

mailrelay's timers run on a `task.Clock` (`ClockedReactor`), with the timeouts of a real
deployment: a test advances the clock once its client's bytes have been handled, and
never waits for a timer in real time.
"""

from __future__ import annotations

import socket
import ssl
from typing import Any

import pytest
from twisted.internet import reactor
from twisted.internet.task import Clock, deferLater

from mailrelay.config import ConfigError, FrontEndConfig, parse_config
from mailrelay.relay import RoutedConnection
from mailrelay.router import Reject, Route
from tests.support.clocked import owner
from tests.support.frontends import PASSWORD, USER, FrontEndTestCase, Router, password_check, plain_ir
from tests.support.imap import ScriptedIMAP, read_tagged
from tests.support.net import WAIT, ThreadedServer, is_lingering_close, read_line, recv_all
from tests.support.pop3 import ScriptedPOP3, logged_in_reply, read_multiline
from tests.support.smtp import ScriptedSMTP, raw_reply

REFUSED = "Invalid login"

DEADLINE = 180.0
"""The `login_deadline` of these tests (Dovecot's three minutes, the default)."""


class PreLoginTests(FrontEndTestCase):
    """The cases every line protocol shares; a subclass per protocol says its words."""

    __test__ = False  # collected through the subclasses

    noop: bytes
    noop_reply: bytes
    timeout_goodbye: bytes
    junk_goodbye: bytes
    quit: bytes
    quit_reply: bytes
    login_refused: bytes
    """The reply to a refused `login_line()` (its Reject says REFUSED)."""

    # What a subclass implements

    def upstream(self) -> ThreadedServer:
        raise NotImplementedError

    def hello(self, conn: Any) -> None:
        """What the client says before it may log in (SMTP's EHLO)."""

    def login_line(self, password: str = PASSWORD) -> bytes:
        raise NotImplementedError

    def read_login_reply(self, conn: Any) -> bytes:
        raise NotImplementedError

    def logged_in(self, reply: bytes) -> bool:
        """Whether `reply` is the upstream's welcome of a login."""
        raise NotImplementedError

    def leave_upstream(self, conn: Any) -> bytes:
        """Log out of the spliced session and close: the upstream's answer."""
        raise NotImplementedError

    def normal_client(self, port: int) -> Any:
        """The client a mail program is: its greeting, capabilities, STARTTLS, a second
        look at the capabilities, a login. The logged-in (TLS) socket."""
        raise NotImplementedError

    # Helpers

    def setUp(self) -> None:
        super().setUp()
        self.clock = Clock()

    async def listen(self, router: Any = None, **listener: Any) -> int:
        """mailrelay on `self.clock`, with `listener`'s settings; the port."""
        if listener.get("mode", "starttls") == "starttls":
            listener.setdefault("starttls", "optional")
        return await self.proxy(router or Router(), clock=self.clock, **listener)

    def connect(self, port: int) -> socket.socket:
        """A plaintext client, its greeting read."""
        conn = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        self.addCleanup(conn.close)
        assert read_line(conn).endswith(b"\r\n")
        return conn

    def say(self, conn: socket.socket, command: bytes) -> bytes:
        """Send `command`; the one-line reply."""
        conn.sendall(command)
        return read_line(conn)

    def session_timers(self) -> list[Any]:
        """The pending calls, on the clock or the real reactor, that belong to a client
        connection's session: all but the lingering close's, which bounds the connection
        itself until the client closes its end (`SpliceableProtocol.close_lingering`)."""
        calls = [*self.clock.getDelayedCalls(), *reactor.getDelayedCalls()]
        return [c for c in calls if isinstance(owner(c), RoutedConnection) and not is_lingering_close(c)]

    async def ended(self) -> Any:
        """The session's line, once logged; no timer of the session may be left."""
        line = await self.session_line()
        self.assertEqual(self.session_timers(), [])
        return line

    def slow_router(self, port: int, after: float, refuse: bool = False) -> Router:
        """A Router that answers `after` seconds (on the clock) after it is asked: a
        Route to `port`, or (`refuse`) a Reject."""

        def decide() -> Route:
            if refuse:
                raise Reject(REFUSED)
            return Route(host="127.0.0.1", port=port)

        return Router(answer=lambda request: deferLater(self.clock, after, decide))

    async def login_across_the_deadline(self, router: Router) -> socket.socket:
        """Connect, log in, and let the deadline pass while `router` (a `slow_router`
        answering 20 s after it) thinks it over, then let it answer: the client's
        socket, its login reply still to read."""

        def client() -> socket.socket:
            conn = self.connect(self.port)
            self.hello(conn)
            conn.sendall(self.login_line())
            return conn

        conn = await self.in_thread(client)
        await self.eventually(lambda: router.requests, "the Router was not asked")
        self.clock.advance(DEADLINE)  # the deadline passes with the login in flight
        self.clock.advance(20)  # the Router answers
        return conn

    # login_deadline

    async def test_a_client_sending_noops_is_closed_at_the_login_deadline(self) -> None:
        await self.listen(login_deadline=DEADLINE, login_timeout=60, max_junk_commands=1000)
        conn = await self.in_thread(self.connect, self.port)

        received = b""
        for _ in range(4):  # a NOOP every 45 s: never 60 s of silence, 180 s in all
            received += await self.in_thread(self.say, conn, self.noop)
            self.clock.advance(45)
        received += await self.in_thread(recv_all, conn)

        self.assertEqual(received, self.noop_reply * 4 + self.timeout_goodbye)
        line = await self.ended()
        self.assertEqual((line["outcome"], line["reason"]), ("login-timeout", "not logged in within 180s"))
        self.assertEqual(line["duration"], DEADLINE)

    async def test_a_login_in_flight_at_the_deadline_is_not_cut(self) -> None:
        upstream = self.upstream()
        router = self.slow_router(upstream.port, after=DEADLINE + 20)
        await self.listen(router, login_deadline=DEADLINE, router_timeout=300)

        conn = await self.login_across_the_deadline(router)
        reply = await self.in_thread(self.read_login_reply, conn)
        goodbye = await self.in_thread(self.leave_upstream, conn)

        self.assertTrue(self.logged_in(reply), reply)
        self.assertTrue(goodbye, "the upstream did not answer the logout")
        line = await self.ended()
        self.assertEqual(line["outcome"], "closed")

    async def test_a_login_refused_after_the_deadline_closes_the_session(self) -> None:
        router = self.slow_router(9, after=DEADLINE + 20, refuse=True)
        await self.listen(router, login_deadline=DEADLINE, router_timeout=300)

        conn = await self.login_across_the_deadline(router)
        received = await self.in_thread(recv_all, conn)

        self.assertEqual(received, self.login_refused + self.timeout_goodbye)
        line = await self.ended()
        self.assertEqual(line["outcome"], "login-timeout")

    # max_junk_commands

    async def test_noops_past_the_junk_limit_close_the_session(self) -> None:
        port = await self.listen(max_junk_commands=3)

        def client() -> bytes:
            conn = self.connect(port)
            conn.sendall(self.noop * 4)
            return recv_all(conn)

        received = await self.in_thread(client)

        self.assertEqual(received, self.noop_reply * 3 + self.junk_goodbye)
        line = await self.ended()
        self.assertEqual(
            (line["outcome"], line["reason"]), ("protocol-error", "more than 3 commands that achieve nothing before login")
        )

    async def test_a_normal_client_spends_no_junk_and_keeps_no_pre_login_timer(self) -> None:
        upstream = self.upstream()
        port = await self.listen(Router(answer=password_check(upstream.port)), max_junk_commands=1)

        conn = await self.in_thread(self.normal_client, port)
        # Logged in and spliced: the deadline and the silence timer are gone.
        self.assertEqual(self.session_timers(), [])
        goodbye = await self.in_thread(self.leave_upstream, conn)

        self.assertTrue(goodbye)
        line = await self.ended()
        self.assertEqual(line["outcome"], "closed")

    async def test_failed_logins_are_not_junk(self) -> None:
        upstream = self.upstream()
        port = await self.listen(Router(answer=password_check(upstream.port, message=REFUSED)), max_junk_commands=1)

        def client() -> tuple[list[bytes], bytes]:
            conn = self.connect(port)
            self.hello(conn)
            refusals = []
            for _ in range(2):
                conn.sendall(self.login_line("wrong"))
                refusals.append(self.read_login_reply(conn))
            conn.sendall(self.login_line())
            reply = self.read_login_reply(conn)
            self.leave_upstream(conn)
            return refusals, reply

        refusals, reply = await self.in_thread(client)

        self.assertEqual(refusals, [self.login_refused] * 2)
        self.assertTrue(self.logged_in(reply), reply)
        await self.ended()

    # Half-close

    async def test_quit_then_half_close_is_answered_before_the_close(self) -> None:
        port = await self.listen()

        def client() -> bytes:
            conn = self.connect(port)
            conn.sendall(self.quit)
            conn.shutdown(socket.SHUT_WR)
            return recv_all(conn)

        received = await self.in_thread(client)

        self.assertEqual(received, self.quit_reply)
        line = await self.ended()
        self.assertEqual(line["outcome"], "closed")

    async def test_a_half_close_without_a_command_ends_the_session_at_once(self) -> None:
        # The clock stands still: only the half-close can end this session.
        port = await self.listen()

        def client() -> bytes:
            conn = self.connect(port)
            conn.shutdown(socket.SHUT_WR)
            return recv_all(conn)

        received = await self.in_thread(client)

        self.assertEqual(received, b"")
        line = await self.ended()
        self.assertEqual(line["outcome"], "client-gone")

    async def test_pipelined_commands_then_a_half_close_are_all_answered(self) -> None:
        port = await self.listen()

        def client() -> bytes:
            conn = self.connect(port)
            conn.sendall(self.noop * 2)
            conn.shutdown(socket.SHUT_WR)
            return recv_all(conn)

        received = await self.in_thread(client)

        self.assertEqual(received, self.noop_reply * 2)
        line = await self.ended()
        self.assertEqual(line["outcome"], "client-gone")


class SMTPPreLoginTests(PreLoginTests):
    __test__ = True
    protocol = "smtp"
    noop = b"NOOP\r\n"
    noop_reply = b"250 2.0.0 Ok\r\n"
    timeout_goodbye = b"421 4.4.2 relay.test Error: timeout exceeded\r\n"
    junk_goodbye = b"421 4.7.0 relay.test Error: too many commands\r\n"
    quit = b"QUIT\r\n"
    quit_reply = b"221 2.0.0 Bye\r\n"
    login_refused = b"535 5.7.8 " + REFUSED.encode() + b"\r\n"

    def upstream(self) -> ThreadedServer:
        return self.server(ScriptedSMTP(users={USER: PASSWORD}))

    def hello(self, conn: Any) -> None:
        conn.sendall(b"EHLO client.example\r\n")
        assert raw_reply(conn).startswith(b"250-relay.test\r\n")

    def login_line(self, password: str = PASSWORD) -> bytes:
        return b"AUTH PLAIN " + plain_ir(password=password) + b"\r\n"

    def read_login_reply(self, conn: Any) -> bytes:
        return raw_reply(conn)

    def logged_in(self, reply: bytes) -> bool:
        return reply == b"235 2.7.0 Authentication successful\r\n"

    def leave_upstream(self, conn: Any) -> bytes:
        conn.sendall(b"QUIT\r\n")
        reply = raw_reply(conn)
        assert reply == b"221 2.0.0 bye\r\n", reply
        conn.close()
        return reply

    def normal_client(self, port: int) -> Any:
        conn = self.connect(port)
        self.hello(conn)
        conn.sendall(b"STARTTLS\r\n")
        assert raw_reply(conn) == b"220 2.0.0 Ready to start TLS\r\n"
        tls = self.context.wrap_socket(conn, server_hostname="relay.test")
        self.addCleanup(tls.close)
        self.hello(tls)
        tls.sendall(self.login_line())
        reply = raw_reply(tls)
        assert self.logged_in(reply), reply
        return tls

    async def test_a_third_ehlo_is_junk(self) -> None:
        port = await self.listen(max_junk_commands=1)

        def client() -> bytes:
            conn = self.connect(port)
            conn.sendall(b"EHLO a.example\r\nHELO b.example\r\nEHLO c.example\r\nEHLO d.example\r\n")
            return recv_all(conn)

        received = await self.in_thread(client)

        self.assertEqual(received.count(b"250-relay.test\r\n"), 2)  # the first and the third EHLO
        self.assertEqual(received.count(b"250 relay.test\r\n"), 1)  # the HELO
        self.assertTrue(received.endswith(b"250 STARTTLS\r\n" + self.junk_goodbye), received)
        line = await self.ended()
        self.assertEqual(line["outcome"], "protocol-error")

    async def test_rset_help_vrfy_and_refused_commands_are_junk(self) -> None:
        port = await self.listen(max_junk_commands=4)

        def client() -> bytes:
            conn = self.connect(port)
            conn.sendall(b"RSET\r\nHELP\r\nVRFY bob\r\nMAIL FROM:<a@example.test>\r\nNOOP\r\n")
            return recv_all(conn)

        received = await self.in_thread(client)

        self.assertEqual(
            received,
            b"250 2.0.0 Ok\r\n"
            b"214 2.0.0 Commands: EHLO HELO STARTTLS AUTH MAIL RCPT DATA RSET NOOP QUIT\r\n"
            b"502 5.5.1 Error: command not implemented\r\n"
            b"530 5.7.0 Authentication required\r\n" + self.junk_goodbye,
        )
        await self.ended()

    async def test_recipients_the_router_refuses_before_one_is_accepted_are_junk(self) -> None:
        # An MX client probing addresses asks the Router each time: bounded like NOOPs
        # (Postfix counts refused recipients towards its smtpd_hard_error_limit).
        def answer(request: Any) -> Any:
            raise Reject("no such user", code="550 5.1.1")

        port = await self.listen(Router(answer=answer, verifies_passwords=True), auth=["none"], max_junk_commands=2)

        def client() -> bytes:
            conn = self.connect(port)
            self.hello(conn)
            conn.sendall(b"MAIL FROM:<a@example.test>\r\n" + b"".join(b"RCPT TO:<u%d@example.test>\r\n" % n for n in range(5)))
            return recv_all(conn)

        received = await self.in_thread(client)

        self.assertEqual(received, b"250 2.1.0 Ok\r\n" + b"550 5.1.1 no such user\r\n" * 3 + self.junk_goodbye)
        line = await self.ended()
        self.assertEqual(line["outcome"], "protocol-error")

    async def test_malformed_commands_are_errors_not_junk(self) -> None:
        port = await self.listen(max_junk_commands=1, max_errors=3)

        def client() -> bytes:
            conn = self.connect(port)
            conn.sendall(b"XYZZY\r\nEHLO\r\nXYZZY\r\n")
            return recv_all(conn)

        received = await self.in_thread(client)

        self.assertTrue(received.endswith(b"421 4.7.0 relay.test Error: too many errors\r\n"), received)
        line = await self.ended()
        self.assertEqual(line["reason"], "3 malformed or unknown commands")

    async def test_with_auth_none_the_deadline_runs_until_the_first_accepted_rcpt(self) -> None:
        upstream = self.upstream()
        refused_once: list[str] = []

        def answer(request: Any) -> Any:
            if not refused_once:  # the first recipient is refused: not routed yet
                refused_once.append(request.rcpt_to)
                raise Reject("no such user", code="550 5.1.1")
            return deferLater(self.clock, DEADLINE + 20, lambda: Route(host="127.0.0.1", port=upstream.port, login="none"))

        router = Router(answer=answer, verifies_passwords=True)
        port = await self.listen(router, auth=["none"], login_deadline=DEADLINE, router_timeout=300)

        def client() -> list[bytes]:
            conn = self.connect(port)
            self.hello(conn)
            replies = []
            for command in (b"MAIL FROM:<a@example.test>", b"RCPT TO:<nobody@example.test>", b"RCPT TO:<bob@example.test>"):
                conn.sendall(command + b"\r\n")
                replies.append(raw_reply(conn))
            conn.sendall(b"QUIT\r\n")
            replies.append(raw_reply(conn))
            return replies

        talking = self.in_thread(client)
        await self.eventually(lambda: len(router.requests) == 2, "the second recipient was not routed")
        self.clock.advance(DEADLINE)  # the deadline passes while the Router thinks
        self.clock.advance(20)  # it routes the recipient
        replies = await talking

        self.assertEqual(
            replies[:2], [b"250 2.1.0 Ok\r\n", b"550 5.1.1 no such user\r\n"]
        )  # then the routed RCPT, answered by the upstream after the deadline
        self.assertEqual(replies[2][:1], b"2", replies)
        self.assertEqual(replies[3], b"221 2.0.0 bye\r\n")
        line = await self.ended()
        self.assertEqual(line["outcome"], "closed")

    async def test_the_deadline_counts_the_tls_handshake(self) -> None:
        port = await self.listen(mode="tls", login_deadline=60, handshake_timeout=DEADLINE)
        conn = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        self.addCleanup(conn.close)
        await self.eventually(self.session_timers, "mailrelay did not accept the connection")

        self.clock.advance(60)  # no ClientHello: the handshake never ends

        def rest() -> bytes:
            try:
                return recv_all(conn)
            except ConnectionResetError:
                return b""

        self.assertEqual(await self.in_thread(rest), b"")
        line = await self.ended()
        self.assertEqual((line["outcome"], line["reason"]), ("login-timeout", "not logged in within 60s (in a TLS handshake)"))

    async def test_over_implicit_tls_the_deadline_goodbye_is_said_inside_tls(self) -> None:
        # A deadline shorter than the 60 s of silence allowed, so that it is the deadline.
        port = await self.listen(mode="tls", login_deadline=30, max_junk_commands=1000)

        def greeted() -> ssl.SSLSocket:
            raw = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
            conn: ssl.SSLSocket = self.context.wrap_socket(raw, server_hostname="relay.test")
            self.addCleanup(conn.close)
            read_line(conn)
            return conn

        def rest(conn: ssl.SSLSocket) -> bytes:
            received = b""
            while line := read_line(conn):
                received += line
            return received

        conn = await self.in_thread(greeted)
        self.clock.advance(30)

        self.assertEqual(await self.in_thread(rest, conn), self.timeout_goodbye)
        line = await self.ended()
        self.assertEqual(line["outcome"], "login-timeout")


class IMAPPreLoginTests(PreLoginTests):
    __test__ = True
    protocol = "imap"
    noop = b"n NOOP\r\n"
    noop_reply = b"n OK NOOP completed\r\n"
    timeout_goodbye = b"* BYE Disconnected for inactivity\r\n"
    junk_goodbye = b"* BYE Too many commands\r\n"
    quit = b"q LOGOUT\r\n"
    quit_reply = b"* BYE Logging out\r\nq OK LOGOUT completed\r\n"
    login_refused = b"a NO [AUTHENTICATIONFAILED] " + REFUSED.encode() + b"\r\n"

    def upstream(self) -> ThreadedServer:
        return self.server(ScriptedIMAP(users={USER: PASSWORD}))

    def login_line(self, password: str = PASSWORD) -> bytes:
        return f'a LOGIN "{USER}" "{password}"\r\n'.encode()

    def read_login_reply(self, conn: Any) -> bytes:
        return read_tagged(conn, b"a")

    def logged_in(self, reply: bytes) -> bool:
        return reply.endswith(b"a OK [CAPABILITY IMAP4rev1 IDLE MOVE] Logged in\r\n")

    def leave_upstream(self, conn: Any) -> bytes:
        conn.sendall(b"z LOGOUT\r\n")
        reply = read_tagged(conn, b"z")
        assert reply == b"* BYE upstream logging out\r\nz OK LOGOUT completed\r\n", reply
        conn.close()
        return reply

    def normal_client(self, port: int) -> Any:
        conn = self.connect(port)
        conn.sendall(b"c1 CAPABILITY\r\n")
        assert read_tagged(conn, b"c1").endswith(b"c1 OK CAPABILITY completed\r\n")
        conn.sendall(b"s STARTTLS\r\n")
        assert read_line(conn) == b"s OK Begin TLS negotiation now\r\n"
        tls = self.context.wrap_socket(conn, server_hostname="relay.test")
        self.addCleanup(tls.close)
        tls.sendall(b'c2 CAPABILITY\r\ni ID ("name" "test client")\r\n')
        assert read_tagged(tls, b"c2").endswith(b"c2 OK CAPABILITY completed\r\n")
        assert read_tagged(tls, b"i") == b"* ID NIL\r\ni OK ID completed\r\n"
        tls.sendall(self.login_line())
        reply = self.read_login_reply(tls)
        assert self.logged_in(reply), reply
        return tls

    async def test_a_third_capability_and_a_second_id_are_junk(self) -> None:
        port = await self.listen(max_junk_commands=1)

        def client() -> bytes:
            conn = self.connect(port)
            conn.sendall(b"c1 CAPABILITY\r\ni1 ID NIL\r\nc2 CAPABILITY\r\nc3 CAPABILITY\r\ni2 ID NIL\r\n")
            return recv_all(conn)

        received = await self.in_thread(client)

        self.assertEqual(received.count(b"OK CAPABILITY completed\r\n"), 3)
        self.assertTrue(received.endswith(b"c3 OK CAPABILITY completed\r\n" + self.junk_goodbye), received)
        self.assertNotIn(b"i2 OK", received)
        line = await self.ended()
        self.assertEqual(line["outcome"], "protocol-error")

    async def test_logins_refused_before_they_are_tried_are_junk(self) -> None:
        port = await self.listen(max_junk_commands=2, starttls="required")

        def client() -> bytes:
            conn = self.connect(port)
            conn.sendall(self.login_line() + b"b AUTHENTICATE PLAIN\r\n" + self.login_line())
            return recv_all(conn)

        received = await self.in_thread(client)

        refusal = b"NO [PRIVACYREQUIRED] Use STARTTLS first: logins are not accepted before TLS\r\n"
        self.assertEqual(received, b"a " + refusal + b"b " + refusal + self.junk_goodbye)
        await self.ended()


class POP3PreLoginTests(PreLoginTests):
    __test__ = True
    protocol = "pop3"
    noop = b"NOOP\r\n"
    noop_reply = b"+OK\r\n"
    timeout_goodbye = b"-ERR Disconnected for inactivity\r\n"
    junk_goodbye = b"-ERR Too many commands\r\n"
    quit = b"QUIT\r\n"
    quit_reply = b"+OK Bye\r\n"
    login_refused = b"-ERR [AUTH] " + REFUSED.encode() + b"\r\n"

    def upstream(self) -> ThreadedServer:
        return self.server(ScriptedPOP3())

    def login_line(self, password: str = PASSWORD) -> bytes:
        return b"AUTH PLAIN " + plain_ir(password=password) + b"\r\n"

    def read_login_reply(self, conn: Any) -> bytes:
        return read_line(conn)

    def logged_in(self, reply: bytes) -> bool:
        return reply == logged_in_reply(USER) + b"\r\n"

    def leave_upstream(self, conn: Any) -> bytes:
        conn.sendall(b"QUIT\r\n")
        reply = read_line(conn)
        assert reply == b"+OK Logging out.\r\n", reply
        conn.close()
        return reply

    def normal_client(self, port: int) -> Any:
        conn = self.connect(port)
        conn.sendall(b"CAPA\r\n")
        assert read_multiline(conn).startswith(b"+OK")
        conn.sendall(b"STLS\r\n")
        assert read_line(conn) == b"+OK Begin TLS negotiation now\r\n"
        tls = self.context.wrap_socket(conn, server_hostname="relay.test")
        self.addCleanup(tls.close)
        tls.sendall(b"CAPA\r\n")
        assert read_multiline(tls).startswith(b"+OK")
        tls.sendall(self.login_line())
        reply = self.read_login_reply(tls)
        assert self.logged_in(reply), reply
        return tls

    async def test_a_third_capa_is_junk(self) -> None:
        port = await self.listen(max_junk_commands=1)

        def client() -> bytes:
            conn = self.connect(port)
            conn.sendall(b"CAPA\r\n" * 4)
            return recv_all(conn)

        received = await self.in_thread(client)

        self.assertEqual(received.count(b"+OK Capability list follows\r\n"), 3)
        self.assertTrue(received.endswith(b".\r\n" + self.junk_goodbye), received)
        await self.ended()

    async def test_a_user_replacing_one_awaiting_its_pass_is_junk(self) -> None:
        port = await self.listen(max_junk_commands=1)

        def client() -> bytes:
            conn = self.connect(port)
            conn.sendall(b"USER a\r\nUSER b\r\nUSER c\r\n")
            return recv_all(conn)

        self.assertEqual(await self.in_thread(client), b"+OK\r\n+OK\r\n" + self.junk_goodbye)
        await self.ended()


# -- configuration -------------------------------------------------------------------

LISTENER = {"name": "imap", "listen": "tcp:143", "mode": "tls", "protocol": "imap"}


def config_errors(**listener: Any) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config({"router": {"type": "static", "host": "h", "port": 1}, "listener": [{**LISTENER, **listener}]}, "t")
    return [e for e in caught.value.errors if "login_deadline" in e or "max_junk_commands" in e]


def test_the_defaults_are_dovecots_three_minutes_and_twenty_junk_commands() -> None:
    assert (FrontEndConfig().login_deadline, FrontEndConfig().max_junk_commands) == (180.0, 20)


@pytest.mark.parametrize(
    "listener, expected",
    [
        ({"login_deadline": 0}, ["t: listener[0].login_deadline: must be a positive number of seconds, not 0"]),
        ({"login_deadline": "3m"}, ["t: listener[0].login_deadline: must be a number of seconds, not a string ('3m')"]),
        ({"max_junk_commands": 0}, ["t: listener[0].max_junk_commands: must be from 1 to 10000, not 0"]),
        ({"max_junk_commands": 10001}, ["t: listener[0].max_junk_commands: must be from 1 to 10000, not 10001"]),
        ({"max_junk_commands": 2.5}, ["t: listener[0].max_junk_commands: must be an integer, not a number (2.5)"]),
        (
            {"mode": "splice", "protocol": "none", "login_deadline": 10},
            [
                "t: listener[0].login_deadline: applies only to listeners with a mail protocol (smtp, imap, pop3),"
                ' not protocol "none"'
            ],
        ),
    ],
)
def test_bad_values_are_refused(listener: dict[str, Any], expected: list[str]) -> None:
    assert config_errors(**listener) == expected


def test_the_keys_are_read() -> None:
    config = parse_config(
        {
            "router": {"type": "static", "host": "h", "port": 1},
            "tls": {"cert": "cert.pem", "key": "key.pem"},  # read when the service starts
            "listener": [{**LISTENER, "protocol": "pop3", "login_deadline": 90, "max_junk_commands": 7}],
        },
        "t",
    )
    front_end = config.listeners[0].front_end
    assert (front_end.login_deadline, front_end.max_junk_commands) == (90.0, 7)
