"""
The `mailrelay` command as an administrator runs it: the console script the package
installs (next to this Python), run from a temporary directory so that it is the
installed package that answers, and `python -m mailrelay`, which must say the same.
"""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from mailrelay.__main__ import main

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(sys.executable).parent / "mailrelay"
WAIT = 60.0  # hang guard for a subprocess, never a timing assertion


def run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SCRIPT), *args], cwd=tmp_path, capture_output=True, text=True, timeout=WAIT)


def test_version_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["version"]) == 0
    assert capsys.readouterr().out == f"mailrelay {metadata.version('mailrelay')}\n"


def test_help_lists_the_commands_for_people_only(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit:
        main(["--help"], prog="mailrelay")
    assert exit.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: mailrelay ")
    for command in ("check", "demo", "from-nginx", "version"):
        assert f"\n    {command}" in out, command
    # `worker` is how the supervisor starts its children, not a command for people.
    assert "worker" not in out


@pytest.mark.slow
def test_console_script_is_installed_and_answers(tmp_path: Path) -> None:
    assert SCRIPT.exists(), f"{SCRIPT}: the package's console script is not installed (pip install .)"
    result = run(tmp_path, "version")
    assert (result.returncode, result.stdout, result.stderr) == (0, f"mailrelay {metadata.version('mailrelay')}\n", "")


@pytest.mark.slow
def test_console_script_check_says_what_python_m_says(tmp_path: Path) -> None:
    config = ROOT / "examples" / "splice.toml"
    script = run(tmp_path, "check", str(config))
    module = subprocess.run(
        [sys.executable, "-m", "mailrelay", "check", str(config)], cwd=tmp_path, capture_output=True, text=True, timeout=WAIT
    )
    assert script.returncode == module.returncode == 0
    assert script.stdout == module.stdout
    assert script.stdout.startswith(f"{config}: configuration is valid\n")


@pytest.mark.slow
def test_without_a_command_usage_names_the_script(tmp_path: Path) -> None:
    result = run(tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("usage: mailrelay ")
    assert "COMMAND" in result.stderr
    module = subprocess.run([sys.executable, "-m", "mailrelay"], cwd=tmp_path, capture_output=True, text=True, timeout=WAIT)
    assert module.stderr.startswith("usage: python -m mailrelay ")
