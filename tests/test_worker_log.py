"""A worker's log observer: lines leave in one write per reactor turn while it runs."""

from __future__ import annotations

import io

from twisted.internet.task import Clock
from twisted.logger import Logger, LogPublisher

from mailrelay.worker import WorkerLogObserver


class CountingOut(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.flushes = 0

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


class RunningClock(Clock):
    running = True


def logger_to(observer: WorkerLogObserver) -> Logger:
    publisher = LogPublisher(observer)
    return Logger(namespace="test", observer=publisher)


def test_lines_of_one_reactor_turn_leave_in_one_flush() -> None:
    out, clock = CountingOut(), RunningClock()
    log = logger_to(WorkerLogObserver(out, clock))

    for number in range(3):
        log.info("session {number}", number=number)
    log.warn("a warning")

    assert out.flushes == 0  # not yet: the turn is not over
    clock.advance(0)
    assert out.flushes == 1
    assert out.getvalue() == "info session 0\ninfo session 1\ninfo session 2\nwarn a warning\n"
    assert clock.getDelayedCalls() == []


def test_without_a_running_reactor_each_event_is_written_at_once() -> None:
    out, clock = CountingOut(), RunningClock()
    clock.running = False
    log = logger_to(WorkerLogObserver(out, clock))

    log.error("invalid configuration: {line}", line="listener[0].mode: missing")

    assert out.flushes == 1
    assert out.getvalue() == "error invalid configuration: listener[0].mode: missing\n"
