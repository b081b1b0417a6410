"""
The demo's mailrelay configuration, as the TOML file a user would write: one `starttls`
and one `tls` listener per mail protocol and a `splice` listener for SMTP, each with a
`static` router to the demo's own servers. It is written into the demo's folder as
`mailrelay.toml` and read back with `load_config`, so what runs is exactly what the file
says (and `mailrelay check` on it shows the same).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import attrs

from ..config import Config, load_config
from .certificate import DemoCertificates

if TYPE_CHECKING:
    # Not at run time: twisted.mail imports the reactor, and `mailrelay worker` (whose
    # command line imports this module) installs its own reactor first.
    from .upstream import UpstreamPorts

__all__ = ["DEFAULT_PORT_OFFSET", "LISTENERS", "DemoListener", "demo_ports", "write_config"]

DEFAULT_PORT_OFFSET = 10000
"""Each listener listens on this plus its protocol's standard port: high ports need no root."""


@attrs.frozen
class DemoListener:
    name: str
    mode: str
    protocol: str
    """The mail protocol (`smtp`, `imap`, `pop3`), also for the splice listener, which
    itself speaks none."""
    standard_port: int
    what: str
    """What it is, for the printed summary."""


LISTENERS = (
    DemoListener("submission", "starttls", "smtp", 587, "SMTP submission, STARTTLS, AUTH"),
    DemoListener("smtps", "tls", "smtp", 465, "SMTP submission over TLS, AUTH"),
    DemoListener("imap", "starttls", "imap", 143, "IMAP, STARTTLS"),
    DemoListener("imaps", "tls", "imap", 993, "IMAP over TLS"),
    DemoListener("pop3", "starttls", "pop3", 110, "POP3, STARTTLS (STLS)"),
    DemoListener("pop3s", "tls", "pop3", 995, "POP3 over TLS"),
    DemoListener("mx", "splice", "smtp", 25, "SMTP as an MX, bytes spliced unread"),
)


def demo_ports(offset: int) -> dict[str, int]:
    """Each listener's port for `offset`."""
    return {listener.name: offset + listener.standard_port for listener in LISTENERS}


def write_config(folder: Path, offset: int, upstream: UpstreamPorts, certificates: DemoCertificates) -> tuple[Path, Config]:
    """Write `folder/mailrelay.toml` and read it back (any error is a bug of the demo's)."""
    path = folder / "mailrelay.toml"
    path.write_text(_toml(offset, upstream, certificates))
    return path, load_config(path)


def _toml(offset: int, upstream: UpstreamPorts, certificates: DemoCertificates) -> str:
    ports = {"smtp": upstream.smtp, "imap": upstream.imap, "pop3": upstream.pop3}
    parts = [
        "# mailrelay's configuration in the demo (`mailrelay demo`, `twistd -n mailrelay`).\n"
        "# The upstreams are the demo's own twisted.mail servers on 127.0.0.1; in a deployment\n"
        "# they are your Postfix and Dovecot. Run `mailrelay check` on this file to see what it builds.\n"
        "\n"
        "[tls]                                  # the certificate of the tls and starttls listeners\n"
        f'cert = "{certificates.cert.name}"                     # signed by ca.pem, for localhost and 127.0.0.1\n'
        f'key = "{certificates.key.name}"\n'
    ]
    for listener in LISTENERS:
        port = offset + listener.standard_port
        lines = [
            "",
            f"[[listener]]                           # {listener.what}",
            f'name = "{listener.name}"',
            f'listen = "tcp:{port}:interface=127.0.0.1"',
            f'mode = "{listener.mode}"',
        ]
        if listener.mode == "splice":
            lines.append('protocol = "none"                      # bytes as they come: the upstream sees the client\'s SMTP')
            lines.append(f'router = {{ type = "static", host = "127.0.0.1", port = {ports[listener.protocol]} }}')
        else:
            lines.append(f'protocol = "{listener.protocol}"')
            # IMAP LOGIN and POP3 USER/PASS: what every server has (twisted.mail's IMAP
            # and POP3 servers offer no AUTHENTICATE PLAIN with an initial response).
            mechanism = "" if listener.protocol == "smtp" else ', auth_mechanism = "login"'
            lines.append(
                "# passthrough: mailrelay logs in upstream with the client's name and password,\n"
                "# so the upstream checks the password (the static router checks none itself)"
            )
            lines.append(
                f'router = {{ type = "static", host = "127.0.0.1", port = {ports[listener.protocol]},'
                f' login = "passthrough"{mechanism} }}'
            )
        parts.append("\n".join(lines) + "\n")
    return "".join(parts)
