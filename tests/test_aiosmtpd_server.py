"""
`tests.support.aiosmtpd_server.SMTPUpstream`, the recording aiosmtpd server: AUTH, 8-bit
DATA, TLS. In the quick tier: it needs no root and no Debian package.
"""

from __future__ import annotations

import base64
import smtplib
from collections.abc import Iterator

import pytest
import trustme

from tests.support.aiosmtpd_server import ReceivedMessage, SMTPUpstream
from tests.support.mail import ALICE, BOB, TIMEOUT, random_8bit, server_context, smtp
from tests.support.pki import client_context

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
