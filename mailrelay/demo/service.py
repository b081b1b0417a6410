"""
The whole demo as one service: a temporary folder, the demo's mail servers, and
mailrelay's own `MailrelayService` built from the configuration file it writes.

Everything binds in `privilegedStartService` (the demo's servers first: mailrelay's
configuration names their ports), so a demo port already taken stops the start-up with
the reason, as any listener does. Once started, the instructions are written once to
`out`. Stopping stops mailrelay (its sessions drain), then the servers, and removes the
folder.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, TextIO

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger

from ..service import MailrelayService
from .certificate import write_certificates
from .instructions import Instructions, write_messages
from .maildir import Maildir
from .setup import DEFAULT_PORT_OFFSET, demo_ports, write_config
from .upstream import DemoUpstream, DemoUser

__all__ = ["DEMO_USER", "DemoService"]

DEMO_USER = DemoUser("demo@example.test", "demo-password")
"""Printed for everyone to read: it opens nothing but the demo's own mailbox, on 127.0.0.1."""


class DemoService(MultiService):
    """The demo. `out`: where the instructions go (default: the process's real standard
    output, even when twistd has redirected `sys.stdout` into the log)."""

    log = Logger()

    def __init__(self, port_offset: int = DEFAULT_PORT_OFFSET, reactor: Any = None, out: TextIO | None = None) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self.port_offset = port_offset
        self.reactor = reactor
        self.out = out
        self.folder: Path | None = None
        self.upstream: DemoUpstream | None = None
        self.mailrelay: MailrelayService | None = None
        self.instructions: Instructions | None = None
        self._prepared = False

    def privilegedStartService(self) -> None:
        if not self._prepared:
            self._prepared = True
            try:
                self._prepare()
            except BaseException:
                self._clean_up()
                raise
        try:
            super().privilegedStartService()
        except BaseException:
            # A port taken: nothing else will stop what did start, nor remove the folder.
            for service in self:
                if service.running:
                    service.stopService()
            if self.upstream is not None:
                self.upstream.stop()
            self._clean_up()
            raise

    def _prepare(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="mailrelay-demo-"))
        maildir = Maildir(self.folder / "Maildir")
        self.upstream = DemoUpstream(DEMO_USER, maildir, self.reactor)
        upstream_ports = self.upstream.listen()
        certificates = write_certificates(self.folder)
        config_path, config = write_config(self.folder, self.port_offset, upstream_ports, certificates)
        self.mailrelay = MailrelayService(config, reactor=self.reactor)
        self.mailrelay.setServiceParent(self)
        self.instructions = Instructions(
            folder=self.folder,
            config=config_path,
            ports=demo_ports(self.port_offset),
            upstream=upstream_ports,
            user=DEMO_USER,
            certificates=certificates,
            messages=write_messages(self.folder, DEMO_USER),
        )
        self.log.info(
            "demo: mail servers (twisted.mail) for {user} on 127.0.0.1 ports {smtp} (SMTP), {imap} (IMAP), {pop3} (POP3);"
            " files in {folder}",
            user=DEMO_USER.address,
            smtp=upstream_ports.smtp,
            imap=upstream_ports.imap,
            pop3=upstream_ports.pop3,
            folder=str(self.folder),
        )

    def startService(self) -> None:
        if not self._prepared:
            self.privilegedStartService()
        super().startService()
        assert self.instructions is not None
        out = self.out or sys.__stdout__ or sys.stdout
        out.write(self.instructions.text())
        out.flush()

    def stopService(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        await maybeDeferred(super().stopService)  # mailrelay: listeners close, sessions drain
        if self.upstream is not None:
            await self.upstream.stop()
        self._clean_up()

    def _clean_up(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None
