"""
The HAProxy PROXY protocol, versions 1 (text) and 2 (binary), without I/O: build the
header a balancer sends before a connection's first byte (`header`), and read one
(`parse_header`, or `ProxyHeaderParser` for a stream that arrives in pieces).

Spec: https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt (section numbers
below are its).

What a caller may rely on:
- `parse_header(data)` is a pure function of `data` and its verdict only moves
  forward: once a prefix of a stream gives a `ProxyHeader` or raises
  `InvalidProxyHeader`, every longer prefix gives the same (the same header, with more
  `rest`), so chunking does not matter;
- junk is refused early: a byte that cannot start or continue any valid header raises
  at once, not when a length limit runs out (the one approximation: an IPv6 address
  in a v1 line is judged by its characters while it is being received, and whole
  when the space after it arrives);
- buffering is bounded: `None` ("need more") is never answered for `MAX_V1_LENGTH`
  bytes of a v1 line or `MAX_V2_LENGTH` bytes of a v2 header;
- the only exception it raises is `InvalidProxyHeader`, whatever the input;
- nothing here imports Twisted (the layer test checks).
"""

from __future__ import annotations

import ipaddress
import struct

import attrs

Address = tuple[str, int]
"""As `mailrelay.router.Address`: (host, port); a UNIX socket is (path, 0)."""

MAX_V1_LENGTH = 107
"""A v1 line is at most 107 bytes with its CRLF (section 2.1)."""

MAX_V2_LENGTH = 4096
"""Our cap on a whole v2 header (16 fixed bytes + address block + TLVs). The wire
format allows 16 + 65535; real balancers send a few hundred bytes at most (the spec
asks senders to stay under 536), and a cap keeps an attacker from making us buffer
64 KiB per connection."""

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "

_V2_FIXED = 16
_V1_MAX_TOKENS = 5  # protocol, source, destination, source port, destination port

# v2 byte 13: address family (high nibble) and transport (low nibble), section 2.2.
_AF_UNSPEC, _AF_INET, _AF_INET6, _AF_UNIX = 0, 1, 2, 3
_STREAM, _DGRAM = 1, 2
_FAMILY_NAMES = {_AF_UNSPEC: "UNSPEC", _AF_INET: "TCP4", _AF_INET6: "TCP6", _AF_UNIX: "UNIX"}
_ADDRESS_BLOCK = {_AF_UNSPEC: 0, _AF_INET: 12, _AF_INET6: 36, _AF_UNIX: 216}

PP2_TYPE_CRC32C = 0x03
PP2_TYPE_SSL = 0x20
_SSL_FIXED = 5  # client bitfield (1) + verify (4), then sub-TLVs


class InvalidProxyHeader(ValueError):
    """The bytes are not (the start of) a valid PROXY header; `reason` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@attrs.frozen
class ProxyHeader:
    """
    A complete PROXY header.

    `command` is "PROXY" (a relayed connection) or "LOCAL" (v2 only: the balancer's own
    connection, a health check). `family` is "TCP4", "TCP6", "UNKNOWN" (v1) or "UNIX",
    "UNSPEC" (v2; a LOCAL header always says "UNSPEC": its address block is ignored).
    `source` and `destination` are the client and the address it connected to, both
    None unless the family is TCP4 or TCP6 and the command PROXY: a receiver then uses
    the real connection's addresses (sections 2.1 and 2.2). IPv6 hosts are in
    compressed form. `tlvs` are the v2 TLVs as (type, value), checked for form and
    otherwise not interpreted. `rest` is what followed the header in the same bytes.
    """

    version: int
    command: str
    family: str
    source: Address | None
    destination: Address | None
    tlvs: tuple[tuple[int, bytes], ...] = ()
    rest: bytes = b""

    @property
    def addresses(self) -> tuple[Address, Address] | None:
        """(source, destination) when the header names both, else None."""
        if self.source is None or self.destination is None:
            return None
        return self.source, self.destination


# ---------------------------------------------------------------------------------------
# Building


def header(version: int, source: Address | None, destination: Address | None) -> bytes:
    """
    The PROXY header (version 1 or 2) announcing a connection from `source` to
    `destination`. When either is not an IP address (a UNIX socket, unknown: None), or
    the two are of different families, v1 says "PROXY UNKNOWN\\r\\n" and v2 sends command
    PROXY with family AF_UNSPEC and no addresses. IPv4-mapped IPv6 addresses go as IPv4
    when the other side is IPv4 too. An IPv6 scope (`%eth0`) is dropped: it means
    nothing to the receiver. A port outside 0..65535 or a version other than 1 or 2 is
    a ValueError.
    """
    if version not in (1, 2):
        raise ValueError(f"PROXY protocol version must be 1 or 2, not {version!r}")
    pair = _ip_pair(source, destination)
    if version == 1:
        if pair is None:
            return b"PROXY UNKNOWN\r\n"
        (src, sport), (dst, dport) = pair
        family = "TCP4" if src.version == 4 else "TCP6"
        return f"PROXY {family} {src} {dst} {sport} {dport}\r\n".encode("ascii")
    if pair is None:
        return V2_SIGNATURE + bytes([0x21, 0x00]) + b"\x00\x00"
    (src, sport), (dst, dport) = pair
    address_family = _AF_INET if src.version == 4 else _AF_INET6
    block = src.packed + dst.packed + struct.pack("!HH", sport, dport)
    return V2_SIGNATURE + bytes([0x21, address_family << 4 | _STREAM]) + struct.pack("!H", len(block)) + block


_IP = ipaddress.IPv4Address | ipaddress.IPv6Address


def _ip_pair(source: Address | None, destination: Address | None) -> tuple[tuple[_IP, int], tuple[_IP, int]] | None:
    if source is None or destination is None:
        return None
    src, dst = _ip(source[0]), _ip(destination[0])
    for _, port in (source, destination):
        if not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"port {port!r} is not within 0..65535")
    if src is None or dst is None:
        return None
    if src.version != dst.version:
        return None
    return (src, source[1]), (dst, destination[1])


def _ip(host: str) -> _IP | None:
    """`host` as an IP address (an IPv4-mapped IPv6 one as IPv4), or None if it is not one."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


# ---------------------------------------------------------------------------------------
# Parsing


class ProxyHeaderParser:
    """
    Reads one PROXY header from a stream that arrives in pieces. `feed(data)` answers
    None while more bytes are needed, the `ProxyHeader` (with everything after the
    header in `rest`) once it is complete, and raises `InvalidProxyHeader` as soon as
    the bytes so far cannot be a valid header. A parser reads one header: feeding it
    after it answered or raised is a RuntimeError.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._done = False

    def feed(self, data: bytes) -> ProxyHeader | None:
        if self._done:
            raise RuntimeError("this parser already read its header")
        self._buffer += data
        try:
            result = parse_header(self._buffer)
        except InvalidProxyHeader:
            self._done = True
            self._buffer = b""
            raise
        if result is not None:
            self._done = True
            self._buffer = b""
        return result


def parse_header(data: bytes) -> ProxyHeader | None:
    """
    The PROXY header at the start of `data`, None if `data` is a proper prefix of one
    (more bytes needed), or InvalidProxyHeader if no header starts with `data`.
    """
    data = bytes(data)
    if not data:
        return None
    if data[0] == V1_PREFIX[0]:
        return _parse_v1(data)
    if data[0] == V2_SIGNATURE[0]:
        return _parse_v2(data)
    raise InvalidProxyHeader(f"first byte {data[:1]!r} starts neither a v1 nor a v2 header")


# --- version 1 (section 2.1)


def _parse_v1(data: bytes) -> ProxyHeader | None:
    end = data.find(b"\r\n", 0, MAX_V1_LENGTH)
    line = data[:end] if end >= 0 else data[:MAX_V1_LENGTH]
    if not line.startswith(V1_PREFIX[: len(line)]):
        raise InvalidProxyHeader(f"a v1 header starts with {V1_PREFIX!r}, not {line[: len(V1_PREFIX)]!r}")
    # A CR or LF inside the line, other than the final CRLF, is invalid; a CR as the
    # very last byte received so far may be the start of the CRLF.
    body = line if end >= 0 or not line.endswith(b"\r") else line[:-1]
    for byte, name in ((b"\r", "CR"), (b"\n", "LF")):
        if byte in body:
            raise InvalidProxyHeader(f"bare {name} in the v1 line")
    if end < 0 and len(line) >= MAX_V1_LENGTH:
        raise InvalidProxyHeader(f"no CRLF within the first {MAX_V1_LENGTH} bytes of a v1 header")
    complete = end >= 0
    tokens = body[len(V1_PREFIX) :].split(b" ") if len(body) >= len(V1_PREFIX) else []
    if not tokens:
        return None
    protocol = tokens[0]
    protocol_complete = complete or len(tokens) > 1
    if protocol_complete and protocol not in (b"TCP4", b"TCP6", b"UNKNOWN"):
        raise InvalidProxyHeader(f"v1 protocol {_show(protocol)} is not TCP4, TCP6 or UNKNOWN")
    if not protocol_complete:
        if not any(name.startswith(protocol) for name in (b"TCP4", b"TCP6", b"UNKNOWN")):
            raise InvalidProxyHeader(f"v1 protocol {_show(protocol)} is not TCP4, TCP6 or UNKNOWN")
        return None
    if protocol == b"UNKNOWN":
        # Section 2.1: the receiver ignores whatever follows, up to the CRLF.
        return ProxyHeader(1, "PROXY", "UNKNOWN", None, None, (), data[end + 2 :]) if complete else None
    fields = tokens[1:]
    if len(fields) > _V1_MAX_TOKENS - 1:
        raise InvalidProxyHeader("more than four fields after the v1 protocol")
    family = 4 if protocol == b"TCP4" else 6
    checks = (_v1_address, _v1_address, _v1_port, _v1_port)
    names = ("source address", "destination address", "source port", "destination port")
    for index, field in enumerate(fields):
        whole = complete or index < len(fields) - 1
        checks[index](field, family, names[index], whole)
    if not complete:
        return None
    if len(fields) < 4:
        raise InvalidProxyHeader(f"v1 {protocol.decode()} line ends after {len(fields)} of 4 fields")
    source = (_v1_host(fields[0], family), int(fields[2]))
    destination = (_v1_host(fields[1], family), int(fields[3]))
    name = protocol.decode()
    return ProxyHeader(1, "PROXY", name, source, destination, (), data[end + 2 :])


def _show(field: bytes) -> str:
    return repr(field[:16])


def _v1_number(field: bytes, maximum: int, what: str, whole: bool) -> None:
    """A decimal in 0..maximum without leading zeros (a prefix of one if not `whole`)."""
    if not field:
        if whole:
            raise InvalidProxyHeader(f"empty {what} (two spaces in a row?)")
        return
    if not field.isdigit() or not field.isascii():
        raise InvalidProxyHeader(f"{what} {_show(field)} is not a decimal number")
    if len(field) > 1 and field[0] == ord("0"):
        raise InvalidProxyHeader(f"{what} {_show(field)} has a leading zero")
    if len(field) > len(str(maximum)) or int(field) > maximum:
        raise InvalidProxyHeader(f"{what} {_show(field)} is above {maximum}")


def _v1_port(field: bytes, family: int, what: str, whole: bool) -> None:
    _v1_number(field, 65535, what, whole)


_HEX_COLON_DOT = frozenset(b"0123456789abcdefABCDEF:.")
_MAX_IPV6_TEXT = 45  # eight groups with the last two as a dotted quad


def _v1_address(field: bytes, family: int, what: str, whole: bool) -> None:
    if family == 4:
        parts = field.split(b".")
        if len(parts) > 4:
            raise InvalidProxyHeader(f"{what} {_show(field)} has more than four parts")
        for index, part in enumerate(parts):
            _v1_number(part, 255, f"{what} part", whole or index < len(parts) - 1)
        if whole and len(parts) != 4:
            raise InvalidProxyHeader(f"{what} {_show(field)} is not a dotted quad")
        return
    if not field:
        if whole:
            raise InvalidProxyHeader(f"empty {what} (two spaces in a row?)")
        return
    if not set(field) <= _HEX_COLON_DOT or len(field) > _MAX_IPV6_TEXT:
        raise InvalidProxyHeader(f"{what} {_show(field)} is not an IPv6 address")
    if whole:
        try:
            ipaddress.IPv6Address(field.decode("ascii"))
        except ValueError:
            raise InvalidProxyHeader(f"{what} {_show(field)} is not an IPv6 address") from None


def _v1_host(field: bytes, family: int) -> str:
    text = field.decode("ascii")
    return text if family == 4 else str(ipaddress.IPv6Address(text))


# --- version 2 (section 2.2)


def _parse_v2(data: bytes) -> ProxyHeader | None:
    signature = data[: len(V2_SIGNATURE)]
    if not V2_SIGNATURE.startswith(signature):
        raise InvalidProxyHeader("bytes do not match the v2 signature")
    if len(data) > 12:
        version, command = data[12] >> 4, data[12] & 0x0F
        if version != 2:
            raise InvalidProxyHeader(f"v2 signature with version {version}")
        if command > 1:
            raise InvalidProxyHeader(f"v2 command {command} is neither LOCAL (0) nor PROXY (1)")
    if len(data) > 13 and data[12] & 0x0F == 1:
        family, transport = data[13] >> 4, data[13] & 0x0F
        if family not in _FAMILY_NAMES or transport > _DGRAM or (family == _AF_UNSPEC) != (transport == 0):
            raise InvalidProxyHeader(f"v2 address family and transport byte 0x{data[13]:02x} is not defined")
        if transport == _DGRAM:
            raise InvalidProxyHeader("v2 header announces a datagram connection on a stream")
    if len(data) < _V2_FIXED:
        return None
    length = int.from_bytes(data[14:16], "big")
    total = _V2_FIXED + length
    if total > MAX_V2_LENGTH:
        raise InvalidProxyHeader(f"v2 header of {total} bytes is longer than our cap of {MAX_V2_LENGTH}")
    local = data[12] & 0x0F == 0
    family = data[13] >> 4
    needed = 0 if local else _ADDRESS_BLOCK[family]
    if length < needed:
        raise InvalidProxyHeader(f"v2 address block of {length} bytes is shorter than {_FAMILY_NAMES[family]} needs ({needed})")
    if len(data) < total:
        return None
    payload, rest = data[_V2_FIXED:total], data[total:]
    if local:
        # Section 2.2: for LOCAL the receiver discards the protocol block, family included.
        return ProxyHeader(2, "LOCAL", "UNSPEC", None, None, (), rest)
    tlvs = _tlvs(payload[needed:], "v2 TLVs")
    _check_crc32c(data[:total], tlvs, total)
    block = payload[:needed]
    source: Address | None = None
    destination: Address | None = None
    if family == _AF_INET:
        src, dst, sport, dport = struct.unpack("!4s4sHH", block)
        source = (str(ipaddress.IPv4Address(src)), sport)
        destination = (str(ipaddress.IPv4Address(dst)), dport)
    elif family == _AF_INET6:
        src, dst, sport, dport = struct.unpack("!16s16sHH", block)
        source = (str(ipaddress.IPv6Address(src)), sport)
        destination = (str(ipaddress.IPv6Address(dst)), dport)
    return ProxyHeader(2, "PROXY", _FAMILY_NAMES[family], source, destination, tlvs, rest)


def _tlvs(data: bytes, where: str) -> tuple[tuple[int, bytes], ...]:
    found = []
    position = 0
    while position < len(data):
        if len(data) - position < 3:
            raise InvalidProxyHeader(f"{where}: {len(data) - position} stray bytes where a TLV should start")
        kind = data[position]
        length = int.from_bytes(data[position + 1 : position + 3], "big")
        value = data[position + 3 : position + 3 + length]
        if len(value) < length:
            raise InvalidProxyHeader(f"{where}: TLV 0x{kind:02x} of length {length} overruns the header")
        if kind == PP2_TYPE_SSL:
            if length < _SSL_FIXED:
                raise InvalidProxyHeader(f"{where}: SSL TLV of {length} bytes is shorter than {_SSL_FIXED}")
            _tlvs(value[_SSL_FIXED:], "v2 SSL sub-TLVs")
        found.append((kind, value))
        position += 3 + length
    return tuple(found)


def _check_crc32c(whole: bytes, tlvs: tuple[tuple[int, bytes], ...], total: int) -> None:
    """Section 2.2.2: a receiver that knows CRC32C must check it when one is sent."""
    checksums = [value for kind, value in tlvs if kind == PP2_TYPE_CRC32C]
    if not checksums:
        return
    if len(checksums) > 1 or len(checksums[0]) != 4:
        raise InvalidProxyHeader("v2 CRC32C TLV must appear once and hold 4 bytes")
    # Find the value's place to zero it: walk the TLVs again by offset.
    block = _ADDRESS_BLOCK[whole[13] >> 4]
    position = _V2_FIXED + block
    while position < total:
        kind = whole[position]
        length = int.from_bytes(whole[position + 1 : position + 3], "big")
        if kind == PP2_TYPE_CRC32C:
            zeroed = whole[: position + 3] + b"\x00" * 4 + whole[position + 7 : total]
            if crc32c(zeroed) != int.from_bytes(checksums[0], "big"):
                raise InvalidProxyHeader("v2 CRC32C does not match the header")
            return
        position += 3 + length


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as the v2 CRC32C TLV carries it (big-endian on the wire)."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF
