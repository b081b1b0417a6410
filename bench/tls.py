#!/usr/bin/env python3
"""
TLS benchmark: short TLS sessions, bulk transfers and round trips over TLS, straight to
an upstream that terminates TLS itself vs through mailrelay's `tls` mode (terminating), its
`splice` mode (TLS passed through, with and without `preread_sni`) and a splice route
with `tls = "tls"` (mailrelay as the TLS client), and through haproxy / nginx
terminating TLS when they are on PATH, all in one run.

    .venv/bin/python bench/tls.py            # about 70 s with haproxy and nginx
    .venv/bin/python bench/tls.py --help

Everything runs on 127.0.0.1 with ephemeral ports and one ECDSA P-256 certificate made
by trustme for the run. The script starts its own upstream servers (a separate
process), mailrelay as a real `twistd` subprocess, and the other proxies if present,
and kills every process it started when it ends, also on Ctrl-C, SIGTERM or an error
(and, through PR_SET_PDEATHSIG, if it is killed outright).

See bench/README.md for what each number means; bench/common/ holds what this script
shares with the other benchmarks.
"""

from __future__ import annotations

import argparse
import ssl
import sys
import time
from pathlib import Path

from common import cli
from common.clients import TLSDial, command, negotiated, read_line
from common.measure import Measurements
from common.processes import Children
from common.proxies import start_others
from common.report import print_logs_and_notes, print_machine, print_targets, pyopenssl_version
from common.targets import SERVER_NAME, Certificates, Target, wait_until_serving
from common.twistd import mailrelay_config, mailrelay_listener, start_twistd
from common.upstream import Upstream
from common.wire import CHUNK, QUIT

# The listeners of the one mailrelay process: (listener, column, mode, extra keys, upstream, route keys).
LISTENERS = (
    ("tls-bulk", "tls", "tls", "", "bulk", ""),  # TLS terminated here, plaintext spliced to the plain upstream
    ("tls-smtp", "tls", "tls", "", "line", ""),
    ("splice-smtp", "splice", "splice", "", "tls_line", ""),  # the client's TLS passed through
    ("splice-sni-smtp", "splice-sni", "splice", "preread_sni = true\n", "tls_line", ""),  # ... its server name peeked first
    ("to-tls-smtp", "plain-to-tls", "splice", "", "tls_line", f', tls = "tls", server_name = "{SERVER_NAME}"'),
)

# The columns of the latency rows: each terminates TLS in front of the line server.
LATENCY_TARGETS = ("direct", "tls", "haproxy", "nginx")

# Column name -> what it is, for the legend under the header.
LEGEND = {
    "direct": "TLS client -> upstream terminating TLS (Python ssl, asyncio)",
    "tls": 'TLS client -> mailrelay mode="tls" (terminates) -> plain upstream',
    "splice": 'TLS client -> mailrelay mode="splice" (bytes passed through) -> TLS upstream',
    "splice-sni": "the same with preread_sni = true (ClientHello peeked for its server name)",
    "plain-to-tls": 'plain client -> mailrelay mode="splice", route tls="tls" (verified against [upstream] ca) -> TLS upstream',
    "haproxy": "TLS client -> haproxy (mode tcp, bind ... ssl crt, nbthread 1) -> plain upstream",
    "nginx": "TLS client -> nginx (stream, listen ... ssl, worker_processes 1) -> plain upstream",
}


def start_mailrelay(children: Children, workdir: Path, upstream: Upstream, certs: Certificates) -> list[Target]:
    """One twistd with every listener; a target per column (the `tls` one has the bulk listener too)."""
    upstream_ports = {"bulk": upstream.bulk, "line": upstream.line, "tls_line": upstream.tls_line}
    listeners = [
        mailrelay_listener(name, mode, upstream_ports[port], keys=extra, route=route)
        for name, _, mode, extra, port, route in LISTENERS
    ]
    config = mailrelay_config("tls.py", listeners, certs, upstream_ca=True)
    proc, ports, log, twistd_args = start_twistd(children, workdir, "mailrelay", config, len(LISTENERS))
    note = " ".join(["twistd", *twistd_args])
    targets: dict[str, Target] = {}
    for name, column, _, _, port, route in LISTENERS:
        target = targets.setdefault(column, Target(column, 0, 0, proc.pid, note, proc=proc, until_closed=True))
        if 'tls = "tls"' not in route:  # the client speaks TLS, unless mailrelay does it for them
            target.dial = certs.dial
        if port == "bulk":
            target.bulk_port = ports[name]
        else:
            target.line_port = ports[name]
    for target in targets.values():
        wait_until_serving(target, proc, 10, f"mailrelay ({target.name})")
    targets["tls"].log_files = [log]  # one process, one log: summarised once
    return list(targets.values())


def negotiated_with(target: Target) -> str:
    """What a client's handshake with `target` settled on."""
    if not isinstance(target.dial, TLSDial):
        return "client speaks plain TCP (mailrelay's upstream leg is TLS)"
    with target.dial(target.line_port) as sock:
        assert isinstance(sock, ssl.SSLSocket)
        settled = negotiated(sock)
        read_line(sock)  # a whole session, so that it is logged as any other
        command(sock, [QUIT], b"221")
        sock.recv(4096)
    return settled


# --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark mailrelay's TLS paths (tls mode, TLS passthrough, TLS to the upstream) against a direct "
        "TLS connection (and haproxy/nginx terminating TLS, if on PATH).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    cli.add_bulk_arguments(parser)
    cli.add_sessions_arguments(parser, latency=True)
    cli.add_latency_arguments(parser)
    parser.add_argument("--pieces", type=int, default=1, help="writes (so TLS records) per command line in the sessions tests")
    parser.add_argument("--upstream-procs", type=int, default=2, help="processes of the line upstream (SO_REUSEPORT)")
    return cli.parse_args(parser, argv, ("sessions", "bulk", "latency"))


def main(argv: list[str] | None = None) -> int:
    return cli.run_bench(parse_args(argv), run)


def run(args: argparse.Namespace, children: Children, workdir: Path, failures: list[str]) -> int:
    started = time.monotonic()
    certs = Certificates(workdir)
    upstream = Upstream(children, args.upstream_procs, str(certs.combined))
    direct = Target("direct", upstream.tls_bulk, upstream.tls_line, None, dial=certs.dial, until_closed=True)
    wait_until_serving(direct, upstream.proc, 10, "the upstream")
    wait_until_serving(Target("plain", upstream.bulk, upstream.line, None), upstream.proc, 10, "the plain upstream")

    targets = [direct, *start_mailrelay(children, workdir, upstream, certs)]
    skipped = start_others(args, children, workdir, targets, upstream, certs)

    print_machine("mailrelay TLS benchmark")
    print(f"OpenSSL: {ssl.OPENSSL_VERSION} (Python ssl: clients, upstream); {pyopenssl_version()} (pyOpenSSL: mailrelay)")
    print_targets("targets", targets, LEGEND)
    if skipped:
        print(f"skipped: {'; '.join(skipped)}")
    print(
        f"certificate: ECDSA P-256 (trustme; CA ECDSA P-256 too), names {SERVER_NAME} and 127.0.0.1; TLS clients send SNI "
        f"{SERVER_NAME!r} and verify the chain and the name"
    )
    print("negotiated: " + "; ".join(f"{t.name} {negotiated_with(t)}" for t in targets))
    procs = max(1, min(args.client_procs, args.clients))
    print(
        "sessions: new TCP connection + full TLS handshake (no resumption: clients never offer a session, and a resumed "
        "handshake would count as an error), greeting, EHLO/MAIL/RCPT, QUIT -> 221, read until the server closes, close; "
        f"each command written in {args.pieces} piece(s); 1 client thread, then {args.clients} clients = threads in "
        f"{procs} processes; median of {args.rounds} rounds of {args.duration:g}s; session times pooled (ms)"
    )
    print(
        f"bulk:     one TLS session from this process, {CHUNK >> 20} MiB send/recv buffers, {args.bulk_mib} MiB per "
        f"transfer, median of {args.repeat} per direction (targets that terminate TLS only)"
    )
    print(
        f"latency:  NOOP -> 250 inside one open TLS session, {args.rounds} rounds of up to "
        f"{max(1, args.exchanges // args.rounds)} exchanges or {args.duration:g}s, samples pooled "
        f"({', '.join(LATENCY_TARGETS)})"
    )
    print("clients set TCP_NODELAY; rounds go over all targets in turn")
    print(
        f"upstream: bulk sink/source (threads), SMTP-like line server (asyncio x {args.upstream_procs} processes, "
        "SO_REUSEPORT), each plain and with TLS (Python's server defaults)"
    )
    print(flush=True)

    m = Measurements(targets, upstream.proc.pid, started, failures)
    if "sessions" in args.only:
        m.sessions(args, children, "TLS sessions", times=True)
    if "bulk" in args.only:
        m.bulk(args)
    if "latency" in args.only:
        m.latency(args, 1, "whole line", only=lambda t: t.name in LATENCY_TARGETS)
    m.print_results("session times (ms) and latency (us)")
    if "sessions" in args.only:
        m.print_session_counts()
    if "latency" in args.only:
        m.print_latency_counts([1])
    m.print_session_errors()

    m.print_cpu(machine=True)
    print("(mailrelay's columns are one twistd process serving all its listeners)")
    if "sessions" in args.only:
        print()
        m.print_cpu_per_session(args.clients)

    print()
    print_logs_and_notes(targets)
    return m.finish()


if __name__ == "__main__":
    sys.exit(main())
