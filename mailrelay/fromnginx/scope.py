"""
What a `server {}` of nginx's mail or stream block sees: its own directives over those
of the enclosing block (nginx merges per directive: a server that sets one replaces
the block's), taken one name at a time so that what nobody took can be reported.
And nginx's value syntaxes: times, flags.
"""

from __future__ import annotations

import re

from .parser import Directive

__all__ = ["Scope", "flag", "hostname_ok", "seconds"]


class Scope:
    """A server's directives over its block's, by name, each name taken once."""

    def __init__(self, outer: tuple[Directive, ...], inner: tuple[Directive, ...]) -> None:
        self.by_name: dict[str, list[Directive]] = {}
        for level in (outer, inner):
            own: dict[str, list[Directive]] = {}
            for directive in level:
                if directive.name in ("server", "upstream", "map"):
                    continue
                own.setdefault(directive.name, []).append(directive)
            self.by_name.update(own)
        self.taken: set[str] = set()

    def take(self, name: str) -> list[Directive]:
        """Every directive called `name` in effect here (the server's own, or else the
        block's), marking the name as handled."""
        self.taken.add(name)
        return self.by_name.get(name, [])

    def last(self, name: str) -> Directive | None:
        """The directive called `name` in effect (a repeated one: the last, as nginx
        reports a duplicate; the caller warns when that matters)."""
        found = self.take(name)
        return found[-1] if found else None

    def has(self, name: str) -> bool:
        return bool(self.by_name.get(name))

    def rest(self) -> list[Directive]:
        """The directives no one took, in file order."""
        left = [d for name, ds in self.by_name.items() if name not in self.taken for d in ds]
        return sorted(left, key=lambda d: (d.file, d.line))


_TIME = re.compile(r"(\d+)(ms|s|m|h|d|w|M|y)?")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "M": 2592000, "y": 31536000, None: 1}


def seconds(text: str) -> float | None:
    """nginx's time syntax (`30s`, `5m`, `1h30m`, `500ms`, `300`) in seconds, or None."""
    total, position = 0.0, 0
    text = text.strip()
    if not text:
        return None
    while position < len(text):
        match = _TIME.match(text, position)
        if match is None or match.end() == position:
            return None
        total += int(match.group(1)) * _UNITS[match.group(2)]
        position = match.end()
        while position < len(text) and text[position] == " ":
            position += 1
    return total


def seconds_of(directive: Directive) -> float | None:
    """A directive's first argument as an nginx time in seconds; None when it has none
    or it is not a time."""
    return seconds(directive.args[0]) if directive.args else None


def flag(directive: Directive) -> bool | None:
    """`on` or `off` (None when it is neither)."""
    if len(directive.args) == 1 and directive.args[0] in ("on", "off"):
        return directive.args[0] == "on"
    return None


_HOST_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?")


def hostname_ok(name: str) -> bool:
    """Whether `name` is a host name mailrelay's `hostname` takes."""
    return bool(_HOST_NAME.fullmatch(name)) and len(name) <= 253
