"""
POP3 towards the upstream: what mailrelay says to the server it routed a client to,
before the splice (the connector's `LoginStep` and `StartTLSStep`).

    greeting +OK -> CAPA -> [STLS +OK -> TLS -> CAPA]
      -> [XCLIENT ADDR= PORT= ... when the Route forwards the client and the upstream offers it]
      -> AUTH PLAIN <initial response>     (Route.auth_mechanism "plain", when SASL lists PLAIN)
       | USER <user> +OK -> PASS <password>  (otherwise, or "login")
       | AUTH XOAUTH2 / OAUTHBEARER          (a client's token, passed on)
      -> +OK ...                             (the client's reply, verbatim)

`-ERR` to the login refuses it (`Reject`, with the RFC 3206 response code the upstream
gave); `-ERR [SYS/TEMP]` and any other failure make the route unusable.
"""

from __future__ import annotations

import re

import attrs

from .. import sasl
from ..connector import UpstreamProtocol
from ..router import Address, Reject, Route, RouteRequest
from .upstream import MAX_RESPONSE_LINE, MAX_RESPONSE_LINES, UpstreamProtocolError, shown, unusable_login, upstream_credentials

_RESPONSE_CODE = re.compile(rb"-ERR \[([A-Za-z0-9/-]+)\]")
TEMPORARY_CODES = frozenset({b"SYS/TEMP"})


@attrs.frozen(kw_only=True)
class POP3ClientFacts:
    client: Address
    local: Address
    request: RouteRequest
    session_id: str = "-"


class POP3UpstreamLogin:
    """The upstream dialogue of one POP3 session; `starttls` and `login` are the
    connector's steps, `client_reply` what the client hears once they succeeded."""

    def __init__(self, facts: POP3ClientFacts) -> None:
        self.facts = facts
        self.client_reply = b""
        self._connection: UpstreamProtocol | None = None
        self._capabilities: dict[str, tuple[str, ...]] | None = None
        self._greeting = b""

    async def _start(self, upstream: UpstreamProtocol, route: Route) -> None:
        if self._connection is upstream:
            return
        self._connection = upstream
        self._capabilities = None
        upstream.stage = "greeting"
        greeting = await upstream.read_line(MAX_RESPONSE_LINE)
        if not greeting.startswith(b"+OK"):
            raise UpstreamProtocolError(f"upstream greeted with {shown(greeting)}")
        self._greeting = greeting

    async def capabilities(self, upstream: UpstreamProtocol) -> dict[str, tuple[str, ...]]:
        """CAPA (RFC 2449): keyword -> arguments; empty for a server without CAPA."""
        if self._capabilities is None:
            upstream.stage = "answer to CAPA"
            upstream.write(b"CAPA\r\n")
            first = await upstream.read_line(MAX_RESPONSE_LINE)
            found: dict[str, tuple[str, ...]] = {}
            if first.startswith(b"+OK"):
                for _ in range(MAX_RESPONSE_LINES):
                    line = (await upstream.read_line(MAX_RESPONSE_LINE)).rstrip(b"\r\n")
                    if line == b".":
                        break
                    words = line.decode("ascii", "replace").split()
                    if words:
                        found[words[0].upper()] = tuple(w.upper() for w in words[1:])
                else:
                    raise UpstreamProtocolError(f"upstream's CAPA list runs over {MAX_RESPONSE_LINES} lines")
            elif not first.startswith(b"-ERR"):
                raise UpstreamProtocolError(f"upstream answered CAPA with {shown(first)}")
            self._capabilities = found
        return self._capabilities

    async def _command(self, upstream: UpstreamProtocol, line: bytes, what: str) -> bytes:
        """Send a command (CRLF added), return its +OK line; `what` names it in errors,
        never the line itself (it may hold a credential)."""
        upstream.stage = f"answer to {what}"
        upstream.write(line + b"\r\n")
        reply = await upstream.read_line(MAX_RESPONSE_LINE)
        if not reply.startswith(b"+OK"):
            raise UpstreamProtocolError(f"upstream answered {what} with {shown(reply)}")
        return reply

    # The connector's steps

    async def starttls(self, upstream: UpstreamProtocol, route: Route) -> None:
        await self._start(upstream, route)
        if "STLS" not in await self.capabilities(upstream):
            raise UpstreamProtocolError("upstream does not offer STLS")
        await self._command(upstream, b"STLS", "STLS")
        self._capabilities = None  # RFC 2595: what was said in plaintext is forgotten

    async def login(self, upstream: UpstreamProtocol, route: Route) -> None:
        why = unusable_login(route, "POP3")
        if why is not None:
            raise UpstreamProtocolError(why)
        await self._start(upstream, route)
        capabilities = await self.capabilities(upstream)
        if route.forward_client:
            await self._xclient(upstream, capabilities)
        credentials = upstream_credentials(self.facts.request, route)
        mechanism = credentials.mechanism
        offered = capabilities.get("SASL", ())
        if mechanism == "plain" and "PLAIN" not in offered:
            mechanism = "login"  # USER and PASS: every POP3 server has them
        if mechanism == "login":
            await self._verdict(upstream, b"USER " + credentials.user.encode(), mechanism)
            await self._verdict(upstream, b"PASS " + credentials.secret.encode(), mechanism)
        else:
            if mechanism.upper() not in offered:
                raise UpstreamProtocolError(f"upstream does not offer AUTH {mechanism.upper()}")
            response = sasl.encode(credentials.sasl_response()) or b"="
            await self._verdict(upstream, b"AUTH " + mechanism.upper().encode() + b" " + response, mechanism)

    async def _xclient(self, upstream: UpstreamProtocol, capabilities: dict[str, tuple[str, ...]]) -> None:
        """Dovecot's POP3 XCLIENT: the client's address, from a trusted proxy (which it
        tells with `+OK [XCLIENT]` in its greeting)."""
        if "XCLIENT" not in capabilities and not self._greeting.upper().startswith(b"+OK [XCLIENT]"):
            raise UpstreamProtocolError("upstream does not offer XCLIENT, so it cannot learn the client's address")
        client = self.facts.client
        line = b"XCLIENT ADDR=%s PORT=%d SESSION=%s" % (client[0].encode(), client[1], self.facts.session_id.encode())
        await self._command(upstream, line, "XCLIENT")

    async def _verdict(self, upstream: UpstreamProtocol, line: bytes, mechanism: str) -> None:
        """One login command; its +OK is kept as the client's reply."""
        upstream.stage = "login reply"
        upstream.write(line + b"\r\n")
        reply = await upstream.read_line(MAX_RESPONSE_LINE)
        if reply.startswith(b"+ ") or reply.rstrip(b"\r\n") == b"+":
            # A token mechanism's error challenge (RFC 7628 3.2.3): answer it to get the verdict.
            upstream.write(b"\r\n" if mechanism == "xoauth2" else sasl.encode(b"\x01") + b"\r\n")
            reply = await upstream.read_line(MAX_RESPONSE_LINE)
        if reply.startswith(b"+OK"):
            self.client_reply = reply
            return
        if reply.startswith(b"-ERR"):
            match = _RESPONSE_CODE.match(reply)
            code = match[1].upper() if match else b"AUTH"
            if code not in TEMPORARY_CODES:
                text = reply[match.end() if match else 4 :].strip().decode("utf-8", "replace")[:200]
                raise Reject(text or "Authentication failed", code=code.decode("ascii"), counts=code != b"IN-USE")
        raise UpstreamProtocolError(f"upstream answered the {mechanism} login with {shown(reply)}")
