"""
Upstream dialogues without I/O.

A protocol's exchange with an upstream (its greeting, capabilities, STARTTLS, login) is
written as a generator that yields what it needs and is sent back what the upstream said:

    def login(self):
        greeting = yield ReadLine("greeting")
        yield Send(b"CAPA\\r\\n")
        ...
        return b"+OK Logged in\\r\\n"

`Conversation` runs such a generator on bytes: `start()` and `receive(data)` return the
bytes to write; once the generator returns, `finished` is true and `result` holds its
value. What the generator raises (`Reject`, `UpstreamProtocolError`) comes out of
`start()` or `receive()`. Bytes that arrived past the end of the dialogue are not
consumed: `leftover()` hands them back, for the splice.

Twisted meets a dialogue in one place only: `protocols.upstream.run_dialogue()`.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any, Generic, TypeVar

import attrs

from .errors import UpstreamProtocolError

T = TypeVar("T")

MAX_RESPONSE_LINE = 64 * 1024
"""Longest line an upstream may send during a login (capability lists run long)."""
MAX_BUFFERED = 1024 * 1024
"""Most bytes an upstream may send ahead of what its dialogue has read."""


@attrs.frozen
class Send:
    """Write these bytes to the upstream."""

    data: bytes = attrs.field(repr=False)  # may hold a credential


@attrs.frozen
class ReadLine:
    """Wait for the next line (sent back with its line ending). `stage` names what is
    awaited, in the words of a timeout: "no {stage} within 30s"."""

    stage: str
    max_length: int = MAX_RESPONSE_LINE


@attrs.frozen
class ReadBytes:
    """Wait for the next `count` bytes (an IMAP literal)."""

    stage: str
    count: int


Need = Send | ReadLine | ReadBytes
Dialogue = Generator[Need, bytes, T]


class Conversation(Generic[T]):
    """Runs one `Dialogue` on the bytes an upstream sends."""

    def __init__(self, dialogue: Dialogue[T]) -> None:
        self._dialogue = dialogue
        self._buffer = bytearray()
        self._waiting: ReadLine | ReadBytes | None = None
        self.stage = "greeting"
        """What the dialogue waits for now (see `ReadLine.stage`)."""
        self.finished = False
        self.result: T | None = None

    def start(self) -> bytes:
        """Begin the dialogue; the bytes to write."""
        return self._advance(None)

    def receive(self, data: bytes) -> bytes:
        """Bytes from the upstream; the bytes to write in answer."""
        if self.finished:
            self._buffer += data
            return b""
        self._buffer += data
        if len(self._buffer) > MAX_BUFFERED:
            raise UpstreamProtocolError(f"upstream sent over {MAX_BUFFERED} bytes nobody asked for")
        return self._advance(self._take())

    def leftover(self) -> bytes:
        """What arrived past the end of the dialogue (only once it has finished)."""
        data, self._buffer = bytes(self._buffer), bytearray()
        return data

    def _take(self) -> bytes | None:
        """What the dialogue waits for, if it has arrived."""
        waiting = self._waiting
        if isinstance(waiting, ReadLine):
            end = self._buffer.find(b"\n", 0, waiting.max_length)
            if end < 0:
                if len(self._buffer) >= waiting.max_length:
                    raise UpstreamProtocolError(f"upstream sent a line longer than {waiting.max_length} bytes")
                return None
            line = bytes(self._buffer[: end + 1])
            del self._buffer[: end + 1]
            return line
        if isinstance(waiting, ReadBytes) and len(self._buffer) >= waiting.count:
            data = bytes(self._buffer[: waiting.count])
            del self._buffer[: waiting.count]
            return data
        return None

    def _advance(self, answer: bytes | None) -> bytes:
        out = bytearray()
        if answer is None and self._waiting is not None:
            return bytes(out)
        value: Any = answer
        while True:
            try:
                need = self._dialogue.send(value)
            except StopIteration as done:
                self.finished = True
                self._waiting = None
                self.result = done.value
                return bytes(out)
            if isinstance(need, Send):
                out += need.data
                value = None
                continue
            self._waiting = need
            self.stage = need.stage
            value = self._take()
            if value is None:
                return bytes(out)
