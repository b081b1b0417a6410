"""
`python -m mailrelay check FILE`: validate a configuration and show what it builds,
the way `nginx -t` does. Exit status 0 when valid, 1 otherwise (errors on stderr).
"""

from __future__ import annotations

import argparse
import sys

from .config import ConfigError, load_config
from .routerspec import RouterSpec
from .service import MailrelayService


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mailrelay", description="mailrelay tools")
    commands = parser.add_subparsers(dest="command", required=True)
    check_parser = commands.add_parser("check", help="validate a configuration file and show what it builds")
    check_parser.add_argument("config", help="TOML configuration file")
    worker_parser = commands.add_parser("worker", help="one worker process (started by mailrelay itself with workers > 1)")
    source = worker_parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="TOML configuration file")
    source.add_argument("--tac", help="the .tac file twistd runs")
    args = parser.parse_args(argv)
    if args.command == "worker":
        from .worker import install_reactor, run

        install_reactor()
        return run(args.config, args.tac)
    return check(args.config)


if __name__ == "__main__":
    sys.exit(main())
