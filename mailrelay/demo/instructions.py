"""
What the demo prints once everything listens: what runs where, the demo user, and
commands to paste. Plain text for a terminal, written to the real standard output
(not the log: no timestamps in front of a command someone pastes).

Commands use stock `curl` and verify mailrelay's certificate against the demo's CA
(`--cacert`), as a client in a deployment would; none uses `-k`. The only secret in
the text is the demo user's password: the key's path is never named.
"""

from __future__ import annotations

import email.utils
import shlex
from pathlib import Path

import attrs

from .certificate import DemoCertificates
from .setup import LISTENERS
from .upstream import DemoUser, UpstreamPorts

__all__ = ["READY", "STOP", "Instructions", "write_messages"]

READY = "mailrelay demo: ready."
"""The first line of the printed block."""
STOP = "Ctrl-C stops the demo"
"""The start of its last line."""

MESSAGE_FILE = "message.eml"
MX_MESSAGE_FILE = "mx-message.eml"
SUBJECT = "Hello through mailrelay"
MX_SUBJECT = "Delivered through the splice listener"


def write_messages(folder: Path, user: DemoUser) -> tuple[Path, Path]:
    """The two messages the printed commands send (CRLF line ends: SMTP's)."""
    sent = _message(
        user.address, user.address, SUBJECT, "This message reached the demo's mailbox through mailrelay's submission listener."
    )
    mx = _message(
        "someone@example.net", user.address, MX_SUBJECT, "An MX delivery: mailrelay spliced the bytes without reading them."
    )
    paths = folder / MESSAGE_FILE, folder / MX_MESSAGE_FILE
    for path, text in zip(paths, (sent, mx), strict=True):
        path.write_bytes(text.encode().replace(b"\n", b"\r\n"))
    return paths


def _message(sender: str, recipient: str, subject: str, body: str) -> str:
    return (
        f"From: {sender}\nTo: {recipient}\nSubject: {subject}\nDate: {email.utils.formatdate(localtime=True)}\n"
        f"Message-ID: {email.utils.make_msgid(domain='example.test')}\n\n{body}\n"
    )


@attrs.frozen
class Instructions:
    folder: Path
    config: Path
    ports: dict[str, int]
    """Each listener's port, by name."""
    upstream: UpstreamPorts
    user: DemoUser
    certificates: DemoCertificates
    messages: tuple[Path, Path]

    def commands(self) -> list[str]:
        """The commands, one shell line each, in the order they make sense."""
        q = shlex.quote
        # -sS: no progress meter between the log lines, but errors still shown.
        ca = f"--cacert {q(str(self.certificates.ca))}"
        login = f"--user {q(self.user.address + ':' + self.user.password)}"
        sent, mx = self.messages
        return [
            f"curl -sS --ssl-reqd {ca} {login} --url smtp://127.0.0.1:{self.ports['submission']}"
            f" --mail-from {self.user.address} --mail-rcpt {self.user.address} --upload-file {q(str(sent))}",
            f"curl -sS {ca} {login} 'imaps://127.0.0.1:{self.ports['imaps']}/INBOX;UID=1'",
            f"curl -sS {ca} {login} pop3s://127.0.0.1:{self.ports['pop3s']}/1",
            f"curl -sS --url smtp://127.0.0.1:{self.ports['mx']}"
            f" --mail-from someone@example.net --mail-rcpt {self.user.address} --upload-file {q(str(mx))}",
        ]

    def text(self) -> str:
        send, imap, pop3, mx = self.commands()
        listeners = [
            f"  {listener.mode:<9} {listener.protocol:<5} 127.0.0.1:{self.ports[listener.name]:<6} {listener.what}"
            for listener in LISTENERS
        ]
        lines = [
            "",
            READY,
            f"mailrelay listens on (configuration: {self.config}):",
            *listeners,
            f"in front of the demo's mail servers (twisted.mail) on 127.0.0.1: SMTP {self.upstream.smtp},"
            f" IMAP {self.upstream.imap}, POP3 {self.upstream.pop3}, all on one maildir.",
            f"Demo user: {self.user.address}   password: {self.user.password}",
            f"Clients verify mailrelay's certificate against {self.certificates.ca} (the demo's own CA).",
            "",
            "Paste these; the log shows one session line for each:",
            "# 1. send a mail through the STARTTLS submission listener (mailrelay logs in upstream with your password)",
            send,
            "# 2. read it back over IMAP with TLS",
            imap,
            "# 3. and over POP3 with TLS",
            pop3,
            "# 4. deliver one as an MX does, through the splice listener (no TLS, no login: bytes pass unread)",
            mx,
            "",
            f"{STOP} and removes {self.folder}.",
            "",
        ]
        return "\n".join(lines)
