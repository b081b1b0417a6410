"""`mailrelay from-nginx FILE`: its arguments and its run."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="nginx configuration file (its include files are read too)")


def run(args: argparse.Namespace) -> int:
    raise SystemExit("mailrelay from-nginx: not built yet")
