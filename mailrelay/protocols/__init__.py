"""
Mail protocol front-ends: what mailrelay says to a client before the session is routed
(greeting, capabilities, STARTTLS, authentication), one module per protocol, sharing
`base.LineFrontEnd`, each with its upstream side beside it (`smtp_upstream`,
`imap_upstream`, `pop3_upstream`, sharing `upstream`).
"""

from __future__ import annotations

from ..relay import RoutedConnection
from .imap import IMAPFrontEnd
from .pop3 import POP3FrontEnd
from .smtp import SMTPFrontEnd

FRONT_ENDS: dict[str, type[RoutedConnection]] = {"smtp": SMTPFrontEnd, "imap": IMAPFrontEnd, "pop3": POP3FrontEnd}
"""The front-end of each protocol a `tls` or `starttls` listener may speak."""
