"""The options every benchmark ends with, and the hygiene around a benchmark's run."""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common.processes import Children


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None, only: tuple[str, ...]) -> argparse.Namespace:
    """Add the options every benchmark ends with (--no-others, --only, --keep) and parse `argv`."""
    parser.add_argument("--no-others", dest="others", action="store_false", help="do not run haproxy/nginx even if on PATH")
    parser.add_argument("--only", default=",".join(only), help=f"comma-separated subset of: {', '.join(only)}")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (configs, logs) and print its path")
    args = parser.parse_args(argv)
    args.only = {part.strip() for part in args.only.split(",") if part.strip()}
    unknown = args.only - set(only)
    if unknown:
        parser.error(f"--only: unknown {', '.join(sorted(unknown))}")
    return args


def add_sessions_arguments(parser: argparse.ArgumentParser, duration: float = 1.0, latency: bool = False) -> None:
    """
    --rounds, --duration, --clients and --client-procs, which `Measurements.sessions`
    reads; with `latency`, worded for a latency test that reads the first two as well.
    """
    tests, pooled = ("the sessions and latency tests", "; latency: samples pooled") if latency else ("each sessions test", "")
    parser.add_argument(
        "--rounds", type=int, default=3, help=f"passes over all targets for {tests} (sessions/s: median of the rounds{pooled})"
    )
    cap = "; also the cap per round of a latency test" if latency else ""
    parser.add_argument("--duration", type=float, default=duration, help=f"seconds per round of a sessions test{cap}")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients in the concurrent sessions test")
    parser.add_argument(
        "--client-procs", type=int, default=2, help="client processes the concurrent clients are spread over (threads in each)"
    )


def add_latency_arguments(parser: argparse.ArgumentParser) -> None:
    """--exchanges, which `Measurements.latency` reads (with --rounds and --duration)."""
    parser.add_argument(
        "--exchanges",
        type=int,
        default=6000,
        help="request/response exchanges per latency test and target, split over the rounds (each round capped by --duration)",
    )


def add_bulk_arguments(parser: argparse.ArgumentParser) -> None:
    """--bulk-mib and --repeat, which `Measurements.bulk` reads."""
    parser.add_argument("--bulk-mib", type=int, default=256, help="MiB per bulk transfer, each direction")
    parser.add_argument("--repeat", type=int, default=3, help="bulk transfers per direction and target (median reported)")


def _raise_on_signal(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_bench(args: argparse.Namespace, run: Callable[[argparse.Namespace, Children, Path, list[str]], int]) -> int:
    """
    `run(args, children, workdir, failures)` with the hygiene around it: SIGTERM and SIGHUP
    stop the bench like Ctrl-C, and every process it started is ended however it ends.
    """
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
