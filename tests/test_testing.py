"""
`mailrelay.testing`, the kit users test their Routers and listener configurations with:
requests with defaults, asking a Router as a listener does, a recording Router, and
whole sessions in memory against scripted upstreams (no socket, no reactor, no sleep).
"""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock, deferLater

from mailrelay import IRouter, Reject, Route, Router, RouteRequest, RouterError
from mailrelay.testing import (
    Hangup,
    Pause,
    RecordingRouter,
    ScriptedUpstream,
    Transcript,
    converse,
    resolve,
    route_request,
)

ROOT = Path(__file__).resolve().parent.parent
UPSTREAM = Route(host="10.0.0.5", port=25)
PLAIN = base64.b64encode(b"\0alice@example.org\0s3cret").decode()  # AGFsaWNl...

SUBMISSION = """
name = "submission"
listen = "tcp:587"
mode = "starttls"
protocol = "smtp"
starttls = "optional"
hostname = "relay.example.org"
"""
IMAP = {
    "name": "imap",
    "listen": "tcp:143",
    "mode": "starttls",
    "protocol": "imap",
    "starttls": "optional",
    "hostname": "relay.example.org",
}
POP3 = {**IMAP, "name": "pop3", "listen": "tcp:110", "protocol": "pop3"}


def postfix() -> ScriptedUpstream:
    """An upstream that speaks submission as Postfix would, and takes any message."""
    return ScriptedUpstream(
        "220 mx.example.org ESMTP Postfix",
        {
            "EHLO": "250-mx.example.org\n250-AUTH PLAIN LOGIN\n250 8BITMIME",
            "AUTH PLAIN": "235 2.7.0 Authentication successful",
            "MAIL FROM": "250 2.1.0 Ok",
            "RCPT TO": "250 2.1.5 Ok",
            "DATA": "354 End data with <CR><LF>.<CR><LF>",
            ".\r\n": "250 2.0.0 Ok: queued as 4XyZ",  # the line ending too: not a dot-stuffed line
            "QUIT": Hangup("221 2.0.0 Bye"),
        },
        default=None,  # the lines of a message get no answer
    )


# -- route_request -------------------------------------------------------------------------


def test_route_request_has_the_defaults_a_listener_would_give() -> None:
    request = route_request()
    assert (request.listener, request.protocol, request.mode) == ("test", "imap", "starttls")
    assert (request.client, request.local) == (("192.0.2.10", 50000), ("192.0.2.1", 143))
    assert (request.user, request.password, request.auth_method, request.tls, request.attempt) == (None, None, "none", False, 1)


def test_route_request_fields_replace_the_defaults_and_follow_each_other() -> None:
    request = route_request(protocol="smtp", user="alice@example.org", password="pw", helo="laptop")
    assert request.local == ("192.0.2.1", 587)  # submission's port
    assert request.auth_method == "plain"  # a password login, as a front-end reports one
    assert (request.user, request.password, request.helo) == ("alice@example.org", "pw", "laptop")
    assert route_request(mode="tls", protocol="pop3").tls is True
    assert route_request(mode="tls", protocol="pop3").local == ("192.0.2.1", 995)
    assert route_request(password="digest", auth_method="cram-md5", salt="<1.2@x>").auth_method == "cram-md5"
    assert route_request(local=("198.51.100.1", 1143), tls=False, mode="tls").local == ("198.51.100.1", 1143)


def test_a_misspelt_field_is_a_type_error_naming_the_right_one() -> None:
    with pytest.raises(TypeError, match="'usr', which is not a RouteRequest field; did you mean 'user'"):
        route_request(usr="alice")
    with pytest.raises(TypeError, match="not a RouteRequest field; RouteRequest's fields are listener, protocol"):
        route_request(zzzzzz=1)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"protocol": "IMAP"}, "protocol must be one of 'smtp', 'imap', 'pop3', 'none', not 'IMAP'"),
        ({"mode": "plain"}, "mode must be one of 'splice', 'tls', 'starttls', not 'plain'"),
        ({"auth_method": "PLAIN"}, "auth_method must be one of 'plain', 'login'"),
    ],
)
def test_values_no_listener_sends_are_refused(fields: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        route_request(**fields)


# -- resolve -------------------------------------------------------------------------------


class FunctionRouter(Router):
    def __init__(self, answer: Any) -> None:
        self.answer = answer

    def route(self, request: RouteRequest) -> Any:
        return self.answer(request)


def test_resolve_returns_the_routes_of_every_answering_style() -> None:
    async def coroutine(request: RouteRequest) -> Route:
        return UPSTREAM

    assert resolve(FunctionRouter(lambda r: UPSTREAM)) == [UPSTREAM]
    assert resolve(FunctionRouter(lambda r: (UPSTREAM, Route(host="10.0.0.6", port=25)))) == [
        UPSTREAM,
        Route(host="10.0.0.6", port=25),
    ]
    assert resolve(FunctionRouter(lambda r: succeed(UPSTREAM))) == [UPSTREAM]
    assert resolve(FunctionRouter(coroutine)) == [UPSTREAM]


def test_resolve_takes_plain_objects_with_a_route_method() -> None:
    class Duck:
        def route(self, request: RouteRequest) -> Route:
            return Route(host=request.user or "nobody", port=143)

    assert not IRouter.providedBy(Duck())
    assert resolve(Duck(), user="imap.example.org") == [Route(host="imap.example.org", port=143)]


def test_resolve_builds_the_request_or_changes_the_one_given() -> None:
    router = RecordingRouter(UPSTREAM)
    resolve(router, user="alice")
    base = route_request(protocol="pop3", user="bob")
    resolve(router, base)
    resolve(router, base, attempt=2)
    assert router.requests == [route_request(user="alice"), base, route_request(protocol="pop3", user="bob", attempt=2)]
    with pytest.raises(TypeError, match="did you mean 'attempt'"):
        resolve(router, base, attempts=2)


def test_a_refusal_is_raised_with_its_wait_and_code() -> None:
    router = FunctionRouter(lambda r: Deferred.fromCoroutine(refuse()))

    async def refuse() -> Route:
        raise Reject("unknown user", wait=2, code=550, close=True)

    with pytest.raises(Reject) as caught:
        resolve(router, user="mallory")
    assert (caught.value.message, caught.value.wait, caught.value.code, caught.value.close) == ("unknown user", 2.0, 550, True)


def test_a_router_that_raises_is_a_router_error_keeping_the_cause() -> None:
    with pytest.raises(RouterError, match="router raised ZeroDivisionError") as caught:
        resolve(FunctionRouter(lambda r: 1 / 0))
    assert isinstance(caught.value.__cause__, ZeroDivisionError)
    with pytest.raises(RouterError, match="expected a Route or a non-empty list of Routes"):
        resolve(FunctionRouter(lambda r: "10.0.0.5:25"))


def test_a_router_slower_than_router_timeout_is_a_router_error_on_the_clock() -> None:
    clock = Clock()
    never: Deferred[Route] = Deferred()
    with pytest.raises(RouterError, match="router did not answer within 5s"):
        resolve(FunctionRouter(lambda r: never), clock=clock, router_timeout=5)
    assert clock.seconds() == 5  # the clock moved; no one slept


def test_a_router_that_waits_on_the_clock_gets_its_answer_in_time() -> None:
    clock = Clock()

    async def slow(request: RouteRequest) -> Route:
        await deferLater(clock, 4)
        return UPSTREAM

    assert resolve(FunctionRouter(slow), clock=clock, router_timeout=5) == [UPSTREAM]
    assert clock.seconds() == 4


def test_an_unchecked_password_login_is_refused_as_the_proxy_refuses_it() -> None:
    xclient = Route(host="10.0.0.5", port=25, login="xclient")
    with pytest.raises(RouterError, match="does not declare verifies_passwords"):
        resolve(RecordingRouter(xclient), protocol="smtp", user="alice", password="pw")
    assert resolve(RecordingRouter(xclient, verifies_passwords=True), protocol="smtp", user="alice", password="pw") == [xclient]
    assert resolve(RecordingRouter(xclient), protocol="smtp", auth_method="none", rcpt_to="RCPT TO:<bob@x>") == [xclient]


# -- RecordingRouter -------------------------------------------------------------------------


def test_the_recording_router_records_and_answers_as_told() -> None:
    fixed = RecordingRouter([UPSTREAM])
    assert IRouter.providedBy(fixed) and fixed.verifies_passwords is False
    assert resolve(fixed, user="a") == [UPSTREAM] and resolve(fixed, user="b") == [UPSTREAM]
    assert [r.user for r in fixed.requests] == ["a", "b"]

    by_user = RecordingRouter(lambda r: Route(host=f"{r.user}.backend", port=143) if r.user else Reject("who?"))
    assert resolve(by_user, user="alice") == [Route(host="alice.backend", port=143)]
    with pytest.raises(Reject, match="who"):
        resolve(by_user)

    for error in (Reject("no", wait=1), RouterError("auth service down")):
        with pytest.raises(type(error)):
            resolve(RecordingRouter(error))


# -- the Python router of docs/routers.md -------------------------------------------------

ROUTERS_DOC = "docs/routers.md"


def doc_block(heading: str) -> str:
    """The first ```python block under `heading` in docs/routers.md."""
    page = (ROOT / ROUTERS_DOC).read_text()
    section = page.split(f"\n{heading}\n", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match is not None, f"no python block under {heading}"
    return match.group(1)


def documented_router() -> Any:
    """The example Router class of docs/routers.md, run as the page shows it (without the
    line that builds a service from a file)."""
    code = "".join(line for line in doc_block("## Routing in Python").splitlines(True) if not line.startswith("service ="))
    namespace: dict[str, Any] = {}
    exec(compile(code, ROUTERS_DOC, "exec"), namespace)
    return namespace["MyRouter"]


def test_the_documented_router_sends_internal_clients_to_two_upstreams_in_order() -> None:
    routes = resolve(documented_router()(), client=("10.1.2.3", 50000))
    assert routes == [Route(host="10.0.0.5", port=25), Route(host="10.0.0.6", port=25)]


def test_the_documented_router_refuses_everyone_else_after_two_seconds() -> None:
    with pytest.raises(Reject) as caught:
        resolve(documented_router()(), client=("192.0.2.99", 50000))
    assert (caught.value.message, caught.value.wait) == ("not from here", 2.0)


def test_the_testing_section_of_docs_routers_md_runs_as_written() -> None:
    # The block imports the class from the user's package; here it is the page's own.
    block = doc_block("## Testing your Router")
    code = "".join(line for line in block.splitlines(True) if "import MyRouter" not in line)
    namespace: dict[str, Any] = {"MyRouter": documented_router()}
    exec(compile(code, ROUTERS_DOC, "exec"), namespace)
    tests = [value for name, value in namespace.items() if name.startswith("test_")]
    assert len(tests) == 3
    for test in tests:
        test()


# -- converse: the three protocols -----------------------------------------------------------


def test_an_smtp_auth_plain_session_reaches_the_upstream_byte_for_byte() -> None:
    router = RecordingRouter(UPSTREAM)
    clock = Clock()
    upstream = postfix()
    transcript = converse(
        SUBMISSION,
        router,
        [
            "EHLO laptop.example.org",
            f"AUTH PLAIN {PLAIN}",
            "MAIL FROM:<alice@example.org>",
            "RCPT TO:<bob@example.net>",
            "DATA",
            "Subject: hi",
            "",
            "Hello Bob.",
            ".",
            "QUIT",
        ],
        upstream=upstream,
        clock=clock,
    )
    assert transcript.upstream == (
        b"EHLO laptop.example.org\r\n"
        b"AUTH PLAIN " + PLAIN.encode() + b"\r\n"
        b"MAIL FROM:<alice@example.org>\r\n"
        b"RCPT TO:<bob@example.net>\r\n"
        b"DATA\r\n"
        b"Subject: hi\r\n\r\nHello Bob.\r\n.\r\n"
        b"QUIT\r\n"
    )
    assert transcript.lines() == [
        "220 relay.example.org ESMTP ready",
        "250-relay.example.org",
        "250-PIPELINING",
        "250-8BITMIME",
        "250-ENHANCEDSTATUSCODES",
        "250-AUTH PLAIN LOGIN",
        "250 STARTTLS",
        "235 2.7.0 Authentication successful",
        "250 2.1.0 Ok",
        "250 2.1.5 Ok",
        "354 End data with <CR><LF>.<CR><LF>",
        "250 2.0.0 Ok: queued as 4XyZ",
        "221 2.0.0 Bye",
    ]
    assert transcript.outcome == "closed" and transcript.ended_by == "mailrelay"
    [request] = router.requests
    assert (request.listener, request.protocol, request.user, request.password, request.auth_method, request.helo) == (
        "submission",
        "smtp",
        "alice@example.org",
        "s3cret",
        "plain",
        "laptop.example.org",
    )
    assert (request.client, request.local) == (("192.0.2.10", 50000), ("192.0.2.1", 587))
    assert clock.seconds() == 0  # body lines get no answer, and cost no time
    assert upstream.heard == transcript.upstream and transcript.upstream_connections == (transcript.upstream,)


def test_an_imap_login_is_made_upstream_under_the_client_s_tag() -> None:
    router = RecordingRouter(Route(host="10.0.0.7", port=143))
    dovecot = ScriptedUpstream(
        "* OK [CAPABILITY IMAP4rev1 LITERAL+] Dovecot ready.",
        [
            ('a1 LOGIN "alice@example.org" "s3cret"', "a1 OK [CAPABILITY IMAP4rev1 IDLE MOVE] Logged in"),
            ("a2 SELECT INBOX", "* 3 EXISTS\na2 OK [READ-WRITE] Select completed."),
            ("a3 LOGOUT", Hangup("* BYE Logging out\na3 OK Logout completed.")),
        ],
    )
    transcript = converse(IMAP, router, ["a1 LOGIN alice@example.org s3cret", "a2 SELECT INBOX", "a3 LOGOUT"], upstream=dovecot)
    assert transcript.upstream == b'a1 LOGIN "alice@example.org" "s3cret"\r\na2 SELECT INBOX\r\na3 LOGOUT\r\n'
    assert transcript.lines() == [
        "* OK [CAPABILITY IMAP4rev1 LITERAL+ SASL-IR ID AUTH=PLAIN AUTH=LOGIN STARTTLS] relay.example.org IMAP4rev1 ready",
        "a1 OK [CAPABILITY IMAP4rev1 IDLE MOVE] Logged in",
        "* 3 EXISTS",
        "a2 OK [READ-WRITE] Select completed.",
        "* BYE Logging out",
        "a3 OK Logout completed.",
    ]
    assert transcript.outcome == "closed"
    assert (router.requests[0].user, router.requests[0].auth_method) == ("alice@example.org", "plain")


def test_a_pop3_user_and_pass_login_is_made_upstream() -> None:
    router = RecordingRouter(Route(host="10.0.0.7", port=110))
    dovecot = ScriptedUpstream(
        "+OK Dovecot ready.",
        {
            "CAPA": "+OK\nUSER\nUIDL\n.",
            "USER alice": "+OK",
            "PASS s3cret": "+OK Logged in.",
            "STAT": "+OK 2 320",
            "QUIT": Hangup("+OK Logging out."),
        },
    )
    transcript = converse(POP3, router, ["USER alice", "PASS s3cret", "STAT", "QUIT"], upstream=dovecot)
    assert transcript.upstream == b"CAPA\r\nUSER alice\r\nPASS s3cret\r\nSTAT\r\nQUIT\r\n"
    assert transcript.lines() == ["+OK relay.example.org POP3 ready", "+OK", "+OK Logged in.", "+OK 2 320", "+OK Logging out."]
    assert transcript.outcome == "closed"


def test_a_route_with_proxy_protocol_tells_the_scripted_upstream_the_client_first() -> None:
    router = RecordingRouter(Route(host="10.0.0.7", port=110, proxy_protocol=2))
    dovecot = ScriptedUpstream(
        "+OK Dovecot ready.",
        {"CAPA": "+OK\nUSER\n.", "USER alice": "+OK", "PASS s3cret": "+OK Logged in.", "QUIT": Hangup("+OK Bye.")},
    )
    transcript = converse(POP3, router, ["USER alice", "PASS s3cret", "QUIT"], upstream=dovecot, client=("198.51.100.9", 50123))
    header = dovecot.proxy_headers[0]
    assert header is not None
    assert (header.version, header.command, header.source) == (2, "PROXY", ("198.51.100.9", 50123))
    assert transcript.upstream.endswith(b"CAPA\r\nUSER alice\r\nPASS s3cret\r\nQUIT\r\n")
    assert transcript.lines()[-2:] == ["+OK Logged in.", "+OK Bye."]
    assert dovecot.unexpected == []


# -- converse: what goes wrong ------------------------------------------------------------------


def test_a_refused_login_gets_the_protocol_s_refusal_after_the_wait() -> None:
    clock = Clock()
    upstream = postfix()
    router = RecordingRouter(Reject("unknown user", wait=3))
    transcript = converse(SUBMISSION, router, ["EHLO laptop", f"AUTH PLAIN {PLAIN}", "QUIT"], upstream=upstream, clock=clock)
    assert transcript.lines()[-2:] == ["535 5.7.8 unknown user", "221 2.0.0 Bye"]
    assert clock.seconds() == 3  # the client waited for the refusal
    assert transcript.upstream == b""  # never connected
    assert "login refused for alice@example.org from 192.0.2.10: unknown user (attempt 1 of 3)" in " ".join(transcript.messages())


def test_the_last_allowed_refusal_closes_and_later_lines_are_not_sent() -> None:
    listener = SUBMISSION + "max_attempts = 2\n"
    router = RecordingRouter(Reject("no"))
    transcript = converse(listener, router, ["EHLO laptop", f"AUTH PLAIN {PLAIN}", f"AUTH PLAIN {PLAIN}", "NOOP"])
    assert transcript.lines()[-3:] == [
        "535 5.7.8 no",
        "535 5.7.8 no",
        "421 4.7.0 relay.example.org Error: too many failed logins, closing connection",
    ]
    assert transcript.outcome == "rejected" and transcript.ended_by == "mailrelay"
    assert transcript.unsent == (b"NOOP\r\n",)
    assert [r.attempt for r in router.requests] == [1, 2]


def test_a_router_that_raises_is_a_temporary_failure() -> None:
    transcript = converse(IMAP, RecordingRouter(lambda r: 1 / 0), ["a1 LOGIN alice s3cret", "a2 LOGOUT"])
    assert transcript.lines()[1] == "a1 NO [UNAVAILABLE] Temporary failure, try again later"
    assert transcript.outcome == "router-error" and transcript.reason == "router raised ZeroDivisionError('division by zero')"
    assert any("router failed" in message for message in transcript.messages())


def test_a_router_slower_than_router_timeout_is_a_temporary_failure_on_the_clock() -> None:
    clock = Clock()
    never: Deferred[Route] = Deferred()
    listener = SUBMISSION + "router_timeout = 7\n"
    transcript = converse(listener, RecordingRouter(lambda r: never), ["EHLO laptop", f"AUTH PLAIN {PLAIN}"], clock=clock)
    assert transcript.lines()[-1] == "451 4.3.0 Temporary failure, try again later"
    assert clock.seconds() == 7
    assert transcript.outcome == "router-error" and transcript.reason == "router did not answer within 7s"


def test_silence_past_login_timeout_closes_the_session() -> None:
    transcript = converse(POP3 | {"login_timeout": 20}, RecordingRouter(UPSTREAM), [Pause(19), "NOOP", Pause(21), "USER alice"])
    assert transcript.lines() == ["+OK relay.example.org POP3 ready", "+OK", "-ERR Disconnected for inactivity"]
    assert transcript.outcome == "idle-timeout" and transcript.ended_by == "mailrelay"
    assert transcript.unsent == (b"USER alice\r\n",)


def test_a_route_without_an_upstream_is_refused_and_the_next_one_used() -> None:
    routes = [Route(host="10.0.0.5", port=25), Route(host="10.0.0.6", port=25)]
    upstream = postfix()
    transcript = converse(
        SUBMISSION, RecordingRouter(routes), ["EHLO laptop", f"AUTH PLAIN {PLAIN}", "QUIT"], upstream={"10.0.0.6:25": upstream}
    )
    assert "235 2.7.0 Authentication successful" in transcript.lines()
    assert any("upstream 10.0.0.5:25 failed: connection refused" in message for message in transcript.messages())
    assert upstream.heard.startswith(b"EHLO laptop\r\n")


def test_no_upstream_at_all_is_unavailable() -> None:
    transcript = converse(SUBMISSION, RecordingRouter(UPSTREAM), ["EHLO laptop", f"AUTH PLAIN {PLAIN}"])
    assert transcript.lines()[-1] == "451 4.4.1 Mail server temporarily unavailable, try again later"


# -- converse: configurations, splice, limits -------------------------------------------------


def test_a_whole_configuration_with_its_own_router() -> None:
    config = f"""
    [router]
    type = "static"
    host = "10.0.0.5"
    port = 25

    [[listener]]
    {SUBMISSION}
    """
    transcript = converse(config, None, ["EHLO laptop", f"AUTH PLAIN {PLAIN}", "QUIT"], upstream=postfix())
    assert "235 2.7.0 Authentication successful" in transcript.lines() and transcript.outcome == "closed"


def test_a_splice_listener_carries_the_upstream_s_own_greeting() -> None:
    router = RecordingRouter(UPSTREAM)
    upstream = ScriptedUpstream("220 mx.example.org ESMTP", {"EHLO": "250 mx.example.org", "QUIT": Hangup("221 Bye")})
    transcript = converse({"name": "relay", "listen": "tcp:25", "mode": "splice"}, router, ["EHLO a", "QUIT"], upstream=upstream)
    assert transcript.lines() == ["220 mx.example.org ESMTP", "250 mx.example.org", "221 Bye"]
    assert transcript.upstream_lines() == ["EHLO a", "QUIT"] and transcript.sent_lines() == ["EHLO a", "QUIT"]
    assert router.requests == [route_request(listener="relay", protocol="none", mode="splice", local=("192.0.2.1", 25))]


def test_configuration_errors_are_the_parser_s() -> None:
    from mailrelay import ConfigError

    with pytest.raises(ConfigError, match="listener\\[0\\].mode"):
        converse({"name": "x", "mode": "starttls-please", "protocol": "smtp"}, RecordingRouter(UPSTREAM))
    with pytest.raises(ValueError, match='in mode "tls": converse speaks plaintext'):
        converse({"name": "x", "mode": "tls", "protocol": "imap"}, RecordingRouter(UPSTREAM))
    two = {"listener": [IMAP | {"listen": "tcp:0"}, POP3 | {"listen": "tcp:0"}]}
    with pytest.raises(ValueError, match='one listener, not 2 \\("imap", "pop3"\\)'):
        converse(two, RecordingRouter(UPSTREAM))


def test_starttls_and_tls_routes_cannot_be_followed_in_memory() -> None:
    with pytest.raises(NotImplementedError, match="cannot follow the client's STARTTLS"):
        converse(SUBMISSION, RecordingRouter(UPSTREAM), ["EHLO laptop", "STARTTLS"])
    with pytest.raises(NotImplementedError, match='cannot reach 10.0.0.5:465 with tls = "tls"'):
        converse(
            SUBMISSION,
            RecordingRouter(Route(host="10.0.0.5", port=465, tls="tls")),
            ["EHLO laptop", f"AUTH PLAIN {PLAIN}"],
            upstream=postfix(),
        )


def test_a_script_that_does_not_match_what_mailrelay_says_fails_the_test() -> None:
    upstream = ScriptedUpstream("220 mx", [("EHLO", "250-mx\n250 AUTH PLAIN"), ("AUTH LOGIN", "334 VXNlcm5hbWU6")])
    with pytest.raises(AssertionError, match="the upstream script did not expect b'AUTH PLAIN "):
        converse(SUBMISSION, RecordingRouter(UPSTREAM), ["EHLO laptop", f"AUTH PLAIN {PLAIN}"], upstream=upstream)
    assert upstream.unexpected == [f"AUTH PLAIN {PLAIN}\r\n".encode()]


def test_scripts_answer_with_defaults_callables_and_in_order() -> None:
    seen: list[bytes] = []

    def echo(line: bytes) -> str:
        seen.append(line)
        return "250 " + line.decode().strip().lower()

    upstream = ScriptedUpstream(None, {"EHLO": echo}, default="502 5.5.2 what?")
    transcript = converse({"name": "r", "mode": "splice"}, RecordingRouter(UPSTREAM), ["EHLO A", "VRFY x"], upstream=upstream)
    assert transcript.lines() == ["250 ehlo a", "502 5.5.2 what?"] and seen == [b"EHLO A\r\n"]
    assert upstream.unexpected == []

    ordered = ScriptedUpstream(b"* hi", [("", "first"), ("", b"second\r\n")])
    transcript = converse({"name": "r", "mode": "splice"}, RecordingRouter(UPSTREAM), ["x", "y"], upstream=ordered)
    assert transcript.client == b"* hi\r\nfirst\r\nsecond\r\n"


def test_the_transcript_keeps_the_session_line() -> None:
    transcript = converse(POP3, RecordingRouter(Reject("bad", close=True)), ["USER alice", "PASS pw"])
    assert isinstance(transcript, Transcript)
    assert transcript.outcome == "rejected" and transcript.reason == "bad"
    [line] = [m for m in transcript.messages() if " outcome=" in m]
    assert "listener=pop3 client=192.0.2.10:50000 user=alice upstream=-" in line
    assert "pw" not in " ".join(transcript.messages())


def test_the_examples_of_docs_testing_md_run_as_written() -> None:
    text = (ROOT / "docs" / "testing.md").read_text()
    examples = text.split("\n## Examples\n", 1)[1].split("\n## ", 1)[0]
    namespace: dict[str, Any] = {}
    for block in re.findall(r"```python\n(.*?)```", examples, re.S):
        exec(compile(block, "docs/testing.md", "exec"), namespace)
    tests = [value for name, value in namespace.items() if name.startswith("test_")]
    assert len(tests) == 5
    for test in tests:
        test()
