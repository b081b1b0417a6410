"""
The POP3 front-end's Twisted shell: the protocol is `core.pop3.POP3Core`, the upstream
login `core.pop3_login.POP3Login`; the client hears the upstream's own `+OK` to the
login, then the session is spliced.
"""

from __future__ import annotations

from ..connector import LoginStep, StartTLSStep
from ..core.frontend import FrontEndCore
from ..core.pop3 import POP3Core
from ..core.pop3_login import POP3ClientFacts, POP3Login
from ..router import RouteRequest
from .frontend import FrontEnd
from .upstream import login_steps


class POP3FrontEnd(FrontEnd):
    """One POP3 client connection."""

    core_class = POP3Core
    busy_reply = POP3Core.replies.busy
    _upstream_login: POP3Login | None = None

    def make_core(self) -> FrontEndCore:
        core = POP3Core(self.config, self.connection_facts(), self.machine)
        core.now = self.factory.clock.seconds  # the APOP timestamp's time
        return core

    def upstream_steps(self, request: RouteRequest) -> tuple[LoginStep | None, StartTLSStep | None]:
        self._upstream_login = POP3Login(POP3ClientFacts(request=request, **self.client_facts()))
        return login_steps(self._upstream_login)

    def client_reply(self) -> bytes:
        assert self._upstream_login is not None
        return self._upstream_login.client_reply
