"""
The IMAP front-end's Twisted shell: the protocol is `core.imap.IMAPCore`, the upstream
login `core.imap_login.IMAPLogin`, sent under the tag of the client's own login command
with the fields of its ID; the client hears the upstream's own tagged answer to it, then
the session is spliced.
"""

from __future__ import annotations

from ..core.imap import IMAPCore
from ..core.imap_login import IMAPLogin
from ..router import RouteRequest
from .frontend import FrontEnd


class IMAPFrontEnd(FrontEnd):
    """One IMAP client connection."""

    core_class = IMAPCore
    busy_reply = IMAPCore.replies.busy

    def make_login(self, request: RouteRequest) -> IMAPLogin:
        core = self.core
        assert isinstance(core, IMAPCore) and core.tag is not None
        return IMAPLogin(core.connection, request, tag=core.tag, client_id=core.client_id)
