"""
The reactor for mailrelay's processes: Twisted's epoll reactor without a logging context
per readiness event.

Twisted's reactors run each readiness event inside `log.callWithLogger`, so that a
legacy `twisted.python.log` message written while handling it carries the selectable's
`logPrefix()`; that copies the logging context's dictionary for every read and every
write, about a tenth of the instructions of a short spliced session. mailrelay logs
through `twisted.logger`, whose events say where they come from themselves, so its
lines read the same without that context; only a legacy message from Twisted itself
(an unhandled error in a protocol) loses the prefix naming its connection.

`twistd --reactor mailrelay mailrelay ...` runs on it (the reactor plugin in
`twisted/plugins/mailrelay_reactor.py`); the workers a supervisor starts
(`workers = N`) run on it wherever epoll exists.
"""

from __future__ import annotations

from twisted.internet.epollreactor import EPollReactor
from twisted.internet.main import installReactor

__all__ = ["LeanEPollReactor", "install"]


class LeanEPollReactor(EPollReactor):
    """`EPollReactor`, handing each event straight to its selectable."""

    def doPoll(self, timeout: float | None) -> None:
        try:
            # As many events as there are selectables, at most, as Twisted's does.
            events = self._poller.poll(-1 if timeout is None else timeout, len(self._selectables))
        except InterruptedError:  # a signal: the reactor's loop comes round again
            return
        selectables, handle = self._selectables, self._doReadOrWrite
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is not None:  # gone since the poll: an earlier event closed it
                handle(selectable, fd, event)

    doIteration = doPoll


def install() -> None:
    """Install `LeanEPollReactor` as the process's reactor (before anything imports
    `twisted.internet.reactor`)."""
    installReactor(LeanEPollReactor())
