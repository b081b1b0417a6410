"""
An IMAP mailbox over the demo's maildir, for twisted.mail's `IMAP4Server` (Twisted ships
IMAP mailboxes in memory only).

Each session's mailbox is a snapshot taken when it is made (at login): its sequence
numbers stay put while the session runs, as IMAP requires without EXPUNGE, and mail
delivered meanwhile shows at the next login. UIDs are the `Maildir`'s, so they are the
same in every session. One INBOX; flags are the five system flags, kept in the file
names. Good enough to move mail through mailrelay, not a mail store.
"""

from __future__ import annotations

import email.parser
import email.policy
import email.utils
import io
from collections.abc import Iterator
from typing import Any

from twisted.mail import imap4
from zope.interface import implementer

from .maildir import FLAG_LETTERS, Maildir, StoredMessage

__all__ = ["MaildirAccount", "MaildirMailbox", "MaildirMessage"]


def _crlf(data: bytes) -> bytes:
    """IMAP sends messages with CRLF line ends; a maildir holds LF ones."""
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


@implementer(imap4.IMessage, imap4.IMessageFile)
class MaildirMessage:
    """One message of a session's snapshot, read from its file when first asked for."""

    def __init__(self, stored: StoredMessage) -> None:
        self.stored = stored
        self._content: bytes | None = None

    @property
    def content(self) -> bytes:
        if self._content is None:
            self._content = _crlf(self.stored.read())
        return self._content

    def _split(self) -> tuple[bytes, bytes]:
        header, separator, body = self.content.partition(b"\r\n\r\n")
        if not separator:  # no body: all header
            return self.content, b""
        return header + b"\r\n", body

    # IMessage
    def getUID(self) -> int:
        return self.stored.uid

    def getFlags(self) -> list[str]:
        flags = list(self.stored.flags)
        return [*flags, "\\Recent"] if self.stored.recent else flags

    def getInternalDate(self) -> str:
        return email.utils.formatdate(self.stored.delivered)

    # IMessagePart
    def getHeaders(self, negate: bool, *names: Any) -> dict[str, str]:
        wanted = {(n.decode("ascii", "replace") if isinstance(n, bytes) else str(n)).lower() for n in names}
        parsed = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(self._split()[0])
        headers: dict[str, str] = {}
        for name, value in parsed.items():
            key = name.lower()
            if (key in wanted) != negate and key not in headers:
                headers[key] = str(value)
        return headers

    def getBodyFile(self) -> io.BytesIO:
        return io.BytesIO(self._split()[1])

    def getSize(self) -> int:
        return len(self.content)

    def isMultipart(self) -> bool:
        return False  # BODYSTRUCTURE of a multipart message is not the demo's business

    def getSubPart(self, part: int) -> Any:
        raise IndexError(part)

    # IMessageFile: BODY[] and RFC822 are the file as it is
    def open(self) -> io.BytesIO:
        return io.BytesIO(self.content)


@implementer(imap4.IMailbox)
class MaildirMailbox:
    """A session's INBOX: the maildir's messages when the session logged in."""

    def __init__(self, maildir: Maildir) -> None:
        self.maildir = maildir
        self.messages = [MaildirMessage(stored) for stored in maildir.messages()]
        self.listeners: list[Any] = []

    def getFlags(self) -> list[str]:
        return list(FLAG_LETTERS)

    def getHierarchicalDelimiter(self) -> str:
        return "/"

    def getUIDValidity(self) -> int:
        return self.maildir.uid_validity

    def getUIDNext(self) -> int:
        return self.maildir.uid_next

    def getUID(self, message: int) -> int:
        return self.messages[message - 1].getUID()

    def getMessageCount(self) -> int:
        return len(self.messages)

    def getRecentCount(self) -> int:
        return sum(1 for m in self.messages if m.stored.recent)

    def getUnseenCount(self) -> int:
        return sum(1 for m in self.messages if "\\Seen" not in m.stored.flags)

    def isWriteable(self) -> bool:
        return True

    def destroy(self) -> None:
        raise imap4.MailboxException("the demo's INBOX cannot be deleted")

    def requestStatus(self, names: Any) -> dict[str, int]:
        return imap4.statusRequestHelper(self, names)

    def addListener(self, listener: Any) -> None:
        self.listeners.append(listener)

    def removeListener(self, listener: Any) -> None:
        self.listeners.remove(listener)

    def addMessage(self, message: Any, flags: Any = (), date: Any = None) -> Any:
        raise imap4.MailboxException("APPEND is not offered by the demo: send mail through SMTP")

    def expunge(self) -> list[int]:
        """Remove the messages flagged \\Deleted; their sequence numbers, highest first, so
        that each EXPUNGE response is right after the ones before it."""
        gone = [seq for seq, m in enumerate(self.messages, 1) if "\\Deleted" in m.stored.flags]
        for seq in reversed(gone):
            self.maildir.remove(self.messages[seq - 1].stored)
            del self.messages[seq - 1]
        return list(reversed(gone))

    def _matching(self, messages: imap4.MessageSet, uid: bool) -> Iterator[tuple[int, MaildirMessage]]:
        """The messages `messages` names, by UID or by sequence number; `*` is the
        highest one in use."""
        try:
            if uid:
                messages.last = self.messages[-1].getUID() if self.messages else 0
            else:
                messages.last = len(self.messages)
        except ValueError:
            pass  # already set by the caller
        for seq, message in enumerate(self.messages, 1):
            if (message.getUID() if uid else seq) in messages:
                yield seq, message

    def fetch(self, messages: imap4.MessageSet, uid: bool) -> list[tuple[int, MaildirMessage]]:
        return list(self._matching(messages, uid))

    def store(self, messages: imap4.MessageSet, flags: Any, mode: int, uid: bool) -> dict[int, list[str]]:
        """Set (mode 0), add (1) or remove (-1) `flags`; each message's flags afterwards."""
        changing = {(f.decode() if isinstance(f, bytes) else f) for f in flags}
        result: dict[int, list[str]] = {}
        for seq, message in list(self._matching(messages, uid)):
            current = set(message.stored.flags)
            new = changing if mode == 0 else current | changing if mode > 0 else current - changing
            message.stored = self.maildir.set_flags(message.stored, tuple(new))
            result[seq] = message.getFlags()
        return result


class MaildirAccount(imap4.MemoryAccountWithoutNamespaces):
    """A logged-in user's mailboxes: INBOX over the maildir, and nothing else."""

    def __init__(self, name: str, maildir: Maildir) -> None:
        super().__init__(name)
        self.addMailbox("INBOX", MaildirMailbox(maildir))

    def create(self, pathspec: Any) -> bool:
        return False  # one folder only
