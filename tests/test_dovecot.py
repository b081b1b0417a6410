"""
The IMAP and POP3 front-ends in front of a real Dovecot (Debian's packages, started
privately by `tests.support.dovecot.Dovecot`): what the client reads, byte for byte, what
Dovecot believes about the client, and logins it refuses. Clients are imaplib, poplib
and curl; they connect from 127.0.0.2, so that Dovecot, which sees mailrelay at
127.0.0.1, can only learn the client's address from what mailrelay forwards.
"""

from __future__ import annotations

import base64
import imaplib
import os
import poplib
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import zlib
from typing import Any

import pytest
import trustme

from tests.support.dovecot import Dovecot
from tests.support.frontends import FrontEndTestCase, Router
from tests.support.imap import fetch_message
from tests.support.net import WAIT, payload, read_line
from tests.support.processes import LISTENING, TWISTD, assert_clean_stop

CLIENT_ADDRESS = "127.0.0.2"

# One user per test, so that no test sees another's messages or sessions. The
# password has a space, a double quote and a backslash: imaplib sends it as a quoted
# string with escapes, which mailrelay must read back exactly.
PASSWORD = 'pa ss"w\\rd'
USERS = {
    f"{name}@example.test": PASSWORD
    for name in (
        "fetch",
        "auth",
        "append",
        "idle",
        "pop",
        "popauth",
        "pops",
        "fwd",
        "nofwd",
        "popfwd",
        "wrong",
        "up-starttls",
        "up-tls",
        "curl",
        "literal",
        "compress",
    )
}

MESSAGE = (
    b"From: Alice <alice@example.test>\r\nTo: fetch@example.test\r\nSubject: caf\xc3\xa9\r\n"
    b"Message-ID: <dovecot-test@example.test>\r\n\r\n"
    b"Hello,\r\n.a line that starts with a dot\r\n8-bit: \xe2\x82\xac \xff\xfe\r\n"
)

pytestmark = pytest.mark.slow

imaplib.Commands.setdefault("ID", ("NONAUTH", "AUTH", "SELECTED"))


class IMAPFrom(imaplib.IMAP4):
    """imaplib connecting from 127.0.0.2."""

    def _create_socket(self, timeout: Any) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout, source_address=(CLIENT_ADDRESS, 0))


class IMAPSFrom(imaplib.IMAP4_SSL):
    def _create_socket(self, timeout: Any) -> Any:
        sock = socket.create_connection((self.host, self.port), timeout, source_address=(CLIENT_ADDRESS, 0))
        return self.ssl_context.wrap_socket(sock, server_hostname="relay.test")


class POP3From(poplib.POP3):
    def _create_socket(self, timeout: Any) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout, source_address=(CLIENT_ADDRESS, 0))


class POP3SFrom(poplib.POP3_SSL):
    context: ssl.SSLContext  # set by POP3_SSL.__init__; not in its stub

    def _create_socket(self, timeout: Any) -> Any:
        sock = socket.create_connection((self.host, self.port), timeout, source_address=(CLIENT_ADDRESS, 0))
        return self.context.wrap_socket(sock, server_hostname="relay.test")


def pop3_command(pop: poplib.POP3, line: bytes) -> bytes:
    """A command poplib has no method for (AUTH), and its one-line reply without CRLF."""
    pop.sock.sendall(line + b"\r\n")
    return pop.file.readline().rstrip(b"\r\n")


class DovecotTestCase(FrontEndTestCase):
    protocol = "imap"
    dovecot: Dovecot

    @classmethod
    def setUpClass(cls) -> None:
        # The directory is open to others: Dovecot's mail processes (nobody) go through it.
        cert, key = cls.upstream_pki("mailrelay-dovecot-", "imap.upstream.test")
        os.mkdir(f"{cls.directory}/dovecot")
        # Dovecot trusts loopback: it takes the client's address from mailrelay's ID or
        # XCLIENT, and without them logs mailrelay's own (127.0.0.1).
        cls.dovecot = Dovecot(f"{cls.directory}/dovecot", tls=(cert, key), users=USERS, trusted_networks="127.0.0.0/8")
        cls.dovecot.start()

    @classmethod
    def tearDownClass(cls) -> None:
        cls.dovecot.stop()
        shutil.rmtree(cls.directory, ignore_errors=True)

    def imap(self, port: int, mode: str = "starttls") -> imaplib.IMAP4:
        """imaplib from 127.0.0.2, through TLS (STARTTLS or implicit)."""
        if mode == "tls":
            return IMAPSFrom("127.0.0.1", port, ssl_context=self.context, timeout=WAIT)
        client = IMAPFrom("127.0.0.1", port, timeout=WAIT)
        client.starttls(self.context)
        return client

    def pop3(self, port: int, mode: str = "starttls") -> poplib.POP3:
        if mode == "tls":
            return POP3SFrom("127.0.0.1", port, context=self.context, timeout=WAIT)
        client = POP3From("127.0.0.1", port, timeout=WAIT)
        client.stls(self.context)
        return client

    def logged(self) -> str:
        """Everything mailrelay logged in this test, formatted."""
        return "\n".join(self.logs.lines())


class IMAPTests(DovecotTestCase):
    async def test_login_select_and_fetch_through_starttls_byte_exact(self) -> None:
        user = "fetch@example.test"
        self.dovecot.deliver(user, MESSAGE)
        router = Router(self.dovecot.imap_port)
        port = await self.proxy(router)

        def client() -> Any:
            with self.imap(port) as imap:
                status, login = imap.login(user, PASSWORD)
                selected = imap.select("INBOX")
                _, fetched = imap.fetch("1", "(BODY.PEEK[])")
                return status, login, selected, fetched

        status, login, selected, fetched = await self.in_thread(client)
        # The client's tagged OK is Dovecot's own, with its post-login capabilities.
        self.assertEqual(status, "OK")
        self.assertRegex(login[0], rb"^\[CAPABILITY IMAP4rev1 .*\bIDLE\b.*\] Logged in$")
        self.assertEqual(selected, ("OK", [b"1"]))
        self.assertEqual(fetched[0][1], MESSAGE)
        [request] = router.requests
        self.assertEqual((request.user, request.password, request.auth_method), (user, PASSWORD, "plain"))
        self.assertEqual((request.protocol, request.tls, request.client[0]), ("imap", True, CLIENT_ADDRESS))
        self.assertNotIn(PASSWORD, self.logged())

    async def test_authenticate_plain_through_implicit_tls(self) -> None:
        user = "auth@example.test"
        self.dovecot.deliver(user, MESSAGE)
        router = Router(self.dovecot.imap_port)
        port = await self.proxy(router, mode="tls")

        def client() -> Any:
            with self.imap(port, "tls") as imap:
                status = imap.authenticate("PLAIN", lambda _: f"\0{user}\0{PASSWORD}".encode())
                imap.select("INBOX", readonly=True)
                return status, fetch_message(imap, 1)

        (status, _), fetched = await self.in_thread(client)
        self.assertEqual((status, fetched), ("OK", MESSAGE))
        self.assertEqual(router.requests[0].mode, "tls")

    async def test_login_with_literals_reaches_dovecot(self) -> None:
        user = "literal@example.test"
        self.dovecot.deliver(user, MESSAGE)
        port = await self.proxy(Router(self.dovecot.imap_port))

        def client() -> list[bytes]:
            imap = self.imap(port)
            try:
                # A synchronising literal for the user name, LITERAL+ for the password.
                imap.send(b"a1 LOGIN {%d}\r\n" % len(user))
                continuation = imap.readline()
                imap.send(user.encode() + b" {%d+}\r\n" % len(PASSWORD) + PASSWORD.encode() + b"\r\n")
                answer = imap.readline()
                imap.send(b"a2 LOGOUT\r\n")
                return [continuation, answer, imap.readline(), imap.readline()]
            finally:
                imap.shutdown()

        continuation, answer, bye, logout = await self.in_thread(client)
        self.assertEqual(continuation, b"+ OK\r\n")
        self.assertRegex(answer, rb"^a1 OK \[CAPABILITY IMAP4rev1 [^\]]*\] Logged in\r\n$")
        self.assertEqual(bye[:6], b"* BYE ")
        self.assertEqual(logout[:5], b"a2 OK")

    async def test_append_of_a_10_mib_literal_then_fetch_it_back(self) -> None:
        user = "append@example.test"
        port = await self.proxy(Router(self.dovecot.imap_port))
        body = payload(10 << 20, seed=11)
        # 8-bit lines of 76 bytes without CR or LF: a message IMAP stores as it is.
        body = body.replace(b"\r", b"\x8d").replace(b"\n", b"\x8a")
        lines = b"\r\n".join(body[i : i + 76] for i in range(0, len(body), 76))
        message = b"From: append@example.test\r\nSubject: big\r\n\r\n" + lines + b"\r\n"

        def client() -> Any:
            with self.imap(port) as imap:
                imap.login(user, PASSWORD)
                appended = imap.append("INBOX", None, None, message)
                imap.select("INBOX")
                return appended, fetch_message(imap, 1)

        (status, _), fetched = await self.in_thread(client)
        self.assertEqual(status, "OK")
        self.assertEqual(len(fetched), len(message))
        self.assertTrue(fetched == message, "the message came back altered")
        session = await self.session_line()
        self.assertGreater(session["bytes_up"], 10 << 20)
        self.assertGreater(session["bytes_down"], 10 << 20)

    async def test_idle_is_woken_by_a_delivery(self) -> None:
        user = "idle@example.test"
        self.dovecot.deliver(user, MESSAGE)
        port = await self.proxy(Router(self.dovecot.imap_port))

        def client() -> list[bytes]:
            with self.imap(port) as imap:
                imap.login(user, PASSWORD)
                imap.select("INBOX")
                imap.send(b"i1 IDLE\r\n")
                idling = imap.readline()
                self.dovecot.deliver(user, MESSAGE.replace(b"caf\xc3\xa9", b"second"))
                exists = imap.readline()
                while b"EXISTS" not in exists:  # Dovecot may say RECENT first
                    exists = imap.readline()
                imap.send(b"DONE\r\n")
                done = imap.readline()
                while not done.startswith(b"i1 "):
                    done = imap.readline()
                return [idling, exists, done]

        idling, exists, done = await self.in_thread(client)
        self.assertEqual(idling[:2], b"+ ")
        self.assertEqual(exists, b"* 2 EXISTS\r\n")
        self.assertEqual(done[:6], b"i1 OK ")

    async def test_wrong_password_is_refused_by_dovecot_and_the_client_may_retry(self) -> None:
        user = "wrong@example.test"
        router = Router(self.dovecot.imap_port)
        port = await self.proxy(router, max_attempts=2)

        def client() -> Any:
            with self.imap(port) as imap:
                try:
                    imap.login(user, "not-the-password")
                except imaplib.IMAP4.error as e:
                    refused = str(e)
                else:
                    refused = "accepted"
                return refused, imap.login(user, PASSWORD)[0]

        refused, status = await self.in_thread(client)
        self.assertIn("[AUTHENTICATIONFAILED]", refused)
        self.assertEqual(status, "OK")
        self.assertEqual([r.attempt for r in router.requests], [1, 2])
        self.assertNotIn("not-the-password", self.logged())
        self.assertIn(f"login refused for {user} from {CLIENT_ADDRESS}", self.logged())

    async def test_upstream_starttls_verified(self) -> None:
        user = "up-starttls@example.test"
        self.dovecot.deliver(user, MESSAGE)
        router = Router(self.dovecot.imap_port, tls="starttls", tls_ca=self.upstream_ca_file, server_name="imap.upstream.test")
        port = await self.proxy(router)

        def client() -> bytes:
            with self.imap(port) as imap:
                imap.login(user, PASSWORD)
                imap.select("INBOX", readonly=True)
                return fetch_message(imap, 1)

        self.assertEqual(await self.in_thread(client), MESSAGE)
        lines = await self.in_thread(self.dovecot.wait_for_log, f"user=<{user}>")
        self.assertIn("TLS", lines[-1])

    async def test_upstream_implicit_tls_verified(self) -> None:
        user = "up-tls@example.test"
        self.dovecot.deliver(user, MESSAGE)
        assert self.dovecot.imaps_port is not None
        router = Router(self.dovecot.imaps_port, tls="tls", tls_ca=self.upstream_ca_file, server_name="imap.upstream.test")
        port = await self.proxy(router, mode="tls")

        def client() -> bytes:
            with self.imap(port, "tls") as imap:
                imap.login(user, PASSWORD)
                imap.select("INBOX", readonly=True)
                return fetch_message(imap, 1)

        self.assertEqual(await self.in_thread(client), MESSAGE)

    async def test_an_upstream_certificate_for_another_name_is_refused(self) -> None:
        router = Router(self.dovecot.imap_port, tls="starttls", tls_ca=self.upstream_ca_file, server_name="other.test")
        port = await self.proxy(router)

        def client() -> str:
            with self.imap(port) as imap:
                try:
                    imap.login("fetch@example.test", PASSWORD)
                except imaplib.IMAP4.error as e:
                    return str(e)
                return "accepted"

        self.assertIn("[UNAVAILABLE]", await self.in_thread(client))


class CompressTests(DovecotTestCase):
    async def test_compress_deflate_after_login_passes_untouched(self) -> None:
        """COMPRESS (RFC 4978) is the upstream's: mailrelay does not offer it before login,
        the client learns of it from Dovecot's answer to LOGIN, and from then on both
        directions are DEFLATE streams mailrelay splices without reading."""
        user = "compress@example.test"
        self.dovecot.deliver(user, MESSAGE)
        port = await self.proxy(Router(self.dovecot.imap_port), mode="tls")

        def client() -> tuple[bytes, bytes, bytes, bytes]:
            raw = socket.create_connection(("127.0.0.1", port), timeout=WAIT, source_address=(CLIENT_ADDRESS, 0))
            with self.context.wrap_socket(raw, server_hostname="relay.test") as conn:
                greeting = read_line(conn)
                # LOGIN and COMPRESS in one write: COMPRESS reaches Dovecot behind the login.
                password = PASSWORD.encode()
                conn.sendall(b"a LOGIN %s {%d+}\r\n%s\r\nc COMPRESS DEFLATE\r\n" % (user.encode(), len(password), password))
                logged_in = read_line(conn)
                compressing = read_line(conn)
                deflate = zlib.compressobj(wbits=-15)
                inflate = zlib.decompressobj(wbits=-15)
                commands = b"s SELECT INBOX\r\nf FETCH 1 BODY.PEEK[]\r\nz LOGOUT\r\n"
                conn.sendall(deflate.compress(commands) + deflate.flush(zlib.Z_SYNC_FLUSH))
                received = b""
                while b"\r\nz OK " not in received:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    received += inflate.decompress(chunk)
                return greeting, logged_in, compressing, received

        greeting, logged_in, compressing, received = await self.in_thread(client)
        self.assertNotIn(b"COMPRESS", greeting)
        self.assertRegex(logged_in, rb"^a OK \[CAPABILITY [^\]]*\bCOMPRESS=DEFLATE\b[^\]]*\] Logged in\r\n$")
        self.assertEqual(compressing[:5], b"c OK ")
        self.assertIn(b"\r\ns OK [READ-WRITE] ", received)
        self.assertIn(b"{%d}\r\n" % len(MESSAGE) + MESSAGE + b")\r\nf OK ", received)
        self.assertIn(b"\r\nz OK ", received)


class ForwardingTests(DovecotTestCase):
    async def test_imap_forward_client_makes_dovecot_see_the_client_address(self) -> None:
        user = "fwd@example.test"
        port = await self.proxy(Router(self.dovecot.imap_port, forward_client=True))

        def client() -> str:
            with self.imap(port) as imap:
                imap.login(user, PASSWORD)
                return self.dovecot.wait_for_session(user, "imap")

        who = await self.in_thread(client)
        self.assertTrue(who.endswith(" " + CLIENT_ADDRESS), who)
        [line] = await self.in_thread(self.dovecot.wait_for_log, f"Login: user=<{user}>")
        self.assertIn(f"rip={CLIENT_ADDRESS},", line)
        # mailrelay's session id is Dovecot's: one id for the session in both logs.
        session = await self.session_line()
        self.assertIn(f"session=<{session['session_id']}>", line)

    async def test_without_forward_client_dovecot_sees_mailrelay(self) -> None:
        user = "nofwd@example.test"
        port = await self.proxy(Router(self.dovecot.imap_port))

        def client() -> str:
            with self.imap(port) as imap:
                imap.login(user, PASSWORD)
                return self.dovecot.wait_for_session(user, "imap")

        who = await self.in_thread(client)
        self.assertTrue(who.endswith(" 127.0.0.1"), who)

    async def test_a_client_cannot_claim_another_address_with_its_own_id(self) -> None:
        user = "nofwd@example.test"
        port = await self.proxy(Router(self.dovecot.imap_port))

        def client() -> str:
            with self.imap(port) as imap:
                imap._simple_command("ID", '("name" "spoofer" "x-originating-ip" "192.0.2.66")')
                imap.login(user, PASSWORD)
                return self.dovecot.wait_for_session(user, "imap")

        who = await self.in_thread(client)
        self.assertNotIn("192.0.2.66", who)
        self.assertNotIn("192.0.2.66", self.dovecot.log_text())

    async def test_pop3_forward_client_uses_xclient(self) -> None:
        user = "popfwd@example.test"
        port = await self.proxy(Router(self.dovecot.pop3_port, forward_client=True), protocol="pop3")

        def client() -> str:
            pop = self.pop3(port)
            try:
                pop.user(user)
                pop.pass_(PASSWORD)
                return self.dovecot.wait_for_session(user, "pop3")
            finally:
                pop.quit()

        who = await self.in_thread(client)
        self.assertTrue(who.endswith(" " + CLIENT_ADDRESS), who)


class POP3Tests(DovecotTestCase):
    async def test_stls_user_pass_list_and_retr_byte_exact(self) -> None:
        user = "pop@example.test"
        self.dovecot.deliver(user, MESSAGE)
        router = Router(self.dovecot.pop3_port)
        port = await self.proxy(router, protocol="pop3")

        def client() -> Any:
            pop = self.pop3(port)
            try:
                welcome = pop.getwelcome()
                pop.user(user)
                logged_in = pop.pass_(PASSWORD)
                listing = pop.list()
                _, lines, octets = pop.retr(1)
                return welcome, logged_in, listing, lines, octets
            finally:
                pop.quit()

        welcome, logged_in, listing, lines, octets = await self.in_thread(client)
        self.assertEqual(welcome, b"+OK relay.test POP3 ready")
        self.assertEqual(logged_in, b"+OK Logged in.")  # Dovecot's own words
        self.assertEqual(listing[1], [b"1 %d" % len(MESSAGE)])
        self.assertEqual(b"\r\n".join(lines) + b"\r\n", MESSAGE)
        self.assertEqual(octets, len(MESSAGE))
        self.assertEqual(router.requests[0].protocol, "pop3")

    async def test_auth_plain_over_implicit_tls(self) -> None:
        user = "popauth@example.test"
        self.dovecot.deliver(user, MESSAGE)
        port = await self.proxy(Router(self.dovecot.pop3_port), protocol="pop3", mode="tls")

        def client() -> Any:
            pop = self.pop3(port, "tls")
            try:
                response = base64.b64encode(f"\0{user}\0{PASSWORD}".encode())
                authenticated = pop3_command(pop, b"AUTH PLAIN " + response)
                return authenticated, pop.retr(1)[1]
            finally:
                pop.quit()

        authenticated, lines = await self.in_thread(client)
        self.assertEqual(authenticated, b"+OK Logged in.")
        self.assertEqual(b"\r\n".join(lines) + b"\r\n", MESSAGE)

    async def test_upstream_stls_and_a_wrong_password(self) -> None:
        user = "pops@example.test"
        self.dovecot.deliver(user, MESSAGE)
        router = Router(self.dovecot.pop3_port, tls="starttls", tls_ca=self.upstream_ca_file, server_name="imap.upstream.test")
        port = await self.proxy(router, protocol="pop3")

        def client() -> Any:
            pop = self.pop3(port)
            try:
                pop.user(user)
                try:
                    pop.pass_("wrong-password")
                except poplib.error_proto as e:
                    refused = e.args[0]
                pop.user(user)
                pop.pass_(PASSWORD)
                return refused, pop.retr(1)[1]
            finally:
                pop.quit()

        refused, lines = await self.in_thread(client)
        self.assertTrue(refused.startswith(b"-ERR [AUTH] "), refused)
        self.assertEqual(b"\r\n".join(lines) + b"\r\n", MESSAGE)
        self.assertNotIn("wrong-password", self.logged())


class CurlTests(DovecotTestCase):
    """curl, a client with its own IMAP and POP3 code, through implicit TLS."""

    async def test_curl_fetches_a_message_over_imaps_and_pop3s(self) -> None:
        curl = shutil.which("curl")
        assert curl is not None, "curl is not installed (dev/test installs it)"
        user = "curl@example.test"
        self.dovecot.deliver(user, MESSAGE)
        imaps = await self.proxy(Router(self.dovecot.imap_port), mode="tls")
        pop3s = await self.proxy(Router(self.dovecot.pop3_port), protocol="pop3", mode="tls")
        ca_file = f"{self.directory}/relay-ca-{imaps}.pem"
        self.pki.ca.cert_pem.write_to_path(ca_file)

        def fetch(url: str, port: int) -> bytes:
            command = [curl, "-sS", "--cacert", ca_file, "--connect-to", f"relay.test:{port}:127.0.0.1:{port}"]
            command += ["--user", f"{user}:{PASSWORD}", url]
            return subprocess.run(command, check=True, capture_output=True, timeout=WAIT).stdout

        self.assertEqual(await self.in_thread(fetch, f"imaps://relay.test:{imaps}/INBOX;UID=1", imaps), MESSAGE)
        self.assertEqual(await self.in_thread(fetch, f"pop3s://relay.test:{pop3s}/1", pop3s), MESSAGE)


def test_twistd_imap_and_pop3_with_a_route_map_in_front_of_dovecot(tmp_path: Any, spawn: Any) -> None:  # noqa: F811
    """The whole deployment a mail administrator writes: `twistd mailrelay` from the
    installed package, IMAPS and POP3 with STLS, passwords checked by a route map against
    bcrypt hashes, Dovecot told the client's address."""
    import bcrypt

    user = "alice@example.test"
    password = "alice-secret"
    directory = tempfile.mkdtemp(prefix="mailrelay-dovecot-")
    os.chmod(directory, 0o755)
    os.mkdir(f"{directory}/dovecot")
    with Dovecot(f"{directory}/dovecot", trusted_networks="127.0.0.0/8") as dovecot:
        dovecot.deliver(user, MESSAGE)
        ca = trustme.CA()
        ca.issue_cert("relay.test", "127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "relay.pem"))
        hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
        (tmp_path / "imap.toml").write_text(
            f'[[rule]]\nuser = "{user}"\npassword = "{hashed}"\nreject_wait = 0\n'
            f'route = {{ host = "127.0.0.1", port = {dovecot.imap_port}, forward_client = true }}\n'
            '[default]\nreject = "no such account"\n'
        )
        (tmp_path / "mailrelay.toml").write_text(
            '[tls]\ncert = "relay.pem"\n'
            '[[listener]]\nname = "imaps"\nlisten = "tcp:0:interface=127.0.0.1"\nmode = "tls"\nprotocol = "imap"\n'
            'hostname = "relay.test"\nrouter = { type = "map", file = "imap.toml" }\n'
            '[[listener]]\nname = "pop3"\nlisten = "tcp:0:interface=127.0.0.1"\nmode = "starttls"\nprotocol = "pop3"\n'
            f'hostname = "relay.test"\nrouter = {{ type = "static", host = "127.0.0.1", port = {dovecot.pop3_port} }}\n'
        )
        process = spawn(TWISTD, "-n", "--pidfile=", "mailrelay", "--config", "mailrelay.toml")
        imaps = int(process.wait_for(LISTENING.format(name="imaps")).group(1))
        pop3 = int(process.wait_for(LISTENING.format(name="pop3")).group(1))
        context = ssl.create_default_context()
        ca.configure_trust(context)

        imap = IMAPSFrom("127.0.0.1", imaps, ssl_context=context, timeout=WAIT)
        with pytest.raises(imaplib.IMAP4.error, match=r"\[AUTHENTICATIONFAILED\]"):
            imap.login(user, "not the password")
        imap.login(user, password)
        imap.select("INBOX", readonly=True)
        assert fetch_message(imap, 1) == MESSAGE
        assert dovecot.wait_for_session(user, "imap").endswith(" " + CLIENT_ADDRESS)
        imap.logout()

        pop = POP3From("127.0.0.1", pop3, timeout=WAIT)
        pop.stls(context)
        pop.user(user)
        pop.pass_(password)
        assert b"\r\n".join(pop.retr(1)[1]) + b"\r\n" == MESSAGE
        pop.quit()

        process.wait_for(r"listener=pop3 .* outcome=closed")
        process.signal(signal.SIGTERM)
        output = assert_clean_stop(process)
    shutil.rmtree(directory, ignore_errors=True)
    assert f"login refused for {user} from {CLIENT_ADDRESS}" in output
    assert "not the password" not in output and password not in output
    assert re.search(rf"session \S+ listener=imaps client=127\.0\.0\.2:\d+ user={user} upstream=127\.0\.0\.1:\d+ ", output), (
        output
    )
