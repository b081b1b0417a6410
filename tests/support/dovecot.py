"""
A private Dovecot (the Debian packages) for tests: IMAP and POP3 on free loopback ports,
with STARTTLS and implicit TLS when given a certificate, users from a passwd-file,
maildirs the test delivers to, and the client's address forwarded by a trusted proxy
(IMAP ID, POP3 XCLIENT) when asked. Its configuration files: `dovecot_config`.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from types import TracebackType

from tests.support import dovecot_config
from tests.support.dovecot_config import DOVECOT_USERS
from tests.support.servers import (
    NOBODY,
    REAPER,
    WAIT,
    ancestors,
    free_ports,
    kill_quietly,
    listening_inodes,
    read_text,
    remove_quietly,
    running_servers,
    server_environment,
)


class DovecotError(RuntimeError):
    """Dovecot did not start or stop, or doveadm failed."""


DOVECOT_DIRECTORIES = ("/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin", "/sbin")


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
    - `extra_config`: more of dovecot.conf, appended (e.g. an example file's listener
      on a port the test chose: Dovecot does not wait for it to listen).
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
        extra_config: str = "",
    ) -> None:
        self.dir = os.path.abspath(directory)
        self.extra_config = extra_config
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
        for parent in ancestors(self.dir):
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
        # Dovecot's instance_name: the processes' titles start with it ("NAME/imap-login"),
        # and stop() kills what carries it: unique per folder, not per basename (two test
        # runs each with a ".../dovecot" folder would kill each other's processes).
        digest = hashlib.sha256(os.path.abspath(self.dir).encode()).hexdigest()[:8]
        self.name = "dovecot-" + re.sub(r"[^A-Za-z0-9]", "-", os.path.basename(self.dir)) + "-" + digest
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
        return read_text(self.log_file)

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
                env=server_environment(),
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
        running_servers.discard(self)
        reaper = process.pid
        master = self._master_pid()
        # What `doveadm stop` does is SIGTERM to the master, which then leaves the processes
        # of open sessions (and the auth, anvil... they use) running for as long as their
        # clients stay. So the sessions, and the login processes of clients that did not
        # log in, are stopped first: they say "* BYE Server shutting down." or "-ERR Server
        # shutting down." and exit.
        for pid, service in self._services(self.processes()).items():
            if service in SESSION_SERVICES:
                kill_quietly(pid, signal.SIGTERM)
        if master is not None:
            kill_quietly(master, signal.SIGTERM)
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
                    kill_quietly(master, signal.SIGKILL)
            else:
                # The master has exited and left processes (of a session that began while
                # it stopped, and those it uses): they are stopped too, but for the log
                # process, which exits once the others have.
                for pid, service in services.items():
                    if service != "log" and pid not in terminated:
                        kill_quietly(pid, signal.SIGTERM)
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
                kill_quietly(pid, signal.SIGKILL)
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
        """The users for the passwd-file passdb and userdb."""
        return dovecot_config.passwd_file(self.users, self.home)

    def dovecot_conf(self) -> str:
        return dovecot_config.dovecot_conf(
            name=self.name,
            base_dir=self.base_dir,
            state_dir=self.state_dir,
            hostname=self.hostname,
            log_file=self.log_file,
            users_file=self.users_file,
            ports=self._ports or (0, 0, None, None),
            tls=self.tls,
            trusted_networks=self.trusted_networks,
            extra_config=self.extra_config,
        )

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
        remove_quietly(self._pid_file)
        with open(self.output_file, "ab") as output:
            process = subprocess.Popen(
                [sys.executable, "-c", REAPER, self._command, "-F", "-c", self.conf_file],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=server_environment(),
            )
        self._process = process
        self._session = process.pid
        running_servers.add(self)
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
            raise DovecotError(f"{error}\noutput:\n{read_text(self.output_file)}\nlog:\n{self.log_text()}") from None

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
            if port is not None and not {f"socket:[{inode}]" for inode in listening_inodes(port)} & held:
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
