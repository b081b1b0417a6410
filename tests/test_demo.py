"""
The demo as a newcomer runs it: `twistd -n mailrelay` (no configuration), `mailrelay
demo`, and the README's first command from a fresh virtual environment. Each test runs
exactly the commands the demo printed, through bash, and checks that the mail came back
over IMAP and POP3 and that the log holds a session line for each step.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from mailrelay.demo.instructions import MX_SUBJECT, STOP, SUBJECT
from tests.support.demo import (
    README_COMMAND,
    README_TEST_COMMAND,
    demo_folder,
    free_port_offset,
    printed_commands,
    run_printed,
)
from tests.support.processes import TWISTD, WAIT, Process, assert_clean_stop, child_env

pytestmark = pytest.mark.slow

SOURCE = Path(__file__).resolve().parent.parent
MAILRELAY = Path(sys.executable).parent / "mailrelay"


def moves_mail(process: Process, cwd: Path, ready_within: float = WAIT) -> str:
    """Run the printed commands once the demo has printed them; check what came back and
    what was logged; the demo's output so far."""
    process.wait_for(rf"(?m)^{re.escape(STOP)}.*$\n", timeout=ready_within)
    send, imap, pop3, mx = (run_printed(command, cwd) for command in printed_commands(process.output))
    assert f"Subject: {SUBJECT}" in imap.stdout and "submission listener" in imap.stdout, imap.stdout
    assert f"Subject: {SUBJECT}" in pop3.stdout and "submission listener" in pop3.stdout, pop3.stdout
    for listener in ("submission", "imaps", "pop3s"):
        process.wait_for(rf"session \w+ listener={listener} client=127\.0\.0\.1:\d+ user=demo@example\.test .*outcome=closed")
    process.wait_for(r"session \w+ listener=mx client=127\.0\.0\.1:\d+ user=- .*outcome=closed")
    # The MX mail went in too: it is message 2 (read directly: the printed commands read 1).
    again = run_printed(imap.args[2].replace("UID=1", "UID=2"), cwd)
    assert f"Subject: {MX_SUBJECT}" in again.stdout, again.stdout
    return process.output


def test_twistd_without_a_configuration_runs_the_demo(tmp_path: Path, spawn: Callable[..., Process]) -> None:
    process = spawn(TWISTD, "-n", "mailrelay", "--port-offset", str(free_port_offset()))
    output = moves_mail(process, tmp_path)
    folder = demo_folder(output)
    assert folder.is_dir()
    process.signal(signal.SIGTERM)
    assert_clean_stop(process)
    assert not folder.exists(), "the demo's folder outlived it"


def test_mailrelay_demo_runs_the_demo(tmp_path: Path, spawn: Callable[..., Process]) -> None:
    process = spawn(MAILRELAY, "demo", "--port-offset", str(free_port_offset()))
    output = moves_mail(process, tmp_path)
    assert "Traceback" not in output, output
    process.signal(signal.SIGINT)  # Ctrl-C
    assert process.wait() == 0, process.output
    assert process.output.rstrip().endswith("mailrelay demo: stopped."), process.output
    assert not demo_folder(output).exists()


def test_a_taken_port_stops_the_demo_with_the_reason(tmp_path: Path, spawn: Callable[..., Process]) -> None:
    import socket

    offset = free_port_offset()
    taken = socket.socket()
    taken.bind(("127.0.0.1", offset + 993))
    taken.listen()
    try:
        process = spawn(TWISTD, "-n", "mailrelay", "--port-offset", str(offset))
        assert process.wait() == 1, process.output
    finally:
        taken.close()
    assert f'listener "imaps" (tcp:{offset + 993}:interface=127.0.0.1) cannot listen' in process.output, process.output
    assert "Traceback" not in process.output, process.output
    folder = re.search(r"files in (\S+)", process.output)
    assert folder and not Path(folder.group(1)).exists(), process.output


def test_the_readme_command_from_a_fresh_virtual_environment(tmp_path: Path) -> None:
    """The README's first command, in a copy of the source tree, with `--port-offset N`
    appended (so that it cannot collide with a demo already running on the defaults)."""
    copy = tmp_path / "mailrelay"
    shutil.copytree(
        SOURCE,
        copy,
        ignore=shutil.ignore_patterns(
            ".venv", ".git", "build", "*.egg-info", "__pycache__", ".mypy_cache", ".pytest_cache", ".ruff_cache", ".hypothesis"
        ),
    )
    # `python3` is the interpreter running the tests (a bare python3 may be older than
    # mailrelay supports): its folder goes first on PATH.
    env = child_env(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    command = f"{README_COMMAND} --port-offset {free_port_offset()}"
    # In a session of its own (setsid execs bash in place): the stop signal must reach
    # twistd, which bash runs as its child.
    process = Process(["setsid", "bash", "-c", command], copy, env)
    try:
        output = moves_mail(process, copy, ready_within=900)  # pip install from PyPI first: minutes at most
        assert (copy / ".venv" / "bin" / "twistd").exists()
        os.killpg(process.popen.pid, signal.SIGTERM)
        assert_clean_stop(process)
        assert not demo_folder(output).exists()
    finally:
        if process.popen.poll() is None or _group_alive(process.popen.pid):
            os.killpg(process.popen.pid, signal.SIGKILL)
        process.kill()


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


def test_the_readme_names_its_two_commands() -> None:
    readme = (SOURCE / "README.md").read_text()
    assert README_COMMAND in readme, f"README.md does not hold the demo's command: {README_COMMAND}"
    assert README_TEST_COMMAND in readme
