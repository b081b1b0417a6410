"""
Fault injection (issue #14, "Reliability"): real sockets, scripted peers, mailrelay
running in this process with every deadline set to `TIMEOUT`.

Three families of cases, each generated over a matrix so that every test's name says
its case (`test_reset_at_login_then_fallback` in `SMTPUpstreamFaults`):

- the upstream fails at each point of mailrelay's login (`faults_peers.POINTS`: reset,
  hang, half-close, garbage, plaintext where TLS is due), alone (the client gets its
  protocol's "temporarily unavailable") or before a good second route (which is tried,
  and the client logged in there);
- the auth service (`type = "http"`) is slow, down, broken or ambiguous;
- the client goes away (close or reset) at each stage of its session.

Every case ends with the same check (`FaultTestCase.check_case`): the session line is
logged, no session, timer or file descriptor is left behind, and a good session
still works.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import pytest

from tests.support.faults import LONG, TIMEOUT, FaultTestCase, SwitchRouter
from tests.support.faults_auth import AUTH_FAULTS, AuthService
from tests.support.faults_clients import DIALECTS, Client, Transcript, session
from tests.support.faults_peers import POINTS, ScriptedUpstream

# -- the matrices ----------------------------------------------------------------------------

GARBAGE_FAULTS = ("garbage-random", "garbage-long", "garbage-http")

FRONT_END_UPSTREAM_CASES: list[tuple[str, str | None]] = [
    ("refused", None),
    *(("reset", point) for point in POINTS),
    *(("hang", point) for point in ("accept", "starttls", "handshake", "login")),
    *(("half-close", point) for point in POINTS),
    *((garbage, point) for garbage in GARBAGE_FAULTS for point in ("accept", "login")),
    ("tls-garbage", "handshake"),
]
"""(fault, point) for the SMTP, IMAP and POP3 front-ends: every point of the login."""

SPLICE_UPSTREAM_CASES: list[tuple[str, str | None]] = [
    ("refused", None),
    ("reset", "accept"),
    ("half-close", "accept"),
    *((fault, "handshake") for fault in ("reset", "hang", "half-close", "tls-garbage")),
    ("reset", "splice"),
    ("half-close", "splice"),
]
"""(fault, point) behind a listener without a protocol: nothing is said before the
splice, so the points are the connection, the TLS handshake of a `tls` route, and the
splice."""

IMPLICIT_TLS_UPSTREAM_CASES: list[tuple[str, str | None]] = [
    ("refused", None),
    ("reset", "login"),
    ("half-close", "login"),
    ("reset", "splice"),
    ("half-close", "splice"),
]
"""(fault, point) for the front-ends on `tls` listeners: what differs is the client's
leg, which cannot be half-closed (an upstream's half-close ends it)."""

CLIENT_STAGES = ("handshake", "starttls-handshake", "greeting", "sasl", "router", "connecting", "upstream", "splice")
"""Where a front-end's client goes away: in the handshake of a `tls` listener, in the
handshake after STARTTLS, after the greeting, in a SASL exchange (a continuation is
due), while the Router decides, while mailrelay connects (a black hole) or logs in
upstream (an upstream that never greets), and in the splice."""
SPLICE_CLIENT_STAGES = ("handshake", "router", "connecting", "upstream", "splice")

KEPT_CONNECTION = {"twice": (1, 3), "length-short": (1, 3), "reset-reused": (2, 4)}
"""Auth service faults after which the router keeps the connection for the next login
(an idle keep-alive connection, with stale bytes on it, or reset when used again): the
connections and requests the service sees, warm-up included, by the end of that next
login."""

T = TypeVar("T")

KNOWN_BUGS: dict[str, str] = {}
"""Generated test name -> why it fails today (a bug in mailrelay/, reported, not fixed
here): such tests are marked xfail(strict=True)."""


def _name(*parts: str | None) -> str:
    return "test_" + "_".join(p for p in parts if p).replace("-", "_")


Case = tuple[str, Callable[..., Any], dict[str, Any], bool]
"""A generated test: its name, the runner it calls with its arguments, whether it is slow."""


def generate(cases: Iterable[Case]) -> Callable[[type[T]], type[T]]:
    """A class decorator adding a test method for each case."""

    def add(cls: type[T]) -> type[T]:
        for name, runner, arguments, slow in cases:

            def test(self: Any, runner: Callable[..., Any] = runner, arguments: dict[str, Any] = arguments) -> Any:
                return runner(self, **arguments)

            test.__name__ = test.__qualname__ = name
            test.__doc__ = f"{cls.__name__}: {arguments}"
            marked: Any = test
            if slow:
                marked = pytest.mark.slow(marked)
            bug = KNOWN_BUGS.get(f"{cls.__name__}.{name}")
            if bug is not None:
                marked = pytest.mark.xfail(strict=True, reason=bug)(marked)
            assert not hasattr(cls, name), name
            setattr(cls, name, marked)
        return cls

    return add


# -- upstream faults -------------------------------------------------------------------------


class UpstreamFaults(FaultTestCase):
    """An upstream that fails at one point of mailrelay's login or splice."""

    protocol: str
    mode = "starttls"

    def faulty_upstream(self, fault: str, point: str | None) -> tuple[int, str]:
        """The port of an upstream failing so, and the TLS its route asks for."""
        if fault == "refused":
            return self.refusing(), "none"
        tls = {"handshake": "tls", "starttls": "starttls"}.get(point or "", "none")
        script = ScriptedUpstream(
            self.protocol, point, fault, tls=self.upstream_tls if tls != "none" else None, implicit_tls=tls == "tls"
        )
        return self.server(script).port, tls

    async def upstream_case(self, fault: str, point: str | None, fallback: bool) -> None:
        case = f"{self.protocol} {self.mode} listener, upstream {fault}" + (f" at {point}" if point else "")
        case += ", then a good route" if fallback else ", the only route"
        dialect = DIALECTS[self.protocol]
        port, tls = self.faulty_upstream(fault, point)
        good = self.server(ScriptedUpstream(self.protocol))
        router = SwitchRouter([self.route(good.port)])
        await self.start(self.config(self.protocol, self.mode), router)
        context = self.context if self.mode == "tls" else None

        async def good_session() -> None:
            router.routes = [self.route(good.port)]
            heard: Transcript = await self.in_thread(session, Client(dialect, self.port, context))
            self.assertEqual(
                (heard.login, heard.probe, heard.error),
                (dialect.logged_in, dialect.probe_answer, None),
                f"{case}: a good session",
            )

        async def faulty_session() -> None:
            router.routes = [self.route(port, tls)] + ([self.route(good.port)] if fallback else [])
            lines = len(self.logs.sessions())
            heard: Transcript = await self.in_thread(session, Client(dialect, self.port, context))
            await self.until(lambda: len(self.logs.sessions()) > lines)
            outcome, reason = self.outcome()
            failures = self.upstream_failures(port)
            self.assertIsNone(heard.error, f"{case}: the client's connection was not closed cleanly")
            if point == "splice" or (self.protocol == "none" and point == "accept"):
                # Connected (and logged in): the fault reaches the client as the end of the
                # session. (A reset at accept may also come before the connect completes:
                # then the route failed.)
                self.assertEqual((heard.login, heard.probe, heard.rest), (dialect.logged_in, b"", b""), case)
                expected = {"closed", "upstream-unavailable"} if point == "accept" else {"closed"}
                self.assertIn(outcome, expected, f"{case}: {reason}")
                return
            self.assertTrue(failures, f"{case}: no warning logged for the failed route")
            if fault == "refused":
                self.assertEqual(failures, ["connection refused"], case)
            if fault == "hang":  # the route's login_timeout, naming what was awaited
                awaited = {"accept": "no greeting", "login": "no login reply"}.get(point or "", "TLS: no handshake")
                self.assertEqual(failures, [f"{awaited} within {TIMEOUT:g}s"], case)
            if fallback:
                self.assertEqual((heard.login, heard.probe), (dialect.logged_in, dialect.probe_answer), case)
                self.assertEqual(outcome, "closed", f"{case}: {reason}")
            else:
                self.assertEqual((heard.login, heard.probe), (dialect.unavailable, b""), case)
                self.assertEqual(outcome, "upstream-unavailable", f"{case}: {reason}")

        await self.check_case(case, faulty_session, good_session)


def upstream_cases(cases: list[tuple[str, str | None]], protocol: str) -> list[Case]:
    """Each (fault, point) alone, and before a good route where one could be tried."""
    generated = []
    for fault, point in cases:
        connected = point == "splice" or (protocol == "none" and point == "accept")
        for fallback in (False,) if connected else (False, True):
            name = _name(fault, "at" if point else None, point, "then_fallback" if fallback else None)
            arguments = {"fault": fault, "point": point, "fallback": fallback}
            generated.append((name, UpstreamFaults.upstream_case, arguments, fault == "hang"))
    return generated


@generate(upstream_cases(FRONT_END_UPSTREAM_CASES, "smtp"))
class SMTPUpstreamFaults(UpstreamFaults):
    protocol = "smtp"


@generate(upstream_cases(FRONT_END_UPSTREAM_CASES, "imap"))
class IMAPUpstreamFaults(UpstreamFaults):
    protocol = "imap"


@generate(upstream_cases(FRONT_END_UPSTREAM_CASES, "pop3"))
class POP3UpstreamFaults(UpstreamFaults):
    protocol = "pop3"


@generate(upstream_cases(IMPLICIT_TLS_UPSTREAM_CASES, "smtp"))
class SMTPSUpstreamFaults(UpstreamFaults):
    """The SMTP front-end on a `tls` listener (465): the client's leg is TLS."""

    protocol = "smtp"
    mode = "tls"


@generate(upstream_cases(IMPLICIT_TLS_UPSTREAM_CASES, "imap"))
class IMAPSUpstreamFaults(UpstreamFaults):
    protocol = "imap"
    mode = "tls"


@generate(upstream_cases(IMPLICIT_TLS_UPSTREAM_CASES, "pop3"))
class POP3SUpstreamFaults(UpstreamFaults):
    protocol = "pop3"
    mode = "tls"


@generate(upstream_cases(SPLICE_UPSTREAM_CASES, "none"))
class SpliceUpstreamFaults(UpstreamFaults):
    protocol = "none"
    mode = "splice"


@generate(upstream_cases(SPLICE_UPSTREAM_CASES, "none"))
class TLSUpstreamFaults(UpstreamFaults):
    """A `tls` listener without a protocol: the client's TLS ends at mailrelay."""

    protocol = "none"
    mode = "tls"


# -- auth service faults ---------------------------------------------------------------------


class AuthServiceFaults(FaultTestCase):
    """The `http` router's auth service failing. What it decides is in its answer's
    headers: a service that cannot be asked, or answers no decision, is the client's
    temporary failure; an answer whose headers are whole decides, however its body or
    what follows it on the connection is broken; an answer that was not to this
    request (a stale second one) never decides."""

    protocol: str

    async def auth_case(self, fault: str) -> None:
        case = f"{self.protocol} listener, auth service {fault}"
        dialect = DIALECTS[self.protocol]
        good = self.server(ScriptedUpstream(self.protocol))
        service = AuthService(good.port, self.refusing())
        auth = self.server(service)
        self.refusing(auth.port)  # refused, not taken by someone else, while the service is down
        router = {"type": "http", "url": f"http://127.0.0.1:{auth.port}/auth", "timeout": TIMEOUT}
        await self.start(self.config(self.protocol, router=router))

        async def good_session() -> None:
            heard: Transcript = await self.in_thread(session, Client(dialect, self.port))
            self.assertEqual(
                (heard.login, heard.probe, heard.error),
                (dialect.logged_in, dialect.probe_answer, None),
                f"{case}: a good session",
            )

        async def faulty_session() -> None:
            nonlocal auth
            service.fault = fault
            if fault == "down":
                auth.close()
            lines, connections = len(self.logs.sessions()), auth.connections
            try:
                heard: Transcript = await self.in_thread(session, Client(dialect, self.port))
            finally:
                service.fault = None
                if fault == "down":  # back where it was, for the good session
                    self.servers.remove(auth)
                    auth = self.server(service, port=auth.port)
            await self.until(lambda: len(self.logs.sessions()) > lines)
            outcome, reason = self.outcome()
            self.assertIsNone(heard.error, f"{case}: the client's connection was not closed cleanly")
            if fault in ("length-long", *KEPT_CONNECTION):  # the answer's headers were whole
                self.assertEqual((heard.login, heard.probe), (dialect.logged_in, dialect.probe_answer), case)
                self.assertEqual(outcome, "closed", f"{case}: {reason}")
            else:
                self.assertEqual((heard.login, heard.probe), (dialect.temporary, b""), case)
                self.assertEqual(outcome, "router-error", f"{case}: {reason}")
            if fault in KEPT_CONNECTION:
                # The router keeps the connection (an idle keep-alive one) and asks the next
                # login on it: that login must be decided by its own answer, not by stale
                # bytes, and a reset of the reused connection is retried on a new one.
                heard = await self.in_thread(session, Client(dialect, self.port))
                self.assertEqual((heard.login, heard.probe), (dialect.logged_in, dialect.probe_answer), f"{case}: the next login")
                self.assertEqual(
                    (auth.connections - connections, service.requests),
                    KEPT_CONNECTION[fault],
                    f"{case}: (connections, requests) seen by the service",
                )

        await self.check_case(case, faulty_session, good_session, sessions=2 if fault in KEPT_CONNECTION else 1)

    async def client_reset_case(self) -> None:
        """A client that resets while the service is asked cancels the request, and its
        connection is closed: with deadlines beyond the leak check's patience, nothing
        else would let go of it in time."""
        case = f"{self.protocol} listener, client reset while the auth service is asked"
        dialect = DIALECTS[self.protocol]
        good = self.server(ScriptedUpstream(self.protocol))
        service = AuthService(good.port, self.refusing())
        auth = self.server(service)
        router = {"type": "http", "url": f"http://127.0.0.1:{auth.port}/auth", "timeout": LONG}
        await self.start(self.config(self.protocol, router=router, timeout=LONG))

        async def good_session() -> None:
            heard: Transcript = await self.in_thread(session, Client(dialect, self.port))
            self.assertEqual((heard.login, heard.probe), (dialect.logged_in, dialect.probe_answer), f"{case}: a good session")

        async def faulty_session() -> None:
            service.fault = "slow"  # answers once mailrelay has closed the connection
            lines, requests = len(self.logs.sessions()), service.requests
            client = Client(dialect, self.port)
            self.addCleanup(client.close)
            await self.in_thread(client.connect)
            client.conn.sendall(dialect.login + b"\r\n")
            await self.until(lambda: service.requests > requests)
            client.reset()
            await self.until(lambda: len(self.logs.sessions()) > lines)
            service.fault = None
            self.assertEqual(self.outcome()[0], "client-gone", case)

        await self.check_case(case, faulty_session, good_session)


def auth_cases() -> list[Case]:
    cases: list[Case] = [
        (_name("auth_service", fault), AuthServiceFaults.auth_case, {"fault": fault}, fault == "slow") for fault in AUTH_FAULTS
    ]
    return [*cases, ("test_client_reset_while_the_auth_service_is_asked", AuthServiceFaults.client_reset_case, {}, False)]


@generate(auth_cases())
class SMTPAuthServiceFaults(AuthServiceFaults):
    protocol = "smtp"


@generate(auth_cases())
class IMAPAuthServiceFaults(AuthServiceFaults):
    protocol = "imap"


@generate(auth_cases())
class POP3AuthServiceFaults(AuthServiceFaults):
    protocol = "pop3"


# -- client faults ---------------------------------------------------------------------------


class ClientFaults(FaultTestCase):
    """The client going away (an end of stream, or a reset) at each stage of its session."""

    protocol: str

    def half_handshake(self, client: Client, starttls: bool) -> None:
        """Connect (and say STARTTLS), send a TLS ClientHello and read the server's
        first answer, leaving the handshake unfinished. Blocking."""
        if starttls:
            client.connect()
            self.assertEqual(client.command(client.dialect.starttls), client.dialect.go_ahead)
        else:
            client.connect(greet=False)
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = self.context.wrap_bio(incoming, outgoing, server_hostname="relay.test")
        try:
            tls.do_handshake()
        except ssl.SSLWantReadError:
            pass
        client.conn.sendall(outgoing.read())
        self.assertTrue(client.conn.recv(1 << 16), "no ServerHello")

    def expected_outcome(self, stage: str, how: str) -> set[str]:
        """How the session ends when its client goes `how` at `stage`. A reset before
        the splice cancels whatever was pending ("client-gone"); an end of stream is a
        half-close, after which mailrelay finishes what it was doing (a Router, a
        connect, an upstream login, each bounded by its deadline) and ends with its
        outcome. Whether a handshake broken off says so as a TLS error depends on how
        far OpenSSL got."""
        if stage in ("handshake", "starttls-handshake"):
            return {"client-gone", "tls-failed"}
        if stage == "splice":
            return {"closed"}
        if how == "close" and stage == "router":
            return {"router-error"}
        if how == "close" and stage in ("connecting", "upstream"):
            return {"upstream-unavailable"}
        return {"client-gone"}

    async def client_case(self, stage: str, how: str) -> None:
        protocol = self.protocol
        mode = "tls" if stage == "handshake" else "splice" if protocol == "none" else "starttls"
        case = f"{protocol} {mode} listener, client {how} at {stage}"
        dialect = DIALECTS[protocol]
        good = self.server(ScriptedUpstream(protocol))
        # An upstream that never greets; behind a splice listener, one that never
        # finishes the handshake of a TLS route (nothing else is awaited before the splice).
        hung = self.server(
            ScriptedUpstream(
                protocol,
                "handshake" if protocol == "none" else "accept",
                "hang",
                tls=self.upstream_tls,
                implicit_tls=protocol == "none",
            )
        )
        hole = self.black_hole()
        router = SwitchRouter([self.route(good.port)])
        # A reset must cancel what is pending (the Router, the connect, the upstream
        # login): with deadlines beyond the leak check's patience, only a cancellation
        # lets go of the upstream connection in time.
        pending = how == "reset" and stage in ("router", "connecting", "upstream")
        await self.start(self.config(protocol, mode, timeout=LONG if pending else TIMEOUT), router)
        context = self.context if mode == "tls" else None

        async def good_session() -> None:
            router.routes, router.slow = [self.route(good.port)], False
            heard: Transcript = await self.in_thread(session, Client(dialect, self.port, context))
            self.assertEqual(
                (heard.login, heard.probe, heard.error),
                (dialect.logged_in, dialect.probe_answer, None),
                f"{case}: a good session",
            )

        async def faulty_session() -> None:
            lines = len(self.logs.sessions())
            client = Client(dialect, self.port, None if stage == "handshake" else context)
            self.addCleanup(client.close)
            if stage in ("handshake", "starttls-handshake"):
                await self.in_thread(self.half_handshake, client, starttls=stage == "starttls-handshake")
            elif stage == "greeting":
                await self.in_thread(client.connect)
            elif stage == "sasl":
                await self.in_thread(client.connect)
                self.assertEqual(await self.in_thread(client.command, dialect.sasl_start), dialect.continuation, case)
            elif stage == "splice":
                await self.in_thread(client.connect)
                if protocol != "none":
                    self.assertEqual(await self.in_thread(client.command, dialect.login), dialect.logged_in, case)
                self.assertEqual(await self.in_thread(client.command, dialect.probe), dialect.probe_answer, case)
            else:
                router.slow = stage == "router"
                if stage == "connecting":
                    router.routes = [self.route(hole[1])]
                elif stage == "upstream":
                    router.routes = [self.route(hung.port, "tls" if protocol == "none" else "none")]
                asked, accepted = len(router.requests), hung.connections
                await self.in_thread(client.connect)
                client.conn.sendall((dialect.login or dialect.probe) + b"\r\n")
                # Gone once mailrelay is at the stage: asked the Router, or connected upstream.
                await self.until(lambda: len(router.requests) > asked and (stage != "upstream" or hung.connections > accepted))
            client.end(how)
            await self.until(lambda: len(self.logs.sessions()) > lines)
            outcome, reason = self.outcome()
            self.assertIn(outcome, self.expected_outcome(stage, how), f"{case}: {reason}")

        await self.check_case(case, faulty_session, good_session)


def client_cases(stages: Iterable[str]) -> list[Case]:
    return [
        (
            _name("client", how, "at", stage),
            ClientFaults.client_case,
            {"stage": stage, "how": how},
            how == "close" and stage in ("router", "connecting", "upstream"),
        )
        for stage in stages
        for how in ("close", "reset")
    ]


@generate(client_cases(CLIENT_STAGES))
class SMTPClientFaults(ClientFaults):
    protocol = "smtp"


@generate(client_cases(CLIENT_STAGES))
class IMAPClientFaults(ClientFaults):
    protocol = "imap"


@generate(client_cases(CLIENT_STAGES))
class POP3ClientFaults(ClientFaults):
    protocol = "pop3"


@generate(client_cases(SPLICE_CLIENT_STAGES))
class SpliceClientFaults(ClientFaults):
    """Behind a listener without a protocol: `splice` mode, and `tls` for the handshake."""

    protocol = "none"
