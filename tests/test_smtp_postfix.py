"""
The SMTP front-end in front of a real Postfix (Debian's package, started privately by
`tests.support.postfix.Postfix`): what arrives in the mailbox, byte for byte, and what
XCLIENT made Postfix believe about the client. Clients are smtplib and swaks; the
client connects from 127.0.0.2 so that Postfix, which sees mailrelay at 127.0.0.1,
can only learn the client's address through XCLIENT.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import tempfile
from typing import Any

import pytest
import trustme

from mailrelay.router import Route
from tests.support.frontends import PASSWORD, USER, Router
from tests.support.net import WAIT, payload
from tests.support.postfix import Postfix, split_delivered
from tests.support.processes import LISTENING, TWISTD, assert_clean_stop
from tests.support.servers import free_ports
from tests.support.smtp import BOB, CLIENT_ADDRESS, MESSAGE, PostfixTestCase, lf, password_check, raw_reply

pytestmark = pytest.mark.slow


class SubmissionTests(PostfixTestCase):
    async def test_each_mechanism_over_starttls_delivers_through_xclient(self) -> None:
        router = Router(answer=password_check(self.postfix.port, login="xclient"))
        port = await self.proxy(router, auth=["plain", "login", "cram-md5"])

        def client() -> None:
            for mechanism in ("PLAIN", "LOGIN", "CRAM-MD5"):
                with self.smtp_from(port) as smtp:
                    smtp.user, smtp.password = USER, PASSWORD
                    smtp.auth(mechanism, getattr(smtp, "auth_" + mechanism.lower().replace("-", "_")))
                    self.assertEqual(smtp.sendmail(USER, [BOB], MESSAGE), {})

        await self.in_thread(client)
        delivered = await self.next_delivery(3)
        for trace, message in delivered:
            self.assertEqual(message, lf(MESSAGE))
            # Postfix saw mailrelay at 127.0.0.1; XCLIENT told it who the client was.
            self.assertIn(b"from client.example (unknown [127.0.0.2])", trace)
            self.assertIn(b"(Authenticated sender: alice@example.test)", trace)
        self.assertEqual([r.auth_method for r in router.requests], ["plain", "login", "cram-md5"])

    async def test_an_8_mib_8bit_message_over_implicit_tls_arrives_byte_identical(self) -> None:
        port = await self.proxy(Router(answer=password_check(self.postfix.port, login="xclient")), mode="tls")
        body = payload(8 << 20, seed=5)
        # Lines of 76 bytes of any value but CR and LF: 8-bit content, within SMTP's line limit.
        body = body.replace(b"\r", b"\x8d").replace(b"\n", b"\x8a")
        lines = b"\r\n".join(body[i : i + 76] for i in range(0, len(body), 76))
        message = b"From: alice@example.test\r\nTo: bob@example.test\r\nSubject: big\r\n\r\n" + lines + b"\r\n"

        def client() -> Any:
            with self.smtp_from(port, "tls") as smtp:
                smtp.login(USER, PASSWORD)
                return smtp.sendmail(USER, [BOB], message, mail_options=["BODY=8BITMIME"])

        self.assertEqual(await self.in_thread(client), {})
        [(_, delivered)] = await self.next_delivery()
        self.assertEqual(len(delivered), len(lf(message)))
        self.assertTrue(delivered == lf(message))

    async def test_upstream_starttls_and_implicit_tls_to_postfix_are_verified(self) -> None:
        routes = {
            "starttls": Route(
                host="127.0.0.1",
                port=self.postfix.port,
                tls="starttls",
                server_name="mx.upstream.test",
                tls_ca=self.upstream_ca_file,
            ),
            "tls": Route(
                host="127.0.0.1",
                port=self.postfix.tls_port or 0,
                tls="tls",
                server_name="mx.upstream.test",
                tls_ca=self.upstream_ca_file,
            ),
        }
        for kind, route in routes.items():
            # The password checked here, as a login = "xclient" route needs.
            checked = password_check(
                route.port, login="xclient", tls=route.tls, server_name=route.server_name, tls_ca=route.tls_ca
            )
            port = await self.proxy(Router(answer=checked), mode="tls")

            def client(port: int = port) -> Any:
                with self.smtp_from(port, "tls") as smtp:
                    smtp.login(USER, PASSWORD)
                    return smtp.sendmail(USER, [BOB], MESSAGE)

            self.assertEqual(await self.in_thread(client), {}, kind)
        delivered = await self.next_delivery(2)
        for trace, message in delivered:
            self.assertEqual(message, lf(MESSAGE))
            self.assertIn(b"(using TLSv1.3", trace)  # Postfix notes the TLS of mailrelay's connection
            self.assertIn(b"[127.0.0.2]", trace)

    async def test_swaks_with_starttls_auth_and_pipelining(self) -> None:
        port = await self.proxy(Router(answer=password_check(self.postfix.port, login="xclient")))
        command = [
            "swaks", "--server", f"127.0.0.1:{port}", "--tls", "--tls-verify", "--tls-ca-path", self.pki.ca_file,
            "--tls-sni", "relay.test", "--auth", "LOGIN", "--auth-user", USER, "--auth-password", PASSWORD,
            "--from", USER, "--to", BOB, "--helo", "swaks.example", "--pipeline", "--local-interface", CLIENT_ADDRESS,
            "--header", "Subject: from swaks", "--body", "sent by swaks through mailrelay",
        ]  # fmt: skip
        result = await self.in_thread(subprocess.run, command, capture_output=True, text=True, timeout=WAIT)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("<~  235 2.7.0 Authentication successful", result.stdout)
        [(trace, message)] = await self.next_delivery()
        self.assertIn(b"Subject: from swaks", message)
        self.assertIn(b"sent by swaks through mailrelay", message)
        self.assertIn(b"from swaks.example (unknown [127.0.0.2])", trace)


class RelayTests(PostfixTestCase):
    async def test_mx_without_login_replays_the_envelope_and_postfix_answers_each_recipient(self) -> None:
        router = Router(port=self.postfix.port, login="xclient")
        port = await self.proxy(router, starttls="optional", auth=["none"])

        def client() -> Any:
            with smtplib.SMTP(
                "127.0.0.1", port, local_hostname="mx.sender.example", timeout=WAIT, source_address=(CLIENT_ADDRESS, 0)
            ) as smtp:
                return smtp.sendmail("s@sender.example", [BOB, "nobody@example.test"], MESSAGE)

        refused = await self.in_thread(client)
        self.assertEqual(list(refused), ["nobody@example.test"])
        self.assertEqual(refused["nobody@example.test"][0], 550)
        [(trace, message)] = await self.next_delivery()
        self.assertEqual(message, lf(MESSAGE))
        self.assertIn(b"from mx.sender.example (unknown [127.0.0.2])", trace)
        [request] = router.requests
        self.assertEqual((request.auth_method, request.sender, request.recipient), ("none", "s@sender.example", BOB))


def test_twistd_submission_with_a_route_map_in_front_of_postfix(tmp_path: Any, spawn: Any) -> None:  # noqa: F811
    """The whole deployment a mail administrator writes: `twistd mailrelay` from the
    installed package, a STARTTLS submission port, passwords checked by a route map
    against bcrypt hashes, Postfix told the user by XCLIENT."""
    import bcrypt

    directory = tempfile.mkdtemp(prefix="mailrelay-postfix-")
    os.chmod(directory, 0o755)
    os.mkdir(f"{directory}/postfix")
    with Postfix(f"{directory}/postfix", users=(USER, BOB)) as postfix:
        ca = trustme.CA()
        ca.issue_cert("relay.test", "127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "relay.pem"))
        hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
        (tmp_path / "routes.toml").write_text(
            f'[[rule]]\nuser = "{USER}"\npassword = "{hashed}"\n'
            f'route = {{ host = "127.0.0.1", port = {postfix.port}, login = "xclient" }}\n'
            '[default]\nreject = "no such account"\n'
        )
        (tmp_path / "mailrelay.toml").write_text(
            '[tls]\ncert = "relay.pem"\n[router]\ntype = "map"\nfile = "routes.toml"\n'
            '[[listener]]\nname = "relay"\nlisten = "tcp:0:interface=127.0.0.1"\nmode = "starttls"\nprotocol = "smtp"\n'
            'hostname = "relay.test"\nmax_attempts = 2\n'
        )
        process = spawn(TWISTD, "-n", "--pidfile=", "mailrelay", "--config", "mailrelay.toml")
        port = int(process.wait_for(LISTENING.format(name="relay")).group(1))
        context = ssl.create_default_context()
        ca.configure_trust(context)

        with smtplib.SMTP(
            "127.0.0.1", port, local_hostname="client.example", timeout=WAIT, source_address=(CLIENT_ADDRESS, 0)
        ) as smtp:
            smtp.starttls(context=context)
            smtp.ehlo()
            smtp.user, smtp.password = USER, "not the password"
            with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
                smtp.auth("PLAIN", smtp.auth_plain)  # one attempt (smtplib's login() would try each mechanism)
            assert refused.value.smtp_code == 535
            smtp.login(USER, PASSWORD)
            assert smtp.sendmail(USER, [BOB], MESSAGE) == {}
        [delivered] = postfix.wait_for_messages(BOB)
        trace, message = split_delivered(delivered)
        assert message == lf(MESSAGE)
        assert b"from client.example (unknown [127.0.0.2])" in trace
        assert b"(Authenticated sender: alice@example.test)" in trace
        process.wait_for(r"outcome=closed")
        process.signal(signal.SIGTERM)
        output = assert_clean_stop(process)
    shutil.rmtree(directory, ignore_errors=True)
    assert f"login refused for {USER} from 127.0.0.2" in output
    assert re.search(rf"session \S+ listener=relay client=127\.0\.0\.2:\d+ user={USER} upstream=127\.0\.0\.1:\d+ ", output), (
        output
    )
    assert PASSWORD not in output and "not the password" not in output


@pytest.mark.slow
class PipelinedEnvelopeTests(PostfixTestCase):
    """An MX session's envelope replayed to a real Postfix that offers PIPELINING: MAIL
    and RCPT go in one write. On a port where Postfix refuses a sender at MAIL (not at
    RCPT: `smtpd_delay_reject = no`), the refusal is what the client hears for its RCPT,
    Postfix's answer to the pipelined RCPT never reaches it, and nothing is delivered."""

    refusing_port: int
    """Postfix's smtpd that refuses non-FQDN senders at MAIL."""

    @classmethod
    def setUpClass(cls) -> None:
        [cls.refusing_port] = free_ports(1)
        cert, key = cls.upstream_pki("mailrelay-postfix-", "mx.upstream.test")
        os.mkdir(f"{cls.directory}/postfix")
        refusing = (
            f"127.0.0.1:{cls.refusing_port} inet n - n - - smtpd\n"
            "  -o smtpd_delay_reject=no\n"
            "  -o smtpd_sender_restrictions=reject_non_fqdn_sender\n"
        )
        cls.postfix = Postfix(f"{cls.directory}/postfix", tls=(cert, key), users=(USER, BOB), extra_master_cf=refusing)
        cls.postfix.start()

    async def test_a_sender_refused_at_mail_answers_the_rcpt_and_nothing_is_delivered(self) -> None:
        router = Router(port=self.refusing_port, login="xclient")
        port = await self.proxy(router, starttls="optional", auth=["none"])

        def client() -> list[bytes]:
            with socket.create_connection(("127.0.0.1", port), timeout=WAIT, source_address=(CLIENT_ADDRESS, 0)) as conn:
                replies = [raw_reply(conn)]
                conn.sendall(b"EHLO mx.sender.example\r\n")
                replies.append(raw_reply(conn))
                # Pipelined, as a client that was offered PIPELINING may: both before any reply.
                conn.sendall(b"MAIL FROM:<joe@localhost>\r\nRCPT TO:<" + BOB.encode() + b">\r\n")
                replies += [raw_reply(conn), raw_reply(conn)]
                conn.sendall(b"DATA\r\n")
                replies.append(raw_reply(conn))
                conn.sendall(b"QUIT\r\n")
                replies.append(raw_reply(conn))
                return replies

        greeting, ehlo, mail, rcpt, data, quit_reply = await self.in_thread(client)
        self.assertTrue(ehlo.startswith(b"250-") and b"PIPELINING" in ehlo, ehlo)
        self.assertTrue(mail.startswith(b"250 "), mail)  # mailrelay's own: the route is decided at RCPT
        self.assertTrue(rcpt.startswith(b"504 ") and b"Sender address rejected" in rcpt, rcpt)
        self.assertNotIn(b"need MAIL", rcpt)  # Postfix's answer to the pipelined RCPT stays unread
        self.assertTrue(data.startswith(b"5") or data.startswith(b"4"), data)  # no recipient: no DATA
        self.assertTrue(quit_reply.startswith(b"221"), quit_reply)
        self.assertIn("reject: MAIL from", self.postfix.log_text())
        self.assertIn("Sender address rejected", self.postfix.log_text())
        self.assertEqual(len(self.postfix.messages(BOB)), self.delivered_before)
        [request] = router.requests
        self.assertEqual((request.sender, request.recipient), ("joe@localhost", BOB))

    async def test_an_accepted_sender_on_the_same_port_is_delivered(self) -> None:
        router = Router(port=self.refusing_port, login="xclient")
        port = await self.proxy(router, starttls="optional", auth=["none"])

        def client() -> Any:
            with smtplib.SMTP(
                "127.0.0.1", port, local_hostname="mx.sender.example", timeout=WAIT, source_address=(CLIENT_ADDRESS, 0)
            ) as smtp:
                return smtp.sendmail("s@sender.example", [BOB], MESSAGE)

        self.assertEqual(await self.in_thread(client), {})
        [(_, message)] = await self.next_delivery()
        self.assertEqual(message, lf(MESSAGE))
