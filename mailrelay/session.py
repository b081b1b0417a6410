"""
Sessions in flight: their one summary log line, and draining them on shutdown.

Each session logs exactly one line when it ends:

    session 3f9a1c07 listener=imap client=192.0.2.7:51514 user=- upstream=10.0.0.5:143
    up=5120 down=88211 duration=12.041s outcome=closed

`up` counts bytes from the client to the upstream, `down` the other way. `outcome` is
`closed` (spliced, then ended by a peer), `rejected`, `router-error`,
`upstream-unavailable`, `client-gone` (the client left before the splice),
`throttled` (past the login limits), `tls-failed`, `protocol-error`, `idle-timeout`,
`login-timeout` (not logged in within the listener's `login_deadline`),
`drain-timeout` or `error`. A `reason` field follows when one is
known. No credential is ever a field of this line, and the user name is shown through
`logtext.loggable()`: control characters escaped, length bounded.

With `[log] sessions = "json"` the line is one JSON object with the same fields
(`session_id`, `listener`, `client`, `user`, `upstream`, `bytes_up`, `bytes_down`,
`duration`, `outcome`, `reason`; null for a missing user, upstream or reason), all of
it ASCII: no field, whatever a client put in it, can end the line or forge a record.

The line is one `twisted.logger` event whose text is formatted once, when the session
ends, into its `session_line` field (its `log_format` is `{session_line}`: an observer
formats one field, not eleven); the event carries every field above as well (`reason`
None when there is none), for observers that read fields rather than text.

Each session is counted in the service's `metrics` as it opens and ends; the bytes it
carries are counted while they flow (`Sessions.report_traffic()`).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from .logtext import loggable
from .metrics import NO_METRICS, Metrics
from .router import Address, format_address
from .timers import cancel

SESSION_LINE = (
    "session {session_id} listener={listener} client={client} user={user} upstream={upstream}"
    " up={bytes_up} down={bytes_down} duration={duration:.3f}s outcome={outcome}{reason_text}"
)
"""The session line's text (the event's `session_line` field), one field of the event each."""
LINE_FORMAT = "{session_line}"
"""The session event's `log_format`: its text, formatted once when the session ends
(`SESSION_LINE`, or with `[log] sessions = "json"` one JSON object), so that an observer
formats one field, not eleven; the line's fields are in the event as well."""


class Session:
    """One client connection, from accept to close."""

    log = Logger()

    def __init__(
        self, registry: Sessions, listener: str, client: Address, abort: Callable[[str], None], quiet: bool = False
    ) -> None:
        self.id = secrets.token_hex(4)
        self.quiet = quiet
        """A balancer's health check: its line is debug, not info, when it ends `closed`."""
        self.listener = listener
        self.client = client
        self.user: str | None = None
        self.upstream: str | None = None
        self.bytes_up = 0
        self.bytes_down = 0
        self._registry = registry
        self._abort = abort
        self._started = registry.clock.seconds()
        self.ended: Deferred[None] = Deferred()
        self.traffic: Callable[[], tuple[int, int]] | None = None
        """Bytes carried so far (up, down), while a relay carries the session."""
        self._reported = (0, 0)
        """Bytes already counted in the metrics (up, down)."""
        registry.metrics.session_opened(listener)

    def report_traffic(self) -> None:
        """Count in the metrics the bytes carried since the last report."""
        if self.traffic is not None:
            self._report(*self.traffic())

    def _report(self, up: int, down: int) -> None:
        reported_up, reported_down = self._reported
        if up > reported_up or down > reported_down:
            self._registry.metrics.carried(self.listener, max(0, up - reported_up), max(0, down - reported_down))
            self._reported = (max(up, reported_up), max(down, reported_down))

    def abort(self, outcome: str) -> None:
        """End the session now; `outcome` is what its log line will say."""
        self._abort(outcome)

    def finish(self, outcome: str, reason: str | None = None) -> None:
        """Log the session's line and forget it; later calls are ignored."""
        if self.ended.called:
            return
        # Counted before the line is written: whoever reads the line (a test, a
        # supervisor relaying a worker's log) finds the session in the metrics.
        self.traffic = None
        self._report(self.bytes_up, self.bytes_down)
        self._registry.metrics.session_ended(self.listener, outcome)
        duration = self._registry.clock.seconds() - self._started
        logger = self.log  # a new Logger at each access
        log = logger.warn
        if outcome == "closed":
            log = logger.debug if self.quiet else logger.info
        fields = dict(
            session_id=self.id,
            listener=self.listener,
            client=format_address(self.client),
            user=loggable(self.user),
            upstream=self.upstream or "-",
            bytes_up=self.bytes_up,
            bytes_down=self.bytes_down,
            duration=duration,
            outcome=outcome,
            reason=reason,
        )
        if self._registry.json_lines:
            text = session_json(fields, self.user, self.upstream)
        else:  # formatted here once by str.format, not field by field by each observer
            text = SESSION_LINE.format_map({**fields, "reason_text": f" reason={reason!r}" if reason else ""})
        log(LINE_FORMAT, session_line=text, **fields)
        self._registry.remove(self)
        self.ended.callback(None)


def session_json(fields: dict[str, Any], user: str | None, upstream: str | None) -> str:
    """The session line's `fields` as one line of ASCII JSON (`user`, `upstream`: the
    raw values, null when missing)."""
    shown = dict(fields)
    shown["duration"] = round(fields["duration"], 3)
    if user is None:
        shown["user"] = None
    if upstream is None:
        shown["upstream"] = None
    return json.dumps(shown, ensure_ascii=True, separators=(",", ":"))


class Sessions:
    """The sessions of one service, so that stopping it can wait for them."""

    def __init__(self, clock: IReactorTime, metrics: Metrics = NO_METRICS, json_lines: bool = False) -> None:
        """`metrics`: where sessions are counted; `json_lines`: write session lines as JSON."""
        self.clock = clock
        self.metrics = metrics
        self.json_lines = json_lines
        self._open: set[Session] = set()

    def __len__(self) -> int:
        return len(self._open)

    def open(self, listener: str, client: Address, abort: Callable[[str], None], quiet: bool = False) -> Session:
        session = Session(self, listener, client, abort, quiet)
        self._open.add(session)
        return session

    def remove(self, session: Session) -> None:
        self._open.discard(session)

    def report_traffic(self) -> None:
        """Count in the metrics the bytes every open session carried since its last report."""
        for session in list(self._open):
            session.report_traffic()

    def drain(self, timeout: float) -> Deferred[Any]:
        """Fire when every open session has ended, aborting those left after `timeout`."""
        if not self._open:
            return succeed(None)
        waiting = DeferredList([s.ended for s in self._open])
        call = self.clock.callLater(timeout, self._abort_all)
        waiting.addBoth(lambda result: cancel(call))
        return waiting

    def _abort_all(self) -> None:
        for session in list(self._open):
            session.abort("drain-timeout")
