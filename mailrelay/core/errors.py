"""The errors a protocol core raises about its peer."""

from __future__ import annotations


class UpstreamProtocolError(Exception):
    """The upstream said something that is not its protocol, or not what a login
    needs: the route is unusable (the connector tries the next one)."""
