"""The code's own hygiene: type hints checked by mypy (with the zope plugin), in the
package and in its tests, and lint by ruff."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_mypy_finds_no_type_errors() -> None:
    result = run(sys.executable, "-m", "mypy", "mailrelay", "tests")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_ruff_finds_no_lint() -> None:
    result = run(sys.executable, "-m", "ruff", "check", "mailrelay", "tests", "twisted", "mailrelay.tac", "bench")
    assert result.returncode == 0, result.stdout + result.stderr


def test_setup_cfg_lists_every_package() -> None:
    # setup.cfg names packages one by one (twisted.plugins has no __init__.py, so
    # find_packages would miss it): a new package left out installs without it, and
    # only the tests that run the installed package (twistd, workers) notice.
    import configparser

    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    listed = set(setup["options"]["packages"].split())
    found = {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "mailrelay").rglob("__init__.py")}
    assert found <= listed, sorted(found - listed)
