#!/usr/bin/env python3
"""
Soak run: many sessions through one running mailrelay (splice, tls and pop3s listeners),
every payload hash-checked end to end, mailrelay's RSS and open descriptors compared
idle after the warm-up and idle at the end. The same run as tests/test_soak.py (its code
is tests/support/soak.py), as one command that can run longer:

    .venv/bin/python bench/soak.py                      # 30,000 sessions, about 80 s
    .venv/bin/python bench/soak.py --sessions 100000    # longer
    .venv/bin/python bench/soak.py --seed 1234          # a run again, session for session

Exit status 0 when every check passed, 1 when one failed (each is printed), 2 when
something would not start. See bench/README.md ("Soak run").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.cli import run_bench
from common.processes import Children
from common.report import print_machine

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support import soak as soak_support  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = soak_support.SoakOptions(seed=0)
    parser = argparse.ArgumentParser(
        description="Soak mailrelay: sessions with random payloads through splice, tls and pop3s listeners, checked for "
        "integrity and for leaks (RSS, descriptors).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--sessions", type=int, default=defaults.sessions, help="sessions in all, warm-up included")
    parser.add_argument("--warmup", type=int, default=defaults.warmup, help="sessions before the baseline measurement")
    parser.add_argument("--concurrency", type=int, default=defaults.concurrency, help="sessions in flight at once")
    parser.add_argument("--max-size", type=int, default=defaults.max_size, help="largest payload, bytes")
    parser.add_argument("--seed", type=int, default=None, help="seed of the sessions' parameters (default: random, printed)")
    parser.add_argument("--samples", type=int, default=defaults.samples, help="points of the memory curve")
    parser.add_argument(
        "--listeners",
        default=",".join(defaults.listeners),
        help="comma-separated listeners the sessions go to (to narrow a leak down)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (configs, logs) and print its path")
    args = parser.parse_args(argv)
    args.listeners = tuple(name.strip() for name in args.listeners.split(",") if name.strip())
    if not args.listeners or set(args.listeners) - set(soak_support.LISTENERS):
        parser.error(f"--listeners: some of {', '.join(soak_support.LISTENERS)}")
    if args.sessions < 1 or args.warmup < 0 or args.concurrency < 1 or args.max_size < 0:
        parser.error("--sessions and --concurrency must be positive, --warmup and --max-size not negative")
    return args


def run(args: argparse.Namespace, children: Children, workdir: Path, failures: list[str]) -> int:
    values = dict(
        sessions=args.sessions,
        warmup=args.warmup,
        concurrency=args.concurrency,
        max_size=args.max_size,
        samples=args.samples,
        listeners=args.listeners,
    )
    if args.seed is not None:
        values["seed"] = args.seed
    options = soak_support.SoakOptions(**values)
    print_machine("mailrelay soak run")
    print(f"sessions: {options.sessions:,}, {soak_support.concurrency_text(options)}, seed {options.seed}", flush=True)
    result = soak_support.run_soak(options, children, workdir)
    print("\n".join(result.report()))
    problems = result.problems()
    print("\n".join(f"FAILED: {problem}" for problem in problems) or "all checks passed")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    return run_bench(parse_args(argv), run)


if __name__ == "__main__":
    sys.exit(main())
