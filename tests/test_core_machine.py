"""The session state machine: its table, its refusals, and the document drawn from it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mailrelay.core.diagram import document
from mailrelay.core.machine import TRANSITIONS, IllegalTransition, Input, SessionMachine, State

DOCUMENT = Path(__file__).parent.parent / "docs" / "session-states.md"


def test_the_document_is_generated_from_the_table() -> None:
    assert DOCUMENT.read_text() == document(), "regenerate it: python -m mailrelay.core.diagram > docs/session-states.md"


def test_the_module_prints_the_document() -> None:
    printed = subprocess.run([sys.executable, "-m", "mailrelay.core.diagram"], capture_output=True, text=True, check=True)
    assert printed.stdout == document()


def test_a_protocol_session_from_accept_to_splice() -> None:
    machine = SessionMachine()
    path = [Input.GREET, Input.STARTTLS, Input.TLS_ESTABLISHED, Input.ROUTE, Input.CONNECT, Input.LOG_IN]
    path += [Input.SPLICE, Input.CLOSE, Input.LOST]
    states = [machine.fire(event) for event in path]
    assert states == [
        State.PRE_LOGIN,
        State.STARTTLS_HANDSHAKE,
        State.PRE_LOGIN,
        State.ROUTING,
        State.CONNECTING,
        State.LOGGING_IN,
        State.SPLICED,
        State.DRAINING,
        State.CLOSED,
    ]


def test_a_refused_login_goes_back_to_reading_commands() -> None:
    for asking in ([Input.ROUTE], [Input.ROUTE, Input.CONNECT], [Input.ROUTE, Input.CONNECT, Input.LOG_IN]):
        for outcome in (Input.REFUSED, Input.UNAVAILABLE):
            machine = SessionMachine()
            machine.fire(Input.GREET)
            for event in asking:
                machine.fire(event)
            assert machine.asking
            assert machine.fire(outcome) is State.PRE_LOGIN
            assert not machine.asking


def test_splice_and_tls_listeners_route_without_a_greeting() -> None:
    spliced = SessionMachine()
    assert [spliced.fire(e) for e in (Input.ROUTE, Input.CONNECT, Input.SPLICE)] == [
        State.ROUTING,
        State.CONNECTING,
        State.SPLICED,
    ]
    terminated = SessionMachine()
    assert [terminated.fire(e) for e in (Input.BEGIN_TLS, Input.ROUTE)] == [State.TLS_HANDSHAKE, State.ROUTING]


@pytest.mark.parametrize(
    ("path", "illegal"),
    [
        # The recipient-vetting bypass class: state changing on the client's word.
        ([Input.GREET, Input.ROUTE], Input.ROUTE),  # a second login while one is in flight
        ([Input.GREET], Input.REFUSED),  # refused with nothing asked
        ([Input.GREET], Input.SPLICE),  # spliced without routing
        ([Input.GREET, Input.ROUTE, Input.CONNECT, Input.LOG_IN, Input.RELAY], Input.ROUTE),  # a login after hand-off
        ([Input.GREET, Input.STARTTLS], Input.STARTTLS),  # STARTTLS twice
        ([Input.GREET, Input.STARTTLS], Input.ROUTE),  # a login inside the handshake
        ([], Input.TLS_ESTABLISHED),  # a STARTTLS handshake never asked for
        ([Input.GREET, Input.CLOSE], Input.GREET),  # anything but the end once closing
        ([Input.LOST], Input.LOST),  # lost twice
    ],
)
def test_impossible_transitions_raise(path: list[Input], illegal: Input) -> None:
    machine = SessionMachine()
    for event in path:
        machine.fire(event)
    before = machine.state
    assert not machine.can(illegal)
    with pytest.raises(IllegalTransition, match=illegal.value):
        machine.fire(illegal)
    assert machine.state is before


def test_every_live_state_can_close_and_every_state_but_closed_be_lost() -> None:
    for state in State:
        assert ((state, Input.CLOSE) in TRANSITIONS) == (state not in (State.DRAINING, State.CLOSED))
        assert ((state, Input.LOST) in TRANSITIONS) == (state is not State.CLOSED)


def test_every_state_is_reachable_from_accepted() -> None:
    reached, frontier = {State.ACCEPTED}, [State.ACCEPTED]
    while frontier:
        state = frontier.pop()
        for (before, _), after in TRANSITIONS.items():
            if before is state and after not in reached:
                reached.add(after)
                frontier.append(after)
    assert reached == set(State)


def test_observers_see_each_change() -> None:
    seen: list[tuple[State, Input, State]] = []
    machine = SessionMachine(on_change=lambda *change: seen.append(change))
    machine.fire(Input.GREET)
    assert seen == [(State.ACCEPTED, Input.GREET, State.PRE_LOGIN)]
