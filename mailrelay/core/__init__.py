"""
The protocol cores: SMTP, IMAP and POP3 as plain objects fed bytes, with no transport,
reactor or Deferred in sight (the "sans-I/O" split of h11 and of Twisted's own PROXY
header parsers). Each core says what should happen (write these bytes, start TLS, route
this login, close) and the Twisted shell (`mailrelay.protocols`) does it.

Nothing here imports Twisted: `tests/test_layers.py` checks it.
"""
