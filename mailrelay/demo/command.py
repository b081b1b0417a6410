"""`mailrelay demo`: its arguments and its run (the demo without twistd)."""

from __future__ import annotations

import argparse

from .setup import DEFAULT_PORT_OFFSET, LISTENERS

__all__ = ["add_arguments", "port_offset", "run"]


def port_offset(text: str) -> int:
    """A port offset that puts every demo listener on a port from 1 to 65535."""
    try:
        offset = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    lowest = min(listener.standard_port for listener in LISTENERS)
    highest = max(listener.standard_port for listener in LISTENERS)
    if offset < 0 or offset + highest > 65535:
        raise argparse.ArgumentTypeError(
            f"{offset} puts listeners outside 1-65535: choose from 0 to {65535 - highest}"
            f" (ports {lowest}-{highest} plus the offset; below 1024 they need root)"
        )
    return offset


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--port-offset",
        type=port_offset,
        default=DEFAULT_PORT_OFFSET,
        metavar="N",
        help=f"listen on N + each protocol's standard port (default {DEFAULT_PORT_OFFSET}: 10587, 10993, ...)",
    )


def run(args: argparse.Namespace) -> int:
    """Run the demo until Ctrl-C or SIGTERM; the log goes to standard output."""
    import sys

    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from .service import DemoService

    # The instructions are printed, not logged: standard output stays the terminal's.
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)], redirectStandardIO=False)
    demo = DemoService(args.port_offset, reactor, out=sys.stdout)
    try:
        demo.privilegedStartService()
    except Exception as e:
        print(f"mailrelay demo: cannot start: {e}", file=sys.stderr)
        return 1
    demo.startService()
    # The reactor stops on SIGINT and SIGTERM; the demo stops (and cleans up) before it does.
    reactor.addSystemEventTrigger("before", "shutdown", demo.stopService)
    reactor.run()
    print("mailrelay demo: stopped.")
    return 0
