"""
What a front-end core is told by the configuration: the settings of a listener that
speaks a mail protocol (`config.py` reads them from TOML into this).
"""

from __future__ import annotations

import socket

import attrs

DEFAULT_AUTH = ("plain", "login")


@attrs.frozen(kw_only=True)
class FrontEndConfig:
    """What a listener with a mail protocol says and accepts before a client is routed."""

    hostname: str = attrs.field(factory=socket.gethostname)
    """Mailrelay's name: in the greeting, the EHLO reply, the CRAM-MD5 challenge."""
    starttls: str = "required"
    """`starttls` listeners: "required" refuses logins and mail before TLS; "optional"."""
    auth: tuple[str, ...] = DEFAULT_AUTH
    """The login mechanisms accepted (and advertised); SMTP's "none" accepts mail without a login."""
    max_attempts: int = 3
    """Failed logins after which the connection is closed."""
    max_errors: int = 5
    """Unknown or malformed commands after which the connection is closed."""
    login_timeout: float = 60.0
    """How long a client may stay silent before it is routed."""
    login_deadline: float = 180.0
    """How long after accept (TLS handshake included) a client may take to log in or be
    routed, whatever it sends meanwhile; a login in flight then is not cut."""
    max_junk_commands: int = 20
    """Commands achieving nothing before login (NOOP, RSET, a third EHLO...) after which
    the connection is closed."""
    capabilities: tuple[str, ...] | None = None
    """The extensions advertised besides STARTTLS and AUTH; None: the protocol's default."""
    size: int | None = None
    """SMTP: the SIZE advertised (0: SIZE without a limit; None: not advertised)."""
    vet_recipients: str = "first"
    """SMTP with auth "none": ask the Router about the "first" RCPT only, or "all" of them."""
