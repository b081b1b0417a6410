"""
The Twisted shell of the mail protocol front-ends: one `frontend.FrontEnd` feeds a
protocol core (`mailrelay.core.smtp`, `imap`, `pop3`) and does what it asks; one small
module per protocol names its core and upstream login (`mailrelay.core.*_login`, run on
a connection by `upstream.run_dialogue`). SMTP's session after its login is
`smtp_relay`'s.
"""

from __future__ import annotations

from ..relay import RoutedConnection
from .imap import IMAPFrontEnd
from .pop3 import POP3FrontEnd
from .smtp import SMTPFrontEnd

FRONT_ENDS: dict[str, type[RoutedConnection]] = {"smtp": SMTPFrontEnd, "imap": IMAPFrontEnd, "pop3": POP3FrontEnd}
"""The front-end of each protocol a `tls` or `starttls` listener may speak."""
