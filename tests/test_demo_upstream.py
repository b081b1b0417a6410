"""
The demo's pieces in this process, on real loopback sockets: the IMAP mailbox over the
maildir (through twisted.mail's IMAP4Server, with imaplib), the servers' password
checks, and the whole demo service — where it listens, what it refuses, what it prints.
The demo as a user runs it (twistd, `mailrelay demo`, the README): tests/test_demo.py.
"""

from __future__ import annotations

import imaplib
import io
import poplib
import shutil
import smtplib
import ssl
import tempfile
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.python import usage
from twisted.scripts.twistd import ServerOptions

from mailrelay.__main__ import check, main
from mailrelay.demo.maildir import Maildir
from mailrelay.demo.service import DEMO_USER, DemoService
from mailrelay.demo.setup import LISTENERS, demo_ports
from mailrelay.demo.upstream import DemoUpstream, UpstreamPorts
from tests.support.demo import free_port_offset, printed_commands
from tests.support.net import ProxyTestCase

USER, PASSWORD = DEMO_USER.address, DEMO_USER.password
FIRST = b"From: a@example.net\nTo: demo@example.test\nSubject: first\n\nline one\nline two\n"
SECOND = b"From: b@example.net\nTo: demo@example.test\nSubject: second\n\nthe second body\n"


def crlf(message: bytes) -> bytes:
    return message.replace(b"\n", b"\r\n")


def uids_and_flags(imap: imaplib.IMAP4) -> dict[int, str]:
    """UID -> the FLAGS list of every message, from `UID FETCH 1:* (FLAGS)`."""
    status, data = imap.uid("FETCH", "1:*", "(FLAGS)")
    assert status == "OK", data
    found = {}
    for item in data:
        text = item.decode() if isinstance(item, bytes) else item[0].decode()
        uid = int(text.split("UID ")[1].split()[0].rstrip(")"))
        found[uid] = text.split("FLAGS (")[1].split(")")[0]
    return found


class UpstreamTests(ProxyTestCase):
    """The demo's twisted.mail servers on one maildir, without mailrelay in front."""

    def setUp(self) -> None:
        super().setUp()
        folder = Path(tempfile.mkdtemp(prefix="mailrelay-test-"))
        self.addCleanup(shutil.rmtree, folder, True)
        self.maildir = Maildir(folder / "Maildir")
        self.upstream = DemoUpstream(DEMO_USER, self.maildir, reactor)
        self.ports: UpstreamPorts = self.upstream.listen()
        self.addCleanup(self.upstream.stop)

    def imap(self) -> imaplib.IMAP4:
        imap = imaplib.IMAP4("127.0.0.1", self.ports.imap)
        imap.login(USER, PASSWORD)
        status, data = imap.select("INBOX")
        assert status == "OK", data
        return imap

    async def test_imap_uids_stay_put_across_sessions_and_deliveries(self) -> None:
        self.maildir.deliver(FIRST)
        self.maildir.deliver(SECOND)

        def first_session() -> dict[int, str]:
            imap = self.imap()
            try:
                return uids_and_flags(imap)
            finally:
                imap.logout()

        self.assertEqual(sorted(await self.in_thread(first_session)), [1, 2])
        self.maildir.deliver(b"Subject: third\n\nthree\n")

        def second_session() -> tuple[dict[int, str], bytes]:
            imap = self.imap()
            try:
                status, data = imap.uid("FETCH", "2", "(BODY[])")
                assert status == "OK", data
                return uids_and_flags(imap), data[0][1]
            finally:
                imap.logout()

        uids, body = await self.in_thread(second_session)
        self.assertEqual(sorted(uids), [1, 2, 3])
        self.assertEqual(body, crlf(SECOND))

    async def test_imap_fetch_body_header_and_text(self) -> None:
        self.maildir.deliver(FIRST)

        def fetch() -> list[Any]:
            imap = self.imap()
            try:
                status, data = imap.fetch("1", "(BODY[] BODY[HEADER.FIELDS (SUBJECT)] BODY[TEXT] RFC822.SIZE)")
                assert status == "OK", data
                return data
            finally:
                imap.logout()

        data = await self.in_thread(fetch)
        literals = [part[1] for part in data if isinstance(part, tuple)]
        self.assertEqual(literals[0], crlf(FIRST))
        self.assertEqual(literals[1].strip(), b"Subject: first")
        self.assertEqual(literals[2], b"line one\r\nline two\r\n")
        self.assertIn(f"RFC822.SIZE {len(crlf(FIRST))}".encode(), b" ".join(p if isinstance(p, bytes) else p[0] for p in data))

    async def test_imap_flags_are_kept_in_the_file_name_and_expunge_removes(self) -> None:
        self.maildir.deliver(FIRST)
        self.maildir.deliver(SECOND)

        def flag_and_expunge() -> tuple[dict[int, str], dict[int, str]]:
            imap = self.imap()
            try:
                imap.uid("STORE", "1", "+FLAGS", r"(\Seen \Flagged)")
                imap.uid("STORE", "2", "+FLAGS", r"(\Deleted)")
                before = uids_and_flags(imap)
                imap.expunge()
            finally:
                imap.logout()
            imap = self.imap()  # a new session sees what the files say
            try:
                return before, uids_and_flags(imap)
            finally:
                imap.logout()

        before, after = await self.in_thread(flag_and_expunge)
        self.assertEqual(set(before[1].split()), {r"\Seen", r"\Flagged"})
        self.assertIn(r"\Deleted", before[2])
        self.assertEqual(list(after), [1])
        self.assertEqual(set(after[1].split()), {r"\Seen", r"\Flagged"})
        self.assertEqual([p.name.split(":")[1] for p in (self.maildir.path / "cur").iterdir()], ["2,FS"])

    async def test_pop3_retrieves_the_delivered_message(self) -> None:
        self.maildir.deliver(FIRST)

        def retrieve() -> list[bytes]:
            pop = poplib.POP3("127.0.0.1", self.ports.pop3)
            try:
                pop.user(USER)
                pop.pass_(PASSWORD)
                return pop.retr(1)[1]
            finally:
                pop.quit()

        self.assertEqual(await self.in_thread(retrieve), FIRST.rstrip(b"\n").split(b"\n"))

    async def test_smtp_delivers_to_the_demo_user_with_or_without_auth(self) -> None:
        def send() -> None:
            with smtplib.SMTP("127.0.0.1", self.ports.smtp) as smtp:
                smtp.sendmail("a@example.net", [USER], crlf(FIRST))  # the MX case: no login
            with smtplib.SMTP("127.0.0.1", self.ports.smtp) as smtp:
                smtp.login(USER, PASSWORD)
                smtp.sendmail(USER, [USER], crlf(SECOND))

        await self.in_thread(send)
        delivered = sorted(m.read() for m in self.maildir.messages())
        self.assertEqual(len(delivered), 2)
        self.assertTrue(delivered[0].endswith(FIRST) and delivered[1].endswith(SECOND), delivered)

    # -- attacks ------------------------------------------------------------------------

    async def test_every_server_refuses_a_wrong_password(self) -> None:
        def attempts() -> list[str]:
            refused = []
            imap = imaplib.IMAP4("127.0.0.1", self.ports.imap)
            try:
                imap.login(USER, PASSWORD + "x")
            except imaplib.IMAP4.error as e:
                refused.append(f"imap: {e}")
            imap.shutdown()
            pop = poplib.POP3("127.0.0.1", self.ports.pop3)
            pop.user(USER)
            try:
                pop.pass_(PASSWORD[:-1])
            except poplib.error_proto as e:
                refused.append(f"pop3: {e}")
            pop.quit()
            with smtplib.SMTP("127.0.0.1", self.ports.smtp) as smtp:
                try:
                    smtp.login("other@example.test", PASSWORD)  # the password, another user
                except smtplib.SMTPAuthenticationError as e:
                    refused.append(f"smtp: {e.smtp_code}")
            return refused

        self.assertEqual(
            await self.in_thread(attempts), ["imap: b'LOGIN failed'", "pop3: b'-ERR Authentication failed'", "smtp: 535"]
        )

    async def test_smtp_relays_for_nobody_else(self) -> None:
        def relay() -> None:
            with smtplib.SMTP("127.0.0.1", self.ports.smtp) as smtp:
                smtp.login(USER, PASSWORD)  # even logged in
                smtp.sendmail(USER, ["victim@example.org"], FIRST)

        with self.assertRaises(smtplib.SMTPRecipientsRefused):
            await self.in_thread(relay)
        self.assertEqual(self.maildir.messages(), [])

    async def test_an_anonymous_client_reads_no_mail(self) -> None:
        def anonymous() -> str:
            imap = imaplib.IMAP4("127.0.0.1", self.ports.imap)
            try:
                status, data = imap.select("INBOX")  # before any login
                return f"{status} {data}"
            except imaplib.IMAP4.error as e:
                return str(e)
            finally:
                imap.shutdown()

        self.maildir.deliver(FIRST)
        self.assertNotIn("EXISTS", await self.in_thread(anonymous))


class DemoServiceTests(ProxyTestCase):
    """The whole demo in this process: mailrelay in front of the servers above."""

    def setUp(self) -> None:
        super().setUp()
        self.out = io.StringIO()
        self.offset = free_port_offset()
        self.demo = DemoService(self.offset, reactor, out=self.out)
        self.demo.privilegedStartService()
        self.demo.startService()
        self.addCleanup(self.demo.stopService)
        assert self.demo.instructions is not None
        self.instructions = self.demo.instructions
        self.context = ssl.create_default_context(cafile=str(self.instructions.certificates.ca))

    def test_everything_listens_on_127_0_0_1_only(self) -> None:
        assert self.demo.mailrelay is not None and self.demo.upstream is not None
        ports = demo_ports(self.offset)
        for name, listener in self.demo.mailrelay.listeners.items():
            assert listener._listening is not None, name
            host = listener._listening.getHost()
            assert isinstance(host, IPv4Address), host
            self.assertEqual((host.host, host.port), ("127.0.0.1", ports[name]), name)
        self.assertEqual(sorted(self.demo.mailrelay.listeners), sorted(listener.name for listener in LISTENERS))
        hosts = [port.getHost() for port in self.demo.upstream.ports]
        self.assertEqual([(type(h), getattr(h, "host", None)) for h in hosts], [(IPv4Address, "127.0.0.1")] * 3)

    def test_the_configuration_file_is_what_runs_and_passes_check(self) -> None:
        config = self.instructions.config
        self.assertEqual(config.parent, self.instructions.folder)
        self.assertEqual(check(str(config)), 0)
        assert self.demo.mailrelay is not None
        self.assertEqual(self.demo.mailrelay.config.source, str(config))

    def test_the_instructions_are_printed_once_and_hold_no_secret_but_the_demo_password(self) -> None:
        text = self.out.getvalue()
        self.assertEqual(text, self.instructions.text())
        self.assertEqual(len(printed_commands(text)), 4)
        folder = self.instructions.folder
        key = self.instructions.certificates.key
        self.assertNotIn(key.name, text)
        self.assertNotIn("PRIVATE", text)
        secrets = [line for line in key.read_text().splitlines() if "-----" not in line]
        self.assertFalse([line for line in secrets if line in text])
        # The demo password is the only credential: every --user names it, nothing else does.
        self.assertEqual(text.count(f"--user {USER}:{PASSWORD}"), 3)
        self.assertEqual(text.count(PASSWORD), 4)  # the three commands and the "Demo user" line
        self.assertNotIn(" -k ", text)
        self.assertNotIn("--insecure", text)
        self.assertTrue(str(folder) in text and str(self.instructions.certificates.ca) in text)

    async def test_a_wrong_password_through_mailrelay_gets_the_upstream_refusal(self) -> None:
        ports = demo_ports(self.offset)

        def attempts() -> list[str]:
            refused = []
            with smtplib.SMTP("127.0.0.1", ports["submission"]) as smtp:
                smtp.starttls(context=self.context)
                try:
                    smtp.login(USER, "wrong")
                except smtplib.SMTPAuthenticationError as e:
                    refused.append(f"{e.smtp_code} {e.smtp_error!r}")
            imap = imaplib.IMAP4_SSL("127.0.0.1", ports["imaps"], ssl_context=self.context)
            try:
                imap.login(USER, "wrong")
            except imaplib.IMAP4.error as e:
                refused.append(str(e))
            imap.shutdown()
            pop = poplib.POP3_SSL("127.0.0.1", ports["pop3s"], context=self.context)
            pop.user(USER)
            try:
                pop.pass_("wrong")
            except poplib.error_proto as e:
                refused.append(str(e))
            pop.quit()
            return refused

        self.assertEqual(
            await self.in_thread(attempts),
            [
                "535 b'5.7.8 Authentication credentials invalid'",
                "b'[AUTHENTICATIONFAILED] LOGIN failed'",
                "b'-ERR [AUTH] Authentication failed'",
            ],
        )
        lines = [e for e in self.logs.sessions() if e.get("outcome") == "rejected"]
        self.assertEqual(sorted(e["listener"] for e in lines), ["imaps", "pop3s", "submission"])
        assert self.demo.upstream is not None
        self.assertEqual(self.demo.upstream.maildir.messages(), [])

    async def test_stopping_removes_the_folder(self) -> None:
        folder = self.instructions.folder
        self.assertTrue((folder / "mailrelay.toml").exists())
        await self.demo.stopService()
        self.assertFalse(folder.exists())


def test_twistd_refuses_to_daemonize_the_demo() -> None:
    """Without -n the printed commands would go nowhere: twistd refuses before forking."""
    with pytest.raises(usage.UsageError, match=r"runs in the foreground: twistd -n mailrelay"):
        ServerOptions().parseOptions(["mailrelay"])
    foreground = ServerOptions()
    foreground.parseOptions(["-n", "mailrelay", "--port-offset", "20000"])
    assert foreground.subOptions.config is None and foreground.subOptions.port_offset == 20000


@pytest.mark.parametrize(
    ("argument", "reason"),
    [
        ("ten", "'ten' is not a whole number"),
        ("-1", "-1 puts listeners outside 1-65535: choose from 0 to 64540"),
        ("64541", "64541 puts listeners outside 1-65535: choose from 0 to 64540"),
    ],
)
def test_a_port_offset_that_cannot_be_used_is_refused_with_the_range(argument: str, reason: str) -> None:
    with pytest.raises(usage.UsageError) as refused:
        ServerOptions().parseOptions(["-n", "mailrelay", "--port-offset", argument])
    assert str(refused.value).startswith(f"--port-offset: {reason}")
    with pytest.raises(SystemExit) as exit:
        main(["demo", "--port-offset", argument])
    assert exit.value.code == 2  # argparse's usage error, with the same reason on stderr


def test_the_port_offset_is_for_the_demo_only(tmp_path: Path) -> None:
    with pytest.raises(usage.UsageError, match="--port-offset is for the demo, which runs without --config"):
        ServerOptions().parseOptions(["-n", "mailrelay", "--config", str(tmp_path / "x.toml"), "--port-offset", "1"])
