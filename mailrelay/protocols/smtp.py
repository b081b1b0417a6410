"""
The SMTP front-end's Twisted shell: the protocol before login is `core.smtp.SMTPCore`,
the upstream login `core.smtp_login.SMTPLogin` (made from what the core learnt: the
client's HELO name, and with auth "none" its envelope), and after the login the session
is not spliced blindly but relayed by `smtp_relay.SMTPRelay`.
"""

from __future__ import annotations

from ..connector import Upstream
from ..core.machine import Input
from ..core.smtp import SMTPCore
from ..core.smtp_login import SMTPLogin
from ..router import RouteRequest
from ..splice import SpliceResult
from .frontend import FrontEnd
from .smtp_relay import SMTPRelay


class SMTPFrontEnd(FrontEnd):
    """One SMTP client connection."""

    core_class = SMTPCore
    busy_reply = SMTPCore.replies.busy

    @property
    def smtp(self) -> SMTPCore:
        """The connection's SMTP core (once connected)."""
        assert isinstance(self.core, SMTPCore)
        return self.core

    def make_login(self, request: RouteRequest) -> SMTPLogin:
        core = self.smtp
        envelope = (core.mail, core.rcpt) if request.auth_method == "none" and core.mail and core.rcpt else None
        return SMTPLogin(
            core.connection,
            request,
            hostname=self.config.hostname.encode("idna"),
            helo=core.helo,
            esmtp=core.esmtp,
            envelope=envelope,
        )

    async def relay(self, upstream: Upstream) -> SpliceResult:
        """Not a blind splice: the session goes on through `SMTPRelay`, which lets no
        XCLIENT, smuggled message or unvetted recipient reach the upstream."""
        assert isinstance(self.upstream_login, SMTPLogin)
        core = self.smtp
        envelope = core.mail is not None and core.rcpt is not None and not core.authenticating
        relay = SMTPRelay(
            self,
            core,
            upstream,
            chunking=self.upstream_login.offers("CHUNKING"),
            helo=core.helo,
            mail=core.mail if envelope else None,
            rcpt_owed=envelope,
            vet=envelope and self.config.vet_recipients == "all",
        )
        self.machine.fire(Input.RELAY)
        self._relay = relay
        return await relay.run()
