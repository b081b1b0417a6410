"""
The web side of the metrics endpoint: `GET /metrics` in Prometheus's text format (or
OpenMetrics, when the scraper asks for it), a 404 for every other path. A module of its
own so that only a service with `[metrics]` loads `twisted.web`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.web.pages import notFound
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site

__all__ = ["metrics_site"]


class _Root(Resource):
    """`/metrics` and nothing else."""

    def __init__(self, page: Resource) -> None:
        super().__init__()
        self._page = page

    def getChild(self, path: bytes, request: Request) -> IResource:
        return self._page if path == b"metrics" else notFound()


class _MetricsPage(Resource):
    isLeaf = True

    def __init__(self, scrape: Callable[[str], tuple[bytes, str]]) -> None:
        super().__init__()
        self._scrape = scrape

    def render_GET(self, request: Request) -> bytes:
        if request.postpath not in ([], [b""]):
            return notFound().render(request)
        accept = (request.getHeader(b"accept") or b"").decode("latin-1")
        body, content_type = self._scrape(accept)
        request.setHeader(b"content-type", content_type.encode("latin-1"))
        return body


class _QuietSite(Site):
    """A Site that writes no access log line per scrape (one every 15 s forever)."""

    def log(self, request: Any) -> None:
        pass


def metrics_site(scrape: Callable[[str], tuple[bytes, str]]) -> Site:
    """The endpoint's web site: `GET /metrics` answers `scrape(accept)`; anything
    else is a 404."""
    site = _QuietSite(_Root(_MetricsPage(scrape)))
    site.noisy = False
    return site
