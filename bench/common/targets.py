"""
What the clients of a benchmark connect to (`Target`: a direct connection, mailrelay,
haproxy, nginx), how they wait until one serves, and the certificates of a run.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.clients import Dial, TLSDial, connect, one_session, session_script
from common.wire import HOST


@dataclass
class Target:
    """
    Somewhere to send the traffic: its bulk and line ports (a bulk port of 0: no bulk
    tests), how a client connects to them, and whose CPU to count.
    """

    name: str
    bulk_port: int
    line_port: int
    pgid: int | None
    note: str = ""
    dial: Dial = connect
    until_closed: bool = False
    """Sessions read on after `221` until the server has closed."""
    log_files: list[Path] = field(default_factory=list)
    proc: subprocess.Popen[Any] | None = None

    def session(self, commands: list[list[bytes]], quit_parts: list[bytes]) -> None:
        one_session(self.line_port, commands, quit_parts, self.dial, self.until_closed)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_until_serving(target: Target, proc: subprocess.Popen[Any], timeout: float, what: str) -> None:
    """Until one whole session works through `target` (and the process is still there)."""
    deadline = time.monotonic() + timeout
    commands, quit_parts = session_script(1)
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode}")
        try:
            target.session(commands, quit_parts)
            return
        except OSError as e:
            last_error = e
            time.sleep(0.05)
    raise RuntimeError(f"{what} does not serve within {timeout:g}s: {last_error!r}")


@dataclass
class ScriptedTarget(Target):
    """
    A target whose sessions are a whole client script on its line port (an SMTP
    submission, an IMAP or POP3 session) instead of the line protocol's: `script(port,
    tls, message)`, which returns the TLS version and cipher it negotiated.
    """

    script: Callable[[int, TLSDial, bytes], str] | None = None
    tls: TLSDial | None = None
    message: bytes = field(default=b"", repr=False)

    def session(self, commands: list[list[bytes]], quit_parts: list[bytes]) -> None:
        self.run_script()

    def run_script(self) -> str:
        assert self.script is not None and self.tls is not None
        return self.script(self.line_port, self.tls, self.message)


SERVER_NAME = "localhost"  # what TLS clients ask for (SNI) and verify; the certificate also names 127.0.0.1


class Certificates:
    """
    One ECDSA P-256 CA and one ECDSA P-256 server certificate for `localhost` and
    127.0.0.1, made by trustme, as files in `workdir`; `dial` is a client that trusts them.
    """

    def __init__(self, workdir: Path) -> None:
        try:
            import trustme
        except ImportError:
            raise RuntimeError("the benchmark makes its certificates with trustme: .venv/bin/pip install trustme") from None
        ca = trustme.CA(key_type=trustme.KeyType.ECDSA)
        leaf = ca.issue_cert(SERVER_NAME, HOST, key_type=trustme.KeyType.ECDSA)
        self.ca = workdir / "ca.pem"
        self.chain = workdir / "server-chain.pem"
        self.key = workdir / "server-key.pem"
        self.combined = workdir / "server-key-and-chain.pem"  # haproxy's `crt`, the upstream's load_cert_chain
        ca.cert_pem.write_to_path(str(self.ca))
        self.chain.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(self.key))
        leaf.private_key_and_cert_chain_pem.write_to_path(str(self.combined))
        self.dial = TLSDial(str(self.ca), SERVER_NAME)
