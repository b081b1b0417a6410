"""mailrelay: a mail proxy on Twisted. The public names, and nothing else."""

from .config import ConfigError
from .router import IRouter, Reject, Route, Router, RouteRequest
from .service import makeService

__all__ = ["ConfigError", "IRouter", "Reject", "Route", "RouteRequest", "Router", "makeService"]
