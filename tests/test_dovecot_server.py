"""
The private Dovecot of the slow tier (`tests.support.dovecot.Dovecot`): IMAP and POP3,
TLS, forwarded client addresses, and a stop that leaves nothing running.
"""

from __future__ import annotations

import contextlib
import imaplib
import os
import poplib
import shutil
import socket
import ssl
import subprocess
import tempfile
from collections.abc import Iterator

import pytest
import trustme

from tests.support import dovecot as dovecot_module
from tests.support.dovecot import Dovecot, DovecotError
from tests.support.imap import fetch_message
from tests.support.mail import ALICE, BOB, CAROL, DAVE, ERIN, TIMEOUT, message_8bit
from tests.support.pki import client_context
from tests.support.servers import NOBODY, free_ports

pytestmark = pytest.mark.slow


FRANK = "frank@example.test"
GRACE = "grace@example.test"

PASSWORDS = {user: user.split("@")[0] + "-secret" for user in (ALICE, BOB, CAROL, DAVE, ERIN, FRANK, GRACE)}


@pytest.fixture(scope="module")
def dovecot(certificate: tuple[str, str]) -> Iterator[Dovecot]:
    """One Dovecot with TLS for the module's tests, trusting no proxy: each test has its own user."""
    directory = tempfile.mkdtemp(prefix="mailrelay-dovecot-")
    os.chmod(directory, 0o755)
    try:
        with Dovecot(directory, tls=certificate, users=PASSWORDS) as server:
            yield server
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def dovecot_trusted() -> Iterator[Dovecot]:
    """A second Dovecot, without TLS, that trusts loopback clients to name the real client."""
    directory = tempfile.mkdtemp(prefix="mailrelay-dovecot-trusted-")
    os.chmod(directory, 0o755)
    try:
        with Dovecot(directory, trusted_networks="127.0.0.0/8") as server:
            yield server
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def imap(port: int) -> imaplib.IMAP4:
    return imaplib.IMAP4("127.0.0.1", port, timeout=TIMEOUT)


def pop3(port: int) -> poplib.POP3:
    return poplib.POP3("127.0.0.1", port, timeout=TIMEOUT)


def retr(client: poplib.POP3, number: int) -> bytes:
    """Message `number` as RETR sends it: poplib un-stuffs the dots and splits the lines, without their CRLF."""
    response, lines, _ = client.retr(number)
    assert response.startswith(b"+OK"), response
    return b"".join(line + b"\r\n" for line in lines)


class LineClient:
    """A raw connection for what imaplib and poplib do not send (POP3 XCLIENT): a line out, a line in."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.file = self.sock.makefile("rb")

    def line(self) -> bytes:
        return self.file.readline().rstrip(b"\r\n")

    def command(self, line: bytes) -> bytes:
        self.sock.sendall(line + b"\r\n")
        return self.line()

    def until(self, end: bytes) -> list[bytes]:
        lines = []
        while (line := self.line()) != end:
            lines.append(line)
        return lines

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def login_lines(server: Dovecot, user: str, count: int = 1) -> list[str]:
    """The log's lines for the logins of `user`, once there are `count` of them."""
    return server.wait_for_log(f"-login: Info: Login: user=<{user}>,", count)


def test_dovecot_imap_fetches_a_delivered_message_byte_for_byte(dovecot: Dovecot) -> None:
    sent = message_8bit("imap")
    path = dovecot.deliver(ALICE, sent)
    assert os.path.dirname(path) == os.path.join(dovecot.maildir(ALICE), "new")
    assert (os.stat(path).st_uid, os.stat(path).st_gid) == (NOBODY, NOBODY)
    with open(path, "rb") as f:
        assert f.read() == sent
    with imap(dovecot.imap_port) as client:
        assert client.welcome.endswith(b"] imap.upstream.test Dovecot ready.")
        assert {"STARTTLS", "AUTH=PLAIN", "AUTH=LOGIN", "AUTH=CRAM-MD5"} <= set(client.capabilities)
        client.login(ALICE, PASSWORDS[ALICE])
        assert client.select("INBOX") == ("OK", [b"1"])
        assert fetch_message(client, 1) == sent
        # A maildir file with LF line ends comes out of IMAP with CRLF, as it must.
        dovecot.deliver(ALICE, message_8bit("imap lf").replace(b"\r\n", b"\n"))
        client.noop()
        assert fetch_message(client, 2) == message_8bit("imap lf")
    [line] = login_lines(dovecot, ALICE)
    assert "rip=127.0.0.1, lip=127.0.0.1" in line


def test_dovecot_imaps_with_a_verified_certificate(dovecot: Dovecot, ca: trustme.CA) -> None:
    assert dovecot.imaps_port is not None
    sent = message_8bit("imaps")
    dovecot.deliver(BOB, sent)
    with imaplib.IMAP4_SSL("127.0.0.1", dovecot.imaps_port, ssl_context=client_context(ca), timeout=TIMEOUT) as client:
        assert isinstance(client.sock, ssl.SSLSocket)
        assert client.sock.version() == "TLSv1.3"
        assert "STARTTLS" not in client.capabilities
        client.login(BOB, PASSWORDS[BOB])
        client.select("INBOX")
        assert fetch_message(client, 1) == sent
    [line] = login_lines(dovecot, BOB)
    assert ", TLS, " in line


def test_dovecot_imap_starttls_and_authenticate(dovecot: Dovecot, ca: trustme.CA) -> None:
    sent = message_8bit("starttls")
    dovecot.deliver(CAROL, sent)
    with imap(dovecot.imap_port) as client:
        client.starttls(ssl_context=client_context(ca))
        assert isinstance(client.sock, ssl.SSLSocket)
        typ, _ = client.authenticate("PLAIN", lambda challenge: f"\0{CAROL}\0{PASSWORDS[CAROL]}".encode())
        assert typ == "OK"
        client.select("INBOX")
        assert fetch_message(client, 1) == sent
    # CRAM-MD5 works too: the passwords are stored in plaintext.
    with imap(dovecot.imap_port) as client:
        assert client.login_cram_md5(CAROL, PASSWORDS[CAROL])[0] == "OK"
        client.select("INBOX")
        assert fetch_message(client, 1) == sent
    first, second = login_lines(dovecot, CAROL, 2)
    assert "method=PLAIN" in first and ", TLS, " in first
    assert "method=CRAM-MD5" in second and ", secured, " in second


def test_dovecot_pop3_retrieves_a_delivered_message_byte_for_byte(dovecot: Dovecot) -> None:
    sent = message_8bit("pop3")  # with lines that start with dots: RETR stuffs them, poplib un-stuffs
    dovecot.deliver(DAVE, sent)
    dovecot.deliver(DAVE, message_8bit("pop3 lf").replace(b"\r\n", b"\n"))
    with contextlib.closing(pop3(dovecot.pop3_port)) as client:
        assert client.getwelcome() == b"+OK imap.upstream.test Dovecot ready."
        capabilities = client.capa()
        assert {"USER", "STLS", "SASL"} <= set(capabilities)
        assert capabilities["SASL"] == ["PLAIN", "LOGIN", "CRAM-MD5"]
        client.user(DAVE)
        assert client.pass_(PASSWORDS[DAVE]).startswith(b"+OK")
        # Sizes and messages with CRLF line ends, whatever the maildir files have.
        assert client.stat() == (2, len(sent) + len(message_8bit("pop3 lf")))
        messages = {retr(client, 1), retr(client, 2)}
        assert messages == {sent, message_8bit("pop3 lf")}
        client.quit()


def test_dovecot_pop3_stls_and_pop3s(dovecot: Dovecot, ca: trustme.CA) -> None:
    sent = message_8bit("pop3 tls")
    dovecot.deliver(ERIN, sent)
    with contextlib.closing(pop3(dovecot.pop3_port)) as client:
        client.stls(context=client_context(ca))
        assert isinstance(client.sock, ssl.SSLSocket)
        client.user(ERIN)
        client.pass_(PASSWORDS[ERIN])
        assert retr(client, 1) == sent
        client.quit()
    assert dovecot.pop3s_port is not None
    with contextlib.closing(
        poplib.POP3_SSL("127.0.0.1", dovecot.pop3s_port, context=client_context(ca), timeout=TIMEOUT)
    ) as client:
        assert isinstance(client.sock, ssl.SSLSocket)
        assert client.sock.version() == "TLSv1.3"
        assert "STLS" not in client.capa()
        client.user(ERIN)
        client.pass_(PASSWORDS[ERIN])
        assert retr(client, 1) == sent
        client.quit()
    assert [", TLS, " in line for line in login_lines(dovecot, ERIN, 2)] == [True, True]


def test_dovecot_refuses_a_wrong_password(dovecot: Dovecot) -> None:
    with imap(dovecot.imap_port) as client:
        for user, password in ((FRANK, "wrong"), (FRANK, PASSWORDS[GRACE]), ("nobody@example.test", "wrong")):
            with pytest.raises(imaplib.IMAP4.error, match=r"\[AUTHENTICATIONFAILED\] Authentication failed"):
                client.login(user, password)
        # Answered at once, and no penalty for the address: the right password works now.
        assert client.login(FRANK, PASSWORDS[FRANK])[0] == "OK"
    with contextlib.closing(pop3(dovecot.pop3_port)) as client:
        client.user(FRANK)
        with pytest.raises(poplib.error_proto, match=r"-ERR \[AUTH\] Authentication failed"):
            client.pass_("wrong")
        client.user(FRANK)
        assert client.pass_(PASSWORDS[FRANK]).startswith(b"+OK")
        client.quit()
    mismatches = dovecot.wait_for_log(f"auth: Info: passwd-file({FRANK},127.0.0.1,<", 3)
    assert all(line.endswith(">): Password mismatch") for line in mismatches)
    dovecot.wait_for_log("auth: Info: passwd-file(nobody@example.test,127.0.0.1,<")
    assert len(login_lines(dovecot, FRANK, 2)) == 2


def test_dovecot_trusts_the_forwarded_client_address_from_a_trusted_network(dovecot_trusted: Dovecot) -> None:
    assert (dovecot_trusted.imaps_port, dovecot_trusted.pop3s_port) == (None, None)
    with imap(dovecot_trusted.imap_port) as client:
        assert "STARTTLS" not in client.capabilities
        typ, _ = client.xatom("ID", '("x-originating-ip" "192.0.2.7" "x-originating-port" "4242")')
        assert typ == "OK"
        client.login(ALICE, "alice-secret")
        session = dovecot_trusted.wait_for_session(ALICE, "imap")
        assert session.endswith(" 192.0.2.7")
        assert session in dovecot_trusted.who()
    [line] = login_lines(dovecot_trusted, ALICE)
    assert "rip=192.0.2.7, lip=127.0.0.1" in line
    # POP3: Dovecot's XCLIENT, which the greeting announces (CAPA does not list it).
    pop = LineClient(dovecot_trusted.pop3_port)
    try:
        assert pop.line() == b"+OK [XCLIENT] imap.upstream.test Dovecot ready."
        assert pop.command(b"CAPA") == b"+OK"
        assert b"XCLIENT" not in pop.until(b".")
        assert pop.command(b"XCLIENT ADDR=192.0.2.8 PORT=4243") == b"+OK Updated"
        assert pop.command(b"USER bob@example.test").startswith(b"+OK")
        assert pop.command(b"PASS bob-secret") == b"+OK Logged in."
        assert dovecot_trusted.wait_for_session(BOB, "pop3").endswith(" 192.0.2.8")
        assert pop.command(b"QUIT").startswith(b"+OK")
    finally:
        pop.close()
    [line] = login_lines(dovecot_trusted, BOB)
    assert line.split(": Login: ")[0].endswith("pop3-login: Info")
    assert "rip=192.0.2.8, lip=127.0.0.1" in line


def test_dovecot_ignores_forwarded_addresses_from_others(dovecot: Dovecot) -> None:
    with imap(dovecot.imap_port) as client:
        assert client.xatom("ID", '("x-originating-ip" "192.0.2.99" "x-originating-port" "4242")')[0] == "OK"
        client.login(GRACE, PASSWORDS[GRACE])
        assert dovecot.wait_for_session(GRACE, "imap").endswith(" 127.0.0.1")
        assert not [line for line in dovecot.who() if not line.endswith(" 127.0.0.1")]
    pop = LineClient(dovecot.pop3_port)
    try:
        assert pop.line() == b"+OK imap.upstream.test Dovecot ready."  # no [XCLIENT]
        assert pop.command(b"XCLIENT ADDR=192.0.2.98 PORT=4243") == b"+OK You are not from trusted IP - ignoring"
        pop.command(b"USER " + GRACE.encode())
        assert pop.command(b"PASS " + PASSWORDS[GRACE].encode()) == b"+OK Logged in."
        pop.command(b"QUIT")
    finally:
        pop.close()
    imap_login, pop3_login = login_lines(dovecot, GRACE, 2)
    assert imap_login.split(": Info: ")[0].endswith("imap-login")
    assert pop3_login.split(": Info: ")[0].endswith("pop3-login")
    assert "rip=127.0.0.1" in imap_login and "rip=127.0.0.1" in pop3_login
    assert "192.0.2.9" not in dovecot.log_text()


def test_dovecot_stops_every_process_and_restarts() -> None:
    directory = tempfile.mkdtemp(prefix="mailrelay-dovecot-")
    os.chmod(directory, 0o755)
    try:
        server = Dovecot(directory)
        sent = message_8bit("restart")
        server.deliver(ALICE, sent)  # before the start
        with server:
            ports = (server.imap_port, server.pop3_port)
            server.start()  # a no-op
            with open(os.path.join(server.base_dir, "master.pid")) as f:
                master = int(f.read())
            # A session that is logged in, one that is not, and a POP3 session.
            session = imap(server.imap_port)
            session.login(ALICE, "alice-secret")
            idle = imap(server.imap_port)
            pop = pop3(server.pop3_port)
            pop.user(BOB)
            pop.pass_("bob-secret")
            running = server.processes()
            assert master in running
            titles = subprocess.run(["ps", "-o", "args=", "-p", ",".join(map(str, running))], capture_output=True, text=True)
            for service in ("anvil", "log", "config", "auth", "imap", "imap-login", "pop3"):
                assert f"{server.name}/{service}" in titles.stdout.split()
        server.stop()  # a no-op
        assert server.processes() == []
        assert not server.running
        processes = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
        assert not [line for line in processes.splitlines() if int(line.split()[0]) in running]
        assert server.name not in processes and server.conf_file not in processes
        for port in ports:
            with pytest.raises(OSError):
                socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        # The sessions were closed: IMAP's with a BYE.
        with pytest.raises((imaplib.IMAP4.abort, OSError)):
            session.noop()
        for client in (session, idle):
            client.shutdown()
        pop.close()
        assert "master: Warning: Killed with signal 15" in server.log_text()
        with server:
            assert (server.imap_port, server.pop3_port) == ports
            with imap(server.imap_port) as client:
                client.login(ALICE, "alice-secret")
                client.select("INBOX")
                assert fetch_message(client, 1) == sent
        assert server.processes() == []
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_dovecot_takes_another_port_when_its_port_was_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    port = taken.getsockname()[1]
    real = free_ports
    chosen = iter([[real(1)[0], port]])  # the POP3 port
    monkeypatch.setattr(dovecot_module, "free_ports", lambda count: next(chosen, None) or real(count))
    directory = tempfile.mkdtemp(prefix="mailrelay-dovecot-")
    try:
        with taken, Dovecot(directory) as server:
            assert server.pop3_port != port
            with contextlib.closing(pop3(server.pop3_port)) as client:
                client.user(ALICE)
                assert client.pass_("alice-secret").startswith(b"+OK")
                client.quit()
            assert f"listen(127.0.0.1, {port}) failed: Address already in use" in server.log_text()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_dovecot_that_does_not_start_says_why() -> None:
    directory = tempfile.mkdtemp(prefix="mailrelay-dovecot-")
    try:
        server = Dovecot(directory, tls=(os.path.join(directory, "missing.pem"), os.path.join(directory, "key.pem")))
        with pytest.raises(DovecotError, match="Dovecot exited with status 89") as raised:
            server.start()
        assert f"ssl_cert: Can't open file {directory}/missing.pem: No such file or directory" in str(raised.value)
        assert server.processes() == []
        assert not server.running
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_dovecot_checks_its_arguments() -> None:
    parent = tempfile.mkdtemp()  # mode 0700, like pytest's tmp_path's parents
    try:
        with pytest.raises(ValueError, match="closed to other users"):
            Dovecot(os.path.join(parent, "dovecot"))
        directory = tempfile.mkdtemp(prefix="mailrelay-dovecot-")
        try:
            with pytest.raises(ValueError, match="not a user@domain address"):
                Dovecot(directory, users={"alice": "secret"})
            with pytest.raises(ValueError, match="has a colon"):
                Dovecot(directory, users={ALICE: "se:cret"})
            with pytest.raises(DovecotError, match="has not been started"):
                _ = Dovecot(directory).imap_port
        finally:
            shutil.rmtree(directory)
    finally:
        shutil.rmtree(parent)
