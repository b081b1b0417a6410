"""
A private Redis for tests: Debian's `redis-server`, started on a free loopback port
in a temporary directory, with no persistence (`--save "" --appendonly no`), and a
tiny blocking client (`command()`) for tests to look at or tamper with its keys.

`start()` waits until it answers PING, `stop()` (idempotent) asks it to shut down
and waits for the process to end. Like Postfix and Dovecot, it is installed by
dev/test and only the slow tier starts it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from typing import Any

from tests.support.servers import WAIT, free_ports, running_servers

__all__ = ["RedisServer", "redis_server_command"]


def redis_server_command() -> str | None:
    """The redis-server binary, or None when it is not installed."""
    return shutil.which("redis-server") or next(
        (path for path in ("/usr/bin/redis-server", "/usr/sbin/redis-server") if os.path.exists(path)), None
    )


class RedisServer:
    """One redis-server process of a test."""

    def __init__(self, password: str | None = None) -> None:
        self.password = password
        self.port = 0
        self.dir = tempfile.mkdtemp(prefix="mailrelay-redis-")
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        login = f":{self.password}@" if self.password else ""
        return f"redis://{login}127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def log_text(self) -> str:
        try:
            with open(os.path.join(self.dir, "redis.log"), encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def start(self) -> None:
        """Start it (on the port it had, when restarted) and wait until it answers PING."""
        if self._process is not None:
            return
        binary = redis_server_command()
        if binary is None:
            raise RuntimeError("redis-server is not installed (dev/test installs Debian's redis-server)")
        for _ in range(5):
            if not self.port:
                self.port = free_ports(1)[0]
            args = [binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no"]
            args += ["--dir", self.dir, "--logfile", "redis.log", "--daemonize", "no", "--protected-mode", "no"]
            if self.password:
                args += ["--requirepass", self.password]
            self._process = subprocess.Popen(args, cwd=self.dir, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
            running_servers.add(self)
            if self._wait_until_up():
                return
            self.stop()
            if "Address already in use" not in self.log_text():
                raise RuntimeError(f"redis-server did not start:\n{self.log_text()}")
            self.port = 0  # someone took the port between our choice and its bind
        raise RuntimeError("no free port found for redis-server")

    def _wait_until_up(self) -> bool:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            if self._process is None or self._process.poll() is not None:
                return False
            try:
                if self.command("PING") == "PONG":
                    return True
            except OSError:
                pass
            time.sleep(0.02)  # polling its port; nothing to wait on instead
        raise RuntimeError(f"redis-server did not answer PING within {WAIT:g}s:\n{self.log_text()}")

    def stop(self) -> None:
        """Stop it (a no-op when it is not running) and wait until it has exited."""
        process, self._process = self._process, None
        running_servers.discard(self)
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(WAIT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(WAIT)

    def cleanup(self) -> None:
        """Stop it and remove its directory."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def command(self, *args: str | bytes | int | float) -> Any:
        """Run one command on a fresh connection; its answer decoded (str, int, list,
        None); an error reply raises RuntimeError."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=WAIT) as conn:
            reader = conn.makefile("rb")
            if self.password:
                conn.sendall(_encode(("AUTH", self.password)))
                _read(reader)
            conn.sendall(_encode(args))
            return _read(reader)

    def keys(self, pattern: str = "*") -> list[str]:
        """Every key matching `pattern` (SCAN, so that a big database is no problem)."""
        found: list[str] = []
        cursor = "0"
        while True:
            cursor, batch = self.command("SCAN", cursor, "MATCH", pattern, "COUNT", 1000)
            found.extend(batch)
            if cursor == "0":
                return sorted(found)

    def dump(self) -> str:
        """Every key with its type and value, as one text (to look for a secret in)."""
        lines = []
        for key in self.keys():
            kind = self.command("TYPE", key)
            if kind == "string":
                value: Any = self.command("GET", key)
            elif kind == "zset":
                value = self.command("ZRANGE", key, 0, -1, "WITHSCORES")
            else:
                value = kind
            lines.append(f"{key} {value}")
        return "\n".join(lines)


def _encode(args: tuple[Any, ...]) -> bytes:
    parts = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def _read(reader: Any) -> Any:
    line = reader.readline()
    if not line:
        raise OSError("redis closed the connection")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise RuntimeError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        size = int(rest)
        if size < 0:
            return None
        data = reader.read(size + 2)[:-2]
        return data.decode("utf-8", "replace")
    if kind == b"*":
        count = int(rest)
        return None if count < 0 else [_read(reader) for _ in range(count)]
    raise OSError(f"not a Redis reply: {line!r}")
