"""
Dovecot as bench/imap.py runs it: `tests.support.dovecot.Dovecot` (the repository's test
helper, imported from the repository root), its process group watched so that it does
not outlive a bench killed outright, and its log summarised for the report.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from common.logs import most_frequent
from common.processes import Children

if TYPE_CHECKING:
    from tests.support.dovecot import Dovecot

ROOT = Path(__file__).resolve().parents[2]


def mailservers() -> ModuleType:
    """tests/support/dovecot.py (the repository's test helpers), imported from the repository root."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import tests.support.dovecot

    return tests.support.dovecot


def dovecot_pgid(dovecot: Dovecot) -> int:
    """The process group of Dovecot's processes (REAPER's: the master and its children stay in it)."""
    groups = set()
    for pid in dovecot.processes():
        try:
            groups.add(os.getpgid(pid))
        except ProcessLookupError:
            pass
    if len(groups) != 1:
        raise RuntimeError(f"Dovecot's processes are in {len(groups)} process groups ({sorted(groups)}), not one")
    return groups.pop()


# Dovecot is not a child of ours in the sense of Children (tests.support.dovecot starts it in
# its own session, without PR_SET_PDEATHSIG), so a watchdog process kills its process group
# should the bench die without stopping it (SIGKILL): its stdin closes without "disarm".
WATCHDOG = """\
import os, signal, sys
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # PR_SET_PDEATHSIG: what counts is stdin
if sys.stdin.buffer.read() != b"disarm":
    try:
        os.killpg(int(sys.argv[1]), signal.SIGKILL)
    except ProcessLookupError:
        pass
"""


def start_watchdog(children: Children, pgid: int) -> subprocess.Popen[bytes]:
    """A watchdog that kills process group `pgid` unless `release`d (see WATCHDOG)."""
    return children.popen([sys.executable, "-c", WATCHDOG, str(pgid)], stdin=subprocess.PIPE)


def release(watchdog: subprocess.Popen[bytes], kill: bool) -> None:
    """Dovecot was stopped: the watchdog exits without killing anything; or it was not (`kill`): it kills what is left."""
    assert watchdog.stdin is not None
    try:
        if not kill:
            watchdog.stdin.write(b"disarm")
        watchdog.stdin.close()
        watchdog.wait(5)
    except (OSError, subprocess.TimeoutExpired):
        pass


def dovecot_log_summary(text: str, limit: int = 6) -> list[str]:
    """Logins and logouts counted, and Dovecot's warning and error lines (pids, ids and numbers folded), with counts."""
    logins = logouts = 0
    counts: dict[str, int] = {}
    for line in text.splitlines():
        if "-login: Info: Login: " in line:
            logins += 1
        elif re.search(r": Info: (?:Disconnected: )?Logged out ", line):
            logouts += 1
        elif re.search(r": (?:Warning|Error|Fatal|Panic): |Disconnected|process_limit|client_limit", line):
            if not logins and "Aborted login by logging out (no auth attempts" in line:
                continue  # Dovecot.start()'s check that it greets
            folded = re.sub(r"^\w{3} +\d+ [\d:]+ ", "", line)  # the timestamp
            folded = re.sub(r"<[^<>]*>", "<>", folded)
            folded = re.sub(r"\d+", "N", folded)
            counts[folded] = counts.get(folded, 0) + 1
    lines = [
        f"Dovecot log: logins {logins}, logged out {logouts}; warnings, errors, limits and other disconnections: {sum(counts.values())}"
    ]
    return lines + most_frequent(counts, limit)
