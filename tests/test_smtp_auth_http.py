"""
The `http` router behind the SMTP front-end, end to end: a real SMTP client (smtplib,
or raw bytes over TLS where the exact reply or its timing matters), mailrelay with
`router = { type = "http" }` asking an nginx-style auth service (`AuthService`, the
standard library's http.server in a thread), and a scripted SMTP upstream that records
every line it hears. Each auth_http response header is checked by its effect on what
the client and the upstream see.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

from twisted.internet.task import Clock

from mailrelay.sasl import plain_response
from tests.support.frontends import PASSWORD, USER
from tests.support.httpauth import AuthService, Reply, Seen, answer, ok
from tests.support.net import WAIT, closed_port, recv_all
from tests.support.smtp import MESSAGE, Heard, ScriptedSMTP, SMTPTestCase, raw_reply

TEMPORARY = b"451 4.3.0 Temporary failure, try again later\r\n"
INVALID = "Invalid login or password"


def plain(user: str, password: str) -> bytes:
    return base64.b64encode(plain_response(user, password))


def auth_plain(user: str = USER, password: str = PASSWORD) -> bytes:
    return b"AUTH PLAIN " + plain(user, password) + b"\r\n"


def refusal(*more: tuple[str, str], text: str = INVALID) -> Callable[[Seen], Reply]:
    return answer(("Auth-Status", text), *more)


def password_check(port: int, *more: tuple[str, str], wait: str | None = "1") -> Callable[[Seen], Reply]:
    """nginx's documented script: OK for the right password, a failure otherwise."""

    def check(seen: Seen) -> Reply:
        if seen.get("Auth-Pass") == PASSWORD:
            return ok("127.0.0.1", port, *more)(seen)
        return refusal(*([("Auth-Wait", wait)] if wait is not None else []))(seen)

    return check


class Session:
    """A raw SMTP client session over TLS (implicit or STARTTLS), EHLO'd."""

    def __init__(self, port: int, context: ssl.SSLContext, mode: str = "tls", helo: bytes = b"client.example") -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        if mode == "tls":
            self.conn: Any = context.wrap_socket(raw, server_hostname="relay.test")
            self.greeting = raw_reply(self.conn)
        else:
            self.conn = raw
            self.greeting = raw_reply(self.conn)
            self.command(b"EHLO " + helo)
            assert self.command(b"STARTTLS") == b"220 2.0.0 Ready to start TLS\r\n"
            self.conn = context.wrap_socket(raw, server_hostname="relay.test")
        self.ehlo = self.command(b"EHLO " + helo)
        self.local_port: int = self.conn.getsockname()[1]

    def command(self, line: bytes) -> bytes:
        self.conn.sendall(line + b"\r\n")
        return raw_reply(self.conn)

    def timed(self, line: bytes) -> tuple[bytes, float]:
        started = time.monotonic()
        reply = self.command(line)
        return reply, time.monotonic() - started

    def send(self, data: bytes) -> None:
        self.conn.sendall(data)

    def rest(self) -> bytes:
        """Everything until the connection closes."""
        return recv_all(self.conn)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AuthHTTPTestCase(SMTPTestCase):
    def setUp(self) -> None:
        super().setUp()
        # Runs after the proxy has stopped (cleanups run last-added first): no test may
        # leave the client's password in a log line.
        self.addCleanup(self.assert_no_password_logged)

    def assert_no_password_logged(self, *secrets: str) -> None:
        everything = self.everything_logged()
        for secret in (PASSWORD, plain(USER, PASSWORD).decode(), *secrets):
            self.assertNotIn(secret, everything)

    def service(self, reply: Callable[[Seen], Reply], **options: Any) -> AuthService:
        service = AuthService(reply, **options)
        self.addCleanup(service.close)
        return service

    async def proxy_to(
        self, url: str, mode: str = "tls", router: dict[str, Any] | None = None, clock: Clock | None = None, **listener: Any
    ) -> int:
        """mailrelay with one SMTP listener routed by the auth service at `url`, its
        timers (the router's too) on `clock` if one is given."""
        config = self.front_end_config(mode, **listener)
        config["upstream"] = {"ca": self.pki.ca_file}
        config["router"] = {"type": "http", "url": url, "timeout": 5, **(router or {})}
        _, port = await self.start_proxy(config, clock=clock)
        return port

    def session(self, port: int, mode: str = "tls", helo: bytes = b"client.example") -> Session:
        session = Session(port, self.context, mode, helo)
        self.addCleanup(session.close)
        return session

    async def heard(self, upstream: Any) -> Heard:
        heard: Heard = await self.in_thread(upstream.result)
        return heard


class AuthStatusOKTests(AuthHTTPTestCase):
    async def test_ok_routes_and_smtp_logs_in_upstream_with_xclient_by_default(self) -> None:
        upstream = self.upstream(users={})  # XCLIENT: the upstream checks no password
        service = self.service(ok("127.0.0.1", upstream.port))
        port = await self.proxy_to(service.url, mode="starttls")

        def client() -> tuple[Any, int]:
            with self.smtp(port) as smtp:
                login = smtp.login(USER, PASSWORD)
                refused = smtp.sendmail(USER, ["bob@example.test"], MESSAGE)
                assert smtp.sock is not None
                return (login, refused), smtp.sock.getsockname()[1]

        (login, refused), client_port = await self.in_thread(client)
        self.assertEqual((login, refused), ((235, b"2.7.0 Authentication successful"), {}))
        heard = await self.heard(upstream)
        self.assertEqual(
            heard.lines[:3],
            [
                b"EHLO relay.test\r\n",
                b"XCLIENT ADDR=127.0.0.1 PORT=%d NAME=[UNAVAILABLE] HELO=client.example PROTO=ESMTP"
                b" DESTADDR=127.0.0.1 DESTPORT=%d LOGIN=alice@example.test\r\n" % (client_port, port),
                b"EHLO client.example\r\n",
            ],
        )
        self.assertEqual(heard.messages, [MESSAGE])
        self.assertFalse(any(line.startswith(b"AUTH") for line in heard.lines))

        [seen] = service.requests
        self.assertEqual(
            seen.headers[:9],
            [
                ("Host", b"127.0.0.1"),
                ("Auth-Method", b"plain"),
                ("Auth-User", USER.encode()),
                ("Auth-Pass", PASSWORD.encode()),
                ("Auth-Protocol", b"smtp"),
                ("Auth-Login-Attempt", b"1"),
                ("Client-IP", b"127.0.0.1"),
                ("Client-Host", b"[UNAVAILABLE]"),
                ("Auth-SSL", b"on"),
            ],
        )
        self.assertRegex(seen.get("Auth-SSL-Protocol") or "", r"^TLSv1\.[23]$")
        self.assertEqual([name for name, _ in seen.headers[9:]], ["Auth-SSL-Protocol", "Auth-SSL-Cipher"])
        self.assertIsNone(seen.get("Auth-SMTP-Helo"))  # only with Auth-Method: none
        line = await self.session_line()
        self.assertEqual((line["user"], line["upstream"], line["outcome"]), (USER, f"127.0.0.1:{upstream.port}", "closed"))

    async def test_auth_user_replaces_the_xclient_login(self) -> None:
        upstream = self.upstream(users={})
        service = self.service(ok("127.0.0.1", upstream.port, ("Auth-User", "alice.smith")))
        port = await self.proxy_to(service.url)

        def client() -> bytes:
            with self.session(port) as session:
                return session.command(auth_plain().rstrip()) + session.command(b"QUIT")

        self.assertEqual(await self.in_thread(client), b"235 2.7.0 Authentication successful\r\n221 2.0.0 bye\r\n")
        heard = await self.heard(upstream)
        self.assertTrue(heard.lines[1].startswith(b"XCLIENT "), heard.lines[1])
        self.assertTrue(heard.lines[1].endswith(b" LOGIN=alice.smith\r\n"), heard.lines[1])

    async def test_auth_user_and_pass_replace_the_clients_credentials_for_a_passthrough_login(self) -> None:
        # Taken as sent: "%20" is not percent-decoded (nginx does not either).
        upstream = self.upstream(users={"mbox-4711": "upstream%20secret"})
        service = self.service(
            ok(
                "127.0.0.1",
                upstream.port,
                ("Auth-User", "mbox-4711"),
                ("Auth-Pass", "upstream%20secret"),
                ("Mailrelay-Login", "passthrough"),
            )
        )
        port = await self.proxy_to(service.url)

        def client() -> Any:
            with self.smtp(port, "tls") as smtp:
                login = smtp.login(USER, PASSWORD)
                smtp.sendmail(USER, ["bob@example.test"], MESSAGE)
                return login

        self.assertEqual((await self.in_thread(client))[0], 235)
        heard = await self.heard(upstream)
        self.assertEqual(heard.lines[:2], [b"EHLO client.example\r\n", auth_plain("mbox-4711", "upstream%20secret")])
        self.assertEqual((heard.login, heard.messages), ("mbox-4711", [MESSAGE]))
        self.assertNotIn(PASSWORD.encode(), b"".join(heard.lines))
        self.assertNotIn(plain(USER, PASSWORD), b"".join(heard.lines))
        self.assert_no_password_logged("upstream%20secret")

    async def test_mailrelay_auth_mechanism_login_logs_in_upstream_with_auth_login(self) -> None:
        upstream = self.upstream(users={"mbox-4711": "upstream-secret"})
        more = [("Auth-User", "mbox-4711"), ("Auth-Pass", "upstream-secret")]
        more += [("Mailrelay-Login", "passthrough"), ("Mailrelay-Auth-Mechanism", "login")]
        service = self.service(ok("127.0.0.1", upstream.port, *more))
        port = await self.proxy_to(service.url)

        def client() -> bytes:
            with self.session(port) as session:
                return session.command(auth_plain().rstrip()) + session.command(b"QUIT")

        self.assertEqual(await self.in_thread(client), b"235 2.7.0 Authentication successful\r\n221 2.0.0 bye\r\n")
        heard = await self.heard(upstream)
        self.assertEqual(
            heard.lines[1:4],
            [b"AUTH LOGIN\r\n", base64.b64encode(b"mbox-4711") + b"\r\n", base64.b64encode(b"upstream-secret") + b"\r\n"],
        )
        self.assertEqual(heard.login, "mbox-4711")

    async def test_passthrough_without_overrides_uses_the_clients_credentials(self) -> None:
        upstream = self.upstream()
        service = self.service(ok("127.0.0.1", upstream.port, ("Mailrelay-Login", "passthrough")))
        port = await self.proxy_to(service.url)

        def client() -> bytes:
            with self.session(port) as session:
                return (
                    session.command(b"AUTH LOGIN")
                    + session.command(base64.b64encode(USER.encode()))
                    + session.command(base64.b64encode(PASSWORD.encode()))
                )

        self.assertEqual(
            await self.in_thread(client), b"334 VXNlcm5hbWU6\r\n334 UGFzc3dvcmQ6\r\n235 2.7.0 Authentication successful\r\n"
        )
        self.assertEqual(service.requests[0].get("Auth-Method"), "plain")  # nginx reports AUTH LOGIN as plain
        heard = await self.heard(upstream)
        self.assertEqual(heard.lines[1], auth_plain())
        self.assertEqual(heard.login, USER)

    async def test_wait_then_ok_is_just_a_235_for_the_client(self) -> None:
        upstream = self.upstream(users={})
        replies = [
            (200, [("Auth-Status", "WAIT"), ("Auth-Wait", "0.2")], b""),
            (200, [("Auth-Status", "OK"), ("Auth-Server", "127.0.0.1"), ("Auth-Port", str(upstream.port))], b""),
        ]
        service = self.service(lambda seen: replies[len(service.requests) - 1])
        port = await self.proxy_to(service.url)

        def client() -> tuple[bytes, float]:
            with self.session(port) as session:
                return session.timed(auth_plain().rstrip())

        reply, elapsed = await self.in_thread(client)
        self.assertEqual(reply, b"235 2.7.0 Authentication successful\r\n")
        self.assertGreaterEqual(elapsed, 0.2)
        self.assertEqual(len(service.requests), 2)
        self.assertEqual(service.requests[0].headers, service.requests[1].headers)  # the same question, attempt 1 again
        self.assertEqual(service.requests[1].get("Auth-Login-Attempt"), "1")
        self.assertTrue((await self.heard(upstream)).lines[1].startswith(b"XCLIENT "))

    async def test_mailrelay_fallback_is_tried_when_auth_server_is_down(self) -> None:
        upstream = self.upstream(users={})
        service = self.service(ok("127.0.0.1", closed_port(), ("Mailrelay-Fallback", f"127.0.0.1:{upstream.port}")))
        port = await self.proxy_to(service.url)

        def client() -> bytes:
            with self.session(port) as session:
                return session.command(auth_plain().rstrip())

        self.assertEqual(await self.in_thread(client), b"235 2.7.0 Authentication successful\r\n")
        self.assertTrue((await self.heard(upstream)).lines[1].startswith(b"XCLIENT "))
        self.assertEqual((await self.session_line())["upstream"], f"127.0.0.1:{upstream.port}")


class UpstreamTLSTests(AuthHTTPTestCase):
    def upstream_context(self) -> ssl.SSLContext:
        issued = self.pki.issue("upstream", "mail.upstream.test")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(issued.cert, issued.key)
        return context

    async def test_mailrelay_tls_starttls_secures_the_upstream_before_the_login(self) -> None:
        upstream = self.upstream(tls=self.upstream_context())
        more = [
            ("Mailrelay-TLS", "starttls"),
            ("Mailrelay-Server-Name", "mail.upstream.test"),
            ("Mailrelay-Login", "passthrough"),
        ]
        service = self.service(ok("127.0.0.1", upstream.port, *more))
        port = await self.proxy_to(service.url)

        def client() -> bytes:
            with self.session(port) as session:
                return session.command(auth_plain().rstrip())

        self.assertEqual(await self.in_thread(client), b"235 2.7.0 Authentication successful\r\n")
        heard = await self.heard(upstream)
        self.assertEqual(heard.lines[:4], [b"EHLO client.example\r\n", b"STARTTLS\r\n", b"EHLO client.example\r\n", auth_plain()])
        self.assertEqual(heard.login, USER)

    async def test_mailrelay_tls_tls_speaks_implicit_tls_to_the_upstream(self) -> None:
        context = self.upstream_context()
        scripted = ScriptedSMTP(users={USER: PASSWORD})
        upstream = self.server(lambda conn: scripted(context.wrap_socket(conn, server_side=True)))
        more = [("Mailrelay-TLS", "tls"), ("Mailrelay-Server-Name", "mail.upstream.test"), ("Mailrelay-Login", "passthrough")]
        service = self.service(ok("127.0.0.1", upstream.port, *more))
        port = await self.proxy_to(service.url)

        def client() -> bytes:
            with self.session(port) as session:
                return session.command(auth_plain().rstrip())

        self.assertEqual(await self.in_thread(client), b"235 2.7.0 Authentication successful\r\n")
        heard = await self.heard(upstream)
        self.assertEqual(heard.lines[:2], [b"EHLO client.example\r\n", auth_plain()])

    async def test_an_upstream_certificate_for_another_name_is_a_temporary_failure(self) -> None:
        context = self.upstream_context()
        upstream = self.server(lambda conn: ScriptedSMTP()(context.wrap_socket(conn, server_side=True)))
        more = [("Mailrelay-TLS", "tls"), ("Mailrelay-Server-Name", "other.upstream.test")]
        service = self.service(ok("127.0.0.1", upstream.port, *more))
        port = await self.proxy_to(service.url)

        def client() -> bytes:
            with self.session(port) as session:
                return session.command(auth_plain().rstrip()) + session.command(b"NOOP")

        self.assertEqual(
            await self.in_thread(client),
            b"451 4.4.1 Mail server temporarily unavailable, try again later\r\n250 2.0.0 Ok\r\n",
        )


class RefusalTests(AuthHTTPTestCase):
    async def test_a_failure_with_auth_wait_answers_535_after_the_wait_and_the_client_may_try_again(self) -> None:
        upstream = self.upstream(users={})
        service = self.service(password_check(upstream.port, wait="1"))
        port = await self.proxy_to(service.url)

        def client() -> list[Any]:
            with self.session(port) as session:
                wrong, elapsed = session.timed(auth_plain(password="wrong-1").rstrip())
                right = session.command(auth_plain().rstrip())
                return [wrong, elapsed, right, session.command(b"QUIT")]

        wrong, elapsed, right, bye = await self.in_thread(client)
        self.assertEqual(wrong, f"535 5.7.8 {INVALID}\r\n".encode())
        self.assertGreaterEqual(elapsed, 1.0)
        self.assertEqual((right, bye), (b"235 2.7.0 Authentication successful\r\n", b"221 2.0.0 bye\r\n"))
        self.assertEqual([seen.get("Auth-Login-Attempt") for seen in service.requests], ["1", "2"])
        self.assertEqual([seen.get("Auth-Pass") for seen in service.requests], ["wrong-1", PASSWORD])
        self.assertTrue((await self.heard(upstream)).lines[1].startswith(b"XCLIENT "))
        self.assertIn(f"login refused for {USER} from 127.0.0.1: {INVALID} (attempt 1 of 3)", "\n".join(self.logs.lines()))
        self.assert_no_password_logged("wrong-1")

    async def test_a_failure_without_auth_wait_answers_then_closes_the_connection(self) -> None:
        service = self.service(refusal())
        port = await self.proxy_to(service.url, max_attempts=5)

        def client() -> bytes:
            with self.session(port) as session:
                session.send(auth_plain(password="wrong-1") + b"NOOP\r\n")  # NOOP is never answered
                return session.rest()

        self.assertEqual(await self.in_thread(client), f"535 5.7.8 {INVALID}\r\n".encode())
        self.assertEqual(len(service.requests), 1)
        line = await self.session_line()
        self.assertEqual((line["outcome"], line["reason"]), ("rejected", INVALID))

    async def test_auth_wait_zero_is_the_same_as_no_auth_wait(self) -> None:
        service = self.service(refusal(("Auth-Wait", "0")))
        port = await self.proxy_to(service.url)

        def client() -> bytes:
            with self.session(port) as session:
                session.send(auth_plain(password="wrong-1"))
                return session.rest()

        self.assertEqual(await self.in_thread(client), f"535 5.7.8 {INVALID}\r\n".encode())

    async def test_auth_error_code_replaces_the_reply_code(self) -> None:
        service = self.service(refusal(("Auth-Error-Code", "451 4.3.0"), text="Mailbox is being migrated"))
        port = await self.proxy_to(service.url)

        def client() -> bytes:
            with self.session(port) as session:
                session.send(auth_plain())
                return session.rest()

        self.assertEqual(await self.in_thread(client), b"451 4.3.0 Mailbox is being migrated\r\n")

    async def test_auth_error_code_with_a_wait_keeps_the_session(self) -> None:
        service = self.service(refusal(("Auth-Error-Code", "454 4.7.0"), ("Auth-Wait", "0.1"), text="Try later"))
        port = await self.proxy_to(service.url)

        def client() -> bytes:
            with self.session(port) as session:
                return session.command(auth_plain().rstrip()) + session.command(b"NOOP")

        self.assertEqual(await self.in_thread(client), b"454 4.7.0 Try later\r\n250 2.0.0 Ok\r\n")

    async def test_an_auth_error_code_smtp_cannot_use_falls_back_to_535(self) -> None:
        # nginx would send the code as given; mailrelay only takes a 4xx/5xx code.
        service = self.service(refusal(("Auth-Error-Code", "250 2.0.0"), ("Auth-Wait", "0.1")))
        port = await self.proxy_to(service.url)

        def client() -> bytes:
            with self.session(port) as session:
                return session.command(auth_plain().rstrip())

        self.assertEqual(await self.in_thread(client), f"535 5.7.8 {INVALID}\r\n".encode())

    async def test_max_attempts_failures_with_auth_wait_end_with_421(self) -> None:
        service = self.service(refusal(("Auth-Wait", "0.1")))
        port = await self.proxy_to(service.url, max_attempts=2)

        def client() -> bytes:
            with self.session(port) as session:
                session.send(auth_plain(password="wrong-1") + auth_plain(password="wrong-2") + auth_plain())
                return session.rest()

        self.assertEqual(
            await self.in_thread(client),
            f"535 5.7.8 {INVALID}\r\n".encode() * 2
            + b"421 4.7.0 relay.test Error: too many failed logins, closing connection\r\n",
        )
        self.assertEqual([seen.get("Auth-Login-Attempt") for seen in service.requests], ["1", "2"])


class TemporaryFailureTests(AuthHTTPTestCase):
    """Whatever is not the service's decision is SMTP's temporary failure, never 535."""

    async def temporary(
        self, url: str, router: dict[str, Any] | None = None, slow: AuthService | None = None, after: float = 0, **listener: Any
    ) -> tuple[bytes, Any]:
        """A login the service at `url` cannot decide: the client's replies and the
        session line. With `slow` (that service, which does not answer), mailrelay runs
        on a clock that moves `after` seconds once `slow` has been asked."""
        clock = Clock() if slow is not None else None
        port = await self.proxy_to(url, router=router, clock=clock, **listener)

        def client() -> bytes:
            with self.session(port) as session:
                return session.command(auth_plain().rstrip()) + session.command(b"NOOP") + session.command(b"QUIT")

        talking = self.in_thread(client)
        if slow is not None and clock is not None:
            await self.eventually(lambda: slow.requests, "the auth service was not asked")
            clock.advance(after)
        reply = await talking
        self.assertEqual(reply, TEMPORARY + b"250 2.0.0 Ok\r\n221 2.0.0 Bye\r\n")
        return reply, await self.session_line()

    def never_answering(self) -> AuthService:
        """An auth service that takes requests and answers none until the test ends."""
        released = threading.Event()

        def late(seen: Seen) -> Reply:
            released.wait(WAIT)
            return ok()(seen)

        service = self.service(late)
        self.addCleanup(released.set)
        return service

    async def test_service_down(self) -> None:
        url = f"http://127.0.0.1:{closed_port()}/auth"
        _, line = await self.temporary(url)
        self.assertEqual((line["outcome"], line["reason"]), ("router-error", f"auth service {url}: connection refused"))

    async def test_service_answering_500_without_auth_status(self) -> None:
        service = self.service(answer(("Content-Type", "text/html"), status=500, body=b"<h1>Internal Server Error</h1>"))
        _, line = await self.temporary(service.url)
        self.assertEqual(line["reason"], f"auth service {service.url}: answered without Auth-Status")

    async def test_service_answering_garbage(self) -> None:
        def garbage(conn: Any) -> None:
            conn.recv(65536)
            conn.sendall(b"\x00\xff\x16garbage\r\n\r\n")

        url = f"http://127.0.0.1:{self.server(garbage).port}/auth"
        _, line = await self.temporary(url)
        self.assertEqual(line["reason"], f"auth service {url}: answered something that is not HTTP")

    async def test_service_too_slow_for_the_listeners_router_timeout(self) -> None:
        service = self.never_answering()
        _, line = await self.temporary(service.url, router={"timeout": 60}, slow=service, after=30, router_timeout=30)
        self.assertEqual(line["reason"], "router did not answer within 30s")

    async def test_service_too_slow_for_the_routers_own_timeout(self) -> None:
        service = self.never_answering()
        _, line = await self.temporary(service.url, router={"timeout": 20}, slow=service, after=20)
        self.assertEqual(line["reason"], f"auth service {service.url}: no answer within 20s")

    async def test_ok_without_auth_server(self) -> None:
        service = self.service(answer(("Auth-Status", "OK"), ("Auth-Port", "25")))
        _, line = await self.temporary(service.url)
        self.assertEqual(line["reason"], f"auth service {service.url}: answered OK without Auth-Server")

    async def test_an_invalid_mailrelay_header(self) -> None:
        service = self.service(ok("127.0.0.1", 25, ("Mailrelay-Login", "sometimes")))
        _, line = await self.temporary(service.url)
        self.assertEqual(line["reason"], f'auth service {service.url}: answered with an invalid Mailrelay-Login: "sometimes"')

    async def test_wait_answered_too_often(self) -> None:
        service = self.service(answer(("Auth-Status", "WAIT")))
        _, line = await self.temporary(service.url, router={"max_wait_retries": 1})
        self.assertEqual(line["reason"], f"auth service {service.url}: still answering WAIT after 2 requests")
        self.assertEqual(len(service.requests), 2)

    async def test_a_temporary_failure_is_not_a_failed_attempt(self) -> None:
        # max_attempts = 1: a refusal would close the connection; temporary failures do not.
        url = f"http://127.0.0.1:{closed_port()}/auth"
        port = await self.proxy_to(url, max_attempts=1)

        def client() -> bytes:
            with self.session(port) as session:
                return session.command(auth_plain().rstrip()) + session.command(auth_plain().rstrip()) + session.command(b"NOOP")

        self.assertEqual(await self.in_thread(client), TEMPORARY * 2 + b"250 2.0.0 Ok\r\n")


class RelayTests(AuthHTTPTestCase):
    """`auth = ["none"]`: the service is asked at the first RCPT, with the envelope."""

    async def test_the_request_carries_helo_and_envelope_as_typed_and_ok_replays_them_upstream(self) -> None:
        upstream = self.upstream(users={})
        service = self.service(ok("127.0.0.1", upstream.port))
        port = await self.proxy_to(service.url, mode="starttls", auth=["none"])

        def client() -> bytes:
            with self.session(port, mode="starttls", helo=b"mx.sender.example") as session:
                session.send(
                    b"MAIL FROM:<s@sender.example> SIZE=100\r\nRCPT TO:<Bob@Example.test> NOTIFY=NEVER\r\nDATA\r\n"
                    + MESSAGE.replace(b"\r\n.", b"\r\n..")
                    + b".\r\nQUIT\r\n"
                )
                return session.rest()

        self.assertEqual(
            await self.in_thread(client),
            b"250 2.1.0 Ok\r\n250 2.1.5 recipient ok\r\n354 go ahead\r\n250 2.0.0 queued as 1\r\n221 2.0.0 bye\r\n",
        )
        [seen] = service.requests
        self.assertEqual(
            seen.headers[:13],
            [
                ("Host", b"127.0.0.1"),
                ("Auth-Method", b"none"),
                ("Auth-User", b""),
                ("Auth-Pass", b""),
                ("Auth-Protocol", b"smtp"),
                ("Auth-Login-Attempt", b"1"),
                ("Client-IP", b"127.0.0.1"),
                ("Client-Host", b"[UNAVAILABLE]"),
                ("Auth-SMTP-Helo", b"mx.sender.example"),
                ("Auth-SMTP-From", b"MAIL FROM:<s@sender.example> SIZE=100"),
                ("Auth-SMTP-To", b"RCPT TO:<Bob@Example.test> NOTIFY=NEVER"),
                ("Auth-SSL", b"on"),
                ("Auth-SSL-Protocol", seen.headers[12][1]),
            ],
        )
        heard = await self.heard(upstream)
        self.assertEqual(heard.lines[0], b"EHLO relay.test\r\n")
        self.assertTrue(heard.lines[1].startswith(b"XCLIENT ADDR=127.0.0.1 "), heard.lines[1])
        self.assertNotIn(b"LOGIN=", heard.lines[1])
        self.assertEqual(
            heard.lines[2:],
            [
                b"EHLO mx.sender.example\r\n",
                b"MAIL FROM:<s@sender.example> SIZE=100\r\n",
                b"RCPT TO:<Bob@Example.test> NOTIFY=NEVER\r\n",
                b"DATA\r\n",
                b"QUIT\r\n",
            ],
        )
        self.assertEqual(heard.messages, [MESSAGE])

    async def test_mailrelay_login_none_replays_the_envelope_without_xclient(self) -> None:
        upstream = self.upstream(users={})
        service = self.service(ok("127.0.0.1", upstream.port, ("Mailrelay-Login", "none")))
        port = await self.proxy_to(service.url, auth=["none"])

        def client() -> bytes:
            with self.session(port, helo=b"mx.sender.example") as session:
                session.send(b"MAIL FROM:<>\r\nRCPT TO:<postmaster@example.test>\r\nQUIT\r\n")
                return session.rest()

        self.assertEqual(await self.in_thread(client), b"250 2.1.0 Ok\r\n250 2.1.5 recipient ok\r\n221 2.0.0 bye\r\n")
        self.assertEqual(
            (await self.heard(upstream)).lines,
            [b"EHLO mx.sender.example\r\n", b"MAIL FROM:<>\r\n", b"RCPT TO:<postmaster@example.test>\r\n", b"QUIT\r\n"],
        )

    async def test_a_refusal_with_auth_error_code_answers_the_rcpt_then_closes(self) -> None:
        service = self.service(refusal(("Auth-Error-Code", "550 5.1.1"), text="Recipient address rejected: unknown user"))
        port = await self.proxy_to(service.url, auth=["none"])

        def client() -> bytes:
            with self.session(port, helo=b"mx.sender.example") as session:
                session.send(b"MAIL FROM:<s@sender.example>\r\nRCPT TO:<nobody@example.test>\r\nNOOP\r\n")
                return session.rest()

        self.assertEqual(await self.in_thread(client), b"250 2.1.0 Ok\r\n550 5.1.1 Recipient address rejected: unknown user\r\n")
        line = await self.session_line()
        self.assertEqual((line["outcome"], line["reason"]), ("rejected", "Recipient address rejected: unknown user"))

    async def test_a_refusal_with_auth_wait_lets_the_next_rcpt_be_routed(self) -> None:
        upstream = self.upstream(users={})

        def by_recipient(seen: Seen) -> Reply:
            if "nobody@" in (seen.get("Auth-SMTP-To") or ""):
                return refusal(("Auth-Error-Code", "550 5.1.1"), ("Auth-Wait", "0.1"), text="No such user")(seen)
            return ok("127.0.0.1", upstream.port, ("Mailrelay-Login", "none"))(seen)

        service = self.service(by_recipient)
        port = await self.proxy_to(service.url, auth=["none"])

        def client() -> bytes:
            with self.session(port, helo=b"mx.sender.example") as session:
                session.send(
                    b"MAIL FROM:<s@sender.example>\r\nRCPT TO:<nobody@example.test>\r\nRCPT TO:<bob@example.test>\r\nQUIT\r\n"
                )
                return session.rest()

        self.assertEqual(
            await self.in_thread(client),
            b"250 2.1.0 Ok\r\n550 5.1.1 No such user\r\n250 2.1.5 recipient ok\r\n221 2.0.0 bye\r\n",
        )
        self.assertEqual(
            [seen.get("Auth-SMTP-To") for seen in service.requests],
            ["RCPT TO:<nobody@example.test>", "RCPT TO:<bob@example.test>"],
        )
        self.assertEqual(
            (await self.heard(upstream)).lines,
            [b"EHLO mx.sender.example\r\n", b"MAIL FROM:<s@sender.example>\r\n", b"RCPT TO:<bob@example.test>\r\n", b"QUIT\r\n"],
        )

    async def test_service_down_is_a_temporary_failure_for_the_rcpt(self) -> None:
        port = await self.proxy_to(f"http://127.0.0.1:{closed_port()}/auth", auth=["none"])

        def client() -> bytes:
            with self.session(port, helo=b"mx.sender.example") as session:
                session.send(b"MAIL FROM:<s@sender.example>\r\nRCPT TO:<bob@example.test>\r\nRSET\r\nQUIT\r\n")
                return session.rest()

        self.assertEqual(await self.in_thread(client), b"250 2.1.0 Ok\r\n" + TEMPORARY + b"250 2.0.0 Ok\r\n221 2.0.0 Bye\r\n")


class CramMD5Tests(AuthHTTPTestCase):
    async def cram_md5(self, port: int) -> tuple[bytes, bytes, bytes]:
        """Log in with CRAM-MD5: (the challenge, the digest sent, the final reply)."""

        def client() -> tuple[bytes, bytes, bytes]:
            with self.session(port) as session:
                challenge_reply = session.command(b"AUTH CRAM-MD5")
                assert challenge_reply.startswith(b"334 "), challenge_reply
                challenge = base64.b64decode(challenge_reply[4:].strip())
                digest = hmac.new(PASSWORD.encode(), challenge, hashlib.md5).hexdigest().encode()
                final = session.command(base64.b64encode(USER.encode() + b" " + digest))
                return challenge, digest, final

        result: tuple[bytes, bytes, bytes] = await self.in_thread(client)
        return result

    async def test_the_request_carries_the_salt_and_digest_and_auth_pass_is_the_upstream_password(self) -> None:
        upstream = self.upstream()

        def check(seen: Seen) -> Reply:
            salt, digest = seen.get("Auth-Salt") or "", seen.get("Auth-Pass")
            if digest == hmac.new(PASSWORD.encode(), salt.encode(), hashlib.md5).hexdigest():
                return ok("127.0.0.1", upstream.port, ("Auth-Pass", PASSWORD), ("Mailrelay-Login", "passthrough"))(seen)
            return refusal()(seen)

        service = self.service(check)
        port = await self.proxy_to(service.url, auth=["plain", "cram-md5"])
        challenge, digest, final = await self.cram_md5(port)

        self.assertEqual(final, b"235 2.7.0 Authentication successful\r\n")
        self.assertRegex(challenge, rb"^<[0-9]+\.[0-9]+@relay\.test>$")
        [seen] = service.requests
        self.assertEqual(
            seen.headers[1:6],
            [
                ("Auth-Method", b"cram-md5"),
                ("Auth-User", USER.encode()),
                ("Auth-Pass", digest),
                ("Auth-Salt", challenge),
                ("Auth-Protocol", b"smtp"),
            ],
        )
        heard = await self.heard(upstream)
        self.assertEqual(heard.lines[1], auth_plain())
        self.assertEqual(heard.login, USER)

    async def test_cram_md5_with_the_default_xclient_login_needs_no_password(self) -> None:
        upstream = self.upstream(users={})
        service = self.service(ok("127.0.0.1", upstream.port))
        port = await self.proxy_to(service.url, auth=["cram-md5"])
        _, _, final = await self.cram_md5(port)

        self.assertEqual(final, b"235 2.7.0 Authentication successful\r\n")
        self.assertIn(b" LOGIN=alice@example.test\r\n", (await self.heard(upstream)).lines[1])

    async def test_cram_md5_passthrough_without_auth_pass_is_a_temporary_failure(self) -> None:
        # The service forgot Auth-Pass: there is no password to log in upstream with.
        upstream = self.upstream()
        service = self.service(ok("127.0.0.1", upstream.port, ("Mailrelay-Login", "passthrough")))
        port = await self.proxy_to(service.url, auth=["cram-md5"])
        _, _, final = await self.cram_md5(port)

        self.assertEqual(final, b"451 4.3.0 Temporary failure, try again later\r\n")
        line = await self.session_line()
        self.assertEqual(line["outcome"], "router-error")  # decided without connecting upstream
        self.assertIn("cram-md5 login without the Auth-Pass", line["reason"])
        self.assertEqual(upstream.connections, 0)


class SecretsTests(AuthHTTPTestCase):
    async def test_no_password_in_any_log_line_whatever_the_outcome(self) -> None:
        secret = "pass word%with spaces"  # sent escaped: "pass%20word%25with%20spaces"
        upstream = self.upstream(users={"mbox": "upstream pass"})

        def answers(seen: Seen) -> Reply:
            attempt = len(service.requests)
            if attempt == 1:
                return refusal(("Auth-Wait", "0.1"))(seen)
            if attempt == 2:
                return answer(("Auth-Status", "OK"), ("Auth-Port", "25"))(seen)  # invalid: a RouterError
            more = [("Auth-User", "mbox"), ("Auth-Pass", "upstream pass"), ("Mailrelay-Login", "passthrough")]
            return ok("127.0.0.1", upstream.port, *more)(seen)

        service = self.service(answers)
        port = await self.proxy_to(service.url, router={"headers": {"X-Auth-Key": "key-never-logged"}})

        def client() -> bytes:
            with self.session(port) as session:
                return b"".join(session.command(auth_plain(password=secret).rstrip()) for _ in range(3))

        self.assertEqual(
            await self.in_thread(client),
            f"535 5.7.8 {INVALID}\r\n".encode() + TEMPORARY + b"235 2.7.0 Authentication successful\r\n",
        )
        self.assertEqual(service.requests[0].get("Auth-Pass"), "pass%20word%25with%20spaces")
        self.assertEqual((await self.heard(upstream)).login, "mbox")
        await self.session_line()
        self.assert_no_password_logged(
            secret, "pass%20word%25with%20spaces", plain(USER, secret).decode(), "upstream pass", "key-never-logged"
        )
