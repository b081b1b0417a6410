"""
Peek the server name (SNI) and ALPN offer from the start of a TLS connection, without
terminating TLS: the same job as nginx's ssl_preread.

`peek_client_hello(data)` is given everything a client has sent so far and answers
with a `ClientHello`, `NOT_TLS`, `NEED_MORE`, or raises `MalformedClientHello`.

What a caller may rely on:
- it never consumes: it only reads `data`, and the caller forwards the very same bytes
  upstream;
- it is a pure function of `data`, and the verdict only ever moves forward: once a
  prefix of a stream gives a `ClientHello`, `NOT_TLS` or `MalformedClientHello`, every
  longer prefix gives the same, so it does not matter how the bytes were chunked;
- buffering is bounded: only the first `MAX_CLIENT_HELLO` bytes are looked at, and a
  ClientHello that does not end within them is malformed, so `NEED_MORE` is never
  answered once `len(data) >= MAX_CLIENT_HELLO`;
- the only exception it raises is `MalformedClientHello`, whatever the input;
- it runs in time linear in `min(len(data), MAX_CLIENT_HELLO)`.
"""

from __future__ import annotations

from typing import final

import attrs

# Bytes of stream we are willing to buffer before calling it malformed. Real hellos
# are about 0.5 KiB, or a couple of KiB with post-quantum key shares.
MAX_CLIENT_HELLO = 32 * 1024

_HANDSHAKE_RECORD = 0x16
_CLIENT_HELLO = 1
_RECORD_HEADER = 5
_HANDSHAKE_HEADER = 4
_MAX_RECORD_PAYLOAD = 16384  # RFC 8446 5.1: plaintext fragments are at most 2^14 bytes
_MAX_SESSION_ID = 32
_EXT_SERVER_NAME = 0
_EXT_ALPN = 16
_HOST_NAME = 0


@attrs.frozen
class ClientHello:
    """
    What the client asked for.

    `server_name` is the host_name from the server_name extension, lower-cased ASCII (an
    IDNA A-label, as sent) without a trailing dot, or None if absent. `alpn` is the ALPN
    protocol names offered, in order (empty if none), decoded as latin-1 so any bytes survive.
    """

    server_name: str | None
    alpn: tuple[str, ...]


@final
class NotTLS:
    """The stream does not start with a TLS handshake record: some other protocol."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NOT_TLS"


@final
class NeedMore:
    """The stream so far is the start of a ClientHello: call again with more bytes."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_MORE"


NOT_TLS = NotTLS()
NEED_MORE = NeedMore()


class MalformedClientHello(ValueError):
    """The stream starts like TLS but is not a well-formed ClientHello (message says what is wrong)."""


def peek_client_hello(data: bytes) -> ClientHello | NotTLS | NeedMore:
    """Look at the first bytes a client sent. Never consumes: the caller forwards `data` unchanged."""
    if not data:
        return NEED_MORE
    if data[0] != _HANDSHAKE_RECORD:
        # An SSLv2-compatible hello (first byte 0x80) lands here too: no TLS 1.x client
        # has sent one in years, and it cannot carry SNI anyway.
        return NOT_TLS
    # Nothing past the window counts, which keeps the verdict independent of how the
    # stream was chunked. An immutable copy: no view here pins a caller's bytearray.
    window = bytes(data[:MAX_CLIENT_HELLO])
    handshake = bytearray()
    position = 0
    # Each pass takes a whole non-empty record or returns, so the loop ends.
    while True:
        # Judge each header byte as soon as it is there, so garbage is refused early
        # instead of being buffered up to the limit.
        header = window[position : position + _RECORD_HEADER]
        if header and header[0] != _HANDSHAKE_RECORD:
            raise MalformedClientHello(f"a record of type {header[0]} came before the ClientHello was complete")
        if len(header) >= 2 and header[1] != 3:
            raise MalformedClientHello(f"record version major {header[1]} is not 3")
        if len(header) >= 3 and header[2] > 4:
            raise MalformedClientHello(f"record version minor {header[2]} is above 4")
        if len(header) < _RECORD_HEADER:
            return _need_more(data)
        length = int.from_bytes(header[3:5], "big")
        if not 0 < length <= _MAX_RECORD_PAYLOAD:
            raise MalformedClientHello(f"record length {length} is not within 1..{_MAX_RECORD_PAYLOAD}")
        start = position + _RECORD_HEADER
        fragment = window[start : start + length]
        handshake += fragment
        position = start + len(fragment)
        # The hello may end inside a record that is not complete yet: what follows it
        # is none of our business.
        body = _complete_client_hello(handshake)
        if body is not None:
            return _parse_client_hello(body)
        if len(fragment) < length:
            return _need_more(data)


def _need_more(data: bytes) -> NeedMore:
    # Once the window is full, more bytes cannot change the answer.
    if len(data) >= MAX_CLIENT_HELLO:
        raise MalformedClientHello(f"no complete ClientHello within the first {MAX_CLIENT_HELLO} bytes")
    return NEED_MORE


def _complete_client_hello(handshake: bytearray) -> bytes | None:
    """The ClientHello body if the reassembled handshake bytes hold all of it, else None."""
    if handshake and handshake[0] != _CLIENT_HELLO:
        raise MalformedClientHello(f"handshake message type {handshake[0]} is not client_hello")
    if len(handshake) < _HANDSHAKE_HEADER:
        return None
    length = int.from_bytes(handshake[1:4], "big")
    message = _HANDSHAKE_HEADER + length
    # The fewest stream bytes that can carry it: full-size records, each with a header.
    records = -(-message // _MAX_RECORD_PAYLOAD)
    if message + records * _RECORD_HEADER > MAX_CLIENT_HELLO:
        raise MalformedClientHello(f"ClientHello length {length} does not fit in {MAX_CLIENT_HELLO} bytes")
    if len(handshake) < message:
        return None
    return bytes(handshake[_HANDSHAKE_HEADER:message])


class _Reader:
    """Reads fields from the front of one length-delimited container, refusing overruns."""

    __slots__ = ("_data", "_position", "_container")

    def __init__(self, data: bytes, container: str) -> None:
        self._data = data
        self._position = 0
        self._container = container

    @property
    def remaining(self) -> int:
        return len(self._data) - self._position

    def take(self, n: int, field: str) -> bytes:
        if n > self.remaining:
            raise MalformedClientHello(f"{field} overruns the {self._container}")
        start = self._position
        self._position += n
        return self._data[start : self._position]

    def integer(self, size: int, field: str) -> int:
        return int.from_bytes(self.take(size, field), "big")

    def vector(self, length_size: int, field: str) -> bytes:
        """A field prefixed with its length in `length_size` bytes."""
        length = self.integer(length_size, f"{field} length")
        return self.take(length, f"{field} length")

    def nested(self, length_size: int, field: str) -> _Reader:
        return _Reader(self.vector(length_size, field), field)

    def expect_end(self) -> None:
        if self.remaining:
            raise MalformedClientHello(f"leftover bytes at the end of the {self._container} ({self.remaining})")


def _parse_client_hello(body: bytes) -> ClientHello:
    hello = _Reader(body, "ClientHello")
    hello.take(2, "legacy_version")
    hello.take(32, "random")
    if len(hello.vector(1, "session_id")) > _MAX_SESSION_ID:
        raise MalformedClientHello(f"session_id is longer than {_MAX_SESSION_ID} bytes")
    cipher_suites = hello.vector(2, "cipher_suites")
    if not cipher_suites or len(cipher_suites) % 2:
        raise MalformedClientHello(f"cipher_suites length {len(cipher_suites)} is not a positive even number")
    if not hello.vector(1, "compression_methods"):
        raise MalformedClientHello("compression_methods is empty")
    if not hello.remaining:
        # Before TLS 1.2 a hello could end here; it simply offers nothing we look at.
        return ClientHello(None, ())
    extensions = hello.nested(2, "extensions")
    hello.expect_end()

    server_name: str | None = None
    alpn: tuple[str, ...] = ()
    seen: set[int] = set()
    while extensions.remaining:
        kind = extensions.integer(2, "extension type")
        content = extensions.nested(2, f"extension {kind}")
        if kind in seen:
            raise MalformedClientHello(f"extension {kind} appears twice")
        seen.add(kind)
        if kind == _EXT_SERVER_NAME:
            server_name = _parse_server_name(content)
        elif kind == _EXT_ALPN:
            alpn = _parse_alpn(content)
    return ClientHello(server_name, alpn)


def _parse_server_name(content: _Reader) -> str | None:
    names = content.nested(2, "server_name_list")
    content.expect_end()
    # RFC 6066 3: the list is ServerName server_name_list<1..2^16-1>; OpenSSL refuses an empty one too.
    if not names.remaining:
        raise MalformedClientHello("server_name_list is empty")
    host: str | None = None
    while names.remaining:
        name_type = names.integer(1, "server name type")
        name = names.vector(2, "server name")
        if name_type != _HOST_NAME:
            continue  # other name types were never defined; skip rather than guess
        if host is not None:
            raise MalformedClientHello("server_name_list has a second host_name")
        host = _host_name(name)
    return host


def _host_name(raw: bytes) -> str:
    # Printable ASCII only: this also refuses NUL (which would truncate in C) and raw
    # UTF-8 (a client must send the IDNA A-label).
    if not raw or any(byte < 0x21 or byte > 0x7E for byte in raw):
        raise MalformedClientHello("host_name is empty or not printable ASCII")
    # "example.org." names the same host as "example.org"; anything left ending in a dot is no name.
    name = raw[:-1] if raw.endswith(b".") else raw
    if not name or name.endswith(b"."):
        raise MalformedClientHello("host_name ends in an empty label")
    return name.decode("ascii").lower()


def _parse_alpn(content: _Reader) -> tuple[str, ...]:
    protocols = content.nested(2, "protocol_name_list")
    content.expect_end()
    # RFC 7301 3.1: protocol_name_list<2..2^16-1>, so at least one name.
    if not protocols.remaining:
        raise MalformedClientHello("protocol_name_list is empty")
    names = []
    while protocols.remaining:
        name = protocols.vector(1, "protocol name")
        if not name:
            raise MalformedClientHello("an ALPN protocol name is empty")
        names.append(name.decode("latin-1"))
    return tuple(names)
