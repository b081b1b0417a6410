"""
What the benchmarks in bench/ share, one module a part:

- `wire`: where the parties meet (127.0.0.1), buffer sizes, the line protocol's bytes;
- `processes`: the processes a bench starts, ended by process group however it ends,
  and the CPU they use;
- `cli`: the options every benchmark ends with, and `run_bench`, its main loop's hygiene;
- `upstream`: the upstream process (bulk and line servers, and with options the SMTP,
  auth_http and echo servers of `smtp_server`, `auth_http` and `echo`);
- `clients`: the client side of the bulk and line sessions, and TLS clients;
- `targets`: what the clients connect to, and the certificates of a run;
- `twistd`: mailrelay's configuration for a bench, started as a real twistd;
- `proxies`: haproxy and nginx, when on PATH;
- `dovecot`: the tests' Dovecot as bench/imap.py runs it;
- `measure`: measurement rounds and the CPU each party used in them;
- `report`, `logs`: the report's tables and what mailrelay's log says.

The bench scripts put bench/ on `sys.path` by being run from it (`python bench/tls.py`);
tests/support/soak.py does it by hand. See bench/README.md.
"""
