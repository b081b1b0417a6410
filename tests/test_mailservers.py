"""The real upstreams of tests/mailservers.py: a private Postfix, a private Dovecot and an aiosmtpd server."""

from __future__ import annotations

import base64
import contextlib
import imaplib
import os
import poplib
import random
import shutil
import smtplib
import socket
import ssl
import subprocess
import tempfile
from collections.abc import Iterator

import pytest
import trustme

from tests import mailservers
from tests.mailservers import Dovecot, DovecotError, Postfix, PostfixError, ReceivedMessage, SMTPUpstream, split_delivered

TIMEOUT = 30.0

ALICE = "alice@example.test"
BOB = "bob@example.test"
CAROL = "carol@example.test"
DAVE = "dave@example.test"
ERIN = "erin@example.test"


# -- certificates


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA(organization_name="mailrelay mailservers test CA")


@pytest.fixture(scope="module")
def certificate(ca: trustme.CA) -> Iterator[tuple[str, str]]:
    """A certificate for 127.0.0.1 (and a name) as PEM files: (chain, key)."""
    directory = tempfile.mkdtemp(prefix="mailrelay-mailservers-tls-")
    try:
        leaf = ca.issue_cert("127.0.0.1", "mx.upstream.test")
        cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
        for blob in leaf.cert_chain_pems:
            blob.write_to_path(cert, append=True)
        leaf.private_key_pem.write_to_path(key)
        yield cert, key
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    """Verifies the server's certificate and its name (127.0.0.1) against the test CA."""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def server_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "upstream.test").configure_cert(context)
    return context


# -- messages


def message_8bit(subject: str, body_lines: int = 5) -> bytes:
    """Headers and a body with 8-bit bytes, lines that need dot-stuffing and a 998-byte line."""
    lines = [
        b"From: Sender <sender@client.test>",
        b"To: Alice <alice@example.test>",
        b"Subject: " + subject.encode(),
        b"Message-ID: <" + subject.replace(" ", "-").encode() + b"@client.test>",
        b"MIME-Version: 1.0",
        b"Content-Type: text/plain; charset=utf-8",
        b"Content-Transfer-Encoding: 8bit",
        b"X-Eight-Bit: caf\xc3\xa9 \xe2\x82\xac",
        b"",
        b"Gr\xc3\xbc\xc3\x9fe, \xce\xba\xcf\x8c\xcf\x83\xce\xbc\xce\xb5 \xf0\x9f\x93\xa7",
        b".a line that starts with a dot",
        b"..two dots",
        b"." + b"x" * 997,
        bytes(range(0x80, 0x100)),
    ]
    lines += [b"line %d \xff\xfe\x80" % i for i in range(body_lines)]
    return b"\r\n".join(lines) + b"\r\n"


def random_8bit(size: int, seed: int) -> bytes:
    """`size` bytes (CRLF included) in lines of 1 to 998 bytes of any value but CR and LF."""
    rng = random.Random(seed)
    alphabet = bytes(b for b in range(256) if b not in b"\r\n")
    header = b"From: sender@client.test\r\nTo: alice@example.test\r\nSubject: big\r\n\r\n"
    parts = [header]
    total = len(header)
    while total < size:
        n = min(rng.randint(1, 998), max(size - total - 2, 1))
        line = bytes(rng.choices(alphabet, k=n))
        if rng.random() < 0.05:
            line = b"." + line[1:]
        parts.append(line + b"\r\n")
        total += n + 2
    return b"".join(parts)


def smtp(port: int) -> smtplib.SMTP:
    return smtplib.SMTP("127.0.0.1", port, local_hostname="client.example", timeout=TIMEOUT)


# -- Postfix


@pytest.fixture(scope="module")
def postfix() -> Iterator[Postfix]:
    """One plain Postfix for the module's tests: each test mails its own users."""
    directory = tempfile.mkdtemp(prefix="mailrelay-postfix-")
    try:
        with Postfix(directory, users=[ALICE, BOB, CAROL, DAVE]) as server:
            yield server
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def postfix_tls(certificate: tuple[str, str]) -> Iterator[Postfix]:
    """A second Postfix, with TLS, running beside the first."""
    directory = tempfile.mkdtemp(prefix="mailrelay-postfix-tls-")
    try:
        with Postfix(directory, tls=certificate, users=[ALICE, BOB, ERIN]) as server:
            yield server
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_postfix_delivers_8bit_mail_as_sent(postfix: Postfix) -> None:
    sent = message_8bit("eight bit")
    with smtp(postfix.port) as client:
        client.ehlo()
        assert client.has_extn("8bitmime")
        assert client.has_extn("xclient")
        assert not client.has_extn("starttls")
        assert client.sendmail("sender@client.test", [ALICE], sent, mail_options=["BODY=8BITMIME"]) == {}
    [delivered] = postfix.wait_for_messages(ALICE)
    trace, message = split_delivered(delivered)
    # The maildir file has LF line ends; otherwise the message is as sent.
    assert message == sent.replace(b"\r\n", b"\n")
    assert trace.startswith(
        b"Return-Path: <sender@client.test>\nX-Original-To: alice@example.test\n"
        b"Delivered-To: alice@example.test\nReceived: from client.example (localhost [127.0.0.1])\n"
    )
    assert b"by mx.upstream.test (Postfix) with ESMTP id " in trace


def test_postfix_refuses_unknown_users_at_rcpt(postfix: Postfix) -> None:
    with smtp(postfix.port) as client:
        client.ehlo()
        assert client.mail("sender@client.test")[0] == 250
        code, text = client.rcpt("nobody@example.test")
        assert code == 550, text
        assert text.startswith(b"5.1.1 <nobody@example.test>: Recipient address rejected")
        assert client.rcpt(BOB)[0] == 250


def test_postfix_xclient_names_the_client_and_login(postfix: Postfix) -> None:
    sent = message_8bit("xclient")
    with smtp(postfix.port) as client:
        client.ehlo()
        assert client.has_extn("xclient")
        assert "LOGIN" in client.esmtp_features["xclient"].split()
        code, text = client.docmd(
            "XCLIENT", "ADDR=192.0.2.7 PORT=4711 NAME=client.example LOGIN=alice@example.test HELO=client.example PROTO=ESMTP"
        )
        assert code == 220, text  # XCLIENT starts the session over, with a new greeting
        client.ehlo("client.example")
        assert client.sendmail("sender@client.test", [CAROL], sent) == {}
    [delivered] = postfix.wait_for_messages(CAROL)
    trace, message = split_delivered(delivered)
    assert message == sent.replace(b"\r\n", b"\n")
    assert (
        b"\nReceived: from client.example (client.example [192.0.2.7])\n"
        b"\t(Authenticated sender: alice@example.test)\n"
        b"\tby mx.upstream.test (Postfix) with ESMTPA id "
    ) in trace
    assert "client=client.example[192.0.2.7], sasl_method=XCLIENT, sasl_username=alice@example.test" in postfix.log_text()


def test_postfix_takes_16_mib(postfix: Postfix) -> None:
    sent = random_8bit(16 * 1024 * 1024, seed=16)
    with smtp(postfix.port) as client:
        assert client.sendmail("sender@client.test", [DAVE], sent, mail_options=["BODY=8BITMIME"]) == {}
    [delivered] = postfix.wait_for_messages(DAVE)
    assert split_delivered(delivered)[1] == sent.replace(b"\r\n", b"\n")


def test_postfix_starttls(postfix_tls: Postfix, ca: trustme.CA) -> None:
    sent = message_8bit("starttls")
    with smtp(postfix_tls.port) as client:
        client.ehlo()
        assert client.has_extn("starttls")
        client.starttls(context=client_context(ca))
        client.ehlo()
        assert client.has_extn("xclient")
        assert client.sendmail("sender@client.test", [ALICE], sent) == {}
    [delivered] = postfix_tls.wait_for_messages(ALICE)
    trace, message = split_delivered(delivered)
    assert message == sent.replace(b"\r\n", b"\n")
    assert b"\t(using TLSv1.3 with cipher " in trace


def test_postfix_implicit_tls(postfix_tls: Postfix, ca: trustme.CA) -> None:
    assert postfix_tls.tls_port is not None
    sent = message_8bit("implicit tls")
    with smtplib.SMTP_SSL(
        "127.0.0.1", postfix_tls.tls_port, local_hostname="client.example", context=client_context(ca), timeout=TIMEOUT
    ) as client:
        client.ehlo()
        assert not client.has_extn("starttls")
        assert client.sendmail("sender@client.test", [BOB], sent) == {}
    [delivered] = postfix_tls.wait_for_messages(BOB)
    trace, message = split_delivered(delivered)
    assert message == sent.replace(b"\r\n", b"\n")
    assert b"\t(using TLSv1.3 with cipher " in trace


def test_postfix_instances_are_apart(postfix: Postfix, postfix_tls: Postfix) -> None:
    assert postfix.tls_port is None
    assert len({postfix.port, postfix_tls.port, postfix_tls.tls_port}) == 3
    assert postfix.queue_dir != postfix_tls.queue_dir
    with smtp(postfix_tls.port) as client:
        assert client.sendmail("sender@client.test", [ERIN], message_8bit("apart")) == {}
    postfix_tls.wait_for_messages(ERIN)
    with smtp(postfix.port) as client:
        client.ehlo()
        client.mail("sender@client.test")
        assert client.rcpt(ERIN)[0] == 550


def test_postfix_stops_every_process_and_restarts() -> None:
    directory = tempfile.mkdtemp(prefix="mailrelay-postfix-")
    try:
        server = Postfix(directory)
        with server:
            first_port = server.port
            server.start()  # a no-op
            queue = server.queue_dir
            with open(os.path.join(queue, "pid", "master.pid")) as f:
                master = int(f.read())
            running = server.processes()
            assert master in running
            assert len(running) >= 6  # REAPER, postfix-script, master, qmgr, pickup, smtpd, ...
            processes = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
            assert f"smtpd -n 127.0.0.1:{first_port}" in processes
        server.stop()  # a no-op
        assert server.processes() == []
        # Not even zombies: REAPER collected the master's children, left when it exited.
        processes = subprocess.run(["ps", "-eo", "pid=,pgid=,stat=,args="], capture_output=True, text=True).stdout
        assert not [line for line in processes.splitlines() if line.split()[1] == str(master)]
        assert not [line for line in processes.splitlines() if int(line.split()[0]) in running]
        assert f"127.0.0.1:{first_port}" not in processes
        with pytest.raises(OSError):
            smtp(first_port)
        with server:
            assert server.queue_dir == queue
            with smtp(server.port) as client:
                assert client.sendmail("sender@client.test", [BOB], message_8bit("again")) == {}
            server.wait_for_messages(BOB)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_postfix_explains_what_went_wrong() -> None:
    directory = tempfile.mkdtemp(prefix="mailrelay-postfix-")
    try:
        with Postfix(directory) as server:
            with pytest.raises(PostfixError, match="0 of 1 messages delivered to alice@example.test") as raised:
                server.wait_for_messages(ALICE, timeout=0.1)
            assert "starting the Postfix mail system" in str(raised.value)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_postfix_takes_another_port_when_its_port_was_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    # A bound socket: Postfix's bind fails ("Address already in use", then a second's sleep).
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    port = taken.getsockname()[1]
    chosen = iter([[port]])
    real = mailservers.free_ports
    monkeypatch.setattr(mailservers, "free_ports", lambda count: next(chosen, None) or real(count))
    directory = tempfile.mkdtemp(prefix="mailrelay-postfix-")
    try:
        with taken, Postfix(directory) as server:
            assert server.port != port
            assert f"fatal: bind 127.0.0.1 port {port}: Address already in use" in server.log_text()
            with smtp(server.port) as client:
                assert client.noop()[0] == 250
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_postfix_takes_another_port_when_another_postfix_has_it(postfix: Postfix, monkeypatch: pytest.MonkeyPatch) -> None:
    # Postfix listens with SO_REUSEPORT: the second master binds the port without an error.
    chosen = iter([[postfix.port]])
    real = mailservers.free_ports
    monkeypatch.setattr(mailservers, "free_ports", lambda count: next(chosen, None) or real(count))
    directory = tempfile.mkdtemp(prefix="mailrelay-postfix-")
    try:
        with Postfix(directory) as server:
            assert server.port != postfix.port
            assert server.log_text().count("starting the Postfix mail system") == 2
            with smtp(postfix.port) as client:
                client.ehlo()
                client.mail("sender@client.test")
                assert client.rcpt(DAVE)[0] == 250  # the first instance's user: it has its port alone
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.slow  # two seconds: Postfix sleeps for one after a fatal error, in start and in check
def test_postfix_that_does_not_start_says_why() -> None:
    directory = tempfile.mkdtemp(prefix="mailrelay-postfix-")
    try:
        server = Postfix(directory, hostname="x" * 300)
        with pytest.raises(PostfixError, match="Postfix exited with status 1") as raised:
            server.start()
        assert "parameter myhostname: bad parameter value: xxx" in str(raised.value)
        assert server.processes() == []
        assert not server.running
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_postfix_needs_a_directory_others_can_reach() -> None:
    parent = tempfile.mkdtemp()  # mode 0700, like pytest's tmp_path's parents
    try:
        with pytest.raises(ValueError, match="closed to other users"):
            Postfix(os.path.join(parent, "postfix"))
    finally:
        shutil.rmtree(parent)


# -- Dovecot

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


def fetch(client: imaplib.IMAP4, number: int) -> bytes:
    """Message `number` of the selected mailbox, as BODY.PEEK[] gives it."""
    typ, data = client.fetch(str(number), "(BODY.PEEK[])")
    assert typ == "OK", data
    item = data[0]
    assert isinstance(item, tuple), data
    return item[1]


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
    assert (os.stat(path).st_uid, os.stat(path).st_gid) == (mailservers.NOBODY, mailservers.NOBODY)
    with open(path, "rb") as f:
        assert f.read() == sent
    with imap(dovecot.imap_port) as client:
        assert client.welcome.endswith(b"] imap.upstream.test Dovecot ready.")
        assert {"STARTTLS", "AUTH=PLAIN", "AUTH=LOGIN", "AUTH=CRAM-MD5"} <= set(client.capabilities)
        client.login(ALICE, PASSWORDS[ALICE])
        assert client.select("INBOX") == ("OK", [b"1"])
        assert fetch(client, 1) == sent
        # A maildir file with LF line ends comes out of IMAP with CRLF, as it must.
        dovecot.deliver(ALICE, message_8bit("imap lf").replace(b"\r\n", b"\n"))
        client.noop()
        assert fetch(client, 2) == message_8bit("imap lf")
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
        assert fetch(client, 1) == sent
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
        assert fetch(client, 1) == sent
    # CRAM-MD5 works too: the passwords are stored in plaintext.
    with imap(dovecot.imap_port) as client:
        assert client.login_cram_md5(CAROL, PASSWORDS[CAROL])[0] == "OK"
        client.select("INBOX")
        assert fetch(client, 1) == sent
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
    client = LineClient(dovecot_trusted.pop3_port)
    try:
        assert client.line() == b"+OK [XCLIENT] imap.upstream.test Dovecot ready."
        assert client.command(b"CAPA") == b"+OK"
        assert b"XCLIENT" not in client.until(b".")
        assert client.command(b"XCLIENT ADDR=192.0.2.8 PORT=4243") == b"+OK Updated"
        assert client.command(b"USER bob@example.test").startswith(b"+OK")
        assert client.command(b"PASS bob-secret") == b"+OK Logged in."
        assert dovecot_trusted.wait_for_session(BOB, "pop3").endswith(" 192.0.2.8")
        assert client.command(b"QUIT").startswith(b"+OK")
    finally:
        client.close()
    [line] = login_lines(dovecot_trusted, BOB)
    assert line.split(": Login: ")[0].endswith("pop3-login: Info")
    assert "rip=192.0.2.8, lip=127.0.0.1" in line


def test_dovecot_ignores_forwarded_addresses_from_others(dovecot: Dovecot) -> None:
    with imap(dovecot.imap_port) as client:
        assert client.xatom("ID", '("x-originating-ip" "192.0.2.99" "x-originating-port" "4242")')[0] == "OK"
        client.login(GRACE, PASSWORDS[GRACE])
        assert dovecot.wait_for_session(GRACE, "imap").endswith(" 127.0.0.1")
        assert not [line for line in dovecot.who() if not line.endswith(" 127.0.0.1")]
    client = LineClient(dovecot.pop3_port)
    try:
        assert client.line() == b"+OK imap.upstream.test Dovecot ready."  # no [XCLIENT]
        assert client.command(b"XCLIENT ADDR=192.0.2.98 PORT=4243") == b"+OK You are not from trusted IP - ignoring"
        client.command(b"USER " + GRACE.encode())
        assert client.command(b"PASS " + PASSWORDS[GRACE].encode()) == b"+OK Logged in."
        client.command(b"QUIT")
    finally:
        client.close()
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
                assert fetch(client, 1) == sent
        assert server.processes() == []
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_dovecot_takes_another_port_when_its_port_was_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    port = taken.getsockname()[1]
    real = mailservers.free_ports
    chosen = iter([[real(1)[0], port]])  # the POP3 port
    monkeypatch.setattr(mailservers, "free_ports", lambda count: next(chosen, None) or real(count))
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


# -- SMTPUpstream

USERS = {"user@example.test": "right password", "other": "pässword"}


@pytest.fixture
def upstream() -> Iterator[SMTPUpstream]:
    with SMTPUpstream(users=USERS) as server:
        yield server


@pytest.mark.parametrize(
    ("mechanism", "initial_response"), [("PLAIN", True), ("PLAIN", False), ("LOGIN", True), ("LOGIN", False)]
)
def test_upstream_auth_accepts_the_right_password(upstream: SMTPUpstream, mechanism: str, initial_response: bool) -> None:
    with smtp(upstream.port) as client:
        client.ehlo()
        assert client.esmtp_features["auth"].split() == ["LOGIN", "PLAIN"]
        client.user, client.password = "user@example.test", "right password"
        authenticator = client.auth_plain if mechanism == "PLAIN" else client.auth_login
        code, _ = client.auth(mechanism, authenticator, initial_response_ok=initial_response)
        assert code == 235
        client.sendmail("user@example.test", ["someone@example.net"], b"Subject: hi\r\n\r\nhi\r\n")
    [message] = upstream.wait_for_messages()
    assert message == ReceivedMessage(
        mail_from="user@example.test",
        rcpt_tos=("someone@example.net",),
        content=b"Subject: hi\r\n\r\nhi\r\n",
        login="user@example.test",
        helo="client.example",
        tls=False,
        mail_options=("SIZE=19",),  # smtplib's
        rcpt_options=(),
        peer=message.peer,
    )


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_upstream_auth_refuses_a_wrong_password(upstream: SMTPUpstream, mechanism: str) -> None:
    with smtp(upstream.port) as client:
        client.ehlo()
        client.user, client.password = "user@example.test", "wrong password"
        authenticator = client.auth_plain if mechanism == "PLAIN" else client.auth_login
        with pytest.raises(smtplib.SMTPAuthenticationError) as raised:
            client.auth(mechanism, authenticator)
        assert raised.value.smtp_code == 535
        client.user, client.password = "nobody", "right password"
        with pytest.raises(smtplib.SMTPAuthenticationError):
            client.auth(mechanism, authenticator)
        # Without a login, no mail.
        code, text = client.mail("user@example.test")
        assert (code, text) == (530, b"5.7.0 Authentication required")


def test_upstream_auth_with_8bit_password(upstream: SMTPUpstream) -> None:
    with smtp(upstream.port) as client:
        client.ehlo()
        secret = base64.b64encode(b"\0other\0p\xc3\xa4ssword").decode()
        assert client.docmd("AUTH", "PLAIN " + secret)[0] == 235
        client.sendmail("other", ["x@example.net"], b"\r\n")
    assert upstream.wait_for_messages()[0].login == "other"


def test_upstream_takes_8_mib_of_8bit_bytes_exactly(upstream: SMTPUpstream) -> None:
    sent = random_8bit(8 * 1024 * 1024, seed=8)
    with smtp(upstream.port) as client:
        client.login("user@example.test", "right password")
        client.sendmail("user@example.test", [ALICE, BOB], sent, mail_options=["BODY=8BITMIME"])
    [message] = upstream.wait_for_messages()
    assert message.content == sent
    assert message.rcpt_tos == (ALICE, BOB)
    assert message.mail_options == (f"SIZE={len(sent)}", "BODY=8BITMIME")


def test_upstream_takes_998_byte_lines_and_refuses_longer(upstream: SMTPUpstream) -> None:
    # 998 bytes and CRLF, and one more for a stuffed dot: aiosmtpd's limit is 1001 bytes on the wire.
    fits = b"x" * 998 + b"\r\n." + b"y" * 997 + b"\r\n"
    with smtp(upstream.port) as client:
        client.login("user@example.test", "right password")
        client.sendmail("user@example.test", [ALICE], fits)
        with pytest.raises(smtplib.SMTPDataError) as raised:
            client.sendmail("user@example.test", [ALICE], b"z" * 1000 + b"\r\n")
        assert raised.value.smtp_code == 500
    [message] = upstream.wait_for_messages()
    assert message.content == fits


def test_upstream_starttls(ca: trustme.CA) -> None:
    with SMTPUpstream(users=USERS, starttls=server_context(ca)) as upstream:
        with smtp(upstream.port) as client:
            client.ehlo()
            assert client.has_extn("starttls")
            assert client.has_extn("auth")  # before TLS too: auth_require_tls=False
            client.starttls(context=client_context(ca))
            client.ehlo("after.tls")
            assert not client.has_extn("starttls")
            client.login("user@example.test", "right password")
            client.sendmail("a@client.test", [ALICE], b"Subject: tls\r\n\r\n")
        [message] = upstream.wait_for_messages()
        assert message.tls
        assert message.helo == "after.tls"
        assert message.login == "user@example.test"


def test_upstream_implicit_tls(ca: trustme.CA) -> None:
    with SMTPUpstream(implicit_tls=server_context(ca)) as upstream:
        with smtplib.SMTP_SSL("127.0.0.1", upstream.port, context=client_context(ca), timeout=TIMEOUT) as client:
            client.ehlo()
            assert not client.has_extn("starttls")
            client.sendmail("a@client.test", [ALICE], b"Subject: tls\r\n\r\n")
        [message] = upstream.wait_for_messages()
        assert message.tls


def test_upstream_without_users_takes_mail_without_auth() -> None:
    with SMTPUpstream() as upstream:
        with smtp(upstream.port) as client:
            client.ehlo()
            assert not client.has_extn("auth")
            assert not client.has_extn("starttls")
            client.sendmail("a@client.test", [ALICE], b"Subject: plain\r\n\r\n")
            client.sendmail("b@client.test", [BOB], b"Subject: second\r\n\r\n")
        first, second = upstream.wait_for_messages(2)
        port = upstream.port
    assert (first.mail_from, first.login, first.tls) == ("a@client.test", None, False)
    assert second.content == b"Subject: second\r\n\r\n"
    with pytest.raises(TimeoutError, match="2 of 3 messages"):
        upstream.wait_for_messages(3, timeout=0.05)
    upstream.stop()  # a no-op
    with pytest.raises(OSError):
        smtp(port)
