"""
The attacks an adversarial review made on mailrelay's SMTP side, performed end to end
against a real Postfix 3.7 that trusts mailrelay (XCLIENT from loopback, relaying for
loopback), and refused: each test fails on a mailrelay that splices the session blindly
or tracks the transaction on the client's word.

The client connects from 127.0.0.2, so Postfix can tell the client's address only from
what mailrelay says; bob is the recipient the Router refuses, and his maildir must stay
empty.
"""

from __future__ import annotations

import socket
from typing import Any

import pytest

from mailrelay.router import Reject, Route, RouteRequest
from tests.support.frontends import PASSWORD, USER, Router, password_check
from tests.support.net import WAIT
from tests.support.postfix import split_delivered
from tests.support.smtp import BOB, CLIENT_ADDRESS, MESSAGE, PostfixTestCase, raw_reply

pytestmark = pytest.mark.slow

SMUGGLING_ENDS = [b"\n.\r\n", b"\r\n.\n", b"\n.\n", b"\r.\r\n"]
STUFFED = MESSAGE.replace(b"\r\n.", b"\r\n..")
"""MESSAGE as a client sends it in DATA."""
NOT_PERMITTED = b"550 5.7.0 Error: XCLIENT is not permitted"
BARE_CR = b"500 5.5.2 Error: bare CR or NUL character in command"
REFUSED_CONTENT = b"554 5.6.0 Error: bare CR or LF in message content; closing connection\r\n"


def replies(data: bytes) -> list[bytes]:
    return data.split(b"\r\n")


class PostfixAttackTestCase(PostfixTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.alice_before = len(self.postfix.messages(USER))

    def vetting_router(self) -> Router:
        """Bob is refused; everyone else goes to Postfix, told the client's address by XCLIENT."""

        def answer(request: RouteRequest) -> Route:
            if request.recipient == BOB:
                raise Reject("5.7.1 Recipient refused by policy", code=550)
            return Route(host="127.0.0.1", port=self.postfix.port, login="xclient")

        return Router(answer=answer)

    def talk(self, port: int, send: bytes) -> bytes:
        """Plain SMTP from 127.0.0.2: `send` in one write, every reply until mailrelay closes."""
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT, source_address=(CLIENT_ADDRESS, 0)) as conn:
            self.assertEqual(raw_reply(conn)[:4], b"220 ")
            conn.sendall(send)
            received = b""
            while data := conn.recv(65536):
                received += data
            return received

    async def delivered_to_alice(self, count: int) -> list[tuple[bytes, bytes]]:
        """The next `count` messages for alice, once Postfix has delivered everything."""
        files = await self.in_thread(self.postfix.wait_for_messages, USER, self.alice_before + count)
        await self.in_thread(self.postfix.wait_for_empty_queue)
        return [split_delivered(f) for f in files[self.alice_before :]]

    def assert_nothing_for_bob(self) -> None:
        self.assertEqual(len(self.postfix.messages(BOB)), self.delivered_before)
        self.assertNotIn(f"to=<{BOB}>", self.postfix.log_text())


class VettingAttackTests(PostfixAttackTestCase):
    async def test_a_refused_recipient_cannot_be_reopened_by_a_failed_ehlo_rset_or_helo(self) -> None:
        port = await self.proxy(self.vetting_router(), starttls="optional", auth=["none"], vet_recipients="all")
        for reopen in (b"EHLO", b"RSET x", b"HELO"):
            # Postfix answers each with 501 and keeps the transaction: it must still not hear RCPT bob.
            answer = await self.in_thread(
                self.talk,
                port,
                b"EHLO mx.sender.example\r\nMAIL FROM:<s@sender.example>\r\nRCPT TO:<" + USER.encode() + b">\r\n"
                b"RCPT TO:<" + BOB.encode() + b">\r\n" + reopen + b"\r\nRCPT TO:<" + BOB.encode() + b">\r\n"
                b"DATA\r\n" + STUFFED + b".\r\nQUIT\r\n",
            )
            tail = replies(answer)[-8:]
            refused = b"550 5.7.1 Recipient refused by policy"
            self.assertEqual([tail[0], tail[1], tail[3]], [b"250 2.1.5 Ok", refused, refused], (reopen, tail))
            self.assertTrue(tail[2].startswith(b"501 "), (reopen, tail))
            self.assertTrue(tail[4].startswith(b"354 ") and tail[5].startswith(b"250 2.0.0 Ok: queued"), (reopen, tail))
            self.assertEqual(tail[6:], [b"221 2.0.0 Bye", b""])
        delivered = await self.delivered_to_alice(3)
        self.assertEqual([message for _, message in delivered], [MESSAGE.replace(b"\r\n", b"\n")] * 3)
        self.assert_nothing_for_bob()

    async def test_a_refused_recipient_glued_to_an_allowed_one_is_refused_whole(self) -> None:
        # The Router reads the first path; a server might read what is glued after it.
        port = await self.proxy(self.vetting_router(), starttls="optional", auth=["none"], vet_recipients="all")
        alice, bob = b"<" + USER.encode() + b">", b"<" + BOB.encode() + b">"
        glued = [
            alice + b"RCPT TO:" + bob,
            alice + bob,
            alice[:-1] + bob + b">",
            b"<" + USER.encode() + b"," + BOB.encode() + b">x",
        ]
        answer = await self.in_thread(
            self.talk,
            port,
            b"EHLO mx.sender.example\r\nMAIL FROM:<s@sender.example>\r\nRCPT TO:"
            + alice
            + b"\r\n"
            + b"".join(b"RCPT TO:" + line + b"\r\n" for line in glued)
            + b"DATA\r\n"
            + STUFFED
            + b".\r\nQUIT\r\n",
        )
        tail = replies(answer)[-(len(glued) + 5) :]
        self.assertEqual(tail[0], b"250 2.1.5 Ok", tail)
        self.assertEqual(tail[1 : 1 + len(glued)], [b"501 5.5.4 Syntax: RCPT TO:<address>"] * len(glued), tail)
        self.assertTrue(tail[-4].startswith(b"354 ") and tail[-3].startswith(b"250 2.0.0 Ok: queued"), tail)
        [(_, message)] = await self.delivered_to_alice(1)
        self.assertEqual(message, MESSAGE.replace(b"\r\n", b"\n"))
        self.assert_nothing_for_bob()

    async def test_smuggled_messages_are_refused_in_data_and_bdat(self) -> None:
        port = await self.proxy(self.vetting_router(), starttls="optional", auth=["none"], vet_recipients="all")
        envelope = b"EHLO mx.sender.example\r\nMAIL FROM:<s@sender.example>\r\nRCPT TO:<" + USER.encode() + b">\r\n"
        smuggled = (
            b"MAIL FROM:<admin@sender.example>\r\nRCPT TO:<" + BOB.encode() + b">\r\nDATA\r\n"
            b"Subject: smuggled\r\n\r\nsmuggled\r\n"
        )
        for end in SMUGGLING_ENDS:
            answer = await self.in_thread(
                self.talk, port, envelope + b"DATA\r\nSubject: carrier\r\n\r\ncarrier" + end + smuggled + b".\r\nQUIT\r\n"
            )
            self.assertTrue(answer.endswith(b"354 End data with <CR><LF>.<CR><LF>\r\n" + REFUSED_CONTENT), (end, answer))
        for end in SMUGGLING_ENDS:  # BDAT has no end line to confuse, but its content is checked the same
            chunk = b"Subject: carrier\r\n\r\ncarrier" + end + smuggled + b"\r\n"
            answer = await self.in_thread(self.talk, port, envelope + b"BDAT %d LAST\r\n" % len(chunk) + chunk + b"QUIT\r\n")
            self.assertTrue(answer.endswith(b"250 2.1.5 Ok\r\n" + REFUSED_CONTENT), (end, answer))
        # One clean message after them all: once it is in, Postfix has handled everything before.
        answer = await self.in_thread(self.talk, port, envelope + b"DATA\r\n" + STUFFED + b".\r\nQUIT\r\n")
        self.assertIn(b"250 2.0.0 Ok: queued", answer)
        [(_, message)] = await self.delivered_to_alice(1)
        self.assertEqual(message, MESSAGE.replace(b"\r\n", b"\n"))
        self.assert_nothing_for_bob()
        self.assertNotIn(b"smuggled", b"".join(self.postfix.messages(USER)))


class ClientXCLIENTTests(PostfixAttackTestCase):
    def assert_client_as_itself(self, trace: bytes) -> None:
        self.assertIn(b"[127.0.0.2]", trace)
        self.assertNotIn(b"10.9.9.9", trace)
        self.assertNotIn(b"Authenticated sender: postmaster", trace)

    async def test_an_mx_client_cannot_xclient_after_its_first_recipient(self) -> None:
        port = await self.proxy(self.vetting_router(), starttls="optional", auth=["none"])  # vet_recipients = "first"
        start = b"EHLO mx.sender.example\r\nMAIL FROM:<s@sender.example>\r\nRCPT TO:<" + USER.encode() + b">\r\n"
        mail = b"MAIL FROM:<s@sender.example>\r\nRCPT TO:<" + USER.encode() + b">\r\nDATA\r\n" + STUFFED + b".\r\nQUIT\r\n"
        for attack, reply in [
            (b"RSET\r\nXCLIENT ADDR=10.9.9.9 LOGIN=postmaster\r\nEHLO evil.example\r\n", NOT_PERMITTED),
            (b"RSET\nxclient ADDR=10.9.9.9 LOGIN=postmaster\n", NOT_PERMITTED),
            (b"RSET\r\nNOOP\rXCLIENT ADDR=10.9.9.9 LOGIN=postmaster\r\n", BARE_CR),
            (b"RSET\r\nXFORWARD ADDR=10.9.9.9\r\n", b"550 5.7.0 Error: XFORWARD is not permitted"),
        ]:  # fmt: skip
            answer = await self.in_thread(self.talk, port, start + attack + mail)
            self.assertIn(reply, answer, attack)
        for trace, message in await self.delivered_to_alice(4):
            self.assertEqual(message, MESSAGE.replace(b"\r\n", b"\n"))
            self.assert_client_as_itself(trace)

    async def test_a_logged_in_client_cannot_xclient_its_way_to_another_user(self) -> None:
        # login = "none": Postfix relays for mailrelay's address without a login of its own.
        router = Router(answer=password_check(self.postfix.port, login="none"), verifies_passwords=True)
        port = await self.proxy(router, auth=["plain"])

        def client() -> Any:
            with self.smtp_from(port) as smtp:
                smtp.login(USER, PASSWORD)
                smtp.rset()
                answer = smtp.docmd("XCLIENT", "ADDR=10.9.9.9 LOGIN=postmaster")
                return answer, smtp.sendmail(USER, [USER], MESSAGE)

        (code, text), refused = await self.in_thread(client)
        self.assertEqual((code, text, refused), (550, NOT_PERMITTED[4:], {}))
        [(trace, _)] = await self.delivered_to_alice(1)
        self.assertNotIn(b"10.9.9.9", trace)
        self.assertNotIn(b"Authenticated sender: postmaster", trace)

    async def test_the_ehlo_reply_a_client_hears_does_not_offer_xclient(self) -> None:
        router = Router(answer=password_check(self.postfix.port, login="xclient"), verifies_passwords=True)
        port = await self.proxy(router, auth=["plain"])

        def client() -> Any:
            with self.smtp_from(port) as smtp:
                smtp.login(USER, PASSWORD)
                code, text = smtp.ehlo("again.example")
                return code, text, smtp.sendmail(USER, [USER], MESSAGE)

        code, text, refused = await self.in_thread(client)
        self.assertEqual((code, refused), (250, {}))
        self.assertIn(b"PIPELINING", text)
        for hidden in (b"XCLIENT", b"XFORWARD", b"STARTTLS", b"AUTH"):
            self.assertNotIn(hidden, text)
        [(trace, _)] = await self.delivered_to_alice(1)
        self.assertIn(b"(Authenticated sender: alice@example.test)", trace)
