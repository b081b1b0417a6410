"""
The POP3 front-end's Twisted shell: the protocol is `core.pop3.POP3Core`, the upstream
login `core.pop3_login.POP3Login`; the client hears the upstream's own `+OK` to the
login, then the session is spliced.
"""

from __future__ import annotations

from ..core.frontend import FrontEndCore
from ..core.pop3 import POP3Core
from ..core.pop3_login import POP3Login
from ..router import RouteRequest
from .frontend import FrontEnd


class POP3FrontEnd(FrontEnd):
    """One POP3 client connection."""

    core_class = POP3Core
    busy_reply = POP3Core.replies.busy

    def make_core(self) -> FrontEndCore:
        core = POP3Core(self.config, self.connection_facts(), self.machine)
        core.now = self.factory.clock.seconds  # the APOP timestamp's time
        return core

    def make_login(self, request: RouteRequest) -> POP3Login:
        assert self.core is not None
        return POP3Login(self.core.connection, request)
