#!/usr/bin/env python3
"""
Splice-mode benchmark: a direct connection to an upstream vs the same traffic through
mailrelay (and through haproxy / nginx when they are on PATH), all in one run.

    .venv/bin/python bench/splice.py            # about 35 s (55 s with haproxy and nginx)
    .venv/bin/python bench/splice.py --help

Everything runs on 127.0.0.1 with ephemeral ports. The script starts its own upstream
servers (a separate process), mailrelay as a real `twistd` subprocess, and the other
proxies if present, and kills every process it started when it ends, also on Ctrl-C,
SIGTERM or an error (and, through PR_SET_PDEATHSIG, if it is killed outright).

See bench/README.md for what each number means. What bench/tls.py shares with this
script lives in bench/common/.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from common.cli import add_bulk_arguments, add_sessions_arguments, run_bench
from common.cli import parse_args as common_parse_args
from common.clients import command, connect, pieces_of, read_line
from common.logs import mailrelay_log_summary
from common.measure import Measurements, Window, percentile
from common.processes import Children
from common.proxies import start_others
from common.report import print_machine
from common.targets import Target, wait_until_serving
from common.twistd import mailrelay_config, mailrelay_listener, start_twistd
from common.upstream import Upstream
from common.wire import CHUNK, NOOP, QUIT

# Runs twistd in this interpreter with mailrelay's TCP_NODELAY switched off, to show
# what it buys. Nothing under mailrelay/ is changed: the function is replaced in memory.
NAGLE_WRAPPER = """\
import sys
import mailrelay.splice
mailrelay.splice.set_nodelay = lambda transport: None
from twisted.scripts.twistd import run
sys.argv = ["twistd"] + sys.argv[1:]
run()
"""


def start_mailrelay(children: Children, workdir: Path, name: str, upstream: Upstream, nagle: bool, workers: int = 1) -> Target:
    listeners = [mailrelay_listener("bulk", "splice", upstream.bulk), mailrelay_listener("smtp", "splice", upstream.line)]
    config = mailrelay_config("splice.py", listeners, workers=workers)
    proc, ports, log, twistd_args = start_twistd(children, workdir, name, config, 2, NAGLE_WRAPPER if nagle else None)
    shown = "twistd" if not nagle else f"{sys.executable} -c '<set_nodelay replaced by a no-op; twistd>'"
    target = Target(name, ports["bulk"], ports["smtp"], proc.pid, " ".join([shown, *twistd_args]))
    target.log_files = [log]
    target.proc = proc
    wait_until_serving(target, proc, 10, name)
    return target


# --------------------------------------------------------------------------------------
# Measurements


def measure_latency(win: Window, target: Target, pieces: int, exchanges: int, max_seconds: float) -> list[int]:
    """Nanoseconds of each NOOP -> 250 exchange inside one open session."""
    parts = pieces_of(NOOP, pieces)
    samples: list[int] = []
    with connect(target.line_port) as sock:
        read_line(sock)
        for _ in range(min(50, exchanges)):
            command(sock, parts, b"250")
        win.begin()
        deadline = time.perf_counter() + max_seconds
        for _ in range(exchanges):
            t0 = time.perf_counter_ns()
            command(sock, parts, b"250")
            samples.append(time.perf_counter_ns() - t0)
            if time.perf_counter() > deadline:
                break
        win.end()
        command(sock, pieces_of(QUIT, 1), b"221")
    return samples


# --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark mailrelay's splice mode against a direct connection (and haproxy/nginx if on PATH).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_bulk_arguments(parser)
    add_sessions_arguments(parser, latency=True)
    parser.add_argument(
        "--pieces", type=int, default=2, help="writes per command line in the sessions/s tests and the split latency test"
    )
    parser.add_argument(
        "--exchanges",
        type=int,
        default=6000,
        help="request/response exchanges per latency test and target, split over the rounds (each round capped by --duration)",
    )
    parser.add_argument("--upstream-procs", type=int, default=2, help="processes of the line upstream (SO_REUSEPORT)")
    parser.add_argument(
        "--workers",
        type=int,
        default=min(os.cpu_count() or 1, 4) if (os.cpu_count() or 1) > 1 else 0,
        help="also measure mailrelay with `workers = N` (a supervisor and N worker processes); 0: not",
    )
    parser.add_argument(
        "--no-nagle-compare",
        dest="nagle_compare",
        action="store_false",
        help="skip the extra 'mailrelay, Nagle on' column (mailrelay with TCP_NODELAY patched out in memory)",
    )
    return common_parse_args(parser, argv, ("bulk", "sessions", "latency"))


def main(argv: list[str] | None = None) -> int:
    return run_bench(parse_args(argv), run)


def run(args: argparse.Namespace, children: Children, workdir: Path, failures: list[str]) -> int:
    started = time.monotonic()
    upstream = Upstream(children, args.upstream_procs)
    direct = Target("direct", upstream.bulk, upstream.line, None)
    wait_until_serving(direct, upstream.proc, 10, "the upstream")

    targets = [direct, start_mailrelay(children, workdir, "mailrelay", upstream, nagle=False)]
    if args.nagle_compare:
        targets.append(start_mailrelay(children, workdir, "mailrelay-nagle", upstream, nagle=True))
    if args.workers > 1:
        targets.append(start_mailrelay(children, workdir, f"mailrelay-w{args.workers}", upstream, False, args.workers))
    skipped = start_others(args, children, workdir, targets, upstream)

    names = [t.name for t in targets]
    print_machine("mailrelay splice benchmark")
    print(f"targets: {', '.join(names)}")
    if skipped:
        print(f"skipped: {'; '.join(skipped)}")
    procs = max(1, min(args.client_procs, args.clients))
    per_round = max(1, args.exchanges // args.rounds)
    print(
        f"bulk:     1 connection from this process, {CHUNK >> 20} MiB send/recv buffers, {args.bulk_mib} MiB per transfer, "
        f"median of {args.repeat} per direction"
    )
    print(
        f"sessions: connect, greeting, EHLO/MAIL/RCPT, QUIT; each command written in {args.pieces} piece(s); "
        f"1 client thread, then {args.clients} clients = threads in {procs} processes; "
        f"median of {args.rounds} rounds of {args.duration:g}s"
    )
    print(
        f"latency:  NOOP -> 250 inside one open session, {args.rounds} rounds of up to {per_round} exchanges "
        f"or {args.duration:g}s, samples pooled"
    )
    print("clients set TCP_NODELAY; rounds go over all targets in turn")
    print(
        f"upstream: bulk sink/source (threads), SMTP-like line server (asyncio x {args.upstream_procs} processes, SO_REUSEPORT)"
    )
    print(flush=True)

    m = Measurements(targets, upstream.proc.pid, started, failures)
    values, rows = m.values, m.rows

    if "bulk" in args.only:
        m.bulk(args)
    if "sessions" in args.only:
        m.sessions(args, children)
    if "latency" in args.only:
        variants = [(1, "whole line")] + ([(args.pieces, f"{args.pieces} pieces")] if args.pieces > 1 else [])
        for pieces, label in variants:
            key = f"lat{pieces}"
            rows += [(f"{key}_med", f"exchange median us, {label}"), (f"{key}_p99", f"exchange p99 us, {label}")]
            per_round = max(1, args.exchanges // args.rounds)
            results = m.rounds(
                key, f"latency ({label})", args.rounds, lambda w, t: measure_latency(w, t, pieces, per_round, args.duration)
            )

            def pooled(r: list[list[int]], k: str = key) -> dict[str, Any]:
                samples = sorted(x for part in r for x in part)
                return {
                    f"{k}_med": percentile(samples, 0.5) / 1000,
                    f"{k}_p99": percentile(samples, 0.99) / 1000,
                    f"{k}_n": len(samples),
                }

            m.store(key, results, pooled)
    m.print_results("latency (us)")
    if "latency" in args.only:
        counts = ", ".join(
            f"{t.name} {values[(f'lat{p}_n', t.name)]}"
            for p in ([1] + ([args.pieces] if args.pieces > 1 else []))
            for t in targets
            if isinstance(values.get((f"lat{p}_n", t.name)), int)
        )
        print(f"latency samples: {counts}")
    m.print_session_errors()

    m.print_cpu()

    print()
    for t in targets:
        if t.log_files:
            print(mailrelay_log_summary(t.name, t.log_files))
    for t in targets[1:]:
        print(f"{t.name}: {t.note}")
    return m.finish()


if __name__ == "__main__":
    sys.exit(main())
