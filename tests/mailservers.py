"""
Real SMTP, IMAP and POP3 upstreams for tests, on loopback and free ports.

`Postfix` runs a private Postfix (the Debian package, installed by dev/test) in the
foreground with its own configuration, queue and maildirs in a temp directory: STARTTLS
and implicit TLS when given a certificate, XCLIENT from loopback, and delivery to maildirs
whose files the test reads byte for byte.

`Dovecot` runs a private Dovecot (the Debian packages, installed by dev/test) the same
way: IMAP and POP3, with STARTTLS and implicit TLS when given a certificate, users from a
passwd-file, maildirs the test delivers to, and the client's address forwarded by a
trusted proxy (IMAP ID, POP3 XCLIENT) when asked.

`SMTPUpstream` is an aiosmtpd server in its own thread that records what it was sent,
for tests that need AUTH or want to see the exact envelope and DATA bytes.

All start with `start()` or `with`, and `stop()` (idempotent) leaves nothing running.
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import os
import pty
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from types import MappingProxyType, TracebackType
from typing import Any

import attrs
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

WAIT = 30.0
"""Upper bound for starting a server or waiting for mail: a hang guard, never a timing assertion."""

SIZE_LIMIT = 64 * 1024 * 1024
"""Largest message either server accepts (the tests move up to 16 MiB)."""


def free_ports(count: int) -> list[int]:
    """`count` distinct loopback ports that were free a moment ago (bound together, then closed)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# ---------------------------------------------------------------------------------------
# Postfix


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

REAPER = """
import ctypes, os, sys
# PR_SET_CHILD_SUBREAPER: the processes the master leaves when it exits come here, not to
# PID 1, which may never collect them (a container's) and leaves them listed meanwhile.
ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)
child = os.posix_spawn(sys.argv[1], sys.argv[1:], os.environ)
code = 1
while True:
    try:
        pid, status = os.wait()
    except ChildProcessError:
        sys.exit(code)
    if pid == child:
        code = os.waitstatus_to_exitcode(status)
"""
"""Runs a command and exits, with its status, once it and every process it left have exited."""

NOBODY = 65534
"""The uid and gid Postfix's virtual delivery agent writes maildirs as, and Dovecot's mail processes read them as."""

_running: weakref.WeakSet[Postfix | Dovecot] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    """A test run that ends without stopping its instances (an interrupt) still stops them."""
    for instance in list(_running):
        instance.stop()


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
    ) -> None:
        self.dir = os.path.abspath(directory)
        self.tls = tls
        self.users = list(users)
        self.hostname = hostname
        for user in self.users:
            if not re.fullmatch(r"[^@\s/]+@[^@\s/]+", user):
                raise ValueError(f"not a user@domain address: {user!r}")
        for parent in _ancestors(self.dir):
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
        return _read_text(self.log_file)

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
        _running.discard(self)
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
        return "\n".join(lines) + "\n" + MASTER_SERVICES

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
        _remove(self._pid_file)
        with open(self.output_file, "ab") as output:
            process = subprocess.Popen(
                [sys.executable, "-c", REAPER, self._command, "-c", self.conf_dir, "start-fg"],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**_environment(), "MAIL_CONFIG": self.conf_dir},
            )
        self._process = process
        _running.add(self)
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
                if port is not None and _listeners(port) != 1:
                    raise PostfixError(f"Address already in use: {_listeners(port)} servers listen on port {port}")
        except (PostfixError, OSError) as error:
            self.stop()
            raise PostfixError(
                f"{error}\noutput:\n{_read_text(self.output_file)}\nlog:\n{self.log_text()}\npostfix check:\n{self._check()}"
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
                env=_environment(),
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
                env=_environment(),
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


def _ancestors(path: str) -> list[str]:
    result: list[str] = []
    while True:
        parent = os.path.dirname(path)
        if parent == path:
            return result
        result.append(parent)
        path = parent


def _environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MAIL_CONFIG", "MAIL_DEBUG")}
    env["PATH"] = os.pathsep.join([env.get("PATH", ""), "/usr/sbin", "/usr/bin", "/sbin", "/bin"])
    return env


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _listeners(port: int) -> int:
    """How many TCP sockets listen on the port (on any IPv4 address), from /proc/net/tcp."""
    count = 0
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            local, state = fields[1], fields[3]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                count += 1
    return count


def _read_text(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


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


# ---------------------------------------------------------------------------------------
# Dovecot


class DovecotError(RuntimeError):
    """Dovecot did not start or stop, or doveadm failed."""


DOVECOT_DIRECTORIES = ("/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin", "/sbin")

DOVECOT_USERS: Mapping[str, str] = MappingProxyType({"alice@example.test": "alice-secret", "bob@example.test": "bob-secret"})
"""Dovecot's default users and their passwords: two, so that a test can tell their mail apart."""


def dovecot_command(name: str = "dovecot") -> str:
    """The `dovecot` master (or, with name="doveadm", its admin tool), wherever this distribution puts it."""
    found = shutil.which(name)
    if found:
        return found
    for directory in DOVECOT_DIRECTORIES:
        path = os.path.join(directory, name)
        if os.access(path, os.X_OK):
            return path
    raise DovecotError(
        f"{name} is not installed: dev/test installs it (the Debian packages dovecot-core dovecot-imapd dovecot-pop3d)"
    )


class Dovecot:
    """
    A private Dovecot (IMAP and POP3) for one test or one test module, in `directory`
    (for instance from `tempfile.mkdtemp()`: its mail processes run as nobody, which
    must reach the maildirs). The caller removes the directory after `stop()`; it keeps
    the log until then. Nothing is read from /etc/dovecot.

    - `imap_port`, `pop3_port`: IMAP and POP3 on 127.0.0.1. With `tls=(cert_path,
      key_path)` both offer STARTTLS (STLS) and `imaps_port`, `pop3s_port` speak TLS from
      the first byte (otherwise they are None).
    - `users`: full addresses and their plaintext passwords (scheme PLAIN, so that
      CRAM-MD5 works besides PLAIN and LOGIN). Plaintext logins are allowed without TLS.
    - `trusted_networks` (e.g. "127.0.0.0/8"): Dovecot's login_trusted_networks. A client
      from there may name the real client: IMAP `ID ("x-originating-ip" ...
      "x-originating-port" ...)` before login, POP3 `XCLIENT ADDR=... PORT=...`; the log's
      login line then says `rip=` that address, and `who()` lists it. None: nobody may.
    - `deliver(user, message)` puts a message in a user's maildir as a delivery agent
      would; IMAP FETCH and POP3 RETR return its bytes (LF line ends become CRLF).
    - A failed login is answered at once, and costs later logins nothing (no delay, no
      penalty for the address). `log_text()` is Dovecot's log, `who()` lists the sessions.
    - It runs as `dovecot -F` under REAPER; `stop()` ends and collects every process of
      the instance, `processes()` lists them. Dovecot must be started as root.
    """

    def __init__(
        self,
        directory: str,
        *,
        tls: tuple[str, str] | None = None,
        users: Mapping[str, str] = DOVECOT_USERS,
        trusted_networks: str | None = None,
        hostname: str = "imap.upstream.test",
    ) -> None:
        self.dir = os.path.abspath(directory)
        self.tls = tls
        self.users = dict(users)
        self.trusted_networks = trusted_networks
        self.hostname = hostname
        for user, password in self.users.items():
            if not re.fullmatch(r"[^@\s/:]+@[^@\s/:]+", user):
                raise ValueError(f"not a user@domain address: {user!r}")
            # The fields of Dovecot's passwd-file are separated by colons, one user a line.
            if re.search(r"[:\r\n\0]", password) or not password:
                raise ValueError(f"{user}'s password is empty or has a colon, CR, LF or NUL: {password!r}")
        if not re.fullmatch(r"[A-Za-z0-9.-]+", hostname):
            raise ValueError(f"not a host name: {hostname!r}")
        if trusted_networks is not None and not re.fullmatch(r"[0-9A-Fa-f.:/ ]+", trusted_networks):
            raise ValueError(f"not a list of networks: {trusted_networks!r}")
        for parent in _ancestors(self.dir):
            if not os.stat(parent).st_mode & 0o001:
                raise ValueError(
                    f"{parent} is closed to other users, so Dovecot's mail processes (user nobody) cannot "
                    f"reach {self.dir}: use tempfile.mkdtemp()"
                )
        self.conf_file = os.path.join(self.dir, "dovecot.conf")
        self.users_file = os.path.join(self.dir, "users")
        self.base_dir = os.path.join(self.dir, "run")
        self.state_dir = os.path.join(self.dir, "state")
        self.mail_dir = os.path.join(self.dir, "mail")
        self.log_file = os.path.join(self.dir, "dovecot.log")
        self.output_file = os.path.join(self.dir, "dovecot.out")
        # Dovecot's instance_name: the processes' titles start with it ("NAME/imap-login").
        self.name = "dovecot-" + re.sub(r"[^A-Za-z0-9]", "-", os.path.basename(self.dir))
        self._ports: tuple[int, int, int | None, int | None] | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._session: int | None = None
        self._sequence = itertools.count()
        self._command = dovecot_command()

    # -- the interface

    @property
    def imap_port(self) -> int:
        return self._started_ports()[0]

    @property
    def pop3_port(self) -> int:
        return self._started_ports()[1]

    @property
    def imaps_port(self) -> int | None:
        return self._started_ports()[2]

    @property
    def pop3s_port(self) -> int | None:
        return self._started_ports()[3]

    @property
    def running(self) -> bool:
        return self._process is not None

    def log_text(self) -> str:
        """Dovecot's log so far, errors and info alike ('' before it writes one). Each
        login has a line like "imap-login: Info: Login: user=<alice@example.test>,
        method=PLAIN, rip=192.0.2.7, lip=127.0.0.1, ..." (rip: the client's address)."""
        return _read_text(self.log_file)

    def wait_for_log(self, text: str, count: int = 1, timeout: float = WAIT) -> list[str]:
        """
        Wait until at least `count` lines of the log contain `text`, and return all of
        them, oldest first. Dovecot's processes log through its log process: a line may
        reach the file a moment after the client saw what it tells of. This blocks: from
        the reactor thread of a trial test, call it through deferToThread.
        """
        deadline = time.monotonic() + timeout
        while True:
            log = self.log_text()
            lines = [line for line in log.splitlines() if text in line]
            if len(lines) >= count:
                return lines
            if time.monotonic() > deadline:
                raise DovecotError(f"{len(lines)} of {count} log lines with {text!r} after {timeout} s\nlog:\n{log}")
            time.sleep(0.02)

    def home(self, user: str) -> str:
        local, domain = user.rsplit("@", 1)
        return os.path.join(self.mail_dir, domain, local)

    def maildir(self, user: str) -> str:
        return os.path.join(self.home(user), "Maildir")

    def deliver(self, user: str, message: bytes) -> str:
        """
        Put `message` (bytes exactly as given, CRLF or LF line ends) in `user`'s INBOX the
        maildir way: written in tmp/, owned by nobody, then renamed into new/. Returns the
        file's path in new/, where it stays until a session of the user sees it (Dovecot
        then moves it to cur/). Works whether or not Dovecot runs.
        """
        if user not in self.users:
            raise ValueError(f"{user} is not one of this instance's users {sorted(self.users)}")
        self._make_maildir(user)
        now = time.time_ns() // 1000
        name = f"{now // 1_000_000}.M{now % 1_000_000}P{os.getpid()}Q{next(self._sequence)}.{self.hostname}"
        temporary = os.path.join(self.maildir(user), "tmp", name)
        final = os.path.join(self.maildir(user), "new", name)
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.fchown(fd, NOBODY, NOBODY)
            with open(fd, "wb", closefd=False) as f:
                f.write(message)
        finally:
            os.close(fd)
        os.rename(temporary, final)
        return final

    def who(self) -> list[str]:
        """
        The logged-in sessions, from `doveadm who -1`: one line per session, "USER PROTO
        PID IP" (fields separated by one space, no header), e.g. "alice@example.test imap
        4711 192.0.2.7". IP is the client's address as Dovecot knows it (the forwarded one
        from a trusted network). A session is listed from a moment after its login (its
        mail process tells anvil, which doveadm asks, after the client was told OK: see
        wait_for_session()) until a moment after the client's LOGOUT or QUIT.
        """
        if self._process is None:
            raise DovecotError("Dovecot is not running")
        try:
            result = subprocess.run(
                [dovecot_command("doveadm"), "-c", self.conf_file, "who", "-1"],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=WAIT,
                env=_environment(),
            )
        except subprocess.TimeoutExpired as error:
            raise DovecotError(f"doveadm who did not answer within {WAIT} s") from error
        if result.returncode != 0:
            raise DovecotError(f"doveadm who failed with status {result.returncode}: {result.stdout}{result.stderr}")
        lines = [" ".join(line.split()) for line in result.stdout.splitlines() if line.strip()]
        if not lines or lines[0].split()[:2] != ["username", "proto"]:
            raise DovecotError(f"doveadm who answered without its header: {result.stdout!r}")
        return lines[1:]

    def wait_for_session(self, user: str, proto: str | None = None, ip: str | None = None, timeout: float = WAIT) -> str:
        """
        Wait until who() lists a session of `user` (with that protocol, "imap" or "pop3",
        and from that address, when given) and return its line. This blocks: from the
        reactor thread of a trial test, call it through deferToThread.
        """
        deadline = time.monotonic() + timeout
        while True:
            sessions = self.who()
            for line in sessions:
                fields = line.split(" ")
                if fields[0] == user and proto in (None, fields[1]) and ip in (None, fields[-1]):
                    return line
            if time.monotonic() > deadline:
                raise DovecotError(
                    f"no session of {user} (proto {proto}, address {ip}) after {timeout} s\n"
                    f"doveadm who:\n" + "\n".join(sessions) + f"\nlog:\n{self.log_text()}"
                )
            time.sleep(0.02)

    def start(self) -> None:
        """Start Dovecot (a no-op when it runs) and wait until it greets on its IMAP port."""
        if self._process is not None:
            return
        if os.geteuid() != 0:
            # Its login processes run as dovenull, its mail processes as nobody.
            raise DovecotError("Dovecot must be started as root, to run its processes as dovenull, dovecot and nobody")
        self._prepare()
        failures = []
        for _ in range(5):
            if self._ports is None:
                ports = free_ports(4 if self.tls else 2)
                self._ports = (ports[0], ports[1], ports[2], ports[3]) if self.tls else (ports[0], ports[1], None, None)
            self._write_config()
            try:
                self._launch()
                return
            except DovecotError as error:
                # Another process took one of the ports between our choice and Dovecot's bind.
                if "Address already in use" not in str(error):
                    raise
                failures.append(str(error))
                self._ports = None
        raise DovecotError("no free ports found for Dovecot:\n" + "\n".join(failures))

    def stop(self) -> None:
        """Stop Dovecot and every process it started (a no-op when it is not running): the
        clients of open sessions are told "Server shutting down" and disconnected."""
        if self._process is None:
            return
        process, self._process = self._process, None
        _running.discard(self)
        reaper = process.pid
        master = self._master_pid()
        # What `doveadm stop` does is SIGTERM to the master, which then leaves the processes
        # of open sessions (and the auth, anvil... they use) running for as long as their
        # clients stay. So the sessions, and the login processes of clients that did not
        # log in, are stopped first: they say "* BYE Server shutting down." or "-ERR Server
        # shutting down." and exit.
        for pid, service in self._services(self.processes()).items():
            if service in SESSION_SERVICES:
                _kill(pid, signal.SIGTERM)
        if master is not None:
            _kill(master, signal.SIGTERM)
        deadline = time.monotonic() + 10
        terminated = set()
        while process.poll() is None and time.monotonic() < deadline:
            running = self.processes()
            services = self._services(running)
            if master in running:
                if set(services.values()) <= {"log"}:
                    # The master waited for the others and told the log process to quit.
                    # It now sleeps a second "to make sure" that was processed, then closes
                    # the log pipes and removes its PID file: nothing a test needs. Killed,
                    # it closes the pipes at once; the log process writes what is in them
                    # and exits.
                    _kill(master, signal.SIGKILL)
            else:
                # The master has exited and left processes (of a session that began while
                # it stopped, and those it uses): they are stopped too, but for the log
                # process, which exits once the others have.
                for pid, service in services.items():
                    if service != "log" and pid not in terminated:
                        _kill(pid, signal.SIGTERM)
                        terminated.add(pid)
            time.sleep(0.005)
        # Whatever is left (of a start that failed half way, or that did not stop) is
        # killed, REAPER last: it collects the others as they exit (were it gone, they
        # would be zombies of PID 1, which may never collect them).
        deadline = time.monotonic() + 10
        while True:
            leftovers = [pid for pid in self.processes() if pid != reaper]
            if process.poll() is not None and not leftovers:
                break
            if time.monotonic() > deadline:
                if leftovers:
                    raise DovecotError(f"Dovecot processes {leftovers} are still running")
                process.kill()
            for pid in leftovers:
                _kill(pid, signal.SIGKILL)
            time.sleep(0.01)
        self._session = None

    def processes(self) -> list[int]:
        """
        This instance's live processes: REAPER, the master and its children. Dovecot's
        children write their titles ("NAME/imap-login") over their command line and
        environment, so no mark in the environment survives. They are found by their
        session (REAPER starts one, no Dovecot process leaves it, and its ID is not reused
        while REAPER is not collected), by their title and, for the master, by the
        configuration file in its command line.
        """
        session = self._session
        title = os.fsencode(self.name + "/")
        conf = os.fsencode(self.conf_file)
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat", "rb") as f:
                        stat = f.read()
                    with open(f"/proc/{entry}/cmdline", "rb") as f:
                        command = f.read()
                except OSError:
                    continue  # gone
                # After the command name in parentheses: state, ppid, process group, session.
                fields = stat.rsplit(b")", 1)[1].split()
                if fields[0] == b"Z":
                    continue  # a zombie has nothing left to stop
                if int(fields[3]) == session or command.startswith(title) or conf in command.split(b"\0"):
                    found.append(int(entry))
        return found

    def _services(self, pids: list[int]) -> dict[int, str]:
        """Which of these processes run a Dovecot service (all but REAPER and the master), and which ("log", "imap"...)."""
        prefix = os.fsencode(self.name + "/")
        services = {}
        for pid in pids:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    title = f.read().split(b"\0")[0]
            except OSError:
                continue
            if title.startswith(prefix):
                services[pid] = os.fsdecode(title[len(prefix) :]).split(" ")[0]
        return services

    def __enter__(self) -> Dovecot:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    # -- the configuration

    def passwd_file(self) -> str:
        """The users for the passwd-file passdb and userdb: user:{PLAIN}password:uid:gid::home."""
        return "".join(
            f"{user}:{{PLAIN}}{password}:{NOBODY}:{NOBODY}::{self.home(user)}\n" for user, password in self.users.items()
        )

    def dovecot_conf(self) -> str:
        imap, pop3, imaps, pop3s = self._ports or (0, 0, None, None)
        lines = [
            "# A private Dovecot for tests (tests/mailservers.py). Nothing comes from /etc/dovecot.",
            f"instance_name = {self.name}",
            f"base_dir = {self.base_dir}",
            f"state_dir = {self.state_dir}",
            "protocols = imap pop3",
            "listen = 127.0.0.1",
            f"hostname = {self.hostname}",
            f"login_greeting = {self.hostname} Dovecot ready.",
            # No syslog here. Login lines (with rip=, the client's address) are info.
            f"log_path = {self.log_file}",
            f"info_log_path = {self.log_file}",
            "auth_verbose = yes",
            # The proxy in front may speak plaintext to it; CRAM-MD5 needs the plaintext
            # passwords of the passwd-file.
            "disable_plaintext_auth = no",
            "auth_mechanisms = plain login cram-md5",
            # A failed login is answered at once. Dovecot would wait up to 2 s (auth_failure_delay,
            # in 0.5 s steps) and raise the address's penalty: every later login from there,
            # trusted or not, would wait 2 to 15 s. A passdb field nodelay prevents both, but
            # the fields of a passdb that failed are dropped: this one, which authenticates
            # nobody (result "next"), keeps it.
            "passdb {",
            "  driver = static",
            "  args = noauthenticate nodelay=yes",
            "}",
            "passdb {",
            "  driver = passwd-file",
            f"  args = scheme=PLAIN {self.users_file}",
            "}",
            "userdb {",
            "  driver = passwd-file",
            f"  args = {self.users_file}",
            "}",
            "mail_location = maildir:~/Maildir",
            # The users are nobody (65534); the default refuses uids below 500 only.
            "first_valid_uid = 1",
            # Load tests log in as one user from one address many times over (the default is 10).
            "mail_max_userip_connections = 1000",
            # And open many connections at once: a process per login connection and per session.
            "default_process_limit = 1000",
            "default_client_limit = 5000",
            # COMPRESS=DEFLATE after login (RFC 4978), which a proxy must pass untouched.
            "protocol imap {",
            "  mail_plugins = $mail_plugins zlib imap_zlib",
            "}",
            # Its default chroot is an empty directory that Dovecot makes only on a system install.
            "service anvil {",
            "  chroot =",
            "}",
        ]
        if self.trusted_networks is not None:
            # Clients from there may forward the real client's address (IMAP ID, POP3 XCLIENT).
            lines.append(f"login_trusted_networks = {self.trusted_networks}")
        if self.tls:
            cert, key = self.tls
            lines += ["ssl = yes", f"ssl_cert = <{os.path.abspath(cert)}", f"ssl_key = <{os.path.abspath(key)}"]
        else:
            lines.append("ssl = no")
        # Dovecot's built-in listeners are imap 143, imaps 993, pop3 110 and pop3s 995:
        # each is given its port here, and port 0 turns the TLS ones off.
        for service, plain, plain_port, secure, secure_port in (
            ("imap-login", "imap", imap, "imaps", imaps),
            ("pop3-login", "pop3", pop3, "pop3s", pop3s),
        ):
            lines += [
                f"service {service} {{",
                f"  inet_listener {plain} {{",
                "    address = 127.0.0.1",
                f"    port = {plain_port}",
                "  }",
                f"  inet_listener {secure} {{",
                "    address = 127.0.0.1",
                f"    port = {secure_port or 0}",
                "    ssl = yes",
                "  }",
                "}",
            ]
        return "\n".join(lines) + "\n"

    # -- the work

    def _started_ports(self) -> tuple[int, int, int | None, int | None]:
        if self._ports is None:
            raise DovecotError("Dovecot has not been started")
        return self._ports

    def _prepare(self) -> None:
        # The mail processes run as nobody and go through here.
        os.chmod(self.dir, 0o755)
        os.makedirs(self.mail_dir, 0o755, exist_ok=True)
        for user in self.users:
            self._make_maildir(user)

    def _make_maildir(self, user: str) -> None:
        """The user's home and maildir, owned by nobody (the mail processes' user)."""
        home = self.home(user)
        domain = os.path.dirname(home)
        maildir = self.maildir(user)
        for path in (self.mail_dir, domain, home, maildir, *(os.path.join(maildir, sub) for sub in ("cur", "new", "tmp"))):
            if not os.path.isdir(path):
                os.mkdir(path, 0o755 if path in (self.mail_dir, domain) else 0o700)
                if path not in (self.mail_dir, domain):
                    os.chown(path, NOBODY, NOBODY)

    def _write_config(self) -> None:
        # The auth process runs as user dovecot and reads the passwd-file.
        for path, text in ((self.users_file, self.passwd_file()), (self.conf_file, self.dovecot_conf())):
            with open(path, "w") as f:
                f.write(text)
            os.chmod(path, 0o644)

    def _launch(self) -> None:
        _remove(self._pid_file)
        with open(self.output_file, "ab") as output:
            process = subprocess.Popen(
                [sys.executable, "-c", REAPER, self._command, "-F", "-c", self.conf_file],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=_environment(),
            )
        self._process = process
        self._session = process.pid
        _running.add(self)
        deadline = time.monotonic() + WAIT
        try:
            # Our master is up and holds the listening sockets of our ports (not some other
            # server that has one of them), and imap-login greets.
            while not self._listening() or not _imap_greets(self.imap_port):
                if process.poll() is not None:
                    # For instance "Error: service(imap-login): listen(127.0.0.1, N) failed:
                    # Address already in use" (on stderr, and in the log).
                    raise DovecotError(f"Dovecot exited with status {process.returncode}")
                if time.monotonic() > deadline:
                    raise DovecotError(f"Dovecot did not greet on port {self.imap_port} within {WAIT} s")
                time.sleep(0.02)
        except (DovecotError, OSError) as error:
            self.stop()
            raise DovecotError(f"{error}\noutput:\n{_read_text(self.output_file)}\nlog:\n{self.log_text()}") from None

    def _listening(self) -> bool:
        """Whether our master holds a listening socket for each of our ports."""
        master = self._master_pid()
        if master is None:
            return False
        try:
            held = {os.readlink(f"/proc/{master}/fd/{fd}") for fd in os.listdir(f"/proc/{master}/fd")}
        except OSError:
            return False
        for port in self._started_ports():
            if port is not None and not {f"socket:[{inode}]" for inode in _listening_inodes(port)} & held:
                return False
        return True

    @property
    def _pid_file(self) -> str:
        return os.path.join(self.base_dir, "master.pid")

    def _master_pid(self) -> int | None:
        """The PID of this instance's running master, from its PID file."""
        try:
            with open(self._pid_file) as f:
                pid = int(f.read().strip())
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                command = f.read().split(b"\0")
        except (OSError, ValueError):
            return None
        return pid if os.fsencode(self.conf_file) in command else None


SESSION_SERVICES = frozenset({"imap", "pop3", "imap-login", "pop3-login"})
"""Dovecot's services that serve a client each: the processes of open sessions."""


def _kill(pid: int, signal_number: int) -> None:
    try:
        os.kill(pid, signal_number)
    except ProcessLookupError:
        pass


def _listening_inodes(port: int) -> list[int]:
    """The inodes of the TCP sockets that listen on the port (any IPv4 address), from /proc/net/tcp."""
    inodes = []
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            local, state = fields[1], fields[3]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                inodes.append(int(fields[9]))
    return inodes


def _imap_greets(port: int) -> bool:
    """Whether an IMAP server on the port answers with an untagged OK greeting."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
            greeting = conn.recv(512)
            if greeting.startswith(b"* OK"):
                conn.sendall(b"a LOGOUT\r\n")
                return True
            return False
    except OSError:
        return False


# ---------------------------------------------------------------------------------------
# aiosmtpd


@attrs.frozen
class ReceivedMessage:
    """One message as an SMTPUpstream received it."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    content: bytes
    """The DATA bytes exactly as sent, dot-unstuffed, without the final ".": CRLF line ends."""
    login: str | None
    """The AUTH user of the session, None without AUTH."""
    helo: str | None
    tls: bool
    """Whether the session was TLS (STARTTLS or implicit) when the message came."""
    mail_options: tuple[str, ...] = ()
    rcpt_options: tuple[str, ...] = ()
    peer: tuple[str, int] | None = None


class _SMTP(SMTP):
    """aiosmtpd's session, with AUTH required before mail when there are users.

    aiosmtpd's own auth_required=True warns (UserWarning, for each connection) when it is
    combined with auth_require_tls=False; this does the same check without the warning."""

    def __init__(self, handler: Any, *, require_auth: bool, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.require_auth = require_auth

    async def check_auth_needed(self, caller_method: str) -> bool:
        assert self.session is not None
        if self.require_auth and not self.session.authenticated:
            await self.push("530 5.7.0 Authentication required")
            return True
        return False


class _Controller(Controller):
    def __init__(self, handler: Any, require_auth: bool, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.require_auth = require_auth

    def factory(self) -> SMTP:
        return _SMTP(self.handler, require_auth=self.require_auth, **self.SMTP_kwargs)

    def _trigger_server(self) -> None:
        # Bound to port 0: learn the port the system chose before the base class makes its
        # first connection to it (which it does to check the server works).
        assert isinstance(self.server, asyncio.Server)
        self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()


class SMTPUpstream:
    """
    An SMTP server on 127.0.0.1 (aiosmtpd, in its own thread) that records every message.

    - `users`: logins and passwords; AUTH PLAIN and LOGIN check them, and MAIL needs AUTH
      (530 before it). Without users AUTH is not offered and anyone may send.
    - `starttls`: a server SSLContext to offer STARTTLS with; `implicit_tls`: one to speak
      TLS from the first byte with (not both).
    - `auth_require_tls`: whether AUTH is offered only after STARTTLS (not by default, so
      that tests can log in over plaintext).
    DATA is taken as bytes (no decoding), up to `data_size_limit` bytes. Lines of 998 bytes
    and CRLF pass, stuffed dot included: aiosmtpd refuses with 500 a line of more than 1001
    bytes as sent.
    """

    def __init__(
        self,
        *,
        users: dict[str, str] | None = None,
        starttls: ssl.SSLContext | None = None,
        implicit_tls: ssl.SSLContext | None = None,
        auth_require_tls: bool = False,
        hostname: str = "upstream.test",
        data_size_limit: int = SIZE_LIMIT,
    ) -> None:
        if starttls is not None and implicit_tls is not None:
            raise ValueError("an SMTPUpstream does either STARTTLS or implicit TLS")
        self.users = dict(users) if users is not None else None
        self.hostname = hostname
        self.received: list[ReceivedMessage] = []
        self._condition = threading.Condition()
        self._controller: _Controller | None = None
        self._settings: dict[str, Any] = dict(
            hostname="127.0.0.1",
            port=0,
            ssl_context=implicit_tls,
            # Given, or aiosmtpd asks socket.getfqdn() for every connection.
            server_hostname=hostname,
            tls_context=starttls,
            require_starttls=False,
            decode_data=False,
            enable_SMTPUTF8=True,
            data_size_limit=data_size_limit,
            auth_require_tls=auth_require_tls,
            timeout=WAIT * 2,
        )

    @property
    def port(self) -> int:
        if self._controller is None:
            raise RuntimeError("SMTPUpstream has not been started")
        return int(self._controller.port)

    def start(self) -> None:
        if self._controller is not None:
            return
        handler = _Handler(self)
        controller = _Controller(
            handler, self.users is not None, ready_timeout=WAIT, authenticator=handler.authenticate, **self._settings
        )
        controller.start()
        self._controller = controller

    def stop(self) -> None:
        if self._controller is None:
            return
        controller, self._controller = self._controller, None
        controller.stop()

    def __enter__(self) -> SMTPUpstream:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def _record(self, message: ReceivedMessage) -> None:
        with self._condition:
            self.received.append(message)
            self._condition.notify_all()

    def wait_for_messages(self, count: int = 1, timeout: float = WAIT) -> list[ReceivedMessage]:
        """Wait until at least `count` messages arrived; all of them, in order of arrival."""
        with self._condition:
            if not self._condition.wait_for(lambda: len(self.received) >= count, timeout):
                raise TimeoutError(f"{len(self.received)} of {count} messages arrived after {timeout} s")
            return list(self.received)


class _Handler:
    """aiosmtpd's hooks for an SMTPUpstream, run in the server's thread. (Not the
    SMTPUpstream itself: aiosmtpd reads every attribute of its handler, properties too.)"""

    def __init__(self, upstream: SMTPUpstream) -> None:
        self.users = upstream.users
        self.upstream = upstream

    def authenticate(self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any) -> AuthResult:
        if self.users is not None and isinstance(data, LoginPassword):
            login = data.login.decode("utf-8", "surrogateescape")
            password = data.password.decode("utf-8", "surrogateescape")
            if login in self.users and self.users[login] == password:
                return AuthResult(success=True, auth_data=login)
        # handled=False: aiosmtpd answers 535 5.7.8.
        return AuthResult(success=False, handled=False)

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        if self.users is None:
            responses = [r for r in responses if not r[4:].startswith("AUTH")]
        return responses

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        transport = server.transport
        tls = transport is not None and transport.get_extra_info("ssl_object") is not None
        content = envelope.original_content
        assert content is not None and envelope.mail_from is not None
        message = ReceivedMessage(
            mail_from=envelope.mail_from,
            rcpt_tos=tuple(envelope.rcpt_tos),
            content=content,
            login=session.auth_data if session.authenticated else None,
            helo=session.host_name,
            tls=tls,
            mail_options=tuple(envelope.mail_options),
            rcpt_options=tuple(envelope.rcpt_options),
            peer=session.peer if isinstance(session.peer, tuple) else None,
        )
        self.upstream._record(message)
        return "250 2.0.0 OK"


__all__ = [
    "DOVECOT_USERS",
    "Dovecot",
    "DovecotError",
    "Postfix",
    "PostfixError",
    "ReceivedMessage",
    "SMTPUpstream",
    "dovecot_command",
    "free_ports",
    "postfix_command",
    "split_delivered",
]
