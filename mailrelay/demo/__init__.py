"""A self-contained demo: mail servers on twisted.mail and mailrelay in front, on localhost."""
