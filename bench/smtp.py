#!/usr/bin/env python3
"""
SMTP benchmark: whole submission sessions (STARTTLS, AUTH PLAIN, one 10 kB message) per
second, straight to an SMTP upstream that does STARTTLS and AUTH itself vs through
mailrelay's SMTP front-end (`mode = "starttls"`, `protocol = "smtp"`, static router,
`login = "passthrough"`) with a plain and with a STARTTLS upstream leg, and through
nginx's mail proxy when nginx with the mail module is on PATH, all in one run.

Then (`--only smtp-source`) plain SMTP sessions as an MX sees them, made by Postfix's
`smtp-source` (HELO, MAIL, RCPT, DATA, a small message, QUIT; no TLS, no AUTH), straight
to the upstream vs through mailrelay's front-end with `auth = ["none"]` vs through
nginx's mail proxy with `smtp_auth none`.

    .venv/bin/python bench/smtp.py            # about 45 s (about 70 s with nginx)
    .venv/bin/python bench/smtp.py --only smtp-source   # the plain sessions only, about 20 s
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
import os
import re
import resource
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import cli
from common.clients import TLSDial, connect, make_message, negotiated
from common.logs import mailrelay_log_summary, mailrelay_warnings
from common.measure import Measurements, SessionsResult, Window
from common.processes import Children
from common.proxies import launch_nginx_mail, start_other
from common.report import print_logs_and_notes, print_machine, print_table, print_targets, pyopenssl_version
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

# The MX listener of the same mailrelay process (smtp-source's sessions): its keys beyond
# name and mode, and its route's beyond host and port.
MX_LISTENER = "smtp-mx"
MX_LISTENER_KEYS = 'protocol = "smtp"\nhostname = "mx.bench.example"\nstarttls = "optional"\nauth = ["none"]\n'
MX_ROUTE = ', login = "none"'

# nginx's mail proxy for them: STARTTLS offered, not required (`starttls on`), as mailrelay's.
NGINX_MX_MAIL = ("xclient off;",)
NGINX_MX_SERVER = ("smtp_auth none;",)

SMTP_SOURCE = "smtp-source"
SOURCE_SENDER = "sender@example.org"
SOURCE_RECIPIENT = "rcpt@example.net"
SOURCE_HELO = "client.example.org"

# Column name -> what it is, for the plain sessions' legend.
MX_LEGEND = {
    "direct": "smtp-source -> upstream (the asyncio SMTP server, MAIL without AUTH)",
    "mailrelay-mx": 'smtp-source -> mailrelay mode="starttls" protocol="smtp" starttls="optional" auth=["none"] '
    '(vet_recipients "first"; static route, login="none") -> plain upstream',
    "nginx-mx": "smtp-source -> nginx mail (protocol smtp, smtp_auth none, starttls on, xclient off, auth_http to the "
    "upstream process, worker_processes 1) -> plain upstream",
}

# What each target does in one smtp-source session, for the report.
MX_SESSION = (
    "  direct:       220, HELO 250, MAIL 250, RCPT 250, DATA 354, message + '.' 250, QUIT 221: all answered by the upstream",
    "  mailrelay-mx: its own 220, HELO and MAIL answered by mailrelay; at RCPT the static router answers, mailrelay "
    "connects to the upstream, reads its 220, sends EHLO (the client's name), MAIL, RCPT as typed (in one write when it offers PIPELINING); the upstream's RCPT "
    "reply is the client's; then DATA, the message and QUIT are relayed line by line (smtp_relay), not spliced",
    "  nginx-mx:     its own 220, HELO and MAIL answered by nginx; at RCPT nginx asks auth_http (an HTTP/1.0 request on a "
    "new connection, Auth-Method: none), connects to the upstream, reads its 220, sends HELO (its server_name), MAIL, "
    "RCPT; the upstream's RCPT reply is the client's; then nginx splices the rest (DATA, message, QUIT)",
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


def start_mailrelay(
    children: Children, workdir: Path, upstream: Upstream, certs: Certificates, message: bytes, mx: bool = False
) -> list[Target]:
    """One twistd with both listeners (and with `mx` the MX one, whose target comes last); a target per listener."""
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
    if mx:
        listeners.append(mailrelay_listener(MX_LISTENER, "starttls", upstream.mx, MX_LISTENER_KEYS, MX_ROUTE))
    config = mailrelay_config("smtp.py", listeners, certs)
    proc, ports, log, twistd_args = start_twistd(children, workdir, "mailrelay", config, len(listeners))
    note = " ".join(["twistd", *twistd_args])
    targets: list[Target] = []
    for name, column, _ in LISTENERS:
        target = smtp_target(column, ports[name], certs, message, pgid=proc.pid, note=note, proc=proc)
        wait_until_serving(target, proc, 10, f"mailrelay ({column})")
        targets.append(target)
    targets[0].log_files = [log]  # one process, one log: summarised once
    if mx:
        relay = Target("mailrelay-mx", 0, ports[MX_LISTENER], proc.pid, note, proc=proc, log_files=[log])
        wait_until_serving(relay, proc, 10, "mailrelay (mx)")
        targets.append(relay)
    return targets


def start_nginx_mail(
    children: Children, workdir: Path, binary: str, upstream: Upstream, certs: Certificates, message: bytes
) -> Target:
    """nginx's mail proxy in front of the SMTP upstream, asking the upstream process's auth_http."""
    target = smtp_target("nginx", free_port(), certs, message)
    return launch_nginx_mail(
        children, workdir, binary, target, certs, "smtp", upstream.auth_http, mail=NGINX_MAIL, server=NGINX_SERVER
    )


def start_nginx_mx(children: Children, workdir: Path, binary: str, upstream: Upstream, certs: Certificates) -> Target:
    """nginx's mail proxy without logins (`smtp_auth none`), routed by the upstream process's auth_http to its MX port."""
    target = Target("nginx-mx", 0, free_port(), None)
    return launch_nginx_mail(
        children,
        workdir,
        binary,
        target,
        certs,
        "smtp",
        upstream.auth_http,
        mail=NGINX_MX_MAIL,
        server=NGINX_MX_SERVER,
        starttls="on",
    )


# --------------------------------------------------------------------------------------
# Plain SMTP sessions made by smtp-source


def smtp_source(binary: str, port: int, sessions: int, parallel: int) -> float:
    """
    `sessions` sessions of one message each, `parallel` at a time, by smtp-source to
    `port`; the seconds they took. smtp-source stops at the first reply it did not
    expect (exit status not 0): a RuntimeError.
    """
    argv = [binary, "-s", str(parallel), "-m", str(sessions), "-M", SOURCE_HELO, "-f", SOURCE_SENDER, "-t", SOURCE_RECIPIENT]
    start = time.perf_counter()
    done = subprocess.run([*argv, f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=300)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"smtp-source exited with status {done.returncode}: {(done.stderr or done.stdout)[-300:]!r}")
    return elapsed


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def measure_smtp_source(win: Window, target: Target, binary: str, parallel: int, duration: float) -> SessionsResult:
    """
    Sessions/s of one smtp-source run sized to last about `duration` seconds (from a
    warm-up run of its own, not measured); the client's CPU is smtp-source's.
    """
    warmup = max(20, 4 * parallel)
    rate = warmup / smtp_source(binary, target.line_port, warmup, parallel)
    sessions = max(4 * parallel, round(rate * duration))
    win.begin()
    cpu0 = children_cpu()
    elapsed = smtp_source(binary, target.line_port, sessions, parallel)
    win.client_cpu = children_cpu() - cpu0
    win.end()
    return SessionsResult(sessions / elapsed, sessions, 0, None, [])


def run_smtp_source(
    args: argparse.Namespace, binary: str, mx_targets: list[Target], upstream_pgid: int, started: float, failures: list[str]
) -> None:
    """The plain sessions part: its own table of sessions/s through `mx_targets` (the first: direct)."""
    print()
    print(f"Plain SMTP sessions by {binary} (Postfix), as an MX sees them: no TLS, no AUTH")
    print_targets("targets", mx_targets, MX_LEGEND)
    print(
        f"session: {SMTP_SOURCE} -s N -m M -M {SOURCE_HELO} -f {SOURCE_SENDER} -t {SOURCE_RECIPIENT}: connect, 220, "
        "HELO, MAIL, RCPT, DATA, its default message (From, To, Date, Message-Id and 4 short lines, about 200 bytes) + '.', QUIT; one message per "
        "session, commands written whole and none pipelined, every reply's code checked (a wrong one stops the run)"
    )
    print("\n".join(MX_SESSION))
    print(
        f"sessions: N = 1, then N = {args.clients} parallel sessions (smtp-source's own event loop, one process); M sized "
        f"to take about {args.duration:g}s from a warm-up run; median of {args.rounds} rounds over all targets in turn"
    )
    print(flush=True)
    m = Measurements(mx_targets, upstream_pgid, started, failures)
    for key, label, parallel in (("serial", "1 client", 1), ("concurrent", f"{args.clients} concurrent", args.clients)):
        m.rows.append((key, f"sessions/s, {label}"))

        def measure(w: Window, t: Target, n: int = parallel) -> SessionsResult:
            return measure_smtp_source(w, t, binary, n, args.duration)

        results = m.rounds(key, f"smtp-source sessions, {label}", args.rounds, measure)
        for name, items in results.items():
            m.values[(key, name)] = statistics.median(r.rate for r in items) if items else "ERR"
            m.values[(f"{key}_n", name)] = sum(r.sessions for r in items)
    m.check_alive()
    print()
    print_table(m.rows, [t.name for t in mx_targets], m.values)
    print("ratio = value / direct: higher is better.")
    names = [t.name for t in mx_targets]
    counts = "; ".join(
        f"{key}: " + ", ".join(f"{name} {m.values.get((f'{key}_n', name), 0):,}" for name in names)
        for key in ("serial", "concurrent")
    )
    print(f"sessions timed: {counts}")
    m.print_cpu(machine=True)
    print(f"(the client is {SMTP_SOURCE}; nginx-mx's upstream includes its auth_http service)")
    print()
    m.print_cpu_per_session(args.clients)
    print()
    for t in mx_targets[1:]:
        if t.log_files:
            print(mailrelay_log_summary(t.name, t.log_files, by_listener=True))
            warnings = mailrelay_warnings(t.log_files)
            if warnings:
                print("mailrelay log, lines other than closed sessions (most frequent first):")
                print("\n".join(warnings))
        print(f"{t.name}: {t.note}")


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
    parser.add_argument(
        "--smtp-source",
        default=shutil.which(SMTP_SOURCE) or f"/usr/sbin/{SMTP_SOURCE}",
        help="Postfix's smtp-source, for the plain sessions (--only smtp-source)",
    )
    parser.set_defaults(pieces=1)  # the shared sessions measurement asks; SMTP sessions write each command whole
    return cli.parse_args(parser, argv, ("sessions", SMTP_SOURCE))


def main(argv: list[str] | None = None) -> int:
    return cli.run_bench(parse_args(argv), run)


def run(args: argparse.Namespace, children: Children, workdir: Path, failures: list[str]) -> int:
    started = time.monotonic()
    message = make_message(args.message_bytes, MESSAGE_HEADERS)
    certs = Certificates(workdir)
    upstream = Upstream(children, args.upstream_procs, str(certs.combined), smtp=True)
    direct = smtp_target("direct", upstream.smtp, certs, message)
    wait_until_serving(direct, upstream.proc, 10, "the upstream")

    skipped = []
    mx = SMTP_SOURCE in args.only
    if mx and not (Path(args.smtp_source).is_file() and os.access(args.smtp_source, os.X_OK)):
        skipped.append(f"the plain sessions ({args.smtp_source} not found: Debian's postfix package has it)")
        mx = False
    targets = [direct, *start_mailrelay(children, workdir, upstream, certs, message, mx)]
    mx_targets: list[Target] = []
    if mx:
        mx_targets = [Target("direct", 0, upstream.mx, None), targets.pop()]
        wait_until_serving(mx_targets[0], upstream.proc, 10, "the upstream (mx)")
    nginx = None
    if "sessions" in args.only:
        nginx, why = start_other(
            args, "nginx", lambda binary: start_nginx_mail(children, workdir, binary, upstream, certs, message)
        )
        skipped += [why] if why else []
    if mx:
        nginx_mx, why = start_other(args, "nginx", lambda binary: start_nginx_mx(children, workdir, binary, upstream, certs))
        mx_targets += [nginx_mx] if nginx_mx is not None else []
        skipped += [f"nginx-mx: {why}"] if why else []
    if nginx is not None:
        targets.append(nginx)

    print_machine("mailrelay SMTP benchmark")
    if skipped:
        print(f"skipped: {'; '.join(skipped)}")
    m = Measurements(targets, upstream.proc.pid, started, failures)
    if "sessions" in args.only:
        run_submission(args, children, m, message, args.upstream_procs)
    if mx:
        run_smtp_source(args, args.smtp_source, mx_targets, upstream.proc.pid, started, failures)
    return m.finish()


def run_submission(args: argparse.Namespace, children: Children, m: Measurements, message: bytes, upstream_procs: int) -> None:
    """The STARTTLS + AUTH PLAIN submission sessions' part (`--only sessions`)."""
    targets = m.targets
    print(f"OpenSSL: {ssl.OPENSSL_VERSION} (Python ssl: clients, upstream); {pyopenssl_version()} (pyOpenSSL: mailrelay)")
    print_targets("targets", targets, LEGEND)
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
        f"upstream: asyncio SMTP server x {upstream_procs} processes (SO_REUSEPORT): STARTTLS with Python's server "
        "defaults, AUTH PLAIN with or without TLS, DATA read to the end marker; nginx's auth_http service runs in it too"
    )
    print(flush=True)

    m.sessions(args, children, "SMTP sessions", times=True)
    m.print_results("session times (ms)")
    m.print_session_counts()
    m.print_session_errors()

    m.print_cpu(machine=True)
    nginx = any(t.name == "nginx" for t in targets)
    print(
        "(mailrelay's columns are one twistd process serving all its listeners"
        + ("; nginx's upstream includes its auth_http service)" if nginx else ")")
    )
    cpu = m.cpu()
    if cpu:
        busiest = max(cpu.items(), key=lambda item: item[1]["upstream"])
        print(
            f"upstream: at most {busiest[1]['upstream']:.0f} % of one core ({busiest[0][1]}, {busiest[0][0]}) of the "
            f"{100 * upstream_procs} % its {upstream_procs} processes could use"
        )
    print()
    m.print_cpu_per_session(args.clients)

    print()
    print_logs_and_notes(targets)


if __name__ == "__main__":
    sys.exit(main())
