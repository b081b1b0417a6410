"""Registers `twistd mailrelay`; importing mailrelay itself is left to run time."""

from twisted.application.service import ServiceMaker

mailrelay = ServiceMaker(
    "mailrelay",
    "mailrelay.tap",
    "A mail proxy for SMTP, IMAP and POP3: TLS termination, routing, upstream login, splicing.",
    "mailrelay",
)
