"""The pure pieces of SMTP towards the upstream: xtext, XCLIENT commands, EHLO parsing."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mailrelay.core.smtp_login import XCLIENT_MAX, Reply, _xclient_address, _xclient_commands, extensions, xtext


def unxtext(value: bytes) -> bytes:
    out, i = b"", 0
    while i < len(value):
        if value[i : i + 1] == b"+":
            out += bytes([int(value[i + 1 : i + 3], 16)])
            i += 3
        else:
            out += value[i : i + 1]
            i += 1
    return out


def test_xtext_is_rfc_3461() -> None:
    assert xtext(b"a b=c") == b"a+20b+3Dc"
    assert xtext(b"alice+tag@example.org") == b"alice+2Btag@example.org"
    assert xtext("é".encode()) == b"+C3+A9"


@given(st.binary())
def test_xtext_round_trips_and_is_printable_without_separators(value: bytes) -> None:
    encoded = xtext(value)
    assert unxtext(encoded) == value
    assert all(0x21 <= c <= 0x7E for c in encoded) and b"=" not in encoded


def test_xclient_addresses() -> None:
    assert _xclient_address("192.0.2.7") == b"192.0.2.7"
    assert _xclient_address("2001:db8::1") == b"IPV6:2001:db8::1"
    assert _xclient_address("/run/mailrelay.sock") == b"[UNAVAILABLE]"


def test_xclient_commands_stay_within_512_bytes_and_keep_every_attribute() -> None:
    attributes = [("ADDR", b"192.0.2.7"), ("NAME", b"x" * 255), ("HELO", b"h" * 255), ("LOGIN", b"l" * 200)]
    commands = _xclient_commands(attributes)
    assert len(commands) == 2  # ADDR NAME, then HELO LOGIN
    assert all(len(c) + 2 <= XCLIENT_MAX and c.startswith(b"XCLIENT ") for c in commands)
    assert b" ".join(c[len(b"XCLIENT ") :] for c in commands) == b" ".join(n.encode() + b"=" + v for n, v in attributes)
    assert _xclient_commands([("ADDR", b"192.0.2.7"), ("PORT", b"4711")]) == [b"XCLIENT ADDR=192.0.2.7 PORT=4711"]


def test_ehlo_extensions() -> None:
    ehlo = Reply(250, (b"mx.example", b"PIPELINING", b"auth PLAIN LOGIN", b"XCLIENT NAME ADDR"))
    assert extensions(ehlo) == {"PIPELINING": (), "AUTH": ("PLAIN", "LOGIN"), "XCLIENT": ("NAME", "ADDR")}
