"""
A private Postfix (the Debian package) for tests: in the foreground with its own
configuration, queue and maildirs in a temp directory, on free loopback ports; STARTTLS
and implicit TLS when given a certificate, XCLIENT from loopback, and delivery to
maildirs whose files the test reads byte for byte (`split_delivered` parts Postfix's
trace fields from the message).
"""

from __future__ import annotations

import os
import pty
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from types import TracebackType

from tests.support.servers import (
    NOBODY,
    REAPER,
    SIZE_LIMIT,
    WAIT,
    ancestors,
    free_ports,
    listeners,
    read_text,
    remove_quietly,
    running_servers,
    server_environment,
)


class PostfixError(RuntimeError):
    """Postfix did not start, or the mail a test waited for did not arrive."""


POSTFIX_DIRECTORIES = ("/usr/sbin", "/usr/lib/postfix/sbin", "/usr/libexec/postfix", "/sbin")


def postfix_command() -> str:
    """The `postfix` control command, wherever this distribution puts it."""
    found = shutil.which("postfix")
    if found:
        return found
    for directory in POSTFIX_DIRECTORIES:
        path = os.path.join(directory, "postfix")
        if os.access(path, os.X_OK):
            return path
    raise PostfixError("postfix is not installed: dev/test installs it (the Debian package postfix)")


# Postfix's internal services, none chrooted (a chroot would need copies of /etc files in
# the queue directory); Postfix.master_cf() puts the SMTP listeners in front. Tried one by
# one: mail over SMTP to a maildir stops without cleanup, qmgr, rewrite or virtual; STARTTLS
# answers "454 4.7.0 TLS not available due to local problem" without tlsmgr; postfix-script
# refuses to start without postlog when maillog_file is set. The others serve bounces,
# deferrals, address verification, the error transport (default_transport here), sendmail
# submissions (pickup) and postqueue (showq, flush): they run only when used.
MASTER_SERVICES = """\
# service  type  private unpriv chroot wakeup maxproc command
pickup     unix  n       -      n      60     1       pickup
cleanup    unix  n       -      n      -      0       cleanup
qmgr       unix  n       -      n      300    1       qmgr
tlsmgr     unix  -       -      n      1000?  1       tlsmgr
rewrite    unix  -       -      n      -      -       trivial-rewrite
bounce     unix  -       -      n      -      0       bounce
defer      unix  -       -      n      -      0       bounce
trace      unix  -       -      n      -      0       bounce
verify     unix  -       -      n      -      1       verify
flush      unix  n       -      n      1000?  0       flush
proxymap   unix  -       -      n      -      -       proxymap
proxywrite unix  -       -      n      -      1       proxymap
smtp       unix  -       -      n      -      -       smtp
relay      unix  -       -      n      -      -       smtp
showq      unix  n       -      n      -      -       showq
error      unix  -       -      n      -      -       error
retry      unix  -       -      n      -      -       error
discard    unix  -       -      n      -      -       discard
virtual    unix  -       n      n      -      -       virtual
anvil      unix  -       -      n      -      1       anvil
scache     unix  -       -      n      -      1       scache
postlog    unix-dgram n  -      n      -      1       postlogd
"""


class Postfix:
    """
    A private Postfix for one test or one test module, in `directory` (for instance from
    `tempfile.mkdtemp()`; not from pytest's tmp_path, whose parent is closed to the
    postfix and nobody users). The caller removes the directory after `stop()`; it keeps
    the log until then.

    - `port`: plain SMTP on 127.0.0.1; with `tls=(cert_path, key_path)` it offers STARTTLS
      and `tls_port` speaks TLS from the first byte (otherwise `tls_port` is None).
    - Any loopback client may send without AUTH and may use XCLIENT; the Received header
      then names the XCLIENT client and, for LOGIN=, "(Authenticated sender: LOGIN)".
    - Mail for `users` (addresses; their domains become virtual mailbox domains) is
      delivered to maildirs: `wait_for_messages(user)` returns the delivered files. Other
      users of those domains are refused at RCPT with 550; other domains are accepted
      from loopback and bounced without any network lookup.
    - `extra_master_cf`: more master.cf services (e.g. an example file's smtpd on a port
      the test chose), put after the SMTP listeners.
    - It runs as `postfix start-fg` under REAPER; `stop()` ends and collects every process
      of the instance, `processes()` lists them.
    """

    def __init__(
        self,
        directory: str,
        *,
        tls: tuple[str, str] | None = None,
        users: Sequence[str] = ("alice@example.test", "bob@example.test"),
        hostname: str = "mx.upstream.test",
        extra_master_cf: str = "",
    ) -> None:
        self.dir = os.path.abspath(directory)
        self.extra_master_cf = extra_master_cf
        self.tls = tls
        self.users = list(users)
        self.hostname = hostname
        for user in self.users:
            if not re.fullmatch(r"[^@\s/]+@[^@\s/]+", user):
                raise ValueError(f"not a user@domain address: {user!r}")
        for parent in ancestors(self.dir):
            if not os.stat(parent).st_mode & 0o001:
                raise ValueError(
                    f"{parent} is closed to other users, so Postfix's daemons (user postfix) and the "
                    f"delivery agent (nobody) cannot reach {self.dir}: use tempfile.mkdtemp()"
                )
        self.conf_dir = os.path.join(self.dir, "conf")
        self.queue_dir = os.path.join(self.dir, "queue")
        self.data_dir = os.path.join(self.dir, "data")
        self.mail_dir = os.path.join(self.dir, "mail")
        self.log_file = os.path.join(self.dir, "postfix.log")
        self.output_file = os.path.join(self.dir, "postfix.out")
        self.name = "postfix-" + re.sub(r"[^A-Za-z0-9]", "-", os.path.basename(self.dir))
        self._ports: tuple[int, int | None] | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._command = postfix_command()

    # -- the interface

    @property
    def port(self) -> int:
        if self._ports is None:
            raise PostfixError("Postfix has not been started")
        return self._ports[0]

    @property
    def tls_port(self) -> int | None:
        if self._ports is None:
            raise PostfixError("Postfix has not been started")
        return self._ports[1]

    @property
    def running(self) -> bool:
        return self._process is not None

    def log_text(self) -> str:
        """Postfix's log so far ('' before it writes one)."""
        return read_text(self.log_file)

    def maildir(self, user: str) -> str:
        local, domain = user.rsplit("@", 1)
        return os.path.join(self.mail_dir, domain, local)

    def messages(self, user: str) -> list[bytes]:
        """The files delivered to `user` so far, as bytes, oldest first."""
        new = os.path.join(self.maildir(user), "new")
        entries = []
        for entry in os.scandir(new):
            entries.append((entry.stat().st_mtime_ns, entry.name, entry.path))
        result = []
        for _, _, path in sorted(entries):
            with open(path, "rb") as f:
                result.append(f.read())
        return result

    def wait_for_messages(self, user: str, count: int = 1, timeout: float = WAIT) -> list[bytes]:
        """
        Wait until at least `count` messages were delivered to `user`, and return all of
        them, oldest first. Each is the maildir file as Postfix wrote it: Return-Path,
        X-Original-To, Delivered-To and Received fields, then the message as sent, with LF
        line ends (split_delivered() parts them). This blocks: from the reactor thread of
        a trial test, call it through deferToThread.
        """
        if user not in self.users:
            raise ValueError(f"{user} is not one of this instance's users {self.users}")
        deadline = time.monotonic() + timeout
        while True:
            found = self.messages(user)
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                raise PostfixError(
                    f"{len(found)} of {count} messages delivered to {user} after {timeout} s\n"
                    f"queue:\n{self._queue_listing()}\nlog:\n{self.log_text()}"
                )
            time.sleep(0.02)

    def wait_for_empty_queue(self, timeout: float = WAIT) -> None:
        """Wait until Postfix has nothing left to deliver (every message accepted so far
        is in its maildirs or bounced). This blocks, like `wait_for_messages`."""
        deadline = time.monotonic() + timeout
        while "Mail queue is empty" not in (listing := self._queue_listing()):
            if time.monotonic() > deadline:
                raise PostfixError(f"the queue is not empty after {timeout} s:\n{listing}")
            time.sleep(0.05)

    def start(self) -> None:
        """Start Postfix (a no-op when it runs) and wait until it greets on its port."""
        if self._process is not None:
            return
        self._prepare()
        failures = []
        for _ in range(5):
            if self._ports is None:
                ports = free_ports(2 if self.tls else 1)
                self._ports = (ports[0], ports[1] if self.tls else None)
            self._write_config()
            try:
                self._launch()
                return
            except PostfixError as error:
                # Another process took one of the ports between our choice and Postfix's bind.
                if "Address already in use" not in str(error):
                    raise
                failures.append(str(error))
                self._ports = None
        raise PostfixError("no free port found for Postfix:\n" + "\n".join(failures))

    def stop(self) -> None:
        """Stop Postfix and every process it started (a no-op when it is not running)."""
        if self._process is None:
            return
        process, self._process = self._process, None
        running_servers.discard(self)
        master = self._master_pid()
        if master is not None:
            # What "postfix stop" does, less its polling: it sends the master SIGTERM, then
            # sleeps a whole second when the master has not exited at once (it rarely has).
            try:
                os.kill(master, signal.SIGTERM)
            except ProcessLookupError:
                pass
            # The master passes the signal on to its children and exits, postfix-script
            # exits, and REAPER once it collected every process the master left.
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        # Whatever is left (of a start that failed half way, or that did not stop) is killed.
        deadline = time.monotonic() + 10
        while leftovers := self.processes():
            for pid in leftovers:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if time.monotonic() > deadline:
                raise PostfixError(f"Postfix processes {leftovers} are still running")
            time.sleep(0.02)
        process.wait()

    def processes(self) -> list[int]:
        """This instance's live processes: REAPER, postfix-script, the master and its
        children (all have MAIL_CONFIG={conf_dir} in their environment)."""
        mark = b"MAIL_CONFIG=" + os.fsencode(self.conf_dir)
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/environ", "rb") as f:
                        environment = f.read().split(b"\0")
                except OSError:
                    continue  # gone, or a zombie
                if mark in environment:
                    found.append(int(entry))
        return found

    def __enter__(self) -> Postfix:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    # -- the work

    def _prepare(self) -> None:
        # The daemons run as postfix, the delivery agent as nobody: both go through here.
        os.chmod(self.dir, 0o755)
        for path in (self.conf_dir, self.queue_dir, self.mail_dir):
            os.makedirs(path, exist_ok=True)
            os.chmod(path, 0o755)
        # The virtual delivery agent runs as nobody and cannot create them in a root-owned base.
        for user in self.users:
            maildir = self.maildir(user)
            for path in (os.path.dirname(maildir), maildir, *(os.path.join(maildir, sub) for sub in ("cur", "new", "tmp"))):
                if not os.path.isdir(path):
                    os.mkdir(path, 0o755)
                    if path != os.path.dirname(maildir):
                        os.chown(path, NOBODY, NOBODY)

    def vmailbox(self) -> str:
        """virtual_mailbox_maps: each user's maildir, relative to virtual_mailbox_base."""
        lines = []
        for user in self.users:
            local, domain = user.rsplit("@", 1)
            lines.append(f"{user} {domain}/{local}/\n")
        return "".join(lines)

    def main_cf(self) -> str:
        domains = sorted({user.rsplit("@", 1)[1] for user in self.users})
        lines = [
            "compatibility_level = 3.6",
            f"queue_directory = {self.queue_dir}",
            f"data_directory = {self.data_dir}",
            # Distinct names in logs; distinct queue and data directories keep instances apart.
            f"multi_instance_name = {self.name}",
            "mail_owner = postfix",
            f"myhostname = {self.hostname}",
            "mydestination =",
            "inet_interfaces = 127.0.0.1",
            "inet_protocols = ipv4",
            "mynetworks = 127.0.0.0/8",
            "smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination",
            "smtpd_authorized_xclient_hosts = 127.0.0.0/8",
            # Shows XCLIENT LOGIN= in the Received header: "(Authenticated sender: LOGIN)".
            "smtpd_sasl_authenticated_header = yes",
            # No syslog here: postlogd writes this file. Postfix refuses (and says so only
            # to syslog) a file outside maillog_file_prefixes.
            f"maillog_file = {self.log_file}",
            f"maillog_file_prefixes = /var, /dev/stdout, {self.dir}",
            f"virtual_mailbox_domains = {', '.join(domains)}",
            f"virtual_mailbox_base = {self.mail_dir}",
            f"virtual_mailbox_maps = texthash:{os.path.join(self.conf_dir, 'vmailbox')}",
            f"virtual_uid_maps = static:{NOBODY}",
            f"virtual_gid_maps = static:{NOBODY}",
            "virtual_minimum_uid = 1",
            f"message_size_limit = {SIZE_LIMIT}",
            # The virtual agent refuses to start when its limit is below message_size_limit.
            f"virtual_mailbox_limit = {SIZE_LIMIT}",
            # Messages stay as sent: no Message-ID, Date or address rewriting for loopback
            # clients (which count as local by default).
            "local_header_rewrite_clients =",
            # No /etc/aliases, no NIS, no local delivery, nothing sent out.
            "alias_maps =",
            "alias_database =",
            "local_recipient_maps =",
            "default_transport = error:this test Postfix delivers only to its maildirs",
            "relay_transport = error:this test Postfix delivers only to its maildirs",
            "smtp_dns_support_level = disabled",
            # Fast: no delay for bursts of mail, quick retries of a deferred delivery.
            "in_flow_delay = 0",
            "smtpd_error_sleep_time = 0",
            "queue_run_delay = 1s",
            "minimal_backoff_time = 1s",
            "maximal_backoff_time = 2s",
            "biff = no",
        ]
        if self.tls:
            cert, key = self.tls
            lines += [
                f"smtpd_tls_cert_file = {os.path.abspath(cert)}",
                f"smtpd_tls_key_file = {os.path.abspath(key)}",
                "smtpd_tls_security_level = may",
                "smtpd_tls_loglevel = 1",
                # The Received header says whether the client came in with TLS.
                "smtpd_tls_received_header = yes",
            ]
        return "\n".join(lines) + "\n"

    def master_cf(self) -> str:
        port, tls_port = self._ports or (0, None)
        lines = [f"127.0.0.1:{port} inet n - n - - smtpd"]
        if tls_port is not None:
            lines.append(
                f"127.0.0.1:{tls_port} inet n - n - - smtpd -o smtpd_tls_wrappermode=yes -o smtpd_tls_security_level=encrypt"
            )
        return "\n".join(lines) + "\n" + self.extra_master_cf + MASTER_SERVICES

    def _write_config(self) -> None:
        for name, text in (("main.cf", self.main_cf()), ("master.cf", self.master_cf()), ("vmailbox", self.vmailbox())):
            path = os.path.join(self.conf_dir, name)
            with open(path, "w") as f:
                f.write(text)
            # Every Postfix program and daemon that starts waits, 300 ms at a time, until a
            # main.cf changed a moment ago is about two seconds old (in case it is being
            # edited): 1.5 s more for each start. Dated a minute back, it is read at once.
            past = time.time() - 60
            os.utime(path, (past, past))

    def _launch(self) -> None:
        # start-fg keeps the master in the foreground, under postfix-script, under REAPER.
        # postfix-script first makes the queue and data directories with their owners.
        remove_quietly(self._pid_file)
        with open(self.output_file, "ab") as output:
            process = subprocess.Popen(
                [sys.executable, "-c", REAPER, self._command, "-c", self.conf_dir, "start-fg"],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**server_environment(), "MAIL_CONFIG": self.conf_dir},
            )
        self._process = process
        running_servers.add(self)
        deadline = time.monotonic() + WAIT
        try:
            # Our master is up (it wrote its PID) and its smtpd greets.
            while self._master_pid() is None or not _greets(self.port):
                if process.poll() is not None:
                    # For instance "fatal: bind 127.0.0.1 port N: Address already in use".
                    raise PostfixError(f"Postfix exited with status {process.returncode}")
                if time.monotonic() > deadline:
                    raise PostfixError(f"Postfix did not greet on port {self.port} within {WAIT} s")
                time.sleep(0.02)
            # Postfix listens with SO_REUSEPORT: a second root-owned Postfix on the same
            # port binds without an error, and the kernel splits the connections.
            for port in self._ports or ():
                if port is not None and listeners(port) != 1:
                    raise PostfixError(f"Address already in use: {listeners(port)} servers listen on port {port}")
        except (PostfixError, OSError) as error:
            self.stop()
            raise PostfixError(
                f"{error}\noutput:\n{read_text(self.output_file)}\nlog:\n{self.log_text()}\npostfix check:\n{self._check()}"
            ) from None

    def _check(self) -> str:
        """
        What `postfix check` says about this configuration. The postfix command writes its
        errors to stderr only when that is a terminal (else to syslog, or to the log file
        once it has read main.cf): an error in main.cf leaves no trace otherwise.
        """
        controller, terminal = pty.openpty()
        try:
            subprocess.run(
                [self._command, "-c", self.conf_dir, "check"],
                stdin=subprocess.DEVNULL,
                stdout=terminal,
                stderr=terminal,
                timeout=WAIT,
                env=server_environment(),
            )
        except subprocess.TimeoutExpired:
            pass
        finally:
            os.close(terminal)
        chunks = []
        try:
            while chunk := os.read(controller, 65536):
                chunks.append(chunk)
        except OSError:
            pass  # EIO: all read
        finally:
            os.close(controller)
        return b"".join(chunks).decode("utf-8", "replace")

    @property
    def _pid_file(self) -> str:
        return os.path.join(self.queue_dir, "pid", "master.pid")

    def _master_pid(self) -> int | None:
        """The PID of this instance's running master, from its PID file."""
        try:
            with open(self._pid_file) as f:
                pid = int(f.read().strip())
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                command = f.read().split(b"\0")[0]
        except (OSError, ValueError):
            return None
        return pid if os.path.basename(command) == b"master" else None

    def _queue_listing(self) -> str:
        try:
            listing = subprocess.run(
                [os.path.join(os.path.dirname(self._command), "postqueue"), "-c", self.conf_dir, "-p"],
                capture_output=True,
                text=True,
                timeout=10,
                env=server_environment(),
            )
            return listing.stdout + listing.stderr
        except (OSError, subprocess.TimeoutExpired) as error:
            return f"(postqueue -p failed: {error})"


TRACE_FIELDS = (b"return-path", b"x-original-to", b"delivered-to")


def split_delivered(data: bytes) -> tuple[bytes, bytes]:
    """
    A maildir file from Postfix, split into what Postfix put in front of the message (the
    Return-Path, X-Original-To and Delivered-To fields of its delivery agent and the
    Received field of its smtpd) and the message as it was sent, with LF line ends.
    """
    lines = data.splitlines(keepends=True)
    fields: list[bytes] = []
    i = 0
    while i < len(lines) and len(fields) < len(TRACE_FIELDS) + 1:
        end = i + 1
        while end < len(lines) and lines[end][:1] in (b" ", b"\t"):
            end += 1
        field = b"".join(lines[i:end])
        name = field.split(b":", 1)[0].lower()
        expected = TRACE_FIELDS[len(fields)] if len(fields) < len(TRACE_FIELDS) else b"received"
        if name != expected:
            raise ValueError(f"expected a {expected.decode()} field, not {field[:200]!r}")
        fields.append(field)
        i = end
    if len(fields) != len(TRACE_FIELDS) + 1:
        raise ValueError(f"not a file delivered by Postfix: {data[:500]!r}")
    return b"".join(fields), b"".join(lines[i:])


def _greets(port: int) -> bool:
    """Whether an SMTP server on the port answers with a 220 greeting."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
            greeting = conn.recv(512)
            if greeting.startswith(b"220"):
                conn.sendall(b"QUIT\r\n")
                return True
            return False
    except OSError:
        return False
