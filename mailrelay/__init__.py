"""mailrelay: a mail proxy on Twisted. The public names, and nothing else."""

from .config import ConfigError
from .router import IRouter, Reject, Route, Router, RouteRequest
from .service import IReloadable, makeService

__all__ = ["ConfigError", "IReloadable", "IRouter", "Reject", "Route", "RouteRequest", "Router", "makeService"]
