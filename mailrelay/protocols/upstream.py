"""
Where an upstream login (`mailrelay.core.login`: I/O-free dialogues) meets a connection:
`run_dialogue()` runs any dialogue on an `UpstreamProtocol`, and `login_steps()` makes a
protocol's login the connector's two steps (`connector.LoginStep`, `StartTLSStep`).

Bytes the upstream sends past the end of a dialogue stay in `UpstreamProtocol.pending`,
ahead of anything that arrives later: they reach the client when the splice starts (SMTP
auth "none" leaves the upstream's answer to the client's RCPT unread for it), and the
connector refuses a STARTTLS route whose upstream sent anything after its go-ahead.
"""

from __future__ import annotations

from typing import Any, TypeVar, cast

from ..connector import LoginStep, StartTLSStep, UpstreamProtocol
from ..core.dialogue import Conversation, Dialogue
from ..core.login import UpstreamLogin
from ..router import Route

T = TypeVar("T")


async def run_dialogue(dialogue: Dialogue[T], upstream: UpstreamProtocol) -> T:
    """
    Run `dialogue` on `upstream` to its end; its result. What it raises (`Reject`,
    `UpstreamProtocolError`) goes through, as does `PeerClosed` when the upstream closes
    before the dialogue has what it waits for. Before each wait `upstream.stage` says
    what is awaited, for the connector's deadline. Cancellable at any wait.
    """
    conversation = Conversation(dialogue)
    out = conversation.start()
    while True:
        if out:
            upstream.write(out)
        if conversation.finished:
            break
        while not upstream.pending:
            upstream.stage = conversation.stage
            await upstream.more()
        data = bytes(upstream.pending)
        upstream.pending.clear()
        upstream.pendingConsumed()
        out = conversation.receive(data)
    # What came after the dialogue's last answer was not for it: it goes first.
    upstream.pending[:0] = conversation.leftover()
    return cast(T, conversation.result)


def login_steps(login: UpstreamLogin[Any, Any]) -> tuple[LoginStep, StartTLSStep]:
    """The connector's login and STARTTLS steps for `login`. The connector runs them on
    one connection per route: on each new connection `login` starts afresh."""
    last: UpstreamProtocol | None = None

    def on(upstream: UpstreamProtocol) -> None:
        nonlocal last
        if upstream is not last:
            last = upstream
            login.new_connection()

    async def log_in(upstream: UpstreamProtocol, route: Route) -> None:
        on(upstream)
        await run_dialogue(login.login(route), upstream)

    async def starttls(upstream: UpstreamProtocol, route: Route) -> None:
        on(upstream)
        await run_dialogue(login.starttls(route), upstream)

    return log_in, starttls
