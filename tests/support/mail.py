"""
What the tests of the private mail servers (`tests/test_*_server.py`) share: a CA and a
certificate for the servers (fixtures, registered in tests/conftest.py), 8-bit test
messages, an smtplib client, and the users they mail.
"""

from __future__ import annotations

import os
import random
import shutil
import smtplib
import ssl
import tempfile
from collections.abc import Iterator

import pytest
import trustme

TIMEOUT = 30.0

ALICE = "alice@example.test"
BOB = "bob@example.test"
CAROL = "carol@example.test"
DAVE = "dave@example.test"
ERIN = "erin@example.test"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    """A CA for the module's servers (`certificate`, `server_context`), trusted by `client_context`."""
    return trustme.CA(organization_name="mailrelay mail servers test CA")


@pytest.fixture(scope="module")
def certificate(ca: trustme.CA) -> Iterator[tuple[str, str]]:
    """A certificate for 127.0.0.1 (and a name) as PEM files: (chain, key)."""
    directory = tempfile.mkdtemp(prefix="mailrelay-mailservers-tls-")
    try:
        leaf = ca.issue_cert("127.0.0.1", "mx.upstream.test")
        cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
        for blob in leaf.cert_chain_pems:
            blob.write_to_path(cert, append=True)
        leaf.private_key_pem.write_to_path(key)
        yield cert, key
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def server_context(ca: trustme.CA) -> ssl.SSLContext:
    """A server context with a certificate for 127.0.0.1 (and upstream.test) issued by `ca`."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "upstream.test").configure_cert(context)
    return context


def message_8bit(subject: str, body_lines: int = 5) -> bytes:
    """Headers and a body with 8-bit bytes, lines that need dot-stuffing and a 998-byte line."""
    lines = [
        b"From: Sender <sender@client.test>",
        b"To: Alice <alice@example.test>",
        b"Subject: " + subject.encode(),
        b"Message-ID: <" + subject.replace(" ", "-").encode() + b"@client.test>",
        b"MIME-Version: 1.0",
        b"Content-Type: text/plain; charset=utf-8",
        b"Content-Transfer-Encoding: 8bit",
        b"X-Eight-Bit: caf\xc3\xa9 \xe2\x82\xac",
        b"",
        b"Gr\xc3\xbc\xc3\x9fe, \xce\xba\xcf\x8c\xcf\x83\xce\xbc\xce\xb5 \xf0\x9f\x93\xa7",
        b".a line that starts with a dot",
        b"..two dots",
        b"." + b"x" * 997,
        bytes(range(0x80, 0x100)),
    ]
    lines += [b"line %d \xff\xfe\x80" % i for i in range(body_lines)]
    return b"\r\n".join(lines) + b"\r\n"


def random_8bit(size: int, seed: int) -> bytes:
    """`size` bytes (CRLF included) in lines of 1 to 998 bytes of any value but CR and LF."""
    rng = random.Random(seed)
    alphabet = bytes(b for b in range(256) if b not in b"\r\n")
    header = b"From: sender@client.test\r\nTo: alice@example.test\r\nSubject: big\r\n\r\n"
    parts = [header]
    total = len(header)
    while total < size:
        n = min(rng.randint(1, 998), max(size - total - 2, 1))
        line = bytes(rng.choices(alphabet, k=n))
        if rng.random() < 0.05:
            line = b"." + line[1:]
        parts.append(line + b"\r\n")
        total += n + 2
    return b"".join(parts)


def smtp(port: int) -> smtplib.SMTP:
    """A plain smtplib client of 127.0.0.1:`port`, not yet EHLO'd."""
    return smtplib.SMTP("127.0.0.1", port, local_hostname="client.example", timeout=TIMEOUT)
