"""
A small TOML writer for the values a translation produces (the standard library reads
TOML but does not write it): strings, booleans, integers, floats, lists, and inline
tables, under `[table]` and `[[array]]` headers with comment lines.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

__all__ = ["comment_lines", "key", "table", "value"]

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def key(name: str) -> str:
    """A key, bare when TOML allows it, quoted otherwise."""
    return name if _BARE_KEY.fullmatch(name) else _string(name)


def _string(text: str) -> str:
    out = ['"']
    for c in text:
        if c == '"':
            out.append('\\"')
        elif c == "\\":
            out.append("\\\\")
        elif c == "\n":
            out.append("\\n")
        elif c == "\t":
            out.append("\\t")
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\u{ord(c):04X}")
        else:
            out.append(c)
    out.append('"')
    return "".join(out)


def value(v: Any) -> str:
    """One value, on one line (inline tables and arrays included)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"{v} cannot be written")
        return str(int(v)) if v.is_integer() else repr(v)
    if isinstance(v, str):
        return _string(v)
    if isinstance(v, Mapping):
        return "{ " + ", ".join(f"{key(k)} = {value(x)}" for k, x in v.items()) + " }" if v else "{}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def comment_lines(lines: list[str]) -> list[str]:
    """Lines of text as TOML comments (each physical line its own `#`)."""
    return [f"# {part}".rstrip() for line in lines for part in line.splitlines() or [""]]


def table(header: str | None, keys: Mapping[str, Any], comment: list[str] | None = None) -> str:
    """A table: its comment lines, its `[header]` (none for the top level), its keys."""
    lines = comment_lines(comment or [])
    if header is not None:
        lines.append(header)
    lines.extend(f"{key(k)} = {value(v)}" for k, v in keys.items())
    return "\n".join(lines) + "\n"
