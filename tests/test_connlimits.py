"""
Connection limits per listener (`[listener.connection_limits]`): sessions at once on
the listener, per client (IPv4 address, IPv6 /64, IPv4-mapped as IPv4) and per client
and minute, with exempt networks; decided at accept, answered with the protocol's busy
reply or a close, logged once per burst.

Unit tests drive `ConnectionLimiter` and `ListenerFactory` with
`twisted.internet.task.Clock`; the end-to-end tests connect real sockets from chosen
loopback addresses (127.0.0.2, .3, .4) to each kind of listener (SMTP, IMAP and POP3
front-ends in `starttls` mode, a `splice` listener, a `tls` one), with real scripted
upstreams behind.
"""

from __future__ import annotations

import ipaddress
import resource
import smtplib
import socket
import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from twisted.internet import reactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.logger import ILogObserver, Logger, formatEvent
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial import unittest
from zope.interface import implementer

from mailrelay.__main__ import check
from mailrelay.config import ConfigError, ListenerConfig, load_config, parse_config
from mailrelay.connector import UpstreamConnector
from mailrelay.connlimits import ConnectionLimiter, ConnectionLimits, Slot
from mailrelay.listener import ListenerFactory, SpliceModeProtocol, TurnedAway
from mailrelay.protocols.imap import IMAPFrontEnd
from mailrelay.protocols.pop3 import POP3FrontEnd
from mailrelay.protocols.smtp import SMTPFrontEnd
from mailrelay.session import Sessions
from mailrelay.tls import ServerTLS, ServerTLSConfig
from tests.support.frontends import PASSWORD, USER, FrontEndTestCase, Router, password_check, plain_ir
from tests.support.imap import ScriptedIMAP, read_tagged
from tests.support.net import WAIT, ThreadedServer, echo, read_line, recv_all, tcp_port
from tests.support.pop3 import ScriptedPOP3, logged_in_reply
from tests.support.smtp import ScriptedSMTP

SMTP_BUSY = b"421 4.7.0 relay.test Error: too many connections, try again later\r\n"
IMAP_BUSY = b"* BYE Too many connections, try again later\r\n"
POP3_BUSY = b"-ERR [SYS/TEMP] Too many connections, try again later\r\n"


def ip_network(text: str) -> Any:
    return ipaddress.ip_network(text)


@implementer(ILogObserver)
class Events:
    """A log observer for one limiter: the formatted lines."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def lines(self) -> list[str]:
        return [formatEvent(e) for e in self.events]


def limiter(**limits: Any) -> tuple[ConnectionLimiter, Clock, Events]:
    clock, events = Clock(), Events()
    made = ConnectionLimiter(ConnectionLimits(**limits), "smtp", clock)
    made.log = Logger(observer=events)
    return made, clock, events


# -- the limiter, on a Clock ---------------------------------------------------------------------


def test_sessions_are_counted_on_the_listener_and_per_client_and_released_once() -> None:
    limits, _, _ = limiter(max_sessions=3, max_per_client=2, max_rate_per_client=0)
    a1, a2 = limits.admit("192.0.2.7"), limits.admit("192.0.2.7")
    assert a1 is not None and a2 is not None
    assert limits.admit("192.0.2.7") is None  # its third, past max_per_client
    b = limits.admit("192.0.2.8")
    assert b is not None
    assert limits.admit("192.0.2.9") is None  # past max_sessions: 3 open
    assert (limits.sessions, limits.clients()) == (3, {"192.0.2.7": 2, "192.0.2.8": 1})
    a1.release()
    a1.release()  # a second release counts nothing
    assert (limits.sessions, limits.clients()) == (2, {"192.0.2.7": 1, "192.0.2.8": 1})
    assert limits.admit("192.0.2.9") is not None  # the freed place
    b.release()
    a2.release()
    assert limits.clients() == {"192.0.2.9": 1}


def test_ipv6_clients_are_counted_per_64() -> None:
    limits, _, _ = limiter(max_per_client=2, max_rate_per_client=0)
    assert limits.admit("2001:db8:1:2::1") is not None
    assert limits.admit("2001:db8:1:2:ffff:ffff:ffff:fffe") is not None
    assert limits.admit("2001:db8:1:2:abcd::9") is None  # the same /64
    assert limits.admit("2001:db8:1:3::1") is not None  # the next /64
    assert limits.clients() == {"2001:db8:1:2::/64": 2, "2001:db8:1:3::/64": 1}


def test_ipv4_mapped_ipv6_clients_are_counted_as_their_ipv4_address() -> None:
    limits, _, _ = limiter(max_per_client=2, max_rate_per_client=0)
    assert limits.admit("::ffff:192.0.2.7") is not None
    assert limits.admit("192.0.2.7") is not None
    assert limits.admit("::ffff:192.0.2.7") is None
    assert limits.clients() == {"192.0.2.7": 2}
    # ... and are exempt as their IPv4 address is.
    exempt, _, _ = limiter(max_per_client=1, max_rate_per_client=1, exempt=(ip_network("192.0.2.0/24"),))
    assert all(exempt.admit("::ffff:192.0.2.7") is not None for _ in range(5))


def test_the_rate_is_a_bucket_of_max_rate_per_client_refilled_over_a_minute() -> None:
    limits, clock, _ = limiter(max_per_client=0, max_rate_per_client=3)
    for _ in range(3):
        slot = limits.admit("192.0.2.7")
        assert slot is not None
        slot.release()  # closed at once: the rate counts new connections, not open ones
    assert limits.admit("192.0.2.7") is None
    assert limits.admit("192.0.2.8") is not None  # another client's own bucket
    clock.advance(19.9)
    assert limits.admit("192.0.2.7") is None
    clock.advance(0.1)  # one connection every 60/3 seconds
    assert limits.admit("192.0.2.7") is not None
    assert limits.admit("192.0.2.7") is None
    clock.advance(600)  # a long pause refills the bucket, and no further
    assert [limits.admit("192.0.2.7") is not None for _ in range(4)] == [True, True, True, False]


def test_refused_connections_take_no_token() -> None:
    limits, clock, _ = limiter(max_per_client=0, max_rate_per_client=60)
    for _ in range(60):
        assert limits.admit("192.0.2.7") is not None
    for _ in range(1000):  # hammering past the limit...
        assert limits.admit("192.0.2.7") is None
    clock.advance(1)  # ...does not keep the client out once a token is back
    assert limits.admit("192.0.2.7") is not None


def test_zero_turns_each_limit_off() -> None:
    limits, _, _ = limiter(max_sessions=0, max_per_client=0, max_rate_per_client=0)
    assert all(limits.admit("192.0.2.7") is not None for _ in range(10_000))
    assert limits.sessions == 10_000 and limits.rate_table_size() == 0 and limits.clients() == {"192.0.2.7": 10_000}


def test_exempt_networks_are_not_limited_per_client_nor_in_rate_but_count_for_max_sessions() -> None:
    exempt = (ip_network("127.0.0.0/8"), ip_network("2001:db8::/32"))
    limits, _, _ = limiter(max_sessions=6, max_per_client=1, max_rate_per_client=1, exempt=exempt)
    held = [limits.admit(host) for host in ("127.0.0.1", "127.0.0.1", "127.0.0.1", "2001:db8::1", "2001:db8::1")]
    assert all(held)
    assert limits.clients() == {} and limits.rate_table_size() == 0  # not counted per client at all
    assert limits.admit("192.0.2.7") is not None
    assert limits.admit("127.0.0.1") is None  # max_sessions counts everyone
    # A UNIX socket's peer (a local process) is limited by max_sessions only, too.
    unix, _, _ = limiter(max_sessions=3, max_per_client=1, max_rate_per_client=1)
    assert [unix.admit("/run/mailrelay.sock") is not None for _ in range(4)] == [True, True, True, False]


def test_the_rate_table_forgets_refilled_clients_and_is_capped() -> None:
    limits, clock, _ = limiter(max_per_client=0, max_rate_per_client=2)
    limits.max_clients = 50
    for n in range(1000):  # a flood from many addresses, one connection each
        slot = limits.admit(f"10.0.{n // 256}.{n % 256}")
        assert slot is not None
        slot.release()
    assert limits.rate_table_size() == 50
    clock.advance(15)  # half a token back each (one every 30s): not yet full, still remembered
    limits.admit("192.0.2.7")
    assert limits.rate_table_size() == 50
    clock.advance(15)  # every bucket of the flood full again: as good as forgotten
    limits.admit("192.0.2.8")
    assert limits.rate_table_size() == 2  # 192.0.2.7 has not got its token back yet


def test_the_rate_of_a_client_under_attack_is_remembered_through_a_flood_of_others() -> None:
    limits, _, _ = limiter(max_per_client=0, max_rate_per_client=5)
    limits.max_clients = 50
    for _ in range(5):
        limits.admit("192.0.2.7")
    for n in range(1000):
        limits.admit(f"10.0.{n // 256}.{n % 256}")
        assert limits.admit("192.0.2.7") is None  # seen again: never the oldest, never forgotten


def test_a_burst_of_refusals_logs_one_warning_then_a_summary_per_interval() -> None:
    limits, clock, events = limiter(max_per_client=1, max_rate_per_client=0)
    assert limits.admit("192.0.2.7") is not None
    for _ in range(5):
        assert limits.admit("192.0.2.7") is None
        clock.advance(1)
    assert events.lines() == ["listener smtp: turning connections away from 192.0.2.7 (max_per_client=1)"]
    assert events.events[0]["log_level"].name == "warn" and events.events[0]["client"] == "192.0.2.7"
    for _ in range(953):
        limits.admit("192.0.2.7")
    clock.advance(55)
    assert events.lines()[1:] == [
        "listener smtp: turned away 957 more connections from 192.0.2.7 in the last 60s (max_per_client=1)"
    ]
    assert len(clock.getDelayedCalls()) == 1  # the next summary, while the burst may go on
    clock.advance(60)  # a whole interval without a refusal: the burst is over...
    assert len(events.lines()) == 2
    assert limits.bursts() == {} and clock.getDelayedCalls() == []  # ...and no timer is left
    limits.admit("192.0.2.7")  # a new burst warns again
    assert events.lines()[2] == "listener smtp: turning connections away from 192.0.2.7 (max_per_client=1)"


def test_each_client_and_the_listener_have_their_own_burst_and_one_timer_serves_them_all() -> None:
    limits, clock, events = limiter(max_sessions=3, max_per_client=1, max_rate_per_client=0)
    limits.admit("192.0.2.7")
    limits.admit("2001:db8::1")
    limits.admit("2001:db8::2")  # the same /64
    limits.admit("192.0.2.7")
    limits.admit("192.0.2.8")
    limits.admit("192.0.2.9")  # the listener is full
    limits.admit("192.0.2.9")
    assert events.lines() == [
        "listener smtp: turning connections away from 2001:db8::/64 (max_per_client=1)",
        "listener smtp: turning connections away from 192.0.2.7 (max_per_client=1)",
        "listener smtp: turning connections away (max_sessions=3)",
    ]
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(60)
    assert events.lines()[3:] == ["listener smtp: turned away 1 more connection in the last 60s (max_sessions=3)"]


def test_clients_past_max_bursts_are_counted_together() -> None:
    limits, clock, events = limiter(max_per_client=0, max_rate_per_client=1)
    limits.max_bursts = 3
    for n in range(10):
        limits.admit(f"192.0.2.{n}")
        limits.admit(f"192.0.2.{n}")
    lines = events.lines()
    assert lines[:3] == [
        f"listener smtp: turning connections away from 192.0.2.{n} (max_rate_per_client=1/min)" for n in range(3)
    ]
    assert lines[3:] == [
        "listener smtp: turning connections away from more clients (past 3 reported apart, counted together)"
        " (max_rate_per_client=1/min)"
    ]
    clock.advance(60)
    assert events.lines()[4:] == [
        "listener smtp: turned away 6 more connections from more clients (past 3 reported apart, counted together)"
        " in the last 60s (max_rate_per_client=1/min)"
    ]


def test_stop_logs_what_was_uncounted_and_leaves_no_timer() -> None:
    limits, clock, events = limiter(max_per_client=1, max_rate_per_client=0)
    limits.admit("192.0.2.7")
    limits.admit("192.0.2.7")
    limits.admit("192.0.2.7")
    clock.advance(10)
    assert clock.getDelayedCalls() != []
    limits.stop()
    assert clock.getDelayedCalls() == []
    assert events.lines()[1:] == [
        "listener smtp: turned away 1 more connection from 192.0.2.7 in the last 10s (max_per_client=1)"
    ]
    limits.admit("192.0.2.7")  # a stopped listener accepts nothing; were it to, no timer starts
    assert clock.getDelayedCalls() == []


def test_a_restarted_listener_sums_refusals_up_again() -> None:
    limits, clock, events = limiter(max_per_client=1, max_rate_per_client=0)
    limits.admit("192.0.2.7")
    limits.stop()
    limits.admit("192.0.2.7")  # were a stopped listener to refuse: a warning, no timer
    assert clock.getDelayedCalls() == []
    limits.start()
    limits.admit("192.0.2.7")
    clock.advance(60)
    assert events.lines()[-1] == "listener smtp: turned away 1 more connection from 192.0.2.7 in the last 60s (max_per_client=1)"
    limits.stop()
    assert clock.getDelayedCalls() == []


# -- the listener factory, in memory -------------------------------------------------------------


def factory_for(mode: str, protocol: str, **limits: Any) -> tuple[ListenerFactory, Clock, Sessions]:
    clock = Clock()
    sessions = Sessions(clock)
    listener = ListenerConfig(
        name=protocol,
        listen="tcp:0",
        mode=mode,
        protocol=protocol,
        router=None,
        connection_limits=ConnectionLimits(**limits),
    )
    factory = ListenerFactory(listener, Router(), UpstreamConnector(clock, 5), sessions, clock)
    return factory, clock, sessions


def test_a_connection_turned_away_hears_the_busy_reply_and_opens_no_session_and_holds_no_timer() -> None:
    factory, clock, sessions = factory_for("starttls", "pop3", max_per_client=1)
    address = IPv4Address("TCP", "192.0.2.7", 40000)
    admitted = factory.buildProtocol(address)
    assert isinstance(admitted, POP3FrontEnd) and isinstance(admitted.connection_slot, Slot)
    admitted.makeConnection(StringTransport(peerAddress=address))
    timers = len(clock.getDelayedCalls())  # the admitted session's login timeout
    refused = factory.buildProtocol(address)
    assert isinstance(refused, TurnedAway)
    transport = StringTransport(peerAddress=address)
    refused.makeConnection(transport)
    assert transport.value() == POP3_BUSY and transport.disconnecting
    assert len(sessions) == 1
    assert len(clock.getDelayedCalls()) == timers + 1  # the listener's one summary timer, nothing of its own
    factory.doStart()
    factory.doStop()  # the listener stopping stops that timer
    assert len(clock.getDelayedCalls()) == timers
    admitted.connectionLost()
    assert factory.limiter.sessions == 0 and factory.limiter.clients() == {}


def test_a_max_sessions_the_descriptor_limit_cannot_carry_is_warned_about(monkeypatch: pytest.MonkeyPatch) -> None:
    factory, _, _ = factory_for("splice", "none", max_sessions=600)
    events = Events()
    factory.log = Logger(observer=events)
    monkeypatch.setattr(resource, "getrlimit", lambda which: (1024, 4096))
    factory.doStart()
    factory.doStop()
    assert events.lines() == [
        "listener none: max_sessions=600 needs up to 1200 file descriptors, but this process may open 1024:"
        " raise its limit (ulimit -n, systemd's LimitNOFILE) or lower max_sessions"
    ]
    monkeypatch.setattr(resource, "getrlimit", lambda which: (1300, 4096))
    factory.doStart()
    factory.doStop()
    assert len(events.lines()) == 1


def test_every_front_end_has_its_busy_reply() -> None:
    assert (
        SMTPFrontEnd.busy_reply is not None
        and SMTPFrontEnd.busy_reply.format(hostname="relay.test").encode() + b"\r\n" == SMTP_BUSY
    )
    assert (IMAPFrontEnd.busy_reply or "").encode() + b"\r\n" == IMAP_BUSY
    assert (POP3FrontEnd.busy_reply or "").encode() + b"\r\n" == POP3_BUSY
    assert SpliceModeProtocol.busy_reply is None


def test_a_tls_listener_says_nothing_before_the_handshake() -> None:
    """`tls` listeners: the front-end's busy reply would be encrypted for a handshake that
    never happens; the TLS layer wrapping the listener must get a protocol (not None)."""
    factory, _, sessions = factory_for("tls", "imap", max_sessions=1)
    assert factory.busy_reply == b""
    tls = TLSMemoryBIOFactory(ServerTLS(ServerTLSConfig(default=None)).creator("imap"), False, factory)
    address = IPv6Address("TCP", "2001:db8::7", 40000)
    assert not isinstance(tls.buildProtocol(address).wrappedProtocol, TurnedAway)  # the one session
    wrapper = tls.buildProtocol(address)
    assert isinstance(wrapper.wrappedProtocol, TurnedAway)
    transport = StringTransport(peerAddress=address)
    wrapper.makeConnection(transport)
    assert transport.value() == b"" and transport.disconnecting  # dropped, no alert, no reply
    assert len(sessions) == 0


# -- configuration -------------------------------------------------------------------------------


def config_with(limits: Any = None, **listener: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": "imap", "listen": "tcp:0", "mode": "starttls", "protocol": "imap", **listener}
    if limits is not None:
        entry["connection_limits"] = limits
    return {"router": {"type": "static", "host": "127.0.0.1", "port": 143}, "listener": [entry]}


def test_defaults_apply_without_the_table() -> None:
    [listener] = parse_config(config_with()).listeners
    assert listener.connection_limits == ConnectionLimits()
    assert ConnectionLimits() == ConnectionLimits(max_sessions=5000, max_per_client=200, max_rate_per_client=300, exempt=())


def test_the_table_sets_each_limit_and_leaves_the_others_at_their_default() -> None:
    [listener] = parse_config(config_with({"max_per_client": 20, "exempt": ["10.0.0.0/8", "2001:db8::/32"]})).listeners
    assert listener.connection_limits == ConnectionLimits(
        max_per_client=20, exempt=(ip_network("10.0.0.0/8"), ip_network("2001:db8::/32"))
    )
    [listener] = parse_config(
        config_with({"max_sessions": 0, "max_rate_per_client": 0, "exempt": "192.0.2.10"}, mode="splice", protocol="none")
    ).listeners
    assert listener.connection_limits == ConnectionLimits(
        max_sessions=0, max_rate_per_client=0, exempt=(ip_network("192.0.2.10/32"),)
    )
    [listener] = parse_config(config_with({"exempt": []})).listeners
    assert listener.connection_limits == ConnectionLimits()


def test_toml_subtable_after_a_listener_header_applies_to_that_listener(tmp_path: Path) -> None:
    path = tmp_path / "mailrelay.toml"
    path.write_text(
        '[router]\ntype = "static"\nhost = "127.0.0.1"\nport = 25\n\n'
        '[[listener]]\nname = "a"\nlisten = "tcp:0"\nmode = "splice"\n\n'
        "[listener.connection_limits]\nmax_per_client = 7\n\n"
        '[[listener]]\nname = "b"\nlisten = "tcp:0"\nmode = "splice"\n'
    )
    a, b = load_config(path).listeners
    assert a.connection_limits.max_per_client == 7 and b.connection_limits == ConnectionLimits()


@pytest.mark.parametrize(
    ("limits", "error"),
    [
        ({"max_sessions": -1}, "listener[0].connection_limits.max_sessions: must be from 0 to 1000000, not -1"),
        ({"max_per_client": 1_000_001}, "listener[0].connection_limits.max_per_client: must be from 0 to 1000000, not 1000001"),
        (
            {"max_rate_per_client": 1.5},
            "listener[0].connection_limits.max_rate_per_client: must be an integer, not a number (1.5)",
        ),
        ({"max_per_client": True}, "listener[0].connection_limits.max_per_client: must be an integer, not a boolean (True)"),
        ({"max_connections": 5}, "listener[0].connection_limits.max_connections: unknown key"),
        (
            {"exempt": ["10.0.0.1/8"]},
            'listener[0].connection_limits.exempt: "10.0.0.1/8" has host bits set (the network is 10.0.0.0/8)',
        ),
        ({"exempt": ["webmail"]}, 'listener[0].connection_limits.exempt: "webmail" is not an IP address or network (CIDR)'),
        ({"exempt": 10}, "listener[0].connection_limits.exempt: must be a string or an array of strings, not an integer (10)"),
        (5000, "listener[0].connection_limits: must be a table, not an integer (5000)"),
    ],
)
def test_bad_values_are_errors(limits: Any, error: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(config_with(limits))
    assert caught.value.errors == [f"<config>: {error}"]


def test_every_bad_value_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(config_with({"max_sessions": -1, "max_per_client": "many", "burst": 1}))
    assert caught.value.errors == [
        "<config>: listener[0].connection_limits.max_sessions: must be from 0 to 1000000, not -1",
        "<config>: listener[0].connection_limits.max_per_client: must be an integer, not a string ('many')",
        "<config>: listener[0].connection_limits.burst: unknown key",
    ]


def test_check_shows_each_listeners_limits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "mailrelay.toml"
    path.write_text(
        '[router]\ntype = "static"\nhost = "127.0.0.1"\nport = 25\n\n'
        '[[listener]]\nname = "a"\nlisten = "tcp:0"\nmode = "splice"\n\n'
        '[listener.connection_limits]\nmax_per_client = 7\nmax_rate_per_client = 0\nexempt = ["10.0.0.0/8"]\n\n'
        '[[listener]]\nname = "b"\nlisten = "tcp:0"\nmode = "splice"\n'
    )
    assert check(str(path)) == 0
    out = capsys.readouterr().out.splitlines()
    assert "  connection_limits: max_sessions=5000 max_per_client=7 max_rate_per_client=off exempt=10.0.0.0/8" in out
    assert "  connection_limits: max_sessions=5000 max_per_client=200 max_rate_per_client=300/min exempt=none" in out


# -- end to end, on real sockets -----------------------------------------------------------------


def connect(port: int, source: str, host: str = "127.0.0.1") -> socket.socket:
    return socket.create_connection((host, port), timeout=WAIT, source_address=(source, 0))


def closed_at_once(conn: Any) -> bytes:
    """Everything until the close; a reset counts as a close."""
    try:
        return recv_all(conn)
    except ConnectionResetError:
        return b""


class Kind:
    """One kind of listener: its config, its upstream, and what its clients do."""

    busy = b""
    """What a client turned away hears before the close."""

    def __init__(self, case: FrontEndTestCase) -> None:
        self.case = case

    def listener(self) -> dict[str, Any]:
        raise NotImplementedError

    def upstream(self) -> ThreadedServer:
        raise NotImplementedError

    def router(self, upstream: ThreadedServer) -> Router:
        """A router that checks the test user's password and routes to `upstream`."""
        return Router(answer=password_check(upstream.port))

    def hold(self, port: int, source: str, host: str = "127.0.0.1") -> Any:
        """A connection let in (proved by what the listener said), kept open."""
        raise NotImplementedError

    def session(self, port: int, source: str) -> bool:
        """A complete good session through the upstream; whether it went as it should."""
        raise NotImplementedError

    def turned_away(self, port: int, source: str, host: str = "127.0.0.1") -> bytes:
        """What a client turned away gets: the first line, and all up to the close
        when it is the busy reply (an admitted client gets its greeting instead)."""
        with connect(port, source, host) as conn:
            first = read_line(conn)
            return first + closed_at_once(conn) if first == self.busy else first


class FrontEndKind(Kind):
    protocol = ""
    greeting = b""

    def listener(self) -> dict[str, Any]:
        return {"mode": "starttls", "protocol": self.protocol}

    def hold(self, port: int, source: str, host: str = "127.0.0.1") -> Any:
        conn = connect(port, source, host)
        self.case.addCleanup(conn.close)
        assert read_line(conn).startswith(self.greeting)
        return conn

    def starttls(self, conn: socket.socket, command: bytes, go_ahead: bytes) -> ssl.SSLSocket:
        assert read_line(conn).startswith(self.greeting)
        conn.sendall(command)
        assert read_line(conn) == go_ahead
        return self.case.context.wrap_socket(conn, server_hostname="relay.test")


class SMTPKind(FrontEndKind):
    protocol, greeting, busy = "smtp", b"220 relay.test ESMTP", SMTP_BUSY

    def upstream(self) -> ThreadedServer:
        return self.case.server(ScriptedSMTP(users={USER: PASSWORD}))

    def session(self, port: int, source: str) -> bool:
        with smtplib.SMTP("127.0.0.1", port, local_hostname="c.example", timeout=WAIT, source_address=(source, 0)) as smtp:
            smtp.starttls(context=self.case.context)
            smtp.ehlo()
            smtp.user, smtp.password = USER, PASSWORD
            auth = smtp.auth("PLAIN", smtp.auth_plain)
            refused = smtp.sendmail(USER, ["bob@example.test"], b"Subject: hi\r\n\r\nHello\r\n")
            return auth[0] == 235 and refused == {}


class IMAPKind(FrontEndKind):
    protocol, greeting, busy = "imap", b"* OK [CAPABILITY IMAP4rev1 ", IMAP_BUSY

    def upstream(self) -> ThreadedServer:
        return self.case.server(ScriptedIMAP(users={USER: PASSWORD}))

    def session(self, port: int, source: str) -> bool:
        with self.starttls(connect(port, source), b"s STARTTLS\r\n", b"s OK Begin TLS negotiation now\r\n") as conn:
            conn.sendall(f"a LOGIN {USER} {PASSWORD}\r\n".encode())
            login = read_tagged(conn, b"a")
            conn.sendall(b"z LOGOUT\r\n")
            return login.endswith(b"a OK [CAPABILITY IMAP4rev1 IDLE MOVE] Logged in\r\n") and b"z OK" in recv_all(conn)


class POP3Kind(FrontEndKind):
    protocol, greeting, busy = "pop3", b"+OK relay.test POP3 ready", POP3_BUSY

    def upstream(self) -> ThreadedServer:
        return self.case.server(ScriptedPOP3())

    def login(self, conn: Any) -> bool:
        conn.sendall(b"AUTH PLAIN " + plain_ir() + b"\r\n")
        logged_in = read_line(conn) == logged_in_reply(USER) + b"\r\n"
        conn.sendall(b"QUIT\r\n")
        return logged_in and recv_all(conn).startswith(b"+OK")

    def session(self, port: int, source: str) -> bool:
        with self.starttls(connect(port, source), b"STLS\r\n", b"+OK Begin TLS negotiation now\r\n") as conn:
            return self.login(conn)


class SpliceKind(Kind):
    """A `splice` listener in front of an echo server: turned away means closed, unheard."""

    def listener(self) -> dict[str, Any]:
        return {"mode": "splice", "protocol": "none"}

    def upstream(self) -> ThreadedServer:
        return self.case.server(echo)

    def router(self, upstream: ThreadedServer) -> Router:
        return Router(port=upstream.port)

    def hold(self, port: int, source: str, host: str = "127.0.0.1") -> Any:
        conn = connect(port, source, host)
        self.case.addCleanup(conn.close)
        conn.sendall(b"ping\r\n")
        assert read_line(conn) == b"ping\r\n"
        return conn

    def session(self, port: int, source: str) -> bool:
        with connect(port, source) as conn:
            conn.sendall(b"hello\r\n")
            conn.shutdown(socket.SHUT_WR)
            return recv_all(conn) == b"hello\r\n"

    def turned_away(self, port: int, source: str, host: str = "127.0.0.1") -> bytes:
        try:
            conn = connect(port, source, host)
        except ConnectionResetError:  # closed before connect() returned
            return b""
        with conn:
            try:  # an admitted client would hear its bytes back from the echo server
                conn.sendall(b"hello\r\n")
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                return b""
            return closed_at_once(conn)


class TLSKind(POP3Kind):
    """POP3 on a `tls` listener: turned away before any handshake, without a word."""

    busy = b""

    def listener(self) -> dict[str, Any]:
        return {"mode": "tls", "protocol": "pop3"}

    def tls(self, port: int, source: str, host: str = "127.0.0.1") -> ssl.SSLSocket:
        conn = self.case.context.wrap_socket(connect(port, source, host), server_hostname="relay.test")
        assert read_line(conn).startswith(self.greeting)
        return conn

    def hold(self, port: int, source: str, host: str = "127.0.0.1") -> Any:
        conn = self.tls(port, source, host)
        self.case.addCleanup(conn.close)
        return conn

    def session(self, port: int, source: str) -> bool:
        with self.tls(port, source) as conn:
            return self.login(conn)

    def turned_away(self, port: int, source: str, host: str = "127.0.0.1") -> bytes:
        """b"" when the connection is dropped before a handshake can take place."""
        try:
            raw = connect(port, source, host)
        except ConnectionResetError:  # reset before connect() returned
            return b""
        with raw:
            try:
                conn = self.case.context.wrap_socket(raw, server_hostname="relay.test")
            except OSError:  # an SSLError, a reset, an end of stream: no handshake
                return b""
            with conn:
                return b"handshake succeeded: " + read_line(conn)


if TYPE_CHECKING:
    _LimitsBase = FrontEndTestCase
else:
    _LimitsBase = object  # a mixin: collected only through its FrontEndTestCase subclasses


class LimitsTests(_LimitsBase):
    """The three limits, end to end, on one kind of listener (a FrontEndTestCase
    subclass per kind)."""

    kind_class: type[Kind]

    def setUp(self) -> None:
        super().setUp()
        self.kind = self.kind_class(self)

    async def start(self, limits: dict[str, Any], **listener: Any) -> int:
        upstream = self.kind.upstream()
        config = self.front_end_config(connection_limits=limits, **{**self.kind.listener(), **listener})
        _, port = await self.start_proxy(config, router=self.kind.router(upstream))
        return port

    async def sessions_logged(self, count: int) -> None:
        """Wait until `count` session lines are logged (a hang guard, not a timing)."""
        for _ in range(int(WAIT / 0.01)):
            if len(self.logs.sessions()) >= count:
                return
            await deferLater(reactor, 0.01)
        self.fail(f"fewer than {count} session lines were logged")

    def warnings(self) -> list[str]:
        return [line for line in self.logs.lines() if "turning connections away" in line or "turned away" in line]

    async def test_max_per_client_turns_the_excess_away_while_others_are_served(self) -> None:
        port = await self.start({"max_per_client": 2, "max_rate_per_client": 0})
        first = await self.in_thread(self.kind.hold, port, "127.0.0.2")
        await self.in_thread(self.kind.hold, port, "127.0.0.2")
        for _ in range(3):
            self.assertEqual(await self.in_thread(self.kind.turned_away, port, "127.0.0.2"), self.kind.busy)
        self.assertTrue(await self.in_thread(self.kind.session, port, "127.0.0.3"))  # another client is served
        await self.sessions_logged(1)
        self.assertEqual(len(self.logs.sessions()), 1)  # the three turned away opened none
        self.assertEqual(self.warnings(), ["listener test: turning connections away from 127.0.0.2 (max_per_client=2)"])
        first.close()  # a freed place is usable again
        await self.sessions_logged(2)
        self.assertTrue(await self.in_thread(self.kind.session, port, "127.0.0.2"))

    async def test_max_sessions_turns_everyone_away_exempt_or_not_until_a_session_ends(self) -> None:
        port = await self.start({"max_sessions": 2, "exempt": ["127.0.0.0/8"]})
        first = await self.in_thread(self.kind.hold, port, "127.0.0.2")
        await self.in_thread(self.kind.hold, port, "127.0.0.3")
        self.assertEqual(await self.in_thread(self.kind.turned_away, port, "127.0.0.4"), self.kind.busy)
        self.assertEqual(await self.in_thread(self.kind.turned_away, port, "127.0.0.2"), self.kind.busy)
        self.assertEqual(self.warnings(), ["listener test: turning connections away (max_sessions=2)"])
        self.assertEqual(self.logs.sessions(), [])
        first.close()
        await self.sessions_logged(1)
        self.assertTrue(await self.in_thread(self.kind.session, port, "127.0.0.4"))

    async def test_max_rate_per_client_turns_new_connections_away_while_others_are_served(self) -> None:
        port = await self.start({"max_per_client": 0, "max_rate_per_client": 2})
        self.assertTrue(await self.in_thread(self.kind.session, port, "127.0.0.2"))
        self.assertTrue(await self.in_thread(self.kind.session, port, "127.0.0.2"))
        await self.sessions_logged(2)  # both closed: only the rate is left to refuse the next
        self.assertEqual(await self.in_thread(self.kind.turned_away, port, "127.0.0.2"), self.kind.busy)
        self.assertTrue(await self.in_thread(self.kind.session, port, "127.0.0.3"))
        self.assertEqual(self.warnings(), ["listener test: turning connections away from 127.0.0.2 (max_rate_per_client=2/min)"])
        await self.sessions_logged(3)
        self.assertEqual(len(self.logs.sessions()), 3)

    def front_end_config(self, mode: str = "starttls", protocol: str | None = None, **listener: Any) -> dict[str, Any]:
        config = super().front_end_config(mode, protocol or "pop3", **listener)
        config["listener"][0]["name"] = "test"
        if config["listener"][0]["protocol"] == "none":
            del config["listener"][0]["hostname"]
        return config


class SMTPLimitsTests(LimitsTests, FrontEndTestCase):
    kind_class = SMTPKind


class IMAPLimitsTests(LimitsTests, FrontEndTestCase):
    kind_class = IMAPKind


class POP3LimitsTests(LimitsTests, FrontEndTestCase):
    kind_class = POP3Kind


class SpliceLimitsTests(LimitsTests, FrontEndTestCase):
    kind_class = SpliceKind


class TLSLimitsTests(LimitsTests, FrontEndTestCase):
    kind_class = TLSKind


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


class ExemptAndIPv6Tests(FrontEndTestCase):
    protocol = "pop3"

    async def test_exempt_networks_are_not_limited_per_client_where_a_listener_without_them_is(self) -> None:
        upstream = self.server(ScriptedPOP3())
        config = self.front_end_config(connection_limits={"max_per_client": 1, "max_rate_per_client": 1})
        exempt = {**config["listener"][0], "name": "exempt"}
        exempt["connection_limits"] = {"max_per_client": 1, "max_rate_per_client": 1, "exempt": ["127.0.0.0/8"]}
        config["listener"].append(exempt)
        service, limited_port = await self.start_proxy(config, router=Router(answer=password_check(upstream.port)))
        exempting = service.listeners["exempt"].port
        assert exempting is not None
        exempt_port = tcp_port(await exempting)
        kind = POP3Kind(self)
        for _ in range(3):
            await self.in_thread(kind.hold, exempt_port, "127.0.0.2")
        self.assertTrue(await self.in_thread(kind.session, exempt_port, "127.0.0.2"))
        await self.in_thread(kind.hold, limited_port, "127.0.0.2")
        self.assertEqual(await self.in_thread(kind.turned_away, limited_port, "127.0.0.2"), POP3_BUSY)

    async def test_an_ipv6_client_is_limited_too(self) -> None:
        if not ipv6_loopback():
            raise unittest.SkipTest("no IPv6 loopback on this machine")
        self.server(ScriptedPOP3())
        config = self.front_end_config(connection_limits={"max_per_client": 1})
        config["listener"][0]["listen"] = r"tcp6:0:interface=\:\:1"
        _, port = await self.start_proxy(config, router=Router())
        kind = POP3Kind(self)
        await self.in_thread(kind.hold, port, "::1", "::1")
        self.assertEqual(await self.in_thread(kind.turned_away, port, "::1", "::1"), POP3_BUSY)
        warnings = [line for line in self.logs.lines() if "turning connections away" in line]
        self.assertEqual(warnings, ["listener pop3: turning connections away from ::/64 (max_per_client=1)"])
