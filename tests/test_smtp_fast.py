"""
The cheap common MX session (issue 17): an upstream that offers PIPELINING hears the
replayed MAIL and RCPT in one write, and the relay passes a one-line reply on as it came
(`smtp_stream.single_reply`) where it used to rebuild it. Neither may change what either
side hears: the pipelined replay still refuses on the MAIL's reply and leaves the RCPT's
for the client, and a relayed reply is byte for byte what `reply_line` would rebuild.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailrelay.core import smtp_stream as stream
from mailrelay.core.dialogue import Conversation
from mailrelay.core.facts import ConnectionFacts
from mailrelay.core.smtp_login import SMTPLogin
from mailrelay.router import Reject, Route, RouteRequest

CONNECTION = ConnectionFacts(client=("192.0.2.7", 50123), local=("192.0.2.1", 25), listener="mx", session_id="s1")
GREETING = b"220 mx.test ESMTP\r\n"
MAIL, RCPT = b"MAIL FROM:<s@example.net> SIZE=10", b"RCPT TO:<bob@example.org>"


def login(route: Route) -> Conversation[Any]:
    """An auth "none" login of the envelope on `route`, started."""
    request = RouteRequest(listener="mx", protocol="smtp", mode="starttls", client=CONNECTION.client, local=CONNECTION.local)
    smtp = SMTPLogin(CONNECTION, request, hostname=b"relay.test", helo=b"client.example", esmtp=True, envelope=(MAIL, RCPT))
    conversation = Conversation(smtp.login(route))
    assert conversation.start() == b""
    return conversation


def replay() -> Conversation[Any]:
    """An auth "none" login with `login = "none"`, up to the upstream's EHLO reply."""
    conversation = login(Route(host="mx.test", port=25, login="none"))
    assert conversation.receive(GREETING) == b"EHLO client.example\r\n"
    return conversation


PIPELINING = b"250-mx.test\r\n250-8BITMIME\r\n250 PIPELINING\r\n"


def test_a_pipelining_upstream_hears_mail_and_rcpt_in_one_write() -> None:
    conversation = replay()
    assert conversation.receive(PIPELINING) == MAIL + b"\r\n" + RCPT + b"\r\n"
    assert not conversation.finished and conversation.stage == "answer to MAIL FROM"
    # Both replies in one packet: the RCPT's is left for the client, as without pipelining.
    assert conversation.receive(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n") == b""
    assert conversation.finished
    assert conversation.leftover() == b"250 2.1.5 ok\r\n"


def test_without_pipelining_the_rcpt_waits_for_the_mails_reply() -> None:
    conversation = replay()
    assert conversation.receive(b"250 mx.test\r\n") == MAIL + b"\r\n"
    assert conversation.receive(b"250 2.1.0 ok\r\n") == RCPT + b"\r\n"
    assert conversation.finished and conversation.leftover() == b""


@pytest.mark.parametrize("together", [True, False])
def test_a_refused_sender_refuses_the_login_and_the_rcpts_reply_is_never_the_clients(together: bool) -> None:
    conversation = replay()
    conversation.receive(PIPELINING)
    said = b"550 5.7.1 go away\r\n" + (b"503 5.5.1 need MAIL\r\n" if together else b"")
    with pytest.raises(Reject) as raised:
        conversation.receive(said)
    # The client hears the MAIL's refusal as its RCPT's; the upstream connection is dropped
    # with whatever it said to the RCPT.
    assert (raised.value.code, raised.value.message) == (550, "5.7.1 go away")


def test_after_xclient_the_ehlo_that_follows_it_decides() -> None:
    conversation = login(Route(host="mx.test", port=25, login="xclient"))
    assert conversation.receive(GREETING) == b"EHLO relay.test\r\n"
    xclient = conversation.receive(b"250-mx.test\r\n250-PIPELINING\r\n250 XCLIENT ADDR HELO\r\n")
    assert xclient.startswith(b"XCLIENT ADDR=192.0.2.7 HELO=client.example")
    assert conversation.receive(b"220 mx.test ESMTP\r\n") == b"EHLO client.example\r\n"
    # The upstream no longer offers PIPELINING to this client: one command at a time.
    assert conversation.receive(b"250 mx.test\r\n") == MAIL + b"\r\n"


reply_lines = st.builds(
    lambda code, separator, text, ending: code + separator + text + ending,
    st.sampled_from([b"250", b"354", b"421", b"550", b"199", b"25", b"600", b"2500"]),
    st.sampled_from([b" ", b"-", b"", b"x"]),
    st.binary(max_size=20).map(lambda text: text.replace(b"\n", b"")),
    st.sampled_from([b"\r\n", b"\n", b"\r\r\n"]),
)


@given(reply_lines)
def test_a_one_line_reply_goes_on_as_reply_line_would_rebuild_it(raw: bytes) -> None:
    try:
        line = stream.reply_line(raw)
    except stream.MalformedReply:
        with pytest.raises(stream.MalformedReply):
            stream.single_reply(raw)
        return
    if line.last:
        assert stream.single_reply(raw) == (line.code, b"%d %s\r\n" % (line.code, line.text))
    else:
        assert stream.single_reply(raw) is None


def test_a_well_formed_one_line_reply_is_passed_on_unchanged() -> None:
    raw = b"250 2.0.0 Ok: queued as 4XyZ\r\n"
    single = stream.single_reply(raw)
    assert single is not None and single[1] is raw
