"""
What a translation produces: the mailrelay configuration being built (`Translation`)
and, for every nginx directive read, what became of it (`Note`).

Every directive of a `mail {}` or `stream {}` block gets at least one note: "mapped"
(it became the mailrelay keys the note names), "warning" (mailrelay cannot do what it
asks, or does it differently: the administrator must read this), or "ignored" (it
changes nothing here, e.g. nginx itself ignores it). Only warnings are shown by default.
"""

from __future__ import annotations

from typing import Any

import attrs

from .parser import Directive
from .scope import seconds_of

__all__ = ["KINDS", "Listener", "Note", "Translation"]

KINDS = ("mapped", "warning", "ignored")


@attrs.frozen
class Note:
    """What became of one directive."""

    directive: Directive
    kind: str
    message: str

    def line(self) -> str:
        """`file:line: directive: message`, the form of the report on stderr."""
        return f"{self.directive.where}: {self.directive.name}: {self.message}"


@attrs.define
class Listener:
    """One `[[listener]]` to write: its keys in order, and where it came from."""

    comment: list[str]
    keys: dict[str, Any]


@attrs.define
class Translation:
    """The mailrelay configuration being built, and the notes on every directive."""

    top: dict[str, Any] = attrs.Factory(dict)
    upstream: dict[str, Any] = attrs.Factory(dict)
    tls: dict[str, Any] = attrs.Factory(dict)
    tls_comment: list[str] = attrs.Factory(list)
    sni: list[dict[str, Any]] = attrs.Factory(list)
    router: dict[str, Any] | None = None
    listeners: list[Listener] = attrs.Factory(list)
    notes: list[Note] = attrs.Factory(list)
    found_blocks: bool = False
    """Whether the configuration has a mail {} or stream {} block at all."""

    def note(self, directive: Directive, kind: str, message: str) -> None:
        """Record what became of `directive` (the same note twice is kept once)."""
        assert kind in KINDS, kind
        note = Note(directive, kind, message)
        if note not in self.notes:
            self.notes.append(note)

    def mapped(self, directive: Directive, message: str) -> None:
        self.note(directive, "mapped", message)

    def warn(self, directive: Directive, message: str) -> None:
        self.note(directive, "warning", message)

    def ignored(self, directive: Directive, message: str) -> None:
        self.note(directive, "ignored", message)

    def map_time(self, directive: Directive | None, keys: dict[str, Any], key: str) -> None:
        """A time directive (`proxy_timeout 10m`) into `keys[key]` in seconds, or a
        warning that it is not a time (mailrelay's default then applies)."""
        if directive is None:
            return
        value = seconds_of(directive)
        if value:
            keys[key] = value
            self.mapped(directive, key)
        else:
            self.warn(directive, f"not a time: mailrelay's default {key} applies")

    def unknown(self, directive: Directive, warned: dict[str, str], block: str) -> None:
        """A directive no mapping took: its known warning, "no equivalent" for an
        `ssl_*` one, or that from-nginx does not know it (in a `block` {})."""
        if directive.name in warned:
            self.warn(directive, warned[directive.name])
        elif directive.name.startswith("ssl_"):
            self.warn(directive, "no equivalent")
        else:
            self.warn(directive, f"not a {block} directive from-nginx knows: not translated")

    def warnings(self) -> list[Note]:
        return [n for n in self.sorted_notes() if n.kind == "warning"]

    def sorted_notes(self) -> list[Note]:
        """The notes in the order of the files' lines (nginx's reading order)."""
        return sorted(self.notes, key=lambda n: (n.directive.file, n.directive.line))

    def noted(self, directive: Directive) -> bool:
        return any(n.directive is directive for n in self.notes)

    def unique_name(self, name: str) -> str:
        """`name`, or `name-2`, `name-3`... when a listener already has it."""
        taken = {listener.keys["name"] for listener in self.listeners}
        candidate, n = name, 2
        while candidate in taken:
            candidate, n = f"{name}-{n}", n + 1
        return candidate
