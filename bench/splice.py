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
import fcntl
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common.cli import add_bulk_arguments, add_latency_arguments, add_sessions_arguments, run_bench
from common.cli import parse_args as common_parse_args
from common.logs import mailrelay_log_summary, read_session_log
from common.measure import MIN_STREAM_MIB, Measurements
from common.processes import Children, cpu_of_group
from common.proxies import start_others
from common.report import print_machine
from common.targets import Target, wait_until_serving
from common.twistd import mailrelay_config, mailrelay_listener, start_twistd
from common.upstream import Upstream
from common.wire import CHUNK, HOST

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


# What mailrelay's supervisor gives a worker (mailrelay/workers.py): the listening sockets
# at fd 3, 4, ... in listener order, named in MAILRELAY_LISTEN_FDS.
FIRST_FD = 3
WORKER_SESSION = re.compile(r"worker (\d+) \[pid \d+\]: session .* outcome=")
LISTENER_NAMES = ("bulk", "smtp")
BACKLOG = 50  # what twisted's listenTCP, and so mailrelay's supervisor, listens with


def _reuseport_sockets(ports: list[int]) -> list[socket.socket]:
    """A listening socket per listener, bound with SO_REUSEPORT to its port in `ports` (0: a new one)."""
    socks = []
    for port in ports:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((HOST, port))
        sock.listen(BACKLOG)
        sock.setblocking(False)
        socks.append(sock)
    return socks


def _at_first_fds(fds: list[int]) -> Any:
    """In the worker before its exec: `fds` moved to 3, 4, ... (inheritable, as dup2 makes them)."""

    def setup() -> None:
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]  # out of the way of 3, 4, ... first
        for offset, fd in enumerate(high):
            os.dup2(fd, FIRST_FD + offset)
            os.close(fd)

    return setup


def start_mailrelay_workers(
    children: Children, workdir: Path, name: str, upstream: Upstream, workers: int, reuseport: bool
) -> Target:
    """
    `workers` independent `python -m mailrelay worker` processes, started as mailrelay's
    supervisor starts its workers (environment, fd layout, command), with no supervisor:
    their log lines go to a file per worker. With `reuseport` (mailrelay-rpN) each gets
    listening sockets of its own, bound to the same ports with SO_REUSEPORT: the kernel
    spreads new connections over the workers by a hash of their addresses. Without
    (mailrelay-shN) they share one socket per listener, as under the supervisor, and
    whichever worker's reactor calls accept() first takes the next connection.
    """
    listeners = [mailrelay_listener("bulk", "splice", upstream.bulk), mailrelay_listener("smtp", "splice", upstream.line)]
    config = workdir / f"{name}.toml"
    config.write_text(mailrelay_config("splice.py", listeners))
    command = [sys.executable, "-m", "mailrelay", "worker", "--config", str(config)]
    fds_env = json.dumps({listener: [FIRST_FD + i, "AF_INET"] for i, listener in enumerate(LISTENER_NAMES)})
    env = {k: v for k, v in os.environ.items() if k not in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")}
    env.update(MAILRELAY_LISTEN_FDS=fds_env, MAILRELAY_SUPERVISOR_PID=str(os.getpid()), PYTHONUNBUFFERED="1")
    ports = [0] * len(LISTENER_NAMES)
    leader = None
    logs = []
    shared = None if reuseport else _reuseport_sockets(ports)
    for index in range(1, workers + 1):
        socks = shared or _reuseport_sockets(ports)
        ports = [sock.getsockname()[1] for sock in socks]
        log = workdir / f"{name}-{index}.out"
        logs.append(log)
        fds = [sock.fileno() for sock in socks]
        kwargs: dict[str, Any] = dict(
            env={**env, "MAILRELAY_WORKER": str(index)},
            cwd=workdir,  # the installed mailrelay, not a checkout's (`python -m` puts the cwd first)
            stdin=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            pass_fds=[FIRST_FD + i for i in range(len(fds))],
            setup=_at_first_fds(fds),
        )
        with open(log, "wb") as out:
            proc = children.popen_group(command, leader, stdout=out, **kwargs)
        leader = leader or proc
        if shared is None:
            for sock in socks:
                sock.close()  # the worker has its own descriptors of them
    for sock in shared or []:
        sock.close()
    assert leader is not None
    _wait_for_workers(logs, leader, name)
    how = "each with its own SO_REUSEPORT sockets" if reuseport else "sharing one socket per listener"
    shown = f"{workers} x `python -m mailrelay worker --config ...` (no supervisor), {how}"
    target = Target(name, ports[0], ports[1], leader.pid, shown)
    target.log_files = logs
    target.proc = leader
    wait_until_serving(target, leader, 10, name)
    return target


def _wait_for_workers(logs: list[Path], leader: Any, name: str) -> None:
    """Until every worker's log says it serves."""
    deadline = time.monotonic() + 30
    while not all(log.exists() and "worker serving" in log.read_text(errors="replace") for log in logs):
        if time.monotonic() > deadline or leader.poll() is not None:
            tails = "".join(log.read_text(errors="replace")[-1500:] for log in logs if log.exists())
            raise RuntimeError(f"{name}: its workers did not all start serving\n{tails}")
        time.sleep(0.05)


# --------------------------------------------------------------------------------------
# Measurements


def print_scaling(m: Measurements, workers: int) -> None:
    """Each N-process (or N-thread) column against its one-process one, and mailrelay's
    N-process columns against nginx-wN, for the sessions rows."""
    pairs = [
        (f"mailrelay-w{workers}", "mailrelay"),
        (f"mailrelay-sh{workers}", "mailrelay"),
        (f"mailrelay-rp{workers}", "mailrelay"),
        (f"nginx-w{workers}", "nginx"),
        (f"haproxy-t{workers}", "haproxy"),
        (f"mailrelay-w{workers}", f"nginx-w{workers}"),
        (f"mailrelay-sh{workers}", f"nginx-w{workers}"),
        (f"mailrelay-rp{workers}", f"nginx-w{workers}"),
    ]
    lines = []
    for key, label in (("serial", "1 client"), ("concurrent", "concurrent")):
        ratios = []
        for a, b in pairs:
            va, vb = m.values.get((key, a)), m.values.get((key, b))
            if isinstance(va, float) and isinstance(vb, float) and vb:
                ratios.append(f"{a}/{b} {va / vb:.2f}")
        if ratios:
            lines.append(f"  sessions/s, {label}: " + ", ".join(ratios))
    if lines:
        print(f"scaling with {workers} processes (threads for haproxy):")
        print("\n".join(lines))
    shares = []
    for t in m.targets:
        counts = sessions_per_worker(t)
        if counts:
            total = sum(counts) or 1
            shares.append(f"{t.name} " + " / ".join(f"{100 * n / total:.0f}%" for n in counts))
    if shares:
        print("sessions per worker, whole run: " + "; ".join(shares))
    supervised = next((t for t in m.targets if t.name == f"mailrelay-w{workers}"), None)
    if supervised is not None and supervised.proc is not None and supervised.pgid is not None:
        own, group = process_cpu(supervised.proc.pid), cpu_of_group(supervised.pgid)
        print(
            f"{supervised.name}, CPU so far (start-up included): supervisor {own:.1f}s of {group:.1f}s "
            f"({100 * own / (group or 1):.0f} %; it relays every line its workers log)"
        )


def process_cpu(pid: int) -> float:
    """CPU seconds (user+system) one process has used so far, without its children."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    fields = stat[stat.rfind(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sessions_per_worker(target: Target) -> list[int]:
    """Session lines of each worker of a multi-process mailrelay column (none for the others):
    one log file per worker, or the supervisor's log with `worker N [pid P]:` prefixes."""
    if len(target.log_files) > 1:
        return [read_session_log([log]).count() for log in target.log_files]
    counts: dict[int, int] = {}
    for log in target.log_files:
        if not log.exists():
            continue
        for line in log.read_text(errors="replace").splitlines():
            found = WORKER_SESSION.search(line)
            if found:
                counts[int(found.group(1))] = counts.get(int(found.group(1)), 0) + 1
    return [counts[k] for k in sorted(counts)] if len(counts) > 1 else []


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
        "--streams",
        type=int,
        default=50,
        help="connections at once in the many-streams bulk test, each moving --bulk-mib / streams MiB (at least 4), "
        "threads in --client-procs processes; 0: not",
    )
    add_latency_arguments(parser)
    parser.add_argument("--upstream-procs", type=int, default=2, help="processes of the line upstream (SO_REUSEPORT)")
    parser.add_argument(
        "--workers",
        type=int,
        default=min(os.cpu_count() or 1, 4) if (os.cpu_count() or 1) > 1 else 0,
        help="also measure mailrelay with `workers = N` (a supervisor and N worker processes), N workers on SO_REUSEPORT "
        "sockets of their own (mailrelay-rpN), nginx with N worker processes and haproxy with N threads; 0: not",
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
        for prefix, reuseport in (("sh", False), ("rp", True)):
            name = f"mailrelay-{prefix}{args.workers}"
            targets.append(start_mailrelay_workers(children, workdir, name, upstream, args.workers, reuseport))
    skipped = start_others(args, children, workdir, targets, upstream)
    if args.workers > 1:
        skipped += start_others(args, children, workdir, targets, upstream, workers=args.workers)

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
    if args.streams > 0:
        stream_mib = max(MIN_STREAM_MIB, args.bulk_mib / args.streams)
        print(
            f"          then {args.streams} connections at once, {stream_mib:g} MiB each, threads in "
            f"{max(1, min(args.client_procs, args.streams))} processes: all bytes / first connect to last acknowledgement"
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

    if "bulk" in args.only:
        m.bulk(args)
        if args.streams > 0:
            m.bulk_streams(args, children)
    if "sessions" in args.only:
        m.sessions(args, children)
    pieces_measured = [1] + ([args.pieces] if args.pieces > 1 else [])
    if "latency" in args.only:
        for pieces in pieces_measured:
            m.latency(args, pieces, "whole line" if pieces == 1 else f"{pieces} pieces")
    m.print_results("latency (us)")
    if "latency" in args.only:
        m.print_latency_counts(pieces_measured)
    m.print_session_errors()
    if args.workers > 1:
        print_scaling(m, args.workers)

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
