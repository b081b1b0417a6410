"""
A whole session in memory: a listener built from its configuration, a scripted client,
the Router, and scripted upstreams, with no socket and no reactor (`converse`).

The client and the upstreams are joined to mailrelay by `twisted.test.iosim`'s in-memory
transports; time is a `task.Clock` that moves only when the conversation waits (for a
reply, or through a `Pause`). Everything above the transports is what production runs:
the real configuration parser, `ListenerFactory` and the protocol it builds, the
connector (through its `stream_endpoint` seam), the login limits and the session line.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Mapping
from typing import Any

import attrs
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IAddress, IOpenSSLServerConnectionCreator, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.test.iosim import FakeTransport, IOPump
from zope.interface import implementer

from ..config import Config, ListenerConfig, parse_config
from ..connector import UpstreamConnector
from ..guard import LoginGuard
from ..listener import ListenerFactory
from ..router import Address, Route
from ..session import Sessions
from .routing import CLIENT, local_address
from .upstream import ScriptedUpstream

__all__ = ["Pause", "Transcript", "converse"]


@attrs.frozen
class Pause:
    """In a client's lines: the client says nothing for `seconds` (timers that fall due
    meanwhile fire: a `login_timeout`, a Reject's `wait`)."""

    seconds: float


@attrs.frozen(kw_only=True)
class Transcript:
    """What happened in one `converse` call."""

    client: bytes
    """Every byte the client received, greeting included."""
    sent: bytes
    """Every byte the client sent."""
    upstream: bytes
    """Every byte the scripted upstreams heard, over every connection in this conversation."""
    upstream_connections: tuple[bytes, ...]
    """What each upstream connection heard, in the order they were made (a refused
    login and a retry are two)."""
    outcome: str | None
    """The session line's `outcome` (`closed`, `rejected`, `router-error`...); None if
    the session had not ended when the conversation did."""
    reason: str | None
    """The session line's `reason`, when it has one."""
    ended_by: str
    """"mailrelay" when mailrelay closed the client's connection, "client" when the
    client closed it after its last line."""
    unsent: tuple[bytes, ...]
    """Lines the client did not get to send: mailrelay had closed the connection."""
    log: tuple[LogEvent, ...]
    """Every `twisted.logger` event emitted during the conversation."""

    def lines(self) -> list[str]:
        """The lines the client received, without their line endings."""
        return _lines(self.client)

    def sent_lines(self) -> list[str]:
        """The lines the client sent, without their line endings."""
        return _lines(self.sent)

    def upstream_lines(self) -> list[str]:
        """The lines the upstreams heard, without their line endings."""
        return _lines(self.upstream)

    def messages(self) -> list[str]:
        """The log events as text, oldest first."""
        return [text for text in map(formatEvent, self.log) if text]


def _lines(data: bytes) -> list[str]:
    return data.decode("utf-8", "replace").splitlines()


def converse(
    listener: str | Mapping[str, Any] | ListenerConfig | Config,
    router: object | None,
    client_lines: Iterable[str | bytes | Pause] = (),
    upstream: ScriptedUpstream | Mapping[str, ScriptedUpstream] | None = None,
    *,
    client: Address = CLIENT,
    local: Address | None = None,
    clock: Clock | None = None,
    patience: float = 30.0,
    base_dir: str | None = None,
) -> Transcript:
    """
    Run one client session through a listener, in memory, and return its `Transcript`.

    `listener` is what you deploy: a `[[listener]]` table (a dict, or TOML text), or a
    whole configuration (a dict or TOML text with exactly one `[[listener]]`, so that
    `[upstream]` timeouts, `[login_limits]` and a `[router]` apply), read by the real
    configuration parser (file names relative to `base_dir`). A listener table without
    `listen` gets `"tcp:0"`. `router` answers every request (any object with
    `route(request)`, e.g. a `RecordingRouter`); None builds the configuration's own
    router, which must need no network (`static`, `map`, `python`).

    The client connects from `client` to `local` (default: the protocol's usual port on
    192.0.2.1), waits for the greeting, then sends each of `client_lines` (CRLF added
    to a line without a line ending; bytes are sent as they are) and waits for an
    answer before the next, as a client does. Waiting runs everything that happens at
    once and, while nothing has come, moves the clock to the next timer up to
    `patience` seconds after the line was sent (a slow Router, a Reject's `wait`, a
    `router_timeout`); a line that gets no answer within that (an SMTP message body
    line) costs no time. A `Pause(seconds)` moves the clock on. Once the lines are
    said, the client closes its connection, unless mailrelay did first.

    `upstream` is where every route connects: one `ScriptedUpstream`, or a mapping of
    route address (`"10.0.0.5:143"`, as `Route.address` writes it) to one; a route
    without one is refused (connection refused), so fallbacks can be tested.

    Plaintext only: a listener in `tls` mode is a ValueError, and a client that says
    STARTTLS (give the listener `starttls = "optional"` to log in without it) or a
    route with `tls = "tls"` or `"starttls"` ends the conversation with
    NotImplementedError. An upstream script that did not expect a line mailrelay sent
    is an AssertionError (see `ScriptedUpstream`).
    """
    config, listener_config = _configuration(listener, base_dir)
    if listener_config.mode == "tls":
        raise ValueError(
            f'listener "{listener_config.name}" is in mode "tls": converse speaks plaintext; use mode "starttls"'
            ' with starttls = "optional", or "splice"'
        )
    clock = clock if clock is not None else Clock()
    if router is None:
        spec = config.router_for(listener_config)
        if spec is None:
            raise ValueError(f'listener "{listener_config.name}" has no router: pass one, or give the configuration a [router]')
        passwords = [(listener_config.name, listener_config.protocol)] if listener_config.accepts_passwords else []
        router = spec.build(clock, password_listeners=passwords)
    if local is None:
        local = _local(listener_config)
    network = _Network(clock)
    connector = _MemoryConnector(network, upstream, clock, config)
    sessions = Sessions(clock)
    factory = ListenerFactory(
        listener_config,
        router,  # type: ignore[arg-type]
        connector,
        sessions,
        clock,
        tls=_PlaintextOnly() if listener_config.mode == "starttls" else None,
        guard=LoginGuard(config.login_limits, clock),
    )
    events = _Events()
    globalLogPublisher.addObserver(events)
    try:
        factory.doStart()
        try:
            person = _Client()
            network.connect(factory.buildProtocol(_address(client)), person, _address(local), _address(client))
            unsent = _talk(network, person, client_lines, patience)
            ended_by = "mailrelay" if person.lost else "client"
            if not person.lost:
                person.transport.loseConnection()
                network.settle()
            network.wait(lambda: len(sessions) == 0, patience)
        finally:
            factory.doStop()
    finally:
        globalLogPublisher.removeObserver(events)
    line = next((e for e in reversed(events) if "outcome" in e and "session_id" in e), None)
    heard = tuple(bytes(c) for c in network.upstream_connections)
    transcript = Transcript(
        client=bytes(person.received),
        sent=bytes(person.sent),
        upstream=b"".join(heard),
        upstream_connections=heard,
        outcome=line["outcome"] if line else None,
        reason=line.get("reason") if line else None,
        ended_by=ended_by,
        unsent=tuple(unsent),
        log=tuple(events),
    )
    if network.unsupported:
        raise NotImplementedError("; ".join(network.unsupported))
    unexpected = [line for scripted, start in network.upstreams for line in scripted.unexpected[start:]]
    if unexpected:
        raise AssertionError(
            f"the upstream script did not expect {', '.join(map(repr, unexpected))};"
            f" the upstream heard {transcript.upstream!r}, the client {transcript.client!r}"
        )
    return transcript


def _configuration(
    listener: str | Mapping[str, Any] | ListenerConfig | Config, base_dir: str | None
) -> tuple[Config, ListenerConfig]:
    if isinstance(listener, ListenerConfig):
        return Config(source="<converse>", listeners=(listener,), router=None), listener
    if isinstance(listener, Config):
        config = listener
    else:
        data = tomllib.loads(listener) if isinstance(listener, str) else dict(listener)
        if "listener" not in data:  # one [[listener]] table
            data = {"listener": [{"listen": "tcp:0", **data}]}
        config = parse_config(data, "<converse>", base_dir=base_dir)
    if len(config.listeners) != 1:
        names = ", ".join(f'"{lst.name}"' for lst in config.listeners)
        raise ValueError(f"converse needs a configuration with one listener, not {len(config.listeners)} ({names})")
    return config, config.listeners[0]


def _local(listener: ListenerConfig) -> Address:
    host, port = local_address(listener.protocol, listener.mode)
    match = re.match(r"tcp6?:(?:port=)?(\d+)(?::|$)", listener.listen)
    if match and int(match.group(1)):
        port = int(match.group(1))
    return (host, port)


def _address(address: Address) -> IAddress:
    host, port = address
    return IPv6Address("TCP", host, port) if ":" in host else IPv4Address("TCP", host, port)


def _talk(network: _Network, person: _Client, lines: Iterable[str | bytes | Pause], patience: float) -> list[bytes]:
    """Say `lines`, each once the previous one has been answered; what was left unsaid."""
    network.wait(lambda: bool(person.received) or person.lost, patience)  # the greeting
    unsent: list[bytes] = []
    for item in lines:
        if isinstance(item, Pause):
            network.wait(lambda: False, item.seconds, exactly=True)
            continue
        data = item.encode("utf-8") if isinstance(item, str) else item
        if isinstance(item, str) and not data.endswith(b"\n"):
            data += b"\r\n"
        if person.lost:
            unsent.append(data)
            continue
        heard = len(person.received)
        person.say(data)
        network.settle()
        network.wait(lambda: len(person.received) > heard or person.lost, patience)  # noqa: B023 (called at once)
    return unsent


@implementer(ILogObserver)
class _Events(list[LogEvent]):
    """Every log event, as they come."""

    def __call__(self, event: LogEvent) -> None:
        self.append(event)


class _Client(Protocol):
    """The client's end: keeps what it hears and what it says."""

    transport: Any

    def __init__(self) -> None:
        self.received = bytearray()
        self.sent = bytearray()
        self.lost = False

    def say(self, data: bytes) -> None:
        self.sent += data
        self.transport.write(data)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = True


class _MemoryTransport(FakeTransport):
    """iosim's transport, which refuses to pretend it did a TLS handshake."""

    def __init__(self, protocol: Any, network: _Network, **kwargs: Any) -> None:
        super().__init__(protocol, **kwargs)
        self.network = network

    def startTLS(self, contextFactory: Any, beNormal: bool = True) -> None:
        self.network.unsupported.append(
            "converse speaks plaintext and cannot follow the client's STARTTLS: leave it out of the client's lines"
            ' (a listener with starttls = "optional" lets a client log in without it)'
        )
        self.loseConnection()


@implementer(IOpenSSLServerConnectionCreator)
class _PlaintextOnly:
    """The TLS of a `starttls` listener, so that it offers STARTTLS as in production;
    `_MemoryTransport` stops any attempt to use it."""

    def serverConnectionForTLS(self, tlsProtocol: Any) -> Any:
        raise NotImplementedError("converse speaks plaintext")


class _Network:
    """The in-memory connections of one conversation, and its clock."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.pumps: list[IOPump] = []
        self.upstream_connections: list[bytearray] = []
        self.upstreams: list[tuple[ScriptedUpstream, int]] = []
        """The upstreams connected to, each with its count of unexpected lines before."""
        self.unsupported: list[str] = []

    def connect(self, server: Any, client: Any, server_address: IAddress, client_address: IAddress) -> None:
        """Join `client` (the connecting side) to `server` (the accepting side)."""
        server_transport = _MemoryTransport(server, self, isServer=True, hostAddress=server_address, peerAddress=client_address)
        client_transport = _MemoryTransport(client, self, isServer=False, hostAddress=client_address, peerAddress=server_address)
        server.makeConnection(server_transport)
        client.makeConnection(client_transport)
        self.pumps.append(IOPump(client, server, client_transport, server_transport, False, clock=self.clock))

    def settle(self) -> None:
        """Deliver bytes and run what is due now, until nothing moves."""
        for _ in range(100_000):
            self.clock.advance(0)
            moved = False
            for pump in list(self.pumps):
                moved = pump.pump(advanceClock=False) or moved
            if not moved and not self._due(self.clock.seconds()):
                return
        raise RuntimeError("the conversation does not settle: something keeps sending or scheduling at once")

    def wait(self, done: Any, seconds: float, exactly: bool = False) -> None:
        """Settle, then move the clock from timer to timer until `done()` or `seconds`
        have passed; with `exactly`, the clock ends `seconds` later either way."""
        deadline = self.clock.seconds() + seconds
        self.settle()
        while not done():
            due = self._due(deadline)
            if not due:
                break
            self.clock.advance(max(0.0, min(due) - self.clock.seconds()))
            self.settle()
        if exactly and self.clock.seconds() < deadline:
            self.clock.advance(deadline - self.clock.seconds())
            self.settle()

    def _due(self, by: float) -> list[float]:
        return [t for t in (call.getTime() for call in self.clock.getDelayedCalls()) if t <= by]


@implementer(IStreamClientEndpoint)
class _MemoryEndpoint:
    def __init__(self, network: _Network, route: Route, upstream: ScriptedUpstream | None) -> None:
        self.network = network
        self.route = route
        self.upstream = upstream

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[Any]:
        route = self.route
        if route.tls != "none":
            self.network.unsupported.append(
                f'converse connects in plaintext and cannot reach {route.address} with tls = "{route.tls}"'
            )
            return fail(ConnectionRefusedError("converse connects in plaintext"))
        if self.upstream is None:
            return fail(ConnectionRefusedError())
        address = _address((route.host, route.port))
        protocol = protocolFactory.buildProtocol(address)
        scripted = self.upstream.buildProtocol(address)
        self.network.upstream_connections.append(self.upstream.connections[-1])
        if not any(u is self.upstream for u, _ in self.network.upstreams):
            self.network.upstreams.append((self.upstream, len(self.upstream.unexpected)))
        self.network.connect(scripted, protocol, address, _address(("192.0.2.1", 40000 + len(self.network.pumps))))
        return succeed(protocol)


class _MemoryConnector(UpstreamConnector):
    """The production connector, reaching scripted upstreams in memory."""

    def __init__(
        self, network: _Network, upstream: ScriptedUpstream | Mapping[str, ScriptedUpstream] | None, clock: Clock, config: Config
    ) -> None:
        super().__init__(clock, config.upstream.connect_timeout, tls=None, login_timeout=config.upstream.login_timeout)
        self.network = network
        self.upstream = upstream

    def stream_endpoint(self, route: Route) -> IStreamClientEndpoint:
        if isinstance(self.upstream, Mapping):
            return _MemoryEndpoint(self.network, route, self.upstream.get(route.address))
        return _MemoryEndpoint(self.network, route, self.upstream)
