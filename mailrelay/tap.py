"""`twistd mailrelay`: command-line options -> the service."""

from __future__ import annotations

from twisted.application.service import IService
from twisted.python import usage

from .config import Config, ConfigError, load_config


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "mailrelay: a mail proxy for SMTP, IMAP and POP3. "
        "Run in the foreground with `twistd -n mailrelay --config mailrelay.toml`."
    )
    optParameters = [
        ["config", "c", None, "TOML configuration file (see README.md)."],
    ]
    compData = usage.Completions(optActions={"config": usage.CompleteFiles("*.toml")})

    config: Config

    def postOptions(self) -> None:
        if self["config"] is None:
            raise usage.UsageError("--config FILE is required (a demo without a configuration is not available yet)")
        try:
            self.config = load_config(self["config"])
        except ConfigError as e:
            raise usage.UsageError("invalid configuration:\n" + str(e)) from None


def makeService(options: Options) -> IService:
    from .service import makeService

    try:
        return makeService(options.config)  # with workers > 1: the supervisor
    except ConfigError as e:
        raise SystemExit("invalid configuration:\n" + str(e)) from None
