"""
Mail protocol front-ends: what mailrelay says to a client before the session is routed
(greeting, capabilities, STARTTLS, authentication), one module per protocol, sharing
`base.LineFrontEnd`.
"""

from __future__ import annotations

from ..relay import RoutedConnection

FRONT_ENDS: dict[str, type[RoutedConnection]] = {}
"""The front-end of each protocol a `tls` or `starttls` listener may speak."""
