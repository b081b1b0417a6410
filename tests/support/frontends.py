"""
What the protocol front-end tests (SMTP, IMAP, POP3, and those against real Dovecot and
Postfix) share: the test user, a Router that records what it is asked, a password check
to answer with, and a TestCase that starts mailrelay with one front-end listener.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import tempfile
from typing import Any

import trustme
from twisted.internet.task import Clock
from zope.interface import implementer

from mailrelay.router import IRouter, Reject, Route, RouteRequest
from tests.support.net import ProxyTestCase
from tests.support.pki import PKI, client_context

USER = "alice@example.test"
PASSWORD = "s3cret-Pa55"


def plain_ir(user: str = USER, password: str = PASSWORD) -> bytes:
    """The base64 SASL PLAIN response that logs in as `user`."""
    return base64.b64encode(f"\0{user}\0{password}".encode())


@implementer(IRouter)
class Router:
    """Records each request; answers with `answer(request)` (a Route to `port` by default,
    with `route`'s fields). It declares `verifies_passwords` when told to, or when
    `answer` is a `password_check`: only then may it answer a password login with
    `login = "xclient"` or `"none"` routes."""

    def __init__(self, port: int = 9, answer: Any = None, verifies_passwords: bool | None = None, **route: Any) -> None:
        self.requests: list[RouteRequest] = []
        self.answer = answer or (lambda request: Route(host="127.0.0.1", port=port, **route))
        if verifies_passwords is None:
            verifies_passwords = getattr(answer, "verifies_passwords", False)
        self.verifies_passwords = verifies_passwords

    def route(self, request: RouteRequest) -> Any:
        self.requests.append(request)
        return self.answer(request)


def password_check(port: int, password: str = PASSWORD, wait: float = 0, message: str = "Invalid login", **route: Any) -> Any:
    """An answer (for `Router`) that accepts a cleartext `password` (PLAIN, LOGIN, USER/PASS)
    with a Route to `port`, and CRAM-MD5 or APOP digests of it with a Route that supplies
    the password, as a digest cannot be passed through; anything else is refused with
    `message`, after `wait` seconds."""

    def answer(request: RouteRequest) -> Route:
        if request.auth_method in ("cram-md5", "apop"):
            assert request.salt is not None
            if request.auth_method == "cram-md5":
                expected = hmac.new(password.encode(), request.salt.encode(), hashlib.md5).hexdigest()
            else:
                expected = hashlib.md5(request.salt.encode() + password.encode()).hexdigest()
            if request.password == expected:
                return Route(host="127.0.0.1", port=port, password=password, **route)
        elif request.password == password:
            return Route(host="127.0.0.1", port=port, **route)
        raise Reject(message, wait=wait)

    answer.verifies_passwords = True  # type: ignore[attr-defined]
    return answer


class FrontEndTestCase(ProxyTestCase):
    """mailrelay with one `protocol` listener for relay.test, whose certificate the client
    context (`self.context`) trusts; `session_line` (from ProxyTestCase) waits for the
    session's log line."""

    protocol: str
    """The listener's protocol (and name) unless `proxy` is told another."""
    directory: str
    upstream_ca: trustme.CA
    upstream_ca_file: str
    """Set by `upstream_pki`, for a class that starts a real mail server."""

    def setUp(self) -> None:
        super().setUp()
        self.pki = PKI(self)
        self.issued = self.pki.issue("relay", "relay.test", "127.0.0.1")
        self.context = client_context(self.pki.ca)

    def front_end_config(self, mode: str = "starttls", protocol: str | None = None, **listener: Any) -> dict[str, Any]:
        """A config of one `protocol` listener (with `listener`'s settings) for relay.test
        on a free loopback port, to which a test may add."""
        protocol = protocol or self.protocol
        return {
            "tls": {"cert": self.issued.cert, "key": self.issued.key},
            "listener": [
                {
                    "name": protocol,
                    "listen": "tcp:0:interface=127.0.0.1",
                    "mode": mode,
                    "protocol": protocol,
                    "hostname": "relay.test",
                    **listener,
                }
            ],
        }

    async def proxy(
        self, router: Any, mode: str = "starttls", protocol: str | None = None, clock: Clock | None = None, **listener: Any
    ) -> int:
        """Start mailrelay with the `front_end_config` of these arguments, routed by
        `router`, its timers on `clock` if one is given (`start_proxy`); the port (also
        kept as `self.port`)."""
        _, self.port = await self.start_proxy(self.front_end_config(mode, protocol, **listener), router=router, clock=clock)
        return self.port

    def everything_logged(self) -> str:
        """Every log event of every level (the capture sees debug too), formatted and raw."""
        return "\n".join(self.logs.lines()) + repr(self.logs.events)

    @classmethod
    def upstream_pki(cls, prefix: str, hostname: str) -> tuple[str, str]:
        """For a real mail server started once for the class: a directory `cls.directory`
        (open to other users, as the server's unprivileged processes go through it, for
        tearDownClass to remove), a CA `cls.upstream_ca` (its PEM at `cls.upstream_ca_file`), and
        a certificate for `hostname` that it issued: the paths of its chain and key."""
        cls.directory = tempfile.mkdtemp(prefix=prefix)
        os.chmod(cls.directory, 0o755)
        cls.upstream_ca = trustme.CA(organization_name="upstream CA")
        leaf = cls.upstream_ca.issue_cert(hostname)
        cert, key = f"{cls.directory}/upstream.crt", f"{cls.directory}/upstream.key"
        for blob in leaf.cert_chain_pems:
            blob.write_to_path(cert, append=True)
        leaf.private_key_pem.write_to_path(key)
        cls.upstream_ca_file = f"{cls.directory}/upstream-ca.pem"
        cls.upstream_ca.cert_pem.write_to_path(cls.upstream_ca_file)
        return cert, key
