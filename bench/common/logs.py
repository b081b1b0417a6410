"""What mailrelay's log says about a benchmark's sessions: outcomes, bytes, crashes, and
its unusual lines."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class SessionLog:
    """What mailrelay's log says about its sessions (see `read_session_log`)."""

    outcomes: dict[tuple[str, str], int] = field(default_factory=dict)
    """(listener, outcome) -> session lines."""
    up: dict[str, int] = field(default_factory=dict)
    """listener -> the sum of the `up=` bytes of its session lines (client to upstream)."""
    down: dict[str, int] = field(default_factory=dict)
    """listener -> the sum of the `down=` bytes (upstream to client)."""
    problems: list[str] = field(default_factory=list)
    """Lines that look like a crash: a traceback, an unhandled error, an internal error."""

    def count(self, outcome: str | None = None) -> int:
        """Session lines with `outcome` (any outcome: None), over all listeners."""
        return sum(n for (_, o), n in self.outcomes.items() if outcome is None or o == outcome)


_SESSION_BYTES = re.compile(r" up=(\d+) down=(\d+) ")


def read_session_log(log_files: list[Path]) -> SessionLog:
    """
    The session lines of mailrelay's logs, rotated files (`NAME.1`, ...) included. A log
    that twistd rotates while it is read can be counted twice or not at all: read until
    two reads agree when that matters.
    """
    result = SessionLog()
    for log in log_files:
        for path in sorted(log.parent.glob(log.name + "*")):
            try:
                text = path.read_text(errors="replace")
            except FileNotFoundError:  # rotated away between the glob and the read
                continue
            for line in text.splitlines():
                m = re.search(r" outcome=(\S+)", line)
                if m and " session " in line:
                    named = re.search(r" listener=(\S+)", line)
                    listener = named.group(1) if named else "?"
                    key = (listener, m.group(1))
                    result.outcomes[key] = result.outcomes.get(key, 0) + 1
                    counted = _SESSION_BYTES.search(line)
                    if counted:
                        result.up[listener] = result.up.get(listener, 0) + int(counted.group(1))
                        result.down[listener] = result.down.get(listener, 0) + int(counted.group(2))
                elif "Traceback" in line or "Unhandled" in line or "internal error" in line:
                    result.problems.append(line)
    return result


def mailrelay_log_summary(name: str, log_files: list[Path], by_listener: bool = False) -> str:
    """Session log lines counted by outcome (and by listener), and anything that looks like a crash."""
    log = read_session_log(log_files)
    outcomes: dict[str, int] = {}
    for (listener, outcome), n in log.outcomes.items():
        key = f"{listener} {outcome}" if by_listener else outcome
        outcomes[key] = outcomes.get(key, 0) + n
    text = ", ".join(f"{k}={v}" for k, v in sorted(outcomes.items())) or "no session lines"
    return f"{name} log: sessions {text}; tracebacks/internal errors: {len(log.problems)}"


def mailrelay_warnings(log_files: list[Path], limit: int = 5) -> list[str]:
    """The distinct warning and error lines of mailrelay's log (session ids and ports folded), with counts."""
    counts: dict[str, int] = {}
    for log in log_files:
        for path in sorted(log.parent.glob(log.name + "*")):
            for line in path.read_text(errors="replace").splitlines():
                if " outcome=closed" in line or ("listener " in line and " on " in line):
                    continue
                if re.search(r"(?i)warn|error|fail|traceback|unhandled|outcome=", line):
                    text = re.sub(r"^\S+ \S+ ", "", line)  # the timestamp
                    text = re.sub(r"\b[0-9a-f]{8}\b", "ID", text)
                    text = re.sub(r"(\d+\.\d+\.\d+\.\d+):\d+", r"\1:PORT", text)
                    text = re.sub(r"\b(up|down)=\d+|duration=[0-9.]+s", r"\1=N", text)
                    counts[text] = counts.get(text, 0) + 1
    return most_frequent(counts, limit)


def most_frequent(counts: dict[str, int], limit: int) -> list[str]:
    """The `limit` most frequent of the (folded) lines `counts` counts, with their counts."""
    ranked = sorted(counts.items(), key=lambda item: -item[1])
    lines = [f"  {n:6d} x {text}" for text, n in ranked[:limit]]
    if len(ranked) > limit:
        lines.append(f"  ... and {len(ranked) - limit} more kinds")
    return lines
