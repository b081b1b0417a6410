"""
The demo's mail servers, on twisted.mail: ESMTP delivering into the demo user's maildir,
POP3 and IMAP serving it. They stand where a deployment's Postfix and Dovecot stand:
behind mailrelay, on 127.0.0.1, on ports the system picks (port 0).

Who gets in is decided by a `twisted.cred` Portal with one user and its password:
IMAP LOGIN, POP3 USER/PASS and SMTP AUTH PLAIN/LOGIN all ask it, so a password that
mailrelay passes through is checked here, as a real upstream would. SMTP without AUTH
is the MX case: anyone may deliver to the demo user, and to nobody else (no relaying).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any, BinaryIO

import attrs
from twisted.cred import credentials, error
from twisted.cred.checkers import ANONYMOUS, AllowAnonymousAccess, ICredentialsChecker
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol
from twisted.mail import imap4, pop3, smtp
from twisted.mail._cred import LOGINCredentials, PLAINCredentials
from twisted.mail.maildir import MaildirMailbox as POP3Maildir
from zope.interface import implementer

from .imap_maildir import MaildirAccount
from .maildir import Maildir

__all__ = ["DemoUpstream", "DemoUser", "UpstreamPorts", "portals"]


@attrs.frozen
class DemoUser:
    address: str
    """The login name and the only address mail is delivered to."""
    password: str = attrs.field(repr=False)


@implementer(ICredentialsChecker)
class OneUserChecker:
    """Accepts the demo user's name (any case) with its exact password."""

    credentialInterfaces = (credentials.IUsernamePassword,)

    def __init__(self, user: DemoUser) -> None:
        self.user = user

    def requestAvatarId(self, given: Any) -> defer.Deferred[bytes | tuple[()]]:
        name = given.username.decode("utf-8", "replace") if isinstance(given.username, bytes) else str(given.username)
        password = given.password if isinstance(given.password, bytes) else str(given.password).encode()
        # Compared in constant time, the name too: a timing difference would tell the user exists.
        name_ok = hmac.compare_digest(name.lower().encode(), self.user.address.lower().encode())
        password_ok = hmac.compare_digest(password, self.user.password.encode())
        if name_ok and password_ok:
            return defer.succeed(self.user.address.encode())
        return defer.fail(error.UnauthorizedLogin())


@implementer(smtp.IMessage)
class _Delivery:
    """One message on its way into the maildir, whole at the end of DATA or not at all."""

    def __init__(self, maildir: Maildir) -> None:
        self.maildir = maildir
        self.lines: list[bytes] = []

    def lineReceived(self, line: bytes) -> None:
        self.lines.append(line)

    def eomReceived(self) -> defer.Deferred[bytes]:
        path = self.maildir.deliver(b"\n".join(self.lines) + b"\n")
        self.lines = []
        return defer.succeed(b"delivered as " + path.name.encode())

    def connectionLost(self) -> None:
        self.lines = []


@implementer(smtp.IMessageDelivery)
class _Recipients:
    """Accepts mail for the demo user from anyone (authenticated or not)."""

    def __init__(self, user: DemoUser, maildir: Maildir) -> None:
        self.user = user
        self.maildir = maildir

    def receivedHeader(self, helo: tuple[bytes, Any], origin: smtp.Address, recipients: list[smtp.User]) -> bytes:
        return b"Received: from " + helo[0] + b" by demo-upstream (twisted.mail); " + smtp.rfc822date()

    def validateFrom(self, helo: Any, origin: smtp.Address) -> smtp.Address:
        return origin

    def validateTo(self, user: smtp.User) -> Callable[[], smtp.IMessage]:
        if str(user.dest).lower() != self.user.address.lower():
            raise smtp.SMTPBadRcpt(user)  # no relaying, and no other local user
        return lambda: _Delivery(self.maildir)


class _POP3Maildir(POP3Maildir):
    """Twisted's POP3 maildir, reading messages as bytes: its own opens them as text,
    which its POP3 server's RETR cannot send (TypeError in `transformChunk`)."""

    def getMessage(self, i: int) -> BinaryIO:  # type: ignore[override]
        return open(self.list[i], "rb")


@implementer(IRealm)
class DemoRealm:
    """What a login gets: delivery (SMTP), the INBOX (IMAP), the maildir (POP3)."""

    def __init__(self, user: DemoUser, maildir: Maildir) -> None:
        self.user = user
        self.maildir = maildir

    def requestAvatar(self, avatar_id: Any, mind: Any, *interfaces: Any) -> tuple[Any, Any, Callable[[], None]]:
        for interface in interfaces:
            if interface is smtp.IMessageDelivery:
                return interface, _Recipients(self.user, self.maildir), lambda: None
            if interface is imap4.IAccount and avatar_id is not ANONYMOUS:
                return interface, MaildirAccount(self.user.address, self.maildir), lambda: None
            if interface is pop3.IMailbox and avatar_id is not ANONYMOUS:
                return interface, _POP3Maildir(bytes(self.maildir.path)), lambda: None
        raise NotImplementedError(f"no avatar for {interfaces}")


def portals(user: DemoUser, maildir: Maildir) -> tuple[Portal, Portal]:
    """(SMTP's, IMAP's and POP3's): SMTP also lets anonymous clients deliver (the MX case);
    reading mail needs the password."""
    realm = DemoRealm(user, maildir)
    checker = OneUserChecker(user)
    return Portal(realm, [checker, AllowAnonymousAccess()]), Portal(realm, [checker])


class _SMTPFactory(smtp.SMTPFactory):
    protocol = smtp.ESMTP
    noisy = False

    def logPrefix(self) -> str:  # "<prefix> starting on <port>"
        return "demo SMTP server"

    def buildProtocol(self, addr: Any) -> Any:
        server = super().buildProtocol(addr)
        server.challengers = {b"PLAIN": PLAINCredentials, b"LOGIN": LOGINCredentials}
        server.host = b"demo-upstream"
        return server


class _ReaderFactory(Factory):
    """The IMAP or POP3 server of the demo's maildir, its logins checked by `portal`."""

    noisy = False

    def __init__(self, server: Callable[[], Any], name: str, portal: Portal) -> None:
        self.server = server
        self.name = name
        self.portal = portal

    def logPrefix(self) -> str:
        return f"demo {self.name} server"

    def buildProtocol(self, addr: Any) -> Protocol:
        server = self.server()
        server.portal = self.portal
        server.factory = self
        return server


@attrs.frozen
class UpstreamPorts:
    smtp: int
    imap: int
    pop3: int


class DemoUpstream:
    """The three servers over one maildir, listening on 127.0.0.1 while started."""

    def __init__(self, user: DemoUser, maildir: Maildir, reactor: Any) -> None:
        self.user = user
        self.maildir = maildir
        self.reactor = reactor
        self.ports: list[IListeningPort] = []

    def listen(self) -> UpstreamPorts:
        """Listen on three free ports at once (synchronous: the reactor binds at once)."""
        smtp_portal, read_portal = portals(self.user, self.maildir)
        factories = (
            _SMTPFactory(smtp_portal),
            _ReaderFactory(imap4.IMAP4Server, "IMAP", read_portal),
            _ReaderFactory(pop3.POP3, "POP3", read_portal),
        )
        for factory in factories:
            self.ports.append(self.reactor.listenTCP(0, factory, interface="127.0.0.1"))
        smtp_port, imap_port, pop3_port = (_port_number(port) for port in self.ports)
        return UpstreamPorts(smtp=smtp_port, imap=imap_port, pop3=pop3_port)

    def stop(self) -> defer.Deferred[Any]:
        ports, self.ports = self.ports, []
        return defer.DeferredList([defer.maybeDeferred(port.stopListening) for port in ports])


def _port_number(port: IListeningPort) -> int:
    host = port.getHost()
    assert isinstance(host, IPv4Address), host
    return host.port
