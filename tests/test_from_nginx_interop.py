"""
The same mail {} block run by a real nginx, and translated by `mailrelay from-nginx`
and run by `twistd mailrelay` (the installed package), each in front of the tests'
real Dovecot (IMAP, POP3) and Postfix (SMTP, XCLIENT from loopback), asking one
auth_http service: the same SMTP, IMAP and POP3 client scenarios (STARTTLS, login,
fetch or send, a wrong password refused) must end the same way through both.

Differences by design, not compared: the greetings and capability lists (each proxy's
own), and the text of a refusal.
"""

from __future__ import annotations

import imaplib
import os
import poplib
import shutil
import signal
import smtplib
import ssl
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from mailrelay.__main__ import check, main
from tests.support.dovecot import Dovecot
from tests.support.httpauth import AuthService, Seen
from tests.support.imap import fetch_message
from tests.support.net import WAIT
from tests.support.postfix import Postfix
from tests.support.processes import TWISTD, assert_clean_stop, spawn  # noqa: F401
from tests.support.servers import free_ports

pytestmark = pytest.mark.slow

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
MODULES = Path("/usr/lib/nginx/modules")
USER, PASSWORD = "alice@example.test", "alice-secret"
MESSAGE = b"From: bob@example.test\r\nTo: alice@example.test\r\nSubject: hello\r\n\r\nthrough the proxy\r\n"

NGINX_CONF = """\
daemon off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log info;
load_module {modules}/ngx_mail_module.so;
events {{ worker_connections 64; }}

mail {{
    server_name         relay.test;
    auth_http           127.0.0.1:{auth}/auth;
    auth_http_header    X-Auth-Key "interop-secret";
    starttls            only;
    ssl_certificate     {cert};
    ssl_certificate_key {key};
    ssl_protocols       TLSv1.2 TLSv1.3;
    imap_auth           plain login;

    server {{ listen 127.0.0.1:{imap}; protocol imap; }}
    server {{ listen 127.0.0.1:{pop3}; protocol pop3; }}
    server {{ listen 127.0.0.1:{smtp}; protocol smtp; smtp_auth plain login; }}
}}
"""


@pytest.fixture(scope="module")
def upstreams() -> Iterator[tuple[Dovecot, Postfix]]:
    if not (os.access(NGINX, os.X_OK) and (MODULES / "ngx_mail_module.so").exists()):
        pytest.skip("nginx with its mail module is not installed (dev/test installs nginx and libnginx-mod-mail)")
    directory = tempfile.mkdtemp(prefix="mailrelay-nginx-")
    os.chmod(directory, 0o755)
    os.mkdir(f"{directory}/dovecot")
    os.mkdir(f"{directory}/postfix")
    with Dovecot(f"{directory}/dovecot") as dovecot, Postfix(f"{directory}/postfix") as postfix:
        dovecot.deliver(USER, MESSAGE)
        yield dovecot, postfix
    shutil.rmtree(directory, ignore_errors=True)


def auth_service(dovecot: Dovecot, postfix: Postfix) -> AuthService:
    """An auth_http service as nginx users write one: it checks the password and the
    shared header, and sends each protocol to its upstream."""
    ports = {"imap": dovecot.imap_port, "pop3": dovecot.pop3_port, "smtp": postfix.port}

    def answer(seen: Seen) -> tuple[int, list[tuple[str, str]], bytes]:
        if seen.get("X-Auth-Key") != "interop-secret":
            return 200, [("Auth-Status", "Temporary server problem")], b""
        if (seen.get("Auth-User"), seen.get("Auth-Pass")) != (USER, PASSWORD):
            return 200, [("Auth-Status", "Invalid login or password"), ("Auth-Wait", "0")], b""
        protocol = seen.get("Auth-Protocol") or ""
        return 200, [("Auth-Status", "OK"), ("Auth-Server", "127.0.0.1"), ("Auth-Port", str(ports[protocol]))], b""

    return AuthService(answer)


def scenarios(ports: dict[str, int], context: ssl.SSLContext, postfix: Postfix, delivered: int) -> dict[str, Any]:
    """Every client scenario through a proxy on `ports`; what each ended with."""
    outcome: dict[str, Any] = {}
    imap = imaplib.IMAP4("127.0.0.1", ports["imap"], timeout=WAIT)
    imap.starttls(context)
    try:
        imap.login(USER, "wrong password")
        outcome["imap wrong password"] = "accepted"
    except imaplib.IMAP4.error:
        outcome["imap wrong password"] = "refused"
    try:
        imap.shutdown()
    except OSError:
        pass
    imap = imaplib.IMAP4("127.0.0.1", ports["imap"], timeout=WAIT)
    imap.starttls(context)
    outcome["imap login"] = imap.login(USER, PASSWORD)[0]
    imap.select("INBOX", readonly=True)
    outcome["imap fetch"] = fetch_message(imap, 1)
    imap.logout()

    pop = poplib.POP3("127.0.0.1", ports["pop3"], timeout=WAIT)
    pop.stls(context)
    pop.user(USER)
    try:
        pop.pass_("wrong password")
        outcome["pop3 wrong password"] = "accepted"
    except poplib.error_proto:
        outcome["pop3 wrong password"] = "refused"
    pop.close()
    pop = poplib.POP3("127.0.0.1", ports["pop3"], timeout=WAIT)
    pop.stls(context)
    pop.user(USER)
    outcome["pop3 login"] = pop.pass_(PASSWORD).startswith(b"+OK")
    outcome["pop3 retr"] = b"\r\n".join(pop.retr(1)[1]) + b"\r\n"
    pop.quit()

    smtp = smtplib.SMTP("127.0.0.1", ports["smtp"], timeout=WAIT)
    smtp.starttls(context=context)
    try:
        smtp.login(USER, "wrong password")
        outcome["smtp wrong password"] = "accepted"
    except smtplib.SMTPAuthenticationError:
        outcome["smtp wrong password"] = "refused"
    except smtplib.SMTPServerDisconnected:
        outcome["smtp wrong password"] = "refused"
    smtp.close()
    smtp = smtplib.SMTP("127.0.0.1", ports["smtp"], timeout=WAIT)
    smtp.starttls(context=context)
    outcome["smtp login"] = smtp.login(USER, PASSWORD)[0]
    outcome["smtp send"] = smtp.sendmail("bob@example.test", [USER], MESSAGE)
    smtp.quit()
    messages = postfix.wait_for_messages(USER, delivered + 1)
    outcome["smtp delivered"] = len(messages) - delivered
    # The login reached Postfix by XCLIENT LOGIN= (nginx's default, and the http router's).
    outcome["smtp authenticated sender"] = f"(Authenticated sender: {USER})".encode() in messages[-1]
    return outcome


def test_nginx_and_its_translation_behave_alike(
    tmp_path: Path,
    upstreams: tuple[Dovecot, Postfix],
    spawn: Callable[..., Any],  # noqa: F811
    request: pytest.FixtureRequest,
) -> None:
    dovecot, postfix = upstreams
    service = auth_service(dovecot, postfix)
    request.addfinalizer(service.close)
    ca = trustme.CA()
    leaf = ca.issue_cert("relay.test", "127.0.0.1")
    cert, key = tmp_path / "relay.crt", tmp_path / "relay.key"
    for blob in leaf.cert_chain_pems:
        blob.write_to_path(str(cert), append=True)
    leaf.private_key_pem.write_to_path(str(key))
    context = ssl.create_default_context()
    ca.configure_trust(context)
    imap_port, pop3_port, smtp_port = free_ports(3)
    ports = {"imap": imap_port, "pop3": pop3_port, "smtp": smtp_port}
    config = tmp_path / "nginx.conf"
    config.write_text(
        NGINX_CONF.format(
            dir=tmp_path, modules=MODULES, auth=service.port, cert=cert, key=key, imap=imap_port, pop3=pop3_port, smtp=smtp_port
        )
    )

    nginx = subprocess.Popen(
        [NGINX, "-p", f"{tmp_path}/", "-c", str(config), "-e", f"{tmp_path}/nginx-error.log"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )

    def stop_nginx() -> None:
        if nginx.poll() is None:
            os.killpg(nginx.pid, signal.SIGKILL)
        nginx.wait(WAIT)

    try:
        wait_for_port(smtp_port, nginx)
        through_nginx = scenarios(ports, context, postfix, len(postfix.messages(USER)))
    finally:
        stop_nginx()

    out = tmp_path / "mailrelay.toml"
    assert main(["from-nginx", str(config), "-o", str(out)]) == 0
    assert check(str(out)) == 0
    process = spawn(TWISTD, "-n", "--pidfile=", "mailrelay", "--config", str(out))
    for name in ("imap", "pop3", "smtp"):
        process.wait_for(rf"listener {name}-{ports[name]} on 127\.0\.0\.1:{ports[name]}")
    through_mailrelay = scenarios(ports, context, postfix, len(postfix.messages(USER)))
    process.signal(signal.SIGTERM)
    assert_clean_stop(process)

    assert through_nginx == {
        "imap wrong password": "refused",
        "imap login": "OK",
        "imap fetch": MESSAGE,
        "pop3 wrong password": "refused",
        "pop3 login": True,
        "pop3 retr": MESSAGE,
        "smtp wrong password": "refused",
        "smtp login": 235,
        "smtp send": {},
        "smtp delivered": 1,
        "smtp authenticated sender": True,
    }
    assert through_mailrelay == through_nginx
    # Both asked the auth service the same questions: three failed and three good logins.
    protocols = [(seen.get("Auth-Protocol"), seen.get("Auth-Pass") == PASSWORD) for seen in service.requests]
    assert protocols[:6] == protocols[6:]
    assert len(protocols) == 12


def wait_for_port(port: int, process: subprocess.Popen[bytes]) -> None:
    """Until something accepts on 127.0.0.1:`port` (nginx has no readiness signal)."""
    import socket
    import time

    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"nginx exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("nginx did not listen")
