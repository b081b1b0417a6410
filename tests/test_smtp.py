"""
The SMTP front-end over real sockets and real TLS, with Python's smtplib (or raw
bytes where a client library would hide what matters) as the client and a scripted
SMTP server as the upstream, which records every byte it hears.
"""

from __future__ import annotations

import base64
import smtplib
import socket
import time
from typing import Any

from twisted.internet.task import Clock

from mailrelay.router import Reject, Route, RouteRequest
from tests.support.frontends import PASSWORD, USER, Router, plain_ir
from tests.support.net import WAIT, closed_port, payload, recv_all
from tests.support.pki import client_context
from tests.support.smtp import MESSAGE, Heard, SMTPTestCase, password_check, raw_reply


class LoginTests(SMTPTestCase):
    async def _send_authenticated(self, mechanism: str, mode: str = "starttls", **route: Any) -> tuple[Router, Heard, Any]:
        upstream = self.upstream()
        router = Router(answer=password_check(upstream.port, **route))
        port = await self.proxy(router, mode=mode, auth=["plain", "login", "cram-md5"])

        def client() -> Any:
            with self.smtp(port, mode) as smtp:
                smtp.user, smtp.password = USER, PASSWORD
                auth = smtp.auth(mechanism, getattr(smtp, "auth_" + mechanism.lower().replace("-", "_")))
                refused = smtp.sendmail(USER, ["bob@example.test"], MESSAGE)
                return auth, refused

        result = await self.in_thread(client)
        heard: Heard = await self.in_thread(upstream.result)
        return router, heard, result

    async def test_auth_plain_over_starttls_is_passed_through_and_the_message_arrives_intact(self) -> None:
        router, heard, (auth, refused) = await self._send_authenticated("PLAIN")

        self.assertEqual(auth, (235, b"2.7.0 Authentication successful"))
        self.assertEqual(refused, {})
        self.assertEqual(heard.messages, [MESSAGE])
        self.assertEqual(heard.login, USER)
        plain = plain_ir()
        self.assertEqual(heard.lines[:2], [b"EHLO client.example\r\n", b"AUTH PLAIN " + plain + b"\r\n"])
        [request] = router.requests
        self.assertEqual(
            (request.user, request.password, request.auth_method, request.helo, request.tls, request.mode, request.attempt),
            (USER, PASSWORD, "plain", "client.example", True, "starttls", 1),
        )

    async def test_auth_login_over_implicit_tls(self) -> None:
        router, heard, (auth, refused) = await self._send_authenticated("LOGIN", mode="tls")

        self.assertEqual((auth[0], refused, heard.messages, heard.login), (235, {}, [MESSAGE], USER))
        self.assertEqual(router.requests[0].auth_method, "login")
        self.assertEqual(router.requests[0].mode, "tls")

    async def test_cram_md5_logs_in_upstream_with_the_password_the_route_supplies(self) -> None:
        router, heard, (auth, refused) = await self._send_authenticated("CRAM-MD5")

        self.assertEqual((auth[0], heard.messages, heard.login), (235, [MESSAGE], USER))
        [request] = router.requests
        self.assertEqual(request.auth_method, "cram-md5")
        assert request.salt is not None and request.password is not None
        self.assertRegex(request.salt, r"^<[0-9]+\.[0-9]+@relay\.test>$")
        self.assertRegex(request.password, "^[0-9a-f]{32}$")

    async def test_the_route_can_ask_for_auth_login_upstream(self) -> None:
        router, heard, (auth, _) = await self._send_authenticated("PLAIN", auth_mechanism="login")

        self.assertEqual(auth[0], 235)
        self.assertEqual(
            heard.lines[1:4],
            [b"AUTH LOGIN\r\n", base64.b64encode(USER.encode()) + b"\r\n", base64.b64encode(PASSWORD.encode()) + b"\r\n"],
        )

    async def test_xclient_tells_the_upstream_who_the_client_is(self) -> None:
        upstream = self.upstream(users={})
        router = Router(answer=password_check(upstream.port, login="xclient"))
        port = await self.proxy(router)

        def client() -> tuple[int, int]:
            with self.smtp(port) as smtp:
                smtp.login(USER, PASSWORD)
                smtp.sendmail(USER, ["bob@example.test"], MESSAGE)
                assert smtp.sock is not None
                return smtp.sock.getsockname()[1], port

        client_port, proxy_port = await self.in_thread(client)
        heard = await self.in_thread(upstream.result)
        self.assertEqual(
            heard.lines[:3],
            [
                b"EHLO relay.test\r\n",
                b"XCLIENT ADDR=127.0.0.1 PORT=%d NAME=[UNAVAILABLE] HELO=client.example PROTO=ESMTP"
                b" DESTADDR=127.0.0.1 DESTPORT=%d LOGIN=alice@example.test\r\n" % (client_port, proxy_port),
                b"EHLO client.example\r\n",
            ],
        )
        self.assertEqual(heard.messages, [MESSAGE])

    async def test_forward_client_sends_xclient_without_login_before_the_passthrough_auth(self) -> None:
        upstream = self.upstream()
        router = Router(answer=password_check(upstream.port, forward_client=True))
        port = await self.proxy(router)

        def client() -> tuple[int, int]:
            with self.smtp(port) as smtp:
                smtp.login(USER, PASSWORD)
                smtp.sendmail(USER, ["bob@example.test"], MESSAGE)
                assert smtp.sock is not None
                return smtp.sock.getsockname()[1], port

        client_port, proxy_port = await self.in_thread(client)
        heard = await self.in_thread(upstream.result)
        plain = plain_ir()
        self.assertEqual(
            heard.lines[:4],
            [
                b"EHLO relay.test\r\n",
                b"XCLIENT ADDR=127.0.0.1 PORT=%d NAME=[UNAVAILABLE] HELO=client.example PROTO=ESMTP"
                b" DESTADDR=127.0.0.1 DESTPORT=%d\r\n" % (client_port, proxy_port),
                b"EHLO client.example\r\n",
                b"AUTH PLAIN " + plain + b"\r\n",
            ],
        )
        self.assertEqual((heard.login, heard.messages), (USER, [MESSAGE]))

    async def test_commands_pipelined_behind_auth_reach_the_upstream(self) -> None:
        upstream = self.upstream()
        port = await self.proxy(Router(answer=password_check(upstream.port)), mode="tls")
        plain = plain_ir()

        def client() -> bytes:
            with self.tls_connect(port) as conn:
                conn.sendall(b"EHLO c.example\r\n")
                raw_reply(conn)
                conn.sendall(
                    b"AUTH PLAIN " + plain + b"\r\nMAIL FROM:<alice@example.test>\r\nRCPT TO:<bob@example.test>\r\nQUIT\r\n"
                )
                return recv_all(conn)

        self.assertEqual(
            await self.in_thread(client),
            b"235 2.7.0 Authentication successful\r\n250 2.1.0 sender ok\r\n250 2.1.5 recipient ok\r\n221 2.0.0 bye\r\n",
        )

    async def test_the_session_line_names_user_and_upstream_and_no_password(self) -> None:
        router, heard, _ = await self._send_authenticated("PLAIN")
        line = await self.session_line()
        self.assertEqual((line["user"], line["outcome"]), (USER, "closed"))
        everything = self.everything_logged()
        self.assertNotIn(PASSWORD, everything)
        self.assertNotIn(plain_ir().decode(), everything)


class CapabilityTests(SMTPTestCase):
    async def ehlo(self, port: int, tls: bool) -> bytes:
        def client() -> bytes:
            conn = self.raw(port)
            if tls:
                conn.sendall(b"STARTTLS\r\n")
                self.assertEqual(raw_reply(conn), b"220 2.0.0 Ready to start TLS\r\n")
                conn = self.context.wrap_socket(conn, server_hostname="relay.test")
            conn.sendall(b"EHLO c.example\r\n")
            return raw_reply(conn)

        return await self.in_thread(client)

    async def test_before_tls_a_required_listener_offers_starttls_and_no_auth(self) -> None:
        port = await self.proxy(Router(), auth=["plain", "login", "cram-md5"], size=10485760)
        self.assertEqual(
            await self.ehlo(port, tls=False),
            b"250-relay.test\r\n250-SIZE 10485760\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
            b"250-ENHANCEDSTATUSCODES\r\n250 STARTTLS\r\n",
        )

    async def test_after_tls_auth_is_offered_and_starttls_is_not(self) -> None:
        port = await self.proxy(Router(), auth=["plain", "login", "cram-md5"])
        self.assertEqual(
            await self.ehlo(port, tls=True),
            b"250-relay.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n250 AUTH PLAIN LOGIN CRAM-MD5\r\n",
        )

    async def test_an_optional_listener_offers_both_and_configured_capabilities(self) -> None:
        port = await self.proxy(Router(), starttls="optional", capabilities=["PIPELINING", "DSN"])
        self.assertEqual(
            await self.ehlo(port, tls=False),
            b"250-relay.test\r\n250-PIPELINING\r\n250-DSN\r\n250-AUTH PLAIN LOGIN\r\n250 STARTTLS\r\n",
        )

    async def test_greeting_and_helo_use_the_configured_host_name(self) -> None:
        port = await self.proxy(Router())

        def client() -> list[bytes]:
            conn = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
            with conn:
                greeting = raw_reply(conn)
                conn.sendall(b"HELO c.example\r\nNOOP\r\nHELP\r\nVRFY bob\r\nRSET\r\nQUIT\r\n")
                return [greeting, recv_all(conn)]

        self.assertEqual(
            await self.in_thread(client),
            [
                b"220 relay.test ESMTP ready\r\n",
                b"250 relay.test\r\n250 2.0.0 Ok\r\n"
                b"214 2.0.0 Commands: EHLO HELO STARTTLS AUTH MAIL RCPT DATA RSET NOOP QUIT\r\n"
                b"502 5.5.1 Error: command not implemented\r\n250 2.0.0 Ok\r\n221 2.0.0 Bye\r\n",
            ],
        )


class StartTLSSecurityTests(SMTPTestCase):
    async def test_auth_and_mail_before_starttls_are_refused_on_a_required_listener(self) -> None:
        router = Router()
        port = await self.proxy(router, auth=["plain", "none"])

        def client() -> bytes:
            with self.raw(port) as conn:
                conn.sendall(b"EHLO c.example\r\n")
                raw_reply(conn)
                conn.sendall(
                    b"AUTH PLAIN " + plain_ir() + b"\r\nMAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nQUIT\r\n"
                )
                return recv_all(conn)

        self.assertEqual(
            await self.in_thread(client),
            b"530 5.7.0 Must issue a STARTTLS command first\r\n" * 3 + b"221 2.0.0 Bye\r\n",
        )
        self.assertEqual(router.requests, [])

    async def test_plaintext_pipelined_after_starttls_is_not_executed(self) -> None:
        port = await self.proxy(Router(), auth=["plain", "none"])

        def client() -> list[bytes]:
            conn = self.raw(port)
            conn.sendall(b"EHLO c.example\r\n")
            raw_reply(conn)
            conn.sendall(b"STARTTLS\r\nRSET\r\nEHLO injected.example\r\n")
            go_ahead = raw_reply(conn)
            with self.context.wrap_socket(conn, server_hostname="relay.test") as tls:
                # Had EHLO been run, MAIL would be accepted; had RSET, one more reply would come.
                tls.sendall(b"MAIL FROM:<a@example.test>\r\nQUIT\r\n")
                return [go_ahead, recv_all(tls)]

        self.assertEqual(
            await self.in_thread(client),
            [b"220 2.0.0 Ready to start TLS\r\n", b"503 5.5.1 Error: send HELO/EHLO first\r\n221 2.0.0 Bye\r\n"],
        )
        self.assertIn("discarded 29 byte(s) sent in plaintext after STARTTLS", "\n".join(self.logs.lines()))

    async def test_starttls_on_an_implicit_tls_listener_is_refused(self) -> None:
        port = await self.proxy(Router(), mode="tls")

        def client() -> bytes:
            with self.tls_connect(port) as conn:
                conn.sendall(b"STARTTLS\r\nQUIT\r\n")
                return recv_all(conn)

        self.assertEqual(await self.in_thread(client), b"503 5.5.1 Error: TLS already active\r\n221 2.0.0 Bye\r\n")


class FailedLoginTests(SMTPTestCase):
    async def test_wrong_password_gets_535_after_the_delay_then_421_after_max_attempts(self) -> None:
        upstream = self.upstream()
        router = Router(answer=password_check(upstream.port, wait=0.2))
        port = await self.proxy(router, mode="tls", max_attempts=2)

        def client() -> list[Any]:
            with self.tls_connect(port) as conn:
                conn.sendall(b"EHLO c.example\r\n")
                raw_reply(conn)
                replies: list[Any] = []
                for attempt in ("wrong-1", "wrong-2"):
                    started = time.monotonic()
                    conn.sendall(b"AUTH PLAIN " + plain_ir(password=attempt) + b"\r\n")
                    replies.append(raw_reply(conn))
                    replies.append(time.monotonic() - started)
                replies.append(recv_all(conn))
                return replies

        first, first_wait, second, second_wait, rest = await self.in_thread(client)
        self.assertEqual(first, b"535 5.7.8 Authentication credentials invalid\r\n")
        self.assertEqual(second, b"535 5.7.8 Authentication credentials invalid\r\n")
        self.assertGreaterEqual(min(first_wait, second_wait), 0.2)
        self.assertEqual(rest, b"421 4.7.0 relay.test Error: too many failed logins, closing connection\r\n")
        self.assertEqual([r.attempt for r in router.requests], [1, 2])
        line = await self.session_line()
        self.assertEqual((line["outcome"], line["reason"]), ("rejected", "Authentication credentials invalid"))
        # Every event of every level (the capture sees debug too), formatted and raw.
        everything = self.everything_logged()
        self.assertTrue(any(e["log_level"].name == "info" for e in self.logs.events))
        self.assertNotIn("wrong-1", everything)
        self.assertNotIn("wrong-2", everything)
        self.assertIn("login refused for alice@example.test from 127.0.0.1", everything)

    async def test_after_a_failure_the_client_may_try_again_and_succeed(self) -> None:
        upstream = self.upstream()
        port = await self.proxy(Router(answer=password_check(upstream.port)), mode="tls")

        def client() -> Any:
            with self.smtp(port, "tls") as smtp:
                smtp.user, smtp.password = USER, "wrong"
                try:
                    smtp.auth("PLAIN", smtp.auth_plain)
                except smtplib.SMTPAuthenticationError as e:
                    first = e.smtp_code
                smtp.password = PASSWORD
                second = smtp.auth("PLAIN", smtp.auth_plain)[0]
                smtp.sendmail(USER, ["bob@example.test"], MESSAGE)
                return first, second

        self.assertEqual(await self.in_thread(client), (535, 235))
        self.assertEqual((await self.in_thread(upstream.result)).messages, [MESSAGE])

    async def test_an_upstream_refusing_the_login_is_a_535_for_the_client(self) -> None:
        upstream = self.upstream(users={USER: "another password"})
        port = await self.proxy(Router(answer=password_check(upstream.port)), mode="tls")

        self.assertEqual(await self.in_thread(self.try_auth, port), (535, b"5.7.8 Authentication credentials invalid"))


class TemporaryFailureTests(SMTPTestCase):
    async def auth_reply(self, router: Any) -> Any:
        port = await self.proxy(router, mode="tls")

        def client() -> Any:
            with self.smtp(port, "tls") as smtp:
                smtp.user, smtp.password = USER, PASSWORD
                try:
                    smtp.auth("PLAIN", smtp.auth_plain)
                except smtplib.SMTPAuthenticationError as e:
                    return e.smtp_code, e.smtp_error, smtp.noop()[0]
                return None

        return await self.in_thread(client)

    async def test_upstream_down_is_451(self) -> None:
        reply = await self.auth_reply(Router(port=closed_port()))
        self.assertEqual(reply, (451, b"4.4.1 Mail server temporarily unavailable, try again later", 250))
        line = await self.session_line()
        self.assertEqual(line["outcome"], "upstream-unavailable")

    async def test_router_raising_is_451(self) -> None:
        def broken(request: RouteRequest) -> Route:
            raise RuntimeError("router bug")

        reply = await self.auth_reply(Router(answer=broken))
        self.assertEqual(reply, (451, b"4.3.0 Temporary failure, try again later", 250))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)  # logged with its traceback, for the router's author

    async def test_upstream_answering_auth_with_a_temporary_error_is_451(self) -> None:
        upstream = self.upstream(auth_reply=b"454 4.7.0 Temporary authentication failure")
        reply = await self.auth_reply(Router(port=upstream.port))
        self.assertEqual(reply[0], 451)
        self.assertIn("upstream answered AUTH with 454 4.7.0 Temporary authentication failure", "\n".join(self.logs.lines()))

    async def test_upstream_without_xclient_is_451_and_says_why_in_the_log(self) -> None:
        upstream = self.upstream(extensions=("PIPELINING",))
        reply = await self.auth_reply(Router(port=upstream.port, login="xclient", verifies_passwords=True))
        self.assertEqual(reply[0], 451)
        self.assertIn("upstream does not offer XCLIENT", "\n".join(self.logs.lines()))


class MalformedInputTests(SMTPTestCase):
    async def exchange(self, send: bytes, **listener: Any) -> bytes:
        port = await self.proxy(Router(), **listener)

        def client() -> bytes:
            with self.raw(port) as conn:
                conn.sendall(send)
                return recv_all(conn)

        return await self.in_thread(client)

    async def test_over_long_line_nul_and_unknown_commands_get_errors_and_the_session_goes_on(self) -> None:
        reply = await self.exchange(b"NOOP " + b"x" * 100_000 + b"\r\nNO\0OP\r\nXYZZY\r\nNOOP\r\nQUIT\r\n")
        self.assertEqual(
            reply,
            b"500 5.5.6 Error: line too long\r\n500 5.5.2 Error: bare CR or NUL character in command\r\n"
            b"500 5.5.2 Error: command not recognized\r\n250 2.0.0 Ok\r\n221 2.0.0 Bye\r\n",
        )

    async def test_too_many_errors_close_the_connection(self) -> None:
        reply = await self.exchange(b"BAD1\r\nBAD2\r\nBAD3\r\nNOOP\r\n", max_errors=3)
        self.assertEqual(
            reply,
            b"500 5.5.2 Error: command not recognized\r\n" * 3 + b"421 4.7.0 relay.test Error: too many errors\r\n",
        )
        line = await self.session_line()
        self.assertEqual(line["outcome"], "protocol-error")

    async def test_silence_before_login_times_out(self) -> None:
        clock = Clock()
        port = await self.proxy(Router(), clock=clock, login_timeout=60)
        conn = await self.in_thread(self.raw, port)

        clock.advance(59)
        self.assertEqual(self.logs.sessions(), [])
        clock.advance(1)

        self.assertEqual(await self.in_thread(recv_all, conn), b"421 4.4.2 relay.test Error: timeout exceeded\r\n")
        line = await self.session_line()
        self.assertEqual(line["outcome"], "idle-timeout")


class SASLInputTests(SMTPTestCase):
    async def after_tls(self, send: bytes, **listener: Any) -> bytes:
        router = Router()
        port = await self.proxy(router, mode="tls", **listener)

        def client() -> bytes:
            return self.tls_exchange(port, send + b"QUIT\r\n")

        reply = await self.in_thread(client)
        self.assertEqual(router.requests, [])
        return reply

    async def test_broken_base64_cancellation_and_bad_mechanisms(self) -> None:
        reply = await self.after_tls(
            b"AUTH PLAIN not*base64\r\n"
            b"AUTH PLAIN\r\n*\r\n"
            b"AUTH LOGIN\r\n!!!\r\n"
            b"AUTH PLAIN " + base64.b64encode(b"only-one-part") + b"\r\n"
            b"AUTH GSSAPI\r\n"
            b"AUTH\r\n",
            max_errors=10,
        )
        self.assertEqual(
            reply,
            b"501 5.5.2 invalid base64 in the response\r\n"
            b"334 \r\n501 5.7.0 Authentication cancelled\r\n"
            b"334 VXNlcm5hbWU6\r\n501 5.5.2 invalid base64 in the response\r\n"
            b"501 5.5.2 PLAIN response is not authzid NUL user NUL password\r\n"
            b"504 5.5.4 Unrecognized authentication type\r\n"
            b"501 5.5.4 Syntax: AUTH mechanism [initial-response]\r\n"
            b"221 2.0.0 Bye\r\n",
        )

    async def test_mechanisms_not_listed_are_refused(self) -> None:
        reply = await self.after_tls(b"AUTH CRAM-MD5\r\nAUTH XOAUTH2 =\r\n", auth=["plain"])
        self.assertEqual(reply, b"504 5.5.4 Unrecognized authentication type\r\n" * 2 + b"221 2.0.0 Bye\r\n")


class RelayTests(SMTPTestCase):
    """`auth = ["none"]`: MX and relay use, routed at the first RCPT TO."""

    async def relay(self, router: Router, send: bytes, **listener: Any) -> bytes:
        port = await self.proxy(router, mode="starttls", starttls="optional", auth=["none"], **listener)

        def client() -> bytes:
            with self.raw(port) as conn:
                conn.sendall(b"EHLO mx.sender.example\r\n")
                raw_reply(conn)
                conn.sendall(send)
                return recv_all(conn)

        return await self.in_thread(client)

    async def test_the_envelope_is_routed_at_the_first_rcpt_and_replayed_upstream(self) -> None:
        upstream = self.upstream(refuse_rcpt=("nobody@example.test",))
        router = Router(port=upstream.port, login="none")
        reply = await self.relay(
            router,
            b"MAIL FROM:<s@sender.example> SIZE=100\r\nRCPT TO:<bob@example.test> NOTIFY=NEVER\r\n"
            b"RCPT TO:<nobody@example.test>\r\nDATA\r\n" + MESSAGE.replace(b"\r\n.", b"\r\n..") + b".\r\nQUIT\r\n",
        )

        self.assertEqual(
            reply,
            b"250 2.1.0 Ok\r\n250 2.1.5 recipient ok\r\n550 5.1.1 <nobody@example.test> no such user\r\n"
            b"354 go ahead\r\n250 2.0.0 queued as 1\r\n221 2.0.0 bye\r\n",
        )
        heard = await self.in_thread(upstream.result)
        self.assertEqual(
            heard.lines,
            [
                b"EHLO mx.sender.example\r\n",
                b"MAIL FROM:<s@sender.example> SIZE=100\r\n",
                b"RCPT TO:<bob@example.test> NOTIFY=NEVER\r\n",
                b"RCPT TO:<nobody@example.test>\r\n",
                b"DATA\r\n",
                b"QUIT\r\n",
            ],
        )
        self.assertEqual(heard.messages, [MESSAGE])
        [request] = router.requests
        self.assertEqual(
            (request.auth_method, request.user, request.helo, request.mail_from, request.rcpt_to),
            (
                "none",
                None,
                "mx.sender.example",
                "MAIL FROM:<s@sender.example> SIZE=100",
                "RCPT TO:<bob@example.test> NOTIFY=NEVER",
            ),
        )
        self.assertEqual((request.sender, request.recipient), ("s@sender.example", "bob@example.test"))

    async def test_a_recipient_the_router_refuses_is_answered_locally_and_the_next_one_routed(self) -> None:
        upstream = self.upstream()

        def answer(request: RouteRequest) -> Route:
            if request.recipient == "spam@example.test":
                raise Reject("5.1.1 Recipient rejected", code=550)
            return Route(host="127.0.0.1", port=upstream.port, login="none")

        router = Router(answer=answer)
        reply = await self.relay(
            router, b"MAIL FROM:<s@sender.example>\r\nRCPT TO:<spam@example.test>\r\nRCPT TO:<bob@example.test>\r\nQUIT\r\n"
        )
        self.assertEqual(reply, b"250 2.1.0 Ok\r\n550 5.1.1 Recipient rejected\r\n250 2.1.5 recipient ok\r\n221 2.0.0 bye\r\n")
        self.assertEqual([r.recipient for r in router.requests], ["spam@example.test", "bob@example.test"])

    async def test_xclient_then_the_envelope(self) -> None:
        upstream = self.upstream()
        reply = await self.relay(
            Router(port=upstream.port, login="xclient"), b"MAIL FROM:<>\r\nRCPT TO:<postmaster@example.test>\r\nQUIT\r\n"
        )
        self.assertEqual(reply, b"250 2.1.0 Ok\r\n250 2.1.5 recipient ok\r\n221 2.0.0 bye\r\n")
        heard = await self.in_thread(upstream.result)
        self.assertEqual(heard.lines[0], b"EHLO relay.test\r\n")
        self.assertTrue(heard.lines[1].startswith(b"XCLIENT ADDR=127.0.0.1 PORT="), heard.lines[1])
        self.assertIn(b" HELO=mx.sender.example PROTO=ESMTP ", heard.lines[1])
        self.assertNotIn(b"LOGIN=", heard.lines[1])
        self.assertEqual(
            heard.lines[2:],
            [b"EHLO mx.sender.example\r\n", b"MAIL FROM:<>\r\n", b"RCPT TO:<postmaster@example.test>\r\n", b"QUIT\r\n"],
        )

    async def test_sequence_and_syntax_errors_before_routing(self) -> None:
        router = Router()
        reply = await self.relay(
            router,
            b"RCPT TO:<bob@example.test>\r\nDATA\r\nMAIL FROM:bob\r\nMAIL FROM:<s@x> SIZE=2000\r\n"
            b"MAIL FROM:<s@x>\r\nMAIL FROM:<t@x>\r\nRCPT TO:\r\nDATA\r\nRSET\r\n"
            b"RCPT TO:<bob@example.test>\r\nAUTH PLAIN\r\nQUIT\r\n",
            size=1000,
        )
        self.assertEqual(
            reply,
            b"503 5.5.1 Error: need MAIL command\r\n"
            b"503 5.5.1 Error: need MAIL command\r\n"
            b"501 5.5.4 Syntax: MAIL FROM:<address>\r\n"
            b"552 5.3.4 Message size exceeds fixed limit\r\n"
            b"250 2.1.0 Ok\r\n"
            b"503 5.5.1 Error: nested MAIL command\r\n"
            b"501 5.5.4 Syntax: RCPT TO:<address>\r\n"
            b"554 5.5.1 Error: no valid recipients\r\n"
            b"250 2.0.0 Ok\r\n"
            b"503 5.5.1 Error: need MAIL command\r\n"
            b"503 5.5.1 Error: authentication not enabled\r\n"
            b"221 2.0.0 Bye\r\n",
        )
        self.assertEqual(router.requests, [])

    async def test_a_required_listener_refuses_the_envelope_before_tls(self) -> None:
        # nginx's `starttls only` lets MAIL and RCPT through in plaintext; mailrelay does not.
        router = Router()
        port = await self.proxy(router, auth=["none"])

        def client() -> bytes:
            with self.raw(port) as conn:
                conn.sendall(b"EHLO mx.sender.example\r\nMAIL FROM:<s@x>\r\nRCPT TO:<bob@example.test>\r\nQUIT\r\n")
                return recv_all(conn)

        reply = await self.in_thread(client)
        self.assertEqual(
            reply.split(b"\r\n")[-4:],
            [b"530 5.7.0 Must issue a STARTTLS command first"] * 2 + [b"221 2.0.0 Bye", b""],
        )
        self.assertEqual(router.requests, [])

    async def test_mail_on_a_login_listener_needs_authentication(self) -> None:
        port = await self.proxy(Router(), mode="tls")

        def client() -> bytes:
            with self.tls_connect(port) as conn:
                conn.sendall(b"EHLO c.example\r\nMAIL FROM:<s@x>\r\nRCPT TO:<b@y>\r\nDATA\r\nQUIT\r\n")
                raw_reply(conn)
                return recv_all(conn)

        self.assertEqual(await self.in_thread(client), b"530 5.7.0 Authentication required\r\n" * 3 + b"221 2.0.0 Bye\r\n")


class TokenAndCertificateTests(SMTPTestCase):
    async def test_xoauth2_is_passed_through_in_its_own_mechanism(self) -> None:
        token = "ya29.a0-TOKEN_value"
        upstream = self.upstream(users={USER: token}, mechanisms=("PLAIN", "XOAUTH2"))
        router = Router(port=upstream.port)
        port = await self.proxy(router, mode="tls", auth=["xoauth2", "oauthbearer"])
        initial = base64.b64encode(f"user={USER}\x01auth=Bearer {token}\x01\x01".encode())

        def client() -> bytes:
            return self.tls_exchange(port, b"AUTH XOAUTH2 " + initial + b"\r\nQUIT\r\n")

        self.assertEqual(await self.in_thread(client), b"235 2.7.0 Authentication successful\r\n221 2.0.0 bye\r\n")
        heard = await self.in_thread(upstream.result)
        self.assertEqual(heard.lines[1], b"AUTH XOAUTH2 " + initial + b"\r\n")
        self.assertEqual(heard.login, USER)
        [request] = router.requests
        self.assertEqual((request.user, request.password, request.auth_method), (USER, token, "xoauth2"))

    async def test_external_authenticates_with_the_verified_client_certificate(self) -> None:
        upstream = self.upstream()
        router = Router(port=upstream.port, login="xclient")
        client_cert = self.pki.ca.issue_cert("alice@example.test", common_name="alice")
        config = self.front_end_config("tls", auth=["plain", "external"])
        config["tls"]["client_ca"] = self.pki.ca_file
        _, port = await self.start_proxy(config, router=router)
        with_cert = client_context(self.pki.ca)
        client_cert.configure_cert(with_cert)

        def client(context: Any) -> bytes:
            with self.tls_connect(port, context) as conn:
                conn.sendall(b"EHLO c.example\r\n")
                ehlo = raw_reply(conn)
                conn.sendall(b"AUTH EXTERNAL =\r\nQUIT\r\n")
                return ehlo.splitlines()[-1] + b"|" + recv_all(conn)

        without = await self.in_thread(client, self.context)
        self.assertEqual(without, b"250 AUTH PLAIN|504 5.5.4 Unrecognized authentication type\r\n221 2.0.0 Bye\r\n")
        self.assertEqual(
            await self.in_thread(client, with_cert),
            b"250 AUTH PLAIN EXTERNAL|235 2.7.0 Authentication successful\r\n221 2.0.0 bye\r\n",
        )
        [request] = router.requests
        assert request.client_cert is not None
        self.assertEqual((request.auth_method, request.user), ("external", request.client_cert.subject))
        assert request.user is not None
        self.assertTrue(request.user.startswith("CN=alice,"), request.user)
        heard = await self.in_thread(upstream.result)
        self.assertIn(b" LOGIN=CN+3Dalice,", heard.lines[1])  # xtext: `=` is +3D


class LoginLimitTests(SMTPTestCase):
    async def test_past_the_limit_the_router_is_not_asked_and_the_client_gets_421(self) -> None:
        upstream = self.upstream()
        router = Router(answer=password_check(upstream.port))
        config = self.front_end_config("tls", max_attempts=5)
        config["login_limits"] = {"max_per_client": 2, "max_per_user": 100, "delay": 0}
        _, port = await self.start_proxy(config, router=router)

        def client() -> bytes:
            with self.tls_connect(port) as conn:
                conn.sendall(b"EHLO c.example\r\n")
                raw_reply(conn)
                for password in ("bad1", "bad2", PASSWORD):
                    conn.sendall(b"AUTH PLAIN " + plain_ir(password=password) + b"\r\n")
                return recv_all(conn)

        self.assertEqual(
            await self.in_thread(client),
            b"535 5.7.8 Authentication credentials invalid\r\n" * 2 + b"421 4.7.0 Too many failed logins, try again later\r\n",
        )
        self.assertEqual(len(router.requests), 2)  # the third, right, password never reached it
        line = await self.session_line()
        self.assertEqual(line["outcome"], "throttled")


class VetAllRecipientsTests(SMTPTestCase):
    """`vet_recipients = "all"`: every RCPT is the Router's to accept, not only the first."""

    async def test_every_recipient_is_vetted_and_refused_ones_never_reach_the_upstream(self) -> None:
        upstream = self.upstream(refuse_rcpt=("gone@example.test",), extensions=("PIPELINING", "CHUNKING"))
        elsewhere = self.upstream()

        def answer(request: RouteRequest) -> Route:
            assert request.recipient is not None  # vetting recipients: each RCPT is a request
            if request.recipient.startswith("spam"):
                raise Reject("5.7.1 Recipient refused by policy", code=550)
            if request.recipient.endswith("@other.test"):
                return Route(host="127.0.0.1", port=elsewhere.port, login="none")
            return Route(host="127.0.0.1", port=upstream.port, login="none")

        router = Router(answer=answer)
        port = await self.proxy(router, mode="tls", auth=["none"], vet_recipients="all")
        big = MESSAGE + b"".join(b"line %06d .. with some text\r\n" % i for i in range(20000)) + b".\r\n"  # ~640 kB
        stuffed = big.replace(b"\r\n.", b"\r\n..")

        def client() -> bytes:
            with self.tls_connect(port) as conn:
                conn.sendall(
                    b"EHLO mx.sender.example\r\nMAIL FROM:<s@sender.example>\r\nRCPT TO:<bob@example.test>\r\n"
                    b"RCPT TO:<spam1@example.test>\r\nRCPT TO:<x@other.test>\r\nRCPT TO:<gone@example.test>\r\n"
                    b"RCPT TO:<carol@example.test>\r\nDATA\r\n"
                )
                conn.sendall(stuffed + b".\r\n")
                # A second transaction in the same session is vetted too.
                conn.sendall(
                    b"MAIL FROM:<t@sender.example>\r\nRCPT TO:<spam2@example.test>\r\nRCPT TO:<dave@example.test>\r\n"
                    b"BDAT 5 LAST\r\nhello"
                    b"RCPT TO:<spam3@example.test>\r\n"  # outside a transaction: vetted all the same
                    b"STARTTLS\r\nQUIT\r\n"
                )
                return recv_all(conn)

        reply = await self.in_thread(client)
        self.assertEqual(
            reply.split(b"\r\n")[4:],
            [
                b"250 2.1.0 Ok",
                b"250 2.1.5 recipient ok",
                b"550 5.7.1 Recipient refused by policy",
                b"451 4.3.0 Recipient served elsewhere: send it in a transaction of its own",
                b"550 5.1.1 <gone@example.test> no such user",
                b"250 2.1.5 recipient ok",
                b"354 go ahead",
                b"250 2.0.0 queued as 1",
                b"250 2.1.0 sender ok",
                b"550 5.7.1 Recipient refused by policy",
                b"250 2.1.5 recipient ok",
                b"250 2.0.0 5 octets received",
                b"550 5.7.1 Recipient refused by policy",
                b"503 5.5.1 Error: STARTTLS not available in this session",
                b"221 2.0.0 bye",
                b"",
            ],
        )
        heard = await self.in_thread(upstream.result)
        self.assertEqual(heard.messages, [big, b"hello"])  # a content line "." is stuffed and unstuffed
        recipients = [line for line in heard.lines if line.startswith(b"RCPT")]
        self.assertEqual(
            recipients,
            [
                b"RCPT TO:<bob@example.test>\r\n",
                b"RCPT TO:<gone@example.test>\r\n",
                b"RCPT TO:<carol@example.test>\r\n",
                b"RCPT TO:<dave@example.test>\r\n",
            ],
        )
        self.assertIn(b"BDAT 5 LAST\r\n", heard.lines)
        self.assertEqual(elsewhere.connections, 0)
        self.assertEqual(
            [r.recipient for r in router.requests],
            [
                "bob@example.test",
                "spam1@example.test",
                "x@other.test",
                "gone@example.test",
                "carol@example.test",
                "spam2@example.test",
                "dave@example.test",
                "spam3@example.test",
            ],
        )
        self.assertEqual(router.requests[-2].sender, "t@sender.example")
        self.assertIsNone(router.requests[-1].sender)  # the upstream ended that transaction with the message
        line = await self.session_line()
        self.assertEqual((line["outcome"], line["reason"]), ("closed", "client closed first"))


class UpstreamTLSTests(SMTPTestCase):
    def upstream_tls(self) -> Any:
        import ssl

        issued = self.pki.issue("upstream", "upstream.test")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(issued.cert, issued.key)
        return context

    async def test_upstream_starttls_then_auth_inside_tls(self) -> None:
        upstream = self.upstream(tls=self.upstream_tls())
        router = Router(port=upstream.port, tls="starttls", server_name="upstream.test", tls_ca=self.pki.ca_file)
        port = await self.proxy(router, mode="tls")

        def client() -> Any:
            with self.smtp(port, "tls") as smtp:
                smtp.login(USER, PASSWORD)
                return smtp.sendmail(USER, ["bob@example.test"], MESSAGE)

        self.assertEqual(await self.in_thread(client), {})
        heard = await self.in_thread(upstream.result)
        self.assertEqual(heard.lines[:3], [b"EHLO client.example\r\n", b"STARTTLS\r\n", b"EHLO client.example\r\n"])
        self.assertTrue(heard.lines[3].startswith(b"AUTH PLAIN "))
        self.assertEqual((heard.login, heard.messages), (USER, [MESSAGE]))

    async def test_an_upstream_certificate_for_another_name_is_refused(self) -> None:
        upstream = self.upstream(tls=self.upstream_tls())
        router = Router(port=upstream.port, tls="starttls", server_name="elsewhere.test", tls_ca=self.pki.ca_file)
        port = await self.proxy(router, mode="tls")

        self.assertEqual((await self.in_thread(self.try_auth, port))[0], 451)
        self.assertTrue(any("elsewhere.test" in line and "failed: TLS" in line for line in self.logs.lines()), self.logs.lines())


class AIOSMTPDUpstreamTests(SMTPTestCase):
    """Passthrough AUTH to a real SMTP server with its own AUTH (aiosmtpd)."""

    async def test_auth_login_passthrough_of_an_8_mib_8bit_message(self) -> None:
        from tests.support.aiosmtpd_server import SMTPUpstream

        upstream = SMTPUpstream(users={USER: PASSWORD})
        upstream.start()
        self.addCleanup(upstream.stop)
        port = await self.proxy(Router(answer=password_check(upstream.port, auth_mechanism="login")))
        body = payload(8 << 20, seed=9).replace(b"\r", b"\x8d").replace(b"\n", b"\x8a").replace(b".", b"\xae")
        message = b"Subject: big\r\n\r\n" + b"\r\n".join(body[i : i + 998] for i in range(0, len(body), 998)) + b"\r\n.\r\n"

        def client() -> Any:
            with self.smtp(port) as smtp:
                smtp.user, smtp.password = USER, PASSWORD
                smtp.auth("LOGIN", smtp.auth_login)
                return smtp.sendmail(USER, ["bob@example.test"], message, mail_options=["BODY=8BITMIME"])

        self.assertEqual(await self.in_thread(client), {})
        [received] = await self.in_thread(upstream.wait_for_messages, 1)
        self.assertEqual((received.login, received.mail_from, received.rcpt_tos), (USER, USER, ("bob@example.test",)))
        self.assertTrue(received.content == message, "the message arrived altered")


class RobustnessTests(SMTPTestCase):
    async def test_random_command_streams_get_only_smtp_replies_and_never_break_the_proxy(self) -> None:
        import random

        verbs = [
            b"EHLO",
            b"HELO",
            b"AUTH",
            b"MAIL",
            b"RCPT",
            b"DATA",
            b"BDAT",
            b"RSET",
            b"NOOP",
            b"QUIT",
            b"STARTTLS",
            b"XCLIENT",
        ]
        pieces = [
            b"PLAIN",
            b"LOGIN",
            b"CRAM-MD5",
            b"FROM:<a@b>",
            b"TO:<c@d>",
            b"=",
            b"*",
            b"\x00",
            b"\xff\xfe",
            b"<",
            b" ",
            b"AAAA",
        ]
        randomness = random.Random(20261125)
        upstream = self.upstream()
        router = Router(answer=password_check(upstream.port))
        port = await self.proxy(router, mode="tls", auth=["plain", "login", "cram-md5", "none"], max_errors=1000)

        def stream() -> bytes:
            lines = []
            for _ in range(300):
                words = [randomness.choice(verbs)] + [randomness.choice(pieces) for _ in range(randomness.randrange(3))]
                if randomness.random() < 0.1:
                    words = [bytes(randomness.randrange(256) for _ in range(randomness.randrange(1, 40)))]
                lines.append(b" ".join(words))
            return b"\r\n".join(lines) + b"\r\n"

        def client() -> list[bytes]:
            replies = []
            for _ in range(5):
                with self.tls_connect(port) as conn:
                    conn.sendall(stream())
                    try:
                        replies.append(recv_all(conn))
                    except ConnectionResetError:
                        replies.append(b"")
            return replies

        for reply in await self.in_thread(client):
            for line in reply.splitlines():
                self.assertRegex(line, rb"^[2-5][0-9][0-9][ -]", reply)
        self.assertEqual(self.flushLoggedErrors(), [])
        # The proxy still serves a well-behaved client.
        self.assertEqual((await self.in_thread(self.try_auth, port))[0], 235)
