#!/usr/bin/env python3
"""
IMAP (and POP3) benchmark: whole mail-reading sessions per second against a real Dovecot,
straight to Dovecot (which does STARTTLS and the login itself) vs through mailrelay's
IMAP front-end (`mode = "starttls"`, `protocol = "imap"`, static router) with a plain and
with a STARTTLS upstream leg, and through nginx's mail proxy when nginx with the mail
module is on PATH, all in one run. `--protocol pop3` (or `both`) does the same for POP3
(direct and mailrelay).

    .venv/bin/python bench/imap.py                   # IMAP, about a minute
    .venv/bin/python bench/imap.py --protocol both   # IMAP, then POP3
    .venv/bin/python bench/imap.py --help

An IMAP session: connect, greeting, STARTTLS, TLS handshake (verified), LOGIN, SELECT
INBOX, FETCH 1 BODY.PEEK[] (the whole 10 kB message, checked byte for byte), LOGOUT,
read until the server closes. A POP3 session: greeting, STLS, TLS handshake, USER,
PASS, RETR 1 (checked likewise), QUIT.

Everything runs on 127.0.0.1 with ephemeral ports and one ECDSA P-256 certificate made
by trustme for the run. Dovecot is `tests.support.dovecot.Dovecot` (Dovecot 2.3, started as
root, in a directory from tempfile.mkdtemp()); mailrelay runs as a real `twistd`
subprocess. Every process the script started is stopped when it ends, also on Ctrl-C,
SIGTERM or an error.

See bench/README.md for what each number means.
"""

from __future__ import annotations

import argparse
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common import cli
from common.auth_http import start_auth_http
from common.clients import TLSDial, connect, make_message, negotiated
from common.dovecot import dovecot_log_summary, dovecot_pgid, mailservers, release, start_watchdog
from common.measure import Measurements, finish
from common.processes import Children
from common.proxies import launch_nginx_mail, start_other
from common.report import print_logs_and_notes, print_machine, print_targets, pyopenssl_version
from common.smtp_server import SMTP_PASSWORD, SMTP_USER
from common.targets import SERVER_NAME, Certificates, ScriptedTarget, Target, free_port, wait_until_serving
from common.twistd import mailrelay_config, mailrelay_listener, start_twistd

if TYPE_CHECKING:
    from tests.support.dovecot import Dovecot

# One mailbox, the same account as the SMTP benchmark's (nginx's auth_http in
# bench/common/auth_http.py knows it).
USER = SMTP_USER
PASSWORD = SMTP_PASSWORD
MAX_LINE = 65536

# The listeners of the one mailrelay process: (protocol, listener, column, route keys beyond host and port).
LISTENERS = (
    ("imap", "imap-plain-up", "mailrelay", ""),
    ("imap", "imap-starttls-up", "mailrelay-starttls-up", ', tls = "starttls", tls_ca = "{ca}", server_name = "{server_name}"'),
    ("pop3", "pop3-plain-up", "mailrelay", ""),
)

# Their keys beyond name and mode (`mailrelay_listener`).
LISTENER_KEYS = 'protocol = "{protocol}"\nhostname = "relay.bench.example"\n'

# nginx's mail proxy: its directives beyond those of every mail benchmark (`launch_nginx_mail`).
NGINX_SERVER = ("imap_auth plain login;",)

# Column name -> what it is, for the legend under the header.
LEGEND = {
    "imap": {
        "direct": "client -> Dovecot's IMAP port: STARTTLS and LOGIN at Dovecot",
        "mailrelay": 'client -> mailrelay mode="starttls" protocol="imap" (STARTTLS, LOGIN; static router) '
        "-> AUTHENTICATE PLAIN (SASL-IR) to Dovecot over plain TCP",
        "mailrelay-starttls-up": 'the same, route tls="starttls" (tls_ca = the bench CA): STARTTLS to Dovecot, then the login inside it',
        "nginx": "client -> nginx mail (protocol imap, starttls only, auth_http, worker_processes 1) -> LOGIN to Dovecot over plain TCP",
    },
    "pop3": {
        "direct": "client -> Dovecot's POP3 port: STLS, USER and PASS at Dovecot",
        "mailrelay": 'client -> mailrelay mode="starttls" protocol="pop3" (STLS, USER, PASS; static router) '
        "-> AUTH PLAIN to Dovecot over plain TCP",
    },
}

SESSION_TEXT = {
    "imap": "connect, greeting, STARTTLS, full TLS handshake (never resumed), LOGIN, SELECT INBOX (1 EXISTS), "
    "FETCH 1 BODY.PEEK[] (the {size:,}-byte literal read and compared), LOGOUT (* BYE, OK), read until the server closes",
    "pop3": "connect, +OK greeting, STLS, full TLS handshake (never resumed), USER, PASS, RETR 1 (the {size:,}-byte message "
    "read to the end marker and compared), QUIT, read until the server closes",
}


# --------------------------------------------------------------------------------------
# The clients


# The headers of the message in the mailbox (`make_message`).
MESSAGE_HEADERS = (
    b"From: Bench Sender <sender@example.org>\r\nTo: <" + USER.encode() + b">\r\n"
    b"Subject: mailrelay IMAP benchmark\r\nMessage-ID: <imap-bench@example.org>\r\n"
)


class Connection:
    """A client connection with a read buffer, in plaintext and then in TLS."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError(f"connection closed after {self.buffer[-200:]!r}")
        self.buffer += data

    def line(self) -> bytes:
        while True:
            end = self.buffer.find(b"\n")
            if end >= 0:
                line, self.buffer = self.buffer[: end + 1], self.buffer[end + 1 :]
                return line
            if len(self.buffer) > MAX_LINE:
                raise ConnectionError(f"line too long: {self.buffer[:200]!r}")
            self._fill()

    def exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            self._fill()
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def until(self, marker: bytes, limit: int) -> bytes:
        """Everything up to and including `marker`."""
        start = 0
        while True:
            end = self.buffer.find(marker, start)
            if end >= 0:
                end += len(marker)
                data, self.buffer = self.buffer[:end], self.buffer[end:]
                return data
            if len(self.buffer) > limit:
                raise ConnectionError(f"no {marker!r} in {len(self.buffer)} bytes")
            start = max(0, len(self.buffer) - len(marker) + 1)
            self._fill()

    def greeted(self, ok: bytes) -> None:
        """Read the greeting; it must start with `ok`."""
        greeting = self.line()
        if not greeting.startswith(ok):
            raise ConnectionError(f"greeting: {greeting[:200]!r}")

    def starttls(self, tls: TLSDial) -> None:
        if self.buffer:
            raise ConnectionError(f"data after the STARTTLS answer: {self.buffer[:200]!r}")
        self.sock = tls.wrap(self.sock)

    def until_closed(self) -> None:
        if self.buffer or self.sock.recv(4096):
            raise ConnectionError("data after the goodbye")

    def negotiated(self) -> str:
        assert isinstance(self.sock, ssl.SSLSocket)
        return negotiated(self.sock)


_LITERAL = re.compile(rb"\{(\d+)\}\r\n\Z")


def imap_command(conn: Connection, tag: bytes, command: bytes) -> tuple[list[bytes], list[bytes]]:
    """
    Send `tag command`, read the response up to the tagged `OK` (anything else raises);
    returns the untagged lines (their first part) and the literals in them.
    """
    conn.send(tag + b" " + command + b"\r\n")
    untagged: list[bytes] = []
    literals: list[bytes] = []
    while True:
        line = first = conn.line()
        while m := _LITERAL.search(line):
            literals.append(conn.exactly(int(m.group(1))))
            line = conn.line()  # the rest of the line after the literal
        if first.startswith(tag + b" "):
            if first[len(tag) + 1 : len(tag) + 3] != b"OK":
                raise ConnectionError(f"{command.split()[0].decode()}: {first[:200]!r}")
            return untagged, literals
        untagged.append(first)


def imap_session(port: int, tls: TLSDial, message: bytes) -> str:
    """One IMAP session (see SESSION_TEXT); returns the TLS version and cipher the client negotiated."""
    conn = Connection(connect(port))
    try:
        conn.greeted(b"* OK")
        imap_command(conn, b"a1", b"STARTTLS")
        conn.starttls(tls)
        imap_command(conn, b"a2", b'LOGIN "' + USER.encode() + b'" "' + PASSWORD.encode() + b'"')
        untagged, _ = imap_command(conn, b"a3", b"SELECT INBOX")
        if b"* 1 EXISTS\r\n" not in untagged:
            raise ConnectionError(f"SELECT: no '* 1 EXISTS' in {untagged!r}")
        _, literals = imap_command(conn, b"a4", b"FETCH 1 BODY.PEEK[]")
        if len(literals) != 1 or literals[0] != message:
            sizes = [len(literal) for literal in literals]
            raise ConnectionError(f"FETCH: literals of {sizes} bytes, not the {len(message)}-byte message")
        untagged, _ = imap_command(conn, b"a5", b"LOGOUT")
        if not any(line.startswith(b"* BYE") for line in untagged):
            raise ConnectionError(f"LOGOUT: no '* BYE' in {untagged!r}")
        conn.until_closed()
        return conn.negotiated()
    finally:
        conn.close()


def pop3_command(conn: Connection, command: bytes) -> bytes:
    conn.send(command + b"\r\n")
    reply = conn.line()
    if not reply.startswith(b"+OK"):
        raise ConnectionError(f"{command.split()[0].decode()}: {reply[:200]!r}")
    return reply


def pop3_session(port: int, tls: TLSDial, message: bytes) -> str:
    """One POP3 session (see SESSION_TEXT); returns the TLS version and cipher the client negotiated."""
    conn = Connection(connect(port))
    try:
        conn.greeted(b"+OK")
        pop3_command(conn, b"STLS")
        conn.starttls(tls)
        pop3_command(conn, b"USER " + USER.encode())
        pop3_command(conn, b"PASS " + PASSWORD.encode())
        pop3_command(conn, b"RETR 1")
        # Multi-line: dot-stuffed lines up to ".\r\n" on a line of its own (the message ends with CRLF).
        data = conn.until(b"\r\n.\r\n", 4 * len(message) + MAX_LINE)[:-3]
        body = (data[1:] if data.startswith(b"..") else data).replace(b"\r\n..", b"\r\n.")
        if body != message:
            raise ConnectionError(f"RETR: {len(body)} bytes, not the {len(message)}-byte message")
        pop3_command(conn, b"QUIT")
        conn.until_closed()
        return conn.negotiated()
    finally:
        conn.close()


SESSIONS = {"imap": imap_session, "pop3": pop3_session}


def mail_target(
    name: str, protocol: str, port: int, certs: Certificates, message: bytes, pgid: int | None = None, **kwargs: Any
) -> ScriptedTarget:
    """A target whose sessions are IMAP (or POP3) sessions on `port`."""
    return ScriptedTarget(name, 0, port, pgid, script=SESSIONS[protocol], tls=certs.dial, message=message, **kwargs)


# --------------------------------------------------------------------------------------
# mailrelay, nginx


def start_mailrelay(
    children: Children,
    workdir: Path,
    protocols: list[str],
    dovecot: Dovecot,
    certs: Certificates,
    message: bytes,
) -> dict[str, list[Target]]:
    """One twistd with the listeners of `protocols`; a target per listener, by protocol."""
    listeners = [item for item in LISTENERS if item[0] in protocols]
    upstream_ports = {"imap": dovecot.imap_port, "pop3": dovecot.pop3_port}
    config = mailrelay_config(
        "imap.py",
        [
            mailrelay_listener(
                name,
                "starttls",
                upstream_ports[protocol],
                LISTENER_KEYS.format(protocol=protocol),
                route.format(ca=certs.ca, server_name=SERVER_NAME),
            )
            for protocol, name, _, route in listeners
        ],
        certs,
    )
    proc, ports, log, twistd_args = start_twistd(children, workdir, "mailrelay", config, len(listeners))
    note = " ".join(["twistd", *twistd_args])
    targets: dict[str, list[Target]] = {protocol: [] for protocol in protocols}
    for protocol, name, column, _ in listeners:
        target = mail_target(column, protocol, ports[name], certs, message, pgid=proc.pid, note=note, proc=proc)
        wait_until_serving(target, proc, 10, f"mailrelay ({name})")
        targets[protocol].append(target)
    targets[protocols[0]][0].log_files = [log]  # one process, one log: summarised once
    return targets


def start_nginx_mail(
    children: Children, workdir: Path, binary: str, dovecot: Dovecot, certs: Certificates, message: bytes
) -> Target:
    """nginx's IMAP proxy in front of Dovecot, asking an auth_http service of its own."""
    auth_port = start_auth_http(children, dovecot.imap_port)
    target = mail_target("nginx", "imap", free_port(), certs, message)
    return launch_nginx_mail(children, workdir, binary, target, certs, "imap", auth_port, server=NGINX_SERVER)


# --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark whole IMAP sessions (STARTTLS, LOGIN, SELECT, FETCH of a 10 kB message, LOGOUT) through "
        "mailrelay's IMAP front-end against a direct connection to the same Dovecot (and nginx's mail proxy, if on PATH); "
        "with --protocol pop3 or both, POP3 sessions (STLS, USER, PASS, RETR, QUIT) too.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--protocol", choices=("imap", "pop3", "both"), default="imap", help="which sessions to measure")
    cli.add_sessions_arguments(parser, duration=2.0)
    parser.add_argument("--message-bytes", type=int, default=10_000, help="size of the message in the mailbox (headers included)")
    parser.set_defaults(pieces=1)  # the shared sessions measurement asks; these sessions write each command whole
    return cli.parse_args(parser, argv, ("sessions",))


def main(argv: list[str] | None = None) -> int:
    return cli.run_bench(parse_args(argv), run)


def run(args: argparse.Namespace, children: Children, workdir: Path, failures: list[str]) -> int:
    started = time.monotonic()
    protocols = ["imap", "pop3"] if args.protocol == "both" else [args.protocol]
    message = make_message(args.message_bytes, MESSAGE_HEADERS)
    certs = Certificates(workdir)
    servers = mailservers()
    # Dovecot's mail processes run as nobody and must reach its directory: not under the
    # bench's own (mode 0700) temporary directory.
    dovecot_dir = tempfile.mkdtemp(prefix="mailrelay-bench-dovecot-")
    dovecot = None
    watchdog = None
    try:
        dovecot = servers.Dovecot(
            dovecot_dir, tls=(str(certs.chain), str(certs.key)), users={USER: PASSWORD}, hostname="imap.bench.example"
        )
        dovecot.start()
        watchdog = start_watchdog(children, dovecot_pgid(dovecot))
        dovecot.deliver(USER, message)
        return measure(args, children, workdir, failures, started, protocols, message, certs, dovecot)
    finally:
        stopped = False
        try:
            if dovecot is not None:
                dovecot.stop()
            stopped = True
        finally:
            if watchdog is not None:
                release(watchdog, kill=not stopped)
        if args.keep:
            print(f"kept {dovecot_dir} (Dovecot's configuration, log and maildir)")
        else:
            shutil.rmtree(dovecot_dir, ignore_errors=True)


def measure(
    args: argparse.Namespace,
    children: Children,
    workdir: Path,
    failures: list[str],
    started: float,
    protocols: list[str],
    message: bytes,
    certs: Certificates,
    dovecot: Dovecot,
) -> int:
    ports = {"imap": dovecot.imap_port, "pop3": dovecot.pop3_port}
    directs = {protocol: mail_target("direct", protocol, ports[protocol], certs, message) for protocol in protocols}
    for direct in directs.values():
        direct.run_script()  # Dovecot greets already (start() waited for it); this checks the mailbox
    targets: dict[str, list[Target]] = {protocol: [direct] for protocol, direct in directs.items()}
    for protocol, proxied in start_mailrelay(children, workdir, protocols, dovecot, certs, message).items():
        targets[protocol] += proxied
    skipped = None
    if "imap" in protocols:
        nginx, skipped = start_other(
            args, "nginx", lambda binary: start_nginx_mail(children, workdir, binary, dovecot, certs, message)
        )
        if nginx is not None:
            targets["imap"].append(nginx)
    pgid = dovecot_pgid(dovecot)

    print_machine("mailrelay IMAP benchmark" if protocols == ["imap"] else f"mailrelay {'/'.join(protocols).upper()} benchmark")
    version = subprocess.run([mailservers().dovecot_command(), "--version"], capture_output=True, text=True).stdout.strip()
    print(
        f"OpenSSL: {ssl.OPENSSL_VERSION} (Python ssl: clients); {pyopenssl_version()} (pyOpenSSL: mailrelay); "
        f"Dovecot {version} (its own OpenSSL)"
    )
    for protocol in protocols:
        print_targets(f"{protocol.upper()} targets", targets[protocol], LEGEND[protocol])
    if skipped:
        print(f"skipped: {skipped}")
    print(
        f"certificate: ECDSA P-256 (trustme; CA ECDSA P-256 too), names {SERVER_NAME} and 127.0.0.1, used by Dovecot, "
        f"mailrelay and nginx; clients send SNI {SERVER_NAME!r} and verify the chain and the name (so does mailrelay "
        "towards Dovecot)"
    )
    print(
        "negotiated by the client: "
        + "; ".join(
            f"{protocol} {t.name} {t.run_script()}"
            for protocol in protocols
            for t in targets[protocol]
            if isinstance(t, ScriptedTarget)
        )
    )
    for protocol in protocols:
        print(f"{protocol.upper()} session: {SESSION_TEXT[protocol].format(size=len(message))}")
    procs = max(1, min(args.client_procs, args.clients))
    print(
        f"sessions: 1 client thread, then {args.clients} clients = threads in {procs} processes; median of {args.rounds} rounds "
        f"of {args.duration:g}s, after 20 warm-up sessions per round; rounds go over all targets in turn; session times pooled (ms)"
    )
    print(
        "upstream: Dovecot 2.3 (tests/support/dovecot.py: a login process per connection, a mail process per session, "
        "one user, maildir); its CPU includes the login and mail processes that exited"
    )
    print(flush=True)

    for protocol in protocols:
        if len(protocols) > 1:
            print(f"\n=== {protocol.upper()}")
        m = Measurements(targets[protocol], pgid, started, failures, upstream_reaped=True)
        m.sessions(args, children, f"{protocol.upper()} sessions", times=True)
        m.print_results("session times (ms)")
        m.print_session_counts()
        m.print_session_errors()
        m.print_cpu(machine=True)
        notes = ["the upstream is all of Dovecot's processes"]
        if protocol == "imap" and len(targets[protocol]) > 2:
            notes.append("mailrelay's columns are one twistd process (all its listeners)")
        if any(t.name == "nginx" for t in targets[protocol]):
            notes.append("nginx's auth_http service is in neither (one HTTP request per session)")
        print(f"({'; '.join(notes)})")
        print()
        m.print_cpu_per_session(args.clients)

    print()
    everything = [targets[protocols[0]][0], *(t for protocol in protocols for t in targets[protocol][1:])]
    print_logs_and_notes(everything)
    print("\n".join(dovecot_log_summary(dovecot.log_text())))
    return finish(started, failures)


if __name__ == "__main__":
    sys.exit(main())
