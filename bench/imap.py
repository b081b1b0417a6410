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
by trustme for the run. Dovecot is `tests.mailservers.Dovecot` (Dovecot 2.3, started as
root, in a directory from tempfile.mkdtemp()); mailrelay runs as a real `twistd`
subprocess. Every process the script started is stopped when it ends, also on Ctrl-C,
SIGTERM or an error.

See bench/README.md for what each number means.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import _common as common

if TYPE_CHECKING:
    from tests.mailservers import Dovecot

ROOT = Path(__file__).resolve().parent.parent

# One mailbox, the same account as the SMTP benchmark's (nginx's auth_http in
# bench/_common.py knows it).
USER = common.SMTP_USER
PASSWORD = common.SMTP_PASSWORD
MAX_LINE = 65536

# The listeners of the one mailrelay process: (protocol, listener, column, route keys beyond host and port).
LISTENERS = (
    ("imap", "imap-plain-up", "mailrelay", ""),
    ("imap", "imap-starttls-up", "mailrelay-starttls-up", ', tls = "starttls", tls_ca = "{ca}", server_name = "{server_name}"'),
    ("pop3", "pop3-plain-up", "mailrelay", ""),
)

MAILRELAY_HEAD = """\
# written by bench/imap.py
drain_timeout = 1

[tls]
cert = "{chain}"
key = "{key}"
"""

MAILRELAY_LISTENER = """
[[listener]]
name = "{name}"
listen = "tcp:0:interface=127.0.0.1"
mode = "starttls"
protocol = "{protocol}"
hostname = "relay.bench.example"
router = {{ type = "static", host = "127.0.0.1", port = {port}{route} }}
# the load comes from one address: no per-client connection limits
[listener.connection_limits]
exempt = ["127.0.0.0/8"]
"""

NGINX_MAIL_CONFIG = (
    common.NGINX_PREAMBLE
    + """\
mail {{
    auth_http 127.0.0.1:{auth_port}/auth;
    server {{
        listen 127.0.0.1:{port};
        protocol imap;
        server_name relay.bench.example;
        starttls only;
        ssl_certificate {chain};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;  # nginx 1.22's default stops at TLSv1.2
        imap_auth plain login;
    }}
}}
"""
)

# nginx's auth_http: bench/_common.py's service (SMTP_USER, SMTP_PASSWORD), answering with
# Dovecot's IMAP port, in a process of its own; it ends when its stdin closes.
AUTH_HTTP_SERVER = """\
import asyncio, sys
sys.path.insert(0, sys.argv[1])
import _common
async def main():
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _common.AuthHTTPProtocol(int(sys.argv[2])), _common.HOST, 0, backlog=4096)
    print("port", server.sockets[0].getsockname()[1], flush=True)
    done = loop.create_future()
    loop.add_reader(0, lambda: done.done() or done.set_result(None))
    await done
asyncio.run(main())
"""

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


def make_message(size: int) -> bytes:
    """A plain-text message of exactly `size` bytes (CRLF lines, none starting with a dot)."""
    head = (
        b"From: Bench Sender <sender@example.org>\r\nTo: <" + USER.encode() + b">\r\n"
        b"Subject: mailrelay IMAP benchmark\r\nMessage-ID: <imap-bench@example.org>\r\n\r\n"
    )
    line = b"The quick brown fox jumps over the lazy dog, 0123456789 times over and again.\r\n"
    lines, rest = divmod(size - len(head) - 2, len(line))
    if lines < 0:
        raise ValueError(f"a message needs at least {len(head) + 2} bytes")
    return head + line * lines + b"x" * rest + b"\r\n"


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

    def starttls(self, tls: common.TLSDial) -> None:
        if self.buffer:
            raise ConnectionError(f"data after the STARTTLS answer: {self.buffer[:200]!r}")
        self.sock = tls.wrap(self.sock)

    def until_closed(self) -> None:
        if self.buffer or self.sock.recv(4096):
            raise ConnectionError("data after the goodbye")

    def negotiated(self) -> str:
        sock = self.sock
        assert isinstance(sock, ssl.SSLSocket)
        cipher = sock.cipher()
        return f"{sock.version()} {cipher[0] if cipher else '?'}"


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


def imap_session(port: int, tls: common.TLSDial, message: bytes) -> str:
    """One IMAP session (see SESSION_TEXT); returns the TLS version and cipher the client negotiated."""
    conn = Connection(common.connect(port))
    try:
        greeting = conn.line()
        if not greeting.startswith(b"* OK"):
            raise ConnectionError(f"greeting: {greeting[:200]!r}")
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


def pop3_session(port: int, tls: common.TLSDial, message: bytes) -> str:
    """One POP3 session (see SESSION_TEXT); returns the TLS version and cipher the client negotiated."""
    conn = Connection(common.connect(port))
    try:
        greeting = conn.line()
        if not greeting.startswith(b"+OK"):
            raise ConnectionError(f"greeting: {greeting[:200]!r}")
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


@dataclass
class MailTarget(common.Target):
    """A target whose sessions are IMAP (or POP3) sessions on its line port."""

    protocol: str = "imap"
    tls: common.TLSDial | None = None
    message: bytes = field(default=b"", repr=False)

    def session(self, commands: list[list[bytes]], quit_parts: list[bytes]) -> None:
        self.mail_session()

    def mail_session(self) -> str:
        assert self.tls is not None
        run = imap_session if self.protocol == "imap" else pop3_session
        return run(self.line_port, self.tls, self.message)


# --------------------------------------------------------------------------------------
# Dovecot, mailrelay, nginx


def mailservers() -> ModuleType:
    """tests/mailservers.py (the repository's test helpers), imported from the repository root."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import tests.mailservers

    return tests.mailservers


def dovecot_pgid(dovecot: Dovecot) -> int:
    """The process group of Dovecot's processes (REAPER's: the master and its children stay in it)."""
    groups = set()
    for pid in dovecot.processes():
        try:
            groups.add(os.getpgid(pid))
        except ProcessLookupError:
            pass
    if len(groups) != 1:
        raise RuntimeError(f"Dovecot's processes are in {len(groups)} process groups ({sorted(groups)}), not one")
    return groups.pop()


# Dovecot is not a child of ours in the sense of Children (tests.mailservers starts it in
# its own session, without PR_SET_PDEATHSIG), so a watchdog process kills its process group
# should the bench die without stopping it (SIGKILL): its stdin closes without "disarm".
WATCHDOG = """\
import os, signal, sys
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # PR_SET_PDEATHSIG: what counts is stdin
if sys.stdin.buffer.read() != b"disarm":
    try:
        os.killpg(int(sys.argv[1]), signal.SIGKILL)
    except ProcessLookupError:
        pass
"""


def start_watchdog(children: common.Children, pgid: int) -> subprocess.Popen[bytes]:
    return children.popen([sys.executable, "-c", WATCHDOG, str(pgid)], stdin=subprocess.PIPE)


def release(watchdog: subprocess.Popen[bytes], kill: bool) -> None:
    """Dovecot was stopped: the watchdog exits without killing anything; or it was not (`kill`): it kills what is left."""
    assert watchdog.stdin is not None
    try:
        if not kill:
            watchdog.stdin.write(b"disarm")
        watchdog.stdin.close()
        watchdog.wait(5)
    except (OSError, subprocess.TimeoutExpired):
        pass


def dovecot_log_summary(text: str, limit: int = 6) -> list[str]:
    """Logins and logouts counted, and Dovecot's warning and error lines (pids, ids and numbers folded), with counts."""
    logins = logouts = 0
    counts: dict[str, int] = {}
    for line in text.splitlines():
        if "-login: Info: Login: " in line:
            logins += 1
        elif re.search(r": Info: (?:Disconnected: )?Logged out ", line):
            logouts += 1
        elif re.search(r": (?:Warning|Error|Fatal|Panic): |Disconnected|process_limit|client_limit", line):
            if not logins and "Aborted login by logging out (no auth attempts" in line:
                continue  # Dovecot.start()'s check that it greets
            folded = re.sub(r"^\w{3} +\d+ [\d:]+ ", "", line)  # the timestamp
            folded = re.sub(r"<[^<>]*>", "<>", folded)
            folded = re.sub(r"\d+", "N", folded)
            counts[folded] = counts.get(folded, 0) + 1
    lines = [
        f"Dovecot log: logins {logins}, logged out {logouts}; warnings, errors, limits and other disconnections: {sum(counts.values())}"
    ]
    ranked = sorted(counts.items(), key=lambda item: -item[1])
    lines += [f"  {n:6d} x {text}" for text, n in ranked[:limit]]
    if len(ranked) > limit:
        lines.append(f"  ... and {len(ranked) - limit} more kinds")
    return lines


def mailrelay_config(protocols: list[str], dovecot: Dovecot, certs: common.Certificates) -> str:
    ports = {"imap": dovecot.imap_port, "pop3": dovecot.pop3_port}
    listeners = [
        MAILRELAY_LISTENER.format(
            name=name,
            protocol=protocol,
            port=ports[protocol],
            route=route.format(ca=certs.ca, server_name=common.SERVER_NAME),
        )
        for protocol, name, _, route in LISTENERS
        if protocol in protocols
    ]
    return MAILRELAY_HEAD.format(chain=certs.chain, key=certs.key) + "".join(listeners)


def start_mailrelay(
    children: common.Children,
    workdir: Path,
    protocols: list[str],
    dovecot: Dovecot,
    certs: common.Certificates,
    message: bytes,
) -> dict[str, list[common.Target]]:
    """One twistd with the listeners of `protocols`; a target per listener, by protocol."""
    listeners = [item for item in LISTENERS if item[0] in protocols]
    proc, ports, log, twistd_args = common.start_twistd(
        children, workdir, "mailrelay", mailrelay_config(protocols, dovecot, certs), len(listeners)
    )
    note = " ".join(["twistd", *twistd_args])
    targets: dict[str, list[common.Target]] = {protocol: [] for protocol in protocols}
    for protocol, name, column, _ in listeners:
        target = MailTarget(column, 0, ports[name], proc.pid, note, proc=proc, protocol=protocol, tls=certs.dial, message=message)
        common.wait_until_serving(target, proc, 10, f"mailrelay ({name})")
        targets[protocol].append(target)
    targets[protocols[0]][0].log_files = [log]  # one process, one log: summarised once
    return targets


def start_nginx_mail(
    args: argparse.Namespace,
    children: common.Children,
    workdir: Path,
    dovecot: Dovecot,
    certs: common.Certificates,
    message: bytes,
) -> tuple[common.Target | None, str | None]:
    """nginx's IMAP proxy in front of Dovecot, when wanted and possible: (target, None) or (None, why not)."""
    binary = shutil.which("nginx")
    if not args.others:
        return None, "nginx (--no-others)"
    if binary is None:
        return None, "nginx (not on PATH)"
    try:
        usable, load_module = common.nginx_module(binary, "mail")
        if not usable:
            return None, f"nginx ({load_module})"
        auth = children.popen(
            [sys.executable, "-c", AUTH_HTTP_SERVER, str(Path(__file__).resolve().parent), str(dovecot.imap_port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert auth.stdout is not None
        line = auth.stdout.readline().decode()
        if not line.startswith("port "):
            raise RuntimeError(f"nginx's auth_http service did not start (said {line!r})")
        port = common.free_port()
        config = workdir / "nginx.conf"
        config.write_text(
            NGINX_MAIL_CONFIG.format(
                workdir=workdir,
                user=common.nginx_user_line(),
                load_module=load_module,
                auth_port=int(line.split()[1]),
                port=port,
                chain=certs.chain,
                key=certs.key,
            )
        )
        argv = [binary, "-p", f"{workdir}/", "-c", str(config), "-e", f"{workdir}/nginx-error.log"]
        target = MailTarget("nginx", 0, port, None, protocol="imap", tls=certs.dial, message=message)
        how = "(mail, protocol imap, starttls only, imap_auth plain login, auth_http, worker_processes 1)"
        return common.launch_proxy(children, workdir, target, argv, how, ["nginx-error.log"]), None
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        print(f"nginx failed to start:\n{e}", file=sys.stderr)
        return None, f"nginx (failed to start: {str(e).splitlines()[0]})"


# --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark whole IMAP sessions (STARTTLS, LOGIN, SELECT, FETCH of a 10 kB message, LOGOUT) through "
        "mailrelay's IMAP front-end against a direct connection to the same Dovecot (and nginx's mail proxy, if on PATH); "
        "with --protocol pop3 or both, POP3 sessions (STLS, USER, PASS, RETR, QUIT) too.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--protocol", choices=("imap", "pop3", "both"), default="imap", help="which sessions to measure")
    parser.add_argument(
        "--rounds", type=int, default=3, help="passes over all targets for each sessions test (sessions/s: median of the rounds)"
    )
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per round of a sessions test")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients in the concurrent sessions test")
    parser.add_argument(
        "--client-procs", type=int, default=2, help="client processes the concurrent clients are spread over (threads in each)"
    )
    parser.add_argument("--message-bytes", type=int, default=10_000, help="size of the message in the mailbox (headers included)")
    parser.set_defaults(pieces=1)  # the shared sessions measurement asks; these sessions write each command whole
    return common.parse_args(parser, argv, ("sessions",))


def main(argv: list[str] | None = None) -> int:
    return common.run_bench(parse_args(argv), run)


def run(args: argparse.Namespace, children: common.Children, workdir: Path, failures: list[str]) -> int:
    started = time.monotonic()
    protocols = ["imap", "pop3"] if args.protocol == "both" else [args.protocol]
    message = make_message(args.message_bytes)
    certs = common.Certificates(workdir)
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
    children: common.Children,
    workdir: Path,
    failures: list[str],
    started: float,
    protocols: list[str],
    message: bytes,
    certs: common.Certificates,
    dovecot: Dovecot,
) -> int:
    ports = {"imap": dovecot.imap_port, "pop3": dovecot.pop3_port}
    targets: dict[str, list[common.Target]] = {
        protocol: [MailTarget("direct", 0, ports[protocol], None, protocol=protocol, tls=certs.dial, message=message)]
        for protocol in protocols
    }
    for direct in targets.values():
        assert isinstance(direct[0], MailTarget)
        direct[0].mail_session()  # Dovecot greets already (start() waited for it); this checks the mailbox
    for protocol, proxied in start_mailrelay(children, workdir, protocols, dovecot, certs, message).items():
        targets[protocol] += proxied
    skipped = None
    if "imap" in protocols:
        nginx, skipped = start_nginx_mail(args, children, workdir, dovecot, certs, message)
        if nginx is not None:
            targets["imap"].append(nginx)
    pgid = dovecot_pgid(dovecot)

    common.print_machine(
        "mailrelay IMAP benchmark" if protocols == ["imap"] else f"mailrelay {'/'.join(protocols).upper()} benchmark"
    )
    version = subprocess.run([mailservers().dovecot_command(), "--version"], capture_output=True, text=True).stdout.strip()
    print(
        f"OpenSSL: {ssl.OPENSSL_VERSION} (Python ssl: clients); {common.pyopenssl_version()} (pyOpenSSL: mailrelay); "
        f"Dovecot {version} (its own OpenSSL)"
    )
    for protocol in protocols:
        names = [t.name for t in targets[protocol]]
        width = max(len(name) for name in names)
        print(f"{protocol.upper()} targets: {', '.join(names)}")
        for name in names:
            print(f"  {name:<{width}} {LEGEND[protocol][name]}")
    if skipped:
        print(f"skipped: {skipped}")
    print(
        f"certificate: ECDSA P-256 (trustme; CA ECDSA P-256 too), names {common.SERVER_NAME} and 127.0.0.1, used by Dovecot, "
        f"mailrelay and nginx; clients send SNI {common.SERVER_NAME!r} and verify the chain and the name (so does mailrelay "
        "towards Dovecot)"
    )
    print(
        "negotiated by the client: "
        + "; ".join(
            f"{protocol} {t.name} {t.mail_session()}"
            for protocol in protocols
            for t in targets[protocol]
            if isinstance(t, MailTarget)
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
        "upstream: Dovecot 2.3 (tests/mailservers.py: a login process per connection, a mail process per session, "
        "one user, maildir); its CPU includes the login and mail processes that exited"
    )
    print(flush=True)

    concurrent = f"{args.clients} concurrent"
    for protocol in protocols:
        if len(protocols) > 1:
            print(f"\n=== {protocol.upper()}")
        m = common.Measurements(targets[protocol], pgid, started, failures, upstream_reaped=True)
        m.sessions(args, children, f"{protocol.upper()} sessions", times=True)
        m.print_results("session times (ms)")
        values = m.values
        counts = "; ".join(
            f"{key}: "
            + ", ".join(f"{t.name} {values[(f'{key}_n', t.name)]}" for t in targets[protocol] if (f"{key}_n", t.name) in values)
            for key in ("serial", "concurrent")
        )
        print(f"sessions timed: {counts}")
        m.print_session_errors()
        m.print_cpu(machine=True)
        notes = ["the upstream is all of Dovecot's processes"]
        if protocol == "imap" and len(targets[protocol]) > 2:
            notes.append("mailrelay's columns are one twistd process (all its listeners)")
        if any(t.name == "nginx" for t in targets[protocol]):
            notes.append("nginx's auth_http service is in neither (one HTTP request per session)")
        print(f"({'; '.join(notes)})")
        print()
        common.print_cpu_per_session(m, [t.name for t in targets[protocol]], [("serial", "1 client"), ("concurrent", concurrent)])

    print()
    everything = [targets[protocols[0]][0], *(t for protocol in protocols for t in targets[protocol][1:])]
    common.print_logs_and_notes(everything)
    print("\n".join(dovecot_log_summary(dovecot.log_text())))
    print(f"\ntotal time {time.monotonic() - started:.1f}s")
    if failures:
        print("\nFAILED measurements:")
        for f in dict.fromkeys(failures):
            print(f"  {f}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
