"""What the benchmarks' upstream servers and clients agree on: where they meet, buffer
sizes and the SMTP-like line protocol of the sessions tests."""

from __future__ import annotations

HOST = "127.0.0.1"
CHUNK = 4 << 20  # application buffer for bulk transfers, both ends
IO_TIMEOUT = 60.0  # hang guard for every client socket
MB = 1_000_000

GREETING = b"220 bench.example ESMTP ready\r\n"
OK = b"250 ok\r\n"
BYE = b"221 bye\r\n"
SESSION_COMMANDS = (
    b"EHLO client.example.org\r\n",
    b"MAIL FROM:<sender@example.org>\r\n",
    b"RCPT TO:<rcpt@example.net>\r\n",
)
QUIT = b"QUIT\r\n"
NOOP = b"NOOP\r\n"
