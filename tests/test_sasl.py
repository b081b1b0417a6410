"""
SASL (`mailrelay.sasl`): the mechanisms clients authenticate to mailrelay with (PLAIN,
LOGIN, CRAM-MD5, XOAUTH2, OAUTHBEARER, EXTERNAL) driven through `Exchange`, the base64
framing (`decode`, cancellation, the length limit), and the responses mailrelay sends
upstream (`plain_response`, `xoauth2_response`, `oauthbearer_response`), which must read
back through the matching client-side mechanism. Property tests also feed arbitrary
bytes to every mechanism: it answers, or it raises SASLSyntaxError / SASLRefused.
"""

from __future__ import annotations

import re

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailrelay.router import ClientCertificate
from mailrelay.sasl import (
    MAX_RESPONSE,
    MECHANISMS,
    Context,
    Credentials,
    Exchange,
    SASLCancelled,
    SASLRefused,
    SASLSyntaxError,
    decode,
    encode,
    oauthbearer_response,
    plain_response,
    xoauth2_response,
)

NOW = 1700000000.75
CONTEXT = Context(hostname="relay.example.net", now=lambda: NOW)
CERT = ClientCertificate(subject="CN=alice,O=Example", issuer="CN=Example CA", serial="1A2B", fingerprint="ab" * 20)
CERT_CONTEXT = Context(hostname="relay.example.net", client_cert=CERT, now=lambda: NOW)

RFC7628_EXAMPLE = (
    b"n,a=user@example.com,\x01host=server.example.com\x01port=143\x01"
    b"auth=Bearer vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==\x01\x01"
)


def authenticate(mechanism: str, *responses: bytes, initial: bytes | None = None, context: Context = CONTEXT) -> Credentials:
    """Run an exchange to its end: `initial` and `responses` are raw (encoded here)."""
    exchange = Exchange(mechanism, None if initial is None else encode(initial) or b"=", context)
    step = exchange.start()
    for response in responses:
        assert isinstance(step, bytes), f"credentials before all responses were sent: {step!r}"
        step = exchange.respond(encode(response))
    assert isinstance(step, Credentials), f"exchange still asks {step!r}"
    return step


def started(mechanism: str, context: Context = CONTEXT) -> Exchange:
    exchange = Exchange(mechanism, None, context)
    exchange.start()
    return exchange


# -- PLAIN ------------------------------------------------------------------------------


def test_plain_without_initial_response_sends_an_empty_challenge() -> None:
    exchange = Exchange("plain", None, CONTEXT)
    assert exchange.start() == b""
    assert exchange.respond(encode(b"\0alice\0secret")) == Credentials(user="alice", password="secret", method="plain")


def test_plain_initial_response_authenticates_at_once() -> None:
    credentials = Exchange("plain", encode(b"\0alice\0secret"), CONTEXT).start()
    assert credentials == Credentials(user="alice", password="secret", method="plain")


def test_plain_empty_initial_response_is_malformed() -> None:
    with pytest.raises(SASLSyntaxError):
        Exchange("plain", b"=", CONTEXT).start()


def test_plain_authzid_equal_to_the_user_is_accepted() -> None:
    assert authenticate("plain", initial=b"alice\0alice\0secret").user == "alice"


def test_plain_other_authzid_is_a_failed_login_not_a_syntax_error() -> None:
    # Well formed: the front-ends answer NO / -ERR / 535 (a failed login), not BAD / 501.
    with pytest.raises(SASLRefused, match="authorization identity") as raised:
        authenticate("plain", initial=b"bob\0alice\0secret")
    assert not isinstance(raised.value, SASLSyntaxError)


def test_plain_empty_user_is_refused() -> None:
    with pytest.raises(SASLSyntaxError, match="empty user"):
        authenticate("plain", initial=b"\0\0secret")


@pytest.mark.parametrize("response", [b"alice\0secret", b"alicesecret", b"\0alice\0secret\0", b"\0\0alice\0secret"])
def test_plain_wrong_number_of_nuls_is_refused(response: bytes) -> None:
    with pytest.raises(SASLSyntaxError):
        authenticate("plain", initial=response)


def test_plain_invalid_utf8_is_refused() -> None:
    with pytest.raises(SASLSyntaxError, match="UTF-8"):
        authenticate("plain", initial=b"\0alice\0caf\xe9")


def test_plain_password_with_spaces_and_non_ascii_is_kept_exactly() -> None:
    password = " pass wörd ✓ 密码 "
    assert authenticate("plain", initial=b"\0alice\0" + password.encode()).password == password


# -- LOGIN ------------------------------------------------------------------------------


def test_login_asks_username_then_password() -> None:
    exchange = Exchange("login", None, CONTEXT)
    assert exchange.start() == b"Username:"
    assert exchange.respond(encode(b"alice")) == b"Password:"
    assert exchange.respond(encode(b"secret")) == Credentials(user="alice", password="secret", method="login")


def test_login_initial_response_is_the_user_name() -> None:
    exchange = Exchange("login", encode(b"alice"), CONTEXT)
    assert exchange.start() == b"Password:"
    assert exchange.respond(encode(b"secret")) == Credentials(user="alice", password="secret", method="login")


def test_login_empty_user_is_refused() -> None:
    exchange = started("login")
    with pytest.raises(SASLSyntaxError, match="empty user"):
        exchange.respond(b"=")


def test_login_empty_initial_response_is_an_empty_user() -> None:
    # Not a missing initial response: asking "Username:" would take the client's next
    # line (its password) for the user name.
    with pytest.raises(SASLSyntaxError, match="empty user"):
        Exchange("login", b"=", CONTEXT).start()


# -- CRAM-MD5 ---------------------------------------------------------------------------

CHALLENGE = re.compile(r"<(\d+)\.(\d+)@(.+)>")


def test_cram_md5_challenge_has_digits_unixtime_and_hostname() -> None:
    challenge = Exchange("cram-md5", None, CONTEXT).start()
    assert isinstance(challenge, bytes)
    match = CHALLENGE.fullmatch(challenge.decode())
    assert match is not None, challenge
    assert match[2] == str(int(NOW))
    assert match[3] == "relay.example.net"


def test_cram_md5_challenges_differ_between_exchanges() -> None:
    assert Exchange("cram-md5", None, CONTEXT).start() != Exchange("cram-md5", None, CONTEXT).start()


def test_cram_md5_response_gives_user_lowercased_digest_and_challenge_as_salt() -> None:
    exchange = Exchange("cram-md5", None, CONTEXT)
    challenge = exchange.start()
    assert isinstance(challenge, bytes)
    credentials = exchange.respond(encode(b"alice " + b"0123456789ABCDEF" * 2))
    assert credentials == Credentials(user="alice", password="0123456789abcdef" * 2, method="cram-md5", salt=challenge.decode())


def test_cram_md5_initial_response_is_refused() -> None:
    with pytest.raises(SASLSyntaxError, match="no initial response"):
        Exchange("cram-md5", encode(b"alice " + b"0" * 32), CONTEXT).start()


@pytest.mark.parametrize(
    "response",
    [b"alice " + b"g" * 32, b"alice " + b"0" * 31, b"alice " + b"0" * 33, b"alice" + b"0" * 32, b" " + b"0" * 32, b"0" * 32],
)
def test_cram_md5_malformed_digest_is_refused(response: bytes) -> None:
    with pytest.raises(SASLSyntaxError):
        started("cram-md5").respond(encode(response))


def test_cram_md5_digest_is_after_the_last_space() -> None:
    credentials = started("cram-md5").respond(encode(b"alice smith " + b"f" * 32))
    assert isinstance(credentials, Credentials)
    assert isinstance(credentials, Credentials)
    assert (credentials.user, credentials.password) == ("alice smith", "f" * 32)


# -- XOAUTH2 ----------------------------------------------------------------------------


def test_xoauth2_gives_user_and_token() -> None:
    credentials = authenticate("xoauth2", initial=b"user=alice@example.com\x01auth=Bearer ya29.token\x01\x01")
    assert credentials == Credentials(user="alice@example.com", password="ya29.token", method="xoauth2")


def test_xoauth2_without_initial_response_sends_an_empty_challenge() -> None:
    assert Exchange("xoauth2", None, CONTEXT).start() == b""


@pytest.mark.parametrize(
    "response",
    [
        pytest.param(b"auth=Bearer token\x01\x01", id="no user"),
        pytest.param(b"user=\x01auth=Bearer token\x01\x01", id="empty user"),
        pytest.param(b"user=alice\x01\x01", id="no auth"),
        pytest.param(b"user=alice\x01auth=Basic token\x01\x01", id="not Bearer"),
        pytest.param(b"user=alice\x01auth=Bearer \x01\x01", id="empty token"),
        pytest.param(b"user=alice\x01auth=Bearer token\x01", id="one ^A at the end"),
        pytest.param(b"user=alice\x01auth=Bearer token", id="no ^A at the end"),
        pytest.param(b"user=alice\x01nonsense\x01auth=Bearer token\x01\x01", id="field without ="),
    ],
)
def test_xoauth2_malformed_response_is_refused(response: bytes) -> None:
    with pytest.raises(SASLSyntaxError):
        authenticate("xoauth2", initial=response)


# -- OAUTHBEARER ------------------------------------------------------------------------


def test_oauthbearer_rfc7628_example_gives_user_and_token() -> None:
    credentials = authenticate("oauthbearer", initial=RFC7628_EXAMPLE)
    assert credentials == Credentials(
        user="user@example.com", password="vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==", method="oauthbearer"
    )


def test_oauthbearer_without_authzid_gives_no_user() -> None:
    credentials = authenticate("oauthbearer", initial=b"n,,\x01auth=Bearer token\x01\x01")
    assert isinstance(credentials, Credentials)
    assert (credentials.user, credentials.password) == (None, "token")


def test_oauthbearer_authzid_escapes_are_undone() -> None:
    credentials = authenticate("oauthbearer", initial=b"n,a=a=2Cb=3Dc,\x01auth=Bearer token\x01\x01")
    assert credentials.user == "a,b=c"


def test_oauthbearer_channel_binding_is_refused() -> None:
    with pytest.raises(SASLSyntaxError, match="channel binding"):
        authenticate("oauthbearer", initial=b"p=tls-unique,a=alice,\x01auth=Bearer token\x01\x01")


@pytest.mark.parametrize(
    "response",
    [
        pytest.param(b"\x01auth=Bearer token\x01\x01", id="no GS2 header"),
        pytest.param(b"a=alice,\x01auth=Bearer token\x01\x01", id="no GS2 flag"),
        pytest.param(b"n,a=alice,auth=Bearer token\x01\x01", id="no ^A after the GS2 header"),
        pytest.param(b"n,a=alice,\x01host=x\x01\x01", id="no auth"),
        pytest.param(b"n,a=alice,\x01auth=Bearer token\x01", id="one ^A at the end"),
    ],
)
def test_oauthbearer_malformed_response_is_refused(response: bytes) -> None:
    with pytest.raises(SASLSyntaxError):
        authenticate("oauthbearer", initial=response)


# -- EXTERNAL ---------------------------------------------------------------------------


def test_external_without_client_certificate_is_refused() -> None:
    with pytest.raises(SASLRefused):
        Exchange("external", b"=", CONTEXT).start()


def test_external_empty_response_authenticates_the_certificate_subject() -> None:
    assert authenticate("external", b"", context=CERT_CONTEXT) == Credentials(user="CN=alice,O=Example", method="external")


def test_external_authzid_equal_to_the_certificate_subject_is_accepted() -> None:
    credentials = authenticate("external", initial=b"CN=alice,O=Example", context=CERT_CONTEXT)
    assert credentials == Credentials(user="CN=alice,O=Example", method="external")


@pytest.mark.parametrize(
    "authzid",
    [b"alice", b"bob@example.test", b"CN=bob,O=Example", b"cn=alice,o=example", b"CN=alice,O=Example "],
)
def test_external_cannot_pick_its_user(authzid: bytes) -> None:
    """A certificate proves its subject and nothing else: naming anyone else (even the
    same name spelt otherwise) is a failed login, never a login as them."""
    with pytest.raises(SASLRefused, match="certificate does not authorize"):
        authenticate("external", initial=authzid, context=CERT_CONTEXT)
    with pytest.raises(SASLRefused):
        authenticate("external", authzid, context=CERT_CONTEXT)  # as the answer to the empty challenge


def test_external_user_is_the_subject_even_with_control_characters_but_no_line_break() -> None:
    odd = ClientCertificate(subject="CN=eve\x1b[2J\x07,O=X", issuer="CN=CA", serial="1", fingerprint="cd" * 20)
    context = Context(hostname="relay.example.net", client_cert=odd)
    assert authenticate("external", initial=b"", context=context).user == odd.subject
    for bad in ("\r", "\n", "\0"):
        # It would be the upstream login's user: `USER CN=eve<CRLF>DELE 1` to a POP3 upstream.
        broken = attrs.evolve(odd, subject=f"CN=eve{bad}DELE 1,O=X")
        with pytest.raises(SASLRefused, match="line break or NUL"):
            authenticate("external", initial=b"", context=attrs.evolve(context, client_cert=broken))


# -- framing ----------------------------------------------------------------------------


@pytest.mark.parametrize("line", [b"*", b" * ", b"*\r\n"])
def test_star_cancels_the_exchange(line: bytes) -> None:
    with pytest.raises(SASLCancelled):
        started("login").respond(line)


def test_cancellation_is_a_syntax_error() -> None:
    assert issubclass(SASLCancelled, SASLSyntaxError)


@pytest.mark.parametrize("line", [b"not*base64", b"YWxpY2U", b"YWxpY2U===", b"YW xp", b"\xff\xfe"])
def test_invalid_base64_is_a_syntax_error(line: bytes) -> None:
    with pytest.raises(SASLSyntaxError, match="base64"):
        started("login").respond(line)


def test_decode_ignores_surrounding_spaces_and_tabs() -> None:
    assert decode(b" \tYWxpY2U= \t") == b"alice"


def test_decode_reads_a_lone_equals_as_empty() -> None:
    assert decode(b"=") == b"" and decode(b" = ") == b""


def test_decode_accepts_the_longest_response() -> None:
    assert decode(encode(b"x" * MAX_RESPONSE)) == b"x" * MAX_RESPONSE


@pytest.mark.parametrize("length", [MAX_RESPONSE + 1, MAX_RESPONSE + 2, MAX_RESPONSE + 3, 4 * MAX_RESPONSE])
def test_decode_refuses_an_over_long_response(length: int) -> None:
    with pytest.raises(SASLSyntaxError, match="too long"):
        decode(encode(b"x" * length))


def test_over_long_response_is_refused_by_the_exchange() -> None:
    with pytest.raises(SASLSyntaxError, match="too long"):
        started("xoauth2").respond(encode(b"x" * (MAX_RESPONSE + 1)))


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_every_advertised_mechanism_starts(mechanism: str) -> None:
    assert isinstance(Exchange(mechanism, None, CERT_CONTEXT).start(), bytes)


# -- round trips: what mailrelay sends upstream reads back -----------------------------
# Each response is sent as an initial response, so `Exchange.start` decodes the base64
# and hands the bytes to the mechanism: decode(encode(response)) through the mechanism.

# Text that survives the client side's checks: no NUL, CR or LF, and no lone surrogates;
# user names have no control characters at all.
TEXT_CHARACTERS = st.characters(codec="utf-8", exclude_characters="\0\r\n")
USER_CHARACTERS = st.characters(codec="utf-8", exclude_categories=("Cc", "Cs"))
USERS = st.text(USER_CHARACTERS, min_size=1)
PASSWORDS = st.text(TEXT_CHARACTERS)
# Users for OAUTHBEARER, with the characters its authzid escapes made common.
ESCAPED_USERS = st.text(st.one_of(st.sampled_from(",=23CD"), USER_CHARACTERS), min_size=1)
XOAUTH2_USERS = USERS
# RFC 6750 b64token: 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
TOKENS = st.from_regex(r"[A-Za-z0-9\-._~+/]+=*", fullmatch=True)


@given(user=USERS, password=PASSWORDS)
def test_plain_response_round_trips(user: str, password: str) -> None:
    credentials = Exchange("plain", encode(plain_response(user, password)), CONTEXT).start()
    assert isinstance(credentials, Credentials)
    assert (credentials.user, credentials.password) == (user, password)


@given(user=XOAUTH2_USERS, token=TOKENS)
def test_xoauth2_response_round_trips(user: str, token: str) -> None:
    credentials = Exchange("xoauth2", encode(xoauth2_response(user, token)), CONTEXT).start()
    assert isinstance(credentials, Credentials)
    assert (credentials.user, credentials.password) == (user, token)


def test_xoauth2_response_user_cannot_inject_fields() -> None:
    user = "alice\x01user=bob"
    try:
        credentials = Exchange("xoauth2", encode(xoauth2_response(user, "token")), CONTEXT).start()
    except (ValueError, SASLSyntaxError):
        return  # refusing such a user is fine too
    assert isinstance(credentials, Credentials)
    assert credentials.user == user


@given(user=ESCAPED_USERS, token=TOKENS)
def test_oauthbearer_response_round_trips(user: str, token: str) -> None:
    credentials = Exchange("oauthbearer", encode(oauthbearer_response(user, token)), CONTEXT).start()
    assert isinstance(credentials, Credentials)
    assert (credentials.user, credentials.password) == (user, token)


@given(token=TOKENS)
def test_oauthbearer_response_without_user_round_trips(token: str) -> None:
    credentials = Exchange("oauthbearer", encode(oauthbearer_response(None, token)), CONTEXT).start()
    assert isinstance(credentials, Credentials)
    assert (credentials.user, credentials.password) == (None, token)


# -- fuzzing: any input is answered or refused, never crashes ---------------------------


def run_exchange(mechanism: str, initial: bytes | None, lines: list[bytes]) -> None:
    """Drive an exchange with arbitrary input, allowing only the documented failures."""
    exchange = Exchange(mechanism, initial, CERT_CONTEXT)
    try:
        step = exchange.start()
        for line in lines:
            if isinstance(step, Credentials):
                return
            assert isinstance(step, bytes)
            step = exchange.respond(line)
        assert isinstance(step, (bytes, Credentials))
    except (SASLSyntaxError, SASLRefused):
        pass


@pytest.mark.parametrize("mechanism", MECHANISMS)
@given(lines=st.lists(st.binary(), min_size=1, max_size=3))
def test_any_line_is_answered_or_refused(mechanism: str, lines: list[bytes]) -> None:
    run_exchange(mechanism, None, lines)


@pytest.mark.parametrize("mechanism", MECHANISMS)
@given(responses=st.lists(st.binary(), min_size=1, max_size=3))
def test_any_decoded_response_is_answered_or_refused(mechanism: str, responses: list[bytes]) -> None:
    run_exchange(mechanism, None, [encode(response) for response in responses])


@pytest.mark.parametrize("mechanism", MECHANISMS)
@given(initial=st.binary(), responses=st.lists(st.binary(), max_size=2))
def test_any_initial_response_is_answered_or_refused(mechanism: str, initial: bytes, responses: list[bytes]) -> None:
    run_exchange(mechanism, encode(initial) or b"=", [encode(response) for response in responses])
