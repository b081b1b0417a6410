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

See bench/README.md for what each number means.
"""

from __future__ import annotations

import argparse
import ctypes
import multiprocessing
import os
import platform
import re
import resource
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
CHUNK = 4 << 20  # application buffer for bulk transfers, both ends
IO_TIMEOUT = 60.0  # hang guard for every client socket
MB = 1_000_000

GREETING = b"220 bench.example ESMTP ready\r\n"
OK = b"250 ok\r\n"
BYE = b"221 bye\r\n"
SESSION_COMMANDS = (
    b"EHLO client.example.org\r\n",
    b"MAIL FROM:<sender@example.org>\r\n",
    b"RCPT TO:<rcpt@example.net>\r\n",
)
QUIT = b"QUIT\r\n"
NOOP = b"NOOP\r\n"


# --------------------------------------------------------------------------------------
# Process hygiene


def _libc() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


_LIBC = _libc()


def _die_with_parent() -> None:
    """In a child before exec: get SIGTERM when the bench process dies (Linux)."""
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _proc_stats() -> Any:
    """(fields of /proc/PID/stat from field 3, `state`, on) for every process."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        yield stat[stat.rfind(b")") + 2 :].split()


def _cpu_of_group(pgid: int) -> float:
    """CPU seconds (user+system) used so far by the live processes of a process group."""
    # fields[0] is field 3 (state): pgrp is field 5, utime 14, stime 15.
    ticks = sum(int(f[11]) + int(f[12]) for f in _proc_stats() if int(f[2]) == pgid)
    return ticks / os.sysconf("SC_CLK_TCK")


def _signal_group_and_wait(proc: subprocess.Popen[Any], sig: int, grace: float) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        pass


def _group_alive(pgid: int) -> bool:
    return any(int(f[2]) == pgid and f[0] != b"Z" for f in _proc_stats())


def _own_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Children:
    """Every process this script started; `stop_all()` ends them by process group id."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[Any]] = []
        self.workers: list[multiprocessing.process.BaseProcess] = []

    def popen(self, argv: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        proc = subprocess.Popen(argv, start_new_session=True, preexec_fn=_die_with_parent, **kwargs)
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[Any], grace: float = 5.0) -> None:
        """SIGTERM to the process's own group (pgid == its pid), SIGKILL to what is left."""
        if proc.poll() is None:
            _signal_group_and_wait(proc, signal.SIGTERM, grace)
        # Members of its group still alive (nginx workers, forked upstream servers, or
        # the process itself if SIGTERM was not enough): the group id cannot have been
        # reused while they exist.
        if proc.poll() is None or _group_alive(proc.pid):
            _signal_group_and_wait(proc, signal.SIGKILL, grace)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()

    def stop_all(self) -> None:
        for worker in self.workers:
            if worker.is_alive():
                worker.terminate()
        for worker in self.workers:
            worker.join(2)
            if worker.is_alive():
                worker.kill()
                worker.join(2)
        for proc in reversed(self.procs):
            self.stop(proc)


# --------------------------------------------------------------------------------------
# Upstream servers (run in their own process group: `--serve-upstream`)


def _bulk_connection(conn: socket.socket, zeros: memoryview) -> None:
    """`SINK n\\n` + n bytes -> `n\\n`;  `SOURCE n\\n` -> n bytes."""
    with conn:
        conn.settimeout(IO_TIMEOUT)
        head = b""
        while b"\n" not in head:
            data = conn.recv(256)
            if not data:
                return
            head += data
        line, rest = head.split(b"\n", 1)
        verb, size_text = line.split()
        size = int(size_text)
        if verb == b"SINK":
            got = len(rest)
            sink = bytearray(CHUNK)
            view = memoryview(sink)
            while got < size:
                n = conn.recv_into(view, min(CHUNK, size - got))
                if not n:
                    return
                got += n
            conn.sendall(b"%d\n" % got)
        elif verb == b"SOURCE":
            left = size
            while left:
                n = min(left, CHUNK)
                conn.sendall(zeros[:n])
                left -= n
        # Wait for the client to close first, so that no RST races the last bytes.
        try:
            while conn.recv(65536):
                pass
        except OSError:
            pass


def _bulk_server(sock: socket.socket) -> None:
    zeros = memoryview(bytes(CHUNK))
    while True:
        conn, _ = sock.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=_bulk_connection, args=(conn, zeros), daemon=True).start()


def _line_server_loop(sock: socket.socket, parent_pipe: int | None) -> None:
    """An SMTP-like server: greeting, `250 ok` per line, `221 bye` + close on QUIT."""
    import asyncio

    class LineProtocol(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:  # asyncio sets TCP_NODELAY itself
            self.transport = transport
            self.buffer = b""
            transport.write(GREETING)

        def data_received(self, data: bytes) -> None:
            self.buffer += data
            out = []
            while True:
                end = self.buffer.find(b"\n")
                if end < 0:
                    break
                line, self.buffer = self.buffer[: end + 1], self.buffer[end + 1 :]
                if line[:4].upper() == b"QUIT":
                    out.append(BYE)
                    self.transport.write(b"".join(out))
                    self.transport.close()
                    return
                out.append(OK)
            if out:
                self.transport.write(b"".join(out))

        def eof_received(self) -> bool:
            return False

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(LineProtocol, sock=sock, backlog=4096)
        done = loop.create_future()
        if parent_pipe is not None:
            # The parent's end of the pipe closes when it exits, however it exits.
            loop.add_reader(parent_pipe, lambda: done.done() or done.set_result(None))
        async with server:
            await done

    asyncio.run(main())


def serve_upstream(line_procs: int) -> None:
    """Entry point of the upstream process: prints `ports BULK LINE` and serves until stdin closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the bench stops us; Ctrl-C is its business
    bulk = socket.create_server((HOST, 0), backlog=128)
    line = socket.socket()
    line.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    line.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    line.bind((HOST, 0))
    line_port = line.getsockname()[1]
    # More line-server processes on the same port (SO_REUSEPORT spreads the connections),
    # so that a single-threaded upstream is not what limits sessions/s.
    for _ in range(max(0, line_procs - 1)):
        pid = os.fork()
        if pid == 0:
            _die_with_parent()
            line.close()
            own = socket.socket()
            own.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            own.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            own.bind((HOST, line_port))
            own.listen(4096)
            try:
                _line_server_loop(own, None)
            finally:
                os._exit(0)
    line.listen(4096)
    threading.Thread(target=_bulk_server, args=(bulk,), daemon=True).start()
    print(f"ports {bulk.getsockname()[1]} {line_port}", flush=True)
    _line_server_loop(line, sys.stdin.fileno())


# --------------------------------------------------------------------------------------
# Clients


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection((HOST, port), timeout=IO_TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _read_line(sock: socket.socket) -> bytes:
    data = sock.recv(4096)
    while not data.endswith(b"\n"):
        more = sock.recv(4096)
        if not more:
            raise ConnectionError(f"connection closed after {data!r}")
        data += more
    return data


def _pieces(line: bytes, pieces: int) -> list[bytes]:
    """`line` cut into `pieces` consecutive parts of about the same size."""
    pieces = max(1, min(pieces, len(line)))
    bounds = [round(i * len(line) / pieces) for i in range(pieces + 1)]
    return [line[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def _command(sock: socket.socket, parts: list[bytes], expect: bytes) -> None:
    for part in parts:
        sock.sendall(part)
    reply = _read_line(sock)
    if not reply.startswith(expect):
        raise ConnectionError(f"expected {expect!r}..., got {reply!r}")


def one_session(port: int, commands: list[list[bytes]], quit_parts: list[bytes]) -> None:
    """connect, greeting, each command -> 250, QUIT -> 221, close."""
    with _connect(port) as sock:
        if not _read_line(sock).startswith(b"220"):
            raise ConnectionError("no greeting")
        for parts in commands:
            _command(sock, parts, b"250")
        _command(sock, quit_parts, b"221")


def _session_script(pieces: int) -> tuple[list[list[bytes]], list[bytes]]:
    return [_pieces(c, pieces) for c in SESSION_COMMANDS], _pieces(QUIT, pieces)


def bulk_up(port: int, size: int) -> float:
    """Client -> upstream: seconds from the request to the sink's acknowledgement."""
    buf = memoryview(bytearray(CHUNK))
    with _connect(port) as sock:
        start = time.perf_counter()
        sock.sendall(b"SINK %d\n" % size)
        left = size
        while left:
            n = min(left, CHUNK)
            sock.sendall(buf[:n])
            left -= n
        reply = _read_line(sock)
        elapsed = time.perf_counter() - start
    if int(reply) != size:
        raise ConnectionError(f"sink got {int(reply)} bytes of {size}")
    return elapsed


def bulk_down(port: int, size: int) -> float:
    """Upstream -> client: seconds from the request to the last byte received."""
    buf = memoryview(bytearray(CHUNK))
    with _connect(port) as sock:
        start = time.perf_counter()
        sock.sendall(b"SOURCE %d\n" % size)
        got = 0
        while got < size:
            n = sock.recv_into(buf, min(CHUNK, size - got))
            if not n:
                raise ConnectionError(f"source sent {got} bytes of {size}")
            got += n
        elapsed = time.perf_counter() - start
    return elapsed


def _session_thread(port: int, pieces: int, start_at: float, end_at: float, out: list[Any]) -> None:
    commands, quit_parts = _session_script(pieces)
    count = errors = 0
    first_error = None
    delay = start_at - time.time()
    if delay > 0:
        time.sleep(delay)
    last = time.time()
    while last < end_at:
        try:
            one_session(port, commands, quit_parts)
            count += 1
        except OSError as e:
            errors += 1
            first_error = first_error or repr(e)
        last = time.time()
    out.append((count, errors, last, first_error))


# --------------------------------------------------------------------------------------
# Targets: what the clients connect to


class Target:
    """Somewhere to send the traffic: its bulk and line ports, and whose CPU to count."""

    def __init__(self, name: str, bulk_port: int, line_port: int, pgid: int | None, note: str = "") -> None:
        self.name = name
        self.bulk_port = bulk_port
        self.line_port = line_port
        self.pgid = pgid
        self.note = note
        self.log_files: list[Path] = []
        self.proc: subprocess.Popen[Any] | None = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_until_serving(target: Target, proc: subprocess.Popen[Any], timeout: float, what: str) -> None:
    """Until one whole session works through `target` (and the process is still there)."""
    deadline = time.monotonic() + timeout
    commands, quit_parts = _session_script(1)
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode}")
        try:
            one_session(target.line_port, commands, quit_parts)
            return
        except OSError as e:
            last_error = e
            time.sleep(0.05)
    raise RuntimeError(f"{what} does not serve within {timeout:g}s: {last_error!r}")


LISTENER_LINE = re.compile(r"listener (\S+) on 127\.0\.0\.1:(\d+)")

MAILRELAY_CONFIG = """\
# written by bench/splice.py
drain_timeout = 1

[[listener]]
name = "bulk"
listen = "tcp:0:interface=127.0.0.1"
mode = "splice"
[listener.router]
type = "static"
host = "127.0.0.1"
port = {bulk}

[[listener]]
name = "smtp"
listen = "tcp:0:interface=127.0.0.1"
mode = "splice"
[listener.router]
type = "static"
host = "127.0.0.1"
port = {line}
"""

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


def start_mailrelay(
    children: Children, workdir: Path, name: str, upstream: tuple[int, int], nagle: bool
) -> Target:
    config = workdir / f"{name}.toml"
    config.write_text(MAILRELAY_CONFIG.format(bulk=upstream[0], line=upstream[1]))
    log = workdir / f"{name}.log"
    twistd_args = ["-n", "--pidfile=", f"--logfile={log}", "mailrelay", "--config", str(config)]
    if nagle:
        argv = [sys.executable, "-c", NAGLE_WRAPPER, *twistd_args]
    else:
        twistd = Path(sys.executable).parent / "twistd"
        argv = [str(twistd) if twistd.exists() else (shutil.which("twistd") or "twistd"), *twistd_args]
    out = open(workdir / f"{name}.out", "wb")
    proc = children.popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    out.close()
    ports: dict[str, int] = {}
    deadline = time.monotonic() + 30
    while len(ports) < 2:
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = (workdir / f"{name}.out").read_text(errors="replace")[-2000:]
            if log.exists():
                tail += log.read_text(errors="replace")[-2000:]
            raise RuntimeError(
                f"{name} did not start listening (exit status {proc.poll()}); is mailrelay installed "
                f"in this venv (`.venv/bin/pip install .`)?\n{tail}"
            )
        if log.exists():
            for m in LISTENER_LINE.finditer(log.read_text(errors="replace")):
                ports[m.group(1)] = int(m.group(2))
        time.sleep(0.05)
    shown = "twistd" if not nagle else f"{sys.executable} -c '<set_nodelay replaced by a no-op; twistd>'"
    target = Target(name, ports["bulk"], ports["smtp"], proc.pid, " ".join([shown, *twistd_args]))
    target.log_files = [log]
    target.proc = proc
    wait_until_serving(target, proc, 10, name)
    return target


HAPROXY_CONFIG = """\
global
    maxconn 4096
    nbthread 1
defaults
    mode tcp
    timeout connect 10s
    timeout client 1h
    timeout server 1h
listen bulk
    bind 127.0.0.1:{p_bulk}
    server upstream 127.0.0.1:{u_bulk}
listen smtp
    bind 127.0.0.1:{p_line}
    server upstream 127.0.0.1:{u_line}
"""


def start_haproxy(children: Children, workdir: Path, binary: str, upstream: tuple[int, int]) -> Target:
    p_bulk, p_line = free_port(), free_port()
    config = workdir / "haproxy.cfg"
    config.write_text(HAPROXY_CONFIG.format(p_bulk=p_bulk, p_line=p_line, u_bulk=upstream[0], u_line=upstream[1]))
    argv = [binary, "-db", "-f", str(config)]
    return _launch_proxy(children, workdir, "haproxy", argv, (p_bulk, p_line), "-db (mode tcp, nbthread 1)", [])


def _launch_proxy(
    children: Children, workdir: Path, name: str, argv: list[str], ports: tuple[int, int], how: str, logs: list[str]
) -> Target:
    """Start a third-party proxy and wait until it serves; its output and `logs` explain a failure."""
    with open(workdir / f"{name}.out", "wb") as out:
        proc = children.popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    target = Target(name, ports[0], ports[1], proc.pid, f"{argv[0]} {how}")
    target.proc = proc
    try:
        wait_until_serving(target, proc, 10, name)
    except RuntimeError as e:
        text = "".join(
            (workdir / log).read_text(errors="replace")[-1500:] for log in [f"{name}.out", *logs] if (workdir / log).exists()
        )
        raise RuntimeError(f"{e}\n{text}") from None
    return target


NGINX_CONFIG = """\
daemon off;
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log;
{user}
{load_module}
events {{ worker_connections 8192; }}
stream {{
    server {{ listen 127.0.0.1:{p_bulk}; proxy_pass 127.0.0.1:{u_bulk}; }}
    server {{ listen 127.0.0.1:{p_line}; proxy_pass 127.0.0.1:{u_line}; }}
}}
"""


def _nginx_stream_module(binary: str) -> tuple[bool, str]:
    """(usable, load_module line or why not)."""
    info = subprocess.run([binary, "-V"], capture_output=True, text=True, timeout=10)
    flags = info.stdout + info.stderr
    if "--with-stream=dynamic" in flags:
        paths = re.findall(r"--modules-path=(\S+)", flags)
        prefix = re.findall(r"--prefix=(\S+)", flags)
        relocated = Path(binary).resolve().parent.parent / "lib" / "nginx" / "modules"  # e.g. /usr/sbin -> /usr/lib
        candidates = paths + [p + "/modules" for p in prefix] + [str(relocated)] + [
            "/usr/lib/nginx/modules",
            "/usr/lib64/nginx/modules",
            "/usr/share/nginx/modules",
            "/usr/local/nginx/modules",
        ]
        for directory in candidates:
            module = Path(directory) / "ngx_stream_module.so"
            if module.exists():
                return True, f"load_module {module};"
        return False, "nginx has a dynamic stream module but ngx_stream_module.so was not found"
    if "--with-stream" in flags:
        return True, ""
    return False, "nginx was built without the stream module"


def start_nginx(children: Children, workdir: Path, binary: str, upstream: tuple[int, int]) -> Target:
    usable, load_module = _nginx_stream_module(binary)
    if not usable:
        raise RuntimeError(load_module)
    user = ""
    if os.geteuid() == 0:
        import grp

        group = next((g for g in ("nogroup", "nobody") if _has_group(grp, g)), "root")
        user = f"user nobody {group};"
    p_bulk, p_line = free_port(), free_port()
    config = workdir / "nginx.conf"
    config.write_text(
        NGINX_CONFIG.format(
            workdir=workdir, user=user, load_module=load_module,
            p_bulk=p_bulk, p_line=p_line, u_bulk=upstream[0], u_line=upstream[1],
        )
    )
    argv = [binary, "-p", f"{workdir}/", "-c", str(config), "-e", f"{workdir}/nginx-error.log"]
    how = "(stream proxy_pass, worker_processes 1)"
    return _launch_proxy(children, workdir, "nginx", argv, (p_bulk, p_line), how, ["nginx-error.log"])


def _has_group(grp: Any, name: str) -> bool:
    try:
        grp.getgrnam(name)
        return True
    except KeyError:
        return False


# --------------------------------------------------------------------------------------
# Measurements


class Window:
    """
    The measured parts of one measurement (one per round): wall time and the CPU each
    party used in them. Warm-ups and start-up waits happen before `begin()`, so they
    count for nothing.
    """

    def __init__(self, upstream_pgid: int, proxy_pgid: int | None) -> None:
        self.upstream_pgid = upstream_pgid
        self.proxy_pgid = proxy_pgid
        self.client_cpu: float | None = None  # set by measurements whose clients are other processes
        self.totals = {"wall": 0.0, "client": 0.0, "upstream": 0.0, "proxy": 0.0}

    def _proxy(self) -> float:
        return _cpu_of_group(self.proxy_pgid) if self.proxy_pgid else 0.0

    def begin(self) -> None:
        self.client_cpu = None
        self._t0 = time.perf_counter()
        self._me0 = _own_cpu()
        self._up0 = _cpu_of_group(self.upstream_pgid)
        self._px0 = self._proxy()

    def end(self) -> None:
        self.totals["wall"] += time.perf_counter() - self._t0
        self.totals["client"] += self.client_cpu if self.client_cpu is not None else _own_cpu() - self._me0
        self.totals["upstream"] += _cpu_of_group(self.upstream_pgid) - self._up0
        self.totals["proxy"] += self._proxy() - self._px0

    @property
    def cpu(self) -> dict[str, float]:
        """% of one core used by each party over all measured parts."""
        wall = self.totals["wall"] or 1.0
        return {k: 100 * v / wall for k, v in self.totals.items() if k != "wall"}


def measure_bulk(win: Window, target: Target, direction: str, size: int) -> float:
    """MB/s of one transfer of `size` bytes (after a small warm-up transfer)."""
    transfer = bulk_up if direction == "up" else bulk_down
    transfer(target.bulk_port, min(size, 16 << 20))
    win.begin()
    seconds = transfer(target.bulk_port, size)
    win.end()
    return size / seconds / MB


def measure_sessions_serial(win: Window, target: Target, pieces: int, duration: float) -> tuple[float, int]:
    commands, quit_parts = _session_script(pieces)
    for _ in range(20):
        one_session(target.line_port, commands, quit_parts)
    count = 0
    win.begin()
    start = time.perf_counter()
    end = start + duration
    now = start
    while now < end:
        one_session(target.line_port, commands, quit_parts)
        count += 1
        now = time.perf_counter()
    win.end()
    return count / (now - start), count


def _session_process(port: int, pieces: int, threads: int, start_at: float, end_at: float, conn: Any) -> None:
    """One client process of the concurrent test: `threads` clients, each one session at a time."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # the parent's handlers are not for us
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    out: list[Any] = []
    workers = [
        threading.Thread(target=_session_thread, args=(port, pieces, start_at, end_at, out), daemon=True)
        for _ in range(threads)
    ]
    for w in workers:
        w.start()
    delay = start_at - time.time()
    if delay > 0:
        time.sleep(delay)
    cpu0 = _own_cpu()
    for w in workers:
        w.join()
    conn.send((out, _own_cpu() - cpu0))
    conn.close()


def measure_sessions_concurrent(
    win: Window, children: Children, target: Target, pieces: int, duration: float, clients: int, procs: int
) -> tuple[float, int, int, str | None]:
    """(sessions/s, sessions, errors, first error)."""
    commands, quit_parts = _session_script(pieces)
    for _ in range(20):
        one_session(target.line_port, commands, quit_parts)
    ctx = multiprocessing.get_context("fork")
    procs = max(1, min(procs, clients))
    per_proc = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
    start_at = time.time() + 0.3
    end_at = start_at + duration
    pipes = []
    workers = []
    for threads in per_proc:
        parent_end, child_end = ctx.Pipe(duplex=False)
        worker = ctx.Process(
            target=_session_process, args=(target.line_port, pieces, threads, start_at, end_at, child_end), daemon=True
        )
        worker.start()
        children.workers.append(worker)
        child_end.close()
        pipes.append(parent_end)
        workers.append(worker)
    delay = start_at - time.time()
    if delay > 0:
        time.sleep(delay)
    win.begin()
    results = []
    for pipe in pipes:
        if not pipe.poll(duration + IO_TIMEOUT + 10):
            raise RuntimeError("a client process did not report")
        results.append(pipe.recv())
    win.client_cpu = sum(cpu for _, cpu in results)
    win.end()
    for worker in workers:
        worker.join(5)
        children.workers.remove(worker)
    count = sum(c for out, _ in results for c, _, _, _ in out)
    errors = sum(e for out, _ in results for _, e, _, _ in out)
    first_error = next((f for out, _ in results for _, _, _, f in out if f), None)
    last = max(end for out, _ in results for _, _, end, _ in out)
    return count / (last - start_at), count, errors, first_error


def measure_latency(win: Window, target: Target, pieces: int, exchanges: int, max_seconds: float) -> list[int]:
    """Nanoseconds of each NOOP -> 250 exchange inside one open session."""
    parts = _pieces(NOOP, pieces)
    samples: list[int] = []
    with _connect(target.line_port) as sock:
        _read_line(sock)
        for _ in range(min(50, exchanges)):
            _command(sock, parts, b"250")
        win.begin()
        deadline = time.perf_counter() + max_seconds
        for _ in range(exchanges):
            t0 = time.perf_counter_ns()
            _command(sock, parts, b"250")
            samples.append(time.perf_counter_ns() - t0)
            if time.perf_counter() > deadline:
                break
        win.end()
        _command(sock, _pieces(QUIT, 1), b"221")
    return samples


def percentile(sorted_samples: list[int], q: float) -> float:
    return float(sorted_samples[min(len(sorted_samples) - 1, int(round(q * (len(sorted_samples) - 1))))])


# --------------------------------------------------------------------------------------
# Report


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def print_table(rows: list[tuple[str, str]], targets: list[str], values: dict[tuple[str, str], Any]) -> None:
    head = ["measurement", "direct"]
    for name in targets[1:]:
        head += [name, "ratio"]
    table = [head]
    for key, label in rows:
        direct = values.get((key, "direct"))
        line = [label, _fmt(direct) if isinstance(direct, float) else str(direct or "-")]
        for name in targets[1:]:
            v = values.get((key, name))
            if isinstance(v, float):
                line.append(_fmt(v))
                line.append(f"{v / direct:.2f}" if isinstance(direct, float) and direct else "-")
            else:
                line += [str(v or "-"), "-"]
        table.append(line)
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    for i, r in enumerate(table):
        print("  ".join(c.ljust(widths[0]) if j == 0 else c.rjust(widths[j]) for j, c in enumerate(r)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def mailrelay_log_summary(target: Target) -> str:
    outcomes: dict[str, int] = {}
    problems = 0
    for log in target.log_files:
        for path in sorted(log.parent.glob(log.name + "*")):
            for line in path.read_text(errors="replace").splitlines():
                m = re.search(r" outcome=(\S+)", line)
                if m and " session " in line:
                    outcomes[m.group(1)] = outcomes.get(m.group(1), 0) + 1
                elif "Traceback" in line or "Unhandled" in line or "internal error" in line:
                    problems += 1
    text = ", ".join(f"{k}={v}" for k, v in sorted(outcomes.items())) or "no session lines"
    return f"{target.name} log: sessions {text}; tracebacks/internal errors: {problems}"


# --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark mailrelay's splice mode against a direct connection (and haproxy/nginx if on PATH).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--bulk-mib", type=int, default=256, help="MiB per bulk transfer, each direction")
    parser.add_argument("--repeat", type=int, default=3, help="bulk transfers per direction and target (median reported)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="passes over all targets for the sessions and latency tests (sessions/s: median of the rounds; latency: samples pooled)")
    parser.add_argument("--duration", type=float, default=1.0, help="seconds per round of a sessions/s test; also the cap per round of a latency test")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients in the concurrent sessions/s test")
    parser.add_argument("--client-procs", type=int, default=2, help="client processes the concurrent clients are spread over (threads in each)")
    parser.add_argument("--pieces", type=int, default=2, help="writes per command line in the sessions/s tests and the split latency test")
    parser.add_argument("--exchanges", type=int, default=6000, help="request/response exchanges per latency test and target, split over the rounds (each round capped by --duration)")
    parser.add_argument("--upstream-procs", type=int, default=2, help="processes of the line upstream (SO_REUSEPORT)")
    parser.add_argument("--no-nagle-compare", dest="nagle_compare", action="store_false",
                        help="skip the extra 'mailrelay, Nagle on' column (mailrelay with TCP_NODELAY patched out in memory)")
    parser.add_argument("--no-others", dest="others", action="store_false", help="do not run haproxy/nginx even if on PATH")
    parser.add_argument("--only", default="bulk,sessions,latency", help="comma-separated subset of: bulk, sessions, latency")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (configs, logs) and print its path")
    parser.add_argument("--serve-upstream", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.only = {part.strip() for part in args.only.split(",") if part.strip()}
    unknown = args.only - {"bulk", "sessions", "latency"}
    if unknown:
        parser.error(f"--only: unknown {', '.join(sorted(unknown))}")
    return args


def _raise_on_signal(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_upstream:
        serve_upstream(args.upstream_procs)
        return 0
    signal.signal(signal.SIGTERM, _raise_on_signal)
    signal.signal(signal.SIGHUP, _raise_on_signal)
    children = Children()
    workdir = Path(tempfile.mkdtemp(prefix="mailrelay-bench-"))
    failures: list[str] = []
    try:
        return run(args, children, workdir, failures)
    except RuntimeError as e:  # a server that would not start: say why, without a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: stopping every process the bench started", file=sys.stderr)
        return 130
    finally:
        children.stop_all()
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def run(args: argparse.Namespace, children: Children, workdir: Path, failures: list[str]) -> int:
    started = time.monotonic()
    # The upstream: its own process (group), told to stop when our end of its stdin closes.
    upstream_proc = children.popen(
        [sys.executable, os.path.abspath(__file__), "--serve-upstream", "--upstream-procs", str(args.upstream_procs)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert upstream_proc.stdout is not None
    ready, _, _ = select.select([upstream_proc.stdout], [], [], 20)
    line = upstream_proc.stdout.readline().decode() if ready else ""
    if not line.startswith("ports "):
        raise RuntimeError(f"the upstream process did not start (said {line!r})")
    upstream = (int(line.split()[1]), int(line.split()[2]))
    direct = Target("direct", upstream[0], upstream[1], None)
    wait_until_serving(direct, upstream_proc, 10, "the upstream")

    targets = [direct, start_mailrelay(children, workdir, "mailrelay", upstream, nagle=False)]
    if args.nagle_compare:
        targets.append(start_mailrelay(children, workdir, "mailrelay-nagle", upstream, nagle=True))
    skipped = []
    for name, starter in (("haproxy", start_haproxy), ("nginx", start_nginx)):
        binary = shutil.which(name)
        if not args.others:
            skipped.append(f"{name} (--no-others)")
        elif binary is None:
            skipped.append(f"{name} (not on PATH)")
        else:
            try:
                targets.append(starter(children, workdir, binary, upstream))
            except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                skipped.append(f"{name} (failed to start: {str(e).splitlines()[0]})")
                print(f"{name} failed to start:\n{e}", file=sys.stderr)

    names = [t.name for t in targets]
    print(f"mailrelay splice benchmark  {time.strftime('%Y-%m-%d %H:%M')}  {platform.node()}")
    print(
        f"machine: {os.cpu_count()} cores, Linux {platform.release()}, Python {platform.python_version()}, "
        f"Twisted {_twisted_version()}"
    )
    load = os.getloadavg()
    print(f"load average before the run: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (anything else running skews the numbers)")
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
    print(f"upstream: bulk sink/source (threads), SMTP-like line server (asyncio x {args.upstream_procs} processes, SO_REUSEPORT)")
    print(flush=True)

    values: dict[tuple[str, str], Any] = {}
    windows: dict[tuple[str, str], Window] = {}
    rows: list[tuple[str, str]] = []
    size = args.bulk_mib << 20

    def progress(text: str) -> None:
        print(f"  [{time.monotonic() - started:5.1f}s] {text}", file=sys.stderr, flush=True)

    def rounds(key: str, label: str, count: int, body: Callable[[Window, Target], Any]) -> dict[str, list[Any]]:
        """
        `count` passes over every target, so that a drift of the machine's speed (it is a
        shared 2-core VM) affects every column alike. A target that fails once is out of
        this measurement.
        """
        results: dict[str, list[Any]] = {t.name: [] for t in targets}
        for n in range(count):
            for t in targets:
                if (key, t.name) in values:  # failed earlier
                    continue
                progress(f"{label} via {t.name} ({n + 1}/{count})")
                win = windows.setdefault((key, t.name), Window(upstream_proc.pid, t.pgid))
                try:
                    results[t.name].append(body(win, t))
                except (OSError, RuntimeError, ValueError) as e:
                    failures.append(f"{label} via {t.name}: {e!r}")
                    values[(key, t.name)] = "ERR"
                    results[t.name] = []
        return results

    def store(key: str, results: dict[str, list[Any]], reduce: Callable[[list[Any]], dict[str, Any]]) -> None:
        for name, items in results.items():
            if items:
                values.update({(k, name): v for k, v in reduce(items).items()})
            else:
                for k in reduce_keys(key):
                    values.setdefault((k, name), "ERR")

    def reduce_keys(key: str) -> list[str]:
        return [key, f"{key}_med", f"{key}_p99"]

    if "bulk" in args.only:
        for direction, label in (("up", "bulk client->upstream, MB/s"), ("down", "bulk upstream->client, MB/s")):
            rows.append((direction, label))
            results = rounds(direction, f"bulk {direction}", args.repeat, lambda w, t: measure_bulk(w, t, direction, size))
            store(direction, results, lambda r, d=direction: {d: statistics.median(r)})
    if "sessions" in args.only:
        rows.append(("serial", "sessions/s, 1 client"))
        results = rounds("serial", "sessions one at a time", args.rounds,
                         lambda w, t: measure_sessions_serial(w, t, args.pieces, args.duration)[0])
        store("serial", results, lambda r: {"serial": statistics.median(r)})
        rows.append(("concurrent", f"sessions/s, {args.clients} concurrent"))
        results = rounds(
            "concurrent", f"sessions, {args.clients} concurrent", args.rounds,
            lambda w, t: measure_sessions_concurrent(w, children, t, args.pieces, args.duration, args.clients, args.client_procs),
        )
        store("concurrent", results, lambda r: {
            "concurrent": statistics.median(x[0] for x in r),
            "concurrent_errors": sum(x[2] for x in r),
            "concurrent_first_error": next((x[3] for x in r if x[3]), None),
        })
    if "latency" in args.only:
        variants = [(1, "whole line")] + ([(args.pieces, f"{args.pieces} pieces")] if args.pieces > 1 else [])
        for pieces, label in variants:
            key = f"lat{pieces}"
            rows += [(f"{key}_med", f"exchange median us, {label}"), (f"{key}_p99", f"exchange p99 us, {label}")]
            per_round = max(1, args.exchanges // args.rounds)
            results = rounds(key, f"latency ({label})", args.rounds,
                             lambda w, t: measure_latency(w, t, pieces, per_round, args.duration))

            def pooled(r: list[list[int]], k: str = key) -> dict[str, Any]:
                samples = sorted(x for part in r for x in part)
                return {f"{k}_med": percentile(samples, 0.5) / 1000, f"{k}_p99": percentile(samples, 0.99) / 1000, f"{k}_n": len(samples)}

            store(key, results, pooled)
    cpu = {key: win.cpu for key, win in windows.items() if win.totals["wall"] > 0}
    for t in targets:
        if t.proc is not None and t.proc.poll() is not None:
            failures.append(f"{t.name} exited during the run with status {t.proc.returncode}")

    print()
    print_table(rows, names, values)
    print("ratio = value / direct: for MB/s and sessions/s higher is better, for latency (us) lower is better.")
    if "latency" in args.only:
        counts = ", ".join(
            f"{t.name} {values[(f'lat{p}_n', t.name)]}"
            for p in ([1] + ([args.pieces] if args.pieces > 1 else []))
            for t in targets
            if isinstance(values.get((f"lat{p}_n", t.name)), int)
        )
        print(f"latency samples: {counts}")
    errors = [
        f"{t.name}: {values[('concurrent_errors', t.name)]} failed sessions ({values.get(('concurrent_first_error', t.name))})"
        for t in targets
        if values.get(("concurrent_errors", t.name))
    ]
    if errors:
        print("session errors in the concurrent test: " + "; ".join(errors))

    print()
    print("CPU use during each measurement, % of one core: client / upstream / proxy")
    cpu_rows = [(key, label) for key, label in rows if not key.endswith("_p99")]
    table = [["measurement", *names]]
    for key, label in cpu_rows:
        base = key[: -len("_med")] if key.endswith("_med") else key
        line = [label.replace(" median", "")]
        for name in names:
            c = cpu.get((base, name))
            line.append("-" if c is None else f"{c['client']:.0f} / {c['upstream']:.0f} / {c['proxy']:.0f}")
        table.append(line)
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for i, r in enumerate(table):
        print("  ".join(c.ljust(widths[0]) if j == 0 else c.rjust(widths[j]) for j, c in enumerate(r)))
        if i == 0:
            print("  ".join("-" * w for w in widths))

    print()
    for t in targets:
        if t.log_files:
            print(mailrelay_log_summary(t))
    for t in targets[1:]:
        print(f"{t.name}: {t.note}")
    if failures:
        print("\nFAILED measurements:")
        for f in failures:
            print(f"  {f}")
    print(f"\ntotal time {time.monotonic() - started:.1f}s")
    return 1 if failures else 0


def _twisted_version() -> str:
    try:
        from importlib.metadata import version

        return version("twisted")
    except Exception:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
