"""
Is a documented log line one the code writes? Templates from mailrelay's source, and a
matcher that explains a line by them.

Every string literal in mailrelay/ is a template: an f-string's replacement fields and a
log format's `{fields}` are holes, the rest is fixed text. A line is *explained* when
some template matches it whole and every hole's text is either a value (an address, a
name, a number: no two words in a row) or itself explained (a reason inside a session
line, an OpenSSL reason inside a TLS failure), or is in `EXTERNAL`: words that come
from outside mailrelay's source (the operating system, OpenSSL, Python, tomllib, or the
administrator's own configuration).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[2] / "mailrelay"

HOLE = None
"""A template piece that matches any text."""

Template = tuple[str | None, ...]

_FORMAT_FIELD = re.compile(r"\{[A-Za-z_][A-Za-z0-9_.]*(![rsa])?(:[^{}]*)?\}")
_PROSE = re.compile(r"[A-Za-z]{2,} [A-Za-z(]{2,}")
MIN_FIXED = 6
"""Letters of fixed text a template needs to explain a line by itself (fewer, like
`"{a}: {b}"`, would explain anything)."""

EXTERNAL = frozenset(
    {
        # the operating system (strerror)
        "Address already in use",
        "Permission denied",
        "Cannot assign requested address",
        "No such file or directory",
        # OpenSSL's reasons
        "wrong version number",
        "unsupported protocol",
        "peer did not return a certificate",
        "tlsv1 alert unknown ca",
        "certificate verify failed",
        # cryptography, tomllib and Python
        "Valid PEM but no BEGIN/END delimiters for a private key found",
        "Invalid value (at line 7, column 8)",
        "TypeError(\"Router.__init__() got an unexpected keyword argument 'colour'\")",
        # the administrator's own words: a map rule's reject message, a router module's error
        "account disabled",
        "RuntimeError('boom at import')",
    }
)


def _pieces(node: ast.AST) -> Template | None:
    """The template of a string literal node (None: not a string)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        out: list[str | None] = []
        last = 0
        for field in _FORMAT_FIELD.finditer(node.value):
            out += [node.value[last : field.start()], HOLE]
            last = field.end()
        out.append(node.value[last:])
        return tuple(out)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        # `"text " + value` and `value + " text"`: the other side is a hole.
        left, right = _pieces(node.left), _pieces(node.right)
        if left is not None or right is not None:
            return (left or (HOLE,)) + (right or (HOLE,))
        return None
    if isinstance(node, ast.JoinedStr):
        joined: list[str | None] = []
        for value in node.values:
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                joined.append(value.value)
            else:
                joined.append(HOLE)
        return tuple(joined)
    return None


def _normalised(template: Template) -> Template:
    """Adjacent text joined, empty text dropped."""
    out: list[str | None] = []
    for piece in template:
        if piece == "":
            continue
        if isinstance(piece, str) and out and isinstance(out[-1], str):
            out[-1] += piece
            continue
        out.append(piece)
    return tuple(out)


@cache
def templates() -> tuple[Template, ...]:
    """Every string literal of mailrelay/ as a template, each line of one apart."""
    found: set[Template] = set()
    for path in SOURCE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            pieces = _pieces(node)
            if pieces is None:
                continue
            # A literal over several lines is several log lines (`"invalid configuration:\n" + ...`).
            line: list[str | None] = []
            for piece in pieces:
                if piece is HOLE:
                    line.append(HOLE)
                    continue
                first, *rest = piece.split("\n")
                line.append(first)
                for more in rest:
                    found.add(_normalised(tuple(line)))
                    line = [more]
            found.add(_normalised(tuple(line)))
    return tuple(t for t in found if sum(c.isalpha() for p in t if p for c in p) >= MIN_FIXED)


def _matches(template: Template, text: str, start: int = 0) -> Iterator[list[str]]:
    """Every way `template` matches all of `text[start:]`: the holes' texts."""
    if not template:
        if start == len(text):
            yield []
        return
    head, rest = template[0], template[1:]
    if head is not HOLE:
        if text.startswith(head, start):
            yield from _matches(rest, text, start + len(head))
        return
    if not rest:
        yield [text[start:]]
        return
    anchor = rest[0]
    if anchor is HOLE:  # two holes in a row (`{outcome}{reason_text}`): every split
        for at in range(start, len(text) + 1):
            for holes in _matches(rest, text, at):
                yield [text[start:at], *holes]
        return
    at = text.find(anchor, start)
    while at != -1:
        for holes in _matches(rest, text, at):
            yield [text[start:at], *holes]
        at = text.find(anchor, at + 1)


def is_value(text: str) -> bool:
    """Text with no two words in a row: an address, a name, a number, a path."""
    return _PROSE.search(text) is None


def explained(text: str, depth: int = 6) -> bool:
    """Whether mailrelay's source (or `EXTERNAL`) accounts for all of `text`."""
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1]
    if is_value(text) or text in EXTERNAL:
        return True
    if depth == 0:
        return False
    for template in templates():
        if not all(p in text for p in template if p is not HOLE):
            continue
        for holes in _matches(template, text):
            if all(explained(hole, depth - 1) for hole in holes):
                return True
    # "where: why" and "why (hint)" joined by a caller's own format
    head, sep, tail = text.partition(": ")
    if sep and explained(head, depth - 1) and explained(tail, depth - 1):
        return True
    if text.endswith(")") and " (" in text:
        head, _, tail = text[:-1].rpartition(" (")
        if explained(head, depth - 1) and (explained(tail, depth - 1) or explained(f" ({tail})", depth - 1)):
            return True
    return False
