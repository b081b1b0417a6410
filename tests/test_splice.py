"""
The `splice` listener end to end: real sockets on loopback, a real upstream server in
threads, mailrelay in the reactor.
"""

from __future__ import annotations

import errno
import hashlib
import socket
import threading
from typing import Any, cast

import pytest
from twisted.internet import reactor, tcp
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from mailrelay import zerocopy
from mailrelay.connector import UpstreamProtocol
from mailrelay.listener import SpliceModeProtocol
from mailrelay.router import Route, Router
from mailrelay.service import MailrelayService
from mailrelay.splice import Splice, SpliceableProtocol, SpliceResult
from mailrelay.zerocopy import PIPE_SIZE, ZeroCopyPump
from tests.support.clocked import connecting_to, owner
from tests.support.net import (
    WAIT,
    ProxyTestCase,
    closed_port,
    connect,
    digest_after_eof,
    echo,
    exchange,
    payload,
    recv_all,
    recv_exactly,
    reset,
    sha,
    splice_config,
    zero_copy_pumps,
)

MiB = 1 << 20


def hash_and_answer(answer: bytes) -> Any:
    """Upstream handler: read to EOF (hashing) while sending `answer`, then close."""

    def handle(conn: socket.socket) -> tuple[str, int]:
        def send_then_end() -> None:
            conn.sendall(answer)
            conn.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send_then_end, daemon=True)
        sender.start()
        received = recv_all(conn)
        sender.join(WAIT)
        return sha(received), len(received)

    return handle


def protocol_of(selectable: Any) -> Any:
    protocol = getattr(selectable, "protocol", None)
    # Client endpoints wrap the protocol they connect.
    return getattr(protocol, "_wrappedProtocol", protocol)


def proxy_buffered(kind: type) -> list[int]:
    """Bytes waiting in mailrelay's own write buffers, per transport whose protocol is `kind`."""
    sizes = []
    for selectable in set(reactor.getReaders()) | set(reactor.getWriters()):
        if isinstance(selectable, tcp.Connection) and isinstance(protocol_of(selectable), kind):
            sizes.append(len(selectable.dataBuffer) - selectable.offset + selectable._tempDataLen)
    return sizes


class OnBothPumps(ProxyTestCase):
    """
    Runs a test class's sessions on the zero-copy pump (`zero_copy` true, the default)
    and, in its `...OnUserspacePump` subclass, on the userspace one; fails if the pump
    the class is about was not the one that carried the sessions.
    """

    zero_copy = True

    def setUp(self) -> None:
        super().setUp()
        self.pumps_started = 0
        start = ZeroCopyPump.start

        def counting_start(pump: ZeroCopyPump) -> None:
            self.pumps_started += 1
            start(pump)

        self.patch(ZeroCopyPump, "start", counting_start)
        self.addCleanup(self._check_pump)

    def _check_pump(self) -> None:
        if self.zero_copy:
            self.assertGreater(self.pumps_started, 0, "no session went through the zero-copy pump")
        else:
            self.assertEqual(self.pumps_started, 0, "a session went through the zero-copy pump")

    async def start_proxy(
        self, config: dict[str, Any], router: Any = None, clock: Clock | None = None
    ) -> tuple[MailrelayService, int]:
        for listener in config["listener"]:
            listener["zero_copy"] = self.zero_copy
        return await super().start_proxy(config, router, clock)


def on_userspace_pump(cls: type[OnBothPumps]) -> type[OnBothPumps]:
    """`cls` again, as `<name>OnUserspacePump` with the zero-copy pump off."""
    return type(f"{cls.__name__}OnUserspacePump", (cls,), {"zero_copy": False, "__module__": cls.__module__})


class SettableRouter(Router):
    """Answers with whatever `answer` holds (a Route, a list, an exception or a Deferred)."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.requests: list[Any] = []

    def route(self, request: Any) -> Any:
        self.requests.append(request)
        if isinstance(self.answer, BaseException):
            raise self.answer
        if callable(self.answer):
            return self.answer(request)
        return self.answer


class BulkTransferTests(OnBothPumps):
    @pytest.mark.slow
    async def test_64_mib_each_way_arrive_byte_identical(self) -> None:
        down = payload(64 * MiB)
        up = payload(64 * MiB)
        upstream = self.server(hash_and_answer(down))
        _, port = await self.start_proxy(splice_config(("127.0.0.1", upstream.port)))

        received = await self.in_thread(exchange, port, up)
        at_upstream = await self.in_thread(upstream.result)

        self.assertEqual(at_upstream, (sha(up), len(up)))
        self.assertEqual((sha(received), len(received)), (sha(down), len(down)))
        await deferLater(reactor, 0.1)
        [line] = self.logs.sessions()
        self.assertEqual((line["bytes_up"], line["bytes_down"], line["outcome"]), (len(up), len(down), "closed"))

    @pytest.mark.slow
    async def test_1_gib_each_way_at_once_arrives_hash_identical(self) -> None:
        size, block = 1 << 30, payload(16 * MiB, seed=3)
        expected = hashlib.sha256()
        for _ in range(size // len(block)):
            expected.update(block)

        def send_blocks(conn: socket.socket) -> None:
            for _ in range(size // len(block)):
                conn.sendall(block)
            conn.shutdown(socket.SHUT_WR)

        def hash_until_eof(conn: socket.socket) -> tuple[str, int]:
            digest, count, buffer = hashlib.sha256(), 0, bytearray(4 * MiB)
            while received := conn.recv_into(buffer):
                digest.update(memoryview(buffer)[:received])
                count += received
            return digest.hexdigest(), count

        def upstream_handler(conn: socket.socket) -> tuple[str, int]:
            sender = threading.Thread(target=send_blocks, args=(conn,), daemon=True)
            sender.start()
            result = hash_until_eof(conn)
            sender.join(WAIT)
            return result

        def client(port: int) -> tuple[str, int]:
            with connect(port) as conn:
                conn.settimeout(None)
                sender = threading.Thread(target=send_blocks, args=(conn,), daemon=True)
                sender.start()
                result = hash_until_eof(conn)
                sender.join(WAIT)
                return result

        upstream = self.server(upstream_handler)
        _, port = await self.start_proxy(splice_config(("127.0.0.1", upstream.port)))

        self.assertEqual(await self.in_thread(client, port), (expected.hexdigest(), size))
        self.assertEqual(await self.in_thread(upstream.result), (expected.hexdigest(), size))
        line = await self.session_line()
        self.assertEqual((line["bytes_up"], line["bytes_down"], line["outcome"]), (size, size, "closed"))

    async def test_many_small_writes_arrive_in_order(self) -> None:
        upstream = self.server(echo)
        _, port = await self.start_proxy(splice_config(("127.0.0.1", upstream.port)))
        pieces = [payload(n % 97 + 1, seed=n + 1) for n in range(5000)]

        def client() -> bytes:
            with connect(port) as conn:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                reader = threading.Thread(target=lambda: result.append(recv_all(conn)), daemon=True)
                reader.start()
                for piece in pieces:
                    conn.send(piece)
                conn.shutdown(socket.SHUT_WR)
                reader.join(WAIT)
                return result[0]

        result: list[bytes] = []
        received = await self.in_thread(client)
        self.assertEqual(received, b"".join(pieces))
        self.assertEqual(await self.in_thread(upstream.result), len(received))


class BackPressureTests(OnBothPumps):
    """A reader that stops reading makes mailrelay stop reading from the writer."""

    async def _stalled_transfer(self, client_writes: bool) -> None:
        data = payload(64 * MiB)
        release = threading.Event()
        stalled = threading.Event()
        progress = {"sent": 0}

        def send_until_stalled(conn: socket.socket) -> None:
            """Send until no byte is accepted for a second, then wait for release."""
            view = memoryview(data)
            conn.settimeout(1.0)
            while progress["sent"] < len(data):
                try:
                    progress["sent"] += conn.send(view[progress["sent"] : progress["sent"] + MiB])
                except TimeoutError:
                    break
            stalled.set()
            release.wait(WAIT)
            conn.settimeout(WAIT)
            conn.sendall(view[progress["sent"] :])
            conn.shutdown(socket.SHUT_WR)

        def slow_reader(conn: socket.socket) -> str:
            release.wait(WAIT)
            return sha(recv_all(conn))

        def upstream_handler(conn: socket.socket) -> Any:
            if client_writes:
                return slow_reader(conn)
            send_until_stalled(conn)
            return recv_all(conn)

        upstream = self.server(upstream_handler)
        _, port = await self.start_proxy(splice_config(("127.0.0.1", upstream.port)))

        conn = await self.in_thread(connect, port)
        self.addCleanup(conn.close)
        if client_writes:
            writer = self.in_thread(send_until_stalled, conn)
        await self.in_thread(stalled.wait, WAIT)

        # The writer got stuck long before the payload was through: mailrelay stopped
        # reading from it instead of buffering what the reader did not take.
        self.assertLess(progress["sent"], len(data) // 2)
        if self.zero_copy:  # what is in flight waits in the pump's pipe, bounded by its size
            [pump] = zero_copy_pumps()
            self.assertGreater(pump.in_flight, 0)
            self.assertLessEqual(pump.in_flight, PIPE_SIZE)
        else:
            slow_side = UpstreamProtocol if client_writes else SpliceModeProtocol
            buffered = proxy_buffered(slow_side)
            self.assertEqual(len(buffered), 1)
            self.assertLessEqual(buffered[0], 512 * 1024)

        release.set()
        if client_writes:
            await writer
            self.assertEqual(await self.in_thread(upstream.result), sha(data))
        else:
            conn.shutdown(socket.SHUT_WR)
            received = await self.in_thread(recv_all, conn)
            self.assertEqual(sha(received), sha(data))
            self.assertEqual(await self.in_thread(upstream.result), b"")

    @pytest.mark.slow
    async def test_slow_upstream_pauses_the_client(self) -> None:
        await self._stalled_transfer(client_writes=True)

    @pytest.mark.slow
    async def test_slow_client_pauses_the_upstream(self) -> None:
        await self._stalled_transfer(client_writes=False)


class HalfCloseTests(OnBothPumps):
    async def test_client_end_of_stream_reaches_upstream_which_still_answers(self) -> None:
        upstream = self.server(digest_after_eof)
        _, port = await self.start_proxy(splice_config(("127.0.0.1", upstream.port)))
        question = payload(300_000)

        answer = await self.in_thread(exchange, port, question)

        self.assertEqual(answer, sha(question).encode())
        self.assertEqual(await self.in_thread(upstream.result), len(question))

    async def test_upstream_end_of_stream_reaches_client_which_still_sends(self) -> None:
        def greet_then_listen(conn: socket.socket) -> bytes:
            conn.sendall(b"220 hello\r\n")
            conn.shutdown(socket.SHUT_WR)
            return recv_all(conn)

        upstream = self.server(greet_then_listen)
        _, port = await self.start_proxy(splice_config(("127.0.0.1", upstream.port)))

        def client() -> bytes:
            with connect(port) as conn:
                greeting = recv_all(conn)  # returns at the upstream's EOF
                conn.sendall(b"still talking after your EOF\r\n")
                conn.shutdown(socket.SHUT_WR)
                self.assertEqual(conn.recv(10), b"")
                return greeting

        self.assertEqual(await self.in_thread(client), b"220 hello\r\n")
        self.assertEqual(await self.in_thread(upstream.result), b"still talking after your EOF\r\n")
        await deferLater(reactor, 0.1)
        [line] = self.logs.sessions()
        self.assertEqual(line["outcome"], "closed")
        self.assertEqual(line["reason"], "upstream closed first")


class EarlyBytesTests(OnBothPumps):
    async def test_bytes_sent_before_the_upstream_is_connected_are_delivered_first(self) -> None:
        upstream = self.server(echo)
        slow: Deferred[Route] = Deferred()
        router = SettableRouter(lambda request: slow)
        _, port = await self.start_proxy(splice_config(("127.0.0.1", 1)), router=router)
        early = payload(200_000, seed=7)  # more than the pending limit: reading pauses

        def client() -> bytes:
            with connect(port) as conn:
                conn.sendall(early)
                cast(IReactorFromThreads, reactor).callFromThread(slow.callback, Route(host="127.0.0.1", port=upstream.port))
                conn.sendall(b"late")
                conn.shutdown(socket.SHUT_WR)
                return recv_all(conn)

        self.assertEqual(await self.in_thread(client), early + b"late")


class RoutingFailureTests(ProxyTestCase):
    def _client_sees_close(self, port: int) -> Deferred[bytes]:
        """A client that connects, sends nothing, and reads until the close: what it read."""

        def client() -> bytes:
            with connect(port) as conn:
                return recv_all(conn)

        return cast("Deferred[bytes]", self.in_thread(client))

    async def _session_line(self) -> Any:
        for _ in range(50):
            if self.logs.sessions():
                break
            await deferLater(reactor, 0.02)
        return self.logs.sessions()[-1]

    async def test_refused_upstream_closes_client_and_logs_why_and_next_session_works(self) -> None:
        upstream = self.server(echo)
        router = SettableRouter(Route(host="127.0.0.1", port=closed_port()))
        _, port = await self.start_proxy(splice_config(("127.0.0.1", 1)), router=router)

        self.assertEqual(await self._client_sees_close(port), b"")
        line = await self._session_line()
        self.assertEqual(line["outcome"], "upstream-unavailable")
        self.assertIn("connection refused", line["reason"])
        self.assertTrue(any("failed: connection refused" in text for text in self.logs.lines()))

        router.answer = Route(host="127.0.0.1", port=upstream.port)
        self.assertEqual(await self.in_thread(exchange, port, b"next"), b"next")

    async def test_fallback_route_is_used_when_the_first_refuses(self) -> None:
        upstream = self.server(echo)
        dead = closed_port()
        _, port = await self.start_proxy(splice_config(("127.0.0.1", dead), ("127.0.0.1", upstream.port)))

        self.assertEqual(await self.in_thread(exchange, port, b"via fallback"), b"via fallback")
        line = await self._session_line()
        self.assertEqual((line["outcome"], line["upstream"]), ("closed", f"127.0.0.1:{upstream.port}"))
        self.assertTrue(any(f"upstream 127.0.0.1:{dead} failed: connection refused" in t for t in self.logs.lines()))

    async def test_unreachable_upstream_times_out(self) -> None:
        clock = Clock()
        host, unreachable = self.black_hole()
        config = splice_config((host, unreachable))
        config["upstream"] = {"connect_timeout": 10}
        _, port = await self.start_proxy(config, clock=clock)

        closed = self._client_sees_close(port)
        await self.eventually(lambda: connecting_to(unreachable), "mailrelay did not start connecting")
        clock.advance(10)
        self.assertEqual(await closed, b"")
        line = await self._session_line()
        self.assertEqual(line["outcome"], "upstream-unavailable")
        self.assertIn("no connection within 10s", line["reason"])

    async def test_a_client_whose_bytes_were_never_read_sees_a_clean_close(self) -> None:
        """Closing a socket with unread bytes makes the kernel reset the connection,
        which can destroy what was said last: mailrelay ends its side, reads and drops
        until the client ends too (a lingering close)."""
        from mailrelay.router import Reject

        answer: Deferred[Route] = Deferred()
        router = SettableRouter(lambda request: answer)
        _, port = await self.start_proxy(splice_config(("127.0.0.1", 1)), router=router)
        unread = payload(300_000, seed=9)  # past the pending limit: reading pauses, the rest waits unread

        def client() -> tuple[bytes, bytes]:
            with connect(port) as conn:
                conn.sendall(unread)
                cast(IReactorFromThreads, reactor).callFromThread(answer.errback, Reject("not from here"))
                first = recv_all(conn)  # the end of mailrelay's stream, not a reset
                conn.sendall(b"still sending after the close")  # dropped, not answered with a reset
                conn.shutdown(socket.SHUT_WR)
                return first, recv_all(conn)

        self.assertEqual(await self.in_thread(client), (b"", b""))
        line = await self._session_line()
        self.assertEqual((line["outcome"], line["reason"]), ("rejected", "not from here"))

    async def test_a_lingering_close_ends_after_its_timeout(self) -> None:
        from mailrelay.router import Reject
        from mailrelay.splice import SpliceableProtocol

        clock = Clock()
        router = SettableRouter(Reject("not from here"))
        _, port = await self.start_proxy(splice_config(("127.0.0.1", 1)), router=router, clock=clock)
        conn = await self.in_thread(connect, port)
        self.addCleanup(conn.close)
        await self.in_thread(conn.sendall, b"data the client keeps sending")
        self.assertEqual(await self.in_thread(conn.recv, 100), b"")  # mailrelay's side has ended
        await self.in_thread(conn.sendall, b"more")  # the client does not end its own

        def lingering() -> bool:
            return any(owner(call).__class__.__mro__.count(SpliceableProtocol) for call in clock.getDelayedCalls())

        await self.eventually(lingering, "no lingering close")
        clock.advance(SpliceableProtocol.linger_timeout)
        # Closed now: the client's next write is answered with a reset.
        await self.eventually(lambda: not lingering(), "the lingering close did not end")

    async def test_reject_closes_after_its_wait(self) -> None:
        from mailrelay.router import Reject

        clock = Clock()
        router = SettableRouter(Reject("not from here", wait=5))
        _, port = await self.start_proxy(splice_config(("127.0.0.1", 1)), router=router, clock=clock)

        closed = self._client_sees_close(port)
        await self.eventually(lambda: router.requests, "the Router was not asked")
        clock.advance(4)
        self.assertEqual(self.logs.sessions(), [])  # still waiting
        clock.advance(1)
        self.assertEqual(await closed, b"")
        line = await self._session_line()
        self.assertEqual((line["outcome"], line["reason"]), ("rejected", "not from here"))
        self.assertEqual(line["duration"], 5)

    async def test_router_exception_is_logged_and_the_client_closed(self) -> None:
        router = SettableRouter(ZeroDivisionError("bug in a router"))
        _, port = await self.start_proxy(splice_config(("127.0.0.1", 1)), router=router)

        self.assertEqual(await self._client_sees_close(port), b"")
        line = await self._session_line()
        self.assertEqual(line["outcome"], "router-error")
        self.assertIn("bug in a router", line["reason"])
        self.assertTrue(any("bug in a router" in text for text in self.logs.lines()))
        self.flushLoggedErrors(ZeroDivisionError)

    async def test_router_answering_nonsense_is_a_router_error(self) -> None:
        router = SettableRouter("127.0.0.1:25")
        _, port = await self.start_proxy(splice_config(("127.0.0.1", 1)), router=router)

        self.assertEqual(await self._client_sees_close(port), b"")
        line = await self._session_line()
        self.assertEqual(line["outcome"], "router-error")
        self.assertIn("expected a Route", line["reason"])

    async def test_router_that_never_answers_times_out(self) -> None:
        clock = Clock()
        router = SettableRouter(lambda request: Deferred())
        config = splice_config(("127.0.0.1", 1), router_timeout=30)
        _, port = await self.start_proxy(config, router=router, clock=clock)

        closed = self._client_sees_close(port)
        await self.eventually(lambda: router.requests, "the Router was not asked")
        clock.advance(30)
        self.assertEqual(await closed, b"")
        line = await self._session_line()
        self.assertEqual((line["outcome"], line["reason"]), ("router-error", "router did not answer within 30s"))

    async def test_client_leaving_while_routing_cancels_the_router(self) -> None:
        cancelled: list[bool] = []
        pending: Deferred[Route] = Deferred(lambda d: cancelled.append(True))
        router = SettableRouter(lambda request: pending)
        _, port = await self.start_proxy(splice_config(("127.0.0.1", 1)), router=router)

        conn = await self.in_thread(connect, port)
        while not router.requests:
            await deferLater(reactor, 0.01)
        # A reset, not an end of stream: a half-closed client is still routed and
        # its bytes delivered, a vanished one is not.
        reset(conn)
        line = await self._session_line()
        self.assertEqual(line["outcome"], "client-gone")
        self.assertEqual(cancelled, [True])

    async def test_client_leaving_while_connecting_stops_trying_routes(self) -> None:
        fallback = self.server(echo)
        _, port = await self.start_proxy(splice_config(self.black_hole(), ("127.0.0.1", fallback.port)))

        conn = await self.in_thread(connect, port)
        await deferLater(reactor, 0.3)
        reset(conn)
        line = await self._session_line()
        self.assertEqual(line["outcome"], "client-gone")
        await deferLater(reactor, 0.2)
        self.assertEqual(fallback.connections, 0)

    async def test_router_sees_connection_facts(self) -> None:
        upstream = self.server(echo)
        router = SettableRouter(Route(host="127.0.0.1", port=upstream.port))
        _, port = await self.start_proxy(splice_config(("127.0.0.1", 1)), router=router)

        def client() -> tuple[str, int]:
            with connect(port) as conn:
                conn.shutdown(socket.SHUT_WR)
                recv_all(conn)
                return conn.getsockname()

        client_address = await self.in_thread(client)
        [request] = router.requests
        self.assertEqual(
            (request.listener, request.protocol, request.mode, request.client, request.local, request.user),
            ("test", "none", "splice", client_address, ("127.0.0.1", port), None),
        )


class SocketOptionTests(OnBothPumps):
    async def test_nagle_is_off_on_both_legs(self) -> None:
        release = threading.Event()
        upstream = self.server(lambda conn: release.wait(WAIT))
        _, port = await self.start_proxy(splice_config(("127.0.0.1", upstream.port)))
        self.addCleanup(release.set)
        conn = await self.in_thread(connect, port)
        self.addCleanup(conn.close)

        def options() -> dict[type, int]:
            """TCP_NODELAY of the sockets the reactor watches for the session, by protocol."""
            found = {}
            for selectable in set(reactor.getReaders()) | set(reactor.getWriters()):
                connection = getattr(selectable, "connection", selectable)  # a zero-copy pump's socket
                protocol = protocol_of(connection)
                if isinstance(connection, tcp.Connection) and isinstance(protocol, (UpstreamProtocol, SpliceModeProtocol)):
                    found[type(protocol)] = connection.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            return found

        await self.eventually(lambda: len(options()) == 2, "the session was not spliced")
        self.assertEqual(options(), {UpstreamProtocol: 1, SpliceModeProtocol: 1})


class HandBackTests(OnBothPumps):
    """A session closed by mailrelay while bytes are in flight towards a reader that
    does not read: every byte mailrelay read reaches that reader, in order."""

    @pytest.mark.slow  # a second of the upstream's sending getting nowhere tells it stalled
    async def test_bytes_in_flight_at_an_idle_timeout_still_reach_the_client(self) -> None:
        clock = Clock()
        data = payload(32 * MiB, seed=5)
        stalled = threading.Event()

        def send_until_stalled(conn: socket.socket) -> None:
            conn.settimeout(1.0)
            sent = 0
            try:
                while sent < len(data):
                    sent += conn.send(data[sent : sent + MiB])
            except TimeoutError:
                pass
            stalled.set()
            recv_all(conn)

        upstream = self.server(send_until_stalled)
        _, port = await self.start_proxy(splice_config(("127.0.0.1", upstream.port), idle_timeout=600), clock=clock)
        conn = await self.in_thread(connect, port)
        self.addCleanup(conn.close)
        await self.in_thread(stalled.wait, WAIT)
        if self.zero_copy:
            [pump] = zero_copy_pumps()
            self.assertGreater(pump.in_flight, 0)  # the case this test is about

        clock.advance(600)
        received = await self.in_thread(recv_all, conn)

        line = await self.session_line()
        self.assertEqual(line["outcome"], "idle-timeout")
        self.assertEqual(len(received), line["bytes_down"])
        self.assertEqual(received, data[: len(received)])

    async def test_an_abort_from_elsewhere_ends_the_session_cleanly(self) -> None:
        """Something else (a front-end's timer, a drain) aborts the client's transport
        while the session is spliced: the pump lets go, the upstream is closed, the
        session ends, nothing fails."""
        upstream = self.server(echo)
        _, port = await self.start_proxy(splice_config(("127.0.0.1", upstream.port)))
        conn = await self.in_thread(connect, port)
        self.addCleanup(conn.close)
        await self.in_thread(conn.sendall, b"hello")
        self.assertEqual(await self.in_thread(recv_exactly, conn, 5), b"hello")  # through, both ways

        def client_connection() -> tcp.Connection | None:
            for selectable in set(reactor.getReaders()) | set(reactor.getWriters()):
                connection = getattr(selectable, "connection", selectable)  # a zero-copy pump's socket
                if isinstance(connection, tcp.Server) and isinstance(protocol_of(connection), SpliceModeProtocol):
                    return connection
            return None

        await self.eventually(client_connection, "the session was not spliced")
        connection = client_connection()
        assert connection is not None
        connection.abortConnection()

        self.assertEqual(await self.in_thread(upstream.result), 5)  # its end of stream came
        line = await self.session_line()
        self.assertEqual((line["outcome"], line["bytes_up"], line["bytes_down"]), ("closed", 5, 5))
        self.assertEqual(zero_copy_pumps(), set())
        self.assertEqual(self.flushLoggedErrors(), [])


class ZeroCopyResourceTests(ProxyTestCase):
    """The zero-copy pump needs two more descriptors per session and pipes: without
    them a session carries on in userspace, byte for byte."""

    async def test_no_descriptor_to_duplicate_keeps_the_session_in_userspace(self) -> None:
        def no_descriptor_left(fd: int) -> int:
            raise OSError(errno.EMFILE, "Too many open files")

        self.patch(zerocopy.os, "dup", no_descriptor_left)
        upstream = self.server(echo)
        _, port = await self.start_proxy(splice_config(("127.0.0.1", upstream.port)))
        data = payload(3 * MiB, seed=11)

        self.assertEqual(await self.in_thread(exchange, port, data), data)
        line = await self.session_line()
        self.assertEqual((line["outcome"], line["bytes_up"], line["bytes_down"]), ("closed", len(data), len(data)))
        self.assertEqual(self.flushLoggedErrors(), [])

    async def test_no_pipe_in_mid_session_hands_the_bytes_to_userspace(self) -> None:
        release = threading.Event()
        upstream = self.server(echo)
        _, port = await self.start_proxy(splice_config(("127.0.0.1", upstream.port)))
        first, rest = payload(2 * MiB, seed=12), payload(6 * MiB, seed=13)

        def client() -> bytes:
            with connect(port) as conn:
                conn.sendall(first)
                echoed = recv_exactly(conn, len(first))
                release.wait(WAIT)

                def send_rest() -> None:
                    conn.sendall(rest)
                    conn.shutdown(socket.SHUT_WR)

                sender = threading.Thread(target=send_rest, daemon=True)
                sender.start()
                echoed += recv_all(conn)
                sender.join(WAIT)
                return echoed

        def no_pipe() -> Any:
            raise OSError(errno.EMFILE, "Too many open files")

        talking = self.in_thread(client)
        await self.eventually(zero_copy_pumps, "the session did not go through the zero-copy pump")
        self.patch(zerocopy.POOL, "take", no_pipe)
        release.set()

        self.assertEqual(await talking, first + rest)
        self.assertEqual(zero_copy_pumps(), set())
        line = await self.session_line()
        self.assertEqual((line["outcome"], line["bytes_up"], line["bytes_down"]), ("closed", 8 * MiB, 8 * MiB))
        self.assertEqual(self.flushLoggedErrors(), [])

    async def test_past_the_descriptor_budget_sessions_use_the_userspace_pump(self) -> None:
        self.patch(zerocopy, "DESCRIPTOR_BUDGET", 2)  # room for one pump's two duplicates
        upstream = self.server(echo)
        _, port = await self.start_proxy(splice_config(("127.0.0.1", upstream.port)))
        first = await self.in_thread(connect, port)
        self.addCleanup(first.close)
        await self.eventually(lambda: len(zero_copy_pumps()) == 1, "the first session got no pump")

        self.assertEqual(await self.in_thread(exchange, port, b"second session"), b"second session")
        self.assertEqual(len(zero_copy_pumps()), 1)  # the first one's still; none for the second


class IdleAndDrainTests(ProxyTestCase):
    async def test_idle_session_is_closed(self) -> None:
        clock = Clock()
        release = threading.Event()
        upstream = self.server(lambda conn: (release.wait(WAIT), recv_all(conn)))
        _, port = await self.start_proxy(splice_config(("127.0.0.1", upstream.port), idle_timeout=600), clock=clock)
        self.addCleanup(release.set)

        def client() -> bytes:
            with connect(port) as conn:
                return recv_all(conn)

        def spliced() -> bool:
            """The splice's idle timer runs."""
            return any(isinstance(owner(call), Splice) for call in clock.getDelayedCalls())

        closed = self.in_thread(client)
        await self.eventually(spliced, "the session was not spliced")
        clock.advance(600)
        self.assertEqual(await closed, b"")
        line = self.logs.sessions()[-1]
        self.assertEqual(line["outcome"], "idle-timeout")

    async def test_stopping_waits_for_running_sessions_and_refuses_new_ones(self) -> None:
        upstream = self.server(echo)
        service, port = await self.start_proxy(splice_config(("127.0.0.1", upstream.port)))
        conn = await self.in_thread(connect, port)
        self.addCleanup(conn.close)
        await self.in_thread(conn.sendall, b"before stop ")
        self.assertEqual(await self.in_thread(conn.recv, 100), b"before stop ")

        stopped = service.stopService()
        await deferLater(reactor, 0.05)
        self.assertFalse(stopped.called)
        with self.assertRaises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        await self.in_thread(conn.sendall, b"during drain")
        self.assertEqual(await self.in_thread(conn.recv, 100), b"during drain")
        conn.shutdown(socket.SHUT_WR)
        self.assertEqual(await self.in_thread(recv_all, conn), b"")
        await stopped
        self.assertEqual(self.logs.sessions()[-1]["outcome"], "closed")

    async def test_sessions_still_open_after_the_drain_timeout_are_aborted(self) -> None:
        upstream = self.server(echo)
        config = splice_config(("127.0.0.1", upstream.port))
        config["drain_timeout"] = 30
        clock = Clock()
        service, port = await self.start_proxy(config, clock=clock)
        conn = await self.in_thread(connect, port)
        self.addCleanup(conn.close)
        await self.in_thread(conn.sendall, b"x")
        self.assertEqual(await self.in_thread(conn.recv, 1), b"x")

        def draining() -> bool:
            """The drain timeout runs."""
            return any(owner(call) is service.sessions for call in clock.getDelayedCalls())

        stopping = service.stopService()
        await self.eventually(draining, "the service did not start draining")
        clock.advance(30)
        await stopping

        self.assertEqual(self.logs.sessions()[-1]["outcome"], "drain-timeout")
        with self.assertRaises(ConnectionResetError):
            conn.recv(1)


class _Peer(SpliceableProtocol):
    pass


def _spliced(idle_timeout: float) -> tuple[Splice, Clock, _Peer, _Peer, Deferred[Any]]:
    clock = Clock()
    client, upstream = _Peer(), _Peer()
    client.makeConnection(StringTransport())
    upstream.makeConnection(StringTransport())
    splice = Splice(client, upstream, clock, idle_timeout)
    return splice, clock, client, upstream, splice.start()


def test_idle_timer_counts_from_the_last_byte_in_either_direction() -> None:
    splice, clock, client, upstream, done = _spliced(idle_timeout=10)
    clock.advance(9)
    client.dataReceived(b"a")
    clock.advance(9)
    upstream.dataReceived(b"b")
    clock.advance(9.5)
    assert not client.transport.disconnecting
    clock.advance(1)
    assert client.transport.disconnecting and upstream.transport.disconnecting
    for peer in (client, upstream):
        peer.connectionLost(Failure(ConnectionError("aborted")))
    result = done.result
    assert isinstance(result, SpliceResult)
    assert (result.outcome, result.bytes_up, result.bytes_down, result.ended_by) == ("idle-timeout", 1, 1, None)
    assert upstream.transport.value() == b"a" and client.transport.value() == b"b"


def test_bytes_and_end_of_stream_kept_before_the_splice_are_delivered() -> None:
    clock = Clock()
    client, upstream = _Peer(), _Peer()
    client.makeConnection(StringTransport())
    upstream.makeConnection(StringTransport())
    client.dataReceived(b"EHLO early\r\n")
    client.readConnectionLost()
    upstream.dataReceived(b"220 greeting\r\n")

    Splice(client, upstream, clock, 60).start()

    assert upstream.transport.value() == b"EHLO early\r\n"
    assert client.transport.value() == b"220 greeting\r\n"
    assert clock.getDelayedCalls()  # the idle timer runs


def test_a_peer_that_never_reads_is_aborted_after_the_other_side_is_gone() -> None:
    splice, clock, client, upstream, done = _spliced(idle_timeout=3600)
    upstream.dataReceived(b"a reply the client will never read")
    client.connectionLost(Failure(ConnectionError("reset")))
    assert upstream.transport.disconnecting and not upstream.transport.disconnected
    clock.advance(splice.close_grace)
    assert upstream.transport.disconnected  # aborted
    upstream.connectionLost(Failure(ConnectionError("aborted")))
    result = done.result
    assert isinstance(result, SpliceResult)
    assert (result.outcome, result.ended_by) == ("closed", "client")
    assert not clock.getDelayedCalls()


class IPv6Tests(OnBothPumps):
    async def test_ipv6_listener_and_upstream(self) -> None:
        upstream = self.server(echo, host="::1")
        config = splice_config(("::1", upstream.port))
        config["listener"][0]["listen"] = r"tcp6:0:interface=\:\:1"
        _, port = await self.start_proxy(config)

        def client() -> bytes:
            with socket.create_connection(("::1", port), timeout=WAIT) as conn:
                conn.sendall(b"over IPv6")
                conn.shutdown(socket.SHUT_WR)
                return recv_all(conn)

        self.assertEqual(await self.in_thread(client), b"over IPv6")
        await deferLater(reactor, 0.1)
        [line] = self.logs.sessions()
        self.assertEqual(line["upstream"], f"[::1]:{upstream.port}")
        self.assertTrue(line["client"].startswith("[::1]:"))


class AbruptClientTests(ProxyTestCase):
    async def test_clients_that_vanish_at_every_stage_leave_no_session_behind(self) -> None:
        upstream = self.server(echo)
        slow_route: list[Deferred[Route]] = []

        def route(request: Any) -> Any:
            if len(router.requests) % 3 == 0:  # every third session waits for its route
                d: Deferred[Route] = Deferred()
                slow_route.append(d)
                return d
            return Route(host="127.0.0.1", port=upstream.port)

        router = SettableRouter(route)
        service, port = await self.start_proxy(splice_config(("127.0.0.1", 1)), router=router)

        def abrupt_clients() -> None:
            for i in range(60):
                conn = connect(port)
                if i % 2:
                    conn.sendall(b"half a command")
                if i % 4 == 1:
                    conn.close()  # end of stream
                else:
                    reset(conn)

        await self.in_thread(abrupt_clients)
        for _ in range(500):
            if len(service.sessions) == len([d for d in slow_route if not d.called]):
                break
            await deferLater(reactor, 0.02)
        for d in slow_route:
            if not d.called:
                d.callback(Route(host="127.0.0.1", port=upstream.port))
        for _ in range(500):
            if not len(service.sessions):
                break
            await deferLater(reactor, 0.02)

        self.assertEqual(len(service.sessions), 0)
        self.assertEqual(len(self.logs.sessions()), 60)
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertEqual(await self.in_thread(exchange, port, b"still serving"), b"still serving")


BulkTransferTestsOnUserspacePump = on_userspace_pump(BulkTransferTests)
BackPressureTestsOnUserspacePump = on_userspace_pump(BackPressureTests)
HalfCloseTestsOnUserspacePump = on_userspace_pump(HalfCloseTests)
EarlyBytesTestsOnUserspacePump = on_userspace_pump(EarlyBytesTests)
IPv6TestsOnUserspacePump = on_userspace_pump(IPv6Tests)
SocketOptionTestsOnUserspacePump = on_userspace_pump(SocketOptionTests)
HandBackTestsOnUserspacePump = on_userspace_pump(HandBackTests)
