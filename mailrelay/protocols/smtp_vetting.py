"""
`vet_recipients = "all"`: mailrelay stays between an SMTP client and its upstream for
the whole session, so that the Router is asked about every RCPT TO, not only the first
(nginx's `smtp_auth none` vets the first and lets the rest through).

Commands are relayed one at a time, each answered by the upstream's reply before the
next is read (pipelined commands wait their turn in the client's buffer). A RCPT the
Router refuses is answered locally and never reaches the upstream; one the Router
routes elsewhere gets a temporary refusal, so that the sender retries it in a
transaction of its own, which is routed anew. Message content (DATA up to its end
line, BDAT by count) is carried byte for byte, with the upstream's back-pressure
pausing the client.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from ..connector import Upstream
from ..router import Reject, RouterError, ask_router
from ..splice import LineTooLong, PeerClosed, SpliceResult

if TYPE_CHECKING:
    from .smtp import SMTPFrontEnd

MAX_COMMAND = 4096
MAX_REPLY_LINE = 4096
_BDAT = re.compile(rb"BDAT ([0-9]{1,15})( LAST)?\r?\n", re.IGNORECASE)
_LOCAL_ONLY = (b"STARTTLS", b"AUTH", b"XCLIENT", b"XFORWARD")


class VettingRelay:
    """Relays one SMTP session command by command, asking the Router about each RCPT."""

    def __init__(self, front: SMTPFrontEnd, upstream: Upstream, mail: bytes) -> None:
        self.front = front
        self.upstream = upstream
        self.server = upstream.protocol
        self.mail: bytes | None = mail
        """The MAIL command of the transaction in progress, as typed."""
        self.bytes_up = 0
        self.bytes_down = 0

    async def run(self) -> SpliceResult:
        front, server = self.front, self.server
        # The upstream's writes pause the client's reads when its buffer fills.
        server.transport.registerProducer(front.transport, True)
        ended_by = None
        try:
            await self._relay_reply()  # to the RCPT the login step replayed
            while True:
                line = await self._within(front.read_line(MAX_COMMAND))
                verb = line.split(None, 1)[0].upper() if line.strip() else b""
                if verb == b"QUIT":
                    self._forward(line)
                    await self._relay_reply()
                    ended_by = "client"
                    break
                await self._command(verb, line)
        except PeerClosed as e:
            ended_by = e.peer
        except LineTooLong as e:
            if e.peer == "client":
                front.send(b"500 5.5.6 Error: line too long\r\n")
            else:
                front.send(b"421 4.3.0 " + front.hostname.encode() + b" Error: the mail server misbehaved\r\n")
                return self._result("protocol-error", None)
            ended_by = "client"
        except _IdleTimeout:
            front.send(b"421 4.4.2 " + front.hostname.encode() + b" Error: timeout exceeded\r\n")
            return self._result("idle-timeout", None)
        finally:
            server.transport.unregisterProducer()
            server.transport.loseConnection()
            front.transport.loseConnection()
        return self._result("closed", ended_by)

    def _result(self, outcome: str, ended_by: str | None) -> SpliceResult:
        return SpliceResult(bytes_up=self.bytes_up, bytes_down=self.bytes_down, outcome=outcome, ended_by=ended_by)

    async def _within(self, awaitable: Any) -> Any:
        waiting = Deferred.fromCoroutine(awaitable)
        waiting.addTimeout(self.front.listener.idle_timeout, self.front.factory.clock, onTimeoutCancel=_timed_out)
        return await waiting

    def _forward(self, data: bytes) -> None:
        self.server.write(data)
        self.bytes_up += len(data)

    async def _relay_reply(self) -> int:
        """Carry one whole upstream reply to the client; its code."""
        while True:
            line = await self._within(self.server.read_line(MAX_REPLY_LINE))
            self.front.send(line)
            self.bytes_down += len(line)
            if line[3:4] != b"-":
                return int(line[:3]) if line[:3].isdigit() else 0

    async def _command(self, verb: bytes, line: bytes) -> None:
        front = self.front
        if verb in _LOCAL_ONLY:
            front.send(b"503 5.5.1 Error: " + verb + b" not available in this session\r\n")
            return
        # A RCPT outside a transaction is the upstream's to refuse (503): nothing to vet.
        if verb == b"RCPT" and self.mail is not None and not await self._vetted(self.mail, line):
            return
        if verb == b"MAIL":
            self.mail = line.rstrip(b"\r\n")
        elif verb in (b"RSET", b"EHLO", b"HELO"):
            self.mail = None
        elif verb == b"BDAT":
            match = _BDAT.fullmatch(line)
            if match is None:
                front.send(b"501 5.5.4 Syntax: BDAT size [LAST]\r\n")
                return
            self._forward(line)
            await self._forward_exactly(int(match[1]))
            await self._relay_reply()
            if match[2]:
                self.mail = None  # the transaction is over
            return
        self._forward(line)
        code = await self._relay_reply()
        if verb == b"DATA" and code == 354:
            await self._forward_message()
            await self._relay_reply()
            self.mail = None  # the transaction is over

    async def _vetted(self, mail: bytes, line: bytes) -> bool:
        """Ask the Router about this RCPT; answer it locally unless it may go upstream."""
        front = self.front
        request = front.request(
            auth_method="none",
            helo=front.helo_text(),
            mail_from=mail.decode("utf-8", "replace"),
            rcpt_to=line.rstrip(b"\r\n").decode("utf-8", "replace"),
        )
        factory = front.factory
        try:
            routes = await ask_router(factory.router, request, factory.clock, front.listener.router_timeout)
        except Reject as reject:
            front.refuse_recipient(reject)
            return False
        except RouterError:
            front.send(b"451 4.3.0 Temporary failure, try again later\r\n")
            return False
        if routes[0].address != self.upstream.route.address:
            front.send(b"451 4.3.0 Recipient served elsewhere: send it in a transaction of its own\r\n")
            return False
        return True

    async def _forward_message(self) -> None:
        """DATA content up to and including its end line (CRLF . CRLF), as it comes."""
        front = self.front
        tail = b"\r\n"  # the content starts at the beginning of a line
        while True:
            if front.pending:
                window = tail + bytes(front.pending[:65536])
                end = window.find(b"\r\n.\r\n")
                if end >= 0:
                    take = end + 5 - len(tail)
                    self._take(take)
                    return
                take = len(window) - len(tail)
                self._take(take)
                tail = window[-4:]
            await self._within(front.more())

    async def _forward_exactly(self, size: int) -> None:
        while size > 0:
            if not self.front.pending:
                await self._within(self.front.more())
            take = min(size, len(self.front.pending))
            self._take(take)
            size -= take

    def _take(self, count: int) -> None:
        front = self.front
        chunk = bytes(front.pending[:count])
        del front.pending[:count]
        front.pendingConsumed()
        self._forward(chunk)


class _IdleTimeout(Exception):
    pass


def _timed_out(result: object, timeout: float) -> Failure:
    return Failure(_IdleTimeout())
