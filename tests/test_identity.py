"""
Who a session logs in as, end to end: real TLS clients with client certificates, a real
listener, scripted upstreams that record what they hear.

- EXTERNAL logs in as the verified certificate's subject: an authorization identity
  naming anyone else is a failed login, and nothing reaches an upstream for them, even
  on the route a security report described (the client's user name, a master password).
- The route cache never gives one certificate's answer to another with the same subject.
- PLAIN with a foreign authorization identity is a failed login in each protocol (`NO`,
  `-ERR`, `535`), not a syntax error.
- An auth service's `Auth-User` holding a control character is a temporary failure,
  never a user name sent upstream.
- User names with control characters (an XOAUTH2 user, a certificate subject) are
  escaped in every log line.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import os
import socket
import ssl
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mailrelay.router import Reject, RouteRequest
from tests.support.frontends import PASSWORD, USER, FrontEndTestCase, Router, password_check
from tests.support.httpauth import AuthService, Reply, Seen, answer, ok
from tests.support.imap import ScriptedIMAP, read_tagged
from tests.support.net import WAIT, read_line, recv_all
from tests.support.pki import client_context
from tests.support.smtp import raw_reply

MASTER = "master-Pa55word"
"""The Route's password: the upstream accepts it for any user (a master login)."""
LOGGED_IN = b"OK [CAPABILITY IMAP4rev1 IDLE MOVE] Logged in\r\n"
NOT_AUTHORIZED = b"NO [AUTHENTICATIONFAILED] the client certificate does not authorize that identity\r\n"
FOREIGN_AUTHZID = "an authorization identity other than the user is not supported"


def b64(text: str | bytes) -> bytes:
    return base64.b64encode(text.encode() if isinstance(text, str) else text)


class ClientCA:
    """
    A CA for client certificates, made with cryptography: trustme gives each certificate
    a subject of its own, and these tests need two certificates with one subject, and
    subjects holding control characters.
    """

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mailrelay identity tests"),
                x509.NameAttribute(NameOID.COMMON_NAME, "client CA"),
            ]
        )
        now = datetime.datetime.now(datetime.UTC)
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        self.file = os.path.join(folder, "client-ca.pem")
        with open(self.file, "wb") as f:
            f.write(self.certificate.public_bytes(serialization.Encoding.PEM))

    def issue(self, name: str, common_name: str) -> tuple[str, x509.Certificate]:
        """A client certificate for `O=Example, CN=<common_name>` (a new key and serial
        each time): the path of a PEM file with its key, and the certificate."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        subject = x509.Name(
            [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example"), x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
        )
        certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        path = os.path.join(self.folder, f"{name}.pem")
        with open(path, "wb") as f:
            f.write(
                key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
            )
            f.write(certificate.public_bytes(serialization.Encoding.PEM))
        return path, certificate


def subject_of(certificate: x509.Certificate) -> str:
    """The user an EXTERNAL login with `certificate` is (its RFC 4514 subject)."""
    return certificate.subject.rfc4514_string()


class IdentityTestCase(FrontEndTestCase):
    protocol = "imap"

    def setUp(self) -> None:
        super().setUp()
        self.clients = ClientCA(self.pki.dir)

    def holding(self, pem: str) -> ssl.SSLContext:
        """A client context that trusts relay.test's CA and presents the certificate in `pem`."""
        context = client_context(self.pki.ca)
        context.load_cert_chain(pem)
        return context

    async def imaps(self, router: Any = None, router_table: dict[str, Any] | None = None, **config: Any) -> int:
        """An IMAPS listener that asks for client certificates (`[tls] client_ca`) and
        offers EXTERNAL, routed by `router` or by the configured `router_table`; `config`
        adds top-level tables."""
        settings = self.front_end_config("tls", auth=["plain", "xoauth2", "external"], max_attempts=10)
        settings["tls"]["client_ca"] = self.clients.file
        if router_table is not None:
            settings["router"] = router_table
        settings.update(config)
        _, self.port = await self.start_proxy(settings, router=router)
        return self.port

    def imap(self, context: ssl.SSLContext | None = None) -> ssl.SSLSocket:
        """A raw IMAPS client of `self.port`, its greeting read."""
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=WAIT)
        conn = (context or self.context).wrap_socket(raw, server_hostname="relay.test")
        self.addCleanup(conn.close)
        self.assertTrue(read_line(conn).startswith(b"* OK [CAPABILITY IMAP4rev1 "))
        return conn

    @staticmethod
    def talk(conn: Any, send: bytes, tag: bytes) -> bytes:
        conn.sendall(send)
        return read_tagged(conn, tag)

    def formatted_logs(self) -> list[str]:
        return self.logs.lines()


class ExternalIdentityTests(IdentityTestCase):
    async def test_a_certificate_cannot_log_in_as_another_user_on_a_master_password_route(self) -> None:
        """The reported attack: bob's certificate, EXTERNAL with authzid alice, routed with
        the client's user name and a master password the upstream takes for anyone."""
        bob_pem, bob = self.clients.issue("bob", "bob")
        upstream = self.server(ScriptedIMAP(users={USER: MASTER, subject_of(bob): MASTER}))
        router = Router(port=upstream.port, password=MASTER)
        await self.imaps(router)
        alice_dn = subject_of(bob).replace("CN=bob", "CN=alice")

        def client() -> list[bytes]:
            conn = self.imap(self.holding(bob_pem))
            replies = [
                self.talk(conn, tag + b" AUTHENTICATE EXTERNAL " + b64(authzid) + b"\r\n", tag)
                for tag, authzid in ((b"a", USER), (b"b", alice_dn), (b"c", subject_of(bob).lower()))
            ]
            # The authorization identity as the answer to the empty challenge, too.
            conn.sendall(b"d AUTHENTICATE EXTERNAL\r\n")
            replies.append(read_line(conn))
            replies.append(self.talk(conn, b64(USER) + b"\r\n", b"d"))
            replies.append(self.talk(conn, b"e LOGOUT\r\n", b"e"))
            return replies

        self.assertEqual(
            await self.in_thread(client),
            [
                b"a " + NOT_AUTHORIZED,
                b"b " + NOT_AUTHORIZED,
                b"c " + NOT_AUTHORIZED,
                b"+ \r\n",
                b"d " + NOT_AUTHORIZED,
                b"* BYE Logging out\r\ne OK LOGOUT completed\r\n",
            ],
        )
        self.assertEqual(router.requests, [])
        self.assertEqual(upstream.connections, 0)  # nothing at all reached an upstream
        line = await self.session_line()
        self.assertEqual((line["outcome"], line["user"]), ("rejected", "-"))

    async def test_a_certificate_logs_in_as_its_subject_with_or_without_naming_it(self) -> None:
        bob_pem, bob = self.clients.issue("bob", "bob")
        subject = subject_of(bob)
        upstream = self.server(ScriptedIMAP(users={USER: MASTER, subject: MASTER}))
        router = Router(port=upstream.port, password=MASTER)
        await self.imaps(router)

        def session(initial: bytes) -> list[bytes]:
            conn = self.imap(self.holding(bob_pem))
            return [
                self.talk(conn, b"a AUTHENTICATE EXTERNAL " + initial + b"\r\n", b"a"),
                self.talk(conn, b"b LOGOUT\r\n", b"b"),
            ]

        for initial in (b"=", b64(subject)):
            self.assertEqual(
                await self.in_thread(session, initial),
                [b"a " + LOGGED_IN, b"* BYE upstream logging out\r\nb OK LOGOUT completed\r\n"],
            )
            heard = await self.in_thread(upstream.result)
            self.assertEqual(heard.login, subject)
            self.assertNotIn(USER.encode(), heard.raw)
        self.assertEqual([(r.auth_method, r.user) for r in router.requests], [("external", subject)] * 2)
        assert router.requests[0].client_cert is not None
        self.assertEqual(
            router.requests[0].client_cert.fingerprint, hashlib.sha1(bob.public_bytes(serialization.Encoding.DER)).hexdigest()
        )

    async def test_two_certificates_with_one_subject_never_share_a_cached_answer(self) -> None:
        """`cache_ttl` on an auth_http router that decides by the certificate: bob's answer,
        cached, is not given to another certificate that has his subject."""
        bob_pem, bob = self.clients.issue("bob", "bob")
        twin_pem, twin = self.clients.issue("twin", "bob")
        self.assertEqual(twin.subject, bob.subject)
        self.assertNotEqual(twin.serial_number, bob.serial_number)
        upstream = self.server(ScriptedIMAP(users={subject_of(bob): MASTER}))

        def decide(seen: Seen) -> Reply:
            if seen.get("Auth-SSL-Serial") == format(bob.serial_number, "X"):
                return ok("127.0.0.1", upstream.port, ("Auth-Pass", MASTER))(seen)
            return answer(("Auth-Status", "Certificate not allowed"), ("Auth-Wait", "0.01"))(seen)

        service = AuthService(decide)
        self.addCleanup(service.close)
        await self.imaps(router_table={"type": "http", "url": service.url, "cache_ttl": 300})

        def session(pem: str) -> bytes:
            conn = self.imap(self.holding(pem))
            verdict = self.talk(conn, b"a AUTHENTICATE EXTERNAL =\r\n", b"a")
            self.talk(conn, b"b LOGOUT\r\n", b"b")
            return verdict

        self.assertEqual(await self.in_thread(session, bob_pem), b"a " + LOGGED_IN)
        self.assertEqual(await self.in_thread(session, twin_pem), b"a NO [AUTHENTICATIONFAILED] Certificate not allowed\r\n")
        self.assertEqual(await self.in_thread(session, bob_pem), b"a " + LOGGED_IN)  # from the cache
        self.assertEqual(await self.in_thread(session, twin_pem), b"a NO [AUTHENTICATIONFAILED] Certificate not allowed\r\n")
        serials = [seen.get("Auth-SSL-Serial") for seen in service.requests]
        self.assertEqual(serials, [format(c.serial_number, "X") for c in (bob, twin, twin)])
        self.assertEqual(upstream.connections, 2)

    async def test_a_subject_with_a_line_break_is_refused(self) -> None:
        broken_pem, _ = self.clients.issue("broken", "eve\r\nDELE 1")
        upstream = self.server(ScriptedIMAP(users={}))
        router = Router(port=upstream.port, password=MASTER)
        await self.imaps(router)

        def client() -> bytes:
            conn = self.imap(self.holding(broken_pem))
            return self.talk(conn, b"a AUTHENTICATE EXTERNAL =\r\n", b"a")

        self.assertEqual(
            await self.in_thread(client),
            b"a NO [AUTHENTICATIONFAILED] the client certificate's subject holds a line break or NUL\r\n",
        )
        self.assertEqual((router.requests, upstream.connections), ([], 0))


class ForeignAuthzidTests(IdentityTestCase):
    """AUTHENTICATE PLAIN `bob NUL alice NUL password`: well formed, so a failed login."""

    FOREIGN = b64(f"bob@example.test\0{USER}\0{PASSWORD}")
    OWN = b64(f"{USER}\0{USER}\0{PASSWORD}")

    async def test_imap_answers_no_and_the_client_may_log_in_after(self) -> None:
        upstream = self.server(ScriptedIMAP(users={USER: PASSWORD}))
        router = Router(answer=password_check(upstream.port))
        await self.proxy(router, "tls")

        def client() -> list[bytes]:
            conn = self.imap()
            return [
                self.talk(conn, b"a AUTHENTICATE PLAIN " + self.FOREIGN + b"\r\n", b"a"),
                self.talk(conn, b"b AUTHENTICATE PLAIN " + self.OWN + b"\r\n", b"b"),
                self.talk(conn, b"c LOGOUT\r\n", b"c"),
            ]

        self.assertEqual(
            await self.in_thread(client),
            [
                b"a NO [AUTHENTICATIONFAILED] " + FOREIGN_AUTHZID.encode() + b"\r\n",
                b"b " + LOGGED_IN,
                b"* BYE upstream logging out\r\nc OK LOGOUT completed\r\n",
            ],
        )
        self.assertEqual([r.user for r in router.requests], [USER])
        self.assertEqual((await self.in_thread(upstream.result)).login, USER)

    async def test_pop3_answers_err_auth(self) -> None:
        router = Router()
        await self.proxy(router, "tls", protocol="pop3")

        def client() -> bytes:
            raw = socket.create_connection(("127.0.0.1", self.port), timeout=WAIT)
            with self.context.wrap_socket(raw, server_hostname="relay.test") as conn:
                read_line(conn)
                conn.sendall(b"AUTH PLAIN " + self.FOREIGN + b"\r\nQUIT\r\n")
                return recv_all(conn)

        self.assertEqual(await self.in_thread(client), f"-ERR [AUTH] {FOREIGN_AUTHZID}\r\n+OK Bye\r\n".encode())
        self.assertEqual(router.requests, [])

    async def test_smtp_answers_535(self) -> None:
        router = Router()
        await self.proxy(router, "tls", protocol="smtp")

        def client() -> list[bytes]:
            raw = socket.create_connection(("127.0.0.1", self.port), timeout=WAIT)
            with self.context.wrap_socket(raw, server_hostname="relay.test") as conn:
                raw_reply(conn)
                conn.sendall(b"EHLO client.example\r\n")
                raw_reply(conn)
                conn.sendall(b"AUTH PLAIN " + self.FOREIGN + b"\r\n")
                return [raw_reply(conn)]

        self.assertEqual(await self.in_thread(client), [f"535 5.7.8 {FOREIGN_AUTHZID}\r\n".encode()])
        self.assertEqual(router.requests, [])


class AuthServiceUserTests(IdentityTestCase):
    async def test_an_auth_user_with_a_control_character_never_reaches_the_upstream(self) -> None:
        upstream = self.server(ScriptedIMAP(users={USER: PASSWORD, "other": PASSWORD}))
        users = iter(["other\0a LOGOUT", "other\x1b[2J", "other"])

        def decide(seen: Seen) -> Reply:
            return ok("127.0.0.1", upstream.port, ("Auth-User", next(users)))(seen)

        service = AuthService(decide)
        self.addCleanup(service.close)
        await self.imaps(router_table={"type": "http", "url": service.url})

        def client() -> list[bytes]:
            conn = self.imap()
            replies = [
                self.talk(conn, b"%d LOGIN %s %s\r\n" % (n, USER.encode(), PASSWORD.encode()), b"%d" % n) for n in (1, 2, 3)
            ]
            self.talk(conn, b"4 LOGOUT\r\n", b"4")
            return replies

        unavailable = b" NO [UNAVAILABLE] Temporary failure, try again later\r\n"
        self.assertEqual(await self.in_thread(client), [b"1" + unavailable, b"2" + unavailable, b"3 " + LOGGED_IN])
        heard = await self.in_thread(upstream.result)
        self.assertEqual(heard.login, "other")
        self.assertEqual(upstream.connections, 1)  # the refused answers connected nowhere
        self.assertEqual(len(service.requests), 3)


class LoggedUserNameTests(IdentityTestCase):
    RAW = ("\x1b", "\x07", "\x08", "\r", "\0", "\u202e")

    def assert_no_raw_control_characters(self) -> None:
        for line in self.formatted_logs():
            for c in self.RAW:
                self.assertNotIn(c, line, f"raw {c!r} in a log line: {line!r}")

    async def test_an_xoauth2_user_with_control_characters_is_escaped_in_every_log_line(self) -> None:
        user = "eve\x1b[2J\x07\x08\u202egnp.exe"
        shown = "eve\\x1b[2J\\x07\\x08\\u202egnp.exe"

        def refuse(request: RouteRequest) -> Any:
            raise Reject("Invalid token")

        router = Router(answer=refuse)
        await self.imaps(router, login_limits={"max_per_user": 2, "max_per_client": 100, "delay": 0})
        initial = b64(f"user={user}\x01auth=Bearer not-a-token\x01\x01")

        def client() -> list[bytes]:
            conn = self.imap()
            replies = [self.talk(conn, tag + b" AUTHENTICATE XOAUTH2 " + initial + b"\r\n", tag) for tag in (b"a", b"b")]
            replies.append(self.talk(conn, b"z LOGOUT\r\n", b"z"))
            return replies

        self.assertEqual(
            await self.in_thread(client),
            [
                b"a NO [AUTHENTICATIONFAILED] Invalid token\r\n",
                b"b NO [AUTHENTICATIONFAILED] Invalid token\r\n",
                b"* BYE Logging out\r\nz OK LOGOUT completed\r\n",
            ],
        )
        self.assertEqual([r.user for r in router.requests], [user, user])  # the Router gets it as sent
        line = await self.session_line()
        self.assertEqual(line["user"], shown)
        lines = self.formatted_logs()
        self.assertEqual(len([x for x in lines if f"login refused for {shown} from 127.0.0.1" in x]), 2, lines)
        # (The login limits count user names in lower case.)
        self.assertEqual(len([x for x in lines if "login limit reached" in x and shown.lower() in x]), 1, lines)
        self.assertEqual(len([x for x in lines if x.startswith("session ") and f"user={shown} " in x]), 1, lines)
        self.assert_no_raw_control_characters()

    async def test_a_certificate_subject_with_control_characters_is_escaped_in_every_log_line(self) -> None:
        mallory_pem, mallory = self.clients.issue("mallory", "mallory\x1b]0;owned\x07\u202e")
        subject = subject_of(mallory)
        self.assertIn("\x1b", subject)

        def refuse(request: RouteRequest) -> Any:
            raise Reject("Unknown certificate")

        router = Router(answer=refuse)
        await self.imaps(router)

        def client() -> list[bytes]:
            conn = self.imap(self.holding(mallory_pem))
            return [self.talk(conn, b"a AUTHENTICATE EXTERNAL =\r\n", b"a"), self.talk(conn, b"z LOGOUT\r\n", b"z")]

        replies = await self.in_thread(client)
        self.assertEqual(replies[0], b"a NO [AUTHENTICATIONFAILED] Unknown certificate\r\n")
        self.assertEqual([r.user for r in router.requests], [subject])
        shown = subject.replace("\x1b", "\\x1b").replace("\x07", "\\x07").replace("\u202e", "\\u202e")
        line = await self.session_line()
        self.assertEqual(line["user"], shown)
        self.assertTrue(any(f"login refused for {shown} from" in x for x in self.formatted_logs()), self.formatted_logs())
        self.assert_no_raw_control_characters()
