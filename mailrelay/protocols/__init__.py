"""
Mail protocol front-ends: what mailrelay says to a client before the session is routed
(greeting, capabilities, STARTTLS, authentication), one module per protocol, sharing
`base.LineFrontEnd`, each with its upstream side beside it (`smtp_upstream`).
"""

from __future__ import annotations

from ..relay import RoutedConnection
from .smtp import SMTPFrontEnd

FRONT_ENDS: dict[str, type[RoutedConnection]] = {"smtp": SMTPFrontEnd}
"""The front-end of each protocol a `tls` or `starttls` listener may speak."""
