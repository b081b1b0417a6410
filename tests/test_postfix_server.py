"""The private Postfix of the slow tier (`tests.support.postfix.Postfix`): delivery, TLS, XCLIENT, and a clean stop."""

from __future__ import annotations

import os
import shutil
import smtplib
import socket
import subprocess
import tempfile
from collections.abc import Iterator

import pytest
import trustme

from tests.support import postfix as postfix_module
from tests.support.mail import ALICE, BOB, CAROL, DAVE, ERIN, TIMEOUT, message_8bit, random_8bit, smtp
from tests.support.pki import client_context
from tests.support.postfix import Postfix, PostfixError, split_delivered
from tests.support.servers import free_ports

pytestmark = pytest.mark.slow


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
    real = free_ports
    monkeypatch.setattr(postfix_module, "free_ports", lambda count: next(chosen, None) or real(count))
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
    real = free_ports
    monkeypatch.setattr(postfix_module, "free_ports", lambda count: next(chosen, None) or real(count))
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
