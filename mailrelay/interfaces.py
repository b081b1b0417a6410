"""
Interfaces that components at several layers provide (the Router's own contract lives
with it in `router.py`).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import Interface


class IBalancerAddress(Interface):
    """Marks a peer address as a load balancer's own: the connection came with a PROXY
    header of command LOCAL, which a balancer sends for its health checks. Its session
    line is quieter when all went well (`session.Session.quiet`)."""


class IReloadable(Interface):
    """A component that can re-read its files (certificates, route maps...) on SIGHUP."""

    def reload() -> Deferred[Any] | None:
        """
        Re-read; keep the old state and log why when the new one is broken. Running
        sessions must not be affected.
        """
