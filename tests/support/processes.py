"""
mailrelay as a child process: `twistd` running the *installed* package (each started in
a temporary directory, so the source tree is not importable) and `python -m mailrelay
check`. Every wait has a hang guard; none is a timing assertion.

About exit statuses: twistd stops on SIGTERM by running the whole shutdown (listeners
stop, sessions drain, "Server Shut Down." is logged) and then, by Twisted's design,
re-raises the signal so that the process reports how it was asked to stop
(`twisted.application.app._exitWithSignal`). A clean stop is therefore exit status 0
or "killed by SIGTERM" *after* "Server Shut Down." was logged; `assert_clean_stop`
checks exactly that, so a process killed before its shutdown ran fails it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

WAIT = 60.0
"""Hang guard for every wait on a process or a socket; never a timing assertion."""

TWISTD = Path(sys.executable).parent / "twistd"
LISTENING = r"listener {name} on 127\.0\.0\.1:(\d+)"
SHUT_DOWN = "Server Shut Down."


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child: no PYTHONPATH, so only installed code is importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILRELAY_") and k != "PYTHONPATH"}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class Process:
    """A child process whose output (stdout and stderr together) is collected by a thread."""

    def __init__(self, args: Sequence[str | os.PathLike[str]], cwd: Path, env: dict[str, str]) -> None:
        self.args = [str(a) for a in args]
        self.popen = subprocess.Popen(
            self.args, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self._lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for raw in self.popen.stdout:
            with self._changed:
                self._lines.append(raw.decode("utf-8", "replace"))
                self._changed.notify_all()
        with self._changed:
            self._lines.append("")  # end of output
            self._changed.notify_all()

    @property
    def output(self) -> str:
        with self._changed:
            return "".join(self._lines)

    def wait_for(self, pattern: str, timeout: float = WAIT, count: int = 1) -> re.Match[str]:
        """The `count`th match of `pattern` in the output, waiting for it to appear."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        with self._changed:
            while True:
                matches = list(regex.finditer("".join(self._lines)))
                if len(matches) >= count:
                    return matches[count - 1]
                ended = self._lines and self._lines[-1] == ""
                left = deadline - time.monotonic()
                if ended or left <= 0:
                    why = "the process ended" if ended else f"{timeout:g}s passed"
                    raise AssertionError(f"{pattern!r} not in the output of {self.args} ({why}):\n{''.join(self._lines)}")
                self._changed.wait(left)

    def signal(self, number: int) -> None:
        self.popen.send_signal(number)

    def wait(self, timeout: float = WAIT) -> int:
        """The exit status; the output is complete when this returns."""
        try:
            status = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.args} still running after {timeout:g}s:\n{self.output}") from None
        self._reader.join(timeout)
        return status

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        try:
            self.popen.wait(WAIT)
        finally:
            if self.popen.stdout is not None:
                self._reader.join(WAIT)
                self.popen.stdout.close()


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Process]]:
    """Start processes in tmp_path; every one is killed at teardown, whatever happened."""
    started: list[Process] = []

    def start(*args: str | os.PathLike[str], **env: str) -> Process:
        process = Process(args, tmp_path, child_env(**env))
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()


def assert_clean_stop(process: Process) -> str:
    """Wait for a process that was sent SIGTERM; it must have shut down, not died."""
    status = process.wait()
    output = process.output
    assert status in (0, -signal.SIGTERM), f"exit status {status}:\n{output}"
    assert SHUT_DOWN in output, output
    assert "Traceback" not in output, output
    return output


def run_check(tmp_path: Path, name: str = "mailrelay.toml") -> subprocess.CompletedProcess[str]:
    """`python -m mailrelay check NAME`, run in tmp_path (relative file name), with tmp_path
    on PYTHONPATH so that router modules written there import."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(tmp_path)
    return subprocess.run(
        [sys.executable, "-m", "mailrelay", "check", name],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
