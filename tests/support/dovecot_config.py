"""
The configuration files of a private Dovecot (`tests.support.dovecot.Dovecot`): its
dovecot.conf, which reads nothing from /etc/dovecot, and its passwd-file of users.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from types import MappingProxyType

from tests.support.servers import NOBODY

DOVECOT_USERS: Mapping[str, str] = MappingProxyType({"alice@example.test": "alice-secret", "bob@example.test": "bob-secret"})
"""Dovecot's default users and their passwords: two, so that a test can tell their mail apart."""


def passwd_file(users: Mapping[str, str], home: Callable[[str], str]) -> str:
    """The users for the passwd-file passdb and userdb: user:{PLAIN}password:uid:gid::home,
    the mail processes running as nobody."""
    return "".join(f"{user}:{{PLAIN}}{password}:{NOBODY}:{NOBODY}::{home(user)}\n" for user, password in users.items())


def dovecot_conf(
    *,
    name: str,
    base_dir: str,
    state_dir: str,
    hostname: str,
    log_file: str,
    users_file: str,
    ports: tuple[int, int, int | None, int | None],
    tls: tuple[str, str] | None,
    trusted_networks: str | None,
    extra_config: str = "",
) -> str:
    """dovecot.conf of an instance named `name` (its processes' titles start with it) on
    127.0.0.1's `ports` (IMAP, POP3, IMAPS, POP3S; None or 0: off), reading nothing from
    /etc/dovecot: logins checked against `users_file` (`passwd_file`), and a client from
    `trusted_networks` may forward the real client's address. `extra_config` is
    appended as it is (Dovecot merges a `service` section given twice)."""
    imap, pop3, imaps, pop3s = ports
    lines = [
        "# A private Dovecot for tests (tests/support/dovecot.py). Nothing comes from /etc/dovecot.",
        f"instance_name = {name}",
        f"base_dir = {base_dir}",
        f"state_dir = {state_dir}",
        "protocols = imap pop3",
        "listen = 127.0.0.1",
        f"hostname = {hostname}",
        f"login_greeting = {hostname} Dovecot ready.",
        # No syslog here. Login lines (with rip=, the client's address) are info.
        f"log_path = {log_file}",
        f"info_log_path = {log_file}",
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
        f"  args = scheme=PLAIN {users_file}",
        "}",
        "userdb {",
        "  driver = passwd-file",
        f"  args = {users_file}",
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
    if trusted_networks is not None:
        # Clients from there may forward the real client's address (IMAP ID, POP3 XCLIENT).
        lines.append(f"login_trusted_networks = {trusted_networks}")
    if tls:
        cert, key = tls
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
    return "\n".join(lines) + "\n" + extra_config
