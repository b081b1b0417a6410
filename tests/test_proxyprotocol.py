"""
`mailrelay.proxyprotocol`: the headers it builds (checked against the spec's bytes and
Twisted's own parsers), every way a header is refused and at which byte, every way a
stream can be cut, and fuzzing that shows nothing but `InvalidProxyHeader` escapes.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser

from mailrelay.proxyprotocol import (
    MAX_V1_LENGTH,
    MAX_V2_LENGTH,
    V2_SIGNATURE,
    InvalidProxyHeader,
    ProxyHeader,
    ProxyHeaderParser,
    crc32c,
    header,
    parse_header,
)

SIG = V2_SIGNATURE


def v2(command: int, family: int, body: bytes, length: int | None = None) -> bytes:
    """A v2 header: `command` byte (0x20 LOCAL, 0x21 PROXY), family/transport byte, body."""
    return SIG + bytes([command, family]) + struct.pack("!H", len(body) if length is None else length) + body


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


V4_BLOCK = bytes([192, 0, 2, 1, 198, 51, 100, 7]) + struct.pack("!HH", 56324, 25)


def refused_at(data: bytes) -> tuple[int, str]:
    """The length of the shortest prefix of `data` that is refused, and why."""
    for n in range(1, len(data) + 1):
        try:
            parse_header(data[:n])
        except InvalidProxyHeader as e:
            return n, e.reason
    raise AssertionError(f"{data!r} was never refused")


# --- building -----------------------------------------------------------------------


def test_v1_tcp4_is_the_spec_example() -> None:
    assert header(1, ("192.0.2.1", 56324), ("198.51.100.7", 25)) == b"PROXY TCP4 192.0.2.1 198.51.100.7 56324 25\r\n"


def test_v1_tcp6() -> None:
    assert header(1, ("2001:db8::1", 56324), ("2001:db8::25", 587)) == b"PROXY TCP6 2001:db8::1 2001:db8::25 56324 587\r\n"


def test_v2_tcp4_bytes() -> None:
    expected = "0d 0a 0d 0a 00 0d 0a 51 55 49 54 0a 21 11 00 0c c0 00 02 01 c6 33 64 07 dc 04 00 19"
    assert header(2, ("192.0.2.1", 56324), ("198.51.100.7", 25)) == bytes.fromhex(expected)


def test_v2_tcp6_bytes() -> None:
    built = header(2, ("2001:db8::1", 56324), ("2001:db8::25", 587))
    src = ipaddress.IPv6Address("2001:db8::1").packed
    dst = ipaddress.IPv6Address("2001:db8::25").packed
    assert built == SIG + bytes.fromhex("21 21 00 24") + src + dst + bytes.fromhex("dc 04 02 4b")


@pytest.mark.parametrize(
    "source, destination",
    [
        (None, ("192.0.2.1", 25)),
        (("192.0.2.1", 1), None),
        (("/run/mailrelay.sock", 0), ("192.0.2.1", 25)),
        (("192.0.2.1", 1), ("mail.example.org", 25)),
        (("192.0.2.1", 1), ("2001:db8::25", 25)),
        (("2001:db8::1", 1), ("::ffff:192.0.2.7", 25)),
    ],
)
def test_unknown_when_not_two_addresses_of_one_family(
    source: tuple[str, int] | None, destination: tuple[str, int] | None
) -> None:
    assert header(1, source, destination) == b"PROXY UNKNOWN\r\n"
    assert header(2, source, destination) == SIG + bytes.fromhex("21 00 00 00")
    assert parse_header(header(2, source, destination)) == ProxyHeader(2, "PROXY", "UNSPEC", None, None)


def test_ipv4_mapped_goes_as_ipv4_beside_ipv4() -> None:
    assert header(1, ("::ffff:192.0.2.1", 56324), ("198.51.100.7", 25)) == b"PROXY TCP4 192.0.2.1 198.51.100.7 56324 25\r\n"
    assert header(2, ("::ffff:192.0.2.1", 1), ("::ffff:198.51.100.7", 2)) == header(2, ("192.0.2.1", 1), ("198.51.100.7", 2))


def test_ipv6_scope_is_dropped() -> None:
    assert header(1, ("fe80::1%eth0", 1), ("fe80::2", 2)) == b"PROXY TCP6 fe80::1 fe80::2 1 2\r\n"


@pytest.mark.parametrize("version, port", [(3, 1), (0, 1), (1, 65536), (2, -1)])
def test_bad_version_or_port_is_a_value_error(version: int, port: int) -> None:
    with pytest.raises(ValueError):
        header(version, ("192.0.2.1", port), ("192.0.2.2", 25))


# --- parsing what is valid ------------------------------------------------------------


def test_v1_tcp4_with_what_follows() -> None:
    parsed = parse_header(b"PROXY TCP4 192.0.2.1 198.51.100.7 56324 25\r\nEHLO x\r\n")
    assert parsed == ProxyHeader(1, "PROXY", "TCP4", ("192.0.2.1", 56324), ("198.51.100.7", 25), (), b"EHLO x\r\n")
    assert parsed.addresses == (("192.0.2.1", 56324), ("198.51.100.7", 25))


def test_v1_tcp6_hosts_come_out_compressed() -> None:
    parsed = parse_header(b"PROXY TCP6 2001:0db8:0:0:0:0:0:0001 ::ffff:192.0.2.1 0 65535\r\n")
    assert parsed is not None
    assert parsed.source == ("2001:db8::1", 0)
    assert parsed.destination == ("::ffff:c000:201", 65535)


@pytest.mark.parametrize("line", [b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN 192.0.2.1 whatever goes here\r\n"])
def test_v1_unknown_ignores_the_rest_of_its_line(line: bytes) -> None:
    assert parse_header(line + b"rest") == ProxyHeader(1, "PROXY", "UNKNOWN", None, None, (), b"rest")


def test_v1_longest_lines() -> None:
    longest_tcp6 = b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n"
    assert len(longest_tcp6) == 104
    assert parse_header(longest_tcp6) is not None
    unknown = b"PROXY UNKNOWN " + b"x" * (MAX_V1_LENGTH - 16) + b"\r\n"
    assert len(unknown) == MAX_V1_LENGTH
    assert parse_header(unknown) is not None


def test_v2_local_discards_its_block() -> None:
    assert parse_header(bytes.fromhex("0d0a0d0a000d0a515549540a20000000")) == ProxyHeader(2, "LOCAL", "UNSPEC", None, None)
    # A LOCAL header's family byte and block are ignored, whatever they hold.
    assert parse_header(v2(0x20, 0xFF, b"\x01\x02\x03") + b"x") == ProxyHeader(2, "LOCAL", "UNSPEC", None, None, (), b"x")


def test_v2_unix_keeps_no_addresses() -> None:
    block = b"/src".ljust(108, b"\0") + b"/dst".ljust(108, b"\0")
    assert parse_header(v2(0x21, 0x31, block)) == ProxyHeader(2, "PROXY", "UNIX", None, None)


def test_v2_tlvs_are_kept() -> None:
    ssl = tlv(0x20, b"\x01" + b"\0\0\0\0" + tlv(0x21, b"TLSv1.3") + tlv(0x22, b"client"))
    tlvs = tlv(0x01, b"imap") + tlv(0x04, b"") + ssl
    parsed = parse_header(v2(0x21, 0x11, V4_BLOCK + tlvs) + b"A1 LOGIN")
    assert parsed is not None
    assert parsed.tlvs == ((0x01, b"imap"), (0x04, b""), (0x20, ssl[3:]))
    assert parsed.source == ("192.0.2.1", 56324)
    assert parsed.rest == b"A1 LOGIN"


def test_crc32c_check_value() -> None:
    assert crc32c(b"123456789") == 0xE3069283


def with_crc(body_before: bytes, body_after: bytes = b"", family: int = 0x11) -> bytes:
    """A v2 header whose CRC32C TLV is right."""
    zeroed = v2(0x21, family, body_before + tlv(0x03, b"\0\0\0\0") + body_after)
    checksum = struct.pack("!I", crc32c(zeroed))
    return v2(0x21, family, body_before + tlv(0x03, checksum) + body_after)


def test_v2_right_crc32c_is_accepted() -> None:
    parsed = parse_header(with_crc(V4_BLOCK + tlv(0x01, b"smtp"), tlv(0x04, b"pad")))
    assert parsed is not None and parsed.source == ("192.0.2.1", 56324)


def test_v2_wrong_crc32c_is_refused() -> None:
    good = with_crc(V4_BLOCK)
    bad = good[:-12] + bytes([good[-12] ^ 1]) + good[-11:]  # a source address byte flipped
    with pytest.raises(InvalidProxyHeader, match="CRC32C does not match"):
        parse_header(bad)


# --- refusals, each at the first byte that decides it ----------------------------------


REFUSALS = [
    (b"G", "starts neither"),
    (b"\x16", "starts neither"),
    (b"PROXy", "starts with"),
    (b"PROXY-", "starts with"),
    (b"PROXY TCP5", "not TCP4, TCP6 or UNKNOWN"),
    (b"PROXY TCP4\r\n", "ends after 0 of 4"),
    (b"PROXY UNKNOWNX", "not TCP4, TCP6 or UNKNOWN"),
    (b"PROXY  ", "not TCP4, TCP6 or UNKNOWN"),
    (b"PROXY TCP4  ", "empty source address part"),
    (b"PROXY TCP4 192.0.2.1  ", "empty destination address part"),
    (b"PROXY TCP4 01", "leading zero"),
    (b"PROXY TCP4 256", "above 255"),
    (b"PROXY TCP4 1.2.3.4.", "more than four parts"),
    (b"PROXY TCP4 1.2.3 ", "not a dotted quad"),
    (b"PROXY TCP4 1..", "empty source address part"),
    (b"PROXY TCP4 :", "not a decimal number"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.4 00", "leading zero"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.4 65536", "above 65535"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 02", "leading zero"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 -", "not a decimal number"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2 ", "more than four fields"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\n", "bare LF"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\rx", "bare CR"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.4 1\r\n", "ends after 3 of 4"),
    (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\r\r", "bare CR"),
    (b"PROXY TCP6  ", "empty source address"),
    (b"PROXY TCP6 2001:db8::1%", "not an IPv6 address"),
    (b"PROXY TCP6 2001:db8:::1 ", "not an IPv6 address"),
    (b"PROXY TCP6 1.2.3.4 ", "not an IPv6 address"),
    (b"PROXY TCP6 " + b"0" * 46, "not an IPv6 address"),
    (b"PROXY TCP4 1:", "not a decimal number"),
    (b"PROXY UNKNOWN\n", "bare LF"),
    (b"PROXY UNKNOWN " + b"x" * (MAX_V1_LENGTH - 14), "no CRLF within the first 107"),
    (SIG[:5] + b"\x01", "v2 signature"),
    (SIG + b"\x11", "version 1"),
    (SIG + b"\x22", "command 2"),
    (SIG + b"\x21\x41", "not defined"),
    (SIG + b"\x21\x10", "not defined"),
    (SIG + b"\x21\x01", "not defined"),
    (SIG + b"\x21\x13", "not defined"),
    (SIG + b"\x21\x12", "datagram"),
    (SIG + b"\x21\x22", "datagram"),
    (SIG + b"\x21\x11\x00\x0b", "shorter than TCP4 needs (12)"),
    (SIG + b"\x21\x21\x00\x23", "shorter than TCP6 needs (36)"),
    (SIG + b"\x21\x31\x00\xd7", "shorter than UNIX needs (216)"),
    (SIG + b"\x20\x00" + struct.pack("!H", MAX_V2_LENGTH - 15), "longer than our cap"),
    (v2(0x21, 0x11, V4_BLOCK + b"\x01\x00"), "stray bytes"),
    (v2(0x21, 0x11, V4_BLOCK + b"\x01\x00\x05abcd"), "overruns"),
    (v2(0x21, 0x11, V4_BLOCK + tlv(0x20, b"\x01\0\0\0")), "SSL TLV of 4 bytes"),
    (v2(0x21, 0x11, V4_BLOCK + tlv(0x20, b"\x01\0\0\0\0\x21\x00\x09TLS")), "SSL sub-TLVs"),
    (v2(0x21, 0x11, V4_BLOCK + tlv(0x03, b"\0\0\0")), "CRC32C TLV must"),
    (v2(0x21, 0x00, tlv(0x03, b"\0\0\0\0") + tlv(0x03, b"\0\0\0\0")), "CRC32C TLV must"),
]


@pytest.mark.parametrize("data, reason", REFUSALS, ids=[repr(d[:40]) for d, _ in REFUSALS])
def test_refused_at_the_deciding_byte(data: bytes, reason: str) -> None:
    n, said = refused_at(data)
    assert (n, reason in said) == (len(data), True), said


def test_refused_whatever_follows() -> None:
    for data, _ in REFUSALS:
        with pytest.raises(InvalidProxyHeader):
            parse_header(data + b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\r\n")


def test_v2_short_address_block_refused_before_it_arrives() -> None:
    """The length field alone decides: no waiting for bytes that cannot help."""
    assert refused_at(SIG + b"\x21\x11\x00\x04abcd")[0] == 16


# --- streams ---------------------------------------------------------------------------


def test_parser_reads_byte_by_byte() -> None:
    data = header(2, ("2001:db8::1", 1), ("2001:db8::2", 2)) + b"* OK"
    parser = ProxyHeaderParser()
    results = [parser.feed(data[i : i + 1]) for i in range(len(data) - 4)]
    assert results[:-1] == [None] * (len(results) - 1)
    assert results[-1] == ProxyHeader(2, "PROXY", "TCP6", ("2001:db8::1", 1), ("2001:db8::2", 2))


def test_parser_reads_one_header_only() -> None:
    parser = ProxyHeaderParser()
    assert parser.feed(b"PROXY UNKNOWN\r\nPROXY UNKNOWN\r\n") == ProxyHeader(
        1, "PROXY", "UNKNOWN", None, None, (), b"PROXY UNKNOWN\r\n"
    )
    with pytest.raises(RuntimeError):
        parser.feed(b"x")


def test_parser_refuses_then_stays_refused() -> None:
    parser = ProxyHeaderParser()
    assert parser.feed(b"PROXY TCP") is None
    with pytest.raises(InvalidProxyHeader):
        parser.feed(b"7")
    with pytest.raises(RuntimeError):
        parser.feed(b"")


ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).filter(lambda a: getattr(a, "ipv4_mapped", None) is None).map(str)
port = st.integers(0, 65535)
pairs = st.one_of(
    st.tuples(st.tuples(ipv4, port), st.tuples(ipv4, port)),
    st.tuples(st.tuples(ipv6, port), st.tuples(ipv6, port)),
)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([1, 2]), pairs, st.binary(max_size=20))
def test_round_trip(version: int, pair: tuple[tuple[str, int], tuple[str, int]], rest: bytes) -> None:
    source, destination = pair
    parsed = parse_header(header(version, source, destination) + rest)
    assert parsed is not None
    assert (parsed.version, parsed.command, parsed.rest) == (version, "PROXY", rest)
    assert parsed.addresses == (source, destination)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([1, 2]), pairs)
def test_twisted_reads_our_headers_alike(version: int, pair: tuple[tuple[str, int], tuple[str, int]]) -> None:
    source, destination = pair
    built = header(version, source, destination)
    info, rest = (V1Parser() if version == 1 else V2Parser()).feed(built + b"after")
    assert info is not None and rest == b"after"
    addresses: list[Any] = [info.source, info.destination]
    theirs = [(str(ipaddress.ip_address(a.host)), a.port) for a in addresses]
    parsed = parse_header(built)
    assert parsed is not None
    assert [parsed.source, parsed.destination] == theirs


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([1, 2]), pairs, st.data())
def test_any_chunking_gives_the_same_header(
    version: int, pair: tuple[tuple[str, int], tuple[str, int]], data: st.DataObject
) -> None:
    built = header(version, *pair)
    stream = built + b"after"
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    parser = ProxyHeaderParser()
    result = None
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        result = parser.feed(stream[start:end])
        if result is not None:
            break
    assert result is not None
    assert result.addresses == pair
    assert result.rest == stream[len(built) : end]  # what came with the header's last piece


@settings(max_examples=500, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=300),
        st.binary(max_size=300).map(lambda b: b"PROXY " + b),
        st.binary(max_size=300).map(lambda b: SIG + b),
    )
)
def test_only_invalid_proxy_header_escapes_and_the_verdict_only_moves_forward(data: bytes) -> None:
    verdicts: list[ProxyHeader | None | str] = []
    for n in range(len(data) + 1):
        try:
            verdicts.append(parse_header(data[:n]))
        except InvalidProxyHeader:
            verdicts.append("invalid")
    decided = next((i for i, v in enumerate(verdicts) if v is not None), None)
    if decided is not None:
        first = verdicts[decided]
        for later in verdicts[decided:]:
            if first == "invalid":
                assert later == "invalid"
            else:
                assert isinstance(first, ProxyHeader) and isinstance(later, ProxyHeader)
                assert attrs_without_rest(later) == attrs_without_rest(first)


def attrs_without_rest(parsed: ProxyHeader) -> tuple[object, ...]:
    return (parsed.version, parsed.command, parsed.family, parsed.source, parsed.destination, parsed.tlvs)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([1, 2]), pairs, st.data())
def test_mutated_headers_never_crash(version: int, pair: tuple[tuple[str, int], tuple[str, int]], data: st.DataObject) -> None:
    stream = bytearray(header(version, *pair))
    for _ in range(data.draw(st.integers(1, 3))):
        stream[data.draw(st.integers(0, len(stream) - 1))] = data.draw(st.integers(0, 255))
    try:
        parsed = parse_header(bytes(stream))
    except InvalidProxyHeader:
        return
    if parsed is not None and parsed.source is not None:
        ipaddress.ip_address(parsed.source[0])
        assert 0 <= parsed.source[1] <= 65535


def test_need_more_is_bounded() -> None:
    assert parse_header(b"PROXY UNKNOWN " + b"x" * (MAX_V1_LENGTH - 15)) is None
    with pytest.raises(InvalidProxyHeader):
        parse_header(b"PROXY UNKNOWN " + b"x" * (MAX_V1_LENGTH - 14))
    assert parse_header(v2(0x20, 0, b"", MAX_V2_LENGTH - 16) + b"x" * (MAX_V2_LENGTH - 17)) is None
    assert parse_header(v2(0x20, 0, b"", MAX_V2_LENGTH - 16) + b"x" * (MAX_V2_LENGTH - 16)) is not None
