"""
The IMAP front-end's Twisted shell: the protocol is `core.imap.IMAPCore`, the upstream
login `core.imap_login.IMAPLogin`, sent under the tag of the client's own login command
with the fields of its ID; the client hears the upstream's own tagged answer to it, then
the session is spliced.
"""

from __future__ import annotations

from ..connector import LoginStep, StartTLSStep
from ..core.imap import IMAPCore
from ..core.imap_login import IMAPClientFacts, IMAPLogin
from ..router import RouteRequest
from .frontend import FrontEnd
from .upstream import login_steps


class IMAPFrontEnd(FrontEnd):
    """One IMAP client connection."""

    core_class = IMAPCore
    busy_reply = IMAPCore.replies.busy
    _upstream_login: IMAPLogin | None = None

    def upstream_steps(self, request: RouteRequest) -> tuple[LoginStep | None, StartTLSStep | None]:
        core = self.core
        assert isinstance(core, IMAPCore) and core.tag is not None
        self._upstream_login = IMAPLogin(
            IMAPClientFacts(tag=core.tag, request=request, client_id=core.client_id, **self.client_facts())
        )
        return login_steps(self._upstream_login)

    def client_reply(self) -> bytes:
        assert self._upstream_login is not None
        return self._upstream_login.client_reply
