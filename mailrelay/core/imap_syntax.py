"""
IMAP's lexical rules (RFC 3501 §9, RFC 7888), for both sides of mailrelay's IMAP: reading
a client's command (tag, atoms, quoted strings, literals, parenthesised lists), writing
strings to an upstream, and reading an upstream's status responses and capabilities.

A command arrives as lines and literals: a line that ends in `{n}` (synchronising) or
`{n+}` (non-synchronising, LITERAL+) is followed by exactly n bytes, then the rest of the
command on the next line. `Command` collects those parts; `tokenize()` reads them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import attrs

TAG = re.compile(rb"[\x21\x23\x24\x26\x27\x2c-\x5b\x5d-\x7a\x7c-\x7e]+")
"""A tag: ASTRING-CHARs but `+` (RFC 3501 §9): printable ASCII but ( ) { SP % * " \\ +."""

LITERAL = re.compile(rb"\{([0-9]{1,20})(\+?)\}\Z")
"""A literal announced at the end of a line: `{n}` or `{n+}`."""

_ATOM_SPECIALS = frozenset(b'(){ %*"\\') | frozenset(range(0x20)) | {0x7F}

STATUS = re.compile(rb"(\S+) (OK|NO|BAD|PREAUTH|BYE)(?: \[([^\]\r\n]*)\])? ?([^\r\n]*)\r?\n", re.IGNORECASE)
"""A status response: tag (or `*`), status, optional [response code], text."""


class IMAPSyntaxError(Exception):
    """A command that does not follow IMAP's syntax; the message says how."""


class Atom(bytes):
    """An atom as sent (NIL is one); strings (quoted or literal) are plain `bytes`."""


class Literal(bytes):
    """The bytes of a literal, as a part of a `Command`."""


Token = bytes | list["Token"]
"""An `Atom`, a string (`bytes`), or a parenthesised list of tokens."""


@attrs.define
class Command:
    """A command being received: its lines (without their literal markers and line
    ends) and literals, in order."""

    parts: list[bytes] = attrs.field(factory=list)
    size: int = 0

    def add(self, part: bytes) -> None:
        self.parts.append(part)
        self.size += len(part)

    @property
    def head(self) -> tuple[bytes | None, bytes]:
        """(tag, command name in upper case) from the first line, as far as they can
        be read; the tag is None when it is not a valid tag."""
        words = self.parts[0].split(b" ", 2) if self.parts else [b""]
        tag = words[0] if TAG.fullmatch(words[0]) else None
        return tag, (words[1].upper() if len(words) > 1 else b"")


def tokenize(parts: Sequence[bytes]) -> list[Token]:
    """The tokens of a command whose `parts` are its lines and `Literal`s."""
    stack: list[list[Token]] = [[]]
    for part in parts:
        if isinstance(part, Literal):
            stack[-1].append(bytes(part))
            continue
        i, end = 0, len(part)
        while i < end:
            c = part[i]
            if c == 0x20:
                i += 1
            elif c == 0x28:  # (
                inner: list[Token] = []
                stack[-1].append(inner)
                stack.append(inner)
                i += 1
            elif c == 0x29:  # )
                if len(stack) == 1:
                    raise IMAPSyntaxError("unbalanced parenthesis")
                stack.pop()
                i += 1
            elif c == 0x22:  # "
                value, i = _quoted(part, i + 1)
                stack[-1].append(value)
            else:
                start = i
                while i < end and part[i] not in _ATOM_SPECIALS:
                    i += 1
                if i == start:
                    shown = chr(c) if 0x20 < c < 0x7F else f"0x{c:02X}"
                    raise IMAPSyntaxError(f"unexpected character {shown}")
                stack[-1].append(Atom(part[start:i]))
    if len(stack) != 1:
        raise IMAPSyntaxError("unbalanced parenthesis")
    return stack[0]


def _quoted(data: bytes, i: int) -> tuple[bytes, int]:
    """The quoted string that starts after the `"` at i - 1, and where it ends."""
    value = bytearray()
    while i < len(data):
        c = data[i]
        if c == 0x22:
            return bytes(value), i + 1
        if c == 0x5C:  # backslash: only \\ and \" are escapes
            if i + 1 >= len(data) or data[i + 1] not in b'"\\':
                raise IMAPSyntaxError("invalid backslash escape in a quoted string")
            value.append(data[i + 1])
            i += 2
        elif c == 0:
            raise IMAPSyntaxError("NUL in a quoted string")
        else:
            value.append(c)
            i += 1
    raise IMAPSyntaxError("unterminated quoted string")


def is_string(token: Token) -> bool:
    """An astring: an atom or a (quoted or literal) string."""
    return isinstance(token, bytes)


def is_nil(token: Token) -> bool:
    return isinstance(token, Atom) and token.upper() == b"NIL"


# -- writing -------------------------------------------------------------------------------


def quoted(value: bytes) -> bytes | None:
    """`value` as a quoted string, or None when only a literal can carry it (8-bit or
    line-ending bytes: RFC 3501 quoted strings are 7-bit text)."""
    if any(c == 0 or c > 0x7F or c in b"\r\n" for c in value):
        return None
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def id_list(fields: Sequence[tuple[str, str | None]]) -> bytes:
    """An ID parameter list (RFC 2971): `("name" "value" "key" NIL)`, or NIL."""
    if not fields:
        return b"NIL"
    items = []
    for key, value in fields:
        items.append(quoted(key.encode()) or b'""')
        items.append(b"NIL" if value is None else quoted(value.encode()) or b"NIL")
    return b"(" + b" ".join(items) + b")"


# -- reading an upstream ----------------------------------------------------------------------


@attrs.frozen
class Status:
    tag: bytes
    status: bytes
    """OK, NO, BAD, PREAUTH or BYE, in upper case."""
    code: bytes | None
    """The response code without its brackets (`CAPABILITY IMAP4rev1 ...`), or None."""
    text: bytes

    @property
    def code_name(self) -> bytes:
        """The response code's first word, in upper case (`AUTHENTICATIONFAILED`)."""
        return self.code.split(b" ", 1)[0].upper() if self.code else b""

    def capabilities(self) -> frozenset[str] | None:
        """The capabilities of a `[CAPABILITY ...]` response code, or None."""
        if self.code_name != b"CAPABILITY" or self.code is None:
            return None
        return capability_set(self.code.split(b" ")[1:])


def status(line: bytes) -> Status | None:
    """The status response in `line` (with its line end), or None if it is not one."""
    match = STATUS.fullmatch(line)
    if match is None:
        return None
    return Status(match[1], match[2].upper(), match[3], match[4])


def capability_set(words: Sequence[bytes]) -> frozenset[str]:
    return frozenset(w.decode("ascii", "replace").upper() for w in words if w)


def untagged_capabilities(line: bytes) -> frozenset[str] | None:
    """The capabilities of a `* CAPABILITY ...` line, or None if it is another line."""
    words = line.rstrip(b"\r\n").split(b" ")
    if len(words) >= 2 and words[0] == b"*" and words[1].upper() == b"CAPABILITY":
        return capability_set(words[2:])
    return None
