"""
What mailrelay counts for Prometheus, and the `[metrics] listen` endpoint that serves it.

`Metrics` is one service's counts, in a `CollectorRegistry` of its own (two services in
one process count apart). Without `[metrics]` a service counts nothing (`NO_METRICS`).
Label values are listener names from the configuration and words from the fixed
lists below, never anything a client sent: a client cannot add a time series.

With `workers > 1` (`mailrelay.workers`), the supervisor holds a `MultiprocessMetrics`:
a private directory every worker writes its counts to (prometheus_client's
multiprocess mode, switched on by `PROMETHEUS_MULTIPROC_DIR` in the worker's
environment before it starts) and the one endpoint, which sums them. A worker serves
no endpoint. Counters of a worker that died stay in the sums (a restart does not turn
a counter back); its open sessions leave `mailrelay_sessions_open` (`worker_died`).

Bytes are counted while they flow: `Sessions.report_traffic()` adds what each open
session carried since its last report, before every scrape of a single process, every
`TRAFFIC_INTERVAL` seconds in a worker, and for the rest when the session ends.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from .listening import ListeningService, describe_host

__all__ = [
    "LIMITS",
    "LOGIN_RESULTS",
    "NO_METRICS",
    "OUTCOMES",
    "Metrics",
    "MetricsService",
    "MultiprocessMetrics",
    "metrics_for",
]

T = TypeVar("T")

OUTCOMES = frozenset(
    {
        "closed",
        "rejected",
        "router-error",
        "upstream-unavailable",
        "client-gone",
        "throttled",
        "tls-failed",
        "protocol-error",
        "idle-timeout",
        "login-timeout",
        "drain-timeout",
        "error",
    }
)
"""The `outcome` label values: the session line's outcomes. Any other is counted as `error`."""

LOGIN_RESULTS = ("success", "failure", "refused", "throttled", "error", "abandoned")
"""The `result` label values of `mailrelay_logins_total` (see docs/metrics.md)."""

LIMITS = ("max_sessions", "max_per_client", "max_rate_per_client", "login_max_per_client", "login_max_per_user")
"""The `limit` label values of `mailrelay_limit_hits_total`: the connection limits by
their key, the login limits by theirs with `login_` in front."""

WORKER_VARIABLE = "MAILRELAY_METRICS_WORKER"
"""Set (with `PROMETHEUS_MULTIPROC_DIR`) in a worker's environment by the supervisor:
the worker counts into the shared directory and serves nothing."""

TRAFFIC_INTERVAL = 5.0
"""Seconds between a worker's reports of the bytes its open sessions carried."""

SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
"""Histogram buckets: a loopback connect takes well under a millisecond, an auth
service over HTTP tens of milliseconds, a timeout 10 s or 30 s."""


class Metrics:
    """
    One service's counts. Each method is one thing that happened; the methods of
    `NO_METRICS` (built with `registry=None`) do nothing.
    """

    def __init__(self, registry: CollectorRegistry | None) -> None:
        """`registry`: where the metrics are registered (None: count nothing). In a
        process started with `PROMETHEUS_MULTIPROC_DIR` the values go to that directory
        whatever the registry (prometheus_client decides at import)."""
        self.registry = registry
        self.enabled = registry is not None
        self.before_scrape: list[Callable[[], object]] = []
        """Called before each scrape of this registry (bytes of open sessions)."""
        if registry is None:
            return
        self._sessions = Counter(
            "mailrelay_sessions", "Sessions ended, by listener and outcome.", ["listener", "outcome"], registry=registry
        )
        self._open = Gauge(
            "mailrelay_sessions_open",
            "Sessions open now, by listener.",
            ["listener"],
            registry=registry,
            multiprocess_mode="livesum",
        )
        self._logins = Counter(
            "mailrelay_logins", "Logins (sessions with a user) by listener and result.", ["listener", "result"], registry=registry
        )
        self._bytes = Counter(
            "mailrelay_bytes",
            "Bytes carried after the login; direction up: client to upstream, down: upstream to client.",
            ["listener", "direction"],
            registry=registry,
        )
        self._router = Histogram(
            "mailrelay_router_seconds",
            "How long the Router took to answer (routes, a refusal, an error or its timeout).",
            registry=registry,
            buckets=SECONDS_BUCKETS,
        )
        self._connect = Histogram(
            "mailrelay_upstream_connect_seconds",
            "How long each successful TCP connect to an upstream took.",
            registry=registry,
            buckets=SECONDS_BUCKETS,
        )
        self._tls = Counter(
            "mailrelay_tls_handshake_failures",
            "Client TLS handshakes that failed or timed out, by listener.",
            ["listener"],
            registry=registry,
        )
        self._limits = Counter(
            "mailrelay_limit_hits",
            "Connections turned away and logins refused or held back by a limit.",
            ["listener", "limit"],
            registry=registry,
        )

    def session_opened(self, listener: str) -> None:
        if self.enabled:
            self._open.labels(listener).inc()

    def session_ended(self, listener: str, outcome: str) -> None:
        """A session opened with `session_opened` ended (once)."""
        if not self.enabled:
            return
        self._open.labels(listener).dec()
        self._sessions.labels(listener, outcome if outcome in OUTCOMES else "error").inc()
        if outcome == "tls-failed":
            self._tls.labels(listener).inc()

    def carried(self, listener: str, up: int, down: int) -> None:
        """A session carried `up` more bytes from its client, `down` more to it."""
        if not self.enabled:
            return
        if up:
            self._bytes.labels(listener, "up").inc(up)
        if down:
            self._bytes.labels(listener, "down").inc(down)

    def login(self, listener: str, result: str) -> None:
        """A login ended with `result` (one of `LOGIN_RESULTS`)."""
        if self.enabled:
            assert result in LOGIN_RESULTS, result
            self._logins.labels(listener, result).inc()

    def limit_hit(self, listener: str, limit: str) -> None:
        """`limit` (one of `LIMITS`) turned a connection away, or refused or held back a login."""
        if self.enabled:
            assert limit in LIMITS, limit
            self._limits.labels(listener, limit).inc()

    def upstream_connected(self, seconds: float) -> None:
        if self.enabled:
            self._connect.observe(seconds)

    def timed_router(self, ask: Callable[[], T | Deferred[T]], clock: IReactorTime) -> T | Deferred[T]:
        """`ask()` (a Router's answer: returned at once, raised, or a Deferred), observed
        in `mailrelay_router_seconds` when known, whatever it is, unless cancelled (the
        client left). An answer known at once stays one: no Deferred is made for it."""
        if not self.enabled:
            return ask()
        started = clock.seconds()
        try:
            answer = ask()
        except CancelledError:
            raise
        except Exception:
            self._router.observe(clock.seconds() - started)
            raise
        if not isinstance(answer, Deferred):
            self._router.observe(clock.seconds() - started)
            return answer

        def observed(result: Any) -> Any:
            if not (isinstance(result, Failure) and result.check(CancelledError)):
                self._router.observe(clock.seconds() - started)
            return result

        return answer.addBoth(observed)

    def scrape(self, accept: str = "") -> tuple[bytes, str]:
        """The registry in the text format `accept` asks for (Prometheus's or
        OpenMetrics): (body, content type)."""
        assert self.registry is not None
        for hook in self.before_scrape:
            hook()
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


NO_METRICS = Metrics(None)
"""Counts nothing: a service without `[metrics]`, and the default of every component."""


def metrics_for(listen: str | None, environ: Mapping[str, str] = os.environ) -> tuple[Metrics, str | None]:
    """
    A service's metrics for `[metrics] listen` (None: no `[metrics]`), and where to
    serve them (None: nowhere). In a worker (`WORKER_VARIABLE` set by the supervisor),
    counted into the supervisor's directory, which the supervisor serves.
    """
    if listen is None:
        return NO_METRICS, None
    if environ.get(WORKER_VARIABLE):
        return Metrics(CollectorRegistry(auto_describe=True)), None
    return Metrics(CollectorRegistry(auto_describe=True)), listen


class MetricsService(ListeningService):
    """Serves `scrape` at `/metrics` on the endpoint `listen` while running; `port`
    fires with the listening port. A port that cannot be bound stops the start-up."""

    log = Logger()
    name = "metrics"

    def __init__(self, listen: str, scrape: Callable[[str], tuple[bytes, str]], reactor: Any) -> None:
        from .metrics_web import metrics_site  # not at import: `import mailrelay` loads no twisted.web

        super().__init__(serverFromString(reactor, listen), metrics_site(scrape))
        self.listen = listen
        self.what = f"the metrics endpoint ([metrics] listen = {listen!r})"

    def listened(self, host: IAddress) -> None:
        self.log.info("metrics on http://{address}/metrics", address=describe_host(host))


class MultiprocessMetrics:
    """
    The supervisor's side of the metrics of `workers > 1`: a private directory the
    workers count into, and the endpoint that sums them.

    The supervisor puts `child_environment()` into each worker's environment before
    starting it (a new process: prometheus_client chooses its mode at import), calls
    `worker_died(pid)` when a worker exits, runs `service()` (None without
    `[metrics]`), and `close()` once every worker has exited.
    """

    def __init__(self, listen: str | None, reactor: Any = None, directory: str | None = None) -> None:
        """`listen`: `[metrics] listen` (None: no `[metrics]`: the workers count nothing
        and nothing is served). `directory`: where the counts go (default: a new private
        temporary directory, removed by `close()`)."""
        self.listen = listen
        self.reactor = reactor
        self._own = directory is None and listen is not None
        self.directory = (tempfile.mkdtemp(prefix="mailrelay-metrics-") if self._own else directory) or ""
        self.registry = CollectorRegistry(auto_describe=True)
        if listen is not None:
            MultiProcessCollector(self.registry, path=self.directory)

    def child_environment(self) -> dict[str, str]:
        """What a worker's environment needs (empty without `[metrics]`)."""
        if self.listen is None:
            return {}
        return {"PROMETHEUS_MULTIPROC_DIR": self.directory, WORKER_VARIABLE: "1"}

    def worker_died(self, pid: int) -> None:
        """The worker `pid` exited: its open sessions are open no more."""
        if self.listen is not None:
            mark_process_dead(pid, self.directory)

    def scrape(self, accept: str = "") -> tuple[bytes, str]:
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type

    def service(self) -> MetricsService | None:
        """The endpoint, summing every worker's counts (None without `[metrics]`)."""
        if self.listen is None:
            return None
        if self.reactor is None:
            from twisted.internet import reactor

            self.reactor = reactor
        return MetricsService(self.listen, self.scrape, self.reactor)

    def close(self) -> None:
        """Remove the directory this object made (every worker has exited)."""
        if self._own:
            shutil.rmtree(self.directory, ignore_errors=True)
            self._own = False
