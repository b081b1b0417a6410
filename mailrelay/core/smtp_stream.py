"""
What a relayed SMTP session may carry, decided from bytes alone (no I/O): which client
command lines reach the upstream, where message content ends, and which upstream
replies the client hears. `protocols.smtp_relay` drives these with the two connections.

The rule behind every decision: mailrelay forwards only what every SMTP server reads
the same way it does, so that mailrelay and the upstream never disagree about where a
command or a message ends (the SMTP smuggling class of bugs).

- A command line ends at LF. It is forwarded as its text plus CRLF; a line whose text
  holds CR or NUL, or that is longer than `MAX_COMMAND`, never reaches the upstream
  (some servers end lines at a bare CR, and Postfix would skip the rest of a long
  line where another server would read it as a second command).
- Commands that would change who the upstream thinks the client is, or take the
  session out of mailrelay's sight, are answered locally: XCLIENT and XFORWARD
  (`550 5.7.0`), STARTTLS and AUTH (`503 5.5.1`; the client already has TLS and a
  login, or needs none).
- MAIL and RCPT are forwarded only with their path in angle brackets, followed by
  nothing or by a space and parameters (`501 5.5.4` otherwise): the address a Router
  vets is then the one every server reads, however it parses what follows.
- BDAT is forwarded only in its strict form `BDAT <digits> [LAST]`, and only when the
  upstream offers CHUNKING; otherwise its chunk is read and discarded and the client
  hears `502`.
- Message content (DATA up to CRLF.CRLF, BDAT chunks by count) holding a bare CR or a
  bare LF is refused (`554 5.6.0`, as Postfix 3.9's `smtpd_forbid_bare_newline` does):
  `\\n.\\r\\n`, `\\r\\n.\\n`, `\\n.\\n` and `\\r.\\r\\n` end a message for some servers and
  not for others.
"""

from __future__ import annotations

import re

import attrs

MAX_COMMAND = 2048
"""Longest command line forwarded, CRLF included: Postfix's `line_length_limit`."""
MAX_REPLY_LINE = 4096
MAX_REPLY_LINES = 1000

LOCAL_REPLIES = {
    b"XCLIENT": b"550 5.7.0 Error: XCLIENT is not permitted\r\n",
    b"XFORWARD": b"550 5.7.0 Error: XFORWARD is not permitted\r\n",
    b"STARTTLS": b"503 5.5.1 Error: STARTTLS not available in this session\r\n",
    b"AUTH": b"503 5.5.1 Error: AUTH not available in this session\r\n",
}
"""Commands the upstream never hears from a client, and what the client hears instead."""

BAD_CHARACTERS = b"500 5.5.2 Error: bare CR or NUL character in command\r\n"
LINE_TOO_LONG = b"500 5.5.6 Error: line too long\r\n"
BDAT_SYNTAX = b"501 5.5.4 Syntax: BDAT size [LAST]\r\n"
NO_CHUNKING = b"502 5.5.1 Error: BDAT not available (the mail server does not offer CHUNKING)\r\n"
BARE_NEWLINE = b"554 5.6.0 Error: bare CR or LF in message content; closing connection\r\n"

HIDDEN_EXTENSIONS = frozenset({"XCLIENT", "XFORWARD", "STARTTLS", "AUTH"})
"""EHLO keywords a client does not hear from the upstream: it may not use them."""

MAIL_SYNTAX = b"501 5.5.4 Syntax: MAIL FROM:<address>\r\n"
RCPT_SYNTAX = b"501 5.5.4 Syntax: RCPT TO:<address>\r\n"

MAIL_ARGUMENTS = re.compile(rb"FROM: ?(<[^<>]*>)( .*)?", re.IGNORECASE | re.DOTALL)
RCPT_ARGUMENTS = re.compile(rb"TO: ?(<[^<>]+>)( .*)?", re.IGNORECASE | re.DOTALL)
"""What follows MAIL and RCPT: the path, then optional parameters."""
_ENVELOPE = {b"MAIL": (MAIL_ARGUMENTS, MAIL_SYNTAX), b"RCPT": (RCPT_ARGUMENTS, RCPT_SYNTAX)}
_BDAT = re.compile(rb"BDAT ([0-9]{1,15})( LAST)?", re.IGNORECASE)
_REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])([ -]?)(.*?)\r?\n", re.DOTALL)


# -- client commands -------------------------------------------------------------------------


@attrs.frozen
class Forward:
    """Send `line` (text + CRLF) to the upstream; its reply is the client's."""

    verb: bytes
    line: bytes


@attrs.frozen
class Answer:
    """Answer the client with `reply`; the upstream hears nothing."""

    reply: bytes


@attrs.frozen
class Chunk:
    """A well-formed BDAT: `size` bytes of content follow the line."""

    line: bytes
    size: int
    last: bool


@attrs.frozen
class Discard:
    """A BDAT that cannot go upstream: its `size` bytes are read and dropped, then `reply`."""

    size: int
    reply: bytes


Command = Forward | Answer | Chunk | Discard


def command(line: bytes, chunking: bool) -> Command:
    """What to do with one client command line (its LF included, at most `MAX_COMMAND`
    bytes); `chunking` says whether the upstream offers CHUNKING."""
    text = line[:-2] if line.endswith(b"\r\n") else line[:-1] if line.endswith(b"\n") else line
    if b"\r" in text or b"\0" in text:
        return Answer(BAD_CHARACTERS)
    verb = text.split(b" ", 1)[0].upper()
    local = LOCAL_REPLIES.get(verb)
    if local is not None:
        return Answer(local)
    if verb == b"BDAT":
        match = _BDAT.fullmatch(text)
        if match is None:
            return Answer(BDAT_SYNTAX)
        size, last = int(match[1]), match[2] is not None
        if not chunking:
            return Discard(size, NO_CHUNKING)
        return Chunk(text + b"\r\n", size, last)
    if verb in _ENVELOPE:
        arguments, syntax = _ENVELOPE[verb]
        if arguments.fullmatch(text[5:]) is None:
            return Answer(syntax)
    return Forward(verb, text + b"\r\n")


# -- message content -------------------------------------------------------------------------


class BareNewline(Exception):
    """Message content holds a bare CR or LF."""


class ContentChecker:
    """
    Checks message content for bare CR and bare LF across the pieces it arrives in
    (a CR at the end of one piece may be followed by its LF in the next, in DATA as
    across BDAT chunks).
    """

    def __init__(self) -> None:
        self._cr_pending = False

    def feed(self, data: bytes) -> None:
        """Raise BareNewline if `data`, following what was fed before, has one."""
        if not data:
            return
        joined = 0
        if self._cr_pending:
            if data[0:1] != b"\n":
                raise BareNewline()
            joined = 1
        crlf = data.count(b"\r\n")
        self._cr_pending = data.endswith(b"\r")
        if data.count(b"\n") != crlf + joined or data.count(b"\r") != crlf + self._cr_pending:
            raise BareNewline()

    def end(self) -> None:
        """The content is complete: a CR left at its end is bare."""
        if self._cr_pending:
            raise BareNewline()


END_OF_DATA = b"\r\n.\r\n"


class DataReader:
    """
    DATA content, piece by piece, up to and including its end line: `feed()` says how
    many bytes of a piece belong to the message and whether it ended there. The content
    starts at the beginning of a line, so `.\\r\\n` first thing ends an empty message.
    """

    def __init__(self) -> None:
        self.tail = b"\r\n"
        """The last bytes taken (where an end line may have begun)."""
        self.checker = ContentChecker()

    def feed(self, data: bytes) -> tuple[int, bool]:
        """(bytes of `data` that are content, whether the end line was among them);
        raises BareNewline when the content so far holds a bare CR or LF."""
        window = self.tail + data
        end = window.find(END_OF_DATA)
        if end >= 0:
            take = end + len(END_OF_DATA) - len(self.tail)
            self.checker.feed(data[:take])
            return take, True
        self.checker.feed(data)
        self.tail = window[-(len(END_OF_DATA) - 1) :]
        return len(data), False


_ANY_END_OF_DATA = re.compile(rb"[\r\n]\.\r?\n")


def lenient_end(window: bytes) -> int:
    """Where a sloppy client's message ends in `window` (just past the end line, by
    any server's reading), or -1: for skipping the rest of a refused message."""
    match = _ANY_END_OF_DATA.search(window)
    return match.end() if match else -1


# -- upstream replies ------------------------------------------------------------------------


class MalformedReply(Exception):
    """The upstream sent a line that is not part of an SMTP reply."""


@attrs.frozen
class ReplyLine:
    code: int
    last: bool
    text: bytes
    """Without code, separator and line ending."""


def reply_line(raw: bytes) -> ReplyLine:
    match = _REPLY_LINE.fullmatch(raw)
    if match is None:
        raise MalformedReply(f"upstream sent a malformed reply line: {raw[:80]!r}")
    return ReplyLine(int(match[1]), match[2] != b"-", match[3])


def single_reply(raw: bytes) -> tuple[int, bytes] | None:
    """A one-line reply as the client hears it: (code, the line as `reply_line` would
    rebuild it: code, space, text, CRLF), or None when `raw` begins a multi-line one.
    Raises MalformedReply as `reply_line` does."""
    match = _REPLY_LINE.fullmatch(raw)
    if match is None:
        raise MalformedReply(f"upstream sent a malformed reply line: {raw[:80]!r}")
    separator = match[2]
    if separator == b"-":
        return None
    code = int(match[1])
    if separator == b" " and raw.endswith(b"\r\n"):
        return code, raw  # the digits are the code's own ("%d"), the text ends before CRLF
    return code, b"%d %s\r\n" % (code, match[3])


def ehlo_reply(lines: list[ReplyLine]) -> tuple[bytes, bool]:
    """An upstream's EHLO reply as the client hears it (without `HIDDEN_EXTENSIONS`),
    and whether it offers CHUNKING."""
    kept = [lines[0]] + [line for line in lines[1:] if _keyword(line.text) not in HIDDEN_EXTENSIONS]
    chunking = any(_keyword(line.text) == "CHUNKING" for line in lines[1:])
    code = b"%d" % lines[0].code
    out = b"".join(code + (b" " if i == len(kept) - 1 else b"-") + line.text + b"\r\n" for i, line in enumerate(kept))
    return out, chunking


def _keyword(text: bytes) -> str:
    words = text.split(None, 1)
    return words[0].decode("ascii", "replace").upper() if words else ""
