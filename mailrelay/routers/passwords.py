"""
Password checks of a map rule's `password` hash (bcrypt or argon2): slow on purpose, so
run in the reactor's thread pool, a bounded number at once with a bounded queue.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import argon2
import bcrypt
from twisted.internet.defer import CancelledError, Deferred, DeferredSemaphore, fail, maybeDeferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure

from ..router import RouterError

Verify = Callable[[str, str], "Deferred[bool]"]
"""`verify(hash, password)`: fires with whether `password` matches `hash`."""

DEFAULT_MAX_HASH_CHECKS = 4
DEFAULT_MAX_HASH_QUEUE = 100

_BCRYPT = re.compile(r"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")
_ARGON2_PREFIXES = ("$argon2id$", "$argon2i$")
_argon2 = argon2.PasswordHasher()


def hash_error(value: str) -> str | None:
    """Why `value` is not a usable password hash, or None; never quotes `value`."""
    if value.startswith(("$2a$", "$2b$", "$2y$")):
        return None if _BCRYPT.fullmatch(value) else "is not a well-formed bcrypt hash"
    if value.startswith(_ARGON2_PREFIXES):
        try:
            argon2.extract_parameters(value)
        except argon2.exceptions.InvalidHashError:
            return "is not a well-formed argon2 hash"
        return None
    return "must be a bcrypt ($2b$...) or argon2 ($argon2id$...) hash, not a plaintext password"


def verify_password(hashed: str, password: str) -> bool:
    """Whether `password` matches a bcrypt or argon2 `hashed`; blocking and slow on purpose."""
    try:
        secret = password.encode("utf-8")
    except UnicodeError:
        return False
    if hashed.startswith("$2"):
        try:
            return bcrypt.checkpw(secret, hashed.encode("ascii"))
        except ValueError:  # bcrypt 5 refuses passwords longer than 72 bytes
            return False
    try:
        return _argon2.verify(hashed, secret)
    except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
        return False


def threaded_verify(reactor: Any, max_checks: int = DEFAULT_MAX_HASH_CHECKS, max_queue: int = DEFAULT_MAX_HASH_QUEUE) -> Verify:
    """`verify_password` in `reactor`'s thread pool, so that hashing never blocks the
    reactor, at most `max_checks` at once and `max_queue` waiting (`bounded_verify`)."""

    def verify(hashed: str, password: str) -> Deferred[bool]:
        return deferToThreadPool(reactor, reactor.getThreadPool(), verify_password, hashed, password)

    return bounded_verify(verify, max_checks, max_queue)


def bounded_verify(verify: Verify, max_checks: int, max_queue: int) -> Verify:
    """
    `verify` run at most `max_checks` at once, with at most `max_queue` checks waiting
    for their turn; one more fails at once with RouterError.

    Invariant: no more than `max_checks` checks of `verify` are ever running, even when
    their callers give up: a check that is cancelled while it waits leaves the queue, one
    cancelled while it runs (a thread cannot be stopped) keeps its turn until it ends.
    """
    turns = DeferredSemaphore(max_checks)

    def bounded(hashed: str, password: str) -> Deferred[bool]:
        if turns.tokens == 0 and len(turns.waiting) >= max_queue:
            return fail(RouterError(f"password checks busy: {max_checks} running, {max_queue} waiting"))

        turn = turns.acquire()
        # Cancelling the answer takes a waiting check out of the queue (`turn.cancel()`);
        # a running one goes on, its turn held until it ends.
        answer: Deferred[bool] = Deferred(canceller=lambda _: turn.cancel())

        def ended(result: bool | Failure) -> None:
            turns.release()
            if answer.called:
                return None  # the caller gave up (a failure is dropped with it)
            if isinstance(result, Failure):
                answer.errback(result)
            else:
                answer.callback(result)

        def run(_: object) -> None:
            maybeDeferred(verify, hashed, password).addBoth(ended)

        turn.addCallbacks(run, lambda failure: failure.trap(CancelledError))
        return answer

    return bounded
