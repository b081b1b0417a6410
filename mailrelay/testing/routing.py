"""
Asking a Router in a test: a `RouteRequest` with sensible defaults, the proxy's own way
of asking (`resolve`), and a Router that records what it was asked.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any, cast, get_args

import attrs
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from zope.interface import implementer

from ..ask import ask_router
from ..router import MODES, PROTOCOLS, AuthMethod, IRouter, Route, RouteRequest

__all__ = ["CLIENT", "RecordingRouter", "local_address", "resolve", "route_request"]

CLIENT = ("192.0.2.10", 50000)
"""The default client address (TEST-NET-1, RFC 5737)."""
LOCAL_HOST = "192.0.2.1"
"""The default address mailrelay listens on."""

_FIELDS = tuple(attrs.fields_dict(RouteRequest))
_AUTH_METHODS = get_args(AuthMethod)


def local_address(protocol: str, mode: str) -> tuple[str, int]:
    """Where a client of a `protocol` listener in `mode` usually connects: 587 for SMTP
    submission with STARTTLS, 465 SMTPS, 143 / 993 IMAP, 110 / 995 POP3, 25 otherwise."""
    ports = {
        "smtp": {"starttls": 587, "tls": 465},
        "imap": {"starttls": 143, "tls": 993, "splice": 143},
        "pop3": {"starttls": 110, "tls": 995, "splice": 110},
    }
    return (LOCAL_HOST, ports.get(protocol, {}).get(mode, 25))


def _check_names(function: str, names: Any) -> None:
    for name in names:
        if name not in _FIELDS:
            close = difflib.get_close_matches(name, _FIELDS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; RouteRequest's fields are {', '.join(_FIELDS)}"
            raise TypeError(f"{function}() got {name!r}, which is not a RouteRequest field{hint}")


def route_request(**fields: Any) -> RouteRequest:
    """
    A `RouteRequest` as a listener would make it, with `fields` replacing the defaults:

    - `listener="test"`, `protocol="imap"`, `mode="starttls"`;
    - `client=("192.0.2.10", 50000)`, `local` the usual port of the protocol and mode
      on 192.0.2.1 (`("192.0.2.1", 143)` for IMAP with STARTTLS, 587 for SMTP...);
    - `tls` true in `mode="tls"` (the client's TLS is terminated at accept), else false;
    - `auth_method="plain"` when a `password` is given (a password login: IMAP LOGIN and
      POP3 USER/PASS reach Routers so too), else `"none"`;
    - every other field None, and `attempt=1`.

    A name that is not a RouteRequest field is a TypeError (naming the closest field),
    and a `protocol`, `mode` or `auth_method` that a listener never sends a ValueError:
    a typo fails the test instead of asking about something else.
    """
    _check_names("route_request", fields)
    protocol = fields.get("protocol", "imap")
    mode = fields.get("mode", "starttls")
    for name, value, choices in (
        ("protocol", protocol, PROTOCOLS),
        ("mode", mode, MODES),
        ("auth_method", fields.get("auth_method", "none"), _AUTH_METHODS),
    ):
        if value not in choices:
            raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, not {value!r}")
    values: dict[str, Any] = {
        "listener": "test",
        "protocol": protocol,
        "mode": mode,
        "client": CLIENT,
        "local": local_address(protocol, mode),
        "tls": mode == "tls",
        "auth_method": "plain" if fields.get("password") is not None else "none",
    }
    values.update(fields)
    return RouteRequest(**values)


def resolve(
    router: object,
    request: RouteRequest | None = None,
    *,
    clock: Clock | None = None,
    router_timeout: float = 30.0,
    **fields: Any,
) -> list[Route]:
    """
    Ask `router` about `request` the way a listener does (`mailrelay.router.ask_router`)
    and return the Routes it answered, as a list (the connector tries them in order).

    `router` is an `IRouter` provider or any object with a `route(request)` method; it
    may answer with a Route or a list of them, directly, from a coroutine or through a
    Deferred. Without `request`, one is made with `route_request(**fields)`; with both,
    `fields` replace those of `request`.

    Raises what the listener would get: the Router's `Reject` (its decision: inspect
    `message`, `wait`, `code`, `close`), or `RouterError` for anything else — an
    exception (kept as `__cause__`), an answer that is not Routes, a password login
    answered with a `login = "xclient"` or `"none"` route by a router that does not
    declare `verifies_passwords`, or no answer within `router_timeout` seconds.

    Runs synchronously, with no reactor: an answer that is not ready at once is waited
    for on `clock` (a fresh `task.Clock` unless given; pass the clock your router
    schedules on), which is moved from one scheduled call to the next until the router
    answers or `router_timeout` passes. A router that waits on real I/O (a socket, a
    thread) therefore times out here: test it with `ask_router` in an asynchronous test.
    """
    if request is None:
        request = route_request(**fields)
    elif fields:
        _check_names("resolve", fields)
        request = attrs.evolve(request, **fields)
    clock = clock if clock is not None else Clock()
    asking = ask_router(cast(IRouter, router), request, clock, router_timeout)
    while not asking.called:
        due = [call.getTime() for call in clock.getDelayedCalls()]
        if not due:  # cannot happen while ask_router's own timeout is pending
            break
        clock.advance(max(0.0, min(due) - clock.seconds()))
    results: list[Any] = []
    asking.addBoth(results.append)
    if not results:
        raise AssertionError("the router's answer never came, and its timeout did not fire")
    result = results[0]
    if isinstance(result, Failure):
        result.raiseException()
    return cast(list[Route], result)


Answer = Route | list[Route] | tuple[Route, ...] | BaseException


@implementer(IRouter)
class RecordingRouter:
    """
    A Router that records every request it is asked about (`requests`, oldest first)
    and answers each with `answer`: a Route or a list of them, an exception to raise
    (a `Reject`, a `RouterError`, anything), or a callable taking the `RouteRequest`
    and returning or raising one of those — or an awaitable or Deferred of one.

    `verifies_passwords` is what the router declares (see `IRouter`): only a router
    that says it checks passwords may answer a password login with `login = "xclient"`
    or `"none"` routes.
    """

    def __init__(self, answer: Answer | Callable[[RouteRequest], Any], *, verifies_passwords: bool = False) -> None:
        self.answer = answer
        self.verifies_passwords = verifies_passwords
        self.requests: list[RouteRequest] = []

    def route(self, request: RouteRequest) -> Any:
        self.requests.append(request)
        answer = self.answer(request) if callable(self.answer) else self.answer
        if isinstance(answer, BaseException):
            raise answer
        return answer
