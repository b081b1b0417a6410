"""The real SMTP upstreams of tests/mailservers.py: a private Postfix and an aiosmtpd server."""

from __future__ import annotations

import base64
import os
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
from tests.mailservers import Postfix, PostfixError, ReceivedMessage, SMTPUpstream, split_delivered

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
