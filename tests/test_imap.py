"""
The IMAP front-end over real sockets and real TLS, with Python's imaplib (or raw bytes
where a client library would hide what matters: tags, literals, continuations, what is
sent in one write) as the client and a scripted IMAP server as the upstream, which
parses what it hears and records every byte of it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import imaplib
import socket
import ssl
import time
from typing import Any

from twisted.internet.task import Clock

from mailrelay.router import Reject, Route, RouteRequest
from tests.support.clocked import all_read
from tests.support.frontends import PASSWORD, USER, FrontEndTestCase, Router, password_check, plain_ir
from tests.support.imap import Heard, ScriptedIMAP, read_tagged
from tests.support.net import WAIT, ThreadedServer, closed_port, read_line, recv_all

LOGGED_IN = b" OK [CAPABILITY IMAP4rev1 IDLE MOVE] Logged in\r\n"
UNAVAILABLE = b" NO [UNAVAILABLE] Mail server temporarily unavailable, try again later\r\n"


class IMAPTestCase(FrontEndTestCase):
    protocol = "imap"

    def upstream(self, **options: Any) -> ThreadedServer:
        options.setdefault("users", {USER: PASSWORD})
        return self.server(ScriptedIMAP(**options))

    async def heard(self, upstream: ThreadedServer) -> Heard:
        heard: Heard = await self.in_thread(upstream.result)
        self.assertEqual(heard.early, [], "mailrelay sent a literal before the upstream's continuation")
        return heard

    def plain(self, port: int) -> socket.socket:
        """A raw plaintext client of a `starttls` listener, its greeting read."""
        conn = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        self.addCleanup(conn.close)
        self.assertTrue(read_line(conn).startswith(b"* OK [CAPABILITY IMAP4rev1 "))
        return conn

    def starttls(self, conn: socket.socket) -> ssl.SSLSocket:
        """STARTTLS on a raw client (tag `s`): the TLS socket."""
        conn.sendall(b"s STARTTLS\r\n")
        self.assertEqual(read_line(conn), b"s OK Begin TLS negotiation now\r\n")
        tls = self.context.wrap_socket(conn, server_hostname="relay.test")
        self.addCleanup(tls.close)
        return tls

    def tls(self, port: int) -> ssl.SSLSocket:
        """A raw client of an implicit-TLS listener, its greeting read."""
        raw = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        conn = self.context.wrap_socket(raw, server_hostname="relay.test")
        self.addCleanup(conn.close)
        self.assertTrue(read_line(conn).startswith(b"* OK [CAPABILITY IMAP4rev1 "))
        return conn

    def talk(self, conn: Any, send: bytes, tag: bytes) -> bytes:
        """Send `send` in one write; every line up to the one tagged `tag`."""
        conn.sendall(send)
        return read_tagged(conn, tag)


class GreetingTests(IMAPTestCase):
    async def test_an_optional_starttls_listener_offers_starttls_and_logins(self) -> None:
        port = await self.proxy(Router(), starttls="optional")

        def client() -> list[bytes]:
            with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as conn:
                greeting = read_line(conn)
                conn.sendall(b"c CAPABILITY\r\nl LOGOUT\r\n")
                return [greeting, recv_all(conn)]

        self.assertEqual(
            await self.in_thread(client),
            [
                b"* OK [CAPABILITY IMAP4rev1 LITERAL+ SASL-IR ID AUTH=PLAIN AUTH=LOGIN STARTTLS] relay.test IMAP4rev1 ready\r\n",
                b"* CAPABILITY IMAP4rev1 LITERAL+ SASL-IR ID AUTH=PLAIN AUTH=LOGIN STARTTLS\r\nc OK CAPABILITY completed\r\n"
                b"* BYE Logging out\r\nl OK LOGOUT completed\r\n",
            ],
        )

    async def test_a_required_listener_offers_no_login_before_tls_and_no_starttls_after(self) -> None:
        port = await self.proxy(Router(), auth=["plain", "login", "cram-md5"])

        def client() -> list[bytes]:
            conn = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
            self.addCleanup(conn.close)
            greeting = read_line(conn)
            before = self.talk(conn, b"c1 CAPABILITY\r\n", b"c1")
            tls = self.starttls(conn)
            after = self.talk(tls, b"c2 CAPABILITY\r\n", b"c2")
            again = self.talk(tls, b"s2 STARTTLS\r\n", b"s2")
            return [greeting, before, after, again]

        self.assertEqual(
            await self.in_thread(client),
            [
                b"* OK [CAPABILITY IMAP4rev1 LITERAL+ SASL-IR ID STARTTLS LOGINDISABLED] relay.test IMAP4rev1 ready\r\n",
                b"* CAPABILITY IMAP4rev1 LITERAL+ SASL-IR ID STARTTLS LOGINDISABLED\r\nc1 OK CAPABILITY completed\r\n",
                b"* CAPABILITY IMAP4rev1 LITERAL+ SASL-IR ID AUTH=PLAIN AUTH=LOGIN AUTH=CRAM-MD5\r\n"
                b"c2 OK CAPABILITY completed\r\n",
                b"s2 BAD TLS is already active\r\n",
            ],
        )

    async def test_an_implicit_tls_listener_offers_logins_and_no_starttls(self) -> None:
        port = await self.proxy(Router(), mode="tls")

        def client() -> list[bytes]:
            raw = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
            with self.context.wrap_socket(raw, server_hostname="relay.test") as conn:
                greeting = read_line(conn)
                conn.sendall(b"s STARTTLS\r\nl LOGOUT\r\n")
                return [greeting, recv_all(conn)]

        self.assertEqual(
            await self.in_thread(client),
            [
                b"* OK [CAPABILITY IMAP4rev1 LITERAL+ SASL-IR ID AUTH=PLAIN AUTH=LOGIN] relay.test IMAP4rev1 ready\r\n",
                b"s BAD TLS is already active\r\n* BYE Logging out\r\nl OK LOGOUT completed\r\n",
            ],
        )

    async def test_odd_but_valid_tags_are_echoed_exactly_and_invalid_ones_get_an_untagged_bad(self) -> None:
        port = await self.proxy(Router(), starttls="optional", max_errors=100)

        def client() -> bytes:
            conn = self.plain(port)
            conn.sendall(
                b"A.1-x] NOOP\r\n"
                b"!#$&',./:;<=>?@[^_`|}~ noop\r\n"
                b"0 CAPABILITY extra\r\n"
                b"a+b NOOP\r\n"
                b"(x) NOOP\r\n"
                b'"q" NOOP\r\n'
                b"* NOOP\r\n"
                b"a%b NOOP\r\n"
                b"\r\n"
                b"lonely\r\n"
                b"Z9 NOOP\r\n"
            )
            return read_tagged(conn, b"Z9")

        self.assertEqual(
            (await self.in_thread(client)).split(b"\r\n"),
            [
                b"A.1-x] OK NOOP completed",
                b"!#$&',./:;<=>?@[^_`|}~ OK NOOP completed",
                b"0 BAD CAPABILITY takes no arguments",
                b"* BAD Invalid tag",
                b"* BAD Invalid tag",
                b"* BAD Invalid tag",
                b"* BAD Invalid syntax: unexpected character *",  # not even an atom
                b"* BAD Invalid syntax: unexpected character %",
                b"* BAD Empty command line",
                b"lonely BAD Unknown command or not valid before login",
                b"Z9 OK NOOP completed",
                b"",
            ],
        )


class LoginTests(IMAPTestCase):
    async def test_login_through_starttls_with_imaplib_then_the_session_is_spliced(self) -> None:
        upstream = self.upstream()
        router = Router(port=upstream.port)
        port = await self.proxy(router)

        def client() -> Any:
            imap = imaplib.IMAP4("127.0.0.1", port, timeout=WAIT)
            before = imap.capabilities
            imap.starttls(ssl_context=self.context)
            login = imap.login(USER, PASSWORD)
            noop = imap.noop()
            logout = imap.logout()
            return before, imap.tagpre, login, noop, logout

        before, tagpre, login, noop, logout = await self.in_thread(client)
        self.assertIn("LOGINDISABLED", before)
        self.assertEqual(login, ("OK", [b"[CAPABILITY IMAP4rev1 IDLE MOVE] Logged in"]))
        self.assertEqual(noop, ("OK", [b"NOOP completed by the upstream"]))
        self.assertEqual(logout, ("BYE", [b"upstream logging out"]))
        heard = await self.heard(upstream)
        # The client's own tags: the upstream's tagged answers go to the client unchanged.
        tags = [command.split(b" ", 1)[0] for command in heard.commands]
        self.assertTrue(all(tag.startswith(tagpre) for tag in tags), tags)
        self.assertEqual(
            [command.split(b" ", 1)[1] for command in heard.commands],
            [b"AUTHENTICATE PLAIN " + plain_ir() + b"\r\n", b"NOOP\r\n", b"LOGOUT\r\n"],
        )
        self.assertEqual(heard.login, USER)
        [request] = router.requests
        self.assertEqual(
            (request.user, request.password, request.auth_method, request.protocol, request.mode, request.tls, request.attempt),
            (USER, PASSWORD, "plain", "imap", "starttls", True, 1),
        )
        line = await self.session_line()
        self.assertEqual((line["outcome"], line["user"], line["upstream"]), ("closed", USER, f"127.0.0.1:{upstream.port}"))
        self.assertNotIn(PASSWORD, self.everything_logged())

    async def test_an_untagged_capability_before_the_upstreams_ok_reaches_the_client(self) -> None:
        upstream = self.upstream(untagged_capability="IMAP4rev1 IDLE MOVE X-GM-EXT-1")
        port = await self.proxy(Router(port=upstream.port), mode="tls")

        def client() -> list[bytes]:
            conn = self.tls(port)
            login = self.talk(conn, b"a LOGIN alice@example.test s3cret-Pa55\r\n", b"a")
            echo = self.talk(conn, b'b ECHO hello (world) [x] "y"\r\n', b"b")
            conn.sendall(b"c LOGOUT\r\n")
            return [login, echo, recv_all(conn)]

        self.assertEqual(
            await self.in_thread(client),
            [
                b"* CAPABILITY IMAP4rev1 IDLE MOVE X-GM-EXT-1\r\na" + LOGGED_IN,
                b'* ECHO hello (world) [x] "y"\r\nb OK ECHO completed\r\n',
                b"* BYE upstream logging out\r\nc OK LOGOUT completed\r\n",
            ],
        )

    async def test_imaplib_sees_the_upstreams_untagged_capability(self) -> None:
        upstream = self.upstream(untagged_capability="IMAP4rev1 IDLE MOVE X-GM-EXT-1")
        port = await self.proxy(Router(port=upstream.port), mode="tls")

        def client() -> Any:
            with imaplib.IMAP4_SSL("127.0.0.1", port, ssl_context=self.context, timeout=WAIT) as imap:
                imap.login(USER, PASSWORD)
                return imap.untagged_responses.get("CAPABILITY")

        self.assertIn(b"IMAP4rev1 IDLE MOVE X-GM-EXT-1", await self.in_thread(client))


class LoginEncodingTests(IMAPTestCase):
    """What the client's LOGIN carries reaches the Router exactly, and the upstream
    encoded as IMAP says: quoted with escapes, or in literals."""

    async def login(self, send: list[bytes], route: dict[str, Any] | None = None, **upstream: Any) -> tuple[Router, Heard, bytes]:
        """Log in over implicit TLS, sending `send` one piece at a time (each piece but the
        last announces a synchronising literal: `+ OK` is awaited); then LOGOUT."""
        server = self.upstream(**upstream)
        router = Router(port=server.port, **(route or {}))
        port = await self.proxy(router, mode="tls")

        def client() -> bytes:
            conn = self.tls(port)
            for piece in send[:-1]:
                conn.sendall(piece)
                self.assertEqual(read_line(conn), b"+ OK\r\n")
            reply = self.talk(conn, send[-1], b"a")
            conn.sendall(b"z LOGOUT\r\n")
            return reply + recv_all(conn)

        reply = await self.in_thread(client)
        return router, await self.heard(server), reply

    async def test_synchronising_and_non_synchronising_literals(self) -> None:
        router, heard, reply = await self.login(
            [b"a LOGIN {18}\r\n", b"alice@example.test {11+}\r\ns3cret-Pa55\r\n"],
            route={"auth_mechanism": "login"},
        )
        self.assertEqual(reply, b"a" + LOGGED_IN + b"* BYE upstream logging out\r\nz OK LOGOUT completed\r\n")
        [request] = router.requests
        self.assertEqual((request.user, request.password, request.auth_method), (USER, PASSWORD, "plain"))
        self.assertEqual(heard.raw, b'a LOGIN "alice@example.test" "s3cret-Pa55"\r\nz LOGOUT\r\n')

    async def test_quoted_strings_with_spaces_quotes_and_backslashes(self) -> None:
        user, password = 'we"ird \\user', 'pa ss"wo\\rd '
        router, heard, reply = await self.login(
            [b'a LOGIN "we\\"ird \\\\user" "pa ss\\"wo\\\\rd "\r\n'],
            route={"auth_mechanism": "login"},
            users={user: password},
        )
        self.assertEqual(reply[: len(LOGGED_IN) + 1], b"a" + LOGGED_IN)
        [request] = router.requests
        self.assertEqual((request.user, request.password), (user, password))
        self.assertEqual(heard.commands[0], b'a LOGIN "we\\"ird \\\\user" "pa ss\\"wo\\\\rd "\r\n')
        self.assertEqual(heard.login, user)

    async def test_an_8bit_password_goes_upstream_as_a_non_synchronising_literal_with_literal_plus(self) -> None:
        password = "pässwörd"
        router, heard, reply = await self.login(
            [b"a LOGIN alice@example.test {10}\r\n", password.encode() + b"\r\n"],
            route={"auth_mechanism": "login"},
            users={USER: password},
        )
        self.assertEqual(reply[: len(LOGGED_IN) + 1], b"a" + LOGGED_IN)
        self.assertEqual(router.requests[0].password, password)
        self.assertEqual(heard.commands[0], b'a LOGIN "alice@example.test" {10+}\r\n' + password.encode() + b"\r\n")
        self.assertEqual(heard.continuations, [])

    async def test_without_literal_plus_8bit_values_wait_for_the_upstreams_continuations(self) -> None:
        user, password = "jörg@example.test", "pässwörd"
        router, heard, reply = await self.login(
            [b"a LOGIN {18+}\r\n" + user.encode() + b" {10}\r\n", password.encode() + b"\r\n"],
            capabilities=("IMAP4rev1", "ID"),
            users={user: password},
        )
        self.assertEqual(reply[: len(LOGGED_IN) + 1], b"a" + LOGGED_IN)
        self.assertEqual((router.requests[0].user, router.requests[0].password), (user, password))
        self.assertEqual(
            heard.lines[:5],
            [b"a LOGIN {18}\r\n", user.encode(), b" {10}\r\n", password.encode(), b"\r\n"],
        )
        self.assertEqual(len(heard.continuations), 2)  # and `heard()` checked nothing came before them
        self.assertEqual(heard.login, user)

    async def test_the_routes_credentials_replace_the_clients(self) -> None:
        router, heard, reply = await self.login(
            [b"a LOGIN alice@example.test s3cret-Pa55\r\n"],
            route={"user": "alice@example.test*master", "password": "master pw", "auth_mechanism": "login"},
            users={"alice@example.test*master": "master pw"},
        )
        self.assertEqual(reply[: len(LOGGED_IN) + 1], b"a" + LOGGED_IN)
        [request] = router.requests
        self.assertEqual((request.user, request.password), (USER, PASSWORD))
        self.assertEqual(heard.commands[0], b'a LOGIN "alice@example.test*master" "master pw"\r\n')
        self.assertNotIn(PASSWORD.encode(), heard.raw)

    async def test_auth_mechanism_plain_uses_authenticate_plain_with_sasl_ir(self) -> None:
        _, heard, reply = await self.login([b"a LOGIN alice@example.test s3cret-Pa55\r\n"])
        self.assertEqual(reply[: len(LOGGED_IN) + 1], b"a" + LOGGED_IN)
        self.assertEqual(heard.commands[0], b"a AUTHENTICATE PLAIN " + plain_ir() + b"\r\n")
        self.assertEqual(heard.continuations, [])

    async def test_without_sasl_ir_authenticate_plain_waits_for_the_continuation(self) -> None:
        _, heard, reply = await self.login(
            [b"a LOGIN alice@example.test s3cret-Pa55\r\n"], capabilities=("IMAP4rev1", "ID", "AUTH=PLAIN")
        )
        self.assertEqual(reply[: len(LOGGED_IN) + 1], b"a" + LOGGED_IN)
        self.assertEqual(heard.lines[:2], [b"a AUTHENTICATE PLAIN\r\n", plain_ir() + b"\r\n"])
        self.assertEqual(heard.continuations, [b"+ \r\n"])

    async def test_auth_mechanism_login_uses_login_even_when_plain_is_offered(self) -> None:
        _, heard, _ = await self.login([b"a LOGIN alice@example.test s3cret-Pa55\r\n"], route={"auth_mechanism": "login"})
        self.assertEqual(heard.commands[0], b'a LOGIN "alice@example.test" "s3cret-Pa55"\r\n')

    async def test_an_upstream_that_does_not_list_its_capabilities_is_asked(self) -> None:
        _, heard, reply = await self.login([b"a LOGIN alice@example.test s3cret-Pa55\r\n"], greeting_capabilities=False)
        self.assertEqual(reply[: len(LOGGED_IN) + 1], b"a" + LOGGED_IN)
        self.assertEqual(heard.commands[:2], [b"mr1 CAPABILITY\r\n", b"a AUTHENTICATE PLAIN " + plain_ir() + b"\r\n"])

    async def test_upstream_starttls_then_capability_again_then_the_login(self) -> None:
        issued = self.pki.issue("upstream", "upstream.test")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(issued.cert, issued.key)
        _, heard, reply = await self.login(
            [b"a LOGIN alice@example.test s3cret-Pa55\r\n"],
            route={"tls": "starttls", "server_name": "upstream.test", "tls_ca": self.pki.ca_file},
            tls=context,
        )
        self.assertEqual(reply[: len(LOGGED_IN) + 1], b"a" + LOGGED_IN)
        self.assertTrue(heard.tls)
        self.assertEqual(
            heard.commands[:3],
            [b"mr1 STARTTLS\r\n", b"mr2 CAPABILITY\r\n", b"a AUTHENTICATE PLAIN " + plain_ir() + b"\r\n"],
        )

    async def test_an_upstream_with_logindisabled_cannot_take_a_login(self) -> None:
        _, heard, reply = await self.login(
            [b"a LOGIN alice@example.test s3cret-Pa55\r\n"],
            route={"auth_mechanism": "login"},
            capabilities=("IMAP4rev1", "LOGINDISABLED"),
        )
        self.assertEqual(reply, b"a" + UNAVAILABLE + b"* BYE Logging out\r\nz OK LOGOUT completed\r\n")
        self.assertEqual(heard.raw, b"")
        self.assertIn("upstream refuses LOGIN (LOGINDISABLED)", "\n".join(self.logs.lines()))


class SASLTests(IMAPTestCase):
    async def authenticate(self, steps: list[tuple[bytes, bytes]], router: Any = None, **upstream: Any) -> Any:
        """Over implicit TLS: send each step's bytes and read its reply up to the line
        tagged with the step's tag (`+`: one continuation line), then LOGOUT. Returns
        (router, heard, replies); `router` is a function of the upstream's port."""
        server = self.upstream(**upstream)
        router = (router or (lambda port: Router(answer=password_check(port))))(server.port)
        port = await self.proxy(router, mode="tls", auth=["plain", "login", "cram-md5", "xoauth2"])

        def client() -> list[bytes]:
            conn = self.tls(port)
            replies = []
            for send, tag in steps:
                conn.sendall(send)
                replies.append(read_line(conn) if tag == b"+" else read_tagged(conn, tag))
            conn.sendall(b"z LOGOUT\r\n")
            replies.append(recv_all(conn))
            return replies

        replies = await self.in_thread(client)
        return router, await self.heard(server) if server.connections else None, replies

    async def test_authenticate_plain_with_an_initial_response(self) -> None:
        router, heard, replies = await self.authenticate([(b"a AUTHENTICATE PLAIN " + plain_ir() + b"\r\n", b"a")])
        self.assertEqual(replies[0], b"a" + LOGGED_IN)
        self.assertEqual(heard.commands[0], b"a AUTHENTICATE PLAIN " + plain_ir() + b"\r\n")
        self.assertEqual(router.requests[0].auth_method, "plain")

    async def test_authenticate_plain_without_initial_response_gets_an_empty_continuation(self) -> None:
        router, heard, replies = await self.authenticate(
            [(b"a AUTHENTICATE PLAIN\r\n", b"+"), (plain_ir() + b"\r\n", b"a")],
        )
        self.assertEqual(replies[:2], [b"+ \r\n", b"a" + LOGGED_IN])
        self.assertEqual(heard.login, USER)
        self.assertEqual((router.requests[0].user, router.requests[0].password), (USER, PASSWORD))

    async def test_authenticate_login_asks_for_user_name_and_password(self) -> None:
        router, heard, replies = await self.authenticate(
            [
                (b"a AUTHENTICATE LOGIN\r\n", b"+"),
                (base64.b64encode(USER.encode()) + b"\r\n", b"+"),
                (base64.b64encode(PASSWORD.encode()) + b"\r\n", b"a"),
            ]
        )
        self.assertEqual(replies[:3], [b"+ VXNlcm5hbWU6\r\n", b"+ UGFzc3dvcmQ6\r\n", b"a" + LOGGED_IN])
        [request] = router.requests
        self.assertEqual((request.user, request.password, request.auth_method), (USER, PASSWORD, "login"))
        self.assertEqual(heard.login, USER)

    async def test_cram_md5_logs_in_upstream_with_the_password_the_route_supplies(self) -> None:
        server = self.upstream()
        router = Router(answer=password_check(server.port))
        port = await self.proxy(router, mode="tls", auth=["cram-md5"])

        def client() -> list[bytes]:
            conn = self.tls(port)
            conn.sendall(b"a AUTHENTICATE CRAM-MD5\r\n")
            challenge = read_line(conn)
            self.assertTrue(challenge.startswith(b"+ "), challenge)
            digest = hmac.new(PASSWORD.encode(), base64.b64decode(challenge[2:]), hashlib.md5).hexdigest()
            reply = self.talk(conn, base64.b64encode(f"{USER} {digest}".encode()) + b"\r\n", b"a")
            conn.sendall(b"z LOGOUT\r\n")
            recv_all(conn)
            return [base64.b64decode(challenge[2:]), reply]

        challenge, reply = await self.in_thread(client)
        self.assertEqual(reply, b"a" + LOGGED_IN)
        [request] = router.requests
        self.assertEqual((request.auth_method, request.user, request.salt), ("cram-md5", USER, challenge.decode()))
        assert request.salt is not None and request.password is not None
        self.assertRegex(request.salt, r"^<[0-9]+\.[0-9]+@relay\.test>$")
        self.assertRegex(request.password, "^[0-9a-f]{32}$")
        heard = await self.heard(server)
        self.assertEqual(heard.commands[0], b"a AUTHENTICATE PLAIN " + plain_ir() + b"\r\n")
        self.assertEqual(heard.login, USER)

    async def test_xoauth2_is_passed_upstream_in_its_own_mechanism(self) -> None:
        token = "ya29.a0-TOKEN_value"
        initial = base64.b64encode(f"user={USER}\x01auth=Bearer {token}\x01\x01".encode())
        router, heard, replies = await self.authenticate(
            [(b"a AUTHENTICATE XOAUTH2 " + initial + b"\r\n", b"a")],
            lambda port: Router(port=port),
            users={USER: token},
            capabilities=("IMAP4rev1", "SASL-IR", "ID", "AUTH=PLAIN", "AUTH=XOAUTH2"),
        )
        self.assertEqual(replies[0], b"a" + LOGGED_IN)
        self.assertEqual(heard.commands[0], b"a AUTHENTICATE XOAUTH2 " + initial + b"\r\n")
        self.assertEqual(heard.login, USER)
        [request] = router.requests
        self.assertEqual((request.user, request.password, request.auth_method), (USER, token, "xoauth2"))

    async def test_a_refused_xoauth2_token_answers_the_upstreams_error_challenge(self) -> None:
        initial = base64.b64encode(f"user={USER}\x01auth=Bearer expired-token\x01\x01".encode())
        router, heard, replies = await self.authenticate(
            [(b"a AUTHENTICATE XOAUTH2 " + initial + b"\r\n", b"a"), (b"b NOOP\r\n", b"b")],
            lambda port: Router(port=port),
            users={USER: "the-right-token"},
            capabilities=("IMAP4rev1", "SASL-IR", "AUTH=XOAUTH2"),
        )
        self.assertEqual(
            replies,
            [
                b"a NO [AUTHENTICATIONFAILED] Invalid credentials (upstream)\r\n",
                b"b OK NOOP completed\r\n",
                b"* BYE Logging out\r\nz OK LOGOUT completed\r\n",
            ],
        )
        self.assertEqual(heard.lines[:2], [b"a AUTHENTICATE XOAUTH2 " + initial + b"\r\n", b"\r\n"])
        self.assertEqual(len(heard.continuations), 1)

    async def test_an_over_long_response_still_completes_the_authenticate_command(self) -> None:
        # RFC 3501: every command ends with a tagged response; the client waits for `a`'s.
        router = Router()
        port = await self.proxy(router, mode="tls", login_timeout=2)

        def client() -> list[bytes]:
            conn = self.tls(port)
            conn.sendall(b"a AUTHENTICATE PLAIN\r\n")
            continuation = read_line(conn)
            conn.sendall(b"A" * 40_000 + b"\r\n")
            return [continuation, read_tagged(conn, b"a"), self.talk(conn, b"b NOOP\r\n", b"b")]

        continuation, reply, noop = await self.in_thread(client)
        self.assertEqual(continuation, b"+ \r\n")
        self.assertEqual(reply, b"a BAD Invalid authentication: response too long\r\n")
        self.assertEqual(noop, b"b OK NOOP completed\r\n")
        self.assertEqual(router.requests, [])

    async def test_cancel_bad_base64_and_unknown_mechanisms_leave_the_session_going(self) -> None:
        router = Router()
        _, heard, replies = await self.authenticate(
            [
                (b"a AUTHENTICATE PLAIN\r\n", b"+"),
                (b"*\r\n", b"a"),
                (b"b AUTHENTICATE PLAIN not-base64!\r\n", b"b"),
                (b"c AUTHENTICATE LOGIN\r\n", b"+"),
                (b"!!!\r\n", b"c"),
                (b"d AUTHENTICATE PLAIN " + base64.b64encode(b"only-one-part") + b"\r\n", b"d"),
                (b"e AUTHENTICATE GSSAPI\r\n", b"e"),
                (b"f AUTHENTICATE\r\n", b"f"),
                (b"g NOOP\r\n", b"g"),
            ],
            lambda port: router,
        )
        self.assertEqual(
            replies,
            [
                b"+ \r\n",
                b"a BAD Authentication cancelled\r\n",
                b"b BAD Invalid authentication: invalid base64 in the response\r\n",
                b"+ VXNlcm5hbWU6\r\n",
                b"c BAD Invalid authentication: invalid base64 in the response\r\n",
                b"d BAD Invalid authentication: PLAIN response is not authzid NUL user NUL password\r\n",
                b"e NO Unsupported authentication mechanism\r\n",
                b"f BAD AUTHENTICATE takes a mechanism and an optional initial response\r\n",
                b"g OK NOOP completed\r\n",
                b"* BYE Logging out\r\nz OK LOGOUT completed\r\n",
            ],
        )
        self.assertEqual(router.requests, [])
        self.assertIsNone(heard)


class IDTests(IMAPTestCase):
    CLIENT_ID = b'("name" "Thunderbird" "x-originating-ip" "6.6.6.6" "version" "115.1" "X-Originating-Port" "1")'

    async def id_then_login(
        self, route: dict[str, Any], starttls: bool = False, **upstream: Any
    ) -> tuple[Heard, list[bytes], int]:
        server = self.upstream(**upstream)
        port = await self.proxy(Router(port=server.port, **route), starttls="optional")

        def client() -> tuple[list[bytes], int]:
            conn: Any = self.plain(port)
            replies = [self.talk(conn, b"i ID " + self.CLIENT_ID + b"\r\n", b"i")]
            if starttls:
                conn = self.starttls(conn)
            replies.append(self.talk(conn, b"a LOGIN alice@example.test s3cret-Pa55\r\n", b"a"))
            client_port = conn.getsockname()[1]
            conn.sendall(b"z LOGOUT\r\n")
            replies.append(recv_all(conn))
            conn.close()  # the session ends when both sides have
            return replies, client_port

        replies, client_port = await self.in_thread(client)
        return await self.heard(server), replies, client_port

    async def test_id_is_answered_and_its_fields_go_upstream_without_the_x_ones(self) -> None:
        heard, replies, _ = await self.id_then_login({})
        self.assertEqual(replies[:2], [b"* ID NIL\r\ni OK ID completed\r\n", b"a" + LOGGED_IN])
        self.assertEqual(
            heard.commands[:2],
            [b'mr1 ID ("name" "Thunderbird" "version" "115.1")\r\n', b"a AUTHENTICATE PLAIN " + plain_ir() + b"\r\n"],
        )
        self.assertEqual(heard.id, [b"name", b"Thunderbird", b"version", b"115.1"])

    async def test_an_upstream_refusing_the_clients_id_still_logs_it_in(self) -> None:
        heard, replies, _ = await self.id_then_login({}, id_status=b"BAD ID not here")
        self.assertEqual(replies[1], b"a" + LOGGED_IN)
        self.assertEqual(heard.login, USER)

    async def test_an_upstream_refusing_the_forwarded_address_is_unusable(self) -> None:
        heard, replies, _ = await self.id_then_login({"forward_client": True}, id_status=b"NO ID not here")
        self.assertTrue(replies[1].startswith(b"a NO [UNAVAILABLE] "), replies[1])
        self.assertIsNone(heard.login)

    async def test_forward_client_tells_the_upstream_the_clients_address(self) -> None:
        heard, replies, client_port = await self.id_then_login({"forward_client": True})
        self.assertEqual(replies[1], b"a" + LOGGED_IN)
        line = await self.session_line()
        self.assertEqual(
            heard.commands[:2],
            [
                b'mr1 ID ("name" "Thunderbird" "version" "115.1" "x-originating-ip" "127.0.0.1" "x-originating-port" "%d"'
                b' "x-connected-ip" "127.0.0.1" "x-connected-port" "%d" "x-session-ext-id" "%s")\r\n'
                % (client_port, self.port, line["session_id"].encode()),
                b"a AUTHENTICATE PLAIN " + plain_ir() + b"\r\n",
            ],
        )

    async def test_an_upstream_id_answer_with_a_literal_is_read_whole(self) -> None:
        heard, replies, _ = await self.id_then_login({}, id_reply=b'* ID ("name" {7}\r\nDovecot "version" "2.3")')
        self.assertEqual(replies[1], b"a" + LOGGED_IN)
        self.assertEqual(heard.commands[1], b"a AUTHENTICATE PLAIN " + plain_ir() + b"\r\n")

    async def test_forward_client_to_an_upstream_without_id_is_unavailable(self) -> None:
        heard, replies, _ = await self.id_then_login(
            {"forward_client": True}, capabilities=("IMAP4rev1", "SASL-IR", "AUTH=PLAIN")
        )
        self.assertEqual(replies[1], b"a" + UNAVAILABLE)
        self.assertEqual(heard.raw, b"")
        self.assertIn("upstream does not offer ID", "\n".join(self.logs.lines()))

    async def test_id_values_are_escaped_and_kept_within_rfc_2971s_limits(self) -> None:
        server = self.upstream()
        port = await self.proxy(Router(port=server.port), mode="tls")
        long_value = b"v" * 2000

        def client() -> bytes:
            conn = self.tls(port)
            conn.sendall(
                b'i ID ("name" "a \\"b\\" \\\\c" "os" {2000+}\r\n' + long_value + b' "vendor" "J\xc3\xb6rg" "date" NIL)\r\n'
            )
            reply = read_tagged(conn, b"i")
            reply += self.talk(conn, b"a LOGIN alice@example.test s3cret-Pa55\r\n", b"a")
            conn.sendall(b"z LOGOUT\r\n")
            return reply + recv_all(conn)

        self.assertEqual(
            await self.in_thread(client),
            b"* ID NIL\r\ni OK ID completed\r\na" + LOGGED_IN + b"* BYE upstream logging out\r\nz OK LOGOUT completed\r\n",
        )
        heard = await self.heard(server)
        # RFC 2971 3.3: "Value strings MUST NOT be longer than 1024 octets"; quoted strings are 7-bit.
        self.assertEqual(
            heard.commands[0],
            b'mr1 ID ("name" "a \\"b\\" \\\\c" "os" "' + b"v" * 1024 + b'" "vendor" "J?rg" "date" NIL)\r\n',
        )
        self.assertEqual(heard.id[:2], [b"name", b'a "b" \\c'])

    async def test_an_upstream_without_id_is_not_sent_the_clients(self) -> None:
        heard, replies, _ = await self.id_then_login({}, capabilities=("IMAP4rev1", "SASL-IR", "AUTH=PLAIN"))
        self.assertEqual(replies[:2], [b"* ID NIL\r\ni OK ID completed\r\n", b"a" + LOGGED_IN])
        self.assertEqual(heard.commands[0], b"a AUTHENTICATE PLAIN " + plain_ir() + b"\r\n")

    async def test_what_the_client_said_in_plaintext_is_forgotten_after_starttls(self) -> None:
        heard, replies, _ = await self.id_then_login({}, starttls=True)
        self.assertEqual(replies[1], b"a" + LOGGED_IN)
        self.assertEqual(heard.commands[0], b"a AUTHENTICATE PLAIN " + plain_ir() + b"\r\n")
        self.assertIsNone(heard.id)


class StartTLSInjectionTests(IMAPTestCase):
    async def test_commands_pipelined_behind_starttls_are_discarded_unread(self) -> None:
        router = Router()
        port = await self.proxy(router)

        def client() -> list[bytes]:
            conn = self.plain(port)
            conn.sendall(b"a STARTTLS\r\nb LOGIN u p\r\n")
            go_ahead = read_line(conn)
            with self.context.wrap_socket(conn, server_hostname="relay.test") as tls:
                # Had `b` been read, its answer would come before c's.
                tls.sendall(b"c NOOP\r\nd LOGOUT\r\n")
                return [go_ahead, recv_all(tls)]

        self.assertEqual(
            await self.in_thread(client),
            [b"a OK Begin TLS negotiation now\r\n", b"c OK NOOP completed\r\n* BYE Logging out\r\nd OK LOGOUT completed\r\n"],
        )
        self.assertEqual(router.requests, [])
        logged = "\n".join(self.logs.lines())
        self.assertIn("discarded 13 byte(s) sent in plaintext after STARTTLS", logged)
        self.assertNotIn("LOGIN u p", self.everything_logged())


class FailedLoginTests(IMAPTestCase):
    async def test_wrong_password_gets_no_after_the_delay_then_bye_after_max_attempts(self) -> None:
        router = Router(answer=password_check(closed_port(), wait=0.1))
        port = await self.proxy(router, mode="tls", max_attempts=2)

        def client() -> list[Any]:
            conn = self.tls(port)
            replies: list[Any] = []
            for tag, attempt in ((b"a", b"wrong-1"), (b"b", b"wrong-2")):
                started = time.monotonic()
                replies.append(self.talk(conn, tag + b' LOGIN alice@example.test "' + attempt + b'"\r\n', tag))
                replies.append(time.monotonic() - started)
            replies.append(recv_all(conn))
            return replies

        first, first_wait, second, second_wait, rest = await self.in_thread(client)
        self.assertEqual(first, b"a NO [AUTHENTICATIONFAILED] Invalid login\r\n")
        self.assertEqual(second, b"b NO [AUTHENTICATIONFAILED] Invalid login\r\n")
        self.assertGreaterEqual(min(first_wait, second_wait), 0.1)
        self.assertEqual(rest, b"* BYE Too many failed logins\r\n")
        self.assertEqual([(r.attempt, r.password) for r in router.requests], [(1, "wrong-1"), (2, "wrong-2")])
        line = await self.session_line()
        self.assertEqual((line["outcome"], line["reason"]), ("rejected", "Invalid login"))
        everything = self.everything_logged()
        self.assertNotIn("wrong-1", everything)
        self.assertNotIn("wrong-2", everything)
        self.assertIn("login refused for alice@example.test from 127.0.0.1", everything)

    async def test_after_a_failure_the_client_may_try_again_and_succeed(self) -> None:
        upstream = self.upstream()
        port = await self.proxy(Router(answer=password_check(upstream.port, wait=0.1)), mode="tls")

        def client() -> Any:
            with imaplib.IMAP4_SSL("127.0.0.1", port, ssl_context=self.context, timeout=WAIT) as imap:
                try:
                    imap.login(USER, "wrong")
                except imaplib.IMAP4.error as e:
                    first = e.args[0]
                second = imap.login(USER, PASSWORD)
                return first, second, imap.noop()

        first, second, noop = await self.in_thread(client)
        self.assertEqual(first, b"[AUTHENTICATIONFAILED] Invalid login")
        self.assertEqual(second, ("OK", [b"[CAPABILITY IMAP4rev1 IDLE MOVE] Logged in"]))
        self.assertEqual(noop, ("OK", [b"NOOP completed by the upstream"]))

    async def test_a_routers_response_code_reaches_the_client_and_a_closing_reject_says_bye(self) -> None:
        rejects = [Reject("Password expired", code="EXPIRED"), Reject("5.7.8 Nope", code=535), Reject("Locked", close=True)]

        def answer(request: RouteRequest) -> Route:
            raise rejects.pop(0)

        port = await self.proxy(Router(answer=answer), mode="tls", max_attempts=5)

        def client() -> bytes:
            conn = self.tls(port)
            conn.sendall(b"a LOGIN alice@example.test pw\r\nb LOGIN alice@example.test pw\r\nc LOGIN alice@example.test pw\r\n")
            return recv_all(conn)

        lines = (await self.in_thread(client)).split(b"\r\n")
        self.assertEqual(
            lines[:3],
            [
                b"a NO [EXPIRED] Password expired",
                b"b NO [AUTHENTICATIONFAILED] 5.7.8 Nope",
                b"c NO [AUTHENTICATIONFAILED] Locked",
            ],
        )
        # Reject(close=True) ends the connection, with a BYE: RFC 3501 3.4, "A server MUST NOT
        # unilaterally close the connection without sending an untagged BYE response".
        self.assertEqual(lines[3:], [b"* BYE Locked", b""])
        line = await self.session_line()
        self.assertEqual((line["outcome"], line["reason"]), ("rejected", "Locked"))

    async def test_past_the_login_limits_the_router_is_not_asked(self) -> None:
        upstream = self.upstream()
        router = Router(answer=password_check(upstream.port))
        config = self.front_end_config("tls", max_attempts=5)
        config["login_limits"] = {"max_per_client": 2, "max_per_user": 100, "delay": 0}
        _, port = await self.start_proxy(config, router=router)

        def client() -> bytes:
            conn = self.tls(port)
            conn.sendall(
                b"".join(b"%d LOGIN alice@example.test %s\r\n" % (i, p) for i, p in enumerate((b"bad1", b"bad2", b"s3cret-Pa55")))
            )
            return recv_all(conn)

        self.assertEqual(
            await self.in_thread(client),
            b"0 NO [AUTHENTICATIONFAILED] Invalid login\r\n1 NO [AUTHENTICATIONFAILED] Invalid login\r\n"
            b"2 NO [UNAVAILABLE] Too many failed logins, try again later\r\n* BYE Too many failed logins\r\n",
        )
        self.assertEqual(len(router.requests), 2)  # the third, right, password never reached it
        line = await self.session_line()
        self.assertEqual(line["outcome"], "throttled")

    async def login_reply(self, max_attempts: int = 3, **upstream: Any) -> bytes:
        server = self.upstream(**upstream)
        port = await self.proxy(Router(port=server.port), mode="tls", max_attempts=max_attempts)

        def client() -> bytes:
            conn = self.tls(port)
            conn.sendall(b"a LOGIN alice@example.test s3cret-Pa55\r\nb NOOP\r\nz LOGOUT\r\n")
            return recv_all(conn)

        return await self.in_thread(client)

    async def test_an_upstream_refusing_the_credentials_is_authenticationfailed(self) -> None:
        reply = await self.login_reply(users={USER: "another password"})
        self.assertEqual(
            reply,
            b"a NO [AUTHENTICATIONFAILED] Invalid credentials (upstream)\r\nb OK NOOP completed\r\n"
            b"* BYE Logging out\r\nz OK LOGOUT completed\r\n",
        )
        line = await self.session_line()
        self.assertEqual(line["outcome"], "rejected")

    async def test_an_upstream_answering_with_another_tag_is_unusable(self) -> None:
        reply = await self.login_reply(verdict_tag=b"x")
        self.assertEqual(reply, b"a" + UNAVAILABLE + b"b OK NOOP completed\r\n* BYE Logging out\r\nz OK LOGOUT completed\r\n")
        self.assertIn("where the answer to its command was due", "\n".join(self.logs.lines()))

    async def test_a_mailbox_in_use_is_said_and_is_no_failed_login(self) -> None:
        # With max_attempts = 1 a failed login would close the connection: INUSE does not.
        reply = await self.login_reply(max_attempts=1, login_reply=b"NO [INUSE] Mailbox is locked")
        self.assertEqual(
            reply, b"a NO [INUSE] Mailbox is locked\r\nb OK NOOP completed\r\n* BYE Logging out\r\nz OK LOGOUT completed\r\n"
        )
        self.assertNotIn("login refused", "\n".join(self.logs.lines()))

    async def test_an_upstream_answering_unavailable_is_a_temporary_failure(self) -> None:
        reply = await self.login_reply(login_reply=b"NO [UNAVAILABLE] Maintenance, try later")
        self.assertEqual(reply, b"a" + UNAVAILABLE + b"b OK NOOP completed\r\n* BYE Logging out\r\nz OK LOGOUT completed\r\n")
        self.assertIn("Maintenance, try later", "\n".join(self.logs.lines()))


class MalformedInputTests(IMAPTestCase):
    async def exchange(self, send: bytes, router: Any = None, **listener: Any) -> bytes:
        """On a plaintext (STARTTLS optional) listener: send in one write, read to the close."""
        listener.setdefault("starttls", "optional")
        port = await self.proxy(router or Router(), **listener)

        def client() -> bytes:
            conn = self.plain(port)
            conn.sendall(send)
            return recv_all(conn)

        return await self.in_thread(client)

    async def test_unbalanced_quotes_and_parentheses_are_bad_and_the_session_goes_on(self) -> None:
        reply = await self.exchange(b'a LOGIN "bob pw\r\nb ID ("name" "x"\r\nc ID ("k" "v"))\r\nd NOOP\r\ne LOGOUT\r\n')
        self.assertEqual(
            reply,
            b"a BAD Invalid syntax: unterminated quoted string\r\n"
            b"b BAD Invalid syntax: unbalanced parenthesis\r\n"
            b"c BAD Invalid syntax: unbalanced parenthesis\r\n"
            b"d OK NOOP completed\r\n* BYE Logging out\r\ne OK LOGOUT completed\r\n",
        )

    async def test_a_synchronising_literal_over_the_limit_is_bad_without_a_continuation(self) -> None:
        reply = await self.exchange(b"a LOGIN {100000}\r\nb LOGIN {8193}\r\nc NOOP\r\nd LOGOUT\r\n")
        self.assertEqual(
            reply,
            b"a BAD Literal too large\r\nb BAD Literal too large\r\nc OK NOOP completed\r\n"
            b"* BYE Logging out\r\nd OK LOGOUT completed\r\n",
        )

    async def test_a_command_over_the_limit_in_total_is_bad(self) -> None:
        port = await self.proxy(Router(), starttls="optional")

        def client() -> list[bytes]:
            conn = self.plain(port)
            conn.sendall(b"a ID (")
            replies = []
            for i in range(9):  # 8 literals of 8000 bytes fit in 64 KiB; the 9th does not
                conn.sendall(b'"k%d" {8000}\r\n' % i)
                reply = read_line(conn)
                replies.append(reply)
                if reply != b"+ OK\r\n":
                    break
                conn.sendall(b"v" * 8000 + b" ")
            conn.sendall(b"b NOOP\r\n")
            replies.append(read_tagged(conn, b"b"))
            return replies

        self.assertEqual(
            await self.in_thread(client), [b"+ OK\r\n"] * 8 + [b"a BAD Literal too large\r\n", b"b OK NOOP completed\r\n"]
        )

    async def test_a_non_synchronising_literal_over_the_limit_ends_the_session(self) -> None:
        reply = await self.exchange(b"a LOGIN {100000+}\r\n" + b"x" * 1000)
        self.assertEqual(reply, b"* BYE Literal too large\r\n")
        line = await self.session_line()
        self.assertEqual(line["outcome"], "protocol-error")
        # Another session is served.
        self.assertEqual(
            await self.in_thread(lambda: self.talk(self.plain(self.port), b"n NOOP\r\n", b"n")), b"n OK NOOP completed\r\n"
        )

    async def test_a_literal_that_never_comes_times_out(self) -> None:
        clock = Clock()
        port = await self.proxy(Router(), starttls="optional", clock=clock, login_timeout=60)

        def client() -> tuple[socket.socket, bytes]:
            conn = self.plain(port)
            conn.sendall(b"a LOGIN {5}\r\n")
            continuation = read_line(conn)
            conn.sendall(b"abc")  # not all of it
            return conn, continuation

        conn, continuation = await self.in_thread(client)
        client_port = conn.getsockname()[1]
        await self.eventually(lambda: all_read(client_port), "mailrelay did not read the start of the literal")
        clock.advance(59)
        self.assertEqual(self.logs.sessions(), [])
        clock.advance(1)

        rest = await self.in_thread(recv_all, conn)
        self.assertEqual((continuation, rest), (b"+ OK\r\n", b"* BYE Disconnected for inactivity\r\n"))
        line = await self.session_line()
        self.assertEqual(line["outcome"], "idle-timeout")

    async def test_an_over_long_line_is_bad_and_the_session_goes_on(self) -> None:
        reply = await self.exchange(b"a NOOP " + b"x" * 100_000 + b"\r\nb NOOP\r\nc LOGOUT\r\n")
        self.assertEqual(
            reply, b"* BAD Command line too long\r\nb OK NOOP completed\r\n* BYE Logging out\r\nc OK LOGOUT completed\r\n"
        )

    async def test_unknown_commands_and_those_valid_only_after_login_are_bad(self) -> None:
        reply = await self.exchange(
            b"a XYZZY\r\nb SELECT INBOX\r\nc SELECT {5}\r\nd FETCH 1 (BODY[])\r\ne LOGOUT\r\n", max_errors=10
        )
        self.assertEqual(
            reply,
            b"a BAD Unknown command or not valid before login\r\n"
            b"b BAD Unknown command or not valid before login\r\n"
            b"c BAD Unknown command or not valid before login\r\n"
            b"d BAD Unknown command or not valid before login\r\n"
            b"* BYE Logging out\r\ne OK LOGOUT completed\r\n",
        )
        line = await self.session_line()
        self.assertEqual(line["outcome"], "closed")

    async def test_too_many_errors_close_the_connection(self) -> None:
        reply = await self.exchange(b"a BAD1\r\nb BAD2\r\nc BAD3\r\nd NOOP\r\n", max_errors=3)
        self.assertEqual(
            reply,
            b"a BAD Unknown command or not valid before login\r\n"
            b"b BAD Unknown command or not valid before login\r\n"
            b"c BAD Unknown command or not valid before login\r\n"
            b"* BYE Too many invalid commands\r\n",
        )
        line = await self.session_line()
        self.assertEqual(line["outcome"], "protocol-error")

    async def test_values_that_would_break_the_upstreams_framing_are_bad(self) -> None:
        router = Router()
        reply = await self.exchange(
            b"a LOGIN alice {4+}\r\nx\r\ny\r\n"
            b"b LOGIN {6+}\r\nal\x00ice pw\r\n"
            b'c LOGIN "" pw\r\n'
            b"d LOGIN {2+}\r\n\xff\xfe pw\r\n"
            b"e LOGIN alice\r\n"
            b"f NOOP\r\ng LOGOUT\r\n",
            router,
            max_errors=10,
        )
        self.assertEqual(
            reply.split(b"\r\n"),
            [
                b"a BAD Invalid LOGIN: password contains control characters",
                b"b BAD Invalid LOGIN: user name contains control characters",
                b"c BAD Invalid LOGIN: empty user name",
                b"d BAD Invalid LOGIN: user name is not UTF-8",
                b"e BAD LOGIN takes a user name and a password",
                b"f OK NOOP completed",
                b"* BYE Logging out",
                b"g OK LOGOUT completed",
                b"",
            ],
        )
        self.assertEqual(router.requests, [])

    async def test_login_is_disabled_when_only_challenge_mechanisms_are_allowed(self) -> None:
        router = Router()
        port = await self.proxy(router, mode="tls", auth=["cram-md5"])

        def client() -> list[bytes]:
            raw = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
            with self.context.wrap_socket(raw, server_hostname="relay.test") as conn:
                greeting = read_line(conn)
                conn.sendall(b"a LOGIN alice@example.test s3cret-Pa55\r\nb AUTHENTICATE PLAIN " + plain_ir() + b"\r\n")
                return [greeting, read_tagged(conn, b"a"), read_tagged(conn, b"b")]

        self.assertEqual(
            await self.in_thread(client),
            [
                b"* OK [CAPABILITY IMAP4rev1 LITERAL+ SASL-IR ID AUTH=CRAM-MD5 LOGINDISABLED] relay.test IMAP4rev1 ready\r\n",
                b"a NO [CANNOT] LOGIN is disabled: use AUTHENTICATE\r\n",
                b"b NO Unsupported authentication mechanism\r\n",
            ],
        )
        self.assertEqual(router.requests, [])

    async def test_logins_before_starttls_on_a_required_listener_are_refused(self) -> None:
        router = Router()
        reply = await self.exchange(
            b"a LOGIN alice@example.test s3cret-Pa55\r\nb AUTHENTICATE PLAIN " + plain_ir() + b"\r\nc NOOP\r\nd LOGOUT\r\n",
            router,
            starttls="required",
        )
        self.assertEqual(
            reply,
            b"a NO [PRIVACYREQUIRED] Use STARTTLS first: logins are not accepted before TLS\r\n"
            b"b NO [PRIVACYREQUIRED] Use STARTTLS first: logins are not accepted before TLS\r\n"
            b"c OK NOOP completed\r\n* BYE Logging out\r\nd OK LOGOUT completed\r\n",
        )
        self.assertEqual(router.requests, [])


class RefusedLiteralTests(IMAPTestCase):
    async def test_a_login_literal_before_starttls_is_refused_before_the_password_is_sent(self) -> None:
        router = Router()
        port = await self.proxy(router)  # starttls required

        def client() -> list[bytes]:
            conn = self.plain(port)
            conn.sendall(b"a LOGIN {5}\r\n")
            refused = read_line(conn)
            conn.sendall(b"b NOOP\r\n")
            return [refused, read_line(conn)]

        refused, noop = await self.in_thread(client)
        self.assertTrue(refused.startswith(b"a NO [PRIVACYREQUIRED] "), refused)
        self.assertEqual(noop, b"b OK NOOP completed\r\n")
        self.assertEqual(router.requests, [])


class PipeliningTests(IMAPTestCase):
    async def test_commands_pipelined_around_the_login_are_answered_in_order(self) -> None:
        upstream = self.upstream()
        router = Router(port=upstream.port)
        port = await self.proxy(router, mode="tls")

        def client() -> bytes:
            conn = self.tls(port)
            conn.sendall(b"a CAPABILITY\r\nb NOOP\r\nc LOGIN alice@example.test s3cret-Pa55\r\nd NOOP\r\n")
            reply = read_tagged(conn, b"d")
            conn.sendall(b"e LOGOUT\r\n")
            return reply + recv_all(conn)

        self.assertEqual(
            await self.in_thread(client),
            b"* CAPABILITY IMAP4rev1 LITERAL+ SASL-IR ID AUTH=PLAIN AUTH=LOGIN\r\na OK CAPABILITY completed\r\n"
            b"b OK NOOP completed\r\n"
            b"c" + LOGGED_IN + b"d OK NOOP completed by the upstream\r\n"
            b"* BYE upstream logging out\r\ne OK LOGOUT completed\r\n",
        )
        heard = await self.heard(upstream)
        self.assertEqual(heard.raw, b"c AUTHENTICATE PLAIN " + plain_ir() + b"\r\nd NOOP\r\ne LOGOUT\r\n")
        self.assertEqual(len(router.requests), 1)


class TemporaryFailureTests(IMAPTestCase):
    async def test_a_router_that_raises_is_unavailable_and_the_session_goes_on(self) -> None:
        def broken(request: RouteRequest) -> Route:
            raise RuntimeError("router bug")

        port = await self.proxy(Router(answer=broken), mode="tls")

        def client() -> bytes:
            conn = self.tls(port)
            conn.sendall(b"a LOGIN alice@example.test s3cret-Pa55\r\nb NOOP\r\nz LOGOUT\r\n")
            return recv_all(conn)

        self.assertEqual(
            await self.in_thread(client),
            b"a NO [UNAVAILABLE] Temporary failure, try again later\r\nb OK NOOP completed\r\n"
            b"* BYE Logging out\r\nz OK LOGOUT completed\r\n",
        )
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        line = await self.session_line()
        self.assertEqual(line["outcome"], "router-error")

    async def test_an_unreachable_upstream_is_unavailable_and_the_client_may_retry(self) -> None:
        upstream = self.upstream()
        ports = [closed_port(), upstream.port]
        router = Router(answer=lambda request: Route(host="127.0.0.1", port=ports.pop(0)))
        port = await self.proxy(router, mode="tls", max_attempts=1)

        def client() -> list[bytes]:
            conn = self.tls(port)
            first = self.talk(conn, b"a LOGIN alice@example.test s3cret-Pa55\r\n", b"a")
            second = self.talk(conn, b"b LOGIN alice@example.test s3cret-Pa55\r\n", b"b")
            conn.sendall(b"z LOGOUT\r\n")
            return [first, second, recv_all(conn)]

        self.assertEqual(
            await self.in_thread(client),
            [b"a" + UNAVAILABLE, b"b" + LOGGED_IN, b"* BYE upstream logging out\r\nz OK LOGOUT completed\r\n"],
        )
        self.assertEqual([r.attempt for r in router.requests], [1, 1])  # a temporary failure is no failed attempt
        self.assertIn("connection refused", "\n".join(self.logs.lines()))


class BareCRAndNULTests(IMAPTestCase):
    """A command line (CRLF or LF taken off) holding a CR or a NUL is `BAD`, counted
    towards max_errors, and never acted on; literals are bytes, checked where they are
    used (a password) or made safe where they are passed on (ID values)."""

    async def test_a_line_with_a_bare_cr_or_nul_is_bad_and_not_acted_on(self) -> None:
        upstream = self.upstream()
        router = Router(port=upstream.port)
        port = await self.proxy(router, mode="tls", max_errors=10)

        def client() -> list[bytes]:
            conn = self.tls(port)
            replies = [
                self.talk(conn, b'a ID ("name" "Mail\rx")\r\n', b"a"),
                self.talk(conn, b'b ID ("name" "Mail\0x")\r\n', b"b"),
                self.talk(conn, b"c NOOP\r\r\n", b"c"),
                self.talk(conn, b'd LOGIN alice@example.test "s3cret-Pa55\r"\r\n', b"d"),
                # On the line after a literal: the whole command is refused, the literal too.
                self.talk(conn, b'e ID ("name" {4+}\r\nMail "version" "1\r")\r\n', b"e"),
                # Before a synchronising literal: refused without the continuation.
                self.talk(conn, b"f LOGIN ali\rce {11}\r\n", b"f"),
                self.talk(conn, b"g LOGIN alice@example.test s3cret-Pa55\r\n", b"g"),
            ]
            conn.sendall(b"z LOGOUT\r\n")
            replies.append(recv_all(conn))
            return replies

        bad = b" BAD Bare CR or NUL character in command\r\n"
        self.assertEqual(
            await self.in_thread(client),
            [
                b"a" + bad,
                b"b" + bad,
                b"c" + bad,
                b"d" + bad,
                b"e" + bad,
                b"f" + bad,
                b"g" + LOGGED_IN,
                b"* BYE upstream logging out\r\nz OK LOGOUT completed\r\n",
            ],
        )
        heard = await self.heard(upstream)
        # No ID reached the upstream: the refused ones were not taken.
        self.assertEqual(heard.commands[0], b"g AUTHENTICATE PLAIN " + plain_ir() + b"\r\n")
        self.assertNotIn(b"\r", b"".join(line[:-2] for line in heard.lines if line.endswith(b"\r\n")))
        self.assertEqual([r.user for r in router.requests], [USER])

    async def test_bare_crs_count_towards_max_errors(self) -> None:
        port = await self.proxy(Router(), mode="tls", max_errors=2)

        def client() -> bytes:
            conn = self.tls(port)
            conn.sendall(b"a NOOP\r\r\nb NOOP\r\r\nc NOOP\r\n")
            return recv_all(conn)

        self.assertEqual(
            await self.in_thread(client),
            b"a BAD Bare CR or NUL character in command\r\nb BAD Bare CR or NUL character in command\r\n"
            b"* BYE Too many invalid commands\r\n",
        )
        line = await self.session_line()
        self.assertEqual(line["outcome"], "protocol-error")

    async def test_a_literal_password_with_a_cr_is_refused(self) -> None:
        router = Router()
        port = await self.proxy(router, mode="tls")

        def client() -> list[bytes]:
            conn = self.tls(port)
            conn.sendall(b"a LOGIN alice@example.test {7}\r\n")
            go_ahead = read_line(conn)
            return [go_ahead, self.talk(conn, b"pass\rwd\r\n", b"a"), self.talk(conn, b"b LOGIN {3+}\r\na\rb pw\r\n", b"b")]

        self.assertEqual(
            await self.in_thread(client),
            [
                b"+ OK\r\n",
                b"a BAD Invalid LOGIN: password contains control characters\r\n",
                b"b BAD Invalid LOGIN: user name contains control characters\r\n",
            ],
        )
        self.assertEqual(router.requests, [])

    async def test_id_values_with_control_characters_reach_the_upstream_made_safe(self) -> None:
        upstream = self.upstream()
        port = await self.proxy(Router(port=upstream.port), mode="tls")
        client_id = b'("name" {10+}\r\nMail\x1b[2J\x07\x00 "version" {4+}\r\n1\r\n2 "os\x7f" "x")'

        def client() -> list[bytes]:
            conn = self.tls(port)
            replies = [
                self.talk(conn, b"i ID " + client_id + b"\r\n", b"i"),
                self.talk(conn, b"a LOGIN alice@example.test s3cret-Pa55\r\n", b"a"),
            ]
            conn.sendall(b"z LOGOUT\r\n")
            recv_all(conn)
            return replies

        self.assertEqual(await self.in_thread(client), [b"* ID NIL\r\ni OK ID completed\r\n", b"a" + LOGGED_IN])
        heard = await self.heard(upstream)
        # Values made 7-bit printable; a field name with a control character is dropped.
        self.assertEqual(heard.commands[0], b'mr1 ID ("name" "Mail?[2J??" "version" "1??2")\r\n')
