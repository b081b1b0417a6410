"""
Testing Routers and listener configurations, in memory (as `treq.testing` does for
HTTP clients). docs/testing.md is the guide.

- `route_request(**fields)`: a `RouteRequest` with sensible defaults; a typo is an error.
- `resolve(router, request=None, **fields)`: ask a Router the way a listener does, with
  no reactor; the Routes, or the `Reject` / `RouterError` the listener would get.
- `RecordingRouter(answer)`: a Router that records its requests and answers as told.
- `converse(listener, router, client_lines, upstream=...)`: a whole client session
  through a listener built from its configuration, against a `ScriptedUpstream`, with
  no socket; returns a `Transcript` of the bytes each side heard and the session's
  outcome.
"""

from .conversation import Pause, Transcript, converse
from .routing import RecordingRouter, resolve, route_request
from .upstream import Hangup, ScriptedUpstream

__all__ = [
    "Hangup",
    "Pause",
    "RecordingRouter",
    "ScriptedUpstream",
    "Transcript",
    "converse",
    "resolve",
    "route_request",
]
