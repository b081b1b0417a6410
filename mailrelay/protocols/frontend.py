"""
The Twisted shell around a protocol core (`mailrelay.core`): one class for SMTP, IMAP
and POP3 on `tls` and `starttls` listeners.

It feeds the client's bytes to the core and performs what the core returns (write,
start TLS, route and log in, close), and it owns every timer, through the listener's
clock: `login_timeout` (silence before login), `login_deadline` (from accept, whatever
the client sends) and the TLS handshake's. The protocol itself (what is said, when a
command is refused, what counts as junk) is the core's alone.

Once the upstream has accepted the login, the bytes the client pipelined behind its
login (`core.leftover()`) and all later ones go to the relay: a `Splice`, or SMTP's
relay.
"""

from __future__ import annotations

from collections import deque
from typing import Any, ClassVar

from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..config import FrontEndConfig
from ..connector import LoginStep, StartTLSStep, Upstream
from ..core.events import Close, Discarded, Event, LoginRefused, Route, Send, StartTLS
from ..core.facts import ConnectionFacts, TLSInfo
from ..core.frontend import FrontEndCore
from ..core.login import UpstreamLogin
from ..core.machine import Input, State
from ..logtext import loggable
from ..relay import RoutedConnection, RoutedConnectionFactory
from ..router import Reject, RouteRequest
from ..timers import cancel
from ..zerocopy import write_through
from .upstream import login_steps

_FEEDS_CORE = (
    State.ACCEPTED,
    State.TLS_HANDSHAKE,
    State.PRE_LOGIN,
    State.STARTTLS_HANDSHAKE,
    State.ROUTING,
    State.CONNECTING,
    State.LOGGING_IN,
)
"""States in which the client's bytes are the core's to read (or keep, while a login
is in flight)."""


class FrontEnd(RoutedConnection):
    """A client connection speaking a mail protocol until it is routed."""

    log = Logger()
    peer = "client"
    core_class: ClassVar[type[FrontEndCore]]

    def __init__(self, factory: RoutedConnectionFactory) -> None:
        super().__init__(factory)
        self.core: FrontEndCore | None = None
        self._events: deque[Event] = deque()
        self._performing = False
        self._silence: IDelayedCall | None = None
        self._commands_seen = 0
        self._deadline: IDelayedCall | None = None
        """Fires `login_deadline` seconds after accept, unless logged in or gone first."""
        self._paused_for_core = False
        self.upstream_login: UpstreamLogin[Any, Any] | None = None
        """The protocol's upstream login, once the session is routed."""

    @property
    def config(self) -> FrontEndConfig:
        return self.listener.front_end

    def make_core(self) -> FrontEndCore:
        """The protocol core of this connection (sharing its machine)."""
        return self.core_class(self.config, self.connection_facts(), self.machine)

    def connection_facts(self) -> ConnectionFacts:
        assert self.session is not None
        return ConnectionFacts(
            client=self.client,
            local=self.local,
            listener=self.listener.name,
            mode=self.listener.mode,
            starttls_available=self.factory.tls is not None,
            session_id=self.session.id,
        )

    # Twisted's calls

    def connectionMade(self) -> None:
        super().connectionMade()
        core = self.core = self.make_core()
        self._deadline = self.factory.clock.callLater(self.config.login_deadline, self._deadline_reached)
        if self.listener.mode == "tls":
            self.machine.fire(Input.BEGIN_TLS)
            self.expect_handshake()  # greet once TLS is up
        else:
            self.perform(core.greet())

    def dataReceived(self, data: bytes) -> None:
        if self._relay is not None or self.machine.state in (State.SPLICED, State.RELAYING):
            super().dataReceived(data)  # the relay's, kept until it reads them
        elif self.core is not None and self.machine.state in _FEEDS_CORE:
            self.perform(self.core.receive(data))
        # else: the session is closing before login; nothing more is read

    def readConnectionLost(self) -> None:
        super().readConnectionLost()  # a relay taking over later sees the end too
        if self.core is not None and self.machine.state in _FEEDS_CORE:
            self.perform(self.core.client_ended())

    def handshake_done(self) -> None:
        assert self.core is not None and self.tls is not None
        self.perform(self.core.tls_established(TLSInfo(client_cert=self.tls.client_cert)))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stop_silence()
        self._stop_deadline()
        super().connectionLost(reason)

    # Performing what the core asks

    def perform(self, events: list[Event]) -> None:
        """Do what the core asked, in order. Not re-entrant: a Router that answers at
        once refuses a login from inside the event that asked for it; its events queue
        behind the current ones instead of nesting (200 pipelined failing logins must
        not mean 200 stack frames)."""
        self._events.extend(events)
        if self._performing:
            return
        self._performing = True
        try:
            while self._events:
                self._do(self._events.popleft())
        finally:
            self._performing = False
        self._watch()

    def _do(self, event: Event) -> None:
        if isinstance(event, Send):
            # Straight to the socket when nothing waits before it: no writer to register
            # and no reactor turn per reply.
            write_through(self.transport, event.data)
        elif isinstance(event, StartTLS):
            assert self.factory.tls is not None
            self.transport.startTLS(self.factory.tls)
            self.expect_handshake()
        elif isinstance(event, Route):
            self.start_route(**event.facts)
        elif isinstance(event, Close):
            self._stop_deadline()
            self.close(event.outcome, event.reason)
        elif isinstance(event, LoginRefused):
            assert self.session is not None
            self.log.info(
                "session {session_id}: login refused for {user} from {client}: {why} (attempt {attempt} of {max_attempts})",
                session_id=self.session.id,
                user=loggable(self.session.user),
                client=self.client[0],
                why=loggable(event.why),
                attempt=event.attempt,
                max_attempts=event.max_attempts,
            )
        elif isinstance(event, Discarded):
            assert self.session is not None
            self.log.warn(
                "session {session_id}: discarded {count} byte(s) sent in plaintext after STARTTLS (command injection?)",
                session_id=self.session.id,
                count=event.count,
            )

    def _watch(self) -> None:
        """After each batch of events: the silence timer runs while commands are read
        (restarted by each one), and reading pauses while the core holds too much."""
        core = self.core
        if core is None:
            return
        if self.machine.state is State.PRE_LOGIN:
            if self._silence is None or core.commands_read != self._commands_seen:
                self._commands_seen = core.commands_read
                self._listen_for_silence()
        else:
            self._stop_silence()
        full = core.buffered >= self.pending_limit and self.machine.state in _FEEDS_CORE
        if full != self._paused_for_core and self.lost_reason is None:
            self._paused_for_core = full
            if full:
                self.transport.pauseProducing()
            else:
                self.transport.resumeProducing()

    # Timers

    def _listen_for_silence(self) -> None:
        if self._silence is not None and self._silence.active():
            self._silence.reset(self.config.login_timeout)
        else:
            self._silence = self.factory.clock.callLater(self.config.login_timeout, self._silent_too_long)

    def _stop_silence(self) -> None:
        cancel(self._silence)
        self._silence = None

    def _silent_too_long(self) -> None:
        self._silence = None
        assert self.core is not None
        self.perform(self.core.timed_out())

    def _deadline_reached(self) -> None:
        self._deadline = None
        assert self.core is not None
        if self.machine.state in (State.TLS_HANDSHAKE, State.STARTTLS_HANDSHAKE):
            # No protocol reply can reach a client inside a TLS handshake.
            self._stop_handshake_timer()
            self.end_now("login-timeout", f"not logged in within {self.config.login_deadline:g}s (in a TLS handshake)")
            return
        self.perform(self.core.deadline_passed())

    def _stop_deadline(self) -> None:
        cancel(self._deadline)
        self._deadline = None

    # The session's news, passed to the core

    def refused(self, reject: Reject) -> None:
        assert self.core is not None
        self.perform(self.core.refused(reject))

    def unavailable(self, outcome: str, reason: str) -> None:
        assert self.core is not None
        self.perform(self.core.unavailable(outcome, reason))

    def logged_in(self, upstream: Upstream) -> None:
        """The deadline is met; the client hears the upstream's answer (`client_reply()`),
        and what it pipelined behind its login waits for the relay."""
        assert self.core is not None
        self._stop_deadline()
        # Taken first, so that reading paused for a full core buffer resumes (`_watch()`
        # after the events): `pending` has its own limit, which the relay drains.
        self.pending[:0] = self.core.leftover()
        self.perform(self.core.logged_in(self.client_reply()))

    def make_login(self, request: RouteRequest) -> UpstreamLogin[Any, Any] | None:
        """The protocol's upstream login for `request`, made from what the core learnt;
        None: nothing to say upstream, the splice starts with its first byte."""
        return None

    def upstream_steps(self, request: RouteRequest) -> tuple[LoginStep | None, StartTLSStep | None]:
        self.upstream_login = self.make_login(request)
        return login_steps(self.upstream_login) if self.upstream_login is not None else (None, None)

    def client_reply(self) -> bytes:
        """What the client hears once the upstream accepted the login: the upstream's own
        answer (IMAP's tagged OK, POP3's +OK)."""
        return self.upstream_login.client_reply if self.upstream_login is not None else b""

    def lost_before_routing(self, reason: Failure) -> None:
        if self.core is not None and self.core.last_failure is not None and self._handshake_timer is None:
            self.finish(*self.core.last_failure)
        else:
            super().lost_before_routing(reason)
