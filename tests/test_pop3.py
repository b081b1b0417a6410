"""
The POP3 front-end over real sockets and real TLS, with Python's poplib (or raw bytes
where a client library would hide what matters) as the client and a scripted POP3
server as the upstream, which records every line it hears.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import poplib
import re
import socket
import ssl
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import Clock, deferLater

from mailrelay.router import Reject, Route, RouteRequest
from tests.support.frontends import PASSWORD, USER, FrontEndTestCase, Router, password_check, plain_ir
from tests.support.net import WAIT, ThreadedServer, closed_port, read_line, recv_all
from tests.support.pop3 import MESSAGE, Heard, ScriptedPOP3, capabilities, logged_in_reply, read_multiline, stuffed

GREETING = b"+OK relay.test POP3 ready\r\n"
PLAIN = plain_ir()
"""The AUTH PLAIN initial response of USER and PASSWORD."""
OWN = ["RESP-CODES", "AUTH-RESP-CODE"]
"""What the front-end advertises of itself, after the configured capabilities."""


class POP3TestCase(FrontEndTestCase):
    protocol = "pop3"

    def upstream(self, **options: Any) -> ThreadedServer:
        return self.server(ScriptedPOP3(**options))

    def raw(self, port: int, greeting: bytes = GREETING) -> socket.socket:
        """A plaintext client, its greeting read (and checked when `greeting` is given)."""
        conn = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        self.addCleanup(conn.close)
        first = read_line(conn)
        if greeting:
            self.assertEqual(first, greeting)
        return conn

    def stls(self, conn: socket.socket) -> ssl.SSLSocket:
        """STLS on a plaintext client; the TLS socket."""
        conn.sendall(b"STLS\r\n")
        self.assertEqual(read_line(conn), b"+OK Begin TLS negotiation now\r\n")
        tls = self.context.wrap_socket(conn, server_hostname="relay.test")
        self.addCleanup(tls.close)
        return tls

    def tls_connect(self, port: int, greeting: bytes = GREETING) -> ssl.SSLSocket:
        """A client of an implicit-TLS listener, its greeting read (and checked)."""
        raw = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        self.addCleanup(raw.close)
        conn = self.context.wrap_socket(raw, server_hostname="relay.test")
        self.addCleanup(conn.close)
        first = read_line(conn)
        if greeting:
            self.assertEqual(first, greeting)
        return conn

    def tls_exchange(self, port: int, send: bytes) -> bytes:
        """Over implicit TLS: `send` in one write; everything received until the close."""
        conn = self.tls_connect(port)
        conn.sendall(send)
        return recv_all(conn)

    def pop(self, port: int, mode: str = "starttls") -> poplib.POP3:
        """A poplib client through TLS (STLS or implicit), closed after the test."""
        if mode == "tls":
            client: poplib.POP3 = poplib.POP3_SSL("127.0.0.1", port, timeout=WAIT, context=self.context)
        else:
            client = poplib.POP3("127.0.0.1", port, timeout=WAIT)
        self.addCleanup(client.close)  # a failing test leaves no session for stopService to wait for
        if mode != "tls":
            client.stls(self.context)
        return client

    def serves(self, port: int, mode: str = "starttls") -> bytes:
        """A new session: greeting, NOOP and QUIT, everything it answered."""
        conn = self.tls_connect(port) if mode == "tls" else self.raw(port)
        conn.sendall(b"NOOP\r\nQUIT\r\n")
        return recv_all(conn)

    async def session_lines(self, count: int = 1, within: float = WAIT) -> list[Any]:
        """The first `count` session lines, once logged (within `within` seconds)."""
        for _ in range(int(within / 0.01)):
            if len(self.logs.sessions()) >= count:
                return self.logs.sessions()
            await deferLater(reactor, 0.01)
        self.fail(f"fewer than {count} session lines were logged")


class GreetingAndCapabilityTests(POP3TestCase):
    async def test_the_greeting_names_the_host_and_carries_no_timestamp_without_apop(self) -> None:
        port = await self.proxy(Router())
        self.assertEqual(await self.in_thread(self.serves, port), b"+OK\r\n+OK Bye\r\n")  # self.raw checks GREETING

    async def test_with_apop_the_greeting_carries_a_timestamp_new_for_each_connection(self) -> None:
        port = await self.proxy(Router(), auth=["plain", "apop"])

        def greetings() -> list[bytes]:
            found = []
            for _ in range(2):
                with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as conn:
                    found.append(read_line(conn))
            return found

        first, second = await self.in_thread(greetings)
        pattern = rb"\+OK relay\.test POP3 ready (<[0-9]+\.[0-9]+@relay\.test>)\r\n"
        self.assertRegex(first, b"^" + pattern + b"$")
        self.assertRegex(second, b"^" + pattern + b"$")
        self.assertNotEqual(re.match(pattern, first)[1], re.match(pattern, second)[1])  # type: ignore[index]

    async def capa(self, port: int, mode: str = "starttls", stls: bool = False) -> list[str]:
        def client() -> list[str]:
            conn: Any = self.tls_connect(port, greeting=b"") if mode == "tls" else self.raw(port, greeting=b"")
            if stls:
                conn = self.stls(conn)
            conn.sendall(b"CAPA\r\n")
            return capabilities(read_multiline(conn))

        return await self.in_thread(client)

    async def test_an_optional_listener_offers_logins_and_stls_then_no_stls_inside_tls(self) -> None:
        port = await self.proxy(Router(), starttls="optional", auth=["plain", "login", "cram-md5"])
        self.assertEqual(await self.capa(port), ["TOP", "UIDL", *OWN, "USER", "SASL PLAIN LOGIN CRAM-MD5", "STLS"])
        self.assertEqual(await self.capa(port, stls=True), ["TOP", "UIDL", *OWN, "USER", "SASL PLAIN LOGIN CRAM-MD5"])

    async def test_a_required_listener_offers_only_stls_before_tls(self) -> None:
        port = await self.proxy(Router())
        self.assertEqual(await self.capa(port), ["TOP", "UIDL", *OWN, "STLS"])
        self.assertEqual(await self.capa(port, stls=True), ["TOP", "UIDL", *OWN, "USER", "SASL PLAIN LOGIN"])

    async def test_implicit_tls_offers_the_logins_and_no_stls(self) -> None:
        port = await self.proxy(Router(), mode="tls", auth=["plain", "xoauth2", "apop"])
        # APOP is no SASL mechanism: it is not listed, the greeting's timestamp says it.
        self.assertEqual(await self.capa(port, mode="tls"), ["TOP", "UIDL", *OWN, "USER", "SASL PLAIN XOAUTH2"])

        port = await self.proxy(Router(), mode="tls")
        reply = await self.in_thread(self.tls_exchange, port, b"STLS\r\nQUIT\r\n")
        self.assertEqual(reply, b"-ERR TLS is already active\r\n+OK Bye\r\n")

    async def test_without_password_logins_user_is_not_offered_and_refused(self) -> None:
        port = await self.proxy(Router(), mode="tls", auth=["cram-md5"])
        self.assertEqual(await self.capa(port, mode="tls"), ["TOP", "UIDL", *OWN, "SASL CRAM-MD5"])

        def client() -> bytes:
            return self.tls_exchange(port, b"USER alice\r\nAUTH PLAIN " + PLAIN + b"\r\nQUIT\r\n")

        self.assertEqual(
            await self.in_thread(client),
            b"-ERR USER is disabled: use AUTH\r\n-ERR Unsupported authentication mechanism\r\n+OK Bye\r\n",
        )

    async def test_configured_capabilities_replace_top_and_uidl(self) -> None:
        port = await self.proxy(Router(), starttls="optional", capabilities=["PIPELINING", "EXPIRE NEVER"])
        self.assertEqual(await self.capa(port), ["PIPELINING", "EXPIRE NEVER", *OWN, "USER", "SASL PLAIN LOGIN", "STLS"])


class LoginTests(POP3TestCase):
    async def retrieve(
        self, upstream: ThreadedServer, mode: str = "starttls", router: Router | None = None, **route: Any
    ) -> tuple[Router, Heard, Any]:
        """USER and PASS with poplib, then LIST and RETR 1 and QUIT."""
        router = router or Router(answer=password_check(upstream.port, **route))
        port = await self.proxy(router, mode=mode)

        def client() -> Any:
            pop = self.pop(port, mode)
            try:
                replies = [pop.user(USER), pop.pass_(PASSWORD)]
                listed = pop.list()
                retrieved = pop.retr(1)
            finally:
                quit = pop.quit()
            return replies, listed, retrieved, quit

        result = await self.in_thread(client)
        heard: Heard = await self.in_thread(upstream.result)
        return router, heard, result

    async def test_user_pass_after_stls_then_list_and_retr_byte_exact(self) -> None:
        upstream = self.upstream()
        router, heard, (replies, listed, retrieved, quit) = await self.retrieve(upstream)

        self.assertEqual(replies, [b"+OK", logged_in_reply(USER)])  # PASS is answered with the upstream's own +OK
        self.assertEqual(listed, (b"+OK 1 messages:", [b"1 %d" % len(MESSAGE)], len(b"1 %d\r\n" % len(MESSAGE))))
        response, lines, octets = retrieved
        self.assertEqual(response, b"+OK %d octets" % len(MESSAGE))
        self.assertTrue(b"".join(line + b"\r\n" for line in lines) == MESSAGE, lines)
        self.assertEqual(octets, len(MESSAGE))  # poplib counts the unstuffed lines
        self.assertEqual(quit, b"+OK Logging out.")
        self.assertEqual(heard.lines, [b"CAPA\r\n", b"AUTH PLAIN " + PLAIN + b"\r\n", b"LIST\r\n", b"RETR 1\r\n", b"QUIT\r\n"])
        self.assertEqual(heard.login, USER)
        [request] = router.requests
        self.assertEqual(
            (request.user, request.password, request.auth_method, request.protocol, request.mode, request.tls, request.attempt),
            (USER, PASSWORD, "plain", "pop3", "starttls", True, 1),
        )
        self.assertIsNone(request.salt)
        [line] = await self.session_lines()
        self.assertEqual((line["user"], line["upstream"], line["outcome"]), (USER, f"127.0.0.1:{upstream.port}", "closed"))
        self.assertNotIn(PASSWORD, self.everything_logged())
        self.assertNotIn(PLAIN.decode(), self.everything_logged())

    async def test_an_upstream_without_sasl_plain_hears_user_and_pass(self) -> None:
        upstream = self.upstream(capabilities=("USER", "TOP", "UIDL"))
        _, heard, (replies, _, retrieved, _) = await self.retrieve(upstream, mode="tls")

        self.assertEqual(replies, [b"+OK", logged_in_reply(USER)])
        self.assertEqual(retrieved[1][:2], MESSAGE.split(b"\r\n")[:2])
        self.assertEqual(
            heard.lines[:3], [b"CAPA\r\n", b"USER " + USER.encode() + b"\r\n", b"PASS " + PASSWORD.encode() + b"\r\n"]
        )

    async def test_the_route_can_ask_for_user_and_pass_upstream(self) -> None:
        upstream = self.upstream()  # offers SASL PLAIN
        _, heard, (replies, _, _, _) = await self.retrieve(upstream, mode="tls", auth_mechanism="login")

        self.assertEqual(replies[1], logged_in_reply(USER))
        self.assertEqual(
            heard.lines[:3], [b"CAPA\r\n", b"USER " + USER.encode() + b"\r\n", b"PASS " + PASSWORD.encode() + b"\r\n"]
        )

    async def test_a_routes_user_and_password_replace_the_clients(self) -> None:
        master = "proxy@example.test"
        upstream = self.upstream(users={master: "master-secret"})
        router = Router(port=upstream.port, user=master, password="master-secret")
        _, heard, (replies, _, retrieved, _) = await self.retrieve(upstream, router=router)

        self.assertEqual(replies[1], logged_in_reply(master))
        self.assertEqual(heard.lines[1], b"AUTH PLAIN " + plain_ir(master, "master-secret") + b"\r\n")
        self.assertEqual(retrieved[2], len(MESSAGE))

    async def test_upstream_stls_then_the_login_inside_tls(self) -> None:
        issued = self.pki.issue("upstream", "upstream.test")
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(issued.cert, issued.key)
        upstream = self.upstream(tls=tls)
        router = Router(port=upstream.port, tls="starttls", server_name="upstream.test", tls_ca=self.pki.ca_file)
        port = await self.proxy(router, mode="tls")

        def client() -> Any:
            pop = self.pop(port, "tls")
            pop.user(USER)
            reply = pop.pass_(PASSWORD)
            pop.quit()
            return reply

        self.assertEqual(await self.in_thread(client), logged_in_reply(USER))
        heard = await self.in_thread(upstream.result)
        self.assertTrue(heard.tls)
        self.assertEqual(heard.lines, [b"CAPA\r\n", b"STLS\r\n", b"CAPA\r\n", b"AUTH PLAIN " + PLAIN + b"\r\n", b"QUIT\r\n"])


class SASLTests(POP3TestCase):
    """AUTH and APOP over implicit TLS, in raw bytes."""

    async def login(self, send: bytes, router: Router, **listener: Any) -> bytes:
        """`send` in one write (then QUIT); everything received until the close."""
        listener.setdefault("auth", ["plain", "login", "cram-md5"])
        port = await self.proxy(router, mode="tls", **listener)
        return await self.in_thread(self.tls_exchange, port, send + b"QUIT\r\n")

    async def test_auth_plain_with_an_initial_response(self) -> None:
        upstream = self.upstream()
        router = Router(answer=password_check(upstream.port))
        reply = await self.login(b"AUTH PLAIN " + PLAIN + b"\r\n", router)

        self.assertEqual(reply, logged_in_reply(USER) + b"\r\n+OK Logging out.\r\n")
        [request] = router.requests
        self.assertEqual((request.user, request.password, request.auth_method), (USER, PASSWORD, "plain"))
        self.assertEqual((await self.in_thread(upstream.result)).lines[1], b"AUTH PLAIN " + PLAIN + b"\r\n")

    async def test_auth_plain_with_a_continuation(self) -> None:
        upstream = self.upstream()
        router = Router(answer=password_check(upstream.port))
        reply = await self.login(b"AUTH PLAIN\r\n" + PLAIN + b"\r\n", router)

        self.assertEqual(reply, b"+ \r\n" + logged_in_reply(USER) + b"\r\n+OK Logging out.\r\n")
        self.assertEqual(router.requests[0].auth_method, "plain")

    async def test_auth_login(self) -> None:
        upstream = self.upstream()
        router = Router(answer=password_check(upstream.port))
        reply = await self.login(
            b"AUTH LOGIN\r\n" + base64.b64encode(USER.encode()) + b"\r\n" + base64.b64encode(PASSWORD.encode()) + b"\r\n",
            router,
        )

        self.assertEqual(reply, b"+ VXNlcm5hbWU6\r\n+ UGFzc3dvcmQ6\r\n" + logged_in_reply(USER) + b"\r\n+OK Logging out.\r\n")
        [request] = router.requests
        self.assertEqual((request.user, request.password, request.auth_method), (USER, PASSWORD, "login"))
        self.assertEqual((await self.in_thread(upstream.result)).lines[1], b"AUTH PLAIN " + PLAIN + b"\r\n")

    async def test_auth_cram_md5_logs_in_upstream_with_the_password_the_route_supplies(self) -> None:
        upstream = self.upstream()
        router = Router(answer=password_check(upstream.port))
        port = await self.proxy(router, mode="tls", auth=["plain", "cram-md5"])

        def client() -> list[bytes]:
            conn = self.tls_connect(port)
            conn.sendall(b"AUTH CRAM-MD5\r\n")
            challenge_line = read_line(conn)
            challenge = base64.b64decode(challenge_line[2:])
            digest = hmac.new(PASSWORD.encode(), challenge, hashlib.md5).hexdigest()
            conn.sendall(base64.b64encode(f"{USER} {digest}".encode()) + b"\r\nQUIT\r\n")
            return [challenge_line, challenge, digest.encode(), recv_all(conn)]

        challenge_line, challenge, digest, rest = await self.in_thread(client)
        self.assertTrue(challenge_line.startswith(b"+ ") and challenge_line.endswith(b"\r\n"), challenge_line)
        self.assertRegex(challenge, rb"^<[0-9]+\.[0-9]+@relay\.test>$")
        self.assertEqual(rest, logged_in_reply(USER) + b"\r\n+OK Logging out.\r\n")
        [request] = router.requests
        self.assertEqual(
            (request.user, request.password, request.auth_method, request.salt),
            (USER, digest.decode(), "cram-md5", challenge.decode()),
        )
        self.assertRegex(digest, rb"^[0-9a-f]{32}$")
        self.assertEqual((await self.in_thread(upstream.result)).lines[1], b"AUTH PLAIN " + PLAIN + b"\r\n")

    async def test_a_cram_md5_login_without_a_password_from_the_route_is_a_temporary_failure(self) -> None:
        upstream = self.upstream()
        port = await self.proxy(Router(port=upstream.port), mode="tls", auth=["cram-md5"])

        def client() -> bytes:
            conn = self.tls_connect(port)
            conn.sendall(b"AUTH CRAM-MD5\r\n")
            challenge = base64.b64decode(read_line(conn)[2:])
            digest = hmac.new(PASSWORD.encode(), challenge, hashlib.md5).hexdigest()
            conn.sendall(base64.b64encode(f"{USER} {digest}".encode()) + b"\r\nQUIT\r\n")
            return recv_all(conn)

        self.assertEqual(
            await self.in_thread(client), b"-ERR [SYS/TEMP] Mail server temporarily unavailable, try again later\r\n+OK Bye\r\n"
        )
        self.assertIn("a cram-md5 login cannot be passed through", "\n".join(self.logs.lines()))

    async def test_auth_alone_lists_mechanisms_star_cancels_and_bad_base64_is_an_error(self) -> None:
        router = Router()
        reply = await self.login(
            b"AUTH\r\n"
            b"AUTH PLAIN\r\n*\r\n"
            b"AUTH LOGIN\r\n*\r\n"
            b"AUTH PLAIN not*base64\r\n"
            b"AUTH LOGIN\r\n!!!\r\n"
            b"AUTH PLAIN " + base64.b64encode(b"only-one-part") + b"\r\n"
            b"AUTH GSSAPI\r\n"
            b"AUTH XOAUTH2 =\r\n"
            b"NOOP\r\n",
            router,
            max_errors=10,
        )
        self.assertEqual(
            reply,
            b"+OK\r\nPLAIN\r\nLOGIN\r\nCRAM-MD5\r\n.\r\n"
            b"+ \r\n-ERR Authentication cancelled\r\n"
            b"+ VXNlcm5hbWU6\r\n-ERR Authentication cancelled\r\n"
            b"-ERR Invalid authentication: invalid base64 in the response\r\n"
            b"+ VXNlcm5hbWU6\r\n-ERR Invalid authentication: invalid base64 in the response\r\n"
            b"-ERR Invalid authentication: PLAIN response is not authzid NUL user NUL password\r\n"
            b"-ERR Unsupported authentication mechanism\r\n"
            b"-ERR Unsupported authentication mechanism\r\n"
            b"+OK\r\n+OK Bye\r\n",
        )
        self.assertEqual(router.requests, [])

    async def test_apop_digest_reaches_the_router_and_the_routes_password_logs_in_upstream(self) -> None:
        upstream = self.upstream()
        router = Router(answer=password_check(upstream.port))
        port = await self.proxy(router, mode="tls", auth=["plain", "apop"])

        def client() -> Any:
            pop = self.pop(port, "tls")
            reply = pop.apop(USER, PASSWORD)
            count = pop.stat()
            pop.quit()
            return pop.getwelcome(), reply, count

        welcome, reply, count = await self.in_thread(client)
        self.assertEqual((reply, count), (logged_in_reply(USER), (1, len(MESSAGE))))
        timestamp = re.fullmatch(rb"\+OK relay\.test POP3 ready (<[0-9]+\.[0-9]+@relay\.test>)", welcome)
        assert timestamp is not None, welcome
        [request] = router.requests
        self.assertEqual(
            (request.user, request.password, request.auth_method, request.salt),
            (USER, hashlib.md5(timestamp[1] + PASSWORD.encode()).hexdigest(), "apop", timestamp[1].decode()),
        )
        heard = await self.in_thread(upstream.result)
        self.assertEqual(heard.lines, [b"CAPA\r\n", b"AUTH PLAIN " + PLAIN + b"\r\n", b"STAT\r\n", b"QUIT\r\n"])

    async def test_apop_is_refused_when_not_configured_or_malformed(self) -> None:
        router = Router()
        digest = b"0123456789abcdef0123456789abcdef"
        reply = await self.login(b"APOP " + USER.encode() + b" " + digest + b"\r\nNOOP\r\n", router)
        self.assertEqual(reply, b"-ERR APOP is not available\r\n+OK\r\n+OK Bye\r\n")

        port = await self.proxy(router, mode="tls", auth=["apop"])

        def client() -> bytes:
            conn = self.tls_connect(port, greeting=b"")
            conn.sendall(b"APOP alice 0123\r\nAPOP " + digest + b"\r\nQUIT\r\n")
            return recv_all(conn)

        reply = await self.in_thread(client)
        self.assertEqual(reply, b"-ERR APOP takes a user name and a 32-digit hexadecimal digest\r\n" * 2 + b"+OK Bye\r\n")
        self.assertEqual(router.requests, [])

    async def test_mechanisms_not_configured_are_refused(self) -> None:
        router = Router()
        reply = await self.login(b"AUTH CRAM-MD5\r\nAUTH EXTERNAL =\r\n", router, auth=["plain"])
        self.assertEqual(reply, b"-ERR Unsupported authentication mechanism\r\n" * 2 + b"+OK Bye\r\n")
        self.assertEqual(router.requests, [])


class LongLineTests(POP3TestCase):
    async def test_xoauth2_with_a_6000_byte_token_as_initial_response(self) -> None:
        token = "ya29." + "T" * 5995  # nginx's POP3 front-end stops at 128 bytes
        upstream = self.upstream(users={USER: token}, capabilities=("USER", "SASL PLAIN XOAUTH2"))
        router = Router(port=upstream.port)
        port = await self.proxy(router, mode="tls", auth=["plain", "xoauth2"])
        initial = base64.b64encode(f"user={USER}\x01auth=Bearer {token}\x01\x01".encode())
        self.assertGreater(len(initial), 8000)

        reply = await self.in_thread(self.tls_exchange, port, b"AUTH XOAUTH2 " + initial + b"\r\nSTAT\r\nQUIT\r\n")
        self.assertEqual(reply, logged_in_reply(USER) + b"\r\n+OK 1 %d\r\n+OK Logging out.\r\n" % len(MESSAGE))
        [request] = router.requests
        self.assertEqual((request.user, request.password, request.auth_method), (USER, token, "xoauth2"))
        heard = await self.in_thread(upstream.result)
        self.assertEqual(heard.lines[1], b"AUTH XOAUTH2 " + initial + b"\r\n")
        self.assertNotIn(token, self.everything_logged())

    async def test_a_100_kb_line_is_an_error_and_the_session_goes_on(self) -> None:
        router = Router()
        port = await self.proxy(router, mode="tls")
        reply = await self.in_thread(self.tls_exchange, port, b"USER " + b"x" * 100_000 + b"\r\nNOOP\r\nCAPA\r\nQUIT\r\n")
        self.assertEqual(
            reply,
            b"-ERR Line too long\r\n+OK\r\n+OK Capability list follows\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\n"
            b"USER\r\nSASL PLAIN LOGIN\r\n.\r\n+OK Bye\r\n",
        )
        self.assertEqual(router.requests, [])


class StartTLSSecurityTests(POP3TestCase):
    async def test_commands_sent_in_plaintext_behind_stls_are_discarded(self) -> None:
        router = Router()
        port = await self.proxy(router, starttls="optional")

        def client() -> list[bytes]:
            conn = self.raw(port)
            conn.sendall(b"STLS\r\nUSER evil\r\nPASS x\r\n")
            go_ahead = read_line(conn)
            tls = self.context.wrap_socket(conn, server_hostname="relay.test")
            # Had USER been run, PASS would log in; had either been answered, one more reply would come.
            tls.sendall(b"PASS x\r\nNOOP\r\nQUIT\r\n")
            return [go_ahead, recv_all(tls)]

        self.assertEqual(
            await self.in_thread(client),
            [b"+OK Begin TLS negotiation now\r\n", b"-ERR Send USER first\r\n+OK\r\n+OK Bye\r\n"],
        )
        self.assertEqual(router.requests, [])
        [warning] = [e for e in self.logs.events if "discarded" in e.get("log_format", "")]
        self.assertEqual(warning["log_level"].name, "warn")
        self.assertIn("discarded 19 byte(s) sent in plaintext after STARTTLS", self.logs.lines()[self.logs.events.index(warning)])

    async def test_a_user_given_before_stls_is_forgotten(self) -> None:
        router = Router()
        port = await self.proxy(router, starttls="optional")

        def client() -> bytes:
            conn = self.raw(port)
            conn.sendall(b"USER alice\r\n")
            self.assertEqual(read_line(conn), b"+OK\r\n")
            tls = self.stls(conn)
            tls.sendall(b"PASS x\r\nSTLS\r\nQUIT\r\n")
            return recv_all(tls)

        self.assertEqual(await self.in_thread(client), b"-ERR Send USER first\r\n-ERR TLS is already active\r\n+OK Bye\r\n")
        self.assertEqual(router.requests, [])

    async def test_logins_before_stls_are_refused_on_a_required_listener(self) -> None:
        router = Router()
        port = await self.proxy(router, auth=["plain", "login", "apop"])

        def client() -> bytes:
            conn = self.raw(port, greeting=b"")
            conn.sendall(
                b"USER " + USER.encode() + b"\r\nPASS " + PASSWORD.encode() + b"\r\nAUTH PLAIN " + PLAIN + b"\r\n"
                b"APOP alice 0123456789abcdef0123456789abcdef\r\nQUIT\r\n"
            )
            return recv_all(conn)

        self.assertEqual(
            await self.in_thread(client),
            b"-ERR [AUTH] Use STLS first: logins are not accepted before TLS\r\n" * 4 + b"+OK Bye\r\n",
        )
        self.assertEqual(router.requests, [])


class FailedLoginTests(POP3TestCase):
    async def test_a_wrong_password_is_refused_after_the_delay_and_the_connection_closes_after_max_attempts(self) -> None:
        upstream = self.upstream()
        router = Router(answer=password_check(upstream.port, wait=0.1))
        port = await self.proxy(router, mode="tls", max_attempts=2)

        def client() -> list[Any]:
            conn = self.tls_connect(port)
            replies: list[Any] = []
            for attempt in ("wrong-1", "wrong-2"):
                conn.sendall(b"USER " + USER.encode() + b"\r\n")
                replies.append(read_line(conn))
                started = time.monotonic()
                conn.sendall(b"PASS " + attempt.encode() + b"\r\n")
                replies.append(read_line(conn))
                replies.append(time.monotonic() - started)
            replies.append(recv_all(conn))
            return replies

        ok1, first, first_wait, ok2, second, second_wait, rest = await self.in_thread(client)
        self.assertEqual((ok1, ok2), (b"+OK\r\n", b"+OK\r\n"))
        self.assertEqual((first, second), (b"-ERR [AUTH] Invalid login\r\n", b"-ERR [AUTH] Invalid login\r\n"))
        self.assertGreaterEqual(min(first_wait, second_wait), 0.1)
        self.assertEqual(rest, b"")  # closed
        self.assertEqual([(r.attempt, r.password) for r in router.requests], [(1, "wrong-1"), (2, "wrong-2")])
        [line] = await self.session_lines()
        self.assertEqual((line["outcome"], line["reason"]), ("rejected", "Invalid login"))
        everything = self.everything_logged()
        self.assertNotIn("wrong-1", everything)
        self.assertNotIn("wrong-2", everything)
        self.assertIn(f"login refused for {USER} from 127.0.0.1", everything)
        self.assertEqual(upstream.connections, 0)

        def again() -> Any:
            pop = self.pop(port, "tls")
            pop.user(USER)
            reply = pop.pass_(PASSWORD)
            pop.quit()
            return reply

        self.assertEqual(await self.in_thread(again), logged_in_reply(USER))

    async def test_after_a_failure_the_client_may_try_again_and_succeed(self) -> None:
        upstream = self.upstream()
        port = await self.proxy(Router(answer=password_check(upstream.port)))

        def client() -> Any:
            pop = self.pop(port)
            pop.user(USER)
            with self.assertRaises(poplib.error_proto) as refused:
                pop.pass_("wrong")
            pop.user(USER)
            reply = pop.pass_(PASSWORD)
            count = pop.stat()
            pop.quit()
            return refused.exception.args[0], reply, count

        self.assertEqual(await self.in_thread(client), (b"-ERR [AUTH] Invalid login", logged_in_reply(USER), (1, len(MESSAGE))))

    async def upstream_refusal(self, login_failure: bytes, **listener: Any) -> bytes:
        """PASS answered by an upstream that refuses the login with `login_failure`,
        then NOOP (the session goes on) and QUIT."""
        upstream = self.upstream(users={USER: "another password"}, login_failure=login_failure)
        port = await self.proxy(Router(port=upstream.port), mode="tls", **listener)
        return await self.in_thread(
            self.tls_exchange, port, b"USER " + USER.encode() + b"\r\nPASS " + PASSWORD.encode() + b"\r\nNOOP\r\nQUIT\r\n"
        )

    async def test_an_upstream_refusing_the_login_is_an_auth_error_for_the_client(self) -> None:
        reply = await self.upstream_refusal(b"-ERR [AUTH] Authentication failed.")
        self.assertEqual(reply, b"+OK\r\n-ERR [AUTH] Authentication failed.\r\n+OK\r\n+OK Bye\r\n")
        self.assertIn("login refused for alice@example.test", "\n".join(self.logs.lines()))
        [line] = await self.session_lines()
        self.assertEqual(line["outcome"], "rejected")

    async def test_an_upstreams_temporary_failure_is_temporary_for_the_client(self) -> None:
        reply = await self.upstream_refusal(b"-ERR [SYS/TEMP] Internal error occurred. Refer to server log for more information.")
        self.assertEqual(
            reply, b"+OK\r\n-ERR [SYS/TEMP] Mail server temporarily unavailable, try again later\r\n+OK\r\n+OK Bye\r\n"
        )
        [line] = await self.session_lines()
        self.assertEqual(line["outcome"], "upstream-unavailable")
        self.assertIn("[SYS/TEMP] Internal error occurred", "\n".join(self.logs.lines()))

    async def test_a_mailbox_in_use_upstream_is_in_use_for_the_client_and_no_failed_login(self) -> None:
        # With max_attempts = 1 a failed login would close the connection: IN-USE does not.
        reply = await self.upstream_refusal(b"-ERR [IN-USE] Mailbox is locked by another POP3 session.", max_attempts=1)
        self.assertEqual(reply, b"+OK\r\n-ERR [IN-USE] Mailbox is locked by another POP3 session.\r\n+OK\r\n+OK Bye\r\n")
        self.assertNotIn("login refused", "\n".join(self.logs.lines()))


class ForwardClientTests(POP3TestCase):
    async def test_xclient_tells_a_trusting_upstream_the_clients_address_before_the_login(self) -> None:
        upstream = self.upstream(xclient=True)
        port = await self.proxy(Router(port=upstream.port, forward_client=True), mode="tls")

        def client() -> tuple[bytes, int]:
            pop = self.pop(port, "tls")
            pop.user(USER)
            reply = pop.pass_(PASSWORD)
            client_port = pop.sock.getsockname()[1]
            pop.quit()
            return reply, client_port

        reply, client_port = await self.in_thread(client)
        self.assertEqual(reply, logged_in_reply(USER))
        heard = await self.in_thread(upstream.result)
        [line] = await self.session_lines()
        self.assertEqual(
            heard.lines,
            [
                b"CAPA\r\n",
                b"XCLIENT ADDR=127.0.0.1 PORT=%d SESSION=%s\r\n" % (client_port, line["session_id"].encode()),
                b"AUTH PLAIN " + PLAIN + b"\r\n",
                b"QUIT\r\n",
            ],
        )

    async def test_an_upstream_without_xclient_makes_the_route_unusable(self) -> None:
        upstream = self.upstream()
        router = Router(port=upstream.port, forward_client=True)
        port = await self.proxy(router, mode="tls")
        reply = await self.in_thread(
            self.tls_exchange, port, b"USER " + USER.encode() + b"\r\nPASS " + PASSWORD.encode() + b"\r\nQUIT\r\n"
        )
        self.assertEqual(reply, b"+OK\r\n-ERR [SYS/TEMP] Mail server temporarily unavailable, try again later\r\n+OK Bye\r\n")
        self.assertIn("upstream does not offer XCLIENT", "\n".join(self.logs.lines()))
        heard = await self.in_thread(upstream.result)
        self.assertEqual(heard.lines, [b"CAPA\r\n"])  # nothing of the login was sent
        self.assertIsNone(heard.login)


class MalformedInputTests(POP3TestCase):
    async def exchange(self, send: bytes, **listener: Any) -> tuple[int, bytes]:
        """Over STLS: `send` in one write; everything received until the close."""
        router = Router()
        port = await self.proxy(router, **listener)

        def client() -> bytes:
            tls = self.stls(self.raw(port))
            tls.sendall(send)
            return recv_all(tls)

        reply = await self.in_thread(client)
        self.assertEqual(router.requests, [])
        return port, reply

    async def test_too_many_unknown_commands_close_the_connection(self) -> None:
        port, reply = await self.exchange(b"STAT\r\nRETR 1\r\nXYZZY\r\nNOOP\r\n", max_errors=3)
        self.assertEqual(reply, b"-ERR Unknown command or not valid before login\r\n" * 3 + b"-ERR Too many invalid commands\r\n")
        [line] = await self.session_lines()
        self.assertEqual(line["outcome"], "protocol-error")
        self.assertEqual(await self.in_thread(self.serves, port), b"+OK\r\n+OK Bye\r\n")

    async def test_pass_without_user_nul_and_empty_user_get_errors_and_the_session_goes_on(self) -> None:
        _, reply = await self.exchange(b"PASS x\r\nNO\0OP\r\nUSER\r\nUSER a\0b\r\nuser alice\r\nNOOP\r\nQUIT\r\n")
        self.assertEqual(
            reply,
            b"-ERR Send USER first\r\n-ERR Bare CR or NUL character in command\r\n-ERR USER takes a user name\r\n"
            b"-ERR Bare CR or NUL character in command\r\n+OK\r\n+OK\r\n+OK Bye\r\n",
        )

    async def test_silence_before_login_times_out(self) -> None:
        clock = Clock()
        port = await self.proxy(Router(), clock=clock, login_timeout=60)
        conn = await self.in_thread(self.raw, port)

        clock.advance(59)
        self.assertEqual(self.logs.sessions(), [])
        clock.advance(1)

        self.assertEqual(await self.in_thread(recv_all, conn), b"-ERR Disconnected for inactivity\r\n")
        [line] = await self.session_lines()
        self.assertEqual(line["outcome"], "idle-timeout")
        self.assertEqual(await self.in_thread(self.serves, port), b"+OK\r\n+OK Bye\r\n")

    async def test_quit_says_goodbye_and_closes(self) -> None:
        port, reply = await self.exchange(b"QUIT\r\nNOOP\r\n")
        self.assertEqual(reply, b"+OK Bye\r\n")
        [line] = await self.session_lines()
        self.assertEqual(line["outcome"], "closed")
        self.assertEqual(await self.in_thread(self.serves, port), b"+OK\r\n+OK Bye\r\n")


class PipeliningTests(POP3TestCase):
    async def test_commands_pipelined_behind_pass_reach_the_upstream_after_the_login(self) -> None:
        upstream = self.upstream()
        router = Router(answer=password_check(upstream.port))
        port = await self.proxy(router, mode="tls")
        reply = await self.in_thread(
            self.tls_exchange,
            port,
            b"CAPA\r\nUSER " + USER.encode() + b"\r\nPASS " + PASSWORD.encode() + b"\r\nSTAT\r\nRETR 1\r\nQUIT\r\n",
        )
        self.assertEqual(
            reply,
            b"+OK Capability list follows\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\nUSER\r\nSASL PLAIN LOGIN\r\n.\r\n"
            b"+OK\r\n" + logged_in_reply(USER) + b"\r\n"
            b"+OK 1 %d\r\n" % len(MESSAGE) + b"+OK %d octets\r\n" % len(MESSAGE) + stuffed(MESSAGE) + b".\r\n"
            b"+OK Logging out.\r\n",
        )
        heard = await self.in_thread(upstream.result)
        self.assertEqual(heard.lines, [b"CAPA\r\n", b"AUTH PLAIN " + PLAIN + b"\r\n", b"STAT\r\n", b"RETR 1\r\n", b"QUIT\r\n"])
        self.assertEqual(len(router.requests), 1)


class ImmediateAnswerTests(POP3TestCase):
    """
    A Router that answers at once (a plain function, as the static and map routers are):
    the failed login is answered, and the client's next lines read, from within the
    call that asked the Router. The session must stay as sound as with a Router that
    answers later. A test that fails here leaves a session that never ends, and a
    service that never stops: `timeout` bounds the wait.
    """

    async def leave_after(self, router: Router) -> tuple[bytes, list[Any]]:
        """USER and a wrong PASS, then the client goes away without QUIT: the reply, and
        the session line once logged."""
        port = await self.proxy(router, mode="tls")

        def client() -> bytes:
            conn = self.tls_connect(port)
            conn.sendall(b"USER " + USER.encode() + b"\r\nPASS wrong\r\n")
            replies = read_line(conn) + read_line(conn)
            conn.close()
            return replies

        reply = await self.in_thread(client)
        return reply, await self.session_lines(within=2)

    async def test_a_client_leaving_after_an_immediate_refusal_ends_its_session(self) -> None:
        def refuse(request: RouteRequest) -> Route:
            raise Reject("Invalid login")  # no wait

        reply, [line] = await self.leave_after(Router(answer=refuse))
        self.assertEqual(reply, b"+OK\r\n-ERR [AUTH] Invalid login\r\n")
        self.assertEqual((line["outcome"], line["reason"]), ("rejected", "Invalid login"))

    test_a_client_leaving_after_an_immediate_refusal_ends_its_session.timeout = 5  # type: ignore[attr-defined]

    async def test_a_client_leaving_after_an_immediate_router_failure_ends_its_session(self) -> None:
        def broken(request: RouteRequest) -> Route:
            raise RuntimeError("router bug")

        reply, [line] = await self.leave_after(Router(answer=broken))
        self.assertEqual(reply, b"+OK\r\n-ERR [SYS/TEMP] Temporary failure, try again later\r\n")
        self.assertEqual(line["outcome"], "router-error")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    test_a_client_leaving_after_an_immediate_router_failure_ends_its_session.timeout = 5  # type: ignore[attr-defined]

    async def test_a_client_leaving_after_a_delayed_refusal_ends_its_session(self) -> None:
        """The same as above with a Reject's wait: the Router's answer is acted on later."""

        def refuse(request: RouteRequest) -> Route:
            raise Reject("Invalid login", wait=0.05)

        reply, [line] = await self.leave_after(Router(answer=refuse))
        self.assertEqual(reply, b"+OK\r\n-ERR [AUTH] Invalid login\r\n")
        self.assertEqual((line["outcome"], line["reason"]), ("rejected", "Invalid login"))

    async def test_many_pipelined_logins_failing_at_once_are_each_answered(self) -> None:
        def broken(request: RouteRequest) -> Route:
            raise RuntimeError("router bug")

        port = await self.proxy(Router(answer=broken), mode="tls")
        count = 200  # temporary failures count as no attempt: nothing limits them but the client

        def client() -> bytes:
            conn = self.tls_connect(port)
            conn.sendall(b"USER u\r\nPASS p\r\n" * count + b"QUIT\r\n")
            conn.settimeout(3)
            received = b""
            try:
                while data := conn.recv(1 << 16):
                    received += data
            except TimeoutError:
                received += b"(no more replies)"
            return received

        reply = await self.in_thread(client)
        self.flushLoggedErrors(RuntimeError)
        self.assertEqual(reply, b"+OK\r\n-ERR [SYS/TEMP] Temporary failure, try again later\r\n" * count + b"+OK Bye\r\n")

    test_many_pipelined_logins_failing_at_once_are_each_answered.timeout = 7  # type: ignore[attr-defined]


class TemporaryFailureTests(POP3TestCase):
    async def test_a_router_failure_is_temporary(self) -> None:
        def broken(request: RouteRequest) -> Route:
            raise RuntimeError("router bug")

        port = await self.proxy(Router(answer=broken), mode="tls")
        reply = await self.in_thread(self.tls_exchange, port, b"USER " + USER.encode() + b"\r\nPASS p\r\nNOOP\r\nQUIT\r\n")
        self.assertEqual(reply, b"+OK\r\n-ERR [SYS/TEMP] Temporary failure, try again later\r\n+OK\r\n+OK Bye\r\n")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        [line] = await self.session_lines()
        self.assertEqual(line["outcome"], "router-error")

    async def test_an_unreachable_upstream_is_temporary_and_does_not_count_as_an_attempt(self) -> None:
        router = Router(port=closed_port())
        port = await self.proxy(router, mode="tls", max_attempts=1)
        login = b"USER " + USER.encode() + b"\r\nPASS " + PASSWORD.encode() + b"\r\n"
        reply = await self.in_thread(self.tls_exchange, port, login + login + b"NOOP\r\nQUIT\r\n")
        unavailable = b"+OK\r\n-ERR [SYS/TEMP] Mail server temporarily unavailable, try again later\r\n"
        self.assertEqual(reply, unavailable * 2 + b"+OK\r\n+OK Bye\r\n")
        self.assertEqual([r.attempt for r in router.requests], [1, 1])
        [line] = await self.session_lines()
        self.assertEqual(line["outcome"], "upstream-unavailable")


class BareCRAndNULTests(POP3TestCase):
    """A command line (CRLF or LF taken off) holding a CR or a NUL is an error, counted
    towards max_errors, and never acted on: no bare CR reaches an upstream."""

    async def exchange(self, send: bytes, **listener: Any) -> bytes:
        router = Router()
        port = await self.proxy(router, mode="tls", **listener)
        reply = await self.in_thread(self.tls_exchange, port, send)
        self.assertEqual(router.requests, [])
        return reply

    async def test_a_line_with_a_bare_cr_or_nul_is_an_error_and_not_acted_on(self) -> None:
        reply = await self.exchange(
            b"USER alice\r\r\nPASS " + PASSWORD.encode() + b"\r\nUSER al\rice\r\nCAPA\r\r\n"
            b"AUTH PLAIN " + PLAIN + b"\r\r\nUSER bob\0\r\nNOOP\r\nQUIT\r\n",
            max_errors=10,
        )
        bad = b"-ERR Bare CR or NUL character in command\r\n"
        # USER alice<CR> was not taken: the PASS after it has no USER.
        self.assertEqual(reply, bad + b"-ERR Send USER first\r\n" + bad * 4 + b"+OK\r\n+OK Bye\r\n")

    async def test_bare_crs_count_towards_max_errors(self) -> None:
        reply = await self.exchange(b"NOOP\r\r\nNOOP\r\r\nNOOP\r\n", max_errors=2)
        self.assertEqual(reply, b"-ERR Bare CR or NUL character in command\r\n" * 2 + b"-ERR Too many invalid commands\r\n")
        [line] = await self.session_lines()
        self.assertEqual(line["outcome"], "protocol-error")
