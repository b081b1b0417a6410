"""
POP3 towards the upstream: what mailrelay says to the server it routed a client to,
before the splice, as a `Dialogue` (no I/O).

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

from .. import sasl
from ..router import Reject, Route
from .dialogue import Dialogue, ReadLine, Send
from .errors import UpstreamProtocolError
from .login import MAX_RESPONSE_LINES, UpstreamLogin, error_challenge_response, shown, upstream_credentials

_RESPONSE_CODE = re.compile(rb"-ERR \[([A-Za-z0-9/-]+)\]")
TEMPORARY_CODES = frozenset({b"SYS/TEMP"})

Capabilities = dict[str, tuple[str, ...]]
"""CAPA's list (RFC 2449): keyword -> arguments, in upper case."""


class POP3Login(UpstreamLogin[bytes, Capabilities]):
    """The upstream dialogue of one POP3 session; `client_reply` afterwards is the
    upstream's +OK to the login."""

    protocol = "POP3"
    starttls_command = "STLS"
    success = (True,)
    _greeting = b""
    """The greeting of the connection it logs in on (Dovecot says `+OK [XCLIENT]` there)."""

    def greeting(self, route: Route) -> Dialogue[None]:
        greeting = yield ReadLine("greeting")
        if not greeting.startswith(b"+OK"):
            raise UpstreamProtocolError(f"upstream greeted with {shown(greeting)}")
        self._greeting = greeting

    def ask_capabilities(self, route: Route) -> Dialogue[Capabilities]:
        """CAPA; empty for a server without CAPA."""
        first = yield from self.ask(b"CAPA", "CAPA")
        found: Capabilities = {}
        if first.startswith(b"+OK"):
            for _ in range(MAX_RESPONSE_LINES):
                line = (yield ReadLine("answer to CAPA")).rstrip(b"\r\n")
                if line == b".":
                    break
                words = line.decode("ascii", "replace").split()
                if words:
                    found[words[0].upper()] = tuple(w.upper() for w in words[1:])
            else:
                raise UpstreamProtocolError(f"upstream's CAPA list runs over {MAX_RESPONSE_LINES} lines")
        elif not first.startswith(b"-ERR"):
            raise UpstreamProtocolError(f"upstream answered CAPA with {shown(first)}")
        return found

    def answer(self, stage: str) -> Dialogue[bytes]:
        return (yield ReadLine(stage))

    def verdict(self, answer: bytes) -> object:
        return answer.startswith(b"+OK")

    def said(self, answer: bytes) -> str:
        return shown(answer)

    def log_in(self, route: Route, capabilities: Capabilities) -> Dialogue[bytes]:
        if route.forward_client:
            yield from self._xclient(capabilities)
        credentials = upstream_credentials(self.request, route)
        mechanism = credentials.mechanism
        offered = capabilities.get("SASL", ())
        if mechanism == "plain" and "PLAIN" not in offered:
            mechanism = "login"  # USER and PASS: every POP3 server has them
        if mechanism == "login":
            yield from self._verdict(b"USER " + credentials.user.encode(), mechanism)
            return (yield from self._verdict(b"PASS " + credentials.secret.encode(), mechanism))
        if mechanism.upper() not in offered:
            raise UpstreamProtocolError(f"upstream does not offer AUTH {mechanism.upper()}")
        response = sasl.encode(credentials.sasl_response()) or b"="
        return (yield from self._verdict(b"AUTH " + mechanism.upper().encode() + b" " + response, mechanism))

    def _xclient(self, capabilities: Capabilities) -> Dialogue[None]:
        """Dovecot's POP3 XCLIENT: the client's address, from a trusted proxy (which it
        tells with `+OK [XCLIENT]` in its greeting)."""
        if "XCLIENT" not in capabilities and not self._greeting.upper().startswith(b"+OK [XCLIENT]"):
            raise UpstreamProtocolError("upstream does not offer XCLIENT, so it cannot learn the client's address")
        connection = self.connection
        client = connection.client
        line = b"XCLIENT ADDR=%s PORT=%d SESSION=%s" % (client[0].encode(), client[1], connection.session_id.encode())
        yield from self.command(line, "XCLIENT")

    def _verdict(self, line: bytes, mechanism: str) -> Dialogue[bytes]:
        """One login command; its +OK is the client's reply."""
        yield Send(line + b"\r\n")
        reply = yield ReadLine("login reply")
        if reply.startswith(b"+ ") or reply.rstrip(b"\r\n") == b"+":
            # A token mechanism's error challenge (RFC 7628 3.2.3): answer it to get the verdict.
            yield Send(error_challenge_response(mechanism))
            reply = yield ReadLine("login reply")
        if reply.startswith(b"+OK"):
            return reply
        if reply.startswith(b"-ERR"):
            match = _RESPONSE_CODE.match(reply)
            code = match[1].upper() if match else b"AUTH"
            if code not in TEMPORARY_CODES:
                text = reply[match.end() if match else 4 :].strip().decode("utf-8", "replace")[:200]
                raise Reject(text or "Authentication failed", code=code.decode("ascii"), counts=code != b"IN-USE")
        raise UpstreamProtocolError(f"upstream answered the {mechanism} login with {shown(reply)}")
