"""
Reading an nginx configuration the way nginx does: directives, blocks, quotes and
escapes, comments, and `include` files (globs included), every directive with the file
and line it was written on.

`parse_file(path)` returns the top-level directives with every `include` replaced by the
directives of the files it names, in the order nginx reads them (a glob's matches
sorted). A relative include is relative to nginx's configuration prefix: the folder of
the main file, as `nginx -c FILE` makes it, unless `prefix` says otherwise. Anything
nginx would refuse to read raises `NginxSyntaxError` with `file:line: what`.

No I/O but reading the files; no Twisted.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator

import attrs

__all__ = ["Directive", "NginxSyntaxError", "parse_file", "parse_text", "walk"]

MAX_INCLUDE_DEPTH = 32
"""Nested includes beyond this are taken for an include cycle."""


class NginxSyntaxError(Exception):
    """A configuration nginx would refuse to read: `str()` is `file:line: reason`."""

    def __init__(self, file: str, line: int, reason: str) -> None:
        # Line 0: the file as a whole (it cannot be read).
        super().__init__(f"{file}:{line}: {reason}" if line else f"{file}: {reason}")
        self.file = file
        self.line = line
        self.reason = reason


@attrs.frozen
class Directive:
    """One directive: its name, its arguments (unquoted, escapes resolved), where it is
    written, and its block's directives (None when it ends with `;`)."""

    name: str
    args: tuple[str, ...]
    file: str
    line: int
    block: tuple[Directive, ...] | None = None

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"

    def text(self) -> str:
        """The directive as it could be written (for comments and messages)."""
        words = " ".join([self.name, *(_quoted(a) for a in self.args)])
        return words + (" { ... }" if self.block is not None else ";")


def _quoted(word: str) -> str:
    if word and not any(c in word for c in " \t\r\n;{}\"'#\\"):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


# Tokens: (kind, value, line), kind one of "word", ";", "{", "}".
Token = tuple[str, str, int]


def _tokens(text: str, file: str) -> Iterator[Token]:
    """nginx's lexer: whitespace separates words; `#` starts a comment outside quotes;
    `;`, `{` and `}` end a word; a word may be "double" or 'single' quoted, where a
    backslash escapes (`_escaped`), also outside quotes, where it keeps a `;`, `{` or a
    space in the word."""
    i, line, n = 0, 1, len(text)
    while i < n:
        c = text[i]
        if c == "\n":
            line += 1
            i += 1
        elif c in " \t\r":
            i += 1
        elif c == "#":
            while i < n and text[i] != "\n":
                i += 1
        elif c in ";{}":
            yield (c, c, line)
            i += 1
        elif c in "\"'":
            start_line = line
            quote, i, word = c, i + 1, []
            while True:
                if i >= n:
                    raise NginxSyntaxError(file, start_line, "unexpected end of file, expecting the closing quote")
                c = text[i]
                if c == "\\" and i + 1 < n:
                    word.append(_escaped(text[i + 1]))
                    line += text[i + 1] == "\n"
                    i += 2
                    continue
                if c == quote:
                    i += 1
                    break
                line += c == "\n"
                word.append(c)
                i += 1
            if i < n and text[i] not in " \t\r\n;{":
                raise NginxSyntaxError(file, line, f'unexpected "{text[i]}" after a quoted string')
            yield ("word", "".join(word), start_line)
        else:
            start_line, word = line, []
            while i < n and text[i] not in " \t\r\n;{}":
                if text[i] == "\\" and i + 1 < n:
                    word.append(_escaped(text[i + 1]))
                    line += text[i + 1] == "\n"
                    i += 2
                    continue
                # `${name}` holds braces that do not end the word.
                if text[i] == "$" and i + 1 < n and text[i + 1] == "{":
                    end = text.find("}", i)
                    if end < 0:
                        raise NginxSyntaxError(file, line, 'the variable name is not terminated by "}"')
                    word.append(text[i : end + 1])
                    i = end + 1
                    continue
                word.append(text[i])
                i += 1
            yield ("word", "".join(word), start_line)


def _escaped(following: str) -> str:
    """What a backslash and `following` mean in a word, quoted or not (nginx's rules):
    a quote or a backslash itself, a tab, CR or LF for t, r, n; anything else keeps its
    backslash."""
    if following in "\"'\\":
        return following
    return {"t": "\t", "r": "\r", "n": "\n"}.get(following, "\\" + following)


def parse_text(text: str, file: str, prefix: str | None = None, _depth: int = 0) -> tuple[Directive, ...]:
    """The directives of `text` (read from `file`), includes expanded relative to
    `prefix` (default: `file`'s folder)."""
    prefix = prefix if prefix is not None else os.path.dirname(os.path.abspath(file))
    tokens = list(_tokens(text, file))
    position = 0

    def block(opening_line: int | None) -> tuple[Directive, ...]:
        nonlocal position
        directives: list[Directive] = []
        words: list[str] = []
        first_line = 0
        while position < len(tokens):
            kind, value, line = tokens[position]
            position += 1
            if kind == "word":
                if not words:
                    first_line = line
                words.append(value)
            elif kind == ";":
                if not words:
                    raise NginxSyntaxError(file, line, 'unexpected ";"')
                directives.extend(_directive(words, file, first_line, None, prefix, _depth))
                words = []
            elif kind == "{":
                if not words:
                    raise NginxSyntaxError(file, line, 'unexpected "{"')
                inner = block(line)
                directives.append(Directive(words[0], tuple(words[1:]), file, first_line, inner))
                words = []
            else:  # "}"
                if words:
                    raise NginxSyntaxError(file, line, f'unexpected "}}": "{words[0]}" is not terminated by ";"')
                if opening_line is None:
                    raise NginxSyntaxError(file, line, 'unexpected "}"')
                return tuple(directives)
        if words:
            raise NginxSyntaxError(file, tokens[-1][2], f'unexpected end of file: "{words[0]}" is not terminated by ";"')
        if opening_line is not None:
            last = tokens[-1][2] if tokens else opening_line
            raise NginxSyntaxError(
                file, last, f'unexpected end of file, expecting "}}" (the block opened on line {opening_line})'
            )
        return tuple(directives)

    return block(None)


def _directive(
    words: list[str], file: str, line: int, inner: tuple[Directive, ...] | None, prefix: str, depth: int
) -> list[Directive]:
    if words[0] != "include":
        return [Directive(words[0], tuple(words[1:]), file, line, inner)]
    if len(words) != 2:
        raise NginxSyntaxError(file, line, 'invalid number of arguments in "include" directive')
    if depth >= MAX_INCLUDE_DEPTH:
        raise NginxSyntaxError(file, line, f"includes nested more than {MAX_INCLUDE_DEPTH} deep (an include cycle?)")
    pattern = words[1] if os.path.isabs(words[1]) else os.path.join(prefix, words[1])
    if glob.has_magic(pattern):
        # nginx accepts a pattern that matches nothing; it reads the matches sorted.
        paths = sorted(p for p in glob.glob(pattern) if not os.path.isdir(p))
    else:
        paths = [pattern]
    found: list[Directive] = []
    for path in paths:
        try:
            with open(path, encoding="utf-8", errors="surrogateescape") as f:
                text = f.read()
        except OSError as e:
            raise NginxSyntaxError(file, line, f'include "{words[1]}": {e.strerror or e}') from None
        found.extend(parse_text(text, _shown(path), prefix, depth + 1))
    return found


def _shown(path: str) -> str:
    """A file name for messages: relative to the current folder when below it."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def parse_file(path: str, prefix: str | None = None) -> tuple[Directive, ...]:
    """The directives of the nginx configuration at `path`, includes expanded (relative
    to `prefix`, by default `path`'s folder, nginx's configuration prefix)."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            text = f.read()
    except OSError as e:
        raise NginxSyntaxError(path, 0, f"cannot read: {(e.strerror or str(e)).lower()}") from None
    if prefix is None:
        prefix = os.path.dirname(os.path.abspath(path))
    return parse_text(text, path, prefix)


def walk(directives: tuple[Directive, ...]) -> Iterator[Directive]:
    """Every directive, blocks' inner ones after their own, in file order."""
    for directive in directives:
        yield directive
        if directive.block is not None:
            yield from walk(directive.block)
