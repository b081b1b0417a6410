"""
mailrelay as a twistd application with a Router written in Python:

    twistd -ny mailrelay.tac

The router below sends clients from loopback to one upstream and everyone else to
another, with a fallback; it is the place to put your own routing. The listener and
its upstreams come from the environment so the file runs unchanged in a test:
MAILRELAY_LISTEN (default tcp:2525:interface=127.0.0.1), MAILRELAY_UPSTREAM and
MAILRELAY_FALLBACK (host:port, default 127.0.0.1:25 and none).
"""

import ipaddress
import os

from twisted.application.service import Application

from mailrelay import ExitOnListenFailure, Reject, Route, Router, RouteRequest, makeService


def route_from(env_value: str) -> Route:
    host, _, port = env_value.rpartition(":")
    return Route(host=host.strip("[]"), port=int(port))


class ExampleRouter(Router):
    """Loopback clients go to MAILRELAY_UPSTREAM (then MAILRELAY_FALLBACK); others are refused."""

    def __init__(self, upstream: Route, fallback: Route | None) -> None:
        self.routes = [upstream] + ([fallback] if fallback else [])

    async def route(self, request: RouteRequest) -> list[Route]:
        client = ipaddress.ip_address(request.client[0])
        if not client.is_loopback:
            raise Reject(f"{client} is not a loopback client", wait=1)
        return self.routes


router = ExampleRouter(
    route_from(os.environ.get("MAILRELAY_UPSTREAM", "127.0.0.1:25")),
    route_from(os.environ["MAILRELAY_FALLBACK"]) if os.environ.get("MAILRELAY_FALLBACK") else None,
)
config = {
    "listener": [
        {
            "name": "relay",
            "listen": os.environ.get("MAILRELAY_LISTEN", "tcp:2525:interface=127.0.0.1"),
            "mode": "splice",
        }
    ]
}
application = Application("mailrelay")
# ExitOnListenFailure: a port that cannot be bound stops twistd with one line saying why
# (port in use, permission), not a traceback.
ExitOnListenFailure(makeService(config, router=router)).setServiceParent(application)
