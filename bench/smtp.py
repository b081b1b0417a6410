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
by trustme for the run. The script starts its own upstream (bench/common/upstream.py
as a separate process: an asyncio SMTP server in 2 processes), mailrelay as a real `twistd`
subprocess, and nginx if present, and kills every process it started when it ends,
also on Ctrl-C, SIGTERM or an error (and, through PR_SET_PDEATHSIG, if it is killed
outright).

See bench/README.md for what each number means.
"""

from __future__ import annotations

import argparse
import re
import socket
import ssl
import sys
import time
from pathlib import Path
from typing import Any

from common import cli
from common.clients import TLSDial, connect, make_message, negotiated
from common.measure import Measurements
from common.processes import Children
from common.proxies import launch_nginx_mail, start_other
from common.report import print_logs_and_notes, print_machine, print_targets, pyopenssl_version
from common.smtp_server import SMTP_PASSWORD, SMTP_USER, plain_response
from common.targets import SERVER_NAME, Certificates, ScriptedTarget, Target, free_port, wait_until_serving
from common.twistd import mailrelay_config, mailrelay_listener, start_twistd
from common.upstream import Upstream

EHLO = b"EHLO client.example.org\r\n"
STARTTLS = b"STARTTLS\r\n"
AUTH = b"AUTH PLAIN " + plain_response(SMTP_USER, SMTP_PASSWORD) + b"\r\n"
MAIL = b"MAIL FROM:<" + SMTP_USER.encode() + b">\r\n"
RCPT = b"RCPT TO:<rcpt@example.net>\r\n"
DATA = b"DATA\r\n"
QUIT = b"QUIT\r\n"
_AUTH_PLAIN = re.compile(rb"^250[ -]AUTH[ =][^\r\n]*\bPLAIN\b", re.MULTILINE | re.IGNORECASE)

# The listeners of the one mailrelay process: (listener, column, route keys beyond host and port).
LISTENERS = (
    ("smtp-plain-up", "mailrelay", ""),
    ("smtp-starttls-up", "mailrelay-starttls-up", ', tls = "starttls", tls_ca = "{ca}", server_name = "{server_name}"'),
)

# Their keys beyond name and mode (`mailrelay_listener`).
LISTENER_KEYS = 'protocol = "smtp"\nhostname = "relay.bench.example"\nauth = ["plain"]\n'

# nginx's mail proxy: its directives beyond those of every mail benchmark (`launch_nginx_mail`).
NGINX_MAIL = ("proxy_smtp_auth on;", "xclient off;")
NGINX_SERVER = ("smtp_auth plain;",)

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


# The headers of the message every session sends (`make_message`).
MESSAGE_HEADERS = (
    b"From: Bench Sender <" + SMTP_USER.encode() + b">\r\nTo: <rcpt@example.net>\r\n"
    b"Subject: mailrelay SMTP benchmark\r\nMessage-ID: <bench@example.org>\r\n"
)


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


def smtp_session(port: int, tls: TLSDial, message: bytes) -> str:
    """
    connect, 220, EHLO (STARTTLS offered), STARTTLS 220, TLS handshake, EHLO (AUTH PLAIN
    offered), AUTH PLAIN with the initial response 235, MAIL 250, RCPT 250, DATA 354,
    message + `.` 250 (with the size the upstream read), QUIT 221, read until the server
    has closed. Returns the TLS version and cipher the client negotiated.
    """
    sock: socket.socket = connect(port)
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
        return negotiated(sock)
    finally:
        sock.close()


def smtp_target(
    name: str, port: int, certs: Certificates, message: bytes, pgid: int | None = None, **kwargs: Any
) -> ScriptedTarget:
    """A target whose sessions are SMTP submissions (`smtp_session`) on `port`."""
    return ScriptedTarget(name, 0, port, pgid, script=smtp_session, tls=certs.dial, message=message, **kwargs)


# --------------------------------------------------------------------------------------
# The proxies


def start_mailrelay(children: Children, workdir: Path, upstream: Upstream, certs: Certificates, message: bytes) -> list[Target]:
    """One twistd with both listeners; a target per listener."""
    listeners = [
        mailrelay_listener(
            name,
            "starttls",
            upstream.smtp,
            LISTENER_KEYS,
            ', login = "passthrough"' + route.format(ca=certs.ca, server_name=SERVER_NAME),
        )
        for name, _, route in LISTENERS
    ]
    config = mailrelay_config("smtp.py", listeners, certs)
    proc, ports, log, twistd_args = start_twistd(children, workdir, "mailrelay", config, len(LISTENERS))
    note = " ".join(["twistd", *twistd_args])
    targets: list[Target] = []
    for name, column, _ in LISTENERS:
        target = smtp_target(column, ports[name], certs, message, pgid=proc.pid, note=note, proc=proc)
        wait_until_serving(target, proc, 10, f"mailrelay ({column})")
        targets.append(target)
    targets[0].log_files = [log]  # one process, one log: summarised once
    return targets


def start_nginx_mail(
    children: Children, workdir: Path, binary: str, upstream: Upstream, certs: Certificates, message: bytes
) -> Target:
    """nginx's mail proxy in front of the SMTP upstream, asking the upstream process's auth_http."""
    target = smtp_target("nginx", free_port(), certs, message)
    return launch_nginx_mail(
        children, workdir, binary, target, certs, "smtp", upstream.auth_http, mail=NGINX_MAIL, server=NGINX_SERVER
    )


# --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark whole SMTP submission sessions (STARTTLS, AUTH PLAIN, a message) through mailrelay's SMTP "
        "front-end against a direct connection to the same upstream (and nginx's mail proxy, if on PATH).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    cli.add_sessions_arguments(parser)
    parser.add_argument(
        "--message-bytes", type=int, default=10_000, help="size of the message of each session (headers included)"
    )
    parser.add_argument("--upstream-procs", type=int, default=2, help="processes of the SMTP upstream (SO_REUSEPORT)")
    parser.set_defaults(pieces=1)  # the shared sessions measurement asks; SMTP sessions write each command whole
    return cli.parse_args(parser, argv, ("sessions",))


def main(argv: list[str] | None = None) -> int:
    return cli.run_bench(parse_args(argv), run)


def run(args: argparse.Namespace, children: Children, workdir: Path, failures: list[str]) -> int:
    started = time.monotonic()
    message = make_message(args.message_bytes, MESSAGE_HEADERS)
    certs = Certificates(workdir)
    upstream = Upstream(children, args.upstream_procs, str(certs.combined), smtp=True)
    direct = smtp_target("direct", upstream.smtp, certs, message)
    wait_until_serving(direct, upstream.proc, 10, "the upstream")

    targets = [direct, *start_mailrelay(children, workdir, upstream, certs, message)]
    nginx, skipped = start_other(
        args, "nginx", lambda binary: start_nginx_mail(children, workdir, binary, upstream, certs, message)
    )
    if nginx is not None:
        targets.append(nginx)

    print_machine("mailrelay SMTP benchmark")
    print(f"OpenSSL: {ssl.OPENSSL_VERSION} (Python ssl: clients, upstream); {pyopenssl_version()} (pyOpenSSL: mailrelay)")
    print_targets("targets", targets, LEGEND)
    if skipped:
        print(f"skipped: {skipped}")
    print(
        f"certificate: ECDSA P-256 (trustme; CA ECDSA P-256 too), names {SERVER_NAME} and 127.0.0.1; clients send SNI "
        f"{SERVER_NAME!r} and verify the chain and the name (so does mailrelay towards the upstream)"
    )
    print(
        "negotiated by the client: " + "; ".join(f"{t.name} {t.run_script()}" for t in targets if isinstance(t, ScriptedTarget))
    )
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

    m = Measurements(targets, upstream.proc.pid, started, failures)
    m.sessions(args, children, "SMTP sessions", times=True)
    m.print_results("session times (ms)")
    m.print_session_counts()
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
    m.print_cpu_per_session(args.clients)

    print()
    print_logs_and_notes(targets)
    return m.finish()


if __name__ == "__main__":
    sys.exit(main())
