"""What the bytes-only tests of the protocol cores (tests/test_core_*.py) share: a core
of a listener's settings, and the events it returns split into writes and the rest."""

from __future__ import annotations

from typing import Any, TypeVar

from mailrelay.core.events import Event, Send
from mailrelay.core.facts import ConnectionFacts
from mailrelay.core.frontend import FrontEndCore
from mailrelay.core.settings import FrontEndConfig

C = TypeVar("C", bound=FrontEndCore)


def make_core(core_class: type[C], port: int, mode: str = "starttls", starttls_available: bool = True, **config: Any) -> C:
    """A core for a client of 192.0.2.7 on a listener at 192.0.2.1:`port` whose settings
    are `config` (lists made tuples, as the configuration makes them)."""
    settings: dict[str, Any] = {key: tuple(value) if isinstance(value, list) else value for key, value in config.items()}
    return core_class(
        FrontEndConfig(**settings),
        ConnectionFacts(
            client=("192.0.2.7", 50000),
            local=("192.0.2.1", port),
            mode=mode,
            starttls_available=starttls_available,
            session_id="s1",
        ),
    )


def sent(events: list[Event]) -> bytes:
    """What the events write to the client."""
    return b"".join(e.data for e in events if isinstance(e, Send))


def others(events: list[Event]) -> list[Event]:
    """The events that are not writes."""
    return [e for e in events if not isinstance(e, Send)]
