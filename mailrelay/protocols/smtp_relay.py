"""
An SMTP session after its login (or, with auth "none", after its first recipient):
mailrelay stays between client and upstream, reading the client's command lines and the
upstream's replies, so that what the upstream hears is only what `core.smtp_stream`
lets through, whatever the client pipelines, smuggles or leaves unfinished. What is said
to the client in its own words (a refused recipient, the timeout) is the SMTP core's
(`core.smtp`), which also keeps the count of refused recipients.

    client commands --[smtp_stream.command]--> forwarded, or answered locally in turn
    upstream replies --[one per forwarded command, in order]--> the client
    DATA --> upstream's 354 --> content checked and carried to CRLF.CRLF --> its reply
    BDAT n --> n bytes checked and carried (pipelined, as RFC 3030 allows)

Invariants:
- Replies reach the client in the order of its commands: a local answer waits behind
  the replies still owed by the upstream for the commands before it.
- State changes only on what the upstream did. Content follows DATA only once the
  upstream said 354 (until then the client's next bytes are commands, as they are for
  the upstream); the transaction (MAIL) the Router hears of is the one the upstream
  accepted, and ends on the upstream's 2xx to RSET, HELO or EHLO, or after a message.
- `vet = True` (`vet_recipients = "all"`): every RCPT is asked of the Router, in or out
  of a transaction, once the upstream has answered everything before it; a refused one
  never reaches the upstream.
- Content with a bare CR or LF never reaches the upstream complete: mailrelay drops the
  upstream connection (the upstream discards the unfinished message), skips the rest of
  the client's message, answers `554 5.6.0` and closes.
- Memory is bounded: each connection stops being read while the other's transport is
  full (`splice.Pacer`), and at most `MAX_PIPELINE` replies may be owed at once.
- The session ends when both connections are gone: once it is over, each is closed
  after what was written to it, and aborted `close_grace` seconds later if its peer
  has not taken it (a client that reads nothing), as a `Splice` does.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..ask import ask_router
from ..connector import Upstream
from ..core import smtp_stream as stream
from ..core.smtp import SMTPCore
from ..core.smtp_stream import Answer, BareNewline, Chunk, ContentChecker, DataReader, Discard, Forward
from ..router import Reject, RouterError
from ..splice import LineTooLong, Pacer, PeerClosed, SpliceResult
from ..timers import cancel
from ..zerocopy import write_through
from .frontend import FrontEnd

MAX_PIPELINE = 100
"""Most replies the upstream may owe before mailrelay stops reading client commands."""
PIECE = 64 * 1024
END_OF_MESSAGE = b"."
"""The `verb` of the reply owed for a message's content (DATA's, or BDAT LAST's)."""


@attrs.define
class _Owed:
    """A reply the client is owed, in order: the upstream's to `line`, or `local`."""

    verb: bytes
    line: bytes = b""
    local: bytes | None = None
    heard: Deferred[int] | None = None
    """Fired with the upstream's reply code, for a caller that waits for it."""


class _Finished(Exception):
    """The relay has ended while a step was waiting."""


class SMTPRelay:
    """Carries one SMTP session between a logged-in client and its upstream."""

    log = Logger()
    close_grace = 10.0
    """Seconds a connection closed at the end of the session has to take what was
    written to it before it is aborted (`Splice.close_grace`)."""

    def __init__(
        self,
        front: FrontEnd,
        core: SMTPCore,
        upstream: Upstream,
        *,
        chunking: bool,
        helo: bytes | None,
        mail: bytes | None = None,
        rcpt_owed: bool = False,
        vet: bool = False,
    ) -> None:
        """`front`: the client connection (its `pending` bytes are read here, its
        transport written); `core`: its SMTP core, for the replies and the count of
        refused recipients. `mail`: the MAIL command the upstream accepted during the
        login (auth "none"); `rcpt_owed`: the upstream's reply to the replayed RCPT is
        still to come, and is the client's."""
        self.front = front
        self.core = core
        self.server = upstream.protocol
        self.route = upstream.route
        self.chunking = chunking
        self.helo = helo
        self.mail = mail
        self.vet = vet
        self.bytes_up = 0
        self.bytes_down = 0
        self._owed: deque[_Owed] = deque()
        if rcpt_owed:
            self._owed.append(_Owed(b"RCPT"))
        self._drained: Deferred[None] | None = None
        self._checker = ContentChecker()
        self._ended_by: str | None = None
        self._refusing = False
        self._result: SpliceResult | None = None
        """How the session ended, once it has; `_done` fires with it when both
        connections are gone."""
        self._done: Deferred[SpliceResult] = Deferred()
        self._abort_call: IDelayedCall | None = None
        self._open = 2
        """Connections not gone yet, once the session has ended."""
        clock = front.factory.clock
        self._clock = clock
        self._idle_timeout = front.listener.idle_timeout
        self._last_activity = clock.seconds()
        self._idle_call: IDelayedCall | None = None

    # -- the session

    def run(self) -> Deferred[SpliceResult]:
        front, server = self.front, self.server
        server.transport.registerProducer(Pacer(front), True)
        front.transport.registerProducer(Pacer(server), True)
        self._idle_call = self._clock.callLater(self._idle_timeout, self._check_idle)
        for loop in (self._replies, self._commands):
            Deferred.fromCoroutine(loop()).addErrback(self._crashed)
        return self._done

    def abort(self, outcome: str) -> None:
        """Drop both connections now (the drain timeout)."""
        self._finish(outcome, None)
        self._abort_both()

    def _abort_both(self) -> None:
        for connection in (self.front, self.server):
            if connection.lost_reason is None:
                connection.transport.abortConnection()

    def _finish(self, outcome: str, ended_by: str | None, reason: str | None = None) -> None:
        """End the session: close both connections (abort them after `close_grace`);
        `_done` fires once both are gone."""
        if self._result is not None:
            return
        cancel(self._idle_call)
        self._idle_call = None
        for connection in (self.front, self.server):
            if connection.lost_reason is None:  # a lost TLS transport cannot even unregister
                connection.transport.unregisterProducer()
                connection.release()
                connection.transport.loseConnection()
        waiting: list[Deferred[Any]] = [o.heard for o in self._owed if o.heard is not None and not o.heard.called]
        if self._drained is not None:
            waiting.append(self._drained)
            self._drained = None
        for deferred in waiting:
            deferred.errback(_Finished())
        self._result = SpliceResult(self.bytes_up, self.bytes_down, outcome, ended_by, reason)
        self._open = 2  # counted, not a DeferredList: this runs once per session
        for connection in (self.front, self.server):
            connection.when_lost().addCallback(self._lost)
        if self._open:
            self._abort_call = self._clock.callLater(self.close_grace, self._abort_both)

    def _lost(self, _: object) -> None:
        self._open -= 1
        if not self._open:
            self._closed()

    def _closed(self) -> None:
        cancel(self._abort_call)
        self._abort_call = None
        assert self._result is not None
        self._done.callback(self._result)

    def _crashed(self, failure: Failure) -> None:
        if failure.check(_Finished):
            return
        assert self.front.session is not None
        self.log.failure("session {session_id}: internal error in the SMTP relay", failure, session_id=self.front.session.id)
        self._finish("error", None, f"internal error: {failure.value!r}")
        self._abort_both()

    def _activity(self) -> None:
        self._last_activity = self._clock.seconds()

    def _check_idle(self) -> None:
        self._idle_call = None
        remaining = self._last_activity + self._idle_timeout - self._clock.seconds()
        if remaining > 0:
            self._idle_call = self._clock.callLater(remaining, self._check_idle)
            return
        self._tell(self.core.text("timeout"))
        self._finish("idle-timeout", None)

    # -- upstream to client

    async def _replies(self) -> None:
        try:
            while True:
                await self._reply()
        except PeerClosed:
            if not self._refusing:  # else the client still gets its 554
                self._finish("closed", self._ended_by or "upstream")
        except (LineTooLong, stream.MalformedReply) as e:
            assert self.front.session is not None
            self.log.warn("session {session_id}: {error}", session_id=self.front.session.id, error=str(e))
            self._tell(b"421 4.3.0 " + self.core.hostname.encode() + b" Error: the mail server misbehaved\r\n")
            self._finish("protocol-error", None, str(e))

    def _reply_line_now(self) -> bytes | None:
        """The upstream's next line if it is all there (the common case: no coroutine
        and no Deferred for it), else None."""
        server = self.server
        end = server.pending.find(b"\n", 0, stream.MAX_REPLY_LINE)
        if end < 0:
            return None
        line = bytes(server.pending[: end + 1])
        del server.pending[: end + 1]
        server.pendingConsumed()
        return line

    async def _reply_line(self) -> bytes:
        line = self._reply_line_now()
        return line if line is not None else await self.server.read_line(stream.MAX_REPLY_LINE)

    async def _reply(self) -> None:
        raw = self._reply_line_now() or await self.server.read_line(stream.MAX_REPLY_LINE)
        self._activity()
        head = self._owed[0] if self._owed and self._owed[0].local is None else None
        # The common case, a one-line reply, goes out as it came (in the one form SMTP allows).
        single = stream.single_reply(raw)
        if single is not None and not (head is not None and head.verb == b"EHLO"):
            code, data = single
        else:
            lines = await self._reply_lines(raw)
            code = lines[0].code
            if head is not None and head.verb == b"EHLO" and code == 250:
                data, self.chunking = stream.ehlo_reply(lines)
            else:
                separators = [b"-"] * (len(lines) - 1) + [b" "]
                data = b"".join(b"%d%s%s\r\n" % (code, sep, line.text) for sep, line in zip(separators, lines, strict=True))
        owed = self._owed.popleft() if self._owed and self._owed[0].local is None else None
        if owed is not None:
            self._track(owed, code)
        self._tell(data)
        self.bytes_down += len(data)
        if owed is not None and owed.heard is not None:
            owed.heard.callback(code)
        self._flush_local()

    async def _reply_lines(self, raw: bytes) -> list[stream.ReplyLine]:
        """The lines of the reply that `raw` begins."""
        lines = [stream.reply_line(raw)]
        while not lines[-1].last:
            if len(lines) >= stream.MAX_REPLY_LINES:
                raise stream.MalformedReply(f"upstream sent a reply of more than {stream.MAX_REPLY_LINES} lines")
            line = stream.reply_line(await self._reply_line())
            if line.code != lines[0].code:
                raise stream.MalformedReply("upstream changed the code within a multi-line reply")
            lines.append(line)
            self._activity()
        return lines

    def _track(self, owed: _Owed, code: int) -> None:
        """Follow the transaction as the upstream's reply says it went."""
        accepted = 200 <= code < 300
        if owed.verb == b"MAIL" and accepted:
            self.mail = owed.line.rstrip(b"\r\n")
        elif owed.verb in (b"RSET", b"EHLO", b"HELO") and accepted:
            self.mail = None
            if owed.verb != b"RSET":
                self.helo = owed.line.rstrip(b"\r\n").partition(b" ")[2].split(b" ", 1)[0] or self.helo
        elif owed.verb == END_OF_MESSAGE:
            self.mail = None

    def _flush_local(self) -> None:
        while self._owed and self._owed[0].local is not None:
            self._tell(self._owed.popleft().local or b"")
        if not self._owed and self._drained is not None:
            drained, self._drained = self._drained, None
            drained.callback(None)

    # -- client to upstream

    def _tell(self, data: bytes) -> None:
        """Write to the client now (to its socket, when nothing waits before it)."""
        write_through(self.front.transport, data)

    def _answer(self, reply: bytes) -> None:
        """Answer the client locally, in its turn."""
        if self._owed:
            self._owed.append(_Owed(b"", local=reply))
        else:
            self._tell(reply)

    def _forward(self, verb: bytes, line: bytes, wait: bool = False) -> Deferred[int] | None:
        self._write(line)
        owed = _Owed(verb, line, heard=Deferred() if wait else None)
        self._owed.append(owed)
        return owed.heard

    def _write(self, data: bytes) -> None:
        write_through(self.server.transport, data)
        self.bytes_up += len(data)

    async def _drain(self) -> None:
        """Wait until the upstream has answered every command forwarded so far."""
        if self._result is not None:
            raise _Finished()
        if self._owed:
            self._drained = self._drained or Deferred()
            await self._drained

    async def _more(self) -> None:
        if self._result is not None:
            raise _Finished()
        await self.front.more()
        self._activity()

    async def _commands(self) -> None:
        try:
            while self._result is None:
                if len(self._owed) >= MAX_PIPELINE:
                    await self._drain()
                line = await self._command_line()
                if line is not None and not await self._command(line):
                    return  # QUIT: what the client says next is not for the upstream
        except PeerClosed:
            self._ended_by = self._ended_by or "client"
            if self.front.lost_reason is None and not self._refusing:
                await self._drain()  # a half-close: the client still hears the replies it is owed
            self._finish("closed", "client")

    async def _command_line(self) -> bytes | None:
        """The next command line (LF included), or None for one too long (answered)."""
        pending = self.front.pending
        while True:
            end = pending.find(b"\n", 0, stream.MAX_COMMAND)
            if end >= 0:
                return self._take(end + 1)
            if len(pending) >= stream.MAX_COMMAND:
                while (end := pending.find(b"\n")) < 0:
                    self._take(len(pending))
                    await self._more()
                self._take(end + 1)
                self._answer(stream.LINE_TOO_LONG)
                return None
            await self._more()

    def _take(self, count: int) -> bytes:
        front = self.front
        data = bytes(front.pending[:count])
        del front.pending[:count]
        front.pendingConsumed()
        return data

    async def _command(self, line: bytes) -> bool:
        """Carry out one command line; False once the client has said QUIT."""
        action = stream.command(line, self.chunking)
        if isinstance(action, Answer):
            self._answer(action.reply)
        elif isinstance(action, Discard):
            await self._skip(action.size)
            self._answer(action.reply)
        elif isinstance(action, Chunk):
            # BDAT's one reply is for its chunk; after the LAST one, for the whole message.
            self._forward(END_OF_MESSAGE if action.last else b"BDAT", action.line)
            await self._chunk(action.size, action.last)
        else:
            assert isinstance(action, Forward)
            self._checker = ContentChecker()  # a message continues only from BDAT to BDAT
            return await self._forwarded(action)
        return True

    async def _forwarded(self, action: Forward) -> bool:
        verb = action.verb
        if verb == b"RCPT" and self.vet:
            await self._drain()  # the transaction is what the upstream made of the commands before
            if not await self._vetted(action.line):
                return True
        if verb == b"DATA":
            heard = self._forward(verb, action.line, wait=True)
            assert heard is not None
            if await heard == 354:
                await self._data()
            return True
        self._forward(verb, action.line)
        if verb == b"QUIT":
            self._ended_by = "client"
            return False
        return True

    async def _vetted(self, line: bytes) -> bool:
        """Ask the Router about this RCPT; answer it locally unless it may go upstream."""
        front = self.front
        request = front.request(
            auth_method="none",
            helo=self.helo.decode("utf-8", "replace") if self.helo is not None else None,
            mail_from=self.mail.decode("utf-8", "replace") if self.mail is not None else None,
            rcpt_to=line.rstrip(b"\r\n").decode("utf-8", "replace"),
        )
        factory = front.factory
        try:
            routes = await ask_router(factory.router, request, factory.clock, front.listener.router_timeout)
        except Reject as reject:
            if reject.wait > 0:
                await deferLater(factory.clock, reject.wait)
            # As before login: the core's reply, and its count of refused recipients.
            refusal = self.core.refuse_recipient(reject)
            self._answer(refusal.reply)
            if refusal.end is not None:
                outcome, reason = refusal.end
                self._finish(outcome, None, reason)
                raise _Finished() from None
            return False
        except RouterError:
            self._answer(self.core.text("temporary"))
            return False
        if routes[0].address != self.route.address:
            self._answer(b"451 4.3.0 Recipient served elsewhere: send it in a transaction of its own\r\n")
            return False
        return True

    # -- message content

    async def _data(self) -> None:
        """DATA content up to and including its end line."""
        reader = DataReader()
        pending = self.front.pending
        while True:
            # Wait only when nothing is kept: `pending` may hold more than a piece (what
            # was pipelined behind the login), and reading stays paused until it drains.
            while not pending:
                await self._more()
            try:
                count, ended = reader.feed(bytes(pending[:PIECE]))
            except BareNewline:
                await self._refuse_content(None, reader.tail)
                return
            self._write(self._take(count))
            if ended:
                self._owed.append(_Owed(END_OF_MESSAGE))
                return

    async def _chunk(self, size: int, last: bool) -> None:
        """A BDAT chunk of `size` bytes."""
        pending = self.front.pending
        while size > 0:
            if not pending:
                await self._more()
            count = min(size, len(pending), PIECE)
            piece = bytes(pending[:count])
            try:
                self._checker.feed(piece)
                if last and count == size:
                    self._checker.end()
            except BareNewline:
                await self._refuse_content(size)
                return
            self._write(self._take(count))
            size -= count
        if last:
            self._checker = ContentChecker()

    async def _skip(self, size: int) -> None:
        """Read `size` bytes of the client's and drop them."""
        while size > 0:
            if not self.front.pending:
                await self._more()
            size -= len(self._take(min(size, len(self.front.pending))))

    async def _refuse_content(self, chunk_left: int | None, tail: bytes = b"") -> None:
        """
        The message holds a bare CR or LF: the upstream must not get it whole. Once the
        upstream has answered the commands before it, its connection is dropped
        mid-message (an unfinished message is never delivered); the rest of the
        client's message is read and dropped (`chunk_left` bytes of a BDAT chunk; DATA
        up to an end line as any server would see one, which may have begun in the
        `tail` already forwarded), and the client hears `554 5.6.0` before the session
        closes.
        """
        self._refusing = True
        if chunk_left is not None:
            self._owed.pop()  # this chunk's reply: it will never come
        await self._drain()  # replies to the commands before it still reach the client
        if self.server.lost_reason is None:
            self.server.transport.unregisterProducer()
            self.server.transport.abortConnection()
        assert self.front.session is not None
        self.log.warn(
            "session {session_id}: message content with a bare CR or LF refused (SMTP smuggling?)",
            session_id=self.front.session.id,
        )
        if chunk_left is not None:
            await self._skip(chunk_left)
        else:
            while True:
                window = tail + bytes(self.front.pending)
                end = stream.lenient_end(window)
                if end >= 0:
                    self._take(max(0, end - len(tail)))
                    break
                tail = window[-3:]
                self._take(len(self.front.pending))
                await self._more()
        self._owed.clear()
        self._tell(stream.BARE_NEWLINE)
        self._finish("rejected", None, "bare CR or LF in message content")
