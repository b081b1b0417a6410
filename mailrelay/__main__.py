"""
`python -m mailrelay check FILE`: validate a configuration and show what it builds,
the way `nginx -t` does. Exit status 0 when valid, 1 otherwise (errors on stderr).
"""

from __future__ import annotations

import argparse
import sys

from .config import ConfigError, load_config
from .service import MailrelayService


def check(path: str) -> int:
    try:
        config = load_config(path)
        # Building the service builds every router and endpoint without listening.
        MailrelayService(config)
    except ConfigError as e:
        print(f"{path}: configuration is invalid", file=sys.stderr)
        for line in e.errors:
            print(line, file=sys.stderr)
        return 1
    print(f"{path}: configuration is valid")
    if config.router is not None:
        print(f"router: {config.router.description}")
    for listener in config.listeners:
        print(
            f'listener "{listener.name}": {listener.listen} mode={listener.mode} protocol={listener.protocol}'
            f" idle_timeout={listener.idle_timeout:g}s router_timeout={listener.router_timeout:g}s"
        )
        print(f"  router: {listener.router.description if listener.router else 'the default router'}")
    print(f"upstream: connect_timeout={config.upstream.connect_timeout:g}s; drain_timeout={config.drain_timeout:g}s")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mailrelay", description="mailrelay tools")
    commands = parser.add_subparsers(dest="command", required=True)
    check_parser = commands.add_parser("check", help="validate a configuration file and show what it builds")
    check_parser.add_argument("config", help="TOML configuration file")
    args = parser.parse_args(argv)
    return check(args.config)


if __name__ == "__main__":
    sys.exit(main())
