#!/usr/bin/env python3
"""
SMTP benchmark: whole submission sessions (STARTTLS, AUTH PLAIN, one 10 kB message) per
second, straight to an SMTP upstream that does STARTTLS and AUTH itself vs through
mailrelay's SMTP front-end (`mode = "starttls"`, `protocol = "smtp"`, static router,
`login = "passthrough"`) with a plain and with a STARTTLS upstream leg, and through
nginx's mail proxy when nginx with the mail module is on PATH, all in one run.

    .venv/bin/python bench/smtp.py            # about 25 s (about 45 s with nginx)
    .venv/bin/python bench/smtp.py --help

Everything runs on 127.0.0.1 with ephemeral ports and one ECDSA P-256 certificate made
by trustme for the run. The script starts its own upstream (bench/_common.py as a
separate process: an asyncio SMTP server in 2 processes), mailrelay as a real `twistd`
subprocess, and nginx if present, and kills every process it started when it ends,
also on Ctrl-C, SIGTERM or an error (and, through PR_SET_PDEATHSIG, if it is killed
outright).

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
import time
from dataclasses import dataclass, field
from pathlib import Path

import _common as common

EHLO = b"EHLO client.example.org\r\n"
STARTTLS = b"STARTTLS\r\n"
AUTH = b"AUTH PLAIN " + common.plain_response(common.SMTP_USER, common.SMTP_PASSWORD) + b"\r\n"
MAIL = b"MAIL FROM:<" + common.SMTP_USER.encode() + b">\r\n"
RCPT = b"RCPT TO:<rcpt@example.net>\r\n"
DATA = b"DATA\r\n"
QUIT = b"QUIT\r\n"
_AUTH_PLAIN = re.compile(rb"^250[ -]AUTH[ =][^\r\n]*\bPLAIN\b", re.MULTILINE | re.IGNORECASE)

# The listeners of the one mailrelay process: (listener, column, route keys beyond host and port).
LISTENERS = (
    ("smtp-plain-up", "mailrelay", ""),
    ("smtp-starttls-up", "mailrelay-starttls-up", ', tls = "starttls", tls_ca = "{ca}", server_name = "{server_name}"'),
)

MAILRELAY_HEAD = """\
# written by bench/smtp.py
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
protocol = "smtp"
hostname = "relay.bench.example"
auth = ["plain"]
router = {{ type = "static", host = "127.0.0.1", port = {port}, login = "passthrough"{route} }}
# the load comes from one address: no per-client connection limits
[listener.connection_limits]
exempt = ["127.0.0.0/8"]
"""

NGINX_MAIL_CONFIG = (
    common.NGINX_PREAMBLE
    + """\
mail {{
    auth_http 127.0.0.1:{auth_port}/auth;
    proxy_smtp_auth on;
    xclient off;
    server {{
        listen 127.0.0.1:{port};
        protocol smtp;
        server_name relay.bench.example;
        starttls only;
        ssl_certificate {chain};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;  # nginx 1.22's default stops at TLSv1.2
        smtp_auth plain;
    }}
}}
"""
)

# Column name -> what it is, for the legend under the header.
LEGEND = {
    "direct": "client -> upstream: STARTTLS and AUTH PLAIN at the upstream (Python ssl, asyncio)",
    "mailrelay": 'client -> mailrelay mode="starttls" protocol="smtp" (STARTTLS, AUTH; static router, '
    'login="passthrough") -> AUTH PLAIN to the upstream over plain TCP',
    "mailrelay-starttls-up": 'the same, route tls="starttls" (tls_ca = the bench CA): STARTTLS to the upstream, then AUTH inside it',
    "nginx": "client -> nginx mail (starttls only, smtp_auth plain, auth_http to the upstream process, proxy_smtp_auth on, "
    "xclient off, worker_processes 1) -> plain upstream",
}


# --------------------------------------------------------------------------------------
# The client


def make_message(size: int) -> bytes:
    """A plain-text message of exactly `size` bytes (CRLF lines, none starting with a dot)."""
    head = (
        b"From: Bench Sender <" + common.SMTP_USER.encode() + b">\r\nTo: <rcpt@example.net>\r\n"
        b"Subject: mailrelay SMTP benchmark\r\nMessage-ID: <bench@example.org>\r\n\r\n"
    )
    line = b"The quick brown fox jumps over the lazy dog, 0123456789 times over and again.\r\n"
    lines, rest = divmod(size - len(head) - 2, len(line))
    if lines < 0:
        raise ValueError(f"a message needs at least {len(head) + 2} bytes")
    return head + line * lines + b"x" * rest + b"\r\n"


def read_reply(sock: socket.socket) -> bytes:
    """One whole (multi-line) SMTP reply."""
    data = b""
    while True:
        more = sock.recv(65536)
        if not more:
            raise ConnectionError(f"connection closed after {data[-200:]!r}")
        data += more
        if data.endswith(b"\n"):
            last = data.rfind(b"\n", 0, len(data) - 1) + 1
            if data[last + 3 : last + 4] != b"-":
                return data


def exchange(sock: socket.socket, send: bytes | None, code: bytes, what: str) -> bytes:
    if send:
        sock.sendall(send)
    reply = read_reply(sock)
    if not reply.startswith(code):
        raise ConnectionError(f"{what}: expected {code.decode()}, got {reply[:200]!r}")
    return reply


def smtp_session(port: int, tls: common.TLSDial, message: bytes) -> str:
    """
    connect, 220, EHLO (STARTTLS offered), STARTTLS 220, TLS handshake, EHLO (AUTH PLAIN
    offered), AUTH PLAIN with the initial response 235, MAIL 250, RCPT 250, DATA 354,
    message + `.` 250 (with the size the upstream read), QUIT 221, read until the server
    has closed. Returns the TLS version and cipher the client negotiated.
    """
    sock: socket.socket = common.connect(port)
    try:
        exchange(sock, None, b"220", "greeting")
        if b"STARTTLS" not in exchange(sock, EHLO, b"250", "EHLO"):
            raise ConnectionError("STARTTLS not offered")
        exchange(sock, STARTTLS, b"220", "STARTTLS")
        sock = tls.wrap(sock)
        if not _AUTH_PLAIN.search(exchange(sock, EHLO, b"250", "EHLO after STARTTLS")):
            raise ConnectionError("AUTH PLAIN not offered after STARTTLS")
        exchange(sock, AUTH, b"235", "AUTH PLAIN")
        exchange(sock, MAIL, b"250", "MAIL")
        exchange(sock, RCPT, b"250", "RCPT")
        exchange(sock, DATA, b"354", "DATA")
        queued = exchange(sock, message + b".\r\n", b"250", "end of data")
        if b"(%d bytes)" % len(message) not in queued:
            raise ConnectionError(f"the upstream did not get the {len(message)} bytes sent: {queued!r}")
        exchange(sock, QUIT, b"221", "QUIT")
        if sock.recv(4096):
            raise ConnectionError("data after 221")
        assert isinstance(sock, ssl.SSLSocket)
        cipher = sock.cipher()
        return f"{sock.version()} {cipher[0] if cipher else '?'}"
    finally:
        sock.close()


@dataclass
class SMTPTarget(common.Target):
    """A target whose sessions are SMTP submissions (`smtp_session`) on its line port."""

    tls: common.TLSDial | None = None
    message: bytes = field(default=b"", repr=False)

    def session(self, commands: list[list[bytes]], quit_parts: list[bytes]) -> None:
        self.smtp_session()

    def smtp_session(self) -> str:
        assert self.tls is not None
        return smtp_session(self.line_port, self.tls, self.message)


# --------------------------------------------------------------------------------------
# The proxies


def mailrelay_config(upstream: common.Upstream, certs: common.Certificates) -> str:
    listeners = [
        MAILRELAY_LISTENER.format(name=name, port=upstream.smtp, route=route.format(ca=certs.ca, server_name=common.SERVER_NAME))
        for name, _, route in LISTENERS
    ]
    return MAILRELAY_HEAD.format(chain=certs.chain, key=certs.key) + "".join(listeners)


def start_mailrelay(
    children: common.Children, workdir: Path, upstream: common.Upstream, certs: common.Certificates, message: bytes
) -> list[common.Target]:
    """One twistd with both listeners; a target per listener."""
    proc, ports, log, twistd_args = common.start_twistd(
        children, workdir, "mailrelay", mailrelay_config(upstream, certs), len(LISTENERS)
    )
    note = " ".join(["twistd", *twistd_args])
    targets: list[common.Target] = []
    for name, column, _ in LISTENERS:
        target = SMTPTarget(column, 0, ports[name], proc.pid, note, proc=proc, tls=certs.dial, message=message)
        common.wait_until_serving(target, proc, 10, f"mailrelay ({column})")
        targets.append(target)
    targets[0].log_files = [log]  # one process, one log: summarised once
    return targets


def start_nginx_mail(
    args: argparse.Namespace,
    children: common.Children,
    workdir: Path,
    upstream: common.Upstream,
    certs: common.Certificates,
    message: bytes,
) -> tuple[common.Target | None, str | None]:
    """nginx's mail proxy in front of the SMTP upstream, when wanted and possible: (target, None) or (None, why not)."""
    binary = shutil.which("nginx")
    if not args.others:
        return None, "nginx (--no-others)"
    if binary is None:
        return None, "nginx (not on PATH)"
    try:
        usable, load_module = common.nginx_module(binary, "mail")
        if not usable:
            return None, f"nginx ({load_module})"
        port = common.free_port()
        config = workdir / "nginx.conf"
        config.write_text(
            NGINX_MAIL_CONFIG.format(
                workdir=workdir,
                user=common.nginx_user_line(),
                load_module=load_module,
                auth_port=upstream.auth_http,
                port=port,
                chain=certs.chain,
                key=certs.key,
            )
        )
        argv = [binary, "-p", f"{workdir}/", "-c", str(config), "-e", f"{workdir}/nginx-error.log"]
        target = SMTPTarget("nginx", 0, port, None, tls=certs.dial, message=message)
        how = "(mail, starttls only, smtp_auth plain, proxy_smtp_auth on, xclient off, worker_processes 1)"
        return common.launch_proxy(children, workdir, target, argv, how, ["nginx-error.log"]), None
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        print(f"nginx failed to start:\n{e}", file=sys.stderr)
        return None, f"nginx (failed to start: {str(e).splitlines()[0]})"


# --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark whole SMTP submission sessions (STARTTLS, AUTH PLAIN, a message) through mailrelay's SMTP "
        "front-end against a direct connection to the same upstream (and nginx's mail proxy, if on PATH).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="passes over all targets for each sessions test (sessions/s: median of the rounds)"
    )
    parser.add_argument("--duration", type=float, default=1.0, help="seconds per round of a sessions test")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients in the concurrent sessions test")
    parser.add_argument(
        "--client-procs", type=int, default=2, help="client processes the concurrent clients are spread over (threads in each)"
    )
    parser.add_argument(
        "--message-bytes", type=int, default=10_000, help="size of the message of each session (headers included)"
    )
    parser.add_argument("--upstream-procs", type=int, default=2, help="processes of the SMTP upstream (SO_REUSEPORT)")
    parser.set_defaults(pieces=1)  # the shared sessions measurement asks; SMTP sessions write each command whole
    return common.parse_args(parser, argv, ("sessions",))


def main(argv: list[str] | None = None) -> int:
    return common.run_bench(parse_args(argv), run)


def run(args: argparse.Namespace, children: common.Children, workdir: Path, failures: list[str]) -> int:
    started = time.monotonic()
    message = make_message(args.message_bytes)
    certs = common.Certificates(workdir)
    upstream = common.Upstream(children, args.upstream_procs, str(certs.combined), smtp=True)
    direct = SMTPTarget("direct", 0, upstream.smtp, None, tls=certs.dial, message=message)
    common.wait_until_serving(direct, upstream.proc, 10, "the upstream")

    targets = [direct, *start_mailrelay(children, workdir, upstream, certs, message)]
    nginx, skipped = start_nginx_mail(args, children, workdir, upstream, certs, message)
    if nginx is not None:
        targets.append(nginx)

    names = [t.name for t in targets]
    width = max(len(name) for name in names)
    common.print_machine("mailrelay SMTP benchmark")
    print(f"OpenSSL: {ssl.OPENSSL_VERSION} (Python ssl: clients, upstream); {common.pyopenssl_version()} (pyOpenSSL: mailrelay)")
    print(f"targets: {', '.join(names)}")
    for name in names:
        print(f"  {name:<{width}} {LEGEND[name]}")
    if skipped:
        print(f"skipped: {skipped}")
    print(
        f"certificate: ECDSA P-256 (trustme; CA ECDSA P-256 too), names {common.SERVER_NAME} and 127.0.0.1; clients send SNI "
        f"{common.SERVER_NAME!r} and verify the chain and the name (so does mailrelay towards the upstream)"
    )
    print("negotiated by the client: " + "; ".join(f"{t.name} {t.smtp_session()}" for t in targets if isinstance(t, SMTPTarget)))
    procs = max(1, min(args.client_procs, args.clients))
    print(
        "session: connect, 220, EHLO, STARTTLS, full TLS handshake (never resumed), EHLO, AUTH PLAIN with initial response "
        f"(235), MAIL, RCPT, DATA, {len(message):,}-byte message + '.' (250 with the size the upstream read), QUIT (221), "
        "read until the server closes; every reply's code checked, each command written whole, none pipelined"
    )
    print(
        f"sessions: 1 client thread, then {args.clients} clients = threads in {procs} processes; median of {args.rounds} rounds "
        f"of {args.duration:g}s, after 20 warm-up sessions per round; rounds go over all targets in turn; session times pooled (ms)"
    )
    print(
        f"upstream: asyncio SMTP server x {args.upstream_procs} processes (SO_REUSEPORT): STARTTLS with Python's server "
        "defaults, AUTH PLAIN with or without TLS, DATA read to the end marker; nginx's auth_http service runs in it too"
    )
    print(flush=True)

    m = common.Measurements(targets, upstream.proc.pid, started, failures)
    concurrent = f"{args.clients} concurrent"
    m.sessions(args, children, "SMTP sessions", times=True)
    m.print_results("session times (ms)")
    values = m.values
    counts = "; ".join(
        f"{key}: " + ", ".join(f"{t.name} {values[(f'{key}_n', t.name)]}" for t in targets if (f"{key}_n", t.name) in values)
        for key in ("serial", "concurrent")
    )
    print(f"sessions timed: {counts}")
    m.print_session_errors()

    m.print_cpu(machine=True)
    print(
        "(mailrelay's columns are one twistd process serving both listeners"
        + ("; nginx's upstream includes its auth_http service)" if nginx is not None else ")")
    )
    cpu = m.cpu()
    if cpu:
        busiest = max(cpu.items(), key=lambda item: item[1]["upstream"])
        print(
            f"upstream: at most {busiest[1]['upstream']:.0f} % of one core ({busiest[0][1]}, {busiest[0][0]}) of the "
            f"{100 * args.upstream_procs} % its {args.upstream_procs} processes could use"
        )
    print()
    common.print_cpu_per_session(m, names, [("serial", "1 client"), ("concurrent", concurrent)])

    print()
    common.print_logs_and_notes(targets)
    return m.finish()


if __name__ == "__main__":
    sys.exit(main())
