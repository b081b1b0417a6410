"""`twistd --reactor mailrelay`: the epoll reactor without a logging context per event
(`mailrelay.reactor`). Kept apart from the service plugin so that listing reactors
imports nothing of mailrelay."""

from twisted.application.reactors import Reactor

mailrelay = Reactor(
    "mailrelay",
    "mailrelay.reactor",
    "epoll(4) without a logging context per I/O event (mailrelay's workers run on it)",
)
