"""The one way mailrelay stops a timer it may or may not have started."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from twisted.internet.interfaces import IDelayedCall


def cancel(call: IDelayedCall | None) -> None:
    """Cancel `call` if it is still pending; None or a call that fired or was cancelled
    is fine (a timer's owner then sets its attribute to None)."""
    if call is not None and call.active():
        call.cancel()
