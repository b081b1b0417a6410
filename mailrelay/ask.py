"""
Asking a Router: the one place that calls one, in whatever style it answers (directly,
a coroutine, a Deferred), with a deadline, and turning anything but Routes or a
`Reject` into a `RouterError`. The contract itself (`RouteRequest`, `Route`, `Reject`,
`IRouter`) is `mailrelay.router`, which imports no Twisted.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, TimeoutError, maybeDeferred
from twisted.internet.interfaces import IReactorTime

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


def ask_router(router: IRouter, request: RouteRequest, clock: IReactorTime, timeout: float) -> Deferred[list[Route]]:
    """
    Ask `router` about `request`, whatever style it answers in.

    Fires with a non-empty list of Routes, or fails with `Reject` (the Router's
    decision) or `RouterError` (anything else: an exception, an answer of the wrong
    type, no answer within `timeout` seconds, a password login answered with a route
    on which no one checks the password: `refuse_unchecked_login`). Cancelling the
    result cancels the Router's pending Deferred or coroutine.
    """

    def failed(failure: Any) -> Any:
        if failure.check(Reject, RouterError, CancelledError):
            return failure
        if failure.check(TimeoutError):
            raise RouterError(f"router did not answer within {timeout:g}s")
        raise RouterError(f"router raised {failure.value!r}") from failure.value

    d = call_router(router, request)
    d.addTimeout(timeout, clock)
    d.addCallbacks(as_routes, failed)
    d.addCallback(lambda routes: refuse_unchecked_login(router, request, routes))
    return d


async def _await(awaitable: Awaitable[Any]) -> Any:
    return await awaitable
