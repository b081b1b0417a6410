"""
The life of a session, as one explicit state machine.

Every client connection has a `SessionMachine`. Its state changes only through
`fire()`, and only along the transitions in `TRANSITIONS`: an input that has no
transition from the current state is a bug, and raises `IllegalTransition` instead of
quietly moving the session somewhere it should not be (a recipient vetted on the
client's word, a login read after the hand-off). The protocol cores (SMTP, IMAP, POP3)
fire the protocol's inputs (greet, starttls, route, refused, close); the Twisted shell
fires the rest (the TLS handshake, connecting, logging in, the splice, the end).

`docs/session-states.md` is generated from the table (`python -m mailrelay.core.diagram`),
and a test fails when the two differ.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping


class State(enum.Enum):
    ACCEPTED = "accepted"
    TLS_HANDSHAKE = "TLS handshake"
    PRE_LOGIN = "pre-login"
    STARTTLS_HANDSHAKE = "STARTTLS handshake"
    ROUTING = "routing"
    CONNECTING = "connecting"
    LOGGING_IN = "logging in"
    SPLICED = "spliced"
    RELAYING = "relaying"
    DRAINING = "draining"
    CLOSED = "closed"


MEANING: Mapping[State, str] = {
    State.ACCEPTED: "The connection is open; nothing has been said (a splice listener peeks at the client's first bytes here).",
    State.TLS_HANDSHAKE: "A `tls` listener's handshake, before any protocol byte.",
    State.PRE_LOGIN: "Greeted; reading the client's commands until it logs in (or, SMTP without a login, names a recipient).",
    State.STARTTLS_HANDSHAKE: "The client said STARTTLS and was told to go ahead: its handshake is under way.",
    State.ROUTING: "The Router is asked where the session goes (and the login limits consulted).",
    State.CONNECTING: "The connector is reaching the routes in order: TCP, upstream TLS.",
    State.LOGGING_IN: "Connected: the protocol's upstream dialogue (greeting, STARTTLS, login) runs.",
    State.SPLICED: "Bytes are pumped both ways, unchanged.",
    State.RELAYING: "SMTP after login: command by command, recipients vetted, content checked.",
    State.DRAINING: "The session is ending: what was written is flushed, then the connection closes.",
    State.CLOSED: "The client connection is gone; the session line is logged.",
}
"""What each state means, for the reader and for the generated document."""


class Input(enum.Enum):
    GREET = "greet"
    BEGIN_TLS = "begin TLS"
    STARTTLS = "STARTTLS"
    TLS_ESTABLISHED = "TLS established"
    ROUTE = "route"
    CONNECT = "connect"
    LOG_IN = "log in"
    SPLICE = "splice"
    RELAY = "relay"
    REFUSED = "refused"
    UNAVAILABLE = "unavailable"
    CLOSE = "close"
    LOST = "lost"


_S, _I = State, Input
_ASKING = (_S.ROUTING, _S.CONNECTING, _S.LOGGING_IN)
LIVE = tuple(s for s in State if s not in (_S.DRAINING, _S.CLOSED))

TRANSITIONS: Mapping[tuple[State, Input], State] = {
    (_S.ACCEPTED, _I.BEGIN_TLS): _S.TLS_HANDSHAKE,
    (_S.ACCEPTED, _I.GREET): _S.PRE_LOGIN,
    (_S.ACCEPTED, _I.ROUTE): _S.ROUTING,  # splice: routed from the connection's facts
    (_S.TLS_HANDSHAKE, _I.GREET): _S.PRE_LOGIN,
    (_S.TLS_HANDSHAKE, _I.ROUTE): _S.ROUTING,  # tls with no protocol: routed once secured
    (_S.PRE_LOGIN, _I.STARTTLS): _S.STARTTLS_HANDSHAKE,
    (_S.STARTTLS_HANDSHAKE, _I.TLS_ESTABLISHED): _S.PRE_LOGIN,
    (_S.PRE_LOGIN, _I.ROUTE): _S.ROUTING,
    (_S.ROUTING, _I.CONNECT): _S.CONNECTING,
    (_S.CONNECTING, _I.LOG_IN): _S.LOGGING_IN,
    (_S.CONNECTING, _I.SPLICE): _S.SPLICED,  # nothing to say upstream: splice at once
    (_S.LOGGING_IN, _I.SPLICE): _S.SPLICED,
    (_S.LOGGING_IN, _I.RELAY): _S.RELAYING,
    **{(s, _I.REFUSED): _S.PRE_LOGIN for s in _ASKING},
    **{(s, _I.UNAVAILABLE): _S.PRE_LOGIN for s in _ASKING},
    **{(s, _I.CLOSE): _S.DRAINING for s in LIVE},
    **{(s, _I.LOST): _S.CLOSED for s in (*LIVE, _S.DRAINING)},
}
"""(state, input) -> next state: every way a session's state may change."""


class IllegalTransition(Exception):
    """An input with no transition from the current state (a bug in mailrelay)."""


class SessionMachine:
    """One session's state; `fire()` is the only way it changes."""

    def __init__(self, on_change: Callable[[State, Input, State], None] | None = None) -> None:
        self.state = State.ACCEPTED
        self._on_change = on_change

    def can(self, event: Input) -> bool:
        """Whether `event` has a transition from the current state."""
        return (self.state, event) in TRANSITIONS

    def fire(self, event: Input) -> State:
        """Take the transition for `event`; raise `IllegalTransition` if there is none."""
        before = self.state
        after = TRANSITIONS.get((before, event))
        if after is None:
            raise IllegalTransition(f"{event.value!r} is not possible in state {before.value!r}")
        self.state = after
        if self._on_change is not None:
            self._on_change(before, event, after)
        return after

    def is_in(self, *states: State) -> bool:
        return self.state in states

    @property
    def asking(self) -> bool:
        """Whether a route or login is in flight (the Router, the connector, the upstream)."""
        return self.state in _ASKING

    @property
    def handed_on(self) -> bool:
        """Whether the session is past its login: spliced, relayed, or over."""
        return self.state in (_S.SPLICED, _S.RELAYING, _S.DRAINING, _S.CLOSED)
