"""`twistd mailrelay`: command-line options -> the service."""

from __future__ import annotations

from argparse import ArgumentTypeError

from twisted.application.service import IService
from twisted.python import usage

from .config import Config, ConfigError, load_config
from .demo.command import port_offset
from .demo.setup import DEFAULT_PORT_OFFSET


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "mailrelay: a mail proxy for SMTP, IMAP and POP3. "
        "Run in the foreground with `twistd -n mailrelay --config mailrelay.toml`; "
        "without --config, a self-contained demo runs on 127.0.0.1 (docs/demo.md)."
    )
    optParameters = [
        ["config", "c", None, "TOML configuration file (every key: docs/configuration.md)."],
        [
            "port-offset",
            None,
            None,
            "Demo only (no --config): listen on N + each protocol's standard port (default 10000).",
        ],
    ]
    compData = usage.Completions(optActions={"config": usage.CompleteFiles("*.toml")})

    config: Config | None = None
    """None: the demo runs (`mailrelay.demo`), on `port_offset`."""
    port_offset: int = DEFAULT_PORT_OFFSET

    def postOptions(self) -> None:
        if self["config"] is None:
            parent = getattr(self, "parent", None)
            if parent is not None and not parent.get("nodaemon", True):
                # A daemon has no terminal to print the demo's commands on.
                raise usage.UsageError("the demo (no --config) runs in the foreground: twistd -n mailrelay")
            if self["port-offset"] is not None:
                try:
                    self.port_offset = port_offset(self["port-offset"])
                except ArgumentTypeError as e:
                    raise usage.UsageError(f"--port-offset: {e}") from None
            return
        if self["port-offset"] is not None:
            raise usage.UsageError("--port-offset is for the demo, which runs without --config: use one or the other")
        try:
            self.config = load_config(self["config"])
        except ConfigError as e:
            # Not a UsageError: twistd would print its whole usage text above the problems.
            raise SystemExit(_invalid_configuration(e)) from None


def _invalid_configuration(error: ConfigError) -> str:
    count = len(error.errors)
    return f"mailrelay cannot start: invalid configuration, {count} problem{'s' if count > 1 else ''}:\n{error}"


def makeService(options: Options) -> IService:
    from .listening import ExitOnListenFailure
    from .service import makeService

    if options.config is None:
        from .demo.service import DemoService

        return ExitOnListenFailure(DemoService(options.port_offset))
    try:
        service = makeService(options.config)  # with workers > 1: the supervisor
    except ConfigError as e:
        raise SystemExit(_invalid_configuration(e)) from None
    return ExitOnListenFailure(service)
