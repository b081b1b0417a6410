"""
The upstream logins of SMTP, IMAP and POP3 (`mailrelay.core.*_login`), driven with bytes
alone: what mailrelay writes to an upstream, byte for byte, for what the upstream says;
each refusal; each answer that makes a route unusable (named by stage, never with a
credential); answers split anywhere; bytes past the end left for the splice. Then the one
Twisted adapter (`protocols.upstream.run_dialogue`) on an in-memory transport.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

import pytest
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.testing import StringTransport

from mailrelay.connector import LoginStep, UpstreamProtocol
from mailrelay.core.dialogue import MAX_RESPONSE_LINE, Conversation, Dialogue
from mailrelay.core.errors import UpstreamProtocolError
from mailrelay.core.facts import ConnectionFacts
from mailrelay.core.imap_login import IMAPLogin
from mailrelay.core.login import UpstreamCredentials, unusable_login, upstream_credentials
from mailrelay.core.pop3_login import POP3Login
from mailrelay.core.smtp_login import SMTPLogin
from mailrelay.protocols.upstream import login_steps, run_dialogue
from mailrelay.router import Reject, Route, RouteRequest
from mailrelay.splice import PeerClosed

USER, PASSWORD = "alice@example.org", "s3cret-pw"
CLIENT, LOCAL = ("192.0.2.7", 50123), ("192.0.2.1", 587)
CONNECTION = ConnectionFacts(client=CLIENT, local=LOCAL, listener="test", session_id="s1")
PLAIN = base64.b64encode(b"\0" + USER.encode() + b"\0" + PASSWORD.encode())
SECRETS = (PASSWORD, base64.b64encode(PASSWORD.encode()).decode(), PLAIN.decode())

Exchange = tuple[bytes, bytes]
"""What the upstream says, and what mailrelay must write in answer."""


def request(protocol: Any = "smtp", auth_method: Any = "plain", password: str = PASSWORD, **facts: Any) -> RouteRequest:
    return RouteRequest(
        listener="test",
        protocol=protocol,
        mode="starttls",
        client=CLIENT,
        local=LOCAL,
        user=USER,
        password=password,
        auth_method=auth_method,
        **facts,
    )


def route(**options: Any) -> Route:
    return Route(host="upstream.test", port=25, **options)


def talk(dialogue: Dialogue[Any], first: bytes, exchanges: Sequence[Exchange], bytewise: bool = False) -> Conversation[Any]:
    """Run `dialogue`: it starts by writing `first`, then writes each exchange's answer
    to the upstream's words (fed in one piece, or one byte at a time)."""
    conversation = Conversation(dialogue)
    assert conversation.start() == first
    for said, expected in exchanges:
        assert not conversation.finished, f"finished before the upstream said {said!r}"
        if bytewise:
            written = b"".join(conversation.receive(said[i : i + 1]) for i in range(len(said)))
        else:
            written = conversation.receive(said)
        assert written == expected, f"after {said!r}"
    return conversation


def finished(dialogue: Dialogue[Any], first: bytes, exchanges: Sequence[Exchange], bytewise: bool = False) -> Any:
    """`talk`, which must end the dialogue with nothing left over; its result."""
    conversation = talk(dialogue, first, exchanges, bytewise)
    assert conversation.finished
    assert conversation.leftover() == b""
    return conversation.result


def fails(dialogue: Dialogue[Any], exchanges: Sequence[bytes], error: type[Exception] = UpstreamProtocolError) -> Any:
    """Feed the upstream's words until the dialogue raises `error`; the exception. An
    error message never holds the password, in any encoding."""
    conversation = Conversation(dialogue)
    with pytest.raises(error) as raised:
        conversation.start()
        for said in exchanges:
            conversation.receive(said)
    for secret in SECRETS:
        assert secret not in str(raised.value)
    return raised.value


def stages(dialogue: Dialogue[Any], exchanges: Sequence[bytes]) -> list[str]:
    """What the dialogue waits for after each of the upstream's words (first: before any)."""
    conversation = Conversation(dialogue)
    conversation.start()
    seen = [conversation.stage]
    for said in exchanges:
        conversation.receive(said)
        seen.append(conversation.stage)
    return seen


# -- what the three share ---------------------------------------------------------------------


def test_credentials_are_the_routes_when_it_names_a_password() -> None:
    given = upstream_credentials(request(), route(user="master", password="m", auth_mechanism="login"))
    assert given == UpstreamCredentials("master", "m", "login")
    assert "m'" not in repr(given) and "secret" not in repr(given)


def test_credentials_are_the_clients_with_the_routes_mechanism() -> None:
    assert upstream_credentials(request(), route(auth_mechanism="login")) == UpstreamCredentials(USER, PASSWORD, "login")
    token = upstream_credentials(request(auth_method="xoauth2"), route())
    assert token == UpstreamCredentials(USER, PASSWORD, "xoauth2")


def test_a_login_that_revealed_no_secret_cannot_be_passed_through() -> None:
    with pytest.raises(UpstreamProtocolError, match="a cram-md5 login cannot be passed through"):
        upstream_credentials(request(auth_method="cram-md5"), route())


def test_imap_and_pop3_always_log_in() -> None:
    assert unusable_login(route(), "IMAP") is None
    assert 'login = "xclient" is SMTP\'s' in (unusable_login(route(login="xclient"), "POP3") or "")
    assert "a POP3 upstream needs a login" in (unusable_login(route(login="none"), "POP3") or "")


# -- SMTP ---------------------------------------------------------------------------------------


def smtp(auth_method: Any = "plain", envelope: tuple[bytes, bytes] | None = None, esmtp: bool = True) -> SMTPLogin:
    return SMTPLogin(
        CONNECTION,
        request(auth_method=auth_method),
        hostname=b"relay.test",
        helo=b"client.example",
        esmtp=esmtp,
        envelope=envelope,
    )


GREETING = b"220 mx.test ESMTP\r\n"
EHLO_REPLY = b"250-mx.test\r\n250-PIPELINING\r\n250-CHUNKING\r\n250-STARTTLS\r\n250 AUTH PLAIN LOGIN XOAUTH2\r\n"


@pytest.mark.parametrize("bytewise", [False, True])
def test_smtp_passthrough_plain_byte_exact(bytewise: bool) -> None:
    login = smtp()
    exchanges = [
        (GREETING, b"EHLO client.example\r\n"),
        (EHLO_REPLY, b"AUTH PLAIN " + PLAIN + b"\r\n"),
        (b"235 2.7.0 ok\r\n", b""),
    ]
    assert finished(login.login(route()), b"", exchanges, bytewise) == b""
    assert login.client_reply == b""
    assert login.offers("chunking") and not login.offers("BINARYMIME")


def test_smtp_starttls_then_ehlo_again_and_only_its_extensions_count() -> None:
    login = smtp()
    starttls = [(GREETING, b"EHLO client.example\r\n"), (EHLO_REPLY, b"STARTTLS\r\n"), (b"220 2.0.0 go ahead\r\n", b"")]
    assert finished(login.starttls(route(tls="starttls")), b"", starttls) is None
    assert not login.offers("CHUNKING")  # RFC 3207: forgotten with the plaintext
    # The same connection, now over TLS: no second greeting.
    after = [(b"250-mx.test\r\n250 AUTH PLAIN\r\n", b"AUTH PLAIN " + PLAIN + b"\r\n"), (b"235 ok\r\n", b"")]
    finished(login.login(route(tls="starttls")), b"EHLO client.example\r\n", after)
    assert not login.offers("CHUNKING") and login.offers("AUTH")


def test_smtp_a_new_connection_is_greeted_again() -> None:
    login = smtp()
    talk(login.starttls(route(tls="starttls")), b"", [(GREETING, b"EHLO client.example\r\n")])
    login.new_connection()
    exchanges = [(GREETING, b"EHLO client.example\r\n"), (b"250 mx.test\r\n", b"")]
    assert finished(login.login(route(login="none")), b"", exchanges) == b""


def test_smtp_xclient_login_byte_exact() -> None:
    login = smtp()
    ehlo = b"250-mx.test\r\n250-XCLIENT NAME ADDR PORT PROTO HELO LOGIN DESTADDR DESTPORT\r\n250 8BITMIME\r\n"
    xclient = (
        b"XCLIENT ADDR=192.0.2.7 PORT=50123 NAME=[UNAVAILABLE] HELO=client.example PROTO=ESMTP"
        b" DESTADDR=192.0.2.1 DESTPORT=587 LOGIN=alice@example.org\r\n"
    )
    exchanges = [
        (GREETING, b"EHLO relay.test\r\n"),  # mailrelay's own name until XCLIENT said who the client is
        (ehlo, xclient),
        (b"220 mx.test ESMTP\r\n", b"EHLO client.example\r\n"),
        (b"250-mx.test\r\n250 CHUNKING\r\n", b""),
    ]
    assert finished(login.login(route(login="xclient")), b"", exchanges) == b""
    assert login.offers("CHUNKING")  # from the EHLO after XCLIENT, the one the session goes on from


def test_smtp_xclient_sends_only_the_attributes_offered_and_helo_for_an_smtp_client() -> None:
    login = smtp(esmtp=False)
    exchanges = [
        (GREETING, b"EHLO relay.test\r\n"),
        (b"250-mx.test\r\n250 XCLIENT ADDR PROTO\r\n", b"XCLIENT ADDR=192.0.2.7 PROTO=SMTP\r\n"),
        (b"250 ok\r\n", b"HELO client.example\r\n"),
        (b"250 mx.test\r\n", b""),
    ]
    finished(login.login(route(login="xclient")), b"", exchanges)


def test_smtp_forward_client_then_auth_without_login_attribute() -> None:
    login = smtp()
    exchanges = [
        (GREETING, b"EHLO relay.test\r\n"),
        (b"250-mx.test\r\n250 XCLIENT ADDR LOGIN\r\n", b"XCLIENT ADDR=192.0.2.7\r\n"),
        (b"220 ok\r\n", b"EHLO client.example\r\n"),
        (b"250-mx.test\r\n250 AUTH PLAIN\r\n", b"AUTH PLAIN " + PLAIN + b"\r\n"),
        (b"235 ok\r\n", b""),
    ]
    finished(login.login(route(forward_client=True)), b"", exchanges)


@pytest.mark.parametrize("bytewise", [False, True])
def test_smtp_auth_login_byte_exact(bytewise: bool) -> None:
    login = smtp()
    exchanges = [
        (GREETING, b"EHLO client.example\r\n"),
        (EHLO_REPLY, b"AUTH LOGIN\r\n"),
        (b"334 VXNlcm5hbWU6\r\n", base64.b64encode(USER.encode()) + b"\r\n"),
        (b"334 UGFzc3dvcmQ6\r\n", base64.b64encode(PASSWORD.encode()) + b"\r\n"),
        (b"235 2.7.0 ok\r\n", b""),
    ]
    finished(login.login(route(auth_mechanism="login")), b"", exchanges, bytewise)


def test_smtp_a_token_refused_after_its_error_challenge_is_a_reject() -> None:
    token = base64.b64encode(b"user=" + USER.encode() + b"\x01auth=Bearer " + PASSWORD.encode() + b"\x01\x01")
    exchanges = [
        (GREETING, b"EHLO client.example\r\n"),
        (EHLO_REPLY, b"AUTH XOAUTH2 " + token + b"\r\n"),
        (b"334 eyJzdGF0dXMiOiI0MDEifQ==\r\n", b"\r\n"),  # XOAUTH2 answers its error challenge with an empty line
    ]
    conversation = talk(smtp(auth_method="xoauth2").login(route()), b"", exchanges)
    with pytest.raises(Reject) as raised:
        conversation.receive(b"535 5.7.8 bad token\r\n")
    assert raised.value.code == "535 5.7.8"


def test_smtp_wrong_credentials_are_a_reject() -> None:
    rejected = fails(smtp().login(route()), [GREETING, EHLO_REPLY, b"535 5.7.8 no\r\n"], Reject)
    assert (rejected.code, rejected.message) == ("535 5.7.8", "Authentication credentials invalid")


def test_smtp_auth_none_replays_the_envelope_and_leaves_the_rcpt_reply_for_the_client() -> None:
    mail, rcpt = b"MAIL FROM:<s@example.net> SIZE=10", b"RCPT TO:<bob@example.org>"
    login = smtp(auth_method="none", envelope=(mail, rcpt))
    conversation = talk(
        login.login(route(login="none")),
        b"",
        [(GREETING, b"EHLO client.example\r\n"), (b"250 mx.test\r\n", mail + b"\r\n")],
    )
    # A pipelining upstream may answer the RCPT in the same packet: that reply is the client's.
    assert conversation.receive(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n") == rcpt + b"\r\n"
    assert conversation.finished and conversation.result == b""
    assert conversation.leftover() == b"250 2.1.5 ok\r\n"


def test_smtp_a_refused_sender_is_the_clients_rcpt_refusal() -> None:
    login = smtp(auth_method="none", envelope=(b"MAIL FROM:<s@x>", b"RCPT TO:<b@y>"))
    rejected = fails(login.login(route(login="none")), [GREETING, b"250 mx\r\n", b"550 5.7.1 go away\r\n"], Reject)
    assert (rejected.code, rejected.message) == (550, "5.7.1 go away")


def test_smtp_stages_name_what_is_awaited() -> None:
    said = [GREETING, EHLO_REPLY, b"220 go\r\n"]
    assert stages(smtp().starttls(route(tls="starttls")), said) == [
        "greeting",
        "answer to EHLO",
        "answer to STARTTLS",
        "answer to STARTTLS",
    ]
    assert stages(smtp().login(route()), [GREETING, EHLO_REPLY]) == ["greeting", "answer to EHLO", "login reply"]
    envelope = (b"MAIL FROM:<s@x>", b"RCPT TO:<b@y>")
    assert stages(smtp("none", envelope).login(route(login="none")), [GREETING, b"250 mx\r\n"])[-1] == "answer to MAIL FROM"


@pytest.mark.parametrize(
    "said, message",
    [
        ([b"554 5.3.2 busy\r\n"], "upstream greeted with 554 5.3.2 busy"),
        ([b"HTTP/1.1 400 Bad Request\r\n"], "upstream sent a malformed reply line: b'HTTP/1.1 400 Bad Request\\r\\n'"),
        ([b"220-mx\r\n250 mx\r\n"], "upstream changed the code within a multi-line reply: b'250 mx\\r\\n'"),
        ([b"220-x\r\n" * 100], "upstream sent a reply of more than 100 lines"),
        ([b"220 " + b"x" * 5000], "upstream sent a line longer than 4096 bytes"),
        ([GREETING, b"502 5.5.2 what\r\n"], "upstream answered EHLO with 502 5.5.2 what"),
        ([GREETING, b"250 mx.test\r\n"], "upstream offers no AUTH (does it want TLS first?)"),
        ([GREETING, b"250-mx.test\r\n250 AUTH LOGIN\r\n"], "upstream does not offer AUTH PLAIN"),
        ([GREETING, EHLO_REPLY, b"454 4.7.0 Temporary authentication failure\r\n"], "upstream answered AUTH with 454 4.7.0"),
        ([GREETING, EHLO_REPLY, b"250 what\r\n"], "upstream answered AUTH with 250 what"),
    ],
)
def test_smtp_an_unusable_upstream_is_named(said: list[bytes], message: str) -> None:
    assert message in str(fails(smtp().login(route()), said))


def test_smtp_auth_login_errors_name_the_step_never_the_user_or_password() -> None:
    login = smtp()
    said = [GREETING, EHLO_REPLY, b"334 VXNlcm5hbWU6\r\n", b"501 5.5.2 no\r\n"]
    error = fails(login.login(route(auth_mechanism="login")), said)
    assert str(error) == "upstream answered the AUTH LOGIN user name with 501 5.5.2 no"
    assert base64.b64encode(USER.encode()).decode() not in str(error)


def test_smtp_without_starttls_or_xclient_offered() -> None:
    assert str(fails(smtp().starttls(route(tls="starttls")), [GREETING, b"250 mx\r\n"])) == "upstream does not offer STARTTLS"
    assert str(fails(smtp().starttls(route(tls="starttls")), [GREETING, EHLO_REPLY, b"454 4.7.0 no TLS\r\n"])) == (
        "upstream answered STARTTLS with 454 4.7.0 no TLS"
    )
    assert "upstream does not offer XCLIENT to mailrelay" in str(
        fails(smtp().login(route(login="xclient")), [GREETING, EHLO_REPLY])
    )


def test_smtp_a_client_that_revealed_no_secret_needs_the_routes_password() -> None:
    error = fails(smtp(auth_method="cram-md5").login(route()), [GREETING, EHLO_REPLY])
    assert str(error).endswith('the Route must supply the upstream password, or use login = "xclient"')


# -- IMAP ---------------------------------------------------------------------------------------


def imap(auth_method: Any = "plain", client_id: Any = None) -> IMAPLogin:
    return IMAPLogin(CONNECTION, request("imap", auth_method), tag=b"a1", client_id=client_id)


IMAP_GREETING = b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN ID LITERAL+] ready\r\n"
LOGGED_IN_IMAP = b"* CAPABILITY IMAP4rev1 IDLE\r\na1 OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n"


@pytest.mark.parametrize("bytewise", [False, True])
def test_imap_authenticate_plain_with_the_clients_tag_and_its_reply_verbatim(bytewise: bool) -> None:
    login = imap()
    exchanges = [(IMAP_GREETING, b"a1 AUTHENTICATE PLAIN " + PLAIN + b"\r\n"), (LOGGED_IN_IMAP, b"")]
    assert finished(login.login(route()), b"", exchanges, bytewise) == LOGGED_IN_IMAP
    assert login.client_reply == LOGGED_IN_IMAP


@pytest.mark.parametrize("bytewise", [False, True])
def test_imap_capability_starttls_capability_then_login_byte_exact(bytewise: bool) -> None:
    login = imap()
    starttls = [
        (b"* OK ready\r\n", b"mr1 CAPABILITY\r\n"),
        (b"* CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED\r\nmr1 OK done\r\n", b"mr2 STARTTLS\r\n"),
        (b"mr2 OK Begin TLS\r\n", b""),
    ]
    finished(login.starttls(route(tls="starttls")), b"", starttls, bytewise)
    after = [
        (b"* CAPABILITY IMAP4rev1 AUTH=LOGIN\r\nmr3 OK done\r\n", b'a1 LOGIN "alice@example.org" "s3cret-pw"\r\n'),
        (b"a1 OK Logged in\r\n", b""),
    ]
    assert finished(login.login(route(tls="starttls")), b"mr3 CAPABILITY\r\n", after, bytewise) == b"a1 OK Logged in\r\n"


def test_imap_a_new_connection_is_greeted_again_and_tags_start_over() -> None:
    login = imap()
    talk(login.starttls(route(tls="starttls")), b"", [(b"* OK ready\r\n", b"mr1 CAPABILITY\r\n")])
    login.new_connection()
    talk(login.starttls(route(tls="starttls")), b"", [(b"* OK ready\r\n", b"mr1 CAPABILITY\r\n")])


def test_imap_login_with_a_synchronising_literal_for_an_8bit_password() -> None:
    login = IMAPLogin(CONNECTION, request("imap", "login", password="pässwort"), tag=b"a1")
    password = "pässwort".encode()
    exchanges = [
        (b"* OK [CAPABILITY IMAP4rev1] ready\r\n", b'a1 LOGIN "alice@example.org" {%d}\r\n' % len(password)),
        (b"+ go ahead\r\n", password + b"\r\n"),
        (b"a1 OK done\r\n", b""),
    ]
    finished(login.login(route()), b"", exchanges)


def test_imap_login_with_a_non_synchronising_literal_when_the_upstream_has_literal_plus() -> None:
    login = IMAPLogin(CONNECTION, request("imap", "login", password="a\r\nb"), tag=b"a1")
    line = b'a1 LOGIN "alice@example.org" {4+}\r\na\r\nb\r\n'
    finished(login.login(route()), b"", [(b"* OK [CAPABILITY IMAP4rev1 LITERAL+] ready\r\n", line), (b"a1 OK\r\n", b"")])


def test_imap_authenticate_without_sasl_ir_waits_for_the_continuation() -> None:
    exchanges = [
        (b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] ready\r\n", b"a1 AUTHENTICATE PLAIN\r\n"),
        (b"+ \r\n", PLAIN + b"\r\n"),
        (b"a1 OK done\r\n", b""),
    ]
    finished(imap().login(route()), b"", exchanges)


def test_imap_id_passes_the_clients_fields_and_address_when_forwarding() -> None:
    login = imap(client_id=[("name", "Thunderbird"), ("x-originating-ip", "6.6.6.6")])
    id_line = (
        b'mr1 ID ("name" "Thunderbird" "x-originating-ip" "192.0.2.7" "x-originating-port" "50123"'
        b' "x-connected-ip" "192.0.2.1" "x-connected-port" "587" "x-session-ext-id" "s1")\r\n'
    )
    exchanges = [(IMAP_GREETING, id_line), (b"mr1 OK\r\n", b"a1 AUTHENTICATE PLAIN " + PLAIN + b"\r\n"), (b"a1 OK\r\n", b"")]
    finished(login.login(route(forward_client=True)), b"", exchanges)


def test_imap_a_refused_informational_id_still_logs_in() -> None:
    login = imap(client_id=[("name", "Mail")])
    exchanges = [
        (IMAP_GREETING, b'mr1 ID ("name" "Mail")\r\n'),
        (b"mr1 BAD no\r\n", b"a1 AUTHENTICATE PLAIN " + PLAIN + b"\r\n"),
        (b"a1 OK\r\n", b""),
    ]
    finished(login.login(route()), b"", exchanges)


def test_imap_untagged_literals_are_read_by_count() -> None:
    """An untagged `* ID` whose value is a literal holding a CRLF and a fake tagged OK."""
    login = imap(client_id=[("name", "Mail")])
    conversation = talk(login.login(route()), b"", [(IMAP_GREETING, b'mr1 ID ("name" "Mail")\r\n')])
    literal = b"x\r\nmr1 OK\r\n"
    written = conversation.receive(b'* ID ("name" {%d}\r\n' % len(literal) + literal + b")\r\n")
    assert written == b""  # the literal's "mr1 OK" was not taken for the answer
    assert conversation.receive(b"mr1 OK\r\n") == b"a1 AUTHENTICATE PLAIN " + PLAIN + b"\r\n"


def test_imap_a_token_refused_after_its_error_challenge() -> None:
    login = imap(auth_method="oauthbearer")
    conversation = Conversation(login.login(route()))
    conversation.start()
    written = conversation.receive(b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=OAUTHBEARER] hi\r\n")
    assert written.startswith(b"a1 AUTHENTICATE OAUTHBEARER ") and written.endswith(b"\r\n")
    assert conversation.receive(b"+ eyJzdGF0dXMiOiJpbnZhbGlkX3Rva2VuIn0=\r\n") == b"AQ==\r\n"
    with pytest.raises(Reject) as raised:
        conversation.receive(b"a1 NO [AUTHENTICATIONFAILED] Invalid token\r\n")
    assert (raised.value.code, raised.value.message) == ("AUTHENTICATIONFAILED", "Invalid token")


@pytest.mark.parametrize(
    "answer, code, counts",
    [
        (b"a1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n", "AUTHENTICATIONFAILED", True),
        (b"a1 NO Authentication failed.\r\n", "AUTHENTICATIONFAILED", True),
        (b"a1 NO [INUSE] Mailbox is locked\r\n", "INUSE", False),
    ],
)
def test_imap_refusals_are_rejects_with_their_code(answer: bytes, code: str, counts: bool) -> None:
    rejected = fails(imap().login(route()), [IMAP_GREETING, answer], Reject)
    assert (rejected.code, rejected.counts) == (code, counts)


@pytest.mark.parametrize(
    "said, message",
    [
        ([b"* BYE go away\r\n"], "upstream greeted with BYE go away"),
        ([b"SSH-2.0-OpenSSH\r\n"], "upstream greeted with b'SSH-2.0-OpenSSH\\r\\n'"),
        ([b"* OK " + b"x" * MAX_RESPONSE_LINE], f"upstream sent a line longer than {MAX_RESPONSE_LINE} bytes"),
        ([b"* OK hi\r\n", b"mr1 NO not now\r\n"], "upstream answered CAPABILITY with NO not now"),
        ([b"* OK hi\r\n", b"mr9 OK\r\n"], "upstream sent b'mr9 OK\\r\\n' where the answer to its command was due"),
        ([b"* OK hi\r\n", b"* FLAGS ()\r\n" * 100], "upstream sent more than 100 lines before its answer"),
        ([b"* OK hi\r\n", b"* X {99999}\r\n"], "upstream sent a response of more than"),
        ([IMAP_GREETING, b"a1 NO [UNAVAILABLE] try later\r\n"], "upstream answered the plain login with NO try later"),
        ([IMAP_GREETING, b"a1 BAD what\r\n"], "upstream answered the plain login with BAD what"),
        ([b"* OK [CAPABILITY IMAP4rev1 LOGINDISABLED] hi\r\n"], "upstream refuses LOGIN (LOGINDISABLED)"),
    ],
)
def test_imap_an_unusable_upstream_is_named(said: list[bytes], message: str) -> None:
    assert message in str(fails(imap().login(route()), said))


def test_imap_a_literal_refused_names_the_command_never_the_password() -> None:
    login = IMAPLogin(CONNECTION, request("imap", "login", password="pässwort"), tag=b"a1")
    error = fails(login.login(route()), [b"* OK [CAPABILITY IMAP4rev1] hi\r\n", b"a1 NO too long\r\n"])
    assert str(error) == "upstream answered LOGIN with NO too long"
    assert "pässwort" not in str(error)
    error = fails(imap().login(route()), [b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] hi\r\n", b"* OK what\r\n"])
    assert str(error) == "upstream sent b'* OK what\\r\\n' where a continuation was due"


def test_imap_routes_it_cannot_use_fail_before_a_byte_is_read() -> None:
    error = fails(imap().login(route(login="xclient")), [])
    assert 'login = "xclient" is SMTP\'s' in str(error)
    assert "ID" in str(fails(imap().login(route(forward_client=True)), [b"* OK [CAPABILITY IMAP4rev1] hi\r\n"]))
    assert str(fails(imap().starttls(route()), [b"* OK [CAPABILITY IMAP4rev1] hi\r\n"])) == "upstream does not offer STARTTLS"


def test_imap_stages() -> None:
    said = [b"* OK hi\r\n", b"mr1 OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] x\r\n"]
    assert stages(imap().login(route()), said) == ["greeting", "answer to CAPABILITY", "login reply"]


# -- POP3 ---------------------------------------------------------------------------------------


def pop3(auth_method: Any = "plain") -> POP3Login:
    return POP3Login(CONNECTION, request("pop3", auth_method))


POP3_GREETING = b"+OK Dovecot ready.\r\n"
CAPA = b"+OK\r\nUSER\r\nSASL PLAIN XOAUTH2\r\nSTLS\r\n.\r\n"


@pytest.mark.parametrize("bytewise", [False, True])
def test_pop3_auth_plain_and_the_upstreams_ok_for_the_client(bytewise: bool) -> None:
    login = pop3()
    exchanges = [(POP3_GREETING, b"CAPA\r\n"), (CAPA, b"AUTH PLAIN " + PLAIN + b"\r\n"), (b"+OK Logged in.\r\n", b"")]
    assert finished(login.login(route()), b"", exchanges, bytewise) == b"+OK Logged in.\r\n"
    assert login.client_reply == b"+OK Logged in.\r\n"


@pytest.mark.parametrize("bytewise", [False, True])
def test_pop3_stls_capa_again_then_user_and_pass(bytewise: bool) -> None:
    login = pop3()
    finished(
        login.starttls(route(tls="starttls")),
        b"",
        [(POP3_GREETING, b"CAPA\r\n"), (CAPA, b"STLS\r\n"), (b"+OK Begin TLS\r\n", b"")],
        bytewise,
    )
    after = [
        (b"+OK\r\nUSER\r\n.\r\n", b"USER alice@example.org\r\n"),
        (b"+OK\r\n", b"PASS s3cret-pw\r\n"),
        (b"+OK Logged in.\r\n", b""),
    ]
    assert finished(login.login(route(tls="starttls")), b"CAPA\r\n", after, bytewise) == b"+OK Logged in.\r\n"


def test_pop3_without_capa_logs_in_with_user_and_pass() -> None:
    exchanges = [
        (POP3_GREETING, b"CAPA\r\n"),
        (b"-ERR no CAPA\r\n", b"USER alice@example.org\r\n"),
        (b"+OK\r\n", b"PASS s3cret-pw\r\n"),
    ]
    talk(pop3().login(route()), b"", exchanges)


def test_pop3_xclient_when_forwarding_the_client() -> None:
    exchanges = [
        (b"+OK [XCLIENT] Dovecot ready.\r\n", b"CAPA\r\n"),
        (CAPA, b"XCLIENT ADDR=192.0.2.7 PORT=50123 SESSION=s1\r\n"),
        (b"+OK\r\n", b"AUTH PLAIN " + PLAIN + b"\r\n"),
        (b"+OK hi\r\n", b""),
    ]
    finished(pop3().login(route(forward_client=True)), b"", exchanges)
    error = fails(pop3().login(route(forward_client=True)), [POP3_GREETING, CAPA])
    assert str(error) == "upstream does not offer XCLIENT, so it cannot learn the client's address"


def test_pop3_a_token_refused_after_its_error_challenge() -> None:
    conversation = Conversation(pop3("xoauth2").login(route()))
    conversation.start()
    conversation.receive(POP3_GREETING)
    assert conversation.receive(CAPA).startswith(b"AUTH XOAUTH2 ")
    assert conversation.receive(b"+ eyJzdGF0dXMiOiI0MDEifQ==\r\n") == b"\r\n"
    with pytest.raises(Reject) as raised:
        conversation.receive(b"-ERR [AUTH] Invalid token\r\n")
    assert (raised.value.code, raised.value.message) == ("AUTH", "Invalid token")


@pytest.mark.parametrize(
    "answer, code, counts",
    [
        (b"-ERR [AUTH] Authentication failed.\r\n", "AUTH", True),
        (b"-ERR Authentication failed.\r\n", "AUTH", True),
        (b"-ERR [IN-USE] Mailbox locked\r\n", "IN-USE", False),
    ],
)
def test_pop3_refusals_are_rejects_with_their_code(answer: bytes, code: str, counts: bool) -> None:
    rejected = fails(pop3().login(route()), [POP3_GREETING, CAPA, answer], Reject)
    assert (rejected.code, rejected.counts) == (code, counts)


@pytest.mark.parametrize(
    "said, message",
    [
        ([b"-ERR go away\r\n"], "upstream greeted with b'-ERR go away\\r\\n'"),
        ([b"+OK " + b"x" * MAX_RESPONSE_LINE], "upstream sent a line longer than"),
        ([POP3_GREETING, b"* OK IMAP here\r\n"], "upstream answered CAPA with b'* OK IMAP here\\r\\n'"),
        ([POP3_GREETING, b"+OK\r\n" + b"X\r\n" * 100], "upstream's CAPA list runs over 100 lines"),
        (
            [POP3_GREETING, b"+OK\r\nUSER\r\n.\r\n", b"+OK\r\n", b"-ERR [SYS/TEMP] later\r\n"],
            "upstream answered the login login with b'-ERR [SYS/TEMP] later",  # USER and PASS: the "login" mechanism
        ),
    ],
)
def test_pop3_an_unusable_upstream_is_named(said: list[bytes], message: str) -> None:
    assert message in str(fails(pop3().login(route()), said))


def test_pop3_a_token_mechanism_not_offered() -> None:
    error = fails(pop3("xoauth2").login(route()), [POP3_GREETING, b"+OK\r\nSASL PLAIN\r\n.\r\n"])
    assert str(error) == "upstream does not offer AUTH XOAUTH2"


def test_pop3_stls_refused_or_not_offered() -> None:
    assert str(fails(pop3().starttls(route(tls="starttls")), [POP3_GREETING, b"+OK\r\n.\r\n"])) == "upstream does not offer STLS"
    error = fails(pop3().starttls(route(tls="starttls")), [POP3_GREETING, CAPA, b"-ERR no\r\n"])
    assert str(error) == "upstream answered STLS with b'-ERR no\\r\\n'"


def test_pop3_bytes_after_the_login_are_left_for_the_client() -> None:
    conversation = talk(pop3().login(route()), b"", [(POP3_GREETING, b"CAPA\r\n"), (CAPA, b"AUTH PLAIN " + PLAIN + b"\r\n")])
    assert conversation.receive(b"+OK in\r\n+OK 1 2\r\n") == b""
    assert conversation.finished and conversation.leftover() == b"+OK 1 2\r\n"


def test_pop3_stages() -> None:
    said = [POP3_GREETING, CAPA]
    assert stages(pop3().login(route()), said) == ["greeting", "answer to CAPA", "login reply"]


# -- the Twisted adapter ---------------------------------------------------------------------------


def connected() -> tuple[UpstreamProtocol, StringTransport]:
    upstream = UpstreamProtocol()
    transport = StringTransport()
    upstream.makeConnection(transport)
    return upstream, transport


def outcome(running: Deferred[Any]) -> Any:
    """What `running` fired with (a Failure for an error); it must have fired."""
    fired: list[Any] = []
    running.addBoth(fired.append)
    assert fired, "still running"
    return fired[0]


def test_run_dialogue_writes_each_answer_once_and_names_the_stage() -> None:
    upstream, transport = connected()
    running = ensureDeferred(run_dialogue(pop3().login(route()), upstream))
    assert upstream.stage == "greeting"
    upstream.dataReceived(POP3_GREETING)
    assert (transport.value(), upstream.stage) == (b"CAPA\r\n", "answer to CAPA")
    upstream.dataReceived(CAPA[:9])
    upstream.dataReceived(CAPA[9:])
    assert transport.value() == b"CAPA\r\nAUTH PLAIN " + PLAIN + b"\r\n"
    assert upstream.stage == "login reply"
    upstream.dataReceived(b"+OK in\r\n+OK pipelined\r\n")
    assert transport.value() == b"CAPA\r\nAUTH PLAIN " + PLAIN + b"\r\n"
    assert outcome(running) == b"+OK in\r\n"


def test_run_dialogue_puts_what_came_after_the_dialogue_first_in_pending() -> None:
    upstream, _ = connected()
    upstream.dataReceived(POP3_GREETING + CAPA + b"+OK in\r\n+OK pipelined\r\n")
    assert outcome(ensureDeferred(run_dialogue(pop3().login(route()), upstream))) == b"+OK in\r\n"
    assert bytes(upstream.pending) == b"+OK pipelined\r\n"


def test_run_dialogue_fails_when_the_upstream_closes_first() -> None:
    upstream, _ = connected()
    running = ensureDeferred(run_dialogue(pop3().login(route()), upstream))
    upstream.dataReceived(b"+OK hi")
    upstream.readConnectionLost()
    assert outcome(running).check(PeerClosed)


def running_step(step: LoginStep, upstream: UpstreamProtocol, route: Route) -> Deferred[None]:
    async def run() -> None:
        await step(upstream, route)

    return ensureDeferred(run())


def test_login_steps_greet_each_connection_once() -> None:
    login = smtp()
    log_in, starttls = login_steps(login)
    first, transport = connected()
    first.dataReceived(GREETING + EHLO_REPLY + b"220 go\r\n")
    assert outcome(running_step(starttls, first, route(tls="starttls"))) is None
    assert transport.value() == b"EHLO client.example\r\nSTARTTLS\r\n"
    # The same connection after TLS: EHLO again, no greeting awaited.
    first.dataReceived(b"250-mx\r\n250 AUTH PLAIN\r\n235 ok\r\n")
    assert outcome(running_step(log_in, first, route(tls="starttls"))) is None
    assert transport.value().startswith(b"EHLO client.example\r\nSTARTTLS\r\nEHLO client.example\r\nAUTH PLAIN ")
    # The next route: a new connection, greeted again.
    second, transport = connected()
    logging_in = running_step(log_in, second, route())
    assert (transport.value(), second.stage) == (b"", "greeting")
    second.dataReceived(GREETING)
    assert transport.value() == b"EHLO client.example\r\n"
    logging_in.cancel()
    assert outcome(logging_in).check(CancelledError)
