"""
A scripted mail server for `converse` to connect to in memory: it greets, answers each
line it hears from a script, and records every byte.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure

from ..proxyprotocol import InvalidProxyHeader, ProxyHeader, parse_header

__all__ = ["Hangup", "ScriptedUpstream"]


@attrs.frozen
class Hangup:
    """A reply after which the upstream closes the connection (`221` to QUIT, `* BYE`
    and the tagged OK to LOGOUT); `reply` None closes without a word."""

    reply: str | bytes | None = None


Reply = str | bytes | Hangup | Callable[[bytes], Any] | None
"""What the upstream answers a line with: text (CRLF line endings added), exact bytes
(CRLF added only when they end without a line break), None for nothing, a `Hangup`,
or a callable taking the line heard (bytes, line ending included) and returning one
of these."""

NO_DEFAULT: Any = object()


def _encode(reply: str | bytes) -> bytes:
    if isinstance(reply, str):
        return "".join(line + "\r\n" for line in reply.splitlines()).encode("utf-8") or b"\r\n"
    return reply if reply.endswith(b"\n") else reply + b"\r\n"


class ScriptedUpstream(Factory):
    """
    An upstream mail server played from a script, for `converse`.

    On each connection it says `greeting` (None: nothing), then answers each line it
    hears with the script's reply for it:

    - `replies` as a mapping `{prefix: reply}`: the entry with the longest prefix of
      the line (compared without regard to case) answers it, on every connection;
    - `replies` as a sequence of `(prefix, reply)` pairs: the lines of each connection
      must come in that order, each starting with its prefix (`""` matches any line).

    A line the script does not expect (no prefix matches, or the sequence is used up)
    is answered with `default` when one is given; otherwise it is recorded in
    `unexpected` and not answered, and `converse` fails once the conversation is over,
    showing it: a script that does not match what mailrelay says is a broken test.

    Every byte heard is kept, per connection (`connections`, in order) and in all
    (`heard`); each connection starts the script afresh (a client that tries again
    after a refusal makes mailrelay connect again).

    A connection that starts with a PROXY protocol header (a route with
    `proxy_protocol`) is read as a server configured for one reads it: the header is
    not a line of the script, and `proxy_headers` keeps what it said.
    """

    noisy = False

    def __init__(
        self,
        greeting: str | bytes | None,
        replies: Mapping[str | bytes, Reply] | Sequence[tuple[str | bytes, Reply]] = (),
        *,
        default: Reply = NO_DEFAULT,
    ) -> None:
        self.greeting = greeting
        self.ordered = not isinstance(replies, Mapping)
        items = replies.items() if isinstance(replies, Mapping) else replies
        self.script: list[tuple[bytes, Reply]] = [(p.encode() if isinstance(p, str) else p, r) for p, r in items]
        self.default = default
        self.connections: list[bytearray] = []
        """What each connection heard, in the order they were made."""
        self.unexpected: list[bytes] = []
        """Lines the script did not expect, with no `default` to answer them."""
        self.proxy_headers: list[ProxyHeader | None] = []
        """The PROXY header each connection started with (None: none), in order."""

    @property
    def heard(self) -> bytes:
        """Every byte every connection heard, in order."""
        return b"".join(bytes(c) for c in self.connections)

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        heard = bytearray()
        self.connections.append(heard)
        self.proxy_headers.append(None)
        return _ScriptedConnection(self, heard, len(self.connections) - 1)

    def answer(self, line: bytes, position: int) -> tuple[Reply, int]:
        """The reply to `line`, the `position`th line of its connection in an ordered
        script, and the position of the next one."""
        if self.ordered:
            if position < len(self.script):
                prefix, reply = self.script[position]
                if line.startswith(prefix):
                    return reply, position + 1
        else:
            matching = [(p, r) for p, r in self.script if line.lower().startswith(p.lower())]
            if matching:
                return max(matching, key=lambda pair: len(pair[0]))[1], position
        if self.default is NO_DEFAULT:
            self.unexpected.append(line)
            return None, position
        return self.default, position


class _ScriptedConnection(Protocol):
    def __init__(self, upstream: ScriptedUpstream, heard: bytearray, index: int) -> None:
        self.upstream = upstream
        self.heard = heard
        self.index = index
        self.buffer = b""
        self.position = 0
        self.closed = False
        self.header_possible = True
        """Nothing has been heard yet that could not begin a PROXY header."""

    def connectionMade(self) -> None:
        if self.upstream.greeting is not None:
            self.transport.write(_encode(self.upstream.greeting))  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.heard += data
        self.buffer += data
        if self.header_possible:
            try:
                header = parse_header(self.buffer)
            except InvalidProxyHeader:
                self.header_possible = False
            else:
                if header is None:
                    return  # a header so far: wait for the rest
                self.header_possible = False
                self.upstream.proxy_headers[self.index] = header
                self.buffer = header.rest
        while not self.closed and b"\n" in self.buffer:
            line, _, self.buffer = self.buffer.partition(b"\n")
            reply, self.position = self.upstream.answer(line + b"\n", self.position)
            self.say(reply, line + b"\n")

    def say(self, reply: Reply, line: bytes) -> None:
        if callable(reply):
            self.say(reply(line), line)
        elif isinstance(reply, Hangup):
            self.say(reply.reply, line)
            self.closed = True
            self.transport.loseConnection()  # type: ignore[union-attr]
        elif reply is not None:
            self.transport.write(_encode(reply))  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed = True
