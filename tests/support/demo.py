"""
The demo (`mailrelay.demo`) from the outside: a port offset whose seven ports are free,
the README's commands, and running the commands the demo prints exactly as printed.
"""

from __future__ import annotations

import random
import re
import socket
import subprocess
from pathlib import Path

from mailrelay.demo.instructions import READY, STOP
from mailrelay.demo.setup import LISTENERS
from tests.support.net import WAIT

README_COMMAND = "python3 -m venv .venv && .venv/bin/pip install . && .venv/bin/twistd -n mailrelay"
"""The README's first command: from a fresh clone to the running demo. The README must
hold it verbatim (`test_the_readme_names_its_two_commands`)."""
README_TEST_COMMAND = "dev/test"
"""The README's second command: the project's tests (not run from the tests: recursion)."""

BLOCK = re.compile(rf"^{re.escape(READY)}$.*?^{re.escape(STOP)}.*$", re.MULTILINE | re.DOTALL)
"""The printed block, from its first line to its last."""


def free_port_offset() -> int:
    """An offset at which every demo listener's port is free on 127.0.0.1 now (checked by
    binding each): the tests never collide with each other or with a running demo."""
    for _ in range(200):
        offset = random.randrange(11000, 31000)  # all seven below Linux's ephemeral ports (32768-)
        held: list[socket.socket] = []
        try:
            for listener in LISTENERS:
                s = socket.socket()
                held.append(s)
                s.bind(("127.0.0.1", offset + listener.standard_port))
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
        return offset
    raise AssertionError("no port offset with seven free ports on 127.0.0.1")


def printed_block(output: str) -> str:
    match = BLOCK.search(output)
    assert match, f"no instructions block in:\n{output}"
    return match.group(0)


def printed_commands(output: str) -> list[str]:
    """The commands of the printed block: its lines that start with `curl `."""
    commands = [line for line in printed_block(output).splitlines() if line.startswith("curl ")]
    assert len(commands) == 4, commands
    return commands


def run_printed(command: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """One printed line, run as a user pasting it into bash would; it must succeed."""
    result = subprocess.run(["bash", "-c", command], cwd=cwd, capture_output=True, text=True, timeout=WAIT)
    assert result.returncode == 0, f"{command}: exit status {result.returncode}\n{result.stdout}{result.stderr}"
    return result


def demo_folder(output: str) -> Path:
    """The demo's temporary folder, as its last printed line names it."""
    match = re.search(rf"^{re.escape(STOP)} and removes (\S+)\.$", output, re.MULTILINE)
    assert match, output
    return Path(match.group(1))
