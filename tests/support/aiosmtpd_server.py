"""
`SMTPUpstream`: an SMTP server (aiosmtpd, in its own thread) that records every message
it was sent, for tests that need AUTH or want to see the exact envelope and DATA bytes.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from types import TracebackType
from typing import Any

import attrs
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from tests.support.servers import SIZE_LIMIT, WAIT


@attrs.frozen
class ReceivedMessage:
    """One message as an SMTPUpstream received it."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    content: bytes
    """The DATA bytes exactly as sent, dot-unstuffed, without the final ".": CRLF line ends."""
    login: str | None
    """The AUTH user of the session, None without AUTH."""
    helo: str | None
    tls: bool
    """Whether the session was TLS (STARTTLS or implicit) when the message came."""
    mail_options: tuple[str, ...] = ()
    rcpt_options: tuple[str, ...] = ()
    peer: tuple[str, int] | None = None


class _SMTP(SMTP):
    """aiosmtpd's session, with AUTH required before mail when there are users.

    aiosmtpd's own auth_required=True warns (UserWarning, for each connection) when it is
    combined with auth_require_tls=False; this does the same check without the warning."""

    def __init__(self, handler: Any, *, require_auth: bool, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.require_auth = require_auth

    async def check_auth_needed(self, caller_method: str) -> bool:
        assert self.session is not None
        if self.require_auth and not self.session.authenticated:
            await self.push("530 5.7.0 Authentication required")
            return True
        return False


class _Controller(Controller):
    def __init__(self, handler: Any, require_auth: bool, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.require_auth = require_auth

    def factory(self) -> SMTP:
        return _SMTP(self.handler, require_auth=self.require_auth, **self.SMTP_kwargs)

    def _trigger_server(self) -> None:
        # Bound to port 0: learn the port the system chose before the base class makes its
        # first connection to it (which it does to check the server works).
        assert isinstance(self.server, asyncio.Server)
        self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()


class SMTPUpstream:
    """
    An SMTP server on 127.0.0.1 (aiosmtpd, in its own thread) that records every message.

    - `users`: logins and passwords; AUTH PLAIN and LOGIN check them, and MAIL needs AUTH
      (530 before it). Without users AUTH is not offered and anyone may send.
    - `starttls`: a server SSLContext to offer STARTTLS with; `implicit_tls`: one to speak
      TLS from the first byte with (not both).
    - `auth_require_tls`: whether AUTH is offered only after STARTTLS (not by default, so
      that tests can log in over plaintext).
    DATA is taken as bytes (no decoding), up to `data_size_limit` bytes. Lines of 998 bytes
    and CRLF pass, stuffed dot included: aiosmtpd refuses with 500 a line of more than 1001
    bytes as sent.
    """

    def __init__(
        self,
        *,
        users: dict[str, str] | None = None,
        starttls: ssl.SSLContext | None = None,
        implicit_tls: ssl.SSLContext | None = None,
        auth_require_tls: bool = False,
        hostname: str = "upstream.test",
        data_size_limit: int = SIZE_LIMIT,
    ) -> None:
        if starttls is not None and implicit_tls is not None:
            raise ValueError("an SMTPUpstream does either STARTTLS or implicit TLS")
        self.users = dict(users) if users is not None else None
        self.hostname = hostname
        self.received: list[ReceivedMessage] = []
        self._condition = threading.Condition()
        self._controller: _Controller | None = None
        self._settings: dict[str, Any] = dict(
            hostname="127.0.0.1",
            port=0,
            ssl_context=implicit_tls,
            # Given, or aiosmtpd asks socket.getfqdn() for every connection.
            server_hostname=hostname,
            tls_context=starttls,
            require_starttls=False,
            decode_data=False,
            enable_SMTPUTF8=True,
            data_size_limit=data_size_limit,
            auth_require_tls=auth_require_tls,
            timeout=WAIT * 2,
        )

    @property
    def port(self) -> int:
        if self._controller is None:
            raise RuntimeError("SMTPUpstream has not been started")
        return int(self._controller.port)

    def start(self) -> None:
        if self._controller is not None:
            return
        handler = _Handler(self)
        controller = _Controller(
            handler, self.users is not None, ready_timeout=WAIT, authenticator=handler.authenticate, **self._settings
        )
        controller.start()
        self._controller = controller

    def stop(self) -> None:
        if self._controller is None:
            return
        controller, self._controller = self._controller, None
        controller.stop()

    def __enter__(self) -> SMTPUpstream:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def _record(self, message: ReceivedMessage) -> None:
        with self._condition:
            self.received.append(message)
            self._condition.notify_all()

    def wait_for_messages(self, count: int = 1, timeout: float = WAIT) -> list[ReceivedMessage]:
        """Wait until at least `count` messages arrived; all of them, in order of arrival."""
        with self._condition:
            if not self._condition.wait_for(lambda: len(self.received) >= count, timeout):
                raise TimeoutError(f"{len(self.received)} of {count} messages arrived after {timeout} s")
            return list(self.received)


class _Handler:
    """aiosmtpd's hooks for an SMTPUpstream, run in the server's thread. (Not the
    SMTPUpstream itself: aiosmtpd reads every attribute of its handler, properties too.)"""

    def __init__(self, upstream: SMTPUpstream) -> None:
        self.users = upstream.users
        self.upstream = upstream

    def authenticate(self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any) -> AuthResult:
        if self.users is not None and isinstance(data, LoginPassword):
            login = data.login.decode("utf-8", "surrogateescape")
            password = data.password.decode("utf-8", "surrogateescape")
            if login in self.users and self.users[login] == password:
                return AuthResult(success=True, auth_data=login)
        # handled=False: aiosmtpd answers 535 5.7.8.
        return AuthResult(success=False, handled=False)

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        if self.users is None:
            responses = [r for r in responses if not r[4:].startswith("AUTH")]
        return responses

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        transport = server.transport
        tls = transport is not None and transport.get_extra_info("ssl_object") is not None
        content = envelope.original_content
        assert content is not None and envelope.mail_from is not None
        message = ReceivedMessage(
            mail_from=envelope.mail_from,
            rcpt_tos=tuple(envelope.rcpt_tos),
            content=content,
            login=session.auth_data if session.authenticated else None,
            helo=session.host_name,
            tls=tls,
            mail_options=tuple(envelope.mail_options),
            rcpt_options=tuple(envelope.rcpt_options),
            peer=session.peer if isinstance(session.peer, tuple) else None,
        )
        self.upstream._record(message)
        return "250 2.0.0 OK"
