"""`mailrelay from-nginx FILE`: its arguments and its run."""

from __future__ import annotations

import argparse
import os
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="nginx configuration file (its include files are read too)")
    parser.add_argument("-o", "--output", metavar="OUT", help="write the mailrelay TOML here instead of stdout")
    parser.add_argument(
        "-p",
        "--prefix",
        metavar="DIR",
        help="nginx's configuration prefix, which relative include paths start from (default: the file's folder)",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="also report what every directive became, not only the warnings"
    )


def run(args: argparse.Namespace) -> int:
    """Translate; warnings (and with -v every note) on stderr as `file:line: directive:
    what happens to it`. 0 when a configuration was written, 1 otherwise."""
    from ..version import version
    from .parser import NginxSyntaxError, parse_file
    from .translate import render, translate

    try:
        directives = parse_file(args.config, args.prefix)
    except NginxSyntaxError as e:
        print(f"mailrelay from-nginx: {e}", file=sys.stderr)
        return 1
    translation = translate(directives)
    if not translation.found_blocks:
        print(f"mailrelay from-nginx: {args.config}: no mail {{}} or stream {{}} block: nothing to translate", file=sys.stderr)
        return 1
    for note in translation.sorted_notes():
        if note.kind == "warning" or args.verbose:
            shown = (
                note.line()
                if note.kind == "warning"
                else f"{note.directive.where}: {note.directive.name}: ({note.kind}) {note.message}"
            )
            print(shown, file=sys.stderr)
    if not translation.listeners:
        print(
            f"mailrelay from-nginx: {args.config}: no server could be translated (see the warnings above)",
            file=sys.stderr,
        )
        return 1
    text = render(translation, os.path.basename(args.config), version())
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"mailrelay from-nginx: wrote {args.output}; check it with `mailrelay check {args.output}`", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0
