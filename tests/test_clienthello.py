"""
`peek_client_hello`: real hellos from Python's ssl module, hellos built here field by
field, every way a stream can be cut or re-framed, and fuzzing that shows nothing but
`MalformedClientHello` ever escapes.
"""

from __future__ import annotations

import functools
import os
import random
import ssl

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailrelay.clienthello import (
    MAX_CLIENT_HELLO,
    NEED_MORE,
    NOT_TLS,
    ClientHello,
    MalformedClientHello,
    NeedMore,
    NotTLS,
    peek_client_hello,
)

# --- building streams -------------------------------------------------------------


def real_hello(
    server_hostname: str | None = "mail.example.org",
    alpn: list[str] | None = None,
    maximum_version: ssl.TLSVersion | None = None,
) -> bytes:
    """The first flight of an OpenSSL client, taken from a memory BIO: no socket involved."""
    ctx = ssl.create_default_context()
    if server_hostname is None:
        ctx.check_hostname = False
    if alpn:
        ctx.set_alpn_protocols(alpn)
    if maximum_version is not None:
        ctx.maximum_version = maximum_version
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    try:
        client.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


@functools.cache
def sample_hello() -> bytes:
    return real_hello("mail.example.org", ["smtp", "imap"])


def handshake_payload(stream: bytes) -> bytes:
    """The concatenated payload of the handshake records `stream` is made of."""
    payload = bytearray()
    while stream:
        assert stream[0] == 0x16
        length = int.from_bytes(stream[3:5], "big")
        payload += stream[5 : 5 + length]
        stream = stream[5 + length :]
    return bytes(payload)


def frame(payload: bytes, size: int, record_type: int = 0x16, version: bytes = b"\x03\x01") -> bytes:
    """`payload` cut into records of `size` bytes (the last may be shorter)."""
    return b"".join(
        bytes([record_type]) + version + len(chunk).to_bytes(2, "big") + chunk
        for chunk in (payload[i : i + size] for i in range(0, len(payload), size))
    )


def vector(length_size: int, content: bytes) -> bytes:
    return len(content).to_bytes(length_size, "big") + content


def extension(kind: int, content: bytes) -> bytes:
    return kind.to_bytes(2, "big") + vector(2, content)


def sni(*names: bytes, name_type: int = 0) -> bytes:
    return extension(0, vector(2, b"".join(bytes([name_type]) + vector(2, name) for name in names)))


def alpn_extension(*names: bytes) -> bytes:
    return extension(16, vector(2, b"".join(vector(1, name) for name in names)))


def hello_body(
    extensions: list[bytes] | None = None,
    *,
    session_id: bytes = b"",
    cipher_suites: bytes = b"\x13\x01\x13\x02",
    compression_methods: bytes = b"\x00",
) -> bytes:
    """A ClientHello body; `extensions=None` ends it right after compression_methods."""
    body = b"\x03\x03" + bytes(32) + vector(1, session_id) + vector(2, cipher_suites) + vector(1, compression_methods)
    if extensions is not None:
        body += vector(2, b"".join(extensions))
    return body


def handshake(body: bytes, message_type: int = 1) -> bytes:
    return bytes([message_type]) + vector(3, body)


def stream_of(body: bytes, record_size: int = 16384) -> bytes:
    return frame(handshake(body), record_size)


def malformed(data: bytes, match: str) -> None:
    with pytest.raises(MalformedClientHello, match=match):
        peek_client_hello(data)


# --- real hellos ------------------------------------------------------------------


def test_real_hello_gives_server_name_and_alpn() -> None:
    assert peek_client_hello(sample_hello()) == ClientHello("mail.example.org", ("smtp", "imap"))


def test_real_hello_without_alpn() -> None:
    assert peek_client_hello(real_hello("mx.example.net")) == ClientHello("mx.example.net", ())


@pytest.mark.parametrize("address", ["192.0.2.25", "2001:db8::25"])
def test_ip_literal_sends_no_server_name(address: str) -> None:
    assert peek_client_hello(real_hello(address, ["smtp"])) == ClientHello(None, ("smtp",))


def test_no_server_hostname_sends_no_server_name() -> None:
    assert peek_client_hello(real_hello(None)) == ClientHello(None, ())


def test_tls12_only_client() -> None:
    hello = real_hello("mail.example.org", ["imap"], maximum_version=ssl.TLSVersion.TLSv1_2)
    assert hello != sample_hello()
    assert peek_client_hello(hello) == ClientHello("mail.example.org", ("imap",))


def test_upper_case_server_name_is_lower_cased() -> None:
    hello = real_hello("MAIL.Example.ORG")
    assert b"MAIL.Example.ORG" in hello  # sent as written: the lower-casing is ours
    assert peek_client_hello(hello) == ClientHello("mail.example.org", ())


def test_internationalised_name_arrives_as_a_label() -> None:
    assert peek_client_hello(real_hello("bücher.example")) == ClientHello("xn--bcher-kva.example", ())


def test_every_strict_prefix_needs_more() -> None:
    hello = sample_hello()
    for length in range(len(hello)):
        assert peek_client_hello(hello[:length]) is NEED_MORE, length


@pytest.mark.parametrize("size", [1, 7, 100])
def test_hello_split_over_records(size: int) -> None:
    stream = frame(handshake_payload(sample_hello()), size)
    assert stream.count(b"\x16\x03\x01") >= len(handshake_payload(sample_hello())) // size
    assert peek_client_hello(stream) == ClientHello("mail.example.org", ("smtp", "imap"))
    for length in range(len(stream)):
        assert peek_client_hello(stream[:length]) is NEED_MORE, length


def test_bytes_after_the_hello_are_ignored() -> None:
    expected = ClientHello("mail.example.org", ("smtp", "imap"))
    # Another record of any kind, garbage, or more bytes in the hello's own last record.
    assert peek_client_hello(sample_hello() + b"\x17\x03\x03\x00\x05hello") == expected
    assert peek_client_hello(sample_hello() + b"\xff" * 100) == expected
    payload = handshake_payload(sample_hello())
    assert peek_client_hello(frame(payload + b"\x0f\x00\x00\x00", 16384)) == expected
    # The hello ends inside a record that has not fully arrived.
    assert peek_client_hello(frame(payload + bytes(50), 16384)[:-10]) == expected


def test_record_versions() -> None:
    payload = handshake_payload(sample_hello())
    for minor in range(5):
        assert isinstance(peek_client_hello(frame(payload, 100, version=bytes([3, minor]))), ClientHello)


# --- not TLS ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "start",
    [
        b"EHLO client.example\r\n",
        b"HELO x\r\n",
        b"a001 CAPABILITY\r\n",
        b"USER alice\r\n",
        b"GET / HTTP/1.1\r\n",
        b"\x00",
        b"\x15\x03\x01\x00\x02\x02\x28",  # a TLS alert record
        b"\x17\x03\x03\x00\x01x",  # application data
        b"\x80\x2e\x01\x00\x02",  # an SSLv2-compatible hello
        b"\xff",
    ],
)
def test_not_tls(start: bytes) -> None:
    assert peek_client_hello(start) is NOT_TLS
    assert peek_client_hello(start[:1]) is NOT_TLS


def test_empty_needs_more() -> None:
    assert peek_client_hello(b"") is NEED_MORE


def test_markers() -> None:
    assert repr(NOT_TLS) == "NOT_TLS" and repr(NEED_MORE) == "NEED_MORE"
    assert isinstance(NOT_TLS, NotTLS) and isinstance(NEED_MORE, NeedMore)


# --- malformed --------------------------------------------------------------------


def test_server_hello_is_not_a_client_hello() -> None:
    malformed(b"\x16\x03\x03\x00\x01\x02", "type 2 is not client_hello")  # known from its first byte
    malformed(frame(handshake(hello_body([]), message_type=2), 100), "type 2 is not client_hello")


def test_record_header_is_judged_as_it_arrives() -> None:
    malformed(b"\x16\x02", "major 2 is not 3")
    malformed(b"\x16\x04\x00", "major 4 is not 3")
    malformed(b"\x16\x03\x05", "minor 5 is above 4")
    malformed(b"\x16\x03\x01\x00\x00", "record length 0")
    malformed(b"\x16\x03\x01\x40\x01", "record length 16385")
    malformed(b"\x16\x03\x01\xff\xff", "record length 65535")
    assert peek_client_hello(b"\x16\x03\x01\x40\x00") is NEED_MORE


@pytest.mark.parametrize("record_type", [0x14, 0x15, 0x17, 0x00, 0x80])
def test_other_record_in_the_middle_of_the_hello(record_type: int) -> None:
    stream = bytearray(frame(handshake_payload(sample_hello()), 100))
    stream[105] = record_type  # the second record
    malformed(bytes(stream), f"record of type {record_type} came before")
    malformed(bytes(stream[:106]), f"record of type {record_type} came before")


def test_overrunning_lengths() -> None:
    whole = hello_body([sni(b"a.example")])
    malformed(stream_of(hello_body([])[:-1]), "extensions length overruns the ClientHello")
    malformed(stream_of(whole[:-1]), "extensions length overruns the ClientHello")
    malformed(stream_of(whole + b"\x00"), "leftover bytes at the end of the ClientHello")
    malformed(stream_of(hello_body([b"\x00\x10\x00\x05ab"])), "extension 16 length overruns the extensions")
    malformed(stream_of(hello_body([b"\x00"])), "extension type overruns the extensions")
    malformed(stream_of(b"\x03\x03" + bytes(32) + b"\x00\x00\x10\x13\x01"), "cipher_suites length overruns the ClientHello")
    malformed(stream_of(b"\x03\x03" + bytes(31)), "random overruns the ClientHello")
    malformed(stream_of(b""), "legacy_version overruns the ClientHello")


def test_leftovers_inside_extensions() -> None:
    entry = b"\x00" + vector(2, b"a.example")
    malformed(stream_of(hello_body([extension(0, vector(2, entry) + b"x")])), "end of the extension 0")
    malformed(stream_of(hello_body([extension(0, vector(2, entry + b"\x00"))])), "server name length overruns the server_name")
    malformed(stream_of(hello_body([extension(0, vector(2, b"\x00\x00\x05abc"))])), "server name length overruns")
    malformed(stream_of(hello_body([extension(16, vector(2, b"\x04smtp") + b"\x00")])), "end of the extension 16")
    malformed(stream_of(hello_body([extension(16, vector(2, b"\x05smtp"))])), "protocol name length overruns")


def test_body_field_limits() -> None:
    malformed(stream_of(hello_body([], session_id=bytes(33))), "session_id is longer than 32")
    malformed(stream_of(hello_body([], cipher_suites=b"")), "cipher_suites length 0")
    malformed(stream_of(hello_body([], cipher_suites=b"\x13\x01\x13")), "cipher_suites length 3")
    malformed(stream_of(hello_body([], compression_methods=b"")), "compression_methods is empty")
    assert peek_client_hello(stream_of(hello_body([], session_id=bytes(32)))) == ClientHello(None, ())


def test_duplicate_extension() -> None:
    malformed(stream_of(hello_body([sni(b"a.example"), sni(b"b.example")])), "extension 0 appears twice")
    malformed(stream_of(hello_body([extension(43, b"\x02\x03\x04"), extension(43, b"")])), "extension 43 appears twice")


@pytest.mark.parametrize(
    "name",
    [b"", b".", b"a..", b"b\xc3\xbccher.example", b"a\x00.example", b"a example", b"tab\t", b"del\x7f", b"\xff"],
)
def test_bad_host_name(name: bytes) -> None:
    malformed(stream_of(hello_body([sni(name)])), "host_name")


def test_trailing_dot_is_stripped() -> None:
    assert peek_client_hello(stream_of(hello_body([sni(b"Mail.Example.ORG.")]))) == ClientHello("mail.example.org", ())


def test_server_name_list_shapes() -> None:
    malformed(stream_of(hello_body([extension(0, b"")])), "server_name_list length overruns")
    malformed(stream_of(hello_body([extension(0, vector(2, b""))])), "server_name_list is empty")
    malformed(stream_of(hello_body([sni(b"a.example", b"b.example")])), "second host_name")
    # A name of another type is skipped, before or after the host name.
    other = b"\x07" + vector(2, b"opaque")
    host = b"\x00" + vector(2, b"a.example")
    around = extension(0, vector(2, other + host + other))
    assert peek_client_hello(stream_of(hello_body([around]))) == ClientHello("a.example", ())
    assert peek_client_hello(stream_of(hello_body([extension(0, vector(2, other))]))) == ClientHello(None, ())


def test_alpn_shapes() -> None:
    malformed(stream_of(hello_body([extension(16, b"")])), "protocol_name_list length overruns")
    malformed(stream_of(hello_body([extension(16, vector(2, b""))])), "protocol_name_list is empty")
    malformed(stream_of(hello_body([alpn_extension(b"smtp", b"")])), "protocol name is empty")
    odd = bytes(range(256))[1:200:3]
    expected = ClientHello(None, (odd.decode("latin-1"), "h2"))
    assert peek_client_hello(stream_of(hello_body([alpn_extension(odd, b"h2")]))) == expected


def test_hello_without_extensions() -> None:
    assert peek_client_hello(stream_of(hello_body(None))) == ClientHello(None, ())
    assert peek_client_hello(stream_of(hello_body([]))) == ClientHello(None, ())


# --- the size limit -----------------------------------------------------------------


def padded_stream(total: int) -> bytes:
    """A hello in full-size records whose stream is exactly `total` bytes long."""
    base = len(handshake(hello_body([sni(b"big.example"), extension(21, b"")])))
    # Each 16384 bytes of handshake message costs one 5-byte record header.
    for padding in range(total - base - 5, 0, -1):
        stream = stream_of(hello_body([sni(b"big.example"), extension(21, bytes(padding))]))
        if len(stream) == total:
            return stream
    raise AssertionError(total)


def test_hello_filling_the_limit_exactly() -> None:
    stream = padded_stream(MAX_CLIENT_HELLO)
    assert peek_client_hello(stream) == ClientHello("big.example", ())
    assert peek_client_hello(stream[:-1]) is NEED_MORE


def test_hello_one_byte_over_the_limit() -> None:
    stream = padded_stream(MAX_CLIENT_HELLO + 1)
    malformed(stream, "does not fit")
    malformed(stream[:9], "does not fit")  # known from the handshake header alone


def test_declared_length_too_big() -> None:
    malformed(b"\x16\x03\x01\x00\x04\x01\xff\xff\xff", "ClientHello length 16777215 does not fit")
    malformed(b"\x16\x03\x01\x00\x01\x01" + frame(b"\x00\x80\x00", 1), "ClientHello length 32768 does not fit")


@pytest.mark.parametrize("record_size", [1, 3])
def test_incomplete_hello_past_the_limit(record_size: int) -> None:
    # Small records cost a header each: this hello fits as declared but never arrives in time.
    # With 1-byte records the limit falls inside a record header, with 3-byte ones between records.
    stream = frame(handshake(hello_body([extension(21, bytes(13000))])), record_size)
    assert len(stream) > MAX_CLIENT_HELLO
    assert peek_client_hello(stream[: MAX_CLIENT_HELLO - 1]) is NEED_MORE
    malformed(stream[:MAX_CLIENT_HELLO], "no complete ClientHello within the first 32768 bytes")
    malformed(stream[: MAX_CLIENT_HELLO + 1], "no complete ClientHello")
    malformed(stream, "no complete ClientHello")


def test_large_data_is_cheap() -> None:
    # A hello of one-byte records is the most work per byte: it still completes quickly.
    stream = frame(handshake(hello_body([sni(b"a.example"), extension(21, bytes(5000))])), 1)
    assert len(stream) < MAX_CLIENT_HELLO
    assert peek_client_hello(stream + os.urandom(100_000)) == ClientHello("a.example", ())


# --- properties -------------------------------------------------------------------

Result = ClientHello | NotTLS | NeedMore | MalformedClientHello


def outcome(data: bytes) -> Result:
    """What `peek_client_hello` answers, failing the test on any exception but MalformedClientHello."""
    try:
        result = peek_client_hello(data)
    except MalformedClientHello as error:
        return error
    assert isinstance(result, ClientHello | NotTLS | NeedMore)
    return result


def same(a: Result, b: Result) -> bool:
    if isinstance(a, MalformedClientHello):
        return isinstance(b, MalformedClientHello) and str(a) == str(b)
    return a == b


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_arbitrary_bytes(data: bytes) -> None:
    outcome(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_arbitrary_bytes_after_a_record_start(data: bytes) -> None:
    outcome(b"\x16\x03\x01" + data)


@st.composite
def mutated_hello(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from([sample_hello(), frame(handshake_payload(sample_hello()), 50)])))
    for _ in range(draw(st.integers(0, 8))):
        action = draw(st.sampled_from(["flip", "replace", "insert", "delete", "truncate", "extend"]))
        position = draw(st.integers(0, max(len(data) - 1, 0)))
        if action == "flip" and data:
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif action == "replace" and data:
            data[position] = draw(st.integers(0, 255))
        elif action == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=4))
        elif action == "delete":
            del data[position : position + draw(st.integers(1, 4))]
        elif action == "truncate":
            del data[position:]
        elif action == "extend":
            data += draw(st.binary(max_size=64))
    return bytes(data)


@settings(max_examples=300, deadline=None)
@given(mutated_hello())
def test_mutated_real_hello(data: bytes) -> None:
    outcome(data)


@settings(max_examples=300, deadline=None)
@given(mutated_hello(), st.data())
def test_verdict_does_not_depend_on_chunking(data: bytes, draw: st.DataObject) -> None:
    """Once a prefix gets an answer other than NEED_MORE, every longer prefix gets the same."""
    cut = draw.draw(st.integers(0, len(data)))
    early = outcome(data[:cut])
    if not isinstance(early, NeedMore):
        assert same(early, outcome(data))


host_names = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z]{2,6}){1,3}", fullmatch=True)
protocol_names = st.binary(min_size=1, max_size=20).map(lambda name: name.decode("latin-1"))
# Extensions we do not read, with types that are neither server_name nor ALPN.
other_extensions = st.dictionaries(st.integers(1, 0xFFFF).filter(lambda kind: kind != 16), st.binary(max_size=40), max_size=5)


@settings(max_examples=300, deadline=None)
@given(
    server_name=st.none() | host_names,
    alpn=st.none() | st.lists(protocol_names, min_size=1, max_size=6),
    others=other_extensions,
    session_id=st.binary(max_size=32),
    cipher_suites=st.lists(st.binary(min_size=2, max_size=2), min_size=1, max_size=40).map(b"".join),
    compression_methods=st.binary(min_size=1, max_size=3),
    order=st.randoms(use_true_random=False),
    record_size=st.integers(1, 16384),
    minor=st.integers(0, 4),
    trailer=st.binary(max_size=20),
)
def test_built_hello_round_trips(
    server_name: str | None,
    alpn: list[str] | None,
    others: dict[int, bytes],
    session_id: bytes,
    cipher_suites: bytes,
    compression_methods: bytes,
    order: random.Random,
    record_size: int,
    minor: int,
    trailer: bytes,
) -> None:
    extensions = [extension(kind, content) for kind, content in others.items()]
    if server_name is not None:
        extensions.append(sni(server_name.encode("ascii")))
    if alpn is not None:
        extensions.append(alpn_extension(*(name.encode("latin-1") for name in alpn)))
    order.shuffle(extensions)
    body = hello_body(extensions, session_id=session_id, cipher_suites=cipher_suites, compression_methods=compression_methods)
    stream = frame(handshake(body), record_size, version=bytes([3, minor]))
    expected = ClientHello(server_name, tuple(alpn or ()))
    assert peek_client_hello(stream) == expected
    assert peek_client_hello(stream + trailer) == expected
    assert peek_client_hello(stream[: len(stream) // 2]) is NEED_MORE
