#!/usr/bin/env python3
"""
Idle-memory benchmark: what an open, idle session costs a proxy in memory, for
mailrelay's `splice` (plain) and `tls` (terminating) modes, nginx's stream proxy and
haproxy (plain and terminating TLS, when on PATH), one proxy at a time.

    .venv/bin/python bench/memory.py            # about 40 s with haproxy and nginx
    .venv/bin/python bench/memory.py --help

For each target: start the proxy, open and close a few warm-up sessions, read its
memory, open N sessions (connect, TLS handshake where the target terminates TLS, greeting,
one NOOP -> 250 so that the session is spliced to the upstream), hold them open and idle,
read its memory again, close them, stop the proxy. Memory is the proxy's process group's
RSS and PSS (/proc/PID/smaps_rollup), its file descriptors and what the kernel has
charged to its sockets (`ss -m`); see bench/README.md.

Everything runs on 127.0.0.1 with ephemeral ports, the upstream in a process of its own,
mailrelay as a real `twistd`; every process the script starts is ended when it ends, also
on Ctrl-C, SIGTERM or an error (and, through PR_SET_PDEATHSIG, if it is killed outright).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import cli
from common.clients import command, read_line
from common.logs import mailrelay_log_summary
from common.measure import finish
from common.processes import Children
from common.proxies import NGINX_STREAM_SSL, Unavailable, launch_proxy, nginx_module, nginx_user_line, start_other
from common.report import print_grid, print_machine, print_targets
from common.targets import SERVER_NAME, Certificates, Target, free_port, wait_until_serving
from common.twistd import mailrelay_config, mailrelay_listener, start_twistd
from common.upstream import Upstream
from common.wire import NOOP, QUIT

# Target name -> what it is; the order of the report. Each TLS target is compared with
# nginx-ssl, each plain one with nginx.
LEGEND = {
    "splice": 'client -> mailrelay mode="splice" -> upstream (plain TCP both legs; zero_copy = true, the default)',
    "splice-userspace": "the same with zero_copy = false (the userspace pump)",
    "nginx": "client -> nginx (stream proxy_pass, worker_processes 1) -> upstream",
    "haproxy": "client -> haproxy (mode tcp, nbthread 1) -> upstream",
    "tls": 'TLS client -> mailrelay mode="tls", protocol "none" (terminates) -> plain upstream',
    "nginx-ssl": "TLS client -> nginx (stream, listen ... ssl, worker_processes 1) -> plain upstream",
    "haproxy-ssl": "TLS client -> haproxy (mode tcp, bind ... ssl crt, nbthread 1) -> plain upstream",
}
TLS_TARGETS = ("tls", "nginx-ssl", "haproxy-ssl")


def baseline_of(name: str) -> str:
    return "nginx-ssl" if name in TLS_TARGETS else "nginx"


# --------------------------------------------------------------------------------------
# What a process group holds


def group_pids(pgid: int) -> list[int]:
    """The live processes of a process group (a proxy and whatever it forked)."""
    # fields[0] is field 3 of /proc/PID/stat (state); fields[2] is field 5, pgrp. The pid
    # itself is not in them: read it from the directory instead.
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                text = f.read()
        except OSError:
            continue
        fields = text[text.rfind(b")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] != b"Z":
            pids.append(int(entry))
    return sorted(pids)


def smaps_rollup(pid: int) -> dict[str, int]:
    """The KiB fields of /proc/PID/smaps_rollup (Rss, Pss, Anonymous, ...); empty if it is gone."""
    values: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                m = re.match(r"(\w+):\s+(\d+) kB", line)
                if m:
                    values[m.group(1)] = int(m.group(2))
    except OSError:
        pass
    return values


@dataclass
class Pipes:
    """The pipes among a process group's file descriptors, and what the kernel holds for them."""

    count: int = 0
    """Distinct pipes (by inode): a pipe with both ends open in the group counts once."""
    buffered: int = 0
    """Bytes waiting in them now (FIONREAD)."""
    capacity: int = 0
    """Their sizes (F_GETPIPE_SZ): the most pages they could hold."""


@dataclass
class Snapshot:
    """One reading of a proxy's process group."""

    rss: int = 0
    pss: int = 0
    pss_anon: int = 0
    """KiB, summed over the group's processes. PSS moves when other processes start or stop
    mapping the same libraries; its anonymous part (Pss_Anon) does not."""
    fds: int = 0
    sockets: int = 0
    """Distinct socket inodes among the fds (a dup()ed descriptor counts once here, twice in fds)."""
    pipes: Pipes = field(default_factory=Pipes)
    skmem: int = 0
    """Bytes the kernel has charged to the group's TCP sockets (see `socket_memory`)."""
    skmem_sockets: int = 0
    """The TCP sockets `ss` attributed to the group."""
    by_pid: dict[int, tuple[int, int]] = field(default_factory=dict)
    """pid -> (RSS, PSS) KiB."""


FIONREAD = 0x541B


def _pipe_facts(pid: int, fd: str) -> tuple[int, int]:
    """(bytes buffered, capacity) of a pipe another process holds, through /proc/PID/fd/FD."""
    import fcntl
    import struct

    try:
        # Opening a pipe through /proc adds a reader or writer for as long as we hold it;
        # it does not take or change its bytes. O_NONBLOCK: never wait for the other end.
        own = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return 0, 0
    try:
        buffered = struct.unpack("i", fcntl.ioctl(own, FIONREAD, b"\0\0\0\0"))[0]
        capacity = fcntl.fcntl(own, 1032)  # F_GETPIPE_SZ
        return buffered, capacity
    except OSError:
        return 0, 0
    finally:
        os.close(own)


def socket_memory(pids: list[int]) -> tuple[int, int]:
    """
    (bytes, sockets): what the kernel has charged to the TCP sockets of `pids`, from
    `ss -tanmp`'s skmem: r (receive queue) + w (send queue) + f (forward-allocated
    reserve) + o (options) + bl (backlog); t (wmem_alloc) is left out because the bytes it
    counts are also in w. The socket objects themselves (struct tcp_sock, file, inode) are
    not in it (see `kernel_objects`).
    """
    try:
        out = subprocess.run(["ss", "-tanmpH"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return 0, 0
    wanted = set(pids)
    records: list[str] = []
    for line in out.splitlines():
        if line[:1].isspace() and records:
            records[-1] += " " + line
        else:
            records.append(line)
    total = count = 0
    for record in records:
        owners = {int(p) for p in re.findall(r"pid=(\d+)", record)}
        skmem = re.search(r"skmem:\(([^)]*)\)", record)
        if not owners & wanted or skmem is None:
            continue
        values = dict(re.findall(r"([a-z]+)(\d+)", skmem.group(1)))
        total += sum(int(values.get(k, 0)) for k in ("r", "w", "f", "o", "bl"))
        count += 1
    return total, count


def snapshot(pgid: int, kernel: bool = True) -> Snapshot:
    """What the process group `pgid` holds now; with `kernel`, its sockets' charged memory too (slow: runs `ss`)."""
    snap = Snapshot()
    pids = group_pids(pgid)
    seen_sockets: set[str] = set()
    seen_pipes: set[str] = set()
    for pid in pids:
        memory = smaps_rollup(pid)
        snap.rss += memory.get("Rss", 0)
        snap.pss += memory.get("Pss", 0)
        snap.pss_anon += memory.get("Pss_Anon", 0)
        snap.by_pid[pid] = (memory.get("Rss", 0), memory.get("Pss", 0))
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            snap.fds += 1
            if link.startswith("socket:"):
                seen_sockets.add(link)
            elif link.startswith("pipe:") and link not in seen_pipes:
                seen_pipes.add(link)
                buffered, capacity = _pipe_facts(pid, fd)
                snap.pipes.buffered += buffered
                snap.pipes.capacity += capacity
    snap.sockets = len(seen_sockets)
    snap.pipes.count = len(seen_pipes)
    if kernel:
        snap.skmem, snap.skmem_sockets = socket_memory(pids)
    return snap


def session_holder(pgid: int) -> int:
    """The process of the group with the most sockets: where the sessions are (nginx's worker, not its master)."""

    def sockets(pid: int) -> int:
        try:
            return sum(1 for fd in os.listdir(f"/proc/{pid}/fd") if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"))
        except OSError:
            return -1

    return max(group_pids(pgid), key=sockets)


def open_files_limit(pid: int) -> str:
    """The soft limit on open files of process `pid` (/proc/PID/limits)."""
    try:
        with open(f"/proc/{pid}/limits") as f:
            for line in f:
                if line.startswith("Max open files"):
                    return line.split()[3]
    except OSError:
        pass
    return "?"


SOCKET_SLABS = ("TCP", "sock_inode_cache", "filp", "dentry", "eventpoll_epi")
"""The slab objects behind one TCP socket that a proxy watches with epoll."""


def kernel_objects() -> str:
    """
    What the kernel allocates per TCP socket outside its buffers, from the object sizes in
    /proc/slabinfo (root only): the same for every target with the same sockets per
    session, and in neither RSS nor PSS nor the socket buffers. Caches merged into others
    on this kernel are missing from the list.
    """
    sizes = {}
    try:
        with open("/proc/slabinfo") as f:
            for line in f:
                parts = line.split()
                if parts and parts[0] in SOCKET_SLABS:
                    sizes[parts[0]] = int(parts[3])
    except OSError:
        return "unknown (/proc/slabinfo is not readable)"
    listed = " + ".join(f"{name} {size}" for name, size in sizes.items())
    return f"{listed} = {sum(sizes.values()) / 1024:.1f} KiB (slab objects; not in RSS, PSS or the socket buffers)"


# --------------------------------------------------------------------------------------
# The targets, one started at a time


def mailrelay_target(children: Children, workdir: Path, upstream: Upstream, certs: Certificates, name: str, cap: int) -> Target:
    """
    mailrelay with one listener in front of the line server: `splice`, `splice-userspace`
    (zero_copy = false), or `tls` with the run's certificate.
    """
    tls = name == "tls"
    keys = "zero_copy = false\n" if name == "splice-userspace" else ""
    # The listener text ends inside its [listener.connection_limits] table: the line added
    # goes there, so that the default max_sessions (5000) never turns a session away.
    listener = mailrelay_listener(name, "tls" if tls else "splice", upstream.line, keys=keys) + f"max_sessions = {cap}\n"
    config = mailrelay_config("memory.py", [listener], certs if tls else None)
    proc, ports, log, twistd_args = start_twistd(children, workdir, f"mailrelay-{name}", config, 1)
    target = Target(name, 0, ports[name], proc.pid, " ".join(["twistd", *twistd_args]), proc=proc)
    target.log_files = [log]
    if tls:
        target.dial, target.until_closed = certs.dial, True
    wait_until_serving(target, proc, 10, f"mailrelay ({name})")
    return target


HAPROXY = """\
global
    maxconn {maxconn}
    nbthread 1
defaults
    mode tcp
    maxconn {maxconn}
    timeout connect 10s
    timeout client 1h
    timeout server 1h
listen line
    bind 127.0.0.1:{port}{ssl}
    server upstream 127.0.0.1:{upstream}
"""


def haproxy_target(
    children: Children, workdir: Path, binary: str, upstream: Upstream, certs: Certificates | None, cap: int
) -> Target:
    """haproxy (mode tcp, one thread) in front of the line server, terminating TLS with `certs`; `cap` sessions at most."""
    name = "haproxy-ssl" if certs else "haproxy"
    port = free_port()
    config = workdir / f"{name}.cfg"
    # haproxy sets its own open files limit from maxconn (two per session and some).
    ssl = f" ssl crt {certs.combined}" if certs else ""
    config.write_text(HAPROXY.format(maxconn=cap, port=port, upstream=upstream.line, ssl=ssl))
    target = Target(name, 0, port, None)
    if certs:
        target.dial, target.until_closed = certs.dial, True
    how = f"-db (mode tcp, nbthread 1, maxconn {cap}{', bind ... ssl crt' if certs else ''})"
    return launch_proxy(children, workdir, target, [binary, "-db", "-f", str(config)], how, [])


NGINX = """\
daemon off;
worker_processes 1;
worker_rlimit_nofile {nofile};
pid {workdir}/{name}.pid;
error_log {workdir}/{name}-error.log;
{user}
{load_module}
events {{ worker_connections {connections}; }}
stream {{{stream_ssl}
    server {{ listen 127.0.0.1:{port}{ssl}; proxy_pass 127.0.0.1:{upstream}; }}
}}
"""


def nginx_target(
    children: Children, workdir: Path, binary: str, upstream: Upstream, certs: Certificates | None, cap: int
) -> Target:
    """nginx's stream proxy (one worker) in front of the line server, terminating TLS with `certs`; `cap` sessions at most."""
    usable, load_module = nginx_module(binary, "stream")
    if not usable:
        raise Unavailable(load_module)
    name = "nginx-ssl" if certs else "nginx"
    port = free_port()
    config = workdir / f"{name}.conf"
    # A session is two connections of the worker (client and upstream), each a descriptor.
    config.write_text(
        NGINX.format(
            nofile=2 * cap + 64,
            workdir=workdir,
            name=name,
            user=nginx_user_line(),
            load_module=load_module,
            connections=2 * cap + 32,
            stream_ssl=NGINX_STREAM_SSL.format(chain=certs.chain, key=certs.key) if certs else "",
            port=port,
            ssl=" ssl" if certs else "",
            upstream=upstream.line,
        )
    )
    target = Target(name, 0, port, None)
    if certs:
        target.dial, target.until_closed = certs.dial, True
    argv = [binary, "-p", f"{workdir}/", "-c", str(config), "-e", f"{workdir}/{name}-error.log"]
    how = f"(stream, worker_processes 1, worker_connections {2 * cap + 32}{', listen ... ssl' if certs else ''})"
    return launch_proxy(children, workdir, target, argv, how, [f"{name}-error.log"])


# --------------------------------------------------------------------------------------
# Measuring one target


@dataclass
class Result:
    """A target's readings: before the sessions, with them open, after they closed."""

    name: str
    sessions: int
    before: Snapshot
    held: Snapshot
    after: Snapshot
    open_seconds: float
    holder_limit: str

    def per_session(self, attribute: str) -> float:
        """KiB (or count) per held session of a Snapshot attribute, `with` - `before`."""

        def value(snap: Snapshot) -> float:
            v: Any = snap
            for part in attribute.split("."):
                v = getattr(v, part)
            return float(v)

        return (value(self.held) - value(self.before)) / self.sessions


def open_session(target: Target) -> socket.socket:
    """A session left idle: connected (TLS handshake done), greeting read, one NOOP -> 250."""
    sock = target.dial(target.line_port)
    try:
        if not read_line(sock).startswith(b"220"):
            raise ConnectionError("no greeting")
        command(sock, [NOOP], b"250")
    except BaseException:
        sock.close()
        raise
    return sock


def close_sessions(socks: list[socket.socket]) -> None:
    """QUIT each, then close: the proxy sees the session end as it usually does."""
    for sock in socks:
        with contextlib.suppress(OSError):
            command(sock, [QUIT], b"221")
        sock.close()
    socks.clear()


def wait_for_sockets(pgid: int, sockets: int, timeout: float, at_least: bool) -> int:
    """Until the group holds `sockets` sockets or more (`at_least`), or that many or fewer; what it holds then."""
    deadline = time.monotonic() + timeout
    while True:
        count = snapshot(pgid, kernel=False).sockets
        if (count >= sockets) if at_least else (count <= sockets):
            return count
        if time.monotonic() > deadline:
            return count
        time.sleep(0.1)


def settled(pgid: int, settle: float) -> Snapshot:
    """A snapshot once the group's RSS has stopped moving (two readings `settle` seconds apart agree to 1 %)."""
    previous = snapshot(pgid, kernel=False)
    for _ in range(10):
        time.sleep(settle)
        current = snapshot(pgid, kernel=False)
        if abs(current.rss - previous.rss) <= previous.rss / 100:
            break
        previous = current
    return snapshot(pgid)


def measure(target: Target, sessions: int, warmup: int, settle: float, progress: Callable[[str], None]) -> Result:
    """
    `warmup` sessions opened and closed, a reading, `sessions` idle sessions opened and
    held, a reading, the sessions closed, a reading. RuntimeError if the proxy does not
    hold two sockets per session (it would not be measuring what it claims).
    """
    assert target.pgid is not None
    pgid = target.pgid
    socks: list[socket.socket] = []
    try:
        idle = snapshot(pgid, kernel=False).sockets
        progress(f"{target.name}: {warmup} warm-up sessions")
        socks = [open_session(target) for _ in range(warmup)]
        close_sessions(socks)
        wait_for_sockets(pgid, idle, 10, at_least=False)
        before = settled(pgid, settle)
        progress(f"{target.name}: opening {sessions} sessions")
        start = time.perf_counter()
        for _ in range(sessions):
            socks.append(open_session(target))
        open_seconds = time.perf_counter() - start
        holding = wait_for_sockets(pgid, before.sockets + 2 * sessions, 10, at_least=True)
        if holding < before.sockets + 2 * sessions:
            raise RuntimeError(
                f"{sessions} sessions open, but the proxy holds {holding - before.sockets} sockets more, not 2 each"
            )
        held = settled(pgid, settle)
        limit = open_files_limit(session_holder(pgid))
        progress(f"{target.name}: closing them")
        close_sessions(socks)
        wait_for_sockets(pgid, before.sockets, 20, at_least=False)
        after = settled(pgid, settle)
        return Result(target.name, sessions, before, held, after, open_seconds, limit)
    finally:
        for sock in socks:
            sock.close()


# --------------------------------------------------------------------------------------
# The report


def kib(value: float) -> str:
    return f"{value:,.1f}" if abs(value) < 100 else f"{value:,.0f}"


def print_results(results: list[Result]) -> None:
    by_name = {r.name: r for r in results}
    print("KiB per idle session: (with N sessions open - before) / N")
    table = [
        [
            "target",
            "sessions",
            "RSS MiB before/with",
            "RSS KiB",
            "PSS KiB",
            "x nginx",
            "PSS anon KiB",
            "socket bufs KiB",
            "fds",
            "sockets",
            "pipes",
            "RSS kept after close",
        ]
    ]
    for r in results:
        base = by_name.get(baseline_of(r.name))
        ratio = "-"
        if base is not None and base.per_session("rss") > 0 and base.per_session("pss_anon") > 0:
            rss, anon = r.per_session("rss") / base.per_session("rss"), r.per_session("pss_anon") / base.per_session("pss_anon")
            ratio = f"{rss:.2f}/{anon:.2f}"
        table.append(
            [
                r.name,
                str(r.sessions),
                f"{r.before.rss / 1024:.1f}/{r.held.rss / 1024:.1f}",
                kib(r.per_session("rss")),
                kib(r.per_session("pss")),
                ratio,
                kib(r.per_session("pss_anon")),
                kib(r.per_session("skmem") / 1024),
                f"{r.per_session('fds'):.2f}",
                f"{r.per_session('sockets'):.2f}",
                f"{r.per_session('pipes.count'):.2f}",
                f"{(r.after.rss - r.before.rss) / r.sessions:.1f} KiB/session",
            ]
        )
    print_grid(table)
    print(
        "x nginx: RSS/PSS anon per session over nginx's (plain targets) or nginx-ssl's (TLS targets). PSS anon: the "
        "anonymous part of PSS (Pss_Anon), which other processes mapping the same libraries do not move. fds, sockets, pipes: "
        "per session (sockets and pipes counted once however many descriptors refer to them). socket bufs: what the "
        "kernel charged to the proxy's TCP sockets (ss skmem r+w+f+o+bl)."
    )
    print()
    print("details:")
    for r in results:
        pipes = r.held.pipes
        print(
            f"  {r.name}: opened in {r.open_seconds:.1f}s ({r.sessions / r.open_seconds:,.0f}/s); open files limit of the "
            f"session holder {r.holder_limit}; processes (pid: RSS/PSS MiB with sessions) "
            + ", ".join(f"{pid}: {rss / 1024:.1f}/{pss / 1024:.1f}" for pid, (rss, pss) in r.held.by_pid.items())
            + f"; TCP sockets per ss {r.before.skmem_sockets} -> {r.held.skmem_sockets}, charged "
            f"{r.before.skmem / 1024:.0f} -> {r.held.skmem / 1024:.0f} KiB; pipes {r.before.pipes.count} -> {pipes.count} "
            f"({pipes.buffered} bytes in them, capacity {pipes.capacity >> 10} KiB)"
        )


# --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Measure the memory an idle session costs mailrelay (splice, tls) and nginx/haproxy (if on PATH).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--sessions", type=int, default=1000, help="idle sessions held open per target")
    parser.add_argument("--warmup", type=int, default=20, help="sessions opened and closed before the first reading")
    parser.add_argument(
        "--settle", type=float, default=0.5, help="seconds between readings of a proxy's RSS until it stops moving"
    )
    args = cli.parse_args(parser, argv, tuple(LEGEND))
    if args.sessions < 1:
        parser.error("--sessions must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    return cli.run_bench(parse_args(argv), run)


def raise_open_files_limit(needed: int) -> int:
    """The soft RLIMIT_NOFILE raised to the hard one (inherited by every process we start); the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    if soft != resource.RLIM_INFINITY and soft < needed:
        raise RuntimeError(f"{needed} open files are needed, the hard limit is {soft}: use fewer --sessions or raise it")
    return soft


def run(args: argparse.Namespace, children: Children, workdir: Path, failures: list[str]) -> int:
    started = time.monotonic()
    cap = args.sessions + args.warmup + 16
    # The proxy holds two sockets per session, this process and the upstream one each.
    limit = raise_open_files_limit(2 * cap + 256)
    certs = Certificates(workdir)
    upstream = Upstream(children, 1)
    wait_until_serving(Target("upstream", 0, upstream.line, None), upstream.proc, 10, "the upstream")

    def mailrelay(name: str) -> Callable[[], Target | None]:
        return lambda: mailrelay_target(children, workdir, upstream, certs, name, cap)

    starters = {name: mailrelay(name) for name in ("splice", "splice-userspace", "tls")}
    skipped: list[str] = []

    def other(proxy: str, start: Callable[..., Target], tls: bool) -> Callable[[], Target | None]:
        def starter() -> Target | None:
            target, why = start_other(
                args, proxy, lambda binary: start(children, workdir, binary, upstream, certs if tls else None, cap)
            )
            if why is not None:
                skipped.append(f"{proxy}{'-ssl' if tls else ''}{why.removeprefix(proxy)}")
            return target

        return starter

    for tls in (False, True):
        suffix = "-ssl" if tls else ""
        starters[f"nginx{suffix}"] = other("nginx", nginx_target, tls)
        starters[f"haproxy{suffix}"] = other("haproxy", haproxy_target, tls)

    print_machine("mailrelay idle memory benchmark")
    names = [name for name in LEGEND if name in args.only]
    print(
        f"sessions: {args.sessions} per target held open and idle, after {args.warmup} warm-up sessions opened and closed; "
        "each: connect (TLS targets: full handshake, no resumption), greeting, NOOP -> 250; one target at a time, each "
        "proxy started for it and stopped after it"
    )
    print(
        f"certificate: ECDSA P-256 (trustme), TLS clients verify it and send SNI {SERVER_NAME!r}; upstream: the line server "
        "(asyncio, 1 process)"
    )
    print(f"open files limit of this process and what it starts: {limit}; kernel objects per socket: {kernel_objects()}")

    def progress(text: str) -> None:
        print(f"  [{time.monotonic() - started:5.1f}s] {text}", file=sys.stderr, flush=True)

    results: list[Result] = []
    targets: list[Target] = []
    for name in names:
        try:
            target = starters[name]()
        except RuntimeError as e:  # mailrelay did not start: the others may still be measured
            failures.append(f"{name} did not start: {str(e).splitlines()[0]}")
            print(e, file=sys.stderr)
            continue
        if target is None:
            continue
        targets.append(target)
        try:
            results.append(measure(target, args.sessions, args.warmup, args.settle, progress))
        except (OSError, RuntimeError, ValueError) as e:
            failures.append(f"{name}: {e!r}")
        if target.proc is not None:
            if target.proc.poll() is not None:
                failures.append(f"{name} exited during the run with status {target.proc.returncode}")
            children.stop(target.proc)
    legend = {t.name: LEGEND[t.name] for t in targets}
    if targets:
        print_targets("targets", targets, legend)
    if skipped:
        print(f"skipped: {'; '.join(skipped)}")
    print(flush=True)
    if results:
        print_results(results)
    print()
    for t in targets:
        if t.log_files:
            print(mailrelay_log_summary(f"mailrelay ({t.name})", t.log_files))
    for t in targets:
        print(f"{t.name}: {t.note}")
    return finish(started, failures)


if __name__ == "__main__":
    sys.exit(main())
