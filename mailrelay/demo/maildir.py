"""
The demo user's maildir: delivery into it, and the list of its messages with their
flags and IMAP UIDs.

Delivery writes into `tmp/` and renames into `new/`, so a reader never sees half a
message. Flags live in the file name (`cur/<unique>:2,<letters>`, letters sorted), as
every maildir reader expects. UIDs are handed out in delivery order the first time a
message is seen and never change while the demo runs: a client may keep them between
sessions (the demo's UIDVALIDITY is new each run, so no client confuses two runs).
"""

from __future__ import annotations

import itertools
import os
import socket
import time
from pathlib import Path

import attrs

__all__ = ["FLAG_LETTERS", "Maildir", "StoredMessage"]

FLAG_LETTERS = {"\\Seen": "S", "\\Answered": "R", "\\Flagged": "F", "\\Deleted": "T", "\\Draft": "D"}
"""IMAP system flags and their maildir letters (Dovecot's, Courier's)."""
_FLAGS_OF = {letter: flag for flag, letter in FLAG_LETTERS.items()}
_counter = itertools.count(1)


@attrs.frozen
class StoredMessage:
    """One message in the maildir, as found when the list was read."""

    unique: str
    """The file name up to the `:` (stable while flags change)."""
    path: Path
    uid: int
    flags: tuple[str, ...]
    """IMAP flags, from the file name."""
    recent: bool
    """Still in `new/`: no reader has taken note of it."""
    delivered: float
    """Modification time: the internal date."""

    def read(self) -> bytes:
        return self.path.read_bytes()


class Maildir:
    """The maildir at `path` (created if missing). Each IMAP session reads `messages()`
    once, when it selects the mailbox; UIDs are this object's, so keep one per folder."""

    def __init__(self, path: Path) -> None:
        self.path = path
        for sub in ("tmp", "new", "cur"):
            (path / sub).mkdir(parents=True, exist_ok=True)
        self.uid_validity = int(time.time())
        self._uids: dict[str, int] = {}
        self._next_uid = 1

    @property
    def uid_next(self) -> int:
        return self._next_uid

    def deliver(self, message: bytes) -> Path:
        """Store `message` (LF line endings) in `new/`: visible whole or not at all."""
        unique = f"{time.time_ns()}.P{os.getpid()}Q{next(_counter)}.{socket.gethostname().replace('/', '_')}"
        temporary = self.path / "tmp" / unique
        with open(temporary, "xb") as file:
            file.write(message)
            file.flush()
            os.fsync(file.fileno())
        final = self.path / "new" / unique
        os.rename(temporary, final)
        return final

    def messages(self) -> list[StoredMessage]:
        """Every message, oldest delivery first; messages seen the first time get the next UIDs."""
        found: list[tuple[float, str, Path, str, bool]] = []
        for sub in ("new", "cur"):
            for entry in os.scandir(self.path / sub):
                if entry.name.startswith(".") or not entry.is_file():
                    continue
                unique, _, info = entry.name.partition(":")
                letters = info[2:] if info.startswith("2,") else ""
                found.append((entry.stat().st_mtime, unique, Path(entry.path), letters, sub == "new"))
        found.sort(key=lambda f: (f[0], f[1]))
        for _, unique, _, _, _ in found:
            if unique not in self._uids:
                self._uids[unique] = self._next_uid
                self._next_uid += 1
        listed = [
            StoredMessage(unique, path, self._uids[unique], tuple(_FLAGS_OF[c] for c in letters if c in _FLAGS_OF), recent, mtime)
            for mtime, unique, path, letters, recent in found
        ]
        listed.sort(key=lambda m: m.uid)
        return listed

    def set_flags(self, message: StoredMessage, flags: tuple[str, ...]) -> StoredMessage:
        """Rename the message's file to carry `flags` (unknown ones are dropped: a maildir
        keeps system flags only, without a keywords file)."""
        letters = "".join(sorted(FLAG_LETTERS[f] for f in set(flags) if f in FLAG_LETTERS))
        target = self.path / "cur" / f"{message.unique}:2,{letters}"
        if target != message.path:
            os.rename(message.path, target)
        kept = tuple(f for f in FLAG_LETTERS if f in flags)
        return attrs.evolve(message, path=target, flags=kept, recent=False)

    def remove(self, message: StoredMessage) -> None:
        os.unlink(message.path)
