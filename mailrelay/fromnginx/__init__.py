"""Translating an nginx configuration's mail {} and stream {} blocks into mailrelay TOML."""
