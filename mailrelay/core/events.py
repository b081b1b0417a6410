"""
What a front-end core asks its shell to do. A core returns a list of these from each
call; the shell performs them in order.
"""

from __future__ import annotations

from typing import Any

import attrs


@attrs.frozen
class Send:
    """Write these bytes to the client."""

    data: bytes = attrs.field(repr=False)  # a SASL challenge, a reply: never logged whole


@attrs.frozen
class StartTLS:
    """Start the server side of TLS now (the go-ahead was the `Send` before this)."""


@attrs.frozen
class Route:
    """Ask the Router where the session goes, and log in there. `facts` are the
    RouteRequest fields the protocol learnt (user, password, auth_method, helo...)."""

    facts: dict[str, Any] = attrs.field(repr=False)  # holds the password


@attrs.frozen
class Discarded:
    """`count` bytes the client sent in plaintext behind STARTTLS were thrown away
    (a command injection attempt, or a broken client): worth a warning."""

    count: int


@attrs.frozen
class LoginRefused:
    """A login failed and counts towards `max_attempts`: worth an info line naming the
    user and the client (what fail2ban watches)."""

    why: str
    attempt: int
    max_attempts: int


@attrs.frozen
class Close:
    """End the session: close the connection once what was written has gone out. The
    session line says `outcome` and `reason`."""

    outcome: str
    reason: str


Event = Send | StartTLS | Route | Discarded | LoginRefused | Close
