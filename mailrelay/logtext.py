"""
Untrusted text in log lines: a user name, a certificate subject, a HELO or SNI name, an
upstream's or auth service's words. Any of them may hold control characters (an ESC
that repaints a terminal, a CR or LF that forges a log line) or be megabytes long.

`loggable()` is the one way such text goes into a log message: every character that is
not printable becomes a `\\xNN`, `\\uNNNN` or `\\UNNNNNNNN` escape, and the result is
bounded. Printable text, UTF-8 names included, is shown as it is.
"""

from __future__ import annotations

MAX_LOGGED = 200
"""Characters of untrusted text shown in a log line; more is cut, with `...` after it."""


def _escaped(c: str) -> str:
    code = ord(c)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def loggable(text: str | None, limit: int = MAX_LOGGED) -> str:
    """`text` fit for a log line: one line, no control character (C0, DEL, C1, line and
    paragraph separators, bidirectional overrides: every non-printable character is
    escaped), at most `limit` characters of it; `-` for None or empty."""
    if not text:
        return "-"
    shown = "".join(c if c.isprintable() else _escaped(c) for c in text[:limit])
    return shown + "..." if len(text) > limit else shown
