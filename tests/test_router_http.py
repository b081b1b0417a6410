"""
The `http` router: nginx's auth_http protocol, against auth services written the way
nginx users write theirs (the standard library's http.server, in a thread).
"""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote_to_bytes

import attrs
import pytest
import trustme
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import deferLater

from mailrelay.ask import ask_router, call_router
from mailrelay.config import parse_config
from mailrelay.configtable import ConfigError
from mailrelay.router import ClientCertificate, Reject, Route, RouteRequest, RouterError
from mailrelay.routers import components
from mailrelay.routers.http import HTTPRouter
from mailrelay.routers.http_answer import MAX_AUTH_WAIT, Wait, parse_auth_response
from mailrelay.routers.http_request import auth_request_headers, escape
from mailrelay.routers.http_url import display_url, parse_url
from mailrelay.service import makeService
from tests.support.httpauth import AuthService, Reply, Seen, answer, ok
from tests.support.net import WAIT, ProxyTestCase, closed_port, connect, echo, exchange, recv_all, reset
from tests.support.pki import PKI

PASSWORD = "hunter2-secret"
KEY = "s3cret-key-value"
EXTRA = [("X-Auth-Key", KEY), ("X-Mailrelay-Instance", "eu-1")]


def request(**fields: Any) -> RouteRequest:
    base: dict[str, Any] = dict(
        listener="test", protocol="imap", mode="starttls", client=("127.0.0.1", 50123), local=("127.0.0.1", 143)
    )
    return RouteRequest(**{**base, **fields})


def wire(*pairs: tuple[str, str | bytes]) -> list[tuple[str, bytes]]:
    return [(name, value.encode() if isinstance(value, str) else value) for name, value in pairs]


# -- the request, to the letter -------------------------------------------------------------

CERT = ClientCertificate(
    subject="CN=Alice Smith,O=Example", issuer="CN=Example CA,O=Example", serial="1A2B3C", fingerprint="ab" * 20
)

CASES: dict[str, tuple[RouteRequest, list[tuple[str, bytes]]]] = {
    # nginx's documented IMAP LOGIN example (research §2.3).
    "imap-login": (
        request(protocol="imap", user="alice@x", password="pw d", auth_method="plain"),
        wire(
            ("Auth-Method", "plain"),
            ("Auth-User", "alice@x"),
            ("Auth-Pass", "pw%20d"),
            ("Auth-Protocol", "imap"),
            ("Auth-Login-Attempt", "1"),
            ("Client-IP", "127.0.0.1"),
        ),
    ),
    "imap-over-tls": (
        request(
            protocol="imap",
            mode="tls",
            user="alice@x",
            password="pw",
            auth_method="plain",
            tls=True,
            tls_version="TLSv1.2",
            tls_cipher="ECDHE-RSA-AES256-GCM-SHA384",
        ),
        wire(
            ("Auth-Method", "plain"),
            ("Auth-User", "alice@x"),
            ("Auth-Pass", "pw"),
            ("Auth-Protocol", "imap"),
            ("Auth-Login-Attempt", "1"),
            ("Client-IP", "127.0.0.1"),
            ("Auth-SSL", "on"),
            ("Auth-SSL-Protocol", "TLSv1.2"),
            ("Auth-SSL-Cipher", "ECDHE-RSA-AES256-GCM-SHA384"),
        ),
    ),
    "imap-cram-md5": (
        request(
            protocol="imap",
            user="gina",
            password="c2e614d552220ee2f188c4a4b4356415",
            auth_method="cram-md5",
            salt="<1723419124.1795619693@mx.test>",
            attempt=2,
        ),
        wire(
            ("Auth-Method", "cram-md5"),
            ("Auth-User", "gina"),
            ("Auth-Pass", "c2e614d552220ee2f188c4a4b4356415"),
            ("Auth-Salt", "<1723419124.1795619693@mx.test>"),
            ("Auth-Protocol", "imap"),
            ("Auth-Login-Attempt", "2"),
            ("Client-IP", "127.0.0.1"),
        ),
    ),
    "pop3-apop": (
        request(
            protocol="pop3",
            user="bob",
            password="8f2a1b4a7e5c4d3e2f1a0b9c8d7e6f5a",
            auth_method="apop",
            salt="<4242.1700000000@mx.test>",
        ),
        wire(
            ("Auth-Method", "apop"),
            ("Auth-User", "bob"),
            ("Auth-Pass", "8f2a1b4a7e5c4d3e2f1a0b9c8d7e6f5a"),
            ("Auth-Salt", "<4242.1700000000@mx.test>"),
            ("Auth-Protocol", "pop3"),
            ("Auth-Login-Attempt", "1"),
            ("Client-IP", "127.0.0.1"),
        ),
    ),
    "pop3-user-pass-utf8-and-controls": (
        request(protocol="pop3", user="jürgen", password='a\tb%c+d"é', auth_method="plain", attempt=3),
        wire(
            ("Auth-Method", "plain"),
            ("Auth-User", "jürgen".encode()),
            ("Auth-Pass", 'a%09b%25c+d"é'.encode()),
            ("Auth-Protocol", "pop3"),
            ("Auth-Login-Attempt", "3"),
            ("Client-IP", "127.0.0.1"),
        ),
    ),
    "smtp-auth-login-reported-as-plain": (
        request(protocol="smtp", user="kim", password="100% sure", auth_method="login"),
        wire(
            ("Auth-Method", "plain"),
            ("Auth-User", "kim"),
            ("Auth-Pass", "100%25%20sure"),
            ("Auth-Protocol", "smtp"),
            ("Auth-Login-Attempt", "1"),
            ("Client-IP", "127.0.0.1"),
            ("Client-Host", "[UNAVAILABLE]"),
        ),
    ),
    "smtp-external-with-client-certificate": (
        request(
            protocol="smtp",
            mode="tls",
            user="alice",
            auth_method="external",
            tls=True,
            tls_version="TLSv1.3",
            tls_cipher="TLS_AES_256_GCM_SHA384",
            client_cert=CERT,
        ),
        wire(
            ("Auth-Method", "external"),
            ("Auth-User", "alice"),
            ("Auth-Pass", ""),
            ("Auth-Protocol", "smtp"),
            ("Auth-Login-Attempt", "1"),
            ("Client-IP", "127.0.0.1"),
            ("Client-Host", "[UNAVAILABLE]"),
            ("Auth-SSL", "on"),
            ("Auth-SSL-Protocol", "TLSv1.3"),
            ("Auth-SSL-Cipher", "TLS_AES_256_GCM_SHA384"),
            ("Auth-SSL-Verify", "SUCCESS"),
            ("Auth-SSL-Subject", "CN=Alice%20Smith,O=Example"),
            ("Auth-SSL-Issuer", "CN=Example%20CA,O=Example"),
            ("Auth-SSL-Serial", "1A2B3C"),
            ("Auth-SSL-Fingerprint", "ab" * 20),
        ),
    ),
    # nginx's `smtp_auth none` example: the envelope as typed, not escaped.
    "smtp-none-with-envelope": (
        request(
            protocol="smtp",
            auth_method="none",
            helo="c.example",
            mail_from="MAIL FROM:<s@x> SIZE=100",
            rcpt_to="RCPT TO:<r1@y> NOTIFY=NEVER",
        ),
        wire(
            ("Auth-Method", "none"),
            ("Auth-User", ""),
            ("Auth-Pass", ""),
            ("Auth-Protocol", "smtp"),
            ("Auth-Login-Attempt", "1"),
            ("Client-IP", "127.0.0.1"),
            ("Client-Host", "[UNAVAILABLE]"),
            ("Auth-SMTP-Helo", "c.example"),
            ("Auth-SMTP-From", "MAIL FROM:<s@x> SIZE=100"),
            ("Auth-SMTP-To", "RCPT TO:<r1@y> NOTIFY=NEVER"),
        ),
    ),
    "smtp-none-without-helo": (
        request(protocol="smtp", auth_method="none", mail_from="MAIL FROM:<>", rcpt_to="RCPT TO:<postmaster>"),
        wire(
            ("Auth-Method", "none"),
            ("Auth-User", ""),
            ("Auth-Pass", ""),
            ("Auth-Protocol", "smtp"),
            ("Auth-Login-Attempt", "1"),
            ("Client-IP", "127.0.0.1"),
            ("Client-Host", "[UNAVAILABLE]"),
            ("Auth-SMTP-Helo", ""),
            ("Auth-SMTP-From", "MAIL FROM:<>"),
            ("Auth-SMTP-To", "RCPT TO:<postmaster>"),
        ),
    ),
    "imap-xoauth2": (
        request(protocol="imap", user="alice@example.com", password="ya29.a0-token", auth_method="xoauth2"),
        wire(
            ("Auth-Method", "xoauth2"),
            ("Auth-User", "alice@example.com"),
            ("Auth-Pass", "ya29.a0-token"),
            ("Auth-Protocol", "imap"),
            ("Auth-Login-Attempt", "1"),
            ("Client-IP", "127.0.0.1"),
        ),
    ),
    "pop3-oauthbearer": (
        request(protocol="pop3", user="bob@example.com", password="token", auth_method="oauthbearer"),
        wire(
            ("Auth-Method", "oauthbearer"),
            ("Auth-User", "bob@example.com"),
            ("Auth-Pass", "token"),
            ("Auth-Protocol", "pop3"),
            ("Auth-Login-Attempt", "1"),
            ("Client-IP", "127.0.0.1"),
        ),
    ),
    "splice-listener-routes-by-client-ip": (
        request(protocol="none", mode="splice", client=("192.0.2.7", 40000)),
        wire(
            ("Auth-Method", "none"),
            ("Auth-User", ""),
            ("Auth-Pass", ""),
            ("Auth-Protocol", "none"),
            ("Auth-Login-Attempt", "1"),
            ("Client-IP", "192.0.2.7"),
        ),
    ),
    "tls-listener-ipv6-client": (
        request(
            protocol="none",
            mode="tls",
            client=("2001:db8::7", 40000),
            tls=True,
            sni="mail.example",
            tls_version="TLSv1.3",
            tls_cipher="TLS_AES_128_GCM_SHA256",
        ),
        wire(
            ("Auth-Method", "none"),
            ("Auth-User", ""),
            ("Auth-Pass", ""),
            ("Auth-Protocol", "none"),
            ("Auth-Login-Attempt", "1"),
            ("Client-IP", "2001:db8::7"),
            ("Auth-SSL", "on"),
            ("Auth-SSL-Protocol", "TLSv1.3"),
            ("Auth-SSL-Cipher", "TLS_AES_128_GCM_SHA256"),
        ),
    ),
    "unix-socket-client": (
        request(protocol="none", mode="splice", client=("/run/mailrelay.sock", 0)),
        wire(
            ("Auth-Method", "none"),
            ("Auth-User", ""),
            ("Auth-Pass", ""),
            ("Auth-Protocol", "none"),
            ("Auth-Login-Attempt", "1"),
            ("Client-IP", "unix:"),
        ),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_request_headers_are_nginx_s_in_its_order_then_the_extra_ones(case: str) -> None:
    route_request, expected = CASES[case]
    headers = auth_request_headers(route_request, "auth.example", EXTRA)
    assert [(name.decode(), value) for name, value in headers] == [
        ("Host", b"auth.example"),
        *expected,
        *wire(*EXTRA),
    ]


@given(st.text())
def test_escaping_round_trips_through_percent_decoding_and_never_emits_a_separator(text: str) -> None:
    escaped = escape(text)
    assert unquote_to_bytes(escaped) == text.encode("utf-8", "surrogateescape")
    assert not set(escaped) & {ord("\r"), ord("\n"), ord(" "), 0}
    assert all(
        escaped[i + 1 : i + 3].isupper() or escaped[i + 1 : i + 3].isdigit() for i in range(len(escaped)) if escaped[i] == 0x25
    )


@given(st.text(), st.text(), st.text(), st.text(), st.text())
def test_no_request_field_can_break_a_header_line(user: str, password: str, helo: str, mail_from: str, salt: str) -> None:
    fields = dict(user=user, password=password, helo=helo, mail_from=mail_from, rcpt_to=mail_from, salt=salt)
    for method in ("none", "cram-md5"):
        headers = auth_request_headers(request(protocol="smtp", auth_method=method, **fields), "h", [])
        assert all(b"\r" not in value and b"\n" not in value for _, value in headers)


def test_escaping_leaves_everything_else_raw() -> None:
    assert escape("a+b\"c'd\x7fé") == "a+b\"c'd\x7fé".encode()
    assert escape("\x00\x1f %") == b"%00%1F%20%25"


# -- the response ---------------------------------------------------------------------------

IMAP = request(protocol="imap", user="alice", password=PASSWORD, auth_method="plain")
SMTP = request(protocol="smtp", user="alice", password=PASSWORD, auth_method="plain")
OK = [("Auth-Status", "OK"), ("Auth-Server", "10.0.0.5"), ("Auth-Port", "143")]


@pytest.mark.parametrize(
    "headers, route_request, routes",
    [
        (OK, IMAP, [Route(host="10.0.0.5", port=143, login="passthrough")]),
        (OK, SMTP, [Route(host="10.0.0.5", port=143, login="xclient")]),
        (OK, request(protocol="pop3"), [Route(host="10.0.0.5", port=143, login="passthrough")]),
        (OK, request(protocol="none", mode="splice"), [Route(host="10.0.0.5", port=143, login="passthrough")]),
        (
            [("auth-status", "OK"), ("AUTH-SERVER", "localhost"), ("auth-port", " 25 ")],
            SMTP,
            [Route(host="localhost", port=25, login="xclient")],
        ),
        ([("Auth-Status", "OK"), ("Auth-Server", "::1"), ("Auth-Port", "993")], IMAP, [Route(host="::1", port=993)]),
        (
            [("Auth-Status", "OK"), ("Auth-Server", "[2001:db8::5]"), ("Auth-Port", "1")],
            IMAP,
            [Route(host="2001:db8::5", port=1)],
        ),
        (
            [*OK, ("Auth-User", "backend-alice@x"), ("Auth-Pass", "secret pw%20")],
            IMAP,
            [Route(host="10.0.0.5", port=143, user="backend-alice@x", password="secret pw%20")],
        ),
        ([*OK, ("Mailrelay-TLS", "starttls")], IMAP, [Route(host="10.0.0.5", port=143, tls="starttls")]),
        (
            [*OK, ("Mailrelay-TLS", "tls"), ("Mailrelay-TLS-Verify", "off")],
            IMAP,
            [Route(host="10.0.0.5", port=143, tls="tls", tls_verify=False)],
        ),
        (
            [*OK, ("Mailrelay-Server-Name", "imap.example.net")],
            IMAP,
            [Route(host="10.0.0.5", port=143, server_name="imap.example.net")],
        ),
        ([*OK, ("Mailrelay-Login", "none")], SMTP, [Route(host="10.0.0.5", port=143, login="none")]),
        ([*OK, ("Mailrelay-Login", "xclient")], IMAP, [Route(host="10.0.0.5", port=143, login="xclient")]),
        ([*OK, ("Mailrelay-Proxy-Protocol", "2")], IMAP, [Route(host="10.0.0.5", port=143, proxy_protocol=2)]),
        ([*OK, ("Mailrelay-Forward-Client", "on")], IMAP, [Route(host="10.0.0.5", port=143, forward_client=True)]),
        ([*OK, ("Mailrelay-Auth-Mechanism", "login")], IMAP, [Route(host="10.0.0.5", port=143, auth_mechanism="login")]),
        (
            [*OK, ("Mailrelay-Fallback", "10.0.0.6:143, [2001:db8::6]:1143,backup.example:143"), ("Mailrelay-TLS", "tls")],
            IMAP,
            [
                Route(host="10.0.0.5", port=143, tls="tls"),
                Route(host="10.0.0.6", port=143, tls="tls"),
                Route(host="2001:db8::6", port=1143, tls="tls"),
                Route(host="backup.example", port=143, tls="tls"),
            ],
        ),
        (
            [*OK, ("Auth-Pass", "plaintext")],
            request(protocol="imap", user="gina", password="c2e6", auth_method="cram-md5"),
            [Route(host="10.0.0.5", port=143, password="plaintext")],
        ),
        (OK, request(protocol="smtp", user="gina", auth_method="cram-md5"), [Route(host="10.0.0.5", port=143, login="xclient")]),
        ([*OK, ("X-Unknown", "ignored"), ("Content-Type", "text/plain")], IMAP, [Route(host="10.0.0.5", port=143)]),
    ],
)
def test_ok_answers_become_routes(headers: Any, route_request: RouteRequest, routes: list[Route]) -> None:
    assert parse_auth_response(headers, route_request) == routes


@pytest.mark.parametrize(
    "headers, wait",
    [([("Auth-Status", "WAIT")], Wait(0.0)), ([("Auth-Status", "WAIT"), ("Auth-Wait", "2")], Wait(2.0))],
)
def test_wait_answers(headers: Any, wait: Wait) -> None:
    assert parse_auth_response(headers, IMAP) == wait


@pytest.mark.parametrize(
    "headers, expected",
    [
        ([("Auth-Status", "Invalid login or password"), ("Auth-Wait", "3")], Reject("Invalid login or password", 3, None, False)),
        ([("Auth-Status", "Invalid login or password")], Reject("Invalid login or password", 0, None, True)),
        # nginx closes after a failure whose Auth-Wait is 0, as when it is absent.
        ([("Auth-Status", "Try later"), ("Auth-Wait", "0")], Reject("Try later", 0, None, True)),
        (
            [("Auth-Status", "Recipient rejected"), ("Auth-Error-Code", "550 5.1.1")],
            Reject("Recipient rejected", 0, "550 5.1.1", True),
        ),
        ([("Auth-Status", "ok")], Reject("ok", 0, None, True)),  # only "OK", exactly, is success
        ([("Auth-Status", "Nope"), ("Auth-Wait", "0.5"), ("Auth-Server", "ignored")], Reject("Nope", 0.5, None, False)),
    ],
)
def test_other_statuses_are_the_services_refusal(headers: Any, expected: Reject) -> None:
    with pytest.raises(Reject) as raised:
        parse_auth_response(headers, SMTP)
    assert repr(raised.value) == repr(expected)


@pytest.mark.parametrize(
    "headers, message",
    [
        ([], "answered without Auth-Status"),
        ([("Content-Type", "text/html")], "answered without Auth-Status"),
        ([("Auth-Status", "")], "answered with an empty Auth-Status"),
        ([("Auth-Status", "OK")], "answered OK without Auth-Server and Auth-Port"),
        ([("Auth-Status", "OK"), ("Auth-Server", "10.0.0.5")], "answered OK without Auth-Port"),
        ([("Auth-Status", "OK"), ("Auth-Port", "143")], "answered OK without Auth-Server"),
        ([("Auth-Status", "OK"), ("Auth-Server", "not a host"), ("Auth-Port", "1")], 'invalid Auth-Server: "not a host"'),
        ([("Auth-Status", "OK"), ("Auth-Server", "999.1.1.1"), ("Auth-Port", "1")], 'invalid Auth-Server: "999.1.1.1"'),
        ([("Auth-Status", "OK"), ("Auth-Server", "[10.0.0.5]"), ("Auth-Port", "1")], "invalid Auth-Server"),
        ([("Auth-Status", "OK"), ("Auth-Server", "h"), ("Auth-Port", "0")], 'invalid Auth-Port: "0"'),
        ([("Auth-Status", "OK"), ("Auth-Server", "h"), ("Auth-Port", "65536")], 'invalid Auth-Port: "65536"'),
        ([("Auth-Status", "OK"), ("Auth-Server", "h"), ("Auth-Port", "imap")], 'invalid Auth-Port: "imap"'),
        ([("Auth-Status", "WAIT"), ("Auth-Wait", "soon")], 'invalid Auth-Wait: "soon"'),
        ([("Auth-Status", "No"), ("Auth-Wait", "-1")], 'invalid Auth-Wait: "-1"'),
        ([*OK, ("Mailrelay-TLS", "ssl")], 'invalid Mailrelay-TLS: "ssl"'),
        ([*OK, ("Mailrelay-TLS-Verify", "yes")], 'invalid Mailrelay-TLS-Verify: "yes"'),
        ([*OK, ("Mailrelay-Login", "magic")], 'invalid Mailrelay-Login: "magic"'),
        ([*OK, ("Mailrelay-Proxy-Protocol", "3")], 'invalid Mailrelay-Proxy-Protocol: "3"'),
        ([*OK, ("Mailrelay-Forward-Client", "yes")], 'invalid Mailrelay-Forward-Client: "yes"'),
        ([*OK, ("Mailrelay-Server-Name", "two words")], 'invalid Mailrelay-Server-Name: "two words"'),
        ([*OK, ("Mailrelay-Fallback", "10.0.0.6")], 'invalid Mailrelay-Fallback: "10.0.0.6"'),
        ([*OK, ("Mailrelay-Fallback", "10.0.0.6:25,")], 'invalid Mailrelay-Fallback: "10.0.0.6:25,"'),
        ([*OK, ("Mailrelay-Fallback", "::1:25")], 'invalid Mailrelay-Fallback: "::1:25"'),
        ([("Auth-Status", "OK"), ("Auth-Status", "Invalid"), ("Auth-Server", "h"), ("Auth-Port", "1")], "2 Auth-Status headers"),
        ([("Auth-Status", b"\xff\xfe")], "answered with a Auth-Status that is not UTF-8"),
    ],
)
def test_malformed_answers_are_router_errors_naming_the_header(headers: Any, message: str) -> None:
    with pytest.raises(RouterError) as raised:
        parse_auth_response(headers, IMAP, service="auth service http://a/")
    assert str(raised.value).startswith("auth service http://a/: ")
    assert message in str(raised.value)


def test_auth_wait_is_bounded_for_a_wait_and_for_a_refusal() -> None:
    assert MAX_AUTH_WAIT == 60
    for value in ("61", "3600", "86400.5", "9" * 400):
        assert parse_auth_response([("Auth-Status", "WAIT"), ("Auth-Wait", value)], IMAP) == Wait(MAX_AUTH_WAIT)
        with pytest.raises(Reject) as raised:
            parse_auth_response([("Auth-Status", "Go away"), ("Auth-Wait", value)], SMTP)
        assert (raised.value.wait, raised.value.close) == (MAX_AUTH_WAIT, False)
    assert parse_auth_response([("Auth-Status", "WAIT"), ("Auth-Wait", "60")], IMAP) == Wait(60.0)
    assert parse_auth_response([("Auth-Status", "WAIT"), ("Auth-Wait", "59.5")], IMAP) == Wait(59.5)


_CONTROL_VALUES = ["\r", "\n", "\r\n", "\0", "\x1b", "\x7f", "\t", "\x01", "\x0b"]


@pytest.mark.parametrize("control", _CONTROL_VALUES, ids=[repr(c) for c in _CONTROL_VALUES])
@pytest.mark.parametrize(
    "headers, name",
    [
        (lambda bad: [*OK, ("Auth-User", f"alice{bad}a2 LOGOUT")], "Auth-User"),
        (lambda bad: [*OK, ("Auth-Pass", f"{PASSWORD}{bad}QUIT")], "Auth-Pass"),
        (lambda bad: [("Auth-Status", "OK"), ("Auth-Server", f"10.0.0.5{bad}x"), ("Auth-Port", "143")], "Auth-Server"),
        (lambda bad: [*OK, ("Mailrelay-Server-Name", f"imap{bad}.example")], "Mailrelay-Server-Name"),
        (lambda bad: [("Auth-Status", f"Invalid login{bad}* BYE"), ("Auth-Wait", "1")], "Auth-Status"),
        (lambda bad: [("Auth-Status", "Nope"), ("Auth-Error-Code", f"535 5.7.8{bad}250 ok")], "Auth-Error-Code"),
    ],
    ids=["user", "pass", "server", "server-name", "status", "error-code"],
)
def test_control_characters_in_an_answer_are_a_router_error(headers: Any, name: str, control: str) -> None:
    """A value that goes upstream or into a reply never carries a control character: the
    answer is a temporary failure, and the message does not show the value."""
    with pytest.raises(RouterError) as raised:
        parse_auth_response(headers(control), SMTP, service="auth service http://a/")
    assert str(raised.value) == f"auth service http://a/: answered with control characters in {name}"
    assert PASSWORD not in str(raised.value)


def test_spaces_and_tabs_around_a_value_are_trimmed_not_refused() -> None:
    routes = parse_auth_response([*OK, ("Auth-User", " \tbackend-alice\t "), ("Auth-Pass", "\tpw ")], IMAP)
    assert isinstance(routes, list)
    assert [(r.user, r.password) for r in routes] == [("backend-alice", "pw")]


def test_passthrough_after_cram_md5_or_apop_needs_the_password_from_the_service() -> None:
    for method, protocol in (("cram-md5", "imap"), ("apop", "pop3"), ("cram-md5", "pop3"), ("cram-md5", "smtp")):
        with pytest.raises(RouterError, match=f"answered OK to a {method} login without the Auth-Pass"):
            answer = [*OK, ("Mailrelay-Login", "passthrough")]
            parse_auth_response(answer, request(protocol=protocol, user="u", password="digest", auth_method=method))
    # With another login, or for SMTP's default (XCLIENT needs no password), it is not needed.
    assert parse_auth_response([*OK, ("Mailrelay-Login", "none")], request(protocol="imap", auth_method="cram-md5"))
    assert parse_auth_response(OK, request(protocol="smtp", auth_method="cram-md5"))


_ANSWER_HEADERS = st.sampled_from(
    ["Auth-Status", "Auth-Server", "Auth-Port", "Auth-Wait", "Auth-User", "Auth-Pass", "Auth-Error-Code", "Mailrelay-TLS"]
    + ["Mailrelay-TLS-Verify", "Mailrelay-Login", "Mailrelay-Proxy-Protocol", "Mailrelay-Fallback", "Mailrelay-Server-Name"]
)


@given(st.lists(st.tuples(_ANSWER_HEADERS, st.one_of(st.binary(max_size=40), st.sampled_from([b"OK", b"WAIT", b"1", b"::1"])))))
def test_any_answer_is_routes_a_wait_a_refusal_or_a_router_error(headers: list[tuple[str, bytes]]) -> None:
    try:
        result = parse_auth_response(headers, IMAP)
    except (Reject, RouterError):
        return
    assert isinstance(result, Wait) or (result and all(isinstance(r, Route) for r in result))


# -- configuration --------------------------------------------------------------------------


def config(**router: Any) -> dict[str, Any]:
    return {
        "router": {"type": "http", **router},
        "listener": [{"name": "test", "listen": "tcp:0:interface=127.0.0.1", "mode": "splice"}],
    }


def config_errors(**router: Any) -> list[str]:
    with pytest.raises(ConfigError) as raised:
        parse_config(config(**router), "mailrelay.toml")
    return raised.value.errors


@pytest.mark.parametrize(
    "router, errors",
    [
        ({}, ["mailrelay.toml: router.url: is required"]),
        (
            {"url": "ftp://auth.example/"},
            ['mailrelay.toml: router.url: must be an http:// or https:// URL, not "ftp://auth.example/"'],
        ),
        (
            {"url": "auth.example:9000/auth"},
            ['mailrelay.toml: router.url: must be an http:// or https:// URL, not "auth.example:9000/auth"'],
        ),
        ({"url": "http:///auth"}, ['mailrelay.toml: router.url: has no host: "http:///auth"']),
        (
            {"url": "http://a b/"},
            [
                "mailrelay.toml: router.url: must be ASCII without spaces"
                ' (percent-encode the path, a host name in its xn-- form), not "http://a b/"'
            ],
        ),
        (
            {"url": "http://auth.example:0/"},
            ['mailrelay.toml: router.url: has an invalid port (1 to 65535): "http://auth.example:0/"'],
        ),
        (
            {"url": "http://u:pw@auth.example/"},
            ["mailrelay.toml: router.url: must not hold a user name or password (send credentials with headers)"],
        ),
        ({"url": "http://auth.example/", "ca": "ca.pem"}, ["mailrelay.toml: router.ca: applies only to an https:// url"]),
        (
            {"url": "http://auth.example/", "headers": "X-Auth-Key: s3cret"},
            ["mailrelay.toml: router.headers: must be a table, not a string"],
        ),
        (
            {"url": "http://auth.example/", "headers": {"X-Auth-Key": 12345}},
            ["mailrelay.toml: router.headers.X-Auth-Key: must be a string, not an integer"],
        ),
        (
            {"url": "http://auth.example/", "headers": {"X Key": "v"}},
            ["mailrelay.toml: router.headers.X Key: is not a valid HTTP header name"],
        ),
        (
            {"url": "http://auth.example/", "headers": {"auth-user": "v"}},
            ["mailrelay.toml: router.headers.auth-user: is a header mailrelay sends itself"],
        ),
        (
            {"url": "http://auth.example/", "headers": {"X-Key": "a", "x-key": "b"}},
            ['mailrelay.toml: router.headers.x-key: repeats the header "X-Key" (header names are case-insensitive)'],
        ),
        (
            {"url": "http://auth.example/", "headers": {"X-Key": "a\r\nInjected: 1"}},
            ["mailrelay.toml: router.headers.X-Key: must not contain line breaks or NUL characters"],
        ),
        (
            {"url": "http://auth.example/", "timeout": -1},
            ["mailrelay.toml: router.timeout: must be a positive number of seconds, not -1"],
        ),
        (
            {"url": "http://auth.example/", "timeout": "10s"},
            ["mailrelay.toml: router.timeout: must be a number of seconds, not a string ('10s')"],
        ),
        (
            {"url": "http://auth.example/", "max_connections": 0},
            ["mailrelay.toml: router.max_connections: must be from 1 to 10000, not 0"],
        ),
        (
            {"url": "http://auth.example/", "max_wait_retries": -1},
            ["mailrelay.toml: router.max_wait_retries: must be from 0 to 10000, not -1"],
        ),
        ({"url": "http://auth.example/", "auth_http_timeout": 5}, ["mailrelay.toml: router.auth_http_timeout: unknown key"]),
    ],
)
def test_configuration_errors_are_exact(router: dict[str, Any], errors: list[str]) -> None:
    assert config_errors(**router) == errors


def test_header_values_are_never_in_error_messages() -> None:
    errors = config_errors(url="http://auth.example/", headers={"X-Key": f"{KEY}\n", "X Bad": KEY, "Auth-Pass": KEY})
    assert len(errors) == 3 and not any(KEY in line for line in errors)


def test_check_shows_the_url_and_header_names_but_no_value(tmp_path: Any, capsys: Any) -> None:
    from mailrelay.__main__ import check

    path = tmp_path / "mailrelay.toml"
    path.write_text(
        '[router]\ntype = "http"\nurl = "https://auth.example:8443/mail?key=query-secret"\ntimeout = 2.5\n'
        f'headers = {{ X-Auth-Key = "{KEY}", X-Instance = "eu-1" }}\n'
        '[[listener]]\nlisten = "tcp:0:interface=127.0.0.1"\nmode = "splice"\n'
    )
    assert check(str(path)) == 0
    shown = capsys.readouterr().out
    expected = (
        "router: http: https://auth.example:8443/mail?... timeout=2.5s headers=X-Auth-Key,X-Instance ca=the system trust store"
    )
    assert expected in shown
    assert KEY not in shown and "eu-1" not in shown and "query-secret" not in shown


@pytest.mark.parametrize(
    "url, shown",
    [
        ("http://user:s3cret@127.0.0.1:9/auth?token=t0ken", "http://user:...@127.0.0.1:9/auth?..."),
        ("http://user:s3cret@[bad/auth?token=t0ken", "http://user:...@[bad/auth?..."),
        ("https://u:pa?ss#w@auth.example/a", "https://u:...@auth.example/a"),
        ("http://pa?ss#w@auth.example/a", "http://...@auth.example/a"),
        ("http://user@auth.example/a", "http://user@auth.example/a"),
        ("user:s3cret@auth.example/a", "user:...@auth.example/a"),
        ("https://auth.example:8443/mail?key=k", "https://auth.example:8443/mail?..."),
        ("http://auth.example/a#t0ken", "http://auth.example/a#..."),
        ("http://auth.example/a\x1b[2J", "http://auth.example/a\\x1b[2J"),
        ("http://auth.example/mail", "http://auth.example/mail"),
    ],
)
def test_display_url_hides_the_password_and_query_of_any_url(url: str, shown: str) -> None:
    assert display_url(url) == shown
    assert parse_url("http://auth.example/mail?key=k").display == "http://auth.example/mail?..."


@pytest.mark.parametrize(
    "url",
    [
        "http://user:s3cret@127.0.0.1:9/auth?token=t0ken",
        "http://user:s3cret@[bad/auth?token=t0ken",
        "ftp://user:s3cret@auth.example/auth?token=t0ken",
        "user:s3cret@auth.example/auth?token=t0ken",
        "http://auth.example:0/auth?token=t0ken",
        "http://auth.example/a b?token=t0ken",
        "http://auth.example/auth#token=t0ken",
        "http://[::g]/auth?token=t0ken",
        "http://a..b/auth?token=t0ken",
    ],
)
def test_url_errors_never_show_a_password_or_query(url: str) -> None:
    with pytest.raises(ValueError) as raised:
        parse_url(url)
    assert "s3cret" not in str(raised.value) and "t0ken" not in str(raised.value), raised.value


def test_check_never_prints_the_url_password_or_query(tmp_path: Any) -> None:
    """`python -m mailrelay check`, as an administrator runs it, on configurations whose
    auth service URLs hold a password and a key: neither is printed, valid or not."""

    def run_check(folder: Any) -> subprocess.CompletedProcess[str]:
        # This source tree's mailrelay, not an installed copy.
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
        command = [sys.executable, "-m", "mailrelay", "check", "mailrelay.toml"]
        return subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=WAIT)

    listener = '[[listener]]\nlisten = "tcp:0:interface=127.0.0.1"\nmode = "splice"\n'
    for url, other in [
        ("http://user:s3cret@127.0.0.1:9/auth?token=t0ken", "timeout = -1\n"),
        ("http://user:s3cret@[bad/auth?token=t0ken", ""),
        ("http://127.0.0.1:0/auth?token=t0ken", 'headers = { X-Key = "v" }\n'),
        ("ftp://user:s3cret@127.0.0.1/auth?token=t0ken", ""),
    ]:
        (tmp_path / "mailrelay.toml").write_text(f'[router]\ntype = "http"\nurl = "{url}"\n{other}{listener}')
        result = run_check(tmp_path)
        assert result.returncode == 1, result
        assert "router.url" in result.stderr
        for secret in ("s3cret", "t0ken"):
            assert secret not in result.stdout + result.stderr, result.stderr
    (tmp_path / "mailrelay.toml").write_text(f'[router]\ntype = "http"\nurl = "http://127.0.0.1:9/auth?token=t0ken"\n{listener}')
    result = run_check(tmp_path)
    assert result.returncode == 0, result.stderr
    assert "router: http: http://127.0.0.1:9/auth?... timeout=10s" in result.stdout
    assert "t0ken" not in result.stdout + result.stderr


def test_url_defaults() -> None:
    assert parse_url("http://auth.example/mail").port == 80
    assert parse_url("HTTPS://auth.example/mail").port == 443
    assert parse_url("http://[::1]:9000/a").host_header == "[::1]"
    assert parse_url("http://Auth.Example:9000/a").host_header == "Auth.Example"


def test_an_unusable_ca_file_stops_the_start(tmp_path: Any) -> None:
    missing = str(tmp_path / "missing.pem")
    with pytest.raises(ConfigError) as raised:
        makeService(config(url="https://auth.example/", ca=missing))
    assert raised.value.errors == [f"<config>: router.ca: cannot read CA file {missing}: No such file or directory"]
    (tmp_path / "empty.pem").write_text("not a certificate\n")
    with pytest.raises(ConfigError, match="holds no PEM certificate"):
        makeService(config(url="https://auth.example/", ca=str(tmp_path / "empty.pem")))


# -- against real auth services -------------------------------------------------------------


class HTTPRouterTests(ProxyTestCase):
    def service(self, reply: Callable[[Seen], Reply], **options: Any) -> AuthService:
        service = AuthService(reply, **options)
        self.addCleanup(service.close)
        return service

    def router(self, url: str, **options: Any) -> HTTPRouter:
        router = HTTPRouter(url, reactor=reactor, **options)
        router.startService()
        self.addCleanup(router.stopService)
        return router

    async def route_error(self, router: HTTPRouter, route_request: RouteRequest = IMAP) -> str:
        try:
            answer = await router.route(route_request)
        except RouterError as e:
            self.assertNotIn(PASSWORD, str(e))
            self.assertNotIn(KEY, str(e))
            return str(e)
        raise AssertionError(f"expected a RouterError, got {answer!r}")

    # The request, on the wire.

    async def test_every_request_header_reaches_the_service_exactly(self) -> None:
        service = self.service(ok("127.0.0.1", 143, ("Auth-Pass", "plaintext")))
        router = self.router(service.url, headers=EXTRA)
        for name, (route_request, expected) in CASES.items():
            await router.route(route_request)
            seen = service.requests[-1]
            self.assertEqual(seen.path, "/auth", name)
            self.assertEqual(seen.headers, [("Host", b"127.0.0.1"), *expected, *wire(*EXTRA)], name)
        self.assertEqual(len(service.requests), len(CASES))

    async def test_asking_the_service_logs_no_connection_churn(self) -> None:
        """Twisted's HTTP client logs "Starting factory" and "Stopping factory" for each
        connection to the service; an administrator reading session lines must not wade
        through two such lines per login (the pool's factory is a quiet subclass of a
        private Twisted class: this also fails if Twisted renames it)."""
        service = self.service(ok("127.0.0.1", 143))  # HTTP/1.0: a new connection per request
        router = self.router(service.url)
        for _ in range(3):
            await router.route(IMAP)
        self.assertEqual(len(service.requests), 3)
        churn = [line for line in self.logs.lines() if "Starting factory" in line or "Stopping factory" in line]
        self.assertEqual(churn, [])

    async def test_with_cache_ttl_the_service_is_asked_once_for_many_logins(self) -> None:
        def password_check(seen: Seen) -> Reply:
            if seen.get("Auth-Pass") == "right":
                return ok("127.0.0.1", 143)(seen)
            return answer(("Auth-Status", "Invalid login or password"), ("Auth-Wait", "1"))(seen)

        service = self.service(password_check, http11=True)
        config = parse_config(
            {
                "router": {"type": "http", "url": service.url, "cache_ttl": 60},
                "listener": [{"name": "l", "listen": "tcp:0", "mode": "splice"}],
            }
        )
        assert config.router is not None
        router = config.router.build(reactor)
        for component in components(router):
            if isinstance(component, HTTPRouter):
                component.startService()
                self.addCleanup(component.stopService)
        login = request(user="alice@example.org", password="right", auth_method="plain")
        for n in range(10):
            routes = await call_router(router, attrs.evolve(login, client=("127.0.0.1", 50000 + n)))
            self.assertEqual(routes, [Route(host="127.0.0.1", port=143)])
        self.assertEqual(len(service.requests), 1)
        # A wrong password is asked about every time, and refused every time.
        for _ in range(2):
            with self.assertRaises(Reject):
                await call_router(router, attrs.evolve(login, password="wrong"))
        self.assertEqual(len(service.requests), 3)

    async def test_host_header_is_the_url_host_without_port(self) -> None:
        service = self.service(ok())
        router = self.router(f"http://localhost:{service.port}/auth/mail?realm=eu")
        await router.route(IMAP)
        self.assertEqual(service.requests[0].path, "/auth/mail?realm=eu")
        self.assertEqual(service.requests[0].headers[0], ("Host", b"localhost"))

    async def test_headers_from_the_configuration_come_last_in_table_order(self) -> None:
        service = self.service(ok())
        parsed = parse_config(config(url=service.url, headers={"X-Zeta": "1", "X-Alpha": "2", "X-Auth-Key": KEY}))
        assert parsed.router is not None
        router = parsed.router.build(reactor)
        self.addCleanup(router.stopService)  # type: ignore[attr-defined]
        await router.route(IMAP)  # type: ignore[misc]
        self.assertEqual(service.requests[0].headers[-3:], [("X-Zeta", b"1"), ("X-Alpha", b"2"), ("X-Auth-Key", KEY.encode())])

    # The example auth script of nginx's documentation, rewritten.

    async def test_nginx_documentation_example_script(self) -> None:
        def script(seen: Seen) -> Reply:
            # Accept one user, send it to a backend by IP; otherwise fail, asking for a pause.
            if seen.get("Auth-User") == "alice" and seen.get("Auth-Pass") == "correct%20horse":
                return 200, [("Auth-Status", "OK"), ("Auth-Server", "127.0.0.2"), ("Auth-Port", "143")], b""
            return 200, [("Auth-Status", "Invalid login or password"), ("Auth-Wait", "3")], b""

        router = self.router(self.service(script).url)
        good = request(protocol="imap", user="alice", password="correct horse", auth_method="plain")
        self.assertEqual(await router.route(good), [Route(host="127.0.0.2", port=143, login="passthrough")])
        bad = request(protocol="imap", user="alice", password="wrong", auth_method="plain")
        with self.assertRaises(Reject) as raised:
            await router.route(bad)
        self.assertEqual(repr(raised.exception), repr(Reject("Invalid login or password", wait=3, close=False)))

    # Answers over the wire.

    async def test_answer_header_names_are_case_insensitive_and_the_body_ignored(self) -> None:
        reply = answer(("auth-status", "OK"), ("AUTH-SERVER", "localhost"), ("auth-port", "2525"), body=b"<html>hi</html>" * 100)
        router = self.router(self.service(reply).url)
        self.assertEqual(await router.route(SMTP), [Route(host="localhost", port=2525, login="xclient")])

    async def test_wait_asks_again_after_auth_wait(self) -> None:
        answers = [
            (200, [("Auth-Status", "WAIT"), ("Auth-Wait", "0.2")], b""),
            (200, [("Auth-Status", "WAIT")], b""),
            (200, [("Auth-Status", "OK"), ("Auth-Server", "10.0.0.5"), ("Auth-Port", "143")], b""),
        ]
        service = self.service(lambda seen: answers[len(service.requests) - 1])
        router = self.router(service.url)
        started = time.monotonic()
        self.assertEqual(await router.route(IMAP), [Route(host="10.0.0.5", port=143)])
        self.assertGreaterEqual(time.monotonic() - started, 0.2)
        self.assertEqual(len(service.requests), 3)
        self.assertEqual(service.requests[0].headers, service.requests[2].headers)

    async def test_too_many_waits_are_a_router_error(self) -> None:
        service = self.service(answer(("Auth-Status", "WAIT"), ("Auth-Wait", "0")))
        router = self.router(service.url, max_wait_retries=2)
        self.assertEqual(await self.route_error(router), f"auth service {service.url}: still answering WAIT after 3 requests")
        self.assertEqual(len(service.requests), 3)

    async def test_server_error_status_is_ignored(self) -> None:
        reply = answer(("Auth-Status", "OK"), ("Auth-Server", "10.0.0.5"), ("Auth-Port", "143"), status=500)
        router = self.router(self.service(reply).url)
        self.assertEqual(await router.route(IMAP), [Route(host="10.0.0.5", port=143)])

    async def test_the_listener_router_timeout_bounds_the_waits(self) -> None:
        service = self.service(answer(("Auth-Status", "WAIT"), ("Auth-Wait", "5")))
        router = self.router(service.url)
        started = time.monotonic()
        with self.assertRaises(RouterError) as raised:
            await ask_router(router, IMAP, reactor, 0.3)
        self.assertEqual(str(raised.exception), "router did not answer within 0.3s")
        self.assertLess(time.monotonic() - started, 1.5)
        self.assertEqual(len(service.requests), 1)

    async def test_a_body_that_never_ends_costs_the_connection_not_the_answer(self) -> None:
        def endless(conn: Any) -> None:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nAuth-Status: OK\r\nAuth-Server: 10.0.0.5\r\nAuth-Port: 143\r\n")
            conn.sendall(b"Content-Length: 1000\r\n\r\nonly a little")
            assert conn.recv(1) == b""  # mailrelay hangs up

        server = self.server(endless)
        router = self.router(f"http://127.0.0.1:{server.port}/auth", timeout=0.3)
        self.assertEqual(await router.route(IMAP), [Route(host="10.0.0.5", port=143)])
        self.assertIsNone(await self.in_thread(server.result))

    # Failures are temporary: RouterError, never Reject.

    async def test_service_down(self) -> None:
        url = f"http://127.0.0.1:{closed_port()}/auth"
        router = self.router(url, headers=EXTRA)
        self.assertEqual(await self.route_error(router), f"auth service {url}: connection refused")

    async def test_slow_service_times_out_without_waiting_for_it(self) -> None:
        def slow(seen: Seen) -> Reply:
            time.sleep(2)
            return ok()(seen)

        service = self.service(slow)
        router = self.router(service.url, timeout=0.3, headers=EXTRA)
        started = time.monotonic()
        self.assertEqual(await self.route_error(router), f"auth service {service.url}: no answer within 0.3s")
        self.assertLess(time.monotonic() - started, 1.5)

    async def test_cancelling_a_question_in_flight_is_a_cancellation_not_a_failure(self) -> None:
        def slow(seen: Seen) -> Reply:
            time.sleep(1)
            return ok()(seen)

        service = self.service(slow)
        router = self.router(service.url)
        asking = Deferred.fromCoroutine(router.route(IMAP))
        await deferLater(reactor, 0.1)
        asking.cancel()
        with self.assertRaises(CancelledError):
            await asking

    async def test_cancelling_before_the_connection_is_made_is_a_cancellation_too(self) -> None:
        # Cancelled while TCP is still connecting, Twisted says ConnectingCancelledError:
        # still the client going away, not an auth service failure (CI met it on a loaded machine).
        service = self.service(ok())
        router = self.router(service.url)
        asking = Deferred.fromCoroutine(router.route(IMAP))
        asking.cancel()
        with self.assertRaises(CancelledError):
            await asking

    async def test_server_error_without_auth_status(self) -> None:
        service = self.service(answer(("Content-Type", "text/html"), status=500, body=b"<h1>Internal Server Error</h1>"))
        router = self.router(service.url, headers=EXTRA)
        self.assertEqual(await self.route_error(router), f"auth service {service.url}: answered without Auth-Status")

    async def test_garbage_instead_of_http(self) -> None:
        def garbage(conn: Any) -> None:
            conn.recv(65536)
            conn.sendall(b"\x00\xff\x16garbage\r\n\r\n")

        port = self.server(garbage).port
        router = self.router(f"http://127.0.0.1:{port}/auth", headers=EXTRA)
        self.assertEqual(
            await self.route_error(router), f"auth service http://127.0.0.1:{port}/auth: answered something that is not HTTP"
        )

    async def test_connection_closed_or_reset_before_the_headers(self) -> None:
        def half_answer(conn: Any) -> None:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.0 200 OK\r\nAuth-Status: OK\r\n")

        def read_and_reset(conn: Any) -> None:
            conn.recv(65536)
            reset(conn)

        closing = self.server(half_answer).port
        router = self.router(f"http://127.0.0.1:{closing}/auth", headers=EXTRA)
        self.assertEqual(
            await self.route_error(router),
            f"auth service http://127.0.0.1:{closing}/auth: connection closed before a complete answer",
        )
        resetting = self.server(read_and_reset).port
        router = self.router(f"http://127.0.0.1:{resetting}/auth", headers=EXTRA)
        self.assertEqual(
            await self.route_error(router),
            f"auth service http://127.0.0.1:{resetting}/auth: connection lost before a complete answer",
        )

    async def test_invalid_answer_over_the_wire_names_the_service(self) -> None:
        service = self.service(answer(("Auth-Status", "OK"), ("Auth-Port", "143")))
        router = self.router(service.url)
        self.assertEqual(await self.route_error(router), f"auth service {service.url}: answered OK without Auth-Server")

    # Connections.

    async def test_consecutive_requests_share_one_persistent_connection(self) -> None:
        service = self.service(ok(), http11=True)
        router = self.router(service.url)
        for _ in range(5):
            self.assertEqual(await router.route(IMAP), [Route(host="127.0.0.1", port=143)])
        self.assertEqual((len(service.requests), service.connections), (5, 1))
        self.assertEqual(service.ended, 0)
        await router.stopService()
        for _ in range(int(WAIT / 0.01)):
            if service.ended:
                break
            await deferLater(reactor, 0.01)
        self.assertEqual(service.ended, 1)

    async def test_an_http10_service_gets_a_connection_per_request(self) -> None:
        service = self.service(ok())
        router = self.router(service.url)
        for _ in range(3):
            await router.route(IMAP)
        self.assertEqual(service.connections, 3)

    # HTTPS.

    def tls_service(self) -> tuple[AuthService, PKI]:
        pki = PKI(self)
        issued = pki.issue("auth", "127.0.0.1", "localhost")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(issued.cert, issued.key)
        return self.service(ok(), tls=context), pki

    async def test_https_service_verified_against_its_ca(self) -> None:
        service, pki = self.tls_service()
        router = self.router(service.url, ca=pki.ca_file)
        self.assertEqual(await router.route(IMAP), [Route(host="127.0.0.1", port=143)])
        by_name = self.router(f"https://localhost:{service.port}/auth", ca=pki.ca_file)
        self.assertEqual(await by_name.route(IMAP), [Route(host="127.0.0.1", port=143)])

    async def test_https_service_not_trusted_by_the_system(self) -> None:
        service, _ = self.tls_service()
        router = self.router(service.url, headers=EXTRA)
        message = await self.route_error(router)
        self.assertEqual(message, f"auth service {service.url}: TLS: certificate verify failed")
        self.assertEqual(service.requests, [])

    async def test_https_service_whose_certificate_names_another_host(self) -> None:
        pki = PKI(self)
        issued = pki.issue("other", "other.example")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(issued.cert, issued.key)
        service = self.service(ok(), tls=context)
        router = self.router(service.url, ca=pki.ca_file)
        self.assertIn("TLS", await self.route_error(router))
        self.assertEqual(service.requests, [])

    async def test_reload_reads_the_ca_again_and_keeps_the_old_one_when_broken(self) -> None:
        service, pki = self.tls_service()
        ca = pki.path("auth-ca.pem")
        shutil.copy(pki.ca_file, ca)
        router = self.router(service.url, ca=ca)
        self.assertEqual(await router.route(IMAP), [Route(host="127.0.0.1", port=143)])

        with open(ca, "w") as f:
            f.write("truncated\n")
        router.reload()
        logged = [line for line in self.logs.lines() if "TLS trust not reloaded, keeping the previous one" in line]
        self.assertEqual(
            logged,
            [
                f"TLS trust not reloaded, keeping the previous one: router.ca: {ca} holds no PEM certificate:"
                " expected the CA certificates to trust, as PEM text (-----BEGIN CERTIFICATE-----)"
            ],
        )
        self.assertEqual(await router.route(IMAP), [Route(host="127.0.0.1", port=143)])

        pki.write_ca(trustme.CA(), "auth-ca")  # another CA: the service is no longer trusted
        router.reload()
        self.assertEqual(await self.route_error(router), f"auth service {service.url}: TLS: certificate verify failed")

    # End to end, through a splice listener.

    def splice_config(self, url: str) -> dict[str, Any]:
        return {
            "router": {"type": "http", "url": url, "timeout": 2, "headers": {"X-Auth-Key": KEY}},
            "listener": [{"name": "test", "listen": "tcp:0:interface=127.0.0.1", "mode": "splice"}],
        }

    async def client_sees_close(self, port: int) -> bytes:
        def client() -> bytes:
            with connect(port) as conn:
                return recv_all(conn)

        return await self.in_thread(client)

    async def test_splice_listener_routed_by_client_ip(self) -> None:
        upstream = self.server(echo)

        def by_client_ip(seen: Seen) -> Reply:
            if seen.get("Client-IP") == "127.0.0.1" and seen.get("X-Auth-Key") == KEY:
                return ok("127.0.0.1", upstream.port)(seen)
            return 200, [("Auth-Status", "Not from here")], b""

        service = self.service(by_client_ip)
        _, port = await self.start_proxy(self.splice_config(service.url))
        self.assertEqual(await self.in_thread(exchange, port, b"through the auth service"), b"through the auth service")
        line = await self.session_line()
        self.assertEqual((line["outcome"], line["upstream"]), ("closed", f"127.0.0.1:{upstream.port}"))
        self.assertEqual(service.requests[0].get("Auth-Protocol"), "none")

    async def test_splice_listener_refused_by_the_service(self) -> None:
        service = self.service(answer(("Auth-Status", "Not from here")))
        _, port = await self.start_proxy(self.splice_config(service.url))
        self.assertEqual(await self.client_sees_close(port), b"")
        line = await self.session_line()
        self.assertEqual((line["outcome"], line["reason"]), ("rejected", "Not from here"))

    async def test_splice_listener_with_the_service_down(self) -> None:
        url = f"http://127.0.0.1:{closed_port()}/auth"
        _, port = await self.start_proxy(self.splice_config(url))
        self.assertEqual(await self.client_sees_close(port), b"")
        line = await self.session_line()
        self.assertEqual((line["outcome"], line["reason"]), ("router-error", f"auth service {url}: connection refused"))
        self.assertFalse(any(KEY in text for text in self.logs.lines()))


def test_the_router_is_a_service_that_closes_its_connections() -> None:
    from twisted.application.service import IService

    from mailrelay.interfaces import IReloadable
    from mailrelay.router import IRouter

    router = HTTPRouter("http://127.0.0.1:9/auth", reactor=reactor)
    assert IRouter.providedBy(router) and IService.providedBy(router) and IReloadable.providedBy(router)
    assert isinstance(router.stopService(), Deferred)
