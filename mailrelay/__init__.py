"""mailrelay: a mail proxy on Twisted. The public names, and nothing else."""

from .config import ConfigError
from .interfaces import IReloadable
from .listening import ExitOnListenFailure
from .router import ClientCertificate, IRouter, Reject, Route, Router, RouteRequest, RouterError
from .service import makeService

__all__ = [
    "ClientCertificate",
    "ConfigError",
    "ExitOnListenFailure",
    "IReloadable",
    "IRouter",
    "Reject",
    "Route",
    "RouteRequest",
    "Router",
    "RouterError",
    "makeService",
]
