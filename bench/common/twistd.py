"""mailrelay as the benchmarks run it: a configuration written for the run, and a real
`twistd` whose log says which ports its listeners got."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common.processes import Children
from common.targets import Certificates

LISTENER_LINE = re.compile(r"listener (\S+) on 127\.0\.0\.1:(\d+)")


def twistd_command() -> str:
    twistd = Path(sys.executable).parent / "twistd"
    return str(twistd) if twistd.exists() else (shutil.which("twistd") or "twistd")


def start_twistd(
    children: Children, workdir: Path, name: str, config_text: str, listeners: int, python_wrapper: str | None = None
) -> tuple[subprocess.Popen[Any], dict[str, int], Path, list[str]]:
    """
    `twistd -n mailrelay --config TMP/NAME.toml` (or `python -c WRAPPER` with the same
    arguments), until its log names the ports of `listeners` listeners.
    Returns (process, {listener name: port}, log file, twistd's arguments).
    """
    config = workdir / f"{name}.toml"
    config.write_text(config_text)
    log = workdir / f"{name}.log"
    log.unlink(missing_ok=True)  # twistd appends: old listener lines would give old ports
    twistd_args = ["-n", "--pidfile=", f"--logfile={log}", "--reactor=mailrelay", "mailrelay", "--config", str(config)]
    argv = [sys.executable, "-c", python_wrapper, *twistd_args] if python_wrapper else [twistd_command(), *twistd_args]
    with open(workdir / f"{name}.out", "wb") as out:
        # In `workdir`: a `python -c` wrapper and the workers' `python -m mailrelay worker`
        # put their directory first on sys.path, and in a checkout that would be its
        # mailrelay/, not the installed one.
        proc = children.popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=workdir)
    ports: dict[str, int] = {}
    deadline = time.monotonic() + 30
    while len(ports) < listeners:
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = (workdir / f"{name}.out").read_text(errors="replace")[-2000:]
            if log.exists():
                tail += log.read_text(errors="replace")[-2000:]
            raise RuntimeError(
                f"{name} did not start listening (exit status {proc.poll()}); is mailrelay installed "
                f"in this venv (`.venv/bin/pip install .`)?\n{tail}"
            )
        if log.exists():
            for m in LISTENER_LINE.finditer(log.read_text(errors="replace")):
                ports[m.group(1)] = int(m.group(2))
        time.sleep(0.05)
    return proc, ports, log, twistd_args


LISTENER = """
[[listener]]
name = "{name}"
listen = "tcp:0:interface=127.0.0.1"
mode = "{mode}"
{keys}router = {{ type = "static", host = "127.0.0.1", port = {port}{route} }}
# the load comes from one address: no per-client connection limits
[listener.connection_limits]
exempt = ["127.0.0.0/8"]
"""


def mailrelay_listener(name: str, mode: str, port: int, keys: str = "", route: str = "") -> str:
    """
    One `[[listener]]` on an ephemeral port of 127.0.0.1 with a static route to `port` on
    127.0.0.1: `keys` are lines of the listener's own (`protocol = "smtp"\\n`), `route`
    the route's keys beyond host and port (`, tls = "tls"`). Loopback is exempt from the
    connection limits: all of a benchmark's load comes from one address.
    """
    return LISTENER.format(name=name, mode=mode, keys=keys, port=port, route=route)


def mailrelay_config(
    script: str, listeners: list[str], certs: Certificates | None = None, upstream_ca: bool = False, workers: int = 1
) -> str:
    """
    The configuration of bench/`script`'s mailrelay: a short drain, `workers` processes,
    `certs`'s certificate as its `[tls]` (with `upstream_ca`, its CA as what upstreams
    are verified against), and `listeners` (`mailrelay_listener`).
    """
    text = f"# written by bench/{script}\ndrain_timeout = 1\nworkers = {workers}\n"
    if certs is not None:
        text += f'\n[tls]\ncert = "{certs.chain}"\nkey = "{certs.key}"\n'
        if upstream_ca:
            text += f'\n[upstream]\nca = "{certs.ca}"\n'
    return text + "".join(listeners)
