"""
Measuring: rounds of a measurement over every target, what each party's CPU did in the
measured parts (`Window`), and the bulk, serial and concurrent sessions measurements
the benchmarks share.
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from common.clients import bulk_down, bulk_span, bulk_up, command, pieces_of, read_line, session_script
from common.processes import Children, cpu_of_group, die_with_parent, machine_busy, own_cpu
from common.report import print_cpu_table, print_grid, print_table
from common.targets import Target
from common.wire import CHUNK, IO_TIMEOUT, MB, NOOP, QUIT


class Window:
    """
    The measured parts of one measurement (one per round): wall time and the CPU each
    party used in them. Warm-ups and start-up waits happen before `begin()`, so they
    count for nothing.
    """

    def __init__(self, upstream_pgid: int, proxy_pgid: int | None, upstream_reaped: bool = False) -> None:
        self.upstream_pgid = upstream_pgid
        self.proxy_pgid = proxy_pgid
        self.upstream_reaped = upstream_reaped  # count the upstream's exited children (see cpu_of_group)
        self.client_cpu: float | None = None  # set by measurements whose clients are other processes
        self.totals = {"wall": 0.0, "client": 0.0, "upstream": 0.0, "proxy": 0.0, "machine": 0.0}

    def _proxy(self) -> float:
        return cpu_of_group(self.proxy_pgid) if self.proxy_pgid else 0.0

    def begin(self) -> None:
        self.client_cpu = None
        self._t0 = time.perf_counter()
        self._me0 = own_cpu()
        self._up0 = cpu_of_group(self.upstream_pgid, self.upstream_reaped)
        self._px0 = self._proxy()
        self._all0 = machine_busy()

    def end(self) -> None:
        self.totals["wall"] += time.perf_counter() - self._t0
        self.totals["client"] += self.client_cpu if self.client_cpu is not None else own_cpu() - self._me0
        self.totals["upstream"] += cpu_of_group(self.upstream_pgid, self.upstream_reaped) - self._up0
        self.totals["proxy"] += self._proxy() - self._px0
        self.totals["machine"] += machine_busy() - self._all0

    @property
    def cpu(self) -> dict[str, float]:
        """% of one core used by each party over all measured parts."""
        wall = self.totals["wall"] or 1.0
        return {k: 100 * v / wall for k, v in self.totals.items() if k != "wall"}


class Measurements:
    """
    The values of one run, keyed by (measurement key, target name), with a Window per
    pair; `rounds()` runs a measurement over the targets, `store()` keeps its result.
    """

    def __init__(
        self, targets: list[Target], upstream_pgid: int, started: float, failures: list[str], upstream_reaped: bool = False
    ) -> None:
        self.targets = targets
        self.upstream_pgid = upstream_pgid
        self.upstream_reaped = upstream_reaped
        self.started = started
        self.failures = failures
        self.values: dict[tuple[str, str], Any] = {}
        self.windows: dict[tuple[str, str], Window] = {}
        self.rows: list[tuple[str, str]] = []

    def progress(self, text: str) -> None:
        print(f"  [{time.monotonic() - self.started:5.1f}s] {text}", file=sys.stderr, flush=True)

    def rounds(
        self,
        key: str,
        label: str,
        count: int,
        body: Callable[[Window, Target], Any],
        only: Callable[[Target], bool] | None = None,
    ) -> dict[str, list[Any]]:
        """
        `count` passes over every target (those `only` accepts), so that a drift of the
        machine's speed (it is a shared 2-core VM) affects every column alike. A target
        that fails once is out of this measurement.
        """
        targets = [t for t in self.targets if only is None or only(t)]
        results: dict[str, list[Any]] = {t.name: [] for t in targets}
        for n in range(count):
            for t in targets:
                if (key, t.name) in self.values:  # failed earlier
                    continue
                self.progress(f"{label} via {t.name} ({n + 1}/{count})")
                win = self.windows.setdefault((key, t.name), Window(self.upstream_pgid, t.pgid, self.upstream_reaped))
                try:
                    results[t.name].append(body(win, t))
                except (OSError, RuntimeError, ValueError) as e:
                    self.failures.append(f"{label} via {t.name}: {e!r}")
                    self.values[(key, t.name)] = "ERR"
                    results[t.name] = []
        return results

    def store(self, key: str, results: dict[str, list[Any]], reduce: Callable[[list[Any]], dict[str, Any]]) -> None:
        for name, items in results.items():
            if items:
                self.values.update({(k, name): v for k, v in reduce(items).items()})
            else:
                for k in (key, f"{key}_med", f"{key}_p99"):
                    self.values.setdefault((k, name), "ERR")

    def cpu(self) -> dict[tuple[str, str], dict[str, float]]:
        return {key: win.cpu for key, win in self.windows.items() if win.totals["wall"] > 0}

    def check_alive(self) -> None:
        for t in self.targets:
            if t.proc is not None and t.proc.poll() is not None:
                self.failures.append(f"{t.name} exited during the run with status {t.proc.returncode}")

    def print_results(self, lower_is_better: str) -> None:
        """The table of the measurements (a row each: per target its value and the ratio to direct)."""
        self.check_alive()
        print()
        print_table(self.rows, [t.name for t in self.targets], self.values)
        print(f"ratio = value / direct: for MB/s and sessions/s higher is better, for {lower_is_better} lower is better.")

    def print_cpu(self, machine: bool = False) -> None:
        print()
        print_cpu_table(self.rows, [t.name for t in self.targets], self.cpu(), machine)

    def bulk(self, args: argparse.Namespace) -> None:
        """MB/s each way: median of `args.repeat` transfers of `args.bulk_mib` MiB, for the targets with a bulk port."""
        size = args.bulk_mib << 20
        for direction, label in (("up", "bulk client->upstream, MB/s"), ("down", "bulk upstream->client, MB/s")):
            self.rows.append((direction, label))
            results = self.rounds(
                direction,
                f"bulk {direction}",
                args.repeat,
                lambda w, t: measure_bulk(w, t, direction, size),
                only=lambda t: t.bulk_port > 0,
            )
            self.store(direction, results, functools.partial(_median_of, direction))

    def bulk_streams(self, args: argparse.Namespace, children: Children) -> None:
        """
        MB/s each way with `args.streams` connections at once (`measure_bulk_streams`), each
        moving `args.bulk_mib` / streams MiB (at least `MIN_STREAM_MIB`), their clients
        threads in `args.client_procs` processes: median of `args.repeat`.
        """
        size = max(MIN_STREAM_MIB << 20, (args.bulk_mib << 20) // args.streams)
        procs = max(1, min(args.client_procs, args.streams))
        for direction in ("up", "down"):
            key = f"{direction}_streams"
            way = "client->upstream" if direction == "up" else "upstream->client"
            self.rows.append((key, f"bulk {way}, {args.streams} streams, MB/s"))
            results = self.rounds(
                key,
                f"bulk {direction}, {args.streams} streams",
                args.repeat,
                lambda w, t: measure_bulk_streams(w, children, t, direction, size, args.streams, procs),
                only=lambda t: t.bulk_port > 0,
            )
            self.store(key, results, functools.partial(_median_of, key))

    def sessions(self, args: argparse.Namespace, children: Children, what: str = "sessions", times: bool = False) -> None:
        """
        Sessions/s with one client, then with `args.clients` concurrent ones (median of the
        rounds); with `times`, also the p50 and p99 of every session's duration (ms), pooled.
        """
        concurrent = f"{args.clients} concurrent"
        variants: tuple[tuple[str, str, str, Callable[[Window, Target], SessionsResult]], ...] = (
            (
                "serial",
                "1 client",
                f"{what} one at a time",
                lambda w, t: measure_sessions_serial(w, t, args.pieces, args.duration),
            ),
            (
                "concurrent",
                concurrent,
                f"{what}, {concurrent}",
                lambda w, t: measure_sessions_concurrent(
                    w, children, t, args.pieces, args.duration, args.clients, args.client_procs
                ),
            ),
        )
        for key, label, progress, measure in variants:
            self.rows.append((key, f"sessions/s, {label}"))
            if times:
                self.rows += [(f"{key}_med", f"session p50 ms, {label}"), (f"{key}_p99", f"session p99 ms, {label}")]
            results = self.rounds(key, progress, args.rounds, measure)
            self.store(key, results, functools.partial(_sessions_values, key, times=times))

    def latency(self, args: argparse.Namespace, pieces: int, label: str, only: Callable[[Target], bool] | None = None) -> None:
        """
        Rows `lat{pieces}_med` and `_p99` (us): NOOP -> 250 exchanges inside one open session
        (`measure_latency`), `args.exchanges` over `args.rounds` rounds (each capped by
        `args.duration` seconds), the samples of all rounds pooled; `_n` counts them.
        """
        key = f"lat{pieces}"
        self.rows += [(f"{key}_med", f"exchange median us, {label}"), (f"{key}_p99", f"exchange p99 us, {label}")]
        per_round = max(1, args.exchanges // args.rounds)
        results = self.rounds(
            key, f"latency ({label})", args.rounds, lambda w, t: measure_latency(w, t, pieces, per_round, args.duration), only
        )
        self.store(key, results, functools.partial(_latency_values, key))

    def print_latency_counts(self, pieces: list[int]) -> None:
        """How many exchanges each target's latency rows were taken from."""
        counts = ", ".join(
            f"{t.name} {self.values[(f'lat{p}_n', t.name)]}"
            for p in pieces
            for t in self.targets
            if isinstance(self.values.get((f"lat{p}_n", t.name)), int)
        )
        print(f"latency samples: {counts}")

    def print_session_errors(self) -> None:
        errors = [
            f"{t.name}: {self.values[('concurrent_errors', t.name)]} failed sessions "
            f"({self.values.get(('concurrent_first_error', t.name))})"
            for t in self.targets
            if self.values.get(("concurrent_errors", t.name))
        ]
        if errors:
            print("session errors in the concurrent test: " + "; ".join(errors))

    def print_session_counts(self) -> None:
        """How many sessions each target's times were taken from, serial and concurrent."""
        values = self.values
        counts = "; ".join(
            f"{key}: "
            + ", ".join(f"{t.name} {values[(f'{key}_n', t.name)]}" for t in self.targets if (f"{key}_n", t.name) in values)
            for key in ("serial", "concurrent")
        )
        print(f"sessions timed: {counts}")

    def print_cpu_per_session(self, clients: int) -> None:
        """CPU seconds of each party over the measured parts of the sessions tests (`clients`
        concurrent), divided by the sessions in them (in ms)."""
        print("CPU per session, ms: client / upstream / proxy")
        names = [t.name for t in self.targets]
        table = [["sessions", *names]]
        for key, label in (("serial", "1 client"), ("concurrent", f"{clients} concurrent")):
            line = [label]
            for name in names:
                win, count = self.windows.get((key, name)), self.values.get((f"{key}_n", name))
                if win is None or not isinstance(count, int) or not count:
                    line.append("-")
                    continue
                line.append(" / ".join(f"{1000 * win.totals[party] / count:.2f}" for party in ("client", "upstream", "proxy")))
            table.append(line)
        print_grid(table)

    def finish(self) -> int:
        """The end of the report (`finish`); the exit status."""
        return finish(self.started, self.failures)


def finish(started: float, failures: list[str]) -> int:
    """The end of a report: what failed (each once), the time it all took; the exit status."""
    if failures:
        print("\nFAILED measurements:")
        for f in dict.fromkeys(failures):
            print(f"  {f}")
    print(f"\ntotal time {time.monotonic() - started:.1f}s")
    return 1 if failures else 0


def _median_of(key: str, results: list[float]) -> dict[str, float]:
    return {key: statistics.median(results)}


def _latency_values(key: str, results: list[list[int]]) -> dict[str, Any]:
    samples = sorted(x for part in results for x in part)
    return {
        f"{key}_med": percentile(samples, 0.5) / 1000,
        f"{key}_p99": percentile(samples, 0.99) / 1000,
        f"{key}_n": len(samples),
    }


def measure_latency(win: Window, target: Target, pieces: int, exchanges: int, max_seconds: float) -> list[int]:
    """
    Nanoseconds of each NOOP -> 250 exchange inside one open session of `target` (dialled
    as its sessions are: plain or TLS), each command written in `pieces` writes: at most
    `exchanges` of them, for at most `max_seconds`, after 50 that are not timed.
    """
    parts = pieces_of(NOOP, pieces)
    samples: list[int] = []
    with target.dial(target.line_port) as sock:
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
        if target.until_closed and sock.recv(4096):
            raise ConnectionError("data after 221")
    return samples


class SessionsResult(NamedTuple):
    rate: float
    """Sessions per second."""
    sessions: int
    errors: int
    first_error: str | None
    samples: list[int]
    """Nanoseconds of each session."""


def _sessions_values(key: str, results: list[SessionsResult], times: bool) -> dict[str, Any]:
    values = {
        key: statistics.median(r.rate for r in results),
        f"{key}_errors": sum(r.errors for r in results),
        f"{key}_first_error": next((r.first_error for r in results if r.first_error), None),
    }
    if times:
        ordered = sorted(s for r in results for s in r.samples)
        values[f"{key}_med"] = percentile(ordered, 0.5) / 1e6
        values[f"{key}_p99"] = percentile(ordered, 0.99) / 1e6
        values[f"{key}_n"] = len(ordered)
    return values


def measure_bulk(win: Window, target: Target, direction: str, size: int) -> float:
    """MB/s of one transfer of `size` bytes (after a small warm-up transfer)."""
    transfer = bulk_up if direction == "up" else bulk_down
    transfer(target.bulk_port, min(size, 16 << 20), target.dial)
    win.begin()
    seconds = transfer(target.bulk_port, size, target.dial)
    win.end()
    return size / seconds / MB


MIN_STREAM_MIB = 4
"""The least each stream of the many-streams bulk test moves, so that it is not all connection set-up."""


def _bulk_stream_thread(target: Target, direction: str, size: int, start_at: float, out: list[Any]) -> None:
    """One stream of the many-streams bulk test, from `start_at` (time.monotonic()): its span, or its error."""
    buf = memoryview(bytearray(CHUNK))  # before the start: 50 of them take a while to clear
    delay = start_at - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    try:
        out.append(bulk_span(direction, target.bulk_port, size, buf, target.dial))
    except OSError as e:  # ConnectionError included: a short count
        out.append(repr(e))


def measure_bulk_streams(
    win: Window, children: Children, target: Target, direction: str, size: int, streams: int, procs: int
) -> float:
    """
    MB/s of `streams` transfers of `size` bytes each at once (after one warm-up transfer),
    threads in `procs` forked processes: all their bytes over the time from the first
    connect to the last acknowledgement (last byte received). Any stream that fails, or
    moves a wrong count of bytes, fails the measurement.
    """
    (bulk_up if direction == "up" else bulk_down)(target.bulk_port, min(size, 16 << 20), target.dial)
    start_at = time.monotonic() + 0.3  # every thread is up and waiting by then
    spans = _in_client_processes(
        win,
        children,
        _bulk_stream_thread,
        (target, direction, size, start_at),
        streams,
        procs,
        start_at,
        time.monotonic,
        IO_TIMEOUT + streams * size / (10 * MB),  # a hang guard: 10 MB/s would be very slow
    )
    errors = [item for item in spans if isinstance(item, str)]
    if errors:
        raise ConnectionError(f"{len(errors)} of {streams} streams failed, first: {errors[0]}")
    if len(spans) != streams:
        raise RuntimeError(f"{len(spans)} of {streams} streams reported")
    first = min(start for start, _ in spans)
    last = max(end for _, end in spans)
    return streams * size / (last - first) / MB


def measure_sessions_serial(win: Window, target: Target, pieces: int, duration: float) -> SessionsResult:
    """One client, one session after the other, for `duration` seconds."""
    commands, quit_parts = session_script(pieces)
    for _ in range(20):
        target.session(commands, quit_parts)
    count = 0
    samples: list[int] = []
    win.begin()
    start = time.perf_counter()
    end = start + duration
    now = start
    while now < end:
        t0 = time.perf_counter_ns()
        target.session(commands, quit_parts)
        samples.append(time.perf_counter_ns() - t0)
        count += 1
        now = time.perf_counter()
    win.end()
    return SessionsResult(count / (now - start), count, 0, None, samples)


def _session_thread(target: Target, pieces: int, start_at: float, end_at: float, out: list[Any]) -> None:
    commands, quit_parts = session_script(pieces)
    count = errors = 0
    first_error = None
    samples: list[int] = []
    delay = start_at - time.time()
    if delay > 0:
        time.sleep(delay)
    last = time.time()
    while last < end_at:
        t0 = time.perf_counter_ns()
        try:
            target.session(commands, quit_parts)
            samples.append(time.perf_counter_ns() - t0)
            count += 1
        except OSError as e:
            errors += 1
            first_error = first_error or repr(e)
        last = time.time()
    out.append((count, errors, last, first_error, samples))


def _in_client_processes(
    win: Window,
    children: Children,
    run: Callable[..., None],
    args: tuple[Any, ...],
    threads: int,
    procs: int,
    start_at: float,
    clock: Callable[[], float],
    timeout: float,
) -> list[Any]:
    """
    Run `threads` threads of `run(*args, out)` spread over `procs` forked client
    processes, all starting at `start_at` (on `clock`); the measured window holds their
    run and their CPU. What every thread appended to `out`, all together.
    """
    ctx = multiprocessing.get_context("fork")
    procs = max(1, min(procs, threads))
    per_proc = [threads // procs + (1 if i < threads % procs else 0) for i in range(procs)]
    pipes = []
    workers = []
    for count in per_proc:
        parent_end, child_end = ctx.Pipe(duplex=False)
        worker = ctx.Process(target=_client_process, args=(run, args, count, start_at, clock, child_end), daemon=True)
        worker.start()
        children.workers.append(worker)
        child_end.close()
        pipes.append(parent_end)
        workers.append(worker)
    delay = start_at - clock()
    if delay > 0:
        time.sleep(delay)
    win.begin()
    results = []
    for pipe in pipes:
        if not pipe.poll(timeout):
            raise RuntimeError("a client process did not report")
        results.append(pipe.recv())
    win.client_cpu = sum(cpu for _, cpu in results)
    win.end()
    for worker in workers:
        worker.join(5)
        children.workers.remove(worker)
    return [item for out, _ in results for item in out]


def _client_process(
    run: Callable[..., None], args: tuple[Any, ...], threads: int, start_at: float, clock: Callable[[], float], conn: Any
) -> None:
    """
    One forked client process of a concurrent test: `threads` threads, each running
    `run(*args, out)` (which appends its result to `out`), from `start_at` on `clock`;
    sends back what they appended and the process's CPU time while they ran.
    """
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # the parent's handlers are not for us
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    out: list[Any] = []
    workers = [threading.Thread(target=run, args=(*args, out), daemon=True) for _ in range(threads)]
    for w in workers:
        w.start()
    delay = start_at - clock()
    if delay > 0:
        time.sleep(delay)
    cpu0 = own_cpu()
    for w in workers:
        w.join()
    conn.send((out, own_cpu() - cpu0))
    conn.close()


def measure_sessions_concurrent(
    win: Window, children: Children, target: Target, pieces: int, duration: float, clients: int, procs: int
) -> SessionsResult:
    """`clients` clients at once, threads in `procs` forked processes, each one session after the other."""
    commands, quit_parts = session_script(pieces)
    for _ in range(20):
        target.session(commands, quit_parts)
    start_at = time.time() + 0.3
    end_at = start_at + duration
    threads_out = _in_client_processes(
        win,
        children,
        _session_thread,
        (target, pieces, start_at, end_at),
        clients,
        procs,
        start_at,
        time.time,
        duration + IO_TIMEOUT + 10,
    )
    count = sum(item[0] for item in threads_out)
    errors = sum(item[1] for item in threads_out)
    first_error = next((item[3] for item in threads_out if item[3]), None)
    last = max(item[2] for item in threads_out)
    samples = [s for item in threads_out for s in item[4]]
    return SessionsResult(count / (last - start_at), count, errors, first_error, samples)


def percentile(sorted_samples: list[int], q: float) -> float:
    return float(sorted_samples[min(len(sorted_samples) - 1, int(round(q * (len(sorted_samples) - 1))))])
