"""
Asking a Router: the one place that calls one, in whatever style it answers (directly,
a coroutine, a Deferred), with a deadline, and turning anything but Routes or a
`Reject` into a `RouterError`. The contract itself (`RouteRequest`, `Route`, `Reject`,
`IRouter`) is `mailrelay.router`, which imports no Twisted.

An answer that is known at once (a static route, a route map's rule without a
password, a cached login: a Router that returns, a coroutine that returns without
waiting, a Deferred that has fired) is used at once by `ask_router_now`: no timer, no
callbacks. Only an answer
that must be waited for goes through a Deferred with the deadline. Both are judged by
the same code (`_failed`, `_checked`), so a Router is answered alike either way.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, TimeoutError, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from .router import IRouter, Reject, Route, RouteRequest, RouterError, as_routes, refuse_unchecked_login


def call_router(router: IRouter, request: RouteRequest) -> Deferred[Any]:
    """`router.route(request)` as a Deferred, whether it answered directly, with an
    awaitable or with a Deferred (a router wrapping another calls it this way)."""

    def call() -> Any:
        answer = router.route(request)
        if isinstance(answer, Deferred):
            return answer
        if inspect.isawaitable(answer):
            return Deferred.fromCoroutine(_await(answer))
        return answer

    return maybeDeferred(call)


def ask_router_now(
    router: IRouter, request: RouteRequest, clock: IReactorTime, timeout: float
) -> list[Route] | Deferred[list[Route]]:
    """
    Ask `router` about `request`, whatever style it answers in: the Routes at once
    when the answer is known at once (no Deferred, no timer), else a Deferred of them.

    Either way the result is a non-empty list of Routes, or `Reject` (the Router's
    decision) or `RouterError` (anything else: an exception, an answer of the wrong
    type, no answer within `timeout` seconds, a password login answered with a route
    on which no one checks the password: `refuse_unchecked_login`), raised at once or
    failing the Deferred. Cancelling the Deferred cancels the Router's pending
    Deferred or coroutine.
    """
    try:
        answer = router.route(request)
        if inspect.iscoroutine(answer):
            answer = Deferred.fromCoroutine(answer)  # runs it until it waits, if it does
        elif inspect.isawaitable(answer) and not isinstance(answer, Deferred):
            answer = Deferred.fromCoroutine(_await(answer))
        if isinstance(answer, Deferred) and answer.called and not answer.paused:
            answer = _result_now(answer)  # it did not wait: known at once after all
    except Exception as e:
        failed = _failed(e, timeout)
        raise failed from failed.__cause__
    if isinstance(answer, Deferred):
        waiting: Deferred[Any] = answer
        waiting.addTimeout(timeout, clock)
        waiting.addErrback(_failed_later, timeout)
        return waiting.addCallback(_checked, router, request)
    return _checked(answer, router, request)


def _result_now(fired: Deferred[Any]) -> Any:
    """What a Deferred that has fired holds: its result, or its failure raised."""
    result = fired.result
    if isinstance(result, Failure):
        fired.addErrback(lambda _: None)  # handled here: not an unhandled error when it is collected
        result.raiseException()
    return result


def ask_router(router: IRouter, request: RouteRequest, clock: IReactorTime, timeout: float) -> Deferred[list[Route]]:
    """`ask_router_now` as a Deferred, always (fired already when the answer was known at once)."""
    try:
        answer = ask_router_now(router, request, clock, timeout)
    except Exception:
        return fail()
    return answer if isinstance(answer, Deferred) else succeed(answer)


def _checked(answer: object, router: IRouter, request: RouteRequest) -> list[Route]:
    return refuse_unchecked_login(router, request, as_routes(answer))


def _failed(error: BaseException, timeout: float) -> BaseException:
    """What a Router's failure is to its caller: its own `Reject` or `RouterError` (and
    a cancellation) as it is, anything else a `RouterError` (caused by what the Router
    raised: its author needs the traceback)."""
    if isinstance(error, (Reject, RouterError, CancelledError)):
        return error
    if isinstance(error, TimeoutError):
        return RouterError(f"router did not answer within {timeout:g}s")
    failed = RouterError(f"router raised {error!r}")
    failed.__cause__ = error
    return failed


def _failed_later(failure: Failure, timeout: float) -> Any:
    assert failure.value is not None
    raise _failed(failure.value, timeout)


async def _await(awaitable: Awaitable[Any]) -> Any:
    return await awaitable
