"""
The `mailrelay` command (also `python -m mailrelay`): the tools around the service.

    mailrelay check FILE        validate a configuration and show what it builds, the way
                                `nginx -t` does: exit status 0 when valid, 1 otherwise
    mailrelay demo              a self-contained demo: mail servers and mailrelay on localhost
    mailrelay from-nginx FILE   translate an nginx mail {} / stream {} configuration
    mailrelay version           the installed version

The service itself runs under twistd (`twistd -n mailrelay --config FILE`), which owns
daemonizing, pid files, logging and the reactor choice.
"""

from __future__ import annotations

import argparse
import sys

from .config import ConfigError, load_config
from .routerspec import RouterSpec
from .service import MailrelayService
from .version import version


def check(path: str) -> int:
    try:
        # Sockets from systemd reach ExecStart only, not an ExecStartPre check.
        config = load_config(path, systemd_sockets_later=True)
        # Building the service builds every router and endpoint, and loads every
        # certificate, without listening.
        service = MailrelayService(config)
    except ConfigError as e:
        print(f"{path}: configuration is invalid", file=sys.stderr)
        for line in e.errors:
            print(line, file=sys.stderr)
        return 1
    print(f"{path}: configuration is valid")
    if service.server_tls is not None:
        tls = config.tls
        policy = f"min_version={tls.min_version}" if tls else "min_version=1.2"
        if tls and tls.client_ca:
            policy += f" client_cert={tls.client_cert} client_ca={tls.client_ca}"
        state = "SELF-SIGNED " if service.server_tls.self_signed else ""
        print(f"tls: {state}{service.server_tls.describe()}; {policy}")
    if config.router is not None:
        print(f"router: {config.router.description}")
    for listener in config.listeners:
        extra = ""
        if listener.terminates_tls:
            extra = f" handshake_timeout={listener.handshake_timeout:g}s"
        elif listener.preread_sni:
            extra = f" preread_sni preread_timeout={listener.preread_timeout:g}s"
        if not listener.zero_copy:
            extra += " zero_copy=false"
        print(
            f'listener "{listener.name}": {listener.listen} mode={listener.mode} protocol={listener.protocol}'
            f" idle_timeout={listener.idle_timeout:g}s router_timeout={listener.router_timeout:g}s{extra}"
        )
        if listener.protocol != "none":
            front = listener.front_end
            starttls = f" starttls={front.starttls}" if listener.mode == "starttls" else ""
            vetting = f" vet_recipients={front.vet_recipients}" if "none" in front.auth else ""
            print(
                f"  {listener.protocol}: hostname={front.hostname}{starttls} auth={','.join(front.auth)}{vetting}"
                f" max_attempts={front.max_attempts} max_errors={front.max_errors} login_timeout={front.login_timeout:g}s"
                f" login_deadline={front.login_deadline:g}s max_junk_commands={front.max_junk_commands}"
            )
        print(f"  router: {listener.router.description if listener.router else 'the default router'}")
        router = listener.router or config.router
        if listener.accepts_passwords and router is not None:
            print(f"  passwords: {_who_checks_passwords(router)}")
        print(f"  connection_limits: {listener.connection_limits.describe()}")
        if listener.proxy_protocol:
            trusted = ",".join(str(network) for network in listener.trusted_proxies)
            print(f"  proxy_protocol: v1 or v2 header first, from {trusted} only, within {listener.proxy_timeout:g}s")
    limits = config.login_limits
    print(
        f"login_limits: window={limits.window:g}s max_per_client={limits.max_per_client or 'off'}"
        f" max_per_user={limits.max_per_user or 'off'} delay={limits.delay:g}s max_delay={limits.max_delay:g}s"
        f" exempt={','.join(str(network) for network in limits.exempt) or 'none'}"
    )
    if config.redis is not None:
        print(f"redis: {config.redis.describe()}")
    if config.metrics is not None:
        print(f"metrics: served at /metrics on {config.metrics.listen}")
    print(f"log: session lines as {config.log.sessions}")
    if config.workers > 1:
        print(f"workers: {config.workers} processes under one supervisor")
    trust = config.upstream.ca or "the system trust store"
    print(
        f"upstream: connect_timeout={config.upstream.connect_timeout:g}s login_timeout={config.upstream.login_timeout:g}s,"
        f" TLS verified against {trust};"
        f" drain_timeout={config.drain_timeout:g}s"
    )
    return 0


def _who_checks_passwords(router: RouterSpec) -> str:
    """On a listener that takes passwords, who checks them (the configuration refused
    routes on which no one would)."""
    if router.type == "map":
        return "verified by the router for rules with a password hash, by the upstream (login=passthrough) for the others"
    if router.verifies_passwords:
        return "verified by the router (verifies_passwords)"
    if router.type == "python":
        return "not verified by the router: its routes must log in with login=passthrough (enforced per session)"
    return "the router verifies none: checked by the upstream (login=passthrough)"


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=prog or _prog(),
        description="mailrelay tools; the service runs with `twistd -n mailrelay --config FILE`",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    check_parser = commands.add_parser("check", help="validate a configuration file and show what it builds")
    check_parser.add_argument("config", help="TOML configuration file")
    # The demo and the nginx translation add their own arguments. Their modules import
    # nothing that installs a reactor: `worker` below installs its own first.
    from .demo import command as demo_command
    from .fromnginx import command as from_nginx_command

    demo_command.add_arguments(
        commands.add_parser("demo", help="run a self-contained demo: mail servers and mailrelay on localhost")
    )
    from_nginx_command.add_arguments(
        commands.add_parser("from-nginx", help="translate an nginx mail {} / stream {} configuration into mailrelay TOML")
    )
    commands.add_parser("version", help="print the installed version")
    # Started by mailrelay itself with workers > 1; not for people.
    worker_parser = commands.add_parser("worker")
    source = worker_parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="TOML configuration file")
    source.add_argument("--tac", help="the .tac file twistd runs")
    args = parser.parse_args(argv)
    if args.command == "worker":
        from .worker import install_reactor, run

        install_reactor()
        return run(args.config, args.tac)
    if args.command == "demo":
        return demo_command.run(args)
    if args.command == "from-nginx":
        return from_nginx_command.run(args)
    if args.command == "version":
        print(f"mailrelay {version()}")
        return 0
    return check(args.config)


def _prog() -> str:
    """`mailrelay` when run as the console script, `python -m mailrelay` otherwise."""
    name = sys.argv[0].rsplit("/", 1)[-1] if sys.argv and sys.argv[0] else ""
    return "python -m mailrelay" if name in ("__main__.py", "-m", "") else "mailrelay"


if __name__ == "__main__":
    sys.exit(main())
