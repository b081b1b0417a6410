"""
A private HAProxy (Debian's package) for tests: `haproxy -db` in the foreground on
loopback, from a configuration fragment such as `examples/haproxy.cfg` with its
addresses replaced by loopback ones (`for_loopback`), behind Debian's own `defaults`
(so a fragment that forgets `mode tcp` fails here as it would in production).
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

from tests.support.processes import WAIT, Process
from tests.support.servers import free_ports, listening_inodes, server_environment

HEADER = """\
# A private HAProxy for tests (tests/support/haproxy.py): logs to stdout, no chroot,
# no user change, no daemon; the defaults are Debian's /etc/haproxy/haproxy.cfg ones.
global
    log stdout format raw local0 info
    stats socket {stats_socket} mode 600 level admin

defaults
    log global
    mode http
    option httplog
    option dontlognull
    timeout connect 5000
    timeout client 50000
    timeout server 50000

"""
"""What comes before the fragment: Debian's defaults, and a `global` fit for a test."""

_SECTION = re.compile(r"(global|defaults|frontend|backend|listen|resolvers|peers|userlist)\b\s*(\S*)")


class HAProxyError(RuntimeError):
    """HAProxy refused its configuration, or did not start or stop."""


def haproxy_command() -> str:
    found = shutil.which("haproxy", path=server_environment()["PATH"])
    if found is None:
        raise HAProxyError("haproxy is not installed: dev/test installs it (the Debian package haproxy)")
    return found


def for_loopback(fragment: str, binds: Mapping[str, int], servers: Mapping[str, Mapping[str, int]]) -> str:
    """
    The fragment with each frontend's `bind` on 127.0.0.1:`binds[frontend]` and each
    backend's `server NAME ADDRESS:PORT` on 127.0.0.1:`servers[backend][NAME]`; every
    other line as it is. Every frontend, bind and server of the fragment must be given a
    port and every port given must be used: a test then knows the whole fragment.
    """
    wanted = {("frontend", name) for name in binds} | {(backend, name) for backend, names in servers.items() for name in names}
    used: set[tuple[str, str]] = set()
    kind, section = "", ""
    lines = []
    for line in fragment.splitlines():
        words = line.split()
        header = _SECTION.fullmatch(line.strip()) if line[:1].strip() else None
        if header is not None:
            kind, section = header.group(1), header.group(2)
        elif words and words[0] == "bind":
            if kind != "frontend" or section not in binds:
                raise ValueError(f"no port given for the bind of {kind} {section}: {line.strip()!r}")
            used.add(("frontend", section))
            line = line.replace(words[1], f"127.0.0.1:{binds[section]}", 1)
        elif words and words[0] == "server":
            if kind != "backend" or words[1] not in servers.get(section, {}):
                raise ValueError(f"no port given for server {words[1]} of {kind} {section}: {line.strip()!r}")
            if not re.fullmatch(r"[^:\s]+:\d+", words[2]):
                raise ValueError(f"server {words[1]} of backend {section}: not ADDRESS:PORT: {words[2]!r}")
            used.add((section, words[1]))
            line = line.replace(words[2], f"127.0.0.1:{servers[section][words[1]]}", 1)
        lines.append(line)
    if wanted != used:
        raise ValueError(f"given but not in the fragment: {sorted(wanted - used)}")
    return "\n".join(lines) + "\n"


class HAProxy:
    """
    HAProxy running `fragment` (see `for_loopback`) in `directory`, each frontend on a
    free loopback port (`ports[frontend]`), its backends' servers at the loopback ports
    given in `servers`. `start()` returns once it listens on every port; `output()` is
    what it logged (with `option tcplog`, a line per connection naming the server it
    went to: "127.0.0.2:40000 [...] imap mailrelay_imap/mr1 ..."). `stop()` ends it.
    """

    def __init__(self, directory: Path, fragment: str, servers: Mapping[str, Mapping[str, int]]) -> None:
        self.directory = directory
        self.fragment = fragment
        self.servers = servers
        self.frontends = [m.group(2) for m in map(_SECTION.fullmatch, fragment.splitlines()) if m and m.group(1) == "frontend"]
        self.ports: dict[str, int] = {}
        self.config_file = directory / "haproxy.cfg"
        self.stats_socket = directory / "haproxy.sock"
        self._process: Process | None = None
        self._stopped_output = ""

    def output(self) -> str:
        """What HAProxy logged so far (or until it stopped)."""
        return self._process.output if self._process is not None else self._stopped_output

    def wait_for(self, pattern: str, count: int = 1) -> re.Match[str]:
        """The `count`th match of `pattern` in what HAProxy logged, waiting for it (a
        connection's line comes when it ends)."""
        if self._process is None:
            raise HAProxyError("HAProxy is not running")
        return self._process.wait_for(pattern, count=count)

    def start(self) -> None:
        failures = []
        for _ in range(5):
            self.ports = dict(zip(self.frontends, free_ports(len(self.frontends)), strict=True))
            header = HEADER.format(stats_socket=self.stats_socket)
            self.config_file.write_text(header + for_loopback(self.fragment, self.ports, self.servers))
            checked = subprocess.run(
                [haproxy_command(), "-c", "-f", str(self.config_file)], capture_output=True, text=True, timeout=WAIT
            )
            if checked.returncode != 0:
                raise HAProxyError(f"haproxy -c refused the configuration:\n{checked.stdout}{checked.stderr}")
            process = Process([haproxy_command(), "-db", "-f", self.config_file], self.directory, server_environment())
            self._process = process
            try:
                self._wait_until_listening(process)
                return
            except HAProxyError as error:
                self.stop()
                if "cannot bind socket" not in str(error):
                    raise
                failures.append(str(error))  # another process took a port meanwhile
        raise HAProxyError("no free ports found for HAProxy:\n" + "\n".join(failures))

    def _wait_until_listening(self, process: Process) -> None:
        deadline = time.monotonic() + WAIT
        while not self._holds_every_port(process.popen.pid):
            if process.popen.poll() is not None:
                process.wait()
                raise HAProxyError(f"haproxy exited with status {process.popen.returncode}:\n{process.output}")
            if time.monotonic() > deadline:
                raise HAProxyError(f"haproxy did not listen on {self.ports} within {WAIT} s:\n{process.output}")
            time.sleep(0.02)

    def _holds_every_port(self, pid: int) -> bool:
        try:
            held = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
        except OSError:
            return False
        return all({f"socket:[{inode}]" for inode in listening_inodes(port)} & held for port in self.ports.values())

    def stats(self) -> list[dict[str, str]]:
        """HAProxy's `show stat` (its statistics, a row per frontend, backend and server)."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(WAIT)
            sock.connect(str(self.stats_socket))
            sock.sendall(b"show stat\n")
            answer = b""
            while data := sock.recv(65536):
                answer += data
        lines = answer.decode().lstrip("# ").splitlines()
        return list(csv.DictReader(line for line in lines if line))

    def wait_for_checks(self) -> dict[tuple[str, str], tuple[str, str]]:
        """Once every server's health check has run at least once: by (backend, server),
        its status ("UP", "DOWN", "UP 1/2" while going down...) and its last check's
        ("L7OK": the tcp-check sequence passed, "L4OK": it connected, "L7TOUT"...)."""
        deadline = time.monotonic() + WAIT
        while True:
            servers = [row for row in self.stats() if row["svname"] not in ("FRONTEND", "BACKEND")]
            done = [row["check_status"].lstrip("* ") not in ("", "INI", "UNK") for row in servers]
            if servers and all(done):
                return {(row["pxname"], row["svname"]): (row["status"], row["check_status"].lstrip("* ")) for row in servers}
            if time.monotonic() > deadline:
                raise HAProxyError(f"health checks not run within {WAIT} s: {servers}\n{self.output()}")
            time.sleep(0.1)

    def stop(self) -> None:
        """Stop it (a no-op when it is not running): SIGTERM, its hard stop, closes every
        connection at once; SIGKILL if it has not exited after WAIT."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.popen.poll() is None:
            process.signal(signal.SIGTERM)
            try:
                process.popen.wait(WAIT)
            except subprocess.TimeoutExpired:
                pass
        process.kill()
        self._stopped_output = process.output

    def __enter__(self) -> HAProxy:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
